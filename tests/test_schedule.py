import math

import pytest

from largebatch.config import load_config
from largebatch.engine import make_run_plan
from largebatch.optim.schedule import LRSchedule, build_schedule, scaled_lr


def test_linear_scaling_rule():
    assert scaled_lr(0.1, 8192, 256) == pytest.approx(3.2)
    assert scaled_lr(0.1, 256, 256) == pytest.approx(0.1)


def test_goyal_warmup_then_steps():
    cfg = load_config(None, ["optim.base_lr=0.1", "optim.base_batch=256", "schedule.warmup_epochs=5",
                             "schedule.decay=step", "schedule.milestones=[30,60,80]", "train.epochs=90"])
    s = build_schedule(cfg.optim, cfg.schedule, global_batch=8192, steps_per_epoch=156, epochs=90)
    assert s.peak_lr == pytest.approx(3.2) and s.warmup_steps == 5 * 156 and s.total_steps == 90 * 156
    assert s(0) == pytest.approx(0.1)                     # starts at the unscaled base lr
    assert s(390) == pytest.approx(0.1 + 3.1 * 390 / 780)  # linear in the step
    assert s(780) == pytest.approx(3.2)
    assert s(30 * 156 - 1) == pytest.approx(3.2)
    assert s(30 * 156) == pytest.approx(0.32)
    assert s(60 * 156) == pytest.approx(0.032)
    assert s(80 * 156) == pytest.approx(0.0032)
    lrs = [s(i) for i in range(780)]
    assert all(b > a for a, b in zip(lrs, lrs[1:]))


def test_warmup_depends_on_steps_not_world_size():
    cfg = load_config(None, ["train.global_batch=256", "schedule.warmup_epochs=2", "train.epochs=4"])
    a = make_run_plan(cfg, 1, 1438).schedule
    b = make_run_plan(cfg, 4, 1438).schedule
    c = make_run_plan(load_config(None, ["train.global_batch=256", "schedule.warmup_epochs=2", "train.epochs=4",
                                         "train.max_micro_batch=8"]), 4, 1438).schedule
    assert a == b == c
    assert a.warmup_steps == 2 * (1438 // 256)


def test_batch_below_base_batch_has_no_downward_warmup():
    cfg = load_config(None, ["optim.base_lr=0.2", "optim.base_batch=256", "schedule.warmup_epochs=2"])
    s = build_schedule(cfg.optim, cfg.schedule, global_batch=64, steps_per_epoch=10, epochs=5)
    assert s.peak_lr == pytest.approx(0.05)
    assert all(s(i) <= s.peak_lr + 1e-12 for i in range(s.total_steps))


@pytest.mark.parametrize("decay", ["constant", "poly", "cosine"])
def test_decays_end_points(decay):
    s = LRSchedule(peak_lr=2.0, total_steps=110, warmup_steps=10, warmup_start_lr=0.5, decay=decay,
                   power=2.0, end_lr=0.01)
    assert s(0) == pytest.approx(0.5)
    assert s(10) == pytest.approx(2.0)
    if decay == "constant":
        assert s(109) == pytest.approx(2.0)
    else:
        assert s(110) == pytest.approx(0.01)
        lrs = [s(i) for i in range(10, 111)]
        assert all(b <= a for a, b in zip(lrs, lrs[1:]))


def test_poly_and_cosine_values():
    poly = LRSchedule(peak_lr=1.0, total_steps=100, decay="poly", power=2.0)
    assert poly(50) == pytest.approx(0.25)
    cos = LRSchedule(peak_lr=1.0, total_steps=100, decay="cosine")
    assert cos(50) == pytest.approx(0.5)
    assert cos(25) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_schedule_rejects_bad_spans():
    with pytest.raises(ValueError):
        LRSchedule(peak_lr=1.0, total_steps=0)
    with pytest.raises(ValueError):
        LRSchedule(peak_lr=1.0, total_steps=10, warmup_steps=11)


def _warmup_lines(plan):
    return [x for x in plan.lines() if "warmup" in x]


def test_a_warmup_that_starts_at_the_peak_holds_it_and_says_so(capsys):
    # global batch 128 below base_batch 256: the warmup starts at the peak 0.1, so it holds the lr there
    plan = make_run_plan(load_config(None, ["train.epochs=4", "schedule.warmup_epochs=2"]), 1, 1438, announce=True)
    assert capsys.readouterr().err == ""  # a warmup shorter than the run: no warning
    s = plan.schedule
    assert s.warmup_steps == 22 and s(0) == pytest.approx(0.1) and s(21) == pytest.approx(0.1) and s(30) < 0.1
    assert _warmup_lines(plan) == [
        "scaled lr (peak)       0.1  (base lr 0.2 per 256 images: the sgd default, linear scaling; held at 0.1 in "
        "warmup, cosine decay)",
        "warmup steps           22  (the lr starts at its peak, 0.1, so the warmup holds it there)"]
    # as long as the run: the warning says the lr holds, not that it rises
    make_run_plan(load_config(None, ["train.epochs=2"]), 1, 1438, announce=True)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the lr holds at its peak for the whole run" in err and "rises" not in err
    assert _warmup_lines(make_run_plan(load_config(None, ["schedule.warmup_epochs=0"]), 1, 1438)) == [
        "scaled lr (peak)       0.1  (base lr 0.2 per 256 images: the sgd default, linear scaling; no warmup, "
        "cosine decay)", "warmup steps           0"]


def test_a_warmup_that_rises_says_where_from_and_warns_when_as_long_as_the_run(capsys):
    plan = make_run_plan(load_config(None, ["train.epochs=2", "train.global_batch=512"]), 1, 1438, announce=True)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the lr rises for the whole run and never decays" in err
    assert plan.schedule.warmup_steps == 4 and plan.schedule(0) == pytest.approx(0.2)
    assert _warmup_lines(plan) == [
        "scaled lr (peak)       0.4  (base lr 0.2 per 256 images: the sgd default, linear scaling; warmup from 0.2, "
        "cosine decay)", "warmup steps           4"]


def test_a_phased_warmup_holds_only_when_no_phase_it_covers_rises():
    phases = "train.phases=[{epochs: %d, global_batch: 128}, {epochs: %d, global_batch: 512}]"
    flat = make_run_plan(load_config(None, [phases % (10, 20)]), 1, 1438)  # the warmup lies in phase 1, at its peak
    assert flat.schedule.warmup_steps == 22 and flat.schedule(0) == flat.schedule(21) == pytest.approx(0.1)
    assert "held at 0.1 in warmup, cosine decay over epochs" in flat.lines()[1]
    assert "holds it there" in _warmup_lines(flat)[-1]
    # the same hold whatever puts the start at the peak: scaling=none, or warmup_start_lr set to it
    for args in (["optim.scaling=none", "train.global_batch=1024"],
                 ["train.global_batch=1024", "schedule.warmup_start_lr=0.8"]):
        line = _warmup_lines(make_run_plan(load_config(None, args), 1, 1438))[-1]
        assert line.endswith("(the lr starts at its peak, " + ("0.2" if "optim.scaling=none" in args else "0.8")
                             + ", so the warmup holds it there)"), line
    rising = make_run_plan(load_config(None, [phases % (1, 29)]), 1, 1438)  # phase 2's peak 0.4 lies in the warmup
    assert "lr from 0.1, cosine decay over epochs" in rising.lines()[1]
    assert _warmup_lines(rising)[-1] == f"warmup steps           {rising.schedule.warmup_steps}"
