"""The evaluator: train fresh networks only on S, test them on the real test split.

The protocol is the DC / DSA / DM / MTT reference's ``evaluate_synset`` (Zhao et al. ICLR 2021, Sec. 4;
Zhao & Bilen ICML 2021): ``num_eval`` networks, each trained ``epochs`` epochs on S with SGD (momentum 0.9,
weight decay 5e-4, step size ``lr``, multiplied by 0.1 once half-way), minibatch 256, DSA applied per sample,
then tested on the whole real test split. When S carries a learned step size (MTT, DD) and ``use_learned_lr``
is set, that step size replaces ``lr``; soft labels are trained with soft cross-entropy.
"""

from __future__ import annotations

import statistics
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ddrun.data.augment import DSA
from ddrun.data.datasets import RealData
from ddrun.synthetic import SyntheticSet
from ddrun.train import accuracy, train_epoch
from ddrun.utils import derive_seed


class Evaluator:
    """Trains ``num_eval`` fresh ``net`` on S and reports test accuracy (percent).

    Args:
        net: factory ``(channels, num_classes, im_size) -> nn.Module``.
        num_eval: networks trained (different seeds ``(seed, r)``: the same for every S of a run and across runs
            with the same ``seed``).
        epochs: training epochs of each network on S.
        lr, momentum, weight_decay, batch_train: SGD settings.
        augment: per-sample DSA during training, or None.
        use_learned_lr: train with S's learned step size when it has one.
        name: the architecture's name in ``per_net``.
    """

    def __init__(self, net: Callable[..., nn.Module], num_eval: int = 5, epochs: int = 1000, lr: float = 0.01,
                 momentum: float = 0.9, weight_decay: float = 5e-4, batch_train: int = 256,
                 augment: DSA | None = None, use_learned_lr: bool = True, name: str = "convnet"):
        self.net_factory, self.num_eval, self.epochs = net, num_eval, epochs
        self.lr, self.momentum, self.weight_decay, self.batch_train = lr, momentum, weight_decay, batch_train
        self.augment, self.use_learned_lr, self.name = augment, use_learned_lr, name

    def protocol(self) -> str:
        """One line naming the protocol, for logs and tables."""
        aug = self.augment.strategy if self.augment is not None and self.augment.enabled else "none"
        return (f"{self.name} x{self.num_eval}, {self.epochs} epochs, SGD lr {self.lr} (x0.1 at half), "
                f"mom {self.momentum}, wd {self.weight_decay}, batch {self.batch_train}, aug {aug}")

    def train_one(self, syn: SyntheticSet, real: RealData, seed: int) -> float:
        """Train one network from ``seed`` on S; return its test accuracy in percent."""
        device = real.device
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = self.net_factory(channels=real.channels, num_classes=real.num_classes, im_size=real.im_size)
        net = net.to(device)
        lr = float(syn.lr) if (self.use_learned_lr and syn.lr is not None) else self.lr
        opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=self.momentum, weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[max(self.epochs // 2, 1)], gamma=0.1)
        images, labels = syn.images.detach().to(device), syn.labels.detach().to(device)
        g = torch.Generator().manual_seed(seed)
        for _ in range(self.epochs):
            train_epoch(net, images, labels, opt, self.batch_train, self.augment, g)
            sched.step()
        return 100.0 * accuracy(net, real.test_images, real.test_labels)

    def __call__(self, syn: SyntheticSet, real: RealData, seed: int = 0) -> dict:
        """Evaluate S.

        Returns:
            ``{"acc_mean": float, "acc_std": float, "per_net": {name: [acc, ...]}, "protocol": str}``, accuracies
            in percent on the real test split (std is the population std over the ``num_eval`` runs).
        """
        accs = [self.train_one(syn, real, derive_seed(seed, 104729, r))
                for r in tqdm(range(self.num_eval), desc="evaluate", leave=False, disable=None)]
        return {"acc_mean": statistics.fmean(accs), "acc_std": statistics.pstdev(accs) if len(accs) > 1 else 0.0,
                "per_net": {self.name: accs}, "protocol": self.protocol()}
