"""The process group and the few collectives the engine needs.

The training loop, the models and the optimizers call :class:`Communicator` and never touch a
collective themselves; what data parallelism does to the model and its optimizer (DDP, FSDP2,
ZeRO, the gradient scaler) is in :mod:`largebatch.distributed.wrap`.
"""

from __future__ import annotations

import atexit
import gc
import itertools
import os
import sys
import weakref
from datetime import timedelta
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
# Imported before any process group exists: its functions take ``group=group.WORLD`` as a default,
# read at import, which would otherwise keep the first group's Python object for the process's life.
import torch.distributed.nn.functional  # noqa: F401
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from largebatch.distributed.mpi import AllreduceHook
from largebatch.distributed.mpi import size as mpi_size
from largebatch.distributed.noise_hook import LocalSquaredNorm
from largebatch.distributed.rendezvous import endpoint
from largebatch.distributed.shard import SHARD_MODES
from largebatch.distributed.topology import Topology
from largebatch.errors import UsageError


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


_RENDEZVOUS_COUNT = itertools.count()
"""Rendezvous made by this process: the n-th fit of a script is the n-th on every rank, each rank
running the same script, so the count scopes a fit's keys with no message passing."""
_STORE: dict = {}
"""The store this process met its workers in, kept for its next fit: {"key": ..., "store": TCPStore}."""


def _rendezvous_store(topology: Topology, timeout_s: float, master_addr: Optional[str]):
    """The key-value store the workers meet in, with keys scoped to this launch attempt and fit.

    torchrun's agent keeps one store across ``--max-restarts`` attempts; without a per-attempt
    prefix a restarted worker can read the address of a dead worker of the previous attempt and
    fail to connect. A script that calls ``largebatch.fit`` several times meets again in the same
    store, so each fit has its own prefix too: otherwise a worker that starts its second fit early
    reads the address its peer published for the first one. Without an agent, rank 0 hosts the
    store at the endpoint :func:`largebatch.distributed.rendezvous.endpoint` finds for the
    launcher, and keeps it for the process's next fit: a new one on the same port could be met by
    a worker still connected to the old one.
    """
    fit = next(_RENDEZVOUS_COUNT)
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    key = (topology, master_addr, agent, os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT"))
    if _STORE.get("key") == key:
        store = _STORE["store"]
        store.set_timeout(timedelta(seconds=timeout_s))
    else:
        _release_store()
        hosted = {}

        def host_store(addr: str) -> int:
            """Rank 0 of an MPI job given no MASTER_PORT: the store, on a port bound as it is chosen."""
            hosted["store"] = dist.TCPStore(addr, 0, world_size=topology.world_size, is_master=True,
                                            timeout=timedelta(seconds=timeout_s), wait_for_workers=False)
            return hosted["store"].port

        host, port = endpoint(topology, os.environ, master_addr, host_store=host_store)
        store = hosted.get("store") or dist.TCPStore(host, port, world_size=topology.world_size,
                                                     is_master=not agent and topology.rank == 0,
                                                     timeout=timedelta(seconds=timeout_s), wait_for_workers=False,
                                                     multi_tenant=not agent)
        _STORE.update(key=key, store=store)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"largebatch/attempt-{attempt}/fit-{fit}", store)  # PrefixStore adds the "/"


def _release_store() -> None:
    """Close the store this process kept (rank 0: stop hosting it), before the interpreter shuts
    down, where destroying its client threads can abort the process."""
    if _STORE:
        _STORE.clear()
        gc.collect()


_GROUPS: list = []
"""The process groups this process started (their Python objects), held until what else holds
them is gone: see :func:`_release_groups`."""


def _drop_reducer(ddp: nn.Module) -> None:
    """A DDP wrapper whose training is over loses its reducer, the logger that holds the reducer,
    and its reference to the group, while this process still holds the group (``_GROUPS``): a
    wrapper kept alive after close(), by a trainer that a traceback or a global holds, would
    otherwise keep the group past _release_groups, for its reducer to destroy with the GIL held."""
    for name in ("reducer", "logger", "process_group"):
        ddp.__dict__.pop(name, None)


def _release_groups() -> None:
    """Drop this process's references to the process groups it started, once a collection has
    freed what else held them (the reducer of a DDP model, unless close() took it already), so
    that the last reference to go is a Python object's, whose destructor releases the GIL before it
    joins gloo's worker threads. Where a reducer drops the last one, the group is destroyed with the
    GIL held, and the process hangs if a worker thread still needs the GIL to free the tensors of
    its last work (seen: a worker that had finished its run hung at its exit, about once in 150
    2-worker runs on a loaded machine)."""
    if _GROUPS:
        gc.collect()
        _GROUPS.clear()


@atexit.register
def _at_exit() -> None:
    """The process groups first (their destruction can wait for the store), then the store. An
    uncaught exception's traceback, already printed, is let go first: it holds the frames of the run
    that raised it, and so what they held."""
    for name in ("last_exc", "last_type", "last_value", "last_traceback"):
        if hasattr(sys, name):
            delattr(sys, name)
    _release_groups()
    _release_store()


def _check_mpi_world(topology: Topology) -> None:
    """comm.backend=mpi needs MPI_COMM_WORLD to be the job's world, which only an MPI launch gives."""
    size = mpi_size()
    if size != topology.world_size:
        raise UsageError(f"comm.backend=mpi: MPI sees {size} process(es) but {topology.launcher} started "
                         f"{topology.world_size} workers; launch with mpirun/mpiexec (or srun --mpi=pmix), "
                         "or use comm.backend=gloo")


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
    """Owns the process group and the collectives the engine runs, and holds the settings the
    model's wrapper follows (:mod:`largebatch.distributed.wrap`: ``comm.shard``, the bucket size,
    the compression). A single worker has no process group, except under ``comm.shard`` 'optimizer'
    and 'full', which run on a 1-rank group so that the code path is the one of many workers.
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
        self.backend = backend
        self.device = device
        self.bucket_mb = bucket_mb
        self.compression, self.powersgd_rank, self.powersgd_start_step = compression, powersgd_rank, powersgd_start_step
        self.distributed = topology.world_size > 1
        # train.noise_scale: each worker's |G_b|², summed over the gradient buckets by the DDP hook
        self.noise_meter = LocalSquaredNorm() if noise_scale and self.distributed and shard != "full" else None
        self.store = None
        self.hook: Optional[AllreduceHook] = None  # comm.backend=mpi: made by the first DDP wrapper
        self.owns_group = False  # started the process group here, so close() ends it
        self._wrappers: list = []  # weak references to the DDP wrappers made over it (adopt)
        if compression == "bf16" and device.type != "cuda":
            raise UsageError("comm.compression=bf16 needs CUDA GPUs and NCCL (torch's bf16 hook has no CPU path); "
                             "on CPU use comm.compression=fp16")
        if self.distributed and backend == "mpi":
            _check_mpi_world(topology)
        if not dist.is_initialized() and (self.distributed or shard != "none"):
            self._start_group(timeout_s, master_addr)
        self.timeout_s = timeout_s
        # Control flags (stop agreement) travel on the CPU, so reading them never waits for the GPU.
        self.control_group = None
        if self.distributed and backend == "nccl":
            self.control_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
            _GROUPS.append(self.control_group)

    def _start_group(self, timeout_s: float, master_addr: Optional[str]) -> None:
        """The process group this communicator owns (close() ends it): the workers' own, met in the
        rendezvous store, or under comm.shard a 1-rank one for a single worker, which ZeRO and FSDP2
        still want and which needs no rendezvous."""
        topology, device = self.topology, self.device
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if self.distributed:
            self.store = _rendezvous_store(topology, timeout_s, master_addr)
            backend, rank, size, store = ("gloo" if self.backend == "mpi" else self.backend, topology.rank,
                                          topology.world_size, self.store)
        else:
            backend, rank, size, store = "nccl" if device.type == "cuda" else "gloo", 0, 1, dist.HashStore()
        _release_groups()  # a previous fit's (its close() took it from the DDP wrappers made over it)
        hook = sys.excepthook
        dist.init_process_group(backend=backend, rank=rank, world_size=size, timeout=timedelta(seconds=timeout_s),
                                store=store)
        if getattr(hook, "__name__", None) == "_distributed_excepthook":
            # torch prefixes tracebacks with [rank<N>] by wrapping sys.excepthook in every
            # init_process_group; a later fit of the same process keeps the one prefix it has
            sys.excepthook = hook
        _GROUPS.append(dist.group.WORLD)
        self.owns_group = True

    @property
    def world_size(self) -> int:
        return self.topology.world_size

    def mpi_allreduce_hook(self) -> AllreduceHook:
        """comm.backend=mpi: the hook that averages DDP's gradient buckets through MPI, one for
        every wrapper of this communicator (its thread ends in :meth:`close`)."""
        if self.hook is None:
            self.hook = AllreduceHook(fp16=self.compression == "fp16")
        return self.hook

    def local_sq_norm(self) -> torch.Tensor:
        """train.noise_scale: |G_b|² of this worker's gradient in the last backward pass that ran the
        allreduce (0-dim float32 on the device, not read), and a fresh sum."""
        return self.noise_meter.take(self.device)

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
            self.broadcast_tensors([b for b in model.buffers()])

    def broadcast_tensors(self, tensors: list[torch.Tensor], bucket_bytes: int = 2**27) -> None:
        """Rank 0's values of ``tensors`` on every worker, in place, flattened into buckets by dtype."""
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

    def adopt(self, ddp: nn.Module) -> None:
        """A DDP wrapper made over this communicator's group: close() drops its reducer."""
        self._wrappers.append(weakref.ref(ddp))

    def close(self) -> None:
        for ref in self._wrappers:
            ddp = ref()
            if ddp is not None:
                _drop_reducer(ddp)
        self._wrappers.clear()
        if self.hook is not None:
            self.hook.close()
            self.hook: Optional[AllreduceHook] = None  # comm.backend=mpi: made by the first DDP wrapper
        released = self.owns_group or self.store is not None
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False
        # This fit's view of the store; the store itself is kept for the process's next fit and
        # released at exit (_release_store). A process group made by the caller is the caller's to end.
        self.store = None
        if released:
            gc.collect()
