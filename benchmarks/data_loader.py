"""Training-loader throughput of each data format on the same images, side by side.

    python benchmarks/data_loader.py [--images 2048] [--source-size 128] [--size 112] [--batch 256]
                                     [--workers 0 2] [--rounds 5] [--json runs/data_loader.json]

Writes ``--images`` photo-like RGB images (smooth random colour fields with fine noise, 10
classes) as JPEG (quality 90) at ``--source-size`` pixels into an image folder, packs that folder
with ``python -m largebatch.data.pack --size SIZE``, and packs it once more at the source size.
Then it reads one epoch at a time through the trainer's own path (``build_datasets`` +
``train_loader``: world-size-invariant sampler, ``data.num_workers`` persistent loader processes,
normalisation, augmentation) for each of:

    imagefolder       decode each JPEG with Pillow, resize to SIZE
    packed            read SIZE x SIZE uint8 images from the memory-mapped packed file
    packed, resized   read the source-size packed file and downscale to SIZE on the fly
                      (what train.phases does with a file packed at the largest size)

each without augmentation and with ``crop_flip``, and with each ``--workers`` count. The
configurations take turns, round after round, so that a busy machine slows them alike; each
measurement reads whole epochs for at least 0.5 s and the first round (worker start-up, page
cache) is not counted. Prints the median images/s of each with its min-max, and the ratio to
imagefolder with the same augmentation and workers; writes everything to ``--json`` (default
runs/data_loader.json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

from largebatch.bench.machine import describe_machine
from largebatch.fileio import write_bytes_atomic


def write_images(root: str, count: int, size: int, classes: int = 10, val_share: float = 0.05) -> None:
    """Photo-like JPEGs: a random low-resolution colour field, upsampled, plus fine noise."""
    from PIL import Image

    rng = np.random.default_rng(0)
    num_val = max(classes, int(count * val_share))
    for split, n in (("train", count), ("val", num_val)):
        for i in range(n):
            c = i % classes
            folder = os.path.join(root, split, f"class{c:02d}")
            os.makedirs(folder, exist_ok=True)
            coarse = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
            coarse[..., c % 3] = np.maximum(coarse[..., c % 3], 128)
            field = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), dtype=np.int16)
            noise = rng.integers(-20, 21, size=(size, size, 3), dtype=np.int16)
            img = Image.fromarray(np.clip(field + noise, 0, 255).astype(np.uint8))
            img.save(os.path.join(folder, f"{i:06d}.jpg"), quality=90)


def make_loader(data_args: list[str], batch: int, workers: int):
    from largebatch.batching import plan
    from largebatch.config import load_config
    from largebatch.data import build_datasets, train_loader

    cfg = load_config(None, [*data_args, f"data.num_workers={workers}"])
    train, _, info = build_datasets(cfg.data, seed=0)
    loader, sampler = train_loader(train, plan(batch, 1), 0, seed=0, num_workers=workers,
                                   image_size=cfg.data.image_size)
    return loader, sampler, info


def epoch_rate(loader, sampler, epoch: int, min_seconds: float = 0.5) -> tuple[float, int]:
    """Images per second over whole epochs, reading for at least ``min_seconds``; returns the
    rate and the next epoch number."""
    images, t0 = 0, time.perf_counter()
    while True:
        sampler.set_epoch(epoch)
        epoch += 1
        for x, _ in loader:
            images += x.shape[0]
        elapsed = time.perf_counter() - t0
        if elapsed >= min_seconds:
            return images / elapsed, epoch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=2048, help="training images to write")
    ap.add_argument("--source-size", type=int, default=128, help="side of the JPEG files")
    ap.add_argument("--size", type=int, default=112, help="side of the images fed to the model")
    ap.add_argument("--batch", type=int, default=256, help="micro-batch read at once")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="data.num_workers values to compare")
    ap.add_argument("--rounds", type=int, default=5, help="measured rounds (after one warm-up round)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in the reading process")
    ap.add_argument("--json", default=os.path.join("runs", "data_loader.json"), help="where to write the results")
    args = ap.parse_args()
    problem = next((text for bad, text in [
        (min(args.images, args.source_size, args.size, args.batch, args.rounds, args.threads) < 1,
         "--images, --source-size, --size, --batch, --rounds and --threads must be >= 1"),
        (min(args.workers) < 0, "--workers values must be >= 0"),
        (args.images < args.batch, f"--images {args.images} is fewer than one batch (--batch {args.batch}); "
                                   "use --images >= --batch"),
    ] if bad), None)
    if problem:
        print(f"data_loader.py: error: {problem}", file=sys.stderr)
        sys.exit(2)
    torch.set_num_threads(args.threads)
    from largebatch.data.pack import pack

    with tempfile.TemporaryDirectory() as tmp:
        tree = os.path.join(tmp, "tree")
        t0 = time.perf_counter()
        write_images(tree, args.images, args.source_size)
        jpeg_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(tree, "train"))
                         for f in fs)
        print(f"wrote {args.images} JPEGs of {args.source_size}x{args.source_size} "
              f"({jpeg_bytes / args.images / 1024:.1f} KiB each) in {time.perf_counter() - t0:.1f}s", flush=True)
        packed = os.path.join(tmp, "train.lbpack")
        packed_full = os.path.join(tmp, "full.lbpack")
        quiet = lambda *a, **k: None  # noqa: E731
        t0 = time.perf_counter()
        pack(tree, packed, args.size, workers=max(args.workers), log=quiet)
        pack_s = time.perf_counter() - t0
        pack(tree, packed_full, args.source_size, workers=max(args.workers), log=quiet)
        print(f"packed at {args.size} px in {pack_s:.1f}s ({max(args.workers)} decoding processes)", flush=True)

        formats = {
            "imagefolder": ["data.name=imagefolder", f"data.root={tree}", f"data.image_size={args.size}"],
            "packed": ["data.name=packed", f"data.root={packed}"],
            "packed, resized": ["data.name=packed", f"data.root={packed_full}", f"data.image_size={args.size}"],
        }
        configs = {}
        for augment in ("none", "crop_flip"):
            for workers in args.workers:
                for name, data_args in formats.items():
                    loader, sampler, info = make_loader([*data_args, f"data.augment={augment}"], args.batch, workers)
                    assert info.image_size == args.size, (name, info)
                    configs[(name, augment, workers)] = dict(loader=loader, sampler=sampler, epoch=0, rates=[])
        for rnd in range(args.rounds + 1):
            for key, c in configs.items():
                rate, c["epoch"] = epoch_rate(c["loader"], c["sampler"], c["epoch"])
                if rnd:
                    c["rates"].append(rate)
            print(f"round {rnd}/{args.rounds} done" + (" (warm-up, not counted)" if rnd == 0 else ""), flush=True)

    rows = []
    for (name, augment, workers), c in configs.items():
        base = statistics.median(configs[("imagefolder", augment, workers)]["rates"])
        med = statistics.median(c["rates"])
        rows.append(dict(format=name, augment=augment, loader_workers=workers, images_per_sec=med,
                         min=min(c["rates"]), max=max(c["rates"]), vs_imagefolder=med / base))
    print(f"\nmachine: {describe_machine()}; {args.threads} torch thread(s) in the reading process")
    print(f"{args.images} images, JPEG {args.source_size} px -> {args.size} px, batches of {args.batch}, "
          f"median of {args.rounds} rounds\n")
    head = f"{'format':<17}{'augment':<11}{'workers':>8}{'images/s':>11}{'min-max':>19}{'vs imagefolder':>16}"
    print(head)
    print("-" * len(head))
    for r in sorted(rows, key=lambda r: (r["augment"], r["loader_workers"])):
        span = f"{r['min']:,.0f}-{r['max']:,.0f}"
        print(f"{r['format']:<17}{r['augment']:<11}{r['loader_workers']:>8}{r['images_per_sec']:>11,.0f}{span:>19}"
              f"{r['vs_imagefolder']:>15.1f}x")
    results = dict(machine=describe_machine(), args=vars(args), pack_seconds=pack_s,
                   jpeg_bytes_per_image=jpeg_bytes / args.images, rows=rows)
    write_bytes_atomic(json.dumps(results, indent=1).encode(), args.json)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    sys.exit(main())
