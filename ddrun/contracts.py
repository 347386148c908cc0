"""The contracts between ddrun's components: what the loop (``ddrun/distill.py``) calls, with which shapes.

Every component is built by Hydra from its config group (``conf/<group>/*.yaml``, ``_target_``) and must satisfy
one of the contracts below; ``tests/test_contracts.py`` builds every config file of every group and checks it.

    S = init(real, ipc, generator)                        Initializer        conf/init/
    param.encode_init(S, real, generator)                 Parametrization    conf/parametrization/
    for it in range(start, iterations):
        fetched = fetcher.fetch(it)                       Fetcher -> Fetched conf/fetcher/
        for step in range(schedule.steps):                Schedule           conf/schedule/ (ddrun.schedule)
            if step: fetched = schedule.between(fetched, param.decode(S), real, g)
            loss = objective(param.decode(S), real, fetched, it, g)         Objective, Parametrization
            optimizer_S.step(); scheduler_S.step()
        fetcher.release(fetched, S, real, g)
    for stage in stages: S = stage(S, real, seed)         Stage              conf/stage/
    evaluator(param.decode(S), real, seed)                Evaluator          conf/evaluator/

Conventions (DESIGN.md "Contracts"): images float32 ``[N, C, H, W]`` in the dataset's normalized (and ZCA) space;
labels int64 ``[N]`` (hard) or float32 ``[N, K]`` soft labels given as *logits*; accuracies in percent. All
randomness comes from generators derived from ``(seed, it)`` (``ddrun.utils.derive_seed``); components that draw
on their own (fetchers) derive theirs from the run's seed and the iteration, never from the loop's generator, so
one component's draws never shift another's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, runtime_checkable

import torch
from torch import nn

from ddrun.data.augment import DSA
from ddrun.data.datasets import RealData
from ddrun.synthetic import SyntheticSet
from ddrun.utils import derive_seed

Params = dict[str, torch.Tensor]

# seeds of the networks every fetcher draws from p(theta_0): network `it` of a run is built from
# derive_seed(seed, NET_SEED_TAG, it), held-out network r from derive_seed(seed, NET_SEED_TAG, -1 - r)
NET_SEED_TAG = 7919


@runtime_checkable
class Initializer(Protocol):
    """``(real, ipc, generator) -> SyntheticSet``: ``ipc`` images per class, ordered class by class, hard labels
    (``conf/init/*.yaml`` are partials of functions in ``ddrun.init``)."""

    def __call__(self, real: RealData, ipc: int, generator: torch.Generator) -> SyntheticSet: ...


@dataclass
class Fetched:
    """What a fetcher hands the objective for one iteration.

    Attributes:
        net: the network (on the run's device). Its parameters are the start of an expert segment for
            ``fetcher=checkpoints``, a pool member for ``fetcher=pool``, a fresh draw from p(theta_0) otherwise.
        start: (expert segments) the expert's parameters at the start epoch ``{name: tensor}``, or None.
        target: (expert segments) the expert's parameters ``expert_epochs`` later ``{name: tensor}``, or None.
        teacher: a frozen, trained network in eval mode (the decoupled family), or None.
        info: plain values describing the draw for logs (expert index, start epoch, pool member ...).
    """

    net: nn.Module
    start: Params | None = None
    target: Params | None = None
    teacher: nn.Module | None = None
    info: dict[str, Any] = field(default_factory=dict)


class Fetcher:
    """Answers "which network" for each iteration. The base builds networks from p(theta_0).

    Args:
        net: factory ``(channels, num_classes, im_size, **kwargs) -> nn.Module`` (the ``net`` config, partial).
        real: the real dataset (input shape and class count).
        device: where the fetched networks live.
        seed: the run's seed; every draw of iteration ``it`` comes from ``(seed, it)``.

    Subclasses implement :meth:`fetch`; the other methods are documented no-ops here.
    """

    def __init__(self, net: Callable[..., nn.Module], real: RealData, device: torch.device, seed: int):
        self.net_factory, self.real, self.device, self.seed = net, real, device, int(seed)

    def fresh(self, seed: int, **net_kwargs) -> nn.Module:
        """A network from the initialization distribution, built from ``seed`` on the CPU (the same weights on
        every device), moved to the device."""
        from ddrun.nets import build_net

        return build_net(self.net_factory, self.real, seed, self.device, **net_kwargs)

    def fetch(self, it: int) -> Fetched:
        """The network(s) of iteration ``it`` (``it >= 0``)."""
        raise NotImplementedError

    def held_out(self, r: int) -> nn.Module:
        """Held-out network ``r``: drawn like the run's starting networks but never trained on (DD's replay
        protocol evaluates the learned steps on these)."""
        return self.fresh(derive_seed(self.seed, NET_SEED_TAG, -1 - r))

    def release(self, fetched: Fetched, syn: SyntheticSet, real: RealData, generator: torch.Generator) -> None:
        """Called once after the last update of S made with ``fetched`` (no-op; FRePo's model pool trains its
        member one online step on S here)."""

    def state_dict(self) -> dict:
        """The fetcher's own state for ``checkpoint.pt`` (tensors and plain containers only)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` on resume."""


class Objective:
    """A distillation objective: ``__call__(syn, real, fetched, it, generator) -> loss``, a differentiable float
    scalar whose gradient reaches ``syn.images`` and, when learned, ``syn.syn_lr`` / ``syn.labels``.

    Args:
        lr_img: step size of the images.
        lr_lr: step size of the learned inner step size (None: not learned).
        lr_labels: step size of learned soft labels (None: not learned).
        batch_real: real images sampled per class per step.
        augment: Siamese DSA applied to each real/synthetic pair, or None.

    ``syn`` passed to ``__call__`` is the *decoded* set (``parametrization.decode(S)``); the hooks below get S
    itself.

    Attributes:
        stores_steps: class attribute, bool: the S this objective distils holds the per-step inner-loop steps that
            ``evaluator=replay`` replays (DD's ``syn_steps`` in S's meta); False by default. A run with a replay
            evaluator and an objective without it is refused at validation (``distill.check_replay_inits``).

    Raises:
        ConfigError: a negative step size or ``batch_real`` < 1 (one line naming the ``objective.`` key; a
            negative step would ascend the loss, a negative batch silently used all but that many images).
    """

    stores_steps: bool = False

    def __init__(self, lr_img: float, lr_lr: float | None = None, lr_labels: float | None = None,
                 batch_real: int = 256, augment: DSA | None = None):
        from ddrun.utils import ConfigError

        for key, value in (("lr_img", lr_img), ("lr_lr", lr_lr), ("lr_labels", lr_labels)):
            if value is not None and not float(value) >= 0:
                raise ConfigError(f"objective.{key}={value}: a step size must be >= 0 (0: not learned)")
        if batch_real is not None and int(batch_real) < 1:
            raise ConfigError(f"objective.batch_real={batch_real}: must be >= 1 (real images per class per step)")
        self.lr_img, self.lr_lr, self.lr_labels = lr_img, lr_lr, lr_labels
        self.batch_real, self.augment = batch_real, augment

    def prepare(self, syn: SyntheticSet, real: RealData) -> None:
        """Called once after initialization, before the optimizer of S is built: objectives that learn a step
        size or labels switch them on here (``syn.learn_lr(...)``, ``syn.learn_labels(...)``)."""

    def param_groups(self, syn: SyntheticSet) -> list[dict]:
        """The optimizer parameter groups of S (and of the objective's own learned parameters), each with its
        step size and a ``name``."""
        return syn.param_groups(self.lr_img, self.lr_lr, self.lr_labels)

    def accepts(self, loss: torch.Tensor) -> bool:
        """Whether this loss may update S (True; DATM's threshold gate skips the update of S when the matching
        loss is above its threshold)."""
        return True

    def check(self, syn: SyntheticSet, it: int) -> None:
        """Called after every update of S; raise a DdrunError when S's learned quantities became invalid."""

    def state_dict(self) -> dict:
        """The objective's own learned state (e.g. RFAD's Platt scale), saved in ``checkpoint.pt``."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` on resume (called after :meth:`prepare`)."""

    def report(self, syn: SyntheticSet, real: RealData, fetcher: Fetcher, seed: int) -> dict[str, float]:
        """Extra accuracies (percent) logged at each evaluation beside the evaluator's, where the paper reports
        its own protocol (KIP/RFAD: kernel-regression accuracy; DD: the learned steps replayed from theta_0)."""
        return {}

    def validation(self, syn: SyntheticSet, x_val: torch.Tensor, y_val: torch.Tensor, seed: int) -> dict[str, float]:
        """The objective's own score of S on a held-out validation split (images float ``[M, C, H, W]``, int64
        labels ``[M]``), for validation-based selection and early stopping of S (``early_stopping``,
        ``ddrun.selection``): ``{"val_loss": float (lower is better), "val_acc": percent, ...}``, the same for the
        same S and ``seed``. Objectives without one raise NotImplementedError (:func:`validates` tells)."""
        raise NotImplementedError

    def real_batch(self, real: RealData, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """A class-balanced real batch: ``batch_real`` images of every class, float ``[K * batch_real, C, H, W]``,
        and their int64 labels ``[K * batch_real]`` (KIP's ``class_balanced_sample``)."""
        return real.balanced_sample(self.batch_real, generator)

    def class_pairs(self, syn: SyntheticSet, real: RealData, generator: torch.Generator):
        """For each class c: ``(c, real_c, syn_c, syn_idx)`` with ``batch_real`` real images of class c and the
        synthetic images of class c, both passed through the same Siamese DSA draw when ``augment`` is set.

        Raises:
            DataError: S has no image of class c (soft labels whose argmax is another class, e.g. DATM's expert
                labels from weak experts), which a per-class objective cannot match."""
        for c in range(real.num_classes):
            idx = syn.class_slice(c)
            if len(idx) == 0:
                from ddrun.utils import DataError

                raise DataError(f"S has no image of class {c}: the argmax of every soft label is another class "
                                f"(e.g. init=expert_correct with experts that classify no image of class {c} "
                                f"correctly), and this objective matches class by class; pass "
                                f"init.soft_labels=false or train better experts")
            r, s = real.sample_class(c, self.batch_real, generator), syn.images[idx]
            if self.augment is not None and self.augment.enabled:
                r, s = self.augment.pair(r, s, generator)
            yield c, r, s, idx

    def __call__(self, syn: SyntheticSet, real: RealData, fetched: Fetched, it: int,
                 generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError


class Evaluator:
    """Trains fresh networks only on S and tests them on the real test split.

    ``__call__(syn, real, seed) -> {"acc_mean", "acc_std", "per_net": {arch: [acc, ...]}, "protocol": str,
    "protocol_fields": dict}`` (percent). Attributes every evaluator sets:

    Attributes:
        num_eval: networks trained per architecture (0: evaluation off).
        uses_learned_lr: whether the networks train with S's learned step size when S has one.
    """

    num_eval: int = 0
    uses_learned_lr: bool = False

    def protocol_fields(self) -> dict:
        """The protocol as plain fields (``ddrun.protocol``)."""
        raise NotImplementedError

    def protocol(self) -> str:
        """One line naming the protocol (``ddrun.protocol.describe`` of :meth:`protocol_fields`)."""
        from ddrun.protocol import describe

        return describe(self.protocol_fields())

    def prepare(self, real: RealData) -> None:
        """Load what the evaluator needs besides S (e.g. the KD evaluator's teachers) before the run's first
        iteration, so that a missing artefact stops the run at start-up, not at its first evaluation; default:
        nothing. Raises what loading raises (DataError naming the command that makes the artefact)."""

    def __call__(self, syn: SyntheticSet, real: RealData, seed: int = 0) -> dict:
        raise NotImplementedError


class Parametrization:
    """How the stored tensors of S become the training images that objectives and evaluators see.

    The base is the identity (``parametrization=pixels``): :meth:`decode` returns S itself. A factorized
    parametrization (IDC's multi-formation) returns a decoded view with more images than S stores; the storage
    budget is counted on S, the decoded count is stated in every result (:meth:`describe`).
    """

    name = "pixels"

    def decode(self, syn: SyntheticSet) -> SyntheticSet:
        """The training set made from S (differentiable w.r.t. S's parameters): S itself, or an object with S's
        read interface (``images``, ``labels``, ``lr``, ``syn_lr``, ``num_classes``, ``ipc``, ``soft``,
        ``hard_labels()``, ``class_slice(c)``, ``regression_targets()``, ``label_scale``, ``meta``)."""
        return syn

    def encode_init(self, syn: SyntheticSet, real: RealData, generator: torch.Generator) -> None:
        """Called once by the loop right after ``init`` when a run starts fresh (never on resume): a
        parametrization whose stored form is not pixels writes its own initialization into S in place (IDC:
        factor^2 real images downsampled into each stored image). The base does nothing."""

    def describe(self, syn: SyntheticSet) -> dict:
        """``{"parametrization", "stored_images", "decoded_images"}`` for results."""
        n = len(syn.images)
        return {"parametrization": self.name, "stored_images": n, "decoded_images": n}


class Stage:
    """A step after distillation, run once S is final and before the final evaluation (e.g. relabeling S with a
    teacher's soft labels). ``__call__(syn, real, seed) -> SyntheticSet``; what it changes is saved in
    ``synthetic.pt`` and in the checkpoint, so a killed run resumes after the stages already done.

    Attributes:
        name: the stage's name in logs and in the run state.
    """

    name = "stage"

    def prepare(self, real: RealData) -> None:
        """Load what the stage needs (e.g. the relabel stage's teachers) once the data is loaded, before the first
        iteration, so that a missing artefact stops the run at start-up; default: nothing."""

    def __call__(self, syn: SyntheticSet, real: RealData, seed: int) -> SyntheticSet:
        raise NotImplementedError


def validates(objective: Objective | None) -> bool:
    """Whether ``objective`` implements :meth:`Objective.validation`."""
    return objective is not None and type(objective).validation is not Objective.validation
