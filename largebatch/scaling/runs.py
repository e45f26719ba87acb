"""A measured run as the advice reads it: the steps and the noise scale per epoch of a run folder
trained with ``train.noise_scale=true``, up to its target; the steps a second run at another global
batch took to the same target; and the short probe runs that make them.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

import yaml

from largebatch.batching import micro_batch_of
from largebatch.errors import UsageError
from largebatch.report import read_metrics
from largebatch.scaling.measure import checkpoint_facts
from largebatch.scaling.steps import Segment

__all__ = ["Measured", "SecondRun", "read_run", "read_second_run", "fill_gaps", "train_probe", "train_second_probe"]


@dataclass
class Measured:
    """What a run folder says about the steps and the noise."""

    run_dir: str
    segments: list
    """:class:`Segment` per epoch up to the target."""
    target: str
    """What 'reaching the run's target' means, in words."""
    global_batch: int
    world_size: int
    micro_batch: int
    """The run's micro-batch (of its first phase)."""
    per_worker_batch: int
    """The run's per-worker batch (of its first phase)."""
    num_train: int
    """Training images, from the steps per epoch (floor(images / batch) steps)."""
    images_per_second: Optional[float]
    """The run's training throughput over all workers."""
    gradient_bytes: Optional[float]
    """Parameters x 4 bytes, from checkpoints/final.pt."""
    has_batchnorm: Optional[bool]
    """Whether the model has BatchNorm layers, from checkpoints/final.pt; None: not known."""
    cost_per_node_hour: Optional[float]
    target_accuracy: Optional[float] = None
    """The validation top-1 the segments run to; None: the run's end."""
    final_loss: Optional[float] = None
    """The run's train_loss at its last epoch: the target of a second run without ``target_accuracy``."""
    epochs: int = 0
    """Epochs the run trained."""


@dataclass(frozen=True)
class SecondRun:
    """A second run's steps to the first run's target."""

    run_dir: str
    global_batch: int
    steps: float
    target: str
    """What reaching the target meant, in words."""


def fill_gaps(values: list) -> list[float]:
    """None entries replaced by the nearest defined value (later ones first)."""
    out = list(values)
    for i, v in enumerate(out):
        if v is None:
            later = next((x for x in values[i + 1:] if x is not None), None)
            earlier = next((x for x in reversed(values[:i]) if x is not None), None)
            out[i] = later if later is not None else earlier
    return [float(v) for v in out]


def _read_folder(run_dir: str, noise: bool = True) -> tuple[list[dict], dict, dict, str]:
    """(epoch lines, last summary line, config, path of config.yaml) of a run trained with the noise
    scale (``noise``), or of any run."""
    metrics, config = os.path.join(run_dir, "metrics.jsonl"), os.path.join(run_dir, "config.yaml")
    for f in (metrics, config):
        if not os.path.isfile(f):
            raise UsageError(f"'{run_dir}' is not a run folder: {os.path.basename(f)} is missing; give the run.dir "
                             "of a run trained with train.noise_scale=true, or use --probe")
    lines = read_metrics(metrics)
    with open(config) as fh:
        cfg = yaml.safe_load(fh) or {}
    epochs = [x for x in lines if x.get("event") == "epoch"]
    summaries = [x for x in lines if x.get("event") == "summary"]
    summary = summaries[-1] if summaries else {}
    if not epochs:
        raise UsageError(f"{metrics} has no epoch line: the run ended before its first epoch; train it longer")
    if (cfg.get("adaptive") or {}).get("enabled"):
        raise UsageError(f"'{run_dir}' was trained with adaptive.enabled=true: its global batch changed while it "
                         "trained, and the advice needs runs at one global batch each; give such a run, or use --probe")
    if noise and not any("noise_scale" in e for e in epochs):
        raise UsageError(f"'{run_dir}' was trained without train.noise_scale=true: its epochs carry no noise_scale; "
                         "train it again with train.noise_scale=true, or use --probe")
    return epochs, summary, cfg, config


def _segments_to(run_dir: str, epochs: list[dict], batches: list[int], scales: list[float],
                 target: Optional[float], reason: str) -> tuple[list[Segment], str]:
    """(the segments up to ``target`` validation top-1, what reaching it means in words); the whole
    run without a target."""
    steps_before, accs = 0, [0.0]
    segments = []
    if target is None:
        for e, b, s in zip(epochs, batches, scales):
            segments.append(Segment(e["step"] - steps_before, b, s))
            steps_before = e["step"]
        loss = epochs[-1].get("train_loss")
        loss = f"{loss:.4g}" if isinstance(loss, (int, float)) else "not recorded"
        return segments, f"the run's end: {epochs[-1]['step']} steps, train_loss {loss}"
    for e, b, s in zip(epochs, batches, scales):
        acc, last = e.get("val_acc"), accs[-1]
        span = e["step"] - steps_before
        if acc is not None and acc >= target:
            share = 1.0 if acc == last else min(1.0, max(0.0, (target - last) / (acc - last)))
            segments.append(Segment(span * share, b, s))
            break
        segments.append(Segment(span, b, s))
        steps_before = e["step"]
        accs.append(acc if acc is not None else last)
    else:
        best = max((e.get("val_acc") or 0.0) for e in epochs)
        raise UsageError(f"'{run_dir}' never reached val_acc {target:g} (best {best:.4f}); give a lower "
                         "--target-accuracy, or train the run longer")
    return segments, f"val_acc {target:g} ({reason}) after {sum(s.steps for s in segments):.0f} steps"


def read_run(run_dir: str, target_accuracy: Optional[float] = None) -> Measured:
    """The measured segments of ``run_dir`` up to its target: ``target_accuracy`` (validation top-1,
    its first crossing interpolated within the epoch), else the run's train.target_accuracy where it
    reached it, else the whole run (the loss it ended at)."""
    epochs, summary, cfg, config = _read_folder(run_dir)
    train, run = cfg.get("train", {}), cfg.get("run", {})
    world = int(summary.get("world_size") or 1)
    base_batch = int(train.get("global_batch", 0) or 0)
    batches = [int(e.get("global_batch") or base_batch) for e in epochs]
    if min(batches) < 1:
        raise UsageError(f"{config} gives no train.global_batch; the folder is damaged")
    scales = [e.get("noise_scale") for e in epochs]
    if all(s is None for s in scales):
        raise UsageError(f"'{run_dir}': the gradient's noise swamped |G|² in every epoch (its estimate was <= 0), "
                         "so there is no noise scale; measure with a larger batch or a longer run")
    target, reason = target_accuracy, "--target-accuracy"
    if target is None and train.get("target_accuracy") is not None and summary.get("epoch_to_target") is not None \
            and train.get("target_metric", "top1") == "top1":
        target, reason = float(train["target_accuracy"]), "the run's train.target_accuracy"
    segments, what = _segments_to(run_dir, epochs, batches, fill_gaps(scales), target, reason)
    first = epochs[0]
    spe = first["step"]
    per_worker = batches[0] // world
    micro = micro_batch_of(per_worker, train.get("max_micro_batch"))
    gradient_bytes, has_batchnorm = checkpoint_facts(run_dir)
    loss = epochs[-1].get("train_loss")
    return Measured(run_dir=run_dir, segments=segments, target=what, global_batch=batches[0], world_size=world,
                    micro_batch=micro, per_worker_batch=per_worker, num_train=max(spe, 1) * batches[0],
                    images_per_second=summary.get("samples_per_sec") or first.get("samples_per_sec"),
                    gradient_bytes=gradient_bytes, has_batchnorm=has_batchnorm,
                    cost_per_node_hour=run.get("cost_per_node_hour"), target_accuracy=target,
                    final_loss=float(loss) if isinstance(loss, (int, float)) else None, epochs=len(epochs))


def _one_batch(run_dir: str, batches: list[int], upto: int) -> int:
    """The global batch of the first ``upto`` epochs; UsageError where it changes among them (two
    runs are two points of the steps-against-batch curve, each at one batch)."""
    changed = next((i for i, b in enumerate(batches[:upto]) if b != batches[0]), None)
    if changed is not None:
        raise UsageError(f"'{run_dir}' changes its global batch from {batches[0]} to {batches[changed]} at epoch "
                         f"{changed + 1}, before its target: two runs need one global batch each; give runs without "
                         "train.phases or adaptive.enabled")
    return batches[0]


def _steps_to_loss(run_dir: str, epochs: list[dict], loss: float) -> Optional[float]:
    """The steps at which the epochs' train_loss first falls to ``loss``, interpolated between the
    epoch ends around the crossing (a crossing in the first epoch counts the whole epoch); None if
    it never does."""
    before_step, before_loss = 0, None
    for e in epochs:
        now = e.get("train_loss")
        if isinstance(now, (int, float)) and math.isfinite(now) and now <= loss:
            if before_loss is None or before_loss == now:
                return float(e["step"])
            share = min(1.0, max(0.0, (before_loss - loss) / (before_loss - now)))
            return before_step + share * (e["step"] - before_step)
        if isinstance(now, (int, float)) and math.isfinite(now):
            before_step, before_loss = e["step"], now
    return None


def read_second_run(run_dir: str, first: Measured) -> SecondRun:
    """The steps ``run_dir`` took to ``first``'s target: its validation top-1
    (``first.target_accuracy``), else the train_loss ``first`` ended at. UsageError (one line) where
    it never reached it, or where either run changes its global batch before the target."""
    _one_batch(first.run_dir, [s.batch for s in first.segments], len(first.segments))
    epochs, _, cfg, config = _read_folder(run_dir, noise=False)
    base_batch = int(cfg.get("train", {}).get("global_batch", 0) or 0)
    batches = [int(e.get("global_batch") or base_batch) for e in epochs]
    if min(batches) < 1:
        raise UsageError(f"{config} gives no train.global_batch; the folder is damaged")
    if first.target_accuracy is not None:
        scales = [1.0] * len(epochs)  # the steps alone are read
        segments, what = _segments_to(run_dir, epochs, batches, scales, first.target_accuracy,
                                      f"the target of '{first.run_dir}'")
        _one_batch(run_dir, batches, len(segments))
        return SecondRun(run_dir, batches[0], sum(s.steps for s in segments), what)
    if first.final_loss is None:
        raise UsageError(f"'{first.run_dir}' records no train_loss at its end to set the second run's target: give "
                         "--target-accuracy A")
    steps = _steps_to_loss(run_dir, epochs, first.final_loss)
    if steps is None:
        best = min((e["train_loss"] for e in epochs if isinstance(e.get("train_loss"), (int, float))),
                   default=float("nan"))
        raise UsageError(f"'{run_dir}' never reached the train_loss {first.final_loss:.4g} '{first.run_dir}' ended at "
                         f"(best {best:.4g}); train it longer, or give --target-accuracy A")
    _one_batch(run_dir, batches, sum(e["step"] <= steps for e in epochs) + 1)
    return SecondRun(run_dir, batches[0], steps, f"train_loss {first.final_loss:.4g} (the end of '{first.run_dir}') "
                                                 f"after {steps:.0f} steps")


def _overrides(overrides: list[str]) -> list[str]:
    """The probe's ``key=value`` overrides, checked."""
    bad = [t for t in overrides if "=" not in t]
    if bad:
        raise UsageError(f"--probe takes config overrides key=value, not {bad[0]!r}; drop --probe to read a run folder")
    return list(overrides)


def train_probe(config: Optional[str], overrides: list[str]) -> str:
    """Train a probe run from ``config`` and the ``key=value`` ``overrides`` with train.noise_scale=true
    (one worker gets 4 accumulation steps) and return its run.dir."""
    from largebatch.api import fit
    from largebatch.config import load_config
    from largebatch.distributed import discover

    overrides = _overrides(overrides)
    overrides.append("train.noise_scale=true")
    cfg = load_config(config, overrides)
    if discover().world_size == 1 and cfg.train.max_micro_batch is None:
        # one worker measures the noise from micro-batches: split the batch in 4 (or as near as it goes)
        overrides.append(f"train.max_micro_batch={max(1, cfg.train.global_batch // 4)}")
    fit(config, overrides=overrides)
    return cfg.run.dir


def train_second_probe(config: Optional[str], overrides: list[str], batch: int, first: Measured) -> str:
    """Train the second probe: the first's ``config`` and ``overrides`` at global batch ``batch``, in
    ``<first run.dir>-batch<batch>``, for ``batch / first batch`` times the first's epochs (images
    enough for the model's slowest case, no gain from the larger batch), stopping at the first's
    accuracy target where it has one; return its run.dir."""
    from largebatch.api import fit
    from largebatch.config import load_config

    overrides = _overrides(overrides)
    if batch <= first.global_batch:
        raise UsageError(f"--second-batch {batch} is not above the first probe's global batch {first.global_batch}: "
                         "give a larger one (default 8 times the first)")
    epochs = max(1, math.ceil(first.epochs * batch / first.global_batch))
    run_dir = f"{first.run_dir.rstrip(os.sep)}-batch{batch}"
    overrides += [f"run.dir={run_dir}", f"train.global_batch={batch}", f"train.epochs={epochs}"]
    if first.target_accuracy is not None:
        overrides += [f"train.target_accuracy={first.target_accuracy}", "train.stop_at_target=true",
                      "train.target_metric=top1"]
    cfg = load_config(config, overrides)
    fit(config, overrides=overrides)
    return cfg.run.dir
