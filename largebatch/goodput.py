"""Goodput: which global batch reaches a target soonest, from the noise scale and the time per step.

The efficiency model, shared by the adaptive global batch (:mod:`largebatch.engine.adaptive`) and
``python -m largebatch.advise`` (:mod:`largebatch.scaling.steps`):

McCandlish, Kaplan, Amodei et al., "An Empirical Model of Large-Batch Training" (arXiv:1812.06162),
eq. 2.11: the optimizer steps to a target at global batch ``B`` are ``S(B) = S_min (1 + B_crit/B)``
and the images ``E(B) = E_min (1 + B/B_crit)``. Against a reference batch ``B0``, one image at
batch ``B`` is worth

    efficiency(B) = E(B0) / E(B) = (B_crit + B0) / (B_crit + B)

images at ``B0`` (Qiao et al., "Pollux", OSDI 2021, with ``φ = B_crit``). With ``T(B)`` the seconds
per step, the progress per second is the **goodput**

    goodput(B) = throughput(B) x efficiency(B) = (B / T(B)) x (B_crit + B0) / (B_crit + B)

and the batch with the largest goodput is the one whose ``S(B) T(B)`` (time to the target) is
smallest. AdaScale (Johnson, Agrawal, Gu & Guestrin, ICML 2020) takes one step at ``B = s B0`` as
worth ``gain = s x efficiency(B)`` steps at ``B0``, and scales the learning rate by that gain.

Everything here is a pure function of its arguments: every worker that calls :func:`decide` with
the same agreed estimates takes the same decision.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence

__all__ = ["efficiency", "adascale_gain", "ladder", "StepTime", "Candidate", "Decision", "decide"]


def _check(name: str, value: float, minimum: float = 0.0, strict: bool = True) -> None:
    ok = isinstance(value, (int, float)) and math.isfinite(value) and (value > minimum if strict else value >= minimum)
    if not ok:
        raise ValueError(f"{name}={value!r} is not allowed: use a finite number {'>' if strict else '>='} {minimum}")


def efficiency(batch: float, b_crit: float, base_batch: float) -> float:
    """Images at ``base_batch`` that one image at ``batch`` is worth: ``(B_crit + B0) / (B_crit + B)``
    (1 at ``base_batch``; ``base_batch / batch`` where the noise scale is 0, near 1 where it is large)."""
    _check("batch", batch)
    _check("base_batch", base_batch)
    _check("b_crit", b_crit, strict=False)
    return (b_crit + base_batch) / (b_crit + batch)


def adascale_gain(batch: float, b_crit: float, base_batch: float) -> float:
    """AdaScale's gain ``r = (B/B0) x efficiency(B)``: steps at ``base_batch`` one step at ``batch`` is
    worth, between 1 (no noise) and ``B/B0`` (noise only). Equal to AdaScale's
    ``(σ² + |G|²) / (σ²/s + |G|²)`` with ``σ² = tr(Σ)/B0``, ``s = B/B0`` and ``B_crit = tr(Σ)/|G|²``."""
    return batch / base_batch * efficiency(batch, b_crit, base_batch)


def ladder(min_batch: int, max_batch: int) -> list[int]:
    """The global batches the adaptive batch chooses from: ``min_batch`` doubled while it stays at most
    ``max_batch``."""
    if not (isinstance(min_batch, int) and isinstance(max_batch, int) and 1 <= min_batch <= max_batch):
        raise ValueError(f"the batch range needs integers 1 <= min <= max, got {min_batch!r}..{max_batch!r}")
    out = [min_batch]
    while out[-1] * 2 <= max_batch:
        out.append(out[-1] * 2)
    return out


@dataclass(frozen=True)
class StepTime:
    """Seconds per optimizer step on ``workers`` workers whose micro-batches hold ``micro_batch``
    images: ``fixed_s + per_micro_batch_s x accumulation steps``, the accumulation steps being
    ``global batch / (workers x micro_batch)``. ``fixed_s`` holds what a step costs whatever its batch
    (the gradient allreduce, the update), ``per_micro_batch_s`` one micro-batch's forward and
    backward pass on one worker."""

    fixed_s: float
    per_micro_batch_s: float
    micro_batch: int
    workers: int
    source: str = "measured"
    """Where the numbers come from, for the header and metrics.jsonl."""

    def __post_init__(self):
        _check("fixed_s", self.fixed_s, strict=False)
        _check("per_micro_batch_s", self.per_micro_batch_s)
        if not (isinstance(self.micro_batch, int) and self.micro_batch >= 1 and isinstance(self.workers, int)
                and self.workers >= 1):
            raise ValueError(f"micro_batch and workers must be integers >= 1, got {self.micro_batch!r}, "
                             f"{self.workers!r}")

    def accum_steps(self, batch: int) -> float:
        return batch / (self.workers * self.micro_batch)

    def __call__(self, batch: int) -> float:
        return self.fixed_s + self.per_micro_batch_s * self.accum_steps(batch)

    def state_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Candidate:
    """One global batch as :func:`decide` weighed it."""

    global_batch: int
    step_time: float
    """Seconds per step."""
    throughput: float
    """Images per second: global_batch / step_time."""
    efficiency: float
    """Images at the smallest batch one image here is worth."""
    goodput: float
    """throughput x efficiency: images at the smallest batch per second."""

    def fields(self) -> dict:
        return dict(global_batch=self.global_batch, step_time_s=self.step_time, throughput=self.throughput,
                    efficiency=self.efficiency, goodput=self.goodput)


@dataclass(frozen=True)
class Decision:
    """What :func:`decide` chose and why."""

    global_batch: int
    """The batch to train at from now on."""
    previous: int
    b_crit: Optional[float]
    """The critical batch the choice rests on (None: no estimate yet; the batch is kept)."""
    candidates: tuple
    """:class:`Candidate` per batch of the ladder (empty without an estimate)."""
    reason: str
    """One line: why this batch."""

    @property
    def changed(self) -> bool:
        return self.global_batch != self.previous


def decide(batches: Sequence[int], current: int, b_crit: Optional[float], step_time: Callable[[int], float],
           min_gain: float = 0.02) -> Decision:
    """The batch of ``batches`` with the largest goodput for the critical batch ``b_crit`` and the
    seconds per step ``step_time(batch)``, efficiency taken against the smallest of ``batches``.
    The current batch is kept unless another one's goodput is more than ``min_gain`` (a fraction)
    above it, so that estimates near a tie do not switch the batch back and forth; without an
    estimate (``b_crit`` None or not finite) it is kept as well."""
    batches = sorted(batches)
    if current not in batches:
        raise ValueError(f"the current batch {current} is not one of {batches}")
    if b_crit is None or not math.isfinite(b_crit) or b_crit < 0:
        return Decision(current, current, None, (), "no noise-scale estimate yet: the batch is kept")
    base = batches[0]
    rows = []
    for b in batches:
        t = step_time(b)
        e = efficiency(b, b_crit, base)
        rows.append(Candidate(b, t, b / t, e, b / t * e))
    by_batch = {c.global_batch: c for c in rows}
    best = max(rows, key=lambda c: (c.goodput, -c.global_batch))
    now = by_batch[current]
    if best.global_batch != current and best.goodput > now.goodput * (1.0 + min_gain):
        choice = best.global_batch
        reason = (f"goodput {best.goodput:.4g} at {choice} against {now.goodput:.4g} at {current} "
                  f"(B_crit {b_crit:.4g}: efficiency {best.efficiency:.3f} against {now.efficiency:.3f})")
    else:
        choice = current
        reason = (f"{current} kept: goodput {now.goodput:.4g}, best elsewhere {best.goodput:.4g} at "
                  f"{best.global_batch} (B_crit {b_crit:.4g})" if best.global_batch != current else
                  f"{current} kept: the largest goodput ({now.goodput:.4g}; B_crit {b_crit:.4g})")
    return Decision(choice, current, b_crit, tuple(rows), reason)
