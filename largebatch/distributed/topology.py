"""Who am I in the job: rank, world size and local rank, read from the launcher's environment."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

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
    """Which launcher's variables were found: 'torchrun' or 'single' (no launcher)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def num_nodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))


SINGLE = Topology(rank=0, world_size=1, local_rank=0, local_world_size=1, launcher="single")

# torchrun (and any env:// launcher that mimics it) sets all four.
_TORCHRUN = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


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


def discover(environ: Mapping[str, str] | None = None) -> Topology:
    """Read the launcher's variables from ``environ`` (default ``os.environ``).

    With none set, returns a single-process topology. A partial set (say RANK without
    WORLD_SIZE) is an error naming what is missing.
    """
    env = os.environ if environ is None else environ
    present = [k for k in _TORCHRUN if k in env]
    if not present:
        return SINGLE
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        # LOCAL_* default to a one-node job when a launcher sets only RANK/WORLD_SIZE.
        local_rank = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
        local_world = _int(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else world
        return _check(Topology(rank, world, local_rank, local_world, "torchrun"), "torchrun variables")
    missing = [k for k in ("RANK", "WORLD_SIZE") if k not in env]
    raise UsageError(f"found {', '.join(present)} but not {', '.join(missing)} in the environment; "
                     "launch with torchrun, or unset the partial variables for a single process")
