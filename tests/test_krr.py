"""Kernel ridge regression objectives (KIP, RFAD, FRePo), their kernels and the model pool."""

from __future__ import annotations

import functools
import io
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import SAME_S, assert_same_s, make_cfg
from ddrun import speed
from ddrun.contracts import Fetched
from ddrun.data.datasets import RealData
from ddrun.distill import distill
from ddrun.fetchers.pool import PoolFetcher
from ddrun.nets import ConvNet
from ddrun.nets.kernels import EmpiricalNTK, RandomFeatureNNGP, relu_nngp
from ddrun.objectives.krr import KIP, RFAD, FRePo, krr_predict, label_margin
from ddrun.synthetic import SyntheticSet
from ddrun.utils import ConfigError, DdrunError, build, resolve_device


def tiny_real(k=3, n=12, hw=16, seed=0) -> RealData:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(k).repeat_interleave(n)
    proto = torch.randn(k, 1, hw, hw, generator=g)
    x = proto[y] + 0.7 * torch.randn(k * n, 1, hw, hw, generator=g)
    return RealData("tiny", x, y, x[::3].clone(), y[::3].clone(), (0.5,), (0.25,), k, [str(i) for i in range(k)])


def tiny_syn(real: RealData, ipc=2, seed=1) -> SyntheticSet:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(real.num_classes).repeat_interleave(ipc)
    return SyntheticSet(torch.randn(len(y), *real.train_images.shape[1:], generator=g), y, real.num_classes)


small_convnet = functools.partial(ConvNet, width=16, depth=2)


# ------------------------------------------------------------------------------------------------------------
# the closed form
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reg", [0.0, 1e-3, 0.5])
def test_krr_closed_form_matches_lstsq(reg):
    g = torch.Generator().manual_seed(0)
    phi_s, phi_t = torch.randn(12, 40, generator=g, dtype=torch.float64), torch.randn(7, 40, generator=g,
                                                                                       dtype=torch.float64)
    y = torch.randn(12, 4, generator=g, dtype=torch.float64)
    k_ss, k_ts = phi_s @ phi_s.T, phi_t @ phi_s.T
    lam = reg * torch.trace(k_ss) / 12
    alpha = torch.linalg.lstsq(k_ss + lam * torch.eye(12, dtype=torch.float64), y).solution
    assert torch.allclose(krr_predict(k_ss, k_ts, y, reg), k_ts @ alpha, rtol=1e-6, atol=1e-8)


def test_krr_gradient_reaches_support_kernel_and_labels():
    g = torch.Generator().manual_seed(1)
    phi = torch.randn(6, 10, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(5, 10, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda p, yy: krr_predict(p @ p.T, t @ p.T, yy, 1e-3), (phi, y))


def test_ill_conditioned_kernel_is_regularized_and_singular_one_is_a_clear_error():
    phi = torch.randn(4, 3).repeat(2, 1)  # 8 points, 4 of them duplicated: K is singular (rank 3)
    k = phi @ phi.T
    y = torch.randn(8, 2)
    out = krr_predict(k, k, y, reg=1e-6)  # the papers' ridge reg*tr(K)/n makes it solvable
    assert torch.isfinite(out).all()
    with pytest.raises(DdrunError, match="singular or ill-conditioned.*objective.reg"):
        krr_predict(k.double(), k.double(), y, reg=0.0)
    with pytest.raises(DdrunError, match="NaN/Inf"):
        krr_predict(torch.full((3, 3), float("nan")), torch.zeros(2, 3), torch.zeros(3, 2))
    with pytest.raises(DdrunError, match="is zero"):
        krr_predict(torch.zeros(3, 3), torch.zeros(2, 3), torch.zeros(3, 2))


# ------------------------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------------------------

class OneHidden(nn.Module):
    """f(x) = v . relu(W x + b): ``embed`` is the hidden layer."""

    def __init__(self, d: int, width: int):
        super().__init__()
        self.hidden = nn.Linear(d, width)

    def embed(self, x):
        return torch.relu(self.hidden(x.flatten(1)))


def test_random_features_converge_to_the_arccos_nngp():
    x = torch.randn(10, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    exact = relu_nngp(x, x, w_var=2.0, b_var=0.01)

    def error(n_models, width):
        kern = RandomFeatureNNGP(lambda channels, num_classes, im_size, width: OneHidden(16, width), 1, 10, (4, 4),
                                 "cpu", n_models=n_models, net_kwargs={"width": width})
        kern.resample(torch.Generator().manual_seed(3))
        f = kern.features(x).double()
        return float((kern.gram(f, f) - exact).abs().max() / exact.diagonal().mean())

    errs = [error(1, 16), error(4, 256), error(16, 2048)]
    assert errs[0] > errs[1] > errs[2], errs
    assert errs[2] < 0.03, errs  # 32768 features: Monte-Carlo error ~ 1/sqrt(32768)


def test_empirical_ntk_is_the_jacobian_gram_and_differentiable_in_x():
    kern = EmpiricalNTK(small_convnet, 1, 3, (16, 16), "cpu", net_kwargs={"norm": "none", "width": 8})
    kern.resample(torch.Generator().manual_seed(0))
    x = torch.randn(3, 1, 16, 16, requires_grad=True)
    f = kern.features(x)
    k = kern.gram(f, f)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in kern.net.named_parameters()}
    rows = []
    for i in range(3):
        out = torch.func.functional_call(kern.net, params, (x[i:i + 1].detach(),)).reshape(())
        rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(out, list(params.values()))]))
    j = torch.stack(rows)
    assert torch.allclose(k, j @ j.T, rtol=1e-4, atol=1e-5)
    (gx,) = torch.autograd.grad(k.sum(), x)
    assert torch.isfinite(gx).all() and gx.abs().sum() > 0


# ------------------------------------------------------------------------------------------------------------
# objectives on a fixed tiny problem
# ------------------------------------------------------------------------------------------------------------

def nngp(**kw):
    return functools.partial(RandomFeatureNNGP, small_convnet, n_models=2, net_kwargs={"norm": "none"}, **kw)


def ntk():
    return functools.partial(EmpiricalNTK, small_convnet, net_kwargs={"norm": "none", "width": 8})


def run_fixed_problem(objective, real, syn, net=None, steps=25, lr=0.05):
    """Adam steps of S on one fixed real batch and kernel draw (the same generator seed every step)."""
    objective.prepare(syn, real)
    opt = torch.optim.Adam(objective.param_groups(syn), lr=lr)
    losses = []
    for _ in range(steps):
        loss = objective(syn, real, Fetched(net), 0, torch.Generator().manual_seed(7))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("make", [
    lambda: KIP(kernel=nngp(), lr_img=0.05, lr_labels=0.05, batch_real=6),
    lambda: KIP(kernel=ntk(), lr_img=0.05, lr_labels=0.05, batch_real=6),
    lambda: RFAD(kernel=nngp(), lr_img=0.05, lr_labels=0.05, batch_real=6, reg=5e-3),
], ids=["kip-nngp", "kip-ntk", "rfad"])
def test_kernel_objectives_lower_their_loss(make):
    real = tiny_real()
    syn = tiny_syn(real)
    losses = run_fixed_problem(make(), real, syn)
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.7 * losses[0], losses
    assert syn.soft and syn.labels.grad is not None  # learned labels moved too


def test_frepo_lowers_its_loss_on_a_fixed_network():
    real = tiny_real()
    syn = tiny_syn(real)
    net = small_convnet(1, 3, (16, 16), norm="batchnorm")
    objective = FRePo(lr_img=0.05, lr_labels=0.05, batch_real=6, flip=True)
    losses = run_fixed_problem(objective, real, syn, net)
    assert losses[-1] < 0.7 * losses[0], losses
    assert not any(p.requires_grad for p in net.parameters())  # the feature extractor is frozen


def test_learned_labels_are_logits_of_the_regression_targets():
    real = tiny_real(k=4)
    syn = tiny_syn(real, ipc=1)
    obj = FRePo(lr_img=0.1, lr_labels=0.01, label_scale=8.0)
    obj.prepare(syn, real)
    y = obj.targets(syn)
    expected = (torch.eye(4) - 0.25) / math.sqrt(0.4)  # FRePo: (onehot - 1/K) / sqrt(K/10)
    assert torch.allclose(y, expected) and torch.allclose(syn.labels, 8.0 * expected)
    assert syn.hard_labels().tolist() == [0, 1, 2, 3]
    groups = {g["name"]: g["lr"] for g in obj.param_groups(syn)}
    assert groups == {"images": 0.1, "labels": pytest.approx(0.08)}  # target-unit step x label_scale
    assert label_margin(y).item() == pytest.approx(-0.25)  # margin capped at 1/K


def test_regression_targets_follow_what_the_labels_are_not_their_scale():
    """The regression protocol's targets: a kernel objective's learned labels over label_scale (even at scale 1,
    and for a kip set saved before meta["label_kind"]); a set whose soft labels are a teacher's logits (the relabel
    stage's, label_scale 1) regresses the centered probabilities, on the hard targets' scale; hard labels
    onehot - 1/K."""
    real = tiny_real(k=4)
    hard = tiny_syn(real, ipc=1)
    onehot = torch.eye(4) - 0.25
    assert torch.equal(hard.regression_targets(), onehot)
    kernel = tiny_syn(real, ipc=1)
    FRePo(lr_img=0.1, lr_labels=0.01, label_scale=1.0).prepare(kernel, real)
    assert kernel.meta["label_kind"] == "regression"
    assert torch.equal(kernel.regression_targets(), kernel.labels)  # FRePo's (onehot - 1/K) / sqrt(K/10), as learned
    old = kernel.state()
    del old["meta"]["label_kind"]
    legacy = SyntheticSet.from_state({**old, "meta": {**old["meta"], "method": "kip"}})
    assert torch.equal(legacy.regression_targets(), kernel.labels.detach())
    logits = torch.tensor([[9.0, 1.0, 0.0, -3.0]]).repeat(4, 1)
    relabeled = SyntheticSet.from_state({**old, "labels": logits, "meta": {**old["meta"], "label_kind": "logits"}})
    y = relabeled.regression_targets()
    assert torch.allclose(y, torch.softmax(logits, 1) - 0.25) and torch.allclose(y.sum(1), torch.zeros(4), atol=1e-6)
    confident = SyntheticSet.from_state({**old, "labels": 100 * torch.eye(4), "meta": {"label_kind": "logits"}})
    assert torch.allclose(confident.regression_targets(), onehot)


def test_a_kernel_objective_reads_soft_labels_for_what_they_are():
    """An S brought to a kernel objective with soft labels: a teacher's logits (the relabel stage's) become the
    centered probabilities, learned or not (not logits / label_scale, nor a restart from one-hot); FRePo puts them
    on its target scale; a kernel set's targets carry over to another label_scale unchanged."""
    real = tiny_real(k=4)
    logits = torch.tensor([[9.0, 1.0, 0.0, -3.0], [0.0, 2.0, 1.0, 0.0], [1.0, 1.0, 3.0, 1.0], [0.0, 0.0, 0.0, 4.0]])
    probs = torch.softmax(logits, 1) - 0.25

    def relabeled() -> SyntheticSet:
        base = tiny_syn(real, ipc=1).state()
        return SyntheticSet.from_state({**base, "labels": logits, "meta": {"label_kind": "logits"}})

    for learn in (False, True):
        syn, obj = relabeled(), KIP(kernel=nngp(), lr_img=0.1, lr_labels=0.01, learn_labels=learn)
        obj.prepare(syn, real)
        assert torch.allclose(obj.targets(syn), probs, atol=1e-6) and isinstance(syn.labels, nn.Parameter) == learn
        assert torch.allclose(syn.regression_targets(), probs, atol=1e-6)
    syn, frepo = relabeled(), FRePo(lr_img=0.1, lr_labels=0.01)
    frepo.prepare(syn, real)
    assert torch.allclose(frepo.targets(syn), probs * frepo.target_scale(4), atol=1e-6)
    other = SyntheticSet.from_state(syn.state())  # FRePo's set (label_scale 10) to a KIP of label_scale 1
    KIP(kernel=nngp(), lr_img=0.1, learn_labels=False, label_scale=1.0).prepare(other, real)
    assert torch.allclose(other.regression_targets(), frepo.targets(syn).detach(), atol=1e-6)


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError, match="objective.label_scale"):
        KIP(kernel=nngp(), lr_img=0.1, label_scale=0)
    with pytest.raises(ConfigError, match="objective.reg"):
        KIP(kernel=nngp(), lr_img=0.1, reg=-1)
    with pytest.raises(ConfigError, match="objective.kernel"):
        KIP(kernel=None, lr_img=0.1)
    with pytest.raises(ConfigError, match="fetcher.loss"):
        PoolFetcher(small_convnet, tiny_real(), "cpu", 0, loss="hinge")


def test_nan_images_give_a_clear_error_not_a_nan_loss():
    real = tiny_real()
    syn = tiny_syn(real)
    obj = KIP(kernel=nngp(), lr_img=0.1, batch_real=4)
    obj.prepare(syn, real)
    with torch.no_grad():
        syn.images[0] = float("nan")
    with pytest.raises(DdrunError, match="NaN/Inf"):
        obj(syn, real, None, 0, torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------------------------------------
# the model pool
# ------------------------------------------------------------------------------------------------------------

def test_pool_trains_online_resets_and_survives_a_state_round_trip():
    real = tiny_real()
    syn = tiny_syn(real)
    FRePo(lr_img=0.1, label_scale=10.0).prepare(syn, real)
    pool = PoolFetcher(small_convnet, real, "cpu", seed=0, num_models=2, max_online_updates=3, batch_train=4,
                       net_kwargs={"norm": "batchnorm"})
    assert [m["step"] for m in pool.members] == [0, 1]  # staggered
    g = torch.Generator().manual_seed(0)
    fetched = pool.fetch(0)
    net = fetched.net
    before = [p.detach().clone() for p in net.parameters()]
    pool.release(fetched, syn, real, g)
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))  # one online step on S
    assert pool.members[pool.current]["step"] in (1, 2)
    for it in range(1, 12):
        pool.release(pool.fetch(it), syn, real, g)
    assert sum(m["resets"] for m in pool.members) >= 2  # members past max_online_updates were re-initialized
    clone = PoolFetcher(small_convnet, real, "cpu", seed=0, num_models=2, max_online_updates=3, batch_train=4,
                        net_kwargs={"norm": "batchnorm"})
    buf = io.BytesIO()
    torch.save(pool.state_dict(), buf)  # as in checkpoint.pt
    buf.seek(0)
    clone.load_state_dict(torch.load(buf, weights_only=True))
    for it in range(12, 16):  # both continue identically
        for p in (pool, clone):
            p.release(p.fetch(it), syn, real, torch.Generator().manual_seed(it))
    for a, b in zip(pool.members, clone.members):
        assert a["step"] == b["step"] and a["resets"] == b["resets"]
        assert all(torch.equal(x, y) for x, y in zip(a["net"].state_dict().values(), b["net"].state_dict().values()))


# ------------------------------------------------------------------------------------------------------------
# through the loop: presets, resume, soft labels
# ------------------------------------------------------------------------------------------------------------

def tiny(root, *extra):
    return make_cfg(["dataset=mnist", f"paths.data={root}", "dataset.system_dirs=[]", "ipc=2", "net.width=16",
                     "debug=smoke", "logger=none", "objective.batch_real=4", *extra])


KERNEL_SMALL = ["objective.kernel.n_models=1", "objective.kernel.net_kwargs.width=16"]


@pytest.mark.parametrize("method,extra", [("kip", KERNEL_SMALL), ("rfad", KERNEL_SMALL),
                                          ("frepo", ["fetcher.num_models=1", "fetcher.max_online_updates=4",
                                                     "preset.pool_net.width=8",
                                                     "syn_scheduler.total=6"])])  # the cosine spans the run
def test_resume_continues_to_the_same_synthetic_set(tiny_root, tmp_path, method, extra):
    """RFAD's Platt scale and FRePo's pool are part of the checkpoint: an interrupted run ends with the same S."""
    args = [f"method={method}", "evaluator.num_eval=0", *extra, *SAME_S]
    straight = distill(tiny(tiny_root, *args, "iterations=6"), tmp_path / "straight")
    distill(tiny(tiny_root, *args, "iterations=3"), tmp_path / "resumed")
    resumed = distill(tiny(tiny_root, *args, "iterations=6"), tmp_path / "resumed")
    a, b = (torch.load(Path(o["synthetic"]), weights_only=True) for o in (straight, resumed))
    assert_same_s(a["images"], b["images"])
    assert_same_s(a["labels"], b["labels"])
    assert a["labels"].dtype == torch.float32 and a["labels"].shape == (20, 10)


def test_presets_resolve_with_the_papers_values():
    kip = make_cfg(["method=kip", "dataset=cifar100", "ipc=10"])
    assert kip.objective.batch_real == 50 and kip.objective.lr_img == 0.04 and kip.objective.reg == 1e-6
    assert kip.objective.kernel.n_models == 8 and kip.objective.kernel.net_kwargs.width == 256
    assert kip.syn_optimizer._target_ == "torch.optim.Adam" and kip.iterations == 1000
    ntk_cfg = make_cfg(["method=kip", "objective/kernel=ntk"])
    assert ntk_cfg.objective.kernel._target_.endswith("EmpiricalNTK")
    rfad = make_cfg(["method=rfad", "dataset=cifar10", "ipc=1"])
    assert rfad.objective.platt and rfad.objective.reg == 5e-3 and rfad.objective.batch_real == 512
    for ds, ipc, flip in [("cifar10", 10, True), ("cifar100", 1, True), ("cifar100", 10, False),
                          ("fashion_mnist", 1, False)]:
        fr = make_cfg(["method=frepo", f"dataset={ds}", f"ipc={ipc}"])
        assert fr.objective.flip is flip
        assert fr.fetcher.num_models == 10 and fr.fetcher.max_online_updates == 100
        assert fr.fetcher.net_kwargs.norm == "batchnorm"
    assert make_cfg(["method=frepo", "dataset=cifar100"]).objective.batch_real == 10


# ------------------------------------------------------------------------------------------------------------
# real Fashion-MNIST
# ------------------------------------------------------------------------------------------------------------

def fmnist(root, *extra):
    return make_cfg(["ipc=1", f"paths.data={root}", "dataset.train_subset=300", "dataset.test_subset=100",
                     "init=noise", "net.width=32", "logger=none", "evaluator.num_eval=1", "evaluator.epochs=60",
                     "eval_every=1000", "objective.batch_real=30", *extra])


@pytest.mark.realdata
@pytest.mark.parametrize("method,extra", [
    ("kip", ["objective.lr_img=0.05", *KERNEL_SMALL[:1], "objective.kernel.net_kwargs.width=64",
             "beside.kip.num_eval=0"]),
    ("rfad", ["objective.lr_img=0.05", "objective.lr_labels=0.01", *KERNEL_SMALL[:1],
              "objective.kernel.net_kwargs.width=64", "beside.rfad.num_eval=0", "objective.val_models=2",
              "early_stopping.val_per_class=100"]),  # the early-stopping validation is test_selection's
    ("frepo", ["objective.lr_img=0.1", "objective.lr_labels=0.01", "fetcher.num_models=4",
               "fetcher.max_online_updates=20", "preset.pool_net.width=32", "beside.frepo.num_eval=0"]),
])
def test_kernel_methods_improve_s_on_real_fashion_mnist(fmnist_root, tmp_path, method, extra):
    """From Gaussian noise, 20 iterations at ipc 1 (300 training images per class, 100 test images per class): the
    evaluator's accuracy (one ConvNet-32, 60 epochs, DSA) rises well above the initialization's, and for KIP/RFAD
    so does the logged kernel-regression accuracy."""
    out = distill(fmnist(fmnist_root, f"method={method}", "iterations=20", "eval_at_start=true", *extra),
                  tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = {r["iteration"]: r for r in rows if "acc_mean" in r}
    assert set(evals) == {0, 20}
    assert evals[20]["acc_mean"] > evals[0]["acc_mean"] + 15, evals
    if method != "frepo":
        assert evals[20]["krr_acc"] > evals[0]["krr_acc"] + 15, evals
        assert out["krr_acc"] == evals[20]["krr_acc"]


@pytest.mark.realdata
def test_soft_labels_round_trip_through_synthetic_pt_and_the_evaluator(fmnist_root, tmp_path):
    """Learned soft labels are saved as float logits, load back unchanged, and the evaluator trains with them:
    the same images with soft labels pointing at the wrong class give a far lower accuracy."""
    cfg = fmnist(fmnist_root, "method=kip", "init=real", "iterations=2", "objective.batch_real=10", *KERNEL_SMALL,
                 "beside.kip.num_eval=0", *SAME_S)  # SAME_S: the evaluation below repeats the run's
    out = distill(cfg, tmp_path / "run")
    saved = torch.load(out["synthetic"], weights_only=True)
    assert saved["labels"].dtype == torch.float32 and saved["labels"].shape == (10, 10)
    syn = SyntheticSet.load(out["synthetic"])
    assert syn.soft and torch.equal(syn.labels, saved["labels"]) and syn.hard_labels().tolist() == list(range(10))
    # on the run's device, under its settings (deterministic=true on a GPU): the run's evaluation repeated
    device = resolve_device("auto")
    real, evaluator = build(cfg.dataset).to(device), build(cfg.evaluator)
    with speed.using(deterministic=bool(SAME_S)):
        right = evaluator(syn.to(device), real, seed=0)["acc_mean"]
    assert right == pytest.approx(out["acc_mean"])  # the run's evaluation used the same soft labels
    wrong = SyntheticSet(syn.images, syn.labels.roll(1, dims=1), 10)
    assert evaluator(wrong, real, seed=0)["acc_mean"] < right - 30
