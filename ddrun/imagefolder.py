"""Synthetic sets as image folders, in and out, so that sets released by the reference repositories (SRe2L, RDED,
EDC write per-class image folders) can be evaluated by ddrun's protocols and ddrun's sets by theirs.

Layout (``torchvision.datasets.ImageFolder``'s: one folder per class, sorted names give the class order)::

    <dir>/000/00000.png, 00001.png ...     class 0 (ddrun writes 3-digit class folders, 5-digit files)
    <dir>/001/...
    <dir>/labels.pt                        soft labels only: {"files": [relative paths], "labels": float [N, K]}
    <dir>/meta.json                        what S records (dataset, ipc, method, normalization ...)

Images are 8-bit PNG in pixel space (grayscale for one channel, RGB for three): written from S through the
dataset's inverse normalization (and inverse ZCA), read back through the dataset's normalization (and ZCA), resized
to the dataset's image size when they differ (released ImageNet-size sets). Soft labels are logits, one row per
image, rows in the order of ``files`` (which is also the order of the images read back: S's order when it was
exported) or, without ``files``, of the sorted image paths. A set whose pixels are
8-bit values (a real subset, RDED's crops at their size) round-trips exactly; an optimized one up to 1/255 per pixel.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ddrun.data.datasets import RealData
from ddrun.synthetic import SyntheticSet
from ddrun.utils import ConfigError, DataError

LABELS, META = "labels.pt", "meta.json"
EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def _clear_export(out: Path, overwrite: bool) -> None:
    """Make ``out`` ready for a new export: a missing or empty folder is fine; a folder holding an earlier ddrun
    export (``meta.json``, class folders of images, ``labels.pt``) is emptied when ``overwrite``; anything else is
    refused, so that two sets (or a set and the user's files) never mix in one folder.

    Raises:
        ConfigError: ``out`` is a file; ``out`` is not empty and ``overwrite`` is false; ``out`` holds files that
            no ddrun export writes (named; they are left untouched).
    """
    import shutil

    if out.exists() and not out.is_dir():
        raise ConfigError(f"out={out} is a file, not a folder: pass out=<a new or empty folder>")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise ConfigError(f"out={out} is not empty: pass out=<a new or empty folder>, or overwrite=true to replace "
                          f"the ddrun export in it")
    if not (out / META).is_file():
        raise ConfigError(f"out={out} holds no ddrun export ({META} missing): refusing to replace its files")
    foreign = [p for p in out.iterdir() if p.name not in (META, LABELS) and not (
        p.is_dir() and all(f.is_file() and f.suffix.lower() in EXTENSIONS for f in p.iterdir()))]
    if foreign:
        raise ConfigError(f"out={out}: {foreign[0]} was not written by ddrun export: refusing to replace the folder")
    for p in out.iterdir():
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()


def write_imagefolder(syn: SyntheticSet, to_pixels, out: str | Path, overwrite: bool = False) -> dict:
    """Write S into ``out`` (module doc).

    Args:
        syn: the synthetic set (images in the dataset's normalized space).
        to_pixels: ``images -> [0, 1] pixels`` (``RealData.to_pixels`` or the inverse of S's recorded
            normalization).
        out: the folder: created, or empty.
        overwrite: replace an earlier ddrun export in ``out`` (nothing else is ever deleted).

    Returns:
        ``{"dir", "images", "classes", "soft_labels": bool}``.

    Raises:
        ConfigError: ``out`` is a file, or holds files and ``overwrite`` is false, or holds files that are not a
            ddrun export (:func:`_clear_export`).
    """
    from PIL import Image

    out = Path(out)
    _clear_export(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    pixels = to_pixels(syn.images.detach().cpu())
    u8 = (pixels * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    hard = syn.hard_labels().cpu()
    files, counts = [], {}
    for i, (img, c) in enumerate(zip(u8, hard.tolist())):
        n = counts.get(c, 0)
        counts[c] = n + 1
        rel = f"{c:03d}/{n:05d}.png"
        (out / f"{c:03d}").mkdir(exist_ok=True)
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(out / rel)
        files.append(rel)
    if syn.soft:
        torch.save({"files": files, "labels": syn.labels.detach().cpu().float()}, out / LABELS)
    meta = {k: v for k, v in syn.meta.items() if isinstance(v, (str, int, float, bool, list, type(None)))}
    (out / META).write_text(json.dumps({**meta, "num_classes": syn.num_classes}, indent=1))
    return {"dir": str(out), "images": len(files), "classes": syn.num_classes, "soft_labels": syn.soft}


def _samples(root: Path) -> tuple[list[tuple[str, int]], list[str]]:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    samples = []
    for k, name in enumerate(classes):
        for f in sorted((root / name).rglob("*")):
            if f.suffix.lower() in EXTENSIONS:
                samples.append((str(f.relative_to(root)), k))
    return samples, classes


def _soft_labels(root: Path, samples: list[tuple[str, int]], num_classes: int
                 ) -> tuple[torch.Tensor, list[tuple[str, int]]]:
    """The soft labels of ``labels.pt`` and the samples in their order (the order of its ``files`` when it lists
    them: the order S had when it was exported)."""
    from ddrun.files import load_tensors

    path = root / LABELS
    d = load_tensors(path, "soft-label file", keys=("labels",))
    labels = d["labels"]
    want = (len(samples), num_classes)
    if not isinstance(labels, torch.Tensor) or not labels.dtype.is_floating_point or tuple(labels.shape) != want:
        shape = list(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise DataError(f"{path}: soft labels of shape {shape}, expected float {list(want)} (one row of "
                        f"{num_classes} logits per image of {root})")
    files = d.get("files")
    if files is not None:
        cls = dict(samples)
        missing = [f for f in files if f not in cls]
        if missing or len(set(files)) != len(samples):
            raise DataError(f"{path}: its 'files' do not list the images of {root} (e.g. "
                            f"{missing[:1] or sorted(set(cls) - set(files))[:1]})")
        samples = [(f, cls[f]) for f in files]
    return labels.float(), samples


def read_imagefolder(path: str | Path, real: RealData) -> SyntheticSet:
    """Read an image folder as S in ``real``'s normalized space (module doc); hard labels from the folders, soft
    labels from ``labels.pt`` when present; ``meta.json`` (when present) becomes S's meta.

    Raises:
        DataError: no images, an unreadable image, or a labels file of the wrong shape (names the file).
        ConfigError: a ddrun run folder (pass its ``synthetic.pt``); the folder has another number of classes than
            the dataset.
    """
    from PIL import Image
    from torchvision.transforms import v2

    from ddrun.data.datasets import _normalize

    root = Path(path)
    if any((root / f).is_file() for f in ("synthetic.pt", "results.json", "checkpoint.pt")):
        raise ConfigError(f"{root} is a ddrun run folder, not an image folder: pass synthetic={root / 'synthetic.pt'}")
    samples, classes = _samples(root)
    if not samples:
        raise DataError(f"{root}: no images ({'/'.join(EXTENSIONS)}) in class folders")
    soft_file = (root / LABELS).is_file()  # soft labels give each image its class; folders only group them
    if len(classes) > real.num_classes or (len(classes) < real.num_classes and not soft_file):
        raise ConfigError(f"{root} has {len(classes)} class folders ({', '.join(classes[:12])}"
                          f"{' ...' if len(classes) > 12 else ''}) but dataset={real.name} has {real.num_classes} "
                          f"classes: with hard labels every class needs its folder (sorted names give the class "
                          f"order); pass the dataset the set was made from")
    soft = None
    if soft_file:
        soft, samples = _soft_labels(root, samples, real.num_classes)
    mode = "L" if real.channels == 1 else "RGB"
    resize = v2.Resize(list(real.im_size), antialias=True)
    arrays = []
    for rel, _ in samples:
        try:
            with Image.open(root / rel) as im:
                x = torch.from_numpy(np.array(im.convert(mode))).reshape(*im.size[::-1], -1).permute(2, 0, 1)
        except Exception as exc:  # noqa: BLE001 - PIL raises assorted errors on damaged files
            raise DataError(f"corrupt or unreadable image {root / rel} ({type(exc).__name__}: {exc})") from None
        arrays.append(resize(x) if tuple(x.shape[-2:]) != tuple(real.im_size) else x)
    images = real.encode(_normalize(torch.stack(arrays), real.mean, real.std).to(real.device)).cpu()
    hard = torch.tensor([k for _, k in samples], dtype=torch.long)
    labels = hard if soft is None else soft
    meta = json.loads((root / META).read_text()) if (root / META).is_file() else {}
    meta.setdefault("ipc", len(samples) // real.num_classes)
    return SyntheticSet(images, labels, real.num_classes, meta=meta)
