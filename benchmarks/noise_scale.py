"""Does the measured noise scale predict how the steps to a target fall with the global batch?

    python benchmarks/noise_scale.py --root ../shared/datasets/mnist10k                  # the full sweep
    python benchmarks/noise_scale.py --root ../shared/datasets/mnist10k --batches 32 256 2048 --target 0.95

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

The measured knee is where doubling the batch stops nearly halving the steps: where ``S(2B)/S(B)``
reaches 0.75, which in McCandlish et al.'s model happens at ``B = B_crit``
(:func:`largebatch.scaling.steps.knee`); a least-squares fit of ``S_min(1 + B_crit/B)`` to the measured
steps is shown beside it.

The loop is this script's own (step-precise evaluation needs it): it reuses largebatch's model
zoo (``cnn``, width 16, no BatchNorm, so that images' gradients are independent, as the noise
scale's derivation assumes), its LARS optimizer, its schedule, its noise-scale estimator and the
engine's sampling (a permutation per epoch, floor(images / batch) steps, micro-batches as
consecutive slices). Images are the MNIST digits of ``--root`` resized to 14x14 and held in memory.
One process, ``--threads`` threads, on ``--device``. Writes ``results.json``, ``table.md`` and
``noise_scale.png`` (with matplotlib) to ``--out``, and, with ``--docs DIR``, the table and the plot to
``DIR/noise_scale_table.md`` and ``DIR/noise_scale.png``.
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
from largebatch.scaling.steps import Segment, StepsModel, fit_curve, knee, steps_model

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
    cache = os.path.join(args.out, f"data-{args.image_size}px.pt")
    if os.path.isfile(cache):
        d = torch.load(cache, weights_only=True)
    else:
        train, val, _ = build_datasets(DataConfig(name="imagefolder", root=args.root, image_size=args.image_size,
                                                  cache=True))
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
                    step_limit: float = math.inf) -> dict:
    """Train at ``batch`` until the validation accuracy first reaches the target (or the image budget
    runs out, or the steps pass ``step_limit``: a run that cannot beat another lr's); with ``probe``,
    measure the noise scale on the way and finish the epoch of the crossing (the probe's run folder
    holds whole epochs)."""
    xt, yt, xv, yv = data
    n = len(yt)
    torch.manual_seed(args.seed)
    model = create_model("cnn", 10, 1, width=args.width, norm="none").to(xt.device)
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
    evals, epochs, crossed = [], [], None
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
        perm = epoch_permutation(n, args.seed, epoch).to(xt.device)
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
    if probe:
        torch.save({"model": {k: v.cpu() for k, v in model.state_dict().items()}, "step": step},
                   os.path.join(args.out, "probe-final.pt"))
    return dict(batch=batch, lr=peak_lr(args, batch, factor), factor=factor, steps=crossed, steps_run=step,
                evals=evals, noise_epochs=epochs, wall_s=time.perf_counter() - t0, steps_per_epoch=spe)


def probe_segments(probe: dict) -> list[Segment]:
    """Epochs of the probe up to its crossing, each with the noise scale read at its end (the last,
    partial one at the crossing), the gaps filled as advise fills them."""
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
    os.makedirs(folder, exist_ok=True)
    cfg = load_config(None, [f"run.dir={folder}", "data.name=imagefolder", f"data.root={args.root}",
                             f"data.image_size={args.image_size}", "model.name=cnn", f"model.width={args.width}",
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
    shutil.move(os.path.join(args.out, "probe-final.pt"), os.path.join(folder, "checkpoints", "final.pt"))


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


def table(results: list[dict], model: StepsModel) -> str:
    lines = ["| global batch | peak lr | measured steps | predicted steps | predicted / measured | measured images |",
             "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        pred = model.steps(r["batch"])
        if r["steps"] is None:
            lines.append(f"| {r['batch']} | — | not reached in {r['steps_run']} | {pred:.0f} | — | — |")
        else:
            lines.append(f"| {r['batch']} | {r['lr']:.3g} | {r['steps']:.0f} | {pred:.0f} | {pred / r['steps']:.2f} | "
                         f"{r['steps'] * r['batch']:,.0f} |")
    return "\n".join(lines)


def plot(results: list[dict], model: StepsModel, probe: dict, measured_knee, fitted, path: str) -> bool:
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
    left.plot(xs, [model.steps(b) for b in xs], color="tab:blue",
              label=f"predicted from the probe at {probe['batch']}: B_crit {model.b_crit:.0f}")
    if fitted is not None:
        left.plot(xs, [fitted.steps(b) for b in xs], ls=":", color="gray",
                  label=f"S_min(1 + B_crit/B) fitted to the sweep: B_crit {fitted.b_crit:.0f}")
    left.axvline(model.b_crit, color="tab:blue", ls="--", lw=1)
    if measured_knee is not None:
        left.axvline(measured_knee, color="black", ls="--", lw=1, label=f"measured knee {measured_knee:.0f}")
    for ax in (left,):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("global batch")
        ax.set_ylabel("steps to the target accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    rows = [r for r in probe["noise_epochs"] if r["noise_scale"] is not None]
    right.plot([r["step"] for r in rows], [r["noise_scale"] for r in rows], "o-", label="B_simple at each epoch's end")
    right.axhline(model.b_crit, color="tab:blue", ls="--", lw=1, label=f"S_min-weighted mean {model.b_crit:.0f}")
    right.axvline(probe["steps"], color="black", ls=":", lw=1, label=f"target reached (step {probe['steps']:.0f})")
    right.set_xlabel(f"step of the probe (global batch {probe['batch']})")
    right.set_ylabel("noise scale B_simple (images)")
    right.set_yscale("log")
    right.grid(alpha=0.3)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", required=True, help="the image folder (../shared/datasets/mnist10k)")
    ap.add_argument("--image-size", type=int, default=14)
    ap.add_argument("--width", type=int, default=16, help="model.width of the cnn")
    ap.add_argument("--batches", type=int, nargs="+", default=[32 * 2 ** i for i in range(8)],
                    help="global batches of the sweep, doubling (default 32 ... 4096); the first is the probe's")
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
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (the data and the model on the GPU)")
    ap.add_argument("--verbose", action="store_true", help="print every evaluation")
    ap.add_argument("--probe-only", action="store_true", help="the probe alone (the first batch), no sweep")
    ap.add_argument("--out", default="runs/noise_scale")
    ap.add_argument("--docs", default=None, help="also write the table and the plot into this folder")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    data = tuple(t.to(args.device) for t in load_data(args))
    batches = sorted(args.batches)
    t0 = time.perf_counter()
    results, tries = [], []

    def best_of(batch: int, probe: bool) -> dict:
        """The fewest steps over the lr factors (McCandlish et al.'s model assumes a tuned lr): the
        factors of --lr-factors, nearest 1 first, then, while the best is the largest (smallest) lr
        tried, twice that (half that) again, up to --lr-extensions times, so that the best lr is
        bracketed. A try stops once it has run more steps than the best so far."""
        best, tried = None, {}

        def attempt(factor: float) -> None:
            nonlocal best
            r = train_to_target(args, data, batch, probe, factor, best["steps"] if best else math.inf)
            shown = "not reached" if r["steps"] is None else f"{r['steps']:.0f} steps"
            print(f"batch {batch:>5} lr {r['lr']:<8.4g}: {shown} ({r['wall_s']:.0f}s)", flush=True)
            tries.append({k: v for k, v in r.items() if k != "noise_epochs"})
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

    probe = best_of(batches[0], probe=True)
    if probe["steps"] is None:
        raise SystemExit(f"noise_scale: the probe at batch {batches[0]} did not reach {args.target} in "
                         f"{args.max_images:g} images; lower --target")
    segments = probe_segments(probe)
    model = steps_model(segments)
    print(f"probe at batch {probe['batch']} (lr {probe['lr']:.4g}): {probe['steps']:.0f} steps to {args.target}, "
          "noise scale per epoch " + ", ".join(f"{s.noise_scale:.0f}" for s in segments)
          + f"; S_min {model.s_min:.0f}, B_crit {model.b_crit:.0f}", flush=True)
    print(per_tensor_lines(probe), flush=True)
    folder = os.path.join(args.out, "probe")
    write_probe_folder(args, probe, folder)
    results.append(probe)
    if args.probe_only:
        print(f"the probe as a run folder: {folder}")
        return
    for batch in batches[1:]:
        r = best_of(batch, probe=False)
        results.append(r)
        shown = "not reached" if r["steps"] is None else f"{r['steps']:.0f} steps at lr {r['lr']:.4g}"
        print(f"batch {batch:>5}: best {shown} (predicted {model.steps(batch):.0f})", flush=True)
        with open(os.path.join(args.out, "results.json"), "w") as fh:
            json.dump(dict(args=vars(args), probe_model=vars(model) | dict(e_min=model.e_min), results=results,
                           tries=tries), fh, indent=1)
    measured = [(r["batch"], r["steps"]) for r in results]
    try:
        measured_knee = knee([b for b, _ in measured], [s for _, s in measured])
    except ValueError:
        measured_knee = None
    try:
        fitted = fit_curve([b for b, s in measured if s], [s for _, s in measured if s])
    except ValueError:
        fitted = None
    text = table(results, model)
    text += (f"\n\nprobe at batch {probe['batch']}: S_min {model.s_min:.0f} steps, "
             f"predicted B_crit {model.b_crit:.0f}; "
             f"measured knee {'none' if measured_knee is None else f'{measured_knee:.0f}'}"
             + ("" if fitted is None else f", fitted B_crit {fitted.b_crit:.0f} (S_min {fitted.s_min:.0f})")
             + (f"; predicted / measured knee {model.b_crit / measured_knee:.2f}" if measured_knee else "")
             + "\n\nthe probe's noise scale tensor by tensor:\n\n" + per_tensor_lines(probe).replace("\n", "\n\n"))
    with open(os.path.join(args.out, "table.md"), "w") as fh:
        fh.write(text + "\n")
    with open(os.path.join(args.out, "results.json"), "w") as fh:
        json.dump(dict(args=vars(args), probe_model=vars(model) | dict(e_min=model.e_min), measured_knee=measured_knee,
                       fitted=None if fitted is None else vars(fitted), results=results, tries=tries), fh, indent=1)
    print()
    print(text)
    png = os.path.join(args.out, "noise_scale.png")
    drawn = plot(results, model, probe, measured_knee, fitted, png)
    if args.docs:
        os.makedirs(args.docs, exist_ok=True)
        with open(os.path.join(args.docs, "noise_scale_table.md"), "w") as fh:
            fh.write(text + "\n")
        if drawn:
            shutil.copyfile(png, os.path.join(args.docs, "noise_scale.png"))
    print(f"\n{time.perf_counter() - t0:.0f}s in all; the probe as a run folder: {folder}")
    print(f"  python -m largebatch.advise {folder} --target-accuracy {args.target} --workers-per-node 8 "
          f"--inter-gbit 100 --plot {os.path.join(args.out, 'advice.png')}")


if __name__ == "__main__":
    sys.exit(main())
