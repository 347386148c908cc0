"""The evaluator: train fresh networks only on S, test them on the real test split.

The protocol is the DC / DSA / DM / MTT reference's ``evaluate_synset`` (Zhao et al. ICLR 2021, Sec. 4;
Zhao & Bilen ICML 2021): ``num_eval`` networks, each trained ``epochs`` epochs on S with SGD (momentum 0.9,
weight decay 5e-4, step size ``lr``, multiplied by 0.1 once half-way), minibatch 256, DSA applied per sample,
then tested on the whole real test split. When S carries a learned step size (MTT, DD) and ``use_learned_lr``
is set, that step size replaces ``lr``; soft labels are trained with soft cross-entropy.

:class:`CrossArchEvaluator` runs that protocol for each architecture of the reference pool; ``ddrun evaluate``
(:func:`evaluate_cmd`) applies any evaluator to a saved S or to the whole real training set.
"""

from __future__ import annotations

import logging
import statistics
from typing import Callable

import hydra
import torch
from torch import nn
from tqdm.auto import tqdm

from ddrun.data.augment import DSA
from ddrun.data.datasets import RealData
from ddrun.synthetic import SyntheticSet
from ddrun.train import accuracy, train_epoch
from ddrun.utils import derive_seed

log = logging.getLogger("ddrun.evaluate")


class Evaluator:
    """Trains ``num_eval`` fresh ``net`` on S and reports test accuracy (percent).

    Args:
        net: factory ``(channels, num_classes, im_size) -> nn.Module``.
        num_eval: networks trained (different seeds ``(seed, r)``: the same for every S of a run and across runs
            with the same ``seed``).
        epochs: training epochs of each network on S.
        lr, momentum, weight_decay, batch_train: SGD settings.
        augment: per-sample DSA during training, or None.
        use_learned_lr: train with S's learned step size when it has one.
        name: the architecture's name in ``per_net``.
    """

    def __init__(self, net: Callable[..., nn.Module], num_eval: int = 5, epochs: int = 1000, lr: float = 0.01,
                 momentum: float = 0.9, weight_decay: float = 5e-4, batch_train: int = 256,
                 augment: DSA | None = None, use_learned_lr: bool = True, name: str = "convnet"):
        self.net_factory, self.num_eval, self.epochs = net, num_eval, epochs
        self.lr, self.momentum, self.weight_decay, self.batch_train = lr, momentum, weight_decay, batch_train
        self.augment, self.use_learned_lr, self.name = augment, use_learned_lr, name

    def protocol(self) -> str:
        """One line naming the protocol, for logs and tables."""
        aug = self.augment.strategy if self.augment is not None and self.augment.enabled else "none"
        return (f"{self.name} x{self.num_eval}, {self.epochs} epochs, SGD lr {self.lr} (x0.1 at half), "
                f"mom {self.momentum}, wd {self.weight_decay}, batch {self.batch_train}, aug {aug}"
                + (", learned lr when S has one" if self.use_learned_lr else ""))

    def train_one(self, syn: SyntheticSet, real: RealData, seed: int) -> float:
        """Train one network from ``seed`` on S; return its test accuracy in percent."""
        device = real.device
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = self.net_factory(channels=real.channels, num_classes=real.num_classes, im_size=real.im_size)
        net = net.to(device)
        lr = float(syn.lr.detach()) if (self.use_learned_lr and syn.lr is not None) else self.lr
        opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=self.momentum, weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[max(self.epochs // 2, 1)], gamma=0.1)
        images, labels = syn.images.detach().to(device), syn.labels.detach().to(device)
        g = torch.Generator().manual_seed(seed)
        for _ in range(self.epochs):
            train_epoch(net, images, labels, opt, self.batch_train, self.augment, g)
            sched.step()
        return 100.0 * accuracy(net, real.test_images, real.test_labels)

    def __call__(self, syn: SyntheticSet, real: RealData, seed: int = 0) -> dict:
        """Evaluate S.

        Returns:
            ``{"acc_mean": float, "acc_std": float, "per_net": {name: [acc, ...]}, "protocol": str}``, accuracies
            in percent on the real test split (std is the population std over the ``num_eval`` runs).
        """
        accs = [self.train_one(syn, real, derive_seed(seed, 104729, r))
                for r in tqdm(range(self.num_eval), desc="evaluate", leave=False, disable=None)]
        return {"acc_mean": statistics.fmean(accs), "acc_std": statistics.pstdev(accs) if len(accs) > 1 else 0.0,
                "per_net": {self.name: accs}, "protocol": self.protocol()}


class CrossArchEvaluator:
    """Cross-architecture evaluation: :class:`Evaluator`'s protocol for each architecture of a pool.

    The pool of the DC reference (Zhao et al. ICLR 2021, Sec. 4 and Table 2; ``utils.get_eval_pool('M')``): MLP,
    ConvNet, LeNet, AlexNet, VGG-11, ResNet-18, here also ResNet-18-BN (the DM pool 'B'). Every architecture is
    trained ``num_eval`` times on S with the same settings and seeds.

    Args:
        nets: architecture name -> factory ``(channels, num_classes, im_size) -> nn.Module`` (``conf/net/*``).
        archs: the names to evaluate, in order (default: all of ``nets``).
        num_eval, epochs, lr, momentum, weight_decay, batch_train, augment, use_learned_lr: as :class:`Evaluator`.

    Raises:
        ConfigError: an entry of ``archs`` is not in ``nets`` (names the valid ones).
    """

    def __init__(self, nets: dict[str, Callable[..., nn.Module]], archs: list[str] | None = None, num_eval: int = 5,
                 epochs: int = 1000, lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 5e-4,
                 batch_train: int = 256, augment: DSA | None = None, use_learned_lr: bool = True):
        from ddrun.utils import ConfigError

        archs = list(nets) if archs is None else list(archs)
        unknown = [a for a in archs if a not in nets]
        if unknown or not archs:
            raise ConfigError(f"evaluator.archs={archs}: unknown {unknown}; valid architectures: {sorted(nets)}")
        self.num_eval, self.epochs = num_eval, epochs
        self.evaluators = {a: Evaluator(nets[a], num_eval, epochs, lr, momentum, weight_decay, batch_train, augment,
                                        use_learned_lr, name=a) for a in archs}

    def protocol(self) -> str:
        first = next(iter(self.evaluators.values())).protocol()
        return f"{'/'.join(self.evaluators)} each{first[first.index(' x'):]}"

    def __call__(self, syn: SyntheticSet, real: RealData, seed: int = 0) -> dict:
        """Evaluate S on every architecture.

        Returns:
            ``{"acc_mean", "acc_std", "per_net": {arch: [acc, ...]}, "per_arch": {arch: {"acc_mean", "acc_std"}},
            "protocol"}``; accuracies in percent; ``acc_mean`` / ``acc_std`` are the mean and population std over
            the architectures of their mean accuracies.
        """
        per_net, per_arch = {}, {}
        for name, ev in self.evaluators.items():
            res = ev(syn, real, seed)
            per_net[name] = res["per_net"][name]
            per_arch[name] = {"acc_mean": res["acc_mean"], "acc_std": res["acc_std"]}
            log.info("%s: %.2f +- %.2f (%d nets)", name, res["acc_mean"], res["acc_std"], len(per_net[name]))
        means = [v["acc_mean"] for v in per_arch.values()]
        return {"acc_mean": statistics.fmean(means), "acc_std": statistics.pstdev(means) if len(means) > 1 else 0.0,
                "per_net": per_net, "per_arch": per_arch, "protocol": self.protocol()}


# ---------------------------------------------------------------------------------------------------------------
# ``ddrun evaluate``


def check_compatible(syn: SyntheticSet, real: RealData, source: str) -> None:
    """Refuse a synthetic set that does not belong to ``real``: image shape, classes, and (when S records them)
    dataset, normalization and ZCA.

    Raises:
        ConfigError: names the mismatch and what to pass instead.
    """
    from ddrun.utils import ConfigError

    meta = syn.meta
    if meta.get("dataset") and meta["dataset"] != real.name:
        raise ConfigError(f"{source} was distilled from dataset {meta['dataset']}, not {real.name}: "
                          f"pass dataset={meta['dataset']}")
    shape = tuple(syn.images.shape[1:])
    if shape != (real.channels, *real.im_size):
        raise ConfigError(f"{source} holds images {list(shape)} but dataset={real.name} has "
                          f"{[real.channels, *real.im_size]}: pass the dataset S was made from")
    k = syn.labels.shape[1] if syn.soft else int(syn.labels.max()) + 1
    if (syn.soft and k != real.num_classes) or k > real.num_classes:
        raise ConfigError(f"{source} has labels of {k} classes but dataset={real.name} has {real.num_classes}")
    for key, ours in (("mean", list(real.mean)), ("std", list(real.std))):
        if meta.get(key) is not None and [round(float(v), 6) for v in meta[key]] != [round(v, 6) for v in ours]:
            raise ConfigError(f"{source} was normalized with {key} {meta[key]} but dataset={real.name} uses {ours}; "
                              f"set dataset.mean / dataset.std to the values S was made with")
    if meta.get("zca") is not None and bool(meta["zca"]) != (real.zca is not None):
        raise ConfigError(f"{source} was made {'with' if meta['zca'] else 'without'} ZCA whitening; set the "
                          f"dataset's ZCA option the same way")


def evaluate_cmd(cfg, run_dir: str | None = None) -> dict:
    """``ddrun evaluate``: train fresh networks on a saved S (``synthetic=PATH``: a file written by ddrun, or any
    ``{images, labels}`` tensor dict with images in the dataset's normalized space) or, with ``full=true``, on the
    whole real training set (the upper bound), and test them on the real test split with ``cfg.evaluator``.

    Writes into ``run_dir`` (when given): ``results.json`` (the whole result), one ``metrics.jsonl`` row (the same
    fields as the distill loop's evaluation rows, plus ``method``, ``dataset``, ``ipc``, ``arch`` names in
    ``per_net``) that ``ddrun report`` reads, and the image grid of S.

    Returns:
        ``{"acc_mean", "acc_std", "per_net", "per_arch", "protocol", "method", "dataset", "ipc", "iteration",
        "source"}``, accuracies in percent.

    Raises:
        ConfigError: neither or both of ``synthetic`` and ``full``; S does not fit the dataset; bad evaluator.
        DataError: the file or the dataset is missing or corrupt.
    """
    import json
    import types
    from pathlib import Path

    from omegaconf import OmegaConf

    from ddrun.utils import ConfigError, build, resolve_device, seed_everything

    full, path = bool(cfg.full), cfg.synthetic
    if full == (path is not None):
        raise ConfigError("pass synthetic=PATH (a saved synthetic set) or full=true (the whole training set), "
                          "not both" if full else "pass synthetic=PATH (a saved synthetic set) or full=true")
    device = resolve_device(cfg.device)
    seed = int(cfg.seed)
    seed_everything(seed)
    real = build(cfg.dataset).to(device)
    evaluator = build(cfg.evaluator)
    if evaluator.num_eval < 1:
        raise ConfigError(f"evaluator.num_eval={evaluator.num_eval}: must be >= 1")
    if full:
        syn = types.SimpleNamespace(images=real.train_images, labels=real.train_labels, lr=None, meta={})
        method, ipc, iteration, source = "full", "full", 0, f"the whole {real.name} training set"
    else:
        syn = SyntheticSet.load(path)
        check_compatible(syn, real, str(path))
        syn = syn.to(device)
        method = syn.meta.get("method") or "external"
        ipc = int(syn.meta.get("ipc", len(syn.images) // real.num_classes))
        iteration, source = int(syn.meta.get("iteration", 0)), str(path)
    if cfg.label:
        method = str(cfg.label)
    res = evaluator(syn, real, seed)
    per_arch = res.get("per_arch") or {n: {"acc_mean": statistics.fmean(a),
                                           "acc_std": statistics.pstdev(a) if len(a) > 1 else 0.0}
                                       for n, a in res["per_net"].items()}
    out = {**res, "per_arch": per_arch, "method": method, "dataset": real.name, "ipc": ipc, "iteration": iteration,
           "source": source, "seed": seed}
    if run_dir is not None:
        from ddrun.tracking import Tracker

        run_dir = Path(run_dir)
        tracker = Tracker(run_dir, OmegaConf.to_container(cfg, resolve=True),
                          **OmegaConf.to_container(cfg.logger, resolve=True))
        try:
            if not full:
                tracker.images(real.to_pixels(syn.images.detach()), max(len(syn.images) // real.num_classes, 1),
                               iteration)
            flat = {f"{k}/{name}": v[k] for name, v in per_arch.items() for k in ("acc_mean", "acc_std")}
            tracker.log({"acc_mean": res["acc_mean"], "acc_std": res["acc_std"], "per_net": res["per_net"],
                         "method": method, "dataset": real.name, "ipc": ipc, "protocol": res["protocol"], **flat},
                        iteration)
        finally:
            tracker.close()
        (run_dir / "results.json").write_text(json.dumps(out, indent=1))
    return out


@hydra.main(version_base="1.3", config_path="pkg://ddrun.conf", config_name="evaluate")
def main(cfg) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    from ddrun.utils import command_errors

    with command_errors("evaluate", log):
        out = evaluate_cmd(cfg, HydraConfig.get().runtime.output_dir)
    print(f"{out['source']} ({out['method']}, ipc {out['ipc']}, {out['dataset']}); protocol: {out['protocol']}")
    print("| architecture | accuracy % (mean ± std) | runs |\n|---|---|---|")
    for name, v in out["per_arch"].items():
        print(f"| {name} | {v['acc_mean']:.2f} ± {v['acc_std']:.2f} | {len(out['per_net'][name])} |")
    print(f"results in {HydraConfig.get().runtime.output_dir} (results.json, metrics.jsonl)")
    return out["acc_mean"]
