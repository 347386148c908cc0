"""Fetchers that build networks from the initialization distribution p(theta_0).

The loop asks a fetcher for a network once per iteration and makes ``outer_loop`` updates of S with it; between
two of them it calls ``update``, which trains the network ``inner_loop`` epochs on the current S (SGD ``lr_net``,
no momentum, batch ``batch_train``, DSA when ``augment`` is set). With the defaults (1, 0) the network is used
for one update of S and never trained: DM, and DC/DSA at ipc 1. DC/DSA at larger ipc use the reference schedule
(Zhao et al. ICLR 2021, Algorithm 1 and ``utils.get_loops``), set by the method preset.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ddrun.data.augment import DSA
from ddrun.data.datasets import RealData
from ddrun.synthetic import SyntheticSet
from ddrun.train import train_epoch
from ddrun.utils import derive_seed


class RandomFetcher:
    """A fresh network from p(theta_0) every iteration, seeded by ``(seed, it)`` so runs repeat exactly.

    Args:
        net: factory ``(channels, num_classes, im_size) -> nn.Module`` (the ``net`` config, partial).
        real: the real dataset (for the input shape and class count).
        device: where the network lives.
        seed: the run's seed.
        outer_loop: updates of S per fetched network.
        inner_loop: epochs of training the network on S between two updates of S.
        lr_net: the inner SGD step size.
        batch_train: the inner minibatch size.
        augment: DSA applied while training on S (DSA method), or None.
    """

    def __init__(self, net: Callable[..., nn.Module], real: RealData, device: torch.device, seed: int,
                 outer_loop: int | None = 1, inner_loop: int | None = 0, lr_net: float = 0.01,
                 batch_train: int = 256, augment: DSA | None = None):
        self.net_factory, self.real, self.device, self.seed = net, real, device, seed
        self.outer_loop, self.inner_loop = outer_loop, inner_loop
        self.lr_net, self.batch_train, self.augment = lr_net, batch_train, augment

    def build(self, seed: int) -> nn.Module:
        """A network initialized from ``seed`` on the CPU (identical on every device), moved to the device."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = self.net_factory(channels=self.real.channels, num_classes=self.real.num_classes,
                                   im_size=self.real.im_size)
        return net.to(self.device)

    def fetch(self, it: int) -> nn.Module:
        return self.build(derive_seed(self.seed, 7919, it))

    def update(self, net: nn.Module, syn: SyntheticSet, real: RealData, generator: torch.Generator) -> nn.Module:
        if not self.inner_loop:
            return net
        net.requires_grad_(True)
        opt = torch.optim.SGD(net.parameters(), lr=self.lr_net)
        images, labels = syn.images.detach(), syn.labels.detach()
        for _ in range(self.inner_loop):
            train_epoch(net, images, labels, opt, self.batch_train, self.augment, generator)
        return net

    def release(self, net: nn.Module, syn: SyntheticSet, real: RealData, generator: torch.Generator) -> None:
        """Called once after the last update of S made with ``net`` (a no-op here; the model pool of FRePo
        trains the network one online step on S here, see ``ddrun.fetchers.pool``)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class FixedFetcher(RandomFetcher):
    """One network, drawn once from ``seed``, for the whole run (the fixed-initialization setting of
    Wang et al. 2018). ``update`` trains a *copy*, so every iteration starts from the same weights."""

    def fetch(self, it: int) -> nn.Module:
        return self.build(derive_seed(self.seed, 7919))
