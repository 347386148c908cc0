"""Initializers of S: ``(real, ipc, generator) -> SyntheticSet``."""

from ddrun.init.experts import expert_correct
from ddrun.init.initializers import (adapt_images, base_images, herding, herding_select, kcenter, kcenter_greedy,
                                     noise, real)

__all__ = ["noise", "real", "kcenter", "kcenter_greedy", "herding", "herding_select", "expert_correct", "base_images",
           "adapt_images"]
