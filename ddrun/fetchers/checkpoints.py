"""The checkpoint fetcher: segments of expert trajectories for trajectory matching (MTT, DATM).

Cazenavette et al., CVPR 2022, Sec. 3 and the reference ``distill.py``: every iteration samples an expert
trajectory and a start epoch ``t < max_start_epoch`` uniformly, and hands the objective the expert's parameters
after epoch ``t`` (the student's start) and after epoch ``t + expert_epochs`` (the target). The experts are the
``experts`` collection of the artefact store that ``ddrun buffer`` writes (:mod:`ddrun.store`); they are
memory-mapped, so only the two rows of one expert are read per iteration and no expert is held in memory.

DATM's difficulty-aligned window (Guo et al., "Towards Lossless Dataset Distillation via Difficulty-Aligned
Trajectory Matching", ICLR 2024, Sec. 4.2; reference ``distill/DATM.py`` ``Sequential_Generation``): the start
epoch is drawn from ``[min_start_epoch, U(it))`` with the upper bound growing linearly from
``current_max_start_epoch`` at iteration 0 to ``max_start_epoch`` at ``expansion_end_epoch`` (an iteration
count, despite its name), ``U(it) = min(cur + floor((max - cur) * it / expansion_end_epoch), max)``; without
``current_max_start_epoch`` the window is fixed at ``[min_start_epoch, max_start_epoch)``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from ddrun.contracts import NET_SEED_TAG, Fetched, Fetcher
from ddrun.data.augment import DSA
from ddrun.data.datasets import RealData
from ddrun.nets.functional import unflatten
from ddrun.store import EXPERT_KEYS, Collection, command_for, setting_of
from ddrun.utils import ConfigError, DataError, derive_seed

log = logging.getLogger("ddrun.fetchers.checkpoints")


class CheckpointFetcher(Fetcher):
    """Fetch ``(start, target)`` segments of expert trajectories (module doc).

    Args:
        net: factory ``(channels, num_classes, im_size) -> nn.Module`` (the ``net`` config; part of the key).
        real: the real dataset (its name, training subset and ZCA are part of the key).
        device: where the returned network and parameters live.
        seed: the run's seed; the expert and start epoch of iteration ``it`` come from ``(seed, it)``.
        augment: the augmentation the experts were trained with (part of the key).
        buffers: ``paths.buffers``, the root of the store.
        data: ``paths.data`` (only to print the ``ddrun buffer`` command of a missing buffer).
        buffer_dir: an explicit buffer directory instead of the keyed one (its settings must still match).
        expert_epochs: epochs between start and target (the paper's M).
        max_start_epoch: start epochs are drawn from ``[min_start_epoch, max_start_epoch)`` (the paper's T+).
        min_start_epoch: the window's lower end (DATM; MTT: 0).
        current_max_start_epoch: DATM's growing window: the upper end at iteration 0 (None: no growth).
        expansion_end_epoch: the iteration at which the upper end reaches ``max_start_epoch``.
        max_experts: use only the experts with the lowest indices, at most this many (None: all).
        verify_checksums: check each expert file's sha256 against the manifest the first time it is used.

    Raises:
        DataError: no buffer for this setting (names the path and the ``ddrun buffer`` command that makes it),
            a buffer made with another setting (says what differs), or no usable expert file.
        ConfigError: ``max_start_epoch + expert_epochs - 1`` exceeds the buffer's epochs (names the epochs
            needed and the command making such a buffer), or bad values (an empty window, ...).
    """

    def __init__(self, net: Callable[..., nn.Module], real: RealData, device: torch.device, seed: int,
                 augment: DSA | None = None, buffers: str = "buffers", data: str | None = None,
                 buffer_dir: str | None = None, expert_epochs: int = 3, max_start_epoch: int = 25,
                 min_start_epoch: int = 0, current_max_start_epoch: int | None = None,
                 expansion_end_epoch: int | None = None, max_experts: int | None = None,
                 verify_checksums: bool = True):
        super().__init__(net, real, device, seed)
        if int(expert_epochs) < 1:
            raise ConfigError(f"fetcher.expert_epochs={expert_epochs}: must be >= 1")
        if max_experts is not None and int(max_experts) < 1:
            raise ConfigError(f"fetcher.max_experts={max_experts}: must be >= 1 or null")
        self.expert_epochs = int(expert_epochs)
        self._check_window(int(min_start_epoch), current_max_start_epoch, int(max_start_epoch), expansion_end_epoch)
        self.verify_checksums, self.data = verify_checksums, data
        self.net = self.fresh(derive_seed(seed, NET_SEED_TAG))
        self.store = Collection(buffers, "experts", setting_of(real, net, augment), buffer_dir)
        manifest = self.store.open_for_reading(data)
        self._training = manifest.get("training")  # printed commands train as this buffer's experts were
        self.epochs = int((self._training or {}).get("train_epochs", 0))
        last = self.max_start_epoch - 1 + self.expert_epochs
        if last > self.epochs:
            raise ConfigError(f"fetcher.max_start_epoch={self.max_start_epoch} + fetcher.expert_epochs="
                              f"{self.expert_epochs} reach epoch {last}, but the experts in {self.store.dir} were "
                              f"trained {self.epochs} epochs: this needs experts of >= {last} epochs; lower them "
                              f"or make such a buffer in another folder (one folder holds one training setting): "
                              f"`{self._longer(last)}`")
        self.usable = self.store.usable(max_experts)
        if not self.usable:  # the buffer's own count: the command's default (100) would train others too
            count = max(self.store.entries(), default=0) + 1
            raise DataError(f"no usable expert file in {self.store.dir}; run `{self._command(f'num_experts={count}')}`"
                            f" again to (re)train them")
        self._names = [n for n, _ in self.net.named_parameters()]
        log.info("expert buffer %s: %d usable experts, %d epochs each", self.store.dir, len(self.usable),
                 self.epochs)

    def _check_window(self, lo: int, cur: int | None, hi: int, end: int | None) -> None:
        if hi < 1:
            raise ConfigError(f"fetcher.max_start_epoch={hi}: must be >= 1")
        if cur is not None and (end is None or int(end) < 1):
            shown = "null" if end is None else end
            raise ConfigError(f"fetcher.expansion_end_epoch={shown}: the growing window (fetcher.current_max_start_"
                              f"epoch={cur}) needs the iteration at which it reaches max_start_epoch, >= 1")
        first = hi if cur is None else int(cur)
        if not 0 <= lo < first <= hi:
            raise ConfigError(f"fetcher start window: need 0 <= min_start_epoch ({lo}) < current_max_start_epoch "
                              f"({cur}) <= max_start_epoch ({hi})" if cur is not None else
                              f"fetcher start window: need 0 <= min_start_epoch ({lo}) < max_start_epoch ({hi})")
        self.min_start_epoch, self.max_start_epoch = lo, hi
        self.current_max_start_epoch = None if cur is None else int(cur)
        self.expansion_end_epoch = None if end is None else int(end)

    def start_window(self, it: int) -> tuple[int, int]:
        """``(lo, hi)``: iteration ``it`` draws its start epoch uniformly from ``[lo, hi)`` (module doc)."""
        if self.current_max_start_epoch is None:
            return self.min_start_epoch, self.max_start_epoch
        cur, hi = self.current_max_start_epoch, self.max_start_epoch
        return self.min_start_epoch, min(cur + (hi - cur) * int(it) // self.expansion_end_epoch, hi)

    def _command(self, extra: str = "") -> str:
        return command_for("experts", self.store.setting, self.store.root, self.data, extra, training=self._training)

    def _longer(self, epochs: int) -> str:
        """The command for a buffer like this one with ``epochs`` epochs per expert, in another folder."""
        training = {**(self._training or {}), "train_epochs": epochs}
        return command_for("experts", self.store.setting, "<another folder>", self.data, training=training)

    def _load(self, index: int) -> torch.Tensor:
        """The memory-mapped ``[epochs + 1, P]`` trajectory of expert ``index``; raises DataError if unusable."""
        d = self.store.load(index, EXPERT_KEYS, mmap=True, verify=self.verify_checksums)
        traj = d["trajectory"]
        if list(d["names"]) != self._names or traj.shape[0] < self.epochs + 1:
            raise DataError(f"expert file {self.store.item_path(index)} does not hold {self.epochs + 1} snapshots "
                            f"of this network")
        return traj

    def fetch(self, it: int) -> Fetched:
        """The network with an expert's parameters after a random start epoch; ``start`` / ``target`` hold the
        parameters at that epoch and ``expert_epochs`` later. Corrupt experts are named in a warning and
        dropped."""
        g = torch.Generator().manual_seed(derive_seed(self.seed, 104723, it))
        while True:
            index = self.usable[int(torch.randint(len(self.usable), (1,), generator=g))]
            lo, hi = self.start_window(it)
            start = int(torch.randint(lo, hi, (1,), generator=g))
            try:
                traj = self._load(index)
                break
            except DataError as exc:
                self.usable.remove(index)
                if not self.usable:
                    raise DataError(f"{exc}; no usable expert is left in {self.store.dir}") from None
                log.warning("%s; continuing with the %d other experts", exc, len(self.usable))
        start_params = traj[start].to(self.device)
        target = traj[start + self.expert_epochs].to(self.device)
        with torch.no_grad():
            for p, v in zip(self.net.parameters(), unflatten(start_params, self.net).values()):
                p.copy_(v)
        return Fetched(self.net, start=unflatten(start_params.clone(), self.net),
                       target=unflatten(target.clone(), self.net),
                       info={"expert": index, "start_epoch": start})
