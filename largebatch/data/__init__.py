"""Datasets, augmentation, world-size-invariant batch sampling, loaders, device-resident data and the
packed format."""

from largebatch.data.base import IGNORE, DatasetInfo, Samples
from largebatch.data.datasets import build_datasets
from largebatch.data.device import (DeviceBatches, cacheable_bytes, device_eval_loader, device_train_loader,
                                    in_memory)
from largebatch.data.loader import Batches, eval_loader, train_loader
from largebatch.data.sampler import MicroBatchSampler, Request, global_batches, shard_range, steps_per_epoch

__all__ = ["DatasetInfo", "Samples", "IGNORE", "build_datasets", "train_loader", "eval_loader", "Batches",
           "MicroBatchSampler", "Request", "global_batches", "shard_range", "steps_per_epoch",
           "DeviceBatches", "device_train_loader", "device_eval_loader", "cacheable_bytes", "in_memory"]
