"""The ImageNet folder layout: ``root/train/<class>/<image>`` and ``root/val/<class>/<image>``.

Images are decoded with Pillow when fetched (in DataLoader worker processes when
``data.num_workers > 0``), converted to one colour mode for the whole dataset (grayscale when every
sampled image is grayscale, else RGB), resized to a square ``image_size`` and normalised with
per-channel statistics measured on a fixed sample of training images.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import Dataset

from largebatch.errors import UsageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
_STATS_SAMPLE = 512


def _pil():
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is a core dependency
        raise UsageError("data.name=imagefolder needs Pillow; pip install pillow") from None
    return Image


def scan_split(root: str, split: str) -> tuple[list[str], list[tuple[str, int]]]:
    """(class names sorted, [(path, class index)] sorted by class then file name)."""
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        raise UsageError(f"data.root '{root}' has no '{split}' folder; expected {root}/{split}/<class>/<image>")
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


class ImageFolder(Dataset):
    def __init__(self, samples: list[tuple[str, int]], image_size: int, mode: str, mean: torch.Tensor,
                 std: torch.Tensor):
        self.samples, self.image_size, self.mode = samples, image_size, mode
        self.mean, self.std = mean.view(-1, 1, 1), std.view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, i: int) -> torch.Tensor:
        """Image ``i`` as float in [0, 1], shape (C, S, S), before normalisation."""
        Image = _pil()
        with Image.open(self.samples[i][0]) as img:
            img = img.convert(self.mode)
            if img.size != (self.image_size, self.image_size):
                img = img.resize((self.image_size, self.image_size), Image.BILINEAR)
            arr = np.asarray(img, dtype=np.uint8)
        t = torch.from_numpy(arr.copy()).float().div_(255.0)
        return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)

    def __getitem__(self, i: int):
        return (self.load(i) - self.mean) / self.std, torch.tensor(self.samples[i][1])

    def __getitems__(self, indices: list[int]):
        x = torch.stack([self.load(i) for i in indices])
        y = torch.tensor([self.samples[i][1] for i in indices], dtype=torch.long)
        return (x - self.mean) / self.std, y


def load_imagefolder(root: str | None, image_size: int | None):
    """(train, val, classes) for the tree at ``root``."""
    if not root:
        raise UsageError("data.name=imagefolder needs data.root, the folder holding train/ and val/")
    if not os.path.isdir(root):
        raise UsageError(f"data.root '{root}' does not exist; point it at the folder holding train/ and val/")
    classes, train = scan_split(root, "train")
    val_classes, val = scan_split(root, "val")
    if val_classes != classes:
        only_train = sorted(set(classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(classes))
        raise UsageError(f"train/ and val/ under '{root}' have different classes (only in train: "
                         f"{only_train[:5]}, only in val: {only_val[:5]}); give both the same class folders")
    Image = _pil()
    step = max(1, len(train) // _STATS_SAMPLE)
    sample = list(range(0, len(train), step))[:_STATS_SAMPLE]
    modes = set()
    for i in sample[:64]:
        with Image.open(train[i][0]) as img:
            modes.add(img.mode)
            if image_size is None:
                image_size = img.size[0]
    mode = "L" if modes <= {"L", "1", "I;16", "I"} else "RGB"
    probe = ImageFolder(train, image_size, mode, torch.zeros(1), torch.ones(1))
    pixels = torch.stack([probe.load(i) for i in sample])
    mean = pixels.mean(dim=(0, 2, 3))
    std = pixels.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return ImageFolder(train, image_size, mode, mean, std), ImageFolder(val, image_size, mode, mean, std), classes
