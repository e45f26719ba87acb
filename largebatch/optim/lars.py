"""LARS: layer-wise adaptive rate scaling.

You, Gitman & Ginsburg 2017, "Large Batch Training of Convolutional Networks" (arXiv:1708.03888),
in the form the MLPerf ResNet-50 reference and common PyTorch implementations apply it. For each
parameter tensor ``p`` with gradient ``g`` in a group whose ``adapt`` flag is true::

    trust = trust_coefficient * ||p|| / (||g|| + weight_decay * ||p|| + eps)   (1 if ||p|| or ||g|| is 0)
    trust = min(trust / lr, 1)                                    with trust_clip (LARC clipping)
    d     = (g + weight_decay * p) * trust

In a group with ``adapt=False`` (biases and normalisation weights, normally with weight_decay 0),
``d = g + weight_decay * p``. Then, with momentum buffer ``b``::

    b = momentum * b + d            (b = d at the first step)
    p = p - lr * b                  or, with Nesterov, p = p - lr * (d + momentum * b)

Momentum and learning-rate changes: ``b`` accumulates updates *before* the learning rate is
applied, so when the lr changes (warmup, decay) past momentum is not rescaled; Goyal et al. 2017
(Remark 2, "momentum correction") show this is equivalent to rescaling the momentum term by
lr_new / lr_old in the form that stores lr-scaled updates. This is the choice of torch.optim.SGD
and the MLPerf reference, and it needs no correction term.

Norms of fp16/bf16 tensors are computed in float32. No collective runs here: the
gradient is already the global-batch mean when ``step()`` is called.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch.optim import Optimizer

from largebatch.optim._norms import wide


class LARS(Optimizer):
    def __init__(self, params: Iterable, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001, eps: float = 1e-8, nesterov: bool = False,
                 trust_clip: bool = False, foreach: Optional[bool] = None):
        if lr <= 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Invalid momentum: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay: {weight_decay}")
        if trust_coefficient <= 0.0:
            raise ValueError(f"Invalid trust_coefficient: {trust_coefficient}")
        if eps < 0.0:
            raise ValueError(f"Invalid eps: {eps}")
        if nesterov and momentum == 0.0:
            raise ValueError("Nesterov momentum requires momentum > 0")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient,
                        eps=eps, nesterov=nesterov, trust_clip=trust_clip, adapt=True,
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
            grads = [p.grad for p in params]
            bufs = [self.state[p].get("momentum_buffer") for p in params]
            fn = _lars_foreach if group["foreach"] and not any(g.is_sparse for g in grads) else _lars_single
            fn(params, grads, bufs, group)
            for p, b in zip(params, bufs):
                self.state[p]["momentum_buffer"] = b
        return loss


def _trust_ratio(p_norm: torch.Tensor, g_norm: torch.Tensor, group: dict) -> torch.Tensor:
    """Per-tensor trust ratio from float32 norms (works elementwise on stacked norms too)."""
    wd, lr = group["weight_decay"], group["lr"]
    trust = group["trust_coefficient"] * p_norm / (g_norm + wd * p_norm + group["eps"])
    if group["trust_clip"]:
        trust = torch.clamp(trust / lr, max=1.0)
    return torch.where((p_norm > 0) & (g_norm > 0), trust, torch.ones_like(trust))


def _lars_single(params, grads, bufs, group) -> None:
    """Reference path: one tensor at a time."""
    wd, momentum, lr = group["weight_decay"], group["momentum"], group["lr"]
    for i, (p, g) in enumerate(zip(params, grads)):
        d = g.add(p, alpha=wd) if wd != 0 else g.clone()
        if group["adapt"]:
            trust = _trust_ratio(wide(p).norm(), wide(g).norm(), group)
            d.mul_(trust.to(d.dtype))
        if momentum != 0:
            if bufs[i] is None:
                bufs[i] = d.clone()
            else:
                bufs[i].mul_(momentum).add_(d)
            d = d.add(bufs[i], alpha=momentum) if group["nesterov"] else bufs[i]
        p.add_(d, alpha=-lr)


def _lars_foreach(params, grads, bufs, group) -> None:
    """Multi-tensor path: the same arithmetic with ``torch._foreach_*`` kernels."""
    wd, momentum, lr = group["weight_decay"], group["momentum"], group["lr"]
    d = torch._foreach_add(grads, params, alpha=wd) if wd != 0 else [g.clone() for g in grads]
    if group["adapt"]:
        p_norm = torch.stack(torch._foreach_norm([wide(p) for p in params]))
        g_norm = torch.stack(torch._foreach_norm([wide(g) for g in grads]))
        trust = _trust_ratio(p_norm, g_norm, group)
        torch._foreach_mul_(d, [t.to(x.dtype) for t, x in zip(trust.unbind(), d)])
    if momentum != 0:
        old = [i for i, b in enumerate(bufs) if b is not None]
        for i, b in enumerate(bufs):
            if b is None:
                bufs[i] = d[i].clone()
        if old:
            old_bufs = [bufs[i] for i in old]
            torch._foreach_mul_(old_bufs, momentum)
            torch._foreach_add_(old_bufs, [d[i] for i in old])
        d = torch._foreach_add(d, bufs, alpha=momentum) if group["nesterov"] else bufs
    torch._foreach_add_(params, d, alpha=-lr)
