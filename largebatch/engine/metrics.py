"""What a run shows and records: metrics.jsonl lines, and a progress bar or plain epoch lines."""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, Optional

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
            if row.get("event") in ("epoch", "step", "bucket_tuning") and row.get("step", 0) <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
    return kept


class MetricsLog:
    """``metrics.jsonl``: one JSON object per line, flushed as written; optionally the same scalars
    as TensorBoard events (tag ``<event>/<field>``, x-axis the optimizer step). Only rank 0 writes:
    other ranks pass ``path=None``."""

    def __init__(self, path: Optional[str], tensorboard_dir: Optional[str] = None,
                 keep_until_step: Optional[int] = None):
        """``keep_until_step``: a resumed run keeps the epoch, step and bucket_tuning lines up to that
        step (those after it will be written again) and appends; otherwise the file starts empty."""
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


class Progress:
    """Rank 0's view of the run: a tqdm bar per epoch on a terminal, plain lines otherwise."""

    def __init__(self, enabled: bool, stream=None):
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.bar_enabled = enabled and self.stream.isatty()
        self._bar = None
        self._postfix: dict = {}

    def print(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def start_epoch(self, epoch: int, epochs: int, steps: int, initial: int = 0) -> None:
        if self.bar_enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=steps, initial=initial, desc=f"epoch {epoch + 1}/{epochs}", file=self.stream,
                             leave=False, dynamic_ncols=True, unit="step")

    def step(self, **postfix) -> None:
        """Advance the bar; ``postfix`` values (loss, lr, img_s, eta) replace those of the same name."""
        if self._bar is not None:
            self._bar.update(1)
            if postfix:
                self._postfix.update(postfix)
                self._bar.set_postfix(self._postfix, refresh=False)

    def end_epoch(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
