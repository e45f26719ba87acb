"""Do both workers of a short 2-worker run always exit? Many runs, several at once, on this machine.

    python benchmarks/worker_exit.py [--runs 400] [--loops 3] [--hang-s 90] [--out runs/worker_exit]

Each of ``--loops`` loops starts ``--runs`` runs one after another: two gloo workers of
``python -m largebatch.train`` (the MLP on the bundled digits, 2 epochs, global batch 256, the
noise scale on), started by hand as the tests start them (forked from the tests' fork servers, so a
run takes about a second), on a free port. A run whose workers have not all exited ``--hang-s``
seconds after it started counts as hung: its workers' Python and native stacks are printed where
py-spy is installed (``pip install py-spy``), then they are killed and the loop goes on. Running
the loops side by side loads the machine, which is what made the exit hang of a worker show.
Prints one line per loop and the total: runs, hung runs, failed runs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))

ARGS = ["model.name=mlp", "model.norm=none", "train.epochs=2", "train.global_batch=256", "train.noise_scale=true",
        "checkpoint.at_epoch_end=false", "schedule.warmup_epochs=0"]


def loop(name: str, runs: int, hang_s: float, out: str) -> tuple[int, int, int]:
    """One loop's runs, one after another: (runs, hung, failed)."""
    import conftest

    hung = failed = 0
    for i in range(runs):
        run_dir = os.path.join(out, f"{name}-{i}")
        port = conftest.free_port()
        procs = [conftest.start("largebatch.train", *ARGS, f"run.dir={run_dir}", cwd=out,
                                env=conftest.worker_env(rank, 2, port), slot=rank) for rank in range(2)]
        t0 = time.monotonic()
        while any(p.poll() is None for p in procs) and time.monotonic() - t0 < hang_s:
            time.sleep(0.2)
        stuck = [p for p in procs if p.poll() is None]
        if stuck:
            hung += 1
            report = [f"{name} run {i}: not all workers exited after {hang_s:.0f} s"]
            for rank, p in enumerate(procs):
                report.append(f"--- rank {rank}, pid {p.pid}, " + ("running" if p in stuck else f"exited {p.returncode}"))
                if p in stuck:
                    report.append(conftest.py_spy_stacks(p.pid, native=True) or "(py-spy is not installed: no stacks)")
            print("\n".join(report), flush=True)
            for p in stuck:
                p.kill()
        errs = [p.communicate(timeout=60)[1] for p in procs]
        if not stuck and any(p.returncode != 0 for p in procs):
            failed += 1
        for rank, (p, err) in enumerate(zip(procs, errs)):
            if p.returncode not in (0, -9):  # -9: killed here, after a hang
                print(f"{name} run {i}: rank {rank} exited {p.returncode}; its stderr's end:\n{err[-2000:]}", flush=True)
        shutil.rmtree(run_dir, ignore_errors=True)
    conftest.pytest_sessionfinish(None)
    return runs, hung, failed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=400, help="runs per loop (default 400)")
    ap.add_argument("--loops", type=int, default=3, help="loops side by side (default 3)")
    ap.add_argument("--hang-s", type=float, default=90.0, help="seconds after which a run counts as hung (default 90)")
    ap.add_argument("--out", default=os.path.join("runs", "worker_exit"), help="folder for the runs (default %(default)s)")
    ap.add_argument("--one-loop", metavar="NAME", help=argparse.SUPPRESS)  # a loop, in a process of its own
    args = ap.parse_args()
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    if args.one_loop:
        runs, hung, failed = loop(args.one_loop, args.runs, args.hang_s, out)
        print(f"{args.one_loop}: {runs} runs, {hung} hung, {failed} failed", flush=True)
        return 1 if hung or failed else 0
    t0 = time.monotonic()
    loops = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--one-loop", f"loop{k}", "--runs",
                               str(args.runs), "--hang-s", str(args.hang_s), "--out", out]) for k in range(args.loops)]
    codes = [p.wait() for p in loops]
    print(f"total: {args.loops} loops of {args.runs} runs of 2 workers in {time.monotonic() - t0:.0f} s; "
          f"{'every worker exited' if not any(codes) else 'some runs hung or failed (above)'}", flush=True)
    return 1 if any(codes) else 0


if __name__ == "__main__":
    sys.exit(main())
