"""Your own datasets: any map-style ``torch.utils.data.Dataset`` of ``(image, label)`` pairs.

:class:`UserImages` wraps one so the engine's samplers and loaders can use it like the built-in
sets: each batch is collated by the engine (images stacked as float32 (N, C, H, W), labels as
int64), resized where ``data.image_size`` or a phase asks for another size, and augmented with
``data.augment`` where one is set (the dataset's own transforms run first, in the loader
processes). The global batches stay those of the world-size-invariant sampler and validation stays
exact, whatever the dataset.

A sample's image must be a tensor or array of shape (C, H, W) (or (H, W) for one channel); a PIL
image is refused with the fix (a transform ending in ``ToTensor()``). A dataset whose
``__getitems__`` returns a list of samples (torch's batched-fetch protocol) is fetched that way.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from largebatch.data.augment import resize
from largebatch.data.base import ImageDataset
from largebatch.errors import UsageError

_SPLIT_SEED = 20170608  # fixed: the validation split does not move with run.seed


def _image(value: Any, where: str) -> torch.Tensor:
    """One sample's image as a float tensor (C, H, W)."""
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if not isinstance(value, torch.Tensor):
        kind = f"{type(value).__module__}.{type(value).__name__}"
        fix = ("give the dataset a transform that ends in torchvision.transforms.ToTensor()"
               if "PIL" in kind else "return a tensor of shape (channels, height, width)")
        raise UsageError(f"{where} returned a {kind} as its image; {fix}")
    if value.dim() == 2:
        value = value.unsqueeze(0)
    if value.dim() != 3:
        raise UsageError(f"{where} returned an image of shape {tuple(value.shape)}; return one image as "
                         "(channels, height, width)")
    return value.float()


def _label(value: Any, where: str) -> int:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, (np.integer, int)) and not isinstance(value, bool):
        return int(value)
    raise UsageError(f"{where} returned {value!r} as its label; return an integer class index")


def _pair(sample: Any, where: str) -> tuple[Any, Any]:
    if not isinstance(sample, (tuple, list)) or len(sample) < 2:
        raise UsageError(f"{where} returned a {type(sample).__name__}; a dataset for largebatch returns "
                         "(image, label) pairs")
    return sample[0], sample[1]


class UserImages(ImageDataset):
    """A user's map-style dataset of ``(image, label)`` pairs, batched by the engine."""

    def __init__(self, dataset: Dataset, name: str = "train_set", image_size: Optional[int] = None):
        try:
            count = len(dataset)
        except TypeError:
            raise UsageError(f"{name} has no len(); give a map-style torch.utils.data.Dataset (an "
                             "IterableDataset cannot be cut into world-size-invariant global batches)") from None
        if count == 0:
            raise UsageError(f"{name} is empty")
        self.dataset, self.name, self.count = dataset, name, count
        first = _image(_pair(dataset[0], f"{name}[0]")[0], f"{name}[0]")
        self.channels, self.own_size = first.shape[0], tuple(first.shape[-2:])
        self.image_size = image_size or first.shape[-1]
        self.fixed = image_size is not None
        """Resize every image to image_size on arrival (the dataset's images may differ in size)."""

    def __len__(self) -> int:
        return self.count

    def describe(self, index: int) -> str:
        return f"{self.name}[{index}]"

    def _fetch(self, indices: list[int]) -> list:
        getitems = getattr(self.dataset, "__getitems__", None)
        return list(getitems(indices)) if getitems is not None else [self.dataset[i] for i in indices]

    def _load(self, indices, size, aug, draws):
        images, labels = [], []
        for i, sample in zip(indices, self._fetch(indices)):
            image, label = _pair(sample, self.describe(i))
            x = _image(image, self.describe(i))
            if self.fixed and x.shape[-2:] != (self.image_size, self.image_size):
                x = resize(x.unsqueeze(0), self.image_size)[0]
            images.append(x)
            labels.append(_label(label, self.describe(i)))
        shapes = {tuple(x.shape) for x in images}
        if len(shapes) > 1:
            raise UsageError(f"{self.name} gives images of different shapes {sorted(shapes)[:2]}; resize them in "
                             "its transform, or set data.image_size")
        x = torch.stack(images)
        x = aug.apply(x, draws, size) if aug is not None else resize(x, size)
        return x, torch.tensor(labels, dtype=torch.long), []


def num_classes_of(dataset: Dataset) -> Optional[int]:
    """The class count a dataset states (``classes``, ``num_classes``, or its labels where they are
    held as one tensor or list: ``targets``, a TensorDataset's second tensor); None if it says nothing."""
    inner = getattr(dataset, "dataset", None)  # a torch Subset
    for d in (dataset, inner):
        if d is None:
            continue
        if isinstance(getattr(d, "num_classes", None), int):
            return d.num_classes
        if isinstance(getattr(d, "classes", None), (list, tuple)) and d.classes:
            return len(d.classes)
        targets = getattr(d, "targets", None)
        if targets is None and isinstance(d, torch.utils.data.TensorDataset) and len(d.tensors) >= 2:
            targets = d.tensors[1]
        if targets is not None and len(targets):
            return int(torch.as_tensor(targets).max()) + 1
    return None


def split(dataset: Dataset, val_fraction: float) -> tuple[Dataset, Dataset]:
    """(train, val): ``val_fraction`` of ``dataset`` held out at random, the same split on every
    worker and for every run.seed."""
    n = len(dataset)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(_SPLIT_SEED)).tolist()
    num_val = max(1, int(round(val_fraction * n)))
    if num_val >= n:
        raise UsageError(f"train_set has {n} samples: too few to hold out data.val_fraction={val_fraction} for "
                         "validation; pass val_set")
    return torch.utils.data.Subset(dataset, order[num_val:]), torch.utils.data.Subset(dataset, order[:num_val])
