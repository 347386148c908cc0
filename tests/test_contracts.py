"""Every registered component satisfies its contract (``ddrun.contracts``), built from every config file of its
group; the post-distillation stages run once and resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import ddrun.conf
from conftest import SAME_S, assert_same_s, make_cfg
from ddrun.contracts import Evaluator, Fetched, Fetcher, Initializer, Objective, Parametrization
from ddrun.distill import distill
from ddrun.protocol import describe
from ddrun.schedule import Schedule
from ddrun.synthetic import SyntheticSet
from ddrun.utils import build

CONF = Path(ddrun.conf.__file__).parent


def choices(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def tiny(root, *extra):
    return make_cfg(["dataset=mnist", f"paths.data={root}", "dataset.system_dirs=[]", "ipc=2", "net.width=8",
                     "debug=smoke", "logger=none", *extra])


@pytest.fixture
def tiny_real(tiny_root):
    return build(tiny(tiny_root).dataset)


# components that read a store (trained teachers, expert buffers) are checked against a real one in
# tests/test_teacher.py (rded, teachers), test_checkpoint_fetcher_contract below, tests/test_datm.py
# (expert_correct) and tests/test_dd_modes.py (pretrained)
NEEDS_STORE = {"init": {"rded", "expert_correct"}, "fetcher": {"checkpoints", "teachers", "pretrained"}}


@pytest.mark.parametrize("name", [c for c in choices("init") if c not in NEEDS_STORE["init"]])
def test_initializers(tiny_root, tiny_real, name):
    init = build(tiny(tiny_root, f"init={name}").init)
    assert isinstance(init, Initializer)
    syn = init(tiny_real, 2, torch.Generator().manual_seed(0))
    assert isinstance(syn, SyntheticSet) and syn.images.shape == (20, 1, 28, 28)
    assert syn.labels.tolist() == sorted(list(range(10)) * 2)


@pytest.mark.parametrize("name", [c for c in choices("fetcher") if c not in NEEDS_STORE["fetcher"]])
def test_fetchers(tiny_root, tiny_real, name):
    fetcher = build(tiny(tiny_root, f"fetcher={name}").fetcher)(real=tiny_real, device=torch.device("cpu"), seed=0)
    assert isinstance(fetcher, Fetcher)
    f0, f1 = fetcher.fetch(0), fetcher.fetch(1)
    assert all(isinstance(f, Fetched) and isinstance(f.net, torch.nn.Module) for f in (f0, f1))
    assert f0.net(tiny_real.train_images[:2]).shape == (2, 10)
    held = fetcher.held_out(0)
    assert isinstance(held, torch.nn.Module)
    assert isinstance(fetcher.state_dict(), dict)
    fetcher.load_state_dict(fetcher.state_dict())


def test_checkpoint_fetcher_contract(tiny_root, tmp_path, tiny_real):
    from ddrun.buffers import buffer

    args = ["dataset=mnist", f"paths.data={tiny_root}", "dataset.system_dirs=[]", "net.width=8",
            f"paths.buffers={tmp_path}/buffers", "dataset.train_subset=50"]  # debug=smoke's subset
    buffer(make_cfg([*args, "num_experts=1", "train_epochs=2", "batch_train=32"], "buffer"))
    cfg = tiny(tiny_root, "method=mtt", f"paths.buffers={tmp_path}/buffers", "fetcher.max_start_epoch=1",
               "fetcher.expert_epochs=1")
    fetcher = build(cfg.fetcher)(real=tiny_real, device=torch.device("cpu"), seed=0)
    f = fetcher.fetch(3)
    assert isinstance(fetcher, Fetcher) and f.start is not None and f.target is not None
    assert set(f.start) == set(f.target) == {n for n, _ in f.net.named_parameters()}
    assert all(torch.equal(p, f.start[n]) for n, p in f.net.named_parameters())
    assert f.info == {"expert": 0, "start_epoch": 0}


EXTRA = {"dd": ["objective.syn_steps=2"]}  # DD splits S into syn_steps batches: 2 divides ipc 2


@pytest.mark.parametrize("name", choices("objective"))
def test_objectives(tiny_root, tiny_real, name):
    obj = build(tiny(tiny_root, f"objective={name}", "objective.batch_real=2", *EXTRA.get(name, [])).objective)
    assert isinstance(obj, Objective) and obj.lr_img > 0
    syn = SyntheticSet(tiny_real.train_images[::6][:20].clone(), torch.arange(10).repeat_interleave(2), 10)
    obj.prepare(syn, tiny_real)
    groups = obj.param_groups(syn)
    assert groups[0]["name"] == "images" and all(g["lr"] > 0 for g in groups)
    assert isinstance(obj.state_dict(), dict) and obj.accepts(torch.tensor(1.0)) in (True, False)


@pytest.mark.parametrize("name", choices("evaluator"))
def test_evaluators(tiny_root, name):
    ev = build(tiny(tiny_root, f"evaluator={name}").evaluator)
    assert isinstance(ev, Evaluator) and isinstance(ev.uses_learned_lr, bool) and ev.num_eval >= 0
    fields = ev.protocol_fields()
    for key in ("evaluator", "archs", "num_eval", "epochs", "optimizer", "lr", "augment", "learned_lr", "labels"):
        assert key in fields, key
    assert ev.protocol() == describe(fields)


@pytest.mark.parametrize("name", choices("parametrization"))
def test_parametrizations(tiny_root, name):
    param = build(tiny(tiny_root, f"parametrization={name}").parametrization)
    assert isinstance(param, Parametrization)
    syn = SyntheticSet(torch.randn(4, 1, 28, 28), torch.tensor([0, 0, 1, 1]), 2)
    d = param.describe(syn)
    assert d["stored_images"] == 4 and d["decoded_images"] >= 4
    assert param.decode(syn).images.shape[1:] == syn.images.shape[1:]


@pytest.mark.parametrize("name", choices("schedule"))
def test_schedules(tiny_root, name):
    schedule = build(tiny(tiny_root, f"schedule={name}").schedule)
    assert isinstance(schedule, Schedule) and schedule.steps >= 1


@pytest.mark.parametrize("name", choices("syn_scheduler"))
def test_syn_schedulers(tiny_root, name):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build(tiny(tiny_root, f"syn_scheduler={name}", "iterations=10").syn_scheduler)(opt)
    assert isinstance(sched, torch.optim.lr_scheduler.LRScheduler)
    for _ in range(10):
        opt.step()
        sched.step()
    assert 0 <= opt.param_groups[0]["lr"] <= 1.0
    opt.load_state_dict(opt.state_dict())
    sched.load_state_dict(sched.state_dict())  # resumable: its state goes into checkpoint.pt


def test_cosine_schedule_values():
    from ddrun.schedule import cosine_lr

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = cosine_lr(opt, total=4, final=0.1)
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(6):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(2.0) and lrs[2] == pytest.approx(2.0 * (0.1 + 0.9 * 0.5))
    assert lrs[4] == pytest.approx(0.2) and lrs[6] == pytest.approx(0.2)


@pytest.mark.parametrize("overrides,message", [
    (["syn_scheduler=step", "syn_scheduler.step_size=0"], r"^syn_scheduler\.step_size=0: must be >= 1"),
    (["syn_scheduler=step", "syn_scheduler.step_size=-3"], r"^syn_scheduler\.step_size=-3: must be >= 1"),
    (["syn_scheduler=step", "syn_scheduler.step_size=2.5"], r"^syn_scheduler\.step_size=2\.5: must be a whole"),
    (["syn_scheduler=step", "syn_scheduler.gamma=-1"], r"^syn_scheduler\.gamma=-1: must be in \(0, 1\]"),
    (["syn_scheduler=step", "syn_scheduler.gamma=0"], r"^syn_scheduler\.gamma=0: must be in \(0, 1\]"),
    (["syn_scheduler=step", "syn_scheduler.gamma=abc"], r"^syn_scheduler\.gamma=abc: must be a number$"),
    (["syn_scheduler=cosine", "syn_scheduler.final=abc"], r"^syn_scheduler\.final=abc: must be a number$"),
    (["syn_scheduler=cosine", "syn_scheduler.total=x"], r"^syn_scheduler\.total=x: must be a whole number$"),
])
def test_bad_syn_scheduler_values_are_one_line(tiny_root, overrides, message):
    """A zero step (ZeroDivisionError once), a word where a number goes (ValueError once) and a negative decay
    factor (once accepted: it turned S's step size negative, gradient ascent) are refused in one line."""
    from ddrun.utils import ConfigError

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ConfigError, match=message):
        build(tiny(tiny_root, *overrides, "iterations=10").syn_scheduler)(opt)


def test_step_schedule_is_steplr_and_hashes_as_before(tiny_root):
    """syn_scheduler=step builds torch's StepLR itself (checkpoint.pt keeps StepLR's state_dict) and a DD config
    hashes as it did when step.yaml named StepLR directly (its checkpoints resume, its seeds pool)."""
    from ddrun.distill import config_hash, setting_hash
    from omegaconf import OmegaConf

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    cfg = make_cfg(["method=dd", "dataset=mnist", f"paths.data={tiny_root}", "ipc=1", "syn_scheduler.step_size=2"])
    sched = build(cfg.syn_scheduler)(opt)
    assert type(sched) is torch.optim.lr_scheduler.StepLR and sched.state_dict()["gamma"] == 0.5
    for _ in range(4):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.25)
    old = OmegaConf.create(OmegaConf.to_container(cfg))
    old.syn_scheduler._target_ = "torch.optim.lr_scheduler.StepLR"
    assert config_hash(old) == config_hash(cfg) and setting_hash(old) == setting_hash(cfg)
    old.syn_scheduler.gamma = 0.25  # a real difference still counts
    assert config_hash(old) != config_hash(cfg)


def _stages(marker=None):
    extra = [] if marker is None else [f"+stages.scale.fail_marker={marker}"]
    return ["+stages.shift._target_=stage_fixtures.Shift", "+stages.shift.value=1.0",
            "+stages.scale._target_=stage_fixtures.ScaleOnce", "+stages.scale.factor=2.0", *extra]


def test_post_distillation_stages_run_once_and_resume(tiny_root, tmp_path):
    base = ["method=dm", "iterations=2", "evaluator.num_eval=0", *SAME_S]
    plain = distill(tiny(tiny_root, *base), tmp_path / "plain")
    staged = distill(tiny(tiny_root, *base, *_stages()), tmp_path / "staged")
    s0 = torch.load(plain["synthetic"], weights_only=True)["images"]
    s1 = torch.load(staged["synthetic"], weights_only=True)["images"]
    assert torch.allclose(s1, (s0 + 1.0) * 2.0)
    # killed inside the second stage: the rerun applies the first stage once, not twice
    with pytest.raises(KeyboardInterrupt):
        distill(tiny(tiny_root, *base, *_stages(tmp_path / "killed")), tmp_path / "resumed")
    resumed = distill(tiny(tiny_root, *base, *_stages(tmp_path / "killed")), tmp_path / "resumed")
    assert_same_s(torch.load(resumed["synthetic"], weights_only=True)["images"], s1)
