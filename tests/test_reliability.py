"""Checkpoints, exact resume, a killed worker, divergence guards, timeouts, signals and the lock."""

import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from checks import max_abs_diff
from conftest import (REPO, _env, free_port, launch_workers, load_weights, resumed_at, run_module, start,
                      worker_env)
from largebatch.config import load_config
from largebatch.engine import checkpoint as ckpt
from largebatch.engine import make_run_plan

TIMING = ("samples_per_sec", "elapsed_s", "data_wait", "time_to_target_s", "cost", "startup_s", "first_step_s",
          "build_s", "compile_s")
BASE = ["train.epochs=4", "checkpoint.every_steps=7", "train.log_every_steps=3"]


def _metrics(run_dir):
    return [{k: v for k, v in json.loads(x).items() if k not in TIMING} for x in open(os.path.join(run_dir, "metrics.jsonl"))]


def _same_weights(a, b):
    wa, wb = load_weights(a), load_weights(b)
    return all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def uninterrupted_2w(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("plain") / "run")
    results = launch_workers(2, "largebatch.train", *BASE, f"run.dir={d}")
    assert [r.returncode for r in results] == [0, 0], results[0].stderr[-2000:]
    return d


def test_stopped_and_resumed_is_bit_identical_on_2_workers(uninterrupted_2w, tmp_path):
    d = str(tmp_path / "run")
    # Both workers die at the start of step 20; the newest checkpoint is step 14.
    first = launch_workers(2, "largebatch.train", *BASE, f"run.dir={d}",
                           env={"LARGEBATCH_FAULT": "exit@20:0,exit@20:1"})
    assert [r.returncode for r in first] == [137, 137]
    assert [os.path.basename(p) for p in ckpt.list_checkpoints(d)][0] == "step-000000014.pt"
    second = launch_workers(2, "largebatch.train", *BASE, f"run.dir={d}")
    assert [r.returncode for r in second] == [0, 0], second[0].stderr[-2000:]
    assert "resuming from" in second[0].stderr and "taking over the lock" in second[0].stderr
    assert _same_weights(uninterrupted_2w, d)
    assert _metrics(uninterrupted_2w) == _metrics(d)


def _children(pid):
    kids = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = open(stat).read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.split("/")[2]))
    return kids


def test_worker_sigkilled_under_torchrun_restarts_and_matches(uninterrupted_2w, tmp_path):
    d = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=1",
           "-m", "largebatch.train", *BASE, "train.epochs=4", "comm.timeout_s=30", f"run.dir={d}"]
    # Slow each step a little so that the kill lands mid-run.
    agent = subprocess.Popen(cmd, env=_env({"LARGEBATCH_FAULT": ",".join(f"sleep@{s}:1:0.15" for s in range(44))}),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not ckpt.list_checkpoints(d) and time.time() < deadline:
            time.sleep(0.05)
        assert ckpt.list_checkpoints(d), "no checkpoint appeared"
        workers = _children(agent.pid)
        assert len(workers) == 2
        victim = max(workers)
        os.kill(victim, signal.SIGKILL)
        out, err = agent.communicate(timeout=240)
    finally:
        if agent.poll() is None:
            agent.kill()
    assert agent.returncode == 0, err[-3000:]
    assert "resuming from" in err
    assert _same_weights(uninterrupted_2w, d)


def test_resume_two_worker_checkpoint_on_one_worker(tmp_path):
    args = ["model.name=mlp", "model.norm=none", "train.epochs=3", "train.global_batch=64", "checkpoint.every_steps=10"]
    ref = str(tmp_path / "ref")
    assert run_module("largebatch.train", *args, f"run.dir={ref}").returncode == 0
    d = str(tmp_path / "run")
    faulted = launch_workers(2, "largebatch.train", *args, f"run.dir={d}", env={"LARGEBATCH_FAULT": "exit@25:0,exit@25:1"})
    assert [w.returncode for w in faulted] == [137, 137], faulted[0].stderr[-2000:]  # both died at step 25
    # the newest checkpoint: the end of epoch 1 (1,438 images at 64: 22 steps), after step 20's
    assert os.path.basename(ckpt.list_checkpoints(d)[0]) == f"step-{22:09d}.pt"
    r = run_module("largebatch.train", *args, f"run.dir={d}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert resumed_at(r.stderr, 22, "on 1 workers instead of 2: same global batch 64, same data position")
    assert max_abs_diff(load_weights(ref), load_weights(d)) <= 1e-4


def test_truncated_newest_falls_back_and_code_is_refused(tmp_path):
    d = str(tmp_path / "run")
    assert run_module("largebatch.train", "train.epochs=2", "checkpoint.every_steps=5", f"run.dir={d}").returncode == 0
    newest, older = ckpt.list_checkpoints(d)[:2]
    with open(newest, "r+b") as fh:
        fh.truncate(os.path.getsize(newest) // 2)
    warnings = []
    state = ckpt.find_resume_state(d, "auto", warn=warnings.append)
    assert state["path"] == older and "skipping checkpoint" in warnings[0]

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    evil = str(tmp_path / "evil.pt")
    torch.save({"format": ckpt.FORMAT, "model": {}, "hook": Evil()}, evil)
    with pytest.raises(ValueError, match="Unpickling|weights_only|Weights only"):
        ckpt.load(evil)
    r = run_module("largebatch.train", f"checkpoint.resume={evil}", f"run.dir={tmp_path / 'x'}")
    assert r.returncode == 2 and "cannot be loaded" in r.stderr and "pwned" not in r.stdout


def test_forced_nan_is_skipped_or_stops(tmp_path):
    d = str(tmp_path / "skip")
    env = {"LARGEBATCH_FAULT": "nan@5"}
    r = run_module("largebatch.train", "train.epochs=2", f"run.dir={d}", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "skipped step 5" in r.stderr
    assert json.loads(open(os.path.join(d, "metrics.jsonl")).readlines()[-1])["skipped_steps"] == 1

    d = str(tmp_path / "stop")
    r = run_module("largebatch.train", "train.epochs=3", "train.on_nonfinite=stop", f"run.dir={d}",
                   env={"LARGEBATCH_FAULT": "nan@15"})
    assert r.returncode == 3 and "Traceback" not in r.stderr
    line = [x for x in r.stderr.splitlines() if x.startswith("largebatch: stopped:")][0]
    assert "step 15" in line and "step-000000011.pt" in line
    assert [os.path.basename(p) for p in ckpt.list_checkpoints(d)] == ["step-000000011.pt"]
    assert not os.path.exists(os.path.join(d, "checkpoints", "final.pt"))

    r = run_module("largebatch.train", "train.epochs=2", "train.max_skipped_steps=2", f"run.dir={tmp_path / 'n'}",
                   env={"LARGEBATCH_FAULT": "nan@3,nan@4"})
    assert r.returncode == 3 and "2 steps in a row" in r.stderr


def test_sleeping_worker_triggers_named_timeout(tmp_path):
    sleep_s, port = 60, free_port()
    fault = {"LARGEBATCH_FAULT": f"sleep@3:1:{sleep_s}"}
    procs = [start("largebatch.train", "train.epochs=2", "comm.timeout_s=5", f"run.dir={tmp_path}",
                   env=worker_env(rank, 2, port, fault), slot=rank) for rank in range(2)]
    t0 = time.perf_counter()
    try:
        _, err = procs[0].communicate(timeout=120)
        seconds = time.perf_counter() - t0
    finally:
        for p in procs:  # rank 1 sleeps on; what it does after the sleep is not this test's
            if p.poll() is None:
                p.kill()
            p.communicate()
    lines = [x for x in err.splitlines() if x.startswith("largebatch: stopped:")]
    assert procs[0].returncode == 3 and lines, err[-2000:]
    assert "step 3" in lines[0] and "rank 1 (last at step 2)" in lines[0]
    # rank 0 gave up within the timeout plus start-up (imports, data, rendezvous), not after the sleep
    assert seconds < sleep_s


def test_sigterm_leaves_a_resumable_checkpoint(tmp_path):
    d = str(tmp_path / "run")
    p = start("largebatch.train", "train.epochs=4", f"run.dir={d}", cwd=REPO)
    deadline = time.time() + 60
    while not ckpt.list_checkpoints(d) and time.time() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0 and "stopping on a signal" in err, err[-2000:]
    stopped = int(err.split("stopping on a signal after step ")[1].split(":")[0])
    assert os.path.basename(ckpt.list_checkpoints(d)[0]) == f"step-{stopped:09d}.pt"
    r = run_module("largebatch.train", "train.epochs=4", f"run.dir={d}")
    assert r.returncode == 0 and resumed_at(r.stderr, stopped), r.stderr[-2000:]


def test_changed_config_is_refused_but_safe_keys_pass(tmp_path):
    d = str(tmp_path / "run")
    # precise_bn_images=0 then the default auto: validation only, safe to change
    assert run_module("largebatch.train", "train.epochs=1", "train.precise_bn_images=0", f"run.dir={d}").returncode == 0
    r = run_module("largebatch.train", "train.epochs=2", "optim.base_lr=0.3", f"run.dir={d}")
    assert r.returncode == 2 and "optim.base_lr (0.2 -> 0.3)" in r.stderr
    r = run_module("largebatch.train", "train.epochs=2", f"run.dir={d}")
    assert r.returncode == 0 and "resuming from" in r.stderr
    r = run_module("largebatch.train", "train.epochs=2", "optim.base_lr=0.3", "checkpoint.resume=never", f"run.dir={d}")
    assert r.returncode == 0 and "resuming" not in r.stderr


def test_live_lock_is_refused(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    (d / ".lock").write_text(json.dumps({"host": os.uname().nodename, "pid": os.getpid()}))
    r = run_module("largebatch.train", f"run.dir={d}")
    assert r.returncode == 2 and f"is in use by pid {os.getpid()}" in r.stderr


def test_fresh_start_moves_old_checkpoints_aside(tmp_path):
    d = str(tmp_path / "run")
    assert run_module("largebatch.train", "train.epochs=2", f"run.dir={d}").returncode == 0
    old = ckpt.list_checkpoints(d)
    r = run_module("largebatch.train", "train.epochs=1", "optim.base_lr=0.3", "checkpoint.resume=never", f"run.dir={d}")
    assert r.returncode == 0 and "moved 2 earlier checkpoint(s)" in r.stderr
    assert [os.path.basename(p) for p in ckpt.list_checkpoints(d)] == ["step-000000011.pt"]
    replaced = glob.glob(os.path.join(d, "checkpoints", "replaced-*", "*.pt"))
    assert sorted(map(os.path.basename, replaced)) == sorted(map(os.path.basename, old))
    assert re.fullmatch(r"replaced-\d{8}-\d{6}", os.path.basename(os.path.dirname(replaced[0]))), replaced


def test_checkpoints_moved_aside_go_to_a_folder_named_by_utc_time_and_unique(tmp_path):
    d = str(tmp_path)
    folder = ckpt.checkpoint_dir(d)
    made = []
    for step in (11, 22, 33):  # three moves in the same second
        os.makedirs(folder, exist_ok=True)
        open(os.path.join(folder, f"step-{step:09d}.pt"), "wb").close()
        made.append(ckpt.move_aside(d, now=1796354100.0))  # 2026-12-04 03:15:00 UTC
    assert [os.path.relpath(m, folder) for m in made] == ["replaced-20261204-031500", "replaced-20261204-031500-2",
                                                          "replaced-20261204-031500-3"]
    assert [os.listdir(m) for m in made] == [["step-000000011.pt"], ["step-000000022.pt"], ["step-000000033.pt"]]
    assert ckpt.list_checkpoints(d) == [] and ckpt.move_aside(d) is None
    assert sorted(os.listdir(folder)) == [os.path.basename(m) for m in made]  # sorted by name = by time


def test_every_steps_at_epoch_end_without_epoch_checkpoints(tmp_path):
    d = str(tmp_path / "run")
    r = run_module("largebatch.train", "train.epochs=2", "checkpoint.every_steps=11", "checkpoint.at_epoch_end=false",
                   f"run.dir={d}")
    assert r.returncode == 0
    assert [os.path.basename(p) for p in ckpt.list_checkpoints(d)] == ["step-000000022.pt", "step-000000011.pt"]


def test_two_workers_refuse_a_live_lock_in_one_line(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    (d / ".lock").write_text(json.dumps({"host": os.uname().nodename, "pid": os.getpid()}))
    results = launch_workers(2, "largebatch.train", f"run.dir={d}")
    assert [r.returncode for r in results] == [2, 2]
    assert "is in use by" in results[0].stderr and "Traceback" not in results[0].stderr + results[1].stderr


def test_workers_with_different_configs_are_stopped(tmp_path):
    port = free_port()
    procs = [start("largebatch.train", f"optim.base_lr={lr}", f"run.dir={tmp_path}", env=worker_env(rank, 2, port),
                   slot=rank) for rank, lr in ((0, "0.2"), (1, "0.3"))]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [2, 2]
    assert "workers [1] run a different config or largebatch version" in outs[0][1]
    assert "Traceback" not in outs[0][1] + outs[1][1]


def test_a_finished_run_is_reported_and_left_as_it_was(tmp_path):
    d = str(tmp_path / "run")
    no_warmup = "schedule.warmup_epochs=0"  # the cosine decay from the first step
    assert run_module("largebatch.train", "train.epochs=1", no_warmup, f"run.dir={d}").returncode == 0
    names = ("config.yaml", "metrics.jsonl", os.path.join("checkpoints", "final.pt"))
    before = {n: open(os.path.join(d, n), "rb").read() for n in names}
    # A later command with another (safe-to-change) setting neither trains nor rewrites the record.
    r = run_module("largebatch.train", "train.epochs=1", no_warmup, "comm.backend=gloo", "train.log_every_steps=2",
                   f"run.dir={d}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"{d} holds a finished run (step 11, val_acc" in r.stderr and "nothing was trained or written" in r.stderr
    assert "epoch   1/1" not in r.stderr
    assert {n: open(os.path.join(d, n), "rb").read() for n in names} == before
    # Asking for more epochs continues the run, which then writes its record.
    r = run_module("largebatch.train", "train.epochs=2", no_warmup, f"run.dir={d}")
    assert r.returncode == 0 and "resuming from" in r.stderr and "epoch   2/2" in r.stderr
    assert "epochs: 2" in open(os.path.join(d, "config.yaml")).read()
    # ... and says, once, that the cosine decay now spans 22 steps, so the lr climbs back from the
    # end of the finished run's decay to half the peak
    before, now = (make_run_plan(load_config(None, [f"train.epochs={e}", no_warmup]), 1, 1438).schedule for e in (1, 2))
    warnings = [ln for ln in r.stderr.splitlines() if ln.startswith("largebatch: warning:")]
    assert warnings == [
        f"largebatch: warning: train.epochs changed from 1 to 2 since the checkpoint: the lr schedule (cosine decay) "
        f"now ends at step 22, not 11, so the lr goes from {before(10):.4g} (the checkpoint's last step) to "
        f"{now(11):.4g} at step 11 (train.epochs=1 would give {before(11):.4g}); keep train.epochs=1 to follow the old schedule, "
        f"or train the longer run from the start in another run.dir"], r.stderr
    assert now(11) == pytest.approx(0.05) and before(10) < 0.01
    assert r.stderr.index("resuming from") < r.stderr.index("largebatch: warning:") < r.stderr.index("epoch   2/2")


def test_more_epochs_under_a_schedule_that_does_not_change_resume_without_a_warning(tmp_path):
    d = str(tmp_path / "run")
    args = ["schedule.decay=step", "schedule.milestones=[1]", "schedule.warmup_epochs=0", f"run.dir={d}"]
    assert run_module("largebatch.train", "train.epochs=1", *args).returncode == 0
    r = run_module("largebatch.train", "train.epochs=2", *args)
    assert r.returncode == 0 and resumed_at(r.stderr, 11), r.stderr
    assert "largebatch: warning" not in r.stderr
