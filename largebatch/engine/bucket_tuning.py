"""``comm.bucket_mb: auto``: time a few DDP bucket sizes on the run's own model, keep the fastest.

The bucket size trades overlap against per-call cost. Small buckets start their allreduce early,
while backward is still running, but each call pays the backend's latency; large buckets pay it
rarely but wait for more of backward to finish. DDP's 25 MiB suits NCCL on a fast GPU link and is
often wrong elsewhere: a CPU cluster over Ethernet, an MPI library with another crossover point,
a model of a few MiB (one bucket, no overlap) or of several GiB.

Before the first step, each candidate size wraps the model in DDP and runs synchronised
forward+backward passes on one micro-batch of the run's shape: the first phase's micro-batch and
image size, random pixels (the time of a dense network does not depend on them), and the
configured precision and gradient compression. The candidates take turns over a few rounds, the
order rotated each round, so that a slow spell of the machine does not fall on one of them. Each
turn wraps the model afresh and times one pass after the untimed ones a fresh wrapper needs: DDP
builds its buckets in the first pass and lays them out again, in the order the gradients became
ready, in the second; PowerSGD, started at the third, allocates its state there, so it is timed
at the fourth. A candidate's time is the shortest of its turns (other work on the machine only
ever adds time), taken on its slowest worker (the allreduce holds every worker to it); the times
are gathered, so every worker makes the same choice. Ties go to the larger size, which makes
fewer calls.

The cost is ``ROUNDS x candidates x (WARMUP_PASSES + 1)`` passes of one micro-batch (45 for
ResNet-50's 97.5 MiB and the six default candidates), printed as ``tuning_s``. The data loader's
processes have not started yet, so the passes have the cores to themselves. A resumed run takes
the size from its checkpoint instead of timing again, so that it stays the same run.

The weights, the BatchNorm statistics, the gradients and the random number state are put back
afterwards: a run with ``bucket_mb: auto`` is the same run as one with the size it chose.
"""

from __future__ import annotations

import contextlib
import gc
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from largebatch.distributed import Communicator
from largebatch.distributed.wrap import wrap_model
from largebatch.engine.checkpoint import rng_state, set_rng_state

ROUNDS = 3
"""Rounds over the candidates, the order rotated each round; a candidate's time is its shortest."""
WARMUP_PASSES = 2
"""Untimed passes per turn: the first builds DDP's buckets, the second lays them out again
(PowerSGD adds one: it compresses from the third)."""
MIB = 2**20


@dataclass
class BucketChoice:
    """The bucket size a run uses under ``comm.bucket_mb: auto``, and how it was found."""

    bucket_mb: float
    """The chosen size, in MiB."""
    gradient_mb: float
    """The model's gradient size, in MiB."""
    seconds: dict[float, float] = field(default_factory=dict)
    """{candidate MiB: shortest seconds per forward+backward pass on the slowest worker}; empty when
    nothing was timed (one candidate, or the size came from a checkpoint)."""
    tuning_s: float = 0.0
    """Wall seconds the timing took."""
    from_checkpoint: bool = False
    """The size was chosen when the run started and read back from its checkpoint."""

    def line(self) -> str:
        """The choice and the times behind it, for the run header."""
        head = f"{_mb(self.bucket_mb)} MiB (comm.bucket_mb=auto"
        if self.from_checkpoint:
            return f"{head}: chosen when the run started, read from the checkpoint)"
        if not self.seconds:
            return f"{head}: the only candidate, as the gradients are {self.gradient_mb:.3g} MiB)"
        times = ", ".join(f"{_mb(size)}: {1e3 * t:.1f}" for size, t in self.seconds.items())
        return (f"{head} over {self.gradient_mb:.3g} MiB of gradients in {self.tuning_s:.1f}s; "
                f"ms per pass, slowest worker: {times})")

    def record(self) -> dict:
        """The metrics.jsonl fields."""
        return dict(bucket_mb=self.bucket_mb, gradient_mb=self.gradient_mb, candidates_mb=list(self.seconds),
                    ms_per_pass=[1e3 * t for t in self.seconds.values()], tuning_s=self.tuning_s,
                    from_checkpoint=self.from_checkpoint)


def _mb(size: float) -> str:
    return f"{size:g}"


def gradient_mb(model: nn.Module) -> float:
    """MiB of gradients one backward pass produces (the bytes DDP's buckets hold)."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad) / MIB


def candidate_sizes(sizes: Sequence[float], grad_mb: float) -> list[float]:
    """The sizes worth timing, ascending: those below the gradient size, and the smallest of those
    at or above it (they all give the same buckets: one, or one beside DDP's 1 MiB first bucket
    where the torch version keeps it)."""
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


def tune_bucket_size(comm: Communicator, model: nn.Module, candidates_mb: Sequence[float], micro_batch: int,
                     input_shape: tuple[int, ...], num_classes: int, device: torch.device,
                     autocast: Callable = contextlib.nullcontext) -> BucketChoice:
    """Time ``candidates_mb`` on ``model`` (not yet wrapped) through ``comm``; see the module text.

    ``input_shape`` is one image's (channels, height, width); ``autocast`` a context factory for
    the forward pass (the run's precision). Every worker calls this, with the same arguments.
    """
    grad_mb = gradient_mb(model)
    sizes = candidate_sizes(candidates_mb, grad_mb)
    if len(sizes) == 1 or not comm.distributed:
        return BucketChoice(sizes[0], grad_mb)
    t0 = time.perf_counter()
    saved_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    saved_rng = rng_state(device)
    was_training = model.training
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((micro_batch, *input_shape), generator=generator).to(device)
    y = torch.randint(0, num_classes, (micro_batch,), generator=generator).to(device)
    times: dict = {size: [] for size in sizes}
    try:
        model.train()
        for r in range(ROUNDS):
            for size in sizes[r % len(sizes):] + sizes[:r % len(sizes)]:
                times[size].append(_time_one(comm, model, size, x, y, device, autocast))
    finally:
        model.zero_grad(set_to_none=True)
        model.load_state_dict(saved_state)
        set_rng_state(saved_rng, device)
        model.train(was_training)
    mine = {size: min(seconds) for size, seconds in times.items()}
    best, slowest = choose(comm.all_gather_object(mine))
    return BucketChoice(best, grad_mb, slowest, tuning_s=time.perf_counter() - t0)


def _time_one(comm: Communicator, model: nn.Module, size: float, x: torch.Tensor, y: torch.Tensor,
              device: torch.device, autocast: Callable) -> float:
    """Seconds of one synchronised forward+backward pass with buckets of ``size`` MiB, after the
    untimed ones a fresh DDP wrapper needs."""
    ddp = wrap_model(comm, model, bucket_mb=size, powersgd_start_step=WARMUP_PASSES, sync_weights=False)
    untimed = WARMUP_PASSES + (comm.compression == "powersgd")
    try:
        for _ in range(untimed + 1):
            _sync(device)
            t0 = time.perf_counter()
            with autocast():
                logits = ddp(x)
            F.cross_entropy(logits.float(), y).backward()
            _sync(device)
            seconds = time.perf_counter() - t0
            model.zero_grad(set_to_none=True)
    finally:
        # DDP's reducer takes its autograd hooks away when it is freed; nothing else may hold it.
        del ddp
        gc.collect()
    return seconds


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)

