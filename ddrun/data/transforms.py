"""Image augmentations of the decoupled family, built on ``torchvision.transforms.v2``, seeded by a generator.

- :class:`Augment` (per sample, for training networks): the teachers' ``RandomCrop(size, padding) + flip``
  (SRe2L ``squeeze_cifar.py``) or ``RandomResizedCrop(size, scale) + flip`` (torchvision's ImageNet recipe; the
  student training of SRe2L / RDED / EDC), each image its own draw.
- :class:`BatchAugment` (one draw for the whole batch, differentiable): the per-step augmentation of S in the
  recover stage: ``RandomResizedCrop(size, scale) + flip`` (SRe2L ImageNet / EDC ``recover.py``), and/or a random
  roll of up to ``roll`` pixels (SRe2L ``recover_cifar.py`` "jitter"). The flatness term of EDC augments S and its
  EMA copy with the same draw: pass them concatenated.

v2 transforms draw from torch's global generator; every call here draws a seed from the caller's CPU generator and
runs the transform inside ``torch.random.fork_rng`` with that seed, so results depend on the caller's generator
only (a run repeats from its seed, resumes identically) and the global random state is left untouched. Images are
float ``[B, C, H, W]`` in any (normalized) space.

On CUDA under ``deterministic=true`` (``torch.use_deterministic_algorithms``) the batch's RandomResizedCrop is
written as two matrix products (:func:`resized_crop_flip_matmul`, the same draws and interpolation weights as
torchvision's): ``F.interpolate``'s bilinear backward has no deterministic CUDA kernel, a matrix product's has.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from ddrun.utils import ConfigError

KINDS = ("crop", "resized_crop", "none")


@contextlib.contextmanager
def _seeded_from(generator: torch.Generator | None):
    seed = int(torch.randint(2**62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _check(kind: str, scale: Sequence[float], where: str) -> None:
    if kind not in KINDS:
        raise ConfigError(f"{where}.kind={kind!r}: valid values are {list(KINDS)}")
    lo, hi = float(scale[0]), float(scale[1])
    if not 0.0 < lo <= hi <= 1.0:
        raise ConfigError(f"{where}.scale={list(scale)}: must satisfy 0 < low <= high <= 1 (fractions of the area)")


def _geometric(kind: str, size: Sequence[int], padding: int, scale: Sequence[float], flip: bool,
               fill: Sequence[float] | float) -> v2.Compose:
    ops = []
    if kind == "crop":
        ops.append(v2.RandomCrop(list(size), padding=int(padding),
                                 fill=list(fill) if isinstance(fill, Sequence) else float(fill)))
    elif kind == "resized_crop":
        ops.append(v2.RandomResizedCrop(list(size), scale=(float(scale[0]), float(scale[1])), antialias=True))
    if flip:
        ops.append(v2.RandomHorizontalFlip())
    return v2.Compose(ops)


def _resize_matrix(n_in: int, n_out: int, like: torch.Tensor) -> torch.Tensor:
    """The weights ``[n_out, n_in]`` (``like``'s dtype and device) of torch's antialiased bilinear resize along one
    axis, read off by resizing the identity (the interpolation is linear and separable; the other axis keeps its
    2 pixels exactly: with 1 pixel the antialiased CPU kernel returns zeros)."""
    eye = torch.eye(n_in, dtype=like.dtype, device=like.device).reshape(n_in, 1, n_in, 1).expand(-1, -1, -1, 2)
    return F.interpolate(eye, size=(n_out, 2), mode="bilinear", align_corners=False, antialias=True)[:, 0, :, 0].T


def resized_crop_flip_matmul(x: torch.Tensor, scale: Sequence[float], flip: bool) -> torch.Tensor:
    """``v2.Compose([v2.RandomResizedCrop(size, scale, antialias=True), v2.RandomHorizontalFlip()])`` of the batch
    ``x`` float ``[B, C, H, W]`` (one draw, back to (H, W)) with the resize as ``R_h @ crop @ R_w^T``: the same
    random draws from torch's global generator as torchvision, values equal up to float rounding, and a backward
    without atomics (deterministic on CUDA)."""
    size = list(x.shape[-2:])
    p = v2.RandomResizedCrop(size, scale=(float(scale[0]), float(scale[1])), antialias=True).make_params([x])
    part = x[..., p["top"]:p["top"] + p["height"], p["left"]:p["left"] + p["width"]]
    out = _resize_matrix(p["height"], size[0], x) @ part @ _resize_matrix(p["width"], size[1], x).T
    if flip and torch.rand(1) < 0.5:  # v2.RandomHorizontalFlip(p=0.5): flips when rand < p
        out = out.flip(-1)
    return out


class Augment:
    """Per-sample augmentation for training networks (teachers, KD students).

    Args:
        kind: ``crop`` (pad ``padding`` then a random crop back to the image size), ``resized_crop`` (a random
            crop of ``scale`` of the area, resized to the image size) or ``none``.
        padding: pixels of padding for ``crop`` (SRe2L: 4).
        scale: the area range of ``resized_crop`` (torchvision / SRe2L: (0.08, 1); EDC CIFAR-100: (0.5, 1)).
        flip: random horizontal flip with p = 0.5 (off for digits).
        fill: value(s) of the padding, per channel, in the images' space (the normalized black pixel
            ``-mean / std`` reproduces padding before normalization).

    Raises:
        ConfigError: unknown ``kind`` or a bad ``scale``.
    """

    def __init__(self, kind: str = "crop", padding: int = 4, scale: Sequence[float] = (0.08, 1.0), flip: bool = True,
                 fill: Sequence[float] | float = 0.0):
        _check(kind, scale, "augment")
        self.kind, self.padding, self.scale, self.flip = kind, int(padding), tuple(map(float, scale)), bool(flip)
        self.fill = fill

    def describe(self) -> str:
        """e.g. ``crop4+flip``, ``resized_crop0.08-1+flip``, ``none``."""
        parts = {"crop": f"crop{self.padding}", "resized_crop": f"resized_crop{self.scale[0]:g}-{self.scale[1]:g}",
                 "none": ""}[self.kind]
        return "+".join(p for p in (parts, "flip" if self.flip else "") if p) or "none"

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``x`` float ``[B, C, H, W]`` -> the same shape, each image its own draw (no gradient needed)."""
        if self.kind == "none" and not self.flip:
            return x
        tf = _geometric(self.kind, x.shape[-2:], self.padding, self.scale, self.flip, self.fill)
        with _seeded_from(generator):
            return torch.stack([tf(img) for img in x])


class BatchAugment:
    """One random draw for the whole batch, differentiable w.r.t. the images (the recover stage's augmentation).

    Args:
        kind: ``resized_crop``, ``crop`` (zero-pad ``padding`` pixels, then a random crop back to the image size:
            G-VBSM's ``RandomCrop(size, padding)``) or ``none``.
        scale: the area range of ``resized_crop``.
        padding: pixels of zero padding of ``crop`` (G-VBSM: size / 8, i.e. 4 on CIFAR).
        flip: random horizontal flip of the whole batch with p = 0.5.
        roll: a random cyclic shift of up to ``roll`` pixels in each direction (SRe2L's jitter; 0: off).
        roll_last: shift after the crop and flip (G-VBSM) instead of before them (SRe2L).

    Raises:
        ConfigError: unknown ``kind``, a bad ``scale`` or a negative ``roll`` / ``padding``.
    """

    def __init__(self, kind: str = "resized_crop", scale: Sequence[float] = (0.08, 1.0), flip: bool = True,
                 roll: int = 0, padding: int = 0, roll_last: bool = False):
        _check(kind, scale, "objective.augment")
        for name, v in (("roll", roll), ("padding", padding)):
            if int(v) < 0:
                raise ConfigError(f"objective.augment.{name}={v}: must be >= 0 (pixels)")
        self.kind, self.scale, self.flip, self.roll = kind, tuple(map(float, scale)), bool(flip), int(roll)
        self.padding, self.roll_last = int(padding), bool(roll_last)

    def describe(self) -> str:
        roll = f"roll{self.roll}" if self.roll else ""
        parts = [roll if not self.roll_last else "",
                 {"resized_crop": f"resized_crop{self.scale[0]:g}-{self.scale[1]:g}", "crop": f"crop{self.padding}",
                  "none": ""}[self.kind],
                 "flip" if self.flip else "", roll if self.roll_last else ""]
        return "+".join(p for p in parts if p) or "none"

    def _roll(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        dy, dx = (int(v) for v in torch.randint(-self.roll, self.roll + 1, (2,), generator=generator))
        return torch.roll(x, shifts=(dy, dx), dims=(2, 3))

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``x`` float ``[B, C, H, W]`` -> the same shape; one draw for all B images; gradients flow to ``x``."""
        if self.roll and not self.roll_last:
            x = self._roll(x, generator)
        if self.kind != "none" or self.flip:
            matmul = self.kind == "resized_crop" and x.is_cuda and torch.are_deterministic_algorithms_enabled()
            with _seeded_from(generator):
                if matmul:
                    x = resized_crop_flip_matmul(x, self.scale, self.flip)
                else:
                    x = _geometric(self.kind, x.shape[-2:], self.padding, self.scale, self.flip, 0.0)(x)
        if self.roll and self.roll_last:
            x = self._roll(x, generator)
        return x
