"""Plain network training and testing, shared by the evaluator, the fetchers, K-Center and ``ddrun buffer``."""

from __future__ import annotations

import torch
from torch import nn

from ddrun.data.augment import DSA
from ddrun.losses import soft_cross_entropy


def train_epoch(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, optimizer: torch.optim.Optimizer,
                batch_size: int = 256, augment: DSA | None = None, generator: torch.Generator | None = None) -> float:
    """One epoch of minibatch training on ``(images, labels)`` in a shuffled order; returns the mean loss.

    ``images`` float ``[N, C, H, W]``; ``labels`` int64 ``[N]`` or soft logits ``[N, K]``. ``augment`` (DSA) is
    applied per sample (non-Siamese), as in the DC/DSA evaluation. ``generator`` (CPU) drives the shuffle and
    the augmentation draws.
    """
    net.train()
    n = len(images)
    order = torch.randperm(n, generator=generator).to(images.device)
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
    """Top-1 accuracy (fraction in [0, 1]) of ``net`` on ``(images, labels)`` in eval mode."""
    net.eval()
    correct = 0
    for start in range(0, len(images), batch_size):
        correct += int((net(images[start:start + batch_size]).argmax(1) == labels[start:start + batch_size]).sum())
    return correct / max(len(images), 1)


@torch.no_grad()
def embed(net: nn.Module, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """``net.embed`` of ``images`` in batches, eval mode: float ``[N, D]``."""
    net.eval()
    return torch.cat([net.embed(images[s:s + batch_size]) for s in range(0, len(images), batch_size)])
