"""Meta-learning through unrolled training: Dataset Distillation (DD).

Wang, Zhu, Torralba & Efros, "Dataset Distillation", arXiv 1811.10959 (2018), Algorithm 1 and Sec. 3.2-3.4.
S is split into ``syn_steps`` batches (``ipc / syn_steps`` images of every class each; step ``s`` always uses
batch ``s``); a network starting at theta_0 takes ``syn_steps x syn_epochs`` gradient-descent steps cycling
through the batches, step i with its own learned step size eta_i,

    theta_{i+1} = theta_i - eta_i * grad_theta l(theta_i; S_{i mod syn_steps}),

and the loss of the trained network theta_T on a real batch (cross-entropy, the network in eval mode) is
back-propagated through the unroll to the images and to eta. theta_0 comes from the fetcher: ``fetcher=fixed``
(one known initialization, the paper's fixed-init setting) or ``fetcher=random`` (theta_0 ~ p(theta_0) afresh
every iteration, the paper's Algorithm 1). ``truncate=N`` back-propagates through the last N steps only.

The step sizes are stored in ``syn.syn_lr``, a float32 vector ``[syn_steps * syn_epochs]`` (what ``synthetic.pt``
holds; the evaluator trains with their mean, ``syn.lr``). As in the reference (ssnl/dataset-distillation
``train_distilled_image.py``: ``lr = softplus(raw)``, raw optimized by the same Adam as the images), the objective
optimizes ``raw = softplus^-1(eta)`` (its own state, saved in ``checkpoint.pt``) with step size ``lr_lr``, so eta stays
positive and moves multiplicatively; ``syn.syn_lr`` is set to ``softplus(raw)`` after every update. The paper's own
protocol, these exact steps replayed from theta_0 (:func:`replay`), is ``evaluator=replay``
(``ddrun.evaluators.replay``), method=dd's headline; ``report_nets`` > 0 also logs it as ``dd_replay_acc``. S records
``syn_steps`` in its meta, so a saved S can be replayed by ``ddrun evaluate evaluator=replay``.

Reference hyperparameters (``conf/method/dd.yaml``): LeNet (MNIST) / AlexCifarNet (CIFAR) with xavier init
(``net=dd``), Adam(lr 0.01, betas (0.5, 0.999)) on the images with StepLR x0.5 every 40 epochs,
distill_lr (eta init) 0.02 (CIFAR-10 0.001), distill_steps 10, distill_epochs 3, 1 image per class per step, real
batch 1024, 400 epochs of the real training set, images initialized as N(0, 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ddrun.contracts import Fetched, Fetcher, Objective
from ddrun.data.datasets import RealData
from ddrun.nets.functional import available_memory, forward, params_of, unroll_steps
from ddrun.synthetic import SyntheticSet
from ddrun.utils import ConfigError, DdrunError

KNOBS = ("objective.syn_steps / objective.syn_epochs (fewer unrolled steps), or set objective.truncate=N "
         "(back-propagate through the last N steps only)")


def dd_steps(syn: SyntheticSet, syn_steps: int, syn_epochs: int,
             lrs: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """DD's unrolled steps ``(x_i, y_i, eta_i)``, i = 0 .. syn_steps * syn_epochs - 1 (module doc): batch
    ``i mod syn_steps`` holds images ``[s*m, (s+1)*m)`` of every class, m = ipc / syn_steps; ``lrs`` ``[T]``."""
    m = syn.ipc // syn_steps
    per_class = [syn.class_slice(c) for c in range(syn.num_classes)]
    batches = [torch.cat([idx[s * m:(s + 1) * m] for idx in per_class]) for s in range(syn_steps)]
    return [(syn.images[batches[i % syn_steps]], syn.labels[batches[i % syn_steps]], lrs[i])
            for i in range(syn_steps * syn_epochs)]


def replay(net: nn.Module, syn: SyntheticSet, syn_steps: int) -> dict[str, torch.Tensor]:
    """DD's own protocol (Wang et al. 2018, Sec. 3.2-3.3): the parameters of ``net`` (theta_0) after exactly S's
    learned steps, ``theta_{i+1} = theta_i - eta_i * grad l(theta_i; S_{i mod syn_steps})`` with S's per-step
    step sizes ``syn.syn_lr`` ``[syn_steps * syn_epochs]`` (detached; the network in train mode).

    Raises:
        ConfigError: S has no per-step step sizes, or their number is not a multiple of ``syn_steps``, or
            ``syn_steps`` does not divide ipc.
    """
    lrs = syn.syn_lr
    if lrs is None or lrs.dim() != 1:
        raise ConfigError("the replay protocol needs S's learned per-step step sizes (a DD synthetic set: "
                          "synthetic.pt 'lr' of shape [syn_steps * syn_epochs])")
    if syn_steps < 1 or len(lrs) % syn_steps or syn.ipc % syn_steps:
        raise ConfigError(f"syn_steps={syn_steps} does not fit S ({len(lrs)} step sizes, ipc {syn.ipc}): pass the "
                          f"objective.syn_steps S was distilled with")
    net.train()
    with torch.enable_grad():
        return unroll_steps(net, params_of(net), dd_steps(syn, syn_steps, len(lrs) // syn_steps, lrs.detach()),
                            truncate=0)


class DatasetDistillation(Objective):
    """DD loss (module doc). Returns a float32 scalar; gradients reach ``syn.images``, the step sizes (through
    ``raw_lr``) and learned labels.

    Args:
        syn_steps: distinct gradient steps (batches of S) per epoch; must divide ipc.
        syn_epochs: passes over the steps (``syn_steps * syn_epochs`` steps in all).
        lr_init: initial value of every learned step size (the reference's ``distill_lr``).
        truncate: back-propagate through the last ``truncate`` steps only (None: all of them).
        memory_limit: GiB an unroll may keep for back-propagation (None: what the device has free); a larger
            unroll stops with an error naming the knobs that shrink it.
        report_nets: networks the learned steps are replayed on for ``dd_replay_acc`` (0: not reported).
        Others: :class:`~ddrun.contracts.Objective` (``batch_real`` per class; ``lr_lr``: step size of
            ``softplus^-1`` of the step sizes, the reference's Adam lr 0.01; 0 or null keeps them fixed).

    Raises:
        ConfigError: a non-positive count or step size; ``syn_steps`` not dividing ipc (at ``prepare``).
        DdrunError: the unroll would not fit in memory; a learned step size became NaN.
    """

    def __init__(self, syn_steps: int = 10, syn_epochs: int = 3, lr_init: float = 0.02, truncate: int | None = None,
                 memory_limit: float | None = None, report_nets: int = 1, **kwargs):
        super().__init__(**kwargs)
        for key, val in (("syn_steps", syn_steps), ("syn_epochs", syn_epochs)):
            if val is None or int(val) < 1:
                raise ConfigError(f"objective.{key}={val}: must be >= 1")
        if truncate is not None and int(truncate) < 1:
            raise ConfigError(f"objective.truncate={truncate}: must be >= 1 (or null: back-propagate through all)")
        if not lr_init > 0:
            raise ConfigError(f"objective.lr_init={lr_init}: must be > 0")
        self.syn_steps, self.syn_epochs, self.lr_init = int(syn_steps), int(syn_epochs), float(lr_init)
        self.truncate = None if truncate is None else int(truncate)
        self.memory_limit, self.report_nets = memory_limit, int(report_nets)

    def prepare(self, syn: SyntheticSet, real: RealData) -> None:
        if syn.ipc % self.syn_steps:
            raise ConfigError(f"objective.syn_steps={self.syn_steps} must divide ipc={syn.ipc}: DD gives every "
                              f"step its own ipc/syn_steps images of each class")
        t = self.syn_steps * self.syn_epochs
        syn.meta["syn_steps"] = self.syn_steps  # how the per-step step sizes map to batches of S (replay)
        syn.learn_lr(self.lr_init, steps=t)
        syn.syn_lr.requires_grad_(False)  # optimized through raw_lr
        raw = torch.full((t,), self.lr_init, device=syn.images.device).expm1().log()  # softplus^-1
        self.raw_lr = nn.Parameter(raw)

    def param_groups(self, syn: SyntheticSet) -> list[dict]:
        groups = syn.param_groups(self.lr_img, None, self.lr_labels)
        if self.lr_lr:
            groups.append({"params": [self.raw_lr], "lr": self.lr_lr, "name": "lr"})
        return groups

    def check(self, syn: SyntheticSet, it: int) -> None:
        if not torch.isfinite(self.raw_lr).all():
            raise DdrunError(f"a learned step size became NaN/Inf at iteration {it}; lower objective.lr_lr")
        with torch.no_grad():
            syn.syn_lr.copy_(F.softplus(self.raw_lr))

    def state_dict(self) -> dict:
        return {"raw_lr": self.raw_lr.detach().cpu()}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``raw_lr`` (``syn.syn_lr``, its softplus, comes back with S)."""
        if "raw_lr" in state:
            with torch.no_grad():
                self.raw_lr.copy_(state["raw_lr"])

    def steps(self, syn: SyntheticSet, lrs: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The unrolled steps of S with step sizes ``lrs`` ``[T]`` (:func:`dd_steps`)."""
        return dd_steps(syn, self.syn_steps, self.syn_epochs, lrs)

    def unroll(self, syn: SyntheticSet, net: nn.Module, graph: bool = True) -> dict[str, torch.Tensor]:
        """theta_T: the fetched network's parameters after the unrolled steps (module doc); with ``graph`` the
        step sizes are ``softplus(raw_lr)`` (differentiable), without it the stored ``syn.syn_lr``."""
        net.train()
        if not graph:
            return replay(net, syn, self.syn_steps)
        steps = self.steps(syn, F.softplus(self.raw_lr))
        budget = (int(self.memory_limit * 2**30) if self.memory_limit is not None
                  else available_memory(syn.images.device))
        return unroll_steps(net, params_of(net), steps, self.truncate, budget, KNOBS)

    def __call__(self, syn: SyntheticSet, real: RealData, fetched: Fetched, it: int,
                 generator: torch.Generator) -> torch.Tensor:
        net = fetched.net
        x_real, y_real = self.real_batch(real, generator)
        params = self.unroll(syn, net)
        net.eval()
        loss = F.cross_entropy(forward(net, params, x_real), y_real)
        net.train()
        return loss

    @torch.no_grad()
    def replay_accuracy(self, syn: SyntheticSet, real: RealData, net: nn.Module) -> float:
        """Test accuracy (percent, whole real test split) of ``net`` trained by exactly the learned steps (the
        paper's evaluation: e.g. "10 distilled images train a fixed-init LeNet to 94%")."""
        with torch.enable_grad():
            params = self.unroll(syn, net, graph=False)
        net.eval()
        correct = 0
        for s in range(0, len(real.test_images), 1000):
            out = forward(net, params, real.test_images[s:s + 1000])
            correct += int((out.argmax(1) == real.test_labels[s:s + 1000]).sum())
        net.train()
        return 100.0 * correct / max(len(real.test_images), 1)

    def report(self, syn: SyntheticSet, real: RealData, fetcher: Fetcher, seed: int) -> dict[str, float]:
        """``dd_replay_acc``: the learned steps replayed from ``report_nets`` initializations the run never trained
        on (``fetcher.held_out(r)``; with ``fetcher=fixed``, the fixed theta_0 itself)."""
        if self.report_nets < 1:
            return {}
        accs = [self.replay_accuracy(syn, real, fetcher.held_out(r)) for r in range(self.report_nets)]
        return {"dd_replay_acc": sum(accs) / len(accs)}
