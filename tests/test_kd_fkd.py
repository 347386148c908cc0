"""``evaluator.labels=fkd``: the KD evaluator replays SRe2L's FKD label files (ddrun/evaluators/fkd_files.py).

The files are written here in SRe2L's format (``relabel/generate_soft_label.py``: ``torch.save`` of ``[coords,
flip_status, mix_index, mix_lam, mix_bbox, soft_label]`` in ``epoch_<e>/batch_<b>.tar``, the box as numpy.int64,
the batch order of a ``DataLoader`` over a ``RandomSampler`` seeded 42), by a miniature relabel pass whose
"teacher" is the mixed true class of each image."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_cfg
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from ddrun.evaluators.fkd_files import load_batch, mixed_target, replay
from ddrun.files import UnsafeFile
from ddrun.synthetic import SyntheticSet
from ddrun.utils import ConfigError, DataError, build


def save_batch(path: Path, coords, flip, index=None, lam=None, bbox=None, logits=None, classes=3) -> Path:
    """One batch file as SRe2L's ``save`` writes it (the box as numpy.int64, the logits float16)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    coords = torch.tensor(coords, dtype=torch.float32)
    box = None if bbox is None else [np.clip(v, 0, 10**6) for v in bbox]  # np.clip: numpy.int64, as rand_bbox's
    soft = torch.zeros(len(coords), classes) if logits is None else logits
    torch.save([coords, torch.tensor(flip), None if index is None else torch.tensor(index), lam, box,
                soft.half()], path)
    return path


def relabel(root: Path, labels: torch.Tensor, size: tuple[int, int], classes: int, epochs: int, batch: int,
            mix: str = "cutmix", seed: int = 42, scale=(0.5, 1.0), flip_p: float = 0.5) -> list[list[tuple]]:
    """A miniature of SRe2L's relabel pass: the images' order of a ``DataLoader`` over a ``RandomSampler`` with one
    generator seeded ``seed`` for all epochs; per image RandomResizedCrop's (i, j, h, w) of ``scale`` relative to
    the image and a flip with probability ``flip_p``; per batch (``mix`` cutmix or mixup) a permutation, a
    Beta(1, 1) lam and (CutMix) a box of side sqrt(1 - lam) centred uniformly, clipped; the "teacher" logits 8 x the
    mixed one-hot classes. Returns each epoch's ``(image indices, coords, flips, index, lam, bbox)`` per batch."""
    from torchvision.transforms import RandomResizedCrop

    n, (h, w) = len(labels), size
    rng, g = np.random.default_rng(0), torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.arange(n))
    loader = DataLoader(data, batch_size=batch, sampler=RandomSampler(data, generator=g))
    plan = []
    for e in range(epochs):
        plan.append([])
        for b, (idx,) in enumerate(loader):
            crops = [RandomResizedCrop.get_params(torch.zeros(1, h, w), scale, (3 / 4, 4 / 3)) for _ in idx]
            coords = [[i / h, j / w, ch / h, cw / w] for i, j, ch, cw in crops]
            flip = [bool(torch.rand(1) < flip_p) for _ in idx]
            index, lam = torch.randperm(len(idx)).tolist(), float(rng.beta(1.0, 1.0))
            bbox, share = None, lam
            if mix == "cutmix":
                cut_h, cut_w = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
                cx, cy = int(rng.integers(h)), int(rng.integers(w))
                bbox = [max(cx - cut_h // 2, 0), max(cy - cut_w // 2, 0), min(cx + cut_h // 2, h),
                        min(cy + cut_w // 2, w)]
                share = 1 - (bbox[2] - bbox[0]) * (bbox[3] - bbox[1]) / (h * w)
            y = torch.nn.functional.one_hot(labels[idx], classes).float()
            logits = 8 * (share * y + (1 - share) * y[index])
            save_batch(root / f"epoch_{e}" / f"batch_{b}.tar", coords, flip, index, lam, bbox, logits, classes)
            plan[-1].append((idx, coords, flip, index, lam, bbox))
    return plan


# --- the replay: exactly the stored crop, flip and mix ------------------------------------------------------------

def test_replay_cuts_the_stored_crop_resizes_it_bilinear_and_flips(tmp_path):
    img = torch.arange(32.0).view(1, 1, 4, 8)  # value 8 row + column
    path = save_batch(tmp_path / "epoch_0" / "batch_0.tar", [[0.0, 0.0, 1.0, 0.5]], [True])  # the left half
    got = replay(img, load_batch(path, 1, 3, (4, 8)))
    # columns 0..3 stretched to 8 (bilinear, half-pixel centres: output column o reads column o/2 - 1/4, clamped),
    # then mirrored
    cols = torch.tensor([0.0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3.0])
    want = (8 * torch.arange(4.0)[:, None] + cols[None]).flip(-1)
    torch.testing.assert_close(got[0, 0], want, atol=1e-5, rtol=0)


def test_replay_matches_the_references_pil_crop_for_fractional_coords(tmp_path):
    # SRe2L's RandomResizedCropWithCoords: t_F.resized_crop on the PIL image at coords x image size (floats: PIL
    # rounds the box), bilinear, then the flip; ddrun's replay of S's float image agrees within PIL's 8-bit rounding
    from PIL import Image
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as tf

    u8 = torch.randint(0, 256, (12, 10, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    coords = [[0.13, 0.27, 0.61, 0.55], [0.0, 0.05, 0.95, 0.9], [0.31, 0.0, 0.2, 0.34]]
    flips = [False, True, True]
    path = save_batch(tmp_path / "b.tar", coords, flips)
    got = replay(u8.permute(2, 0, 1).float()[None].repeat(3, 1, 1, 1) / 255, load_batch(path, 3, 3, (12, 10)))
    pil = Image.fromarray(u8.numpy())
    for k, (c, flip) in enumerate(zip(coords, flips)):
        i, j, h, w = (float(torch.tensor(v, dtype=torch.float32)) * s for v, s in zip(c, (12, 10, 12, 10)))
        ref = tf.resized_crop(pil, i, j, h, w, [12, 10], InterpolationMode.BILINEAR)
        ref = tf.to_tensor(tf.hflip(ref) if flip else ref)
        torch.testing.assert_close(got[k], ref, atol=1 / 255 + 1e-6, rtol=0)


def test_cutmix_and_mixup_mix_exactly_the_stored_pixels_with_the_stored_partner(tmp_path):
    imgs = torch.randn(3, 2, 6, 6, generator=torch.Generator().manual_seed(1))
    full = [[0.0, 0.0, 1.0, 1.0]] * 3
    cut = save_batch(tmp_path / "cut.tar", full, [False] * 3, [2, 0, 1], 0.4, [1, 2, 4, 5])
    with pytest.raises(Exception, match="numpy"):  # the reference's numpy.int64 box: refused by the plain loader
        torch.load(cut, weights_only=True)
    batch = load_batch(cut, 3, 3, (6, 6))
    assert batch.mix == "cutmix" and batch.bbox == (1, 2, 4, 5)
    got = replay(imgs, batch)
    want = imgs.clone()
    for k, partner in enumerate([2, 0, 1]):
        want[k, :, 1:4, 2:5] = imgs[partner, :, 1:4, 2:5]  # rows x1:x2, columns y1:y2 of the partner
    assert torch.equal(got, want)
    y = torch.tensor([0, 1, 2])
    target = mixed_target(y, 3, batch, (6, 6))  # each image keeps 1 - 9/36 of its pixels
    torch.testing.assert_close(target[0], torch.tensor([0.75, 0.0, 0.25]))
    up = load_batch(save_batch(tmp_path / "mixup.tar", full, [False] * 3, [1, 2, 0], 0.3), 3, 3, (6, 6))
    assert up.mix == "mixup"
    torch.testing.assert_close(replay(imgs, up), 0.3 * imgs + 0.7 * imgs[[1, 2, 0]])
    big = save_batch(tmp_path / "big.tar", full, [False] * 3, [2, 0, 1], 0.4, [0, 0, 224, 224])  # a 224-px box
    with pytest.raises(DataError, match=r"big.tar: mix_bbox .* inside S's 6x6 images .* set dataset.im_size to it"):
        load_batch(big, 3, 3, (6, 6))


# --- the evaluator: students trained from the files ---------------------------------------------------------------

DIGITS = ["dataset=sklearn_digits", "evaluator=kd", "net@evaluator.student=convnet_bn", "evaluator.student.width=8",
          "evaluator.labels=fkd"]


@pytest.fixture(scope="module")
def digits():
    """sklearn's 8x8 digits and S: the first 20 training images of each class, class after class (the order in
    which ImageFolder lists a per-class folder)."""
    real = build(make_cfg(["dataset=sklearn_digits"]).dataset)
    idx = torch.cat([torch.nonzero(real.train_labels == c).flatten()[:20] for c in range(10)])
    return real, SyntheticSet(real.train_images[idx].clone(), real.train_labels[idx].clone(), 10)


def evaluator(fkd_dir, *extra):
    return build(make_cfg([*DIGITS, f"evaluator.fkd_dir={fkd_dir}", *extra]).evaluator)


def test_students_learn_from_fkd_files_and_the_protocol_names_them(digits, tmp_path, caplog):
    real, syn = digits
    relabel(tmp_path / "fkd", syn.labels, (8, 8), 10, epochs=12, batch=25, flip_p=0.0)  # digits: no mirroring
    ev = evaluator(tmp_path / "fkd", "evaluator.epochs=10", "evaluator.temperature=4", "evaluator.lr=0.01")
    with caplog.at_level("WARNING", logger="ddrun.evaluate"):
        res = ev(syn, real, 0)
    # chance: 10 %. 80 steps of a ConvNet-BN-8 reached 46-65 % over seeds 0-2; from the same files with another
    # sampler seed (images under other images' labels) 9-18 %
    assert res["acc_mean"] > 30
    assert ev._fkd.check(syn.labels, 10, (8, 8)) == 1.0  # every stored label is its image's (or partner's) class
    assert not [r for r in caplog.records if "fkd_dir" in r.getMessage()]
    assert f"FKD files at {tmp_path / 'fkd'} (10 epochs of 12, batch 25, cutmix, sampler seed 42): KL T 4" \
        in res["protocol"]
    assert res["protocol_fields"]["batch"] == 25 and "none (labels from FKD files)" in res["protocol"]


def test_a_wrong_sampler_seed_is_warned_as_a_wrong_order(digits, tmp_path, caplog):
    real, syn = digits
    relabel(tmp_path / "fkd", syn.labels, (8, 8), 10, epochs=1, batch=50, mix="mixup")
    ev = evaluator(tmp_path / "fkd", "evaluator.epochs=1", "evaluator.fkd_seed=7")
    with caplog.at_level("WARNING", logger="ddrun.evaluate"):
        share = ev._fkd.check(syn.labels, 10, (8, 8))
    assert share < 0.45  # about 2 / 10 by chance
    assert [r for r in caplog.records if "S may not be that folder in ImageFolder order" in r.getMessage()]


def test_each_bad_fkd_input_is_one_line_naming_the_file(digits, tmp_path):
    real, syn = digits
    d = tmp_path / "fkd"
    with pytest.raises(DataError, match=rf"fkd_dir={d}: no such folder; it should hold SRe2L's FKD soft labels, "
                                        r"epoch_<e>/batch_<b>.tar \(SRe2L's relabel/generate_soft_label.py"):
        evaluator(d, "evaluator.epochs=2")(syn, real, 0)
    relabel(d, syn.labels, (8, 8), 10, epochs=2, batch=50)
    with pytest.raises(ConfigError, match=rf"{d}: 2 epoch folders, fewer than evaluator.epochs=3: .* \(no cyclic "
                                          r"reuse\); pass evaluator.epochs<=2"):
        evaluator(d, "evaluator.epochs=3")(syn, real, 0)
    ev = evaluator(d, "evaluator.epochs=2")
    with pytest.raises(DataError, match=rf"{d / 'epoch_0'}: 4 batch files, but S's 150 images in batches of 50 "
                                        r"\(epoch_0/batch_0.tar's size\) need batch_0.tar .. batch_2.tar"):
        ev(SyntheticSet(syn.images[:150], syn.labels[:150], 10), real, 0)
    with pytest.raises(DataError, match=rf"{d / 'epoch_0' / 'batch_3.tar'}: holds 50 images, expected 40"):
        ev(SyntheticSet(syn.images[:190], syn.labels[:190], 10), real, 0)
    with pytest.raises(ConfigError, match=rf"batch_train=40, but the FKD files at {d} hold batches of 50"):
        evaluator(d, "evaluator.epochs=2", "evaluator.batch_train=40")(syn, real, 0)
    bad = d / "epoch_0" / "batch_1.tar"
    save_batch(bad, [[0.0, 0.0, 1.0, 1.0]] * 50, [False] * 50, classes=7)
    with pytest.raises(DataError, match=rf"{bad}: soft_label \[50, 7\], expected \[50, 10\]"):
        ev(syn, real, 0)
    bad.write_bytes(b"PK\x03\x04 not a whole file")
    with pytest.raises(DataError, match=rf"corrupt or truncated FKD label file {bad} "):
        ev(syn, real, 0)
    torch.save([Path("x")] * 6, bad)
    with pytest.raises(UnsafeFile, match=rf"refused FKD label file {bad}: it holds pickled objects"):
        ev(syn, real, 0)
    torch.save({"coords": torch.zeros(50, 4)}, bad)
    with pytest.raises(DataError, match=rf"{bad}: not an FKD batch file of SRe2L \(expected the list \[coords, "):
        ev(syn, real, 0)


def test_a_damaged_file_of_a_later_epoch_is_named_when_it_is_read(digits, tmp_path):
    real, syn = digits
    relabel(tmp_path / "fkd", syn.labels, (8, 8), 10, epochs=2, batch=100)
    late = tmp_path / "fkd" / "epoch_1" / "batch_1.tar"
    late.write_bytes(late.read_bytes()[:100])
    with pytest.raises(DataError, match=rf"corrupt or truncated FKD label file {late} "):
        evaluator(tmp_path / "fkd", "evaluator.epochs=2")(syn, real, 0)


def test_fkd_labels_and_fkd_dir_come_together():
    with pytest.raises(ConfigError, match=r"labels=fkd with evaluator.fkd_dir=None: .* needs fkd_dir=<the "
                                          r"--fkd-path folder"):
        build(make_cfg(DIGITS).evaluator)
    with pytest.raises(ConfigError, match="fkd_dir needs labels=fkd"):
        build(make_cfg([*DIGITS[:-1], "evaluator.fkd_dir=/tmp/x"]).evaluator)


def test_every_epoch_replays_the_batches_in_the_reference_dataloaders_order(digits, tmp_path):
    # the miniature's "teacher" labels each stored row with its image's mixed class, so the replay puts each file's
    # rows on the right images exactly when its order is the DataLoader's, epoch after epoch (one generator for all
    # epochs: each epoch one full pass of the RandomSampler)
    real, syn = digits
    relabel(tmp_path / "fkd", syn.labels, (8, 8), 10, epochs=4, batch=30)  # 200 = 6 x 30 + 20: a short last batch
    ev = evaluator(tmp_path / "fkd", "evaluator.epochs=4")
    ev._fkd.check(syn.labels, 10, (8, 8))
    epochs = [list(batches) for batches in ev._fkd_epochs(syn, real)]
    assert [len(e) for e in epochs] == [7] * 4 and len(epochs[0][-1][0]) == 20
    for batches in epochs:
        for x, target, logits in batches:
            torch.testing.assert_close(8 * target, logits, atol=4e-3, rtol=0)  # float16 logits


@pytest.mark.parametrize("mix", ["cutmix", "mixup"])
def test_the_replay_makes_every_batch_on_the_runs_device(digits, tmp_path, mix):
    """The files load to the CPU and S lives on the run's device (CUDA under device=auto): every replayed image,
    target and stored logit is moved there, and the loss takes them. Run on PyTorch's meta device, which refuses a
    CPU tensor in an op with its tensors as CUDA does (indexing by a CPU index is allowed on both)."""
    from types import SimpleNamespace

    from ddrun.evaluators.kd import kd_loss

    real, syn = digits
    relabel(tmp_path / "fkd", syn.labels, (8, 8), 10, epochs=2, batch=30, mix=mix)  # flips, mixes, a short batch
    ev = evaluator(tmp_path / "fkd", "evaluator.epochs=2", "evaluator.loss=mse_ce")
    ev._fkd.check(syn.labels, 10, (8, 8))  # reads the batch size (on the CPU: it counts label hits)
    meta = torch.device("meta")
    on_meta = SyntheticSet(syn.images.to(meta), syn.labels.to(meta), 10)
    for batches in ev._fkd_epochs(on_meta, SimpleNamespace(device=meta, num_classes=10)):
        for x, target, logits in batches:
            assert (x.device, target.device, logits.device) == (meta, meta, meta)
            assert x.shape[1:] == (1, 8, 8) and target.shape == logits.shape == (len(x), 10)
            student = torch.zeros(len(x), 10, device=meta)
            assert kd_loss("mse_ce", student, logits, target, 20.0, 0.025).device == meta


def test_an_image_folder_replays_image_for_image_as_the_references_pil_pipeline(digits, tmp_path):
    # SRe2L's layout (recover's save_images: new<class>/class<class>_id<ipc>.jpg; PNG here) read by ddrun as S, and
    # by torchvision's ImageFolder (the reference's dataset: PIL, RGB) through SRe2L's transforms in the sampler's
    # order: the same training images, image for image, up to PIL's 8-bit rounding
    from PIL import Image
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as tf

    from ddrun.imagefolder import read_imagefolder

    real, syn = digits
    folder = tmp_path / "sre2l"
    pixels = real.to_pixels(syn.images[::4])  # 5 per class, in [0, 1]
    for k, (img, c) in enumerate(zip(pixels, syn.labels[::4].tolist())):
        (folder / f"new{c:03d}").mkdir(parents=True, exist_ok=True)
        u8 = (img[0] * 255).round().to(torch.uint8).numpy()
        Image.fromarray(u8).save(folder / f"new{c:03d}" / f"class{c:03d}_id{(7 * k) % 50:03d}.png")
    s = read_imagefolder(folder, real)
    ref = ImageFolder(str(folder))
    plan = relabel(tmp_path / "fkd", torch.tensor(ref.targets), (8, 8), 10, epochs=3, batch=16)
    ev = evaluator(tmp_path / "fkd", "evaluator.epochs=3")
    assert ev._fkd.check(s.hard_labels(), 10, (8, 8)) == 1.0
    for batches, stored in zip(ev._fkd_epochs(s, real), plan):
        for (x, _, _), (idx, coords, flips, index, lam, bbox) in zip(batches, stored):
            want = []
            for i, c, flip in zip(idx.tolist(), coords, flips):
                i0, j0, h0, w0 = (float(torch.tensor(v, dtype=torch.float32)) * 8 for v in c)
                crop = tf.resized_crop(ref[i][0], i0, j0, h0, w0, [8, 8], InterpolationMode.BILINEAR)
                want.append(tf.to_tensor(tf.hflip(crop) if flip else crop)[:1])
            want = torch.stack(want)
            want[:, :, bbox[0]:bbox[2], bbox[1]:bbox[3]] = want[index][:, :, bbox[0]:bbox[2], bbox[1]:bbox[3]]
            torch.testing.assert_close(real.to_pixels(x), want, atol=1 / 255 + 1e-5, rtol=0)
