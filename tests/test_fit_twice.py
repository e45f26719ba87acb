"""largebatch.fit called twice in one script: under torchrun, on workers started by hand, under
mpiexec and in one process, the second fit with a different comm config."""

import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist

from conftest import _env, launch_workers
from largebatch.distributed import Topology
from largebatch.distributed.comm import Communicator
from test_api import USER_CODE
from test_mpi import HAVE_MPI4PY, MPIEXEC

TWICE = '''
import os
import sys
import time

import largebatch
from largebatch.distributed import comm, discover
from mine import Net, data

if discover().rank == int(os.environ.get("SLOW_RANK", "-1")):
    # This worker leaves each fit's process group 3 s after the others, as one on a loaded machine
    # may: the others start the next fit's rendezvous while its first group is still up.
    close = comm.Communicator.close

    def slow_close(self):
        time.sleep(3)
        close(self)

    comm.Communicator.close = slow_close

run_dir, second = sys.argv[1], sys.argv[2:]
train, val = data()
for n, overrides in enumerate([[], second]):
    # WRONG_SECOND: the second model is built for 2-channel images, and its forward raises
    model = (lambda: Net(4, 2)) if n == 1 and os.environ.get("WRONG_SECOND") else Net
    summary = largebatch.fit(model=model, train_set=train, val_set=val, overrides=overrides,
                             **{"train.global_batch": 64, "train.epochs": 1, "comm.timeout_s": 20,
                                "run.dir": os.path.join(run_dir, f"fit{n}")})
    print("FIT", n, summary["steps"], summary["world_size"], flush=True)
'''

SECOND = ["comm.timeout_s=30", "comm.shard=optimizer"]
"""The second fit's overrides: another timeout and ZeRO, which brings its own optimizer state."""


@pytest.fixture
def project(tmp_path):
    (tmp_path / "mine.py").write_text(textwrap.dedent(USER_CODE))
    (tmp_path / "twice.py").write_text(textwrap.dedent(TWICE))
    return tmp_path


def _both_fits_ran(project, returncode, stdout, stderr, world_size):
    assert returncode == 0, stderr[-3000:]
    # 512 training images, a global batch of 64: 8 steps in each fit, on every worker
    lines = sorted(line for line in stdout.splitlines() if line.startswith("FIT"))
    assert lines == sorted([f"FIT {n} 8 {world_size}" for n in (0, 1)] * world_size), stdout
    for n in (0, 1):
        assert os.path.exists(project / f"run/fit{n}/checkpoints/final.pt")
    assert "Traceback" not in stderr, stderr[-3000:]


def test_fit_twice_under_torchrun(project):
    """torchrun's agent hosts one store for both fits: each fit meets under keys of its own, so rank
    0 cannot read the address rank 1 published for the first fit (and connect to its old group)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(project / "twice.py"), str(project / "run"), *SECOND]
    p = subprocess.run(cmd, cwd=str(project), env=_env({"SLOW_RANK": "1"}), capture_output=True, text=True,
                       timeout=180)
    _both_fits_ran(project, p.returncode, p.stdout, p.stderr, 2)


def test_fit_twice_on_workers_started_by_hand(project):
    """Rank 0 hosts the store on MASTER_PORT and keeps it for the second fit: rank 1 cannot meet
    in the first fit's store while a slow rank 0 is about to close it."""
    results = launch_workers(2, str(project / "twice.py"), str(project / "run"), *SECOND, cwd=str(project),
                             env={"SLOW_RANK": "0"}, timeout=180)
    _both_fits_ran(project, max(r.returncode for r in results), "".join(r.stdout for r in results),
                   "".join(r.stderr for r in results), 2)


def test_a_crash_in_the_second_fit_prints_one_traceback_per_worker(project):
    """torch wraps sys.excepthook to prefix tracebacks with [rank<N>] in every process group it
    starts; a second fit keeps the one prefix."""
    results = launch_workers(2, str(project / "twice.py"), str(project / "run"), cwd=str(project),
                             env={"WRONG_SECOND": "1"}, timeout=180)
    for rank, r in enumerate(results):
        assert r.returncode == 1 and r.stdout.count("FIT 0 8 2") == 1, r.stderr[-3000:]
        assert r.stderr.count("Traceback (most recent call last)") == 1, r.stderr[-3000:]
        assert re.search(rf"^\[rank{rank}\]: RuntimeError: mat1 and mat2 shapes cannot be multiplied", r.stderr, re.M)
        assert set(re.findall(r"^(?:\[rank\d\]: )+", r.stderr, re.M)) == {f"[rank{rank}]: "}, r.stderr[-3000:]


@pytest.mark.skipif(MPIEXEC is None or not HAVE_MPI4PY, reason="needs mpiexec and mpi4py: pip install -e '.[mpi]'")
def test_fit_twice_under_mpiexec_the_second_over_mpi(project):
    p = subprocess.run([MPIEXEC, "-n", "2", sys.executable, str(project / "twice.py"), str(project / "run"),
                        "comm.backend=mpi", "comm.timeout_s=30"], cwd=str(project), env=_env({"SLOW_RANK": "0"}),
                       capture_output=True, text=True, timeout=180)
    _both_fits_ran(project, p.returncode, p.stdout, p.stderr, 2)
    assert re.search(r"2 worker\(s\) on cpu over gloo \(hydra\).*2 worker\(s\) on cpu over mpi \(hydra\)",
                     p.stderr, re.S), p.stderr[-3000:]


def test_fit_twice_in_one_process(project):
    """One worker: no group in the first fit, a 1-rank one in the second (ZeRO wants one)."""
    r = launch_workers(1, str(project / "twice.py"), str(project / "run"), *SECOND, cwd=str(project),
                       timeout=180)[0]
    _both_fits_ran(project, r.returncode, r.stdout, r.stderr, 1)


def test_rendezvous_keys_differ_per_fit_and_per_restart_attempt(monkeypatch):
    """The keys a fit meets under, as every rank computes them with no message passing: one key
    space per fit of the script and per torchrun restart attempt, in the one store torchrun's
    agent keeps for all of them."""
    agent_store = dist.HashStore()
    monkeypatch.setattr(dist, "TCPStore", lambda *args, **kwargs: agent_store)
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: None)
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")  # no store of a real run had this one
    topology = Topology(rank=1, world_size=2, local_rank=1, local_world_size=2, launcher="torchrun")
    for attempt in ("0", "1"):
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", attempt)
        for _ in range(2):
            comm = Communicator(topology, "gloo", torch.device("cpu"), None)
            comm.store.set("address-of-rank-1", attempt)
            comm.close()
    fits = [[n for n in range(1000) if agent_store.check([f"largebatch/attempt-{attempt}/fit-{n}/address-of-rank-1"])]
            for attempt in (0, 1)]
    assert [len(f) for f in fits] == [2, 2] and agent_store.num_keys() == 4, fits
