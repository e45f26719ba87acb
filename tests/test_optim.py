"""LARS and LAMB against the update rules written out independently, on random tensors; their
multi-tensor paths (fused kernels, plain foreach kernels) against the single-tensor reference; the
found_inf / grad_scale protocol, with no host read in the multi-tensor paths."""

import copy
import math

import pytest
import torch
from torch import nn

from checks import host_reads_refused
from largebatch.config import load_config
from largebatch.optim import LAMB, LARS, _norms, build_optimizer, param_groups

PATHS = ["fused", "plain", "single"]  # multi-tensor with the fused kernels, multi-tensor without, single-tensor


def _path(monkeypatch, path: str) -> bool:
    """Sets up ``path``; returns the ``foreach`` flag for it."""
    if path == "plain":  # as on a device without the fused kernels
        monkeypatch.setattr(_norms, "has_fused_kernel", lambda op, device_type: False)
    return path != "single"


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


def _run(opt_cls, params, grads, groups_spec, lr_of_step=None, layout=None, grad_layout=None, **kw):
    """Steps an optimizer through ``grads`` (a ``None`` gradient leaves that tensor out of a step).
    ``layout(t)`` may give each parameter (and gradient, unless ``grad_layout`` is given) another
    memory layout with the same values."""
    layout = layout or torch.clone
    grad_layout = grad_layout or layout
    ps = [nn.Parameter(layout(p)) for p in params]
    groups = [dict(params=[ps[i] for i in idx], **extra) for idx, extra in groups_spec]
    opt = opt_cls(groups, **kw)
    for t, step in enumerate(grads):
        if lr_of_step is not None:
            for grp in opt.param_groups:
                grp["lr"] = lr_of_step(t)
        for p, g in zip(ps, step):
            p.grad = None if g is None else grad_layout(g)
        opt.step()
    return [p.detach() for p in ps], opt


GROUPS = [([0, 2, 3, 4], dict(weight_decay=1e-2, adapt=True)), ([1], dict(weight_decay=0.0, adapt=False))]
# the same with weight decay in the adapt=False group too
GROUPS_WD = [([0, 2, 3, 4], dict(weight_decay=1e-2, adapt=True)), ([1], dict(weight_decay=1e-2, adapt=False))]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("groups", [GROUPS, GROUPS_WD], ids=["bias-wd0", "bias-wd"])
def test_lars_matches_update_rule(path, nesterov, clip, groups, monkeypatch):
    params, grads = _tensors()
    lr = 0.5
    got, _ = _run(LARS, params, grads, groups, lr=lr, momentum=0.9, weight_decay=1e-2, trust_coefficient=0.02,
                  eps=1e-8, nesterov=nesterov, trust_clip=clip, foreach=_path(monkeypatch, path))
    wd = [1e-2, groups[1][1]["weight_decay"], 1e-2, 1e-2, 1e-2]
    adapt = [True, False, True, True, True]
    want = _reference_lars(params, grads, lr, 0.9, wd, 0.02, 1e-8, nesterov, clip, adapt)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("path", PATHS)
def test_lars_without_momentum(path, monkeypatch):
    params, grads = _tensors(seed=11)
    got, opt = _run(LARS, params, grads, GROUPS, lr=0.5, momentum=0.0, weight_decay=1e-2, trust_coefficient=0.02,
                    foreach=_path(monkeypatch, path))
    want = _reference_lars(params, grads, 0.5, 0.0, [1e-2, 0.0, 1e-2, 1e-2, 1e-2], 0.02, 1e-8, False, False,
                           [True, False, True, True, True])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert all("momentum_buffer" not in st for st in opt.state.values())


@pytest.mark.parametrize("path", PATHS)
def test_lars_lr_change_does_not_rescale_momentum(path, monkeypatch):
    params, grads = _tensors(seed=3)
    sched = lambda t: 0.1 * (t + 1)  # noqa: E731 - a warmup
    got, _ = _run(LARS, params, grads, [([0, 1, 2, 3, 4], dict())], lr_of_step=sched, lr=0.1, momentum=0.9,
                  foreach=_path(monkeypatch, path))
    lr_of = {id(step): sched(t) for t, step in enumerate(grads)}
    want = _reference_lars(params, grads, lambda step: lr_of[id(step)], 0.9, [0.0] * 5, 0.001, 1e-8,
                           False, False, [True] * 5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("path", ["fused", "plain"])
def test_lars_paths_agree_in_float32(path, monkeypatch):
    params, grads = _tensors(seed=1)
    params, grads = [p.float() for p in params], [[g.float() for g in s] for s in grads]
    a, _ = _run(LARS, params, grads, GROUPS, lr=1.0, momentum=0.9, nesterov=True, foreach=False)
    b, _ = _run(LARS, params, grads, GROUPS, lr=1.0, momentum=0.9, nesterov=True, foreach=_path(monkeypatch, path))
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 1e-2), (torch.bfloat16, 5e-2)])
def test_lars_paths_agree_in_low_precision(device, dtype, tol):
    """Both paths in fp16/bf16 against the rule in float64 from the same rounded values (on the CPU
    the multi-tensor path takes foreach kernels here: see ``_norms.fusable_dtype``)."""
    params, grads = _tensors(seed=12)
    lp = [p.to(device, dtype) for p in params]
    lg = [[g.to(device, dtype) for g in s] for s in grads[:6]]
    kw = dict(lr=0.5, momentum=0.9, weight_decay=1e-2, trust_coefficient=0.02, nesterov=True)
    want = _reference_lars([p.cpu().double() for p in lp], [[g.cpu().double() for g in s] for s in lg], 0.5, 0.9,
                           [1e-2, 0.0, 1e-2, 1e-2, 1e-2], 0.02, 1e-8, True, False, [True, False, True, True, True])
    for foreach in (True, False):
        got, _ = _run(LARS, lp, lg, GROUPS, foreach=foreach, **kw)
        for a, b in zip(got, want):
            assert a.dtype == dtype and a.device.type == device
            torch.testing.assert_close(a.cpu().double(), b, rtol=tol, atol=tol)


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


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("groups", [GROUPS, GROUPS_WD], ids=["bias-wd0", "bias-wd"])
@pytest.mark.parametrize("wd", [1e-2, 0.0])
def test_lamb_matches_update_rule(path, groups, wd, monkeypatch):
    params, grads = _tensors(seed=2)
    groups = [(idx, dict(extra, weight_decay=extra["weight_decay"] and wd)) for idx, extra in groups]
    got, _ = _run(LAMB, params, grads, groups, lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=wd,
                  foreach=_path(monkeypatch, path))
    want = _reference_lamb(params, grads, 0.01, 0.8, 0.99, 1e-6, [wd, groups[1][1]["weight_decay"], wd, wd, wd],
                           [True, False, True, True, True])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _transposed(t):
    """The same values with the last two dimensions stored transposed (not contiguous)."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2) if t.dim() >= 2 else t.clone()


def _channels_last(t):
    return t.clone(memory_format=torch.channels_last) if t.dim() == 4 else t.clone()


def _strided(t):
    """The same values every other element of a buffer: not one dense block (but a 1-element tensor is)."""
    return torch.stack([t, torch.zeros_like(t)], dim=-1)[..., 0]


def _buckets(opt, group=0):
    """The multi-tensor plan of a group: one (fused, number of gradients to copy) per bucket."""
    _, _, buckets = opt._plans._plans[group]
    return sorted((b.fused, len(b.relayout)) for b in buckets)


@pytest.mark.parametrize("opt_cls", [LARS, LAMB])
@pytest.mark.parametrize("layout,grad_layout,plan", [
    (None, None, [(True, 0)]),
    (_channels_last, None, [(True, 0)]),
    (_transposed, None, [(True, 0)]),  # dense, if not contiguous: the fused kernels take it
    (None, _channels_last, [(True, 1)]),  # the 4-d gradient is copied into the weight's layout
    (None, _transposed, [(True, 3)]),  # and so are the three transposed ones
    (_strided, None, [(False, 0), (True, 0)]),  # plain foreach kernels (the 1-element tensor is dense)
])
def test_multi_tensor_layouts(opt_cls, layout, grad_layout, plan):
    """The multi-tensor path on several layouts of parameters and gradients, with tensors missing
    gradients at some steps so that step counts in a group differ."""
    params, grads = _tensors(seed=5)
    for t, step in enumerate(grads):
        if t % 3 == 1:
            step[0] = None  # the 4-d weight (adapt group) lags behind
        if t % 4 == 2:
            step[1] = None  # and so does the bias (adapt=False group)
    wd = [1e-2, 0.0, 1e-2, 1e-2, 1e-2]
    adapt = [True, False, True, True, True]
    if opt_cls is LAMB:
        kw = dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=1e-2)
        want = _reference_lamb(params, grads, 0.01, 0.8, 0.99, 1e-6, wd, adapt)
    else:
        kw = dict(lr=0.5, momentum=0.9, weight_decay=1e-2, trust_coefficient=0.02, nesterov=True)
        grads = [[torch.zeros_like(params[i]) if g is None else g for i, g in enumerate(s)] for s in grads]
        want = _reference_lars(params, grads, 0.5, 0.9, wd, 0.02, 1e-8, True, False, adapt)
    got, opt = _run(opt_cls, params, grads, GROUPS, layout=layout, grad_layout=grad_layout, foreach=True, **kw)
    assert _buckets(opt) == plan
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("opt_cls,kw", [(LARS, dict(lr=0.5, trust_coefficient=0.02)), (LAMB, dict(lr=0.01))])
def test_plan_is_kept_and_rebuilt_when_layouts_change(opt_cls, kw):
    """The buckets are built once; new gradient or parameter layouts, or another set of parameters
    with gradients, build them again (and the results stay right)."""
    params, grads = _tensors(seed=13)
    ps = [nn.Parameter(p.clone()) for p in params]
    opt = opt_cls([dict(params=ps)], **kw)
    ref_ps = [nn.Parameter(p.clone()) for p in params]
    ref = opt_cls([dict(params=ref_ps)], foreach=False, **kw)
    plans = []
    for t, step in enumerate(grads[:8]):
        layout = _channels_last if t in (3, 4) else (lambda g: g.clone())
        for p, q, g in zip(ps, ref_ps, step):
            p.grad, q.grad = layout(g), g.clone()
        if t == 5:
            ps[2].grad = ref_ps[2].grad = None  # parameter 2 has no gradient at this step
        if t == 6:
            ps[0].data = ps[0].data.clone(memory_format=torch.channels_last)  # the parameter itself
        opt.step()
        ref.step()
        plans.append(opt._plans._plans[0][2])
    assert plans[1] is plans[0] and plans[2] is plans[0]
    assert plans[3] is not plans[2] and plans[4] is plans[3]  # channels-last gradients
    assert plans[5] is not plans[4] and plans[6] is not plans[5] and plans[7] is plans[6]
    assert _buckets(opt) == [(True, 1)]  # the weight is channels-last now and its gradients are not
    for a, b in zip(ps, ref_ps):
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


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("opt_cls,kw", [(LARS, dict(lr=0.3, nesterov=True)), (LAMB, dict(lr=0.01))])
def test_state_dict_round_trip(opt_cls, kw, path, monkeypatch):
    kw = dict(kw, foreach=_path(monkeypatch, path))
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


@pytest.mark.parametrize("path", PATHS)
def test_lamb_loads_state_in_other_layouts_and_step_formats(path, monkeypatch):
    """A state dict whose moments have another layout than the parameters now have (saved from a
    channels-last model, say) and whose step counts are float64 CPU tensors loads and continues as
    the original does."""
    foreach = _path(monkeypatch, path)
    params, grads = _tensors(seed=14)
    kw = dict(lr=0.01, weight_decay=1e-2, foreach=foreach)
    ps_a, opt_a = _run(LAMB, params, grads[:5], GROUPS, layout=_channels_last, **kw)
    state = copy.deepcopy(opt_a.state_dict())
    for st in state["state"].values():
        st["step"] = st["step"].double()
    assert state["state"][0]["exp_avg"].is_contiguous(memory_format=torch.channels_last)
    ps_a = [nn.Parameter(_channels_last(p)) for p in ps_a]
    ps_b = [nn.Parameter(p.contiguous()) for p in ps_a]
    opt_a = LAMB([dict(params=[ps_a[i] for i in idx], **extra) for idx, extra in GROUPS], **kw)
    opt_b = LAMB([dict(params=[ps_b[i] for i in idx], **extra) for idx, extra in GROUPS], **kw)
    opt_a.load_state_dict(copy.deepcopy(state))
    opt_b.load_state_dict(state)
    assert all(st["step"].dtype == torch.float32 for st in opt_b.state.values())
    for step in grads[5:]:
        for pa, pb, g in zip(ps_a, ps_b, step):
            pa.grad, pb.grad = _channels_last(g), g.clone()
        opt_a.step()
        opt_b.step()
    for x, y in zip(ps_a, ps_b):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)
    if path == "fused":
        assert opt_b.state[ps_b[0]]["exp_avg"].is_contiguous()  # given the parameter's layout
        assert _buckets(opt_b) == [(True, 0)]


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
    assert getattr(opt, "_step_supports_amp_scaling", False)  # the engine skips steps on the device
    if cls is torch.optim.SGD:
        assert opt.defaults["fused"]  # torch 2.13 has the CPU kernel
        assert all(not opt.state[p]["momentum_buffer"].any() for p in model.parameters())
    if cls is LARS:
        assert opt.param_groups[0]["trust_clip"] == (name == "larc") and opt.param_groups[0]["eps"] == 1e-7


def test_sqrt_and_no_scaling():
    from largebatch.optim import scaled_lr

    assert scaled_lr(0.01, 1024, 256, "sqrt") == pytest.approx(0.02)
    assert scaled_lr(0.01, 1024, 256, "none") == pytest.approx(0.01)
    assert scaled_lr(0.01, 1024, 256, "linear") == pytest.approx(0.04)
    assert math.isclose(scaled_lr(1.0, 64, 256, "sqrt"), 0.5)


# --- the found_inf / grad_scale protocol (torch's fused optimizers and torch.amp.GradScaler) ---

# (kind, path, nesterov): torch's fused SGD as build_optimizer makes it, LARS, LARC and LAMB on every path
SKIP_CASES = ([("sgd", "fused", n) for n in (False, True)]
              + [(k, p, n) for k in ("lars", "larc") for p in PATHS for n in (False, True)]
              + [("lamb", p, False) for p in PATHS])


class _Holder(nn.Module):
    def __init__(self, ps):
        super().__init__()
        self.ps = nn.ParameterList(ps)


def _make(kind, ps, path="fused", wd=1e-2, nesterov=False):
    """The optimizer under test on ``ps`` (the five tensors of ``_tensors``)."""
    if kind == "sgd":
        cfg = load_config(None, ["optim.name=sgd", "optim.base_lr=0.5", f"optim.weight_decay={wd}",
                                 f"optim.nesterov={str(nesterov).lower()}"])
        opt = build_optimizer(_Holder(ps), cfg.optim)
        assert opt.defaults["fused"]
        return opt
    groups = [dict(params=[ps[i] for i in (0, 2, 3, 4)], weight_decay=wd, adapt=True),
              dict(params=[ps[1]], weight_decay=wd, adapt=False)]
    if kind == "lamb":
        return LAMB(groups, lr=0.01, betas=(0.8, 0.99), weight_decay=wd, foreach=path != "single")
    return LARS(groups, lr=0.5, momentum=0.9, weight_decay=wd, trust_coefficient=0.02, nesterov=nesterov,
                trust_clip=kind == "larc", foreach=path != "single")


def _step(opt, ps, grads, found_inf=None, grad_scale=None):
    for p, g in zip(ps, grads):
        p.grad = None if g is None else g.clone()
    if found_inf is not None:
        opt.found_inf = torch.tensor(float(found_inf))
    if grad_scale is not None:
        opt.grad_scale = torch.tensor(float(grad_scale))
    try:
        opt.step()
    finally:
        opt.__dict__.pop("found_inf", None)
        opt.__dict__.pop("grad_scale", None)


def _bad(grads, kind):
    """Gradients with NaN or +-inf: a whole tensor of the adapt group and one value of the bias."""
    bad = [g.clone() for g in grads]
    value = float("nan") if kind == "nan" else float("inf")
    bad[0].fill_(value)
    bad[1][3] = -value
    return bad


def _bits(t):
    t = t.detach().contiguous()
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


def _snapshot(opt, ps):
    return ([p.detach().clone() for p in ps],
            [{k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)} for p in ps])


def _assert_same(a, b):
    """Bit for bit (so that -0.0 and 0.0 differ, and NaN equals the same NaN)."""
    assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def _assert_unchanged(before, opt, ps):
    """Parameters and state as in ``before``; state that appeared since is all zeros (a first step)."""
    params, states = before
    for p, q in zip(ps, params):
        _assert_same(p, q)
    for p, old in zip(ps, states):
        for k, v in opt.state[p].items():
            if torch.is_tensor(v):
                if k in old:
                    _assert_same(v, old[k])
                else:
                    assert not v.any(), k


def _assert_states_equal(opt_a, ps_a, opt_b, ps_b):
    for p, q in zip(ps_a, ps_b):
        _assert_same(p, q)
        sa = {k: v for k, v in opt_a.state[p].items() if torch.is_tensor(v)}
        sb = {k: v for k, v in opt_b.state[q].items() if torch.is_tensor(v)}
        assert sa.keys() == sb.keys()
        for k in sa:
            _assert_same(sa[k], sb[k])


@pytest.mark.parametrize("kind,path,nesterov", SKIP_CASES)
@pytest.mark.parametrize("wd", [0.0, 1e-2])
@pytest.mark.parametrize("later", [False, True], ids=["first-step", "later-step"])
@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_found_inf_skips_the_step_exactly(kind, path, nesterov, wd, later, bad, monkeypatch):
    params, grads = _tensors(seed=7)
    ps = [nn.Parameter(p.clone()) for p in params]
    _path(monkeypatch, path)
    opt = _make(kind, ps, path, wd, nesterov)
    for g in grads[:3] if later else []:
        _step(opt, ps, g)
    before = _snapshot(opt, ps)
    _step(opt, ps, _bad(grads[3], bad), found_inf=1.0)
    _assert_unchanged(before, opt, ps)
    _step(opt, ps, _bad(grads[3], bad), found_inf=1.0, grad_scale=4.0)
    _assert_unchanged(before, opt, ps)
    if kind == "lamb" and later:
        assert all(opt.state[p]["step"].item() == 3 for p in ps)


@pytest.mark.parametrize("kind,path,nesterov", SKIP_CASES)
@pytest.mark.parametrize("at", [0, 2])
def test_a_skipped_step_leaves_no_trace(kind, path, nesterov, at, monkeypatch):
    """Skipped steps (at the first step or later) then normal ones (found_inf 0) give, bit for bit,
    the run that never had them (and no found_inf)."""
    params, grads = _tensors(seed=8)
    ps_a, ps_b = [nn.Parameter(p.clone()) for p in params], [nn.Parameter(p.clone()) for p in params]
    _path(monkeypatch, path)
    opt_a = _make(kind, ps_a, path, 1e-2, nesterov)
    opt_b = _make(kind, ps_b, path, 1e-2, nesterov)
    for t, g in enumerate(grads[:5]):
        if t == at:
            _step(opt_a, ps_a, _bad(g, "nan"), found_inf=1.0)
            _step(opt_a, ps_a, _bad(g, "inf"), found_inf=1.0)
        _step(opt_a, ps_a, g, found_inf=0.0)
        _step(opt_b, ps_b, g)
    _assert_states_equal(opt_a, ps_a, opt_b, ps_b)


@pytest.mark.parametrize("kind,path,nesterov", SKIP_CASES)
def test_grad_scale_divides_the_gradients(kind, path, nesterov, monkeypatch):
    params, grads = _tensors(seed=9)
    ps_a, ps_b, ps_c = ([nn.Parameter(p.clone()) for p in params] for _ in range(3))
    _path(monkeypatch, path)
    opt_a, opt_b, opt_c = (_make(kind, ps, path, 1e-2, nesterov) for ps in (ps_a, ps_b, ps_c))
    for g in grads[:4]:
        _step(opt_a, ps_a, [x * 1024 for x in g], found_inf=0.0, grad_scale=1024.0)  # exact: a power of 2
        _step(opt_b, ps_b, g)
        _step(opt_c, ps_c, [x * 3 for x in g], grad_scale=3.0)
    _assert_states_equal(opt_a, ps_a, opt_b, ps_b)
    for p, q in zip(ps_c, ps_b):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    assert not torch.equal(ps_b[0], params[0])


@pytest.mark.parametrize("kind", ["lars", "larc", "lamb", "sgd"])
def test_grad_scaler_skips_an_overflow_on_the_device(kind, monkeypatch):
    """torch.amp.GradScaler hands its scale and found_inf to the optimizer: an overflow leaves
    everything as it was without ``.item()``, and the normal steps are the unscaled ones."""
    params, grads = _tensors(seed=10)
    ps, ref_ps = [nn.Parameter(p.clone()) for p in params], [nn.Parameter(p.clone()) for p in params]
    opt, ref = _make(kind, ps, nesterov=kind != "lamb"), _make(kind, ref_ps, nesterov=kind != "lamb")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=1000)
    for t, g in enumerate(grads[:4]):
        scaler.scale(torch.zeros(()))  # what scaling the loss would do: the scale tensor exists
        scale = scaler.get_scale()
        overflow = t in (0, 2)
        for p, x in zip(ps, _bad(g, "inf") if overflow else g):
            p.grad = x * scale
        before = _snapshot(opt, ps)
        with host_reads_refused():
            scaler.step(opt)
        scaler.update()
        if overflow:
            _assert_unchanged(before, opt, ps)
            assert scaler.get_scale() == scale / 2
        else:
            _step(ref, ref_ps, g)
            _assert_states_equal(opt, ps, ref, ref_ps)
    assert not torch.equal(ps[0], params[0])


@pytest.mark.parametrize("kind", ["lars", "larc", "lamb", "sgd"])
@pytest.mark.parametrize("flag", [0.0, 1.0])
def test_multi_tensor_step_reads_nothing_on_the_host(kind, flag, monkeypatch):
    """step() with found_inf and grad_scale, with every way of reading a tensor on the host refused:
    the first step (state made, buckets planned), then more, on mixed layouts (one gradient copied
    into its weight's layout)."""
    params, grads = _tensors(seed=11)
    ps = [nn.Parameter(_channels_last(params[0])), *(nn.Parameter(_transposed(p)) for p in params[1:])]
    opt = _make(kind, ps, nesterov=kind != "lamb")
    before = _snapshot(opt, ps)
    with host_reads_refused():
        for g in grads[:3]:
            _step(opt, ps, [_transposed(x) for x in g], found_inf=flag, grad_scale=2.0)
    if flag:
        _assert_unchanged(before, opt, ps)
    else:
        assert not any(torch.equal(p, q) for p, q in zip(ps, before[0]))
    if kind != "sgd":
        assert sum(n for _, n in _buckets(opt)) == 1
        # the same patch catches the single-tensor path reading found_inf
        opt = _make(kind, ps, "single")
        with host_reads_refused():
            with pytest.raises(AssertionError, match="host"):
                _step(opt, ps, grads[0], found_inf=flag)


@pytest.mark.parametrize("opt_cls,kw", [(LARS, dict(lr=0.5, trust_coefficient=0.02, weight_decay=1e-2)),
                                        (LAMB, dict(lr=0.01, weight_decay=1e-2))])
@pytest.mark.parametrize("path", ["fused", "plain"])
def test_sparse_gradients_on_the_multi_tensor_path(opt_cls, kw, path, monkeypatch):
    """A sparse gradient (an embedding's) is made dense there: the same result as dense gradients."""
    foreach = _path(monkeypatch, path)
    torch.manual_seed(0)
    emb = nn.Embedding(10, 4, sparse=True).double()
    dense = nn.Parameter(emb.weight.detach().clone())
    start = dense.detach().clone()
    opt, ref = opt_cls(emb.parameters(), foreach=foreach, **kw), opt_cls([dense], foreach=foreach, **kw)
    for ids in ([1, 2, 2], [3, 9], [1]):
        emb.weight.grad = None
        emb(torch.tensor(ids)).sum().backward()
        assert emb.weight.grad.is_sparse
        dense.grad = emb.weight.grad.to_dense()
        opt.step()
        ref.step()
    torch.testing.assert_close(emb.weight.detach(), dense.detach(), rtol=1e-12, atol=1e-14)
    assert not torch.equal(dense.detach()[1], start[1])
