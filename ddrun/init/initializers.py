"""Initializations of the synthetic set S (``conf/init/*.yaml``).

Every initializer has the signature ``(real: RealData, ipc: int, generator: torch.Generator, **options) ->
SyntheticSet`` and returns ``ipc`` images per class, ordered class by class, with hard labels.
"""

from __future__ import annotations

from typing import Callable

import torch

from ddrun.data.datasets import RealData
from ddrun.synthetic import SyntheticSet
from ddrun.train import embed, train_epoch


def _labels(real: RealData, ipc: int) -> torch.Tensor:
    return torch.arange(real.num_classes).repeat_interleave(ipc)


def noise(real: RealData, ipc: int, generator: torch.Generator, std: float = 1.0) -> SyntheticSet:
    """Gaussian noise N(0, std^2) in the normalized image space (the DC reference's ``--init noise``)."""
    k, c, (h, w) = real.num_classes, real.channels, real.im_size
    images = torch.randn(k * ipc, c, h, w, generator=generator) * std
    return SyntheticSet(images, _labels(real, ipc), k)


def real(real: RealData, ipc: int, generator: torch.Generator) -> SyntheticSet:
    """``ipc`` random real training images per class (the reference's ``--init real``; with ``iterations=0``
    this is the random-subset baseline)."""
    images = torch.cat([real.sample_class(c, ipc, generator).cpu() for c in range(real.num_classes)])
    return SyntheticSet(images, _labels(real, ipc), real.num_classes)


def kcenter_greedy(features: torch.Tensor, k: int, first: int) -> list[int]:
    """Greedy K-Center (Sener & Savarese, "Active Learning for Convolutional Neural Networks: A Core-Set
    Approach", ICLR 2018, Algorithm 1): starting from ``first``, repeatedly add the point whose distance to its
    nearest chosen center is largest.

    Args:
        features: float ``[N, D]``.
        k: number of centers (``k <= N``).
        first: index of the first center.

    Returns:
        ``k`` distinct indices into ``features``, in the order chosen.
    """
    chosen = [int(first)]
    dist = torch.cdist(features, features[first:first + 1]).flatten()
    for _ in range(k - 1):
        nxt = int(dist.argmax())
        chosen.append(nxt)
        dist = torch.minimum(dist, torch.cdist(features, features[nxt:nxt + 1]).flatten())
    return chosen


def herding_select(features: torch.Tensor, k: int) -> list[int]:
    """Herding (Welling, "Herding Dynamical Weights to Learn", ICML 2009), in its greedy mean-matching form on
    embeddings (kernel herding with a linear kernel, Chen et al. UAI 2010; iCaRL's exemplar selection, Rebuffi et
    al. CVPR 2017, Algorithm 4), without replacement: the t-th pick is the sample that brings the mean of the t picks
    closest to the mean ``mu`` of all of them, i.e. ``argmin_x || t*mu - sum_{j<t} phi(p_j) - phi(x) ||``.

    Args:
        features: float ``[N, D]`` embeddings phi(x).
        k: number of picks (``k <= N``).

    Returns:
        ``k`` distinct indices into ``features``, in the order picked.
    """
    mu = features.mean(0)
    total = torch.zeros_like(mu)
    free = torch.ones(len(features), dtype=torch.bool, device=features.device)
    chosen = []
    for t in range(1, k + 1):
        dist = (features - (t * mu - total)).norm(dim=1).masked_fill(~free, float("inf"))
        i = int(dist.argmin())
        chosen.append(i)
        free[i] = False
        total = total + features[i]
    return chosen


def _per_class_selection(real: RealData, ipc: int, generator: torch.Generator, net: Callable[..., torch.nn.Module],
                         train_epochs: int, lr: float, batch_size: int, max_candidates: int,
                         select: Callable[[torch.Tensor, int], list[int]]) -> SyntheticSet:
    """The coreset baselines' shared part: embed at most ``max_candidates`` random training images of each class
    with a network built from ``net`` and trained ``train_epochs`` epochs on the real training set (SGD ``lr``,
    momentum 0.9, weight decay 5e-4; 0 epochs: randomly initialized), and keep ``select(features, ipc)`` of them."""
    device = real.device
    model = net(channels=real.channels, num_classes=real.num_classes, im_size=real.im_size).to(device)
    if train_epochs > 0:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
        for _ in range(train_epochs):
            train_epoch(model, real.train_images, real.train_labels, opt, batch_size, generator=generator)
    picks = []
    for c in range(real.num_classes):
        cand = real.sample_class(c, max_candidates, generator)
        feats = embed(model, cand).float()
        idx = select(feats, min(ipc, len(cand)))
        picks.append(cand[idx].cpu())
    return SyntheticSet(torch.cat(picks), _labels(real, ipc), real.num_classes)


def kcenter(real: RealData, ipc: int, generator: torch.Generator, net: Callable[..., torch.nn.Module],
            train_epochs: int = 1, lr: float = 0.01, batch_size: int = 256,
            max_candidates: int = 5000) -> SyntheticSet:
    """Per class, greedy K-Center (:func:`kcenter_greedy`) on the embeddings of a network.

    The embedding network is built from ``net`` (the ``net`` config) and first trained ``train_epochs`` epochs on
    the real training set (SGD lr ``lr``, momentum 0.9); 0 uses the randomly initialized network. The first
    center of each class is the sample nearest to the class mean embedding; at most ``max_candidates`` random
    samples per class are considered.
    """
    def select(feats: torch.Tensor, k: int) -> list[int]:
        first = int(torch.cdist(feats, feats.mean(0, keepdim=True)).argmin())
        return kcenter_greedy(feats, k, first)

    return _per_class_selection(real, ipc, generator, net, train_epochs, lr, batch_size, max_candidates, select)


def herding(real: RealData, ipc: int, generator: torch.Generator, net: Callable[..., torch.nn.Module],
            train_epochs: int = 1, lr: float = 0.01, batch_size: int = 256,
            max_candidates: int = 5000) -> SyntheticSet:
    """Per class, herding (:func:`herding_select`) on the embeddings of a network trained as for :func:`kcenter`
    (the Herding baseline of the dataset-condensation papers, e.g. Zhao et al. ICLR 2021, Table 1). Returns ``ipc``
    real images per class, class by class, hard labels."""
    return _per_class_selection(real, ipc, generator, net, train_epochs, lr, batch_size, max_candidates,
                                herding_select)
