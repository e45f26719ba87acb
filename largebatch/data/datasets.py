"""Datasets behind ``data.name``: the bundled digits, synthetic images, image folders and CIFAR.

Every dataset here is a map-style ``torch.utils.data.Dataset`` of ``(image, label)`` with
float images of shape (channels, size, size), normalised, plus ``__getitems__`` so a DataLoader
fetches a whole micro-batch at once.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from largebatch.errors import UsageError

DIGITS_FILE = os.path.join(os.path.dirname(__file__), "digits.npz")
_SPLIT_SEED = 20170608  # fixed: the validation split does not move with run.seed
_SYNTHETIC_SEED = 1234  # fixed: synthetic images are the same data whatever run.seed


@dataclass(frozen=True)
class DatasetInfo:
    num_train: int
    num_val: int
    num_classes: int
    channels: int
    image_size: int
    classes: tuple = ()
    """Class names in label order, where the dataset has them."""


class TensorImages(Dataset):
    """Images held in memory as one float tensor (N, C, H, W) with int64 labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        assert images.shape[0] == labels.shape[0]
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, i: int):
        return self.images[i], self.labels[i]

    def __getitems__(self, indices: list[int]):
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.images[idx], self.labels[idx]


def _resize(images: torch.Tensor, size: int | None) -> torch.Tensor:
    if size is None or images.shape[-1] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def load_digits(image_size: int | None, val_fraction: float):
    """The 1,797 8x8 digits (UCI Optical Recognition of Handwritten Digits test set), with a
    fixed stratification-free random validation split."""
    with np.load(DIGITS_FILE) as f:
        images = torch.from_numpy(f["images"].astype(np.float32) / 16.0).unsqueeze(1)
        labels = torch.from_numpy(f["labels"].astype(np.int64))
    g = torch.Generator().manual_seed(_SPLIT_SEED)
    order = torch.randperm(labels.shape[0], generator=g)
    num_val = int(round(val_fraction * labels.shape[0]))
    val_idx, train_idx = order[:num_val], order[num_val:]
    mean, std = images[train_idx].mean(), images[train_idx].std()
    images = _resize((images - mean) / std, image_size)
    return TensorImages(images[train_idx], labels[train_idx]), TensorImages(images[val_idx], labels[val_idx])


class SyntheticImages(Dataset):
    """Deterministic random 3-channel images: sample ``i`` is generated from (seed, i) alone.

    Each image is its class's fixed pattern plus per-sample noise, so a model can learn it,
    which makes the set useful for throughput runs and end-to-end tests alike.
    """

    def __init__(self, num_samples: int, num_classes: int, image_size: int, seed: int, offset: int = 0):
        self.num_samples, self.num_classes, self.image_size = num_samples, num_classes, image_size
        self.seed, self.offset = seed, offset
        g = torch.Generator().manual_seed(seed)
        self.patterns = torch.randn(num_classes, 3, image_size, image_size, generator=g)

    def __len__(self) -> int:
        return self.num_samples

    def _label(self, i: int) -> int:
        return (i + self.offset) * 7919 % self.num_classes

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.offset + i + 1)
        label = self._label(i)
        noise = torch.randn(3, self.image_size, self.image_size, generator=g)
        return self.patterns[label] + 1.5 * noise, torch.tensor(label)

    def __getitems__(self, indices: list[int]):
        items = [self.__getitem__(i) for i in indices]
        return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])


def _normalise_uint8(train_x: torch.Tensor, val_x: torch.Tensor, image_size: int | None):
    """uint8 (N, C, H, W) -> float, normalised per channel with training-set statistics, resized."""
    tr = train_x.float().div_(255.0)
    mean = tr.mean(dim=(0, 2, 3), keepdim=True)
    std = tr.std(dim=(0, 2, 3), keepdim=True)
    va = val_x.float().div_(255.0)
    return _resize((tr - mean) / std, image_size), _resize((va - mean) / std, image_size)


@functools.lru_cache(maxsize=2)
def _decoded_imagefolder(root: str, image_size: int | None):
    """An image folder decoded once into memory (kept for later runs in the same process)."""
    from largebatch.data.imagefolder import load_imagefolder

    train, val, names = load_imagefolder(root, image_size)

    def decode(ds):
        parts = [ds.__getitems__(list(range(i, min(i + 1024, len(ds))))) for i in range(0, len(ds), 1024)]
        return TensorImages(torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts]))

    return decode(train), decode(val), names


def build_datasets(cfg):
    """(train, val, info) for ``cfg`` (a DataConfig). Bad paths and layouts raise UsageError."""
    classes: tuple = ()
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
        if cfg.cache:
            if not cfg.root:
                raise UsageError("data.name=imagefolder needs data.root, the folder holding train/ and val/")
            train, val, names = _decoded_imagefolder(os.path.abspath(cfg.root), cfg.image_size)
        else:
            from largebatch.data.imagefolder import load_imagefolder

            train, val, names = load_imagefolder(cfg.root, cfg.image_size)
        classes, num_classes = tuple(names), len(names)
    elif cfg.name in ("cifar10", "cifar100"):
        from largebatch.data.cifar import load_cifar

        xtr, ytr, xva, yva, num_classes = load_cifar(cfg.name, cfg.root)
        xtr, xva = _normalise_uint8(xtr, xva, cfg.image_size)
        train, val = TensorImages(xtr, ytr), TensorImages(xva, yva)
    else:  # guarded by DataConfig
        raise AssertionError(cfg.name)
    x, _ = train[0]
    info = DatasetInfo(num_train=len(train), num_val=len(val), num_classes=num_classes,
                       channels=x.shape[0], image_size=x.shape[-1], classes=classes)
    return train, val, info
