"""dynlab.data."""
