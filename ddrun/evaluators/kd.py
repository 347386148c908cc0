"""The knowledge-distillation evaluation protocol of the decoupled family: students trained on S with a teacher's
soft labels computed online on every augmented batch ("relabel" + "validate").

SRe2L (Yin et al., NeurIPS 2023, Sec. 3.3; ``relabel_cifar.py``), RDED (Sun et al., CVPR 2024; ``validation/
main.py``) and EDC (Shao et al., NeurIPS 2024, Sec. 3.1-3.2; ``train/direct_train.py``) train a fresh student on S
for ``epochs`` epochs; every minibatch is augmented per sample (RandomResizedCrop + flip), mixed with CutMix
(Yun et al. 2019, ``torchvision.transforms.v2.CutMix``), and labelled by the frozen teacher (the mean logits of
the pool) on exactly those images. Losses:

- ``kl``: ``KL(softmax(t / T) || softmax(s / T))`` (batch mean), T = 20 with CutMix (RDED ``argument.py``;
  SRe2L's ImageNet script 20, its CIFAR-100 script 30). No ``T^2`` factor: AdamW's steps do not depend on the
  loss scale.
- ``mse_ce``: ``MSE(s, t) + gamma * CE(s, y)`` with gamma 0.025 (EDC ``mse_gt``; y the CutMix-mixed hard labels).

Optimizer AdamW (lr 1e-3, weight decay 0.01); step-size schedule per epoch: ``smoothing`` =
``1/2 (1 + cos(i pi / (zeta N)))`` (EDC Sec. 3.2; zeta 2 never falls below half the base step, zeta 1 is the
plain cosine; RDED hard-codes zeta 2), ``cosine`` (zeta 1) or ``constant``. Minibatch sizes per ipc of RDED (10 /
50 / 100 for ipc 1 / 10 / 50 with 10 classes). EDC evaluates an EMA of the student's weights (decay 0.99,
``torch.optim.swa_utils``); ``ema: null`` evaluates the student itself. The reported accuracy is that of the last
epoch on the whole real test split (the references report the best check after 80 % of the epochs, i.e. select
on the test set; we do not).

Labels (``labels``): ``online`` (RDED, EDC, SRe2L's CIFAR relabel) draws each student's own batches,
augmentation and mix and asks the teachers on each; ``stored`` is FKD's / SRe2L's ImageNet relabel (Shen & Xing,
ECCV 2022; Yin et al. 2023, Sec. 3.3: "relabel" stores each crop's coordinates, flip, mix and soft label once):
one relabel pass (:meth:`KDEvaluator.relabel`) draws every epoch's batch order and each batch's augmentation seed,
stores the teachers' logits on those exact images (float32, ``epochs x |S| x K`` values: 6 MB for CIFAR-10 at ipc
50 and 300 epochs, 600 MB for CIFAR-100), and every student replays that plan, so the teachers run once per
evaluation, not once per student, and the students differ only in their initialization. With ``relabel_dir``
the plan is also written to a file there and read back by every later evaluation of the same S with the same
teachers, epochs, batch size, augmentation, mix and seed, whatever the student (FKD's label files;
:mod:`ddrun.evaluators.relabel_files`). ``fkd`` replays the label files SRe2L's own relabel script writes
(``fkd_dir``: ``epoch_<e>/batch_<b>.tar``, :mod:`ddrun.evaluators.fkd_files`): every student trains on S's images
in the reference's batch order with the stored crops, flips, mixes and soft labels, one step per stored batch of the
stored size; no teacher is loaded.

The evaluator ignores S's stored labels except for the CE term (hard labels, argmax of soft ones), so it
evaluates any S: the random real subset, every earlier method's S, an imported image folder. Teachers come from
the store (``ddrun teacher``) through :func:`ddrun.fetchers.teachers.load_teachers`; a missing one is a one-line
error printing the command that makes it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import statistics
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ddrun.contracts import Evaluator as EvaluatorContract
from ddrun.data.datasets import RealData
from ddrun.data.transforms import Augment
from ddrun.evaluators.fkd_files import FKDLabels, batch_orders, mixed_target, replay
from ddrun.evaluators.relabel_files import Relabeled, load_plan, plan_key, plan_path, save_plan
from ddrun.evaluators.teacher_view import teacher_view
from ddrun.nets import build_net
from ddrun.protocol import net_kwargs
from ddrun.synthetic import SyntheticSet
from ddrun.train import accuracy
from ddrun.utils import ConfigError, DataError, derive_seed, host_to

log = logging.getLogger("ddrun.evaluate")

LOSSES = ("kl", "mse_ce")
SCHEDULES = ("smoothing", "cosine", "constant")
MIXES = ("cutmix", "mixup", "none")
LABELS = ("online", "stored", "fkd")


def smoothing_factor(epoch: int, epochs: int, zeta: float) -> float:
    """EDC's smoothing learning-rate schedule ``1/2 (1 + cos(epoch pi / (zeta epochs)))`` (EDC Sec. 3.2): 1 at
    epoch 0; at ``epochs``: 0 for zeta 1 (cosine), 1/2 for zeta 2."""
    return 0.5 * (1.0 + math.cos(math.pi * epoch / (zeta * epochs)))


def kd_loss(kind: str, student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor, temperature: float,
            gamma: float) -> torch.Tensor:
    """The student's loss on one batch (module doc): ``student`` / ``teacher`` logits float ``[B, K]``, ``target``
    the (CutMix-mixed) label distribution float ``[B, K]``. Returns a float scalar."""
    if kind == "kl":
        return F.kl_div(F.log_softmax(student / temperature, 1), F.softmax(teacher / temperature, 1),
                        reduction="batchmean")
    return F.mse_loss(student, teacher) + gamma * -(target * F.log_softmax(student, 1)).sum(1).mean()


@contextlib.contextmanager
def _seeded(generator: torch.Generator):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
        yield


class KDEvaluator(EvaluatorContract):
    """Students trained on S with online teacher soft labels (module doc).

    Args:
        student: factory of the student network (``conf/net``; ResNet-18-BN by default).
        teacher_net: the teacher architecture (the run's ``net``); extra_teacher_nets: more architectures averaged
            with it (EDC's ensemble), name -> net config.
        recipe, num_teachers, buffers, data, teacher_dir: which teachers (``ddrun teacher``; see
            :func:`~ddrun.fetchers.teachers.load_teachers`); their logits are averaged.
        num_eval: students trained (seeds ``(seed, r)``).
        epochs: training epochs on S.
        optimizer: ``adamw`` or ``sgd`` (momentum 0.9); lr, weight_decay: its settings.
        schedule: ``smoothing`` (with ``zeta``), ``cosine`` or ``constant``, stepped per epoch.
        loss: ``kl`` (with ``temperature``) or ``mse_ce`` (with ``gamma``).
        batch_train: minibatch size (None: ``batch_by_ipc`` for S's ipc, the entry of the largest ipc <= S's).
        augment: per-sample augmentation (RandomResizedCrop + flip).
        mix: ``cutmix`` (RDED, EDC, SRe2L ImageNet), ``mixup`` (SRe2L CIFAR-100) or ``none``; mix_alpha: the
            Beta(alpha, alpha) parameter (``torchvision.transforms.v2.CutMix`` / ``MixUp``).
        ema: decay of the evaluated EMA of the student's weights (None: the student itself).
        labels: ``online`` (each student's own batches, relabeled as they are drawn) or ``stored`` (one relabel
            plan replayed by every student, FKD-style; module doc).
        relabel_dir: with ``labels=stored``, the directory of relabel files (written once, read by later
            evaluations; :mod:`ddrun.evaluators.relabel_files`). None: the plan lives in memory for one evaluation.
        fkd_dir: with ``labels=fkd``, SRe2L's ``--fkd-path`` folder (:mod:`ddrun.evaluators.fkd_files`); fkd_seed:
            its sampler seed (``--fkd-seed``, 42). The batch size is the files'; augment, mix and the teachers are
            not used.
        name: the student's name in ``per_net`` (None: its class name, lower case).

    Raises:
        ConfigError: unknown loss / schedule / optimizer / mix / labels, non-positive sizes, ``relabel_dir``
            without ``labels=stored`` or naming a file, ``labels=fkd`` without ``fkd_dir`` or ``fkd_dir`` without it.
    """

    num_eval: int = 1
    uses_learned_lr = False

    def __init__(self, student: Callable[..., nn.Module], teacher_net: Callable[..., nn.Module],
                 recipe: str = "sre2l", num_teachers: int | None = 1,
                 extra_teacher_nets: Mapping[str, Callable[..., nn.Module]] | None = None, buffers: str = "buffers",
                 data: str | None = None, teacher_dir: str | None = None, num_eval: int = 1, epochs: int = 300,
                 optimizer: str = "adamw", lr: float = 1e-3, weight_decay: float = 0.01, schedule: str = "smoothing",
                 zeta: float = 2.0, loss: str = "kl", temperature: float = 20.0, gamma: float = 0.025,
                 batch_train: int | None = None, batch_by_ipc: Mapping[int, int] | None = None,
                 augment: Augment | None = None, mix: str = "cutmix", mix_alpha: float = 1.0, ema: float | None = None,
                 labels: str = "online", relabel_dir: str | None = None, fkd_dir: str | None = None,
                 fkd_seed: int = 42, name: str | None = None):
        for key, value, allowed in (("loss", loss, LOSSES), ("schedule", schedule, SCHEDULES),
                                    ("optimizer", optimizer, ("adamw", "sgd")), ("mix", mix, MIXES),
                                    ("labels", labels, LABELS)):
            if value not in allowed:
                raise ConfigError(f"evaluator.{key}={value!r}: valid values are {list(allowed)}")
        if int(epochs) < 1 or (batch_train is not None and int(batch_train) < 1) or float(temperature) <= 0:
            raise ConfigError("evaluator: epochs and batch_train must be >= 1 and temperature > 0")
        if ema is not None and not 0.0 < float(ema) < 1.0:
            raise ConfigError(f"evaluator.ema={ema}: must be in (0, 1) or null")
        if relabel_dir is not None and labels != "stored":
            raise ConfigError(f"evaluator.relabel_dir={relabel_dir} stores relabel plans: it needs "
                              f"evaluator.labels=stored (now {labels})")
        if (labels == "fkd") != (fkd_dir is not None):
            raise ConfigError(f"evaluator.labels={labels} with evaluator.fkd_dir={fkd_dir}: labels=fkd replays "
                              f"SRe2L's FKD label files and needs fkd_dir=<the --fkd-path folder of its relabel>, "
                              f"and fkd_dir needs labels=fkd")
        if relabel_dir is not None and Path(relabel_dir).exists() and not Path(relabel_dir).is_dir():
            raise ConfigError(f"evaluator.relabel_dir={relabel_dir} is a file: pass a folder (created if missing)")
        self.student, self.teacher_nets = student, {"teacher": teacher_net, **dict(extra_teacher_nets or {})}
        self.recipe, self.num_teachers, self.buffers, self.data = recipe, num_teachers, buffers, data
        self.teacher_dir, self.num_eval, self.epochs = teacher_dir, int(num_eval), int(epochs)
        self.optimizer, self.lr, self.weight_decay = optimizer, float(lr), float(weight_decay)
        self.schedule, self.zeta, self.loss = schedule, float(zeta), loss
        self.temperature, self.gamma = float(temperature), float(gamma)
        self.batch_train = None if batch_train is None else int(batch_train)
        self.batch_by_ipc = {int(k): int(v) for k, v in (batch_by_ipc or {1: 10, 10: 50, 50: 100}).items()}
        self.augment, self.mix, self.mix_alpha = augment, mix, float(mix_alpha)
        self.ema = None if ema is None else float(ema)
        self.labels, self.relabel_dir, self.name = labels, relabel_dir, name
        self._fkd = FKDLabels(fkd_dir, self.epochs, fkd_seed) if fkd_dir is not None else None
        self._pool: list[dict] | None = None
        self._warned_unreadable = False  # read_s's warning: once per evaluator

    # --- protocol --------------------------------------------------------------------------------------
    def _name(self) -> str:
        return self.name or getattr(self.student, "func", self.student).__name__.lower()

    def protocol_fields(self) -> dict:
        from ddrun.fetchers.teachers import describe_teachers

        teacher = describe_teachers(self.teacher_nets, self.num_teachers, self.recipe, self._pool)
        fields = {"evaluator": "kd", "archs": [self._name()], "nets": {self._name(): net_kwargs(self.student)},
                  "num_eval": self.num_eval, "epochs": self.epochs, "optimizer": self.optimizer, "lr": self.lr,
                  "lr_schedule": self.schedule + (f" zeta {self.zeta:g}" if self.schedule == "smoothing" else ""),
                  "momentum": 0.9 if self.optimizer == "sgd" else "betas (0.9, 0.999)",
                  "weight_decay": self.weight_decay,
                  "batch": self.batch_train or f"by ipc {self.batch_by_ipc}",
                  "augment": (self.augment.describe() if self.augment else "none")
                  + (f"+{self.mix}{self.mix_alpha:g}" if self.mix != "none" else ""),
                  "learned_lr": False,
                  "labels": (f"teacher {self.labels if self.labels == 'online' else 'stored (one relabel pass)'}: "
                             + (f"KL T {self.temperature:g}" if self.loss == "kl" else f"MSE + {self.gamma:g} CE")),
                  "teacher": teacher, "ema": self.ema}
        if self._fkd is not None:  # SRe2L's label files: their batches, crops, flips, mixes and logits
            loss = fields["labels"].split(": ", 1)[1]
            fields.update(batch=self._fkd.batch or "the FKD files'", teacher="none (labels from FKD files)",
                          augment=f"stored crops+flip+{self._fkd.mix or 'mix'} (FKD files)",
                          labels=f"{self._fkd.describe()}: {loss}")
        return fields

    # --- training --------------------------------------------------------------------------------------
    def prepare(self, real: RealData) -> None:
        """Load the teacher pool now (:meth:`teachers`), or with ``labels=fkd`` check the FKD folder's layout: a
        missing teacher or folder stops a distill run at start-up."""
        if self._fkd is not None:
            self._fkd.check_layout()
        else:
            self.teachers(real)

    def teachers(self, real: RealData) -> list[dict]:
        """The teacher pool (loaded on first use from the store; DataError with the ``ddrun teacher`` command when
        missing)."""
        if self._pool is None:
            from ddrun.fetchers.teachers import load_teachers

            self._pool = load_teachers(self.teacher_nets, real, real.device, self.recipe, self.buffers, self.data,
                                       self.num_teachers, self.teacher_dir, what="evaluator")
        return self._pool

    def batch_size(self, ipc: int, n: int) -> int:
        """The minibatch size for S of ``ipc`` images per class and ``n`` images."""
        if self.batch_train is not None:
            return min(self.batch_train, n)
        keys = [k for k in sorted(self.batch_by_ipc) if k <= ipc] or [min(self.batch_by_ipc)]
        return min(self.batch_by_ipc[keys[-1]], n)

    def _batch(self, x, y, k, g):
        from torchvision.transforms import v2

        if self.augment is not None:
            x = self.augment(x, g)
        target = F.one_hot(y, k).float()
        if self.mix != "none" and len(x) > 1:
            mixer = v2.CutMix if self.mix == "cutmix" else v2.MixUp
            with _seeded(g):
                x, target = mixer(alpha=self.mix_alpha, num_classes=k)(x, y)
        return x, target

    def _student(self, real: RealData, seed: int):
        """A fresh student from ``seed`` with its optimizer, per-epoch schedule and EMA (None without ``ema``)."""
        net = build_net(self.student, real, seed, real.device)
        if self.optimizer == "adamw":
            opt = torch.optim.AdamW(net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        else:
            opt = torch.optim.SGD(net.parameters(), lr=self.lr, momentum=0.9, weight_decay=self.weight_decay)
        zeta = {"smoothing": self.zeta, "cosine": 1.0}.get(self.schedule)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda e: 1.0 if zeta is None else smoothing_factor(e, self.epochs, zeta))
        ema = None
        if self.ema is not None:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(self.ema), use_buffers=True)
        return net, opt, sched, ema

    def _s(self, syn: SyntheticSet, real: RealData) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """S's images and hard labels on the device, the minibatch size and the number of classes."""
        images, labels = syn.images.detach().to(real.device), syn.hard_labels().detach().to(real.device)
        return images, labels, self.batch_size(len(images) // real.num_classes, len(images)), real.num_classes

    @staticmethod
    @torch.no_grad()
    def _teach(pool: list[dict], x: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """The pool's mean logits float ``[B, K]`` on the batch ``x`` (no gradient; in chunks of ``chunk``)."""
        from ddrun.fetchers.teachers import teacher_logits

        return teacher_logits(pool, x, chunk)

    def _labelled(self, images: torch.Tensor, labels: torch.Tensor, k: int, pool: list[dict], steps):
        """The labelled batches ``(x, target, teacher logits)`` of ``steps`` ``(idx, generator, logits or None)``:
        ``images[idx]`` augmented and mixed from the generator, labelled by the given logits (a stored plan) or by
        the pool on ``x`` (None). The one place a KD batch is made: online, in a relabel pass and in its replay."""
        for idx, gen, t in steps:
            x, target = self._batch(images[idx], labels[idx], k, gen)
            yield x, target, self._teach(pool, x) if t is None else t

    def relabel(self, syn: SyntheticSet, real: RealData, seed: int) -> list[list[Relabeled]]:
        """FKD-style relabel (``labels=stored``, module doc): for each of ``epochs`` epochs, a random batch order of
        S and, per batch, an augmentation seed and the teachers' mean logits on the batch augmented and mixed from
        that seed. Returns one list of :data:`Relabeled` steps per epoch; replaying a step with :meth:`_batch`
        reproduces the labelled images exactly."""
        pool, (images, labels, batch, k) = self.teachers(real), self._s(syn, real)
        g, plan = torch.Generator().manual_seed(seed), []
        for _ in tqdm(range(self.epochs), desc="relabel", leave=False, disable=None):
            order = host_to(torch.randperm(len(images), generator=g), images.device).split(batch)
            seeds = [int(torch.randint(2**62, (1,), generator=g)) for _ in order]
            steps = [(idx, torch.Generator().manual_seed(s), None) for idx, s in zip(order, seeds)]
            plan.append([(idx, s, t) for idx, s, (_, _, t) in
                         zip(order, seeds, self._labelled(images, labels, k, pool, steps))])
        return plan

    def stored_plan(self, syn: SyntheticSet, real: RealData, seed: int) -> list[list[Relabeled]]:
        """:meth:`relabel`, or with ``relabel_dir`` the plan of its file for this S, teachers and settings: read
        when it exists, else made and written there.

        Raises:
            DataError: the file is corrupt or inconsistent (names it, and that deleting it relabels); OSError: it
                cannot be written.
        """
        if self.relabel_dir is None:
            return self.relabel(syn, real, seed)
        images, labels, batch, k = self._s(syn, real)
        key = plan_key(images, labels, [m["net"] for m in self.teachers(real)], epochs=self.epochs,
                       size=len(images), batch=batch, classes=k, seed=seed, mix=f"{self.mix} {self.mix_alpha:g}",
                       augment=repr(sorted(vars(self.augment).items())) if self.augment else "none")
        path = plan_path(self.relabel_dir, key)
        if path.exists():
            log.info("relabel: reading %s", path)
            try:
                return load_plan(path, key, images.device)
            except DataError as exc:
                raise DataError(f"{exc}; delete {path} to relabel (it is made again)") from None
        plan = self.relabel(syn, real, seed)
        save_plan(plan, key, path)
        log.info("relabel: wrote %s", path)
        return plan

    def _epochs(self, syn: SyntheticSet, real: RealData, g: torch.Generator, plan: list[list[Relabeled]] | None):
        """Each epoch's labelled batches ``(x, target, teacher logits)``: drawn and relabeled online from ``g``,
        replayed from a stored ``plan``, or from SRe2L's FKD files (``labels=fkd``)."""
        if self._fkd is not None:
            yield from self._fkd_epochs(syn, real)
            return
        pool, (images, labels, batch, k) = self.teachers(real), self._s(syn, real)
        for e in range(self.epochs):
            if plan is None:
                order = host_to(torch.randperm(len(images), generator=g), images.device).split(batch)
                steps = [(idx, g, None) for idx in order]
            else:
                steps = [(idx, torch.Generator().manual_seed(s), t) for idx, s, t in plan[e]]
            yield self._labelled(images, labels, k, pool, steps)

    def _fkd_epochs(self, syn: SyntheticSet, real: RealData):
        """Each epoch's batches ``(x, target, stored logits)`` replayed from the FKD files (checked first by
        :meth:`FKDLabels.check`): S's images in the reference's order, cropped, flipped and mixed as stored."""
        images, labels = syn.images.detach().to(real.device), syn.hard_labels().detach().to(real.device)
        n, k, size = len(images), real.num_classes, tuple(images.shape[-2:])
        for e, order in enumerate(batch_orders(n, self._fkd.batch, self.epochs, self._fkd.seed)):
            yield ((replay(images[host_to(idx, images.device)], b),
                    mixed_target(labels[host_to(idx, labels.device)], k, b, size), host_to(b.logits, real.device))
                   for idx, b in zip(order, self._fkd.read_epoch(e, n, k, size)))

    def train_one(self, syn: SyntheticSet, real: RealData, seed: int,
                  plan: list[list[Relabeled]] | None = None) -> float:
        """Train one student from ``seed`` on S with the teachers' soft labels, online or from a stored ``plan``
        (:meth:`relabel`); its test accuracy (percent), of the EMA weights when ``ema`` is set."""
        net, opt, sched, ema = self._student(real, seed)
        for batches in self._epochs(syn, real, torch.Generator().manual_seed(seed), plan):
            net.train()
            for x, target, t in batches:
                loss = kd_loss(self.loss, net(x), t, target, self.temperature, self.gamma)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if ema is not None:
                    ema.update_parameters(net)
            sched.step()
        final = ema.module if ema is not None else net
        return 100.0 * accuracy(final, real.test_images, real.test_labels)

    def read_s(self, syn: SyntheticSet, real: RealData, floor: float = 0.5) -> dict[str, float]:
        """How the teacher pool reads S's images, un-augmented (:func:`~ddrun.evaluators.teacher_view.teacher_view`:
        agreement with S's labels, confidence, within-class feature diversity beside a real draw's), logged, and a
        warning when the agreement is below ``floor``: KD relabels S by the teacher, so images it cannot read (e.g.
        DM's or MTT's ipc-1 sets far outside the data's range) teach the students other classes, whatever S's own
        labels say. The warning is given once per evaluator (once per run: a distill run's evaluations every
        ``eval_every`` reuse it); later low shares are logged at INFO level. Returns the view (percent; the
        diversities as fractions)."""
        images, labels, _, k = self._s(syn, real)
        pool = self.teachers(real)
        logits = self._teach(pool, images, chunk=256)
        view = teacher_view(pool, images, labels, logits, real)
        if view:
            div = ("" if "teacher_diversity" not in view else ", within-class feature diversity %.3f (a real draw of "
                   "S's size: %.3f)" % (view["teacher_diversity"], view["teacher_diversity_real"]))
            log.info("evaluator=kd: the teacher%s on S: agreement with S's labels %.1f%%, confidence %.1f%%%s",
                     "s" if len(pool) > 1 else "", view["teacher_agreement"], view["teacher_confidence"], div)
        if view and view["teacher_agreement"] < 100 * floor:
            pred = logits.argmax(1)
            top = torch.bincount(pred, minlength=k)
            (log.info if self._warned_unreadable else log.warning)(
                "evaluator=kd: the teacher assigns only %.0f%% of S's images to their own class (%d of %d to class "
                "%d); the students learn the teacher's reading of S, not S's labels", view["teacher_agreement"],
                int(top.max()), len(pred), int(top.argmax()))
            self._warned_unreadable = True
        return view

    def __call__(self, syn: SyntheticSet, real: RealData, seed: int = 0) -> dict:
        """Evaluate S (module doc).

        Returns:
            ``{"acc_mean", "acc_std", "per_net": {name: [acc, ...]}, "protocol", "protocol_fields"}``, percent on
            the real test split, and with online labels the ``teacher_*`` numbers of :meth:`read_s`.

        Raises:
            DataError: no teacher in the store for this setting (prints the ``ddrun teacher`` command); a corrupt or
                inconsistent relabel file or FKD label file or folder (names it).
            ConfigError: ``labels=fkd`` with fewer epoch folders than ``epochs``, or a ``batch_train`` other than the
                files' batch size.
        """
        if self._fkd is not None:  # SRe2L's files: checked against S before any student trains; no teacher
            self._fkd.check(syn.hard_labels().detach(), real.num_classes, tuple(syn.images.shape[-2:]))
            if self.batch_train not in (None, self._fkd.batch):
                raise ConfigError(f"evaluator.batch_train={self.batch_train}, but the FKD files at {self._fkd.dir} "
                                  f"hold batches of {self._fkd.batch}: SRe2L's train_FKD trains on the stored "
                                  f"batches (pass evaluator.batch_train=null)")
        view = {}
        if self._fkd is None and self.labels != "stored":  # a stored plan / FKD files: no teacher run here
            view = self.read_s(syn, real)
        plan = self.stored_plan(syn, real, derive_seed(seed, 104729, -1)) if self.labels == "stored" else None
        accs = [self.train_one(syn, real, derive_seed(seed, 104729, r), plan)
                for r in tqdm(range(self.num_eval), desc="evaluate (kd)", leave=False, disable=None)]
        return {"acc_mean": statistics.fmean(accs), "acc_std": statistics.pstdev(accs) if len(accs) > 1 else 0.0,
                "per_net": {self._name(): accs}, "protocol": self.protocol(),
                "protocol_fields": self.protocol_fields(), **view}
