"""Checkpoints under comm.shard: sharded .dcp folders (full) and ZeRO's gathered optimizer state
(optimizer); exact resume on the same workers, resharding to other world sizes and modes, and
damaged checkpoints.

One uninterrupted 2-worker run per mode writes a checkpoint every 5 steps (all kept); each resume
starts from a copy of its folder cut back to one of them. The full-sharding runs train with LARS
(momentum buffers split like their weights, norms summed over the shards), the ZeRO runs with LAMB
(moments and step counts). The global batch (128) is run in
micro-batches of 64 everywhere, so one worker sees the BatchNorm batches two workers see, and runs
on other world sizes match the reference up to rounding (which grows step by step: those resume
late in the run).
"""

import glob
import json
import os
import pickle
import shutil

import pytest
import torch

from checks import max_abs_diff
from conftest import launch_workers, load_weights, run_module
from largebatch.engine import checkpoint as ckpt
from largebatch.errors import UsageError

TIMING = ("samples_per_sec", "elapsed_s", "data_wait", "time_to_target_s", "cost", "startup_s", "first_step_s",
          "build_s", "compile_s")
ARGS = ["train.epochs=2", "train.max_micro_batch=64", "checkpoint.every_steps=5", "checkpoint.keep=10",
        "train.log_every_steps=4"]
RESHARD_TOL = 1e-5
"""The least tolerance of a run resumed on another world size; see _reshard_tolerance."""


def _train(nproc, run_dir, optimizer, *extra):
    extra = (f"optim.name={optimizer}", *extra)
    if nproc == 1:
        r = run_module("largebatch.train", *ARGS, *extra, f"run.dir={run_dir}")
        assert r.returncode == 0, r.stderr[-3000:]
        return r.stderr
    results = launch_workers(nproc, "largebatch.train", *ARGS, *extra, f"run.dir={run_dir}")
    assert [r.returncode for r in results] == [0] * nproc, results[0].stderr[-3000:] + results[-1].stderr[-3000:]
    return results[0].stderr


def _cut_back(src, dst, step):
    """A copy of run folder ``src`` as if the run had stopped right after the checkpoint of ``step``."""
    shutil.copytree(src, dst)
    for path in ckpt.list_checkpoints(dst):
        if int(os.path.basename(path)[5:14]) > step:
            shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)
    os.unlink(os.path.join(dst, "checkpoints", "final.pt"))
    return dst


def _names(run_dir):
    return [os.path.basename(p) for p in ckpt.list_checkpoints(run_dir)]


def _metrics(run_dir):
    return [{k: v for k, v in json.loads(x).items() if k not in TIMING}
            for x in open(os.path.join(run_dir, "metrics.jsonl"))]


def _param_diff(a, b):
    """Largest difference of the weights (BatchNorm running statistics follow each worker's own
    micro-batches, so they are left out where the world size changed)."""
    keys = [k for k in a if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert keys and set(a) == set(b)
    return max_abs_diff(a, b, keys)


def _reshard_tolerance(ref_dir: str, optimizer: str) -> float:
    """How far a run resumed on another world size may end from the uninterrupted ``ref_dir``: the
    rounding a change of summation order gives on this machine. A 2-worker run without sharding
    is the same training as the reference in another order of sums; how far the two drift apart
    (~1e-6 to 6e-5, depending on the CPU's kernels) sets the scale, and a resumed run may differ
    by 10 times that, at least RESHARD_TOL and at most 1e-3. A misplaced shard or lost optimizer state moves the
    weights by orders of magnitude more."""
    control = ref_dir + "-unsharded"
    _train(2, control, optimizer, "comm.shard=none")
    drift = _param_diff(load_weights(ref_dir), load_weights(control))
    return min(1e-3, max(RESHARD_TOL, 10 * drift))


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("full") / "run")
    _train(2, d, "lars", "comm.shard=full")
    return d


def test_full_resumes_exactly_and_reshards(full_run, tmp_path):
    ref = load_weights(full_run)
    tolerance = _reshard_tolerance(full_run, "lars")
    assert _names(full_run) == [f"step-{s:09d}.dcp" for s in (22, 20, 15, 11, 10, 5)]
    folder = os.path.join(full_run, "checkpoints", "step-000000010.dcp")
    assert sorted(os.listdir(folder)) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
    assert not glob.glob(os.path.join(full_run, "checkpoints", ".*"))
    # final.pt is the whole model, read as data into the unsharded model
    from largebatch.models import create_model

    model = create_model("cnn", 10, in_channels=1)
    model.load_state_dict(torch.load(os.path.join(full_run, "checkpoints", "final.pt"), weights_only=True)["model"])

    # Same 2 workers: bit-identical weights and metrics; a folder a crash left half-written is
    # ignored and cleared; checkpoint.keep applies to folders.
    d = _cut_back(full_run, str(tmp_path / "same"), 10)
    os.makedirs(os.path.join(d, "checkpoints", ".step-000000015.dcp.tmp"))
    err = _train(2, d, "lars", "comm.shard=full", "checkpoint.keep=2")
    assert f"resuming from {d}/checkpoints/step-000000010.dcp at epoch 1, step 10" in err
    out = load_weights(d)
    assert all(torch.equal(ref[k], out[k]) for k in ref)
    assert _metrics(d) == _metrics(full_run)
    assert _names(d) == ["step-000000022.dcp", "step-000000020.dcp"]
    assert not glob.glob(os.path.join(d, "checkpoints", ".*"))

    # 2 -> 1 worker, then that run's own checkpoint (written by 1 worker) -> 2 workers.
    one = _cut_back(full_run, str(tmp_path / "one"), 15)
    err = _train(1, one, "lars", "comm.shard=full")
    assert "step-000000015.dcp at epoch 2, step 15 on 1 workers instead of 2: same global batch 128" in err
    assert _param_diff(ref, load_weights(one)) <= tolerance
    two = _cut_back(one, str(tmp_path / "two"), 20)
    assert sorted(os.listdir(os.path.join(two, "checkpoints", "step-000000020.dcp"))) == [
        ".metadata", "__0_0.distcp", "meta.pt"]
    err = _train(2, two, "lars", "comm.shard=full")
    assert "step-000000020.dcp at epoch 2, step 20 on 2 workers instead of 1" in err
    assert _param_diff(ref, load_weights(two)) <= tolerance

    # comm.shard may change on resume: the sharded checkpoint continues as a plain run.
    plain = _cut_back(full_run, str(tmp_path / "plain"), 15)
    err = _train(1, plain, "lars", "comm.shard=none")
    assert "step-000000015.dcp at epoch 2, step 15 on 1 workers" in err
    assert _param_diff(ref, load_weights(plain)) <= tolerance
    assert _names(plain)[0] == "step-000000022.pt"


def test_damaged_sharded_checkpoint_falls_back(full_run, tmp_path):
    d = _cut_back(full_run, str(tmp_path / "run"), 20)
    newest, older = ckpt.list_checkpoints(d)[:2]
    assert ckpt.find_resume_state(d, "auto")["path"] == newest
    state = ckpt.find_resume_state(d, older)  # checkpoint.resume=<a .dcp folder>
    assert state["path"] == older and state["position"]["step"] == 15 and state["world_size"] == 2
    with pytest.raises(UsageError, match="is a folder but not a sharded checkpoint"):
        ckpt.find_resume_state(d, os.path.join(d, "checkpoints"))

    def falls_back(expected):
        warnings = []
        state = ckpt.find_resume_state(d, "auto", warn=warnings.append)
        assert state["path"] == older and len(warnings) == 1, warnings
        assert f"skipping checkpoint {newest}: {expected}" in warnings[0] and "trying the previous one" in warnings[0]
        with pytest.raises(UsageError, match="cannot be loaded"):
            ckpt.find_resume_state(d, newest)

    shard = os.path.join(newest, "__1_0.distcp")
    whole = open(shard, "rb").read()
    with open(shard, "r+b") as fh:
        fh.truncate(len(whole) // 2)
    falls_back(f"its shard file __1_0.distcp is cut off ({len(whole) // 2} of")
    os.unlink(shard)
    falls_back("its shard file __1_0.distcp is missing")
    open(shard, "wb").write(whole)
    metadata = os.path.join(newest, ".metadata")
    os.rename(metadata, metadata + ".away")
    falls_back("its .metadata is missing")
    os.rename(metadata + ".away", metadata)
    os.rename(os.path.join(newest, "meta.pt"), os.path.join(tmp_path, "meta.pt"))
    falls_back("its meta.pt is missing")
    os.rename(os.path.join(tmp_path, "meta.pt"), os.path.join(newest, "meta.pt"))

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    original = open(metadata, "rb").read()
    with open(metadata, "wb") as fh:
        pickle.dump(Evil(), fh)
    falls_back("its .metadata cannot be read (UnpicklingError: checkpoint metadata names posix.system")
    assert not os.path.exists(tmp_path / "pwned")
    open(metadata, "wb").write(original)
    assert ckpt.find_resume_state(d, "auto")["path"] == newest

    # A fresh start moves the folders aside like files.
    folder = ckpt.move_aside(d)
    assert _names(d) == [] and sorted(os.listdir(folder)) == [f"step-{s:09d}.dcp" for s in (5, 10, 11, 15, 20)]


def test_zero_optimizer_state_reshards_and_changes_mode(tmp_path):
    ref_dir = str(tmp_path / "ref")
    _train(2, ref_dir, "lamb", "comm.shard=optimizer")
    ref = load_weights(ref_dir)
    tolerance = _reshard_tolerance(ref_dir, "lamb")
    assert _names(ref_dir)[0] == "step-000000022.pt"
    # rank 0 wrote every worker's share of the optimizer state: moments for every weight
    from largebatch.models import create_model

    saved = ckpt.load(os.path.join(ref_dir, "checkpoints", "step-000000010.pt"))
    weights = len(list(create_model("cnn", 10, in_channels=1).parameters()))
    assert saved["world_size"] == 2 and len(saved["optimizer"]["state"]) == weights
    assert all(s["exp_avg_sq"].sum() > 0 and s["step"] == 10 for s in saved["optimizer"]["state"].values())

    one = _cut_back(ref_dir, str(tmp_path / "one"), 15)
    err = _train(1, one, "lamb", "comm.shard=optimizer")
    assert "on 1 workers instead of 2" in err
    assert _param_diff(ref, load_weights(one)) <= tolerance

    # comm.shard may change on resume: a plain checkpoint's weights and optimizer state are split
    # over the workers of a sharded run.
    full = _cut_back(ref_dir, str(tmp_path / "full"), 15)
    err = _train(2, full, "lamb", "comm.shard=full")
    assert f"resuming from {full}/checkpoints/step-000000015.pt at epoch 2, step 15\n" in err
    assert _param_diff(ref, load_weights(full)) <= tolerance
    assert _names(full)[0] == "step-000000022.dcp"
