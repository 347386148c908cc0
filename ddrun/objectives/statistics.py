"""Statistics matching against trained teachers: the "recover" stage of SRe2L, G-VBSM and EDC, as one objective.

For a frozen teacher f (``fetcher=teachers``, eval mode) and S split into BatchNorm batches (``ipc_per_batch``
images of every class each, the references' recover batches), the loss of one batch B with labels y is

    L(B) = ce_weight * CE(f(A(B)), y)
         + r_bn * sum_l w_l * [ alpha * D_l(B; mu_l, var_l) + (1 - alpha) * D_l(B; mu_l^y, var_l^y) ]
         + flatness * tau^2 * KL( softmax(f(A(B_ema)) / tau) || softmax(f(A(B)) / tau) )

- SRe2L (Yin et al., NeurIPS 2023, Eq. 3-5; reference ``recover_cifar.py`` / ``utils.BNFeatureHook``): l runs over
  the BatchNorm layers; ``D_l = ||mean(x_l) - running_mean_l||_2 + ||var(x_l) - running_var_l||_2`` with the
  per-channel mean and biased variance of the layer's input x_l over the batch (N, H, W); ``w_1 = first_multiplier``
  (10), 1 otherwise; alpha 1.
- G-VBSM (Shao et al., CVPR 2024, Sec. 3.2) adds the input of every Conv layer (``conv: true``), whose targets are
  the per-channel statistics of the real training data, computed once per teacher (``batch_real`` images per class,
  no augmentation) and cached for the run.
- EDC (Shao et al., NeurIPS 2024, Eq. 5, "soft category-aware matching", alpha 0.5): the second target is the
  real statistics of the batch's classes, ``mu^y = mean_{i in B} mu_{y_i}`` over per-class statistics of the real
  data (the reference's ``category_aware="global"``; with class-balanced batches this is the mean of the class
  statistics); when every class has the global statistics both targets coincide. EDC Eqs. 6-7, "flatness": an EMA
  copy of the images, ``X_ema <- beta X_ema + (1 - beta) X`` (beta 0.99) updated at every step (state of this
  objective, saved in the checkpoint), augmented with the same draw as S; the KL at temperature tau (4) is taken on
  the teacher's logits only (the reference ``F.kl_div(log_softmax(out / 4), softmax(ema_out / 4))``; we use the
  batch-mean KL scaled by tau^2 instead of the element mean, and the paper's weight 0.25 (EDC Table 4)).

A(.) is the per-step augmentation of S (:class:`~ddrun.data.transforms.BatchAugment`: RandomResizedCrop + flip,
roll for SRe2L's CIFAR jitter). Every batch's loss is summed (each image's Adam update depends only on its own
gradient, so this is the references' independent optimization of each batch, run together). After every update S is
clamped to the valid pixel range (:meth:`check`; not under ZCA).

G-VBSM / EDC's "training momentum" (``stats_momentum``, 0.8 in their CIFAR recover scripts): the synthetic
statistics enter the distances as a running estimate over the iterations, ``r_t = m r_{t-1} + (1 - m) s_t``
(``r_1 = s_1``), whose gradient is that of the current batch's statistics ``s_t`` (the references'
``r + s - s.detach()``); one estimate per teacher, layer and BatchNorm batch, saved in the checkpoint.

G-VBSM / EDC's patch statistics (``patch``): at every Conv input, resized (bilinear) to multiples of 4 and cut
into 4x4 patches, the mean and variance of each patch position over the batch's images, channels and pixels, matched
like the channel statistics (same weights, targets from the real data, running estimate).

G-VBSM's two further terms (its released CIFAR / Tiny ImageNet recover, ``--drop-rate 0.4 --nuc-norm 1.0``):
``conv_drop``, each Conv layer's terms left out of a batch's loss with that probability at every step (its
"efficiency" dropout of the Conv hooks; BatchNorm terms are never dropped), and ``nuc_norm``, a KL between the
softmax of the eigenvalues of each class's Gram matrix and their tempered softmax (:func:`eigen_kl`), which spreads
a class's images apart; it needs several images of a class in one batch (``ipc_per_batch`` > 1).

Differences from the references, stated: the class statistics are pooled over the class's images (per channel:
over (N, H, W); per patch position: over (N, C, 4, 4)), where the EDC code averages per-image statistics, and the
global real targets are pooled over the sampled images, where the references average per-batch statistics over
the augmented training set; the EDC code's per-class patch mean and variance files are written swapped (a bug we
do not reproduce).
"""

from __future__ import annotations

from collections.abc import Collection

import torch
import torch.nn.functional as F
from torch import nn

from ddrun.contracts import Fetched, Objective
from ddrun.data.datasets import RealData
from ddrun.data.transforms import BatchAugment
from ddrun.nets import refuse_without_batchnorm
from ddrun.synthetic import SyntheticSet
from ddrun.utils import ConfigError, host_to


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of ``x`` float ``[N, C, H, W]`` (or ``[N, C]``) over all dimensions but
    the channel: two float ``[C]`` tensors (what BatchNorm normalizes with in training mode)."""
    dims = [0, *range(2, x.dim())]
    return x.mean(dims), x.var(dims, unbiased=False)


class LayerInputs:
    """Records the input of each of ``layers`` during a forward pass (forward pre-hooks, removed on exit)::

        with LayerInputs(layers) as rec:
            out = net(x)
        rec.inputs  # [tensor per layer, in the order of ``layers``]
    """

    def __init__(self, layers: list[nn.Module]):
        self.layers, self.inputs, self._handles = layers, [], []

    def __enter__(self) -> "LayerInputs":
        for i, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_pre_hook(self._make(i)))
        self.inputs = [None] * len(self.layers)
        return self

    def _make(self, i: int):
        def hook(_module, args):
            self.inputs[i] = args[0]
        return hook

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def matched_layers(net: nn.Module, bn: bool, conv: bool) -> list[tuple[nn.Module, str]]:
    """``(module, kind)`` of the layers whose inputs are matched, in module order: BatchNorm layers (``bn``) and
    Conv layers (``conv``)."""
    out = []
    for m in net.modules():
        if bn and isinstance(m, nn.modules.batchnorm._BatchNorm):
            out.append((m, "bn"))
        elif conv and isinstance(m, nn.Conv2d):
            out.append((m, "conv"))
    return out


@torch.no_grad()
def real_statistics(net: nn.Module, layers: list[nn.Module], real: RealData, per_class: int,
                    generator: torch.Generator, chunk: int = 256, patch_layers: Collection[int] = ()) -> list[dict]:
    """Per-layer statistics of the real training data at the inputs of ``layers`` (eval mode): for each layer
    ``{"mean": [C], "var": [C], "class_mean": [K, C], "class_var": [K, C]}`` per channel and, for the layers whose
    indices are in ``patch_layers`` (4-D inputs), the same four keys with a ``patch_`` prefix (``[P]`` / ``[K, P]``)
    per position of the 4x4 patch grid (:func:`patch_view`), over ``per_class`` random images of every class
    (float32; global = over all of them, so classes weigh equally)."""
    k = real.num_classes
    sums: list[dict | None] = [None] * len(layers)
    net.eval()
    for c in range(k):
        x_c = real.sample_class(c, per_class, generator)
        for start in range(0, len(x_c), chunk):
            with LayerInputs(layers) as rec:
                net(x_c[start:start + chunk])
            for i, a in enumerate(rec.inputs):
                views = {"": a.double().transpose(0, 1).reshape(a.shape[1], -1)}  # [C, n * H * W]
                if i in patch_layers:
                    pv = patch_view(a.double())  # [n, P, C * 16]
                    views["patch_"] = pv.transpose(0, 1).reshape(pv.shape[1], -1)  # [P, n * C * 16]
                sums[i] = sums[i] or {key: torch.zeros(3, k, v.shape[0], dtype=torch.float64, device=v.device)
                                      for key, v in views.items()}
                for key, v in views.items():
                    sums[i][key][0, c] += v.shape[1]
                    sums[i][key][1, c] += v.sum(1)
                    sums[i][key][2, c] += (v * v).sum(1)
    return [{f"{key}{name}": t for key, st in s.items() for name, t in _moments(st).items()} for s in sums]


def _moments(s: torch.Tensor) -> dict[str, torch.Tensor]:
    """Global and per-class mean / biased variance from sums ``[3 (count, sum, sum of squares), K, D]``."""
    n, s1, s2 = s[0], s[1], s[2]
    gm = s1.sum(0) / n.sum(0)
    return {"mean": gm.float(), "var": (s2.sum(0) / n.sum(0) - gm ** 2).float(), "class_mean": (s1 / n).float(),
            "class_var": (s2 / n - (s1 / n) ** 2).float()}


def _to_patch_grid(x: torch.Tensor) -> torch.Tensor:
    """``x`` ``[N, C, H, W]`` resized (bilinear) to the next multiples of 4 of H and W (G-VBSM / EDC's
    ``div_four_mul``); unchanged when they are multiples already."""
    h, w = x.shape[-2:]
    h4, w4 = -(-h // 4) * 4, -(-w // 4) * 4
    return x if (h4, w4) == (h, w) else F.interpolate(x, size=(h4, w4), mode="bilinear")


def patch_view(x: torch.Tensor) -> torch.Tensor:
    """G-VBSM / EDC's patch grid: ``x`` ``[N, C, H, W]`` resized (:func:`_to_patch_grid`) and cut into its 4x4
    patches: ``[N, P, C * 16]`` with P = (H' / 4)(W' / 4) patch positions, row-major."""
    x = _to_patch_grid(x)
    n, c, h4, w4 = x.shape
    x = x.reshape(n, c, h4 // 4, 4, w4 // 4, 4).permute(0, 2, 4, 1, 3, 5)  # [N, U, V, C, 4, 4]
    return x.reshape(n, (h4 // 4) * (w4 // 4), c * 16)


def patch_stats_grouped(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-batch mean and biased variance of each patch position of ``x`` ``[G * B, C, H, W]`` (:func:`patch_view`)
    over the batch's images, channels and the patch's pixels: two ``[G, P]`` tensors. Computed with 4x4 average
    pooling in two passes (mean, then the mean square deviation), without materializing the patches."""
    x = _to_patch_grid(x)
    n, c, h4, w4 = x.shape
    xg = x.reshape(groups, n // groups, c, h4, w4)
    mean = F.avg_pool2d(x, 4).reshape(groups, -1, h4 // 4, w4 // 4).mean(1)  # [G, U, V]
    centred = xg - mean.repeat_interleave(4, 1).repeat_interleave(4, 2)[:, None, None]
    var = F.avg_pool2d((centred * centred).reshape(n, c, h4, w4), 4).reshape(groups, -1, h4 // 4, w4 // 4).mean(1)
    return mean.flatten(1), var.flatten(1)


def stat_distance(mean: torch.Tensor, var: torch.Tensor, t_mean: torch.Tensor, t_var: torch.Tensor) -> torch.Tensor:
    """``||mean - t_mean||_2 + ||var - t_var||_2`` over the last dimension (SRe2L's per-layer distance); ``mean`` /
    ``var`` ``[..., C]`` -> ``[...]``."""
    return (mean - t_mean).norm(dim=-1) + (var - t_var).norm(dim=-1)


class StatisticsMatching(Objective):
    """The recover objective of SRe2L / G-VBSM / EDC (module doc).

    Args:
        lr_img: step size of the images (SRe2L CIFAR 0.25, EDC 0.05; Adam betas (0.5, 0.9) in the presets).
        r_bn: weight of the statistics term (SRe2L 0.01; EDC ``r_loss`` 0.01).
        first_multiplier: weight of the first matched layer (10 in SRe2L and EDC).
        ce_weight: weight of the teacher's cross-entropy on S.
        bn: match the BatchNorm layers' inputs against the running statistics (needs a BatchNorm teacher).
        conv: also match every Conv layer's input against the real data's statistics (G-VBSM / EDC).
        alpha: weight of the global target; ``1 - alpha`` goes to the class target (EDC Eq. 5: 0.5; SRe2L: 1).
        flatness: weight of EDC's flatness term (0: off; the paper's best 0.25).
        ema_beta: beta of the EMA copy of the images (0.99).
        tau: temperature of the flatness KL (4).
        ipc_per_batch: images of every class in one BatchNorm batch (1: the references' recover batch of one image
            per class); must divide ipc.
        augment: the per-step augmentation of S (one draw per step), or None.
        batch_real: real images per class for the cached real statistics (``conv`` or ``alpha < 1``).
        clamp: clamp S to the valid pixel range after every update.
        stats_momentum: momentum m of the running estimate of S's statistics (G-VBSM / EDC ``training_momentum``
            0.8; 0: each step's own statistics, SRe2L).
        patch: also match the statistics of each position of the 4x4 patch grid at the Conv inputs
            (:func:`patch_stats_grouped`; G-VBSM / EDC ``ConvFeatureHook``); needs ``conv``.
        conv_drop: probability that a Conv layer's terms are left out of a batch's loss at a step (G-VBSM
            ``drop_rate`` 0.4; EDC 0); a left-out layer's running estimate is not updated; needs ``conv``.
        nuc_norm: weight of G-VBSM's eigenvalue term (:func:`eigen_kl`; its ``--nuc-norm`` 1.0; 0: off).
        nuc_tau: temperature of the eigenvalue term (G-VBSM ``--tau`` 4).

    ``__call__`` returns the summed loss of all batches (float scalar); gradients reach ``syn.images`` only.

    Raises:
        ConfigError: bad weights, ``stats_momentum`` or ``conv_drop`` outside [0, 1), ``patch`` or
            ``conv_drop`` without ``conv``,
            ``ipc_per_batch`` not dividing ipc, or (at the first step) a teacher without BatchNorm when ``bn`` is
            set (names the net and its BatchNorm variant).
    """

    def __init__(self, lr_img: float = 0.25, r_bn: float = 0.01, first_multiplier: float = 10.0,
                 ce_weight: float = 1.0, bn: bool = True, conv: bool = False, alpha: float = 1.0,
                 flatness: float = 0.0, ema_beta: float = 0.99, tau: float = 4.0, ipc_per_batch: int = 1,
                 augment: BatchAugment | None = None, batch_real: int = 500, clamp: bool = True,
                 stats_momentum: float = 0.0, patch: bool = False, conv_drop: float = 0.0, nuc_norm: float = 0.0,
                 nuc_tau: float = 4.0):
        super().__init__(lr_img, batch_real=batch_real)
        if not 0.0 <= float(alpha) <= 1.0:
            raise ConfigError(f"objective.alpha={alpha}: must be in [0, 1] (weight of the global statistics)")
        for name, v in (("ema_beta", ema_beta), ("stats_momentum", stats_momentum), ("conv_drop", conv_drop)):
            if not 0.0 <= float(v) < 1.0:
                raise ConfigError(f"objective.{name}={v}: must be in [0, 1)")
        if min(float(tau), float(nuc_tau)) <= 0 or int(ipc_per_batch) < 1 \
                or min(float(r_bn), float(flatness), float(ce_weight), float(nuc_norm)) < 0:
            raise ConfigError("objective: tau and nuc_tau must be > 0, ipc_per_batch >= 1, and r_bn, flatness, "
                              "ce_weight, nuc_norm >= 0")
        if not (bn or conv):
            raise ConfigError("objective: bn=false and conv=false leave no statistics to match; set one of them")
        conv_only = [n for n, on in (("patch=true", patch), (f"conv_drop={conv_drop}", float(conv_drop) > 0)) if on]
        if conv_only and not conv:
            raise ConfigError(f"objective.{' and objective.'.join(conv_only)} "
                              f"{'act' if len(conv_only) > 1 else 'acts'} on the Conv inputs' statistics: "
                              f"set objective.conv=true")
        self.r_bn, self.first_multiplier, self.ce_weight = float(r_bn), float(first_multiplier), float(ce_weight)
        self.bn, self.conv, self.alpha = bool(bn), bool(conv), float(alpha)
        self.flatness, self.ema_beta, self.tau = float(flatness), float(ema_beta), float(tau)
        self.ipc_per_batch, self.augment, self.clamp = int(ipc_per_batch), augment, bool(clamp)
        self.stats_momentum, self.patch = float(stats_momentum), bool(patch)
        self.conv_drop, self.nuc_norm, self.nuc_tau = float(conv_drop), float(nuc_norm), float(nuc_tau)
        self.ema: torch.Tensor | None = None
        self.running: dict[str, torch.Tensor] = {}  # "mean|var.[patch_]<teacher>.<layer>" -> estimate [G, D]
        self._teachers: dict[int, dict] = {}  # id(teacher) -> its matched layers and cached real statistics
        self._bounds = None

    # --- hooks of the loop ----------------------------------------------------------------------------
    def prepare(self, syn: SyntheticSet, real: RealData) -> None:
        """Start the EMA copy at S; record the valid range of the normalized pixels (for :meth:`check`)."""
        self.ema = syn.images.detach().clone()
        if self.clamp and real.zca is None and not real.layernorm:  # pixel bounds known
            m = torch.tensor(real.mean, device=syn.images.device).view(1, -1, 1, 1)
            s = torch.tensor(real.std, device=syn.images.device).view(1, -1, 1, 1)
            self._bounds = (-m / s, (1 - m) / s)

    @torch.no_grad()
    def check(self, syn: SyntheticSet, it: int) -> None:
        """Clamp S to the valid pixel range ``[(0 - mean) / std, (1 - mean) / std]`` per channel (the references'
        ``clip`` after every step)."""
        if self._bounds is not None:
            syn.images.copy_(torch.maximum(torch.minimum(syn.images, self._bounds[1]), self._bounds[0]))

    def state_dict(self) -> dict:
        state = {f"running.{k}": v.detach().cpu().clone() for k, v in self.running.items()}
        return state if self.ema is None else {**state, "ema": self.ema.detach().cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("ema") is not None and self.ema is not None:
            self.ema = state["ema"].to(self.ema.device)
        device = self.ema.device if self.ema is not None else None
        self.running = {k.removeprefix("running."): v.to(device) for k, v in state.items() if k.startswith("running.")}

    # --- the loss -------------------------------------------------------------------------------------
    def _teacher_entry(self, teacher: nn.Module, real: RealData, it: int) -> dict:
        entry = self._teachers.get(id(teacher))
        if entry is not None:
            return entry
        if self.bn:
            refuse_without_batchnorm(teacher)
        layers = matched_layers(teacher, self.bn, self.conv)
        stats = None
        if self.conv or self.alpha < 1.0:
            from ddrun.utils import derive_seed

            g = torch.Generator().manual_seed(derive_seed(len(self._teachers), 7039))
            patch_layers = {i for i, (_, kind) in enumerate(layers) if kind == "conv"} if self.patch else set()
            stats = real_statistics(teacher, [m for m, _ in layers], real, self.batch_real, g,
                                    patch_layers=patch_layers)
        entry = {"teacher": teacher, "layers": layers, "stats": stats, "index": len(self._teachers)}
        self._teachers[id(teacher)] = entry
        return entry

    def _targets(self, entry: dict, i: int, labels: torch.Tensor,
                 prefix: str = "") -> list[tuple[float, torch.Tensor, torch.Tensor]]:
        """``[(weight, mean [G, D] or [D], var)]`` of layer ``i`` for batches with ``labels`` ``[G, B]``: per
        channel, or per patch position with ``prefix="patch_"``."""
        module, kind = entry["layers"][i]
        stats = entry["stats"][i] if entry["stats"] is not None else None
        if kind == "bn":
            glob = (module.running_mean, module.running_var)
        else:
            glob = (stats[prefix + "mean"], stats[prefix + "var"])
        out = [(self.alpha, *glob)] if self.alpha > 0 else []
        if self.alpha < 1.0:
            out.append((1.0 - self.alpha, stats[prefix + "class_mean"][labels].mean(1),
                        stats[prefix + "class_var"][labels].mean(1)))
        return out

    def batches(self, labels: torch.Tensor) -> torch.Tensor:
        """The order that makes S's BatchNorm batches contiguous: int64 ``[G * B]`` indices, batch g = the g-th
        ``ipc_per_batch`` images of every class (B = ``ipc_per_batch * K``).

        Raises:
            ConfigError: the classes have unequal counts or ``ipc_per_batch`` does not divide them.
        """
        counts = torch.bincount(labels)
        n = int(counts[0])
        if bool((counts != n).any()) or n % self.ipc_per_batch:
            raise ConfigError(f"objective.ipc_per_batch={self.ipc_per_batch} must divide the images per class of S "
                              f"({counts.tolist()})")
        rank = torch.empty_like(labels)
        for c in range(len(counts)):
            idx = torch.nonzero(labels == c).flatten()
            rank[idx] = torch.arange(len(idx), device=labels.device)
        group = rank // self.ipc_per_batch
        return torch.argsort(group * len(counts) + labels, stable=True)

    def __call__(self, syn: SyntheticSet, real: RealData, fetched: Fetched, it: int,
                 generator: torch.Generator) -> torch.Tensor:
        teacher = fetched.teacher if fetched.teacher is not None else fetched.net
        entry = self._teacher_entry(teacher, real, it)
        y_all = syn.hard_labels()
        order = self.batches(y_all)
        x, y = syn.images[order], y_all[order]
        b = self.ipc_per_batch * int(y_all.max() + 1)
        g_count = len(order) // b
        ema = self.ema[order] if self.flatness > 0 else None
        if self.augment is not None:
            both = self.augment(x if ema is None else torch.cat([x, ema]), generator)
            x, ema = (both, None) if ema is None else both.split(len(x))
        with LayerInputs([m for m, _ in entry["layers"]]) as rec:
            out = teacher(x)
        loss = self.ce_weight * F.cross_entropy(out, y, reduction="sum") / b
        loss = loss + self._matching(entry, rec.inputs, y.view(g_count, b), generator)
        if self.nuc_norm > 0:
            loss = loss + self.nuc_norm * eigen_kl(x, g_count, b // self.ipc_per_batch, self.nuc_tau)
        if ema is not None:
            with torch.no_grad():
                out_ema = teacher(ema)
            kl = F.kl_div(F.log_softmax(out / self.tau, 1), F.log_softmax(out_ema / self.tau, 1), reduction="sum",
                          log_target=True)
            loss = loss + self.flatness * self.tau ** 2 * kl / b
            self.ema = self.ema_beta * self.ema + (1.0 - self.ema_beta) * syn.images.detach()
        return loss

    def _matching(self, entry: dict, inputs: list[torch.Tensor], labels: torch.Tensor,
                  generator: torch.Generator) -> torch.Tensor:
        """The statistics term of every batch, summed: ``inputs`` the matched layers' inputs ``[G * B, C, ...]``,
        ``labels`` int64 ``[G, B]``. With ``conv_drop``, each Conv layer is left out of each batch with that
        probability (one draw per layer and batch from ``generator``)."""
        g_count, loss = labels.shape[0], 0.0
        for i, a in enumerate(inputs):
            w = self.r_bn * (self.first_multiplier if i == 0 else 1.0)
            is_conv = entry["layers"][i][1] == "conv"
            keep = None
            if is_conv and self.conv_drop > 0:
                keep = host_to(torch.rand(g_count, generator=generator) >= self.conv_drop, a.device)
            terms = [("", channel_stats_grouped)] + ([("patch_", patch_stats_grouped)] if self.patch and is_conv
                                                     else [])
            for prefix, stats_of in terms:
                mean, var = self._smoothed(*stats_of(a, g_count), f"{prefix}{entry['index']}.{i}", keep)
                for weight, t_mean, t_var in self._targets(entry, i, labels, prefix):
                    d = stat_distance(mean, var, t_mean, t_var)  # [G]
                    loss = loss + w * weight * (d if keep is None else d * keep).sum()
        return loss

    def _smoothed(self, mean: torch.Tensor, var: torch.Tensor, key: str,
                  keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The running estimate ``r = m r_prev + (1 - m) s`` of each statistic ``s`` (``[G, D]``), updated in place,
        carrying the gradient of ``s``: ``r + s - s.detach()``. ``stats_momentum`` 0: ``s`` itself. ``keep`` bool
        ``[G]``: only these batches' estimates move (a dropped Conv layer's stays; it starts at the first step's
        ``s`` either way, where G-VBSM starts it at the first kept step)."""
        if self.stats_momentum == 0.0:
            return mean, var
        out = []
        for name, s in (("mean", mean), ("var", var)):
            prev = self.running.get(f"{name}.{key}")
            with torch.no_grad():
                r = s.detach() if prev is None else self.stats_momentum * prev + (1.0 - self.stats_momentum) * s
                if prev is not None and keep is not None:
                    r = torch.where(keep[:, None], r, prev)
            self.running[f"{name}.{key}"] = r.detach()
            out.append(r + s - s.detach())
        return out[0], out[1]


def eigen_kl(x: torch.Tensor, groups: int, classes: int, tau: float) -> torch.Tensor:
    """G-VBSM's eigenvalue term (Shao et al., CVPR 2024; reference ``Branch_CIFAR_10/recover/
    data_synthesis_with_svd_with_db_with_all_statistic.py``, ``nuc_norm``): for each batch and class, the eigenvalues
    ``lambda`` ``[n]`` of the Gram matrix ``X X^T`` of the class's n (augmented) images flattened to rows, and
    ``KL(softmax(lambda / tau) || softmax(lambda))`` with the tempered side a constant, summed over classes and
    batches (float scalar). It pushes a class's spectrum toward the flatter tempered one, i.e. its images apart.

    ``x`` float ``[G * K * n, C, H, W]``, batch-major then class-major (:meth:`StatisticsMatching.batches`); images
    larger than 32x32 are average-pooled to it first (the reference's ``AdaptiveAvgPool2d((32, 32))``; smaller ones
    are used as they are, where the reference upsamples them). Symmetric eigenvalues (``eigvalsh``, float64) where
    the reference calls the general ``eigvals``: the same values, a gradient defined at repeated eigenvalues. One
    image per class (n = 1): a single eigenvalue, the term is 0."""
    h, w = x.shape[-2:]
    if h > 32 or w > 32:
        x = F.adaptive_avg_pool2d(x, (min(h, 32), min(w, 32)))
    n = x.shape[0] // (groups * classes)
    if n < 2:
        return x.new_zeros(())
    v = x.reshape(groups, classes, n, -1).double()
    lam = torch.linalg.eigvalsh(v @ v.transpose(-1, -2)).float()  # [G, K, n]
    return F.kl_div(F.log_softmax(lam, -1), F.softmax(lam / tau, -1).detach(), reduction="sum")


def channel_stats_grouped(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-batch, per-channel mean and biased variance of ``x`` ``[G * B, C, ...]`` split into ``groups``
    contiguous batches: two ``[G, C]`` tensors (:func:`channel_stats` of each batch)."""
    xg = x.reshape(groups, x.shape[0] // groups, *x.shape[1:]).transpose(1, 2)  # [G, C, B, ...]
    flat = xg.reshape(groups, x.shape[1], -1)
    return flat.mean(2), flat.var(2, unbiased=False)
