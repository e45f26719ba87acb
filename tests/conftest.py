"""Helpers that start real worker processes: plain python, torchrun, or N workers by hand.

Every process started here trains on the CPU, whatever GPUs the machine has (CUDA_VISIBLE_DEVICES
is emptied), so that the multi-process tests behave the same on a GPU workstation; tests of the
CUDA paths pass ``cuda=True`` and are skipped where no GPU is visible.

``python -m MODULE`` processes (run_module, launch_workers, start) are forked from servers that have
imported torch already (see forkserver.py), which saves each one 4-5 s of CPU; torchrun's agent and
the workers it starts, and the documented commands, are exec'd as a user's are.
"""

from __future__ import annotations

import math
import os
import re
import socket
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

import forkserver

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ENVIRON = dict(os.environ)
"""The environment pytest started with: the fork servers' (a test's monkeypatched variables are not)."""
TIMEOUT_S = 240
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
needs_2_gpus = pytest.mark.skipif(not CUDA or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    seconds: float = 0.0
    """For launch_workers: wall time from the start until this worker had exited."""


def _env(extra: dict | None = None, cuda: bool = False, base: dict | None = None) -> dict:
    env = dict(os.environ if base is None else base)
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


def _ephemeral_ports() -> tuple[int, int]:
    """The range the kernel takes ports from for sockets bound to port 0 and for connections."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as fh:
            lo, hi = map(int, fh.read().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A port for rank 0's store, free now and outside the ephemeral range: a port the kernel hands
    out (bind to 0) is free again once probed, and under load the many connections of the tests'
    gloo workers running beside it could take it before rank 0 binds it, leaving rank 0 unable to
    start and rank 1 waiting for it (seen once in a few hundred runs on a loaded machine)."""
    import random

    lo, hi = _ephemeral_ports()
    low, high = (20000, lo) if lo > 21000 else (hi + 1, 65536) if hi < 64535 else (1024, 65536)
    draw = random.SystemRandom()  # not the random module's generator, which a test may have seeded
    for _ in range(200):
        port = draw.randrange(low, high)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    with socket.socket() as s:  # a machine whose ports below the range are all taken
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_SERVERS: dict[int, forkserver.Server] = {}


def start(module: str, *args: str, cwd: str | None = None, env: dict | None = None, slot: int = 0,
          new_session: bool = False):
    """``python -m module args`` (``python module args`` for a path ending in .py) with stdout and
    stderr piped, ``env`` as it is (build it with _env): forked from fork server ``slot`` where the
    environment allows it, else exec'd. Returns a subprocess.Popen or a forkserver.Process (the same
    poll, wait, communicate, send_signal, kill, pid and returncode)."""
    cwd = os.path.abspath(cwd or os.getcwd())
    env = _env() if env is None else env
    if forkserver.enabled():
        for k in range(max(slot, 1) + 1):  # rank 0's and rank 1's servers import side by side
            if k not in _SERVERS:
                _SERVERS[k] = forkserver.Server(_env(base=_ENVIRON))
                _SERVERS[k].launch()
        server = _SERVERS[slot]
        if forkserver.servable(env, server.env):
            return server.spawn(module, list(args), cwd, env, new_session=new_session)
    target = [module] if module.endswith(".py") else ["-m", module]
    return subprocess.Popen([sys.executable, *target, *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=new_session)


LONGEST_FIRST = ("test_slurm.py", "test_training.py", "test_docs_commands.py", "test_reliability.py",
                 "test_engine_speed.py", "test_api.py", "test_bench.py", "test_observe.py", "test_first_hour.py",
                 "test_simulate.py", "test_user_parts.py", "test_fit_twice.py")
"""Files that take longest, run first: with two pytest workers (pyproject's addopts) taking whole
files, the last files to start are short ones and neither worker waits long for the other."""


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(os.path.basename(str(item.path)), len(rank)))  # stable: the rest in order


def pytest_runtest_logreport(report):
    """``LARGEBATCH_TEST_FAILURES=FILE``: each failure's report is appended to FILE as it happens
    (in the process that prints the results), so a run stopped by a time limit still says why its
    tests failed (benchmarks/gpu_checks.sh sets it)."""
    path = os.environ.get("LARGEBATCH_TEST_FAILURES")
    if path and report.failed and not os.environ.get("PYTEST_XDIST_WORKER"):
        with open(path, "a") as fh:
            fh.write(f"===== {report.nodeid} ({report.when})\n{report.longreprtext}\n\n")


def pytest_sessionfinish(session):
    """The fork servers stop with the session (the processes they started have all been waited for)."""
    for server in _SERVERS.values():
        server.close()
    _SERVERS.clear()


def _finish(p, timeout: float) -> tuple[str, str]:
    try:
        return p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _timed_out([p], timeout)


def py_spy_stacks(pid: int, native: bool = False) -> str | None:
    """The stacks of process ``pid`` as py-spy dumps them (``native``: C and C++ frames too), or
    None where py-spy is not installed."""
    import shutil

    spy = shutil.which("py-spy")
    if spy is None:
        return None
    try:
        dump = subprocess.run([spy, "dump", *(["--native"] if native else []), "--pid", str(pid)],
                              capture_output=True, text=True, timeout=120 if native else 60)
        return (dump.stdout + dump.stderr).strip()
    except (subprocess.TimeoutExpired, OSError) as exc:  # no ptrace rights, say
        return f"(py-spy could not read it: {exc})"


def _timed_out(procs: list, timeout: float) -> None:
    """A test's processes did not end in ``timeout`` seconds: fail with what each printed so far
    and, where py-spy is installed, the Python stacks of those still running (taken before they are
    killed), so that a hang on a CI machine says where it hung."""
    stacks = {}
    try:
        for p in procs:
            if p.poll() is None:
                stack = py_spy_stacks(p.pid)
                if stack is not None:
                    stacks[p.pid] = stack
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    report = [f"{len(procs)} process(es) not done after {timeout:.0f} s; killed"]
    for rank, p in enumerate(procs):
        try:
            out, err = p.communicate(timeout=30)
        except subprocess.TimeoutExpired:  # a child of it (a loader process) still holds the pipes
            out, err = "", "(its output could not be read)"
        report.append(f"--- process {rank} (pid {p.pid}, exit status {p.returncode}): stdout's end\n{out[-1500:]}\n"
                      f"--- its stderr's end\n{err[-3000:]}")
        if p.pid in stacks:
            report.append(f"--- its stacks while it hung (py-spy)\n{stacks[p.pid]}")
    pytest.fail("\n".join(report), pytrace=False)


def run_module(module: str, *args: str, cwd: str | None = None, env: dict | None = None,
               timeout: float = TIMEOUT_S, cuda: bool = False) -> Result:
    """``python -m module args`` in a fresh process (on the CPU unless ``cuda``)."""
    p = start(module, *args, cwd=cwd, env=_env(env, cuda))
    out, err = _finish(p, timeout)
    return Result(p.returncode, out, err)


def torchrun(nproc: int, module: str, *args: str, cwd: str | None = None, timeout: float = TIMEOUT_S,
             cuda: bool = False) -> Result:
    """``torchrun --standalone --nproc-per-node N -m module args`` (on the CPU unless ``cuda``)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", module, *args]
    p = subprocess.run(cmd, cwd=cwd, env=_env(cuda=cuda), capture_output=True, text=True, timeout=timeout)
    return Result(p.returncode, p.stdout, p.stderr)


def worker_env(rank: int, nproc: int, port: int, extra: dict | None = None, cuda: bool = False) -> dict:
    """The environment of worker ``rank`` of ``nproc`` started by hand, as torchrun sets it."""
    return _env({**(extra or {}), "RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_RANK": str(rank),
                 "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}, cuda)


def launch_workers(nproc: int, module: str, *args: str, cwd: str | None = None,
                   timeout: float = TIMEOUT_S, env: dict | None = None, cuda: bool = False) -> list[Result]:
    """N worker processes started by hand with torchrun's variables, no agent in between,
    so each worker's own exit status is seen; ``env`` adds variables (LARGEBATCH_FAULT, say).
    ``module`` is a module run with ``-m``, or a script's path (ending in .py). On the CPU unless
    ``cuda`` (then worker k takes GPU k: a test asks for as many GPUs as it starts workers)."""
    if cuda:
        assert torch.cuda.device_count() >= nproc, f"{nproc} workers need {nproc} GPUs"
    port = free_port()
    procs = [start(module, *args, cwd=cwd, env=worker_env(rank, nproc, port, env, cuda), slot=rank)
             for rank in range(nproc)]
    import time

    results, t0 = [], time.perf_counter()
    try:
        for p in procs:
            try:
                # a few seconds' grace: the workers before this one may have used up the time
                out, err = p.communicate(timeout=max(10.0, t0 + timeout - time.perf_counter()))
            except subprocess.TimeoutExpired:
                _timed_out(procs, timeout)
            results.append(Result(p.returncode, out, err, time.perf_counter() - t0))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return results


def resumed_at(stderr: str, step: int, rest: str = "") -> bool:
    """Whether the run's header says it resumed from the checkpoint of ``step`` at that step (then
    ``rest``, if given, on the same line)."""
    line = rf"^resuming from \S*step-{step:09d}\.pt at epoch \d+, step {step}" + (re.escape(" " + rest) if rest else "") + "$"
    return re.search(line, stderr, re.M) is not None


def scaler_halvings(run_dir: str) -> int:
    """How often fp16's gradient scaler lowered its scale in a run, from its newest step checkpoint:
    torch's GradScaler starts at 2**16, halves on each step it skips and doubles only after
    growth_interval (2000) clean steps in a row, which a test's short run never has."""
    newest = sorted(f for f in os.listdir(os.path.join(run_dir, "checkpoints")) if f.startswith("step-"))[-1]
    state = torch.load(os.path.join(run_dir, "checkpoints", newest), weights_only=True)
    scaler = state["scaler"]
    assert state["position"]["step"] < scaler["growth_interval"] and scaler["backoff_factor"] == 0.5
    halvings = math.log2(2.0 ** 16 / scaler["scale"])
    assert halvings == int(halvings) >= 0, scaler
    return int(halvings)


def initial_weights(run_dir: str, *args: str) -> dict:
    """The weights a run with these overrides starts from (the engine seeds and builds the model)."""
    from largebatch.config.loader import load_config
    from largebatch.distributed import SINGLE
    from largebatch.engine import Trainer

    trainer = Trainer(load_config(None, [*args, f"run.dir={run_dir}", "checkpoint.resume=never"]), SINGLE)
    try:
        return {k: v.detach().cpu().clone() for k, v in trainer.bare_model.state_dict().items()}
    finally:
        trainer.close()


def load_weights(run_dir: str) -> dict:
    return torch.load(os.path.join(run_dir, "checkpoints", "final.pt"), weights_only=True)["model"]


@pytest.fixture
def run_dir(tmp_path):
    return str(tmp_path / "run")
