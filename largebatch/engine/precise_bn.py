"""Precise BatchNorm statistics: recompute the population statistics before evaluation.

BatchNorm's running mean and variance are exponential averages over the last ~1/momentum steps
(10 with PyTorch's default 0.1). At large global batches an epoch has few steps and the weights
move far in each, so those averages describe weights that no longer exist, and validation, which
uses them, suffers while training loss does not. Recomputing them with the current weights over a
few thousand training images fixes this (Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm",
section 3; the PRECISE_BN option of pycls). The optimizer step is not touched.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable, Optional, Union

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


AUTO_IMAGES = 4096
"""Images ``train.precise_bn_images=auto`` recomputes the statistics over (all of them in a smaller
training set): a few thousand, as Wu & Johnson recommend."""

AUTO_EPOCH_FRACTION = 1 / 3
"""``auto`` turns precise statistics on when BatchNorm's running averages span more than this
fraction of an epoch: when an epoch has fewer than ``AUTO_EPOCH_FRACTION**-1 / momentum`` steps
(30 at PyTorch's default momentum 0.1). The threshold comes from the measurements in
docs/batch_scaling.md (benchmarks/precise_bn.py): where an epoch had 22 steps or fewer they raised
the validation accuracy by more than 2 points on average over the run, at 44 and 89 by less than 1."""


def batchnorm_layers(model: nn.Module) -> list[_BatchNorm]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


@dataclass(frozen=True)
class PreciseBN:
    """What ``train.precise_bn_images`` means for one phase of a run."""

    images: int
    """Training images asked for before each validation; 0 = keep the running averages (or no
    BatchNorm to recompute)."""
    reason: str
    """Why, for the run header."""
    has_batchnorm: bool = True
    """Whether the model has BatchNorm layers with running statistics."""
    micro_batches: int = 0
    """Micro-batches each worker runs (:func:`micro_batches_for`; 0 until resolved for a phase)."""
    used: int = 0
    """Images all workers together run: whole micro-batches, at most one epoch's."""

    def for_phase(self, world_size: int, micro_batch: int, micro_batches_per_epoch: int) -> "PreciseBN":
        """The counts for a phase: ``micro_batches_per_epoch`` is one worker's in one epoch."""
        if not self.images:
            return self
        count = micro_batches_for(self.images, world_size, micro_batch, micro_batches_per_epoch)
        return replace(self, micro_batches=count, used=count * micro_batch * world_size)

    def line(self) -> str:
        if not self.has_batchnorm:
            return f"none to recompute ({self.reason})"
        if self.images:
            shown = self.used or self.images
            return f"precise: recomputed over {shown:,} training images before each validation ({self.reason})"
        return f"running averages ({self.reason})"


def micro_batches_for(images: int, world_size: int, micro_batch: int, micro_batches_per_epoch: int) -> int:
    """Micro-batches each worker runs to recompute the statistics over ``images``: the workers
    share them, each rounds up to whole micro-batches, and none runs more than one epoch's."""
    per_worker = -(-images // world_size)
    return min(-(-per_worker // micro_batch), micro_batches_per_epoch)


def choose_precise_bn(setting: Union[int, str], model: nn.Module, steps_per_epoch: int,
                      num_train: int) -> PreciseBN:
    """Resolve ``train.precise_bn_images`` (a number of images, or 'auto') for a phase with
    ``steps_per_epoch`` optimizer steps per epoch over ``num_train`` training images.

    'auto': on, over ``min(AUTO_IMAGES, num_train)`` images, for a model with BatchNorm layers that
    keep running statistics whose running averages cover more than ``AUTO_EPOCH_FRACTION`` of an
    epoch (about ``1 / momentum`` steps each; the smallest momentum of the model counts, and a
    cumulative average, momentum None, always does); off otherwise. A model without such layers
    has nothing to recompute whatever the setting."""
    named = f"train.precise_bn_images={setting}"
    layers = batchnorm_layers(model)
    if not layers:
        return PreciseBN(0, f"{named}: the model has no BatchNorm layers with running statistics", False)
    if setting != "auto":
        return PreciseBN(int(setting), named)
    momenta = [m.momentum for m in layers]
    momentum: Optional[float] = None if any(x is None for x in momenta) else min(momenta)
    if momentum is not None and momentum <= 0:
        return PreciseBN(0, "auto: BatchNorm momentum 0 keeps its statistics fixed")
    images = min(AUTO_IMAGES, num_train)
    if momentum is None:
        return PreciseBN(images, "auto: BatchNorm keeps a cumulative average, momentum None")
    limit = round(1.0 / (AUTO_EPOCH_FRACTION * momentum), 9)  # 3 / 0.1 is 30, not 30.000000000000004
    why = f"{1 / AUTO_EPOCH_FRACTION:.3g} / BatchNorm momentum {momentum:g}"
    if steps_per_epoch < limit:
        return PreciseBN(images, f"auto: {steps_per_epoch} steps per epoch, fewer than {limit:g} = {why}")
    return PreciseBN(0, f"auto: {steps_per_epoch} steps per epoch, not fewer than {limit:g} = {why}")


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
