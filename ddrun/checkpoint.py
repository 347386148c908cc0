"""Preemption-safe run state: the run-state object, atomic checkpoints with a fallback, a run-directory lock, and
stop signals.

- :class:`RunState`: what the loop carries between iterations (iteration, seconds, metrics, last result, W&B id,
  evaluation marks, stages done). :meth:`RunState.save` writes it with every component's state as one checkpoint;
  :meth:`RunState.load` reads it back.
- :func:`save_checkpoint` / :func:`load_checkpoint` add a content digest (a bit flip or a truncated file is
  detected) and keep the previous checkpoint as ``checkpoint.prev.pt``: a corrupt ``checkpoint.pt`` is reported
  and the previous one used. Checkpoints hold tensors and plain containers only (the config as a JSON string, RNG
  states as tensors) and are read with ``torch.load(weights_only=True)``: a file holding pickled objects is refused
  as such, never executed.
- :class:`RunLock` makes a run directory exclusive: a second job pointed at it refuses; a lock left by a dead
  process (same host, dead PID), by an earlier incarnation of the same SLURM job (requeue) or without a heartbeat
  for ``stale_after_s`` seconds (other host) is stale and taken over.
- :class:`StopSignals` turns SIGTERM / SIGUSR1 / SIGUSR2 (what SLURM and submitit send before a timeout or a
  preemption; submitit uses USR2 unless ``SUBMITIT_PREEMPT_SIGNAL`` says otherwise) and Ctrl-C (SIGINT) into "save
  a checkpoint at the next safe point, then stop", handing the signal on to the handler that was installed
  before (submitit's, which requeues the job) or, where there was none, stopping with :class:`Preempted`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import signal
import socket
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ddrun.files import UnsafeFile, atomic_write, digest, safe_load, serialized
from ddrun.utils import DataError, DdrunError, Preempted

log = logging.getLogger("ddrun.checkpoint")

FORMAT = 2
STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2")


def previous_path(path: str | Path) -> Path:
    """``checkpoint.pt`` -> ``checkpoint.prev.pt``: where :func:`save_checkpoint` keeps the previous one."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Write ``state`` (a dict with at least ``iteration``; tensors and plain containers) to ``path`` atomically,
    with a content digest, after moving the current ``path`` to :func:`previous_path`.

    The new file is complete and fsynced before anything is renamed, so a failed write (disk full, quota, I/O
    error) leaves both the current and the previous checkpoint as they were.

    Raises:
        OSError: the write failed; nothing on disk changed.
    """
    payload = {**state, "format": FORMAT}
    payload["digest"] = digest(payload)
    atomic_write(serialized(payload), path, keep_previous=previous_path(path))


def _read(path: Path) -> dict:
    """Load (``weights_only=True``) and verify one checkpoint file; raise DataError / ValueError saying what is
    wrong."""
    state = safe_load(path, "checkpoint")
    if not isinstance(state, dict) or "iteration" not in state:
        raise ValueError("not a ddrun checkpoint (no 'iteration')")
    stored = state.pop("digest", None)
    if stored is not None and digest(state) != stored:
        raise ValueError("content digest mismatch (the file was altered or damaged)")
    if state.get("format") != FORMAT:
        raise ValueError(f"written by another ddrun version (format {state.get('format')}, this one reads "
                         f"{FORMAT})")
    return state


def load_checkpoint(path: str | Path) -> dict | None:
    """The newest valid checkpoint: ``path``, or when that is missing, corrupt or refused, :func:`previous_path`.

    A corrupt or refused file is reported (a warning naming it and the reason) and the previous one used. The
    returned dict has ``path`` set to the file it came from.

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
        except Exception as exc:  # noqa: BLE001 - any failure to read means: not usable
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            problems.append(f"{candidate} ({reason})")
            kind = "refused" if isinstance(exc, UnsafeFile) else "corrupt"
            log.warning("%s checkpoint %s (%s); trying the previous one", kind, candidate, reason)
            continue
        if problems:
            log.warning("resuming from the previous checkpoint %s (iteration %d) instead of %s",
                        candidate, int(state["iteration"]), path)
        state["path"] = str(candidate)
        return state
    if problems:
        raise DataError(f"no readable checkpoint: {'; '.join(problems)}; to start over, pass resume=false "
                        f"overwrite=true (moves the run to archive/), or another run directory")
    return None


@dataclass
class RunState:
    """What the distillation loop carries between iterations; saved with the components' states.

    Attributes:
        iteration: iterations done (the next one to run).
        seconds: wall seconds of distillation so far (evaluations excluded).
        metrics: every row written to ``metrics.jsonl``.
        result: the last evaluation's result (accuracies in percent, protocol), or None.
        loss: the last iteration's loss, or None.
        wandb_id: the W&B run to continue, or None.
        evaluated_at: the iteration whose evaluation is logged (None: none yet).
        stages_done: names of the post-distillation stages already applied to S.
        finals: the final evaluation under every protocol the run was evaluated with (``ddrun.record``
            evaluation entries); a rerun with another evaluator appends one.
        saved_at: the iteration of the checkpoint on disk (not saved; None: none yet).
    """

    iteration: int = 0
    seconds: float = 0.0
    metrics: list[dict] = field(default_factory=list)
    result: dict | None = None
    loss: float | None = None
    wandb_id: str | None = None
    evaluated_at: int | None = None
    stages_done: list[str] = field(default_factory=list)
    finals: list[dict] = field(default_factory=list)
    saved_at: int | None = None

    def save(self, path: str | Path, parts: dict) -> None:
        """Write this state and ``parts`` (component states: ``syn``, ``optimizer``, ``fetcher``, ``objective``,
        ``scheduler``, ``config_hash``, ``config`` ...) as one checkpoint, with the global RNG states; sets
        :attr:`saved_at`.

        Raises:
            OSError: the write failed; the checkpoint on disk is the previous one.
        """
        fields = {k: v for k, v in asdict(self).items() if k != "saved_at"}
        save_checkpoint({**fields, **parts, "rng": rng_state()}, path)
        self.saved_at = self.iteration

    @classmethod
    def load(cls, path: str | Path) -> tuple["RunState", dict] | None:
        """``(state, checkpoint dict)`` from ``path`` (or its previous copy); None when there is no checkpoint.
        The caller restores the global RNG states (``set_rng_state(ckpt["rng"])``) once every component is built.
        Raises DataError as :func:`load_checkpoint`."""
        ckpt = load_checkpoint(path)
        if ckpt is None:
            return None
        names = [f for f in cls.__dataclass_fields__ if f != "saved_at"]
        state = cls(**{k: ckpt[k] for k in names if k in ckpt})
        state.saved_at = state.iteration
        return state, ckpt


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


class StopSignals:
    """Catch stop signals and turn them into a checkpoint and a clean stop (a context manager).

    Inside the ``with`` block, SIGTERM, SIGINT (Ctrl-C), SIGUSR1 and SIGUSR2 only set :attr:`pending`; the loop calls
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
        if prev is signal.default_int_handler:  # Ctrl-C: a clean stop, not a KeyboardInterrupt traceback
            prev = signal.SIG_DFL
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
    """The global RNG states as tensors and plain values (readable with ``weights_only=True``): torch CPU, CUDA
    (every device, when CUDA is initialized), NumPy and Python."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized()
            else [],
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                      "cached_gaussian": float(cached)},
            "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss}}


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned (CUDA states only where this machine has as many devices)."""
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all(cuda)
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
