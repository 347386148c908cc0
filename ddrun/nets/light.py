"""The light backbones of EDC's teacher pool, from torchvision, with small-image stems.

Shao et al., "Elucidating the Design Space of Dataset Condensation", NeurIPS 2024, Sec. A.2: the CIFAR pool adds
MobileNet-V2 and ShuffleNet-V2-x0.5 to G-VBSM's backbones; the reference (``shaoshitong/EDC``
``Branch_CIFAR_10/recover/recover.py`` ``random_backbone``) takes torchvision's models and replaces the first
convolution by a 3x3 stride-1 one (ShuffleNet-V2 also loses its max pooling). torchvision supplies the blocks and
their initialization; only the stems are ours:

- :class:`MobileNetV2` (Sandler et al. CVPR 2018): stem 3x3 stride 1; the second stage's stride 2 becomes 1 as well
  (the usual CIFAR form), so 32 px inputs reach 4x4 before pooling (28 px: 4x4 too) instead of 1x1.
- :class:`ShuffleNetV2` (Ma et al. ECCV 2018), width x0.5 by default: stem 3x3 stride 1, no max pooling; stages 2-4
  downsample 32 -> 4 (28 -> 4).

Both use BatchNorm (their running statistics are the targets of ``objective=statistics``) and expose ``embed``
(features after global average pooling, ``[B, feature_dim]``) and ``forward`` (logits ``[B, K]``).
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn
from torchvision.ops.misc import Conv2dNormActivation

_MOBILENET_V2_CIFAR = [[1, 16, 1, 1], [6, 24, 2, 1], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1], [6, 160, 3, 2],
                       [6, 320, 1, 1]]  # torchvision's table with the second stage's stride 2 -> 1


class MobileNetV2(torchvision.models.MobileNetV2):
    """torchvision's MobileNet-V2 with a 3x3 stride-1 stem for ``channels`` input channels (module doc).

    Args:
        channels, num_classes, im_size: input channels C, classes K, input (H, W) (any size >= 8).
        width_mult: torchvision's width multiplier (1.0 in EDC's pool).
        dropout: dropout before the classifier (0: a deterministic forward, which ``torch.func`` replays exactly;
            torchvision's default is 0.2).
    """

    def __init__(self, channels: int, num_classes: int, im_size: tuple[int, int] = (32, 32), width_mult: float = 1.0,
                 dropout: float = 0.0):
        super().__init__(num_classes=num_classes, width_mult=width_mult,
                         inverted_residual_setting=_MOBILENET_V2_CIFAR, dropout=dropout)
        out = self.features[0].out_channels
        self.features[0] = Conv2dNormActivation(channels, out, stride=1, norm_layer=nn.BatchNorm2d,
                                                activation_layer=nn.ReLU6)
        nn.init.kaiming_normal_(self.features[0][0].weight, mode="fan_out")
        self.feature_dim = self.last_channel

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean((2, 3))  # global average pooling (deterministic backward on CUDA)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


_SHUFFLE_WIDTHS = {0.5: [24, 48, 96, 192, 1024], 1.0: [24, 116, 232, 464, 1024], 1.5: [24, 176, 352, 704, 1024],
                   2.0: [24, 244, 488, 976, 2048]}


class ShuffleNetV2(torchvision.models.ShuffleNetV2):
    """torchvision's ShuffleNet-V2 (stage repeats 4-8-4) with a 3x3 stride-1 stem and no max pooling (module doc).

    Args:
        channels, num_classes, im_size: input channels C, classes K, input (H, W).
        width: 0.5 (EDC's ShuffleNetV2_0_5), 1.0, 1.5 or 2.0 (torchvision's x0.5 ... x2.0 channel tables).

    Raises:
        ConfigError: another ``width``.
    """

    def __init__(self, channels: int, num_classes: int, im_size: tuple[int, int] = (32, 32), width: float = 0.5):
        from ddrun.utils import ConfigError

        if float(width) not in _SHUFFLE_WIDTHS:
            raise ConfigError(f"net.width={width}: valid widths for shufflenet_v2 are {sorted(_SHUFFLE_WIDTHS)}")
        stages = _SHUFFLE_WIDTHS[float(width)]
        super().__init__([4, 8, 4], stages, num_classes=num_classes)
        self.conv1 = nn.Sequential(nn.Conv2d(channels, stages[0], 3, 1, 1, bias=False), nn.BatchNorm2d(stages[0]),
                                   nn.ReLU(inplace=True))
        self.maxpool = nn.Identity()
        self.feature_dim = stages[-1]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage4(self.stage3(self.stage2(self.conv1(x))))
        return self.conv5(x).mean([2, 3])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.embed(x))
