"""The checkpoint fetcher: segments of expert trajectories for trajectory matching (MTT).

Cazenavette et al., CVPR 2022, Sec. 3 and the reference ``distill.py``: every iteration samples an expert
trajectory and a start epoch ``t < max_start_epoch`` uniformly, and hands the objective the expert's parameters
after epoch ``t`` (the student's start) and after epoch ``t + expert_epochs`` (the target). The experts are the
files that ``ddrun buffer`` writes (layout in :mod:`ddrun.buffers`); they are memory-mapped, so only the two rows
of one expert are read per iteration and no expert is held in memory.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ddrun.buffers import buffer_command, expert_file, load_expert, read_manifest, setting_diff, setting_of
from ddrun.buffers import buffer_dir as keyed_buffer_dir
from ddrun.data.augment import DSA
from ddrun.data.datasets import RealData
from ddrun.nets.functional import Params, unflatten
from ddrun.synthetic import SyntheticSet
from ddrun.utils import ConfigError, DataError, derive_seed, file_digest

log = logging.getLogger("ddrun.fetchers.checkpoints")


@dataclass
class ExpertSegment:
    """What :class:`CheckpointFetcher` attaches to the network it returns (``net.expert_segment``).

    Attributes:
        expert: the expert's index in the buffer.
        start_epoch: t; the network's own parameters are the expert's after epoch t.
        target: the expert's parameters after epoch ``t + expert_epochs`` (``{name: tensor}`` on the device).
    """

    expert: int
    start_epoch: int
    target: Params


class CheckpointFetcher:
    """Fetch ``(start, target)`` segments of expert trajectories (module doc).

    Args:
        net: factory ``(channels, num_classes, im_size) -> nn.Module`` (the ``net`` config; part of the key).
        real: the real dataset (its name, training subset and ZCA are part of the key).
        device: where the returned network and target live.
        seed: the run's seed; the expert and start epoch of iteration ``it`` come from ``(seed, it)``.
        augment: the augmentation the experts were trained with (part of the key).
        buffers: ``paths.buffers``, the root of the keyed buffer directories.
        data: ``paths.data`` (only to print the ``ddrun buffer`` command of a missing buffer).
        buffer_dir: an explicit buffer directory instead of the keyed one (its settings must still match).
        expert_epochs: epochs between start and target (the paper's M).
        max_start_epoch: start epochs are drawn from ``[0, max_start_epoch)`` (the paper's T+).
        max_experts: use only the experts with the lowest indices, at most this many (None: all).
        verify_checksums: check each expert file's sha256 against the manifest the first time it is used.
        outer_loop, inner_loop: the loop's schedule (1, 0: one update of S per segment, no training on S).

    Raises:
        DataError: no buffer for this setting (names the path and the ``ddrun buffer`` command that makes it),
            a buffer made with another setting (says what differs), or no usable expert file.
        ConfigError: ``max_start_epoch + expert_epochs - 1`` exceeds the buffer's epochs, or bad values.
    """

    def __init__(self, net: Callable[..., nn.Module], real: RealData, device: torch.device, seed: int,
                 augment: DSA | None = None, buffers: str = "buffers", data: str | None = None,
                 buffer_dir: str | None = None, expert_epochs: int = 3, max_start_epoch: int = 25,
                 max_experts: int | None = None, verify_checksums: bool = True, outer_loop: int = 1,
                 inner_loop: int = 0):
        if int(expert_epochs) < 1:
            raise ConfigError(f"fetcher.expert_epochs={expert_epochs}: must be >= 1")
        if int(max_start_epoch) < 1:
            raise ConfigError(f"fetcher.max_start_epoch={max_start_epoch}: must be >= 1")
        if max_experts is not None and int(max_experts) < 1:
            raise ConfigError(f"fetcher.max_experts={max_experts}: must be >= 1 or null")
        self.device, self.seed = device, seed
        self.expert_epochs, self.max_start_epoch = int(expert_epochs), int(max_start_epoch)
        self.outer_loop, self.inner_loop = outer_loop, inner_loop
        self.verify_checksums = verify_checksums
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(seed, 7919))
            self.net = net(channels=real.channels, num_classes=real.num_classes, im_size=real.im_size).to(device)
        setting = setting_of(real, net, augment)
        self.dir = Path(buffer_dir) if buffer_dir else keyed_buffer_dir(buffers, setting)
        manifest = read_manifest(self.dir)
        if manifest is None:
            raise DataError(self._missing_message(Path(buffers), setting, data))
        diff = setting_diff(manifest["setting"], setting)
        if diff:
            raise DataError(f"the expert buffer {self.dir} was made with another setting: {'; '.join(diff)}. "
                            f"Create the matching one with `{buffer_command(setting, buffers, data)}`")
        self.epochs = int(manifest.get("training", {}).get("train_epochs", 0))
        last = self.max_start_epoch - 1 + self.expert_epochs
        if last > self.epochs:
            raise ConfigError(f"fetcher.max_start_epoch={self.max_start_epoch} + fetcher.expert_epochs="
                              f"{self.expert_epochs} reach epoch {last}, but the experts in {self.dir} were "
                              f"trained {self.epochs} epochs; lower them or make a buffer with train_epochs>={last}")
        entries = sorted(((int(k), v) for k, v in manifest["experts"].items()), key=lambda kv: kv[0])
        if max_experts is not None:
            entries = entries[:int(max_experts)]
        self.entries, self.usable, self._verified = dict(entries), [], set()
        for index, entry in entries:
            path = expert_file(self.dir, index)
            if not path.is_file():
                log.warning("expert %d: file %s is missing; using the other experts", index, path)
            elif path.stat().st_size != entry.get("bytes"):
                log.warning("expert %d: file %s is truncated or altered (%d bytes, the manifest says %s); using "
                            "the other experts", index, path, path.stat().st_size, entry.get("bytes"))
            else:
                self.usable.append(index)
        if not self.usable:
            raise DataError(f"no usable expert file in {self.dir} (of {len(entries)} in the manifest); run "
                            f"`{buffer_command(setting, buffers, data)}` again to (re)train them")
        self._names = [n for n, _ in self.net.named_parameters()]
        log.info("expert buffer %s: %d usable experts, %d epochs each", self.dir, len(self.usable), self.epochs)

    def _missing_message(self, root: Path, setting: dict, data: str | None) -> str:
        msg = (f"no expert buffer at {self.dir}; create it with `{buffer_command(setting, root, data)}` "
               f"(the paper: num_experts=100 train_epochs=50)")
        others = []
        for m in sorted(root.glob(f"{setting['dataset']['name']}*/*/*/manifest.json")):
            try:
                have = read_manifest(m.parent)
            except DataError:
                continue
            diff = setting_diff(have["setting"], setting)
            if diff:
                others.append(f"{m.parent} ({'; '.join(diff)})")
        if others:
            msg += ". Buffers for other settings exist: " + " | ".join(others[:3])
        return msg

    def _load(self, index: int) -> torch.Tensor:
        """The memory-mapped ``[epochs + 1, P]`` trajectory of expert ``index``; raises DataError if unusable."""
        path = expert_file(self.dir, index)
        if self.verify_checksums and index not in self._verified:
            want = self.entries[index].get("sha256")
            if want and file_digest(path) != want:
                raise DataError(f"corrupt expert file {path} (sha256 differs from the manifest)")
            self._verified.add(index)
        d = load_expert(path)
        traj = d["trajectory"]
        if list(d["names"]) != self._names or traj.shape[0] < self.epochs + 1:
            raise DataError(f"expert file {path} does not hold {self.epochs + 1} snapshots of this network")
        return traj

    def fetch(self, it: int) -> nn.Module:
        """The network with an expert's parameters after a random start epoch, ``net.expert_segment`` holding
        the target ``expert_epochs`` later. Corrupt experts are named in a warning and dropped."""
        g = torch.Generator().manual_seed(derive_seed(self.seed, 104723, it))
        while True:
            index = self.usable[int(torch.randint(len(self.usable), (1,), generator=g))]
            start = int(torch.randint(self.max_start_epoch, (1,), generator=g))
            try:
                traj = self._load(index)
                break
            except DataError as exc:
                self.usable.remove(index)
                if not self.usable:
                    raise DataError(f"{exc}; no usable expert is left in {self.dir}") from None
                log.warning("%s; continuing with the %d other experts", exc, len(self.usable))
        start_params = traj[start].to(self.device)
        target = traj[start + self.expert_epochs].to(self.device)
        with torch.no_grad():
            for p, v in zip(self.net.parameters(), unflatten(start_params, self.net).values()):
                p.copy_(v)
        self.net.expert_segment = ExpertSegment(index, start, unflatten(target.clone(), self.net))
        return self.net

    def update(self, net: nn.Module, syn: SyntheticSet, real: RealData, generator: torch.Generator) -> nn.Module:
        return net

    def release(self, net: nn.Module, syn: SyntheticSet, real: RealData, generator: torch.Generator) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
