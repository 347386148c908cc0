"""The exact infinite-width NNGP and NTK of the ConvNet (``ddrun.nets.exact_kernels``,
``objective/kernel=exact``)."""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import jacrev

from conftest import make_cfg
from ddrun.distill import distill
from ddrun.nets import ConvNet
from ddrun.nets.exact_kernels import ExactConvNetNNGP, relu_cov, relu_dot
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


def check_gradients(kind: str, step) -> ExactConvNetNNGP:
    """gradcheck (float64) of ``kind``'s K(S, S) and K(T, S) w.r.t. S through the chunked, checkpointed recursion,
    and of the ReLU step ``step``'s hand-written backward on correlations inside (-1, 1); returns the kernel."""
    kernel = ExactConvNetNNGP(1, 10, (6, 6), depth=2, pad28=False, chunk=3, kind=kind)
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
    assert torch.autograd.gradcheck(step, (k, v1, v2))
    return kernel


def test_gradient_matches_finite_differences():
    """The NNGP's gradients, and the ReLU covariance's hand-written backward (including c = +-1 on the diagonal of
    K(x, x), inside the recursion)."""
    check_gradients("nngp", relu_cov)


# --- the exact NTK (kind=ntk) -------------------------------------------------------------------------------------
def ntk_net(params, x, depth, w_var=2.0, b_std=0.1, readout_w_var=2.0, readout_b_std=0.1):
    """The no-norm ConvNet in the NTK parameterization: parameters N(0, 1), each conv scaled by sqrt(w_var / fan_in)
    and its bias by b_std, the readout by sqrt(readout_w_var / fan_in) and readout_b_std. One output per image."""
    h = x
    for layer in range(depth):
        w, b = params[2 * layer], params[2 * layer + 1]
        h = F.conv2d(h, w * math.sqrt(w_var / w[0].numel()), b * b_std, padding=1)
        h = F.avg_pool2d(F.relu(h), 2)
    h = h.flatten(1)
    return h @ params[-2] * math.sqrt(readout_w_var / h.shape[1]) + params[-1] * readout_b_std


def empirical_ntk(x, width, depth, generator, **kwargs):
    """J J^T over all parameters of one draw of :func:`ntk_net` with ``width`` channels, float64 ``[N, N]``."""
    shapes, c, hw = [], x.shape[1], x.shape[2]
    for _ in range(depth):
        shapes += [(width, c, 3, 3), (width,)]
        c, hw = width, hw // 2
    shapes += [(width * hw * hw,), ()]
    params = [torch.randn(s, generator=generator, dtype=torch.float64) for s in shapes]
    jac = jacrev(lambda p: ntk_net(p, x, depth, **kwargs))(params)
    j = torch.cat([a.reshape(len(x), -1) for a in jac], 1)
    return j @ j.T


def test_finite_network_ntk_converges_to_the_exact_ntk():
    """The mean empirical NTK of 200 ConvNet-128s in NTK parameterization is within 3% of the exact NTK (its
    standard error is ~1%), while the exact NNGP (~70%) and the NTK with another bias variance (~25%) are far;
    one network's NTK gets closer as width grows (~1/sqrt(width): ~30%, ~16%, ~9% at 16, 64, 256)."""
    x = images(5, dtype=torch.float64)
    k = exact(x, depth=2, pad28=False, kind="ntk")
    g = torch.Generator().manual_seed(0)
    mean = torch.stack([empirical_ntk(x, 128, 2, g) for _ in range(200)]).mean(0)
    assert rel(mean, k) < 0.03
    assert rel(mean, exact(x, depth=2, pad28=False)) > 0.3
    assert rel(mean, exact(x, depth=2, pad28=False, kind="ntk", b_std=0.3)) > 0.15
    errors = [sum(rel(empirical_ntk(x, w, 2, g), k) for _ in range(20)) / 20 for w in (16, 64, 256)]
    assert errors[0] > 1.4 * errors[1] and errors[1] > 1.4 * errors[2] and errors[2] < 0.15, errors


def test_ntk_is_symmetric_psd_and_dominates_the_nngp():
    """Theta = K + PSD terms: Theta - K is PSD, so Theta >= K on the diagonal; both float64, symmetric."""
    x = images(6, hw=10)
    ntk = ExactConvNetNNGP(1, 10, (10, 10), depth=2, pad28=False, chunk=4, kind="ntk")
    f = ntk.features(x)
    theta, k = ntk.gram(f, f), exact(x, depth=2, pad28=False, chunk=4)
    assert theta.dtype == torch.float64 and theta.shape == (6, 6)
    assert torch.allclose(theta, theta.T, rtol=1e-5, atol=1e-7)
    assert torch.linalg.eigvalsh((theta + theta.T) / 2).min() > -1e-6 * theta.diagonal().max()
    assert (theta.diagonal() > k.diagonal() * 1.05).all()
    diff = (theta - k + (theta - k).T) / 2
    assert torch.linalg.eigvalsh(diff).min() > -1e-6 * diff.diagonal().max()
    assert torch.allclose(ntk.gram(f, f[:3]), theta[:, :3], rtol=1e-5)


def test_ntk_gradient_matches_finite_differences():
    """The exact NTK's gradients and relu_dot's hand-written backward inside (-1, 1); at correlations saturated at
    +-1 (patches that are all zeros in two images, the diagonal of K(x, x)) the gradient is finite."""
    kernel = check_gradients("ntk", relu_dot)
    zeros = images(2, hw=6, seed=4).clone()
    zeros[:, :, :3, :3] = 0.0                         # the 3x3 patches at (0, 0) and (1, 1) are zero in both
    zeros.requires_grad_(True)
    f = kernel.features(zeros)
    kernel.gram(f, f).sum().backward()
    assert torch.isfinite(zeros.grad).all() and zeros.grad.abs().sum() > 0


def test_bad_configurations_raise_one_config_error():
    with pytest.raises(ConfigError, match="cannot be halved"):
        ExactConvNetNNGP(1, 10, (8, 8), depth=4, pad28=False)   # 8 -> 4 -> 2 -> 1, then a 1x1 map
    with pytest.raises(ConfigError, match="norm=none"):
        ExactConvNetNNGP(1, 10, (8, 8), norm="instancenorm")
    with pytest.raises(ConfigError, match="depth"):
        ExactConvNetNNGP(1, 10, (8, 8), depth=0)
    with pytest.raises(ConfigError, match="kind=cntk: choose nngp .* or ntk"):
        ExactConvNetNNGP(1, 10, (8, 8), kind="cntk")
    kernel = ExactConvNetNNGP(1, 10, (8, 8), depth=2)
    with pytest.raises(ValueError, match="expected images"):
        kernel.features(images(2, hw=6))


def test_exact_is_a_kernel_choice_of_kip():
    cfg = make_cfg(["method=kip", "objective/kernel=exact", "net.depth=2"])
    assert cfg.objective.kernel._target_.endswith("ExactConvNetNNGP") and cfg.objective.kernel.depth == 2
    kernel = build(cfg.objective.kernel)(channels=1, num_classes=10, im_size=(28, 28), device="cpu")
    assert isinstance(kernel, ExactConvNetNNGP) and kernel.sizes[0] == (32, 32) and kernel.kind == "nngp"
    cfg = make_cfg(["method=kip", "objective/kernel=exact", "objective.kernel.kind=ntk"])
    assert build(cfg.objective.kernel)(channels=1, num_classes=10, im_size=(28, 28), device="cpu").kind == "ntk"


@pytest.mark.realdata
@pytest.mark.parametrize("kind", ["nngp", "ntk"])
def test_kip_with_the_exact_kernel_runs_on_real_fashion_mnist(fmnist_root, tmp_path, kind):
    """KIP with objective/kernel=exact (the NNGP, and the NTK with kind=ntk), ipc 1, one target per class, on real
    Fashion-MNIST: it runs end to end, logs finite losses and learns S's labels. The NTK, twice the cost, runs on
    28x28 maps (no pad28) to stay ~10 s."""
    extra = ["objective.kernel.pad28=false"] if kind == "ntk" else []
    cfg = make_cfg(extra + ["method=kip", "objective/kernel=exact", f"objective.kernel.kind={kind}", "ipc=1",
                    f"paths.data={fmnist_root}", "dataset.train_subset=50", "dataset.test_subset=10", "init=real",
                    "logger=none", "iterations=1", "eval_every=1000", "eval_at_start=false", "evaluator.num_eval=0",
                    "beside.kip.num_eval=0", "objective.batch_real=1", "objective.report_krr=false"])
    out = distill(cfg, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses and all(torch.isfinite(torch.tensor(v)) for v in losses)
    saved = torch.load(out["synthetic"], weights_only=True)
    assert saved["images"].shape == (10, 1, 28, 28) and torch.isfinite(saved["images"]).all()
    start = 10.0 * (torch.eye(10) - 0.1)                      # label_scale x centered one-hot
    assert not torch.allclose(saved["labels"], start[saved["labels"].argmax(1)], atol=1e-3)
