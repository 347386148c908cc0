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


class AlexCifarNet(FeatureClassifier):
    """DD's AlexCifarNet (Wang et al. 2018; ssnl/dataset-distillation ``networks.AlexCifarNet``, after the
    cuda-convnet CIFAR-10 model): conv5x5(64) -> ReLU -> maxpool3/2 -> LRN(4) -> conv5x5(64) -> ReLU -> LRN(4) ->
    maxpool3/2 -> Linear(384) -> ReLU -> Linear(192) -> ReLU -> Linear(K); LRN is ``LocalResponseNorm(4,
    alpha=0.001/9, beta=0.75, k=1)``, pools have padding 1. 4,096 features at 32x32.

    Args:
        channels, num_classes, im_size: input channels C, classes K, input (H, W).
        init: ``default`` (PyTorch's) or ``xavier`` (DD's, ``ddrun.nets.lenet.xavier_init_``).

    Input float32 ``[B, C, H, W]``; ``forward`` -> logits ``[B, K]``; ``embed`` -> ``[B, 192]`` (the last hidden
    layer).

    Raises:
        ConfigError: unknown ``init``.
    """

    def __init__(self, channels: int, num_classes: int, im_size: tuple[int, int] = (32, 32), init: str = "default"):
        from ddrun.nets.lenet import check_init, xavier_init_

        super().__init__()
        check_init(init)
        lrn = lambda: nn.LocalResponseNorm(4, alpha=0.001 / 9.0, beta=0.75, k=1)  # noqa: E731
        h, w = ((s - 1) // 2 + 1 for s in im_size)
        h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1
        layers = [nn.Conv2d(channels, 64, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, padding=1), lrn(),
                  nn.Conv2d(64, 64, 5, padding=2), nn.ReLU(inplace=True), lrn(), nn.MaxPool2d(3, 2, padding=1),
                  nn.Flatten(), nn.Linear(64 * h * w, 384), nn.ReLU(inplace=True), nn.Linear(384, 192),
                  nn.ReLU(inplace=True)]
        self._set_head(layers, 192, num_classes)
        if init == "xavier":
            xavier_init_(self)
