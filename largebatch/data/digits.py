"""The bundled digits: 1,797 8x8 images (``digits.npz``, see README.md beside it)."""

from __future__ import annotations

import os

import numpy as np
import torch

from largebatch.data.augment import resize
from largebatch.data.base import TensorImages

DIGITS_FILE = os.path.join(os.path.dirname(__file__), "digits.npz")
_SPLIT_SEED = 20170608  # fixed: the validation split does not move with run.seed


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
