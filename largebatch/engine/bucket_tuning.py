"""``comm.bucket_mb: auto``: time a few DDP bucket sizes on the run's own model, keep the fastest.

The bucket size trades overlap against per-call cost. Small buckets start their allreduce early,
while backward is still running, but each call pays the backend's latency; large buckets pay it
rarely but wait for more of backward to finish. DDP's 25 MiB suits NCCL on a fast GPU link and is
often wrong elsewhere: a CPU cluster over Ethernet, an MPI library with another crossover point,
a model of a few MiB (one bucket, no overlap) or of several GiB.

Before the first step, each candidate size wraps the model in DDP and runs synchronised
forward+backward passes on one micro-batch of the run's shape: the first phase's micro-batch and
image size, random pixels (the time of a dense network does not depend on them), the configured
precision and gradient compression (PowerSGD compressing from the third pass). The first two
passes of each size are not timed: DDP lays its buckets out again after the first pass, in the
order the gradients became ready. A candidate's time is the median of the timed passes on its
slowest worker (the allreduce holds every worker to it); the times are gathered, so every worker
makes the same choice. Ties go to the larger size, which makes fewer calls.

The weights, the BatchNorm statistics, the gradients and the random number state are put back
afterwards: a run with ``bucket_mb: auto`` is the same run as one with the size it chose.
"""

from __future__ import annotations

import contextlib
import gc
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from largebatch.engine import checkpoint as ckpt

WARMUP_PASSES = 2
"""Untimed passes per candidate: the first builds DDP's buckets, the second runs on the rebuilt ones."""
TIMED_PASSES = 3
"""Timed passes per candidate; the median is kept."""
MIB = 2**20


@dataclass
class BucketChoice:
    bucket_mb: float
    """The chosen size, in MiB."""
    gradient_mb: float
    """The model's gradient size, in MiB."""
    seconds: dict
    """{candidate MiB: median seconds per forward+backward pass on the slowest worker}; empty when
    there was only one candidate to take."""

    def line(self) -> str:
        """The choice and the times behind it, for the run header."""
        if not self.seconds:
            return (f"{_mb(self.bucket_mb)} MiB (comm.bucket_mb=auto: one candidate, the gradients are "
                    f"{self.gradient_mb:.3g} MiB)")
        times = ", ".join(f"{_mb(size)}: {1e3 * t:.1f}" for size, t in self.seconds.items())
        return (f"{_mb(self.bucket_mb)} MiB (comm.bucket_mb=auto over {self.gradient_mb:.3g} MiB of gradients; "
                f"ms per pass, slowest worker: {times})")


def _mb(size: float) -> str:
    return f"{size:g}"


def gradient_mb(model: nn.Module) -> float:
    """MiB of gradients one backward pass produces (the bytes DDP's buckets hold)."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad) / MIB


def candidate_sizes(sizes: Sequence[float], grad_mb: float) -> list[float]:
    """The sizes worth timing, ascending: those below the gradient size, and the smallest of those
    at or above it (they all make one bucket)."""
    ordered = sorted({float(s) for s in sizes})
    below = [s for s in ordered if s < grad_mb]
    above = [s for s in ordered if s >= grad_mb]
    return below + above[:1]


def choose(seconds_per_worker: list[dict]) -> tuple[float, dict]:
    """The candidate with the lowest time on its slowest worker (ties: the larger size), and those
    slowest-worker times."""
    slowest = {size: max(times[size] for times in seconds_per_worker) for size in seconds_per_worker[0]}
    best = min(slowest, key=lambda size: (slowest[size], -size))
    return best, slowest


def tune_bucket_size(comm, model: nn.Module, candidates_mb: Sequence[float], micro_batch: int,
                     input_shape: tuple[int, ...], num_classes: int, device: torch.device,
                     autocast: Callable = contextlib.nullcontext) -> BucketChoice:
    """Time ``candidates_mb`` on ``model`` (not yet wrapped) through ``comm``; see the module text.

    ``input_shape`` is one image's (channels, height, width); ``autocast`` a context factory for
    the forward pass (the run's precision). Every worker calls this, with the same arguments.
    """
    grad_mb = gradient_mb(model)
    sizes = candidate_sizes(candidates_mb, grad_mb)
    if len(sizes) == 1 or not comm.distributed:
        return BucketChoice(sizes[0], grad_mb, {})
    saved_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    saved_rng = ckpt.rng_state(device)
    was_training = model.training
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((micro_batch, *input_shape), generator=generator).to(device)
    y = torch.randint(0, num_classes, (micro_batch,), generator=generator).to(device)
    mine = {}
    try:
        model.train()
        for size in sizes:
            mine[size] = _time_one(comm, model, size, x, y, device, autocast)
    finally:
        model.zero_grad(set_to_none=True)
        model.load_state_dict(saved_state)
        ckpt.set_rng_state(saved_rng, device)
        model.train(was_training)
    best, slowest = choose(comm.all_gather_object(mine))
    return BucketChoice(best, grad_mb, slowest)


def _time_one(comm, model: nn.Module, size: float, x: torch.Tensor, y: torch.Tensor, device: torch.device,
              autocast: Callable) -> float:
    """Median seconds of a synchronised forward+backward pass with buckets of ``size`` MiB."""
    ddp = comm.wrap_model(model, bucket_mb=size, powersgd_start_step=WARMUP_PASSES)
    times = []
    try:
        for i in range(WARMUP_PASSES + TIMED_PASSES):
            _sync(device)
            t0 = time.perf_counter()
            with autocast():
                logits = ddp(x)
            F.cross_entropy(logits.float(), y).backward()
            _sync(device)
            if i >= WARMUP_PASSES:
                times.append(time.perf_counter() - t0)
            model.zero_grad(set_to_none=True)
    finally:
        # DDP's reducer takes its autograd hooks away when it is freed; nothing else may hold it.
        del ddp
        gc.collect()
    return statistics.median(times)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)

