"""The config tree: every method x dataset x init composes and builds; presets apply the papers' values."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from conftest import make_cfg
from ddrun.data.augment import DSA
from ddrun.utils import build

METHODS = ["dm", "dc", "dsa", "random"]
DATASETS = ["mnist", "fashion_mnist", "cifar10", "cifar100", "svhn", "tiny_imagenet", "imagefolder"]
INITS = ["noise", "real", "kcenter"]


@pytest.mark.parametrize("method,dataset,init", list(itertools.product(METHODS, DATASETS, INITS)))
def test_every_combination_composes_and_builds(method, dataset, init):
    cfg = make_cfg([f"method={method}", f"dataset={dataset}", f"init={init}", "ipc=10"])
    OmegaConf.resolve(cfg)
    assert cfg.dataset.name == dataset and cfg.preset.name == method
    objective = build(cfg.objective)
    assert objective.lr_img > 0
    net = build(cfg.net)(channels=3, num_classes=10, im_size=(32, 32))
    assert net(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    assert callable(build(cfg.init)) and callable(build(cfg.fetcher)) and build(cfg.evaluator).epochs == 1000
    strategy = build(cfg.augment).strategy
    assert ("flip" in strategy) == (dataset not in ("mnist", "svhn"))


@pytest.mark.parametrize("ipc,loops", [(1, (1, 1)), (10, (10, 50)), (50, (50, 10))])
@pytest.mark.parametrize("method", ["dc", "dsa"])
def test_dc_loop_schedule_per_ipc(method, ipc, loops):
    cfg = make_cfg([f"method={method}", f"ipc={ipc}"])
    assert (cfg.fetcher.outer_loop, cfg.fetcher.inner_loop) == loops
    assert cfg.iterations == 1000 and cfg.objective.lr_img == 0.1 and cfg.objective.batch_real == 256


def test_presets_carry_reference_values():
    dm = make_cfg(["method=dm"])
    assert (dm.iterations, dm.objective.lr_img, dm.objective.batch_real, dm.init._target_) == \
        (20000, 1.0, 256, "ddrun.init.real")
    dc = make_cfg(["method=dc"])
    assert dc.init._target_ == "ddrun.init.noise" and dc.objective.augment is None
    dsa = make_cfg(["method=dsa"])
    assert dsa.init._target_ == "ddrun.init.real"
    assert isinstance(build(dsa.objective).augment, DSA) and isinstance(build(dsa.fetcher.augment), DSA)
    assert make_cfg(["method=dsa", "objective.lr_img=0.05"]).objective.lr_img == 0.05  # a single key wins
    ev = make_cfg([]).evaluator
    assert (ev.epochs, ev.lr, ev.momentum, ev.weight_decay, ev.batch_train) == (1000, 0.01, 0.9, 0.0005, 256)


def test_cfg_job_resolve_prints_preset_values():
    out = subprocess.run([sys.executable, "-m", "ddrun.cli", "distill", "method=dsa", "ipc=10", "--cfg", "job",
                          "--resolve"], capture_output=True, text=True, check=True).stdout
    cfg = OmegaConf.create(out)
    assert cfg.fetcher.outer_loop == 10 and cfg.fetcher.inner_loop == 50
    assert cfg.objective.augment.strategy == "color_crop_cutout_flip_scale_rotate"


def test_config_tree_ships_in_the_package():
    import ddrun.conf

    root = os.path.dirname(ddrun.conf.__file__)
    for group in ("dataset", "net", "init", "fetcher", "objective", "method", "evaluator", "logger", "debug"):
        assert os.listdir(os.path.join(root, group)), group
