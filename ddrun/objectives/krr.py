"""Performance matching by kernel ridge regression: KIP, RFAD and FRePo.

All three fit kernel ridge regression (KRR) on the synthetic set S and score its predictions on a real batch T
(Nguyen, Chen & Lee, "Dataset Meta-Learning from Kernel Ridge-Regression", ICLR 2021, Eq. 1-2):

    pred_T = K_TS (K_SS + lambda I)^-1 Y_S,     lambda = reg * tr(K_SS) / |S|,

then back-propagate the loss through the closed form to the images of S and, when learned, its labels Y_S.
``reg * tr(K)/n`` is the papers' regularization (KIP notebook ``loss_acc_fn``, RFAD ``jit``, FRePo ``nfr``); the
system is solved by a float64 Cholesky factorization (RFAD solves in double, KIP enables x64). A system that is
still singular, or a kernel with NaN/Inf entries, raises a one-line DdrunError naming ``objective.reg``.

- :class:`KIP` (Nguyen et al. ICLR 2021; "... with Infinitely Wide Convolutional Networks", NeurIPS 2021):
  loss ``0.5 * mean((pred_T - Y_T)^2)`` on centered one-hot targets. The default kernel is NOT the paper's exact
  infinite-width ConvNet kernel (neural_tangents, JAX): it is a random-feature NNGP of 8 *finite* random ConvNets
  redrawn every iteration (``objective/kernel=nngp``, RFAD's estimator) or the empirical NTK of one small finite
  network (``objective/kernel=ntk``), see ``ddrun.nets.kernels``. ``objective/kernel=exact`` is the exact
  infinite-width NNGP of the ConvNet without normalization (``ddrun.nets.exact_kernels``), or its exact NTK with
  ``objective.kernel.kind=ntk`` (the paper's kind of kernel), opt-in for their cost (``conf/method/kip.yaml``).
  Every KIP number of ddrun is for the kernel it names.
- :class:`RFAD` (Loo et al. NeurIPS 2022, Sec. 4): the random-feature NNGP with the Platt-scaled cross-entropy
  ``CE(exp(k) * pred_T, y_T)``, k a learned log-scale (init 0), and optionally the learned linear transform of the
  images (``transform``).
- :class:`FRePo` (Zhou, Nezhadarya & Ba, NeurIPS 2022, Eq. 4-5): the kernel is the linear kernel of the
  penultimate features of a network from the model pool (``fetcher=pool``, trained online on S), loss
  ``sum_k (pred - Y)^2`` averaged over T plus the label margin term; flipped copies of S join the support set on
  datasets with flips.

Labels. The KRR targets of S are ``Y_S = labels / label_scale`` where ``labels`` are S's soft labels, float
``[N, K]`` *logits* (the project's convention: the evaluator trains with ``softmax(labels)``). They start at
``label_scale * target_scale * (onehot - 1/K)`` (KIP / RFAD / FRePo's centered one-hot; FRePo's
``target_scale = 1/sqrt(K/10)``), so the evaluator sees nearly hard labels at initialization and ``label_scale``
sets how hard the learned labels are. An S that comes with soft labels keeps what they say (``prepare``): a
kernel set's targets carry over, a classifier's logits (a relabeled S) become ``softmax - 1/K`` targets.
``lr_labels`` is in the papers' units (Y); the optimizer step on the stored logits is ``lr_labels * label_scale``,
the same step for Adam-type optimizers.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ddrun.contracts import Fetched, Fetcher, Objective
from ddrun.data.datasets import RealData
from ddrun.nets.kernels import FeatureKernel, NetworkFeatures
from ddrun.schema import accepted_keys
from ddrun.synthetic import SyntheticSet
from ddrun.utils import ConfigError, DdrunError, derive_seed


def krr_predict(k_ss: torch.Tensor, k_ts: torch.Tensor, y_s: torch.Tensor, reg: float = 1e-6) -> torch.Tensor:
    """Kernel ridge regression ``K_TS (K_SS + reg * tr(K_SS)/n * I)^-1 Y_S``.

    Args:
        k_ss: float ``[n, n]`` symmetric PSD kernel of the support set.
        k_ts: float ``[m, n]`` kernel between targets and support.
        y_s: float ``[n, K]`` support targets.
        reg: ridge relative to the mean eigenvalue ``tr(K_SS)/n`` (0: plain interpolation).

    Returns float ``[m, K]`` predictions in ``k_ts``'s dtype, differentiable w.r.t. all inputs (the solve runs in
    float64 by Cholesky).

    Raises:
        DdrunError: NaN/Inf in a kernel, a zero kernel, or a system that is not positive definite even after the
            regularization.
    """
    if not (torch.isfinite(k_ss).all() and torch.isfinite(k_ts).all()):
        raise DdrunError("the kernel matrix of S has NaN/Inf entries (S or the kernel's networks diverged); "
                         "lower objective.lr_img or check the data")
    n = k_ss.shape[0]
    k = k_ss.double()
    trace = torch.diagonal(k).sum()
    if not trace > 0:
        raise DdrunError(f"the kernel matrix of S ({n}x{n}) is zero (trace {float(trace):.3g}): every support "
                         f"image has zero features")
    a = k + (abs(reg) * trace / n) * torch.eye(n, dtype=k.dtype, device=k.device)
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) != 0:
        raise DdrunError(f"the kernel system of S ({n}x{n}) is singular or ill-conditioned even with the papers' "
                         f"regularization reg*tr(K)/n (objective.reg={reg}; Cholesky failed at column {int(info)}); "
                         f"raise objective.reg or remove duplicate images from S")
    alpha = torch.cholesky_solve(y_s.double(), chol)
    return (k_ts.double() @ alpha).to(k_ts.dtype)


def centered_onehot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``onehot(labels) - 1/K``, float ``[N, K]`` (the KRR regression targets of KIP / RFAD / FRePo)."""
    return F.one_hot(labels, num_classes).float() - 1.0 / num_classes


class KernelRidge(Objective):
    """What KIP, RFAD and FRePo share (module doc): the labels of S as KRR targets, the closed form, the loss on a
    class-balanced real batch (``batch_real`` per class).

    Args:
        reg: ridge relative to ``tr(K_SS)/n``.
        learn_labels: make S's labels learnable soft labels (``lr_labels`` their step size, in target units).
        label_scale: logits stored per unit of KRR target (module doc).
        Others: :class:`~ddrun.contracts.Objective`.

    Raises:
        ConfigError: ``label_scale <= 0`` or ``reg < 0``.
    """

    def __init__(self, reg: float = 1e-6, learn_labels: bool = True, label_scale: float = 10.0, **kwargs):
        super().__init__(**kwargs)
        if not label_scale > 0:
            raise ConfigError(f"objective.label_scale={label_scale}: must be > 0")
        if reg < 0:
            raise ConfigError(f"objective.reg={reg}: must be >= 0 (the ridge is reg * tr(K)/n)")
        self.reg, self.learn_labels, self.label_scale = float(reg), bool(learn_labels), float(label_scale)
        self.num_classes = 0

    # --- labels -------------------------------------------------------------------------------------------
    def target_scale(self, num_classes: int) -> float:
        """Scale of S's initial targets relative to the real ones (1; FRePo: ``1/sqrt(K/10)``)."""
        return 1.0

    def prepare(self, syn: SyntheticSet, real: RealData) -> None:
        """Make S's labels this objective's KRR targets x ``label_scale`` (module doc) and mark them so
        (``meta["label_kind"] = "regression"``). Soft labels S brings from elsewhere keep what they say: a kernel
        set's targets are carried over to this ``label_scale``; logits (a relabeled S, an expert's labels) become
        their centered probabilities on the hard targets' scale (:meth:`SyntheticSet.regression_targets` x
        :meth:`target_scale`). Hard labels start learned labels at the centered one-hot. Labels already learned
        (a resumed run's) are left as they are."""
        self.num_classes = k = real.num_classes
        if syn.soft and not isinstance(syn.labels, nn.Parameter):
            y0 = syn.regression_targets()
            if not syn.labels_are_regression_targets:
                y0 = y0 * self.target_scale(k)
            with torch.no_grad():
                syn.labels.copy_(self.label_scale * y0)
            if self.learn_labels:
                syn.learn_labels()
        elif self.learn_labels and not syn.soft:
            y0 = centered_onehot(syn.hard_labels(), k) * self.target_scale(k)
            syn.learn_labels()
            with torch.no_grad():
                syn.labels.copy_(self.label_scale * y0)
        syn.label_scale = self.label_scale
        syn.meta["label_kind"] = "regression"  # S's soft labels are KRR targets x label_scale, not logits

    def targets(self, syn: SyntheticSet) -> torch.Tensor:
        """The KRR targets Y_S, float ``[N, K]`` (differentiable w.r.t. learned labels)."""
        if syn.soft:
            return syn.labels / self.label_scale
        return centered_onehot(syn.labels, self.num_classes) * self.target_scale(self.num_classes)

    def param_groups(self, syn: SyntheticSet) -> list[dict]:
        groups = syn.param_groups(self.lr_img, self.lr_lr, None)
        if isinstance(syn.labels, nn.Parameter) and self.lr_labels:
            groups.append({"params": [syn.labels], "lr": self.lr_labels * self.label_scale, "name": "labels"})
        return groups

    # --- the closed form ----------------------------------------------------------------------------------
    def support(self, syn: SyntheticSet) -> tuple[torch.Tensor, torch.Tensor]:
        """The support set ``(images, targets)`` the regression is fitted on (FRePo adds flipped copies)."""
        return syn.images, self.targets(syn)

    def predict(self, kernel: FeatureKernel, syn: SyntheticSet, x_target: torch.Tensor) -> torch.Tensor:
        """KRR predictions ``[len(x_target), K]`` of the kernel fitted on S."""
        x_s, y_s = self.support(syn)
        f_s = kernel.features(x_s)
        return krr_predict(kernel.gram(f_s, f_s), kernel.cross(x_target, f_s), y_s, self.reg)

    def kernel_for(self, fetched: Fetched, generator: torch.Generator) -> FeatureKernel:
        raise NotImplementedError

    def loss(self, pred: torch.Tensor, y_target: torch.Tensor, syn: SyntheticSet) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, syn: SyntheticSet, real: RealData, fetched: Fetched, it: int,
                 generator: torch.Generator) -> torch.Tensor:
        kernel = self.kernel_for(fetched, generator)
        x_t, y_t = self.real_batch(real, generator)
        return self.loss(self.predict(kernel, syn, x_t), y_t, syn)

    @torch.no_grad()
    def krr_accuracy(self, kernel: FeatureKernel, syn: SyntheticSet, real: RealData) -> float:
        """Test accuracy (percent) of kernel ridge regression fitted on S, on the whole real test split."""
        pred = self.predict(kernel, syn, real.test_images)
        return 100.0 * float((pred.argmax(1) == real.test_labels).float().mean())


class KIP(KernelRidge):
    """Kernel Inducing Points (module doc): ``0.5 * mean((pred_T - Y_T)^2)``. The random kernel is redrawn every
    iteration; ``report`` uses one fixed draw (RFAD validates with fixed seeds).

    Args:
        kernel: kernel factory ``(channels, num_classes, im_size, device) -> FeatureKernel`` (the
            ``objective/kernel`` config group: ``nngp`` random features, ``ntk`` or ``exact``).
        report_krr: log the kernel-regression test accuracy (percent, ``krr_acc``) at each evaluation.
        val_models: random networks of the fixed kernel draw that scores S on a validation split
            (:meth:`validation`, for ``early_stopping``; RFAD: 16, its ``valid_fixed_seed`` models); None: the
            objective's own ``n_models``.

    Raises:
        ConfigError: no kernel configured.
    """

    def __init__(self, kernel: Callable[..., FeatureKernel] | None = None, report_krr: bool = True,
                 val_models: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if kernel is None:
            raise ConfigError("objective.kernel is not set: choose objective/kernel=nngp, ntk or exact")
        if val_models is not None and int(val_models) < 1:
            raise ConfigError(f"objective.val_models={val_models}: must be >= 1 or null (the kernel's n_models)")
        takes = accepted_keys(getattr(kernel, "func", kernel))
        if val_models is not None and takes is not None and "n_models" not in takes:
            raise ConfigError(f"objective.val_models={val_models} sets the random networks of the validation "
                              f"kernel, but this kernel ({getattr(kernel, 'func', kernel).__name__}) has none: "
                              f"pass objective.val_models=null")
        self.kernel_factory, self.report_krr = kernel, bool(report_krr)
        self.val_models = None if val_models is None else int(val_models)
        self._val: tuple | None = None  # (validation images' identity, kernel, their features)

    def prepare(self, syn: SyntheticSet, real: RealData) -> None:
        super().prepare(syn, real)
        self._kernel_args = dict(channels=real.channels, num_classes=real.num_classes, im_size=real.im_size,
                                 device=syn.images.device)
        self.kernel = self.kernel_factory(**self._kernel_args)

    @torch.no_grad()
    def validation(self, syn: SyntheticSet, x_val: torch.Tensor, y_val: torch.Tensor, seed: int) -> dict[str, float]:
        """S's kernel-regression loss (this objective's :meth:`loss`, with RFAD's current Platt scale) and accuracy
        (percent) on the validation split ``x_val`` ``[M, C, H, W]`` / ``y_val`` int64 ``[M]``, with one fixed
        kernel draw of ``val_models`` networks from ``seed`` (RFAD ``distillation.py``: 16 models at fixed seeds,
        the validation features computed once). The draw and the validation features are cached for the run."""
        key = (x_val.data_ptr(), tuple(x_val.shape))
        if self._val is None or self._val[0] != key:
            models = {} if self.val_models is None else {"n_models": self.val_models}
            kernel = self.kernel_factory(**self._kernel_args, **models)
            kernel.resample(torch.Generator().manual_seed(derive_seed(seed, 16180339)))
            feats = torch.cat([kernel.features(x_val[i:i + 500]) for i in range(0, len(x_val), 500)])
            self._val = (key, kernel, feats)
        _, kernel, f_val = self._val
        x_s, y_s = self.support(syn)
        f_s = kernel.features(x_s)
        pred = krr_predict(kernel.gram(f_s, f_s), kernel.gram(f_val, f_s), y_s, self.reg)
        acc = 100.0 * float((pred.argmax(1) == y_val).float().mean())
        return {"val_loss": float(self.loss(pred, y_val, syn)), "val_acc": acc}

    def kernel_for(self, fetched: Fetched, generator: torch.Generator) -> FeatureKernel:
        self.kernel.resample(generator)
        return self.kernel

    def report(self, syn: SyntheticSet, real: RealData, fetcher: Fetcher, seed: int) -> dict[str, float]:
        if not self.report_krr:
            return {}
        self.kernel.resample(torch.Generator().manual_seed(derive_seed(seed, 271828)))
        return {"krr_acc": self.krr_accuracy(self.kernel, syn, real)}

    def loss(self, pred, y_target, syn):
        return 0.5 * ((pred - centered_onehot(y_target, self.num_classes)) ** 2).mean()


class RFAD(KIP):
    """RFAD (module doc): with ``platt`` the loss is ``CE(exp(k) * pred_T, y_T)`` with k learned at step size
    ``lr_platt`` (Loo et al. 2022, Sec. 4 "Platt scaling"; yolky/RFAD ``distillation.py``); without it, KIP's MSE.

    With ``transform`` the images of S are ``X T``: X ``[N, D]`` (``D = C*H*W``) and a learned linear map T
    ``[D, D]`` (initialized to the identity, step size ``lr_transform``; the reference's ``transform_mat``, lr 5e-5),
    both the objective's own parameters (in ``checkpoint.pt``); ``syn.images`` is set to ``X T`` after every update,
    so S itself holds the transformed images the reference saves and evaluates (``transform_data(X_coreset,
    transform_mat)``), as DD keeps its step sizes. It applies to ``parametrization=pixels`` (X is S's pixels).
    """

    def __init__(self, platt: bool = True, lr_platt: float = 0.01, transform: bool = False,
                 lr_transform: float = 5e-5, **kwargs):
        super().__init__(**kwargs)
        for key, value in (("lr_platt", lr_platt), ("lr_transform", lr_transform)):
            if not float(value) >= 0:
                raise ConfigError(f"objective.{key}={value}: a step size must be >= 0")
        self.platt, self.lr_platt = bool(platt), float(lr_platt)
        self.transform, self.lr_transform = bool(transform), float(lr_transform)
        self.log_scale: nn.Parameter | None = None
        self.x_raw: nn.Parameter | None = None
        self.t_mat: nn.Parameter | None = None

    def prepare(self, syn: SyntheticSet, real: RealData) -> None:
        super().prepare(syn, real)
        if self.platt:
            self.log_scale = nn.Parameter(torch.zeros((), device=syn.images.device))
        if self.transform:
            d = syn.images[0].numel()
            self.x_raw = nn.Parameter(syn.images.detach().reshape(len(syn.images), d).clone())
            self.t_mat = nn.Parameter(torch.eye(d, device=syn.images.device))

    def param_groups(self, syn: SyntheticSet) -> list[dict]:
        groups = super().param_groups(syn)
        if self.x_raw is not None:  # X and T in place of S's images
            groups = [g for g in groups if g["name"] != "images"]
            groups += [{"params": [self.x_raw], "lr": self.lr_img, "name": "images"},
                       {"params": [self.t_mat], "lr": self.lr_transform, "name": "transform"}]
        if self.log_scale is not None:
            groups.append({"params": [self.log_scale], "lr": self.lr_platt, "name": "platt"})
        return groups

    def transformed(self, like: torch.Tensor) -> torch.Tensor:
        """``X T`` shaped like S's images ``[N, C, H, W]`` (differentiable w.r.t. X and T)."""
        return (self.x_raw @ self.t_mat).reshape(like.shape)

    def support(self, syn):
        x, y = super().support(syn)
        return (x if self.x_raw is None else self.transformed(x)), y

    def check(self, syn: SyntheticSet, it: int) -> None:
        if self.x_raw is not None:
            with torch.no_grad():
                syn.images.copy_(self.transformed(syn.images))

    def loss(self, pred, y_target, syn):
        if self.log_scale is None:
            return super().loss(pred, y_target, syn)
        return F.cross_entropy(self.log_scale.exp() * pred, y_target)

    def state_dict(self) -> dict:
        state = {} if self.log_scale is None else {"platt_log_scale": self.log_scale.detach().cpu()}
        if self.x_raw is not None:
            state.update(transform_x=self.x_raw.detach().cpu(), transform_t=self.t_mat.detach().cpu())
        return state

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            if self.log_scale is not None and "platt_log_scale" in state:
                self.log_scale.copy_(state["platt_log_scale"])
            if self.x_raw is not None and "transform_x" in state:
                self.x_raw.copy_(state["transform_x"])
                self.t_mat.copy_(state["transform_t"])


def label_margin(y: torch.Tensor) -> torch.Tensor:
    """FRePo's label regularizer ``-min(top1 - top2, 1/K)`` per row of ``y`` ``[N, K]``, averaged (``lb_margin_th``
    in yongchaoz/FRePo ``frepo.py``): it keeps learned labels from collapsing below a margin of 1/K."""
    top = y.topk(2, dim=1).values
    return -torch.clamp(top[:, 0] - top[:, 1], max=1.0 / y.shape[1]).mean()


class FRePo(KernelRidge):
    """FRePo (module doc). The network comes from ``fetcher=pool`` (``ddrun.fetchers.pool``).

    Args:
        flip: add horizontally flipped copies of S to the support set (the reference's ``use_flip``: CIFAR-10,
            CIFAR-100 at ipc 1; not MNIST / Fashion-MNIST).
        margin: add :func:`label_margin` of the learned targets to the loss.
    """

    def __init__(self, flip: bool = False, margin: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.flip, self.margin = bool(flip), bool(margin)

    def target_scale(self, num_classes: int) -> float:
        return 1.0 / math.sqrt(num_classes / 10.0)

    def support(self, syn):
        x, y = super().support(syn)
        if self.flip:
            x, y = torch.cat([x, torch.flip(x, dims=[-1])]), torch.cat([y, y])
        return x, y

    def kernel_for(self, fetched: Fetched, generator: torch.Generator) -> FeatureKernel:
        return NetworkFeatures(fetched.net)

    def loss(self, pred, y_target, syn):
        loss = ((pred - centered_onehot(y_target, self.num_classes)) ** 2).sum(1).mean()
        if self.margin and syn.soft:
            loss = loss + label_margin(self.targets(syn))
        return loss
