"""The exact infinite-width NNGP of the ConvNet (``ddrun.nets.exact_kernels``, ``objective/kernel=exact``)."""

from __future__ import annotations

import functools
import json

import pytest
import torch

from conftest import make_cfg
from ddrun.distill import distill
from ddrun.nets import ConvNet
from ddrun.nets.exact_kernels import ExactConvNetNNGP, relu_cov
from ddrun.nets.kernels import RandomFeatureNNGP
from ddrun.utils import ConfigError, build


def images(n, hw=8, seed=0, dtype=torch.float32):
    return torch.randn(n, 1, hw, hw, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def exact(x, **kwargs):
    kernel = ExactConvNetNNGP(channels=x.shape[1], num_classes=10, im_size=tuple(x.shape[2:]), **kwargs)
    f = kernel.features(x)
    return kernel.gram(f, f)


def random_feature_draws(x, width, draws, depth=2, pad28=False, seed=0):
    """One random-feature NNGP kernel per draw (``RandomFeatureNNGP`` with one ConvNet of ``width`` channels, no
    norm), float64 ``[draws, N, N]``."""
    rf = RandomFeatureNNGP(functools.partial(ConvNet, depth=depth, pad28=pad28), channels=x.shape[1], num_classes=10,
                           im_size=tuple(x.shape[2:]), device="cpu", n_models=1,
                           net_kwargs={"width": width, "norm": "none"})
    g, out = torch.Generator().manual_seed(seed), []
    with torch.no_grad():
        for _ in range(draws):
            rf.resample(g)
            f = rf.features(x).double()
            out.append(rf.gram(f, f))
    return torch.stack(out)


def rel(a, b):
    return float((a - b).norm() / b.norm())


def test_random_feature_nngp_converges_to_the_exact_kernel():
    """The mean of 1,000 random ConvNet-128 kernels is within 3% of the exact kernel (its standard error is ~0.5%),
    while a kernel with another bias variance is ~35% away; one network's kernel gets closer as width grows."""
    x = images(5)
    k = exact(x, depth=2, pad28=False)
    mean = random_feature_draws(x, width=128, draws=1000).mean(0)
    assert rel(mean, k) < 0.03
    assert rel(mean, exact(x, depth=2, pad28=False, b_std=0.3)) > 0.15
    assert rel(mean, exact(x, depth=1, pad28=False)) > 0.15
    errors = [sum(rel(d, k) for d in random_feature_draws(x, w, 20, seed=w)) / 20 for w in (4, 32, 256)]
    assert errors[0] > 1.5 * errors[1] and errors[1] > 1.5 * errors[2], errors


def test_pad28_maps_28x28_to_32x32_like_the_convnet():
    """With ``pad28`` the first conv pads 28x28 by 3 (32x32 maps, 4x4 after three pools), and the random ConvNets
    with ``pad28=True`` (the network of every other method) agree with the exact kernel."""
    kernel = ExactConvNetNNGP(1, 10, (28, 28), depth=3, pad28=True)
    assert kernel.sizes == [(32, 32), (16, 16), (8, 8)]
    assert ExactConvNetNNGP(1, 10, (28, 28), depth=3, pad28=False).sizes == [(28, 28), (14, 14), (7, 7)]
    x = images(2, hw=28)
    k = kernel.gram(kernel.features(x), kernel.features(x))
    mean = random_feature_draws(x, width=64, draws=150, depth=3, pad28=True).mean(0)
    assert rel(mean, k) < 0.05
    assert rel(mean, exact(x, depth=3, pad28=False)) > 2 * rel(mean, k)


def test_kernel_is_symmetric_psd_float64_and_deterministic():
    x = images(6, hw=10)
    kernel = ExactConvNetNNGP(1, 10, (10, 10), depth=2, pad28=False, chunk=4)
    f = kernel.features(x)
    k = kernel.gram(f, f)
    assert k.dtype == torch.float64 and k.shape == (6, 6)
    assert torch.allclose(k, k.T, rtol=1e-5, atol=1e-7)
    assert torch.linalg.eigvalsh((k + k.T) / 2).min() > -1e-6 * k.diagonal().max()
    kernel.resample(torch.Generator().manual_seed(0))        # a no-op
    assert torch.allclose(kernel.gram(f, f[:3]), k[:, :3], rtol=1e-5)
    assert torch.allclose(kernel.cross(x, f, chunk=4), k.float().double(), rtol=1e-5)


def test_gradient_matches_finite_differences():
    """gradcheck (float64) of K(S, S) and K(T, S) w.r.t. S, through the chunked, checkpointed recursion, and of the
    ReLU covariance's hand-written backward (including c = +-1 on the diagonal of K(x, x))."""
    kernel = ExactConvNetNNGP(1, 10, (6, 6), depth=2, pad28=False, chunk=3)
    t = images(3, hw=6, seed=1, dtype=torch.float64)
    s = images(2, hw=6, seed=2, dtype=torch.float64).requires_grad_(True)

    def k_of_s(s):
        f = kernel.features(s)
        return kernel.gram(f, f), kernel.cross(t, f)

    assert torch.autograd.gradcheck(k_of_s, (s,))
    g = torch.Generator().manual_seed(3)
    v1, v2 = (torch.rand(2, 3, 3, generator=g, dtype=torch.float64).add(1.0).requires_grad_(True) for _ in range(2))
    c = torch.rand(2, 3, 3, 3, 3, generator=g, dtype=torch.float64) * 1.8 - 0.9    # correlations inside (-1, 1)
    k = (c * (v1[:, :, :, None, None] * v2[:, None, None]).sqrt()).detach().requires_grad_(True)
    assert torch.autograd.gradcheck(relu_cov, (k, v1, v2))


def test_bad_configurations_raise_one_config_error():
    with pytest.raises(ConfigError, match="cannot be halved"):
        ExactConvNetNNGP(1, 10, (8, 8), depth=4, pad28=False)   # 8 -> 4 -> 2 -> 1, then a 1x1 map
    with pytest.raises(ConfigError, match="norm=none"):
        ExactConvNetNNGP(1, 10, (8, 8), norm="instancenorm")
    with pytest.raises(ConfigError, match="depth"):
        ExactConvNetNNGP(1, 10, (8, 8), depth=0)
    kernel = ExactConvNetNNGP(1, 10, (8, 8), depth=2)
    with pytest.raises(ValueError, match="expected images"):
        kernel.features(images(2, hw=6))


def test_exact_is_a_kernel_choice_of_kip():
    cfg = make_cfg(["method=kip", "objective/kernel=exact", "net.depth=2"])
    assert cfg.objective.kernel._target_.endswith("ExactConvNetNNGP") and cfg.objective.kernel.depth == 2
    kernel = build(cfg.objective.kernel)(channels=1, num_classes=10, im_size=(28, 28), device="cpu")
    assert isinstance(kernel, ExactConvNetNNGP) and kernel.sizes[0] == (32, 32)


@pytest.mark.realdata
def test_kip_with_the_exact_kernel_runs_on_real_fashion_mnist(fmnist_root, tmp_path):
    """KIP with objective/kernel=exact, ipc 1, one target per class, on real Fashion-MNIST: it runs end to end,
    logs finite losses and learns S's labels."""
    cfg = make_cfg(["method=kip", "objective/kernel=exact", "ipc=1", f"paths.data={fmnist_root}",
                    "dataset.train_subset=50", "dataset.test_subset=10", "init=real", "logger=none",
                    "iterations=1", "eval_every=1000", "eval_at_start=false", "evaluator.num_eval=0",
                    "beside.kip.num_eval=0", "objective.batch_real=1", "objective.report_krr=false"])
    out = distill(cfg, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses and all(torch.isfinite(torch.tensor(v)) for v in losses)
    saved = torch.load(out["synthetic"], weights_only=True)
    assert saved["images"].shape == (10, 1, 28, 28) and torch.isfinite(saved["images"]).all()
    start = 10.0 * (torch.eye(10) - 0.1)                      # label_scale x centered one-hot
    assert not torch.allclose(saved["labels"], start[saved["labels"].argmax(1)], atol=1e-3)
