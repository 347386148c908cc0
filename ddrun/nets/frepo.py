"""The ``Conv`` network of FRePo.

Zhou, Nezhadarya & Ba, "Dataset Distillation using Neural Feature Regression", NeurIPS 2022 (reference
yongchaoz/FRePo ``lib/models/networks.py`` class ``Conv``, the same structure in its PyTorch port
``lib_torch/networks.py``): ``depth`` blocks; block i is

    [norm (i > 0 only)] -> conv3x3(width * 2**i, bias) -> ReLU -> avgpool 2x2,

so the width doubles per block (128 / 256 / 512 at the reference's width 128, depth 3) and the normalization sits
*before* every convolution after the first; then one linear classifier on the flattened features, 8,192 of them
for 32x32 inputs (512 x 4 x 4). 28x28 single-channel inputs get padding 3 in the first convolution (treated as
32x32), as the reference. FRePo's model pool uses it with BatchNorm (``--normalization batch``); its evaluation
uses it without normalization (``script/eval.py`` replaces ``batch`` by ``identity``).

BatchNorm running statistics: the flax reference uses ``nn.BatchNorm(momentum=0.1)``, whose update is
``running = 0.1 * running + 0.9 * batch`` (flax's momentum is the weight of the *old* value), i.e. the newest batch
weighs 90%. PyTorch's ``momentum`` is the weight of the *new* batch, so the reference is ``bn_momentum: 0.9`` here
(PyTorch's default 0.1, which the PyTorch port keeps, weighs the newest batch 10%).

Initialization (``init``): ``lecun`` is flax's default for ``nn.Conv`` / ``nn.Dense`` (``lecun_normal``: truncated
normal with variance 1 / fan_in, zero biases); ``torch`` keeps PyTorch's default (the port's).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ddrun.nets.convnet import FeatureClassifier
from ddrun.utils import ConfigError

# std of a standard normal truncated to [-2, 2] (jax.nn.initializers.variance_scaling's correction constant)
_TRUNC_STD = 0.87962566103423978


def lecun_normal_(net: nn.Module) -> nn.Module:
    """flax's default initialization, in place: every Conv/Linear weight ~ truncated normal (at +-2 std) with
    variance ``1 / fan_in``, biases 0 (``jax.nn.initializers.lecun_normal``)."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                std = math.sqrt(1.0 / m.weight[0].numel()) / _TRUNC_STD
                nn.init.trunc_normal_(m.weight, 0.0, std, -2 * std, 2 * std)
                if m.bias is not None:
                    m.bias.zero_()
    return net


class FRePoConv(FeatureClassifier):
    """FRePo's ``Conv`` (module doc).

    Args:
        channels, num_classes, im_size: input channels C, classes K, input (H, W).
        width: channels of the first block (doubled in each following block).
        depth: blocks.
        norm: ``batchnorm`` (the model pool), ``none`` (the evaluation network), ``instancenorm``, ``layernorm``.
        bn_momentum: PyTorch-convention BatchNorm momentum, the weight of the newest batch (0.9 = flax's 0.1).
        init: ``lecun`` (flax's default) or ``torch`` (PyTorch's default).

    Input float32 ``[B, C, H, W]``; ``forward`` -> logits ``[B, K]``; ``embed`` -> ``[B, width * 2**(depth-1) *
    (H'/2**depth) * (W'/2**depth)]`` with ``H' = W' = 32`` for 28x28 inputs (8,192 at the reference settings).

    Raises:
        ConfigError: unknown ``norm`` or ``init``, or a non-positive width / depth.
    """

    NORMS = ("batchnorm", "none", "instancenorm", "layernorm")

    def __init__(self, channels: int, num_classes: int, im_size: tuple[int, int] = (32, 32), width: int = 128,
                 depth: int = 3, norm: str = "batchnorm", bn_momentum: float = 0.9, init: str = "lecun"):
        super().__init__()
        if norm not in self.NORMS:
            raise ConfigError(f"net.norm={norm!r}: valid values are {list(self.NORMS)}")
        if init not in ("lecun", "torch"):
            raise ConfigError(f"net.init={init!r}: valid values are ['lecun', 'torch']")
        if int(width) < 1 or int(depth) < 1:
            raise ConfigError(f"net.width={width}, net.depth={depth}: both must be >= 1")
        h, w = (32, 32) if tuple(im_size) == (28, 28) else tuple(im_size)
        layers: list[nn.Module] = []
        c = channels
        for i in range(depth):
            if i > 0 and norm != "none":
                layers.append(self._norm(norm, c, (h, w), bn_momentum))
            out = width * 2**i
            pad = 3 if i == 0 and tuple(im_size) == (28, 28) else 1
            layers += [nn.Conv2d(c, out, 3, padding=pad), nn.ReLU(inplace=True), nn.AvgPool2d(2, 2)]
            c, h, w = out, h // 2, w // 2
        self._set_head(layers, c * h * w, num_classes)
        if init == "lecun":
            lecun_normal_(self)

    @staticmethod
    def _norm(kind: str, c: int, hw: tuple[int, int], momentum: float) -> nn.Module:
        if kind == "batchnorm":
            return nn.BatchNorm2d(c, eps=1e-5, momentum=momentum)
        if kind == "instancenorm":
            return nn.GroupNorm(c, c, affine=True)
        return nn.LayerNorm([c, *hw], elementwise_affine=True)
