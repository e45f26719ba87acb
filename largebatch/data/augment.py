"""Training-image augmentation, reproducible and independent of how the batch is split.

Every random number used for sample ``i`` in epoch ``e`` is a hash of (seed, e, i) (splitmix64),
never a draw from a shared generator stream. The same image therefore gets the same crop and
flip whatever the world size, micro-batch, loader worker or order of fetching, and a resumed run
sees the same pixels as an uninterrupted one. :func:`uniforms_tensor` computes the same numbers,
bit for bit, in torch int64 arithmetic on any device, for data held there
(:mod:`largebatch.data.device`).

- ``crop_flip`` (the ImageNet recipe, Szegedy et al. 2015 as used by Goyal et al. 2017): a crop
  of area fraction in ``[min_area, 1]`` of the source image and aspect ratio in ``[3/4, 4/3]``
  (log-uniform), resized to the output size, then a horizontal flip with probability 1/2. The crop
  is taken from the image at the resolution the dataset holds (the decoded file for image
  folders, the packed size for packed files).
- ``pad_crop_flip`` (the CIFAR recipe): reflection padding of ``padding`` pixels on each side, a
  random crop back to the output size, then a horizontal flip with probability 1/2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import get_worker_info

from largebatch.models.sizes import Size, sides

KINDS = ("crop_flip", "pad_crop_flip")
DRAWS = 5  # uniforms per sample: area, aspect ratio, x, y, flip
_GOLDEN = 0x9E3779B97F4A7C15
_MASK = (1 << 64) - 1

Box = tuple[float, float, float, float]
"""(left, top, right, bottom) in pixels of the source image."""


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on a uint64 array (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def uniforms(seed: int, epoch: int, indices: Sequence[int], count: int) -> np.ndarray:
    """(len(indices), count) floats in [0, 1), each a function of (seed, epoch, index, column) only."""
    with np.errstate(over="ignore"):
        key = _mix(np.array([(seed * _GOLDEN + 1) & _MASK], dtype=np.uint64))
        key = _mix(key ^ np.uint64((epoch * _GOLDEN + 2) & _MASK))
        idx = np.asarray(indices, dtype=np.int64).astype(np.uint64)
        h = _mix(key ^ _mix(idx + np.uint64(_GOLDEN)))
        cols = np.arange(1, count + 1, dtype=np.uint64) * np.uint64(_GOLDEN)
        bits = _mix(h[:, None] + cols[None, :]) >> np.uint64(11)
    return bits.astype(np.float64) / float(1 << 53)


def _signed(z: int) -> int:
    """The int64 with the same 64 bits as the unsigned ``z``."""
    z &= _MASK
    return z - (1 << 64) if z >> 63 else z


def _mix_int(z: int) -> int:
    """splitmix64's finaliser on one Python int (mod 2**64)."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def _srl(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 ``z`` (holding uint64 bits) by ``k``: arithmetic shift, sign bits masked."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def _mix_tensor(z: torch.Tensor) -> torch.Tensor:
    """:func:`_mix` on an int64 tensor holding uint64 bits (int64 multiplication wraps mod 2**64)."""
    z = (z ^ _srl(z, 30)) * _signed(0xBF58476D1CE4E5B9)
    z = (z ^ _srl(z, 27)) * _signed(0x94D049BB133111EB)
    return z ^ _srl(z, 31)


def uniforms_tensor(seed: int, epoch: int, indices: torch.Tensor, count: int) -> torch.Tensor:
    """:func:`uniforms` on ``indices``' device: float64 (len(indices), count), bit-identical to the
    numpy version. Only tensor arithmetic: nothing is read back to the host."""
    key = _mix_int(_mix_int((seed * _GOLDEN + 1) & _MASK) ^ ((epoch * _GOLDEN + 2) & _MASK))
    h = _mix_tensor(_mix_tensor(indices.long() + _signed(_GOLDEN)) ^ _signed(key))
    cols = torch.arange(1, count + 1, dtype=torch.int64, device=indices.device) * _signed(_GOLDEN)
    bits = _srl(_mix_tensor(h[:, None] + cols[None, :]), 11)
    return bits.double() / float(1 << 53)


def crop_box(u: np.ndarray, width: int, height: int, min_area: float) -> Box:
    """The random-resized crop for one sample's uniforms ``u`` on a ``width`` x ``height`` image."""
    area = width * height * (min_area + (1.0 - min_area) * u[0])
    log_lo, log_hi = math.log(3 / 4), math.log(4 / 3)
    ratio = math.exp(log_lo + (log_hi - log_lo) * u[1])
    w = min(float(width), math.sqrt(area * ratio))
    h = min(float(height), math.sqrt(area / ratio))
    left = (width - w) * u[2]
    top = (height - h) * u[3]
    return (left, top, left + w, top + h)


def hull(box: Box, width: int, height: int) -> tuple[int, int, int, int]:
    """The pixel-aligned hull (left, top, right, bottom) of ``box`` in a ``width`` x ``height``
    image: whole pixels, at least one each way, inside the image."""
    left, top = int(math.floor(box[0])), int(math.floor(box[1]))
    right = max(left + 1, min(width, int(math.ceil(box[2]))))
    bottom = max(top + 1, min(height, int(math.ceil(box[3]))))
    return left, top, right, bottom


def crop_hulls(u: torch.Tensor, width: int, height: int, min_area: float) -> tuple[torch.Tensor, ...]:
    """:func:`hull` of :func:`crop_box` for every row of float64 uniforms ``u`` (N, DRAWS), in
    batched float64 tensor arithmetic on ``u``'s device: (left, top, right, bottom), int64 (N,)
    each. The same operations in the same order as :func:`crop_box`; only ``exp`` may differ from
    ``math.exp`` in the last bit, which moves a hull edge only when a box edge lies within
    rounding of a whole pixel."""
    area = width * height * (min_area + (1.0 - min_area) * u[:, 0])
    log_lo, log_hi = math.log(3 / 4), math.log(4 / 3)
    ratio = torch.exp(log_lo + (log_hi - log_lo) * u[:, 1])
    w = torch.sqrt(area * ratio).clamp_(max=float(width))
    h = torch.sqrt(area / ratio).clamp_(max=float(height))
    left = (width - w) * u[:, 2]
    top = (height - h) * u[:, 3]
    left_i, top_i = left.floor().long(), top.floor().long()
    right_i = torch.maximum(left_i + 1, (left + w).ceil().long().clamp_(max=width))
    bottom_i = torch.maximum(top_i + 1, (top + h).ceil().long().clamp_(max=height))
    return left_i, top_i, right_i, bottom_i


def crop_resize(image: torch.Tensor, box: Box, size: Size) -> torch.Tensor:
    """Crop a float (C, H, W) image to the pixel-aligned hull of ``box`` and resize to ``size``."""
    left, top, right, bottom = hull(box, image.shape[-1], image.shape[-2])
    part = image[:, top:bottom, left:right]
    return resize(part.unsqueeze(0), size)[0]


def resize(images: torch.Tensor, size: Size) -> torch.Tensor:
    """Bilinear (antialiased when shrinking) resize of float (N, C, H, W) images to ``size`` (a side,
    or (height, width))."""
    if images.shape[-2:] == sides(size):
        return images
    return F.interpolate(images, size=sides(size), mode="bilinear", align_corners=False, antialias=True)


def transform_uint8(image: np.ndarray, size: int, aug: Optional["Augment"] = None,
                    u: Optional[np.ndarray] = None) -> np.ndarray:
    """One uint8 (H, W, C) image to uint8 (size, size, C): the random crop of ``crop_flip`` (the
    pixel-aligned hull of its box) or the whole image, resized bilinearly (antialiased when
    shrinking), then the pad-and-crop of ``pad_crop_flip``. The flip is left to :func:`to_float`,
    where it costs nothing. Works on uint8 with torch's vectorised channels-last kernels, which
    keeps the per-image cost of augmenting data read from files or packed files small."""
    height, width = image.shape[:2]
    top, bottom, left, right = 0, height, 0, width
    if aug is not None and aug.kind == "crop_flip":
        left, top, right, bottom = hull(crop_box(u, width, height, aug.min_area), width, height)
    arr = image[top:bottom, left:right]
    if arr.shape[:2] != (size, size):
        x = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).unsqueeze(0)
        shrink = arr.shape[0] > size or arr.shape[1] > size
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)
        arr = x[0].permute(1, 2, 0).numpy()
    if aug is not None and aug.kind == "pad_crop_flip":
        p = min(aug.padding, size - 1)
        dx, dy = _shift(u, p)
        arr = np.pad(arr, ((p, p), (p, p), (0, 0)), mode="reflect")[dy:dy + size, dx:dx + size]
    return arr


def flips(draws: Optional[np.ndarray]) -> Optional[np.ndarray]:
    """Which images of a batch to flip horizontally (probability 1/2 each); None without augmentation."""
    return None if draws is None else draws[:, 4] < 0.5


def _shift(u: np.ndarray, padding: int) -> tuple[int, int]:
    """'pad_crop_flip': the crop's offsets (x, y) into the padded image, each in [0, 2 * padding]."""
    span = 2 * padding + 1
    return min(int(u[2] * span), span - 1), min(int(u[3] * span), span - 1)


def _output(shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An empty tensor; in a DataLoader worker, allocated in shared memory (as torch's own collate
    does) so that handing it to the training process costs no extra copy."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    numel = math.prod(shape)
    storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(numel)
    return torch.empty(0, dtype=dtype).new(storage).view(shape)


def to_chw(batch: np.ndarray, flip: Optional[np.ndarray] = None) -> torch.Tensor:
    """uint8 (N, H, W, C) -> uint8 (N, C, H, W), the images marked in ``flip`` mirrored (the
    transpose takes the flip for free). In a DataLoader worker the result is in shared memory."""
    n, h, w, c = batch.shape
    out = _output((n, c, h, w), torch.uint8)
    chw = out.numpy()
    for k in range(n):
        chw[k] = (batch[k, :, ::-1] if flip is not None and flip[k] else batch[k]).transpose(2, 0, 1)
    return out


def normaliser(mean: torch.Tensor, std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift), each float32 (C, 1, 1), with ``x * scale - shift == (x / 255 - mean) / std`` up
    to rounding: ``mean`` and ``std`` per channel in [0, 1] units."""
    return (1.0 / (255.0 * std)).view(-1, 1, 1), (mean / std).view(-1, 1, 1)


def normalise_uint8(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                    out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """uint8 (N, C, H, W) (or float holding whole numbers 0..255) -> float32, normalised on ``x``'s
    device with the arithmetic of :func:`to_float` (one conversion, one multiply, one subtract),
    so that every path gives the same bits for the same pixels."""
    if out is None:
        out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    out.copy_(x)
    return out.mul_(scale).sub_(shift)


def to_float(batch: np.ndarray, mean: torch.Tensor, std: torch.Tensor,
             flip: Optional[np.ndarray] = None) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float (N, C, H, W), ``(x / 255 - mean) / std`` per channel, the images
    marked in ``flip`` mirrored: a uint8 transpose (which takes the flip for free), one conversion
    pass and two in-place passes."""
    n, h, w, c = batch.shape
    chw = np.empty((n, c, h, w), dtype=np.uint8)
    for k in range(n):
        chw[k] = (batch[k, :, ::-1] if flip is not None and flip[k] else batch[k]).transpose(2, 0, 1)
    x = torch.from_numpy(chw)
    scale, shift = normaliser(mean, std)
    return normalise_uint8(x, scale, shift, out=_output(x.shape))


@dataclass(frozen=True)
class Augment:
    kind: str
    """'crop_flip' or 'pad_crop_flip'."""
    seed: int
    """run.seed: with the epoch and the image index, it fixes every random choice."""
    min_area: float = 0.08
    """'crop_flip': smallest crop as a fraction of the image area."""
    padding: int = 4
    """'pad_crop_flip': reflection padding on each side, in pixels."""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown augmentation {self.kind!r}")

    def draws(self, epoch: int, indices: Sequence[int]) -> np.ndarray:
        return uniforms(self.seed, epoch, indices, DRAWS)

    def apply(self, images: torch.Tensor, draws: np.ndarray, size: Size) -> torch.Tensor:
        """Augment float (N, C, H, W) images held in memory and return them at ``size`` (a side, or
        (height, width))."""
        if self.kind == "crop_flip":
            h, w = images.shape[-2:]
            images = torch.stack([crop_resize(images[k], crop_box(draws[k], w, h, self.min_area), size)
                                  for k in range(images.shape[0])])
        else:
            images = resize(images, size)
            height, width = sides(size)
            p = min(self.padding, height - 1, width - 1)
            padded = F.pad(images, (p, p, p, p), mode="reflect")
            shifts = [_shift(u, p) for u in draws]
            images = torch.stack([padded[k, :, y:y + height, x:x + width] for k, (x, y) in enumerate(shifts)])
        flips = torch.from_numpy(draws[:, 4] < 0.5).view(-1, 1, 1, 1)
        return torch.where(flips, images.flip(-1), images)


def resolve(kind: str, dataset: str, source: Optional[str] = None) -> str:
    """``data.augment`` with 'auto' made concrete for ``dataset`` (a packed file: its ``source``)."""
    if kind != "auto":
        return kind
    name = source if dataset == "packed" else dataset
    if name in ("cifar10", "cifar100"):
        return "pad_crop_flip"
    if name == "imagefolder":
        return "crop_flip"
    return "none"
