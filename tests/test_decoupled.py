"""The decoupled family's components: statistics matching (hooks, category-aware and flatness terms, the BatchNorm
requirement), the KD evaluator (smoothing schedule, losses, missing teacher), RDED's selection and stitching, image
folders in and out, and the presets; tiny data, seconds each. Real-data learning:
``test_recovered_s_beats_its_initialization_under_the_kd_protocol`` (EDC, G-VBSM)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import SAME_S, assert_same_s, make_cfg
from teacher_helpers import make_teacher, tiny_args
from torch import nn

from ddrun import record
from ddrun.contracts import Fetched
from ddrun.data.datasets import RealData
from ddrun.evaluators.kd import kd_loss, smoothing_factor
from ddrun.evaluators.relabel_files import load_plan, save_plan
from ddrun.evaluators.teacher_view import within_class_diversity
from ddrun.init.rded import select_crops, stitch
from ddrun.nets import ConvNet
from ddrun.data.transforms import BatchAugment
from ddrun.objectives.statistics import (LayerInputs, StatisticsMatching, channel_stats_grouped, eigen_kl,
                                         patch_stats_grouped, real_statistics)
from ddrun.synthetic import SyntheticSet
from ddrun.utils import ConfigError, DataError, build, derive_seed


def tiny_bn_net(seed=0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 2, 3, padding=1),
                        nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 6 * 6, 3))
    with torch.no_grad():  # running statistics that are not the initial (0, 1)
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    return net.eval().requires_grad_(False)


def tiny_real(same_classes: bool) -> RealData:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 1, 6, 6, generator=g)
    x = torch.cat([base if same_classes else base + 2.0 * c for c in range(3)])
    y = torch.arange(3).repeat_interleave(4)
    return RealData("tiny", x, y, x, y, (0.5,), (0.25,), 3, ["a", "b", "c"])


def syn_of(real: RealData, ipc: int = 2) -> SyntheticSet:
    g = torch.Generator().manual_seed(1)
    return SyntheticSet(torch.randn(3 * ipc, 1, 6, 6, generator=g), torch.arange(3).repeat_interleave(ipc), 3)


# --- statistics matching ----------------------------------------------------------------------------------------

def test_hooks_give_the_hand_computed_per_channel_statistics():
    net = tiny_bn_net()
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    x = torch.randn(8, 1, 6, 6, generator=torch.Generator().manual_seed(2))
    with LayerInputs(bns) as rec:
        net(x)
    a = net[0](x)  # the first BatchNorm's input by hand
    for c in range(3):
        vals = a[:, c].flatten().tolist()
        mean = sum(vals) / len(vals)
        var = sum((v - mean) ** 2 for v in vals) / len(vals)
        m, v = channel_stats_grouped(rec.inputs[0], 1)
        assert m[0, c].item() == pytest.approx(mean, abs=1e-5) and v[0, c].item() == pytest.approx(var, abs=1e-5)
    # two groups of 4: each its own statistics; and what BatchNorm itself computes in training mode
    m2, v2 = channel_stats_grouped(rec.inputs[1], 2)
    for g, part in enumerate(rec.inputs[1].split(4)):
        bn = nn.BatchNorm2d(2, momentum=1.0).train()
        bn(part)
        n = part.numel() / 2
        assert torch.allclose(m2[g], bn.running_mean, atol=1e-5)
        assert torch.allclose(v2[g], bn.running_var * (n - 1) / n, atol=1e-5)


def objective(**kw) -> StatisticsMatching:
    return StatisticsMatching(**{"lr_img": 0.1, "augment": None, "batch_real": 4, **kw})


def loss_of(obj, net, real, syn, it=0):
    obj.prepare(syn, real)
    return obj(syn, real, Fetched(net, teacher=net), it, torch.Generator().manual_seed(0))


def test_patch_statistics_are_those_of_each_4x4_patch_position():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 2, 8, 8, generator=g)
    mean, var = patch_stats_grouped(x, 2)  # 2 batches of 3 images; 2 x 2 patch positions, row-major
    assert mean.shape == var.shape == (2, 4)
    for grp in range(2):
        for pos, (u, v) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
            patch = x[3 * grp:3 * grp + 3, :, 4 * u:4 * u + 4, 4 * v:4 * v + 4].flatten()
            assert mean[grp, pos].item() == pytest.approx(patch.mean().item(), abs=1e-6)
            assert var[grp, pos].item() == pytest.approx(patch.var(unbiased=False).item(), abs=1e-6)
    # sizes that are not multiples of 4 are resized first: 6 x 6 -> 8 x 8, 4 positions; a constant stays constant
    m6, v6 = patch_stats_grouped(torch.full((2, 1, 6, 6), 3.0), 1)
    assert m6.shape == (1, 4) and torch.allclose(m6, torch.full_like(m6, 3.0)) and v6.abs().max() < 1e-10
    # the real targets have the same layout, and patch=true adds the term (it needs conv)
    net, real = tiny_bn_net(), tiny_real(same_classes=False)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    stats = real_statistics(net, convs, real, 4, torch.Generator(), patch_layers=range(len(convs)))
    assert stats[0]["patch_mean"].shape == (4,) and stats[0]["patch_class_var"].shape == (3, 4)
    inputs = torch.nn.functional.interpolate(real.train_images, size=(8, 8), mode="bilinear")
    assert torch.allclose(stats[0]["patch_class_mean"][1], patch_stats_grouped(inputs[4:8], 1)[0][0], atol=1e-5)
    syn = syn_of(real)
    plain = loss_of(objective(bn=False, conv=True, ce_weight=0.0), net, real, syn)
    with_patch = loss_of(objective(bn=False, conv=True, ce_weight=0.0, patch=True), net, real, syn)
    assert with_patch.item() > plain.item() + 1e-3
    with pytest.raises(ConfigError, match="patch=true .* set objective.conv=true"):
        objective(patch=True)


def test_category_aware_term_equals_the_global_term_when_classes_share_statistics():
    net, syn = tiny_bn_net(), None
    for same in (True, False):
        real = tiny_real(same_classes=same)
        syn = syn_of(real)
        glob = loss_of(objective(bn=False, conv=True, patch=True, alpha=1.0, ce_weight=0.0), net, real, syn)
        soft = loss_of(objective(bn=False, conv=True, patch=True, alpha=0.5, ce_weight=0.0), net, real, syn)
        if same:
            assert soft.item() == pytest.approx(glob.item(), rel=1e-5)
        else:
            assert abs(soft.item() - glob.item()) > 1e-3  # per-class statistics differ: the terms differ
    # the cached real statistics are those of the data, per class and over all classes
    real = tiny_real(same_classes=False)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    stats = real_statistics(net, convs, real, 4, torch.Generator())
    assert torch.allclose(stats[0]["class_mean"][:, 0], torch.tensor([0.0, 2.0, 4.0]) + real.train_images[:4].mean(),
                          atol=1e-5)
    assert torch.allclose(stats[0]["mean"], real.train_images.mean().view(1), atol=1e-5)


def test_flatness_term_is_zero_when_s_equals_its_ema_copy():
    net, real = tiny_bn_net(), tiny_real(same_classes=False)
    syn = syn_of(real)
    obj = objective(flatness=1.0, r_bn=0.0, ce_weight=0.0, augment=build({
        "_target_": "ddrun.data.transforms.BatchAugment", "kind": "resized_crop", "scale": [0.5, 1.0], "flip": True}))
    assert loss_of(obj, net, real, syn).item() == 0.0
    with torch.no_grad():
        syn.images.add_(0.5 * torch.randn_like(syn.images))  # S moved, its EMA copy did not
    loss = obj(syn, real, Fetched(net, teacher=net), 1, torch.Generator().manual_seed(0))
    assert loss.item() > 0
    ema_before = obj.state_dict()["ema"]
    # the EMA copy moved towards S by (1 - beta), and is objective state for the checkpoint
    obj.load_state_dict({"ema": ema_before})
    assert torch.equal(obj.ema, ema_before)


def test_statistics_loss_reaches_s_and_batches_are_one_image_per_class():
    net, real = tiny_bn_net(), tiny_real(same_classes=False)
    syn = syn_of(real, ipc=2)
    obj = objective()
    order = obj.batches(syn.hard_labels())
    assert syn.hard_labels()[order].tolist() == [0, 1, 2, 0, 1, 2]
    loss = loss_of(obj, net, real, syn)
    loss.backward()
    assert syn.images.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="ipc_per_batch=3 must divide"):
        objective(ipc_per_batch=3).batches(syn.hard_labels())
    # the valid pixel range after every update: [(0 - 0.5) / 0.25, (1 - 0.5) / 0.25] = [-2, 2]
    with torch.no_grad():
        syn.images.mul_(100)
    obj.check(syn, 0)
    assert syn.images.min() == -2.0 and syn.images.max() == 2.0


def test_momentum_statistics_are_a_running_estimate_with_the_current_batchs_gradient():
    """G-VBSM / EDC training momentum: the distance is taken at r_t = m r_{t-1} + (1 - m) s_t, its gradient flows
    through s_t only; m = 0 is the plain loss; the estimate is checkpoint state."""
    net, real = tiny_bn_net(), tiny_real(same_classes=False)
    bn1 = next(m for m in net.modules() if isinstance(m, nn.BatchNorm2d))
    m = 0.8

    def first_bn_loss(x_now, r_mean, r_var):  # the hand-computed loss of the first BatchNorm only, r_bn 1, w 1
        s_mean, s_var = channel_stats_grouped(net[0](x_now), 1)
        mean, var = r_mean + s_mean - s_mean.detach(), r_var + s_var - s_var.detach()
        return (mean - bn1.running_mean).norm(dim=-1).sum() + (var - bn1.running_var).norm(dim=-1).sum()

    syn = SyntheticSet(torch.randn(3, 1, 6, 6, generator=torch.Generator().manual_seed(3)), torch.arange(3), 3)
    obj = objective(ce_weight=0.0, r_bn=1.0, first_multiplier=1.0, stats_momentum=m)
    obj.prepare(syn, real)
    plain = objective(ce_weight=0.0, r_bn=1.0, first_multiplier=1.0)
    x1 = syn.images.detach().clone()
    s1 = channel_stats_grouped(net[0](x1), 1)
    step1 = obj(syn, real, Fetched(net, teacher=net), 0, torch.Generator())
    assert step1.item() == pytest.approx(loss_of(plain, net, real, syn).item(), rel=1e-6)  # r_1 = s_1
    with torch.no_grad():
        syn.images.add_(0.7 * torch.randn(syn.images.shape, generator=torch.Generator().manual_seed(4)))
    saved = obj.state_dict()
    assert set(saved) == {"ema", "running.mean.0.0", "running.var.0.0", "running.mean.0.1", "running.var.0.1"}
    x2 = syn.images.detach().clone().requires_grad_(True)
    s2 = channel_stats_grouped(net[0](x2), 1)
    r = [m * a + (1 - m) * b.detach() for a, b in zip(s1, s2)]
    want = first_bn_loss(x2, *r)
    want.backward()
    restored = objective(ce_weight=0.0, r_bn=1.0, first_multiplier=1.0, stats_momentum=m)
    restored.prepare(syn, real)
    restored.load_state_dict(saved)
    for o in (obj, restored):  # the loss of the first BatchNorm: drop the second by zeroing its weight's reach
        syn.images.grad = None
        with LayerInputs([bn1]) as rec:
            net(syn.images)
        got_mean, got_var = o._smoothed(*channel_stats_grouped(rec.inputs[0], 1), "0.0")
        got = (got_mean - bn1.running_mean).norm(dim=-1).sum() + (got_var - bn1.running_var).norm(dim=-1).sum()
        assert got.item() == pytest.approx(want.item(), rel=1e-5)
        assert torch.allclose(torch.autograd.grad(got, syn.images)[0], x2.grad, atol=1e-6)
    # the value differs from the plain loss at step 2, and m outside [0, 1) is refused
    assert abs(obj(syn, real, Fetched(net, teacher=net), 1, torch.Generator()).item()
               - loss_of(plain, net, real, syn).item()) > 1e-3
    with pytest.raises(ConfigError, match="stats_momentum=1.0"):
        objective(stats_momentum=1.0)


def test_conv_drop_leaves_conv_terms_out_with_its_probability_and_keeps_their_estimates():
    """G-VBSM's dropout of the Conv hooks: with p near 1 the loss is the BatchNorm terms alone and the Conv layers'
    running estimates stay; over many draws the Conv part is kept in a fraction 1 - p of the (layer, batch) pairs."""
    net, real = tiny_bn_net(), tiny_real(same_classes=False)
    syn = syn_of(real)
    kw = dict(ce_weight=0.0, r_bn=1.0, first_multiplier=1.0, conv=True, patch=True)
    bn_only = loss_of(objective(**{**kw, "conv": False, "patch": False}), net, real, syn).item()
    full = loss_of(objective(**kw), net, real, syn).item()
    assert full > bn_only + 1e-3
    obj = objective(**kw, conv_drop=0.999999, stats_momentum=0.5)
    assert loss_of(obj, net, real, syn).item() == pytest.approx(bn_only, rel=1e-6)
    first = {k: v.clone() for k, v in obj.running.items()}
    with torch.no_grad():
        syn.images.add_(1.0)
    obj(syn, real, Fetched(net, teacher=net), 1, torch.Generator().manual_seed(1))
    moved = {k for k in first if not torch.equal(first[k], obj.running[k])}
    bn_keys = {f"{s}.0.{i}" for s in ("mean", "var") for i in (1, 3)}  # layers: conv, bn, conv, bn
    assert moved == bn_keys
    with torch.no_grad():
        syn.images.sub_(1.0)
    p = 0.4
    obj = objective(**kw, conv_drop=p)
    obj.prepare(syn, real)
    gen = torch.Generator().manual_seed(2)
    kept = [(obj(syn, real, Fetched(net, teacher=net), i, gen).item() - bn_only) / (full - bn_only)
            for i in range(300)]
    assert sum(kept) / len(kept) == pytest.approx(1 - p, abs=0.06)
    with pytest.raises(ConfigError, match="conv_drop=0.4 acts on the Conv inputs"):
        objective(conv_drop=0.4)


def test_eigenvalue_term_by_hand_and_it_spreads_a_class_apart():
    """G-VBSM's KL on the eigenvalues of each class's Gram matrix: two images with Gram [[a, b], [b, a]] have the
    eigenvalues a - b, a + b; equal eigenvalues (orthogonal images of one norm) give 0, as does one image per class;
    its gradient makes two alike images less alike."""
    x = torch.zeros(2, 1, 2, 2)
    x[0, 0, 0, 0], x[0, 0, 0, 1] = 1.0, 0.5  # |x0|^2 = 1.25
    x[1, 0, 0, 0], x[1, 0, 1, 0] = 1.0, 0.5  # x0 . x1 = 1
    lam = torch.tensor([0.25, 2.25])
    tea, stu = torch.softmax(lam / 4, 0), torch.log_softmax(lam, 0)
    assert eigen_kl(x, 1, 1, 4.0).item() == pytest.approx((tea * (tea.log() - stu)).sum().item(), rel=1e-5)
    ortho = torch.zeros(2, 1, 2, 2)
    ortho[0, 0, 0, 0] = ortho[1, 0, 1, 1] = 1.0
    assert eigen_kl(ortho, 1, 1, 4.0).abs().item() < 1e-7
    assert eigen_kl(torch.randn(3, 1, 4, 4), 1, 3, 4.0).item() == 0.0  # one image per class
    # two batches x two classes x two images: the sum over the four classes
    many = torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    parts = sum(eigen_kl(many[2 * i:2 * i + 2], 1, 1, 4.0) for i in range(4))
    assert eigen_kl(many, 2, 2, 4.0).item() == pytest.approx(parts.item(), rel=1e-5)
    pair = x.clone().requires_grad_(True)
    cos = lambda t: torch.nn.functional.cosine_similarity(t[0].flatten(), t[1].flatten(), dim=0).item()  # noqa: E731
    before = cos(pair)
    opt = torch.optim.SGD([pair], lr=0.1)
    for _ in range(20):
        opt.zero_grad()
        eigen_kl(pair, 1, 1, 4.0).backward()
        opt.step()
    assert cos(pair.detach()) < before - 0.05


def test_batch_augment_pads_crops_and_rolls_last():
    """G-VBSM's recover augmentation: zero padding + a random crop back to the size, then a cyclic roll; the
    result is a shifted copy of the batch with zero borders, one draw for the whole batch, differentiable."""
    aug = BatchAugment(kind="crop", padding=2, flip=False, roll=0)
    x = torch.ones(3, 1, 8, 8, requires_grad=True)
    outs = [aug(x, torch.Generator().manual_seed(s)) for s in range(20)]
    assert all(o.shape == x.shape for o in outs)
    assert any((o == 0).any() for o in outs) and all(o.sum() >= 3 * 6 * 6 for o in outs)
    assert all(torch.equal(o[0], o[1]) for o in outs)  # one draw for the batch
    outs[0].sum().backward()
    assert x.grad is not None
    ramp = torch.arange(64.0).view(1, 1, 8, 8)
    rolled = BatchAugment(kind="none", flip=False, roll=8, roll_last=True)(ramp, torch.Generator().manual_seed(3))
    assert sorted(rolled.flatten().tolist()) == list(range(64))  # a cyclic shift keeps every pixel
    assert BatchAugment(kind="crop", padding=4, flip=True, roll=32, roll_last=True).describe() == "crop4+flip+roll32"
    with pytest.raises(ConfigError, match="padding=-1"):
        BatchAugment(kind="crop", padding=-1)


def test_teacher_without_batchnorm_is_refused_naming_the_bn_variant():
    real = tiny_real(same_classes=False)
    teacher = ConvNet(1, 3, (6, 6), width=4, depth=1, norm="instancenorm").eval()
    with pytest.raises(ConfigError, match=r"the teacher net \(ConvNet\) has no BatchNorm layer: use net=convnet_bn"):
        loss_of(objective(), teacher, real, syn_of(real))


# --- the KD evaluator -------------------------------------------------------------------------------------------

def test_smoothing_schedule_values():
    n = 300
    assert [smoothing_factor(i, n, 1.0) for i in (0, n // 2, n)] == [pytest.approx(1.0), pytest.approx(0.5),
                                                                      pytest.approx(0.0, abs=1e-12)]
    assert [smoothing_factor(i, n, 2.0) for i in (0, n // 2, n)] == [
        pytest.approx(1.0), pytest.approx(0.5 * (1 + math.cos(math.pi / 4))), pytest.approx(0.5)]


def test_kd_losses():
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    y = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 3]), 5).float()
    assert kd_loss("kl", t, t, y, 20.0, 0.0).item() == pytest.approx(0.0, abs=1e-7)
    assert kd_loss("kl", s, t, y, 20.0, 0.0).item() > 0
    ce = torch.nn.functional.cross_entropy(s, torch.tensor([0, 1, 2, 3]))
    want = (((s - t) ** 2).mean() + 0.5 * ce).item()
    assert kd_loss("mse_ce", s, t, y, 1.0, 0.5).item() == pytest.approx(want, rel=1e-5)


def kd(root, store, *extra):
    return build(make_cfg([*tiny_args(root, store), "evaluator=kd", "net@evaluator.student=convnet_bn",
                           "evaluator.student.width=8", "evaluator.epochs=3", *extra]).evaluator)


def test_kd_evaluation_without_a_teacher_prints_the_teacher_command(tiny_root, tmp_path):
    ev = kd(tiny_root, tmp_path / "store")
    real = build(make_cfg(tiny_args(tiny_root, tmp_path)).dataset)
    syn = build(make_cfg(["init=real"]).init)(real, 1, torch.Generator().manual_seed(0))
    with pytest.raises(DataError, match=r"no teacher collection at .*; create it with `ddrun teacher dataset=mnist "
                                        r"net=convnet net.norm=batchnorm net.width=8 recipe=sre2l"):
        ev(syn, real, 0)


def test_kd_evaluator_trains_students_with_the_teacher_and_states_it(tiny_root, tmp_path):
    make_teacher(tiny_root, tmp_path / "store")
    real = build(make_cfg(tiny_args(tiny_root, tmp_path)).dataset)
    syn = build(make_cfg(["init=real"]).init)(real, 2, torch.Generator().manual_seed(0))
    for extra in ([], ["evaluator.loss=mse_ce", "evaluator.ema=0.9", "evaluator.mix=mixup"]):
        ev = kd(tiny_root, tmp_path / "store", *extra)
        res = ev(syn, real, 0)
        assert 0 <= res["acc_mean"] <= 100 and list(res["per_net"]) == ["convnet"]
        f = res["protocol_fields"]
        assert f["evaluator"] == "kd" and f["batch"] == "by ipc {1: 10, 10: 50, 50: 100}"
        assert "ConvNet(act relu" in f["teacher"] and "test acc" in f["teacher"] and "recipe sre2l" in f["teacher"]
        assert ev.batch_size(2, 20) == 10 and ev.batch_size(10, 100) == 50 and ev.batch_size(60, 600) == 100
    assert "MSE + 0.025 CE" in res["protocol"] and "mixup1" in res["protocol"]


def test_kd_warns_when_the_teacher_cannot_read_s(tiny_root, tmp_path, caplog):
    """S whose images the teacher reads as other classes (DM's / MTT's out-of-range ipc-1 sets: all ten read as
    one class) trains students on the teacher's reading, not S's labels: the evaluation says so."""
    make_teacher(tiny_root, tmp_path / "store")
    real = build(make_cfg(tiny_args(tiny_root, tmp_path)).dataset)
    ev = kd(tiny_root, tmp_path / "store", "evaluator.epochs=1")
    x = real.train_images[real.train_labels == 0][:1].repeat(10, 1, 1, 1)  # one image of class 0, labelled 0..9
    syn = SyntheticSet(x, torch.arange(10), 10)
    teacher = ev.teachers(real)[0]["net"]
    with torch.no_grad():
        read = int(teacher(x[:1]).argmax(1))
    with caplog.at_level("INFO", logger="ddrun.evaluate"):
        assert ev.read_s(syn, real)["teacher_agreement"] == pytest.approx(10)  # ten copies read alike: one fits
        ev(syn, real, 0)
        ev(syn, real, 1)  # a distill run's next evaluation: not warned again
    line = f"the teacher assigns only 10% of S's images to their own class (10 of 10 to class {read})"
    said = [r.levelname for r in caplog.records if line in r.getMessage()]
    assert said == ["WARNING", "INFO", "INFO"], said  # warned once per run, still logged at every evaluation
    readable = SyntheticSet(x[:1], torch.tensor([read]), 10)  # the same image under the teacher's own label
    assert ev.read_s(readable, real)["teacher_agreement"] == 100.0


def test_within_class_diversity_by_hand():
    f = torch.tensor([[1.0, 0.0], [2.0, 0.0], [1.0, 0.0], [0.0, 3.0], [5.0, 5.0]])
    y = torch.tensor([0, 0, 1, 1, 2])  # class 0: one direction (0); class 1: orthogonal (1); class 2: one image
    assert within_class_diversity(f, y, 3) == pytest.approx(0.5)
    assert within_class_diversity(f[[0, 2]], torch.tensor([0, 1]), 2) is None


def test_the_kd_evaluation_records_how_the_teacher_sees_s(tiny_root, tmp_path):
    """Realism and diversity (RDED's two properties) beside the KD accuracy: copies of one image per class have no
    diversity where a real draw has some; the agreement is the teacher's argmax share, by hand; at ipc 1 only the
    reading is reported; the numbers reach the record's ``extra``."""
    make_teacher(tiny_root, tmp_path / "store")
    real = build(make_cfg(tiny_args(tiny_root, tmp_path)).dataset)
    ev = kd(tiny_root, tmp_path / "store", "evaluator.epochs=1")
    one = build(make_cfg(["init=real"]).init)(real, 1, torch.Generator().manual_seed(0))
    copies = SyntheticSet(one.images.repeat_interleave(3, 0), one.labels.repeat_interleave(3), 10)
    teacher = ev.teachers(real)[0]["net"]
    with torch.no_grad():
        probs = teacher(copies.images).softmax(1)
    res = ev(copies, real, 0)
    assert res["teacher_agreement"] == pytest.approx(100 * float((probs.argmax(1) == copies.labels).float().mean()))
    assert res["teacher_confidence"] == pytest.approx(100 * float(probs.max(1).values.mean()), rel=1e-5)
    assert abs(res["teacher_diversity"]) < 1e-5 < res["teacher_diversity_real"]
    extra = record.evaluation(res, 0, real)["extra"]
    assert set(extra) == {"teacher_agreement", "teacher_confidence", "teacher_diversity", "teacher_diversity_real"}
    assert set(ev.read_s(one, real)) == {"teacher_agreement", "teacher_confidence"}


def test_the_whole_training_set_under_the_kd_protocol(tiny_root, tmp_path):
    """``ddrun evaluate full=true evaluator=kd``: the whole training split as S (the protocol's upper reference),
    read in place (it failed on the plain namespace the full set used to be)."""
    from ddrun.evaluate import evaluate_cmd

    make_teacher(tiny_root, tmp_path / "store")
    cfg = make_cfg([*tiny_args(tiny_root, tmp_path / "store"), "full=true", "evaluator=kd", "evaluator.epochs=1",
                    "net@evaluator.student=convnet_bn", "evaluator.student.width=8", "evaluator.num_eval=1",
                    "logger=none"], "evaluate")
    out = evaluate_cmd(cfg, tmp_path / "run")
    assert out["method"] == "full" and 0 <= out["acc_mean"] <= 100
    assert out["teacher_diversity"] == pytest.approx(out["teacher_diversity_real"], rel=1e-4)  # a draw of all: itself


def test_stored_labels_replay_one_relabel_pass_for_every_student(tiny_root, tmp_path):
    # FKD-style relabel: the plan's logits are the teacher's on exactly the images a replay rebuilds, and the teacher
    # runs once per batch of the plan however many students train (online: once per batch per student)
    make_teacher(tiny_root, tmp_path / "store")
    real = build(make_cfg(tiny_args(tiny_root, tmp_path)).dataset)
    syn = build(make_cfg(["init=real"]).init)(real, 2, torch.Generator().manual_seed(0))
    ev = kd(tiny_root, tmp_path / "store", "evaluator.labels=stored", "evaluator.num_eval=2")
    plan = ev.relabel(syn, real, seed=3)
    assert len(plan) == ev.epochs and [len(e) for e in plan] == [2] * ev.epochs  # 20 images, batch 10
    images, labels, _, k = ev._s(syn, real)
    teacher = ev.teachers(real)[0]["net"]
    for idx, seed, t in plan[0] + plan[-1]:
        x, _ = ev._batch(images[idx], labels[idx], k, torch.Generator().manual_seed(seed))
        with torch.no_grad():
            assert torch.equal(teacher(x), t)
    assert not torch.equal(plan[0][0][2], plan[1][0][2])  # each epoch its own crops
    calls = []
    hook = teacher.register_forward_hook(lambda *a: calls.append(1))
    res = ev(syn, real, 0)
    stored_calls, calls[:] = len(calls), []
    online = kd(tiny_root, tmp_path / "store", "evaluator.num_eval=2")
    online._pool = ev._pool  # the same loaded teacher, hooked
    online(syn, real, 0)
    hook.remove()
    assert stored_calls == 2 * ev.epochs and len(calls) == 2 * 2 * ev.epochs + 1  # online: + the readability check
    assert "teacher stored (one relabel pass): KL T 20" in res["protocol"] and len(res["per_net"]["convnet"]) == 2
    assert ev(syn, real, 0)["per_net"] == res["per_net"]  # the same seed replays the same plan


def test_relabel_file_is_written_once_and_replayed_by_later_evaluations(tiny_root, tmp_path):
    # FKD's label files: the second evaluation reads the plan (the teacher never runs) and trains the same students;
    # another S gets its own file; a damaged file is named; a file of another setting is refused naming the key
    make_teacher(tiny_root, tmp_path / "store")
    real = build(make_cfg(tiny_args(tiny_root, tmp_path)).dataset)
    syn = build(make_cfg(["init=real"]).init)(real, 2, torch.Generator().manual_seed(0))
    rdir = tmp_path / "relabel"
    ev = kd(tiny_root, tmp_path / "store", "evaluator.labels=stored", f"evaluator.relabel_dir={rdir}")
    first = ev(syn, real, 0)
    files = list(rdir.glob("relabel-*.pt"))
    assert len(files) == 1
    ev2 = kd(tiny_root, tmp_path / "store", "evaluator.labels=stored", f"evaluator.relabel_dir={rdir}")
    calls = []
    hook = ev2.teachers(real)[0]["net"].register_forward_hook(lambda *a: calls.append(1))
    again = ev2(syn, real, 0)
    hook.remove()
    assert calls == [] and again["per_net"] == first["per_net"]  # read, not relabeled; the same students
    in_memory = kd(tiny_root, tmp_path / "store", "evaluator.labels=stored")(syn, real, 0)
    assert in_memory["per_net"] == first["per_net"]  # a replay from the file trains as one from memory
    other = build(make_cfg(["init=real"]).init)(real, 2, torch.Generator().manual_seed(1))
    ev2(other, real, 0)
    assert len(list(rdir.glob("relabel-*.pt"))) == 2
    files[0].write_bytes(files[0].read_bytes()[:200])
    with pytest.raises(DataError, match=f"corrupt or truncated relabel file {files[0]} .*; delete {files[0]} to "
                                        "relabel"):
        ev2(syn, real, 0)
    plan = ev2.relabel(syn, real, 5)
    key = {"images": "x", "epochs": 3}
    save_plan(plan, key, tmp_path / "p.pt")
    with pytest.raises(DataError, match=r"p.pt: made for another setting \(epochs, images differ\)"):
        load_plan(tmp_path / "p.pt", {"images": "y", "epochs": 4}, torch.device("cpu"))
    with pytest.raises(ConfigError, match="relabel_dir=.* needs evaluator.labels=stored"):
        kd(tiny_root, tmp_path / "store", f"evaluator.relabel_dir={rdir}")
    with pytest.raises(ConfigError, match="relabel_dir=.* is a file: pass a folder"):  # before any relabel pass
        kd(tiny_root, tmp_path / "store", "evaluator.labels=stored", f"evaluator.relabel_dir={files[0]}")


# --- RDED ---------------------------------------------------------------------------------------------------------

def test_rded_keeps_the_lowest_loss_crops():
    # 2 crops of 3 images; crop j of image i is a constant image of value 10 j + i
    losses = torch.tensor([[0.5, 0.1, 0.9], [0.2, 0.4, 0.3]])
    crops = (10 * torch.arange(2).view(2, 1) + torch.arange(3).view(1, 3)).float().view(2, 3, 1, 1, 1).expand(
        2, 3, 1, 2, 2)
    kept, kept_loss = select_crops(losses, crops, keep=2)
    # best crop per image: image 0 -> crop 1 (0.2), image 1 -> crop 0 (0.1), image 2 -> crop 1 (0.3); keep 2 lowest
    assert kept[:, 0, 0, 0].tolist() == [1.0, 10.0] and kept_loss.tolist() == [pytest.approx(0.1),
                                                                               pytest.approx(0.2)]


def test_rded_stitches_factor_squared_crops_per_image():
    patches = torch.arange(8).float().view(8, 1, 1, 1).expand(8, 1, 3, 3)  # n = 2 images, factor 2
    out = stitch(patches, n=2, factor=2, size=(5, 5))
    # tile k of image i is patch k * n + i; tiles 3 (first row/col) and 2 pixels
    assert out.shape == (2, 1, 5, 5)
    assert out[0, 0, 0, 0] == 0 and out[0, 0, 0, 4] == 2 and out[0, 0, 4, 0] == 4 and out[0, 0, 4, 4] == 6
    assert out[1, 0, 0, 0] == 1 and out[1, 0, 4, 4] == 7 and out[0, 0, 2, 2] == 0 and out[0, 0, 3, 3] == 6


def test_method_rded_selects_with_the_observer_and_runs_zero_iterations(tiny_root, tmp_path):
    from ddrun.distill import distill

    make_teacher(tiny_root, tmp_path / "store")
    cfg = make_cfg([*tiny_args(tiny_root, tmp_path / "store"), "method=rded", "ipc=2", "init.mipc=12",
                    "net@evaluator.student=convnet_bn", "evaluator.student.width=8", "evaluator.epochs=2",
                    "logger=none"])
    assert cfg.iterations == 0 and cfg.get("objective") is None
    out = distill(cfg, tmp_path / "run")
    s = torch.load(out["synthetic"], weights_only=True)
    assert s["images"].shape == (20, 1, 28, 28) and out["protocol_fields"]["evaluator"] == "kd"
    # every kept image is a crop of a real training image scored by the observer: within the pixel range
    assert s["images"].min() >= (0 - 0.1307) / 0.3081 - 1e-5 and s["images"].max() <= (1 - 0.1307) / 0.3081 + 1e-5
    # the KD evaluation's reading of S reaches the metrics and the record
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    view = next(row for row in logged if "teacher_agreement" in row)
    recorded = json.loads((tmp_path / "run" / "results.json").read_text())["evaluations"][-1]["extra"]
    assert view["teacher_agreement"] == recorded["teacher_agreement"] == out["teacher_agreement"]
    assert 0 <= recorded["teacher_diversity"] < 2 and 0 < recorded["teacher_diversity_real"] < 2


# --- image folders ------------------------------------------------------------------------------------------------

def test_export_import_round_trip(tiny_root, tmp_path):
    from ddrun.evaluate import evaluate_cmd
    from ddrun.export import export
    from ddrun.imagefolder import read_imagefolder

    real = build(make_cfg(tiny_args(tiny_root, tmp_path)).dataset)
    syn = build(make_cfg(["init=real"]).init)(real, 3, torch.Generator().manual_seed(0))
    syn.meta.update(dataset="mnist", mean=list(real.mean), std=list(real.std), zca=False, ipc=3, method="random")
    syn.save(tmp_path / "hard.pt")
    soft = SyntheticSet(syn.images, torch.randn(30, 10), 10, meta=syn.meta)
    soft.save(tmp_path / "soft.pt")
    for name, s in (("hard", syn), ("soft", soft)):
        out = export(make_cfg([f"synthetic={tmp_path / name}.pt", f"out={tmp_path / name}"], "export"))
        assert out["images"] == 30 and out["soft_labels"] == (name == "soft")
        assert sorted(p.name for p in (tmp_path / name).iterdir())[:2] == ["000", "001"]
        back = read_imagefolder(tmp_path / name, real)
        assert torch.allclose(back.images, s.images, atol=1e-6) and torch.equal(back.labels, s.labels)
        assert back.meta["method"] == "random" and back.ipc == 3
    # an optimized S (not 8-bit) comes back within 1/255 per pixel
    noisy = SyntheticSet(syn.images + 0.01 * torch.randn_like(syn.images), syn.labels, 10, meta=syn.meta)
    noisy.save(tmp_path / "noisy.pt")
    export(make_cfg([f"synthetic={tmp_path / 'noisy.pt'}", f"out={tmp_path / 'noisy'}"], "export"))
    back = read_imagefolder(tmp_path / "noisy", real)
    assert (real.to_pixels(back.images) - real.to_pixels(noisy.images)).abs().max() <= 0.5 / 255 + 1e-6
    # `ddrun evaluate synthetic=<folder>` reads it
    res = evaluate_cmd(make_cfg([*tiny_args(tiny_root, tmp_path), f"synthetic={tmp_path / 'soft'}", "net=convnet",
                                 "evaluator.num_eval=1", "evaluator.epochs=1", "logger=none"], "evaluate"))
    assert res["ipc"] == 3 and res["method"] == "random"


def test_soft_labels_of_the_wrong_shape_are_refused_naming_the_file(tiny_root, tmp_path):
    from ddrun.export import export
    from ddrun.imagefolder import read_imagefolder

    real = build(make_cfg(tiny_args(tiny_root, tmp_path)).dataset)
    syn = SyntheticSet(real.train_images[:20], torch.randn(20, 10), 10,
                       meta={"mean": list(real.mean), "std": list(real.std)})
    syn.save(tmp_path / "s.pt")
    export(make_cfg([f"synthetic={tmp_path / 's.pt'}", f"out={tmp_path / 'f'}"], "export"))
    torch.save({"labels": torch.randn(20, 7)}, tmp_path / "f" / "labels.pt")
    with pytest.raises(DataError, match=rf"{tmp_path / 'f' / 'labels.pt'}: soft labels of shape \[20, 7\], "
                                        r"expected float \[20, 10\]"):
        read_imagefolder(tmp_path / "f", real)


def test_export_never_mixes_two_sets_in_one_folder(tiny_root, tmp_path):
    """A non-empty `out` is refused (the files stay as they were); overwrite=true replaces an earlier ddrun export
    completely (no image of the first set is left), but never a folder holding anything else; `out` a file is one
    line."""
    from ddrun.export import export
    from ddrun.imagefolder import read_imagefolder

    real = build(make_cfg(tiny_args(tiny_root, tmp_path)).dataset)
    meta = {"mean": list(real.mean), "std": list(real.std)}
    SyntheticSet(real.train_images[:20], torch.randn(20, 10), 10, meta=meta).save(tmp_path / "soft20.pt")
    one = torch.cat([torch.nonzero(real.train_labels == k)[:1, 0] for k in range(10)])  # 1 per class
    SyntheticSet(real.train_images[one], real.train_labels[one], 10, meta=meta).save(tmp_path / "hard10.pt")
    cfg = [f"synthetic={tmp_path / 'soft20.pt'}", f"out={tmp_path / 'f'}"]
    export(make_cfg(cfg, "export"))
    before = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "f").rglob("*"))
    second = [f"synthetic={tmp_path / 'hard10.pt'}", f"out={tmp_path / 'f'}"]
    with pytest.raises(ConfigError, match=r"is not empty: pass out=<a new or empty folder>, or overwrite=true"):
        export(make_cfg(second, "export"))
    assert sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "f").rglob("*")) == before
    export(make_cfg([*second, "overwrite=true"], "export"))
    back = read_imagefolder(tmp_path / "f", real)
    assert len(back.images) == 10 and not back.soft and not (tmp_path / "f" / "labels.pt").exists()
    (tmp_path / "f" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="notes.txt was not written by ddrun export"):
        export(make_cfg([*second, "overwrite=true"], "export"))
    assert (tmp_path / "f" / "notes.txt").read_text() == "mine" and len(list((tmp_path / "f").rglob("*.png"))) == 10
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        export(make_cfg([f"synthetic={tmp_path / 'hard10.pt'}", f"out={tmp_path / 'afile'}"], "export"))


def test_an_image_folder_holds_every_class_and_is_not_a_run_folder(tiny_root, tmp_path):
    """A folder missing classes, or a ddrun run folder passed instead of its synthetic.pt (whose images/ and wandb/
    would read as two classes), is refused in one line instead of being scored."""
    import shutil

    from ddrun.export import export
    from ddrun.imagefolder import read_imagefolder

    real = build(make_cfg(tiny_args(tiny_root, tmp_path)).dataset)
    two = torch.cat([torch.nonzero(real.train_labels == k)[:2, 0] for k in range(10)])  # 2 per class
    SyntheticSet(real.train_images[two], real.train_labels[two], 10,
                 meta={"mean": list(real.mean), "std": list(real.std)}).save(tmp_path / "s.pt")
    export(make_cfg([f"synthetic={tmp_path / 's.pt'}", f"out={tmp_path / 'f'}"], "export"))
    for k in range(3, 10):
        shutil.rmtree(tmp_path / "f" / f"{k:03d}")
    with pytest.raises(ConfigError, match="has 3 class folders .* but dataset=mnist has 10 classes: with hard labels"):
        read_imagefolder(tmp_path / "f", real)
    run = tmp_path / "run"
    (run / "images" / "x").mkdir(parents=True)
    (run / "images" / "synthetic_000000.png").write_bytes((tmp_path / "f" / "000" / "00000.png").read_bytes())
    shutil.copy(tmp_path / "s.pt", run / "synthetic.pt")
    with pytest.raises(ConfigError, match=f"{run} is a ddrun run folder, not an image folder: pass "
                                          f"synthetic={run / 'synthetic.pt'}"):
        read_imagefolder(run, real)


# --- presets ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dataset", ["cifar10", "cifar100", "tiny_imagenet", "fashion_mnist", "mnist"])
def test_presets_carry_the_reference_settings(dataset):
    edc, sre2l, rded, gvbsm = (make_cfg([f"method={m}", f"dataset={dataset}"])
                               for m in ("edc", "sre2l", "rded", "gvbsm"))
    assert edc.syn_optimizer.betas == [0.5, 0.9] and edc.syn_scheduler.total == edc.iterations
    assert (edc.objective.alpha, edc.objective.flatness, edc.objective.conv, edc.objective.lr_img) == (0.5, 0.25,
                                                                                                      True, 0.05)
    assert edc.evaluator.loss == "mse_ce" and edc.evaluator.ema == 0.99 and edc.init._target_ == "ddrun.init.real"
    assert sre2l.init._target_ == "ddrun.init.noise" and sre2l.objective.alpha == 1.0
    assert rded.iterations == 0 and rded.init.num_crop == 5 and rded.init.mipc == 300
    assert rded.evaluator.augment.scale == [1.0, 1.0]  # RDED validation: scale (1/factor, 1), factor 1
    assert edc.evaluator.augment.scale == edc.objective.augment.scale  # EDC train.sh crops as its recover
    assert edc.objective.stats_momentum == 0.8 and sre2l.objective.stats_momentum == 0.0 and edc.objective.patch
    want_iters = {"cifar10": 75, "cifar100": 2000, "tiny_imagenet": 2000}.get(dataset, 75)
    assert edc.iterations == want_iters
    assert sre2l.iterations == {"tiny_imagenet": 4000}.get(dataset, 1000)
    assert (sre2l.objective.r_bn, sre2l.objective.lr_img) == ((1.0, 0.1) if dataset == "tiny_imagenet" else
                                                              (0.01, 0.25))
    # G-VBSM (its recover.sh / utils.py / train.sh)
    go = gvbsm.objective
    assert (gvbsm.iterations, go.lr_img, go.r_bn, go.first_multiplier, go.stats_momentum, go.conv_drop,
            go.nuc_norm, go.nuc_tau) == (4000, 0.05, 0.01, 10.0, 0.8, 0.4, 1.0, 4.0)
    assert go.conv and go.patch and go.alpha == 1.0 and go.flatness == 0.0
    assert gvbsm.init._target_ == "ddrun.init.noise" and (go.augment.kind, go.augment.roll_last) == ("crop", True)
    assert [make_cfg(["method=gvbsm", f"dataset={dataset}", f"ipc={i}"]).objective.ipc_per_batch
            for i in (1, 10, 50)] == [1, 10, 10]
    assert gvbsm.evaluator.loss == "mse_ce" and gvbsm.evaluator.schedule == "cosine" and gvbsm.evaluator.ema is None
    assert (gvbsm.evaluator.labels, edc.evaluator.labels, sre2l.evaluator.labels) == ("stored", "online", "online")
    assert (gvbsm.evaluator.gamma, gvbsm.evaluator.optimizer) == {"cifar100": (0.15, "sgd"),
                                                                   "tiny_imagenet": (0.1, "sgd")}.get(dataset,
                                                                                                     (0.15, "adamw"))
    assert go.augment.padding == (8 if dataset == "tiny_imagenet" else 4)
    if dataset == "cifar100":
        assert dict(rded.evaluator.batch_by_ipc) == {1: 20, 10: 100, 50: 200}
        assert edc.objective.augment.scale == [0.5, 1.0] and edc.evaluator.batch_train == 50


# --- learning on real data ----------------------------------------------------------------------------------------

@pytest.mark.realdata
@pytest.mark.parametrize("method,extra", [("edc", []), ("gvbsm", ["objective.ipc_per_batch=2"])])
def test_recovered_s_beats_its_initialization_under_the_kd_protocol(fmnist_root, tmp_path, method, extra):
    """EDC (from ipc 2 real images) and G-VBSM (from noise, both images of a class in one batch so that its
    eigenvalue term acts), preset settings but 150 recover iterations, on real Fashion-MNIST (300 training images per
    class) with a small teacher (ConvNet-BN-16, 2 epochs, ~72 %): the recovered S beats its own initialization under
    one KD protocol (ConvNet-BN-16 students, 150 epochs, same 3 seeds for both sets)."""
    from ddrun.distill import distill
    from ddrun.teachers import teacher

    base = ["dataset=fashion_mnist", f"paths.data={fmnist_root}", "dataset.train_subset=300",
            "dataset.test_subset=300", "net=convnet_bn", "net.width=16", f"paths.buffers={tmp_path / 'store'}"]
    teacher(make_cfg([*base, "recipe.epochs=2", "recipe.batch=64"], "teacher"))
    cfg = make_cfg([*base, f"method={method}", "ipc=2", "iterations=150", *extra, "evaluator.num_eval=0",
                    "logger=none"])
    out = distill(cfg, tmp_path / "run")
    real = build(cfg.dataset)
    init = build(cfg.init)(real, 2, torch.Generator().manual_seed(derive_seed(0, 1)))  # the run's initialization
    recovered = SyntheticSet.load(out["synthetic"])
    assert (recovered.images - init.images).abs().mean() > 0.05  # the recover stage moved S
    ev = build(make_cfg([*base, "evaluator=kd", "net@evaluator.student=convnet_bn", "evaluator.student.width=16",
                         "evaluator.epochs=150", "evaluator.num_eval=3"]).evaluator)
    before, after = ev(init, real, 0), ev(recovered, real, 0)
    assert after["acc_mean"] > before["acc_mean"] + 1.0, (before["per_net"], after["per_net"])


@pytest.mark.parametrize("method,extra", [("edc", []), ("gvbsm", ["objective.ipc_per_batch=2"])])
def test_recover_run_resumes_to_the_same_s(tiny_root, tmp_path, method, extra):
    """A recover run's state (Adam moments, the cosine schedule, the EMA copy of EDC's flatness term, the running
    estimates of S's statistics, the generator behind G-VBSM's Conv-hook dropout) is all in the checkpoint:
    3 iterations, then a rerun to 6 in the same directory, equals 6 straight iterations bitwise."""
    from ddrun.distill import distill

    make_teacher(tiny_root, tmp_path / "store")
    args = [*tiny_args(tiny_root, tmp_path / "store"), f"method={method}", "ipc=2", "objective.batch_real=4", *extra,
            "evaluator.num_eval=0", "logger=none", "syn_scheduler.total=6", "checkpoint_every=1", *SAME_S]
    straight = distill(make_cfg([*args, "iterations=6"]), tmp_path / "a")
    distill(make_cfg([*args, "iterations=3"]), tmp_path / "b")
    ckpt = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert ckpt["objective"]["ema"].shape == (20, 1, 28, 28)
    assert any(k.startswith("running.") for k in ckpt["objective"])  # both presets keep running estimates
    resumed = distill(make_cfg([*args, "iterations=6"]), tmp_path / "b")
    a = torch.load(straight["synthetic"], weights_only=True)["images"]
    b = torch.load(resumed["synthetic"], weights_only=True)["images"]
    init = build(make_cfg(args).init)(build(make_cfg(args).dataset), 2,
                                      torch.Generator().manual_seed(derive_seed(0, 1)))
    assert not torch.equal(a, init.images)
    assert_same_s(a, b)


# --- the tables' script -------------------------------------------------------------------------------------------

def test_the_tables_script_prints_commands_that_compose_for_every_row(tmp_path):
    """scripts/decoupled_fmnist.py --dry-run (the README's commands for the decoupled tables, the pool of five
    included): every `ddrun` command it would run composes with the real config tree, and the pool's commands name
    the five backbones (the teacher and four `+net@...` members)."""
    import shlex
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "scripts" / "decoupled_fmnist.py"
    common = ["--dry-run", "--out", str(tmp_path), "--teacher", "convnet_bn_w32"]
    steps = [["teacher", "--pool"], ["buffer"], ["distill", "--ipc", "10", "--methods", "random,rded,sre2l,edc,"
                                                 "gvbsm,edc_pool,edc_pool5,rded_f2,dm,mtt"],
             ["evaluate", "--ipc", "1", "--methods", "edc_pool5"], ["evaluate", "--ipc", "1", "--kd-pool"],
             ["evaluate", "--ipc", "10", "--kd-ensemble", "--kd-student", "resnet18_bn"]]
    lines = []
    for step in steps:
        out = subprocess.run([sys.executable, str(script), *step, *common], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        lines += [line[len("$ ddrun "):] for line in out.stdout.splitlines() if line.startswith("$ ddrun ")]
    assert len(lines) == 5 + 1 + 10 + 2 + 6 + 6
    for line in lines:
        command, *overrides = shlex.split(line)
        make_cfg([o for o in overrides if not o.startswith("hydra.")], command)
    recover = [line for line in lines if "S/edc_pool5_ipc10 " in line]
    kd_pool = [line for line in lines if "_ipc1_kdp " in line]
    assert len(recover) == 1 and recover[0].count("+net@fetcher.extra_nets.") == 4
    assert len(kd_pool) == 6 and all(line.count("+net@evaluator.extra_teacher_nets.") == 4 for line in kd_pool)
    assert sum("net=shufflenet_v2" in line for line in lines if line.startswith("teacher")) == 1
