"""The synchronous data-parallel training loop.

Per optimizer step, each worker runs ``accum_steps`` micro-batches of its slice of the global
batch; the gradient allreduce (DDP) runs on the last micro-batch only. Each micro-batch's loss is
``sum(per-image loss) / per_worker_batch`` and DDP averages over workers, so every step applies
the mean gradient over the whole global batch, whatever the world size and accumulation.

Under ``comm.shard=full`` (FSDP2) the gradients are reduce-scattered on the last micro-batch
instead, and every forward pass all-gathers weights with every other worker.

:class:`Trainer` wires the parts (:mod:`~largebatch.engine.build` builds them) and runs the loop;
each concern of the loop has an owner that decides its own timing: the step lines
(:mod:`~largebatch.engine.reporting`), checkpoints (:mod:`~largebatch.engine.checkpointer`),
validation (:mod:`~largebatch.engine.evaluation`), the stop agreement and the non-finite guard
(:mod:`~largebatch.engine.guards`).
"""

from __future__ import annotations

import functools
import os
import time
from typing import Optional

import torch

from largebatch.batching import BatchPlan
from largebatch.config import Config
from largebatch.distributed import Topology
from largebatch.distributed.wrap import build_optimizer, grad_scaler, unwrap, wrap_model
from largebatch.engine.adaptive import (AdaptiveBatch, describe_step_time, measure_step_time, restored_step_time,
                                        state_kept, step_timer)
from largebatch.engine.build import (check_same_everywhere, check_target_metric, choose_bucket_size, choose_data_path,
                                     compile_rehearsal, image_sizes, make_communicator, make_loaders, missing_dirs,
                                     noise_source, precision, set_up_device, start_reading)
from largebatch.engine.checkpointer import Checkpointer, find_resume_state
from largebatch.engine.evaluation import EvalResult, Validator, precise_bn_per_phase
from largebatch.engine.guards import (FaultInjection, NonFiniteGuard, RunLock, StopAgreement, StopSignal,
                                      UnreadableImages, name_missing_workers)
from largebatch.engine.metrics import tensorboard_writer_class
from largebatch.engine.noise import NoiseScale
from largebatch.engine.reporting import Reporter
from largebatch.engine.run_plan import Phase, RunPlan, check_trainable, has_batchnorm, make_run_plan
from largebatch.engine.speed import check_compiler, compile_model, wants_channels_last
from largebatch.engine.state import Losses, Position, Record, Stopwatch
from largebatch.engine.step import APPLIED, Ledger, Stepper, StepResult
from largebatch.errors import UsageError
from largebatch.models.sizes import sides
from largebatch.parts import PartsSource, check_model, fingerprints, from_config


class Trainer:
    """Builds everything a run needs from a :class:`Config`, a :class:`Topology` and its parts (the
    model and datasets: ``parts``, a :data:`largebatch.parts.PartsSource`; by default those the config
    names), then ``fit()``. ``ledger_lag``: step outcomes the host holds back even where it could
    read them at once (tests use it to exercise the delayed path; see :class:`Ledger`)."""

    def __init__(self, cfg: Config, topology: Topology, parts: Optional[PartsSource] = None, ledger_lag: int = 0):
        self.started = time.perf_counter()
        self.cfg, self.topology = cfg, topology
        self.parts_source = parts or from_config
        self.ledger_lag = ledger_lag
        self.device, backend = set_up_device(cfg, topology)
        self.autocast, param_dtype = precision(cfg, self.device)
        self.comm = make_communicator(cfg, topology, self.device, backend, param_dtype)
        self.scaler = grad_scaler(self.comm) if cfg.train.precision == "fp16" else None
        self.lock = RunLock(cfg.run.dir)
        self.faults = FaultInjection.from_env(topology.rank)
        self.compile_s: Optional[float] = None
        self.agreement: Optional[StopAgreement] = None
        error: Optional[BaseException] = None
        try:
            self._build()
        except Exception as exc:  # a UsageError, or an error in the user's own code (its traceback kept)
            error = exc
        try:
            # A worker that failed here (a missing file on its node, say) must not leave the others
            # waiting in the first collective: every worker learns of it and stops with the same error.
            self.comm.raise_if_any_failed(error)
            check_same_everywhere(cfg, self.comm, self.fingerprints)
            self._connect()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        """Everything that may fail on some workers only; nothing here runs a collective."""
        cfg, topo = self.cfg, self.topology
        if topo.is_main:
            self.made_dirs = missing_dirs(cfg.run.dir)
            try:
                self.lock.acquire()
            except OSError as exc:
                raise UsageError(f"run.dir '{cfg.run.dir}' cannot be written ({exc.strerror}); "
                                 "choose a writable folder") from None
        if cfg.log.tensorboard and topo.is_main:
            tensorboard_writer_class()
        parts = self.parts_source(cfg, cfg.run.seed, topo.is_main)
        self.train_set, self.val_set, self.info = parts.train_set, parts.val_set, parts.info
        self.model_name, self.data_name = parts.model_name, parts.data_name
        self.fingerprints = fingerprints(parts)  # compared between the workers once all are built
        self.given_weights = parts.given_weights
        self.plan: RunPlan = make_run_plan(cfg, topo.world_size, self.info.num_train, announce=False)
        self.noise_source = noise_source(cfg, self.plan, topo.world_size)
        sizes = image_sizes(cfg, self.plan, self.info)
        torch.manual_seed(cfg.run.seed)
        self.bare_model = parts.build_model(sizes[0])
        check_trainable(self.plan, has_batchnorm(self.bare_model))
        self.plan.announce()  # its warnings, once the plan is known to train
        self.precise_bn = precise_bn_per_phase(cfg.train.precise_bn_images, self.bare_model, self.plan,
                                               self.info.num_train)
        self.info = check_model(parts, self.bare_model, self.fingerprints, topo.is_main).info
        check_target_metric(cfg, self.info, self.data_name)
        self.channels_last = wants_channels_last(cfg.train.channels_last, self.bare_model, self.device)
        self.memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        check_compiler(cfg.train.compile, self.device)
        self.data_path = choose_data_path(cfg.data.device_cache, self.device, self.train_set, self.val_set,
                                                self.info.reads_files)
        self.resume_state = find_resume_state(cfg) if topo.is_main else None

    def _connect(self) -> None:
        """After every worker built without error: the bucket size (comm.bucket_mb=auto, DDP only),
        DDP or FSDP2 (either broadcasts rank 0's weights), the optimizer, the loaders, and the
        owners of the loop's concerns."""
        cfg, topo, comm = self.cfg, self.topology, self.comm
        if self.resume_state is not None and self.resume_state.get("model") is not None:
            self.bare_model.load_state_dict(self.resume_state["model"])
        self.bare_model.to(self.device)
        self.bucket_choice = choose_bucket_size(cfg, comm, self.bare_model, self.plan, self.info, self.autocast,
                                                      self.resume_state)
        if self.bucket_choice is not None:
            comm.bucket_mb = self.bucket_choice.bucket_mb
        self.model = wrap_model(comm, self.bare_model)
        if cfg.train.compile is not False:
            self.model = compile_model(self.model, cfg.train.compile)
        self.optimizer = build_optimizer(comm, unwrap(self.model), cfg.optim)
        if cfg.train.compile is not False:  # before anything runs the compiled model (the adaptive batch's timing)
            self.compile_s = compile_rehearsal(cfg, comm, self.model, self.bare_model, self.plan, self.info,
                                               self.autocast, self.memory_format)
        self.restored = comm.broadcast_object(
            None if self.resume_state is None else {k: v for k, v in self.resume_state.items() if k != "model"})
        self.loader, self.sampler, self.val_loader = make_loaders(cfg, topo, self.plan, self.data_path,
                                                                       self.train_set, self.val_set, self.device)
        noise = NoiseScale(self.device) if self.noise_source else None
        self.stepper = Stepper(self.model, self.bare_model, self.optimizer, comm, self.device, self.autocast,
                               self.scaler, self.faults, cfg.train.label_smoothing, self.channels_last,
                               on_allreduce_error=functools.partial(name_missing_workers, comm, cfg.comm.timeout_s),
                               noise=noise, noise_source=self.noise_source)
        self.adaptive = None if self.plan.adaptive is None else AdaptiveBatch(
            self.plan.adaptive, noise, comm.all_reduce_sum, self._step_time(),
            None if self.restored is None else self.restored.get("adaptive"))
        self.unreadable = UnreadableImages(comm, self.loader, self.val_loader, self.info.reads_files)
        self.checkpointer = Checkpointer(cfg, topo, comm, self.device, self.model, self.optimizer, self.scaler, noise,
                                         self.plan, self.bucket_choice, self.restored, self.unreadable.gather,
                                         self.adaptive)
        if not self.data_path.on_device and cfg.data.num_workers > 0:
            start_reading(self.loader, self.sampler, self.plan, self.checkpointer.start_position())
        self.agreement = StopAgreement(comm, self.loader)
        self.guard = NonFiniteGuard(Ledger(self.device, lag=self.ledger_lag), cfg.train, cfg.run.dir, topo.is_main)
        self.validator = Validator(self.model, comm, self.device, self.val_loader, self.loader, self.sampler, self.plan,
                                   self.info, self.memory_format, self.precise_bn)
        self.reporter = Reporter(cfg, topo, comm, self.plan, self.info, self.device, self.bucket_choice)
        self.built_s = time.perf_counter() - self.started

    def _step_time(self):
        """adaptive.enabled: the step-time model (a preset's, a resumed run's, or measured now)."""
        plan = self.plan.adaptive
        preset = plan.preset_time()
        if preset is not None:
            return preset
        restored = restored_step_time(self.restored, self.topology.world_size)
        if restored is not None:
            return restored
        shape = (plan.micro_batch, self.info.channels, *sides(self.plan.phases[0].image_size or self.info.image_size))
        with state_kept(self.stepper, self.bare_model, self.optimizer, self.scaler):
            return measure_step_time(self.comm, step_timer(self.stepper, shape, self.info.num_classes),
                                     plan.batches[0].accum_steps, plan.micro_batch, self.topology.world_size)

    # ------------------------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train from where the run stands to its end: its phases, their epochs, their steps."""
        report, checkpointer = self.reporter, self.checkpointer
        if checkpointer.finished():
            return report.finished_run(self.restored, self.validator.validate)
        report.header(f"{self.model_name} on {self.data_name}", self.model, self.data_path.line, self.precise_bn,
                      self.channels_last, self.compile_s, given_weights=self.given_weights)
        if self.adaptive is not None:
            report.print(f"  step time              {describe_step_time(self.adaptive.step_time)}")
        pos, record, losses = checkpointer.restore()
        if self.restored is not None:
            report.print(checkpointer.resumed_line(pos))
        report.open(pos, resumed=self.restored is not None)
        stop, clock = StopSignal(), Stopwatch(pos.elapsed)
        stop.install()
        result, lr, phase, stopped = None, self._lr(pos), None, False
        try:
            while pos.epoch < self.plan.epochs:  # at least one epoch: checkpointer.finished() was false
                phase, batches = self._start_epoch(pos, phase, losses, clock)
                while self._room_for(pos, phase):
                    bp = self._batch_plan(pos, phase)
                    step = self.run_step(batches, bp, pos.step, stop, self._lr(pos))
                    lr = step.lr
                    self._count_step(step, bp, pos, losses)
                    batches = self._decide(pos, phase, batches)
                    epoch_end = not self._room_for(pos, phase)
                    save = step.stopping or checkpointer.due(pos.step, epoch_end)
                    self.guard.settle(pos, losses, wait=save or epoch_end or report.line_due(pos.step))
                    report.after_step(pos, lr, losses, None if self.adaptive is None else bp.global_batch)
                    if save:
                        self._save(pos, record, losses, clock)
                    if step.stopping:
                        stopped = True
                        return report.stopped_on_signal(pos.step)
                result, reached = self._end_epoch(pos, phase, record, losses, clock, lr)
                if reached and self.cfg.train.stop_at_target:
                    report.reached_target(pos.epoch)
                    break
        finally:
            stop.uninstall(stopped)
        return self._finish(result, record, pos, clock)

    def run_step(self, batches, bp: BatchPlan, step: int, stop: StopSignal, lr: Optional[float] = None) -> StepResult:
        """One optimizer step as ``fit`` runs it: ``lr`` (None: the schedule's for ``step``), the
        micro-batches of ``bp`` from ``batches``, the update, and the agreement on stopping; nothing
        in it waits for the device."""
        lr = self.plan.schedule(step) if lr is None else lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss, outcome, wait = self.stepper(batches, bp.accum_steps, bp.per_worker_batch, step)
        return StepResult(lr, loss, wait, outcome, self.agreement.after_step(stop))

    def _start_epoch(self, pos: Position, phase: Optional[Phase], losses: Losses, clock: Stopwatch) -> tuple:
        """(the epoch's phase, its batches): a new phase sets the sampler's batch plan and image size."""
        if self.plan.phase_of(pos.epoch) is not phase:
            phase = self.plan.phase_of(pos.epoch)
            self.sampler.set_phase(phase.batch, phase.image_size)
            self.reporter.phase_started(phase)
        self.model.train()
        if self.adaptive is None:
            self.sampler.set_epoch(pos.epoch, pos.step_in_epoch)
        else:
            self.sampler.set_phase(self.adaptive.batch_plan, phase.image_size)
            self.sampler.set_epoch(pos.epoch, start_image=pos.images_in_epoch)
        batches = iter(self.loader)
        losses.restart_timing()
        self.reporter.start_epoch(pos, phase, None if self.adaptive is None else self.adaptive.batch)
        clock.start_epoch()
        return phase, batches

    def _batch_plan(self, pos: Position, phase: Phase) -> BatchPlan:
        """The batch plan of the step at ``pos``: its phase's, or the adaptive batch's."""
        return phase.batch if self.adaptive is None else self.adaptive.batch_plan

    def _lr(self, pos: Position) -> float:
        """The lr of the step at ``pos``."""
        if self.adaptive is None:
            return self.plan.schedule(pos.step)
        return self.adaptive.lr(pos.epoch, pos.images_in_epoch)

    def _room_for(self, pos: Position, phase: Phase) -> bool:
        """Whether the epoch holds another step: its phase's steps per epoch, or, for the adaptive
        batch, a global batch of the images left in the permutation."""
        if self.adaptive is None:
            return pos.step_in_epoch < phase.steps_per_epoch
        return pos.images_in_epoch + self.adaptive.batch <= self.info.num_train

    def _decide(self, pos: Position, phase: Phase, batches):
        """adaptive.enabled, right after a step that ends at a decision's boundary (before its
        checkpoint, so a resumed run starts from the decision): decide, report, and on a change go on
        from the same image of the epoch with the new batch. Returns the batches to take from."""
        if self.adaptive is None or not self.adaptive.due(pos.step):
            return batches
        decision, noise_scale = self.adaptive.decide(pos.step)
        self.reporter.batch_decision(pos, decision, noise_scale, self._lr(pos))
        if not decision.changed:
            return batches
        self.sampler.set_phase(self.adaptive.batch_plan, phase.image_size)
        self.sampler.set_epoch(pos.epoch, start_image=pos.images_in_epoch)
        return iter(self.loader)

    def _count_step(self, step: StepResult, bp: BatchPlan, pos: Position, losses: Losses) -> None:
        """Fold a step that ran into the run's state; its outcome reaches the host later (the guard)."""
        self.guard.add(pos.step, step.outcome)
        losses.add(step.loss, step.outcome == APPLIED, bp.global_batch, step.data_wait)
        pos.step += 1
        pos.step_in_epoch += 1
        pos.images_in_epoch += bp.global_batch
        pos.images += bp.global_batch
        self.reporter.first_step(pos.step, self.started, self.built_s, self.compile_s, self.restored is not None)

    def _save(self, pos: Position, record: Record, losses: Losses, clock: Stopwatch) -> None:
        """A checkpoint in mid-epoch: its time does not count as training time."""
        clock.pause(pos)
        self.checkpointer.save(pos, record, losses)
        clock.resume()

    def _end_epoch(self, pos: Position, phase: Phase, record: Record, losses: Losses, clock: Stopwatch,
                   lr: float) -> tuple[EvalResult, bool]:
        """The epoch's train loss (all workers), validation, the record, the epoch line and the
        epoch's checkpoint. Returns the validation and whether the target was reached."""
        cfg = self.cfg
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.guard.settle(pos, losses, wait=True)
        clock.pause(pos)
        self.reporter.end_epoch()
        counted = max(pos.step_in_epoch - pos.skipped_in_epoch, 1) * self.topology.world_size
        train_loss = self.comm.all_reduce_sum(losses.epoch).item() / counted
        result = self.validator.after_epoch(pos.epoch, phase)
        self.unreadable.gather(record)
        pos.elapsed = clock.elapsed()
        reached = record.update(pos.epoch + 1, result, pos.elapsed, cfg.train.target_accuracy, cfg.train.target_metric)
        if self.stepper.noise is not None:  # every worker: one allreduce of three numbers
            self.reporter.noise_values = self.stepper.noise.epoch_values(self.comm.all_reduce_sum)
        sps = losses.epoch_images / max(clock.epoch_time, 1e-9)
        self.reporter.epoch_line(pos, phase, train_loss, result, record, lr, sps,
                                 None if self.adaptive is None else self.adaptive.batch)
        pos.next_epoch()
        losses.restart_epoch()
        if self.checkpointer.at_epoch_end:
            self.checkpointer.save(pos, record, losses)
        return result, reached

    def _finish(self, result: EvalResult, record: Record, pos: Position, clock: Stopwatch) -> dict:
        """The summary, the final weights and the closing line; every worker leaves together."""
        self.agreement.settle()
        summary = self.reporter.summary(result, record, pos, clock.elapsed(), self.scaler is not None,
                                        None if self.adaptive is None else self.adaptive.state_dict())
        self.checkpointer.save_final(pos)
        self.reporter.closing_line(summary)
        self.comm.barrier()
        return summary

    def close(self) -> None:
        try:
            if self.agreement is not None:
                self.agreement.settle()
        except Exception:  # a worker already gone: nothing left to agree with
            pass
        self.comm.close()
        self.lock.release()
        for folder in getattr(self, "made_dirs", []):  # a run that failed before writing anything leaves no folder
            try:
                os.rmdir(folder)
            except OSError:  # not empty: the run wrote its record
                break
