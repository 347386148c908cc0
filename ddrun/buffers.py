"""``ddrun buffer``: expert trajectories for trajectory matching (MTT).

Cazenavette et al., "Dataset Distillation by Matching Training Trajectories", CVPR 2022, Sec. 3.1 and the
reference ``buffer.py``: ``num_experts`` networks are trained on the real training set for ``train_epochs``
epochs (SGD ``lr_teacher`` 0.01, no momentum, no weight decay, batch 256, DSA augmentation per sample; the paper
uses 100 experts x 50 epochs), and each expert's parameters are stored at initialization and after every epoch.

On-disk layout (``LAYOUT = 1``), one directory per *setting* under ``paths.buffers``::

    <paths.buffers>/<dataset key>/<net key>/<augment key>/
        manifest.json             settings, training recipe, and per expert: epochs, test accuracy, bytes, sha256
        manifest.json.lock        advisory lock: shards of a multirun update the manifest one at a time
        expert_0000.pt            one finished expert (torch.save zip; torch.load(..., weights_only=True))
        expert_0007.partial/      an unfinished expert: epoch_0000.pt .. epoch_00NN.pt (resume point)

    dataset key   <dataset.name>[-zca[<regularization> when not 0.1]][-sub<train_subset>]   e.g. cifar10-zca
    net key       <class>_<arg>-<value>_... of the net config     e.g. convnet_act-relu_depth-3_..._width-128
    augment key   dsa-<strategy> | noaug                             e.g. dsa-color_crop_cutout_flip_scale_rotate

An expert file is a dict: ``trajectory`` float32 ``[train_epochs + 1, P]`` (row e = the flattened parameters
after e epochs, in ``named_parameters()`` order; buffers such as BatchNorm statistics are not stored, MTT's
student runs in train mode), ``names`` / ``shapes`` of the parameters, ``index``, ``epochs``, ``test_acc``
(percent) and ``setting``. Its size is ``4 (train_epochs + 1) P`` bytes plus a few kB: 65.3 MB for the
ConvNet-3 on CIFAR-10 (P = 320,010) at 50 epochs. The fetcher (``ddrun.fetchers.checkpoints``) memory-maps it
and reads only the two rows it needs.

Experts are independent and deterministic: expert ``i`` starts from ``derive_seed(seed, 6007, i)`` and epoch
``e`` draws its shuffle and augmentation from ``derive_seed(seed, 6007, i, e)``, so ``expert_offset`` shards
(a Hydra multirun or a SLURM array: ``ddrun buffer -m expert_offset=0,25,50,75 num_experts=25``) write disjoint
experts of the same buffer, and a rerun skips finished experts and continues a half-trained one from its last
epoch with the same result as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import fcntl
import inspect
import json
import logging
import math
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from ddrun.checkpoint import atomic_save, atomic_write
from ddrun.utils import (ConfigError, DataError, DdrunError, build, command_errors, derive_seed, file_digest,
                         load_tensors, resolve_device, seed_everything)

log = logging.getLogger("ddrun.buffer")

LAYOUT = 1
MANIFEST = "manifest.json"
_SEED_TAG = 6007


# ----------------------------------------------------------------------------------------------------------
# settings and keys (shared by the writer here and the reader in ddrun.fetchers.checkpoints)
# ----------------------------------------------------------------------------------------------------------

def _net_spec(net_factory: Callable) -> dict:
    """``{"class": "module.Class", <constructor keyword>: value ...}`` of a net factory (a ``functools.partial``
    from ``_partial_: true``)."""
    func = getattr(net_factory, "func", net_factory)
    spec = {"class": f"{func.__module__}.{func.__qualname__}"}
    spec.update({k: v for k, v in sorted(getattr(net_factory, "keywords", {}).items())})
    return spec


def setting_of(real, net_factory: Callable, augment) -> dict:
    """What a buffer is keyed by: the dataset (name, training subset, ZCA, normalization, shapes), the network
    and the augmentation the experts were trained with. Plain JSON types."""
    zca_reg = None if real.zca is None else float(getattr(real.zca, "regularization", 0.1))
    aug = {"strategy": "none"}
    if augment is not None and augment.enabled:
        aug = {"strategy": augment.strategy, **{k: float(v) for k, v in sorted(augment.p.items())}}
    return {
        "dataset": {"name": real.name, "train_subset": real.train_subset, "zca": real.zca is not None,
                    "zca_regularization": zca_reg,
                    "mean": [round(float(m), 6) for m in real.mean],
                    "std": [round(float(s), 6) for s in real.std],
                    "channels": real.channels, "im_size": list(real.im_size), "num_classes": real.num_classes},
        "net": _net_spec(net_factory),
        "augment": aug,
    }


def buffer_dir(root: str | Path, setting: dict) -> Path:
    """The directory of the buffer for ``setting`` under ``root`` (module doc)."""
    ds = setting["dataset"]
    dkey = ds["name"]
    if ds["zca"]:
        reg = ds["zca_regularization"]
        dkey += "-zca" + ("" if reg == 0.1 else f"{reg:g}")
    if ds["train_subset"] is not None:
        dkey += f"-sub{ds['train_subset']}"
    net = setting["net"]
    args = [f"{k}-{v}" for k, v in net.items() if k != "class"]
    nkey = "_".join([net["class"].rsplit(".", 1)[-1].lower(), *args])
    aug = setting["augment"]["strategy"]
    akey = "noaug" if aug == "none" else f"dsa-{aug}"
    return Path(root) / dkey / nkey / akey


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def setting_diff(have: dict, want: dict) -> list[str]:
    """``["net.width: 64 in the buffer, 128 in this run", ...]`` for every key where two settings differ."""
    a, b = _flat(have), _flat(want)
    return [f"{k}: {a.get(k, '(absent)')} in the buffer, {b.get(k, '(absent)')} in this run"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def buffer_command(setting: dict, buffers: str | Path, data: str | Path | None = None, extra: str = "") -> str:
    """The ``ddrun buffer ...`` command line that creates the buffer of ``setting``."""
    ds, net, aug = setting["dataset"], setting["net"], setting["augment"]
    args = [f"dataset={ds['name']}"]
    if ds["train_subset"] is not None:
        args.append(f"dataset.train_subset={ds['train_subset']}")
    if ds["zca"]:
        args.append("dataset.zca=true")
        if ds["zca_regularization"] != 0.1:
            args.append(f"dataset.zca_regularization={ds['zca_regularization']:g}")
    try:
        import importlib

        mod, cls = net["class"].rsplit(".", 1)
        params = inspect.signature(getattr(importlib.import_module(mod), cls)).parameters
        defaults = {k: p.default for k, p in params.items()}
    except Exception:
        defaults = {}
    args += [f"net.{k}={v}" for k, v in net.items() if k != "class" and defaults.get(k, object()) != v]
    if aug["strategy"] == "none":
        args.append("augment.strategy=none")
    elif aug["strategy"] != _default_dsa_strategy(ds["name"]):
        args.append(f"augment.strategy={aug['strategy']}")
    if data is not None:
        args.append(f"paths.data={data}")
    args.append(f"paths.buffers={buffers}")
    return " ".join(["ddrun buffer", *args, *([extra] if extra else [])])


def _default_dsa_strategy(dataset_name: str) -> str | None:
    """The ``dsa_strategy`` of ``conf/dataset/<dataset_name>.yaml`` (what ``augment.strategy`` defaults to)."""
    import ddrun.conf

    try:
        path = Path(ddrun.conf.__file__).parent / "dataset" / f"{dataset_name}.yaml"
        return str(OmegaConf.load(path).dsa_strategy)
    except Exception:
        return None


# ----------------------------------------------------------------------------------------------------------
# manifest and files
# ----------------------------------------------------------------------------------------------------------

def expert_file(directory: Path, index: int) -> Path:
    return Path(directory) / f"expert_{index:04d}.pt"


def read_manifest(directory: str | Path) -> dict | None:
    """The manifest of a buffer directory, or None when there is none.

    Raises:
        DataError: the manifest exists but is not valid JSON of this layout (names the file).
    """
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"corrupt buffer manifest {path} ({type(exc).__name__}: {exc}); delete it and rerun "
                        f"`ddrun buffer` with the same settings (finished expert files are re-registered)") from None
    if not isinstance(m, dict) or m.get("layout") != LAYOUT or "setting" not in m:
        raise DataError(f"{path}: not a ddrun buffer manifest of layout {LAYOUT}")
    m.setdefault("experts", {})
    return m


@contextlib.contextmanager
def _locked_manifest(directory: Path):
    """Read-modify-write the manifest under an exclusive ``flock`` (shards of one buffer run concurrently)."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / (MANIFEST + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            m = read_manifest(directory)
            box = {"manifest": m}
            yield box
            if box["manifest"] is not None:
                atomic_write(json.dumps(box["manifest"], indent=1, sort_keys=True).encode(), directory / MANIFEST)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def load_expert(path: Path, mmap: bool = True) -> dict:
    """Open an expert file (memory-mapped: rows are read from disk when indexed).

    Raises:
        DataError: missing, truncated or corrupt (names the file).
    """
    return load_tensors(path, "expert file", keys=("trajectory", "names"), mmap=mmap)


# ----------------------------------------------------------------------------------------------------------
# writing: train experts
# ----------------------------------------------------------------------------------------------------------

def _flat_params(net: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()]).cpu().float()


def _set_flat_params(net: torch.nn.Module, flat: torch.Tensor) -> None:
    from ddrun.nets.functional import unflatten

    with torch.no_grad():
        for p, v in zip(net.parameters(), unflatten(flat.to(next(net.parameters()).device), net).values()):
            p.copy_(v)


def _resume_point(partial: Path) -> tuple[int, dict] | None:
    """The last epoch snapshot of a half-trained expert that loads, as ``(epoch, state)``; later unreadable
    ones (a crash while writing) are removed."""
    files = sorted(partial.glob("epoch_*.pt"))
    for f in reversed(files):
        try:
            state = torch.load(f, map_location="cpu", weights_only=True)
            return int(state["epoch"]), state
        except Exception:
            log.warning("expert snapshot %s is unreadable; continuing from the one before", f)
            f.unlink(missing_ok=True)
    return None


def train_expert(index: int, directory: Path, real, net_factory: Callable, augment, training: dict,
                 device: torch.device, setting: dict, bar_position: int = 1) -> dict:
    """Train expert ``index`` (resuming from ``<directory>/expert_<index>.partial/`` when present), write
    ``expert_<index>.pt`` atomically and return its manifest entry."""
    from tqdm.auto import tqdm

    from ddrun.train import accuracy, train_epoch

    seed, epochs = int(training["seed"]), int(training["train_epochs"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, _SEED_TAG, index))
        net = net_factory(channels=real.channels, num_classes=real.num_classes, im_size=real.im_size)
    net = net.to(device)
    opt = torch.optim.SGD(net.parameters(), lr=float(training["lr_teacher"]),
                          momentum=float(training["momentum"]), weight_decay=float(training["weight_decay"]))
    partial = directory / f"expert_{index:04d}.partial"
    partial.mkdir(parents=True, exist_ok=True)
    resume = _resume_point(partial)
    start, t0 = 0, time.perf_counter()
    seconds = 0.0
    if resume is not None:
        start, state = resume
        _set_flat_params(net, state["params"])
        opt.load_state_dict(state["optimizer"])
        seconds = float(state.get("seconds", 0.0))
        log.info("expert %d: resuming after epoch %d", index, start)
    else:
        atomic_save({"epoch": 0, "params": _flat_params(net), "optimizer": opt.state_dict(), "seconds": 0.0},
                    partial / "epoch_0000.pt")
    bar = tqdm(range(start, epochs), initial=start, total=epochs, desc=f"expert {index}", leave=False,
               position=bar_position, disable=None)
    for e in bar:
        g = torch.Generator().manual_seed(derive_seed(seed, _SEED_TAG, index, e))
        loss = train_epoch(net, real.train_images, real.train_labels, opt, int(training["batch_train"]), augment,
                           g)
        if not math.isfinite(loss):
            raise DdrunError(f"expert {index}: the training loss became {loss} in epoch {e + 1}; lower lr_teacher "
                             f"(now {training['lr_teacher']})")
        bar.set_postfix(loss=f"{loss:.3f}")
        atomic_save({"epoch": e + 1, "params": _flat_params(net), "optimizer": opt.state_dict(),
                     "seconds": seconds + time.perf_counter() - t0}, partial / f"epoch_{e + 1:04d}.pt")
    bar.close()
    seconds += time.perf_counter() - t0
    rows = [torch.load(partial / f"epoch_{e:04d}.pt", map_location="cpu", weights_only=True)["params"]
            for e in range(epochs + 1)]
    test_acc = 100.0 * accuracy(net, real.test_images, real.test_labels)
    names = [n for n, _ in net.named_parameters()]
    shapes = [list(p.shape) for p in net.parameters()]
    path = expert_file(directory, index)
    atomic_save({"trajectory": torch.stack(rows), "names": names, "shapes": shapes, "index": index,
                 "epochs": epochs, "test_acc": test_acc, "setting": setting}, path)
    shutil.rmtree(partial, ignore_errors=True)
    entry = {"file": path.name, "epochs": epochs, "test_acc": round(test_acc, 4), "bytes": path.stat().st_size,
             "sha256": file_digest(path), "seconds": round(seconds, 2),
             "params": int(sum(p.numel() for p in net.parameters()))}
    log.info("expert %d: test accuracy %.2f%% after %d epochs (%.0f s, %.1f MB)", index, test_acc, epochs, seconds,
             entry["bytes"] / 1e6)
    return entry


def _register_existing(directory: Path, index: int, epochs: int, setting: dict) -> dict | None:
    """Manifest entry of a finished expert file that is not in the manifest (a crash between writing the file
    and updating the manifest); None when the file is unusable (it is then removed and retrained)."""
    path = expert_file(directory, index)
    try:
        d = load_expert(path)
        if int(d["epochs"]) != epochs or setting_diff(d.get("setting") or {}, setting):
            raise DataError("another setting")
        entry = {"file": path.name, "epochs": epochs, "test_acc": round(float(d["test_acc"]), 4),
                 "bytes": path.stat().st_size, "sha256": file_digest(path), "seconds": None,
                 "params": int(d["trajectory"].shape[1])}
        del d
        return entry
    except DataError as exc:
        log.warning("expert file %s is unusable (%s); training it again", path, exc)
        path.unlink(missing_ok=True)
        return None


def buffer(cfg: DictConfig) -> dict:
    """Train and store the experts ``expert_offset .. expert_offset + num_experts - 1`` of the buffer that
    ``cfg`` describes (module doc); finished experts are skipped, half-trained ones resumed.

    Returns:
        ``{"dir": str, "trained": [indices], "skipped": [indices], "experts": {index: manifest entry}}`` where
        ``experts`` holds every finished expert of the buffer (from all shards).

    Raises:
        ConfigError: bad settings, or the directory holds a buffer trained with another recipe (names what
            differs).
        DataError: dataset problems (from the loader).
    """
    for key in ("num_experts", "train_epochs", "batch_train"):
        if int(cfg[key]) < 1:
            raise ConfigError(f"{key}={cfg[key]}: must be >= 1")
    if int(cfg.expert_offset) < 0:
        raise ConfigError(f"expert_offset={cfg.expert_offset}: must be >= 0")
    if float(cfg.lr_teacher) <= 0:
        raise ConfigError(f"lr_teacher={cfg.lr_teacher}: must be > 0")
    device = resolve_device(cfg.device)
    seed_everything(int(cfg.seed))
    real = build(cfg.dataset).to(device)
    net_factory = build(cfg.net)
    augment = build(cfg.augment) if cfg.get("augment") is not None else None
    setting = setting_of(real, net_factory, augment)
    training = {k: (float(cfg[k]) if k in ("lr_teacher", "momentum", "weight_decay") else int(cfg[k]))
                for k in ("train_epochs", "lr_teacher", "momentum", "weight_decay", "batch_train", "seed")}
    directory = buffer_dir(cfg.paths.buffers, setting)
    command = buffer_command(setting, cfg.paths.buffers, cfg.paths.data)
    with _locked_manifest(directory) as box:
        m = box["manifest"]
        if m is None:
            box["manifest"] = {"layout": LAYOUT, "setting": setting, "training": training, "command": command,
                               "experts": {}}
        else:
            diff = setting_diff(m["setting"], setting) + setting_diff(m.get("training", {}), training)
            if diff:
                raise ConfigError(f"{directory} holds experts trained with another setting ({'; '.join(diff)}); "
                                  f"use another paths.buffers or the buffer's settings")
    indices = list(range(int(cfg.expert_offset), int(cfg.expert_offset) + int(cfg.num_experts)))
    log.info("buffer %s: experts %d..%d, %d epochs each", directory, indices[0], indices[-1],
             training["train_epochs"])
    from tqdm.auto import tqdm

    trained, skipped = [], []
    for index in tqdm(indices, desc="experts", position=0, disable=None):
        done = (read_manifest(directory) or {}).get("experts", {}).get(str(index))
        path = expert_file(directory, index)
        if done is not None and path.is_file() and path.stat().st_size == done.get("bytes"):
            skipped.append(index)
            continue
        entry = None
        if path.is_file():
            entry = _register_existing(directory, index, training["train_epochs"], setting)
        if entry is None:
            entry = train_expert(index, directory, real, net_factory, augment, training, device, setting)
            trained.append(index)
        else:
            skipped.append(index)
        with _locked_manifest(directory) as box:
            box["manifest"]["experts"][str(index)] = entry
    experts = {int(k): v for k, v in (read_manifest(directory) or {}).get("experts", {}).items()}
    return {"dir": str(directory), "trained": trained, "skipped": skipped, "experts": experts}


@hydra.main(version_base="1.3", config_path="pkg://ddrun.conf", config_name="buffer")
def main(cfg: DictConfig) -> None:
    with command_errors("buffer", log):
        out = buffer(cfg)
    ex = out["experts"]
    accs = [e["test_acc"] for e in ex.values()]
    mb = statistics.fmean(e["bytes"] for e in ex.values()) / 1e6 if ex else 0.0
    acc = f"{statistics.fmean(accs):.2f} +- {statistics.pstdev(accs):.2f}" if accs else "-"
    print(f"buffer {out['dir']}: {len(ex)} experts ({len(out['trained'])} trained now, {len(out['skipped'])} "
          f"already there); test accuracy {acc} %; {mb:.1f} MB per expert")
