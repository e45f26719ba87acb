"""Batch arithmetic, stated and checked in one place.

    global_batch = world_size * per_worker_batch
    per_worker_batch = micro_batch * accum_steps

The global batch is the number of images behind one optimizer step. Each worker (rank) takes a
contiguous ``per_worker_batch`` slice of it and pushes it through the model in ``accum_steps``
micro-batches of ``micro_batch`` images, accumulating gradients before one allreduce.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from largebatch.errors import UsageError

SMALL_MICRO_BATCH = 8
"""A micro-batch below this many images (or below train.max_micro_batch, when the cap is smaller)
is warned about: BatchNorm statistics over so few images are mostly noise, and each pass leaves
the device idle. So is one below half of the cap, which happens when the per-worker batch has no
divisor near the cap (97 images per worker under a cap of 64 give 97 passes of 1 image)."""


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
    micro = micro_batch_of(per_worker, max_micro_batch)
    return BatchPlan(global_batch=global_batch, world_size=world_size, per_worker_batch=per_worker,
                     micro_batch=micro, accum_steps=per_worker // micro)


def micro_batch_of(per_worker: int, max_micro_batch: Optional[int] = None) -> int:
    """The largest divisor of ``per_worker`` that is not above ``max_micro_batch`` (None: no cap)."""
    cap = per_worker if max_micro_batch is None else min(max_micro_batch, per_worker)
    best = 1
    for d in range(1, math.isqrt(per_worker) + 1):
        if per_worker % d == 0:
            for divisor in (d, per_worker // d):
                if best < divisor <= cap:
                    best = divisor
    return best


def _small_limit(max_micro_batch: Optional[int]) -> int:
    return SMALL_MICRO_BATCH if max_micro_batch is None else min(SMALL_MICRO_BATCH, max_micro_batch)


def is_sensible(per_worker: int, max_micro_batch: Optional[int] = None) -> bool:
    """Whether ``per_worker`` images split into micro-batches of at least :data:`SMALL_MICRO_BATCH`
    images (or the cap, if smaller) and, when the cap splits them, of at least half the cap."""
    micro = micro_batch_of(per_worker, max_micro_batch)
    if micro < _small_limit(max_micro_batch):
        return False
    return max_micro_batch is None or per_worker <= max_micro_batch or 2 * micro >= max_micro_batch


def nearest_sensible(global_batch: int, world_size: int, max_micro_batch: Optional[int] = None) -> list[int]:
    """The global batches nearest ``global_batch`` (one below, one above, where they exist) whose
    per-worker batch is :func:`is_sensible` on ``world_size`` workers."""
    per_worker = global_batch // world_size
    found = []
    for p in range(per_worker - 1, 0, -1):
        if is_sensible(p, max_micro_batch):
            found.append(p * world_size)
            break
    p = per_worker + 1
    while not is_sensible(p, max_micro_batch):  # ends by a multiple of the cap, or at SMALL_MICRO_BATCH
        p += 1
    return found + [p * world_size]


def _describe(global_batch: int, world_size: int, max_micro_batch: Optional[int]) -> str:
    p = plan(global_batch, world_size, max_micro_batch)
    return f"{global_batch} (micro-batch {p.micro_batch} x {p.accum_steps})"


def suggestion(p: BatchPlan, max_micro_batch: Optional[int] = None, key: str = "train.global_batch") -> str:
    """``key=A (micro-batch a x n) or B (...)``: the nearest sensible global batches for ``p``'s world."""
    near = nearest_sensible(p.global_batch, p.world_size, max_micro_batch)
    return f"{key}=" + " or ".join(_describe(g, p.world_size, max_micro_batch) for g in near)


def _shape(p: BatchPlan, key: str, max_micro_batch: Optional[int]) -> str:
    cap = "" if max_micro_batch is None else f", train.max_micro_batch={max_micro_batch}"
    return (f"{key}={p.global_batch} on {p.world_size} worker(s){cap} gives {p.per_worker_batch} image(s) per "
            f"worker, split into {p.accum_steps} micro-batch(es) of {p.micro_batch}")


def plan_warning(p: BatchPlan, max_micro_batch: Optional[int] = None, key: str = "train.global_batch") -> Optional[str]:
    """One line about a plan that trains but badly (see :data:`SMALL_MICRO_BATCH`), with the nearest
    sensible global batches; None for a sensible plan."""
    if is_sensible(p.per_worker_batch, max_micro_batch):
        return None
    limit = _small_limit(max_micro_batch)
    if p.micro_batch < limit:
        why = f"micro-batches below {limit} images"
    else:
        why = (f"micro-batches below half of train.max_micro_batch ({p.per_worker_batch} has no divisor from "
               f"{(max_micro_batch + 1) // 2} to {max_micro_batch})")
    return (f"{_shape(p, key, max_micro_batch)}: {why} give slow steps (and noisy statistics in any BatchNorm layer); "
            f"nearest sensible: {suggestion(p, max_micro_batch, key)}")


def check_trainable_batch(p: BatchPlan, has_batchnorm: bool, max_micro_batch: Optional[int] = None,
                          key: str = "train.global_batch") -> None:
    """Refuse (UsageError) a plan that cannot train: micro-batches of one image through BatchNorm in
    training mode, which normalises each channel over a single value."""
    if has_batchnorm and p.micro_batch == 1:
        raise UsageError(f"{_shape(p, key, max_micro_batch)}, and the model's BatchNorm cannot train on one "
                         f"image at a time; use {suggestion(p, max_micro_batch, key)}, or model.norm=none")
