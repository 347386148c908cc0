"""Provenance of a run directory: what configuration made it, and every attempt at it.

Hydra writes ``.hydra/{config,hydra,overrides}.yaml`` of the *current* command into the run directory before ddrun
runs. So that a rerun can never rewrite a run's description, ddrun keeps the first attempt's copy in
``provenance/hydra/`` and puts it back into ``.hydra/`` whenever a later attempt resumes the run or is refused; each
attempt (its overrides, start time, host, and whether it started, resumed or was refused) is one line of
``provenance/attempts.jsonl``. ``overwrite=true`` moves an existing run into ``archive/<time>/`` before a new one
starts, so ``metrics.jsonl`` never holds two runs.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

from ddrun.files import atomic_write

FOLDER = "provenance"
KEEP = {".hydra", ".lock", "archive", FOLDER}  # what archiving leaves in place (the archive holds the old provenance)


def config_diff(old: dict, new: dict, drop: tuple[str, ...] = ()) -> list[str]:
    """``["objective.lr_img: 1.0 -> 5.0", ...]`` for every leaf that differs between two plain configs (top-level
    keys in ``drop`` ignored)."""
    from ddrun.record import flat_setting

    a, b = flat_setting(old, drop), flat_setting(new, drop)
    return [f"{k}: {a.get(k, '(absent)')} -> {b.get(k, '(absent)')}" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k)]


class Provenance:
    """The provenance files of one run directory, seen from the attempt that is starting (module doc).

    Args:
        run_dir: the run directory (Hydra has already written this attempt's ``.hydra/``, when run by Hydra).
    """

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.hydra, self.folder = self.run_dir / ".hydra", self.run_dir / FOLDER
        self.attempt_files = self._texts(self.hydra)
        self.started = time.strftime("%Y-%m-%d %H:%M:%S")

    @staticmethod
    def _texts(folder: Path) -> dict[str, str]:
        return {p.name: p.read_text() for p in sorted(folder.glob("*.yaml"))} if folder.is_dir() else {}

    def holds_run(self) -> bool:
        """Whether an earlier attempt left a run here (a checkpoint, a record, metrics or provenance)."""
        return any((self.run_dir / n).exists() for n in ("checkpoint.pt", "results.json", "metrics.jsonl", FOLDER))

    def keep_original(self) -> None:
        """A new run starts here: this attempt's ``.hydra`` becomes the run's original description."""
        target = self.folder / "hydra"
        if target.exists():
            shutil.rmtree(target)
        for name, text in self.attempt_files.items():
            atomic_write(text.encode(), target / name)

    def restore_original(self) -> None:
        """Put the run's original ``.hydra`` back (after a resumed or refused attempt overwrote it)."""
        original = self._texts(self.folder / "hydra")
        for name, text in original.items():
            atomic_write(text.encode(), self.hydra / name)

    def record_attempt(self, outcome: str, **info) -> None:
        """Append this attempt to ``provenance/attempts.jsonl``: ``outcome`` ("started", "resumed at N",
        "refused: ..."), start time, host, pid, SLURM job and the attempt's overrides."""
        overrides = self.attempt_files.get("overrides.yaml", "")
        line = {"started": self.started, "outcome": outcome, "host": socket.gethostname(), "pid": os.getpid(),
                "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "overrides": overrides.strip(), **info}
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / "attempts.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")

    def refuse(self) -> None:
        """A refused attempt changes nothing: the run's original ``.hydra`` goes back (runs of ddrun versions
        without provenance have no copy to restore)."""
        self.restore_original()

    def archive(self) -> Path:
        """Move the run that is here into ``archive/<time>/`` (everything but ``.hydra``, the lock and older
        archives; the old provenance goes along); returns that folder."""
        dest = self.run_dir / "archive" / time.strftime("%Y-%m-%d_%H-%M-%S")
        dest.mkdir(parents=True, exist_ok=True)
        for p in self.run_dir.iterdir():
            if p.name in KEEP - {FOLDER} or p.suffix == ".log":  # Hydra's job log of this attempt stays
                continue
            shutil.move(str(p), str(dest / p.name))
        return dest
