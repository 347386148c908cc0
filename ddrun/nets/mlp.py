"""The MLP of the DC reference's cross-architecture pool.

Zhao et al., "Dataset Condensation with Gradient Matching", ICLR 2021, Sec. 4 (cross-architecture evaluation:
MLP, ConvNet, LeNet, AlexNet, VGG-11, ResNet-18); reference ``networks.MLP``: flatten -> Linear(D, 128) -> ReLU ->
Linear(128, 128) -> ReLU -> Linear(128, K). Written here (no torchvision model fits): it is three linear layers.
"""

from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    """Two hidden layers of ``width`` units with ReLU.

    Args:
        channels, num_classes, im_size: input channels C, classes K, input (H, W); D = C*H*W.
        width: hidden units (128 in the reference).

    Input float32 ``[B, C, H, W]``; ``forward`` -> logits ``[B, K]``; ``embed`` -> ``[B, width]`` (the last hidden
    layer, after ReLU).
    """

    def __init__(self, channels: int, num_classes: int, im_size: tuple[int, int] = (32, 32), width: int = 128):
        super().__init__()
        self.fc_1 = nn.Linear(channels * im_size[0] * im_size[1], width)
        self.fc_2 = nn.Linear(width, width)
        self.classifier = nn.Linear(width, num_classes)
        self.feature_dim = width

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc_2(torch.relu(self.fc_1(x.flatten(1)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))
