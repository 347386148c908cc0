"""RDED's selection: realistic and diverse images from scored crops of real ones (no optimization).

Sun et al., "On the Diversity and Realism of Distilled Dataset: An Efficient Dataset Distillation Paradigm", CVPR
2024, Sec. 3 (Algorithm 1), and the reference ``synthesize/main.py`` / ``synthesize/utils.py`` (``selector``,
``mix_images``). For every class c:

1. draw ``mipc`` real training images of class c and take ``num_crop`` random square crops of each
   (RandomResizedCrop to side ``H // factor``, area ``scale``, aspect ratio 1);
2. score every crop by the observer's cross-entropy -log p(c | crop), the crop zero-padded back to H x W (zero is
   the mean pixel in the normalized space, as the reference pads its normalized crops): lower is more realistic;
3. keep each image's lowest-loss crop, then the ``ipc * factor^2`` lowest-loss ones over all images;
4. stitch them ``factor x factor`` into ``ipc`` images: the k-th block of ``ipc`` kept crops (in loss order) fills
   tile k (row-major) of every image, each crop resized to its tile (the reference's ``mix_images``).

The observer is a teacher from ``ddrun teacher`` (:func:`ddrun.fetchers.teachers.load_teachers`). Its soft labels
come later, online, from ``evaluator=kd``. ``method=rded`` is this initializer with zero iterations. Reference
settings: CIFAR-10/100 and Tiny ImageNet scripts ``--factor 1 --num-crop 5 --mipc 300``; ImageNet ``--factor 2``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ddrun.data.datasets import RealData
from ddrun.synthetic import SyntheticSet
from ddrun.utils import ConfigError


def select_crops(losses: torch.Tensor, crops: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """RDED's selector (step 3 of the module doc).

    Args:
        losses: float ``[num_crop, M]``: the observer's loss of crop j of image i.
        crops: ``[num_crop, M, C, h, w]`` the crops.
        keep: how many to keep (``<= M``).

    Returns:
        ``(crops [keep, C, h, w], losses [keep])``: each image's lowest-loss crop, the ``keep`` lowest of those,
        in increasing loss.
    """
    best = losses.argmin(0)                                  # [M]
    cols = torch.arange(losses.shape[1], device=losses.device)
    best_loss, best_crop = losses[best, cols], crops[best, cols]
    order = torch.argsort(best_loss, stable=True)[:keep]
    return best_crop[order], best_loss[order]


def stitch(patches: torch.Tensor, n: int, factor: int, size: Sequence[int]) -> torch.Tensor:
    """RDED's ``mix_images``: ``patches`` ``[factor^2 * n, C, h, w]`` -> ``n`` images ``[n, C, H, W]``; patch
    ``k * n + i`` is tile k (row-major) of image i, resized to the tile (tiles of ``H // factor`` pixels, the first
    ``H % factor`` rows / columns one pixel larger)."""
    h_all, w_all = int(size[0]), int(size[1])
    out = patches.new_zeros(n, patches.shape[1], h_all, w_all)

    def cuts(total: int) -> list[tuple[int, int]]:
        s, r, pos, res = total // factor, total % factor, 0, []
        for i in range(factor):
            length = s + 1 if i < r else s
            res.append((pos, length))
            pos += length
        return res

    k = 0
    for top, hh in cuts(h_all):
        for left, ww in cuts(w_all):
            part = patches[k * n:(k + 1) * n]
            if tuple(part.shape[-2:]) != (hh, ww):
                part = F.interpolate(part, size=(hh, ww), mode="bilinear", align_corners=False, antialias=True)
            out[:, :, top:top + hh, left:left + ww] = part
            k += 1
    return out


@torch.no_grad()
def crop_losses(observer: nn.Module, crops: torch.Tensor, label: int, size: Sequence[int],
                chunk: int = 512) -> torch.Tensor:
    """The observer's cross-entropy for class ``label`` of every crop ``[J, M, C, h, w]`` zero-padded (centered)
    to ``size``: float ``[J, M]``."""
    j, m = crops.shape[:2]
    flat = crops.reshape(j * m, *crops.shape[2:])
    dh, dw = int(size[0]) - flat.shape[-2], int(size[1]) - flat.shape[-1]
    padded = F.pad(flat, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2))
    observer.eval()
    logits = torch.cat([observer(padded[s:s + chunk]) for s in range(0, len(padded), chunk)])
    target = torch.full((len(padded),), int(label), dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, target, reduction="none").reshape(j, m)


def random_crops(images: torch.Tensor, num_crop: int, side: int, scale: Sequence[float],
                 generator: torch.Generator) -> torch.Tensor:
    """``num_crop`` RandomResizedCrop's (square output ``side``, area ``scale``, aspect ratio 1,
    ``torchvision.transforms.v2``) of every image ``[M, C, H, W]`` -> ``[num_crop, M, C, side, side]``."""
    from torchvision.transforms import v2

    tf = v2.RandomResizedCrop(side, scale=(float(scale[0]), float(scale[1])), ratio=(1.0, 1.0), antialias=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
        return torch.stack([torch.stack([tf(img) for img in images]) for _ in range(num_crop)])


def rded(real: RealData, ipc: int, generator: torch.Generator, observer: Callable[..., nn.Module],
         recipe: str = "sre2l", buffers: str = "buffers", data: str | None = None, teacher_dir: str | None = None,
         factor: int = 1, num_crop: int = 5, mipc: int = 300, scale: Sequence[float] = (0.08, 1.0)) -> SyntheticSet:
    """RDED's initialization (module doc): ``ipc`` images per class, class by class, hard labels.

    Args:
        real, ipc, generator: as every initializer.
        observer: the observer's architecture (the run's ``net``); recipe, buffers, data, teacher_dir: which
            teacher of the store (``ddrun teacher``).
        factor: tiles per side of one image (1: whole crops).
        num_crop: crops scored per real image.
        mipc: real images drawn per class (all of the class when it has fewer).
        scale: area range of the crops.

    Raises:
        ConfigError: bad sizes, or fewer candidates than ``ipc * factor^2``.
        DataError: no observer in the store (prints the ``ddrun teacher`` command).
    """
    from ddrun.fetchers.teachers import load_teachers

    if min(int(factor), int(num_crop), int(mipc)) < 1:
        raise ConfigError(f"init: factor={factor}, num_crop={num_crop}, mipc={mipc} must all be >= 1")
    model = load_teachers({"observer": observer}, real, real.device, recipe, buffers, data, 1, teacher_dir,
                          what="init")[0]["net"]
    size, keep = real.im_size, int(ipc) * int(factor) ** 2
    side = min(size) // int(factor)
    images = []
    for c in range(real.num_classes):
        cand = real.sample_class(c, int(mipc), generator)
        if len(cand) < keep:
            raise ConfigError(f"init=rded: class {c} has {len(cand)} candidate images, fewer than ipc * factor^2 = "
                              f"{keep}; lower init.factor or raise init.mipc")
        crops = random_crops(cand, int(num_crop), side, scale, generator)
        kept, _ = select_crops(crop_losses(model, crops, c, size), crops, keep)
        images.append(stitch(kept, int(ipc), int(factor), size).cpu())
    labels = torch.arange(real.num_classes).repeat_interleave(int(ipc))
    return SyntheticSet(torch.cat(images), labels, real.num_classes)
