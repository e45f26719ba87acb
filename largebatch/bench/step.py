"""``step``: the engine's training step against a plain hand-written DDP loop.

Two cases: ``cnn`` on digits-sized (8x8) inputs and ``resnet18`` on 64x64 synthetic images. The
engine is the real :class:`~largebatch.engine.Trainer` built from a config, stepping through
:meth:`Trainer.run_step` as ``fit`` does (schedule, micro-batches, loss scaling, non-finite check,
the update, the per-step agreement on stopping). The plain loop is the textbook one: a second copy
of the same model in ``DistributedDataParallel`` with the same bucket size, ``torch.optim.SGD``
with the same settings, and ``zero_grad / forward / cross_entropy / backward / step``. Both take
the same micro-batch tensors, fetched once beforehand, so the data loader is not part of either.
Target: engine / plain <= 1.03.

With ``--noise-scale`` a second engine with ``train.noise_scale=true`` (docs/noise_scale.md) is
timed beside them, from the same weights and batches. One worker sees one batch size without
accumulation, so on one worker every arm then takes its micro-batch as 2 accumulation steps.
Target: engine with the noise scale / engine without <= 1.03.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import tempfile

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from largebatch.bench.timing import alternate, median, spread
from largebatch.config.loader import load_config
from largebatch.distributed import discover
from largebatch.distributed.wrap import unwrap
from largebatch.engine.guards import StopSignal

TARGET = 1.03
NOISE_TARGET = 1.03
CASES = {
    # name: (config overrides, micro-batch per worker, steps per timed round)
    "cnn, digits 8x8, micro-batch 64": (["model.name=cnn", "data.name=digits"], 64, 30),
    "resnet18, synthetic 64x64, micro-batch 32": (
        ["model.name=resnet18", "data.name=synthetic", "data.image_size=64", "data.num_samples=2048"], 32, 2),
}


def _case(ctx, overrides: list[str], micro_batch: int, steps: int) -> dict:
    from largebatch.engine import Trainer

    noise = getattr(ctx.args, "noise_scale", False)
    if noise and ctx.world_size == 1:  # one batch size per step without accumulation: two micro-batches
        overrides = [*overrides, f"train.max_micro_batch={max(1, micro_batch // 2)}"]
    with contextlib.ExitStack() as stack:
        trainers = []
        for extra in ([], ["train.noise_scale=true"]) if noise else ([],):
            tmp = stack.enter_context(tempfile.TemporaryDirectory())
            run_dir = ctx.comm.broadcast_object(tmp)  # rank 0's folder: the run lock lives there
            cfg = load_config(None, [*overrides, f"train.global_batch={micro_batch * ctx.world_size}",
                                     f"run.dir={run_dir}", f"comm.backend={ctx.args.backend}",
                                     f"comm.bucket_mb={ctx.args.bucket_mb:g}", "checkpoint.resume=never", *extra])
            torch.manual_seed(0)
            trainer = Trainer(cfg, discover())
            stack.callback(ctx.comm.barrier)  # every worker is done with rank 0's folder before it goes
            stack.callback(trainer.close)
            trainers.append(trainer)
        return _time(ctx, trainers[0], steps, trainers[1] if noise else None)


def _time(ctx, trainer, steps: int, noisy=None) -> dict:
    """Engine against the plain loop; with ``noisy`` (a trainer with train.noise_scale=true) that
    engine too, on the same batches."""
    bp = trainer.plan.phases[0].batch
    trainer.sampler.set_epoch(0, 0)
    batches = list(itertools.islice(iter(trainer.loader), bp.accum_steps * 4))
    plain_batches, stop = itertools.cycle(batches), StopSignal()

    def stepping(t):
        """``steps`` steps of trainer ``t`` through Trainer.run_step, over its own cycle of the batches."""
        own_batches, step_no = itertools.cycle(batches), itertools.count()

        def run():
            for _ in range(steps):
                t.run_step(own_batches, bp, next(step_no) % t.plan.total_steps, stop)
        return run

    # The plain loop: a copy of the same network with the same weights, in DDP with the same buckets.
    model = copy.deepcopy(unwrap(trainer.model))
    ddp = (DistributedDataParallel(model, bucket_cap_mb=ctx.args.bucket_mb, gradient_as_bucket_view=True)
           if ctx.comm.distributed else model)
    o = trainer.cfg.optim
    sgd = torch.optim.SGD(model.parameters(), lr=0.01, momentum=o.momentum, nesterov=o.nesterov,
                          weight_decay=o.weight_decay, foreach=True)

    def plain_loop():
        for _ in range(steps):
            sgd.zero_grad(set_to_none=True)
            for k in range(bp.accum_steps):
                x, y = next(plain_batches)
                last = k == bp.accum_steps - 1
                with contextlib.nullcontext() if last or not ctx.comm.distributed else ddp.no_sync():
                    F.cross_entropy(ddp(x), y).backward()
            sgd.step()

    tasks = {"engine": stepping(trainer), "plain DDP loop": plain_loop}
    if noisy is not None:
        tasks["engine + noise scale"] = stepping(noisy)
        noisy.model.train()
    trainer.model.train()
    model.train()
    times = alternate(tasks, ctx.args.rounds, before=ctx.comm.barrier, device=ctx.device,
                      reduce=ctx.mean_over_workers)
    e, p = median(times["engine"]) / steps, median(times["plain DDP loop"]) / steps
    row = {"engine_ms": e * 1e3, "plain_ms": p * 1e3, "ratio": e / p,
           "engine_p25_p75_ms": [t / steps * 1e3 for t in spread(times["engine"])],
           "plain_p25_p75_ms": [t / steps * 1e3 for t in spread(times["plain DDP loop"])],
           "micro_batch": bp.micro_batch, "accum_steps": bp.accum_steps, "steps_per_round": steps}
    if noisy is not None:
        n = median(times["engine + noise scale"]) / steps
        row.update(noise_ms=n * 1e3, noise_ratio=n / e,
                   noise_p25_p75_ms=[t / steps * 1e3 for t in spread(times["engine + noise scale"])])
    return row


def run(ctx) -> dict:
    rows = {name: _case(ctx, *case) for name, case in CASES.items()}
    worst = max(r["ratio"] for r in rows.values())
    accum = sorted({r["accum_steps"] for r in rows.values()})
    shown = "" if accum == [1] else f", every arm in {'/'.join(map(str, accum))} accumulation steps"
    lines = [f"{ctx.world_size} workers over {ctx.backend}; time per step, median of {ctx.args.rounds} rounds{shown}",
             f"{'case':<44} {'engine':>10} {'plain DDP':>10} {'ratio':>7}"]
    for name, r in rows.items():
        lines.append(f"{name:<44} {r['engine_ms']:>7.2f} ms {r['plain_ms']:>7.2f} ms {r['ratio']:>7.3f}")
    lines.append(f"target: engine / plain <= {TARGET}: {'met' if worst <= TARGET else 'NOT met'} (worst {worst:.3f})")
    result = {"cases": rows, "target": TARGET, "met": worst <= TARGET}
    if all("noise_ratio" in r for r in rows.values()):
        lines.append(f"{'with train.noise_scale=true':<44} {'engine':>10} {'+ noise':>10} {'ratio':>7}")
        for name, r in rows.items():
            lines.append(f"{name:<44} {r['engine_ms']:>7.2f} ms {r['noise_ms']:>7.2f} ms {r['noise_ratio']:>7.3f}")
        worst_noise = max(r["noise_ratio"] for r in rows.values())
        lines.append(f"target: noise scale on / off <= {NOISE_TARGET}: "
                     f"{'met' if worst_noise <= NOISE_TARGET else 'NOT met'} (worst {worst_noise:.3f})")
        result.update(noise_target=NOISE_TARGET, noise_met=worst_noise <= NOISE_TARGET)
    return {**result, "lines": lines}
