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


def test_auto_turns_precise_statistics_on_below_three_over_momentum_steps_per_epoch():
    model = _bn_model()
    on = choose_precise_bn("auto", model, 29, 100_000)
    off = choose_precise_bn("auto", model, 30, 100_000)
    assert on.images == AUTO_IMAGES and "29 steps per epoch" in on.line()
    assert off.images == 0 and off.line().startswith("running averages")
    assert choose_precise_bn("auto", model, 3, 1438).images == 1438  # a small training set: all of it
    # the slowest running average counts: momentum 0.01 spans ~100 steps, on below 300 steps per epoch
    assert choose_precise_bn("auto", _bn_model(0.01), 299, 100_000).images == AUTO_IMAGES
    assert choose_precise_bn("auto", _bn_model(0.01), 300, 100_000).images == 0
    # a cumulative average (momentum None) never forgets the first weights
    assert choose_precise_bn("auto", _bn_model(None), 10_000, 100_000).images == AUTO_IMAGES


def test_auto_is_off_without_running_statistics_and_explicit_values_are_kept():
    assert choose_precise_bn("auto", nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU()), 1, 5000).images == 0
    untracked = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    assert choose_precise_bn("auto", untracked, 1, 5000).images == 0
    assert choose_precise_bn(0, _bn_model(), 1, 5000).images == 0
    assert choose_precise_bn(300, _bn_model(), 1000, 5000).images == 300
    none = choose_precise_bn(300, nn.Linear(2, 2), 1, 5000)  # nothing to recompute, whatever the setting
    assert none.images == 0 and none.line().startswith("none to recompute")


def test_the_images_are_whole_micro_batches_shared_by_the_workers_and_at_most_one_epoch():
    choice = choose_precise_bn("auto", _bn_model(), 3, 100_000)
    # 4,096 images over 512 workers: 8 each, rounded up to one micro-batch of 64
    wide = choice.for_phase(512, 64, 3)
    assert (wide.micro_batches, wide.used) == (1, 32_768) and "32,768 training images" in wide.line()
    # 2 workers, micro-batches of 100: 2,048 each, 21 micro-batches; an epoch of 12 caps it
    assert choice.for_phase(2, 100, 40).micro_batches == 21
    assert choice.for_phase(2, 100, 12).used == 2400
    assert choose_precise_bn(0, _bn_model(), 3, 1000).for_phase(2, 100, 12).micro_batches == 0


def test_auto_is_decided_per_phase(tmp_path):
    """Phases at global batch 32 (44 steps per epoch) and 512 (2): precise statistics in the second only."""
    from largebatch.config import load_config
    from largebatch.distributed import SINGLE
    from largebatch.engine import Trainer

    cfg = load_config(None, ["data.name=digits", f"run.dir={tmp_path}", "checkpoint.resume=never", "train.epochs=2",
                             "train.phases=[{epochs: 1, global_batch: 32}, {epochs: 1, global_batch: 512}]"])
    trainer = Trainer(cfg, SINGLE)
    try:
        assert [c.micro_batches for c in trainer.precise_bn] == [0, 2]
        assert [c.used for c in trainer.precise_bn] == [0, 1024]
    finally:
        trainer.close()


def test_auto_is_the_default_and_the_run_header_says_what_it_chose(tmp_path):
    """Digits (1,438 training images) at global batch 512: 2 steps per epoch, so 'auto' recomputes
    the statistics over one epoch's 1,024 images, exactly as the explicit value does; 0 keeps the averages."""
    common = ["data.name=digits", "train.global_batch=512", "train.epochs=2", "optim.name=lars",
              "checkpoint.resume=never"]
    runs = {}
    for name, extra in [("auto", []), ("explicit", ["train.precise_bn_images=1438"]),
                        ("off", ["train.precise_bn_images=0"])]:
        r = run_module("largebatch.train", *common, *extra, f"run.dir={tmp_path / name}")
        assert r.returncode == 0, r.stderr[-2000:]
        runs[name] = (r.stderr, [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")])
    assert ("BatchNorm statistics   precise: recomputed over 1,024 training images before each validation "
            "(auto: 2 steps per epoch, fewer than 30 = 3 / BatchNorm momentum 0.1)") in runs["auto"][0]
    assert "BatchNorm statistics   precise: recomputed over 1,024 training images before each validation " \
           "(train.precise_bn_images=1438)" in runs["explicit"][0]
    assert "BatchNorm statistics   running averages (train.precise_bn_images=0)" in runs["off"][0]

    def epochs(name):
        return [(x["val_loss"], x["val_acc"]) for x in runs[name][1] if x["event"] == "epoch"]

    assert epochs("auto") == epochs("explicit")
    assert epochs("auto") != epochs("off")  # the same weights, other statistics: another validation loss
    train_losses = {name: [x["train_loss"] for x in runs[name][1] if x["event"] == "epoch"] for name in runs}
    assert train_losses["auto"] == train_losses["off"]  # the optimizer steps do not change
