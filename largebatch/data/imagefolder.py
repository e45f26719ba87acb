"""The ImageNet folder layout: ``root/train/<class>/<image>`` and ``root/val/<class>/<image>``.

Without ``val/``, a fixed, stratified share (``data.val_fraction``) of each class in ``train/`` is
held out for validation: the files of a class ordered by a hash of their names, the first ones
held out, so the split depends on neither ``run.seed`` nor the worker, and adding images to a
class moves few others between the splits.

Images are decoded with Pillow when fetched (in DataLoader worker processes when
``data.num_workers > 0``), converted to one colour mode for the whole dataset (grayscale when every
sampled image is grayscale, else RGB), resized to a square ``image_size`` and normalised with
per-channel statistics measured on a fixed sample of training images (``raw_items`` stops short of
the conversion and normalisation, which the loader then does on the training device).

A file that cannot be decoded (truncated, empty, not an image) does not stop the run by default
(``data.on_corrupt: skip``): its place in the batch gets a zero image and the label
:data:`~largebatch.data.base.IGNORE`, so it adds nothing to the loss or to the validation
counts, and the run prints one warning naming the file (rank 0, whichever worker met it).
"""

from __future__ import annotations

import hashlib
import os
from typing import Optional

import numpy as np
import torch

from largebatch.data.augment import Augment, flips, to_float, transform_uint8
from largebatch.data.base import IGNORE, ImageDataset
from largebatch.errors import UsageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
_STATS_SAMPLE = 512


def _pil():
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is a core dependency
        raise UsageError("data.name=imagefolder needs Pillow; pip install pillow") from None
    return Image


def unreadable_message(name: str, reason: str) -> str:
    return (f"cannot read image '{name}' ({reason}); replace or delete the file, or set data.on_corrupt=skip "
            "to train without it")


def unreadable_reason(exc: BaseException) -> str:
    """Why an image could not be read, in one short line: the exception's type and first line."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:160]}" if text else type(exc).__name__


def decode(path: str, mode: str, size: int, aug: Optional[Augment] = None,
           u: Optional[np.ndarray] = None) -> np.ndarray:
    """The image at ``path`` as uint8 (size, size, C) in ``mode`` ('L' or 'RGB'), decoded by Pillow:
    the whole image resized (bilinear, antialiased when shrinking), or augmented by ``aug`` with the
    uniforms ``u`` (the crop taken from the full-resolution image). Raises whatever Pillow raises
    for a bad file."""
    Image = _pil()
    with Image.open(path) as img:
        arr = np.array(img.convert(mode))  # writable: torch reads it without a copy
    return transform_uint8(arr[..., None] if arr.ndim == 2 else arr, size, aug, u)


def scan_split(root: str, split: str) -> tuple[list[str], list[tuple[str, int]]]:
    """(class names sorted, [(path, class index)] sorted by class then file name)."""
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        hint = ""
        if split == "train" and os.path.basename(os.path.normpath(root)) in ("train", "val"):
            hint = f", or point data.root at '{os.path.dirname(os.path.normpath(root))}'"
        raise UsageError(f"data.root '{root}' has no '{split}' folder; expected {root}/{split}/<class>/<image>{hint}")
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    if not classes:
        raise UsageError(f"'{folder}' holds no class folders; expected {folder}/<class>/<image>")
    samples = []
    for idx, name in enumerate(classes):
        files = sorted(e.path for e in os.scandir(os.path.join(folder, name))
                       if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            raise UsageError(f"class folder '{os.path.join(folder, name)}' holds no images "
                             f"({', '.join(IMAGE_EXTENSIONS)}); remove it or add images")
        samples.extend((f, idx) for f in files)
    return classes, samples


class ImageFolder(ImageDataset):
    split_note: Optional[str] = None
    """On a validation set held out of train/: the warning that says so."""

    def __init__(self, samples: list[tuple[str, int]], image_size: int, mode: str, mean: torch.Tensor,
                 std: torch.Tensor):
        self.samples, self.image_size, self.mode = samples, image_size, mode
        self.channels = 1 if mode == "L" else 3
        self.mean, self.std = mean.flatten(), std.flatten()

    def __len__(self) -> int:
        return len(self.samples)

    def describe(self, index: int) -> str:
        return self.samples[index][0]

    def read(self, i: int, size: Optional[int] = None, aug: Optional[Augment] = None,
             u: Optional[np.ndarray] = None) -> np.ndarray:
        """Image ``i`` as uint8 (size, size, C); raises for an unreadable file."""
        return decode(self.samples[i][0], self.mode, size or self.image_size, aug, u)

    def load(self, i: int) -> torch.Tensor:
        """Image ``i`` as float in [0, 1], shape (C, S, S), before normalisation."""
        return torch.from_numpy(self.read(i).transpose(2, 0, 1).copy()).float().div_(255.0)

    def uint8_stats(self):
        return self.mean, self.std

    def _load_uint8(self, indices, size, aug, draws):
        batch = np.zeros((len(indices), size, size, self.channels), dtype=np.uint8)
        labels = torch.tensor([self.samples[i][1] for i in indices], dtype=torch.long)
        skipped = []
        for k, i in enumerate(indices):
            try:
                image = self.read(i, size, aug, None if draws is None else draws[k])
            except Exception as exc:  # Pillow raises many types for a damaged file
                skipped.append([i, unreadable_reason(exc)])
                labels[k] = IGNORE
                continue
            batch[k] = image
        return batch, labels, skipped

    def _load(self, indices, size, aug, draws):
        batch, labels, skipped = self._load_uint8(indices, size, aug, draws)
        x = to_float(batch, self.mean, self.std, flips(draws))
        if skipped:
            x[labels == IGNORE] = 0.0
        return x, labels, skipped


def hold_out(samples: list[tuple[str, int]], fraction: float) -> tuple[list, list]:
    """(train, val) from ``samples`` (sorted by class): of each class, round(fraction x its images)
    go to val (at least 1 and at most all but one, where the class has 2 or more), chosen by a hash
    of the file names, the same on every machine; both keep the input's order."""
    by_class: dict[int, list[str]] = {}
    for path, label in samples:
        by_class.setdefault(label, []).append(path)
    held = set()
    for label, paths in by_class.items():
        n = len(paths)
        k = min(max(round(fraction * n), 1), n - 1) if n >= 2 else 0
        ranked = sorted(paths, key=lambda p: (hashlib.sha1(_class_and_file(p).encode()).hexdigest(), p))
        held.update(ranked[:k])
    return [s for s in samples if s[0] not in held], [s for s in samples if s[0] in held]


def _class_and_file(path: str) -> str:
    return os.path.join(os.path.basename(os.path.dirname(path)), os.path.basename(path))


def load_imagefolder(root: str | None, image_size: int | None, on_corrupt: str = "skip",
                     val_fraction: Optional[float] = None):
    """(train, val, classes) for the tree at ``root``. Unreadable files met while measuring the
    statistics are left out of them (``on_corrupt='error'``: a UsageError naming the file).

    Without ``root/val``, ``val_fraction`` of train/ is held out (:func:`hold_out`) and the val set's
    ``split_note`` says so (None where val/ exists); ``val_fraction=None`` requires val/."""
    _check_root(root)
    classes, train, val, note = _splits(root, val_fraction)
    image_size, mode, mean, std = _statistics(root, train, image_size, on_corrupt)
    val_set = ImageFolder(val, image_size, mode, mean, std)
    val_set.split_note = note
    return ImageFolder(train, image_size, mode, mean, std), val_set, classes


def _check_root(root: str | None) -> None:
    if not root:
        raise UsageError("data.name=imagefolder needs data.root, the folder holding train/ (and val/)")
    if os.path.isfile(root):
        raise UsageError(f"'{root}' is a file; point data.root at the folder holding train/ (and val/)")
    if not os.path.isdir(root):
        raise UsageError(f"data.root '{root}' does not exist; point it at the folder holding train/ (and val/)")


def _splits(root: str, val_fraction: Optional[float]):
    """(classes, train samples, val samples, note): val/ as it is, or held out of train/."""
    classes, train = scan_split(root, "train")
    note = None
    if val_fraction is not None and not os.path.exists(os.path.join(root, "val")):
        everything = len(train)
        train, val = hold_out(train, val_fraction)
        if not val:
            raise UsageError(f"'{root}' has no val/ folder and too few images per class in train/ to hold out "
                             "data.val_fraction for validation; add a val/ folder or more images")
        val_classes = classes
        note = (f"'{root}' has no val/ folder: holding out {len(val)} of its {everything} train/ images "
                f"(data.val_fraction={val_fraction:g} of each class, the same on every run and worker) "
                "for validation")
    else:
        val_classes, val = scan_split(root, "val")
    if val_classes != classes:
        only_train = sorted(set(classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(classes))
        raise UsageError(f"train/ and val/ under '{root}' have different classes (only in train: "
                         f"{only_train[:5]}, only in val: {only_val[:5]}); give both the same class folders")
    return classes, train, val, note


def _statistics(root: str, train: list, image_size: int | None, on_corrupt: str):
    """(image size, PIL mode, per-channel mean, std) from a sample of the training images."""
    Image = _pil()
    step = max(1, len(train) // _STATS_SAMPLE)
    sample = list(range(0, len(train), step))[:_STATS_SAMPLE]
    bad: dict[int, str] = {}

    def unreadable(i: int, exc: BaseException) -> None:
        if on_corrupt == "error":
            raise UsageError(unreadable_message(train[i][0], unreadable_reason(exc))) from None
        bad[i] = unreadable_reason(exc)

    modes = set()
    for i in sample[:64]:
        try:
            with Image.open(train[i][0]) as img:
                modes.add(img.mode)
                if image_size is None:
                    image_size = img.size[0]
        except Exception as exc:
            unreadable(i, exc)
    if image_size is None:
        raise UsageError(f"none of the first images under '{root}/train' can be read; check the files, or set "
                         "data.image_size")
    mode = "L" if modes and modes <= {"L", "1", "I;16", "I"} else "RGB"
    probe = ImageFolder(train, image_size, mode, torch.zeros(1), torch.ones(1))
    pixels = []
    for i in sample:
        if i in bad:
            continue
        try:
            pixels.append(probe.load(i))
        except Exception as exc:
            unreadable(i, exc)
    if not pixels:
        raise UsageError(f"no image under '{root}/train' can be read; check the files")
    pixels = torch.stack(pixels)
    return image_size, mode, pixels.mean(dim=(0, 2, 3)), pixels.std(dim=(0, 2, 3)).clamp_min(1e-3)
