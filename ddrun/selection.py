"""Validation-based selection and early stopping of S (the loop's ``early_stopping`` settings).

RFAD (Loo, Hasani, Amini & Rus, "Efficient Dataset Distillation using Random Feature Approximation", NeurIPS
2022; reference yolky/RFAD ``run_distillation.py`` / ``distillation.py``) does not keep the last S: every 40
iterations it scores S by the objective's own kernel-regression loss on a validation split of 500 images per class
drawn from the *training* split (16 fixed random networks), keeps the S with the lowest validation loss, stops
1000 iterations after the best one and returns that S ("early stopping at iter i, reverting back to model from
iter b"). This module is that rule for any objective that implements
:meth:`ddrun.contracts.Objective.validation`; the loop (``ddrun.distill``) calls it, writes the best S to
``synthetic_best.pt`` and, with ``revert``, makes it the run's final S. Unlike ``keep_best`` (selection by the
evaluator's *test* accuracy), the test split is never looked at.

The validation images are a class-balanced sample of the training split drawn once from the run's seed
(:meth:`ddrun.data.datasets.RealData.balanced_sample`, without replacement; the reference draws with replacement),
and stay in the training split as in the reference.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ddrun.data.datasets import RealData, describe_per_class
from ddrun.utils import ConfigError, derive_seed


@dataclass
class Selection:
    """Where the selection stands (saved in ``checkpoint.pt``): the best validation loss and its iteration, the
    last iteration validated, the iteration the run ended at (None: not yet) and whether it ended by early stopping
    (else at its last iteration)."""

    best_loss: float | None = None
    best_iteration: int | None = None
    validated_at: int | None = None
    ended_at: int | None = None
    stopped: bool = False


class EarlyStopping:
    """Validation-based selection of S with optional early stopping (module doc).

    Args:
        every: validate S every N iterations (and at the last one); null/0 switches the rule off (see
            :meth:`from_config`).
        patience: stop when this many iterations have passed since the best validation (None: run all
            ``iterations``, still selecting the best S).
        val_per_class: validation images per class drawn from the training split.
        revert: at the end, make the best S the run's final S (RFAD); False keeps the last S as ``synthetic.pt`` and
            the best one only in ``synthetic_best.pt``.

    Raises:
        ConfigError: ``every`` < 1, ``patience`` < 0 or ``val_per_class`` < 1.
    """

    def __init__(self, every: int, patience: int | None = None, val_per_class: int = 500, revert: bool = True):
        if int(every) < 1:
            raise ConfigError(f"early_stopping.every={every}: must be >= 1 (or null to switch early stopping off)")
        if patience is not None and int(patience) < 0:
            raise ConfigError(f"early_stopping.patience={patience}: must be >= 0 or null (never stop early)")
        if int(val_per_class) < 1:
            raise ConfigError(f"early_stopping.val_per_class={val_per_class}: must be >= 1")
        self.every, self.val_per_class, self.revert = int(every), int(val_per_class), bool(revert)
        self.patience = None if patience is None else int(patience)
        self.state = Selection()
        self.x_val: torch.Tensor | None = None
        self.y_val: torch.Tensor | None = None
        self.drawn_counts: list[int] | None = None  # validation images drawn per class (after draw)

    @classmethod
    def from_config(cls, node) -> "EarlyStopping | None":
        """The rule from the ``early_stopping`` config node, or None when it is absent or ``every`` is null."""
        if node is None or node.get("every") in (None, 0):
            return None
        return cls(node["every"], node.get("patience"), node.get("val_per_class", 500), node.get("revert", True))

    def draw(self, real: RealData, seed: int) -> None:
        """Draw the validation split (``val_per_class`` per class of the training split, all of a class that has
        fewer) from ``seed``; ``drawn_counts`` becomes the images drawn per class."""
        g = torch.Generator().manual_seed(derive_seed(seed, 104729))
        self.x_val, self.y_val = real.balanced_sample(self.val_per_class, g)
        self.drawn_counts = torch.bincount(self.y_val.cpu(), minlength=real.num_classes).tolist()

    def due(self, it: int, last: int) -> bool:
        """Whether S is validated before iteration ``it`` (every ``every`` iterations, and at the last one
        ``last``) and has not been already (a resumed run does not validate the same iteration twice)."""
        return (it % self.every == 0 or it == last) and self.state.validated_at != it

    def observe(self, it: int, loss: float) -> bool:
        """Record the validation loss of S at iteration ``it``; True when it is the best so far (strictly lower;
        the first one counts)."""
        st = self.state
        st.validated_at = it
        if st.best_loss is None or loss < st.best_loss:
            st.best_loss, st.best_iteration = float(loss), it
            return True
        return False

    def exhausted(self, it: int) -> bool:
        """Whether ``patience`` iterations have passed since the best validation (RFAD: ``i > best_iter +
        patience``)."""
        st = self.state
        return self.patience is not None and st.best_iteration is not None and it > st.best_iteration + self.patience

    def describe(self, objective_name: str) -> str:
        """How S is selected, for the record and the kept file's metadata: the validation images per class
        actually drawn (after :meth:`draw`; a class with fewer training images than ``val_per_class`` gives all
        of them: :func:`~ddrun.data.datasets.describe_per_class`)."""
        return f"lowest validation loss of {objective_name} on " \
               f"{describe_per_class(self.drawn_counts, self.val_per_class)} of the training split, every " \
               f"{self.every} iterations"

    def state_dict(self) -> dict:
        return asdict(self.state)

    def load_state_dict(self, state: dict) -> None:
        self.state = Selection(**state)


# the objectives that implement Objective.validation (named in the error for one that does not)
VALIDATING = ("objective=kip", "objective=rfad")
