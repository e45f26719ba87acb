import pytest

from largebatch.batching import BatchPlan, nearest_multiples, plan
from largebatch.errors import UsageError


@pytest.mark.parametrize("global_batch,world,cap,per_worker,micro,accum", [
    (256, 1, None, 256, 256, 1),
    (8192, 256, None, 32, 32, 1),
    (32768, 512, None, 64, 64, 1),
    (32768, 512, 16, 64, 16, 4),
    (1024, 8, 48, 128, 32, 4),      # largest divisor of 128 not above 48
    (96, 2, 20, 48, 16, 3),         # 48 = 16 * 3; 20 does not divide 48
    (12, 4, 1, 3, 1, 3),
    (7, 7, None, 1, 1, 1),
    (100, 4, 1000, 25, 25, 1),      # a cap above the per-worker batch changes nothing
])
def test_plan_arithmetic(global_batch, world, cap, per_worker, micro, accum):
    p = plan(global_batch, world, cap)
    assert (p.per_worker_batch, p.micro_batch, p.accum_steps) == (per_worker, micro, accum)
    assert p.global_batch == p.world_size * p.micro_batch * p.accum_steps


def test_micro_batch_is_largest_divisor_under_cap():
    for per_worker in range(1, 200):
        for cap in range(1, per_worker + 3):
            p = plan(per_worker * 3, 3, cap)
            assert p.per_worker_batch % p.micro_batch == 0 and p.micro_batch <= cap
            assert not any(per_worker % d == 0 for d in range(p.micro_batch + 1, min(cap, per_worker) + 1))


def test_indivisible_global_batch_names_nearest_valid():
    with pytest.raises(UsageError) as e:
        plan(1000, 3)
    msg = str(e.value)
    assert "train.global_batch=1000" in msg and "world size 3" in msg
    assert "999" in msg and "1002" in msg


def test_indivisible_small_batch_offers_only_positive():
    assert nearest_multiples(3, 8) == [8]
    with pytest.raises(UsageError, match="e.g. 8$"):
        plan(3, 8)


@pytest.mark.parametrize("args", [(0, 1), (-8, 2), (8, 0), (8, 2, 0)])
def test_bad_numbers_rejected(args):
    with pytest.raises(UsageError):
        plan(*args)


def test_plan_invariants_are_checked():
    with pytest.raises(AssertionError):
        BatchPlan(global_batch=10, world_size=2, per_worker_batch=4, micro_batch=4, accum_steps=1)
