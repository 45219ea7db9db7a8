"""dynlab.train."""
