"""LAMB: layer-wise adaptive moments for large-batch training.

You et al. 2019, "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes"
(arXiv:1904.00962). For each parameter tensor ``p`` with gradient ``g`` at step ``t`` (from 1)::

    m = beta1 * m + (1 - beta1) * g            v = beta2 * v + (1 - beta2) * g^2
    m_hat = m / (1 - beta1^t)                  v_hat = v / (1 - beta2^t)
    r = m_hat / (sqrt(v_hat) + eps)
    u = r + weight_decay * p
    trust = ||p|| / ||u||   in a group with adapt=True (1 where either norm is 0); else 1
    p = p - lr * trust * u

No gradient clipping inside the optimizer. Norms of fp16/bf16 tensors are computed in float32. No
collective runs here but the one sum handed in for sharded parameters (below).

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

Sharded parameters (``shard_sum`` given; ``comm.shard=full``): parameters and gradients are DTensors
split along their first dimension (uneven, or empty on some workers), and every kernel above runs on
this worker's shards (``to_local()`` views). The moments are DTensors shaped like their parameters
(as torch's Adam makes them, for ``torch.distributed.checkpoint``) and the step counts plain
tensors, all created with the optimizer. The step first advances the moments of every bucket of
every group (a group without trust ratios is updated then), keeping ``u`` (``x``) of the others;
then it puts the norms of the local shards of ``p`` and ``u`` of every tensor with a trust ratio
into one 1-D tensor and sums their squares over the workers with ONE call of ``shard_sum`` (it sums
a 1-D tensor over the workers in place and returns it); the square roots are the whole tensors'
norms, and the trust ratios and updates follow as above, on the device.
``found_inf`` works as above, with every worker making the same call whether the step is skipped or
not.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Iterable, Optional

import torch
from torch.optim import Optimizer

from largebatch.optim._norms import (Bucket, Plans, ShardNorms, check_sharding, local_states, locals_of,
                                     make_buckets, norms, on, skip_on_host, wide)


class LAMB(Optimizer):
    _step_supports_amp_scaling = True  # step() honours the grad_scale and found_inf attributes

    def __init__(self, params: Iterable, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.01, foreach: Optional[bool] = None,
                 shard_sum: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
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
        self.shard_sum = shard_sum
        super().__init__(params, defaults)
        check_sharding(self)
        if shard_sum is not None:  # state exists from the start (what torch.distributed.checkpoint expects)
            for group in self.param_groups:
                for p in group["params"]:
                    self._init_state(p)

    def __setstate__(self, state: dict) -> None:
        """Also run by ``load_state_dict``, which leaves ``step`` tensors where they were saved (on
        the CPU in state dicts from before they lived on the device): they go to their parameter's."""
        super().__setstate__(state)
        self.__dict__.setdefault("shard_sum", None)
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
        if self.shard_sum is not None:
            self._step_sharded(grad_scale, found_inf, keep)
            return loss
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

    def _step_sharded(self, grad_scale: Optional[torch.Tensor], found_inf: Optional[torch.Tensor],
                      keep: Optional[torch.Tensor]) -> None:
        """The step on local shards: ``u`` of every bucket, the local norms of every adapted tensor,
        one ``shard_sum``, then the updates (see the module's docstring)."""
        sums, pending = ShardNorms(), []
        moments = ("exp_avg", "exp_avg_sq")
        for index, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            ps, gs, ident = locals_of(params)
            base = sums.reserve(2 * len(ps)) if group["adapt"] else 0
            if not group["foreach"]:
                states = local_states(params, [self._init_state(p) for p in params], moments)
                pending.append(_lamb_single_sharded(ps, gs, states, group, grad_scale, found_inf, sums, base))
                continue
            buckets = self._plans.get(index, group, ps, gs, None, lambda: make_buckets(
                ps, gs, local_states(params, [self._init_state(p) for p in params], moments), "_fused_adamw_",
                moments, ("step",)), ident)
            for b in buckets:
                dev = b.params[0].device
                args = b.grads(gs), group, on(grad_scale, dev), on(found_inf, dev), on(keep, dev)
                xs = (_lamb_fused_direction if b.fused else _lamb_foreach_direction)(b, *args)
                if xs is None or not group["adapt"]:
                    continue  # applied, or skipped on the host (a group without trust ratios)
                idx = range(len(ps)) if b.idx is None else b.idx
                positions = [base + i for i in idx] + [base + len(ps) + i for i in idx]
                if xs is _SKIPPED:  # skipped on the host: every worker still makes the same call
                    sums.add(positions, torch.zeros(len(positions), device=dev))
                    continue
                part = sums.add(positions, torch.cat([norms(b.params), norms(xs)]))
                pending.append(functools.partial(_lamb_apply, b.params, xs, group["lr"], b.fused, on(keep, dev), part))
        totals = sums.reduce(self.shard_sum)
        for apply in pending:
            apply(totals)


def _trust(p_norm: torch.Tensor, u_norm: torch.Tensor) -> torch.Tensor:
    return torch.where((p_norm > 0) & (u_norm > 0), p_norm / u_norm, 1.0)


def _lamb_single(params, grads, states, group, grad_scale, found_inf) -> None:
    """Reference path: one tensor at a time. Reads ``found_inf`` and the step counts on the host."""
    if skip_on_host(found_inf):
        return
    for p, g, st in zip(params, grads, states):
        u = _lamb_u(p, g, st, group, grad_scale)
        if group["adapt"]:
            u.mul_(_trust(wide(p).norm(), wide(u).norm()))
        p.add_(u, alpha=-group["lr"])


def _lamb_u(p, g, st, group, grad_scale) -> torch.Tensor:
    """One tensor's moments and step count advanced, and its ``u`` (reads the step count on the host)."""
    beta1, beta2 = group["betas"]
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
    return u


def _lamb_single_sharded(ps, gs, states, group, grad_scale, found_inf, sums: ShardNorms, base: int):
    """The reference path on local shards: ``u`` and the local norms now (into ``sums`` from
    ``base``, for an adapted group); returns what applies the updates from the summed norms."""
    n, lr = len(ps), group["lr"]
    if skip_on_host(found_inf):
        if group["adapt"]:  # every worker still makes the same call
            sums.add(list(range(base, base + 2 * n)), torch.zeros(2 * n, device=ps[0].device))
        return lambda totals: None
    us = [_lamb_u(p, g, st, group, grad_scale) for p, g, st in zip(ps, gs, states)]
    if not group["adapt"]:
        for p, u in zip(ps, us):
            p.add_(u, alpha=-lr)
        return lambda totals: None
    part = sums.add(list(range(base, base + 2 * n)),
                    torch.stack([wide(p).norm() for p in ps] + [wide(u).norm() for u in us]))

    def apply(totals: list[torch.Tensor]) -> None:
        for p, u, trust in zip(ps, us, _trust(*totals[part].chunk(2)).unbind()):
            p.add_(u.mul_(trust), alpha=-lr)

    return apply


def _lamb_fused(b: Bucket, gs: list[torch.Tensor], group: dict, grad_scale: Optional[torch.Tensor],
                found_inf: Optional[torch.Tensor], keep: Optional[torch.Tensor]) -> None:
    """Multi-tensor path for a bucket the fused AdamW kernel takes; nothing here reads the host."""
    xs = _lamb_fused_direction(b, gs, group, grad_scale, found_inf, keep)
    if xs is not None:
        trust = _trust(norms(b.params), norms(xs))
        if keep is not None:
            trust = trust * keep
        # p + lr * trust * x = p - lr * trust * u (trust as 0-dim tensors: no host read)
        torch._foreach_addcmul_(b.params, xs, trust.unbind(), value=group["lr"])


def _lamb_fused_direction(b: Bucket, gs: list[torch.Tensor], group: dict, grad_scale: Optional[torch.Tensor],
                          found_inf: Optional[torch.Tensor], keep: Optional[torch.Tensor]) -> Optional[list]:
    """The moments and step counts of a bucket the fused AdamW kernel takes, advanced, and ``x = -u``
    for a group with trust ratios (None for one without: its update is then applied here).

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
        return None
    xs = torch._foreach_mul(ps, 1.0 if wd != 0 else 0.0)
    torch._fused_adamw_(xs, gs, ms, vs, [], steps, lr=1.0, weight_decay=1.0 + wd if wd != 0 else 0.0, **kw)
    if group["adapt"]:
        return xs
    if keep is not None:
        torch._foreach_mul_(xs, keep)
    torch._foreach_add_(ps, xs, alpha=lr)
    return None


# what _lamb_foreach_direction returns for a step skipped on the host
_SKIPPED: list = []


def _lamb_foreach(b: Bucket, gs: list[torch.Tensor], group: dict, grad_scale: Optional[torch.Tensor],
                  found_inf: Optional[torch.Tensor], keep: Optional[torch.Tensor]) -> None:
    """Multi-tensor path with plain foreach kernels, for other devices and non-dense parameters.
    Reads ``found_inf`` on the host; bias corrections are computed on the device in float64."""
    us = _lamb_foreach_direction(b, gs, group, grad_scale, found_inf, keep)
    if us is not None and us is not _SKIPPED:
        torch._foreach_addcmul_(b.params, us, _trust(norms(b.params), norms(us)).unbind(), value=-group["lr"])


def _lamb_foreach_direction(b: Bucket, gs: list[torch.Tensor], group: dict, grad_scale: Optional[torch.Tensor],
                            found_inf: Optional[torch.Tensor], keep: Optional[torch.Tensor]) -> Optional[list]:
    """The moments and step counts advanced with plain foreach kernels, and ``u`` for a group with
    trust ratios (None for one without: its update is then applied here; ``_SKIPPED`` when
    ``found_inf``, read on the host, is 1)."""
    if skip_on_host(found_inf):
        return _SKIPPED
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
    if group["adapt"]:
        return us
    torch._foreach_addcmul_(ps, us, torch.ones(len(ps), device=ps[0].device).unbind(), value=-group["lr"])
    return None


def _lamb_apply(ps: list[torch.Tensor], xs: list[torch.Tensor], lr: float, fused: bool, keep: Optional[torch.Tensor],
                part: int, totals: list[torch.Tensor]) -> None:
    """The update of a bucket of an adapted group from the whole tensors' norms (``totals[part]``:
    those of p, then those of u): ``xs`` is -u from the fused kernel, else u."""
    trust = _trust(*totals[part].chunk(2))
    if not fused:
        torch._foreach_addcmul_(ps, xs, trust.unbind(), value=-lr)
        return
    if keep is not None:
        trust = trust * keep
    torch._foreach_addcmul_(ps, xs, trust.unbind(), value=lr)
