"""MTT: the gradient (finite differences, plain == memory-efficient), the learned step size, ZCA, the preset,
buffer -> distill -> evaluate, every bad input of issue 3, and on real Fashion-MNIST, that S learns."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CUDA, assert_same_s, ddrun_here, make_cfg
from formats import write_cifar, write_mnist_like
from test_buffer import make_buffer, tiny_args
from ddrun.data.augment import DSA
from ddrun.distill import distill
from ddrun.contracts import Fetched
from ddrun.nets import ConvNet
from ddrun.nets.functional import params_of
from ddrun.objectives.trajectory import TrajectoryMatching
from ddrun.synthetic import SyntheticSet
from ddrun.utils import ConfigError, DataError, DdrunError

# ---------------------------------------------------------------------------------------------------------
# the gradient
# ---------------------------------------------------------------------------------------------------------

def _problem(dtype, soft=False):
    """A tiny smooth ConvNet at an 'expert' start, a target nearby, and S of 3 classes x 3 images."""
    torch.manual_seed(0)
    net = ConvNet(1, 3, (8, 8), width=4, depth=2, act="swish").to(dtype)
    fetched = Fetched(net, start=params_of(net),
                      target={k: v + 0.05 * torch.randn_like(v) for k, v in params_of(net).items()})
    syn = SyntheticSet(torch.randn(9, 1, 8, 8), torch.arange(3).repeat_interleave(3), 3)
    if soft:
        syn.learn_labels()
    return fetched, syn


def _loss_and_grads(fetched, syn, memory_efficient, dtype, seed=3):
    obj = TrajectoryMatching(syn_steps=5, batch_syn=4, lr_teacher=0.05, memory_efficient=memory_efficient,
                             augment=DSA())
    obj.prepare(syn, None)
    syn = syn.to(dtype)
    loss = obj(syn, None, fetched, 0, torch.Generator().manual_seed(seed))
    params = [syn.images, syn.syn_lr] + ([syn.labels] if syn.soft else [])
    return loss, torch.autograd.grad(loss, params)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("cpu_chunk", [32, 3])
def test_memory_efficient_gradient_equals_plain(dtype, soft, cpu_chunk):
    """Also with the memory-efficient replay cut into chunks of 3 images (``speed.cpu_chunk``; on the CPU)."""
    from ddrun import speed

    net, syn = _problem(dtype, soft)
    lp, gp = _loss_and_grads(net, syn, False, dtype)
    net, syn = _problem(dtype, soft)
    with speed.using(cpu_chunk=cpu_chunk):
        lm, gm = _loss_and_grads(net, syn, True, dtype)
    tol = dict(rtol=1e-4, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-14)
    assert float(lp.detach()) == pytest.approx(float(lm.detach()), rel=tol["rtol"])
    for a, b in zip(gp, gm):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("memory_efficient", [False, True])
def test_gradient_matches_finite_differences(memory_efficient):
    dtype = torch.float64
    net, syn = _problem(dtype)
    _, (g_img, g_lr) = _loss_and_grads(net, syn, memory_efficient, dtype)

    def loss_at(images=None, lr=None):
        n, s = _problem(dtype)
        obj = TrajectoryMatching(syn_steps=5, batch_syn=4, lr_teacher=0.05, augment=DSA())
        obj.prepare(s, None)
        s = s.to(dtype)
        with torch.no_grad():
            if images is not None:
                s.images.copy_(images)
            if lr is not None:
                s.syn_lr.fill_(lr)
        return float(obj(s, None, n, 0, torch.Generator().manual_seed(3)).detach())

    h = 1e-6
    base = syn.images.detach().clone()
    for idx in [(0, 0, 3, 4), (4, 0, 0, 7), (8, 0, 5, 5)]:
        up, down = base.clone(), base.clone()
        up[idx] += h
        down[idx] -= h
        fd = (loss_at(images=up) - loss_at(images=down)) / (2 * h)
        assert float(g_img[idx]) == pytest.approx(fd, rel=1e-5, abs=1e-9)
    fd_lr = (loss_at(lr=0.05 + h) - loss_at(lr=0.05 - h)) / (2 * h)
    assert float(g_lr) == pytest.approx(fd_lr, rel=1e-5)


def test_plain_unroll_stops_before_outgrowing_memory():
    """Plain mode measures its first step's graph and refuses an unroll that would not fit, pointing to the
    memory-efficient mode (which needs no such check)."""
    from ddrun.nets.functional import unroll_sgd

    fetched, syn = _problem(torch.float32)
    net = fetched.net
    args = (net, params_of(net), syn.images, syn.labels, 0.01, 40, None, DSA(), torch.Generator().manual_seed(0))
    with pytest.raises(DdrunError, match=r"40 differentiable steps .* lower .*objective.memory_efficient=true"):
        unroll_sgd(*args, memory_budget=10_000, knobs="objective.syn_steps, or set objective.memory_efficient=true")
    unroll_sgd(*args, memory_budget=10**12)


def test_learned_step_size_starts_at_lr_teacher_and_is_checked():
    syn = SyntheticSet(torch.randn(2, 1, 8, 8), torch.tensor([0, 1]), 2)
    obj = TrajectoryMatching(lr_teacher=0.001, lr_img=100, lr_lr=1e-5)
    obj.prepare(syn, None)
    assert float(syn.syn_lr.detach()) == pytest.approx(0.001)
    groups = {g["name"]: g["lr"] for g in obj.param_groups(syn)}
    assert groups == {"images": 100, "lr": 1e-5}
    obj.check(syn, 3)
    for bad in (-1e-4, 0.0, float("nan")):
        with torch.no_grad():
            syn.syn_lr.fill_(bad)
        with pytest.raises(DdrunError, match="learned step size syn_lr became .* at iteration 3"):
            obj.check(syn, 3)


# ---------------------------------------------------------------------------------------------------------
# ZCA
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [20, 120])  # fewer and more images than pixel values (48)
def test_zca_whitens_and_inverts(n):
    from ddrun.data.zca import ZCA

    x = torch.rand(n, 3, 4, 4, generator=torch.Generator().manual_seed(n))
    zca = ZCA(0.1, device="cpu").fit(x)
    w = zca(x)
    cov = np.cov(x.reshape(n, -1).double().numpy(), rowvar=False)
    expected = cov @ np.linalg.inv(cov + 0.1 * np.eye(48))  # U diag(s / (s + eps)) U^T
    np.testing.assert_allclose(np.cov(w.reshape(n, -1).double().numpy(), rowvar=False), expected, atol=1e-5)
    torch.testing.assert_close(zca.inverse(w), x, atol=1e-5, rtol=0)


def test_zca_dataset_option_fits_on_full_train_split_and_pictures_are_unwhitened(tmp_path):
    from ddrun.utils import build

    write_cifar(tmp_path, n_train=10, n_test=5)
    over = [f"paths.data={tmp_path}", "dataset=cifar10", "dataset.verify_checksums=false"]
    plain = build(make_cfg(over + ["dataset.zca=true"]).dataset)
    sub = build(make_cfg(over + ["dataset.zca=true", "dataset.train_subset=2"]).dataset)
    raw = build(make_cfg(over).dataset)
    assert plain.zca is not None and plain.mean == (0.0, 0.0, 0.0) and plain.std == (1.0, 1.0, 1.0)
    torch.testing.assert_close(sub.zca.mean, plain.zca.mean)  # fitted on all 100 images, not the 20 kept
    assert len(sub.train_images) == 20
    whitened_std = plain.train_images.std()
    assert not torch.allclose(plain.train_images, raw.train_images)
    pixels = raw.to_pixels(raw.train_images)
    torch.testing.assert_close(plain.to_pixels(plain.train_images), pixels, atol=1e-4, rtol=0)
    assert whitened_std > 0


# ---------------------------------------------------------------------------------------------------------
# the preset, and buffer -> distill -> evaluate
# ---------------------------------------------------------------------------------------------------------

def mtt_args(root, buffers, *extra):
    return tiny_args(root, buffers, "method=mtt", "ipc=2", "logger=none", "iterations=4", "eval_every=2",
                     "evaluator.num_eval=1", "evaluator.epochs=2", "fetcher.max_start_epoch=2",
                     "fetcher.expert_epochs=1", "objective.syn_steps=3", *extra)


@pytest.mark.parametrize("ipc,expect", [
    (1, dict(syn_steps=50, expert_epochs=2, max_start_epoch=2, lr_img=100, lr_lr=1e-7, lr_teacher=0.01, zca=True)),
    (10, dict(syn_steps=30, expert_epochs=2, max_start_epoch=20, lr_img=100, lr_lr=1e-5, lr_teacher=0.001,
              zca=True)),
    (50, dict(syn_steps=30, expert_epochs=2, max_start_epoch=40, lr_img=1000, lr_lr=1e-5, lr_teacher=0.001,
              zca=False)),
])
def test_preset_values_for_cifar10(ipc, expect):
    cfg = make_cfg(["method=mtt", "dataset=cifar10", f"ipc={ipc}"])
    got = dict(syn_steps=cfg.objective.syn_steps, expert_epochs=cfg.fetcher.expert_epochs,
               max_start_epoch=cfg.fetcher.max_start_epoch, lr_img=cfg.objective.lr_img,
               lr_lr=cfg.objective.lr_lr, lr_teacher=cfg.objective.lr_teacher, zca=cfg.dataset.zca)
    assert got == expect
    assert cfg.objective.batch_syn is None and cfg.iterations == 5000 and cfg.init._target_ == "ddrun.init.real"
    big = make_cfg(["method=mtt", "dataset=cifar100", "ipc=50", "objective.syn_steps=40"])
    assert big.objective.batch_syn == 125 and big.objective.syn_steps == 40 and big.dataset.zca is True


def test_cifar10_ipc10_preset_runs_on_cifar_files(tmp_path):
    """`ddrun distill method=mtt dataset=cifar10 ipc=10` with the preset's values (ZCA, 30 student steps,
    lr_img 100, lr_teacher 0.001, expert_epochs 2, max_start_epoch 20) on CIFAR-10 python pickles; a width-8
    ConvNet and 21-epoch experts on 100 images keep it small. The experts use batch 4, so that an epoch of the
    stand-in is 25 SGD steps: the preset's lr_img is tuned for segments of 2 real CIFAR-10 epochs (392 steps),
    and segments of a few steps make the loss's denominator tiny and the image steps huge."""
    write_cifar(tmp_path / "data", n_train=10, n_test=5)
    common = ["dataset=cifar10", f"paths.data={tmp_path / 'data'}", "dataset.verify_checksums=false",
              "net.width=8", f"paths.buffers={tmp_path / 'buffers'}"]
    buffer_cfg = make_cfg([*common, "dataset.zca=true", "num_experts=1", "train_epochs=21", "batch_train=4"],
                          "buffer")
    from ddrun.buffers import buffer

    buffer(buffer_cfg)
    cfg = make_cfg([*common, "method=mtt", "ipc=10", "iterations=2", "eval_every=2", "logger=none",
                    "evaluator.num_eval=1", "evaluator.epochs=1"])
    assert (cfg.objective.syn_steps, cfg.objective.lr_img, cfg.dataset.zca) == (30, 100, True)
    out = distill(cfg, tmp_path / "run")
    s = torch.load(out["synthetic"], weights_only=True)
    assert s["images"].shape == (100, 3, 32, 32) and s["meta"]["zca"] is True
    assert float(s["lr"]) != pytest.approx(0.001, abs=0) and float(s["lr"]) > 0  # learned, still valid
    assert (tmp_path / "run" / "images" / "synthetic_000002.png").is_file()


def test_buffer_distill_evaluate_end_to_end(tiny_root, tmp_path):
    make_buffer(tiny_root, tmp_path / "buffers")
    init = distill(make_cfg(mtt_args(tiny_root, tmp_path / "buffers", "iterations=0", "eval_every=1",
                                     "evaluator.num_eval=0")), tmp_path / "init")
    out = distill(make_cfg(mtt_args(tiny_root, tmp_path / "buffers")), tmp_path / "run")
    s = torch.load(out["synthetic"], weights_only=True)
    s0 = torch.load(init["synthetic"], weights_only=True)
    assert not torch.equal(s["images"], s0["images"]) and float(s["lr"]) != float(s0["lr"])
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows if "acc_mean" in r] == [0, 2, 4]


def test_same_seed_same_result_and_modes_agree(tiny_root, tmp_path):
    make_buffer(tiny_root, tmp_path / "buffers")
    runs = {}
    fp32 = ["speed.tf32=false"] if CUDA else []  # the plain-vs-memory-efficient tolerance is float32 rounding's
    for name, extra in (("a", ["iterations=2"]), ("b", ["iterations=2"]), ("plain", ["iterations=1"]),
                        ("me", ["iterations=1", "objective.memory_efficient=true"])):
        out = distill(make_cfg(mtt_args(tiny_root, tmp_path / "buffers", "evaluator.num_eval=0", *fp32, *extra)),
                      tmp_path / name)
        runs[name] = torch.load(out["synthetic"], weights_only=True)
    assert_same_s(runs["a"]["images"], runs["b"]["images"])
    assert_same_s(runs["a"]["lr"], runs["b"]["lr"])
    # one update of S: lr_img 1000 turns a gradient difference of 1e-7 into 1e-4. Not two: on this tiny problem
    # the second iteration's gradient jumps by ~1e-5 when S moves by ~1e-6 (measured: a kink of the ReLU net),
    # so float rounding in the first update decides whether the two modes land on the same side of it
    torch.testing.assert_close(runs["plain"]["images"], runs["me"]["images"], rtol=0, atol=1e-4)
    torch.testing.assert_close(runs["plain"]["lr"], runs["me"]["lr"], rtol=1e-5, atol=0)
    assert not torch.equal(runs["plain"]["images"], runs["a"]["images"])  # the second update moved S


# ---------------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------------

def test_missing_buffer_names_path_and_command(tiny_root, tmp_path):
    r = ddrun_here("distill", *mtt_args(tiny_root, tmp_path / "buffers"), f"hydra.run.dir={tmp_path}/run")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    line = [x for x in r.stderr.splitlines() if x.startswith("ddrun distill: error:")][0]
    want_dir = (tmp_path / "buffers" / "mnist" / "convnet_act-relu_depth-3_norm-instancenorm_pooling-avgpooling_width-8"
                / "dsa-color_crop_cutout_scale_rotate")
    assert f"no expert buffer at {want_dir}" in line
    assert (f"`ddrun buffer dataset=mnist net.width=8 paths.data={tiny_root} paths.buffers={tmp_path / 'buffers'}`"
            in line)


def test_buffer_of_another_setting_is_refused_saying_what_differs(tiny_root, tmp_path):
    made = make_buffer(tiny_root, tmp_path / "buffers")
    wider = mtt_args(tiny_root, tmp_path / "buffers", "net.width=16")
    with pytest.raises(DataError, match="no expert buffer at .*width-16.*Expert buffers for other settings exist: "
                                        ".*width-8/dsa-color_crop_cutout_scale_rotate "
                                        "\\(net.width: 8 in the buffer, 16 in this run\\)"):
        distill(make_cfg(wider), tmp_path / "run")
    write_mnist_like(tiny_root, "FashionMNIST", n_train=12, n_test=4)
    cases = [(["net.width=16"], "net.width: 8 in the buffer, 16 in this run"),
             (["dataset.zca=true"], "dataset.zca: False in the buffer, True in this run"),
             (["augment.strategy=crop"], "augment.strategy: color_crop_cutout_scale_rotate in the buffer, crop in"),
             (["dataset=fashion_mnist", "dataset.system_dirs=[]"], "dataset.name: mnist in the buffer, fashion_mnist")]
    for extra, what in cases:
        cfg = make_cfg(mtt_args(tiny_root, tmp_path / "buffers", f"fetcher.buffer_dir={made['dir']}", *extra))
        with pytest.raises(DataError, match="was made with another setting: .*" + what):
            distill(cfg, tmp_path / "run2")


def test_corrupt_or_truncated_expert_is_named_and_the_others_used(tiny_root, tmp_path, caplog):
    made = make_buffer(tiny_root, tmp_path / "buffers", experts=3)
    d = Path(made["dir"])
    truncated, corrupt = d / "expert_0000.pt", d / "expert_0001.pt"
    truncated.write_bytes(truncated.read_bytes()[:1000])
    data = bytearray(corrupt.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte: only the checksum sees it
    corrupt.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="ddrun"):
        out = distill(make_cfg(mtt_args(tiny_root, tmp_path / "buffers", "iterations=6", "evaluator.num_eval=0")),
                      tmp_path / "run")
    assert Path(out["synthetic"]).is_file()
    text = caplog.text
    assert f"file {truncated} is truncated or altered" in text
    assert f"corrupt expert file {corrupt} (sha256 differs from the manifest)" in text
    for f in (truncated, corrupt):
        f.unlink()
    with pytest.raises(DataError, match="no usable expert file") as err:
        distill(make_cfg(mtt_args(tiny_root, tmp_path / "buffers", "fetcher.max_experts=2")), tmp_path / "run3")
    experts = len(json.loads((d / "manifest.json").read_text())["experts"])
    assert f"num_experts={experts}` again" in str(err.value)  # the buffer's count, not the command's default


def test_start_epochs_beyond_the_buffer_are_refused(tiny_root, tmp_path):
    make_buffer(tiny_root, tmp_path / "buffers")  # 3 epochs
    cfg = make_cfg(mtt_args(tiny_root, tmp_path / "buffers", "fetcher.max_start_epoch=3", "fetcher.expert_epochs=2"))
    with pytest.raises(ConfigError, match="max_start_epoch=3 \\+ fetcher.expert_epochs=2 reach epoch 4, but the "
                                          "experts .* were trained 3 epochs"):
        distill(cfg, tmp_path / "run")


def test_mtt_objective_needs_the_checkpoint_fetcher(tiny_root, tmp_path):
    cfg = make_cfg(tiny_args(tiny_root, tmp_path / "buffers", "method=dm", "objective=mtt", "ipc=2", "logger=none",
                             "iterations=1", "evaluator.num_eval=0"))
    with pytest.raises(ConfigError, match="needs fetcher=checkpoints"):
        distill(cfg, tmp_path / "run")


def test_negative_step_size_stops_and_keeps_the_last_good_checkpoint(tiny_root, tmp_path):
    make_buffer(tiny_root, tmp_path / "buffers")
    cfg = make_cfg(mtt_args(tiny_root, tmp_path / "buffers", "objective.lr_teacher=0.5", "objective.lr_lr=100",
                            "evaluator.num_eval=0", "eval_every=1", "iterations=10"))
    with pytest.raises(DdrunError, match="the learned step size syn_lr became -"):
        distill(cfg, tmp_path / "run")
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert float(ckpt["syn"]["lr"]) > 0 and torch.isfinite(ckpt["syn"]["images"]).all()


# ---------------------------------------------------------------------------------------------------------
# real data: S learns
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.realdata
def test_mtt_learns_on_real_fashion_mnist(fmnist_root, tmp_path):
    """Experts (ConvNet-16, 2 x 4 epochs on a 50-per-class subset of the real Fashion-MNIST) -> MTT at ipc 1
    from random real images, 30 iterations; under the same evaluator (2 ConvNet-16, 80 epochs, 1000 test images)
    the distilled S beats its own initialization, and the matching loss falls."""
    data = ["dataset=fashion_mnist", f"paths.data={fmnist_root}", "dataset.train_subset=50", "net.width=16",
            f"paths.buffers={tmp_path / 'buffers'}"]
    from ddrun.buffers import buffer

    buffer(make_cfg([*data, "num_experts=2", "train_epochs=4", "batch_train=64"], "buffer"))
    cfg = make_cfg([*data, "method=mtt", "ipc=1", "dataset.test_subset=100", "iterations=30", "eval_every=30",
                    "logger=none", "evaluator.num_eval=2", "evaluator.epochs=80", "fetcher.max_start_epoch=3",
                    "fetcher.expert_epochs=2", "objective.syn_steps=10"])
    distill(cfg, tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = {r["iteration"]: r["acc_mean"] for r in rows if "acc_mean" in r}
    assert evals[30] > evals[0] + 4, evals
    losses = [r["loss"] for r in rows if r.get("loss") is not None]
    assert losses[-1] < losses[0], losses
