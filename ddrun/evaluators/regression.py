"""The finite-network protocol of the kernel family: networks trained by MSE regression on S's real-valued
targets.

FRePo, KIP and RFAD learn labels as regression targets ``Y_S`` float ``[N, K]`` (``SyntheticSet.regression_targets``:
the learned labels over ``label_scale``, or ``onehot - 1/K`` for hard labels) and evaluate their distilled sets by
training finite networks to regress those targets, not by cross-entropy on ``softmax(labels)``:

- FRePo (Zhou et al. NeurIPS 2022; yongchaoz/FRePo ``script/eval.py`` + ``lib/datadistillation/frepo.py``
  ``proto_evaluate``): the ``Conv`` without normalization (``conf/net/frepo_conv.yaml``, ``norm: none``), Adam lr
  3e-4, a linear warm-up from 0 over 500 steps then cosine decay to 0.01x, minibatches of ``min(|S|, 500)`` in S's
  order (``tf.data ... repeat().batch()``, no shuffle), the augmentation of the dataset, loss
  ``0.5 * sum_k (f(x) - y)^2`` averaged over the batch, steps by |S| (``step_per_prototpyes``: 10 -> 1000,
  100 -> 2000, 200 -> 20000, 400/500 -> 5000, 1000 -> 10000, 2000/5000 -> 40000), 5 networks.
- RFAD (Loo et al. NeurIPS 2022; yolky/RFAD ``eval_distilled_set.py --run_finite`` + ``training.train_network``):
  the DC ConvNet of width 1024 without normalization, SGD momentum 0.9 lr 1e-2, no weight decay, full batch
  (513 > |S|), targets scaled by 8 and loss ``mean((f(x) - 8 y)^2) / 64``, at most 20,000 steps with early
  stopping on a validation split of the *training* set (500 images per class; every 100 steps, patience 500, the
  best network is tested), no augmentation.
- KIP (Nguyen et al. NeurIPS 2021, Sec. 4 "transfer to finite networks"): finite ConvNets (the text: width 1024,
  no normalization) trained on the learned images and labels with MSE; its optimizer and step budget are not
  given in the sources available here, so ``method=kip`` uses RFAD's protocol above (same kernel family, same
  ConvNet, same MSE on learned labels) and says so.

Every result states these settings (:meth:`RegressionEvaluator.protocol_fields`).
"""

from __future__ import annotations

import copy
import math
import statistics
from collections.abc import Mapping
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ddrun.contracts import Evaluator as EvaluatorContract
from ddrun.data.augment import DSA
from ddrun.data.datasets import RealData, describe_per_class
from ddrun.nets import build_net
from ddrun.protocol import net_kwargs
from ddrun.synthetic import SyntheticSet
from ddrun.train import accuracy
from ddrun.utils import ConfigError, derive_seed

# FRePo script/eval.py `step_per_prototpyes`: training steps by the number of images in S
FREPO_STEPS = {10: 1000, 100: 2000, 200: 20000, 400: 5000, 500: 5000, 1000: 10000, 2000: 40000, 5000: 40000}


def warmup_cosine(step: int, total: int, warmup: int, final: float | None) -> float:
    """Step-size factor at ``step`` of ``total``: linear from 0 to 1 over ``warmup`` steps, then cosine from 1 to
    ``final`` over the remaining steps (optax ``join_schedules([linear_schedule(0, lr, warmup),
    cosine_decay_schedule(lr, total - warmup, alpha=final)])``); ``final`` None: constant after the warm-up."""
    if step < warmup:
        return step / warmup
    if final is None:
        return 1.0
    t = min(step - warmup, max(total - warmup, 1)) / max(total - warmup, 1)
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * t))


def _at_least_one(key: str, value, why: str = "") -> int:
    """``value`` as an int when it is a whole number >= 1.

    Raises:
        ConfigError: one line naming ``evaluator.<key>`` (``beside.<name>.<key>`` for an evaluator under
            ``beside``: the run renames it) and what it must be.
    """
    number = 0
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            number = int(value)
        except ValueError:
            pass
    if number < 1:
        raise ConfigError(f"evaluator.{key}={value}: must be a whole number >= 1{why}")
    return number


class RegressionEvaluator(EvaluatorContract):
    """Trains ``num_eval`` fresh ``net`` by MSE regression on S's targets ``[N, K]`` (module doc) and reports their
    test accuracy (percent, argmax of the regression output).

    Args:
        net: factory ``(channels, num_classes, im_size) -> nn.Module`` (e.g. ``frepo_conv`` with ``norm: none``).
        num_eval: networks trained (seeds ``(seed, 104729, r)``).
        steps: training steps: an int, or a table ``{|S|: steps}`` (FRePo's, the default); None with ``epochs``.
        epochs: instead of ``steps``: passes over S (``ceil(|S| / batch_train)`` steps each).
        batch_train: minibatch size (``min(|S|, batch_train)``).
        shuffle: reshuffle S every pass (False: S's order, as FRePo's ``repeat().batch()``).
        optimizer: ``adam`` or ``sgd`` (with ``momentum``); ``lr``, ``weight_decay`` its settings.
        warmup: linear warm-up steps from 0; ``final_lr``: cosine decay to ``final_lr * lr`` (None: constant).
        target_scale: the network regresses ``target_scale * Y`` and the loss is divided by its square (RFAD: 8).
        reduction: ``half_sum`` (``0.5 * sum_k``, mean over the batch: FRePo) or ``mean`` (over batch and classes:
            RFAD).
        augment: per-sample DSA during training, or None.
        val_per_class, val_every, patience: early stopping on a class-balanced validation split of the real
            *training* set (RFAD); 0 images: off. A class holding fewer gives all of its images; :meth:`prepare`
            records the counts drawn (``val_counts``) and the protocol states them.
        name: the architecture's name in ``per_net``.

    Raises:
        ConfigError: an unknown optimizer or reduction; ``epochs``, ``steps`` (or a value of its table) or
            ``batch_train`` not a whole number >= 1 (an untrained network's accuracy is no result); an |S| that
            the ``steps`` table does not list (at evaluation).
    """

    def __init__(self, net: Callable[..., nn.Module], num_eval: int = 5, steps: int | Mapping | None = None,
                 epochs: int | None = None, batch_train: int = 500, shuffle: bool = False, optimizer: str = "adam",
                 lr: float = 3e-4, momentum: float = 0.9, weight_decay: float = 0.0, warmup: int = 500,
                 final_lr: float | None = 0.01, target_scale: float = 1.0, reduction: str = "half_sum",
                 augment: DSA | None = None, val_per_class: int = 0, val_every: int = 100, patience: int = 500,
                 name: str = "frepo_conv"):
        if optimizer not in ("adam", "sgd"):
            raise ConfigError(f"evaluator.optimizer={optimizer!r}: valid values are ['adam', 'sgd']")
        if reduction not in ("half_sum", "mean"):
            raise ConfigError(f"evaluator.reduction={reduction!r}: valid values are ['half_sum', 'mean']")
        if epochs is None and steps is None:
            steps = dict(FREPO_STEPS)
        elif epochs is not None:
            steps = None
        untrained = " (fewer trains nothing and reports an untrained network's accuracy)"
        epochs = None if epochs is None else _at_least_one("epochs", epochs, untrained)
        if isinstance(steps, Mapping):
            steps = {_at_least_one("steps", k, " (a key of the table is an |S|)"):
                     _at_least_one(f"steps.{k}", v, untrained) for k, v in steps.items()}
        elif steps is not None:
            steps = _at_least_one("steps", steps, untrained)
        batch_train = _at_least_one("batch_train", batch_train)
        self.net_factory, self.num_eval, self.name = net, int(num_eval), name
        self.steps = steps
        self.epochs, self.batch_train, self.shuffle = epochs, int(batch_train), bool(shuffle)
        self.optimizer, self.lr, self.momentum, self.weight_decay = optimizer, float(lr), momentum, weight_decay
        self.warmup, self.final_lr = int(warmup), final_lr
        self.target_scale, self.reduction, self.augment = float(target_scale), reduction, augment
        self.val_per_class, self.val_every, self.patience = int(val_per_class), int(val_every), int(patience)
        self.val_counts: list[int] | None = None  # validation images drawn per class (prepare); None: not known
        self.uses_learned_lr = False

    def prepare(self, real: RealData) -> None:
        """Record ``val_counts``: the validation images early stopping draws from each class of ``real``'s training
        split (``RealData.balanced_counts``), so that the protocol states what is drawn rather than what was asked;
        None with early stopping off. Also called by :meth:`__call__`."""
        self.val_counts = real.balanced_counts(self.val_per_class) if self.val_per_class else None

    def protocol_fields(self) -> dict:
        aug = self.augment.strategy if self.augment is not None and self.augment.enabled else "none"
        sched = f"linear warm-up {self.warmup} steps" if self.warmup else "no warm-up"
        sched += ", constant" if self.final_lr is None else f", cosine to {self.final_lr}x"
        steps = self.steps if not isinstance(self.steps, dict) else "by |S| " + ", ".join(
            f"{k}:{v}" for k, v in sorted(self.steps.items()))
        fields = {"evaluator": "regression", "archs": [self.name], "nets": {self.name: net_kwargs(self.net_factory)},
                  "num_eval": self.num_eval, "epochs": self.epochs if self.epochs is not None else "(steps)",
                  "steps": steps, "optimizer": self.optimizer,
                  "lr": self.lr, "lr_schedule": sched, "momentum": self.momentum if self.optimizer == "sgd" else None,
                  "weight_decay": self.weight_decay, "batch": self.batch_train, "augment": aug, "learned_lr": False,
                  "labels": f"MSE to S's regression targets x{self.target_scale:g} ({self.reduction})",
                  "order": "reshuffled" if self.shuffle else "S's order"}
        if self.val_per_class:
            drawn = describe_per_class(self.val_counts, self.val_per_class)
            fields["early_stopping"] = (f"{drawn} of the training split, every {self.val_every} steps, "
                                        f"patience {self.patience}")
        return fields

    def total_steps(self, n: int) -> int:
        """Training steps for an S of ``n`` images."""
        if self.epochs is not None:
            return int(self.epochs) * math.ceil(n / min(n, self.batch_train))
        if isinstance(self.steps, dict):
            if n not in self.steps:
                raise ConfigError(f"evaluator.steps has no entry for |S|={n} (it lists {sorted(self.steps)}); pass "
                                  f"evaluator.steps=N or evaluator.epochs=N")
            return self.steps[n]
        return int(self.steps)

    @staticmethod
    def targets(syn: SyntheticSet) -> torch.Tensor:
        """S's regression targets float ``[N, K]`` (``SyntheticSet.regression_targets``: ``onehot - 1/K`` for hard
        labels, e.g. the real training set of ``ddrun evaluate full=true``)."""
        return syn.regression_targets().detach()

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The regression loss of outputs ``[B, K]`` against targets ``[B, K]`` (already x ``target_scale``)."""
        sq = (out - y) ** 2 / self.target_scale**2
        return 0.5 * sq.sum(1).mean() if self.reduction == "half_sum" else sq.mean()

    def _optimizer(self, net: nn.Module) -> torch.optim.Optimizer:
        if self.optimizer == "adam":
            return torch.optim.Adam(net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        return torch.optim.SGD(net.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)

    def _validation(self, real: RealData, seed: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not self.val_per_class:
            return None
        g = torch.Generator().manual_seed(derive_seed(seed, 15485863))
        return real.balanced_sample(self.val_per_class, g)

    def train_one(self, syn: SyntheticSet, real: RealData, seed: int) -> float:
        """Train one network from ``seed`` on S; return its test accuracy in percent."""
        device = real.device
        net = build_net(self.net_factory, real, seed, device)
        images = syn.images.detach().to(device)
        targets = self.target_scale * self.targets(syn).to(device)
        n, total = len(images), self.total_steps(len(images))
        b = min(n, self.batch_train)
        opt = self._optimizer(net)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: warmup_cosine(t, total, self.warmup, self.final_lr))
        g = torch.Generator().manual_seed(seed)
        val = self._validation(real, seed)
        best = (-1.0, 0, None)  # (validation accuracy, step, state)
        order = torch.empty(0, dtype=torch.long)
        for step in range(total):
            if val is not None and step % self.val_every == 0:
                acc = accuracy(net, *val)
                if acc > best[0]:
                    best = (acc, step, copy.deepcopy(net.state_dict()))
                if step >= best[1] + self.patience:
                    break
            if len(order) < b:
                order = torch.cat([order, torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)])
            idx, order = order[:b].to(device), order[b:]
            x = images[idx] if self.augment is None or not self.augment.enabled else self.augment(images[idx], g)
            net.train()
            loss = self.loss(net(x), targets[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if best[2] is not None:
            net.load_state_dict(best[2])
        return 100.0 * accuracy(net, real.test_images, real.test_labels)

    def __call__(self, syn: SyntheticSet, real: RealData, seed: int = 0) -> dict:
        """Evaluate S.

        Returns:
            ``{"acc_mean", "acc_std", "per_net": {name: [acc, ...]}, "protocol", "protocol_fields"}``, accuracies in
            percent on the real test split (std: population std over the ``num_eval`` networks).
        """
        self.prepare(real)  # the validation counts of the data evaluated on (the protocol states them)
        accs = [self.train_one(syn, real, derive_seed(seed, 104729, r))
                for r in tqdm(range(self.num_eval), desc="evaluate (regression)", leave=False, disable=None)]
        return {"acc_mean": statistics.fmean(accs), "acc_std": statistics.pstdev(accs) if len(accs) > 1 else 0.0,
                "per_net": {self.name: accs}, "protocol": self.protocol(), "protocol_fields": self.protocol_fields()}
