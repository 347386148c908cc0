"""DATM's initialization of S from the expert buffer (``init=expert_correct``).

Guo et al., "Towards Lossless Dataset Distillation via Difficulty-Aligned Trajectory Matching", ICLR 2024,
Sec. 4.3 and the reference ``distill/DATM.py`` (``pix_init: samples_predicted_correctly``):

- images: per class, random real training images that an expert (its parameters at ``label_epoch``, the
  reference's ``Label_Model_Timestamp`` -1 = the last epoch) classifies correctly; when a class runs out before
  ``ipc`` are found, the next expert is asked about the rest (the reference rotates experts the same way);
- labels: each image's soft label is the mean of the logits of every expert (at ``label_epoch``) that predicts
  it correctly (the reference averages over all experts of all buffer files). An image no expert predicts
  correctly gets the mean over all experts (the reference divides by zero there).

The experts are the ``experts`` collection of the artefact store (:mod:`ddrun.store`) that ``fetcher=checkpoints``
reads, keyed by the same dataset, network and augmentation; a missing buffer is an error naming the ``ddrun
buffer`` command that makes it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from ddrun.data.augment import DSA
from ddrun.data.datasets import RealData
from ddrun.nets.functional import forward, unflatten
from ddrun.store import EXPERT_KEYS, Collection, setting_of
from ddrun.synthetic import SyntheticSet
from ddrun.utils import ConfigError, DataError, host_to

log = logging.getLogger("ddrun.init")


class ExpertBuffer:
    """Read access to the experts' parameters at one epoch: ``params(index) -> {name: tensor}`` and
    ``logits(index, images)`` float ``[B, K]`` (eval mode, batches of 256).

    Raises:
        DataError: no buffer for this setting (names the ``ddrun buffer`` command), or no usable expert.
        ConfigError: ``epoch`` beyond the buffer's epochs (names the epochs needed).
    """

    def __init__(self, real: RealData, net: Callable[..., nn.Module], augment: DSA | None, buffers: str,
                 data: str | None, buffer_dir: str | None, max_experts: int | None, epoch: int):
        from ddrun.nets import build_net

        self.store = Collection(buffers, "experts", setting_of(real, net, augment), buffer_dir)
        manifest = self.store.open_for_reading(data)
        epochs = int(manifest.get("training", {}).get("train_epochs", 0))
        self.epoch = epochs if int(epoch) == -1 else int(epoch)
        if not 0 <= self.epoch <= epochs:
            raise ConfigError(f"init.label_epoch={epoch}: the experts in {self.store.dir} have epochs 0..{epochs} "
                              f"(-1: the last); this needs experts of >= {self.epoch} epochs")
        self.indices = self.store.usable(max_experts)
        if not self.indices:
            raise DataError(f"no usable expert file in {self.store.dir}")
        self.net = build_net(net, real, 0, real.device).eval()

    def params(self, index: int) -> dict[str, torch.Tensor]:
        traj = self.store.load(index, EXPERT_KEYS, mmap=True)["trajectory"]
        return unflatten(traj[self.epoch].to(self.net_device()).clone(), self.net)

    def net_device(self) -> torch.device:
        return next(self.net.parameters()).device

    @torch.no_grad()
    def logits(self, params: dict[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
        return torch.cat([forward(self.net, params, images[i:i + 256]) for i in range(0, len(images), 256)])


def _pick_correct(experts: ExpertBuffer, real: RealData, c: int, ipc: int, generator: torch.Generator,
                  params: list[dict]) -> torch.Tensor:
    """``ipc`` random training images of class ``c`` that the experts classify correctly (expert 0 first, then
    the next for what is missing; random ones of the class when no expert finds enough)."""
    idx = real.class_index(c)
    order = idx[host_to(torch.randperm(len(idx), generator=generator), idx.device)]
    chosen: list[int] = []
    for p in params:
        if len(chosen) == ipc:
            break
        rest = order[~torch.isin(order, torch.tensor(chosen, dtype=order.dtype, device=order.device))]
        pred = experts.logits(p, real.train_images[rest]).argmax(1)
        chosen += rest[pred == c][:ipc - len(chosen)].tolist()
    if len(chosen) < ipc:
        log.warning("class %d: the experts classify only %d training images correctly; %d random ones fill S",
                    c, len(chosen), ipc - len(chosen))
        rest = order[~torch.isin(order, torch.tensor(chosen, dtype=order.dtype, device=order.device))]
        chosen += rest[:ipc - len(chosen)].tolist()
    return torch.tensor(chosen, dtype=torch.long)


def expert_soft_labels(stacked: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """DATM's label initialization from the experts' logits ``stacked`` float ``[E, N, K]`` (E experts, N images)
    and the images' classes ``labels`` int64 ``[N]``: float ``[N, K]``, per image the mean logits over the experts
    whose argmax is its class (over all experts where none is)."""
    correct = (stacked.argmax(2) == labels.to(stacked.device).view(1, -1)).float()  # [E, N]
    count = correct.sum(0)
    mean_correct = (stacked * correct.unsqueeze(2)).sum(0) / count.clamp(min=1).unsqueeze(1)
    none = count == 0
    if none.any():
        log.warning("%d images of S are predicted correctly by no expert; their labels are the mean of all "
                    "experts' logits", int(none.sum()))
    return torch.where(none.unsqueeze(1), stacked.mean(0), mean_correct)


def expert_correct(real: RealData, ipc: int, generator: torch.Generator, net: Callable[..., nn.Module],
                   augment: DSA | None = None, buffers: str = "buffers", data: str | None = None,
                   buffer_dir: str | None = None, max_experts: int | None = None, label_epoch: int = -1,
                   correct_only: bool = True, soft_labels: bool = True) -> SyntheticSet:
    """DATM's initialization (module doc): ``ipc`` real images per class, ordered class by class, that the experts
    classify correctly (``correct_only``; else random ones), with soft labels from the experts' logits
    (``soft_labels``; else hard labels).

    Args:
        net, augment, buffers, data, buffer_dir, max_experts: the buffer, as ``fetcher=checkpoints`` (the same
            setting key).
        label_epoch: the experts' epoch whose parameters classify and label (-1: the last).

    Returns:
        S with images float ``[K * ipc, C, H, W]`` and labels float ``[K * ipc, K]`` logits (or int64 ``[K * ipc]``).

    Raises:
        DataError, ConfigError: as :class:`ExpertBuffer`.
    """
    experts = ExpertBuffer(real, net, augment, buffers, data, buffer_dir, max_experts, label_epoch)
    params = [experts.params(i) for i in experts.indices]
    picks = []
    for c in range(real.num_classes):
        if correct_only:
            picks.append(_pick_correct(experts, real, c, ipc, generator, params))
        else:
            idx = real.class_index(c).cpu()
            picks.append(idx[torch.randperm(len(idx), generator=generator)[:ipc]])
    images = real.train_images[torch.cat(picks).to(real.device)]
    hard = torch.arange(real.num_classes).repeat_interleave(ipc)
    if soft_labels:
        labels = expert_soft_labels(torch.stack([experts.logits(p, images) for p in params]), hard).cpu()
    else:
        labels = hard
    log.info("init from %d experts of %s (epoch %d): accuracy of the soft labels on S %.1f%%", len(params),
             experts.store.dir, experts.epoch, 100.0 * float((labels.argmax(1) == hard).float().mean())
             if soft_labels else 100.0)
    return SyntheticSet(images.cpu(), labels, real.num_classes)
