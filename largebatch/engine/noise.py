"""The gradient noise scale, measured while training (``train.noise_scale``).

McCandlish, Kaplan, Amodei et al., "An Empirical Model of Large-Batch Training" (arXiv:1812.06162),
section 2.2 and appendix A.1. For a batch of ``b`` images drawn at random from the training set,
the squared norm of its mean gradient ``G_b`` has the expectation::

    E |G_b|² = |G|² + tr(Σ) / b

where ``G`` is the gradient of the loss over the whole training set and ``Σ`` the covariance of
the per-image gradients. Two batch sizes ``b < B`` seen in the same step give unbiased estimates
of both terms::

    |G|²  ≈ (B·|G_B|² − b·|G_b|²) / (B − b)
    tr(Σ) ≈ (|G_b|² − |G_B|²) / (1/b − 1/B)

and the simple noise scale ``B_simple = tr(Σ) / |G|²``, the batch at which the gradient's noise
and its signal are equal; McCandlish et al. find the critical batch ``B_crit ≈ B_simple``.

Where the two sizes come from (:class:`NoiseSource`):

- ``workers`` (several workers): ``b`` is the per-worker batch and ``|G_b|²`` the squared norm of
  this worker's gradient before the allreduce, summed over DDP's gradient buckets by the
  communication hook of :mod:`largebatch.distributed.noise_hook`; ``B`` is the global batch and
  ``|G_B|²`` the squared norm of the averaged gradient the optimizer sees. The workers' batches
  are disjoint slices of one random global batch, so each is itself a random batch of ``b``.
- ``micro-batches`` (one worker with accumulation steps ``A >= 2``): ``b`` is the micro-batch and
  ``B`` the per-worker batch (= the global batch). Each micro-batch's loss is
  ``sum of per-image losses / B``, so after the first micro-batch's backward the gradient holds
  ``(b / B)·G_b = G_b / A``, and ``|G_b|² = A²·|grad after the first micro-batch|²``
  (:func:`first_micro_batch_sq_norm`). The first micro-batch is a random ``b``-image subset of a
  random ``B``-image batch, so the expectations above, and the two estimates, hold unchanged.

One worker without accumulation sees one batch size only and cannot measure it.

Sampling without replacement (an epoch is a permutation of the ``n`` training images): with
``tr(Σ)`` taken as the sum of per-image gradient variances with the ``1/(n−1)`` normalisation,
``E |G_b|² = |G|² + tr(Σ)·(1/b − 1/n)``; the ``−1/n`` term cancels in both estimates, which then
target ``tr(Σ)`` exactly and ``|G|² − tr(Σ)/n`` (a bias of ``1/n`` of the variance, negligible
for a training set much larger than the noise scale).

Smoothing. Each worker keeps, on the device, exponential averages over steps of its per-step
estimates of ``|G|²`` and ``tr(Σ)`` (``EMA_BETA`` per step, about the last 100 steps; bias-corrected,
so the first steps are a plain mean), and the noise scale is the ratio of the two averages, not
an average of ratios, which single noisy steps would dominate. Both estimates are linear in
``|G_b|²``, so summing the workers' averages once per epoch with one allreduce of three numbers
gives exactly what averaging ``|G_b|²`` over the workers every step would. A step whose gradient
is not finite is left out. Nothing here reads a device value on the host except
:meth:`NoiseScale.epoch_values` (once per epoch) and :meth:`NoiseScale.state_dict`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import torch

EMA_BETA = 0.99
"""Per-step decay of the exponential averages: the last ~1/(1 − 0.99) = 100 steps carry most weight
(at 250 steps per epoch, the last 0.4 epoch; at 4 steps per epoch, the last ~25 epochs)."""

SOURCES = ("workers", "micro-batches", "adaptive")


@dataclass(frozen=True)
class NoiseEstimate:
    """The smoothed estimates at one point of a run, on the host. None where not defined yet."""

    noise_scale: Optional[float]
    """B_simple = grad_var / grad_sq_norm, in images; None until grad_sq_norm > 0 and grad_var > 0."""
    grad_sq_norm: Optional[float]
    """|G|²: the squared norm of the training set's mean gradient (estimate; can be <= 0 when
    the gradient is small against its noise)."""
    grad_var: Optional[float]
    """tr(Σ): the per-image gradient variance summed over all parameters (estimate)."""
    steps: float = 0.0
    """Weight of the averages: sum of beta**age over the steps averaged (the step count while
    beta**steps is near 1)."""

    def fields(self) -> dict:
        """The metrics.jsonl fields of an epoch line."""
        return dict(noise_scale=self.noise_scale, grad_sq_norm=self.grad_sq_norm, grad_var=self.grad_var)


def estimates(small_sq: float, large_sq: float, b: int, B: int) -> tuple[float, float]:
    """(|G|², tr(Σ)) from one pair of squared norms of mean gradients over ``b`` and ``B > b`` images."""
    _check_sizes(b, B)
    return (B * large_sq - b * small_sq) / (B - b), (small_sq - large_sq) / (1.0 / b - 1.0 / B)


def _check_sizes(b: int, B: int) -> None:
    if not (isinstance(b, int) and isinstance(B, int) and 1 <= b < B):
        raise ValueError(f"the noise scale needs two batch sizes 1 <= b < B, got b={b!r}, B={B!r}")


def choose_source(world_size: int, accum_steps: int) -> str:
    """'workers' when there are several workers, else 'micro-batches' (which needs accumulation).

    Raises ValueError for one worker without accumulation (the trainer turns it into a UsageError)."""
    if world_size > 1:
        return "workers"
    if accum_steps > 1:
        return "micro-batches"
    raise ValueError("the noise scale compares gradients of two batch sizes, and one worker without "
                     "accumulation has one")


def batch_sizes(source: str, global_batch: int, per_worker_batch: int, micro_batch: int) -> tuple[int, int]:
    """(b, B) for ``source``: (per-worker batch, global batch), (micro-batch, per-worker batch), or
    for the adaptive batch's first micro-batch (largebatch.engine.adaptive) (micro-batch, global batch)."""
    if source == "workers":
        return per_worker_batch, global_batch
    if source == "micro-batches":
        return micro_batch, per_worker_batch
    if source == "adaptive":
        return micro_batch, global_batch
    raise ValueError(f"unknown noise source {source!r}; use one of {', '.join(SOURCES)}")


def squared_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ |t|² over ``tensors`` as a 0-dim float32 tensor on their device (no host read)."""
    if not tensors:
        raise ValueError("no tensors to take the norm of")
    norms = torch._foreach_norm(list(tensors), 2, dtype=torch.float32) if tensors[0].dtype != torch.float32 \
        else torch._foreach_norm(list(tensors))
    return torch.stack(norms).square().sum()


def squared_norm_of_norms(norms: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ n² for per-tensor norms already computed (the step's non-finite check computes them)."""
    return torch.stack(list(norms)).float().square().sum()


def first_micro_batch_sq_norm(grads: Iterable[torch.Tensor], accum_steps: int,
                              grad_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """|G_b|² of the first micro-batch from the gradients right after its backward pass.

    Each micro-batch's loss is divided by the per-worker batch, so the gradients then hold
    ``G_b / accum_steps``: the squared norm is scaled by ``accum_steps²``; ``grad_scale`` (fp16's
    loss scale, a device tensor) is divided out as well."""
    sq = squared_norm([g for g in grads if g is not None]) * float(accum_steps) ** 2
    if grad_scale is not None:
        sq = sq / grad_scale.float().square()
    return sq


class NoiseScale:
    """Per-worker exponential averages of the step's estimates of |G|² and tr(Σ), on the device.

    Each step: :meth:`update` with this worker's ``|G_b|²`` and the averaged ``|G_B|²`` (0-dim
    device tensors) and the sizes ``b < B`` (they may change between phases of a run). At an
    epoch's end: :meth:`epoch_values` with a callable that sums a tensor over the workers in
    place (``Communicator.all_reduce_sum``) gives the run's values on the host.
    """

    def __init__(self, device: torch.device | str = "cpu", beta: float = EMA_BETA):
        if not (isinstance(beta, (int, float)) and 0.0 < beta <= 1.0):
            raise ValueError(f"beta={beta!r} is not allowed: use a decay in (0, 1] (1 = a plain mean)")
        self.device = torch.device(device)
        self.beta = float(beta)
        # float64 where the device has it: B·|G_B|² − b·|G_b|² subtracts two close numbers.
        self.dtype = torch.float32 if self.device.type == "mps" else torch.float64
        self.sums = torch.zeros(3, dtype=self.dtype, device=self.device)
        """[Σ beta^age·|G|² estimate, Σ beta^age·tr(Σ) estimate, Σ beta^age] over this worker's steps."""
        self._coefficients: dict[tuple[int, int], torch.Tensor] = {}

    def _matrix(self, b: int, B: int) -> torch.Tensor:
        """The (3, 3) map from [|G_b|², |G_B|², 1] to the step's [|G|², tr(Σ), 1]."""
        key = (b, B)
        if key not in self._coefficients:
            _check_sizes(b, B)
            k = 1.0 / (1.0 / b - 1.0 / B)
            rows = [[-b / (B - b), B / (B - b), 0.0], [k, -k, 0.0], [0.0, 0.0, 1.0]]
            self._coefficients[key] = torch.tensor(rows, dtype=self.dtype, device=self.device)
        return self._coefficients[key]

    def update(self, small_sq: torch.Tensor, large_sq: torch.Tensor, b: int, B: int,
               skip: Optional[torch.Tensor] = None) -> None:
        """Fold in one step: ``small_sq`` = |G_b|² (this worker's), ``large_sq`` = |G_B|²; with ``skip``
        (a 0-dim bool device tensor, true for a step whose gradient was not finite) nothing changes."""
        one = torch.ones((), dtype=self.dtype, device=self.device)
        v = torch.stack([small_sq.to(self.dtype), large_sq.to(self.dtype), one])
        new = torch.addmv(self.sums, self._matrix(b, B), v, beta=self.beta)
        if skip is None:
            self.sums.copy_(new)
        else:
            self.sums.copy_(torch.where(skip, self.sums, new))

    def epoch_values(self, sum_over_workers: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> NoiseEstimate:
        """The estimates over all workers (one allreduce of three numbers through
        ``sum_over_workers``; every worker must call it). Afterwards every worker holds the mean
        of the workers' averages, which changes no later result (only their sum matters)."""
        total = sum_over_workers(self.sums.clone())
        g2_sum, var_sum, weight = total.tolist()
        if weight > 0:
            self.sums.copy_(total * (self.sums[2] / weight))  # the workers' mean: weights are equal
        return _estimate(g2_sum, var_sum, weight)

    def values(self) -> NoiseEstimate:
        """This worker's estimates alone (one worker, or tests); reads the device."""
        return _estimate(*self.sums.tolist())

    def state_dict(self) -> dict:
        """This worker's averages (after :meth:`epoch_values`, the same on every worker)."""
        return dict(sums=self.sums.tolist(), beta=self.beta)

    def load_state_dict(self, state: dict) -> None:
        sums = state["sums"]
        if len(sums) != 3:
            raise ValueError(f"a noise-scale state holds 3 sums, got {sums!r}")
        self.sums.copy_(torch.tensor(sums, dtype=self.dtype))

    def reset(self) -> None:
        self.sums.zero_()


def _estimate(g2_sum: float, var_sum: float, weight: float) -> NoiseEstimate:
    if not weight > 0 or not (math.isfinite(g2_sum) and math.isfinite(var_sum)):
        return NoiseEstimate(None, None, None, max(weight, 0.0) if math.isfinite(weight) else 0.0)
    g2, var = g2_sum / weight, var_sum / weight
    scale = var / g2 if g2 > 0 and var > 0 else None
    return NoiseEstimate(scale, g2, var, weight)
