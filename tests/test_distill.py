"""The distillation loop end to end: run directory contents, W&B files, determinism, resume, and on real
Fashion-MNIST, that S learns."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

import wandb_files
from conftest import SAME_S, assert_same_s, make_cfg
from ddrun.distill import distill


def tiny(root, *extra):
    return make_cfg(["dataset=mnist", f"paths.data={root}", "dataset.system_dirs=[]", "ipc=2", "net.width=16",
                     "debug=smoke", "logger=none", "schedule.outer_loop=2", "schedule.inner_loop=1", *extra])


@pytest.mark.parametrize("method", ["dm", "dc", "dsa"])
def test_run_directory_contents(tiny_root, tmp_path, method):
    out = distill(tiny(tiny_root, f"method={method}"), tmp_path / "run")
    run = Path(out["run_dir"])
    s = torch.load(run / "synthetic.pt", weights_only=True)
    assert s["images"].shape == (20, 1, 28, 28) and s["labels"].tolist() == sorted(list(range(10)) * 2)
    assert s["meta"]["method"] == method and s["meta"]["ipc"] == 2 and s["meta"]["iteration"] == 4
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows if "acc_mean" in r] == [0, 2, 4]
    assert all({"iteration", "seconds"} <= set(r) for r in rows) and any("loss" in r for r in rows)
    assert sorted(p.name for p in (run / "images").glob("*.png")) == [f"synthetic_00000{i}.png" for i in (0, 2, 4)]
    assert torch.load(run / "checkpoint.pt", weights_only=True)["iteration"] == 4
    assert 0 <= out["acc_mean"] <= 100


def test_same_seed_same_synthetic_set(tiny_root, tmp_path):
    a = distill(tiny(tiny_root, "method=dsa", "evaluator.num_eval=0", *SAME_S), tmp_path / "a")
    b = distill(tiny(tiny_root, "method=dsa", "evaluator.num_eval=0", *SAME_S), tmp_path / "b")
    c = distill(tiny(tiny_root, "method=dsa", "evaluator.num_eval=0", "seed=1", *SAME_S), tmp_path / "c")
    sa, sb, sc = (torch.load(Path(o["synthetic"]), weights_only=True)["images"] for o in (a, b, c))
    assert_same_s(sa, sb)
    assert not torch.equal(sa, sc)


def test_resume_continues_to_the_same_synthetic_set(tiny_root, tmp_path):
    straight = distill(tiny(tiny_root, "method=dc", "evaluator.num_eval=0", "iterations=4"), tmp_path / "straight")
    distill(tiny(tiny_root, "method=dc", "evaluator.num_eval=0", "iterations=2"), tmp_path / "resumed")
    resumed = distill(tiny(tiny_root, "method=dc", "evaluator.num_eval=0", "iterations=4"), tmp_path / "resumed")
    a, b = (torch.load(Path(o["synthetic"]), weights_only=True)["images"] for o in (straight, resumed))
    assert_same_s(a, b)


def test_checkpoint_of_another_config_is_refused(tiny_root, tmp_path):
    from ddrun.utils import ConfigError

    distill(tiny(tiny_root, "method=dm", "evaluator.num_eval=0"), tmp_path / "run")
    with pytest.raises(ConfigError, match="another configuration"):
        distill(tiny(tiny_root, "method=dm", "evaluator.num_eval=0", "objective.lr_img=5"), tmp_path / "run")


@pytest.mark.realdata
def test_dm_learns_on_real_fashion_mnist(fmnist_root, tmp_path):
    """DM from Gaussian noise on real Fashion-MNIST (a class-balanced 500-per-class subset): the distilled S must
    beat its own initialization, under the same evaluator, by a clear margin; the W&B offline files of the run
    hold the logged accuracy and an image."""
    cfg = make_cfg(["method=dm", "init=noise", "ipc=1", f"paths.data={fmnist_root}", "dataset.train_subset=500",
                    "dataset.test_subset=100", "iterations=20", "eval_every=20", "log_every=10",
                    "objective.batch_real=32", "objective.lr_img=10", "evaluator.num_eval=2",
                    "evaluator.epochs=40", "logger.mode=offline"])
    out = distill(cfg, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = {r["iteration"]: r["acc_mean"] for r in rows if "acc_mean" in r}
    assert set(evals) == {0, 20}
    assert evals[0] < 25, evals  # noise: near chance
    assert evals[20] > evals[0] + 20, evals
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < losses[0]
    # W&B offline files: the accuracy history and the image grid
    run_file = next((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    for _ in range(40):  # W&B's service process writes the file; give it time to flush on a loaded machine
        hist = wandb_files.history(run_file)
        logged = [float(r["acc_mean"]) for r in hist if "acc_mean" in r]
        if len(logged) >= 2:
            break
        time.sleep(0.5)
    assert logged == pytest.approx([evals[0], evals[20]])
    image_rows = [r for r in hist if r.get("images/synthetic/_type") == '"image-file"']
    assert len(image_rows) == 2
    media = run_file.parent / "files" / json.loads(image_rows[-1]["images/synthetic/path"])
    assert media.is_file() and media.stat().st_size > 0
    assert out["acc_mean"] == pytest.approx(evals[20])


def test_a_subset_no_class_fills_is_recorded_and_pooled_as_the_full_split(tmp_path):
    """sklearn_digits' training classes hold 144 to 153 images, so train_subset=200 trains on the full split: its
    record (setting, hashes) and S's meta say train_subset null, and `ddrun report` pools it with a full-split seed
    instead of listing it apart; rerunning its own command still resumes its run directory (the checkpoint keeps the
    configuration as given)."""
    from ddrun.report import find_results, group_results

    run = ["dataset=sklearn_digits", "method=random", "ipc=1", "net.width=8", "logger=none", "evaluator.num_eval=1",
           "evaluator.epochs=1"]
    distill(make_cfg([*run, "seed=0"]), tmp_path / "full")
    sub = distill(make_cfg([*run, "seed=1", "dataset.train_subset=200"]), tmp_path / "sub200")
    full_rec, sub_rec = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("full", "sub200"))
    assert sub_rec["setting"]["dataset.train_subset"] is None and sub_rec["setting"] == full_rec["setting"]
    assert sub_rec["setting_hash"] == full_rec["setting_hash"]
    meta = torch.load(sub["synthetic"], weights_only=True)["meta"]
    assert meta["setting_hash"] == full_rec["setting_hash"] and meta["config_hash"] == sub_rec["config_hash"]
    groups = group_results(find_results([str(tmp_path)])[0])
    assert len(groups) == 1 and groups[0].seeds == [0, 1]
    again = distill(make_cfg([*run, "seed=1", "dataset.train_subset=200"]), tmp_path / "sub200")
    assert again["acc_mean"] == sub["acc_mean"]


def test_the_test_subset_in_effect_is_recorded(tmp_path):
    """The record's test set names its per-class subset (once always null: RealData had no test_subset): 10 of
    sklearn_digits' 30 test images per class is recorded as 10; 40 keeps the whole test split, recorded as null in
    the test set and in the setting."""
    run = ["dataset=sklearn_digits", "method=random", "ipc=1", "net.width=8", "logger=none", "evaluator.num_eval=1",
           "evaluator.epochs=1"]
    for n, subset, images in ((10, 10, 100), (40, None, 300)):
        distill(make_cfg([*run, f"dataset.test_subset={n}"]), tmp_path / str(n))
        rec = json.loads((tmp_path / str(n) / "results.json").read_text())
        assert rec["evaluations"][0]["protocol"]["test"] == {"dataset": "sklearn_digits", "images": images,
                                                              "subset": subset}
        assert rec["setting"]["dataset.test_subset"] == subset
