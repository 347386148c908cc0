"""Plain network training and testing, shared by the evaluator, the fetchers, K-Center and ``ddrun buffer``."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ddrun import speed
from ddrun.data.augment import DSA
from ddrun.losses import soft_cross_entropy
from ddrun.utils import host_to


def train_epoch(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, optimizer: torch.optim.Optimizer,
                batch_size: int = 256, augment: DSA | None = None, generator: torch.Generator | None = None) -> float:
    """One epoch of minibatch training on ``(images, labels)`` in a shuffled order; returns the mean loss.

    ``images`` float ``[N, C, H, W]``; ``labels`` int64 ``[N]`` or soft logits ``[N, K]``. ``augment`` (DSA) is
    applied per sample (non-Siamese), as in the DC/DSA evaluation. ``generator`` (CPU) drives the shuffle and
    the augmentation draws.
    """
    net.train()
    n = len(images)
    order = host_to(torch.randperm(n, generator=generator), images.device)
    total = 0.0
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        x, y = images[idx], labels[idx]
        if augment is not None:
            x = augment(x, generator)
        loss = soft_cross_entropy(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(idx)
    return total / max(n, 1)


@torch.no_grad()
def accuracy(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1024) -> float:
    """Top-1 accuracy (fraction in [0, 1]) of ``net`` on ``(images, labels)`` in eval mode (batches of
    ``batch_size``, or of :func:`ddrun.speed.chunk_size` on the CPU: in eval mode every output is per sample)."""
    net.eval()
    batch_size = speed.chunk_size(images) or batch_size
    correct = 0
    for start in range(0, len(images), batch_size):
        correct += int((net(images[start:start + batch_size]).argmax(1) == labels[start:start + batch_size]).sum())
    return correct / max(len(images), 1)


@torch.no_grad()
def embed(net: nn.Module, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """``net.embed`` of ``images`` in batches, eval mode: float ``[N, D]``."""
    net.eval()
    return torch.cat([net.embed(images[s:s + batch_size]) for s in range(0, len(images), batch_size)])


class Ensemble:
    """Networks of one architecture trained together as one stacked model (``torch.func.stack_module_state`` +
    ``functional_call`` under ``vmap``): member ``e`` keeps its own parameters, buffers (BatchNorm running
    statistics included), batches and augmentation draws, so it trains as it would alone, up to float rounding
    (a vmapped convolution is a grouped one, with another summation order).

    Args:
        nets: the members, identical architectures (e.g. ``build_net`` with different seeds), on one device.

    Attributes:
        params: ``{name: float [E, *shape]}`` leaf tensors (what an optimizer steps).
        buffers: ``{name: [E, *shape]}``.
    """

    def __init__(self, nets: list[nn.Module]):
        import copy

        from torch.func import stack_module_state

        self.size = len(nets)
        self.params, self.buffers = stack_module_state(nets)
        self.compiled = speed.current().compile
        self.base, self._loss, self._forward = _stacked_fns(copy.deepcopy(nets[0]).to("meta"), self.compiled)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Sum over members of each member's mean loss on its own batch: ``x`` float ``[E, B, C, H, W]``, ``y``
        int64 ``[E, B]`` or soft logits ``[E, B, K]`` (the gradient of member e's parameters is that of its loss).
        Under ``speed.compile`` the vmapped forward and backward are one ``torch.compile``d function (fused
        normalization, activation and pooling kernels), compiled once per architecture and process."""
        self.base.train()
        return self._loss(self.params, self.buffers, x, y)

    @torch.no_grad()
    def accuracy(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1024) -> list[float]:
        """Top-1 accuracy (fraction) of each member on ``(images, labels)`` in eval mode (one shared batch per
        step, ``batch_size // E`` images, so the activations match the sequential evaluation's). Compiled
        (``speed.compile``), the last batch is padded with zeros to the others' size (one shape, one compilation;
        the padding's predictions are dropped)."""
        self.base.eval()
        correct = torch.zeros(self.size, dtype=torch.long, device=images.device)
        step = max(1, batch_size // self.size)
        for start in range(0, len(images), step):
            x = images[start:start + step]
            n = len(x)
            if self.compiled and n < step:
                x = torch.cat([x, x.new_zeros(step - n, *x.shape[1:])])
            pred = self._forward(self.params, self.buffers, x)[:, :n].argmax(-1)
            correct += (pred == labels[start:start + step]).sum(-1)
        return [int(c) / max(len(images), 1) for c in correct]


_COMPILED: dict[str, tuple[nn.Module, Callable, Callable]] = {}


def _stacked_fns(base: nn.Module, compile: bool) -> tuple[nn.Module, Callable, Callable]:
    """``(base, loss, forward)`` of an :class:`Ensemble`: ``loss(params, buffers, x, y)`` the sum over members of
    ``soft_cross_entropy`` of ``functional_call(base, ...)`` under ``vmap`` (``x`` ``[E, B, ...]``), and
    ``forward(params, buffers, x)`` every member's logits ``[E, B, K]`` on one shared batch ``x`` ``[B, ...]``.
    With ``compile`` both are ``torch.compile``d and kept per architecture (the meta module's class, its plain
    attributes and its ``repr``), with the ``base`` they close over, so every evaluation of a run reuses one
    compilation."""
    from torch.func import functional_call

    plain = {k: v for k, v in vars(base).items() if k != "training" and isinstance(v, (bool, int, float, str, tuple))}
    key = f"{type(base).__module__}.{type(base).__qualname__} {sorted(plain.items())} {base!r}"
    if compile and key in _COMPILED:
        return _COMPILED[key]

    def loss(params, buffers, x, y):
        per_member = torch.func.vmap(lambda p, b, xe, ye: soft_cross_entropy(functional_call(base, (p, b), (xe,)), ye))
        return per_member(params, buffers, x, y).sum()

    def forward(params, buffers, x):
        return torch.func.vmap(lambda p, b: functional_call(base, (p, b), (x,)))(params, buffers)

    if not compile:
        return base, loss, forward
    _COMPILED[key] = (base, torch.compile(loss), torch.compile(forward))
    return _COMPILED[key]


def train_epoch_ensemble(ens: Ensemble, images: torch.Tensor, labels: torch.Tensor,
                         optimizer: torch.optim.Optimizer, generators: list[torch.Generator], batch_size: int = 256,
                         augment: DSA | None = None) -> None:
    """One epoch of :func:`train_epoch` for every member of ``ens`` at once: member e shuffles and augments with
    ``generators[e]`` exactly as :func:`train_epoch` would with that generator, so each member sees the batches
    and DSA draws of its sequential run."""
    n = len(images)
    orders = [host_to(torch.randperm(n, generator=g), images.device) for g in generators]
    for start in range(0, n, batch_size):
        xs, ys = [], []
        for order, g in zip(orders, generators):
            idx = order[start:start + batch_size]
            x = images[idx]
            xs.append(augment(x, g) if augment is not None else x)
            ys.append(labels[idx])
        loss = ens.loss(torch.stack(xs), torch.stack(ys))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
