"""Distribution matching (DM).

Zhao & Bilen, "Dataset Condensation with Distribution Matching", WACV 2023, Eq. (4): for a network psi sampled
from p(theta_0) each iteration (parameters frozen), minimize over S

    sum_c || mean_{x in T_c} psi(A(x, w)) - mean_{s in S_c} psi(A(s, w)) ||^2

where psi is the embedding before the classifier and A is Siamese DSA (the same draw w for the real and the
synthetic batch of a class). Reference hyperparameters (``conf/method/dm.yaml``): lr_img 1 (SGD, momentum 0.5),
batch_real 256 per class, 20000 iterations, init real.

Layout (``ddrun.speed``, the value is the same up to float rounding): the real images of all classes are embedded
as one batch on a GPU and in cache-sized chunks on the CPU (networks whose per-sample output does not depend on
the batch, i.e. without BatchNorm in training mode; with BatchNorm the whole batch, as before), in the
channels-last layout when ``speed.channels_last``.
"""

from __future__ import annotations

import torch

from ddrun import speed
from ddrun.data.datasets import RealData
from ddrun.contracts import Fetched, Objective
from ddrun.synthetic import SyntheticSet


class DistributionMatching(Objective):
    """DM loss (module doc). Returns a float32 scalar; gradients reach ``syn.images`` only."""

    def __call__(self, syn: SyntheticSet, real: RealData, fetched: Fetched, it: int,
                 generator: torch.Generator) -> torch.Tensor:
        net = fetched.net
        net.train()
        net.requires_grad_(False)
        speed.layout(net)
        reals, syns, counts = [], [], []
        for _, r, s, _ in self.class_pairs(syn, real, generator):
            reals.append(r)
            syns.append(s)
            counts.append((len(r), len(s)))
        with torch.no_grad():
            emb_real = speed.chunked(net.embed, torch.cat(reals), net).split([n for n, _ in counts])
        emb_syn = speed.chunked(net.embed, torch.cat(syns), net).split([n for _, n in counts])
        loss = sum(((er.mean(0) - es.mean(0)) ** 2).sum() for er, es in zip(emb_real, emb_syn))
        return loss
