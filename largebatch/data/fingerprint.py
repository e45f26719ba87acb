"""A cheap fingerprint of a dataset, so that the workers can check that they hold the same one.

Every worker must train on the same dataset: the sampler hands each worker its indices into it,
so different lengths leave workers waiting on each other and different contents train on data
nobody chose. Reading the whole dataset to compare it would cost an epoch, so a fingerprint takes
its length and :data:`SAMPLES` items at indices fixed by the length alone (the first, the last
and evenly between): their labels, image shapes and a 4x4 thumbnail of each image (the mean of
each block, per channel).

The items are fetched the way validation fetches them (no augmentation of the engine's own), and
twice: a dataset whose own transforms are random (a torchvision ``RandomCrop``, say) gives other
pixels on each fetch, so the images of those items cannot be compared between workers. An item is
*steady* on a worker where its two fetches gave the same pixels, and images are compared item by
item, only where the item is steady on both workers; lengths, labels and shapes are always compared.
Thumbnails are compared with a tolerance, not bit for bit, so that workers whose CPUs round
differently (another vector width in a resize) still agree on the same data.

The rule for images: a worker is refused when *every* sampled item is steady on it and on rank 0
and *every* one shows other pixels than on rank 0; that is what unseeded random data gives (each
item the same on every fetch, other on every worker). Where only some items differ, rank 0 prints
one warning naming them and the run goes on. A random transform applied with some probability (a
``RandomHorizontalFlip``, a ``RandomApply(p=0.1)``) can make an item steady on both workers and yet
flipped on one of them only, so a few differing items are no proof of other data; for it to be
refused, that would have to happen to every sampled item at once, which has a probability of at
most (1/8) ** 8 (about 6e-8) per pair of workers: an item's chance is at most 1/8, reached by a
transform with two equally likely outcomes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from largebatch.data.base import BadLabel
from largebatch.errors import UsageError

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
    thumbs: torch.Tensor
    """float64 (len(indices), C, THUMB, THUMB) means of the images' blocks (the first fetch's)."""
    steady: tuple
    """Per sampled item: its two fetches gave the same pixels (False for an item the dataset's own
    random transforms change on every fetch)."""

    def differences(self, other: "Fingerprint") -> list[str]:
        """What differs between this fingerprint and ``other``'s so that they cannot be the same
        data, in words ([] where they may be); images count only where every item differs (see
        the module's rule)."""
        if self.length != other.length:
            return [f"{self.length} vs {other.length} samples"]
        found = []
        if None not in (self.labels, other.labels) and self.labels != other.labels:
            found.append("labels")
        if self.shape != other.shape:
            found.append(f"image shape {self.shape} vs {other.shape}")
        elif len(self.other_images(other)) == len(self.indices):
            found.append("images")
        if found:
            found[-1] += f" of the items at indices {list(self.indices)}"
        return found

    def other_images(self, other: "Fingerprint") -> list[int]:
        """The sampled indices whose images differ from ``other``'s, among the items steady on both."""
        if self.length != other.length or self.shape != other.shape:
            return []
        same = _same_items(self.thumbs, other.thumbs)
        return [i for i, a, b, s in zip(self.indices, self.steady, other.steady, same) if a and b and not s]


def _same_items(a: torch.Tensor, b: torch.Tensor) -> list[bool]:
    """Per item, whether two thumbnails of it show the same image, up to rounding."""
    scale = max(float(a.abs().max()), float(b.abs().max()), 1.0)
    return ((a - b).abs().flatten(1).amax(dim=1) <= TOLERANCE * scale).tolist()


def _thumbs(images: torch.Tensor) -> torch.Tensor:
    return F.adaptive_avg_pool2d(images.float(), THUMB).double()


def fingerprint(dataset) -> Fingerprint:
    """The fingerprint of ``dataset``, one of the engine's (``__getitems__`` gives
    :class:`~largebatch.data.base.Samples`); its sampled items are fetched twice. A sampled label
    the dataset reports as a :class:`~largebatch.data.base.BadLabel` raises UsageError."""
    length = len(dataset)
    indices = sample_indices(length)
    first, second = dataset.__getitems__(indices), dataset.__getitems__(indices)
    bad = [reason for _, reason in first.skipped if isinstance(reason, BadLabel)]
    if bad:  # a sampled label that is not an integer: refused here, before the run starts
        raise UsageError(bad[0])
    thumbs = _thumbs(first.images)
    steady = (_same_items(thumbs, _thumbs(second.images)) if first.images.shape == second.images.shape
              else [False] * len(indices))
    labels = tuple(int(y) for y in first.labels) if torch.equal(first.labels, second.labels) else None
    return Fingerprint(length, tuple(indices), labels, tuple(first.images.shape[1:]), thumbs, tuple(steady))


class Comparison(NamedTuple):
    ranks: list
    """The ranks whose data cannot be rank 0's."""
    what: list
    """What differs on the first of them, in words."""
    uneven: dict
    """{rank: sampled indices whose images differ from rank 0's} for the other ranks where only
    some do (a warning, not a refusal)."""


def differing(fingerprints: list[Fingerprint]) -> Comparison:
    """Every rank's fingerprint against rank 0's (see the module's rule)."""
    reference, odd, what, uneven = fingerprints[0], [], [], {}
    for rank, f in enumerate(fingerprints[1:], start=1):
        found = reference.differences(f)
        if found:
            odd.append(rank)
            what = what or found
        elif reference.other_images(f):
            uneven[rank] = reference.other_images(f)
    return Comparison(odd, what, uneven)
