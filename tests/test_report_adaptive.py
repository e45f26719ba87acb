"""The report of runs whose global batch the engine chose while training (adaptive.enabled)."""

import json
import os

import pytest
import yaml

from conftest import run_module

ADAPTIVE = ["adaptive.enabled=true", "train.max_micro_batch=32", "adaptive.min_batch=64", "adaptive.max_batch=512",
            "adaptive.every_steps=10"]


def _decision(step, epoch, batch, previous, lr, noise, crit):
    return dict(event="batch", step=step, epoch=epoch, images_in_epoch=step * 64, global_batch=batch,
                previous=previous, changed=batch != previous, lr=lr, noise_scale=noise, b_crit=crit,
                reason="goodput", candidates=[dict(global_batch=b, step_time_s=0.1, throughput=b / 0.1,
                                                   efficiency=0.5, goodput=b / 0.2) for b in (64, 128)])


DECISIONS = [  # the first decision comes before the noise scale has an estimate
    _decision(10, 1, 128, 64, 0.2, None, None),
    _decision(20, 1, 128, 128, 0.2, 150.0, 300.0),
    _decision(30, 2, 256, 128, 0.4, 400.0, 800.0),
]


def write_run(folder, overrides, decisions=(), last_step=40):
    """A finished run's folder (config.yaml, metrics.jsonl) with epoch lines at steps 20 and
    ``last_step``, a step line every 5 steps (written after the decision at the same step), the
    decisions given and a summary."""
    from largebatch.config import load_config, to_dict

    cfg = load_config(None, [f"run.dir={folder}", "train.epochs=2", *overrides])
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.yaml"), "w") as fh:
        yaml.safe_dump(to_dict(cfg), fh, sort_keys=False)
    by_step = {d["step"]: d for d in decisions}
    lines, batch = [], decisions[0]["previous"] if decisions else cfg.train.global_batch
    for step in range(5, last_step + 1, 5):
        if step in by_step:
            lines.append(by_step[step])
        lines.append(dict(event="step", epoch=1 + (step > 20), step=step, loss=1.0, lr=0.01 * step,
                          samples_per_sec=1000.0, data_wait=0.0, global_batch=batch))
        batch = by_step[step]["global_batch"] if step in by_step else batch
        if step in (20, last_step):
            lines.append(dict(event="epoch", epoch=1 + (step > 20), step=step, train_loss=1.0,
                              val_loss=1.0, val_acc=0.5, lr=0.01 * step, samples_per_sec=1000.0, elapsed_s=step / 10,
                              global_batch=batch))
    lines.append(dict(event="summary", val_acc=0.5, best_val_acc=0.5, time_to_target_s=None, epoch_to_target=None,
                      samples_per_sec=1000.0, elapsed_s=last_step / 10, world_size=2, global_batch=batch,
                      steps=last_step, nodes=1))
    with open(os.path.join(folder, "metrics.jsonl"), "w") as fh:
        fh.writelines(json.dumps(x) + "\n" for x in lines)


def _load(tmp_path, runs: dict):
    from largebatch.report import label_runs, load_run

    for name, (overrides, decisions) in runs.items():
        write_run(str(tmp_path / name), overrides, decisions)
    loaded = [load_run(str(tmp_path / name)) for name in runs]
    label_runs(loaded)
    return loaded


def test_the_series_drawn_are_the_decisions_and_records(tmp_path):
    from largebatch.report import batch_curve, lr_curve, noise_curves, recorded_lr

    run, plain = _load(tmp_path, {"adaptive": (ADAPTIVE, DECISIONS), "plain": ([], ())})
    assert [b["step"] for b in run.batches] == [10, 20, 30]
    # from the starting batch at step 0 to the last batch held to the run's last step
    assert batch_curve(run) == ([0, 10, 20, 30, 40], [64, 128, 128, 256, 256])
    assert noise_curves(run) == {"noise_scale": ([20, 30], [150.0, 400.0]), "b_crit": ([20, 30], [300.0, 800.0])}
    xs, ys = recorded_lr(run)
    # at a decision's step, the step line's lr (the step it ends) comes before the lr the decision sets
    assert xs[:4] == [5, 10, 10, 15] and ys[:4] == [0.05, 0.1, 0.2, 0.15]
    assert xs == sorted(xs) and (20, 0.2) in zip(xs, ys) and (30, 0.4) in zip(xs, ys)
    assert len(xs) == len(run.steps) + len(run.epochs) + len(run.batches)
    assert lr_curve(run) == (xs, ys)  # lr.png: the recorded lr, not a schedule rebuilt for train.global_batch
    assert batch_curve(plain) == ([], []) and noise_curves(plain) == {"noise_scale": ([], []), "b_crit": ([], [])}
    assert len(lr_curve(plain)[0]) == 40  # a plain run's schedule is still rebuilt step by step


def test_the_adaptive_figure_draws_the_adaptive_runs_only(tmp_path):
    import matplotlib  # noqa: F401  (the dev extra installs it)
    from largebatch.report import batch_curve, figures, noise_curves, recorded_lr

    runs = _load(tmp_path, {"plain": ([], ()), "adaptive": (ADAPTIVE, DECISIONS),
                            "adaptive-crit2": ([*ADAPTIVE, "adaptive.crit_factor=2"], DECISIONS[:2])})
    figs = figures(runs)
    assert "adaptive_batch.png" in figs and "adaptive_batch.png" not in figures(runs[:1])
    fig = figs["adaptive_batch.png"]
    batch_ax, lr_ax, noise_ax = fig.axes[:3]
    for r in runs[1:]:
        (line,) = [ln for ln in batch_ax.get_lines() if ln.get_label() == r.label]
        assert (list(line.get_xdata()), list(line.get_ydata())) == batch_curve(r)
        (lr,) = [ln for ln in lr_ax.get_lines() if ln.get_label() == r.label]
        assert (list(lr.get_xdata()), list(lr.get_ydata())) == recorded_lr(r)
        assert lr.get_color() == line.get_color()
        drawn = [(list(ln.get_xdata()), list(ln.get_ydata())) for ln in noise_ax.get_lines()
                 if ln.get_color() == line.get_color()]
        assert drawn == [noise_curves(r)["noise_scale"], noise_curves(r)["b_crit"]]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    assert len(legends) == 1
    assert [t.get_text() for t in legends[0].get_texts()] == [r.label for r in runs[1:]]
    box = legends[0].get_window_extent(renderer)
    assert not any(box.overlaps(ax.get_window_extent(renderer)) for ax in fig.axes)
    assert batch_ax.get_yscale() == "log"
    assert [t.get_text() for t in batch_ax.get_yticklabels() if t.get_text()] == ["64", "128", "256"]


def test_labels_name_the_adaptive_batch_and_leave_out_what_it_does_not_use(tmp_path):
    micro = "train.max_micro_batch=32"
    runs = _load(tmp_path, {"plain": (["train.global_batch=512", micro], ()),
                            "plain-every5": (["adaptive.every_steps=5", micro], ()),  # adaptive.* unused: not shown
                            "adaptive": (ADAPTIVE, DECISIONS),
                            "adaptive-crit2": ([*ADAPTIVE, "adaptive.crit_factor=2", "train.global_batch=1024"],
                                               DECISIONS)})
    assert [r.label for r in runs] == ["plain: global_batch=512 adaptive=false",
                                       "plain-every5: global_batch=128 adaptive=false",
                                       "adaptive: adaptive=true crit_factor=1",
                                       "adaptive-crit2: adaptive=true crit_factor=2"]


def test_report_writes_the_adaptive_figure_for_adaptive_runs_only(tmp_path):
    pytest.importorskip("matplotlib")
    write_run(str(tmp_path / "plain"), [])
    write_run(str(tmp_path / "adaptive"), ADAPTIVE, DECISIONS)
    out = tmp_path / "plain-report"
    r = run_module("largebatch.report", str(tmp_path / "plain"), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert (out / "lr.png").is_file() and not (out / "adaptive_batch.png").exists()
    out = tmp_path / "report"
    r = run_module("largebatch.report", str(tmp_path / "plain"), str(tmp_path / "adaptive"), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert (out / "adaptive_batch.png").stat().st_size > 1000
    assert f"wrote {out / 'accuracy.png'}" in r.stdout and str(out / "adaptive_batch.png") in r.stdout
    assert sorted(os.listdir(out)) == ["accuracy.png", "adaptive_batch.png", "loss.png", "lr.png", "summary.md",
                                       "throughput.png"]  # written in place: no temporary files left
    rows = (out / "summary.md").read_text().splitlines()[2:]
    assert [row.split("|")[10].strip() for row in rows] == ["128", "256"]  # the adaptive run's: at the end
