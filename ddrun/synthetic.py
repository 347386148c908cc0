"""The synthetic set S."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ddrun.files import load_tensors


# the presets whose objective learns KRR targets (ddrun.objectives.krr): their soft labels are regression targets
KERNEL_METHODS = ("kip", "rfad", "frepo")


class SyntheticSet(nn.Module):
    """The learned synthetic set S.

    Attributes:
        images: Parameter, float32 ``[N, C, H, W]`` in the dataset's normalized (and ZCA) space;
            N = ipc x K, ordered class by class.
        labels: int64 ``[N]`` hard labels (a buffer), or float32 ``[N, K]`` soft labels given as *logits*
            (a Parameter when learned, Sucholutsky & Schonlau 2021).
        syn_lr: Parameter (float32 scalar), the learned inner step size of MTT / DD, or None. It is stored and
            optimized directly, not as a log, so the papers' ``lr_lr`` values keep their meaning (MTT
            ``distill.py`` optimizes ``syn_lr`` itself with SGD); it can therefore go negative, which the loop
            reports as an error. DD (Wang et al. 2018) learns one step size per unrolled step: then ``syn_lr``
            is a float32 vector ``[T]`` (see :meth:`learn_lr`) and :attr:`lr` is its mean.
        num_classes: K.
        label_scale: soft-label logits per unit of regression target (the kernel objectives store their learned
            KRR targets Y as ``labels = label_scale * Y`` and set ``meta["label_kind"] = "regression"``; 1
            otherwise), see :meth:`regression_targets`.
        meta: plain dict of str/int/float/list values (dataset, normalization, zca, ipc, method, iteration, config
            hash, the run's seed and network: ``seed``, ``net``, ``net_kwargs`` a dict of plain values).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int, lr: float | None = None,
                 learn_labels: bool = False, meta: dict | None = None):
        super().__init__()
        self.images = nn.Parameter(images.detach().clone().float())
        if learn_labels:
            self.labels = nn.Parameter(labels.detach().clone().float())
        else:
            self.register_buffer("labels", labels.detach().clone())
        self._finish(num_classes, lr, meta)

    def _finish(self, num_classes: int, lr: float | None, meta: dict | None) -> None:
        self.syn_lr = None if lr is None else nn.Parameter(torch.as_tensor(lr, dtype=torch.float32).clone())
        self.num_classes = int(num_classes)
        self.meta = dict(meta or {})
        self.label_scale = float(self.meta.get("label_scale", 1.0))

    @classmethod
    def frozen(cls, images: torch.Tensor, labels: torch.Tensor, num_classes: int) -> "SyntheticSet":
        """A set over ``images`` float ``[N, C, H, W]`` and hard ``labels`` int64 ``[N]`` as they are: buffers, no
        copy, nothing learnable. What ``ddrun evaluate full=true`` evaluates (the whole training split through the
        read interface every evaluator takes, without a second copy of it)."""
        s = cls.__new__(cls)
        nn.Module.__init__(s)
        s.register_buffer("images", images)
        s.register_buffer("labels", labels)
        s._finish(num_classes, None, None)
        return s

    @property
    def ipc(self) -> int:
        return len(self.images) // self.num_classes

    @property
    def lr(self) -> torch.Tensor | None:
        """The learned step size as a differentiable scalar (the Parameter itself, or the mean of a per-step
        vector: what the evaluator trains with), or None."""
        if self.syn_lr is None or self.syn_lr.dim() == 0:
            return self.syn_lr
        return self.syn_lr.mean()

    def learn_lr(self, init: float, steps: int | None = None) -> None:
        """Make the inner step size a learned parameter, initialized at ``init`` (e.g. MTT's ``lr_teacher``);
        with ``steps``, one step size per unrolled step (a vector ``[steps]``, DD's per-step learning rates)."""
        shape = () if steps is None else (int(steps),)
        self.syn_lr = nn.Parameter(torch.full(shape, float(init), dtype=torch.float32, device=self.images.device))

    def learn_labels(self, scale: float = 1.0) -> None:
        """Make the labels learnable: hard labels become float ``[N, K]`` logits ``scale`` x one-hot (Sucholutsky &
        Schonlau 2021; KIP / FRePo learn labels this way; ``scale`` 0: uniform, Bohdal et al. 2020); soft labels
        already there (e.g. DATM's expert logits) are kept as they are and become learnable."""
        if self.soft:
            logits = self.labels.detach().clone().float()
        else:
            logits = torch.nn.functional.one_hot(self.labels, self.num_classes).float() * scale
        if "labels" in self._buffers:
            del self._buffers["labels"]
        self.labels = nn.Parameter(logits.to(self.images.device))

    @property
    def soft(self) -> bool:
        return self.labels.dtype.is_floating_point

    @property
    def labels_are_regression_targets(self) -> bool:
        """Whether S's soft labels are learned KRR targets (``meta["label_kind"] == "regression"``, written by the
        kernel objectives; sets saved before that key by ``method`` kip / rfad / frepo) rather than logits of a
        classifier (a teacher's or an expert's, DATM's, learned under cross-entropy)."""
        kind = self.meta.get("label_kind")
        return kind == "regression" if kind is not None else self.meta.get("method") in KERNEL_METHODS

    def regression_targets(self) -> torch.Tensor:
        """float ``[N, K]``, the targets of the regression protocol (KIP / RFAD / FRePo's finite networks, FRePo's
        pool): learned KRR targets, i.e. soft labels divided by :attr:`label_scale`
        (:attr:`labels_are_regression_targets`); centered one-hot ``onehot - 1/K`` of hard labels; and for soft
        labels that are logits (a relabeled S, TESLA / DATM) the centered probabilities ``softmax(labels) - 1/K``,
        on the scale of the hard targets (their limit for a confident teacher), not the logits' own."""
        if self.soft and self.labels_are_regression_targets:
            return self.labels / self.label_scale
        if self.soft:
            return torch.softmax(self.labels, dim=1) - 1.0 / self.labels.shape[1]
        return torch.nn.functional.one_hot(self.labels, self.num_classes).float() - 1.0 / self.num_classes

    def hard_labels(self) -> torch.Tensor:
        """int64 ``[N]``: the labels, or the argmax of soft labels."""
        return self.labels.argmax(1) if self.soft else self.labels

    def class_slice(self, c: int) -> torch.Tensor:
        """Indices of the images whose (hard) label is ``c``."""
        return torch.nonzero(self.hard_labels() == c).flatten()

    def param_groups(self, lr_img: float, lr_lr: float | None = None, lr_labels: float | None = None) -> list[dict]:
        """Optimizer parameter groups: the images, and the learned step size / labels where they are learned.
        ``lr_img`` 0 freezes the images: they get no group and no gradient (learned labels on fixed images,
        Bohdal et al. 2020)."""
        groups = [{"params": [self.images], "lr": lr_img, "name": "images"}] if lr_img else []
        self.images.requires_grad_(bool(lr_img))
        if self.syn_lr is not None and lr_lr:
            groups.append({"params": [self.syn_lr], "lr": lr_lr, "name": "lr"})
        if isinstance(self.labels, nn.Parameter) and lr_labels:
            groups.append({"params": [self.labels], "lr": lr_labels, "name": "labels"})
        return groups

    def state(self) -> dict:
        """A plain dict ``{images, labels, lr, meta}`` (CPU tensors; ``lr`` a float32 scalar or None)."""
        return {
            "images": self.images.detach().cpu().clone(),
            "labels": self.labels.detach().cpu().clone(),
            "lr": None if self.syn_lr is None else self.syn_lr.detach().cpu().clone(),
            "meta": {**self.meta, "label_scale": self.label_scale},
        }

    def save(self, path: str | Path) -> None:
        """Write :meth:`state` to ``path`` atomically; ``torch.load(path, weights_only=True)`` reads it."""
        from ddrun.files import atomic_save

        atomic_save(self.state(), path)

    @torch.no_grad()
    def load_state(self, state: dict) -> None:
        """Copy images, labels and the learned step size of a :meth:`state` dict into this set (in place)."""
        self.images.copy_(state["images"])
        self.labels.copy_(state["labels"])
        if self.syn_lr is not None and state.get("lr") is not None:
            self.syn_lr.copy_(state["lr"])

    @classmethod
    def from_state(cls, state: dict, learn_labels: bool = False) -> "SyntheticSet":
        lr = state.get("lr")  # a scalar, or DD's per-step vector
        labels = state["labels"]
        meta = dict(state.get("meta") or {})
        k = int(meta.get("num_classes", labels.shape[1] if labels.dtype.is_floating_point else int(labels.max()) + 1))
        return cls(state["images"], labels, k, lr, learn_labels, meta)

    @classmethod
    def load(cls, path: str | Path) -> "SyntheticSet":
        """Load a file written by :meth:`save`, or any ``{images, labels}`` tensor dict.

        Raises:
            DataError: the file is missing, unreadable or lacks ``images`` / ``labels``.
        """
        return cls.from_state(load_tensors(path, "synthetic set", keys=("images", "labels")))
