"""The synchronous data-parallel training loop.

Per optimizer step, each worker runs ``accum_steps`` micro-batches of its slice of the global
batch; the gradient allreduce (DDP) runs on the last micro-batch only. Each micro-batch's loss is
``sum(per-image loss) / per_worker_batch`` and DDP averages over workers, so every step applies
the mean gradient over the whole global batch, whatever the world size and accumulation.

Under ``comm.shard=full`` (FSDP2) the gradients are reduce-scattered on the last micro-batch
instead, and every forward pass all-gathers weights with every other worker: validation pads
the workers with fewer batches with forward passes on an ignored image, so that all run as many.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from largebatch.config import Config, config_differences, config_hash, to_dict, write_yaml_atomic
from largebatch.data import IGNORE, eval_loader, train_loader
from largebatch.distributed import Communicator, Topology, cpu_threads, select_backend, select_device
from largebatch.distributed.wrap import build_optimizer, grad_scaler, no_sync, shard_line, unwrap, wrap_model
from largebatch.engine.bucket_tuning import BucketChoice, gradient_mb, tune_bucket_size
from largebatch.engine.metrics import MetricsLog, Progress, tensorboard_writer_class
from largebatch.engine.precise_bn import choose_precise_bn, recompute_batchnorm
from largebatch.engine.run_plan import Phase, RunPlan, check_trainable, has_batchnorm, make_run_plan, phase_line
from largebatch.engine import checkpoint as ckpt
from largebatch.engine.noise import NoiseScale, choose_source
from largebatch.engine.guards import FaultInjection, RunLock, StopSignal
from largebatch.engine.speed import check_compiler, compile_model, rehearse, wants_channels_last
from largebatch.engine.step import APPLIED, SCALER_SKIP, Ledger, Stepper, StepResult, prepare_inputs
from largebatch.errors import RunStopped, UsageError
from largebatch.fileio import save_torch_atomic, write_bytes_atomic
from largebatch.parts import PartsSource, complete_info, from_config
from largebatch.version import __version__

MAX_PENDING_STEPS = 64
"""Steps whose outcome the host may still be waiting for before it waits for the device."""


@dataclass
class EvalResult:
    loss: float
    accuracy: float
    """Top-1 accuracy."""
    top5: Optional[float]
    """Top-5 accuracy, where there are more than 5 classes."""
    count: int


def evaluate(model: torch.nn.Module, loader, comm: Communicator, device: torch.device,
             num_classes: int, memory_format: torch.memory_format = torch.contiguous_format,
             lockstep: Optional[tuple[int, ...]] = None) -> EvalResult:
    """Exact validation: each worker scores its own unpadded shard; sums are allreduced.

    ``lockstep``: the shape (C, H, W) of one validation image, where every forward pass is a
    collective (comm.shard=full): a worker with fewer batches than another then runs forward passes
    on one zero image of that shape, which counts nowhere, until every worker has run as many."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1, top-5, count
    rounds = max(comm.all_gather_object(len(loader))) if lockstep is not None else 0
    with torch.no_grad():
        for x, y in loader:
            rounds -= 1
            x, y = prepare_inputs(x, y, device, memory_format)
            out = model(x).float()  # bf16 logits where FSDP2 computes in bf16 (comm.shard=full on GPUs)
            totals[0] += F.cross_entropy(out, y, reduction="sum", ignore_index=IGNORE).double()
            totals[1] += (out.argmax(1) == y).sum()
            if num_classes > 5:
                totals[2] += (out.topk(5, dim=1).indices == y[:, None]).any(dim=1).sum()
            totals[3] += (y != IGNORE).sum()  # an unreadable image is left out of the counts
        for _ in range(rounds):
            model(torch.zeros((1, *lockstep), device=device).contiguous(memory_format=memory_format))
    comm.all_reduce_sum(totals)
    loss, top1, top5, count = totals.tolist()
    n = max(count, 1.0)
    return EvalResult(loss=loss / n, accuracy=top1 / n, top5=top5 / n if num_classes > 5 else None, count=int(count))


@dataclass(frozen=True)
class _DataPath:
    """Where the training images come from (data.device_cache)."""
    on_device: bool
    line: str
    """For the run header."""
    nbytes: int = 0


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:,.1f}"


@dataclass
class _Record:
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


@dataclass
class _Position:
    """Where the loop is: the next optimizer step to run, as a global count and inside its epoch."""
    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    train_time: float = 0.0
    elapsed: float = 0.0
    skipped_steps: int = 0
    skipped_in_epoch: int = 0
    nonfinite_in_a_row: int = 0
    scaler_skipped_steps: int = 0


class Trainer:
    """Builds everything a run needs from a :class:`Config`, a :class:`Topology` and its parts (the
    model and datasets: ``parts``, a :data:`largebatch.parts.PartsSource`; by default those the config
    names), then ``fit()``."""

    def __init__(self, cfg: Config, topology: Topology, parts: Optional[PartsSource] = None):
        self.started = time.perf_counter()
        self.cfg, self.topology = cfg, topology
        self.parts_source = parts or from_config
        self.device = select_device(topology, cfg.train.device)
        backend = select_backend(cfg.comm.backend, self.device)
        if self.device.type == "cpu":
            threads = cpu_threads(topology)
            if threads:
                torch.set_num_threads(threads)
        else:  # every training micro-batch of a phase has one shape: let cuDNN time its kernels once
            torch.backends.cudnn.benchmark = True
        auto_buckets = cfg.comm.bucket_mb == "auto"  # chosen in _connect, on the built model
        # train.precision: autocast for the forward pass; fp16 also scales the loss against underflow.
        # bf16 under comm.shard=full on GPUs: FSDP2 casts the weights it all-gathers to bf16 instead
        # (float32 master weights and gradient reduction), which also halves the all-gathers.
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision)
        param_dtype = dtype if cfg.comm.shard == "full" and dtype is torch.bfloat16 and self.device.type == "cuda" \
            else None
        self.comm = Communicator(topology, backend, self.device, None if auto_buckets else cfg.comm.bucket_mb,
                                 timeout_s=cfg.comm.timeout_s,
                                 master_addr=cfg.comm.master_addr, compression=cfg.comm.compression,
                                 powersgd_rank=cfg.comm.powersgd_rank,
                                 powersgd_start_step=cfg.comm.powersgd_start_step, shard=cfg.comm.shard,
                                 param_dtype=param_dtype, noise_scale=cfg.train.noise_scale)
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=dtype)) if dtype and param_dtype is None \
            else contextlib.nullcontext
        self.scaler = grad_scaler(self.comm) if cfg.train.precision == "fp16" else None
        self.lock = RunLock(cfg.run.dir)
        self.faults = FaultInjection.from_env(topology.rank)
        self.compile_s: Optional[float] = None
        self._agreement = None  # the stop flags of the last step, on their way between workers
        error: Optional[BaseException] = None
        try:
            self._build()
        except UsageError as exc:
            error = exc
        try:
            # A worker that failed here (a missing file on its node, say) must not leave the others
            # waiting in the first collective: every worker learns of it and stops with the same error.
            self.comm.raise_if_any_failed(error)
            self._check_same_everywhere()
            self._connect()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        """Everything that may fail on some workers only; nothing here runs a collective."""
        cfg, topo = self.cfg, self.topology
        if topo.is_main:
            self.made_dirs = _missing_dirs(cfg.run.dir)
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
        self.plan: RunPlan = make_run_plan(cfg, topo.world_size, self.info.num_train)
        self.noise_source = self._noise_source() if cfg.train.noise_scale else None
        sizes = sorted({p.image_size or self.info.image_size for p in self.plan.phases})
        limit = self.info.max_image_size
        if limit is not None and sizes[-1] > limit:
            raise UsageError(f"train.phases ask for {sizes[-1]}-pixel images but '{cfg.data.root}' was packed at "
                             f"{limit}; re-pack it with --size {sizes[-1]} or use sizes <= {limit}")
        if len(sizes) > 1 and cfg.model.name == "mlp":
            raise UsageError(f"model.name=mlp takes images of one size, and train.phases use {sizes}; give every "
                             "phase the same image_size or use a convolutional model")
        torch.manual_seed(cfg.run.seed)
        self.bare_model = parts.build_model(sizes[0])
        check_trainable(self.plan, has_batchnorm(self.bare_model))
        self.precise_bn = [choose_precise_bn(cfg.train.precise_bn_images, self.bare_model, p.steps_per_epoch,
                                             self.info.num_train).for_phase(
                               p.batch.world_size, p.batch.micro_batch, p.steps_per_epoch * p.batch.accum_steps)
                           for p in self.plan.phases]
        if not self.info.num_classes:  # data passed in that does not say: the model's output size
            self.info = complete_info(parts, self.bare_model).info
        if cfg.train.target_metric == "top5" and self.info.num_classes <= 5:
            raise UsageError(f"train.target_metric=top5 needs more than 5 classes; {self.data_name} has "
                             f"{self.info.num_classes}: use top1")
        self.channels_last = wants_channels_last(cfg.train.channels_last, self.bare_model, self.device)
        self.memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        check_compiler(cfg.train.compile, self.device)
        self.data_path = self._choose_data_path()
        self.resume_state = self._find_resume_state() if topo.is_main else None
        if topo.is_main and cfg.checkpoint.resume != "auto":
            ckpt.move_aside(cfg.run.dir)  # a fresh start must not later resume an older run's checkpoint

    def _connect(self) -> None:
        """After every worker built without error: the bucket size (comm.bucket_mb=auto, DDP only),
        DDP or FSDP2 (either broadcasts rank 0's weights), the optimizer and the loaders."""
        cfg, topo = self.cfg, self.topology
        if self.resume_state is not None and self.resume_state.get("model") is not None:
            self.bare_model.load_state_dict(self.resume_state["model"])
        self.bare_model.to(self.device)
        self.bucket_choice: Optional[BucketChoice] = None
        if self.comm.distributed and cfg.comm.bucket_mb == "auto" and self.comm.shard != "full":
            self.bucket_choice = self._choose_bucket_size()
            self.comm.bucket_mb = self.bucket_choice.bucket_mb
        self.model = wrap_model(self.comm, self.bare_model)
        if cfg.train.compile is not False:
            self.model = compile_model(self.model, cfg.train.compile)
        self.optimizer = build_optimizer(self.comm, unwrap(self.model), cfg.optim)
        self.restored = self.comm.broadcast_object(
            None if self.resume_state is None else {k: v for k, v in self.resume_state.items() if k != "model"})
        first = self.plan.phases[0]
        if self.data_path.on_device:
            from largebatch.data.device import device_eval_loader, device_train_loader

            self.loader, self.sampler = device_train_loader(self.train_set, first.batch, topo.rank, cfg.run.seed,
                                                            self.device, first.image_size)
            self.val_loader = device_eval_loader(self.val_set, topo.rank, topo.world_size, cfg.train.eval_batch,
                                                 self.device, self.plan.eval_size)
        else:
            pin = self.device.type == "cuda"
            self.loader, self.sampler = train_loader(self.train_set, first.batch, topo.rank, cfg.run.seed,
                                                     cfg.data.num_workers, pin, first.image_size, cfg.data.on_corrupt,
                                                     device=self.device)
            self.val_loader = eval_loader(self.val_set, topo.rank, topo.world_size, cfg.train.eval_batch,
                                          cfg.data.num_workers, pin, self.plan.eval_size, cfg.data.on_corrupt,
                                          device=self.device)
            if cfg.data.num_workers > 0:  # the loader processes start reading while the model compiles
                pos = _Position(**self.restored["position"]) if self.restored else _Position()
                if pos.epoch < self.plan.epochs:
                    phase = self.plan.phase_of(pos.epoch)
                    self.sampler.set_phase(phase.batch, phase.image_size)
                    self.sampler.set_epoch(pos.epoch, pos.step_in_epoch)
                    self.loader.start()
        self.stepper = Stepper(self.model, self.bare_model, self.optimizer, self.comm, self.device, self.autocast,
                               self.scaler, self.faults, cfg.train.label_smoothing, self.channels_last,
                               on_allreduce_error=self._name_missing_workers,
                               noise=NoiseScale(self.device) if self.noise_source else None,
                               noise_source=self.noise_source)
        self.noise_values = None  # train.noise_scale: the last epoch's estimates (NoiseEstimate)
        if cfg.train.compile is not False:
            size = first.image_size or self.info.image_size
            # Under comm.shard=full the rehearsal reduce-scatters its gradients: every worker runs it
            # (its forward pass all-gathers anyway), and FSDP2 would otherwise keep them for the first step.
            sync_off = contextlib.nullcontext if self.comm.shard == "full" else lambda: no_sync(self.model)
            seconds, error = rehearse(self.model, self.bare_model, sync_off,
                                      (first.batch.micro_batch, self.info.channels, size, size),
                                      self.info.num_classes, self.device, self.autocast, self.memory_format)
            self.comm.raise_if_any_failed(None if error is None else UsageError(
                f"train.compile={cfg.train.compile}: torch.compile failed on {self.device.type}: {error}; "
                "set train.compile=false"))
            self.compile_s = seconds
        self.built_s = time.perf_counter() - self.started

    def _noise_source(self) -> str:
        """train.noise_scale: where the two batch sizes come from, or a one-line refusal."""
        cfg, workers = self.cfg, self.topology.world_size
        if cfg.comm.shard == "full":
            raise UsageError("train.noise_scale=true needs each worker's gradient before it is averaged, which "
                             "comm.shard=full (FSDP2) never holds; use comm.shard=optimizer or none, or "
                             "train.noise_scale=false")
        if cfg.comm.compression == "powersgd":
            raise UsageError("train.noise_scale=true measures the averaged gradient, which comm.compression=powersgd "
                             "replaces by a low-rank approximation; use comm.compression=none or fp16, or "
                             "train.noise_scale=false")
        source = None
        for phase in self.plan.phases:
            bp = phase.batch
            try:
                source = choose_source(workers, bp.accum_steps)
            except ValueError:
                raise UsageError(f"train.noise_scale=true compares the gradients of two batch sizes, and one worker "
                                 f"without accumulation steps sees one (global batch {bp.global_batch}); set "
                                 f"train.max_micro_batch={max(1, bp.per_worker_batch // 2)} or lower, or train on 2 "
                                 "or more workers") from None
        return source

    def _choose_data_path(self) -> "_DataPath":
        """data.device_cache: hold the dataset on the device, or read it through the loader."""
        from largebatch.data.device import cacheable_bytes, in_memory

        setting, dev = self.cfg.data.device_cache, self.device
        if setting == "off":
            return _DataPath(False, "through the loader (data.device_cache=off)")
        sizes = [cacheable_bytes(self.train_set), cacheable_bytes(self.val_set)]
        if None in sizes:
            why = "read from files" if self.info.reads_files else "fetched image by image from the dataset"
            return _DataPath(False, f"through the loader ({why})")
        need = sum(sizes)
        if setting == "auto":
            if dev.type == "cuda":
                budget = torch.cuda.get_device_properties(dev).total_memory / 4
                why = "a quarter of the GPU's memory"
            elif in_memory(self.train_set) and in_memory(self.val_set):
                return _DataPath(True, f"on the device ({_mib(need)} MiB, already in memory)", need)
            else:
                return _DataPath(False, "through the loader (data.device_cache=auto keeps files on the loader "
                                        "on the CPU)")
        else:
            budget, why = setting * 2**30, f"data.device_cache={setting:g} GiB"
        if need > budget:
            return _DataPath(False, f"through the loader ({_mib(need)} MiB is more than {why})")
        return _DataPath(True, f"on the device ({_mib(need)} MiB)", need)

    def _choose_bucket_size(self) -> BucketChoice:
        """comm.bucket_mb=auto: the size a resumed run chose when it started with auto (on the same
        number of workers), else the fastest of comm.bucket_candidates_mb, timed here."""
        state = self.resume_state
        kept = self.comm.broadcast_object(
            state.get("bucket_mb") if state is not None and state["world_size"] == self.topology.world_size else None)
        if kept is not None:
            return BucketChoice(kept, gradient_mb(self.bare_model), from_checkpoint=True)
        first = self.plan.phases[0]
        size = first.image_size or self.info.image_size
        return tune_bucket_size(self.comm, self.bare_model, self.cfg.comm.bucket_candidates_mb,
                                first.batch.micro_batch, (self.info.channels, size, size), self.info.num_classes,
                                self.device, self.autocast)

    def _find_resume_state(self) -> Optional[dict]:
        """Rank 0: the checkpoint to continue from, checked against this run's config."""
        cfg = self.cfg
        state = ckpt.find_resume_state(cfg.run.dir, cfg.checkpoint.resume)
        if state is None:
            return None
        differing = config_differences(state["config"], to_dict(cfg))
        if differing:
            shown = ", ".join(f"{k} ({old!r} -> {new!r})" for k, old, new in differing[:6])
            raise UsageError(f"checkpoint {state.get('path', cfg.checkpoint.resume)} was made with a different "
                             f"config: {shown}; use the same values, another run.dir, or checkpoint.resume=never")
        return state

    def _check_same_everywhere(self) -> None:
        """Every worker must run the same config and package version."""
        mine = (config_hash(to_dict(self.cfg)), __version__)
        seen = self.comm.all_gather_object(mine)
        odd = [rank for rank, other in enumerate(seen) if other != seen[0]]
        if odd:
            raise UsageError(f"workers {odd} run a different config or largebatch version than rank 0 "
                             f"({seen[odd[0]]} vs {seen[0]}); start every worker with the same files and arguments")

    # -- resume --------------------------------------------------------------------------------
    def _restore(self, progress: Progress) -> tuple[_Position, _Record, tuple[float, float, int]]:
        """Position, record and this worker's partial sums (epoch loss, step-line window loss,
        steps in the window) from the checkpoint, if any."""
        state = self.restored
        if state is None:
            return _Position(), _Record(), (0.0, 0.0, 0)
        from largebatch.distributed import sharded_state
        from largebatch.distributed.shard import is_fsdp

        topo = self.topology
        same_world = state["world_size"] == topo.world_size
        # The model and optimizer state. A sharded checkpoint (comm.shard=full) is read by every
        # worker, whatever the number of workers that wrote it and this run's comm.shard; a plain
        # checkpoint's weights came with rank 0's model (which DDP, or the broadcast before FSDP2
        # shards it, gave every worker), its optimizer state with ``state``.
        model = unwrap(self.model)
        if "shards" in state:
            try:
                sharded_state.load_into(state["path"], state["shards"]["paths"], state["shards"]["rest"], model,
                                        self.optimizer)
            except (Exception, sharded_state.CheckpointException) as exc:  # raised on every worker
                raise RunStopped(f"checkpoint {state['path']} cannot be loaded ({sharded_state.failure(exc)}); "
                                 "move it out of the way to resume from the one before it, or set "
                                 "checkpoint.resume=never") from None
        elif is_fsdp(model):
            sharded_state.load_optimizer_into_sharded(model, self.optimizer, state["optimizer"])
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.stepper.noise is not None and state.get("noise"):
            self.stepper.noise.load_state_dict(state["noise"])
        ckpt.set_rng_state(state["rng"][topo.rank if same_world else 0], self.device)
        if same_world:
            loss_part, window_part = state["loss_parts"][topo.rank], state["window_parts"][topo.rank]
        else:  # each part is a sum of per-worker means: rescale to the new number of workers
            scale = topo.world_size / state["world_size"]
            loss_part = sum(state["loss_parts"]) * scale if topo.is_main else 0.0
            window_part = sum(state["window_parts"]) * scale if topo.is_main else 0.0
        pos = _Position(**state["position"])
        where = f"epoch {pos.epoch + 1}, step {pos.step}"  # a finished run never gets here (_finished)
        bp = self.plan.phase_of(pos.epoch).batch
        progress.print(f"resuming from {state.get('path', 'checkpoint')} at {where}"
                       + ("" if same_world else f" on {topo.world_size} workers instead of {state['world_size']}: "
                          f"same global batch {bp.global_batch}, same data position"))
        return pos, _Record(**state["record"]), (loss_part, window_part, state["window_steps"])

    def _save_checkpoint(self, pos: _Position, record: _Record, loss_sum: torch.Tensor,
                         window_loss: torch.Tensor, window_steps: int) -> None:
        """All workers take part (their RNG states, partial sums and unreadable files; under
        comm.shard their shards of the state); rank 0 writes the checkpoint, or under comm.shard=full
        every worker writes its shards and rank 0 the rest."""
        self._gather_skipped(record)
        rngs = self.comm.all_gather_object(ckpt.rng_state(self.device))
        parts = self.comm.all_gather_object((float(loss_sum.item()), float(window_loss.item())))
        noise = None
        if self.stepper.noise is not None:  # the workers' averages made equal (changes no later value), kept
            self.stepper.noise.epoch_values(self.comm.all_reduce_sum)
            noise = self.stepper.noise.state_dict()
        error = self._write_checkpoint(pos, record, rngs, parts, window_steps, noise)
        # every worker learns whether rank 0 managed, so none waits for a rank 0 that has stopped
        self.comm.raise_if_any_failed(error, kind=RunStopped)

    def _write_checkpoint(self, pos: _Position, record: _Record, rngs: list, parts: list,
                          window_steps: int, noise: Optional[dict] = None) -> Optional[RunStopped]:
        """Every worker; returns this worker's failure to write, if any."""
        from largebatch.distributed import sharded_state
        from largebatch.distributed.shard import is_fsdp

        cfg, main = self.cfg, self.topology.is_main
        folder = ckpt.checkpoint_dir(cfg.run.dir)

        def failed(why: str) -> RunStopped:
            return RunStopped(f"cannot write a checkpoint to {folder} ({why}); free space or fix permissions, then "
                              "run again to resume")

        model = unwrap(self.model)
        state = dict(scaler=None if self.scaler is None else self.scaler.state_dict(),
                     position=dict(vars(pos)), record=dict(vars(record)), rng=rngs,
                     loss_parts=[p[0] for p in parts], window_parts=[p[1] for p in parts], window_steps=window_steps,
                     noise=noise,
                     world_size=self.topology.world_size, global_batch=self.plan.phase_of(pos.epoch).batch.global_batch,
                     bucket_mb=None if self.bucket_choice is None else self.bucket_choice.bucket_mb,
                     config=to_dict(cfg), config_hash=config_hash(to_dict(cfg)), version=__version__)
        if not is_fsdp(model):
            optimizer = sharded_state.gather_optimizer_state(self.optimizer, main)  # ZeRO: a collective
            if main:
                try:
                    ckpt.save(dict(model=model.state_dict(), optimizer=optimizer, **state), cfg.run.dir, pos.step,
                              cfg.checkpoint.keep)
                except OSError as exc:
                    return failed(exc.strerror)
            return None
        # comm.shard=full: rank 0's BatchNorm statistics (DDP's rule), then every worker writes its
        # shards into a folder rank 0 emptied first; rank 0 adds the rest and renames the folder.
        self.comm.broadcast_buffers(model)
        tensors, paths, rest = sharded_state.state_to_save(model, self.optimizer)
        error = None
        if main:
            try:
                ckpt.begin_sharded(cfg.run.dir, pos.step)
            except OSError as exc:
                error = failed(exc.strerror)
        self.comm.raise_if_any_failed(error, kind=RunStopped)
        try:
            sharded_state.save(tensors, ckpt.sharded_paths(cfg.run.dir, pos.step)[0])
        except (Exception, sharded_state.CheckpointException) as exc:  # raised on every worker when any failed
            return failed(sharded_state.failure(exc))
        if main:
            try:
                ckpt.finish_sharded(dict(state, shards=dict(paths=paths, rest=rest)), cfg.run.dir, pos.step,
                                    cfg.checkpoint.keep)
            except OSError as exc:
                return failed(exc.strerror)
        return None

    # ------------------------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg, topo, plan = self.cfg, self.topology, self.plan
        schedule, every = plan.schedule, cfg.train.log_every_steps
        progress = Progress(enabled=topo.is_main)
        if self._finished():
            return self._report_finished(progress)
        self._write_run_header(progress)
        pos, record, (loss_part, window_part, window_steps) = self._restore(progress)
        metrics = MetricsLog(os.path.join(cfg.run.dir, "metrics.jsonl") if topo.is_main else None,
                             tensorboard_dir=os.path.join(cfg.run.dir, "tensorboard") if cfg.log.tensorboard else None,
                             keep_until_step=pos.step if self.resume_state is not None else None)
        if self.bucket_choice is not None and not self.bucket_choice.from_checkpoint:
            metrics.write("bucket_tuning", step=pos.step, **self.bucket_choice.record())
        stop = StopSignal()
        stop.install()
        result, lr = None, schedule(pos.step)
        start = time.perf_counter() - pos.elapsed
        # The step-line window (mean loss since the last step line) runs across epochs and resumes;
        # its timing fields are reset each epoch, so they cover training time only.
        window_loss = torch.full((), window_part, dtype=torch.float64, device=self.device)
        window = dict(steps=window_steps)
        phase: Optional[Phase] = None
        ledger = Ledger(self.device, lag=int(os.environ.get("LARGEBATCH_LEDGER_LAG", "0")))
        first_step = True
        try:
            while pos.epoch < plan.epochs:  # at least one epoch: _finished() returned a finished run
                epoch = pos.epoch
                if plan.phase_of(epoch) is not phase:  # the batch plan and image size change here
                    phase = plan.phase_of(epoch)
                    self.sampler.set_phase(phase.batch, phase.image_size)
                    if plan.phased:
                        progress.print(phase_line(phase, len(plan.phases)))
                bp = phase.batch
                self.model.train()
                self.sampler.set_epoch(epoch, pos.step_in_epoch)
                batches = iter(self.loader)
                loss_sum = torch.full((), loss_part, dtype=torch.float64, device=self.device)
                loss_part = 0.0
                window.update(start=time.perf_counter(), wait=0.0, timed=0)
                progress.start_epoch(epoch, plan.epochs, phase.steps_per_epoch, initial=pos.step_in_epoch,
                                     step=pos.step, total_steps=plan.total_steps, global_batch=bp.global_batch)
                epoch_time, segment = 0.0, time.perf_counter()  # training time; checkpoints excluded
                steps_run = 0  # in this process: a resumed epoch runs only part of its steps
                while pos.step_in_epoch < phase.steps_per_epoch:
                    lr, step_loss, wait, outcome, stopping = self.run_step(batches, bp, pos.step, stop)
                    ledger.add(pos.step, outcome)
                    kept = torch.where(outcome == APPLIED, step_loss, 0.0)  # a skipped step's loss is left out
                    loss_sum += kept
                    window_loss += kept
                    window["wait"] += wait
                    window["timed"] += 1
                    steps_run += 1
                    pos.step += 1
                    pos.step_in_epoch += 1
                    if first_step:
                        first_step = False
                        self._report_startup(metrics, progress, pos.step)
                    line_due = bool(every) and pos.step % every == 0
                    every_ckpt = cfg.checkpoint.every_steps
                    epoch_end = pos.step_in_epoch == phase.steps_per_epoch
                    ckpt_due = stopping or (every_ckpt and pos.step % every_ckpt == 0 and not
                                            (epoch_end and cfg.checkpoint.at_epoch_end))
                    self._settle(ledger, pos, window, wait=line_due or ckpt_due or epoch_end
                                 or len(ledger) >= MAX_PENDING_STEPS)
                    if line_due:
                        self._log_steps(metrics, progress, epoch, pos.step, lr, window_loss, window, bp.global_batch)
                        window_loss.zero_()
                        window = dict(start=time.perf_counter(), wait=0.0, steps=0, timed=0)
                    else:
                        progress.step(lr=f"{lr:.4g}")
                    if ckpt_due:
                        now = time.perf_counter()
                        epoch_time += now - segment
                        pos.train_time += now - segment
                        pos.elapsed = now - start
                        self._save_checkpoint(pos, record, loss_sum, window_loss, window["steps"])
                        segment = time.perf_counter()
                    if stopping:
                        progress.end_epoch()
                        progress.print(f"stopping on a signal after step {pos.step}: checkpoint written to "
                                       f"{ckpt.checkpoint_dir(cfg.run.dir)}; run the same command to resume")
                        metrics.close()
                        return dict(stopped_at_step=pos.step)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                self._settle(ledger, pos, window, wait=True)
                epoch_time += time.perf_counter() - segment
                pos.train_time += time.perf_counter() - segment
                progress.end_epoch()
                counted = max(phase.steps_per_epoch - pos.skipped_in_epoch, 1) * topo.world_size
                train_loss = self.comm.all_reduce_sum(loss_sum).item() / counted
                if self.precise_bn[phase.index].micro_batches:
                    self._precise_bn(epoch, phase, self.precise_bn[phase.index].micro_batches)
                result = self._evaluate()
                self._gather_skipped(record)
                pos.elapsed = time.perf_counter() - start
                reached = record.update(epoch + 1, result, pos.elapsed, cfg.train.target_accuracy,
                                        cfg.train.target_metric)
                sps = steps_run * bp.global_batch / max(epoch_time, 1e-9)
                extra = {} if result.top5 is None else {"val_acc_top5": result.top5}
                if plan.phased:
                    extra.update(global_batch=bp.global_batch, image_size=phase.image_size or self.info.image_size)
                if self.info.reads_files:
                    extra["skipped_files"] = record.skipped_files
                if self.stepper.noise is not None:  # every worker: one allreduce of three numbers
                    self.noise_values = self.stepper.noise.epoch_values(self.comm.all_reduce_sum)
                    extra.update(self.noise_values.fields())
                noise_scale = None if self.noise_values is None else self.noise_values.noise_scale
                metrics.write("epoch", epoch=epoch + 1, step=pos.step, train_loss=train_loss, val_loss=result.loss,
                              val_acc=result.accuracy, **extra, lr=lr, samples_per_sec=sps, elapsed_s=pos.elapsed,
                              skipped_steps=pos.skipped_steps)
                progress.print(f"epoch {epoch + 1:>3}/{plan.epochs}  step {pos.step:>6}  train_loss {train_loss:.4f}  "
                               f"val_loss {result.loss:.4f}  val_acc {result.accuracy:.4f}"
                               + (f"  top5 {result.top5:.4f}" if result.top5 is not None else "")
                               + ("" if self.noise_values is None else "  noise scale "
                                  + ("— (noise swamps the gradient)" if noise_scale is None else f"{noise_scale:,.0f}"))
                               + f"  lr {lr:.4g}  {sps:,.0f} img/s  {pos.elapsed:.1f}s")
                pos.epoch, pos.step_in_epoch, pos.skipped_in_epoch = epoch + 1, 0, 0
                if cfg.checkpoint.at_epoch_end:
                    self._save_checkpoint(pos, record, torch.zeros((), dtype=torch.float64), window_loss,
                                          window["steps"])
                if reached and cfg.train.stop_at_target:
                    progress.print(f"target {cfg.train.target_metric} {cfg.train.target_accuracy} reached at epoch "
                                   f"{epoch + 1}: stopping (train.stop_at_target)")
                    break
        finally:
            stop.uninstall()
        self._settle_agreement()
        summary = self._summary(result, record, pos, time.perf_counter() - start)
        metrics.write("summary", **summary)
        metrics.close()
        error = None
        from largebatch.distributed import sharded_state
        from largebatch.distributed.shard import is_fsdp

        model = unwrap(self.model)
        # The whole model in one plain state dict; under comm.shard=full gathered to rank 0's CPU.
        weights = sharded_state.full_model_state(model) if is_fsdp(model) else None
        if topo.is_main:
            final = os.path.join(cfg.run.dir, "checkpoints", "final.pt")
            try:
                save_torch_atomic({"model": model.state_dict() if weights is None else weights, "step": pos.step,
                                   "epoch": pos.epoch, "config": to_dict(cfg)}, final)
            except OSError as exc:
                error = RunStopped(f"cannot write {final} ({exc.strerror}); the last step checkpoint holds the run")
            else:
                progress.print(_closing_line(summary, cfg))
        self.comm.raise_if_any_failed(error, kind=RunStopped)
        self.comm.barrier()
        return summary

    def run_step(self, batches, bp, step: int, stop: StopSignal) -> StepResult:
        """One optimizer step as ``fit`` runs it: the schedule's lr for ``step``, the micro-batches of
        ``bp`` (a BatchPlan) from ``batches``, the update, and the agreement on stopping; nothing in
        it waits for the device."""
        lr = self.plan.schedule(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss, outcome, wait = self.stepper(batches, bp.accum_steps, bp.per_worker_batch, step)
        return StepResult(lr, loss, wait, outcome, self._agree_after_step(stop))

    def _agree_after_step(self, stop: StopSignal) -> bool:
        """Whether to stop on a signal, agreed by every worker. The flags of each step travel while
        the next step runs (a CPU allreduce over gloo, never a device read) and are read at its end,
        so a worker that got a signal stops one step later, together with every other. An
        unreadable image met with data.on_corrupt=error stops every worker here with its message."""
        error = self.loader.error
        flagged = stop.received is not None or error is not None
        if self.comm.distributed:
            previous, self._agreement = self._agreement, self.comm.start_any(flagged)
            flagged = previous is not None and previous.wait()
            if flagged:
                self._settle_agreement()
        if not flagged:
            return False
        self.comm.raise_if_any_failed(error)
        return True

    def _settle_agreement(self) -> None:
        """Wait for the stop flags still travelling, so no collective is left in flight."""
        if self._agreement is not None:
            self._agreement.wait()
            self._agreement = None

    def _gather_skipped(self, record: _Record) -> None:
        """Fold every worker's unreadable images into ``record`` (image folders only); an unreadable
        image under data.on_corrupt=error (met in validation, say) stops every worker here."""
        if not self.info.reads_files:
            return
        error = self.loader.error or self.val_loader.error
        seen = self.comm.all_gather_object((None if error is None else str(error), sorted(self.loader.skipped),
                                            sorted(self.val_loader.skipped)))
        failed = [(rank, message) for rank, (message, _, _) in enumerate(seen) if message is not None]
        if failed:
            rank, message = failed[0]
            raise UsageError(("" if rank == 0 else f"rank {rank}: ") + message)
        record.skipped_train = sorted(set(record.skipped_train).union(*(train for _, train, _ in seen)))
        record.skipped_val = sorted(set(record.skipped_val).union(*(val for _, _, val in seen)))

    def _settle(self, ledger: Ledger, pos: _Position, window: dict, wait: bool) -> None:
        """Account for the steps whose outcome reached the host (all of them with ``wait``): the
        counts of skipped steps, the window's finite steps, and the non-finite guard."""
        for step, code in ledger.take(wait):
            if code == SCALER_SKIP:  # the fp16 gradient scaler met an overflow and lowered its scale
                pos.scaler_skipped_steps += 1
            elif code == APPLIED:
                pos.nonfinite_in_a_row = 0
                window["steps"] += 1  # finite steps: the denominator of the window's mean loss
            else:
                pos.skipped_in_epoch += 1
                pos.nonfinite_in_a_row += 1
                self._nonfinite(pos, step)

    def _nonfinite(self, pos: _Position, step: int) -> None:
        """Step ``step`` had a non-finite loss or gradient and was not applied: count it, or stop."""
        cfg = self.cfg
        pos.skipped_steps += 1

        def kept() -> str:
            newest = ckpt.list_checkpoints(cfg.run.dir)
            return f"; the last good checkpoint is {newest[0]}" if newest else ""

        if cfg.train.on_nonfinite == "stop":
            raise RunStopped(f"non-finite loss or gradient at step {step} (train.on_nonfinite=stop){kept()}")
        if pos.nonfinite_in_a_row >= cfg.train.max_skipped_steps:
            raise RunStopped(f"non-finite loss or gradient in {pos.nonfinite_in_a_row} steps in a row, the last at step "
                             f"{step} (train.max_skipped_steps={cfg.train.max_skipped_steps}){kept()}")
        if self.topology.is_main:
            print(f"largebatch: warning: skipped step {step}: non-finite loss or gradient", flush=True,
                  file=sys.stderr)

    def _finished(self) -> bool:
        """The checkpoint resumed from is the end of the run (its last epoch, or its target reached
        with train.stop_at_target): there is nothing left to train."""
        state = self.restored
        if state is None:
            return False
        epoch = state["position"]["epoch"]
        reached = self.cfg.train.stop_at_target and state["record"].get("epoch_to_target") is not None
        return epoch >= self.plan.epochs or reached

    def _report_finished(self, progress: Progress) -> dict:
        """A finished run met again: say so and give its summary, writing nothing in its folder."""
        cfg = self.cfg
        stored = None
        if self.topology.is_main:
            try:
                with open(os.path.join(cfg.run.dir, "metrics.jsonl")) as fh:
                    lines = [json.loads(x) for x in fh if '"event": "summary"' in x]
                stored = {k: v for k, v in lines[-1].items() if k != "event"} if lines else None
            except (OSError, ValueError):
                stored = None
        summary = self.comm.broadcast_object(stored)
        step = self.restored["position"]["step"]
        if summary is None:  # its metrics are gone: score the weights it ended with
            result = self._evaluate()
            summary = dict(val_acc=result.accuracy, best_val_acc=self.restored["record"]["best_acc"], steps=step)
        progress.print(f"{cfg.run.dir} holds a finished run (step {step}, val_acc {summary['val_acc']:.4f}, best "
                       f"{summary['best_val_acc']:.4f}); nothing was trained or written. To train again, use "
                       "another run.dir or checkpoint.resume=never; python -m largebatch.report shows it")
        return summary

    def _report_startup(self, metrics: MetricsLog, progress: Progress, step: int) -> None:
        """After this process's first step: the seconds from start to its end, and what they went to."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.startup_s = time.perf_counter() - self.started
        compile_s = self.compile_s or 0.0
        if self.restored is None:  # a resumed run keeps the record of how the run started
            metrics.write("startup", step=step, first_step_s=self.startup_s, build_s=self.built_s - compile_s,
                          compile_s=compile_s)
        progress.print(f"first step done {self.startup_s:.1f}s after start (building {self.built_s - compile_s:.1f}s"
                       + (f", compiling {compile_s:.1f}s" if self.compile_s is not None else "") + ")")

    def _write_run_header(self, progress: Progress) -> None:
        """Rank 0: the run folder, config.yaml, classes.json and the printed plan."""
        cfg, topo = self.cfg, self.topology
        if not topo.is_main:
            return
        os.makedirs(cfg.run.dir, exist_ok=True)
        # Only a command that trains the run writes its record (a finished run never gets here).
        write_yaml_atomic(to_dict(cfg), os.path.join(cfg.run.dir, "config.yaml"))
        if self.info.classes:
            write_bytes_atomic(json.dumps(list(self.info.classes)).encode(), os.path.join(cfg.run.dir, "classes.json"))
        backend = self.comm.backend if self.comm.distributed else "no backend"
        progress.print(f"largebatch {__version__}: {self.model_name} on {self.data_name}, {topo.world_size} "
                       f"worker(s) on {self.device.type} over {backend} ({topo.launcher})")
        for line in self.plan.lines():
            progress.print("  " + line)
        sharding = shard_line(self.comm, unwrap(self.model))
        if self.comm.param_dtype is not None:
            sharding += "; bf16 compute on float32 master weights (FSDP2 mixed precision)"
        progress.print(f"  sharding               {sharding}")
        if self.bucket_choice is not None:
            progress.print(f"  gradient buckets       {self.bucket_choice.line()}")
        elif cfg.comm.bucket_mb == "auto" and self.comm.shard == "full":
            progress.print("  gradient buckets       comm.bucket_mb=auto does not apply under comm.shard=full (FSDP2 "
                           "reduce-scatters each block's gradients); no tuning")
        progress.print(f"  training data          {self.data_path.line}")
        choices = list(dict.fromkeys(self.precise_bn))
        if len(choices) == 1:
            progress.print(f"  BatchNorm statistics   {choices[0].line()}")
        else:
            for phase, choice in zip(self.plan.phases, self.precise_bn):
                progress.print(f"  BatchNorm statistics   phase {phase.index + 1}: {choice.line()}")
        speed = [f"channels-last {'on' if self.channels_last else 'off'}"]
        if self.compile_s is not None:
            mode = "default" if cfg.train.compile is True else cfg.train.compile
            speed.append(f"torch.compile (mode {mode}) took {self.compile_s:.1f}s")
        if self.device.type == "cuda":
            speed.append("cudnn.benchmark on")
        progress.print(f"  speed                  {', '.join(speed)}")
        if self.info.augment != "none":
            progress.print(f"  augmentation           {self.info.augment} (training images only)")

    def _log_steps(self, metrics: MetricsLog, progress: Progress, epoch: int, step: int, lr: float,
                   window_loss: torch.Tensor, window: dict, global_batch: int) -> None:
        """A step line: mean loss over the steps since the last one (all workers), lr, images/s and
        the share of this worker's time spent waiting for data."""
        finite_steps = window["steps"] * self.topology.world_size
        loss = self.comm.all_reduce_sum(window_loss.clone()).item() / finite_steps if finite_steps else float("nan")
        seconds = max(time.perf_counter() - window["start"], 1e-9)
        sps = window["timed"] * global_batch / seconds
        metrics.write("step", epoch=epoch + 1, step=step, loss=loss, lr=lr, samples_per_sec=sps,
                      data_wait=window["wait"] / seconds)
        remaining = (self.plan.total_steps - step) * seconds / max(window["timed"], 1)
        progress.step(loss=f"{loss:.4f}", lr=f"{lr:.4g}", img_s=f"{sps:,.0f}", eta=f"{remaining:.0f}s")

    def _summary(self, result: EvalResult, record: _Record, pos: _Position, elapsed: float) -> dict:
        cfg, topo = self.cfg, self.topology
        bp = self.plan.locate(max(pos.step - 1, 0))[0].batch  # the phase the run ended in
        summary = dict(val_acc=result.accuracy, best_val_acc=record.best_acc, time_to_target_s=record.time_to_target,
                       epoch_to_target=record.epoch_to_target,
                       samples_per_sec=self.plan.images_before(pos.step) / max(pos.train_time, 1e-9),
                       elapsed_s=elapsed, world_size=topo.world_size, global_batch=bp.global_batch, steps=pos.step,
                       skipped_steps=pos.skipped_steps, target_accuracy=cfg.train.target_accuracy,
                       target_metric=cfg.train.target_metric, nodes=topo.num_nodes)
        if self.comm.distributed and self.comm.shard != "full":
            summary["bucket_mb"] = self.comm.bucket_mb
        if self.bucket_choice is not None:
            summary["bucket_tuning_s"] = self.bucket_choice.tuning_s
        if self.scaler is not None:
            summary["scaler_skipped_steps"] = pos.scaler_skipped_steps
        if getattr(self, "startup_s", None) is not None:
            summary["startup_s"] = self.startup_s
        if getattr(self, "noise_values", None) is not None:
            summary.update(self.noise_values.fields())
        if result.top5 is not None:
            summary.update(val_acc_top5=result.top5, best_val_acc_top5=record.best_top5)
        if self.info.reads_files:
            summary["skipped_files"] = record.skipped_files
        if cfg.run.cost_per_node_hour is not None:
            summary["cost"] = cfg.run.cost_per_node_hour * topo.num_nodes * elapsed / 3600.0
        return summary

    def _evaluate(self) -> EvalResult:
        """Validation of the current weights. Under comm.shard=full every worker first takes rank
        0's BatchNorm statistics (DDP's rule; FSDP2 leaves buffers to each worker) and runs as many
        forward passes as every other."""
        model, lockstep = unwrap(self.model), None
        if self.comm.shard == "full":
            self.comm.broadcast_buffers(model)
            size = self.plan.eval_size or self.info.image_size
            lockstep = (self.info.channels, size, size)
        return evaluate(model, self.val_loader, self.comm, self.device, self.info.num_classes, self.memory_format,
                        lockstep)

    def _precise_bn(self, epoch: int, phase: Phase, micro_batches: int) -> None:
        """Recompute BatchNorm statistics from this epoch's first ``micro_batches`` training
        micro-batches on each worker, at the validation image size (the statistics serve validation).
        Every worker runs as many forward passes, as comm.shard=full needs."""
        bp = phase.batch
        self.sampler.set_phase(bp, self.plan.eval_size)
        self.sampler.set_epoch(epoch)
        batches = itertools.islice(iter(self.loader), micro_batches)  # at most one epoch's (PreciseBN.for_phase)
        recompute_batchnorm(unwrap(self.model), batches, self.device, self.comm)
        self.sampler.set_phase(bp, phase.image_size)

    def _name_missing_workers(self, exc: BaseException, step: int) -> None:
        """The backward pass that carries the gradient allreduce failed: a timeout names the missing workers."""
        if not self.comm.distributed:
            return
        missing = self.comm.missing_ranks(step)
        if not missing:
            return
        seen = ", ".join(f"rank {r} (last at step {s})" if s >= 0 else f"rank {r} (never)" for r, s in missing.items())
        raise RunStopped(f"gradient allreduce of step {step} failed after up to comm.timeout_s="
                         f"{self.cfg.comm.timeout_s:g}s: workers missing: {seen}") from None

    def close(self) -> None:
        try:
            self._settle_agreement()
        except Exception:  # a worker already gone: nothing left to agree with
            pass
        self.comm.close()
        self.lock.release()
        for folder in getattr(self, "made_dirs", []):  # a run that failed before writing anything leaves no folder
            try:
                os.rmdir(folder)
            except OSError:  # not empty: the run wrote its record
                break


def _missing_dirs(path: str) -> list[str]:
    """The folders of ``path`` that do not exist yet, deepest first."""
    missing, path = [], os.path.abspath(path)
    while path and not os.path.exists(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing


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
