"""What a run has reached, saved in its checkpoints: where the loop is (:class:`Position`), what
it has achieved (:class:`Record`), the losses summed since the epoch began and since the last step
line (:class:`Losses`), and the run's clocks (:class:`Stopwatch`)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch


@dataclass
class Position:
    """Where the loop is: the next optimizer step to run, as a global count and inside its epoch,
    the images trained in the epoch and in the run, and the counts of steps the run skipped
    (identical on every worker). Checkpoints written before the image counts existed load with
    them at 0: only the adaptive batch reads them to place the sampler."""
    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    images_in_epoch: int = 0
    """Images of the epoch's permutation trained so far (where the next global batch starts)."""
    images: int = 0
    """Training images over the whole run."""
    train_time: float = 0.0
    """Seconds spent training (validation and checkpoints left out), over the whole run."""
    elapsed: float = 0.0
    """Seconds since the run started, over the whole run (a resumed run continues the count)."""
    skipped_steps: int = 0
    skipped_in_epoch: int = 0
    nonfinite_in_a_row: int = 0
    scaler_skipped_steps: int = 0

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state(cls, state: Optional[dict]) -> "Position":
        """The position a checkpoint's ``position`` holds; the start of a run without one."""
        return cls() if state is None else cls(**state["position"])

    def next_epoch(self) -> None:
        self.epoch, self.step_in_epoch, self.skipped_in_epoch, self.images_in_epoch = self.epoch + 1, 0, 0, 0


@dataclass
class Record:
    """What the run has reached so far (identical on every worker; saved in checkpoints)."""
    best_acc: float = 0.0
    best_top5: Optional[float] = None
    time_to_target: Optional[float] = None
    epoch_to_target: Optional[int] = None
    skipped_train: list = field(default_factory=list)
    """Indices of the training images found unreadable so far (all workers), sorted."""
    skipped_val: list = field(default_factory=list)
    """Indices of the validation images found unreadable so far (all workers), sorted."""

    @property
    def skipped_files(self) -> int:
        return len(self.skipped_train) + len(self.skipped_val)

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state(cls, state: Optional[dict]) -> "Record":
        return cls() if state is None else cls(**state["record"])

    def update(self, epoch: int, result, elapsed: float, target: Optional[float], metric: str) -> bool:
        """Fold in one validation (an EvalResult); True when the target was reached for the first time."""
        self.best_acc = max(self.best_acc, result.accuracy)
        if result.top5 is not None:
            self.best_top5 = max(self.best_top5 or 0.0, result.top5)
        value = result.top5 if metric == "top5" else result.accuracy
        if target is not None and self.time_to_target is None and value is not None and value >= target:
            self.time_to_target, self.epoch_to_target = elapsed, epoch
            return True
        return False

    def add_skipped(self, train: list, val: list) -> None:
        """Fold in the unreadable images the workers met (lists of indices, one per worker)."""
        self.skipped_train = sorted(set(self.skipped_train).union(*train))
        self.skipped_val = sorted(set(self.skipped_val).union(*val))


class Losses:
    """This worker's share of the loss (float64 on the device, never read in a step) summed over the
    applied steps of the epoch and of the step-line window: the steps since the last step line,
    which runs across epochs and resumes. The window also counts its finite steps (the mean's
    denominator) and, since the later of its start and the epoch's, its images, data wait and time."""

    def __init__(self, device: torch.device, epoch: float = 0.0, window: float = 0.0, window_steps: int = 0):
        self.epoch = torch.full((), epoch, dtype=torch.float64, device=device)
        self.window = torch.full((), window, dtype=torch.float64, device=device)
        self.window_steps = window_steps
        self.epoch_images = 0  # in this process: a resumed epoch runs only part of its steps
        self.restart_timing()

    def add(self, loss: torch.Tensor, applied: torch.Tensor, images: int, data_wait: float) -> None:
        """One step: its loss share, left out where the step was not ``applied`` (a device bool)."""
        kept = torch.where(applied, loss, 0.0)
        self.epoch += kept
        self.window += kept
        self.images += images
        self.epoch_images += images
        self.data_wait += data_wait
        self.timed += 1

    def restart_timing(self) -> None:
        """At an epoch's start: the window's pace is measured over training time only."""
        self.start, self.images, self.data_wait, self.timed = time.perf_counter(), 0, 0.0, 0

    def restart_window(self) -> None:
        """After a step line."""
        self.window.zero_()
        self.window_steps = 0
        self.restart_timing()

    def restart_epoch(self) -> None:
        self.epoch.zero_()
        self.epoch_images = 0


class Stopwatch:
    """The run's clocks. Elapsed time counts from the run's start (a resumed run continues from
    its checkpoint's count); training time leaves out checkpoints and validation, and is kept in
    :class:`Position` (the run's) and here (the epoch's)."""

    def __init__(self, elapsed: float = 0.0):
        self.start = time.perf_counter() - elapsed
        self.epoch_time, self.segment = 0.0, time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def start_epoch(self) -> None:
        self.epoch_time, self.segment = 0.0, time.perf_counter()

    def pause(self, pos: Position) -> None:
        """Training stops for a while (a checkpoint, the epoch's end): count the time since it went on."""
        now = time.perf_counter()
        self.epoch_time += now - self.segment
        pos.train_time += now - self.segment
        pos.elapsed = now - self.start

    def resume(self) -> None:
        self.segment = time.perf_counter()
