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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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

    def __call__(self, syn: SyntheticSet, real: RealData, fetched: Fetched, it: int,
                 generator: torch.Generator) -> torch.Tensor:
        net = fetched.net
        net.train()
        net.requires_grad_(True)
        params = [p for p in net.parameters() if self.layers == "all" or p.dim() > 2]
        loss = syn.images.new_zeros(())
        for c, r, s, idx in self.class_pairs(syn, real, generator):
            y_real = torch.full((len(r),), c, dtype=torch.long, device=r.device)
            g_real = torch.autograd.grad(F.cross_entropy(net(r), y_real), params)
            g_real = [g.detach() for g in g_real]
            g_syn = torch.autograd.grad(soft_cross_entropy(net(s), syn.labels[idx]), params, create_graph=True)
            loss = loss + match_loss(g_syn, g_real, self.metric)
        return loss
