"""The hot path: one optimizer step, and how its outcome reaches the host.

A step runs ``accum_steps`` micro-batches of this worker's slice of the global batch (the gradient
allreduce on the last one only), checks the averaged gradient for non-finite values, and updates
the weights, without reading a device value on the host. The check gives a flag on the device;
the optimizer reads it through the ``found_inf`` protocol of torch's fused optimizers and
``torch.amp.GradScaler`` (set as an attribute before ``step()``) and skips the update on the device.
The host learns what happened a few steps later through a :class:`Ledger`, as soon as the device has
finished those steps, and at the latest before the next step line, checkpoint or epoch end.

Outcome codes (an int32 tensor per step): ``APPLIED``; ``NONFINITE`` (a non-finite loss or gradient
on any worker, which makes the allreduced gradient non-finite everywhere, so every worker skips the
same steps); ``SCALER_SKIP`` (fp16: the gradient scaler met an overflow and lowered its scale).

Under ``comm.shard=full`` each worker holds a shard of each gradient and checks only its shard; the
flag is agreed by a one-element allreduce on the device (``Communicator.any_on_device``), so every
worker still skips the same steps. Under ``comm.shard=optimizer`` the ZeroRedundancyOptimizer hands
the flag to the optimizer inside it.
"""

from __future__ import annotations

import collections
import contextlib
import time
from typing import Callable, Iterator, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from largebatch.distributed import local
from largebatch.distributed.wrap import no_sync
from largebatch.engine.noise import batch_sizes, first_micro_batch_sq_norm, squared_norm_of_norms

APPLIED, NONFINITE, SCALER_SKIP = 1, 0, 2


class StepResult(NamedTuple):
    """One optimizer step as the loop sees it; nothing in it waits for the device."""
    lr: float
    loss: torch.Tensor
    """This worker's loss share (float64 on the device; NaN on a non-finite step)."""
    data_wait: float
    """Seconds spent waiting for data."""
    outcome: torch.Tensor
    """The outcome code (int32 on the device): APPLIED, NONFINITE or SCALER_SKIP."""
    stopping: bool
    """Every worker agreed to stop after this step (a signal, or an unreadable image)."""


def prepare_inputs(x: torch.Tensor, y: torch.Tensor, device: torch.device,
                   memory_format: torch.memory_format = torch.contiguous_format) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch on the device, its images in the model's memory format."""
    x = x.to(device, non_blocking=True)
    if x.dim() == 4:
        x = x.contiguous(memory_format=memory_format)
    return x, y.to(device, non_blocking=True)


class Stepper:
    """Runs optimizer steps for the trainer; built once the model, optimizer and loaders exist."""

    def __init__(self, model: nn.Module, bare_model: nn.Module, optimizer: torch.optim.Optimizer, comm,
                 device: torch.device, autocast: Callable, scaler: Optional[torch.amp.GradScaler], faults,
                 label_smoothing: float = 0.0, channels_last: bool = False,
                 on_allreduce_error: Callable[[BaseException, int], None] = None, noise=None,
                 noise_source: Optional[str] = None):
        self.model, self.optimizer, self.comm, self.device = model, optimizer, comm, device
        self.autocast, self.scaler, self.faults = autocast, scaler, faults
        self.label_smoothing = label_smoothing
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.params = [p for p in bare_model.parameters() if p.requires_grad]
        self.on_allreduce_error = on_allreduce_error
        # comm.shard=full: each worker sees its shards of the gradients only, and the workers agree.
        self.agree = getattr(comm, "shard", "none") == "full"
        # torch's fused optimizers, LARS and LAMB skip an update on the device from a found_inf
        # flag; any other optimizer is stepped only after the flag is read on the host. Under
        # comm.shard=optimizer the optimizer inside the ZeroRedundancyOptimizer decides.
        self.device_skip = getattr(optimizer, "_step_supports_amp_scaling", False)
        # train.noise_scale: a largebatch.engine.noise.NoiseScale, and where its two batch sizes come
        # from ('workers' or 'micro-batches'); None: nothing is measured and the step does no more.
        self.noise, self.noise_source = noise, noise_source
        # 'adaptive': rank 0 alone measures |G_b|² of the first micro-batch of the global batch, the
        # same images on any number of workers (largebatch.engine.adaptive); the others measure nothing.
        self.measures = noise is not None and (noise_source != "adaptive" or comm.topology.rank == 0)

    def __call__(self, batches: Iterator, accum_steps: int, per_worker_batch: int,
                 step: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """One optimizer step. Returns this worker's loss share (sum of per-image losses /
        per_worker_batch, float64 on the device; NaN on a non-finite step), the outcome code (int32
        on the device) and the seconds spent waiting for data."""
        self.faults.at_step_start(step)
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        wait = 0.0
        small = None  # train.noise_scale: |G_b|² of the smaller batch, on the device
        if self.noise is not None and getattr(self.comm, "noise_meter", None) is not None:
            self.comm.noise_meter.reset()
        for k in range(accum_steps):
            t0 = time.perf_counter()
            x, y = next(batches)
            wait += time.perf_counter() - t0
            x, y = prepare_inputs(x, y, self.device, self.memory_format)
            last = k == accum_steps - 1
            with contextlib.nullcontext() if last else no_sync(self.model):
                with self.autocast():
                    logits = self.model(x)
                loss = F.cross_entropy(logits.float(), y, reduction="sum",
                                       label_smoothing=self.label_smoothing) / per_worker_batch
                if self.faults.poison(step):
                    loss = loss * float("nan")
                scaled = loss if self.scaler is None else self.scaler.scale(loss)
                if last:
                    self.faults.before_allreduce(step)
                    self.comm.mark_arrived(step)
                    self._backward(scaled, step)
                else:
                    scaled.backward()
                    if k == 0 and self.measures and self.noise_source in ("micro-batches", "adaptive"):
                        # the first micro-batch's gradient is G_b / accum_steps (loss / per_worker_batch)
                        small = first_micro_batch_sq_norm([p.grad for p in self.params], accum_steps,
                                                          self._loss_scale())
            total += loss.detach().double()
        return total, self._update(*self._noise_pair(small, accum_steps, per_worker_batch)), wait

    def _noise_pair(self, small: Optional[torch.Tensor], accum_steps: int,
                    per_worker_batch: int) -> tuple[Optional[torch.Tensor], Optional[tuple[int, int]]]:
        """(|G_b|², (b, B)) for the noise scale this step, or (None, None) where it measures nothing."""
        if not self.measures:
            return None, None
        world = self.comm.topology.world_size
        by_hook = self.noise_source == "workers" or (self.noise_source == "adaptive" and accum_steps == 1)
        if by_hook:
            if world == 1:  # one worker, one micro-batch: a single batch size, nothing to compare
                return None, None
            small = self.comm.local_sq_norm()
            if self.scaler is not None:  # the hook saw the scaled gradient
                small = small / self._loss_scale().float().square()
        source = "workers" if by_hook else self.noise_source
        return small, batch_sizes(source, per_worker_batch * world, per_worker_batch, per_worker_batch // accum_steps)

    def _loss_scale(self) -> Optional[torch.Tensor]:
        """fp16's loss scale as a device tensor, or None."""
        return None if self.scaler is None else self.scaler._get_scale_async()

    def _backward(self, loss: torch.Tensor, step: int) -> None:
        try:
            loss.backward()
        except RuntimeError as exc:
            if self.on_allreduce_error is None:
                raise
            self.on_allreduce_error(exc, step)
            raise

    def _update(self, small: Optional[torch.Tensor] = None, sizes: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """Check the averaged gradient and apply it, or skip the update, all on the device. With
        ``small`` (train.noise_scale: |G_b|²) and ``sizes`` (b, B), the step is folded into the noise
        scale's averages first, from the per-tensor norms of the check (LARS and LAMB rewrite the
        gradients in place)."""
        opt = self.optimizer
        if self.scaler is not None:
            self.scaler.unscale_(opt)
        grads = [local(p.grad) for p in self.params if p.grad is not None]
        norms = torch._foreach_norm(grads) if grads else []
        found = (~torch.isfinite(torch.stack(norms)).all()) if grads else \
            torch.zeros((), dtype=torch.bool, device=self.device)
        if self.agree:
            found = self.comm.any_on_device(found)
        if small is not None and norms:  # |G_B|² of the averaged gradient; a non-finite step is left out
            self.noise.update(small, squared_norm_of_norms(norms), *sizes, skip=found)
        if self.scaler is not None:
            self.scaler.step(opt)  # hands its own found_inf to the optimizer, or skips after reading it
            self.scaler.update()
            skipped = SCALER_SKIP
        elif self.device_skip:
            opt.found_inf, opt.grad_scale = found.float(), None
            try:
                opt.step()
            finally:
                del opt.found_inf, opt.grad_scale
            skipped = NONFINITE
        else:
            skipped = NONFINITE
            if not bool(found):
                opt.step()
        return torch.where(found, skipped, APPLIED).to(torch.int32)


class Ledger:
    """Step outcomes on their way from the device to the host, oldest first.

    On CUDA each outcome is copied into pinned host memory without waiting and an event marks when
    it has arrived; ``take(wait=False)`` returns those already there, ``take(wait=True)`` all of them.
    On the CPU an outcome is known at once. ``lag`` holds back the newest outcomes even on the CPU
    (tests use it to exercise the delayed path).
    """

    def __init__(self, device: torch.device, lag: int = 0):
        self.device, self.lag = device, lag
        self.pending: collections.deque = collections.deque()

    def __len__(self) -> int:
        return len(self.pending)

    def add(self, step: int, outcome: torch.Tensor) -> None:
        if self.device.type == "cuda":
            host = torch.empty((), dtype=outcome.dtype, pin_memory=True)
            host.copy_(outcome, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self.pending.append((step, host, event))
        else:
            self.pending.append((step, outcome, None))

    def take(self, wait: bool) -> list[tuple[int, int]]:
        """[(step, outcome code)] in step order: all pending with ``wait``, else those that arrived."""
        out = []
        while self.pending and (wait or len(self.pending) > self.lag):
            step, host, event = self.pending[0]
            if event is not None and not event.query():
                if not wait:
                    break
                event.synchronize()
            out.append((step, int(host.numpy())))
            self.pending.popleft()
        return out
