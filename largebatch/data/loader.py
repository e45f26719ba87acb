"""DataLoaders over the world-size-invariant sampler (training) and exact shards (validation)."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from largebatch.batching import BatchPlan
from largebatch.data.sampler import MicroBatchSampler, shard_range


def _as_batch(fetched):
    """Datasets here return whole micro-batches from ``__getitems__``; nothing left to collate."""
    return fetched


def _loader(dataset: Dataset, batch_sampler, num_workers: int, pin_memory: bool) -> DataLoader:
    # Its own generator: creating an iterator then draws no number from the global RNG, which a
    # resumed run restores exactly (dropout masks would otherwise shift).
    return DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=_as_batch, num_workers=num_workers,
                      pin_memory=pin_memory, persistent_workers=num_workers > 0,
                      prefetch_factor=4 if num_workers > 0 else None, generator=torch.Generator().manual_seed(0))


def train_loader(dataset: Dataset, plan: BatchPlan, rank: int, seed: int, num_workers: int = 0,
                 pin_memory: bool = False) -> tuple[DataLoader, MicroBatchSampler]:
    """This worker's micro-batches; call ``sampler.set_epoch(epoch, start_step)`` before each epoch."""
    sampler = MicroBatchSampler(len(dataset), plan, rank, seed)
    return _loader(dataset, sampler, num_workers, pin_memory), sampler


def eval_loader(dataset: Dataset, rank: int, world_size: int, batch: int, num_workers: int = 0,
                pin_memory: bool = False) -> DataLoader:
    """This worker's contiguous, unpadded validation shard, in batches of at most ``batch``."""
    shard = shard_range(len(dataset), rank, world_size)
    batches = [list(range(i, min(i + batch, shard.stop))) for i in range(shard.start, shard.stop, batch)]
    return _loader(dataset, batches, num_workers, pin_memory)
