"""DATM (``method=datm``) and TESLA's soft-label assignment (``objective.teacher_label=true``) as options of
trajectory matching: the growing start window, the expert-logit label initialization, the threshold gate, the
preset, the bad inputs, and on real Fashion-MNIST, that S learns."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import SAME_S, assert_same_s, make_cfg
from test_buffer import make_buffer, tiny_args
from ddrun.distill import distill
from ddrun.init.experts import ExpertBuffer, expert_correct, expert_soft_labels
from ddrun.objectives.trajectory import TrajectoryMatching
from ddrun.utils import ConfigError, build


def datm_args(root, buffers, *extra):
    return tiny_args(root, buffers, "method=datm", "ipc=2", "logger=none", "iterations=3", "eval_every=3",
                     "evaluator.num_eval=0", "fetcher.max_start_epoch=2", "fetcher.current_max_start_epoch=1",
                     "fetcher.expansion_end_epoch=2", "fetcher.expert_epochs=1", "objective.syn_steps=3",
                     "objective.batch_syn=null", *extra)


def _fetcher(root, buffers, *extra):
    cfg = make_cfg(datm_args(root, buffers, *extra))
    real = build(cfg.dataset)
    return build(cfg.fetcher)(real=real, device=torch.device("cpu"), seed=0)


def test_growing_window_bounds_at_start_middle_and_end(tiny_root, tmp_path):
    make_buffer(tiny_root, tmp_path / "b", epochs=8)
    f = _fetcher(tiny_root, tmp_path / "b", "fetcher.min_start_epoch=1", "fetcher.current_max_start_epoch=2",
                 "fetcher.max_start_epoch=6", "fetcher.expansion_end_epoch=10", "fetcher.expert_epochs=2")
    assert f.start_window(0) == (1, 2)          # iteration 0: [min, current_max)
    assert f.start_window(5) == (1, 4)          # half-way: 2 + (6 - 2) * 5 // 10
    assert f.start_window(10) == (1, 6)         # expansion_end_epoch: [min, max)
    assert f.start_window(10_000) == (1, 6)     # and it stays there
    starts = {it: f.fetch(it).info["start_epoch"] for it in range(0, 40)}
    assert all(s == 1 for it, s in starts.items() if it < 3)  # window [1, 2) at iterations 0-2, then [1, 3) ...
    assert all(1 <= s < f.start_window(it)[1] for it, s in starts.items())
    assert max(starts.values()) == 5 and min(starts.values()) == 1
    plain = _fetcher(tiny_root, tmp_path / "b", "fetcher.current_max_start_epoch=null", "fetcher.max_start_epoch=3")
    assert plain.start_window(0) == plain.start_window(99) == (0, 3)  # MTT's fixed window


def test_bad_windows_and_short_buffers_are_one_line(tiny_root, tmp_path):
    make_buffer(tiny_root, tmp_path / "b")  # 3 epochs
    with pytest.raises(ConfigError, match=r"need 0 <= min_start_epoch \(2\) < current_max_start_epoch \(1\)"):
        _fetcher(tiny_root, tmp_path / "b", "fetcher.min_start_epoch=2")
    with pytest.raises(ConfigError, match="expansion_end_epoch=null: the growing window"):
        _fetcher(tiny_root, tmp_path / "b", "fetcher.expansion_end_epoch=null")
    with pytest.raises(ConfigError, match=r"reach epoch 5, but the experts .* were trained 3 epochs: this needs "
                                          r"experts of >= 5 epochs; .*another folder.*`ddrun buffer dataset=mnist "
                                          r".*train_epochs=5 .*paths.buffers=<another folder>`"):
        _fetcher(tiny_root, tmp_path / "b", "fetcher.max_start_epoch=4", "fetcher.expert_epochs=2")
    with pytest.raises(ConfigError, match=r"init.label_epoch=7: .* epochs 0..3 .* needs experts of >= 7 epochs"):
        distill(make_cfg(datm_args(tiny_root, tmp_path / "b", "init.label_epoch=7")), tmp_path / "run")


def test_soft_labels_average_only_the_experts_that_predict_correctly():
    stacked = torch.tensor([[[3.0, 1.0], [2.0, 0.0]],     # expert 0: image 0 -> class 0, image 1 -> class 0
                            [[1.0, 5.0], [0.0, 4.0]],     # expert 1: class 1, class 1
                            [[4.0, 0.0], [1.0, 0.0]]])    # expert 2: class 0, class 0
    labels = torch.tensor([0, 1])
    out = expert_soft_labels(stacked, labels)
    assert out[0].tolist() == [3.5, 0.5]        # experts 0 and 2 are right about image 0
    assert out[1].tolist() == [0.0, 4.0]        # only expert 1 is right about image 1
    none = expert_soft_labels(stacked[[0, 2]], labels)  # nobody right about image 1: the mean of all
    assert none[1].tolist() == [1.5, 0.0]


def test_expert_logit_init_on_a_tiny_buffer(tiny_root, tmp_path):
    make_buffer(tiny_root, tmp_path / "b", epochs=3)
    cfg = make_cfg(datm_args(tiny_root, tmp_path / "b"))
    real = build(cfg.dataset)
    syn = build(cfg.init)(real, 2, torch.Generator().manual_seed(0))
    assert syn.images.shape == (20, 1, 28, 28) and syn.labels.shape == (20, 10) and syn.soft
    experts = ExpertBuffer(real, build(cfg.net), build(cfg.augment), str(tmp_path / "b"), None, None, None, -1)
    assert experts.epoch == 3 and experts.indices == [0, 1]
    params = [experts.params(i) for i in experts.indices]
    hard = torch.arange(10).repeat_interleave(2)
    for n, img in enumerate(syn.images):  # every image is a training image of its class
        same = (real.train_images - img).abs().flatten(1).amax(1) == 0
        assert int(real.train_labels[same][0]) == int(hard[n])
    stacked = torch.stack([experts.logits(p, syn.images) for p in params])
    assert torch.allclose(syn.labels, expert_soft_labels(stacked, hard))
    # the images were picked because an expert classifies them correctly: per class, as many as there are
    # (these weak 3-epoch experts get only some training images of some classes right), the rest random
    right = (stacked.argmax(2) == hard).any(0)
    all_right = torch.stack([experts.logits(p, real.train_images) for p in params]).argmax(2) == real.train_labels
    for c in range(10):
        available = int((all_right.any(0) & (real.train_labels == c)).sum())
        assert int(right[hard == c].sum()) == min(2, available), c
    assert right.any()
    hard_init = expert_correct(real, 2, torch.Generator().manual_seed(0), build(cfg.net), build(cfg.augment),
                               str(tmp_path / "b"), soft_labels=False)
    assert hard_init.labels.tolist() == hard.tolist()


def test_threshold_gate_and_label_learning_options():
    obj = TrajectoryMatching(threshold=1.0, learn_labels=True, lr_labels=2.0, momentum_labels=0.9)
    assert obj.accepts(torch.tensor(0.99)) and obj.accepts(torch.tensor(1.0)) and not obj.accepts(torch.tensor(1.01))
    assert TrajectoryMatching().accepts(torch.tensor(1e9))
    from ddrun.synthetic import SyntheticSet

    syn = SyntheticSet(torch.randn(4, 1, 8, 8), torch.tensor([[2.0, 1.0], [0.0, 1.0], [1.0, 0.0], [0.5, 3.0]]), 2)
    before = syn.labels.clone()
    obj.prepare(syn, None)
    groups = {g["name"]: g for g in obj.param_groups(syn)}
    assert torch.equal(syn.labels.detach(), before)  # the expert logits are kept, now learnable
    assert groups["labels"]["lr"] == 2.0 and groups["labels"]["momentum"] == 0.9
    with pytest.raises(ConfigError, match="teacher_label=true .* cannot be combined with objective.learn_labels"):
        TrajectoryMatching(teacher_label=True, learn_labels=True)


def test_datm_runs_learns_labels_and_gate_skips_updates(tiny_root, tmp_path):
    make_buffer(tiny_root, tmp_path / "b")
    out = distill(make_cfg(datm_args(tiny_root, tmp_path / "b")), tmp_path / "run")
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    s = torch.load(out["synthetic"], weights_only=True)
    assert s["labels"].dtype == torch.float32 and s["labels"].shape == (20, 10)
    assert ckpt["optimizer"]["param_groups"][-1]["momentum"] == 0.9  # the labels' own SGD momentum
    init = distill(make_cfg(datm_args(tiny_root, tmp_path / "b", "iterations=0")), tmp_path / "init")
    s0 = torch.load(init["synthetic"], weights_only=True)
    assert not torch.equal(s["labels"], s0["labels"]) and not torch.equal(s["images"], s0["images"])
    # a threshold below every loss: S (images, labels, step size) never moves
    gated = distill(make_cfg(datm_args(tiny_root, tmp_path / "b", "objective.threshold=0.0")), tmp_path / "gated")
    g = torch.load(gated["synthetic"], weights_only=True)
    assert torch.equal(g["images"], s0["images"]) and torch.equal(g["labels"], s0["labels"])
    assert torch.equal(g["lr"], s0["lr"])


@pytest.mark.parametrize("method", ["datm", "tesla"])
def test_a_resumed_run_ends_with_the_same_s(tiny_root, tmp_path, method):
    """Stopped after 2 iterations and continued to 4 (learned labels, their optimizer state, TESLA's assigned
    labels all in checkpoint.pt): the same S as 4 iterations in one go."""
    make_buffer(tiny_root, tmp_path / "b")
    args = [*datm_args(tiny_root, tmp_path / "b"), *SAME_S]
    if method == "tesla":
        args = [a.replace("method=datm", "method=mtt") for a in args] + ["objective.teacher_label=true"]
    straight = distill(make_cfg([*args, "iterations=4"]), tmp_path / "a")
    distill(make_cfg([*args, "iterations=2"]), tmp_path / "r")
    resumed = distill(make_cfg([*args, "iterations=4"]), tmp_path / "r")
    a, r = (torch.load(x["synthetic"], weights_only=True) for x in (straight, resumed))
    assert_same_s(a["images"], r["images"])
    assert_same_s(a["labels"], r["labels"])
    assert_same_s(a["lr"], r["lr"])
    assert a["labels"].dtype == torch.float32


def test_tesla_teacher_labels_are_the_target_experts_logits(tiny_root, tmp_path):
    make_buffer(tiny_root, tmp_path / "b")
    args = tiny_args(tiny_root, tmp_path / "b", "method=mtt", "ipc=2", "logger=none", "evaluator.num_eval=0",
                     "fetcher.max_start_epoch=2", "fetcher.expert_epochs=1", "objective.syn_steps=2",
                     "objective.teacher_label=true")
    out = distill(make_cfg([*args, "iterations=1"]), tmp_path / "run")
    s = torch.load(out["synthetic"], weights_only=True)
    assert s["labels"].shape == (20, 10) and s["labels"].dtype == torch.float32
    # recompute: the labels S holds after iteration 0 are the logits, on S's images before that update, of the
    # expert drawn at iteration 0 at its target epoch
    cfg = make_cfg([*args, "iterations=1"])
    real = build(cfg.dataset)
    fetched = build(cfg.fetcher)(real=real, device=torch.device("cpu"), seed=0).fetch(0)
    s0 = torch.load(distill(make_cfg([*args, "iterations=0"]), tmp_path / "init")["synthetic"], weights_only=True)
    want = TrajectoryMatching().expert_labels(fetched.net, fetched.target, s0["images"])
    assert torch.allclose(s["labels"], want, atol=1e-5)
    with pytest.raises(ConfigError, match="labels the 80 decoded images, but S stores 20"):
        distill(make_cfg([*args, "iterations=1", "parametrization=idc"]), tmp_path / "idc")


def test_datm_preset_values():
    c10 = make_cfg(["method=datm", "dataset=cifar10", "ipc=10"])
    f, o = c10.fetcher, c10.objective
    assert (f.min_start_epoch, f.current_max_start_epoch, f.max_start_epoch, f.expansion_end_epoch) == (0, 10, 20, 1000)
    assert (o.syn_steps, o.batch_syn, o.lr_img, o.lr_lr, o.lr_labels, o.threshold) == (80, 100, 100, 1e-5, 2.0, 1.0)
    assert c10.dataset.zca and c10.iterations == 10000 and c10.init.correct_only
    one = make_cfg(["method=datm", "dataset=cifar10", "ipc=1"])
    assert one.fetcher.current_max_start_epoch is None and one.objective.threshold == 1.1
    assert one.objective.lr_lr == 1e-7 and one.objective.lr_labels == 5.0
    c100 = make_cfg(["method=datm", "dataset=cifar100", "ipc=50"])
    assert not c100.init.correct_only and c100.fetcher.min_start_epoch == 20 and c100.fetcher.max_start_epoch == 70
    tiny = make_cfg(["method=datm", "dataset=tiny_imagenet", "ipc=1"])
    assert tiny.net.depth == 4 and tiny.objective.lr_img == 10000


@pytest.mark.realdata
def test_datm_learns_on_real_fashion_mnist(fmnist_root, tmp_path):
    """Experts (ConvNet-16, 2 x 4 epochs on a 50-per-class subset of the real Fashion-MNIST) -> DATM at ipc 1, 30
    iterations (window [0, 1) growing to [0, 3)); under the same evaluator (2 ConvNet-16, 80 epochs, 1000 test
    images) S beats its own initialization (the expert-picked real images with expert-logit labels)."""
    data = ["dataset=fashion_mnist", f"paths.data={fmnist_root}", "dataset.train_subset=50", "net.width=16",
            f"paths.buffers={tmp_path / 'buffers'}"]
    from ddrun.buffers import buffer

    buffer(make_cfg([*data, "num_experts=2", "train_epochs=4", "batch_train=64"], "buffer"))
    cfg = make_cfg([*data, "method=datm", "ipc=1", "dataset.test_subset=100", "iterations=30", "eval_every=30",
                    "logger=none", "evaluator.num_eval=2", "evaluator.epochs=80", "evaluator.batch_train=256",
                    "fetcher.max_start_epoch=3", "fetcher.current_max_start_epoch=1", "fetcher.expansion_end_epoch=20",
                    "fetcher.expert_epochs=2", "objective.syn_steps=10", "objective.lr_img=100"])
    distill(cfg, tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = {r["iteration"]: r["acc_mean"] for r in rows if "acc_mean" in r}
    assert evals[30] > evals[0] + 2, evals
