"""Image sizes as data.image_size, the datasets and the zoo's models give and take them: a side (square
images) or (height, width)."""

from __future__ import annotations

from typing import Union

Size = Union[int, tuple[int, int]]


def sides(image_size: Size) -> tuple[int, int]:
    """(height, width) of ``image_size``."""
    if isinstance(image_size, int):
        return image_size, image_size
    height, width = image_size
    return int(height), int(width)


def text(image_size: Size) -> str:
    """'32x32', '16x40'."""
    height, width = sides(image_size)
    return f"{height}x{width}"


def as_size(value) -> Size:
    """A side, or (height, width) where they differ, from an int or a [height, width] pair."""
    height, width = sides(value if isinstance(value, int) else tuple(value))
    return height if height == width else (height, width)


def pixels(image_size: Size) -> int:
    height, width = sides(image_size)
    return height * width
