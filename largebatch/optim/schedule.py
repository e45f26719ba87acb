"""Learning-rate schedules as pure functions of the optimizer step.

Linear scaling rule and gradual warmup (Goyal et al. 2017, "Accurate, Large Minibatch SGD:
Training ImageNet in 1 Hour"): the peak learning rate is ``base_lr * global_batch / base_batch``;
over the first ``warmup_steps`` optimizer steps the rate rises linearly from ``base_lr`` to that
peak, then follows the chosen decay. Everything is computed per step from the step counter alone,
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
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"warmup_steps must be in [0, total_steps={self.total_steps}], got {self.warmup_steps}")
        if self.decay not in ("constant", "step", "poly", "cosine", "onecycle"):
            raise ValueError(f"unknown decay {self.decay!r}")

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
        if self.decay == "poly":
            return self.end_lr + (self.peak_lr - self.end_lr) * (1.0 - progress) ** self.power
        if self.decay == "onecycle":
            return self.end_lr + (self.peak_lr - self.end_lr) * (1.0 - progress)
        return self.end_lr + (self.peak_lr - self.end_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


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
