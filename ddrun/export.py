"""``ddrun export``: write a saved S in another format (``format=imagefolder``: per-class PNG folders and a labels
file for soft labels, :mod:`ddrun.imagefolder`), e.g. to evaluate it with a reference repository's own scripts."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

log = logging.getLogger("ddrun.export")

FORMATS = ("imagefolder",)


def export(cfg: DictConfig) -> dict:
    """Export ``cfg.synthetic`` (a ``synthetic.pt``) to ``cfg.out`` (default: ``<synthetic's folder>/imagefolder``).

    Pixels come from S's recorded normalization (``meta`` mean/std); sets distilled under ZCA whitening are mapped
    back through the dataset's ZCA (the dataset is loaded for that).

    Returns:
        ``{"dir", "images", "classes", "soft_labels"}``.

    Raises:
        ConfigError: no ``synthetic``, or an unknown ``format``; ``out`` is a file, or not empty without
            ``overwrite=true``, or holds files no ddrun export writes.
        DataError: the file is missing or corrupt.
    """
    import torch

    from ddrun.imagefolder import write_imagefolder
    from ddrun.synthetic import SyntheticSet
    from ddrun.utils import ConfigError, build

    if cfg.synthetic is None:
        raise ConfigError("pass synthetic=PATH (a synthetic.pt written by ddrun distill)")
    if cfg.format not in FORMATS:
        raise ConfigError(f"format={cfg.format!r}: valid formats are {list(FORMATS)}")
    syn = SyntheticSet.load(cfg.synthetic)
    if syn.meta.get("parametrization", "pixels") != "pixels" and cfg.get("decoded", True):
        syn = decoded_set(syn)
    meta = syn.meta
    if meta.get("zca") or meta.get("layernorm") or meta.get("mean") is None:
        real = build(cfg.dataset)
        to_pixels = real.to_pixels
    else:
        mean = torch.tensor(meta["mean"], dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(meta["std"], dtype=torch.float32).view(1, -1, 1, 1)

        def to_pixels(x):
            return (x * std + mean).clamp(0, 1)
    out = Path(cfg.out) if cfg.out else Path(cfg.synthetic).parent / "imagefolder"
    return write_imagefolder(syn, to_pixels, out, overwrite=bool(cfg.get("overwrite", False)))


def decoded_set(syn):
    """S stored in IDC's multi-formation (Kim et al. 2022) as the pixel set its networks train on: the
    ``factor^2`` decoded images per stored image (the recorded ``factor`` and ``decode_mode``), their labels, and
    a meta without the parametrization (the folder then evaluates as pixels, e.g. by a reference repository)."""
    from ddrun.parametrizations import MultiFormation
    from ddrun.synthetic import SyntheticSet

    meta = syn.meta
    param = MultiFormation(factor=int(meta["factor"]), decode_mode=meta.get("decode_mode", "bilinear"))
    d = param.decode(syn)
    kept = {k: v for k, v in meta.items() if k not in ("parametrization", "factor", "decode_mode", "stored_images",
                                                         "decoded_images")}
    log.info("S is stored in the idc parametrization (factor %d): exporting its %d decoded training images, not "
             "the %d stored ones (decoded=false writes those)", param.factor, len(d.images), len(syn.images))
    return SyntheticSet(d.images.detach(), d.labels.detach(), syn.num_classes,
                        meta={**kept, "ipc": len(d.images) // syn.num_classes,
                              "decoded_from": f"idc factor {param.factor} ({param.decode_mode})"})


@hydra.main(version_base="1.3", config_path="pkg://ddrun.conf", config_name="export")
def main(cfg: DictConfig) -> None:
    from ddrun.utils import command_errors

    with command_errors("export", log):
        out = export(cfg)
    print(f"{out['images']} images of {out['classes']} classes in {out['dir']}"
          + (" (soft labels in labels.pt)" if out["soft_labels"] else ""))
