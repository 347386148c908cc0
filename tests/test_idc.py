"""IDC's multi-formation parametrization (``parametrization=idc``) and ``method=idc``: decode / encode shapes and a
hand-made example, the decoded view's read interface, initialization from real images, the loop and ``ddrun
evaluate`` going through the decoding, bad factors, and on real Fashion-MNIST, that S learns."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import SAME_S, assert_same_s, make_cfg
from ddrun.distill import distill
from ddrun.parametrizations import MultiFormation
from ddrun.synthetic import SyntheticSet
from ddrun.utils import ConfigError, build


def tiny(root, *extra):
    return make_cfg(["dataset=mnist", f"paths.data={root}", "dataset.system_dirs=[]", "ipc=2", "net.width=8",
                     "debug=smoke", "logger=none", *extra])


def test_decode_and_encode_shapes():
    p = MultiFormation(factor=2)
    x = torch.randn(6, 3, 32, 32)
    d = p.decode_images(x)
    assert d.shape == (24, 3, 32, 32)
    assert p.encode_images(d).shape == (6, 3, 32, 32)
    assert MultiFormation(factor=4).decode_images(torch.randn(2, 1, 28, 28)).shape == (32, 1, 28, 28)
    assert torch.equal(MultiFormation(factor=1).decode_images(x), x)


def test_hand_made_example():
    """A 4x4 image 0..15, factor 2: tile (i, j) is decoded image 2i + j, each tile upsampled to 4x4."""
    img = torch.arange(16.0).view(1, 1, 4, 4)
    d = MultiFormation(factor=2, decode_mode="nearest").decode_images(img)
    assert d[0, 0].tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [4, 4, 5, 5], [4, 4, 5, 5]]
    assert d[1, 0].tolist() == [[2, 2, 3, 3], [2, 2, 3, 3], [6, 6, 7, 7], [6, 6, 7, 7]]
    assert d[2, 0, 0].tolist() == [8, 8, 9, 9] and d[3, 0, 3].tolist() == [14, 14, 15, 15]
    # bilinear (the reference's): a constant tile stays constant, and the tiles do not bleed into each other
    tiles = torch.tensor([[1.0, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]]).view(1, 1, 4, 4)
    d = MultiFormation(factor=2).decode_images(tiles)
    assert [float(t.unique()) for t in d] == [1.0, 2.0, 3.0, 4.0]
    # encoding: 4 constant images become the 4 tiles of one stored image, and decode back exactly
    four = torch.stack([torch.full((1, 4, 4), v) for v in (1.0, 2.0, 3.0, 4.0)])
    enc = MultiFormation(factor=2).encode_images(four)
    assert torch.equal(enc, tiles) and torch.equal(MultiFormation(factor=2).decode_images(enc), four)


def test_decoded_view_is_differentiable_and_keeps_labels_and_lr():
    syn = SyntheticSet(torch.randn(4, 1, 8, 8), torch.tensor([0, 0, 1, 1]), 2)
    syn.learn_lr(0.03)
    p = MultiFormation(factor=2)
    d = p.decode(syn)
    assert d.images.shape == (16, 1, 8, 8) and d.ipc == 8 and d.lr is syn.lr and d.syn_lr is syn.syn_lr
    assert d.labels.tolist() == [0] * 8 + [1] * 8 and d.class_slice(1).tolist() == list(range(8, 16))
    assert d.regression_targets().shape == (16, 2) and not d.soft
    (d.images * torch.arange(16.0).view(16, 1, 1, 1)).sum().backward()
    g = syn.images.grad
    assert g is not None and all(g[i].abs().sum() > 0 for i in range(4))
    syn.learn_labels(2.0)
    d = p.decode(syn)
    assert d.soft and d.labels.shape == (16, 2) and d.labels.requires_grad
    assert p.describe(syn) == {"parametrization": "idc", "factor": 2, "decode_mode": "bilinear",
                                "stored_images": 4, "decoded_images": 16}


def test_factor_not_dividing_the_image_is_one_line():
    syn = SyntheticSet(torch.randn(2, 1, 28, 28), torch.tensor([0, 1]), 2)
    with pytest.raises(ConfigError, match=r"^parametrization.factor=3 does not divide the image size 28x28: .*"
                                          r"use one of \[2, 4, 7, 14, 28\]$"):
        MultiFormation(factor=3).describe(syn)
    with pytest.raises(ConfigError, match="parametrization.factor=0: must be >= 1"):
        MultiFormation(factor=0)


def test_encode_init_tiles_downsampled_real_images_of_the_class(tiny_root):
    real = build(tiny(tiny_root).dataset)
    syn = build(tiny(tiny_root).init)(real, 2, torch.Generator().manual_seed(0))
    p = MultiFormation(factor=2)
    p.encode_init(syn, real, torch.Generator().manual_seed(1))
    small = torch.nn.functional.interpolate(real.train_images, size=(14, 14), mode="nearest")
    for n in range(len(syn.images)):
        c = int(syn.labels[n])
        for i in range(2):
            for j in range(2):
                tile = syn.images[n, :, 14 * i:14 * (i + 1), 14 * j:14 * (j + 1)]
                match = (small - tile).abs().flatten(1).amax(1) < 1e-6
                assert match.any() and set(real.train_labels[match].tolist()) == {c}


def test_method_idc_runs_stores_ipc_images_and_states_the_decoded_count(tiny_root, tmp_path):
    out = distill(tiny(tiny_root, "method=idc", "objective.lr_img=0.001", "iterations=2", "eval_every=2",
                       "schedule.outer_loop=2", "schedule.n_data=20", "objective.batch_real=4"), tmp_path / "run")
    saved = torch.load(out["synthetic"], weights_only=True)
    assert saved["images"].shape == (20, 1, 28, 28)  # the budget: ipc 2 x 10 classes stored
    assert saved["meta"]["parametrization"] == "idc" and saved["meta"]["decoded_images"] == 80
    assert (out["stored_images"], out["decoded_images"]) == (20, 80)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["decoded_images"] == 80 for r in rows if "acc_mean" in r)


def test_idc_option_on_dm_and_evaluate_decodes(tiny_root, tmp_path):
    from ddrun.evaluate import evaluate_cmd

    out = distill(tiny(tiny_root, "method=dm", "parametrization=idc", "iterations=1", "evaluator.num_eval=0"),
                  tmp_path / "run")
    args = ["dataset=mnist", f"paths.data={tiny_root}", "dataset.system_dirs=[]", "net.width=8", "logger=none",
            "evaluator.num_eval=1", "evaluator.epochs=1", f"synthetic={out['synthetic']}"]
    want = "parametrization=idc parametrization.factor=2 parametrization.decode_mode=bilinear"
    with pytest.raises(ConfigError, match=f"stores S made with {want}, not parametrization=pixels: pass {want}$"):
        evaluate_cmd(make_cfg(args, "evaluate"))
    # decoded another way, S trains on other images: refused too, naming the mode it was made with
    with pytest.raises(ConfigError, match="not parametrization=idc parametrization.factor=2 "
                                          "parametrization.decode_mode=nearest: pass"):
        evaluate_cmd(make_cfg([*args, "parametrization=idc", "parametrization.decode_mode=nearest"], "evaluate"))
    res = evaluate_cmd(make_cfg([*args, "parametrization=idc"], "evaluate"))
    assert res["decoded_images"] == 80 and res["stored_images"] == 20 and 0 <= res["acc_mean"] <= 100


def test_a_resumed_idc_run_does_not_initialize_again_and_ends_with_the_same_s(tiny_root, tmp_path):
    args = ["method=dm", "parametrization=idc", "evaluator.num_eval=0", *SAME_S]
    straight = distill(tiny(tiny_root, *args, "iterations=3"), tmp_path / "a")
    distill(tiny(tiny_root, *args, "iterations=1"), tmp_path / "r")
    resumed = distill(tiny(tiny_root, *args, "iterations=3"), tmp_path / "r")
    a, r = (torch.load(x["synthetic"], weights_only=True)["images"] for x in (straight, resumed))
    assert_same_s(a, r)


def test_bad_factor_stops_the_run_before_any_work(tiny_root, tmp_path):
    with pytest.raises(ConfigError, match="parametrization.factor=5 does not divide the image size 28x28"):
        distill(tiny(tiny_root, "method=dm", "parametrization=idc", "parametrization.factor=5"), tmp_path / "run")


@pytest.mark.realdata
def test_idc_learns_on_real_fashion_mnist(fmnist_root, tmp_path):
    """method=idc at ipc 1 (4 decoded images per class) on a 100-per-class subset of the real Fashion-MNIST, 6
    iterations of 3 updates each (a step size 30x the reference's, for this tiny budget): under one evaluator
    (2 ConvNet-16, 40 epochs, 1000 test images) S beats its own (IDC-encoded real) initialization."""
    cfg = make_cfg(["dataset=fashion_mnist", f"paths.data={fmnist_root}", "dataset.train_subset=100",
                    "dataset.test_subset=100", "net.width=16", "method=idc", "ipc=1", "iterations=6",
                    "eval_every=6", "logger=none", "schedule.outer_loop=3", "schedule.n_data=64",
                    "objective.lr_img=0.02", "objective.batch_real=16", "evaluator.num_eval=2", "evaluator.epochs=40"])
    distill(cfg, tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = {r["iteration"]: r["acc_mean"] for r in rows if "acc_mean" in r}
    assert evals[6] > evals[0] + 1.5, evals


@pytest.mark.parametrize("init", ["noise", "herding", "kcenter"])
def test_idc_refuses_an_init_whose_images_it_would_replace(tiny_root, tmp_path, init):
    """IDC's encode_init writes factor^2 real images into every stored image: any init but real would be lost
    (the run recorded as herding / kcenter with IDC's random real images)."""
    with pytest.raises(ConfigError, match=f"would replace init={init}'s images: pass init=real$"):
        distill(tiny(tiny_root, "method=dm", "parametrization=idc", f"init={init}", "iterations=1",
                     "evaluator.num_eval=0"), tmp_path / "run")
    assert not (tmp_path / "run" / "synthetic.pt").exists()


def test_export_writes_the_decoded_training_images_of_an_idc_set(tiny_root, tmp_path):
    """Other tools train on what ddrun's networks train on: the factor^2 decoded images per stored image (an
    export once wrote the 2x2 mosaics, silently); decoded=false keeps the stored ones, which evaluate with
    parametrization=idc."""
    from ddrun.evaluate import evaluate_cmd
    from ddrun.export import export
    from ddrun.imagefolder import read_imagefolder

    out = distill(tiny(tiny_root, "method=dm", "parametrization=idc", "iterations=1", "evaluator.num_eval=0"),
                  tmp_path / "run")
    res = export(make_cfg([f"synthetic={out['synthetic']}", f"out={tmp_path / 'dec'}"], "export"))
    assert res["images"] == 80  # ipc 2 x 10 classes stored, x 4 decoded
    real = build(tiny(tiny_root).dataset)
    back = read_imagefolder(tmp_path / "dec", real)
    stored = SyntheticSet.load(out["synthetic"])
    want = MultiFormation(factor=2).decode(stored)
    assert torch.allclose(real.to_pixels(back.images), real.to_pixels(want.images.detach()), atol=0.5 / 255 + 1e-6)
    assert back.ipc == 8 and "parametrization" not in back.meta
    args = ["dataset=mnist", f"paths.data={tiny_root}", "dataset.system_dirs=[]", "net.width=8", "logger=none",
            "evaluator.num_eval=1", "evaluator.epochs=1"]
    assert evaluate_cmd(make_cfg([*args, f"synthetic={tmp_path / 'dec'}"], "evaluate"))["ipc"] == 8
    res = export(make_cfg([f"synthetic={out['synthetic']}", f"out={tmp_path / 'raw'}", "decoded=false"], "export"))
    assert res["images"] == 20
    with pytest.raises(ConfigError, match="pass parametrization=idc"):
        evaluate_cmd(make_cfg([*args, f"synthetic={tmp_path / 'raw'}"], "evaluate"))
