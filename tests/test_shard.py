"""comm.shard: ZeRO-1 (optimizer) and FSDP2 (full) train to the weights of plain DDP (none).

Launching workers costs more than the short trainings compared here, so one pair of gloo workers
runs every case in-process (this file is also the workers' script) and rank 0 prints what it
found as ``RESULT {json}`` lines; one single process does the same on one worker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from checks import host_reads_refused, max_abs_diff, worst
from conftest import (TIMEOUT_S, _env, _finish, initial_weights, launch_workers, load_weights, needs_cuda, run_module,
                      start)

# An MLP without BatchNorm whose hidden width 33 gives tensors with an odd first dimension: FSDP2
# splits them 17 + 16 over two workers (uneven shards). 1438 digits at a global batch of 256:
# 5 steps per epoch. Validation batches of 179 give the two workers 2 and 1 batches of their
# 180 and 179 images, so under full one worker pads with a forward pass.
BASE = ["model.name=mlp", "model.norm=none", "model.width=33", "train.global_batch=256", "train.epochs=2",
        "train.eval_batch=179", "train.device=cpu", "checkpoint.at_epoch_end=false", "checkpoint.resume=never",
        "run.seed=5", "schedule.warmup_epochs=0.5"]
ACCUMULATE = ["train.max_micro_batch=32"]  # 128 images per worker: 4 micro-batches
# case: (overrides, {variant: its overrides}); every variant is compared with "none", the plain DDP
# run without accumulation (accumulation changes nothing but rounding for a model without BatchNorm).
CASES = {
    opt: ([f"optim.name={opt}"], {"none": ["comm.shard=none"], "optimizer": ["comm.shard=optimizer"],
                                  "full": ["comm.shard=full"],
                                  "optimizer, accumulation": ["comm.shard=optimizer", *ACCUMULATE],
                                  "full, accumulation": ["comm.shard=full", *ACCUMULATE]})
    for opt in ("sgd", "lars", "larc", "lamb")
}
# ZeRO-1 leaves the gradient averaging to DDP, whose communication hooks then still apply.
CASES["powersgd"] = (["optim.name=lars", "comm.compression=powersgd", "comm.powersgd_start_step=3"],
                     {"none": ["comm.shard=none"], "optimizer": ["comm.shard=optimizer"]})
# fp16 under full: the gradient scaler's overflow flag is agreed by the workers.
CASES["lamb, fp16"] = (["optim.name=lamb", "train.precision=fp16", *ACCUMULATE],
                       {"none": ["comm.shard=none"], "full": ["comm.shard=full"]})
# BatchNorm under full: each worker's running statistics follow its own micro-batches, and rank
# 0's are broadcast before validation (DDP's rule), so rank 0's match DDP's and every worker ends
# with them; with precise BN the statistics are averaged over the workers in both modes.
CASES["batchnorm"] = (["model.norm=batch", "optim.name=lars", "train.precise_bn_images=0", *ACCUMULATE],
                      {"none": ["comm.shard=none"], "full": ["comm.shard=full"]})
CASES["batchnorm, precise BN"] = (["model.norm=batch", "optim.name=sgd", "train.precise_bn_images=200"],
                                  {"none": ["comm.shard=none"], "full": ["comm.shard=full"]})
TOLERANCE = 1e-5


def _full_state(module) -> dict:
    """The module's whole state (FSDP2's DTensors gathered: every worker calls this)."""
    from largebatch.distributed import is_sharded

    return {k: (v.full_tensor() if is_sharded(v) else v).detach().clone() for k, v in module.state_dict().items()}


def _train(args: list[str], run_dir: str):
    """(initial state, final state, trainer facts) of one training; the trainer is closed after."""
    from largebatch.config.loader import load_config
    from largebatch.distributed import discover, is_sharded, local
    from largebatch.distributed.wrap import unwrap
    from largebatch.engine import Trainer

    trainer = Trainer(load_config(None, [*args, f"run.dir={run_dir}"]), discover())
    try:
        model = unwrap(trainer.model)
        first = _full_state(model)
        summary = trainer.fit()
        facts = dict(val_acc=summary["val_acc"], optimizer=type(trainer.optimizer).__name__)
        if hasattr(trainer.optimizer, "optim"):  # ZeRO-1: this worker's share of the tensors
            facts["own_tensors"] = sum(len(g["params"]) for g in trainer.optimizer.optim.param_groups)
            facts["all_tensors"] = sum(len(g["params"]) for g in trainer.optimizer.param_groups)
        sharded = [p for p in model.parameters() if is_sharded(p)]
        facts["local_rows"] = sorted({(tuple(p.shape)[0], local(p).shape[0]) for p in sharded})
        last = _full_state(model)
        facts["buffers"] = {k: v.tolist() for k, v in model.state_dict().items() if "running_" in k}
    finally:
        trainer.close()
    return first, last, facts


def _compare(cases: dict, root: str, rank: int) -> None:
    for name, (extra, variants) in cases.items():
        states, facts = {}, {}
        for variant, args in variants.items():
            folder = f"{name}-{variant}".replace(", ", "-").replace(" ", "-")
            first, states[variant], facts[variant] = _train([*BASE, *extra, *args], os.path.join(root, folder))
            if variant == "none":
                moved = max_abs_diff(first, states[variant])
        params = [k for k in states["none"] if "running_" not in k and "num_batches" not in k]
        result = dict(case=name, rank=rank, moved=moved, facts=facts,
                      weights={v: max_abs_diff(states["none"], states[v], params) for v in variants},
                      state={v: max_abs_diff(states["none"], states[v]) for v in variants})
        print("RESULT " + json.dumps(result), flush=True)


STEP_CHECKS = {
    "full, lars": ["comm.shard=full", "optim.name=lars"],
    "full, lamb, fp16, accumulation": ["comm.shard=full", "optim.name=lamb", "train.precision=fp16", *ACCUMULATE],
    "optimizer, sgd": ["comm.shard=optimizer", "optim.name=sgd"],
    "optimizer, lamb, fp16": ["comm.shard=optimizer", "optim.name=lamb", "train.precision=fp16"],
}
POISONED_STEP = 3


def _check_steps(root: str, rank: int) -> None:
    """Steps 1 and 2 read no tensor value on the host; at step 3 worker 1 alone meets a non-finite
    value where each mode would meet it: under full, an infinity in its gradient shard after the
    reduce-scatter (each worker checks only its own shards); under optimizer, a NaN loss, so its
    local gradient is non-finite before DDP averages it."""
    from largebatch.config.loader import load_config
    from largebatch.distributed import discover, local
    from largebatch.distributed.wrap import unwrap
    from largebatch.engine import Trainer
    from largebatch.engine.guards import StopSignal

    for name, args in STEP_CHECKS.items():
        folder = os.path.join(root, "steps-" + name.replace(", ", "-"))
        trainer = Trainer(load_config(None, [*BASE, *args, f"run.dir={folder}"]), discover())
        try:
            stepper, bp = trainer.stepper, trainer.plan.phases[0].batch
            backward = stepper._backward

            def poisoned(loss, step):
                hit = rank == 1 and step == POISONED_STEP
                backward(loss * float("nan") if hit and name.startswith("optimizer") else loss, step)
                if hit and name.startswith("full"):
                    grad = next(local(p.grad) for p in stepper.params if local(p.grad).numel())
                    grad.view(-1)[0] = float("inf")

            stepper._backward = poisoned
            trainer.sampler.set_epoch(0, 0)
            batches, stop = iter(trainer.loader), StopSignal()
            trainer.run_step(batches, bp, 0, stop)  # the first step allocates the optimizer state
            before = _full_state(unwrap(trainer.model))
            error, outcomes = None, []
            try:
                with host_reads_refused():
                    outcomes += [trainer.run_step(batches, bp, step, stop).outcome for step in range(1, POISONED_STEP)]
            except AssertionError as exc:
                error = str(exc)
            middle = _full_state(unwrap(trainer.model))
            outcomes.append(trainer.run_step(batches, bp, POISONED_STEP, stop).outcome)
            after = _full_state(unwrap(trainer.model))
            print("RESULT " + json.dumps(dict(case="steps: " + name, rank=rank, error=error,
                                              outcomes=[int(o) for o in outcomes],
                                              trained=max_abs_diff(before, middle), poisoned=max_abs_diff(middle, after))),
                  flush=True)
        finally:
            trainer.close()


def _workers(root: str) -> None:
    """Every case on 2 gloo workers, in one process group that each trainer joins."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        _compare(CASES, root, dist.get_rank())
        _check_steps(root, dist.get_rank())
    finally:
        dist.destroy_process_group()


def _single(root: str) -> None:
    """One worker: optimizer and full run on a 1-rank process group of their own."""
    _compare({"one worker": (["optim.name=lamb", *ACCUMULATE],
                             {v: [f"comm.shard={v}"] for v in ("none", "optimizer", "full")})}, root, 0)
    _mixed_precision()


def _mixed_precision() -> None:
    """FSDP2's bf16 compute (what train.precision=bf16 uses on GPUs) on models with BatchNorm layers
    as blocks (the MLP) and inside blocks (ResNet-9), on the CPU."""
    import torch
    import torch.distributed as dist

    from largebatch.distributed.shard import device_mesh, fully_shard_model
    from largebatch.models import create_model

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        found = {}
        for name, options, size in (("mlp", dict(image_size=8, width=33), 8), ("resnet9", {}, 16)):
            model = create_model(name, 10, in_channels=3, norm="batch", **options)
            fully_shard_model(model, device_mesh(1, torch.device("cpu")), param_dtype=torch.bfloat16)
            logits = model(torch.randn(4, 3, size, size))
            logits.float().sum().backward()
            found[name] = dict(logits=str(logits.dtype), grads=sorted({str(p.grad.dtype) for p in model.parameters()}))
    finally:
        dist.destroy_process_group()
    print("RESULT " + json.dumps(dict(case="bf16 compute", rank=0, found=found)), flush=True)


def _results(stdout: str) -> dict:
    out = {}
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            r = json.loads(line[len("RESULT "):])
            out[(r["case"], r["rank"])] = r
    return out


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("shard"))
    results = launch_workers(2, os.path.abspath(__file__), "workers", root, timeout=300)
    for rank, r in enumerate(results):
        assert r.returncode == 0, f"rank {rank}: {r.stderr[-3000:]}"
    found = {**_results(results[0].stdout), **_results(results[1].stdout)}
    return found, results[0].stderr, root


@pytest.mark.parametrize("case", [c for c in CASES if c in ("sgd", "lars", "larc", "lamb")])
def test_optimizer_and_full_sharding_train_the_same_weights_as_ddp(two_workers, case):
    found, _, _ = two_workers
    for rank in (0, 1):
        r = found[(case, rank)]
        assert r["moved"] > 100 * TOLERANCE  # real training, far from the shared start
        assert worst(r["state"].values()) <= TOLERANCE, r["state"]
        for variant in ("optimizer", "optimizer, accumulation"):
            zero = r["facts"][variant]
            assert zero["optimizer"] == "ZeroOptimizer" and 0 < zero["own_tensors"] < zero["all_tensors"]
        # FSDP2 held every tensor split over the two workers, the 33-row ones unevenly (17 + 16)
        for variant in ("full", "full, accumulation"):
            rows = dict(r["facts"][variant]["local_rows"])
            assert rows == {33: 17 if rank == 0 else 16, 10: 5}, rows
            assert r["facts"][variant]["val_acc"] == pytest.approx(r["facts"]["none"]["val_acc"], abs=1e-6)
        assert r["facts"]["none"]["local_rows"] == []


@pytest.mark.parametrize("case", STEP_CHECKS)
def test_a_sharded_step_reads_no_tensor_value_on_the_host_and_skips_together(two_workers, case):
    from largebatch.engine.step import APPLIED, NONFINITE, SCALER_SKIP

    found, _, _ = two_workers
    for rank in (0, 1):
        r = found[("steps: " + case, rank)]
        assert r["error"] is None
        assert r["trained"] > 0
        # one worker met a non-finite value (full: in its gradient shard; optimizer: in its local
        # gradient): every worker skipped the step (fp16: the gradient scaler's overflow flag)
        skipped = SCALER_SKIP if "fp16" in case else NONFINITE
        assert r["outcomes"] == [APPLIED, APPLIED, skipped] and r["poisoned"] == 0.0


def test_optimizer_sharding_keeps_ddp_gradient_compression(two_workers):
    found, _, _ = two_workers
    for rank in (0, 1):
        r = found[("powersgd", rank)]
        assert r["moved"] > 100 * TOLERANCE and r["state"]["optimizer"] <= TOLERANCE, r["state"]


def test_fp16_under_full_sharding_trains_the_same_weights_as_ddp(two_workers):
    found, _, _ = two_workers
    for rank in (0, 1):
        r = found[("lamb, fp16", rank)]
        assert r["moved"] > 100 * TOLERANCE and r["state"]["full"] <= TOLERANCE, r["state"]


def test_batchnorm_statistics_under_full_are_rank_0s_as_under_ddp(two_workers):
    found, _, _ = two_workers
    zero, one = found[("batchnorm", 0)], found[("batchnorm", 1)]
    for r in (zero, one):
        assert r["weights"]["full"] <= TOLERANCE
    # rank 0's statistics are those of DDP (which broadcasts rank 0's before every forward pass)...
    assert zero["state"]["full"] <= TOLERANCE
    # ...and every worker holds them after validation under full
    assert one["facts"]["full"]["buffers"] == zero["facts"]["full"]["buffers"]
    assert one["facts"]["full"]["buffers"] != one["facts"]["none"]["buffers"]  # DDP's rank 1 kept its own last update


def test_precise_bn_under_full_matches_ddp(two_workers):
    found, _, _ = two_workers
    for rank in (0, 1):
        r = found[("batchnorm, precise BN", rank)]
        assert r["state"]["full"] <= TOLERANCE, r["state"]


def test_run_header_names_the_shard_mode(two_workers):
    _, stderr, _ = two_workers
    assert stderr.count("sharding               full (FSDP2, 3 blocks + root") == 2 * 4 + 1
    assert stderr.count("sharding               full (FSDP2, 5 blocks + root") == 2  # BatchNorm layers too
    assert stderr.count("sharding               optimizer (ZeRO-1") == 2 * 4 + 1
    assert stderr.count("sharding               none") == 4 + 1 + 1 + 2


def test_one_worker_shards_on_a_process_group_of_its_own(tmp_path):
    p = start(os.path.abspath(__file__), "single", str(tmp_path))
    stdout, stderr = _finish(p, TIMEOUT_S)
    assert p.returncode == 0, stderr[-3000:]
    r = _results(stdout)[("one worker", 0)]
    assert r["moved"] > 100 * TOLERANCE
    assert r["state"]["optimizer"] <= TOLERANCE and r["state"]["full"] <= TOLERANCE, r["state"]
    assert r["facts"]["optimizer"]["optimizer"] == "ZeroOptimizer"
    assert dict(r["facts"]["full"]["local_rows"]) == {33: 33, 10: 10}  # one shard: the whole tensor
    assert "sharding               full (FSDP2, 3 blocks + root" in stderr
    for name, found in _results(stdout)[("bf16 compute", 0)]["found"].items():
        assert found == dict(logits="torch.bfloat16", grads=["torch.float32"]), (name, found)
    # final.pt is the plain model's whole state_dict, as without sharding
    from largebatch.models import create_model

    model = create_model("mlp", 10, in_channels=1, norm="none", image_size=8, width=33)
    full = load_weights(os.path.join(str(tmp_path), "one-worker-full"))
    model.load_state_dict(full)
    assert max_abs_diff(full, load_weights(os.path.join(str(tmp_path), "one-worker-none"))) <= TOLERANCE


@needs_cuda
def test_bf16_on_a_gpu_under_full_sharding(tmp_path):
    """FSDP2's mixed precision instead of autocast: bf16 compute, float32 master weights, and the
    BatchNorm layers in float32 (their kernels refuse bf16 weights next to float32 statistics)."""
    args = [a for a in BASE if not a.startswith(("train.device", "model.norm"))]
    runs = {}
    for shard in ("none", "full"):
        runs[shard] = str(tmp_path / shard)
        r = run_module("largebatch.train", *args, "train.device=cuda", "model.norm=batch", "train.precision=bf16",
                       f"comm.shard={shard}", f"run.dir={runs[shard]}", cuda=True)
        assert r.returncode == 0, r.stderr[-3000:]
    assert "bf16 compute on float32 master weights" in r.stderr
    from largebatch.models import create_model

    model = create_model("mlp", 10, in_channels=1, norm="batch", image_size=8, width=33)
    full = load_weights(runs["full"])
    model.load_state_dict(full)
    assert all(v.dtype != torch.bfloat16 and torch.isfinite(v.float()).all() for v in full.values())
    # bf16 rounds differently with FSDP2's cast weights than under autocast: close, not equal, and
    # far closer to each other than to where training started, tensor by tensor (the BatchNorm
    # weights move least)
    start = initial_weights(str(tmp_path / "init"), *args, "train.device=cuda", "model.norm=batch")
    none = load_weights(runs["none"])
    weights = [k for k in full if "running_" not in k and "num_batches" not in k]
    assert max_abs_diff(start, none, weights) > 1e-2  # training moved the weights
    for k in weights:  # a tensor that barely moved is held to bf16's rounding of its values
        moved = max_abs_diff([start[k]], [none[k]])
        assert max_abs_diff([full[k]], [none[k]]) < max(0.25 * moved, 4e-3), (k, moved)


def _mpiexec():
    import importlib.util
    import shutil

    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    found = beside if os.access(beside, os.X_OK) else shutil.which("mpiexec")
    return found if found and importlib.util.find_spec("mpi4py") is not None else None


@pytest.mark.skipif(_mpiexec() is None, reason="needs mpiexec and mpi4py: pip install -e '.[mpi]'")
def test_optimizer_sharding_over_mpi(two_workers, tmp_path):
    """ZeRO-1's broadcasts go over the default group, gloo under comm.backend=mpi; DDP's MPI hook
    averages the gradients. Same weights as the lars run of plain DDP over gloo."""
    _, _, root = two_workers
    out = str(tmp_path / "run")
    p = subprocess.run([_mpiexec(), "-n", "2", sys.executable, "-m", "largebatch.train", *BASE, "optim.name=lars",
                        "comm.shard=optimizer", "comm.backend=mpi", f"run.dir={out}"], env=_env(),
                       capture_output=True, text=True, timeout=TIMEOUT_S)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "over mpi" in p.stderr and "sharding               optimizer (ZeRO-1" in p.stderr
    assert max_abs_diff(load_weights(out), load_weights(os.path.join(root, "lars-none"))) <= TOLERANCE


@pytest.mark.parametrize("args,message", [
    (["comm.shard=full", "comm.backend=mpi"], "comm.shard=full reduce-scatters through torch.distributed"),
    (["comm.shard=full", "comm.compression=fp16"], "comm.shard=full with comm.compression=fp16 is not supported"),
    (["comm.shard=zero3"], "comm.shard='zero3' is not allowed: choose one of none, optimizer, full"),
])
def test_refusals_in_one_line(args, message):
    from largebatch.config.loader import load_config
    from largebatch.errors import UsageError

    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, args)


def test_refusal_through_the_command_line(run_dir):
    r = run_module("largebatch.train", f"run.dir={run_dir}", "comm.shard=full", "comm.backend=mpi")
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("largebatch: error: comm.shard=full") and "use comm.backend=gloo" in lines[0]
    assert not os.path.exists(run_dir)


if __name__ == "__main__":
    {"workers": _workers, "single": _single}[sys.argv[1]](sys.argv[2])
