"""Optimizers (SGD, LARS, LARC, LAMB), parameter groups and learning-rate schedules."""

from __future__ import annotations

import torch
from torch import nn

from largebatch.optim._norms import fusable_dtype
from largebatch.optim.groups import param_groups
from largebatch.optim.lamb import LAMB
from largebatch.optim.lars import LARS
from largebatch.optim.schedule import LRSchedule, build_schedule, scaled_lr


def build_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    """The optimizer named by ``cfg`` (an OptimConfig). Its lr is set by the schedule every step.

    LARS, LAMB and SGD take ``grad_scale`` and ``found_inf`` (the protocol of ``torch.amp.GradScaler``)
    and skip a step on the device; SGD is torch's fused SGD for that, or foreach SGD (without the
    protocol) where the fused kernel cannot take the parameters' device and dtype."""
    groups = param_groups(model, cfg.weight_decay, cfg.exclude_bn_and_bias)
    eps = {} if cfg.eps is None else {"eps": cfg.eps}
    if cfg.name == "sgd":
        params = [p for g in groups for p in g["params"]]
        fused = bool(params) and all(fusable_dtype("_fused_sgd_", p.device.type, p.dtype) for p in params)
        opt = torch.optim.SGD(groups, lr=cfg.base_lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                              weight_decay=cfg.weight_decay, **({"fused": True} if fused else {"foreach": True}))
        if fused and cfg.momentum != 0:
            # torch's fused SGD starts its momentum buffers with empty_like at the first step and
            # fills them in the kernel, which a skipped first step does not run. Zeros from the start
            # give the same first update (momentum * 0 + g = g) and survive a skipped first step.
            for p in params:
                opt.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return opt
    if cfg.name in ("lars", "larc"):
        return LARS(groups, lr=cfg.base_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                    trust_coefficient=cfg.trust_coefficient, nesterov=cfg.nesterov, trust_clip=cfg.name == "larc",
                    **eps)
    if cfg.name == "lamb":
        return LAMB(groups, lr=cfg.base_lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, **eps)
    raise ValueError(f"unknown optimizer {cfg.name!r}")


__all__ = ["build_optimizer", "param_groups", "LARS", "LAMB", "build_schedule", "scaled_lr", "LRSchedule"]
