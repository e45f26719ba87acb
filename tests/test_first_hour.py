"""A new user's first hour: Ctrl-C, degenerate batch plans, optimizer defaults, and data layouts."""

import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, _env, free_port, launch_workers, resumed_at, run_module, start, worker_env
from largebatch.batching import is_sensible, nearest_sensible, plan, plan_warning
from largebatch.config import load_config
from largebatch.data import build_datasets
from largebatch.data.sampler import Request
from largebatch.engine import checkpoint as ckpt
from largebatch.engine import make_run_plan
from largebatch.engine.guards import InterruptGuard, StopSignal
from largebatch.engine.run_plan import check_trainable, has_batchnorm
from largebatch.errors import UsageError
from largebatch.models import create_model
from largebatch.optim.schedule import warmup_warning
from test_data import make_cifar, make_tree


# -- Ctrl-C ----------------------------------------------------------------------------------------

HANG_S = 900
"""How long these runs may take to reach a checkpoint, or to stop after a signal, before a test calls
it a hang. They take seconds; on a loaded machine, shared with other test runs, many times as long,
which must not fail a test: only a hang should reach this bound."""


def _wait_for_checkpoint(run_dir, procs, seconds=HANG_S):
    """Wait until the run has written its first checkpoint, however long that takes while every
    process runs; fail at once if one ends, and after ``seconds`` (a hang) with what they printed."""
    deadline = time.monotonic() + seconds
    while not ckpt.list_checkpoints(run_dir):
        ended = any(p.poll() is not None for p in procs)
        if ended or time.monotonic() > deadline:
            for p in procs:
                p.kill()
            outputs = []
            for p in procs:
                try:
                    outputs.append(p.communicate(timeout=60)[1][-2000:])
                except subprocess.TimeoutExpired:  # a loader process still holds the pipe
                    outputs.append("(no output: the pipe stayed open)")
            what = "a worker ended before its first checkpoint" if ended else f"no checkpoint after {seconds}s"
            pytest.fail(f"{what}; stderr: {outputs}")
        time.sleep(0.05)


def _stopped_step(stderr):
    assert "stopping on a signal after step " in stderr, stderr[-2000:]
    return int(stderr.split("stopping on a signal after step ")[1].split(":")[0])


def test_ctrl_c_single_process_checkpoints_and_resumes(tmp_path):
    d = str(tmp_path / "run")
    args = ["train.epochs=4", f"run.dir={d}"]
    p = start("largebatch.train", *args, cwd=REPO)
    try:
        _wait_for_checkpoint(d, [p])
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=HANG_S)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0 and "Traceback" not in err, err[-2000:]
    assert "largebatch: Ctrl-C: stopping after this step with a checkpoint; press Ctrl-C again to stop at once" in err
    stopped = _stopped_step(err)
    total = int(re.search(r"^  total steps +(\d+) ", err, re.M).group(1))
    assert 0 < stopped < total and "run the same command to resume" in err  # stopped mid-run...
    assert not os.path.exists(os.path.join(d, "checkpoints", "final.pt"))  # ...and not finished
    assert os.path.basename(ckpt.list_checkpoints(d)[0]) == f"step-{stopped:09d}.pt"
    r = run_module("largebatch.train", *args)
    assert r.returncode == 0 and resumed_at(r.stderr, stopped), r.stderr[-2000:]
    assert os.path.exists(os.path.join(d, "checkpoints", "final.pt"))


def test_ctrl_c_on_two_workers_and_their_loader_processes(tmp_path):
    """Each worker in its own process group, signalled as a group, as torchrun's agent does (and a
    terminal does to a single process): the loader processes get the signal too."""
    d = str(tmp_path / "run")
    port = free_port()
    procs = []
    for rank in range(2):
        procs.append(start("largebatch.train", "train.epochs=30", f"run.dir={d}", "data.num_workers=1",
                           "data.device_cache=off", cwd=REPO, env=worker_env(rank, 2, port), slot=rank,
                           new_session=True))
    try:
        _wait_for_checkpoint(d, procs)
        for p in procs:
            os.killpg(p.pid, signal.SIGINT)
        errs = [p.communicate(timeout=HANG_S)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for e in errs]
    assert "Traceback" not in errs[0] + errs[1]
    stopped = _stopped_step(errs[0])
    assert os.path.basename(ckpt.list_checkpoints(d)[0]) == f"step-{stopped:09d}.pt"
    assert errs[0].count("largebatch: Ctrl-C:") == 1 and "Ctrl-C" not in errs[1]  # rank 0 says it, once


def test_ctrl_c_under_torchrun_stops_the_workers_with_a_checkpoint(tmp_path):
    """torchrun's agent alone gets the terminal's Ctrl-C (its workers run in their own sessions); it
    forwards SIGINT to each worker's process group, waits for them, then raises its own
    SignalException (a traceback and status 1 from torchrun that the workers cannot prevent)."""
    d = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
           "largebatch.train", "train.epochs=30", f"run.dir={d}"]
    agent = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_checkpoint(d, [agent])
        agent.send_signal(signal.SIGINT)
        _, err = agent.communicate(timeout=HANG_S)
    finally:
        if agent.poll() is None:
            agent.kill()
    stopped = _stopped_step(err)
    assert os.path.basename(ckpt.list_checkpoints(d)[0]) == f"step-{stopped:09d}.pt"
    assert err.count("largebatch: Ctrl-C: stopping after this step with a checkpoint; torchrun kills workers") == 1


def _survives_sigint_in_a_fork(check) -> bool:
    """Fork, send the child SIGINT, and report whether it carried on and ``check()`` held there."""
    child = os.fork()
    if child == 0:
        code = 1
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)
            code = 0 if check() else 1
        finally:
            os._exit(code)
    return os.waitpid(child, 0)[1] == 0


def test_second_ctrl_c_interrupts_and_forked_processes_ignore_it(capfd):
    stop = StopSignal(announce=True)
    stop.install()
    try:
        assert _survives_sigint_in_a_fork(lambda: stop.received is None)  # a loader: the parent decides
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.received == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs here, at the latest
    finally:
        stop.uninstall()
    err = capfd.readouterr().err
    assert err.count("largebatch: Ctrl-C: stopping after this step with a checkpoint") == 1
    assert "press Ctrl-C again to stop at once, without that checkpoint (exit 130)" in err
    with InterruptGuard():  # set-up: Ctrl-C ends the process, but not the loaders forked meanwhile
        assert _survives_sigint_in_a_fork(lambda: True)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)


def test_rank_0_alone_announces_a_signal(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert StopSignal().announce is False
    monkeypatch.setenv("RANK", "0")
    assert StopSignal().announce is True
    monkeypatch.delenv("RANK")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")  # under torchrun a second Ctrl-C goes to the agent
    from largebatch.engine.guards import stop_message

    assert "--shutdown-timeout" in stop_message(signal.SIGINT) and "again" not in stop_message(signal.SIGINT)


# -- degenerate batch plans ------------------------------------------------------------------------

def test_tiny_micro_batch_warning_names_the_nearest_sensible_global_batches():
    p = plan(194, 2, 64)
    assert (p.micro_batch, p.accum_steps) == (1, 97)
    line = plan_warning(p, 64)
    assert "train.global_batch=194 on 2 worker(s), train.max_micro_batch=64" in line
    assert "97 micro-batch(es) of 1" in line and "below 8 images" in line
    assert line.endswith("train.global_batch=192 (micro-batch 48 x 2) or 196 (micro-batch 49 x 2)")
    assert nearest_sensible(194, 2, 64) == [192, 196]
    assert "below 8 images" in plan_warning(plan(2 * 134, 2, 64), 64)  # 134 = 2 x 67
    assert plan_warning(plan(4 * 138, 4, 64), 64) is None  # 138 = 46 x 3
    line = plan_warning(plan(4 * 87, 4, 64), 64)  # 87 = 29 x 3: below half the cap
    assert "below half of train.max_micro_batch (87 has no divisor from 32 to 64)" in line
    assert line.endswith("train.global_batch=344 (micro-batch 43 x 2) or 352 (micro-batch 44 x 2)")
    assert plan_warning(plan(128, 32), None).endswith("train.global_batch=256 (micro-batch 8 x 1)")
    for args in [(128, 1, None), (128, 2, None), (256, 4, 16), (1024, 8, 48), (32768, 512, None)]:
        assert plan_warning(plan(*args), args[2]) is None


def test_nearest_sensible_is_nearest_and_sensible():
    rng = random.Random(0)
    for _ in range(300):
        world, cap = rng.choice([1, 2, 3, 8]), rng.choice([None, 4, 16, 48, 64])
        g = world * rng.randint(1, 300)
        found = nearest_sensible(g, world, cap)
        assert all(is_sensible(x // world, cap) and x % world == 0 for x in found)
        above = found[-1]
        assert above > g and not any(is_sensible(q, cap) for q in range(g // world + 1, above // world))
        if len(found) == 2:
            assert found[0] < g and not any(is_sensible(q, cap) for q in range(found[0] // world + 1, g // world))
        else:
            assert not any(is_sensible(q, cap) for q in range(1, g // world))


def test_plan_cli_prints_the_warning_once():
    r = run_module("largebatch.plan", "--world-size", "2", "train.global_batch=194", "train.max_micro_batch=64",
                   "model.norm=none")  # with BatchNorm, training (and so the plan) refuses micro-batches of 1
    assert r.returncode == 0, r.stderr
    lines = [x for x in r.stderr.splitlines() if x.startswith("largebatch: warning:")]
    assert len(lines) == 1 and "192 (micro-batch 48 x 2) or 196 (micro-batch 49 x 2)" in lines[0]
    assert "micro-batch            1" in r.stdout
    r = run_module("largebatch.plan", "--world-size", "2")
    assert r.returncode == 0 and "warning" not in r.stderr


def test_micro_batch_of_one_with_batchnorm_is_refused():
    cfg = load_config(None, ["train.global_batch=194", "train.max_micro_batch=64", "model.name=mlp"])
    run_plan = make_run_plan(cfg, 2, 1438, announce=False)
    mlp = create_model("mlp", 10, in_channels=1, norm="batch", width=32, image_size=8)
    assert has_batchnorm(mlp) and not has_batchnorm(create_model("mlp", 10, in_channels=1, norm="none", width=32,
                                                                 image_size=8))
    with pytest.raises(UsageError) as e:
        check_trainable(run_plan, has_batchnorm(mlp))
    msg = str(e.value)
    assert "train.global_batch=194" in msg and "micro-batch(es) of 1" in msg and "BatchNorm" in msg
    assert "use train.global_batch=192 (micro-batch 48 x 2) or 196 (micro-batch 49 x 2), or model.norm=none" in msg
    check_trainable(run_plan, False)  # without BatchNorm it trains (with the warning)
    check_trainable(make_run_plan(load_config(None, []), 2, 1438), True)
    phased = load_config(None, ["train.epochs=2", "train.max_micro_batch=64",
                                "train.phases=[{epochs: 1}, {epochs: 1, global_batch: 194}]"])
    with pytest.raises(UsageError, match=r"phases\[1\].global_batch=194 .* use train.phases\[1\].global_batch=192"):
        check_trainable(make_run_plan(phased, 2, 1438, announce=False), True)


def test_two_workers_warn_once_about_a_tiny_micro_batch(tmp_path):
    results = launch_workers(2, "largebatch.train", "model.name=mlp", "model.norm=none", "train.global_batch=194",
                             "train.max_micro_batch=64", "train.epochs=1", "schedule.warmup_epochs=0",
                             f"run.dir={tmp_path}")
    assert [r.returncode for r in results] == [0, 0], results[0].stderr[-2000:]
    warnings = [x for x in results[0].stderr.splitlines() if x.startswith("largebatch: warning:")]
    assert len(warnings) == 1 and "nearest sensible: train.global_batch=192" in warnings[0]
    assert "warning" not in results[1].stderr


def test_two_workers_refuse_batchnorm_on_one_image_in_one_line(tmp_path):
    """The trainer calls check_trainable once the model is built."""
    results = launch_workers(2, "largebatch.train", "model.name=mlp", "train.global_batch=194",
                             "train.max_micro_batch=64", f"run.dir={tmp_path}", timeout=120)
    assert [r.returncode for r in results] == [2, 2], results[0].stderr[-2000:]
    assert "Traceback" not in results[0].stderr + results[1].stderr
    errors = [x for x in results[0].stderr.splitlines() if x.startswith("largebatch: error:")]
    assert len(errors) == 1 and "BatchNorm" in errors[0] and "train.global_batch=192" in errors[0]
    assert results[1].stderr.strip() == ""


# -- optimizer defaults and warmup -----------------------------------------------------------------

@pytest.mark.parametrize("name,per_256,scaling,published", [
    ("sgd", 0.2, "linear", (0.2, 256)),
    ("lars", 0.9375, "linear", (30.0, 8192)),
    ("larc", 0.9375, "linear", (30.0, 8192)),
    ("lamb", 0.04 / math.sqrt(128), "sqrt", (0.04, 32768)),
])
def test_each_optimizer_has_its_published_default_lr(name, per_256, scaling, published):
    cfg = load_config(None, [f"optim.name={name}"])
    assert cfg.optim.base_lr == pytest.approx(per_256) and cfg.optim.scaling == scaling
    # at the published batch the peak is the published lr, whatever base_batch the lr is quoted for
    lr, batch = published
    for base_batch in (256, 1024):
        c = load_config(None, [f"optim.name={name}", f"optim.base_batch={base_batch}", f"train.global_batch={batch}"])
        run_plan = make_run_plan(c, 8, 10 * batch, announce=False)
        assert run_plan.schedule.peak_lr == pytest.approx(lr)
    line = next(x for x in run_plan.lines() if x.startswith("scaled lr (peak)"))
    assert f"the {name} default" in line and f"{scaling} scaling" in line
    # an explicit base_lr is used as given, and the plan says where it came from
    c = load_config(None, [f"optim.name={name}", "optim.base_lr=0.5"])
    assert c.optim.base_lr == 0.5
    line = next(x for x in make_run_plan(c, 1, 1438).lines() if x.startswith("scaled lr (peak)"))
    assert "base lr 0.5 per 256 images: optim.base_lr" in line


def test_lamb_default_follows_an_explicit_scaling_rule():
    cfg = load_config(None, ["optim.name=lamb", "optim.scaling=linear"])
    assert cfg.optim.base_lr == pytest.approx(0.04 * 256 / 32768)
    assert load_config(None, ["optim.name=lars", "optim.scaling=none"]).optim.base_lr == 30.0
    lamb = load_config(None, ["optim.name=lamb", "optim.base_lr=null"]).optim
    assert lamb.base_lr == pytest.approx(0.04 / math.sqrt(128))
    with pytest.raises(UsageError, match="optim.base_lr=-1.0 is not allowed"):
        load_config(None, ["optim.base_lr=-1"])


def test_warmup_as_long_as_the_run_warns_once(capsys):
    assert warmup_warning(2, 2, 22, 22).startswith("schedule.warmup_epochs=2 is not shorter than the run "
                                                    "(train.epochs=2, 22 steps)")
    assert warmup_warning(3, 2, 22, 22) is not None and warmup_warning(1.95, 2, 22, 22) is not None
    assert warmup_warning(1, 2, 11, 22) is None and warmup_warning(0, 1, 0, 11) is None
    make_run_plan(load_config(None, ["train.epochs=2"]), 1, 1438, announce=True)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("largebatch: warning: schedule.warmup_epochs=2 is not shorter")
    assert "lower schedule.warmup_epochs (e.g. 0.2" in err[0]
    make_run_plan(load_config(None, ["train.epochs=5"]), 1, 1438, announce=True)  # rounding: 2 of 5 epochs
    make_run_plan(load_config(None, ["train.epochs=2", "schedule.warmup_epochs=2"]), 1, 1438, announce=False)
    assert capsys.readouterr().err == ""


# -- data ------------------------------------------------------------------------------------------

def _train_only(tmp_path, per_class=12):
    root = make_tree(tmp_path / "tree", per_class=(per_class, 1))
    shutil.rmtree(os.path.join(root, "val"))
    return root


def test_train_only_folder_is_split_fixed_and_stratified(tmp_path, capsys):
    root = _train_only(tmp_path)
    cfg = load_config(None, ["data.name=imagefolder", f"data.root={root}", "data.augment=crop_flip",
                             "data.val_fraction=0.25"])
    train, val, info = build_datasets(cfg.data, seed=1)
    assert (info.num_train, info.num_val, info.classes) == (27, 9, ("cat", "dog", "eel"))
    assert [y for _, y in val.samples] == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # stratified: 3 of 12 per class
    assert not {p for p, _ in val.samples} & {p for p, _ in train.samples}
    err = capsys.readouterr().err
    assert err.count("largebatch: warning:") == 1
    assert f"'{root}' has no val/ folder: holding out 9 of its 36 train/ images" in err
    # the same split for another seed, without the warning where verbose=False (ranks other than 0)
    train2, val2, _ = build_datasets(cfg.data, seed=7, verbose=False)
    assert val2.samples == val.samples and train2.samples == train.samples
    assert capsys.readouterr().err == ""
    # the training images are augmented; the held-out ones never are
    assert train.augment is not None and val.augment is None
    assert torch.equal(val.__getitems__(Request([0, 1], epoch=3)).images, val.__getitems__([0, 1]).images)
    # the decoded cache gives the same split
    cached, held, _ = build_datasets(load_config(None, ["data.name=imagefolder", f"data.root={root}",
                                                        "data.val_fraction=0.25", "data.cache=true"]).data)
    assert (len(cached), len(held)) == (27, 9)
    assert torch.equal(held.__getitems__(list(range(9))).images, val.__getitems__(list(range(9))).images)


def test_split_needs_two_images_in_some_class(tmp_path):
    root = _train_only(tmp_path, per_class=1)
    with pytest.raises(UsageError, match="no val/ folder and too few images per class"):
        build_datasets(load_config(None, ["data.name=imagefolder", f"data.root={root}"]).data)


def test_two_workers_train_on_a_train_only_folder(tmp_path):
    root = _train_only(tmp_path)
    results = launch_workers(2, "largebatch.train", "data.name=imagefolder", f"data.root={root}",
                             "train.global_batch=16", "train.epochs=1", "schedule.warmup_epochs=0",
                             f"run.dir={tmp_path / 'run'}")
    assert [r.returncode for r in results] == [0, 0], results[0].stderr[-2000:]
    assert results[0].stderr.count("has no val/ folder: holding out 6 of its 36 train/ images") == 1
    assert "warning" not in results[1].stderr


def test_data_root_that_is_a_file_says_what_it_is(tmp_path):
    f = tmp_path / "images.txt"
    f.write_text("x")
    with pytest.raises(UsageError, match=rf"^'{re.escape(str(f))}' is a file; point data.root at the folder "
                                         r"holding train/ \(and val/\)$"):
        build_datasets(load_config(None, ["data.name=imagefolder", f"data.root={f}"]).data)
    with pytest.raises(UsageError, match=rf"^'{re.escape(str(f))}' is a file; point data.root at the extracted "
                                         "cifar-10-batches-py folder or its parent$"):
        build_datasets(load_config(None, ["data.name=cifar10", f"data.root={f}"]).data)
    archive = tmp_path / "cifar-100-python.tar.gz"
    archive.write_bytes(b"\x1f\x8b")
    with pytest.raises(UsageError, match=r"is a file \(an archive\); extract it .* cifar-100-python folder"):
        build_datasets(load_config(None, ["data.name=cifar100", f"data.root={archive}"]).data)
    with pytest.raises(UsageError, match="is not a largebatch packed file"):
        build_datasets(load_config(None, ["data.name=packed", f"data.root={f}"]).data)
    tree = make_tree(tmp_path / "tree", per_class=(2, 1))
    with pytest.raises(UsageError, match="is a folder, not a packed file"):
        build_datasets(load_config(None, ["data.name=packed", f"data.root={tree}"]).data)
    cifar = make_cifar(tmp_path / "c")
    batches = os.path.join(cifar, "cifar-10-batches-py")
    with pytest.raises(UsageError, match=re.escape(f"data.root '{batches}' has no 'train'")):
        build_datasets(load_config(None, ["data.name=imagefolder", f"data.root={batches}"]).data)
    with pytest.raises(UsageError, match=r"or point data.root at '.*tree'$"):
        build_datasets(load_config(None, ["data.name=imagefolder", f"data.root={os.path.join(tree, 'train')}"]).data)
    r = run_module("largebatch.train", "data.name=imagefolder", f"data.root={f}", f"run.dir={tmp_path / 'run'}")
    assert r.returncode == 2 and r.stderr.strip() == (f"largebatch: error: '{f}' is a file; point data.root at the "
                                                      "folder holding train/ (and val/)")
