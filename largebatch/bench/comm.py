"""``allreduce`` and ``overlap``: the gradient allreduce as the engine runs it.

``allreduce``: bus bandwidth (nccl-tests' definition: busbw = bytes / time x 2(n-1)/n) of the
gradients of ``--model`` (ResNet-50: 25.6M float32 values, 102 MB) averaged the engine's way,
through the model wrapper the trainer uses (DDP buckets of ``comm.bucket_mb`` through the configured
backend), against one flat allreduce of the same bytes on the same backend, the backend's ceiling.
The engine's time is a backward pass with synchronisation minus the same pass without it
(``no_sync``), so the cost of writing the gradients is not counted as communication. Target:
at least 0.9 of the ceiling. With ``--compression`` the engine's allreduce is compressed and the
ceiling is not, which shows what compression buys (its bus bandwidth counts the uncompressed bytes).

``overlap``: compute only (forward and backward without synchronisation) against the full
synchronised step, for a real model on synthetic images; with the allreduce time of the same
gradients, the share of communication hidden behind backward is
1 - (full - compute) / allreduce.
"""

from __future__ import annotations

import torch
from torch import nn

from largebatch.bench.timing import alternate, median
from largebatch.distributed.wrap import no_sync, wrap_model
from largebatch.models import create_model

ALLREDUCE_TARGET = 0.9


class _Gradients(nn.Module):
    """The parameters of a model, with a loss whose backward only writes ones into every gradient."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.weights = nn.ParameterList(nn.Parameter(p.detach().clone()) for p in model.parameters())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * sum(p.sum() for p in self.weights)


def _busbw(nbytes: int, seconds: float, n: int) -> float:
    return nbytes / seconds * 2 * (n - 1) / n / 1e9


def run_allreduce(ctx) -> dict:
    n, dev = ctx.world_size, ctx.device
    grads = _Gradients(create_model(ctx.args.model, 1000)).to(dev)
    nbytes = sum(p.numel() * p.element_size() for p in grads.parameters())
    ddp = wrap_model(ctx.comm, grads)
    one = torch.ones((), device=dev)
    flat = torch.randn(nbytes // 4, device=dev)

    def synced():
        ddp(one).backward()

    def unsynced():
        with no_sync(ddp):
            ddp(one).backward()

    tasks = {"engine (bucketed)": synced, "backward only": unsynced,
             "flat allreduce": lambda: ctx.comm.all_reduce_sum(flat)}
    times = alternate(tasks, ctx.args.rounds, before=ctx.comm.barrier, device=dev, reduce=ctx.mean_over_workers)
    engine = median(times["engine (bucketed)"]) - median(times["backward only"])
    ceiling = median(times["flat allreduce"])
    ratio = ceiling / engine if engine > 0 else float("inf")
    result = {"model": ctx.args.model, "bytes": nbytes, "workers": n, "backend": ctx.backend,
              "compression": ctx.args.compression,
              "bucket_mb": ctx.args.bucket_mb, "engine_ms": engine * 1e3, "flat_ms": ceiling * 1e3,
              "engine_busbw_gbps": _busbw(nbytes, engine, n), "flat_busbw_gbps": _busbw(nbytes, ceiling, n),
              "ratio": ratio, "target": ALLREDUCE_TARGET, "met": ratio >= ALLREDUCE_TARGET}
    result["lines"] = [
        f"{ctx.args.model} gradients: {nbytes / 1e6:.1f} MB float32, {n} workers over {ctx.backend}, "
        f"buckets of {ctx.args.bucket_mb:g} MiB, compression {ctx.args.compression}",
        f"{'allreduce':<20} {'time':>10} {'busbw':>12}",
        f"{'engine (bucketed)':<20} {engine * 1e3:>7.1f} ms {result['engine_busbw_gbps']:>7.2f} GB/s",
        f"{'flat (ceiling)':<20} {ceiling * 1e3:>7.1f} ms {result['flat_busbw_gbps']:>7.2f} GB/s",
        f"engine / ceiling: {ratio:.2f} (target >= {ALLREDUCE_TARGET}: {'met' if result['met'] else 'NOT met'})",
    ]
    return result


def run_overlap(ctx) -> dict:
    dev = ctx.device
    torch.manual_seed(0)
    model = create_model(ctx.args.step_model, 10).to(dev)
    ddp = wrap_model(ctx.comm, model)
    g = torch.Generator().manual_seed(ctx.rank)
    x = torch.randn(ctx.args.micro_batch, 3, ctx.args.image_size, ctx.args.image_size, generator=g).to(dev)
    y = torch.randint(0, 10, (ctx.args.micro_batch,), generator=g).to(dev)
    flat = torch.zeros(sum(p.numel() for p in model.parameters()), device=dev)

    def step():
        nn.functional.cross_entropy(ddp(x), y).backward()

    def compute():
        with no_sync(ddp):
            step()

    tasks = {"compute only": compute, "full step": step, "allreduce only": lambda: ctx.comm.all_reduce_sum(flat)}
    times = alternate(tasks, ctx.args.rounds, before=ctx.comm.barrier, device=dev, reduce=ctx.mean_over_workers)
    t_compute, t_full, t_comm = (median(times[k]) for k in tasks)
    exposed = max(0.0, t_full - t_compute)
    hidden = min(1.0, max(0.0, 1 - exposed / t_comm)) if t_comm > 0 else 1.0
    result = {"model": ctx.args.step_model, "micro_batch": ctx.args.micro_batch, "image_size": ctx.args.image_size,
              "workers": ctx.world_size, "backend": ctx.backend, "compute_ms": t_compute * 1e3,
              "full_ms": t_full * 1e3, "allreduce_ms": t_comm * 1e3, "exposed_ms": exposed * 1e3,
              "hidden_share": hidden}
    result["lines"] = [
        f"{ctx.args.step_model}, micro-batch {ctx.args.micro_batch} of {ctx.args.image_size}x{ctx.args.image_size}, "
        f"{ctx.world_size} workers over {ctx.backend}",
        f"{'compute only (forward+backward)':<34} {t_compute * 1e3:>8.1f} ms",
        f"{'full synchronised step':<34} {t_full * 1e3:>8.1f} ms",
        f"{'allreduce of the gradients alone':<34} {t_comm * 1e3:>8.1f} ms",
        f"communication exposed {exposed * 1e3:.1f} ms; hidden behind backward: {hidden:.0%}",
    ]
    return result
