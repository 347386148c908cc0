"""ResNet-18 with a CIFAR-style stem, built on torchvision's ``ResNet``.

He et al. 2016; the variant of the DC reference's cross-architecture pool (Zhao et al. ICLR 2021, reference
``networks.ResNet18`` / ``ResNet18BN``): BasicBlock x [2, 2, 2, 2] with 64-128-256-512 channels, the ImageNet stem
(7x7 stride-2 convolution + max pooling) replaced by one 3x3 stride-1 convolution, global average pooling, one Linear
layer. ``norm=instancenorm`` (the reference's "ResNet18": ``GroupNorm(C, C)``) or ``batchnorm`` ("ResNet18BN"). 28 px
and 32 px inputs both end at 4x4 before pooling. torchvision's model supplies the blocks, the ``norm_layer`` hook and
its initialization (Kaiming-normal convolutions, unit norm weights); only the stem is ours.
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from ddrun.utils import ConfigError

_NORMS = {"instancenorm": lambda c: nn.GroupNorm(c, c, affine=True), "batchnorm": nn.BatchNorm2d,
          "groupnorm": lambda c: nn.GroupNorm(4, c, affine=True)}


class ResNet18(torchvision.models.ResNet):
    """Args:
        channels, num_classes, im_size: input channels C, classes K, input (H, W).
        norm: ``instancenorm`` (ResNet-18 of the reference), ``batchnorm`` (ResNet-18-BN) or ``groupnorm``.

    Input float32 ``[B, C, H, W]``; ``forward`` -> logits ``[B, K]``; ``embed`` -> ``[B, 512]`` (after global
    average pooling).

    Raises:
        ConfigError: unknown ``norm``.
    """

    def __init__(self, channels: int, num_classes: int, im_size: tuple[int, int] = (32, 32),
                 norm: str = "instancenorm"):
        if norm not in _NORMS:
            raise ConfigError(f"net.norm={norm!r}: valid values for resnet18 are {sorted(_NORMS)}")
        super().__init__(torchvision.models.resnet.BasicBlock, [2, 2, 2, 2], num_classes=num_classes,
                         norm_layer=_NORMS[norm])
        self.conv1 = nn.Conv2d(channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.maxpool = nn.Identity()
        # global average pooling is a mean in embed (AdaptiveAvgPool2d's CUDA backward is not deterministic)
        del self.avgpool
        self.feature_dim = 512

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x.mean((2, 3))  # global average pooling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.embed(x))
