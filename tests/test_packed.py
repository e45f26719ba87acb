"""The packed format: packing from every source, reading it back, refusing damaged or foreign
files, and training on it next to the image folder it came from."""

import glob
import json
import os
import struct

import numpy as np
import pytest
import torch

from conftest import launch_workers, run_module
from largebatch.config import load_config
from largebatch.data import Request, build_datasets
from largebatch.data.pack import main as pack_main
from largebatch.data.packed import HEADER, read_meta
from largebatch.errors import UsageError
from test_data import make_cifar, make_tree


def _data(*args, seed=0):
    return build_datasets(load_config(None, list(args)).data, seed=seed)


def _all(ds, **request):
    return ds.__getitems__(Request(range(len(ds)), **request))


@pytest.fixture(scope="module")
def tree_and_pack(tmp_path_factory):
    base = tmp_path_factory.mktemp("packed")
    root = make_tree(base / "tree", per_class=(24, 10), signal=3)  # hard enough that accuracy stays below 1
    dest = str(base / "tree.lbpack")
    assert pack_main([root, dest, "--workers", "1"]) == 0
    return root, dest


def test_packed_images_are_the_image_folder_images(tree_and_pack):
    root, dest = tree_and_pack
    folder_train, folder_val, folder_info = _data("data.name=imagefolder", f"data.root={root}")
    train, val, info = _data("data.name=packed", f"data.root={dest}")
    assert (info.num_train, info.num_val, info.num_classes, info.channels, info.image_size, info.classes) == \
        (folder_info.num_train, folder_info.num_val, 3, 3, 16, ("cat", "dog", "eel"))
    for a, b in ((folder_train, train), (folder_val, val)):
        sa, sb = _all(a), _all(b)
        # the same uint8 pixels, normalised with the statistics data.name=imagefolder measures
        assert torch.equal(sa.labels, sb.labels) and torch.equal(sa.images, sb.images)
    meta = read_meta(dest)
    assert meta["source"]["name"] == "imagefolder" and meta["splits"]["train"]["count"] == 72


def test_downscale_on_the_fly_and_no_upscaling(tree_and_pack):
    _, dest = tree_and_pack
    full, _, _ = _data("data.name=packed", f"data.root={dest}")
    small, _, info = _data("data.name=packed", f"data.root={dest}", "data.image_size=8")
    assert info.image_size == 8 and info.max_image_size == 16
    x = _all(small).images
    assert x.shape == (72, 3, 8, 8)
    assert torch.equal(_all(full, size=8).images, x)  # a phase's size request gives the same images
    # = each source file resized straight to 8 px with Pillow's bilinear filter, normalised as packed
    from PIL import Image

    meta = read_meta(dest)
    files = sorted(glob.glob(os.path.join(tree_and_pack[0], "train", "*", "*.png")))
    pixels = np.stack([np.asarray(Image.open(f).convert("RGB").resize((8, 8), Image.BILINEAR)) for f in files])
    mean, std = torch.tensor(meta["mean"]).view(3, 1, 1), torch.tensor(meta["std"]).view(3, 1, 1)
    ref = (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255 - mean) / std
    assert (ref - x).abs().max() < 1e-5
    with pytest.raises(UsageError, match="larger than the 16 pixels .* re-pack it with --size 32"):
        _data("data.name=packed", f"data.root={dest}", "data.image_size=32")


@pytest.mark.parametrize("src,expect", [
    ("cifar10", (100, 20, 10, 3, 12, "pad_crop_flip")),
    ("digits", (1438, 359, 10, 1, 8, "none")),
    ("synthetic", (300, 60, 4, 3, 16, "none")),
])
def test_pack_every_source(tmp_path, src, expect):
    args = {"cifar10": [make_cifar(tmp_path / "c"), "--size", "12"], "digits": ["digits"],
            "synthetic": ["synthetic", "--size", "16", "data.num_samples=300", "data.num_classes=4"]}[src]
    dest = str(tmp_path / "x.lbpack")
    assert pack_main([args[0], dest, *args[1:], "--workers", "0"]) == 0
    train, val, info = _data("data.name=packed", f"data.root={dest}", "data.augment=auto")
    assert (info.num_train, info.num_val, info.num_classes, info.channels, info.image_size, info.augment) == expect
    x = _all(val).images
    assert x.shape[1:] == (expect[3], expect[4], expect[4]) and torch.isfinite(x).all()
    # normalised with the training statistics: about zero mean, unit spread
    t = _all(train).images
    assert t.mean().abs() < 0.05 and 0.9 < t.std() < 1.1
    if src == "digits":  # the same split and labels as data.name=digits
        _, dval, _ = _data("data.name=digits")
        assert torch.equal(_all(dval).labels, _all(val).labels)
        assert torch.corrcoef(torch.stack([_all(dval).images.flatten(), x.flatten()]))[0, 1] > 0.999


def _rewrite(path, offset, data):
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(data)


def test_foreign_damaged_and_other_version_files_are_refused(tree_and_pack, tmp_path):
    _, dest = tree_and_pack
    original = open(dest, "rb").read()
    cases = {
        "version": (lambda p: _rewrite(p, 8, struct.pack("<I", 2)),
                    "is packed format version 2, and this largebatch reads version 1 only; re-pack it with"),
        "labels": (lambda p: _rewrite(p, read_meta(dest)["splits"]["train"]["labels"] + 8, b"\x07"),
                   "fails its checksum: the metadata, labels or index are damaged"),
        "truncated": (lambda p: open(p, "r+b").truncate(len(original) - 100), "it is truncated or was changed"),
        "foreign": (lambda p: _rewrite(p, 0, b"PK\x03\x04"), "is not a largebatch packed file"),
    }
    for name, (damage, message) in cases.items():
        path = str(tmp_path / f"{name}.lbpack")
        open(path, "wb").write(original)
        damage(path)
        with pytest.raises(UsageError, match=message.replace("(", r"\(")):
            _data("data.name=packed", f"data.root={path}")
    with pytest.raises(UsageError, match="is a folder, not a packed file"):
        _data("data.name=packed", f"data.root={tmp_path}")
    with pytest.raises(UsageError, match="does not exist"):
        _data("data.name=packed", f"data.root={tmp_path / 'missing.lbpack'}")
    # the same refusal from the command line: one line, exit status 2
    r = run_module("largebatch.train", "data.name=packed", f"data.root={tmp_path / 'version.lbpack'}",
                   f"run.dir={tmp_path / 'run'}")
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr
    assert lines[0].startswith("largebatch: error: ") and "format version 2" in lines[0]


def test_verify_reads_every_image_byte(tree_and_pack, tmp_path, capsys):
    _, dest = tree_and_pack
    assert pack_main(["--verify", dest]) == 0
    assert "is intact" in capsys.readouterr().out
    path = str(tmp_path / "flipped.lbpack")
    data = bytearray(open(dest, "rb").read())
    data[HEADER.size + 4096] ^= 0xFF  # inside the first training image: opening does not read it
    open(path, "wb").write(bytes(data))
    _data("data.name=packed", f"data.root={path}")
    with pytest.raises(UsageError, match="fails its image checksum"):
        pack_main(["--verify", path])


def test_unreadable_source_images_and_atomic_output(tmp_path, capsys):
    root = make_tree(tmp_path / "tree")
    dest = str(tmp_path / "out.lbpack")
    assert pack_main([root, dest, "--workers", "0"]) == 0
    before = open(dest, "rb").read()
    broken = os.path.join(root, "train", "dog", "0002.png")
    open(broken, "wb").close()
    with pytest.raises(UsageError, match=r"cannot read image '.*dog/0002.png'.*--on-corrupt skip"):
        pack_main([root, dest, "--workers", "0", "--on-corrupt", "error"])
    assert open(dest, "rb").read() == before  # the failed pack left the old file whole
    assert glob.glob(str(tmp_path / ".tmp-*")) == []
    capsys.readouterr()
    assert pack_main([root, dest, "--workers", "0"]) == 0
    err = capsys.readouterr().err
    assert "skipping unreadable image" in err and "dog/0002.png" in err
    meta = read_meta(dest)
    assert meta["splits"]["train"]["count"] == 35 and meta["skipped"] == [os.path.join("train", "dog", "0002.png")]


@pytest.mark.parametrize("args,message", [
    (["/nonexistent/x", "out.lbpack"], "SRC '/nonexistent/x' does not exist"),
    (["digits"], "give SRC and DEST"),
    (["digits", "d.lbpack", "train.epochs=3"], "only data.* keys apply"),
    (["digits", "d.lbpack", "--size", "4"], "--size 4 is not allowed"),
    (["digits", "d.lbpack", "data.image_size=[8, 12]"], r"^data.image_size=\[8, 12\] is not square, and a packed "
                                                        r"file holds square images; give one side with --size "
                                                        r"\(e.g. --size 12\)$"),
    (["synthetic", "d.lbpack", "data.image_size=[16, 8]"], r"^data.image_size=\[16, 8\] is not square, and a packed"),
])
def test_pack_cli_bad_input(tmp_path, args, message):
    with pytest.raises(UsageError, match=message):
        pack_main([a if not a.endswith(".lbpack") else str(tmp_path / a) for a in args])


@pytest.fixture(scope="module")
def folder_and_packed_runs(tree_and_pack, tmp_path_factory):
    """The same tree trained through data.name=imagefolder and through its packed file, 2 workers each."""
    root, dest = tree_and_pack
    base = tmp_path_factory.mktemp("runs")
    common = ["data.num_workers=1", "train.precise_bn_images=32", "train.global_batch=16", "train.epochs=6",
              "optim.base_lr=0.4"]
    runs = {}
    for name, data in (("imagefolder", [f"data.root={root}"]), ("packed", [f"data.root={dest}"])):
        d = base / name
        results = launch_workers(2, "largebatch.train", f"data.name={name}", *data, *common, f"run.dir={d}")
        assert [r.returncode for r in results] == [0, 0], results[0].stderr[-2000:]
        runs[name] = d
    return runs


def test_both_formats_train_on_two_workers(folder_and_packed_runs):
    for name, d in folder_and_packed_runs.items():
        lines = [json.loads(x) for x in open(d / "metrics.jsonl")]
        assert [x["epoch"] for x in lines if x["event"] == "epoch"] == [1, 2, 3, 4, 5, 6]
        assert lines[-1]["best_val_acc"] > 0.5, name  # 3 classes: chance is 1/3
        assert json.load(open(d / "classes.json")) == ["cat", "dog", "eel"]
        assert ("skipped_files" in lines[-1]) == (name == "imagefolder")  # only files can turn out unreadable


def test_same_validation_accuracy_through_both_formats(folder_and_packed_runs):
    """The same input tensors through both formats, so the two runs follow one trajectory: the same
    validation accuracy and loss after every epoch."""
    epochs = {name: [x for x in map(json.loads, open(d / "metrics.jsonl")) if x["event"] == "epoch"]
              for name, d in folder_and_packed_runs.items()}
    assert len(epochs["imagefolder"]) == len(epochs["packed"]) == 6
    for a, b in zip(epochs["imagefolder"], epochs["packed"]):
        assert a["val_acc"] == b["val_acc"] and a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-6), (a, b)
    assert 0.5 < epochs["packed"][-1]["val_acc"] < 1.0  # a task where different images would show
