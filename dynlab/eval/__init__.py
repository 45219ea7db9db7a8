"""dynlab.eval."""
