"""The two ZCA forms (``dataset.zca_form``): MTT's absolute eps and KIP / RFAD / FRePo's eps relative to the
covariance's trace."""

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
