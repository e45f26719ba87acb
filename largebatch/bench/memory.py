"""``memory``: peak resident memory per worker, the engine against a plain DDP loop, as the global
batch grows at a fixed micro-batch, and the bytes each worker holds under each ``comm.shard`` mode.

Peak resident memory only grows during a process's life, so every figure comes from fresh workers:
rank 0 starts a group of workers per measurement (``python -m largebatch.bench.memory_worker``
under torchrun), and each worker reports its ``ru_maxrss`` after the steps. The engine is the real
Trainer stepping through ``run_step``; the plain loop is DDP and ``torch.optim.SGD`` on the same
dataset and micro-batch. Three cases (``--memory-cases``, all by default):

- ``engine``: resnet18, engine / plain peak <= 1.05.
- ``accumulation``: with gradient accumulation the engine's peak stays flat from a global batch of
  1K to 32K (within 1.05).
- ``shard``: ``--shard-model`` (ResNet-50, 1000 classes) with LAMB under comm.shard none, optimizer
  and full, each worker's bytes of parameters, gradients and optimizer state counted from what it
  holds (the local shards of FSDP2's DTensors; the state of ZeroRedundancyOptimizer's inner
  optimizer), and its peak. Targets on more than one worker: optimizer state per worker under
  ``optimizer`` <= 0.55x that under ``none``, and parameters + gradients + optimizer state under
  ``full`` <= 0.55x. ``--image-size`` (32), ``--micro-batch`` (8) and ``--steps`` (3) set its run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

TARGET = 1.05
FLAT_TOLERANCE = 1.05
COMPARE = ["model.name=resnet18", "data.name=synthetic", "data.image_size=64", "data.num_samples=1024",
           "train.global_batch=64"]
GROWING = ["model.name=cnn", "data.name=synthetic", "data.image_size=32", "train.max_micro_batch=32"]
GLOBAL_BATCHES = (1024, 4096, 16384, 32768)
CASES = ("engine", "accumulation", "shard")
SHARD_MODES = ("none", "optimizer", "full")
SHARD_TARGET = 0.55
"""Sharded / unsharded bytes per worker on 2 workers: half, and some room for uneven shards."""
SHARD_DEFAULTS = {"image_size": 32, "micro_batch": 8, "steps": 3}


def _measure(mode: str, overrides: list[str], steps: int, workers: int) -> list:
    """What each worker of a fresh group reports: its peak resident MiB (engine, plain), or a dict
    of its bytes and peak (shard)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rss.json")
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
               and not k.startswith("TORCHELASTIC")}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={workers}",
               "-m", "largebatch.bench.memory_worker", mode, out, str(steps), f"run.dir={tmp}/run", *overrides]
        p = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"memory run {mode} {overrides} failed:\n{p.stderr[-3000:]}")
        with open(out) as f:
            return json.load(f)


def parse_cases(text: str | None) -> list[str]:
    """``--memory-cases``: a comma-separated subset of CASES (None: all)."""
    from largebatch.errors import UsageError

    if text is None:
        return list(CASES)
    cases = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown or not cases:
        raise UsageError(f"--memory-cases {text!r}: {'unknown case ' + repr(unknown[0]) if unknown else 'empty'}; "
                         f"choose from {', '.join(CASES)}, comma-separated")
    return [c for c in CASES if c in cases]


def _mib(n: float) -> str:
    return f"{n / 2 ** 20:.1f}"


def shard_case(args, workers: int) -> dict:
    """The bytes each worker holds under each comm.shard mode, and the targets."""
    model = getattr(args, "shard_model", None) or "resnet50"
    size = getattr(args, "case_image_size", None) or SHARD_DEFAULTS["image_size"]
    micro = getattr(args, "case_micro_batch", None) or SHARD_DEFAULTS["micro_batch"]
    steps = getattr(args, "steps", None) or SHARD_DEFAULTS["steps"]
    global_batch = micro * workers
    overrides = [f"model.name={model}", "data.name=synthetic", "data.num_classes=1000", f"data.image_size={size}",
                 f"data.num_samples={max(256, 2 * global_batch * steps)}", f"train.global_batch={global_batch}",
                 "optim.name=lamb"]
    rows = {mode: _measure("shard", [*overrides, f"comm.shard={mode}"], steps, workers) for mode in SHARD_MODES}
    for mode in SHARD_MODES:
        for r in rows[mode]:
            r["total_bytes"] = r["parameter_bytes"] + r["gradient_bytes"] + r["optimizer_bytes"]

    def largest(mode: str, key: str) -> int:
        return max(r[key] for r in rows[mode])

    optimizer_ratio = largest("optimizer", "optimizer_bytes") / largest("none", "optimizer_bytes")
    full_ratio = largest("full", "total_bytes") / largest("none", "total_bytes")
    targeted = workers > 1
    lines = [f"{model} (1000 classes) with lamb, synthetic {size}x{size}, micro-batch {micro}, {steps} steps, "
             f"{workers} workers, fresh processes; MiB this worker holds (local shards) and its peak resident MiB",
             f"{'comm.shard':<10} {'worker':>6} {'parameters':>11} {'gradients':>10} {'optimizer':>10} "
             f"{'total':>9} {'peak':>9}"]
    for mode in SHARD_MODES:
        for rank, r in enumerate(rows[mode]):
            lines.append(f"{mode:<10} {rank:>6} {_mib(r['parameter_bytes']):>11} {_mib(r['gradient_bytes']):>10} "
                         f"{_mib(r['optimizer_bytes']):>10} {_mib(r['total_bytes']):>9} {r['peak_mib']:>9.1f}")

    def verdict(ratio: float) -> str:
        if not targeted:
            return "no target on 1 worker"
        return f"target <= {SHARD_TARGET}: {'met' if ratio <= SHARD_TARGET else 'NOT met'}"

    lines += [f"optimizer state per worker, optimizer / none: {optimizer_ratio:.3f} ({verdict(optimizer_ratio)})",
              f"parameters + gradients + optimizer state, full / none: {full_ratio:.3f} ({verdict(full_ratio)})"]
    return {"model": model, "optimizer": "lamb", "num_classes": 1000, "image_size": size, "micro_batch": micro,
            "steps": steps, "workers": workers, "rows": rows, "optimizer_ratio": optimizer_ratio,
            "full_ratio": full_ratio, "target": SHARD_TARGET,
            "optimizer_met": optimizer_ratio <= SHARD_TARGET if targeted else None,
            "full_met": full_ratio <= SHARD_TARGET if targeted else None, "lines": lines}


def run(ctx) -> dict | None:
    if ctx.rank != 0:  # rank 0 starts the fresh groups; the others wait for it
        ctx.comm.barrier()
        return None
    workers = ctx.world_size
    cases = parse_cases(getattr(ctx.args, "memory_cases", None))
    result: dict = {"cases": cases}
    lines, verdicts = [], []
    if "engine" in cases or "accumulation" in cases:
        lines.append(f"peak resident memory per worker (MiB, the larger of {workers} workers), fresh processes")
    if "engine" in cases:
        engine = _measure("engine", COMPARE, 5, workers)
        plain = _measure("plain", COMPARE, 5, workers)
        ratio = max(engine) / max(plain)
        lines += ["resnet18, synthetic 64x64, micro-batch 32, 5 steps:",
                  f"  engine {max(engine):8.1f}   plain DDP loop {max(plain):8.1f}   ratio {ratio:.3f} "
                  f"(target <= {TARGET}: {'met' if ratio <= TARGET else 'NOT met'})"]
        result.update(engine_mib=engine, plain_mib=plain, ratio=ratio, target=TARGET)
        verdicts.append(ratio <= TARGET)
    if "accumulation" in cases:
        growing = {g: max(_measure("engine", [*GROWING, f"train.global_batch={g}", f"data.num_samples={g}"], 1,
                                   workers))
                   for g in GLOBAL_BATCHES}
        flat = max(growing.values()) / min(growing.values())
        lines += ["cnn, synthetic 32x32, micro-batch 32, one step at each global batch:",
                  f"  {'global batch':>12} {'accumulation':>12} {'peak MiB':>9}"]
        for g, mib in growing.items():
            lines.append(f"  {g:>12} {g // (32 * workers):>12} {mib:>9.1f}")
        lines.append(f"  largest / smallest: {flat:.3f} (flat within {FLAT_TOLERANCE}: "
                     f"{'met' if flat <= FLAT_TOLERANCE else 'NOT met'})")
        result.update(growing_mib=growing, flat_ratio=flat)
        verdicts.append(flat <= FLAT_TOLERANCE)
    if "shard" in cases:
        shard = shard_case(ctx.args, workers)
        lines += ["comm.shard:"] + shard.pop("lines")
        result["shard"] = shard
        verdicts += [v for v in (shard["optimizer_met"], shard["full_met"]) if v is not None]
    ctx.comm.barrier()
    result["met"] = all(verdicts)
    result["lines"] = lines
    return result
