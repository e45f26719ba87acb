"""Step prediction: the timeline of one optimizer step at a worker count, sweeps over worker
counts, the published runs' predictions and the memory each worker holds.

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

import math
from dataclasses import dataclass, replace
from typing import Sequence

from largebatch.errors import UsageError
from largebatch.footprint import Footprint, even_footprints, footprints
from largebatch.scaling.costs import allreduce_time, gather_time
from largebatch.scaling.model import Cluster, ModelSize, StepPrediction, Workload
from largebatch.scaling.presets import PRESETS, Preset, Variation

__all__ = ["PresetStepTime", "preset_step_time", "comm_timeline", "shard_timeline", "predict_step", "sweep", "predict_preset", "vary", "TOLERANCE_POINTS",
           "validation_rows", "model_footprints"]

TOLERANCE_POINTS = 5.0
"""How far (percentage points) a prediction may be from the published efficiency to count as matching."""


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


def predict_preset(preset: Preset, workers: int | None = None) -> StepPrediction:
    """The prediction for a published run at its own worker count (or ``workers``)."""
    return predict_step(preset.cluster, preset.workload, workers or preset.workers, preset.baseline_workers)


def vary(preset: Preset, variation: Variation, value: object) -> Preset:
    """``preset`` with one field set to ``value``."""
    if variation.section == "cluster":
        return replace(preset, cluster=replace(preset.cluster, **{variation.field: value}))
    return replace(preset, workload=replace(preset.workload, **{variation.field: value}))


def validation_rows() -> list[tuple[Preset, StepPrediction]]:
    return [(p, predict_preset(p)) for p in PRESETS.values()]


def model_footprints(size: ModelSize, workers: int, optimizer: str,
                     accumulation_steps: int = 1) -> dict[str, Footprint]:
    """Bytes per worker under each comm.shard mode: from the tensors' shapes where known, else
    the parameter count split evenly."""
    if size.shapes is not None:
        return footprints(size.shapes, workers, optimizer, 0.9, accumulation_steps)
    return even_footprints(size.parameters, workers, optimizer, 0.9, accumulation_steps)




@dataclass(frozen=True)
class PresetStepTime:
    """Seconds per step of a global batch on the cluster of a preset (the adaptive batch's
    ``adaptive.time_model=preset:NAME``): each of ``workers`` workers takes ``global batch /
    workers`` images, as one micro-batch where that is at most ``micro_batch``, else as micro-batches
    of ``micro_batch`` (the last one's backward pass overlapping the allreduce); compute time scales
    linearly with the images from the preset's own micro-batch."""

    name: str
    workers: int
    micro_batch: int

    @property
    def source(self) -> str:
        return f"preset {self.name} at {self.workers} workers"

    def __call__(self, batch: int) -> float:
        preset = PRESETS[self.name]
        w = preset.workload
        per_worker = max(1, math.ceil(batch / self.workers))
        micro = min(per_worker, self.micro_batch)
        accum = math.ceil(per_worker / micro)
        work = replace(w, compute_time=w.compute_time * micro / w.micro_batch, micro_batch=micro,
                       accumulation_steps=accum)
        return predict_step(preset.cluster, work, self.workers).step_time

    def state_dict(self) -> dict:
        return dict(name=self.name, workers=self.workers, micro_batch=self.micro_batch, source=self.source)


def preset_step_time(name: str, workers: int | None, micro_batch: int) -> PresetStepTime:
    """The step-time model of preset ``name`` at ``workers`` workers (None: the preset's own), or a
    one-line UsageError for an unknown preset or a worker count that does not fill whole nodes."""
    preset = PRESETS.get(name)
    if preset is None:
        raise UsageError(f"adaptive.time_model=preset:{name} names no preset; use one of "
                         + ", ".join(f"preset:{p}" for p in PRESETS) + " (python -m largebatch.simulate --validate)")
    n = workers or preset.workers
    if not preset.cluster.fits(n):
        raise UsageError(f"adaptive.preset_workers={n} does not fill whole nodes of preset {name} "
                         f"({preset.cluster.workers_per_node} per node); use a multiple of it or fewer than one node")
    return PresetStepTime(name, n, micro_batch)
