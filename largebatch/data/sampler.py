"""World-size-invariant global batches.

Every epoch is one permutation of the training set, seeded by (seed, epoch) alone, cut into
``steps_per_epoch`` global batches of ``global_batch`` images (the remainder is dropped; the next
epoch's permutation differs). Worker ``r`` takes the contiguous slice
``[r * per_worker_batch, (r + 1) * per_worker_batch)`` of each global batch and cuts it into
``accum_steps`` micro-batches. The sequence of global batches therefore depends only on the seed,
the epoch and the global batch size, never on the world size or the micro-batch, unlike
``torch.utils.data.DistributedSampler``, which deals indices round-robin.

:meth:`MicroBatchSampler.slices` states where each micro-batch lies in the epoch's permutation;
the DataLoader path (``__iter__``) and the device-resident path
(:mod:`largebatch.data.device`, which slices a device copy of the permutation) both use it.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch

from largebatch.batching import BatchPlan

_EPOCH_STRIDE = 1_000_003  # a prime, so (seed, epoch) pairs map to distinct generator seeds


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator()
    g.manual_seed(seed * _EPOCH_STRIDE + epoch)
    return torch.randperm(num_samples, generator=g)


def steps_per_epoch(num_samples: int, global_batch: int) -> int:
    return num_samples // global_batch


def global_batches(num_samples: int, global_batch: int, seed: int, epoch: int,
                   start_step: int = 0) -> Iterator[torch.Tensor]:
    """The global batches of ``epoch`` (index tensors), from ``start_step`` on."""
    perm = epoch_permutation(num_samples, seed, epoch)
    for step in range(start_step, steps_per_epoch(num_samples, global_batch)):
        yield perm[step * global_batch:(step + 1) * global_batch]


class Request(list):
    """The indices of one batch, with what the dataset needs to produce it.

    ``epoch``: set for training batches, where it seeds the augmentation with the index; None for
    validation (never augmented). ``size``: the side of the images to return (progressive
    resizing); None = the dataset's own. It travels to DataLoader worker processes with the
    indices, so persistent workers need no message when the epoch or the phase changes.
    """

    def __init__(self, indices, epoch: Optional[int] = None, size: Optional[int] = None):
        super().__init__(indices)
        self.epoch, self.size = epoch, size


class MicroBatchSampler:
    """Yields this worker's micro-batches (:class:`Request` lists of indices) for one epoch, in step order.

    Usable as a DataLoader ``batch_sampler``. Micro-batch ``k`` of step ``s`` is item
    ``s * accum_steps + k``; ``start_step`` resumes in the middle of an epoch. ``set_phase``
    changes the batch plan and image size between epochs (train.phases), or in the middle of one
    (the adaptive batch): ``start_image`` then says where in the epoch's permutation the next global
    batch starts, and the epoch ends where fewer than a global batch of images are left.
    """

    def __init__(self, num_samples: int, plan: BatchPlan, rank: int, seed: int, epoch: int = 0,
                 start_step: int = 0, image_size: Optional[int] = None):
        self.num_samples, self.rank, self.seed = num_samples, rank, seed
        self.set_phase(plan, image_size)
        self.epoch, self.start_step, self.start_image = epoch, start_step, None

    def set_phase(self, plan: BatchPlan, image_size: Optional[int] = None) -> None:
        if self.num_samples < plan.global_batch:
            raise ValueError(f"{self.num_samples} samples < one global batch of {plan.global_batch}")
        self.plan, self.image_size = plan, image_size

    def set_epoch(self, epoch: int, start_step: int = 0, start_image: Optional[int] = None) -> None:
        """The epoch to sample, from its step ``start_step`` (of the current batch plan), or from its
        image ``start_image`` of the permutation where given (a batch that changed mid-epoch)."""
        if start_image is not None and not 0 <= start_image <= self.num_samples:
            raise ValueError(f"start_image={start_image} is outside the epoch's {self.num_samples} images")
        self.epoch, self.start_step, self.start_image = epoch, start_step, start_image

    def first_image(self) -> int:
        """Where in the permutation the next global batch starts."""
        return self.start_step * self.plan.global_batch if self.start_image is None else self.start_image

    def steps_left(self) -> int:
        """Global batches left in the epoch from :meth:`first_image` at the current batch plan."""
        return (self.num_samples - self.first_image()) // self.plan.global_batch

    def __len__(self) -> int:
        return self.steps_left() * self.plan.accum_steps

    def permutation(self) -> torch.Tensor:
        """The current epoch's permutation of the training set (int64, on the CPU)."""
        return epoch_permutation(self.num_samples, self.seed, self.epoch)

    def slices(self) -> list[tuple[int, int]]:
        """``(start, stop)`` into :meth:`permutation` of each of this worker's micro-batches, for
        the current epoch, start and plan, in the order ``__iter__`` yields them: micro-batch ``k``
        of the ``s``-th step from the start is ``first + s * global_batch + rank * per_worker_batch
        + k * micro_batch`` onwards, ``micro_batch`` long (``first``: :meth:`first_image`)."""
        p, first = self.plan, self.first_image()
        return [(lo, lo + p.micro_batch)
                for s in range(self.steps_left())
                for lo in range(first + s * p.global_batch + self.rank * p.per_worker_batch,
                                first + s * p.global_batch + (self.rank + 1) * p.per_worker_batch, p.micro_batch)]

    def __iter__(self) -> Iterator[list[int]]:
        epoch, size, perm, slices = self.epoch, self.image_size, self.permutation(), self.slices()
        for lo, hi in slices:
            yield Request(perm[lo:hi].tolist(), epoch, size)


def shard_range(num_samples: int, rank: int, world_size: int) -> range:
    """Contiguous, non-overlapping, unpadded shard of ``range(num_samples)`` for exact evaluation."""
    return range(num_samples * rank // world_size, num_samples * (rank + 1) // world_size)
