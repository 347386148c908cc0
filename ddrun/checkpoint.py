"""Atomic saving and resuming of run state."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def atomic_save(obj: object, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``.

    A crash or a full disk during the write leaves the previous file at ``path`` intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_checkpoint(path: str | Path) -> dict | None:
    """The checkpoint dict at ``path``, or None when there is none.

    Raises:
        DataError: the file exists but cannot be read (names the file).
    """
    from ddrun.utils import DataError

    path = Path(path)
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise DataError(f"corrupt checkpoint {path} ({type(exc).__name__}: {exc}); "
                        f"delete it to start over") from None
