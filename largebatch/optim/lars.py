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

Skipping a step on the device (the protocol of torch's fused optimizers and
``torch.amp.GradScaler``): ``step()`` reads the attributes ``grad_scale`` and ``found_inf`` (0-dim
float tensors on the parameters' device, or None). ``g`` is first divided by ``grad_scale``; with
``found_inf`` equal to 1 the step leaves parameters and momentum buffers as they were, whatever the
gradients hold (NaN and inf included).

The multi-tensor path (``foreach=True``, the default) computes ``d`` for a group with a few
``torch._foreach_*`` kernels, in place in the gradients (so after ``step()`` a parameter's ``.grad``
holds its ``d``, or the unscaled gradient; like torch's fused optimizers, it treats gradients as
scratch once the step has them), the trust ratios as one tensor, and hands ``d`` to
``torch._fused_sgd_`` (momentum and the update in one pass; its kernel skips on ``found_inf`` without
the host reading it). Momentum buffers start as zeros, so ``b = momentum * 0 + d = d`` at the first
step with the same kernel call, and a skipped first step leaves them zero. Where that kernel cannot
run (another device, non-dense parameters, fp16/bf16 on the CPU: see ``_norms.fusable_dtype``), plain
foreach kernels run and ``found_inf`` is read on the host; the single-tensor reference path
(``foreach=False``) reads it on the host too.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch.optim import Optimizer

from largebatch.optim._norms import Bucket, Plans, make_buckets, norms, on, skip_on_host, wide


class LARS(Optimizer):
    _step_supports_amp_scaling = True  # step() honours the grad_scale and found_inf attributes

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
        self._plans = Plans()
        super().__init__(params, defaults)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._plans = Plans()  # the state tensors may have been replaced

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        for index, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if not group["foreach"]:
                _lars_single(params, grads, [self.state[p] for p in params], group, grad_scale, found_inf)
                continue
            momentum = group["momentum"] != 0
            buckets = self._plans.get(index, group, params, grads, momentum,
                                      lambda: self._plan(params, grads, momentum))
            for b in buckets:
                dev = b.params[0].device
                _lars_multi(b, b.grads(grads), group, on(grad_scale, dev), on(found_inf, dev))
        return loss

    def _plan(self, params: list[torch.Tensor], grads: list[torch.Tensor], momentum: bool) -> list[Bucket]:
        states = [self.state[p] for p in params]
        if momentum:
            for p, st in zip(params, states):
                if st.get("momentum_buffer") is None:
                    st["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return make_buckets(params, grads, states, "_fused_sgd_", ("momentum_buffer",) if momentum else ())


def _trust_ratio(p_norm: torch.Tensor, g_norm: torch.Tensor, group: dict) -> torch.Tensor:
    """Per-tensor trust ratio from float32 norms (works elementwise on stacked norms too)."""
    wd, lr = group["weight_decay"], group["lr"]
    trust = group["trust_coefficient"] * p_norm / (g_norm + wd * p_norm + group["eps"])
    if group["trust_clip"]:
        trust = torch.clamp(trust / lr, max=1.0)
    return torch.where((p_norm > 0) & (g_norm > 0), trust, 1.0)


def _lars_single(params, grads, states, group, grad_scale, found_inf) -> None:
    """Reference path: one tensor at a time. Reads ``found_inf`` on the host."""
    if skip_on_host(found_inf):
        return
    wd, momentum, lr = group["weight_decay"], group["momentum"], group["lr"]
    for p, g, st in zip(params, grads, states):
        if grad_scale is not None:
            g = g / grad_scale.to(g.device)
        d = g.add(p, alpha=wd) if wd != 0 else g.clone()
        if group["adapt"]:
            d.mul_(_trust_ratio(wide(p).norm(), wide(g).norm(), group))
        if momentum != 0:
            buf = st.get("momentum_buffer")
            if buf is None:
                buf = st["momentum_buffer"] = d.clone()
            else:
                buf.mul_(momentum).add_(d)
            d = d.add(buf, alpha=momentum) if group["nesterov"] else buf
        p.add_(d, alpha=-lr)


def _lars_multi(b: Bucket, gs: list[torch.Tensor], group: dict, grad_scale: Optional[torch.Tensor],
                found_inf: Optional[torch.Tensor]) -> None:
    """Multi-tensor path for one bucket: ``d`` computed in place in the gradients (they are scratch
    after the step), then ``torch._fused_sgd_``, or plain foreach kernels where it cannot run."""
    if not b.fused and skip_on_host(found_inf):
        return
    ps, bufs = b.params, b.state.get("momentum_buffer", [])
    wd, momentum, lr = group["weight_decay"], group["momentum"], group["lr"]
    if grad_scale is not None and (group["adapt"] or not b.fused):  # else the fused kernel divides
        torch._foreach_div_(gs, grad_scale)
        grad_scale = None
    if group["adapt"]:
        trust = _trust_ratio(norms(ps), norms(gs), group).unbind()  # 0-dim tensors: no host read
        if wd != 0:
            torch._foreach_add_(gs, ps, alpha=wd)
        torch._foreach_mul_(gs, trust)
        wd = 0.0
    # else the kernel (or the foreach kernels below) adds weight_decay * p
    if b.fused:
        torch._fused_sgd_(ps, gs, bufs, weight_decay=wd, momentum=momentum, lr=lr, dampening=0.0,
                          nesterov=group["nesterov"], maximize=False, is_first_step=False,
                          grad_scale=grad_scale, found_inf=found_inf)
        return
    if wd != 0:
        torch._foreach_add_(gs, ps, alpha=wd)
    if momentum != 0:
        torch._foreach_mul_(bufs, momentum)
        torch._foreach_add_(bufs, gs)
        if group["nesterov"]:
            torch._foreach_add_(gs, bufs, alpha=momentum)
    torch._foreach_add_(ps, gs if momentum == 0 or group["nesterov"] else bufs, alpha=-lr)
