"""Every dataset loads through torchvision from small files written in its real on-disk format, and bad files
get errors that name them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import make_cfg
from formats import write_cifar, write_mnist_like, write_svhn
from ddrun.utils import DataError, build


def load(name: str, root: Path, *extra: str):
    return build(make_cfg([f"dataset={name}", f"paths.data={root}", *extra]).dataset)


@pytest.mark.parametrize("name,folder,mean", [("mnist", "MNIST", 0.1307), ("fashion_mnist", "FashionMNIST", 0.2861)])
@pytest.mark.parametrize("gz", [False, True])
def test_idx_datasets(tmp_path, name, folder, mean, gz):
    write_mnist_like(tmp_path, folder, n_train=6, n_test=3, gz=gz)
    data = load(name, tmp_path, "dataset.system_dirs=[]")
    assert data.train_images.shape == (60, 1, 28, 28) and data.train_images.dtype == torch.float32
    assert data.test_images.shape == (30, 1, 28, 28)
    assert sorted(data.train_labels.unique().tolist()) == list(range(10))
    assert data.mean == (mean,)
    # normalized space maps back to the stored pixels
    raw = data.to_pixels(data.train_images[:1])
    assert raw.min() >= 0 and raw.max() <= 1


@pytest.mark.parametrize("hundred", [False, True])
def test_cifar(tmp_path, hundred):
    write_cifar(tmp_path, hundred, n_train=5 if not hundred else 2, n_test=1)
    name = "cifar100" if hundred else "cifar10"
    data = load(name, tmp_path, "dataset.verify_checksums=false")
    k = 100 if hundred else 10
    assert data.num_classes == k and data.channels == 3 and data.im_size == (32, 32)
    assert data.train_images.shape[0] == (2 * k if hundred else 5 * 10)
    assert data.class_names[0] == "class0"


def test_cifar_checksum_names_file(tmp_path):
    write_cifar(tmp_path, n_train=5, n_test=1)
    with pytest.raises(DataError, match=r"corrupt file .*data_batch_1 \(md5"):
        load("cifar10", tmp_path)


class _Planted:
    """A pickle payload: unpickling it creates the file ``path``."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_download_true_never_unpickles_files_it_did_not_check(tmp_path):
    """dataset.download=true once skipped the md5 check (torchvision's download found the files and loaded them):
    a planted CIFAR pickle ran. The files are now checked like placed files before anything is read."""
    import pickle

    folder = write_cifar(tmp_path, n_train=5, n_test=1)
    ran = tmp_path / "ran"
    (folder / "batches.meta").write_bytes(pickle.dumps(_Planted(ran)))
    with pytest.raises(DataError, match=r"corrupt file .*data_batch_1 \(md5"):
        load("cifar10", tmp_path, "dataset.download=true")
    assert not ran.exists()


def test_failed_download_is_one_line_naming_the_folder(tmp_path, monkeypatch):
    """No network (torchvision's downloader raises): one line, not "corrupt file ... delete it" about a file that
    was never there."""
    import torchvision.datasets.utils as tvu

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(tvu, "download_and_extract_archive", offline)
    with pytest.raises(DataError, match=r"dataset cifar10: downloading into .*cifar-10-batches-py failed "
                                        r"\(OSError: no network\)"):
        load("cifar10", tmp_path, "dataset.download=true")


def test_svhn(tmp_path):
    write_svhn(tmp_path / "svhn", n_train=3, n_test=2)
    data = load("svhn", tmp_path, "dataset.verify_checksums=false")
    assert data.train_images.shape == (30, 3, 32, 32) and data.test_images.shape == (20, 3, 32, 32)
    assert data.train_labels.min() == 0 and data.train_labels.max() == 9  # label 10 means digit 0
    assert data.dsa_strategy == "color_crop_cutout_scale_rotate"  # no flip for digits


def test_balanced_subset(tmp_path):
    write_mnist_like(tmp_path, "MNIST", n_train=6, n_test=3)
    data = load("mnist", tmp_path, "dataset.train_subset=2", "dataset.test_subset=1")
    assert torch.bincount(data.train_labels).tolist() == [2] * 10
    assert len(data.test_labels) == 10
    assert (data.train_subset, data.test_subset) == (2, 1)


def test_a_subset_larger_than_some_classes_keeps_them_whole_and_says_so(caplog):
    """train_subset=N is "at most N per class" (debug=smoke's 50 on small sets): a class with fewer keeps all of
    its images, and a warning states the counts actually kept, so an unbalanced T is never silent. The classes of
    sklearn_digits' training split hold 144 to 153 images: 150 cuts the larger ones, so it stays a subset."""
    with caplog.at_level("WARNING", logger="ddrun.data"):
        data = build(make_cfg(["dataset=sklearn_digits", "dataset.train_subset=150"]).dataset)
    assert torch.bincount(data.train_labels).tolist() == [148, 150, 147, 150, 150, 150, 150, 149, 144, 150]
    assert data.train_subset == 150
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "dataset sklearn_digits: train_subset=150 is more than some classes hold: kept 144 " \
                                "to 150 images per class, all of each short class (class 0: 148, class 2: 147, " \
                                "class 7: 149, class 8: 144)" in warned[0], warned
    assert "pass a subset <= 144 for a balanced one" in warned[0]


def test_a_subset_of_at_least_every_class_is_the_whole_split_recorded_as_null(caplog):
    """A subset no class fills (153: sklearn_digits' largest training class; 40 of a test split of 30 per class)
    keeps the whole split, so it is recorded as null (store key, run record and hashes then equal a full-split
    run's, which uses the same images), and the warning says so."""
    full = build(make_cfg(["dataset=sklearn_digits"]).dataset)
    with caplog.at_level("WARNING", logger="ddrun.data"):
        data = build(make_cfg(["dataset=sklearn_digits", "dataset.train_subset=153", "dataset.test_subset=40"]).dataset)
    assert data.train_subset is None and data.test_subset is None
    for key in ("train_images", "train_labels", "test_images", "test_labels"):
        assert torch.equal(getattr(data, key), getattr(full, key)), key
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warned == ["dataset sklearn_digits: train_subset=153 is at least every class's size (the largest holds "
                      "153): the whole train split is used, recorded as train_subset=null",
                      "dataset sklearn_digits: test_subset=40 is at least every class's size (the largest holds "
                      "30): the whole test split is used, recorded as test_subset=null"]


def test_missing_dataset_names_path_and_remedy(tmp_path):
    with pytest.raises(DataError) as e:
        load("fashion_mnist", tmp_path, "dataset.system_dirs=[]")
    msg = str(e.value)
    assert str(tmp_path / "FashionMNIST" / "raw") in msg and "apt-get install dataset-fashion-mnist" in msg
    with pytest.raises(DataError, match=r"cifar-10-batches-py.*Missing: data_batch_1.*cs.toronto.edu"):
        load("cifar10", tmp_path)


def test_truncated_idx_named(tmp_path):
    raw = write_mnist_like(tmp_path, "MNIST", n_train=6, n_test=3)
    f = raw / "train-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(DataError, match=r"corrupt or truncated file .*train-images-idx3-ubyte"):
        load("mnist", tmp_path)


def test_truncated_gz_named(tmp_path):
    raw = write_mnist_like(tmp_path, "MNIST", n_train=6, n_test=3, gz=True)
    f = raw / "t10k-images-idx3-ubyte.gz"
    f.write_bytes(f.read_bytes()[:40])
    with pytest.raises(DataError, match=r"corrupt or truncated file .*t10k-images-idx3-ubyte.gz"):
        load("mnist", tmp_path)


def test_corrupt_cifar_pickle_named(tmp_path):
    folder = write_cifar(tmp_path, n_train=5, n_test=1)
    (folder / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match=r"corrupt or truncated file .*data_batch_3"):
        load("cifar10", tmp_path, "dataset.verify_checksums=false")


def test_corrupt_svhn_named(tmp_path):
    folder = write_svhn(tmp_path / "svhn")
    (folder / "test_32x32.mat").write_bytes(b"MATLAB garbage")
    with pytest.raises(DataError, match=r"corrupt or truncated file .*test_32x32.mat"):
        load("svhn", tmp_path, "dataset.verify_checksums=false")


def _plant_label(fmt: str, root: Path) -> tuple[str, Path, str, list[str]]:
    """Write a small dataset of ``fmt`` whose one file holds a label outside the valid range; returns the config
    name, that file, the bad value as the file holds it and the extra overrides."""
    import pickle

    import numpy as np
    import scipy.io as sio

    from formats import write_idx

    if fmt == "idx":
        raw = write_mnist_like(root, "MNIST", n_train=6, n_test=3)
        f = raw / "t10k-labels-idx1-ubyte"
        labels = np.frombuffer(f.read_bytes()[8:], dtype=np.uint8).copy()
        labels[4] = 12
        write_idx(f, labels)
        return "mnist", f, "12", ["dataset.system_dirs=[]"]
    if fmt in ("cifar10", "cifar100"):
        folder = write_cifar(root, fmt == "cifar100", n_train=5, n_test=2)
        f = folder / ("train" if fmt == "cifar100" else "data_batch_3")
        entry = pickle.loads(f.read_bytes())
        key = "fine_labels" if fmt == "cifar100" else "labels"
        entry[key][1] = -1
        f.write_bytes(pickle.dumps(entry))
        return fmt, f, "-1", ["dataset.verify_checksums=false"]
    folder = write_svhn(root / "svhn", n_train=3, n_test=2)
    f = folder / "train_32x32.mat"
    m = sio.loadmat(f)
    m["y"][2, 0] = 11
    sio.savemat(f, {"X": m["X"], "y": m["y"]})
    return "svhn", f, "11", ["dataset.verify_checksums=false"]


@pytest.mark.parametrize("fmt,valid", [("idx", "0..9"), ("cifar10", "0..9"), ("cifar100", "0..99"),
                                       ("svhn", "1..10")])
def test_out_of_range_label_names_the_file_the_value_and_the_range(tmp_path, fmt, valid):
    """A label >= K or < 0 in a dataset file (once: a CUDA assert or an IndexError deep in training, or a class
    silently left empty) is one DataError naming the file, the label and the valid labels."""
    name, f, value, extra = _plant_label(fmt, tmp_path)
    with pytest.raises(DataError) as e:
        load(name, tmp_path, *extra)
    msg = str(e.value)
    assert f"{f} holds label {value}" in msg and f"valid labels are {valid}" in msg and "\n" not in msg, msg


def test_real_fashion_mnist(fmnist_root):
    """The real Fashion-MNIST: 60k/10k, the known pixel mean, 6000 per class."""
    data = load("fashion_mnist", fmnist_root)
    assert data.train_images.shape == (60000, 1, 28, 28) and data.test_images.shape == (10000, 1, 28, 28)
    assert float(data.to_pixels(data.train_images[:20000]).mean()) == pytest.approx(0.2860, abs=2e-3)
    assert torch.bincount(data.train_labels).tolist() == [6000] * 10


@pytest.mark.parametrize("tiny_val", [False, True])
def test_image_folders(tmp_path, tiny_val):
    from formats import write_image_folder

    write_image_folder(tmp_path / "tiny-imagenet-200", k=3, n_train=2, n_test=2, tiny_imagenet_val=tiny_val)
    data = load("tiny_imagenet", tmp_path)
    assert data.train_images.shape == (6, 3, 64, 64) and data.test_images.shape == (6, 3, 64, 64)
    assert data.num_classes == 3 and sorted(data.test_labels.tolist()) == [0, 0, 1, 1, 2, 2]


def test_unreadable_image_named(tmp_path):
    from formats import write_image_folder

    root = write_image_folder(tmp_path / "imagefolder", k=2, n_train=1, n_test=1)
    bad = next((root / "train").rglob("*.JPEG"))
    bad.write_bytes(b"not an image")
    with pytest.raises(DataError, match=f"corrupt or unreadable image {bad}"):
        load("imagefolder", tmp_path)


def test_tiny_imagenet_refuses_a_missing_training_class_folder(tmp_path):
    """A class listed in val/val_annotations.txt but missing from train/ is refused (it once became K-1 classes and
    that class's test images were dropped)."""
    import shutil

    from formats import write_image_folder

    root = write_image_folder(tmp_path / "tiny-imagenet-200", k=3, n_train=2, n_test=2, tiny_imagenet_val=True)
    shutil.rmtree(root / "train" / "n00000001")
    with pytest.raises(DataError, match=r"val_annotations.txt lists 1 class\(es\) with no folder in .*train: "
                                        r"n00000001; restore"):
        load("tiny_imagenet", tmp_path)


@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize("empty", ["class", "all"])
def test_image_folder_without_images_is_one_data_error(tmp_path, split, empty):
    """An empty class folder, or no class folders at all, is a DataError naming the folder (torchvision raises
    FileNotFoundError, which reached the user as Hydra's traceback)."""
    import shutil

    from formats import write_image_folder

    root = write_image_folder(tmp_path / "imagefolder", k=2, n_train=1, n_test=1)
    folder = root / split
    if empty == "class":
        (folder / "n00000005").mkdir()
    else:
        shutil.rmtree(folder)
        folder.mkdir()
    with pytest.raises(DataError, match=f"dataset imagefolder: no images to read in {folder} ") as info:
        load("imagefolder", tmp_path)
    assert "\n" not in str(info.value) and (empty == "all" or "n00000005" in str(info.value))
