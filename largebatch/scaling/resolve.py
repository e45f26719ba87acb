"""From the simulator's command-line options to the inputs of a prediction.

:func:`resolve` starts from a preset (or :data:`~largebatch.scaling.presets.DEFAULT_CLUSTER`),
sizes the gradient from a zoo model, a measurement, a parameter count or megabytes, applies
sharding, then lets every flag given replace the value it names. It returns a :class:`Resolved`.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, replace
from typing import Optional

from largebatch.errors import UsageError
from largebatch.scaling.measure import measure_compute, model_shapes
from largebatch.scaling.model import MIB, Cluster, ModelSize, Workload, gbit
from largebatch.scaling.presets import DEFAULT_CLUSTER, PRESETS, Preset

__all__ = ["Resolved", "resolve"]


@dataclass(frozen=True)
class Resolved:
    """The inputs of a prediction, as the options give them."""

    cluster: Cluster
    """The machines and the allreduce."""
    workload: Workload
    """One worker's share of one optimizer step."""
    preset: Optional[Preset]
    """The published run started from (--preset), or None."""
    baseline_workers: int
    """Workers the efficiency is measured against."""
    note: Optional[str]
    """How the compute time was measured on this machine (--measure), as printed; None if given."""
    size: ModelSize
    """The model's parameters, for the memory lines."""


@dataclass
class _Sizes:
    """What the options say about the compute time and the model's size, before sharding."""

    compute: Optional[float]
    """Seconds of forward+backward per micro-batch, where given or measured."""
    gradient: Optional[float]
    """Bytes of gradient, where known."""
    bytes_per_value: int
    size: ModelSize
    note: Optional[str] = None


def _sizes(args: argparse.Namespace, preset: Optional[Preset], micro: int) -> _Sizes:
    """The compute time and the gradient as the options give them; the last option that sizes the
    model wins (a preset, --gradient-mb, --model, --measure where nothing else did, --params)."""
    s = _Sizes(compute=args.compute_ms / 1e3 if args.compute_ms is not None else None,
               gradient=args.gradient_mb * MIB if args.gradient_mb is not None else None,
               bytes_per_value=args.bytes_per_value or 4, size=ModelSize(0))
    if preset is not None:
        s.size = ModelSize(preset.parameters, None, f"the {preset.name} preset's model")
        if args.bytes_per_value is None:
            s.bytes_per_value = round(preset.workload.gradient_bytes / preset.parameters)
    if s.gradient is not None:
        s.size = ModelSize(round(s.gradient / s.bytes_per_value), None, f"--gradient-mb {args.gradient_mb:g} at "
                                                                        f"{s.bytes_per_value} bytes per value")
    if args.model is not None:
        shapes = model_shapes(args.model)
        s.size = ModelSize(sum(math.prod(t) for g in shapes for t in g), shapes, args.model)
        s.gradient = s.size.parameters * s.bytes_per_value
    if args.measure:
        seconds, params = measure_compute(args.measure, micro, args.image_size, 1000, args.measure_iterations)
        s.compute = seconds
        s.note = (f"measured: {args.measure} forward+backward of {micro} images of {args.image_size}x"
                  f"{args.image_size} on this machine, median of {args.measure_iterations}: {seconds * 1e3:.1f} ms")
        if s.gradient is None:
            s.gradient = params * s.bytes_per_value
            s.size = ModelSize(params, model_shapes(args.measure, args.image_size), args.measure)
    if args.params is not None:
        s.size = ModelSize(int(args.params), None, "--params")
        s.gradient = s.size.parameters * s.bytes_per_value
    return s


def _workload(args: argparse.Namespace, preset: Optional[Preset], micro: int, s: _Sizes) -> Workload:
    """The preset's workload (or a new one) with the compute time, the gradient and the sharding."""
    shard = args.shard or "none"
    gather, grad = None, s.gradient
    if shard != "none" and s.size.parameters:
        # ZeRO-1 sends the updated fp32 weights; ZeRO-3 gathers weights in the compute dtype
        # (bytes_per_value: 2 for bf16/fp16 mixed precision) and reduce-scatters fp32 gradients.
        gather = s.size.parameters * (4 if shard == "optimizer" else s.bytes_per_value)
        if shard == "full":
            grad = s.size.parameters * 4
    if preset is None:
        if s.compute is None:
            raise UsageError("give the compute time: --compute-ms MS, --measure MODEL, or --preset NAME")
        if grad is None:
            raise UsageError("give the gradient size: --model NAME, --gradient-mb MIB, --params N, --measure MODEL, "
                             "or --preset NAME")
        workload = Workload(compute_time=s.compute, micro_batch=micro, gradient_bytes=grad)
    else:
        workload = replace(preset.workload, micro_batch=micro)
        if s.compute is not None:
            workload = replace(workload, compute_time=s.compute)
        if grad is not None:
            workload = replace(workload, gradient_bytes=grad)
    return replace(workload, shard=shard, gather_bytes=gather)


def _given(values: dict) -> dict:
    """The entries of ``values`` that are not None."""
    return {k: v for k, v in values.items() if v is not None}


def _flags(args: argparse.Namespace) -> tuple[dict, dict]:
    """(workload fields, cluster fields) the flags give, in the dataclasses' units."""
    workload = {"accumulation_steps": args.accumulation_steps, "backward_fraction": args.backward_fraction,
                "bucket_bytes": args.bucket_mb * MIB if args.bucket_mb is not None else None, "fusion": args.fusion,
                "cycle_time": args.cycle_ms / 1e3 if args.cycle_ms is not None else None,
                "update_time": args.update_ms / 1e3 if args.update_ms is not None else None}
    cluster = {"workers_per_node": args.workers_per_node,
               "intra_bandwidth": gbit(args.intra_gbit) if args.intra_gbit is not None else None,
               "intra_latency": args.intra_latency_us * 1e-6 if args.intra_latency_us is not None else None,
               "inter_bandwidth": gbit(args.inter_gbit) if args.inter_gbit is not None else None,
               "inter_latency": args.inter_latency_us * 1e-6 if args.inter_latency_us is not None else None,
               "algorithm": args.algorithm, "inter_algorithm": args.inter_algorithm}
    return _given(workload), _given(cluster)


def resolve(args: argparse.Namespace) -> Resolved:
    """The cluster, workload, preset, baseline, measurement note and model size the simulator's
    options (checked by :func:`largebatch.scaling.cli.check_simulator_args`) describe."""
    preset = PRESETS[args.preset] if args.preset else None
    micro = args.micro_batch if args.micro_batch is not None else (preset.workload.micro_batch if preset else 32)
    sizes = _sizes(args, preset, micro)
    workload = _workload(args, preset, micro, sizes)
    workload_flags, cluster_flags = _flags(args)
    try:
        workload = replace(workload, **workload_flags)
        cluster = replace(preset.cluster if preset else DEFAULT_CLUSTER, **cluster_flags)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    baseline = args.baseline_workers or (preset.baseline_workers if preset else 1)
    return Resolved(cluster=cluster, workload=workload, preset=preset, baseline_workers=baseline, note=sizes.note,
                    size=sizes.size)
