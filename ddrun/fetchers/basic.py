"""Fetchers that draw networks from the initialization distribution p(theta_0)."""

from __future__ import annotations

from torch import nn

from ddrun.contracts import NET_SEED_TAG, Fetched, Fetcher
from ddrun.utils import derive_seed


class RandomFetcher(Fetcher):
    """A fresh network from p(theta_0) every iteration, built from ``(seed, NET_SEED_TAG, it)`` so runs repeat
    exactly (DM, DC, DSA, DD's unknown initialization, KIP/RFAD's random kernels are drawn by the objective).
    Args: as :class:`~ddrun.contracts.Fetcher`."""

    def fetch(self, it: int) -> Fetched:
        return Fetched(self.fresh(derive_seed(self.seed, NET_SEED_TAG, it)))


class FixedFetcher(Fetcher):
    """One network, drawn once from ``(seed, NET_SEED_TAG)``, for the whole run (the fixed-initialization setting
    of Wang et al. 2018, "known init"). Every iteration gets a new copy built from the same seed, so training it
    between updates of S never carries over; the held-out network of the replay protocol is that same theta_0."""

    def _theta0(self) -> nn.Module:
        return self.fresh(derive_seed(self.seed, NET_SEED_TAG))

    def fetch(self, it: int) -> Fetched:
        return Fetched(self._theta0())

    def held_out(self, r: int) -> nn.Module:
        return self._theta0()
