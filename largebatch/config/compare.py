"""A config's identity: its flat form, its hash, the keys in which two configs differ, and the
model keys a run's model does not use."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from largebatch.config.schema import MODELS

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


ADAPTIVE_FIXED = frozenset({"train.max_micro_batch"})
"""Safe keys that a run with adaptive.enabled may not change: the micro-batch is the noise scale's
small batch and splits every candidate batch."""


def config_differences(saved: dict, current: dict) -> list[tuple[str, Any, Any]]:
    """(key, saved value, current value) for the keys that differ, other than the safe ones."""
    a, b = flat_config(saved), flat_config(current)
    safe = SAFE_TO_CHANGE - ADAPTIVE_FIXED if a.get("adaptive.enabled") or b.get("adaptive.enabled") else SAFE_TO_CHANGE
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if k not in safe and a.get(k) != b.get(k)]


PUBLISHED_MODELS = ("resnet9", "resnet18", "resnet50", "alexnet_bn")
"""The zoo's models of fixed, published widths (they ignore model.width)."""


def ignored_model_keys(name: str) -> tuple[tuple[str, ...], str]:
    """The model.* keys a run of ``model.name`` does not use, and why, in words: a model passed in
    is used as built; timm's, torchvision's and a factory's take model.options alone; the zoo's
    take norm, width and zero_init_residual, not options, and its published models ignore width."""
    if name.startswith("python:"):
        return (("model.norm", "model.width", "model.zero_init_residual", "model.options"),
                f"a model passed to largebatch.fit() ({name[len('python:'):]}) is used as it was built")
    if name not in MODELS:
        return (("model.norm", "model.width", "model.zero_init_residual"),
                f"model.name={name} builds its own layers and takes only model.options")
    if name in PUBLISHED_MODELS:
        return ("model.width", "model.options"), f"the zoo's {name} has a fixed width and takes no model.options"
    return ("model.options",), f"the zoo's {name} takes model.norm, model.width and model.zero_init_residual"
