"""The launch wrappers: the plan they print, the commands they build, and their refusals."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, _env, load_weights
from test_mpi import MPIEXEC, HAVE_MPI4PY


def wrapper(script: str, *args: str, extra_env: dict | None = None, timeout: float = 120):
    env = _env({"PYTHON": sys.executable, **(extra_env or {})})
    env.pop("OMP_NUM_THREADS", None)
    for k in [k for k in env if k.startswith("SLURM_")]:
        env.pop(k)
    env.update(extra_env or {})
    return subprocess.run(["bash", os.path.join(REPO, "launch", script), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def plan_of(stdout: str) -> dict:
    rows = {}
    for line in stdout.splitlines():
        key, _, value = line.partition("  ")
        if value.strip():
            rows[key.strip()] = value.split()[0]
    return rows


def command_of(stdout: str) -> list[str]:
    line = next(line for line in stdout.splitlines() if line.startswith("would run: "))
    return line[len("would run: "):].split()


GOYAL = ["--config", "configs/imagenet_resnet50_goyal_8k.yaml", "train.global_batch=8192"]
LARS = ["--config", "configs/imagenet_resnet50_lars_32k.yaml", "train.global_batch=32768"]


def test_torchrun_16_nodes_of_8_gpus_at_8192():
    r = wrapper("torchrun.sh", "--nnodes", "16", "--nproc-per-node", "8", "--rdzv-endpoint", "node001:29500",
                "--max-restarts", "3", "--dry-run", *GOYAL)
    assert r.returncode == 0, r.stderr
    plan = plan_of(r.stdout)
    assert (plan["workers (world size)"], plan["global batch"], plan["per-worker batch"], plan["micro-batch"],
            plan["accumulation steps"]) == ("128", "8192", "64", "64", "1")
    assert plan["scaled lr (peak)"] == "3.2" and plan["warmup steps"] == str(5 * (1281167 // 8192))
    cmd = command_of(r.stdout)
    assert cmd[1:4] == ["-m", "torch.distributed.run", "--nnodes"] and cmd[4] == "16"
    assert ["--rdzv-endpoint", "node001:29500"] == cmd[cmd.index("--rdzv-endpoint"):][:2]
    assert ["--max-restarts", "3"] == cmd[cmd.index("--max-restarts"):][:2]  # elastic options pass through
    assert cmd[cmd.index("largebatch.train") + 1:] == GOYAL
    assert "OMP_NUM_THREADS=" in r.stderr


def test_mpirun_512_cpu_ranks_at_32768():
    r = wrapper("mpirun.sh", "-np", "512", "--ranks-per-node", "2", "--hostfile", "hosts.txt", "--bind-to",
                "socket", "--dry-run", *LARS)
    assert r.returncode == 0, r.stderr
    plan = plan_of(r.stdout)
    assert (plan["workers (world size)"], plan["global batch"], plan["per-worker batch"],
            plan["accumulation steps"]) == ("512", "32768", "64", "1")
    cmd = command_of(r.stdout)
    assert cmd[1:3] == ["-np", "512"]
    assert ("-ppn" in cmd and cmd[cmd.index("-ppn") + 1] == "2") or "ppr:2:node" in cmd
    assert ["--bind-to", "socket"] == cmd[cmd.index("--bind-to"):][:2]  # mapping options pass through
    assert cmd[cmd.index("largebatch.train") + 1:] == LARS
    assert "2 worker(s) per node" in r.stderr


def test_slurm_shapes():
    r = wrapper("slurm.sbatch", "--nodes", "16", "--ntasks-per-node", "8", "--dry-run", *GOYAL)
    assert r.returncode == 0, r.stderr
    assert plan_of(r.stdout)["workers (world size)"] == "128" and plan_of(r.stdout)["per-worker batch"] == "64"
    assert command_of(r.stdout)[:8] == ["srun", "--kill-on-bad-exit=1", "--nodes", "16", "--ntasks", "128",
                                        "--ntasks-per-node", "8"]
    # Inside an allocation the shape is Slurm's: 512 tasks on 256 nodes, threads from --cpus-per-task.
    inside = {"SLURM_NTASKS": "512", "SLURM_NNODES": "256", "SLURM_CPUS_PER_TASK": "32"}
    r = wrapper("slurm.sbatch", "--dry-run", "--srun-args", "--mpi=pmix --cpu-bind=sockets", *LARS,
                extra_env=inside)
    assert r.returncode == 0, r.stderr
    assert plan_of(r.stdout)["workers (world size)"] == "512" and plan_of(r.stdout)["per-worker batch"] == "64"
    assert command_of(r.stdout)[:4] == ["srun", "--kill-on-bad-exit=1", "--mpi=pmix", "--cpu-bind=sockets"]
    assert "OMP_NUM_THREADS=32, 512 tasks, 2 per node" in r.stderr


@pytest.mark.parametrize("script,world", [
    ("torchrun.sh", ["--nnodes", "16", "--nproc-per-node", "8", "--rdzv-endpoint", "node001:29500"]),
    ("mpirun.sh", ["-np", "128"]),
    ("slurm.sbatch", ["--nodes", "16", "--ntasks-per-node", "8"]),
])
def test_wrappers_refuse_a_batch_the_world_does_not_divide(script, world):
    r = wrapper(script, *world, "--dry-run", "train.global_batch=8000")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == ("largebatch: error: train.global_batch=8000 is not divisible by "
                                                 "the world size 128; use a multiple of 128, e.g. 7936 or 8064")
    assert "would run" not in r.stdout


@pytest.mark.parametrize("script,args,message", [
    ("torchrun.sh", ["--nnodes", "2"], "--nnodes 2 needs --rdzv-endpoint"),
    ("torchrun.sh", ["--nproc-per-node", "0"], "--nproc-per-node takes an integer >= 1, got '0'"),
    ("mpirun.sh", ["--ranks-per-node", "2"], "give the number of ranks with -np N"),
    ("mpirun.sh", ["-np", "4", "epochs=3"], "'epochs=3' is neither an option nor a section.key=value override"),
    ("mpirun.sh", ["-np", "4", "--hostfile", "/nonexistent/hosts"], "--hostfile '/nonexistent/hosts' does not exist"),
    ("slurm.sbatch", [], "the world is unknown"),
])
def test_wrapper_argument_errors(script, args, message):
    r = wrapper(script, *args)
    assert r.returncode == 2
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def manual_sections(text: str) -> dict:
    """A manual's sections: heading (a line in capitals at the margin) -> its lines."""
    sections, current = {}, None
    for line in text.splitlines():
        if line and not line.startswith(" ") and line.split(" (")[0].isupper():
            current = line.split(" (")[0]
            sections[current] = []
        elif current is not None and line.strip():
            sections[current].append(line)
    return sections


@pytest.mark.parametrize("script,statuses", [
    ("torchrun.sh", ["0", "1", "2", "other"]),
    ("mpirun.sh", ["0", "2", "3", "other"]),
    ("slurm.sbatch", ["0", "2", "3", "75", "other"]),
])
def test_wrappers_document_themselves(script, statuses):
    r = wrapper(script, "--help")
    assert r.returncode == 0
    sections = manual_sections(r.stdout)
    for section in ("USAGE", "ARGUMENTS", "WHAT IT DOES", "ENVIRONMENT", "FAILURE MODES", "EXIT STATUS"):
        assert sections.get(section), f"{section} is missing or empty"
    assert "--dry-run" in " ".join(sections["ARGUMENTS"]) and "--help" in " ".join(sections["ARGUMENTS"])
    listed = [ln.split()[0] for ln in sections["EXIT STATUS"] if re.match(r"^  (\d+|other)\s", ln)]
    assert listed == statuses, sections["EXIT STATUS"]
    assert list(sections)[-1] == "EXIT STATUS" and "set -euo" not in r.stdout
    assert not re.search(r"^#?SBATCH --", r.stdout, flags=re.M)  # the manual ends before the directives
    assert "X.yaml" not in r.stdout and "..." not in "\n".join(sections["USAGE"][2:])  # examples run as written


def test_mpirun_dry_run_without_mpi_says_so(tmp_path):
    bare = str(tmp_path / "bin")  # a PATH with the shell's tools and no mpirun or mpiexec
    os.mkdir(bare)
    for tool in ("bash", "dirname", "grep", "sed", "nproc", "cat"):
        os.symlink(shutil.which(tool), os.path.join(bare, tool))
    r = wrapper("mpirun.sh", "-np", "4", "--dry-run", extra_env={"PATH": bare, "MPIRUN": ""})
    assert r.returncode == 0, r.stderr
    assert command_of(r.stdout)[:5] == ["mpirun", "-np", "4", "-ppn", "4"]
    said = r.stderr.splitlines()[-1]
    assert said.startswith("mpirun: no MPI launcher found") and "showing the command for Hydra" in said
    assert "pip install 'largebatch[mpi]'" in said and "set MPIRUN" in said
    r = wrapper("mpirun.sh", "-np", "4", extra_env={"PATH": bare, "MPIRUN": ""})
    assert r.returncode == 2 and "would run" not in r.stdout
    assert r.stderr.splitlines()[-1] == ("launch/mpirun.sh: error: no mpirun or mpiexec on PATH; load your MPI "
                                         "module, pip install 'largebatch[mpi]', or set MPIRUN")
    r = wrapper("mpirun.sh", "-np", "4", extra_env={"MPIRUN": str(tmp_path / "nompirun")})
    assert r.returncode == 2 and "is not a command" in r.stderr.splitlines()[-1]


def test_torchrun_takes_the_rendezvous_backend_once():
    r = wrapper("torchrun.sh", "--nnodes", "2", "--nproc-per-node", "2", "--rdzv-backend", "etcd-v2",
                "--rdzv-endpoint", "h:2379", "--dry-run")
    assert r.returncode == 0, r.stderr
    cmd = command_of(r.stdout)
    assert cmd.count("--rdzv-backend") == 1 and cmd[cmd.index("--rdzv-backend") + 1] == "etcd-v2"


def test_dry_runs_plan_a_factory_dataset_and_refuse_what_training_refuses(tmp_path):
    from test_cli import BLOBS

    (tmp_path / "mydata.py").write_text(BLOBS)
    path = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"}
    r = wrapper("torchrun.sh", "--nproc-per-node", "2", "--dry-run", "data.name=mydata:blobs", "train.global_batch=64",
                extra_env=path)
    assert r.returncode == 0, r.stderr
    assert "steps per epoch        6  (400 training images)" in r.stdout and "would run: " in r.stdout
    # 97 images per worker under a cap of 64: micro-batches of 1 through the default model's BatchNorm
    r = wrapper("torchrun.sh", "--nproc-per-node", "2", "--dry-run", "train.global_batch=194",
                "train.max_micro_batch=64")
    assert r.returncode == 2 and "would run" not in r.stdout
    assert r.stderr.splitlines()[-1].startswith("largebatch: error: train.global_batch=194 on 2 worker(s)")
    assert "BatchNorm cannot train on one image at a time" in r.stderr.splitlines()[-1]


def omp_line(stderr: str) -> str:
    return next(line for line in stderr.splitlines() if line.startswith("OMP_NUM_THREADS="))


def test_dry_runs_take_the_threads_from_the_target_nodes_or_say_whose_cores_they_counted():
    here = omp_line(wrapper("torchrun.sh", "--nproc-per-node", "2", "--dry-run").stderr)
    assert "cores on this machine / 2 worker(s) per node" in here and "not necessarily the target nodes'" in here
    assert "--cpus-per-worker C" in here
    r = wrapper("torchrun.sh", "--nnodes", "4", "--nproc-per-node", "2", "--rdzv-endpoint", "n1:29500",
                "--cpus-per-worker", "24", "--dry-run")
    assert r.returncode == 0 and omp_line(r.stderr) == "OMP_NUM_THREADS=24 (--cpus-per-worker 24)"
    r = wrapper("torchrun.sh", "--nproc-per-node", "8", "--dry-run", extra_env={"SLURM_CPUS_ON_NODE": "64"})
    assert omp_line(r.stderr).startswith("OMP_NUM_THREADS=8 (SLURM_CPUS_ON_NODE=64 cores allocated on the node")
    # mpirun's ranks are Slurm tasks: Slurm's cores per task, exported to every rank
    r = wrapper("mpirun.sh", "-np", "8", "--dry-run", extra_env={"SLURM_CPUS_PER_TASK": "12", "SLURM_NNODES": "2"})
    assert omp_line(r.stderr).startswith("OMP_NUM_THREADS=12 (SLURM_CPUS_PER_TASK")
    assert "OMP_NUM_THREADS 12" in r.stdout or "-x OMP_NUM_THREADS" in r.stdout
    r = wrapper("mpirun.sh", "-np", "8", "--cpus-per-worker=0", "--dry-run")
    assert r.returncode == 2 and "--cpus-per-worker takes an integer >= 1, got '0'" in r.stderr
    # sbatch's shape outside an allocation: --cpus-per-task, passed to srun as well; without it, this machine's
    r = wrapper("slurm.sbatch", "--nodes", "16", "--ntasks-per-node", "8", "--cpus-per-task", "12", "--dry-run", *GOYAL)
    assert omp_line(r.stderr) == "OMP_NUM_THREADS=12, 128 tasks, 8 per node"
    assert ["--cpus-per-task", "12"] == command_of(r.stdout)[8:10]
    here = omp_line(wrapper("slurm.sbatch", "--nodes", "16", "--ntasks-per-node", "8", "--dry-run", *GOYAL).stderr)
    assert "cores on this machine / 8, not necessarily the nodes' cores: give --cpus-per-task C" in here
    inside = {"SLURM_NTASKS": "16", "SLURM_NNODES": "2", "SLURM_CPUS_ON_NODE": "64"}
    r = wrapper("slurm.sbatch", "--dry-run", extra_env=inside)
    assert omp_line(r.stderr) == "OMP_NUM_THREADS=8, 16 tasks, 8 per node"


@pytest.mark.skipif(MPIEXEC is None or not HAVE_MPI4PY, reason="needs mpiexec and mpi4py: pip install -e '.[mpi]'")
def test_mpirun_wrapper_trains(tmp_path):
    out = str(tmp_path / "run")
    r = wrapper("mpirun.sh", "-np", "2", "train.epochs=2", "comm.backend=mpi", f"run.dir={out}",
                extra_env={"MPIRUN": MPIEXEC})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "OMP_NUM_THREADS=" in r.stderr and "2 worker(s) on cpu over mpi (hydra)" in r.stdout + r.stderr
    assert load_weights(out)


def test_option_forms_the_wrappers_read():
    # --opt=value is read like --opt value: the plan is for 2 x 8 workers and the endpoint is kept.
    r = wrapper("torchrun.sh", "--nnodes=2", "--nproc_per_node=8", "--rdzv-endpoint=h:29500", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert plan_of(r.stdout)["workers (world size)"] == "16"
    cmd = command_of(r.stdout)
    assert "--standalone" not in cmd and ["--rdzv-endpoint", "h:29500"] == cmd[cmd.index("--rdzv-endpoint"):][:2]
    # mpirun options with a name and a value pass through whole.
    r = wrapper("mpirun.sh", "-np", "4", "--mca", "btl", "tcp,self", "--dry-run", "train.epochs=3")
    assert r.returncode == 0, r.stderr
    cmd = command_of(r.stdout)
    assert ["--mca", "btl", "tcp,self"] == cmd[cmd.index("--mca"):][:3] and cmd[-1] == "train.epochs=3"


def test_mpirun_inside_a_slurm_allocation_spreads_over_its_nodes():
    r = wrapper("mpirun.sh", "--dry-run", extra_env={"SLURM_NTASKS": "32", "SLURM_NNODES": "4"})
    assert r.returncode == 0, r.stderr
    assert plan_of(r.stdout)["workers (world size)"] == "32"
    assert "32 ranks, 8 per node" in r.stderr


# -- launch/slurm.sbatch --requeue, with stand-ins for srun and scontrol ---------------------------

FAKE_SRUN = """#!/usr/bin/env bash
# srun's stand-in: optionally sends the batch shell Slurm's B:USR1 warning, then exits with
# $FAKE_EXIT once the shell has passed the warning on (or at once without a warning).
echo "$*" > "$FAKE_LOG/srun"
echo "${LARGEBATCH_STOPPED_STATUS:-unset}" > "$FAKE_LOG/srun.stopped_status"
trap 'echo USR1 >> "$FAKE_LOG/srun.signals"; kill "$nap"; exit "$FAKE_EXIT"' USR1
[[ "$FAKE_WARN" == 1 ]] || exit "$FAKE_EXIT"
sleep 30 & nap=$!
kill -USR1 "$PPID"
wait "$nap"
exit 99
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
echo "$*" >> "$FAKE_LOG/scontrol"
[[ "$FAKE_SCONTROL_FAILS" != 1 ]] || { echo "Requested operation is presently disabled" >&2; exit 1; }
"""


def sbatch_with_fakes(tmp_path, *args: str, warn: bool, srun_exit: int, restarts: int | None = None,
                      scontrol_fails: bool = False):
    """launch/slurm.sbatch inside a 2-task allocation (job 42) whose srun and scontrol are stand-ins;
    where it calls ``scontrol requeue``, this ends it with SIGTERM as Slurm would. Returns the
    CompletedProcess-like result and what the stand-ins were asked (srun's argv, the signals
    srun got, scontrol's calls)."""
    import signal
    import time

    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    log.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = _env({"PYTHON": sys.executable})
    for k in [k for k in env if k.startswith("SLURM_")]:
        env.pop(k)
    env.update({"PATH": f"{bin_dir}{os.pathsep}{env['PATH']}", "FAKE_LOG": str(log), "FAKE_WARN": str(int(warn)),
                "FAKE_EXIT": str(srun_exit), "FAKE_SCONTROL_FAILS": str(int(scontrol_fails)),
                "SLURM_JOB_ID": "42", "SLURM_NTASKS": "2", "SLURM_NNODES": "1", "SLURM_NTASKS_PER_NODE": "2"})
    if restarts is not None:
        env["SLURM_RESTART_COUNT"] = str(restarts)
    p = subprocess.Popen(["bash", os.path.join(REPO, "launch", "slurm.sbatch"), *args], cwd=REPO, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while p.poll() is None and time.monotonic() < deadline:
        if (log / "scontrol").exists() and not scontrol_fails:
            p.send_signal(signal.SIGTERM)  # Slurm ends the batch shell of a job it requeues
            break
        time.sleep(0.05)
    out, err = p.communicate(timeout=120)
    asked = {name: (log / name).read_text().splitlines() if (log / name).exists() else []
             for name in ("srun", "srun.signals", "srun.stopped_status", "scontrol")}
    return subprocess.CompletedProcess(p.args, p.returncode, out, err), asked


def test_slurm_requeue_after_the_time_limit_warning(tmp_path):
    # the tasks stopped after the same step with a checkpoint: the status the script asked them for
    r, asked = sbatch_with_fakes(tmp_path, "--requeue", "train.epochs=2", warn=True, srun_exit=75)
    assert r.returncode == 0, r.stderr
    assert asked["srun.stopped_status"] == ["75"]
    assert asked["srun.signals"] == ["USR1"]  # the batch shell passed the warning on to srun
    assert asked["srun"][0].startswith("--kill-on-bad-exit=1 ") and asked["srun"][0].endswith(" train.epochs=2")
    assert asked["scontrol"] == ["requeue 42"]
    assert ("launch/slurm.sbatch: the time limit is near: requeueing job 42 (requeue 1 of at most 10); it resumes "
            "from the checkpoint") in r.stderr.splitlines()
    assert "job 42 has been requeued 0 time(s), at most 10 (--max-requeues)" in r.stderr


def test_slurm_requeue_after_tasks_ended_by_the_warning(tmp_path):
    # Python still starting when the warning came: SIGUSR1 ended the tasks (128 + 10).
    r, asked = sbatch_with_fakes(tmp_path, "--requeue", "--max-requeues=5", warn=True, srun_exit=138, restarts=4)
    assert r.returncode == 0 and asked["scontrol"] == ["requeue 42"], r.stderr
    assert "requeueing job 42 (requeue 5 of at most 5)" in r.stderr


@pytest.mark.parametrize("args,warn,srun_exit,restarts,status", [
    (["--requeue"], False, 0, None, 0),         # the run finished before any warning
    (["--requeue"], True, 0, None, 0),          # ... or as the warning came
    (["--requeue"], False, 75, None, 75),       # scancel: stopped with a checkpoint, no warning
    (["--requeue"], True, 2, None, 2),          # bad input
    (["--requeue"], True, 3, None, 3),          # an agreed stop
    (["--requeue"], True, 1, None, 1),          # a task crashed
    ([], True, 0, None, 0),                     # no --requeue: stopped with a checkpoint, submit again
    (["--requeue", "--max-requeues", "3"], True, 75, 3, 3),  # the cap
])
def test_slurm_never_requeues_without_cause(tmp_path, args, warn, srun_exit, restarts, status):
    r, asked = sbatch_with_fakes(tmp_path, *args, "train.epochs=2", warn=warn, srun_exit=srun_exit,
                                 restarts=restarts)
    assert r.returncode == status, r.stderr
    assert asked["scontrol"] == [] and "requeueing" not in r.stderr
    assert asked["srun.signals"] == (["USR1"] if warn else [])
    assert asked["srun.stopped_status"] == (["75"] if "--requeue" in args else ["unset"])
    if restarts is not None:
        assert r.stderr.splitlines()[-1] == (
            "launch/slurm.sbatch: stopped: the time limit came again after 3 requeue(s) (--max-requeues 3); "
            "the checkpoint is kept: submit the job again to resume")


def test_slurm_requeue_refused_by_slurm_says_so(tmp_path):
    r, asked = sbatch_with_fakes(tmp_path, "--requeue", warn=True, srun_exit=75, scontrol_fails=True)
    assert r.returncode == 3 and asked["scontrol"] == ["requeue 42"]
    assert r.stderr.splitlines()[-1] == (
        "launch/slurm.sbatch: stopped: scontrol requeue 42 failed: Requested operation is presently disabled; "
        "submit with sbatch --requeue (or on a cluster with JobRequeue=1), or submit the job again to resume")


def test_slurm_requeue_options_are_checked():
    r = wrapper("slurm.sbatch", "--nodes", "1", "--ntasks-per-node", "2", "--requeue", "--max-requeues", "-1",
                "--dry-run")
    assert r.returncode == 2
    assert r.stderr.strip() == "launch/slurm.sbatch: error: --max-requeues takes an integer >= 0, got '-1'"
    r = wrapper("slurm.sbatch", "--nodes", "1", "--ntasks-per-node", "2", "--requeue", "--dry-run")
    assert r.returncode == 0 and "would run: srun --kill-on-bad-exit=1" in r.stdout, r.stderr
    assert "at most 10 (--max-requeues)" in r.stderr
