"""What a run shows and records: metrics.jsonl lines, and a progress bar or plain lines.

On a terminal rank 0 shows a progress bar per epoch. When its output is not a terminal (Slurm
logs, CI, a pipe) it prints plain lines instead: one per epoch, and a heartbeat after the first
step and then at most every ``LARGEBATCH_HEARTBEAT_S`` seconds (default 30; 0 turns heartbeats
off), so that a long epoch is never silent::

    step 120/3000 (epoch 2/30)  loss 2.1033  lr 0.4  1,234 img/s  ETA 5m12s

The step counts the run's steps where the trainer passes them to :meth:`Progress.start_epoch`,
else the epoch's; loss and images/s come from the last step line (``train.log_every_steps``), or
are measured here (steps/s) without them; ETA is the trainer's from its last step line, less the
time since, else this epoch's pace times the steps left (validation not included).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Callable, Optional

from largebatch.errors import UsageError
from largebatch.fileio import write_bytes_atomic


def tensorboard_writer_class():
    """torch's SummaryWriter, or a UsageError naming the extra to install."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UsageError("log.tensorboard=true needs the tensorboard package; "
                         "pip install 'largebatch[tensorboard]' or set log.tensorboard=false") from None
    return SummaryWriter


def _lines_until(path: str, step: int) -> list[str]:
    if not os.path.exists(path):
        return []
    kept = []
    with open(path) as fh:
        for line in fh:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                break  # a line cut short by a crash ends what is kept
            event, at = row.get("event"), row.get("step", 0)
            # the adaptive batch decides at a step boundary after that step's checkpoint: a resumed
            # run takes the decision at its first step again
            if (event in ("epoch", "step", "bucket_tuning", "startup") and at <= step) or (event == "batch" and at < step):
                kept.append(line if line.endswith("\n") else line + "\n")
    return kept


class MetricsLog:
    """``metrics.jsonl``: one JSON object per line, flushed as written; optionally the same scalars
    as TensorBoard events (tag ``<event>/<field>``, x-axis the optimizer step). Only rank 0 writes:
    other ranks pass ``path=None``."""

    def __init__(self, path: Optional[str], tensorboard_dir: Optional[str] = None,
                 keep_until_step: Optional[int] = None):
        """``keep_until_step``: a resumed run keeps the epoch, step, bucket_tuning and startup lines up to that
        step and the batch decisions before it (those after will be written again) and appends;
        otherwise the file starts empty."""
        self._fh = self._tb = None
        if path is not None:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            kept = _lines_until(path, keep_until_step) if keep_until_step is not None else []
            write_bytes_atomic("".join(kept).encode(), path)
            self._fh = open(path, "a", buffering=1)
            if tensorboard_dir is not None:
                self._tb = tensorboard_writer_class()(log_dir=tensorboard_dir)

    def write(self, event: str, **fields: Any) -> None:
        if self._fh is None:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in fields.items()}
        self._fh.write(json.dumps({"event": event, **clean}) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        if self._tb is not None:
            step = clean.get("step", 0)
            for key, value in clean.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                    self._tb.add_scalar(f"{event}/{key}", value, global_step=step)
            self._tb.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


HEARTBEAT_ENV = "LARGEBATCH_HEARTBEAT_S"
HEARTBEAT_S = 30.0
"""Default seconds between heartbeat lines when the output is not a terminal."""


def heartbeat_interval() -> float:
    """``LARGEBATCH_HEARTBEAT_S`` in seconds (default :data:`HEARTBEAT_S`); 0 or less: no heartbeats."""
    raw = os.environ.get(HEARTBEAT_ENV, "").strip()
    if not raw:
        return HEARTBEAT_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise UsageError(f"{HEARTBEAT_ENV}={raw!r} is not allowed: use a number of seconds, or 0 for no heartbeat")
    return value


def format_duration(seconds: float) -> str:
    """``42s``, ``5m12s``, ``3h05m``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _number(text: Any) -> Optional[float]:
    """A postfix value ('1,234', '312s', '0.1') as a number, or None."""
    try:
        return float(str(text).replace(",", "").rstrip("s"))
    except ValueError:
        return None


class Progress:
    """Rank 0's view of the run: a tqdm bar per epoch on a terminal; otherwise plain lines, with a
    heartbeat after the first step and every ``LARGEBATCH_HEARTBEAT_S`` seconds (see the module)."""

    def __init__(self, enabled: bool, stream=None, clock: Callable[[], float] = time.monotonic):
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.bar_enabled = enabled and self.stream.isatty()
        self.heartbeat_s = heartbeat_interval() if enabled and not self.bar_enabled else 0.0
        self._clock = clock
        self._bar = None
        self._postfix: dict = {}
        self._epoch = self._epochs = self._steps = self._done = 0
        self._run_step: Optional[int] = None
        self._total_steps: Optional[int] = None
        self._global_batch: Optional[int] = None
        self._epoch_start = self._first_done = 0.0
        self._counted = 0  # steps this process ran in this epoch
        self._last_beat: Optional[float] = None
        self._eta: tuple = (None, 0.0)  # the trainer's last ETA in seconds, and when it came

    def print(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def start_epoch(self, epoch: int, epochs: int, steps: int, initial: int = 0, *, step: Optional[int] = None,
                    total_steps: Optional[int] = None, global_batch: Optional[int] = None) -> None:
        """Epoch ``epoch`` (from 0) of ``epochs``, with ``steps`` steps of which ``initial`` are done
        (a resumed epoch). ``step`` (the run's step count at ``initial``), ``total_steps`` and
        ``global_batch`` are optional; with them a heartbeat shows the run's step and images/s."""
        self._epoch, self._epochs, self._steps, self._done = epoch, epochs, steps, initial
        self._run_step, self._total_steps, self._global_batch = step, total_steps, global_batch
        self._epoch_start, self._counted = self._clock(), 0
        if self.bar_enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=steps, initial=initial, desc=f"epoch {epoch + 1}/{epochs}", file=self.stream,
                             leave=False, dynamic_ncols=True, unit="step")

    def step(self, **postfix) -> None:
        """Advance the bar; ``postfix`` values (loss, lr, img_s, eta) replace those of the same name."""
        if postfix:
            self._postfix.update(postfix)
        if self._bar is not None:
            self._bar.update(1)
            if postfix:
                self._bar.set_postfix(self._postfix, refresh=False)
            return
        self._done += 1
        self._counted += 1
        if self._run_step is not None:
            self._run_step += 1
        now = self._clock()
        if self._counted == 1:
            self._first_done = now
        if "eta" in postfix:
            self._eta = (_number(postfix["eta"]), now)
        if self.heartbeat_s > 0 and (self._last_beat is None or now - self._last_beat >= self.heartbeat_s):
            self._last_beat = now
            self.print(self.heartbeat_line(now))

    def _seconds_per_step(self, now: float) -> Optional[float]:
        """This epoch's pace: from its first step on, or over the first step alone."""
        if self._counted > 1 and now > self._first_done:
            return (now - self._first_done) / (self._counted - 1)
        if self._counted == 1 and now > self._epoch_start:
            return now - self._epoch_start
        return None

    def heartbeat_line(self, now: Optional[float] = None) -> str:
        now = self._clock() if now is None else now
        epoch = f"epoch {self._epoch + 1}/{self._epochs}"
        if self._run_step is not None and self._total_steps is not None:
            parts = [f"step {self._run_step}/{self._total_steps} ({epoch})"]
        else:
            parts = [f"{epoch} step {self._done}/{self._steps}"]
        for key in ("loss", "lr"):
            if key in self._postfix:
                parts.append(f"{key} {self._postfix[key]}")
        pace = self._seconds_per_step(now)
        if "img_s" in self._postfix:
            parts.append(f"{self._postfix['img_s']} img/s")
        elif pace and self._global_batch:
            parts.append(f"{self._global_batch / pace:,.0f} img/s")
        elif pace:
            parts.append(f"{1 / pace:.3g} steps/s")
        eta, given_at = self._eta
        if eta is not None:
            eta -= now - given_at
        elif pace:
            if self._run_step is not None and self._total_steps is not None:
                left = self._total_steps - self._run_step
            else:  # later epochs taken to be as long as this one
                left = self._steps - self._done + (self._epochs - self._epoch - 1) * self._steps
            eta = left * pace
        if eta is not None:
            parts.append(f"ETA {format_duration(eta)}")
        return "  ".join(parts)

    def end_epoch(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
