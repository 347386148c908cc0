"""FRePo as its reference: the pool's Conv network, flax's BatchNorm convention, the cosine decay of S's step size,
and the MSE regression protocol that evaluates learned labels."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_cfg
from ddrun.data.datasets import RealData
from ddrun.distill import distill
from ddrun.evaluators.regression import RegressionEvaluator, warmup_cosine
from ddrun.nets import FRePoConv
from ddrun.synthetic import SyntheticSet
from ddrun.utils import ConfigError, build


def reference_param_count(c: int, k: int, hw: int, width: int = 128, depth: int = 3, bn: bool = True) -> int:
    """yongchaoz/FRePo networks.Conv: conv_i (3x3, c_in -> width*2^i, bias), BatchNorm (scale+bias) before conv_i
    for i > 0, Dense(features -> k) with features = width*2^(depth-1) * (hw'/2^depth)^2, hw' = 32 for 28."""
    hw = 32 if hw == 28 else hw
    total, c_in = 0, c
    for i in range(depth):
        out = width * 2**i
        total += (2 * c_in if bn and i > 0 else 0) + 9 * c_in * out + out
        c_in = out
    feat = c_in * (hw // 2**depth) ** 2
    return total + feat * k + k


@pytest.mark.parametrize("c,k,hw", [(3, 10, 32), (1, 10, 28), (3, 100, 32)])
def test_frepo_conv_matches_the_reference_formula(c, k, hw):
    net = FRePoConv(c, k, (hw, hw))
    assert sum(p.numel() for p in net.parameters()) == reference_param_count(c, k, hw)
    assert net.feature_dim == 8192 and net.embed(torch.randn(2, c, hw, hw)).shape == (2, 8192)
    assert net(torch.randn(2, c, hw, hw)).shape == (2, k)
    convs = [m for m in net.features if isinstance(m, torch.nn.Conv2d)]
    assert [m.out_channels for m in convs] == [128, 256, 512]
    kinds = [type(m).__name__ for m in net.features]  # norm *before* every conv after the first
    assert kinds == ["Conv2d", "ReLU", "AvgPool2d", "BatchNorm2d", "Conv2d", "ReLU", "AvgPool2d", "BatchNorm2d",
                     "Conv2d", "ReLU", "AvgPool2d"]
    plain = FRePoConv(c, k, (hw, hw), norm="none")
    assert sum(p.numel() for p in plain.parameters()) == reference_param_count(c, k, hw, bn=False)
    # DC ConvNet-3 has 2,048 features: the kernel of S would be rank-limited above |S| = 2,048
    from ddrun.nets import ConvNet
    assert ConvNet(c, k, (hw, hw)).feature_dim == 2048


def test_batchnorm_follows_flax_momentum_and_lecun_init():
    net = FRePoConv(3, 10, (32, 32), width=8)
    bn = next(m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    x = torch.randn(16, 3, 32, 32) * 3 + 1
    net.train()
    with torch.no_grad():
        h = net.features[:3](x)
        net(x)
    batch_mean = h.mean((0, 2, 3))
    # flax BatchNorm(momentum=0.1): running = 0.1 * running + 0.9 * batch (the newest batch weighs 90%)
    torch.testing.assert_close(bn.running_mean, 0.9 * batch_mean, rtol=1e-5, atol=1e-6)
    w = net.features[0].weight
    assert w.abs().max() <= 2 * (1 / 27) ** 0.5 / 0.87962566103423978 + 1e-6  # truncated at 2 std
    assert abs(w.std().item() - (1 / 27) ** 0.5) < 0.03 and net.features[0].bias.abs().max() == 0


def test_frepo_preset_uses_the_reference_pool_net_schedule_zca_and_own_protocol():
    cfg = make_cfg(["method=frepo", "dataset=cifar100", "ipc=10"])
    assert cfg.fetcher.net._target_.endswith("FRePoConv") and cfg.fetcher.net.norm == "batchnorm"
    assert cfg.fetcher.net.bn_momentum == 0.9 and cfg.net._target_.endswith("ConvNet")  # common evaluator: DC net
    assert cfg.syn_scheduler._target_.endswith("cosine_lr") and cfg.syn_scheduler.final == 0.1
    assert cfg.dataset.zca and cfg.dataset.zca_form == "relative"
    own = cfg.beside.frepo
    assert own._target_.endswith("RegressionEvaluator") and own.net.norm == "none" and own.optimizer == "adam"
    assert own.lr == 3e-4 and own.warmup == 500 and own.final_lr == 0.01 and own.steps[1000] == 10000
    assert not make_cfg(["method=frepo", "dataset=fashion_mnist"]).dataset.zca


def test_warmup_cosine_is_optax_join_of_linear_and_cosine():
    assert warmup_cosine(0, 1000, 500, 0.01) == 0.0 and warmup_cosine(250, 1000, 500, 0.01) == 0.5
    assert warmup_cosine(500, 1000, 500, 0.01) == pytest.approx(1.0)
    assert warmup_cosine(750, 1000, 500, 0.01) == pytest.approx(0.01 + 0.99 * 0.5)
    assert warmup_cosine(1000, 1000, 500, 0.01) == pytest.approx(0.01)


def blobs(k=3, n=40, hw=8, seed=0) -> RealData:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(k).repeat_interleave(n)
    proto = 2 * torch.randn(k, 1, hw, hw, generator=g)
    x = proto[y] + torch.randn(k * n, 1, hw, hw, generator=g)
    return RealData("blobs", x, y, x[1::2].clone(), y[1::2].clone(), (0.5,), (0.25,), k, ["a", "b", "c"])


def test_mse_label_protocol_trains_on_real_valued_targets():
    """The regression evaluator fits S's [N, K] real-valued targets: soft labels as learned regression targets
    are what it trains on (wrong targets give a wrong classifier), and its network regresses them."""
    real = blobs()
    idx = torch.arange(0, 120, 8)  # 5 images per class
    y_hard = real.train_labels[idx]
    g = torch.Generator().manual_seed(0)  # real-valued targets: centered one-hot plus per-image noise
    targets = torch.nn.functional.one_hot(y_hard, 3).float() - 1 / 3 + 0.1 * torch.randn(15, 3, generator=g)
    syn = SyntheticSet(real.train_images[idx], 10.0 * targets, 3, learn_labels=True,
                       meta={"label_scale": 10.0})
    assert syn.soft and syn.regression_targets().shape == (15, 3)
    ev = RegressionEvaluator(lambda channels, num_classes, im_size: FRePoConv(channels, num_classes, im_size,
                                                                             width=4, depth=2, norm="none"),
                             num_eval=2, steps=150, warmup=20, lr=5e-3)
    res = ev(syn, real, seed=0)
    assert res["acc_mean"] > 90 and res["protocol_fields"]["evaluator"] == "regression"
    # a real-valued target per class the network must reproduce, not only its argmax: scaled targets train the
    # same classifier, permuted ones a wrong one
    shuffled = SyntheticSet(syn.images, syn.labels.roll(1, dims=1), 3, learn_labels=True,
                            meta={"label_scale": 10.0})
    assert ev(shuffled, real, seed=0)["acc_mean"] < 10
    net = FRePoConv(1, 3, (8, 8), width=4, depth=2, norm="none")
    ev_one = RegressionEvaluator(lambda **kw: net, num_eval=1, steps=200, warmup=20, lr=5e-3)
    ev_one.train_one(syn, real, seed=0)
    with torch.no_grad():
        err = (net(syn.images) - syn.regression_targets()).abs().max()
    assert err < 0.25  # it regressed the real values themselves (targets span about [-0.6, 0.9])


def tiny(root, *extra):
    return make_cfg(["dataset=mnist", f"paths.data={root}", "dataset.system_dirs=[]", "ipc=2", "net.width=8",
                     "debug=smoke", "logger=none", "objective.batch_real=4", *extra])


def test_frepo_run_reports_its_own_protocol_beside_the_common_one(tiny_root, tmp_path):
    small = ["method=frepo", "fetcher.num_models=2", "fetcher.max_online_updates=3", "preset.pool_net.width=8",
             "beside.frepo.net.width=4", "beside.frepo.num_eval=1", "beside.frepo.epochs=3",
             "beside_protocols=true"]  # debug=smoke skips the papers' own protocols (their full budgets): back on
    assert tiny(tiny_root, "method=frepo").beside_protocols is False
    out = distill(tiny(tiny_root, *small), tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "acc_mean" in r]
    assert evals and all("frepo/acc_mean" in r and "frepo/acc_std" in r for r in evals)
    assert out["beside"]["frepo"]["protocol_fields"]["evaluator"] == "regression"
    assert out["frepo/acc_mean"] == evals[-1]["frepo/acc_mean"]
    rec = json.loads((tmp_path / "run" / "results.json").read_text())
    # the record's best is the headline's, labelled with the headline's protocol (once with the last beside one's)
    assert [e["protocol"]["evaluator"] for e in rec["evaluations"]] == ["default", "regression"]
    assert rec["best"]["protocol_line"] == rec["evaluations"][0]["protocol_line"] == evals[-1]["protocol"]
    lrs = [r for r in rows if "loss" in r]
    assert lrs
    # cosine decay of S's step size to 0.1x: after the run, the optimizer's step size is 0.1 x lr_img
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.1 * 1e-3)
    cfg = tiny(tiny_root, *small)
    assert build(cfg.fetcher)(real=build(cfg.dataset), device=torch.device("cpu"), seed=0).fetch(0).net.feature_dim \
        == 8 * 4 * 4 * 4


@pytest.mark.parametrize("override,message", [
    ("evaluator.epochs=0", r"^evaluator\.epochs=0: must be a whole number >= 1 \(fewer trains nothing"),
    ("evaluator.epochs=-2", r"^evaluator\.epochs=-2: must be a whole number >= 1"),
    ("evaluator.epochs=null evaluator.steps=0", r"^evaluator\.steps=0: must be a whole number >= 1"),
    ("evaluator.epochs=null evaluator.steps={10:0}", r"^evaluator\.steps\.10=0: must be a whole number >= 1"),
    ("evaluator.batch_train=0", r"^evaluator\.batch_train=0: must be a whole number >= 1$"),
    ("evaluator.epochs=abc", r"^evaluator\.epochs=abc: must be a whole number >= 1"),
])
def test_regression_protocol_refuses_no_training(tiny_root, override, message):
    """evaluator=regression with nothing to train (0 epochs / steps: an untrained network's chance accuracy
    recorded as S's) or an empty minibatch (a ZeroDivisionError once) is one ConfigError line naming the key."""
    with pytest.raises(ConfigError, match=message):
        build(tiny(tiny_root, "method=frepo", "evaluator=regression", *override.split()).evaluator)
    if "batch_train" not in override:  # a whole step count still builds
        one = tiny(tiny_root, "method=frepo", "evaluator=regression", "evaluator.epochs=1")
        assert build(one.evaluator).epochs == 1


def test_regression_protocol_beside_names_its_own_key(tiny_root, tmp_path):
    """The same evaluator under beside.frepo: the refusal names beside.frepo.<key>, before any data is loaded."""
    with pytest.raises(ConfigError, match=r"^beside\.frepo\.epochs=0: must be a whole number >= 1"):
        distill(tiny(tiny_root, "method=frepo", "beside_protocols=true", "beside.frepo.epochs=0"), tmp_path / "run")


def test_early_stopping_states_the_validation_images_drawn_per_class():
    """val_per_class asks for training images a class may not hold (sklearn_digits' training classes hold 144 to
    153): the protocol states the counts drawn, which are the validation split's own (it once said "150/class"
    whatever was drawn); a request every class fills keeps its text."""
    real = build(make_cfg(["dataset=sklearn_digits"]).dataset)

    def net(channels, num_classes, im_size):
        return FRePoConv(channels, num_classes, im_size, width=4, depth=1, norm="none")

    ev = RegressionEvaluator(net, num_eval=1, steps=2, warmup=0, val_per_class=150, val_every=1)
    ev.prepare(real)
    drawn = torch.bincount(ev._validation(real, seed=0)[1]).tolist()
    assert ev.val_counts == drawn == [148, 150, 147, 150, 150, 150, 150, 149, 144, 150]
    line = ("144 to 150/class (total 1488: asked 150/class, more than some classes hold) of the training split, "
            "every 1 steps, patience 500")
    assert ev.protocol_fields()["early_stopping"] == line
    idx = torch.arange(0, len(real.train_labels), 150)
    syn = SyntheticSet(real.train_images[idx], real.train_labels[idx], 10)
    fresh = RegressionEvaluator(net, num_eval=1, steps=2, warmup=0, val_per_class=150, val_every=1)
    res = fresh(syn, real, seed=0)  # evaluating prepares it: the result's protocol states the counts too
    assert res["protocol_fields"]["early_stopping"] == line and "144 to 150/class (total 1488" in res["protocol"]
    filled = RegressionEvaluator(net, num_eval=1, steps=2, warmup=0, val_per_class=100, val_every=1)
    filled.prepare(real)
    assert filled.val_counts == [100] * 10
    assert filled.protocol_fields()["early_stopping"] == "100/class of the training split, every 1 steps, patience 500"
