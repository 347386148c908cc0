"""The artefact store (``ddrun.store``): collections keyed by setting, the manifest lock and per-item claims, atomic
writes, digests, refusal of foreign / corrupt / unsafe items, and a teacher round trip with its BatchNorm buffers."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from ddrun.data.datasets import RealData
from ddrun.files import UnsafeFile
from ddrun.nets import ConvNet, build_net
from ddrun.store import TEACHER_KEYS, Collection, collection_dir, load_teacher, setting_of, teacher_payload, \
    teacher_setting
from ddrun.utils import ConfigError, DataError


def tiny_real(name="tiny") -> RealData:
    x = torch.randn(12, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.arange(3).repeat_interleave(4)
    return RealData(name, x, y, x, y, (0.5,), (0.25,), 3, ["a", "b", "c"])


def factory(**kw):
    import functools

    return functools.partial(ConvNet, **{"width": 4, "depth": 1, "norm": "batchnorm", **kw})


def teachers(root, name="tiny", **kw) -> Collection:
    return Collection(root, "teachers", teacher_setting(tiny_real(name), factory(**kw), "sre2l"))


def test_collections_are_keyed_by_kind_and_setting(tmp_path):
    s = setting_of(tiny_real(), factory(), None)
    assert collection_dir(tmp_path, "experts", s).relative_to(tmp_path).parts[0] == "tiny"
    assert collection_dir(tmp_path, "teachers", s).relative_to(tmp_path).parts[:2] == ("teachers", "tiny")
    # teachers are keyed by their recipe, not by a DSA augmentation
    assert teachers(tmp_path).dir.name == "sre2l" and teachers(tmp_path).dir.parent.name.startswith("convnet_")
    assert teachers(tmp_path).dir != teachers(tmp_path, width=8).dir
    with pytest.raises(ConfigError, match="unknown store kind 'models'"):
        Collection(tmp_path, "models", s)


def test_teacher_round_trip_keeps_batchnorm_statistics(tmp_path):
    real = tiny_real()
    net = build_net(factory(), real, seed=3)
    net.train()
    for _ in range(3):  # move the running statistics away from their initial values
        net(real.train_images)
    store = teachers(tmp_path)
    store.open_for_writing({"epochs": 1}, "ddrun teacher ...")
    entry = store.put(0, teacher_payload(net, 0, 1, 50.0, store.setting, {"epochs": 1}), {"test_acc": 50.0})
    assert entry["bytes"] == store.item_path(0).stat().st_size and len(entry["sha256"]) == 64
    loaded = load_teacher(teachers(tmp_path), 0, factory(), real)
    want = net.state_dict()
    assert [k for k in want if "running_mean" in k] and set(loaded.state_dict()) == set(want)
    assert all(torch.equal(loaded.state_dict()[k], want[k]) for k in want)
    net.eval()
    assert torch.equal(loaded(real.test_images), net(real.test_images))
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())


def test_another_setting_or_recipe_is_refused_naming_the_difference(tmp_path):
    store = teachers(tmp_path)
    store.open_for_writing({"epochs": 1}, "cmd")
    with pytest.raises(ConfigError, match="epochs: 1 in the teacher collection, 2 in this run"):
        teachers(tmp_path).open_for_writing({"epochs": 2}, "cmd")
    other = Collection(tmp_path, "teachers", teacher_setting(tiny_real(), factory(width=8), "sre2l"),
                       directory=store.dir)
    with pytest.raises(DataError, match="was made with another setting: net.width: 4 in the teacher collection, 8"):
        other.open_for_reading()
    with pytest.raises(DataError, match=r"no teacher collection at .*; create it with `ddrun teacher dataset=other "
                                        r"net=convnet net.depth=1.* recipe=sre2l"):
        teachers(tmp_path, name="other").open_for_reading()


def test_a_corrupt_or_unsafe_item_is_refused(tmp_path):
    real = tiny_real()
    store = teachers(tmp_path)
    store.open_for_writing({}, "cmd")
    net = build_net(factory(), real, seed=0)
    store.put(0, teacher_payload(net, 0, 1, 1.0, store.setting, {}), {})
    data = bytearray(store.item_path(0).read_bytes())
    data[len(data) // 2] ^= 0xFF
    store.item_path(0).write_bytes(bytes(data))
    with pytest.raises(DataError, match=f"corrupt teacher file {store.item_path(0)} \\(sha256 differs"):
        teachers(tmp_path).load(0, TEACHER_KEYS)
    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"state_dict": Payload(), "test_acc": 1.0, "setting": {}}, store.item_path(1))
    with pytest.raises(UnsafeFile, match="holds pickled objects, which ddrun never executes"):
        store.load(1, TEACHER_KEYS, verify=False)
    assert not marker.exists()


def test_put_is_atomic(tmp_path, monkeypatch):
    store = teachers(tmp_path)
    store.open_for_writing({}, "cmd")

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        store.put(0, {"state_dict": {}, "test_acc": 0.0, "setting": {}}, {})
    monkeypatch.undo()
    assert not store.item_path(0).exists() and store.entries() == {}
    assert not [p for p in store.dir.iterdir() if ".tmp" in p.name]


def test_an_item_claimed_by_another_process_is_skipped_or_waited_for(tmp_path):
    store = teachers(tmp_path)
    store.open_for_writing({}, "cmd")
    holder = textwrap.dedent(f"""
        import sys, time
        from ddrun.files import locked
        with locked({str(store.dir / 'teacher_0000.lock')!r}):
            print("held", flush=True)
            time.sleep(2)
    """)
    proc = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    t0 = time.monotonic()
    with store.claim(0) as held:
        assert held is False
    with store.claim(1) as held:
        assert held is True
    with store.claim(0, wait=True) as held:  # blocks until the other process lets go (it holds it 2 s)
        assert held is True and time.monotonic() - t0 > 1.0
    proc.wait()


def test_concurrent_manifest_updates_keep_every_entry(tmp_path):
    store = teachers(tmp_path)
    store.open_for_writing({}, "cmd")
    code = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from ddrun.store import Collection
        import json
        c = Collection({str(tmp_path)!r}, "teachers", json.loads(Path({str(tmp_path / 's.json')!r}).read_text()))
        for i in range(int(sys.argv[1]), int(sys.argv[1]) + 10):
            c.register(i, {{"bytes": i}})
    """)
    import json

    (tmp_path / "s.json").write_text(json.dumps(store.setting))
    procs = [subprocess.Popen([sys.executable, "-c", code, str(k * 10)]) for k in range(4)]
    assert all(p.wait() == 0 for p in procs)
    assert sorted(store.entries()) == list(range(40))


def test_training_overrides_name_what_differs_from_the_command_defaults():
    """A printed `ddrun buffer` / `ddrun teacher` command for an existing collection carries its training where it
    is not the default (else running it would be refused for another recipe)."""
    from ddrun.store import training_overrides

    experts = {"train_epochs": 2, "lr_teacher": 0.01, "momentum": 0.0, "weight_decay": 0.0, "batch_train": 32,
               "seed": 0}
    assert training_overrides("experts", experts, "mnist") == ["train_epochs=2", "batch_train=32"]
    recipe = {"name": "sre2l", "epochs": 200, "batch": 128, "lr": 0.1, "momentum": 0.9, "weight_decay": 0.0005,
              "schedule": "cosine", "warmup_epochs": 0, "seed": 3,
              "augment": {"kind": "crop", "padding": 4, "scale": [0.08, 1.0], "flip": True}}
    assert training_overrides("teachers", recipe, "cifar10") == ["seed=3"]
    assert training_overrides("teachers", recipe, "mnist") == ["seed=3", "recipe.augment.flip=true"]  # digits: no flip
    assert training_overrides("teachers", {**recipe, "seed": 0}, "tiny_imagenet") == [
        "recipe.epochs=200", "recipe.batch=128", "recipe.lr=0.1", "recipe.weight_decay=0.0005",
        "recipe.warmup_epochs=0", "recipe.augment.kind=crop"]


def test_a_subset_no_class_fills_shares_the_full_split_store():
    """sklearn_digits' training classes hold 144 to 153 images: train_subset=200 keeps all of them, the very data of
    a full-split run, so its collections are the full split's (no ``-sub200``: such runs pool their experts and
    teachers); 150 cuts some classes and keeps its own ``-sub150``."""
    from conftest import make_cfg
    from ddrun.utils import build

    def store_dir(*extra):
        real = build(make_cfg(["dataset=sklearn_digits", *extra]).dataset)
        return collection_dir("/store", "experts", setting_of(real, factory(), None))

    full = store_dir()
    assert full.parts[2] == "sklearn_digits"
    assert store_dir("dataset.train_subset=200") == full
    assert store_dir("dataset.train_subset=150").parts[2] == "sklearn_digits-sub150"
