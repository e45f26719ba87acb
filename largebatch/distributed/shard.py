"""Sharded data parallelism (``comm.shard``) through PyTorch's own machinery.

- ``none``: every worker holds the whole model, its gradients and its optimizer state (DDP).
- ``optimizer`` (ZeRO stage 1, Rajbhandari et al. 2020): ``ZeroRedundancyOptimizer`` gives each
  worker the optimizer state of a subset of *whole* parameter tensors; gradients are still averaged
  by DDP, and each worker broadcasts the tensors it updated. Layer-wise trust ratios need no extra
  communication, since every tensor a worker updates is whole there.
- ``full`` (ZeRO stage 3): FSDP2's ``fully_shard`` on each block of the model and on the root.
  Parameters, gradients and optimizer state are split along their first dimension across the
  workers (DTensors placed ``Shard(0)``; a tensor whose first dimension the world size does not
  divide gets uneven shards, some possibly empty). Parameters are all-gathered for the forward and
  backward pass of each block and freed after; gradients are reduce-scattered.

The optimizers see the local shards only; a per-tensor norm is the square root of the sum over the
workers of the local shards' squared norms (:meth:`largebatch.distributed.Communicator.all_reduce_sum`, handed to them as ``shard_sum``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

SHARD_MODES = ("none", "optimizer", "full")

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _owns_params(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def _composite(module: nn.Module) -> bool:
    return any(True for _ in module.children())


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The blocks of ``model`` that get their own ``fully_shard`` (each one all-gathers its
    parameters for its own forward and frees them after), in the order of ``model.modules()``.

    A block is a module held in a container (``nn.Sequential``, ``nn.ModuleList``,
    ``nn.ModuleDict``) that has parameters and submodules of its own (a residual block, a
    transformer layer), taking the innermost such modules where blocks nest in blocks (a stage of
    residual blocks gives its blocks). A model whose containers hold only single layers (a plain
    ``nn.Sequential`` CNN) gives those layers that have parameters. The root is not in the list:
    it is sharded last and holds what no block took (stems, heads).
    """
    candidates: list[nn.Module] = []
    for parent in model.modules():
        if isinstance(parent, _CONTAINERS):
            candidates.extend(m for m in parent.children() if _owns_params(m) and m is not model)
    composite = [m for m in candidates if _composite(m)]
    if composite:
        inner = []
        for m in composite:
            below = [c for c in m.modules() if c is not m and any(c is o for o in composite)]
            if not below:
                inner.append(m)
        chosen = inner
    else:
        chosen = [m for m in candidates if not _composite(m)]
    seen: set[int] = set()
    ordered = []
    for m in model.modules():  # model order, each once
        if id(m) not in seen and any(m is c for c in chosen):
            seen.add(id(m))
            ordered.append(m)
    return ordered


def device_mesh(world_size: int, device: torch.device):
    """The 1-D mesh of all workers that FSDP2 shards over (the default process group)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (world_size,))


def fully_shard_model(model: nn.Module, mesh, param_dtype: Optional[torch.dtype] = None) -> nn.Module:
    """``fully_shard`` on each of :func:`shard_units` and then on the root, in place; returns the
    model (now an ``FSDPModule``). With ``param_dtype`` (bf16 on GPUs), FSDP2's mixed-precision
    policy: parameters cast to it for compute, gradients reduced and master weights kept in float32
    (BatchNorm layers excepted: they compute with float32 weights on low-precision inputs)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs = {"mesh": mesh}
    units = shard_units(model)
    if param_dtype is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        # BatchNorm keeps float32 weights next to its float32 running statistics (its kernels take
        # a low-precision input with float32 weights, not low-precision weights with float32
        # statistics): each BatchNorm layer is a unit of its own without the cast.
        norms = _batchnorm_layers(model)
        for bn in norms:
            fully_shard(bn, mesh=mesh)
        units = [u for u in units if not any(u is bn for bn in norms)]
    for unit in units:
        fully_shard(unit, **kwargs)
    fully_shard(model, **kwargs)
    return model


def _batchnorm_layers(model: nn.Module) -> list[nn.Module]:
    from torch.nn.modules.batchnorm import _BatchNorm

    return [m for m in model.modules() if isinstance(m, _BatchNorm) and _owns_params(m)]


def is_sharded(t: torch.Tensor) -> bool:
    """Whether ``t`` is a DTensor (a parameter or gradient under ``comm.shard=full``)."""
    return hasattr(t, "to_local") and hasattr(t, "placements")


def local(t: torch.Tensor) -> torch.Tensor:
    """This worker's shard of a DTensor (a view sharing its storage), or ``t`` itself."""
    return t.to_local() if is_sharded(t) else t


def is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(getattr(model, "_orig_mod", model), FSDPModule)
