"""AlexNet with BatchNorm ("AlexNet-BN").

The single-tower AlexNet of Krizhevsky, Sutskever & Hinton, "ImageNet Classification with Deep Convolutional
Neural Networks", NIPS 2012, with BatchNorm in place of local response normalisation after every conv and
after the two hidden fully connected layers, as used by You, Gitman & Ginsburg, "Large Batch Training of
Convolutional Networks" (LARS), 2017.
"""

from __future__ import annotations

import torch
from torch import nn

from largebatch.models.sizes import Size, sides, text


class AlexNetBN(nn.Module):
    """conv11/4 96, pool; conv5 256, pool; conv3 384; conv3 384; conv3 256, pool (each conv + BN + ReLU);
    adaptive average pooling to 6x6; fc 9216-4096-4096 (+ BN1d, ReLU, dropout 0.5); fc to the classes.

    62,387,912 parameters for 1000 classes, close to the ~60M published for AlexNet (the difference: the
    96/256/384/384/256 channels of the paper, and BN's two parameters per channel instead of biases).
    Layers followed by BN carry no bias. Inputs from 64x64 up work (224x224 is the published size).

    Published models have fixed widths: ``width`` is accepted and ignored; ``zero_init_residual`` is
    accepted and ignored (there are no residual blocks). ``norm='none'`` swaps BN for Identity and
    gives every layer a bias.
    """

    def __init__(self, num_classes: int, in_channels: int = 3, norm: str = "batch", width: int | None = None,
                 image_size: Size | None = None, zero_init_residual: bool = False):
        super().__init__()
        del width, zero_init_residual
        if image_size is not None and min(sides(image_size)) < 64:
            raise ValueError(f"AlexNet-BN needs images of at least 64x64, got {text(image_size)}")
        bn = norm == "batch"

        def conv(cin: int, cout: int, kernel: int, stride: int = 1) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, kernel, stride=stride, padding=2 if kernel > 3 else 1, bias=not bn),
                    nn.BatchNorm2d(cout) if bn else nn.Identity(), nn.ReLU(inplace=True)]

        def hidden(fin: int, fout: int) -> list[nn.Module]:
            return [nn.Linear(fin, fout, bias=not bn), nn.BatchNorm1d(fout) if bn else nn.Identity(),
                    nn.ReLU(inplace=True), nn.Dropout(0.5)]

        self.features = nn.Sequential(
            *conv(in_channels, 96, 11, stride=4), nn.MaxPool2d(3, 2),
            *conv(96, 256, 5), nn.MaxPool2d(3, 2),
            *conv(256, 384, 3), *conv(384, 384, 3), *conv(384, 256, 3), nn.MaxPool2d(3, 2),
            nn.AdaptiveAvgPool2d(6), nn.Flatten(),
        )
        self.classifier = nn.Sequential(*hidden(256 * 6 * 6, 4096), *hidden(4096, 4096),
                                        nn.Linear(4096, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def alexnet_bn(num_classes: int, in_channels: int = 3, norm: str = "batch", width: int | None = None,
               image_size: Size | None = None, zero_init_residual: bool = False) -> AlexNetBN:
    """AlexNet-BN; see :class:`AlexNetBN`."""
    return AlexNetBN(num_classes, in_channels, norm, width, image_size, zero_init_residual)
