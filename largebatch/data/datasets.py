"""Datasets behind ``data.name``: the bundled digits, synthetic images, image folders, CIFAR and
packed files.

Every dataset here is a map-style ``torch.utils.data.Dataset`` whose ``__getitems__(request)``
returns a whole micro-batch as :class:`Samples`: float images of shape (N, channels, size, size),
normalised, with their labels. ``request`` is a list of indices; a
:class:`largebatch.data.sampler.Request` also carries the epoch (training: the augmentation is
drawn from (seed, epoch, index)) and the output size (progressive resizing).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from largebatch.data.augment import Augment, resize, resolve
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
    """Float (N, C, S, S), normalised; zeros for an image that could not be read."""
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

    def describe(self, index: int) -> str:
        """How to name sample ``index`` in a message (its file, where there is one)."""
        return f"image {index}"

    def __getitems__(self, request) -> Samples:
        indices = [int(i) for i in request]
        size = getattr(request, "size", None) or self.image_size
        epoch = getattr(request, "epoch", None)
        aug = self.augment if epoch is not None else None
        draws = aug.draws(epoch, indices) if aug is not None else None
        return Samples(*self._load(indices, size, aug, draws))

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

    def _load(self, indices, size, aug, draws):
        x = torch.stack([self.generate(i) for i in indices])
        x = aug.apply(x, draws, size) if aug is not None else resize(x, size)
        return x, torch.tensor([self.label(i) for i in indices], dtype=torch.long), []


def _normalise_uint8(train_x: torch.Tensor, val_x: torch.Tensor, image_size: int | None):
    """uint8 (N, C, H, W) -> float, normalised per channel with training-set statistics, resized."""
    tr = train_x.float().div_(255.0)
    mean = tr.mean(dim=(0, 2, 3), keepdim=True)
    std = tr.std(dim=(0, 2, 3), keepdim=True)
    va = val_x.float().div_(255.0)
    if not image_size:
        return (tr - mean) / std, (va - mean) / std
    return resize((tr - mean) / std, image_size), resize((va - mean) / std, image_size)


@functools.lru_cache(maxsize=2)
def _decoded_imagefolder(root: str, image_size: int | None, on_corrupt: str, verbose: bool):
    """An image folder decoded once into memory (kept for later runs in the same process)."""
    from largebatch.data.imagefolder import load_imagefolder, unreadable_message

    train, val, names = load_imagefolder(root, image_size, on_corrupt)

    def decode(ds):
        ds.warn = verbose and on_corrupt == "skip"
        parts = [ds.__getitems__(list(range(i, min(i + 1024, len(ds))))) for i in range(0, len(ds), 1024)]
        unreadable = {i: reason for p in parts for i, reason in p.skipped}
        if unreadable and on_corrupt == "error":
            first = min(unreadable)
            raise UsageError(unreadable_message(ds.describe(first), unreadable[first]))
        return TensorImages(torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]), unreadable,
                            names=ds.describe)

    return decode(train), decode(val), names


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
                raise UsageError("data.name=imagefolder needs data.root, the folder holding train/ and val/")
            train, val, names = _decoded_imagefolder(os.path.abspath(cfg.root), cfg.image_size, cfg.on_corrupt,
                                                     verbose)
        else:
            from largebatch.data.imagefolder import load_imagefolder

            train, val, names = load_imagefolder(cfg.root, cfg.image_size, cfg.on_corrupt)
        classes, num_classes = tuple(names), len(names)
    elif cfg.name in ("cifar10", "cifar100"):
        from largebatch.data.cifar import load_cifar

        xtr, ytr, xva, yva, num_classes = load_cifar(cfg.name, cfg.root)
        xtr, xva = _normalise_uint8(xtr, xva, cfg.image_size)
        train, val = TensorImages(xtr, ytr), TensorImages(xva, yva)
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
