"""Two small post-distillation stages for the contract tests (importable by Hydra's ``_target_`` because conftest
puts this folder on ``sys.path``). They are real stages: they change S, and the loop must apply each exactly once."""

from __future__ import annotations

from pathlib import Path

import torch

from ddrun.contracts import Stage


class Shift(Stage):
    """Adds ``value`` to every image of S."""

    name = "shift"

    def __init__(self, value: float = 1.0):
        self.value = float(value)

    def __call__(self, syn, real, seed):
        with torch.no_grad():
            syn.images.add_(self.value)
        return syn


class ScaleOnce(Stage):
    """Multiplies S's images by ``factor``; while ``fail_marker`` names a file that does not exist it creates it and
    raises KeyboardInterrupt instead (a run killed inside this stage)."""

    name = "scale"

    def __init__(self, factor: float = 2.0, fail_marker: str | None = None):
        self.factor, self.fail_marker = float(factor), fail_marker

    def __call__(self, syn, real, seed):
        if self.fail_marker and not Path(self.fail_marker).exists():
            Path(self.fail_marker).touch()
            raise KeyboardInterrupt("killed inside the stage")
        with torch.no_grad():
            syn.images.mul_(self.factor)
        return syn
