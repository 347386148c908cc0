"""Dataset Distillation (DD, Wang et al. 2018): the unrolled hypergradient, truncation, the memory guard, per-step
learned step sizes, the presets, and learning on real Fashion-MNIST."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from conftest import assert_same_s, make_cfg
from formats import write_mnist_like
from ddrun.contracts import Fetched
from ddrun.data.datasets import RealData
from ddrun.distill import distill
from ddrun.evaluators import Evaluator
from ddrun.fetchers import FixedFetcher
from ddrun.objectives.meta import DatasetDistillation
from ddrun.synthetic import SyntheticSet
from ddrun.utils import ConfigError, DdrunError


def tiny_real(k=3, n=10, hw=4, dtype=torch.float32) -> RealData:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(k).repeat_interleave(n)
    proto = torch.randn(k, 1, hw, hw, generator=g)
    x = (proto[y] + 0.5 * torch.randn(k * n, 1, hw, hw, generator=g)).to(dtype)
    return RealData("tiny", x, y, x.clone(), y.clone(), (0.5,), (0.25,), k, [str(i) for i in range(k)])


class TinyNet(nn.Module):
    def __init__(self, channels=1, num_classes=3, im_size=(4, 4)):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(channels * im_size[0] * im_size[1], 6), nn.Tanh())
        self.classifier = nn.Linear(6, num_classes)

    def embed(self, x):
        return self.body(x)

    def forward(self, x):
        return self.classifier(self.body(x))


def tiny_setup(ipc=2, dtype=torch.float64, **kw):
    real = tiny_real(dtype=dtype)
    g = torch.Generator().manual_seed(1)
    syn = SyntheticSet(torch.randn(3 * ipc, 1, 4, 4, generator=g), torch.arange(3).repeat_interleave(ipc), 3)
    obj = DatasetDistillation(**{"syn_steps": 2, "syn_epochs": 2, "lr_init": 0.3, "lr_img": 0.01, "lr_lr": 1e-3,
                                 "batch_real": 4, **kw})
    obj.prepare(syn, real)
    obj.raw_lr = nn.Parameter(obj.raw_lr.detach().to(dtype))
    torch.manual_seed(3)
    net = TinyNet().to(dtype)
    return real, syn.to(dtype), obj, net


def loss_of(obj, syn, real, net):
    return obj(syn, real, Fetched(net), 0, torch.Generator().manual_seed(5))


def test_dd_hypergradient_matches_finite_differences():
    real, syn, obj, net = tiny_setup()
    with torch.no_grad():  # step sizes 0.3, 0.2, 0.4, 0.1 through their softplus parameterization
        obj.raw_lr.copy_(torch.tensor([0.3, 0.2, 0.4, 0.1], dtype=torch.float64).expm1().log())
    loss = loss_of(obj, syn, real, net)
    g_img, g_lr = torch.autograd.grad(loss, [syn.images, obj.raw_lr])
    eps = 1e-6
    checks = [(syn.images, (0, 0, 1, 2), g_img), (syn.images, (5, 0, 3, 0), g_img), (obj.raw_lr, (0,), g_lr),
              (obj.raw_lr, (3,), g_lr)]
    for tensor, index, grad in checks:
        with torch.no_grad():
            tensor[index] += eps
        up = loss_of(obj, syn, real, net).item()
        with torch.no_grad():
            tensor[index] -= 2 * eps
        down = loss_of(obj, syn, real, net).item()
        with torch.no_grad():
            tensor[index] += eps
        fd = (up - down) / (2 * eps)
        assert float(grad[index]) == pytest.approx(fd, rel=1e-5, abs=1e-9), (index, fd)
    assert float(g_lr.abs().min()) > 0  # every step's size gets a gradient


def test_truncation_back_propagates_through_the_last_steps_only():
    real, syn, obj, net = tiny_setup()
    full = torch.autograd.grad(loss_of(obj, syn, real, net), [syn.images, obj.raw_lr])
    obj.truncate = 4  # = all 4 steps: the same gradient
    same = torch.autograd.grad(loss_of(obj, syn, real, net), [syn.images, obj.raw_lr])
    assert all(torch.allclose(a, b) for a, b in zip(full, same))
    obj.truncate = 1
    g_img, g_lr = torch.autograd.grad(loss_of(obj, syn, real, net), [syn.images, obj.raw_lr])
    assert torch.count_nonzero(g_lr[:3]) == 0 and g_lr[3] != 0
    batch0 = [0, 2, 4]  # images of step 0 (and 2): one of each class, outside the last step
    assert torch.count_nonzero(g_img[batch0]) == 0 and torch.count_nonzero(g_img[[1, 3, 5]]) > 0


def test_an_unroll_that_would_exceed_memory_names_the_knobs():
    real, syn, obj, net = tiny_setup(memory_limit=1e-9)
    with pytest.raises(DdrunError, match="objective.syn_steps.*objective.truncate"):
        loss_of(obj, syn, real, net)


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError, match="objective.syn_steps=3 must divide ipc=2"):
        tiny_setup(syn_steps=3)
    with pytest.raises(ConfigError, match="objective.syn_steps=None: must be >= 1"):
        DatasetDistillation(syn_steps=None, lr_img=0.1)
    with pytest.raises(ConfigError, match="objective.truncate=0"):
        DatasetDistillation(truncate=0, lr_img=0.1)


def test_dd_lowers_its_loss_for_a_fixed_initialization():
    real = tiny_real()
    syn = SyntheticSet(torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(1)),
                       torch.arange(3).repeat_interleave(2), 3)
    obj = DatasetDistillation(syn_steps=2, syn_epochs=3, lr_init=0.1, lr_img=0.05, lr_lr=0.05, batch_real=5)
    obj.prepare(syn, real)
    fetcher = FixedFetcher(TinyNet, real, torch.device("cpu"), seed=0)
    opt = torch.optim.Adam(obj.param_groups(syn), lr=obj.lr_img)
    replay0 = obj.replay_accuracy(syn, real, fetcher.fetch(0).net)
    losses = []
    for it in range(30):
        loss = obj(syn, real, fetcher.fetch(it), it, torch.Generator().manual_seed(9))
        opt.zero_grad()
        loss.backward()
        opt.step()
        obj.check(syn, it)
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert (syn.syn_lr > 0).all() and not torch.allclose(syn.syn_lr, torch.full((6,), 0.1))
    assert torch.allclose(syn.syn_lr, torch.nn.functional.softplus(obj.raw_lr))  # what synthetic.pt stores
    replay = obj.replay_accuracy(syn, real, fetcher.fetch(0).net)
    assert replay >= 80 and replay > replay0 + 30, (replay0, replay)  # the paper's protocol: theta_0 + learned steps


def test_per_step_step_sizes_round_trip_and_the_evaluator_uses_their_mean(tmp_path):
    real = tiny_real(dtype=torch.float32)
    syn = SyntheticSet(real.train_images[::5].clone(), real.train_labels[::5].clone(), 3)
    syn.learn_lr(0.02, steps=6)
    with torch.no_grad():
        syn.syn_lr.copy_(torch.linspace(0.01, 0.06, 6))
    syn.save(tmp_path / "synthetic.pt")
    state = torch.load(tmp_path / "synthetic.pt", weights_only=True)
    assert state["lr"].shape == (6,)
    back = SyntheticSet.load(tmp_path / "synthetic.pt")
    assert torch.equal(back.syn_lr.detach(), syn.syn_lr.detach())
    assert back.lr.item() == pytest.approx(0.035)
    res = Evaluator(TinyNet, num_eval=1, epochs=2)(back, real)
    assert 0 <= res["acc_mean"] <= 100


def test_preset_values():
    cfg = make_cfg(["method=dd", "dataset=cifar10", "ipc=10"])
    assert (cfg.objective.syn_steps, cfg.objective.syn_epochs, cfg.objective.lr_init) == (10, 3, 0.001)
    assert cfg.objective.lr_img == 0.01 and cfg.iterations == 19600 and cfg.init._target_.endswith("noise")
    assert cfg.syn_optimizer._target_ == "torch.optim.Adam" and list(cfg.syn_optimizer.betas) == [0.5, 0.999]
    one = make_cfg(["method=dd", "ipc=1", "fetcher=fixed"])
    assert one.objective.syn_steps == 1 and one.objective.lr_init == 0.02 and one.iterations == 23600
    assert one.fetcher._target_.endswith("FixedFetcher")
    assert make_cfg(["method=dd", "ipc=7"]).objective.syn_steps == "???"  # -> the ConfigError of validate


def test_resume_restores_the_step_sizes_and_ends_with_the_same_synthetic_set(tmp_path):
    write_mnist_like(tmp_path, "MNIST", n_train=12, n_test=4)

    def cfg(iterations):
        return make_cfg(["method=dd", "dataset=mnist", f"paths.data={tmp_path}", "dataset.system_dirs=[]", "ipc=2",
                         "objective.syn_steps=2", "objective.syn_epochs=2", "net.width=8", "debug=smoke",
                         "logger=none", "evaluator.num_eval=0", "objective.batch_real=4", f"iterations={iterations}"])

    straight = distill(cfg(6), tmp_path / "straight")
    distill(cfg(3), tmp_path / "resumed")
    resumed = distill(cfg(6), tmp_path / "resumed")
    a, b = (torch.load(o["synthetic"], weights_only=True) for o in (straight, resumed))
    assert_same_s(a["images"], b["images"])
    assert_same_s(a["lr"], b["lr"])
    assert a["lr"].shape == (4,) and not torch.allclose(a["lr"], torch.full((4,), 0.02))


@pytest.mark.realdata
def test_dd_improves_s_on_real_fashion_mnist(fmnist_root, tmp_path):
    """From Gaussian noise, 25 iterations of DD at ipc 1 (3 unrolled steps, random theta_0 every iteration): the
    evaluator's accuracy on real test images (one ConvNet-32, 60 epochs) and the replayed steps' accuracy both rise
    well above the initialization's."""
    cfg = make_cfg(["method=dd", "ipc=1", f"paths.data={fmnist_root}", "dataset.train_subset=300",
                    "dataset.test_subset=100", "net.width=32", "logger=none", "evaluator.num_eval=1",
                    "evaluator.epochs=60", "iterations=25", "eval_every=1000", "eval_at_start=true",
                    "objective.batch_real=30"])
    out = distill(cfg, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = {r["iteration"]: r for r in rows if "acc_mean" in r}
    assert set(evals) == {0, 25}
    assert evals[25]["acc_mean"] > evals[0]["acc_mean"] + 15, evals
    assert evals[25]["dd_replay_acc"] > evals[0]["dd_replay_acc"] + 10, evals
    lr = torch.load(out["synthetic"], weights_only=True)["lr"]
    assert lr.shape == (3,) and not torch.allclose(lr, torch.full((3,), 0.02))
