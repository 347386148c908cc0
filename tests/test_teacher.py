"""``ddrun teacher`` (store layout, BatchNorm buffers, resume after a kill, shards) and ``fetcher=teachers`` (the
pool, missing / foreign teachers), the contracts of the components that read teachers, on tiny MNIST-format data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import SAME_S, assert_same_s, ddrun_process, make_cfg
from teacher_helpers import make_teacher, tiny_args

from ddrun.contracts import Fetched, Fetcher
from ddrun.files import file_digest
from ddrun.teachers import lr_factor
from ddrun.utils import ConfigError, DataError, build


def test_layout_manifest_and_full_state_dict(tiny_root, tmp_path):
    out = make_teacher(tiny_root, tmp_path / "store")
    d = Path(out["dir"])
    assert d.relative_to(tmp_path / "store").parts == (
        "teachers", "mnist", "convnet_act-relu_depth-3_norm-batchnorm_pooling-avgpooling_width-8", "sre2l")
    m = json.loads((d / "manifest.json").read_text())
    assert m["kind"] == "teachers" and m["setting"]["recipe"] == "sre2l" and "augment" not in m["setting"]
    assert m["training"]["epochs"] == 2 and m["training"]["lr"] == 0.1 and m["training"]["augment"]["flip"] is False
    assert m["command"].startswith("ddrun teacher dataset=mnist net=convnet net.norm=batchnorm net.width=8 "
                                   "recipe=sre2l")
    entry = m["teachers"]["0"]
    f = d / "teacher_0000.pt"
    assert entry["bytes"] == f.stat().st_size and entry["sha256"] == file_digest(f) and 0 <= entry["test_acc"] <= 100
    item = torch.load(f, weights_only=True)
    sd = item["state_dict"]
    assert any(k.endswith("running_mean") for k in sd) and any(k.endswith("num_batches_tracked") for k in sd)
    bn = next(k for k in sd if k.endswith("running_var"))
    assert not torch.equal(sd[bn], torch.ones_like(sd[bn]))  # the running statistics were trained
    assert item["training"]["name"] == "sre2l" and item["epochs"] == 2
    assert not list(d.glob("*.partial"))
    again = make_teacher(tiny_root, tmp_path / "store", "teacher_offset=1")
    assert again["trained"] == [1] and sorted(again["teachers"]) == [0, 1]
    assert make_teacher(tiny_root, tmp_path / "store")["skipped"] == [0]


def test_killed_teacher_resumes_to_the_same_weights(tiny_root, tmp_path, monkeypatch):
    straight = make_teacher(tiny_root, tmp_path / "a", *SAME_S, epochs=4)
    import ddrun.teachers

    real_epoch, calls = ddrun.teachers.train_epoch, []

    def crash_in_third_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(ddrun.teachers, "train_epoch", crash_in_third_epoch)
    with pytest.raises(KeyboardInterrupt):
        make_teacher(tiny_root, tmp_path / "b", *SAME_S, epochs=4)
    partial = next((tmp_path / "b").glob("teachers/*/*/*/teacher_0000.partial"))
    assert torch.load(partial / "state.pt", weights_only=True)["epoch"] == 2
    monkeypatch.setattr(ddrun.teachers, "train_epoch", real_epoch)
    resumed = make_teacher(tiny_root, tmp_path / "b", *SAME_S, epochs=4)
    a = torch.load(Path(straight["dir"]) / "teacher_0000.pt", weights_only=True)["state_dict"]
    b = torch.load(Path(resumed["dir"]) / "teacher_0000.pt", weights_only=True)["state_dict"]
    assert set(a) == set(b)
    for k in a:
        assert_same_s(a[k], b[k])


def test_recipe_schedule_and_other_recipe_refused(tiny_root, tmp_path):
    r = {"warmup_epochs": 5, "epochs": 50, "schedule": "cosine"}
    assert [lr_factor(e, r) for e in (0, 4)] == [pytest.approx(0.2), pytest.approx(1.0)]
    assert lr_factor(5, r) == pytest.approx(1.0) and lr_factor(50, r) == pytest.approx(0.0)
    assert lr_factor(27, r) == pytest.approx(0.5 * (1 + torch.cos(torch.tensor(torch.pi * 22 / 45)).item()))
    assert lr_factor(30, {**r, "schedule": "constant"}) == 1.0
    make_teacher(tiny_root, tmp_path / "store")
    with pytest.raises(ConfigError, match="lr: 0.1 in the teacher collection, 0.05 in this run"):
        make_teacher(tiny_root, tmp_path / "store", "recipe.lr=0.05", "teacher_offset=1")
    cfg = make_cfg(["dataset=tiny_imagenet"], "teacher")  # the per-dataset table of the recipe
    assert (cfg.recipe.lr, cfg.recipe.batch, cfg.recipe.warmup_epochs, cfg.recipe.augment.kind) == (
        0.2, 256, 5, "resized_crop")
    assert make_cfg(["dataset=cifar10"], "teacher").recipe.epochs == 200


def fetcher_of(root, store, *extra, net=("net=convnet_bn", "net.width=8")):
    args = [a for a in tiny_args(root, store) if not a.startswith("net")]
    cfg = make_cfg([*args, "method=sre2l", *net, *extra])
    real = build(cfg.dataset)
    return build(cfg.fetcher)(real=real, device=torch.device("cpu"), seed=0), real


def test_fetcher_cycles_a_frozen_pool(tiny_root, tmp_path):
    make_teacher(tiny_root, tmp_path / "store", "num_teachers=2")
    fetcher, real = fetcher_of(tiny_root, tmp_path / "store", "fetcher.num_teachers=2")
    assert isinstance(fetcher, Fetcher)
    got = [fetcher.fetch(it) for it in range(3)]
    assert all(isinstance(f, Fetched) and f.teacher is f.net for f in got)
    assert [f.info["index"] for f in got] == [0, 1, 0] and got[0].teacher is got[2].teacher
    t = got[0].teacher
    assert not t.training and not any(p.requires_grad for p in t.parameters())
    assert t(real.train_images[:2]).shape == (2, 10)
    sampled, _ = fetcher_of(tiny_root, tmp_path / "store", "fetcher.num_teachers=2", "fetcher.order=sample")
    assert {sampled.fetch(it).info["index"] for it in range(12)} == {0, 1}
    with pytest.raises(DataError, match=r"holds 2 finished teacher\(s\), 3 needed; train them with "
                                        r"`ddrun teacher .* num_teachers=3`") as err:
        fetcher_of(tiny_root, tmp_path / "store", "fetcher.num_teachers=3")
    # the printed command carries the pool's own recipe (not the defaults), so run verbatim it adds the third
    msg = str(err.value)
    cmd = msg[msg.index("`") + 1:msg.rindex("`")].split()
    assert "recipe.epochs=2" in cmd and "recipe.batch=32" in cmd
    from ddrun.teachers import teacher

    out = teacher(make_cfg([*cmd[2:], "dataset.system_dirs=[]"], "teacher"))
    assert out["trained"] == [2] and out["skipped"] == [0, 1]
    assert len(fetcher_of(tiny_root, tmp_path / "store", "fetcher.num_teachers=3")[0].pool) == 3


def test_a_multi_backbone_pool_cycles_its_architectures_named_as_conf_net_choices(tiny_root, tmp_path):
    """G-VBSM's / EDC's pool: `+net@fetcher.extra_nets.<name>=<conf/net choice>` adds a backbone; a missing one is
    named with the command that trains exactly it; the pool then cycles main, extra, main, ... (EDC recover.py); the
    KD evaluator's `+net@evaluator.extra_teacher_nets.<name>` averages the same two teachers' logits."""
    from ddrun.fetchers.teachers import teacher_logits
    from ddrun.teachers import teacher

    store = tmp_path / "store"
    make_teacher(tiny_root, store)
    extra = ("+net@fetcher.extra_nets.w4=convnet_bn", "fetcher.extra_nets.w4.width=4")
    with pytest.raises(DataError, match=r"^fetcher: no teacher collection at .*width-4/sre2l; create it with "
                                        r"`ddrun teacher dataset=mnist net=convnet net.norm=batchnorm net.width=4 "
                                        r"recipe=sre2l") as err:
        fetcher_of(tiny_root, store, *extra)
    msg = str(err.value)
    cmd = msg[msg.index("`") + 1:msg.index("`", msg.index("`") + 1)].split()
    teacher(make_cfg([*cmd[2:], "dataset.system_dirs=[]", "recipe.epochs=1", "recipe.batch=32"], "teacher"))
    fetcher, real = fetcher_of(tiny_root, store, *extra)
    got = [fetcher.fetch(it) for it in range(4)]
    assert [f.info["arch"] for f in got] == ["net", "w4", "net", "w4"]
    assert [f.net.features[0].out_channels for f in got[:2]] == [8, 4]  # two backbones, not one teacher twice
    x = real.train_images[:6]
    kd = build(make_cfg([*tiny_args(tiny_root, store), "evaluator=kd",
                         "+net@evaluator.extra_teacher_nets.w4=convnet_bn",
                         "evaluator.extra_teacher_nets.w4.width=4"]).evaluator)
    pool = kd.teachers(real)
    assert [m["name"] for m in pool] == ["teacher", "w4"]
    assert torch.allclose(teacher_logits(pool, x), (got[0].net(x) + got[1].net(x)) / 2, atol=1e-6)
    assert " + ConvNet(act relu, depth 3, norm batchnorm, pooling avgpooling, width 4) x1" in \
        kd.protocol_fields()["teacher"]


def test_statistics_refuses_a_net_without_batchnorm_before_asking_for_a_teacher(tiny_root, tmp_path):
    """method=sre2l with a net without BatchNorm: the refusal comes first (the missing-teacher command would make a
    teacher the objective then refuses); with objective.bn=false the same net is fine (the missing teacher is next)."""
    with pytest.raises(ConfigError, match=r"the teacher net \(ConvNet\) has no BatchNorm layer: use net=convnet_bn"):
        fetcher_of(tiny_root, tmp_path / "store", net=("net=convnet", "net.width=8"))
    with pytest.raises(DataError, match="no teacher collection"):
        fetcher_of(tiny_root, tmp_path / "store", "objective.bn=false", "objective.conv=true",
                   net=("net=convnet", "net.width=8"))


def test_a_kd_evaluation_without_its_teacher_stops_the_run_at_start_up(tiny_root, tmp_path):
    """method=dm with evaluator=kd and no first evaluation: the missing teacher is found before iteration 1 (the
    evaluator's prepare), not after eval_every iterations of distillation."""
    from ddrun.distill import distill

    args = [a for a in tiny_args(tiny_root, tmp_path / "store") if not a.startswith("net")]
    cfg = make_cfg([*args, "method=dm", "ipc=1", "evaluator=kd", "eval_at_start=false", "iterations=50",
                    "eval_every=50", "net=convnet_bn", "net.width=8"])
    with pytest.raises(DataError, match="no teacher collection at .*; create it with `ddrun teacher"):
        distill(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_a_missing_teacher_dir_is_named_as_such(tiny_root, tmp_path):
    with pytest.raises(DataError, match=f"no teacher collection at {tmp_path / 'nowhere'} \\(the folder given as "
                                        r"buffer_dir / teacher_dir\); pass the folder of an existing one, or drop"):
        fetcher_of(tiny_root, tmp_path / "store", f"fetcher.teacher_dir={tmp_path / 'nowhere'}")


def test_missing_teacher_prints_the_command_that_makes_it(tiny_root, tmp_path):
    with pytest.raises(DataError) as err:
        fetcher_of(tiny_root, tmp_path / "store")
    msg = str(err.value)
    cmd = msg[msg.index("`") + 1:msg.rindex("`")]
    assert cmd.startswith("ddrun teacher dataset=mnist net=convnet net.norm=batchnorm net.width=8 recipe=sre2l")
    # the printed command makes exactly the teacher the fetcher wanted
    overrides = [a for a in cmd.split()[2:]] + ["dataset.system_dirs=[]", "recipe.epochs=1", "recipe.batch=32"]
    from ddrun.teachers import teacher

    teacher(make_cfg(overrides, "teacher"))
    fetcher, _ = fetcher_of(tiny_root, tmp_path / "store")
    assert fetcher.fetch(0).info["arch"] == "net"


def test_teacher_of_another_setting_is_refused_saying_what_differs(tiny_root, tmp_path):
    out = make_teacher(tiny_root, tmp_path / "store")
    with pytest.raises(DataError, match=r"dataset.mean: \[0.1307\] in the teacher collection, \[0.5\] in this run"):
        fetcher_of(tiny_root, tmp_path / "store", "dataset.mean=[0.5]")
    with pytest.raises(DataError, match=r"net.width: 8 in the teacher collection, 16 in this run"):
        fetcher_of(tiny_root, tmp_path / "store", net=("net=convnet_bn", "net.width=16"))
    with pytest.raises(DataError, match=r"net.class: ddrun.nets.convnet.ConvNet in the teacher collection, "
                                        r"ddrun.nets.resnet.ResNet18 in this run"):
        fetcher_of(tiny_root, tmp_path / "store", f"fetcher.teacher_dir={out['dir']}", net=("net=resnet18_bn",))


def test_rded_initializer_contract(tiny_root, tmp_path):
    make_teacher(tiny_root, tmp_path / "store")
    cfg = make_cfg([*tiny_args(tiny_root, tmp_path / "store"), "method=rded", "init.mipc=10", "init.num_crop=2",
                    "init.factor=2"])
    real = build(cfg.dataset)
    syn = build(cfg.init)(real, 2, torch.Generator().manual_seed(0))
    assert syn.images.shape == (20, 1, 28, 28) and syn.labels.tolist() == sorted(list(range(10)) * 2)
    with pytest.raises(ConfigError, match="fewer than ipc \\* factor\\^2 = 16"):
        build(cfg.init)(real, 4, torch.Generator().manual_seed(0))


def test_teacher_shards_via_the_command_line(tiny_root, tmp_path):
    args = [*tiny_args(tiny_root, tmp_path / "store"), "recipe.epochs=1", "recipe.batch=32"]
    r = ddrun_process("teacher", "-m", "teacher_offset=0,1", *args, f"hydra.sweep.dir={tmp_path}/sweep")
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads(next((tmp_path / "store").glob("teachers/*/*/*/manifest.json")).read_text())
    assert sorted(m["teachers"]) == ["0", "1"]
    assert "2 teachers" in r.stdout.splitlines()[-1]
