"""Optimizers (SGD, LARS, LARC, LAMB), parameter groups and learning-rate schedules."""

from __future__ import annotations

import torch
from torch import nn

from largebatch.optim.groups import param_groups
from largebatch.optim.lamb import LAMB
from largebatch.optim.lars import LARS
from largebatch.optim.schedule import LRSchedule, build_schedule, scaled_lr


def build_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    """The optimizer named by ``cfg`` (an OptimConfig). Its lr is set by the schedule every step."""
    groups = param_groups(model, cfg.weight_decay, cfg.exclude_bn_and_bias)
    eps = {} if cfg.eps is None else {"eps": cfg.eps}
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.base_lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay, foreach=True)
    if cfg.name in ("lars", "larc"):
        return LARS(groups, lr=cfg.base_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                    trust_coefficient=cfg.trust_coefficient, nesterov=cfg.nesterov, trust_clip=cfg.name == "larc",
                    **eps)
    if cfg.name == "lamb":
        return LAMB(groups, lr=cfg.base_lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, **eps)
    raise ValueError(f"unknown optimizer {cfg.name!r}")


__all__ = ["build_optimizer", "param_groups", "LARS", "LAMB", "build_schedule", "scaled_lr", "LRSchedule"]
