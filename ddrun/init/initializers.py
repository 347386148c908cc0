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
from ddrun.utils import ConfigError


def _labels(real: RealData, ipc: int) -> torch.Tensor:
    return torch.arange(real.num_classes).repeat_interleave(ipc)


def check_class_sizes(real: RealData, ipc: int, max_candidates: int | None = None) -> None:
    """Refuse an ``ipc`` that some class cannot fill with distinct real images (else S would hold fewer images
    than labels), and ``init.max_candidates`` below ``ipc``.

    Raises:
        ConfigError: one line naming the smallest class, its size and the largest ipc it allows."""
    if max_candidates is not None and max_candidates < ipc:
        raise ConfigError(f"init.max_candidates={max_candidates} is fewer than ipc={ipc}: the selection keeps ipc "
                          f"of a class's candidates; raise it to >= {ipc}")
    sizes = [len(real.class_index(c)) for c in range(real.num_classes)]
    small = min(range(len(sizes)), key=sizes.__getitem__)
    if sizes[small] < ipc:
        raise ConfigError(f"ipc={ipc}: class {small} of {real.name} has only {sizes[small]} training images, "
                          f"fewer than ipc; pass ipc <= {sizes[small]} (or init=noise)")


def noise(real: RealData, ipc: int, generator: torch.Generator, std: float = 1.0) -> SyntheticSet:
    """Gaussian noise N(0, std^2) in the normalized image space (the DC reference's ``--init noise``)."""
    k, c, (h, w) = real.num_classes, real.channels, real.im_size
    images = torch.randn(k * ipc, c, h, w, generator=generator) * std
    return SyntheticSet(images, _labels(real, ipc), k)


def real(real: RealData, ipc: int, generator: torch.Generator) -> SyntheticSet:
    """``ipc`` random real training images per class (the reference's ``--init real``; with ``iterations=0``
    this is the random-subset baseline).

    Raises:
        ConfigError: a class has fewer than ``ipc`` training images (:func:`check_class_sizes`)."""
    check_class_sizes(real, ipc)
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
    momentum 0.9, weight decay 5e-4; 0 epochs: randomly initialized), and keep ``select(features, ipc)`` of them.
    Raises ConfigError as :func:`check_class_sizes`, and for ``train_epochs < 0``."""
    check_class_sizes(real, ipc, max_candidates)
    if train_epochs < 0:
        raise ConfigError(f"init.train_epochs={train_epochs}: must be >= 0 (0: a randomly initialized network)")
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
        idx = select(feats, ipc)
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


def adapt_images(images: torch.Tensor, source: RealData, target: RealData) -> torch.Tensor:
    """Images of ``source`` (its normalized space) in ``target``'s form: mapped to pixels, resized to the target's
    image size (bilinear, antialiased), channels repeated (1 -> 3) or averaged (3 -> 1), then normalized (and
    layer-normalized / ZCA-whitened when the target is: ``RealData.encode``) as the target's images. Returns
    float ``[N, C_target, H_target, W_target]``.

    Raises:
        ConfigError: channel counts other than equal, 1 -> C or C -> 1.
    """
    from ddrun.utils import ConfigError

    x = source.to_pixels(images.float())
    if tuple(x.shape[2:]) != tuple(target.im_size):
        x = torch.nn.functional.interpolate(x, size=tuple(target.im_size), mode="bilinear", antialias=True,
                                            align_corners=False).clamp(0, 1)
    c_in, c_out = x.shape[1], target.channels
    if c_in != c_out:
        if c_in == 1:
            x = x.repeat(1, c_out, 1, 1)
        elif c_out == 1:
            x = x.mean(1, keepdim=True)
        else:
            raise ConfigError(f"cannot map {c_in}-channel images of {source.name} to {c_out} channels of {target.name}")
    mean = torch.tensor(target.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(target.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return target.encode((x - mean) / std)


def base_images(real: RealData, ipc: int, generator: torch.Generator, base: RealData,
                balanced: bool = True) -> SyntheticSet:
    """Base images from a second dataset for labels learned on ``real`` (label distillation across datasets,
    Bohdal, Yang & Hospedales, "Flexible Dataset Distillation: Learn Labels Instead of Images", 2020, Sec. 3.3 /
    4.3: e.g. EMNIST letters labelled for MNIST): ``ipc x K`` random training images of ``base`` (balanced over
    ``base``'s own classes when ``balanced``; the reference's cross-dataset runs draw them at random), adapted
    to ``real``'s image size, channels and normalization (:func:`adapt_images`).

    The returned labels are placeholders, ``ipc`` per class of ``real`` in order (the objective learns the real
    labels, ``objective.learn_labels=true``, from uniform ones, ``objective.label_init=uniform``).
    """
    k, n, dataset = real.num_classes, ipc * real.num_classes, base
    if balanced:
        per = [n // dataset.num_classes + (c < n % dataset.num_classes) for c in range(dataset.num_classes)]
        picks = torch.cat([dataset.sample_class(c, m, generator).cpu() for c, m in enumerate(per) if m])
        picks = picks[torch.randperm(len(picks), generator=generator)]
    else:
        picks = dataset.train_images[torch.randperm(len(dataset.train_images), generator=generator)[:n]].cpu()
    if len(picks) < n:
        from ddrun.utils import DataError

        raise DataError(f"the base dataset {dataset.name} has {len(picks)} training images, fewer than ipc x K = {n}")
    return SyntheticSet(adapt_images(picks, dataset, real), _labels(real, ipc), k,
                        meta={"base_dataset": dataset.name})
