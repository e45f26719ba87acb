"""``memory``: peak resident memory per worker, the engine against a plain DDP loop, and as the
global batch grows at a fixed micro-batch.

Peak resident memory only grows during a process's life, so every figure comes from fresh workers:
rank 0 starts a 2-worker group per measurement (``python -m largebatch.bench.memory_worker``
under torchrun), and each worker reports its ``ru_maxrss`` after the steps. The engine is the real
Trainer stepping through ``run_step``; the plain loop is DDP and ``torch.optim.SGD`` on the same
dataset and micro-batch. Targets: engine / plain <= 1.05, and with gradient accumulation the
engine's peak stays flat from a global batch of 1K to 32K.
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


def _measure(mode: str, overrides: list[str], steps: int, workers: int) -> list[float]:
    """Peak resident MiB of each worker of a fresh group."""
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


def run(ctx) -> dict | None:
    if ctx.rank != 0:  # rank 0 starts the fresh groups; the others wait for it
        ctx.comm.barrier()
        return None
    workers = ctx.world_size
    engine = _measure("engine", COMPARE, 5, workers)
    plain = _measure("plain", COMPARE, 5, workers)
    ratio = max(engine) / max(plain)
    growing = {g: max(_measure("engine", [*GROWING, f"train.global_batch={g}", f"data.num_samples={g}"], 1, workers))
               for g in GLOBAL_BATCHES}
    flat = max(growing.values()) / min(growing.values())
    lines = [f"peak resident memory per worker (MiB, the larger of {workers} workers), fresh processes",
             "resnet18, synthetic 64x64, micro-batch 32, 5 steps:",
             f"  engine {max(engine):8.1f}   plain DDP loop {max(plain):8.1f}   ratio {ratio:.3f} "
             f"(target <= {TARGET}: {'met' if ratio <= TARGET else 'NOT met'})",
             "cnn, synthetic 32x32, micro-batch 32, one step at each global batch:",
             f"  {'global batch':>12} {'accumulation':>12} {'peak MiB':>9}"]
    for g, mib in growing.items():
        lines.append(f"  {g:>12} {g // (32 * workers):>12} {mib:>9.1f}")
    lines.append(f"  largest / smallest: {flat:.3f} (flat within {FLAT_TOLERANCE}: "
                 f"{'met' if flat <= FLAT_TOLERANCE else 'NOT met'})")
    ctx.comm.barrier()
    return {"engine_mib": engine, "plain_mib": plain, "ratio": ratio, "target": TARGET,
            "met": ratio <= TARGET and flat <= FLAT_TOLERANCE, "growing_mib": growing, "flat_ratio": flat,
            "lines": lines}
