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
"""

from __future__ import annotations

import math

import torch

from ddrun.contracts import Fetched, Objective
from ddrun.data.augment import DSA
from ddrun.data.datasets import RealData
from ddrun.nets.functional import available_memory, unroll_sgd, unroll_sgd_memory_efficient
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

    Raises:
        ConfigError: non-positive ``syn_steps``, ``batch_syn`` or ``lr_teacher``; a fetched network without an
            expert segment (``Fetched.start`` / ``target``: the objective needs ``fetcher=checkpoints``).
        DdrunError: (plain mode) the unrolled graph would not fit in the memory left on the device; the message
            points to ``objective.memory_efficient=true``.
    """

    def __init__(self, syn_steps: int = 20, batch_syn: int | None = None, lr_teacher: float = 0.01,
                 memory_efficient: bool = False, lr_img: float = 1000.0, lr_lr: float | None = 1e-5,
                 augment: DSA | None = None, **kwargs):
        super().__init__(lr_img=lr_img, lr_lr=lr_lr, augment=augment, **kwargs)
        if int(syn_steps) < 1:
            raise ConfigError(f"objective.syn_steps={syn_steps}: must be >= 1")
        if batch_syn is not None and int(batch_syn) < 1:
            raise ConfigError(f"objective.batch_syn={batch_syn}: must be >= 1 or null (all of S)")
        if not float(lr_teacher) > 0:
            raise ConfigError(f"objective.lr_teacher={lr_teacher}: must be > 0")
        self.syn_steps, self.batch_syn = int(syn_steps), None if batch_syn is None else int(batch_syn)
        self.lr_teacher, self.memory_efficient = float(lr_teacher), bool(memory_efficient)

    def prepare(self, syn: SyntheticSet, real: RealData) -> None:
        syn.learn_lr(self.lr_teacher)

    def check(self, syn: SyntheticSet, it: int) -> None:
        """Stop when the learned step size left (0, inf): the reference would train its evaluators with it."""
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
        args = (net, start, syn.images, syn.labels, lr, self.syn_steps, self.batch_syn, self.augment, generator)
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
