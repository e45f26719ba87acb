"""Your own datasets: any map-style ``torch.utils.data.Dataset`` of ``(image, label)`` pairs.

:class:`UserImages` wraps one so the engine's samplers and loaders can use it like the built-in
sets: each batch is collated by the engine (images stacked as float32 (N, C, H, W), labels as
int64), kept at their own shape (height and width) unless ``data.image_size`` (a side, or
[height, width]) or a phase asks for another size, and augmented with
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
from largebatch.data.base import IGNORE, BadLabel, ImageDataset
from largebatch.errors import UsageError
from largebatch.models.sizes import Size, as_size, sides

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


def _as_label(value: Any) -> Optional[int]:
    """``value`` as a class index; None where it is not an integer."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, (np.integer, int)) and not isinstance(value, bool):
        return int(value)
    return None


def _not_a_label(value: Any, where: str) -> str:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    return f"{where} returned {value!r} as its label; return an integer class index"


def _label(value: Any, where: str) -> int:
    label = _as_label(value)
    if label is None:
        raise UsageError(_not_a_label(value, where))
    return label


def label_problem(where: str, label: int, classes: int, outputs: Optional[int] = None,
                  declared: bool = True) -> Optional[str]:
    """Why ``label`` (of sample ``where``) cannot train a model of ``outputs`` outputs on data of
    ``classes`` classes (``outputs`` None: as many as the classes), in one line; None if it can.
    ``declared``: the data states its class count (else it is the model's output count), so a
    label past it is the data's own inconsistency, whatever the model gives."""
    outputs = classes if outputs is None else outputs
    if label < 0:
        return (f"{where} has label {label}; labels are class indices 0..{classes - 1}: map the dataset's labels "
                "to them")
    if label >= classes and declared:
        return (f"{where} has label {label}, outside the {classes} classes the data says it has (0..{classes - 1}); "
                "fix the dataset's classes or num_classes, or its labels")
    if label >= outputs:
        return (f"{where} has label {label}, and the model gives {outputs} outputs (classes 0..{outputs - 1}); "
                f"give the model at least {label + 1} outputs, or map the dataset's labels to 0..{outputs - 1}")
    return None


def _pair(sample: Any, where: str) -> tuple[Any, Any]:
    if not isinstance(sample, (tuple, list)) or len(sample) < 2:
        raise UsageError(f"{where} returned a {type(sample).__name__}; a dataset for largebatch returns "
                         "(image, label) pairs")
    return sample[0], sample[1]


class UserImages(ImageDataset):
    """A user's map-style dataset of ``(image, label)`` pairs, batched by the engine."""

    def __init__(self, dataset: Dataset, name: str = "train_set", image_size: Optional[Size] = None):
        try:
            count = len(dataset)
        except TypeError:
            raise UsageError(f"{name} has no len(); give a map-style torch.utils.data.Dataset (an "
                             "IterableDataset cannot be cut into world-size-invariant global batches)") from None
        if count == 0:
            raise UsageError(f"{name} is empty")
        self.dataset, self.name, self.count = dataset, name, count
        image, label = _pair(dataset[0], f"{name}[0]")
        first = _image(image, f"{name}[0]")
        _label(label, f"{name}[0]")  # a float label is refused here, before the run starts
        self.channels, self.own_size = first.shape[0], tuple(first.shape[-2:])
        self.image_size: Size = as_size(first.shape[-2:] if image_size is None else image_size)
        """A side, or (height, width) where they differ: the dataset's own (its first image's
        shape), or data.image_size."""
        self.fixed = image_size is not None
        """Resize every image to image_size on arrival (the dataset's images may differ in size)."""
        self.label_range: Optional[tuple[int, int, bool]] = None
        """(classes, model outputs, the data states its classes), set once the model is checked
        (:func:`largebatch.parts.check_model`): a label outside 0..classes-1 is given IGNORE and
        reported as a :class:`BadLabel`, which stops the run (as a label that is not an integer
        is, from the start)."""

    def __len__(self) -> int:
        return self.count

    def describe(self, index: int) -> str:
        return f"{self.name}[{index}]"

    def _fetch(self, indices: list[int]) -> list:
        getitems = getattr(self.dataset, "__getitems__", None)
        return list(getitems(indices)) if getitems is not None else [self.dataset[i] for i in indices]

    def _load(self, indices, size, aug, draws):
        images, labels, skipped = [], [], []
        for i, sample in zip(indices, self._fetch(indices)):
            image, label = _pair(sample, self.describe(i))
            x = _image(image, self.describe(i))
            if self.fixed and x.shape[-2:] != sides(self.image_size):
                x = resize(x.unsqueeze(0), self.image_size)[0]
            images.append(x)
            labels.append(_as_label(label))
            # a label that is no class index (or none of the model's) stops every worker at the
            # step's end, naming the sample, rather than this worker alone
            problem = (_not_a_label(label, self.describe(i)) if labels[-1] is None else
                       self.label_range and label_problem(self.describe(i), labels[-1], *self.label_range))
            if problem:
                skipped.append([i, BadLabel(problem)])
                labels[-1] = IGNORE
        shapes = {tuple(x.shape) for x in images}
        if len(shapes) > 1:
            raise UsageError(f"{self.name} gives images of different shapes {sorted(shapes)[:2]}; resize them in "
                             "its transform, or set data.image_size")
        x = torch.stack(images)
        x = aug.apply(x, draws, size) if aug is not None else resize(x, size)
        return x, torch.tensor(labels, dtype=torch.long), skipped


def num_classes_of(dataset: Dataset) -> Optional[int]:
    """The class count a dataset states (``classes``, ``num_classes``, or its labels where they are
    held as one tensor or list: ``targets``, a TensorDataset's second tensor); None if it says nothing."""
    for d in _itself_and_inner(dataset):
        if isinstance(getattr(d, "num_classes", None), int):
            return d.num_classes
        if isinstance(getattr(d, "classes", None), (list, tuple)) and d.classes:
            return len(d.classes)
        targets = _targets(d)
        if targets is not None:
            return int(targets.max()) + 1
    return None


def largest_label(dataset: Dataset) -> Optional[tuple[int, int]]:
    """(the largest label, the index of its first sample) where :func:`num_classes_of` counts the
    classes from the labels, which are then in memory; the index is into the dataset passed in
    (for a torch Subset, into the dataset it takes its samples from). None elsewhere."""
    for d in _itself_and_inner(dataset):
        if isinstance(getattr(d, "num_classes", None), int) or getattr(d, "classes", None):
            return None
        targets = _targets(d)
        if targets is not None:
            index = int(targets.argmax())
            return int(targets[index]), index
    return None


def _itself_and_inner(dataset: Dataset) -> list:
    inner = getattr(dataset, "dataset", None)  # a torch Subset
    return [dataset] if inner is None else [dataset, inner]


def _targets(d) -> Optional[torch.Tensor]:
    """A dataset's labels where it holds them as one tensor or list (non-empty), else None."""
    targets = getattr(d, "targets", None)
    if targets is None and isinstance(d, torch.utils.data.TensorDataset) and len(d.tensors) >= 2:
        targets = d.tensors[1]
    return None if targets is None or not len(targets) else torch.as_tensor(targets)


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
