"""How a teacher pool sees S: the realism and diversity of a decoupled set, measured beside the KD protocol.

RDED (Sun et al., CVPR 2024, Sec. 3 and Fig. 1) argues that a distilled set for the teacher-relabelled protocol must
be *realistic* (the observer reads each image as its class, confidently) and *diverse* (the images of a class are
not near copies in the observer's feature space); SRe2L's recovered images are its example of realistic but not
diverse. :func:`teacher_view` puts numbers on both for any S, so that a KD accuracy can be read against them:

- ``teacher_agreement``: percent of S's images (un-augmented) whose class the pool's mean logits pick;
- ``teacher_confidence``: the pool's mean top softmax probability on them, percent;
- ``teacher_diversity``: one minus the mean pairwise cosine similarity of a teacher's penultimate features
  (``net.embed``) between two different images of one class, averaged over classes and over the pool's members;
  0 for copies, about 1 for unrelated directions (ReLU features are non-negative, so rarely above 1);
- ``teacher_diversity_real``: the same on a class-balanced draw of real training images of S's size per class
  (``RealData.balanced_sample`` with seed 0, the same draw for every S of that size): the level of a random real
  subset.

The diversity needs two images of a class (ipc >= 2); at ipc 1 the two diversity keys are left out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ddrun.data.datasets import RealData
from ddrun.train import embed


@torch.no_grad()
def within_class_diversity(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float | None:
    """``1 - mean cos(f_i, f_j)`` over pairs ``i != j`` of one class, averaged over the classes with two or more
    images.

    Args:
        features: float ``[N, D]``; labels: int64 ``[N]`` in ``[0, num_classes)``.

    Returns:
        The diversity (a float in [0, 2]), or None when no class has two images.
    """
    f = F.normalize(features.flatten(1).float(), dim=1)
    per_class = []
    for c in range(num_classes):
        fc = f[labels == c]
        n = len(fc)
        if n >= 2:
            mean_cos = ((fc @ fc.T).sum() - n) / (n * (n - 1))  # the diagonal's n ones left out
            per_class.append(1.0 - float(mean_cos))
    return sum(per_class) / len(per_class) if per_class else None


def pool_diversity(pool: list[dict], x: torch.Tensor, labels: torch.Tensor, k: int, chunk: int = 256) -> float | None:
    """:func:`within_class_diversity` of each member's ``embed`` features of ``x`` (:func:`ddrun.train.embed`, in
    chunks of ``chunk`` images), averaged over the pool; None when no class has two images."""
    per_member = [within_class_diversity(embed(m["net"], x, chunk), labels, k) for m in pool]
    return None if None in per_member else sum(per_member) / len(per_member)


def teacher_view(pool: list[dict], images: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor,
                 real: RealData) -> dict[str, float]:
    """The numbers of the module doc for S ``(images [N, C, H, W] float, labels [N] int64 hard)`` under ``pool``
    (:func:`ddrun.fetchers.teachers.load_teachers`' members, in eval mode; each must have ``embed``), whose mean
    logits on S are ``logits`` float ``[N, K]`` (:func:`ddrun.fetchers.teachers.teacher_logits`).

    Returns:
        ``{"teacher_agreement", "teacher_confidence"}`` in percent, plus ``"teacher_diversity"`` and
        ``"teacher_diversity_real"`` when some class of S has two images; ``{}`` for an empty S.
    """
    k = real.num_classes
    if not len(images):
        return {}
    probs = logits.softmax(1)
    out = {"teacher_agreement": 100.0 * float((probs.argmax(1) == labels).float().mean()),
           "teacher_confidence": 100.0 * float(probs.max(1).values.mean())}
    div = pool_diversity(pool, images, labels, k)
    if div is not None:
        per_class = int(torch.bincount(labels, minlength=k).max())
        x_real, y_real = real.balanced_sample(per_class, torch.Generator().manual_seed(0))
        out["teacher_diversity"] = div
        out["teacher_diversity_real"] = pool_diversity(pool, x_real, y_real, k)
    return out
