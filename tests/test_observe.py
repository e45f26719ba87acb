"""Seeing a run: step lines, heartbeats, time to target, stopping at it, cost, top-5, TensorBoard, reports."""

import json
import os
import re
import textwrap

import pytest
import yaml

from conftest import launch_workers, run_module


def _lines(run_dir):
    return [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def target_run(tmp_path_factory):
    """The default on 2 workers, stopping at 95% top-1, with step lines and a price."""
    run_dir = str(tmp_path_factory.mktemp("target") / "run")
    results = launch_workers(2, "largebatch.train", "train.target_accuracy=0.95", "train.stop_at_target=true",
                             "train.log_every_steps=5", "run.cost_per_node_hour=32.77", f"run.dir={run_dir}")
    assert [r.returncode for r in results] == [0, 0], results[0].stderr[-2000:]
    return results[0], run_dir


def test_stops_at_first_epoch_reaching_target(target_run):
    r, run_dir = target_run
    lines = _lines(run_dir)
    epochs = [x for x in lines if x["event"] == "epoch"]
    summary = lines[-1]
    first = next(e for e in epochs if e["val_acc"] >= 0.95)
    assert epochs[-1] is not None and epochs[-1]["epoch"] == first["epoch"] < 30  # stopped there
    assert summary["epoch_to_target"] == first["epoch"]
    assert summary["time_to_target_s"] == pytest.approx(first["elapsed_s"], abs=0.05)
    assert all(e["val_acc"] < 0.95 for e in epochs[:-1])
    assert "reached at epoch" in r.stderr


def test_step_lines(target_run):
    _, run_dir = target_run
    lines = _lines(run_dir)
    steps = [x for x in lines if x["event"] == "step"]
    last_step = [x for x in lines if x["event"] == "epoch"][-1]["step"]
    assert [s["step"] for s in steps] == list(range(5, last_step + 1, 5))
    for s in steps:
        assert set(s) == {"event", "epoch", "step", "loss", "lr", "samples_per_sec", "data_wait"}
        assert 0.0 <= s["data_wait"] <= 1.0 and s["samples_per_sec"] > 0 and s["loss"] > 0


def test_cost_and_top5(target_run):
    _, run_dir = target_run
    summary = _lines(run_dir)[-1]
    assert summary["nodes"] == 1
    assert summary["cost"] == pytest.approx(32.77 * summary["elapsed_s"] / 3600, rel=1e-9)
    assert summary["best_val_acc_top5"] >= summary["best_val_acc"]


def test_no_top5_with_five_classes_or_fewer(tmp_path):
    r = run_module("largebatch.train", "data.name=synthetic", "data.num_samples=256", "data.num_classes=4",
                   "data.image_size=8", "train.global_batch=64", "train.epochs=1", f"run.dir={tmp_path}")
    assert r.returncode == 0, r.stderr[-2000:]
    lines = _lines(tmp_path)
    assert "val_acc_top5" not in lines[0] and "val_acc_top5" not in lines[-1]
    bad = run_module("largebatch.train", "train.stop_at_target=true", f"run.dir={tmp_path}")
    assert bad.returncode == 2 and "set train.target_accuracy too" in bad.stderr


def test_tensorboard_scalars(tmp_path):
    import tensorboard  # noqa: F401  (the dev extra installs it: these tests run, never skip)
    r = run_module("largebatch.train", "train.epochs=2", "log.tensorboard=true", f"run.dir={tmp_path}")
    assert r.returncode == 0, r.stderr[-2000:]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"epoch/val_acc", "epoch/train_loss", "summary/val_acc"} <= tags
    want = [e["val_acc"] for e in _lines(tmp_path) if e["event"] == "epoch"]
    assert [pytest.approx(e.value) for e in acc.Scalars("epoch/val_acc")] == want


def test_tensorboard_missing_is_a_usage_error(tmp_path):
    # A sitecustomize that hides tensorboard, as on a machine without the extra.
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(
        "import sys\nclass _Block:\n    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'tensorboard' or name.startswith('tensorboard.'):\n"
        "            raise ImportError('hidden')\n        return None\nsys.meta_path.insert(0, _Block())\n")
    r = run_module("largebatch.train", "log.tensorboard=true", f"run.dir={tmp_path / 'run'}",
                   env={"PYTHONPATH": f"{hide}{os.pathsep}{os.path.dirname(os.path.dirname(__file__))}"})
    assert r.returncode == 2
    assert "pip install 'largebatch[tensorboard]'" in r.stderr and "Traceback" not in r.stderr


def test_report_on_two_batch_sizes(tmp_path):
    import matplotlib  # noqa: F401  (the dev extra installs it)
    runs = []
    for batch in (64, 256):
        d = tmp_path / f"b{batch}"
        r = run_module("largebatch.train", "train.epochs=3", f"train.global_batch={batch}",
                       "train.target_accuracy=0.5", f"run.dir={d}")
        assert r.returncode == 0, r.stderr[-2000:]
        runs.append(d)
    out = tmp_path / "report"
    r = run_module("largebatch.report", *map(str, runs), "--out", str(out))
    assert r.returncode == 0, r.stderr
    for name in ("accuracy.png", "loss.png", "lr.png", "throughput.png", "summary.md"):
        assert (out / name).stat().st_size > 1000 or name == "summary.md"
    table = (out / "summary.md").read_text().splitlines()
    assert len(table) == 4
    for d, row in zip(runs, table[2:]):
        s = _lines(d)[-1]
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[0] == f"{d.name}: global_batch={s['global_batch']}"
        assert cells[1] == f"{100 * s['val_acc']:.2f}%" and cells[2] == f"{100 * s['best_val_acc']:.2f}%"
        assert cells[4] == f"{s['time_to_target_s']:.1f} s" and cells[5] == str(s["epoch_to_target"])
        assert cells[6] == f"{s['samples_per_sec']:,.0f}" and cells[9] == str(s["global_batch"])


def test_report_rejects_non_run(tmp_path):
    r = run_module("largebatch.report", str(tmp_path))
    assert r.returncode == 2 and "is not a run folder" in r.stderr


def write_fake_run(folder, overrides, epochs=3, steps_per_epoch=10, acc0=0.5):
    """A finished run's folder as a real run writes it (config.yaml, metrics.jsonl), without training."""
    from largebatch.config import load_config, to_dict

    cfg = load_config(None, [f"run.dir={folder}", f"train.epochs={epochs}", *overrides])
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.yaml"), "w") as fh:
        yaml.safe_dump(to_dict(cfg), fh, sort_keys=False)
    lines = [dict(event="epoch", epoch=e, step=e * steps_per_epoch, train_loss=1.0 / e, val_loss=1.1 / e,
                  val_acc=acc0 + 0.1 * e, lr=0.1, samples_per_sec=1000.0 + e, elapsed_s=2.0 * e, skipped_steps=0)
             for e in range(1, epochs + 1)]
    lines.append(dict(event="summary", val_acc=acc0 + 0.1 * epochs, best_val_acc=acc0 + 0.1 * epochs,
                      time_to_target_s=None, epoch_to_target=None, samples_per_sec=1000.0, elapsed_s=2.0 * epochs,
                      world_size=2, global_batch=cfg.train.global_batch, steps=epochs * steps_per_epoch,
                      skipped_steps=0, target_accuracy=None, target_metric="top1", nodes=1))
    with open(os.path.join(folder, "metrics.jsonl"), "w") as fh:
        fh.writelines(json.dumps(x) + "\n" for x in lines)


LARS = ["optim.name=lars", "optim.base_lr=0.1", "train.global_batch=1024"]
FIVE_RUNS = {  # folder: overrides; what differs and matters: seed, global batch, optimizer and its lr
    "sgd-b256": ["train.global_batch=256", "optim.base_lr=0.2"],
    "sgd-b1024": ["train.global_batch=1024", "optim.base_lr=0.2", "train.log_every_steps=5"],
    "lars-b1024": [*LARS, "data.num_workers=2", "data.root=/x"],
    "lars-b1024-seed1": [*LARS, "run.seed=1", "comm.bucket_mb=4"],
    "lars-b1024-again": [*LARS, "checkpoint.every_steps=10", "comm.timeout_s=60", "data.cache=true"],
}


def test_report_labels_five_runs_by_folder_and_what_matters(tmp_path):
    from largebatch.report import label_runs, load_run

    for name, overrides in FIVE_RUNS.items():
        write_fake_run(str(tmp_path / "runs" / name), overrides)
    runs = [load_run(str(tmp_path / "runs" / name)) for name in FIVE_RUNS]
    label_runs(runs)
    labels = {os.path.basename(r.path): r.label for r in runs}
    assert labels == {
        "sgd-b256": "sgd-b256: seed=0 global_batch=256 optim=sgd base_lr=0.2",
        "sgd-b1024": "sgd-b1024: seed=0 global_batch=1024 optim=sgd base_lr=0.2",
        "lars-b1024": "lars-b1024: seed=0 global_batch=1024 optim=lars base_lr=0.1",
        "lars-b1024-seed1": "lars-b1024-seed1: seed=1 global_batch=1024 optim=lars base_lr=0.1",
        "lars-b1024-again": "lars-b1024-again: seed=0 global_batch=1024 optim=lars base_lr=0.1",
    }
    for noise in ("log_every_steps", "root", "num_workers", "bucket_mb", "every_steps", "timeout_s", "cache", "dir"):
        assert all(f"{noise}=" not in label for label in labels.values()), noise
    # Runs that differ only in what does not matter are told apart by their folders alone.
    same = [load_run(str(tmp_path / "runs" / n)) for n in ("lars-b1024", "lars-b1024-again")]
    label_runs(same)
    assert [r.label for r in same] == ["lars-b1024", "lars-b1024-again"]
    # Folders of the same name are told apart by their parents.
    for parent in ("a", "b"):
        write_fake_run(str(tmp_path / parent / "run"), [])
    twins = [load_run(str(tmp_path / p / "run")) for p in ("a", "b")]
    label_runs(twins)
    assert [r.label for r in twins] == ["a/run", "b/run"]


def test_report_legends_sit_outside_the_plots(tmp_path):
    import matplotlib  # noqa: F401  (the dev extra installs it)
    from largebatch.report import figures, label_runs, load_run

    for name, overrides in FIVE_RUNS.items():
        write_fake_run(str(tmp_path / name), overrides)
    runs = [load_run(str(tmp_path / name)) for name in FIVE_RUNS]
    label_runs(runs)
    for name, fig in figures(runs).items():
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None] + list(fig.legends)
        assert len(legends) == 1, name
        legend = legends[0]
        assert [t.get_text() for t in legend.get_texts()] == [r.label for r in runs], name
        box = legend.get_window_extent(renderer)
        for ax in fig.axes:
            assert not box.overlaps(ax.get_window_extent(renderer)), f"{name}: the legend covers a plot"
        whole = fig.bbox
        assert box.x1 <= whole.x1 + 1 and box.y0 >= whole.y0 - 1, f"{name}: the legend is cut off"
    out = tmp_path / "report"
    r = run_module("largebatch.report", *(str(tmp_path / n) for n in FIVE_RUNS), "--out", str(out))
    assert r.returncode == 0, r.stderr
    table = (out / "summary.md").read_text().splitlines()
    assert [row.split("|")[1].strip() for row in table[2:]] == [r.label for r in runs]


def _labels(tmp_path, runs: dict) -> dict:
    from largebatch.report import label_runs, load_run

    for name, overrides in runs.items():
        write_fake_run(str(tmp_path / name), overrides)
    loaded = [load_run(str(tmp_path / name)) for name in runs]
    label_runs(loaded)
    return {os.path.basename(r.path): r.label for r in loaded}


def test_report_labels_show_sharding_and_noise_scale_but_not_what_a_model_ignores(tmp_path):
    assert _labels(tmp_path / "a", {"ddp": [], "zero": ["comm.shard=optimizer"], "fsdp": ["comm.shard=full"]}) == {
        "ddp": "ddp: shard=none", "zero": "zero: shard=optimizer", "fsdp": "fsdp: shard=full"}
    assert _labels(tmp_path / "b", {"plain": [], "noise": ["train.noise_scale=true"]}) == {
        "plain": "plain: noise_scale=false", "noise": "noise: noise_scale=true"}
    # model.norm, width and zero_init_residual are the zoo's: a model passed in or a factory's ignores them
    passed = ["model.name=python:Net"]
    assert _labels(tmp_path / "c", {"bn": passed, "nonorm": [*passed, "model.norm=none", "model.width=8"],
                                    "seed1": [*passed, "model.norm=none", "run.seed=1"]}) == {
        "bn": "bn: seed=0", "nonorm": "nonorm: seed=0", "seed1": "seed1: seed=1"}
    assert _labels(tmp_path / "d", {"cnn": ["model.norm=none"], "net": [*passed, "model.norm=batch"]}) == {
        "cnn": "cnn: model=cnn", "net": "net: model=python:Net"}
    assert _labels(tmp_path / "e", {"bn": [], "nonorm": ["model.norm=none"]}) == {  # zoo models: shown
        "bn": "bn: norm=batch", "nonorm": "nonorm: norm=none"}
    assert _labels(tmp_path / "f", {"w16": ["model.name=resnet18", "model.width=16"],  # a published, fixed width
                                    "w64": ["model.name=resnet18", "model.width=64"]}) == {"w16": "w16", "w64": "w64"}


def test_a_model_setting_the_model_ignores_is_named_at_start_up(tmp_path):
    script = tmp_path / "passed.py"
    script.write_text(textwrap.dedent('''
        import sys
        from torch import nn
        import largebatch
        largebatch.fit(model=nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), overrides=sys.argv[1:])
    '''))
    d = tmp_path / "run"
    short = ["train.epochs=1", "schedule.warmup_epochs=0.5"]  # no warning about a warmup as long as the run
    r = launch_workers(1, str(script), *short, "model.norm=none", "model.width=8", f"run.dir={d}")[0]
    assert r.returncode == 0, r.stderr[-3000:]
    warnings = [ln for ln in r.stderr.splitlines() if ln.startswith("largebatch: warning:")]
    assert warnings == ["largebatch: warning: model.norm=none and model.width=8 are ignored: a model passed to "
                        "largebatch.fit() (Sequential) is used as it was built"], r.stderr
    r = launch_workers(1, str(script), *short, f"run.dir={tmp_path / 'plain'}")[0]
    assert r.returncode == 0 and "largebatch: warning" not in r.stderr, r.stderr[-3000:]


def test_report_of_runs_without_epoch_records(tmp_path):
    write_fake_run(str(tmp_path / "ok"), [])
    write_fake_run(str(tmp_path / "crashed"), [])
    (tmp_path / "crashed" / "metrics.jsonl").write_text("")  # it stopped before its first epoch ended
    out = tmp_path / "report"
    r = run_module("largebatch.report", str(tmp_path / "crashed"), "--out", str(out))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r
    assert r.stderr.splitlines() == [f"largebatch: error: nothing to plot: no epoch records in the metrics.jsonl of "
                                     f"{tmp_path / 'crashed'} (a run that stops or crashes before its first epoch "
                                     "ends has none); report runs that trained at least one epoch"]
    assert not out.exists()
    r = run_module("largebatch.report", str(tmp_path / "crashed"), str(tmp_path / "ok"), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines() == [f"largebatch: warning: {tmp_path / 'crashed'} has no epoch records in its "
                                     "metrics.jsonl (it stopped or crashed before its first epoch ended); it is "
                                     "left out of the plots"]
    assert (out / "accuracy.png").stat().st_size > 1000
    assert [row.split("|")[1].strip() for row in (out / "summary.md").read_text().splitlines()[2:]] == ["crashed", "ok"]


def test_report_of_one_folder_given_twice_labels_it_by_its_name(tmp_path):
    write_fake_run(str(tmp_path / "runs" / "run"), [])
    out = tmp_path / "report"
    r = run_module("largebatch.report", "runs/run", "runs/run", "./runs/../runs/run/", "--out", str(out),
                   cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines() == [
        "largebatch: warning: runs/run was given more than once; it is reported once",
        "largebatch: warning: ./runs/../runs/run/ was given more than once (as runs/run); it is reported once"]
    assert [row.split("|")[1].strip() for row in (out / "summary.md").read_text().splitlines()[2:]] == ["run"]


def test_report_log_axes_read_as_plain_numbers(tmp_path):
    import matplotlib  # noqa: F401  (the dev extra installs it)
    from largebatch.report import figures, label_runs, load_run

    write_fake_run(str(tmp_path / "run"), ["train.noise_scale=true"], epochs=5)
    path = tmp_path / "run" / "metrics.jsonl"
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    for line, noise in zip(lines, (60.0, 75.0, 90.0, 120.0, 140.0)):  # less than a decade: minor ticks labelled
        line["noise_scale"] = noise
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    runs = [load_run(str(tmp_path / "run"))]
    label_runs(runs)
    figs = figures(runs)
    for name in ("noise_scale.png", "loss.png"):
        fig = figs[name]
        fig.canvas.draw()
        texts = [t.get_text() for ax in fig.axes for minor in (False, True)
                 for t in ax.get_yticklabels(minor=minor) if t.get_text()]
        assert texts and not any("10^" in t or "times" in t or "e+" in t for t in texts), (name, texts)
        if name == "noise_scale.png":
            assert {"60", "100"} <= set(texts), texts
        else:  # training loss 1/e: 1, 0.5, ..., 0.2
            assert {"1", "0.2"} <= set(texts), texts


HEARTBEAT = re.compile(r"^epoch (\d+)/(\d+) step (\d+)/(\d+)  lr \S+  (\S+ steps/s|[\d,]+ img/s)  ETA \w+$")
RUN_HEARTBEAT = re.compile(r"^step (\d+)/(\d+) \(epoch (\d+)/(\d+)\)  lr \S+  [\d,]+ img/s  ETA \w+$")
"""A training run's heartbeat: the run's step of its total steps, then the epoch."""


def test_heartbeat_lines_when_output_is_a_pipe(tmp_path):
    """Output that is not a terminal gets a heartbeat after the first step and then every
    LARGEBATCH_HEARTBEAT_S seconds: with a tiny interval, at nearly every step."""
    r = run_module("largebatch.train", "train.epochs=2", f"run.dir={tmp_path / 'fast'}",
                   env={"LARGEBATCH_HEARTBEAT_S": "0.000001"})
    assert r.returncode == 0, r.stderr[-2000:]
    beats = [ln for ln in r.stderr.splitlines() if ln.startswith("step ") and "ETA" in ln]
    assert beats and all(RUN_HEARTBEAT.match(b) for b in beats), beats
    seen = [tuple(int(x) for x in RUN_HEARTBEAT.match(b).groups()) for b in beats]
    assert seen[0] == (1, 22, 1, 2)  # the first step
    assert seen == sorted(seen) and len(seen) == 22  # 11 steps per epoch, every one of them
    # The default interval (30 s) gives the first step's line on a run this short, and none after it.
    r = run_module("largebatch.train", "train.epochs=1", f"run.dir={tmp_path / 'default'}")
    assert r.returncode == 0, r.stderr[-2000:]
    beats = [ln for ln in r.stderr.splitlines() if RUN_HEARTBEAT.match(ln)]
    assert len(beats) == 1 and beats[0].startswith("step 1/11 (epoch 1/1)"), r.stderr


def test_heartbeat_cadence_content_and_knob(monkeypatch):
    from largebatch.engine import metrics

    read_end, write_end = os.pipe()
    stream = os.fdopen(write_end, "w")
    now = [100.0]
    monkeypatch.setenv("LARGEBATCH_HEARTBEAT_S", "30")
    p = metrics.Progress(enabled=True, stream=stream, clock=lambda: now[0])
    assert not p.bar_enabled and p.heartbeat_s == 30
    p.start_epoch(1, 30, 100, step=100, total_steps=3000, global_batch=256)
    for i in range(60):  # 2 s a step: the first step, then one line per 30 s
        now[0] += 2.0
        p.step(lr="0.4") if i % 10 else p.step(loss="2.1033", lr="0.4", img_s="1,234", eta="312s")
    p.end_epoch()
    stream.close()
    with os.fdopen(read_end) as fh:
        lines = fh.read().splitlines()
    assert lines == [
        "step 101/3000 (epoch 2/30)  loss 2.1033  lr 0.4  1,234 img/s  ETA 5m12s",
        "step 116/3000 (epoch 2/30)  loss 2.1033  lr 0.4  1,234 img/s  ETA 5m02s",  # the ETA of step 111, 10 s on
        "step 131/3000 (epoch 2/30)  loss 2.1033  lr 0.4  1,234 img/s  ETA 5m12s",
        "step 146/3000 (epoch 2/30)  loss 2.1033  lr 0.4  1,234 img/s  ETA 5m02s",
    ]
    # Without step lines from the trainer the pace is measured here: 2 s a step.
    p = metrics.Progress(enabled=True, stream=open(os.devnull, "w"), clock=lambda: now[0])
    p.start_epoch(0, 2, 10)
    for _ in range(3):
        now[0] += 2.0
        p.step(lr="0.1")
    assert p.heartbeat_line() == "epoch 1/2 step 3/10  lr 0.1  0.5 steps/s  ETA 34s"
    p.start_epoch(0, 2, 10, global_batch=512)
    now[0] += 2.0
    p.step(lr="0.1")
    now[0] += 2.0
    p.step(lr="0.1")
    assert p.heartbeat_line() == "epoch 1/2 step 2/10  lr 0.1  256 img/s  ETA 36s"
    assert metrics.format_duration(59) == "59s" and metrics.format_duration(3 * 3600 + 5 * 60) == "3h05m"
    monkeypatch.setenv("LARGEBATCH_HEARTBEAT_S", "0")
    assert metrics.Progress(enabled=True, stream=open(os.devnull, "w")).heartbeat_s == 0
    monkeypatch.setenv("LARGEBATCH_HEARTBEAT_S", "soon")
    from largebatch.errors import UsageError

    with pytest.raises(UsageError, match="LARGEBATCH_HEARTBEAT_S='soon'"):
        metrics.Progress(enabled=True, stream=open(os.devnull, "w"))
