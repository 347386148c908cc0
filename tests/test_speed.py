"""The faster layouts compute what the plain ones do (``ddrun/speed.py``): DM's chunked embeddings, DC/DSA's
chunked and class-batched gradients, the evaluator's stacked ensembles; ``deterministic=true`` repeats S.

The equalities are checked in float64 (on the device the suite runs on), where float rounding is ~1e-15 and any
difference in the draws, the batches or the formulas would show; float32 adds only rounding (amplified by
ill-conditioned channels of instance norm, so float32 comparisons use loose tolerances)."""

from __future__ import annotations

import os
import shutil
import types
from pathlib import Path

import pytest
import torch

from conftest import make_cfg
from ddrun import speed
from ddrun.contracts import Fetched
from ddrun.distill import distill
from ddrun.nets import build_net
from ddrun.objectives.gradient import match_loss, match_loss_classes
from ddrun.train import Ensemble, accuracy, train_epoch, train_epoch_ensemble
from ddrun.utils import ConfigError, build, resolve_device

DEVICE = resolve_device("auto")
WHOLE = dict(cpu_chunk=10**6, channels_last=False, batched_classes=False)  # the plain computation


def setting(root, *extra, net="convnet"):
    width = ["net.width=8"] if net == "convnet" else []
    cfg = make_cfg(["dataset=mnist", f"paths.data={root}", "dataset.system_dirs=[]", "ipc=2", f"net={net}", *width,
                    "debug=smoke", "logger=none", *extra])
    real = build(cfg.dataset).to(DEVICE)
    real.train_images = real.train_images.double()
    syn = build(cfg.init)(real, 2, torch.Generator().manual_seed(1)).to(DEVICE)
    syn.images.data = syn.images.data.double()
    return cfg, real, syn


def loss_and_grad(cfg, real, syn, **layout):
    """The objective's loss and its gradient w.r.t. the images of S, and the generator's state after the call."""
    with speed.using(**layout):
        net = build_net(build(cfg.net), real, 5, DEVICE).double()
        obj = build(cfg.objective)
        syn.images.grad = None
        g = torch.Generator().manual_seed(3)
        loss = obj(syn, real, Fetched(net), 0, g)
        loss.backward()
        return loss.detach(), syn.images.grad.clone(), g.get_state()


def assert_same(a, b):
    assert torch.equal(a[2], b[2])  # the same draws (batches, DSA) were made
    torch.testing.assert_close(a[0], b[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(a[1], b[1], rtol=1e-9, atol=1e-12)


def test_dm_chunked_embedding_equals_one_batch(tiny_root):
    cfg, real, syn = setting(tiny_root, "method=dm", "objective.batch_real=10")
    whole = loss_and_grad(cfg, real, syn, **WHOLE)
    assert_same(whole, loss_and_grad(cfg, real, syn, cpu_chunk=3, channels_last=False))
    assert_same(whole, loss_and_grad(cfg, real, syn, cpu_chunk=3, channels_last=True))


@pytest.mark.parametrize("method,metric", [("dc", "ours"), ("dsa", "ours"), ("dc", "mse"), ("dsa", "cos")])
def test_dc_chunked_and_class_batched_gradients_equal_the_per_class_loop(tiny_root, method, metric):
    cfg, real, syn = setting(tiny_root, f"method={method}", "objective.batch_real=10", f"objective.metric={metric}")
    loop = loss_and_grad(cfg, real, syn, **WHOLE)
    assert_same(loop, loss_and_grad(cfg, real, syn, cpu_chunk=3, channels_last=False, batched_classes=False))
    assert_same(loop, loss_and_grad(cfg, real, syn, cpu_chunk=3, batched_classes=True))


def test_dc_with_batchnorm_keeps_whole_batches(tiny_root):
    """BatchNorm normalizes with the batch: chunks or a vmap over classes would change the loss, so a
    batch-dependent network keeps the per-class loop over whole batches whatever the settings."""
    cfg, real, syn = setting(tiny_root, "method=dc", "objective.batch_real=10", "net.norm=batchnorm")
    loop = loss_and_grad(cfg, real, syn, **WHOLE)
    fast = loss_and_grad(cfg, real, syn, cpu_chunk=3, batched_classes=True)
    assert_same(loop, fast)  # chunks or a vmap would move BatchNorm's statistics far beyond this tolerance
    if DEVICE.type == "cpu":  # the very same computation (a GPU reorders its float sums from call to call)
        assert torch.equal(loop[0], fast[0]) and torch.equal(loop[1], fast[1])


def test_match_loss_over_stacked_classes_is_the_sum_of_per_class_losses():
    g = torch.Generator().manual_seed(0)
    shapes = [(4, 3, 3, 3), (4,), (5, 4)]
    gs = [torch.randn(3, *s, generator=g, dtype=torch.float64) for s in shapes]
    gr = [torch.randn(3, *s, generator=g, dtype=torch.float64) for s in shapes]
    for metric in ("ours", "mse", "cos"):
        per_class = sum(match_loss([t[c] for t in gs], [t[c] for t in gr], metric) for c in range(3))
        torch.testing.assert_close(match_loss_classes(gs, gr, metric), per_class)


@pytest.mark.parametrize("net,extra", [("convnet", []), ("convnet", ["net.norm=batchnorm"]), ("mlp", [])])
def test_ensemble_trains_each_member_as_its_sequential_run(tiny_root, net, extra):
    """Same initialization, batches and DSA draws: float64 parameters (and BatchNorm running statistics) agree to
    rounding after two epochs, and so do the test accuracies (ConvNet with instance norm and with BatchNorm, whose
    running statistics are per member, and an MLP)."""
    cfg, real, syn = setting(tiny_root, "method=dsa", *extra, net=net)
    real.test_images = real.test_images.double()
    factory, aug, seeds = build(cfg.net), build(cfg.augment), [11, 12, 13]
    images = syn.images.detach()
    sequential = []
    for s in seeds:
        m = build_net(factory, real, s, DEVICE).double()
        opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        g = torch.Generator().manual_seed(s)
        for _ in range(2):
            train_epoch(m, images, syn.labels, opt, 8, aug, g)
        sequential.append(m)
    ens = Ensemble([speed.layout(build_net(factory, real, s, DEVICE).double()) for s in seeds])
    opt = torch.optim.SGD(list(ens.params.values()), lr=0.01, momentum=0.9, weight_decay=5e-4)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    for _ in range(2):
        train_epoch_ensemble(ens, images, syn.labels, opt, gens, 8, aug)
    for e, m in enumerate(sequential):
        for k, p in m.named_parameters():
            torch.testing.assert_close(ens.params[k][e], p.detach(), rtol=1e-9, atol=1e-11)
        for k, b in m.named_buffers():
            torch.testing.assert_close(ens.buffers[k][e], b, rtol=1e-9, atol=1e-11)
    assert ens.accuracy(real.test_images, real.test_labels, 7) == \
        [accuracy(m, real.test_images, real.test_labels) for m in sequential]


def test_evaluator_ensemble_knob(tiny_root):
    """``evaluator.ensemble=true`` trains the networks stacked, ``false`` one after the other (float32 here: the
    accuracies agree within a few test images), ``auto`` stacks on a GPU only; a bad value is one line."""
    cfg = make_cfg(["dataset=mnist", f"paths.data={tiny_root}", "dataset.system_dirs=[]", "ipc=2", "net.width=8",
                    "debug=smoke", "evaluator.num_eval=2", "evaluator.epochs=3"])
    real = build(cfg.dataset).to(DEVICE)
    syn = build(cfg.init)(real, 2, torch.Generator().manual_seed(1)).to(DEVICE)
    ev = build(cfg.evaluator)
    assert ev.stacked(DEVICE) == (DEVICE.type == "cuda")
    ev.ensemble = True
    stacked = ev(syn, real, 0)["per_net"]["convnet"]
    ev.ensemble = False
    sequential = ev(syn, real, 0)["per_net"]["convnet"]
    assert len(stacked) == 2 and all(abs(a - b) <= 100 * 3 / len(real.test_labels) for a, b in zip(stacked, sequential))
    with pytest.raises(ConfigError, match="evaluator.ensemble"):
        build(make_cfg(["evaluator.ensemble=maybe"]).evaluator)


@pytest.mark.skipif(DEVICE.type == "cpu" and not shutil.which(os.environ.get("CXX", "g++")),
                    reason="torch.compile on the CPU needs a C++ compiler (g++ or $CXX)")
def test_compiled_ensemble_equals_eager_and_compiles_once_per_architecture(tiny_root):
    """``speed.compile``: the stacked loss and its gradients are the eager ones up to float rounding, training
    steps agree, the compiled test pass (its last batch padded) counts what the eager one counts, and a second
    ensemble of the same architecture (the next evaluation) reuses the compilation."""
    cfg, real, _ = setting(tiny_root, "method=dsa")
    factory = build(cfg.net)
    x = torch.randn(3, 6, 1, 28, 28, device=DEVICE)
    y = torch.randint(0, 10, (3, 6), device=DEVICE)
    ensembles = []
    for compiled in (False, True, True):
        with speed.using(compile=compiled):
            ens = Ensemble([build_net(factory, real, s, DEVICE) for s in (1, 2, 3)])
        opt = torch.optim.SGD(list(ens.params.values()), lr=0.01, momentum=0.9)
        for _ in range(2):
            loss = ens.loss(x, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        ensembles.append(ens)
    eager, first, second = ensembles
    assert first._loss is second._loss and first._forward is second._forward and first._loss is not eager._loss
    for ens in (first, second):
        for k, p in eager.params.items():
            torch.testing.assert_close(ens.params[k], p, rtol=1e-4, atol=1e-5)
    images, labels = real.test_images.float()[:50], real.test_labels[:50]
    want = eager.accuracy(images, labels, 3 * 7)  # batches of 7 images: the last one (1 image) padded when compiled
    first.params = {k: v.detach().clone() for k, v in eager.params.items()}
    assert first.accuracy(images, labels, 3 * 7) == want


def test_bad_speed_settings_are_one_line_errors():
    before = speed.current()
    with pytest.raises(ConfigError, match="speed.autocast='fp8'"):
        speed.configure({"autocast": "fp8"})
    with pytest.raises(ConfigError, match="speed.cpu_chunk=0"):
        speed.configure({"cpu_chunk": 0})
    with pytest.raises(ConfigError, match="speed.warp: unknown setting"):
        speed.configure({"warp": True})
    assert speed.current() == before  # a refused setting changes nothing


def test_deterministic_affine_resampling_equals_grid_sample():
    """DSA's scale/rotate under ``deterministic=true`` on CUDA resample with gathers (grid_sample's CUDA backward
    has no deterministic kernel): the same values and gradients as ``grid_sample`` (checked here on any device)."""
    from ddrun.data.augment import DSA

    dsa = DSA("scale_rotate")
    x = torch.randn(4, 3, 9, 7, dtype=torch.float64, device=DEVICE, requires_grad=True)
    theta = torch.tensor([[1.1, 0.2, 0.0], [-0.3, 0.9, 0.0]], dtype=torch.float64).expand(4, 2, 3)
    ref = dsa._affine(x, theta, gather=False)
    out = dsa._affine(x, theta, gather=True)
    torch.testing.assert_close(out, ref)
    w = torch.randn_like(ref)
    (ga,) = torch.autograd.grad((ref * w).sum(), x)
    (gb,) = torch.autograd.grad((out * w).sum(), x)
    torch.testing.assert_close(ga, gb)


def deterministic_run(root, tmp, *extra):
    cfg = make_cfg(["dataset=mnist", f"paths.data={root}", "dataset.system_dirs=[]", "ipc=2", "net.width=8",
                    "debug=smoke", "logger=none", "method=dsa", "schedule.outer_loop=2", "schedule.inner_loop=1",
                    "evaluator.num_eval=0", "deterministic=true", *extra])
    try:
        return torch.load(Path(distill(cfg, tmp)["synthetic"]), weights_only=True)["images"]
    finally:
        speed.configure()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the GPU variant needs CUDA"))])
def test_deterministic_repeats_s_exactly(tiny_root, tmp_path, device):
    """``deterministic=true``: the same seed gives bitwise the same S (DSA: Siamese augmentation with affine
    resampling, class-batched gradients on CUDA)."""
    a = deterministic_run(tiny_root, tmp_path / "a", f"device={device}")
    b = deterministic_run(tiny_root, tmp_path / "b", f"device={device}")
    assert torch.equal(a, b)


def test_speed_settings_are_not_part_of_the_configuration_hash():
    """Like ``device``, the speed settings change how S is computed, not what: a run resumes under other ones."""
    from ddrun.distill import config_hash

    base = config_hash(make_cfg(["method=dsa", "ipc=1"]))
    assert base == config_hash(make_cfg(["method=dsa", "ipc=1", "speed.channels_last=false", "deterministic=true",
                                         "speed.batched_classes=true", "speed.cpu_chunk=8"]))
    assert base != config_hash(make_cfg(["method=dsa", "ipc=1", "objective.lr_img=0.2"]))


def test_bf16_autocast_trains_like_float32_and_every_accuracy_says_so(tiny_root, caplog):
    """``speed.autocast=bf16`` (CUDA and CPU) wraps whole trainings; the networks must learn under it as in float32
    (with torch's cast cache on, each step's forward reused the bfloat16 copy of the weights from before the
    first step: the loss stayed within 3 % of its start and the evaluation networks at chance), and the protocol
    of such an accuracy names it. On the CPU, where it measured slower, it says so once."""
    cfg, real, _ = setting(tiny_root, "net.width=16", "evaluator.num_eval=1", "evaluator.epochs=2")
    images, labels = real.train_images.float(), real.train_labels
    syn = types.SimpleNamespace(images=images, labels=labels, lr=None, meta={})
    ev = build(cfg.evaluator)
    losses = {}
    speed._warn_cpu_bf16.cache_clear()  # once per process: this test counts its own
    for mode in ("none", "bf16"):
        with speed.using(autocast=mode):
            net = build_net(build(cfg.net), real, 5, DEVICE)
            opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
            g = torch.Generator().manual_seed(0)
            with speed.autocast(DEVICE):
                losses[mode] = [train_epoch(net, images, labels, opt, 32, None, g) for _ in range(16)]
            res = speed.evaluate(ev, syn, real, 0, DEVICE)
        assert ("precision bf16 autocast" in res["protocol"]) == (mode == "bf16")
        assert res["protocol_fields"].get("precision") == (None if mode == "none" else "bf16 autocast")
    slower = [r for r in caplog.records if "speed.autocast=bf16 on the CPU" in r.getMessage()]
    assert len(slower) == (DEVICE.type == "cpu"), [r.getMessage() for r in slower]
    assert abs(losses["bf16"][0] - losses["none"][0]) < 0.05, losses
    assert min(losses["bf16"]) < 0.6 * losses["bf16"][0] and min(losses["none"]) < 0.6 * losses["none"][0], losses


@pytest.mark.parametrize("flip", [False, True])
def test_matmul_resized_crop_is_torchvisions_with_the_same_draws(flip):
    """The recover stage's batch RandomResizedCrop + flip as two matrix products (the form used on CUDA under
    deterministic=true) gives torchvision's images from the same seed, up to float rounding, with a gradient."""
    from torchvision.transforms import v2

    from ddrun.data.transforms import resized_crop_flip_matmul

    x = torch.randn(4, 3, 28, 28, dtype=torch.float64, requires_grad=True)
    ops = [v2.RandomResizedCrop([28, 28], scale=(0.08, 1.0), antialias=True)] + ([v2.RandomHorizontalFlip()] if flip
                                                                                  else [])
    for seed in range(8):
        torch.manual_seed(seed)
        ref = v2.Compose(ops)(x)
        torch.manual_seed(seed)
        ours = resized_crop_flip_matmul(x, (0.08, 1.0), flip)
        torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)
        g_ref, = torch.autograd.grad(ref.square().sum(), x)
        g_ours, = torch.autograd.grad(ours.square().sum(), x)
        torch.testing.assert_close(g_ours, g_ref, rtol=1e-9, atol=1e-9)
