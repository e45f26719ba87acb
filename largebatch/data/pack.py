"""Pack a dataset into the fast packed format (fixed-size uint8 images in one memory-mapped file).

    python -m largebatch.data.pack SRC DEST [--size S] [--workers N] [--on-corrupt skip|error] [data.KEY=VALUE ...]
    python -m largebatch.data.pack --verify FILE

SRC is a folder holding train/ and val/ class folders (an image folder, e.g. ImageNet), a folder
holding CIFAR-10 or CIFAR-100 python batches (or their parent), or one of the names 'digits' (the
bundled set) and 'synthetic' (then data.num_samples=, data.num_classes= and data.val_fraction=
apply). Every image is resized once to S x S (default: the source's own size; for an image folder,
the size of its first image), exactly as data.name=imagefolder would resize it, and stored as uint8.
Unreadable images are skipped with a warning naming each (--on-corrupt error stops at the first).
DEST is written atomically; train with data.name=packed data.root=DEST, and, to downscale on the
fly, data.image_size (or train.phases image sizes) up to S.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from largebatch.config import load_config
from largebatch.data.augment import transform_uint8
from largebatch.data.cifar import batch_folder, load_cifar
from largebatch.data.datasets import build_datasets
from largebatch.data.digits import digits_arrays
from largebatch.data.imagefolder import load_imagefolder, unreadable_message, unreadable_reason
from largebatch.data.packed import PackWriter, read_meta, verify_images
from largebatch.errors import UsageError, run_cli

CHUNK = 256


def _identity(x):
    return x


def _resize_uint8(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 (N, C, H, W) -> (N, size, size, C), resized as image folders are."""
    hwc = np.ascontiguousarray(images.transpose(0, 2, 3, 1))
    if hwc.shape[1:3] == (size, size):
        return hwc
    return np.stack([transform_uint8(img, size) for img in hwc])


class Source(Dataset):
    """A dataset to pack, read in chunks: item ``t`` is (split, uint8 images, labels, names, skipped)."""

    def __init__(self, name: str, cfg, size: int | None, on_corrupt: str):
        self.name, self.on_corrupt = name, on_corrupt
        self.splits: dict = {}
        self.stats = (None, None)
        if name == "imagefolder":
            # unreadable files are reported (or refused) as they are met, below
            train, val, classes = load_imagefolder(cfg.root, size, "skip")
            train.warn = val.warn = False
            self.root = os.path.abspath(cfg.root)
            self.splits = {"train": train, "val": val}
            # the statistics data.name=imagefolder measures at this size, so both formats normalise alike
            self.stats = (train.mean.tolist(), train.std.tolist())
            self.classes, self.channels, self.size = list(classes), train.channels, train.image_size
        elif name in ("cifar10", "cifar100"):
            xtr, ytr, xva, yva, num_classes = load_cifar(name, cfg.root)
            self.size = size or 32
            self.splits = {"train": (xtr.numpy(), ytr.numpy()), "val": (xva.numpy(), yva.numpy())}
            self.classes, self.channels = [str(c) for c in range(num_classes)], 3
        elif name == "digits":
            images, labels, tr, va = digits_arrays(cfg.val_fraction)
            pixels = np.round(images.astype(np.float64) * (255.0 / 16.0)).astype(np.uint8)[:, None]
            self.size = size or 8
            self.splits = {"train": (pixels[tr.numpy()], labels[tr.numpy()]),
                           "val": (pixels[va.numpy()], labels[va.numpy()])}
            self.classes, self.channels = [str(c) for c in range(10)], 1
        elif name == "synthetic":
            self.size = size or cfg.image_size or 32
            cfg.image_size = self.size
            train, val, _ = build_datasets(cfg)
            self.splits = {"train": train, "val": val}
            self.classes, self.channels = [str(c) for c in range(cfg.num_classes)], 3
        else:
            raise AssertionError(name)
        self.tasks = [(split, lo, min(lo + CHUNK, self.count(split)))
                      for split in ("train", "val") for lo in range(0, self.count(split), CHUNK)]

    def count(self, split: str) -> int:
        data = self.splits[split]
        return len(data[1]) if isinstance(data, tuple) else len(data)

    def __len__(self) -> int:
        return len(self.tasks)

    def __getitem__(self, t: int):
        split, lo, hi = self.tasks[t]
        data = self.splits[split]
        skipped = []
        if self.name == "imagefolder":
            images, labels, names = [], [], []
            for i in range(lo, hi):
                path, label = data.samples[i]
                name = os.path.relpath(path, self.root)
                try:
                    images.append(data.read(i))
                except Exception as exc:  # Pillow raises many types for a damaged file
                    skipped.append((path, unreadable_reason(exc)))
                    continue
                labels.append(label)
                names.append(name)
            empty = np.zeros((0, self.size, self.size, self.channels), dtype=np.uint8)
            return split, np.stack(images) if images else empty, labels, names, skipped
        if self.name == "synthetic":
            x = torch.stack([data.generate(i) for i in range(lo, hi)])
            # about +-4 standard deviations of the generated values in 0..255
            pixels = (x * 32.0 + 128.0).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
            labels = [data.label(i) for i in range(lo, hi)]
        else:
            pixels = _resize_uint8(data[0][lo:hi], self.size)
            labels = [int(y) for y in data[1][lo:hi]]
        return split, pixels, labels, [f"{split}:{i}" for i in range(lo, hi)], skipped


def detect(src: str) -> tuple[str, str | None]:
    """(dataset name, root) for SRC: a folder path or one of 'digits', 'synthetic'."""
    if os.path.isdir(src):
        if os.path.isdir(os.path.join(src, "train")) and os.path.isdir(os.path.join(src, "val")):
            return "imagefolder", src
        for name in ("cifar10", "cifar100"):
            try:
                batch_folder(src, name)
            except UsageError:
                continue
            return name, src
        raise UsageError(f"SRC '{src}' holds neither train/ and val/ class folders nor CIFAR batches; "
                         "give an image folder, a CIFAR batch folder, 'digits' or 'synthetic'")
    if src in ("digits", "synthetic"):
        return src, None
    if os.path.exists(src):
        raise UsageError(f"SRC '{src}' is a file; give a folder (image folder or CIFAR batches), 'digits' or "
                         "'synthetic'")
    raise UsageError(f"SRC '{src}' does not exist; give an image folder (with train/ and val/), a CIFAR batch "
                     "folder, 'digits' or 'synthetic'")


def pack(src: str, dest: str, size: int | None = None, workers: int = 0, on_corrupt: str = "skip",
         overrides: tuple = (), log=print) -> dict:
    """Pack SRC into DEST; returns the metadata written. Bad input raises UsageError."""
    if size is not None and size < 8:
        raise UsageError(f"--size {size} is not allowed: use a size >= 8 pixels")
    if os.path.isdir(dest):
        raise UsageError(f"DEST '{dest}' is a folder; give the path of the file to write, e.g. {dest}/data.lbpack")
    bad = [o for o in overrides if not o.startswith("data.")]
    if bad:
        raise UsageError(f"'{bad[0]}': only data.* keys apply when packing (e.g. data.num_samples=5000)")
    name, root = detect(src)
    cfg = load_config(None, [f"data.name={name}", *([f"data.root={root}"] if root else []), *overrides]).data
    if isinstance(cfg.image_size, list):
        height, width = cfg.image_size
        raise UsageError(f"data.image_size=[{height}, {width}] is not square, and a packed file holds square images; "
                         f"give one side with --size (e.g. --size {max(height, width)})")
    source = Source(name, cfg, size, on_corrupt)
    writer = PackWriter(dest, source.channels, source.size)
    loader = DataLoader(source, batch_size=None, shuffle=False, num_workers=workers, collate_fn=_identity,
                        prefetch_factor=4 if workers else None)
    skipped, done, total, t0 = [], 0, len(source), time.perf_counter()
    shown = t0
    try:
        for split, images, labels, names, bad_files in loader:
            for path, reason in bad_files:
                if on_corrupt == "error":
                    raise UsageError(unreadable_message(path, reason).replace("data.on_corrupt=skip",
                                                                              "--on-corrupt skip"))
                log(f"largebatch: warning: skipping unreadable image '{path}' ({reason})", file=sys.stderr)
                skipped.append(os.path.relpath(path, source.root))
            writer.add(split, images, labels, names)
            done += 1
            now = time.perf_counter()
            if now - shown > 10 and done < total:
                shown = now
                log(f"packed {done}/{total} chunks of {CHUNK} images ({now - t0:.0f}s)", file=sys.stderr)
        for split in ("train", "val"):
            if writer.splits[split]["count"] == 0:
                raise UsageError(f"SRC '{src}' has no readable {split} images; nothing to pack")
        meta = writer.finish(source.classes, dict(name=name, root=os.path.abspath(root) if root else None), skipped,
                             *source.stats)
    except BaseException:
        writer.abort()
        raise
    tr, va = meta["splits"]["train"]["count"], meta["splits"]["val"]["count"]
    log(f"packed {name} '{src}' into '{dest}': {tr} train + {va} val images of {source.channels}x{source.size}x"
        f"{source.size}, {len(source.classes)} classes, {os.path.getsize(dest) / 2**20:.1f} MiB, "
        f"{len(skipped)} unreadable file(s) skipped, {time.perf_counter() - t0:.1f}s")
    return meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m largebatch.data.pack", description=__doc__.split("\n")[0],
                                     epilog=__doc__.split("\n\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", nargs="?", metavar="SRC",
                        help="image folder, CIFAR batch folder, 'digits' or 'synthetic'")
    parser.add_argument("dest", nargs="?", metavar="DEST", help="the packed file to write")
    parser.add_argument("overrides", nargs="*", metavar="data.KEY=VALUE", help="data settings of the source")
    parser.add_argument("--size", type=int, metavar="S",
                        help="side of the stored square images (default: the source's)")
    parser.add_argument("--workers", type=int, default=min(8, len(os.sched_getaffinity(0))), metavar="N",
                        help="decoding processes (default: %(default)s)")
    parser.add_argument("--on-corrupt", choices=("skip", "error"), default="skip",
                        help="an unreadable image: skip it with a warning (default) or stop")
    parser.add_argument("--verify", metavar="FILE", help="check FILE's header, labels and every image byte, then exit")
    args = parser.parse_intermixed_args(argv)
    if args.verify:
        verify_images(args.verify)
        meta = read_meta(args.verify)
        counts = {s: meta["splits"][s]["count"] for s in ("train", "val")}
        print(f"'{args.verify}' is intact: packed format {meta['version']}, {counts['train']} train + {counts['val']} "
              f"val images of {meta['channels']}x{meta['size']}x{meta['size']}, {len(meta['classes'])} classes, "
              f"from {meta['source']['name']}")
        return 0
    if not args.src or not args.dest:
        raise UsageError("give SRC and DEST, e.g. python -m largebatch.data.pack /data/imagenet imagenet-128.lbpack "
                         "--size 128")
    if args.workers < 0:
        raise UsageError(f"--workers {args.workers} is not allowed: use 0 (decode in this process) or more")
    pack(args.src, args.dest, args.size, args.workers, args.on_corrupt, tuple(args.overrides))
    return 0


def cli() -> None:
    """Console-script entry point."""
    run_cli(main)


if __name__ == "__main__":
    cli()
