"""LAMB: layer-wise adaptive moments for large-batch training.

You et al. 2019, "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes"
(arXiv:1904.00962). For each parameter tensor ``p`` with gradient ``g`` at step ``t`` (from 1)::

    m = beta1 * m + (1 - beta1) * g            v = beta2 * v + (1 - beta2) * g^2
    m_hat = m / (1 - beta1^t)                  v_hat = v / (1 - beta2^t)
    r = m_hat / (sqrt(v_hat) + eps)
    u = r + weight_decay * p
    trust = ||p|| / ||u||   in a group with adapt=True (1 where either norm is 0); else 1
    p = p - lr * trust * u

No gradient clipping inside the optimizer. Norms of fp16/bf16 tensors are computed in float32. No collective runs here.

Skipping a step on the device (the protocol of torch's fused optimizers and
``torch.amp.GradScaler``): ``step()`` reads the attributes ``grad_scale`` and ``found_inf`` (0-dim
float tensors on the parameters' device, or None). ``g`` is first divided by ``grad_scale``; with
``found_inf`` equal to 1 the step leaves parameters, moments and step counts as they were, whatever
the gradients hold (NaN and inf included). The step count ``t`` of each tensor is a float32 tensor
on its device (``state["step"]``), advanced on the device by ``found_inf != 1``.

The multi-tensor path (``foreach=True``, the default) buckets a group's tensors by device, dtype and
whether ``torch._fused_adamw_`` can take them, once (again when the parameters or their layouts
change). Per bucket: one foreach op advances the step counts; a copy ``x`` of p (zeros without
weight decay) and one fused pass update the moments and give ``x = -u`` (see ``_lamb_fused``); one
pass each gives ||p|| and ||u||, and one ``addcmul_`` applies ``p += lr * keep * trust * x``, where
``keep`` is 0 on a skipped step (x is then finite: the kernel left it untouched). A group with
``adapt=False`` and no weight decay is just Adam: the fused kernel updates p directly. With
``grad_scale`` the kernel divides the gradients and leaves them so, in place (as torch's fused
optimizers do). On a device without that kernel, and for non-dense parameters, plain foreach kernels
run and ``found_inf`` is read on the host; the single-tensor reference path (``foreach=False``) reads
it and the step counts on the host.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
from torch.optim import Optimizer

from largebatch.optim._norms import Bucket, Plans, make_buckets, norms, on, skip_on_host, wide


class LAMB(Optimizer):
    _step_supports_amp_scaling = True  # step() honours the grad_scale and found_inf attributes

    def __init__(self, params: Iterable, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.01, foreach: Optional[bool] = None):
        if lr <= 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"Invalid betas: {betas}")
        if eps < 0.0:
            raise ValueError(f"Invalid eps: {eps}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay: {weight_decay}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, adapt=True,
                        foreach=True if foreach is None else foreach)
        self._plans = Plans()
        super().__init__(params, defaults)

    def __setstate__(self, state: dict) -> None:
        """Also run by ``load_state_dict``, which leaves ``step`` tensors where they were saved (on
        the CPU in state dicts from before they lived on the device): they go to their parameter's."""
        super().__setstate__(state)
        self._plans = Plans()
        for p, st in self.state.items():
            step = st.get("step") if isinstance(p, torch.Tensor) else None
            if isinstance(step, torch.Tensor) and (step.device != p.device or step.dtype != torch.float32):
                st["step"] = step.to(p.device, torch.float32)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        keep = None if found_inf is None else (found_inf != 1).to(torch.float32)
        for index, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if not group["foreach"]:
                _lamb_single(params, grads, [self._init_state(p) for p in params], group, grad_scale, found_inf)
                continue
            buckets = self._plans.get(index, group, params, grads, None, lambda: self._plan(params, grads))
            for b in buckets:
                dev = b.params[0].device
                (_lamb_fused if b.fused else _lamb_foreach)(b, b.grads(grads), group, on(grad_scale, dev),
                                                            on(found_inf, dev), on(keep, dev))
        return loss

    def _init_state(self, p: torch.Tensor) -> dict:
        st = self.state[p]
        if not st:
            st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return st

    def _plan(self, params: list[torch.Tensor], grads: list[torch.Tensor]) -> list[Bucket]:
        states = [self._init_state(p) for p in params]
        return make_buckets(params, grads, states, "_fused_adamw_", ("exp_avg", "exp_avg_sq"), ("step",))


def _trust(p_norm: torch.Tensor, u_norm: torch.Tensor) -> torch.Tensor:
    return torch.where((p_norm > 0) & (u_norm > 0), p_norm / u_norm, 1.0)


def _lamb_single(params, grads, states, group, grad_scale, found_inf) -> None:
    """Reference path: one tensor at a time. Reads ``found_inf`` and the step counts on the host."""
    if skip_on_host(found_inf):
        return
    beta1, beta2 = group["betas"]
    for p, g, st in zip(params, grads, states):
        if grad_scale is not None:
            g = g / grad_scale.to(g.device)
        m, v = st["exp_avg"], st["exp_avg_sq"]
        st["step"] += 1
        t = st["step"].item()
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        u = (m / (1 - beta1 ** t)) / (v.sqrt() / math.sqrt(1 - beta2 ** t) + group["eps"])
        if group["weight_decay"] != 0:
            u.add_(p, alpha=group["weight_decay"])
        if group["adapt"]:
            u.mul_(_trust(wide(p).norm(), wide(u).norm()))
        p.add_(u, alpha=-group["lr"])


def _lamb_fused(b: Bucket, gs: list[torch.Tensor], group: dict, grad_scale: Optional[torch.Tensor],
                found_inf: Optional[torch.Tensor], keep: Optional[torch.Tensor]) -> None:
    """Multi-tensor path for a bucket the fused AdamW kernel takes; nothing here reads the host.

    The kernel computes, for a tensor x, ``x = (1 - lr * w) * x - lr * r`` with r the bias-corrected
    Adam direction at each tensor's step count, updating m and v in the same pass (and skipping it
    all when found_inf is 1). Run on a copy of p with lr = 1 and w = 1 + weight_decay, it yields
    x = -weight_decay * p - r = -u (the CPU and CUDA kernels apply the decay in double precision,
    so no cancellation error enters -weight_decay * p). Without weight decay, x = 0 and w = 0 give
    x = -r.
    """
    ps, ms, vs, steps = b.params, b.state["exp_avg"], b.state["exp_avg_sq"], b.state["step"]
    beta1, beta2 = group["betas"]
    wd, lr = group["weight_decay"], group["lr"]
    torch._foreach_add_(steps, 1.0 if keep is None else keep)
    kw = dict(beta1=beta1, beta2=beta2, eps=group["eps"], amsgrad=False, maximize=False, grad_scale=grad_scale,
              found_inf=found_inf)
    if not group["adapt"] and wd == 0:  # Adam itself
        torch._fused_adamw_(ps, gs, ms, vs, [], steps, lr=lr, weight_decay=0.0, **kw)
        return
    xs = torch._foreach_mul(ps, 1.0 if wd != 0 else 0.0)
    torch._fused_adamw_(xs, gs, ms, vs, [], steps, lr=1.0, weight_decay=1.0 + wd if wd != 0 else 0.0, **kw)
    if group["adapt"]:
        trust = _trust(norms(ps), norms(xs))
        if keep is not None:
            trust = trust * keep
        # p + lr * trust * x = p - lr * trust * u (trust as 0-dim tensors: no host read)
        torch._foreach_addcmul_(ps, xs, trust.unbind(), value=lr)
    else:
        if keep is not None:
            torch._foreach_mul_(xs, keep)
        torch._foreach_add_(ps, xs, alpha=lr)


def _lamb_foreach(b: Bucket, gs: list[torch.Tensor], group: dict, grad_scale: Optional[torch.Tensor],
                  found_inf: Optional[torch.Tensor], keep: Optional[torch.Tensor]) -> None:
    """Multi-tensor path with plain foreach kernels, for other devices and non-dense parameters.
    Reads ``found_inf`` on the host; bias corrections are computed on the device in float64."""
    if skip_on_host(found_inf):
        return
    ps, ms, vs, steps = b.params, b.state["exp_avg"], b.state["exp_avg_sq"], b.state["step"]
    beta1, beta2 = group["betas"]
    if grad_scale is not None:
        gs = torch._foreach_div(gs, grad_scale)
    torch._foreach_add_(steps, 1.0)
    t = torch.stack(steps).double()
    bc1, bc2_sqrt = (1 - beta1 ** t).unbind(), (1 - beta2 ** t).sqrt().unbind()
    torch._foreach_lerp_(ms, gs, 1 - beta1)
    torch._foreach_mul_(vs, beta2)
    torch._foreach_addcmul_(vs, gs, gs, value=1 - beta2)
    denom = torch._foreach_sqrt(vs)
    torch._foreach_div_(denom, bc2_sqrt)
    torch._foreach_add_(denom, group["eps"])
    us = torch._foreach_div(ms, bc1)
    torch._foreach_div_(us, denom)
    if group["weight_decay"] != 0:
        torch._foreach_add_(us, ps, alpha=group["weight_decay"])
    trust = _trust(norms(ps), norms(us)) if group["adapt"] else torch.ones(len(ps), device=ps[0].device)
    torch._foreach_addcmul_(ps, us, trust.unbind(), value=-group["lr"])
