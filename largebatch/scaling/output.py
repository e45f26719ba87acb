"""What the simulator and the advice print and write: the inputs in the units people quote, the
prediction, validation and advice tables, the memory block, the plots (matplotlib) and JSON.
"""

from __future__ import annotations

import json
import math
import os
from typing import Sequence

from largebatch.errors import UsageError
from largebatch.fileio import write_bytes_atomic
from largebatch.footprint import Footprint, state_per_parameter, table
from largebatch.scaling.choices import Choice
from largebatch.scaling.model import GBIT, MIB, Cluster, ModelSize, StepPrediction, Workload, mib
from largebatch.scaling.predict import predict_preset, vary
from largebatch.scaling.presets import Preset
from largebatch.scaling.steps import StepsModel

__all__ = ["MATPLOTLIB_MISSING", "algorithm_name", "describe", "format_table", "format_validation",
           "format_variations", "memory_lines", "duration", "format_choices", "write_plot", "write_advice_plot",
           "write_json"]

MATPLOTLIB_MISSING = "--plot draws with matplotlib, which is not installed: pip install 'largebatch[report]'"
"""The error when --plot is given without matplotlib."""


# -- text --------------------------------------------------------------------------------------------

def algorithm_name(cluster: Cluster) -> str:
    if cluster.algorithm == "hierarchical":
        return f"hierarchical/{cluster.inter_algorithm}"
    return cluster.algorithm


def describe(cluster: Cluster, workload: Workload, baseline_workers: int = 1) -> list[str]:
    """The inputs of a prediction, one per line, in the units people quote."""
    w = workload
    lines = [
        f"compute          {w.compute_time * 1e3:.1f} ms forward+backward per micro-batch of {w.micro_batch}"
        + (f", {w.accumulation_steps} micro-batches per step" if w.accumulation_steps > 1 else "")
        + f"; backward {w.backward_fraction:.0%}",
        f"gradient         {mib(w.gradient_bytes)} in "
        + (f"buckets of {w.bucket_bytes / MIB:.2f} MiB" if w.fusion == "fixed"
           else f"greedy fusion up to {w.bucket_bytes / MIB:.2f} MiB every {w.cycle_time * 1e3:g} ms"),
        f"workers per node {cluster.workers_per_node}",
        f"intra-node       {cluster.intra_bandwidth / 1e9:.2f} GB/s, {cluster.intra_latency * 1e6:g} us per message",
        f"inter-node       {cluster.inter_bandwidth / 1e9:.2f} GB/s per node ({cluster.inter_bandwidth / GBIT:g} Gbit/s), "
        f"{cluster.inter_latency * 1e6:g} us per message",
        f"allreduce        {algorithm_name(cluster)}",
    ]
    if w.shard == "optimizer":
        lines.append(f"sharding         optimizer (ZeRO-1): the allreduce, then an allgather of "
                     f"{mib(w.parameter_bytes)} of updated parameters")
    elif w.shard == "full":
        lines += [f"sharding         full (ZeRO-3), in blocks of {w.bucket_bytes / MIB:.2f} MiB of gradient: "
                  f"{mib(w.parameter_bytes)} of parameters",
                  f"                 all-gathered in forward and again in backward, {mib(w.gradient_bytes)} "
                  "of gradient reduce-scattered"]
    if w.update_time:
        per = " (each worker 1/p of it)" if w.shard != "none" else ""
        lines.append(f"update           {w.update_time * 1e3:.1f} ms per step after the allreduce{per}")
    if baseline_workers != 1:
        lines.append(f"efficiency       against {baseline_workers} workers")
    return lines


def format_table(rows: Sequence[StepPrediction], mark: int | None = None,
                 memory: dict[int, float] | None = None, collectives: bool = False) -> str:
    """The prediction table; the row of ``mark`` workers gets a '*'. ``memory``: bytes per worker
    by worker count, as a last column; ``collectives``: call the count column that (sharded runs
    gather and reduce-scatter besides allreducing)."""
    count = "collectives" if collectives else "allreduces"
    width = len(count)
    header = (f"{'workers':>8} {'nodes':>6} {'step ms':>9} {'compute ms':>11} {'comm ms':>9} {'exposed ms':>11} "
              f"{count:>{width}} {'images/s':>11} {'efficiency':>11}") + (f" {'GiB/worker':>11}" if memory else "")
    lines = [header]
    for r in rows:
        star = "*" if r.workers == mark else " "
        lines.append(f"{r.workers:>7}{star} {r.nodes:>6} {r.step_time * 1e3:>9.1f} {r.compute_time * 1e3:>11.1f} "
                     f"{r.comm_time * 1e3:>9.1f} {r.exposed_comm * 1e3:>11.1f} {r.allreduces:>{width}} "
                     f"{r.throughput:>11.0f} {r.efficiency:>10.1%}"
                     + (f" {memory[r.workers] / 2 ** 30:>11.2f}" if memory else ""))
    return "\n".join(lines)


def format_validation(rows: Sequence[tuple[Preset, StepPrediction]]) -> str:
    """The published runs: predicted and published efficiency, and the difference in points."""
    lines = [f"{'run':<12} {'workers':>7} {'allreduce':<30} {'predicted':>9} {'published':>9} {'difference':>11}"]
    for preset, pred in rows:
        diff = (pred.efficiency - preset.published_efficiency) * 100
        lines.append(f"{preset.name:<12} {preset.workers:>7} {algorithm_name(preset.cluster):<30} "
                     f"{pred.efficiency:>9.1%} {preset.published_efficiency:>9.1%} {diff:>+7.1f} pts")
    return "\n".join(lines)


def format_variations(preset: Preset) -> str:
    """How far the prediction of ``preset`` moves with each of its variations."""
    base = predict_preset(preset).efficiency
    lines = [f"{preset.name}: predicted {base:.1%} with the inputs above, published {preset.published_efficiency:.1%}"]
    for v in preset.variations:
        outs = "   ".join(f"{label}: {predict_preset(vary(preset, v, value)).efficiency:.1%}" for label, value in v.values)
        lines.append(f"  {v.label:<24} {outs}")
    return "\n".join(lines)



def memory_lines(size: ModelSize, workers: int, optimizer: str, shard: str, rows: dict[str, Footprint]) -> list[str]:
    """The memory-per-worker block: what it counts, then a row per comm.shard mode."""
    copies, scalars = state_per_parameter(optimizer, 0.9)
    state = f"{copies} fp32 cop{'y' if copies == 1 else 'ies'} per parameter" + (
        " and a step count per tensor" if scalars else "")
    split = "tensors split by rows (ZeRO-1: whole tensors)" if size.shapes is not None else \
        "split evenly (tensor shapes not known)"
    return [f"memory per worker at {workers} workers, fp32, without activations ({shard} marked *):",
            f"  {size.parameters:,} parameters ({size.source}), {split}",
            f"  {optimizer} (momentum 0.9): {state}", *table(rows, mark=shard)]


def duration(seconds: float) -> str:
    """Seconds as people read a wall time: 42.0s, 12.5m, 3.1h."""
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


def format_choices(rows: Sequence[Choice], fast: Choice, cheap: Choice) -> str:
    """The advice table: a row per (global batch, workers), the fastest and the cheapest marked."""
    priced = any(r.cost is not None for r in rows)
    head = (f"{'global batch':>12} {'workers':>7} {'nodes':>5} {'per worker':>10} {'micro x accum':>13} "
            f"{'steps':>8} {'step ms':>9} {'wall':>8} {'node-hours':>10}" + (f" {'cost':>9}" if priced else "")
            + f" {'training':>8}  ")
    lines = [head]
    for r in rows:
        mark = ", ".join(m for m, c in (("fastest", fast), ("cheapest", cheap)) if r is c)
        said = "refuses" if r.refused else "warns" if r.warning else "ok"
        lines.append(f"{r.global_batch:>12} {r.workers:>7} {r.nodes:>5} {r.per_worker_batch:>10} "
                     f"{f'{r.micro_batch} x {r.accum_steps}':>13} {r.steps:>8.0f} {r.step_time * 1e3:>9.1f} "
                     f"{duration(r.wall_s):>8} {r.node_hours:>10.3g}"
                     + (f" {r.cost:>9.3g}" if priced else "") + f" {said:>8}" + (f"  <- {mark}" if mark else ""))
    return "\n".join(lines)


# -- files -------------------------------------------------------------------------------------------

def _pyplot():
    """(matplotlib, matplotlib.pyplot) drawing off screen; a UsageError without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        raise UsageError(MATPLOTLIB_MISSING) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401  (matplotlib.ticker.ScalarFormatter below)

    return matplotlib, plt


def _save(plt, fig, path: str, **savefig) -> None:
    """``fig`` as a PNG at ``path``, written atomically, and closed."""
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.tmp.png")
    try:
        fig.savefig(tmp, **savefig)
        os.replace(tmp, path)
    except OSError as exc:
        raise UsageError(f"--plot {path}: cannot write it ({exc.strerror or exc})") from None
    finally:
        plt.close(fig)


def write_plot(path: str, series: Sequence[tuple[str, Sequence[StepPrediction]]],
               published: Sequence[tuple[str, int, float]] = ()) -> None:
    """Efficiency against workers (log scale), one line per series, published figures as points."""
    matplotlib, plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    colors = {}
    for label, rows in series:
        (line,) = ax.plot([r.workers for r in rows], [100 * r.efficiency for r in rows], marker=".", label=label)
        colors[label] = line.get_color()
    for label, workers, eff in published:
        ax.scatter([workers], [100 * eff], marker="*", s=140, zorder=3, color=colors.get(label, "black"),
                   edgecolors="black", linewidths=0.5, label=f"{label}: published")
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("workers")
    ax.set_ylabel("scaling efficiency (%)")
    ax.set_ylim(0, 105)
    ax.set_title("predicted scaling efficiency")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(plt, fig, path, dpi=120)


def _draw_steps(ax, model: StepsModel, batches: Sequence[int]) -> None:
    """Predicted steps against the global batch, S_min, B_crit and the measured run."""
    xs = [batches[0] * 2 ** (i / 8) for i in range(int(8 * math.log2(batches[-1] / batches[0])) + 1)] or batches
    ax.plot(xs, [model.steps(b) for b in xs], label="predicted S(B) = S_min(1 + B_crit/B)")
    ax.axhline(model.s_min, color="gray", ls=":", lw=1, label=f"S_min = {model.s_min:.0f}")
    ax.axvline(model.b_crit, color="gray", ls="--", lw=1, label=f"B_crit = {model.b_crit:.0f}")
    ax.scatter([model.measured_batch], [model.measured_steps], color="black", zorder=3, label="measured run")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("global batch")
    ax.set_ylabel("steps to the target")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _draw_wall_time(ax, rows: Sequence[Choice], fast: Choice, cheap: Choice) -> None:
    """Wall time against the global batch, a line per worker count, the fastest and the cheapest marked."""
    for n in sorted({r.workers for r in rows}):
        mine = sorted((r for r in rows if r.workers == n), key=lambda r: r.global_batch)
        ax.plot([r.global_batch for r in mine], [r.wall_s for r in mine], marker=".", lw=1,
                label=f"{n} worker{'s' if n > 1 else ''}")
    ax.scatter([fast.global_batch], [fast.wall_s], marker="*", s=220, color="gold", edgecolors="black", zorder=4,
               label=f"fastest: {fast.workers} workers, batch {fast.global_batch}")
    ax.scatter([cheap.global_batch], [cheap.wall_s], marker="D", s=90, color="limegreen", edgecolors="black",
               zorder=4, label=f"cheapest: {cheap.workers} workers, batch {cheap.global_batch}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")


def write_advice_plot(path: str, model: StepsModel, rows: Sequence[Choice], fast: Choice, cheap: Choice,
                      title: str = "") -> None:
    """Left: predicted steps against the global batch, with the measured run; right: wall time against
    the global batch for each worker count, the fastest and the cheapest marked."""
    matplotlib, plt = _pyplot()
    batches = sorted({r.global_batch for r in rows})
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
    _draw_steps(left, model, batches)
    _draw_wall_time(right, rows, fast, cheap)
    for ax in (left, right):
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    right.set_xlabel("global batch")
    right.set_ylabel("predicted wall time (s)")
    right.grid(alpha=0.3)
    right.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    _save(plt, fig, path, dpi=110, bbox_inches="tight")


def write_json(path: str, payload: dict) -> None:
    """``payload`` as indented JSON at ``path``, written atomically (--json of simulate and advise)."""
    try:
        write_bytes_atomic((json.dumps(payload, indent=2) + "\n").encode(), path)
    except OSError as exc:
        raise UsageError(f"--json {path}: cannot write it ({exc.strerror or exc})") from None
