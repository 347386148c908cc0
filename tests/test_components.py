"""Components on tiny tensors: networks, DSA, initializers, objectives, the synthetic set."""

from __future__ import annotations

import pytest
import torch

from ddrun.contracts import Fetched
from ddrun.data.augment import DSA
from ddrun.data.datasets import RealData
from ddrun.init import kcenter_greedy, noise, real
from ddrun.nets import ConvNet
from ddrun.objectives.distribution import DistributionMatching
from ddrun.objectives.gradient import GradientMatching, layer_distance, match_loss
from ddrun.synthetic import SyntheticSet
from ddrun.utils import ConfigError


def tiny_real(k=3, n=12, c=1, hw=28) -> RealData:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(k).repeat_interleave(n)
    x = torch.randn(k * n, c, hw, hw, generator=g) + y.view(-1, 1, 1, 1).float()
    return RealData("tiny", x, y, x[:6], y[:6], (0.5,) * c, (0.25,) * c, k, [str(i) for i in range(k)])


@pytest.mark.parametrize("c,hw,depth,feat", [(1, 28, 3, 128 * 4 * 4), (3, 32, 3, 128 * 4 * 4), (3, 32, 2, 128 * 8 * 8)])
def test_convnet_shapes(c, hw, depth, feat):
    net = ConvNet(c, 10, (hw, hw), depth=depth)
    x = torch.randn(2, c, hw, hw)
    assert net.embed(x).shape == (2, feat)
    assert net(x).shape == (2, 10)
    # one group per channel: GroupNorm(C, C) is instance norm
    norms = [m for m in net.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(norms) == depth and all(m.num_groups == m.num_channels == 128 for m in norms)


def test_convnet_reference_parameter_count():
    # 320,010 for CIFAR-10 and 317,706 for MNIST, computed from the reference definition
    assert sum(p.numel() for p in ConvNet(3, 10, (32, 32)).parameters()) == 320010
    assert sum(p.numel() for p in ConvNet(1, 10, (28, 28)).parameters()) == 317706


def test_convnet_rejects_unknown_norm():
    with pytest.raises(ConfigError, match="net.norm='bogus'.*instancenorm"):
        ConvNet(1, 10, (28, 28), norm="bogus")


@pytest.mark.parametrize("op", ["color", "crop", "cutout", "flip", "scale", "rotate"])
def test_dsa_each_op_differentiable_and_siamese(op):
    aug = DSA(op)
    x = torch.randn(4, 3, 16, 16, requires_grad=True)
    y = aug(x, torch.Generator().manual_seed(3), siamese=True)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    # Siamese: the same draw transforms two batches identically
    a = torch.randn(2, 3, 16, 16)
    ra, rb = aug.pair(a, a.clone(), torch.Generator().manual_seed(5))
    assert torch.equal(ra, rb)


def test_dsa_changes_images_and_per_sample_params_differ():
    aug = DSA("rotate")
    x = torch.randn(1, 1, 16, 16).repeat(8, 1, 1, 1)
    y = aug(x, torch.Generator().manual_seed(0), siamese=False)
    assert not torch.allclose(y, x)
    assert not torch.allclose(y[0], y[1])  # each sample its own angle
    ys = aug(x, torch.Generator().manual_seed(0), siamese=True)
    assert torch.allclose(ys[0], ys[1])  # one angle for the batch


def test_dsa_crop_is_integer_translation():
    aug = DSA("crop")
    x = torch.arange(64.).view(1, 1, 8, 8)
    y = aug(x, torch.Generator().manual_seed(1), siamese=True)
    vals = set(y.flatten().tolist()) - {0.0}
    assert vals <= set(x.flatten().tolist())  # pixels are moved, not interpolated


def test_dsa_unknown_op():
    with pytest.raises(ConfigError, match="unknown op.*'blur'"):
        DSA("crop_blur")


def test_kcenter_picks_farthest_points():
    # a tight cluster near the origin and three far outliers: K-Center from the origin must take the outliers,
    # farthest first
    pts = torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [0.1, 0.1], [10.0, 0.0], [0.0, 5.0], [-3.0, -3.0]])
    assert kcenter_greedy(pts, 4, first=0) == [0, 4, 5, 6]


def test_initializers_shapes_and_labels():
    data = tiny_real()
    g = torch.Generator().manual_seed(0)
    s = noise(data, 2, g)
    assert s.images.shape == (6, 1, 28, 28) and s.labels.tolist() == [0, 0, 1, 1, 2, 2]
    r = real(data, 2, g)
    for c in range(3):  # real init takes images of the right class
        imgs = r.images[r.class_slice(c)].detach()
        pool = data.train_images[data.train_labels == c]
        assert all(any(torch.equal(i, p) for p in pool) for i in imgs)


@pytest.mark.parametrize("objective", [DistributionMatching(lr_img=1.0, batch_real=4),
                                       GradientMatching(lr_img=0.1, batch_real=4),
                                       GradientMatching(lr_img=0.1, batch_real=4, augment=DSA())])
def test_objective_gradients_reach_images(objective):
    data = tiny_real()
    syn = noise(data, 2, torch.Generator().manual_seed(0))
    net = ConvNet(1, 3, (28, 28), width=8)
    loss = objective(syn, data, Fetched(net), 0, torch.Generator().manual_seed(1))
    assert loss.dim() == 0 and torch.isfinite(loss) and loss > 0
    loss.backward()
    assert syn.images.grad is not None and syn.images.grad.abs().sum() > 0


@pytest.mark.parametrize("objective", [DistributionMatching(lr_img=1.0, batch_real=4),
                                       GradientMatching(lr_img=0.1, batch_real=4)])
def test_a_class_without_images_is_one_line_for_per_class_objectives(objective):
    """Soft labels whose argmax leaves a class empty (DATM's expert labels from weak experts, then method=dm):
    once a DSA ValueError on an empty batch or a NaN loss."""
    from ddrun.utils import DataError

    data = tiny_real()
    logits = torch.nn.functional.one_hot(torch.tensor([0, 0, 0, 0, 2, 2]), 3).float() * 5  # class 1's point to 0
    syn = SyntheticSet(torch.randn(6, 1, 28, 28), logits, 3)
    with pytest.raises(DataError, match="S has no image of class 1: the argmax of every soft label is another"):
        objective(syn, data, Fetched(ConvNet(1, 3, (28, 28), width=8)), 0, torch.Generator().manual_seed(1))


def test_gradient_distance_properties():
    g = [torch.randn(4, 3, 3, 3), torch.randn(4)]
    assert float(match_loss(g, g)) == pytest.approx(0.0, abs=1e-5)  # identical gradients match exactly
    assert float(layer_distance(torch.randn(5), torch.randn(5))) == 0.0  # biases/norms do not count
    opp = [-t for t in g]
    assert float(match_loss(opp, g)) == pytest.approx(2 * 4, rel=1e-4)  # 1 - cos = 2 per output unit
    assert float(match_loss(g, g, "mse")) == 0.0


def test_synthetic_save_load_roundtrip(tmp_path):
    s = SyntheticSet(torch.randn(4, 1, 8, 8), torch.tensor([0, 0, 1, 1]), 2, lr=0.01, meta={"ipc": 2})
    s.save(tmp_path / "s.pt")
    d = torch.load(tmp_path / "s.pt", weights_only=True)
    assert set(d) == {"images", "labels", "lr", "meta"}
    assert torch.equal(d["images"], s.images.detach()) and float(d["lr"]) == pytest.approx(0.01)
    back = SyntheticSet.load(tmp_path / "s.pt")
    assert back.ipc == 2 and torch.equal(back.labels, s.labels)
    soft = SyntheticSet(torch.randn(2, 1, 8, 8), torch.randn(2, 2), 2, learn_labels=True)
    soft.save(tmp_path / "soft.pt")
    assert SyntheticSet.load(tmp_path / "soft.pt").soft


def test_unrolled_sgd_reaches_images_and_lr():
    from ddrun.nets.functional import flatten, params_of, unflatten, unroll_sgd

    net = ConvNet(1, 3, (28, 28), width=4, depth=1)
    p0 = params_of(net)
    assert torch.equal(flatten(unflatten(flatten(p0), net)), flatten(p0))
    images = torch.randn(6, 1, 28, 28, requires_grad=True)
    log_lr = torch.tensor(-2.0, requires_grad=True)
    out = unroll_sgd(net, p0, images, torch.tensor([0, 0, 1, 1, 2, 2]), log_lr.exp(), steps=3, batch_size=4,
                     augment=DSA(), generator=torch.Generator().manual_seed(0))
    ((flatten(out) - flatten(p0)) ** 2).sum().backward()
    assert images.grad.abs().sum() > 0 and log_lr.grad.abs() > 0
