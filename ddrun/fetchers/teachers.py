"""The teacher fetcher: a frozen pool of trained teachers from the artefact store, one member per iteration.

SRe2L (Yin et al., NeurIPS 2023) recovers S against one squeezed teacher; G-VBSM (Shao et al., CVPR 2024) and EDC
(Shao et al., NeurIPS 2024, Sec. 3 and the reference ``recover.py``: ``id = counter % len(model_teacher)``) cycle
through a pool of backbones, one per iteration. The teachers come from ``ddrun teacher`` (the ``teachers``
collection of :mod:`ddrun.store`, keyed by dataset, net and recipe); they are loaded once, in eval mode, with
frozen parameters, and handed to the objective as ``Fetched(net=teacher, teacher=teacher)``.

:func:`load_teachers` is the one way components read teachers (this fetcher, ``evaluator=kd``, ``init=rded``): a
missing collection is a DataError printing the ``ddrun teacher ...`` command that makes it; a collection of another
dataset, architecture or normalization is refused naming every difference.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import torch
from torch import nn

from ddrun.contracts import Fetched, Fetcher
from ddrun.data.datasets import RealData
from ddrun.nets import build_net, refuse_without_batchnorm
from ddrun.protocol import net_kwargs
from ddrun.store import Collection, command_for, load_teacher, teacher_setting
from ddrun.utils import ConfigError, DataError, derive_seed

log = logging.getLogger("ddrun.fetchers.teachers")


def load_teachers(nets: Mapping[str, Callable[..., nn.Module]], real: RealData, device: torch.device | str,
                  recipe: str, buffers: str, data: str | None = None, num_teachers: int | None = None,
                  teacher_dir: str | None = None, what: str = "fetcher") -> list[dict]:
    """The first ``num_teachers`` finished teachers of every architecture in ``nets``, frozen, in eval mode.

    Args:
        nets: name -> net factory (``conf/net/*.yaml``, partial); each is one collection of the store.
        real: the real dataset (its name, subset, normalization and shapes key the collections).
        device: where the teachers go.
        recipe: the recipe name the teachers were trained with (``conf/recipe/<name>.yaml``).
        buffers: ``paths.buffers`` (the store's root); data: ``paths.data`` (only for the printed command).
        num_teachers: teachers per architecture (None: every finished one).
        teacher_dir: an explicit collection directory (one architecture only; its setting must still match).
        what: the config key prefix in messages (``fetcher``, ``evaluator``, ``init``).

    Returns:
        ``[{"name": arch, "index": i, "net": nn.Module, "test_acc": float, "epochs": int, "dir": str}, ...]``,
        architectures in the order of ``nets``.

    Raises:
        DataError: no collection (prints the ``ddrun teacher`` command), another setting (names the
            differences), too few finished teachers, or a corrupt file.
        ConfigError: ``num_teachers < 1``, or ``teacher_dir`` with several architectures.
    """
    if num_teachers is not None and int(num_teachers) < 1:
        raise ConfigError(f"{what}.num_teachers={num_teachers}: must be >= 1 or null (all)")
    if teacher_dir is not None and len(nets) > 1:
        raise ConfigError(f"{what}.teacher_dir names one collection but the pool has {len(nets)} architectures")
    pool = []
    for name, factory in nets.items():
        store = Collection(buffers, "teachers", teacher_setting(real, factory, recipe), teacher_dir)
        want = 1 if num_teachers is None else int(num_teachers)
        try:
            manifest = store.open_for_reading(data, f"num_teachers={want}" if want > 1 else "")
        except DataError as exc:  # which component needs the teacher (a run may hold several)
            raise DataError(f"{what}: {exc}") from None
        usable = store.usable(num_teachers)
        if len(usable) < want:  # the collection's own recipe, so that the command adds to it
            cmd = command_for("teachers", store.setting, buffers, data, extra=f"num_teachers={want}",
                              training=manifest.get("training"))
            raise DataError(f"{what}: {store.dir} holds {len(usable)} finished teacher(s){_of(name)}, {want} needed; "
                            f"train them with `{cmd}`")
        entries = store.entries()
        for index in usable:
            net = load_teacher(store, index, factory, real, device)
            e = entries[index]
            pool.append({"name": name, "index": index, "net": net, "test_acc": float(e.get("test_acc", float("nan"))),
                         "epochs": int(e.get("epochs", 0)), "dir": str(store.dir)})
            log.info("teacher%s #%d (%s): test accuracy %.2f%%, %d epochs", _of(name), index, store.dir,
                     pool[-1]["test_acc"], pool[-1]["epochs"])
    return pool


@torch.no_grad()
def teacher_logits(pool: list[dict], x: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """The pool's mean logits float ``[B, K]`` on images ``x`` float ``[B, C, H, W]`` (no gradient; the members
    stay in eval mode), in chunks of ``chunk`` images (None: one batch). The one way ddrun reads a teacher pool's
    labels: the KD evaluator's batches, its readability check and the relabel stage."""
    step = len(x) if chunk is None else max(int(chunk), 1)
    return torch.cat([torch.stack([m["net"](x[i:i + step]) for m in pool]).mean(0)
                      for i in range(0, len(x), step)]) if len(x) else x.new_zeros(0, 0)


def describe_teachers(nets: Mapping[str, Callable[..., nn.Module]], num_teachers: int | None, recipe: str,
                      pool: list[dict] | None = None) -> str:
    """One phrase naming a teacher pool for protocols and records: the architectures with their keywords, the
    teachers per architecture, the recipe and (once loaded) each member's test accuracy, e.g.
    ``ConvNet(act relu, ..., width 64) x1, recipe sre2l, test acc 90.50``."""
    archs = " + ".join(f"{getattr(f, 'func', f).__name__}({', '.join(f'{k} {v}' for k, v in net_kwargs(f).items())})"
                       for f in nets.values())
    line = f"{archs} x{num_teachers or 'all'}, recipe {recipe}"
    if pool is not None:
        line += ", test acc " + "/".join(f"{m['test_acc']:.2f}" for m in pool)
    return line


def _of(name: str) -> str:
    """`` of <arch>`` for a named extra architecture of a pool; nothing for the pool's main net."""
    return "" if name in ("net", "teacher") else f" of {name}"


class TeacherFetcher(Fetcher):
    """A frozen pool of teachers, one per iteration (module doc).

    Args:
        net: the teacher architecture (the ``net`` config, partial).
        real, device, seed: as :class:`~ddrun.contracts.Fetcher`.
        recipe: the recipe name of the teachers (``conf/recipe/``; part of the collection key).
        num_teachers: teachers per architecture (None: every finished one).
        extra_nets: more architectures for a multi-backbone pool (G-VBSM / EDC): name -> net config.
        order: ``cycle`` (member ``it % size``, the EDC reference) or ``sample`` (uniform, drawn from
            ``(seed, it)``).
        buffers: ``paths.buffers``; data: ``paths.data`` (printed in the command of a missing teacher).
        teacher_dir: an explicit collection directory (single-architecture pools).
        require_batchnorm: every architecture must have BatchNorm layers (``objective=statistics`` with
            ``objective.bn``: the config passes ``${objective.bn}``); checked before the store is read.

    Raises:
        DataError, ConfigError: from :func:`load_teachers`; an unknown ``order``; an architecture without
            BatchNorm under ``require_batchnorm`` (names the BatchNorm variant).
    """

    def __init__(self, net: Callable[..., nn.Module], real: RealData, device: torch.device, seed: int,
                 recipe: str = "sre2l", num_teachers: int | None = 1,
                 extra_nets: Mapping[str, Callable[..., nn.Module]] | None = None, order: str = "cycle",
                 buffers: str = "buffers", data: str | None = None, teacher_dir: str | None = None,
                 require_batchnorm: bool = False):
        super().__init__(net, real, device, seed)
        if order not in ("cycle", "sample"):
            raise ConfigError(f"fetcher.order={order!r}: valid values are ['cycle', 'sample']")
        self.order = order
        nets = {"net": net, **dict(extra_nets or {})}
        if require_batchnorm:  # before the store is read: a missing teacher's command would make a useless one
            for name, factory in nets.items():
                refuse_without_batchnorm(build_net(factory, real, 0), name)
        self.pool = load_teachers(nets, real, device, recipe, buffers, data, num_teachers, teacher_dir)

    def fetch(self, it: int) -> Fetched:
        """Teacher ``it % size`` (``cycle``) or a uniform draw from ``(seed, it)`` (``sample``); ``info`` names
        it."""
        if self.order == "cycle":
            k = it % len(self.pool)
        else:
            g = torch.Generator().manual_seed(derive_seed(self.seed, 7027, it))
            k = int(torch.randint(len(self.pool), (1,), generator=g))
        member = self.pool[k]
        return Fetched(member["net"], teacher=member["net"],
                       info={"teacher": k, "arch": member["name"], "index": member["index"]})
