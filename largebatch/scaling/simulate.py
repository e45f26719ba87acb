"""``python -m largebatch.simulate``: predict step time, throughput and scaling efficiency of
synchronous data-parallel training, on a cluster given by its options or a published run's.

    python -m largebatch.simulate --model resnet50 --compute-ms 140 --micro-batch 32 \\
        --workers-per-node 8 --intra-gbit 160 --inter-gbit 37.5 --algorithm hierarchical
    python -m largebatch.simulate --preset goyal2017 --plot eff.png --json eff.json
    python -m largebatch.simulate --validate
    python -m largebatch.simulate --params 11e9 --shard full --compute-ms 2112 --workers-per-node 4 --nodes 16

The model is described in :mod:`largebatch.scaling.costs` (one collective) and
:mod:`largebatch.scaling.predict` (overlap, sharding, efficiency).
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from typing import Optional

from largebatch.errors import UsageError, run_cli
from largebatch.footprint import Footprint
from largebatch.scaling.cli import DEFAULT_WORKERS, check_simulator_args, default_workers, int_list, simulator_parser
from largebatch.scaling.model import StepPrediction
from largebatch.scaling.output import (
    describe,
    format_table,
    format_validation,
    format_variations,
    memory_lines,
    write_json,
    write_plot,
)
from largebatch.scaling.predict import TOLERANCE_POINTS, model_footprints, sweep, validation_rows
from largebatch.scaling.resolve import Resolved, resolve

__all__ = ["main", "cli"]

OVERRIDES = ("compute_ms", "measure", "micro_batch", "accumulation_steps", "model", "gradient_mb", "backward_fraction",
             "bucket_mb", "fusion", "cycle_ms", "update_ms", "workers_per_node", "intra_gbit", "intra_latency_us",
             "inter_gbit", "inter_latency_us", "algorithm", "inter_algorithm", "baseline_workers", "params", "shard")
"""The options that replace a preset's values."""


def _workers(text: str) -> list[int]:
    return int_list("--workers", text, example="8,64,512", rule="worker counts are integers >= 1")


def run_validate(args: argparse.Namespace) -> int:
    """--validate: every published run's inputs, predicted against published efficiency, the sweeps;
    1 when a prediction is more than TOLERANCE_POINTS from its published figure."""
    rows = validation_rows()
    for preset, _ in rows:
        print(f"{preset.name}: {preset.title}")
        for line in describe(preset.cluster, preset.workload, preset.baseline_workers):
            print(f"    {line}")
    print()
    print(format_validation(rows))
    misses = [p.name for p, r in rows if abs(r.efficiency - p.published_efficiency) * 100 > TOLERANCE_POINTS]
    print()
    print(f"within {TOLERANCE_POINTS:g} points of the published efficiency: "
          + (f"{len(rows) - len(misses)} of {len(rows)}; not: {', '.join(misses)}" if misses else f"all {len(rows)}"))
    if args.variations:
        for preset, _ in rows:
            print()
            print(format_variations(preset))
    workers = _workers(args.workers) if args.workers else list(DEFAULT_WORKERS)
    series = []
    for preset, _ in rows:
        counts = sorted(set(p for p in workers if preset.cluster.fits(p)) | {preset.workers})
        series.append((preset.name, sweep(preset.cluster, preset.workload, counts, preset.baseline_workers)))
    if args.plot:
        write_plot(args.plot, series, [(p.name, p.workers, p.published_efficiency) for p, _ in rows])
        print(f"\nwrote {args.plot}")
    if args.json:
        write_json(args.json, {"validation": [
            {"preset": p.name, "title": p.title, "workers": p.workers, "baseline_workers": p.baseline_workers,
             "predicted_efficiency": r.efficiency, "published_efficiency": p.published_efficiency,
             "published_source": p.published_source, "cluster": asdict(p.cluster), "workload": asdict(p.workload),
             "inputs": dict(p.inputs), "prediction": asdict(r)} for p, r in rows],
            "tolerance_points": TOLERANCE_POINTS,
            "sweeps": {name: [asdict(r) for r in s] for name, s in series}})
        print(f"wrote {args.json}")
    return 1 if misses else 0


def _worker_counts(args: argparse.Namespace, r: Resolved) -> tuple[list[int], Optional[int]]:
    """(worker counts of the table, the count marked '*': --nodes, or the preset's own)."""
    cluster, preset = r.cluster, r.preset
    workers = _workers(args.workers) if args.workers else default_workers(cluster.workers_per_node)
    mark = None
    if args.nodes:
        mark = args.nodes * cluster.workers_per_node
        workers = sorted(set(workers) | {mark})
    elif preset is not None and not args.workers:
        mark = preset.workers
        workers = sorted(set(workers) | {mark})
    for p in workers + [r.baseline_workers]:
        if not cluster.fits(p):
            k = cluster.workers_per_node
            raise UsageError(f"{p} workers do not fill whole nodes of {k}: use a multiple of {k} "
                             f"(e.g. {max(k, p // k * k)} or {(p // k + 1) * k}) or at most {k}")
    return workers, mark


def _print_inputs(args: argparse.Namespace, r: Resolved) -> None:
    """The preset and where its inputs come from, the measurement, and the inputs in effect."""
    preset = r.preset
    if preset is not None:
        print(f"{preset.name}: {preset.title}")
        print(f"published: {preset.published_efficiency:.2%} at {preset.workers} workers; {preset.published_source}")
        print("inputs and where they come from:")
        for key, value in preset.inputs:
            print(f"  {key + ':':<12} {value}")
        print()
        overridden = any(getattr(args, name) is not None for name in OVERRIDES)
        print("in effect" + (" (command-line flags replace the preset's values):" if overridden else ":"))
    if r.note:
        print(r.note)
    for line in describe(r.cluster, r.workload, r.baseline_workers):
        print(("  " if preset is not None else "") + line)


def _write_files(args: argparse.Namespace, r: Resolved, rows: list[StepPrediction],
                 per_worker: dict[int, dict[str, Footprint]], optimizer: str) -> None:
    """--plot and --json."""
    preset = r.preset
    if args.plot:
        published = [(preset.name, preset.workers, preset.published_efficiency)] if preset else []
        write_plot(args.plot, [(preset.name if preset else "prediction", rows)], published)
        print(f"\nwrote {args.plot}")
    if args.json:
        payload = {"preset": preset.name if preset else None, "cluster": asdict(r.cluster),
                   "workload": asdict(r.workload), "baseline_workers": r.baseline_workers,
                   "rows": [asdict(row) for row in rows]}
        if per_worker:
            payload["memory"] = {"parameters": r.size.parameters, "optimizer": optimizer, "shard": r.workload.shard,
                                 "exact_shapes": r.size.shapes is not None,
                                 "per_worker": {str(p): {m: {**asdict(f), "total": f.total} for m, f in fs.items()}
                                                for p, fs in per_worker.items()}}
        write_json(args.json, payload)
        print(f"wrote {args.json}")


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m largebatch.simulate``; 0, or 1 when --validate misses a published figure."""
    args = simulator_parser().parse_args(argv)
    check_simulator_args(args)
    if args.validate:
        return run_validate(args)
    if args.variations and not args.preset:
        raise UsageError("--variations needs --preset NAME or --validate")
    r = resolve(args)
    workers, mark = _worker_counts(args, r)
    rows = sweep(r.cluster, r.workload, workers, r.baseline_workers)
    with_memory = any(v is not None for v in (args.shard, args.params, args.optimizer))
    optimizer = args.optimizer or "sgd"
    memory_at = mark or max(workers)
    per_worker = {p: model_footprints(r.size, p, optimizer, r.workload.accumulation_steps) for p in workers} \
        if with_memory else {}
    _print_inputs(args, r)
    if with_memory:
        print()
        for line in memory_lines(r.size, memory_at, optimizer, r.workload.shard, per_worker[memory_at]):
            print(line)
    print()
    print(format_table(rows, mark, {p: f[r.workload.shard].total for p, f in per_worker.items()} or None,
                       collectives=r.workload.shard != "none"))
    if r.preset is not None and args.variations:
        print()
        print(format_variations(r.preset))
    _write_files(args, r, rows, per_worker, optimizer)
    return 0


def cli() -> None:
    """Console-script entry point."""
    run_cli(main)
