"""MPI through mpi4py: the node split, the rendezvous broadcast, and the gradient allreduce hook.

mpi4py is the optional ``mpi`` extra (``pip install 'largebatch[mpi]'``); it is imported only
when a job was started by an MPI launcher and needs MPI, or when ``comm.backend=mpi``.
Importing it calls ``MPI_Init_thread`` with ``MPI_THREAD_MULTIPLE`` (mpi4py's default), so the
hook's communication thread may call MPI while the main thread runs backward.
"""

from __future__ import annotations

import queue
import sys
import threading
from typing import Any, NamedTuple

import numpy as np
import torch

from largebatch.errors import UsageError

# numpy has no bfloat16, so MPI cannot sum bf16 buckets through a numpy view.
_SUMMABLE = (torch.float32, torch.float64, torch.float16)


def import_mpi():
    """mpi4py's ``MPI`` module (importing it the first time initialises MPI), or a UsageError naming
    the package to install."""
    try:
        from mpi4py import MPI
    except ImportError:
        raise UsageError("this needs mpi4py, which is not installed; pip install 'largebatch[mpi]' "
                         "(or mpi4py built against your cluster's MPI)") from None
    return MPI


class MPIWorld(NamedTuple):
    """This process's place in MPI_COMM_WORLD and in its node."""
    rank: int
    size: int
    local_rank: int
    local_size: int


def world() -> MPIWorld:
    """This process's rank and size in MPI_COMM_WORLD, and in its node (split by shared memory)."""
    MPI = import_mpi()
    comm = MPI.COMM_WORLD
    node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    try:
        return MPIWorld(comm.Get_rank(), comm.Get_size(), node.Get_rank(), node.Get_size())
    finally:
        node.Free()


def size() -> int:
    return import_mpi().COMM_WORLD.Get_size()


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank of MPI_COMM_WORLD."""
    return import_mpi().COMM_WORLD.bcast(obj, root=0)


def numpy_view(tensor: torch.Tensor) -> np.ndarray:
    """A NumPy array over ``tensor``'s memory (no copy): what MPI reads and writes in place."""
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        raise ValueError(f"MPI allreduce needs a contiguous CPU tensor, got {tensor.device} "
                         f"{'contiguous' if tensor.is_contiguous() else 'strided'}")
    if tensor.dtype not in _SUMMABLE:
        raise UsageError(f"comm.backend=mpi cannot sum {tensor.dtype} gradients (NumPy has no such type); "
                         "keep parameters in float32, or use comm.backend=gloo")
    return tensor.detach().numpy()


class AllreduceHook:
    """A DDP communication hook that averages each gradient bucket with ``MPI_Allreduce``.

    DDP keeps its bucketing and its overlap with backward: when a bucket's gradients are ready
    the hook queues the bucket and returns a ``torch.futures.Future`` at once; one dedicated
    communication thread takes the buckets in order (DDP launches them in the same order on every
    rank, as MPI requires), divides each one by the world size and sums it in place over its NumPy
    view with ``MPI_IN_PLACE``, and completes the future. No copy of the bucket is made, except
    with ``fp16=True`` (comm.compression=fp16), which sends a half-precision copy.

    Register with ``ddp.register_comm_hook(state=None, hook=AllreduceHook().allreduce)``; call
    :meth:`close` when done with it.
    """

    def __init__(self, comm: Any = None, fp16: bool = False):
        MPI = import_mpi()
        if MPI.Query_thread() < MPI.THREAD_SERIALIZED:
            raise UsageError("comm.backend=mpi calls MPI from a communication thread, but this MPI granted only "
                             f"thread level {MPI.Query_thread()}; use an MPI with MPI_THREAD_MULTIPLE support, or "
                             "comm.backend=gloo")
        self._MPI = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.world_size = self.comm.Get_size()
        self.fp16 = fp16
        self._work: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="largebatch-mpi-allreduce", daemon=True)
        self._thread.start()

    def allreduce(self, state, bucket):  # (None, dist.GradBucket) -> Future[Tensor]; DDP compares
        # annotations by identity, which string annotations fail, so there are none here.
        return self.submit(bucket.buffer())

    def submit(self, tensor: torch.Tensor) -> torch.futures.Future[torch.Tensor]:
        """Average ``tensor`` over all ranks in place, on the communication thread."""
        future: torch.futures.Future = torch.futures.Future()
        self._work.put((tensor, future))
        return future

    def _serve(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                return
            tensor, future = item
            try:
                # comm.compression=fp16: half the bytes on the wire, through a half-precision copy.
                wire = tensor.to(torch.float16) if self.fp16 and tensor.dtype != torch.float16 else tensor
                view = numpy_view(wire)
                # Divide first, then sum: the order of DDP's own allreduce, so the two agree bit for bit.
                np.divide(view, view.dtype.type(self.world_size), out=view)
                self.comm.Allreduce(self._MPI.IN_PLACE, view, op=self._MPI.SUM)
                if wire is not tensor:
                    tensor.copy_(wire)
                future.set_result(tensor)
            except BaseException as exc:  # handed to DDP, which raises it in the training loop
                future.set_exception(exc)

    def close(self, timeout_s: float = 60.0) -> None:
        """Stop the thread once the queued buckets are done (a daemon: it never holds up exit)."""
        if self._thread.is_alive():
            self._work.put(None)
            self._thread.join(timeout_s)


def abort_if_running(status: int) -> None:
    """End every rank of the MPI job after a failure on this one.

    A rank that dies with an unexpected error would leave the others blocked for good in an MPI
    allreduce that has no timeout, and itself blocked in MPI_Finalize; MPI_Abort ends them all.
    A no-op unless this process started MPI and its world has other ranks.
    """
    MPI = sys.modules.get("mpi4py.MPI")
    if MPI is not None and MPI.Is_initialized() and not MPI.Is_finalized() and MPI.COMM_WORLD.Get_size() > 1:
        MPI.COMM_WORLD.Abort(status)
