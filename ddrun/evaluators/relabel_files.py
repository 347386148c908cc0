"""Relabel files: a stored relabel plan of the KD evaluator written once and read by later evaluations.

FKD (Shen & Xing, ECCV 2022) and SRe2L's ImageNet relabel (Yin et al., NeurIPS 2023, Sec. 3.3) write the
teacher's soft labels of every crop to disk once; every later student, of any architecture, trains from those
files without running the teacher. ``evaluator.labels=stored evaluator.relabel_dir=DIR`` does the same with
ddrun's plan (:meth:`ddrun.evaluators.kd.KDEvaluator.relabel`): the file holds, for each epoch, the batch order
of S, each batch's augmentation seed and the teachers' mean logits on the augmented batch, and is valid for one
*key*: S (digest of its images and hard labels), the teachers (digest of their ``state_dict``), epochs, batch
size, augmentation, mix and the relabel seed. The student, its optimizer, loss and temperature are not part of
the key, so every student reuses the file (FKD's point).

File ``DIR/relabel-<first 16 hex digits of the key's digest>.pt`` (``torch.save`` zip written atomically, read
with ``weights_only=True``)::

    {"format": "ddrun-relabel", "version": 1, "key": {...},
     "order": int64 [E, N]    each epoch's permutation of S (cut into batches of ``key["batch"]``)
     "seeds": int64 [E, B]    each batch's augmentation and mix seed (B = ceil(N / batch))
     "logits": float32 [E, N, K]  the teachers' mean logits, batch after batch in ``order``}

Size ``E x N x K x 4`` bytes: 6 MB for CIFAR-10 at ipc 50 and 300 epochs, 600 MB for CIFAR-100 (float32, so a
replay from the file trains exactly as one from memory; FKD writes float16).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ddrun.files import atomic_save, digest, load_tensors
from ddrun.utils import DataError

FORMAT, VERSION = "ddrun-relabel", 1

# one step of a plan: the batch's indices into S (int64), the seed of its augmentation and mix, the teachers' mean
# logits on the augmented batch (float32 [B, K])
Relabeled = tuple[torch.Tensor, int, torch.Tensor]


def plan_key(images: torch.Tensor, labels: torch.Tensor, teachers: list[torch.nn.Module], **settings) -> dict:
    """The key a relabel file is valid for: digests of S's images and hard labels and of each teacher's
    ``state_dict``, plus ``settings`` (plain values; ``KDEvaluator.stored_plan`` gives epochs, size (N), batch,
    classes, augmentation, mix and seed)."""
    return {"images": digest(images), "labels": digest(labels),
            "teachers": [digest(dict(t.state_dict())) for t in teachers], **settings}


def plan_path(directory: str | Path, key: dict) -> Path:
    """``directory/relabel-<digest of key, 16 hex>.pt``."""
    return Path(directory) / f"relabel-{digest(key)[:16]}.pt"


def save_plan(plan: list[list[Relabeled]], key: dict, path: str | Path) -> None:
    """Write ``plan`` (one list of steps per epoch, every epoch a permutation of S) with its ``key`` to ``path``
    atomically (:func:`ddrun.files.atomic_save`, which creates the directory). Raises OSError when it cannot be
    written."""
    order = torch.stack([torch.cat([idx.cpu() for idx, _, _ in epoch]) for epoch in plan])
    seeds = torch.tensor([[s for _, s, _ in epoch] for epoch in plan], dtype=torch.int64)
    logits = torch.stack([torch.cat([t.cpu() for _, _, t in epoch]) for epoch in plan])
    atomic_save({"format": FORMAT, "version": VERSION, "key": key, "order": order, "seeds": seeds,
                 "logits": logits}, path)


def load_plan(path: str | Path, key: dict, device: torch.device) -> list[list[Relabeled]]:
    """The plan stored in ``path`` for ``key``, its tensors on ``device``.

    Raises:
        DataError: the file is missing, corrupt, not a relabel file, made for another key (names the fields
            that differ) or of inconsistent shapes (each names the file).
        UnsafeFile: the file holds pickled objects.
    """
    d = load_tensors(path, "relabel file", ("format", "key", "order", "seeds", "logits"))
    if d["format"] != FORMAT or d.get("version") != VERSION or not isinstance(d["key"], dict):
        raise DataError(f"{path}: not a ddrun relabel file of version {VERSION}")
    differ = sorted(k for k in set(key) | set(d["key"]) if key.get(k) != d["key"].get(k))
    if differ:
        raise DataError(f"{path}: made for another setting ({', '.join(differ)} differ); delete it or point "
                        f"evaluator.relabel_dir elsewhere")
    order, seeds, logits = d["order"], d["seeds"], d["logits"]
    epochs, n, batch = key["epochs"], key["size"], key["batch"]
    if (order.shape != (epochs, n) or seeds.shape != (epochs, -(-n // batch))
            or logits.shape != (epochs, n, key["classes"])):
        raise DataError(f"{path}: inconsistent shapes (order {tuple(order.shape)}, seeds {tuple(seeds.shape)}, "
                        f"logits {tuple(logits.shape)}; expected {epochs} epochs of {n} images, {key['classes']} "
                        f"classes)")
    return [[(idx.to(device), int(s), t.to(device)) for idx, s, t in
             zip(order[e].split(batch), seeds[e].tolist(), logits[e].split(batch))] for e in range(epochs)]
