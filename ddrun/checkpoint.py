"""Preemption-safe run state: atomic checkpoints with a fallback, a run-directory lock, and stop signals.

- :func:`atomic_save` writes any object to a temporary file, fsyncs it and renames it over the target, so a crash
  or a full disk during the write leaves the previous file intact.
- :func:`save_checkpoint` / :func:`load_checkpoint` add a content digest (a bit flip or a truncated file is
  detected) and keep the previous checkpoint as ``checkpoint.prev.pt``: a corrupt ``checkpoint.pt`` is reported
  and the previous one used.
- :class:`RunLock` makes a run directory exclusive: a second job pointed at it refuses; a lock left by a dead
  process (same host, dead PID), by an earlier incarnation of the same SLURM job (requeue) or without a heartbeat
  for ``stale_after_s`` seconds (other host) is stale and taken over.
- :class:`StopSignals` turns SIGTERM / SIGUSR1 / SIGUSR2 (what SLURM and submitit send before a timeout or a
  preemption; submitit uses USR2 unless ``SUBMITIT_PREEMPT_SIGNAL`` says otherwise) into "save a checkpoint at the
  next safe point, then stop", handing the signal on to the handler that was installed before (submitit's, which
  requeues the job) or, where there was none, stopping with :class:`Preempted`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ddrun.utils import DataError, DdrunError

log = logging.getLogger("ddrun.checkpoint")

FORMAT = 1
STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2")


def _fsync_dir(folder: Path) -> None:
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


def atomic_write(data: bytes, path: str | Path) -> None:
    """Write ``data`` to a temporary file in the same folder, flush and fsync it, then rename it over ``path``.

    A crash or a full disk during the write leaves the previous file at ``path`` intact.

    Raises:
        OSError: the write failed (e.g. ``ENOSPC``, ``EFBIG``, ``EDQUOT``); the temporary file is removed, ``path``
            is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        _write_synced(tmp, data)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists() or tmp.is_symlink():
            tmp.unlink()


def _write_synced(tmp: Path, data: bytes) -> None:
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _serialized(obj: object) -> bytes:
    """``torch.save`` into memory, so a failing write surfaces as the file system's OSError (``ENOSPC``,
    ``EFBIG``, ``EDQUOT``) rather than as a serializer error."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def atomic_save(obj: object, path: str | Path) -> None:
    """``torch.save`` through :func:`atomic_write`.

    Raises:
        OSError: as :func:`atomic_write`.
    """
    atomic_write(_serialized(obj), path)


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


def previous_path(path: str | Path) -> Path:
    """``checkpoint.pt`` -> ``checkpoint.prev.pt``: where :func:`save_checkpoint` keeps the previous one."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Write ``state`` (a dict with at least ``iteration``) to ``path`` atomically, with a content digest, after
    moving the current ``path`` to :func:`previous_path`.

    The new file is complete and fsynced before anything is renamed, so a failed write (disk full, quota, I/O
    error) leaves both the current and the previous checkpoint as they were.

    Raises:
        OSError: the write failed; nothing on disk changed.
    """
    path = Path(path)
    payload = {**state, "format": FORMAT}
    payload["digest"] = digest(payload)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        _write_synced(tmp, _serialized(payload))
        if path.exists():
            os.replace(path, previous_path(path))
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists() or tmp.is_symlink():
            tmp.unlink()


def _read(path: Path) -> dict:
    """Load and verify one checkpoint file; raise ValueError / RuntimeError describing what is wrong."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or "iteration" not in state:
        raise ValueError("not a ddrun checkpoint (no 'iteration')")
    stored = state.pop("digest", None)
    if stored is not None and digest(state) != stored:
        raise ValueError("content digest mismatch (the file was altered or damaged)")
    return state


def load_checkpoint(path: str | Path) -> dict | None:
    """The newest valid checkpoint: ``path``, or when that is missing or corrupt, :func:`previous_path`.

    A corrupt file is reported (a warning naming it and the reason) and the previous one used. The returned dict
    has ``path`` set to the file it came from.

    Returns:
        the checkpoint dict, or None when neither file exists.

    Raises:
        DataError: files exist but none can be read (names them and the reasons).
    """
    path = Path(path)
    problems = []
    for candidate in (path, previous_path(path)):
        if not candidate.is_file():
            continue
        try:
            state = _read(candidate)
        except Exception as exc:  # noqa: BLE001 - any failure to read means: corrupt
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            problems.append(f"{candidate} ({reason})")
            log.warning("corrupt checkpoint %s (%s); trying the previous one", candidate, reason)
            continue
        if problems:
            log.warning("resuming from the previous checkpoint %s (iteration %d) instead of the corrupt %s",
                        candidate, int(state["iteration"]), path)
        state["path"] = str(candidate)
        return state
    if problems:
        raise DataError(f"no readable checkpoint: {'; '.join(problems)}; delete them to start over "
                        f"(or pass resume=false)")
    return None


# ---------------------------------------------------------------------------------------------------------------
# the run-directory lock


class RunLocked(DdrunError):
    """Another live run holds the run directory."""


_HELD: set[str] = set()  # lock files held by this process


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """An exclusive lock on a run directory: the file ``<run_dir>/.lock`` (JSON: pid, host, SLURM job id, start
    time), created with ``O_EXCL`` and touched every ``heartbeat_s`` seconds by a daemon thread.

    Hydra writes ``.hydra/*.yaml`` into the run directory before ddrun runs; the lock keeps a copy of the holder's,
    and a refused second job puts them back, so the directory keeps describing the run that owns it.

    Args:
        run_dir: the run directory.
        stale_after_s: a lock from another host whose heartbeat is older than this is stale.
        heartbeat_s: interval of the heartbeat.

    Raises:
        RunLocked: (from :meth:`acquire`) a live run holds the directory; the message names it.
    """

    def __init__(self, run_dir: str | Path, stale_after_s: float = 600.0, heartbeat_s: float = 30.0):
        self.path = Path(run_dir) / ".lock"
        self.stale_after_s, self.heartbeat_s = stale_after_s, heartbeat_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.info = {"pid": os.getpid(), "host": socket.gethostname(), "slurm_job_id": _slurm_job_id(),
                     "started": time.strftime("%Y-%m-%d %H:%M:%S")}

    def _stale_reason(self, other: dict) -> str | None:
        """Why the lock described by ``other`` is stale, or None when its holder may be alive."""
        if other.get("host") == self.info["host"]:
            pid = int(other.get("pid", -1))
            if pid == os.getpid():
                return None if str(self.path) in _HELD else "left by this process"
            return None if _pid_alive(pid) else f"process {pid} is dead"
        if other.get("slurm_job_id") and other.get("slurm_job_id") == self.info["slurm_job_id"]:
            return f"left by an earlier run of SLURM job {other['slurm_job_id']} (requeued)"
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return "gone"
        if age > self.stale_after_s:
            return f"no heartbeat for {age:.0f} s"
        return None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    other = json.loads(self.path.read_text() or "{}")
                except (OSError, ValueError):
                    other = {}
                reason = self._stale_reason(other)
                if reason is None:
                    self._restore_hydra(other.get("hydra_files") or {})
                    raise RunLocked(
                        f"run directory {self.path.parent} is in use by pid {other.get('pid')} on "
                        f"{other.get('host')} (since {other.get('started')}); two runs must not share a run "
                        f"directory: use another hydra.run.dir, or delete {self.path} if that run is dead") from None
                log.warning("taking over the stale lock %s (%s)", self.path, reason)
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump({**self.info, "hydra_files": self._hydra_files()}, f)
            # we hold the directory now: temporary files left by a writer that was killed mid-write are debris
            for tmp in self.path.parent.glob(".*.tmp[0-9]*"):
                with contextlib.suppress(OSError):
                    tmp.unlink()
            _HELD.add(str(self.path))
            self._thread = threading.Thread(target=self._beat, name="ddrun-lock-heartbeat", daemon=True)
            self._thread.start()
            return self
        raise RunLocked(f"could not lock {self.path}")

    def _hydra_files(self) -> dict[str, str]:
        folder = self.path.parent / ".hydra"
        return {p.name: p.read_text() for p in sorted(folder.glob("*.yaml"))} if folder.is_dir() else {}

    def _restore_hydra(self, files: dict[str, str]) -> None:
        for name, text in files.items():
            with contextlib.suppress(OSError):
                (self.path.parent / ".hydra" / Path(name).name).write_text(text)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if str(self.path) in _HELD:
            _HELD.discard(str(self.path))
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _slurm_job_id() -> str | None:
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID")


# ---------------------------------------------------------------------------------------------------------------
# stop signals


class Preempted(DdrunError):
    """The run stopped on a signal after saving its checkpoint; rerunning the same command resumes it.

    Attributes:
        signum: the signal number; the conventional exit status is ``128 + signum``.
    """

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class StopSignals:
    """Catch stop signals and turn them into a checkpoint and a clean stop (a context manager).

    Inside the ``with`` block, SIGTERM, SIGUSR1 and SIGUSR2 only set :attr:`pending`; the loop calls
    :meth:`stop` at its next safe point, after saving a checkpoint of that point. Inside :meth:`interruptible`
    (while the checkpoint on disk is current, e.g. during an evaluation), a signal stops at once.

    :meth:`stop` hands the signal on to the handler installed before (submitit's handler checkpoints the job
    description, requeues it and exits; a handler that returns lets the run go on); where the previous action
    was the default one (terminate), it raises :class:`Preempted`. Outside the main thread nothing is installed.
    """

    def __init__(self, signals: tuple[str, ...] = STOP_SIGNALS):
        self.signals = [getattr(signal, s) for s in signals if hasattr(signal, s)]
        self.previous: dict[int, object] = {}
        self.pending: int | None = None
        self._current: tuple[int, str] | None = None

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self.previous[s] = signal.getsignal(s)
                signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for s, prev in self.previous.items():
            signal.signal(s, prev if prev is not None else signal.SIG_DFL)
        self.previous.clear()

    def _handler(self, signum: int, frame) -> None:
        log.warning("received %s", signal.Signals(signum).name)
        self.pending = signum
        if self._current is not None:
            self.stop(*self._current)

    @contextlib.contextmanager
    def interruptible(self, iteration: int, checkpoint: str | Path) -> Iterator[None]:
        """A block during which the checkpoint on disk (``checkpoint``, at ``iteration``) is current: a signal
        (also one received just before) stops at once."""
        self._current = (iteration, str(checkpoint))
        try:
            if self.pending is not None:
                self.stop(iteration, str(checkpoint))
            yield
        finally:
            self._current = None

    def stop(self, iteration: int, checkpoint: str | Path) -> None:
        """The checkpoint at ``iteration`` is saved: act on the pending signal (see the class doc)."""
        signum, self.pending = self.pending, None
        if signum is None:
            return
        name = signal.Signals(signum).name
        log.warning("%s: checkpoint of iteration %d saved in %s", name, iteration, checkpoint)
        prev = self.previous.get(signum, signal.SIG_DFL)
        if callable(prev):
            self._current = None
            prev(signum, None)  # submitit: requeue and exit; returning means "go on"
            return
        if prev == signal.SIG_IGN:
            return
        raise Preempted(f"stopped by {name} at iteration {iteration}; the checkpoint {checkpoint} is saved: rerun "
                        f"the same command (same run directory) to resume", signum)


# ---------------------------------------------------------------------------------------------------------------
# random number generator states


def rng_state() -> dict:
    """The global RNG states: torch CPU, CUDA (every device, when CUDA is initialized), NumPy and Python."""
    import random

    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized()
            else [],
            "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned (CUDA states only where this machine has as many devices)."""
    import random

    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all(cuda)
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
