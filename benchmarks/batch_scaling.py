"""Do large batches keep their accuracy? SGD vs SGD+warmup vs LARS vs LAMB at 16x and 32x the batch.

    python benchmarks/batch_scaling.py                                   # bundled digits (fresh clone)
    python benchmarks/batch_scaling.py --data imagefolder --root ../shared/datasets/mnist10k \\
        --small-batch 64 --image-size 14 --width 16 --epochs 20 --seeds 0 1 2
    python benchmarks/batch_scaling.py ... --methods lars+warmup --factors 32 \\
        --compression none fp16 powersgd --workers 2   # compressed allreduce at the largest batch
    python benchmarks/batch_scaling.py ... --methods lars+warmup lamb+warmup --factors 32 \\
        --shard none full --workers 2                  # sharded data parallelism at the largest batch

Trains the same model for the same number of epochs at a small batch (momentum SGD, the
baseline) and at batches ``factors`` times larger with:

    (a) sgd            SGD, linear lr scaling, no warmup
    (b) sgd+warmup     SGD, linear lr scaling, warmup            (Goyal et al. 2017)
    (c) lars+warmup    LARS, linear lr scaling, warmup           (You, Gitman & Ginsburg 2017)
    (d) lamb+warmup    LAMB, square-root lr scaling, warmup      (You et al. 2019)

All runs share the rest: linear decay to 0 after warmup (poly, power 1), Nesterov momentum 0.9 (sgd,
lars), weight decay off biases and BatchNorm, and the default ``train.precise_bn_images=auto``:
BatchNorm statistics recomputed over up to 4096 training images before each validation where an
epoch has fewer than 30 steps (the large batches), without which BatchNorm's running averages lag
the weights, and the running averages otherwise (``benchmarks/precise_bn.py`` measures both). The learning rates were chosen by a
single-seed sweep at the largest batch on MNIST; ``HYPER`` states them.
Every run is one process with world size 1:
the engine's batches and gradients do not depend on the world size, so this measures the
optimisation, not the cluster. Writes ``results.json``, ``table.md`` and ``batch_scaling.png``
(with matplotlib installed) to ``--out`` and prints the table: mean ± standard deviation of the
final validation accuracy over the seeds, and the min-max range.

``--compression`` adds runs of each method at the largest batch on ``--workers`` gloo workers
(started through torchrun on this machine) with each ``comm.compression``, PowerSGD at rank 2 from
step 10: compression changes the averaged gradient, so these runs need real workers. 'none' on
the same workers is their control. ``--shard`` does the same with each ``comm.shard`` ('none' is
again the control): sharding must not change the optimisation, trust ratios included.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time

from largebatch.config import load_config
from largebatch.distributed import SINGLE
from largebatch.engine import Trainer

# Learning rates, quoted for the small batch and scaled by each method's rule; at 32x they give
# peaks of 1.6 (sgd), 20 (lars) and 0.085 (lamb). Units: lr per `small_batch` images; warmup in epochs.
HYPER = {
    "sgd": dict(name="sgd", base_lr=0.05, scaling="linear", warmup=0.0),
    "sgd+warmup": dict(name="sgd", base_lr=0.05, scaling="linear", warmup=5.0),
    "lars+warmup": dict(name="lars", base_lr=20.0 / 32, scaling="linear", warmup=5.0),
    "lamb+warmup": dict(name="lamb", base_lr=0.015, scaling="sqrt", warmup=5.0, weight_decay=0.01),
}
WEIGHT_DECAY = 5e-4
COMMON = ["schedule.decay=poly", "schedule.power=1", "schedule.end_lr=0"]


def overrides(args, method: str, batch: int, seed: int, run_dir: str) -> list[str]:
    h = HYPER[method]
    out = [f"run.dir={run_dir}", f"run.seed={seed}", f"data.name={args.data}", "data.cache=true",
           f"model.name={args.model}", f"model.width={args.width}", f"train.global_batch={batch}",
           f"train.epochs={args.epochs}", f"optim.name={h['name']}", f"optim.base_lr={h['base_lr']}",
           f"optim.base_batch={args.small_batch}", f"optim.scaling={h['scaling']}",
           f"optim.weight_decay={h.get('weight_decay', WEIGHT_DECAY)}", f"schedule.warmup_epochs={h['warmup']}",
           f"optim.nesterov={h['name'] != 'lamb'}", *COMMON,
           "schedule.warmup_start_lr=0.0" if h["warmup"] else ""]
    if args.root:
        out.append(f"data.root={args.root}")
    if args.image_size:
        out.append(f"data.image_size={args.image_size}")
    return [o for o in out if o]


def train_once(args, method: str, batch: int, seed: int) -> dict:
    run_dir = os.path.join(args.out, "runs", f"{method}-b{batch}-s{seed}")
    cfg = load_config(None, overrides(args, method, batch, seed, run_dir))
    with open(os.path.join(args.out, "train.log"), "a") as log, contextlib.redirect_stderr(log):
        trainer = Trainer(cfg, SINGLE)
        try:
            t0 = time.perf_counter()
            summary = trainer.fit()
            summary["wall_s"] = time.perf_counter() - t0
        finally:
            trainer.close()
    return summary


def train_workers(args, method: str, batch: int, seed: int, setting: tuple[str, str]) -> dict:
    """One run on ``args.workers`` gloo workers started by torchrun, with ``setting`` (a
    ('compression' or 'shard', value) pair: comm.compression or comm.shard)."""
    key, value = setting
    run_dir = os.path.join(args.out, "runs", f"{method}-b{batch}-s{seed}-w{args.workers}-{key}-{value}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.workers}",
           "-m", "largebatch.train", *overrides(args, method, batch, seed, run_dir),
           f"comm.{key}={value}", "checkpoint.resume=never", "comm.backend=gloo"]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // args.workers)))
    t0 = time.perf_counter()
    with open(os.path.join(args.out, "train.log"), "a") as log:
        code = subprocess.call(cmd, stdout=log, stderr=log, env=env)
    if code != 0:
        raise SystemExit(f"batch_scaling: run {run_dir} failed (exit {code}); see {args.out}/train.log")
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        summary = [r for r in map(json.loads, fh) if r.get("event") == "summary"][-1]
    summary["wall_s"] = time.perf_counter() - t0
    return summary


def workers_table(results: list[dict], key: str) -> str:
    """The runs on several workers with each value of ``key`` ('compression' or 'shard')."""
    rows = [r for r in results if r.get(key)]
    keys = sorted({(r["method"], r["batch"], r["workers"]) for r in rows}, key=str)
    kinds = list(dict.fromkeys(r[key] for r in rows))
    lines = ["| method | batch | workers | " + " | ".join(f"{key} {c}" for c in kinds) + " |",
             "|" + " --- |" * (3 + len(kinds))]
    for method, batch, workers in keys:
        cells = [_cell([r["val_acc"] for r in rows if (r["method"], r["batch"], r["workers"], r[key])
                        == (method, batch, workers, c)]) for c in kinds]
        lines.append(f"| {method} | {batch} | {workers} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(accs: list[float]) -> str:
    if not accs:
        return "—"
    spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
    return f"{100 * statistics.mean(accs):.2f} ± {100 * spread:.2f} ({100 * min(accs):.2f}–{100 * max(accs):.2f})"


def table(results: list[dict], small_batch: int, factors: list[int]) -> str:
    def accs(method, batch):
        return [r["val_acc"] for r in results if r["method"] == method and r["batch"] == batch
                and not r.get("compression") and not r.get("shard")]

    batches = [small_batch * f for f in factors]
    head = "| method | " + " | ".join([f"batch {small_batch}"] + [f"batch {b} ({f}×)" for b, f in zip(batches, factors)])
    lines = [head + " |", "|" + " --- |" * (len(batches) + 2)]
    lines.append("| sgd (baseline) | " + _cell(accs("sgd", small_batch)) + " |" + " |" * len(batches))
    for method in HYPER:
        lines.append(f"| {method} | |" + "".join(f" {_cell(accs(method, b))} |" for b in batches))
    return "\n".join(lines)


def plot(results: list[dict], small_batch: int, factors: list[int], path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    results = [r for r in results if not r.get("compression") and not r.get("shard")]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    base = [r["val_acc"] for r in results if r["method"] == "sgd" and r["batch"] == small_batch]
    batches = [small_batch * f for f in factors]
    for method in HYPER:
        xs, means, errs = [], [], []
        for b in ([small_batch] if method == "sgd" else []) + batches:
            a = [r["val_acc"] for r in results if r["method"] == method and r["batch"] == b]
            if a:
                xs.append(b)
                means.append(100 * statistics.mean(a))
                errs.append(100 * (statistics.stdev(a) if len(a) > 1 else 0.0))
        ax.errorbar(xs, means, yerr=errs, marker="o", capsize=3, label=method)
    if base:
        ax.axhline(100 * statistics.mean(base), color="gray", ls="--", lw=1, label=f"batch {small_batch} SGD")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("global batch")
    ax.set_ylabel("final validation accuracy (%)")
    ax.set_ylim(max(0, min(100 * r["val_acc"] for r in results) - 5), 100)
    ax.set_title("Accuracy at large batch, same epochs")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def add_data_and_model_arguments(ap: argparse.ArgumentParser) -> None:
    """--data, --root, --image-size, --model and --width, which overrides() reads."""
    ap.add_argument("--data", default="digits", help="data.name (default: the bundled digits)")
    ap.add_argument("--root", default=None, help="data.root")
    ap.add_argument("--image-size", type=int, default=None, help="data.image_size (default: the data's own)")
    ap.add_argument("--model", default="cnn")
    ap.add_argument("--width", type=int, default=16, help="model.width")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_data_and_model_arguments(ap)
    ap.add_argument("--small-batch", type=int, default=None, help="baseline batch (default: 64, 16 for digits)")
    ap.add_argument("--factors", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(HYPER), choices=list(HYPER))
    ap.add_argument("--compression", nargs="+", default=[], choices=("none", "fp16", "powersgd"),
                    help="also run each method at the largest batch on --workers workers with these "
                         "comm.compression values")
    ap.add_argument("--shard", nargs="+", default=[], choices=("none", "optimizer", "full"),
                    help="also run each method at the largest batch on --workers workers with these comm.shard "
                         "values")
    ap.add_argument("--workers", type=int, default=2,
                    help="workers for the --compression and --shard runs (default 2)")
    ap.add_argument("--workers-only", action="store_true",
                    help="only the --compression and --shard runs, not the one-process runs of the methods")
    ap.add_argument("--out", default="runs/batch_scaling")
    args = ap.parse_args()
    if args.small_batch is None:
        args.small_batch = 16 if args.data == "digits" else 64
    os.makedirs(args.out, exist_ok=True)
    jobs = [("sgd", args.small_batch)] if "sgd" in args.methods else []
    jobs += [(m, args.small_batch * f) for f in args.factors for m in args.methods]
    if args.workers_only:
        jobs = []
    largest = args.small_batch * max(args.factors)
    on_workers = [(m, largest, ("compression", c)) for c in args.compression for m in args.methods]
    on_workers += [(m, largest, ("shard", c)) for c in args.shard for m in args.methods]
    results = []
    for seed in args.seeds:
        for method, batch, setting in [(m, b, None) for m, b in jobs] + on_workers:
            if setting is None:
                s, where = train_once(args, method, batch, seed), ""
            else:
                s = train_workers(args, method, batch, seed, setting)
                where = f" on {args.workers} workers, {setting[0]} {setting[1]}"
            results.append(dict(method=method, batch=batch, seed=seed, val_acc=s["val_acc"],
                                best_val_acc=s["best_val_acc"], wall_s=s["wall_s"],
                                **({setting[0]: setting[1]} if setting else {}),
                                workers=args.workers if setting else 1))
            print(f"{method:<12} batch {batch:>5} seed {seed}{where}: val_acc {s['val_acc']:.4f} "
                  f"(best {s['best_val_acc']:.4f}) {s['wall_s']:.0f}s", flush=True)
            with open(os.path.join(args.out, "results.json"), "w") as fh:
                json.dump(dict(args=vars(args), hyper=HYPER, results=results), fh, indent=1)
    parts = [table(results, args.small_batch, args.factors)] if jobs else []
    parts += [workers_table(results, key) for key in ("compression", "shard") if any(r.get(key) for r in results)]
    text = "\n\n".join(parts)
    with open(os.path.join(args.out, "table.md"), "w") as fh:
        fh.write(text + "\n")
    print()
    print(f"data {args.data} {args.root or ''}, model {args.model} (width {args.width}), {args.epochs} epochs, "
          f"seeds {args.seeds}: final validation accuracy %, mean ± std (min–max)")
    print(text)
    if jobs and plot(results, args.small_batch, args.factors, os.path.join(args.out, "batch_scaling.png")):
        print(f"plot: {os.path.join(args.out, 'batch_scaling.png')}")
        curves(args, jobs)


def curves(args, jobs) -> None:
    """Per-run curves (accuracy, loss, lr, throughput) of the first seed, drawn by largebatch.report:
    the baseline and every method at the largest batch."""
    from largebatch import report

    largest = args.small_batch * max(args.factors)
    chosen = [(m, b) for m, b in jobs if b == largest or (m == "sgd" and b == args.small_batch)]
    runs = [report.load_run(os.path.join(args.out, "runs", f"{m}-b{b}-s{args.seeds[0]}")) for m, b in chosen]
    report.label_runs(runs)
    folder = os.path.join(args.out, "curves")
    os.makedirs(folder, exist_ok=True)
    report.plot_runs(runs, folder)
    with open(os.path.join(folder, "summary.md"), "w") as fh:
        fh.write(report.summary_table(runs) + "\n")
    print(f"curves: {folder}/")


if __name__ == "__main__":
    sys.exit(main())
