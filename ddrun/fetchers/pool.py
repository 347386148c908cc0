"""The model pool of FRePo.

Zhou, Nezhadarya & Ba, "Dataset Distillation using Neural Feature Regression", NeurIPS 2022, Sec. 3.2 and
Algorithm 1 (yongchaoz/FRePo ``lib/datadistillation/frepo.py``): ``num_models`` networks, each trained online on
the current S, one step at a time, and re-initialized after ``max_online_updates`` steps. Member i starts with
its step counter at ``i * max_online_updates // num_models``, so resets are staggered and the pool always holds
networks at different stages of training. Every iteration uses one member drawn uniformly: the objective
regresses on its features, then (in :meth:`PoolFetcher.release`, after the update of S) the member takes one
online step on S, or is re-initialized when its counter has passed ``max_online_updates``.

Online training (reference ``create_train_state`` / ``train_step``): Adam at ``lr_net`` (3e-4), a random batch
of ``batch_train`` images of S (all of S when smaller), MSE against S's regression targets
(``SyntheticSet.regression_targets``; ``loss: ce``: soft cross-entropy on the labels as logits). The pool networks
are built by the ``net`` factory with ``net_kwargs`` (FRePo: BatchNorm, ``norm: batchnorm``).

The whole pool (weights, Adam states, counters, reset counts) is in :meth:`state_dict`, so a resumed run
continues with the same pool.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ddrun.contracts import Fetched, Fetcher
from ddrun.data.datasets import RealData
from ddrun.losses import soft_cross_entropy
from ddrun.synthetic import SyntheticSet
from ddrun.utils import ConfigError, derive_seed, host_to


class PoolFetcher(Fetcher):
    """FRePo's model pool (module doc).

    Args:
        net, real, device, seed: as :class:`~ddrun.contracts.Fetcher`.
        num_models: pool size.
        max_online_updates: online steps before a member is re-initialized.
        lr_net: Adam step size of the online training.
        batch_train: images of S per online step.
        net_kwargs: extra arguments of the ``net`` factory for pool members (e.g. ``{norm: batchnorm}``).
        loss: ``mse`` (the reference) or ``ce``.

    Raises:
        ConfigError: a non-positive size or an unknown loss.
    """

    def __init__(self, net: Callable[..., nn.Module], real: RealData, device: torch.device, seed: int,
                 num_models: int = 10, max_online_updates: int = 100, lr_net: float = 3e-4, batch_train: int = 1000,
                 net_kwargs: dict | None = None, loss: str = "mse"):
        super().__init__(net, real, device, seed)
        for key, val in (("num_models", num_models), ("max_online_updates", max_online_updates),
                         ("batch_train", batch_train)):
            if int(val) < 1:
                raise ConfigError(f"fetcher.{key}={val}: must be >= 1")
        if loss not in ("mse", "ce"):
            raise ConfigError(f"fetcher.loss={loss!r}: valid values are ['mse', 'ce']")
        self.num_models, self.max_online_updates = int(num_models), int(max_online_updates)
        self.lr_net, self.batch_train = float(lr_net), int(batch_train)
        self.net_kwargs, self.loss = dict(net_kwargs or {}), loss
        self.members = [self._new_member(i, 0, i * self.max_online_updates // self.num_models)
                        for i in range(self.num_models)]
        self.current = 0

    def fresh(self, seed: int, **net_kwargs) -> nn.Module:
        """A pool-architecture network (``net_kwargs`` applied) from ``seed``."""
        return super().fresh(seed, **{**self.net_kwargs, **net_kwargs})

    def _new_member(self, index: int, resets: int, step: int = 0) -> dict:
        net = self.fresh(derive_seed(self.seed, 6007, index, resets))
        return {"net": net, "opt": torch.optim.Adam(net.parameters(), lr=self.lr_net), "step": step,
                "resets": resets}

    def fetch(self, it: int) -> Fetched:
        """Member ``randint(num_models)`` drawn from ``(seed, it)``."""
        g = torch.Generator().manual_seed(derive_seed(self.seed, 6011, it))
        self.current = int(torch.randint(self.num_models, (1,), generator=g))
        return Fetched(self.members[self.current]["net"], info={"member": self.current})

    def release(self, fetched: Fetched, syn: SyntheticSet, real: RealData, generator: torch.Generator) -> None:
        """One online step of the current member on S, or its re-initialization past ``max_online_updates``."""
        m = self.members[self.current]
        if m["step"] > self.max_online_updates:
            self.members[self.current] = self._new_member(self.current, m["resets"] + 1)
            return
        images, labels = syn.images.detach(), syn.labels.detach()
        idx = None
        if len(images) > self.batch_train:
            idx = host_to(torch.randperm(len(images), generator=generator)[:self.batch_train], images.device)
            images, labels = images[idx], labels[idx]
        net = m["net"].train().requires_grad_(True)
        out = net(images)
        if self.loss == "ce":
            loss = soft_cross_entropy(out, labels)
        else:
            target = syn.regression_targets().detach()
            target = target if idx is None else target[idx]
            loss = ((out - target) ** 2).sum(1).mean()
        m["opt"].zero_grad(set_to_none=True)
        loss.backward()
        m["opt"].step()
        m["step"] += 1

    def state_dict(self) -> dict:
        return {"members": [{"net": m["net"].state_dict(), "opt": m["opt"].state_dict(), "step": m["step"],
                             "resets": m["resets"]} for m in self.members], "current": self.current}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        for i, ms in enumerate(state["members"]):
            m = self._new_member(i, int(ms["resets"]), int(ms["step"]))
            m["net"].load_state_dict(ms["net"])
            m["opt"].load_state_dict(ms["opt"])
            self.members[i] = m
        self.current = int(state["current"])
