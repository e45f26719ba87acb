"""Data at the speed of the device: sets held on the training device (gathered, normalised, resized
and augmented there) and uint8 batches through the loader, normalised on the device. Both give the
DataLoader float path's batches."""

import os
import time

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from largebatch.batching import plan
from largebatch.config import load_config
from largebatch.data import IGNORE, Request, Samples, build_datasets, eval_loader, train_loader
from largebatch.data.augment import crop_box, crop_hulls, hull, uniforms, uniforms_tensor
from largebatch.data.base import TensorImages
from largebatch.data.device import cacheable_bytes, device_eval_loader, device_train_loader, in_memory
from largebatch.data.pack import main as pack_main
from test_data import make_cifar, make_tree

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    base = tmp_path_factory.mktemp("device")
    tree = make_tree(base / "tree", size=20)
    assert pack_main([tree, str(base / "tree.lbpack"), "--workers", "0"]) == 0
    broken = make_tree(base / "broken", size=12)
    open(os.path.join(broken, "train", "dog", "0001.png"), "wb").close()  # training index 13
    open(os.path.join(broken, "val", "cat", "0002.png"), "wb").close()  # validation index 2
    cifar = make_cifar(base / "c")
    return {
        "digits": ["data.name=digits"],
        "cifar": ["data.name=cifar10", f"data.root={cifar}"],
        "cifar24": ["data.name=cifar10", f"data.root={cifar}", "data.image_size=24"],
        "packed": ["data.name=packed", f"data.root={base / 'tree.lbpack'}"],
        "packed12": ["data.name=packed", f"data.root={base / 'tree.lbpack'}", "data.image_size=12"],
        "synthetic": ["data.name=synthetic", "data.num_samples=48", "data.image_size=16"],
        "cached": ["data.name=imagefolder", f"data.root={broken}", "data.cache=true"],
        "folder": ["data.name=imagefolder", f"data.root={broken}"],
    }


def _sets(args, augment="none", seed=5, on_corrupt="skip"):
    cfg = load_config(None, [*args, f"data.augment={augment}", f"data.on_corrupt={on_corrupt}"]).data
    return build_datasets(cfg, seed=seed, verbose=False)


def _epoch(batches, sampler, epoch, start_step=0):
    sampler.set_epoch(epoch, start_step)
    return list(batches)


# --- the augmentation's random numbers and boxes on the device ------------------------------------

def test_uniforms_on_the_device_are_bit_identical_to_numpy():
    rng = np.random.default_rng(0)
    indices = np.concatenate([np.arange(3000), rng.integers(0, 2 ** 62, 500), [2 ** 63 - 1, 2 ** 32, 2 ** 31 - 1]])
    for seed in (0, 1, 5, 12345, 2 ** 40 + 7, -3):
        for epoch in (0, 1, 2, 89, 2 ** 31):
            want = uniforms(seed, epoch, indices, 5)
            got = uniforms_tensor(seed, epoch, torch.from_numpy(indices), 5)
            assert got.dtype == torch.float64 and np.array_equal(got.numpy(), want), (seed, epoch)
    assert not np.array_equal(uniforms(0, 0, indices, 5), uniforms(0, 1, indices, 5))


@pytest.mark.parametrize("width,height,min_area", [(32, 32, 0.08), (40, 30, 0.25), (8, 8, 0.5), (500, 375, 0.08)])
def test_batched_crop_hulls_are_the_cpu_hulls(width, height, min_area):
    u = uniforms(3, 1, range(20000), 5)
    want = np.array([hull(crop_box(row, width, height, min_area), width, height) for row in u])
    got = torch.stack(crop_hulls(torch.from_numpy(u), width, height, min_area), 1).numpy()
    assert np.array_equal(got, want)


# --- device-resident sets give the DataLoader's batches -------------------------------------------

def _compare(ref, got, augment, levels=False):
    """Same labels; identical pixels, or close for crop_flip (float: 1e-5; uint8 sources: at most
    2 levels, 9 pixels in 10 the same)."""
    assert len(ref) == len(got) > 0
    for (x1, y1), (x2, y2) in zip(ref, got):
        assert torch.equal(y1, y2) and x1.shape == x2.shape and x2.dtype == torch.float32 and x2.is_contiguous()
        if augment != "crop_flip":
            assert torch.equal(x1, x2)
        elif not levels:
            assert (x1 - x2).abs().max() < 1e-5
    if augment == "crop_flip" and levels:
        a, b = torch.cat([x for x, _ in ref]), torch.cat([x for x, _ in got])
        level = 1.0 / 255.0 / 0.15  # one uint8 level in normalised units, for a std above 0.15
        assert (a - b).abs().max() < 2.01 * level and (a == b).float().mean() > 0.9


@pytest.mark.parametrize("name", ["digits", "cifar", "cifar24", "packed", "packed12", "synthetic", "cached"])
@pytest.mark.parametrize("augment", ["none", "pad_crop_flip", "crop_flip"])
def test_device_batches_equal_the_loader_batches(sources, name, augment):
    train, val, _ = _sets(sources[name], augment)
    p = plan(12, 1, 4)
    loader, ls = train_loader(train, p, 0, seed=5)
    held, hs = device_train_loader(train, p, 0, seed=5, device="cpu")
    assert len(held) == len(loader)
    levels = name.startswith("packed")
    for epoch, start in ((0, 0), (2, 1)):
        _compare(_epoch(loader, ls, epoch, start), _epoch(held, hs, epoch, start), augment, levels)
    for s in (ls, hs):  # a progressive-resizing phase: another batch plan and image size
        s.set_phase(plan(8, 1, None), 10)
    _compare(_epoch(loader, ls, 1), _epoch(held, hs, 1), augment, levels)
    assert held.skipped == loader.skipped and held.error is None
    for size in (None, 10):  # validation: exact shards, never augmented
        a = eval_loader(val, 1, 2, 5, image_size=size)
        b = device_eval_loader(val, 1, 2, 5, "cpu", image_size=size)
        _compare(list(a), list(b), "none")
        assert b.skipped == a.skipped


def test_unreadable_cached_images_are_reported_as_the_loader_reports_them(sources, capsys):
    train, val, _ = _sets(sources["cached"])
    assert train.unreadable.keys() == {13} and val.unreadable.keys() == {2}
    held, sampler = device_train_loader(train, plan(12, 1, 4), 0, seed=5, device="cpu")
    seen = []
    sampler.set_epoch(0)
    for k, (x, y) in enumerate(held):
        if IGNORE in y.tolist():
            seen.append(k)
            assert x[y == IGNORE].abs().max() == 0 and held.skipped == {13}
        else:
            assert held.skipped == (set() if not seen else {13})
    assert len(seen) == 1
    assert capsys.readouterr().err.count("skipping unreadable image") == 1
    list(held)  # a second epoch: counted once, warned once
    assert held.skipped == {13} and "skipping" not in capsys.readouterr().err
    ev = device_eval_loader(val, 0, 1, 100, "cpu")
    list(ev)
    assert ev.skipped == {2}


def test_cifar_images_are_the_normalised_float_copy_they_used_to_be(sources):
    """CIFAR is now held as uint8 with its statistics: the fetched pixels are those of the float copy
    normalised (and resized) once, as build_datasets made it before."""
    from largebatch.data.augment import resize
    from largebatch.data.cifar import load_cifar

    xtr, _, _, _, _ = load_cifar("cifar10", sources["cifar"][1].split("=", 1)[1])
    tr = xtr.float().div_(255.0)
    mean, std = tr.mean(dim=(0, 2, 3), keepdim=True), tr.std(dim=(0, 2, 3), keepdim=True)
    for args, size in ((sources["cifar"], None), (sources["cifar24"], 24)):
        train, _, info = _sets(args, "pad_crop_flip")
        assert train.images.dtype == torch.uint8 and info.image_size == (size or 32)
        old = (tr - mean) / std
        old = TensorImages(resize(old, size) if size else old, train.labels)
        old.augment = train.augment
        idx = list(range(0, len(train), 3))
        for request in (Request(idx), Request(idx, epoch=4), Request(idx, epoch=4, size=16)):
            assert torch.equal(train.__getitems__(request).images, old.__getitems__(request).images)


def test_global_batches_do_not_depend_on_world_size_or_accumulation(sources):
    """Ranks 0 and 1 of a 2-worker plan together make exactly the 1-worker global batches (the same
    augmented images, the same labels); micro-batches add up to the same images too."""
    train, _, _ = _sets(sources["cifar"], "pad_crop_flip", seed=3)

    def steps(world, cap):
        p = plan(20, world, cap)
        per_rank = []
        for rank in range(world):
            batches, sampler = device_train_loader(train, p, rank, seed=3, device="cpu")
            per_rank.append(_epoch(batches, sampler, 2))
        out = []
        for s in range(len(train) // 20):
            parts = [per_rank[r][s * p.accum_steps + k] for r in range(world) for k in range(p.accum_steps)]
            out.append((torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])))
        return out

    ref = steps(1, None)
    assert len(ref) == 5 and ref[0][0].shape == (20, 3, 32, 32)
    for world, cap in ((2, None), (1, 5), (2, 2)):
        got = steps(world, cap)
        assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(ref, got)), (world, cap)


def test_crop_flip_is_exact_where_the_hull_has_the_output_size(sources):
    """crop_flip on the device: the CPU path's boxes and flips; pixels exact where the hull needs no
    resampling, close elsewhere."""
    train, _, _ = _sets(sources["synthetic"], "crop_flip")
    train.augment = type(train.augment)("crop_flip", train.augment.seed, min_area=0.4)
    idx = list(range(len(train)))
    size, epoch = 12, 2
    held, sampler = device_train_loader(train, plan(len(train), 1), 0, seed=0, device="cpu", image_size=size)
    data = held.data
    x, _ = data.take(torch.tensor(idx), size, epoch)
    want = train.__getitems__(Request(idx, epoch=epoch, size=size)).images
    hulls = [hull(crop_box(u, 16, 16, 0.4), 16, 16) for u in train.augment.draws(epoch, idx)]
    exact = [k for k, (l, t, r, b) in enumerate(hulls) if r - l == size and b - t == size]
    assert 0 < len(exact) < len(idx)  # the seed and sizes give both kinds
    assert torch.equal(x[exact], want[exact])
    assert (x - want).abs().max() < 1e-5


def test_nothing_is_read_back_from_the_device(sources):
    """Every micro-batch is made on the 'meta' device, where reading a value (.item(), .tolist(),
    bool(), .cpu(), a boolean mask) raises: the path never waits for the device."""
    for name in ("cifar24", "packed12", "cached"):
        for augment in ("none", "pad_crop_flip", "crop_flip"):
            train, val, info = _sets(sources[name], augment)
            held, sampler = device_train_loader(train, plan(12, 1, 4), 0, seed=5, device="meta", image_size=10)
            out = _epoch(held, sampler, 1)
            assert len(out) == len(held) and all(x.device.type == "meta" and x.shape[1:] == (info.channels, 10, 10)
                                                 and y.device.type == "meta" for x, y in out)
            ev = list(device_eval_loader(val, 0, 1, 5, "meta"))
            assert ev[0][0].shape[1:] == (info.channels, info.image_size, info.image_size)
            if name == "cached":  # found from the CPU permutation, with no device read
                assert held.skipped == {13}


def test_cacheable_bytes_and_in_memory(sources):
    sets = {name: _sets(sources[name])[0] for name in ("digits", "cifar", "packed12", "synthetic", "cached", "folder")}
    n = {name: len(ds) for name, ds in sets.items()}
    assert cacheable_bytes(sets["digits"]) == n["digits"] * (64 * 4 + 8)
    assert cacheable_bytes(sets["cifar"]) == n["cifar"] * (3 * 32 * 32 + 8)  # uint8
    assert cacheable_bytes(sets["packed12"]) == n["packed12"] * (3 * 20 * 20 + 8)  # as packed, resized per batch
    assert cacheable_bytes(sets["synthetic"]) == n["synthetic"] * (3 * 16 * 16 * 4 + 8)
    assert cacheable_bytes(sets["cached"]) == n["cached"] * (3 * 12 * 12 * 4 + 8)
    assert cacheable_bytes(sets["folder"]) is None
    assert {name for name, ds in sets.items() if in_memory(ds)} == {"digits", "cifar", "cached"}
    with pytest.raises(ValueError, match="cannot be held on the device"):
        device_train_loader(sets["folder"], plan(12, 1), 0, seed=0, device="cpu")


# --- uint8 batches through the loader -------------------------------------------------------------

@pytest.mark.parametrize("name", ["packed", "packed12", "folder"])
@pytest.mark.parametrize("augment", ["none", "pad_crop_flip", "crop_flip"])
def test_raw_loader_batches_are_bit_identical_to_float_batches(sources, name, augment, capsys):
    train, val, _ = _sets(sources[name], augment)
    p = plan(12, 1, 4)
    for workers in (0, 2) if augment == "pad_crop_flip" else (0,):
        floats, fs = train_loader(train, p, 0, seed=5, num_workers=workers)
        raw, rs = train_loader(train, p, 0, seed=5, num_workers=workers, device="cpu", raw=True)
        rs.set_epoch(1)
        assert next(iter(raw.loader)).images.dtype == torch.uint8  # what the loader processes hand over
        ref, got = _epoch(floats, fs, 1), _epoch(raw, rs, 1)
        _compare(ref, got, "none")
        assert raw.skipped == floats.skipped == ({13} if name == "folder" else set())
        if name == "folder":  # the unreadable image: a zero image labelled IGNORE, as in the float path
            x, y = next((x, y) for x, y in got if IGNORE in y.tolist())
            assert x[y == IGNORE].abs().max() == 0 and x[y != IGNORE].abs().max() > 0
        a, b = eval_loader(val, 0, 1, 5, num_workers=workers), eval_loader(val, 0, 1, 5, num_workers=workers, raw=True)
        _compare(list(a), list(b), "none")
        assert b.skipped == a.skipped == ({2} if name == "folder" else set())
    capsys.readouterr()


def test_raw_loader_stops_on_an_unreadable_image_with_on_corrupt_error(sources):
    train, _, _ = _sets(sources["folder"])  # the statistics skip it; the loader meets it
    raw, sampler = train_loader(train, plan(12, 1, 4), 0, seed=5, device="cpu", raw=True, on_corrupt="error")
    _epoch(raw, sampler, 0)
    assert raw.skipped == {13} and "cannot read image" in str(raw.error) and "dog/0001.png" in str(raw.error)


def test_defaults_keep_float_batches_and_other_sets_stay_float(sources):
    train, _, _ = _sets(sources["packed"])
    plain, _ = train_loader(train, plan(12, 1), 0, seed=0)
    on_cpu, _ = train_loader(train, plan(12, 1), 0, seed=0, device="cpu")
    assert next(iter(plain.loader)).images.dtype == next(iter(on_cpu.loader)).images.dtype == torch.float32
    digits, _, _ = _sets(sources["digits"])
    raw, sampler = train_loader(digits, plan(12, 1), 0, seed=0, raw=True)  # held as float: nothing to gain
    assert next(iter(raw.loader)).images.dtype == torch.float32


class _Recording(Dataset):
    """Batch i of epoch e holds the value 1000 e + i; every fetch leaves a file in ``folder``."""

    def __init__(self, n, folder):
        self.n, self.folder = n, str(folder)
        os.makedirs(self.folder, exist_ok=True)

    def __len__(self):
        return self.n

    def describe(self, index):
        return f"item {index}"

    def __getitems__(self, request):
        open(os.path.join(self.folder, f"{request.epoch}-{request[0]}-{os.getpid()}-{time.monotonic_ns()}"),
             "w").close()
        x = torch.tensor(request, dtype=torch.float32).view(-1, 1, 1, 1) + 1000.0 * request.epoch
        return Samples(x, torch.tensor(request), [])


def _fetches(folder, epoch):
    return len([f for f in os.listdir(folder) if f.startswith(f"{epoch}-")])


def _wait_for(folder, epoch, timeout=60.0):
    deadline = time.monotonic() + timeout
    while _fetches(folder, epoch) == 0:
        assert time.monotonic() < deadline, "start() began no prefetch"
        time.sleep(0.05)


def test_start_prefetches_and_iter_continues_from_it(tmp_path):
    p = plan(8, 1, 4)
    batches, sampler = train_loader(_Recording(96, tmp_path / "a"), p, 0, seed=1, num_workers=2)
    fresh, fs = train_loader(_Recording(96, tmp_path / "b"), p, 0, seed=1, num_workers=2)
    sampler.set_epoch(3)
    batches.start()
    _wait_for(tmp_path / "a", 3)  # the loader processes fetch before anyone iterates
    got = list(batches)
    fs.set_epoch(3)
    want = list(fresh)
    assert len(got) == len(want) == 24 and torch.equal(got[0][0], want[0][0])
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(got, want))
    assert _fetches(tmp_path / "a", 3) == 24  # continued from the prefetch: nothing fetched twice

    sampler.set_epoch(4)
    batches.start()
    _wait_for(tmp_path / "a", 4)
    sampler.set_epoch(5, start_step=2)  # changed after start(): the prefetch is discarded
    got = list(batches)
    fs.set_epoch(5, start_step=2)
    want = list(fresh)
    assert len(got) == len(want) == 20 and all(torch.equal(a, c) for (a, _), (c, _) in zip(got, want))
    assert got[0][0].min() >= 5000
    batches.start()  # validation-style restart with nothing changed: the same epoch again
    again = list(batches)
    assert len(again) == len(want) and all(torch.equal(a, c) for (a, _), (c, _) in zip(again, want))


# --- CUDA ------------------------------------------------------------------------------------------

@cuda_only
@pytest.mark.parametrize("name", ["packed12", "folder"])
def test_cuda_loader_batches_equal_the_cpu_float_batches(sources, name, capsys):
    train, val, _ = _sets(sources[name], "pad_crop_flip")
    p = plan(12, 1, 4)
    floats, fs = train_loader(train, p, 0, seed=5, num_workers=2)
    staged, ss = train_loader(train, p, 0, seed=5, num_workers=2, device="cuda")
    ss.set_epoch(2)
    assert next(iter(staged.loader)).images.dtype == torch.uint8 and staged.loader.pin_memory
    got = _epoch(staged, ss, 2)
    assert all(x.device.type == "cuda" and y.device.type == "cuda" for x, y in got)
    torch.cuda.synchronize()
    _compare(_epoch(floats, fs, 2), [(x.cpu(), y.cpu()) for x, y in got], "none")
    assert staged.skipped == floats.skipped
    a, b = eval_loader(val, 0, 1, 5), eval_loader(val, 0, 1, 5, device="cuda")
    _compare(list(a), [(x.cpu(), y.cpu()) for x, y in b], "none")
    capsys.readouterr()


@cuda_only
@pytest.mark.parametrize("name,augment", [("cifar24", "pad_crop_flip"), ("packed12", "crop_flip"),
                                          ("cached", "crop_flip"), ("packed", "none")])
def test_device_path_never_synchronises_on_cuda(sources, name, augment):
    train, val, _ = _sets(sources[name], augment)
    held, sampler = device_train_loader(train, plan(12, 1, 4), 0, seed=5, device="cuda", image_size=10)
    ev = device_eval_loader(val, 0, 1, 5, "cuda")
    cpu, cs = device_train_loader(train, plan(12, 1, 4), 0, seed=5, device="cpu", image_size=10)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sampler.set_epoch(0)
        held.start()  # the prefetch too runs without a synchronisation
        got = [b for epoch in (0, 1) for b in _epoch(held, sampler, epoch)]
        evals = list(ev)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    want = [b for epoch in (0, 1) for b in _epoch(cpu, cs, epoch)]
    assert len(got) == len(want) and len(evals) == len(ev)
    for (x1, y1), (x2, y2) in zip(want, got):
        assert torch.equal(y1, y2.cpu()) and (x1 - x2.cpu()).abs().max() < 0.05
