"""Run tracking: local files (``metrics.jsonl``, PNG grids) and Weights & Biases.

W&B ``mode``: ``auto`` (online when an API key is configured, through ``WANDB_API_KEY`` or a ``wandb login``
entry in ``~/.netrc``, else offline), ``online``, ``offline`` or ``disabled``. Its files live in
``<run_dir>/wandb``. When W&B cannot start (misconfigured, unreachable) the run continues with local logging
and says so once.
"""

from __future__ import annotations

import json
import logging
import netrc
import os
from pathlib import Path

import torch

from ddrun.files import atomic_write

log = logging.getLogger(__name__)


def wandb_mode(mode: str) -> str:
    """Resolve ``auto`` to ``online`` when W&B credentials are configured, else ``offline``."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        if netrc.netrc().authenticators("api.wandb.ai"):
            return "online"
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        pass
    return "offline"


def _scalars(row: dict) -> dict:
    """The numbers of a ``metrics.jsonl`` row (what W&B's history gets; lists such as per-network accuracies stay
    local)."""
    return {k: v for k, v in row.items() if isinstance(v, (int, float))}


def unreachable(timeout_s: float) -> str | None:
    """Why the W&B server (``WANDB_BASE_URL``, default https://api.wandb.ai) cannot be reached, or None.

    A TCP connection attempt with ``timeout_s``, so an unreachable server is found in seconds instead of after W&B's
    own retries; skipped (None) when a proxy is configured, which W&B then uses."""
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")):
        return None
    url = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
    if not url.hostname:
        return f"WANDB_BASE_URL={os.environ.get('WANDB_BASE_URL')!r} is not a URL"
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=min(float(timeout_s), 10.0)).close()
    except OSError as exc:
        return f"{url.scheme}://{url.hostname}:{port} unreachable: {exc}"
    return None


def image_grid(pixels: torch.Tensor, ipc: int, class_names: list[str] | None = None, max_per_class: int = 10,
               min_cell: int = 64):
    """A PIL image with one row per class, the class name at the left of each row.

    Args:
        pixels: float ``[K*ipc, C, H, W]`` in [0, 1], ordered class by class.
        ipc: images per class; at most ``max_per_class`` of each class are shown.
        class_names: K names (default: the class indices).
        min_cell: images smaller than this (px) are enlarged by an integer factor (nearest neighbour), so that a
            28 px ipc-1 grid stays readable.
    """
    import torchvision
    from PIL import Image, ImageDraw

    k = len(pixels) // ipc
    per = min(ipc, max_per_class)
    keep = torch.cat([torch.arange(c * ipc, c * ipc + per) for c in range(k)])
    shown = pixels[keep].detach().float().cpu()
    h = shown.shape[-2]
    factor = max(1, -(-min_cell // h))
    if factor > 1:
        shown = torch.nn.functional.interpolate(shown, scale_factor=factor, mode="nearest")
    grid = torchvision.utils.make_grid(shown, nrow=per, padding=2, pad_value=1.0)
    img = torchvision.transforms.functional.to_pil_image(grid)
    names = [str(n) for n in (class_names or range(k))]
    margin = 8 + 7 * max(len(n) for n in names)
    out = Image.new("RGB", (img.width + margin, img.height), "white")
    out.paste(img.convert("RGB"), (margin, 0))
    draw, cell = ImageDraw.Draw(out), shown.shape[-2] + 2
    for c, name in enumerate(names):
        draw.text((4, 2 + c * cell + cell // 2 - 6), name, fill="black")
    return out


class Tracker:
    """Writes ``metrics.jsonl`` and ``images/*.png`` under ``run_dir`` and mirrors both to W&B.

    Args:
        run_dir: the run directory.
        config: the resolved run config (a plain dict) given to W&B.
        enabled: False for ``logger=none`` (local files only).
        mode: W&B mode (see module doc).
        project, entity, group, name, tags: W&B run identity.
    """

    def __init__(self, run_dir: str | Path, config: dict | None = None, enabled: bool = True, mode: str = "auto",
                 project: str = "ddrun", entity: str | None = None, group: str | None = None,
                 name: str | None = None, tags: list[str] | None = None, resume_id: str | None = None,
                 timeout_s: float = 30.0):
        self.run_dir = Path(run_dir)
        (self.run_dir / "images").mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.rows: list[dict] = []
        self.run = None
        self.mode = wandb_mode(mode) if enabled else "disabled"
        if self.mode == "disabled":
            return
        if self.mode == "online":
            problem = unreachable(timeout_s)
            if problem:
                self._local_only(problem)
                return
        try:
            import wandb

            self.run = wandb.init(project=project, entity=entity, group=group, name=name, tags=list(tags or []),
                                  config=config, dir=str(self.run_dir), mode=self.mode, id=resume_id,
                                  resume="allow" if resume_id else None, reinit="finish_previous",
                                  settings=wandb.Settings(init_timeout=float(timeout_s)))
        except Exception as exc:  # noqa: BLE001 - any W&B failure must not stop the run
            self._local_only(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")

    def _local_only(self, why: str) -> None:
        log.warning("W&B could not start (%s); continuing with local logging only (%s)", why, self.metrics_path)
        self.run = None

    def restore(self, rows: list[dict]) -> None:
        """Resume: make ``metrics.jsonl`` hold exactly ``rows`` (the rows of a checkpoint), dropping rows written
        after that checkpoint by a run that was killed (they will be written again)."""
        self.rows = [dict(r) for r in rows]
        atomic_write("".join(json.dumps(r) + "\n" for r in self.rows).encode(), self.metrics_path)
        if self.rows and self.run is not None and not getattr(self.run, "resumed", False):
            self._safe(self._replay)

    def _replay(self) -> None:
        """Log the restored rows, and the image grids saved up to the last of them, to a W&B run that does not hold
        them: an offline run (W&B cannot resume one: each attempt is its own ``offline-run-*`` folder under the same
        id, and ``wandb sync`` keeps the last one synced), or an online run the server never saw. The newest W&B
        run then holds the whole history, each value at its own step."""
        import wandb

        last = max(int(r["iteration"]) for r in self.rows)
        steps: dict[int, dict] = {}
        for row in self.rows:
            steps.setdefault(int(row["iteration"]), {}).update(_scalars(row))
        for path in sorted((self.run_dir / "images").glob("*_[0-9]*.png")):
            name, _, step = path.stem.rpartition("_")
            if step.isdigit() and int(step) <= last:
                steps.setdefault(int(step), {})[f"images/{name}"] = wandb.Image(str(path))
        for step in sorted(steps):
            self.run.log(steps[step], step=step)

    @property
    def run_id(self) -> str | None:
        return None if self.run is None else self.run.id

    def log(self, metrics: dict, step: int) -> None:
        """Append ``metrics`` (with ``iteration = step``) to ``metrics.jsonl`` and log the scalars to W&B."""
        row = {"iteration": int(step), **{k: v for k, v in metrics.items() if v is not None}}
        self.rows.append(row)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.run is not None:
            self._safe(self.run.log, _scalars(row), step=int(step))

    def images(self, pixels: torch.Tensor, ipc: int, step: int, name: str = "synthetic",
               class_names: list[str] | None = None) -> Path:
        """Save the grid of ``pixels`` (see :func:`image_grid`) as ``images/<name>_<step>.png`` and log it.

        ``pixels`` may leave [0, 1] (S is optimized freely in the normalized space): they are clipped for the
        picture, and the fraction of clipped values is written into the PNG's metadata (``clipped``) and logged
        when it is above 1%."""
        from PIL.PngImagePlugin import PngInfo

        clipped = float(((pixels < 0) | (pixels > 1)).float().mean()) if pixels.numel() else 0.0
        grid = image_grid(pixels.clamp(0, 1), ipc, class_names)
        info = PngInfo()
        info.add_text("clipped", f"{clipped:.6f}")
        info.add_text("description", f"ddrun {name} at iteration {int(step)}: one row per class; {100 * clipped:.2f}% "
                                     f"of the pixel values were outside [0, 1] and clipped")
        path = self.run_dir / "images" / f"{name}_{int(step):06d}.png"
        grid.save(path, pnginfo=info)
        if clipped > 0.01:
            log.info("%s: %.1f%% of the pixel values are outside [0, 1], clipped in the picture", path.name,
                     100 * clipped)
        if self.run is not None:
            import wandb

            self._safe(self.run.log, {f"images/{name}": wandb.Image(str(path))}, step=int(step))
        return path

    def _safe(self, fn, *args, **kwargs):
        try:
            fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            log.warning("W&B logging failed (%s); continuing with local logging only", exc)
            self.run = None

    def close(self) -> None:
        if self.run is not None:
            try:
                self.run.finish()
            except Exception as exc:  # noqa: BLE001 - the local files are complete either way
                log.warning("W&B could not finish the run (%s); the local files are complete", exc)
            finally:
                self.run = None
