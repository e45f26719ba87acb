"""``buckets``: what ``comm.bucket_mb=auto`` picks, against every bucket size timed side by side.

The engine's tuner (:func:`largebatch.engine.bucket_tuning.tune_bucket_size`) runs first, as a
run with ``comm.bucket_mb=auto`` runs it: the best of 3 rounds of one timed pass per size. Then
each candidate size (and DDP's 25 MiB default, if not among them) gets its own copy of the model
in DDP, and their
synchronised forward+backward passes are timed over ``--rounds`` alternating rounds, the longer
measurement the tuner's short one stands in for. The result: the tuner's pick as a ratio of the
fastest size found here, and of the 25 MiB default.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from largebatch.bench.timing import alternate, median
from largebatch.config.schema import CommConfig
from largebatch.distributed.wrap import wrap_model
from largebatch.engine.bucket_tuning import candidate_sizes, gradient_mb, tune_bucket_size
from largebatch.models import create_model

DDP_DEFAULT_MB = 25.0
CANDIDATES_MB = tuple(CommConfig().bucket_candidates_mb)
"""comm.bucket_candidates_mb's default."""


def run(ctx) -> dict:
    dev, a = ctx.device, ctx.args
    torch.manual_seed(0)
    model = create_model(a.step_model, 10).to(dev)
    shape = (3, a.image_size, a.image_size)
    choice = tune_bucket_size(ctx.comm, model, CANDIDATES_MB, a.micro_batch, shape, 10, dev)
    sizes = sorted(set(candidate_sizes(CANDIDATES_MB, gradient_mb(model))) | {DDP_DEFAULT_MB})  # 25 if not tried
    g = torch.Generator().manual_seed(ctx.rank)
    x = torch.randn(a.micro_batch, *shape, generator=g).to(dev)
    y = torch.randint(0, 10, (a.micro_batch,), generator=g).to(dev)

    def pass_with(ddp: nn.Module, bare: nn.Module):
        def one():
            nn.functional.cross_entropy(ddp(x), y).backward()
            bare.zero_grad(set_to_none=True)
        return one

    tasks = {}
    for size in sizes:
        bare = copy.deepcopy(model)
        tasks[size] = pass_with(wrap_model(ctx.comm, bare, bucket_mb=size), bare)
    times = alternate(tasks, a.rounds, before=ctx.comm.barrier, device=dev, reduce=ctx.max_over_workers)
    ms = {size: median(times[size]) * 1e3 for size in sizes}
    fastest = min(ms, key=ms.get)
    vs_fastest, vs_default = ms[choice.bucket_mb] / ms[fastest], ms[choice.bucket_mb] / ms[DDP_DEFAULT_MB]
    lines = [f"{a.step_model}, micro-batch {a.micro_batch} of {a.image_size}x{a.image_size}, "
             f"{choice.gradient_mb:.1f} MiB of gradients, {ctx.world_size} workers over {ctx.backend}; "
             f"forward+backward, median of {a.rounds} rounds, slowest worker",
             f"{'bucket size':>12} {'per pass':>10} {'vs fastest':>11}  {'tuner (best of 3)':>18}"]
    for size in sizes:
        tuned = f"{1e3 * choice.seconds[size]:>15.1f} ms" if size in choice.seconds else ""
        marks = [m for m, on in (("auto's pick", size == choice.bucket_mb), ("fastest", size == fastest),
                                 ("DDP default", size == DDP_DEFAULT_MB)) if on]
        lines.append(f"{size:>8g} MiB {ms[size]:>7.1f} ms {ms[size] / ms[fastest]:>11.3f}  {tuned:>18}"
                     + (f"  <- {', '.join(marks)}" if marks else ""))
    lines.append(f"auto picked {choice.bucket_mb:g} MiB: {vs_fastest:.3f}x the fastest size ({fastest:g} MiB), "
                 f"{vs_default:.3f}x DDP's {DDP_DEFAULT_MB:g} MiB default")
    return {"model": a.step_model, "micro_batch": a.micro_batch, "image_size": a.image_size,
            "workers": ctx.world_size, "backend": ctx.backend, "gradient_mb": choice.gradient_mb,
            "ms_per_pass": {f"{s:g}": v for s, v in ms.items()},
            "tuner_ms": {f"{s:g}": 1e3 * v for s, v in choice.seconds.items()},
            "auto_mb": choice.bucket_mb, "fastest_mb": fastest, "auto_vs_fastest": vs_fastest,
            "auto_vs_default": vs_default, "lines": lines}
