"""Safe file I/O shared by every part of ddrun that writes or reads artefacts.

- :func:`atomic_write` / :func:`atomic_save`: a temporary file in the same folder, flushed and fsynced, renamed over
  the target; a crash or a full disk leaves the previous file intact.
- :func:`load_tensors`: ``torch.load(..., weights_only=True)`` and nothing else. A file that holds pickled objects
  is refused as such (ddrun never executes them); a truncated or damaged one is reported as corrupt, naming it.
- :func:`digest` (content of nested tensors and containers) and :func:`file_digest` (bytes of a file).
- :func:`locked`: an advisory ``flock`` on a lock file, for read-modify-write of shared manifests.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import os
import pickle
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ddrun.utils import DataError


def fsync_dir(folder: Path) -> None:
    """fsync a directory (so a rename in it is durable); silently skipped where the OS does not allow it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_synced(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path``, flush and fsync it (no rename)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def temporary_path(path: Path) -> Path:
    """``.<name>.tmp<pid>`` beside ``path``: unique per process, so concurrent writers never share a temporary."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def atomic_write(data: bytes, path: str | Path, keep_previous: Path | None = None) -> None:
    """Write ``data`` to a temporary file in the same folder, flush and fsync it, then rename it over ``path``
    (with ``keep_previous``: first move the current ``path`` there).

    Raises:
        OSError: the write failed (e.g. ``ENOSPC``, ``EFBIG``, ``EDQUOT``); the temporary file is removed, ``path``
            (and ``keep_previous``) are untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        write_synced(tmp, data)
        if keep_previous is not None and path.exists():
            os.replace(path, keep_previous)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if tmp.exists() or tmp.is_symlink():
            tmp.unlink()


def serialized(obj: object) -> bytes:
    """``torch.save`` into memory, so a failing write surfaces as the file system's OSError rather than as a
    serializer error."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def atomic_save(obj: object, path: str | Path) -> None:
    """``torch.save`` through :func:`atomic_write`. Raises OSError as :func:`atomic_write`."""
    atomic_write(serialized(obj), path)


def digest(obj: object) -> str:
    """A SHA-256 over the content of a nested structure of dicts, lists, tensors and scalars (tensor dtype, shape
    and bytes; everything else by ``repr``), independent of how ``torch.save`` lays it out."""
    h = hashlib.sha256()

    def walk(x):
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(x, np.ndarray):
            h.update(f"A{x.dtype}{x.shape}".encode())
            h.update(np.ascontiguousarray(x).tobytes())
        elif isinstance(x, dict):
            h.update(b"{")
            for k in sorted(x, key=repr):
                h.update(repr(k).encode())
                walk(x[k])
            h.update(b"}")
        elif isinstance(x, (list, tuple)):
            h.update(b"[")
            for v in x:
                walk(v)
            h.update(b"]")
        else:
            h.update(repr(x).encode())

    walk(obj)
    return h.hexdigest()


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes, read in 4 MiB chunks (constant memory), e.g. ``"sha256"`` for store items,
    ``"md5"`` for torchvision's dataset checksums.

    Raises:
        OSError: the file cannot be read.
    """
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


class UnsafeFile(DataError):
    """A file holds pickled Python objects beyond tensors and plain containers: ddrun refuses to load it."""


def safe_load(path: str | Path, what: str, mmap: bool = False) -> object:
    """``torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)`` with one-line errors.

    Raises:
        DataError: the file is missing, or truncated / damaged (names the file).
        UnsafeFile: the file holds pickled objects (which ddrun never executes).
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise DataError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise DataError(f"{what} {path} is a folder, not a file") from None
    except pickle.UnpicklingError as exc:
        if "unsupported global" in str(exc).lower():  # a class or function to import: pickled objects
            raise UnsafeFile(f"refused {what} {path}: it holds pickled objects, which ddrun never executes "
                             f"(only tensors and plain containers are read)") from None
        raise DataError(f"corrupt or truncated {what} {path} ({type(exc).__name__})") from None
    except Exception as exc:  # noqa: BLE001 - torch raises assorted errors on damaged files
        first = str(exc).splitlines()[0].split(". ")[0].rstrip(".") if str(exc) else ""  # torch's first sentence
        raise DataError(f"corrupt or truncated {what} {path} ({type(exc).__name__}: {first[:200]})") from None


def load_tensors(path: str | Path, what: str, keys: tuple[str, ...] = (), mmap: bool = False) -> dict:
    """:func:`safe_load` of a dict of tensors that must hold ``keys``.

    Args:
        what: the kind of file, for messages (e.g. ``"expert file"``, ``"synthetic set"``).
        keys: keys the loaded dict must have.
        mmap: memory-map the tensors (read from disk when indexed).

    Raises:
        DataError: missing, truncated or corrupt file, or not a dict with ``keys`` (the message names the file).
        UnsafeFile: the file holds pickled objects.
    """
    d = safe_load(path, what, mmap)
    missing = [k for k in keys if not isinstance(d, dict) or k not in d]
    if missing:
        raise DataError(f"{path}: not a {what} (expected a dict with {', '.join(map(repr, keys))}; "
                        f"missing {', '.join(map(repr, missing))})")
    return d


@contextlib.contextmanager
def locked(lock_file: str | Path, blocking: bool = True) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``lock_file`` (created if needed) inside the block; yields True when held.
    With ``blocking=False`` it yields False at once when another process holds it (the block then runs unlocked:
    check the value)."""
    lock_file = Path(lock_file)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
