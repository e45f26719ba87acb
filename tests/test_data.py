"""Datasets read from trees and CIFAR batches that the tests write themselves."""

import json
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import launch_workers
from largebatch.config import load_config
from largebatch.data import IGNORE, build_datasets
from largebatch.errors import UsageError


def make_tree(root, classes=("cat", "dog", "eel"), per_class=(12, 4), size=16, mode="RGB", seed=0, signal=150):
    """root/{train,val}/<class>/<i>.png; class c is brighter by ``signal`` in channel c % 3, so it is
    learnable (over noise in 0..79: 150 is easy, 10 is hard)."""
    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "val"), per_class):
        for c, name in enumerate(classes):
            os.makedirs(os.path.join(root, split, name), exist_ok=True)
            for i in range(n):
                arr = rng.integers(0, 80, size=(size, size, 3), dtype=np.uint8)
                arr[..., c % 3] += signal
                img = Image.fromarray(arr, "RGB")
                img = img.convert(mode) if mode != "RGB" else img
                img.save(os.path.join(root, split, name, f"{i:04d}.png"))
    return str(root)


def test_imagefolder_layout_and_classes(tmp_path):
    root = make_tree(tmp_path / "tree")
    cfg = load_config(None, ["data.name=imagefolder", f"data.root={root}", "data.image_size=8"])
    train, val, info = build_datasets(cfg.data)
    assert (info.num_train, info.num_val, info.num_classes, info.channels, info.image_size) == (36, 12, 3, 3, 8)
    assert info.classes == ("cat", "dog", "eel")
    x, y, skipped = train.__getitems__([0, 12, 24])
    assert x.shape == (3, 3, 8, 8) and y.tolist() == [0, 1, 2] and skipped == []
    assert torch.allclose(train[12][0], x[1])


def test_grayscale_tree_has_one_channel_and_native_size(tmp_path):
    root = make_tree(tmp_path / "gray", mode="L", size=12)
    _, _, info = build_datasets(load_config(None, ["data.name=imagefolder", f"data.root={root}"]).data)
    assert info.channels == 1 and info.image_size == 12


def test_mixed_modes_become_rgb(tmp_path):
    root = make_tree(tmp_path / "mixed")
    Image.new("L", (16, 16), 40).save(os.path.join(root, "train", "cat", "0000.png"))
    train, _, info = build_datasets(load_config(None, ["data.name=imagefolder", f"data.root={root}"]).data)
    assert info.channels == 3 and train[0][0].shape == (3, 16, 16)


def test_cache_gives_the_same_images(tmp_path):
    root = make_tree(tmp_path / "c")
    plain, _, _ = build_datasets(load_config(None, ["data.name=imagefolder", f"data.root={root}"]).data)
    cached, _, _ = build_datasets(load_config(None, ["data.name=imagefolder", f"data.root={root}",
                                                     "data.cache=true"]).data)
    idx = list(range(len(plain)))
    assert torch.equal(plain.__getitems__(idx)[0], cached.__getitems__(idx)[0])


@pytest.mark.parametrize("breakage,match", [
    ("no_root", "does not exist"),
    ("no_train", "no 'train' folder"),
    ("root_is_file", "is a file; point data.root at the folder holding train/"),
    ("empty_class", "holds no images"),
    ("mismatch", "different classes"),
    ("no_classes", "holds no class folders"),
])
def test_imagefolder_errors(tmp_path, breakage, match):
    root = make_tree(tmp_path / "t")
    if breakage == "no_root":
        root = str(tmp_path / "missing")
    elif breakage == "no_train":
        import shutil
        shutil.rmtree(os.path.join(root, "train"))
    elif breakage == "root_is_file":
        root = os.path.join(root, "train", "cat", "0000.png")
    elif breakage == "empty_class":
        os.makedirs(os.path.join(root, "train", "fox"))
        os.makedirs(os.path.join(root, "val", "fox"))
    elif breakage == "mismatch":
        os.rename(os.path.join(root, "val", "eel"), os.path.join(root, "val", "emu"))
    elif breakage == "no_classes":
        import shutil
        shutil.rmtree(os.path.join(root, "train"))
        os.makedirs(os.path.join(root, "train"))
    with pytest.raises(UsageError, match=match):
        build_datasets(load_config(None, ["data.name=imagefolder", f"data.root={root}"]).data)


def make_cifar(root, name="cifar10", n_per_batch=20, seed=0):
    rng = np.random.default_rng(seed)
    if name == "cifar10":
        folder, files, key, classes = "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], b"labels", 10
    else:
        folder, files, key, classes = "cifar-100-python", ["train", "test"], b"fine_labels", 100
    os.makedirs(os.path.join(root, folder), exist_ok=True)
    for f in files:
        batch = {b"data": rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8),
                 key: rng.integers(0, classes, size=n_per_batch).tolist()}
        with open(os.path.join(root, folder, f), "wb") as fh:
            pickle.dump(batch, fh)
    return str(root)


@pytest.mark.parametrize("name,train,val,classes", [("cifar10", 100, 20, 10), ("cifar100", 20, 20, 100)])
def test_cifar_batches(tmp_path, name, train, val, classes):
    root = make_cifar(tmp_path, name)
    for r in (root, os.path.join(root, os.listdir(root)[0])):  # the parent or the batch folder itself
        _, _, info = build_datasets(load_config(None, [f"data.name={name}", f"data.root={r}"]).data)
        assert (info.num_train, info.num_val, info.num_classes, info.channels, info.image_size) == \
            (train, val, classes, 3, 32)


def test_cifar_errors(tmp_path):
    with pytest.raises(UsageError, match="holds no cifar10 batches"):
        build_datasets(load_config(None, ["data.name=cifar10", f"data.root={tmp_path}"]).data)
    root = make_cifar(tmp_path / "x")
    with open(os.path.join(root, "cifar-10-batches-py", "data_batch_3"), "wb") as fh:
        fh.write(b"not a pickle")
    with pytest.raises(UsageError, match="data_batch_3"):
        build_datasets(load_config(None, ["data.name=cifar10", f"data.root={root}"]).data)


def _break_tree(root):
    """A truncated JPEG in train/ (past the images sampled for the statistics) and a zero-byte file in val/."""
    png = os.path.join(root, "train", "eel", "0199.png")
    jpeg = png[:-4] + ".jpg"
    Image.open(png).save(jpeg, quality=90)
    os.unlink(png)
    data = open(jpeg, "rb").read()
    open(jpeg, "wb").write(data[:len(data) // 2])
    open(os.path.join(root, "val", "cat", "0000.png"), "wb").close()
    return jpeg, os.path.join(root, "val", "cat", "0000.png")


@pytest.fixture(scope="module")
def broken_tree(tmp_path_factory):
    # 600 training images: the statistics sample the first 512, so the damaged one is first met in training
    root = make_tree(tmp_path_factory.mktemp("broken") / "tree", per_class=(200, 4), size=8)
    return (root, *_break_tree(root))


def test_unreadable_images_are_skipped_and_counted(broken_tree, tmp_path):
    root, jpeg, empty = broken_tree
    results = launch_workers(2, "largebatch.train", "data.name=imagefolder", f"data.root={root}", "data.num_workers=2",
                             "train.global_batch=40", "train.epochs=3", f"run.dir={tmp_path}")
    assert [r.returncode for r in results] == [0, 0], results[0].stderr[-2000:]
    stderr = results[0].stderr + results[1].stderr
    for path in (jpeg, empty):
        assert f"skipping unreadable image '{path}'" in stderr
        # one warning in the whole run (rank 0 names the files any worker met), however many workers,
        # loader processes and epochs met the file
        assert stderr.count(f"skipping unreadable image '{path}'") == 1, stderr
        assert f"skipping unreadable image '{path}'" in results[0].stderr
    lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert [x["skipped_files"] for x in lines if x["event"] == "epoch"] == [2, 2, 2]
    summary = lines[-1]
    assert summary["skipped_files"] == 2 and summary["steps"] == 45 and summary["val_acc"] > 0.6
    # the zero-byte validation image is left out of the counts: 11 of 12 scored, so accuracy is a multiple of 1/11
    assert round(summary["val_acc"] * 11) == pytest.approx(summary["val_acc"] * 11, abs=1e-9)


def test_an_unreadable_image_is_warned_of_once_by_rank_0(capsys):
    class Named:
        def describe(self, index):
            return f"img{index}.png"

    from largebatch.data.loader import Skips

    rank0, rank1 = Skips(Named()), Skips(Named())
    rank1.announce = False  # as the trainer sets it on every worker but rank 0
    rank1._note(7, "truncated")
    rank1._note(7, "truncated")
    assert rank1.skipped == {7} and capsys.readouterr().err == ""
    for skips in (rank0, rank1):  # the workers fold in what each found: rank 0 names rank 1's file once
        skips.warn(rank1.reasons, rank=1)
        skips.warn(rank1.reasons, rank=1)
    err = capsys.readouterr().err
    assert err.count("skipping unreadable image 'img7.png' (met by rank 1) (truncated)") == 1, err
    assert err.count("warning") == 1 and rank0.skipped == set()
    rank0._note(7, "truncated")  # met later by rank 0 itself: counted, not warned of again
    assert rank0.skipped == {7} and capsys.readouterr().err == ""


def test_unreadable_image_with_error_stops_every_worker(broken_tree, tmp_path):
    root, jpeg, _ = broken_tree
    results = launch_workers(2, "largebatch.train", "data.name=imagefolder", f"data.root={root}", "data.num_workers=1",
                             "train.global_batch=40", "train.epochs=2", "data.on_corrupt=error", f"run.dir={tmp_path}",
                             timeout=120)
    assert [r.returncode for r in results] == [2, 2]
    assert "Traceback" not in results[0].stderr + results[1].stderr
    errors = [x for x in results[0].stderr.splitlines() if x.startswith("largebatch: error:")]
    assert len(errors) == 1 and f"cannot read image '{jpeg}'" in errors[0] and "data.on_corrupt=skip" in errors[0]
    assert not (tmp_path / "checkpoints" / "final.pt").exists()


def test_unreadable_image_found_while_measuring_statistics(tmp_path):
    root = make_tree(tmp_path / "t")
    open(os.path.join(root, "train", "dog", "0001.png"), "wb").close()
    cfg = ["data.name=imagefolder", f"data.root={root}"]
    with pytest.raises(UsageError, match=r"cannot read image '.*dog/0001.png'"):
        build_datasets(load_config(None, cfg + ["data.on_corrupt=error"]).data)
    train, _, info = build_datasets(load_config(None, cfg).data)
    assert info.num_train == 36
    x, y, skipped = train.__getitems__([12, 13, 14])
    assert y.tolist() == [1, IGNORE, 1] and [s[0] for s in skipped] == [13]
    assert x[1].abs().max() == 0 and x[0].abs().max() > 0
