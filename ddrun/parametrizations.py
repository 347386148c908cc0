"""Factorized parametrizations of S (``conf/parametrization/``): how the stored tensors of S become the training
images every objective, evaluator and fetcher sees (contract: :class:`ddrun.contracts.Parametrization`).

IDC's multi-formation (Kim et al., "Dataset Condensation via Efficient Synthetic-Data Parameterization", ICML
2022, Sec. 3.1 and Fig. 2; reference snu-mllab/Efficient-Dataset-Condensation ``condense.py``
``Synthesizer.decode_zoom`` / ``init(init_type='mix')``): each stored image ``[C, H, W]`` is cut into ``factor x
factor`` tiles of ``H/factor x W/factor`` pixels, and each tile is upsampled back to ``H x W`` (bilinear, the
reference's ``nn.Upsample(mode='bilinear')``): one stored image makes ``factor^2`` training images with its
label. It is initialized by the reverse: ``factor^2`` real images of a class, each downsampled to one tile
(``F.interpolate``, nearest by default as the reference), are tiled into one stored image. The storage budget
stays ``ipc`` stored images per class; ``ipc x factor^2`` per class are trained on (stated in every result through
:meth:`MultiFormation.describe`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ddrun.contracts import Parametrization
from ddrun.data.datasets import RealData
from ddrun.synthetic import SyntheticSet
from ddrun.utils import ConfigError

RESIZE_MODES = ("nearest", "bilinear", "bicubic", "area")


class DecodedSet:
    """The training set decoded from S: the read interface of :class:`~ddrun.synthetic.SyntheticSet` over
    decoded images.

    Each stored image ``i`` decodes into ``repeats`` consecutive images ``i * repeats .. (i + 1) * repeats - 1``
    with its label, so the decoded set is ordered class by class like S.

    Attributes:
        images: float32 ``[N * repeats, C, H, W]``, differentiable w.r.t. ``source.images``.
        labels: S's labels repeated (int64 ``[N * repeats]`` or soft-label logits ``[N * repeats, K]``,
            differentiable w.r.t. learned labels).
        source: S itself (its learned step size is this set's step size).
    """

    def __init__(self, source: SyntheticSet, images: torch.Tensor, repeats: int):
        self.source, self.images, self.repeats = source, images, int(repeats)
        self.labels = source.labels.repeat_interleave(self.repeats, dim=0)
        self.num_classes, self.label_scale, self.meta = source.num_classes, source.label_scale, source.meta

    @property
    def syn_lr(self) -> torch.Tensor | None:
        return self.source.syn_lr

    @property
    def lr(self) -> torch.Tensor | None:
        return self.source.lr

    @property
    def ipc(self) -> int:
        return len(self.images) // self.num_classes

    @property
    def soft(self) -> bool:
        return self.source.soft

    def hard_labels(self) -> torch.Tensor:
        """int64 ``[N * repeats]``."""
        return self.source.hard_labels().repeat_interleave(self.repeats)

    def class_slice(self, c: int) -> torch.Tensor:
        """Indices of the decoded images whose (hard) label is ``c``."""
        return torch.nonzero(self.hard_labels() == c).flatten()

    def regression_targets(self) -> torch.Tensor:
        """float ``[N * repeats, K]`` (see :meth:`SyntheticSet.regression_targets`)."""
        return self.source.regression_targets().repeat_interleave(self.repeats, dim=0)


class MultiFormation(Parametrization):
    """IDC's multi-formation (module doc).

    Args:
        factor: tiles per side (the reference: 2 for CIFAR / SVHN / MNIST / Fashion-MNIST, 3 for ImageNet).
        decode_mode: how a tile is upsampled to the image size (``F.interpolate`` mode; the reference:
            bilinear).
        init_mode: how a real image is downsampled to a tile at initialization (the reference: nearest, the
            default of ``F.interpolate``).

    Raises:
        ConfigError: ``factor < 1`` or an unknown mode; (at use) ``factor`` not dividing the image size.
    """

    name = "idc"

    def __init__(self, factor: int = 2, decode_mode: str = "bilinear", init_mode: str = "nearest"):
        if int(factor) < 1:
            raise ConfigError(f"parametrization.factor={factor}: must be >= 1 (tiles per side)")
        for key, mode in (("decode_mode", decode_mode), ("init_mode", init_mode)):
            if mode not in RESIZE_MODES:
                raise ConfigError(f"parametrization.{key}={mode!r}: valid values are {list(RESIZE_MODES)}")
        self.factor, self.decode_mode, self.init_mode = int(factor), decode_mode, init_mode

    def _tile_size(self, h: int, w: int) -> tuple[int, int]:
        f = self.factor
        if h % f or w % f:
            divisors = sorted({d for d in range(2, min(h, w) + 1) if h % d == 0 and w % d == 0})
            raise ConfigError(f"parametrization.factor={f} does not divide the image size {h}x{w}: each stored "
                              f"image is cut into factor x factor equal tiles; use one of {divisors or [1]}")
        return h // f, w // f

    def _resize(self, x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
        smooth = mode in ("bilinear", "bicubic")
        return F.interpolate(x, size=size, mode=mode, **({"align_corners": False} if smooth else {}))

    def decode_images(self, images: torch.Tensor) -> torch.Tensor:
        """float ``[N, C, H, W]`` -> ``[N * factor^2, C, H, W]``: tile ``(i, j)`` of stored image ``n`` (row ``i``,
        column ``j``) upsampled to ``H x W`` is decoded image ``n * factor^2 + i * factor + j``. Differentiable.

        Raises:
            ConfigError: ``factor`` does not divide ``H`` and ``W``.
        """
        n, c, h, w = images.shape
        f = self.factor
        th, tw = self._tile_size(h, w)
        if f == 1:
            return images
        tiles = images.reshape(n, c, f, th, f, tw).permute(0, 2, 4, 1, 3, 5).reshape(n * f * f, c, th, tw)
        return self._resize(tiles, (h, w), self.decode_mode)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """The reverse of :meth:`decode_images`: float ``[M * factor^2, C, H, W]`` -> ``[M, C, H, W]``; images
        ``m * factor^2 .. (m + 1) * factor^2 - 1``, each downsampled (``init_mode``) to a tile, are tiled row by
        row into stored image ``m``.

        Raises:
            ConfigError: ``factor`` does not divide ``H`` and ``W``, or the count is not a multiple of factor^2.
        """
        n, c, h, w = images.shape
        f = self.factor
        th, tw = self._tile_size(h, w)
        if n % (f * f):
            raise ConfigError(f"encoding {n} images with parametrization.factor={f} needs a multiple of {f * f}")
        tiles = self._resize(images, (th, tw), self.init_mode) if f > 1 else images
        m = n // (f * f)
        return tiles.reshape(m, f, f, c, th, tw).permute(0, 3, 1, 4, 2, 5).reshape(m, c, h, w)

    def decode(self, syn: SyntheticSet) -> DecodedSet:
        """The decoded training set (:class:`DecodedSet`), differentiable w.r.t. ``syn.images``."""
        return DecodedSet(syn, self.decode_images(syn.images), self.factor ** 2)

    @torch.no_grad()
    def encode_init(self, syn: SyntheticSet, real: RealData, generator: torch.Generator) -> None:
        """Write IDC's initialization into S in place: for each class, ``ipc x factor^2`` random real training
        images of that class (drawn with ``generator``; with replacement only when the class has fewer),
        :meth:`encode_images` into the class's ``ipc`` stored images."""
        f2 = self.factor ** 2
        self._tile_size(*syn.images.shape[2:])
        for c in range(syn.num_classes):
            idx = syn.class_slice(c)
            need = len(idx) * f2
            draws = [real.sample_class(c, need, generator)]
            while sum(len(d) for d in draws) < need:
                draws.append(real.sample_class(c, need, generator))
            x = torch.cat(draws)[:need].to(syn.images.device, syn.images.dtype)
            syn.images[idx] = self.encode_images(x)

    def describe(self, syn: SyntheticSet) -> dict:
        """``{"parametrization": "idc", "factor", "decode_mode", "stored_images", "decoded_images"}``.

        Raises:
            ConfigError: ``factor`` does not divide the image size of S.
        """
        self._tile_size(*syn.images.shape[2:])
        n = len(syn.images)
        return {"parametrization": self.name, "factor": self.factor, "decode_mode": self.decode_mode,
                "stored_images": n,
                "decoded_images": n * self.factor ** 2}
