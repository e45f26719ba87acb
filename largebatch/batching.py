"""Batch arithmetic, stated and checked in one place.

    global_batch = world_size * per_worker_batch
    per_worker_batch = micro_batch * accum_steps

The global batch is the number of images behind one optimizer step. Each worker (rank) takes a
contiguous ``per_worker_batch`` slice of it and pushes it through the model in ``accum_steps``
micro-batches of ``micro_batch`` images, accumulating gradients before one allreduce.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from largebatch.errors import UsageError


@dataclass(frozen=True)
class BatchPlan:
    global_batch: int
    """Images per optimizer step, over all workers."""
    world_size: int
    """Number of workers (ranks)."""
    per_worker_batch: int
    """Images per optimizer step on one worker = global_batch / world_size."""
    micro_batch: int
    """Images in one forward/backward pass on one worker."""
    accum_steps: int
    """Micro-batches per optimizer step on one worker = per_worker_batch / micro_batch."""

    def __post_init__(self):
        assert self.global_batch == self.world_size * self.per_worker_batch, self
        assert self.per_worker_batch == self.micro_batch * self.accum_steps, self


def nearest_multiples(value: int, divisor: int) -> list[int]:
    """The multiples of ``divisor`` just below and above ``value`` (positive ones only)."""
    below = (value // divisor) * divisor
    above = below + divisor
    return [m for m in (below, above) if m > 0]


def plan(global_batch: int, world_size: int, max_micro_batch: Optional[int] = None) -> BatchPlan:
    """Split ``global_batch`` over ``world_size`` workers, with micro-batches of at most ``max_micro_batch``.

    The micro-batch is the largest divisor of the per-worker batch that is not above the cap, so
    every micro-batch has the same size and the gradient is exactly the global-batch mean.
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise UsageError(f"world size {world_size!r} is not allowed: use an integer >= 1")
    if not isinstance(global_batch, int) or global_batch < 1:
        raise UsageError(f"train.global_batch={global_batch!r} is not allowed: use an integer >= 1")
    if max_micro_batch is not None and (not isinstance(max_micro_batch, int) or max_micro_batch < 1):
        raise UsageError(f"train.max_micro_batch={max_micro_batch!r} is not allowed: use null or an integer >= 1")
    if global_batch % world_size:
        choices = " or ".join(str(m) for m in nearest_multiples(global_batch, world_size))
        raise UsageError(f"train.global_batch={global_batch} is not divisible by the world size {world_size}; "
                         f"use a multiple of {world_size}, e.g. {choices}")
    per_worker = global_batch // world_size
    cap = per_worker if max_micro_batch is None else min(max_micro_batch, per_worker)
    micro = max(d for d in range(1, cap + 1) if per_worker % d == 0)
    return BatchPlan(global_batch=global_batch, world_size=world_size, per_worker_batch=per_worker,
                     micro_batch=micro, accum_steps=per_worker // micro)
