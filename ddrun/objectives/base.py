"""What every objective shares."""

from __future__ import annotations

import torch
from torch import nn

from ddrun.data.augment import DSA
from ddrun.data.datasets import RealData
from ddrun.synthetic import SyntheticSet


class Objective:
    """Base of the distillation objectives.

    Subclasses implement ``__call__(syn, real, net, it, generator) -> loss`` (a differentiable scalar whose
    gradient reaches ``syn.images`` and, when learned, ``syn.syn_lr`` / ``syn.labels``).

    Args:
        lr_img: step size of the images.
        lr_lr: step size of the learned inner step size (None: not learned).
        lr_labels: step size of learned soft labels (None: not learned).
        batch_real: real images sampled per class per step.
        augment: Siamese DSA applied to each real/synthetic pair, or None.
    """

    def __init__(self, lr_img: float, lr_lr: float | None = None, lr_labels: float | None = None,
                 batch_real: int = 256, augment: DSA | None = None):
        self.lr_img, self.lr_lr, self.lr_labels = lr_img, lr_lr, lr_labels
        self.batch_real, self.augment = batch_real, augment

    def prepare(self, syn: SyntheticSet, real: RealData) -> None:
        """Called once after initialization, before the optimizer of S is built: objectives that learn a step
        size or labels switch them on here (``syn.learn_lr(...)``, ``syn.learn_labels(...)``)."""

    def check(self, syn: SyntheticSet, it: int) -> None:
        """Called after every update of S; raise a DdrunError when S's learned quantities became invalid."""

    def state_dict(self) -> dict:
        """The objective's own learned state (e.g. RFAD's Platt scale), saved in ``checkpoint.pt``."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` on resume (called after :meth:`prepare`)."""

    def report(self, syn: SyntheticSet, real: RealData, fetcher, seed: int) -> dict[str, float]:
        """Extra accuracies (percent) logged at each evaluation beside the evaluator's, where the paper reports
        its own protocol (KIP/RFAD: kernel-regression accuracy; DD: the learned steps replayed from theta_0)."""
        return {}

    def real_batch(self, real: RealData, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """A class-balanced real batch: ``batch_real`` images of every class, float ``[K * batch_real, C, H, W]``,
        and their int64 labels ``[K * batch_real]`` (KIP's ``class_balanced_sample``)."""
        xs = [real.sample_class(c, self.batch_real, generator) for c in range(real.num_classes)]
        ys = [torch.full((len(x),), c, dtype=torch.long, device=x.device) for c, x in enumerate(xs)]
        return torch.cat(xs), torch.cat(ys)

    def param_groups(self, syn: SyntheticSet) -> list[dict]:
        return syn.param_groups(self.lr_img, self.lr_lr, self.lr_labels)

    def class_pairs(self, syn: SyntheticSet, real: RealData, generator: torch.Generator):
        """For each class c: ``(c, real_c, syn_c, syn_idx)`` with ``batch_real`` real images of class c and the
        synthetic images of class c, both passed through the same Siamese DSA draw when ``augment`` is set."""
        for c in range(real.num_classes):
            idx = syn.class_slice(c)
            r, s = real.sample_class(c, self.batch_real, generator), syn.images[idx]
            if self.augment is not None and self.augment.enabled:
                r, s = self.augment.pair(r, s, generator)
            yield c, r, s, idx

    def __call__(self, syn: SyntheticSet, real: RealData, net: nn.Module, it: int,
                 generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError
