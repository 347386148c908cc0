"""``ddrun report``: run records (``results.json``, written with ddrun's own writer and known accuracies) give the
expected table, report.md, CSV and plots; runs that differ in budget, protocol, test set or command are never
pooled and the footnotes name what differs; unfinished runs are left out and said so; the published figures come
with their sources; nothing in a run folder is resolved or executed."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from conftest import ddrun_here
from ddrun import record
from ddrun.report import load_published, report
from ddrun.utils import DataError

PROTOCOL = {"evaluator": "default", "archs": ["convnet"], "nets": {"convnet": {}}, "num_eval": 2, "epochs": 300,
            "optimizer": "sgd", "lr": 0.01, "lr_schedule": "x0.1 at half", "momentum": 0.9, "weight_decay": 0.0005,
            "batch": 256, "augment": "color_crop_cutout_flip_scale_rotate", "learned_lr": True, "labels": "as stored"}


def write_run(folder: Path, method: str, ipc: int, seed: int, curve: dict[int, list[float]], iterations: int,
              finished: bool = True, protocol: dict | None = None, test_images: int = 10000,
              command: str = "distill", setting: dict | None = None, extra: dict | None = None) -> Path:
    """A run directory as ddrun writes it: metrics.jsonl (evaluation rows with per_net and protocol line), and when
    finished the run record (``ddrun.record.write``)."""
    folder.mkdir(parents=True)
    proto = {**(protocol or PROTOCOL), "test": {"dataset": "fashion_mnist", "images": test_images, "subset": None}}
    line = record._line(proto)
    rows = []
    for it, accs in curve.items():
        rows.append({"iteration": it, "loss": 1.0 / (it + 1), "seconds": it * 0.5})
        rows.append({"iteration": it, "acc_mean": sum(accs) / len(accs), "acc_std": 0.0,
                     "per_net": {"convnet": accs}, "protocol": line})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if finished:
        last = max(curve)
        accs = curve[last]
        ev = {"iteration": last, "protocol": proto, "protocol_line": line, "acc_mean": sum(accs) / len(accs),
              "acc_std": 0.0, "per_net": {"convnet": accs}, "per_arch": {}, "extra": dict(extra or {})}
        best_it = max(curve, key=lambda i: sum(curve[i]))
        setting = {"objective.lr_img": 1.0, **(setting or {})}
        record.write(folder, {"command": command, "method": method, "dataset": "fashion_mnist", "ipc": ipc,
                              "seed": seed, "iterations": iterations, "setting_hash": str(sorted(setting.items())),
                              "setting": setting, "evaluations": [ev],
                              "best": {"iteration": best_it, "acc_mean": sum(curve[best_it]) / len(accs),
                                       "protocol_line": line}})
    return folder


@pytest.fixture
def sweep(tmp_path) -> Path:
    """A multirun folder: random and DM at ipc 1 and 10, two seeds each, two networks per evaluation, and one run
    that never finished."""
    root = tmp_path / "multirun"
    finals = {("random", 1): [(30, 30), (34, 34)], ("dm", 1): [(40, 42), (44, 46)],
              ("random", 10): [(61, 61), (65, 65)], ("dm", 10): [(70, 70), (73, 73)]}
    n = 0
    for (method, ipc), per_seed in finals.items():
        for seed, accs in enumerate(per_seed):
            curve = {0: [10.0, 10.0], 20: [float(a) for a in accs]} if method == "dm" else {0: [float(a) for a in accs]}
            write_run(root / f"{n}_{method}_fashion_mnist_ipc{ipc}_seed{seed}", method, ipc, seed, curve,
                      20 if method == "dm" else 0)
            n += 1
    write_run(root / f"{n}_dm_fashion_mnist_ipc1_seed2", "dm", 1, 2, {0: [10.0, 10.0]}, 20, finished=False)
    return root


def test_a_job_that_failed_at_start_up_is_named_as_left_out(sweep, tmp_path):
    """A sweep job stopped by a bad setting before its first iteration leaves only its log: the report names it
    with the unfinished runs instead of dropping it silently."""
    failed = sweep / "9_dc_fashion_mnist_ipc2_seed0"
    (failed / ".hydra").mkdir(parents=True)
    (failed / "distill.log").write_text("[2026-12-02 00:04:35,200][ddrun.distill][ERROR] - schedule.outer_loop is "
                                        "not set: method=dc has no value for ipc=2 in its table preset.loops\n")
    res = report([str(sweep)], out=str(tmp_path / "rep"), plot=False)
    assert [p.name for p in res["unfinished"]] == ["8_dm_fashion_mnist_ipc1_seed2", failed.name]
    assert len(res["results"]) == 8


def test_fixture_sweep_gives_the_expected_table(sweep, tmp_path):
    res = report([str(sweep)], out=str(tmp_path / "rep"))
    lines = res["table"].splitlines()
    assert lines[0] == ("| dataset | ipc | method | arch | accuracy % (mean ± std over seeds) | n | seeds | "
                        "iterations | best % (over evaluations) |")
    # each run contributes the mean of its 2 networks; mean ± population std over the 2 seeds
    assert lines[2:6] == [
        "| fashion_mnist | 1 | random | convnet | 32.00 ± 2.00 ^1 | 2 | 0,1 | 0 | 32.00 ± 2.00 |",
        "| fashion_mnist | 1 | dm | convnet | 43.00 ± 2.00 ^1 | 2 | 0,1 | 20 | 43.00 ± 2.00 |",
        "| fashion_mnist | 10 | random | convnet | 63.00 ± 2.00 ^1 | 2 | 0,1 | 0 | 63.00 ± 2.00 |",
        "| fashion_mnist | 10 | dm | convnet | 71.50 ± 1.50 ^1 | 2 | 0,1 | 20 | 71.50 ± 1.50 |"]
    assert lines[6] == "" and lines[7].startswith("^1 evaluation protocol: convnet x2, 300 epochs, SGD lr 0.01")
    assert "aug color_crop_cutout_flip_scale_rotate" in lines[7] and "test fashion_mnist (10000 images)" in lines[7]
    assert [p.name for p in res["unfinished"]] == ["8_dm_fashion_mnist_ipc1_seed2"]
    assert (tmp_path / "rep" / "report.md").read_text().startswith(lines[0])
    with open(tmp_path / "rep" / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], r["ipc"], float(r["acc_mean"]), float(r["acc_std"]), r["seeds"]) for r in rows] == [
        ("random", "1", 32.0, 2.0, "0 1"), ("dm", "1", 43.0, 2.0, "0 1"), ("random", "10", 63.0, 2.0, "0 1"),
        ("dm", "10", 71.5, 1.5, "0 1")]
    for png in ("acc_vs_iteration.png", "acc_vs_ipc.png"):
        data = (tmp_path / "rep" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_dd_attack_metrics_get_a_column_when_recorded(sweep, tmp_path):
    """DD's poisoning runs record dd_attack_before / dd_attack_success (percent of class a read as b, before and after
    S's steps) beside the accuracy: the table shows them (mean ± std over seeds, with the classes), rows without
    them say "–", the CSV has them; a report without any has no such column."""
    attack = {"objective.attack.source": 0, "objective.attack.target": 1}
    for seed, (before, after) in enumerate([(2.0, 80.0), (4.0, 90.0)]):
        write_run(sweep / f"dd_attack_seed{seed}", "dd", 1, seed, {0: [12.0, 12.0], 20: [50.0, 52.0]}, 20,
                  setting=attack, extra={"dd_attack_before": before, "dd_attack_success": after,
                                         "dd_replay_acc": 50.0})
    res = report([str(sweep)], out=str(tmp_path / "rep"), plot=False)
    lines = res["table"].splitlines()
    assert lines[0].endswith("| best % (over evaluations) | attack success % (before → after S's steps) |")
    dd = next(line for line in lines if "| dd |" in line)
    assert dd.endswith("| 51.00 ± 0.00 | 3.00 ± 1.00 → 85.00 ± 5.00 (class 0 as 1) |"), dd
    assert next(line for line in lines if "| dm |" in line).endswith("| – |")
    with open(tmp_path / "rep" / "report.csv") as f:
        rows = {r["method"]: r for r in csv.DictReader(f) if r["ipc"] == "1"}
    assert (rows["dd"]["dd_attack_before_mean"], rows["dd"]["dd_attack_success_mean"]) == ("3.0000", "85.0000")
    assert rows["dm"]["dd_attack_success_mean"] == ""
    plain = report([str(sweep / "0_random_fashion_mnist_ipc1_seed0")], out=str(tmp_path / "plain"), plot=False)
    assert "attack" not in plain["table"]


def test_pool_over_networks(sweep, tmp_path):
    res = report([str(sweep)], out=str(tmp_path), pool="nets", plot=False)
    dm1 = next(g for g in res["groups"] if (g.method, g.ipc) == ("dm", 1))
    assert dm1.values == [40.0, 42.0, 44.0, 46.0] and dm1.mean == 43.0 and round(dm1.std, 4) == 2.2361
    assert "over networks" in res["table"].splitlines()[0]


def test_compare_column_cites_the_sources(sweep, tmp_path):
    res = report([str(sweep)], out=str(tmp_path), compare=True, plot=False)
    lines = res["table"].splitlines()
    assert lines[0].endswith("| published |")
    assert all(line.endswith("| – |") for line in lines[2:6])  # Fashion-MNIST random / DM: not in our sources
    pub = load_published()
    assert pub[("dm", "cifar10", 10, "convnet")] == [
        {"method": "dm", "dataset": "cifar10", "ipc": "10", "arch": "convnet", "acc_mean": "48.9", "acc_std": "0.6",
         "source": "S3"}]
    assert pub[("dsa", "fashion_mnist", 10, "convnet")][0]["acc_mean"] == "84.6"
    assert "S20 KIP-ConvNet" in res["table"] and "compare with care" in res["table"]


def test_runs_that_differ_are_never_pooled_and_the_difference_is_named(tmp_path):
    write_run(tmp_path / "a", "dm", 1, 0, {3: [40.0]}, 3)
    write_run(tmp_path / "b", "dm", 1, 0, {40: [50.0]}, 40)
    write_run(tmp_path / "c", "dm", 1, 0, {40: [51.0]}, 40, test_images=500, setting={"dataset.test_subset": 50})
    write_run(tmp_path / "d", "dm", 1, 0, {40: [52.0]}, 40, protocol={**PROTOCOL, "epochs": 1000})
    write_run(tmp_path / "e", "dm", 1, 0, {40: [50.0]}, 40, command="evaluate")
    res = report([str(tmp_path)], plot=False)
    lines = res["table"].splitlines()
    rows = [line for line in lines if line.startswith("| fashion_mnist")]
    assert len(rows) == 5 and all("| 1 | 0 |" in r for r in rows)  # one run each: n = 1, never "seeds 0,0,0"
    notes = "\n".join(line for line in lines if line.startswith("["))
    assert "iterations 3 vs 40" in notes and "test images 10000 vs 500" in notes
    assert "dataset.test_subset None vs 50" in notes and "evaluator epochs 300 vs 1000" in notes
    assert "evaluate of a saved set" in notes and "dm (evaluate)" in res["table"]


def test_a_seed_counts_once_however_many_runs_hold_it(sweep, tmp_path):
    """The same runs reached through two paths (a sweep copied beside itself) are repeats: each seed is counted once
    and the footnote names the copies. Evaluations of one S with other student seeds are more networks of that
    seed: one value per seed (or every network with --pool nets)."""
    import shutil

    shutil.copytree(sweep, tmp_path / "copy")
    res = report([str(sweep), str(tmp_path / "copy")], out=str(tmp_path / "rep"), plot=False)
    dm1 = next(g for g in res["groups"] if (g.method, g.ipc, g.first.command) == ("dm", 1, "distill"))
    assert dm1.values == [41.0, 45.0] and dm1.n == 2 and dm1.seeds == [0, 1]
    row = next(line for line in res["table"].splitlines() if "| 1 | dm [" in line)
    assert "| 43.00 ± 2.00 ^1 | 2 | 0,1 |" in row
    assert f"seed 0 repeated in {tmp_path / 'copy'}" in res["table"]
    # two students (evaluate seeds 0 and 1) of the S made with seed 0, one of the S made with seed 1
    for name, source_seed, student_seed, accs in (("s0a", 0, 0, [60.0]), ("s0b", 0, 1, [62.0]),
                                                  ("s1", 1, 0, [70.0])):
        run = write_run(tmp_path / "ev" / name, "edc", 10, student_seed, {0: accs}, 0, command="evaluate")
        rec = json.loads((run / "results.json").read_text())
        rec["source"] = {"path": f"S{source_seed}/synthetic.pt", "seed": source_seed}
        (run / "results.json").write_text(json.dumps(rec))
    g = report([str(tmp_path / "ev")], plot=False)["groups"][0]
    assert g.values == [61.0, 70.0] and g.n == 2 and g.seeds == [0, 1]
    assert "seed 0: 2 evaluations of one set (student seeds 0, 1), their 2 networks pooled" in \
        report([str(tmp_path / "ev")], plot=False)["table"]
    assert report([str(tmp_path / "ev")], plot=False, pool="nets")["groups"][0].values == [60.0, 62.0, 70.0]


def write_cross_arch_run(folder: Path, seed: int, curve: dict[int, dict[str, float]], metrics: bool = True) -> Path:
    """A distill run evaluated on two architectures (one network each) as ddrun writes it: metrics rows whose
    ``acc_mean`` pools the architectures, the record's ``best`` the best pooled evaluation."""
    folder.mkdir(parents=True)
    proto = {**PROTOCOL, "evaluator": "cross_arch", "archs": ["convnet", "mlp"], "nets": {"convnet": {}, "mlp": {}},
             "test": {"dataset": "fashion_mnist", "images": 10000, "subset": None}}
    line = record._line(proto)
    pooled = {it: sum(accs.values()) / len(accs) for it, accs in curve.items()}
    rows = [{"iteration": it, "acc_mean": pooled[it], "acc_std": 0.0, "per_net": {a: [v] for a, v in accs.items()},
             "protocol": line} for it, accs in curve.items()]
    if metrics:
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    last = max(curve)
    ev = {"iteration": last, "protocol": proto, "protocol_line": line, "acc_mean": pooled[last], "acc_std": 0.0,
          "per_net": rows[-1]["per_net"], "extra": {},
          "per_arch": {a: {"acc_mean": v, "acc_std": 0.0} for a, v in curve[last].items()}}
    best_it = max(pooled, key=pooled.get)
    record.write(folder, {"command": "distill", "method": "dm", "dataset": "fashion_mnist", "ipc": 1, "seed": seed,
                          "iterations": last, "setting_hash": "h", "setting": {}, "evaluations": [ev],
                          "best": {"iteration": best_it, "acc_mean": pooled[best_it], "protocol_line": line}})
    return folder


def test_best_of_a_cross_arch_run_is_each_architectures_own(tmp_path):
    """The best column of each architecture's row is that architecture's best evaluation over the run (once the
    pooled best of the record filled every row: ConvNet's best 18.90 below its final 23.40, MLP's never reached),
    and the accuracy-vs-iteration curve has a line per architecture."""
    write_cross_arch_run(tmp_path / "runs" / "s0", 0, {0: {"convnet": 18.0, "mlp": 19.8},
                                                      20: {"convnet": 23.4, "mlp": 10.0}})
    write_cross_arch_run(tmp_path / "runs" / "s1", 1, {0: {"convnet": 20.0, "mlp": 17.8},
                                                      20: {"convnet": 25.4, "mlp": 12.0}})
    res = report([str(tmp_path / "runs")], out=str(tmp_path / "rep"))
    rows = [line for line in res["table"].splitlines() if line.startswith("| fashion_mnist")]
    assert rows == ["| fashion_mnist | 1 | dm | convnet | 24.40 ± 1.00 ^1 | 2 | 0,1 | 20 | 24.40 ± 1.00 |",
                    "| fashion_mnist | 1 | dm | mlp | 11.00 ± 1.00 ^1 | 2 | 0,1 | 20 | 18.80 ± 1.00 |"]
    r = next(r for r in res["results"] if r.seed == 0)
    assert r.best == {"convnet": {"iteration": 20, "acc_mean": 23.4}, "mlp": {"iteration": 0, "acc_mean": 19.8}}
    assert r.curve == {"convnet": [(0, 18.0), (20, 23.4)], "mlp": [(0, 19.8), (20, 10.0)]}
    assert (tmp_path / "rep" / "acc_vs_iteration.png").is_file()
    # without metrics.jsonl the record's pooled best is no architecture's: no best rather than a wrong one
    write_cross_arch_run(tmp_path / "bare", 0, {0: {"convnet": 18.0, "mlp": 19.8}, 20: {"convnet": 23.4, "mlp": 10.0}},
                         metrics=False)
    assert all(line.endswith("| 20 | – |") for line in report([str(tmp_path / "bare")], plot=False)["table"]
               .splitlines() if line.startswith("| fashion_mnist"))


def test_a_protocol_beside_the_headline_never_gets_the_headlines_best(tmp_path):
    """A distill run with a second protocol (``beside``): metrics rows carry the headline's protocol; the beside
    evaluation's row gets no best (older records labelled the headline's best with the beside protocol)."""
    run = write_run(tmp_path / "run", "dd", 1, 0, {0: [20.0], 4: [20.0]}, 4)
    rec = json.loads((run / "results.json").read_text())
    beside = {**PROTOCOL, "archs": ["mlp"], "nets": {"mlp": {}},
              "test": {"dataset": "fashion_mnist", "images": 10000, "subset": None}}
    rec["evaluations"].append({"iteration": 4, "protocol": beside, "protocol_line": record._line(beside),
                               "acc_mean": 7.5, "acc_std": 0.0, "per_net": {"mlp": [7.5]}, "per_arch": {},
                               "extra": {}})
    rec["best"]["protocol_line"] = record._line(beside)  # as older ddrun wrote it
    (run / "results.json").write_text(json.dumps(rec))
    rows = [line for line in report([str(tmp_path)], plot=False)["table"].splitlines()
            if line.startswith("| fashion_mnist")]
    assert rows == ["| fashion_mnist | 1 | dd | convnet | 20.00 ± 0.00 ^1 | 1 | 0 | 4 | 20.00 ± 0.00 |",
                    "| fashion_mnist | 1 | dd | mlp | 7.50 ± 0.00 ^2 | 1 | 0 | 4 | – |"]


def test_a_report_md_of_the_users_is_not_overwritten(sweep, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "report.md").write_text("# my notes\n")
    with pytest.raises(DataError, match="report.md exists and was not written by ddrun report"):
        report([str(sweep)], out=str(tmp_path / "mine"), plot=False)
    assert (tmp_path / "mine" / "report.md").read_text() == "# my notes\n"
    report([str(sweep)], out=str(tmp_path / "rep"), plot=False)
    report([str(sweep)], out=str(tmp_path / "rep"), plot=False)  # its own earlier report is replaced


def test_nothing_in_a_run_folder_is_resolved(tmp_path, monkeypatch):
    monkeypatch.setenv("DDRUN_TEST_SECRET", "s3cr3t-api-key")
    run = write_run(tmp_path / "x", "${oc.env:DDRUN_TEST_SECRET}", 1, 0, {0: [10.0]}, 0)
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text("preset:\n  name: ${oc.env:DDRUN_TEST_SECRET}\n")
    res = report([str(tmp_path)], out=str(tmp_path / "o"), plot=False)
    text = res["table"] + (tmp_path / "o" / "report.csv").read_text()
    assert "s3cr3t" not in text and "${oc.env:DDRUN_TEST_SECRET}" in text


def test_unwritable_output_still_prints_the_table(sweep, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    r = ddrun_here("report", str(sweep), "--out", str(blocker / "sub"))
    assert r.returncode == 0 and "| fashion_mnist | 10 | dm | convnet | 71.50 ± 1.50 ^1 |" in r.stdout
    assert f"ddrun report: could not write the report files to {blocker / 'sub'}" in r.stderr
    assert "Traceback" not in r.stderr


def test_against_pairs_networks_of_the_same_student_seeds(sweep, tmp_path):
    """``--against random``: each row's difference to the random row of the same protocol, network i of a seed
    against network i of that seed (by hand: DM ipc 1 is (40, 42) and (44, 46) against (30, 30) and (34, 34));
    a row of the same protocol with more networks pairs those both trained; a row under another protocol has
    nothing to pair with; an unknown method is one line listing the methods."""
    write_run(sweep / "9_dm_other_protocol", "dm", 1, 0, {0: [50.0, 50.0]}, 20, protocol={**PROTOCOL, "epochs": 1000})
    # the same protocol but 4 networks: its first 2 pair with the random row's 2 (the same student seeds)
    write_run(sweep / "9_dm_four_nets", "dm", 1, 0, {0: [50.0, 53.0, 0.0, 0.0]}, 20,
              protocol={**PROTOCOL, "num_eval": 4})
    res = report([str(sweep)], out=str(tmp_path / "rep"), plot=False, against="random")
    lines = res["table"].splitlines()
    assert lines[0].endswith("| vs random, paired by student seed (points: mean ± std, networks above) |")
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:8]]
    rows = {(c[1], c[2]): c[-1] for c in cells}  # (ipc, method and its footnote marks) -> the paired cell
    assert rows[("1", "random")] == "–" and rows[("10", "random")] == "–"
    assert rows[("1", "dm")] == "+11.00 ± 1.00 (4/4 above)" and rows[("10", "dm")] == "+8.50 ± 0.50 (4/4 above)"
    assert rows[("1", "dm [1]")] == "+21.50 ± 1.50 (2/2 above)"  # 4 networks: (50, 53) against seed 0's (30, 30)
    assert rows[("1", "dm [2]")] == "–"  # 1000 epochs: no random row of that protocol
    with open(tmp_path / "rep" / "report.csv") as f:
        assert [r["vs_random_paired"] for r in csv.DictReader(f)][:2] == ["–", "+11.00 ± 1.00 (4/4 above)"]
    with pytest.raises(DataError, match=r"--against kip: no row of that method; the methods are \['dm', 'random'\]"):
        report([str(sweep)], out=str(tmp_path / "rep2"), plot=False, against="kip")


def test_errors(tmp_path):
    with pytest.raises(DataError, match="no such file or directory"):
        report([str(tmp_path / "nope")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no run directories"):
        report([str(tmp_path / "empty")])
    write_run(tmp_path / "running", "dm", 1, 0, {0: [10.0]}, 20, finished=False)
    with pytest.raises(DataError, match=r"no finished run .*\(1 without a run record\)"):
        report([str(tmp_path / "running")])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "results.json").write_text("{not json")
    with pytest.raises(DataError, match="unreadable run record .*bad/results.json"):
        report([str(tmp_path / "bad")])
    r = ddrun_here("report", str(tmp_path / "nope"))
    assert r.returncode == 1 and "ddrun report: error: " in r.stderr and "Traceback" not in r.stderr


def test_command_line(sweep, tmp_path):
    r = ddrun_here("report", str(sweep), "--compare", "--out", str(tmp_path / "o"), "--against", "random")
    assert r.returncode == 0, r.stderr
    assert ("| fashion_mnist | 10 | dm | convnet | 71.50 ± 1.50 ^1 | 2 | 0,1 | 20 | 71.50 ± 1.50 | – | "
            "+8.50 ± 0.50 (4/4 above) |") in r.stdout
    assert "1 run(s) without a run record" in r.stdout and "acc_vs_ipc.png" in r.stdout
