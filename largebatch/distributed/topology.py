"""Who am I in the job: rank, world size and local rank, read from the launcher's environment.

Launchers are recognised by the variables they set, in this order of precedence:

==========  ===================================================================================
torchrun    ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``
openmpi     ``OMPI_COMM_WORLD_RANK``, ``_SIZE``, ``_LOCAL_RANK``, ``_LOCAL_SIZE``
mvapich2    ``MV2_COMM_WORLD_RANK``, ``_SIZE``, ``_LOCAL_RANK``, ``_LOCAL_SIZE``
hydra       MPICH and Intel MPI: ``PMI_RANK``, ``PMI_SIZE``, ``MPI_LOCALRANKID``, ``MPI_LOCALNRANKS``
pmix        ``PMIX_RANK`` (the world and node sizes come from MPI)
slurm       srun: ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``, and this node's task
            count from ``SLURM_STEP_TASKS_PER_NODE``/``SLURM_TASKS_PER_NODE`` (``2(x3),1`` with
            ``SLURM_NODEID``) or ``SLURM_NTASKS_PER_NODE``
==========  ===================================================================================

``srun --mpi=pmi2`` and ``srun --mpi=pmix`` give the tasks MPI's variables (``PMI_RANK``,
``PMIX_RANK``) as well: Slurm's PMI server, not an MPI launcher, started them. They are told apart
by the job name Slurm's PMI gives them (``PMI_JOBID=JOB.STEP``, ``PMIX_NAMESPACE=slurm.pmix.JOB.STEP``)
and named 'slurm-pmi2' and 'slurm-pmix'; the Slurm variables give the topology.

torchrun wins because it is often started by one of the others (one mpirun or srun task per
node, each running torchrun), whose variables then describe the node, not the worker. The MPI
launchers must agree with each other where several are set; Slurm's variables lose to an MPI
launcher's, since ``mpirun`` inside an ``sbatch`` script inherits the batch step's SLURM_PROCID=0.
Where an MPI launcher gives no local rank, it is derived from MPI itself: the world communicator
split by shared-memory node.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Callable, Mapping, NamedTuple, Optional

from largebatch.distributed.mpi import MPIWorld, world
from largebatch.errors import UsageError


@dataclass(frozen=True)
class Topology:
    rank: int
    """Global index of this worker, 0 .. world_size-1."""
    world_size: int
    """Number of workers in the job."""
    local_rank: int
    """Index of this worker on its node; picks the GPU."""
    local_world_size: int
    """Number of workers on this node; divides the node's CPU cores."""
    launcher: str
    """Which launcher's variables were found: 'torchrun', 'openmpi', 'mvapich2', 'hydra' (MPICH,
    Intel MPI), 'pmix', 'slurm', 'slurm-pmi2' or 'slurm-pmix' (srun --mpi=pmi2/pmix: MPI's
    variables from Slurm's PMI server), or 'single' (no launcher)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def num_nodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))

    @property
    def is_mpi(self) -> bool:
        """Started by an MPI launcher, so MPI_Init reaches the whole world."""
        return self.launcher in MPI_LAUNCHERS


SINGLE = Topology(rank=0, world_size=1, local_rank=0, local_world_size=1, launcher="single")


class _Vars(NamedTuple):
    launcher: str
    rank: str
    size: Optional[str]
    local_rank: Optional[str]
    local_size: Optional[str]


_TORCHRUN = _Vars("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
_MPI = (
    _Vars("openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
          "OMPI_COMM_WORLD_LOCAL_SIZE"),
    _Vars("mvapich2", "MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_RANK",
          "MV2_COMM_WORLD_LOCAL_SIZE"),
    _Vars("hydra", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
    _Vars("pmix", "PMIX_RANK", None, None, None),
)
SRUN_MPI = ("slurm-pmi2", "slurm-pmix")
"""srun --mpi=pmi2 and --mpi=pmix: Slurm's PMI server started the tasks, and MPI_Init reaches them all."""
MPI_LAUNCHERS = tuple(v.launcher for v in _MPI) + SRUN_MPI


MPIQuery = Callable[[], MPIWorld]
"""Asks MPI itself for (rank, size, local rank, local size); called only when variables are missing."""


def _int(environ: Mapping[str, str], name: str) -> int:
    raw = environ[name]
    try:
        return int(raw)
    except ValueError:
        raise UsageError(f"environment variable {name}={raw!r} is not an integer; check the launcher") from None


def _check(t: Topology, source: str) -> Topology:
    if t.world_size < 1 or not 0 <= t.rank < t.world_size:
        raise UsageError(f"{source}: rank {t.rank} is outside world size {t.world_size}; check the launcher")
    if t.local_world_size < 1 or not 0 <= t.local_rank < t.local_world_size:
        raise UsageError(f"{source}: local rank {t.local_rank} is outside local world size "
                         f"{t.local_world_size}; check the launcher")
    if t.local_world_size > t.world_size:
        raise UsageError(f"{source}: local world size {t.local_world_size} > world size {t.world_size}")
    return t


def _partial(env: Mapping[str, str], v: _Vars, hint: str) -> UsageError:
    present = [k for k in (v.rank, v.size, v.local_rank, v.local_size) if k and k in env]
    missing = [k for k in (v.rank, v.size) if k and k not in env]
    return UsageError(f"found {', '.join(present)} but not {', '.join(missing)} in the environment; {hint}")


def _from_torchrun(env: Mapping[str, str]) -> Topology:
    v = _TORCHRUN
    if v.rank not in env or v.size not in env:
        raise _partial(env, v, "launch with torchrun, or unset the partial variables for a single process")
    rank, world = _int(env, v.rank), _int(env, v.size)
    # LOCAL_* default to a one-node job when a launcher sets only RANK/WORLD_SIZE.
    local_rank = _int(env, v.local_rank) if v.local_rank in env else rank
    local_world = _int(env, v.local_size) if v.local_size in env else world
    return _check(Topology(rank, world, local_rank, local_world, "torchrun"), "torchrun variables")


def _from_mpi(env: Mapping[str, str], found: list[_Vars], mpi: MPIQuery) -> Topology:
    # Every MPI launcher whose variables are complete must tell the same story.
    stories = []
    for v in found:
        if v.size is not None and v.size not in env:
            raise _partial(env, v, f"check the {v.launcher} launcher, or unset the partial variables")
        stories.append((v, _int(env, v.rank), _int(env, v.size) if v.size else None))
    first, rank, size = stories[0]
    if size is None and "SLURM_NTASKS" in env and "SLURM_PROCID" in env:
        size = _int(env, "SLURM_NTASKS")  # srun with PMIx: Slurm knows the size MPI must agree with
    for v, r, s in stories[1:]:
        if r != rank or (s is not None and size is not None and s != size):
            raise UsageError(f"conflicting launcher variables: {first.rank}={rank}, {first.size}={size} but "
                             f"{v.rank}={r}, {v.size}={s}; unset the variables of the launcher not in use")
    local = next((v for v in found if v.local_rank and v.local_rank in env and v.local_size in env), None)
    if size is not None and local is not None:
        t = Topology(rank, size, _int(env, local.local_rank), _int(env, local.local_size), first.launcher)
        return _check(t, f"{first.launcher} variables")
    world = mpi()
    if world.rank != rank or (size is not None and world.size != size):
        raise UsageError(f"{first.launcher} variables say rank {rank} of {size if size is not None else '?'} but MPI "
                         f"says rank {world.rank} of {world.size}; start the workers with the same MPI's mpirun")
    t = Topology(world.rank, world.size, world.local_rank, world.local_size, first.launcher)
    return _check(t, f"{first.launcher} variables with MPI's node split")


def parse_tasks_per_node(spec: str) -> list[int]:
    """Slurm's compressed task counts: ``'2(x3),1'`` -> ``[2, 2, 2, 1]``."""
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            raise UsageError(f"cannot read Slurm task counts {spec!r}; expected a form like '2(x3),1'")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def srun_mpi(env: Mapping[str, str]) -> Optional[str]:
    """'slurm-pmi2' or 'slurm-pmix' where Slurm's PMI server started this task (``srun --mpi=...``),
    told by the name it gives the job step; None otherwise (an MPI launcher, even one started inside
    a Slurm step, names its jobs its own way). Hydra's own variables (``MPI_LOCALRANKID``) win: its
    ranks may inherit the job name of the srun step that started Hydra's proxies."""
    if "MPI_LOCALRANKID" in env:
        return None
    step = f"{env.get('SLURM_JOB_ID')}.{env.get('SLURM_STEP_ID', env.get('SLURM_STEPID'))}"
    if "PMI_RANK" in env and env.get("PMI_JOBID") == step:
        return "slurm-pmi2"
    if "PMIX_RANK" in env and env.get("PMIX_NAMESPACE", "").startswith("slurm.pmix.") \
            and env.get("PMIX_NAMESPACE", "").endswith("." + step):
        return "slurm-pmix"
    return None


def _from_srun_mpi(env: Mapping[str, str], launcher: str) -> Topology:
    t = _from_slurm(env)
    var = "PMI_RANK" if launcher == "slurm-pmi2" else "PMIX_RANK"
    if _int(env, var) != t.rank:
        raise UsageError(f"conflicting launcher variables: {var}={env[var]} but SLURM_PROCID={t.rank}; "
                         "unset the variables of the launcher not in use")
    return Topology(t.rank, t.world_size, t.local_rank, t.local_world_size, launcher)


def _from_slurm(env: Mapping[str, str]) -> Topology:
    needed = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")
    missing = [k for k in needed if k not in env]
    if missing:
        present = [k for k in needed if k in env]
        raise UsageError(f"found {', '.join(present)} but not {', '.join(missing)} in the environment; "
                         "start the workers with srun, or unset the partial Slurm variables")
    rank, world, local_rank = (_int(env, k) for k in needed)
    per_node = next((k for k in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE") if k in env), None)
    if per_node and "SLURM_NODEID" in env:
        counts = parse_tasks_per_node(env[per_node])
        node = _int(env, "SLURM_NODEID")
        if not 0 <= node < len(counts):
            raise UsageError(f"SLURM_NODEID={node} has no entry in {per_node}={env[per_node]!r}; check the srun step")
        local_world = counts[node]
    elif "SLURM_NTASKS_PER_NODE" in env:
        local_world = _int(env, "SLURM_NTASKS_PER_NODE")
    elif per_node and len(set(parse_tasks_per_node(env[per_node]))) == 1:
        local_world = parse_tasks_per_node(env[per_node])[0]
    else:
        raise UsageError("Slurm gives no task count for this node (SLURM_NTASKS_PER_NODE, or SLURM_TASKS_PER_NODE "
                         "with SLURM_NODEID); run srun with --ntasks-per-node")
    return _check(Topology(rank, world, local_rank, local_world, "slurm"), "Slurm variables")


def discover(environ: Mapping[str, str] | None = None, mpi: MPIQuery | None = None) -> Topology:
    """Read the launcher's variables from ``environ`` (default ``os.environ``).

    With none set, returns a single-process topology. A partial set (say RANK without
    WORLD_SIZE), or MPI launchers that disagree, is an error naming the variables. ``mpi``
    answers for launchers that leave out the local rank or the world size (default: ask MPI
    through mpi4py); it is not called when the variables are complete.
    """
    env = os.environ if environ is None else environ
    if any(k in env for k in _TORCHRUN):
        return _from_torchrun(env)
    found = [v for v in _MPI if v.rank in env]
    stray = [v for v in _MPI if v.rank not in env and any(k in env for k in (v.size, v.local_rank, v.local_size) if k)]
    if stray and not found:
        raise _partial(env, stray[0], f"check the {stray[0].launcher} launcher, or unset the partial variables")
    via = srun_mpi(env) if found else None
    if via and not any(v.launcher not in ("hydra", "pmix") for v in found):
        return _from_srun_mpi(env, via)
    if found:
        return _from_mpi(env, found, mpi or world)
    if "SLURM_PROCID" in env or "SLURM_LOCALID" in env:
        return _from_slurm(env)
    return SINGLE


def expand_nodelist(spec: str) -> list[str]:
    """Slurm's compressed host list: ``'gpu[01-03,7],login'`` -> ``['gpu01', 'gpu02', 'gpu03', 'gpu7', 'login']``.

    Zero padding is kept; several bracket groups in one name (``'r[1-2]n[1-2]'``) expand in order.
    """
    hosts: list[str] = []
    depth, start = 0, 0
    for i, ch in enumerate(spec + ","):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            if spec[start:i].strip():
                hosts += _expand_one(spec[start:i].strip(), spec)
            start = i + 1
        if depth < 0 or depth > 1:
            break
    if depth != 0:
        raise UsageError(f"cannot read Slurm node list {spec!r}: unbalanced brackets")
    return hosts


def _expand_one(name: str, spec: str) -> list[str]:
    m = re.match(r"([^\[]*)\[([^\]]*)\](.*)$", name)
    if not m:
        return [name]
    prefix, ranges, rest = m.groups()
    out = []
    for r in ranges.split(","):
        lo, _, hi = r.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise UsageError(f"cannot read Slurm node list {spec!r}: bad range {r!r}")
        width = len(lo)
        for n in range(int(lo), int(hi or lo) + 1):
            out += [f"{prefix}{n:0{width}d}{tail}" for tail in _expand_one(rest, spec)]
    return out
