"""Kernels of finite networks for kernel ridge regression (KIP, RFAD), in PyTorch.

Every kernel here is a feature map: ``features(x) -> [N, F]`` (differentiable w.r.t. ``x``) and
``gram(fa, fb) -> [Na, Nb]``; ``resample(generator)`` draws the random networks behind it. A feature map keeps
the cost of the kernel between a support set S and a real batch T linear in |T| (RFAD's point).

- :class:`RandomFeatureNNGP`: the NNGP (conjugate) kernel of a network estimated with random features
  (Loo, Hasani, Amini & Rus, "Efficient Dataset Distillation using Random Feature Approximation", NeurIPS 2022,
  Sec. 3-4; Neal 1996; Lee et al., ICLR 2018): M networks with i.i.d. Gaussian weights
  ``W ~ N(0, w_std^2 / fan_in)``, ``b ~ N(0, b_std^2)`` and no normalization layers, ``phi_m(x)`` the flattened
  last hidden layer (``net.embed``), and

      K(x, x') = readout_w_var * <Phi(x), Phi(x')> + readout_b_var,   Phi = [phi_1, ..., phi_M] / sqrt(M * D),

  which converges to the NNGP kernel of the network's readout as M x D grows (for the ConvNet, to the NNGP of a
  finite-width network; KIP-ConvNet uses the infinite-width limit). Reference values (yolky/RFAD
  ``run_distillation.py`` / ``models.ConvNet_wide`` / ``distillation.py``): M = 8 ConvNets of width 256
  (``k=2``), no norm, ``w_std = sqrt(2)``, ``b_std = 0.1``, ``K = 2 Phi Phi^T + 0.01``.
- :class:`EmpiricalNTK`: the empirical neural tangent kernel ``<df(x)/dtheta, df(x')/dtheta>`` of one small random
  network with a scalar output (Jacot et al. 2018; the finite-width counterpart of KIP's NTK, Nguyen, Chen & Lee,
  ICLR 2021), per-sample Jacobians by ``torch.func.vmap(jacrev(...))``.
- :class:`NetworkFeatures`: the linear kernel of a given network's penultimate features (FRePo, Zhou et al.
  NeurIPS 2022, Eq. 4).
- :func:`relu_nngp`: the analytic NNGP of a one-hidden-layer ReLU network (the arc-cosine kernel of degree 1,
  Cho & Saul 2009), which the random features converge to (tests/test_krr.py).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

from ddrun.utils import seeded


def check_net_kwargs(net_kwargs: dict | None) -> None:
    """Raise ConfigError (one line) for a kernel network's ``width`` or ``depth`` below 1."""
    from ddrun.utils import ConfigError

    for key in ("width", "depth"):
        value = (net_kwargs or {}).get(key)
        if value is not None and int(value) < 1:
            raise ConfigError(f"objective.kernel.net_kwargs.{key}={value}: must be >= 1")


def gaussian_init_(net: nn.Module, w_std: float = math.sqrt(2.0), b_std: float = 0.1) -> nn.Module:
    """Re-draw every Conv/Linear weight as ``N(0, w_std^2 / fan_in)`` and bias as ``N(0, b_std^2)`` (the NNGP
    parameterization of RFAD's ``Conv2d_gaussian`` / ``GaussianLinear``), from torch's global generator, in place."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.normal_(0.0, w_std / math.sqrt(fan_in))
                if m.bias is not None:
                    m.bias.normal_(0.0, b_std)
    return net


def relu_nngp(x1: torch.Tensor, x2: torch.Tensor, w_var: float = 2.0, b_var: float = 0.01) -> torch.Tensor:
    """NNGP kernel of ``f(x) = v . relu(W x + b) + c`` with ``W_ij ~ N(0, w_var / d)``, ``b, c ~ N(0, b_var)``,
    ``v_i ~ N(0, w_var / width)`` in the infinite-width limit: with ``S(x, x') = w_var <x, x'> / d + b_var``,

        K(x, x') = w_var * sqrt(S(x,x) S(x',x')) / (2 pi) * (sin t + (pi - t) cos t) + b_var,
        t = arccos(S(x, x') / sqrt(S(x,x) S(x',x'))).

    ``x1`` ``[N1, ...]``, ``x2`` ``[N2, ...]`` (flattened to d features); returns float64 ``[N1, N2]``.
    """
    a, b = x1.flatten(1).double(), x2.flatten(1).double()
    d = a.shape[1]
    s12 = w_var * a @ b.T / d + b_var
    s11 = w_var * (a * a).sum(1) / d + b_var
    s22 = w_var * (b * b).sum(1) / d + b_var
    norm = torch.sqrt(s11[:, None] * s22[None, :])
    t = torch.arccos((s12 / norm).clamp(-1.0, 1.0))
    return w_var * norm / (2 * math.pi) * (torch.sin(t) + (math.pi - t) * torch.cos(t)) + b_var


class FeatureKernel:
    """A kernel given by a feature map. Subclasses implement :meth:`features`; :meth:`gram` is ``fa fb^T``."""

    def resample(self, generator: torch.Generator) -> None:
        """Draw new random networks (a no-op for deterministic kernels)."""

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def gram(self, fa: torch.Tensor, fb: torch.Tensor) -> torch.Tensor:
        return fa @ fb.T

    def cross(self, x: torch.Tensor, f_support: torch.Tensor, chunk: int = 500) -> torch.Tensor:
        """``K(x, S)`` ``[len(x), |S|]`` for many (real) ``x``: their features are computed without a graph, in
        chunks of ``chunk``; the result stays differentiable w.r.t. ``f_support``."""
        out = []
        for start in range(0, len(x), chunk):
            with torch.no_grad():
                f = self.features(x[start:start + chunk])
            out.append(self.gram(f, f_support))
        return torch.cat(out)


class RandomFeatureNNGP(FeatureKernel):
    """Random-feature NNGP kernel (module doc).

    Args:
        net: network factory ``(channels, num_classes, im_size, **net_kwargs) -> nn.Module`` with ``embed``
            (the ``net`` config, partial).
        channels, num_classes, im_size: the data's shape.
        device: where the random networks run.
        n_models: M, random networks per draw.
        net_kwargs: passed to ``net`` (RFAD: ``width: 256, norm: none``).
        w_std, b_std: the Gaussian parameterization of every layer.
        readout_w_var, readout_b_var: variances of the (implicit) readout layer: ``K = w_var Phi Phi^T + b_var``.
    """

    def __init__(self, net: Callable[..., nn.Module], channels: int, num_classes: int, im_size, device,
                 n_models: int = 8, net_kwargs: dict | None = None, w_std: float = math.sqrt(2.0),
                 b_std: float = 0.1, readout_w_var: float = 2.0, readout_b_var: float = 0.01):
        from ddrun.utils import ConfigError

        if int(n_models) < 1:
            raise ConfigError(f"objective.kernel.n_models={n_models}: must be >= 1")
        check_net_kwargs(net_kwargs)
        for key, value in (("w_std", w_std), ("b_std", b_std), ("readout_w_var", readout_w_var),
                           ("readout_b_var", readout_b_var)):
            if not float(value) >= 0:
                raise ConfigError(f"objective.kernel.{key}={value}: must be >= 0")
        self.factory = lambda: net(channels=channels, num_classes=num_classes, im_size=tuple(im_size),
                                   **dict(net_kwargs or {}))
        self.device, self.n_models = torch.device(device), int(n_models)
        self.w_std, self.b_std = float(w_std), float(b_std)
        self.w_var, self.b_var = float(readout_w_var), float(readout_b_var)
        self.nets: list[nn.Module] = []

    def resample(self, generator: torch.Generator) -> None:
        seeds = torch.randint(2**62, (self.n_models,), generator=generator).tolist()
        self.nets = []
        for s in seeds:
            net = seeded(lambda: gaussian_init_(self.factory(), self.w_std, self.b_std), s)
            self.nets.append(net.to(self.device).eval().requires_grad_(False))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``Phi(x)``, float ``[N, M * D]``, scaled by ``1 / sqrt(M * D)``."""
        if not self.nets:
            raise RuntimeError("RandomFeatureNNGP.resample(generator) must be called before features()")
        f = torch.cat([net.embed(x) for net in self.nets], 1)
        return f / math.sqrt(f.shape[1])

    def gram(self, fa: torch.Tensor, fb: torch.Tensor) -> torch.Tensor:
        return self.w_var * (fa @ fb.T) + self.b_var


class EmpiricalNTK(FeatureKernel):
    """Empirical NTK of one small random network with a scalar output (module doc).

    Args:
        net: network factory (the ``net`` config, partial); built with ``num_classes=1`` and ``net_kwargs``
            (e.g. ``width: 32, norm: none``) from its own default initialization.
        channels, im_size, device: the data's shape and the device.

    ``features(x)`` is the Jacobian ``[N, P]`` of the scalar output w.r.t. all P parameters, so memory is
    N x P floats per chunk: keep the network small.
    """

    def __init__(self, net: Callable[..., nn.Module], channels: int, num_classes: int, im_size, device,
                 net_kwargs: dict | None = None):
        check_net_kwargs(net_kwargs)
        self.factory = lambda: net(channels=channels, num_classes=1, im_size=tuple(im_size), **dict(net_kwargs or {}))
        self.device = torch.device(device)
        self.net: nn.Module | None = None

    def resample(self, generator: torch.Generator) -> None:
        self.net = seeded(self.factory, int(torch.randint(2**62, (1,), generator=generator)))
        self.net = self.net.to(self.device).eval().requires_grad_(False)
        self.params = {k: v.detach() for k, v in self.net.named_parameters()}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.net is None:
            raise RuntimeError("EmpiricalNTK.resample(generator) must be called before features()")
        net = self.net

        def f(params, xi):
            return functional_call(net, params, (xi.unsqueeze(0),)).reshape(())

        jac = vmap(jacrev(f), in_dims=(None, 0))(self.params, x)
        return torch.cat([j.reshape(len(x), -1) for j in jac.values()], 1)


class NetworkFeatures(FeatureKernel):
    """Linear kernel of a trained network's penultimate features, ``K = f(x) f(x')^T`` with ``f = net.embed`` in
    eval mode and frozen weights (FRePo, Zhou, Nezhadarya & Ba, NeurIPS 2022, Eq. 4)."""

    def __init__(self, net: nn.Module):
        self.net = net.eval().requires_grad_(False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.embed(x)
