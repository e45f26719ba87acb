"""largebatch: synchronous data-parallel training with very large global batches."""

from largebatch.version import __version__

__all__ = ["__version__", "fit"]


def fit(*args, **kwargs) -> dict:
    """Train your own model on your own data: see :func:`largebatch.api.fit`."""
    from largebatch.api import fit as _fit

    return _fit(*args, **kwargs)
