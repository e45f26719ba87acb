"""The trainer under ``mpiexec`` (the ``mpi`` extra): discovery, rendezvous and the MPI gradient hook."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from checks import max_abs_diff
from conftest import TIMEOUT_S, Result, _env, launch_workers, load_weights, torchrun


def _mpiexec() -> str | None:
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return beside if os.access(beside, os.X_OK) else shutil.which("mpiexec")


MPIEXEC = _mpiexec()
# Only whether it is installed: importing mpi4py.MPI here would initialise MPI in the test process.
HAVE_MPI4PY = importlib.util.find_spec("mpi4py") is not None

pytestmark = pytest.mark.skipif(
    MPIEXEC is None or not HAVE_MPI4PY,
    reason="needs mpiexec and mpi4py: pip install -e '.[mpi]'")


def mpiexec(n: int, *argv: str, cwd: str | None = None, timeout: float = TIMEOUT_S) -> Result:
    p = subprocess.run([MPIEXEC, "-n", str(n), *argv], cwd=cwd, env=_env(), capture_output=True, text=True,
                       timeout=timeout)
    return Result(p.returncode, p.stdout, p.stderr)


SAME_RUN = ["model.name=mlp", "model.norm=none", "train.epochs=2", "train.global_batch=64", "run.seed=11"]


@pytest.fixture(scope="module")
def torchrun_weights(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("torchrun") / "run")
    r = torchrun(2, "largebatch.train", *SAME_RUN, f"run.dir={out}")
    assert r.returncode == 0, r.stderr[-2000:]
    return load_weights(out)


@pytest.mark.parametrize("backend, extra", [
    ("gloo", []),
    ("mpi", []),
    # bucket tuning wraps the model in DDP with MPI's hook again for every timed turn before training
    ("mpi", ["comm.bucket_mb=auto", "comm.bucket_candidates_mb=[0.001,0.01,1]"]),
])
def test_mpiexec_trains_to_the_same_weights_as_torchrun(backend, extra, torchrun_weights, tmp_path):
    out = str(tmp_path / "run")
    r = mpiexec(2, sys.executable, "-m", "largebatch.train", *SAME_RUN, f"comm.backend={backend}", *extra,
                f"run.dir={out}")
    assert r.returncode == 0, r.stderr[-2000:]
    # Both ranks were found through MPICH's Hydra variables, and the backend is the one asked for.
    assert f"2 worker(s) on cpu over {backend} (hydra)" in r.stdout + r.stderr
    if extra:
        assert "gradient buckets" in r.stdout + r.stderr and "comm.bucket_mb=auto over" in r.stdout + r.stderr
    diff = max_abs_diff(load_weights(out), torchrun_weights)
    assert diff <= 1e-4, f"{backend}: max abs difference {diff:.3g} from the torchrun run"


HOOK_CHECK = textwrap.dedent("""
    import os, torch
    from mpi4py import MPI
    from largebatch.distributed import discover, mpi
    from largebatch.distributed.topology import Topology

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    # The node split MPI gives agrees with Hydra's own local-rank variables.
    derived = discover({"PMI_RANK": str(rank), "PMI_SIZE": str(size)})
    assert derived == Topology(rank, size, int(os.environ["MPI_LOCALRANKID"]),
                               int(os.environ["MPI_LOCALNRANKS"]), "hydra"), derived

    hook = mpi.AllreduceHook()
    t = torch.arange(1000, dtype=torch.float32) * (rank + 1)
    address = t.data_ptr()
    assert mpi.numpy_view(t).__array_interface__["data"][0] == address  # a view, not a copy
    out = hook.submit(t).wait()
    assert out.data_ptr() == address, "the hook must work in place"
    mean_factor = sum(r + 1 for r in range(size)) / size
    assert torch.equal(t, torch.arange(1000, dtype=torch.float32) * mean_factor), t[:4]
    # Many buckets in flight complete in order, each averaged.
    buckets = [torch.full((4096,), float(rank * i), dtype=torch.float64) for i in range(20)]
    futures = [hook.submit(b) for b in buckets]
    for i, (b, f) in enumerate(zip(buckets, futures)):
        assert f.wait() is b and torch.all(b == i * (size - 1) / 2), (i, b[:2])
    try:
        hook.submit(torch.zeros(3, dtype=torch.bfloat16)).wait()
        raise SystemExit("bf16 must be refused")
    except Exception as exc:
        assert "bfloat16" in str(exc), exc
    hook.close()
    open(f"ok-{rank}-of-{size}", "w").close()  # one file per rank: printed lines could interleave
""")


@pytest.mark.parametrize("n", [1, 2])
def test_mpi_hook_averages_in_place_and_in_order(n, tmp_path):
    script = tmp_path / "hook_check.py"
    script.write_text(HOOK_CHECK)
    r = mpiexec(n, sys.executable, str(script), cwd=str(tmp_path))
    assert r.returncode == 0, r.stdout[-1000:] + r.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.glob("ok-*")) == [f"ok-{rank}-of-{n}" for rank in range(n)]


def test_bad_config_under_mpiexec_exits_2_on_every_rank(tmp_path):
    r = mpiexec(2, sys.executable, "-m", "largebatch.train", "train.global_batch=63", f"run.dir={tmp_path}/run",
                timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [line for line in r.stderr.splitlines() if line.startswith("largebatch: error")]
    assert len(lines) == 1 and "63" in lines[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_mpi_backend_refused_outside_an_mpi_launch(tmp_path):
    results = launch_workers(2, "largebatch.train", "comm.backend=mpi", f"run.dir={tmp_path}/run", timeout=120)
    assert [r.returncode for r in results] == [2, 2], [r.stderr[-1000:] for r in results]
    assert results[0].stderr.strip() == ("largebatch: error: comm.backend=mpi: MPI sees 1 process(es) but torchrun "
                                         "started 2 workers; launch with mpirun/mpiexec (or srun --mpi=pmix), or "
                                         "use comm.backend=gloo")
    assert results[1].stderr.strip() == ""
