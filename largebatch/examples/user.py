"""A model and datasets as a user would write them, named on the command line as
``model.name=largebatch.examples.user:build`` and ``data.name=largebatch.examples.user:data``.

The data are 32x32 colour images with 10 classes: each class is a fixed smooth random pattern, each
image that pattern plus noise, so a small network learns them in a few epochs.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset


def build(num_classes: int = 10, in_channels: int = 3, width: int = 32) -> nn.Module:
    """A small convolutional network (no BatchNorm)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
        nn.Flatten(), nn.Linear(2 * width * 16, num_classes))


def data(root: str | None = None, samples: int = 2560, size: int = 32) -> tuple[TensorDataset, TensorDataset]:
    """(train_set, val_set): TensorDatasets of (image (3, size, size), label), the last fifth held out."""
    g = torch.Generator().manual_seed(0)
    coarse = torch.randn(10, 3, 4, 4, generator=g)
    patterns = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    labels = torch.randint(0, 10, (samples,), generator=g)
    images = patterns[labels] + 2.0 * torch.randn(samples, 3, size, size, generator=g)
    cut = samples * 4 // 5
    return TensorDataset(images[:cut], labels[:cut]), TensorDataset(images[cut:], labels[cut:])
