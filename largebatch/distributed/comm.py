"""The process group, gradient synchronisation and the few collectives the engine needs.

This is the only module that imports ``torch.distributed``: the training loop, the models and
the optimizers call :class:`Communicator` and never touch a collective themselves.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import os
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from largebatch.distributed.rendezvous import endpoint
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


class PendingFlag:
    """A flag agreed across workers by an asynchronous allreduce (see Communicator.start_any)."""

    def __init__(self, tensor: torch.Tensor, work):
        self.tensor, self.work = tensor, work

    def wait(self) -> bool:
        if self.work is not None:
            self.work.wait()
            self.work = None
        return bool(self.tensor.numpy()[0])


class Communicator:
    """Owns the process group (when there is more than one worker) and DDP wrapping."""

    def __init__(self, topology: Topology, backend: str, device: torch.device, bucket_mb: Optional[float],
                 timeout_s: float = 600.0, master_addr: Optional[str] = None, compression: str = "none",
                 powersgd_rank: int = 2, powersgd_start_step: int = 10):
        self.topology = topology
        self.backend = backend
        self.device = device
        self.bucket_mb = bucket_mb
        self.compression, self.powersgd_rank, self.powersgd_start_step = compression, powersgd_rank, powersgd_start_step
        self.powersgd_state = None
        self.distributed = topology.world_size > 1
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
        """
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
        if self.backend == "mpi":
            from largebatch.distributed import mpi

            self.hook = self.hook or mpi.AllreduceHook(fp16=self.compression == "fp16")
            ddp.register_comm_hook(state=None, hook=self.hook.allreduce)
        elif self.compression in ("fp16", "bf16"):
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

            hook = default_hooks.fp16_compress_hook if self.compression == "fp16" else default_hooks.bf16_compress_hook
            ddp.register_comm_hook(state=None, hook=hook)
        elif self.compression == "powersgd":
            from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook

            self.powersgd_state = powerSGD_hook.PowerSGDState(
                process_group=None, matrix_approximation_rank=self.powersgd_rank,
                start_powerSGD_iter=powersgd_start_step or self.powersgd_start_step, random_seed=0)
            ddp.register_comm_hook(state=self.powersgd_state, hook=_one_bucket_at_a_time(powerSGD_hook.powerSGD_hook))
        return ddp

    @staticmethod
    def unwrap(model: nn.Module) -> nn.Module:
        """The user's module inside a compiled and/or DDP wrapper (what checkpoints hold)."""
        model = _uncompiled(model)
        return _uncompiled(model.module) if isinstance(model, DistributedDataParallel) else model

    @staticmethod
    def no_sync(model: nn.Module):
        """Skip the gradient allreduce for this backward (all accumulation micro-steps but the last)."""
        model = _uncompiled(model)
        if isinstance(model, DistributedDataParallel):
            return model.no_sync()
        return contextlib.nullcontext()

    # -- collectives ---------------------------------------------------------------------------
    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over all workers, in place; returns it."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

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
        t = torch.tensor([1 if flag else 0], dtype=torch.int32)
        if not self.distributed:
            return PendingFlag(t, None)
        return PendingFlag(t, dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.control_group, async_op=True))

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
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False
        # Release the store here, not at interpreter exit, where destroying its client threads
        # can abort the process.
        self.store = None
        gc.collect()
