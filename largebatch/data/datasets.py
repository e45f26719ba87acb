"""Datasets behind ``data.name``: the bundled digits, synthetic images, image folders, CIFAR and
packed files, built by :func:`build_datasets`. Their common types are in :mod:`largebatch.data.base`.
"""

from __future__ import annotations

import functools
import os
import sys

import torch

from largebatch.data.augment import Augment, resolve
from largebatch.data.base import DatasetInfo, TensorImages, Uint8Images, uint8_statistics
from largebatch.data.cifar import load_cifar
from largebatch.data.digits import load_digits
from largebatch.data.imagefolder import load_imagefolder, unreadable_message
from largebatch.data.packed import load_packed
from largebatch.data.synthetic import SyntheticImages
from largebatch.errors import UsageError

_SYNTHETIC_SEED = 1234  # fixed: synthetic images are the same data whatever run.seed


@functools.lru_cache(maxsize=2)
def _decoded_imagefolder(root: str, image_size: int | None, on_corrupt: str, verbose: bool, val_fraction: float):
    """An image folder decoded once into memory (kept for later runs in the same process), and the
    note on a validation set held out of train/ (None where val/ exists)."""
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


def square_size(cfg) -> None:
    """Refuse a non-square data.image_size for the built-in datasets (a DataConfig ``cfg``), whose
    images, loaders and packed files are square."""
    if isinstance(cfg.image_size, list):
        height, width = cfg.image_size
        raise UsageError(f"data.image_size=[{height}, {width}] is not square, and data.name={cfg.name} gives square "
                         f"images; give one side (e.g. data.image_size={max(height, width)}): [height, width] sizes "
                         "are for your own datasets (largebatch.fit, pkg.module:factory)")


def build_datasets(cfg, seed: int = 0, verbose: bool = True):
    """(train, val, info) for ``cfg`` (a DataConfig); ``seed`` (run.seed) seeds the augmentation.
    Bad paths and layouts raise UsageError. ``verbose``: print warnings found while building
    (only rank 0 passes True, so that each appears once)."""
    square_size(cfg)
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
            train, val, names = load_imagefolder(cfg.root, cfg.image_size, cfg.on_corrupt, cfg.val_fraction)
            note = val.split_note
        if note and verbose:
            print(f"largebatch: warning: {note}", file=sys.stderr, flush=True)
        classes, num_classes = tuple(names), len(names)
    elif cfg.name in ("cifar10", "cifar100"):
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
