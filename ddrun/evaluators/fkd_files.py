"""SRe2L's FKD-format soft-label files, read and replayed by the KD evaluator (``evaluator.labels=fkd``).

SRe2L (Yin et al., NeurIPS 2023, Sec. 3.3 "relabel"; repository VILA-Lab/SRe2L) adapts FKD (Shen & Xing, ECCV
2022; szq0214/FKD) to CutMix / MixUp: its relabel pass stores, per epoch and batch, the crop, flip and mix of every
image and the teacher's logits on the mixed batch; ``train_FKD`` replays them. Facts, read in VILA-Lab/SRe2L at
8d00cba: ``SRe2L/relabel/generate_soft_label.py`` (writer: ``main_worker``, ``save``), ``SRe2L/relabel/utils_fkd.py``
(``RandomResizedCropWithCoords``, ``RandomHorizontalFlipWithRes``, ``ImageFolder_FKD_MIX``, ``get_FKD_info``,
``rand_bbox``, ``cutmix``, ``mixup``, ``get_img2batch_idx_list``), ``SRe2L/validate/train_FKD.py`` (reader,
loss), ``SRe2L/validate/README.md`` (its patched ``_MapDatasetFetcher``) and the settings of ``relabel.sh`` /
``train_FKD.sh``:

Layout: ``<fkd_path>/epoch_<e>/batch_<b>.tar`` for e = 0 .. epochs-1 (300) and b = 0 .. ceil(N / batch)-1, each a
``torch.save`` (zip, despite ``.tar``) of the list ``[coords, flip_status, mix_index, mix_lam, mix_bbox,
soft_label]``:

- ``coords``: float32 ``[B, 4]``, each row ``(i / H, j / W, h / H, w / W)``: RandomResizedCrop's top, left,
  height, width relative to the image as read (PIL ``img.size`` = (W, H)), drawn with scale (0.08, 1).
- ``flip_status``: bool ``[B]``: the horizontal flip, applied after the crop.
- ``mix_index``: int64 ``[B]``, ``torch.randperm(B)``: the image of the batch mixed into each one; ``None``
  without mix.
- ``mix_lam``: a Python float, ``np.random.beta(alpha, alpha)`` (CutMix alpha 1, MixUp 0.8); ``None`` without mix.
- ``mix_bbox``: CutMix only, four ``numpy.int64`` ``[x1, y1, x2, y2]`` in pixels of the crop output
  (``--input-size``, 224), ``x`` indexing dim 2 (rows: ``rand_bbox`` calls ``size[2]`` of the NCHW batch ``W``)
  and ``y`` dim 3; the batch becomes ``images[:, :, x1:x2, y1:y2] = images[mix_index, :, x1:x2, y1:y2]`` (the
  stored ``lam`` is the Beta draw, not the area). MixUp: ``None``, the batch is ``lam x + (1 - lam) x[mix_index]``.
  The mix type itself is not stored (``--mix-type`` of both scripts must agree); ddrun reads it from the file: no
  index: none, an index and no box: MixUp, a box: CutMix.
- ``soft_label``: the teacher's logits (no softmax) ``[B, K]`` on the cropped, flipped, normalized, *mixed* batch;
  float16 with ``--use-fp16`` (``relabel.sh``), else float32.

Order: both scripts read the folder with ``ImageFolder_FKD_MIX`` (torchvision ``ImageFolder``: sorted class
folders, sorted files), sample it with ``RandomSampler(dataset, generator=torch.Generator().manual_seed(fkd_seed))``
(42: ``--fkd-seed`` / ``--fkd_seed``; ``get_img2batch_idx_list`` hard-codes 42) and batch it unshuffled otherwise
(``DataLoader(batch_size=B)``, ``drop_last`` false: the last batch is short). One generator serves every epoch, so
epoch e's order is the sampler's (e+1)-th pass; batch b is the b-th chunk of B images, file ``epoch_e/batch_b.tar``
(the reader finds b from the batch's first image through ``get_img2batch_idx_list``, a replay of that sampler).
``ImageFolder_FKD_MIX`` refuses ``--epochs`` above the number of epoch folders and a ``--batch-size`` other than the
stored one: epochs are never reused cyclically, and neither are they here.

Replay (``train_FKD``): per image ``t_F.resized_crop`` at ``i = coords[0] H`` ... (floats; PIL's crop rounds the box
``(j, i, j + w, i + h)``), resized bilinear to the input size, flipped where stored, ``ToTensor`` + ``Normalize``;
then the stored mix on the batch; loss ``KLDivLoss(batchmean)(log_softmax(s / T), softmax(soft_label.float() / T))``
without ``T^2`` (commented out), T 20 (``train_FKD.sh``); AdamW, cosine over the epochs; ``--gradient-accumulation-
steps`` splits a stored batch into sub-batches whose gradients (loss / steps) make one step.

Loading: CutMix files hold ``numpy.int64`` scalars (the box, from ``np.clip``), which ``torch.load(...,
weights_only=True)`` refuses by default ("Unsupported global: numpy._core.multiarray.scalar"). ddrun still loads
with ``weights_only=True`` and allowlists exactly numpy's scalar constructor (under numpy 2's and numpy 1's module
name), ``numpy.dtype`` and the numeric dtype classes: they build numbers from bytes and import nothing; any other
object is refused as pickled code.

ddrun's replay and where it departs:

- S's image n is the reference's ImageFolder sample n. ``ddrun evaluate synthetic=<folder>`` reads a folder in
  that order (:mod:`ddrun.imagefolder`: sorted class folders, sorted files) when the class folders hold the images
  directly (SRe2L's ``new000/class000_id000.jpg`` ...) and no ``labels.pt`` reorders them; ddrun's own S: its index
  order.
- The order is drawn by the installed torch's ``RandomSampler`` and ``BatchSampler`` with the reference's seed and
  passes: the reference's order as long as ``torch.randperm`` on CPU draws as in the torch that wrote the files
  (SRe2L requires torch >= 2.0). The files record no image index, so this cannot be verified from them directly;
  :meth:`FKDLabels.check` measures how often epoch 0's labels name the class of the image (or of its mix partner)
  they are replayed onto and warns when that is near chance (a wrong order, or another S).
- Crops are cut from S's float images with the reference's rounding and resized by ``F.interpolate`` (bilinear,
  antialiased: PIL's filter, without PIL's rounding to 8 bits) to S's image size, which must be the relabel's
  ``--input-size`` for the CutMix boxes to land where they did (a box outside S is refused).
- The stored logits are the teacher's in the evaluator's loss: ``loss=kl`` at ``temperature`` is the reference's
  (T 20 by default, as ``train_FKD.sh``); ``mse_ce``'s CE term takes S's hard labels mixed by pixel share
  (:func:`mixed_target`).
- One optimizer step per stored batch, without gradient accumulation (the same gradient except BatchNorm's batch
  statistics, which the reference computes per sub-batch).
- FKD's own per-image format (szq0214/FKD ``FKD_SLG``: one file per image with many crops and top-k probabilities)
  is not read.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from ddrun.files import UnsafeFile, safe_load
from ddrun.utils import ConfigError, DataError, host_to

log = logging.getLogger("ddrun.evaluate")

WHAT = "FKD label file"
ELEMENTS = "[coords, flip_status, mix_index, mix_lam, mix_bbox, soft_label]"
WRITER = "SRe2L's relabel/generate_soft_label.py --fkd-path writes it"
SEED = 42  # --fkd-seed of relabel.sh, --fkd_seed of train_FKD.py, get_img2batch_idx_list's seed


class FKDBatch(NamedTuple):
    """One stored batch (module doc), checked: ``coords`` float32 ``[B, 4]`` relative (top, left, height, width),
    ``flip`` bool ``[B]``, ``index`` int64 ``[B]`` or None, ``lam`` float or None, ``bbox`` four ints (x1, y1, x2,
    y2; x rows, y columns) or None, ``logits`` float32 ``[B, K]``."""

    coords: torch.Tensor
    flip: torch.Tensor
    index: torch.Tensor | None
    lam: float | None
    bbox: tuple[int, int, int, int] | None
    logits: torch.Tensor

    @property
    def mix(self) -> str:
        """``none``, ``mixup`` or ``cutmix``: read from which elements are stored."""
        return "none" if self.index is None else "mixup" if self.bbox is None else "cutmix"


def _numpy_scalars() -> list:
    """The allowlist of :func:`load_batch`: numpy's scalar constructor (numpy 2 and numpy 1 names), ``numpy.dtype``
    and the numeric dtype classes."""
    scalar = (np._core if hasattr(np, "_core") else np.core).multiarray.scalar  # numpy 2 / numpy 1
    return [scalar, (scalar, "numpy.core.multiarray.scalar"), np.dtype,
            *sorted({type(np.dtype(c)) for c in "?bBhHiIlLqQefd"}, key=str)]


def _fail(path: Path, what: str) -> DataError:
    return DataError(f"{path}: {what}")


def _check_mix(path: Path, d: list, rows: int, size: tuple[int, int]) -> tuple:
    """``(index, lam, bbox)`` of a loaded batch file, checked against ``rows`` images of ``size`` (H, W)."""
    index, lam, bbox = d[2], d[3], d[4]
    if index is None:
        if lam is not None or bbox is not None:
            raise _fail(path, "mix_lam / mix_bbox stored without mix_index")
        return None, None, None
    if not isinstance(index, torch.Tensor) or index.dtype.is_floating_point or tuple(index.shape) != (rows,) \
            or not torch.equal(index.sort().values.long(), torch.arange(rows)):
        raise _fail(path, f"mix_index must be a permutation of the batch's {rows} images (int64 [{rows}])")
    if not isinstance(lam, (float, int, np.floating, np.integer)) or not 0.0 <= float(lam) <= 1.0:
        raise _fail(path, f"mix_lam must be a number in [0, 1], got {lam!r}")
    if bbox is None:
        return index.long(), float(lam), None
    ok = isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(
        isinstance(v, (int, np.integer)) or (isinstance(v, torch.Tensor) and v.numel() == 1) for v in bbox)
    box = tuple(int(v) for v in bbox) if ok else None
    if box is None or not (0 <= box[0] <= box[2] <= size[0] and 0 <= box[1] <= box[3] <= size[1]):
        raise _fail(path, f"mix_bbox {bbox!r} is not a CutMix box [x1, y1, x2, y2] inside S's {size[0]}x{size[1]} "
                          f"images (x rows, y columns, in pixels of the relabel's --input-size: set dataset.im_size "
                          f"to it)")
    return index.long(), float(lam), box


def load_batch(path: str | Path, rows: int | None, classes: int, size: tuple[int, int]) -> FKDBatch:
    """Read and check one FKD batch file (module doc) holding ``rows`` images (None: as many as ``flip_status``
    holds, as SRe2L's ``get_FKD_info`` reads the batch size) of ``classes`` classes and ``size`` ``(H, W)`` (S's
    image size, for the CutMix box).

    Returns:
        :class:`FKDBatch` on the CPU, logits float32.

    Raises:
        DataError: missing, corrupt or truncated file, or an element of the wrong type or shape (one line naming
            the file and the element).
        UnsafeFile: the file holds pickled objects beyond tensors, numbers, lists and numpy scalars.
    """
    path = Path(path)
    try:
        with torch.serialization.safe_globals(_numpy_scalars()):
            d = safe_load(path, WHAT)
    except UnsafeFile:
        raise UnsafeFile(f"refused {WHAT} {path}: it holds pickled objects beyond tensors, numbers, lists and numpy "
                         f"scalars, which ddrun never executes") from None
    if not isinstance(d, (list, tuple)) or len(d) != 6:
        raise _fail(path, f"not an FKD batch file of SRe2L (expected the list {ELEMENTS}, got "
                          f"{type(d).__name__}{f' of {len(d)}' if isinstance(d, (list, tuple)) else ''})")
    coords, flip, logits = d[0], d[1], d[5]
    if not isinstance(flip, torch.Tensor) or flip.dim() != 1:
        shape = list(flip.shape) if isinstance(flip, torch.Tensor) else type(flip).__name__
        raise _fail(path, f"flip_status {shape}, expected a bool tensor [batch] (one flag per image)")
    if rows is not None and len(flip) != rows:
        raise _fail(path, f"holds {len(flip)} images, expected {rows} (S's images cut into batches of the size of "
                          f"epoch_0/batch_0.tar): the files were made for a set of another size")
    rows = len(flip)
    if not isinstance(coords, torch.Tensor) or not coords.dtype.is_floating_point \
            or tuple(coords.shape) != (rows, 4) or not bool(((coords >= 0) & (coords <= 1)).all()):
        shape = list(coords.shape) if isinstance(coords, torch.Tensor) else type(coords).__name__
        raise _fail(path, f"coords {shape}: expected float [{rows}, 4] of relative (top, left, height, width) in "
                          f"[0, 1], one row per image of the batch")
    if not isinstance(logits, torch.Tensor) or not logits.dtype.is_floating_point \
            or tuple(logits.shape) != (rows, classes):
        shape = list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise _fail(path, f"soft_label {shape}, expected [{rows}, {classes}] (the batch's {rows} images x the "
                          f"dataset's {classes} classes)")
    index, lam, bbox = _check_mix(path, d, rows, size)
    return FKDBatch(coords.float(), flip.bool(), index, lam, bbox, logits.float())


def _crop(img: torch.Tensor, coords: list[float]) -> torch.Tensor:
    """``img`` float ``[C, H, W]`` cut at relative ``coords`` (top, left, height, width) with PIL's rounding of the
    box (``Image._crop``) and resized bilinear, antialiased, back to ``[C, H, W]``."""
    h, w = img.shape[-2:]
    top, left, height, width = coords[0] * h, coords[1] * w, coords[2] * h, coords[3] * w
    x0, y0, x1, y1 = (round(v) for v in (left, top, left + width, top + height))
    x0, y0 = min(max(x0, 0), w - 1), min(max(y0, 0), h - 1)
    x1, y1 = min(max(x1, x0 + 1), w), min(max(y1, y0 + 1), h)
    region = img[:, y0:y1, x0:x1]
    if region.shape[-2:] == (h, w):
        return region.clone()
    return F.interpolate(region[None], size=(h, w), mode="bilinear", align_corners=False, antialias=True)[0]


def replay(images: torch.Tensor, batch: FKDBatch) -> torch.Tensor:
    """The reference's training batch: ``images`` float ``[B, C, H, W]`` (S's images in the batch's order) cropped,
    flipped and mixed as ``batch`` stores (module doc). Returns a new float ``[B, C, H, W]`` tensor."""
    out = torch.stack([_crop(img, c) for img, c in zip(images, batch.coords.tolist())])
    flip = host_to(batch.flip, out.device).view(-1, 1, 1, 1)
    out = torch.where(flip, out.flip(-1), out)
    if batch.index is None:
        return out
    index = host_to(batch.index, out.device)
    if batch.bbox is None:
        return batch.lam * out + (1.0 - batch.lam) * out[index]
    x1, y1, x2, y2 = batch.bbox
    out[:, :, x1:x2, y1:y2] = out[index, :, x1:x2, y1:y2]
    return out


def mixed_target(labels: torch.Tensor, classes: int, batch: FKDBatch, size: tuple[int, int]) -> torch.Tensor:
    """The hard labels int64 ``[B]`` mixed as the images were: float ``[B, K]``, each image's share its pixels
    (CutMix: 1 - box area / image area, as ``torchvision.transforms.v2.CutMix``) or ``lam`` (MixUp)."""
    target = F.one_hot(labels, classes).float()
    if batch.index is None:
        return target
    if batch.bbox is None:
        share = batch.lam
    else:
        x1, y1, x2, y2 = batch.bbox
        share = 1.0 - (x2 - x1) * (y2 - y1) / (size[0] * size[1])
    return share * target + (1.0 - share) * target[host_to(batch.index, target.device)]


def batch_orders(n: int, batch: int, epochs: int, seed: int = SEED) -> Iterator[list[torch.Tensor]]:
    """Each epoch's batches of indices into S (int64 tensors, the last one short): the reference's
    ``RandomSampler`` over ``n`` images with one ``torch.Generator`` seeded ``seed`` for all epochs, cut by
    ``BatchSampler(batch, drop_last=False)`` and passed through whole each epoch (module doc)."""
    sampler = torch.utils.data.RandomSampler(range(n), generator=torch.Generator().manual_seed(seed))
    batches = torch.utils.data.BatchSampler(sampler, batch, drop_last=False)
    for _ in range(epochs):
        yield [torch.tensor(b, dtype=torch.int64) for b in batches]


def _numbered(folder: Path, pattern: str) -> set[int]:
    """The numbers n of the entries of ``folder`` named ``pattern`` with ``(\\d+)`` for n."""
    rx = re.compile(pattern.replace("N", r"(\d+)"))
    return {int(m.group(1)) for p in folder.iterdir() if (m := rx.fullmatch(p.name))}


class FKDLabels:
    """A folder of SRe2L's FKD label files (module doc) replayed for ``epochs`` epochs.

    Args:
        directory: SRe2L's ``--fkd-path`` (``epoch_<e>/batch_<b>.tar``).
        epochs: the epochs to replay (the first ``epochs`` folders).
        seed: the sampler's seed (``--fkd-seed``, 42).

    Raises (at :meth:`check_layout` / :meth:`check`; one line each, naming the folder or file):
        DataError: the folder is missing or not a folder; an epoch folder lacks batch files or holds another
            number of them than S's size needs; a batch file is unreadable or of the wrong shape (:func:`load_batch`).
        ConfigError: fewer epoch folders than ``epochs``.
    """

    def __init__(self, directory: str | Path, epochs: int, seed: int = SEED):
        self.dir, self.epochs, self.seed = Path(directory), int(epochs), int(seed)
        self.available: int | None = None  # epoch folders epoch_0 .. epoch_{available-1}
        self.batch: int | None = None  # images per stored batch
        self.mix: str | None = None  # of epoch 0's first batch

    def check_layout(self) -> None:
        """The folder exists and holds ``epoch_0 .. epoch_{epochs-1}`` (S's size is not needed)."""
        if not self.dir.is_dir():
            raise DataError(f"evaluator.fkd_dir={self.dir}: no such folder; it should hold SRe2L's FKD soft labels, "
                            f"epoch_<e>/batch_<b>.tar ({WRITER})")
        have = _numbered(self.dir, "epoch_N")
        self.available = next(e for e in range(len(have) + 1) if e not in have)
        if self.available < self.epochs:
            gap = f" (epoch_{self.available} is missing)" if len(have) > self.available else ""
            raise ConfigError(f"{self.dir}: {len(have)} epoch folders{gap}, fewer than evaluator.epochs={self.epochs}:"
                              f" SRe2L's train_FKD refuses more epochs than were relabeled (no cyclic reuse); pass "
                              f"evaluator.epochs<={self.available} or relabel more epochs")

    def _batch_files(self, e: int, n: int) -> list[Path]:
        """``epoch_e``'s batch files in order, checked to be ``batch_0 .. batch_{ceil(n / batch) - 1}``."""
        folder = self.dir / f"epoch_{e}"
        count = math.ceil(n / self.batch)
        have = _numbered(folder, "batch_N.tar")
        if have != set(range(count)):
            raise DataError(f"{folder}: {len(have)} batch files, but S's {n} images in batches of {self.batch} "
                            f"(epoch_0/batch_0.tar's size) need batch_0.tar .. batch_{count - 1}.tar: the files "
                            f"were made for another set, or S is not in the relabeled folder's order")
        return [folder / f"batch_{b}.tar" for b in range(count)]

    def read_epoch(self, e: int, n: int, classes: int, size: tuple[int, int]) -> Iterator[FKDBatch]:
        """Epoch ``e``'s stored batches for S of ``n`` images, read and checked one at a time (:func:`load_batch`:
        batch b holds ``min(batch, n - b batch)`` rows)."""
        for b, path in enumerate(self._batch_files(e, n)):
            yield load_batch(path, min(self.batch, n - b * self.batch), classes, size)

    def check(self, labels: torch.Tensor, classes: int, size: tuple[int, int]) -> float:
        """Check the folder against S (hard labels int64 ``[N]``, ``classes``, image ``size`` (H, W)) before any
        student trains: the layout, the batch size (of ``epoch_0/batch_0.tar``, as ``get_FKD_info``), that every
        epoch folder holds the batch files S's size needs, and every file of epoch 0. Logs a warning when epoch 0's
        labels name the class of the image they are replayed onto (or of its mix partner) hardly more often than
        chance (module doc). Returns that share in [0, 1]."""
        self.check_layout()
        n = len(labels)
        first = self.dir / "epoch_0" / "batch_0.tar"
        if not first.is_file():
            raise DataError(f"{first}: missing; {self.dir} should hold epoch_<e>/batch_<b>.tar ({WRITER})")
        self.batch = len(load_batch(first, None, classes, size).flip)
        for e in range(self.epochs):
            self._batch_files(e, n)
        hits = 0
        for order, stored in zip(next(batch_orders(n, self.batch, 1, self.seed)), self.read_epoch(0, n, classes, size)):
            y, guess = labels[order.to(labels.device)].cpu(), stored.logits.argmax(1)
            partner = y if stored.index is None else y[stored.index]
            hits += int(((guess == y) | (guess == partner)).sum())
            self.mix = self.mix or stored.mix
        share = hits / n
        chance = min(1.0, (1 if self.mix == "none" else 2) / classes)
        if share < math.sqrt(chance):
            log.warning("evaluator.fkd_dir=%s: epoch 0's stored labels name the class of their image (or of its mix "
                        "partner) for only %.0f%% of S's %d images (about %.0f%% if S's order were not the relabeled "
                        "folder's): S may not be that folder in ImageFolder order, or evaluator.fkd_seed not the "
                        "relabel's --fkd-seed", self.dir, 100 * share, n, 100 * chance)
        return share

    def describe(self) -> str:
        """e.g. ``FKD files at DIR (300 epochs of 300 relabeled, batch 1024, cutmix)``."""
        return (f"FKD files at {self.dir} ({self.epochs} epochs of {self.available}, batch {self.batch}, "
                f"{self.mix}, sampler seed {self.seed})")
