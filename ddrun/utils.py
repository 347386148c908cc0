"""Small shared helpers: errors, device resolution, seeding, instantiation."""

from __future__ import annotations

import contextlib
import logging
import random
import sys
from typing import Callable, TypeVar

import numpy as np
import torch
from hydra.errors import CompactHydraException

T = TypeVar("T")


class DdrunError(Exception):
    """Base class of the errors ddrun reports to the user as one line, without a traceback."""


class ConfigError(DdrunError):
    """A configuration value is invalid; the message names the key and the valid values."""


class DataError(DdrunError):
    """A dataset or buffer file is missing or corrupt; the message names the path."""


class JobFailed(CompactHydraException):
    """A multirun job failed with a :class:`DdrunError`: raised to Hydra, which marks the job failed, runs the
    others, and at the end prints this message alone (a ``CompactHydraException`` gets no traceback)."""


class Preempted(DdrunError):
    """The run stopped on a signal after saving its checkpoint; rerunning the same command resumes it.

    Attributes:
        signum: the signal number; the conventional exit status is ``128 + signum``.
    """

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def _log_to_files(log: logging.Logger, level: int, message: str) -> None:
    """Write ``message`` to the run's log file(s) only: the console already gets it once, on stderr."""
    record = log.makeRecord(log.name, level, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers + log.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


@contextlib.contextmanager
def command_errors(command: str, log: logging.Logger):
    """Inside a Hydra command's ``main``: turn a :class:`DdrunError` into one line on stderr (and in the run's log
    file) and exit status 1, without a traceback; in a multirun raise it again as a job failure, so the sweep marks
    this job failed, runs the others and ends with that one line (exit status 1). A stop on a signal after
    checkpointing (:class:`Preempted`) exits with ``128 + signal``, as a process killed by it would.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        yield
    except Preempted as exc:
        _log_to_files(log, logging.WARNING, str(exc))
        print(f"ddrun {command}: {exc}", file=sys.stderr)
        sys.exit(128 + exc.signum)
    except DdrunError as exc:
        _log_to_files(log, logging.ERROR, str(exc))
        line = f"ddrun {command}: error: {exc}"
        print(line, file=sys.stderr)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise JobFailed(f"{line} (job {HydraConfig.get().job.num})") from None
        sys.exit(1)


def resolve_device(device: str) -> torch.device:
    """Map the ``device`` config value to a :class:`torch.device`: ``auto`` (CUDA when available, else Apple's MPS
    when available, else CPU), ``cpu``, ``cuda``, ``cuda:N``, ``mps``.

    Raises:
        ConfigError: another value, or a device this machine does not have (names what it has).
    """
    import re

    device = str(device)
    have = ["cpu"] + ([f"cuda (cuda:0 .. cuda:{torch.cuda.device_count() - 1})"] if torch.cuda.is_available() else [])
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    have += ["mps"] if mps else []
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?|mps", device):
        raise ConfigError(f"device={device}: valid values are auto, cpu, cuda, cuda:N, mps (this machine has: "
                          f"{', '.join(have)})")
    dev = torch.device(device)
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise ConfigError(f"device={device}: not available on this machine (it has: {', '.join(have)}); use "
                          f"device=auto")
    if dev.type == "mps" and not mps:
        raise ConfigError(f"device=mps: Apple's MPS is not available on this machine (it has: {', '.join(have)}); "
                          f"use device=auto")
    return dev




def host_to(t: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``t.to(device, dtype)`` for a CPU tensor drawn on the host (random draws, indices, parameters), without
    stalling the host: to a GPU through pinned memory with ``non_blocking=True``. A plain copy from pageable memory
    synchronizes the stream (PyTorch waits for it), so a loop that moves its draws that way waits for every kernel
    queued before each draw and runs one launch at a time. The same values either way. A view with repeated elements
    (``expand``) is made contiguous first: pinning keeps the strides, and a copy into such a tensor is refused."""
    if device.type == "cuda":
        return t.contiguous().pin_memory().to(device, dtype, non_blocking=True)
    return t.to(device, dtype)


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch (all devices) from one ``seed``; return a CPU generator seeded with it."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def seeded(make: Callable[[], T], seed: int) -> T:
    """``make()`` with torch's CPU generator seeded by ``seed`` inside ``torch.random.fork_rng``, so the global CPU
    random state is the same afterwards. How every network is built (``ddrun.nets.build_net``): its weights depend
    on ``seed`` only, on every device."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


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
