"""The synchronous data-parallel training loop.

Per optimizer step, each worker runs ``accum_steps`` micro-batches of its slice of the global
batch; the gradient allreduce (DDP) runs on the last micro-batch only. Each micro-batch's loss is
``sum(per-image loss) / per_worker_batch`` and DDP averages over workers, so every step applies
the mean gradient over the whole global batch, whatever the world size and accumulation.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from largebatch import __version__
from largebatch.config import Config, to_dict, write_yaml_atomic
from largebatch.data import build_datasets, eval_loader, train_loader
from largebatch.distributed import Communicator, Topology, cpu_threads, select_backend, select_device
from largebatch.engine.metrics import MetricsLog, Progress
from largebatch.engine.precise_bn import recompute_batchnorm
from largebatch.engine.run_plan import RunPlan, make_run_plan
from largebatch.errors import UsageError
from largebatch.fileio import save_torch_atomic, write_bytes_atomic
from largebatch.models import create_model
from largebatch.optim import build_optimizer


@dataclass
class EvalResult:
    loss: float
    accuracy: float
    count: int


def evaluate(model: torch.nn.Module, loader, comm: Communicator, device: torch.device) -> EvalResult:
    """Exact validation: each worker scores its own unpadded shard; sums are allreduced."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    with torch.no_grad():
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            out = model(x)
            totals[0] += F.cross_entropy(out, y, reduction="sum").double()
            totals[1] += (out.argmax(1) == y).sum()
            totals[2] += y.numel()
    comm.all_reduce_sum(totals)
    loss, correct, count = totals.tolist()
    return EvalResult(loss=loss / count, accuracy=correct / count, count=int(count))


class Trainer:
    """Builds everything a run needs from a :class:`Config` and a :class:`Topology`, then ``fit()``."""

    def __init__(self, cfg: Config, topology: Topology):
        self.cfg, self.topology = cfg, topology
        self.device = select_device(topology)
        backend = select_backend(cfg.comm.backend, self.device)
        if self.device.type == "cpu":
            threads = cpu_threads(topology)
            if threads:
                torch.set_num_threads(threads)
        self.comm = Communicator(topology, backend, self.device, cfg.comm.bucket_mb)
        error: Optional[BaseException] = None
        try:
            self._build()
        except UsageError as exc:
            error = exc
        try:
            # A worker that failed here (a missing file on its node, say) must not leave the others
            # waiting in the first collective: every worker learns of it and stops with the same error.
            self.comm.raise_if_any_failed(error)
        except BaseException:
            self.comm.close()
            raise

    def _build(self) -> None:
        cfg, topo = self.cfg, self.topology
        self.train_set, self.val_set, self.info = build_datasets(cfg.data)
        self.plan: RunPlan = make_run_plan(cfg, topo.world_size, self.info.num_train)
        torch.manual_seed(cfg.run.seed)
        try:
            model = create_model(cfg.model.name, self.info.num_classes, in_channels=self.info.channels,
                                 norm=cfg.model.norm, width=cfg.model.width, image_size=self.info.image_size,
                                 zero_init_residual=cfg.model.zero_init_residual)
        except ValueError as exc:
            raise UsageError(f"model.name={cfg.model.name} does not fit {cfg.data.name} images of "
                             f"{self.info.image_size}x{self.info.image_size}: {exc}; set data.image_size "
                             "or choose another model") from None
        self.model = self.comm.wrap_model(model.to(self.device))
        self.optimizer = build_optimizer(self.comm.unwrap(self.model), cfg.optim)
        pin = self.device.type == "cuda"
        self.loader, self.sampler = train_loader(self.train_set, self.plan.batch, topo.rank, cfg.run.seed,
                                                 cfg.data.num_workers, pin)
        self.val_loader = eval_loader(self.val_set, topo.rank, topo.world_size, cfg.train.eval_batch,
                                      cfg.data.num_workers, pin)

    # ------------------------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg, topo, plan = self.cfg, self.topology, self.plan
        main = topo.is_main
        run_dir = cfg.run.dir
        progress = Progress(enabled=main)
        if main:
            os.makedirs(run_dir, exist_ok=True)
            write_yaml_atomic(to_dict(cfg), os.path.join(run_dir, "config.yaml"))
            if self.info.classes:
                write_bytes_atomic(json.dumps(list(self.info.classes)).encode(), os.path.join(run_dir, "classes.json"))
            progress.print(f"largebatch {__version__}: {cfg.model.name} on {cfg.data.name}, "
                           f"{topo.world_size} worker(s) on {self.device.type} over "
                           f"{self.comm.backend if self.comm.distributed else 'no backend'} ({topo.launcher})")
            for line in plan.lines():
                progress.print("  " + line)
        metrics = MetricsLog(os.path.join(run_dir, "metrics.jsonl") if main else None)

        bp, schedule = plan.batch, plan.schedule
        step, best_acc, time_to_target = 0, 0.0, None
        target = cfg.train.target_accuracy
        train_time, result, lr = 0.0, None, schedule(0)
        start = time.perf_counter()
        for epoch in range(plan.epochs):
            self.model.train()
            self.sampler.set_epoch(epoch)
            batches = iter(self.loader)
            loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
            progress.start_epoch(epoch, plan.epochs, plan.steps_per_epoch)
            epoch_start = time.perf_counter()
            for _ in range(plan.steps_per_epoch):
                lr = schedule(step)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                step_loss = self._train_step(batches, bp.accum_steps, bp.per_worker_batch)
                loss_sum += step_loss
                step += 1
                progress.step(**({"lr": f"{lr:.4g}"} if step % 10 else {"loss": f"{step_loss.item():.4f}",
                                                                         "lr": f"{lr:.4g}"}))
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            epoch_time = time.perf_counter() - epoch_start
            train_time += epoch_time
            progress.end_epoch()
            train_loss = self.comm.all_reduce_sum(loss_sum).item() / (plan.steps_per_epoch * topo.world_size)
            if cfg.train.precise_bn_images:
                self._precise_bn(epoch)
            result = evaluate(self.comm.unwrap(self.model), self.val_loader, self.comm, self.device)
            elapsed = time.perf_counter() - start
            best_acc = max(best_acc, result.accuracy)
            if target is not None and time_to_target is None and result.accuracy >= target:
                time_to_target = elapsed
            sps = plan.steps_per_epoch * bp.global_batch / epoch_time
            metrics.write("epoch", epoch=epoch + 1, step=step, train_loss=train_loss, val_loss=result.loss,
                          val_acc=result.accuracy, lr=lr, samples_per_sec=sps, elapsed_s=elapsed)
            progress.print(f"epoch {epoch + 1:>3}/{plan.epochs}  step {step:>6}  train_loss {train_loss:.4f}  "
                           f"val_loss {result.loss:.4f}  val_acc {result.accuracy:.4f}  lr {lr:.4g}  "
                           f"{sps:,.0f} img/s  {elapsed:.1f}s")

        elapsed = time.perf_counter() - start
        summary = dict(val_acc=result.accuracy, best_val_acc=best_acc, time_to_target_s=time_to_target,
                       samples_per_sec=plan.total_steps * bp.global_batch / train_time, elapsed_s=elapsed,
                       world_size=topo.world_size, global_batch=bp.global_batch, steps=step,
                       target_accuracy=target)
        metrics.write("summary", **summary)
        metrics.close()
        if main:
            save_torch_atomic({"model": self.comm.unwrap(self.model).state_dict(), "step": step,
                               "epoch": plan.epochs, "config": to_dict(cfg)},
                              os.path.join(run_dir, "checkpoints", "final.pt"))
            reached = "" if target is None else (
                f", target {target:.4f} reached at {time_to_target:.1f}s" if time_to_target is not None
                else f", target {target:.4f} not reached")
            progress.print(f"done: val_acc {result.accuracy:.4f} (best {best_acc:.4f}) in {elapsed:.1f}s{reached}; "
                           f"outputs in {run_dir}")
        self.comm.barrier()
        return summary

    def _precise_bn(self, epoch: int) -> None:
        """Recompute BatchNorm statistics from this epoch's first training micro-batches."""
        bp = self.plan.batch
        per_worker = -(-self.cfg.train.precise_bn_images // bp.world_size)
        count = min(-(-per_worker // bp.micro_batch), len(self.sampler))
        self.sampler.set_epoch(epoch)
        batches = itertools.islice(iter(self.loader), count)
        recompute_batchnorm(self.comm.unwrap(self.model), batches, self.device, self.comm)

    def _train_step(self, batches, accum_steps: int, per_worker_batch: int) -> torch.Tensor:
        """One optimizer step over ``accum_steps`` micro-batches; returns this worker's summed loss
        share (sum of per-image losses / per_worker_batch), detached."""
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for k in range(accum_steps):
            x, y = next(batches)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            last = k == accum_steps - 1
            with contextlib.nullcontext() if last else self.comm.no_sync(self.model):
                loss = F.cross_entropy(self.model(x), y, reduction="sum",
                                       label_smoothing=self.cfg.train.label_smoothing) / per_worker_batch
                loss.backward()
            total += loss.detach().double()
        self.optimizer.step()
        return total

    def close(self) -> None:
        self.comm.close()

