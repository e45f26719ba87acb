"""The advice's choices: every (workers, global batch) with its predicted steps, step time, wall time
and cost, the fastest and the cheapest of them, and the assumptions they rest on.

**Time per step** comes from the simulator (:func:`largebatch.scaling.predict.predict_step`) for each
worker count; a per-worker batch above the micro-batch runs as accumulation steps. **Wall time** is
steps x step time, and **cost** nodes x wall hours x the price of a node-hour (without a price, in
node-hours).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional, Sequence

from largebatch.batching import check_trainable_batch, plan, plan_warning
from largebatch.errors import UsageError
from largebatch.scaling.model import Cluster, Workload
from largebatch.scaling.predict import predict_step
from largebatch.scaling.steps import StepsModel

__all__ = ["ASSUMPTIONS", "TWO_RUN_ASSUMPTIONS", "assumptions", "BATCH_SPAN", "Choice", "choices", "recommendable", "fastest", "cheapest",
           "default_batches"]

ASSUMPTIONS = (
    "B_crit = B_simple: the simple noise scale (per-image gradient variance / squared gradient) stands in for "
    "the critical batch; it leaves out the curvature, and McCandlish et al. find the two within a small factor",
    "every batch trains at a well-tuned learning rate and schedule: the model is the best each batch can do, "
    "and a fixed scaling rule (linear, LARS, LAMB) with warmup only approaches it",
    "S(B) = S_min(1 + B_crit/B), applied epoch by epoch of the measured run with that epoch's noise scale: "
    "steps trade for images as S/S_min - 1 = (E/E_min - 1)^-1",
    "the target is the measured run's (its loss at its end, or --target-accuracy); generalisation at large "
    "batch is not modelled: a batch that reaches the training loss is taken to reach the accuracy",
    "time per step from the simulator's alpha-beta model; compute time grows linearly with the micro-batch, "
    "and a per-worker batch above the micro-batch runs as accumulation steps",
    "cost = whole nodes x wall hours x price: start-up, evaluation and checkpoints are left out, and a "
    "node is paid for whole even when fewer workers than it holds are used",
    "BatchNorm statistics change with the per-worker batch; the noise scale is measured with the run's",
)
"""What the advice from one run's noise scale rests on, printed with it."""

TWO_RUN_ASSUMPTIONS = (
    "B_crit from two runs: S_min and B_crit are solved from the steps two runs at different global batches took "
    "to the same target, so both lie on the curve; the first run's noise scale only sets crit_factor",
    ASSUMPTIONS[1],
    "S(B) = S_min(1 + B_crit/B) through both measured runs: steps trade for images as S/S_min - 1 = "
    "(E/E_min - 1)^-1, and batches outside the two runs' are extrapolated along it",
    *ASSUMPTIONS[3:],
)
"""What the advice from two runs rests on, printed with it."""


def assumptions(method: str) -> tuple:
    """The assumptions of a :class:`StepsModel` found by ``method`` ('noise scale' or 'two runs')."""
    return TWO_RUN_ASSUMPTIONS if method == "two runs" else ASSUMPTIONS

BATCH_SPAN = 64
"""Default global batches: powers of two from a quarter of the measured batch to this many times it
(at least 16 B_crit), at most the training set."""


@dataclass(frozen=True)
class Choice:
    """One (workers, global batch) and what it is predicted to take."""

    global_batch: int
    workers: int
    nodes: int
    per_worker_batch: int
    micro_batch: int
    accum_steps: int
    steps: float
    step_time: float
    """Seconds per optimizer step (the simulator)."""
    wall_s: float
    node_hours: float
    cost: Optional[float]
    """node_hours x price, where a price is known."""
    refused: bool = False
    """Training refuses this plan (micro-batches of one image through BatchNorm)."""
    warning: Optional[str] = None
    """The line training refuses it with, or warns about it with (micro-batches too small for
    sensible BatchNorm statistics and fast steps); None for a plan training takes silently."""


def choices(model: StepsModel, cluster: Cluster, workload: Workload, workers: Sequence[int], batches: Sequence[int],
            price: Optional[float], has_batchnorm: bool = True) -> list[Choice]:
    """Every (workers, batch) that splits evenly and fills whole nodes, with its predicted steps,
    step time (``workload.compute_time`` is for ``workload.micro_batch`` images, the largest
    micro-batch, which training would take as train.max_micro_batch), wall time and cost, and what
    training says of its batch plan (the trainer's own checks, for a model with BatchNorm layers
    where ``has_batchnorm``)."""
    out = []
    for batch in batches:
        steps = model.steps(batch)
        for n in workers:
            if batch % n or not cluster.fits(n):
                continue
            p = plan(batch, n, workload.micro_batch)
            refused, warning = False, plan_warning(p, workload.micro_batch)
            try:
                check_trainable_batch(p, has_batchnorm, workload.micro_batch)
            except UsageError as exc:
                refused, warning = True, str(exc)
            work = replace(workload, compute_time=workload.compute_time * p.micro_batch / workload.micro_batch,
                           micro_batch=p.micro_batch, accumulation_steps=p.accum_steps)
            pred = predict_step(cluster, work, n)
            wall = steps * pred.step_time
            hours = pred.nodes * wall / 3600.0
            out.append(Choice(global_batch=batch, workers=n, nodes=pred.nodes, per_worker_batch=p.per_worker_batch,
                              micro_batch=p.micro_batch, accum_steps=p.accum_steps, steps=steps,
                              step_time=pred.step_time, wall_s=wall, node_hours=hours,
                              cost=None if price is None else hours * price, refused=refused, warning=warning))
    return out


def recommendable(rows: Sequence[Choice]) -> list[Choice]:
    """The choices the fastest and the cheapest are picked from: those training takes without a
    warning; where there are none, those it takes with one. Never one that training refuses."""
    clean = [c for c in rows if c.warning is None]
    return clean or [c for c in rows if not c.refused]


def fastest(rows: Sequence[Choice]) -> Choice:
    """The choice with the shortest wall time (the fewest node-hours among equals)."""
    return min(rows, key=lambda c: (c.wall_s, c.node_hours))


def cheapest(rows: Sequence[Choice]) -> Choice:
    """The choice with the fewest node-hours (the shortest wall time among equals)."""
    return min(rows, key=lambda c: (c.node_hours, c.wall_s))


def default_batches(model: StepsModel, num_train: int) -> list[int]:
    """Powers of two from a quarter of the measured batch to BATCH_SPAN times it (at least 16 B_crit),
    at most the training set."""
    lo = max(1, 2 ** math.floor(math.log2(max(model.measured_batch / 4, 1))))
    hi = max(model.measured_batch * BATCH_SPAN, 16 * model.b_crit)
    hi = min(hi, num_train)
    out, b = [], lo
    while b <= hi:
        out.append(b)
        b *= 2
    return out or [model.measured_batch]

