"""The optimizers on parameters sharded by FSDP2 (``comm.shard=full``) and inside ZeRO
(``comm.shard=optimizer``), in two real gloo workers started once: each case steps a fully_shard'ed
toy model (uneven shards, and empty ones) and the same model unsharded on every worker with the same
gradients, and checks that they end alike, that a step makes exactly one collective whatever the
number of tensors, that found_inf = 1 leaves everything as it was, and that the state goes through
torch.distributed.checkpoint's get_state_dict / set_state_dict."""

import os
import textwrap

from conftest import REPO, launch_workers

WORKER = textwrap.dedent('''
    import contextlib
    import copy
    import sys

    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.distributed.tensor import DTensor, distribute_tensor
    from torch.distributed.tensor.debug import CommDebugMode

    from largebatch.config import load_config
    from largebatch.distributed.shard import device_mesh, fully_shard_model, local
    from largebatch.optim import LAMB, LARS, ShardedSGD, build_optimizer, optimizer_parts, prepare_state

    sys.path.insert(0, TESTS)
    from checks import host_reads_refused, max_abs_diff

    TOL = 1e-6
    COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
                   "broadcast", "reduce", "gather", "scatter", "all_to_all", "all_to_all_single", "barrier", "send",
                   "recv", "isend", "irecv", "all_gather_object", "broadcast_object_list")
    calls = []


    def counting(name, fn):
        def wrapper(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)
        return wrapper


    for _name in COLLECTIVES:
        setattr(dist, _name, counting(_name, getattr(dist, _name)))


    def shard_sum(t):
        dist.all_reduce(t)  # the collective of largebatch.distributed.Communicator.all_reduce_sum
        return t


    class Toy(nn.Module):
        """Blocks of Linear(4, 3) (3 rows: uneven shards), LayerNorm(3) (no trust ratio), Linear(3, 1)
        (1 row: an empty shard on rank 1, its weight zero: ||p|| = 0) and Linear(1, 4), then a head Linear(4, 5)."""

        def __init__(self, depth):
            super().__init__()
            self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 1),
                                                      nn.Linear(1, 4)) for _ in range(depth))
            self.head = nn.Linear(4, 5)
            with torch.no_grad():
                self.blocks[0][2].weight.zero_()
                for b in self.blocks:
                    b[1].weight.add_(0.1)

        def forward(self, x):
            for b in self.blocks:
                x = b(x)
            return self.head(x)


    def grads_at(model, t, scale=1.0, bad=False):
        """The same gradients on every worker: seeded, one tensor all zeros (||g|| = 0), or NaN/inf."""
        gen = torch.Generator().manual_seed(1000 + t)
        out = {}
        for i, (name, p) in enumerate(model.named_parameters()):
            g = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if i == 1:
                g.zero_()
            if bad and i in (0, 5):
                g.view(-1)[0] = float("nan") if i == 0 else float("inf")
            out[name] = g * scale
        return out


    def set_grads(model, grads):
        for name, p in model.named_parameters():
            g = grads[name].clone()
            p.grad = distribute_tensor(g, p.device_mesh, p.placements, src_data_rank=None) \\
                if isinstance(p, DTensor) else g


    def full(t):
        return t.full_tensor() if isinstance(t, DTensor) else t


    def state_of(opt, model):
        """{param name: {state key: full tensor}}"""
        names = {id(p): n for n, p in model.named_parameters()}
        return {names[id(p)]: {k: full(v) for k, v in st.items() if torch.is_tensor(v)} for p, st in opt.state.items()}


    def local_snapshot(opt, model):
        ps = [local(p).clone() for p in model.parameters()]
        st = [{k: local(v).clone() for k, v in opt.state[p].items() if torch.is_tensor(v)} for p in model.parameters()]
        return ps, st


    def assert_bits_equal(a, b, what):
        assert len(a[0]) == len(b[0])
        for x, y in zip(a[0], b[0]):
            assert torch.equal(x.view(torch.int32), y.view(torch.int32)), what
        for sx, sy in zip(a[1], b[1]):
            assert sx.keys() == sy.keys(), what
            for k in sx:
                assert torch.equal(sx[k], sy[k]), (what, k)


    def counted_step(opt, refuse_host_reads):
        """opt.step(), returning (c10d calls, CommDebugMode's count)."""
        calls.clear()
        mode = CommDebugMode()
        with host_reads_refused() if refuse_host_reads else contextlib.nullcontext(), mode:
            opt.step()
        return len(calls), mode.get_total_counts()


    def cfg_of(name, wd, extra=()):
        lr = {"sgd": 0.1, "lars": 0.5, "larc": 0.5, "lamb": 0.01}[name]
        return load_config(None, [f"optim.name={name}", f"optim.base_lr={lr}", f"optim.weight_decay={wd}",
                                  "optim.trust_coefficient=0.02", *extra]).optim


    def case(mesh, name, wd, depth=1, foreach=True, extra=(), checkpoint=False):
        rank = dist.get_rank()
        what = f"{name} wd={wd} depth={depth} foreach={foreach} {' '.join(extra)}"
        torch.manual_seed(0)
        ref = Toy(depth)
        start = [p.detach().clone() for p in ref.parameters()]
        sharded = fully_shard_model(copy.deepcopy(ref), mesh)
        cfg = cfg_of(name, wd, extra)
        ref_opt = build_optimizer(ref, cfg)
        opt = build_optimizer(sharded, cfg, shard_sum=shard_sum)
        want_cls = {"sgd": ShardedSGD, "lars": LARS, "larc": LARS, "lamb": LAMB}[name]
        assert type(opt) is want_cls, (what, type(opt))
        assert any(local(p).numel() == 0 for p in sharded.parameters()) == (rank == 1), what
        assert any(local(p).shape[0] * 2 != p.shape[0] for p in sharded.parameters()), what
        for o in (ref_opt, opt):
            for g in o.param_groups:
                g["foreach"] = foreach if name != "sgd" else g["foreach"]
        collective = 0 if name == "sgd" else 1

        # step 0: gradients from FSDP2's own backward (the same batch on both workers)
        x = torch.randn(6, 4, generator=torch.Generator().manual_seed(7))
        for model, o in ((ref, ref_opt), (sharded, opt)):
            o.zero_grad(set_to_none=True)
            model(x).square().mean().backward()
            o.step()
        # step 1: seeded gradients, one of them zero
        for model, o in ((ref, ref_opt), (sharded, opt)):
            set_grads(model, grads_at(ref, 1))
            o.step()
        # step 2, sharded only: found_inf = 1 with NaN/inf gradients leaves everything as it was,
        # with the same one collective
        before = local_snapshot(opt, sharded)
        set_grads(sharded, grads_at(ref, 2, bad=True))
        opt.found_inf, opt.grad_scale = torch.tensor(1.0), torch.tensor(4.0)
        counts = counted_step(opt, refuse_host_reads=foreach)
        del opt.found_inf, opt.grad_scale
        assert counts == (collective, collective), (what, "skipped step", counts, calls)
        assert_bits_equal(before, local_snapshot(opt, sharded), what)
        # step 3: scaled gradients with grad_scale and found_inf = 0 on the sharded side
        set_grads(ref, grads_at(ref, 3))
        ref_opt.step()
        set_grads(sharded, grads_at(ref, 3, scale=1024.0))
        opt.found_inf, opt.grad_scale = torch.tensor(0.0), torch.tensor(1024.0)
        counts = counted_step(opt, refuse_host_reads=foreach)
        del opt.found_inf, opt.grad_scale
        assert counts == (collective, collective), (what, "step", counts, calls)

        got = [full(p).detach() for p in sharded.parameters()]
        want = [p.detach() for p in ref.parameters()]
        assert max_abs_diff(got, want) <= TOL, (what, max_abs_diff(got, want))
        assert max_abs_diff(want, start) > 1e-3, what  # the steps did move the weights
        st, ref_st = state_of(opt, sharded), state_of(ref_opt, ref)
        assert st.keys() == ref_st.keys() and st, what
        for n in st:
            assert st[n].keys() == ref_st[n].keys(), (what, n)
            for k in st[n]:
                assert max_abs_diff([st[n][k].float()], [ref_st[n][k].float()]) <= TOL, (what, n, k)
        for p in sharded.parameters():  # state shaped like its parameter, as torch's optimizers keep it
            for k, v in opt.state[p].items():
                if k != "step":
                    assert isinstance(v, DTensor) and v.placements == p.placements and v.shape == p.shape, (what, k)
        if checkpoint:
            check_checkpoint(mesh, ref, sharded, opt, cfg, what)
        print(f"rank {rank} ok: {what}, {sum(1 for _ in ref.parameters())} tensors", flush=True)


    def check_checkpoint(mesh, ref, sharded, opt, cfg, what):
        """get_state_dict of the stepped model and optimizer, set_state_dict into fresh ones: the next
        step is the same, bit for bit."""
        msd, osd = get_state_dict(sharded, opt)
        msd, osd = copy.deepcopy(msd), copy.deepcopy(osd)  # as if read from disk: not sharing the optimizer's tensors
        assert all(isinstance(v, DTensor) for st in osd["state"].values() for k, v in st.items() if k != "step"), what
        torch.manual_seed(1)
        fresh = fully_shard_model(type(ref)(len(ref.blocks)), mesh)
        fresh_opt = build_optimizer(fresh, cfg, shard_sum=shard_sum)
        set_state_dict(fresh, fresh_opt, model_state_dict=msd, optim_state_dict=osd)
        for model, o in ((sharded, opt), (fresh, fresh_opt)):
            set_grads(model, grads_at(ref, 4))
            o.step()
        assert_bits_equal(local_snapshot(opt, sharded), local_snapshot(fresh_opt, fresh), what + " checkpoint")


    def zero_case(name):
        """ZeroRedundancyOptimizer(groups, optimizer_class=cls, **kwargs) from optimizer_parts, its
        inner optimizer prepared, against the plain optimizer; found_inf handed to the inner one."""
        torch.manual_seed(0)
        ref = Toy(1)
        model = copy.deepcopy(ref)
        cfg = cfg_of(name, 1e-2)
        ref_opt = build_optimizer(ref, cfg)
        cls, groups, kwargs = optimizer_parts(model, cfg)
        zero = ZeroRedundancyOptimizer(groups, optimizer_class=cls, **kwargs)
        prepare_state(zero.optim)
        if name == "sgd":
            assert zero.optim.defaults["fused"]
            mine = [p for g in zero.optim.param_groups for p in g["params"]]
            assert mine and all(not zero.optim.state[p]["momentum_buffer"].any() for p in mine)
        for t in range(3):
            for m, o in ((ref, ref_opt), (model, zero)):
                set_grads(m, grads_at(ref, t))
                if o is zero and t == 1:  # a skipped step first
                    set_grads(m, grads_at(ref, t, bad=True))
                    zero.optim.found_inf, zero.optim.grad_scale = torch.tensor(1.0), None
                    zero.step()
                    del zero.optim.found_inf, zero.optim.grad_scale
                    set_grads(m, grads_at(ref, t))
                o.step()
        got, want = [p.detach() for p in model.parameters()], [p.detach() for p in ref.parameters()]
        assert max_abs_diff(got, want) <= TOL, (name, "zero", max_abs_diff(got, want))
        print(f"rank {dist.get_rank()} ok: zero {name}", flush=True)


    def main():
        dist.init_process_group("gloo")
        mesh = device_mesh(dist.get_world_size(), torch.device("cpu"))
        for name in ("sgd", "lars", "larc", "lamb"):
            for wd in (0.0, 1e-2):
                case(mesh, name, wd, checkpoint=wd != 0)
        case(mesh, "lars", 1e-2, depth=3, extra=("optim.nesterov=true",))
        case(mesh, "lamb", 1e-2, depth=3)
        case(mesh, "sgd", 1e-2, depth=2, extra=("optim.nesterov=true",))
        case(mesh, "lars", 1e-2, extra=("optim.exclude_bn_and_bias=false",))
        case(mesh, "lamb", 1e-2, extra=("optim.exclude_bn_and_bias=false",))
        case(mesh, "larc", 1e-2, foreach=False)
        case(mesh, "lamb", 1e-2, depth=2, foreach=False)
        for name in ("sgd", "lars", "larc", "lamb"):
            zero_case(name)
        dist.destroy_process_group()
        print("worker done", flush=True)


    if __name__ == "__main__":
        main()
''')


def test_sharded_optimizers_match_unsharded(tmp_path):
    """LARS, LARC, LAMB and SGD under comm.shard=full within 1e-6 of the unsharded optimizers (fp32),
    one collective per LARS/LARC/LAMB step (none for SGD) for 10 tensors or 26, found_inf = 1 leaving
    parameters and state as they were, get_state_dict / set_state_dict, and under ZeRO."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER.replace("TESTS", repr(os.path.join(REPO, "tests")), 1))
    results = launch_workers(2, str(script), cwd=REPO)
    for rank, res in enumerate(results):
        assert res.returncode == 0, f"rank {rank}:\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}"
        assert "worker done" in res.stdout, res.stdout
        oks = [line for line in res.stdout.splitlines() if " ok: " in line]
        assert len(oks) == 19, res.stdout
        assert any("depth=3" in line and ", 26 tensors" in line for line in oks)
        assert any("depth=1" in line and ", 10 tensors" in line for line in oks)
