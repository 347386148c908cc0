"""Functional views of ``nn.Module`` networks for unrolled inner loops (``torch.func``).

One network definition (``ddrun.nets``) serves plain training, unrolled meta-learning (DD), trajectory matching
(MTT) and kernels: the inner loops run ``torch.func.functional_call(net, params, x)`` on a dict of parameter
tensors, so the result stays differentiable with respect to the synthetic images, labels, learned step size and
starting parameters.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn
from torch.func import functional_call

from ddrun.data.augment import DSA
from ddrun.train import soft_cross_entropy

Params = dict[str, torch.Tensor]


def params_of(net: nn.Module, requires_grad: bool = False) -> Params:
    """A detached copy of ``net``'s parameters as an ordered ``{name: tensor}`` dict."""
    return {k: v.detach().clone().requires_grad_(requires_grad) for k, v in net.named_parameters()}


def flatten(params: Params) -> torch.Tensor:
    """Concatenate a parameter dict into one float vector ``[P]`` (in the dict's order)."""
    return torch.cat([p.reshape(-1) for p in params.values()])


def unflatten(flat: torch.Tensor, like: Params | nn.Module) -> Params:
    """Split a vector ``[P]`` back into a dict shaped like ``like`` (a parameter dict or a network)."""
    shapes = {k: v.shape for k, v in (like.named_parameters() if isinstance(like, nn.Module) else like.items())}
    out, i = {}, 0
    for k, s in shapes.items():
        n = s.numel()
        out[k] = flat[i:i + n].view(s)
        i += n
    if i != flat.numel():
        raise ValueError(f"vector has {flat.numel()} entries, the network {i}")
    return out


def forward(net: nn.Module, params: Params, x: torch.Tensor) -> torch.Tensor:
    """``net(x)`` with ``params`` in place of the network's own parameters (buffers stay the network's)."""
    return functional_call(net, params, (x,))


def minibatches(n: int, batch_size: int | None, steps: int, generator: torch.Generator | None) -> Iterator[torch.Tensor]:
    """``steps`` index batches over ``n`` items: a fresh random permutation each pass, cut into ``batch_size``
    chunks (all ``n`` when None), as MTT's ``batch_syn`` (Cazenavette et al. 2022, ``distill.py``)."""
    b = n if not batch_size else min(batch_size, n)
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        if len(order) < b:
            order = torch.cat([order, torch.randperm(n, generator=generator)])
        idx, order = order[:b], order[b:]
        yield idx


def sgd_step(net: nn.Module, params: Params, x: torch.Tensor, y: torch.Tensor, lr: torch.Tensor | float,
             create_graph: bool = True) -> Params:
    """One plain SGD step ``theta - lr * grad l(theta; x, y)`` (soft or hard labels), differentiable w.r.t.
    ``params``, ``x``, ``y`` and ``lr`` when ``create_graph``."""
    params = {k: p if p.requires_grad else p.detach().requires_grad_(True) for k, p in params.items()}
    loss = soft_cross_entropy(forward(net, params, x), y)
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph)
    return {k: p - lr * g for (k, p), g in zip(params.items(), grads)}


def unroll_sgd(net: nn.Module, params: Params, images: torch.Tensor, labels: torch.Tensor,
               lr: torch.Tensor | float, steps: int, batch_size: int | None = None, augment: DSA | None = None,
               generator: torch.Generator | None = None, create_graph: bool = True) -> Params:
    """``steps`` SGD steps from ``params`` on minibatches of ``(images, labels)`` (see :func:`minibatches`),
    each minibatch passed through per-sample DSA when ``augment`` is set. Returns the final parameters, whose
    graph reaches ``images``, ``labels``, ``lr`` and the starting ``params`` (memory grows with ``steps``)."""
    for idx in minibatches(len(images), batch_size, steps, generator):
        idx = idx.to(images.device)
        x = images[idx]
        if augment is not None and augment.enabled:
            x = augment(x, generator)
        params = sgd_step(net, params, x, labels[idx], lr, create_graph)
    return params
