"""Dataset Distillation (DD, Wang et al. 2018): the unrolled hypergradient, truncation, the memory guard, per-step
learned step sizes, the presets, and learning on real Fashion-MNIST."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from conftest import SAME_S, assert_same_s, make_cfg
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
    assert cfg.net._target_ == "ddrun.nets.dd_net" and cfg.net.init == "xavier"
    assert cfg.syn_scheduler._target_ == "ddrun.schedule.step_lr" and cfg.syn_scheduler.gamma == 0.5
    assert cfg.syn_scheduler.step_size == 1960 and one.syn_scheduler.step_size == 2360  # 40 epochs
    assert cfg.evaluator._target_.endswith("ReplayEvaluator") and cfg.beside.convnet.net._target_.endswith("ConvNet")


def test_resume_restores_the_step_sizes_and_ends_with_the_same_synthetic_set(tmp_path):
    write_mnist_like(tmp_path, "MNIST", n_train=12, n_test=4)

    def cfg(iterations):
        return make_cfg(["method=dd", "dataset=mnist", f"paths.data={tmp_path}", "dataset.system_dirs=[]", "ipc=2",
                         "objective.syn_steps=2", "objective.syn_epochs=2", "debug=smoke", "beside.convnet.num_eval=0",
                         "logger=none", "evaluator.num_eval=0", "objective.batch_real=4", f"iterations={iterations}",
                         *SAME_S])

    straight = distill(cfg(6), tmp_path / "straight")
    distill(cfg(3), tmp_path / "resumed")
    resumed = distill(cfg(6), tmp_path / "resumed")
    a, b = (torch.load(o["synthetic"], weights_only=True) for o in (straight, resumed))
    assert_same_s(a["images"], b["images"])
    assert_same_s(a["lr"], b["lr"])
    assert a["lr"].shape == (4,) and not torch.allclose(a["lr"], torch.full((4,), 0.02))


@pytest.mark.realdata
def test_dd_improves_s_on_real_fashion_mnist(fmnist_root, tmp_path):
    """From Gaussian noise, 40 iterations of DD at ipc 1 (3 unrolled steps, random theta_0 every iteration, the
    paper's xavier-initialized LeNet; step sizes of S 10x the paper's so 40 iterations stand in for its 400 epochs):
    the paper's protocol (the learned steps replayed from held-out theta_0, the headline `evaluator`) and the
    common one beside it (one ConvNet-32, 60 epochs) both rise well above the initialization's."""
    cfg = make_cfg(["method=dd", "ipc=1", f"paths.data={fmnist_root}", "dataset.train_subset=300",
                    "dataset.test_subset=100", "logger=none", "evaluator.num_eval=2", "beside.convnet.num_eval=1",
                    "beside.convnet.epochs=60", "preset.common_net.width=32", "iterations=40", "eval_every=1000",
                    "eval_at_start=true", "objective.batch_real=30", "objective.lr_img=0.1", "objective.lr_lr=0.1"])
    out = distill(cfg, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = {r["iteration"]: r for r in rows if "acc_mean" in r}
    assert set(evals) == {0, 40}
    assert out["protocol_fields"]["evaluator"] == "replay"
    assert evals[40]["acc_mean"] > evals[0]["acc_mean"] + 10, evals
    assert evals[40]["convnet/acc_mean"] > evals[0]["convnet/acc_mean"] + 15, evals
    lr = torch.load(out["synthetic"], weights_only=True)["lr"]
    assert lr.shape == (3,) and not torch.allclose(lr, torch.full((3,), 0.02))


# ---------------------------------------------------------------------------------------------------------
# DD's own protocol and networks
# ---------------------------------------------------------------------------------------------------------

def test_replay_protocol_reproduces_the_learned_steps_exactly():
    """The replay evaluator trains theta_0 by exactly S's steps: batch i mod syn_steps (ipc/syn_steps images of
    every class), step size eta_i, plain gradient descent on the cross-entropy, here recomputed by hand with
    torch.autograd and in-place updates of an nn.Module."""
    from ddrun.evaluators import ReplayEvaluator
    from ddrun.nets import LeNet

    real = tiny_real(k=3, n=10, hw=28)
    g = torch.Generator().manual_seed(3)
    syn = SyntheticSet(torch.randn(12, 1, 28, 28, generator=g), torch.arange(3).repeat_interleave(4), 3)
    obj = DatasetDistillation(syn_steps=2, syn_epochs=3, lr_init=0.05, lr_img=0.01, lr_lr=0.01)
    obj.prepare(syn, real)
    with torch.no_grad():
        syn.syn_lr.copy_(torch.tensor([0.05, 0.2, 0.01, 0.1, 0.07, 0.3]))
    assert syn.meta["syn_steps"] == 2
    factory = lambda channels, num_classes, im_size: LeNet(channels, num_classes, im_size, init="xavier")  # noqa
    ev = ReplayEvaluator(factory, init="fixed", syn_steps=None)  # syn_steps from S's meta
    theta0 = ev.theta0(real, seed=5, r=0)
    manual = ev.theta0(real, seed=5, r=0)  # the same theta_0 (seeded)
    assert all(torch.equal(a, b) for a, b in zip(theta0.parameters(), manual.parameters()))
    params = ev.replayed(syn, real, theta0)
    manual.train()
    for i in range(6):
        b = i % 2  # batch b: images 2b, 2b+1 of every class
        idx = torch.cat([torch.arange(c * 4 + 2 * b, c * 4 + 2 * b + 2) for c in range(3)])
        loss = torch.nn.functional.cross_entropy(manual(syn.images[idx].detach()), syn.labels[idx])
        grads = torch.autograd.grad(loss, list(manual.parameters()))
        with torch.no_grad():
            for p, gr in zip(manual.parameters(), grads):
                p.sub_(syn.syn_lr[i] * gr)
    for (name, p), q in zip(params.items(), manual.parameters()):
        torch.testing.assert_close(p.detach(), q, rtol=0, atol=1e-6, msg=name)
    res = ev(syn, real, seed=5)
    with torch.no_grad():
        manual.eval()
        acc = 100.0 * float((manual(real.test_images).argmax(1) == real.test_labels).float().mean())
    assert res["acc_mean"] == pytest.approx(acc) and res["protocol_fields"]["evaluator"] == "replay"
    # random init: held-out draws, different from the run's theta_0 and from each other
    rnd = ReplayEvaluator(factory, init="random", num_eval=2, syn_steps=2)
    nets = [rnd.theta0(real, 5, r) for r in range(2)]
    assert not torch.equal(nets[0].fc_1.weight, nets[1].fc_1.weight)
    assert not torch.equal(nets[0].fc_1.weight, theta0.fc_1.weight)
    with pytest.raises(ConfigError, match="per-step step sizes"):
        rnd(SyntheticSet(syn.images, syn.labels, 3), real, seed=5)


def test_replay_init_follows_the_fetcher_and_the_fixed_theta0_is_the_fetchers():
    from ddrun.evaluators import ReplayEvaluator
    from ddrun.utils import build

    cfg = make_cfg(["method=dd", "ipc=1", "fetcher=fixed"])
    assert build(cfg.evaluator).init == "fixed" and build(make_cfg(["method=dd", "ipc=1"]).evaluator).init == "random"
    real = tiny_real(k=10, n=2, hw=28)
    fetcher = build(cfg.fetcher)(real=real, device=torch.device("cpu"), seed=7)
    ev = build(cfg.evaluator)
    assert isinstance(ev, ReplayEvaluator)
    a, b = fetcher.fetch(0).net, ev.theta0(real, 7, 0)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_dd_networks_are_the_papers_with_xavier_init():
    from ddrun.nets import AlexCifarNet, LeNet, dd_net

    lenet = dd_net(1, 10, (28, 28))
    assert isinstance(lenet, LeNet) and sum(p.numel() for p in lenet.parameters()) == 61706
    assert all(m.bias.abs().max() == 0 for m in lenet.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    w = lenet.fc_1.weight  # xavier normal: std sqrt(2 / (fan_in + fan_out))
    assert abs(w.std().item() - (2 / (400 + 120)) ** 0.5) < 0.005
    alex = dd_net(3, 10, (32, 32))
    # ssnl/dataset-distillation AlexCifarNet: conv 3->64 5x5, conv 64->64 5x5, fc 4096-384-192-10
    assert isinstance(alex, AlexCifarNet) and sum(p.numel() for p in alex.parameters()) == 1756426
    assert alex(torch.randn(2, 3, 32, 32)).shape == (2, 10) and alex.embed(torch.randn(2, 3, 32, 32)).shape == (2, 192)
    assert LeNet(1, 10, (28, 28)).fc_1.bias.abs().max() > 0  # default init unchanged
    with pytest.raises(ConfigError, match="net.init"):
        LeNet(1, 10, (28, 28), init="he")


def test_a_saved_dd_set_replays_to_the_runs_own_accuracy_with_ddrun_evaluate(tmp_path):
    """synthetic.pt records syn_steps, so `ddrun evaluate evaluator=replay` gives the distill run's headline."""
    from ddrun.evaluate import evaluate_cmd

    write_mnist_like(tmp_path, "MNIST", n_train=12, n_test=4)
    data = [f"paths.data={tmp_path}", "dataset=mnist", "dataset.system_dirs=[]", "logger=none", "seed=3"]
    out = distill(make_cfg(["method=dd", "ipc=2", "objective.syn_steps=2", "objective.syn_epochs=2", "debug=smoke",
                            "beside.convnet.num_eval=0", "fetcher=fixed", "objective.batch_real=4", *data]),
                  tmp_path / "run")
    assert torch.load(out["synthetic"], weights_only=True)["meta"]["syn_steps"] == 2
    res = evaluate_cmd(make_cfg([f"synthetic={out['synthetic']}", "evaluator=replay", "net=dd", "evaluator.init=fixed",
                                 *data], config_name="evaluate"))
    assert res["acc_mean"] == pytest.approx(out["acc_mean"]) and res["protocol_fields"]["evaluator"] == "replay"
    with pytest.raises(ConfigError, match="evaluator.init"):
        evaluate_cmd(make_cfg([f"synthetic={out['synthetic']}", "evaluator=replay", "net=dd", *data],
                              config_name="evaluate"))


def test_a_fixed_init_replay_refuses_another_seed_or_network(tmp_path):
    """S records the run's seed and network; `evaluator.init=fixed` with another seed or net would replay S's steps
    from another theta_0 and label it "the fixed theta_0 of the run": refused in one line naming the override.
    A file without those keys (older ddrun) is not checked."""
    from ddrun.evaluate import evaluate_cmd

    write_mnist_like(tmp_path, "MNIST", n_train=12, n_test=4)
    # SAME_S: the replay's accuracy is compared with the run's, equal on a GPU only with deterministic kernels
    data = [f"paths.data={tmp_path}", "dataset=mnist", "dataset.system_dirs=[]", "logger=none", *SAME_S]
    out = distill(make_cfg(["method=dd", "ipc=1", "objective.syn_steps=1", "objective.syn_epochs=2", "debug=smoke",
                            "beside.convnet.num_eval=0", "fetcher=fixed", "objective.batch_real=4", "seed=0",
                            *data]), tmp_path / "run")
    meta = torch.load(out["synthetic"], weights_only=True)["meta"]
    assert (meta["seed"], meta["net"], meta["net_kwargs"]) == (0, "dd_net", {"init": "xavier"})
    replay = [f"synthetic={out['synthetic']}", "evaluator=replay", "evaluator.init=fixed", *data]
    with pytest.raises(ConfigError, match=r"^evaluator\.init=fixed: S was distilled from the fixed theta_0 of seed 0, "
                                          r"not seed=7: pass seed=0$"):
        evaluate_cmd(make_cfg([*replay, "net=dd", "seed=7"], config_name="evaluate"))
    with pytest.raises(ConfigError, match=r"^evaluator\.init=fixed: S was distilled from the fixed theta_0 of "
                                          r"dd_net\(init xavier\), not of convnet\(.*\): pass net=dd$"):
        evaluate_cmd(make_cfg(replay, config_name="evaluate"))  # the evaluate config's net: the ConvNet
    with pytest.raises(ConfigError, match=r"dd_net\(init xavier\), not of dd_net\(init default\): pass net=dd$"):
        evaluate_cmd(make_cfg([*replay, "net=dd", "net.init=default"], config_name="evaluate"))
    res = evaluate_cmd(make_cfg([*replay, "net=dd", "seed=0"], config_name="evaluate"))
    assert res["acc_mean"] == pytest.approx(out["acc_mean"])
    # an older file: no seed / net recorded, nothing to check against
    state = torch.load(out["synthetic"], weights_only=True)
    state["meta"] = {k: v for k, v in state["meta"].items() if k not in ("seed", "net", "net_kwargs")}
    torch.save(state, tmp_path / "old.pt")
    old = evaluate_cmd(make_cfg([f"synthetic={tmp_path / 'old.pt'}", *replay[1:], "net=dd", "seed=7"],
                                config_name="evaluate"))
    assert 0 <= old["acc_mean"] <= 100
    # random init draws held-out networks: any seed is fine
    evaluate_cmd(make_cfg([f"synthetic={out['synthetic']}", "evaluator=replay", "evaluator.init=random",
                           "evaluator.num_eval=1", "net=dd", "seed=7", *data], config_name="evaluate"))


def test_a_fixed_init_replay_refuses_a_set_distilled_from_random_networks(tmp_path):
    """S of fetcher=random was distilled for no single theta_0: `ddrun evaluate evaluator.init=fixed` (once: a
    silent replay from a network S never saw, labelled "the fixed theta_0 of the run") is refused in one line;
    init=random replays it."""
    from ddrun.evaluate import evaluate_cmd

    write_mnist_like(tmp_path, "MNIST", n_train=12, n_test=4)
    # SAME_S: the replay's accuracy is compared with the run's, equal on a GPU only with deterministic kernels
    data = [f"paths.data={tmp_path}", "dataset=mnist", "dataset.system_dirs=[]", "logger=none", *SAME_S]
    out = distill(make_cfg(["method=dd", "ipc=1", "objective.syn_steps=1", "objective.syn_epochs=2", "debug=smoke",
                            "beside.convnet.num_eval=0", "evaluator.num_eval=0", "objective.batch_real=4", *data]),
                  tmp_path / "run")
    assert torch.load(out["synthetic"], weights_only=True)["meta"]["fetcher"] == "RandomFetcher"
    replay = [f"synthetic={out['synthetic']}", "evaluator=replay", "net=dd", *data]
    with pytest.raises(ConfigError, match=r"^evaluator\.init=fixed replays S's steps from the one fixed theta_0 of "
                                          r"fetcher=fixed, but S is distilled with RandomFetcher, not for that "
                                          r"network: pass evaluator\.init=random, or distill with fetcher=fixed$"):
        evaluate_cmd(make_cfg([*replay, "evaluator.init=fixed"], config_name="evaluate"))
    res = evaluate_cmd(make_cfg([*replay, "evaluator.init=random", "evaluator.num_eval=1"], config_name="evaluate"))
    assert 0 <= res["acc_mean"] <= 100


def test_replay_of_a_set_without_dd_steps_says_it_evaluates_dd_sets_only(tmp_path):
    """A DM set has no DD steps: the replay says so first, not "pass evaluator.syn_steps=N" (after which it failed
    with another message)."""
    from ddrun.evaluate import evaluate_cmd

    write_mnist_like(tmp_path, "MNIST", n_train=12, n_test=4)
    data = [f"paths.data={tmp_path}", "dataset=mnist", "dataset.system_dirs=[]", "logger=none"]
    out = distill(make_cfg(["method=dm", "ipc=1", "net.width=8", "debug=smoke", "evaluator.num_eval=0", *data]),
                  tmp_path / "run")
    for extra in ([], ["evaluator.syn_steps=1"]):
        with pytest.raises(ConfigError, match=r"^evaluator=replay evaluates DD sets only \(method=dd or method=ld.*"
                                              r"this S \(method=dm\) has none: evaluate it with evaluator=default"):
            evaluate_cmd(make_cfg([f"synthetic={out['synthetic']}", "evaluator=replay", "evaluator.init=random",
                                   "net=dd", *extra, *data], config_name="evaluate"))


class StepsKeepingDD(DatasetDistillation):
    """DD's objective extended outside ddrun: its S still holds DD's steps (it inherits ``stores_steps``)."""


def test_replay_validation_asks_the_objective_whether_it_stores_steps():
    """A distill run with evaluator=replay is checked by the objective's capability (``Objective.stores_steps``),
    not by its ``_target_`` string: a subclass of DD's objective defined here is accepted (it was refused as "stores
    none"), and DM's objective, which lacks it, and a run without an objective are refused as before."""
    from ddrun.distill import check_replay_inits

    sub = f"{StepsKeepingDD.__module__}.{StepsKeepingDD.__qualname__}"
    check_replay_inits(make_cfg(["method=dd", "ipc=1", "evaluator=replay", f"objective._target_={sub}"]))
    for method, name in (("dm", "DistributionMatching"), ("random", "None")):
        with pytest.raises(ConfigError, match=rf"^evaluator: evaluator=replay evaluates DD sets only \(method=dd or "
                                              rf"method=ld, whose S holds DD's per-step step sizes\); this run's "
                                              rf"objective \({name}\) stores none: use evaluator=default"):
            check_replay_inits(make_cfg([f"method={method}", "ipc=1", "evaluator=replay"]))
