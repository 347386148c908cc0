"""The run record: ``results.json``, written by ``ddrun distill`` and ``ddrun evaluate`` beside their outputs; the only
thing ``ddrun report`` reads.

One record holds everything that makes a number in a table traceable to exactly one configuration::

    record            1 (this layout)
    command           "distill" | "evaluate"
    method, dataset, ipc, seed
    iterations        iterations actually run (distill; for evaluate: those of the evaluated S when it says)
    config_hash       hash of the S-determining config (ddrun.distill.config_hash)
    setting           the S-determining config without the seed, flattened {dotted key: value} (what distinguishes
                      two runs that are not seeds of one experiment: budget, hyperparameters, subsets ...)
    synthetic         {"path", "digest" (sha256 of images, labels, learned lr), "stored_images", "decoded_images",
                       "parametrization", "soft_labels", "learned_lr"}
    source            (evaluate) the evaluated file, and the run directory and config hash it records
    evaluations       [{"iteration", "protocol" (fields, ddrun.protocol; with "test": {"dataset", "images",
                       "subset"}), "protocol_line", "acc_mean", "acc_std", "per_net", "per_arch", "extra"}]
                      — the final evaluation under every protocol the run was evaluated with (a rerun with another
                      evaluator appends, never relabels)
    best              {"iteration", "acc_mean", "acc_std", "protocol_line"}: the best evaluation of the run under the
                      last protocol (MTT's papers report the best over their evaluations; ddrun reports both)
    versions          {"ddrun", "torch", "torchvision", "python"}; device; host; written (time)
"""

from __future__ import annotations

import json
import platform
import socket
import time
from pathlib import Path
from typing import Any

from ddrun.files import atomic_write, digest
from ddrun.utils import DataError

RECORD = 1
FILENAME = "results.json"


def versions() -> dict[str, str]:
    """Versions of ddrun, torch, torchvision and Python."""
    import torch
    import torchvision

    from ddrun import __version__

    return {"ddrun": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "python": platform.python_version()}


def device_name(device) -> str:
    """``cpu``, or ``cuda:0 (NVIDIA H200)``."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def synthetic_digest(state: dict) -> str:
    """sha256 of what S is (images, labels, learned step size), independent of its metadata."""
    return digest({k: state.get(k) for k in ("images", "labels", "lr")})


def synthetic_info(syn, path: str | Path, describe: dict) -> dict:
    """The ``synthetic`` field of a record for the set ``syn`` saved at ``path``."""
    state = syn.state() if hasattr(syn, "state") else {"images": syn.images, "labels": syn.labels, "lr": None}
    return {"path": str(path), "digest": synthetic_digest(state), **describe,
            "soft_labels": bool(state["labels"].dtype.is_floating_point), "learned_lr": state.get("lr") is not None,
            "relabeled": (state.get("meta") or {}).get("relabel")}


def test_info(real) -> dict:
    """The test set a protocol was measured on: ``{"dataset", "images", "subset"}`` (``subset``: the per-class test
    subset in effect, ``RealData.test_subset``; None for the whole test split)."""
    return {"dataset": real.name, "images": int(len(real.test_labels)), "subset": real.test_subset}


def evaluation(result: dict, iteration: int, real) -> dict:
    """One ``evaluations`` entry from an evaluator's result (and the objective's extra accuracies, DD's attack
    figures and the KD evaluator's ``teacher_*`` view of S, :mod:`ddrun.evaluators.teacher_view`, in ``extra``)."""
    protocol = {**result.get("protocol_fields", {}), "test": test_info(real)}
    extra = {k: v for k, v in result.items() if (k.endswith("_acc") or k.startswith(("dd_attack_", "teacher_")))
             and isinstance(v, (int, float))}
    return {"iteration": int(iteration), "protocol": protocol, "protocol_line": _line(protocol),
            "acc_mean": result["acc_mean"], "acc_std": result["acc_std"], "per_net": result.get("per_net", {}),
            "per_arch": result.get("per_arch") or _per_arch(result.get("per_net", {})), "extra": extra}


def _line(protocol: dict) -> str:
    from ddrun.protocol import describe

    return describe(protocol)


def _per_arch(per_net: dict[str, list[float]]) -> dict[str, dict]:
    import statistics

    return {a: {"acc_mean": statistics.fmean(v), "acc_std": statistics.pstdev(v) if len(v) > 1 else 0.0}
            for a, v in per_net.items() if v}


def flat_setting(config: dict, drop: tuple[str, ...]) -> dict[str, Any]:
    """``{dotted key: value}`` of ``config`` without the top-level keys in ``drop`` (plain JSON values)."""
    out: dict[str, Any] = {}

    def walk(node, prefix):
        for k, v in node.items():
            if not prefix and k in drop:
                continue
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = v if isinstance(v, (str, int, float, bool, type(None))) else str(v)

    walk(config, "")
    return out


def write(run_dir: str | Path, record: dict) -> Path:
    """Write ``record`` (with ``record``, ``versions``, ``host`` and ``written`` filled in) as ``results.json``
    atomically; returns its path. Raises OSError when the directory is not writable."""
    record = {"record": RECORD, **record, "versions": versions(), "host": socket.gethostname(),
              "written": time.strftime("%Y-%m-%d %H:%M:%S")}
    path = Path(run_dir) / FILENAME
    atomic_write(json.dumps(record, indent=1, default=str).encode(), path)
    return path


def read(path: str | Path) -> dict:
    """A ``results.json`` (or the one in the directory ``path``).

    Raises:
        DataError: missing, not JSON, or not a ddrun run record (names the file).
    """
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    try:
        rec = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"no run record {path}") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"unreadable run record {path} ({type(exc).__name__}: {exc})") from None
    if not isinstance(rec, dict) or rec.get("record") != RECORD or not isinstance(rec.get("evaluations"), list):
        raise DataError(f"{path}: not a ddrun run record (layout {RECORD})")
    return rec
