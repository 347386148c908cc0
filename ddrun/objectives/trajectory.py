"""Trajectory matching: MTT, with TESLA's constant-memory gradient as an option.

Cazenavette et al., "Dataset Distillation by Matching Training Trajectories", CVPR 2022, Eq. (1)-(2) and
Algorithm 1: from an expert's parameters ``theta*_t`` (the fetched network, ``fetcher=checkpoints``) take
``N = syn_steps`` SGD steps on minibatches of S (``batch_syn`` images, default all of S; per-sample DSA on each
minibatch) with the learned step size ``alpha`` (``syn.syn_lr``, initialized at ``lr_teacher``, optimized with
``lr_lr``), and minimize

    L = || theta_hat_{t+N} - theta*_{t+M} ||^2 / || theta*_t - theta*_{t+M} ||^2

where ``theta*_{t+M}`` is the expert ``M = expert_epochs`` epochs later. The unrolled inner loop runs through
``torch.func.functional_call`` (``ddrun.nets.functional``), so the gradient reaches the images and ``alpha``
through all N steps. Plain mode keeps every step's graph (memory linear in N); ``memory_efficient=true`` uses
the constant-memory gradient of TESLA (Cui et al., ICML 2023, Sec. 4.1), computed exactly
(:func:`ddrun.nets.functional.unroll_sgd_memory_efficient`): the same value and gradient, with one step's graph
alive at a time.

Reference hyperparameters: ``conf/method/mtt.yaml`` (per dataset and ipc).

Options of the later trajectory-matching papers:

- TESLA's soft-label assignment (Cui et al., ICML 2023, Sec. 4.2; reference justincui03/tesla ``distill.py
  --teacher_label``), ``teacher_label=true``: every iteration the labels of S are the logits of the expert at the
  *target* epoch ``theta*_{t+M}`` (eval mode) on S's images; the student's inner steps train on them (soft
  cross-entropy) and S keeps the latest ones (the evaluators train on them, as the reference's last
  ``label_syn``).
- DATM (Guo et al., ICLR 2024, Sec. 4.3-4.4; reference ``distill/DATM.py``): ``learn_labels=true`` makes S's
  soft labels (initialized from the experts' logits, ``init=expert_correct``) learnable with their own step size
  ``lr_labels`` (``lr_y``) and momentum ``momentum_labels`` (``Momentum_y`` 0.9); the unrolled inner steps use
  soft cross-entropy against ``softmax(labels)``; ``threshold``: S (images, labels, step size) is updated only
  when the normalized matching loss is at most the threshold (:meth:`TrajectoryMatching.accepts`). The growing
  start-epoch window is the fetcher's (``ddrun.fetchers.checkpoints``).
"""

from __future__ import annotations

import math

import torch

from ddrun.contracts import Fetched, Objective
from ddrun.data.augment import DSA
from ddrun.data.datasets import RealData
from ddrun.nets.functional import available_memory, forward, unroll_sgd, unroll_sgd_memory_efficient
from ddrun.synthetic import SyntheticSet
from ddrun.utils import ConfigError, DdrunError


class TrajectoryMatching(Objective):
    """MTT loss (module doc). Returns a float32 scalar whose gradient reaches ``syn.images`` and ``syn.syn_lr``.

    Args:
        syn_steps: N, student SGD steps per iteration.
        batch_syn: synthetic images per student step (None: all of S, the reference default).
        lr_teacher: initial value of the learned step size (``syn.learn_lr`` in :meth:`prepare`).
        lr_img, lr_lr: step sizes of the images and of the learned step size (SGD momentum 0.5, the loop's
            ``syn_optimizer``). ``lr_lr`` null or 0 keeps the step size fixed at ``lr_teacher``.
        memory_efficient: TESLA's constant-memory gradient instead of keeping the unrolled graph.
        augment: per-sample DSA applied to each student minibatch, or None.
        teacher_label: TESLA's soft-label assignment (module doc).
        learn_labels: learn S's soft labels (DATM) with step size ``lr_labels`` and SGD momentum
            ``momentum_labels`` (None: the optimizer's).
        threshold: DATM's gate: S is updated only when the loss is at most this (None: always).

    Raises:
        ConfigError: non-positive ``syn_steps``, ``batch_syn`` or ``lr_teacher``; ``teacher_label`` together
            with ``learn_labels``; a fetched network without an expert segment (``Fetched.start`` / ``target``:
            the objective needs ``fetcher=checkpoints``); ``teacher_label`` on a parametrization that decodes
            more images than S stores.
        DdrunError: (plain mode) the unrolled graph would not fit in the memory left on the device; the message
            points to ``objective.memory_efficient=true``.
    """

    def __init__(self, syn_steps: int = 20, batch_syn: int | None = None, lr_teacher: float = 0.01,
                 memory_efficient: bool = False, lr_img: float = 1000.0, lr_lr: float | None = 1e-5,
                 augment: DSA | None = None, teacher_label: bool = False, learn_labels: bool = False,
                 momentum_labels: float | None = None, threshold: float | None = None, **kwargs):
        super().__init__(lr_img=lr_img, lr_lr=lr_lr, augment=augment, **kwargs)
        if int(syn_steps) < 1:
            raise ConfigError(f"objective.syn_steps={syn_steps}: must be >= 1")
        if batch_syn is not None and int(batch_syn) < 1:
            raise ConfigError(f"objective.batch_syn={batch_syn}: must be >= 1 or null (all of S)")
        if not float(lr_teacher) > 0:
            raise ConfigError(f"objective.lr_teacher={lr_teacher}: must be > 0")
        if teacher_label and learn_labels:
            raise ConfigError("objective.teacher_label=true assigns S's labels from the expert every iteration; "
                              "it cannot be combined with objective.learn_labels=true")
        self.syn_steps, self.batch_syn = int(syn_steps), None if batch_syn is None else int(batch_syn)
        self.lr_teacher, self.memory_efficient = float(lr_teacher), bool(memory_efficient)
        self.teacher_label, self.learn_labels = bool(teacher_label), bool(learn_labels)
        self.momentum_labels = None if momentum_labels is None else float(momentum_labels)
        self.threshold = None if threshold is None else float(threshold)
        self._assigned: torch.Tensor | None = None  # TESLA: the labels of this iteration, written into S by check

    def prepare(self, syn: SyntheticSet, real: RealData) -> None:
        syn.learn_lr(self.lr_teacher)
        if self.learn_labels:
            syn.learn_labels()

    def param_groups(self, syn: SyntheticSet) -> list[dict]:
        groups = syn.param_groups(self.lr_img, self.lr_lr, self.lr_labels)
        for g in groups:
            if g["name"] == "labels" and self.momentum_labels is not None:
                g["momentum"] = self.momentum_labels
        return groups

    def accepts(self, loss: torch.Tensor) -> bool:
        """DATM's gate: the update of S is skipped when the loss is above ``threshold``."""
        return self.threshold is None or float(loss.detach()) <= self.threshold

    @torch.no_grad()
    def expert_labels(self, net: torch.nn.Module, target: dict, images: torch.Tensor) -> torch.Tensor:
        """TESLA's soft labels: logits float ``[N, K]`` of the network with the target parameters ``target`` (eval
        mode) on ``images`` (detached), in batches of 256."""
        net.eval()
        out = torch.cat([forward(net, target, images[i:i + 256].detach()) for i in range(0, len(images), 256)])
        net.train()
        return out

    def check(self, syn: SyntheticSet, it: int) -> None:
        """Write TESLA's labels of this iteration into S; stop when the learned step size left (0, inf): the
        reference would train its evaluators with it."""
        if self._assigned is not None:
            if len(self._assigned) != len(syn.images):
                raise ConfigError(f"objective.teacher_label=true labels the {len(self._assigned)} decoded images, "
                                  f"but S stores {len(syn.images)}: use parametrization=pixels with it")
            syn.labels = self._assigned.to(syn.images.device)
            self._assigned = None
        lr = float(syn.lr.detach())
        if not (math.isfinite(lr) and lr > 0):
            raise DdrunError(f"the learned step size syn_lr became {lr:.4g} at iteration {it} (it must stay > 0); "
                             f"stopped, the last good checkpoint is kept in the run directory (checkpoint.pt). "
                             f"Lower objective.lr_lr (now {self.lr_lr}) or objective.lr_img (now {self.lr_img})")

    def __call__(self, syn: SyntheticSet, real: RealData, fetched: Fetched, it: int,
                 generator: torch.Generator) -> torch.Tensor:
        if fetched.start is None or fetched.target is None:
            raise ConfigError("objective=mtt matches expert trajectories: it needs fetcher=checkpoints "
                              "(use method=mtt, which selects it)")
        net = fetched.net
        net.train()
        start = fetched.start
        lr = syn.lr if syn.lr is not None else self.lr_teacher
        labels = syn.labels
        if self.teacher_label:
            labels = self._assigned = self.expert_labels(net, fetched.target, syn.images)
        args = (net, start, syn.images, labels, lr, self.syn_steps, self.batch_syn, self.augment, generator)
        if self.memory_efficient:
            final = unroll_sgd_memory_efficient(*args)
        else:  # stop with a one-line error before the unrolled graph outgrows the device's memory
            final = unroll_sgd(*args, memory_budget=available_memory(syn.images.device),
                               knobs="objective.syn_steps or objective.batch_syn, or set "
                                     "objective.memory_efficient=true (the same gradient in constant memory)")
        target = fetched.target
        num = sum(((final[k] - target[k]) ** 2).sum() for k in final)
        den = sum(((start[k] - target[k]) ** 2).sum() for k in final)
        return num / den
