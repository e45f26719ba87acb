"""The package's version, written into checkpoints, packed files and run headers."""

__version__ = "0.1.0"
