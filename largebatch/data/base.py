"""The dataset types every dataset of the package builds on.

Every dataset is a map-style ``torch.utils.data.Dataset`` whose ``__getitems__(request)`` returns a
whole micro-batch as :class:`Samples`: float images of shape (N, channels, size, size),
normalised, with their labels. ``request`` is a list of indices; a
:class:`largebatch.data.sampler.Request` also carries the epoch (training: the augmentation is
drawn from (seed, epoch, index)) and the output size (progressive resizing).

Datasets read from uint8 pixels (image folders, packed files) also give ``raw_items(request)``:
the same batch as uint8 (N, C, S, S), flipped but not yet converted and normalised, so that the
conversion can run on the training device (:func:`largebatch.data.augment.normalise_uint8` with
``uint8_stats()`` gives the same bits as ``__getitems__``). CIFAR is held as uint8 with its
normalisation statistics (:class:`Uint8Images`); :mod:`largebatch.data.device` holds any of these
sets on the training device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from largebatch.data.augment import Augment, flips, resize, to_chw

IGNORE = -100
"""Label of an image that could not be read: ``F.cross_entropy``'s default ``ignore_index``, so
the image adds nothing to the loss, and validation leaves it out of its counts."""


class BadLabel(str):
    """The reason given in a batch's ``skipped`` list for a sample whose label is outside the
    model's classes (a user's dataset): the sample arrives labelled IGNORE, so the step runs, and
    the loader stops every worker with this message where they next agree (the step's end)."""


@dataclass(frozen=True)
class DatasetInfo:
    num_train: int
    num_val: int
    num_classes: int
    channels: int
    image_size: Union[int, tuple]
    """A side, or (height, width) where they differ (a user's non-square images)."""
    classes: tuple = ()
    """Class names in label order, where the dataset has them."""
    augment: str = "none"
    """The training augmentation in use ('auto' resolved)."""
    reads_files: bool = False
    """Images are decoded from files while training, so some may turn out unreadable (image folders)."""
    max_image_size: Optional[int] = None
    """Largest size the data can give without upscaling (a packed file's size); None = no limit."""


class Samples(NamedTuple):
    """One fetched batch."""
    images: torch.Tensor
    """Float (N, C, S, S), normalised; zeros for an image that could not be read. From
    ``raw_items``: uint8 (N, C, S, S), not normalised; zeros for an image that could not be read."""
    labels: torch.Tensor
    """int64 (N,); IGNORE for an image that could not be read."""
    skipped: list
    """[index, reason] for each image of the batch that could not be read."""


class ImageDataset(Dataset):
    """Base class: turns a request into a batch, with the training augmentation where it applies.

    Subclasses set ``image_size`` and ``channels`` and implement ``_load(indices, size, aug, draws)``,
    returning normalised float images at ``size`` (augmented with ``aug`` and the per-image
    uniforms ``draws`` when ``aug`` is given), int64 labels and the skipped list.
    """

    image_size: int
    channels: int
    augment: Optional[Augment] = None
    """Set on training sets only: validation is never augmented."""

    def _load(self, indices: list[int], size: int, aug: Optional[Augment],
              draws: Optional[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, list]:
        raise NotImplementedError

    def _load_uint8(self, indices: list[int], size: int, aug: Optional[Augment],
                    draws: Optional[np.ndarray]) -> tuple[np.ndarray, torch.Tensor, list]:
        """Datasets read from uint8 pixels: (uint8 (N, size, size, C) augmented but not flipped,
        zeros for an unreadable image; int64 labels; skipped list)."""
        raise NotImplementedError

    def uint8_stats(self) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """(mean, std) per channel in [0, 1] units where the dataset gives ``raw_items``; else None."""
        return None

    def describe(self, index: int) -> str:
        """How to name sample ``index`` in a message (its file, where there is one)."""
        return f"image {index}"

    def _unpack(self, request):
        indices = [int(i) for i in request]
        size = getattr(request, "size", None) or self.image_size
        epoch = getattr(request, "epoch", None)
        aug = self.augment if epoch is not None else None
        draws = aug.draws(epoch, indices) if aug is not None else None
        return indices, size, aug, draws

    def __getitems__(self, request) -> Samples:
        return Samples(*self._load(*self._unpack(request)))

    def raw_items(self, request) -> Samples:
        """The batch ``__getitems__`` gives, as uint8 (N, C, S, S) before the conversion and the
        normalisation (the flip applied); only where ``uint8_stats()`` is not None."""
        indices, size, aug, draws = self._unpack(request)
        batch, labels, skipped = self._load_uint8(indices, size, aug, draws)
        return Samples(to_chw(batch, flips(draws)), labels, skipped)

    def __getitem__(self, i: int):
        s = self.__getitems__([i])
        return s.images[0], s.labels[0]


class TensorImages(ImageDataset):
    """Images held in memory as one float tensor (N, C, H, W) with int64 labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, unreadable: Optional[dict] = None,
                 names: Optional[Callable[[int], str]] = None):
        assert images.shape[0] == labels.shape[0]
        self.images, self.labels = images, labels
        self.image_size, self.channels = images.shape[-1], images.shape[1]
        self.unreadable = unreadable or {}
        """{index: reason} for images that could not be decoded when the set was built."""
        self._names = names

    def __len__(self) -> int:
        return self.labels.shape[0]

    def describe(self, index: int) -> str:
        return self._names(index) if self._names else super().describe(index)

    def _load(self, indices, size, aug, draws):
        idx = torch.as_tensor(indices, dtype=torch.long)
        x = self.images[idx]
        x = aug.apply(x, draws, size) if aug is not None else resize(x, size)
        skipped = [[i, self.unreadable[i]] for i in indices if i in self.unreadable]
        return x, self.labels[idx], skipped


class Uint8Images(ImageDataset):
    """Images held in memory as uint8 (N, C, H, W) with int64 labels and per-channel statistics
    (CIFAR). A fetched image is ``(x / 255 - mean) / std`` in float32, resized to ``base_size``
    (data.image_size; None: kept at H), then augmented or resized to the requested size: the same
    pixels as normalising and resizing the whole set once, at a quarter of its memory."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                 base_size: Optional[int] = None):
        assert images.dtype == torch.uint8 and images.shape[0] == labels.shape[0]
        self.images, self.labels = images, labels
        self.mean, self.std = mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)
        """float32 (1, C, 1, 1), of the training images in [0, 1] units."""
        self.base_size = base_size
        self.channels = images.shape[1]
        self.image_size = base_size or images.shape[-1]

    def __len__(self) -> int:
        return self.labels.shape[0]

    def normalise(self, x: torch.Tensor, mean: Optional[torch.Tensor] = None,
                  std: Optional[torch.Tensor] = None) -> torch.Tensor:
        """uint8 (N, C, H, W) of this set -> float32 at ``image_size`` (``mean`` and ``std``: this
        set's, already on ``x``'s device; default: ``self.mean`` and ``self.std``, on the CPU)."""
        mean = self.mean if mean is None else mean
        std = self.std if std is None else std
        x = (x.float().div_(255.0) - mean) / std
        return resize(x, self.base_size) if self.base_size else x

    def _load(self, indices, size, aug, draws):
        idx = torch.as_tensor(indices, dtype=torch.long)
        x = self.normalise(self.images[idx])
        x = aug.apply(x, draws, size) if aug is not None else resize(x, size)
        return x, self.labels[idx], []


def uint8_statistics(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) per channel, float32 (C,), of uint8 (N, C, H, W) images in [0, 1] units."""
    x = images.float().div_(255.0)
    return x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3))
