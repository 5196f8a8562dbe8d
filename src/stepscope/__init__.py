"""stepscope: where reasoning step flow breaks, and its test-time repair."""
__version__ = "0.1.0"
