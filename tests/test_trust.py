"""Results a researcher can trust: nothing foreign is executed, concurrent first runs share the data folder, reruns
never rewrite a run's provenance or relabel its result, every knob is checked before work, outside sets are checked,
Ctrl-C stops cleanly, buffer jobs share experts, and logs show progress without a terminal."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from conftest import ddrun_here, ddrun_process, make_cfg
from formats import write_mnist_like
from ddrun.distill import distill
from ddrun.evaluate import evaluate_cmd
from ddrun.utils import ConfigError, DataError

TINY = ["dataset=mnist", "dataset.system_dirs=[]", "net.width=8", "logger=none", "dataset.train_subset=12",
        "dataset.test_subset=4", "objective.batch_real=4", "evaluator.num_eval=1", "evaluator.epochs=2"]


def tiny_cli(root, run, *extra) -> list[str]:
    return ["distill", "method=dm", "ipc=2", f"paths.data={root}", *TINY, "iterations=2", "eval_every=2",
            f"hydra.run.dir={run}", *extra]


# ---------------------------------------------------------------------------------------------------------------
# safe loads


def test_a_crafted_checkpoint_executes_nothing(tiny_root, tmp_path):
    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    run = tmp_path / "run"
    run.mkdir()
    torch.save({"iteration": 1, "syn": Payload()}, run / "checkpoint.pt")
    r = ddrun_here(*tiny_cli(tiny_root, run))
    assert not marker.exists()
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "holds pickled objects, which ddrun never executes" in r.stderr and "corrupt" not in r.stderr.lower()


def test_unreadable_checkpoints_print_a_way_to_start_over_that_works(tiny_root, tmp_path):
    """Both checkpoints damaged: one line naming them and the overrides that start over; those overrides do (the
    damaged run is moved to archive/, not deleted)."""
    run = tmp_path / "run"
    assert ddrun_here(*tiny_cli(tiny_root, run, "checkpoint_every=1")).returncode == 0
    for p in (run / "checkpoint.pt", run / "checkpoint.prev.pt"):
        p.write_bytes(p.read_bytes()[:40])
    (run / "synthetic.pt").unlink()  # as if killed before the end
    r = ddrun_here(*tiny_cli(tiny_root, run, "checkpoint_every=1"))
    errors = [line for line in r.stderr.splitlines() if line.startswith("ddrun distill: error:")]
    assert r.returncode == 1 and "Traceback" not in r.stderr and len(errors) == 1, r.stderr[-2000:]
    assert f"no readable checkpoint: {run / 'checkpoint.pt'}" in errors[0] and "(RuntimeError: " in errors[0]
    hint = re.search(r"pass (resume=false overwrite=true)", errors[0]).group(1).split()
    r = ddrun_here(*tiny_cli(tiny_root, run, "checkpoint_every=1"), *hint)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (run / "synthetic.pt").is_file() and list((run / "archive").glob("*/checkpoint.pt"))


def test_a_pickle_given_to_evaluate_is_refused_as_such(tiny_root, tmp_path):
    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"images": Payload(), "labels": torch.zeros(2)}, tmp_path / "s.pt")
    with pytest.raises(DataError, match="refused synthetic set .* holds pickled objects") as err:
        evaluate_cmd(make_cfg([f"paths.data={tiny_root}", *TINY[:3], f"synthetic={tmp_path / 's.pt'}"], "evaluate"))
    assert not marker.exists() and "weights_only=False" not in str(err.value)
    # random bytes are a damaged file, not a crafted one
    (tmp_path / "garbage.pt").write_bytes(torch.randint(0, 256, (2000,), dtype=torch.uint8,
                                                        generator=torch.Generator().manual_seed(0)).numpy().tobytes())
    with pytest.raises(DataError, match=f"corrupt or truncated synthetic set {tmp_path / 'garbage.pt'}") as err:
        evaluate_cmd(make_cfg([f"paths.data={tiny_root}", *TINY[:3], f"synthetic={tmp_path / 'garbage.pt'}"],
                              "evaluate"))
    assert "pickled objects" not in str(err.value)


# ---------------------------------------------------------------------------------------------------------------
# concurrent first runs


def system_dir(tmp_path: Path, n_train: int, n_test: int) -> Path:
    """A folder holding only the four .gz IDX files, as Debian's dataset packages install them."""
    system = tmp_path / "system"
    raw = write_mnist_like(tmp_path / "src", "MNIST", n_train=n_train, n_test=n_test, gz=True)
    system.mkdir()
    for f in raw.glob("*.gz"):
        f.rename(system / f.name)
    return system


def test_eight_concurrent_first_runs_share_an_empty_data_folder(tmp_path):
    system = system_dir(tmp_path, 20, 5)
    (tmp_path / "data").mkdir()
    # eight processes forked after the imports (one interpreter's torch import instead of eight), so that they
    # reach the empty folder within milliseconds of each other; each writes what it loaded in one write() to the
    # pipe (print's several writes interleaved between the children)
    code = textwrap.dedent(f"""
        import os, sys, traceback
        from ddrun.data.datasets import idx_format
        pids = []
        for _ in range(8):
            pid = os.fork()
            if pid == 0:
                try:
                    d = idx_format("mnist", "MNIST", {str(tmp_path / 'data')!r}, [0.13], [0.31],
                                   system_dirs=[{str(system)!r}])
                    os.write(1, f"{{len(d.train_labels)}} {{len(d.test_labels)}}\\n".encode())  # one write: atomic
                    os._exit(0)
                except BaseException:
                    traceback.print_exc()
                    sys.stderr.flush()
                    os._exit(1)
            pids.append(pid)
        sys.exit(max(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n") == ["200 50"] * 8 + [""]
    assert not list((tmp_path / "data").rglob("*.tmp*"))


def test_a_mistyped_absolute_data_root_is_not_created(tmp_path):
    system = system_dir(tmp_path, 2, 1)
    from ddrun.data.datasets import idx_format

    with pytest.raises(DataError, match=f"paths.data={tmp_path / 'nonexistent'} does not exist"):
        idx_format("mnist", "MNIST", str(tmp_path / "nonexistent"), [0.1], [0.3], system_dirs=[str(system)])
    assert not (tmp_path / "nonexistent").exists()


# ---------------------------------------------------------------------------------------------------------------
# provenance


def _snapshot(run: Path) -> dict[str, str]:
    return {str(p.relative_to(run)): p.read_bytes().hex() for p in sorted(run.rglob("*"))
            if p.is_file() and p.suffix != ".log"}


def test_a_refused_rerun_changes_nothing_and_names_what_differs(tiny_root, tmp_path):
    run = tmp_path / "run"
    assert ddrun_here(*tiny_cli(tiny_root, run)).returncode == 0
    before = _snapshot(run)
    r = ddrun_here(*tiny_cli(tiny_root, run, "objective.lr_img=5", "seed=3"))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "another configuration (objective.lr_img: 1.0 -> 5; seed: 0 -> 3)" in r.stderr
    assert _snapshot(run) == before  # .hydra, metrics, record, checkpoint: all as they were
    r = ddrun_here(*tiny_cli(tiny_root, run, "resume=false"))
    assert r.returncode == 1 and "holds a run and resume=false: pass overwrite=true" in r.stderr
    assert _snapshot(run) == before


def test_overwrite_archives_and_metrics_never_hold_two_runs(tiny_root, tmp_path):
    run = tmp_path / "run"
    assert ddrun_here(*tiny_cli(tiny_root, run)).returncode == 0
    first = (run / "metrics.jsonl").read_text()
    assert ddrun_here(*tiny_cli(tiny_root, run, "resume=false", "overwrite=true", "seed=1")).returncode == 0
    archived = list((run / "archive").glob("*/metrics.jsonl"))
    assert len(archived) == 1 and archived[0].read_text() == first
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows if "acc_mean" in r] == [0, 2]  # one run: its own evaluations only


def test_a_finished_run_rerun_with_another_evaluator_is_evaluated_again_not_relabelled(tiny_root, tmp_path):
    run = tmp_path / "run"
    assert ddrun_here(*tiny_cli(tiny_root, run)).returncode == 0
    original = (run / ".hydra" / "config.yaml").read_text()
    r = ddrun_here(*tiny_cli(tiny_root, run, "evaluator.epochs=3"))
    assert r.returncode == 0, r.stderr
    rec = json.loads((run / "results.json").read_text())
    assert [e["protocol"]["epochs"] for e in rec["evaluations"]] == [2, 3]
    assert all(f"{e['protocol']['epochs']} epochs" in e["protocol_line"] for e in rec["evaluations"])
    assert (run / ".hydra" / "config.yaml").read_text() == original  # the run's own description stays
    attempts = [json.loads(line) for line in (run / "provenance" / "attempts.jsonl").read_text().splitlines()]
    assert [a["outcome"] for a in attempts] == ["started", "resumed at iteration 2"]
    assert "evaluator.epochs=3" in attempts[1]["overrides"]


# ---------------------------------------------------------------------------------------------------------------
# knobs


@pytest.mark.parametrize("args,message", [
    (["ipc=abc"], "ipc=abc: must be of type int"),
    (["ipc=1.5"], "ipc=1.5: must be of type int"),
    (["seed=abc"], "seed=abc: must be of type int"),
    (["device=tpu"], "device=tpu: valid values are auto, cpu, cuda, cuda:N, mps"),
    (["device=mps"], "device=mps: Apple's MPS is not available"),
    (["checkpoint_every=0"], "checkpoint_every=0: must be >= 1"),
    (["log_every=0"], "log_every=0: must be >= 1"),
    (["dataset.train_subset=0"], "dataset.train_subset=0: must be a whole number >= 1"),
    (["ipc=10", "dataset.train_subset=5"], "dataset.train_subset=5 keeps fewer real images per class than ipc=10"),
    (["evaluator.epochs=-1"], "evaluator.epochs=-1: must be a whole number >= 1"),
    (["+ipcc=3"], "unknown key 'ipcc'; did you mean 'ipc'?"),
    (["+objective.lr_imgg=3"], "objective.lr_imgg: not a setting of ddrun.objectives.distribution."
                               "DistributionMatching; did you mean objective.lr_img?"),
    (["logger.mode=foo"], "logger.mode=foo: valid values are auto, online, offline, disabled"),
])
def test_every_knob_is_checked_before_any_work(tmp_path, args, message):
    r = ddrun_here("distill", *args, f"hydra.run.dir={tmp_path}/run", f"paths.data={tmp_path}/none")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("ddrun distill: error:")]
    assert len(errors) == 1 and message in errors[0], r.stderr[-2000:]
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_a_set_with_nothing_to_learn_is_one_line(tiny_root, tmp_path):
    r = ddrun_here(*tiny_cli(tiny_root, tmp_path / "run", "objective.lr_img=0"))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "ddrun distill: error: nothing in S is learned: objective.lr_img=0" in r.stderr


def test_an_unwritable_run_directory_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    r = ddrun_here("distill", f"hydra.run.dir={blocker}/run")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"cannot write the run directory {blocker}/run" in r.stderr


def test_evaluate_refuses_the_folder_of_another_run(tmp_path):
    """`ddrun evaluate ... hydra.run.dir=<a distill run>` would replace that run's record, metrics and .hydra/: one
    line, and the run's files are as they were."""
    run = tmp_path / "distilled"
    (run / ".hydra").mkdir(parents=True)
    (run / "results.json").write_text(json.dumps({"command": "distill", "method": "dm"}))
    (run / ".hydra" / "overrides.yaml").write_text("- method=dm\n")
    (run / "synthetic.pt").write_bytes(b"S")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    r = ddrun_here("evaluate", f"synthetic={run / 'synthetic.pt'}", f"hydra.run.dir={run}")
    assert r.returncode == 1 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert f"hydra.run.dir={run} holds a ddrun distill run" in r.stderr
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    for command in ("teacher", "export"):  # no other command writes into it either
        r = ddrun_here(command, f"hydra.run.dir={run}")
        assert r.returncode == 1 and f"holds a ddrun distill run: {command} would replace" in r.stderr
    (run / "results.json").unlink()  # a distill still running (no record yet) is refused too
    r = ddrun_here("evaluate", f"synthetic={run / 'synthetic.pt'}", f"hydra.run.dir={run}")
    assert r.returncode == 1 and "holds a ddrun distill run" in r.stderr
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != "results.json"} == \
        {p: b for p, b in before.items() if p.name != "results.json"}
    # an earlier evaluation is not replaced by another one, nor by a distill
    done = tmp_path / "evaluated"
    done.mkdir()
    (done / "results.json").write_text(json.dumps({"command": "evaluate", "method": "dm"}))
    for command in ("evaluate", "distill"):
        r = ddrun_here(command, f"hydra.run.dir={done}")
        assert r.returncode == 1 and f"holds a ddrun evaluate run: {command} would replace" in r.stderr


# ---------------------------------------------------------------------------------------------------------------
# outside sets


def _ev(root, path):
    return make_cfg([f"paths.data={root}", *TINY[:3], f"synthetic={path}"], "evaluate")


@pytest.mark.parametrize("images,labels,message", [
    (torch.full((20, 1, 28, 28), float("nan")), torch.arange(10).repeat(2), "images hold NaN or Inf"),
    (torch.randint(0, 255, (20, 1, 28, 28), dtype=torch.uint8), torch.arange(10).repeat(2),
     "images are torch.uint8; ddrun expects float32 .* normalized space"),
    (torch.randint(0, 255, (20, 1, 28, 28)).float(), torch.arange(10).repeat(2), "far outside the dataset's "
                                                                                   "normalized space"),
    (torch.randn(20, 1, 28, 28), torch.arange(10).repeat(2) - 1, r"hard labels must be int64 \[N\] in \[0, 10\)"),
    (torch.randn(20, 1, 28, 28), torch.arange(10).repeat(2).float(), r"soft labels must be finite float \[N, K\]"),
    (torch.randn(20, 1, 28, 28), torch.arange(10), "20 images but 10 labels"),
    (torch.zeros(0, 1, 28, 28), torch.zeros(0, dtype=torch.long), "must be a non-empty tensor"),
])
def test_outside_sets_are_checked(tiny_root, tmp_path, images, labels, message):
    torch.save({"images": images, "labels": labels}, tmp_path / "s.pt")
    with pytest.raises(ConfigError, match=message):
        evaluate_cmd(_ev(tiny_root, tmp_path / "s.pt"))


# ---------------------------------------------------------------------------------------------------------------
# faults and progress


def test_ctrl_c_is_a_clean_stop_that_resumes(tiny_root, tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    # far more iterations than can run before the signal (a fast machine does hundreds per second here); the child
    # gets Ctrl-C's default action as in a terminal (a shell's background job inherits SIGINT ignored, which ddrun
    # honours by going on)
    proc = subprocess.Popen([sys.executable, "-m", "ddrun.cli", *tiny_cli(tiny_root, run, "iterations=1000000",
                                                                           "eval_every=1000000", "progress_every=0")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.default_int_handler))
    try:
        deadline = time.time() + 120
        while not (run / "checkpoint.pt").exists() and time.time() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 128 + signal.SIGINT, err[-2000:]
    assert "Traceback" not in err and "stopped by SIGINT at iteration" in err
    stopped = int(err.split("stopped by SIGINT at iteration ")[1].split(";")[0].split()[0])
    end = stopped + 5
    r = ddrun_process(*tiny_cli(tiny_root, run, f"iterations={end}", f"eval_every={end}"))
    assert r.returncode == 0 and "resuming from" in r.stderr + r.stdout
    assert f"at iteration {stopped}" in r.stderr + r.stdout


def test_progress_lines_without_a_terminal(tiny_root, tmp_path):
    r = ddrun_process(*tiny_cli(tiny_root, tmp_path / "run", "iterations=6", "eval_every=6", "progress_every=0.01"))
    assert r.returncode == 0
    lines = [line for line in (r.stdout + r.stderr).splitlines() if "distill " in line and " it (" in line]
    assert lines and "it/s" in lines[-1] and "ETA" in lines[-1] and "loss" in lines[-1]


def test_two_buffer_jobs_share_the_experts(tiny_root, tmp_path):
    args = ["buffer", "dataset=mnist", f"paths.data={tiny_root}", "dataset.system_dirs=[]", "net.width=8",
            f"paths.buffers={tmp_path}/buffers", "num_experts=3", "train_epochs=2", "batch_train=32"]
    env = {**os.environ, "WANDB_MODE": "offline"}
    procs = [subprocess.Popen([sys.executable, "-m", "ddrun.cli", *args, f"hydra.run.dir={tmp_path}/b{i}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-1500:] for _, e in outs]
    assert all("Traceback" not in e for _, e in outs)
    trained = [int(re.search(r"\((\d+) trained now", o).group(1)) for o, _ in outs]
    assert sum(trained) == 3  # every expert trained once, by one of the two jobs
    d = next((tmp_path / "buffers").glob("*/*/*/manifest.json")).parent
    assert sorted(json.loads((d / "manifest.json").read_text())["experts"]) == ["0", "1", "2"]
    assert not list(d.glob("*.partial")) and not list(d.glob(".*tmp*"))


def test_image_grid_is_readable_and_says_when_pixels_were_clipped(tiny_root, tmp_path):
    from PIL import Image

    out = distill(make_cfg(["method=dm", "ipc=1", f"paths.data={tiny_root}", *TINY, "iterations=1", "eval_every=1",
                            "objective.lr_img=1000"]), tmp_path / "run")
    png = Image.open(sorted((Path(out["run_dir"]) / "images").glob("*.png"))[-1])
    assert png.height >= 10 * 64  # one row per class, each at least 64 px at ipc 1
    assert 0.0 <= float(png.text["clipped"]) <= 1.0 and "one row per class" in png.text["description"]


# ---------------------------------------------------------------------------------------------------------------
# keep_best


def test_keep_best_keeps_the_s_of_the_best_evaluation_and_the_record_says_how_it_was_chosen(tiny_root, tmp_path):
    """keep_best=true: synthetic_best.pt holds S as it was at the evaluation with the highest accuracy (the same
    images as a run stopped at that iteration), and results.json's best names that iteration, the file and that
    it was selected on the test split; without keep_best no such file is written."""
    from ddrun.synthetic import SyntheticSet

    args = [f"paths.data={tiny_root}", "method=dm", "ipc=2", *TINY, "objective.lr_img=50", "eval_every=1",
            "evaluator.epochs=4"]
    out = distill(make_cfg([*args, "iterations=4", "keep_best=true"]), tmp_path / "run")
    rec = json.loads((tmp_path / "run" / "results.json").read_text())
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    accs = {r["iteration"]: r["acc_mean"] for r in rows if "acc_mean" in r}
    best_it = min(i for i, a in accs.items() if a == max(accs.values()))  # the first evaluation reaching the max
    assert rec["best"]["iteration"] == best_it and rec["best"]["acc_mean"] == accs[best_it]
    assert rec["best"]["selected_on"] == "the evaluator's test split"
    kept = SyntheticSet.load(rec["best"]["synthetic"])
    assert kept.meta["iteration"] == best_it and "best test accuracy" in kept.meta["selected_by"]
    short = distill(make_cfg([*args, f"iterations={best_it}"]), tmp_path / "short")  # S at that iteration
    assert torch.equal(kept.images, SyntheticSet.load(short["synthetic"]).images)
    assert not (tmp_path / "short" / "synthetic_best.pt").exists()
    assert out["synthetic"].endswith("synthetic.pt")


@pytest.mark.parametrize("method, extra, match", [
    ("random", ["ipc=13"], r"ipc=13: class 0 of mnist has only 12 training images, fewer than ipc; pass ipc <= 12"),
    ("dm", ["ipc=13"], r"ipc=13: class 0 of mnist has only 12 training images"),
    ("herding", ["ipc=2", "init.max_candidates=1"], r"init.max_candidates=1 is fewer than ipc=2: .* >= 2$"),
    ("kcenter", ["ipc=2", "init.train_epochs=-1"], r"init.train_epochs=-1: must be >= 0"),
])
def test_a_class_too_small_for_ipc_is_refused_not_stored_with_shifted_labels(tmp_path, method, extra, match):
    """Once S held fewer images than labels (labels shifted against images) and recorded an accuracy under the
    requested ipc; a distillation method ended in an IndexError."""
    write_mnist_like(tmp_path / "data", "MNIST", n_train=12, n_test=4)
    args = ["dataset=mnist", f"paths.data={tmp_path / 'data'}", "dataset.system_dirs=[]", "net.width=8",
            "logger=none", "evaluator.num_eval=1", "evaluator.epochs=1", f"method={method}", *extra]
    with pytest.raises(ConfigError, match=match):
        distill(make_cfg(args + (["iterations=1"] if method == "dm" else [])), tmp_path / "run")
    assert not (tmp_path / "run" / "synthetic.pt").exists()


@pytest.mark.parametrize("method, key, match", [
    ("dm", "objective.batch_real=0", r"objective.batch_real=0: must be >= 1"),
    ("dm", "objective.batch_real=-3", r"objective.batch_real=-3: must be >= 1"),  # once: all but 3 per class
    ("kip", "objective.batch_real=0", r"objective.batch_real=0: must be >= 1"),
    ("dm", "objective.lr_img=-1", r"objective.lr_img=-1: a step size must be >= 0"),
    ("kip", "objective.lr_labels=-0.1", r"objective.lr_labels=-0.1: a step size must be >= 0"),
    ("rfad", "objective.lr_platt=-1", r"objective.lr_platt=-1: a step size must be >= 0"),
    ("kip", "objective.kernel.net_kwargs.width=0", r"objective.kernel.net_kwargs.width=0: must be >= 1"),
    ("kip", "objective.kernel.w_std=-1", r"objective.kernel.w_std=-1: must be >= 0"),
    ("idc", "schedule.lr_net=-1", r"schedule.lr_net=-1: must be > 0"),  # once torch's ValueError traceback
])
def test_objective_knobs_out_of_range_are_one_line_before_any_work(tmp_path, method, key, match):
    """Once tracebacks (batch_real 0, a kernel width 0, a negative std) or silent gradient ascent (a negative
    step size) / all but N images per class (a negative batch_real)."""
    write_mnist_like(tmp_path / "data", "MNIST", n_train=4, n_test=2)
    args = ["dataset=mnist", f"paths.data={tmp_path / 'data'}", "dataset.system_dirs=[]", "logger=none",
            f"method={method}", "ipc=1", "iterations=1", "evaluator.num_eval=0", "beside_protocols=false", key]
    with pytest.raises(ConfigError, match=match):
        distill(make_cfg(args), tmp_path / "run")
    assert not (tmp_path / "run" / "synthetic.pt").exists()
