"""What data parallelism does to the model and its optimizer (``comm.shard``): DDP ('none',
'optimizer') or FSDP2 ('full') around the model, the optimizer to match ('optimizer': a
ZeroRedundancyOptimizer), and the fp16 gradient scaler. Each takes the run's
:class:`~largebatch.distributed.comm.Communicator`, whose settings (bucket size, compression,
shard mode) it follows."""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Optional

import torch
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel

from largebatch.optim import build_optimizer as optimizer_of, optimizer_parts, prepare_state
from largebatch.distributed.comm import Communicator
from largebatch.distributed.noise_hook import default_allreduce_hook, measuring
from largebatch.distributed.shard import device_mesh, fully_shard_model, is_fsdp, local, shard_units

_DDP_TAKES_INIT_SYNC = "init_sync" in inspect.signature(DistributedDataParallel.__init__).parameters


def wrap_model(comm: Communicator, model: nn.Module, bucket_mb: Optional[float] = None,
               powersgd_start_step: Optional[int] = None, sync_weights: bool = True) -> nn.Module:
    """DDP for several workers (rank 0's weights are broadcast); the bare model for one.

    With ``comm.backend=mpi`` the gradient buckets are averaged by MPI through
    :class:`largebatch.distributed.mpi.AllreduceHook`; ``comm.compression`` registers DDP's
    fp16, bf16 or PowerSGD communication hook (or the MPI hook's fp16 form). ``bucket_mb`` and
    ``powersgd_start_step`` replace the communicator's own for this wrapper (bucket tuning
    times several wrappers in turn; each must be freed before the next is made);
    ``sync_weights=False`` skips the broadcast of rank 0's weights where torch allows it.

    ``comm.shard=full``: rank 0's weights and buffers are broadcast, then FSDP2's ``fully_shard``
    is applied to each block and the root, in place (on one worker too, over its 1-rank group);
    the bucket size does not apply.
    """
    if comm.shard == "full":
        return _shard_fully(comm, model, sync_weights)
    if not comm.distributed:
        return model
    bucket_mb = comm.bucket_mb if bucket_mb is None else bucket_mb
    if bucket_mb is None:
        raise ValueError("no gradient bucket size yet: set Communicator.bucket_mb (comm.bucket_mb=auto "
                         "chooses one) or pass bucket_mb")
    ddp = DistributedDataParallel(
        model,
        device_ids=[comm.device.index] if comm.device.type == "cuda" else None,
        bucket_cap_mb=bucket_mb,
        gradient_as_bucket_view=True,
        **({} if sync_weights or not _DDP_TAKES_INIT_SYNC else {"init_sync": False}),
    )
    comm.adopt(ddp)  # its reducer goes when the communicator closes
    hook, state = None, None
    if comm.backend == "mpi":
        hook = comm.mpi_allreduce_hook().allreduce
    elif comm.compression in ("fp16", "bf16"):
        hook = default_hooks.fp16_compress_hook if comm.compression == "fp16" else default_hooks.bf16_compress_hook
    elif comm.compression == "powersgd":
        state = powerSGD_hook.PowerSGDState(
            process_group=None, matrix_approximation_rank=comm.powersgd_rank,
            start_powerSGD_iter=powersgd_start_step or comm.powersgd_start_step, random_seed=0)
        hook = _one_bucket_at_a_time(powerSGD_hook.powerSGD_hook)
    if comm.noise_meter is not None:  # torch's own allreduce hook where DDP would use its built-in one
        hook = measuring(hook or default_allreduce_hook(), comm.noise_meter)
    if hook is not None:
        ddp.register_comm_hook(state=state, hook=hook)
    return ddp


def _shard_fully(comm: Communicator, model: nn.Module, sync_weights: bool) -> nn.Module:
    if comm.distributed and sync_weights:
        comm.broadcast_tensors([t.detach() for t in model.parameters()] + list(model.buffers()))
    return fully_shard_model(model, device_mesh(comm.world_size, comm.device), comm.param_dtype)


def _one_bucket_at_a_time(hook):
    """``hook`` with each bucket's collectives started only once the previous bucket's are done.

    PowerSGD launches its later allreduces from future callbacks; with several buckets in flight,
    gloo can run those callbacks in a different order on each worker, and the workers then meet in
    mismatched collectives. Chaining the buckets keeps one order everywhere.
    """
    last: list = [None]

    def serialized(state, bucket):
        previous = last[0]
        if previous is None or previous.done():
            future = hook(state, bucket)
        else:
            future = torch.futures.Future()

            def start(_):
                try:
                    hook(state, bucket).then(lambda done: _settle(future, done))
                except BaseException as exc:
                    future.set_exception(exc)

            previous.then(start)
        last[0] = future
        return future

    serialized.__name__ = f"serialized_{hook.__name__}"
    return serialized


def _settle(future: torch.futures.Future, done: torch.futures.Future) -> None:
    try:
        future.set_result(done.value())
    except BaseException as exc:
        future.set_exception(exc)


def shard_line(comm: Communicator, model: nn.Module) -> str:
    """What each worker keeps of ``model`` (the unwrapped module), for the run header."""
    n = comm.world_size
    if comm.shard == "full":
        return (f"full (FSDP2, {len(shard_units(model))} blocks + root: weights, gradients and optimizer state "
                f"split over {n} worker(s))")
    if comm.shard == "optimizer":
        return f"optimizer (ZeRO-1: optimizer state split over {n} worker(s); DDP averages the gradients)"
    return "none (every worker holds all weights, gradients and optimizer state)"


def _uncompiled(model: nn.Module) -> nn.Module:
    """The module torch.compile wrapped, or ``model`` itself."""
    return getattr(model, "_orig_mod", model)


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a compiled and/or DDP wrapper (what checkpoints hold). FSDP2
    shards the module in place: under comm.shard=full it is the user's module, its parameters
    DTensors."""
    model = _uncompiled(model)
    return _uncompiled(model.module) if isinstance(model, DistributedDataParallel) else model


def no_sync(model: nn.Module):
    """Skip the gradient allreduce (DDP) or reduce-scatter (FSDP2) for this backward (all
    accumulation micro-steps but the last)."""
    model = _uncompiled(model)
    if isinstance(model, DistributedDataParallel):
        return model.no_sync()
    if is_fsdp(model):
        return _fsdp_no_sync(model)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(model: nn.Module):
    """FSDP2's ``no_sync``: gradients accumulate unsharded on each worker, without the reduce-scatter."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def build_optimizer(comm: Communicator, model: nn.Module, cfg) -> torch.optim.Optimizer:
    """The optimizer of ``cfg`` (an OptimConfig) for ``model`` (the unwrapped module) under
    ``comm.shard``: as is ('none'); inside a ZeroRedundancyOptimizer that keeps this worker's
    share of the optimizer state ('optimizer'); over the local shards, its norms summed across
    the workers by :meth:`Communicator.all_reduce_sum` ('full')."""
    if comm.shard == "optimizer":
        cls, groups, kwargs = optimizer_parts(model, cfg)
        zero = _zero_optimizer_class()(groups, optimizer_class=cls, **kwargs)
        prepare_state(zero.optim)
        return zero
    if comm.shard == "full":
        return optimizer_of(model, cfg, shard_sum=comm.all_reduce_sum)
    return optimizer_of(model, cfg)


@functools.lru_cache(maxsize=None)
def _zero_optimizer_class() -> type:
    """The class, made on first use: torch.distributed.optim takes about a second to import, and
    only comm.shard=optimizer needs it."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    class ZeroOptimizer(ZeroRedundancyOptimizer):
        """``ZeroRedundancyOptimizer`` that keeps the device-side skip of the optimizer inside it.

        ``found_inf`` and ``grad_scale`` (the protocol of ``torch.amp.GradScaler`` and torch's fused
        optimizers, set as attributes before ``step()``) are handed to the inner optimizer
        (``.optim``) for its step, and the wrapper supports them exactly when that optimizer does.
        A skipped step leaves this worker's tensors as they were, and the broadcast that follows
        sends them unchanged.
        """

        @property
        def _step_supports_amp_scaling(self) -> bool:
            return getattr(self.optim, "_step_supports_amp_scaling", False)

        def step(self, closure=None, **kwargs):
            names = [n for n in ("found_inf", "grad_scale") if n in self.__dict__]
            for name in names:
                setattr(self.optim, name, self.__dict__[name])
            try:
                return super().step(closure, **kwargs)
            finally:
                for name in names:
                    delattr(self.optim, name)

        def load_state_dict(self, state_dict) -> None:
            """ZeroRedundancyOptimizer loads this worker's share of the state itself, moving 0-dim
            state tensors (LAMB's step counts) to the CPU, and never calls the inner optimizer's
            own loading: run its ``__setstate__`` after, which puts them back where it keeps them."""
            super().load_state_dict(state_dict)
            self.optim.__setstate__({"state": self.optim.state, "param_groups": self.optim.param_groups})

    return ZeroOptimizer


def grad_scaler(comm: Communicator) -> torch.amp.GradScaler:
    """The fp16 gradient scaler: torch's, or under comm.shard=full one whose overflow flag is
    agreed by every worker (each sees its own gradient shards only)."""
    if comm.shard == "full":
        return _sharded_grad_scaler_class()(comm.device.type)
    return torch.amp.GradScaler(comm.device.type)


class _LocalShards:
    """An optimizer's parameter groups as the gradient scaler reads them: each gradient's local shard."""

    def __init__(self, optimizer):
        self.param_groups = [{"params": [_GradView(p) for p in g["params"]]} for g in optimizer.param_groups]


class _GradView:
    __slots__ = ("grad",)

    def __init__(self, p):
        self.grad = None if p.grad is None else local(p.grad)


@functools.lru_cache(maxsize=None)
def _sharded_grad_scaler_class() -> type:
    """The class, made on first use (torch.distributed.fsdp is slow to import; only comm.shard=full
    with train.precision=fp16 needs it)."""
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    class LocalShardGradScaler(ShardedGradScaler):
        """torch's ``ShardedGradScaler`` (the overflow flag allreduced, so every worker skips the same
        steps and keeps the same scale), reading the gradients' local shards rather than the DTensors,
        handing the optimizer a 0-dim ``found_inf`` as ``torch.amp.GradScaler`` does, and updating the
        scale on the CPU without reading the flag on the host."""

        def _unscale_grads_(self, optimizer, inv_scale, found_inf, allow_fp16=True):
            found = super()._unscale_grads_(_LocalShards(optimizer), inv_scale, found_inf, allow_fp16)
            return {dev: flag.view(()) for dev, flag in found.items()}  # views: the allreduce reaches them

        def _amp_update_scale_cpu_(self, found_inf):  # torch's kernel, where the parent reads the flag on the host
            torch._amp_update_scale_(self._scale, self._growth_tracker, found_inf, self._growth_factor,
                                     self._backoff_factor, self._growth_interval)

    return LocalShardGradScaler
