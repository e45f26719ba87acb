"""Parameter groups: what gets weight decay and a trust ratio, and what does not."""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

_NORM_LAYERS = (_BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm, nn.InstanceNorm1d,
                nn.InstanceNorm2d, nn.InstanceNorm3d)


def param_groups(model: nn.Module, weight_decay: float, exclude_bn_and_bias: bool = True) -> list[dict]:
    """Two groups: weights with ``weight_decay`` and ``adapt=True``; biases and normalisation
    weights with ``weight_decay=0`` and ``adapt=False`` (the MLPerf LARS skip list; Goyal et al.
    also keep weight decay off BatchNorm's gamma and beta). Empty groups are left out.

    With ``exclude_bn_and_bias=False`` every parameter goes in the first group.
    """
    adapt, skip, seen = [], [], set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            excluded = exclude_bn_and_bias and (isinstance(module, _NORM_LAYERS) or name == "bias")
            (skip if excluded else adapt).append(p)
    groups = [dict(params=adapt, weight_decay=weight_decay, adapt=True),
              dict(params=skip, weight_decay=0.0, adapt=False)]
    return [g for g in groups if g["params"]]
