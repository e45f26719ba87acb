"""launch/slurm.sbatch under a real Slurm: a cluster of one node, this machine, started by
launch/slurm-single-node.sh (munged, slurmctld and slurmd as root, state in a temporary folder),
as a user would start it to try the wrapper. Jobs of 2 tasks x 1 cpu train the MLP on the digits.

Also, without a cluster: how srun --mpi=pmi2/pmix is told from an MPI launcher, and what a
SIGUSR1 does to the CLI before and after its training loop.

Where Slurm is not installed or the tests do not run as root, the cluster tests are skipped with
the command that installs it.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from checks import max_abs_diff
from conftest import REPO, _env, load_weights
from largebatch.distributed.topology import Topology, discover

INSTALL = "apt-get install -y slurmd slurmctld slurm-client munge"
FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED")
RUN = ["model.name=mlp", "data.name=digits", "train.epochs=2", "schedule.warmup_epochs=0.5"]
"""22 steps of 2 x 64 images; with SLOW every step takes 3 s or more, so the run outlives a 1-minute job."""
SLOW = {"LARGEBATCH_FAULT": ",".join(f"sleep@{s}:0:3" for s in range(22)), "LARGEBATCH_HEARTBEAT_S": "5"}
"""Rank 0 sleeps 3 s in every step before its allreduce: slower, the same numbers."""


def _why_no_cluster() -> str | None:
    missing = [tool for tool in ("munged", "slurmctld", "slurmd", "sbatch", "scontrol") if shutil.which(tool) is None]
    if missing:
        return f"needs Slurm ({', '.join(missing)} missing): {INSTALL}"
    if os.geteuid() != 0:
        return f"needs root to start slurmctld and slurmd (Slurm is installed: {INSTALL})"
    return None


class Cluster:
    """A running single-node cluster: submit jobs, wait for them, read their output."""

    def __init__(self, folder: str, conf: str):
        self.folder, self.conf = folder, conf

    def run_dir(self, name: str) -> str:
        return os.path.join(self.folder, "runs", name)

    def env(self, extra: dict | None = None) -> dict:
        env = _env({"PYTHON": sys.executable, **(extra or {})})
        for k in [k for k in env if k.startswith(("SLURM_", "SBATCH_", "SRUN_"))]:
            env.pop(k)
        env["SLURM_CONF"] = self.conf
        return env

    def run(self, *argv: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(list(argv), env=env or self.env(), capture_output=True, text=True, timeout=timeout)

    def submit(self, *args: str, sbatch: tuple = (), env: dict | None = None, cwd: str | None = None) -> str:
        """``sbatch -N1 --ntasks-per-node 2 -c 1 [sbatch] launch/slurm.sbatch ARGS``; the job id."""
        r = subprocess.run(["sbatch", "--parsable", "-N1", "--ntasks-per-node", "2", "-c", "1",
                            f"--output={self.folder}/job-%j.out", *sbatch, os.path.join(REPO, "launch", "slurm.sbatch"),
                            *args], cwd=cwd or self.folder, env=self.env(env), capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0, r.stderr
        return r.stdout.strip().split(";")[0]

    def job(self, job: str) -> dict:
        for _ in range(5):  # slurmctld busy for a moment: ask again
            r = self.run("scontrol", "show", "job", "-o", job)
            if r.returncode == 0:
                break
            time.sleep(1)
        assert r.returncode == 0, r.stderr
        return dict(re.findall(r"(\w+)=(\S*)", r.stdout))

    def output(self, job: str) -> str:
        with open(os.path.join(self.folder, f"job-{job}.out")) as fh:
            return fh.read()

    def wait(self, job: str, until=None, timeout: float = 300) -> dict:
        """Wait until the job ends (or ``until(output)`` holds)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job)
            if info["JobState"] in FINAL_STATES:
                return info
            if until is not None and os.path.exists(os.path.join(self.folder, f"job-{job}.out")) \
                    and until(self.output(job)):
                return info
            time.sleep(0.5)
        self.run("scancel", job)
        raise AssertionError(f"job {job} still {self.job(job)['JobState']} after {timeout}s:\n{self.output(job)[-3000:]}")


@pytest.fixture(scope="session")
def cluster():
    why = _why_no_cluster()
    if why:
        pytest.skip(why)
    # Its own folder, not pytest's: the daemons' state and the jobs' files live as long as the session.
    folder = tempfile.mkdtemp(prefix="largebatch-slurm-")
    os.chmod(folder, 0o755)
    script = os.path.join(REPO, "launch", "slurm-single-node.sh")
    try:
        r = subprocess.run([script, "start", folder], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"the cluster did not start:\n{r.stdout}\n{r.stderr}"
        assert r.stdout.strip() == f"export SLURM_CONF={folder}/slurm.conf"
        made = Cluster(folder, os.path.join(folder, "slurm.conf"))
        yield made
    finally:
        if "made" in locals():  # no job's tasks may outlive the daemons (a test that failed mid-job)
            made.run("scancel", "--user", "root")
            deadline = time.monotonic() + 120
            while made.run("squeue", "--noheader").stdout.strip() and time.monotonic() < deadline:
                time.sleep(0.5)
        subprocess.run([script, "stop", folder], capture_output=True, text=True, timeout=120)
        shutil.rmtree(folder, ignore_errors=True)


def _lines(text: str, pattern: str) -> list[str]:
    return [line for line in text.splitlines() if re.search(pattern, line)]


@pytest.fixture(scope="module")
def uninterrupted(cluster):
    """The wrapper on 2 tasks, one job from start to end: the run the others must match bit for bit."""
    out = cluster.run_dir("whole")
    job = cluster.submit(*RUN, f"run.dir={out}", env={"LARGEBATCH_HEARTBEAT_S": "1"})
    info = cluster.wait(job)
    text = cluster.output(job)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), text[-3000:]
    return out, text


def test_the_wrapper_trains_on_2_tasks(uninterrupted):
    out, text = uninterrupted
    assert "largebatch 0.1.0: mlp on digits, 2 worker(s) on cpu over gloo (slurm)" in text
    assert "OMP_NUM_THREADS=1, 2 tasks, 2 per node" in text
    assert _lines(text, r"^step \d+/22 \(epoch \d/2\)  lr "), text  # the heartbeat, in the job's output file
    assert _lines(text, r"^done: val_acc ") and load_weights(out)


def test_scancel_then_the_same_sbatch_resumes_bit_identical(cluster, uninterrupted):
    out = cluster.run_dir("scancel")
    job = cluster.submit(*RUN, f"run.dir={out}", env=SLOW)
    cluster.wait(job, until=lambda text: "step 3/22" in text)
    assert cluster.run("scancel", job).returncode == 0
    info = cluster.wait(job)
    text = cluster.output(job)
    assert info["JobState"] == "CANCELLED", text[-3000:]
    assert "largebatch: SIGTERM: stopping after this step with a checkpoint; run the same command to resume" in text
    (line,) = _lines(text, r"^stopping on a signal after step \d+")
    stopped = int(line.split("after step ")[1].split(":")[0])
    again = cluster.submit(*RUN, f"run.dir={out}")
    info = cluster.wait(again)
    text = cluster.output(again)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), text[-3000:]
    assert _lines(text, rf"^resuming from \S*step-{stopped:09d}\.pt at epoch \d+, step {stopped}$"), text
    assert max_abs_diff(load_weights(out), load_weights(uninterrupted[0])) == 0


def test_requeue_outlives_the_time_limit_bit_identical(cluster, uninterrupted):
    out = cluster.run_dir("requeue")
    # 22 steps of 3 s or more cannot end within a 1-minute job: the warning comes 20-50 s in (Slurm
    # checks its jobs every 30 s), every task stops with a checkpoint, and the job requeues itself.
    job = cluster.submit("--requeue", *RUN, f"run.dir={out}", sbatch=("--time=1", "--signal=B:USR1@10"), env=SLOW)
    info = cluster.wait(job, timeout=540)
    text = cluster.output(job)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), text[-4000:]
    restarts = int(info["Restarts"])
    assert restarts >= 1, text[-4000:]
    assert len(_lines(text, r"^launch/slurm.sbatch: the time limit is near: requeueing job")) == restarts
    assert len(_lines(text, r"^resuming from \S*step-\d+\.pt")) >= restarts
    assert "largebatch: SIGUSR1: stopping after this step with a checkpoint" in text
    assert max_abs_diff(load_weights(out), load_weights(uninterrupted[0])) == 0


def test_bad_input_is_exit_code_2_with_one_line(cluster, uninterrupted):
    # Found by the wrapper, before srun: the job's output is that line.
    job = cluster.submit("epochs=3")
    info = cluster.wait(job)
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "2:0")
    assert cluster.output(job).splitlines() == [
        "launch/slurm.sbatch: error: 'epochs=3' is neither an option of this script nor a section.key=value override"]
    # Found by the tasks (a changed config met in the run's folder), through srun: one line from rank 0.
    out = cluster.run_dir("changed")
    shutil.copytree(uninterrupted[0], out)
    job = cluster.submit("--requeue", *RUN, "optim.base_lr=0.3", f"run.dir={out}")
    info = cluster.wait(job)
    text = cluster.output(job)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("FAILED", "2:0", "0"), text[-3000:]
    (line,) = _lines(text, r"^largebatch: error: ")  # srun adds its own lines on the tasks' status
    assert "optim.base_lr (0.2 -> 0.3)" in line
    assert "Traceback" not in text


def _pmi2_mpi(cluster) -> str | None:
    """Why MPI cannot run under srun --mpi=pmi2 here, or None."""
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return "needs mpi4py: pip install -e '.[mpi]'"
    probe = "from mpi4py import MPI; print('size', MPI.COMM_WORLD.Get_size())"
    r = cluster.run("srun", "-N1", "-n2", "--mpi=pmi2", sys.executable, "-c", probe, timeout=120)
    if r.returncode != 0 or r.stdout.split() != ["size", "2", "size", "2"]:
        return (f"srun --mpi=pmi2 does not give mpi4py's MPI one world of 2 here (exit {r.returncode}): "
                f"{(r.stdout + r.stderr).strip()[-300:]}")
    return None


def test_srun_pmi2_trains_over_mpi(cluster, uninterrupted):
    why = _pmi2_mpi(cluster)
    if why:
        pytest.skip(why)
    out = cluster.run_dir("mpi")
    job = cluster.submit("--srun-args", "--mpi=pmi2", *RUN, "comm.backend=mpi", f"run.dir={out}")
    info = cluster.wait(job)
    text = cluster.output(job)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), text[-3000:]
    assert "2 worker(s) on cpu over mpi (slurm-pmi2)" in text  # Slurm's PMI2 started the tasks, not Hydra
    assert max_abs_diff(load_weights(out), load_weights(uninterrupted[0])) <= 1e-4  # as tests/test_mpi.py


# -- without a cluster -----------------------------------------------------------------------------

SRUN_STEP = {"SLURM_JOB_ID": "77", "SLURM_STEP_ID": "0", "SLURM_PROCID": "1", "SLURM_NTASKS": "4",
             "SLURM_LOCALID": "1", "SLURM_NODEID": "0", "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
             "SLURM_JOB_NODELIST": "n[1-2]"}


@pytest.mark.parametrize("env,expected", [
    # srun --mpi=pmi2 (as Slurm 22.05 sets it): Slurm's PMI2 server started the task.
    ({**SRUN_STEP, "PMI_RANK": "1", "PMI_SIZE": "4", "PMI_FD": "11", "PMI_JOBID": "77.0"},
     Topology(1, 4, 1, 2, "slurm-pmi2")),
    ({**SRUN_STEP, "PMIX_RANK": "1", "PMIX_NAMESPACE": "slurm.pmix.77.0"}, Topology(1, 4, 1, 2, "slurm-pmix")),
    # mpiexec (Hydra) run inside a batch script, or by srun on each node: Hydra names its jobs its own way.
    ({"SLURM_JOB_ID": "77", "SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_LOCALID": "0",
      "PMI_RANK": "3", "PMI_SIZE": "4", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2", "PMI_FD": "9"},
     Topology(3, 4, 1, 2, "hydra")),
    ({**SRUN_STEP, "PMI_RANK": "3", "PMI_SIZE": "4", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"},
     Topology(3, 4, 1, 2, "hydra")),
    # Hydra's proxies started by srun under MpiDefault=pmi2/pmix: its ranks may inherit the step's job name
    ({**SRUN_STEP, "PMI_RANK": "3", "PMI_SIZE": "4", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2",
      "PMI_JOBID": "77.0"}, Topology(3, 4, 1, 2, "hydra")),
])
def test_what_started_the_tasks_is_named(env, expected):
    t = discover(env, mpi=lambda: pytest.fail("MPI must not be asked"))
    assert t == expected and t.is_mpi


def test_srun_pmi2_rank_must_agree_with_slurm():
    from largebatch.errors import UsageError

    with pytest.raises(UsageError, match="PMI_RANK=2 but SLURM_PROCID=1"):
        discover({**SRUN_STEP, "PMI_RANK": "2", "PMI_SIZE": "4", "PMI_JOBID": "77.0"})


SIGNAL_CHILD = """
import os, signal, sys
from largebatch.engine.guards import InterruptGuard, StopSignal
with InterruptGuard():
    os.kill(os.getpid(), signal.SIGUSR1)          # set-up: the time-limit warning comes early
    stop = StopSignal(announce=True)
    stop.install()                                 # the training loop starts
    print("loop sees", stop.received == signal.SIGUSR1, flush=True)
    stop.uninstall()                               # the last step is done
    os.kill(os.getpid(), signal.SIGUSR1)          # the warning again, while the run finishes
    print("finished", flush=True)
print("restored", signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL, flush=True)  # nothing left ignored...
from largebatch.engine.guards import finishing
finishing(None)                                    # ...until the command line exits
os.kill(os.getpid(), signal.SIGUSR1)              # the warning while the process exits
print("exited", flush=True)
"""


def test_sigusr1_outside_the_training_loop_does_not_kill_the_run():
    r = subprocess.run([sys.executable, "-c", SIGNAL_CHILD], env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:4] == ["loop sees True", "finished", "restored True", "exited"]
    assert r.stderr.strip() == ("largebatch: SIGUSR1: stopping after this step with a checkpoint; "
                                "run the same command to resume")


def test_sigterm_after_bad_input_keeps_exit_status_2():
    # srun --kill-on-bad-exit sends SIGTERM to the workers still exiting once the first has gone.
    child = ("import os, signal\nfrom largebatch.engine.guards import InterruptGuard, finishing\n"
             "from largebatch.errors import UsageError\n"
             "try:\n    with InterruptGuard():\n        raise UsageError('bad')\nexcept UsageError as exc:\n"
             "    finishing(exc)\n    os.kill(os.getpid(), signal.SIGTERM)\n    raise SystemExit(2)\n")
    r = subprocess.run([sys.executable, "-c", child], env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr


def test_a_stop_on_the_warning_exits_with_the_status_the_batch_script_asks_for(tmp_path):
    """Under slurm.sbatch --requeue (LARGEBATCH_STOPPED_STATUS=75) a run stopped by the warning with a
    checkpoint exits 75, which the script requeues; a run that finished exits 0, which it never does."""
    from conftest import run_module, start
    from largebatch.engine.checkpoint import list_checkpoints

    env = _env({"LARGEBATCH_STOPPED_STATUS": "75", "LARGEBATCH_FAULT": "sleep@4:0:3"})  # time to signal in the loop
    d = str(tmp_path / "run")
    p = start("largebatch.train", "train.epochs=2", "checkpoint.every_steps=2", f"run.dir={d}", cwd=REPO, env=env)
    try:
        while not list_checkpoints(d):
            assert p.poll() is None, p.communicate()[1][-2000:]
            time.sleep(0.05)
        p.send_signal(signal.SIGUSR1)
        _, err = p.communicate(timeout=600)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 75 and "stopping on a signal after step" in err, err[-2000:]
    r = run_module("largebatch.train", "train.epochs=2", "checkpoint.every_steps=2", f"run.dir={d}",
                   env=_env({"LARGEBATCH_STOPPED_STATUS": "75"}))
    assert r.returncode == 0 and "resuming from" in r.stderr, r.stderr[-2000:]  # finished: 0, never requeued
    bad = run_module("largebatch.train", f"run.dir={tmp_path / 'bad'}", env=_env({"LARGEBATCH_STOPPED_STATUS": "x"}))
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1] == (
        "largebatch: error: LARGEBATCH_STOPPED_STATUS='x' is not an exit status; set an integer 0-125")


STOPPED_CHILD = """
import signal, sys
from largebatch.engine.guards import StopSignal
for stopped in (False, True):
    stop = StopSignal(announce=False)
    stop.install()
    stop.uninstall(stopped)
    print(stopped, signal.getsignal(signal.SIGTERM) == signal.SIG_IGN, flush=True)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
"""


@pytest.mark.parametrize("status,ignored", [(None, "False"), ("75", "True")])
def test_workers_finishing_an_agreed_stop_for_the_batch_script_ignore_srun_sigterm(status, ignored):
    # The first task to exit 75 makes srun --kill-on-bad-exit send SIGTERM to the others, which are
    # finishing the same stop: under the wrapper's --requeue (and only there) they let it pass.
    env = _env({} if status is None else {"LARGEBATCH_STOPPED_STATUS": status})
    r = subprocess.run([sys.executable, "-c", STOPPED_CHILD], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "False", "True", ignored]
