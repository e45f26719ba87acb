"""Momentum SGD on parameters sharded by FSDP2 (``comm.shard=full``).

torch's fused SGD kernel has no DTensor rule, and its foreach path does not take ``found_inf``, so
:class:`ShardedSGD` keeps torch's SGD (its update rule, hyperparameters and state: a
``momentum_buffer`` per parameter, a DTensor shaped like it) and runs ``torch._fused_sgd_`` on this
worker's shards (``to_local()`` views), the kernel that skips a step on the device when
``found_inf`` is 1 (the protocol of ``torch.amp.GradScaler``; ``grad_scale`` divides the
gradients). Where that kernel cannot take the shards' device and dtype (fp16/bf16 on the CPU: see
``_norms.fusable_dtype``) plain foreach kernels run and ``found_inf`` is read on the host. SGD has
no per-tensor norms, so no collective runs here. Gradients are scratch once ``step()`` has them,
as in torch's fused optimizers.
"""

from __future__ import annotations

from typing import Iterable

import torch

from largebatch.optim._norms import Plans, local_states, locals_of, make_buckets, on, step_states
from largebatch.optim.lars import lars_bucket_step


class ShardedSGD(torch.optim.SGD):
    _step_supports_amp_scaling = True  # step() honours the grad_scale and found_inf attributes

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
                 nesterov: bool = False):
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                         foreach=True)
        self._plans = Plans()

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
            if group["dampening"] != 0 or group["maximize"]:
                raise ValueError(f"ShardedSGD: dampening={group['dampening']}, maximize={group['maximize']}; "
                                 "use dampening=0 and maximize=False")
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            ps, gs, ident = locals_of(params)
            momentum = group["momentum"] != 0
            keys = ("momentum_buffer",) if momentum else ()
            buckets = self._plans.get(index, group, ps, gs, momentum, lambda: make_buckets(
                ps, gs, local_states(params, step_states(self.state, params, momentum), keys), "_fused_sgd_", keys), ident)
            rule = dict(group, adapt=False)  # d = g + weight_decay * p, then momentum: LARS without trust ratios
            for b in buckets:
                dev = b.params[0].device
                lars_bucket_step(b, b.grads(gs), rule, on(grad_scale, dev), on(found_inf, dev))
        return loss
