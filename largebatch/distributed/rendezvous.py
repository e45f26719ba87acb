"""Where the workers meet: the address and port of the store rank 0 hosts.

==========  =======================================================================================
launcher    endpoint
==========  =======================================================================================
torchrun    ``MASTER_ADDR``/``MASTER_PORT`` as torchrun sets them (its agent hosts the store)
MPI         ``comm.master_addr``, else ``MASTER_ADDR``, else rank 0's own address; ``MASTER_PORT``,
            else the port rank 0's store is bound to; rank 0 broadcasts both with MPI before any worker
            connects, so ``mpirun -np 8 python -m largebatch.train`` needs nothing else (without
            mpi4py, every rank must have MASTER_ADDR and MASTER_PORT)
slurm       ``comm.master_addr``, else ``MASTER_ADDR``, else the first host of the step's node list
            (``SLURM_STEP_NODELIST``, else ``SLURM_JOB_NODELIST``); ``MASTER_PORT``, else
            15000 + (SLURM_JOB_ID + SLURM_STEP_ID) mod 20000, the same on every task with no
            message passing
==========  =======================================================================================
"""

from __future__ import annotations

import socket
from typing import Callable, Mapping, Optional

from largebatch.distributed.mpi import broadcast as mpi_broadcast
from largebatch.distributed.topology import Topology, expand_nodelist
from largebatch.errors import UsageError

SLURM_PORT_BASE, SLURM_PORT_SPAN = 15000, 20000


def free_port() -> int:
    """A TCP port that was free a moment ago on this host."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def own_address() -> str:
    """This host's address as other hosts reach it.

    The hostname's address, unless it resolves to loopback (Debian maps it to 127.0.1.1); then
    the address of the interface that carries the default route.
    """
    host = socket.gethostname()
    try:
        ip = socket.gethostbyname(host)
    except OSError:
        return host
    if not ip.startswith("127."):
        return ip
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))  # UDP connect sends nothing; it only picks a route
            return s.getsockname()[0]
    except OSError:
        return ip


def slurm_port(environ: Mapping[str, str]) -> int:
    """15000 + (SLURM_JOB_ID + SLURM_STEP_ID) mod 20000: one port per job step, known to every task."""
    try:
        job = int(environ["SLURM_JOB_ID"])
        step = int(environ.get("SLURM_STEP_ID", environ.get("SLURM_STEPID", "0")))
    except (KeyError, ValueError):
        raise UsageError("under srun without MPI the port comes from SLURM_JOB_ID, which is missing or not a "
                         "number; set MASTER_PORT") from None
    return SLURM_PORT_BASE + (job + step) % SLURM_PORT_SPAN


def slurm_first_host(environ: Mapping[str, str]) -> str:
    for key in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"):
        if environ.get(key):
            hosts = expand_nodelist(environ[key])
            if hosts:
                return hosts[0]
    raise UsageError("under srun without MPI the address comes from SLURM_JOB_NODELIST, which is missing; "
                     "set comm.master_addr or MASTER_ADDR")


def endpoint(topology: Topology, environ: Mapping[str, str], master_addr: Optional[str] = None,
             broadcast: Optional[Callable] = None, host_store: Optional[Callable[[str], int]] = None) -> tuple[str, int]:
    """(address, port) of the store for a job of several workers.

    ``broadcast`` sends rank 0's value to every rank (default: MPI's, for MPI launchers only).
    ``host_store``, where rank 0 of an MPI job must pick the port: starts the store on a port the
    kernel picks as it binds and returns that port (a port probed free and released could be taken
    by another socket before the store binds it); without it, :func:`free_port`.
    """
    addr = environ.get("MASTER_ADDR") if topology.launcher == "torchrun" else master_addr or environ.get("MASTER_ADDR")
    port = environ.get("MASTER_PORT")
    if port is not None:
        try:
            port = int(port)
        except ValueError:
            raise UsageError(f"MASTER_PORT={port!r} is not a port number; set an integer 1-65535") from None
    if topology.is_mpi:
        # Rank 0's choice always wins: a rank on another node may not see the variables rank 0 saw.
        if broadcast is None:
            broadcast = mpi_broadcast
        mine = None
        if topology.rank == 0:
            addr = addr or own_address()
            mine = (addr, port or (host_store(addr) if host_store is not None else free_port()))
        try:
            return tuple(broadcast(mine))
        except UsageError as exc:  # no mpi4py: the variables, if every rank has them
            if addr and port:
                return addr, port
            raise UsageError(f"{exc}; or set MASTER_ADDR and MASTER_PORT for every rank") from None
    if addr and port:
        return addr, port
    if topology.launcher == "torchrun":
        raise UsageError("MASTER_ADDR and MASTER_PORT must be set for several workers; launch with torchrun")
    if topology.launcher == "slurm":
        return addr or slurm_first_host(environ), port or slurm_port(environ)
    raise UsageError(f"{topology.launcher}: no way to find the other workers; set MASTER_ADDR and MASTER_PORT")
