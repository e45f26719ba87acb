"""Bytes of model state one worker holds under each ``comm.shard`` mode, from the parameters' shapes.

Counted per worker, in fp32 (the master weights, their gradients and the optimizer state stay in
fp32 whatever ``train.precision``), for the worker that holds the most:

- ``none``: every worker holds all parameters, all gradients and all optimizer state.
- ``optimizer`` (ZeRO-1, ``ZeroRedundancyOptimizer``): parameters and gradients whole, the
  optimizer state of whole tensors only. The tensors are assigned as PyTorch assigns them: each
  parameter group in turn, its tensors from the largest to the smallest (ties in model order), each
  to the worker with the fewest elements so far (the lowest rank among equals), the counts carried
  from one group to the next. The worker with the most state is reported.
- ``full`` (ZeRO-3, FSDP2 ``fully_shard``): every tensor split along its first dimension in
  ``ceil(dim0 / N)`` rows per worker (the last workers get fewer rows, or none; FSDP2 pads each
  shard's storage to ``ceil(dim0 / N)`` rows); parameters, gradients and optimizer state alike.
  With gradient accumulation, the micro-batches before the last keep *unsharded* gradients (no
  reduce-scatter until the last one), so the gradients then count whole.

Optimizer state per parameter (fp32 copies): SGD and LARS/LARC with momentum 1 (the momentum
buffer), without momentum 0; LAMB 2 (the two Adam moments) plus one fp32 step count per tensor.
Activations and the all-gathered parameters of the block being computed under ``full`` are not in
these figures.

Nothing here imports torch: shapes are tuples of ints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

MODES = ("none", "optimizer", "full")
"""The ``comm.shard`` modes, in order of growing sharding."""
BYTES = 4
"""Bytes per value: fp32 master weights, gradients and optimizer state."""
OPTIMIZERS = ("sgd", "lars", "larc", "lamb")

Shape = Sequence[int]


def state_per_parameter(optimizer: str, momentum: float = 0.9) -> tuple[int, int]:
    """(fp32 copies of every parameter the optimizer keeps, fp32 scalars it keeps per tensor)."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r} is not allowed: use one of {', '.join(OPTIMIZERS)}")
    if optimizer == "lamb":
        return 2, 1  # exp_avg and exp_avg_sq; a 0-dim float32 step count
    return (1 if momentum else 0), 0  # the momentum buffer


def numel(shape: Shape) -> int:
    return math.prod(shape)


def shard_numel(shape: Shape, world: int) -> int:
    """Elements of the largest shard of a tensor of ``shape`` split by rows over ``world`` workers:
    ``ceil(dim0 / world)`` rows (a 0-dim tensor counts as one row)."""
    if not shape:
        return 1
    return math.ceil(shape[0] / world) * math.prod(shape[1:])


def zero_partition(groups: Sequence[Sequence[int]], world: int) -> list[list[int]]:
    """Which tensors each worker updates under ZeRO-1: for ``groups`` (the element counts of each
    parameter group's tensors, in the optimizer's order), the element counts each rank gets.

    The assignment of ``torch.distributed.optim.ZeroRedundancyOptimizer``: per group, tensors
    sorted by size, largest first (a stable sort), each to the rank with the fewest elements so
    far, the lowest rank among equals; the totals carry over from one group to the next."""
    ranks: list[list[int]] = [[] for _ in range(world)]
    sizes = [0] * world
    for group in groups:
        for n in sorted(group, reverse=True):
            r = sizes.index(min(sizes))
            ranks[r].append(n)
            sizes[r] += n
    return ranks


@dataclass(frozen=True)
class Footprint:
    """Bytes one worker holds under one ``comm.shard`` mode (the worker holding the most)."""

    mode: str
    """'none', 'optimizer' or 'full'."""
    parameters: int
    """Bytes of fp32 parameters (the local shards under 'full')."""
    gradients: int
    """Bytes of fp32 gradients."""
    optimizer: int
    """Bytes of optimizer state."""

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer


def footprints(groups: Sequence[Sequence[Shape]], world: int, optimizer: str, momentum: float = 0.9,
               accumulation_steps: int = 1) -> dict[str, Footprint]:
    """Per-worker bytes under each mode for parameter tensors of these shapes, grouped as the
    optimizer groups them (the groups matter for ZeRO-1's assignment only)."""
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"world={world!r} is not allowed: use an integer >= 1")
    copies, scalars = state_per_parameter(optimizer, momentum)
    shapes = [s for g in groups for s in g]
    total = sum(numel(s) for s in shapes)
    whole = BYTES * total
    out = {"none": Footprint("none", whole, whole, BYTES * (copies * total + scalars * len(shapes)))}
    ranks = zero_partition([[numel(s) for s in g] for g in groups], world)
    zero = max(BYTES * (copies * sum(r) + scalars * len(r)) for r in ranks)
    out["optimizer"] = Footprint("optimizer", whole, whole, zero)
    local = BYTES * sum(shard_numel(s, world) for s in shapes)
    state = BYTES * (copies * sum(shard_numel(s, world) for s in shapes) + scalars * len(shapes))
    out["full"] = Footprint("full", local, whole if accumulation_steps > 1 else local, state)
    return out


def even_footprints(num_params: int, world: int, optimizer: str, momentum: float = 0.9,
                    accumulation_steps: int = 1) -> dict[str, Footprint]:
    """As :func:`footprints` for a parameter count without shapes: ``ceil(num_params / world)``
    elements per worker where a mode shards, and no per-tensor scalars (the tensors are not known)."""
    copies, _ = state_per_parameter(optimizer, momentum)
    whole, part = BYTES * num_params, BYTES * math.ceil(num_params / world)
    return {"none": Footprint("none", whole, whole, copies * whole),
            "optimizer": Footprint("optimizer", whole, whole, copies * part),
            "full": Footprint("full", part, whole if accumulation_steps > 1 else part, copies * part)}


def human(n: float) -> str:
    """Bytes in the largest binary unit that keeps them >= 1: B, KiB, MiB or GiB (two decimals)."""
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def table(rows: dict[str, Footprint], mark: Optional[str] = None) -> list[str]:
    """Lines of a per-worker memory table, the mode ``mark`` flagged with '*'."""
    lines = [f"  {'comm.shard':<11} {'parameters':>12} {'gradients':>12} {'optimizer state':>16} {'total':>12}"]
    for mode in MODES:
        f = rows[mode]
        name = mode + ("*" if mode == mark else "")
        lines.append(f"  {name:<11} {human(f.parameters):>12} {human(f.gradients):>12} {human(f.optimizer):>16} "
                     f"{human(f.total):>12}")
    return lines


def model_groups(model, weight_decay: float = 0.0, exclude_bn_and_bias: bool = True) -> list[list[tuple]]:
    """Shapes of ``model``'s trainable parameters in the optimizer's groups (largebatch.optim's
    param_groups: what ZeroRedundancyOptimizer is given). Works on a model on the meta device."""
    from largebatch.optim.groups import param_groups

    return [[tuple(p.shape) for p in g["params"]] for g in param_groups(model, weight_decay, exclude_bn_and_bias)]
