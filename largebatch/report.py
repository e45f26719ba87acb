"""Plots and a summary table for one or more runs.

    python -m largebatch.report RUN_DIR [RUN_DIR ...] [--out DIR]

Reads each run's ``metrics.jsonl`` and ``config.yaml`` and writes to ``--out`` (default
``report/``):

- ``accuracy.png``   validation accuracy against epochs and against wall time
- ``loss.png``       training loss against epochs and against wall time
- ``lr.png``         the learning-rate schedule, step by step (rebuilt from the config; for a run
  with adaptive.enabled=true, the lr its metrics record)
- ``throughput.png`` training images per second, epoch by epoch
- ``noise_scale.png`` the gradient noise scale B_simple, epoch by epoch (runs with train.noise_scale=true)
- ``adaptive_batch.png`` the global batch, the learning rate and the noise scales B_simple and B_crit
  step by step, from the batch decisions of runs with adaptive.enabled=true
- ``summary.md``     final and best accuracy, time to target, images/s, cost, world size, global batch

Each run is labelled by its folder name and the settings that differ between the runs given and
change what a run computes or how fast (e.g. optimizer, global batch, comm.shard; not logging,
paths, checkpoint cadence, timeouts, bucket sizes or loader processes, nor model settings the run's
model ignores, such as model.norm for a model passed in). Legends sit to the right of the plots. A
folder given twice is reported once; a run without epoch records (one that stopped before its first
epoch ended) is named and left out of the plots, and when no run has any the report stops with
exit status 2. Needs matplotlib: ``pip install 'largebatch[report]'``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from dataclasses import dataclass, field

import yaml

from largebatch.errors import UsageError, run_cli
from largebatch.fileio import write_bytes_atomic


@dataclass
class Run:
    path: str
    config: dict
    epochs: list[dict]
    steps: list[dict] = field(default_factory=list)
    summary: dict | None = None
    label: str = ""
    batches: list[dict] = field(default_factory=list)
    """The adaptive batch's decisions ("batch" events), in the order written."""


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics.jsonl file; a line that is not JSON is named in a UsageError."""
    lines = []
    with open(path) as fh:
        for n, text in enumerate(fh, 1):
            if text.strip():
                try:
                    lines.append(json.loads(text))
                except json.JSONDecodeError:
                    raise UsageError(f"{path} line {n} is not JSON; the file is damaged") from None
    return lines


def load_run(path: str) -> Run:
    metrics, config = os.path.join(path, "metrics.jsonl"), os.path.join(path, "config.yaml")
    for f in (metrics, config):
        if not os.path.isfile(f):
            raise UsageError(f"'{path}' is not a run folder: {os.path.basename(f)} is missing")
    lines = read_metrics(metrics)
    with open(config) as fh:
        cfg = yaml.safe_load(fh) or {}
    summaries = [x for x in lines if x.get("event") == "summary"]
    return Run(path=path, config=cfg, epochs=[x for x in lines if x.get("event") == "epoch"],
               steps=[x for x in lines if x.get("event") == "step"], summary=summaries[-1] if summaries else None,
               batches=[x for x in lines if x.get("event") == "batch"])


def _flatten(cfg: dict) -> dict:
    return {f"{s}.{k}": v for s, body in cfg.items() if isinstance(body, dict) for k, v in body.items()}


SHOWN_THOUGH_SAFE = frozenset({
    "train.epochs", "train.max_micro_batch", "train.stop_at_target", "train.device", "train.channels_last",
    "train.compile", "comm.backend", "train.precise_bn_images", "comm.shard", "train.noise_scale",
    "data.device_cache",
})
"""Keys a resumed run may change (largebatch.config.SAFE_TO_CHANGE) that still change the results or the speed."""


def label_keys_left_out() -> frozenset:
    """Keys never shown in labels: those a resumed run may change (logging, paths, checkpoint
    cadence, timeouts, bucket sizes, loader processes, ...) unless they change results or speed."""
    from largebatch.config.compare import SAFE_TO_CHANGE

    return frozenset(SAFE_TO_CHANGE - SHOWN_THOUGH_SAFE)


def _used(flat: dict) -> dict:
    """A run's flat config without the keys it does not use: the model keys its model ignores; the
    adaptive.* settings but adaptive.enabled of a run without it; train.phases of a run with it, and
    train.global_batch too where adaptive.min_batch sets the starting batch."""
    from largebatch.config.compare import ignored_model_keys

    ignored = set(ignored_model_keys(str(flat.get("model.name", "")))[0])
    if flat.get("adaptive.enabled"):
        ignored.add("train.phases")
        if flat.get("adaptive.min_batch") is not None:
            ignored.add("train.global_batch")
    else:
        ignored.update(k for k in flat if k.startswith("adaptive.") and k != "adaptive.enabled")
    return {k: v for k, v in flat.items() if k not in ignored}


def _short(key: str, keys) -> str:
    """'optim.base_lr' -> 'base_lr'; '<section>.name' -> '<section>' ('optim'), as is
    '<section>.enabled' ('adaptive'); a name two sections share keeps its section ('model.options')."""
    section, name = key.split(".", 1)
    if name in ("name", "enabled"):
        return section
    return key if sum(k.split(".", 1)[1] == name for k in keys) > 1 else name


def _value(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, dict)):
        return yaml.safe_dump(v, default_flow_style=True, sort_keys=False, width=10**6).strip().replace(", ", ",")
    return str(v)


def _folder_names(paths: list[str]) -> list[str]:
    """Each run's folder name, with as many parent folders as it takes to tell them apart."""
    parts = [os.path.abspath(p).strip(os.sep).split(os.sep) for p in paths]
    depth = 1
    while depth < max(len(p) for p in parts):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
        depth += 1
    return ["/".join(p[-depth:]) for p in parts]


def label_runs(runs: list[Run]) -> None:
    """Label each run ``folder: key=value ...`` with the settings that differ between the runs and
    matter (see :func:`label_keys_left_out`)."""
    from largebatch.config import valid_keys

    flat = [_used(_flatten(r.config)) for r in runs]
    order = {k: i for i, k in enumerate(valid_keys())}  # the config's own order: run, data, model, train, ...
    keys = sorted({k for f in flat for k in f}, key=lambda k: (order.get(k, len(order)), k))
    left_out = label_keys_left_out()
    # a key differs where two runs that use it set it differently (model.norm: between zoo models)
    differing = [k for k in keys if k not in left_out and len({repr(f[k]) for f in flat if k in f}) > 1]
    for r, name, f in zip(runs, _folder_names([r.path for r in runs]), flat):
        parts = [f"{_short(k, keys)}={_value(f[k])}" for k in differing if k in f]
        r.label = f"{name}: {' '.join(parts)}" if parts else name


def lr_curve(run: Run) -> tuple[list[int], list[float]]:
    """The schedule, step by step, rebuilt from the config and the steps per epoch in the metrics
    (per phase, for train.phases); for a run with adaptive.enabled, whose lr follows the batch it
    chose, the lr its metrics record (:func:`recorded_lr`)."""
    from largebatch.config import from_flat
    from largebatch.optim.schedule import build_phased_schedule, build_schedule

    if (run.config.get("adaptive") or {}).get("enabled"):
        return recorded_lr(run)
    if not run.epochs:
        return [], []
    cfg = from_flat(_flatten(run.config))
    phases = _phase_steps(run, cfg)
    if cfg.train.phases:
        sched = build_phased_schedule(cfg.optim, cfg.schedule, phases)
    else:
        sched = build_schedule(cfg.optim, cfg.schedule, cfg.train.global_batch, phases[0][1], cfg.train.epochs)
    xs = list(range(run.epochs[-1]["step"]))
    return xs, [sched(s) for s in xs]


def _phase_steps(run: Run, cfg) -> list[tuple[int, int, int]]:
    """(epochs, steps per epoch, global batch) per phase, the steps per epoch read from the epoch
    lines. A phase the run did not reach gets the images per epoch of the last one it did (which
    can differ by the remainder a global batch leaves)."""
    steps_at = {0: 0, **{e["epoch"]: e["step"] for e in run.epochs}}
    out, epoch, images = [], 0, None
    for spec in cfg.train.phases or [dict(epochs=cfg.train.epochs)]:
        batch = spec.get("global_batch") or cfg.train.global_batch
        if epoch + 1 in steps_at and epoch in steps_at:
            spe = steps_at[epoch + 1] - steps_at[epoch]
            images = spe * batch
        else:
            spe = max(1, images // batch)
        out.append((spec["epochs"], spe, batch))
        epoch += spec["epochs"]
    return out


def last_step(run: Run) -> int:
    """The optimizer steps the run's metrics account for (its summary's, or its last record's)."""
    steps = [x["step"] for x in (*run.epochs, *run.steps, *run.batches) if x.get("step") is not None]
    if run.summary and run.summary.get("steps") is not None:
        steps.append(run.summary["steps"])
    return max(steps, default=0)


def batch_curve(run: Run) -> tuple[list[int], list[int]]:
    """The global batch over optimizer steps, as a step plot drawn with ``where="post"`` reads it:
    the starting batch (the first decision's ``previous``) from step 0, each decision's batch from
    the step it was taken at, and the last one again at the run's last step. Empty without decisions."""
    if not run.batches:
        return [], []
    xs, ys = [0], [run.batches[0]["previous"]]
    for b in run.batches:
        xs.append(b["step"])
        ys.append(b["global_batch"])
    end = last_step(run)
    if end > xs[-1]:
        xs.append(end)
        ys.append(ys[-1])
    return xs, ys


def recorded_lr(run: Run) -> tuple[list[int], list[float]]:
    """The lr the run's step, epoch and batch lines record, in step order. A batch line's lr is the
    one its decision sets, so at a step a batch line follows the step or epoch line ending there."""
    records = [(x["step"], x.get("event") == "batch", n, x["lr"])
               for n, x in enumerate((*run.steps, *run.epochs, *run.batches)) if x.get("lr") is not None]
    records.sort(key=lambda r: r[:3])
    return [r[0] for r in records], [r[3] for r in records]


def noise_curves(run: Run) -> dict[str, tuple[list[int], list[float]]]:
    """B_simple (``noise_scale``) and B_crit (``b_crit``) over optimizer steps, as the run's batch
    decisions measured them (a decision before the first estimate records null: left out)."""
    out = {}
    for key in ("noise_scale", "b_crit"):
        pts = [(b["step"], b[key]) for b in run.batches if b.get(key) is not None]
        out[key] = ([p[0] for p in pts], [p[1] for p in pts])
    return out


def summary_table(runs: list[Run]) -> str:
    def pct(v):
        return "—" if v is None else f"{100 * v:.2f}%"

    def num(v, fmt):
        return "—" if v is None else format(v, fmt)

    head = ("| run | final acc | best acc | top-5 | time to target | epoch at target | images/s | cost | "
            "world size | global batch | wall time | noise scale |")
    rows = [head, "|" + " --- |" * 12]
    for r in runs:
        s = r.summary or {}
        target = s.get("time_to_target_s")
        rows.append("| " + " | ".join([
            r.label, pct(s.get("val_acc")), pct(s.get("best_val_acc")), pct(s.get("val_acc_top5")),
            "—" if target is None else f"{target:.1f} s", num(s.get("epoch_to_target"), "d"),
            num(s.get("samples_per_sec"), ",.0f"), num(s.get("cost"), ".2f"), num(s.get("world_size"), "d"),
            num(s.get("global_batch"), "d"), "—" if s.get("elapsed_s") is None else f"{s['elapsed_s']:.1f} s",
            num(s.get("noise_scale"), ",.0f"),
        ]) + " |")
    return "\n".join(rows)


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UsageError("largebatch.report draws with matplotlib; pip install 'largebatch[report]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plain_number(x: float) -> str:
    """A tick value as people write it: 90, 1,000, 0.02 (not 9x10^1)."""
    if x >= 1:
        return f"{x:,.0f}" if x == round(x) else f"{x:,.3g}"
    import numpy as np

    return np.format_float_positional(x, precision=3, unique=True, fractional=False, trim="-")


def _plain_log_ticks(ax) -> None:
    """Label a log y axis with plain numbers; matplotlib still chooses which ticks carry a label."""
    from matplotlib.ticker import LogFormatter

    class PlainLogFormatter(LogFormatter):
        def __call__(self, x, pos=None):
            return _plain_number(x) if super().__call__(x, pos) else ""

    ax.yaxis.set_major_formatter(PlainLogFormatter(base=10.0))
    ax.yaxis.set_minor_formatter(PlainLogFormatter(base=10.0, labelOnlyBase=False))


def _legend_outside(fig, ax, entries_from=None) -> None:
    """One legend for the figure, to the right of ``ax`` (the rightmost axes), outside the plots,
    listing the lines of ``entries_from`` (default: ``ax``)."""
    handles, labels = (entries_from or ax).get_legend_handles_labels()
    if handles:
        ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8,
                  frameon=False)


def figures(runs: list[Run]) -> dict:
    """The report's figures by file name, not yet saved."""
    plt = _pyplot()
    legend_in = min(8.0, 0.6 + 0.065 * max((len(r.label) for r in runs), default=0))  # inches for the legend
    out = {"accuracy.png": _by_epoch_and_time(plt, runs, legend_in, "val_acc", "validation accuracy", False),
           "loss.png": _by_epoch_and_time(plt, runs, legend_in, "train_loss", "training loss", True),
           "lr.png": _lr_figure(plt, runs, legend_in), "throughput.png": _throughput_figure(plt, runs, legend_in)}
    noisy = [r for r in runs if any(e.get("noise_scale") is not None for e in r.epochs)]
    if noisy:
        out["noise_scale.png"] = _noise_figure(plt, noisy, legend_in)
    adaptive = [r for r in runs if r.batches]
    if adaptive:
        out["adaptive_batch.png"] = _adaptive_figure(plt, adaptive, legend_in)
    for fig in out.values():
        fig.tight_layout()
    return out


def _by_epoch_and_time(plt, runs: list[Run], legend_in: float, key: str, title: str, logy: bool):
    fig, axes = plt.subplots(1, 2, figsize=(11 + legend_in, 4.2))
    for r in runs:
        ys = [e[key] for e in r.epochs]
        axes[0].plot([e["epoch"] for e in r.epochs], ys, marker=".", label=r.label)
        axes[1].plot([e["elapsed_s"] for e in r.epochs], ys, marker=".", label=r.label)
    for ax, xlabel in zip(axes, ("epoch", "wall time (s)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
        if logy:
            ax.set_yscale("log")
            _plain_log_ticks(ax)
    _legend_outside(fig, axes[1])
    fig.suptitle(title)
    return fig


def _lr_figure(plt, runs: list[Run], legend_in: float):
    fig, ax = plt.subplots(figsize=(7 + legend_in, 4.2))
    for r in runs:
        xs, ys = lr_curve(r)
        ax.plot(xs, ys, label=r.label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.set_title("learning-rate schedule")
    ax.grid(alpha=0.3)
    _legend_outside(fig, ax)
    return fig


def _throughput_figure(plt, runs: list[Run], legend_in: float):
    fig, ax = plt.subplots(figsize=(7 + legend_in, 4.2))
    for r in runs:
        ax.plot([e["epoch"] for e in r.epochs], [e["samples_per_sec"] for e in r.epochs], marker=".", label=r.label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("training images / s")
    ax.set_title("throughput")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    _legend_outside(fig, ax)
    return fig


def _noise_figure(plt, noisy: list[Run], legend_in: float):
    fig, axes = plt.subplots(1, 2, figsize=(11 + legend_in, 4.2))
    for r in noisy:
        pts = [e for e in r.epochs if e.get("noise_scale") is not None]
        axes[0].plot([e["epoch"] for e in pts], [e["noise_scale"] for e in pts], marker=".", label=r.label)
        axes[1].plot([e["step"] for e in pts], [e["noise_scale"] for e in pts], marker=".", label=r.label)
    for ax, xlabel in zip(axes, ("epoch", "optimizer step")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("noise scale B_simple (images)")
        ax.set_yscale("log")
        _plain_log_ticks(ax)
        ax.grid(alpha=0.3)
    _legend_outside(fig, axes[1])
    fig.suptitle("gradient noise scale")
    return fig


def _adaptive_figure(plt, runs: list[Run], legend_in: float):
    """The global batch (log2 axis, ticked at the batches used), the lr and the noise scales, step
    by step; a run keeps its colour in the three plots."""
    fig, axes = plt.subplots(1, 3, figsize=(15 + legend_in, 4.2))
    batches = set()
    for r in runs:
        xs, ys = batch_curve(r)
        batches.update(ys)
        (line,) = axes[0].step(xs, ys, where="post", label=r.label)
        colour = line.get_color()
        axes[1].plot(*recorded_lr(r), color=colour, label=r.label)
        curves = noise_curves(r)
        axes[2].plot(*curves["noise_scale"], color=colour, marker=".", label=r.label)
        axes[2].plot(*curves["b_crit"], color=colour, marker="x", markersize=4, linestyle="--",
                     label="_B_crit")  # a label starting with '_' stays out of the legend
    _batch_axis(axes[0], sorted(batches))
    axes[1].set_ylabel("learning rate")
    axes[1].set_title("learning rate")
    axes[2].set_ylabel("noise scale (images)")
    axes[2].set_title("B_simple (•, solid) and B_crit (×, dashed)")
    if any(line.get_ydata().size for line in axes[2].get_lines()):
        axes[2].set_yscale("log")
        _plain_log_ticks(axes[2])
    for ax in axes:
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    _legend_outside(fig, axes[2], entries_from=axes[0])
    fig.suptitle("adaptive global batch")
    return fig


def _batch_axis(ax, batches: list[int]) -> None:
    from matplotlib.ticker import FixedLocator, NullLocator

    ax.set_yscale("log", base=2)
    ax.yaxis.set_major_locator(FixedLocator(batches))
    ax.yaxis.set_major_formatter(lambda x, pos: _plain_number(x))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.set_ylabel("global batch (images)")
    ax.set_title("global batch")


def plot_runs(runs: list[Run], out: str) -> list[str]:
    plt = _pyplot()
    written = []
    for name, fig in figures(runs).items():
        path, image = os.path.join(out, name), io.BytesIO()
        fig.savefig(image, format="png", dpi=110, bbox_inches="tight")  # the image grows to hold the legend
        plt.close(fig)
        write_bytes_atomic(image.getvalue(), path)
        written.append(path)
    return written


def distinct_folders(paths: list[str]) -> list[str]:
    """``paths`` with a folder given again (by the same or another path) left out, in order; a
    warning names each one left out."""
    seen: dict[str, str] = {}
    for p in paths:
        real = os.path.realpath(p)
        if real in seen:
            same = "" if p == seen[real] else f" (as {seen[real]})"
            print(f"largebatch: warning: {p} was given more than once{same}; it is reported once", file=sys.stderr)
        else:
            seen[real] = p
    return list(seen.values())


def runs_to_plot(runs: list[Run]) -> list[Run]:
    """The runs with epoch records; a warning names each run without any (its plots would be
    empty), and a UsageError says so when no run has any."""
    empty = [r for r in runs if not r.epochs]
    if len(empty) == len(runs):
        raise UsageError(f"nothing to plot: no epoch records in the metrics.jsonl of {', '.join(r.path for r in empty)} "
                         "(a run that stops or crashes before its first epoch ends has none); report runs that "
                         "trained at least one epoch")
    for r in empty:
        print(f"largebatch: warning: {r.path} has no epoch records in its metrics.jsonl (it stopped or crashed before "
              "its first epoch ended); it is left out of the plots", file=sys.stderr)
    return [r for r in runs if r.epochs]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m largebatch.report", description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", metavar="RUN_DIR")
    ap.add_argument("--out", default="report", help="folder for the plots and summary.md (default: report)")
    args = ap.parse_args(argv)
    runs = [load_run(p) for p in distinct_folders(args.runs)]
    label_runs(runs)
    plotted = runs_to_plot(runs)
    os.makedirs(args.out, exist_ok=True)
    files = plot_runs(plotted, args.out)
    table = summary_table(runs)
    write_bytes_atomic((table + "\n").encode(), os.path.join(args.out, "summary.md"))
    print(table)
    print("\nwrote " + ", ".join(files + [os.path.join(args.out, "summary.md")]))
    return 0


def cli() -> None:
    """Console-script entry point."""
    run_cli(main)


if __name__ == "__main__":
    cli()
