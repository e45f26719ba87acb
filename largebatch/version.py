"""The package's version, as the run header, checkpoints and packed datasets record it."""

__version__ = "0.1.0"
