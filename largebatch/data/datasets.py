"""Datasets behind ``data.name``: the bundled digits, synthetic images, image folders, CIFAR and
packed files.

Every dataset here is a map-style ``torch.utils.data.Dataset`` whose ``__getitems__(request)``
returns a whole micro-batch as :class:`Samples`: float images of shape (N, channels, size, size),
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

import functools
import os
import sys
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from largebatch.data.augment import Augment, flips, resize, resolve, to_chw
from largebatch.errors import UsageError

DIGITS_FILE = os.path.join(os.path.dirname(__file__), "digits.npz")
_SPLIT_SEED = 20170608  # fixed: the validation split does not move with run.seed
_SYNTHETIC_SEED = 1234  # fixed: synthetic images are the same data whatever run.seed

IGNORE = -100
"""Label of an image that could not be read: ``F.cross_entropy``'s default ``ignore_index``, so
the image adds nothing to the loss, and validation leaves it out of its counts."""


@dataclass(frozen=True)
class DatasetInfo:
    num_train: int
    num_val: int
    num_classes: int
    channels: int
    image_size: int
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


def load_digits(image_size: int | None, val_fraction: float):
    """The 1,797 8x8 digits (UCI Optical Recognition of Handwritten Digits test set), with a
    fixed stratification-free random validation split."""
    images, labels, train_idx, val_idx = digits_arrays(val_fraction)
    images = torch.from_numpy(images.astype(np.float32) / 16.0).unsqueeze(1)
    labels = torch.from_numpy(labels)
    mean, std = images[train_idx].mean(), images[train_idx].std()
    images = resize((images - mean) / std, image_size) if image_size else (images - mean) / std
    return TensorImages(images[train_idx], labels[train_idx]), TensorImages(images[val_idx], labels[val_idx])


def digits_arrays(val_fraction: float):
    """(images 0..16 uint8 (N, 8, 8), labels int64, train indices, val indices) of the bundled digits."""
    with np.load(DIGITS_FILE) as f:
        images, labels = f["images"].astype(np.uint8), f["labels"].astype(np.int64)
    g = torch.Generator().manual_seed(_SPLIT_SEED)
    order = torch.randperm(labels.shape[0], generator=g)
    num_val = int(round(val_fraction * labels.shape[0]))
    return images, labels, order[num_val:], order[:num_val]


class SyntheticImages(ImageDataset):
    """Deterministic random 3-channel images: sample ``i`` is generated from (seed, i) alone.

    Each image is its class's fixed pattern plus per-sample noise, so a model can learn it,
    which makes the set useful for throughput runs and end-to-end tests alike.
    """

    channels = 3

    def __init__(self, num_samples: int, num_classes: int, image_size: int, seed: int, offset: int = 0):
        self.num_samples, self.num_classes, self.image_size = num_samples, num_classes, image_size
        self.seed, self.offset = seed, offset
        g = torch.Generator().manual_seed(seed)
        self.patterns = torch.randn(num_classes, 3, image_size, image_size, generator=g)

    def __len__(self) -> int:
        return self.num_samples

    def label(self, i: int) -> int:
        return (i + self.offset) * 7919 % self.num_classes

    def generate(self, i: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.offset + i + 1)
        noise = torch.randn(3, self.image_size, self.image_size, generator=g)
        return self.patterns[self.label(i)] + 1.5 * noise

    def materialise(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every image (float (N, 3, S, S)) and label: what fetching each index gives."""
        images = torch.empty(self.num_samples, 3, self.image_size, self.image_size)
        for i in range(self.num_samples):
            images[i] = self.generate(i)
        return images, torch.tensor([self.label(i) for i in range(self.num_samples)], dtype=torch.long)

    def _load(self, indices, size, aug, draws):
        x = torch.stack([self.generate(i) for i in indices])
        x = aug.apply(x, draws, size) if aug is not None else resize(x, size)
        return x, torch.tensor([self.label(i) for i in indices], dtype=torch.long), []


@functools.lru_cache(maxsize=2)
def _decoded_imagefolder(root: str, image_size: int | None, on_corrupt: str, verbose: bool, val_fraction: float):
    """An image folder decoded once into memory (kept for later runs in the same process), and the
    note on a validation set held out of train/ (None where val/ exists)."""
    from largebatch.data.imagefolder import load_imagefolder, unreadable_message

    train, val, names = load_imagefolder(root, image_size, on_corrupt, val_fraction)
    note = val.split_note

    def decode(ds):
        ds.warn = verbose and on_corrupt == "skip"
        parts = [ds.__getitems__(list(range(i, min(i + 1024, len(ds))))) for i in range(0, len(ds), 1024)]
        unreadable = {i: reason for p in parts for i, reason in p.skipped}
        if unreadable and on_corrupt == "error":
            first = min(unreadable)
            raise UsageError(unreadable_message(ds.describe(first), unreadable[first]))
        return TensorImages(torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]), unreadable,
                            names=ds.describe)

    return decode(train), decode(val), names, note


def build_datasets(cfg, seed: int = 0, verbose: bool = True):
    """(train, val, info) for ``cfg`` (a DataConfig); ``seed`` (run.seed) seeds the augmentation.
    Bad paths and layouts raise UsageError. ``verbose``: print warnings found while building
    (only rank 0 passes True, so that each appears once)."""
    classes: tuple = ()
    source, reads_files, max_size = cfg.name, False, None
    if cfg.name == "digits":
        train, val = load_digits(cfg.image_size, cfg.val_fraction)
        num_classes = 10
    elif cfg.name == "synthetic":
        size = cfg.image_size or 32
        num_val = max(1, int(round(cfg.num_samples * cfg.val_fraction)))
        # Validation images come from indices after the training ones: same classes, new noise.
        train = SyntheticImages(cfg.num_samples, cfg.num_classes, size, seed=_SYNTHETIC_SEED)
        val = SyntheticImages(num_val, cfg.num_classes, size, seed=_SYNTHETIC_SEED, offset=cfg.num_samples)
        num_classes = cfg.num_classes
    elif cfg.name == "imagefolder":
        reads_files = True
        if cfg.cache:
            if not cfg.root:
                raise UsageError("data.name=imagefolder needs data.root, the folder holding train/ (and val/)")
            train, val, names, note = _decoded_imagefolder(os.path.abspath(cfg.root), cfg.image_size, cfg.on_corrupt,
                                                           verbose, cfg.val_fraction)
        else:
            from largebatch.data.imagefolder import load_imagefolder

            train, val, names = load_imagefolder(cfg.root, cfg.image_size, cfg.on_corrupt, cfg.val_fraction)
            note = val.split_note
        if note and verbose:
            print(f"largebatch: warning: {note}", file=sys.stderr, flush=True)
        classes, num_classes = tuple(names), len(names)
    elif cfg.name in ("cifar10", "cifar100"):
        from largebatch.data.cifar import load_cifar

        if cfg.root and os.path.isfile(cfg.root):
            folder = "cifar-10-batches-py" if cfg.name == "cifar10" else "cifar-100-python"
            archive = cfg.root.endswith((".tar.gz", ".tgz", ".tar"))
            raise UsageError(f"'{cfg.root}' is a file{' (an archive)' if archive else ''}; "
                             + (f"extract it (tar xf '{cfg.root}') and " if archive else "")
                             + f"point data.root at the extracted {folder} folder or its parent")
        xtr, ytr, xva, yva, num_classes = load_cifar(cfg.name, cfg.root)
        mean, std = uint8_statistics(xtr)  # of the training images, for both splits
        train = Uint8Images(xtr, ytr, mean, std, cfg.image_size)
        val = Uint8Images(xva, yva, mean, std, cfg.image_size)
    elif cfg.name == "packed":
        from largebatch.data.packed import load_packed

        train, val, meta = load_packed(cfg.root, cfg.image_size)
        classes, num_classes = tuple(meta["classes"]), len(meta["classes"])
        source, max_size = meta["source"]["name"], meta["size"]
    else:  # guarded by DataConfig
        raise AssertionError(cfg.name)
    kind = resolve(cfg.augment, cfg.name, source)
    if kind != "none":
        train.augment = Augment(kind, seed, min_area=cfg.crop_min_area, padding=cfg.crop_padding)
    info = DatasetInfo(num_train=len(train), num_val=len(val), num_classes=num_classes, channels=train.channels,
                       image_size=train.image_size, classes=classes, augment=kind, reads_files=reads_files,
                       max_image_size=max_size)
    return train, val, info
