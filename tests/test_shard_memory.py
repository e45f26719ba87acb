"""Memory per worker under comm.shard: the counts from shapes (largebatch.footprint), the plan's
lines, and the bench's measurement of what real workers hold."""

from __future__ import annotations

import json
import os

import pytest

from conftest import launch_workers, run_module
from largebatch.footprint import (Footprint, even_footprints, footprints, numel, shard_numel, state_per_parameter,
                                  zero_partition)

# Shapes worked by hand below: group 1 holds 30, 7 and 16 elements, group 2 holds 5 and 1 (59 in all).
GROUPS = [[(10, 3), (7,), (4, 2, 2)], [(5,), (1,)]]


def test_state_per_parameter_by_optimizer():
    assert state_per_parameter("sgd", 0.9) == (1, 0)
    assert state_per_parameter("sgd", 0.0) == (0, 0)
    assert state_per_parameter("lars", 0.9) == (1, 0) and state_per_parameter("larc", 0.9) == (1, 0)
    assert state_per_parameter("lamb", 0.0) == (2, 1)  # two moments, a step count per tensor
    with pytest.raises(ValueError, match="optimizer='adam' is not allowed"):
        state_per_parameter("adam")


def test_zero_partition_is_greedy_largest_first_and_carries_over_groups():
    # 2 ranks: 30 -> r0; 16 -> r1; 7 -> r1 (16 < 30); then group 2 starts from [30, 23]: 5 and 1 -> r1
    assert zero_partition([[30, 7, 16], [5, 1]], 2) == [[30], [16, 7, 5, 1]]
    # 3 ranks: 30, 16, 7 one each; 5 -> r2 (7 smallest), 1 -> r2 (12 < 16)
    assert zero_partition([[30, 7, 16], [5, 1]], 3) == [[30], [16], [7, 5, 1]]
    # equal loads: the lowest rank first
    assert zero_partition([[4, 4, 4]], 2) == [[4, 4], [4]]
    assert zero_partition([[10], [3, 3]], 2) == [[10], [3, 3]]
    assert zero_partition([[5]], 3) == [[5], [], []]


def test_shard_numel_takes_ceil_rows():
    assert shard_numel((10, 3), 2) == 15 and shard_numel((10, 3), 3) == 12  # 5 rows; 4 rows of 3
    assert shard_numel((7,), 2) == 4 and shard_numel((1,), 4) == 1
    assert shard_numel((4, 2, 2), 3) == 8  # 2 rows of 2x2
    assert shard_numel((), 2) == 1


def test_footprints_lamb_on_two_workers_by_hand():
    f = footprints(GROUPS, 2, "lamb")
    # none: 59 values each for parameters and gradients; state 2 x 59 + 5 step counts
    assert f["none"] == Footprint("none", 4 * 59, 4 * 59, 4 * (2 * 59 + 5))
    # ZeRO-1: rank 0 holds the 30-element tensor (2 x 30 + 1 step), rank 1 the other four
    # (2 x 29 + 4 steps = 62 values): rank 1 holds more state
    assert f["optimizer"] == Footprint("optimizer", 4 * 59, 4 * 59, 4 * 62)
    # full: 5x3 + 4 + 2x2x2 + 3 + 1 = 31 values on rank 0; state 2 x 31 + 5 steps
    assert f["full"] == Footprint("full", 4 * 31, 4 * 31, 4 * (2 * 31 + 5))
    assert f["full"].total == 4 * (31 + 31 + 67)


def test_footprints_sgd_on_three_workers_and_accumulation_by_hand():
    f = footprints(GROUPS, 3, "sgd", momentum=0.9)
    assert f["none"].optimizer == 4 * 59
    assert f["optimizer"].optimizer == 4 * 30  # ranks hold 30, 16 and 13 elements
    # full: 4x3 + 3 + 2x2x2 + 2 + 1 = 26 values on rank 0
    assert (f["full"].parameters, f["full"].gradients, f["full"].optimizer) == (4 * 26, 4 * 26, 4 * 26)
    assert footprints(GROUPS, 3, "sgd", momentum=0.0)["optimizer"].optimizer == 0
    # accumulation under full keeps unsharded gradients between micro-batches
    acc = footprints(GROUPS, 3, "sgd", accumulation_steps=4)["full"]
    assert (acc.parameters, acc.gradients) == (4 * 26, 4 * 59)
    assert footprints(GROUPS, 1, "lamb")["full"] == Footprint("full", 4 * 59, 4 * 59, 4 * (2 * 59 + 5))


def test_even_footprints_by_hand():
    f = even_footprints(10, 4, "lamb")  # ceil(10 / 4) = 3 values per worker
    assert f["none"] == Footprint("none", 40, 40, 80)
    assert f["optimizer"] == Footprint("optimizer", 40, 40, 24)
    assert f["full"] == Footprint("full", 12, 12, 24)
    assert even_footprints(10, 4, "lamb", accumulation_steps=2)["full"].gradients == 40


TINY_MODEL = '''
from torch import nn


def build(num_classes, in_channels):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 5), nn.BatchNorm1d(5), nn.Linear(5, num_classes))
'''


def _rows(out: str) -> dict[str, list[str]]:
    lines = out.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.split()[:2] == ["comm.shard", "parameters"])
    rows = {}
    for ln in lines[head + 1: head + 4]:
        parts = ln.split()
        rows[parts[0]] = [" ".join(parts[i:i + 2]) for i in range(1, len(parts), 2)]
    return rows


def test_plan_prints_memory_per_worker_by_hand(tmp_path):
    (tmp_path / "tinymodel.py").write_text(TINY_MODEL)
    r = run_module("largebatch.plan", "--world-size", "2", "model.name=tinymodel:build", "data.name=digits",
                   "train.global_batch=64", "optim.name=lamb", cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    # digits: 10 classes. Tensors: weight (5, 64) = 320 and bias 5; BatchNorm 5 + 5; weight (10, 5) = 50 and bias 10
    assert "tinymodel:build: 395 parameters in 6 tensors" in r.stdout
    assert "lamb: 2 fp32 copies per parameter + a step count per tensor" in r.stdout
    kib = lambda n: f"{n / 1024:.2f} KiB"  # noqa: E731
    rows = _rows(r.stdout)
    # none: 395 x 4 = 1580 B each; LAMB state 4 x (2 x 395 + 6 steps) = 3184 B
    assert rows["none*"] == [kib(1580), kib(1580), kib(3184), kib(1580 + 1580 + 3184)]
    # ZeRO-1: weights [320, 50] then the rest [10, 5, 5, 5]: 320 -> rank 0, everything else -> rank 1 (75 values
    # in 5 tensors); rank 0 holds 4 x (2 x 320 + 1) = 2564 B of state, rank 1 4 x (2 x 75 + 5) = 620 B
    assert rows["optimizer"] == [kib(1580), kib(1580), kib(2564), kib(1580 + 1580 + 2564)]
    # full: 3 rows of 64 + 5 rows of 5 + 3 + 3 + 3 + 5 = 231 values = 924 B; state 4 x (2 x 231 + 6) = 1872 B
    assert rows["full"] == ["924 B", "924 B", kib(1872), kib(924 + 924 + 1872)]


def test_plan_without_the_data_assumes_1000_classes(tmp_path):
    (tmp_path / "tinymodel.py").write_text(TINY_MODEL)
    args = ["--world-size", "4", "model.name=tinymodel:build", "data.name=imagefolder", "data.root=/nonexistent",
            "data.train_samples=5000", "train.global_batch=64", "train.max_micro_batch=8", "comm.shard=full"]
    r = run_module("largebatch.plan", *args, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    # 320 + 5 + 10 + 5 x 1000 + 1000
    assert "6,335 parameters in 6 tensors (1000 classes assumed: --num-classes C to change)" in r.stdout
    assert "comm.shard=full (marked *)" in r.stdout and any(ln.split()[0] == "full*" for ln in r.stdout.splitlines())
    assert "full with 2 accumulation steps: whole gradients between micro-batches" in r.stdout
    r = run_module("largebatch.plan", *args, "--num-classes", "7", cwd=str(tmp_path))
    assert "377 parameters in 6 tensors\n" in r.stdout  # 320 + 5 + 10 + 35 + 7


def test_bench_memory_shard_case_measures_what_workers_hold(tmp_path):
    from largebatch.footprint import model_groups
    from largebatch.models import create_model

    out = str(tmp_path / "bench")
    # the bench's own two workers (rank 0 starts a fresh 2-worker group per mode; the other waits)
    results = launch_workers(2, "largebatch.bench", "memory", "--memory-cases", "shard", "--shard-model", "cnn",
                             "--image-size", "16", "--micro-batch", "4", "--steps", "1", "--out", out, timeout=400)
    assert [r.returncode for r in results] == [0, 0], results[0].stderr[-3000:]
    r = results[0]
    result = json.load(open(os.path.join(out, "bench-memory.json")))
    assert result["cases"] == ["shard"] and "engine_mib" not in result
    shard = result["shard"]
    assert (shard["model"], shard["optimizer"], shard["workers"], shard["image_size"], shard["micro_batch"],
            shard["steps"]) == ("cnn", "lamb", 2, 16, 4, 1)
    rows = shard["rows"]
    assert sorted(rows) == ["full", "none", "optimizer"]
    for mode, workers in rows.items():
        assert len(workers) == 2
        for w in workers:
            assert w["peak_mib"] > 0
            assert w["total_bytes"] == w["parameter_bytes"] + w["gradient_bytes"] + w["optimizer_bytes"]
    groups = model_groups(create_model("cnn", 1000, in_channels=3, image_size=16), 5e-4, True)
    values = sum(numel(s) for g in groups for s in g)
    none = rows["none"]
    # none: every worker holds the whole model, its gradients, LAMB's two moments and a step count per tensor
    for w in none:
        assert w["parameter_bytes"] == w["gradient_bytes"] == 4 * values
        assert w["optimizer_bytes"] == 4 * (2 * values + sum(len(g) for g in groups))
    # optimizer: whole parameters and gradients, less state on each worker; full: less of everything
    for w in rows["optimizer"]:
        assert w["parameter_bytes"] == w["gradient_bytes"] == 4 * values
        assert w["optimizer_bytes"] < none[0]["optimizer_bytes"]
    assert sum(w["optimizer_bytes"] for w in rows["optimizer"]) == none[0]["optimizer_bytes"]
    for w in rows["full"]:
        assert w["parameter_bytes"] < none[0]["parameter_bytes"] and w["gradient_bytes"] < none[0]["gradient_bytes"]
        assert w["optimizer_bytes"] < none[0]["optimizer_bytes"] and w["total_bytes"] < none[0]["total_bytes"]
    # what the workers held is what the counts from shapes say for the one holding the most
    expect = footprints(groups, 2, "lamb")
    for mode in ("optimizer", "full"):
        held = max(rows[mode], key=lambda w: w["total_bytes"])
        assert (held["parameter_bytes"], held["gradient_bytes"], held["optimizer_bytes"]) == \
            (expect[mode].parameters, expect[mode].gradients, expect[mode].optimizer), mode
    largest = lambda mode, key: max(w[key] for w in rows[mode])  # noqa: E731
    assert shard["optimizer_ratio"] == largest("optimizer", "optimizer_bytes") / largest("none", "optimizer_bytes")
    assert shard["full_ratio"] == largest("full", "total_bytes") / largest("none", "total_bytes")
    assert shard["target"] == 0.55
    assert shard["optimizer_met"] == (shard["optimizer_ratio"] <= 0.55)
    assert shard["full_met"] == (shard["full_ratio"] <= 0.55)
    assert result["met"] == (shard["optimizer_met"] and shard["full_met"])
    assert "optimizer state per worker, optimizer / none:" in r.stdout


def test_bench_memory_refuses_unknown_cases_and_models():
    r = run_module("largebatch.bench", "memory", "--memory-cases", "engine,nope")
    assert r.returncode == 2
    assert r.stderr.strip() == ("largebatch: error: --memory-cases 'engine,nope': unknown case 'nope'; choose from "
                                "engine, accumulation, shard, comma-separated")
    r = run_module("largebatch.bench", "memory", "--shard-model", "vgg")
    assert r.returncode == 2 and "--shard-model 'vgg' is not a model of the zoo" in r.stderr
