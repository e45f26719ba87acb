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

import functools
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
    """Multi-tensor path: the same update in few passes over memory.

    Tensors are bucketed by device, dtype, step count (so that bias corrections are shared; the
    counts normally all match) and whether the fused Adam kernel can take them. Per bucket, a copy
    of p and one fused pass update the moments and give ``x = -u`` (see ``_neg_direction_fused``),
    one pass each gives ||p|| and ||u||, and one ``addcmul_`` applies ``p += lr * trust * x``: 14
    element reads and writes per value, against 25 for the same rule in unfused foreach kernels.
    """
    buckets: dict[tuple, list[int]] = {}
    for i, (p, g, st) in enumerate(zip(params, grads, states)):
        key = (p.device, p.dtype, int(st["step"].item()), _fusable(p, g, st["exp_avg"], st["exp_avg_sq"]))
        buckets.setdefault(key, []).append(i)
    for (_, dtype, t, fused), idx in buckets.items():
        ps, gs = [params[i] for i in idx], [grads[i] for i in idx]
        ms, vs = [states[i]["exp_avg"] for i in idx], [states[i]["exp_avg_sq"] for i in idx]
        neg_direction = _neg_direction_fused if fused else _neg_direction_foreach
        xs = neg_direction(ps, gs, ms, vs, t, group)
        if group["adapt"]:
            p_norm = torch.stack(torch._foreach_norm([wide(p) for p in ps]))
            u_norm = torch.stack(torch._foreach_norm([wide(x) for x in xs]))
            trust = _trust(p_norm, u_norm).to(dtype)
            # p + lr * trust * x = p - lr * trust * u, in one pass (trust as 0-dim tensors: no host sync)
            torch._foreach_addcmul_(ps, xs, list(trust.unbind()), value=group["lr"])
        else:
            torch._foreach_add_(ps, xs, alpha=group["lr"])


@functools.lru_cache(maxsize=None)
def _has_fused_kernel(device_type: str) -> bool:
    """Whether this torch build has ``torch._fused_adamw_`` for the device (on CPU since torch 2.4)."""
    if device_type not in ("cpu", "cuda"):
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("aten::_fused_adamw_", device_type.upper())
    except RuntimeError:  # no such operator
        return False


def _fusable(p: torch.Tensor, *others: torch.Tensor) -> bool:
    """Whether ``torch._fused_adamw_`` can take these tensors. Its CPU kernel walks raw memory, so
    parameter, gradient and moments must share device, dtype, strides and a dense layout."""
    if not _has_fused_kernel(p.device.type) or any(t.is_sparse for t in others):
        return False
    if not (p.is_contiguous() or p.is_contiguous(memory_format=torch.channels_last)):
        return False
    return all(t.device == p.device and t.dtype == p.dtype and t.stride() == p.stride() for t in others)


def _neg_direction_fused(ps, gs, ms, vs, t: int, group: dict) -> list[torch.Tensor]:
    """Updates the moments in place and returns new tensors ``x = -u``, in one fused pass.

    The AdamW kernel computes, for a tensor x, ``x = (1 - lr * w) * x - lr * r`` with r the
    bias-corrected Adam direction, updating m and v in the same pass. Run on a copy of p with
    lr = 1 and w = 1 + weight_decay, it yields x = -weight_decay * p - r = -u (the CPU and CUDA
    kernels apply the decay in double precision, so no cancellation error enters -weight_decay * p).
    Without weight decay, x = 0 and w = 0 give x = -r.
    """
    beta1, beta2 = group["betas"]
    wd = group["weight_decay"]
    if wd != 0:
        xs = [p.clone(memory_format=torch.preserve_format) for p in ps]
    else:
        xs = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in ps]
    # The kernel reads the step count from a tensor per parameter (on CUDA, on the device); one serves all here.
    step = torch.full((), float(t), dtype=torch.float32, device=ps[0].device)
    torch._fused_adamw_(xs, gs, ms, vs, [], [step] * len(xs), lr=1.0, beta1=beta1, beta2=beta2,
                        weight_decay=1.0 + wd if wd != 0 else 0.0, eps=group["eps"], amsgrad=False, maximize=False)
    return xs


def _neg_direction_foreach(ps, gs, ms, vs, t: int, group: dict) -> list[torch.Tensor]:
    """``_neg_direction_fused`` with plain foreach kernels, for other devices and layouts."""
    beta1, beta2 = group["betas"]
    torch._foreach_lerp_(ms, gs, 1 - beta1)
    torch._foreach_mul_(vs, beta2)
    torch._foreach_addcmul_(vs, gs, gs, value=1 - beta2)
    bc1, bc2_sqrt = _direction_scale(t, group)
    denom = torch._foreach_sqrt(vs)
    torch._foreach_div_(denom, bc2_sqrt)
    torch._foreach_add_(denom, group["eps"])
    xs = torch._foreach_mul(ps, -group["weight_decay"])
    torch._foreach_addcdiv_(xs, ms, denom, value=-1 / bc1)
    return xs
