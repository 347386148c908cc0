"""``ddrun evaluate``: apply an evaluator (``ddrun.evaluators``) to a saved S, or to the whole real training set
(the upper bound), and record the result."""

from __future__ import annotations

import logging
import statistics

import hydra

from ddrun.data.datasets import RealData
from ddrun.synthetic import SyntheticSet

log = logging.getLogger("ddrun.evaluate")


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
    from ddrun import speed

    device = resolve_device(cfg.device)
    seed = int(cfg.seed)
    seed_everything(seed)
    speed.configure(cfg.get("speed"), bool(cfg.get("deterministic", False)))
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
