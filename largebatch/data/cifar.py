"""CIFAR-10 and CIFAR-100 from the python-pickle batches as distributed
(``cifar-10-batches-py/`` and ``cifar-100-python/``), loaded into memory."""

from __future__ import annotations

import os
import pickle

import numpy as np
import torch

from largebatch.errors import UsageError

_LAYOUT = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels", 10),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels", 100),
}


def batch_folder(root: str, name: str) -> str:
    """The folder holding ``name``'s (cifar10 or cifar100) python batches: ``root`` or the extracted
    folder inside it. Raises UsageError where neither holds them."""
    sub, train_files, _, _, _ = _LAYOUT[name]
    for candidate in (root, os.path.join(root, sub)):
        if all(os.path.isfile(os.path.join(candidate, f)) for f in train_files):
            return candidate
    raise UsageError(f"data.root '{root}' holds no {name} batches ({', '.join(train_files)}); "
                     f"point it at the '{sub}' folder or its parent")


def _read(folder: str, files: list[str], label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for f in files:
        path = os.path.join(folder, f)
        try:
            with open(path, "rb") as fh:
                batch = pickle.load(fh, encoding="bytes")
            images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.append(np.asarray(batch[label_key], dtype=np.int64))
        except (OSError, pickle.UnpicklingError, KeyError, ValueError, EOFError) as exc:
            raise UsageError(f"cannot read CIFAR batch '{path}' ({type(exc).__name__}); re-extract the archive") from None
    return np.concatenate(images), np.concatenate(labels)


def load_cifar(name: str, root: str | None):
    """(train images uint8 (N,3,32,32), train labels, val images, val labels, classes)."""
    if not root:
        raise UsageError(f"data.name={name} needs data.root, the folder holding the python batches")
    if not os.path.isdir(root):
        raise UsageError(f"data.root '{root}' does not exist; point it at the extracted {_LAYOUT[name][0]} folder")
    folder = batch_folder(root, name)
    _, train_files, test_files, key, classes = _LAYOUT[name]
    if not all(os.path.isfile(os.path.join(folder, f)) for f in test_files):
        raise UsageError(f"'{folder}' has no {', '.join(test_files)}; the validation split is missing")
    xtr, ytr = _read(folder, train_files, key)
    xva, yva = _read(folder, test_files, key)
    return torch.from_numpy(xtr), torch.from_numpy(ytr), torch.from_numpy(xva), torch.from_numpy(yva), classes
