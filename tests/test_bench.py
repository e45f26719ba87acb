"""``python -m largebatch.bench`` starts its own workers and writes what it printed as JSON; started
with the workers' variables (as torchrun starts it), it runs on those workers."""

from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import launch_workers, needs_cuda, run_module
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


def test_bench_writes_under_runs_bench_by_default(tmp_path):
    r = run_module("largebatch.bench", "optim", "--workers", "1", "--rounds", "1", "--optim-model", "cnn",
                   cwd=str(tmp_path), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert os.listdir(tmp_path) == ["runs"] and os.listdir(tmp_path / "runs" / "bench") == ["bench-optim.json"]
    optim = json.load(open(tmp_path / "runs" / "bench" / "bench-optim.json"))
    assert optim["rows"][0]["optimizer"] == "sgd (foreach)" and optim["rows"][0]["vs_sgd"] == 1.0


def test_bench_refuses_an_unknown_name():
    r = run_module("largebatch.bench", "latency")
    assert r.returncode == 2
    assert r.stderr.strip() == ("largebatch: error: unknown benchmark 'latency'; choose from step, allreduce, "
                                "overlap, optim, memory, buckets, throughput")


def test_bench_buckets_reports_the_tuners_pick_against_each_size(tmp_path):
    out = str(tmp_path / "bench")
    results = launch_workers(2, "largebatch.bench", "buckets", "--rounds", "2", "--step-model", "resnet9",
                             "--image-size", "16", "--micro-batch", "4", "--out", out, timeout=300)
    assert [r.returncode for r in results] == [0, 0], results[0].stderr[-3000:]
    r = results[0]
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


@pytest.mark.parametrize("cuda", [False, pytest.param(True, marks=needs_cuda)], ids=["cpu", "cuda"])
def test_bench_throughput_runs_a_tiny_version_and_writes_json(tmp_path, cuda):
    out = str(tmp_path / "bench")
    workers = "1" if cuda else "2"  # rank 0 runs it, the others wait; on CUDA one GPU is enough
    results = launch_workers(int(workers), "largebatch.bench", "throughput", "--case", "resnet9", "--image-size",
                             "16", "--micro-batch", "8", "--steps", "1", "--rounds", "2", "--compile", "false",
                             "--workers", workers, "--out", out, timeout=300, cuda=cuda)
    assert [r.returncode for r in results] == [0] * int(workers), results[0].stderr[-3000:]
    r = results[0]
    result = json.load(open(os.path.join(out, "bench-throughput.json")))
    rows = result["rows"]
    assert [row["feed"].split(",")[0] for row in rows] == ["device-resident", "loader"]
    assert rows[1]["loader_processes"] >= 1 and f"loader, {rows[1]['loader_processes']} proc" == rows[1]["feed"]
    precision = "bf16" if cuda else "fp32"
    for row in rows:
        assert (row["case"], row["model"], row["image_size"], row["micro_batch"], row["precision"]) == \
            ("resnet9", "resnet9", 16, 8, precision)
        assert row["windows"] == 2 and row["steps_per_window"] == 1  # 3 steps: a warm-up window and 2 timed
        e, s, b = row["engine_img_s"], row["plain_settings_img_s"], row["plain_best_img_s"]
        assert e > 0 and s > 0 and b > 0
        assert abs(row["engine_vs_plain_settings"] - e / s) < 1e-9 and abs(row["engine_vs_plain_best"] - e / b) < 1e-9
        assert row["engine_settings"] == {"channels_last": cuda, "compile": False}  # channels_last=auto's rule
        assert row["best_settings"] == {"channels_last": True, "compile": False}  # --compile false: not compiled
        assert row["plain_best_compile_s"] is None
        resident = row["feed"] == "device-resident"
        assert row["met"] == (e / b >= 0.9 if cuda and resident else None)  # a target on CUDA only
        first = "n/a" if row["first_step_s"] is None else f"{row['first_step_s']:.1f} s"
        printed = next(line for line in r.stdout.splitlines() if line.startswith(f"resnet9 16px x8 {precision}")
                       and row["feed"] in line)
        assert printed.split(row["feed"], 1)[1].split() == [f"{e:,.1f}", f"{s:,.1f}", f"{b:,.1f}", f"{e / s:.3f}",
                                                            f"{e / b:.3f}", *first.split()]
    assert result["target"] == 0.9 and result["compile"] is False and "not compiled" in r.stdout
    # each part says it started, on stderr, before the table (a GPU's compiles take minutes)
    assert [line.split(": ", 2)[2] for line in r.stderr.splitlines() if line.startswith("largebatch.bench: throughput:")] \
        == ["resnet9: 24 random 16px images into a packed file ...", "resnet9: the engine, data device-resident ...",
            f"resnet9: the engine, data {rows[1]['feed']} ...", "resnet9: the plain loop (" +
            ("channels-last, eager) ..." if cuda else "NCHW, eager, channels-last, eager) ...")]
    if cuda:
        assert result["met"] == rows[0]["met"] and "target: engine >= 0.90x" in r.stdout
    else:
        assert result["met"] is None and "no target on CPU" in r.stdout


@pytest.mark.parametrize("args, message", [
    (["--case", "nosuch"], "unknown --case 'nosuch'; choose from resnet50, resnet9"),
    (["--steps", "0"], "--steps 0 must be an integer >= 1"),
    (["--compile", "maybe"], "--compile 'maybe' is not allowed; choose auto, true or false"),
])
def test_bench_throughput_refuses_bad_arguments(args, message):
    r = run_module("largebatch.bench", "throughput", *args)
    assert r.returncode == 2
    assert r.stderr.strip() == f"largebatch: error: {message}"


def test_bench_step_times_the_engine_with_the_noise_scale_beside_it(tmp_path, monkeypatch):
    """--noise-scale on one worker: every arm takes its micro-batch as 2 accumulation steps, a second
    engine with train.noise_scale=true steps the same batches and its estimator sees every one of its
    steps, both trainers are closed, and the table gives the ratio against the target."""
    import argparse

    from largebatch.bench import step
    from largebatch.bench.__main__ import Context
    from largebatch.distributed import SINGLE, Communicator
    from largebatch.engine import Trainer

    built, closed = [], []
    real_init, real_close = Trainer.__init__, Trainer.close

    def init(self, *a, **k):
        real_init(self, *a, **k)
        built.append(self)

    def close(self):
        closed.append(self)
        real_close(self)

    monkeypatch.setattr(Trainer, "__init__", init)
    monkeypatch.setattr(Trainer, "close", close)
    monkeypatch.setattr(step, "CASES", {"cnn": (["model.name=cnn", "data.name=digits"], 16, 3)})
    comm = Communicator(SINGLE, "gloo", torch.device("cpu"), bucket_mb=25)
    args = argparse.Namespace(rounds=2, backend="gloo", bucket_mb=25.0, noise_scale=True)
    try:
        result = step.run(Context(args, comm, 0, 1, torch.device("cpu"), "no backend"))
    finally:
        comm.close()
    assert len(built) == 2 and sorted(map(id, closed)) == sorted(map(id, built))
    plain, noisy = built
    assert plain.cfg.train.noise_scale is False and plain.stepper.noise is None
    # 2 warmup rounds + 2 timed rounds of 3 steps, every one folded into the averages
    assert noisy.stepper.noise.values().steps == pytest.approx(sum(0.99 ** k for k in range(12)), rel=1e-4)
    row = result["cases"]["cnn"]
    assert row["accum_steps"] == 2 and row["micro_batch"] == 8 and row["noise_ms"] > 0
    assert result["noise_met"] == (row["noise_ratio"] <= step.NOISE_TARGET)
    assert "2 accumulation steps" in result["lines"][0]
    assert result["lines"][-1].startswith("target: noise scale on / off <= 1.03: ")


def test_bench_gives_each_gpu_one_worker():
    """Started on its own on a GPU machine, the bench starts one worker per GPU at most (each worker
    takes a GPU of its own); on the CPU, 2 by default, and any number asked for."""
    from largebatch.bench.__main__ import default_workers
    from largebatch.errors import UsageError

    assert [default_workers(None, gpus) for gpus in (0, 1, 2, 8)] == [2, 1, 2, 2]
    assert [default_workers(4, 0), default_workers(1, 1), default_workers(8, 8)] == [4, 1, 8]
    with pytest.raises(UsageError, match=r"^--workers 2 but this machine has 1 CUDA GPU\(s\).*use --workers 1 or fewer"):
        default_workers(2, 1)


@pytest.mark.skipif(torch.cuda.device_count() != 1, reason="needs a machine with exactly one CUDA GPU")
def test_bench_on_one_gpu_refuses_two_workers_in_one_line():
    r = run_module("largebatch.bench", "optim", "--workers", "2", cuda=True)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr[-2000:]
    assert "--workers 2 but this machine has 1 CUDA GPU(s)" in r.stderr
