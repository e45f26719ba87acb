"""The packed format: fixed-size uint8 images in one memory-mapped file, read with no decoding.

Made by ``python -m largebatch.data.pack SRC DEST`` (see :mod:`largebatch.data.pack`), read with
``data.name=packed data.root=DEST``. Layout, little-endian:

    offset 0     header (HEADER below), zero-padded to 4096 bytes
    4096         train images, uint8 (N_train, S, S, C), C-order (rows of pixels, channels last,
                 as image files decode)
                 val images, uint8 (N_val, S, S, C)
                 train labels, int64 (N_train,); val labels, int64 (N_val,)
                 train index, val index: the source name of each image (its path under the source
                 folder, or split:position), UTF-8, one per line
                 metadata: UTF-8 JSON (size, channels, classes, per-channel mean and std of the
                 training images, the source, and every region's offset)

The header holds the magic bytes, the format version, the file's length, where the metadata
is, a SHA-256 of the metadata, labels and index (checked each time the file is opened), and a
SHA-256 of the image bytes (checked by ``python -m largebatch.data.pack --verify FILE``, which
reads the whole file). A file of another format version is refused before anything else in it is
read.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from largebatch.data.augment import flips, to_float, transform_uint8
from largebatch.data.base import ImageDataset
from largebatch.errors import UsageError
from largebatch.fileio import fsync_dir
from largebatch.version import __version__

MAGIC = b"LBPACK\x00\x00"
VERSION = 1
HEADER = struct.Struct("<8sIIQQQ32s32s")
"""magic, format version, header bytes, file bytes, metadata offset, metadata bytes,
SHA-256 of (metadata, labels, index), SHA-256 of the image bytes."""
HEADER_BYTES = 4096
SPLITS = ("train", "val")
_REPACK = "python -m largebatch.data.pack SRC {path}"


def _fail(path: str, problem: str, fix: Optional[str] = None) -> UsageError:
    return UsageError(f"'{path}' {problem}; {fix or 're-pack it with ' + _REPACK.format(path=path)}")


def read_meta(path: Optional[str]) -> dict:
    """The metadata of the packed file at ``path``, after checking its magic, version, length and
    the checksum of everything but the image bytes. Any problem is a UsageError naming the file."""
    if not path:
        raise UsageError("data.name=packed needs data.root, the file made by python -m largebatch.data.pack SRC DEST")
    if os.path.isdir(path):
        raise _fail(path, "is a folder, not a packed file", "point data.root at the file made by "
                    "python -m largebatch.data.pack SRC DEST")
    if not os.path.isfile(path):
        raise _fail(path, "does not exist", "make it with python -m largebatch.data.pack SRC DEST or fix data.root")
    with open(path, "rb") as fh:
        head = fh.read(HEADER.size)
        if len(head) < 12 or head[:8] != MAGIC:
            raise _fail(path, "is not a largebatch packed file (no LBPACK header)",
                        "make one with " + _REPACK.format(path=path))
        version = struct.unpack_from("<I", head, 8)[0]
        if version != VERSION:
            raise _fail(path, f"is packed format version {version}, and this largebatch reads version {VERSION} only")
        if len(head) < HEADER.size:
            raise _fail(path, "is truncated inside its header")
        _, _, _, file_bytes, meta_offset, meta_bytes, meta_sha, _ = HEADER.unpack(head)
        actual = os.path.getsize(path)
        if actual != file_bytes:
            raise _fail(path, f"is {actual} bytes long but its header says {file_bytes}: it is truncated or "
                        "was changed",
                        "copy it again or re-pack it with " + _REPACK.format(path=path))
        fh.seek(meta_offset)
        raw = fh.read(meta_bytes)
        digest = hashlib.sha256(raw)
        try:
            meta = json.loads(raw)
            parts = [meta["splits"][split] for split in SPLITS]
            regions = [(p["labels"], 8 * p["count"]) for p in parts] + [(p["index"], p["index_bytes"]) for p in parts]
            for start, length in regions:
                fh.seek(start)
                digest.update(fh.read(length))
        except (ValueError, KeyError, TypeError):
            raise _fail(path, "has damaged metadata (checksum mismatch)", "copy it again or re-pack it with "
                        + _REPACK.format(path=path)) from None
        if digest.digest() != meta_sha:
            raise _fail(path, "fails its checksum: the metadata, labels or index are damaged",
                        "copy it again or re-pack it with " + _REPACK.format(path=path))
    return meta


def verify_images(path: str, chunk: int = 1 << 24) -> None:
    """Check the image bytes against the header's SHA-256 (reads the whole file); UsageError if not."""
    meta = read_meta(path)
    with open(path, "rb") as fh:
        expected = HEADER.unpack(fh.read(HEADER.size))[7]
        digest = hashlib.sha256()
        for split in SPLITS:
            part = meta["splits"][split]
            fh.seek(part["images"])
            left = part["count"] * meta["channels"] * meta["size"] ** 2
            while left:
                block = fh.read(min(chunk, left))
                if not block:
                    break
                digest.update(block)
                left -= len(block)
    if digest.digest() != expected:
        raise _fail(path, "fails its image checksum: image bytes are damaged",
                    "copy it again or re-pack it with " + _REPACK.format(path=path))


def read_index(path: str, meta: dict, split: str) -> list[str]:
    """The source name of each image of ``split``."""
    part = meta["splits"][split]
    with open(path, "rb") as fh:
        fh.seek(part["index"])
        text = fh.read(part["index_bytes"]).decode()
    return text.split("\n") if part["count"] else []


class PackedImages(ImageDataset):
    """One split of a packed file. The memory map is opened lazily in each process (loader
    workers included), so the dataset pickles as a path and offsets."""

    def __init__(self, path: str, meta: dict, split: str, image_size: int):
        part = meta["splits"][split]
        self.path, self.split, self.count, self.offset = path, split, part["count"], part["images"]
        self.channels, self.stored_size, self.image_size = meta["channels"], meta["size"], image_size
        with open(path, "rb") as fh:
            fh.seek(part["labels"])
            self.labels = torch.from_numpy(np.frombuffer(fh.read(8 * self.count), dtype="<i8").astype(np.int64))
        self.mean = torch.tensor(meta["mean"], dtype=torch.float32)
        self.std = torch.tensor(meta["std"], dtype=torch.float32)
        self._images: Optional[np.memmap] = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_images"] = None
        return state

    def __len__(self) -> int:
        return self.count

    def describe(self, index: int) -> str:
        return f"{self.path} {self.split} image {index}"

    def array(self) -> np.ndarray:
        if self._images is None:
            c, s = self.channels, self.stored_size
            self._images = np.memmap(self.path, dtype=np.uint8, mode="r", offset=self.offset,
                                     shape=(self.count, s, s, c))
        return self._images

    def uint8_stats(self):
        return self.mean, self.std

    def _load(self, indices, size, aug, draws):
        batch, labels, skipped = self._load_uint8(indices, size, aug, draws)
        return to_float(batch, self.mean, self.std, flips(draws)), labels, skipped

    def _load_uint8(self, indices, size, aug, draws):
        stored = np.asarray(self.array()[np.asarray(indices, dtype=np.int64)])
        if aug is not None:
            batch = np.empty((len(indices), size, size, self.channels), dtype=np.uint8)
            for k, image in enumerate(stored):
                batch[k] = transform_uint8(image, size, aug, draws[k])
        elif size != self.stored_size:  # one resize for the batch (each image resized on its own)
            x = F.interpolate(torch.from_numpy(stored).permute(0, 3, 1, 2), size=(size, size), mode="bilinear",
                              align_corners=False, antialias=size < self.stored_size)
            batch = x.permute(0, 2, 3, 1).numpy()
        else:
            batch = stored
        labels = self.labels[torch.as_tensor(indices, dtype=torch.long)]
        return batch, labels, []


def load_packed(path: Optional[str], image_size: Optional[int]):
    """(train, val, metadata) of the packed file at ``path``, giving images of ``image_size``
    (null: the packed size). Sizes above the packed size are refused."""
    meta = read_meta(path)
    size = image_size or meta["size"]
    if size > meta["size"]:
        raise UsageError(f"data.image_size={size} is larger than the {meta['size']} pixels '{path}' was packed at; "
                         f"re-pack it with --size {size} or use a size <= {meta['size']}")
    return PackedImages(path, meta, "train", size), PackedImages(path, meta, "val", size), meta


class PackWriter:
    """Writes a packed file: ``add`` the train images, then the val images, then ``finish``.

    The file is written to a temporary name in the destination's folder, fsync'd and renamed
    into place by ``finish``, so a crash or an error never leaves a partial file at ``path``.
    """

    def __init__(self, path: str, channels: int, size: int):
        self.path, self.channels, self.size = path, channels, size
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        self.tmp = os.path.join(folder, f".tmp-{os.getpid()}-{os.path.basename(path)}")
        self.fh = open(self.tmp, "wb")
        self.fh.write(b"\0" * HEADER_BYTES)
        self.data_sha = hashlib.sha256()
        self.splits = {s: dict(images=None, count=0, labels=[], index=[]) for s in SPLITS}
        self.current = None
        c = channels
        self.sum, self.sq, self.pixels = np.zeros(c), np.zeros(c), 0

    def add(self, split: str, images: np.ndarray, labels, names: list[str]) -> None:
        """Append uint8 images (N, S, S, C) of ``split`` ('train' then 'val', in that order)."""
        assert images.dtype == np.uint8 and images.shape[1:] == (self.size, self.size, self.channels), images.shape
        if split != self.current:
            assert self.current is None or SPLITS.index(split) > SPLITS.index(self.current), "train before val"
            self.current = split
            self.splits[split]["images"] = self.fh.tell()
        data = np.ascontiguousarray(images)
        self.fh.write(memoryview(data).cast("B"))
        self.data_sha.update(memoryview(data).cast("B"))
        part = self.splits[split]
        part["count"] += len(data)
        part["labels"].extend(int(y) for y in labels)
        part["index"].extend(n.replace("\n", "?") for n in names)
        if split == "train" and len(data):
            flat = data.reshape(-1, self.channels).astype(np.float64) / 255.0
            self.sum += flat.sum(axis=0)
            self.sq += (flat * flat).sum(axis=0)
            self.pixels += flat.shape[0]

    def finish(self, classes: list[str], source: dict, skipped: list[str], mean=None, std=None) -> dict:
        """Write labels, index, metadata and header; move the file into place. Returns the metadata.
        ``mean`` and ``std``: per-channel statistics to store (in [0, 1] units); by default those of
        all the training images written."""
        if mean is None or std is None:
            n = max(self.pixels, 2)
            mean = self.sum / n
            std = np.sqrt(np.maximum(self.sq - n * mean * mean, 0.0) / (n - 1))
        meta_sha = hashlib.sha256()
        regions = {}
        for split in SPLITS:
            part = self.splits[split]
            if part["images"] is None:
                part["images"] = self.fh.tell()
        blobs = []
        for split in SPLITS:
            labels = np.asarray(self.splits[split]["labels"], dtype="<i8").tobytes()
            regions[split] = dict(labels=self.fh.tell())
            self.fh.write(labels)
            blobs.append(labels)
        for split in SPLITS:
            index = "\n".join(self.splits[split]["index"]).encode()
            regions[split].update(index=self.fh.tell(), index_bytes=len(index))
            self.fh.write(index)
            blobs.append(index)
        meta = dict(version=VERSION, layout="NHWC", channels=self.channels, size=self.size, classes=list(classes),
                    mean=[float(m) for m in mean], std=[float(max(s, 1e-3)) for s in std], source=source,
                    skipped=skipped, largebatch=__version__,
                    splits={s: dict(count=self.splits[s]["count"], images=self.splits[s]["images"], **regions[s])
                            for s in SPLITS})
        raw = json.dumps(meta).encode()
        meta_offset = self.fh.tell()
        self.fh.write(raw)
        meta_sha.update(raw)
        for blob in blobs:
            meta_sha.update(blob)
        total = self.fh.tell()
        self.fh.seek(0)
        self.fh.write(HEADER.pack(MAGIC, VERSION, HEADER_BYTES, total, meta_offset, len(raw), meta_sha.digest(),
                                  self.data_sha.digest()))
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        os.replace(self.tmp, self.path)
        fsync_dir(os.path.dirname(os.path.abspath(self.path)))
        return meta

    def abort(self) -> None:
        """Drop the temporary file (after an error)."""
        if not self.fh.closed:
            self.fh.close()
        if os.path.exists(self.tmp):
            os.unlink(self.tmp)
