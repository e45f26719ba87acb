"""benchmarks/adaptive_batch.py's pieces, not the benchmark: the sweep table it reads, its loop's
sampling, decisions and simulated time on a few random images, and the goals it prints."""

from __future__ import annotations

import importlib.util
import json
import math
import os

import pytest
import torch

from largebatch.engine.noise import NoiseEstimate
from largebatch.goodput import StepTime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("adaptive_batch", os.path.join(ROOT, "benchmarks", "adaptive_batch.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_sweep_tables_best_lrs_are_read_and_unreached_rows_skipped(bench, tmp_path):
    table = tmp_path / "t.md"
    table.write_text("| global batch | peak lr | measured steps | predicted steps | predicted / measured | images |\n"
                     "| ---: | ---: | ---: | ---: | ---: | ---: |\n| 32 | 8 | 394 | 394 | 1.00 | 12,611 |\n"
                     "| 64 | 16 | 207 | 299 | 1.45 | 13,226 |\n| 128 | — | not reached in 40 | 252 | — | — |\n"
                     "| 2048 | 1.6e+01 | 100 | 208 | 2.07 | 205,312 |\n\nprobe at batch 32: S_min 205\n")
    assert bench.read_sweep_lrs(str(table)) == {32: 8.0, 64: 16.0, 2048: 16.0}
    (tmp_path / "empty.md").write_text("no table\n")
    with pytest.raises(SystemExit, match="no batch rows"):
        bench.read_sweep_lrs(str(tmp_path / "empty.md"))


def tiny_args(bench, tmp_path, **extra):
    argv = ["--root", "unused", "--batches", "32", "64", "128", "--seeds", "0", "--epochs", "2", "--max-epochs", "2",
            "--every-steps", "2", "--target", "1.0", "--out", str(tmp_path)]
    args = bench.parse_args(argv)
    for k, v in extra.items():
        setattr(args, k, v)
    return args


def tiny_data(n=200):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 14, 14, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return x, y, x[:50], y[:50]


class StubNoise:
    """A noise scale that is always 50 images, recording what the loop feeds it."""

    def __init__(self):
        self.seen = []

    def update(self, small, large, b, B):
        self.seen.append((b, B, (float(small), float(large))))

    def values(self):
        return NoiseEstimate(50.0, 1.0, 50.0)


def test_the_adaptive_loop_changes_the_batch_mid_epoch_without_skipping_or_repeating_an_image(bench, tmp_path):
    args = tiny_args(bench, tmp_path)
    fast = StepTime(fixed_s=1.0, per_micro_batch_s=0.01, micro_batch=16, workers=1)  # large batches win
    arm = bench.AdaptiveArm(args, "scaling", 8.0, fast, args.epochs)
    arm.noise = StubNoise()
    r = bench.train_arm(args, tiny_data(), arm, 0, fast)
    trace = r["trace"]
    assert [t[2] for t in trace[:3]] == [32, 32, 128]  # the first decision, after 2 steps, takes the largest
    assert [(d["step"], d["batch"]) for d in r["decisions"]][:2] == [(2, 128), (4, 128)]
    # the noise scale saw every step: the first micro-batch of 16 against the step's batch
    assert [(b, B) for b, B, _ in arm.noise.seen] == [(16, t[2]) for t in trace]
    assert all(small > 0 and large > 0 for _, _, (small, large) in arm.noise.seen)
    # the batch each step used: offsets within each epoch add up without a gap, an epoch ends when
    # fewer images than the batch are left (200 images)
    # fewer images than the batch are left (200 images); the lr is the warmup over 2 epochs trained
    # (epochs done + offset / 200) from 8 to the batch's peak, 8 x batch / 32
    offset, epochs = 0, 0
    for step, images, batch, lr in trace:
        if offset + batch > 200:
            offset, epochs = 0, epochs + 1
        t = epochs + offset / 200
        assert math.isclose(lr, 8.0 + (8.0 * batch / 32 - 8.0) * t / 2), (step, batch, lr, t)
        offset += batch
    assert epochs + 1 == r["epochs_run"] == 2
    assert r["images_run"] == sum(t[2] for t in trace)
    assert math.isclose(r["sim_s_run"], sum(fast(t[2]) for t in trace))
    assert r["final_acc"] is not None and not r["reached"]


def test_a_fixed_arm_takes_floor_n_over_b_steps_an_epoch_and_reaches_a_reachable_target(bench, tmp_path):
    args = tiny_args(bench, tmp_path, target=0.05)
    arm = bench.FixedArm(args, 64, 16.0, 200)
    r = bench.train_arm(args, tiny_data(), arm, 0, lambda b: 0.5)
    assert r["steps_run"] == 2 * (200 // 64) and r["images_run"] == 6 * 64
    assert r["reached"] and 0 < r["steps"] <= r["steps_run"] and math.isclose(r["images"], 64 * r["steps"])
    assert math.isclose(r["sim_s"], 0.5 * r["steps"])


def row(arm, kind, seed, sim_s, images, acc):
    """A run as train_arm returns it; one short of the target (sim_s None) has no steps, images, sim_s."""
    reached = dict(steps=images / 64, images=images, sim_s=sim_s) if sim_s is not None else {}
    return dict(arm=arm, kind=kind, seed=seed, reached=bool(reached), final_acc=acc, epochs_run=8, **reached)


def test_the_goals_compare_with_the_fastest_fixed_batch_that_always_reached_the_target(bench):
    results = [row("fixed 32", "fixed", s, 10.0, 12000, 0.970) for s in (0, 1)]
    results += [row("fixed 64", "fixed", s, t, 13000, 0.968) for s, t in ((0, 6.0), (1, 7.0))]
    results += [row("fixed 128", "fixed", 0, 5.0, 20000, 0.96), row("fixed 128", "fixed", 1, None, None, 0.9)]
    results += [row("adaptive scaling", "adaptive", s, 6.4, 14000, 0.966) for s in (0, 1)]
    results += [row("adaptive adascale", "adaptive", s, 6.6, 15000, 0.960) for s in (0, 1)]
    lines = bench.cluster_goals(results)
    assert lines[0].startswith("best fixed batch on the cluster: fixed 64 (6.50 s, 13,000 images")
    assert lines[1] == ("adaptive scaling: time 6.40 s = 0.98x the best fixed (goal <= 1.00): met; images 14,000 = "
                        "1.08x (goal <= 1.10): met; final accuracy 96.60% = -0.20 points (goal >= -0.30): met")
    assert "time 6.60 s = 1.02x" in lines[2] and "1.15x (goal <= 1.10): missed" in lines[2]
    assert lines[2].endswith("-0.80 points (goal >= -0.30): missed")
    table = bench.cluster_table(results, {r["arm"]: "x" for r in results}, bench.parse_args(["--root", "x"]))
    assert "| fixed 128 | x | 1/2 (not reached in 8 epochs) | 312 | 20,000 | 5.00 | 93.00 ± 4.24 |" in table
    assert "| fixed 64 | x | 2/2 | 203 ± 0 | 13,000 ± 0 | 6.50 ± 0.71 | 96.80 ± 0.00 |" in table


def engine_row(arm, seed, time_to_target, epoch_to_target, epochs, events=(), epoch_batches=None):
    """An engine run as run_engine returns it: epoch lines at the given cumulative steps."""
    summary = dict(time_to_target_s=time_to_target, epoch_to_target=epoch_to_target, val_acc=0.96)
    return dict(arm=arm, seed=seed, wall_s=30.0, summary=summary, events=list(events), epoch_batches=epoch_batches,
                first_batch=32, epochs=[dict(event="epoch", epoch=k + 1, step=s) for k, s in enumerate(epochs)])


def test_engine_images_follow_the_epochs_batches_or_the_adaptive_runs_decisions(bench):
    fixed = engine_row("fixed 64", 0, 10.0, 2, [125, 250, 375], epoch_batches=[64] * 3)
    assert bench.engine_images(fixed, 32) == 250 * 64
    smith = engine_row("smith", 0, 9.0, 2, [250, 312], epoch_batches=[32, 128])
    assert bench.engine_images(smith, 32) == 250 * 32 + 62 * 128
    decisions = [dict(event="batch", step=20, global_batch=64), dict(event="batch", step=40, global_batch=64),
                 dict(event="batch", step=60, global_batch=128), dict(event="batch", step=200, global_batch=256)]
    adaptive = engine_row("adaptive scaling", 0, 8.0, 1, [100, 150], events=decisions)
    assert bench.engine_images(adaptive, 32) == 20 * 32 + 40 * 64 + 40 * 128
    lines = bench.engine_goals([fixed, smith, adaptive, engine_row("fixed 32", 0, 7.5, 2, [250, 500], epoch_batches=[32] * 2)])
    assert lines == ["best fixed batch on 2 CPU workers: fixed 32 (7.5 s to the target)",
                     "adaptive scaling: 8.0 s = 1.07x the best fixed (goal <= 1.10): met"]


def test_an_adaptive_arm_takes_its_own_crit_factor_and_says_so_in_its_name(bench, tmp_path):
    args = bench.parse_args(["--root", "x", "--rules", "scaling", "adascale", "adascale:3.34", "--out", str(tmp_path)])
    assert bench.adaptive_arms(args) == {"adaptive scaling": ("scaling", 1.0), "adaptive adascale": ("adascale", 1.0),
                                         "adaptive adascale, crit_factor 3.34": ("adascale", 3.34)}
    steady = StepTime(fixed_s=1.0, per_micro_batch_s=0.01, micro_batch=16, workers=1)
    arm = bench.AdaptiveArm(args, "adascale", 8.0, steady, args.epochs, 3.34)
    arm.noise = StubNoise()  # a noise scale of 50 images
    arm.after_step(args.every_steps, 0)
    assert arm.name == "adaptive adascale, crit_factor 3.34" and math.isclose(arm.decisions[0]["b_crit"], 167.0)
    assert bench.lr_labels(args, {32: 8.0})["adaptive adascale, crit_factor 3.34"] == "8 x gain"
    line = bench.engine_overrides(args, "adaptive adascale, crit_factor 3.34", 8.0, 0, "run")
    assert "adaptive.crit_factor=3.34" in line and "adaptive.lr=adascale" in line
    assert "adaptive.crit_factor=1" in bench.engine_overrides(args, "adaptive scaling", 8.0, 0, "run")
    # --crit-factor is the factor of the entries that do not give one
    other = bench.parse_args(["--root", "x", "--rules", "adascale", "--crit-factor", "2"])
    assert bench.adaptive_arms(other) == {"adaptive adascale, crit_factor 2": ("adascale", 2.0)}
    for bad in ("adascale:0", "adascale:x", "linear"):
        with pytest.raises(SystemExit, match=r"--rules .*RULE:CRIT_FACTOR"):
            bench.parse_args(["--root", "x", "--rules", bad])


def test_reuse_keeps_runs_saved_with_a_crit_factor_for_every_arm_and_matches_an_adaptive_arms_factor(bench, tmp_path):
    args = bench.parse_args(["--root", "x", "--rules", "adascale", "adascale:3.34", "--out", str(tmp_path)])
    steady = StepTime(fixed_s=1.0, per_micro_batch_s=0.01, micro_batch=16, workers=1)
    fixed = bench.FixedArm(args, 64, 16.0, 200)
    one, calibrated = (bench.AdaptiveArm(args, "adascale", 8.0, steady, args.epochs, f) for f in (1.0, 3.34))
    # runs.jsonl of before the per-arm factor: every arm saved with the run's crit_factor
    before = {k: v for k, v in vars(args).items() if k in bench.SETTINGS} | {"crit_factor": 1.0}
    saved = json.dumps(before, sort_keys=True)
    assert bench.same_settings(saved, bench.run_settings(args, fixed))
    assert bench.same_settings(saved, bench.run_settings(args, one))
    assert not bench.same_settings(saved, bench.run_settings(args, calibrated))
    assert bench.same_settings(json.dumps(bench.run_settings(args, calibrated)), bench.run_settings(args, calibrated))
    assert not bench.same_settings(json.dumps(before | {"epochs": 9}), bench.run_settings(args, fixed))
    assert not bench.same_settings(None, bench.run_settings(args, fixed))


def test_the_engine_table_counts_images_over_the_runs_that_reached_the_target(bench):
    reached = engine_row("fixed 64", 0, 10.0, 2, [125, 250, 375], epoch_batches=[64] * 3)
    short = engine_row("fixed 64", 1, None, None, [125 * k for k in range(1, 13)], epoch_batches=[64] * 12)
    short["summary"]["val_acc"] = 0.90
    table = bench.engine_table([reached, short])
    assert "| fixed 64 | 1/2 | 2.0 | 16,000 | 10.0 | 30.0 ± 0.0 | 93.00 ± 4.24 |" in table
    assert bench.engine_seed_lines([reached, short]) == ["fixed 64: seed 0 10.0 s (epoch 2), seed 1 not reached in 12 epochs"]
    decisions = [dict(event="batch", step=20, global_batch=64, changed=True, b_crit=192.0,
                      candidates=[dict(global_batch=b, step_time_s=t) for b, t in ((32, 0.005), (64, 0.0083), (128, 0.0148))]),
                 dict(event="batch", step=40, global_batch=64, changed=False, b_crit=150.0)]
    adaptive = engine_row("adaptive adascale, crit_factor 3.34", 1, 4.8, 3, [230, 400, 525], events=decisions)
    assert bench.engine_decisions_line(adaptive) == (
        "adaptive adascale, crit_factor 3.34, seed 1: 32 -> 64 at step 20 (B_crit 192) (2 decisions); B_crit at the end "
        "150; step time model T(32) 5.0 ms, T(64) 8.3 ms, T(128) 14.8 ms")


def test_the_arguments_load_the_sweeps_data_from_an_image_folder(bench, tmp_path):
    args = bench.parse_args(["--root", "unused", "--out", str(tmp_path)])
    x, y, xv, yv = tiny_data(20)
    torch.save(dict(xt=x, yt=y, xv=xv, yv=yv), tmp_path / f"data-imagefolder-{args.image_size}px.pt")
    loaded = bench.sweep.load_data(args)  # the sweep's cache of the decoded --root images
    assert all(torch.equal(a, b) for a, b in zip(loaded, (x, y, xv, yv)))
