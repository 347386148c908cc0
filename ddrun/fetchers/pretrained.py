"""The pretrained fetcher: networks trained on a source dataset, one drawn per iteration (DD's adaptation and
poisoning modes).

Wang, Zhu, Torralba & Efros, "Dataset Distillation", 2018, Sec. 3.4-3.5 and the reference
ssnl/dataset-distillation (``--train_nets_type loaded``, ``docs/advanced.md``): a pool of networks trained on a
*source* dataset (e.g. 200 LeNets on USPS or SVHN for adaptation to MNIST; networks trained on the distilled
dataset itself for poisoning) provides theta_0; every iteration starts the learned steps from one of them; the
learned steps are evaluated by replaying them from pretrained networks held out of training (20 in the paper).

The pool is the ``teachers`` collection of the artefact store (:mod:`ddrun.store`) for the source dataset's
setting (dataset, network, recipe), written by ``ddrun teacher``: each item a full ``state_dict``
(:func:`ddrun.store.teacher_payload`), read with ``weights_only=True`` (:func:`ddrun.store.load_teacher`). The
last ``held_out`` teachers of the collection are kept for :meth:`PretrainedFetcher.held_out`; the others are
drawn uniformly, iteration ``it`` from ``(seed, it)``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from ddrun.contracts import Fetched, Fetcher
from ddrun.data.datasets import RealData
from ddrun.store import Collection, command_for, load_teacher, teacher_setting
from ddrun.utils import ConfigError, DataError, derive_seed

log = logging.getLogger("ddrun.fetchers.pretrained")


class PretrainedFetcher(Fetcher):
    """Draw theta_0 from networks pretrained on a source dataset (module doc).

    Args:
        net: factory ``(channels, num_classes, im_size) -> nn.Module`` (the ``net`` config; part of the key).
        real: the distilled (target) dataset.
        device: where the returned networks live.
        seed: the run's seed.
        source: the dataset the networks were pretrained on (a dataset config built by Hydra), or None: ``real``
            itself (poisoning; adaptation from a model fixed on the target).
        recipe: the ``ddrun teacher`` recipe the networks were trained with (part of the key, as for
            ``fetcher=teachers``).
        buffers: ``paths.buffers``, the root of the store.
        data: ``paths.data`` (only to print the ``ddrun teacher`` command of a missing pool).
        collection_dir: an explicit directory instead of the keyed one (its setting must still match).
        held_out: how many teachers (the highest indices) are kept for evaluation only.
        max_teachers: use only the teachers with the lowest indices, at most this many (None: all).

    Raises:
        DataError: no pool for the source setting (names the path and the ``ddrun teacher`` command that makes
            it), a pool of another setting (says what differs).
        ConfigError: source and target differ in channels, image size or classes (says how to adapt); too few
            teachers for ``held_out`` plus one to train with.
    """

    def __init__(self, net: Callable[..., nn.Module], real: RealData, device: torch.device, seed: int,
                 source: RealData | None = None, recipe: str = "sre2l", buffers: str = "buffers",
                 data: str | None = None, collection_dir: str | None = None, held_out: int = 1,
                 max_teachers: int | None = None):
        super().__init__(net, real, device, seed)
        self.source = real if source is None else source
        self._check_shapes(self.source, real)
        if int(held_out) < 1:
            raise ConfigError(f"fetcher.held_out={held_out}: must be >= 1 (networks kept to evaluate the steps)")
        self.store = Collection(buffers, "teachers", teacher_setting(self.source, net, recipe), collection_dir)
        need = f"num_teachers={int(held_out) + 1}"  # held_out kept aside, at least one to distill with
        manifest = self.store.open_for_reading(data, need)
        usable = self.store.usable(max_teachers)
        if len(usable) < int(held_out) + 1:
            more = command_for("teachers", self.store.setting, buffers, data, need, training=manifest.get("training"))
            raise ConfigError(f"the teacher collection {self.store.dir} has {len(usable)} usable networks; "
                              f"fetcher.held_out={held_out} needs at least {int(held_out) + 1}: train more "
                              f"(`{more}`) or lower fetcher.held_out")
        self.train_ids, self.held_ids = usable[:-int(held_out)], usable[-int(held_out):]
        self._cache: dict[int, dict[str, torch.Tensor]] = {}
        log.info("pretrained pool %s: %d networks to distill with, %d held out", self.store.dir,
                 len(self.train_ids), len(self.held_ids))

    @staticmethod
    def _check_shapes(source: RealData, real: RealData) -> None:
        mine = (source.channels, tuple(source.im_size), source.num_classes)
        theirs = (real.channels, tuple(real.im_size), real.num_classes)
        if mine != theirs:
            raise ConfigError(f"the source dataset {source.name} has (channels, image size, classes) {mine}, the "
                              f"distilled dataset {real.name} {theirs}: the pretrained networks must fit both "
                              f"(resize the source, e.g. dataset@fetcher.source=sklearn_digits "
                              f"fetcher.source.im_size=[28,28])")

    def _network(self, index: int) -> nn.Module:
        """Teacher ``index`` as a trainable network on the device (a fresh module each call)."""
        if index not in self._cache:
            teacher = load_teacher(self.store, index, self.net_factory, self.source)
            self._cache[index] = {k: v.clone() for k, v in teacher.state_dict().items()}
        net = self.fresh(0)
        net.load_state_dict(self._cache[index])
        return net.train().requires_grad_(True)

    def fetch(self, it: int) -> Fetched:
        """A copy of a pretrained network drawn from ``(seed, it)`` (the held-out ones never)."""
        g = torch.Generator().manual_seed(derive_seed(self.seed, 7717, it))
        index = self.train_ids[int(torch.randint(len(self.train_ids), (1,), generator=g))]
        try:
            return Fetched(self._network(index), info={"teacher": index})
        except DataError as exc:
            raise DataError(f"{exc}; remove it from {self.store.dir} or retrain it with `ddrun teacher`") from None

    def held_out(self, r: int) -> nn.Module:
        """Held-out pretrained network ``r`` (cycling over the ``held_out`` of them)."""
        return self._network(self.held_ids[r % len(self.held_ids)])
