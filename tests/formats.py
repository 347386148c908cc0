"""Writers of small datasets in the real on-disk formats torchvision reads (IDX, CIFAR pickles, SVHN .mat)."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np


def class_images(n_per_class: int, k: int, shape: tuple[int, ...], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images whose mean brightness depends on the class (so they are learnable), and int labels."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(k), n_per_class)
    rng.shuffle(labels)
    base = (labels.reshape(-1, *([1] * len(shape))) * (200 // max(k - 1, 1))).astype(np.int32)
    imgs = np.clip(base + rng.integers(0, 50, size=(len(labels), *shape)), 0, 255).astype(np.uint8)
    return imgs, labels


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> Path:
    """IDX (LeCun's MNIST format): magic 0x08 (ubyte) + ndim, big-endian dims, then the raw bytes."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)
    return path


def write_mnist_like(root: Path, folder: str, n_train: int = 20, n_test: int = 10, gz: bool = False) -> Path:
    """The four IDX files of an MNIST-family dataset in ``root/folder/raw``; returns that folder."""
    raw = root / folder / "raw"
    for split, n in (("train", n_train), ("t10k", n_test)):
        x, y = class_images(n, 10, (28, 28), seed=len(split))
        write_idx(raw / f"{split}-images-idx3-ubyte", x, gz)
        write_idx(raw / f"{split}-labels-idx1-ubyte", y, gz)
    return raw


def write_cifar(root: Path, hundred: bool = False, n_train: int = 4, n_test: int = 2) -> Path:
    """CIFAR-10 (5 data batches + test_batch + batches.meta) or CIFAR-100 (train, test, meta) pickles."""
    k = 100 if hundred else 10
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True, exist_ok=True)
    key = "fine_labels" if hundred else "labels"

    def dump(name, n, seed):
        x, y = class_images(n, k, (3, 32, 32), seed)
        entry = {"data": x.reshape(len(x), -1), key: y.tolist(), "filenames": [f"{i}.png" for i in range(len(x))]}
        if hundred:
            entry["coarse_labels"] = (y // 5).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)

    if hundred:
        dump("train", n_train, 1)
        dump("test", n_test, 2)
        with open(folder / "meta", "wb") as f:
            pickle.dump({"fine_label_names": [f"class{i}" for i in range(k)], "coarse_label_names": []}, f)
    else:
        for b in range(1, 6):
            dump(f"data_batch_{b}", max(n_train // 5, 1), b)
        dump("test_batch", n_test, 9)
        with open(folder / "batches.meta", "wb") as f:
            pickle.dump({"label_names": [f"class{i}" for i in range(k)]}, f)
    return folder


def write_svhn(folder: Path, n_train: int = 5, n_test: int = 3) -> Path:
    """``train_32x32.mat`` / ``test_32x32.mat``: X uint8 [32, 32, 3, N], y [N, 1] in 1..10 (10 is digit 0)."""
    import scipy.io as sio

    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        x, y = class_images(n, 10, (32, 32, 3), seed=n)
        y = np.where(y == 0, 10, y).reshape(-1, 1).astype(np.uint8)
        sio.savemat(folder / f"{split}_32x32.mat", {"X": np.ascontiguousarray(x.transpose(1, 2, 3, 0)), "y": y})
    return folder


def write_image_folder(root: Path, k: int = 3, n_train: int = 2, n_test: int = 1, size: int = 20,
                       tiny_imagenet_val: bool = False) -> Path:
    """PNG/JPEG files in the ImageFolder layout (``train/<class>/images/*.JPEG`` like Tiny ImageNet), and the
    test split either as ``val/<class>/*.png`` or, with ``tiny_imagenet_val``, as ``val/images`` plus
    ``val/val_annotations.txt``."""
    from PIL import Image

    for split, n in (("train", n_train), ("val", n_test)):
        x, y = class_images(n, k, (size, size, 3), seed=n)
        lines = []
        for i, (img, c) in enumerate(zip(x, y)):
            wnid = f"n{c:08d}"
            if split == "train":
                path = root / "train" / wnid / "images" / f"{wnid}_{i}.JPEG"
            elif tiny_imagenet_val:
                path = root / "val" / "images" / f"val_{i}.JPEG"
                lines.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t{size}\t{size}")
            else:
                path = root / "val" / wnid / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(path, format="JPEG" if path.suffix == ".JPEG" else "PNG")
        if lines:
            (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return root
