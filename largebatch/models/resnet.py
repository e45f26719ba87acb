"""Residual networks.

- ``resnet18`` / ``resnet50``: the ImageNet ResNets of He, Zhang, Ren & Sun, "Deep Residual Learning for
  Image Recognition", CVPR 2016, with the stride of a downsampling bottleneck on its 3x3 conv ("ResNet v1.5",
  as in Goyal et al., "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour", 2017, and the MLPerf
  reference). Optional zero-initialised last BN gamma per residual block (Goyal et al. section 5.1).
- ``resnet9``: the CIFAR-10 network of D. Page (Myrtle.ai), "How to train your ResNet" (DAWNBench, 2018).

Published models have fixed widths: the ``width`` option is accepted (the trainer always passes it) and ignored.
With ``norm='none'`` BatchNorm becomes Identity, convolutions get a bias, and ``zero_init_residual`` has
no gamma to zero, so it does nothing.
"""

from __future__ import annotations

import torch
from torch import nn

from largebatch.models.sizes import Size, sides, text


def _norm2d(kind: str, channels: int) -> nn.Module:
    return nn.BatchNorm2d(channels) if kind == "batch" else nn.Identity()


def _conv(cin: int, cout: int, kernel: int, norm: str, stride: int = 1) -> nn.Conv2d:
    """A conv with 'same'-style padding; bias only when no BatchNorm follows."""
    return nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=norm != "batch")


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34); the first carries the stride."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int, norm: str):
        super().__init__()
        self.conv1, self.bn1 = _conv(cin, planes, 3, norm, stride), _norm2d(norm, planes)
        self.conv2, self.bn2 = _conv(planes, planes, 3, norm), _norm2d(norm, planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(cin, planes, stride, norm)

    def last_norm(self) -> nn.Module:
        return self.bn2

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (with the stride: v1.5), 1x1 expand by 4 (ResNet-50/101/152)."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, norm: str):
        super().__init__()
        cout = planes * self.expansion
        self.conv1, self.bn1 = _conv(cin, planes, 1, norm), _norm2d(norm, planes)
        self.conv2, self.bn2 = _conv(planes, planes, 3, norm, stride), _norm2d(norm, planes)
        self.conv3, self.bn3 = _conv(planes, cout, 1, norm), _norm2d(norm, cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(cin, cout, stride, norm)

    def last_norm(self) -> nn.Module:
        return self.bn3

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


def _shortcut(cin: int, cout: int, stride: int, norm: str) -> nn.Module:
    """Identity, or a projection (1x1 conv + BN) when the shape changes."""
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=norm != "batch"), _norm2d(norm, cout))


def _zero_last_gammas(blocks: list[nn.Module]) -> None:
    for block in blocks:
        bn = block.last_norm()
        if isinstance(bn, nn.BatchNorm2d):
            nn.init.zeros_(bn.weight)


class ResNet(nn.Module):
    """7x7/2 stem conv + BN + ReLU + 3x3/2 max pool, four stages (64, 128, 256, 512 planes; stride 2
    from the second on), global average pooling, fully connected classifier.

    The total stride is 32, so inputs of 32x32 and up work (the same architecture is kept for small images).
    """

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: list[int], num_classes: int,
                 in_channels: int = 3, norm: str = "batch", width: int | None = None,
                 image_size: Size | None = None, zero_init_residual: bool = False):
        super().__init__()
        del width  # published widths are fixed
        if image_size is not None and min(sides(image_size)) < 32:
            raise ValueError(f"ResNet needs images of at least 32x32, got {text(image_size)}")
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=norm != "batch"), _norm2d(norm, 64),
            nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2, padding=1),
        )
        stages, cin = [], 64
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers)):
            blocks = []
            for j in range(n):
                blocks.append(block(cin, planes, 2 if (i > 0 and j == 0) else 1, norm))
                cin = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(cin, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            _zero_last_gammas([b for stage in stages for b in stage])

    def forward(self, x):
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.pool(x))


def resnet18(num_classes: int, in_channels: int = 3, norm: str = "batch", width: int | None = None,
             image_size: Size | None = None, zero_init_residual: bool = False) -> ResNet:
    """ResNet-18: basic blocks [2, 2, 2, 2]; 11,689,512 parameters for 1000 classes."""
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, in_channels, norm, width, image_size, zero_init_residual)


def resnet50(num_classes: int, in_channels: int = 3, norm: str = "batch", width: int | None = None,
             image_size: Size | None = None, zero_init_residual: bool = False) -> ResNet:
    """ResNet-50 v1.5: bottlenecks [3, 4, 6, 3]; 25,557,032 parameters for 1000 classes."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes, in_channels, norm, width, image_size, zero_init_residual)


class _ConvBN(nn.Sequential):
    """conv3x3 + BN + ReLU, the unit of ResNet-9."""

    def __init__(self, cin: int, cout: int, norm: str):
        super().__init__(_conv(cin, cout, 3, norm), _norm2d(norm, cout), nn.ReLU(inplace=True))


class _Residual(nn.Module):
    """``x + f(x)`` with ``f`` two conv-BN-ReLU units (no ReLU after the sum, as in Page's network)."""

    def __init__(self, channels: int, norm: str):
        super().__init__()
        self.branch = nn.Sequential(_ConvBN(channels, channels, norm), _ConvBN(channels, channels, norm))

    def last_norm(self) -> nn.Module:
        return self.branch[1][1]

    def forward(self, x):
        return x + self.branch(x)


class _Scale(nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor

    def extra_repr(self) -> str:
        return f"factor={self.factor}"


class ResNet9(nn.Module):
    """Page's DAWNBench CIFAR-10 ResNet-9: prep (64), layer1 (128, pool, residual), layer2 (256, pool),
    layer3 (512, pool, residual), global max pool, bias-free linear, logits scaled by 0.125.

    6,573,120 parameters for 10 classes. Three 2x2 poolings and adaptive pooling: any size from 8x8 up.
    PyTorch's default initialisation is kept.
    """

    def __init__(self, num_classes: int, in_channels: int = 3, norm: str = "batch", width: int | None = None,
                 image_size: Size | None = None, zero_init_residual: bool = False):
        super().__init__()
        del width  # published widths are fixed
        if image_size is not None and min(sides(image_size)) < 8:
            raise ValueError(f"ResNet-9 needs images of at least 8x8, got {text(image_size)}")
        self.prep = _ConvBN(in_channels, 64, norm)
        self.layer1 = nn.Sequential(_ConvBN(64, 128, norm), nn.MaxPool2d(2), _Residual(128, norm))
        self.layer2 = nn.Sequential(_ConvBN(128, 256, norm), nn.MaxPool2d(2))
        self.layer3 = nn.Sequential(_ConvBN(256, 512, norm), nn.MaxPool2d(2), _Residual(512, norm))
        self.classifier = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(),
                                        nn.Linear(512, num_classes, bias=False), _Scale(0.125))
        if zero_init_residual:
            _zero_last_gammas([self.layer1[2], self.layer3[2]])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.layer3(self.layer2(self.layer1(self.prep(x)))))


def resnet9(num_classes: int, in_channels: int = 3, norm: str = "batch", width: int | None = None,
            image_size: Size | None = None, zero_init_residual: bool = False) -> ResNet9:
    """ResNet-9 (Page, Myrtle.ai); see :class:`ResNet9`."""
    return ResNet9(num_classes, in_channels, norm, width, image_size, zero_init_residual)
