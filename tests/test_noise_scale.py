"""The gradient noise scale: the estimator against an exact computation, its averaging, and the
communication hook that measures each worker's local gradient."""

from __future__ import annotations

import json
import math
import textwrap

import pytest
import torch
import torch.nn.functional as F

from checks import host_reads_refused
from conftest import launch_workers
from largebatch.data.digits import load_digits
from largebatch.data.sampler import global_batches
from largebatch.engine.noise import (NoiseScale, batch_sizes, choose_source, estimates, first_micro_batch_sq_norm,
                                     squared_norm)
from largebatch.models import create_model


# -- the formulas and the averages ----------------------------------------------------------------------

def _feed(est: NoiseScale, g2: float, var: float, b: int, B: int, skip=None) -> None:
    """One step whose squared norms are exactly their expectations for |G|² = g2, tr(Σ) = var."""
    f64 = torch.float64
    est.update(torch.tensor(g2 + var / b, dtype=f64), torch.tensor(g2 + var / B, dtype=f64), b, B,
               None if skip is None else torch.tensor(skip))


def test_noise_free_norms_give_the_exact_values_whatever_the_batch_sizes():
    est = NoiseScale(beta=0.9)
    for b, B in [(8, 32), (16, 32), (3, 1000), (64, 128)]:  # sizes change between phases of a run
        _feed(est, 0.02, 5.0, b, B)
    v = est.values()
    assert v.grad_sq_norm == pytest.approx(0.02, rel=1e-9) and v.grad_var == pytest.approx(5.0, rel=1e-9)
    assert v.noise_scale == pytest.approx(250.0, rel=1e-9)
    assert estimates(0.02 + 5.0 / 8, 0.02 + 5.0 / 32, 8, 32) == pytest.approx((0.02, 5.0), rel=1e-12)


def test_the_average_is_exponential_bias_corrected_and_leaves_out_skipped_steps():
    est = NoiseScale(beta=0.5)
    _feed(est, 1.0, 10.0, 4, 8)
    assert est.values().grad_sq_norm == pytest.approx(1.0)  # one step: that step, not half of it
    _feed(est, 4.0, 40.0, 4, 8)
    _feed(est, float("nan"), float("inf"), 4, 8, skip=True)  # a non-finite step changes nothing
    v = est.values()
    assert v.grad_sq_norm == pytest.approx((0.5 * 1.0 + 4.0) / 1.5)
    assert v.grad_var == pytest.approx((0.5 * 10.0 + 40.0) / 1.5)
    assert v.noise_scale == pytest.approx(10.0) and v.steps == pytest.approx(1.5)
    mean = NoiseScale(beta=1.0)  # beta 1: the plain mean of every step
    for g2 in (1.0, 2.0, 6.0):
        _feed(mean, g2, 1.0, 2, 4)
    assert mean.values().grad_sq_norm == pytest.approx(3.0)


def test_undefined_values_are_none():
    est = NoiseScale()
    assert est.values().noise_scale is None and est.values().grad_sq_norm is None  # no step yet
    est.update(torch.tensor(1.0), torch.tensor(0.9), 8, 16)  # |G|² estimate 0.8 > 0, tr(Σ) 1.6
    assert est.values().noise_scale == pytest.approx(1.6 / 0.8)
    est.reset()
    est.update(torch.tensor(1.0), torch.tensor(0.3), 8, 16)  # the large batch much smaller: |G|² < 0
    v = est.values()
    assert v.grad_sq_norm < 0 and v.noise_scale is None and v.fields()["noise_scale"] is None


def _same_values(got, want) -> None:
    """Two NoiseScale.values() alike to rounding; an undefined noise scale (None) on both sides."""
    for key in ("grad_sq_norm", "grad_var", "noise_scale"):
        g, w = getattr(got, key), getattr(want, key)
        assert (g is None) == (w is None), (key, g, w)
        if w is not None:
            assert g == pytest.approx(w, rel=1e-12), key


@pytest.mark.parametrize("g2,var", [(1.0, 4.0), (-0.3, 4.0)])  # the second: |G|² < 0, noise scale undefined
def test_summing_the_workers_averages_once_equals_averaging_every_step(g2, var):
    # Two workers see their own |G_b|² and the same |G_B|²; an estimator fed the workers' mean each
    # step is what the per-epoch allreduce of the per-worker averages must reproduce. Each step's
    # norms are their expectations for (|G|², tr(Σ)) = (g2, var) plus a jitter of +-5% of tr(Σ)/b,
    # so every step's |G|² estimate, and the average, lies within 0.4 of g2: its sign is never in doubt.
    gen = torch.Generator().manual_seed(0)
    workers, reference = [NoiseScale(beta=0.8), NoiseScale(beta=0.8)], NoiseScale(beta=0.8)
    for step in range(30):
        b, B = (4, 8) if step < 20 else (8, 16)
        jitter = (torch.rand(3, generator=gen, dtype=torch.float64) - 0.5) * 0.1 * var / b
        small, large = g2 + var / b + jitter[:2], g2 + var / B + jitter[2]
        skip = torch.tensor(step == 7)
        for w, est in enumerate(workers):
            est.update(small[w], large, b, B, skip)
        reference.update(small.mean(), large, b, B, skip)
    want = reference.values()
    assert want.grad_sq_norm == pytest.approx(g2, abs=0.4) and want.grad_var == pytest.approx(var, rel=0.3)
    assert (want.noise_scale is None) == (g2 < 0)
    total = workers[0].sums + workers[1].sums
    for est in workers:
        _same_values(est.epoch_values(lambda t: total.clone()), want)
    # afterwards each worker holds the mean, so the next epoch's sum is unchanged
    assert torch.allclose(workers[0].sums + workers[1].sums, total) and torch.equal(workers[0].sums, workers[1].sums)
    restored = NoiseScale(beta=0.8)
    restored.load_state_dict(workers[0].state_dict())
    assert torch.equal(restored.sums, workers[0].sums)


def test_where_the_two_batch_sizes_come_from():
    assert choose_source(4, 1) == "workers" and choose_source(4, 2) == "workers"
    assert choose_source(1, 4) == "micro-batches"
    with pytest.raises(ValueError, match="one worker without accumulation"):
        choose_source(1, 1)
    assert batch_sizes("workers", 256, 64, 16) == (64, 256)
    assert batch_sizes("micro-batches", 256, 256, 32) == (32, 256)
    assert batch_sizes("adaptive", 256, 128, 32) == (32, 256)  # the first micro-batch against the global batch
    with pytest.raises(ValueError):
        NoiseScale().update(torch.tensor(1.0), torch.tensor(1.0), 16, 16)  # b == B measures nothing


# -- against per-example gradients ----------------------------------------------------------------------

def _digits_and_model():
    train, _ = load_digits(None, 0.2)  # 1,438 training digits, 8x8
    torch.manual_seed(0)
    model = create_model("mlp", 10, 1, norm="none", width=16, image_size=8)  # no BatchNorm: images independent
    return model, train.images, train.labels


def _exact(model, X, Y) -> tuple[float, float]:
    """(|G|², tr(Σ)) from the per-example gradients (torch.func), tr(Σ) with the 1/(n-1) normalisation."""
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, x, y):
        return F.cross_entropy(functional_call(model, p, (x[None],)), y[None])

    per = vmap(grad(loss), in_dims=(None, 0, 0))(params, X, Y)
    flat = torch.cat([per[k].reshape(X.shape[0], -1) for k, _ in model.named_parameters()], 1).double()
    mean = flat.mean(0)
    model.zero_grad()
    F.cross_entropy(model(X), Y).backward()  # the mean of the per-example gradients is the batch gradient
    full = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double()
    assert torch.allclose(full, mean, atol=1e-6)
    n = X.shape[0]
    return mean.square().sum().item(), (flat - mean).square().sum().item() / (n - 1)


def _grads(model) -> list[torch.Tensor]:
    return [p.grad for p in model.parameters()]


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread (and do not fight the other tests for cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_estimates_match_per_example_gradients_on_workers_and_on_micro_batches(one_thread):
    model, X, Y = _digits_and_model()
    n = X.shape[0]
    g2, var = _exact(model, X, Y)
    # Sampling without replacement (epoch permutations): E|G_b|² = |G|² + tr(Σ)(1/b - 1/n), so the
    # estimates target tr(Σ) and |G|² - tr(Σ)/n exactly.
    want_g2, want_var = g2 - var / n, var
    assert want_var / want_g2 > 50  # noisy enough that the two batch sizes differ clearly
    # b = 32 images per worker (or per micro-batch), B = 256 (8 workers, or 8 accumulation steps)
    b, parts, steps = 32, 8, 600
    B = b * parts
    spread, micro = NoiseScale(beta=1.0), NoiseScale(beta=1.0)
    done, epoch = 0, 0
    while done < steps:
        for batch in global_batches(n, B, seed=1, epoch=epoch):  # the engine's global batches
            if done == steps:
                break
            # One worker accumulating 8 micro-batches, each loss sum / B: |G_b|² from the first.
            # The same passes give what 8 workers would see: micro-batch k is worker k's slice of
            # the global batch, and its gradient (G_b) is B/b times what it added to .grad.
            model.zero_grad()
            before, local_sq = [torch.zeros_like(p) for p in model.parameters()], []
            for k in range(parts):
                idx = batch[k * b:(k + 1) * b]
                (F.cross_entropy(model(X[idx]), Y[idx], reduction="sum") / B).backward()
                if k == 0:
                    first = first_micro_batch_sq_norm(_grads(model), accum_steps=parts)
                local_sq.append(squared_norm([(g - g0) * parts for g, g0 in zip(_grads(model), before)]))
                before = [g.clone() for g in _grads(model)]
            large = squared_norm(_grads(model))  # the global batch's mean gradient
            spread.update(torch.stack(local_sq).mean(), large, b, B)
            micro.update(first, large, b, B)
            done += 1
        epoch += 1
    for est in (spread, micro):
        v = est.values()
        assert v.grad_sq_norm == pytest.approx(want_g2, rel=0.10)
        assert v.grad_var == pytest.approx(want_var, rel=0.10)
        assert v.noise_scale == pytest.approx(want_var / want_g2, rel=0.10)


# -- the hook on two workers -------------------------------------------------------------------------------

_WORKER = textwrap.dedent("""
    import copy, json
    import torch
    import torch.nn.functional as F
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from largebatch.data.digits import load_digits
    from largebatch.distributed import Communicator, discover
    from largebatch.distributed.noise_hook import LocalSquaredNorm, default_allreduce_hook, measuring
    from largebatch.distributed.wrap import wrap_model
    from largebatch.engine.noise import NoiseScale, squared_norm
    from largebatch.models import create_model

    topo = discover()
    comm = Communicator(topo, "gloo", torch.device("cpu"), 0.002, timeout_s=60)
    train, _ = load_digits(None, 0.2)
    torch.manual_seed(0)
    base = create_model("mlp", 10, 1, norm="none", width=32, image_size=8)
    b = 16
    x, y = train.images[topo.rank * b:(topo.rank + 1) * b], train.labels[topo.rank * b:(topo.rank + 1) * b]

    def loss(model, lo=0, hi=b):
        return F.cross_entropy(model(x[lo:hi]), y[lo:hi], reduction="sum") / b

    ref = copy.deepcopy(base)
    loss(ref).backward()
    local = [p.grad.clone() for p in ref.parameters()]
    local_sq = squared_norm(local).item()
    mean = [t / topo.world_size for t in (comm.all_reduce_sum(g.clone()) for g in local)]
    out = dict(local_sq=local_sq, hooks={})
    for name, hook in [("allreduce", default_allreduce_hook()), ("fp16", default_hooks.fp16_compress_hook)]:
        meter = LocalSquaredNorm()
        ddp = wrap_model(comm, copy.deepcopy(base))
        ddp.register_comm_hook(None, measuring(hook, meter))
        # DDP's first pass puts every gradient in one bucket, then rebuilds the buckets by size
        for case in ("first", "plain", "accumulated"):
            accumulate = case == "accumulated"
            ddp.zero_grad()
            buckets_in_no_sync = 0
            if accumulate:  # two micro-batches of 8: the hook runs on the last one, on the whole sum
                with ddp.no_sync():
                    loss(ddp, 0, 8).backward()
                buckets_in_no_sync = meter.buckets
                loss(ddp, 8, b).backward()
            else:
                loss(ddp).backward()
            buckets = meter.buckets
            measured = meter.take().item()
            grads = [p.grad for p in ddp.module.parameters()]
            err = max((g - m).abs().max().item() for g, m in zip(grads, mean))
            out["hooks"][f"{name}-{case}"] = dict(
                measured=measured, buckets=buckets, buckets_in_no_sync=buckets_in_no_sync, mean_err=err,
                taken_again=meter.take().item())
        del ddp
    # The per-epoch allreduce of the estimator: both workers get the average of their |G_b|².
    est = NoiseScale(beta=0.9)
    large = squared_norm(mean)
    est.update(torch.tensor(local_sq), large, b, b * topo.world_size)
    v = est.epoch_values(comm.all_reduce_sum)
    out.update(grad_var=v.grad_var, grad_sq_norm=v.grad_sq_norm, large_sq=large.item(),
               all_local_sq=comm.all_gather_object(local_sq))
    print("RESULT " + json.dumps(out))
    comm.close()
""")


def test_the_hook_measures_each_workers_gradient_and_leaves_the_allreduce_as_it_was(tmp_path):
    (tmp_path / "noise_worker.py").write_text(_WORKER)
    results = launch_workers(2, "noise_worker", cwd=str(tmp_path))
    outs = []
    for r in results:
        assert r.returncode == 0, r.stderr[-3000:]
        outs.append(json.loads(r.stdout.split("RESULT ", 1)[1]))
    assert outs[0]["local_sq"] != pytest.approx(outs[1]["local_sq"], rel=1e-3)  # the workers' batches differ
    for out in outs:
        for name, h in out["hooks"].items():
            assert h["measured"] == pytest.approx(out["local_sq"], rel=1e-5), name
            # after the first pass a 0.002 MiB cap splits the 0.01 MiB gradient: a sum over buckets
            assert h["buckets"] >= (1 if name.endswith("first") else 2), name
            assert h["buckets_in_no_sync"] == 0 and h["taken_again"] == 0.0, name
            # the allreduce still averages
            assert h["mean_err"] < (1e-6 if name.startswith("allreduce") else 2e-3), name
        b, B = 16, 32
        small = sum(out["all_local_sq"]) / 2
        g2 = (B * out["large_sq"] - b * small) / (B - b)
        var = (small - out["large_sq"]) / (1 / b - 1 / B)
        assert out["grad_sq_norm"] == pytest.approx(g2, rel=1e-6)
        assert out["grad_var"] == pytest.approx(var, rel=1e-6)


# -- in the engine ---------------------------------------------------------------------------------------

def test_the_engine_step_measures_without_host_reads_and_refuses_where_it_cannot(tmp_path, monkeypatch):
    from largebatch.config.loader import load_config
    from largebatch.distributed import SINGLE
    from largebatch.engine import Trainer
    from largebatch.engine.guards import StopSignal
    from largebatch.engine.step import APPLIED
    from largebatch.errors import UsageError

    def trainer(*overrides):
        cfg = load_config(None, [f"run.dir={tmp_path / 'run'}", "checkpoint.resume=never", "train.device=cpu",
                                 "model.name=mlp", "model.norm=none", "train.global_batch=64",
                                 "train.noise_scale=true", *overrides])
        return Trainer(cfg, SINGLE)

    t = trainer("train.max_micro_batch=16", "optim.name=lamb")  # LAMB rewrites .grad: |G_B|² is taken before
    try:
        assert t.noise_source == "micro-batches" and t.comm.noise_meter is None
        bp = t.plan.phases[0].batch
        t.sampler.set_epoch(0, 0)
        batches, stop = iter(t.loader), StopSignal()
        t.run_step(batches, bp, 0, stop)

        with host_reads_refused():
            outcomes = [t.run_step(batches, bp, step, stop).outcome for step in range(1, 4)]
        assert [int(o) for o in outcomes] == [APPLIED] * 3
        v = t.stepper.noise.values()
        assert v.steps == pytest.approx(1 + 0.99 + 0.99**2 + 0.99**3)  # four steps folded in
        assert v.grad_var is not None and v.grad_var > 0 and torch.isfinite(torch.tensor(v.grad_sq_norm))
    finally:
        t.close()
    for overrides, message in [
        ((), "set train.max_micro_batch=32 or lower, or train on 2 or more workers"),
        (("train.max_micro_batch=32", "comm.shard=full"), "comm.shard=full (FSDP2) never holds"),
        (("train.max_micro_batch=32", "comm.compression=powersgd"), "comm.compression=powersgd"),
    ]:
        with pytest.raises(UsageError, match="^train.noise_scale=true") as err:
            trainer(*overrides).close()
        assert message in str(err.value) and "\n" not in str(err.value)


def _noise_lines(folder: str) -> tuple[list[dict], dict]:
    events = [json.loads(x) for x in open(f"{folder}/metrics.jsonl")]
    return [e for e in events if e["event"] == "epoch"], events[-1]


@pytest.mark.parametrize("global_batch,measured", [(32, "grad_var"), (256, "grad_sq_norm")])
def test_two_workers_and_one_accumulating_the_same_global_batch_measure_alike(tmp_path, global_batch, measured):
    """Two workers (|G_b|² the mean of both workers' halves) and one worker with two micro-batches
    (|G_b|² from the first half) take the same steps; their estimates agree in expectation. Each
    batch size checks the estimate it determines well: at 32 (b = 16, far below B_noise ~ 50-100)
    tr(Σ) dominates |G_b|² and its estimate spreads ~15% between the two; |G|² is small beside the
    noise there, so only its algebra is checked. At 256 (b = 128) |G|² is measured to ~10% and tr(Σ)
    is the noisy one."""
    from conftest import run_module

    args = ["model.name=mlp", "model.norm=none", "train.epochs=2", f"train.global_batch={global_batch}",
            "run.seed=11", "train.noise_scale=true", "checkpoint.at_epoch_end=false"]
    two, one = str(tmp_path / "two"), str(tmp_path / "one")
    results = launch_workers(2, "largebatch.train", *args, f"run.dir={two}")
    assert [r.returncode for r in results] == [0, 0], results[0].stderr[-2000:]
    assert "noise scale " in results[0].stderr + results[0].stdout  # the epoch line
    # one worker: the micro-batch against the global batch, as the 2 workers' per-worker batch
    r = run_module("largebatch.train", *args, f"run.dir={one}", f"train.max_micro_batch={global_batch // 2}")
    assert r.returncode == 0, r.stderr[-2000:]
    lines = {"two": _noise_lines(two), "one": _noise_lines(one)}
    for name, (epochs, summary) in lines.items():
        assert len(epochs) == 2
        for e in epochs:
            assert all(e[k] is not None and math.isfinite(e[k]) for k in ("grad_sq_norm", "grad_var")), (name, e)
            assert e[measured] > 0, (name, e)
            # the noise scale is the ratio of the two averages, undefined where |G|² <= 0
            if e["grad_sq_norm"] > 0 and e["grad_var"] > 0:
                assert e["noise_scale"] == pytest.approx(e["grad_var"] / e["grad_sq_norm"], rel=1e-9), (name, e)
            else:
                assert e["noise_scale"] is None, (name, e)
        assert {k: summary[k] for k in ("noise_scale", "grad_sq_norm", "grad_var")} == \
            {k: epochs[-1][k] for k in ("noise_scale", "grad_sq_norm", "grad_var")}
    # the same steps (the same global batches and weights); the small batch's squared norm is one
    # of the two halves on one worker and both on two: equal in expectation
    for e2, e1 in zip(lines["two"][0], lines["one"][0], strict=True):
        assert e2["train_loss"] == pytest.approx(e1["train_loss"], rel=1e-5)
        assert 0.5 < e2[measured] / e1[measured] < 2.0, (measured, e2[measured], e1[measured])
