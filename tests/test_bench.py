"""``python -m largebatch.bench`` starts its own workers and writes what it printed as JSON."""

from __future__ import annotations

import json
import os

from conftest import run_module
from largebatch.models import create_model


def test_bench_runs_on_two_workers_and_writes_json(tmp_path):
    out = str(tmp_path / "bench")
    r = run_module("largebatch.bench", "allreduce", "overlap", "optim", "--rounds", "2", "--model", "cnn",
                   "--optim-model", "cnn", "--step-model", "cnn", "--image-size", "16", "--micro-batch", "8",
                   "--out", out, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "on 2 worker(s)" in r.stdout and "== allreduce ==" in r.stdout and "== optim ==" in r.stdout
    allreduce = json.load(open(os.path.join(out, "bench-allreduce.json")))
    cnn_bytes = 4 * sum(p.numel() for p in create_model("cnn", 1000).parameters())
    assert allreduce["bytes"] == cnn_bytes and allreduce["workers"] == 2 and allreduce["backend"] == "gloo"
    assert allreduce["flat_ms"] > 0 and allreduce["ratio"] > 0 and allreduce["met"] == (allreduce["ratio"] >= 0.9)
    overlap = json.load(open(os.path.join(out, "bench-overlap.json")))
    assert 0.0 <= overlap["hidden_share"] <= 1.0 and overlap["full_ms"] > 0 and overlap["compute_ms"] > 0
    optim = json.load(open(os.path.join(out, "bench-optim.json")))
    assert [row["optimizer"] for row in optim["rows"]][0] == "sgd (foreach)" and optim["rows"][0]["vs_sgd"] == 1.0
    assert {row["optimizer"] for row in optim["rows"]} >= {"lars (foreach)", "lamb (foreach)"}


def test_bench_refuses_an_unknown_name():
    r = run_module("largebatch.bench", "latency")
    assert r.returncode == 2
    assert r.stderr.strip() == ("largebatch: error: unknown benchmark 'latency'; choose from step, allreduce, "
                                "overlap, optim, memory, buckets")


def test_bench_buckets_reports_the_tuners_pick_against_each_size(tmp_path):
    out = str(tmp_path / "bench")
    r = run_module("largebatch.bench", "buckets", "--rounds", "2", "--step-model", "resnet9", "--image-size", "16",
                   "--micro-batch", "4", "--out", out, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.load(open(os.path.join(out, "bench-buckets.json")))
    # ResNet-9's 25.1 MiB of gradients: 1, 4, 16 and 25 MiB buckets, and 64 MiB for one bucket
    assert 25.0 < result["gradient_mb"] < 25.2
    assert sorted(result["ms_per_pass"], key=float) == ["1", "4", "16", "25", "64"]
    assert sorted(result["tuner_ms"], key=float) == ["1", "4", "16", "25", "64"]
    tuned = result["tuner_ms"]
    assert result["auto_mb"] == float(min(tuned, key=lambda k: (tuned[k], -float(k))))  # the tuner's fastest
    ms = result["ms_per_pass"]
    assert result["fastest_mb"] == float(min(ms, key=ms.get))
    assert abs(result["auto_vs_fastest"] - ms[f"{result['auto_mb']:g}"] / ms[f"{result['fastest_mb']:g}"]) < 1e-9
    assert f"auto picked {result['auto_mb']:g} MiB" in r.stdout
