"""VGG-11 as in the DC reference's cross-architecture pool.

Simonyan & Zisserman 2015, configuration A, in the 32x32 form of Zhao et al. ICLR 2021 (reference ``networks.VGG``):
[64, M, 128, M, 256, 256, M, 512, 512, M, 512, 512, M] with conv3x3 -> norm -> ReLU and 2x2 max pooling, then one
Linear layer on the 512 x (H/32) x (W/32) features. The reference's default norm is instance norm (``GroupNorm(C, C)``);
VGG11-BN uses BatchNorm. 28x28 inputs get padding 3 in the first convolution (treated as 32x32). Written here:
torchvision's ``vgg11`` fixes 3 input channels, offers only BatchNorm or no norm, and has the 224 px head
(7x7 adaptive pooling, two 4096-wide dropout layers), none of which is the evaluated model.
"""

from __future__ import annotations

from torch import nn

from ddrun.nets.convnet import FeatureClassifier, _norm

VGG11_LAYERS = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG11(FeatureClassifier):
    """Args:
        channels, num_classes, im_size: input channels C, classes K, input (H, W) (at least 32 px after padding).
        norm: ``instancenorm`` (VGG11 of the reference), ``batchnorm`` (VGG11-BN), ``groupnorm`` or ``none``.

    Input float32 ``[B, C, H, W]``; ``forward`` -> logits ``[B, K]``; ``embed`` -> ``[B, 512*(H/32)*(W/32)]``.

    Raises:
        ConfigError: unknown ``norm``.
    """

    def __init__(self, channels: int, num_classes: int, im_size: tuple[int, int] = (32, 32),
                 norm: str = "instancenorm"):
        super().__init__()
        h, w = (32, 32) if tuple(im_size) == (28, 28) else tuple(im_size)
        layers: list[nn.Module] = []
        c = channels
        for i, v in enumerate(VGG11_LAYERS):
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
                h, w = h // 2, w // 2
                continue
            layers.append(nn.Conv2d(c, v, 3, padding=3 if i == 0 and tuple(im_size) == (28, 28) else 1))
            n = _norm(norm, v, (h, w))
            if n is not None:
                layers.append(n)
            layers.append(nn.ReLU(inplace=True))
            c = v
        self._set_head(layers, c * h * w, num_classes)
