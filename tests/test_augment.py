"""Augmentation: a function of (seed, epoch, image index) only, so runs reproduce and the same image
gets the same pixels whatever the world size, micro-batch or loader."""

import json
import os

import numpy as np
import pytest
import torch

from checks import max_abs_diff
from conftest import launch_workers, load_weights, run_module
from largebatch.batching import plan
from largebatch.config import load_config
from largebatch.data import MicroBatchSampler, Request, build_datasets, eval_loader
from largebatch.data.augment import crop_box, resolve, uniforms
from largebatch.data.pack import main as pack_main
from test_data import make_cifar, make_tree


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    base = tmp_path_factory.mktemp("aug")
    tree = make_tree(base / "tree", size=20)
    assert pack_main([tree, str(base / "tree.lbpack"), "--workers", "0"]) == 0
    return {
        "imagefolder": ["data.name=imagefolder", f"data.root={tree}", "data.augment=auto"],
        "cached": ["data.name=imagefolder", f"data.root={tree}", "data.cache=true", "data.augment=crop_flip"],
        "packed": ["data.name=packed", f"data.root={base / 'tree.lbpack'}", "data.augment=auto"],
        "cifar10": ["data.name=cifar10", f"data.root={make_cifar(base / 'c')}", "data.augment=auto"],
        "synthetic": ["data.name=synthetic", "data.num_samples=64", "data.image_size=16", "data.augment=crop_flip"],
    }


def _train(args, seed=0):
    train, _, info = build_datasets(load_config(None, args).data, seed=seed)
    return train, info


@pytest.mark.parametrize("name", ["imagefolder", "cached", "packed", "cifar10", "synthetic"])
def test_same_seed_epoch_and_index_give_the_same_pixels(sources, name):
    train, info = _train(sources[name], seed=7)
    again, _ = _train(sources[name], seed=7)  # built afresh: nothing carried over between datasets
    assert info.augment == ("pad_crop_flip" if name == "cifar10" else "crop_flip")
    idx = [0, 5, 11, 17, 23]
    x = train.__getitems__(Request(idx, epoch=3)).images
    assert torch.equal(x, again.__getitems__(Request(idx, epoch=3)).images)
    # one at a time, in another order, at another batch position: the same pixels per image
    assert torch.equal(x, torch.cat([again.__getitems__(Request([i], epoch=3)).images for i in idx]))
    assert torch.equal(x.flip(0), again.__getitems__(Request(idx[::-1], epoch=3)).images)
    # another epoch, another seed: other pixels; no epoch (validation): the plain images
    assert not torch.equal(x, train.__getitems__(Request(idx, epoch=4)).images)
    other, _ = _train(sources[name], seed=8)
    assert not torch.equal(x, other.__getitems__(Request(idx, epoch=3)).images)
    plain, _ = _train([a for a in sources[name] if not a.startswith("data.augment")])
    assert torch.equal(train.__getitems__(Request(idx)).images, plain.__getitems__(Request(idx)).images)
    assert not torch.equal(x, plain.__getitems__(Request(idx)).images)


@pytest.mark.parametrize("name", ["packed", "cifar10"])
def test_same_pixels_for_any_world_size_and_micro_batch(sources, name):
    """Every image of an epoch, fetched through each rank's sampler, equals the 1-worker fetch."""
    train, _ = _train(sources[name], seed=3)
    n, g = len(train), 12

    def images_by_index(world, cap):
        p = plan(g, world, cap)
        got = {}
        for rank in range(world):
            sampler = MicroBatchSampler(n, p, rank, seed=3)
            sampler.set_epoch(2)
            for request in sampler:
                s = train.__getitems__(request)
                got.update({i: s.images[k] for k, i in enumerate(request)})
        return got

    ref = images_by_index(1, None)
    assert len(ref) == (n // g) * g
    for world, cap in ((2, None), (4, 1)):
        got = images_by_index(world, cap)
        assert got.keys() == ref.keys() and all(torch.equal(got[i], ref[i]) for i in ref)


def test_validation_is_never_augmented(sources):
    train, val, _ = build_datasets(load_config(None, sources["packed"]).data, seed=1)
    assert train.augment is not None and val.augment is None
    batches = [x for x, _ in eval_loader(val, 0, 1, 5)]
    plain = val.__getitems__(list(range(len(val)))).images
    assert torch.equal(torch.cat(batches), plain)


def test_crop_boxes_and_flips_follow_their_distribution():
    u = uniforms(0, 0, range(4000), 5)
    assert u.shape == (4000, 5) and 0 <= u.min() and u.max() < 1
    assert np.array_equal(u[10:20], uniforms(0, 0, range(10, 20), 5))
    assert abs(u.mean() - 0.5) < 0.01 and abs((u[:, 4] < 0.5).mean() - 0.5) < 0.03
    areas, ratios = [], []
    for row in u:
        left, top, right, bottom = crop_box(row, 40, 30, 0.25)
        assert 0 <= left < right <= 40 + 1e-9 and 0 <= top < bottom <= 30 + 1e-9
        areas.append((right - left) * (bottom - top) / 1200)
        ratios.append((right - left) / (bottom - top))
    areas, ratios = np.array(areas), np.array(ratios)
    assert areas.min() >= 0.25 - 1e-9 and areas.max() <= 1 + 1e-9 and areas.max() > 0.9
    unclamped = areas < 0.5  # small crops are never clipped by the image: ratio in [3/4, 4/3]
    assert ratios[unclamped].min() >= 0.75 - 1e-9 and ratios[unclamped].max() <= 4 / 3 + 1e-9


def test_auto_follows_the_dataset():
    assert resolve("auto", "cifar100") == "pad_crop_flip"
    assert resolve("auto", "imagefolder") == "crop_flip"
    assert resolve("auto", "digits") == "none" and resolve("auto", "synthetic") == "none"
    assert resolve("auto", "packed", "cifar10") == "pad_crop_flip" and resolve("auto", "packed", "digits") == "none"
    assert resolve("crop_flip", "digits") == "crop_flip"


def test_augmented_training_is_the_same_on_one_and_two_workers(tmp_path):
    """End to end on CIFAR batches: without BatchNorm, 1 worker and 2 workers with accumulation end
    with the same weights, so each image got the same crop and flip in both."""
    args = ["data.name=cifar10", f"data.root={make_cifar(tmp_path / 'c', n_per_batch=40)}", "data.augment=auto",
            "model.name=mlp", "model.norm=none", "train.global_batch=40", "train.epochs=2", "run.seed=5"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    r1 = run_module("largebatch.train", *args, f"run.dir={one}")
    assert r1.returncode == 0, r1.stderr[-2000:]
    r2 = launch_workers(2, "largebatch.train", *args, "train.max_micro_batch=10", "data.num_workers=1",
                        f"run.dir={two}")[0]
    assert r2.returncode == 0, r2.stderr[-2000:]
    assert all("augmentation           pad_crop_flip (training images only)" in r.stderr for r in (r1, r2))
    assert max_abs_diff(load_weights(one), load_weights(two)) <= 1e-4
    lines = [json.loads(x) for x in open(os.path.join(two, "metrics.jsonl"))]
    assert [x["step"] for x in lines if x["event"] == "epoch"] == [5, 10]
