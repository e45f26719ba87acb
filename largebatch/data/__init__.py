"""Datasets, world-size-invariant batch sampling and loaders."""

from largebatch.data.datasets import DatasetInfo, build_datasets
from largebatch.data.loader import eval_loader, train_loader
from largebatch.data.sampler import MicroBatchSampler, global_batches, shard_range, steps_per_epoch

__all__ = ["DatasetInfo", "build_datasets", "train_loader", "eval_loader", "MicroBatchSampler",
           "global_batches", "shard_range", "steps_per_epoch"]
