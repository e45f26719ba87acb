"""Does the measured noise scale predict how the steps to a target fall with the global batch?

    python benchmarks/noise_scale.py --root ../shared/datasets/mnist10k                  # the full sweep
    python benchmarks/noise_scale.py --root ../shared/datasets/mnist10k --batches 32 256 2048 --target 0.95
    python benchmarks/noise_scale.py --root ../shared/datasets/mnist10k --target 0.95 \
        --measured docs/noise_scale_table.md                 # a previous sweep's steps: only the probe is run
    python benchmarks/noise_scale.py --data digits --model mlp --width 64 --batches 8 16 32 64 128 256 512 \
        --target 0.95 --seeds 10                              # the bundled digits

A batch-scaling sweep and a probe, on the same data, model, optimizer and schedule:

- **sweep**: for each global batch (32, 64, ..., 4096 by default) train from the same initial
  weights with LARS (every tensor trust-scaled: without BatchNorm, biases at the scaled lr
  diverge; Nesterov momentum 0.9, weight decay 5e-4), linear learning-rate scaling from
  ``--base-lr`` per ``--base-batch`` images capped at ``--max-lr``, and Goyal et al.'s gradual
  warmup (from the unscaled lr over ``--warmup-epochs``, then constant); evaluate the validation
  accuracy on a geometric grid of steps (every ``--eval-growth`` times more steps), and record the
  steps at which it first reaches ``--target`` (linear interpolation between the two evaluations
  around the crossing). McCandlish et al.'s model assumes a tuned learning rate: each batch is run
  at each of ``--lr-factors`` times its scaled lr, and further doubled (halved) while the best is
  the largest (smallest) tried, so that the best lr is bracketed; the fewest steps count (a run
  stops once it has taken more steps than the best so far).
- **probe**: the runs at the smallest batch (the best of them), up to the target, measure the gradient noise scale as
  the engine does with one worker and ``train.noise_scale=true``: ``|G_b|²`` from the first of 4
  micro-batches, ``|G_B|²`` from the step's gradient, the exponential averages of
  :class:`largebatch.engine.noise.NoiseScale` read at each epoch's end (and at the crossing).
  :func:`largebatch.scaling.steps.steps_model` turns those epochs into the predicted ``S(B)``, as
  ``python -m largebatch.advise`` does from a run folder; the probe's folder is written in the
  trainer's format (``probe/``), and the advise command on it is printed.

**Three predictions** of the sweep's steps, each printed with its ratio to the measured steps:

- *single probe*: the probe's noise scale epoch by epoch, as advise does with one run;
- *noise scale at the target*: the probe's noise scale at its first evaluation past the target,
  for the whole run (``S_min`` from the probe's steps);
- *two probes*: :func:`largebatch.scaling.steps.two_run_model` on the measured steps at the
  smallest batch and at ``--second-batch`` (8 times it by default), i.e. 2 of the sweep's own
  points, whose ratios are then 1 by construction; as advise does with ``--second-run``. The
  ratio of its ``B_crit`` to the single probe's is printed as ``adaptive.crit_factor``.

``--measured FILE`` takes the measured steps and peak lrs of a previous sweep (its
``results.json``, or the table it printed) and trains only the probe, at the smallest batch at its
lr there; ``--same-lrs`` trains every batch again at those lrs (no lr search). ``--seeds N`` trains
every (batch, lr) with N seeds and counts the mean steps (the probe's model then averages the
seeds' models). ``--data digits`` runs on the bundled digits (1,438 training images, 8x8) instead
of an image folder; ``--model mlp`` takes the MLP.

The measured knee is where doubling the batch stops nearly halving the steps: where ``S(2B)/S(B)``
reaches 0.75, which in McCandlish et al.'s model happens at ``B = B_crit``
(:func:`largebatch.scaling.steps.knee`); a least-squares fit of ``S_min(1 + B_crit/B)`` to the measured
steps is shown beside it.

The loop is this script's own (step-precise evaluation needs it): it reuses largebatch's model
zoo (``cnn``, width 16, or ``mlp``, no BatchNorm, so that images' gradients are independent, as the noise
scale's derivation assumes), its LARS optimizer, its schedule, its noise-scale estimator and the
engine's sampling (a permutation per epoch, floor(images / batch) steps, micro-batches as
consecutive slices). Images are the MNIST digits of ``--root`` resized to 14x14 and held in memory.
One process, ``--threads`` threads, on ``--device``. Writes ``results.json``, ``table.md`` and
``noise_scale.png`` (with matplotlib) to ``--out``, and, with ``--docs DIR``, the table and the plot to
``DIR/NAME_table.md`` and ``DIR/NAME.png`` (``--name``, default ``noise_scale``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time

import torch
import torch.nn.functional as F

from largebatch.config import load_config, to_dict
from largebatch.config.schema import DataConfig, OptimConfig, ScheduleConfig
from largebatch.data import build_datasets
from largebatch.data.sampler import epoch_permutation, steps_per_epoch
from largebatch.engine.noise import NoiseScale, first_micro_batch_sq_norm, squared_norm
from largebatch.models import create_model
from largebatch.optim import build_optimizer
from largebatch.optim.schedule import build_schedule
from largebatch.scaling.runs import fill_gaps
from largebatch.scaling.steps import Segment, StepsModel, crit_factor, fit_curve, knee, steps_model, two_run_model

NOISE_MICRO_BATCHES = 4
"""Micro-batches per step in the probe: |G_b|² comes from the first, b = global batch / 4."""


class PerTensorNoise:
    """The same estimates tensor by tensor (a :class:`NoiseScale` for each): each tensor's own noise
    scale ``B_l = tr(Σ_l) / |G_l|²``, and their mean weighted by ``|w_l|²``, the noise scale of the
    gradient as LARS scales it (each tensor's step set to ``η·|w_l|`` by its trust ratio
    ``η·|w_l| / |G_l|``: ``Σ |w_l|² B_l / Σ |w_l|²``)."""

    def __init__(self, count: int):
        self.each = [NoiseScale() for _ in range(count)]

    def update(self, small: torch.Tensor, large: torch.Tensor, b: int, B: int) -> None:
        for noise, s, g in zip(self.each, small, large):
            noise.update(s, g, b, B)

    def values(self, weights: list[torch.Tensor]) -> dict:
        scales = [noise.values().noise_scale for noise in self.each]
        w2 = [float(w.detach().double().square().sum()) for w in weights]
        known = [(w, x) for w, x in zip(w2, scales) if x is not None]
        trust = sum(w * x for w, x in known) / sum(w for w, _ in known) if known else None
        return dict(per_tensor=scales, trust_scaled=trust)


def load_data(args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train images, train labels, val images, val labels), decoded once and kept in --out."""
    cache = os.path.join(args.out, f"data-{args.data}-{args.image_size}px.pt")
    if os.path.isfile(cache):
        d = torch.load(cache, weights_only=True)
    else:
        cfg = DataConfig(name="digits", image_size=args.image_size) if args.data == "digits" else \
            DataConfig(name="imagefolder", root=args.root, image_size=args.image_size, cache=True)
        train, val, _ = build_datasets(cfg)
        d = dict(xt=train.images, yt=train.labels, xv=val.images, yv=val.labels)
        torch.save(d, cache)
    return d["xt"], d["yt"], d["xv"], d["yv"]


def peak_lr(args, batch: int, factor: float) -> float:
    """The linear scaling rule from --base-lr per --base-batch images, capped at --max-lr, times ``factor``."""
    return min(args.base_lr * batch / args.base_batch, args.max_lr) * factor


def optim_config(args, batch: int, factor: float) -> OptimConfig:
    # Every tensor gets LARS's trust ratio: without BatchNorm, biases at the scaled lr would diverge.
    return OptimConfig(name="lars", base_lr=peak_lr(args, batch, factor), base_batch=batch, scaling="linear",
                       momentum=0.9, nesterov=True, weight_decay=5e-4, exclude_bn_and_bias=False)


def schedule_config(args, batch: int, factor: float) -> ScheduleConfig:
    # Goyal et al.'s gradual warmup: from the unscaled lr to the peak (none at or below base_batch)
    start = min(args.base_lr * factor, peak_lr(args, batch, factor))
    return ScheduleConfig(warmup_epochs=args.warmup_epochs, warmup_start_lr=start, decay="constant")


@torch.no_grad()
def accuracy(model, x, y) -> float:
    model.eval()
    correct = sum((model(x[i:i + 1000]).argmax(1) == y[i:i + 1000]).sum().item() for i in range(0, len(y), 1000))
    model.train()
    return correct / len(y)


def train_to_target(args, data, batch: int, probe: bool, factor: float = 1.0,
                    step_limit: float = math.inf, seed: int = 0) -> dict:
    """Train at ``batch`` until the validation accuracy first reaches the target (or the image budget
    runs out, or the steps pass ``step_limit``: a run that cannot beat another lr's); with ``probe``,
    measure the noise scale on the way and finish the epoch of the crossing (the probe's run folder
    holds whole epochs)."""
    xt, yt, xv, yv = data
    n = len(yt)
    torch.manual_seed(seed)
    model = create_model(args.model, 10, 1, width=args.width, norm="none", image_size=xt.shape[-1]).to(xt.device)
    ocfg = optim_config(args, batch, factor)
    opt = build_optimizer(model, ocfg)
    spe = steps_per_epoch(n, batch)
    max_epochs = max(1, math.ceil(args.max_images / (spe * batch)))
    sched = build_schedule(ocfg, schedule_config(args, batch, factor), batch, spe, max_epochs)
    params = [p for p in model.parameters() if p.requires_grad]
    parts = NOISE_MICRO_BATCHES if probe else 1
    micro = batch // parts
    noise = NoiseScale() if probe else None
    each = PerTensorNoise(len(params)) if probe else None
    evals, epochs, crossed, at_target = [], [], None, None
    step, next_eval, t0 = 0, 1, time.perf_counter()

    def evaluate(at: int):
        """Score the model after step ``at``; the crossing step (interpolated) if this reaches the target."""
        acc = accuracy(model, xv, yv)
        evals.append((at, acc))
        if args.verbose:
            print(f"  batch {batch} step {at}: val_acc {acc:.4f} ({time.perf_counter() - t0:.0f}s)", flush=True)
        if acc < args.target:
            return None
        s1, a1 = evals[-2] if len(evals) > 1 else (0, 0.0)
        return s1 + (args.target - a1) / (acc - a1) * (at - s1)

    for epoch in range(max_epochs):
        perm = epoch_permutation(n, seed, epoch).to(xt.device)
        for s in range(spe):
            idx = perm[s * batch:(s + 1) * batch]
            for group in opt.param_groups:
                group["lr"] = sched(step)
            opt.zero_grad(set_to_none=True)
            for k in range(parts):
                part = idx[k * micro:(k + 1) * micro]
                (F.cross_entropy(model(xt[part]), yt[part], reduction="sum") / batch).backward()
                if probe and k == 0:
                    small = first_micro_batch_sq_norm([p.grad for p in params], parts)
                    small_each = torch.stack(torch._foreach_norm([p.grad for p in params])).square().cpu() * parts ** 2
            if probe:  # before the step: LARS works in place in the gradients
                noise.update(small, squared_norm([p.grad for p in params]), micro, batch)
                each.update(small_each, torch.stack(torch._foreach_norm([p.grad for p in params])).square().cpu(),
                            micro, batch)
            opt.step()
            step += 1
            if crossed is None and step >= next_eval:
                next_eval = max(step + 1, math.ceil(step * args.eval_growth))
                crossed = evaluate(step)
                if crossed is not None and probe:  # the noise scale at the first evaluation past the target
                    at_target = dict(step=step, noise_scale=noise.values().noise_scale)
                if crossed is not None and not probe:
                    break
            if crossed is None and step > step_limit:
                break
        if probe:  # an epoch line as the trainer writes it, the noise scale read at the epoch's end
            if not evals or evals[-1][0] != step:
                crossed = evaluate(step) if crossed is None else crossed
            acc = evals[-1][1]
            epochs.append(dict(epoch=epoch + 1, step=step, val_acc=acc,
                               images_per_second=step * batch / (time.perf_counter() - t0), **noise.values().fields(),
                               **each.values(params)))
        if crossed is not None or step > step_limit:
            break
    final = os.path.join(args.out, f"probe-final-{batch}-{factor:g}-{seed}.pt") if probe else None
    if probe:
        torch.save({"model": {k: v.cpu() for k, v in model.state_dict().items()}, "step": step}, final)
    return dict(batch=batch, lr=peak_lr(args, batch, factor), factor=factor, seed=seed, final=final, steps=crossed,
                steps_run=step,
                evals=evals, noise_epochs=epochs, noise_at_target=at_target, wall_s=time.perf_counter() - t0,
                steps_per_epoch=spe)


def train_seeds(args, data, batch: int, probe: bool, factor: float, best: float = math.inf) -> dict:
    """:func:`train_to_target` with --seeds seeds (initial weights and sampling): the steps are their
    mean (None unless every seed reaches the target), the rest is the first seed's; a probe keeps
    every seed's run in ``seed_runs``. A seed stops once the mean can no longer beat ``best``."""
    runs = []
    for k in range(args.seeds):
        limit = best * args.seeds - sum(r["steps"] for r in runs)
        runs.append(train_to_target(args, data, batch, probe, factor, limit, seed=args.seed + k))
        if runs[-1]["steps"] is None:
            break
    reached = len(runs) == args.seeds and all(r["steps"] is not None for r in runs)
    out = dict(runs[0])
    out.update(steps=sum(r["steps"] for r in runs) / args.seeds if reached else None,
               steps_each=[r["steps"] for r in runs], steps_run=max(r["steps_run"] for r in runs),
               wall_s=sum(r["wall_s"] for r in runs), seed_runs=runs if probe else None)
    return out


def probe_segments(probe: dict) -> list[Segment]:
    """Epochs of the probe up to its crossing, each with the noise scale read at its end (the last,
    partial one at the crossing), the gaps filled as advise fills them. With several seeds, every
    seed's epochs with 1/seeds of their steps: the model's steps are then the seeds' mean."""
    runs = probe.get("seed_runs") or [probe]
    return [Segment(s.steps / len(runs), s.batch, s.noise_scale) for r in runs for s in seed_segments(r)]


def seed_segments(probe: dict) -> list[Segment]:
    """:func:`probe_segments` of one seed's run."""
    rows = probe["noise_epochs"]
    scales = fill_gaps([r["noise_scale"] for r in rows])
    segments, before = [], 0
    for r, scale in zip(rows, scales):
        end = min(r["step"], probe["steps"])
        segments.append(Segment(steps=end - before, batch=probe["batch"], noise_scale=scale))
        before = end
    return segments


def write_probe_folder(args, probe: dict, folder: str) -> None:
    """The probe as a run folder in the trainer's format, for python -m largebatch.advise."""
    probe = (probe.get("seed_runs") or [probe])[0]  # the first seed's run
    os.makedirs(folder, exist_ok=True)
    data = ["data.name=digits"] if args.data == "digits" else ["data.name=imagefolder", f"data.root={args.root}"]
    if args.image_size is not None:
        data.append(f"data.image_size={args.image_size}")
    cfg = load_config(None, [f"run.dir={folder}", *data, f"model.name={args.model}", f"model.width={args.width}",
                             "model.norm=none", f"train.global_batch={probe['batch']}",
                             f"train.max_micro_batch={probe['batch'] // NOISE_MICRO_BATCHES}",
                             f"train.epochs={len(probe['noise_epochs'])}", "optim.name=lars",
                             f"optim.base_lr={probe['lr']}", f"optim.base_batch={probe['batch']}",
                             "optim.exclude_bn_and_bias=false", "optim.nesterov=true",
                             f"schedule.warmup_epochs={args.warmup_epochs}", "schedule.decay=constant"])
    import yaml

    with open(os.path.join(folder, "config.yaml"), "w") as fh:
        yaml.safe_dump(to_dict(cfg), fh, sort_keys=False)
    lines = [dict(event="epoch", epoch=r["epoch"], step=r["step"], val_acc=r["val_acc"],
                  samples_per_sec=r["images_per_second"], noise_scale=r["noise_scale"],
                  grad_sq_norm=r["grad_sq_norm"], grad_var=r["grad_var"]) for r in probe["noise_epochs"]]
    last = probe["noise_epochs"][-1]
    lines.append(dict(event="summary", world_size=1, global_batch=probe["batch"], steps=probe["steps_run"],
                      samples_per_sec=last["images_per_second"], noise_scale=last["noise_scale"]))
    with open(os.path.join(folder, "metrics.jsonl"), "w") as fh:
        fh.write("".join(json.dumps(x) + "\n" for x in lines))
    os.makedirs(os.path.join(folder, "checkpoints"), exist_ok=True)
    shutil.copyfile(probe["final"], os.path.join(folder, "checkpoints", "final.pt"))


def per_tensor_lines(probe: dict) -> str:
    """The probe's noise scale tensor by tensor at each epoch's end (PerTensorNoise)."""
    def show(x):
        return "—" if x is None else f"{x:.0f}"

    lines = []
    for r in probe["noise_epochs"]:
        known = [x for x in r["per_tensor"] if x is not None]
        span = f"{min(known):.0f}–{max(known):.0f}" if known else "—"
        lines.append(f"epoch {r['epoch']}: B_simple {show(r['noise_scale'])}; tensor by tensor {span}; "
                     f"|w|²-weighted (the gradient as LARS scales it) {show(r['trust_scaled'])}")
    return "\n".join(lines)


def read_measured(path: str) -> list[dict]:
    """The measured steps and peak lrs per batch of a previous sweep: its ``results.json`` or the
    table it printed (``table.md``, ``docs/noise_scale_table.md``: whole steps, as printed)."""
    if path.endswith(".json"):
        with open(path) as fh:
            rows = json.load(fh)["results"]
        return sorted([dict(batch=r["batch"], lr=r["lr"], steps=r["steps"], steps_run=r["steps_run"]) for r in rows],
                      key=lambda r: r["batch"])
    rows = []
    with open(path) as fh:
        for line in fh:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not line.startswith("|") or not cells[0].isdigit():
                continue
            reached = cells[2].replace(",", "").replace(".", "", 1).isdigit()
            rows.append(dict(batch=int(cells[0]), lr=float(cells[1]) if reached else None,
                             steps=float(cells[2].replace(",", "")) if reached else None,
                             steps_run=None if reached else int(cells[2].split()[-1])))
    if not rows:
        raise SystemExit(f"noise_scale: {path} holds no table rows '| batch | peak lr | measured steps | ...'")
    return sorted(rows, key=lambda r: r["batch"])


def predictions(results: list[dict], probe: dict, second_batch: int) -> dict:
    """The three predictions of the steps against the batch:

    - ``single``: the probe's noise scale epoch by epoch (:func:`steps_model`, as advise does with one run);
    - ``at_target``: the probe's noise scale where it reached the target, for the whole run;
    - ``two``: :func:`two_run_model` on the measured steps at the probe's batch and at ``second_batch``
      (two points of the sweep), or None where they do not fit (``two_error`` says why).
    """
    single = steps_model(probe_segments(probe))
    runs = probe.get("seed_runs") or [probe]
    near = [(r.get("noise_at_target") or {}).get("noise_scale") or seed_segments(r)[-1].noise_scale for r in runs]
    at_target = steps_model([Segment(steps=r["steps"] / len(runs), batch=r["batch"], noise_scale=x)
                             for r, x in zip(runs, near)])
    by_batch = {r["batch"]: r for r in results}
    first, second = by_batch[probe["batch"]], by_batch.get(second_batch)
    two, error = None, None
    if second is None or second["steps"] is None:
        error = f"no measured steps at batch {second_batch}"
    else:
        try:
            two = two_run_model(first["batch"], first["steps"], second["batch"], second["steps"])
        except ValueError as exc:
            error = str(exc)
    return dict(single=single, at_target=at_target, two=two, two_error=error, second_batch=second_batch,
                crit_factor=None if two is None else crit_factor(two, single))


METHODS = (("single", "single probe"), ("at_target", "noise scale at the target"), ("two", "two probes"))


def table(results: list[dict], pred: dict) -> str:
    """Per batch: the measured steps and each method's prediction with its ratio to them."""
    models = [(pred[key], name) for key, name in METHODS if pred[key] is not None]
    head = "| global batch | peak lr | measured steps | " + " | ".join(f"{name} | ratio" for _, name in models) + " |"
    lines = [head, "| ---: " * (3 + 2 * len(models)) + "|"]
    for r in results:
        preds = [m.steps(r["batch"]) for m, _ in models]
        if r["steps"] is None:
            cells = [f"{p:.0f} | —" for p in preds]
            lines.append(f"| {r['batch']} | — | not reached in {r['steps_run']} | " + " | ".join(cells) + " |")
        else:
            cells = [f"{p:.0f} | {p / r['steps']:.2f}" for p in preds]
            lines.append(f"| {r['batch']} | {r['lr']:.3g} | {r['steps']:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def within(results: list[dict], model: StepsModel, factor: float = 1.3) -> str:
    """'k of n batches within ``factor``x, worst X.XXx at B' for a model against the measured steps."""
    done = [r for r in results if r["steps"] is not None]
    off = [(max(model.steps(r["batch"]) / r["steps"], r["steps"] / model.steps(r["batch"])), r["batch"]) for r in done]
    worst = max(off)
    return (f"{sum(o <= factor for o, _ in off)} of {len(off)} batches within {factor:g}x, "
            f"worst {worst[0]:.2f}x at {worst[1]}")


def summary(args, results: list[dict], probe: dict, pred: dict, measured_knee, fitted) -> str:
    """The lines under the table: each method's constants and how close it came."""
    single, at_target, two = pred["single"], pred["at_target"], pred["two"]
    b1 = probe["batch"]
    runs = probe.get("seed_runs") or [probe]
    seeds = "; ".join((f"seed {r['seed']}: " if len(runs) > 1 else "") + f"{r['steps']:.0f} steps, noise scale per "
                      "epoch " + ", ".join(f"{s.noise_scale:.0f}" for s in seed_segments(r)) for r in runs)
    lines = [f"single probe at batch {b1} (lr {probe['lr']:.3g}, {probe['steps']:.0f} steps"
             + (f", the mean of {len(runs)} seeds" if len(runs) > 1 else "") + f"): {seeds}; S_min {single.s_min:.0f}, "
             f"B_crit {single.b_crit:.0f} (S_min-weighted); {within(results, single)}",
             f"noise scale at the target (the probe's first evaluation past it; S_min-weighted over the seeds): "
             f"S_min {at_target.s_min:.0f}, B_crit {at_target.b_crit:.0f}; {within(results, at_target)}"]
    if two is None:
        lines.append(f"two probes: none ({pred['two_error']})")
    else:
        s2 = two.s_min * (1 + two.b_crit / pred["second_batch"])
        lines.append(f"two probes: the measured steps at batch {b1} ({two.measured_steps:.0f}) and at batch "
                     f"{pred['second_batch']} ({s2:.0f}), 2 of the {len(results)} points of the sweep, so their "
                     f"ratios are 1 by construction: S_min {two.s_min:.0f}, B_crit {two.b_crit:.0f}; "
                     f"{within(results, two)}")
        lines.append(f"crit_factor = B_crit (two probes) / B_crit (single probe) = {two.b_crit:.0f} / "
                     f"{single.b_crit:.0f} = {pred['crit_factor']:.2f}: adaptive.crit_factor={pred['crit_factor']:.2f}")
    lines.append(f"measured knee {'none' if measured_knee is None else f'{measured_knee:.0f}'}"
                 + ("" if fitted is None else f"; B_crit fitted to the whole sweep {fitted.b_crit:.0f} "
                                              f"(S_min {fitted.s_min:.0f})"))
    return "\n\n".join(lines) + f"\n\nthe probe's noise scale tensor by tensor (seed {probe['seed']}):\n\n" + \
        per_tensor_lines(probe).replace("\n", "\n\n")


def plot(results: list[dict], pred: dict, probe: dict, measured_knee, fitted, path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return False
    done = [r for r in results if r["steps"] is not None]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
    lo, hi = min(r["batch"] for r in results), max(r["batch"] for r in results)
    xs = [lo * 2 ** (i / 8) for i in range(int(8 * math.log2(hi / lo)) + 1)]
    left.plot([r["batch"] for r in done], [r["steps"] for r in done], "o-", color="black", label="measured (sweep)")
    styles = dict(single=("tab:blue", "-"), at_target=("tab:orange", "--"), two=("tab:green", "-"))
    for key, name in METHODS:
        if pred[key] is not None:
            color, ls = styles[key]
            left.plot(xs, [pred[key].steps(b) for b in xs], color=color, ls=ls,
                      label=f"{name}: B_crit {pred[key].b_crit:.0f}")
    if fitted is not None:
        left.plot(xs, [fitted.steps(b) for b in xs], ls=":", color="gray",
                  label=f"fitted to the whole sweep: B_crit {fitted.b_crit:.0f}")
    if measured_knee is not None:
        left.axvline(measured_knee, color="black", ls="--", lw=1, label=f"measured knee {measured_knee:.0f}")
    left.set_xscale("log", base=2)
    left.set_yscale("log")
    left.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    left.set_xlabel("global batch")
    left.set_ylabel("steps to the target accuracy")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    runs = probe.get("seed_runs") or [probe]
    for i, run in enumerate(runs):
        rows = [r for r in run["noise_epochs"] if r["noise_scale"] is not None]
        right.plot([r["step"] for r in rows], [r["noise_scale"] for r in rows], "o-", color="tab:blue",
                   alpha=1.0 if len(runs) == 1 else 0.4, label=None if i else "B_simple at each epoch's end"
                   + (f" ({len(runs)} seeds)" if len(runs) > 1 else ""))
    right.axhline(pred["single"].b_crit, color="tab:blue", ls="--", lw=1,
                  label=f"S_min-weighted mean {pred['single'].b_crit:.0f}")
    if pred["two"] is not None:
        right.axhline(pred["two"].b_crit, color="tab:green", ls="--", lw=1,
                      label=f"B_crit of two probes {pred['two'].b_crit:.0f}")
    right.axvline(probe["steps"], color="black", ls=":", lw=1, label=f"target reached (step {probe['steps']:.0f}"
                  + (", the seeds' mean)" if len(runs) > 1 else ")"))
    right.set_xlabel(f"step of the probe (global batch {probe['batch']})")
    right.set_ylabel("noise scale B_simple (images)")
    right.set_yscale("log")
    right.grid(alpha=0.3)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", choices=("imagefolder", "digits"), default="imagefolder",
                    help="an image folder (--root), or the bundled digits (1,438 training images, 8x8)")
    ap.add_argument("--root", help="the image folder (../shared/datasets/mnist10k), for --data imagefolder")
    ap.add_argument("--image-size", type=int, default=None, help="default 14 for an image folder, 8 for the digits")
    ap.add_argument("--model", choices=("cnn", "mlp"), default="cnn", help="cnn or mlp, without BatchNorm")
    ap.add_argument("--width", type=int, default=16, help="model.width")
    ap.add_argument("--batches", type=int, nargs="+", default=[32 * 2 ** i for i in range(8)],
                    help="global batches of the sweep, doubling (default 32 ... 4096); the first is the probe's")
    ap.add_argument("--second-batch", type=int, default=None,
                    help="the second probe's batch, one of --batches (default 8 times the first)")
    ap.add_argument("--measured", metavar="FILE", default=None,
                    help="the results.json or table of a previous sweep with these options: its measured steps and "
                         "peak lrs are taken, and only the probe at its first batch (at its lr) is run")
    ap.add_argument("--same-lrs", action="store_true",
                    help="with --measured: train every batch again at the previous sweep's best lr (no lr search) and "
                         "take these steps instead of the previous ones")
    ap.add_argument("--target", type=float, default=0.97, help="validation accuracy to reach")
    ap.add_argument("--base-lr", type=float, default=8.0, help="LARS lr per --base-batch images")
    ap.add_argument("--base-batch", type=int, default=64)
    ap.add_argument("--max-lr", type=float, default=32.0, help="cap on the linearly scaled lr")
    ap.add_argument("--lr-factors", type=float, nargs="+", default=[0.5, 1.0, 2.0],
                    help="lrs tried at each batch, as factors of the scaled lr; the fewest steps count")
    ap.add_argument("--lr-extensions", type=int, default=3,
                    help="tries beyond --lr-factors while the best lr is the largest or smallest tried")
    ap.add_argument("--warmup-epochs", type=float, default=2.0)
    ap.add_argument("--max-images", type=float, default=2e6, help="give up on a batch after this many images")
    ap.add_argument("--eval-growth", type=float, default=1.1, help="evaluate every this many times more steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, default=1,
                    help="seeds per batch and lr (initial weights and sampling): the steps are their mean")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (the data and the model on the GPU)")
    ap.add_argument("--verbose", action="store_true", help="print every evaluation")
    ap.add_argument("--probe-only", action="store_true", help="the probe alone (the first batch), no sweep")
    ap.add_argument("--out", default="runs/noise_scale")
    ap.add_argument("--docs", default=None, help="also write the table and the plot into this folder")
    ap.add_argument("--name", default="noise_scale",
                    help="with --docs: the files are DOCS/NAME_table.md and DOCS/NAME.png")
    args = ap.parse_args()
    if args.data == "imagefolder" and not args.root:
        ap.error("--data imagefolder needs --root FOLDER")
    if args.same_lrs and not args.measured:
        ap.error("--same-lrs reruns a previous sweep: give it with --measured FILE")
    if args.image_size is None and args.data == "imagefolder":
        args.image_size = 14
    return args


def best_of(args, data, batch: int, probe: bool, tries: list) -> dict:
    """The fewest steps over the lr factors (McCandlish et al.'s model assumes a tuned lr): the
    factors of --lr-factors, nearest 1 first, then, while the best is the largest (smallest) lr
    tried, twice that (half that) again, up to --lr-extensions times, so that the best lr is
    bracketed. A try stops once it has run more steps than the best so far."""
    best, tried = None, {}

    def attempt(factor: float) -> None:
        nonlocal best
        r = train_seeds(args, data, batch, probe, factor, best["steps"] if best else math.inf)
        shown = "not reached" if r["steps"] is None else f"{r['steps']:.0f} steps"
        print(f"batch {batch:>5} lr {r['lr']:<8.4g}: {shown} ({r['wall_s']:.0f}s)", flush=True)
        tries.append({k: v for k, v in r.items() if k not in ("noise_epochs", "seed_runs")})
        tried[factor] = r
        if r["steps"] is not None and (best is None or r["steps"] < best["steps"]):
            best = r

    for factor in sorted(args.lr_factors, key=lambda f: abs(math.log(f))):
        attempt(factor)
    for _ in range(args.lr_extensions):
        if best is None:  # every lr failed: smaller ones
            attempt(min(tried) / 2)
        elif best["factor"] == max(tried):
            attempt(2 * max(tried))
        elif best["factor"] == min(tried):
            attempt(min(tried) / 2)
        else:
            break
    return best or tried[max(tried)]


def run_probe(args, data, batches: list[int], sweep: list[dict], tries: list) -> dict:
    """The probe at the first batch: at the previous sweep's best lr there (--measured), else the
    best of the lr search."""
    if sweep:
        first = sweep[0]
        if first["steps"] is None:
            raise SystemExit(f"noise_scale: the previous sweep did not reach the target at batch {first['batch']}")
        probe = train_seeds(args, data, first["batch"], True, first["lr"] / peak_lr(args, first["batch"], 1.0))
        tries.append({k: v for k, v in probe.items() if k not in ("noise_epochs", "seed_runs")})
        shown = "not reached" if probe["steps"] is None else f"{probe['steps']:.0f} steps"
        print(f"probe at batch {first['batch']} lr {probe['lr']:.4g}: {shown} (the previous sweep: "
              f"{first['steps']:.0f}; {probe['wall_s']:.0f}s)", flush=True)
    else:
        probe = best_of(args, data, batches[0], True, tries)
    if probe["steps"] is None:
        raise SystemExit(f"noise_scale: the probe at batch {probe['batch']} did not reach {args.target} in "
                         f"{args.max_images:g} images; lower --target")
    return probe


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    data = tuple(t.to(args.device) for t in load_data(args))
    sweep = read_measured(args.measured) if args.measured else []
    batches = [r["batch"] for r in sweep] if sweep else sorted(args.batches)
    second_batch = args.second_batch or 8 * batches[0]
    t0 = time.perf_counter()
    tries = []
    probe = run_probe(args, data, batches, sweep, tries)
    segments = probe_segments(probe)
    print(f"probe at batch {probe['batch']} (lr {probe['lr']:.4g}): {probe['steps']:.0f} steps to {args.target}, "
          "noise scale per epoch " + ", ".join(f"{s.noise_scale:.0f}" for s in segments)
          + f"; S_min {steps_model(segments).s_min:.0f}, B_crit {steps_model(segments).b_crit:.0f}", flush=True)
    print(per_tensor_lines(probe), flush=True)
    folder = os.path.join(args.out, "probe")
    write_probe_folder(args, probe, folder)
    if args.probe_only:
        print(f"the probe as a run folder: {folder}")
        return
    results = sweep or [probe]
    if args.same_lrs:
        results = [probe]
        for r in sweep[1:]:
            again = train_seeds(args, data, r["batch"], False, r["lr"] / peak_lr(args, r["batch"], 1.0))
            print(f"batch {r['batch']:>5} lr {again['lr']:<8.4g}: " + ("not reached" if again["steps"] is None else
                  f"{again['steps']:.0f} steps") + f" (the previous sweep: {r['steps']}; {again['wall_s']:.0f}s)",
                  flush=True)
            results.append(again)
    for batch in batches[len(results):]:
        r = best_of(args, data, batch, False, tries)
        results.append(r)
        shown = "not reached" if r["steps"] is None else f"{r['steps']:.0f} steps at lr {r['lr']:.4g}"
        print(f"batch {batch:>5}: best {shown} (single probe predicts {steps_model(segments).steps(batch):.0f})",
              flush=True)
        with open(os.path.join(args.out, "results.json"), "w") as fh:
            json.dump(dict(args=vars(args), results=results, tries=tries), fh, indent=1)
    report(args, results, probe, predictions(results, probe, second_batch), tries, folder, time.perf_counter() - t0)


def report(args, results: list[dict], probe: dict, pred: dict, tries: list, folder: str, wall_s: float) -> None:
    """The table and its summary printed and written (--out, --docs), the plot, results.json."""
    measured = [(r["batch"], r["steps"]) for r in results]
    try:
        measured_knee = knee([b for b, _ in measured], [s for _, s in measured])
    except ValueError:
        measured_knee = None
    try:
        fitted = fit_curve([b for b, s in measured if s], [s for _, s in measured if s])
    except ValueError:
        fitted = None
    text = table(results, pred) + "\n\n" + summary(args, results, probe, pred, measured_knee, fitted)
    if args.measured and args.same_lrs:
        text += (f"\n\nevery batch trained again at the best lr of {args.measured} (no lr search); the steps that "
                 "sweep measured: " + ", ".join(f"{r['batch']}: {r['steps']:.0f}" for r in read_measured(args.measured)))
    elif args.measured:
        text += (f"\n\nmeasured steps and peak lrs from {args.measured}; the probe at batch {probe['batch']} rerun at "
                 f"its lr took {probe['steps']:.0f} steps (the single-probe and at-target predictions rest on it)")
    with open(os.path.join(args.out, "table.md"), "w") as fh:
        fh.write(text + "\n")
    models = {k: None if pred[k] is None else vars(pred[k]) | dict(e_min=pred[k].e_min) for k, _ in METHODS}
    with open(os.path.join(args.out, "results.json"), "w") as fh:
        json.dump(dict(args=vars(args), models=models, crit_factor=pred["crit_factor"], two_error=pred["two_error"],
                       measured_knee=measured_knee, fitted=None if fitted is None else vars(fitted),
                       results=[{k: v for k, v in r.items() if k not in ("noise_epochs", "seed_runs")} for r in results],
                       probe=probe, tries=tries), fh, indent=1)
    print()
    print(text)
    png = os.path.join(args.out, "noise_scale.png")
    drawn = plot(results, pred, probe, measured_knee, fitted, png)
    if args.docs:
        os.makedirs(args.docs, exist_ok=True)
        with open(os.path.join(args.docs, f"{args.name}_table.md"), "w") as fh:
            fh.write(text + "\n")
        if drawn:
            shutil.copyfile(png, os.path.join(args.docs, f"{args.name}.png"))
    print(f"\n{wall_s:.0f}s in all; the probe as a run folder: {folder}")
    print(f"  python -m largebatch.advise {folder} --target-accuracy {args.target} --workers-per-node 8 "
          f"--inter-gbit 100 --plot {os.path.join(args.out, 'advice.png')}")


if __name__ == "__main__":
    sys.exit(main())
