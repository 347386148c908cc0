"""The two ZCA forms (``dataset.zca_form``): MTT's absolute eps and KIP / RFAD / FRePo's eps relative to the
covariance's trace; RFAD's uncentred ZCA (``dataset.zca_centre=false``) and per-image layer norm
(``dataset.layernorm``), their schema checks, collection keys and the RFAD preset."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_cfg
from formats import write_cifar


def correlated(n: int, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """``n`` images ``[n, 3, 4, 4]`` from a Gaussian with a known, strongly non-isotropic covariance."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(48, 48, generator=g, dtype=torch.float64))
    scales = torch.logspace(-2, 1, 48, dtype=torch.float64)  # eigenvalues 1e-4 .. 100
    x = (torch.randn(n, 48, generator=g, dtype=torch.float64) * scales) @ q.T + 0.3
    return x.float().reshape(n, 3, 4, 4), np.cov(x.numpy(), rowvar=False)


def test_relative_zca_whitens_sample_covariance_to_identity_up_to_the_regularization():
    from ddrun.data.zca import ZCA

    x, cov = correlated(6000)
    zca = ZCA(0.1, device="cpu", form="relative").fit(x)
    eps = 0.1 * np.trace(cov) / 48
    assert zca.eps == pytest.approx(eps, rel=1e-6)
    w = zca(x).reshape(len(x), -1).double().numpy()
    white = np.cov(w, rowvar=False)
    # exactly U diag(s / (s + eps)) U^T: the identity shrunk by the regularization along small eigenvalues
    np.testing.assert_allclose(white, cov @ np.linalg.inv(cov + eps * np.eye(48)), atol=2e-4)
    s = np.linalg.eigvalsh(cov)
    evals = np.linalg.eigvalsh(white)  # variance s / (s + eps) along each eigenvector: 1 up to the regularization
    np.testing.assert_allclose(evals, s / (s + eps), atol=2e-4)
    assert evals.max() > 0.95 and evals.max() < 1.0 + 1e-4
    # a vanishing regularization whitens to the identity itself
    tight = ZCA(1e-7, device="cpu", form="relative").fit(x)
    np.testing.assert_allclose(np.cov(tight(x).reshape(len(x), -1).double().numpy(), rowvar=False), np.eye(48),
                               atol=5e-3)  # float32 transform, eigenvalues spread over 1e-4 .. 1e2
    torch.testing.assert_close(zca.inverse(zca(x)), x, atol=1e-3, rtol=1e-4)


def test_relative_zca_is_scale_free_and_absolute_is_not():
    from ddrun.data.zca import ZCA

    x, _ = correlated(3000, seed=1)
    rel = [ZCA(0.1, device="cpu", form="relative").fit(a * x)(a * x) for a in (1.0, 10.0)]
    ab = [ZCA(0.1, device="cpu", form="absolute").fit(a * x)(a * x) for a in (1.0, 10.0)]
    torch.testing.assert_close(rel[0], rel[1], atol=1e-3, rtol=1e-3)
    assert (ab[0] - ab[1]).abs().max() > 0.1


def test_fewer_images_than_pixels_uses_the_trace_of_the_low_rank_covariance():
    from ddrun.data.zca import ZCA

    x, _ = correlated(20, seed=2)  # 20 images of 48 values: rank 19
    flat = x.reshape(20, -1).double().numpy()
    cov = np.cov(flat, rowvar=False)
    zca = ZCA(0.1, device="cpu", form="relative").fit(x)
    eps = 0.1 * np.trace(cov) / 48
    np.testing.assert_allclose(np.cov(zca(x).reshape(20, -1).double().numpy(), rowvar=False),
                               cov @ np.linalg.inv(cov + eps * np.eye(48)), atol=1e-4)


def test_dataset_zca_form_keeps_normalization_for_relative_and_refuses_unknown(tmp_path):
    from ddrun.utils import DataError, build

    write_cifar(tmp_path, n_train=10, n_test=5)
    over = [f"paths.data={tmp_path}", "dataset=cifar10", "dataset.verify_checksums=false", "dataset.zca=true"]
    rel = build(make_cfg(over + ["dataset.zca_form=relative"]).dataset)
    ab = build(make_cfg(over).dataset)
    raw = build(make_cfg(over[:-1]).dataset)
    assert rel.zca.form == "relative" and rel.mean == raw.mean and rel.std == raw.std  # whitens normalized images
    assert ab.zca.form == "absolute" and ab.mean == (0.0, 0.0, 0.0)
    torch.testing.assert_close(rel.to_pixels(rel.train_images), raw.to_pixels(raw.train_images), atol=1e-3, rtol=0)
    with pytest.raises(DataError, match="zca_form"):
        build(make_cfg(over + ["dataset.zca_form=whatever"]).dataset)


def test_kernel_presets_use_relative_zca_on_all_but_mnist_family(tmp_path):
    for method in ("kip", "rfad", "frepo"):
        for ds, on in (("cifar10", True), ("cifar100", True), ("svhn", True), ("fashion_mnist", False),
                       ("mnist", False)):
            cfg = make_cfg([f"method={method}", f"dataset={ds}", "ipc=1"])
            assert cfg.dataset.zca is on, (method, ds)
            assert cfg.dataset.zca_form == "relative" and cfg.dataset.zca_regularization == 0.1
    assert make_cfg(["method=mtt", "dataset=cifar10", "ipc=1"]).dataset.zca_form == "absolute"


def test_uncentred_zca_whitens_the_second_moment_like_rfad():
    """``centre=False`` (RFAD ``data.get_zca_matrix``): ``M = X^T X / N``, ``eps = 0.1 tr(M) / D``, no mean
    subtracted; the whitened second moment has eigenvalues ``s / (s + eps)``."""
    from ddrun.data.zca import ZCA

    x, _ = correlated(6000, seed=3)  # mean 0.3 in every value: the second moment is not the covariance
    flat = x.reshape(len(x), -1).double().numpy()
    m = flat.T @ flat / len(flat)
    zca = ZCA(0.1, device="cpu", form="relative", centre=False).fit(x)
    eps = 0.1 * np.trace(m) / 48
    assert zca.eps == pytest.approx(eps, rel=1e-6) and not zca.mean.any()
    w = zca(x).reshape(len(x), -1).double().numpy()
    s = np.linalg.eigvalsh(m)
    np.testing.assert_allclose(np.linalg.eigvalsh(w.T @ w / len(w)), s / (s + eps), atol=2e-4)
    # the reference's matrix: U diag((s + eps)^-1/2) U^T of M + eps I, applied as x @ W
    evals, evecs = np.linalg.eigh(m + eps * np.eye(48))
    np.testing.assert_allclose(zca.transform.double().numpy(), (evecs / np.sqrt(evals)) @ evecs.T, atol=1e-4)
    centred = ZCA(0.1, device="cpu", form="relative").fit(x)
    assert (centred(x) - zca(x)).abs().max() > 0.1  # non-zero mean: the two forms differ
    torch.testing.assert_close(zca.inverse(zca(x)), x, atol=1e-3, rtol=1e-4)
    few = x[:20]  # fewer images than values (rank <= N): the low-rank path, same matrix as the dense formula
    f = few.reshape(20, -1).double().numpy()
    mf = f.T @ f / 20
    low = ZCA(0.1, device="cpu", form="relative", centre=False).fit(few)
    evals, evecs = np.linalg.eigh(mf + 0.1 * np.trace(mf) / 48 * np.eye(48))
    np.testing.assert_allclose(low.transform.double().numpy(), (evecs / np.sqrt(evals)) @ evecs.T, atol=1e-4)
    torch.testing.assert_close(low.inverse(low(few)), few, atol=1e-3, rtol=1e-4)


def test_layernorm_gives_each_image_zero_mean_and_unit_norm():
    from ddrun.data.datasets import layernorm_images

    x = torch.randn(5, 3, 4, 4) * 3 + 2
    x[4] = 7.0  # a constant image: zeros, not NaN
    y = layernorm_images(x)
    assert y.shape == x.shape and y.dtype == x.dtype and torch.isfinite(y).all() and not y[4].any()
    torch.testing.assert_close(y[:4].mean(dim=(1, 2, 3)), torch.zeros(4), atol=1e-6, rtol=0)
    torch.testing.assert_close(y[:4].flatten(1).norm(dim=1), torch.ones(4))
    c = x[:4] - x[:4].mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(y[:4], c / c.square().sum(dim=(1, 2, 3), keepdim=True).sqrt())


def test_dataset_layernorm_and_uncentred_zca_on_both_splits(tmp_path):
    from ddrun.data.datasets import layernorm_images
    from ddrun.utils import DataError, build

    write_cifar(tmp_path, n_train=10, n_test=5)
    over = [f"paths.data={tmp_path}", "dataset=cifar10", "dataset.verify_checksums=false"]
    raw = build(make_cfg(over).dataset)
    ln = build(make_cfg(over + ["dataset.layernorm=true"]).dataset)
    assert ln.layernorm and ln.zca is None
    for split in ("train_images", "test_images"):
        torch.testing.assert_close(getattr(ln, split), layernorm_images(getattr(raw, split)))
    torch.testing.assert_close(ln.encode(raw.train_images), ln.train_images)
    # pictures: per-image standardized in the normalized space, then the dataset's mean / std
    c = raw.train_images - raw.train_images.mean(dim=(1, 2, 3), keepdim=True)
    std = torch.tensor(raw.std).view(1, -1, 1, 1)
    mean = torch.tensor(raw.mean).view(1, -1, 1, 1)
    expect = c / c.flatten(1).std(dim=1, correction=0).view(-1, 1, 1, 1) * std + mean
    torch.testing.assert_close(ln.to_pixels(ln.train_images, clamp=False), expect, atol=1e-4, rtol=1e-4)
    both = build(make_cfg(over + ["dataset.layernorm=true", "dataset.zca=true", "dataset.zca_form=relative",
                                  "dataset.zca_centre=false"]).dataset)
    assert both.zca.centre is False and not both.zca.mean.any()
    torch.testing.assert_close(both.zca.inverse(both.test_images), ln.test_images, atol=1e-4, rtol=1e-3)
    with pytest.raises(DataError, match="zca_centre"):
        build(make_cfg(over + ["dataset.zca=true", "dataset.zca_centre=maybe"]).dataset)


def test_schema_refuses_bad_zca_and_layernorm_values_in_one_line():
    from ddrun.schema import check_dataset_preprocessing
    from ddrun.utils import ConfigError

    check_dataset_preprocessing(make_cfg(["method=rfad", "dataset=svhn", "ipc=1"]).dataset)
    for key, bad, valid in (("zca_form", "whatever", "absolute, relative"), ("zca_centre", "maybe", "true, false"),
                            ("layernorm", "yes please", "true, false")):
        with pytest.raises(ConfigError, match=f"dataset.{key}={bad}: valid values are {valid}$"):
            check_dataset_preprocessing(make_cfg(["dataset=cifar10", f"dataset.{key}={bad}"]).dataset)


@pytest.mark.parametrize("bad", ["yes", "1", "'true'"])
def test_non_boolean_zca_is_refused_in_one_line(tiny_root, bad):
    """``dataset.zca=yes`` / ``1`` reached ``'str' object has no attribute 'fit'`` deep in the loader."""
    from ddrun.schema import check_dataset_preprocessing
    from ddrun.utils import ConfigError, DataError, build

    cfg = make_cfg(["dataset=mnist", f"paths.data={tiny_root}", "dataset.system_dirs=[]", f"dataset.zca={bad}"])
    shown = bad.strip("'")
    with pytest.raises(ConfigError, match=f"^dataset.zca={shown}: valid values are true, false$"):
        check_dataset_preprocessing(cfg.dataset)
    with pytest.raises(DataError, match=r"^dataset.zca=.*: valid values are \[true, false\]$"):
        build(cfg.dataset)  # the loader refuses it too, where no command checked the config first


def test_rfad_preset_uses_uncentred_zca_and_svhn_layernorm_others_keep_the_centred_form():
    for ds, zca, ln in (("cifar10", True, False), ("cifar100", True, False), ("svhn", True, True),
                        ("mnist", False, False), ("fashion_mnist", False, False)):
        cfg = make_cfg(["method=rfad", f"dataset={ds}", "ipc=1"])
        assert (cfg.dataset.zca, cfg.dataset.zca_centre, cfg.dataset.layernorm) == (zca, not zca, ln), ds
    assert make_cfg(["method=rfad", "dataset=svhn", "ipc=1", "dataset.layernorm=false"]).dataset.layernorm is False
    for method in ("kip", "frepo", "mtt"):
        cfg = make_cfg([f"method={method}", "dataset=svhn", "ipc=1"])
        assert cfg.dataset.zca_centre is True and cfg.dataset.layernorm is False, method


def test_collections_key_uncentred_zca_and_layernorm_apart_and_keep_old_keys():
    import functools

    from ddrun.data.datasets import RealData
    from ddrun.data.zca import ZCA
    from ddrun.nets import ConvNet
    from ddrun.store import collection_dir, command_for, setting_of

    x, _ = correlated(60, seed=4)
    y = torch.arange(3).repeat_interleave(20)
    net = functools.partial(ConvNet, width=4, depth=1)

    def key(centre=True, layernorm=False, form="relative"):
        real = RealData("tiny", x, y, x, y, (0.5,) * 3, (0.25,) * 3, 3, ["a", "b", "c"], layernorm=layernorm,
                        zca=ZCA(0.1, device="cpu", form=form, centre=centre))
        setting = setting_of(real, net, None)
        return collection_dir("/r", "experts", setting).parts[2], command_for("experts", setting, "/r")

    assert key()[0] == "tiny-zcarel" and key(form="absolute")[0] == "tiny-zca"  # the keys from before
    d, cmd = key(centre=False, layernorm=True)
    assert d == "tiny-zcarelunc-ln"
    assert "dataset.zca_form=relative dataset.zca_centre=false" in cmd and "dataset.layernorm=true" in cmd
    assert "zca_centre" not in key()[1] and "layernorm" not in key()[1]


def test_evaluate_refuses_a_set_whitened_otherwise():
    from ddrun.data.datasets import RealData
    from ddrun.data.zca import ZCA
    from ddrun.evaluate import check_compatible
    from ddrun.synthetic import SyntheticSet
    from ddrun.utils import ConfigError

    x, _ = correlated(60, seed=5)
    y = torch.arange(3).repeat_interleave(20)
    real = RealData("tiny", x, y, x, y, (0.5,) * 3, (0.25,) * 3, 3, ["a", "b", "c"],
                    zca=ZCA(0.1, device="cpu", form="relative"))
    meta = {"dataset": "tiny", "zca": True, "zca_form": "relative"}
    check_compatible(SyntheticSet(x[:3], y[:3], 3, meta={**meta, "zca_centre": True, "layernorm": False}), real, "S")
    with pytest.raises(ConfigError, match="uncentred.*dataset.zca_centre=false"):
        check_compatible(SyntheticSet(x[:3], y[:3], 3, meta={**meta, "zca_centre": False}), real, "S")
    with pytest.raises(ConfigError, match="dataset.layernorm=true"):
        check_compatible(SyntheticSet(x[:3], y[:3], 3, meta={**meta, "layernorm": True}), real, "S")
