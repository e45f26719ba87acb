"""DataLoaders over the world-size-invariant sampler (training) and exact shards (validation).

Loader worker processes (``data.num_workers``) persist across epochs and keep 4 batches each in
flight; on CUDA the batches are pinned so the copy to the GPU overlaps compute. Each loader is
wrapped in :class:`Batches`, which yields ``(images, labels)`` and keeps the indices of images the
dataset could not read.
"""

from __future__ import annotations

import sys
from typing import Iterator, Optional

import torch
from torch.utils.data import DataLoader, Dataset

from largebatch.batching import BatchPlan
from largebatch.data.sampler import MicroBatchSampler, Request, shard_range
from largebatch.errors import UsageError

PREFETCH = 4
"""Batches each loader worker keeps ready."""


def _as_batch(fetched):
    """Datasets here return whole micro-batches from ``__getitems__``; nothing left to collate."""
    return fetched


class Batches:
    """Iterates ``(images, labels)`` from a DataLoader of :class:`~largebatch.data.datasets.Samples`.

    An image the dataset could not read arrives as a zero image labelled IGNORE (it adds nothing to
    the loss or the validation counts); its index is added to ``skipped``. With ``on_corrupt='error'``
    the first one also sets ``error``, a one-line UsageError naming the file, which the trainer
    raises on every worker at the next point where the workers agree (a step's end, a validation's
    end), so that no worker is left waiting in a collective.
    """

    def __init__(self, loader: DataLoader, dataset: Dataset, on_corrupt: str = "skip"):
        self.loader, self.dataset, self.on_corrupt = loader, dataset, on_corrupt
        self.skipped: set[int] = set()
        self.error: Optional[UsageError] = None

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels, skipped in self.loader:
            for index, reason in skipped:
                self._note(int(index), reason)
            yield images, labels

    def _note(self, index: int, reason: str) -> None:
        if self.on_corrupt == "skip" and index not in self.skipped:  # once per file, whichever process read it
            print(f"largebatch: warning: skipping unreadable image '{self.dataset.describe(index)}' ({reason}); it "
                  "counts in skipped_files (data.on_corrupt=error stops instead)", file=sys.stderr, flush=True)
        self.skipped.add(index)
        if self.on_corrupt == "error" and self.error is None:
            from largebatch.data.imagefolder import unreadable_message

            self.error = UsageError(unreadable_message(self.dataset.describe(index), reason))


def _loader(dataset: Dataset, batch_sampler, num_workers: int, pin_memory: bool) -> DataLoader:
    # Its own generator: creating an iterator then draws no number from the global RNG, which a
    # resumed run restores exactly (dropout masks would otherwise shift).
    return DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=_as_batch, num_workers=num_workers,
                      pin_memory=pin_memory, persistent_workers=num_workers > 0,
                      prefetch_factor=PREFETCH if num_workers > 0 else None, generator=torch.Generator().manual_seed(0))


def train_loader(dataset: Dataset, plan: BatchPlan, rank: int, seed: int, num_workers: int = 0,
                 pin_memory: bool = False, image_size: Optional[int] = None,
                 on_corrupt: str = "skip") -> tuple[Batches, MicroBatchSampler]:
    """This worker's micro-batches; call ``sampler.set_epoch(epoch, start_step)`` before each epoch
    (and ``sampler.set_phase(plan, image_size)`` when the phase changes)."""
    sampler = MicroBatchSampler(len(dataset), plan, rank, seed, image_size=image_size)
    return Batches(_loader(dataset, sampler, num_workers, pin_memory), dataset, on_corrupt), sampler


def eval_loader(dataset: Dataset, rank: int, world_size: int, batch: int, num_workers: int = 0,
                pin_memory: bool = False, image_size: Optional[int] = None, on_corrupt: str = "skip") -> Batches:
    """This worker's contiguous, unpadded validation shard, in batches of at most ``batch``, at
    ``image_size`` (None: the dataset's own), never augmented."""
    shard = shard_range(len(dataset), rank, world_size)
    batches = [Request(range(i, min(i + batch, shard.stop)), None, image_size)
               for i in range(shard.start, shard.stop, batch)]
    return Batches(_loader(dataset, batches, num_workers, pin_memory), dataset, on_corrupt)
