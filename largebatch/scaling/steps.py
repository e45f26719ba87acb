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

**Two runs** (:func:`two_run_model`): the steps ``S1``, ``S2`` two runs at batches ``B1 < B2`` took to
the same target fix both constants without the noise scale: the images ``E = S·B = S_min·B + E_min``
are a line in ``B``, so ``S_min = (S2·B2 − S1·B1)/(B2 − B1)`` and
``B_crit = B1·B2·(S1 − S2)/(S2·B2 − S1·B1)``. They fit the model only where the larger batch took
fewer steps (``S2 < S1``, else ``B_crit <= 0``) and more images (``S2·B2 > S1·B1``, else
``S_min <= 0``). :func:`crit_factor` is that ``B_crit`` over the first run's noise scale, the
factor ``adaptive.crit_factor`` takes.

The efficiency a model implies, images at its measured batch one image at ``B`` is worth, is
:func:`largebatch.goodput.efficiency`, the formula the adaptive global batch uses;
:meth:`StepsModel.steps` is the measured steps carried to ``B`` with it.

:func:`knee` and :func:`fit_curve` read the critical batch off steps measured at several batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

from largebatch.goodput import efficiency

__all__ = ["Segment", "StepsModel", "steps_model", "two_run_model", "crit_factor", "knee", "fit_curve"]


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
    method: str = "noise scale"
    """How ``b_crit`` was found: 'noise scale' (one run's B_simple), 'two runs' (:func:`two_run_model`)
    or 'fit' (:func:`fit_curve`)."""

    @property
    def e_min(self) -> float:
        """Images an infinitely small batch would need."""
        return self.s_min * self.b_crit

    def efficiency(self, batch: float) -> float:
        """Images at the measured batch one image at ``batch`` is worth:
        :func:`largebatch.goodput.efficiency` with this model's ``b_crit``."""
        return efficiency(batch, self.b_crit, self.measured_batch)

    def steps(self, batch: float) -> float:
        """Steps to the target at ``batch``: the images at the measured batch over the efficiency,
        ``S(B0)·B0 / (B·efficiency(B))``, which is ``S_min·(1 + B_crit/B)``."""
        b0 = self.measured_batch
        return self.s_min * (1.0 + self.b_crit / b0) * b0 / (batch * self.efficiency(batch))

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


def two_run_model(batch1: int, steps1: float, batch2: int, steps2: float) -> StepsModel:
    """``S_min`` and ``B_crit`` from two runs to the same target, ``steps1`` at ``batch1`` and
    ``steps2`` at ``batch2`` (in either order): both runs lie on the curve. ValueError (one line)
    where the two do not fit the model (see the module's text)."""
    for name, value in (("batch", batch1), ("batch", batch2), ("steps", steps1), ("steps", steps2)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"two runs need batches and steps > 0, got {value!r} {name}")
    if batch1 == batch2:
        raise ValueError(f"the two runs have the same global batch {batch1}: the second needs a larger one "
                         "(e.g. 8 times the first)")
    (b1, s1), (b2, s2) = sorted([(batch1, steps1), (batch2, steps2)])
    if s2 >= s1:
        raise ValueError(f"the run at batch {b2} took {s2:.4g} steps, not fewer than the {s1:.4g} at batch {b1}: "
                         "no critical batch fits (the larger batch did not help); the runs' learning rates may not "
                         "be tuned, or the target is too easy")
    if s2 * b2 <= s1 * b1:
        raise ValueError(f"the run at batch {b2} took {s2 * b2:,.0f} images, no more than the {s1 * b1:,.0f} at "
                         f"batch {b1}: the steps fell at least as fast as the batch grew, so no finite critical "
                         "batch fits; use a second batch further above the first")
    s_min = (s2 * b2 - s1 * b1) / (b2 - b1)
    b_crit = b1 * b2 * (s1 - s2) / (s2 * b2 - s1 * b1)
    return StepsModel(s_min=s_min, b_crit=b_crit, measured_batch=b1, measured_steps=s1, method="two runs")


def crit_factor(two_runs: StepsModel, noise: StepsModel) -> float:
    """``B_crit`` of :func:`two_run_model` over the ``S_min``-weighted noise scale of
    :func:`steps_model` on the first run: the factor ``adaptive.crit_factor`` multiplies the measured
    noise scale by."""
    if not noise.b_crit > 0:
        raise ValueError(f"the measured noise scale is {noise.b_crit!r}: no factor to it")
    return two_runs.b_crit / noise.b_crit


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
                      measured_steps=pts[0][1], method="fit")

