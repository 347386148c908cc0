"""A tiny teacher in a temporary store (tiny MNIST-format data, ConvNet-BN width 8, 2 epochs: seconds), shared by the
tests of the decoupled family."""

from __future__ import annotations

from pathlib import Path

from conftest import make_cfg


def tiny_args(root: Path, store: Path, *extra: str) -> list[str]:
    """Overrides shared by `ddrun teacher` / `ddrun distill` / `ddrun evaluate` for the tiny dataset and net."""
    return ["dataset=mnist", f"paths.data={root}", "dataset.system_dirs=[]", "net=convnet_bn", "net.width=8",
            f"paths.buffers={store}", *extra]


def make_teacher(root: Path, store: Path, *extra: str, epochs: int = 2) -> dict:
    from ddrun.teachers import teacher

    return teacher(make_cfg([*tiny_args(root, store), f"recipe.epochs={epochs}", "recipe.batch=32", *extra],
                            "teacher"))
