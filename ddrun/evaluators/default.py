"""The hard-label evaluation protocol of DC / DSA / DM / MTT: train fresh networks only on S, test them on the real
test split.

The protocol is the reference's ``evaluate_synset`` (Zhao et al. ICLR 2021, Sec. 4; Zhao & Bilen ICML 2021):
``num_eval`` networks, each trained ``epochs`` epochs on S with SGD (momentum 0.9, weight decay 5e-4, step size
``lr``, multiplied by 0.1 once half-way), minibatch 256, DSA applied per sample, then tested on the whole real test
split. When S carries a learned step size (MTT, DD) and ``use_learned_lr`` is set, that step size replaces ``lr``;
soft labels are trained with soft cross-entropy. :class:`CrossArchEvaluator` runs that protocol for each
architecture of the reference pool.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Sequence
from typing import Callable

import torch
from torch import nn

from ddrun import speed
from ddrun.contracts import Evaluator as EvaluatorContract
from ddrun.data.augment import DSA
from ddrun.data.datasets import RealData
from ddrun.nets import build_net
from ddrun.progress import Progress
from ddrun.protocol import net_kwargs, net_name
from ddrun.synthetic import SyntheticSet
from ddrun.train import Ensemble, accuracy, train_epoch, train_epoch_ensemble
from ddrun.utils import ConfigError, derive_seed

log = logging.getLogger("ddrun.evaluate")


def check_training_knobs(num_eval: int, epochs: int, lr: float, momentum: float, weight_decay: float,
                         batch_train: int) -> None:
    """The evaluator's knobs, checked when it is built (before any data is loaded).

    Raises:
        ConfigError: one line naming the ``evaluator.<key>``, its value and what is allowed.
    """
    checks = (("num_eval", num_eval, isinstance(num_eval, int) and num_eval >= 0,
               "a whole number >= 0 (0: no evaluation in a distill run)"),
              ("epochs", epochs, isinstance(epochs, int) and epochs >= 1, "a whole number >= 1"),
              ("lr", lr, isinstance(lr, (int, float)) and lr > 0, "> 0"),
              ("momentum", momentum, isinstance(momentum, (int, float)) and 0 <= momentum < 1, "in [0, 1)"),
              ("weight_decay", weight_decay, isinstance(weight_decay, (int, float)) and weight_decay >= 0, ">= 0"),
              ("batch_train", batch_train, isinstance(batch_train, int) and batch_train >= 1, "a whole number >= 1"))
    for key, value, ok, allowed in checks:
        if not ok or isinstance(value, bool):
            raise ConfigError(f"evaluator.{key}={value}: must be {allowed}")


def probe_net(factory: Callable[..., nn.Module], real: RealData) -> str | None:
    """Why ``factory`` cannot take ``real``'s images, or None when it can: the network is built for them and run
    once on a dummy batch (CPU, eval mode), so an architecture too large for the image size stops the run at
    start-up, not after other networks have trained (and a layer left with no inputs, which would train to a
    constant output, is caught too)."""
    import warnings

    from ddrun.nets import build_net

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns of zero-element layers: reported below instead
            net = build_net(factory, real, 0, torch.device("cpu"))
        empty = [n for n, p in net.named_parameters() if p.numel() == 0]
        if empty:
            return f"layer {empty[0]} has no inputs at this size"
        net.eval()
        with torch.no_grad():
            net(torch.zeros(2, real.channels, *(int(v) for v in real.im_size)))
    except (RuntimeError, ValueError, ZeroDivisionError) as err:
        return (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
    return None


def refuse_small_images(failed: dict[str, str], real: RealData, others: list[str] | None) -> None:
    """Refuse the architectures in ``failed`` (name -> why) in one line.

    Args:
        others: the architectures of a cross-architecture pool that take the images (None: a single ``net``).

    Raises:
        ConfigError: when ``failed`` is not empty: names the architectures, the image size, why and the fix
            (drop them from ``evaluator.archs`` / pick another ``net``, or resize the images).
    """
    if not failed:
        return
    h, w = (int(v) for v in real.im_size)
    names = ", ".join(failed)
    why = "; ".join(f"{a}: {r}" for a, r in failed.items())
    if others is None:
        drop = "pick another net"
    elif others:
        them = "it" if len(failed) == 1 else "them"
        drop = f"drop {them} from evaluator.archs (evaluator.archs=[{','.join(others)}])"
    else:
        drop = "pick other evaluator.archs"
    bigger = ("dataset.im_size=[28,28]" if real.name == "sklearn_digits" else
              "dataset.im_size=[H,W] where the dataset has that key: sklearn_digits, imagefolder")
    raise ConfigError(f"{names} cannot take {real.name}'s {h}x{w} images ({why}): {drop}, or resize the images "
                      f"({bigger})")


class Evaluator(EvaluatorContract):
    """Trains ``num_eval`` fresh ``net`` on S and reports test accuracy (percent).

    Args:
        net: factory ``(channels, num_classes, im_size) -> nn.Module``.
        num_eval: networks trained (different seeds ``(seed, r)``: the same for every S of a run and across runs
            with the same ``seed``).
        epochs: training epochs of each network on S.
        lr, momentum, weight_decay, batch_train: SGD settings.
        augment: per-sample DSA during training, or None.
        use_learned_lr: train with S's learned step size when it has one (attribute ``uses_learned_lr``).
        name: the architecture's name in ``per_net`` and the protocol (None: :func:`ddrun.protocol.net_name` of
            ``net``).
        ensemble: train the ``num_eval`` networks together as one stacked model (:class:`ddrun.train.Ensemble`):
            ``true``, ``false`` (one after the other), ``auto`` (stacked on a GPU, where one small network at a
            time leaves it idle; one after the other on the CPU, where stacking was not faster: ``scripts/bench.py
            --groups eval``). Each network gets the same initialization, batches and DSA draws either way; the
            accuracies agree up to float rounding carried through training.

    Raises:
        ConfigError: ``ensemble`` not one of auto, true, false.
    """

    def __init__(self, net: Callable[..., nn.Module], num_eval: int = 5, epochs: int = 1000, lr: float = 0.01,
                 momentum: float = 0.9, weight_decay: float = 5e-4, batch_train: int = 256,
                 augment: DSA | None = None, use_learned_lr: bool = True, name: str | None = None,
                 ensemble: str | bool = "auto"):
        check_training_knobs(num_eval, epochs, lr, momentum, weight_decay, batch_train)
        if ensemble not in ("auto", True, False):
            raise ConfigError(f"evaluator.ensemble={ensemble!r}: valid values are auto, true, false")
        self.net_factory, self.num_eval, self.epochs = net, int(num_eval), int(epochs)
        self.lr, self.momentum, self.weight_decay, self.batch_train = lr, momentum, weight_decay, int(batch_train)
        self.augment, self.uses_learned_lr = augment, bool(use_learned_lr)
        self.name = name or net_name(net)  # what the protocol line and per_net call the architecture
        self.ensemble = ensemble
        self._probed: set = set()  # the image shapes the network was checked to take (prepare)

    def prepare(self, real: RealData) -> None:
        """Check once per image shape that the network takes ``real``'s images (:func:`probe_net`).

        Raises:
            ConfigError: it does not (one line naming the architecture, the image size and the fix).
        """
        refuse_small_images({self.name: why} if (why := self.probe(real)) else {}, real, None)

    def probe(self, real: RealData) -> str | None:
        """:func:`probe_net` of this network for ``real``'s image shape (once per shape)."""
        shape = (real.channels, *(int(v) for v in real.im_size))
        if shape not in self._probed:
            why = probe_net(self.net_factory, real)
            if why is not None:
                return why
            self._probed.add(shape)
        return None

    def protocol_fields(self) -> dict:
        aug = self.augment.strategy if self.augment is not None and self.augment.enabled else "none"
        return {"evaluator": "default", "archs": [self.name], "nets": {self.name: net_kwargs(self.net_factory)},
                "num_eval": self.num_eval, "epochs": self.epochs, "optimizer": "sgd", "lr": self.lr,
                "lr_schedule": "x0.1 at half", "momentum": self.momentum, "weight_decay": self.weight_decay,
                "batch": self.batch_train, "augment": aug, "learned_lr": self.uses_learned_lr,
                "labels": "as stored"}

    def _optimizer(self, params, syn: SyntheticSet):
        lr = float(syn.lr.detach()) if (self.uses_learned_lr and syn.lr is not None) else self.lr
        opt = torch.optim.SGD(params, lr=lr, momentum=self.momentum, weight_decay=self.weight_decay)
        return opt, torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[max(self.epochs // 2, 1)], gamma=0.1)

    def train_one(self, syn: SyntheticSet, real: RealData, seed: int) -> float:
        """Train one network from ``seed`` on S; return its test accuracy in percent."""
        device = real.device
        net = speed.layout(build_net(self.net_factory, real, seed, device))
        opt, sched = self._optimizer(net.parameters(), syn)
        if speed.current().compile:
            net = torch.compile(net)  # the same parameters: the optimizer above steps them
        images, labels = syn.images.detach().to(device), syn.labels.detach().to(device)
        g = torch.Generator().manual_seed(seed)
        for _ in range(self.epochs):
            train_epoch(net, images, labels, opt, self.batch_train, self.augment, g)
            sched.step()
        return 100.0 * accuracy(net, real.test_images, real.test_labels)

    def train_ensemble(self, syn: SyntheticSet, real: RealData, seeds: list[int]) -> list[float]:
        """:meth:`train_one` for every seed at once (:class:`ddrun.train.Ensemble`); test accuracies in percent."""
        device = real.device
        ens = Ensemble([speed.layout(build_net(self.net_factory, real, s, device)) for s in seeds])
        opt, sched = self._optimizer(list(ens.params.values()), syn)
        images, labels = syn.images.detach().to(device), syn.labels.detach().to(device)
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        for _ in range(self.epochs):
            train_epoch_ensemble(ens, images, labels, opt, gens, self.batch_train, self.augment)
            sched.step()
        chunk = speed.chunk_size(real.test_images)
        accs = ens.accuracy(real.test_images, real.test_labels, 1024 if chunk is None else chunk * len(seeds))
        return [100.0 * a for a in accs]

    def stacked(self, device: torch.device) -> bool:
        """Whether :meth:`__call__` trains the networks as one :class:`~ddrun.train.Ensemble` (``ensemble``)."""
        if self.ensemble == "auto":
            return torch.device(device).type == "cuda" and self.num_eval > 1
        return bool(self.ensemble)

    def __call__(self, syn: SyntheticSet, real: RealData, seed: int = 0) -> dict:
        """Evaluate S.

        Returns:
            ``{"acc_mean": float, "acc_std": float, "per_net": {name: [acc, ...]}, "protocol": str,
            "protocol_fields": dict}``, accuracies in percent on the real test split (std is the population std
            over the ``num_eval`` runs).
        """
        self.prepare(real)
        seeds = [derive_seed(seed, 104729, r) for r in range(self.num_eval)]
        if self.stacked(real.device):
            accs = self.train_ensemble(syn, real, seeds)
        else:
            bar = Progress(self.num_eval, 0, f"evaluate {self.name}", 60.0, log, unit="net")
            accs = []
            for s in seeds:
                accs.append(self.train_one(syn, real, s))
                bar.update(1, acc=round(accs[-1], 2))
            bar.close()
        return {"acc_mean": statistics.fmean(accs), "acc_std": statistics.pstdev(accs) if len(accs) > 1 else 0.0,
                "per_net": {self.name: accs}, "protocol": self.protocol(), "protocol_fields": self.protocol_fields()}


class CrossArchEvaluator(EvaluatorContract):
    """Cross-architecture evaluation: :class:`Evaluator`'s protocol for each architecture of a pool.

    The pool of the DC reference (Zhao et al. ICLR 2021, Sec. 4 and Table 2; ``utils.get_eval_pool('M')``): MLP,
    ConvNet, LeNet, AlexNet, VGG-11, ResNet-18, here also ResNet-18-BN (the DM pool 'B'). Every architecture is
    trained ``num_eval`` times on S with the same settings and seeds.

    Args:
        nets: architecture name -> factory ``(channels, num_classes, im_size) -> nn.Module`` (``conf/net/*``).
        archs: the names to evaluate, in order (default: all of ``nets``).
        num_eval, epochs, lr, momentum, weight_decay, batch_train, augment, use_learned_lr, ensemble: as
            :class:`Evaluator` (``ensemble`` stacks the ``num_eval`` networks of each architecture).

    Raises:
        ConfigError: ``archs`` not a non-empty list, or an entry of it not in ``nets`` (names the valid ones); at
            :meth:`prepare` (start-up) or before the first network trains, an architecture that cannot take the
            dataset's image size (names it, the size and the fix).
    """

    def __init__(self, nets: dict[str, Callable[..., nn.Module]], archs: list[str] | None = None, num_eval: int = 5,
                 epochs: int = 1000, lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 5e-4,
                 batch_train: int = 256, augment: DSA | None = None, use_learned_lr: bool = True,
                 ensemble: str | bool = "auto"):
        check_training_knobs(num_eval, epochs, lr, momentum, weight_decay, batch_train)
        if archs is not None and (isinstance(archs, str) or not isinstance(archs, Sequence) or not archs):
            raise ConfigError(f"evaluator.archs={archs}: must be a non-empty list of architectures, e.g. "
                              f"evaluator.archs=[convnet,mlp]; valid architectures: {sorted(nets)}")
        archs = list(nets) if archs is None else [str(a) for a in archs]
        unknown = [a for a in archs if a not in nets]
        if unknown:
            raise ConfigError(f"evaluator.archs={archs}: unknown {unknown}; valid architectures: {sorted(nets)}")
        self.num_eval, self.epochs, self.uses_learned_lr = num_eval, epochs, bool(use_learned_lr)
        self.evaluators = {a: Evaluator(nets[a], num_eval, epochs, lr, momentum, weight_decay, batch_train, augment,
                                        use_learned_lr, name=a, ensemble=ensemble) for a in archs}

    def protocol_fields(self) -> dict:
        fields = dict(next(iter(self.evaluators.values())).protocol_fields())
        fields.update(evaluator="cross_arch", archs=list(self.evaluators),
                      nets={a: net_kwargs(ev.net_factory) for a, ev in self.evaluators.items()})
        return fields

    def prepare(self, real: RealData) -> None:
        """Check that every architecture takes ``real``'s images (:func:`probe_net`), before any of them trains.

        Raises:
            ConfigError: some do not: one line naming them, the image size and the fix.
        """
        failed = {name: why for name, ev in self.evaluators.items() if (why := ev.probe(real)) is not None}
        refuse_small_images(failed, real, [a for a in self.evaluators if a not in failed])

    def __call__(self, syn: SyntheticSet, real: RealData, seed: int = 0) -> dict:
        """Evaluate S on every architecture.

        Returns:
            ``{"acc_mean", "acc_std", "per_net": {arch: [acc, ...]}, "per_arch": {arch: {"acc_mean", "acc_std"}},
            "protocol", "protocol_fields"}``; accuracies in percent; ``acc_mean`` / ``acc_std`` are the mean and
            population std over the architectures of their mean accuracies.
        """
        self.prepare(real)
        per_net, per_arch = {}, {}
        for name, ev in self.evaluators.items():
            res = ev(syn, real, seed)
            per_net[name] = res["per_net"][name]
            per_arch[name] = {"acc_mean": res["acc_mean"], "acc_std": res["acc_std"]}
            log.info("%s: %.2f +- %.2f (%d nets)", name, res["acc_mean"], res["acc_std"], len(per_net[name]))
        means = [v["acc_mean"] for v in per_arch.values()]
        return {"acc_mean": statistics.fmean(means), "acc_std": statistics.pstdev(means) if len(means) > 1 else 0.0,
                "per_net": per_net, "per_arch": per_arch, "protocol": self.protocol(),
                "protocol_fields": self.protocol_fields()}
