"""comm.bucket_mb=auto: the candidates, the choice, and a run that is the same run as the size it chose."""

from __future__ import annotations

import json
import os
import textwrap

import pytest

from checks import max_abs_diff
from conftest import launch_workers, load_weights
from largebatch.config import load_config
from largebatch.engine.bucket_tuning import candidate_sizes, choose
from largebatch.errors import UsageError


@pytest.mark.parametrize("grad_mb, expected", [
    (25.1, [1, 4, 16, 64]),          # ResNet-9: 64 and 256 both make one bucket; only 64 is tried
    (97.5, [1, 4, 16, 64, 256]),     # ResNet-50
    (0.2, [1]),                      # a small CNN: one bucket whatever the size
    (16.0, [1, 4, 16]),              # a size equal to the gradients already makes one bucket
    (5000.0, [1, 4, 16, 64, 256]),   # no candidate holds everything: none is added
])
def test_candidate_sizes(grad_mb, expected):
    assert candidate_sizes([1, 4, 16, 64, 256], grad_mb) == [float(s) for s in expected]


def test_candidate_sizes_sorts_and_drops_repeats():
    assert candidate_sizes([16, 1, 16.0, 4], 100.0) == [1.0, 4.0, 16.0]


def test_choose_takes_the_slowest_worker_per_size_then_the_fastest_size():
    # Worker 1 is slow with 1 MiB buckets: by the slowest worker, 4 MiB wins although worker 0 is
    # fastest with 1 MiB.
    per_worker = [{1.0: 0.10, 4.0: 0.12, 16.0: 0.20}, {1.0: 0.30, 4.0: 0.13, 16.0: 0.14}]
    best, slowest = choose(per_worker)
    assert best == 4.0 and slowest == {1.0: 0.30, 4.0: 0.13, 16.0: 0.20}


def test_choose_breaks_ties_towards_fewer_calls():
    assert choose([{1.0: 0.1, 4.0: 0.1, 16.0: 0.2}])[0] == 4.0


def test_config_takes_auto_or_a_size():
    assert load_config(None, ["comm.bucket_mb=auto"]).comm.bucket_mb == "auto"
    assert load_config(None, ["comm.bucket_mb=4"]).comm.bucket_mb == 4.0
    assert load_config(None, ["comm.bucket_candidates_mb=[1e-3,4]"]).comm.bucket_candidates_mb == [0.001, 4.0]
    for bad, message in [("comm.bucket_mb=big", "comm.bucket_mb='big' is not allowed: use a size in MiB > 0, or auto"),
                         ("comm.bucket_mb=0", "comm.bucket_mb=0.0 is not allowed: use a size in MiB > 0, or auto"),
                         ("comm.bucket_mb=true", "comm.bucket_mb=True is not allowed: use a size in MiB > 0, or auto"),
                         ("comm.bucket_mb=.inf", "comm.bucket_mb=inf is not allowed: use a size in MiB > 0, or auto"),
                         ("comm.bucket_candidates_mb=[]", "comm.bucket_candidates_mb=[] is not allowed: use a list"),
                         ("comm.bucket_candidates_mb=[4,-1]", "comm.bucket_candidates_mb=[4.0, -1.0] is not allowed"),
                         ("comm.bucket_candidates_mb=[4,x]", "comm.bucket_candidates_mb[1]='x' is not allowed: use a "
                                                             "number")]:
        with pytest.raises(UsageError) as err:
            load_config(None, [bad])
        assert str(err.value).startswith(message)


_WORKER = textwrap.dedent("""
    import gc, json, sys
    import torch
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel
    from largebatch.distributed import Communicator, discover
    from largebatch.engine.bucket_tuning import tune_bucket_size

    topo = discover()
    comm = Communicator(topo, "gloo", torch.device("cpu"), None, timeout_s=60)
    torch.manual_seed(0)
    # dropout draws from the global generator in every timed pass; BatchNorm updates its statistics
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Dropout(0.5),
                          nn.Flatten(), nn.Linear(16 * 8 * 8, 10))
    with torch.no_grad():  # statistics that differ from a fresh model's, to see that they come back
        model(torch.randn(32, 1, 8, 8) * 3 + 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    choice = tune_bucket_size(comm, model, [0.004, 0.02, 1.0, 4.0], 16, (1, 8, 8), 10, torch.device("cpu"))
    gc.collect()
    out = dict(
        chosen=choice.bucket_mb, candidates=list(choice.seconds), gradient_mb=choice.gradient_mb,
        state_kept=all(torch.equal(before[k], v) for k, v in model.state_dict().items()),
        rng_kept=torch.equal(rng, torch.get_rng_state()), grads_cleared=all(p.grad is None for p in model.parameters()),
        ddp_left=sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects()),
        training=model.training, line=choice.line(), tuning_s=choice.tuning_s)
    print("RESULT " + json.dumps(out))
    comm.close()
""")


def _results(results) -> list[dict]:
    outs = []
    for r in results:
        assert r.returncode == 0, r.stderr[-3000:]
        outs.append(json.loads(r.stdout.split("RESULT ", 1)[1]))
    return outs


def test_tuning_agrees_across_workers_and_leaves_the_model_as_it_was(tmp_path):
    (tmp_path / "tune_worker.py").write_text(_WORKER)
    a, b = _results(launch_workers(2, "tune_worker", cwd=str(tmp_path)))
    assert a["chosen"] == b["chosen"] and a["candidates"] == b["candidates"]
    # the model's gradients are 0.04 MiB: 1 and 4 MiB both make one bucket, so 4 is not timed
    assert 0.02 < a["gradient_mb"] < 1.0 and a["candidates"] == [0.004, 0.02, 1.0]
    assert a["chosen"] in a["candidates"] and a["tuning_s"] > 0
    for out in (a, b):
        assert out["state_kept"] and out["rng_kept"] and out["grads_cleared"] and out["training"]
        assert out["ddp_left"] == 0  # every timed wrapper (and its buckets) was freed
    assert a["line"].startswith(f"{a['chosen']:g} MiB (comm.bucket_mb=auto over ")


QUICK = ["model.name=cnn", "model.width=16", "train.epochs=1", "train.global_batch=64", "run.seed=3"]
AUTO = ["comm.bucket_mb=auto", "comm.bucket_candidates_mb=[0.004,0.02,1]"]

_TRAINER = textwrap.dedent("""
    import json, sys
    from largebatch.config import load_config
    from largebatch.distributed import discover
    from largebatch.engine import Trainer

    trainer = Trainer(load_config(None, sys.argv[1:]), discover())
    print("RESULT " + json.dumps(dict(chosen=trainer.bucket_choice.bucket_mb,
                                      ddp_cap_mb=trainer.model.bucket_bytes_cap / 2**20)))
    trainer.close()
""")


def test_the_trainers_ddp_uses_the_size_chosen(tmp_path):
    (tmp_path / "trainer_worker.py").write_text(_TRAINER)
    outs = _results(launch_workers(2, "trainer_worker", *QUICK, *AUTO, f"run.dir={tmp_path / 'run'}",
                                   cwd=str(tmp_path)))
    assert outs[0]["chosen"] == outs[1]["chosen"]
    for out in outs:
        assert out["ddp_cap_mb"] == pytest.approx(out["chosen"], rel=1e-3)


def _events(run_dir: str) -> list[dict]:
    return [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def auto_run(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("auto") / "run")
    results = launch_workers(2, "largebatch.train", *QUICK, *AUTO, f"run.dir={run_dir}")
    assert [r.returncode for r in results] == [0, 0], results[0].stderr[-3000:]
    return run_dir, results[0].stderr


def test_auto_run_is_the_run_at_the_size_it_chose(auto_run, tmp_path):
    auto_dir, stderr = auto_run
    assert "gradient buckets" in stderr and "comm.bucket_mb=auto over" in stderr
    events = _events(auto_dir)
    tuning = [e for e in events if e["event"] == "bucket_tuning"]
    assert len(tuning) == 1 and tuning[0]["candidates_mb"] == [0.004, 0.02, 1.0] and tuning[0]["tuning_s"] > 0
    chosen = events[-1]["bucket_mb"]
    assert chosen == tuning[0]["bucket_mb"] and chosen in tuning[0]["candidates_mb"]

    fixed_dir = str(tmp_path / "fixed")
    results = launch_workers(2, "largebatch.train", *QUICK, f"comm.bucket_mb={chosen}", f"run.dir={fixed_dir}")
    assert [r.returncode for r in results] == [0, 0], results[0].stderr[-3000:]
    assert max_abs_diff(load_weights(auto_dir), load_weights(fixed_dir)) == 0.0


def test_a_resumed_auto_run_keeps_its_size(auto_run, tmp_path):
    d = str(tmp_path / "run")
    args = [*QUICK, *AUTO, "checkpoint.every_steps=5", f"run.dir={d}"]
    # Both workers die at the start of step 12; the newest checkpoint is step 10.
    first = launch_workers(2, "largebatch.train", *args, env={"LARGEBATCH_FAULT": "exit@12:0,exit@12:1"})
    assert [r.returncode for r in first] == [137, 137]
    (tuned,) = [e for e in _events(d) if e["event"] == "bucket_tuning"]
    second = launch_workers(2, "largebatch.train", *args)
    assert [r.returncode for r in second] == [0, 0], second[0].stderr[-2000:]
    assert "resuming from" in second[0].stderr
    assert f"{tuned['bucket_mb']:g} MiB (comm.bucket_mb=auto: chosen when the run started, read from the " \
           "checkpoint)" in second[0].stderr
    events = _events(d)
    assert [e for e in events if e["event"] == "bucket_tuning"] == [tuned]  # kept, not timed again
    assert events[-1]["bucket_mb"] == tuned["bucket_mb"]
    assert max_abs_diff(load_weights(d), load_weights(auto_run[0])) == 0.0
