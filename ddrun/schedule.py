"""The schedule of a method: how many updates of S per fetched network, and what trains the network in between.

Zhao, Mopuri & Bilen, "Dataset Condensation with Gradient Matching", ICLR 2021, Algorithm 1 (and the reference
``utils.get_loops``): for each network drawn from p(theta_0), S is updated ``outer_loop`` times; between two
updates the network is trained ``inner_loop`` epochs on the current S (SGD ``lr_net``, no momentum, minibatch
``batch_train``, per-sample DSA when ``augment`` is set: the DSA method). With the defaults (1, 0) every network
serves one update of S and is never trained: DM, MTT, DD, KIP, ... and DC/DSA at ipc 1 use (1, 1).

The method preset owns the schedule (``conf/schedule/default.yaml``, values per ipc in ``conf/method/dc.yaml``);
fetchers only answer "which network".
"""

from __future__ import annotations

import math

import torch

from ddrun.contracts import Fetched
from ddrun.data.augment import DSA
from ddrun.data.datasets import RealData
from ddrun.synthetic import SyntheticSet
from ddrun.train import train_epoch
from ddrun.utils import ConfigError, host_to


class Schedule:
    """``steps`` updates of S per fetched network; :meth:`between` trains the network between two of them.

    Args:
        outer_loop: updates of S per fetched network (>= 1).
        inner_loop: epochs of training the network on S between two updates (>= 0).
        lr_net: the inner SGD step size.
        batch_train: the inner minibatch size.
        augment: per-sample DSA while training on S, or None.

    Raises:
        ConfigError: a count out of range.
    """

    def __init__(self, outer_loop: int = 1, inner_loop: int = 0, lr_net: float = 0.01, batch_train: int = 256,
                 augment: DSA | None = None):
        if int(outer_loop) < 1:
            raise ConfigError(f"schedule.outer_loop={outer_loop}: must be >= 1 (updates of S per network)")
        if int(inner_loop) < 0:
            raise ConfigError(f"schedule.inner_loop={inner_loop}: must be >= 0 (epochs on S between updates)")
        if int(batch_train) < 1:
            raise ConfigError(f"schedule.batch_train={batch_train}: must be >= 1")
        if not float(lr_net) > 0:
            raise ConfigError(f"schedule.lr_net={lr_net}: must be > 0 (the network's SGD step size)")
        self.outer_loop, self.inner_loop = int(outer_loop), int(inner_loop)
        self.lr_net, self.batch_train, self.augment = float(lr_net), int(batch_train), augment

    @property
    def steps(self) -> int:
        """Updates of S per fetched network."""
        return self.outer_loop

    def between(self, fetched: Fetched, syn: SyntheticSet, real: RealData, generator: torch.Generator) -> Fetched:
        """Train ``fetched.net`` ``inner_loop`` epochs on S (detached) in place; returns ``fetched``."""
        if not self.inner_loop:
            return fetched
        net = fetched.net
        net.requires_grad_(True)
        opt = torch.optim.SGD(net.parameters(), lr=self.lr_net)
        images, labels = syn.images.detach(), syn.labels.detach()
        for _ in range(self.inner_loop):
            train_epoch(net, images, labels, opt, self.batch_train, self.augment, generator)
        return fetched


class RealDataSchedule(Schedule):
    """IDC's schedule: the network is trained on *real* data between updates of S.

    Kim et al., "Dataset Condensation via Efficient Synthetic-Data Parameterization", ICML 2022, Algorithm 1 (and
    the reference ``condense.py``): each fetched network serves ``outer_loop`` updates of S (the reference's
    ``inner_loop`` 100); between two of them it trains ``inner_loop`` epochs (the reference's ``net_epoch`` 1)
    over ``n_data`` random real training images (500; CIFAR-10 2000), SGD ``lr_net`` 0.01, momentum 0.9, weight
    decay 5e-4, minibatch ``batch_train`` 64, per-sample augmentation ``augment``. The SGD state (momentum) lives
    as long as the network. Not reproduced: the reference's CutMix on these batches.

    Args: as :class:`Schedule`, plus ``n_data``, ``momentum``, ``weight_decay``.

    Raises:
        ConfigError: a count out of range.
    """

    def __init__(self, outer_loop: int = 100, inner_loop: int = 1, lr_net: float = 0.01, batch_train: int = 64,
                 n_data: int = 500, momentum: float = 0.9, weight_decay: float = 5e-4, augment: DSA | None = None):
        super().__init__(outer_loop, inner_loop, lr_net, batch_train, augment)
        if int(n_data) < 1:
            raise ConfigError(f"schedule.n_data={n_data}: must be >= 1 (real images per network update)")
        self.n_data, self.momentum, self.weight_decay = int(n_data), float(momentum), float(weight_decay)
        self._net = self._opt = None

    def between(self, fetched: Fetched, syn: SyntheticSet, real: RealData, generator: torch.Generator) -> Fetched:
        """Train ``fetched.net`` ``inner_loop`` epochs over ``n_data`` random real images, in place."""
        net = fetched.net
        if net is not self._net:  # a new network: a new optimizer (its momentum belongs to that network)
            self._net = net
            self._opt = torch.optim.SGD(net.parameters(), lr=self.lr_net, momentum=self.momentum,
                                        weight_decay=self.weight_decay)
        net.requires_grad_(True)
        for _ in range(self.inner_loop):
            idx = host_to(torch.randperm(len(real.train_images), generator=generator)[:self.n_data], real.device)
            train_epoch(net, real.train_images[idx], real.train_labels[idx], self._opt, self.batch_train,
                        self.augment, generator)
        return fetched


def _number(key: str, value, whole: bool = False) -> float | int:
    """``syn_scheduler.<key>`` as a number (an int with ``whole``).

    Raises:
        ConfigError: ``value`` is not a number (a whole one with ``whole``), in one line naming the key.
    """
    what = "a whole number" if whole else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"syn_scheduler.{key}={value}: must be {what}")
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(f"syn_scheduler.{key}={value}: must be {what}") from None
    if not math.isfinite(number) or (whole and not number.is_integer()):
        raise ConfigError(f"syn_scheduler.{key}={value}: must be {what}")
    return int(number) if whole else number


def cosine_lr(optimizer: torch.optim.Optimizer, total: int, final: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine decay of every parameter group's step size from its initial value to ``final`` x that value over
    ``total`` scheduler steps (``torch.optim.lr_scheduler.LambdaLR``): factor ``final + (1 - final) (1 + cos(pi t /
    total)) / 2``, constant at ``final`` after ``total``. The ``syn_scheduler=cosine`` of the loop (EDC / SRe2L:
    cosine to 0 over the recover iterations; FRePo: to 0.1x).

    Raises:
        ConfigError: ``total`` not a whole number >= 1, or ``final`` not a number in [0, 1].
    """
    if _number("total", total, whole=True) < 1:
        raise ConfigError(f"syn_scheduler.total={total}: must be >= 1 (scheduler steps, one per iteration)")
    if not 0.0 <= _number("final", final) <= 1.0:
        raise ConfigError(f"syn_scheduler.final={final}: must be in [0, 1] (a fraction of the initial step size)")
    total, final = _number("total", total, whole=True), _number("final", final)

    def factor(t: int) -> float:
        return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * min(t, total) / total))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def step_lr(optimizer: torch.optim.Optimizer, step_size: int, gamma: float = 0.5) -> torch.optim.lr_scheduler.StepLR:
    """Step decay of every parameter group's step size: x ``gamma`` every ``step_size`` scheduler steps
    (``torch.optim.lr_scheduler.StepLR`` itself, so its state_dict in ``checkpoint.pt`` is StepLR's). The
    ``syn_scheduler=step`` of the loop (DD: x0.5 every 40 epochs of the real training set).

    Raises:
        ConfigError: ``step_size`` not a whole number >= 1 (0 divided by zero), or ``gamma`` not in (0, 1] (a
            negative factor turns the step size of S negative: gradient ascent; above 1 it grows without bound).
    """
    if _number("step_size", step_size, whole=True) < 1:
        raise ConfigError(f"syn_scheduler.step_size={step_size}: must be >= 1 (iterations between two decays)")
    if not 0.0 < _number("gamma", gamma) <= 1.0:
        raise ConfigError(f"syn_scheduler.gamma={gamma}: must be in (0, 1] (the factor of each decay; DD: 0.5)")
    step_size, gamma = _number("step_size", step_size, whole=True), _number("gamma", gamma)
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=gamma)
