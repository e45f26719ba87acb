"""Checkpoints: what a run needs to continue exactly, written atomically, read as data only.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts, so that
``torch.load(path, weights_only=True)`` reads it: a checkpoint is data, never code. Files are
``checkpoints/step-<step>.pt`` (the newest ``checkpoint.keep`` are kept) plus ``final.pt``.

Under ``comm.shard=full`` a step checkpoint is a folder, ``checkpoints/step-<step>.dcp/``: each
worker's shards of the model and optimizer state in ``torch.distributed.checkpoint``'s files
(tensors only) and ``meta.pt``, the rest of the checkpoint (position, RNG states, config...) as
above. It is written as ``.step-<step>.dcp.tmp/`` and renamed once every file is on disk, so it
appears whole or not at all; it loads on any number of workers. ``final.pt`` stays one file with
the whole model.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import sys
import time
from typing import Any, Optional

import torch

from largebatch.errors import UsageError
from largebatch.fileio import fsync_dir, publish_tree, remove_tree, save_torch_atomic

FORMAT = 1
_NAME = re.compile(r"^step-(\d+)\.(pt|dcp)$")
SHARDED = ".dcp"
"""The suffix of a sharded checkpoint's folder."""
META = "meta.pt"
"""In a sharded checkpoint's folder: everything but the model and optimizer tensors."""

def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def list_checkpoints(run_dir: str) -> list[str]:
    """Step checkpoints (``.pt`` files and ``.dcp`` folders), newest first."""
    found = []
    for path in glob.glob(os.path.join(checkpoint_dir(run_dir), "step-*")):
        m = _NAME.match(os.path.basename(path))
        if m and (os.path.isdir(path) if m.group(2) == "dcp" else os.path.isfile(path)):
            found.append((int(m.group(1)), path))
    return [p for _, p in sorted(found, reverse=True)]


def is_sharded(path: str) -> bool:
    """Whether ``path`` names a sharded checkpoint (a ``.dcp`` folder)."""
    return path.rstrip(os.sep).endswith(SHARDED) and os.path.isdir(path)


def _remove(path: str) -> None:
    if os.path.isdir(path):
        remove_tree(path)
    else:
        os.unlink(path)


def _rotate(run_dir: str, keep: int) -> None:
    """Drop all but the newest ``keep`` step checkpoints, and what a crash left half-written."""
    folder = checkpoint_dir(run_dir)
    for old in list_checkpoints(run_dir)[keep:]:
        _remove(old)
    for stale in glob.glob(os.path.join(folder, ".step-*" + SHARDED + ".*")):
        shutil.rmtree(stale, ignore_errors=True)
    fsync_dir(folder)


def _new_aside_folder(run_dir: str, now: float) -> str:
    """Create and return ``checkpoints/replaced-<UTC time>/``, e.g. ``replaced-20261204-031500``
    (readable, and sorted by time as text); a second one in the same second gets ``-2``, ``-3``..."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now))
    os.makedirs(checkpoint_dir(run_dir), exist_ok=True)
    for n in range(1, 10_000):
        folder = os.path.join(checkpoint_dir(run_dir), f"replaced-{stamp}" + (f"-{n}" if n > 1 else ""))
        try:
            os.mkdir(folder)
            return folder
        except FileExistsError:
            continue
    raise OSError(f"cannot find a free name for replaced-{stamp} in {checkpoint_dir(run_dir)}")


def move_aside(run_dir: str, now: Optional[float] = None) -> Optional[str]:
    """Move the step checkpoints of an earlier run into ``checkpoints/replaced-<UTC time>/`` (kept,
    but no longer found by ``resume: auto``); ``now``: the time to name it by (default: now).
    Returns that folder, or None when there was nothing."""
    found = list_checkpoints(run_dir)
    if not found:
        return None
    folder = _new_aside_folder(run_dir, time.time() if now is None else now)
    for path in found:
        os.replace(path, os.path.join(folder, os.path.basename(path)))
    fsync_dir(checkpoint_dir(run_dir))
    print(f"largebatch: warning: moved {len(found)} earlier checkpoint(s) to {folder}", file=sys.stderr, flush=True)
    return folder


def save(state: dict, run_dir: str, step: int, keep: int) -> str:
    """Write ``step-<step>.pt`` atomically, then drop all but the newest ``keep`` step checkpoints."""
    path = os.path.join(checkpoint_dir(run_dir), f"step-{step:09d}.pt")
    save_torch_atomic({"format": FORMAT, **state}, path)
    _rotate(run_dir, keep)
    return path


def sharded_paths(run_dir: str, step: int) -> tuple[str, str]:
    """(the folder the workers write a sharded checkpoint into, the folder it is renamed to)."""
    name = f"step-{step:09d}{SHARDED}"
    return os.path.join(checkpoint_dir(run_dir), f".{name}.tmp"), os.path.join(checkpoint_dir(run_dir), name)


def begin_sharded(run_dir: str, step: int) -> str:
    """Rank 0, before any worker writes its shards: an empty folder to write them into (what an
    interrupted earlier attempt left there is removed). Returns its path."""
    tmp, _ = sharded_paths(run_dir, step)
    if os.path.isdir(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    return tmp


def finish_sharded(state: dict, run_dir: str, step: int, keep: int) -> str:
    """Rank 0, once every worker has written its shards: ``meta.pt`` (``state``: everything but the
    tensors) beside them, every file fsync'd, the folder renamed to ``step-<step>.dcp``; then all
    but the newest ``keep`` step checkpoints are dropped. Returns the folder."""
    tmp, path = sharded_paths(run_dir, step)
    save_torch_atomic({"format": FORMAT, **state}, os.path.join(tmp, META))
    publish_tree(tmp, path)
    _rotate(run_dir, keep)
    return path


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    reason = text.splitlines()[0] if text else type(exc).__name__
    return f"{type(exc).__name__}: {reason[:200]}"


def load(path: str) -> dict:
    """Read a checkpoint as data; raise ValueError with the reason when it cannot be used. A
    sharded checkpoint gives its ``meta.pt`` (with ``path``, the folder, set), after a check that
    every shard file its metadata names is there whole; the tensors are read when resuming."""
    sharded = is_sharded(path)
    try:
        state = torch.load(os.path.join(path, META) if sharded else path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated file, pickled code, not a torch file at all
        if sharded and isinstance(exc, FileNotFoundError):
            raise ValueError(f"its {META} is missing") from None
        raise ValueError(_reason(exc)) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or sharded != ("shards" in state):
        raise ValueError(f"not a largebatch checkpoint of format {FORMAT}")
    if sharded:
        from largebatch.distributed.sharded_state import check_files  # torch.distributed.checkpoint: slow to import

        check_files(path)
        state["path"] = path
    return state


def find_resume_state(run_dir: str, resume: str, warn=lambda m: print(m, file=sys.stderr)) -> Optional[dict]:
    """The checkpoint to resume from: ``never`` -> None; ``auto`` -> the newest that loads (older ones
    are tried when the newest is damaged); otherwise ``resume`` is a path that must load."""
    if resume == "never":
        return None
    if resume != "auto":
        if not (os.path.isfile(resume) or is_sharded(resume)):
            what = "is a folder but not a sharded checkpoint (.dcp)" if os.path.isdir(resume) else "does not exist"
            raise UsageError(f"checkpoint.resume='{resume}' {what}; give a checkpoint file or .dcp folder, auto or "
                             "never")
        try:
            return load(resume)
        except ValueError as exc:
            raise UsageError(f"checkpoint '{resume}' cannot be loaded ({exc}); give another file") from None
    for path in list_checkpoints(run_dir):
        try:
            state = load(path)
        except ValueError as exc:
            warn(f"largebatch: warning: skipping checkpoint {path}: {exc}; trying the previous one")
            continue
        state["path"] = path
        return state
    return None


def rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
