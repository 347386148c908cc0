"""``ddrun buffer``: expert trajectories on disk (layout, manifest, sizes, checksums), resume, sharding, and the
refusals; tiny MNIST-format data written by the test and a width-8 ConvNet keep it to seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import assert_same_s, ddrun_process, make_cfg

from ddrun.buffers import buffer
from ddrun.files import file_digest
from ddrun.store import collection_dir, setting_of
from ddrun.utils import ConfigError


def expert_file(directory: Path, index: int) -> Path:
    return directory / f"expert_{index:04d}.pt"


def tiny_args(root: Path, buffers: Path, *extra: str) -> list[str]:
    """Overrides shared by `ddrun buffer` and `ddrun distill` for a tiny MNIST-format dataset and ConvNet-8."""
    return ["dataset=mnist", f"paths.data={root}", "dataset.system_dirs=[]", "net.width=8", f"paths.buffers={buffers}",
            *extra]


def make_buffer(root: Path, buffers: Path, *extra: str, experts: int = 2, epochs: int = 3) -> dict:
    return buffer(make_cfg(tiny_args(root, buffers, f"num_experts={experts}", f"train_epochs={epochs}",
                                     "batch_train=32", *extra), "buffer"))


def test_layout_manifest_sizes_and_checksums(tiny_root, tmp_path):
    out = make_buffer(tiny_root, tmp_path / "buffers")
    d = Path(out["dir"])
    assert d.relative_to(tmp_path / "buffers").parts == (
        "mnist", "convnet_act-relu_depth-3_norm-instancenorm_pooling-avgpooling_width-8",
        "dsa-color_crop_cutout_scale_rotate")
    assert out["trained"] == [0, 1] and sorted(out["experts"]) == [0, 1]
    m = json.loads((d / "manifest.json").read_text())
    assert m["training"] == {"train_epochs": 3, "lr_teacher": 0.01, "momentum": 0.0, "weight_decay": 0.0,
                             "batch_train": 32, "seed": 0}
    assert m["setting"]["net"]["width"] == 8 and m["setting"]["dataset"]["zca"] is False
    assert m["command"].startswith("ddrun buffer dataset=mnist net.width=8")
    trajs = []
    for i in (0, 1):
        f, entry = expert_file(d, i), m["experts"][str(i)]
        assert entry["bytes"] == f.stat().st_size and entry["sha256"] == file_digest(f)
        assert 0 <= entry["test_acc"] <= 100
        e = torch.load(f, weights_only=True)
        p = entry["params"]
        assert e["trajectory"].shape == (4, p) and e["trajectory"].dtype == torch.float32 and e["epochs"] == 3
        assert e["names"][0] == "features.0.weight" and len(e["names"]) == len(e["shapes"])
        # disk size per expert: 4 bytes x (epochs + 1) x P, plus a small header
        assert 0 < f.stat().st_size - 4 * 4 * p < 16_000
        # every epoch moves the parameters
        assert all((e["trajectory"][k + 1] - e["trajectory"][k]).abs().sum() > 0 for k in range(3))
        trajs.append(e["trajectory"])
    assert not torch.equal(trajs[0][0], trajs[1][0])  # different initializations
    assert not list(d.glob("*.partial"))


def test_rerun_skips_and_shards_add_experts(tiny_root, tmp_path):
    make_buffer(tiny_root, tmp_path / "buffers")
    again = make_buffer(tiny_root, tmp_path / "buffers")
    assert again["trained"] == [] and again["skipped"] == [0, 1]
    shard = make_buffer(tiny_root, tmp_path / "buffers", "expert_offset=2", experts=1)
    assert shard["trained"] == [2] and sorted(shard["experts"]) == [0, 1, 2]


def test_interrupted_expert_resumes_to_the_same_trajectory(tiny_root, tmp_path, monkeypatch):
    straight = make_buffer(tiny_root, tmp_path / "a", experts=1, epochs=4)
    import ddrun.train

    real_train_epoch, calls = ddrun.train.train_epoch, []

    def crash_in_third_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_train_epoch(*args, **kwargs)

    monkeypatch.setattr(ddrun.train, "train_epoch", crash_in_third_epoch)
    with pytest.raises(KeyboardInterrupt):
        make_buffer(tiny_root, tmp_path / "b", experts=1, epochs=4)
    partial = next((tmp_path / "b").glob("*/*/*/expert_0000.partial"))
    assert sorted(p.name for p in partial.iterdir()) == ["epoch_0000.pt", "epoch_0001.pt", "epoch_0002.pt"]
    monkeypatch.setattr(ddrun.train, "train_epoch", real_train_epoch)
    resumed = make_buffer(tiny_root, tmp_path / "b", experts=1, epochs=4)
    a = torch.load(expert_file(Path(straight["dir"]), 0), weights_only=True)["trajectory"]
    b = torch.load(expert_file(Path(resumed["dir"]), 0), weights_only=True)["trajectory"]
    assert_same_s(a, b)


def test_other_recipe_in_the_same_directory_is_refused(tiny_root, tmp_path):
    make_buffer(tiny_root, tmp_path / "buffers")
    with pytest.raises(ConfigError, match=r"lr_teacher: 0.01 in the buffer, 0.05 in this run"):
        make_buffer(tiny_root, tmp_path / "buffers", "lr_teacher=0.05", "expert_offset=2")


def test_buffer_is_keyed_by_zca_subset_net_and_augmentation(tiny_root, tmp_path):
    from ddrun.utils import build

    def key(*extra):
        cfg = make_cfg(tiny_args(tiny_root, tmp_path, *extra), "buffer")
        real = build(cfg.dataset)
        setting = setting_of(real, build(cfg.net), build(cfg.augment))
        return collection_dir(tmp_path, "experts", setting).relative_to(tmp_path)

    base = key()
    assert key("dataset.zca=true").parts[0] == "mnist-zca"
    assert key("dataset.train_subset=5").parts[0] == "mnist-sub5"
    assert key("net.depth=2").parts[1].startswith("convnet_act-relu_depth-2")
    assert key("augment.strategy=none").parts[2] == "noaug"
    assert len({base, key("dataset.zca=true"), key("net.depth=2"), key("augment.strategy=none")}) == 4


def test_multirun_shards_via_the_command_line(tiny_root, tmp_path):
    args = tiny_args(tiny_root, tmp_path / "buffers", "train_epochs=2", "batch_train=32", "num_experts=1")
    r = ddrun_process("buffer", "-m", "expert_offset=0,1", *args, f"hydra.sweep.dir={tmp_path}/sweep")
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads(next((tmp_path / "buffers").glob("*/*/*/manifest.json")).read_text())
    assert sorted(m["experts"]) == ["0", "1"]
    assert "2 experts" in r.stdout.splitlines()[-1] and "MB per expert" in r.stdout
