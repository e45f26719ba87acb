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
