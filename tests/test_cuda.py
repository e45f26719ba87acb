"""The CUDA paths of the engine, end to end; skipped where no GPU is visible."""

import json
import os

import pytest
import torch

from checks import max_abs_diff
from conftest import initial_weights, needs_2_gpus, load_weights, needs_cuda, run_module, scaler_halvings, torchrun

pytestmark = needs_cuda


def _summary(run_dir):
    lines = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl"))]
    return [x for x in lines if x["event"] == "summary"][-1]


def test_default_run_on_one_gpu_under_torchrun(tmp_path):
    d = str(tmp_path / "run")
    r = torchrun(1, "largebatch.train", "train.epochs=5", f"run.dir={d}", cuda=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "worker(s) on cuda" in r.stderr and "cudnn.benchmark on" in r.stderr
    assert _summary(d)["val_acc"] > 0.9


def test_one_gpu_accumulating_matches_one_gpu_whole(tmp_path):
    """One GPU under torchrun: the global batch in 2 micro-batches trains the weights the whole batch
    does (what two GPUs, each with half, must match too: see the 2-GPU test)."""
    whole, halves = str(tmp_path / "whole"), str(tmp_path / "halves")
    # the MLP: rounding stays at rounding level over many steps (the CNN's trajectory amplifies it,
    # and cuDNN may pick other kernels for the two batch sizes)
    args = ["model.name=mlp", "model.norm=none", "train.epochs=2", "train.global_batch=128", "train.device=cuda"]
    r = torchrun(1, "largebatch.train", *args, f"run.dir={whole}", cuda=True)
    assert r.returncode == 0 and "1 worker(s) on cuda" in r.stderr, r.stderr[-3000:]
    r = torchrun(1, "largebatch.train", *args, "train.max_micro_batch=64", f"run.dir={halves}", cuda=True)
    assert r.returncode == 0 and "accumulation steps     2" in r.stderr, r.stderr[-3000:]
    assert max_abs_diff(load_weights(whole), load_weights(halves)) < 1e-4


@needs_2_gpus
def test_two_workers_over_nccl_match_one(tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    args = ["model.name=mlp", "model.norm=none", "train.epochs=2", "train.global_batch=128"]
    assert torchrun(1, "largebatch.train", *args, f"run.dir={one}", cuda=True).returncode == 0
    r = torchrun(2, "largebatch.train", *args, f"run.dir={two}", cuda=True)
    assert r.returncode == 0 and "over nccl" in r.stderr, r.stderr[-3000:]
    assert max_abs_diff(load_weights(one), load_weights(two)) < 1e-4


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_on_the_gpu(tmp_path, precision):
    # step 3's loss is NaN: fp16's scaler skips it (and halves its scale), bf16 skips it as non-finite
    d = str(tmp_path / "run")
    r = run_module("largebatch.train", "train.epochs=5", f"train.precision={precision}", f"run.dir={d}", cuda=True,
                   env={"LARGEBATCH_FAULT": "nan@3"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "worker(s) on cuda" in r.stderr
    assert f"  precision              {precision} autocast (float32 weights and gradients)" in r.stderr, r.stderr[-3000:]
    summary = _summary(d)
    assert summary["val_acc"] > 0.9
    if precision == "fp16":
        assert summary["scaler_skipped_steps"] == scaler_halvings(d) >= 1 and summary["skipped_steps"] == 0
    else:
        assert summary["skipped_steps"] == 1 and summary["scaler_skipped_steps"] == 0


def test_channels_last_and_compiled_run(tmp_path):
    d, ref = str(tmp_path / "fast"), str(tmp_path / "ref")
    args = ["train.epochs=1", "model.name=resnet9", "data.image_size=16", "train.device=cuda"]
    r = run_module("largebatch.train", *args, "train.compile=true", f"run.dir={d}", cuda=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "channels-last on, torch.compile (mode default) took" in r.stderr
    r = run_module("largebatch.train", *args, "train.channels_last=false", f"run.dir={ref}", cuda=True)
    assert r.returncode == 0, r.stderr[-3000:]
    # the same training to rounding: far closer to each other than to where they started
    moved = max_abs_diff(initial_weights(str(tmp_path / "init"), *args), load_weights(ref))
    assert moved > 1e-2 and max_abs_diff(load_weights(d), load_weights(ref)) < 0.05 * moved


def test_device_resident_data_matches_the_loader(tmp_path):
    a, b = str(tmp_path / "device"), str(tmp_path / "loader")
    # the MLP: the same batches must give the same weights, which a CNN's fp32 convolutions do not
    # show on a GPU (torch runs them in TF32 on Ampere and later, with the algorithm cudnn.benchmark
    # picks in each process, and some of cuDNN's backward algorithms add in no fixed order)
    common = ["train.epochs=2", "model.name=mlp", "model.norm=none", "train.channels_last=false"]
    r = run_module("largebatch.train", *common, f"run.dir={a}", cuda=True)
    assert r.returncode == 0 and "training data          on the device" in r.stderr, r.stderr[-3000:]
    r = run_module("largebatch.train", *common, "data.device_cache=off", f"run.dir={b}", cuda=True)
    assert r.returncode == 0 and "through the loader" in r.stderr, r.stderr[-3000:]
    assert max_abs_diff(load_weights(a), load_weights(b)) < 1e-5


@pytest.mark.parametrize("optim,precision", [("sgd", "fp32"), ("lars", "bf16"), ("lamb", "bf16"), ("lars", "fp16")])
def test_steady_state_step_never_synchronises(tmp_path, optim, precision):
    from largebatch.config.loader import load_config
    from largebatch.distributed import SINGLE
    from largebatch.engine import Trainer
    from largebatch.engine.guards import StopSignal
    from largebatch.engine.step import APPLIED

    cfg = load_config(None, [f"run.dir={tmp_path}", "checkpoint.resume=never", "train.device=cuda",
                             f"optim.name={optim}", f"train.precision={precision}", "model.name=resnet9",
                             "data.image_size=16"])
    trainer = Trainer(cfg, SINGLE)
    try:
        bp = trainer.plan.phases[0].batch
        trainer.sampler.set_epoch(0, 0)
        batches, stop = iter(trainer.loader), StopSignal()
        for step in range(2):  # state allocation and cuDNN's autotuning happen here
            trainer.run_step(batches, bp, step, stop)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            outcomes = [trainer.run_step(batches, bp, step, stop).outcome for step in range(2, 6)]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert [int(o) for o in outcomes] == [APPLIED] * 4
    finally:
        trainer.close()


def test_fit_takes_a_model_instance_already_on_the_gpu(tmp_path):
    """largebatch.fit(model=Net().cuda()): the start-up check runs the model where it is."""
    import largebatch
    from torch import nn
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 1, 8, 8, generator=g)
    y = (x.mean(dim=(1, 2, 3)) > 0).long()
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2)).cuda()
    summary = largebatch.fit(model=model, train_set=TensorDataset(x, y),
                             overrides=[f"run.dir={tmp_path / 'r'}", "train.device=cuda", "train.epochs=1",
                                        "train.global_batch=32"])
    assert summary["steps"] >= 1 and next(model.parameters()).is_cuda
