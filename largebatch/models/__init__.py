"""The model zoo: ``create_model(name, num_classes, in_channels=3, **options)``."""

from __future__ import annotations

from typing import Callable

from torch import nn

from largebatch.models.alexnet import AlexNetBN, alexnet_bn
from largebatch.models.resnet import ResNet, ResNet9, resnet9, resnet18, resnet50
from largebatch.models.small import MLP, SmallCNN

_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "cnn": SmallCNN,
    "mlp": MLP,
    "resnet9": resnet9,
    "resnet18": resnet18,
    "resnet50": resnet50,
    "alexnet_bn": alexnet_bn,
}


def available_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(name: str, num_classes: int, in_channels: int = 3, **options) -> nn.Module:
    """Build model ``name`` for ``num_classes`` classes and ``in_channels`` input channels.

    Options: ``norm`` ('batch' or 'none'), ``width``, ``image_size`` (a side, or (height, width);
    the 'mlp' needs it).
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(available_models())}")
    return _REGISTRY[name](num_classes=num_classes, in_channels=in_channels, **options)


__all__ = ["create_model", "available_models", "SmallCNN", "MLP", "ResNet", "ResNet9", "AlexNetBN"]
