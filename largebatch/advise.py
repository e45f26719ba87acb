"""Which global batch and how many workers: the measured gradient noise scale joined to the simulator.

    python -m largebatch.advise RUN_DIR [--batches LIST] [--workers LIST] [--target-accuracy A]
        [--cost-per-node-hour P] [--plot FILE] [--json FILE] [cluster and workload options]
    python -m largebatch.advise --probe [--config FILE] [key=value ...] [the same options]

RUN_DIR is a run trained with ``train.noise_scale=true`` (its ``metrics.jsonl`` epoch lines carry
``noise_scale``); ``--probe`` first trains such a run from ``--config`` and the ``key=value``
overrides (a short run at a small batch: one worker gets accumulation steps for the two batch
sizes the measurement needs) in the config's ``run.dir``, then reads it. The cluster and the
workload are described with the options of ``python -m largebatch.simulate`` (``--preset``,
``--compute-ms``, ``--micro-batch``, ``--gradient-mb``, ``--workers-per-node``, ``--inter-gbit``,
...; see its ``--help``); left out, the compute time per image comes from the run's own
throughput and the gradient size from its ``checkpoints/final.pt``.

**Steps** (McCandlish, Kaplan, Amodei et al. 2018, "An Empirical Model of Large-Batch Training",
arXiv:1812.06162, eq. 2.11): the steps ``S`` and images ``E = S·B`` needed to reach a given loss
trade off as ``S/S_min − 1 = (E/E_min − 1)^−1``, i.e. ``S(B) = S_min·(1 + B_crit/B)`` with
``B_crit = E_min/S_min``, and the critical batch ``B_crit`` is about the simple noise scale
``B_simple``. The noise scale grows as the loss falls, so the model is applied per epoch of the
measured run: an epoch that took ``ΔS`` steps at batch ``B0`` with noise scale ``B_k`` would take
``ΔS·(1 + B_k/B)/(1 + B_k/B0)`` steps at batch ``B``. The sum over the epochs is again
``S_min·(1 + B_crit/B)``, with ``S_min = Σ ΔS/(1 + B_k/B0)`` and ``B_crit`` the ``S_min``-weighted
mean of the ``B_k``.

**Time per step** comes from :mod:`largebatch.scaling.predict` for each worker count; a per-worker batch
above the micro-batch runs as accumulation steps. **Wall time** is steps × step time, and **cost**
nodes × wall hours × ``run.cost_per_node_hour`` (or ``--cost-per-node-hour``; without a price, in
node-hours). The table marks the fastest and the cheapest choice; ``--plot`` draws the predicted
steps and the wall time against the global batch (needs matplotlib). :data:`ASSUMPTIONS` are
printed with every answer.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
from dataclasses import asdict, dataclass, replace
from typing import Optional, Sequence

from largebatch.errors import UsageError, run_cli
from largebatch.report import read_metrics
from largebatch.scaling.cli import check_simulator_args, simulator_parser
from largebatch.scaling.measure import checkpoint_gradient_bytes
from largebatch.scaling.output import describe, write_json
from largebatch.scaling.predict import predict_step
from largebatch.scaling.resolve import resolve

ASSUMPTIONS = (
    "B_crit = B_simple: the simple noise scale (per-image gradient variance / squared gradient) stands in for "
    "the critical batch; it leaves out the curvature, and McCandlish et al. find the two within a small factor",
    "every batch trains at a well-tuned learning rate and schedule: the model is the best each batch can do, "
    "and a fixed scaling rule (linear, LARS, LAMB) with warmup only approaches it",
    "S(B) = S_min(1 + B_crit/B), applied epoch by epoch of the measured run with that epoch's noise scale: "
    "steps trade for images as S/S_min - 1 = (E/E_min - 1)^-1",
    "the target is the measured run's (its loss at its end, or --target-accuracy); generalisation at large "
    "batch is not modelled: a batch that reaches the training loss is taken to reach the accuracy",
    "time per step from the simulator's alpha-beta model; compute time grows linearly with the micro-batch, "
    "and a per-worker batch above the micro-batch runs as accumulation steps",
    "cost = whole nodes x wall hours x price: start-up, evaluation and checkpoints are left out, and a "
    "node is paid for whole even when fewer workers than it holds are used",
    "BatchNorm statistics change with the per-worker batch; the noise scale is measured with the run's",
)
"""What the advice rests on, printed with it."""

BATCH_SPAN = 64
"""Default global batches: powers of two from a quarter of the measured batch to this many times it
(at least 16 B_crit), at most the training set."""


# -- the steps model ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Segment:
    """A stretch of the measured run (an epoch, or its part up to the target)."""

    steps: float
    """Optimizer steps the run took in it."""
    batch: int
    """The run's global batch in it."""
    noise_scale: float
    """B_simple measured over it, in images."""


@dataclass(frozen=True)
class StepsModel:
    """``S(B) = S_min·(1 + B_crit/B)`` fitted to a measured run."""

    s_min: float
    """Steps an infinitely large batch would need."""
    b_crit: float
    """The critical batch in images: ``E_min / S_min``."""
    measured_batch: int
    """The run's global batch (its first, with phases)."""
    measured_steps: float
    """The steps the run took to its target."""

    @property
    def e_min(self) -> float:
        """Images an infinitely small batch would need."""
        return self.s_min * self.b_crit

    def steps(self, batch: float) -> float:
        return self.s_min * (1.0 + self.b_crit / batch)

    def images(self, batch: float) -> float:
        return self.steps(batch) * batch


def steps_model(segments: Sequence[Segment]) -> StepsModel:
    """The model of :func:`steps` from the measured segments (see the module's text)."""
    if not segments:
        raise ValueError("no measured steps")
    for s in segments:
        if not (s.steps >= 0 and s.batch >= 1 and s.noise_scale > 0 and math.isfinite(s.noise_scale)):
            raise ValueError(f"a segment needs steps >= 0, a batch >= 1 and a noise scale > 0, got {s}")
    ideal = [s.steps / (1.0 + s.noise_scale / s.batch) for s in segments]
    s_min = sum(ideal)
    if s_min <= 0:
        raise ValueError("the measured segments hold no steps")
    b_crit = sum(a * s.noise_scale for a, s in zip(ideal, segments)) / s_min
    return StepsModel(s_min=s_min, b_crit=b_crit, measured_batch=segments[0].batch,
                      measured_steps=sum(s.steps for s in segments))


def knee(batches: Sequence[int], steps: Sequence[float], ratio: float = 0.75) -> Optional[float]:
    """The batch where doubling it stops nearly halving the steps: where ``S(2B)/S(B)`` first rises to
    ``ratio`` (0.75 at ``B = B_crit`` in the model), interpolated in log2(B). Needs batches that
    double from one to the next; None if the ratio never reaches ``ratio``."""
    pairs = [(b, s) for b, s in zip(batches, steps) if s is not None]
    ratios = []
    for (b1, s1), (b2, s2) in zip(pairs, pairs[1:]):
        if b2 != 2 * b1:
            raise ValueError(f"knee() needs batches that double, got {b1} then {b2}")
        ratios.append((b1, s2 / s1))
    for i, (b, r) in enumerate(ratios):
        if r >= ratio:
            if i == 0:
                return float(b)
            b0, r0 = ratios[i - 1]
            t = (ratio - r0) / (r - r0)
            return 2.0 ** (math.log2(b0) + t * (math.log2(b) - math.log2(b0)))
    return None


def fit_curve(batches: Sequence[int], steps: Sequence[float]) -> StepsModel:
    """Least-squares fit of ``S = S_min(1 + B_crit/B)`` to measured (batch, steps), in relative error:
    the measured knee's model form (``S·B`` against ``B`` is a line: ``E = E_min + S_min·B``)."""
    pts = [(b, s) for b, s in zip(batches, steps) if s is not None]
    if len(pts) < 2:
        raise ValueError("a fit needs two measured batches")
    # weighted linear regression of S on 1/B with weights 1/S² (relative errors)
    w = [1.0 / s ** 2 for _, s in pts]
    x = [1.0 / b for b, _ in pts]
    y = [s for _, s in pts]
    sw = sum(w)
    mx = sum(wi * xi for wi, xi in zip(w, x)) / sw
    my = sum(wi * yi for wi, yi in zip(w, y)) / sw
    sxx = sum(wi * (xi - mx) ** 2 for wi, xi in zip(w, x))
    sxy = sum(wi * (xi - mx) * (yi - my) for wi, xi, yi in zip(w, x, y))
    slope = sxy / sxx if sxx > 0 else 0.0  # = S_min·B_crit = E_min
    s_min = my - slope * mx
    if s_min <= 0:
        raise ValueError("the measured steps do not level off: no S_min > 0 fits them")
    return StepsModel(s_min=s_min, b_crit=max(slope, 0.0) / s_min, measured_batch=pts[0][0],
                      measured_steps=pts[0][1])


# -- a run folder ------------------------------------------------------------------------------------

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
    cost_per_node_hour: Optional[float]


def read_run(run_dir: str, target_accuracy: Optional[float] = None) -> Measured:
    """The measured segments of ``run_dir`` up to its target: ``target_accuracy`` (validation top-1,
    its first crossing interpolated within the epoch), else the run's train.target_accuracy where it
    reached it, else the whole run (the loss it ended at)."""
    import yaml

    from largebatch.batching import micro_batch_of

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
    if not any("noise_scale" in e for e in epochs):
        raise UsageError(f"'{run_dir}' was trained without train.noise_scale=true: its epochs carry no noise_scale; "
                         "train it again with train.noise_scale=true, or use --probe")
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
    filled = _fill(scales)
    # the segments up to the target
    target = target_accuracy
    reason = "--target-accuracy"
    if target is None and train.get("target_accuracy") is not None and summary.get("epoch_to_target") is not None \
            and train.get("target_metric", "top1") == "top1":
        target, reason = float(train["target_accuracy"]), "the run's train.target_accuracy"
    steps_before, accs = 0, [0.0]
    segments = []
    if target is None:
        for e, b, s in zip(epochs, batches, filled):
            segments.append(Segment(e["step"] - steps_before, b, s))
            steps_before = e["step"]
        what = f"the run's end: {epochs[-1]['step']} steps, train_loss {epochs[-1].get('train_loss')}"
    else:
        for e, b, s in zip(epochs, batches, filled):
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
        what = f"val_acc {target:g} ({reason}) after {sum(s.steps for s in segments):.0f} steps"
    first = epochs[0]
    spe = first["step"]
    per_worker = batches[0] // world
    micro = micro_batch_of(per_worker, train.get("max_micro_batch"))
    price = run.get("cost_per_node_hour")
    return Measured(run_dir=run_dir, segments=segments, target=what, global_batch=batches[0], world_size=world,
                    micro_batch=micro, per_worker_batch=per_worker, num_train=max(spe, 1) * batches[0],
                    images_per_second=summary.get("samples_per_sec") or first.get("samples_per_sec"),
                    gradient_bytes=checkpoint_gradient_bytes(run_dir), cost_per_node_hour=price)


def _fill(values: list) -> list[float]:
    """None entries replaced by the nearest defined value (later ones first)."""
    out = list(values)
    for i, v in enumerate(out):
        if v is None:
            later = next((x for x in values[i + 1:] if x is not None), None)
            earlier = next((x for x in reversed(values[:i]) if x is not None), None)
            out[i] = later if later is not None else earlier
    return [float(v) for v in out]


# -- the choices -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Choice:
    """One (workers, global batch) and what it is predicted to take."""

    global_batch: int
    workers: int
    nodes: int
    per_worker_batch: int
    micro_batch: int
    accum_steps: int
    steps: float
    step_time: float
    """Seconds per optimizer step (the simulator)."""
    wall_s: float
    node_hours: float
    cost: Optional[float]
    """node_hours x price, where a price is known."""


def choices(model: StepsModel, cluster, workload, workers: Sequence[int], batches: Sequence[int],
            price: Optional[float]) -> list[Choice]:
    """Every (workers, batch) that splits evenly and fills whole nodes, with its predicted steps,
    step time (``workload.compute_time`` is for ``workload.micro_batch`` images, the largest
    micro-batch), wall time and cost."""
    from largebatch.batching import micro_batch_of

    out = []
    for batch in batches:
        steps = model.steps(batch)
        for n in workers:
            if batch % n or not _fits(cluster, n):
                continue
            per_worker = batch // n
            micro = micro_batch_of(per_worker, workload.micro_batch)
            work = replace(workload, compute_time=workload.compute_time * micro / workload.micro_batch,
                           micro_batch=micro, accumulation_steps=per_worker // micro)
            pred = predict_step(cluster, work, n)
            wall = steps * pred.step_time
            hours = pred.nodes * wall / 3600.0
            out.append(Choice(global_batch=batch, workers=n, nodes=pred.nodes, per_worker_batch=per_worker,
                              micro_batch=micro, accum_steps=per_worker // micro, steps=steps,
                              step_time=pred.step_time, wall_s=wall, node_hours=hours,
                              cost=None if price is None else hours * price))
    return out


def _fits(cluster, workers: int) -> bool:
    k = cluster.workers_per_node
    return workers <= k or workers % k == 0


def fastest(rows: Sequence[Choice]) -> Choice:
    return min(rows, key=lambda c: (c.wall_s, c.node_hours))


def cheapest(rows: Sequence[Choice]) -> Choice:
    return min(rows, key=lambda c: (c.node_hours, c.wall_s))


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


def format_table(rows: Sequence[Choice], fast: Choice, cheap: Choice) -> str:
    priced = any(r.cost is not None for r in rows)
    head = (f"{'global batch':>12} {'workers':>7} {'nodes':>5} {'per worker':>10} {'micro x accum':>13} "
            f"{'steps':>8} {'step ms':>9} {'wall':>8} {'node-hours':>10}" + (f" {'cost':>9}" if priced else "") + "  ")
    lines = [head]
    for r in rows:
        mark = ", ".join(m for m, c in (("fastest", fast), ("cheapest", cheap)) if r is c)
        lines.append(f"{r.global_batch:>12} {r.workers:>7} {r.nodes:>5} {r.per_worker_batch:>10} "
                     f"{f'{r.micro_batch} x {r.accum_steps}':>13} {r.steps:>8.0f} {r.step_time * 1e3:>9.1f} "
                     f"{_duration(r.wall_s):>8} {r.node_hours:>10.3g}"
                     + (f" {r.cost:>9.3g}" if priced else "") + (f"  <- {mark}" if mark else ""))
    return "\n".join(lines)


def default_batches(model: StepsModel, num_train: int) -> list[int]:
    """Powers of two from a quarter of the measured batch to BATCH_SPAN times it (at least 16 B_crit),
    at most the training set."""
    lo = max(1, 2 ** math.floor(math.log2(max(model.measured_batch / 4, 1))))
    hi = max(model.measured_batch * BATCH_SPAN, 16 * model.b_crit)
    hi = min(hi, num_train)
    out, b = [], lo
    while b <= hi:
        out.append(b)
        b *= 2
    return out or [model.measured_batch]


def default_workers(cluster) -> list[int]:
    return [2 ** i for i in range(13) if _fits(cluster, 2 ** i)]


# -- the plot ----------------------------------------------------------------------------------------

def write_plot(path: str, model: StepsModel, rows: Sequence[Choice], fast: Choice, cheap: Choice,
               title: str = "") -> None:
    """Left: predicted steps against the global batch, with the measured run; right: wall time against
    the global batch for each worker count, the fastest and the cheapest marked."""
    try:
        import matplotlib
    except ImportError:
        raise UsageError("--plot draws with matplotlib, which is not installed: "
                         "pip install 'largebatch[report]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    batches = sorted({r.global_batch for r in rows})
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
    xs = [batches[0] * 2 ** (i / 8) for i in range(int(8 * math.log2(batches[-1] / batches[0])) + 1)] or batches
    left.plot(xs, [model.steps(b) for b in xs], label="predicted S(B) = S_min(1 + B_crit/B)")
    left.axhline(model.s_min, color="gray", ls=":", lw=1, label=f"S_min = {model.s_min:.0f}")
    left.axvline(model.b_crit, color="gray", ls="--", lw=1, label=f"B_crit = {model.b_crit:.0f}")
    left.scatter([model.measured_batch], [model.measured_steps], color="black", zorder=3, label="measured run")
    left.set_xscale("log", base=2)
    left.set_yscale("log")
    left.set_xlabel("global batch")
    left.set_ylabel("steps to the target")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    for n in sorted({r.workers for r in rows}):
        mine = sorted((r for r in rows if r.workers == n), key=lambda r: r.global_batch)
        right.plot([r.global_batch for r in mine], [r.wall_s for r in mine], marker=".", lw=1,
                   label=f"{n} worker{'s' if n > 1 else ''}")
    right.scatter([fast.global_batch], [fast.wall_s], marker="*", s=220, color="gold", edgecolors="black", zorder=4,
                  label=f"fastest: {fast.workers} workers, batch {fast.global_batch}")
    right.scatter([cheap.global_batch], [cheap.wall_s], marker="D", s=90, color="limegreen", edgecolors="black",
                  zorder=4, label=f"cheapest: {cheap.workers} workers, batch {cheap.global_batch}")
    right.set_xscale("log", base=2)
    right.set_yscale("log")
    for ax in (left, right):
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    right.set_xlabel("global batch")
    right.set_ylabel("predicted wall time (s)")
    right.grid(alpha=0.3)
    right.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.tmp.png")
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        os.replace(tmp, path)
    except OSError as exc:
        raise UsageError(f"--plot {path}: cannot write it ({exc.strerror or exc})") from None
    finally:
        plt.close(fig)


# -- command line ------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit status 2 through run_cli
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    """advise's own options on top of the simulator's (cluster and workload), which it shares."""
    p = _Parser(prog="python -m largebatch.advise", description=__doc__.split("\n")[0],
                parents=[simulator_parser()], conflict_handler="resolve",
                epilog="Cluster and workload: the options of python -m largebatch.simulate, e.g. --preset goyal2017, "
                       "--compute-ms 40 --micro-batch 32, --workers-per-node 8 --inter-gbit 100; left out, the compute "
                       "time comes from the run's images/s and the gradient size from its checkpoints/final.pt.")
    p.add_argument("targets", nargs="*", metavar="RUN_DIR | key=value",
                   help="a run folder; with --probe, config overrides of the probe run")
    p.add_argument("--probe", action="store_true", help="train a probe run first (--config, key=value ...)")
    p.add_argument("--config", metavar="FILE", help="with --probe: the probe run's YAML config")
    p.add_argument("--target-accuracy", type=float, metavar="A",
                   help="the target: first validation top-1 >= A (default: the run's target, else its end)")
    p.add_argument("--batches", metavar="LIST", help="global batches to consider, e.g. 256,1024,4096 "
                   "(default: powers of two around the measured batch and the critical batch)")
    p.add_argument("--workers", metavar="LIST", help="worker counts (default: 1, 2, 4, ... that fill whole nodes)")
    p.add_argument("--cost-per-node-hour", type=float, metavar="P", help="price of a node-hour (default: the run's "
                   "run.cost_per_node_hour; without one, cost is given in node-hours)")
    p.add_argument("--plot", metavar="FILE", help="PNG of predicted steps and wall time (needs matplotlib)")
    p.add_argument("--json", metavar="FILE", help="the model and the table as JSON")
    for action in p._actions:
        if action.dest in {dest for dest, _ in _NOT_HERE}:
            action.help = argparse.SUPPRESS
    return p


_NOT_HERE = (("validate", "--validate"), ("variations", "--variations"), ("nodes", "--nodes"),
             ("baseline_workers", "--baseline-workers"), ("accumulation_steps", "--accumulation-steps"))
"""The simulator's options that advise does not take (it picks accumulation steps per batch itself)."""


def _int_list(flag: str, text: str) -> list[int]:
    out = []
    for part in text.split(","):
        try:
            value = int(part.strip())
        except ValueError:
            raise UsageError(f"{flag} {text!r}: {part.strip()!r} is not an integer; "
                             "give a list such as 256,1024") from None
        if value < 1:
            raise UsageError(f"{flag} {text!r}: {value} is not allowed; use integers >= 1")
        out.append(value)
    return sorted(set(out))


def _probe(args) -> str:
    """Train the probe run (train.noise_scale=true; one worker gets 4 accumulation steps) and return
    its run.dir."""
    from largebatch.api import fit
    from largebatch.config import load_config
    from largebatch.distributed import discover

    overrides = [t for t in args.targets]
    bad = [t for t in overrides if "=" not in t]
    if bad:
        raise UsageError(f"--probe takes config overrides key=value, not {bad[0]!r}; drop --probe to read a run folder")
    overrides.append("train.noise_scale=true")
    cfg = load_config(args.config, overrides)
    if discover().world_size == 1 and cfg.train.max_micro_batch is None:
        # one worker measures the noise from micro-batches: split the batch in 4 (or as near as it goes)
        overrides.append(f"train.max_micro_batch={max(1, cfg.train.global_batch // 4)}")
    fit(args.config, overrides=overrides)
    return cfg.run.dir


def _simulator(sim, measured: Measured):
    """(cluster, workload, preset, notes) from the simulator's options in ``sim`` (the parsed command
    line), with the compute time and the gradient size taken from the run where they are not given."""
    for attr, flag in _NOT_HERE:
        if getattr(sim, attr):
            raise UsageError(f"{flag} is an option of python -m largebatch.simulate that advise does not take "
                             "(it chooses the worker counts and the accumulation steps itself); leave it out")
    derived = []
    if sim.micro_batch is None and not sim.preset:
        # the largest micro-batch a worker takes at once: the run's per-worker batch unless given (a
        # probe's micro-batches serve the measurement, not memory)
        sim.micro_batch = measured.per_worker_batch
    if sim.compute_ms is None and not sim.measure and not sim.preset:
        if not measured.images_per_second:
            raise UsageError(f"'{measured.run_dir}' records no images/s: give the compute time with --compute-ms MS "
                             "(for --micro-batch images) or --measure MODEL")
        per_image = measured.world_size / measured.images_per_second
        sim.compute_ms = per_image * sim.micro_batch * 1e3
        derived.append(f"compute time from the run's {measured.images_per_second:,.0f} images/s on "
                       f"{measured.world_size} worker(s): {sim.compute_ms:.2f} ms per micro-batch of {sim.micro_batch} "
                       "(communication and data loading included)")
    if sim.gradient_mb is None and not sim.model and not sim.measure and not sim.preset \
            and getattr(sim, "params", None) is None:
        if measured.gradient_bytes is None:
            raise UsageError(f"'{measured.run_dir}' has no checkpoints/final.pt to size the gradient: give "
                             "--gradient-mb MB or --model NAME")
        sim.gradient_mb = measured.gradient_bytes / 1e6
        derived.append(f"gradient {sim.gradient_mb:.2f} MB: the parameters of checkpoints/final.pt x 4 bytes")
    check_simulator_args(sim)
    r = resolve(sim)
    return r.cluster, r.workload, r.preset, [n for n in [r.note] if n] + derived


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.target_accuracy is not None and not 0 < args.target_accuracy <= 1:
        raise UsageError(f"--target-accuracy {args.target_accuracy:g} is not allowed: use a fraction in (0, 1]")
    price = args.cost_per_node_hour
    if price is not None and not (price >= 0 and math.isfinite(price)):
        raise UsageError(f"--cost-per-node-hour {args.cost_per_node_hour:g} is not allowed: use a price >= 0")
    for flag, path in (("--plot", args.plot), ("--json", args.json)):
        folder = os.path.dirname(os.path.abspath(path)) if path else None
        if folder is not None and not os.path.isdir(folder):
            raise UsageError(f"{flag} {path}: the folder {folder} does not exist")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise UsageError("--plot draws with matplotlib, which is not installed: pip install 'largebatch[report]'")
    if args.probe:
        run_dir = _probe(args)
    else:
        if args.config:
            raise UsageError("--config describes a probe run: add --probe, or give a run folder alone")
        if len(args.targets) != 1:
            raise UsageError("give one run folder (trained with train.noise_scale=true), or --probe with its config"
                             + (f"; got {' '.join(args.targets)}" if args.targets else ""))
        run_dir = args.targets[0]
    measured = read_run(run_dir, args.target_accuracy)
    cluster, workload, preset, notes = _simulator(args, measured)
    try:
        model = steps_model(measured.segments)
    except ValueError as exc:
        raise UsageError(f"'{run_dir}': {exc}") from None
    batches = _int_list("--batches", args.batches) if args.batches else default_batches(model, measured.num_train)
    workers = _int_list("--workers", args.workers) if args.workers else default_workers(cluster)
    price = args.cost_per_node_hour if args.cost_per_node_hour is not None else measured.cost_per_node_hour
    rows = choices(model, cluster, workload, workers, batches, price)
    if not rows:
        raise UsageError(f"no worker count of {workers} divides a global batch of {batches} and fills whole nodes of "
                         f"{cluster.workers_per_node}; give other --workers or --batches")
    fast, cheap = fastest(rows), cheapest(rows)
    print(f"run {run_dir}: global batch {measured.global_batch} on {measured.world_size} worker(s); "
          f"target: {measured.target}")
    print("measured noise scale per epoch (B_simple): "
          + ", ".join(f"{s.noise_scale:.0f}" for s in measured.segments))
    print(f"model: S(B) = S_min (1 + B_crit/B) with S_min = {model.s_min:.0f} steps, B_crit = {model.b_crit:.0f} "
          f"images, E_min = {model.e_min:,.0f} images")
    print("cluster" + (f" ({preset.name})" if preset else "") + ":")
    for line in notes + describe(cluster, workload):
        print("  " + line)
    print()
    print(format_table(rows, fast, cheap))
    print()
    unit = "" if price is not None else " node-hours"
    for name, c in (("fastest", fast), ("cheapest", cheap)):
        money = f"{c.cost:.3g}" if c.cost is not None else f"{c.node_hours:.3g}"
        print(f"{name}: global batch {c.global_batch} on {c.workers} worker(s) ({c.nodes} node(s)), "
              f"{c.steps:.0f} steps of {c.step_time * 1e3:.1f} ms, {_duration(c.wall_s)}, cost {money}{unit}")
    print()
    print("assumptions:")
    for a in ASSUMPTIONS:
        print(f"  - {a}")
    if args.plot:
        write_plot(args.plot, model, rows, fast, cheap, title=f"advice from {run_dir}")
        print(f"\nwrote {args.plot}")
    if args.json:
        payload = dict(run_dir=run_dir, target=measured.target, segments=[asdict(s) for s in measured.segments],
                       model=dict(asdict(model), e_min=model.e_min), cluster=asdict(cluster), workload=asdict(workload),
                       price=price, choices=[asdict(c) for c in rows], fastest=asdict(fast), cheapest=asdict(cheap),
                       assumptions=list(ASSUMPTIONS))
        write_json(args.json, payload)
        print(f"wrote {args.json}")
    return 0


def cli() -> None:
    """Console-script entry point."""
    run_cli(main)


if __name__ == "__main__":
    cli()
