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

The other modes of the paper and its successors, as options:

- DD's poisoning (Wang et al. 2018, Sec. 3.5 / 4.2; reference ``basics.py`` ``final_objective_loss`` with
  ``--mode distill_attack``), ``attack.source=a attack.target=b``: the final loss relabels every real example of
  class a as class b, so the learned steps make well-trained networks (``fetcher=pretrained`` on the same
  dataset) misclassify a as b and keep the other classes; :meth:`DatasetDistillation.report` adds the fraction
  of the test images of class a predicted as b (``dd_attack_success``) before and after the steps.
- DD's adaptation (Sec. 3.4 / 4.3, ``--mode distill_adapt``): nothing here, ``fetcher=pretrained`` hands
  theta_0 from networks pretrained on a source dataset; :meth:`report` gives the held-out networks' test
  accuracy before (``dd_replay_before_acc``) and after (``dd_replay_acc``) the learned steps.
- Learned labels on fixed images (Bohdal, Yang & Hospedales, "Flexible Dataset Distillation: Learn Labels
  Instead of Images", 2020, Sec. 3.2; reference ondrejbohdal/label-distillation ``label_distillation_or2.py``):
  ``learn_labels=true`` with ``label_init=uniform`` (the reference starts at 1/K everywhere) and ``lr_img=0``
  (the images leave the optimizer), ``conf/method/ld.yaml``. Its inner step size is fixed (``lr_lr=0``), so S
  stores none: the evaluation trains with ``evaluator.lr``, as the paper's networks trained on the distilled
  labels use their own optimizer.
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
    ``i mod syn_steps`` holds images ``[s*m, (s+1)*m)`` of every class, m = ipc / syn_steps; ``lrs`` ``[T]``. The
    classes are S's blocks of ``ipc`` images (S is stored class by class), so the batches stay the same while
    learned labels change (label distillation)."""
    m, ipc = syn.ipc // syn_steps, syn.ipc
    per_class = [torch.arange(c * ipc, (c + 1) * ipc, device=syn.images.device) for c in range(syn.num_classes)]
    batches = [torch.cat([idx[s * m:(s + 1) * m] for idx in per_class]) for s in range(syn_steps)]
    return [(syn.images[batches[i % syn_steps]], syn.labels[batches[i % syn_steps]], lrs[i])
            for i in range(syn_steps * syn_epochs)]


def step_sizes(syn: SyntheticSet, syn_steps: int) -> torch.Tensor:
    """S's per-step step sizes ``[syn_steps * syn_epochs]``: the learned ones (``syn.syn_lr``), or, for a set whose
    step sizes were not learned (``objective.lr_lr=0``, label distillation), the fixed ``inner_lr`` for
    ``syn_epochs`` passes that its meta records.

    Raises:
        ConfigError: S holds no DD steps at all (:func:`require_steps`).
    """
    require_steps(syn)
    if syn.syn_lr is not None:
        return syn.syn_lr.detach()
    return torch.full((syn_steps * int(syn.meta["syn_epochs"]),), float(syn.meta["inner_lr"]),
                      device=syn.images.device)


def has_steps(syn: SyntheticSet) -> bool:
    """Whether S holds DD's steps (learned per-step step sizes, or a fixed inner step size in its meta)."""
    if syn.syn_lr is not None:
        return syn.syn_lr.dim() == 1
    return syn.meta.get("inner_lr") is not None and syn.meta.get("syn_epochs") is not None


def require_steps(syn: SyntheticSet) -> None:
    """Refuse S without DD's steps (:func:`has_steps`), e.g. a DM or MTT set given to the replay.

    Raises:
        ConfigError: one line: replay evaluates DD sets only, and which evaluators to use instead.
    """
    if not has_steps(syn):
        raise ConfigError(f"evaluator=replay evaluates DD sets only (method=dd or method=ld, whose S holds DD's "
                          f"per-step step sizes); this S (method={syn.meta.get('method', 'unknown')}) has none: "
                          f"evaluate it with evaluator=default or evaluator=cross_arch")


def replay(net: nn.Module, syn: SyntheticSet, syn_steps: int) -> dict[str, torch.Tensor]:
    """DD's own protocol (Wang et al. 2018, Sec. 3.2-3.3): the parameters of ``net`` (theta_0) after exactly S's
    steps, ``theta_{i+1} = theta_i - eta_i * grad l(theta_i; S_{i mod syn_steps})`` with S's per-step step sizes
    (:func:`step_sizes`: ``syn.syn_lr`` ``[syn_steps * syn_epochs]``, detached, or the fixed ones its meta records;
    the network in train mode).

    Raises:
        ConfigError: S has no DD steps, or the number of its step sizes is not a multiple of ``syn_steps``, or
            ``syn_steps`` does not divide ipc.
    """
    if syn_steps < 1:
        raise ConfigError(f"syn_steps={syn_steps}: must be >= 1; pass the objective.syn_steps S was distilled with")
    lrs = step_sizes(syn, syn_steps)
    if len(lrs) % syn_steps or syn.ipc % syn_steps:
        raise ConfigError(f"syn_steps={syn_steps} does not fit S ({len(lrs)} step sizes, ipc {syn.ipc}): pass the "
                          f"objective.syn_steps S was distilled with")
    net.train()
    with torch.enable_grad():
        return unroll_steps(net, params_of(net), dd_steps(syn, syn_steps, len(lrs) // syn_steps, lrs),
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
        learn_labels: learn S's labels as soft labels (with ``lr_labels``).
        label_init: their start: ``onehot`` (the labels S has) or ``uniform`` (all logits 0, Bohdal et al.).
        attack: ``{"source": a, "target": b}``: DD's poisoning (module doc); both None: off.
        Others: :class:`~ddrun.contracts.Objective` (``batch_real`` per class; ``lr_lr``: step size of
            ``softplus^-1`` of the step sizes, the reference's Adam lr 0.01; 0 or null keeps them fixed at
            ``lr_init`` and out of S: S then stores no step size, evaluators train with their own
            ``evaluator.lr``, and S's meta records ``inner_lr`` / ``syn_epochs`` for the replay; ``lr_img`` 0
            freezes the images).

    Raises:
        ConfigError: a non-positive count or step size; ``syn_steps`` not dividing ipc (at ``prepare``); an attack
            with only one class, the same class twice or a class the dataset does not have (at ``prepare``).
        DdrunError: the unroll would not fit in memory; a learned step size became NaN.
    """

    stores_steps = True  # S's meta records syn_steps (and the step sizes or inner_lr): evaluator=replay replays them

    def __init__(self, syn_steps: int = 10, syn_epochs: int = 3, lr_init: float = 0.02, truncate: int | None = None,
                 memory_limit: float | None = None, report_nets: int = 1, learn_labels: bool = False,
                 label_init: str = "onehot", attack: dict | None = None, **kwargs):
        super().__init__(**kwargs)
        if label_init not in ("onehot", "uniform"):
            raise ConfigError(f"objective.label_init={label_init!r}: valid values are ['onehot', 'uniform']")
        attack = dict(attack or {})
        self.attack = (attack.get("source"), attack.get("target"))
        self.learn_labels, self.label_init = bool(learn_labels), label_init
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

    def _check_attack(self, num_classes: int) -> None:
        a, b = self.attack
        if a is None and b is None:
            return
        valid = f"two different classes in 0..{num_classes - 1}"
        if a is None or b is None:
            raise ConfigError(f"objective.attack: source={a}, target={b}: set both, {valid}, or neither")
        if not (0 <= int(a) < num_classes and 0 <= int(b) < num_classes):
            raise ConfigError(f"objective.attack: source={a}, target={b}: the dataset has classes "
                              f"0..{num_classes - 1}; pick {valid}")
        if int(a) == int(b):
            raise ConfigError(f"objective.attack: source={a} equals target={b}: pick {valid}")
        self.attack = (int(a), int(b))

    @property
    def attacking(self) -> bool:
        return self.attack[0] is not None

    def prepare(self, syn: SyntheticSet, real: RealData) -> None:
        self._check_attack(real.num_classes)
        if syn.ipc % self.syn_steps:
            raise ConfigError(f"objective.syn_steps={self.syn_steps} must divide ipc={syn.ipc}: DD gives every "
                              f"step its own ipc/syn_steps images of each class")
        if self.learn_labels:
            syn.learn_labels(scale=0.0 if self.label_init == "uniform" else 1.0)
        t = self.syn_steps * self.syn_epochs
        syn.meta["syn_steps"] = self.syn_steps  # how the per-step step sizes map to batches of S (replay)
        raw = torch.full((t,), self.lr_init, device=syn.images.device).expm1().log()  # softplus^-1
        if self.learns_lr:
            syn.learn_lr(self.lr_init, steps=t)
            syn.syn_lr.requires_grad_(False)  # optimized through raw_lr
            self.raw_lr = nn.Parameter(raw)
            return
        # a fixed inner step size (label distillation: "inner lr 0.01, not learned") is no property of S: S stores
        # no step size (evaluators train with their own evaluator.lr), its meta records the fixed steps (replay)
        syn.syn_lr = None
        syn.meta.update(inner_lr=self.lr_init, syn_epochs=self.syn_epochs)
        self.raw_lr = raw

    def param_groups(self, syn: SyntheticSet) -> list[dict]:
        groups = syn.param_groups(self.lr_img, None, self.lr_labels)
        if self.learns_lr:
            groups.append({"params": [self.raw_lr], "lr": self.lr_lr, "name": "lr"})
        return groups

    @property
    def learns_lr(self) -> bool:
        """Whether the step sizes are learned (``lr_lr`` > 0) and stored in S."""
        return bool(self.lr_lr)

    def check(self, syn: SyntheticSet, it: int) -> None:
        if not self.learns_lr:
            return
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
        step sizes are ``softplus(raw_lr)`` (differentiable when learned), without it S's (:func:`step_sizes`)."""
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
        if self.attacking:  # poisoning: the steps should make class a look like class b
            y_real = torch.where(y_real == self.attack[0], torch.full_like(y_real, self.attack[1]), y_real)
        params = self.unroll(syn, net)
        net.eval()
        loss = F.cross_entropy(forward(net, params, x_real), y_real)
        net.train()
        return loss

    @torch.no_grad()
    def predictions(self, net: nn.Module, params: dict[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
        """int64 ``[N]``: the classes ``net`` with ``params`` (eval mode) predicts for ``images``."""
        net.eval()
        out = torch.cat([forward(net, params, images[s:s + 1000]).argmax(1) for s in range(0, len(images), 1000)])
        net.train()
        return out

    def replay(self, syn: SyntheticSet, real: RealData, net: nn.Module) -> dict[str, float]:
        """The paper's evaluation of one network: test accuracy (percent, whole real test split) before and after
        exactly the learned steps (``dd_replay_before_acc``, ``dd_replay_acc``; e.g. "10 distilled images train a
        fixed-init LeNet from 12.9% to 94%"); with an attack, the percentage of the test images of class a
        predicted as b, before and after (``dd_attack_before``, ``dd_attack_success``)."""
        with torch.enable_grad():
            after = self.unroll(syn, net, graph=False)
        y = real.test_labels
        out = {}
        for tag, params in (("before", params_of(net)), ("after", after)):
            pred = self.predictions(net, params, real.test_images)
            out["dd_replay_acc" if tag == "after" else "dd_replay_before_acc"] = \
                100.0 * float((pred == y).float().mean()) if len(y) else 0.0
            if self.attacking:
                a, b = self.attack
                of_a = pred[y == a]
                out["dd_attack_success" if tag == "after" else "dd_attack_before"] = \
                    100.0 * float((of_a == b).float().mean()) if len(of_a) else 0.0
        return out

    def replay_accuracy(self, syn: SyntheticSet, real: RealData, net: nn.Module) -> float:
        """Test accuracy (percent) of ``net`` trained by exactly the learned steps (:meth:`replay`)."""
        return self.replay(syn, real, net)["dd_replay_acc"]

    def report(self, syn: SyntheticSet, real: RealData, fetcher: Fetcher, seed: int) -> dict[str, float]:
        """:meth:`replay` averaged over ``report_nets`` networks the run never trained on (``fetcher.held_out(r)``:
        fresh initializations, the fixed theta_0 itself with ``fetcher=fixed``, held-out pretrained networks with
        ``fetcher=pretrained``)."""
        if self.report_nets < 1:
            return {}
        runs = [self.replay(syn, real, fetcher.held_out(r)) for r in range(self.report_nets)]
        return {k: sum(r[k] for r in runs) / len(runs) for k in runs[0]}
