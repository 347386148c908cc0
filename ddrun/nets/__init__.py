"""Networks used for distillation and evaluation, and :func:`build_net`, the one way ddrun builds a network."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ddrun.nets.alexnet import AlexCifarNet, AlexNet
from ddrun.nets.convnet import ConvNet
from ddrun.nets.frepo import FRePoConv
from ddrun.nets.lenet import LeNet
from ddrun.nets.light import MobileNetV2, ShuffleNetV2
from ddrun.nets.mlp import MLP
from ddrun.nets.resnet import ResNet18
from ddrun.nets.vgg import VGG11

__all__ = ["AlexCifarNet", "AlexNet", "ConvNet", "FRePoConv", "LeNet", "MLP", "MobileNetV2", "ResNet18", "ShuffleNetV2",
           "VGG11", "build_net", "dd_net"]


def build_net(factory: Callable[..., nn.Module], shape, seed: int, device: torch.device | str | None = None,
              **kwargs) -> nn.Module:
    """``factory(channels=, num_classes=, im_size=, **kwargs)`` initialized from ``seed`` on the CPU (identical
    weights on every device; the global random state is left as it was), then moved to ``device``.

    Args:
        factory: a net config built with ``_partial_: true`` (``conf/net/*.yaml``).
        shape: anything with ``channels``, ``num_classes`` and ``im_size`` (a ``RealData``).
        seed: the initialization seed (``ddrun.utils.derive_seed`` of the run's seed and a purpose tag).
        device: where the network goes (None: stays on the CPU).
    """
    from ddrun.utils import seeded

    net = seeded(lambda: factory(channels=shape.channels, num_classes=shape.num_classes,
                                 im_size=tuple(shape.im_size), **kwargs), seed)
    return net if device is None else net.to(device)


def dd_net(channels: int, num_classes: int, im_size: tuple[int, int] = (32, 32), init: str = "xavier") -> nn.Module:
    """DD's network for the data (Wang et al. 2018; ssnl/dataset-distillation: LeNet for MNIST, AlexCifarNet for
    CIFAR-10): :class:`LeNet` for single-channel images, :class:`AlexCifarNet` otherwise, both with ``init``
    (DD's default ``xavier``). The ``net=dd`` config."""
    if channels == 1:
        return LeNet(channels, num_classes, im_size, init=init)
    return AlexCifarNet(channels, num_classes, im_size, init=init)


# the BatchNorm configuration of each architecture (conf/net/<name>.yaml): what a message names when a network
# without BatchNorm is given where BatchNorm statistics are needed (objective=statistics)
BN_VARIANTS = {"ConvNet": "convnet_bn", "ResNet18": "resnet18_bn", "AlexNet": "alexnet_bn", "VGG11": "vgg11_bn",
               "MobileNetV2": "mobilenet_v2", "ShuffleNetV2": "shufflenet_v2"}


def has_batchnorm(net: nn.Module) -> bool:
    """Whether ``net`` has a BatchNorm layer (running statistics)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())


def bn_variant(net: nn.Module) -> str:
    """``net=<choice>`` of the BatchNorm variant of ``net``'s architecture, or a sentence naming the BatchNorm
    architectures when it has none (MLP, LeNet)."""
    name = BN_VARIANTS.get(type(net).__name__)
    return f"net={name}" if name else \
        f"a BatchNorm architecture ({', '.join('net=' + v for v in BN_VARIANTS.values())})"


def refuse_without_batchnorm(net: nn.Module, name: str = "net") -> None:
    """Raise ``ConfigError`` (one line: the teacher config key ``name``, its architecture and
    :func:`bn_variant`) when ``net`` has no BatchNorm layer, whose running statistics SRe2L's matching needs
    (Yin et al., NeurIPS 2023, Eq. 2); the one refusal of ``fetcher=teachers`` and ``objective=statistics``."""
    if not has_batchnorm(net):
        from ddrun.utils import ConfigError

        raise ConfigError(f"objective=statistics matches BatchNorm statistics, but the teacher {name} "
                          f"({type(net).__name__}) has no BatchNorm layer: use {bn_variant(net)} "
                          f"(or set objective.bn=false objective.conv=true)")
