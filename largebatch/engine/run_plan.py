"""The whole plan of a run, from the config, the world size and the dataset's size.

One implementation, used by the trainer (rank 0 prints it at start) and by
``python -m largebatch.plan`` (which prints it without training).
"""

from __future__ import annotations

from dataclasses import dataclass

from largebatch.batching import BatchPlan, plan
from largebatch.data.sampler import steps_per_epoch
from largebatch.errors import UsageError
from largebatch.optim.schedule import LRSchedule, build_schedule


@dataclass(frozen=True)
class RunPlan:
    batch: BatchPlan
    schedule: LRSchedule
    num_train: int
    steps_per_epoch: int
    epochs: int

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    def lines(self) -> list[str]:
        b, s = self.batch, self.schedule
        return [
            f"workers (world size)   {b.world_size}",
            f"global batch           {b.global_batch}",
            f"per-worker batch       {b.per_worker_batch}",
            f"micro-batch            {b.micro_batch}",
            f"accumulation steps     {b.accum_steps}",
            f"scaled lr (peak)       {s.peak_lr:.6g}  (from {s.warmup_start_lr:.6g}, {s.decay} decay)",
            f"warmup steps           {s.warmup_steps}",
            f"steps per epoch        {self.steps_per_epoch}  ({self.num_train} training images)",
            f"total steps            {self.total_steps}  ({self.epochs} epochs)",
        ]


def make_run_plan(cfg, world_size: int, num_train: int) -> RunPlan:
    batch = plan(cfg.train.global_batch, world_size, cfg.train.max_micro_batch)
    if num_train < batch.global_batch:
        raise UsageError(f"the training set has {num_train} images, fewer than one global batch "
                         f"(train.global_batch={batch.global_batch}); lower train.global_batch")
    spe = steps_per_epoch(num_train, batch.global_batch)
    schedule = build_schedule(cfg.optim, cfg.schedule, batch.global_batch, spe, cfg.train.epochs)
    return RunPlan(batch=batch, schedule=schedule, num_train=num_train, steps_per_epoch=spe, epochs=cfg.train.epochs)
