"""Networks used for distillation and evaluation, and :func:`build_net`, the one way ddrun builds a network."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ddrun.nets.alexnet import AlexCifarNet, AlexNet
from ddrun.nets.convnet import ConvNet
from ddrun.nets.frepo import FRePoConv
from ddrun.nets.lenet import LeNet
from ddrun.nets.mlp import MLP
from ddrun.nets.resnet import ResNet18
from ddrun.nets.vgg import VGG11

__all__ = ["AlexCifarNet", "AlexNet", "ConvNet", "FRePoConv", "LeNet", "MLP", "ResNet18", "VGG11", "build_net", "dd_net"]


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
