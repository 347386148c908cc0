"""LeNet-5 as in the DC reference's cross-architecture pool.

LeCun et al. 1998; the variant of Zhao et al. ICLR 2021 (reference ``networks.LeNet``): conv5x5(6) -> ReLU ->
maxpool2 -> conv5x5(16) -> ReLU -> maxpool2 -> Linear(120) -> ReLU -> Linear(84) -> ReLU -> Linear(K). 28x28 inputs
get padding 2 in the first convolution (the reference's MNIST stem), so 28 and 32 px both end at 16x5x5. Written
here: torchvision has no LeNet. The same network is DD's LeNet (Wang et al. 2018; ssnl/dataset-distillation
``networks.LeNet``), which initializes it with ``init: xavier`` (:func:`xavier_init_`).
"""

from __future__ import annotations

import torch
from torch import nn

from ddrun.utils import ConfigError


def xavier_init_(net: nn.Module, gain: float = 1.0) -> nn.Module:
    """DD's initialization, in place (ssnl/dataset-distillation ``networks/utils.init_weights`` with the default
    ``--init xavier --init_param 1``): every Conv/Linear weight ``xavier_normal_(gain)``, every bias 0."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_normal_(m.weight, gain=gain)
                if m.bias is not None:
                    m.bias.zero_()
    return net


def check_init(init: str) -> None:
    if init not in ("default", "xavier"):
        raise ConfigError(f"net.init={init!r}: valid values are ['default', 'xavier']")


class LeNet(nn.Module):
    """LeNet-5 for 28x28 or 32x32 inputs (any size >= 16 px works; the feature size follows).

    Input float32 ``[B, C, H, W]``; ``forward`` -> logits ``[B, K]``; ``embed`` -> ``[B, 84]``.
    ``init``: ``default`` (PyTorch's) or ``xavier`` (DD's, :func:`xavier_init_`).

    Raises:
        ConfigError: unknown ``init``.
    """

    def __init__(self, channels: int, num_classes: int, im_size: tuple[int, int] = (32, 32), init: str = "default"):
        super().__init__()
        check_init(init)
        pad = 2 if tuple(im_size) == (28, 28) else 0
        self.features = nn.Sequential(
            nn.Conv2d(channels, 6, 5, padding=pad), nn.ReLU(inplace=True), nn.MaxPool2d(2, 2),
            nn.Conv2d(6, 16, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2, 2))
        h, w = (((s + 2 * pad - 4) // 2 - 4) // 2 for s in im_size)
        self.fc_1 = nn.Linear(16 * h * w, 120)
        self.fc_2 = nn.Linear(120, 84)
        self.classifier = nn.Linear(84, num_classes)
        self.feature_dim = 84
        if init == "xavier":
            xavier_init_(self)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x).flatten(1)
        return torch.relu(self.fc_2(torch.relu(self.fc_1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))
