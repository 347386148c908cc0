"""The small AlexNet of the DC reference's cross-architecture pool.

Krizhevsky et al. 2012, in the 32x32 form of Zhao et al. ICLR 2021 (reference ``networks.AlexNet`` / ``AlexNetBN``):
conv5x5(128) -> pool -> conv5x5(192) -> pool -> conv3x3(256) -> conv3x3(192) -> conv3x3(192) -> pool -> Linear(K),
ReLU after every convolution, 2x2 max pooling, optional BatchNorm after each convolution (AlexNetBN). 28x28 inputs get
padding 4 in the first convolution (treated as 32x32). Written here: torchvision's AlexNet is the 224 px ImageNet
model (11x11 stride-4 stem, 4096-wide dropout head), which does not fit 28/32 px images.
"""

from __future__ import annotations

from torch import nn

from ddrun.nets.convnet import FeatureClassifier, _norm


class AlexNet(FeatureClassifier):
    """Args:
        channels, num_classes, im_size: input channels C, classes K, input (H, W).
        norm: ``none`` (AlexNet) or ``batchnorm`` (AlexNetBN); also ``instancenorm`` / ``groupnorm``.

    Input float32 ``[B, C, H, W]``; ``forward`` -> logits ``[B, K]``; ``embed`` -> ``[B, 192*(H/8)*(W/8)]``.

    Raises:
        ConfigError: unknown ``norm``.
    """

    def __init__(self, channels: int, num_classes: int, im_size: tuple[int, int] = (32, 32), norm: str = "none"):
        super().__init__()
        h, w = (32, 32) if tuple(im_size) == (28, 28) else tuple(im_size)
        spec = [(128, 5, 4 if tuple(im_size) == (28, 28) else 2, True), (192, 5, 2, True), (256, 3, 1, False),
                (192, 3, 1, False), (192, 3, 1, True)]
        layers: list[nn.Module] = []
        c = channels
        for out, k, pad, pool in spec:
            layers.append(nn.Conv2d(c, out, k, padding=pad))
            n = _norm(norm, out, (h, w))
            if n is not None:
                layers.append(n)
            layers.append(nn.ReLU(inplace=True))
            if pool:
                layers.append(nn.MaxPool2d(2, 2))
                h, w = h // 2, w // 2
            c = out
        self._set_head(layers, c * h * w, num_classes)
