"""Seeing a run: step lines, time to target, stopping at it, cost, top-5, TensorBoard, reports."""

import json
import os

import pytest

from conftest import run_module, torchrun


def _lines(run_dir):
    return [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def target_run(tmp_path_factory):
    """The default on 2 workers, stopping at 95% top-1, with step lines and a price."""
    run_dir = str(tmp_path_factory.mktemp("target") / "run")
    r = torchrun(2, "largebatch.train", "train.target_accuracy=0.95", "train.stop_at_target=true",
                 "train.log_every_steps=5", "run.cost_per_node_hour=32.77", f"run.dir={run_dir}")
    assert r.returncode == 0, r.stderr[-2000:]
    return r, run_dir


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
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
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
    pytest.importorskip("matplotlib", reason="the report extra is not installed")
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
        assert cells[0] == f"global_batch={s['global_batch']}"
        assert cells[1] == f"{100 * s['val_acc']:.2f}%" and cells[2] == f"{100 * s['best_val_acc']:.2f}%"
        assert cells[4] == f"{s['time_to_target_s']:.1f} s" and cells[5] == str(s["epoch_to_target"])
        assert cells[6] == f"{s['samples_per_sec']:,.0f}" and cells[9] == str(s["global_batch"])


def test_report_rejects_non_run(tmp_path):
    r = run_module("largebatch.report", str(tmp_path))
    assert r.returncode == 2 and "is not a run folder" in r.stderr
