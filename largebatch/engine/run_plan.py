"""The whole plan of a run, from the config, the world size and the dataset's size.

One implementation, used by the trainer (rank 0 prints it at start) and by
``python -m largebatch.plan`` (which prints it without training).

A run is a sequence of phases (``train.phases``; without it, one phase of ``train.epochs`` at
``train.global_batch``). Each phase has its own batch plan, image size and steps per epoch; the
position of a run (optimizer step) maps to (phase, epoch, step in the epoch) through
:meth:`RunPlan.locate`, which is how a checkpoint's step places a resumed run.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional, Union

from torch.nn.modules.batchnorm import _BatchNorm

from largebatch.batching import BatchPlan, check_trainable_batch, plan, plan_warning
from largebatch.data.sampler import steps_per_epoch
from largebatch.engine.adaptive import AdaptivePlan, adaptive_plan
from largebatch.engine.guards import launcher_rank
from largebatch.errors import UsageError
from largebatch.models.sizes import Size, as_size, text as size_text
from largebatch.optim.schedule import (LRSchedule, PhasedSchedule, build_phased_schedule, build_schedule, scaled_lr,
                                       warmup_rises, warmup_warning)


@dataclass(frozen=True)
class Phase:
    index: int
    """0-based position in the run."""
    first_epoch: int
    epochs: int
    first_step: int
    steps_per_epoch: int
    batch: BatchPlan
    image_size: Optional[Size]
    """Size of the training images (a side, or (height, width)); None = the dataset's own."""
    peak_lr: float
    batch_key: str = "train.global_batch"
    """The config key that sets this phase's global batch."""

    @property
    def steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    @property
    def end_epoch(self) -> int:
        return self.first_epoch + self.epochs


@dataclass(frozen=True)
class RunPlan:
    phases: tuple
    """:class:`Phase` per phase, in order (one without train.phases)."""
    schedule: Union[LRSchedule, PhasedSchedule]
    num_train: int
    epochs: int
    phased: bool = False
    """train.phases was given."""
    eval_size: Optional[int] = None
    """Side of the validation images: the last phase's; None = the dataset's own."""
    max_micro_batch: Optional[int] = None
    """train.max_micro_batch, which the batch plans were made under."""
    lr_source: str = ""
    """Where the base lr came from and how it was scaled, for the plan's lr line."""
    warnings: tuple = ()
    """One line each about a plan that trains but badly (tiny micro-batches, a warmup as long as the run)."""
    adaptive: Optional[AdaptivePlan] = None
    """adaptive.enabled: the batches the run may choose from and their lr; the one phase is then the
    smallest batch's (its steps per epoch and total steps are upper bounds)."""

    @property
    def batch(self) -> BatchPlan:
        """The first phase's batch plan (the only one without train.phases)."""
        return self.phases[0].batch

    @property
    def steps_per_epoch(self) -> int:
        """The first phase's steps per epoch (the only one without train.phases)."""
        return self.phases[0].steps_per_epoch

    @property
    def total_steps(self) -> int:
        return sum(p.steps for p in self.phases)

    def phase_of(self, epoch: int) -> Phase:
        """The phase that trains ``epoch`` (0-based); the last one for epochs past the end."""
        for p in self.phases:
            if epoch < p.end_epoch:
                return p
        return self.phases[-1]

    def locate(self, step: int) -> tuple[Phase, int, int]:
        """(phase, epoch, step inside the epoch) of optimizer step ``step``; past the end: the end."""
        for p in self.phases:
            if step < p.first_step + p.steps:
                epoch, inside = divmod(step - p.first_step, p.steps_per_epoch)
                return p, p.first_epoch + epoch, inside
        return self.phases[-1], self.epochs, 0

    def images_before(self, step: int) -> int:
        """Training images in the first ``step`` optimizer steps."""
        return sum(min(max(step - p.first_step, 0), p.steps) * p.batch.global_batch for p in self.phases)

    def lines(self) -> list[str]:
        b, s = self.batch, self.schedule
        if self.adaptive is not None:
            return [f"workers (world size)   {b.world_size}", *self.adaptive.lines(),
                    f"warmup                 {self.adaptive.schedule.warmup_epochs:g} epochs, then {s.decay} decay "
                    "(functions of the epochs trained, times the current batch's peak)",
                    f"steps per epoch        at most {self.steps_per_epoch}  ({self.num_train} training images)",
                    f"total steps            at most {self.total_steps}  ({self.epochs} epochs at the smallest batch)"]
        if not self.phased:
            return [
                f"workers (world size)   {b.world_size}",
                f"global batch           {b.global_batch}",
                f"per-worker batch       {b.per_worker_batch}",
                f"micro-batch            {b.micro_batch}",
                f"accumulation steps     {b.accum_steps}",
                f"scaled lr (peak)       {s.peak_lr:.6g}  (base lr {self.lr_source}; {self._warmup_words()}, "
                f"{s.decay} decay)",
                self._warmup_line(),
                f"steps per epoch        {self.steps_per_epoch}  ({self.num_train} training images)",
                f"total steps            {self.total_steps}  ({self.epochs} epochs)",
            ]
        size = "the dataset's own size" if self.eval_size is None else f"{self.eval_size} px"
        lines = [
            f"workers (world size)   {b.world_size}",
            f"phases                 {len(self.phases)}  (validation at {size}; {self._warmup_words('lr from')}, "
            f"{s.decay} decay over epochs)",
            f"base lr                {self.lr_source}",
        ]
        lines += ["  " + line for line in phase_table(self.phases)]
        lines += [
            self._warmup_line(),
            f"training images        {self.num_train}",
            f"total steps            {self.total_steps}  ({self.epochs} epochs)",
        ]
        return lines

    def announce(self, announce: Optional[bool] = None) -> None:
        """Print the warnings to stderr (``largebatch: warning: ...``) where ``announce`` is true;
        None: only in the process the launcher made rank 0 (or that no launcher started)."""
        if announce if announce is not None else launcher_rank() == 0:
            for line in self.warnings:
                print(f"largebatch: warning: {line}", file=sys.stderr, flush=True)

    def _warmup_words(self, words: str = "warmup from") -> str:
        s = self.schedule
        if not s.warmup_steps:
            return "no warmup"
        return f"{words} {s.warmup_start_lr:.6g}" if warmup_rises(s) else f"held at {s.warmup_start_lr:.6g} in warmup"

    def _warmup_line(self) -> str:
        """The warmup's steps, and what they do where they do not raise the lr."""
        s = self.schedule
        line = f"warmup steps           {s.warmup_steps}"
        if s.warmup_steps and not warmup_rises(s):
            line += f"  (the lr starts at its peak, {s.warmup_start_lr:.6g}, so the warmup holds it there)"
        return line


def phase_table(phases) -> list[str]:
    cols = ("phase", "epochs", "image", "global batch", "per-worker", "micro", "accum", "peak lr", "steps/epoch",
            "steps")
    rows = [cols]
    for p in phases:
        b = p.batch
        rows.append((str(p.index + 1), _epochs(p), _size(p.image_size) if p.image_size else "own",
                     str(b.global_batch), str(b.per_worker_batch), str(b.micro_batch), str(b.accum_steps),
                     f"{p.peak_lr:.6g}", str(p.steps_per_epoch), str(p.steps)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    return ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]


def _size(size: Size) -> str:
    """'128' for a side, '16x40' for (height, width)."""
    return str(size) if isinstance(size, int) else size_text(size)


def _epochs(p: Phase) -> str:
    return f"{p.first_epoch + 1}-{p.end_epoch}" if p.epochs > 1 else str(p.end_epoch)


def phase_line(p: Phase, count: int) -> str:
    """What rank 0 prints when a phase starts."""
    b = p.batch
    size = f"{_size(p.image_size)} px" if p.image_size else "the dataset's own size"
    return (f"phase {p.index + 1}/{count} (epoch{'s' if p.epochs > 1 else ''} {_epochs(p)}): images at {size}, "
            f"global batch {b.global_batch} = {b.world_size} x {b.per_worker_batch} per worker, micro-batch "
            f"{b.micro_batch} x {b.accum_steps} accumulation step(s), peak lr {p.peak_lr:.6g}, "
            f"{p.steps_per_epoch} steps per epoch")


def make_run_plan(cfg, world_size: int, num_train: int, *, announce: Optional[bool] = None) -> RunPlan:
    """The run's plan for ``world_size`` workers and ``num_train`` training images. Its warnings are
    printed to stderr (``largebatch: warning: ...``) where ``announce`` is true; None: only in the
    process the launcher made rank 0 (or that no launcher started), so each appears once."""
    adaptive = adaptive_plan(cfg, world_size, num_train) if cfg.adaptive.enabled else None
    phases_cfg = cfg.train.phases or [dict(epochs=cfg.train.epochs)]
    if adaptive is not None:
        phases_cfg = [dict(epochs=cfg.train.epochs, global_batch=adaptive.min_batch)]
    phases, step, epoch, warnings = [], 0, 0, []
    for i, spec in enumerate(phases_cfg):
        global_batch = spec.get("global_batch") or cfg.train.global_batch
        where = f"train.phases[{i}].global_batch" if spec.get("global_batch") else "train.global_batch"
        if adaptive is not None:
            where = "adaptive.min_batch"
        batch = plan(global_batch, world_size, cfg.train.max_micro_batch)
        if num_train < batch.global_batch:
            raise UsageError(f"the training set has {num_train} images, fewer than one global batch "
                             f"({where}={batch.global_batch}); lower {where}")
        warning = plan_warning(batch, cfg.train.max_micro_batch, where)
        if warning and warning not in warnings:
            warnings.append(warning)
        spe = steps_per_epoch(num_train, batch.global_batch)
        size = spec.get("image_size") or cfg.data.image_size
        size = None if size is None else as_size(size)
        peak = scaled_lr(cfg.optim.base_lr, batch.global_batch, cfg.optim.base_batch, cfg.optim.scaling)
        phases.append(Phase(index=i, first_epoch=epoch, epochs=spec["epochs"], first_step=step, steps_per_epoch=spe,
                            batch=batch, image_size=size, peak_lr=peak, batch_key=where))
        step, epoch = step + spe * spec["epochs"], epoch + spec["epochs"]
    if cfg.train.phases:
        schedule = build_phased_schedule(cfg.optim, cfg.schedule,
                                         [(p.epochs, p.steps_per_epoch, p.batch.global_batch) for p in phases])
    else:
        p = phases[0]
        schedule = build_schedule(cfg.optim, cfg.schedule, p.batch.global_batch, p.steps_per_epoch, cfg.train.epochs)
    warning = warmup_warning(cfg.schedule.warmup_epochs, cfg.train.epochs, schedule.warmup_steps, schedule.total_steps,
                             warmup_rises(schedule))
    if warning:
        warnings.append(warning)
    o = cfg.optim
    lr_source = f"{o.base_lr:.6g} per {o.base_batch} images: {o.base_lr_source()}, {o.scaling} scaling"
    result = RunPlan(phases=tuple(phases), schedule=schedule, num_train=num_train, epochs=cfg.train.epochs,
                     phased=bool(cfg.train.phases), eval_size=phases[-1].image_size,
                     max_micro_batch=cfg.train.max_micro_batch, lr_source=lr_source, warnings=tuple(warnings),
                     adaptive=adaptive)
    result.announce(announce)
    return result


def check_trainable(plan: RunPlan, has_batchnorm: bool) -> None:
    """Refuse (UsageError, one line with the nearest sensible global batch) a plan that cannot train
    the model: a phase whose micro-batch is one image while the model has BatchNorm layers in
    training mode. Call it after building the model, with ``has_batchnorm(model)``."""
    for p in plan.phases:
        check_trainable_batch(p.batch, has_batchnorm, plan.max_micro_batch, p.batch_key)
    for b in plan.adaptive.batches if plan.adaptive is not None else ():
        check_trainable_batch(b, has_batchnorm, plan.max_micro_batch, "adaptive.min_batch")


def has_batchnorm(model) -> bool:
    """Whether ``model`` (an nn.Module) holds a BatchNorm layer (any dimension, SyncBatchNorm included)."""
    return any(isinstance(m, _BatchNorm) for m in model.modules())
