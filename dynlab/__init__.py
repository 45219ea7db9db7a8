"""dynlab: learning dynamics of small language models."""
__version__ = "0.1.0"
