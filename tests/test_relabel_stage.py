"""The relabel stage (``+stage@stages.relabel=relabel``, ``ddrun.stages.Relabel``): S's labels become a teacher
pool's soft labels on S's images, every result says by which teachers, and bad input stops before any work."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import CUDA, make_cfg
from teacher_helpers import make_teacher, tiny_args

from ddrun.distill import distill
from ddrun.fetchers.teachers import load_teachers
from ddrun.synthetic import SyntheticSet
from ddrun.utils import ConfigError, DataError, build

RUN = ["method=random", "ipc=2", "evaluator.num_eval=1", "evaluator.epochs=2", "logger=none", "seed=0"]
STAGE = ["+stage@stages.relabel=relabel"]
# the run relabels on its device (CUDA under device=auto), the test recomputes the teacher on the CPU: in float32 on
# both (cuDNN's default TF32 convolutions round inputs to 10 mantissa bits), within float32 rounding on CUDA
FP32, LOGIT_TOL = (["speed.tf32=false"], dict(atol=1e-4, rtol=1e-4)) if CUDA else ([], dict(atol=1e-5))


def run_cfg(root, store, *extra):
    return make_cfg([*tiny_args(root, store), *RUN, *extra])


def test_relabel_stores_the_teachers_soft_labels_and_every_result_names_them(tiny_root, tmp_path):
    store = tmp_path / "store"
    make_teacher(tiny_root, store)
    plain = distill(run_cfg(tiny_root, store), tmp_path / "plain")
    out = distill(run_cfg(tiny_root, store, *STAGE, "stages.relabel.temperature=2", *FP32), tmp_path / "relabeled")
    before = torch.load(plain["synthetic"], weights_only=True)
    after = torch.load(out["synthetic"], weights_only=True)
    assert torch.equal(after["images"], before["images"])  # the stage changes labels only
    real = build(run_cfg(tiny_root, store).dataset)
    pool = load_teachers({"teacher": build(run_cfg(tiny_root, store).net)}, real, "cpu", "sre2l", str(store))
    with torch.no_grad():
        want = pool[0]["net"](before["images"]) / 2.0
    assert after["labels"].dtype == torch.float32 and after["labels"].shape == (20, 10)
    assert torch.allclose(after["labels"], want, **LOGIT_TOL)
    relabel = after["meta"]["relabel"]
    assert after["meta"]["label_kind"] == "logits"  # the regression protocol regresses their probabilities
    assert relabel["temperature"] == 2.0 and "recipe sre2l, test acc" in relabel["teachers"]
    kept = float((want.argmax(1) == before["labels"]).float().mean())
    assert relabel["kept_class"] == pytest.approx(kept, abs=1e-4)
    rec = json.loads((tmp_path / "relabeled" / "results.json").read_text())
    assert rec["synthetic"]["soft_labels"] and rec["synthetic"]["relabeled"]["teachers"] == relabel["teachers"]
    line = rec["evaluations"][-1]["protocol_line"]
    assert f"labels as stored, S's labels: soft at T 2 from {relabel['teachers']}" in line
    assert line.startswith(out["protocol"])  # the run's printed line too (the record adds the test set)
    assert "relabeled" not in plain["protocol"]


def test_relabel_without_a_teacher_stops_at_start_up_with_the_teacher_command(tiny_root, tmp_path):
    cfg = run_cfg(tiny_root, tmp_path / "store", *STAGE, "method=dm", "iterations=2")
    with pytest.raises(DataError, match=r"no teacher collection at .*; create it with `ddrun teacher dataset=mnist "
                                        r"net=convnet net.norm=batchnorm net.width=8 recipe=sre2l"):
        distill(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()  # no iteration was spent


@pytest.mark.parametrize("extra, message", [
    (["stages.relabel.temperature=0"], r"stages.relabel.temperature=0: must be > 0"),
    (["parametrization=idc", "method=dm", "iterations=1"],
     r"stages.relabel relabels S's images, but S is stored factorized \(MultiFormation\)"),
])
def test_bad_relabel_settings_are_one_line_before_any_work(tiny_root, tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        distill(run_cfg(tiny_root, tmp_path / "missing-store", *STAGE, *extra), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_disagree_keep_gives_images_the_teachers_misread_their_own_label(tiny_root, tmp_path):
    store = tmp_path / "store"
    make_teacher(tiny_root, store)
    cfg = run_cfg(tiny_root, store, *STAGE, "stages.relabel.temperature=4", "stages.relabel.disagree=keep")
    real = build(cfg.dataset)
    stage = build(cfg.stages.relabel)
    pool = load_teachers({"teacher": build(cfg.net)}, real, "cpu", "sre2l", str(store))
    images = real.train_images[:8].clone()
    with torch.no_grad():
        teacher = pool[0]["net"](images)
    labels = teacher.argmax(1)
    labels[::2] = (labels[::2] + 1) % 10  # every other image: a class the teacher does not give it
    syn = SyntheticSet.from_state({"images": images, "labels": labels, "meta": {"method": "test", "num_classes": 10}})
    out = stage(syn, real, seed=0)
    probs = out.labels.softmax(1)
    assert torch.allclose(probs[::2], torch.nn.functional.one_hot(labels[::2], 10).float(), atol=1e-30, rtol=0)  # own
    assert torch.allclose(out.labels[1::2], teacher[1::2] / 4, atol=1e-5)  # the teacher's label where it agrees
    assert out.meta["relabel"]["kept_class"] == 0.5 and out.meta["relabel"]["disagree"] == "keep"
    assert torch.equal(out.images, images)
    with pytest.raises(ConfigError, match=r"stages.relabel.disagree='ignore': valid values are \['teacher', 'keep'\]"):
        build(run_cfg(tiny_root, store, *STAGE, "stages.relabel.disagree=ignore").stages.relabel)
