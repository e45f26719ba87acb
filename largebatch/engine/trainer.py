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
from largebatch.engine.metrics import MetricsLog, Progress, tensorboard_writer_class
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
    """Top-1 accuracy."""
    top5: Optional[float]
    """Top-5 accuracy, where there are more than 5 classes."""
    count: int


def evaluate(model: torch.nn.Module, loader, comm: Communicator, device: torch.device,
             num_classes: int) -> EvalResult:
    """Exact validation: each worker scores its own unpadded shard; sums are allreduced."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1, top-5, count
    with torch.no_grad():
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            out = model(x)
            totals[0] += F.cross_entropy(out, y, reduction="sum").double()
            totals[1] += (out.argmax(1) == y).sum()
            if num_classes > 5:
                totals[2] += (out.topk(5, dim=1).indices == y[:, None]).any(dim=1).sum()
            totals[3] += y.numel()
    comm.all_reduce_sum(totals)
    loss, top1, top5, count = totals.tolist()
    return EvalResult(loss=loss / count, accuracy=top1 / count,
                      top5=top5 / count if num_classes > 5 else None, count=int(count))


@dataclass
class _Record:
    """What the run has reached so far (identical on every worker)."""
    best_acc: float = 0.0
    best_top5: Optional[float] = None
    time_to_target: Optional[float] = None
    epoch_to_target: Optional[int] = None

    def update(self, epoch: int, result: EvalResult, elapsed: float, target: Optional[float], metric: str) -> bool:
        """Fold in one validation; True when the target was reached for the first time."""
        self.best_acc = max(self.best_acc, result.accuracy)
        if result.top5 is not None:
            self.best_top5 = max(self.best_top5 or 0.0, result.top5)
        value = result.top5 if metric == "top5" else result.accuracy
        if target is not None and self.time_to_target is None and value is not None and value >= target:
            self.time_to_target, self.epoch_to_target = elapsed, epoch
            return True
        return False


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
        if cfg.log.tensorboard and topo.is_main:
            tensorboard_writer_class()
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
        bp, schedule, every = plan.batch, plan.schedule, cfg.train.log_every_steps
        progress = Progress(enabled=topo.is_main)
        self._write_run_header(progress)
        metrics = MetricsLog(os.path.join(cfg.run.dir, "metrics.jsonl") if topo.is_main else None,
                             tensorboard_dir=os.path.join(cfg.run.dir, "tensorboard") if cfg.log.tensorboard else None)
        record, result, step, train_time, lr = _Record(), None, 0, 0.0, schedule(0)
        start = time.perf_counter()
        for epoch in range(plan.epochs):
            self.model.train()
            self.sampler.set_epoch(epoch)
            batches = iter(self.loader)
            loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
            window_loss = torch.zeros((), dtype=torch.float64, device=self.device)
            window = dict(start=time.perf_counter(), wait=0.0, steps=0)
            progress.start_epoch(epoch, plan.epochs, plan.steps_per_epoch)
            epoch_start = time.perf_counter()
            for _ in range(plan.steps_per_epoch):
                lr = schedule(step)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                step_loss, wait = self._train_step(batches, bp.accum_steps, bp.per_worker_batch)
                loss_sum += step_loss
                window_loss += step_loss
                window["wait"] += wait
                window["steps"] += 1
                step += 1
                if every and step % every == 0:
                    self._log_steps(metrics, progress, epoch, step, lr, window_loss, window)
                    window_loss.zero_()
                    window = dict(start=time.perf_counter(), wait=0.0, steps=0)
                else:
                    progress.step(lr=f"{lr:.4g}")
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            epoch_time = time.perf_counter() - epoch_start
            train_time += epoch_time
            progress.end_epoch()
            train_loss = self.comm.all_reduce_sum(loss_sum).item() / (plan.steps_per_epoch * topo.world_size)
            if cfg.train.precise_bn_images:
                self._precise_bn(epoch)
            result = evaluate(self.comm.unwrap(self.model), self.val_loader, self.comm, self.device,
                              self.info.num_classes)
            elapsed = time.perf_counter() - start
            reached = record.update(epoch + 1, result, elapsed, cfg.train.target_accuracy, cfg.train.target_metric)
            sps = plan.steps_per_epoch * bp.global_batch / epoch_time
            top5 = {} if result.top5 is None else {"val_acc_top5": result.top5}
            metrics.write("epoch", epoch=epoch + 1, step=step, train_loss=train_loss, val_loss=result.loss,
                          val_acc=result.accuracy, **top5, lr=lr, samples_per_sec=sps, elapsed_s=elapsed)
            progress.print(f"epoch {epoch + 1:>3}/{plan.epochs}  step {step:>6}  train_loss {train_loss:.4f}  "
                           f"val_loss {result.loss:.4f}  val_acc {result.accuracy:.4f}"
                           + (f"  top5 {result.top5:.4f}" if result.top5 is not None else "")
                           + f"  lr {lr:.4g}  {sps:,.0f} img/s  {elapsed:.1f}s")
            if reached and cfg.train.stop_at_target:
                progress.print(f"target {cfg.train.target_metric} {cfg.train.target_accuracy} reached at epoch "
                               f"{epoch + 1}: stopping (train.stop_at_target)")
                break
        summary = self._summary(result, record, step, train_time, time.perf_counter() - start)
        metrics.write("summary", **summary)
        metrics.close()
        if topo.is_main:
            save_torch_atomic({"model": self.comm.unwrap(self.model).state_dict(), "step": step,
                               "epoch": record_epoch(step, plan), "config": to_dict(cfg)},
                              os.path.join(cfg.run.dir, "checkpoints", "final.pt"))
            progress.print(_closing_line(summary, cfg))
        self.comm.barrier()
        return summary

    def _write_run_header(self, progress: Progress) -> None:
        """Rank 0: the run folder, config.yaml, classes.json and the printed plan."""
        cfg, topo = self.cfg, self.topology
        if not topo.is_main:
            return
        os.makedirs(cfg.run.dir, exist_ok=True)
        write_yaml_atomic(to_dict(cfg), os.path.join(cfg.run.dir, "config.yaml"))
        if self.info.classes:
            write_bytes_atomic(json.dumps(list(self.info.classes)).encode(), os.path.join(cfg.run.dir, "classes.json"))
        backend = self.comm.backend if self.comm.distributed else "no backend"
        progress.print(f"largebatch {__version__}: {cfg.model.name} on {cfg.data.name}, {topo.world_size} "
                       f"worker(s) on {self.device.type} over {backend} ({topo.launcher})")
        for line in self.plan.lines():
            progress.print("  " + line)

    def _log_steps(self, metrics: MetricsLog, progress: Progress, epoch: int, step: int, lr: float,
                   window_loss: torch.Tensor, window: dict) -> None:
        """A step line: mean loss over the steps since the last one (all workers), lr, images/s and
        the share of this worker's time spent waiting for data."""
        loss = self.comm.all_reduce_sum(window_loss.clone()).item() / (window["steps"] * self.topology.world_size)
        seconds = time.perf_counter() - window["start"]
        sps = window["steps"] * self.plan.batch.global_batch / seconds
        metrics.write("step", epoch=epoch + 1, step=step, loss=loss, lr=lr, samples_per_sec=sps,
                      data_wait=window["wait"] / seconds)
        remaining = (self.plan.total_steps - step) * seconds / window["steps"]
        progress.step(loss=f"{loss:.4f}", lr=f"{lr:.4g}", img_s=f"{sps:,.0f}", eta=f"{remaining:.0f}s")

    def _summary(self, result: EvalResult, record: _Record, step: int, train_time: float, elapsed: float) -> dict:
        cfg, topo, bp = self.cfg, self.topology, self.plan.batch
        summary = dict(val_acc=result.accuracy, best_val_acc=record.best_acc, time_to_target_s=record.time_to_target,
                       epoch_to_target=record.epoch_to_target, samples_per_sec=step * bp.global_batch / train_time,
                       elapsed_s=elapsed, world_size=topo.world_size, global_batch=bp.global_batch, steps=step,
                       target_accuracy=cfg.train.target_accuracy, target_metric=cfg.train.target_metric,
                       nodes=topo.num_nodes)
        if result.top5 is not None:
            summary.update(val_acc_top5=result.top5, best_val_acc_top5=record.best_top5)
        if cfg.run.cost_per_node_hour is not None:
            summary["cost"] = cfg.run.cost_per_node_hour * topo.num_nodes * elapsed / 3600.0
        return summary

    def _precise_bn(self, epoch: int) -> None:
        """Recompute BatchNorm statistics from this epoch's first training micro-batches."""
        bp = self.plan.batch
        per_worker = -(-self.cfg.train.precise_bn_images // bp.world_size)
        count = min(-(-per_worker // bp.micro_batch), len(self.sampler))
        self.sampler.set_epoch(epoch)
        batches = itertools.islice(iter(self.loader), count)
        recompute_batchnorm(self.comm.unwrap(self.model), batches, self.device, self.comm)

    def _train_step(self, batches, accum_steps: int, per_worker_batch: int) -> tuple[torch.Tensor, float]:
        """One optimizer step over ``accum_steps`` micro-batches. Returns this worker's summed loss
        share (sum of per-image losses / per_worker_batch, detached) and the seconds spent waiting
        for data."""
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        wait = 0.0
        for k in range(accum_steps):
            t0 = time.perf_counter()
            x, y = next(batches)
            wait += time.perf_counter() - t0
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            last = k == accum_steps - 1
            with contextlib.nullcontext() if last else self.comm.no_sync(self.model):
                loss = F.cross_entropy(self.model(x), y, reduction="sum",
                                       label_smoothing=self.cfg.train.label_smoothing) / per_worker_batch
                loss.backward()
            total += loss.detach().double()
        self.optimizer.step()
        return total, wait

    def close(self) -> None:
        self.comm.close()



def record_epoch(step: int, plan: RunPlan) -> int:
    """Epochs completed after ``step`` optimizer steps."""
    return step // plan.steps_per_epoch


def _closing_line(summary: dict, cfg: Config) -> str:
    text = f"done: val_acc {summary['val_acc']:.4f} (best {summary['best_val_acc']:.4f}) in {summary['elapsed_s']:.1f}s"
    if cfg.train.target_accuracy is not None:
        if summary["time_to_target_s"] is not None:
            text += (f"; {cfg.train.target_metric} target {cfg.train.target_accuracy} reached at epoch "
                     f"{summary['epoch_to_target']}, {summary['time_to_target_s']:.1f}s")
        else:
            text += f"; {cfg.train.target_metric} target {cfg.train.target_accuracy} not reached"
    if "cost" in summary:
        text += f"; cost {summary['cost']:.2f} ({summary['nodes']} node(s) at {cfg.run.cost_per_node_hour}/h)"
    return text + f"; outputs in {cfg.run.dir}"
