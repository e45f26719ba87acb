"""Validation: exact scores over every worker's shard, after BatchNorm statistics recomputed for
the current weights where ``train.precise_bn_images`` asks (:mod:`largebatch.engine.precise_bn`).

Under ``comm.shard=full`` every forward pass all-gathers weights with every other worker:
validation pads the workers with fewer batches with forward passes on an ignored image, so that
all run as many, and every worker first takes rank 0's BatchNorm statistics.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from largebatch.data import IGNORE
from largebatch.distributed import Communicator
from largebatch.distributed.wrap import unwrap
from largebatch.engine.precise_bn import PreciseBN, choose_precise_bn, recompute_batchnorm
from largebatch.engine.run_plan import Phase, RunPlan
from largebatch.engine.step import prepare_inputs
from largebatch.models.sizes import sides


@dataclass
class EvalResult:
    loss: float
    accuracy: float
    """Top-1 accuracy."""
    top5: Optional[float]
    """Top-5 accuracy, where there are more than 5 classes."""
    count: int


def evaluate(model: torch.nn.Module, loader, comm: Communicator, device: torch.device,
             num_classes: int, memory_format: torch.memory_format = torch.contiguous_format,
             lockstep: Optional[tuple[int, ...]] = None) -> EvalResult:
    """Exact validation: each worker scores its own unpadded shard; sums are allreduced.

    ``lockstep``: the shape (C, H, W) of one validation image, where every forward pass is a
    collective (comm.shard=full): a worker with fewer batches than another then runs forward passes
    on one zero image of that shape, which counts nowhere, until every worker has run as many."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1, top-5, count
    rounds = max(comm.all_gather_object(len(loader))) if lockstep is not None else 0
    with torch.no_grad():
        for x, y in loader:
            rounds -= 1
            x, y = prepare_inputs(x, y, device, memory_format)
            out = model(x).float()  # bf16 logits where FSDP2 computes in bf16 (comm.shard=full on GPUs)
            totals[0] += F.cross_entropy(out, y, reduction="sum", ignore_index=IGNORE).double()
            totals[1] += (out.argmax(1) == y).sum()
            if num_classes > 5:
                totals[2] += (out.topk(5, dim=1).indices == y[:, None]).any(dim=1).sum()
            totals[3] += (y != IGNORE).sum()  # an unreadable image is left out of the counts
        for _ in range(rounds):
            model(torch.zeros((1, *lockstep), device=device).contiguous(memory_format=memory_format))
    comm.all_reduce_sum(totals)
    loss, top1, top5, count = totals.tolist()
    n = max(count, 1.0)
    return EvalResult(loss=loss / n, accuracy=top1 / n, top5=top5 / n if num_classes > 5 else None, count=int(count))


def precise_bn_per_phase(setting, model: torch.nn.Module, plan: RunPlan, num_train: int) -> list[PreciseBN]:
    """What ``train.precise_bn_images`` means in each phase of ``plan``."""
    return [choose_precise_bn(setting, model, p.steps_per_epoch, num_train).for_phase(
                p.batch.world_size, p.batch.micro_batch, p.steps_per_epoch * p.batch.accum_steps)
            for p in plan.phases]


class Validator:
    """Scores the current weights at an epoch's end, for every worker together."""

    def __init__(self, model: torch.nn.Module, comm: Communicator, device: torch.device, val_loader, train_loader,
                 sampler, plan: RunPlan, info, memory_format: torch.memory_format, precise_bn: list[PreciseBN]):
        self.model, self.comm, self.device = model, comm, device
        self.val_loader, self.train_loader, self.sampler = val_loader, train_loader, sampler
        self.plan, self.info, self.memory_format, self.precise_bn = plan, info, memory_format, precise_bn

    def after_epoch(self, epoch: int, phase: Phase) -> EvalResult:
        """Precise BatchNorm statistics where the phase has them, then validation."""
        micro_batches = self.precise_bn[phase.index].micro_batches
        if micro_batches:
            self.recompute_batchnorm(epoch, phase, micro_batches)
        return self.validate()

    def validate(self) -> EvalResult:
        """Validation of the current weights. Under comm.shard=full every worker first takes rank
        0's BatchNorm statistics (DDP's rule; FSDP2 leaves buffers to each worker) and runs as many
        forward passes as every other."""
        model, lockstep = unwrap(self.model), None
        if self.comm.shard == "full":
            self.comm.broadcast_buffers(model)
            size = self.plan.eval_size or self.info.image_size
            lockstep = (self.info.channels, *sides(size))
        return evaluate(model, self.val_loader, self.comm, self.device, self.info.num_classes, self.memory_format,
                        lockstep)

    def recompute_batchnorm(self, epoch: int, phase: Phase, micro_batches: int) -> None:
        """Recompute BatchNorm statistics from this epoch's first ``micro_batches`` training
        micro-batches on each worker, at the validation image size (the statistics serve validation).
        Every worker runs as many forward passes, as comm.shard=full needs."""
        bp = phase.batch
        self.sampler.set_phase(bp, self.plan.eval_size)
        self.sampler.set_epoch(epoch)
        batches = itertools.islice(iter(self.train_loader), micro_batches)  # at most one epoch's (PreciseBN.for_phase)
        recompute_batchnorm(unwrap(self.model), batches, self.device, self.comm)
        self.sampler.set_phase(bp, phase.image_size)
