"""The reference architecture pool (ConvNet, MLP, LeNet, AlexNet, VGG-11, ResNet-18, ResNet-18-BN) from their
configs, on 28 px grayscale and 32 px RGB inputs: shapes, gradients to every parameter, seeded initialization, the
reference's parameter counts, and that each one learns."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.func import functional_call

import ddrun.conf
from conftest import make_cfg
from ddrun.utils import ConfigError, build

POOL = sorted(p.stem for p in (Path(ddrun.conf.__file__).parent / "net").glob("*.yaml"))  # every conf/net/*.yaml
INPUTS = [(1, 28), (3, 32)]


def make(name, channels, size, classes=10, **over):
    cfg = make_cfg([f"net={name}", *[f"net.{k}={v}" for k, v in over.items()]])
    return build(cfg.net)(channels=channels, num_classes=classes, im_size=(size, size))


@pytest.mark.parametrize("channels,size", INPUTS)
@pytest.mark.parametrize("name", POOL)
def test_forward_backward_reaches_every_parameter(name, channels, size):
    torch.manual_seed(0)
    net = make(name, channels, size, classes=7)
    x = torch.randn(3, channels, size, size)
    logits, feats = net(x), net.embed(x)
    assert logits.shape == (3, 7) and feats.shape == (3, net.feature_dim)
    logits.square().mean().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing
    # the same module runs on a parameter dict (torch.func), as the unrolled objectives use it
    params = {n: p.detach() for n, p in net.named_parameters()}
    buffers = dict(net.named_buffers())
    assert torch.allclose(functional_call(net, (params, buffers), (x,)), net(x), atol=1e-5)


@pytest.mark.parametrize("name", POOL)
def test_initialization_follows_the_seed(name):
    ctor = build(make_cfg([f"net={name}"]).net)

    def weights(seed):
        torch.manual_seed(seed)
        net = ctor(channels=3, num_classes=10, im_size=(32, 32))
        return torch.cat([p.detach().flatten() for p in net.parameters()])

    assert torch.equal(weights(0), weights(0)) and not torch.equal(weights(0), weights(1))


def test_parameter_counts_match_the_reference_definitions():
    """Counts of the DC reference ``networks.py`` models on CIFAR-10 (3x32x32, 10 classes), computed from their
    definitions: MLP 411,146; LeNet 62,006; AlexNet 1,872,202; ResNet-18 11,173,962."""
    count = {n: sum(p.numel() for p in make(n, 3, 32).parameters()) for n in POOL}
    assert (count["mlp"], count["lenet"], count["alexnet"], count["resnet18"]) == (411146, 62006, 1872202, 11173962)
    assert count["convnet"] == 320010 and count["resnet18_bn"] == count["resnet18"]


def test_28px_inputs_use_the_32px_stems():
    """28x28 images are padded in the first convolution so that the 32 px architecture follows (the reference's
    MNIST handling), hence the same feature sizes for both."""
    for name in ("lenet", "alexnet", "vgg11", "convnet"):
        assert make(name, 1, 28).feature_dim == make(name, 3, 32).feature_dim, name


@pytest.mark.parametrize("shape", [(3, 4, 8, 8), (3, 4, 7, 9), (4, 5, 5)])
def test_convnet_pooling_equals_avg_pool2d_to_the_second_derivative(shape):
    # AvgPool2x2 computes the ConvNet's 2x2 average pooling as strided sums on the CPU: the same values (odd rows and
    # columns dropped), gradients and second derivatives as nn.AvgPool2d; channels-last inputs keep their layout
    from torch import nn

    from ddrun.nets.convnet import AvgPool2x2

    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    ours, ref = AvgPool2x2(), nn.AvgPool2d(2, 2)
    w = torch.randn_like(ref(x))
    g1 = torch.autograd.grad(((ours(x) * w) ** 2).sum(), x, create_graph=True)[0]
    g2 = torch.autograd.grad(((ref(x) * w) ** 2).sum(), x, create_graph=True)[0]
    torch.testing.assert_close(ours(x), ref(x))
    torch.testing.assert_close(g1, g2)
    torch.testing.assert_close(torch.autograd.grad(g1.sum(), x)[0], torch.autograd.grad(g2.sum(), x)[0])
    cl = torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last)
    assert ours(cl).is_contiguous(memory_format=torch.channels_last)
    assert any(isinstance(m, AvgPool2x2) for m in build(make_cfg(["net=convnet"]).net)(1, 10, (28, 28)).modules())


def test_norm_variants_and_bad_norm():
    assert isinstance(make("resnet18_bn", 3, 32).bn1, torch.nn.BatchNorm2d)
    assert isinstance(make("resnet18", 3, 32).bn1, torch.nn.GroupNorm)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in make("alexnet", 3, 32, norm="batchnorm").modules())
    assert not any(isinstance(m, torch.nn.GroupNorm) for m in make("alexnet", 3, 32).modules())
    with pytest.raises(ConfigError, match="net.norm='bogus'"):
        make("vgg11", 3, 32, norm="bogus")
    with pytest.raises(ConfigError, match="net.norm='bogus'"):
        make("resnet18", 3, 32, norm="bogus")
