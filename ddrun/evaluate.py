"""``ddrun evaluate``: apply an evaluator (``ddrun.evaluators``) to a saved S, or to the whole real training set
(the upper bound), and record the result."""

from __future__ import annotations

import logging

import hydra
import torch

from ddrun import record
from ddrun.data.datasets import RealData
from ddrun.synthetic import SyntheticSet

log = logging.getLogger("ddrun.evaluate")


# ---------------------------------------------------------------------------------------------------------------
# ``ddrun evaluate``


def check_compatible(syn: SyntheticSet, real: RealData, source: str) -> None:
    """Refuse a synthetic set that does not belong to ``real``: what S records of how it was made
    (:func:`check_recorded`), then its image shape and classes.

    Raises:
        ConfigError: names the mismatch and what to pass instead.
    """
    from ddrun.utils import ConfigError

    check_recorded(syn.meta, real, source)
    shape = tuple(syn.images.shape[1:])
    if shape != (real.channels, *real.im_size):
        raise ConfigError(f"{source} holds images {list(shape)} but dataset={real.name} has "
                          f"{[real.channels, *real.im_size]}: pass the dataset S was made from")
    k = syn.labels.shape[1] if syn.soft else int(syn.labels.max()) + 1
    if (syn.soft and k != real.num_classes) or k > real.num_classes:
        raise ConfigError(f"{source} has labels of {k} classes but dataset={real.name} has {real.num_classes}")


def check_recorded(meta: dict, real: RealData, source: str) -> None:
    """Refuse a set whose metadata (when it records them) names another dataset, normalization, ZCA (on / off,
    form, centring, regularization) or per-image layer normalization than ``real``'s. Needs only ``meta``, so
    :func:`load_set` runs it before the value checks of :func:`check_outside_set` (a set made with another
    preprocessing is named as such, not as raw pixels). Keys S does not record (older files) are not checked.

    Raises:
        ConfigError: names the mismatch and the override to pass.
    """
    from ddrun.utils import ConfigError

    meta = meta if isinstance(meta, dict) else {}
    if meta.get("dataset") and meta["dataset"] != real.name:
        raise ConfigError(f"{source} was distilled from dataset {meta['dataset']}, not {real.name}: "
                          f"pass dataset={meta['dataset']}")
    if meta.get("zca") is not None and bool(meta["zca"]) != (real.zca is not None):  # before the normalization
        raise ConfigError(f"{source} was made {'with' if meta['zca'] else 'without'} ZCA whitening: pass "
                          f"dataset.zca={str(bool(meta['zca'])).lower()}")
    if meta.get("layernorm") is not None and bool(meta["layernorm"]) != real.layernorm:
        raise ConfigError(f"{source} was made {'with' if meta['layernorm'] else 'without'} per-image layer "
                          f"normalization: pass dataset.layernorm={str(bool(meta['layernorm'])).lower()}")
    for key, ours in (("mean", list(real.mean)), ("std", list(real.std))):
        if meta.get(key) is not None and [round(float(v), 6) for v in meta[key]] != [round(v, 6) for v in ours]:
            raise ConfigError(f"{source} was normalized with {key} {meta[key]} but dataset={real.name} uses {ours}; "
                              f"set dataset.mean / dataset.std to the values S was made with")
    if meta.get("zca"):
        _check_recorded_zca(meta, real.zca, source)


def _check_recorded_zca(meta: dict, zca, source: str) -> None:
    """The ZCA part of :func:`check_recorded` (S and ``zca``, the dataset's transform, both whitened)."""
    import math

    from ddrun.utils import ConfigError

    form = getattr(zca, "form", None)
    if meta.get("zca_form") and meta["zca_form"] != form:
        raise ConfigError(f"{source} was whitened with the {meta['zca_form']} ZCA form, not {form}: pass "
                          f"dataset.zca_form={meta['zca_form']}")
    centre = getattr(zca, "centre", None)
    if meta.get("zca_centre") is not None and meta["zca_centre"] != centre:
        raise ConfigError(f"{source} was whitened {'centred' if meta['zca_centre'] else 'uncentred'}, this dataset "
                          f"{'centred' if centre else 'uncentred'}: pass dataset.zca_centre="
                          f"{str(meta['zca_centre']).lower()}")
    made, ours = meta.get("zca_regularization"), getattr(zca, "regularization", None)
    if made is not None and ours is not None and not math.isclose(float(made), float(ours), rel_tol=1e-9):
        raise ConfigError(f"{source} was whitened with dataset.zca_regularization={float(made)!r}, this dataset "
                          f"with {float(ours)!r}: pass dataset.zca_regularization={float(made)!r}")


def check_outside_set(d: dict, real: RealData, source: str) -> None:
    """Refuse a plain ``{images, labels}`` file that cannot be a synthetic set of ``real``: empty, integer or
    non-finite images, images far outside the dataset's normalized space (e.g. raw 0-255 pixels), labels that are
    neither int64 ``[N]`` in ``[0, K)`` nor float ``[N, K]``, or counts that differ.

    Raises:
        ConfigError: one line naming the file, what is wrong and what is expected.
    """
    from ddrun.utils import ConfigError

    images, labels, k = d["images"], d["labels"], real.num_classes
    space = f"float32 [N, {real.channels}, {real.im_size[0]}, {real.im_size[1]}] in {real.name}'s normalized space " \
            f"((x/255 - mean)/std with mean {list(real.mean)}, std {list(real.std)}" \
            f"{', then per-image layer norm' if real.layernorm else ''}{', then ZCA' if real.zca else ''})"
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or len(images) == 0:
        raise ConfigError(f"{source}: 'images' must be a non-empty tensor {space}")
    if not images.dtype.is_floating_point:
        raise ConfigError(f"{source}: images are {images.dtype}; ddrun expects {space}")
    if not torch.isfinite(images).all():
        raise ConfigError(f"{source}: images hold NaN or Inf values")
    typical = real.train_images[:2000].abs().flatten().float().quantile(0.99)
    if images.abs().flatten().float().quantile(0.99) > 25 * typical:
        raise ConfigError(f"{source}: image values reach {float(images.abs().max()):.4g}, far outside the dataset's "
                          f"normalized space (real images: 99% within +-{float(typical):.3g}); raw 0-255 or [0, 1] "
                          f"pixels must be normalized first: ddrun expects {space}")
    if not isinstance(labels, torch.Tensor) or len(labels) != len(images):
        n = len(labels) if isinstance(labels, torch.Tensor) else "no"
        raise ConfigError(f"{source}: {len(images)} images but {n} labels")
    if labels.dtype.is_floating_point:
        if labels.shape != (len(images), k) or not torch.isfinite(labels).all():
            raise ConfigError(f"{source}: soft labels must be finite float [N, K] = [{len(images)}, {k}], got "
                              f"{list(labels.shape)}")
    elif labels.dtype != torch.int64 or labels.dim() != 1 or labels.min() < 0 or labels.max() >= k:
        raise ConfigError(f"{source}: hard labels must be int64 [N] in [0, {k}), got {labels.dtype} "
                          f"{list(labels.shape)} in [{int(labels.min())}, {int(labels.max())}]")


def load_set(cfg, real: RealData):
    """The set to evaluate: ``(syn, identity)`` where identity holds method, ipc, iteration, source (file, and the
    run that made it when it is a ddrun ``synthetic.pt`` beside its ``results.json``), and its setting."""
    from pathlib import Path

    from ddrun.files import load_tensors
    from ddrun.record import read as read_record

    path = Path(cfg.synthetic)
    if path.is_dir():  # an image folder (ddrun export format=imagefolder, released sets)
        from ddrun.imagefolder import read_imagefolder

        syn = read_imagefolder(path, real)
    else:
        d = load_tensors(path, "synthetic set", keys=("images", "labels"))
        check_recorded(d.get("meta") or {}, real, str(path))  # another preprocessing is named as such, first
        check_outside_set(d, real, str(path))
        syn = SyntheticSet.from_state(d)
    check_compatible(syn, real, str(path))
    meta = syn.meta
    source = {"path": str(path), "config_hash": meta.get("config_hash"), "setting_hash": meta.get("setting_hash")}
    try:
        made = read_record(path.parent)
        source.update(run_dir=str(path.parent), seed=made.get("seed"), setting=made.get("setting"))
    except Exception:  # noqa: BLE001 - an outside file, or a run without a record: the file alone identifies it
        pass
    identity = {"method": meta.get("method") or "external",
                "ipc": int(meta.get("ipc", len(syn.images) // real.num_classes)),
                "iterations": meta.get("iteration"), "source": source}
    return syn, identity


def check_parametrization(syn: SyntheticSet, param, source: str) -> None:
    """Refuse to evaluate a set saved by a run with another parametrization than the configured one (its stored
    images would be trained on undecoded, or decoded twice).

    Raises:
        ConfigError: names the parametrization (and factor) S was made with and the overrides to pass.
    """
    from ddrun.utils import ConfigError

    made = syn.meta.get("parametrization")
    if made is None:
        return
    have = param.describe(syn)
    keys = ("factor", "decode_mode")  # decode_mode: recorded since S files of 2026-12 (older ones: not checked)
    made_with = {k: syn.meta[k] for k in keys if syn.meta.get(k) is not None}
    if made != have["parametrization"] or any(have.get(k) != v for k, v in made_with.items()):
        want = " ".join([f"parametrization={made}", *(f"parametrization.{k}={v}" for k, v in made_with.items())])
        given = " ".join([f"parametrization={have['parametrization']}",
                          *(f"parametrization.{k}={have[k]}" for k in made_with if have.get(k) is not None)])
        raise ConfigError(f"{source} stores S made with {want}, not {given}: pass {want}")


def evaluate_cmd(cfg, run_dir: str | None = None) -> dict:
    """``ddrun evaluate``: train fresh networks on a saved S (``synthetic=PATH``: a file written by ddrun, or any
    ``{images, labels}`` tensor dict with images in the dataset's normalized space) or, with ``full=true``, on the
    whole real training set (the upper bound), and test them on the real test split with ``cfg.evaluator``.

    Writes into ``run_dir`` (when given): ``results.json`` (the run record, ``ddrun.record``; an evaluate of a
    set is its own record, never another seed of the run that made it), one ``metrics.jsonl`` row and the image
    grid of S.

    Returns:
        ``{"acc_mean", "acc_std", "per_net", "per_arch", "protocol", "method", "dataset", "ipc", "iteration",
        "source"}``, accuracies in percent.

    Raises:
        ConfigError: neither or both of ``synthetic`` and ``full``; a bad set or knob; S does not fit the dataset or
            was stored in another parametrization (``parametrization=idc`` ... decodes it) (one line).
        DataError: the file or the dataset is missing, corrupt or refused.
    """
    from ddrun import speed
    from ddrun.schema import check_common
    from ddrun.utils import ConfigError, build, resolve_device, seed_everything

    check_common(cfg, "evaluate")
    full = bool(cfg.full)
    if full == (cfg.synthetic is not None):
        raise ConfigError("pass synthetic=PATH (a saved synthetic set) or full=true (the whole training set), "
                          "not both" if full else "pass synthetic=PATH (a saved synthetic set) or full=true")
    evaluator = build(cfg.evaluator)
    if evaluator.num_eval < 1:
        raise ConfigError(f"evaluator.num_eval={evaluator.num_eval}: must be >= 1")
    device, seed = resolve_device(cfg.device), int(cfg.seed)
    seed_everything(seed)
    speed.configure(cfg.get("speed"), bool(cfg.get("deterministic", False)))
    real = build(cfg.dataset).to(device)
    evaluator.prepare(real)  # e.g. an architecture that cannot take the images, missing teachers: refused now
    sets, described = None, {}  # (stored S, decoded S) and the storage description; none for full=true
    if full:
        syn = SyntheticSet.frozen(real.train_images, real.train_labels, real.num_classes)
        identity = {"method": "full", "ipc": "full", "iterations": 0,
                    "source": {"path": f"the whole {real.name} training set"}}
    else:
        stored, identity = load_set(cfg, real)
        param = build(cfg.parametrization)
        check_parametrization(stored, param, identity["source"]["path"])
        stored = stored.to(device)
        described = param.describe(stored)
        syn = param.decode(stored)  # what the networks train on
        sets = (stored, syn)
    if cfg.label:
        identity["method"] = str(cfg.label)
    res = speed.evaluate(evaluator, syn, real, seed, device)
    out = {**res, **identity, **described, "dataset": real.name, "iteration": identity["iterations"] or 0,
           "seed": seed, "per_arch": record.evaluation(res, 0, real)["per_arch"]}
    if run_dir is not None:
        _write_outputs(cfg, run_dir, sets, real, out, device)
    return out


def _write_outputs(cfg, run_dir, sets, real, out: dict, device) -> None:
    """``metrics.jsonl``, the image grid (of the images the networks trained on) and ``results.json`` of an
    evaluate run; ``sets`` is ``(stored S, decoded S)``, None for ``full=true``."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from ddrun.tracking import Tracker

    run_dir = Path(run_dir)
    tracker = Tracker(run_dir, OmegaConf.to_container(cfg, resolve=True), **OmegaConf.to_container(cfg.logger,
                                                                                                      resolve=True))
    evaluation = record.evaluation(out, out["iteration"], real)
    try:
        if sets is not None:
            shown = sets[1].images.detach()
            tracker.images(real.to_pixels(shown, clamp=False), max(len(shown) // real.num_classes, 1),
                           out["iteration"], class_names=real.class_names)
        flat = {f"{k}/{name}": v[k] for name, v in evaluation["per_arch"].items() for k in ("acc_mean", "acc_std")}
        tracker.log({"acc_mean": out["acc_mean"], "acc_std": out["acc_std"], "per_net": out["per_net"],
                     "method": out["method"], "dataset": real.name, "ipc": out["ipc"],
                     "protocol": evaluation["protocol_line"], **flat}, out["iteration"])
    finally:
        tracker.close()
    describe = {k: out[k] for k in ("parametrization", "factor", "stored_images", "decoded_images") if k in out}
    rec = {"command": "evaluate", "run_dir": str(run_dir), "method": out["method"], "dataset": real.name,
           "ipc": out["ipc"], "seed": out["seed"], "iterations": out["iterations"], "source": out["source"],
           "setting": {"source.setting_hash": out["source"].get("setting_hash")},
           "synthetic": None if sets is None else record.synthetic_info(sets[0], out["source"]["path"], describe),
           "evaluations": [evaluation], "device": record.device_name(device), "best": None}
    record.write(run_dir, rec)


@hydra.main(version_base="1.3", config_path="pkg://ddrun.conf", config_name="evaluate")
def main(cfg) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    from ddrun.utils import command_errors

    with command_errors("evaluate", log):
        out = evaluate_cmd(cfg, HydraConfig.get().runtime.output_dir)
    print(f"{out['source']['path']} ({out['method']}, ipc {out['ipc']}, {out['dataset']}); protocol: {out['protocol']}")
    print("| architecture | accuracy % (mean ± std) | runs |\n|---|---|---|")
    for name, v in out["per_arch"].items():
        print(f"| {name} | {v['acc_mean']:.2f} ± {v['acc_std']:.2f} | {len(out['per_net'][name])} |")
    print(f"results in {HydraConfig.get().runtime.output_dir} (results.json, metrics.jsonl)")
    return out["acc_mean"]
