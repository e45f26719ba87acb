"""Time the embedded default as a user runs it: ``torchrun --standalone --nproc-per-node N -m largebatch.train``.

    python benchmarks/default_run.py [--workers 2] [--repeats 3] [key=value ...]

Each repeat is a fresh torchrun in a fresh run folder. Reports the wall time of the whole command
(process start-up, rendezvous, data, training, validation, checkpoint), the training time the run
itself records (``elapsed_s``), and the final validation accuracy, with mean, min and max.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time

from largebatch.bench.machine import describe_machine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    rows = []
    for i in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.workers}",
                   "-m", "largebatch.train", f"run.dir={tmp}/run", *args.overrides]
            t0 = time.perf_counter()
            p = subprocess.run(cmd, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if p.returncode:
                sys.exit(f"run {i} failed:\n{p.stderr[-3000:]}")
            summary = [json.loads(x) for x in open(f"{tmp}/run/metrics.jsonl")][-1]
        rows.append((wall, summary["elapsed_s"], summary["val_acc"]))
        print(f"run {i + 1}: wall {wall:.1f} s, training {summary['elapsed_s']:.1f} s, "
              f"val_acc {summary['val_acc']:.4f}", flush=True)

    def stat(values, fmt):
        return f"{fmt.format(statistics.mean(values))} (min {fmt.format(min(values))}, max {fmt.format(max(values))})"

    print(f"\nmachine: {describe_machine()}")
    print(f"default on {args.workers} workers, {args.repeats} runs, overrides: {' '.join(args.overrides) or 'none'}")
    print(f"wall time of the command   {stat([r[0] for r in rows], '{:.1f} s')}")
    print(f"training time (elapsed_s)  {stat([r[1] for r in rows], '{:.1f} s')}")
    print(f"validation accuracy        {stat([r[2] for r in rows], '{:.4f}')}")


if __name__ == "__main__":
    main()
