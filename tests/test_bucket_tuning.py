"""comm.bucket_mb=auto: the candidates, the choice, and a run that is the same run as the size it chose."""

from __future__ import annotations

import json
import os
import textwrap

import pytest

from conftest import launch_workers, load_weights, max_abs_diff, torchrun
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
    for bad, message in [("comm.bucket_mb=big", "use a size in MiB > 0, or auto"),
                         ("comm.bucket_mb=0", "use a size in MiB > 0, or auto"),
                         ("comm.bucket_mb=true", "use a number or a string"),
                         ("comm.bucket_candidates_mb=[]", "use a list of sizes in MiB > 0"),
                         ("comm.bucket_candidates_mb=[4,-1]", "use a list of sizes in MiB > 0")]:
        with pytest.raises(UsageError, match=message.replace("(", r"\(")):
            load_config(None, [bad])


_WORKER = textwrap.dedent("""
    import gc, json, sys
    import torch
    from torch.nn.parallel import DistributedDataParallel
    from largebatch.distributed import Communicator, discover
    from largebatch.engine.bucket_tuning import tune_bucket_size
    from largebatch.models import create_model

    topo = discover()
    comm = Communicator(topo, "gloo", torch.device("cpu"), None, timeout_s=60)
    torch.manual_seed(0)
    model = create_model("cnn", 10, in_channels=1, norm="batch", width=16, image_size=8)
    # BatchNorm statistics that differ from a fresh model's, to see that they come back
    with torch.no_grad():
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
        training=model.training, line=choice.line())
    print("RESULT " + json.dumps(out))
    comm.close()
""")


def test_tuning_agrees_across_workers_and_leaves_the_model_as_it_was(tmp_path):
    (tmp_path / "tune_worker.py").write_text(_WORKER)
    results = launch_workers(2, "tune_worker", cwd=str(tmp_path))
    outs = []
    for r in results:
        assert r.returncode == 0, r.stderr[-3000:]
        outs.append(json.loads(r.stdout.split("RESULT ", 1)[1]))
    a, b = outs
    assert a["chosen"] == b["chosen"] and a["candidates"] == b["candidates"]
    # the CNN's gradients are about 0.1 MiB: 1 and 4 MiB both make one bucket, so 4 is not timed
    assert 0.02 < a["gradient_mb"] < 1.0 and a["candidates"] == [0.004, 0.02, 1.0]
    assert a["chosen"] in a["candidates"]
    for out in outs:
        assert out["state_kept"] and out["rng_kept"] and out["grads_cleared"] and out["training"]
        assert out["ddp_left"] == 0  # every timed wrapper (and its buckets) was freed
    assert a["line"].startswith(f"{a['chosen']:g} MiB (comm.bucket_mb=auto over ")


QUICK = ["model.name=cnn", "model.width=16", "train.epochs=1", "train.global_batch=64", "run.seed=3"]


def test_auto_run_is_the_run_at_the_size_it_chose(tmp_path):
    auto_dir = str(tmp_path / "auto")
    r = torchrun(2, "largebatch.train", *QUICK, "comm.bucket_mb=auto", "comm.bucket_candidates_mb=[0.004,0.02,1]",
                 f"run.dir={auto_dir}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "gradient buckets" in r.stderr and "comm.bucket_mb=auto over" in r.stderr
    events = [json.loads(x) for x in open(os.path.join(auto_dir, "metrics.jsonl"))]
    tuning = [e for e in events if e["event"] == "bucket_tuning"]
    assert len(tuning) == 1 and tuning[0]["candidates_mb"] == [0.004, 0.02, 1.0]
    chosen = events[-1]["bucket_mb"]
    assert chosen == tuning[0]["bucket_mb"] and chosen in tuning[0]["candidates_mb"]

    fixed_dir = str(tmp_path / "fixed")
    r = torchrun(2, "largebatch.train", *QUICK, f"comm.bucket_mb={chosen}", f"run.dir={fixed_dir}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert max_abs_diff(load_weights(auto_dir), load_weights(fixed_dir)) == 0.0
