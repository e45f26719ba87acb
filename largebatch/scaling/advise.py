"""Which global batch and how many workers: the measured gradient noise scale joined to the simulator.

    python -m largebatch.advise RUN_DIR [--second-run RUN_DIR2] [--batches LIST] [--workers LIST]
        [--target-accuracy A] [--cost-per-node-hour P] [--plot FILE] [--json FILE] [cluster and workload options]
    python -m largebatch.advise --probe [--second-batch N] [--config FILE] [key=value ...] [the same options]

RUN_DIR is a run trained with ``train.noise_scale=true`` (its ``metrics.jsonl`` epoch lines carry
``noise_scale``); ``--probe`` first trains such a run from ``--config`` and the ``key=value``
overrides (a short run at a small batch: one worker gets accumulation steps for the two batch
sizes the measurement needs) in the config's ``run.dir``, then reads it.

One run gives the critical batch as its noise scale. Two runs to the same target at two global
batches give it from their steps instead (:func:`~largebatch.scaling.steps.two_run_model`), which
on the benchmarks of docs/noise_scale.md came within 1.3x of the measured steps where one run's noise
scale did not: ``--second-run RUN_DIR2`` reads the second (any run, noise scale or not), and
``--probe`` trains it after the first, at ``--second-batch`` (default 8 times the first's; 0: none).
The ratio of the two critical batches is printed as ``adaptive.crit_factor``. The cluster and the
workload are described with the options of ``python -m largebatch.simulate`` (``--preset``,
``--compute-ms``, ``--micro-batch``, ``--gradient-mb``, ``--workers-per-node``, ``--inter-gbit``,
...; see its ``--help``); left out, the compute time per image comes from the run's own
throughput and the gradient size from its ``checkpoints/final.pt``.

The steps come from :mod:`largebatch.scaling.steps`, the time per step, wall time and cost of each
choice from :mod:`largebatch.scaling.choices`; the table marks the fastest and the cheapest choice,
``--plot`` draws the predicted steps and the wall time against the global batch (needs
matplotlib), and :func:`~largebatch.scaling.choices.assumptions` are printed with every answer.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict
from typing import Optional

from largebatch.errors import UsageError, run_cli
from largebatch.scaling.choices import Choice, assumptions, cheapest, choices, default_batches, fastest, recommendable
from largebatch.scaling.cli import (
    Parser,
    check_outputs,
    check_simulator_args,
    default_workers,
    int_list,
    simulator_parser,
)
from largebatch.scaling.model import MIB, mib
from largebatch.scaling.output import describe, duration, format_choices, write_advice_plot, write_json
from largebatch.scaling.resolve import Resolved, resolve
from largebatch.scaling.runs import Measured, SecondRun, read_run, read_second_run, train_probe, train_second_probe
from largebatch.scaling.steps import StepsModel, crit_factor, steps_model, two_run_model

__all__ = ["main", "cli", "build_parser", "second_batch"]

ADVISE_DESCRIPTION = ("Which global batch and how many workers: the measured gradient noise scale joined to the "
                      "simulator.")
"""The first line of python -m largebatch.advise --help."""

NOT_HERE = (("validate", "--validate"), ("variations", "--variations"), ("nodes", "--nodes"),
            ("baseline_workers", "--baseline-workers"), ("accumulation_steps", "--accumulation-steps"))
"""The simulator's options that advise does not take (it picks accumulation steps per batch itself)."""


def build_parser() -> argparse.ArgumentParser:
    """advise's own options on top of the simulator's (cluster and workload), which it shares."""
    p = Parser(prog="python -m largebatch.advise", description=ADVISE_DESCRIPTION,
               parents=[simulator_parser()], conflict_handler="resolve",
               epilog="Cluster and workload: the options of python -m largebatch.simulate, e.g. --preset goyal2017, "
                      "--compute-ms 40 --micro-batch 32, --workers-per-node 8 --inter-gbit 100; left out, the compute "
                      "time comes from the run's images/s and the gradient size from its checkpoints/final.pt.")
    p.add_argument("targets", nargs="*", metavar="RUN_DIR | key=value",
                   help="a run folder; with --probe, config overrides of the probe run")
    p.add_argument("--probe", action="store_true", help="train a probe run first (--config, key=value ...), then a "
                   "second one at --second-batch")
    p.add_argument("--second-run", metavar="RUN_DIR2", help="a second run at another global batch: B_crit from the "
                   "steps both took to the same target, instead of from the noise scale")
    p.add_argument("--second-batch", type=int, metavar="N", help="with --probe: the second probe's global batch "
                   "(default 8 times the first's, 4 or 2 times where the training set is smaller; 0: no second probe, "
                   "B_crit from the noise scale)")
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
        if action.dest in {dest for dest, _ in NOT_HERE}:
            action.help = argparse.SUPPRESS
        elif action.dest == "preset":
            action.help = ("the cluster and workload of a published run (python -m largebatch.simulate --validate "
                           "compares them with the published efficiencies)")
    return p


def _check_args(args: argparse.Namespace) -> None:
    """advise's own options are in range; the --plot and --json folders exist."""
    if args.target_accuracy is not None and not 0 < args.target_accuracy <= 1:
        raise UsageError(f"--target-accuracy {args.target_accuracy:g} is not allowed: use a fraction in (0, 1]")
    price = args.cost_per_node_hour
    if price is not None and not (price >= 0 and math.isfinite(price)):
        raise UsageError(f"--cost-per-node-hour {args.cost_per_node_hour:g} is not allowed: use a price >= 0")
    if args.second_batch is not None and (not args.probe or args.second_batch < 0):
        raise UsageError(f"--second-batch {args.second_batch} is not allowed: " + (
            "it is the second probe's global batch, with --probe; give --second-run RUN_DIR2 for a run already "
            "trained" if not args.probe else "use a global batch above the first probe's, or 0 for none"))
    if args.second_run and args.probe:
        raise UsageError("--second-run reads a run folder, --probe trains both runs: give one of them (--probe with "
                         "--second-batch N)")
    check_outputs(args)


def _run_dir(args: argparse.Namespace) -> str:
    """The run folder to read: the probe's after training it (--probe), else the one given."""
    if args.probe:
        return train_probe(args.config, args.targets)
    if args.config:
        raise UsageError("--config describes a probe run: add --probe, or give a run folder alone")
    if len(args.targets) != 1:
        raise UsageError("give one run folder (trained with train.noise_scale=true), or --probe with its config"
                         + (f"; got {' '.join(args.targets)}" if args.targets else ""))
    return args.targets[0]


def second_batch(first_batch: int, num_train: int, given: Optional[int]) -> int:
    """The second probe's global batch: ``given``, else 8 times the first's, or 4 or 2 times it
    where that is more than the ``num_train`` training images hold."""
    if given:
        return given
    fits = [k * first_batch for k in (8, 4, 2) if k * first_batch <= num_train]
    if not fits:
        raise UsageError(f"the {num_train} training images hold no second probe of at least twice the first's global "
                         f"batch {first_batch}: give a smaller first batch, or --second-batch 0 for one probe")
    return fits[0]


def _second_run(args: argparse.Namespace, measured: Measured) -> Optional[SecondRun]:
    """The second run to the same target: --second-run's, or the second probe trained now (--probe)."""
    if args.probe and args.second_batch != 0:
        batch = second_batch(measured.global_batch, measured.num_train, args.second_batch)
        return read_second_run(train_second_probe(args.config, args.targets, batch, measured), measured)
    return read_second_run(args.second_run, measured) if args.second_run else None


def _models(measured: Measured, second: Optional[SecondRun]) -> tuple[StepsModel, StepsModel, Optional[float]]:
    """(the model the advice uses, the first run's noise-scale model, crit_factor where two runs
    give one): two runs' model where there is a second run."""
    try:
        noise = steps_model(measured.segments)
    except ValueError as exc:
        raise UsageError(f"'{measured.run_dir}': {exc}") from None
    if second is None:
        return noise, noise, None
    first_steps = sum(s.steps for s in measured.segments)
    try:
        two = two_run_model(measured.global_batch, first_steps, second.global_batch, second.steps)
    except ValueError as exc:
        raise UsageError(f"'{measured.run_dir}' and '{second.run_dir}': {exc}") from None
    return two, noise, crit_factor(two, noise)


def _method_lines(model: StepsModel, noise: StepsModel, second: Optional[SecondRun], factor: Optional[float]) -> list:
    """Which method set B_crit, and the crit_factor for the adaptive global batch."""
    if second is None:
        return ["method: one run's noise scale, B_crit = B_simple (S_min-weighted over its epochs); a second run at "
                "a larger global batch (--second-run RUN_DIR2, or --probe's second probe) solves B_crit from the "
                "steps instead"]
    return [f"second run {second.run_dir}: global batch {second.global_batch}; target: {second.target}",
            f"method: two runs: S_min and B_crit solved from the steps of both to the same target (the noise scale "
            f"alone gave B_crit = {noise.b_crit:.0f}, S_min = {noise.s_min:.0f})",
            f"crit_factor = B_crit / the first run's B_simple = {model.b_crit:.4g} / {noise.b_crit:.4g} = {factor:.3g}; "
            f"for the adaptive global batch: adaptive.crit_factor={factor:.3g}"]


def _simulator_inputs(sim: argparse.Namespace, measured: Measured) -> tuple[Resolved, list[str]]:
    """(the cluster and workload the simulator's options in ``sim`` describe, notes on how they were
    found), with the micro-batch, the compute time and the gradient size taken from the run where
    they are not given."""
    for attr, flag in NOT_HERE:
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
        m = measured
        derived.append(f"compute time from the run's {m.images_per_second:,.0f} images/s on {m.world_size} worker(s), "
                       f"which ran micro-batches of {m.micro_batch} x {m.per_worker_batch // m.micro_batch}: "
                       f"{sim.compute_ms:.2f} ms per {sim.micro_batch} images, taken as one micro-batch (the largest; "
                       "--micro-batch B to change), communication and data loading included")
    if sim.gradient_mb is None and not sim.model and not sim.measure and not sim.preset and sim.params is None:
        if measured.gradient_bytes is None:
            raise UsageError(f"'{measured.run_dir}' has no checkpoints/final.pt to size the gradient: give "
                             "--gradient-mb MIB or --model NAME")
        sim.gradient_mb = measured.gradient_bytes / MIB
        derived.append(f"gradient {mib(measured.gradient_bytes)}: the parameters of checkpoints/final.pt x 4 bytes")
    check_simulator_args(sim)
    resolved = resolve(sim)
    return resolved, [n for n in [resolved.note] if n] + derived


def _print_advice(run_dir: str, measured: Measured, model: StepsModel, method: list[str], r: Resolved,
                  notes: list[str], rows: list[Choice], fast: Choice, cheap: Choice, price: Optional[float]) -> None:
    """The measured runs, the model and how it was found, the cluster, the table, the fastest and
    cheapest, the assumptions."""
    print(f"run {run_dir}: global batch {measured.global_batch} on {measured.world_size} worker(s); "
          f"target: {measured.target}")
    print("measured noise scale per epoch (B_simple): "
          + ", ".join(f"{s.noise_scale:.0f}" for s in measured.segments))
    for line in method:
        print(line)
    print(f"model: S(B) = S_min (1 + B_crit/B) with S_min = {model.s_min:.0f} steps, B_crit = {model.b_crit:.0f} "
          f"images, E_min = {model.e_min:,.0f} images")
    print("cluster" + (f" ({r.preset.name})" if r.preset else "") + ":")
    for line in notes + describe(r.cluster, r.workload):
        print("  " + line)
    print()
    print(format_choices(rows, fast, cheap))
    for line in _training_legend(rows, fast, cheap):
        print(line)
    print()
    unit = "" if price is not None else " node-hours"
    for name, c in (("fastest", fast), ("cheapest", cheap)):
        money = f"{c.cost:.3g}" if c.cost is not None else f"{c.node_hours:.3g}"
        print(f"{name}: global batch {c.global_batch} on {c.workers} worker(s) ({c.nodes} node(s)), "
              f"{c.steps:.0f} steps of {c.step_time * 1e3:.1f} ms, {duration(c.wall_s)}, cost {money}{unit}")
    print()
    print("assumptions:")
    for a in assumptions(model.method):
        print(f"  - {a}")


def _training_legend(rows: list[Choice], fast: Choice, cheap: Choice) -> list[str]:
    """What the table's training column means, for the marks it holds."""
    lines = []
    if any(c.refused for c in rows):
        lines.append("training refuses: micro-batches of 1 image through the model's BatchNorm; never picked")
    if any(c.warning and not c.refused for c in rows):
        picked = fast.warning or cheap.warning
        lines.append("training warns: micro-batches too small for fast steps (and for sensible statistics in any "
                     "BatchNorm layer); "
                     + ("picked only because every other choice is refused" if picked else "not picked"))
    return lines


def _write_files(args: argparse.Namespace, run_dir: str, measured: Measured, models: tuple, r: Resolved,
                 rows: list[Choice], fast: Choice, cheap: Choice, price: Optional[float]) -> None:
    """--plot and --json; ``models``: what :func:`_models` gave, and the second run."""
    model, noise, factor, second = models
    if args.plot:
        write_advice_plot(args.plot, model, rows, fast, cheap, title=f"advice from {run_dir}")
        print(f"\nwrote {args.plot}")
    if args.json:
        payload = dict(run_dir=run_dir, target=measured.target, segments=[asdict(s) for s in measured.segments],
                       model=dict(asdict(model), e_min=model.e_min), method=model.method,
                       second_run=None if second is None else asdict(second),
                       noise_model=dict(asdict(noise), e_min=noise.e_min), crit_factor=factor,
                       cluster=asdict(r.cluster), workload=asdict(r.workload), price=price,
                       choices=[asdict(c) for c in rows], fastest=asdict(fast), cheapest=asdict(cheap),
                       assumptions=list(assumptions(model.method)))
        write_json(args.json, payload)
        print(f"wrote {args.json}")


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m largebatch.advise``; 0 once the advice is printed."""
    args = build_parser().parse_args(argv)
    _check_args(args)
    run_dir = _run_dir(args)
    measured = read_run(run_dir, args.target_accuracy)
    second = _second_run(args, measured)
    r, notes = _simulator_inputs(args, measured)
    model, noise, factor = _models(measured, second)
    rule = "use integers >= 1"
    batches = int_list("--batches", args.batches, example="256,1024", rule=rule) if args.batches \
        else default_batches(model, measured.num_train)
    workers = int_list("--workers", args.workers, example="256,1024", rule=rule) if args.workers \
        else default_workers(r.cluster.workers_per_node, smallest=1, whole_nodes_instead=False)
    price = args.cost_per_node_hour if args.cost_per_node_hour is not None else measured.cost_per_node_hour
    batchnorm = measured.has_batchnorm is not False
    if measured.has_batchnorm is None:
        notes.append("BatchNorm assumed in the model (no checkpoints/final.pt to tell): micro-batches of 1 image "
                     "are marked as training refuses them")
    rows = choices(model, r.cluster, r.workload, workers, batches, price, batchnorm)
    if not rows:
        raise UsageError(f"no worker count of {workers} divides a global batch of {batches} and fills whole nodes of "
                         f"{r.cluster.workers_per_node}; give other --workers or --batches")
    picks = recommendable(rows)
    if not picks:
        raise UsageError(f"every choice of {batches} on {workers} worker(s) gives micro-batches of 1 image, which "
                         "training refuses for a model with BatchNorm; give larger --batches or fewer --workers")
    fast, cheap = fastest(picks), cheapest(picks)
    _print_advice(run_dir, measured, model, _method_lines(model, noise, second, factor), r, notes, rows, fast, cheap,
                  price)
    _write_files(args, run_dir, measured, (model, noise, factor, second), r, rows, fast, cheap, price)
    return 0


def cli() -> None:
    """Console-script entry point."""
    run_cli(main)
