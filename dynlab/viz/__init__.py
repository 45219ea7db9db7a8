"""dynlab.viz."""
