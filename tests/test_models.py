"""The model zoo: parameter counts, output shapes, zero-init of residual gammas, norm='none', the registry."""

import pytest
import torch
from torch import nn

from largebatch.models import available_models, create_model
from largebatch.models.resnet import BasicBlock, Bottleneck

# The options the trainer always passes; the published models ignore ``width``.
OPTIONS = {"norm": "batch", "width": 32, "zero_init_residual": False}
SMALLEST = {"resnet9": 32, "resnet18": 32, "resnet50": 32, "alexnet_bn": 64}  # forward-pass test sizes
BIG = sorted(SMALLEST)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build(name: str, num_classes: int = 7, in_channels: int = 3, **overrides) -> nn.Module:
    options = {**OPTIONS, "image_size": SMALLEST[name], **overrides}
    return create_model(name, num_classes, in_channels=in_channels, **options)


def batchnorms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def alexnet_bn_by_hand(classes: int = 1000) -> int:
    """Weights of each layer, plus BN's gamma and beta per channel (no biases before BN)."""
    convs = [(3, 96, 11), (96, 256, 5), (256, 384, 3), (384, 384, 3), (384, 256, 3)]
    total = sum(cin * cout * k * k + 2 * cout for cin, cout, k in convs)
    total += 256 * 6 * 6 * 4096 + 2 * 4096  # fc6 + BN1d
    total += 4096 * 4096 + 2 * 4096  # fc7 + BN1d
    total += 4096 * classes + classes  # fc8 with bias
    return total


@pytest.mark.parametrize("name,classes,expected", [
    ("resnet18", 1000, 11_689_512),
    ("resnet50", 1000, 25_557_032),
    ("resnet9", 10, 6_573_120),
    ("alexnet_bn", 1000, 62_387_912),
])
def test_parameter_counts(name, classes, expected):
    assert n_params(build(name, classes, image_size=224)) == expected


def test_alexnet_bn_count_by_hand():
    assert alexnet_bn_by_hand() == 62_387_912


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("name", BIG)
def test_output_shape(name, in_channels):
    model = build(name, in_channels=in_channels).eval()
    size = SMALLEST[name]
    with torch.no_grad():
        out = model(torch.randn(2, in_channels, size, size))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


def test_train_mode_forward_at_larger_size():
    """A batch of 2 in train mode (BN uses batch statistics) at a size other than the smallest."""
    with torch.no_grad():
        assert build("resnet18", image_size=64).train()(torch.randn(2, 3, 64, 64)).shape == (2, 7)
        assert build("resnet9", image_size=48).train()(torch.randn(2, 3, 48, 48)).shape == (2, 7)


def residual_last_bns(name: str, model: nn.Module) -> list[nn.Module]:
    """The BN whose gamma zero_init_residual must zero: the last of each residual block / branch."""
    if name == "resnet9":
        return [model.layer1[2].branch[1][1], model.layer3[2].branch[1][1]]
    return [m.bn2 if isinstance(m, BasicBlock) else m.bn3
            for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck))]


@pytest.mark.parametrize("name,blocks", [("resnet9", 2), ("resnet18", 8), ("resnet50", 16)])
def test_zero_init_residual(name, blocks):
    for zero in (False, True):
        model = build(name, zero_init_residual=zero)
        last = residual_last_bns(name, model)
        assert len(last) == blocks and all(isinstance(bn, nn.BatchNorm2d) for bn in last)
        for bn in batchnorms(model):
            target = 0.0 if zero and any(bn is b for b in last) else 1.0
            assert torch.all(bn.weight == target)
            assert torch.all(bn.bias == 0)


@pytest.mark.parametrize("name", BIG)
def test_norm_none_has_no_batchnorm(name):
    model = build(name, in_channels=1, norm="none", zero_init_residual=True)
    assert batchnorms(model) == []
    assert all(m.bias is not None for m in model.modules() if isinstance(m, nn.Conv2d))
    size = SMALLEST[name]
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 1, size, size)).shape == (2, 7)


@pytest.mark.parametrize("name", BIG)
def test_too_small_images_rejected(name):
    with pytest.raises(ValueError):
        build(name, image_size=SMALLEST[name] // 2 if name != "resnet9" else 4)


def test_registry():
    assert set(BIG) <= set(available_models())
    with pytest.raises(ValueError, match="unknown model"):
        create_model("no-such-model", 10)


def test_the_mlp_keeps_its_width_on_any_image_size():
    for size in (8, (16, 40)):
        model = create_model("mlp", 10, in_channels=1, norm="none", image_size=size, width=33)
        first = model.net[1]
        assert tuple(first.weight.shape) == (33, 8 * 8 if size == 8 else 16 * 40)
        assert model(torch.zeros(2, 1, *((size, size) if size == 8 else size))).shape == (2, 10)
