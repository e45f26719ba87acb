"""When do precise BatchNorm statistics pay? Validation accuracy with and without them, against the
number of optimizer steps per epoch.

    python benchmarks/precise_bn.py                                        # bundled digits (fresh clone)
    python benchmarks/precise_bn.py --data imagefolder --root ../shared/datasets/mnist10k \\
        --image-size 14 --batches 64 256 1024 2048 --seeds 0 1

For each global batch and seed, trains the BatchNorm CNN twice from the same seed with LARS and
warmup, as ``benchmarks/batch_scaling.py`` trains its ``lars+warmup`` runs (linear lr scaling from
the small batch, 5 warmup epochs, linear decay to 0), once with ``train.precise_bn_images=0`` (the
running averages) and once with ``--images`` (BatchNorm statistics recomputed with the current
weights before each validation). Prints, per batch: the steps per epoch, the final validation
accuracy of both (mean over the seeds), the final gain, and the mean gain over every epoch's
validation (precise statistics serve every validation, so the gain mid-run counts for
``train.target_accuracy`` and for early stopping). Writes ``results.json`` and ``table.md`` to ``--out``.
The steps per epoch at which the gain appears are what ``train.precise_bn_images=auto`` rests on
(docs/batch_scaling.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from batch_scaling import add_data_and_model_arguments, overrides  # noqa: E402  (the same runs as the batch-scaling experiment)

from largebatch.config import load_config  # noqa: E402
from largebatch.data.sampler import steps_per_epoch  # noqa: E402
from largebatch.distributed import SINGLE  # noqa: E402
from largebatch.engine import Trainer  # noqa: E402


def train(args, batch: int, seed: int, images: int) -> dict:
    run_dir = os.path.join(args.out, "runs", f"b{batch}-s{seed}-bn{images}")
    cfg = load_config(None, overrides(args, "lars+warmup", batch, seed, run_dir)
                      + [f"train.precise_bn_images={images}", "checkpoint.resume=never"])
    with open(os.path.join(args.out, "train.log"), "a") as log, contextlib.redirect_stderr(log):
        trainer = Trainer(cfg, SINGLE)
        try:
            summary = trainer.fit()
        finally:
            trainer.close()
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        epochs = [r["val_acc"] for r in map(json.loads, fh) if r.get("event") == "epoch"]
    return dict(val_acc=summary["val_acc"], epochs=epochs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_data_and_model_arguments(ap)
    ap.add_argument("--small-batch", type=int, default=None,
                    help="the batch the lr is quoted for (default: 64, 16 for digits)")
    ap.add_argument("--batches", type=int, nargs="+", default=None,
                    help="global batches (default: 16 ... 512 for digits, 64 ... 2048 otherwise)")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--images", type=int, default=4096, help="train.precise_bn_images of the runs with it")
    ap.add_argument("--out", default="runs/precise_bn")
    args = ap.parse_args()
    if args.small_batch is None:
        args.small_batch = 16 if args.data == "digits" else 64
    if args.batches is None:
        args.batches = [args.small_batch * 2 ** i for i in range(6)]
    os.makedirs(args.out, exist_ok=True)
    results = []
    for seed in args.seeds:
        for batch in args.batches:
            for images in (0, args.images):
                r = train(args, batch, seed, images)
                results.append(dict(batch=batch, seed=seed, images=images, **r))
                print(f"batch {batch:>5} seed {seed} precise_bn_images {images:>5}: val_acc {r['val_acc']:.4f}",
                      flush=True)
                with open(os.path.join(args.out, "results.json"), "w") as fh:
                    json.dump(dict(args=vars(args), results=results), fh, indent=1)
    cfg = load_config(None, overrides(args, "lars+warmup", args.batches[0], 0, os.path.join(args.out, "x")))
    from largebatch.data import build_datasets

    n_train = len(build_datasets(cfg.data)[0])
    lines = [f"| global batch | steps per epoch | final, running averages | final, precise ({args.images}) "
             "| final gain | mean gain over the epochs |", "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for batch in args.batches:
        off = [r for r in results if r["batch"] == batch and r["images"] == 0]
        on = [r for r in results if r["batch"] == batch and r["images"] == args.images]
        gains = [statistics.mean(b - a for a, b in zip(x["epochs"], y["epochs"])) for x, y in zip(off, on)]
        f_off = statistics.mean(r["val_acc"] for r in off)
        f_on = statistics.mean(r["val_acc"] for r in on)
        lines.append(f"| {batch} | {steps_per_epoch(n_train, batch)} | {100 * f_off:.2f} | {100 * f_on:.2f} | "
                     f"{100 * (f_on - f_off):+.2f} | {100 * statistics.mean(gains):+.2f} |")
    text = "\n".join(lines)
    with open(os.path.join(args.out, "table.md"), "w") as fh:
        fh.write(text + "\n")
    print(f"\ndata {args.data} {args.root or ''} ({n_train} training images), model {args.model} (width {args.width}), "
          f"LARS with warmup, {args.epochs} epochs, seeds {args.seeds}: validation accuracy %, mean over the seeds")
    print(text)


if __name__ == "__main__":
    main()
