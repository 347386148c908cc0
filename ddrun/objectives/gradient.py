"""Gradient matching: DC and DSA.

Zhao, Mopuri & Bilen, "Dataset Condensation with Gradient Matching", ICLR 2021, Eq. (10) and Algorithm 1: per
class, the distance between the gradient of the classification loss on a real batch and on the synthetic images
of that class, summed over classes and layers. The layer-wise distance (Eq. 11, ``metric='ours'``) reshapes each
weight gradient to ``[out, -1]`` and sums ``1 - cos`` over output units; 1-D parameters (biases, norm affine)
contribute 0. DSA (Zhao & Bilen, ICML 2021, Eq. 5) applies the same differentiable augmentation to the real and
the synthetic batch (``augment`` set).

Reference hyperparameters (``conf/method/dc.yaml`` / ``dsa.yaml``): lr_img 0.1 (SGD, momentum 0.5), lr_net 0.01,
batch_real 256 per class, 1000 iterations, (outer_loop, inner_loop) per ipc: 1 -> (1, 1), 10 -> (10, 50),
50 -> (50, 10).

IDC's matching (Kim et al., ICML 2022, Sec. 3.3; reference ``condense.py`` ``matchloss`` / ``dist``) is the same
loss with ``metric='l1'`` (sum of absolute differences; or ``mse``, sum of squares) over the convolution kernels
only (``layers='conv'``: the reference's ``bias=False, fc=False`` skip 1-D and 2-D gradients), ``conf/method/idc.yaml``.

Layout (``ddrun.speed``; the loss is the same up to float rounding, the DSA draws are the same): on a GPU the
per-class gradients of all classes come from one ``torch.func.vmap`` over classes of ``torch.func.grad`` (ten
classes of small kernels one after the other are launch-bound there); on the CPU the classes run one after the
other and each real gradient is accumulated over cache-sized chunks of its batch. Networks with BatchNorm in
training mode (batch-dependent) keep the per-class loop with whole batches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ddrun import speed
from ddrun.data.datasets import RealData
from ddrun.contracts import Fetched, Objective
from ddrun.synthetic import SyntheticSet
from ddrun.losses import soft_cross_entropy
from ddrun.utils import ConfigError

METRICS = ("ours", "mse", "cos", "l1")
LAYERS = ("all", "conv")


def layer_distance(gs: torch.Tensor, gr: torch.Tensor) -> torch.Tensor:
    """Eq. (11) of DC for one layer: ``sum_i (1 - cos(gs_i, gr_i))`` over output units i; 0 for 1-D tensors."""
    if gs.dim() == 1:
        return gs.new_zeros(())
    gs, gr = gs.reshape(gs.shape[0], -1), gr.reshape(gr.shape[0], -1)
    return (1 - (gs * gr).sum(-1) / (gs.norm(dim=-1) * gr.norm(dim=-1) + 1e-6)).sum()


def match_loss(g_syn: list[torch.Tensor], g_real: list[torch.Tensor], metric: str = "ours") -> torch.Tensor:
    """Distance between two lists of per-parameter gradients.

    ``ours``: sum of :func:`layer_distance`; ``mse``: squared distance of the flattened gradients; ``l1``: their
    absolute distance (IDC); ``cos``: 1 - cosine of the flattened gradients.
    """
    if metric == "ours":
        return sum(layer_distance(s, r) for s, r in zip(g_syn, g_real))
    gs = torch.cat([g.flatten() for g in g_syn])
    gr = torch.cat([g.flatten() for g in g_real])
    if metric == "mse":
        return ((gs - gr) ** 2).sum()
    if metric == "l1":
        return (gs - gr).abs().sum()
    return 1 - (gs * gr).sum() / (gs.norm() * gr.norm() + 1e-6)


def match_loss_classes(g_syn: list[torch.Tensor], g_real: list[torch.Tensor], metric: str = "ours") -> torch.Tensor:
    """:func:`match_loss` summed over classes, for gradients stacked by class: each tensor ``[K, *param_shape]``
    (the per-class gradients of one parameter). The same value as ``sum_c match_loss(g_syn[:, c], g_real[:, c])``
    up to float rounding."""
    if metric == "ours":
        total = g_syn[0].new_zeros(())
        for gs, gr in zip(g_syn, g_real):
            if gs.dim() <= 2:  # a 1-D parameter (bias, norm affine): distance 0
                continue
            gs, gr = gs.reshape(gs.shape[0], gs.shape[1], -1), gr.reshape(gr.shape[0], gr.shape[1], -1)
            total = total + (1 - (gs * gr).sum(-1) / (gs.norm(dim=-1) * gr.norm(dim=-1) + 1e-6)).sum()
        return total
    gs = torch.cat([g.reshape(g.shape[0], -1) for g in g_syn], 1)
    gr = torch.cat([g.reshape(g.shape[0], -1) for g in g_real], 1)
    if metric == "mse":
        return ((gs - gr) ** 2).sum()
    if metric == "l1":
        return (gs - gr).abs().sum()
    return (1 - (gs * gr).sum(1) / (gs.norm(dim=1) * gr.norm(dim=1) + 1e-6)).sum()


def real_gradient(net: nn.Module, params: list[torch.Tensor], x: torch.Tensor, c: int) -> list[torch.Tensor]:
    """The gradient of the mean cross-entropy of ``x`` (all of class ``c``) w.r.t. ``params``, detached; on the CPU
    accumulated over :func:`ddrun.speed.chunk_size` chunks when ``net`` is batch-independent."""
    y = torch.full((len(x),), c, dtype=torch.long, device=x.device)
    n = speed.chunk_size(x)
    if n is None or n >= len(x) or not speed.batch_independent(net):
        return [g.detach() for g in torch.autograd.grad(F.cross_entropy(net(x), y), params)]
    total = None
    for xc, yc in zip(x.split(n), y.split(n)):
        gs = torch.autograd.grad(F.cross_entropy(net(xc), yc, reduction="sum") / len(x), params)
        total = list(gs) if total is None else [t + g for t, g in zip(total, gs)]
    return [g.detach() for g in total]


class GradientMatching(Objective):
    """DC / DSA / IDC loss (module doc).

    Args:
        metric: ``ours`` (DC's layer-wise distance), ``mse``, ``l1``, ``cos``.
        layers: ``all`` parameters, or ``conv``: only the convolution kernels (tensors of 3 or more dimensions,
            IDC).

    Raises:
        ConfigError: unknown metric or layers.
    """

    def __init__(self, metric: str = "ours", layers: str = "all", **kwargs):
        super().__init__(**kwargs)
        if metric not in METRICS:
            raise ConfigError(f"objective.metric={metric!r}: valid values are {list(METRICS)}")
        if layers not in LAYERS:
            raise ConfigError(f"objective.layers={layers!r}: valid values are {list(LAYERS)}")
        self.metric, self.layers = metric, layers

    def matched(self, net: nn.Module) -> list[str]:
        """Names of the parameters whose gradients are matched: all, or with ``layers='conv'`` the convolution
        kernels only (tensors of 3 or more dimensions, IDC)."""
        return [k for k, p in net.named_parameters() if self.layers == "all" or p.dim() > 2]

    def __call__(self, syn: SyntheticSet, real: RealData, fetched: Fetched, it: int,
                 generator: torch.Generator) -> torch.Tensor:
        net = fetched.net
        net.train()
        net.requires_grad_(True)
        pairs = list(self.class_pairs(syn, real, generator))  # every draw of the iteration, in the usual order
        if speed.classes_batched(net, syn.images.device) and len({(len(r), len(s)) for _, r, s, _ in pairs}) == 1:
            return self.batched_loss(net, syn, pairs)
        named = dict(net.named_parameters())
        params = [named[k] for k in self.matched(net)]
        loss = syn.images.new_zeros(())
        for c, r, s, idx in pairs:
            g_real = real_gradient(net, params, r, c)
            g_syn = torch.autograd.grad(soft_cross_entropy(net(s), syn.labels[idx]), params, create_graph=True)
            loss = loss + match_loss(g_syn, g_real, self.metric)
        return loss

    def batched_loss(self, net: nn.Module, syn: SyntheticSet, pairs: list) -> torch.Tensor:
        """The loss of :meth:`__call__` with every class at once: ``vmap`` over classes of the per-class gradient
        (``pairs``: ``(c, real_c, syn_c, syn_idx)`` from :meth:`class_pairs`, equal sizes for every class)."""
        params, buffers = dict(net.named_parameters()), dict(net.named_buffers())

        def class_loss(p, x, y):
            return soft_cross_entropy(functional_call(net, (p, buffers), (x,)), y)

        per_class = torch.func.vmap(torch.func.grad(class_loss), in_dims=(None, 0, 0))
        x_real = torch.stack([r for _, r, _, _ in pairs])
        y_real = torch.tensor([c for c, *_ in pairs], device=x_real.device).view(-1, 1).expand(-1, x_real.shape[1])
        with torch.no_grad():
            g_real = per_class({k: v.detach() for k, v in params.items()}, x_real, y_real)
        g_syn = per_class(params, torch.stack([s for _, _, s, _ in pairs]),
                          torch.stack([syn.labels[idx] for *_, idx in pairs]))
        keys = self.matched(net)
        return match_loss_classes([g_syn[k] for k in keys], [g_real[k] for k in keys], self.metric)
