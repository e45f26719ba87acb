"""The steps a run needs against its global batch: McCandlish et al.'s model, fitted to a measured run.

**Steps** (McCandlish, Kaplan, Amodei et al. 2018, "An Empirical Model of Large-Batch Training",
arXiv:1812.06162, eq. 2.11): the steps ``S`` and images ``E = S·B`` needed to reach a given loss
trade off as ``S/S_min − 1 = (E/E_min − 1)^−1``, i.e. ``S(B) = S_min·(1 + B_crit/B)`` with
``B_crit = E_min/S_min``, and the critical batch ``B_crit`` is about the simple noise scale
``B_simple``. The noise scale grows as the loss falls, so the model is applied per epoch of the
measured run: an epoch that took ``ΔS`` steps at batch ``B0`` with noise scale ``B_k`` would take
``ΔS·(1 + B_k/B)/(1 + B_k/B0)`` steps at batch ``B``. The sum over the epochs is again
``S_min·(1 + B_crit/B)``, with ``S_min = Σ ΔS/(1 + B_k/B0)`` and ``B_crit`` the ``S_min``-weighted
mean of the ``B_k``.

:func:`knee` and :func:`fit_curve` read the critical batch off steps measured at several batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

__all__ = ["Segment", "StepsModel", "steps_model", "knee", "fit_curve"]


@dataclass(frozen=True)
class Segment:
    """A stretch of the measured run (an epoch, or its part up to the target)."""

    steps: float
    """Optimizer steps the run took in it."""
    batch: int
    """The run's global batch in it."""
    noise_scale: float
    """B_simple measured over it, in images."""


@dataclass(frozen=True)
class StepsModel:
    """``S(B) = S_min·(1 + B_crit/B)`` fitted to a measured run."""

    s_min: float
    """Steps an infinitely large batch would need."""
    b_crit: float
    """The critical batch in images: ``E_min / S_min``."""
    measured_batch: int
    """The run's global batch (its first, with phases)."""
    measured_steps: float
    """The steps the run took to its target."""

    @property
    def e_min(self) -> float:
        """Images an infinitely small batch would need."""
        return self.s_min * self.b_crit

    def steps(self, batch: float) -> float:
        return self.s_min * (1.0 + self.b_crit / batch)

    def images(self, batch: float) -> float:
        return self.steps(batch) * batch


def steps_model(segments: Sequence[Segment]) -> StepsModel:
    """The model of :func:`steps` from the measured segments (see the module's text)."""
    if not segments:
        raise ValueError("no measured steps")
    for s in segments:
        if not (s.steps >= 0 and s.batch >= 1 and s.noise_scale > 0 and math.isfinite(s.noise_scale)):
            raise ValueError(f"a segment needs steps >= 0, a batch >= 1 and a noise scale > 0, got {s}")
    ideal = [s.steps / (1.0 + s.noise_scale / s.batch) for s in segments]
    s_min = sum(ideal)
    if s_min <= 0:
        raise ValueError("the measured segments hold no steps")
    b_crit = sum(a * s.noise_scale for a, s in zip(ideal, segments)) / s_min
    return StepsModel(s_min=s_min, b_crit=b_crit, measured_batch=segments[0].batch,
                      measured_steps=sum(s.steps for s in segments))


def knee(batches: Sequence[int], steps: Sequence[float], ratio: float = 0.75) -> Optional[float]:
    """The batch where doubling it stops nearly halving the steps: where ``S(2B)/S(B)`` first rises to
    ``ratio`` (0.75 at ``B = B_crit`` in the model), interpolated in log2(B). Needs batches that
    double from one to the next; None if the ratio never reaches ``ratio``."""
    pairs = [(b, s) for b, s in zip(batches, steps) if s is not None]
    ratios = []
    for (b1, s1), (b2, s2) in zip(pairs, pairs[1:]):
        if b2 != 2 * b1:
            raise ValueError(f"knee() needs batches that double, got {b1} then {b2}")
        ratios.append((b1, s2 / s1))
    for i, (b, r) in enumerate(ratios):
        if r >= ratio:
            if i == 0:
                return float(b)
            b0, r0 = ratios[i - 1]
            t = (ratio - r0) / (r - r0)
            return 2.0 ** (math.log2(b0) + t * (math.log2(b) - math.log2(b0)))
    return None


def fit_curve(batches: Sequence[int], steps: Sequence[float]) -> StepsModel:
    """Least-squares fit of ``S = S_min(1 + B_crit/B)`` to measured (batch, steps), in relative error:
    the measured knee's model form (``S·B`` against ``B`` is a line: ``E = E_min + S_min·B``)."""
    pts = [(b, s) for b, s in zip(batches, steps) if s is not None]
    if len(pts) < 2:
        raise ValueError("a fit needs two measured batches")
    # weighted linear regression of S on 1/B with weights 1/S² (relative errors)
    w = [1.0 / s ** 2 for _, s in pts]
    x = [1.0 / b for b, _ in pts]
    y = [s for _, s in pts]
    sw = sum(w)
    mx = sum(wi * xi for wi, xi in zip(w, x)) / sw
    my = sum(wi * yi for wi, yi in zip(w, y)) / sw
    sxx = sum(wi * (xi - mx) ** 2 for wi, xi in zip(w, x))
    sxy = sum(wi * (xi - mx) * (yi - my) for wi, xi, yi in zip(w, x, y))
    slope = sxy / sxx if sxx > 0 else 0.0  # = S_min·B_crit = E_min
    s_min = my - slope * mx
    if s_min <= 0:
        raise ValueError("the measured steps do not level off: no S_min > 0 fits them")
    return StepsModel(s_min=s_min, b_crit=max(slope, 0.0) / s_min, measured_batch=pts[0][0],
                      measured_steps=pts[0][1])

