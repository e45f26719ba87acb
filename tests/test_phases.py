"""Progressive resizing and batch-size phases (train.phases): the plan per phase, the schedule over
phases, the printed plan, training across phase boundaries and resuming across one."""

import json
import os

import pytest
import torch

from conftest import launch_workers, load_weights, run_module
from largebatch.config import load_config
from largebatch.engine import checkpoint as ckpt
from largebatch.engine import make_run_plan
from largebatch.errors import UsageError
from largebatch.optim.schedule import build_schedule
from largebatch.plan import main as plan_main

PHASES = ("train.phases=[{epochs: 2, image_size: 64, global_batch: 1024}, "
          "{epochs: 3, image_size: 128, global_batch: 512}]")


def test_each_phase_gets_its_own_batch_plan_and_lr():
    cfg = load_config(None, [PHASES, "train.epochs=5", "train.max_micro_batch=128", "optim.base_lr=0.1",
                             "schedule.warmup_epochs=1", "schedule.decay=step", "schedule.milestones=[3]"])
    p = make_run_plan(cfg, 4, 10000)
    a, b = p.phases
    assert (a.batch.per_worker_batch, a.batch.micro_batch, a.batch.accum_steps, a.steps_per_epoch) == (256, 128, 2, 9)
    assert (b.batch.per_worker_batch, b.batch.micro_batch, b.batch.accum_steps, b.steps_per_epoch) == (128, 128, 1, 19)
    assert (a.image_size, b.image_size, p.eval_size) == (64, 128, 128)
    assert (a.first_step, b.first_step, p.total_steps) == (0, 18, 18 + 57)
    assert a.peak_lr == pytest.approx(0.4) and b.peak_lr == pytest.approx(0.2)
    # a step maps to (phase, epoch, step in the epoch), which is all a checkpoint needs to store
    assert [(ph.index, e, s) for ph, e, s in map(p.locate, (0, 17, 18, 36, 37, 74, 75))] == \
        [(0, 0, 0), (0, 1, 8), (1, 2, 0), (1, 2, 18), (1, 3, 0), (1, 4, 18), (1, 5, 0)]
    assert p.images_before(20) == 18 * 1024 + 2 * 512
    s = p.schedule
    assert s.warmup_steps == 9 and s.milestones == (18 + 19,)  # epoch quantities rounded inside their phase
    assert s(0) == pytest.approx(0.1) and s(9) == pytest.approx(0.4)  # warmup from base_lr to phase 1's peak
    assert s(17) == pytest.approx(0.4) and s(18) == pytest.approx(0.2)  # the peak follows the batch
    assert s(36) == pytest.approx(0.2) and s(37) == pytest.approx(0.02)  # step decay at epoch 3
    with pytest.raises(UsageError, match=r"fewer than one global batch \(train.phases\[0\].global_batch=1024\)"):
        make_run_plan(cfg, 4, 1000)


def test_schedule_follows_epochs_not_steps():
    """Cosine over phases of different batches: the lr at a given fraction of the data is the
    one-phase cosine at that fraction, scaled by the phase's peak."""
    args = ["optim.base_lr=0.1", "optim.base_batch=256", "schedule.warmup_epochs=0", "schedule.decay=cosine"]
    one = load_config(None, args + ["train.epochs=4", "train.global_batch=256"])
    two = load_config(None, args + ["train.epochs=4",
                                    "train.phases=[{epochs: 2, global_batch: 256}, {epochs: 2, global_batch: 512}]"])
    flat = make_run_plan(one, 1, 5120).schedule     # 20 steps per epoch throughout
    phased = make_run_plan(two, 1, 5120).schedule   # 20, then 10 steps per epoch
    assert phased.total_steps == 60
    for step in range(40):  # phase 1: the same as the one-phase run
        assert phased(step) == pytest.approx(flat(step), abs=1e-12)
    for k in range(20):  # phase 2: step 40 + k has seen 2 + k/10 epochs, as step 40 + 2k of the flat run
        assert phased(40 + k) == pytest.approx(2 * flat(40 + 2 * k), abs=1e-12)


def test_without_phases_the_schedule_is_unchanged():
    cfg = load_config(None, ["train.epochs=7", "schedule.warmup_epochs=1.5"])
    p = make_run_plan(cfg, 2, 1438)
    s = build_schedule(cfg.optim, cfg.schedule, 128, 11, 7)
    assert p.schedule == s and not p.phased and len(p.phases) == 1 and p.eval_size is None


@pytest.mark.parametrize("override,message", [
    ("train.phases=[{epochs: 2}]", "train.phases=[{'epochs': 2}] is not allowed: their epochs add up to 2 but "
                                   "train.epochs=30; make them agree"),
    ("train.phases=[{epochs: 30, size: 64}]",
     "unknown key(s) ['size']; a phase takes epochs, image_size, global_batch"),
    ("train.phases=[{epochs: 30, image_size: 4}]", "train.phases[0].image_size=4 is not allowed"),
    ("train.phases=[{epochs: 30, global_batch: 0}]", "train.phases[0].global_batch=0 is not allowed"),
    ("train.phases=[{image_size: 64}]", "train.phases[0].epochs=None is not allowed"),
    ("train.phases=[64]", "train.phases[0]=64 is not allowed: use a mapping"),
])
def test_bad_phases_are_refused(override, message):
    with pytest.raises(UsageError) as e:
        load_config(None, [override])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_plan_cli_prints_the_phases(capsys):
    assert plan_main(["--world-size", "8", PHASES, "train.epochs=5", "data.train_samples=1281167",
                      "data.image_size=224", "train.max_micro_batch=64"]) == 0
    out = capsys.readouterr().out
    assert "phases                 2  (validation at 128 px" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("  ")]
    assert rows[0][:4] == ["phase", "epochs", "image", "global"]
    assert rows[1] == ["1", "1-2", "64", "1024", "128", "64", "2", "0.8", "1251", "2502"]
    assert rows[2] == ["2", "3-5", "128", "512", "64", "64", "1", "0.4", "2502", "7506"]
    assert "total steps            10008  (5 epochs)" in out


BASE = ["data.name=synthetic", "data.num_samples=1024", "data.num_classes=4", "data.image_size=12", "model.width=16",
        "train.epochs=3", "checkpoint.at_epoch_end=false", "checkpoint.every_steps=7",
        "train.phases=[{epochs: 1, image_size: 8, global_batch: 64}, {epochs: 2, global_batch: 128}]"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("phases") / "run")
    results = launch_workers(2, "largebatch.train", *BASE, f"run.dir={d}")
    assert [r.returncode for r in results] == [0, 0], results[0].stderr[-2000:]
    return d, results[0].stderr


def _metrics(run_dir):
    drop = ("samples_per_sec", "elapsed_s", "startup_s", "first_step_s", "build_s", "compile_s")
    lines = open(os.path.join(run_dir, "metrics.jsonl"))
    return [{k: v for k, v in json.loads(x).items() if k not in drop} for x in lines]


def test_phases_change_the_batch_and_image_size(uninterrupted):
    d, stderr = uninterrupted
    assert ("phase 1/2 (epoch 1): images at 8 px, global batch 64 = 2 x 32 per worker, micro-batch 32 x 1 "
            "accumulation step(s), peak lr 0.05, 16 steps per epoch") in stderr
    assert "phase 2/2 (epochs 2-3): images at 12 px, global batch 128 = 2 x 64 per worker" in stderr
    order = [stderr.index(text) for text in ("phase 1/2", "epoch   1/3", "phase 2/2", "epoch   2/3")]
    assert order == sorted(order)
    epochs = [x for x in _metrics(d) if x["event"] == "epoch"]
    assert [(e["step"], e["global_batch"], e["image_size"]) for e in epochs] == \
        [(16, 64, 8), (24, 128, 12), (32, 128, 12)]
    summary = _metrics(d)[-1]
    assert summary["steps"] == 32 and summary["global_batch"] == 128 and summary["val_acc"] > 0.4  # chance: 0.25


def test_resume_across_a_phase_boundary_is_exact(uninterrupted, tmp_path):
    ref, _ = uninterrupted
    d = str(tmp_path / "run")
    # Both workers die at the start of step 18, in phase 2; the newest checkpoint is step 14, in phase 1.
    first = launch_workers(2, "largebatch.train", *BASE, f"run.dir={d}",
                           env={"LARGEBATCH_FAULT": "exit@18:0,exit@18:1"})
    assert [r.returncode for r in first] == [137, 137]
    assert os.path.basename(ckpt.list_checkpoints(d)[0]) == "step-000000014.pt"
    second = launch_workers(2, "largebatch.train", *BASE, f"run.dir={d}")
    assert [r.returncode for r in second] == [0, 0], second[0].stderr[-2000:]
    assert "resuming from" in second[0].stderr and "at epoch 1, step 14" in second[0].stderr
    wa, wb = load_weights(ref), load_weights(d)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert _metrics(ref) == _metrics(d)


def test_phases_refuse_what_cannot_work(tmp_path):
    from largebatch.distributed import SINGLE
    from largebatch.engine import Trainer

    cfg = load_config(None, ["model.name=mlp", "train.epochs=2", f"run.dir={tmp_path / 'a'}",
                             "train.phases=[{epochs: 1, image_size: 8}, {epochs: 1, image_size: 12}]"])
    with pytest.raises(UsageError, match=r"model.name=mlp takes images of one size, and train.phases use \[8, 12\]"):
        Trainer(cfg, SINGLE)


def test_report_rebuilds_the_phased_schedule(tmp_path):
    from largebatch import report

    d = str(tmp_path / "run")
    r = run_module("largebatch.train", "train.epochs=3", "train.log_every_steps=1", "schedule.warmup_epochs=1",
                   "train.phases=[{epochs: 1, global_batch: 64}, {epochs: 2, global_batch: 256}]", f"run.dir={d}")
    assert r.returncode == 0, r.stderr[-2000:]
    run = report.load_run(d)
    xs, ys = report.lr_curve(run)
    assert len(xs) == run.epochs[-1]["step"] == 22 + 2 * 5  # 1,437 digits: 22 steps at 64, 5 at 256
    for line in run.steps:  # a step line carries the lr of the step it ends
        assert ys[line["step"] - 1] == pytest.approx(line["lr"], rel=1e-12)
