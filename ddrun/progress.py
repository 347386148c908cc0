"""Progress of long loops, on a terminal and off it.

On a terminal ddrun shows tqdm bars. Without one (SLURM logs, pipes, ``nohup``) tqdm stays silent, so
:class:`Progress` writes one log line every ``every_s`` seconds instead: position, rate, ETA and the loop's own
figures (loss, last accuracy).
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any


def interactive() -> bool:
    """Whether stderr is a terminal (where tqdm draws its bars)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class Progress:
    """A tqdm bar on a terminal, periodic log lines elsewhere.

    Args:
        total: the position at which the loop is done.
        initial: the position it starts from (a resumed run).
        desc: the loop's name (``distill``, ``expert 3`` ...).
        every_s: seconds between two log lines without a terminal (``progress_every``; 0 or less: none).
        log: the logger the lines go to.
        unit: what one step is, for the lines (``it``, ``epoch``).
    """

    def __init__(self, total: int, initial: int = 0, desc: str = "", every_s: float = 60.0,
                 log: logging.Logger | None = None, unit: str = "it"):
        from tqdm.auto import tqdm

        self.total, self.position, self.desc, self.unit = int(total), int(initial), desc, unit
        self.every_s, self.log = float(every_s), log or logging.getLogger("ddrun")
        self.bar = tqdm(total=self.total, initial=self.position, desc=desc, disable=None, leave=False)
        self.lines = self.bar.disable and self.every_s > 0
        self.t0 = self.last = time.monotonic()
        self.start = self.position
        self.postfix: dict[str, Any] = {}

    def update(self, n: int = 1, **postfix: Any) -> None:
        """Advance by ``n`` steps; ``postfix`` (e.g. ``loss=0.3, acc=71.2``) is shown on the bar or the line."""
        self.position += n
        self.postfix.update({k: v for k, v in postfix.items() if v is not None})
        self.bar.update(n)
        if self.postfix:
            self.bar.set_postfix({k: _fmt(v) for k, v in self.postfix.items()}, refresh=False)
        now = time.monotonic()
        if self.lines and now - self.last >= self.every_s:
            self.last = now
            self.log.info("%s", self.line(now))

    def line(self, now: float | None = None) -> str:
        """``distill 120/1000 it (12%), 2.31 it/s, ETA 6m21s, loss 0.41, acc 71.20``."""
        now = time.monotonic() if now is None else now
        done, elapsed = self.position - self.start, max(now - self.t0, 1e-9)
        rate = done / elapsed
        eta = (self.total - self.position) / rate if rate > 0 else float("inf")
        pct = 100.0 * self.position / max(self.total, 1)
        parts = [f"{self.desc} {self.position}/{self.total} {self.unit} ({pct:.0f}%)", f"{rate:.3g} {self.unit}/s",
                 f"ETA {_duration(eta)}"]
        parts += [f"{k} {_fmt(v)}" for k, v in self.postfix.items()]
        return ", ".join(parts)

    def close(self) -> None:
        self.bar.close()


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    s = int(seconds)
    h, m = s // 3600, (s % 3600) // 60
    return f"{h}h{m:02d}m" if h else f"{m}m{s % 60:02d}s"
