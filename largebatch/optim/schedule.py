"""Learning-rate schedules as pure functions of the optimizer step.

Linear scaling rule and gradual warmup (Goyal et al. 2017, "Accurate, Large Minibatch SGD:
Training ImageNet in 1 Hour"): the peak learning rate is ``base_lr * global_batch / base_batch``;
over the first ``warmup_steps`` optimizer steps the rate rises linearly from ``base_lr`` to that
peak, then follows the chosen decay; a warmup that starts at the peak (a global batch at or below
``base_batch``) holds it there for its steps. Everything is computed per step from the step counter alone,
so a resumed run needs only the step.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field


def scaled_lr(base_lr: float, global_batch: int, base_batch: int, rule: str = "linear") -> float:
    """``base_lr`` is quoted for ``base_batch`` images per step; scale it to ``global_batch``.

    'linear': Goyal et al.'s linear scaling rule; 'sqrt': square-root scaling (Krizhevsky 2014;
    often better for LAMB); 'none': no scaling.
    """
    k = global_batch / base_batch
    if rule == "linear":
        return base_lr * k
    if rule == "sqrt":
        return base_lr * math.sqrt(k)
    if rule == "none":
        return base_lr
    raise ValueError(f"unknown scaling rule {rule!r}")


def warmup_warning(warmup_epochs: float, epochs: int, warmup_steps: int, total_steps: int, rises: bool = True):
    """One line when the warmup is not shorter than the run (in epochs or in steps), so the decay
    never starts: the lr only ever rises, or (``rises`` false: the warmup starts at the peak) holds
    at its peak for the whole run; None otherwise."""
    if warmup_epochs <= 0 or (warmup_epochs < epochs and warmup_steps < total_steps):
        return None
    what = ("rises for the whole run" if rises else
            "holds at its peak for the whole run (the warmup starts at the peak: nothing to rise to)")
    return (f"schedule.warmup_epochs={warmup_epochs:g} is not shorter than the run (train.epochs={epochs}, "
            f"{total_steps} steps): the lr {what} and never decays; lower schedule.warmup_epochs "
            f"(e.g. {epochs / 10:g}, a tenth of the run) or raise train.epochs")


def warmup_rises(schedule) -> bool:
    """Whether ``schedule`` (an :class:`LRSchedule` or a :class:`PhasedSchedule`) has a warmup that
    changes the lr. One that starts at the peak it rises to (a global batch at or below
    ``base_batch`` with the default start) holds the lr at the peak for its steps instead."""
    if not schedule.warmup_steps:
        return False
    phases = getattr(schedule, "phases", None)
    peaks = ([schedule.peak_lr] if phases is None else
             [p.peak_lr for p in phases if p.first_step < schedule.warmup_steps])
    return any(not math.isclose(schedule.warmup_start_lr, peak, rel_tol=1e-9) for peak in peaks)


def _check_steps_and_decay(total_steps: int, warmup_steps: int, decay: str) -> None:
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
    if decay not in ("constant", "step", "poly", "cosine", "onecycle"):
        raise ValueError(f"unknown decay {decay!r}")


def _decayed(peak: float, progress: float, decay: str, power: float, end_lr: float) -> float:
    """The lr ``progress`` (0..1) of the way through a 'poly', 'onecycle' or 'cosine' decay from ``peak``."""
    if decay == "poly":
        return end_lr + (peak - end_lr) * (1.0 - progress) ** power
    if decay == "onecycle":
        return end_lr + (peak - end_lr) * (1.0 - progress)
    return end_lr + (peak - end_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class LRSchedule:
    peak_lr: float
    """Learning rate at the end of warmup (the scaled lr)."""
    total_steps: int
    """Optimizer steps in the whole run."""
    warmup_steps: int = 0
    """Steps of linear warmup; 0 = start at peak_lr."""
    warmup_start_lr: float = 0.0
    """Learning rate at step 0 of warmup (Goyal et al.: the unscaled base_lr)."""
    decay: str = "constant"
    """'constant', 'step', 'poly', 'cosine' or 'onecycle' (linear to end_lr)."""
    milestones: tuple = field(default_factory=tuple)
    """'step': optimizer steps (from step 0) at which the rate is multiplied by ``gamma``."""
    gamma: float = 0.1
    power: float = 2.0
    end_lr: float = 0.0

    def __post_init__(self):
        _check_steps_and_decay(self.total_steps, self.warmup_steps, self.decay)

    def __call__(self, step: int) -> float:
        """Learning rate for optimizer step ``step`` (0-based: the first update uses step 0)."""
        if step < self.warmup_steps:
            return self.warmup_start_lr + (self.peak_lr - self.warmup_start_lr) * step / self.warmup_steps
        if self.decay == "constant":
            return self.peak_lr
        if self.decay == "step":
            return self.peak_lr * self.gamma ** bisect.bisect_right(self.milestones, step)
        span = self.total_steps - self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / span) if span > 0 else 1.0
        return _decayed(self.peak_lr, progress, self.decay, self.power, self.end_lr)


def build_schedule(optim_cfg, sched_cfg, global_batch: int, steps_per_epoch: int, epochs: int) -> LRSchedule:
    """The run's schedule from the config: epochs are turned into optimizer steps here, once."""
    peak = scaled_lr(optim_cfg.base_lr, global_batch, optim_cfg.base_batch, optim_cfg.scaling)
    total = steps_per_epoch * epochs
    warmup = min(total, round(sched_cfg.warmup_epochs * steps_per_epoch))
    milestones = tuple(sorted(round(m * steps_per_epoch) for m in sched_cfg.milestones))
    # Goyal et al. warm up from the unscaled base_lr; a global batch below base_batch has nothing to
    # warm up to, so the ramp then starts (and stays) at the peak.
    start = min(optim_cfg.base_lr, peak) if sched_cfg.warmup_start_lr is None else sched_cfg.warmup_start_lr
    return LRSchedule(peak_lr=peak, total_steps=total, warmup_steps=warmup, warmup_start_lr=start,
                      decay=sched_cfg.decay, milestones=milestones, gamma=sched_cfg.gamma,
                      power=sched_cfg.power, end_lr=sched_cfg.end_lr)


@dataclass(frozen=True)
class SchedulePhase:
    first_step: int
    """Optimizer step at which the phase starts."""
    first_epoch: int
    """Epoch at which the phase starts."""
    steps_per_epoch: int
    """Optimizer steps in each of the phase's epochs (its global batch sets it)."""
    peak_lr: float
    """The phase's scaled lr: base_lr scaled to the phase's global batch."""


@dataclass(frozen=True)
class PhasedSchedule:
    """The learning rate of a run whose global batch changes between phases (train.phases).

    Still a pure function of the optimizer step. A step is first mapped to the epochs done so far,
    ``t = first_epoch + (step - first_step) / steps_per_epoch`` within its phase, and the warmup
    and decay shapes are functions of ``t``, so they follow the data seen rather than the step
    count, which changes meaning when the batch does. The peak is the current phase's scaled lr
    (the linear scaling rule applied per phase, as in fast.ai's DAWNBench ImageNet run). The epoch
    quantities of the config (warmup_epochs, milestones) become steps by rounding inside the phase
    where they fall, as :func:`build_schedule` rounds them for one phase.
    """

    phases: tuple
    """:class:`SchedulePhase` per phase, in order."""
    total_steps: int
    warmup_steps: int = 0
    warmup_start_lr: float = 0.0
    decay: str = "constant"
    milestones: tuple = field(default_factory=tuple)
    """'step': optimizer steps at which the rate is multiplied by ``gamma``."""
    gamma: float = 0.1
    power: float = 2.0
    end_lr: float = 0.0

    def __post_init__(self):
        _check_steps_and_decay(self.total_steps, self.warmup_steps, self.decay)

    @property
    def peak_lr(self) -> float:
        """The highest phase peak."""
        return max(p.peak_lr for p in self.phases)

    def _phase(self, step: int) -> SchedulePhase:
        starts = [p.first_step for p in self.phases]
        return self.phases[max(0, bisect.bisect_right(starts, step) - 1)]

    def epochs_at(self, step: int) -> float:
        """Epochs of data behind ``step`` optimizer steps."""
        p = self._phase(step)
        return p.first_epoch + (step - p.first_step) / p.steps_per_epoch

    def __call__(self, step: int) -> float:
        peak = self._phase(step).peak_lr
        t = self.epochs_at(step)
        if step < self.warmup_steps:
            return self.warmup_start_lr + (peak - self.warmup_start_lr) * t / self.epochs_at(self.warmup_steps)
        if self.decay == "constant":
            return peak
        if self.decay == "step":
            return peak * self.gamma ** bisect.bisect_right(self.milestones, step)
        t_warm, t_end = self.epochs_at(self.warmup_steps), self.epochs_at(self.total_steps)
        progress = min(1.0, (t - t_warm) / (t_end - t_warm)) if t_end > t_warm else 1.0
        return _decayed(peak, progress, self.decay, self.power, self.end_lr)


def build_phased_schedule(optim_cfg, sched_cfg, phases: list[tuple[int, int, int]]) -> PhasedSchedule:
    """The schedule for phases given as (epochs, steps per epoch, global batch), in order."""
    pieces, step, epoch = [], 0, 0
    for epochs, spe, batch in phases:
        peak = scaled_lr(optim_cfg.base_lr, batch, optim_cfg.base_batch, optim_cfg.scaling)
        pieces.append(SchedulePhase(first_step=step, first_epoch=epoch, steps_per_epoch=spe, peak_lr=peak))
        step, epoch = step + epochs * spe, epoch + epochs

    def step_at(e: float) -> int:
        """The optimizer step at which ``e`` epochs are done (rounded inside the phase holding ``e``)."""
        for p, (epochs, spe, _) in zip(pieces, phases):
            if e < p.first_epoch + epochs:
                return p.first_step + round((e - p.first_epoch) * spe)
        return step

    start = pieces[0].peak_lr
    start = min(optim_cfg.base_lr, start) if sched_cfg.warmup_start_lr is None else sched_cfg.warmup_start_lr
    return PhasedSchedule(phases=tuple(pieces), total_steps=step,
                          warmup_steps=min(step, step_at(sched_cfg.warmup_epochs)),
                          warmup_start_lr=start, decay=sched_cfg.decay,
                          milestones=tuple(sorted(step_at(m) for m in sched_cfg.milestones)), gamma=sched_cfg.gamma,
                          power=sched_cfg.power, end_lr=sched_cfg.end_lr)


@dataclass(frozen=True)
class ProgressSchedule:
    """The learning rate of a run whose global batch changes while it trains (adaptive.enabled).

    A pure function of the epochs trained ``t`` (images trained / images in the training set, a
    fraction inside an epoch) and of the peak of the batch in use (``peak``: the scaled lr of that
    batch, or the AdaScale lr). Warmup rises linearly in ``t`` from ``warmup_start_lr`` to the current
    peak over ``warmup_epochs``; the decay's shape is a function of ``t`` against ``epochs`` and
    multiplies the current peak. A batch change moves the lr to the new peak at the same point of
    the shape, so warmup and decay follow the data seen, not the step count.
    """

    epochs: float
    """Epochs in the whole run (train.epochs)."""
    warmup_epochs: float = 0.0
    warmup_start_lr: float = 0.0
    decay: str = "constant"
    milestones: tuple = field(default_factory=tuple)
    """'step': epochs at which the rate is multiplied by ``gamma``."""
    gamma: float = 0.1
    power: float = 2.0
    end_lr: float = 0.0

    def __post_init__(self):
        if not self.epochs > 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise ValueError(f"warmup_epochs must be in [0, epochs={self.epochs}], got {self.warmup_epochs}")
        _check_steps_and_decay(1, 0, self.decay)

    def __call__(self, t: float, peak: float) -> float:
        """Learning rate after ``t`` epochs of data, at the current batch's ``peak``."""
        if t < self.warmup_epochs:
            return self.warmup_start_lr + (peak - self.warmup_start_lr) * t / self.warmup_epochs
        if self.decay == "constant":
            return peak
        if self.decay == "step":
            return peak * self.gamma ** bisect.bisect_right(self.milestones, t)
        span = self.epochs - self.warmup_epochs
        progress = min(1.0, (t - self.warmup_epochs) / span) if span > 0 else 1.0
        return _decayed(peak, progress, self.decay, self.power, self.end_lr)


def build_progress_schedule(optim_cfg, sched_cfg, epochs: int, first_peak: float) -> ProgressSchedule:
    """The adaptive batch's schedule from the config; ``first_peak`` is the lr at the starting batch
    (a warmup from the unscaled base_lr, as :func:`build_schedule`, or held at the peak where that is lower)."""
    start = min(optim_cfg.base_lr, first_peak) if sched_cfg.warmup_start_lr is None else sched_cfg.warmup_start_lr
    return ProgressSchedule(epochs=float(epochs), warmup_epochs=min(float(sched_cfg.warmup_epochs), float(epochs)),
                            warmup_start_lr=start, decay=sched_cfg.decay,
                            milestones=tuple(sorted(float(m) for m in sched_cfg.milestones)), gamma=sched_cfg.gamma,
                            power=sched_cfg.power, end_lr=sched_cfg.end_lr)
