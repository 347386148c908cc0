"""The config tree: every method preset x every dataset composes and builds (globbed from conf/), every init
composes; presets apply the papers' values."""

from __future__ import annotations

import itertools
import os

import pytest
import torch
from omegaconf import OmegaConf

from pathlib import Path

import ddrun.conf
from conftest import ddrun_here, make_cfg
from ddrun.data.augment import DSA
from ddrun.distill import has_objective, validate
from ddrun.utils import build

CONF = Path(ddrun.conf.__file__).parent
METHODS = sorted(p.stem for p in (CONF / "method").glob("*.yaml"))
DATASETS = sorted(p.stem for p in (CONF / "dataset").glob("*.yaml"))
INITS = sorted(p.stem for p in (CONF / "init").glob("*.yaml"))


def check_builds(cfg) -> None:
    """What the loop builds from a composed config, without data: validate, then every component."""
    validate(cfg)
    OmegaConf.resolve(cfg)
    shape = (3, 32, 32) if cfg.dataset.name not in ("mnist", "fashion_mnist", "mnist_5k", "sklearn_digits") \
        else (1, 28, 28)
    net = build(cfg.net)(channels=shape[0], num_classes=10, im_size=shape[1:])
    assert net(torch.zeros(2, *shape)).shape == (2, 10)
    assert callable(build(cfg.init)) and build(cfg.evaluator).num_eval > 0
    assert all(build(node).num_eval > 0 for node in (cfg.get("beside") or {}).values())  # paper protocols
    assert build(cfg.schedule).steps >= 1 and build(cfg.parametrization) is not None
    if has_objective(cfg):
        obj = build(cfg.objective)
        assert (obj.lr_img > 0 or obj.lr_labels > 0) and callable(build(cfg.fetcher))  # ld: labels only
    else:
        assert cfg.iterations == 0 and cfg.get("fetcher") is None
    strategy = build(cfg.augment).strategy
    assert ("flip" in strategy) == (cfg.dataset.name not in ("mnist", "svhn", "mnist_5k", "sklearn_digits"))


@pytest.mark.parametrize("method,dataset", list(itertools.product(METHODS, DATASETS)))
def test_every_preset_composes_and_builds_for_every_dataset(method, dataset):
    cfg = make_cfg([f"method={method}", f"dataset={dataset}", "ipc=10"])
    assert cfg.dataset.name == dataset and cfg.preset.name == method
    check_builds(cfg)


@pytest.mark.parametrize("method,ipc", list(itertools.product(METHODS, [1, 50])))
def test_every_preset_has_its_ipc_1_and_50_settings(method, ipc):
    check_builds(make_cfg([f"method={method}", "dataset=cifar10", f"ipc={ipc}"]))


@pytest.mark.parametrize("init", INITS)
def test_every_init_composes_with_a_method(init):
    check_builds(make_cfg(["method=dm", f"init={init}", "ipc=10"]))


def test_tiny_imagenet_ipc50_trajectory_matching_selects_convnet_d4():
    cfg = make_cfg(["method=mtt", "dataset=tiny_imagenet", "ipc=50"])
    net = build(cfg.net)(channels=3, num_classes=200, im_size=(64, 64))
    assert cfg.net.depth == 4 and len([m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]) == 4
    assert cfg.evaluator.net.depth == 4  # evaluated with the same ConvNetD4 (DC-BENCH)
    assert make_cfg(["method=mtt", "dataset=tiny_imagenet", "ipc=10"]).net.depth == 3


@pytest.mark.parametrize("ipc,loops", [(1, (1, 1)), (10, (10, 50)), (50, (50, 10))])
@pytest.mark.parametrize("method", ["dc", "dsa"])
def test_dc_loop_schedule_per_ipc(method, ipc, loops):
    cfg = make_cfg([f"method={method}", f"ipc={ipc}"])
    assert (cfg.schedule.outer_loop, cfg.schedule.inner_loop) == loops
    assert cfg.iterations == 1000 and cfg.objective.lr_img == 0.1 and cfg.objective.batch_real == 256


def test_presets_carry_reference_values():
    dm = make_cfg(["method=dm"])
    assert (dm.iterations, dm.objective.lr_img, dm.objective.batch_real, dm.init._target_) == \
        (20000, 1.0, 256, "ddrun.init.real")
    dc = make_cfg(["method=dc"])
    assert dc.init._target_ == "ddrun.init.noise" and dc.objective.augment is None
    dsa = make_cfg(["method=dsa"])
    assert dsa.init._target_ == "ddrun.init.real"
    assert isinstance(build(dsa.objective).augment, DSA) and isinstance(build(dsa.schedule.augment), DSA)
    assert make_cfg(["method=dsa", "objective.lr_img=0.05"]).objective.lr_img == 0.05  # a single key wins
    ev = make_cfg([]).evaluator
    assert (ev.epochs, ev.lr, ev.momentum, ev.weight_decay, ev.batch_train) == (1000, 0.01, 0.9, 0.0005, 256)


def test_cfg_job_resolve_prints_preset_values():
    r = ddrun_here("distill", "method=dsa", "ipc=10", "--cfg", "job", "--resolve")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    cfg = OmegaConf.create(out)
    assert cfg.schedule.outer_loop == 10 and cfg.schedule.inner_loop == 50
    assert cfg.objective.augment.strategy == "color_crop_cutout_flip_scale_rotate"


def test_config_tree_ships_in_the_package():
    import ddrun.conf

    root = os.path.dirname(ddrun.conf.__file__)
    for group in ("dataset", "net", "init", "fetcher", "objective", "method", "evaluator", "logger", "debug"):
        assert os.listdir(os.path.join(root, group)), group
