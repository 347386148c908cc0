"""Validation-based selection and early stopping of S (``early_stopping``, ddrun/selection.py): RFAD's rule."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import SAME_S, assert_same_s, make_cfg
from ddrun.distill import Distillation, distill
from ddrun.selection import EarlyStopping
from ddrun.utils import ConfigError

RULE = ["early_stopping.every=1", "early_stopping.patience=1", "early_stopping.val_per_class=6",
        "objective.val_models=1"]


def tiny(root, *extra):
    # RFAD on a tiny MNIST; an image step large enough that the validation loss turns up within a few iterations
    return make_cfg(["method=rfad", "dataset=mnist", f"paths.data={root}", "dataset.system_dirs=[]", "ipc=2",
                     "debug=smoke", "logger=none", "evaluator.num_eval=0", "objective.batch_real=4",
                     "objective.kernel.n_models=1", "objective.kernel.net_kwargs.width=8", "objective.lr_img=0.1",
                     "iterations=30", *SAME_S, *extra])


def simulate(losses: dict[int, float], patience: int) -> tuple[int, int | None]:
    """RFAD's rule on a logged sequence: (best iteration, iteration it stopped at or None)."""
    best_it, best = None, None
    for it in sorted(losses):
        if best is None or losses[it] < best:
            best_it, best = it, losses[it]
        if it > best_it + patience:
            return best_it, it
    return best_it, None


def test_the_rule_keeps_the_lowest_loss_and_stops_after_the_patience():
    rule = EarlyStopping(every=40, patience=80)
    seq = {0: 5.0, 40: 4.0, 80: 4.0, 120: 4.5, 160: 3.9, 200: 4.2, 240: 4.1, 280: 4.0}
    seen = []
    for it, loss in seq.items():
        assert rule.due(it, last=1000)
        seen.append(rule.observe(it, loss))
        if rule.exhausted(it):
            break
    assert seen == [True, True, False, False, True, False, False, False]  # ties do not count as better
    assert rule.state.best_iteration == 160 and it == 280  # 280 > 160 + 80
    assert not rule.due(281, last=1000) and rule.due(1000, last=1000)
    with pytest.raises(ConfigError, match="early_stopping.every"):
        EarlyStopping(every=0)
    with pytest.raises(ConfigError, match="early_stopping.patience"):
        EarlyStopping(every=1, patience=-1)


def test_rfad_preset_is_the_references_rule():
    cfg = make_cfg(["method=rfad", "dataset=cifar10", "ipc=10"])
    es = cfg.early_stopping
    assert (es.every, es.patience, es.val_per_class, es.revert) == (40, 1000, 500, True)
    assert cfg.objective.val_models == 16
    assert make_cfg(["method=rfad", "dataset=cifar100", "ipc=1"]).early_stopping.val_per_class == 100
    assert make_cfg(["method=kip", "dataset=cifar10", "ipc=1"]).early_stopping.every is None  # off elsewhere


def test_run_stops_after_the_patience_and_its_s_is_the_best_validated_one(tiny_root, tmp_path):
    """The run ends ``patience`` iterations after the lowest validation loss (as the logged losses say it
    should), synthetic.pt is S of that iteration -- the same images as a run that simply stops there -- and the
    record says how it was chosen, without looking at the test split."""
    from ddrun.synthetic import SyntheticSet

    out = distill(tiny(tiny_root, *RULE), tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = {r["iteration"]: r["val_loss"] for r in rows if "val_loss" in r}
    best_it, stop_it = simulate(losses, patience=1)
    assert stop_it is not None and stop_it < 30, losses  # the rule fired (lr_img 0.1: best 2, stop 4 on the CPU)
    assert max(losses) == stop_it  # nothing validated after the stop
    rec = json.loads((tmp_path / "run" / "results.json").read_text())["early_stopping"]
    assert rec["stopped_at"] == stop_it and rec["best_iteration"] == best_it and rec["final_is_best"]
    assert rec["best_val_loss"] == pytest.approx(losses[best_it])
    assert "training split" in rec["selected_by"]
    final, kept = SyntheticSet.load(out["synthetic"]), SyntheticSet.load(rec["synthetic_best"])
    assert torch.equal(final.images, kept.images) and final.meta["iteration"] == best_it
    plain = distill(tiny(tiny_root, f"iterations={best_it}", "early_stopping.every=null"), tmp_path / "plain")
    assert_same_s(final.images, SyntheticSet.load(plain["synthetic"]).images)
    assert_same_s(final.labels, SyntheticSet.load(plain["synthetic"]).labels)
    again = distill(tiny(tiny_root, *RULE, "iterations=40"), tmp_path / "run")  # a stopped run stays stopped
    assert torch.equal(SyntheticSet.load(again["synthetic"]).images, final.images)


def test_a_killed_run_resumes_to_the_same_stop_and_the_same_s(tiny_root, tmp_path, monkeypatch):
    from ddrun.synthetic import SyntheticSet

    straight = distill(tiny(tiny_root, *RULE, "checkpoint_every=1"), tmp_path / "straight")
    step = Distillation.step

    def killed(self, it):
        if it == 3:
            raise KeyboardInterrupt  # a kill between checkpoints: the rerun resumes from iteration 3's
        step(self, it)

    monkeypatch.setattr(Distillation, "step", killed)
    with pytest.raises(KeyboardInterrupt):
        distill(tiny(tiny_root, *RULE, "checkpoint_every=1"), tmp_path / "resumed")
    monkeypatch.setattr(Distillation, "step", step)
    resumed = distill(tiny(tiny_root, *RULE, "checkpoint_every=1"), tmp_path / "resumed")
    a, b = (SyntheticSet.load(o["synthetic"]) for o in (straight, resumed))
    assert_same_s(a.images, b.images)
    assert a.meta["iteration"] == b.meta["iteration"]
    ra, rb = (json.loads((tmp_path / d / "results.json").read_text())["early_stopping"]
              for d in ("straight", "resumed"))
    assert {k: v for k, v in ra.items() if k != "synthetic_best"} == \
        {k: v for k, v in rb.items() if k != "synthetic_best"}


def test_early_stopping_needs_an_objective_with_a_validation_loss(tiny_root, tmp_path):
    dm = ["method=dm", "dataset=mnist", f"paths.data={tiny_root}", "dataset.system_dirs=[]", "ipc=2",
          "net.width=8", "debug=smoke", "logger=none", "early_stopping.every=5"]
    with pytest.raises(ConfigError, match="has no validation loss.*objective=rfad"):
        distill(make_cfg(dm), tmp_path / "dm")
    assert not (tmp_path / "dm" / "checkpoint.pt").exists()
    with pytest.raises(ConfigError, match="keep_best=true and early_stopping"):
        distill(tiny(tiny_root, *RULE, "keep_best=true"), tmp_path / "both")
    with pytest.raises(ConfigError, match="early_stopping.val_per_class"):
        distill(tiny(tiny_root, *RULE, "early_stopping.val_per_class=0"), tmp_path / "bad")


def test_the_record_says_how_many_validation_images_were_drawn(tiny_root):
    """A class with fewer training images than val_per_class gives all of them: the record says the count
    actually drawn (the smallest class's), not the one requested."""
    from ddrun.utils import build

    real = build(make_cfg(["dataset=mnist", f"paths.data={tiny_root}", "dataset.system_dirs=[]"]).dataset)
    keep = (real.train_labels != 3) | (torch.arange(len(real.train_labels)) % 2 == 0)  # class 3: about half left
    real.train_images, real.train_labels = real.train_images[keep], real.train_labels[keep]
    smallest = int(torch.bincount(real.train_labels).min())
    assert 0 < smallest < 12
    rule = EarlyStopping(every=1, val_per_class=500)
    rule.draw(real, seed=0)
    assert torch.bincount(rule.y_val).tolist() == torch.bincount(real.train_labels).tolist()  # all of every class
    counts = torch.bincount(real.train_labels).tolist()
    assert rule.describe("rfad").startswith(f"lowest validation loss of rfad on {smallest} to {max(counts)}/class "
                                            f"(total {sum(counts)}: asked 500/class, more than some classes hold) "
                                            f"of the training split")
    enough = EarlyStopping(every=1, val_per_class=4)
    enough.draw(real, seed=0)
    assert torch.bincount(enough.y_val).tolist() == [4] * 10
    assert "on 4/class of the training split, every 1 iterations" in enough.describe("rfad")
