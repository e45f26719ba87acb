"""largebatch: synchronous data-parallel training with very large global batches."""

__version__ = "0.1.0"


def fit(*args, **kwargs) -> dict:
    """Train your own model on your own data: see :func:`largebatch.api.fit`."""
    from largebatch.api import fit as _fit

    return _fit(*args, **kwargs)
