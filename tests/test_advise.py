"""python -m largebatch.advise: McCandlish et al.'s steps model from a run's noise scale, joined to the simulator."""

from __future__ import annotations

import json
import math
import os
import re

import pytest
import torch
import yaml

from conftest import run_module
from largebatch.config import load_config, to_dict
from largebatch.errors import UsageError
from largebatch.scaling import advise
from largebatch.batching import check_trainable_batch, plan, plan_warning
from largebatch import goodput
from largebatch.scaling.choices import ASSUMPTIONS, TWO_RUN_ASSUMPTIONS, Choice
from largebatch.scaling.model import Cluster, Workload
from largebatch.scaling.predict import predict_step
from largebatch.scaling.runs import read_run, read_second_run
from largebatch.scaling.steps import Segment, StepsModel, crit_factor, fit_curve, knee, steps_model, two_run_model


# -- the model ---------------------------------------------------------------------------------------------

def test_one_noise_scale_gives_mccandlish_curve_through_the_measured_run():
    model = steps_model([Segment(steps=600, batch=32, noise_scale=96)])
    assert model.b_crit == pytest.approx(96)
    assert model.steps(32) == pytest.approx(600)  # the measured run lies on its curve
    assert model.s_min == pytest.approx(600 / (1 + 96 / 32))
    for batch in (8, 96, 1000):  # S/S_min - 1 = (E/E_min - 1)^-1
        s, e = model.steps(batch), model.images(batch)
        assert s / model.s_min - 1 == pytest.approx(1 / (e / model.e_min - 1))
    assert model.steps(96) == pytest.approx(2 * model.s_min)  # at B_crit: twice the fewest steps


def test_epochs_of_growing_noise_are_each_rescaled_and_sum_to_the_same_form():
    segments = [Segment(250, 32, 40), Segment(250, 32, 160), Segment(100, 64, 640)]  # a phase doubles the batch
    model = steps_model(segments)
    for batch in (16, 64, 512, 8192):
        per_epoch = sum(s.steps * (1 + s.noise_scale / batch) / (1 + s.noise_scale / s.batch) for s in segments)
        assert model.steps(batch) == pytest.approx(per_epoch)
    assert 40 < model.b_crit < 640 and model.measured_steps == 600 and model.measured_batch == 32
    with pytest.raises(ValueError):
        steps_model([Segment(100, 32, 0.0)])


def test_knee_and_fit_find_the_critical_batch_of_an_exact_curve():
    truth = StepsModel(s_min=50, b_crit=300, measured_batch=32, measured_steps=0)
    batches = [32 * 2 ** i for i in range(8)]
    steps = [truth.steps(b) for b in batches]
    assert knee(batches, steps) == pytest.approx(300, rel=0.15)  # S(2B)/S(B) = 0.75 exactly at B_crit
    fitted = fit_curve(batches, steps)
    assert fitted.s_min == pytest.approx(50) and fitted.b_crit == pytest.approx(300)
    assert knee([32, 64], [100, 99]) == 32.0  # already flat
    assert knee([32, 64, 128], [100, 50, 25]) is None  # still halving
    with pytest.raises(ValueError):
        knee([32, 96], [10, 5])


# -- a run folder ------------------------------------------------------------------------------------------

def _run(folder, epochs, *, batch=64, target=None, reached=None, price=None, weights=True, summary=True,
         extra=(), batchnorm=True, loss=None) -> str:
    """A run folder as the trainer writes it: config.yaml, metrics.jsonl, checkpoints/final.pt."""
    os.makedirs(os.path.join(folder, "checkpoints"), exist_ok=True)
    overrides = [f"run.dir={folder}", f"train.global_batch={batch}", f"train.epochs={len(epochs)}", *extra]
    if target is not None:
        overrides.append(f"train.target_accuracy={target}")
    if price is not None:
        overrides.append(f"run.cost_per_node_hour={price}")
    with open(os.path.join(folder, "config.yaml"), "w") as fh:
        yaml.safe_dump(to_dict(load_config(None, overrides)), fh)
    lines = [dict(event="epoch", epoch=i + 1, step=125 * (i + 1), train_loss=loss or 1.0 / (i + 1), val_acc=e[0],
                  samples_per_sec=4000.0, lr=0.1, elapsed_s=i + 1.0, **e[1]) for i, e in enumerate(epochs)]
    if summary:
        lines.append(dict(event="summary", val_acc=epochs[-1][0], best_val_acc=max(e[0] for e in epochs),
                          world_size=1, samples_per_sec=4000.0, global_batch=batch, steps=125 * len(epochs),
                          epoch_to_target=reached, time_to_target_s=None if reached is None else 1.0))
    with open(os.path.join(folder, "metrics.jsonl"), "w") as fh:
        fh.write("".join(json.dumps(x) + "\n" for x in lines))
    if weights:
        state = {"conv.weight": torch.zeros(500, 100), "bn.weight": torch.zeros(100)}
        if batchnorm:
            state.update({"bn.running_mean": torch.zeros(100), "bn.num_batches_tracked": torch.zeros((), dtype=torch.long)})
        torch.save({"model": state, "step": 125 * len(epochs)}, os.path.join(folder, "checkpoints", "final.pt"))
    return folder


def _ns(scale, g2=0.01):
    return dict(noise_scale=scale, grad_sq_norm=g2, grad_var=None if scale is None else scale * g2)


EPOCHS = [(0.90, _ns(None, -0.01)), (0.95, _ns(200)), (0.97, _ns(400)), (0.98, _ns(800))]


def _refusal(p):
    try:
        check_trainable_batch(p, True, 32)
    except UsageError as exc:
        return str(exc)
    return None


def test_a_run_folder_gives_its_segments_up_to_the_target(tmp_path):
    run = _run(str(tmp_path / "run"), EPOCHS)
    whole = read_run(run)  # no target: the whole run, the loss it ended at
    assert [s.steps for s in whole.segments] == [125, 125, 125, 125]
    assert [s.noise_scale for s in whole.segments] == [200, 200, 400, 800]  # the first epoch's gap is filled
    assert whole.global_batch == 64 and whole.micro_batch == 64 and whole.num_train == 8000
    assert whole.gradient_bytes == (500 * 100 + 100) * 4  # running statistics are not gradients
    to_96 = read_run(run, 0.96)  # crossed halfway through the third epoch
    assert [s.steps for s in to_96.segments] == [125, 125, pytest.approx(62.5)]
    assert "val_acc 0.96" in to_96.target
    reached = read_run(_run(str(tmp_path / "reached"), EPOCHS, target=0.95, reached=2))  # the run's own target
    assert sum(s.steps for s in reached.segments) == pytest.approx(250)
    with pytest.raises(UsageError, match="never reached val_acc 0.99 \\(best 0.9800\\)"):
        read_run(run, 0.99)


@pytest.mark.parametrize("make, message", [
    (lambda d: d, "is not a run folder: metrics.jsonl is missing"),
    (lambda d: _run(d, [(0.9, {}), (0.95, {})]), "was trained without train.noise_scale=true"),
    (lambda d: _run(d, [(0.9, _ns(None, -1.0)), (0.95, _ns(None, -1.0))]), "noise swamped"),
])
def test_runs_without_a_noise_scale_are_refused_in_one_line(tmp_path, make, message):
    folder = str(tmp_path / "run")
    os.makedirs(folder)
    with pytest.raises(UsageError, match=message):
        read_run(make(folder))


# -- the command ---------------------------------------------------------------------------------------------

CLUSTER = ["--workers-per-node", "4", "--intra-gbit", "100", "--inter-gbit", "25", "--inter-latency-us", "20"]


def test_the_table_marks_the_fastest_and_the_cheapest_and_agrees_with_the_simulator(tmp_path, capsys):
    run = _run(str(tmp_path / "run"), EPOCHS, price=3.0)
    out_json, out_png = str(tmp_path / "advice.json"), str(tmp_path / "advice.png")
    assert advise.main([run, *CLUSTER, "--compute-ms", "50", "--micro-batch", "32", "--gradient-mb", "40",
                        "--workers", "1,4,16,64", "--batches", "64,256,1024,4096", "--json", out_json,
                        "--plot", out_png]) == 0
    text = capsys.readouterr().out
    doc = json.load(open(out_json))
    rows = [Choice(**c) for c in doc["choices"]]
    assert {(r.global_batch, r.workers) for r in rows} == {(b, n) for b in (64, 256, 1024, 4096) for n in (1, 4, 16, 64)
                                                            if b % n == 0}
    fast, cheap = Choice(**doc["fastest"]), Choice(**doc["cheapest"])
    # training's own checks on each plan (train.max_micro_batch=32): the model has BatchNorm
    for r in rows:
        p = plan(r.global_batch, r.workers, 32)
        assert r.warning == (_refusal(p) or plan_warning(p, 32)) and r.refused == (p.micro_batch == 1)
    assert {(r.global_batch, r.workers) for r in rows if r.refused} == {(64, 64)}
    assert {(r.global_batch, r.workers) for r in rows if r.warning} == {(64, 16), (64, 64), (256, 64)}
    # the fastest and the cheapest of what training takes without a word
    ok = [r for r in rows if r.warning is None]
    assert fast.wall_s == min(r.wall_s for r in ok) and cheap.cost == min(r.cost for r in ok)
    assert fast.warning is None and cheap.warning is None
    said = {(int(ln.split()[0]), int(ln.split()[1])): ln.split()[-1] for ln in text.splitlines()
            if ln[:12].strip().isdigit() and "<-" not in ln}
    assert said.get((64, 64)) == "refuses" and said.get((256, 64)) == "warns" and said.get((4096, 1)) == "ok"
    assert "training refuses: micro-batches of 1 image through the model's BatchNorm; never picked" in text
    cluster = Cluster(**doc["cluster"])
    for r in rows:
        assert r.steps == pytest.approx(steps_model(read_run(run).segments).steps(r.global_batch))
        work = Workload(**{**doc["workload"], "compute_time": 0.05 * r.micro_batch / 32,
                           "micro_batch": r.micro_batch, "accumulation_steps": r.accum_steps})
        assert r.step_time == pytest.approx(predict_step(cluster, work, r.workers).step_time)
        assert r.micro_batch * r.accum_steps * r.workers == r.global_batch and r.micro_batch <= 32
        assert r.wall_s == pytest.approx(r.steps * r.step_time)
        assert r.cost == pytest.approx(3.0 * r.nodes * r.wall_s / 3600)  # the run's price
    assert "<- fastest" in text and "<- cheapest" in text and "assumptions:" in text
    assert all(a in text for a in ASSUMPTIONS)
    with open(out_png, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"


def test_compute_time_and_gradient_come_from_the_run_when_not_given(tmp_path, capsys):
    # a probe's micro-batches (here 4 of 16) serve the measurement: the largest micro-batch in the
    # simulation is the per-worker batch unless --micro-batch says otherwise
    run = _run(str(tmp_path / "run"), EPOCHS, extra=["train.max_micro_batch=16"])
    assert read_run(run).micro_batch == 16 and read_run(run).per_worker_batch == 64
    assert advise.main([run, *CLUSTER, "--workers", "1,4", "--batches", "64,128"]) == 0
    text = capsys.readouterr().out
    # 4,000 images/s on one worker, which ran 4 micro-batches of 16: 16 ms per 64 images, the largest
    # micro-batch of the simulation; 50,100 parameters x 4 bytes = 0.191 MiB
    assert ("which ran micro-batches of 16 x 4: 16.00 ms per 64 images, taken as one micro-batch (the largest; "
            "--micro-batch B to change)") in text
    assert "gradient 0.191 MiB: the parameters" in text and "gradient         0.191 MiB in buckets" in text
    assert not re.search(r"\bMB\b", text)  # one unit for sizes
    assert "node-hours" in text  # no price: cost in node-hours
    bare = _run(str(tmp_path / "bare"), EPOCHS, weights=False)
    with pytest.raises(UsageError, match="no checkpoints/final.pt to size the gradient: give --gradient-mb"):
        advise.main([bare, *CLUSTER])


def test_what_training_refuses_is_never_advised_and_what_it_warns_about_only_for_want_of_better(tmp_path, capsys):
    args = [*CLUSTER, "--compute-ms", "50", "--micro-batch", "32", "--gradient-mb", "40"]
    # the case: 2 images per worker on 64 workers was "fastest"; 1 image per worker is refused
    run = _run(str(tmp_path / "bn"), EPOCHS)
    assert advise.main([run, *args, "--workers", "16,64", "--batches", "64,128"]) == 0
    out = capsys.readouterr().out
    assert "fastest: global batch 128 on 16 worker(s)" in out and "cheapest: global batch 128 on 16 worker(s)" in out
    assert ("training warns: micro-batches too small for fast steps (and for sensible statistics in any BatchNorm "
            "layer); not picked") in out
    with pytest.raises(UsageError, match="every choice of \\[64\\] on \\[64\\] worker\\(s\\) gives micro-batches of 1"):
        advise.main([run, *args, "--workers", "64", "--batches", "64"])
    capsys.readouterr()
    # nothing better than a warned plan: picked, and said so
    assert advise.main([run, *args, "--workers", "16,64", "--batches", "64"]) == 0
    out = capsys.readouterr().out
    assert "fastest: global batch 64 on 16 worker(s)" in out and "picked only because every other choice is refused" in out
    # without BatchNorm (no running statistics in final.pt) one image per worker trains, with a warning
    plain = _run(str(tmp_path / "plain"), EPOCHS, batchnorm=False)
    assert advise.main([plain, *args, "--workers", "64", "--batches", "64"]) == 0
    out = capsys.readouterr().out
    assert "    warns  <- fastest" in out and "training refuses" not in out
    # no checkpoint to tell: BatchNorm is assumed, and said
    bare = _run(str(tmp_path / "bare"), EPOCHS, weights=False)
    with pytest.raises(UsageError, match="gives micro-batches of 1 image"):
        advise.main([bare, *args, "--workers", "64", "--batches", "64"])
    assert advise.main([bare, *args, "--workers", "16", "--batches", "64"]) == 0
    assert "BatchNorm assumed in the model (no checkpoints/final.pt to tell)" in capsys.readouterr().out


def test_the_target_loss_is_rounded_and_the_preset_help_names_what_advise_has(tmp_path, capsys):
    run = _run(str(tmp_path / "run"), EPOCHS, loss=0.2690641060471535)
    assert read_run(run).target == "the run's end: 500 steps, train_loss 0.2691"
    preset = next(a for a in advise.build_parser()._actions if a.dest == "preset").help
    assert "see --validate" not in preset and "python -m largebatch.simulate --validate" in preset


@pytest.mark.parametrize("argv, message", [
    ([], "give one run folder"),
    (["RUN", "--validate"], "--validate is an option of python -m largebatch.simulate that advise does not take"),
    (["RUN", "--batches", "64,x"], "--batches '64,x': 'x' is not an integer"),
    (["RUN", "--target-accuracy", "2"], "--target-accuracy 2 is not allowed"),
    (["RUN", "--workers", "3", "--batches", "64"], "no worker count of [3] divides"),
    (["RUN", "--config", "x.yaml"], "--config describes a probe run: add --probe"),
    (["RUN", "--compute-ms", "-1"], "--compute-ms -1 is not allowed"),
])
def test_bad_input_is_one_line(tmp_path, argv, message):
    run = _run(str(tmp_path / "run"), EPOCHS)
    argv = [run if a == "RUN" else a for a in argv]
    with pytest.raises(UsageError) as err:
        advise.main(argv + CLUSTER)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_the_command_exits_2_with_one_line(tmp_path):
    r = run_module("largebatch.advise", str(tmp_path / "missing"), *CLUSTER)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"largebatch: error: '{tmp_path / 'missing'}' is not a run folder: "
                                             "metrics.jsonl is missing; give the run.dir of a run trained with "
                                             "train.noise_scale=true, or use --probe"]


def test_a_probe_run_trains_with_the_noise_scale_and_is_read(tmp_path, capsys):
    # A global batch of 512 (micro-batches of 128) for 4 steps: |G|² stays large (~2, measured over
    # six seeds) and is measured on 128 images against tr(Σ)/128 ~ 1, so the noise scale is defined.
    run = str(tmp_path / "probe")
    assert advise.main(["--probe", f"run.dir={run}", "train.global_batch=512", "train.epochs=2", "model.width=8",
                        "--second-batch", "0", *CLUSTER, "--workers", "1,4", "--batches", "64,256"]) == 0
    cfg = yaml.safe_load(open(os.path.join(run, "config.yaml")))
    assert cfg["train"]["noise_scale"] is True and cfg["train"]["max_micro_batch"] == 128
    measured = read_run(run)
    assert len(measured.segments) == 2 and all(s.noise_scale > 0 for s in measured.segments)
    out = capsys.readouterr().out
    assert "fastest:" in out
    # the probe's 4 micro-batches of 128 are said as they ran; the simulation takes 512 images at once
    assert re.search(r"which ran micro-batches of 128 x 4: [0-9.]+ ms per 512 images, taken as one micro-batch", out)


# -- two runs ------------------------------------------------------------------------------------------------

def test_two_runs_recover_s_min_and_the_critical_batch_of_an_exact_curve():
    truth = StepsModel(s_min=80, b_crit=120, measured_batch=32, measured_steps=0)
    for b1, b2 in ((32, 256), (256, 32), (8, 4096), (100, 130)):
        model = two_run_model(b1, truth.steps(b1), b2, truth.steps(b2))
        assert model.s_min == pytest.approx(80, rel=1e-12) and model.b_crit == pytest.approx(120, rel=1e-12)
        assert model.measured_batch == min(b1, b2) and model.method == "two runs"
        assert model.steps(b1) == pytest.approx(truth.steps(b1)) and model.steps(b2) == pytest.approx(truth.steps(b2))
    # the arithmetic of the MNIST sweep in docs/noise_scale.md: 394 steps at 32, 121 at 256
    mnist = two_run_model(32, 394, 256, 121)
    assert mnist.s_min == pytest.approx(82) and mnist.b_crit == pytest.approx(32 * 256 * 273 / (121 * 256 - 394 * 32))
    noise = steps_model([Segment(steps=394, batch=32, noise_scale=30)])
    assert crit_factor(mnist, noise) == pytest.approx(mnist.b_crit / 30)


@pytest.mark.parametrize("b1, s1, b2, s2, message", [
    (32, 394, 256, 394, "took 394 steps, not fewer than the 394 at batch 32: no critical batch fits"),
    (32, 394, 256, 500, "took 500 steps, not fewer than the 394 at batch 32"),
    (32, 400, 256, 50, "took 12,800 images, no more than the 12,800 at batch 32"),
    (32, 400, 256, 40, "took 10,240 images, no more than the 12,800 at batch 32"),
    (64, 100, 64, 90, "the two runs have the same global batch 64"),
    (32, 0, 256, 10, "two runs need batches and steps > 0"),
    (32, 100, 256, math.inf, "two runs need batches and steps > 0"),
])
def test_two_runs_that_do_not_fit_the_model_are_refused_in_one_line(b1, s1, b2, s2, message):
    with pytest.raises(ValueError) as err:
        two_run_model(b1, s1, b2, s2)
    assert message in str(err.value) and "\n" not in str(err.value)
    # on the edge both ways: a hair inside each condition fits
    assert two_run_model(32, 400, 256, 400 - 1e-6).b_crit > 0
    assert two_run_model(32, 400, 256, 50 + 1e-6).s_min > 0


def test_advise_and_the_adaptive_batch_share_one_efficiency():
    for model in (steps_model([Segment(250, 32, 40), Segment(250, 32, 160)]), two_run_model(32, 394, 256, 121),
                  fit_curve([32, 64, 128], [400, 230, 150])):
        b0 = model.measured_batch
        for batch in (8, 32, 100, 4096):
            assert model.efficiency(batch) == goodput.efficiency(batch, model.b_crit, b0)
            # the steps are the measured batch's images carried over with that efficiency ...
            assert model.steps(batch) == pytest.approx(model.steps(b0) * b0 / (batch * goodput.efficiency(
                batch, model.b_crit, b0)), rel=1e-12)
            # ... which is McCandlish et al.'s curve
            assert model.steps(batch) == pytest.approx(model.s_min * (1 + model.b_crit / batch), rel=1e-12)


def _run_with_losses(folder, losses, accs, batch):
    _run(folder, [(a, {}) for a in accs], batch=batch, weights=False)
    path = os.path.join(folder, "metrics.jsonl")
    lines = [json.loads(x) for x in open(path)]
    for line, loss in zip([x for x in lines if x["event"] == "epoch"], losses):
        line["train_loss"] = loss
    with open(path, "w") as fh:
        fh.write("".join(json.dumps(x) + "\n" for x in lines))
    return folder


def test_a_second_run_is_read_to_the_first_runs_target(tmp_path):
    first = read_run(_run(str(tmp_path / "first"), EPOCHS, loss=0.25), 0.96)  # 312.5 steps to 0.96
    second = read_second_run(_run(str(tmp_path / "second"), [(0.93, {}), (0.97, {})], batch=512), first)
    assert second.global_batch == 512 and second.steps == pytest.approx(125 + 125 * 3 / 4)
    assert "val_acc 0.96" in second.target
    # no accuracy target: the train_loss the first run ended at, crossed 40% into the third epoch
    whole = read_run(str(tmp_path / "first"))
    assert whole.final_loss == 0.25 and whole.target_accuracy is None
    by_loss = read_second_run(_run_with_losses(str(tmp_path / "loss"), [0.5, 0.35, 0.1, 0.05], [0.5] * 4, 512),
                              whole)
    assert by_loss.steps == pytest.approx(250 + 125 * 0.4) and "train_loss 0.25" in by_loss.target
    with pytest.raises(UsageError, match=r"never reached the train_loss 0.25 .* \(best 0.3\); train it longer"):
        read_second_run(_run_with_losses(str(tmp_path / "short"), [0.5, 0.3], [0.5] * 2, 512), whole)
    with pytest.raises(UsageError, match=r"never reached val_acc 0.96 \(best 0.9500\)"):
        read_second_run(_run(str(tmp_path / "low"), [(0.9, {}), (0.95, {})], batch=512), first)
    phased = _run(str(tmp_path / "phased"), [(0.93, {}), (0.97, {})], batch=512)
    lines = [json.loads(x) for x in open(os.path.join(phased, "metrics.jsonl"))]
    lines[1]["global_batch"] = 1024
    with open(os.path.join(phased, "metrics.jsonl"), "w") as fh:
        fh.write("".join(json.dumps(x) + "\n" for x in lines))
    with pytest.raises(UsageError, match="changes its global batch from 512 to 1024 at epoch 2, before its target"):
        read_second_run(phased, first)


def test_advise_with_a_second_run_prints_the_two_run_model_and_its_crit_factor(tmp_path, capsys):
    first = _run(str(tmp_path / "first"), EPOCHS)  # batch 64: 312.5 steps to 0.96, noise scale 200 .. 800
    second = _run(str(tmp_path / "second"), [(0.93, {}), (0.97, {})], batch=512)  # 218.75 steps to 0.96
    out_json = str(tmp_path / "advice.json")
    args = [*CLUSTER, "--compute-ms", "50", "--micro-batch", "32", "--gradient-mb", "40", "--workers", "1,4",
            "--batches", "64,256,1024", "--target-accuracy", "0.96"]
    assert advise.main([first, "--second-run", second, *args, "--json", out_json]) == 0
    text = capsys.readouterr().out
    measured = read_run(first, 0.96)
    steps1, steps2 = sum(s.steps for s in measured.segments), read_second_run(second, measured).steps
    assert (steps1, steps2) == (pytest.approx(312.5), pytest.approx(218.75))
    want = two_run_model(64, steps1, 512, steps2)
    factor = want.b_crit / steps_model(measured.segments).b_crit
    assert f"second run {second}: global batch 512; target: val_acc 0.96" in text
    assert "method: two runs: S_min and B_crit solved from the steps of both to the same target" in text
    assert f"S_min = {want.s_min:.0f} steps, B_crit = {want.b_crit:.0f} images" in text
    assert f"for the adaptive global batch: adaptive.crit_factor={factor:.3g}" in text
    assert all(a in text for a in TWO_RUN_ASSUMPTIONS) and ASSUMPTIONS[0] not in text
    doc = json.load(open(out_json))
    assert doc["method"] == "two runs" and doc["crit_factor"] == pytest.approx(factor)
    assert doc["model"]["b_crit"] == pytest.approx(want.b_crit) and doc["second_run"]["steps"] == steps2
    for c in doc["choices"]:
        assert c["steps"] == pytest.approx(want.steps(c["global_batch"]))
    # one run: the noise scale, and said so
    assert advise.main([first, *args]) == 0
    assert "method: one run's noise scale, B_crit = B_simple" in capsys.readouterr().out


@pytest.mark.parametrize("second_epochs, extra, message", [
    ([(0.93, {}), (0.95, {})], [], "never reached val_acc 0.96 (best 0.9500)"),
    ([(0.90, {}), (0.92, {}), (0.97, {})], [], "took 350 steps, not fewer than the 312.5 at batch 64"),
    ([(0.97, {})], ["--second-batch", "512"], "--second-batch 512 is not allowed"),
    ([(0.97, {})], ["--probe"], "--second-run reads a run folder, --probe trains both runs"),
])
def test_a_second_run_that_misses_is_one_line(tmp_path, second_epochs, extra, message):
    first = _run(str(tmp_path / "first"), EPOCHS)
    second = _run(str(tmp_path / "second"), second_epochs, batch=512)
    with pytest.raises(UsageError) as err:
        advise.main([first, "--second-run", second, *CLUSTER, "--target-accuracy", "0.96", *extra])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_second_run_that_never_reaches_the_target_exits_2(tmp_path):
    first = _run(str(tmp_path / "first"), EPOCHS)
    second = _run(str(tmp_path / "second"), [(0.93, {}), (0.95, {})], batch=512)
    r = run_module("largebatch.advise", first, "--second-run", second, "--target-accuracy", "0.96", *CLUSTER)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"largebatch: error: '{second}' never reached val_acc 0.96 (best 0.9500); "
                                             "give a lower --target-accuracy, or train the run longer"]


def test_probe_trains_the_second_probe_at_eight_times_the_batch_to_the_same_target(tmp_path, monkeypatch, capsys):
    # fit() stands in for training: it records the overrides and writes the run folder they describe
    import largebatch.api

    trained = []

    def fake_fit(config, overrides):
        cfg = load_config(config, overrides)
        trained.append(list(overrides))
        if cfg.train.noise_scale:
            _run(cfg.run.dir, EPOCHS, batch=cfg.train.global_batch)
        else:
            _run(cfg.run.dir, [(0.93, {}), (0.97, {})], batch=cfg.train.global_batch, weights=False)

    monkeypatch.setattr(largebatch.api, "fit", fake_fit)
    run = str(tmp_path / "probe")
    assert advise.main(["--probe", f"run.dir={run}", "train.global_batch=64", "train.epochs=4", *CLUSTER,
                        "--target-accuracy", "0.96", "--workers", "1", "--batches", "64,256"]) == 0
    first, second = trained
    assert "train.noise_scale=true" in first
    assert second[-6:] == [f"run.dir={run}-batch512", "train.global_batch=512", "train.epochs=32",
                           "train.target_accuracy=0.96", "train.stop_at_target=true", "train.target_metric=top1"]
    out = capsys.readouterr().out
    assert f"second run {run}-batch512: global batch 512" in out and "adaptive.crit_factor=" in out
    # --second-batch 0: one probe, the noise scale alone
    trained.clear()
    assert advise.main(["--probe", f"run.dir={tmp_path / 'one'}", "train.global_batch=64", "--second-batch", "0",
                        *CLUSTER, "--workers", "1", "--batches", "64"]) == 0
    assert len(trained) == 1 and "method: one run's noise scale" in capsys.readouterr().out


def test_the_second_probe_batch_is_eight_times_the_first_where_the_training_set_holds_it():
    assert advise.second_batch(64, 8000, None) == 512
    assert advise.second_batch(512, 1438, None) == 1024  # the digits: 4096 and 2048 are more than the images
    assert advise.second_batch(512, 1438, 700) == 700
    with pytest.raises(UsageError, match="the 1000 training images hold no second probe of at least twice the first's "
                                         "global batch 512: give a smaller first batch, or --second-batch 0"):
        advise.second_batch(512, 1000, None)
