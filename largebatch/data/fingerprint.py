"""A cheap fingerprint of a dataset, so that the workers can check that they hold the same one.

Every worker must train on the same dataset: the sampler hands each worker its indices into it,
so different lengths leave workers waiting on each other and different contents train on data
nobody chose. Reading the whole dataset to compare it would cost an epoch, so a fingerprint takes
its length and :data:`SAMPLES` items at indices fixed by the length alone (the first, the last
and evenly between): their labels, image shapes and a 4x4 thumbnail of each image (the mean of
each block, per channel).

The items are fetched the way validation fetches them (no augmentation of the engine's own), and
twice: a dataset whose own transforms are random (a torchvision ``RandomCrop``, say) gives other
pixels on each fetch, so its images cannot be compared between workers; its fingerprint holds no
thumbnails (``thumbs`` None), and only its length, labels and shapes are compared. Thumbnails are
compared with a tolerance, not bit for bit, so that workers whose CPUs round differently (another
vector width in a resize) still agree on the same data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

SAMPLES = 8
"""Items sampled per dataset."""
THUMB = 4
"""Side of the thumbnail kept per sampled image."""
TOLERANCE = 1e-3
"""Largest difference between two thumbnails of the same data, relative to the images' scale."""


def sample_indices(length: int, count: int = SAMPLES) -> list[int]:
    """``count`` indices spread over ``range(length)``, the first and the last included; a
    function of the length alone, so every worker with the same length samples the same items."""
    if length <= count:
        return list(range(length))
    return sorted({round(k * (length - 1) / (count - 1)) for k in range(count)})


@dataclass(frozen=True)
class Fingerprint:
    length: int
    indices: tuple
    """The sampled indices."""
    labels: Optional[tuple]
    """Their labels (int); None where two fetches gave other labels."""
    shape: tuple
    """The shape (C, H, W) of their images, as the engine collates them."""
    thumbs: Optional[torch.Tensor]
    """float64 (len(indices), C, THUMB, THUMB) means of the images' blocks; None where two fetches
    of the same items gave other pixels (the dataset's own transforms are random)."""

    def differences(self, other: "Fingerprint") -> list[str]:
        """What differs between this fingerprint and ``other``'s, in words ([] for the same data)."""
        if self.length != other.length:
            return [f"{self.length} vs {other.length} samples"]
        found = []
        if None not in (self.labels, other.labels) and self.labels != other.labels:
            found.append("labels")
        if self.shape != other.shape:
            found.append(f"image shape {self.shape} vs {other.shape}")
        elif self.thumbs is not None and other.thumbs is not None and not same_pixels(self.thumbs, other.thumbs):
            found.append("images")
        if found:
            found[-1] += f" of the items at indices {list(self.indices)}"
        return found


def same_pixels(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two thumbnails show the same images, up to rounding."""
    scale = max(float(a.abs().max()), float(b.abs().max()), 1.0)
    return bool((a - b).abs().max() <= TOLERANCE * scale)


def _thumbs(images: torch.Tensor) -> torch.Tensor:
    return F.adaptive_avg_pool2d(images.double(), THUMB)


def fingerprint(dataset) -> Fingerprint:
    """The fingerprint of ``dataset``, one of the engine's (``__getitems__`` gives
    :class:`~largebatch.data.base.Samples`); its sampled items are fetched twice."""
    length = len(dataset)
    indices = sample_indices(length)
    first, second = dataset.__getitems__(indices), dataset.__getitems__(indices)
    thumbs = _thumbs(first.images)
    random = first.images.shape != second.images.shape or not same_pixels(thumbs, _thumbs(second.images))
    labels = tuple(int(y) for y in first.labels) if torch.equal(first.labels, second.labels) else None
    return Fingerprint(length, tuple(indices), labels, tuple(first.images.shape[1:]), None if random else thumbs)


def differing(fingerprints: list[Fingerprint]) -> tuple[list[int], list[str]]:
    """(the ranks whose fingerprint differs from rank 0's, what differs on the first of them);
    images are compared only where no worker found the dataset random per fetch."""
    compare = all(f.thumbs is not None for f in fingerprints)
    reference = fingerprints[0] if compare else _without_thumbs(fingerprints[0])
    odd, what = [], []
    for rank, f in enumerate(fingerprints[1:], start=1):
        found = reference.differences(f if compare else _without_thumbs(f))
        if found:
            odd.append(rank)
            what = what or found
    return odd, what


def _without_thumbs(f: Fingerprint) -> Fingerprint:
    return Fingerprint(f.length, f.indices, f.labels, f.shape, None)
