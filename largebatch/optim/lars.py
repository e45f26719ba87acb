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

Norms of fp16/bf16 tensors are computed in float32. No collective runs here (but the one sum
handed in for sharded parameters, below): the gradient is already the global-batch mean when
``step()`` is called.

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

Sharded parameters (``shard_sum`` given; ``comm.shard=full``): parameters and gradients are DTensors
split along their first dimension (uneven, or empty on some workers), and every kernel above runs on
this worker's shards (``to_local()`` views). Momentum buffers are DTensors shaped like their
parameters (as torch's optimizers make them, for ``torch.distributed.checkpoint``), created as zeros
with the optimizer. The step first takes, for every tensor with a trust ratio in every group, the
norms of its local shards of ``p`` and ``g`` (unscaled), puts them all in one 1-D tensor and sums
their squares over the workers with ONE call of ``shard_sum`` (it sums a 1-D tensor over the
workers in place and returns it); the square roots are the whole tensors' norms, from which the
trust ratios follow as above, all on the device. ``found_inf`` works as above, with every worker
making the same call whether the step is skipped or not.
"""

from __future__ import annotations

import functools
from typing import Callable, Iterable, Optional

import torch
from torch.optim import Optimizer

from largebatch.optim._norms import (Bucket, Plans, ShardNorms, check_sharding, local_states, locals_of,
                                     make_buckets, norms, on, skip_on_host, step_states, wide,
                                     zero_momentum)


class LARS(Optimizer):
    _step_supports_amp_scaling = True  # step() honours the grad_scale and found_inf attributes

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001, eps: float = 1e-8, nesterov: bool = False,
                 trust_clip: bool = False, foreach: Optional[bool] = None,
                 shard_sum: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
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
        self.shard_sum = shard_sum
        super().__init__(params, defaults)
        check_sharding(self)
        if shard_sum is not None:  # state exists from the start (what torch.distributed.checkpoint expects)
            for group in self.param_groups:
                if group["momentum"] != 0:
                    zero_momentum(self.state, group["params"])

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("shard_sum", None)
        self._plans = Plans()  # the state tensors may have been replaced

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        if self.shard_sum is not None:
            self._step_sharded(grad_scale, found_inf)
            return loss
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
                lars_bucket_step(b, b.grads(grads), group, on(grad_scale, dev), on(found_inf, dev))
        return loss

    def _plan(self, params: list[torch.Tensor], grads: list[torch.Tensor], momentum: bool) -> list[Bucket]:
        return make_buckets(params, grads, step_states(self.state, params, momentum), "_fused_sgd_",
                            ("momentum_buffer",) if momentum else ())

    def _step_sharded(self, grad_scale: Optional[torch.Tensor], found_inf: Optional[torch.Tensor]) -> None:
        """The step on local shards: the local norms of every adapted tensor, one ``shard_sum``, then
        the updates (see the module's docstring)."""
        sums, pending = ShardNorms(), []
        for index, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            ps, gs, ident = locals_of(params)
            momentum = group["momentum"] != 0
            keys = ("momentum_buffer",) if momentum else ()
            base = sums.reserve(2 * len(ps)) if group["adapt"] else 0
            if not group["foreach"]:
                states = local_states(params, step_states(self.state, params, momentum), keys)
                pending.append(_lars_single_sharded(ps, gs, states, group, grad_scale, found_inf, sums, base))
                continue
            buckets = self._plans.get(index, group, ps, gs, momentum, lambda: make_buckets(
                ps, gs, local_states(params, step_states(self.state, params, momentum), keys), "_fused_sgd_", keys), ident)
            for b in buckets:
                dev = b.params[0].device
                b_gs, b_scale, b_inf = b.grads(gs), on(grad_scale, dev), on(found_inf, dev)
                if not group["adapt"]:
                    lars_bucket_step(b, b_gs, group, b_scale, b_inf)
                    continue
                if b_scale is not None:
                    torch._foreach_div_(b_gs, b_scale)
                idx = range(len(ps)) if b.idx is None else b.idx
                part = sums.add([base + i for i in idx] + [base + len(ps) + i for i in idx],
                                torch.cat([norms(b.params), norms(b_gs)]))
                pending.append(functools.partial(_lars_bucket_apply, b, b_gs, group, b_inf, part))
        totals = sums.reduce(self.shard_sum)
        for apply in pending:
            apply(totals)


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


def _lars_single_sharded(ps, gs, states, group, grad_scale, found_inf, sums: ShardNorms, base: int):
    """The reference path on local shards: the local norms now (into ``sums`` from ``base``, for an
    adapted group); returns what applies the updates from the summed norms. Reads ``found_inf`` on
    the host."""
    if grad_scale is not None:
        gs = [g / grad_scale.to(g.device) for g in gs]
    part = None
    if group["adapt"]:
        part = sums.add(list(range(base, base + 2 * len(ps))),
                        torch.stack([wide(p).norm() for p in ps] + [wide(g).norm() for g in gs]))

    def apply(totals: list[torch.Tensor]) -> None:
        if skip_on_host(found_inf):
            return
        wd, momentum, lr = group["weight_decay"], group["momentum"], group["lr"]
        trust = None if part is None else _trust_ratio(*totals[part].chunk(2), group).unbind()
        for i, (p, g, st) in enumerate(zip(ps, gs, states)):
            d = g.add(p, alpha=wd) if wd != 0 else g.clone()
            if trust is not None:
                d.mul_(trust[i])
            if momentum != 0:
                buf = st["momentum_buffer"]  # zeros at the first step: momentum * 0 + d = d
                buf.mul_(momentum).add_(d)
                d = d.add(buf, alpha=momentum) if group["nesterov"] else buf
            p.add_(d, alpha=-lr)

    return apply


def lars_bucket_step(b: Bucket, gs: list[torch.Tensor], group: dict, grad_scale: Optional[torch.Tensor],
                     found_inf: Optional[torch.Tensor]) -> None:
    """One step of ``group``'s rule on bucket ``b`` with gradients ``gs``, multi-tensor: ``d``
    computed in place in the gradients (they are scratch after the step), then
    ``torch._fused_sgd_``, or plain foreach kernels where it cannot run. ``group["adapt"]`` False:
    no trust ratio, which is momentum SGD."""
    if not b.fused and skip_on_host(found_inf):
        return
    wd = group["weight_decay"]
    if grad_scale is not None and (group["adapt"] or not b.fused):  # else the fused kernel divides
        torch._foreach_div_(gs, grad_scale)
        grad_scale = None
    if group["adapt"]:
        _apply_trust(b.params, gs, _trust_ratio(norms(b.params), norms(gs), group), wd)
        wd = 0.0
    # else the kernel (or the foreach kernels below) adds weight_decay * p
    _lars_update(b, gs, group, wd, grad_scale, found_inf)


def _lars_bucket_apply(b: Bucket, gs: list[torch.Tensor], group: dict, found_inf: Optional[torch.Tensor], part: int,
                       totals: list[torch.Tensor]) -> None:
    """The rest of the multi-tensor path for a bucket of an adapted group, its gradients already
    unscaled, from the whole tensors' norms (``totals[part]``: those of p, then those of g)."""
    if not b.fused and skip_on_host(found_inf):
        return
    _apply_trust(b.params, gs, _trust_ratio(*totals[part].chunk(2), group), group["weight_decay"])
    _lars_update(b, gs, group, 0.0, None, found_inf)


def _apply_trust(ps: list[torch.Tensor], gs: list[torch.Tensor], trust: torch.Tensor, wd: float) -> None:
    """``d = (g + wd * p) * trust`` in place in the gradients (trust as 0-dim tensors: no host read)."""
    if wd != 0:
        torch._foreach_add_(gs, ps, alpha=wd)
    torch._foreach_mul_(gs, trust.unbind())


def _lars_update(b: Bucket, gs: list[torch.Tensor], group: dict, wd: float, grad_scale: Optional[torch.Tensor],
                 found_inf: Optional[torch.Tensor]) -> None:
    """Momentum and the update from ``d`` (``gs``, with ``wd * p`` still to add where wd is not 0)."""
    ps, bufs = b.params, b.state.get("momentum_buffer", [])
    momentum, lr = group["momentum"], group["lr"]
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
