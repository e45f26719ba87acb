"""The process group, gradient synchronisation and the few collectives the engine needs.

This is the only module that imports ``torch.distributed``: the training loop, the models and
the optimizers call :class:`Communicator` and never touch a collective themselves.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import inspect
import os
from datetime import timedelta
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from largebatch.distributed.noise_hook import LocalSquaredNorm, default_allreduce_hook, measuring
from largebatch.distributed.rendezvous import endpoint
from largebatch.distributed.shard import SHARD_MODES, device_mesh, fully_shard_model, is_fsdp, local, shard_units
from largebatch.distributed.topology import Topology
from largebatch.errors import UsageError


_DDP_TAKES_INIT_SYNC = "init_sync" in inspect.signature(DistributedDataParallel.__init__).parameters


def select_device(topology: Topology, requested: str = "auto") -> torch.device:
    """The worker's device for ``train.device``: 'auto' is ``cuda:<local_rank>`` when CUDA GPUs are
    visible, else the CPU; 'cpu' is the CPU whatever the machine has; 'cuda' needs a GPU per local worker."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UsageError("train.device=cuda but no CUDA GPU is visible; use train.device=cpu or auto")
    count = torch.cuda.device_count()
    if topology.local_rank >= count:
        raise UsageError(f"local rank {topology.local_rank} has no GPU: this node has {count}; start at most "
                         f"{count} workers per node, or train on the CPU with train.device=cpu")
    return torch.device("cuda", topology.local_rank)


def select_backend(requested: str, device: torch.device) -> str:
    """nccl on CUDA and gloo on CPU, unless ``comm.backend`` names one.

    ``mpi`` averages gradients with MPI (a DDP communication hook over mpi4py); the few control
    collectives then go through gloo.
    """
    if requested == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if requested == "nccl" and device.type != "cuda":
        raise UsageError("comm.backend=nccl needs CUDA GPUs and none is visible; use comm.backend=gloo on CPU")
    if requested == "mpi" and device.type != "cpu":
        raise UsageError("comm.backend=mpi averages CPU gradients; on GPUs use comm.backend=nccl")
    return requested


def cpu_threads(topology: Topology, environ=os.environ) -> Optional[int]:
    """Threads per worker on CPU: cores / local workers, unless OMP_NUM_THREADS is set (then None)."""
    if environ.get("OMP_NUM_THREADS"):
        return None
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, cores // topology.local_world_size)


def _rendezvous_store(topology: Topology, timeout_s: float, master_addr: Optional[str]):
    """The key-value store the workers meet in, with keys scoped to this launch attempt.

    torchrun's agent keeps one store across ``--max-restarts`` attempts; without a per-attempt
    prefix a restarted worker can read the address of a dead worker of the previous attempt and
    fail to connect. Without an agent, rank 0 hosts the store at the endpoint
    :func:`largebatch.distributed.rendezvous.endpoint` finds for the launcher.
    """
    host, port = endpoint(topology, os.environ, master_addr)
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(host, port, world_size=topology.world_size, is_master=not agent and topology.rank == 0,
                          timeout=timedelta(seconds=timeout_s), wait_for_workers=False, multi_tenant=not agent)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"largebatch/attempt-{attempt}/", store)


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


def _check_mpi_world(topology: Topology) -> None:
    """comm.backend=mpi needs MPI_COMM_WORLD to be the job's world, which only an MPI launch gives."""
    from largebatch.distributed import mpi

    size = mpi.size()
    if size != topology.world_size:
        raise UsageError(f"comm.backend=mpi: MPI sees {size} process(es) but {topology.launcher} started "
                         f"{topology.world_size} workers; launch with mpirun/mpiexec (or srun --mpi=pmix), "
                         "or use comm.backend=gloo")


def _uncompiled(model: nn.Module) -> nn.Module:
    """The module torch.compile wrapped, or ``model`` itself."""
    return getattr(model, "_orig_mod", model)


@contextlib.contextmanager
def _fsdp_no_sync(model: nn.Module):
    """FSDP2's ``no_sync``: gradients accumulate unsharded on each worker, without the reduce-scatter."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


@functools.lru_cache(maxsize=None)
def _zero_optimizer_class() -> type:
    """The class, made on first use (torch.distributed.optim is imported only where it is needed)."""
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


@functools.lru_cache(maxsize=None)
def _sharded_grad_scaler_class() -> type:
    """torch's ``ShardedGradScaler`` (the overflow flag allreduced, so every worker skips the same
    steps and keeps the same scale), reading the gradients' local shards rather than the DTensors,
    handing the optimizer a 0-dim ``found_inf`` as ``torch.amp.GradScaler`` does, and updating the
    scale on the CPU without reading the flag on the host."""
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    class _LocalShards:
        def __init__(self, optimizer):
            self.param_groups = [{"params": [_GradView(p) for p in g["params"]]} for g in optimizer.param_groups]

    class _GradView:
        __slots__ = ("grad",)

        def __init__(self, p):
            self.grad = None if p.grad is None else local(p.grad)

    class LocalShardGradScaler(ShardedGradScaler):
        def _unscale_grads_(self, optimizer, inv_scale, found_inf, allow_fp16=True):
            found = super()._unscale_grads_(_LocalShards(optimizer), inv_scale, found_inf, allow_fp16)
            return {dev: flag.view(()) for dev, flag in found.items()}  # views: the allreduce reaches them

        def _amp_update_scale_cpu_(self, found_inf):  # torch's kernel, where the parent reads the flag on the host
            torch._amp_update_scale_(self._scale, self._growth_tracker, found_inf, self._growth_factor,
                                     self._backoff_factor, self._growth_interval)

    return LocalShardGradScaler


class PendingFlag:
    """A flag agreed across workers by an asynchronous allreduce (see Communicator.start_any). It
    lives in host memory, a numpy array, which the allreduce reaches through a tensor view; reading
    it reads no tensor, let alone a device's."""

    def __init__(self, host: np.ndarray, work, view: Optional[torch.Tensor] = None):
        self.host, self.work = host, work
        self.view = view  # the tensor the allreduce writes through, alive until it has finished

    def wait(self) -> bool:
        if self.work is not None:
            self.work.wait()
            self.work = None
        return bool(self.host[0])


class Communicator:
    """Owns the process group and wraps the model for data parallelism (``comm.shard``): DDP
    ('none', 'optimizer') or FSDP2 ('full'); builds the optimizer to match ('optimizer':
    ZeroRedundancyOptimizer). A single worker has no process group, except under 'optimizer' and
    'full', which run on a 1-rank group so that the code path is the one of many workers.
    ``param_dtype`` ('full' only): FSDP2's compute dtype for the parameters (bf16 on GPUs)."""

    def __init__(self, topology: Topology, backend: str, device: torch.device, bucket_mb: Optional[float],
                 timeout_s: float = 600.0, master_addr: Optional[str] = None, compression: str = "none",
                 powersgd_rank: int = 2, powersgd_start_step: int = 10, shard: str = "none",
                 param_dtype: Optional[torch.dtype] = None, noise_scale: bool = False):
        if shard not in SHARD_MODES:
            raise ValueError(f"shard={shard!r}: use one of {', '.join(SHARD_MODES)}")
        if shard == "full" and (backend == "mpi" or compression != "none"):
            raise UsageError(f"comm.shard=full takes comm.backend gloo or nccl and comm.compression=none, not "
                             f"{backend} and {compression}")
        self.topology = topology
        self.shard, self.param_dtype = shard, param_dtype
        self.shard_blocks: Optional[int] = None  # 'full': the blocks fully_shard was applied to, root aside
        self.backend = backend
        self.device = device
        self.bucket_mb = bucket_mb
        self.compression, self.powersgd_rank, self.powersgd_start_step = compression, powersgd_rank, powersgd_start_step
        self.powersgd_state = None
        self.distributed = topology.world_size > 1
        # train.noise_scale: each worker's |G_b|², summed over the gradient buckets by the DDP hook
        self.noise_meter = LocalSquaredNorm() if noise_scale and self.distributed and shard != "full" else None
        self.store = None
        self.hook = None
        self.owns_group = False  # started the process group here, so close() ends it
        if compression == "bf16" and device.type != "cuda":
            raise UsageError("comm.compression=bf16 needs CUDA GPUs and NCCL (torch's bf16 hook has no CPU path); "
                             "on CPU use comm.compression=fp16")
        if self.distributed and backend == "mpi":
            _check_mpi_world(topology)
        if self.distributed and not dist.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(device)
            self.store = _rendezvous_store(topology, timeout_s, master_addr)
            dist.init_process_group(backend="gloo" if backend == "mpi" else backend, rank=topology.rank,
                                    world_size=topology.world_size, timeout=timedelta(seconds=timeout_s),
                                    store=self.store)
            self.owns_group = True
        elif shard != "none" and not dist.is_initialized():
            # One worker: ZeRO and FSDP2 still want a process group; a 1-rank one needs no rendezvous.
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1,
                                    timeout=timedelta(seconds=timeout_s), store=dist.HashStore())
            self.owns_group = True
        self.timeout_s = timeout_s
        # Control flags (stop agreement) travel on the CPU, so reading them never waits for the GPU.
        self.control_group = None
        if self.distributed and backend == "nccl":
            self.control_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))

    # -- models --------------------------------------------------------------------------------
    def wrap_model(self, model: nn.Module, bucket_mb: Optional[float] = None,
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
        if self.shard == "full":
            return self._shard_fully(model, sync_weights)
        if not self.distributed:
            return model
        bucket_mb = self.bucket_mb if bucket_mb is None else bucket_mb
        if bucket_mb is None:
            raise ValueError("no gradient bucket size yet: set Communicator.bucket_mb (comm.bucket_mb=auto "
                             "chooses one) or pass bucket_mb")
        ddp = DistributedDataParallel(
            model,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            bucket_cap_mb=bucket_mb,
            gradient_as_bucket_view=True,
            **({} if sync_weights or not _DDP_TAKES_INIT_SYNC else {"init_sync": False}),
        )
        hook, state = None, None
        if self.backend == "mpi":
            from largebatch.distributed import mpi

            self.hook = self.hook or mpi.AllreduceHook(fp16=self.compression == "fp16")
            hook = self.hook.allreduce
        elif self.compression in ("fp16", "bf16"):
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

            hook = default_hooks.fp16_compress_hook if self.compression == "fp16" else default_hooks.bf16_compress_hook
        elif self.compression == "powersgd":
            from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook

            self.powersgd_state = powerSGD_hook.PowerSGDState(
                process_group=None, matrix_approximation_rank=self.powersgd_rank,
                start_powerSGD_iter=powersgd_start_step or self.powersgd_start_step, random_seed=0)
            hook, state = _one_bucket_at_a_time(powerSGD_hook.powerSGD_hook), self.powersgd_state
        if self.noise_meter is not None:  # torch's own allreduce hook where DDP would use its built-in one
            hook = measuring(hook or default_allreduce_hook(), self.noise_meter)
        if hook is not None:
            ddp.register_comm_hook(state=state, hook=hook)
        return ddp

    def _shard_fully(self, model: nn.Module, sync_weights: bool) -> nn.Module:
        if self.distributed and sync_weights:
            self._broadcast_tensors([t.detach() for t in model.parameters()] + list(model.buffers()))
        self.shard_blocks = len(shard_units(model))
        return fully_shard_model(model, device_mesh(self.world_size, self.device), self.param_dtype)

    def local_sq_norm(self) -> torch.Tensor:
        """train.noise_scale: |G_b|² of this worker's gradient in the last backward pass that ran the
        allreduce (0-dim float32 on the device, not read), and a fresh sum."""
        return self.noise_meter.take(self.device)

    @property
    def world_size(self) -> int:
        return self.topology.world_size

    def shard_line(self) -> str:
        """What each worker keeps, for the run header."""
        n = self.world_size
        if self.shard == "full":
            return (f"full (FSDP2, {self.shard_blocks} blocks + root: weights, gradients and optimizer state "
                    f"split over {n} worker(s))")
        if self.shard == "optimizer":
            return f"optimizer (ZeRO-1: optimizer state split over {n} worker(s); DDP averages the gradients)"
        return "none (every worker holds all weights, gradients and optimizer state)"

    @staticmethod
    def unwrap(model: nn.Module) -> nn.Module:
        """The user's module inside a compiled and/or DDP wrapper (what checkpoints hold). FSDP2
        shards the module in place: under comm.shard=full it is the user's module, its parameters
        DTensors."""
        model = _uncompiled(model)
        return _uncompiled(model.module) if isinstance(model, DistributedDataParallel) else model

    @staticmethod
    def no_sync(model: nn.Module):
        """Skip the gradient allreduce (DDP) or reduce-scatter (FSDP2) for this backward (all
        accumulation micro-steps but the last)."""
        model = _uncompiled(model)
        if isinstance(model, DistributedDataParallel):
            return model.no_sync()
        if is_fsdp(model):
            return _fsdp_no_sync(model)
        return contextlib.nullcontext()

    # -- optimizer -----------------------------------------------------------------------------
    def build_optimizer(self, model: nn.Module, cfg) -> torch.optim.Optimizer:
        """The optimizer of ``cfg`` (an OptimConfig) for ``model`` (the unwrapped module) under
        ``comm.shard``: as is ('none'); inside a ZeroRedundancyOptimizer that keeps this worker's
        share of the optimizer state ('optimizer'); over the local shards, its norms summed across
        the workers by :meth:`all_reduce_sum` ('full')."""
        from largebatch import optim

        if self.shard == "optimizer":
            cls, groups, kwargs = optim.optimizer_parts(model, cfg)
            zero = _zero_optimizer_class()(groups, optimizer_class=cls, **kwargs)
            optim.prepare_state(zero.optim)
            return zero
        if self.shard == "full":
            return optim.build_optimizer(model, cfg, shard_sum=self.all_reduce_sum)
        return optim.build_optimizer(model, cfg)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """The fp16 gradient scaler: torch's, or under comm.shard=full one whose overflow flag is
        agreed by every worker (each sees its own gradient shards only)."""
        if self.shard == "full":
            return _sharded_grad_scaler_class()(self.device.type)
        return torch.amp.GradScaler(self.device.type)

    # -- collectives ---------------------------------------------------------------------------
    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over all workers, in place; returns it."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def any_on_device(self, flag: torch.Tensor) -> torch.Tensor:
        """A 0-dim bool tensor, true on every worker where ``flag`` (0-dim bool or float, on the
        device) is true on any, agreed by a one-element allreduce on the device: nothing is read
        on the host (under comm.shard=full each worker checks only its own gradient shards)."""
        if self.world_size == 1:
            return flag.bool()
        t = flag.reshape(1).to(torch.float32, copy=True)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t[0] > 0

    def broadcast_buffers(self, model: nn.Module) -> None:
        """Rank 0's buffers (BatchNorm statistics) on every worker, as DDP gives them. Under
        comm.shard=full, before evaluation and checkpoints: FSDP2 leaves buffers unsynchronised,
        and each worker's BatchNorm statistics follow its own micro-batches."""
        if self.distributed:
            self._broadcast_tensors([b for b in model.buffers()])

    def _broadcast_tensors(self, tensors: list[torch.Tensor], bucket_bytes: int = 2**27) -> None:
        """Rank 0's values of ``tensors`` on every worker, in place, flattened into buckets by dtype."""
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        by_dtype: dict = {}
        for t in tensors:
            if t.numel():
                by_dtype.setdefault((t.dtype, t.device), []).append(t)
        for group in by_dtype.values():
            start = 0
            while start < len(group):
                bucket, size = [], 0
                while start < len(group) and (not bucket or size + group[start].nbytes <= bucket_bytes):
                    bucket.append(group[start])
                    size += group[start].nbytes
                    start += 1
                flat = _flatten_dense_tensors(bucket)
                dist.broadcast(flat, src=0)
                for t, value in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                    t.copy_(value)

    def all_gather_object(self, obj: Any) -> list:
        if not self.distributed:
            return [obj]
        out: list = [None] * self.topology.world_size
        dist.all_gather_object(out, obj)
        return out

    def raise_if_any_failed(self, error: Optional[BaseException], kind: type = UsageError) -> None:
        """Agree on failure: if any worker hit an error of ``kind``, every worker raises it.

        Called after set-up steps that may fail on one worker only (a missing file on one node),
        so that no worker goes on into a collective the failed one will never join.
        """
        messages = self.all_gather_object(None if error is None else str(error))
        failed = [(rank, m) for rank, m in enumerate(messages) if m is not None]
        if failed:
            if error is not None and not isinstance(error, kind):
                raise error
            rank, message = failed[0]
            prefix = "" if rank == 0 or self.topology.world_size == 1 else f"rank {rank}: "
            raise kind(prefix + message)

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every worker."""
        if not self.distributed:
            return obj
        box = [obj if self.topology.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def start_any(self, flag: bool) -> "PendingFlag":
        """Begin agreeing on ``flag`` (true on every worker if true on any) without waiting: the
        answer is read with ``PendingFlag.wait()`` later, typically one step on, when it has long
        arrived. The flag travels as a CPU tensor over gloo, never through the GPU."""
        host = np.array([1 if flag else 0], dtype=np.int32)
        if not self.distributed:
            return PendingFlag(host, None)
        view = torch.from_numpy(host)
        return PendingFlag(host, dist.all_reduce(view, op=dist.ReduceOp.MAX, group=self.control_group, async_op=True),
                           view)

    def any(self, flag: bool) -> bool:
        """True on every worker if ``flag`` is true on any (a signal seen by one worker, say)."""
        if not self.distributed:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    # -- who arrived -----------------------------------------------------------------------------
    _ARRIVED = "largebatch/arrived/"

    def mark_arrived(self, step: int) -> None:
        """Record in the rendezvous store that this worker reached the gradient allreduce of ``step``."""
        if self.distributed:
            self._store().set(self._ARRIVED + str(self.topology.rank), str(step))

    def missing_ranks(self, step: int) -> dict[int, int]:
        """{rank: last step it reached} for the workers that did not reach ``step``."""
        store, missing = self._store(), {}
        for rank in range(self.topology.world_size):
            key = self._ARRIVED + str(rank)
            try:
                last = int(store.get(key)) if store.check([key]) else -1
            except Exception:  # the store itself is gone: nothing is known of that rank
                last = -1
            if last < step:
                missing[rank] = last
        return missing

    def _store(self):
        return self.store if self.store is not None else dist.distributed_c10d._get_default_store()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        if self.hook is not None:
            self.hook.close()
            self.hook = None
        released = self.owns_group or self.store is not None
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False
        # Release the store here, not at interpreter exit, where destroying its client threads
        # can abort the process. (A process group made by the caller is the caller's to end.)
        self.store = None
        if released:
            gc.collect()
