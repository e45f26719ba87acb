"""LARS and LAMB on a CUDA device: step() never synchronises with the host (found_inf set or not),
the results match the float64 rule computed on the CPU, and state dicts move between devices."""

import copy

import pytest
import torch
from torch import nn

from test_optim import _bad, _make, _reference_lamb, _reference_lars, _tensors

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

WD = 1e-2
ADAPT = [True, False, True, True, True]  # _make's groups: tensor 1 has no trust ratio


def _want(kind, params, grads, nesterov):
    if kind == "lamb":
        return _reference_lamb(params, grads, 0.01, 0.8, 0.99, 1e-6, [WD] * 5, ADAPT)
    return _reference_lars(params, grads, 0.5, 0.9, [WD] * 5, 0.02, 1e-8, nesterov, kind == "larc", ADAPT)


@pytest.mark.parametrize("kind", ["lars", "larc", "lamb"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_cuda_steps_do_not_synchronise_and_match_the_reference(kind, dtype, tol):
    dev = torch.device("cuda")
    params, grads = _tensors(seed=21)
    params = [p.to(dtype) for p in params]
    grads = [[g.to(dtype) for g in s] for s in grads[:6]]
    ps = [nn.Parameter(p.to(dev, copy=True)) for p in params]
    nesterov = kind != "lamb"
    opt = _make(kind, ps, "fused", WD, nesterov)
    # everything the loop uses is on the device before sync checking starts
    dev_grads = [[g.to(dev) for g in s] for s in grads]
    bad = _bad(dev_grads[2], "nan")
    one, zero, scale = (torch.full((), v, device=dev) for v in (1.0, 0.0, 4.0))
    scaled = [[g * 4 for g in s] for s in dev_grads]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for t, gs in enumerate(dev_grads):
            if t == 2:  # a skipped step: NaN gradients and found_inf = 1
                for p, g in zip(ps, bad):
                    p.grad = g
                opt.found_inf, opt.grad_scale = one, None
                opt.step()
            for p, g in zip(ps, scaled[t] if t % 2 else gs):
                p.grad = g
            opt.found_inf, opt.grad_scale = (zero, scale) if t % 2 else (zero, None)
            opt.step()
            if t == 4:
                del opt.found_inf, opt.grad_scale
    finally:
        torch.cuda.set_sync_debug_mode(0)
    want = _want(kind, [p.double() for p in params], [[g.double() for g in s] for s in grads], nesterov)
    for a, b in zip(ps, want):
        assert a.device.type == "cuda" and a.dtype == dtype
        torch.testing.assert_close(a.detach().cpu().double(), b, rtol=tol, atol=tol)
    if kind == "lamb":
        assert all(opt.state[p]["step"].device == dev and opt.state[p]["step"].item() == 6 for p in ps)


@pytest.mark.parametrize("kind", ["lars", "lamb"])
@pytest.mark.parametrize("src,dst", [("cuda", "cpu"), ("cpu", "cuda")])
def test_state_dict_loads_on_another_device(kind, src, dst):
    params, grads = _tensors(seed=22)
    ps = [nn.Parameter(p.to(src, copy=True)) for p in params]
    opt = _make(kind, ps)
    for s in grads[:4]:
        for p, g in zip(ps, s):
            p.grad = g.to(src)
        opt.step()
    state = copy.deepcopy(opt.state_dict())
    ps2 = [nn.Parameter(p.detach().to(dst, copy=True)) for p in ps]
    opt2 = _make(kind, ps2)
    opt2.load_state_dict(state)
    for s in grads[4:8]:
        for pa, pb, g in zip(ps, ps2, s):
            pa.grad, pb.grad = g.to(src), g.to(dst)
        opt.step()
        opt2.step()
    for a, b in zip(ps, ps2):
        assert b.device.type == dst
        torch.testing.assert_close(a.detach().cpu(), b.detach().cpu(), rtol=1e-10, atol=1e-12)
    for p in ps2:
        for v in opt2.state[p].values():
            assert v.device.type == dst
