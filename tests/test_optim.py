"""LARS and LAMB against the update rules written out independently, on random tensors."""

import copy
import math

import pytest
import torch
from torch import nn

from largebatch.config import load_config
from largebatch.optim import LAMB, LARS, build_optimizer, param_groups


def _tensors(seed=0, zero_param=True, zero_grad=True):
    """A few parameter tensors of mixed shapes, some with zero norms, and a gradient sequence."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(4, 3, 3, 3), (16,), (7, 5), (1,), (3, 3)]
    params = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    if zero_param:
        params[3].zero_()  # ||p|| = 0
    grads = []
    for _ in range(12):
        step = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
        if zero_grad:
            step[4].zero_()  # ||g|| = 0
        grads.append(step)
    return params, grads


def _reference_lars(params, grads, lr, momentum, wd, tc, eps, nesterov, clip, adapt):
    ps = [p.clone() for p in params]
    bufs = [None] * len(ps)
    for step in grads:
        lr_t = lr(step) if callable(lr) else lr
        for i, (p, g) in enumerate(zip(ps, step)):
            if adapt[i]:
                pn, gn = p.norm().item(), g.norm().item()
                trust = tc * pn / (gn + wd[i] * pn + eps) if pn > 0 and gn > 0 else 1.0
                if clip and pn > 0 and gn > 0:
                    trust = min(trust / lr_t, 1.0)
                d = (g + wd[i] * p) * trust
            else:
                d = g + wd[i] * p
            bufs[i] = d.clone() if bufs[i] is None else momentum * bufs[i] + d
            upd = d + momentum * bufs[i] if nesterov else bufs[i]
            ps[i] = p - lr_t * upd
    return ps


def _run(opt_cls, params, grads, groups_spec, lr_of_step=None, layout=None, **kw):
    """Steps an optimizer through ``grads`` (a ``None`` gradient leaves that tensor out of a step).
    ``layout(t)`` may give each parameter and gradient another memory layout with the same values."""
    layout = layout or torch.clone
    ps = [nn.Parameter(layout(p)) for p in params]
    groups = [dict(params=[ps[i] for i in idx], **extra) for idx, extra in groups_spec]
    opt = opt_cls(groups, **kw)
    for t, step in enumerate(grads):
        if lr_of_step is not None:
            for grp in opt.param_groups:
                grp["lr"] = lr_of_step(t)
        for p, g in zip(ps, step):
            p.grad = None if g is None else layout(g)
        opt.step()
    return [p.detach() for p in ps], opt


GROUPS = [([0, 2, 3, 4], dict(weight_decay=1e-2, adapt=True)), ([1], dict(weight_decay=0.0, adapt=False))]


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("clip", [False, True])
def test_lars_matches_update_rule(foreach, nesterov, clip):
    params, grads = _tensors()
    lr = 0.5
    got, _ = _run(LARS, params, grads, GROUPS, lr=lr, momentum=0.9, weight_decay=1e-2, trust_coefficient=0.02,
                  eps=1e-8, nesterov=nesterov, trust_clip=clip, foreach=foreach)
    wd = [1e-2, 0.0, 1e-2, 1e-2, 1e-2]
    adapt = [True, False, True, True, True]
    want = _reference_lars(params, grads, lr, 0.9, wd, 0.02, 1e-8, nesterov, clip, adapt)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_lars_lr_change_does_not_rescale_momentum():
    params, grads = _tensors(seed=3)
    sched = lambda t: 0.1 * (t + 1)  # noqa: E731 - a warmup
    got, _ = _run(LARS, params, grads, [([0, 1, 2, 3, 4], dict())], lr_of_step=sched, lr=0.1, momentum=0.9)
    lr_of = {id(step): sched(t) for t, step in enumerate(grads)}
    want = _reference_lars(params, grads, lambda step: lr_of[id(step)], 0.9, [0.0] * 5, 0.001, 1e-8,
                           False, False, [True] * 5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_lars_paths_agree_in_float32():
    params, grads = _tensors(seed=1)
    params, grads = [p.float() for p in params], [[g.float() for g in s] for s in grads]
    a, _ = _run(LARS, params, grads, GROUPS, lr=1.0, momentum=0.9, nesterov=True, foreach=False)
    b, _ = _run(LARS, params, grads, GROUPS, lr=1.0, momentum=0.9, nesterov=True, foreach=True)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


def _reference_lamb(params, grads, lr, b1, b2, eps, wd, adapt):
    """The LAMB rule tensor by tensor; a ``None`` gradient skips the tensor (its step count stays)."""
    ps = [p.clone() for p in params]
    m = [torch.zeros_like(p) for p in ps]
    v = [torch.zeros_like(p) for p in ps]
    steps = [0] * len(ps)
    for step in grads:
        for i, (p, g) in enumerate(zip(ps, step)):
            if g is None:
                continue
            steps[i] += 1
            t = steps[i]
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            r = (m[i] / (1 - b1 ** t)) / (torch.sqrt(v[i] / (1 - b2 ** t)) + eps)
            u = r + wd[i] * p
            pn, un = p.norm().item(), u.norm().item()
            trust = pn / un if adapt[i] and pn > 0 and un > 0 else 1.0
            ps[i] = p - lr * trust * u
    return ps


@pytest.mark.parametrize("foreach", [False, True])
def test_lamb_matches_update_rule(foreach):
    params, grads = _tensors(seed=2)
    got, _ = _run(LAMB, params, grads, GROUPS, lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=1e-2,
                  foreach=foreach)
    want = _reference_lamb(params, grads, 0.01, 0.8, 0.99, 1e-6, [1e-2, 0.0, 1e-2, 1e-2, 1e-2],
                           [True, False, True, True, True])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _transposed(t):
    """The same values with the last two dimensions stored transposed (not contiguous)."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2) if t.dim() >= 2 else t.clone()


def _channels_last(t):
    return t.clone(memory_format=torch.channels_last) if t.dim() == 4 else t.clone()


@pytest.mark.parametrize("layout,fused", [(None, True), (_channels_last, True), (_transposed, False)])
def test_lamb_foreach_layouts(layout, fused):
    """The multi-tensor path on contiguous and channels-last tensors (fused Adam kernel) and on
    strided ones (plain foreach kernels), with tensors missing gradients at some steps so that step
    counts in a group differ."""
    from largebatch.optim import lamb

    make = layout or torch.clone
    params, grads = _tensors(seed=5)
    for t, step in enumerate(grads):
        if t % 3 == 1:
            step[0] = None  # the 4-d weight (adapt group) lags behind
        if t % 4 == 2:
            step[1] = None  # and so does the bias (adapt=False group)
    assert lamb._fusable(make(params[0]), make(grads[0][0])) == (fused and lamb._has_fused_kernel("cpu"))
    got, _ = _run(LAMB, params, grads, GROUPS, layout=make, lr=0.01, betas=(0.8, 0.99), eps=1e-6,
                  weight_decay=1e-2, foreach=True)
    want = _reference_lamb(params, grads, 0.01, 0.8, 0.99, 1e-6, [1e-2, 0.0, 1e-2, 1e-2, 1e-2],
                           [True, False, True, True, True])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 1e-2), (torch.bfloat16, 5e-2)])
def test_lamb_paths_agree(device, dtype, tol):
    """foreach and single-tensor paths in lower precision against the rule in float64 from the same
    rounded values (the tolerance covers rounding of the parameters themselves)."""
    params, grads = _tensors(seed=6)
    low = lambda t: t.to(device, dtype)  # noqa: E731
    lp = [low(p) for p in params]
    lg = [[low(g) for g in s] for s in grads]
    kw = dict(lr=0.01, betas=(0.9, 0.99), eps=1e-6, weight_decay=1e-2)
    want = _reference_lamb([p.double() for p in lp], [[g.double() for g in s] for s in lg], 0.01, 0.9, 0.99, 1e-6,
                           [1e-2, 0.0, 1e-2, 1e-2, 1e-2], [True, False, True, True, True])
    for foreach in (True, False):
        got, _ = _run(LAMB, lp, lg, GROUPS, foreach=foreach, **kw)
        for a, b in zip(got, want):
            assert a.dtype == dtype and a.device.type == device
            torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol)


@pytest.mark.parametrize("opt_cls,kw", [(LARS, dict(lr=0.3, nesterov=True)), (LAMB, dict(lr=0.01))])
def test_state_dict_round_trip(opt_cls, kw):
    params, grads = _tensors(seed=4)
    first, second = grads[:6], grads[6:]
    ps_a, opt_a = _run(opt_cls, params, first, GROUPS, **kw)
    state = copy.deepcopy(opt_a.state_dict())
    # A fresh optimizer loaded from the state dict continues exactly like the original.
    ps_b = [nn.Parameter(p.clone()) for p in ps_a]
    opt_b = opt_cls([dict(params=[ps_b[i] for i in idx], **extra) for idx, extra in GROUPS], **kw)
    opt_b.load_state_dict(state)
    ps_a = [nn.Parameter(p.clone()) for p in ps_a]
    opt_a2 = opt_cls([dict(params=[ps_a[i] for i in idx], **extra) for idx, extra in GROUPS], **kw)
    opt_a2.load_state_dict(copy.deepcopy(state))
    for step in second:
        for opt, ps in ((opt_b, ps_b), (opt_a2, ps_a)):
            for p, g in zip(ps, step):
                p.grad = g.clone()
            opt.step()
    for x, y in zip(ps_a, ps_b):
        assert torch.equal(x, y)
    # and the loaded state is what was saved
    assert set(state["state"]) == set(opt_b.state_dict()["state"])


@pytest.mark.parametrize("kw,match", [
    (dict(lr=0.0), "learning rate"), (dict(lr=1.0, momentum=1.0), "momentum"),
    (dict(lr=1.0, weight_decay=-1.0), "weight_decay"), (dict(lr=1.0, trust_coefficient=0.0), "trust"),
    (dict(lr=1.0, momentum=0.0, nesterov=True), "Nesterov"),
])
def test_lars_rejects_bad_args(kw, match):
    with pytest.raises(ValueError, match=match):
        LARS([nn.Parameter(torch.ones(2))], **kw)


@pytest.mark.parametrize("kw,match", [(dict(lr=-1.0), "learning rate"), (dict(lr=1.0, betas=(1.0, 0.9)), "betas"),
                                      (dict(lr=1.0, eps=-1.0), "eps")])
def test_lamb_rejects_bad_args(kw, match):
    with pytest.raises(ValueError, match=match):
        LAMB([nn.Parameter(torch.ones(2))], **kw)


def test_param_groups_skip_bias_and_norm():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8, 4),
                          nn.LayerNorm(4))
    groups = param_groups(model, 5e-4)
    adapt, skip = groups
    assert adapt["adapt"] and adapt["weight_decay"] == 5e-4 and not skip["adapt"] and skip["weight_decay"] == 0
    assert {id(p) for p in adapt["params"]} == {id(model[0].weight), id(model[3].weight)}
    assert {id(p) for p in skip["params"]} == {id(model[1].weight), id(model[1].bias), id(model[3].bias),
                                               id(model[4].weight), id(model[4].bias)}
    (only,) = param_groups(model, 5e-4, exclude_bn_and_bias=False)
    assert len(only["params"]) == 7


@pytest.mark.parametrize("name,cls", [("sgd", torch.optim.SGD), ("lars", LARS), ("larc", LARS), ("lamb", LAMB)])
def test_build_optimizer_from_config(name, cls):
    cfg = load_config(None, [f"optim.name={name}", "optim.weight_decay=1e-4", "optim.eps=1e-7"])
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    opt = build_optimizer(model, cfg.optim)
    assert isinstance(opt, cls)
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-4, 0.0]
    if cls is LARS:
        assert opt.param_groups[0]["trust_clip"] == (name == "larc") and opt.param_groups[0]["eps"] == 1e-7


def test_sqrt_and_no_scaling():
    from largebatch.optim import scaled_lr

    assert scaled_lr(0.01, 1024, 256, "sqrt") == pytest.approx(0.02)
    assert scaled_lr(0.01, 1024, 256, "none") == pytest.approx(0.01)
    assert scaled_lr(0.01, 1024, 256, "linear") == pytest.approx(0.04)
    assert math.isclose(scaled_lr(1.0, 64, 256, "sqrt"), 0.5)
