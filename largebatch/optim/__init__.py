"""Optimizers (SGD, LARS, LARC, LAMB), parameter groups and learning-rate schedules."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from largebatch.optim._norms import fusable_dtype, has_fused_kernel, zero_momentum
from largebatch.optim.groups import param_groups
from largebatch.optim.lamb import LAMB
from largebatch.optim.lars import LARS
from largebatch.optim.schedule import LRSchedule, build_schedule, scaled_lr
from largebatch.optim.sgd import ShardedSGD


def optimizer_parts(model: nn.Module, cfg) -> tuple[type, list[dict], dict]:
    """The optimizer named by ``cfg`` (an OptimConfig) as ``(class, param groups, keyword arguments)``:
    ``cls(groups, **kwargs)`` builds it (what ``ZeroRedundancyOptimizer(groups, optimizer_class=cls,
    **kwargs)`` takes too). Its lr is set by the schedule every step.

    SGD is torch's fused SGD, or foreach SGD (which does not take ``found_inf``) where the fused
    kernel cannot take the parameters' device and dtype; on sharded parameters (DTensors, under
    ``comm.shard=full``) it is :class:`ShardedSGD`."""
    from largebatch.distributed.shard import is_sharded

    groups = param_groups(model, cfg.weight_decay, cfg.exclude_bn_and_bias)
    eps = {} if cfg.eps is None else {"eps": cfg.eps}
    if cfg.name == "sgd":
        params = [p for g in groups for p in g["params"]]
        kwargs = dict(lr=cfg.base_lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
        if any(is_sharded(p) for p in params):
            return ShardedSGD, groups, kwargs
        fused = bool(params) and all(fusable_dtype("_fused_sgd_", p.device.type, p.dtype) for p in params)
        return torch.optim.SGD, groups, dict(kwargs, **({"fused": True} if fused else {"foreach": True}))
    if cfg.name in ("lars", "larc"):
        return LARS, groups, dict(lr=cfg.base_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                                  trust_coefficient=cfg.trust_coefficient, nesterov=cfg.nesterov,
                                  trust_clip=cfg.name == "larc", **eps)
    if cfg.name == "lamb":
        return LAMB, groups, dict(lr=cfg.base_lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, **eps)
    raise ValueError(f"unknown optimizer {cfg.name!r}")


def prepare_state(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Zero momentum buffers for torch's fused SGD (``opt``, or the ``.optim`` of a
    ``ZeroRedundancyOptimizer`` around it) and for :class:`ShardedSGD`; other optimizers as they are.
    Returns ``opt``.

    torch's fused SGD starts its momentum buffers with empty_like at the first step and fills them
    in the kernel, which a skipped first step does not run. Zeros from the start give the same first
    update (momentum * 0 + g = g) and survive a skipped first step; on sharded parameters they are
    also the state ``torch.distributed.checkpoint`` expects to find."""
    if isinstance(opt, ShardedSGD) or (isinstance(opt, torch.optim.SGD) and opt.defaults.get("fused")):
        for group in opt.param_groups:
            if group["momentum"] != 0:
                zero_momentum(opt.state, group["params"])
    return opt


def build_optimizer(model: nn.Module, cfg, shard_sum: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
                    ) -> torch.optim.Optimizer:
    """The optimizer named by ``cfg`` (an OptimConfig) for ``model``'s parameters (see
    :func:`optimizer_parts`), its state prepared (:func:`prepare_state`).

    LARS, LAMB and SGD take ``grad_scale`` and ``found_inf`` (the protocol of ``torch.amp.GradScaler``)
    and skip a step on the device (but foreach SGD, see :func:`optimizer_parts`). ``shard_sum`` (a
    sum of a 1-D tensor over the workers, in place) is for parameters sharded by FSDP2: LARS, LARC
    and LAMB take their per-tensor norms through it, one call per step."""
    cls, groups, kwargs = optimizer_parts(model, cfg)
    if shard_sum is not None and cls in (LARS, LAMB):
        kwargs["shard_sum"] = shard_sum
    return prepare_state(cls(groups, **kwargs))


__all__ = ["build_optimizer", "optimizer_parts", "prepare_state", "param_groups", "LARS", "LAMB", "ShardedSGD",
           "build_schedule", "scaled_lr", "LRSchedule", "has_fused_kernel"]
