"""DataLoaders over the world-size-invariant sampler (training) and exact shards (validation).

Loader worker processes (``data.num_workers``) persist across epochs and keep 4 batches each in
flight. Each loader is wrapped in :class:`Batches`, which yields ``(images, labels)`` and keeps the
indices of images the dataset could not read; ``Batches.start()`` starts the loader processes and
the epoch's prefetch early (while the model is built), and the next ``iter()`` continues from it.

With ``device`` a CUDA device, batches are pinned by the DataLoader and copied to the device on a
side stream one batch ahead, so the copy overlaps compute. Datasets read from uint8 pixels
(image folders, packed files) then travel as uint8 (``raw``: a quarter of the bytes, and no float
conversion in the loader processes) and are converted and normalised on the device with the
arithmetic of :func:`~largebatch.data.augment.to_float`, giving the same bits as the float path.
Data held on the device needs no loader at all: see :mod:`largebatch.data.device`.
"""

from __future__ import annotations

import sys
from typing import Iterator, Optional, Union

import torch
from torch.utils.data import DataLoader, Dataset

from largebatch.batching import BatchPlan
from largebatch.data.augment import normaliser, normalise_uint8
from largebatch.data.base import IGNORE, BadLabel
from largebatch.data.sampler import MicroBatchSampler, Request, shard_range
from largebatch.errors import UsageError

PREFETCH = 4
"""Batches each loader worker keeps ready."""


def _as_batch(fetched):
    """Datasets here return whole micro-batches from ``__getitems__``; nothing left to collate."""
    return fetched


class _RawItems(Dataset):
    """``dataset`` fetched with ``raw_items``: uint8 batches, normalised by the consumer."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, request):
        return self.dataset.raw_items(request)


class Skips:
    """Unreadable images met while iterating: ``skipped`` (their indices, with their reasons in
    ``reasons``) and, with ``on_corrupt='error'``, ``error`` (a one-line UsageError naming the
    first), which the trainer raises on every worker at the next point where the workers agree (a
    step's end, a validation's end), so that no worker is left waiting in a collective.

    Under data.on_corrupt=skip each file gets one warning per run: printed where ``announce`` is
    true (the trainer sets it on rank 0 only) when this process meets the file, or, for a file
    another worker met, when the workers fold in what they found (:meth:`warn`)."""

    def __init__(self, dataset: Dataset, on_corrupt: str = "skip"):
        self.dataset, self.on_corrupt = dataset, on_corrupt
        self.skipped: set[int] = set()
        self.reasons: dict[int, str] = {}
        self.error: Optional[UsageError] = None
        self.announce = True
        self._warned: set[int] = set()

    def _note(self, index: int, reason: str) -> None:
        if isinstance(reason, BadLabel):  # not an unreadable file: a label the model has no output for
            self.error = self.error or UsageError(reason)
            return
        self.skipped.add(index)
        self.reasons[index] = reason
        self.warn({index: reason})
        if self.on_corrupt == "error" and self.error is None:
            from largebatch.data.imagefolder import unreadable_message

            self.error = UsageError(unreadable_message(self.dataset.describe(index), reason))

    def warn(self, found: dict[int, str], rank: Optional[int] = None) -> None:
        """The warning for each file of ``found`` ({index: reason}) not warned of yet (once per file,
        whichever process read it); ``rank``: the worker that met them, where it is another."""
        if self.on_corrupt != "skip":
            return
        for index in sorted(set(found) - self._warned):
            self._warned.add(index)
            if self.announce:
                where = "" if rank is None else f" (met by rank {rank})"
                print(f"largebatch: warning: skipping unreadable image '{self.dataset.describe(index)}'{where} "
                      f"({found[index]}); it counts in skipped_files (data.on_corrupt=error stops instead)",
                      file=sys.stderr, flush=True)


class Batches(Skips):
    """Iterates ``(images, labels)`` from a DataLoader of :class:`~largebatch.data.base.Samples`.

    An image the dataset could not read arrives as a zero image labelled IGNORE (it adds nothing to
    the loss or the validation counts); its index is added to ``skipped`` (see :class:`Skips`).

    ``device``: where the yielded tensors go (None: left where the loader puts them). On CUDA each
    batch is copied there on a side stream while the previous one is in use. ``norm``: (scale,
    shift) of :func:`~largebatch.data.augment.normaliser` when the loader gives uint8 batches
    (``raw``), which are then converted and normalised on ``device`` (or on the CPU).
    """

    def __init__(self, loader: DataLoader, dataset: Dataset, on_corrupt: str = "skip",
                 device: Optional[torch.device] = None,
                 norm: Optional[tuple[torch.Tensor, torch.Tensor]] = None):
        super().__init__(dataset, on_corrupt)
        self.loader, self.device = loader, device
        self._norm = None if norm is None else tuple(t.to(device) if device is not None else t for t in norm)
        self._cuda = device is not None and device.type == "cuda"
        self._stream: Optional[torch.cuda.Stream] = None
        self._started = None

    def __len__(self) -> int:
        return len(self.loader)

    def _state(self):
        """What decides the batches of the next iteration: the sampler's epoch, start step and phase
        (validation: fixed)."""
        s = self.loader.batch_sampler
        return (s.epoch, s.first_image(), s.plan, s.image_size) if isinstance(s, MicroBatchSampler) else None

    def start(self) -> None:
        """Start the loader processes and the prefetch of the epoch the sampler is set to; returns at
        once. The next ``iter()`` continues from this prefetch if the sampler's epoch, start step and
        phase are unchanged by then, else it discards it."""
        self._started = (iter(self.loader), self._state())

    def _batches(self):
        started, self._started = self._started, None
        if started is not None and started[1] == self._state():
            return started[0]
        return iter(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        fetched = self._batches()
        if self._cuda:
            return self._staged(fetched)
        return self._plain(fetched)

    def _plain(self, fetched) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels, skipped in fetched:
            for index, reason in skipped:
                self._note(int(index), reason)
            if self.device is not None:
                images, labels = images.to(self.device), labels.to(self.device)
            yield self._finish(images, labels, skipped), labels

    def _finish(self, images: torch.Tensor, labels: torch.Tensor, skipped: list) -> torch.Tensor:
        """Convert and normalise a uint8 batch where it is (float batches pass through)."""
        if images.dtype != torch.uint8:
            return images
        x = normalise_uint8(images, *self._norm)
        if skipped:  # as the float path: zeros for an unreadable image
            x.masked_fill_((labels == IGNORE).view(-1, 1, 1, 1), 0.0)
        return x

    def _staged(self, fetched) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """CUDA: copy each (pinned) batch on a side stream one batch ahead; the consuming stream
        waits on an event before using it, and ``record_stream`` keeps the allocator from reusing
        its memory while that stream may still read it."""
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=self.device)
        stream = self._stream

        def stage(item):
            images, labels, skipped = item
            with torch.cuda.stream(stream):
                x = images.to(self.device, non_blocking=True)
                y = labels.to(self.device, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record(stream)
            return x, y, skipped, ready

        def use(staged):
            x, y, skipped, ready = staged
            consumer = torch.cuda.current_stream(self.device)
            consumer.wait_event(ready)
            x.record_stream(consumer)
            y.record_stream(consumer)
            for index, reason in skipped:
                self._note(int(index), reason)
            return self._finish(x, y, skipped), y

        pending = None
        for item in fetched:
            staged = stage(item)
            if pending is not None:
                yield use(pending)
            pending = staged
        if pending is not None:
            yield use(pending)


def _loader(dataset: Dataset, batch_sampler, num_workers: int, pin_memory: bool) -> DataLoader:
    # Its own generator: creating an iterator then draws no number from the global RNG, which a
    # resumed run restores exactly (dropout masks would otherwise shift).
    return DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=_as_batch, num_workers=num_workers,
                      pin_memory=pin_memory, persistent_workers=num_workers > 0,
                      prefetch_factor=PREFETCH if num_workers > 0 else None, generator=torch.Generator().manual_seed(0))


def _wrap(dataset: Dataset, batch_sampler, num_workers: int, pin_memory: bool, on_corrupt: str,
          device: Union[str, torch.device, None], raw: Optional[bool]) -> Batches:
    device = torch.device(device) if device is not None else None
    cuda = device is not None and device.type == "cuda"
    stats = dataset.uint8_stats() if hasattr(dataset, "uint8_stats") else None
    use_raw = stats is not None and (raw if raw is not None else cuda)
    source = _RawItems(dataset) if use_raw else dataset
    loader = _loader(source, batch_sampler, num_workers, pin_memory or cuda)
    return Batches(loader, dataset, on_corrupt, device=device, norm=normaliser(*stats) if use_raw else None)


def train_loader(dataset: Dataset, plan: BatchPlan, rank: int, seed: int, num_workers: int = 0,
                 pin_memory: bool = False, image_size: Optional[int] = None, on_corrupt: str = "skip", *,
                 device: Union[str, torch.device, None] = None,
                 raw: Optional[bool] = None) -> tuple[Batches, MicroBatchSampler]:
    """This worker's micro-batches; call ``sampler.set_epoch(epoch, start_step)`` before each epoch
    (and ``sampler.set_phase(plan, image_size)`` when the phase changes).

    ``device``: yield the batches there (None: on the CPU, as the loader makes them); a CUDA device
    also pins them and copies them on a side stream one batch ahead. ``raw``: the loader processes
    give uint8 batches, converted and normalised on ``device`` (bit-identical to the float path);
    None: on CUDA only. Only datasets read from uint8 pixels (image folders, packed files) have a
    uint8 form; the others always give float batches."""
    sampler = MicroBatchSampler(len(dataset), plan, rank, seed, image_size=image_size)
    return _wrap(dataset, sampler, num_workers, pin_memory, on_corrupt, device, raw), sampler


def eval_loader(dataset: Dataset, rank: int, world_size: int, batch: int, num_workers: int = 0,
                pin_memory: bool = False, image_size: Optional[int] = None, on_corrupt: str = "skip", *,
                device: Union[str, torch.device, None] = None, raw: Optional[bool] = None) -> Batches:
    """This worker's contiguous, unpadded validation shard, in batches of at most ``batch``, at
    ``image_size`` (None: the dataset's own), never augmented; ``device`` and ``raw`` as in
    :func:`train_loader`."""
    shard = shard_range(len(dataset), rank, world_size)
    batches = [Request(range(i, min(i + batch, shard.stop)), None, image_size)
               for i in range(shard.start, shard.stop, batch)]
    return _wrap(dataset, batches, num_workers, pin_memory, on_corrupt, device, raw)
