"""The ConvNet of the DC / DSA / DM / MTT papers.

Zhao et al., "Dataset Condensation with Gradient Matching", ICLR 2021, Sec. 4 ("ConvNet"), following
Gidaris & Komodakis 2018: ``depth`` blocks of [3x3 conv (``width`` filters) -> norm -> act -> pool], then one
linear classifier. Defaults are the reference's: width 128, depth 3, ReLU, instance norm (implemented as
``GroupNorm(C, C)``, one group per channel, affine), average pooling 2x2 (:class:`AvgPool2x2`). 28x28
single-channel inputs get padding 3 in the first conv, so they are treated as 32x32.
"""

from __future__ import annotations

import torch
from torch import nn

from ddrun.utils import ConfigError

_ACTS = {"relu": lambda: nn.ReLU(inplace=True), "sigmoid": nn.Sigmoid, "leakyrelu": lambda: nn.LeakyReLU(0.01),
         "swish": nn.SiLU}


class AvgPool2x2(nn.AvgPool2d):
    """``nn.AvgPool2d(2, 2)`` (stride 2, odd rows and columns dropped): the same values up to float rounding.

    On the CPU a contiguous NCHW input ``[..., H, W]`` is pooled as two strided sums (rows, then columns) times
    1/4: their forward, backward and double backward are plain reductions and broadcasts, 1.6x faster on one CPU
    thread than ``avg_pool2d``'s kernels at 10 x 128 x 32 x 32 (MTT's unrolled steps at ipc 1 run their pooling
    forward, backward and double backward 20 times an iteration). Other devices and layouts (channels-last) use
    ``avg_pool2d``, one kernel.
    """

    def __init__(self):
        super().__init__(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        *lead, h, w = x.shape
        h2, w2 = h // 2, w // 2
        if x.device.type != "cpu" or not x.is_contiguous() or not (h2 and w2):
            return super().forward(x)
        if h % 2 or w % 2:
            x = x[..., :2 * h2, :2 * w2].contiguous()
        rows = x.reshape(*lead, h2, 2, 2 * w2).sum(-2)
        return rows.reshape(*lead, h2, w2, 2).sum(-1) * 0.25


_POOLS = {"avgpooling": AvgPool2x2, "maxpooling": lambda: nn.MaxPool2d(2, 2), "none": None}


def _norm(kind: str, c: int, hw: tuple[int, int]) -> nn.Module | None:
    if kind == "instancenorm":
        return nn.GroupNorm(c, c, affine=True)
    if kind == "batchnorm":
        return nn.BatchNorm2d(c)
    if kind == "layernorm":
        return nn.LayerNorm([c, *hw], elementwise_affine=True)
    if kind == "groupnorm":
        return nn.GroupNorm(4, c, affine=True)
    if kind == "none":
        return None
    raise ConfigError(f"net.norm={kind!r}: valid values are instancenorm, batchnorm, layernorm, groupnorm, none")


class FeatureClassifier(nn.Module):
    """A feature extractor followed by one linear classifier (ConvNet, AlexNet, VGG11 share this head).

    ``embed(x)`` returns the flattened features ``[B, feature_dim]`` (what DM and the kernels use), ``forward(x)``
    the logits ``[B, K]``.
    """

    def _set_head(self, layers: list[nn.Module], feature_dim: int, num_classes: int) -> None:
        self.features = nn.Sequential(*layers)
        self.feature_dim = feature_dim
        self.classifier = nn.Linear(feature_dim, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


class ConvNet(FeatureClassifier):
    """ConvNet-``depth`` with ``width`` channels.

    Args:
        channels: input channels C.
        num_classes: output logits K.
        im_size: input (H, W).
        width, depth, act, norm, pooling: see the module doc.
        pad28: treat 28x28 single-channel inputs as 32x32 (padding 3 in the first conv: the DC reference); False
            keeps padding 1 and 28 px (RFAD's ``ConvNet_wide`` / ``ConvNet``: 3x3 feature maps at depth 3).
        init: ``default`` (PyTorch's) or ``gaussian`` (RFAD's ``Conv2d_gaussian`` / ``GaussianLinear``: weights
            N(0, 2 / fan_in), biases N(0, 0.01); ``ddrun.nets.kernels.gaussian_init_``).

    Input float32 ``[B, C, H, W]``; ``forward`` returns logits ``[B, K]``, ``embed`` the flattened features
    before the classifier ``[B, feature_dim]`` (what DM matches).

    Raises:
        ConfigError: unknown ``act``, ``norm`` or ``pooling``.
    """

    def __init__(self, channels: int, num_classes: int, im_size: tuple[int, int] = (32, 32), width: int = 128,
                 depth: int = 3, act: str = "relu", norm: str = "instancenorm", pooling: str = "avgpooling",
                 pad28: bool = True, init: str = "default"):
        super().__init__()
        if act not in _ACTS:
            raise ConfigError(f"net.act={act!r}: valid values are {sorted(_ACTS)}")
        if pooling not in _POOLS:
            raise ConfigError(f"net.pooling={pooling!r}: valid values are {sorted(_POOLS)}")
        if init not in ("default", "gaussian"):
            raise ConfigError(f"net.init={init!r}: valid values are ['default', 'gaussian']")
        layers: list[nn.Module] = []
        h, w = im_size
        pad_first = pad28 and channels == 1 and im_size[0] == 28
        if (h, w) == (28, 28) and pad28:
            h, w = 32, 32
        c = channels
        for d in range(depth):
            layers.append(nn.Conv2d(c, width, 3, padding=3 if pad_first and d == 0 else 1))
            c = width
            n = _norm(norm, c, (h, w))
            if n is not None:
                layers.append(n)
            layers.append(_ACTS[act]())
            if _POOLS[pooling] is not None:
                layers.append(_POOLS[pooling]())
                h, w = h // 2, w // 2
        self._set_head(layers, c * h * w, num_classes)
        if init == "gaussian":
            from ddrun.nets.kernels import gaussian_init_

            gaussian_init_(self)
