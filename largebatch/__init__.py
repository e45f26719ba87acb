"""largebatch: synchronous data-parallel training with very large global batches."""

__version__ = "0.1.0"
