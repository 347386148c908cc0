"""Post-distillation stages (``stages.<name>``, contract :class:`ddrun.contracts.Stage`): run once on the final S,
before the final evaluation, checkpointed after each.

:class:`Relabel` is the *relabel* of squeeze -> recover -> relabel (``+stage@stages.relabel=relabel``): S keeps
its images and gets a teacher pool's soft labels on them. The stored labels are the pool's mean logits divided by
``temperature`` (S's soft labels are logits: the evaluators train with soft cross-entropy on
``softmax(labels)``), i.e. the teachers' class probabilities at that temperature. It is the static form of
relabeling: one label per image, as TESLA (Cui et al., ICML 2023, Sec. 4.3: soft labels from the expert's
logits) and DATM (Guo et al., ICLR 2024, Sec. 4.2: expert logits as soft labels) assign them, with a
``ddrun teacher`` pool as the labeller. The per-crop relabeling of SRe2L / RDED / EDC (every augmented batch
labelled anew) is a protocol, not a property of S: ``evaluator=kd``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ddrun.contracts import Stage
from ddrun.data.datasets import RealData
from ddrun.synthetic import SyntheticSet
from ddrun.utils import ConfigError, DataError

log = logging.getLogger("ddrun.stages")

DISAGREE = ("teacher", "keep")
HARD_LOGIT = 100.0  # a hard class as logits: softmax(100 * onehot) is one-hot to within 4e-44


class Relabel(Stage):
    """S's labels become a teacher pool's soft labels on S's images (module doc).

    Args:
        teacher_net: the teacher architecture (a net config, partial; default the run's ``net``).
        extra_teacher_nets: more architectures averaged with it: name -> net config.
        recipe: the teachers' recipe (``conf/recipe/``; part of the store's key).
        num_teachers: teachers per architecture (None: every finished one).
        temperature: the stored labels are ``mean logits / temperature`` (> 0; 1: the teachers' probabilities).
        disagree: what an image whose class the teachers do not keep gets: ``teacher`` (their label, as every other
            image) or ``keep`` (its own label: a soft row as it is, a hard class as one-hot logits at
            :data:`HARD_LOGIT`, i.e. one-hot after the softmax). ``keep`` is the label-image consistency DATM
            (Guo et al., ICLR 2024, Sec. 4.2) gets by keeping only images its expert classifies correctly.
        buffers, data: ``paths.buffers`` (the store), ``paths.data`` (printed in a missing teacher's command).
        teacher_dir: an explicit collection directory (one architecture only).

    Raises:
        ConfigError: ``temperature <= 0`` or an unknown ``disagree`` (at construction, before any data is loaded).
        DataError: in :meth:`prepare`, a missing teacher (prints the ``ddrun teacher`` command) or one of another
            setting (names the differences); in :meth:`__call__`, S stored in another parametrization than pixels
            (its labels belong to stored images, not to the decoded ones a teacher would read).
    """

    name = "relabel"

    def __init__(self, teacher_net: Callable[..., nn.Module], extra_teacher_nets: Mapping | None = None,
                 recipe: str = "sre2l", num_teachers: int | None = 1, temperature: float = 1.0,
                 buffers: str = "buffers", data: str | None = None, teacher_dir: str | None = None,
                 disagree: str = "teacher"):
        if not float(temperature) > 0:
            raise ConfigError(f"stages.relabel.temperature={temperature}: must be > 0")
        if disagree not in DISAGREE:
            raise ConfigError(f"stages.relabel.disagree={disagree!r}: valid values are {list(DISAGREE)}")
        self.disagree = disagree
        self.nets = {"teacher": teacher_net, **dict(extra_teacher_nets or {})}
        self.recipe, self.num_teachers, self.temperature = recipe, num_teachers, float(temperature)
        self.buffers, self.data, self.teacher_dir = buffers, data, teacher_dir
        self._pool: list[dict] | None = None

    def prepare(self, real: RealData) -> None:
        """Load the teacher pool now: a missing teacher stops the run at start-up, not after distillation."""
        if self._pool is None:
            from ddrun.fetchers.teachers import load_teachers

            self._pool = load_teachers(self.nets, real, real.device, self.recipe, self.buffers, self.data,
                                       self.num_teachers, self.teacher_dir, what="stages.relabel")

    def describe(self) -> dict:
        """``{"teachers": phrase, "temperature": T}``: what S's meta and the protocols record of the labels."""
        from ddrun.fetchers.teachers import describe_teachers

        return {"teachers": describe_teachers(self.nets, self.num_teachers, self.recipe, self._pool),
                "temperature": self.temperature, **({"disagree": "keep"} if self.disagree == "keep" else {})}

    def __call__(self, syn: SyntheticSet, real: RealData, seed: int) -> SyntheticSet:
        """S with the same images and float ``[N, K]`` labels ``mean teacher logits / temperature`` (learned step
        size kept); ``meta["relabel"]`` says by whom; logs the share of images whose label the teachers keep."""
        from ddrun.fetchers.teachers import teacher_logits

        kind = syn.meta.get("parametrization", "pixels")
        if kind != "pixels":
            raise DataError(f"stages.relabel: S is stored as parametrization={kind}; its labels belong to the stored "
                            f"images, not to the decoded ones a teacher reads: relabel only pixel-space sets")
        self.prepare(real)
        images = syn.images.detach().to(real.device)
        logits = teacher_logits(self._pool, images, chunk=256).float() / self.temperature
        kept = logits.argmax(1) == syn.hard_labels().to(logits.device)
        agree = float(kept.float().mean()) if len(images) else 1.0
        (log.warning if agree < 0.5 else log.info)(
            "stages.relabel: the teachers keep the class of %.0f%% of S's %d images%s", 100 * agree, len(images),
            ", the others keep their own label (disagree=keep)" if self.disagree == "keep" else "")
        if self.disagree == "keep":
            own = syn.labels.detach().float().to(logits.device) if syn.soft else \
                HARD_LOGIT * F.one_hot(syn.labels.to(logits.device), logits.shape[1]).float()
            logits = torch.where(kept[:, None], logits, own)
        state = syn.state()  # images and learned step size kept (DD's per-step vector too)
        state.update(labels=logits.cpu(), meta={**state["meta"], "label_scale": 1.0, "label_kind": "logits",
                                                "relabel": {**self.describe(), "kept_class": round(agree, 4)}})
        return SyntheticSet.from_state(state).to(syn.images.device)
