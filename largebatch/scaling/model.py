"""The inputs and the result of a step prediction: the cluster, the workload, the model's size.

:class:`Cluster` holds the machines and the allreduce they run, :class:`Workload` one worker's
share of one optimizer step, :class:`ModelSize` what the memory figures need to know about the
model, and :class:`StepPrediction` the predicted timeline of one step. Every field is in seconds,
bytes or bytes/s, with its unit in its docstring; the constructors refuse values the model cannot
use, naming the field, the value and what is allowed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

from largebatch.footprint import MODES as SHARDS

__all__ = ["GBIT", "MIB", "mib", "ALGORITHMS", "INTER_ALGORITHMS", "FUSIONS", "SHARDS", "gbit", "Cluster", "Workload",
           "StepPrediction", "ModelSize"]

GBIT = 1e9 / 8
"""Bytes per second in one Gbit/s."""
MIB = 1024 * 1024
"""Bytes in one MiB (DDP's ``bucket_cap_mb`` counts these)."""


def mib(nbytes: float) -> str:
    """Bytes in MiB, the one unit of sizes in the simulator's and the advice's text, with three
    significant digits at least: 97.49 MiB, 0.191 MiB, 3,814.7 MiB."""
    value = nbytes / MIB
    if value >= 100:
        return f"{value:,.1f} MiB"
    return f"{value:.2f} MiB" if value >= 1 else f"{value:.3g} MiB"


ALGORITHMS = ("ring", "halving-doubling", "hierarchical")
INTER_ALGORITHMS = ("ring", "halving-doubling")
FUSIONS = ("fixed", "greedy")


def gbit(x: float) -> float:
    """Gbit/s to bytes/s."""
    return x * GBIT


def _positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name}={value!r} is not allowed: use a finite number > 0")


def _non_negative(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name}={value!r} is not allowed: use a finite number >= 0")


def _positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} is not allowed: use an integer >= 1")


def _choice(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed: use one of {', '.join(allowed)}")


@dataclass(frozen=True)
class Cluster:
    """The machines and the allreduce they run. Bandwidths are what the collective achieves
    (line rate times the achievable fraction), not the line rate."""

    workers_per_node: int
    """Workers (GPUs, or CPU ranks) in one node, k."""
    intra_bandwidth: float
    """Bytes/s one worker can send to another worker of the same node (NVLink, PCIe, shared memory)."""
    intra_latency: float
    """Seconds per message between two workers of the same node (alpha inside a node)."""
    inter_bandwidth: float
    """Bytes/s one node can send to the other nodes, all its NICs together."""
    inter_latency: float
    """Seconds per message between two nodes (alpha across the network)."""
    algorithm: str = "ring"
    """Allreduce algorithm: 'ring', 'halving-doubling' or 'hierarchical' (2D)."""
    inter_algorithm: str = "ring"
    """For 'hierarchical': the algorithm between nodes, 'ring' or 'halving-doubling'."""

    def __post_init__(self):
        _positive_int("workers_per_node", self.workers_per_node)
        _positive("intra_bandwidth", self.intra_bandwidth)
        _non_negative("intra_latency", self.intra_latency)
        _positive("inter_bandwidth", self.inter_bandwidth)
        _non_negative("inter_latency", self.inter_latency)
        _choice("algorithm", self.algorithm, ALGORITHMS)
        _choice("inter_algorithm", self.inter_algorithm, INTER_ALGORITHMS)

    def layout(self, workers: int) -> tuple[int, int]:
        """(nodes, workers per node) for ``workers`` workers: nodes are filled one at a time."""
        _positive_int("workers", workers)
        k = self.workers_per_node
        if workers <= k:
            return 1, workers
        if workers % k:
            raise ValueError(f"workers={workers} is not a multiple of workers_per_node={k}: "
                             f"use {workers // k * k} or {(workers // k + 1) * k}")
        return workers // k, k

    def fits(self, workers: int) -> bool:
        """Whether ``workers`` workers fit in one node or fill whole nodes."""
        k = self.workers_per_node
        return workers <= k or workers % k == 0


@dataclass(frozen=True)
class Workload:
    """One worker's share of one optimizer step."""

    compute_time: float
    """Seconds of forward+backward for one micro-batch on one worker."""
    micro_batch: int
    """Images in one micro-batch of one worker."""
    gradient_bytes: float
    """Bytes of gradient each worker contributes to the allreduce (parameters x bytes per value)."""
    accumulation_steps: int = 1
    """Micro-batches per optimizer step; only the last one's backward overlaps the allreduce."""
    backward_fraction: float = 2 / 3
    """Share of forward+backward spent in backward, over which the gradients become ready."""
    bucket_bytes: float = 25 * MIB
    """Bytes per allreduce bucket ('fixed'), or the largest fused allreduce ('greedy')."""
    fusion: str = "fixed"
    """'fixed': buckets of bucket_bytes in order (DDP, Caffe2); 'greedy': Horovod's tensor fusion."""
    cycle_time: float = 0.005
    """For 'greedy': seconds between two looks at the ready gradients (Horovod's cycle time)."""
    update_time: float = 0.0
    """Seconds per step after the allreduce that nothing overlaps (optimizer update of the whole
    model; under shard 'optimizer' and 'full' each worker updates 1/p of it)."""
    shard: str = "none"
    """comm.shard: 'none' (DDP), 'optimizer' (ZeRO-1: allreduce, then an allgather of the updated
    parameters) or 'full' (ZeRO-3: parameters all-gathered per block in forward and backward,
    gradients reduce-scattered)."""
    gather_bytes: Optional[float] = None
    """Bytes of parameters each worker gathers: the fp32 weights under 'optimizer', the weights in
    the compute dtype under 'full'; None = gradient_bytes."""

    def __post_init__(self):
        _positive("compute_time", self.compute_time)
        _positive_int("micro_batch", self.micro_batch)
        _non_negative("gradient_bytes", self.gradient_bytes)
        _positive_int("accumulation_steps", self.accumulation_steps)
        if not (isinstance(self.backward_fraction, (int, float)) and 0 < self.backward_fraction <= 1):
            raise ValueError(f"backward_fraction={self.backward_fraction!r} is not allowed: use a number in (0, 1]")
        _positive("bucket_bytes", self.bucket_bytes)
        _choice("fusion", self.fusion, FUSIONS)
        _positive("cycle_time", self.cycle_time)
        cycles = self.backward_fraction * self.compute_time / self.cycle_time
        if self.fusion == "greedy" and cycles > 1e6:
            raise ValueError(f"cycle_time={self.cycle_time!r} is not allowed: {cycles:.0f} cycles per backward pass "
                             f"of {self.backward_fraction * self.compute_time!r} s; use at least "
                             f"{self.backward_fraction * self.compute_time / 1e6!r} s")
        _non_negative("update_time", self.update_time)
        _choice("shard", self.shard, SHARDS)
        if self.shard == "full" and self.fusion == "greedy":
            raise ValueError("fusion='greedy' is not allowed with shard='full': its parameters are gathered and its "
                             "gradients reduce-scattered block by block; use fusion='fixed' (bucket_bytes per block)")
        if self.gather_bytes is not None:
            _non_negative("gather_bytes", self.gather_bytes)

    @property
    def batch_per_worker(self) -> int:
        return self.micro_batch * self.accumulation_steps

    @property
    def parameter_bytes(self) -> float:
        """Bytes of parameters one worker gathers (gather_bytes, or gradient_bytes when not given)."""
        return self.gradient_bytes if self.gather_bytes is None else self.gather_bytes


@dataclass(frozen=True)
class StepPrediction:
    """The predicted timeline of one optimizer step at one worker count."""

    workers: int
    """Workers (p)."""
    nodes: int
    """Nodes the workers fill."""
    compute_time: float
    """Seconds of computation per step: accumulation_steps x compute_time + update_time."""
    comm_time: float
    """Seconds the collectives of one step take end to end, summed over buckets (hidden or not)."""
    exposed_comm: float
    """Seconds of communication not hidden behind backward (step_time - compute_time, >= 0)."""
    step_time: float
    """Seconds per optimizer step."""
    throughput: float
    """Images per second of the whole cluster."""
    efficiency: float
    """throughput / (workers x throughput of the baseline per worker); 1 means linear scaling."""
    allreduces: int
    """Collective calls per step: allreduces (buckets), plus the allgather under shard 'optimizer';
    allgathers and reduce-scatters under 'full'."""


@dataclass(frozen=True)
class ModelSize:
    """What the memory lines and the sharded collectives need to know about the model."""

    parameters: int
    """Parameters of the model (0: not known)."""
    shapes: Optional[list] = None
    """Shapes of its parameter tensors in the optimizer's groups, where the model is built here;
    None: a count only (--params, --gradient-mb, a preset), split evenly over the workers."""
    source: str = ""
    """Where the count comes from, as printed."""
