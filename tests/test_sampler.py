import torch

from largebatch.batching import plan
from largebatch.data import MicroBatchSampler, global_batches, shard_range


def _epoch_global_batches(n, global_batch, world, cap, seed, epoch):
    """Reassemble the global batches from every worker's micro-batches."""
    p = plan(global_batch, world, cap)
    per_rank = [list(MicroBatchSampler(n, p, r, seed, epoch)) for r in range(world)]
    steps = n // global_batch
    out = []
    for s in range(steps):
        batch = []
        for r in range(world):
            for k in range(p.accum_steps):
                batch += per_rank[r][s * p.accum_steps + k]
        out.append(batch)
    return out


def test_global_batches_independent_of_world_size_and_micro_batch():
    n, g = 1000, 96
    ref = [b.tolist() for b in global_batches(n, g, seed=3, epoch=2)]
    assert len(ref) == n // g
    for world, cap in [(1, None), (2, None), (4, 6), (8, 5), (3, 32), (96, None)]:
        assert _epoch_global_batches(n, g, world, cap, seed=3, epoch=2) == ref


def test_epoch_is_a_permutation_and_epochs_differ():
    n, g = 1000, 100
    e0 = torch.cat(list(global_batches(n, g, 0, 0))).tolist()
    e1 = torch.cat(list(global_batches(n, g, 0, 1))).tolist()
    assert sorted(e0) == list(range(n)) and e0 != e1
    assert torch.cat(list(global_batches(n, g, 1, 0))).tolist() != e0


def test_remainder_dropped():
    batches = list(global_batches(1050, 100, 0, 0))
    assert len(batches) == 10 and all(len(b) == 100 for b in batches)
    assert len(set(torch.cat(batches).tolist())) == 1000


def test_resume_mid_epoch():
    p = plan(64, 2, 8)
    full = list(MicroBatchSampler(500, p, 1, seed=7, epoch=4))
    part = MicroBatchSampler(500, p, 1, seed=7)
    part.set_epoch(4, start_step=3)
    assert list(part) == full[3 * p.accum_steps:] and len(part) == len(full) - 3 * p.accum_steps


def test_validation_shards_cover_exactly_once():
    for n in (1, 7, 359, 1000):
        for world in (1, 2, 3, 8, 13):
            shards = [shard_range(n, r, world) for r in range(world)]
            assert [i for s in shards for i in s] == list(range(n))


def test_slices_are_where_the_micro_batches_lie_in_the_permutation():
    """``slices`` is the one definition both paths use: the DataLoader's requests are the
    permutation cut at those offsets, and every rank's slices tile each global batch exactly."""
    n, g = 500, 48
    for world, cap, start in [(1, None, 0), (2, None, 0), (4, 5, 3), (3, 4, 7)]:
        p = plan(g, world, cap)
        covered = []
        for rank in range(world):
            s = MicroBatchSampler(n, p, rank, seed=9)
            s.set_epoch(2, start_step=start)
            perm, slices = s.permutation(), s.slices()
            assert torch.equal(perm, next(global_batches(n, n, 9, 2)))  # the whole epoch as one batch
            assert len(slices) == len(s) and all(hi - lo == p.micro_batch for lo, hi in slices)
            assert [perm[lo:hi].tolist() for lo, hi in slices] == [list(r) for r in s]
            covered += [i for lo, hi in slices for i in range(lo, hi)]
        assert sorted(covered) == list(range(start * g, (n // g) * g))
    s = MicroBatchSampler(n, plan(48, 2, 8), 1, seed=9)
    before = s.slices()
    s.set_phase(plan(96, 2, 16))
    assert s.slices() != before and s.slices()[0] == (48, 64) and len(s.slices()) == (n // 96) * 3
