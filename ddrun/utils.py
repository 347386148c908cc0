"""Small shared helpers: errors, device resolution, seeding and file checksums."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import random
import sys
from pathlib import Path

import numpy as np
import torch


class DdrunError(Exception):
    """Base class of the errors ddrun reports to the user as one line, without a traceback."""


class ConfigError(DdrunError):
    """A configuration value is invalid; the message names the key and the valid values."""


class DataError(DdrunError):
    """A dataset or buffer file is missing or corrupt; the message names the path."""


@contextlib.contextmanager
def command_errors(command: str, log: logging.Logger):
    """Inside a Hydra command's ``main``: turn a :class:`DdrunError` into one line on stderr (and the run's log)
    and exit status 1, without a traceback; in a multirun re-raise it, so the sweep marks this job failed, runs
    the others and reports the failure at the end. A stop on a signal after checkpointing
    (:class:`ddrun.checkpoint.Preempted`) exits with ``128 + signal``, as a process killed by it would.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from ddrun.checkpoint import Preempted

    try:
        yield
    except Preempted as exc:
        log.warning("%s", exc)
        print(f"ddrun {command}: {exc}", file=sys.stderr)
        sys.exit(128 + exc.signum)
    except DdrunError as exc:
        log.error("%s", exc)
        print(f"ddrun {command}: error: {exc}", file=sys.stderr)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise
        sys.exit(1)


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes, read in 4 MiB chunks (constant memory), e.g. ``"sha256"`` for buffer files,
    ``"md5"`` for torchvision's dataset checksums.

    Raises:
        OSError: the file cannot be read.
    """
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def load_tensors(path: str | Path, what: str, keys: tuple[str, ...] = (), mmap: bool = False) -> dict:
    """``torch.load(path, weights_only=True)`` onto the CPU, for files of tensors we or other tools wrote.

    Args:
        what: the kind of file, for messages (e.g. ``"expert file"``, ``"synthetic set"``).
        keys: keys the loaded dict must have.
        mmap: memory-map the tensors (read from disk when indexed).

    Raises:
        DataError: missing, truncated or corrupt file, or not a dict with ``keys`` (the message names the file).
    """
    try:
        d = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise DataError(f"{what} not found: {path}") from None
    except Exception as exc:
        raise DataError(f"corrupt or truncated {what} {path} ({type(exc).__name__}: {exc})") from None
    missing = [k for k in keys if not isinstance(d, dict) or k not in d]
    if missing:
        raise DataError(f"{path}: not a {what} (expected a dict with {', '.join(map(repr, keys))}; "
                        f"missing {', '.join(map(repr, missing))})")
    return d


def resolve_device(device: str) -> torch.device:
    """Map the ``device`` config value to a :class:`torch.device`.

    ``auto`` picks CUDA when available, else CPU; any other value is passed to ``torch.device``.

    Raises:
        ConfigError: the value names a device that is not available here.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device}: CUDA is not available on this machine (use device=auto or device=cpu)")
    return dev


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch (all devices) from one ``seed``; return a CPU generator seeded with it."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def derive_seed(*parts: int) -> int:
    """A deterministic 63-bit seed from integers (e.g. ``(seed, iteration)``), so each fetched network,
    augmentation draw or evaluation run is reproducible and independent of the others."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) & 0x7FFFFFFFFFFFFFFF
    return h


def build(node, *args, **kwargs):
    """``hydra.utils.instantiate(node, *args, **kwargs)``, re-raising a ddrun error raised inside the target as
    itself (Hydra wraps it in an InstantiationException with a traceback wall)."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node, *args, **kwargs)
    except InstantiationException as exc:
        cause = exc.__cause__
        while cause is not None and not isinstance(cause, DdrunError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise
