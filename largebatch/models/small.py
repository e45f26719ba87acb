"""Small models for the bundled default and for tests: a CNN for any image size >= 8, and an MLP.

Neither has residual blocks, so both accept and ignore ``zero_init_residual``.
"""

from __future__ import annotations

from torch import nn

from largebatch.models.sizes import Size, sides, text


def _norm2d(kind: str, channels: int) -> nn.Module:
    return nn.BatchNorm2d(channels) if kind == "batch" else nn.Identity()


def _conv_block(cin: int, cout: int, norm: str) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=norm != "batch"), _norm2d(norm, cout), nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):
    """conv-conv-pool, conv-conv-pool, then global average pooling and a linear classifier.

    Two 2x2 poolings take 8x8 inputs to 2x2; global pooling makes it work at any size from 8x8 up.
    """

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 32, norm: str = "batch",
                 image_size: Size | None = None, zero_init_residual: bool = False):
        super().__init__()
        if image_size is not None and min(sides(image_size)) < 8:
            raise ValueError(f"SmallCNN needs images of at least 8x8, got {text(image_size)}")
        w = width
        self.features = nn.Sequential(
            *_conv_block(in_channels, w, norm), *_conv_block(w, 2 * w, norm), nn.MaxPool2d(2),
            *_conv_block(2 * w, 4 * w, norm), *_conv_block(4 * w, 4 * w, norm), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.classifier = nn.Linear(4 * w, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x))


class MLP(nn.Module):
    """Flatten, two hidden layers of ``width`` units (BatchNorm optional), linear classifier."""

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 256, norm: str = "batch",
                 image_size: Size = 8, zero_init_residual: bool = False):
        super().__init__()
        rows, cols = sides(image_size)
        d = in_channels * rows * cols

        def hidden(i, o):
            return [nn.Linear(i, o, bias=norm != "batch"), nn.BatchNorm1d(o) if norm == "batch" else nn.Identity(),
                    nn.ReLU(inplace=True)]

        self.net = nn.Sequential(nn.Flatten(), *hidden(d, width), *hidden(width, width), nn.Linear(width, num_classes))

    def forward(self, x):
        return self.net(x)
