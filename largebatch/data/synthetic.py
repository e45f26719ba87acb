"""Synthetic images generated from a seed."""

from __future__ import annotations

import torch

from largebatch.data.augment import resize
from largebatch.data.base import ImageDataset


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
