"""Helpers that start real worker processes: plain python, torchrun, or N workers by hand.

Every process started here trains on the CPU, whatever GPUs the machine has (CUDA_VISIBLE_DEVICES
is emptied), so that the multi-process tests behave the same on a GPU workstation; tests of the
CUDA paths pass ``cuda=True`` and are skipped where no GPU is visible.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 240
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    seconds: float = 0.0
    """For launch_workers: wall time from the start until this worker had exited."""


def _env(extra: dict | None = None, cuda: bool = False) -> dict:
    env = dict(os.environ)
    if not cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""
    # Whatever launched pytest (torchrun, mpirun, an sbatch script) must not leak into the runs.
    launcher_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                     "PMI_RANK", "PMI_SIZE", "PMIX_RANK", "SLURM_PROCID", "SLURM_LOCALID")
    for k in list(env):
        if k in launcher_vars or k.startswith(("OMPI_COMM_WORLD_", "MV2_COMM_WORLD_", "MPI_LOCAL")):
            env.pop(k)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra or {})
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_module(module: str, *args: str, cwd: str | None = None, env: dict | None = None,
               timeout: float = TIMEOUT_S, cuda: bool = False) -> Result:
    """``python -m module args`` in a fresh process (on the CPU unless ``cuda``)."""
    p = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=_env(env, cuda), capture_output=True,
                       text=True, timeout=timeout)
    return Result(p.returncode, p.stdout, p.stderr)


def torchrun(nproc: int, module: str, *args: str, cwd: str | None = None, timeout: float = TIMEOUT_S,
             cuda: bool = False) -> Result:
    """``torchrun --standalone --nproc-per-node N -m module args`` (on the CPU unless ``cuda``)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", module, *args]
    p = subprocess.run(cmd, cwd=cwd, env=_env(cuda=cuda), capture_output=True, text=True, timeout=timeout)
    return Result(p.returncode, p.stdout, p.stderr)


def launch_workers(nproc: int, module: str, *args: str, cwd: str | None = None,
                   timeout: float = TIMEOUT_S, env: dict | None = None) -> list[Result]:
    """N worker processes started by hand with torchrun's variables, no agent in between,
    so each worker's own exit status is seen; ``env`` adds variables (LARGEBATCH_FAULT, say).
    ``module`` is a module run with ``-m``, or a script's path (ending in .py)."""
    port = free_port()
    procs = []
    for rank in range(nproc):
        worker_env = _env({**(env or {}), "RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_RANK": str(rank),
                           "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
        target = [module] if module.endswith(".py") else ["-m", module]
        procs.append(subprocess.Popen([sys.executable, *target, *args], cwd=cwd, env=worker_env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    import time

    results, t0 = [], time.perf_counter()
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            results.append(Result(p.returncode, out, err, time.perf_counter() - t0))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return results


def load_weights(run_dir: str) -> dict:
    return torch.load(os.path.join(run_dir, "checkpoints", "final.pt"), weights_only=True)["model"]


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.fixture
def run_dir(tmp_path):
    return str(tmp_path / "run")
