"""When a run saves its state, what goes in, and how a run continues from it.

:class:`Checkpointer` takes the state from the objects that hold it (the model, the optimizer,
the gradient scaler, the noise scale, the run's :class:`~largebatch.engine.state.Position`,
:class:`~largebatch.engine.state.Record` and :class:`~largebatch.engine.state.Losses`), adds what
only all workers together know (their random number states and partial loss sums), and hands
the result to :mod:`largebatch.engine.checkpoint`, which writes it atomically. Restoring puts
each part back where it came from.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import torch

from largebatch.config import Config, config_differences, config_hash, flat_config, from_flat, to_dict
from largebatch.distributed import Communicator, Topology, sharded_state
from largebatch.distributed.shard import is_fsdp
from largebatch.distributed.wrap import unwrap
from largebatch.engine.checkpoint import (begin_sharded, checkpoint_dir, find_resume_state as find_checkpoint,
                                          finish_sharded, move_aside, rng_state, save as save_checkpoint, set_rng_state,
                                          sharded_paths)
from largebatch.engine.bucket_tuning import BucketChoice
from largebatch.engine.run_plan import RunPlan, make_run_plan
from largebatch.engine.state import Losses, Position, Record
from largebatch.errors import RunStopped, UsageError
from largebatch.fileio import save_torch_atomic
from largebatch.version import __version__


def find_resume_state(cfg: Config) -> Optional[dict]:
    """Rank 0: the checkpoint to continue from (``checkpoint.resume``), checked against ``cfg``.
    A fresh start moves the step checkpoints of an earlier run in ``run.dir`` aside."""
    state = find_checkpoint(cfg.run.dir, cfg.checkpoint.resume)
    differing = [] if state is None else config_differences(state["config"], to_dict(cfg))
    if differing:
        shown = ", ".join(f"{k} ({old!r} -> {new!r})" for k, old, new in differing[:6])
        raise UsageError(f"checkpoint {state.get('path', cfg.checkpoint.resume)} was made with a different "
                         f"config: {shown}; use the same values, another run.dir, or checkpoint.resume=never")
    if cfg.checkpoint.resume != "auto":
        move_aside(cfg.run.dir)  # a fresh start must not later resume an older run's checkpoint
    return state


class Checkpointer:
    """Owns the run's checkpoints: when one is due, writing it (every worker takes part), restoring
    a run from one, and the final weights. ``restored`` is the checkpoint this run continues from,
    as every worker received it (without the model's weights, which the model already holds), or
    None. ``before_save`` runs on every worker before each checkpoint (it folds the unreadable
    images the workers met into the record)."""

    def __init__(self, cfg: Config, topology: Topology, comm: Communicator, device: torch.device, model, optimizer,
                 scaler, noise, plan: RunPlan, bucket_choice: Optional[BucketChoice], restored: Optional[dict],
                 before_save: Callable[[Record], None], adaptive=None):
        self.cfg, self.topology, self.comm, self.device = cfg, topology, comm, device
        self.model, self.optimizer, self.scaler, self.noise = model, optimizer, scaler, noise
        self.plan, self.bucket_choice, self.restored, self.before_save = plan, bucket_choice, restored, before_save
        self.every = cfg.checkpoint.every_steps
        self.at_epoch_end = cfg.checkpoint.at_epoch_end
        """A checkpoint after each epoch's validation."""
        self.folder = checkpoint_dir(cfg.run.dir)
        self.adaptive = adaptive
        """adaptive.enabled: the AdaptiveBatch whose state (batch, B_crit, step-time model) is kept."""

    def due(self, step: int, epoch_end: bool) -> bool:
        """Whether a checkpoint is due after step ``step`` (``step`` steps done): every
        checkpoint.every_steps, unless the epoch ends there and the epoch's own checkpoint follows."""
        return bool(self.every) and step % self.every == 0 and not (epoch_end and self.at_epoch_end)

    def finished(self) -> bool:
        """The checkpoint resumed from is the end of the run (its last epoch, or its target reached
        with train.stop_at_target): there is nothing left to train."""
        state = self.restored
        if state is None:
            return False
        reached = self.cfg.train.stop_at_target and state["record"].get("epoch_to_target") is not None
        return state["position"]["epoch"] >= self.plan.epochs or reached

    # -- restore ---------------------------------------------------------------------------------
    def start_position(self) -> Position:
        """Where the run starts: the checkpoint's position, or the beginning."""
        return Position.from_state(self.restored)

    def restore(self) -> tuple[Position, Record, Losses]:
        """The model's optimizer state, the scaler's, the noise scale's and this worker's random
        state from the checkpoint, if any; returns the run's position, record and this worker's
        partial loss sums."""
        state, topo = self.restored, self.topology
        if state is None:
            return Position(), Record(), Losses(self.device)
        self._load_model_and_optimizer(state)
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.noise is not None and state.get("noise") and (self.adaptive is None or topo.is_main):
            self.noise.load_state_dict(state["noise"])  # the adaptive batch's: rank 0's alone
        same_world = state["world_size"] == topo.world_size
        set_rng_state(state["rng"][topo.rank if same_world else 0], self.device)
        if same_world:
            loss_part, window_part = state["loss_parts"][topo.rank], state["window_parts"][topo.rank]
        else:  # each part is a sum of per-worker means: rescale to the new number of workers
            scale = topo.world_size / state["world_size"]
            loss_part = sum(state["loss_parts"]) * scale if topo.is_main else 0.0
            window_part = sum(state["window_parts"]) * scale if topo.is_main else 0.0
        losses = Losses(self.device, loss_part, window_part, state["window_steps"])
        return self.start_position(), Record.from_state(state), losses

    def resumed_line(self, pos: Position) -> str:
        """What rank 0 prints on resuming: one line, and under it a warning where the lr schedule at
        the resumed step is not the checkpoint's (train.epochs changed)."""
        state, topo = self.restored, self.topology
        same_world = state["world_size"] == topo.world_size
        where = f"epoch {pos.epoch + 1}, step {pos.step}"  # a finished run never gets here (finished())
        batch = self.plan.phase_of(pos.epoch).batch.global_batch if self.adaptive is None else self.adaptive.batch
        line = (f"resuming from {state.get('path', 'checkpoint')} at {where}"
                + ("" if same_world else f" on {topo.world_size} workers instead of {state['world_size']}: "
                   f"same global batch {batch}, same data position"))
        warning = self.schedule_change(pos.step) if self.adaptive is None else self.progress_change(pos)
        return line if warning is None else f"{line}\nlargebatch: warning: {warning}"

    def schedule_change(self, step: int) -> Optional[str]:
        """One line where the lr at ``step`` under this run's train.epochs differs from the lr the
        checkpoint's train.epochs gave it (a finished run given more epochs climbs back from its
        decayed lr to near the peak); None where it is the same."""
        saved, epochs = self.restored["config"]["train"]["epochs"], self.cfg.train.epochs
        if saved == epochs:
            return None
        before = self._plan_with_epochs(saved)
        if before is None:
            return None
        before = before.schedule
        now = self.plan.schedule
        if abs(now(step) - before(step)) <= 1e-9 * max(abs(now(step)), abs(before(step))):
            return None
        return (f"train.epochs changed from {saved} to {epochs} since the checkpoint: the lr schedule ({now.decay} "
                f"decay) now ends at step {now.total_steps}, not {before.total_steps}, so the lr goes from "
                f"{before(max(step - 1, 0)):.4g} (the checkpoint's last step) to {now(step):.4g} at step {step} "
                f"(train.epochs={saved} would give {before(step):.4g}); keep train.epochs={saved} to follow the old "
                "schedule, or train the longer run from the start in another run.dir")

    def progress_change(self, pos: Position) -> Optional[str]:
        """:meth:`schedule_change` for the adaptive batch, whose lr is a function of the epochs
        trained: one line where the resumed point's lr under this run's train.epochs differs."""
        saved, epochs = self.restored["config"]["train"]["epochs"], self.cfg.train.epochs
        before = None if saved == epochs else self._plan_with_epochs(saved)
        if before is None:
            return None
        now, t = self.plan.adaptive, pos.epoch + pos.images_in_epoch / self.plan.num_train
        lr_now = now.lr(t, self.adaptive.batch, self.adaptive.b_crit)
        lr_before = before.adaptive.lr(t, self.adaptive.batch, self.adaptive.b_crit)
        if abs(lr_now - lr_before) <= 1e-9 * max(abs(lr_now), abs(lr_before)):
            return None
        return (f"train.epochs changed from {saved} to {epochs} since the checkpoint: the lr schedule "
                f"({self.cfg.schedule.decay} decay over the epochs trained) now gives {lr_now:.4g} at epoch {t:.2f}, "
                f"where train.epochs={saved} gives {lr_before:.4g}; keep train.epochs={saved} to follow the old "
                "schedule, or train the longer run from the start in another run.dir")

    def _plan_with_epochs(self, epochs: int) -> Optional[RunPlan]:
        """This run's plan under the checkpoint's train.epochs; None where that makes no plan here."""
        try:
            return make_run_plan(from_flat({**flat_config(to_dict(self.cfg)), "train.epochs": epochs}),
                                 self.topology.world_size, self.plan.num_train, announce=False)
        except UsageError:  # the checkpoint's epochs do not make a plan here: nothing to compare
            return None

    def _load_model_and_optimizer(self, state: dict) -> None:
        """A sharded checkpoint (comm.shard=full) is read by every worker, whatever the number of
        workers that wrote it and this run's comm.shard; a plain checkpoint's weights came with rank
        0's model (which DDP, or the broadcast before FSDP2 shards it, gave every worker), its
        optimizer state with ``state``."""
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

    # -- save ------------------------------------------------------------------------------------
    def save(self, pos: Position, record: Record, losses: Losses) -> None:
        """All workers take part (their RNG states, partial sums and unreadable files; under
        comm.shard their shards of the state); rank 0 writes the checkpoint, or under comm.shard=full
        every worker writes its shards and rank 0 the rest."""
        self.before_save(record)
        rngs = self.comm.all_gather_object(rng_state(self.device))
        parts = self.comm.all_gather_object((float(losses.epoch.item()), float(losses.window.item())))
        noise = None
        if self.noise is not None:  # the workers' averages made equal (changes no later value), kept
            self.noise.epoch_values(self.comm.all_reduce_sum)
            noise = self.noise.state_dict()
        cfg = self.cfg
        state = dict(scaler=None if self.scaler is None else self.scaler.state_dict(),
                     position=pos.state_dict(), record=record.state_dict(), rng=rngs,
                     loss_parts=[p[0] for p in parts], window_parts=[p[1] for p in parts],
                     window_steps=losses.window_steps, noise=noise, world_size=self.topology.world_size,
                     global_batch=(self.plan.phase_of(pos.epoch).batch.global_batch if self.adaptive is None
                                   else self.adaptive.batch),
                     adaptive=None if self.adaptive is None else self.adaptive.state_dict(),
                     bucket_mb=None if self.bucket_choice is None else self.bucket_choice.bucket_mb,
                     config=to_dict(cfg), config_hash=config_hash(to_dict(cfg)), version=__version__)
        model = unwrap(self.model)
        error = self._write_sharded(model, state, pos.step) if is_fsdp(model) else \
            self._write_plain(model, state, pos.step)
        # every worker learns whether rank 0 managed, so none waits for a rank 0 that has stopped
        self.comm.raise_if_any_failed(error, kind=RunStopped)

    def _failed(self, why: str) -> RunStopped:
        return RunStopped(f"cannot write a checkpoint to {self.folder} ({why}); free space or fix permissions, then "
                          "run again to resume")

    def _write_plain(self, model, state: dict, step: int) -> Optional[RunStopped]:
        """Every worker; returns this worker's failure to write, if any."""
        main = self.topology.is_main
        optimizer = sharded_state.gather_optimizer_state(self.optimizer, main)  # ZeRO: a collective
        if main:
            try:
                save_checkpoint(dict(model=model.state_dict(), optimizer=optimizer, **state), self.cfg.run.dir, step,
                          self.cfg.checkpoint.keep)
            except OSError as exc:
                return self._failed(exc.strerror)
        return None

    def _write_sharded(self, model, state: dict, step: int) -> Optional[RunStopped]:
        """comm.shard=full: rank 0's BatchNorm statistics (DDP's rule), then every worker writes its
        shards into a folder rank 0 emptied first; rank 0 adds the rest and renames the folder."""
        run_dir, main = self.cfg.run.dir, self.topology.is_main
        self.comm.broadcast_buffers(model)
        tensors, paths, rest = sharded_state.state_to_save(model, self.optimizer)
        error = None
        if main:
            try:
                begin_sharded(run_dir, step)
            except OSError as exc:
                error = self._failed(exc.strerror)
        self.comm.raise_if_any_failed(error, kind=RunStopped)
        try:
            sharded_state.save(tensors, sharded_paths(run_dir, step)[0])
        except (Exception, sharded_state.CheckpointException) as exc:  # raised on every worker when any failed
            return self._failed(sharded_state.failure(exc))
        if main:
            try:
                finish_sharded(dict(state, shards=dict(paths=paths, rest=rest)), run_dir, step,
                                    self.cfg.checkpoint.keep)
            except OSError as exc:
                return self._failed(exc.strerror)
        return None

    def save_final(self, pos: Position) -> None:
        """The whole model in one plain state dict (under comm.shard=full gathered to rank 0's CPU)
        in ``checkpoints/final.pt``; every worker learns whether rank 0 managed."""
        model = unwrap(self.model)
        weights = sharded_state.full_model_state(model) if is_fsdp(model) else None
        error = None
        if self.topology.is_main:
            final = os.path.join(self.folder, "final.pt")
            try:
                save_torch_atomic({"model": model.state_dict() if weights is None else weights, "step": pos.step,
                                   "epoch": pos.epoch, "config": to_dict(self.cfg)}, final)
            except OSError as exc:
                error = RunStopped(f"cannot write {final} ({exc.strerror}); the last step checkpoint holds the run")
        self.comm.raise_if_any_failed(error, kind=RunStopped)
