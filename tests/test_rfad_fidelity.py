"""RFAD and KIP details as their references: AdaBelief, the learned linear transform of the images, 28 px feature
maps on MNIST, the finite-network protocol beside the common one."""

from __future__ import annotations

from pathlib import Path

import torch

from conftest import SAME_S, assert_same_s, make_cfg
from ddrun.distill import distill
from ddrun.nets import ConvNet
from ddrun.utils import build


def tiny(root, *extra):
    return make_cfg(["dataset=mnist", f"paths.data={root}", "dataset.system_dirs=[]", "ipc=2", "net.width=8",
                     "debug=smoke", "logger=none", "objective.batch_real=4", "objective.kernel.n_models=1",
                     "objective.kernel.net_kwargs.width=8", *extra])


def test_rfad_preset_is_the_reference():
    cfg = make_cfg(["method=rfad", "dataset=mnist", "ipc=10"])
    assert cfg.syn_optimizer._target_ == "timm.optim.AdaBelief" and cfg.syn_optimizer.eps == 1e-16
    assert cfg.syn_optimizer.rectify is False and cfg.objective.transform and cfg.objective.lr_transform == 5e-5
    assert cfg.objective.kernel.net_kwargs.pad28 is False and not cfg.dataset.zca
    own = cfg.beside.rfad
    assert own.net.width == 1024 and own.net.norm == "none" and own.optimizer == "sgd" and own.target_scale == 8
    assert own.val_per_class == 500 and own.patience == 500 and own.steps == 20000
    c10 = make_cfg(["method=rfad", "dataset=cifar10", "ipc=1"])
    assert c10.dataset.zca and c10.dataset.zca_form == "relative"
    kip = make_cfg(["method=kip", "dataset=svhn", "ipc=1"])
    assert kip.dataset.zca and kip.beside.kip.net.width == 1024


def test_mnist_feature_maps_stay_28_px_like_rfads_convnet():
    x = torch.randn(2, 1, 28, 28)
    assert ConvNet(1, 10, (28, 28), width=8, norm="none", pad28=False).embed(x).shape == (2, 8 * 3 * 3)
    assert ConvNet(1, 10, (28, 28), width=8).embed(x).shape == (2, 8 * 4 * 4)  # DC's 28 -> 32, the default
    net = ConvNet(1, 10, (28, 28), width=64, norm="none", init="gaussian")
    w, b = net.features[0].weight, net.features[0].bias
    assert abs(w.std().item() - (2 / 9) ** 0.5) < 0.1 and abs(b.std().item() - 0.1) < 0.05


def test_learned_transform_is_applied_to_s_and_resumes(tiny_root, tmp_path):
    """S holds X T after every update; T (identity at the start) is learned; an interrupted run ends with the same
    S, X and T."""
    args = ["method=rfad", "evaluator.num_eval=0", "objective.lr_transform=0.01", "early_stopping.every=null",
            *SAME_S]
    straight = distill(tiny(tiny_root, *args, "iterations=4"), tmp_path / "straight")
    ckpt = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    x, t = ckpt["objective"]["transform_x"], ckpt["objective"]["transform_t"]
    s = torch.load(straight["synthetic"], weights_only=True)
    assert not torch.allclose(t, torch.eye(784))
    torch.testing.assert_close(s["images"], (x @ t).reshape(s["images"].shape))
    names = [g["name"] for g in build(tiny(tiny_root, *args).syn_optimizer)([{"params": [torch.zeros(1)],
                                                                                "name": "images"}]).param_groups]
    assert names == ["images"]
    distill(tiny(tiny_root, *args, "iterations=2"), tmp_path / "resumed")
    resumed = distill(tiny(tiny_root, *args, "iterations=4"), tmp_path / "resumed")
    r = torch.load(Path(resumed["synthetic"]), weights_only=True)
    assert_same_s(r["images"], s["images"])
    assert_same_s(r["labels"], s["labels"])


def test_rfad_optimizer_holds_x_t_labels_and_platt(tiny_root):
    cfg = tiny(tiny_root, "method=rfad")
    real = build(cfg.dataset)
    syn = build(cfg.init)(real, 2, torch.Generator().manual_seed(0))
    obj = build(cfg.objective)
    obj.prepare(syn, real)
    groups = obj.param_groups(syn)
    assert [g["name"] for g in groups] == ["labels", "images", "transform", "platt"]
    assert all(g["params"][0] is not syn.images for g in groups)
    opt = build(cfg.syn_optimizer)(groups, lr=obj.lr_img)
    assert type(opt).__name__ == "AdaBelief"
