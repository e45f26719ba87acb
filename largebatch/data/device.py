"""Datasets held on the training device: micro-batches gathered, converted, normalised, resized and
augmented there with batched tensor ops, with no loader processes and no per-image Python loop.

A set that fits (the digits, CIFAR, a packed file, an image folder decoded with data.cache=true,
synthetic images) is copied to the device once: as uint8 where the source is uint8 (CIFAR as
(N, C, H, W), a packed file as stored, (N, S, S, C)), as float32 otherwise, with its int64 labels.
Each training micro-batch is then a slice of the epoch's permutation, computed on the CPU by
:class:`~largebatch.data.sampler.MicroBatchSampler` and copied to the device once per epoch; its
offsets come from :meth:`~largebatch.data.sampler.MicroBatchSampler.slices`, the definition the
DataLoader path uses too, so the global batches stay world-size-invariant.

The augmentation is drawn from (run.seed, epoch, image index) by
:func:`~largebatch.data.augment.uniforms_tensor`, bit-identical to the CPU path's ``uniforms``:

- ``pad_crop_flip``: reflection padding, crop and flip as one gather, so the pixels are exactly
  those of the DataLoader path.
- ``crop_flip``: the same pixel-aligned hull of the same ``crop_box`` and the same flip, resampled
  to the output size by two batched matrix products with per-image weights: the antialiased
  bilinear (triangle) filter that ``F.interpolate(..., antialias=True)`` uses, restricted to the
  hull. It cannot match the CPU path's per-image antialiased ``F.interpolate`` bit for bit when the
  hull is resized (float32 sums in another order: about 1e-6 apart); where the hull already has
  the output size it is exact. uint8 sources (packed files) are rounded to whole levels after each
  pass, as torch's uint8 kernel does: a level or two apart for a few pixels in a hundred. On CUDA
  with TF32 matrix products enabled the resampling is rounded to TF32.

Resizing (data.image_size, progressive-resizing phases) is the CPU path's: antialiased bilinear
``F.interpolate`` on float images; for packed files torch's uint8 kernel on the CPU, and elsewhere
(no uint8 kernel there) the resampling above rounded to whole levels.

Nothing per micro-batch reads a device value on the host (no ``.item()``, ``.tolist()``, ``bool()``
or ``.cpu()``), so a GPU step never waits for it; which images of a cached image folder are
unreadable (reported in ``skipped``, as the loader does) is worked out from the CPU permutation.
On the CPU, ``device="cpu"`` runs the same code on data already in memory, with no copy, and gives
the DataLoader path's pixels bit for bit (``none``, ``pad_crop_flip``).
"""

from __future__ import annotations

from typing import Iterator, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from largebatch.batching import BatchPlan
from largebatch.data.augment import DRAWS, Augment, crop_hulls, normaliser, normalise_uint8, resize, uniforms_tensor
from largebatch.data.base import TensorImages, Uint8Images
from largebatch.data.loader import Skips
from largebatch.data.packed import PackedImages
from largebatch.data.sampler import MicroBatchSampler, shard_range
from largebatch.data.synthetic import SyntheticImages

_COPY_BYTES = 1 << 28
"""Largest piece of a packed file read into host memory at a time while copying it to the device."""


def cacheable_bytes(dataset: Dataset) -> Optional[int]:
    """Bytes ``dataset`` takes held on the device (images as stored there, plus int64 labels), or
    None when it cannot be held (an image folder read from files)."""
    n = len(dataset)
    if isinstance(dataset, (TensorImages, Uint8Images)):
        return dataset.images.numel() * dataset.images.element_size() + 8 * n
    if isinstance(dataset, PackedImages):
        return n * dataset.stored_size ** 2 * dataset.channels + 8 * n
    if isinstance(dataset, SyntheticImages):
        return n * 3 * dataset.image_size ** 2 * 4 + 8 * n
    return None


def in_memory(dataset: Dataset) -> bool:
    """True when ``dataset`` is already held in this process's memory (digits, CIFAR, a cached image
    folder), so that holding it on the CPU device costs nothing extra."""
    return isinstance(dataset, (TensorImages, Uint8Images))


def _reflect(i: torch.Tensor, size: int) -> torch.Tensor:
    """Reflection (edge not repeated) of positions in [-(size - 1), 2 * (size - 1)] into [0, size)."""
    i = i.abs()
    return torch.where(i > size - 1, 2 * (size - 1) - i, i)


def pad_crop_flip(x: torch.Tensor, u: torch.Tensor, padding: int) -> torch.Tensor:
    """``pad_crop_flip`` of (N, C, S, S) images of any dtype with float64 uniforms ``u`` (N, DRAWS):
    reflection padding, per-image crop offsets and flip, as one gather (exactly the pixels of
    :meth:`~largebatch.data.augment.Augment.apply` and ``transform_uint8`` + ``to_float``)."""
    n, c, s, _ = x.shape
    p = min(padding, s - 1)
    span = 2 * p + 1
    dx = (u[:, 2] * span).long().clamp_(max=span - 1)
    dy = (u[:, 3] * span).long().clamp_(max=span - 1)
    o = torch.arange(s, device=x.device)
    cols = _reflect(torch.where((u[:, 4] < 0.5)[:, None], s - 1 - o, o) + (dx[:, None] - p), s)
    rows = _reflect(o + (dy[:, None] - p), s)
    flat = (rows[:, :, None] * s + cols[:, None, :]).view(n, 1, s * s).expand(n, c, s * s)
    return x.reshape(n, c, s * s).gather(2, flat).view(n, c, s, s)


def resample_weights(start: torch.Tensor, length: torch.Tensor, size: int, full: int,
                     flip: Optional[torch.Tensor] = None) -> torch.Tensor:
    """float32 (N, size, full): row ``o`` of image ``k`` holds the weights with which output pixel
    ``o`` takes the source pixels of a ``full``-pixel line, restricted to ``[start, start + length)``:
    the triangle filter of ``F.interpolate(mode='bilinear', antialias=True, align_corners=False)``
    (widened by the scale when shrinking), normalised to sum 1. ``flip`` (bool (N,)): rows reversed
    for those images, a horizontal mirror of the output."""
    dev = start.device
    scale = length.float() / size
    inv = torch.where(scale > 1.0, 1.0 / scale, torch.ones_like(scale))
    centre = scale[:, None] * (torch.arange(size, device=dev) + 0.5)
    pos = torch.arange(full, device=dev)[None, :] - start[:, None]
    inside = (pos >= 0) & (pos < length[:, None])
    w = (1.0 - ((pos[:, None, :] + 0.5) - centre[:, :, None]).abs() * inv[:, None, None]).clamp_(min=0.0)
    w = w * inside[:, None, :]
    w = w / w.sum(-1, keepdim=True)
    if flip is not None:
        w = torch.where(flip[:, None, None], w.flip(1), w)
    return w


def _levels(x: torch.Tensor) -> torch.Tensor:
    """Round float pixel values to whole uint8 levels 0..255 (half up), in place."""
    return x.add_(0.5).floor_().clamp_(0.0, 255.0)


def resample(x: torch.Tensor, wx: torch.Tensor, wy: torch.Tensor, levels: bool = False) -> torch.Tensor:
    """float (N, C, H, W) -> (N, C, S, S) with :func:`resample_weights` ``wx`` (N, S, W) and ``wy``
    (N, S, H): two batched matrix products, rows first. ``levels``: round to whole uint8 levels
    after each pass, as torch's separable uint8 kernel does."""
    rows = torch.matmul(x, wx.transpose(1, 2).unsqueeze(1))  # (N, C, H, S)
    if levels:
        _levels(rows)
    out = torch.matmul(wy.unsqueeze(1), rows)
    return _levels(out) if levels else out


def crop_flip(x: torch.Tensor, u: torch.Tensor, size: int, min_area: float, levels: bool = False) -> torch.Tensor:
    """``crop_flip`` of float (N, C, H, W) images with float64 uniforms ``u`` (N, DRAWS): each image's
    hull of :func:`~largebatch.data.augment.crop_box` resampled to (size, size) and flipped (see
    :func:`resample`; ``levels`` for uint8 pixel values). Unlike the per-image antialiased
    ``F.interpolate`` of the CPU path it is not bit-identical when the hull is resized (float32
    sums in another order; uint8 sources: a level or two for a few pixels in a hundred); where the hull already is
    size x size it is exact."""
    n, c, h, w = x.shape
    left, top, right, bottom = crop_hulls(u, w, h, min_area)
    wx = resample_weights(left, right - left, size, w, flip=u[:, 4] < 0.5)
    wy = resample_weights(top, bottom - top, size, h)
    return resample(x, wx, wy, levels)


def _resize_uint8(x: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N, C, H, H) resized to (size, size) as the packed CPU path does (bilinear, antialiased
    when shrinking). On the CPU with torch's uint8 kernel (the same bits); elsewhere, where there is
    no uint8 kernel, with :func:`resample` rounded to whole levels (float holding 0..255)."""
    n, h = x.shape[0], x.shape[-1]
    if x.device.type == "cpu":
        return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=size < h)
    start = torch.zeros(n, dtype=torch.long, device=x.device)
    w = resample_weights(start, start + h, size, h)
    return resample(x.float(), w, w, levels=True)


class DeviceData:
    """One split of a dataset held on ``device``, turned into batches by :meth:`take`."""

    def __init__(self, dataset: Dataset, device: Union[str, torch.device]):
        dev = self.device = torch.device(device)
        self.dataset = dataset
        self.augment: Optional[Augment] = getattr(dataset, "augment", None)
        self.image_size: int = dataset.image_size
        """The size a batch has when none is asked for."""
        self.unreadable: dict = dict(getattr(dataset, "unreadable", None) or {})
        self.kind = "float"
        if isinstance(dataset, Uint8Images):
            self.kind = "cifar"
            self.images = dataset.images.to(dev)
            self.mean, self.std = dataset.mean.to(dev), dataset.std.to(dev)
            labels = dataset.labels
        elif isinstance(dataset, PackedImages):
            self.kind = "packed"
            self.stored_size = dataset.stored_size
            self.images = self._copy_packed(dataset.array(), dev)
            self.scale, self.shift = (t.to(dev) for t in normaliser(dataset.mean, dataset.std))
            labels = dataset.labels
        elif isinstance(dataset, TensorImages):
            self.images, labels = dataset.images.to(dev), dataset.labels
        elif isinstance(dataset, SyntheticImages):
            images, labels = dataset.materialise()
            self.images = images.to(dev)
        else:
            raise ValueError(f"{type(dataset).__name__} cannot be held on the device (cacheable_bytes is None); "
                             "use largebatch.data.train_loader")
        self.labels = labels.to(dev)

    @staticmethod
    def _copy_packed(array: np.ndarray, device: torch.device) -> torch.Tensor:
        """The memory-mapped uint8 (N, S, S, C) images in one device tensor, read in pieces."""
        out = torch.empty(array.shape, dtype=torch.uint8, device=device)
        step = max(1, _COPY_BYTES // max(1, int(np.prod(array.shape[1:]))))
        for lo in range(0, array.shape[0], step):
            out[lo:lo + step].copy_(torch.from_numpy(np.array(array[lo:lo + step])))
        return out

    def __len__(self) -> int:
        return self.labels.shape[0]

    def take(self, idx: torch.Tensor, size: Optional[int] = None,
             epoch: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Images float32 (N, C, size, size), normalised, and int64 labels of the samples ``idx``
        (int64 on the device), augmented for ``epoch`` when the set has an augmentation (None:
        never, as validation). Only device work: nothing is read back to the host."""
        size = size or self.image_size
        x, y = self.images.index_select(0, idx), self.labels.index_select(0, idx)
        aug = self.augment if epoch is not None else None
        u = uniforms_tensor(aug.seed, epoch, idx, DRAWS) if aug is not None else None
        if self.kind == "packed":
            return self._packed(x.permute(0, 3, 1, 2), size, aug, u), y
        if self.kind == "cifar":
            x = self.dataset.normalise(x, self.mean, self.std)
        if aug is None:
            return resize(x, size), y
        if aug.kind == "pad_crop_flip":
            return pad_crop_flip(resize(x, size), u, aug.padding), y
        return crop_flip(x, u, size, aug.min_area), y

    def _packed(self, x: torch.Tensor, size: int, aug: Optional[Augment], u: Optional[torch.Tensor]) -> torch.Tensor:
        """uint8 (N, C, S, S) at the packed size -> float at ``size``, as ``PackedImages`` makes it."""
        if aug is not None and aug.kind == "crop_flip":
            x = crop_flip(x.float(), u, size, aug.min_area, levels=True)
        else:
            if size != self.stored_size:
                x = _resize_uint8(x, size)
            if aug is not None:
                x = pad_crop_flip(x, u, aug.padding)
        return normalise_uint8(x, self.scale, self.shift)


class DeviceBatches(Skips):
    """Iterates ``(images, labels)`` of a :class:`DeviceData`, as :class:`~largebatch.data.loader.Batches`
    does for a DataLoader: float32 (N, C, S, S) normalised images and int64 labels, both on the
    device. Training (``sampler`` given): the micro-batches of the sampler's current epoch, start
    step and phase. Validation (``ranges``): contiguous index ranges, never augmented. ``skipped``
    and ``error`` as in :class:`~largebatch.data.loader.Skips` (cached image folders only)."""

    def __init__(self, data: DeviceData, sampler: Optional[MicroBatchSampler] = None,
                 ranges: Optional[list[tuple[int, int]]] = None, image_size: Optional[int] = None,
                 on_corrupt: str = "skip"):
        super().__init__(data.dataset, on_corrupt)
        assert (sampler is None) != (ranges is None)
        self.data, self.sampler, self.ranges, self.image_size = data, sampler, ranges, image_size
        self._perm: Optional[tuple[int, torch.Tensor, torch.Tensor]] = None

    def __len__(self) -> int:
        return len(self.sampler) if self.sampler is not None else len(self.ranges)

    def _permutation(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(CPU, device) copies of ``epoch``'s permutation; copied once per epoch."""
        if self._perm is None or self._perm[0] != epoch:
            cpu = self.sampler.permutation()
            if self.data.device.type == "cuda":
                dev = cpu.pin_memory().to(self.data.device, non_blocking=True)
            else:
                dev = cpu.to(self.data.device)
            self._perm = (epoch, cpu, dev)
        return self._perm[1], self._perm[2]

    def start(self) -> None:
        """Copy the permutation of the epoch the sampler is set to ahead of ``iter()`` (training);
        nothing else to start: there are no loader processes."""
        if self.sampler is not None:
            self._permutation(self.sampler.epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.sampler is None:
            return self._validation()
        s = self.sampler
        cpu, perm = self._permutation(s.epoch)
        slices, size = s.slices(), s.image_size or self.data.image_size
        epoch = s.epoch if self.data.augment is not None else None
        unreadable = None
        if self.data.unreadable:
            where = torch.empty_like(cpu)
            where[cpu] = torch.arange(cpu.numel())
            unreadable = sorted((int(where[i]), i) for i in self.data.unreadable)
        return self._training(perm, slices, size, epoch, unreadable)

    def _report(self, lo: int, hi: int, positions: Optional[list[tuple[int, int]]]) -> None:
        for pos, index in positions or ():
            if lo <= pos < hi:
                self._note(index, self.data.unreadable[index])

    def _training(self, perm, slices, size, epoch, unreadable):
        for lo, hi in slices:
            self._report(lo, hi, unreadable)
            yield self.data.take(perm[lo:hi], size, epoch)

    def _validation(self):
        positions = sorted((i, i) for i in self.data.unreadable)
        for lo, hi in self.ranges:
            self._report(lo, hi, positions)
            yield self.data.take(torch.arange(lo, hi, device=self.data.device), self.image_size)


def device_train_loader(dataset: Dataset, plan: BatchPlan, rank: int, seed: int, device: Union[str, torch.device],
                        image_size: Optional[int] = None,
                        on_corrupt: str = "skip") -> tuple[DeviceBatches, MicroBatchSampler]:
    """:func:`~largebatch.data.loader.train_loader` for a set held on ``device``: the same batches
    (same images, labels and augmentation for the same seed, plan and epoch), made there. Call
    ``sampler.set_epoch(epoch, start_step)`` before each epoch and ``sampler.set_phase(plan,
    image_size)`` when the phase changes."""
    sampler = MicroBatchSampler(len(dataset), plan, rank, seed, image_size=image_size)
    return DeviceBatches(DeviceData(dataset, device), sampler=sampler, on_corrupt=on_corrupt), sampler


def device_eval_loader(dataset: Dataset, rank: int, world_size: int, batch: int, device: Union[str, torch.device],
                       image_size: Optional[int] = None, on_corrupt: str = "skip") -> DeviceBatches:
    """:func:`~largebatch.data.loader.eval_loader` for a set held on ``device``: this worker's
    contiguous, unpadded shard (``shard_range``) in batches of at most ``batch``, at ``image_size``
    (None: the dataset's own), never augmented."""
    shard = shard_range(len(dataset), rank, world_size)
    ranges = [(i, min(i + batch, shard.stop)) for i in range(shard.start, shard.stop, batch)]
    return DeviceBatches(DeviceData(dataset, device), ranges=ranges, image_size=image_size, on_corrupt=on_corrupt)
