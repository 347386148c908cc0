"""``ddrun evaluate``: any saved S (ours or a plain tensor file) with any evaluator, the architecture pool, the
whole-training-set upper bound, and the coreset baselines (herding, K-Center)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from conftest import CUDA, ddrun_here, make_cfg
from formats import write_mnist_like
from ddrun.distill import distill
from ddrun.evaluate import evaluate_cmd
from ddrun.init import herding_select, kcenter_greedy
from ddrun.utils import ConfigError, DataError

TINY = ["dataset=mnist", "dataset.system_dirs=[]", "logger=none", "evaluator.num_eval=2", "evaluator.epochs=2"]
POOL = ["convnet", "mlp", "lenet", "alexnet", "vgg11", "resnet18", "resnet18_bn"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("data")
    write_mnist_like(r, "MNIST", n_train=12, n_test=4)
    return r


@pytest.fixture(scope="module")
def distilled(root, tmp_path_factory):
    """A tiny DM run: its synthetic.pt and its final evaluation."""
    cfg = make_cfg(["method=dm", "ipc=2", "net.width=8", "debug=smoke", f"paths.data={root}", *TINY])
    return distill(cfg, tmp_path_factory.mktemp("dm") / "run")


def ev(root, *extra):
    return make_cfg([f"paths.data={root}", "net.width=8", *TINY, *extra], config_name="evaluate")


def test_saved_synthetic_set_gives_the_runs_own_accuracy(root, distilled, tmp_path):
    """Same evaluator, same seed: ``ddrun evaluate`` reproduces the distill run's final accuracy exactly, and
    records what ``ddrun report`` needs."""
    out = evaluate_cmd(ev(root, f"synthetic={distilled['synthetic']}"), tmp_path)
    if CUDA:  # GPU training is not bitwise repeatable (conftest.GPU_TOL): one test image per network may flip
        flip = 100.0 / 40 + 1e-9  # 4 test images x 10 classes
        assert all(abs(a - b) <= flip for a, b in zip(out["per_net"]["convnet"], distilled["per_net"]["convnet"]))
    else:
        assert out["acc_mean"] == distilled["acc_mean"] and out["per_net"] == distilled["per_net"]
    assert (out["method"], out["dataset"], out["ipc"], out["iteration"]) == ("dm", "mnist", 2, 4)
    row = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert row["iteration"] == 4 and row["method"] == "dm" and row["per_net"] == {"convnet": out["per_net"]["convnet"]}
    rec = json.loads((tmp_path / "results.json").read_text())
    assert rec["command"] == "evaluate" and rec["evaluations"][0]["acc_mean"] == out["acc_mean"]
    assert rec["source"]["run_dir"] == str(Path(distilled["synthetic"]).parent)
    made = json.loads((Path(distilled["synthetic"]).parent / "results.json").read_text())
    assert rec["synthetic"]["digest"] == made["synthetic"]["digest"]  # the very S the run recorded
    assert (tmp_path / "images" / "synthetic_000004.png").is_file()


def test_plain_tensor_file(root, distilled, tmp_path):
    s = torch.load(distilled["synthetic"], weights_only=True)
    torch.save({"images": s["images"], "labels": s["labels"]}, tmp_path / "plain.pt")
    out = evaluate_cmd(ev(root, f"synthetic={tmp_path / 'plain.pt'}", "label=theirs"))
    assert out["acc_mean"] == distilled["acc_mean"]  # the same images and labels: the same accuracy
    assert (out["method"], out["ipc"]) == ("theirs", 2)
    out = evaluate_cmd(ev(root, f"synthetic={tmp_path / 'plain.pt'}"))
    assert out["method"] == "external"


def test_cross_arch_trains_every_architecture(root, distilled, tmp_path):
    out = evaluate_cmd(ev(root, f"synthetic={distilled['synthetic']}", "evaluator=cross_arch",
                          "evaluator.num_eval=1", "evaluator.epochs=1"), tmp_path)
    assert list(out["per_arch"]) == POOL and all(len(out["per_net"][a]) == 1 for a in POOL)
    assert all(0 <= v["acc_mean"] <= 100 for v in out["per_arch"].values())
    assert out["protocol"].startswith("/".join(POOL) + " each x1, 1 epochs")
    row = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert set(row["per_net"]) == set(POOL) and "acc_mean/resnet18_bn" in row
    sub = evaluate_cmd(ev(root, f"synthetic={distilled['synthetic']}", "evaluator=cross_arch",
                          "evaluator.archs=[lenet,mlp]", "evaluator.num_eval=1", "evaluator.epochs=1"))
    assert list(sub["per_arch"]) == ["lenet", "mlp"] and sub["per_net"]["mlp"] == out["per_net"]["mlp"]
    with pytest.raises(ConfigError, match=r"unknown \['vgg16'\]; valid architectures: \['alexnet'"):
        evaluate_cmd(ev(root, f"synthetic={distilled['synthetic']}", "evaluator=cross_arch",
                        "evaluator.archs=[vgg16]"))


def test_cross_arch_refuses_architectures_too_large_for_the_images_before_any_trains(tmp_path):
    """sklearn's 8x8 digits: LeNet's 5x5 convolutions and VGG-11's five poolings cannot take them; once a
    RuntimeError traceback after the other networks had trained, now one line at start-up naming both, the size and
    the fixes (the pool without them, or dataset.im_size=[28,28])."""
    pytest.importorskip("sklearn")
    base = ["dataset=sklearn_digits", "logger=none", "full=true", "evaluator=cross_arch", "evaluator.num_eval=1",
            "evaluator.epochs=1"]
    fixes = r"drop them from evaluator.archs \(evaluator.archs=\[convnet,mlp,alexnet,resnet18,resnet18_bn\]\), " \
            r"or resize the images \(dataset.im_size=\[28,28\]\)$"
    with pytest.raises(ConfigError, match=r"^lenet, vgg11 cannot take sklearn_digits's 8x8 images \(lenet: .*; "
                                          r"vgg11: .*\): " + fixes):
        evaluate_cmd(make_cfg(base, config_name="evaluate"), tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    with pytest.raises(ConfigError, match=r"^lenet cannot take sklearn_digits's 8x8 images .*: pick another net"):
        evaluate_cmd(make_cfg([*base[:3], "net=lenet"], config_name="evaluate"))
    from ddrun.utils import build
    cfg = make_cfg([*base, "dataset.im_size=[28,28]"], config_name="evaluate")
    build(cfg.evaluator).prepare(build(cfg.dataset))  # upsampled: every architecture of the pool takes them
    r = ddrun_here("evaluate", *base, "evaluator.archs=[mlp,lenet]", f"hydra.run.dir={tmp_path / 'cli'}")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "lenet cannot take sklearn_digits's 8x8 images" in r.stderr and "evaluator.archs=[mlp]" in r.stderr


@pytest.mark.parametrize("archs", ["convnet", "[]"])
def test_cross_arch_archs_must_be_a_non_empty_list(root, archs):
    with pytest.raises(ConfigError, match=rf"^evaluator.archs={re.escape(archs)}: must be a non-empty list of "
                                          r"architectures, e.g. evaluator.archs=\[convnet,mlp\]; valid architectures"):
        evaluate_cmd(ev(root, "full=true", "evaluator=cross_arch", f"evaluator.archs={archs}"))


def test_full_training_set_upper_bound(root):
    out = evaluate_cmd(ev(root, "full=true", "evaluator.num_eval=1"))
    assert (out["method"], out["ipc"]) == ("full", "full") and 0 <= out["acc_mean"] <= 100
    assert out["source"]["path"] == "the whole mnist training set"


def test_bad_inputs_get_one_line_errors(root, distilled, tmp_path):
    with pytest.raises(ConfigError, match="pass synthetic=PATH .* or full=true$"):
        evaluate_cmd(ev(root))
    with pytest.raises(ConfigError, match="not both"):
        evaluate_cmd(ev(root, "full=true", f"synthetic={distilled['synthetic']}"))
    with pytest.raises(DataError, match="synthetic set not found: .*nope.pt"):
        evaluate_cmd(ev(root, f"synthetic={tmp_path / 'nope.pt'}"))
    write_mnist_like(tmp_path, "FashionMNIST", n_train=4, n_test=2)
    with pytest.raises(ConfigError, match="was distilled from dataset mnist, not fashion_mnist: pass dataset=mnist"):
        evaluate_cmd(ev(tmp_path, f"synthetic={distilled['synthetic']}", "dataset=fashion_mnist"))
    torch.save({"images": torch.zeros(4, 3, 32, 32), "labels": torch.arange(4)}, tmp_path / "rgb.pt")
    with pytest.raises(ConfigError, match=r"holds images \[3, 32, 32\] but dataset=mnist has \[1, 28, 28\]"):
        evaluate_cmd(ev(root, f"synthetic={tmp_path / 'rgb.pt'}"))
    r = ddrun_here("evaluate", f"paths.data={root}", *TINY, f"synthetic={tmp_path / 'rgb.pt'}",
                   f"hydra.run.dir={tmp_path / 'run'}")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "ddrun evaluate: error: " in r.stderr and "holds images [3, 32, 32]" in r.stderr


def test_herding_matches_the_mean_better_than_random_or_kcenter():
    """Herding's picks have a mean much closer to the population mean than random picks (below the 5th percentile
    of 200 random subsets) and K-Center's (which covers the extremes instead)."""
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(300, 16, generator=g) * torch.linspace(0.2, 3, 16)
    mu, k = feats.mean(0), 10
    pick = herding_select(feats, k)
    assert len(set(pick)) == k
    err = (feats[pick].mean(0) - mu).norm()
    rand = torch.stack([(feats[torch.randperm(300, generator=g)[:k]].mean(0) - mu).norm() for _ in range(200)])
    assert err < rand.quantile(0.05)
    assert err < (feats[kcenter_greedy(feats, k, 0)].mean(0) - mu).norm()
    assert herding_select(torch.tensor([[-1.0], [1.0], [0.1], [5.0]]), 2) == [1, 2]  # mu = 1.275: 1, then 0.1


@pytest.mark.parametrize("method", ["herding", "kcenter", "random"])
def test_coreset_baselines_select_real_images(root, tmp_path, method):
    cfg = make_cfg([f"method={method}", "ipc=2", "net.width=8", f"paths.data={root}", *TINY, "init.train_epochs=1"]
                   if method != "random" else [f"method={method}", "ipc=2", f"paths.data={root}", *TINY])
    out = distill(cfg, tmp_path / "run")
    s = torch.load(out["synthetic"], weights_only=True)
    from ddrun.utils import build

    real = build(cfg.dataset)
    for c in range(10):  # every image of S is a distinct training image of its class
        imgs = s["images"][s["labels"] == c]
        pool = real.train_images[real.train_labels == c]
        assert len(imgs) == 2 and all(any(torch.equal(x, p) for p in pool) for x in imgs)
        assert not torch.equal(imgs[0], imgs[1])
    assert s["meta"]["method"] == method and s["meta"]["iteration"] == 0 and 0 <= out["acc_mean"] <= 100


@pytest.mark.realdata
def test_pool_learns_on_real_fashion_mnist_and_full_data_is_the_upper_bound(fmnist_root, tmp_path):
    """On real Fashion-MNIST (class-balanced 50 per class for training, 50 per class for testing): a random ipc-10
    S trains MLP and LeNet far above chance (10%) under a 300-epoch protocol, and the whole training subset (5x as
    many images) does better still for the MLP."""
    data = [f"paths.data={fmnist_root}", "dataset.train_subset=50", "dataset.test_subset=50", "logger=none"]
    s = distill(make_cfg(["method=random", "ipc=10", *data, "evaluator.num_eval=1", "evaluator.epochs=1"]),
                tmp_path / "random")["synthetic"]
    protocol = ["evaluator=cross_arch", "evaluator.archs=[mlp,lenet]", "evaluator.num_eval=1", "evaluator.epochs=300"]
    out = evaluate_cmd(make_cfg([f"synthetic={s}", *data, *protocol], config_name="evaluate"))
    assert out["per_arch"]["mlp"]["acc_mean"] > 50 and out["per_arch"]["lenet"]["acc_mean"] > 50, out["per_arch"]
    full = evaluate_cmd(make_cfg(["full=true", *data, "evaluator=cross_arch", "evaluator.archs=[mlp]",
                                  "evaluator.num_eval=1", "evaluator.epochs=100"], config_name="evaluate"))
    assert full["acc_mean"] > out["per_arch"]["mlp"]["acc_mean"] + 3, (full["acc_mean"], out["per_arch"])


def test_a_zca_set_without_zca_names_the_override_first(root):
    """A set distilled under ZCA (its recorded mean 0) evaluated on the plain dataset: the message names
    dataset.zca=true, not the normalization the whitening implies."""
    from ddrun.evaluate import check_compatible
    from ddrun.synthetic import SyntheticSet
    from ddrun.utils import build

    real = build(make_cfg([f"paths.data={root}", "dataset=mnist", "dataset.system_dirs=[]"]).dataset)
    syn = SyntheticSet(torch.zeros(10, 1, 28, 28), torch.arange(10), 10,
                       meta={"zca": True, "mean": [0.0], "std": [1.0], "dataset": "mnist"})
    with pytest.raises(ConfigError, match="was made with ZCA whitening: pass dataset.zca=true$"):
        check_compatible(syn, real, "s.pt")


def test_a_zca_set_records_its_regularization_and_evaluate_refuses_another(root, tmp_path):
    """S distilled under ZCA records dataset.zca_regularization; evaluating it against a dataset whitened with
    another one is refused naming the override (it ran silently against another whitening). A file that does
    not record it (made before) is not checked."""
    from ddrun.evaluate import load_set
    from ddrun.utils import build

    zca = ["dataset.zca=true", "dataset.zca_regularization=0.2"]
    s = distill(make_cfg(["method=random", "ipc=1", f"paths.data={root}", *TINY, *zca]), tmp_path / "run")
    saved = torch.load(s["synthetic"], weights_only=True)
    assert saved["meta"]["zca_regularization"] == 0.2 and saved["meta"]["zca_form"] == "absolute"
    same = ev(root, f"synthetic={s['synthetic']}", *zca)
    load_set(same, build(same.dataset))
    other = ev(root, f"synthetic={s['synthetic']}", "dataset.zca=true")  # the default 0.1
    with pytest.raises(ConfigError, match=r"whitened with dataset.zca_regularization=0.2, this dataset with 0.1: "
                                          r"pass dataset.zca_regularization=0.2$"):
        load_set(other, build(other.dataset))
    del saved["meta"]["zca_regularization"]
    torch.save(saved, tmp_path / "older.pt")
    older = ev(root, f"synthetic={tmp_path / 'older.pt'}", "dataset.zca=true")
    load_set(older, build(older.dataset))
    plain = distill(make_cfg(["method=random", "ipc=1", f"paths.data={root}", *TINY]), tmp_path / "plain")
    assert "zca_regularization" not in torch.load(plain["synthetic"], weights_only=True)["meta"]


@pytest.mark.parametrize("meta,line", [({"zca": True}, "was made with ZCA whitening: pass dataset.zca=true"),
                                       ({"layernorm": True}, "per-image layer normalization: pass "
                                                             "dataset.layernorm=true")])
def test_a_preprocessing_mismatch_is_named_before_the_value_range(root, tmp_path, meta, line):
    """A file made with ZCA (a small regularization gives large whitened values) or layer norm, evaluated on the
    plain dataset, names the override, not "raw 0-255 pixels"."""
    torch.save({"images": torch.randn(10, 1, 28, 28) * 500, "labels": torch.arange(10),
                "meta": {"dataset": "mnist", **meta}}, tmp_path / "s.pt")
    with pytest.raises(ConfigError, match=line) as info:
        evaluate_cmd(ev(root, f"synthetic={tmp_path / 's.pt'}"))
    assert "raw 0-255" not in str(info.value)
