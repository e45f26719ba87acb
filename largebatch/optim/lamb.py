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
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
from torch.optim import Optimizer

from largebatch.optim._norms import wide


class LAMB(Optimizer):
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
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
            fn = _lamb_foreach if group["foreach"] else _lamb_single
            fn(params, [p.grad for p in params], [self.state[p] for p in params], group)
        return loss


def _direction_scale(t: int, group: dict) -> tuple[float, float]:
    beta1, beta2 = group["betas"]
    return 1.0 - beta1 ** t, math.sqrt(1.0 - beta2 ** t)


def _trust(p_norm: torch.Tensor, u_norm: torch.Tensor) -> torch.Tensor:
    return torch.where((p_norm > 0) & (u_norm > 0), p_norm / u_norm, torch.ones_like(p_norm))


def _lamb_single(params, grads, states, group) -> None:
    """Reference path: one tensor at a time."""
    beta1, beta2 = group["betas"]
    for p, g, st in zip(params, grads, states):
        m, v = st["exp_avg"], st["exp_avg_sq"]
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        bc1, bc2_sqrt = _direction_scale(int(st["step"].item()), group)
        u = (m / bc1) / (v.sqrt() / bc2_sqrt + group["eps"])
        if group["weight_decay"] != 0:
            u.add_(p, alpha=group["weight_decay"])
        trust = _trust(wide(p).norm(), wide(u).norm()) if group["adapt"] else torch.ones(())
        p.add_(u * trust.to(u.dtype), alpha=-group["lr"])


def _lamb_foreach(params, grads, states, group) -> None:
    """Multi-tensor path: the same update with ``torch._foreach_*`` kernels and fewer passes.

    With c = sqrt(1 - beta2^t) / (1 - beta1^t), r = c * m / (sqrt(v) + eps * sqrt(1 - beta2^t)). The
    kernels compute u' = m / (sqrt(v) + eps') + (weight_decay / c) * p, so that u = c * u'; in an
    adapt group the trust ratio ||p|| / ||u|| then cancels c: p -= lr * (||p|| / ||u'||) * u'.
    Tensors are grouped by step count so that bias corrections are shared (they normally all match).
    """
    beta1, beta2 = group["betas"]
    by_step: dict[int, list[int]] = {}
    for i, st in enumerate(states):
        by_step.setdefault(int(st["step"].item()), []).append(i)
    for t, idx in by_step.items():
        ps, gs = [params[i] for i in idx], [grads[i] for i in idx]
        ms, vs = [states[i]["exp_avg"] for i in idx], [states[i]["exp_avg_sq"] for i in idx]
        torch._foreach_lerp_(ms, gs, 1 - beta1)
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, gs, gs, value=1 - beta2)
        bc1, bc2_sqrt = _direction_scale(t, group)
        c = bc2_sqrt / bc1
        denom = torch._foreach_sqrt(vs)
        torch._foreach_add_(denom, group["eps"] * bc2_sqrt)
        if group["weight_decay"] != 0:
            u = torch._foreach_mul(ps, group["weight_decay"] / c)
            torch._foreach_addcdiv_(u, ms, denom)
        else:
            u = torch._foreach_div(ms, denom)
        del denom
        if group["adapt"]:
            p_norm = torch.stack(torch._foreach_norm([wide(p) for p in ps]))
            u_norm = torch.stack(torch._foreach_norm([wide(x) for x in u]))
            ok = (p_norm > 0) & (u_norm > 0)
            scale = torch.where(ok, p_norm / torch.where(ok, u_norm, torch.ones_like(u_norm)),
                                torch.full_like(p_norm, c)) * -group["lr"]
            torch._foreach_mul_(u, [x.to(y.dtype) for x, y in zip(scale.unbind(), u)])
            torch._foreach_add_(ps, u)
        else:
            torch._foreach_add_(ps, u, alpha=-group["lr"] * c)
