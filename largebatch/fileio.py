"""Atomic writes: a temporary file in the target's folder, flushed and fsync'd, then renamed.

A reader (or a crash) sees either the old file or the new one, never a partial one. Folders
(sharded checkpoints) follow the same rule: written under a hidden name, their files fsync'd,
then renamed into place.
"""

from __future__ import annotations

import io
import os
import tempfile
from typing import Any


def fsync_dir(folder: str) -> None:
    """Make a rename inside ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes_atomic(data: bytes, path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix="-" + os.path.basename(path))
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(folder)


def save_torch_atomic(obj: Any, path: str) -> None:
    """``torch.save`` to ``path`` atomically."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes_atomic(buf.getvalue(), path)


def fsync_tree(folder: str) -> None:
    """Make every file directly in ``folder``, and the folder's entries, durable."""
    for entry in os.scandir(folder):
        if entry.is_file(follow_symlinks=False):
            fd = os.open(entry.path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fsync_dir(folder)


def remove_tree(path: str) -> None:
    """Delete the folder ``path`` so that it disappears at once: it is renamed to a hidden name in
    the same folder first (a crash mid-way leaves that hidden folder, never a partial ``path``)."""
    import shutil

    parent, name = os.path.split(os.path.abspath(path))
    doomed = os.path.join(parent, f".{name}.deleting-{os.getpid()}")
    os.replace(path, doomed)
    fsync_dir(parent)
    shutil.rmtree(doomed, ignore_errors=True)


def publish_tree(tmp: str, path: str) -> None:
    """Rename the finished folder ``tmp`` to ``path``, durably: its files are fsync'd first, so
    ``path`` appears whole or not at all. A folder already at ``path`` (a damaged checkpoint of the
    same step, written again) is renamed to a hidden name first and deleted only once the new one
    is in place."""
    import shutil

    fsync_tree(tmp)
    parent, name = os.path.split(os.path.abspath(path))
    old = None
    if os.path.isdir(path):
        old = os.path.join(parent, f".{name}.deleting-{os.getpid()}")
        os.replace(path, old)
    os.replace(tmp, path)
    fsync_dir(parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
