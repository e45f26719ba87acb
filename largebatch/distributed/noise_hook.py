"""The local gradient's squared norm, taken in DDP's communication hook before the allreduce.

The gradient noise scale (:mod:`largebatch.engine.noise`) needs ``|G_b|²``, the squared norm of
this worker's own gradient over its per-worker batch, and DDP averages the gradients in place,
bucket by bucket, while backward still runs: after ``backward()`` only the averaged gradient is
left. :func:`measuring` wraps any DDP communication hook (torch's allreduce, fp16 or bf16 hook,
PowerSGD, :class:`largebatch.distributed.mpi.AllreduceHook`) so that each bucket's squared norm is
added to a :class:`LocalSquaredNorm` on the device first, then the real hook runs on the untouched
bucket. The extra cost is one read of the gradient per step; nothing is read on the host.

Every parameter's gradient lies in exactly one bucket of each backward pass with an allreduce, so
the sum over buckets is the squared norm of the whole local gradient. Under gradient accumulation
DDP runs the hook on the last micro-batch only, when the buckets hold the accumulated per-worker
gradient.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch


def bucket_squared_norm(buffer: torch.Tensor) -> torch.Tensor:
    """|buffer|² as a 0-dim float32 tensor on its device (fp16/bf16 buckets summed in float32)."""
    return torch.linalg.vector_norm(buffer, dtype=torch.float32).square()


class LocalSquaredNorm:
    """The running sum of squared bucket norms of one backward pass, on the device.

    DDP calls its hook from the autograd engine while backward runs; :meth:`take` is called after
    ``backward()`` has returned (DDP has launched every bucket by then) and starts a new sum.
    """

    def __init__(self):
        self._total: Optional[torch.Tensor] = None
        self.buckets = 0
        """Buckets added since the last take (a check that the hook ran)."""

    def add(self, buffer: torch.Tensor) -> None:
        sq = bucket_squared_norm(buffer)
        self._total = sq if self._total is None else self._total + sq
        self.buckets += 1

    def take(self, device: Optional[torch.device] = None) -> torch.Tensor:
        """The sum since the last take (zero on ``device`` if no bucket came), and a fresh start."""
        total, self._total, self.buckets = self._total, None, 0
        if total is None:
            return torch.zeros((), dtype=torch.float32, device=device)
        return total

    def reset(self) -> None:
        self._total, self.buckets = None, 0


def measuring(hook: Callable, meter: LocalSquaredNorm) -> Callable:
    """``hook`` (a DDP communication hook ``(state, bucket) -> Future``) that first adds the
    bucket's squared norm to ``meter``. Register it as the hook itself would be:
    ``ddp.register_comm_hook(state, measuring(hook, meter))``."""

    def measured(state, bucket):  # no annotations: DDP compares them by identity
        meter.add(bucket.buffer())
        return hook(state, bucket)

    name = getattr(hook, "__name__", type(hook).__name__)
    measured.__name__ = measured.__qualname__ = f"measured_{name}"
    return measured


def default_allreduce_hook() -> Callable:
    """torch's allreduce hook: what DDP does without a hook (divide by the world size, allreduce)."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    return default_hooks.allreduce_hook
