"""Differentiable Siamese Augmentation (DSA).

Zhao & Bilen, "Dataset Condensation with Differentiable Siamese Augmentation", ICML 2021, Sec. 3 (Eq. 5).
One module serves the matching objectives (Siamese: the real and the synthetic batch get the *same*
transformation, one parameter for the whole batch) and the evaluator (each sample its own parameters).

Each call draws one operation uniformly from the ``_``-separated strategy (the reference's ``aug_mode='S'``);
``color`` applies brightness, then saturation, then contrast. Parameters are those of the reference
``ParamDiffAug``: scale 1.2, rotate 15 degrees, flip p=0.5, crop (translation) 0.125, cutout 0.5,
brightness 1.0, saturation 2.0, contrast 0.5. The ops act on normalized (or ZCA-whitened) tensors and are
differentiable with respect to the input images.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ddrun.utils import ConfigError, host_to

_OPS = ("color", "crop", "cutout", "flip", "scale", "rotate")


class DSA:
    """Differentiable augmentation of image batches.

    Args:
        strategy: ops joined by ``_`` (e.g. ``color_crop_cutout_flip_scale_rotate``); ``none`` or ``""``
            disables augmentation.
        scale, rotate, flip, crop, cutout, brightness, saturation, contrast: the op parameters (see module doc).

    Raises:
        ConfigError: the strategy names an unknown op (the message lists the valid ones).
    """

    def __init__(self, strategy: str = "color_crop_cutout_flip_scale_rotate", scale: float = 1.2,
                 rotate: float = 15.0, flip: float = 0.5, crop: float = 0.125, cutout: float = 0.5,
                 brightness: float = 1.0, saturation: float = 2.0, contrast: float = 0.5):
        ops = [] if strategy in (None, "", "none", "None") else str(strategy).split("_")
        bad = [o for o in ops if o not in _OPS]
        if bad:
            raise ConfigError(f"augment.strategy: unknown op(s) {bad}; valid ops are {list(_OPS)} joined by '_'")
        self.strategy = "_".join(ops) or "none"
        self.ops = ops
        self.p = dict(scale=scale, rotate=rotate, flip=flip, crop=crop, cutout=cutout,
                      brightness=brightness, saturation=saturation, contrast=contrast)

    @property
    def enabled(self) -> bool:
        return bool(self.ops)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None,
                 siamese: bool = False) -> torch.Tensor:
        """Augment ``x`` (float ``[B, C, H, W]``).

        ``generator`` (a CPU generator) draws the op and its parameters; calling twice with generators in the
        same state gives the same transformation. With ``siamese=True`` the whole batch shares one parameter
        (the matching setting); otherwise each sample gets its own (the evaluation setting).
        """
        if not self.ops:
            return x
        g = generator
        op = self.ops[int(torch.randint(len(self.ops), (1,), generator=g))]
        n = 1 if siamese else x.shape[0]
        if op == "color":
            x = self._brightness(x, n, g)
            x = self._saturation(x, n, g)
            return self._contrast(x, n, g)
        return getattr(self, f"_{op}")(x, n, g)

    def pair(self, real: torch.Tensor, syn: torch.Tensor, generator: torch.Generator):
        """Siamese augmentation of a real and a synthetic batch with the same op and parameter."""
        seed = int(torch.randint(2**62, (1,), generator=generator))
        return (self(real, torch.Generator().manual_seed(seed), siamese=True),
                self(syn, torch.Generator().manual_seed(seed), siamese=True))

    # ---- ops -------------------------------------------------------------------------------------------
    @staticmethod
    def _rand(n, g, x, shape=(1, 1, 1)):
        return host_to(torch.rand(n, generator=g), x.device, x.dtype).view(n, *shape)

    def _brightness(self, x, n, g):
        return x + (self._rand(n, g, x) - 0.5) * self.p["brightness"]

    def _saturation(self, x, n, g):
        mean = x.mean(dim=1, keepdim=True)
        return (x - mean) * (self._rand(n, g, x) * self.p["saturation"]) + mean

    def _contrast(self, x, n, g):
        mean = x.mean(dim=[1, 2, 3], keepdim=True)
        return (x - mean) * (self._rand(n, g, x) + self.p["contrast"]) + mean

    def _flip(self, x, n, g):
        mask = self._rand(n, g, x) < self.p["flip"]
        return torch.where(mask, x.flip(3), x)

    def _affine(self, x, theta, gather: bool | None = None):
        """Bilinear resampling of ``x`` by the affine maps ``theta`` ``[n, 2, 3]`` (zeros outside, corners aligned):
        ``F.grid_sample``, or with ``gather`` (default: on CUDA under ``torch.use_deterministic_algorithms``,
        where grid_sample's backward has no deterministic kernel) the same interpolation written with gathers."""
        theta = host_to(theta, x.device, x.dtype).expand(x.shape[0], 2, 3)
        grid = F.affine_grid(theta, list(x.shape), align_corners=True)
        if gather is None:
            gather = x.is_cuda and torch.are_deterministic_algorithms_enabled()
        return _bilinear_gather(x, grid) if gather else F.grid_sample(x, grid, align_corners=True)

    def _scale(self, x, n, g):
        r = self.p["scale"]
        s = torch.rand(n, 2, generator=g) * (r - 1.0 / r) + 1.0 / r
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0], theta[:, 1, 1] = s[:, 0], s[:, 1]
        return self._affine(x, theta)

    def _rotate(self, x, n, g):
        a = (torch.rand(n, generator=g) - 0.5) * 2 * self.p["rotate"] / 180 * math.pi
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0], theta[:, 0, 1] = torch.cos(a), torch.sin(a)
        theta[:, 1, 0], theta[:, 1, 1] = -torch.sin(a), torch.cos(a)
        return self._affine(x, theta)

    def _crop(self, x, n, g):
        """Integer translation by up to ``crop * size`` pixels; shifted-in pixels come from a zero border."""
        B, _, H, W = x.shape
        sh, sw = int(H * self.p["crop"] + 0.5), int(W * self.p["crop"] + 0.5)
        dy = torch.randint(-sh, sh + 1, (n, 1), generator=g).expand(B, 1)
        dx = torch.randint(-sw, sw + 1, (n, 1), generator=g).expand(B, 1)
        rows = host_to((torch.arange(H).view(1, H) + dy + 1).clamp(0, H + 1), x.device)
        cols = host_to((torch.arange(W).view(1, W) + dx + 1).clamp(0, W + 1), x.device)
        xp = F.pad(x, [1, 1, 1, 1])
        b = torch.arange(B, device=x.device).view(B, 1, 1)
        out = xp.permute(0, 2, 3, 1)[b, rows.view(B, H, 1), cols.view(B, 1, W)]
        return out.permute(0, 3, 1, 2)

    def _cutout(self, x, n, g):
        """Zero one square of ``cutout * size`` pixels at a random centre (clipped at the borders)."""
        B, _, H, W = x.shape
        ch, cw = int(H * self.p["cutout"] + 0.5), int(W * self.p["cutout"] + 0.5)
        cy = host_to(torch.randint(0, H + (1 - ch % 2), (n, 1), generator=g), x.device).expand(B, 1)
        cx = host_to(torch.randint(0, W + (1 - cw % 2), (n, 1), generator=g), x.device).expand(B, 1)
        ys = torch.arange(H, device=x.device).view(1, H)
        xs = torch.arange(W, device=x.device).view(1, W)
        in_y = (ys >= cy - ch // 2) & (ys < cy - ch // 2 + ch)
        in_x = (xs >= cx - cw // 2) & (xs < cx - cw // 2 + cw)
        mask = ~(in_y.view(B, H, 1) & in_x.view(B, 1, W))
        return x * mask.unsqueeze(1).to(x.dtype)


def _bilinear_gather(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """``F.grid_sample(x, grid, align_corners=True)`` (bilinear, zero padding) by gathering the four neighbours:
    ``x`` ``[B, C, H, W]``, ``grid`` ``[B, Ho, Wo, 2]`` in [-1, 1]; differentiable w.r.t. ``x`` (not ``grid``)."""
    B, C, H, W = x.shape
    gx = ((grid[..., 0] + 1) * (W - 1) / 2).detach()
    gy = ((grid[..., 1] + 1) * (H - 1) / 2).detach()
    x0, y0 = gx.floor(), gy.floor()
    flat = x.reshape(B, C, H * W)
    out = x.new_zeros(B, C, *gx.shape[1:])
    for yy, wy in ((y0, 1 - (gy - y0)), (y0 + 1, gy - y0)):
        for xx, wx in ((x0, 1 - (gx - x0)), (x0 + 1, gx - x0)):
            inside = ((xx >= 0) & (xx <= W - 1) & (yy >= 0) & (yy <= H - 1)).to(x.dtype)
            idx = (yy.clamp(0, H - 1) * W + xx.clamp(0, W - 1)).long().view(B, 1, -1).expand(B, C, -1)
            out = out + flat.gather(2, idx).view_as(out) * (wx * wy * inside).unsqueeze(1)
    return out
