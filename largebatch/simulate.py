"""Predict step time, throughput and scaling efficiency of synchronous data-parallel training.

    python -m largebatch.simulate --model resnet50 --compute-ms 140 --micro-batch 32 \\
        --workers-per-node 8 --intra-gbit 160 --inter-gbit 37.5 --algorithm hierarchical
    python -m largebatch.simulate --preset goyal2017 --plot eff.png --json eff.json
    python -m largebatch.simulate --validate
    python -m largebatch.simulate --params 11e9 --shard full --compute-ms 2112 --workers-per-node 4 --nodes 16

Every worker runs forward and backward on its micro-batch; the gradients are averaged with an
allreduce in buckets that start while backward is still running (as DDP, Horovod's tensor fusion and
Caffe2's per-layer allreduce do); the optimizer step waits for the last bucket.

**Cost of one allreduce** of ``n`` bytes over ``p`` workers, in the alpha-beta model of Hockney
(alpha: seconds per message, beta: seconds per byte), as analysed by Thakur, Rabenseifner & Gropp,
"Optimization of Collective Communication Operations in MPICH", IJHPCA 2005:

- ``ring``: ``2(p-1)·alpha + 2(p-1)/p·n·beta`` (reduce-scatter then allgather around one ring;
  Baidu's ring allreduce, NCCL, Horovod: Sergeev & Del Balso, "Horovod: fast and easy distributed
  deep learning in TensorFlow", arXiv:1802.05799, 2018).
- ``halving-doubling``: Rabenseifner's recursive-halving reduce-scatter and recursive-doubling
  allgather, ``2·log2(p)·alpha + 2(p-1)/p·n·beta`` for a power of two; otherwise the ``r = p - 2^k``
  extra workers first hand their vector to a partner and get the result back at the end
  (``+ 2·(alpha + n·beta)``). Goyal et al. used it between servers: "Accurate, Large Minibatch SGD:
  Training ImageNet in 1 Hour", arXiv:1706.02677, 2017.
- ``hierarchical``: reduce-scatter over the ``k`` workers of a node (ring), an allreduce of the
  node's ``n/k``-byte shard between the ``m`` nodes by each local worker at once (``inter_algorithm``:
  ring or halving-doubling; the ``k`` streams share the node's network), then an allgather inside
  the node: the 2D-torus allreduce of Mikami et al., "Massively Distributed SGD: ImageNet/ResNet-50
  Training in a Flash", arXiv:1811.05233, 2018, and the intra-/inter-server split of Goyal et al.

With several nodes, ``inter_bandwidth`` is what one node can send (all its NICs together). A flat
ring crosses each node boundary once per direction, so each step takes the slower of the two links.
Flat halving-doubling pairs the workers inside a node first; in the steps that cross nodes all
``k`` workers of a node send at once and share the node's bandwidth.

**Overlap.** The last micro-batch's backward pass (``backward_fraction`` of forward+backward,
typically 2/3) produces the gradient bytes at a uniform rate. A bucket can be reduced once all its
bytes exist and the previous bucket has finished (one link, buckets in order). ``fusion='greedy'``
models Horovod's tensor fusion instead of fixed buckets: every ``cycle_time`` the bytes ready so
far go out in allreduces of at most ``bucket_bytes``. The exposed communication is the time from the
end of backward to the end of the last bucket; the step is compute + exposed communication +
``update_time``.

**Sharding** (``comm.shard``, ``shard`` below). ``optimizer`` (ZeRO-1,
``ZeroRedundancyOptimizer``): the same allreduce as ``none``, then each worker updates its share of
the tensors (``update_time / p``) and sends them to the others, counted as one allgather of the
fp32 parameters after the update, which nothing overlaps. ``full`` (ZeRO-3, FSDP2): no allreduce;
the model is cut into blocks of ``bucket_bytes`` of gradient, and each block's parameters are
all-gathered before its forward and again before its backward, the next block's while this one
computes (one ahead, on the same link), and its gradient is reduce-scattered once its backward is
done: 1.5 times the allreduce's bytes, an allgather and a reduce-scatter each costing half an
allreduce (``gather_time``). Forward and backward compute in proportion to the blocks' bytes. With
accumulation, every micro-batch gathers and only the last reduce-scatters.

Left out: stragglers (a synchronous step waits for the slowest worker), communication slowing the
computation it overlaps (shared memory bandwidth, GPU cores running the reduction), framework and
data-loading overheads, and the network topology beyond one link per node.

**Efficiency** at a fixed per-worker batch (weak scaling) is ``throughput(p) / (p·throughput(b))``
with ``b = 1`` worker unless a baseline is given (Goyal et al. quote theirs from 8 GPUs, one server),
which is ``step_time(b) / step_time(p)``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from typing import Optional, Sequence

from largebatch.errors import UsageError, run_cli
from largebatch.footprint import MODES as SHARDS
from largebatch.footprint import OPTIMIZERS, Footprint, even_footprints, footprints, state_per_parameter, table

GBIT = 1e9 / 8
"""Bytes per second in one Gbit/s."""
MIB = 1024 * 1024
"""Bytes in one MiB (DDP's ``bucket_cap_mb`` counts these)."""
ALGORITHMS = ("ring", "halving-doubling", "hierarchical")
INTER_ALGORITHMS = ("ring", "halving-doubling")
FUSIONS = ("fixed", "greedy")
DEFAULT_WORKERS = tuple(2 ** i for i in range(3, 13))


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


# --- alpha-beta costs -------------------------------------------------------------------------

def ring_allreduce_time(p: int, n: float, alpha: float, beta: float) -> float:
    """Ring allreduce of ``n`` bytes over ``p`` workers: ``2(p-1)·alpha + 2(p-1)/p·n·beta``."""
    if p <= 1:
        return 0.0
    return 2 * (p - 1) * alpha + 2 * (p - 1) / p * n * beta


def ring_reduce_scatter_time(p: int, n: float, alpha: float, beta: float) -> float:
    """Ring reduce-scatter (or allgather) of ``n`` bytes over ``p`` workers: half a ring allreduce."""
    if p <= 1:
        return 0.0
    return (p - 1) * alpha + (p - 1) / p * n * beta


def halving_doubling_time(p: int, n: float, alpha: float, beta: float) -> float:
    """Rabenseifner's allreduce: ``2·log2(p)·alpha + 2(p-1)/p·n·beta`` for ``p`` a power of two;
    otherwise on the largest power of two below ``p``, plus ``2·(alpha + n·beta)`` for the extra
    workers to hand in their vector and get the result back."""
    if p <= 1:
        return 0.0
    q = 1 << (p.bit_length() - 1)
    steps = q.bit_length() - 1
    t = 2 * steps * alpha + 2 * (q - 1) / q * n * beta
    if q != p:
        t += 2 * (alpha + n * beta)
    return t


def allreduce_time(cluster: Cluster, workers: int, n: float) -> float:
    """Seconds for one allreduce of ``n`` bytes over ``workers`` workers of ``cluster``."""
    m, k = cluster.layout(workers)
    if workers == 1 or n <= 0:
        return 0.0
    a_i, b_i = cluster.intra_latency, 1 / cluster.intra_bandwidth
    a_e, b_e = cluster.inter_latency, 1 / cluster.inter_bandwidth
    alg = cluster.algorithm
    if m == 1:  # one node: every message stays inside it
        if alg == "halving-doubling":
            return halving_doubling_time(k, n, a_i, b_i)
        return ring_allreduce_time(k, n, a_i, b_i)  # a 2D allreduce on one node is its ring
    if alg == "ring":
        # One ring through all workers, each node's workers adjacent: every step waits for the
        # slowest hop, which crosses a node boundary.
        return ring_allreduce_time(workers, n, max(a_i, a_e), max(b_i, b_e))
    if alg == "halving-doubling":
        if workers & (workers - 1) or k & (k - 1):
            # Not a clean power-of-two split into nodes: charge every step at the slower link.
            return halving_doubling_time(workers, n, max(a_i, a_e), max(b_i, b_e * k))
        # Partners inside the node first (log2 k steps), then across nodes (log2 m steps) where the
        # k workers of a node send at once through the node's network.
        intra = 2 * (k.bit_length() - 1) * a_i + 2 * (k - 1) / k * n * b_i
        inter = 2 * (m.bit_length() - 1) * a_e + 2 * (m - 1) / m * n * b_e
        return intra + inter
    # hierarchical: intra reduce-scatter, k concurrent inter allreduces of n/k, intra allgather.
    shard = n / k
    if cluster.inter_algorithm == "ring":
        inter = ring_allreduce_time(m, shard, a_e, b_e * k)
    else:
        inter = halving_doubling_time(m, shard, a_e, b_e * k)
    return 2 * ring_reduce_scatter_time(k, n, a_i, b_i) + inter


def gather_time(cluster: Cluster, workers: int, n: float) -> float:
    """Seconds for one allgather, or one reduce-scatter, of ``n`` bytes (the whole tensor, of which
    each worker holds or gets 1/p): half an allreduce, which is a reduce-scatter followed by an
    allgather in every algorithm here."""
    return allreduce_time(cluster, workers, n) / 2


# --- one optimizer step -----------------------------------------------------------------------

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


def _bucket_sizes(workload: Workload) -> list[float]:
    n, b = workload.gradient_bytes, workload.bucket_bytes
    if n <= 0:
        return []
    full = int(n // b)
    sizes = [b] * full
    rest = n - full * b
    if rest > 1e-9 * n:
        sizes.append(rest)
    return sizes


def comm_timeline(cluster: Cluster, workload: Workload, workers: int) -> tuple[float, float, int]:
    """(end of the last allreduce measured from the start of backward, summed allreduce time,
    number of allreduces) for the last micro-batch's backward pass."""
    n = workload.gradient_bytes
    backward = workload.backward_fraction * workload.compute_time
    if n <= 0 or workers == 1:
        return 0.0, 0.0, 0

    def ready(nbytes: float) -> float:  # when the first nbytes of gradient exist
        return backward * min(nbytes, n) / n

    free, total, count = 0.0, 0.0, 0
    if workload.fusion == "fixed":
        done = 0.0
        for size in _bucket_sizes(workload):
            done += size
            start = max(ready(done), free)
            t = allreduce_time(cluster, workers, size)
            free, total, count = start + t, total + t, count + 1
        return free, total, count
    # Horovod's background loop: every cycle it takes the gradients ready at that moment, reduces them in
    # fused allreduces of at most bucket_bytes one after the other, and looks again a cycle after it last
    # looked or when those allreduces end, whichever is later.
    cycle, sent, tick = workload.cycle_time, 0.0, workload.cycle_time
    while sent < n * (1 - 1e-12):
        pending = n * min(tick / backward, 1.0) - sent
        if pending > 1e-12 * n:
            free = tick
            while pending > 1e-12 * n:
                size = min(pending, workload.bucket_bytes)
                t = allreduce_time(cluster, workers, size)
                free, total, count = free + t, total + t, count + 1
                sent, pending = sent + size, pending - size
        tick = max(tick + cycle, free)
    return free, total, count


def predict_step(cluster: Cluster, workload: Workload, workers: int, baseline_workers: int = 1) -> StepPrediction:
    """Step time, throughput and efficiency of ``workers`` workers against ``baseline_workers``."""
    nodes, _ = cluster.layout(workers)
    step, comm, count, compute = _step_time(cluster, workload, workers)
    base = step if baseline_workers == workers else _step_time(cluster, workload, baseline_workers)[0]
    throughput = workers * workload.batch_per_worker / step
    return StepPrediction(workers=workers, nodes=nodes, compute_time=compute, comm_time=comm,
                          exposed_comm=step - compute, step_time=step, throughput=throughput,
                          efficiency=base / step, allreduces=count)


def _step_time(cluster: Cluster, workload: Workload, workers: int) -> tuple[float, float, int, float]:
    """(step time, summed collective time, collective calls, compute time) of one optimizer step."""
    w = workload
    update = w.update_time if w.shard == "none" else w.update_time / workers  # each updates its share
    compute = w.accumulation_steps * w.compute_time + update
    if w.shard == "full":
        step, comm, count = 0.0, 0.0, 0
        for k in range(w.accumulation_steps):
            end, c, n = shard_timeline(cluster, w, workers, reduce=k == w.accumulation_steps - 1)
            step, comm, count = step + end, comm + c, count + n
        return step + update, comm, count, compute
    backward = w.backward_fraction * w.compute_time
    end, comm, count = comm_timeline(cluster, w, workers)
    exposed = max(0.0, end - backward)  # communication still running when backward ends
    step = compute + exposed
    if w.shard == "optimizer" and workers > 1 and w.parameter_bytes > 0:
        t = gather_time(cluster, workers, w.parameter_bytes)  # the updated parameters, after the update
        step, comm, count = step + t, comm + t, count + 1
    return step, comm, count, compute


def shard_timeline(cluster: Cluster, workload: Workload, workers: int, reduce: bool = True) -> tuple[float, float, int]:
    """One micro-batch's forward and backward under shard 'full': (seconds from the start of the
    forward until both the compute and the last collective are done, summed collective time,
    collective calls).

    The blocks are buckets of ``bucket_bytes`` of gradient (the last one smaller). On one link, in
    the order they are issued: block i's allgather (``parameter_bytes`` in proportion) is issued
    when block i-1 starts computing (the first one at the start), and block i computes once it has
    arrived and block i-1 is done; backward runs the blocks in reverse, gathering again, and
    issues each block's reduce-scatter (``gradient_bytes`` in proportion) when its backward ends
    (``reduce``: the last micro-batch only)."""
    w = workload
    sizes = _bucket_sizes(w)
    if workers == 1 or not sizes:
        return w.compute_time, 0.0, 0
    n = w.gradient_bytes
    fractions = [b / n for b in sizes]
    gather = [gather_time(cluster, workers, f * w.parameter_bytes) for f in fractions]
    scatter = [gather_time(cluster, workers, f * n) for f in fractions]
    forward = (1 - w.backward_fraction) * w.compute_time
    backward = w.backward_fraction * w.compute_time
    link, done, total, count = 0.0, 0.0, 0.0, 0  # link free at; compute done at

    def send(start: float, seconds: float) -> float:  # the link takes one collective at a time
        nonlocal link, total, count
        link = max(link, start) + seconds
        total, count = total + seconds, count + 1
        return link

    order = list(range(len(sizes)))
    for blocks, share, scatters in ((order, forward, False), (order[::-1], backward, reduce)):
        arrived = {blocks[0]: send(done, gather[blocks[0]])}
        for j, i in enumerate(blocks):
            start = max(arrived[i], done)
            if j + 1 < len(blocks):  # the next block's parameters, while this one computes
                arrived[blocks[j + 1]] = send(start, gather[blocks[j + 1]])
            done = start + share * fractions[i]
            if scatters:
                send(done, scatter[i])
    return max(done, link), total, count


def sweep(cluster: Cluster, workload: Workload, workers: Sequence[int], baseline_workers: int = 1) -> list[StepPrediction]:
    """One prediction per worker count."""
    return [predict_step(cluster, workload, p, baseline_workers) for p in workers]


def default_workers(workers_per_node: int) -> list[int]:
    """8, 16, ..., 4096 where the nodes divide them; otherwise whole nodes, doubling up to 4096 workers."""
    fits = [p for p in DEFAULT_WORKERS if p <= workers_per_node or p % workers_per_node == 0]
    if len(fits) == len(DEFAULT_WORKERS):
        return fits
    out, nodes = [], 1
    while nodes * workers_per_node <= DEFAULT_WORKERS[-1] or not out:
        out.append(nodes * workers_per_node)
        nodes *= 2
    return out


# --- published runs ---------------------------------------------------------------------------

def gbit(x: float) -> float:
    """Gbit/s to bytes/s."""
    return x * GBIT


RESNET50_PARAMS = 25_557_032
"""Parameters of ResNet-50 (v1.5, 1000 classes): ``largebatch.models.create_model('resnet50', 1000)``."""
RESNET50_TENSORS = 161
"""Parameter tensors of ResNet-50: 53 convolutions, 53 BatchNorm weight/bias pairs, the classifier's weight and bias."""
RESNET101_PARAMS = 44_549_160
"""Parameters of ResNet-101 (1000 classes; He et al. 2016, torchvision's count); not in the model zoo."""


@dataclass(frozen=True)
class Variation:
    """Other plausible values of one input of a preset, to show how much the prediction depends on it."""

    label: str
    """What is varied, as printed."""
    section: str
    """'cluster' or 'workload': the dataclass the field belongs to."""
    field: str
    """The field of :class:`Cluster` or :class:`Workload` that takes the values."""
    values: tuple[tuple[str, object], ...]
    """(printed value, field value) pairs."""


@dataclass(frozen=True)
class Preset:
    """A published run: its cluster, its workload, and the efficiency its authors reported."""

    name: str
    """Name on the command line (--preset NAME)."""
    title: str
    """One line: paper, model, GPUs, network."""
    cluster: Cluster
    """The machines and allreduce of the run."""
    workload: Workload
    """Per-worker work and gradient of the run."""
    workers: int
    """Workers of the published efficiency figure."""
    baseline_workers: int
    """Workers the published efficiency is measured against (1 unless the paper says otherwise)."""
    published_efficiency: float
    """Scaling efficiency the paper reports, as a fraction."""
    published_source: str
    """Where the published figure comes from."""
    inputs: tuple[tuple[str, str], ...]
    """(input, value with its source or reasoning) for every input of the prediction."""
    variations: tuple[Variation, ...] = ()
    """Plausible alternatives for the least certain inputs."""
    parameters: int = 0
    """Parameters of the model (for memory per worker and sharded communication)."""


def _frac(line_gbit: float, fraction: float) -> float:
    return gbit(line_gbit * fraction)


PRESETS: dict[str, Preset] = {}


def _add(preset: Preset) -> None:
    PRESETS[preset.name] = preset


_R50_FP32 = RESNET50_PARAMS * 4
_add(Preset(
    name="goyal2017",
    title="Goyal et al. 2017: ResNet-50, 256 P100 (32 servers x 8, NVLink), 50 Gbit/s Ethernet, batch 32/GPU",
    cluster=Cluster(workers_per_node=8, intra_bandwidth=20e9 * 0.8, intra_latency=5e-6,
                    inter_bandwidth=_frac(50, 0.75), inter_latency=25e-6,
                    algorithm="hierarchical", inter_algorithm="halving-doubling"),
    workload=Workload(compute_time=32 / 219, micro_batch=32, gradient_bytes=_R50_FP32,
                      bucket_bytes=_R50_FP32 / RESNET50_TENSORS),
    workers=256, baseline_workers=8, published_efficiency=0.90, parameters=RESNET50_PARAMS,
    published_source="Goyal et al., arXiv:1706.02677, abstract and Fig. 8: ~90% scaling efficiency from 8 to 256 GPUs",
    inputs=(
        ("compute", "32 / 219 img/s = 146.1 ms for forward+backward of 32 images: ResNet-50 fp32 on one P100, "
                    "219 img/s (TensorFlow performance benchmarks, NVIDIA DGX-1, synthetic data, 2017)"),
        ("gradient", f"{RESNET50_PARAMS:,} parameters x 4 bytes (fp32) = {_R50_FP32 / 1e6:.1f} MB"),
        ("buckets", f"one allreduce per parameter tensor, {RESNET50_TENSORS} of {_R50_FP32 / RESNET50_TENSORS / 1e6:.2f} MB "
                    "on average: the paper aggregates each layer's gradient as soon as backprop has computed it"),
        ("algorithm", "hierarchical: inside the server (NCCL), halving-doubling between the 32 servers (Gloo), as in "
                      "the paper's section 4"),
        ("intra-node", "NVLink (P100 SXM2, hybrid cube mesh of Big Basin / DGX-1): 20 GB/s per link and direction x 0.8 "
                       "= 16 GB/s; 5 us per message"),
        ("inter-node", "50 Gbit/s Ethernet per server x 0.75 achievable over TCP = 37.5 Gbit/s (4.69 GB/s); "
                       "25 us per message (TCP over Ethernet: 10-50 us)"),
        ("backward", "2/3 of forward+backward"),
        ("baseline", "8 GPUs (one server), as the paper measures"),
    ),
    variations=(
        Variation("compute per 32 images", "workload", "compute_time", (("125 ms (256 img/s)", 0.125),
                                                                       ("160 ms (200 img/s)", 0.160))),
        Variation("inter-node latency", "cluster", "inter_latency", (("10 us", 10e-6), ("50 us", 50e-6))),
        Variation("inter-node bandwidth", "cluster", "inter_bandwidth", (("60% of line", _frac(50, 0.6)),
                                                                         ("90% of line", _frac(50, 0.9)))),
        Variation("intra-node latency", "cluster", "intra_latency", (("2 us", 2e-6), ("10 us", 10e-6))),
        Variation("bucket", "workload", "bucket_bytes", (("per layer (54)", _R50_FP32 / 54),
                                                         ("25 MiB", 25 * MIB))),
    ),
))

_R101_FP32 = RESNET101_PARAMS * 4
_add(Preset(
    name="horovod2018",
    title="Sergeev & Del Balso 2018 (Horovod): ResNet-101, 128 Pascal GPUs (32 servers x 4), 25 Gbit/s RoCE, batch 64/GPU",
    cluster=Cluster(workers_per_node=4, intra_bandwidth=15.75e9 * 0.8, intra_latency=5e-6,
                    inter_bandwidth=_frac(25, 0.8), inter_latency=5e-6, algorithm="ring"),
    workload=Workload(compute_time=0.55, micro_batch=64, gradient_bytes=_R101_FP32, bucket_bytes=64 * MIB),
    workers=128, baseline_workers=1, published_efficiency=0.90, parameters=RESNET101_PARAMS,
    published_source="Horovod README (benchmark of 32 servers x 4 Pascal GPUs, RoCE 25 Gbit/s): 90% for "
                      "Inception V3 and ResNet-101; arXiv:1802.05799 Fig. 6-7: 88% over TCP, RDMA 3-4% better",
    inputs=(
        ("compute", "550 ms for forward+backward of 64 images (116 img/s): ResNet-50's 219 img/s on a P100 scaled by "
                    "FLOPs, 4.1 / 7.8 GFLOPs per image = 115 img/s; Horovod's README example prints "
                    "1656.82 img/s on 16 GPUs, 103.6 img/s per GPU with communication"),
        ("gradient", f"{RESNET101_PARAMS:,} parameters x 4 bytes (fp32) = {_R101_FP32 / 1e6:.1f} MB"),
        ("buckets", "64 MiB: Horovod's tensor-fusion buffer (HOROVOD_FUSION_THRESHOLD default), taken as fixed "
                    "buckets filled in order"),
        ("algorithm", "ring through all 128 GPUs (NCCL 2 under Horovod)"),
        ("intra-node", "PCIe 3.0 x16, 15.75 GB/s x 0.8 = 12.6 GB/s; 5 us per message"),
        ("inter-node", "25 Gbit/s RoCE per server x 0.8 = 20 Gbit/s (2.5 GB/s); 5 us per message (RDMA)"),
        ("backward", "2/3 of forward+backward"),
        ("baseline", "1 GPU"),
    ),
    variations=(
        Variation("compute per 64 images", "workload", "compute_time", (("500 ms (128 img/s)", 0.50),
                                                                       ("620 ms (103 img/s)", 0.62))),
        Variation("inter-node latency", "cluster", "inter_latency", (("2 us", 2e-6), ("25 us (TCP)", 25e-6))),
        Variation("inter-node bandwidth", "cluster", "inter_bandwidth", (("60% of line", _frac(25, 0.6)),
                                                                         ("90% of line", _frac(25, 0.9)))),
        Variation("tensor fusion", "workload", "fusion", (("greedy, 5 ms cycle", "greedy"),)),
    ),
))

_R50_FP16 = RESNET50_PARAMS * 2
_add(Preset(
    name="sony2018",
    title="Mikami et al. 2018 (Sony): ResNet-50, 1088 V100 (272 nodes x 4, ABCI), 2 x InfiniBand EDR, batch 32/GPU, fp16",
    cluster=Cluster(workers_per_node=4, intra_bandwidth=50e9 * 0.8, intra_latency=5e-6,
                    inter_bandwidth=_frac(200, 0.8), inter_latency=3e-6,
                    algorithm="hierarchical", inter_algorithm="ring"),
    workload=Workload(compute_time=0.040, micro_batch=32, gradient_bytes=_R50_FP16, bucket_bytes=2 * MIB * 2),
    workers=1088, baseline_workers=1, published_efficiency=0.9162, parameters=RESNET50_PARAMS,
    published_source="Mikami et al., arXiv:1811.05233 v1, table of GPU scaling efficiency: 91.62% on 1088 Tesla V100",
    inputs=(
        ("compute", "40 ms for forward+backward of 32 images (800 img/s): mixed-precision ResNet-50 on one V100 was "
                    "published at roughly 800-1,400 img/s (2018, batch 128-256, by framework); the low end for batch 32"),
        ("gradient", f"{RESNET50_PARAMS:,} parameters x 2 bytes (fp16 gradients) = {_R50_FP16 / 1e6:.1f} MB"),
        ("buckets", "2 Mi values (4 MiB in fp16) per allreduce during backward: the pack size of Neural Network "
                    "Libraries' all_reduce_callback in its distributed-training example (the paper gives none)"),
        ("algorithm", "hierarchical = 2D torus: reduce-scatter over the 4 GPUs of a node, ring allreduce between the "
                      "272 nodes on a quarter of the gradient by each GPU at once, allgather in the node (grid 4 x 272 "
                      "assumed)"),
        ("intra-node", "NVLink 2 between V100s, 2 links x 25 GB/s = 50 GB/s per pair and direction x 0.8 = 40 GB/s; "
                       "5 us per message"),
        ("inter-node", "2 x InfiniBand EDR per node = 200 Gbit/s x 0.8 = 160 Gbit/s (20 GB/s); 3 us per message "
                       "(InfiniBand with GPUDirect RDMA: 2-5 us)"),
        ("backward", "2/3 of forward+backward"),
        ("baseline", "1 GPU"),
    ),
    variations=(
        Variation("compute per 32 images", "workload", "compute_time", (("32 ms (1000 img/s)", 0.032),
                                                                       ("53 ms (600 img/s)", 0.053))),
        Variation("inter-node latency", "cluster", "inter_latency", (("2 us", 2e-6), ("5 us", 5e-6))),
        Variation("inter-node bandwidth", "cluster", "inter_bandwidth", (("60% of line", _frac(200, 0.6)),
                                                                         ("90% of line", _frac(200, 0.9)))),
        Variation("bucket", "workload", "bucket_bytes", (("16 MiB", 16 * MIB), ("one (no overlap)", _R50_FP16))),
    ),
))


def predict_preset(preset: Preset, workers: int | None = None) -> StepPrediction:
    """The prediction for a published run at its own worker count (or ``workers``)."""
    return predict_step(preset.cluster, preset.workload, workers or preset.workers, preset.baseline_workers)


def vary(preset: Preset, variation: Variation, value: object) -> Preset:
    """``preset`` with one field set to ``value``."""
    if variation.section == "cluster":
        return replace(preset, cluster=replace(preset.cluster, **{variation.field: value}))
    return replace(preset, workload=replace(preset.workload, **{variation.field: value}))


# --- measuring compute on this machine --------------------------------------------------------

def measure_compute(model_name: str, micro_batch: int, image_size: int = 224, num_classes: int = 1000,
                    iterations: int = 3) -> tuple[float, int]:
    """(median seconds of forward+backward of one micro-batch, parameter count) for a model of the zoo,
    on this machine, after one warm-up iteration."""
    import torch
    from torch.nn import functional as F

    from largebatch.models import available_models, create_model

    if model_name not in available_models():
        raise UsageError(f"--measure {model_name!r} is not a model of the zoo: use one of "
                         f"{', '.join(available_models())}")
    try:
        model = create_model(model_name, num_classes, image_size=image_size)
    except ValueError as exc:
        raise UsageError(f"--measure {model_name} with --image-size {image_size}: {exc}") from None
    model.train()
    x = torch.randn(micro_batch, 3, image_size, image_size)
    y = torch.randint(0, num_classes, (micro_batch,))
    times = []
    for i in range(iterations + 1):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        F.cross_entropy(model(x), y).backward()
        if i:
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2], sum(p.numel() for p in model.parameters())


def count_parameters(model_name: str) -> int:
    """Parameters of ``model_name`` from the zoo, for 1000 classes."""
    from largebatch.models import available_models, create_model

    if model_name not in available_models():
        raise UsageError(f"--model {model_name!r} is not a model of the zoo: use one of {', '.join(available_models())}")
    return sum(p.numel() for p in create_model(model_name, 1000).parameters())


def model_shapes(model_name: str, image_size: int = 224) -> list[list[tuple]]:
    """Shapes of the parameters of ``model_name`` from the zoo (1000 classes), in the optimizer's
    groups (biases and normalisation weights apart), built on the meta device."""
    import torch

    from largebatch.footprint import model_groups
    from largebatch.models import available_models, create_model

    if model_name not in available_models():
        raise UsageError(f"--model {model_name!r} is not a model of the zoo: use one of "
                         f"{', '.join(available_models())}")
    with torch.device("meta"):
        model = create_model(model_name, 1000, image_size=image_size)
    return model_groups(model)


def _numel(shape) -> int:
    return math.prod(shape)


# --- output -----------------------------------------------------------------------------------

def _algorithm_name(cluster: Cluster) -> str:
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
        f"gradient         {w.gradient_bytes / 1e6:.1f} MB in "
        + (f"buckets of {w.bucket_bytes / MIB:.2f} MiB" if w.fusion == "fixed"
           else f"greedy fusion up to {w.bucket_bytes / MIB:.2f} MiB every {w.cycle_time * 1e3:g} ms"),
        f"workers per node {cluster.workers_per_node}",
        f"intra-node       {cluster.intra_bandwidth / 1e9:.2f} GB/s, {cluster.intra_latency * 1e6:g} us per message",
        f"inter-node       {cluster.inter_bandwidth / 1e9:.2f} GB/s per node ({cluster.inter_bandwidth / GBIT:g} Gbit/s), "
        f"{cluster.inter_latency * 1e6:g} us per message",
        f"allreduce        {_algorithm_name(cluster)}",
    ]
    if w.shard == "optimizer":
        lines.append(f"sharding         optimizer (ZeRO-1): the allreduce, then an allgather of "
                     f"{w.parameter_bytes / 1e6:.1f} MB of updated parameters")
    elif w.shard == "full":
        lines += [f"sharding         full (ZeRO-3), in blocks of {w.bucket_bytes / MIB:.2f} MiB of gradient: "
                  f"{w.parameter_bytes / 1e6:.1f} MB of parameters",
                  f"                 all-gathered in forward and again in backward, {w.gradient_bytes / 1e6:.1f} MB "
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


TOLERANCE_POINTS = 5.0
"""How far (percentage points) a prediction may be from the published efficiency to count as matching."""


def validation_rows() -> list[tuple[Preset, StepPrediction]]:
    return [(p, predict_preset(p)) for p in PRESETS.values()]


def format_validation(rows: Sequence[tuple[Preset, StepPrediction]]) -> str:
    lines = [f"{'run':<12} {'workers':>7} {'allreduce':<30} {'predicted':>9} {'published':>9} {'difference':>11}"]
    for preset, pred in rows:
        diff = (pred.efficiency - preset.published_efficiency) * 100
        lines.append(f"{preset.name:<12} {preset.workers:>7} {_algorithm_name(preset.cluster):<30} "
                     f"{pred.efficiency:>9.1%} {preset.published_efficiency:>9.1%} {diff:>+7.1f} pts")
    return "\n".join(lines)


def format_variations(preset: Preset) -> str:
    base = predict_preset(preset).efficiency
    lines = [f"{preset.name}: predicted {base:.1%} with the inputs above, published {preset.published_efficiency:.1%}"]
    for v in preset.variations:
        outs = "   ".join(f"{label}: {predict_preset(vary(preset, v, value)).efficiency:.1%}" for label, value in v.values)
        lines.append(f"  {v.label:<24} {outs}")
    return "\n".join(lines)


def write_plot(path: str, series: Sequence[tuple[str, Sequence[StepPrediction]]],
               published: Sequence[tuple[str, int, float]] = ()) -> None:
    """Efficiency against workers (log scale), one line per series, published figures as points."""
    try:
        import matplotlib
    except ImportError:
        raise UsageError("--plot draws with matplotlib, which is not installed: pip install 'largebatch[report]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

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
    try:
        fig.savefig(path, dpi=120)
    except OSError as exc:
        raise UsageError(f"--plot {path}: cannot write it ({exc.strerror or exc})") from None
    finally:
        plt.close(fig)


def write_json(path: str, payload: dict) -> None:
    """``payload`` as indented JSON at ``path``, written atomically (--json of simulate and advise)."""
    from largebatch.fileio import write_bytes_atomic

    try:
        write_bytes_atomic((json.dumps(payload, indent=2) + "\n").encode(), path)
    except OSError as exc:
        raise UsageError(f"--json {path}: cannot write it ({exc.strerror or exc})") from None


# --- command line -----------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit status 2 through run_cli
        raise UsageError(message)


def _parse_workers(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip()
        try:
            value = int(part)
        except ValueError:
            raise UsageError(f"--workers {text!r}: {part!r} is not an integer; give a list such as 8,64,512") from None
        if value < 1:
            raise UsageError(f"--workers {text!r}: {value} is not allowed; worker counts are integers >= 1")
        out.append(value)
    return sorted(set(out))


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m largebatch.simulate", description=__doc__.split("\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog="Flags given with --preset replace the preset's values (--micro-batch does not rescale "
                       "the compute time: give --compute-ms with it). Bandwidths are the rates the collective "
                       "achieves (line rate x achievable fraction).")
    g = p.add_argument_group("what to run")
    g.add_argument("--preset", choices=sorted(PRESETS), help="a published run (see --validate)")
    g.add_argument("--validate", action="store_true",
                   help="predict the three published runs and compare with the published efficiencies")
    g.add_argument("--workers", metavar="LIST", help="comma-separated worker counts (default: 8,16,...,4096)")
    g.add_argument("--nodes", type=int, metavar="N", help="also predict N full nodes (N x --workers-per-node workers)")
    g.add_argument("--baseline-workers", type=int, metavar="B",
                   help="efficiency against B workers instead of 1 (default: 1)")
    w = p.add_argument_group("workload")
    w.add_argument("--compute-ms", type=float, metavar="MS", help="forward+backward of one micro-batch on one worker")
    w.add_argument("--measure", metavar="MODEL", help="time forward+backward of MODEL from the zoo on this machine")
    w.add_argument("--image-size", type=int, default=224, metavar="PIXELS", help="input size for --measure (default 224)")
    w.add_argument("--measure-iterations", type=int, default=3, metavar="N",
                   help="timed iterations for --measure, after one warm-up (default 3)")
    w.add_argument("--micro-batch", type=int, metavar="B", help="images per worker per micro-batch (default 32)")
    w.add_argument("--accumulation-steps", type=int, metavar="A", help="micro-batches per optimizer step (default 1)")
    w.add_argument("--model", metavar="NAME", help="gradient size from the parameters of NAME in the zoo")
    w.add_argument("--gradient-mb", type=float, metavar="MB", help="gradient size in MB (10^6 bytes)")
    w.add_argument("--params", type=float, metavar="N",
                   help="parameters of the model, e.g. 1e9: sets the gradient size and replaces --model's count "
                        "(the tensors' shapes are then not known: memory is split evenly over the workers)")
    w.add_argument("--bytes-per-value", type=int, choices=(2, 4), help="with --model/--measure/--params: 4 (fp32, "
                   "default) or 2 (fp16/bf16 gradients; with --shard full, parameters gathered in bf16)")
    w.add_argument("--shard", choices=SHARDS, help="comm.shard: none (DDP, default), optimizer (ZeRO-1) or full "
                   "(ZeRO-3, --bucket-mb per block); prints memory per worker")
    w.add_argument("--optimizer", choices=OPTIMIZERS, help="for memory per worker: sgd (default), lars, larc or lamb "
                   "(momentum 0.9)")
    w.add_argument("--backward-fraction", type=float, metavar="F", help="backward share of forward+backward (2/3)")
    w.add_argument("--bucket-mb", type=float, metavar="MIB", help="allreduce bucket in MiB (default 25)")
    w.add_argument("--fusion", choices=FUSIONS, help="fixed buckets (DDP) or greedy tensor fusion (Horovod)")
    w.add_argument("--cycle-ms", type=float, metavar="MS", help="greedy fusion: ms between looks (default 5)")
    w.add_argument("--update-ms", type=float, metavar="MS", help="per-step time after the allreduce (default 0)")
    c = p.add_argument_group("cluster")
    c.add_argument("--workers-per-node", type=int, metavar="K", help="workers in one node (default 8)")
    c.add_argument("--intra-gbit", type=float, metavar="GBIT",
                   help="achieved bandwidth between two workers of a node, Gbit/s (default 128)")
    c.add_argument("--intra-latency-us", type=float, metavar="US", help="per message inside a node (default 5)")
    c.add_argument("--inter-gbit", type=float, metavar="GBIT",
                   help="achieved network bandwidth of one node, Gbit/s (default 80)")
    c.add_argument("--inter-latency-us", type=float, metavar="US", help="per message between nodes (default 5)")
    c.add_argument("--algorithm", choices=ALGORITHMS, help="allreduce algorithm (default ring)")
    c.add_argument("--inter-algorithm", choices=INTER_ALGORITHMS, help="between nodes for hierarchical (default ring)")
    o = p.add_argument_group("output")
    o.add_argument("--plot", metavar="FILE", help="PNG of efficiency against workers (needs matplotlib)")
    o.add_argument("--json", metavar="FILE", help="the inputs and the table as JSON")
    o.add_argument("--variations", action="store_true",
                   help="with --preset or --validate: predictions with other plausible values of uncertain inputs")
    return p


_DEFAULT_CLUSTER = Cluster(workers_per_node=8, intra_bandwidth=gbit(128), intra_latency=5e-6,
                           inter_bandwidth=gbit(80), inter_latency=5e-6)


def _check(flag: str, value, *, minimum: float = 0.0, strict: bool = True, integer: bool = False) -> None:
    if value is None:
        return
    bad = not math.isfinite(value) or (value <= minimum if strict else value < minimum)
    if bad:
        kind = "an integer" if integer else "a number"
        rel = ">" if strict else ">="
        raise UsageError(f"{flag} {value:g} is not allowed: use {kind} {rel} {minimum:g}")


def _validate_args(args: argparse.Namespace) -> None:
    for flag, attr in (("--compute-ms", "compute_ms"), ("--gradient-mb", "gradient_mb"), ("--bucket-mb", "bucket_mb"),
                       ("--cycle-ms", "cycle_ms"), ("--intra-gbit", "intra_gbit"), ("--inter-gbit", "inter_gbit")):
        _check(flag, getattr(args, attr))
    for flag, attr in (("--update-ms", "update_ms"), ("--intra-latency-us", "intra_latency_us"),
                       ("--inter-latency-us", "inter_latency_us")):
        _check(flag, getattr(args, attr), strict=False)
    for flag, attr in (("--micro-batch", "micro_batch"), ("--accumulation-steps", "accumulation_steps"),
                       ("--workers-per-node", "workers_per_node"), ("--nodes", "nodes"),
                       ("--baseline-workers", "baseline_workers"), ("--image-size", "image_size"),
                       ("--measure-iterations", "measure_iterations")):
        _check(flag, getattr(args, attr), minimum=1, strict=False, integer=True)
    if args.backward_fraction is not None and not (0 < args.backward_fraction <= 1):
        raise UsageError(f"--backward-fraction {args.backward_fraction:g} is not allowed: use a number in (0, 1]")
    if args.compute_ms is not None and args.measure:
        raise UsageError("--compute-ms and --measure both give the compute time: use one")
    if args.params is not None and not (math.isfinite(args.params) and args.params >= 1
                                        and args.params == int(args.params)):
        raise UsageError(f"--params {args.params:g} is not allowed: use a whole number of parameters >= 1, e.g. 1e9")
    if args.params is not None and args.gradient_mb is not None:
        raise UsageError("--params and --gradient-mb both give the gradient size: use one")
    sources = [f for f, v in (("--model", args.model), ("--gradient-mb", args.gradient_mb)) if v is not None]
    if len(sources) > 1:
        raise UsageError(f"{' and '.join(sources)} both give the gradient size: use one")
    if args.validate and args.preset:
        raise UsageError("--validate runs every preset: leave out --preset")
    if args.validate and any(v is not None for v in (args.shard, args.params, args.optimizer)):
        raise UsageError("--validate predicts the published runs as they ran: leave out --shard, --params and "
                         "--optimizer (give them with --preset NAME instead)")
    for flag, path in (("--plot", args.plot), ("--json", args.json)):
        folder = os.path.dirname(os.path.abspath(path)) if path else None
        if folder is not None and not os.path.isdir(folder):
            raise UsageError(f"{flag} {path}: the folder {folder} does not exist")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise UsageError("--plot draws with matplotlib, which is not installed: pip install 'largebatch[report]'")


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


def _resolve(args: argparse.Namespace) -> tuple[Cluster, Workload, Preset | None, int, str | None, ModelSize]:
    """(cluster, workload, preset, baseline workers, note on how the compute time was found, model size)."""
    preset = PRESETS[args.preset] if args.preset else None
    cluster = preset.cluster if preset else _DEFAULT_CLUSTER
    note = None
    compute = args.compute_ms / 1e3 if args.compute_ms is not None else None
    micro = args.micro_batch if args.micro_batch is not None else (preset.workload.micro_batch if preset else 32)
    bytes_per_value = args.bytes_per_value or 4
    grad = args.gradient_mb * 1e6 if args.gradient_mb is not None else None
    size = ModelSize(0)
    if preset is not None:
        size = ModelSize(preset.parameters, None, f"the {preset.name} preset's model")
        if args.bytes_per_value is None:
            bytes_per_value = round(preset.workload.gradient_bytes / preset.parameters)
    if grad is not None:
        size = ModelSize(round(grad / bytes_per_value), None, f"--gradient-mb {args.gradient_mb:g} at "
                                                             f"{bytes_per_value} bytes per value")
    if args.model is not None:
        shapes = model_shapes(args.model)
        size = ModelSize(sum(_numel(t) for g in shapes for t in g), shapes, args.model)
        grad = size.parameters * bytes_per_value
    if args.measure:
        seconds, params = measure_compute(args.measure, micro, args.image_size, 1000, args.measure_iterations)
        compute = seconds
        note = (f"measured: {args.measure} forward+backward of {micro} images of {args.image_size}x{args.image_size} "
                f"on this machine, median of {args.measure_iterations}: {seconds * 1e3:.1f} ms")
        if grad is None:
            grad = params * bytes_per_value
            size = ModelSize(params, model_shapes(args.measure, args.image_size), args.measure)
    if args.params is not None:
        size = ModelSize(int(args.params), None, "--params")
        grad = size.parameters * bytes_per_value
    shard = args.shard or "none"
    gather = None
    if shard != "none" and size.parameters:
        # ZeRO-1 sends the updated fp32 weights; ZeRO-3 gathers weights in the compute dtype
        # (bytes_per_value: 2 for bf16/fp16 mixed precision) and reduce-scatters fp32 gradients.
        gather = size.parameters * (4 if shard == "optimizer" else bytes_per_value)
        if shard == "full":
            grad = size.parameters * 4
    if preset is None:
        if compute is None:
            raise UsageError("give the compute time: --compute-ms MS, --measure MODEL, or --preset NAME")
        if grad is None:
            raise UsageError("give the gradient size: --model NAME, --gradient-mb MB, --params N, --measure MODEL, "
                             "or --preset NAME")
        workload = Workload(compute_time=compute, micro_batch=micro, gradient_bytes=grad)
    else:
        workload = replace(preset.workload, micro_batch=micro)
        if compute is not None:
            workload = replace(workload, compute_time=compute)
        if grad is not None:
            workload = replace(workload, gradient_bytes=grad)
    workload = replace(workload, shard=shard, gather_bytes=gather)
    w_over = {"accumulation_steps": args.accumulation_steps, "backward_fraction": args.backward_fraction,
              "bucket_bytes": args.bucket_mb * MIB if args.bucket_mb is not None else None, "fusion": args.fusion,
              "cycle_time": args.cycle_ms / 1e3 if args.cycle_ms is not None else None,
              "update_time": args.update_ms / 1e3 if args.update_ms is not None else None}
    c_over = {"workers_per_node": args.workers_per_node,
              "intra_bandwidth": gbit(args.intra_gbit) if args.intra_gbit is not None else None,
              "intra_latency": args.intra_latency_us * 1e-6 if args.intra_latency_us is not None else None,
              "inter_bandwidth": gbit(args.inter_gbit) if args.inter_gbit is not None else None,
              "inter_latency": args.inter_latency_us * 1e-6 if args.inter_latency_us is not None else None,
              "algorithm": args.algorithm, "inter_algorithm": args.inter_algorithm}
    try:
        workload = replace(workload, **{k: v for k, v in w_over.items() if v is not None})
        cluster = replace(cluster, **{k: v for k, v in c_over.items() if v is not None})
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    baseline = args.baseline_workers or (preset.baseline_workers if preset else 1)
    return cluster, workload, preset, baseline, note, size


def _run_validate(args: argparse.Namespace) -> int:
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
    workers = _parse_workers(args.workers) if args.workers else list(DEFAULT_WORKERS)
    series = []
    for preset, _ in rows:
        counts = sorted(set(p for p in workers if _fits(preset.cluster, p)) | {preset.workers})
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


_OVERRIDES = ("compute_ms", "measure", "micro_batch", "accumulation_steps", "model", "gradient_mb", "backward_fraction",
              "bucket_mb", "fusion", "cycle_ms", "update_ms", "workers_per_node", "intra_gbit", "intra_latency_us",
              "inter_gbit", "inter_latency_us", "algorithm", "inter_algorithm", "baseline_workers", "params", "shard")


def _overrides(args: argparse.Namespace) -> bool:
    return any(getattr(args, name) is not None for name in _OVERRIDES)


def _fits(cluster: Cluster, workers: int) -> bool:
    k = cluster.workers_per_node
    return workers <= k or workers % k == 0


def model_footprints(size: ModelSize, workers: int, optimizer: str,
                     accumulation_steps: int = 1) -> dict[str, Footprint]:
    """Bytes per worker under each comm.shard mode: from the tensors' shapes where known, else
    the parameter count split evenly."""
    if size.shapes is not None:
        return footprints(size.shapes, workers, optimizer, 0.9, accumulation_steps)
    return even_footprints(size.parameters, workers, optimizer, 0.9, accumulation_steps)


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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _validate_args(args)
    if args.validate:
        return _run_validate(args)
    if args.variations and not args.preset:
        raise UsageError("--variations needs --preset NAME or --validate")
    cluster, workload, preset, baseline, note, size = _resolve(args)
    if args.workers:
        workers = _parse_workers(args.workers)
    else:
        workers = default_workers(cluster.workers_per_node)
    mark = None
    if args.nodes:
        mark = args.nodes * cluster.workers_per_node
        workers = sorted(set(workers) | {mark})
    elif preset is not None and not args.workers:
        mark = preset.workers
        workers = sorted(set(workers) | {mark})
    for p in workers + [baseline]:
        if not _fits(cluster, p):
            k = cluster.workers_per_node
            raise UsageError(f"{p} workers do not fill whole nodes of {k}: use a multiple of {k} "
                             f"(e.g. {max(k, p // k * k)} or {(p // k + 1) * k}) or at most {k}")
    rows = sweep(cluster, workload, workers, baseline)
    with_memory = any(v is not None for v in (args.shard, args.params, args.optimizer))
    optimizer = args.optimizer or "sgd"
    memory_at = mark or max(workers)
    per_worker = {p: model_footprints(size, p, optimizer, workload.accumulation_steps) for p in workers} \
        if with_memory else {}
    if preset is not None:
        print(f"{preset.name}: {preset.title}")
        print(f"published: {preset.published_efficiency:.2%} at {preset.workers} workers; {preset.published_source}")
        print("inputs and where they come from:")
        for key, value in preset.inputs:
            print(f"  {key + ':':<12} {value}")
        print()
        print("in effect" + (" (command-line flags replace the preset's values):" if _overrides(args) else ":"))
    if note:
        print(note)
    for line in describe(cluster, workload, baseline):
        print(("  " if preset is not None else "") + line)
    if with_memory:
        print()
        for line in memory_lines(size, memory_at, optimizer, workload.shard, per_worker[memory_at]):
            print(line)
    print()
    print(format_table(rows, mark, {p: f[workload.shard].total for p, f in per_worker.items()} or None,
                       collectives=workload.shard != "none"))
    if preset is not None and args.variations:
        print()
        print(format_variations(preset))
    if args.plot:
        published = [(preset.name, preset.workers, preset.published_efficiency)] if preset else []
        write_plot(args.plot, [(preset.name if preset else "prediction", rows)], published)
        print(f"\nwrote {args.plot}")
    if args.json:
        payload = {"preset": preset.name if preset else None, "cluster": asdict(cluster),
                   "workload": asdict(workload), "baseline_workers": baseline, "rows": [asdict(r) for r in rows]}
        if with_memory:
            payload["memory"] = {"parameters": size.parameters, "optimizer": optimizer, "shard": workload.shard,
                                 "exact_shapes": size.shapes is not None,
                                 "per_worker": {str(p): {m: {**asdict(f), "total": f.total} for m, f in fs.items()}
                                                for p, fs in per_worker.items()}}
        write_json(args.json, payload)
        print(f"wrote {args.json}")
    return 0


def cli() -> None:
    """Console-script entry point."""
    run_cli(main)


if __name__ == "__main__":
    cli()
