"""Preemption-safe runs: kill-and-resume equivalence, stop signals, corrupt checkpoints, the run-directory lock,
NaN/Inf, a failing disk and an unreachable W&B, each with its message.

Runs use tiny MNIST-format files (tests/formats.py) and a width-8 ConvNet so that each process takes seconds.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import SAME_S, assert_same_s, make_cfg
from formats import write_mnist_like
from ddrun.checkpoint import RunLock, RunLocked, load_checkpoint, previous_path, save_checkpoint
from ddrun.distill import distill
from ddrun.utils import DataError, DdrunError

ITERATIONS = 16
# DSA with an inner loop: every iteration draws augmentations, a fresh network and trains it on S, so a resume
# that lost any generator, optimizer or RNG state would not end bitwise equal.
BASE = ["method=dsa", "ipc=2", "net.width=8", "schedule.outer_loop=2", "schedule.inner_loop=1",
        "objective.batch_real=4", "dataset=mnist", "dataset.system_dirs=[]", "logger=none", "evaluator.num_eval=0",
        "log_every=1", f"eval_every={ITERATIONS}", "eval_at_start=false", f"iterations={ITERATIONS}",
        "checkpoint_every=3", *SAME_S]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("data")
    write_mnist_like(r, "MNIST", n_train=12, n_test=4)
    return r


def overrides(root, *extra):
    return [*BASE, f"paths.data={root}", *extra]


@pytest.fixture(scope="module")
def reference(root, tmp_path_factory):
    """S of an uninterrupted run (float32 [20, 1, 28, 28])."""
    out = distill(make_cfg(overrides(root)), tmp_path_factory.mktemp("ref") / "run")
    return torch.load(out["synthetic"], weights_only=True)["images"]


def cli(root, run_dir, *extra, **kw) -> subprocess.Popen:
    """``ddrun distill`` as a separate process, with this process's thread count (same float results)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    cmd = [sys.executable, "-m", "ddrun.cli", "distill", *overrides(root, *extra), f"hydra.run.dir={run_dir}"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **kw)


def rows(run_dir) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def wait_for(proc, cond, timeout=600.0):
    t0 = time.monotonic()
    while not cond():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - t0 < timeout, "timed out"
        time.sleep(0.005)


def final_images(run_dir) -> torch.Tensor:
    return torch.load(Path(run_dir) / "synthetic.pt", weights_only=True)["images"]


def test_sigkill_at_random_iterations_then_rerun_gives_the_same_synthetic_set(root, reference, tmp_path):
    """Three SIGKILLs at random iterations of one run directory (no chance to clean up: the lock, temporary files
    and metrics written after the last checkpoint are left behind), then a rerun of the same command finishes with
    S bitwise equal to the uninterrupted run's, and metrics.jsonl holds each iteration exactly once."""
    run = tmp_path / "run"
    kills = sorted(random.Random(5).sample(range(2, ITERATIONS - 2), 3))
    for k in kills:
        proc = cli(root, run)
        wait_for(proc, lambda: len(rows(run)) >= k)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not (run / "synthetic.pt").exists()
        assert (run / ".lock").exists()  # left behind by the dead process
        assert load_checkpoint(run / "checkpoint.pt")["iteration"] <= len(rows(run))
    proc = cli(root, run)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert "taking over the stale lock" in out + err and "resuming from" in out + err
    assert_same_s(final_images(run), reference)
    assert [r["iteration"] for r in rows(run)] == list(range(1, ITERATIONS + 1))
    assert not (run / ".lock").exists() and not list(run.glob(".checkpoint.pt.tmp*"))


def test_stop_signals_save_a_checkpoint_and_stop(root, reference, tmp_path):
    """SIGTERM / SIGUSR1 (what SLURM sends before a timeout or preemption). Between iterations: the run saves the
    state of the next iteration boundary (checkpoint_every is too large to have saved it otherwise) and exits
    128+signum saying how to resume. During a long evaluation: it stops within seconds, the checkpoint saved just
    before the evaluation being current. The last rerun (with a shorter evaluation: evaluator settings do not change
    S) evaluates that iteration and ends with the same S as the uninterrupted run."""
    run = tmp_path / "run"
    slow = ["checkpoint_every=1000", "eval_every=12", "evaluator.num_eval=1", "evaluator.epochs=100000"]
    proc = cli(root, run, *slow)
    wait_for(proc, lambda: len(rows(run)) >= 5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 128 + signal.SIGTERM, err
    stopped = int(err.split("stopped by SIGTERM at iteration ")[1].split(";")[0])
    assert "rerun the same command (same run directory) to resume" in err and "Traceback" not in err
    ckpt = load_checkpoint(run / "checkpoint.pt")
    assert ckpt["iteration"] == stopped >= 5 and len(ckpt["metrics"]) == stopped
    assert not (run / ".lock").exists()

    (run / "images" / "synthetic_000012.png").unlink(missing_ok=True)  # (if the first stop came that late)
    proc = cli(root, run, *slow)
    wait_for(proc, lambda: (run / "images" / "synthetic_000012.png").exists())  # the evaluation at 12 began
    t0 = time.monotonic()
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=600)
    assert time.monotonic() - t0 < 60  # the evaluation itself would take hours
    assert proc.returncode == 128 + signal.SIGUSR1 and "stopped by SIGUSR1 at iteration 12" in err, err
    assert f"resuming from {run}/checkpoint.pt at iteration {stopped}" in out + err
    ckpt = load_checkpoint(run / "checkpoint.pt")
    assert ckpt["iteration"] == 12 and ckpt["evaluated_at"] != 12

    distill(make_cfg(overrides(root, *slow[:-1], "evaluator.epochs=1")), run)
    assert [r["iteration"] for r in rows(run) if "acc_mean" in r] == [12, ITERATIONS]
    assert_same_s(final_images(run), reference)


def test_corrupt_checkpoint_is_reported_and_the_previous_one_used(root, reference, tmp_path, caplog):
    run = tmp_path / "run"
    distill(make_cfg(overrides(root, "iterations=10")), run)
    prev_it = torch.load(previous_path(run / "checkpoint.pt"), weights_only=True)["iteration"]
    data = bytearray((run / "checkpoint.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside the tensor data: torch.load alone would not notice
    (run / "checkpoint.pt").write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="ddrun"):
        distill(make_cfg(overrides(root)), run)
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert f"corrupt checkpoint {run}/checkpoint.pt" in messages
    assert f"resuming from the previous checkpoint {run}/checkpoint.prev.pt (iteration {prev_it})" in messages
    assert_same_s(final_images(run), reference)


def test_no_readable_checkpoint_names_the_files(tmp_path):
    save_checkpoint({"iteration": 3}, tmp_path / "checkpoint.pt")
    save_checkpoint({"iteration": 4}, tmp_path / "checkpoint.pt")
    for p in (tmp_path / "checkpoint.pt", tmp_path / "checkpoint.prev.pt"):
        p.write_bytes(p.read_bytes()[:40])  # truncated
    with pytest.raises(DataError, match="no readable checkpoint: .*checkpoint.pt .*checkpoint.prev.pt"):
        load_checkpoint(tmp_path / "checkpoint.pt")
    assert load_checkpoint(tmp_path / "nothing.pt") is None


def test_second_run_on_one_directory_refuses_and_dead_locks_are_taken_over(root, tmp_path, caplog):
    """The lock of a live process on this host (here a `sleep`) refuses a second run, in process and on the
    command line (one line, no traceback, nothing written); once that process is dead the lock is stale."""
    import socket

    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("the holder's config\n")
    holder = subprocess.Popen(["sleep", "120"])
    (run / ".lock").write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(), "started": "now",
                                           "hydra_files": {"config.yaml": "the holder's config\n"}}))
    try:
        with pytest.raises(RunLocked, match=f"run directory {run} is in use by pid {holder.pid} on "):
            distill(make_cfg(overrides(root, "iterations=2")), run)
        r = cli(root, run, "iterations=2")
        out, err = r.communicate(timeout=600)
        assert r.returncode == 1 and "Traceback" not in err
        assert f"in use by pid {holder.pid}" in err and "use another hydra.run.dir" in err
        # the refused run wrote nothing of its own; Hydra's .hydra/ files of the holder are put back
        assert not (run / "checkpoint.pt").exists() and not (run / "metrics.jsonl").exists()
        assert (run / ".hydra" / "config.yaml").read_text() == "the holder's config\n"
    finally:
        holder.kill()
        holder.wait()
    with caplog.at_level(logging.WARNING, logger="ddrun"):
        distill(make_cfg(overrides(root, "iterations=2")), run)  # dead PID: stale
    assert f"process {holder.pid} is dead" in caplog.text and (run / "synthetic.pt").is_file()


def test_lock_of_another_host_is_stale_without_heartbeat(tmp_path):
    lock = tmp_path / ".lock"
    lock.write_text(json.dumps({"pid": 1, "host": "node-elsewhere", "started": "earlier"}))
    with pytest.raises(RunLocked, match="in use by pid 1 on node-elsewhere"):
        RunLock(tmp_path, stale_after_s=600).acquire()
    os.utime(lock, (time.time() - 3600, time.time() - 3600))
    held = RunLock(tmp_path, stale_after_s=600).acquire()
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    held.release()
    assert not lock.exists()


def test_nan_stops_naming_the_iteration_and_keeps_the_last_good_checkpoint(root, tmp_path):
    run = tmp_path / "run"
    # no normalization layer: an instance norm computed the stable way (cuDNN's) keeps the loss of a huge S finite
    cfg = make_cfg(overrides(root, "method=dm", "net.norm=none", "objective.lr_img=1e30", "checkpoint_every=1",
                             "iterations=20"))
    with pytest.raises(DdrunError, match=r"became .*at iteration \d+; stopped, the last good checkpoint") as exc:
        distill(cfg, run)
    failed = int(str(exc.value).split("at iteration ")[1].split(";")[0])
    ckpt = load_checkpoint(run / "checkpoint.pt")
    assert ckpt["iteration"] <= failed and f"(iteration {ckpt['iteration']})" in str(exc.value)
    assert torch.isfinite(ckpt["syn"]["images"]).all()
    assert not (run / "synthetic.pt").exists() and not (run / ".lock").exists()


def test_failed_checkpoint_write_leaves_the_previous_one_valid(tmp_path):
    """A write that fails with ENOSPC (the temporary file is a link to /dev/full): the error reaches the caller,
    the checkpoint and its predecessor are untouched, and the temporary file is gone."""
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"iteration": 1, "x": torch.zeros(3)}, path)
    save_checkpoint({"iteration": 2, "x": torch.ones(3)}, path)
    tmp = tmp_path / f".checkpoint.pt.tmp{os.getpid()}"
    tmp.symlink_to("/dev/full")
    with pytest.raises(OSError, match="No space left on device"):
        save_checkpoint({"iteration": 3, "x": torch.full((3,), 2.0)}, path)
    assert load_checkpoint(path)["iteration"] == 2 and not tmp.is_symlink()
    assert torch.load(previous_path(path), weights_only=True)["iteration"] == 1


def test_disk_limit_during_a_run_stops_it_and_the_rerun_resumes(root, reference, tmp_path):
    """The run's files may not exceed a size limit (RLIMIT_FSIZE) that the first checkpoint fits in but a later
    one (with the optimizer's momentum) does not: the run stops naming the intact checkpoint, and the rerun without
    the limit resumes from it and ends with the same S."""
    import resource

    run = tmp_path / "run"
    first = distill(make_cfg(overrides(root, "iterations=0")), tmp_path / "probe")
    limit = int(Path(first["run_dir"], "checkpoint.pt").stat().st_size * 1.3)

    def cap():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = cli(root, run, preexec_fn=cap)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 1 and "Traceback" not in err
    assert "could not write the checkpoint of iteration 3 (File too large); stopped, the checkpoint of " \
           f"iteration 0 in {run}/checkpoint.pt is intact" in err  # checkpoint_every=3
    assert load_checkpoint(run / "checkpoint.pt")["iteration"] == 0
    distill(make_cfg(overrides(root)), run)
    assert_same_s(final_images(run), reference)


@pytest.mark.parametrize("env,why", [
    ({"WANDB_BASE_URL": "http://127.0.0.1:9", "WANDB_API_KEY": "x" * 40}, "http://127.0.0.1:9 unreachable"),
    ({"HTTPS_PROXY": "http://127.0.0.1:9", "WANDB_API_KEY": "bad"}, "API key"),
])
def test_wandb_unreachable_or_misconfigured_continues_with_local_logging(root, tmp_path, monkeypatch, caplog,
                                                                        env, why):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = make_cfg(overrides(root, "logger=wandb", "logger.mode=online", "logger.timeout_s=5", "iterations=4"))
    with caplog.at_level(logging.WARNING, logger="ddrun"):
        distill(cfg, tmp_path / "run")
    said = [r.getMessage() for r in caplog.records if "W&B" in r.getMessage()]
    assert len(said) == 1 and why in said[0] and "continuing with local logging only" in said[0], said
    assert [r["iteration"] for r in rows(tmp_path / "run")] == [1, 2, 3, 4]
    assert (tmp_path / "run" / "synthetic.pt").is_file()


def test_resumed_run_continues_the_same_wandb_run(root, tmp_path):
    """The W&B run id is part of the checkpoint: the resumed run logs into the same W&B run (offline here)."""
    run = tmp_path / "run"
    distill(make_cfg(overrides(root, "logger=wandb", "logger.mode=offline", "iterations=2")), run)
    first = load_checkpoint(run / "checkpoint.pt")["wandb_id"]
    distill(make_cfg(overrides(root, "logger=wandb", "logger.mode=offline", "iterations=4")), run)
    assert first and load_checkpoint(run / "checkpoint.pt")["wandb_id"] == first
    runs = sorted((run / "wandb").glob("offline-run-*"))
    # offline-run-<date>_<time>-<id>, W&B adds "-1" when both runs started within the same second
    assert len(runs) == 2 and all(re.fullmatch(rf"offline-run-\d{{8}}_\d{{6}}-{first}(-\d+)?", p.name) for p in runs)
    # `wandb sync` of offline runs sharing an id keeps the last one synced (W&B cannot resume an offline run): the
    # newest holds the whole history, the restored rows (and their image grids) replayed at their own steps
    from wandb_files import history

    newest = history(next(max(runs, key=lambda p: p.stat().st_mtime).glob("run-*.wandb")))
    local = rows(run)
    assert [int(h["_step"]) for h in newest] == [r["iteration"] for r in local] == [1, 2, 3, 4]
    assert [json.loads(h["loss"]) for h in newest] == [r["loss"] for r in local]
    assert [int(h["_step"]) for h in newest if "images/synthetic/path" in h] == [2, 4]
