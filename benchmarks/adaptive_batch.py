"""Does the adaptive global batch reach a target accuracy sooner than every fixed batch?

    python benchmarks/adaptive_batch.py --root ../shared/datasets/mnist10k --seeds 0 1 2       # part (b)
    python benchmarks/adaptive_batch.py --root ../shared/datasets/mnist10k --seeds 0 1 2 --reuse \
        --rules scaling adascale adascale:3.34 \
        --engine --engine-batches 32 64 128 --engine-seeds 0 1 2 --docs docs                   # + part (a)

The evidence for ``adaptive.enabled`` (issue #23), on the data, model and optimizer of
``benchmarks/noise_scale.py``'s sweep (MNIST digits at 14x14, the ``cnn`` of width 16 without
BatchNorm, LARS with Nesterov momentum 0.9 and weight decay 5e-4, 2 epochs of warmup then a
constant lr), in two parts:

**(b) step-precise, on a modelled GPU cluster** (the default). This script's own loop (the sweep's
pieces: its data, its evaluation on a geometric grid of steps with the crossing interpolated, the
engine's sampling) trains, from the same initial weights per seed, these arms:

- ``fixed B``: every batch of the sweep (32 ... 4096) at the best peak lr the sweep bracketed for it,
  read from ``docs/noise_scale_table.md`` (``--sweep-table``; not re-bracketed), with the sweep's
  warmup from the unscaled lr; seed 0 repeats the sweep's own run;
- ``smith xK``: Smith et al.'s "don't decay the learning rate, increase the batch size": the
  smallest batch at its best lr, the batch multiplied by ``--smith-factor`` at each epoch of
  ``--smith-milestones`` (where a step-decay schedule would divide the lr), the lr held;
- ``adaptive RULE`` for each entry ``RULE[:CRIT_FACTOR]`` of ``--rules`` (default ``scaling
  adascale``): the engine's adaptive batch mirrored step by step (see :class:`AdaptiveArm`): start
  at the smallest batch, micro-batches of ``--micro-batch`` images, the noise scale from the first
  micro-batch against the step's gradient, every ``--every-steps`` steps
  :func:`largebatch.goodput.decide` over the ladder with the cluster's step time and ``B_crit`` =
  the arm's crit_factor (``--crit-factor`` where the entry gives none) x the noise scale; the lr is
  the smallest batch's best lr scaled linearly to the batch (``scaling``, capped at ``--max-lr`` as
  the sweep caps it), or times AdaScale's gain (``adascale``). An arm at a factor other than 1 is
  named ``adaptive RULE, crit_factor F`` (``adascale:3.34``: the factor ``python -m
  largebatch.advise --second-run`` measures from two probes).

Each step's time is the one the engine's ``adaptive.time_model=preset:NAME`` decides with
(:func:`largebatch.scaling.predict.preset_step_time`: the simulator's cluster and workload of
``--preset`` at ``--preset-workers`` workers, each worker's share of the batch as micro-batches of at
most ``--micro-batch`` images), added up step by step for every arm. Reported per arm, mean ± standard deviation over the
seeds: steps, images and simulated seconds to ``--target``, and the validation accuracy after the
common budget of ``--epochs`` epochs (a run that has not reached the target by then goes on, up to
``--max-epochs``).

**(a) measured on 2 CPU workers** (``--engine``): real engine runs (``python -m largebatch.train``
under torchrun, 2 gloo workers): each fixed batch of ``--engine-batches`` at its best lr, Smith's
schedule through ``train.phases``, and ``adaptive.enabled=true adaptive.time_model=measured`` for
every adaptive arm (its ``adaptive.lr`` and ``adaptive.crit_factor``); each
stops at the first epoch end at the target (``train.stop_at_target``) and reports the summary's
``time_to_target_s`` and the wall time.

Both parts print their tables and whether the issue's goals are met. Writes ``results.json``
(``engine.json`` for part (a)), ``table.md`` and ``adaptive_batch.png`` (with matplotlib) to ``--out``,
and with ``--docs DIR`` the tables and the plot to ``DIR/adaptive_batch_table.md`` and
``DIR/adaptive_batch.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from typing import Callable, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import noise_scale as sweep  # noqa: E402  (the sweep's data, model, optimizer, schedule and evaluation)

from largebatch.config.schema import OptimConfig, ScheduleConfig  # noqa: E402
from largebatch.data.sampler import epoch_permutation  # noqa: E402
from largebatch.engine.noise import NoiseScale, first_micro_batch_sq_norm, squared_norm  # noqa: E402
from largebatch.goodput import adascale_gain, decide, ladder  # noqa: E402
from largebatch.models import create_model  # noqa: E402
from largebatch.optim import build_optimizer  # noqa: E402
from largebatch.optim.schedule import build_progress_schedule, build_schedule  # noqa: E402
from largebatch.scaling.predict import preset_step_time  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- the sweep's best learning rates

def read_sweep_lrs(path: str) -> dict[int, float]:
    """{global batch: best peak lr} from the rows of a noise_scale_table.md (those that reached the target)."""
    out = {}
    with open(path) as fh:
        for line in fh:
            m = re.match(r"\|\s*(\d+)\s*\|\s*([0-9.eE+-]+)\s*\|\s*[0-9]", line)
            if m:
                out[int(m.group(1))] = float(m.group(2))
    if not out:
        raise SystemExit(f"adaptive_batch: no batch rows with a peak lr in {path}; run benchmarks/noise_scale.py "
                         "--docs docs first, or give --lrs BATCH:LR ...")
    return out


# ---------------------------------------------------------------- the arms

class FixedArm:
    """One global batch at its best peak lr, with the sweep's schedule (warmup from the unscaled lr)."""

    micro_batch = None

    def __init__(self, args, batch: int, lr: float, n: int):
        self.name, self.kind, self.start = f"fixed {batch}", "fixed", batch
        factor = lr / sweep.peak_lr(args, batch, 1.0)
        spe = n // batch
        self.sched = build_schedule(sweep.optim_config(args, batch, factor), sweep.schedule_config(args, batch, factor),
                                    batch, spe, args.max_epochs)

    def batch(self, epoch: int) -> int:
        return self.start

    def lr(self, step: int, t: float) -> float:
        return self.sched(step)

    def after_step(self, step: int, images: int) -> None:
        pass


class SmithArm:
    """The smallest batch at its best lr, the batch times ``factor`` at each milestone epoch, the lr held."""

    micro_batch = None

    def __init__(self, args, start: int, lr: float):
        self.name, self.kind, self.start = f"smith x{args.smith_factor}", "smith", start
        self.milestones, self.factor, self.peak = sorted(args.smith_milestones), args.smith_factor, lr

    def batches(self) -> list[int]:
        return [self.start * self.factor ** k for k in range(len(self.milestones) + 1)]

    def batch(self, epoch: int) -> int:
        return self.start * self.factor ** sum(epoch >= m for m in self.milestones)

    def lr(self, step: int, t: float) -> float:
        return self.peak

    def after_step(self, step: int, images: int) -> None:
        pass


def adaptive_name(rule: str, crit_factor: float) -> str:
    """'adaptive RULE', with ', crit_factor F' where the factor is not 1."""
    return f"adaptive {rule}" + ("" if crit_factor == 1 else f", crit_factor {crit_factor:g}")


def parse_rule(text: str, default_factor: float) -> tuple[str, float]:
    """An entry of --rules: 'RULE' (at ``default_factor``) or 'RULE:CRIT_FACTOR'."""
    rule, _, factor = text.partition(":")
    if rule not in ("scaling", "adascale"):
        raise SystemExit(f"adaptive_batch: --rules {text}: the rule {rule!r} is not 'scaling' or 'adascale'; "
                         "give RULE or RULE:CRIT_FACTOR, e.g. adascale:3.34")
    try:
        value = float(factor) if factor else default_factor
    except ValueError:
        value = float("nan")
    if not value > 0 or math.isinf(value):
        raise SystemExit(f"adaptive_batch: --rules {text}: the crit_factor {factor!r} is not a number > 0; "
                         "give RULE:CRIT_FACTOR, e.g. adascale:3.34")
    return rule, value


class AdaptiveArm:
    """The engine's adaptive global batch (adaptive.enabled), step by step.

    Candidates ``ladder(min_batch, max_batch)``, starting at ``min_batch``; every micro-batch holds
    ``micro_batch`` images. Each step updates a :class:`NoiseScale` (EMA 0.99) with ``b`` = the first
    micro-batch's ``|G_b|²`` and ``B`` = the step's ``|G_B|²`` (none where ``B`` is the micro-batch).
    Every ``every_steps`` steps ``B_crit = crit_factor x noise scale`` and :func:`decide` picks the
    batch with ``step_time``; the epoch goes on from the same image offset. The lr is the
    :class:`ProgressSchedule` of the epochs trained (epochs done + the epoch's offset / training set)
    at the current peak:
    ``rule`` 'scaling' the lr at ``min_batch`` scaled linearly to the batch and capped at ``max_lr``,
    'adascale' the lr at ``min_batch`` times ``adascale_gain(B, B_crit at the last decision, min_batch)``."""

    def __init__(self, args, rule: str, lr: float, step_time: Callable[[int], float], epochs: int,
                 crit_factor: Optional[float] = None):
        self.crit_factor = args.crit_factor if crit_factor is None else crit_factor
        self.name, self.kind, self.rule = adaptive_name(rule, self.crit_factor), "adaptive", rule
        self.ladder = ladder(args.min_batch, args.max_batch)
        self.start = self.current = self.ladder[0]
        self.micro_batch, self.every = args.micro_batch, args.every_steps
        self.min_gain, self.step_time, self.base_lr, self.max_lr = args.min_gain, step_time, lr, args.max_lr
        self.noise, self.b_crit = NoiseScale(), None
        sched = ScheduleConfig(warmup_epochs=args.adaptive_warmup_epochs, decay="constant")
        self.sched = build_progress_schedule(OptimConfig(name="lars", base_lr=lr, base_batch=self.start), sched,
                                             epochs, self.peak(self.start))
        self.decisions: list[dict] = []

    def peak(self, batch: int) -> float:
        if self.rule == "adascale":
            gain = 1.0 if self.b_crit is None else adascale_gain(batch, self.b_crit, self.start)
            return self.base_lr * gain
        return min(self.base_lr * batch / self.start, self.max_lr)

    def batch(self, epoch: int) -> int:
        return self.current

    def lr(self, step: int, t: float) -> float:
        return self.sched(t, self.peak(self.current))

    def observe(self, small: torch.Tensor, large: torch.Tensor, batch: int) -> None:
        if batch > self.micro_batch:
            self.noise.update(small, large, self.micro_batch, batch)

    def after_step(self, step: int, images: int) -> None:
        if step % self.every:
            return
        scale = self.noise.values().noise_scale
        b_crit = None if scale is None else self.crit_factor * scale
        d = decide(self.ladder, self.current, b_crit, self.step_time, self.min_gain)
        if b_crit is not None:
            self.b_crit = b_crit
        self.decisions.append(dict(step=step, images=images, noise_scale=scale, b_crit=b_crit,
                                   batch=d.global_batch, previous=self.current, reason=d.reason))
        self.current = d.global_batch


# ---------------------------------------------------------------- the step-precise loop

class Record:
    """Where a run stands (steps, images, simulated seconds) and its evaluations: the first
    crossing of the target interpolated between the two evaluations around it, as the sweep does."""

    def __init__(self, target: float):
        self.target, self.step, self.images, self.sim_s = target, 0, 0, 0.0
        self.evals: list[tuple] = []
        self.crossed: Optional[dict] = None
        self.final_acc: Optional[float] = None
        self.trace: list[tuple] = []
        """(step, images, batch, lr) of every step."""

    def advance(self, batch: int, lr: float, seconds: float) -> None:
        self.trace.append((self.step, self.images, batch, lr))
        self.step, self.images, self.sim_s = self.step + 1, self.images + batch, self.sim_s + seconds

    def evaluated(self, acc: float) -> None:
        """An evaluation after the current step; the crossing if this is the first at the target."""
        before = self.evals[-1] if self.evals else (0, 0, 0.0, 0.0)
        self.evals.append((self.step, self.images, self.sim_s, acc))
        if self.crossed is None and acc >= self.target:
            f = (self.target - before[3]) / (acc - before[3])
            at = [b + f * (a - b) for a, b in zip(self.evals[-1][:3], before[:3])]
            self.crossed = dict(steps=at[0], images=at[1], sim_s=at[2])


def forward_backward(model, xt, yt, idx: torch.Tensor, params: list, micro_batch: Optional[int]):
    """The step's gradient (each image's loss / the batch) on ``params``; with ``micro_batch``, the
    first ``micro_batch`` images first, and (|G_b|², |G_B|²) returned (else None): the same sum as
    B / micro_batch micro-batches, the rest taken in one pass."""
    batch = len(idx)
    parts = [idx] if micro_batch is None or micro_batch >= batch else [idx[:micro_batch], idx[micro_batch:]]
    small = None
    for k, part in enumerate(parts):
        (F.cross_entropy(model(xt[part]), yt[part], reduction="sum") / batch).backward()
        if k == 0 and len(parts) > 1:
            small = first_micro_batch_sq_norm([p.grad for p in params], batch // micro_batch)
    if small is None:
        return None
    return small, squared_norm([p.grad for p in params])


def train_arm(args, data, arm, seed: int, step_time: Callable[[int], float]) -> dict:
    """Train ``arm`` from seed ``seed``'s initial weights for ``args.epochs`` epochs, or on until it
    reaches the target (at most ``args.max_epochs``); evaluate on the sweep's geometric grid of steps
    until the crossing and once at the end of the budget. An epoch is a permutation of the training
    set taken from its start in batches of the arm's current batch; it ends when fewer images are left."""
    xt, yt, xv, yv = data
    n = len(yt)
    torch.manual_seed(seed)
    model = create_model("cnn", 10, 1, width=args.width, norm="none").to(xt.device)
    opt = build_optimizer(model, sweep.optim_config(args, arm.start, 1.0))  # the lr is set every step
    params = [p for p in model.parameters() if p.requires_grad]
    rec, epoch, offset, next_eval, t0 = Record(args.target), 0, 0, 1, time.perf_counter()
    perm = epoch_permutation(n, seed, 0).to(xt.device)
    while epoch < args.epochs or (rec.crossed is None and epoch < args.max_epochs):
        batch = arm.batch(epoch)
        if offset + batch > n:  # the epoch's end
            epoch, offset = epoch + 1, 0
            perm = epoch_permutation(n, seed, epoch).to(xt.device)
            if epoch == args.epochs:
                rec.final_acc = sweep.accuracy(model, xv, yv)
            continue
        lr = arm.lr(rec.step, epoch + offset / n)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        norms = forward_backward(model, xt, yt, perm[offset:offset + batch], params, arm.micro_batch)
        if norms is not None:  # before the step: LARS works in place in the gradients
            arm.observe(*norms, batch)
        opt.step()
        offset += batch
        rec.advance(batch, lr, step_time(batch))
        arm.after_step(rec.step, rec.images)
        if rec.crossed is None and rec.step >= next_eval:
            next_eval = max(rec.step + 1, math.ceil(rec.step * args.eval_growth))
            rec.evaluated(sweep.accuracy(model, xv, yv))
    out = dict(arm=arm.name, kind=arm.kind, seed=seed, reached=rec.crossed is not None, **(rec.crossed or {}),
               final_acc=rec.final_acc, epochs_run=epoch, steps_run=rec.step, images_run=rec.images,
               sim_s_run=rec.sim_s, wall_s=time.perf_counter() - t0, evals=rec.evals)
    if arm.kind == "adaptive":
        out.update(trace=rec.trace, decisions=arm.decisions)
    return out


# ---------------------------------------------------------------- tables and goals

def mean_sd(values: list, fmt: str = "{:,.0f}", scale: float = 1.0) -> str:
    """'mean ± sd' (the sample standard deviation) of the values that are not None; '—' if none."""
    vals = [v * scale for v in values if v is not None]
    if not vals:
        return "—"
    if len(vals) == 1:
        return fmt.format(vals[0])
    return f"{fmt.format(statistics.mean(vals))} ± {fmt.format(statistics.stdev(vals))}"


def mean_of(rows: list[dict], key: str) -> Optional[float]:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.mean(vals) if vals else None


def by_arm(results: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in results:
        out.setdefault(r["arm"], []).append(r)
    return out


def cluster_table(results: list[dict], lrs: dict[str, str], args) -> str:
    """One row per arm: mean ± sd over the seeds of the steps, images and simulated seconds to the
    target (over the seeds that reached it), and of the accuracy after the budget."""
    lines = [f"| arm | peak lr | reached | steps to {args.target} | images to {args.target} | "
             f"simulated s to {args.target} | val acc % after {args.epochs} epochs |",
             "| :--- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, rows in by_arm(results).items():
        hit = [r for r in rows if r["reached"]]
        cap = "" if len(hit) == len(rows) else f" (not reached in {rows[0]['epochs_run']} epochs)"
        lines.append(f"| {name} | {lrs[name]} | {len(hit)}/{len(rows)}{cap} | "
                     f"{mean_sd([r['steps'] for r in hit])} | {mean_sd([r['images'] for r in hit])} | "
                     f"{mean_sd([r['sim_s'] for r in hit], '{:.2f}')} | "
                     f"{mean_sd([r['final_acc'] for r in rows], '{:.2f}', 100)} |")
    return "\n".join(lines)


def best_fixed(results: list[dict], key: str) -> Optional[str]:
    """The fixed arm, among those every seed of which reached the target, with the smallest mean ``key``."""
    full = {name: rows for name, rows in by_arm(results).items()
            if rows[0]["kind"] == "fixed" and all(r["reached"] for r in rows)}
    return min(full, key=lambda name: mean_of(full[name], key)) if full else None


def verdict(ok: bool) -> str:
    return "met" if ok else "missed"


def cluster_goals(results: list[dict]) -> list[str]:
    """The issue's goals on the cluster: the adaptive run reaches the target in no more simulated time
    than the best fixed batch (the fastest there), within 1.1x of its images, and its accuracy after
    the budget is at most 0.3 points below the best fixed batch's (means over the seeds)."""
    arms = by_arm(results)
    best = best_fixed(results, "sim_s")
    if best is None:
        return ["no fixed batch reached the target in every seed: nothing to compare with"]
    b = arms[best]
    t, img, acc = mean_of(b, "sim_s"), mean_of(b, "images"), mean_of(b, "final_acc")
    out = [f"best fixed batch on the cluster: {best} ({t:.2f} s, {img:,.0f} images, {100 * acc:.2f}% after the budget)"]
    for name, rows in arms.items():
        if rows[0]["kind"] != "adaptive":
            continue
        if not all(r["reached"] for r in rows):
            out.append(f"{name}: reached the target in {sum(r['reached'] for r in rows)}/{len(rows)} seeds: missed")
            continue
        at, ai, aa = mean_of(rows, "sim_s"), mean_of(rows, "images"), mean_of(rows, "final_acc")
        out.append(f"{name}: time {at:.2f} s = {at / t:.2f}x the best fixed (goal <= 1.00): {verdict(at <= t)}; "
                   f"images {ai:,.0f} = {ai / img:.2f}x (goal <= 1.10): {verdict(ai <= 1.1 * img)}; "
                   f"final accuracy {100 * aa:.2f}% = {100 * (aa - acc):+.2f} points (goal >= -0.30): "
                   f"{verdict(aa >= acc - 0.003)}")
    return out


# ---------------------------------------------------------------- part (a): the engine on 2 CPU workers

def engine_overrides(args, arm: str, lr: float, seed: int, run_dir: str) -> list[str]:
    """The command line of one engine run: ``fixed B`` (at ``lr``, warming up from the unscaled lr
    as the sweep does), ``smith`` (train.phases, the lr held) or ``adaptive RULE``."""
    out = [f"run.dir={run_dir}", f"run.seed={seed}", "data.name=imagefolder", f"data.root={args.root}",
           f"data.image_size={args.image_size}", "data.cache=true", "model.name=cnn", f"model.width={args.width}",
           "model.norm=none", "optim.name=lars", "optim.momentum=0.9", "optim.nesterov=true",
           "optim.weight_decay=5e-4", "optim.exclude_bn_and_bias=false", "schedule.decay=constant",
           f"schedule.warmup_epochs={args.warmup_epochs:g}", f"train.target_accuracy={args.target}",
           "train.stop_at_target=true", f"train.epochs={args.engine_epochs}", "checkpoint.resume=never",
           "comm.backend=gloo"]
    kind, _, what = arm.partition(" ")
    if kind == "fixed":
        batch = int(what)
        start = min(args.base_lr * lr / sweep.peak_lr(args, batch, 1.0), lr)
        return out + [f"train.global_batch={batch}", f"optim.base_lr={lr:g}", f"optim.base_batch={batch}",
                      f"schedule.warmup_start_lr={start:g}"]
    first = args.min_batch
    out += [f"train.global_batch={first}", f"optim.base_lr={lr:g}", f"optim.base_batch={first}"]
    if kind == "smith":
        edges = [0] + sorted(args.smith_milestones) + [args.engine_epochs]
        phases = [f"{{epochs: {b - a}, global_batch: {first * args.smith_factor ** k}}}"
                  for k, (a, b) in enumerate(zip(edges, edges[1:])) if b > a]
        return out + ["optim.scaling=none", f"train.phases=[{', '.join(phases)}]"]
    rule, factor = adaptive_arms(args)[arm]
    return out + ["optim.scaling=linear", f"train.max_micro_batch={args.micro_batch}",
                  "adaptive.enabled=true", f"adaptive.min_batch={first}", f"adaptive.max_batch={args.max_batch}",
                  f"adaptive.every_steps={args.every_steps}", f"adaptive.lr={rule}", "adaptive.time_model=measured",
                  f"adaptive.crit_factor={factor:g}", f"adaptive.min_gain={args.min_gain:g}"]


def run_engine(args, arm: str, lr: float, seed: int) -> dict:
    """One engine run under torchrun on ``--engine-workers`` gloo workers (one thread each): its
    summary line, the wall time of the whole command, and the adaptive run's other metrics lines."""
    run_dir = os.path.abspath(os.path.join(args.out, "engine", f"{re.sub(r'[^A-Za-z0-9.]+', '-', arm)}-s{seed}"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.engine_workers}",
           "-m", "largebatch.train", *engine_overrides(args, arm, lr, seed, run_dir)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    with open(os.path.join(args.out, "engine.log"), "a") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        code = subprocess.call(cmd, stdout=log, stderr=log, env=env)
    wall = time.perf_counter() - t0
    if code != 0:
        raise SystemExit(f"adaptive_batch: engine run {run_dir} failed (exit {code}); see {args.out}/engine.log")
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        lines = [json.loads(x) for x in fh]
    summary = [x for x in lines if x.get("event") == "summary"][-1]
    other = [x for x in lines if x.get("event") not in ("summary", "epoch", "step")]
    kind, _, what = arm.partition(" ")
    known = ([int(what)] * args.engine_epochs if kind == "fixed" else
             [args.min_batch * args.smith_factor ** sum(e >= m for m in args.smith_milestones)
              for e in range(args.engine_epochs)] if kind == "smith" else None)
    return dict(arm=arm, seed=seed, wall_s=wall, summary=summary, events=other, epoch_batches=known,
                first_batch=args.min_batch,
                epochs=[x for x in lines if x.get("event") == "epoch"])


def engine_images(row: dict, first_batch: int) -> Optional[float]:
    """Images trained up to the end of the epoch of the target (or of the run): the steps of each
    epoch times the batch the arm's epochs have, or, for an adaptive run, each step's batch from its
    batch decisions (a decision after step k sets the batch from step k + 1 on)."""
    epochs = row["epochs"][:row["summary"].get("epoch_to_target") or len(row["epochs"])]
    if not epochs:
        return None
    last = epochs[-1]["step"]
    if row.get("epoch_batches"):
        steps = [e["step"] for e in epochs]
        return float(sum((b - a) * row["epoch_batches"][k] for k, (a, b) in enumerate(zip([0] + steps, steps))))
    changes = sorted((e["step"], e["global_batch"]) for e in row["events"] if e.get("event") == "batch")
    total, batch, at = 0, first_batch, 0
    for step, new in changes + [(last, None)]:
        total += (min(step, last) - at) * batch
        at, batch = min(step, last), new
        if at >= last:
            break
    return float(total)


def engine_table(results: list[dict]) -> str:
    lines = ["| arm | reached | epoch of the target | images to that epoch | time_to_target_s | wall s (command) |"
             " val acc % at the stop |", "| :--- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, rows in by_arm(results).items():
        s = [r["summary"] for r in rows]
        hit = [x for x in s if x.get("time_to_target_s") is not None]
        images = [engine_images(r, r["first_batch"]) for r in rows if r["summary"].get("time_to_target_s") is not None]
        lines.append(f"| {name} | {len(hit)}/{len(rows)} | {mean_sd([x['epoch_to_target'] for x in hit], '{:.1f}')} | "
                     f"{mean_sd(images)} | {mean_sd([x['time_to_target_s'] for x in hit], '{:.1f}')} | "
                     f"{mean_sd([r['wall_s'] for r in rows], '{:.1f}')} | "
                     f"{mean_sd([x['val_acc'] for x in s], '{:.2f}', 100)} |")
    return "\n".join(lines)


def engine_seed_lines(results: list[dict]) -> list[str]:
    """Each arm's time_to_target_s and epoch of the target, seed by seed."""
    out = []
    for name, rows in by_arm(results).items():
        each = [f"seed {r['seed']} {r['summary']['time_to_target_s']:.1f} s (epoch {r['summary']['epoch_to_target']})"
                if r["summary"].get("time_to_target_s") is not None else
                f"seed {r['seed']} not reached in {len(r['epochs'])} epochs" for r in rows]
        out.append(f"{name}: " + ", ".join(each))
    return out


def engine_decisions_line(row: dict) -> str:
    """An adaptive engine run's batch changes (from its batch lines) and its step-time model."""
    batches = [e for e in row["events"] if e.get("event") == "batch"]
    moves = "".join(f" -> {e['global_batch']} at step {e['step']} (B_crit {e['b_crit']:.0f})" for e in batches
                    if e.get("changed"))
    known = [e["b_crit"] for e in batches if e.get("b_crit") is not None]
    tail = f"; B_crit at the end {known[-1]:.0f}" if known else ""
    model = ""
    if batches and batches[0].get("candidates"):
        model = "; step time model " + ", ".join(f"T({c['global_batch']}) {1e3 * c['step_time_s']:.1f} ms"
                                                 for c in batches[0]["candidates"][:3])
    return (f"{row['arm']}, seed {row['seed']}: {row['first_batch']}{moves} ({len(batches)} decisions){tail}"
            f"{model}")


def engine_goals(results: list[dict], workers: int = 2) -> list[str]:
    """On ``workers`` CPU workers the adaptive run must reach the target in at most 1.1x the best fixed
    batch's time (time_to_target_s, means over the seeds)."""
    arms = {name: [r["summary"] for r in rows] for name, rows in by_arm(results).items()}
    full = {name: s for name, s in arms.items() if name.startswith("fixed")
            and all(x.get("time_to_target_s") is not None for x in s)}
    if not full:
        return ["no fixed batch reached the target in every seed: nothing to compare with"]
    best = min(full, key=lambda name: statistics.mean(x["time_to_target_s"] for x in full[name]))
    t = statistics.mean(x["time_to_target_s"] for x in full[best])
    out = [f"best fixed batch on {workers} CPU workers: {best} ({t:.1f} s to the target)"]
    for name, s in arms.items():
        if not name.startswith("adaptive"):
            continue
        times = [x.get("time_to_target_s") for x in s]
        if None in times:
            out.append(f"{name}: reached the target in {len(times) - times.count(None)}/{len(times)} seeds: missed")
            continue
        at = statistics.mean(times)
        out.append(f"{name}: {at:.1f} s = {at / t:.2f}x the best fixed (goal <= 1.10): {verdict(at <= 1.1 * t)}")
    return out


# ---------------------------------------------------------------- the plot

def plot(results: list[dict], engine: list[dict], path: str) -> bool:
    """Top: the adaptive runs' global batch and B_crit over the steps (seed of the first result), and
    their lr; bottom: the simulated seconds to the target of every arm (mean, sd bars), and the
    engine's time_to_target_s on 2 CPU workers where part (a) ran."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, grid = plt.subplots(2, 2, figsize=(12, 8.6))
    axes = grid.flatten()
    seed = results[0]["seed"]
    colors = {"adaptive scaling": "tab:blue", "adaptive adascale": "tab:orange"}
    for r in (r for r in results if r["kind"] == "adaptive" and r["seed"] == seed):
        c = colors.get(r["arm"], "tab:green")
        steps = [t[0] for t in r["trace"]]
        axes[0].step(steps, [t[2] for t in r["trace"]], where="post", color=c, label=f"{r['arm']}: global batch")
        d = [x for x in r["decisions"] if x["b_crit"] is not None]
        axes[0].plot([x["step"] for x in d], [x["b_crit"] for x in d], ls=":", color=c, label=f"{r['arm']}: B_crit")
        axes[1].plot(steps, [t[3] for t in r["trace"]], color=c, label=r["arm"])
        if r["reached"]:
            for ax in axes[:2]:
                ax.axvline(r["steps"], color=c, ls="--", lw=0.8)
    axes[0].set_yscale("log", base=2)
    axes[0].set_ylabel("images")
    axes[1].set_ylabel("learning rate (LARS)")
    for ax in axes[:2]:
        ax.set_xlabel(f"step (seed {seed}; dashed: target reached)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    bars(axes[2], [(name, [r["sim_s"] for r in rows if r["reached"]]) for name, rows in by_arm(results).items()],
         "simulated seconds to the target (cluster)")
    if engine:
        bars(axes[3], [(name, [r["summary"].get("time_to_target_s") for r in rows
                               if r["summary"].get("time_to_target_s") is not None])
                       for name, rows in by_arm(engine).items()], "seconds to the target, 2 CPU workers (engine)")
    else:
        axes[3].set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def bars(ax, rows: list[tuple[str, list[float]]], label: str) -> None:
    """Horizontal bars of the mean with the standard deviation, one per arm with a value."""
    rows = [(name, v) for name, v in rows if v]
    means = [statistics.mean(v) for _, v in rows]
    sds = [statistics.stdev(v) if len(v) > 1 else 0.0 for _, v in rows]
    colors = ["tab:blue" if name.startswith("adaptive") else "tab:green" if name.startswith("smith") else "gray"
              for name, _ in rows]
    ax.barh(range(len(rows)), means, xerr=sds, color=colors)
    ax.set_yticks(range(len(rows)), [name for name, _ in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel(label)
    ax.grid(alpha=0.3, axis="x")


# ---------------------------------------------------------------- main

def make_arms(args, lrs: dict[int, float], n: int, step_time: Callable[[int], float]) -> list:
    first = lrs[args.min_batch]
    arms = [FixedArm(args, b, lrs[b], n) for b in args.batches]
    arms.append(SmithArm(args, args.min_batch, first))
    arms += [AdaptiveArm(args, rule, first, step_time, args.epochs, factor) for rule, factor in args.adaptive]
    return [a for a in arms if not args.arms or a.name in args.arms]


def lr_labels(args, lrs: dict[int, float]) -> dict[str, str]:
    first = lrs[args.min_batch]
    out = {f"fixed {b}": f"{lrs[b]:g}" for b in lrs}
    out[f"smith x{args.smith_factor}"] = f"{first:g} held"
    for rule, factor in args.adaptive:
        out[adaptive_name(rule, factor)] = (f"{first:g} x B/{args.min_batch}, at most {args.max_lr:g}"
                                            if rule == "scaling" else f"{first:g} x gain")
    return out


def adaptive_arms(args) -> dict[str, tuple[str, float]]:
    """{arm name: (rule, crit_factor)} of the adaptive arms of --rules."""
    return {adaptive_name(rule, factor): (rule, factor) for rule, factor in args.adaptive}


def step_time_line(st, batches: list[int]) -> str:
    """The seconds per step the cluster model gives each batch of the ladder."""
    return (f"step time of {st.source}, micro-batches of at most {st.micro_batch} images: "
            + ", ".join(f"T({b}) {1e3 * st(b):.1f} ms" for b in batches))


def decisions_line(r: dict) -> str:
    """The batches an adaptive run went through: 'seed 0: 32, 64 at step 20 (B_crit 17), ...'."""
    moves = [f"{d['batch']} at step {d['step']} (B_crit {d['b_crit']:.0f})" for d in r["decisions"]
             if d["batch"] != d["previous"]]
    last = [d["b_crit"] for d in r["decisions"] if d["b_crit"] is not None]
    tail = f"; B_crit at the end {last[-1]:.0f}" if last else ""
    return f"{r['arm']}, seed {r['seed']}: {r['decisions'][0]['previous'] if r['decisions'] else '?'}" + \
        "".join(f" -> {m}" for m in moves) + tail


def run_cluster(args, data, lrs: dict[int, float], step_time: Callable[[int], float]) -> list[dict]:
    """Part (b): every arm for every seed (runs already in --out/runs.jsonl with the same settings are
    reused with --reuse)."""
    path = os.path.join(args.out, "runs.jsonl")
    done = {}
    if args.reuse and os.path.isfile(path):
        with open(path) as fh:
            done = {(r["arm"], r["seed"]): r for r in map(json.loads, fh)}
    results = []
    for seed in args.seeds:
        for arm in make_arms(args, lrs, len(data[1]), step_time):
            key = run_settings(args, arm)
            r = done.get((arm.name, seed))
            if r is None or not same_settings(r.get("settings"), key):
                r = train_arm(args, data, arm, seed, step_time) | dict(settings=json.dumps(key, sort_keys=True))
                with open(path, "a") as fh:
                    fh.write(json.dumps(r) + "\n")
            shown = (f"{r['steps']:.0f} steps, {r['images']:,.0f} images, {r['sim_s']:.2f} s simulated"
                     if r["reached"] else f"not reached in {r['epochs_run']} epochs")
            print(f"seed {seed} {arm.name:<18} {shown}; {100 * r['final_acc']:.2f}% after {args.epochs} epochs "
                  f"({r['wall_s']:.0f}s)", flush=True)
            results.append(r)
    return results


SETTINGS = ("root", "image_size", "width", "target", "base_lr", "base_batch", "max_lr", "warmup_epochs",
            "eval_growth", "epochs", "max_epochs", "min_batch", "max_batch", "micro_batch", "every_steps",
            "min_gain", "adaptive_warmup_epochs", "smith_factor", "smith_milestones", "preset", "preset_workers")
"""The arguments a part-(b) run depends on (besides its arm, its lr and its seed; an adaptive arm's
crit_factor is its own)."""


def run_settings(args, arm) -> dict:
    """What a part-(b) run of ``arm`` depends on: SETTINGS, and an adaptive arm's crit_factor."""
    out = {k: v for k, v in vars(args).items() if k in SETTINGS}
    if arm.kind == "adaptive":
        out["crit_factor"] = arm.crit_factor
    return out


def same_settings(saved: Optional[str], settings: dict) -> bool:
    """Whether a saved run's settings (JSON) are ``settings``; a crit_factor saved with a run that is
    not adaptive (runs.jsonl of before the per-arm factor kept it for every arm) does not count."""
    if saved is None:
        return False
    old = json.loads(saved)
    if "crit_factor" not in settings:
        old.pop("crit_factor", None)
    return old == json.loads(json.dumps(settings))


def run_engine_part(args, lrs: dict[int, float]) -> list[dict]:
    """Part (a): the engine on ``--engine-workers`` CPU workers, every arm for every ``--engine-seeds``
    (with --reuse, the runs already in --out/engine.json are not run again)."""
    arms = [f"fixed {b}" for b in args.engine_batches] + ["smith"] + list(adaptive_arms(args))
    path, done, out = os.path.join(args.out, "engine.json"), {}, []
    if args.reuse and os.path.isfile(path):
        with open(path) as fh:
            done = {(r["arm"], r["seed"]): r for r in json.load(fh)}
    for seed in args.engine_seeds:
        for arm in arms:
            if args.arms and arm not in args.arms and not (arm == "smith" and f"smith x{args.smith_factor}" in args.arms):
                continue
            lr = lrs[int(arm.split()[1])] if arm.startswith("fixed") else lrs[args.min_batch]
            r = done.get((arm, seed)) or run_engine(args, arm, lr, seed)
            s = r["summary"]
            print(f"engine seed {seed} {arm:<18} time_to_target_s {s.get('time_to_target_s')} "
                  f"(epoch {s.get('epoch_to_target')}), wall {r['wall_s']:.0f}s", flush=True)
            out.append(r)
            with open(path, "w") as fh:
                json.dump(out, fh, indent=1)
    return out


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", required=True, help="the image folder (../shared/datasets/mnist10k)")
    ap.add_argument("--image-size", type=int, default=14)
    ap.add_argument("--width", type=int, default=16, help="model.width of the cnn")
    ap.add_argument("--target", type=float, default=0.95, help="validation accuracy to reach")
    ap.add_argument("--batches", type=int, nargs="+", default=[32 * 2 ** i for i in range(8)],
                    help="the fixed global batches (default the sweep's, 32 ... 4096)")
    ap.add_argument("--sweep-table", default=os.path.join(REPO, "docs", "noise_scale_table.md"),
                    help="where each batch's best peak lr is read from (benchmarks/noise_scale.py --docs)")
    ap.add_argument("--lrs", nargs="*", default=[], help="BATCH:LR pairs that replace the table's")
    ap.add_argument("--base-lr", type=float, default=8.0, help="the sweep's LARS lr per --base-batch images")
    ap.add_argument("--base-batch", type=int, default=64)
    ap.add_argument("--max-lr", type=float, default=32.0, help="the sweep's cap on the linearly scaled lr")
    ap.add_argument("--warmup-epochs", type=float, default=2.0)
    ap.add_argument("--eval-growth", type=float, default=1.1, help="evaluate every this many times more steps")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=8, help="the common budget: accuracy after this many epochs")
    ap.add_argument("--max-epochs", type=int, default=30, help="a run short of the target goes on up to this")
    ap.add_argument("--min-batch", type=int, default=None, help="adaptive.min_batch (default the smallest batch)")
    ap.add_argument("--max-batch", type=int, default=None, help="adaptive.max_batch (default the largest batch)")
    ap.add_argument("--micro-batch", type=int, default=16, help="images per micro-batch of the adaptive run")
    ap.add_argument("--every-steps", type=int, default=20, help="adaptive.every_steps")
    ap.add_argument("--crit-factor", type=float, default=1.0,
                    help="adaptive.crit_factor of the --rules entries that do not give their own")
    ap.add_argument("--min-gain", type=float, default=0.02, help="adaptive.min_gain")
    ap.add_argument("--adaptive-warmup-epochs", type=float, default=None,
                    help="schedule.warmup_epochs of the adaptive runs (default --warmup-epochs): from the lr at "
                         "the smallest batch to the current peak")
    ap.add_argument("--rules", nargs="+", default=["scaling", "adascale"], metavar="RULE[:CRIT_FACTOR]",
                    help="the adaptive arms: adaptive.lr (scaling or adascale), each at --crit-factor or at the "
                         "adaptive.crit_factor after the colon (adascale:3.34: B_crit / B_simple as python -m "
                         "largebatch.advise --second-run measures it); an arm at a factor other than 1 is named "
                         "'adaptive RULE, crit_factor F'")
    ap.add_argument("--smith-factor", type=int, default=4)
    ap.add_argument("--smith-milestones", type=int, nargs="+", default=[1, 2, 4],
                    help="epochs at which the Smith arm multiplies its batch")
    ap.add_argument("--preset", default="goyal2017", help="the simulator's cluster and workload")
    ap.add_argument("--preset-workers", type=int, default=32)
    ap.add_argument("--arms", nargs="*", default=[], help="only these arms ('fixed 64', 'adaptive scaling', ...)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="runs/adaptive_batch")
    ap.add_argument("--docs", default=None, help="also write the tables and the plot into this folder")
    ap.add_argument("--reuse", action="store_true", help="reuse the runs of --out/runs.jsonl with the same settings")
    ap.add_argument("--engine", action="store_true", help="part (a): real engine runs on --engine-workers")
    ap.add_argument("--no-cluster", action="store_true", help="skip part (b)")
    ap.add_argument("--engine-batches", type=int, nargs="+", default=[32, 64, 128, 256, 512])
    ap.add_argument("--engine-workers", type=int, default=2)
    ap.add_argument("--engine-epochs", type=int, default=12, help="train.epochs of the engine runs")
    ap.add_argument("--engine-seeds", type=int, nargs="+", default=[0])
    args = ap.parse_args(argv)
    args.batches = sorted(args.batches)
    args.min_batch = args.min_batch or args.batches[0]
    args.max_batch = args.max_batch or args.batches[-1]
    args.max_epochs = max(args.max_epochs, args.epochs)
    if args.adaptive_warmup_epochs is None:
        args.adaptive_warmup_epochs = args.warmup_epochs
    args.adaptive = list(dict.fromkeys(parse_rule(x, args.crit_factor) for x in args.rules))
    args.data = "imagefolder"  # the sweep's load_data: an image folder, --root
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    lrs = read_sweep_lrs(args.sweep_table)
    lrs.update({int(b): float(lr) for b, lr in (x.split(":") for x in args.lrs)})
    missing = [b for b in args.batches + [args.min_batch] if b not in lrs]
    if missing:
        raise SystemExit(f"adaptive_batch: no best lr for batch(es) {missing} in {args.sweep_table}; give --lrs B:LR")
    step_time = preset_step_time(args.preset, args.preset_workers, args.micro_batch)
    print(step_time_line(step_time, ladder(args.min_batch, args.max_batch)), flush=True)
    t0 = time.perf_counter()
    results = []
    if not args.no_cluster:
        data = tuple(t.to(args.device) for t in sweep.load_data(args))
        results = run_cluster(args, data, lrs, step_time)
    engine = run_engine_part(args, lrs) if args.engine else []
    text = report(args, results, engine, lrs, step_time)
    print("\n" + text)
    write_outputs(args, results, engine, text)
    print(f"\n{time.perf_counter() - t0:.0f}s in all")


def report(args, results: list[dict], engine: list[dict], lrs: dict[int, float], step_time) -> str:
    parts = []
    if results:
        parts += [f"(b) {args.preset} at {step_time.workers} workers, seeds {' '.join(map(str, args.seeds))}: "
                  f"mean ± sd over the seeds; the accuracy after {args.epochs} epochs (runs short of the target "
                  f"went on up to {args.max_epochs})", step_time_line(step_time, ladder(args.min_batch, args.max_batch)),
                  cluster_table(results, lr_labels(args, lrs), args), "\n".join(cluster_goals(results)),
                  "\n".join(decisions_line(r) for r in results if r["kind"] == "adaptive")]
    if engine:
        parts += [f"(a) the engine on {args.engine_workers} CPU workers (gloo, one thread each), seeds "
                  f"{' '.join(map(str, args.engine_seeds))}: stopped at the first epoch end at the target",
                  engine_table(engine), "\n".join(engine_goals(engine, args.engine_workers)),
                  "\n".join(engine_seed_lines(engine)),
                  "\n".join(engine_decisions_line(r) for r in engine if r["arm"].startswith("adaptive"))]
    return "\n\n".join(parts)


def write_outputs(args, results: list[dict], engine: list[dict], text: str) -> None:
    with open(os.path.join(args.out, "table.md"), "w") as fh:
        fh.write(text + "\n")
    with open(os.path.join(args.out, "results.json"), "w") as fh:
        json.dump(dict(args=vars(args), results=[{k: v for k, v in r.items() if k != "trace"} for r in results]),
                  fh, indent=1)
    png = os.path.join(args.out, "adaptive_batch.png")
    drawn = bool(results) and plot(results, engine, png)
    if args.docs:
        os.makedirs(args.docs, exist_ok=True)
        with open(os.path.join(args.docs, "adaptive_batch_table.md"), "w") as fh:
            fh.write(text + "\n")
        if drawn:
            shutil.copyfile(png, os.path.join(args.docs, "adaptive_batch.png"))


if __name__ == "__main__":
    sys.exit(main())
