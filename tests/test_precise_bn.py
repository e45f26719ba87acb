import json

import torch
from conftest import run_module
from torch import nn

from largebatch.distributed import SINGLE, Communicator
from largebatch.engine.precise_bn import AUTO_IMAGES, choose_precise_bn, recompute_batchnorm


def test_running_stats_become_mean_of_batch_stats():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3))
    comm = Communicator(SINGLE, "gloo", torch.device("cpu"), bucket_mb=25)
    batches = [(torch.randn(8, 2, 6, 6) * (i + 1) + i, torch.zeros(8)) for i in range(5)]
    model.eval()
    recompute_batchnorm(model, batches, torch.device("cpu"), comm)
    with torch.no_grad():
        feats = [model[0](x) for x, _ in batches]
    want_mean = torch.stack([f.mean(dim=(0, 2, 3)) for f in feats]).mean(0)
    want_var = torch.stack([f.var(dim=(0, 2, 3), unbiased=True) for f in feats]).mean(0)
    bn = model[1]
    torch.testing.assert_close(bn.running_mean, want_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn.running_var, want_var, rtol=1e-5, atol=1e-5)
    assert bn.momentum == 0.1 and not model.training  # restored


def test_model_without_batchnorm_is_untouched():
    model = nn.Linear(4, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    comm = Communicator(SINGLE, "gloo", torch.device("cpu"), bucket_mb=25)
    assert recompute_batchnorm(model, [(torch.randn(3, 4), None)], torch.device("cpu"), comm) == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _bn_model(momentum=0.1) -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, momentum=momentum), nn.ReLU(),
                         nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))


def test_auto_turns_precise_statistics_on_below_five_over_momentum_steps_per_epoch():
    model = _bn_model()
    on = choose_precise_bn("auto", model, 49, 100_000)
    off = choose_precise_bn("auto", model, 50, 100_000)
    assert on.images == AUTO_IMAGES and "49 steps per epoch" in on.line()
    assert off.images == 0 and off.line().startswith("running averages")
    assert choose_precise_bn("auto", model, 3, 1438).images == 1438  # a small training set: all of it
    # the slowest running average counts: momentum 0.01 spans ~100 steps, on below 500 steps per epoch
    assert choose_precise_bn("auto", _bn_model(0.01), 499, 100_000).images == AUTO_IMAGES
    assert choose_precise_bn("auto", _bn_model(0.01), 500, 100_000).images == 0
    # a cumulative average (momentum None) never forgets the first weights
    assert choose_precise_bn("auto", _bn_model(None), 10_000, 100_000).images == AUTO_IMAGES


def test_auto_is_off_without_running_statistics_and_explicit_values_are_kept():
    assert choose_precise_bn("auto", nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU()), 1, 5000).images == 0
    untracked = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    assert choose_precise_bn("auto", untracked, 1, 5000).images == 0
    assert choose_precise_bn(0, _bn_model(), 1, 5000).images == 0
    assert choose_precise_bn(300, _bn_model(), 1000, 5000).images == 300
    assert choose_precise_bn(300, nn.Linear(2, 2), 1, 5000).images == 300


def test_auto_is_the_default_and_the_run_header_says_what_it_chose(tmp_path):
    """Digits (1,438 training images) at global batch 512: 2 steps per epoch, so 'auto' recomputes
    the statistics over all 1,438 images, exactly as the explicit value does; 0 keeps the averages."""
    common = ["data.name=digits", "train.global_batch=512", "train.epochs=2", "optim.name=lars",
              "checkpoint.resume=never"]
    runs = {}
    for name, extra in [("auto", []), ("explicit", ["train.precise_bn_images=1438"]),
                        ("off", ["train.precise_bn_images=0"])]:
        r = run_module("largebatch.train", *common, *extra, f"run.dir={tmp_path / name}")
        assert r.returncode == 0, r.stderr[-2000:]
        runs[name] = (r.stderr, [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")])
    assert ("BatchNorm statistics   precise: recomputed over 1,438 training images before each validation "
            "(auto: 2 steps per epoch, fewer than 50 = 5 / BatchNorm momentum 0.1)") in runs["auto"][0]
    assert "BatchNorm statistics   precise: recomputed over 1,438 training images before each validation " \
           "(train.precise_bn_images=1438)" in runs["explicit"][0]
    assert "BatchNorm statistics   running averages (train.precise_bn_images=0)" in runs["off"][0]

    def epochs(name):
        return [(x["val_loss"], x["val_acc"]) for x in runs[name][1] if x["event"] == "epoch"]

    assert epochs("auto") == epochs("explicit")
    assert epochs("auto") != epochs("off")  # the same weights, other statistics: another validation loss
    train_losses = {name: [x["train_loss"] for x in runs[name][1] if x["event"] == "epoch"] for name in runs}
    assert train_losses["auto"] == train_losses["off"]  # the optimizer steps do not change
