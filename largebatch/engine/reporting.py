"""What a run shows and records as it goes: the run header, the phase, start-up, step and epoch
lines, the summary and the closing line (rank 0 prints; ``metrics.jsonl`` gets the same facts)."""

from __future__ import annotations

import json
import os
import time
from typing import Optional

import torch

from largebatch.config import Config, ModelConfig, to_dict, write_yaml_atomic
from largebatch.distributed import Communicator, Topology
from largebatch.distributed.wrap import shard_line, unwrap
from largebatch.engine.checkpoint import checkpoint_dir
from largebatch.engine.bucket_tuning import BucketChoice
from largebatch.engine.evaluation import EvalResult
from largebatch.engine.metrics import MetricsLog, Progress
from largebatch.engine.run_plan import Phase, RunPlan, phase_line
from largebatch.engine.state import Losses, Position, Record
from largebatch.fileio import write_bytes_atomic
from largebatch.config.compare import ignored_model_keys
from largebatch.version import __version__


FSDP_BF16 = "bf16 compute on float32 master weights (FSDP2 mixed precision)"
"""What bf16 under comm.shard=full on GPUs does, in the header's sharding and precision lines."""


INITIALISATION = ("initial weights        those of the model passed in (drawn before run.seed was set): run.seed "
                  "seeds the data order and augmentation only; pass a function that builds the model to seed them too")
"""The run header's line for a model instance passed in."""


def precision_line(precision: str, fsdp_bf16: bool) -> str:
    """The run header's account of train.precision: what computes in which type."""
    if fsdp_bf16:
        return FSDP_BF16
    return {"fp32": "fp32", "bf16": "bf16 autocast (float32 weights and gradients)",
            "fp16": "fp16 autocast (float32 weights and gradients), the loss scaled by a gradient scaler"}[precision]


def ignored_model_settings(model: ModelConfig):
    """One line naming the model.* settings changed from their defaults that the model ignores
    (model.norm for a model passed in, say); None where there are none."""
    keys, why = ignored_model_keys(model.name)
    default = ModelConfig()
    changed = [f"{k}={getattr(model, k.split('.')[1])}" for k in keys
               if getattr(model, k.split(".")[1]) != getattr(default, k.split(".")[1])]
    if not changed:
        return None
    return f"{' and '.join(changed)} {'is' if len(changed) == 1 else 'are'} ignored: {why}"


class Reporter:
    """Rank 0's printed lines (through :class:`Progress`) and ``metrics.jsonl`` (:class:`MetricsLog`,
    opened by :meth:`open` once the run knows where it starts). The step lines' timing is its own:
    one every ``train.log_every_steps``."""

    def __init__(self, cfg: Config, topology: Topology, comm: Communicator, plan: RunPlan, info,
                 device: torch.device, bucket_choice: Optional[BucketChoice]):
        self.cfg, self.topology, self.comm, self.plan, self.info = cfg, topology, comm, plan, info
        self.device, self.bucket_choice = device, bucket_choice
        self.every = cfg.train.log_every_steps
        self.progress = Progress(enabled=topology.is_main)
        self.metrics: Optional[MetricsLog] = None
        self.startup_s: Optional[float] = None
        self.noise_values = None  # train.noise_scale: the last epoch's estimates (NoiseEstimate)

    def print(self, text: str) -> None:
        self.progress.print(text)

    def open(self, pos: Position, resumed: bool) -> None:
        """metrics.jsonl: a resumed run keeps its lines up to ``pos.step``; the bucket size tuned here."""
        cfg, main = self.cfg, self.topology.is_main
        self.metrics = MetricsLog(os.path.join(cfg.run.dir, "metrics.jsonl") if main else None,
                                  tensorboard_dir=os.path.join(cfg.run.dir, "tensorboard") if cfg.log.tensorboard
                                  else None, keep_until_step=pos.step if resumed else None)
        if self.bucket_choice is not None and not self.bucket_choice.from_checkpoint:
            self.metrics.write("bucket_tuning", step=pos.step, **self.bucket_choice.record())

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()

    # -- the run header --------------------------------------------------------------------------
    def header(self, names: str, model, data_line: str, precise_bn: list, channels_last: bool,
               compile_s: Optional[float], given_weights: bool = False) -> None:
        """Rank 0: the run folder, config.yaml, classes.json and the printed plan. ``names``: what
        trains on what ('cnn on digits'); ``model``: the model as wrapped; ``given_weights``: a
        model instance was passed in (its weights, not run.seed, fix the start)."""
        cfg, topo = self.cfg, self.topology
        if not topo.is_main:
            return
        os.makedirs(cfg.run.dir, exist_ok=True)
        # Only a command that trains the run writes its record (a finished run never gets here).
        write_yaml_atomic(to_dict(cfg), os.path.join(cfg.run.dir, "config.yaml"))
        if self.info.classes:
            write_bytes_atomic(json.dumps(list(self.info.classes)).encode(), os.path.join(cfg.run.dir, "classes.json"))
        backend = self.comm.backend if self.comm.distributed else "no backend"
        self.print(f"largebatch {__version__}: {names}, {topo.world_size} "
                   f"worker(s) on {self.device.type} over {backend} ({topo.launcher})")
        for line in self.plan.lines():
            self.print("  " + line)
        if given_weights:
            self.print(f"  {INITIALISATION}")
        ignored = ignored_model_settings(cfg.model)
        if ignored:
            self.print(f"largebatch: warning: {ignored}")
        self._print_engine(model, data_line, precise_bn)
        self.print(f"  precision              {precision_line(cfg.train.precision, self.comm.param_dtype is not None)}")
        speed = [f"channels-last {'on' if channels_last else 'off'}"]
        if compile_s is not None:
            mode = "default" if cfg.train.compile is True else cfg.train.compile
            speed.append(f"torch.compile (mode {mode}) took {compile_s:.1f}s")
        if self.device.type == "cuda":
            speed.append("cudnn.benchmark on")
        self.print(f"  speed                  {', '.join(speed)}")
        if self.info.augment != "none":
            self.print(f"  augmentation           {self.info.augment} (training images only)")

    def _print_engine(self, model, data_line: str, precise_bn: list) -> None:
        """The header's lines on sharding, gradient buckets, the data path and BatchNorm statistics."""
        sharding = shard_line(self.comm, unwrap(model))
        if self.comm.param_dtype is not None:
            sharding += "; " + FSDP_BF16
        self.print(f"  sharding               {sharding}")
        if self.bucket_choice is not None:
            self.print(f"  gradient buckets       {self.bucket_choice.line()}")
        elif self.cfg.comm.bucket_mb == "auto" and self.comm.shard == "full":
            self.print("  gradient buckets       comm.bucket_mb=auto does not apply under comm.shard=full (FSDP2 "
                       "reduce-scatters each block's gradients); no tuning")
        self.print(f"  training data          {data_line}")
        choices = list(dict.fromkeys(precise_bn))
        if len(choices) == 1:
            self.print(f"  BatchNorm statistics   {choices[0].line()}")
        else:
            for phase, choice in zip(self.plan.phases, precise_bn):
                self.print(f"  BatchNorm statistics   phase {phase.index + 1}: {choice.line()}")

    # -- as the run goes -------------------------------------------------------------------------
    def phase_started(self, phase: Phase) -> None:
        if self.plan.phased:
            self.print(phase_line(phase, len(self.plan.phases)))

    def start_epoch(self, pos: Position, phase: Phase) -> None:
        self.progress.start_epoch(pos.epoch, self.plan.epochs, phase.steps_per_epoch, initial=pos.step_in_epoch,
                                  step=pos.step, total_steps=self.plan.total_steps,
                                  global_batch=phase.batch.global_batch)

    def first_step(self, step: int, started: float, built_s: float, compile_s: Optional[float],
                   resumed: bool) -> None:
        """After this process's first step (``step`` steps done), and only then: the seconds from
        start (``started``) to its end, and what they went to."""
        if self.startup_s is not None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.startup_s = time.perf_counter() - started
        compiling = compile_s or 0.0
        if not resumed:  # a resumed run keeps the record of how the run started
            self.metrics.write("startup", step=step, first_step_s=self.startup_s, build_s=built_s - compiling,
                               compile_s=compiling)
        self.print(f"first step done {self.startup_s:.1f}s after start (building {built_s - compiling:.1f}s"
                   + (f", compiling {compiling:.1f}s" if compile_s is not None else "") + ")")

    def line_due(self, step: int) -> bool:
        """Whether a step line follows step ``step`` (``step`` steps done)."""
        return bool(self.every) and step % self.every == 0

    def after_step(self, pos: Position, lr: float, losses: Losses) -> None:
        """A step line where one is due, else the progress bar's tick."""
        if self.line_due(pos.step):
            self._step_line(pos, lr, losses)
            losses.restart_window()
        else:
            self.progress.step(lr=f"{lr:.4g}")

    def _step_line(self, pos: Position, lr: float, losses: Losses) -> None:
        """Mean loss over the steps since the last line (all workers), lr, images/s and the share of
        this worker's time spent waiting for data."""
        finite_steps = losses.window_steps * self.topology.world_size
        loss = self.comm.all_reduce_sum(losses.window.clone()).item() / finite_steps if finite_steps else float("nan")
        seconds = max(time.perf_counter() - losses.start, 1e-9)
        sps = losses.images / seconds
        self.metrics.write("step", epoch=pos.epoch + 1, step=pos.step, loss=loss, lr=lr, samples_per_sec=sps,
                           data_wait=losses.data_wait / seconds)
        remaining = (self.plan.total_steps - pos.step) * seconds / max(losses.timed, 1)
        self.progress.step(loss=f"{loss:.4f}", lr=f"{lr:.4g}", img_s=f"{sps:,.0f}", eta=f"{remaining:.0f}s")

    def end_epoch(self) -> None:
        self.progress.end_epoch()

    def epoch_line(self, pos: Position, phase: Phase, train_loss: float, result: EvalResult, record: Record,
                   lr: float, sps: float, adaptive_batch: Optional[int] = None) -> None:
        """The epoch's line and metrics (``pos`` at the epoch's last step; ``adaptive_batch``: the
        adaptive batch in use at its end)."""
        extra = {} if result.top5 is None else {"val_acc_top5": result.top5}
        if self.plan.phased:
            extra.update(global_batch=phase.batch.global_batch, image_size=phase.image_size or self.info.image_size)
        if adaptive_batch is not None:
            extra.update(global_batch=adaptive_batch)
        if self.info.reads_files:
            extra["skipped_files"] = record.skipped_files
        if self.noise_values is not None:
            extra.update(self.noise_values.fields())
        noise_scale = None if self.noise_values is None else self.noise_values.noise_scale
        epoch = pos.epoch + 1
        self.metrics.write("epoch", epoch=epoch, step=pos.step, train_loss=train_loss, val_loss=result.loss,
                           val_acc=result.accuracy, **extra, lr=lr, samples_per_sec=sps, elapsed_s=pos.elapsed,
                           skipped_steps=pos.skipped_steps)
        self.print(f"epoch {epoch:>3}/{self.plan.epochs}  step {pos.step:>6}  train_loss {train_loss:.4f}  "
                   f"val_loss {result.loss:.4f}  val_acc {result.accuracy:.4f}"
                   + (f"  top5 {result.top5:.4f}" if result.top5 is not None else "")
                   + ("" if self.noise_values is None else "  noise scale "
                      + ("— (noise swamps the gradient)" if noise_scale is None else f"{noise_scale:,.0f}"))
                   + ("" if adaptive_batch is None else f"  batch {adaptive_batch}")
                   + f"  lr {lr:.4g}  {sps:,.0f} img/s  {pos.elapsed:.1f}s")

    def batch_decision(self, pos: Position, decision, noise_scale: Optional[float], lr: float) -> None:
        """The adaptive batch's decision at a step boundary: metrics.jsonl always, a line where it changed."""
        self.metrics.write("batch", step=pos.step, epoch=pos.epoch + 1, images_in_epoch=pos.images_in_epoch,
                           global_batch=decision.global_batch, previous=decision.previous, changed=decision.changed,
                           lr=lr, noise_scale=noise_scale, b_crit=decision.b_crit, reason=decision.reason,
                           candidates=[c.fields() for c in decision.candidates])
        if decision.changed:
            self.print(f"step {pos.step}: global batch {decision.previous} -> {decision.global_batch}, "
                                f"lr {lr:.4g} ({decision.reason})")

    def reached_target(self, epoch: int) -> None:
        self.print(f"target {self.cfg.train.target_metric} {self.cfg.train.target_accuracy} reached at epoch "
                   f"{epoch}: stopping (train.stop_at_target)")

    def stopped_on_signal(self, step: int) -> dict:
        self.end_epoch()
        self.print(f"stopping on a signal after step {step}: checkpoint written to "
                   f"{checkpoint_dir(self.cfg.run.dir)}; run the same command to resume")
        self.close()
        return dict(stopped_at_step=step)

    # -- the end ---------------------------------------------------------------------------------
    def summary(self, result: EvalResult, record: Record, pos: Position, elapsed: float,
                scaler_used: bool, adaptive: Optional[dict] = None) -> dict:
        """The run's summary, written as metrics.jsonl's last line (``adaptive``: the adaptive
        batch's state at the end)."""
        cfg, topo = self.cfg, self.topology
        batch = self.plan.locate(max(pos.step - 1, 0))[0].batch.global_batch  # the phase the run ended in
        images = self.plan.images_before(pos.step)
        if adaptive is not None:
            batch, images = adaptive["global_batch"], pos.images
        summary = dict(val_acc=result.accuracy, best_val_acc=record.best_acc, time_to_target_s=record.time_to_target,
                       epoch_to_target=record.epoch_to_target, samples_per_sec=images / max(pos.train_time, 1e-9),
                       elapsed_s=elapsed, world_size=topo.world_size, global_batch=batch, steps=pos.step,
                       skipped_steps=pos.skipped_steps, target_accuracy=cfg.train.target_accuracy,
                       target_metric=cfg.train.target_metric, nodes=topo.num_nodes)
        if self.comm.distributed and self.comm.shard != "full":
            summary["bucket_mb"] = self.comm.bucket_mb
        if self.bucket_choice is not None:
            summary["bucket_tuning_s"] = self.bucket_choice.tuning_s
        if scaler_used:
            summary["scaler_skipped_steps"] = pos.scaler_skipped_steps
        if self.startup_s is not None:
            summary["startup_s"] = self.startup_s
        if self.noise_values is not None:
            summary.update(self.noise_values.fields())
        if adaptive is not None:
            summary.update(images=pos.images, batch_decisions=adaptive["decisions"], batch_changes=adaptive["changes"])
        if result.top5 is not None:
            summary.update(val_acc_top5=result.top5, best_val_acc_top5=record.best_top5)
        if self.info.reads_files:
            summary["skipped_files"] = record.skipped_files
        if cfg.run.cost_per_node_hour is not None:
            summary["cost"] = cfg.run.cost_per_node_hour * topo.num_nodes * elapsed / 3600.0
        self.metrics.write("summary", **summary)
        self.close()
        return summary

    def closing_line(self, summary: dict) -> None:
        cfg = self.cfg
        text = (f"done: val_acc {summary['val_acc']:.4f} (best {summary['best_val_acc']:.4f}) in "
                f"{summary['elapsed_s']:.1f}s")
        if cfg.train.target_accuracy is not None:
            if summary["time_to_target_s"] is not None:
                text += (f"; {cfg.train.target_metric} target {cfg.train.target_accuracy} reached at epoch "
                         f"{summary['epoch_to_target']}, {summary['time_to_target_s']:.1f}s")
            else:
                text += f"; {cfg.train.target_metric} target {cfg.train.target_accuracy} not reached"
        if "cost" in summary:
            text += f"; cost {summary['cost']:.2f} ({summary['nodes']} node(s) at {cfg.run.cost_per_node_hour}/h)"
        self.print(text + f"; outputs in {cfg.run.dir}")

    def finished_run(self, restored: dict, validate) -> dict:
        """A finished run met again: say so and give its summary, writing nothing in its folder.
        ``validate`` scores the weights it ended with, where its metrics are gone."""
        stored = None
        if self.topology.is_main:
            try:
                with open(os.path.join(self.cfg.run.dir, "metrics.jsonl")) as fh:
                    lines = [json.loads(x) for x in fh if '"event": "summary"' in x]
                stored = {k: v for k, v in lines[-1].items() if k != "event"} if lines else None
            except (OSError, ValueError):
                stored = None
        summary = self.comm.broadcast_object(stored)
        step = restored["position"]["step"]
        if summary is None:
            result = validate()
            summary = dict(val_acc=result.accuracy, best_val_acc=restored["record"]["best_acc"], steps=step)
        self.print(f"{self.cfg.run.dir} holds a finished run (step {step}, val_acc {summary['val_acc']:.4f}, best "
                   f"{summary['best_val_acc']:.4f}); nothing was trained or written. To train again, use "
                   "another run.dir or checkpoint.resume=never; python -m largebatch.report shows it")
        return summary
