"""The engine's speed settings on the CPU: the step without host reads, step outcomes learnt late,
the pipelined stop agreement, channels-last, torch.compile and the device setting."""

import json
import os
import signal
import time

import pytest
import torch

from checks import host_reads_refused, max_abs_diff
from conftest import REPO, launch_workers, load_weights, needs_cuda, run_module
from largebatch.config.loader import load_config
from largebatch.distributed import SINGLE
from largebatch.engine import Trainer
from largebatch.engine import checkpoint as ckpt
from largebatch.engine.guards import StopSignal
from largebatch.engine.step import APPLIED, NONFINITE, SCALER_SKIP, Ledger
from largebatch.errors import RunStopped

def _trainer(tmp_path, *overrides, ledger_lag: int = 0):
    cfg = load_config(None, [f"run.dir={tmp_path}", "checkpoint.resume=never", "train.device=cpu", *overrides])
    return Trainer(cfg, SINGLE, ledger_lag=ledger_lag)


@pytest.mark.parametrize("optim,precision", [("sgd", "fp32"), ("lars", "fp32"), ("larc", "bf16"), ("lamb", "fp32"),
                                             ("lars", "fp16"), ("lamb", "fp16")])
def test_a_step_reads_no_tensor_value_on_the_host(tmp_path, monkeypatch, optim, precision):
    # A narrow model and 2 micro-batches of 32 a step: the step's path (accumulation included) at
    # little arithmetic, which fp16 and bf16 make slow on CPUs without half-precision units.
    trainer = _trainer(tmp_path, f"optim.name={optim}", f"train.precision={precision}", "train.global_batch=64",
                       "train.max_micro_batch=32", "model.width=8")
    try:
        bp = trainer.plan.phases[0].batch
        trainer.sampler.set_epoch(0, 0)
        batches, stop = iter(trainer.loader), StopSignal()
        trainer.run_step(batches, bp, 0, stop)  # the first step allocates the optimizer state

        with host_reads_refused():
            outcomes = [trainer.run_step(batches, bp, step, stop).outcome for step in range(1, 4)]
        assert [int(o) for o in outcomes] == [APPLIED] * 3
    finally:
        trainer.close()


def test_a_non_finite_step_is_skipped_on_the_device(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path, "optim.name=lars")
    try:
        bp = trainer.plan.phases[0].batch
        trainer.sampler.set_epoch(0, 0)
        batches, stop = iter(trainer.loader), StopSignal()
        trainer.run_step(batches, bp, 0, stop)
        before = {k: v.clone() for k, v in trainer.bare_model.state_dict().items()}
        trainer.faults.nan_steps.add(1)
        _, loss, _, outcome, _ = trainer.run_step(batches, bp, 1, stop)
        assert int(outcome) == NONFINITE and torch.isnan(loss)
        after = trainer.bare_model.state_dict()
        changed = [k for k in before if not torch.equal(before[k], after[k])]
        # BatchNorm's running statistics move in the forward pass; the weights must not.
        assert changed and all(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in changed)
        assert int(trainer.run_step(batches, bp, 2, stop).outcome) == APPLIED
    finally:
        trainer.close()


def test_ledger_gives_outcomes_in_order_and_holds_back_the_lag():
    ledger = Ledger(torch.device("cpu"), lag=2)
    for step, code in enumerate([APPLIED, NONFINITE, SCALER_SKIP, APPLIED]):
        ledger.add(step, torch.tensor(code, dtype=torch.int32))
    assert ledger.take(wait=False) == [(0, APPLIED), (1, NONFINITE)]
    assert len(ledger) == 2
    assert ledger.take(wait=True) == [(2, SCALER_SKIP), (3, APPLIED)]
    assert ledger.take(wait=True) == []


@needs_cuda
def test_ledger_on_cuda_learns_outcomes_when_the_device_has_copied_them():
    """The deferred path: each outcome is copied into pinned host memory without waiting, and the
    host takes it once its event says the copy is done, in step order."""
    codes = torch.tensor([APPLIED, NONFINITE, SCALER_SKIP], dtype=torch.int32, device="cuda")
    ledger = Ledger(torch.device("cuda"))
    warm = [torch.empty((), dtype=torch.int32, pin_memory=True) for _ in range(3)]  # the pinned pool set up
    del warm
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # ~1 s of device time (2e9 clock cycles) ahead of the outcomes
    for step in range(3):
        ledger.add(step, codes[step] + 0)  # an outcome computed on the device, behind the sleep
    assert all(host.is_pinned() for _, host, _ in ledger.pending) and len(ledger) == 3
    assert ledger.take(wait=False) == []  # nothing has arrived while the device is busy
    assert ledger.take(wait=True) == [(0, APPLIED), (1, NONFINITE), (2, SCALER_SKIP)] and len(ledger) == 0


def _lines(run_dir, event):
    return [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl")) if f'"event": "{event}"' in x]


def _fit(run_dir: str, lag: int, faults: str, monkeypatch, *overrides: str) -> int:
    """Train in this process with the step outcomes held back ``lag`` steps on their way to the host;
    returns the most outcomes that were still pending after the host took those that had arrived."""
    pending, take = [], Ledger.take

    def counting(ledger, wait):
        out = take(ledger, wait)
        pending.append(len(ledger))
        return out

    with monkeypatch.context() as m:
        m.setattr(Ledger, "take", counting)
        m.setenv("LARGEBATCH_FAULT", faults)
        trainer = _trainer(run_dir, "train.epochs=3", *overrides, ledger_lag=lag)
        try:
            trainer.fit()
        finally:
            trainer.close()
    return max(pending)


def test_outcomes_learnt_late_give_the_same_run(tmp_path, monkeypatch, capsys):
    """The host learns of a skipped step up to a few steps late: the weights, counts, step lines and
    the stop on non-finite steps must be those of a run that learns at once."""
    runs = {}
    for lag in (0, 5):
        d = str(tmp_path / f"lag{lag}")
        held = _fit(d, lag, "nan@3,nan@13,nan@14", monkeypatch, "train.log_every_steps=4", "checkpoint.every_steps=6")
        # the lag took effect: outcomes were still on their way after the host took what had arrived
        # (up to 3: the step line every 4 steps waits for all of them)
        assert held == (3 if lag else 0)
        err = capsys.readouterr().err
        assert all(f"skipped step {s}: non-finite loss or gradient" in err for s in (3, 13, 14)), err[-2000:]
        runs[lag] = d
    drop = ("samples_per_sec", "elapsed_s", "data_wait", "startup_s", "first_step_s", "build_s", "compile_s")
    same = [[{k: v for k, v in line.items() if k not in drop} for line in _lines(d, e)]
            for d in runs.values() for e in ("step", "epoch", "summary")]
    assert same[:3] == same[3:] and all(same[:3])
    assert _lines(runs[5], "summary")[0]["skipped_steps"] == 3
    assert max_abs_diff(load_weights(runs[0]), load_weights(runs[5])) == 0.0

    d = str(tmp_path / "stop")
    with pytest.raises(RunStopped) as stopped:
        _fit(d, 5, "nan@13,nan@14", monkeypatch, "train.max_skipped_steps=2")
    assert "2 steps in a row, the last at step 14" in str(stopped.value) and "step-000000011.pt" in str(stopped.value)


def test_signal_to_one_worker_stops_both_after_the_same_step(tmp_path):
    d = str(tmp_path / "run")
    base = ["train.epochs=30", f"run.dir={d}", "checkpoint.at_epoch_end=false", "checkpoint.every_steps=1000"]
    from conftest import free_port, start, worker_env

    port = free_port()
    procs = [start("largebatch.train", *base, cwd=REPO, env=worker_env(rank, 2, port), slot=rank) for rank in range(2)]
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.exists(os.path.join(d, "metrics.jsonl"))
                                          and os.path.getsize(os.path.join(d, "metrics.jsonl")) > 0):
        time.sleep(0.05)
    time.sleep(1.0)
    procs[1].send_signal(signal.SIGTERM)  # rank 1 only: rank 0 learns of it through the agreement
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:]
    err = outs[0][1]
    stopped = int(err.split("stopping on a signal after step ")[1].split(":")[0])
    assert [os.path.basename(p) for p in ckpt.list_checkpoints(d)] == [f"step-{stopped:09d}.pt"]
    state = ckpt.load(ckpt.list_checkpoints(d)[0])
    assert state["position"]["step"] == stopped


def test_channels_last_and_compile_give_the_same_training(tmp_path):
    fast = str(tmp_path / "fast")
    r = run_module("largebatch.train", "train.epochs=1", "train.channels_last=true", "train.compile=true",
                   "train.max_micro_batch=64", "model.width=8", f"run.dir={fast}", timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "channels-last on, torch.compile (mode default) took" in r.stderr
    startup = _lines(fast, "startup")[0]
    assert startup["compile_s"] > 0 and startup["first_step_s"] >= startup["compile_s"]
    # The checkpoint is the plain module's: it loads into an uncompiled model as it is.
    from largebatch.models import create_model

    model = create_model("cnn", 10, in_channels=1, width=8, image_size=8)
    model.load_state_dict(load_weights(fast))
    ref = str(tmp_path / "ref")
    assert run_module("largebatch.train", "train.epochs=1", "train.max_micro_batch=64", "model.width=8",
                      f"run.dir={ref}").returncode == 0
    assert max_abs_diff(load_weights(fast), load_weights(ref)) < 1e-3


def test_compile_without_a_compiler_is_one_line(tmp_path):
    r = run_module("largebatch.train", "train.compile=true", f"run.dir={tmp_path}/r",
                   env={"PATH": str(tmp_path), "CXX": ""})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("largebatch: error: train.compile=True: torch.compile needs a C++ compiler")
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where no GPU is visible")
def test_cuda_device_refused_without_a_gpu(tmp_path):
    r = run_module("largebatch.train", "train.device=cuda", f"run.dir={tmp_path}/r")
    assert r.returncode == 2
    assert r.stderr.strip() == ("largebatch: error: train.device=cuda but no CUDA GPU is visible; use "
                                "train.device=cpu or auto")


def test_header_names_the_data_path(tmp_path):
    r = run_module("largebatch.train", "train.epochs=1", f"run.dir={tmp_path}/a")
    assert r.returncode == 0 and "training data          on the device" in r.stderr
    r = run_module("largebatch.train", "train.epochs=1", "data.device_cache=off", f"run.dir={tmp_path}/b")
    assert r.returncode == 0 and "training data          through the loader (data.device_cache=off)" in r.stderr
    assert max_abs_diff(load_weights(f"{tmp_path}/a"), load_weights(f"{tmp_path}/b")) == 0.0
