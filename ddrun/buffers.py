"""``ddrun buffer``: expert trajectories for trajectory matching (MTT).

Cazenavette et al., "Dataset Distillation by Matching Training Trajectories", CVPR 2022, Sec. 3.1 and the
reference ``buffer.py``: ``num_experts`` networks are trained on the real training set for ``train_epochs``
epochs (SGD ``lr_teacher`` 0.01, no momentum, no weight decay, batch 256, DSA augmentation per sample; the paper
uses 100 experts x 50 epochs), and each expert's parameters are stored at initialization and after every epoch.

The experts are the ``experts`` collection of the artefact store (:mod:`ddrun.store`: layout, manifest, locks,
keys). An expert file holds ``trajectory`` float32 ``[train_epochs + 1, P]`` (row e = the flattened parameters
after e epochs; buffers such as BatchNorm statistics are not stored, MTT's student runs in train mode): ``4
(train_epochs + 1) P`` bytes plus a few kB, 65.3 MB for the ConvNet-3 on CIFAR-10 (P = 320,010) at 50 epochs.
The fetcher (``ddrun.fetchers.checkpoints``) memory-maps it and reads only the two rows it needs. Each expert
in training is claimed (a lock file): a second job on the same buffer skips the experts another job holds and
waits for them at the end, so two jobs never train one expert.

Experts are independent and deterministic: expert ``i`` starts from ``derive_seed(seed, 6007, i)`` and epoch
``e`` draws its shuffle and augmentation from ``derive_seed(seed, 6007, i, e)``, so ``expert_offset`` shards
(a Hydra multirun or a SLURM array: ``ddrun buffer -m expert_offset=0,25,50,75 num_experts=25``) write disjoint
experts of the same buffer, and a rerun skips finished experts and continues a half-trained one from its last
epoch with the same result as an uninterrupted run.
"""

from __future__ import annotations

import logging
import math
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from ddrun import speed
from ddrun.files import atomic_save, safe_load
from ddrun.store import EXPERT_KEYS, Collection, command_for, setting_diff, setting_of
from ddrun.schema import check_common
from ddrun.utils import (DataError, DdrunError, build, command_errors, derive_seed, resolve_device,
                         seed_everything)

log = logging.getLogger("ddrun.buffer")

_SEED_TAG = 6007


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
    for f in reversed(sorted(partial.glob("epoch_*.pt"))):
        try:
            state = safe_load(f, "expert snapshot")
            return int(state["epoch"]), state
        except (DataError, KeyError, TypeError):
            log.warning("expert snapshot %s is unreadable; continuing from the one before", f)
            f.unlink(missing_ok=True)
    return None


def _train_epochs(net, opt, index: int, start: int, seconds: float, partial: Path, real, augment,
                  training: dict, every_s: float) -> float:
    """Epochs ``start .. train_epochs - 1`` of expert ``index``, a snapshot after each; returns the seconds."""
    from ddrun.progress import Progress
    from ddrun.train import train_epoch

    seed, epochs, t0 = int(training["seed"]), int(training["train_epochs"]), time.perf_counter()
    bar = Progress(epochs, start, f"expert {index}", every_s, log, unit="epoch")
    for e in range(start, epochs):
        g = torch.Generator().manual_seed(derive_seed(seed, _SEED_TAG, index, e))
        loss = train_epoch(net, real.train_images, real.train_labels, opt, int(training["batch_train"]), augment,
                           g)
        if not math.isfinite(loss):
            raise DdrunError(f"expert {index}: the training loss became {loss} in epoch {e + 1}; lower lr_teacher "
                             f"(now {training['lr_teacher']})")
        bar.update(1, loss=loss)
        atomic_save({"epoch": e + 1, "params": _flat_params(net), "optimizer": opt.state_dict(),
                     "seconds": seconds + time.perf_counter() - t0}, partial / f"epoch_{e + 1:04d}.pt")
    bar.close()
    return seconds + time.perf_counter() - t0


def train_expert(index: int, store: Collection, real, net_factory: Callable, augment, training: dict,
                 device: torch.device, every_s: float = 60.0) -> dict:
    """Train expert ``index`` (resuming from its ``.partial/`` folder when present), store it and return its
    manifest entry."""
    from ddrun.nets import build_net
    from ddrun.train import accuracy

    net = build_net(net_factory, real, derive_seed(int(training["seed"]), _SEED_TAG, index), device)
    opt = torch.optim.SGD(net.parameters(), lr=float(training["lr_teacher"]),
                          momentum=float(training["momentum"]), weight_decay=float(training["weight_decay"]))
    partial = store.partial_dir(index)
    partial.mkdir(parents=True, exist_ok=True)
    resume, start, seconds = _resume_point(partial), 0, 0.0
    if resume is not None:
        start, state = resume
        _set_flat_params(net, state["params"])
        opt.load_state_dict(state["optimizer"])
        seconds = float(state.get("seconds", 0.0))
        log.info("expert %d: resuming after epoch %d", index, start)
    else:
        atomic_save({"epoch": 0, "params": _flat_params(net), "optimizer": opt.state_dict(), "seconds": 0.0},
                    partial / "epoch_0000.pt")
    epochs = int(training["train_epochs"])
    seconds = _train_epochs(net, opt, index, start, seconds, partial, real, augment, training, every_s)
    rows = [safe_load(partial / f"epoch_{e:04d}.pt", "expert snapshot")["params"] for e in range(epochs + 1)]
    test_acc = 100.0 * accuracy(net, real.test_images, real.test_labels)
    payload = {"trajectory": torch.stack(rows), "names": [n for n, _ in net.named_parameters()],
               "shapes": [list(p.shape) for p in net.parameters()], "index": index, "epochs": epochs,
               "test_acc": test_acc, "setting": store.setting}
    entry = store.put(index, payload, {"epochs": epochs, "test_acc": round(test_acc, 4), "seconds": round(seconds, 2),
                                       "params": int(sum(p.numel() for p in net.parameters()))})
    shutil.rmtree(partial, ignore_errors=True)
    log.info("expert %d: test accuracy %.2f%% after %d epochs (%.0f s, %.1f MB)", index, test_acc, epochs, seconds,
             entry["bytes"] / 1e6)
    return entry


def _register_existing(store: Collection, index: int, epochs: int) -> bool:
    """Register a finished expert file missing from the manifest (a crash between writing the file and updating
    the manifest); False when the file is unusable (it is then removed, to be trained again)."""
    from ddrun.files import file_digest

    path = store.item_path(index)
    try:
        d = store.load(index, EXPERT_KEYS, mmap=True, verify=False)
        if int(d["epochs"]) != epochs or setting_diff(d.get("setting") or {}, store.setting):
            raise DataError("another setting")
        entry = {"file": path.name, "bytes": path.stat().st_size, "sha256": file_digest(path), "epochs": epochs,
                 "test_acc": round(float(d["test_acc"]), 4), "seconds": None,
                 "params": int(d["trajectory"].shape[1])}
        del d
    except DataError as exc:
        log.warning("expert file %s is unusable (%s); training it again", path, exc)
        path.unlink(missing_ok=True)
        return False
    store.register(index, entry)
    return True


def buffer(cfg: DictConfig) -> dict:
    """Train and store the experts ``expert_offset .. expert_offset + num_experts - 1`` of the buffer that
    ``cfg`` describes (module doc); finished experts are skipped, half-trained ones resumed, experts another job
    is training are waited for at the end.

    Returns:
        ``{"dir": str, "trained": [indices], "skipped": [indices], "experts": {index: manifest entry}}`` where
        ``experts`` holds every finished expert of the buffer (from all shards).

    Raises:
        ConfigError: bad settings, or the directory holds a buffer trained with another recipe (names what
            differs).
        DataError: dataset problems (from the loader).
    """
    check_common(cfg, "buffer")
    device = resolve_device(cfg.device)
    speed.configure(None, bool(cfg.deterministic))
    seed_everything(int(cfg.seed))
    real = build(cfg.dataset).to(device)
    net_factory = build(cfg.net)
    augment = build(cfg.augment) if cfg.get("augment") is not None else None
    training = {k: (float(cfg[k]) if k in ("lr_teacher", "momentum", "weight_decay") else int(cfg[k]))
                for k in ("train_epochs", "lr_teacher", "momentum", "weight_decay", "batch_train", "seed")}
    store = Collection(cfg.paths.buffers, "experts", setting_of(real, net_factory, augment))
    store.open_for_writing(training, command_for("experts", store.setting, cfg.paths.buffers, cfg.paths.data,
                                                 training=training))
    indices = list(range(int(cfg.expert_offset), int(cfg.expert_offset) + int(cfg.num_experts)))
    log.info("buffer %s: experts %d..%d, %d epochs each", store.dir, indices[0], indices[-1],
             training["train_epochs"])

    def train(index: int) -> dict:
        return train_expert(index, store, real, net_factory, augment, training, device, float(cfg.progress_every))

    done = store.fill(indices, train, adopt=lambda index: _register_existing(store, index, training["train_epochs"]))
    return {"dir": str(store.dir), "trained": done["trained"], "skipped": done["skipped"],
            "experts": store.entries()}


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
