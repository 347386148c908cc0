"""``ddrun report``: a fixture sweep (run directories as ddrun writes them, with known accuracies) gives the
expected table, CSV and plots; unfinished runs are left out and said so; the published figures come with their
sources."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ddrun.report import load_published, report
from ddrun.utils import DataError

EVAL = {"_target_": "ddrun.evaluators.Evaluator", "name": "convnet", "num_eval": 2, "epochs": 300, "lr": 0.01,
        "momentum": 0.9, "weight_decay": 0.0005, "batch_train": 256, "use_learned_lr": True,
        "augment": {"strategy": "${dataset.dsa_strategy}"}}


def write_run(folder: Path, method: str, ipc: int, seed: int, curve: dict[int, list[float]], iterations: int,
              finished: bool = True, evaluator: dict | None = None) -> Path:
    """A distill run directory as ddrun writes it: .hydra/config.yaml, metrics.jsonl (loss rows and evaluation rows
    with per_net), synthetic.pt when finished."""
    (folder / ".hydra").mkdir(parents=True)
    cfg = {"ipc": ipc, "iterations": iterations, "seed": seed, "preset": {"name": method},
           "dataset": {"name": "fashion_mnist", "dsa_strategy": "color_crop_cutout_flip_scale_rotate"},
           "evaluator": evaluator or EVAL}
    (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    rows = []
    for it, accs in curve.items():
        rows.append({"iteration": it, "loss": 1.0 / (it + 1), "seconds": it * 0.5})
        rows.append({"iteration": it, "acc_mean": sum(accs) / len(accs), "acc_std": 0.0, "per_net": {"convnet": accs}})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if finished:
        (folder / "synthetic.pt").write_bytes(b"")
    return folder


@pytest.fixture
def sweep(tmp_path):
    """2 methods x 2 ipc x 2 seeds (a multirun folder: numbered job subfolders), one unfinished job, one loose file."""
    root = tmp_path / "multirun" / "2026-01-01_00-00-00"
    n = 0
    accs = {  # (method, ipc, seed) -> the two networks' final accuracies
        ("dm", 1, 0): [40.0, 42.0], ("dm", 1, 1): [44.0, 46.0], ("dm", 10, 0): [70.0, 70.0], ("dm", 10, 1): [72.0, 74.0],
        ("random", 1, 0): [30.0, 30.0], ("random", 1, 1): [33.0, 35.0], ("random", 10, 0): [60.0, 62.0],
        ("random", 10, 1): [64.0, 66.0]}
    for (method, ipc, seed), final in accs.items():
        iterations = 0 if method == "random" else 20
        curve = {0: final} if method == "random" else {0: [20.0, 22.0], 10: [30.0 + seed, 31.0], 20: final}
        write_run(root / f"{n}_{method}_fashion_mnist_ipc{ipc}_seed{seed}", method, ipc, seed, curve, iterations)
        n += 1
    write_run(root / f"{n}_dm_fashion_mnist_ipc1_seed2", "dm", 1, 2, {0: [20.0, 20.0], 10: [25.0, 25.0]}, 20,
              finished=False)
    (root / "multirun.yaml").write_text("hydra: {}\n")
    return root


def test_fixture_sweep_gives_the_expected_table(sweep, tmp_path):
    res = report([str(sweep)], out=str(tmp_path / "rep"))
    lines = res["table"].splitlines()
    assert lines[0] == "| dataset | ipc | method | arch | accuracy % (mean ± std over seeds) | n | seeds |"
    # each run contributes the mean of its 2 networks; mean ± population std over the 2 seeds
    assert lines[2:6] == [
        "| fashion_mnist | 1 | random | convnet | 32.00 ± 2.00 ^1 | 2 | 0,1 |",
        "| fashion_mnist | 1 | dm | convnet | 43.00 ± 2.00 ^1 | 2 | 0,1 |",
        "| fashion_mnist | 10 | random | convnet | 63.00 ± 2.00 ^1 | 2 | 0,1 |",
        "| fashion_mnist | 10 | dm | convnet | 71.50 ± 1.50 ^1 | 2 | 0,1 |"]
    assert lines[6] == "" and lines[7].startswith("^1 evaluation protocol: convnet x2 nets, 300 epochs, SGD lr 0.01")
    assert "aug color_crop_cutout_flip_scale_rotate" in lines[7]
    assert [p.name for p in res["unfinished"]] == ["8_dm_fashion_mnist_ipc1_seed2"]
    with open(tmp_path / "rep" / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], r["ipc"], float(r["acc_mean"]), float(r["acc_std"]), r["seeds"]) for r in rows] == [
        ("random", "1", 32.0, 2.0, "0 1"), ("dm", "1", 43.0, 2.0, "0 1"), ("random", "10", 63.0, 2.0, "0 1"),
        ("dm", "10", 71.5, 1.5, "0 1")]
    for png in ("acc_vs_iteration.png", "acc_vs_ipc.png"):
        data = (tmp_path / "rep" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_pool_over_networks(sweep, tmp_path):
    res = report([str(sweep)], out=str(tmp_path), pool="nets", plot=False)
    dm1 = next(g for g in res["groups"] if (g.method, g.ipc) == ("dm", 1))
    assert dm1.values == [40.0, 42.0, 44.0, 46.0] and dm1.mean == 43.0 and round(dm1.std, 4) == 2.2361
    assert "over networks" in res["table"].splitlines()[0]


def test_compare_column_cites_the_sources(sweep, tmp_path):
    res = report([str(sweep)], out=str(tmp_path), compare=True, plot=False)
    lines = res["table"].splitlines()
    assert lines[0].endswith("| published |")
    # Fashion-MNIST random / DM: not published in our sources
    assert all(line.endswith("| – |") for line in lines[2:6])
    pub = load_published()
    assert pub[("dm", "cifar10", 10, "convnet")] == [
        {"method": "dm", "dataset": "cifar10", "ipc": "10", "arch": "convnet", "acc_mean": "48.9", "acc_std": "0.6",
         "source": "S3"}]
    assert pub[("dsa", "fashion_mnist", 10, "convnet")][0]["acc_mean"] == "84.6"
    assert pub[("full", "cifar10", "full", "convnet")][0]["acc_mean"] == "84.8"
    assert "S20 KIP-ConvNet" in res["table"] and "compare with care" in res["table"]


def test_mixed_protocols_are_flagged(tmp_path):
    write_run(tmp_path / "a", "dm", 1, 0, {20: [40.0]}, 20)
    write_run(tmp_path / "b", "dm", 1, 1, {20: [50.0]}, 20, evaluator={**EVAL, "epochs": 1000})
    res = report([str(tmp_path)], plot=False)
    line = res["table"].splitlines()[2]
    assert "45.00 ± 5.00 (mixed protocols!) ^1,2" in line
    protocols = [line for line in res["table"].splitlines() if line.startswith("^")]
    assert len(protocols) == 2 and {"1000 epochs" in p for p in protocols} == {True, False}


def test_errors(tmp_path):
    with pytest.raises(DataError, match="no such file or directory"):
        report([str(tmp_path / "nope")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no run directories"):
        report([str(tmp_path / "empty")])
    write_run(tmp_path / "running", "dm", 1, 0, {0: [10.0]}, 20, finished=False)
    with pytest.raises(DataError, match=r"no finished run .*\(1 without a final evaluation\)"):
        report([str(tmp_path / "running")])
    r = subprocess.run([sys.executable, "-m", "ddrun.cli", "report", str(tmp_path / "nope")], capture_output=True,
                       text=True)
    assert r.returncode == 1 and "ddrun report: error: " in r.stderr and "Traceback" not in r.stderr


def test_command_line(sweep, tmp_path):
    r = subprocess.run([sys.executable, "-m", "ddrun.cli", "report", str(sweep), "--compare", "--out",
                        str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "| fashion_mnist | 10 | dm | convnet | 71.50 ± 1.50 ^1 | 2 | 0,1 | – |" in r.stdout
    assert "1 run(s) without a final evaluation" in r.stdout and "acc_vs_ipc.png" in r.stdout
