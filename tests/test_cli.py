"""The command line as a user meets it: help, unknown choices and bad values get clear one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ddrun_here, ddrun_process
from formats import write_mnist_like


def test_help_lists_commands_without_importing_torch():
    code = "import sys; from ddrun.cli import main; main(['--help']); assert 'torch' not in sys.modules"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "distill" in out.stdout and "usage: ddrun" in out.stdout


def test_no_command_imports_torchvision_before_its_config_is_checked():
    # torchvision's import takes seconds (its ops import torch._dynamo): a command that stops at a bad value, and
    # tab completion, should not wait for it. Datasets, the torchvision nets and image grids import it when used.
    from ddrun.cli import COMMANDS

    modules = [module for module, _ in COMMANDS.values()]
    code = f"import sys, importlib; [importlib.import_module(m) for m in {modules!r}]; print(sorted(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "'torch'" in out.stdout and "torchvision" not in out.stdout


def test_unknown_command_lists_commands():
    r = ddrun_process("distil")
    assert r.returncode == 2 and "unknown command 'distil'" in r.stderr and "distill" in r.stderr


@pytest.mark.parametrize("command,args,line", [
    ("distill", ["method=nope"], "method=nope: no such choice; valid: datm, dc, dd, dm, dsa, "),
    ("distill", ["-m", "method=dm,dcc", "ipc=1,10"], "method=dcc: no such choice; valid: datm, dc, dd, dm, dsa, "),
    ("distill", ["hydra/launcher=slurmm"], "hydra/launcher=slurmm: no such choice; valid: basic, local, slurm, "),
    ("evaluate", ["net@evaluator.student=resnet"], "net@evaluator.student=resnet: no such choice; valid: "),
    ("teacher", ["dataset=fmnist"], "dataset=fmnist: no such choice; valid: cifar10, cifar100, fashion_mnist, "),
    ("evaluate", ["debug=smoke"], "debug=smoke: this command has no 'debug' group (its groups: augment, dataset, "),
    ("teacher", ["logger=none"], "logger=none: this command has no 'logger' group (its groups: dataset, net, "),
])
def test_unknown_group_choice_is_one_line_listing_the_valid_ones(tmp_path, command, args, line):
    r = ddrun_here(command, *args, f"hydra.run.dir={tmp_path / 'run'}", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert r.returncode == 1 and r.stderr.startswith(f"ddrun {command}: error: {line}"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


@pytest.mark.parametrize("args,message", [
    (["ipc=0"], "ipc=0: must be >= 1"),
    (["iterations=-1"], "iterations=-1: must be >= 0"),
    (["dataset.zca=yes"], "dataset.zca=yes: valid values are true, false"),
    (["method=dc", "ipc=7"], "schedule.outer_loop is not set: method=dc has no value for ipc=7 in its table "
                             "preset.loops (it defines ipc 1, 10, 20, 30, 40, 50); pass schedule.outer_loop=N"),
    (["method=dd", "ipc=7"], "objective.syn_steps is not set: method=dd has no value for ipc=7 in its table "
                             "preset.syn_steps (it defines ipc 1, 10, 50); pass objective.syn_steps=N"),
    (["method=herding", "iterations=5"], "method=herding is a baseline (ipc real images chosen by init=herding, "
                                         "not optimized): it takes iterations=0, not 5; to distill from that "
                                         "initialization use `init=herding method=dm`"),
    (["method=herding", "init=noise"], "method=herding is S = the images init=herding selects; with init=noise it "
                                       "would be recorded as herding: drop the init override"),
    (["method=herding", "objective=dm"], "method=herding selects no fetcher (S is ipc real images chosen by "
                                         "init=herding, not optimized), so the objective has no network; to "
                                         "distill from that initialization use `init=herding method=dm`"),
    # the schedule of S's step sizes is checked before the (slow) data load, not when S's optimizer exists
    (["syn_scheduler=step", "syn_scheduler.gamma=2"], "syn_scheduler.gamma=2: must be in (0, 1]"),
    (["syn_scheduler=cosine", "syn_scheduler.total=0"], "syn_scheduler.total=0: must be >= 1"),
    (["syn_scheduler=step", "~syn_scheduler.step_size", "~syn_scheduler.gamma", "+syn_scheduler.start_factor=2",
      "syn_scheduler._target_=torch.optim.lr_scheduler.LinearLR"],
     "syn_scheduler (torch.optim.lr_scheduler.LinearLR): ValueError: Starting multiplicative factor expected"),
    # the replay's theta_0 must be one the run's fetcher gives (once: a silent replay from a network S never saw,
    # or an AttributeError at the first evaluation)
    (["method=dd", "ipc=1", "evaluator.init=fixed"], "evaluator.init=fixed replays S's steps from the one fixed "
     "theta_0 of fetcher=fixed, but S is distilled with RandomFetcher, not for that network: pass "
     "evaluator.init=random, or distill with fetcher=fixed"),
    (["method=dd", "ipc=1", "evaluator.init=pretrained", "fetcher=fixed"], "evaluator.init=pretrained replays S's "
     "steps from the held-out networks of fetcher=pretrained's pool, but S is distilled with FixedFetcher"),
    # a replay of a set without DD's steps (once refused only at the first evaluation, after the distillation)
    (["method=dm", "ipc=1", "evaluator=replay"], "evaluator: evaluator=replay evaluates DD sets only (method=dd or "
     "method=ld, whose S holds DD's per-step step sizes); this run's objective (DistributionMatching) stores none"),
])
def test_bad_values_fail_before_work(tmp_path, args, message):
    r = ddrun_here("distill", *args, f"hydra.run.dir={tmp_path}/run", "logger=none", f"paths.data={tmp_path}/none")
    assert r.returncode == 1
    assert message in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_missing_dataset_names_path_without_traceback(tmp_path):
    r = ddrun_here("distill", "dataset=mnist", f"paths.data={tmp_path}/nowhere", f"hydra.run.dir={tmp_path}/run",
                   "logger=none")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"files not found at {tmp_path}/nowhere/MNIST/raw" in r.stderr and "dataset.download=true" in r.stderr


def test_corrupt_dataset_file_named(tmp_path):
    raw = write_mnist_like(tmp_path, "MNIST", n_train=4, n_test=2)
    (raw / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08")
    r = ddrun_here("distill", "dataset=mnist", f"paths.data={tmp_path}", f"hydra.run.dir={tmp_path}/run",
                   "logger=none")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "corrupt or truncated file" in r.stderr and "train-labels-idx1-ubyte" in r.stderr


def test_tab_completion_script():
    r = ddrun_process("distill", "-sc", "install=bash")
    assert r.returncode == 0 and "complete" in r.stdout and "hydra_bash_completion" in r.stdout


def test_tab_completion_query_completes_groups_and_commands():
    import os

    env = {**os.environ, "COMP_LINE": "ddrun distill method=d", "COMP_POINT": "22"}
    r = ddrun_process("-sc", "query=bash", env=env)
    import ddrun.conf

    method_dir = os.path.join(os.path.dirname(ddrun.conf.__file__), "method")
    expected = {f"method={f[:-5]}" for f in os.listdir(method_dir) if f.startswith("d") and f.endswith(".yaml")}
    assert {"method=dc", "method=dm", "method=dsa"} <= expected
    assert set(r.stdout.split()) == expected
    env.update(COMP_LINE="ddrun dis", COMP_POINT="9")
    r = ddrun_process("-sc", "query=bash", env=env)
    assert r.stdout.split() == ["distill"]


def test_multirun_sweep_runs_every_point(tmp_path):
    write_mnist_like(tmp_path, "MNIST", n_train=4, n_test=2)
    r = ddrun_process("distill", "-m", "method=dm,dsa", "ipc=1,2", "schedule.outer_loop=1", "schedule.inner_loop=1",
                      "dataset=mnist", f"paths.data={tmp_path}", "dataset.system_dirs=[]", "debug=smoke",
                      "net.width=8", "logger=none", "iterations=1", "eval_every=1", f"hydra.sweep.dir={tmp_path}/sweep")
    assert r.returncode == 0, r.stderr[-2000:]
    runs = sorted(p.name for p in (tmp_path / "sweep").iterdir() if (p / "synthetic.pt").is_file())
    assert runs == ["0_dm_mnist_ipc1_seed0", "1_dm_mnist_ipc2_seed0", "2_dsa_mnist_ipc1_seed0",
                    "3_dsa_mnist_ipc2_seed0"]


def test_a_relabel_stage_without_its_teacher_is_one_line_with_the_teacher_command(tmp_path):
    """``+stage@stages.relabel=relabel`` (a group appended at a package) is accepted by the pre-Hydra checks, and
    the missing teacher stops the run at start-up, before any iteration, printing the command that trains it."""
    write_mnist_like(tmp_path, "MNIST", n_train=20, n_test=10)
    r = ddrun_here("distill", "dataset=mnist", "method=dm", "ipc=1", "iterations=3", "+stage@stages.relabel=relabel",
                   f"paths.data={tmp_path}", "dataset.system_dirs=[]", f"paths.buffers={tmp_path}/store",
                   f"hydra.run.dir={tmp_path}/run", "logger=none")
    assert r.returncode == 1 and "Traceback" not in r.stderr and "no 'stage' group" not in r.stderr, r.stderr
    assert "stages.relabel: no teacher collection at" in r.stderr and "`ddrun teacher dataset=mnist" in r.stderr
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_an_in_process_run_says_what_the_ddrun_process_says(tmp_path):
    """``conftest.ddrun_here`` (the checks that stop before work run in the test's process) against a real
    ``ddrun`` process on the same command line: the same exit status, stderr and (empty) stdout."""
    args = ["distill", "method=dc", "ipc=7", f"hydra.run.dir={tmp_path}/run", "logger=none",
            f"paths.data={tmp_path}/none"]
    here, there = ddrun_here(*args), ddrun_process(*args)
    assert there.returncode == 1 and "schedule.outer_loop is not set" in there.stderr
    assert (here.returncode, here.stderr, here.stdout) == (there.returncode, there.stderr, there.stdout)
