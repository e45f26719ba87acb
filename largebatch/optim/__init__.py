"""Optimizers and learning-rate schedules."""

from __future__ import annotations

import torch
from torch import nn

from largebatch.optim.schedule import LRSchedule, build_schedule, scaled_lr


def build_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    """The optimizer named by ``cfg`` (an OptimConfig). Its lr is set by the schedule every step."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.base_lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.name!r}")


__all__ = ["build_optimizer", "build_schedule", "scaled_lr", "LRSchedule"]
