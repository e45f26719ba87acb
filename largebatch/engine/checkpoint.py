"""Checkpoints: what a run needs to continue exactly, written atomically, read as data only.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts, so that
``torch.load(path, weights_only=True)`` reads it: a checkpoint is data, never code. Files are
``checkpoints/step-<step>.pt`` (the newest ``checkpoint.keep`` are kept) plus ``final.pt``.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import sys
import time
from typing import Any, Optional

import torch

from largebatch.errors import UsageError
from largebatch.fileio import fsync_dir, save_torch_atomic

FORMAT = 1
_NAME = re.compile(r"^step-(\d+)\.pt$")

# Keys that may differ between a checkpoint and the run resuming it.
SAFE_TO_CHANGE = frozenset({
    "run.dir", "run.cost_per_node_hour", "train.epochs", "train.target_accuracy", "train.target_metric",
    "train.stop_at_target", "train.log_every_steps", "train.eval_batch", "train.max_micro_batch",
    "train.device", "train.channels_last", "train.compile", "data.device_cache",
    "data.root", "data.num_workers", "data.cache", "data.train_samples", "data.on_corrupt", "comm.backend",
    "comm.bucket_mb", "comm.bucket_candidates_mb", "comm.master_addr",
    "comm.timeout_s", "checkpoint.every_steps", "checkpoint.at_epoch_end", "checkpoint.keep",
    "checkpoint.resume", "log.tensorboard",
})


def flat_config(cfg_dict: dict) -> dict:
    return {f"{s}.{k}": v for s, body in cfg_dict.items() for k, v in body.items()}


def config_hash(cfg_dict: dict) -> str:
    return hashlib.sha256(json.dumps(flat_config(cfg_dict), sort_keys=True, default=str).encode()).hexdigest()[:16]


def config_differences(saved: dict, current: dict) -> list[tuple[str, Any, Any]]:
    """(key, saved value, current value) for the keys that differ, other than the safe ones."""
    a, b = flat_config(saved), flat_config(current)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if k not in SAFE_TO_CHANGE and a.get(k) != b.get(k)]


def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def list_checkpoints(run_dir: str) -> list[str]:
    """Step checkpoints, newest first."""
    found = []
    for path in glob.glob(os.path.join(checkpoint_dir(run_dir), "step-*.pt")):
        m = _NAME.match(os.path.basename(path))
        if m:
            found.append((int(m.group(1)), path))
    return [p for _, p in sorted(found, reverse=True)]


def move_aside(run_dir: str) -> Optional[str]:
    """Move the step checkpoints of an earlier run into ``checkpoints/replaced-<time>/`` (kept, but
    no longer found by ``resume: auto``). Returns that folder, or None when there was nothing."""
    found = list_checkpoints(run_dir)
    if not found:
        return None
    folder = os.path.join(checkpoint_dir(run_dir), f"replaced-{int(time.time())}")
    os.makedirs(folder, exist_ok=True)
    for path in found:
        os.replace(path, os.path.join(folder, os.path.basename(path)))
    fsync_dir(checkpoint_dir(run_dir))
    print(f"largebatch: warning: moved {len(found)} earlier checkpoint(s) to {folder}", file=sys.stderr, flush=True)
    return folder


def save(state: dict, run_dir: str, step: int, keep: int) -> str:
    """Write ``step-<step>.pt`` atomically, then drop all but the newest ``keep`` step checkpoints."""
    path = os.path.join(checkpoint_dir(run_dir), f"step-{step:09d}.pt")
    save_torch_atomic({"format": FORMAT, **state}, path)
    for old in list_checkpoints(run_dir)[keep:]:
        os.unlink(old)
    fsync_dir(checkpoint_dir(run_dir))
    return path


def load(path: str) -> dict:
    """Read a checkpoint as data; raise ValueError with the reason when it cannot be used."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated file, pickled code, not a torch file at all
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{type(exc).__name__}: {reason[:200]}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"not a largebatch checkpoint of format {FORMAT}")
    return state


def find_resume_state(run_dir: str, resume: str, warn=lambda m: print(m, file=sys.stderr)) -> Optional[dict]:
    """The checkpoint to resume from: ``never`` -> None; ``auto`` -> the newest that loads (older ones
    are tried when the newest is damaged); otherwise ``resume`` is a path that must load."""
    if resume == "never":
        return None
    if resume != "auto":
        if not os.path.isfile(resume):
            raise UsageError(f"checkpoint.resume='{resume}' does not exist; give a checkpoint file, auto or never")
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
