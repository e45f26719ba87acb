"""Precise BatchNorm statistics: recompute the population statistics before evaluation.

BatchNorm's running mean and variance are exponential averages over the last ~1/momentum steps
(10 with PyTorch's default 0.1). At large global batches an epoch has few steps and the weights
move far in each, so those averages describe weights that no longer exist, and validation, which
uses them, suffers while training loss does not. Recomputing them with the current weights over a
few thousand training images fixes this (Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm",
section 3; the PRECISE_BN option of pycls). The optimizer step is not touched.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def batchnorm_layers(model: nn.Module) -> list[_BatchNorm]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recompute_batchnorm(model: nn.Module, batches: Iterable, device: torch.device, comm) -> int:
    """Set every BatchNorm's running statistics to the mean of its batch statistics over ``batches``
    (this worker's share), averaged over all workers. Returns the number of images used here.

    Under comm.shard=full every forward pass all-gathers weights with the other workers, so every
    worker must be given as many batches (the training sampler gives each the same number)."""
    layers = batchnorm_layers(model)
    if not layers:
        return 0
    was_training = model.training
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the forward passes below
    model.train()
    seen = 0
    for x, _ in batches:
        model(x.to(device, non_blocking=True))
        seen += x.shape[0]
    for m, momentum in zip(layers, momenta):
        m.momentum = momentum
    stats = torch.cat([torch.cat([m.running_mean, m.running_var]) for m in layers]).double()
    comm.all_reduce_sum(stats)
    stats /= comm.topology.world_size
    offset = 0
    for m in layers:
        n = m.running_mean.numel()
        m.running_mean.copy_(stats[offset:offset + n])
        m.running_var.copy_(stats[offset + n:offset + 2 * n])
        offset += 2 * n
    model.train(was_training)
    return seen
