"""dynlab.model."""
