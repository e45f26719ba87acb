"""The adaptive global batch: the pure decision, its schedule, mid-epoch sampling, the plan's
refusals, and real runs: 1 against 2 workers, exact resume across a batch change."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from checks import max_abs_diff
from conftest import REPO, _env, launch_workers, load_weights, run_module, start
from largebatch.batching import plan
from largebatch.config import load_config
from largebatch.data.sampler import MicroBatchSampler, epoch_permutation
from largebatch.engine import checkpoint as ckpt
from largebatch.engine.adaptive import AdaptiveBatch, adaptive_plan
from largebatch.engine.noise import NoiseScale
from largebatch.errors import UsageError
from largebatch.goodput import StepTime, adascale_gain, decide, efficiency, ladder
from largebatch.optim.schedule import ProgressSchedule, build_schedule
from largebatch.scaling.model import Workload
from largebatch.scaling.predict import PresetStepTime, predict_step, preset_step_time
from largebatch.scaling.presets import PRESETS

# ---------------------------------------------------------------------------------------------
# the pure decision


def test_efficiency_and_adascale_gain_follow_their_formulas():
    assert efficiency(64, 0.0, 64) == 1.0
    assert efficiency(256, 0.0, 64) == pytest.approx(0.25)  # no noise: extra images are wasted
    assert efficiency(256, 1e12, 64) == pytest.approx(1.0)  # noise only: every image counts
    assert efficiency(256, 100.0, 64) == pytest.approx(164 / 356)
    # AdaScale's gain (σ² + |G|²) / (σ²/s + |G|²) with σ² = tr(Σ)/B0, B_crit = tr(Σ)/|G|²
    trace, g2, b0, b = 3.0, 0.02, 32, 512
    s = b / b0
    assert adascale_gain(b, trace / g2, b0) == pytest.approx((trace / b0 + g2) / (trace / b0 / s + g2))
    assert 1.0 <= adascale_gain(b, 150.0, b0) <= s
    with pytest.raises(ValueError):
        efficiency(0, 10.0, 32)


def test_ladder_doubles_from_min_to_max():
    assert ladder(64, 1024) == [64, 128, 256, 512, 1024]
    assert ladder(48, 400) == [48, 96, 192, 384]
    with pytest.raises(ValueError):
        ladder(128, 64)


@pytest.mark.parametrize("b_crit", [5.0, 60.0, 300.0, 4000.0])
@pytest.mark.parametrize("fixed", [0.0, 0.01, 0.2])
def test_the_decision_is_the_batch_that_reaches_the_target_soonest(b_crit, fixed):
    """Largest goodput = smallest S(B) T(B) = S_min (1 + B_crit/B) T(B) (McCandlish et al.)."""
    batches = ladder(32, 4096)
    step_time = StepTime(fixed_s=fixed, per_micro_batch_s=0.003, micro_batch=32, workers=4)
    d = decide(batches, 32, b_crit, step_time, min_gain=0.0)
    soonest = min(batches, key=lambda b: (1 + b_crit / b) * step_time(b))
    assert d.global_batch == soonest
    assert [c.global_batch for c in d.candidates] == batches
    for c in d.candidates:
        assert c.goodput == pytest.approx(c.global_batch / step_time(c.global_batch) * efficiency(c.global_batch, b_crit, 32))


def test_compute_bound_steps_keep_the_smallest_batch_and_a_fixed_cost_moves_it_up():
    compute_bound = StepTime(fixed_s=0.0, per_micro_batch_s=0.01, micro_batch=16, workers=2)
    assert decide([32, 64, 128], 32, 500.0, compute_bound).global_batch == 32
    assert decide([32, 64, 128], 128, 500.0, compute_bound).global_batch == 32  # it also comes back down
    latency_bound = StepTime(fixed_s=1.0, per_micro_batch_s=0.01, micro_batch=16, workers=2)
    assert decide([32, 64, 128], 32, 500.0, latency_bound).global_batch == 128
    assert decide([32, 64, 128], 32, 0.0, latency_bound).global_batch == 32  # no noise: no gain from images


def test_a_small_gain_keeps_the_current_batch_and_no_estimate_keeps_it_too():
    step_time = StepTime(fixed_s=0.05, per_micro_batch_s=0.01, micro_batch=16, workers=1)
    # find a B_crit where 64 is only just better than 32
    for b_crit in [x / 10 for x in range(10, 2000)]:
        rows = decide([32, 64], 32, b_crit, step_time, min_gain=0.0).candidates
        gain = rows[1].goodput / rows[0].goodput - 1
        if 0.0 < gain < 0.02:
            break
    else:
        pytest.fail("no B_crit with a gain below 2%")
    assert decide([32, 64], 32, b_crit, step_time, min_gain=0.0).global_batch == 64
    assert decide([32, 64], 32, b_crit, step_time, min_gain=0.02).global_batch == 32
    kept = decide([32, 64], 64, None, step_time)
    assert kept.global_batch == 64 and not kept.changed and kept.candidates == () and "no noise-scale" in kept.reason


def test_the_preset_step_time_is_the_simulators_step():
    t = preset_step_time("goyal2017", 32, 16)
    assert isinstance(t, PresetStepTime) and t.source == "preset goyal2017 at 32 workers"
    w, cluster = PRESETS["goyal2017"].workload, PRESETS["goyal2017"].cluster
    for batch, micro, accum in [(32, 1, 1), (512, 16, 1), (2048, 16, 4)]:
        work = Workload(**{**w.__dict__, "compute_time": w.compute_time * micro / w.micro_batch, "micro_batch": micro,
                           "accumulation_steps": accum})
        assert t(batch) == pytest.approx(predict_step(cluster, work, 32).step_time)
    with pytest.raises(UsageError, match="preset:goyal2017"):
        preset_step_time("nosuch", None, 16)
    with pytest.raises(UsageError, match="whole nodes"):
        preset_step_time("goyal2017", 12, 16)


# ---------------------------------------------------------------------------------------------
# the schedule


def test_the_progress_schedule_is_the_step_schedule_where_the_batch_does_not_change():
    cfg = load_config(None, ["optim.name=lars", "schedule.warmup_epochs=2", "schedule.decay=cosine"])
    n, batch, epochs = 1024, 64, 6
    steps = build_schedule(cfg.optim, cfg.schedule, batch, n // batch, epochs)
    from largebatch.optim.schedule import build_progress_schedule
    progress = build_progress_schedule(cfg.optim, cfg.schedule, epochs, steps.peak_lr)
    for s in range(steps.total_steps):
        assert progress(s * batch / n, steps.peak_lr) == pytest.approx(steps(s), rel=1e-12, abs=1e-15)
    # a batch change moves the lr to the new peak at the same point of the shape
    t = 3.0
    assert progress(t, 2 * steps.peak_lr) == pytest.approx(2 * progress(t, steps.peak_lr))
    step_decay = ProgressSchedule(epochs=10, decay="step", milestones=(4.0, 8.0), gamma=0.1)
    assert [step_decay(t, 1.0) for t in (3.9, 4.0, 8.5)] == pytest.approx([1.0, 0.1, 0.01])


# ---------------------------------------------------------------------------------------------
# mid-epoch sampling


@pytest.mark.parametrize("world", [1, 2, 4])
def test_a_batch_change_mid_epoch_covers_every_image_of_the_epoch_once(world):
    n, seed, epoch, micro = 1024, 3, 5, 16
    samplers = [MicroBatchSampler(n, plan(64, world, micro), rank, seed, epoch) for rank in range(world)]
    seen, images_in_epoch = [], 0
    for batch, steps in [(64, 3), (256, 2), (128, 1)]:  # 192 + 512 + 128 images
        for s in samplers:
            s.set_phase(plan(batch, world, micro))
            s.set_epoch(epoch, start_image=images_in_epoch)
        iters = [iter(s) for s in samplers]
        for _ in range(steps):
            step = []
            for it, s in zip(iters, samplers):
                for _ in range(s.plan.accum_steps):
                    step += list(next(it))
            assert len(step) == batch
            seen += step
        images_in_epoch += batch * steps
    for s in samplers:  # the rest of the epoch at 64: 192 images, 3 steps
        s.set_phase(plan(64, world, micro))
        s.set_epoch(epoch, start_image=images_in_epoch)
        assert s.steps_left() == 3
    rest = [i for s in samplers for req in s for i in req]
    seen += rest
    assert sorted(seen) == list(range(n))  # each image exactly once
    # and in the permutation's order: the global batches are the same whatever the world size
    assert sorted(seen[:192]) == sorted(epoch_permutation(n, seed, epoch)[:192].tolist())


def test_the_epoch_ends_where_fewer_than_a_global_batch_of_images_are_left():
    s = MicroBatchSampler(1000, plan(128, 1, 32), 0, 0, 0)
    s.set_epoch(0, start_image=900)
    assert s.steps_left() == 0 and list(s) == []
    s.set_epoch(0, start_image=872)
    assert s.steps_left() == 1 and len(list(s)) == 4


# ---------------------------------------------------------------------------------------------
# the plan


def _plan(world, *overrides, num_train=1438):
    return adaptive_plan(load_config(None, ["adaptive.enabled=true", *overrides]), world, num_train)


def test_the_plan_takes_the_range_and_defaults_from_the_config():
    p = _plan(2, "train.max_micro_batch=16", "train.global_batch=64")
    assert p.sizes == [64, 128, 256, 512, 1024] and p.micro_batch == 16  # up to 32x, within the training set
    assert all(b.micro_batch == 16 and b.per_worker_batch * 2 == b.global_batch for b in p.batches)
    assert _plan(4, "train.max_micro_batch=8", "adaptive.min_batch=32", "adaptive.max_batch=200").sizes == [32, 64, 128]


@pytest.mark.parametrize("world, overrides, words", [
    (2, ["train.max_micro_batch=16", "adaptive.min_batch=48"],
     "2 worker(s) cannot split adaptive.min_batch=48 into micro-batches of train.max_micro_batch=16: every global "
     "batch must be a multiple of 2 x 16 = 32; use adaptive.min_batch=64 or 32"),
    (1, ["train.max_micro_batch=16", "adaptive.min_batch=16"], "use adaptive.min_batch=32"),
    (2, ["adaptive.min_batch=64"], "set train.max_micro_batch"),
    (2, ["train.max_micro_batch=16", "adaptive.min_batch=64", "adaptive.max_batch=100"], "at least 128"),
    (2, ["train.max_micro_batch=16", "adaptive.min_batch=64", "adaptive.max_batch=4096"], "training set's 1438"),
    (2, ["train.max_micro_batch=16", "train.epochs=2", "train.phases=[{epochs: 2}]"], "remove train.phases"),
    (2, ["train.max_micro_batch=16", "adaptive.time_model=preset:nosuch"], "names no preset"),
])
def test_a_range_the_run_cannot_train_is_refused_in_one_line(world, overrides, words):
    with pytest.raises(UsageError) as info:
        _plan(world, *overrides)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_the_controller_keeps_its_state_and_decides_from_rank_0s_sums():
    p = _plan(1, "train.max_micro_batch=16", "train.global_batch=32", "adaptive.every_steps=5")
    noise = NoiseScale()
    small, large = torch.tensor(2.0), torch.tensor(1.5)  # |G|² 1, tr(Σ) 16
    for _ in range(10):
        noise.update(small, large, 16, 32)
    slow_sync = StepTime(fixed_s=5.0, per_micro_batch_s=0.01, micro_batch=16, workers=1)
    c = AdaptiveBatch(p, noise, lambda t: t, slow_sync)
    assert c.batch == 32 and not c.due(0) and c.due(5) and not c.due(7)
    decision, scale = c.decide(5)
    assert scale == pytest.approx(noise.values().noise_scale) and decision.b_crit == pytest.approx(scale)
    assert c.batch == decision.global_batch > 32 and not c.due(5)
    again = AdaptiveBatch(p, noise, lambda t: t, slow_sync, c.state_dict())
    assert again.state_dict() == c.state_dict()
    assert again.lr(1, 100) == c.lr(1, 100)


# ---------------------------------------------------------------------------------------------
# real runs

# The MLP without BatchNorm keeps 1 and 2 workers within rounding (tests/test_training.py).
ADAPTIVE = ["model.name=mlp", "model.norm=none", "adaptive.enabled=true", "train.max_micro_batch=8", "train.global_batch=32", "adaptive.every_steps=10",
            "adaptive.time_model=preset:goyal2017", "adaptive.preset_workers=32", "train.epochs=4",
            "checkpoint.every_steps=3"]


def _decisions(run_dir):
    rows = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl"))]
    return [(r["step"], r["epoch"], r["images_in_epoch"], r["previous"], r["global_batch"]) for r in rows
            if r["event"] == "batch"]


@pytest.fixture(scope="module")
def adaptive_2w(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("adaptive") / "run")
    results = launch_workers(2, "largebatch.train", *ADAPTIVE, f"run.dir={d}")
    assert [r.returncode for r in results] == [0, 0], results[0].stderr[-3000:]
    return d, results[0].stderr


def test_the_batch_changes_mid_epoch_and_the_run_says_why(adaptive_2w):
    d, err = adaptive_2w
    decisions = _decisions(d)
    assert decisions[0][:3] == (10, 1, 320)  # after step 10 of epoch 1: 320 of its images trained
    changes = [x for x in decisions if x[3] != x[4]]
    assert changes and changes[0][0] == 10 and changes[0][4] > 32, decisions
    assert f"step 10: global batch 32 -> {changes[0][4]}" in err
    summary = [json.loads(x) for x in open(os.path.join(d, "metrics.jsonl"))][-1]
    assert summary["batch_changes"] == len(changes) and summary["global_batch"] == decisions[-1][4]
    epochs = [json.loads(x) for x in open(os.path.join(d, "metrics.jsonl")) if '"epoch"' in x and '"val_acc"' in x]
    assert all(e["noise_scale"] > 0 and "global_batch" in e for e in epochs)
    # images: 320 at 32, then the rest of the epoch at the new batch (remainder dropped)
    b = changes[0][4]
    assert epochs[0]["step"] == 10 + (1438 - 320) // b


def test_one_two_and_four_workers_take_the_same_decisions_and_end_with_the_same_weights(adaptive_2w, tmp_path):
    """The estimate comes from the same 8 images on any world: 4 micro-batches on one worker, 2 on
    each of 2 (the first one), 1 on each of 4 (the gradient before the allreduce)."""
    d2, _ = adaptive_2w
    d1, d4 = str(tmp_path / "one"), str(tmp_path / "four")
    r = run_module("largebatch.train", *ADAPTIVE, f"run.dir={d1}")
    assert r.returncode == 0, r.stderr[-3000:]
    results = launch_workers(4, "largebatch.train", *ADAPTIVE, f"run.dir={d4}")
    assert [x.returncode for x in results] == [0] * 4, results[0].stderr[-3000:]
    assert _decisions(d1) == _decisions(d2) == _decisions(d4)
    assert max_abs_diff(load_weights(d1), load_weights(d2)) <= 1e-4
    assert max_abs_diff(load_weights(d1), load_weights(d4)) <= 1e-4


def test_a_worker_sigkilled_under_torchrun_restarts_and_ends_bit_identical(adaptive_2w, tmp_path):
    d2, _ = adaptive_2w
    d = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=1",
           "-m", "largebatch.train", *ADAPTIVE, "comm.timeout_s=30", f"run.dir={d}"]
    slow = {"LARGEBATCH_FAULT": ",".join(f"sleep@{s}:1:0.15" for s in range(40))}  # so that the kill lands mid-run
    agent = subprocess.Popen(cmd, env=_env(slow), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not ckpt.list_checkpoints(d) and time.time() < deadline:
            time.sleep(0.05)
        assert ckpt.list_checkpoints(d), "no checkpoint appeared"
        workers = [int(p.split("/")[2]) for p in glob.glob("/proc/[0-9]*/stat") if _parent(p) == agent.pid]
        assert len(workers) == 2
        os.kill(max(workers), signal.SIGKILL)
        out, err = agent.communicate(timeout=240)
    finally:
        if agent.poll() is None:
            agent.kill()
    assert agent.returncode == 0 and "resuming from" in err, err[-3000:]
    weights, reference = load_weights(d), load_weights(d2)
    assert all(torch.equal(weights[k], reference[k]) for k in reference)
    assert _decisions(d) == _decisions(d2)


def _parent(stat_path):
    try:
        return int(open(stat_path).read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _layout(run_dir):
    """(the first change's step, the steps that end an epoch, the last step) of a finished run."""
    rows = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl"))]
    change = next(r["step"] for r in rows if r["event"] == "batch" and r["changed"])
    ends = [r["step"] for r in rows if r["event"] == "epoch"]
    return change, ends, ends[-1]


def _stop_and_resume(tmp_path, fault_step):
    """Both workers die at the start of step ``fault_step`` (``fault_step`` steps done, the
    checkpoint of that step, if any, written); returns the run folder, the newest
    checkpoint's state, and the resumed run's stderr."""
    d = str(tmp_path / "run")
    first = launch_workers(2, "largebatch.train", *ADAPTIVE, f"run.dir={d}",
                           env={"LARGEBATCH_FAULT": f"exit@{fault_step}:0,exit@{fault_step}:1"})
    assert [r.returncode for r in first] == [137, 137]
    state = torch.load(ckpt.list_checkpoints(d)[0], weights_only=False)
    second = launch_workers(2, "largebatch.train", *ADAPTIVE, f"run.dir={d}")
    assert [r.returncode for r in second] == [0, 0], second[0].stderr[-3000:]
    assert "resuming from" in second[0].stderr
    return d, state, second[0].stderr


def test_stopped_and_resumed_across_a_batch_change_is_bit_identical(adaptive_2w, tmp_path):
    d2, _ = adaptive_2w
    change, ends, _ = _layout(d2)
    d, state, _ = _stop_and_resume(tmp_path, change)  # dies after the decision; its newest checkpoint is before it
    assert state["position"]["step"] < change and state["adaptive"]["global_batch"] == 32
    weights, reference = load_weights(d), load_weights(d2)
    assert all(torch.equal(weights[k], reference[k]) for k in reference)
    assert _decisions(d) == _decisions(d2)


def test_a_checkpoint_after_the_change_in_mid_epoch_resumes_at_the_new_batch(adaptive_2w, tmp_path):
    d2, _ = adaptive_2w
    change, ends, last = _layout(d2)
    inside = [s for s in range(3, last, 3) if s > change and s not in ends]
    assert inside, (change, ends)  # a checkpoint (every 3 steps) strictly inside an epoch after the change
    d, state, _ = _stop_and_resume(tmp_path, inside[0])  # dies at the start of the step after it
    assert state["position"]["step"] == inside[0] and state["adaptive"]["global_batch"] > 32
    assert state["position"]["images_in_epoch"] > 0
    weights, reference = load_weights(d), load_weights(d2)
    assert all(torch.equal(weights[k], reference[k]) for k in reference)
    assert _decisions(d) == _decisions(d2)


def test_a_range_two_workers_cannot_split_stops_both_in_one_line(tmp_path):
    results = launch_workers(2, "largebatch.train", "adaptive.enabled=true", "train.max_micro_batch=16",
                             "adaptive.min_batch=48", f"run.dir={tmp_path / 'run'}")
    assert [r.returncode for r in results] == [2, 2]
    lines = [ln for ln in results[0].stderr.splitlines() if ln.strip()]
    assert lines == ["largebatch: error: 2 worker(s) cannot split adaptive.min_batch=48 into micro-batches of "
                     "train.max_micro_batch=16: every global batch must be a multiple of 2 x 16 = 32; use "
                     "adaptive.min_batch=64 or 32"], results[0].stderr


def test_adaptive_with_full_sharding_is_refused_in_one_line(tmp_path):
    r = run_module("largebatch.train", "adaptive.enabled=true", "train.max_micro_batch=16", "comm.shard=full",
                   f"run.dir={tmp_path / 'run'}")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "adaptive.enabled=true measures a worker's gradient before it is averaged" in r.stderr
    assert len([ln for ln in r.stderr.splitlines() if ln.strip()]) == 1, r.stderr


def test_sigterm_and_resume_on_one_worker_match_the_uninterrupted_run(tmp_path):
    whole, d = str(tmp_path / "whole"), str(tmp_path / "run")
    assert run_module("largebatch.train", *ADAPTIVE, f"run.dir={whole}").returncode == 0
    slow = {"LARGEBATCH_FAULT": ",".join(f"sleep@{s}:0:0.2" for s in range(60))}  # so that the signal lands mid-run
    p = start("largebatch.train", *ADAPTIVE, f"run.dir={d}", cwd=REPO, env=_env(slow))
    deadline = time.time() + 120
    while not ckpt.list_checkpoints(d) and time.time() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0 and "stopping on a signal" in err, err[-2000:]
    r = run_module("largebatch.train", *ADAPTIVE, f"run.dir={d}")
    assert r.returncode == 0 and "resuming from" in r.stderr, r.stderr[-2000:]
    weights, reference = load_weights(d), load_weights(whole)
    assert all(torch.equal(weights[k], reference[k]) for k in reference)
    assert _decisions(d) == _decisions(whole)


def test_a_resumed_run_keeps_the_step_time_it_measured(tmp_path):
    d = str(tmp_path / "run")
    args = [a for a in ADAPTIVE if not a.startswith(("adaptive.time_model", "adaptive.preset_workers"))]
    first = run_module("largebatch.train", *args, f"run.dir={d}", env={"LARGEBATCH_FAULT": "exit@12:0"})
    assert first.returncode == 137
    measured = [ln for ln in first.stderr.splitlines() if ln.strip().startswith("step time")]
    assert len(measured) == 1 and "measured before the first step" in measured[0], first.stderr[-2000:]
    saved = torch.load(ckpt.list_checkpoints(d)[0], weights_only=False)["adaptive"]["step_time"]
    assert saved["source"] == "measured" and saved["per_micro_batch_s"] > 0
    second = run_module("largebatch.train", *args, f"run.dir={d}")
    assert second.returncode == 0 and "resuming from" in second.stderr, second.stderr[-2000:]
    assert [ln for ln in second.stderr.splitlines() if ln.strip().startswith("step time")] == measured
    newest = torch.load(ckpt.list_checkpoints(d)[0], weights_only=False)["adaptive"]["step_time"]
    assert newest == saved


def test_the_plan_command_refuses_what_training_refuses():
    r = run_module("largebatch.plan", "--world-size", "2", "adaptive.enabled=true", "train.max_micro_batch=16",
                   "train.global_batch=64", "comm.shard=full")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert [ln for ln in r.stderr.splitlines() if ln.strip()] == [
        "largebatch: error: adaptive.enabled=true measures a worker's gradient before it is averaged, which "
        "comm.shard=full (FSDP2) never holds; use comm.shard=optimizer or none, or adaptive.enabled=false"]


def test_advise_refuses_an_adaptive_run_in_one_line(adaptive_2w):
    from largebatch.scaling.runs import read_run
    with pytest.raises(UsageError, match="trained with adaptive.enabled=true: its global batch changed"):
        read_run(adaptive_2w[0])


def test_a_resumed_adaptive_run_keeps_its_micro_batch_and_its_world_sizes_step_time():
    from largebatch.config import config_differences, to_dict
    from largebatch.engine.adaptive import restored_step_time
    plain = to_dict(load_config(None, ["train.max_micro_batch=16"]))
    assert config_differences(plain, to_dict(load_config(None, ["train.max_micro_batch=8"]))) == []
    on = to_dict(load_config(None, ["adaptive.enabled=true", "train.max_micro_batch=16"]))
    changed = to_dict(load_config(None, ["adaptive.enabled=true", "train.max_micro_batch=8"]))
    assert config_differences(on, changed) == [("train.max_micro_batch", 16, 8)]
    saved = {"adaptive": {"step_time": StepTime(0.01, 0.02, 16, 2).state_dict()}}
    assert restored_step_time(saved, 2) == StepTime(0.01, 0.02, 16, 2)
    assert restored_step_time(saved, 4) is None  # another world size measures its own
    assert restored_step_time({"adaptive": {"step_time": {"name": "goyal2017", "workers": 32, "micro_batch": 16,
                                                          "source": "preset goyal2017 at 32 workers"}}}, 2) is None


def test_resuming_with_more_epochs_warns_where_the_adaptive_lr_moves(tmp_path):
    d = str(tmp_path / "run")
    sched = ["schedule.decay=cosine", "schedule.warmup_epochs=0.5"]  # past the warmup by the checkpoint
    first = run_module("largebatch.train", *ADAPTIVE, *sched, f"run.dir={d}", env={"LARGEBATCH_FAULT": "exit@13:0"})
    assert first.returncode == 137
    second = run_module("largebatch.train", *ADAPTIVE, *sched, "train.epochs=6", f"run.dir={d}")
    assert second.returncode == 0, second.stderr[-2000:]
    warning = [ln for ln in second.stderr.splitlines() if "train.epochs changed from 4 to 6" in ln]
    assert len(warning) == 1 and "decay over the epochs trained" in warning[0], second.stderr[-2000:]
