"""The exact infinite-width NNGP and NTK of ddrun's ConvNet (no normalization), in PyTorch.

KIP (Nguyen, Novak, Xiao & Lee, "Dataset Distillation with Infinitely Wide Convolutional Networks", NeurIPS 2021)
regresses with the exact kernel of an infinitely wide ConvNet, computed with neural_tangents (JAX). This module
computes both kernels of that kind, the NNGP and the NTK (``kind='nngp'|'ntk'``), for the architecture of
:class:`ddrun.nets.ConvNet` with ``norm='none', act='relu', pooling='avgpooling'``: ``depth`` blocks of [3x3 conv
(stride 1, zero padding 1; 3 for the first conv of a 28x28 single-channel input when ``pad28``) -> ReLU -> 2x2
average pool], flatten, linear readout. Every layer has Gaussian weights ``N(0, w_var / fan_in)`` and biases ``N(0,
b_var)`` (the parameterization of :func:`ddrun.nets.kernels.gaussian_init_`), so
:class:`~ddrun.nets.kernels.RandomFeatureNNGP` with ``net_kwargs: {norm: none}`` converges to the NNGP as width x
models grows, and the empirical NTK ``J J^T`` of the same network in the NTK parameterization (parameters ``N(0,
1)``, each layer's output scaled by ``sqrt(w_var / fan_in)``, biases by ``b_std``) converges to the NTK as width
grows (tests/test_exact_kernel.py).

The recursion (Novak et al., "Bayesian Deep Convolutional Networks with Many Channels are Gaussian Processes",
ICLR 2019, Sec. 2.2 / Eq. 7; Arora et al., "On Exact Computation with an Infinitely Wide Neural Net", NeurIPS 2019,
Sec. 4 for the pooling) carries, for each pair of images (x, x'), the covariance of one channel of the
pre-activations over all pairs of positions, ``K[p, p']`` ``[H, W, H, W]``:

- first conv: ``K1[p, p'] = w_var / (C 9) <patch_p(x), patch_p'(x')> + b_var`` (one matmul of 3x3 patches);
- ReLU: ``E[relu(u) relu(v)] = sqrt(K[p,p] K'[p',p']) / (2 pi) * J(c)``, ``J(c) = sqrt(1 - c^2) + (pi - arccos c) c``,
  ``c = K[p,p'] / sqrt(K[p,p] K'[p',p'])`` with ``K[p,p]``, ``K'[p',p']`` the variances of x and x' alone
  (Cho & Saul 2009, the arc-cosine kernel of degree 1);
- 2x2 average pool: the mean over the 2x2 blocks of both position indices (an odd size drops its last row /
  column, as ``nn.AvgPool2d`` does);
- later convs: ``K'[p, p'] = w_var / 9 * sum_{q in 3x3} K[p + q, p' + q] + b_var`` (zero outside the map);
- flatten + readout: ``k(x, x') = readout_w_var * mean_p K[p, p] + readout_b_var`` (the finite readout has
  ``C H W`` inputs and variance ``readout_w_var / (C H W)``).

The NTK (``kind='ntk'``; Jacot et al. NeurIPS 2018; Arora et al. 2019's CNTK, Sec. 4 and Appendix; the rules of
neural-tangents' ``stax``) carries a second tensor ``Theta[p, p']`` of the same shape beside ``K``, with the same
normalizations (a layer's weights contribute ``w_var`` x its input covariance, its bias ``b_var``; the chain
through a later conv multiplies by ``w_var`` and the patch mean):

- first conv: ``Theta1 = K1``;
- ReLU: ``Theta <- Kdot * Theta`` with ``Kdot = E[relu'(u) relu'(v)] = (pi - arccos c) / (2 pi)`` (degree 0; the
  derivative of the ReLU covariance above w.r.t. ``K[p, p']``), ``K`` the pre-activation covariance;
- 2x2 average pool: as for ``K``;
- later convs: ``Theta' = K' + w_var / 9 * sum_q Theta[p + q, p' + q]`` (= the conv step applied to ``K + Theta``);
- flatten + readout: ``Theta_out = k(x, x') + readout_w_var * mean_p Theta[p, p]``.

So ``Theta = K + PSD terms``: the NTK is at least the NNGP on the diagonal.

Cost: O(N1 N2 (H W)^2) per layer per kernel matrix (x 9 for the later convs), dominated by the first ReLU: 10^6
entries per pair of 32x32 images; the NTK carries two such tensors (about twice the memory per chunk, and
about twice the time); measured figures in :class:`ExactConvNetNNGP`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ddrun.nets.kernels import FeatureKernel
from ddrun.utils import ConfigError


def _correlation(k: torch.Tensor, var1: torch.Tensor, var2: torch.Tensor):
    """``(s1, s2, c)`` of both ReLU steps: the standard deviations ``sqrt(var)`` broadcast to ``k``'s
    ``[B, H, W, H, W]`` (first image over the first position pair, second over the second) and the correlation
    ``c = k / (s1 s2)`` clamped to [-1, 1]."""
    s1 = var1.clamp_min(1e-30).sqrt()[:, :, :, None, None]
    s2 = var2.clamp_min(1e-30).sqrt()[:, None, None, :, :]
    return s1, s2, (k / s1).div_(s2).clamp_(-1.0, 1.0)


class _ReluCov(torch.autograd.Function):
    """``relu_cov`` with a hand-written backward: the forward allocates three full-size tensors instead of about
    ten and saves only its inputs (the derivatives are recomputed). With ``s = sqrt(var)``, ``c = k / (s1 s2)``,
    ``t = arccos c``, ``out = s1 s2 J(c) / (2 pi)``, ``J(c) = sqrt(1 - c^2) + (pi - t) c``:

        d out / d k = (pi - t) / (2 pi),        d out / d var1 = s2 sqrt(1 - c^2) / (4 pi s1)   (and 1 <-> 2),

    finite at ``c = +-1`` (autograd through ``arccos`` would give inf - inf there, e.g. on the diagonal of K(x, x)).
    """

    @staticmethod
    def _parts(k, var1, var2):
        s1, s2, c = _correlation(k, var1, var2)
        root = (c * c).neg_().add_(1.0).clamp_min_(0.0).sqrt_()
        return s1, s2, c, root

    @staticmethod
    def forward(ctx, k, var1, var2):
        ctx.save_for_backward(k, var1, var2)
        s1, s2, c, root = _ReluCov._parts(k, var1, var2)
        out = torch.arccos(c).neg_().add_(math.pi).mul_(c).add_(root)
        return out.mul_(s1 / (2.0 * math.pi)).mul_(s2)

    @staticmethod
    def backward(ctx, grad):
        k, var1, var2 = ctx.saved_tensors
        s1, s2, c, root = _ReluCov._parts(k, var1, var2)
        g_k = torch.arccos(c).neg_().add_(math.pi).mul_(grad / (2.0 * math.pi))
        w = root.mul_(grad).div_(4.0 * math.pi)
        g_v1 = (w * s2).sum(dim=(3, 4)) / s1[:, :, :, 0, 0]
        g_v2 = (w * s1).sum(dim=(1, 2)) / s2[:, 0, 0]
        return g_k, g_v1, g_v2


class _ReluDot(torch.autograd.Function):
    """``relu_dot`` with a hand-written backward. ``out = (pi - arccos c) / (2 pi)``, ``c = k / (s1 s2)``,
    ``D = 1 / (2 pi sqrt(1 - c^2))``:

        d out / d k = D / (s1 s2),     d out / d var1 = -D c / (2 var1)   (and 1 <-> 2),

    infinite at ``c = +-1``, where ``out`` is not differentiable (``~ 1/2 - sqrt(2 (1 - c)) / (2 pi)``). There ``c``
    is *saturated*: where ``1 - c^2 < 64 eps`` (float32: 7.6e-6, float64: 1.4e-14) ``c`` is snapped to +-1 in the
    forward and ``D`` is 0 in the backward. That is exact where ``c`` stays at +-1 under every perturbation (the
    diagonal of K(x, x), patches that are all padding or all background: there ``dk`` and ``dvar`` move together and
    the true derivative is 0) and keeps float rounding of ``c`` near 1 (``arccos`` turns an error ``e`` into
    ``sqrt(2 e)``) from reaching the value or the gradient.
    """

    @staticmethod
    def _parts(k, var1, var2):
        s1, s2, c = _correlation(k, var1, var2)
        one_m = (c * c).neg_().add_(1.0)
        saturated = one_m < 64.0 * torch.finfo(c.dtype).eps
        return s1, s2, c, one_m, saturated

    @staticmethod
    def forward(ctx, k, var1, var2):
        ctx.save_for_backward(k, var1, var2)
        _, _, c, _, saturated = _ReluDot._parts(k, var1, var2)
        c = torch.where(saturated, c.sign(), c)
        return torch.arccos(c).neg_().add_(math.pi).div_(2.0 * math.pi)

    @staticmethod
    def backward(ctx, grad):
        k, var1, var2 = ctx.saved_tensors
        s1, s2, c, one_m, saturated = _ReluDot._parts(k, var1, var2)
        d = one_m.clamp_min_(1e-30).rsqrt_().mul_(grad / (2.0 * math.pi)).masked_fill_(saturated, 0.0)
        g_k = d / s1 / s2
        dc = d.mul_(c).div_(-2.0)
        g_v1 = dc.sum(dim=(3, 4)) / var1.clamp_min(1e-30)
        g_v2 = dc.sum(dim=(1, 2)) / var2.clamp_min(1e-30)
        return g_k, g_v1, g_v2


def relu_dot(k: torch.Tensor, var1: torch.Tensor, var2: torch.Tensor) -> torch.Tensor:
    """``E[relu'(u) relu'(v)]`` of jointly Gaussian pre-activations: ``(pi - arccos c) / (2 pi)`` (Cho & Saul 2009,
    degree 0), the derivative of :func:`relu_cov` w.r.t. ``k``. Shapes as :func:`relu_cov`; differentiable w.r.t.
    all three inputs, with a gradient of 0 where ``c`` is saturated at +-1 (:class:`_ReluDot`)."""
    return _ReluDot.apply(k, var1, var2)


def relu_cov(k: torch.Tensor, var1: torch.Tensor, var2: torch.Tensor) -> torch.Tensor:
    """Covariance of ReLU outputs of jointly Gaussian pre-activations.

    Args:
        k: ``[B, H, W, H, W]`` covariances ``K[p, p']`` between the first and the second image of B pairs.
        var1, var2: ``[B, H, W]`` variances ``K[p, p]`` of the first image alone and ``K'[p', p']`` of the second
            alone, > 0.

    Returns ``[B, H, W, H, W]`` in ``k``'s dtype (Cho & Saul 2009, degree 1; module doc), differentiable w.r.t.
    all three inputs.
    """
    return _ReluCov.apply(k, var1, var2)


def pool_cov(k: torch.Tensor) -> torch.Tensor:
    """2x2 average pooling (stride 2, floor, like ``nn.AvgPool2d(2, 2)``) of both position indices of ``k``
    ``[B, H, W, H, W]`` -> ``[B, H//2, W//2, H//2, W//2]``."""
    b, h, w = k.shape[:3]
    h2, w2 = h // 2, w // 2
    k = F.avg_pool2d(k.reshape(b * h * w, 1, h, w), 2).reshape(b, h, w, h2, w2)     # second index pair
    k = k.permute(0, 3, 4, 1, 2).reshape(b * h2 * w2, 1, h, w)
    k = F.avg_pool2d(k, 2).reshape(b, h2, w2, h2, w2)                                # first index pair
    return k.permute(0, 3, 4, 1, 2)


def conv_cov(k: torch.Tensor, w_var: float, b_var: float) -> torch.Tensor:
    """A 3x3 convolution (stride 1, zero padding 1) of an infinitely wide layer on the covariance ``k``
    ``[B, H, W, H, W]``: ``w_var / 9 * sum_q K[p + q, p' + q] + b_var``, same shape."""
    h, w = k.shape[1:3]
    kp = F.pad(k, (1, 1, 1, 1, 1, 1, 1, 1))
    out = torch.zeros_like(k)
    for dy in range(3):
        for dx in range(3):
            out = out + kp[:, dy:dy + h, dx:dx + w, dy:dy + h, dx:dx + w]
    return out * (w_var / 9.0) + b_var


def diagonal(k: torch.Tensor) -> torch.Tensor:
    """``K[p, p]`` ``[B, H, W]`` of ``k`` ``[B, H, W, H, W]``."""
    b, h, w = k.shape[:3]
    return k.reshape(b, h * w, h * w).diagonal(dim1=1, dim2=2).reshape(b, h, w)


class ExactConvNetNNGP(FeatureKernel):
    """Exact infinite-width NNGP (or, with ``kind='ntk'``, NTK) of the ConvNet without normalization (module doc).

    Args:
        channels, num_classes, im_size: the data's shape (``num_classes`` is unused: the kernel is per output).
        device: unused (the kernel runs where its inputs are); accepted for the factory's signature.
        depth: conv blocks, >= 1 (``net.depth``).
        pad28: pad the first conv of a 28x28 single-channel input by 3 (32x32 maps, like ``ConvNet(pad28=True)``).
        w_std, b_std: weight and bias standard deviations of the conv layers (``N(0, w_std^2 / fan_in)``).
        readout_w_var, readout_b_var: variances of the readout (``k = w_var * mean_p K[p,p] + b_var``).
        chunk: pairs of images propagated at once (memory ~ ``chunk`` x 4 MB per live float32 tensor at 32x32);
            each chunk is recomputed in the backward pass (``torch.utils.checkpoint``) instead of stored.
        norm, act, pooling: must be ``none``, ``relu``, ``avgpooling`` (the only ConvNet this kernel describes).
        kind: ``nngp`` (the NNGP) or ``ntk`` (the NTK of the NTK parameterization with the same variances); the
            features are the same for both (only ``K``'s self-variances feed the ReLUs).

    ``features(x)`` (float ``[N, C, H, W]``) returns float32 (float64 for float64 input) ``[N, C H W + sum_l H_l
    W_l]``: the flattened images followed by their own pre-activation variances ``K(x, x)[p, p]`` at every layer
    (what the ReLU of every pair needs), differentiable w.r.t. ``x``. ``gram(fa, fb)`` returns float64
    ``[Na, Nb]`` (the NNGP or the NTK), differentiable w.r.t. both. ``resample`` is a no-op (the kernel is
    deterministic).

    Cost: O(Na Nb (H W)^2) time per layer; memory O(chunk (H W)^2). Measured on one CPU thread (float32, depth 3,
    pad28 -> 32x32): K(T, S) for |T| = 100, |S| = 10 Fashion-MNIST images, features of both + gram,
    forward + backward w.r.t. S (1,000 pairs + 110 self-covariances): chunk 8: 50 s (18 s forward, 32 s backward),
    peak RSS 2.2 GB; chunk 16: 74 s, 1.6 GB; chunk 4: 48 s, 6.3 GB. About 45 ms per pair: GPU-sized work for
    KIP's 5,000-target batches. The NTK, same measurement:
    chunk 8: 78 s (31 s forward, 47 s backward), peak RSS 4.7 GB; chunk 16: 106 s, 2.3 GB (the NNGP measured
    beside it: 41 s, 2.3 GB at chunk 8): about 80 ms per pair.

    Raises:
        ConfigError: depth < 1, norm/act/pooling other than the above, a map smaller than 2x2 before a pool,
            w_std/b_std/readout variances < 0, chunk < 1, ``kind`` other than ``nngp`` / ``ntk``.
        ValueError: ``gram`` inputs whose width is not this kernel's features'.
    """

    def __init__(self, channels: int, num_classes: int, im_size, device=None, depth: int = 3, pad28: bool = True,
                 w_std: float = math.sqrt(2.0), b_std: float = 0.1, readout_w_var: float = 2.0,
                 readout_b_var: float = 0.01, chunk: int = 8, norm: str = "none", act: str = "relu",
                 pooling: str = "avgpooling", kind: str = "nngp"):
        if (norm, act, pooling) != ("none", "relu", "avgpooling"):
            raise ConfigError(f"objective.kernel: the exact kernels describe the ConvNet with norm=none, act=relu, "
                              f"pooling=avgpooling (infinite width has no instance norm); got norm={norm}, "
                              f"act={act}, pooling={pooling}")
        if kind not in ("nngp", "ntk"):
            raise ConfigError(f"objective.kernel.kind={kind}: choose nngp (the exact NNGP) or ntk (the exact NTK)")
        self.kind = kind
        if int(depth) < 1 or int(chunk) < 1:
            raise ConfigError(f"objective.kernel.depth={depth}, chunk={chunk}: both must be >= 1")
        if min(w_std, b_std, readout_w_var, readout_b_var) < 0:
            raise ConfigError("objective.kernel: w_std, b_std, readout_w_var, readout_b_var must be >= 0")
        h, w = (int(s) for s in im_size)
        self.channels, self.depth, self.chunk = int(channels), int(depth), int(chunk)
        self.pad = 3 if (pad28 and self.channels == 1 and h == 28) else 1
        self.in_size = (h, w)
        self.w_var, self.b_var = float(w_std) ** 2, float(b_std) ** 2
        self.readout_w_var, self.readout_b_var = float(readout_w_var), float(readout_b_var)
        h, w = h + 2 * self.pad - 2, w + 2 * self.pad - 2
        self.sizes = []
        for d in range(self.depth):
            if h < 2 or w < 2:
                raise ConfigError(f"objective.kernel.depth={depth}: the {h}x{w} map of block {d + 1} cannot be "
                                  f"halved by the 2x2 pool (input {tuple(im_size)}); lower the depth")
            self.sizes.append((h, w))
            h, w = h // 2, w // 2
        self.n_pixels = self.channels * self.in_size[0] * self.in_size[1]
        self.width = self.n_pixels + sum(a * b for a, b in self.sizes)

    # --- the recursion ------------------------------------------------------------------------------------
    def _patches(self, x: torch.Tensor) -> torch.Tensor:
        """3x3 patches of the first conv, ``[N, H1 W1, C 9]``, in the propagation dtype."""
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        return F.unfold(x.to(dtype), 3, padding=self.pad).transpose(1, 2)

    def _first(self, pa: torch.Tensor, pb: torch.Tensor, pairs: str) -> torch.Tensor:
        """First conv's covariance ``[B, H1, W1, H1, W1]``: all pairs (``outer``) or aligned pairs (``aligned``)."""
        h, w = self.sizes[0]
        if pairs == "outer":
            pa, pb = pa[:, None], pb[None]
        k = torch.matmul(pa, pb.transpose(-1, -2)).mul_(self.w_var / pa.shape[-1]).add_(self.b_var)
        return k.reshape(-1, h, w, h, w)

    def _blocks(self, k: torch.Tensor, var1: list | None, var2: list | None):
        """Run the ``depth`` blocks on ``k``; with ``var1 = var2 = None`` the pairs are (x, x) and the variances are
        read off ``k``'s diagonal. Returns (readout kernel ``[B]``, the variances used per layer)."""
        used = []
        theta = k if (self.kind == "ntk" and var1 is not None) else None    # the NTK; Theta_1 = K_1
        for layer in range(self.depth):
            if layer > 0:
                if theta is not None:       # Theta' = K' + w_var A(Theta) = w_var A(K + Theta) + b_var
                    theta = conv_cov(k + theta, self.w_var, self.b_var)
                k = conv_cov(k, self.w_var, self.b_var)
            if var1 is None:
                v = diagonal(k)
                used.append(v)
                v1 = v2 = v
            else:
                v1, v2 = var1[layer], var2[layer]
            if theta is not None:
                theta = pool_cov(theta * relu_dot(k, v1, v2))
            k = pool_cov(relu_cov(k, v1, v2))
        if theta is not None:
            k = k + theta                   # Theta_out = K_out + readout_w_var mean_p Theta[p, p]
        out = self.readout_w_var * diagonal(k).flatten(1).mean(1) + self.readout_b_var
        return out, used

    def _self_variances(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, sum_l H_l W_l]``: each image's own pre-activation variances at every layer."""
        p = self._patches(x)
        _, used = self._blocks(self._first(p, p, "aligned"), None, None)
        return torch.cat([v.flatten(1) for v in used], 1)

    def _unpack(self, f: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if f.dim() != 2 or f.shape[1] != self.width:
            raise ValueError(f"ExactConvNetNNGP.gram: expected features [N, {self.width}] from features(), "
                             f"got {tuple(f.shape)}")
        x = f[:, :self.n_pixels].reshape(len(f), self.channels, *self.in_size)
        out, start = [], self.n_pixels
        for h, w in self.sizes:
            out.append(f[:, start:start + h * w].reshape(len(f), h, w))
            start += h * w
        return x, out

    def _pair_block(self, xa, xb, *variances) -> torch.Tensor:
        """``[len(xa), len(xb)]`` readout kernel of every pair of one chunk."""
        na, nb = len(xa), len(xb)
        va, vb = variances[:self.depth], variances[self.depth:]
        var1 = [v[:, None].expand(na, nb, *v.shape[1:]).reshape(na * nb, *v.shape[1:]) for v in va]
        var2 = [v[None, :].expand(na, nb, *v.shape[1:]).reshape(na * nb, *v.shape[1:]) for v in vb]
        k = self._first(self._patches(xa), self._patches(xb), "outer")
        out, _ = self._blocks(k, var1, var2)
        return out.reshape(na, nb)

    # --- FeatureKernel --------------------------------------------------------------------------------------
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Flattened images and their per-layer variances (class doc), computed in chunks of ``chunk`` images."""
        if tuple(x.shape[1:]) != (self.channels, *self.in_size):
            raise ValueError(f"ExactConvNetNNGP.features: expected images [N, {self.channels}, "
                             f"{self.in_size[0]}, {self.in_size[1]}], got {tuple(x.shape)}")
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        parts = [self._run(self._self_variances, x[i:i + self.chunk]) for i in range(0, len(x), self.chunk)]
        return torch.cat([x.to(dtype).flatten(1), torch.cat(parts)], 1)

    def gram(self, fa: torch.Tensor, fb: torch.Tensor) -> torch.Tensor:
        """The NNGP kernel, float64 ``[Na, Nb]``, computed in blocks of about ``chunk`` pairs."""
        xa, va = self._unpack(fa)
        xb, vb = self._unpack(fb)
        bj = min(len(xb), self.chunk)
        bi = max(1, self.chunk // max(bj, 1))
        rows = []
        for i in range(0, len(xa), bi):
            cols = [self._run(self._pair_block, xa[i:i + bi], xb[j:j + bj],
                              *[v[i:i + bi] for v in va], *[v[j:j + bj] for v in vb])
                    for j in range(0, len(xb), bj)]
            rows.append(torch.cat(cols, 1))
        return torch.cat(rows).double()

    @staticmethod
    def _run(fn, *args):
        """``fn(*args)``, checkpointed (recomputed in backward rather than stored) when a graph is being built."""
        if torch.is_grad_enabled() and any(a.requires_grad for a in args):
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)
