"""A config's identity: its flat form, its hash, and the keys in which two configs differ."""

from __future__ import annotations

import hashlib
import json
from typing import Any

SAFE_TO_CHANGE = frozenset({
    "run.dir", "run.cost_per_node_hour", "train.epochs", "train.target_accuracy", "train.target_metric",
    "train.stop_at_target", "train.log_every_steps", "train.eval_batch", "train.max_micro_batch",
    "train.device", "train.channels_last", "train.compile", "data.device_cache",
    "data.root", "data.num_workers", "data.cache", "data.train_samples", "data.on_corrupt", "comm.backend",
    "comm.bucket_mb", "comm.bucket_candidates_mb", "comm.master_addr",
    "comm.timeout_s", "comm.shard", "checkpoint.every_steps", "checkpoint.at_epoch_end", "checkpoint.keep",
    "checkpoint.resume", "log.tensorboard", "train.noise_scale", "train.precise_bn_images",
})
"""Keys that may differ between a checkpoint and the run resuming it."""


def flat_config(cfg_dict: dict) -> dict:
    """``{"section.key": value}`` for a config as :func:`largebatch.config.to_dict` gives it."""
    return {f"{s}.{k}": v for s, body in cfg_dict.items() for k, v in body.items()}


def config_hash(cfg_dict: dict) -> str:
    return hashlib.sha256(json.dumps(flat_config(cfg_dict), sort_keys=True, default=str).encode()).hexdigest()[:16]


def config_differences(saved: dict, current: dict) -> list[tuple[str, Any, Any]]:
    """(key, saved value, current value) for the keys that differ, other than the safe ones."""
    a, b = flat_config(saved), flat_config(current)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if k not in SAFE_TO_CHANGE and a.get(k) != b.get(k)]
