"""The artefact store: keyed collections of trained networks that commands write and components read.

A *collection* is one directory holding items of one kind trained in one *setting* (dataset, network,
augmentation) with one *recipe* (the training hyperparameters). Commands write collections (``ddrun buffer``:
expert trajectories; ``ddrun teacher``: teachers); components read them (``fetcher=checkpoints``,
``fetcher=teachers``). This module is a library: it imports no command.

Layout under ``paths.buffers`` (environment ``DDRUN_BUFFERS``)::

    <root>/<dataset key>/<net key>/<augment key>/            kind "experts" (the layout of earlier ddrun versions)
    <root>/teachers/<dataset key>/<net key>/<recipe>/        kind "teachers" (the ``ddrun teacher`` recipe's name)
    <root>/pools/<dataset key>/<net key>/<recipe>/           kind "pools"

    each collection directory:
        manifest.json          {"layout": 1, "kind", "setting", "training" (the recipe), "command",
                                "<kind>": {index: {"file", "bytes", "sha256", metrics ...}}}
        manifest.json.lock     flock: writers update the manifest one at a time
        <item>_0000.pt         a finished item (torch.save zip, read with weights_only=True)
        <item>_0007.partial/   an unfinished item's resume points (the command's own format)
        <item>_0007.lock       flock held by the job training that item (other jobs skip or wait)

    dataset key   <dataset.name>[-zca[rel][unc][<regularization> when not 0.1]][-ln][-sub<train_subset>]
                  e.g. cifar10-zca (rel: the relative form; unc: uncentred; -ln: per-image layer norm first)
                  (the subset in effect: none when it is at least every class's size, i.e. the whole split)
    net key       <class>_<arg>-<value>_... of the net config     e.g. convnet_act-relu_depth-3_..._width-128
    augment key   dsa-<strategy> | noaug

Item payloads (dicts of tensors and plain values):
    expert   ``trajectory`` float32 ``[epochs + 1, P]`` (flattened parameters at init and after every epoch, in
             ``named_parameters()`` order; no buffers), ``names``, ``shapes``, ``index``, ``epochs``, ``test_acc``
             (percent), ``setting``
    teacher  ``state_dict`` (the full ``nn.Module.state_dict()``, BatchNorm running statistics included),
             ``index``, ``epochs``, ``test_acc`` (percent), ``setting``, ``training``

Guarantees: writes are atomic (temporary file, fsync, rename); reads use ``torch.load(weights_only=True)``; a
file whose sha256 differs from the manifest is refused naming it; a collection made in another setting or with
another recipe is refused naming every key that differs.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Iterator

import torch
from omegaconf import OmegaConf
from torch import nn

from ddrun.files import atomic_save, atomic_write, file_digest, load_tensors, locked
from ddrun.utils import ConfigError, DataError

log = logging.getLogger("ddrun.store")

LAYOUT = 1
MANIFEST = "manifest.json"
# kind -> (item file prefix, the command that writes it, what one collection is called in messages, a hint)
KINDS = {"experts": ("expert", "ddrun buffer", "expert buffer", " (the paper: num_experts=100 train_epochs=50)"),
         "teachers": ("teacher", "ddrun teacher", "teacher collection", ""),
         "pools": ("pool", "ddrun teacher", "model pool", "")}


# ----------------------------------------------------------------------------------------------------------
# settings and keys
# ----------------------------------------------------------------------------------------------------------

def net_spec(net_factory: Callable) -> dict:
    """``{"class": "module.Class", <constructor keyword>: value ...}`` of a net factory (a ``functools.partial``
    from ``_partial_: true``)."""
    func = getattr(net_factory, "func", net_factory)
    spec = {"class": f"{func.__module__}.{func.__qualname__}"}
    spec.update({k: v for k, v in sorted(getattr(net_factory, "keywords", {}).items())})
    return spec


def setting_of(real, net_factory: Callable, augment) -> dict:
    """What a collection is keyed by: the dataset (name, training subset, ZCA, normalization, shapes), the network
    and the augmentation its items were trained with. Plain JSON types."""
    zca_reg = None if real.zca is None else float(getattr(real.zca, "regularization", 0.1))
    zca_form = None if real.zca is None else getattr(real.zca, "form", "absolute")
    zca_centre = None if real.zca is None else getattr(real.zca, "centre", True)
    aug = {"strategy": "none"}
    if augment is not None and augment.enabled:
        aug = {"strategy": augment.strategy, **{k: float(v) for k, v in sorted(augment.p.items())}}
    dataset = {"name": real.name, "train_subset": real.train_subset, "zca": real.zca is not None,
               "zca_regularization": zca_reg,
               "mean": [round(float(m), 6) for m in real.mean],
               "std": [round(float(s), 6) for s in real.std],
               "channels": real.channels, "im_size": list(real.im_size), "num_classes": real.num_classes}
    if zca_form == "relative":  # recorded only for the relative form: absolute-ZCA settings keep their old keys
        dataset["zca_form"] = zca_form
    if zca_centre is False:  # likewise only RFAD's uncentred ZCA and per-image layer norm (old keys stay)
        dataset["zca_centre"] = False
    if real.layernorm:
        dataset["layernorm"] = True
    return {"dataset": dataset, "net": net_spec(net_factory), "augment": aug}


def teacher_setting(real, net_factory: Callable, recipe: str) -> dict:
    """What a teacher collection is keyed by: the dataset and the network as :func:`setting_of`, and the name of
    the training recipe (``conf/recipe/<name>.yaml``; its augmentation is part of the recipe) instead of a DSA
    augmentation.

    Raises:
        ConfigError: ``recipe`` is not one of ``conf/recipe/`` (lists them; no teacher can have been trained
            with it)."""
    recipes = sorted(p.stem for p in (_conf_dir() / "recipe").glob("*.yaml"))
    if str(recipe) not in recipes:
        raise ConfigError(f"teacher recipe {recipe!r}: valid recipes are {recipes} (conf/recipe/, what `ddrun "
                          f"teacher recipe=...` trains with)")
    setting = setting_of(real, net_factory, None)
    del setting["augment"]
    return {**setting, "recipe": str(recipe)}


def collection_dir(root: str | Path, kind: str, setting: dict) -> Path:
    """The directory of the ``kind`` collection for ``setting`` under ``root`` (module doc)."""
    ds = setting["dataset"]
    dkey = ds["name"]
    if ds["zca"]:
        reg = ds["zca_regularization"]
        dkey += ("-zca" + ("rel" if ds.get("zca_form") == "relative" else "")
                 + ("unc" if ds.get("zca_centre") is False else "") + ("" if reg == 0.1 else f"{reg:g}"))
    if ds.get("layernorm"):
        dkey += "-ln"
    if ds["train_subset"] is not None:
        dkey += f"-sub{ds['train_subset']}"
    net = setting["net"]
    args = [f"{k}-{v}" for k, v in net.items() if k != "class"]
    nkey = "_".join([net["class"].rsplit(".", 1)[-1].lower(), *args])
    if "recipe" in setting:  # teachers: keyed by their recipe (teacher_setting)
        akey = setting["recipe"]
    else:
        aug = setting["augment"]["strategy"]
        akey = "noaug" if aug == "none" else f"dsa-{aug}"
    base = Path(root) if kind == "experts" else Path(root) / kind
    return base / dkey / nkey / akey


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def setting_diff(have: dict, want: dict, where: str = "the buffer") -> list[str]:
    """``["net.width: 64 in the buffer, 128 in this run", ...]`` for every key where two settings differ."""
    a, b = _flat(have), _flat(want)
    return [f"{k}: {a.get(k, '(absent)')} in {where}, {b.get(k, '(absent)')} in this run"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _conf_dir() -> Path:
    import ddrun.conf

    return Path(ddrun.conf.__file__).parent


def _net_choice(net_class: str) -> str | None:
    """The ``conf/net/*.yaml`` choice whose ``_target_`` builds ``net_class`` (None: the default, convnet)."""
    cls = net_class.rsplit(".", 1)[-1]
    for path in sorted((_conf_dir() / "net").glob("*.yaml")):
        target = str(OmegaConf.load(path).get("_target_", ""))
        if target.rsplit(".", 1)[-1] == cls:
            return None if path.stem == "convnet" else path.stem
    return None


def _override_value(v) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_override_value(x) for x in v) + "]"
    return f"{v:g}" if isinstance(v, float) else str(v)


def training_overrides(kind: str, training: dict, dataset: str) -> list[str]:
    """The overrides that make ``ddrun buffer`` / ``ddrun teacher`` train with ``training`` (a manifest's
    ``training``: the experts' top-level knobs, or a teacher recipe with its seed) instead of the command's
    defaults for ``dataset`` (``conf/buffer.yaml``; ``conf/recipe/<name>.yaml`` resolved for the dataset), so that
    a printed command adds members to an existing collection instead of being refused for another recipe."""
    from importlib import resources

    from omegaconf import OmegaConf

    conf = resources.files("ddrun.conf")
    if kind == "experts":
        base = OmegaConf.to_container(OmegaConf.load(str(conf / "buffer.yaml")))
        return [f"{k}={_override_value(v)}" for k, v in training.items() if k in base and base[k] != v]
    if training.get("name") is None:  # not written by `ddrun teacher`: its recipe is unknown
        return []
    recipe = OmegaConf.create({"recipe": OmegaConf.load(str(conf / "recipe" / f"{training['name']}.yaml")),
                               "dataset": {"name": dataset}})
    seed = OmegaConf.load(str(conf / "teacher.yaml")).seed  # `ddrun teacher`'s top-level seed, not a recipe key
    base = OmegaConf.to_container(recipe.recipe, resolve=True)
    out = []
    for k, v in training.items():
        if k == "seed":
            out += [f"seed={v}"] if v != seed else []
        elif isinstance(v, dict):
            out += [f"recipe.{k}.{kk}={_override_value(vv)}" for kk, vv in v.items()
                    if (base.get(k) or {}).get(kk) != vv]
        elif k != "name" and base.get(k) != v:
            out.append(f"recipe.{k}={_override_value(v)}")
    return out


def command_for(kind: str, setting: dict, root: str | Path, data: str | Path | None = None,
                extra: str = "", training: dict | None = None) -> str:
    """The command line (``ddrun buffer ...`` / ``ddrun teacher ...``) that creates the collection of
    ``setting``; with ``training`` (an existing collection's), also its training settings where they are not the
    command's defaults (:func:`training_overrides`)."""
    ds, net, aug = setting["dataset"], setting["net"], setting.get("augment")
    args = [f"dataset={ds['name']}"]
    if ds["train_subset"] is not None:
        args.append(f"dataset.train_subset={ds['train_subset']}")
    if ds["zca"]:
        args.append("dataset.zca=true")
        if ds.get("zca_form") == "relative":
            args.append("dataset.zca_form=relative")
        if ds.get("zca_centre") is False:
            args.append("dataset.zca_centre=false")
        if ds["zca_regularization"] != 0.1:
            args.append(f"dataset.zca_regularization={ds['zca_regularization']:g}")
    if ds.get("layernorm"):
        args.append("dataset.layernorm=true")
    choice = _net_choice(net["class"])
    if choice or kind != "experts":  # `ddrun teacher` defaults to another net than convnet: always name it
        args.append(f"net={choice or 'convnet'}")
    try:
        import importlib

        mod, cls = net["class"].rsplit(".", 1)
        params = inspect.signature(getattr(importlib.import_module(mod), cls)).parameters
        defaults = {k: p.default for k, p in params.items()}
    except Exception:  # noqa: BLE001 - no defaults known: name every keyword
        defaults = {}
    args += [f"net.{k}={v}" for k, v in net.items() if k != "class" and defaults.get(k, object()) != v]
    if aug is None:
        args.append(f"recipe={setting['recipe']}")
    elif aug["strategy"] == "none":
        args.append("augment.strategy=none")
    elif aug["strategy"] != _default_dsa_strategy(ds["name"]):
        args.append(f"augment.strategy={aug['strategy']}")
    if training:
        args += training_overrides(kind, training, ds["name"])
    if data is not None:
        args.append(f"paths.data={data}")
    args.append(f"paths.buffers={root}")
    return " ".join([KINDS[kind][1], *args, *([extra] if extra else [])])


def _default_dsa_strategy(dataset_name: str) -> str | None:
    """The ``dsa_strategy`` of ``conf/dataset/<dataset_name>.yaml`` (what ``augment.strategy`` defaults to)."""
    try:
        return str(OmegaConf.load(_conf_dir() / "dataset" / f"{dataset_name}.yaml").dsa_strategy)
    except Exception:  # noqa: BLE001 - an unknown dataset: name the strategy explicitly
        return None


# ----------------------------------------------------------------------------------------------------------
# collections
# ----------------------------------------------------------------------------------------------------------

class Collection:
    """One keyed directory of the store (module doc).

    Args:
        root: the store's root (``paths.buffers``).
        kind: ``experts``, ``teachers`` or ``pools``.
        setting: :func:`setting_of` of the dataset, network and augmentation.
        directory: an explicit directory instead of the keyed one (its setting must still match).
    """

    def __init__(self, root: str | Path, kind: str, setting: dict, directory: str | Path | None = None):
        if kind not in KINDS:
            raise ConfigError(f"unknown store kind {kind!r}; valid kinds: {sorted(KINDS)}")
        self.root, self.kind, self.setting = Path(root), kind, setting
        self.prefix, _, self.label, self.hint = KINDS[kind]
        self.where = "the buffer" if kind == "experts" else f"the {self.label}"
        self.dir = Path(directory) if directory else collection_dir(root, kind, setting)
        self.explicit = bool(directory)  # a folder the user named (buffer_dir / teacher_dir), not the keyed one
        self._verified: set[int] = set()

    # --- the manifest -------------------------------------------------------------------------------------
    def manifest(self) -> dict | None:
        """The manifest, or None when the collection does not exist.

        Raises:
            DataError: the manifest exists but is not valid JSON of this layout (names the file).
        """
        path = self.dir / MANIFEST
        if not path.is_file():
            return None
        try:
            m = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise DataError(f"corrupt manifest {path} ({type(exc).__name__}: {exc}); delete it and rerun "
                            f"`{KINDS[self.kind][1]}` with the same settings (finished items are "
                            f"re-registered)") from None
        if not isinstance(m, dict) or m.get("layout") != LAYOUT or "setting" not in m:
            raise DataError(f"{path}: not a ddrun manifest of layout {LAYOUT}")
        if m.get("kind", "experts") != self.kind:
            raise DataError(f"{path} holds {m.get('kind')}, not {self.kind}")
        m.setdefault(self.kind, {})
        return m

    @contextlib.contextmanager
    def _locked_manifest(self) -> Iterator[dict]:
        """Read-modify-write the manifest under an exclusive flock (shards of one collection run concurrently);
        yields ``{"manifest": dict | None}``; the (changed) manifest is written back atomically."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with locked(self.dir / (MANIFEST + ".lock")):
            box = {"manifest": self.manifest()}
            yield box
            if box["manifest"] is not None:
                atomic_write(json.dumps(box["manifest"], indent=1, sort_keys=True).encode(), self.dir / MANIFEST)

    def open_for_writing(self, training: dict, command: str) -> None:
        """Create the collection, or check that the existing one has this setting and recipe.

        Raises:
            ConfigError: the directory holds items of another setting or recipe (names every difference).
        """
        with self._locked_manifest() as box:
            m = box["manifest"]
            if m is None:
                box["manifest"] = {"layout": LAYOUT, "kind": self.kind, "setting": self.setting,
                                   "training": training, "command": command, self.kind: {}}
                return
            diff = (setting_diff(m["setting"], self.setting, self.where)
                    + setting_diff(m.get("training", {}), training, self.where))
            if diff:
                raise ConfigError(f"{self.dir} holds {self.kind} trained with another setting "
                                  f"({'; '.join(diff)}); use another paths.buffers or the collection's settings")

    def open_for_reading(self, data: str | Path | None = None, extra: str = "") -> dict:
        """The manifest of a collection a component is about to read (``extra``: arguments the printed command
        adds, e.g. how many teachers the reader needs).

        Raises:
            DataError: no collection for this setting (names the path and the command that makes it, and
                collections of other settings that exist), or one made in another setting (says what differs).
        """
        m = self.manifest()
        command = command_for(self.kind, self.setting, self.root, data, extra)
        if m is None:
            raise DataError(self._missing_message(command))
        diff = setting_diff(m["setting"], self.setting, self.where)
        if diff:
            raise DataError(f"the {self.label} {self.dir} was made with another setting: {'; '.join(diff)}. "
                            f"Create the matching one with `{command}`")
        return m

    def _missing_message(self, command: str) -> str:
        if self.explicit:  # the command below makes the keyed folder, not this one
            keyed = collection_dir(self.root, self.kind, self.setting)
            return (f"no {self.label} at {self.dir} (the folder given as buffer_dir / teacher_dir); pass the folder "
                    f"of an existing one, or drop the option to use the keyed {keyed} (made by `{command}`)")
        msg = f"no {self.label} at {self.dir}; create it with `{command}`{self.hint}"
        base = self.root if self.kind == "experts" else self.root / self.kind
        others = []
        for path in sorted(base.glob(f"{self.setting['dataset']['name']}*/*/*/{MANIFEST}")):
            try:
                have = Collection(self.root, self.kind, self.setting, path.parent).manifest()
            except DataError:
                continue
            diff = setting_diff(have["setting"], self.setting, self.where)
            if diff:
                others.append(f"{path.parent} ({'; '.join(diff)})")
        if others:
            msg += f". {self.label.capitalize()}s for other settings exist: " + " | ".join(others[:3])
        return msg

    def entries(self) -> dict[int, dict]:
        """``{index: manifest entry}`` of the finished items."""
        m = self.manifest() or {}
        return {int(k): v for k, v in m.get(self.kind, {}).items()}

    # --- items --------------------------------------------------------------------------------------------
    def item_path(self, index: int) -> Path:
        return self.dir / f"{self.prefix}_{index:04d}.pt"

    def partial_dir(self, index: int) -> Path:
        """Where the command keeps the resume points of an unfinished item."""
        return self.dir / f"{self.prefix}_{index:04d}.partial"

    def is_done(self, index: int) -> bool:
        """The item is in the manifest and its file has the recorded size."""
        entry = self.entries().get(index)
        path = self.item_path(index)
        return entry is not None and path.is_file() and path.stat().st_size == entry.get("bytes")

    @contextlib.contextmanager
    def claim(self, index: int, wait: bool = False) -> Iterator[bool]:
        """Hold item ``index`` for training (a flock on ``<item>_<index>.lock``); yields False when another job
        holds it (with ``wait``: blocks until it is free, then yields True)."""
        with locked(self.dir / f"{self.prefix}_{index:04d}.lock", blocking=wait) as held:
            yield held

    def fill(self, indices: list[int], train: Callable[[int], object],
             adopt: Callable[[int], bool] | None = None) -> dict[str, list[int]]:
        """Make every item of ``indices`` exist, as one shard of a job array: items already in the manifest are
        skipped; the others are claimed and trained with ``train(index)`` (``adopt(index)`` may first register a
        finished file the manifest misses, returning True); items another job holds are waited for at the end
        and trained here if that job died. Returns ``{"trained": [indices], "skipped": [indices]}``."""
        def ensure(index: int, wait: bool) -> str:
            if self.is_done(index):
                return "skipped"
            with self.claim(index, wait=wait) as held:
                if not held:
                    return "busy"
                if self.is_done(index) or (adopt is not None and self.item_path(index).is_file() and adopt(index)):
                    return "skipped"  # finished by the job that held it, or a finished file now registered
                train(index)
                return "trained"

        done: dict[str, list[int]] = {"trained": [], "skipped": [], "busy": []}
        for index in indices:
            done[ensure(index, wait=False)].append(index)
        for index in done.pop("busy"):
            log.info("%s %d is being trained by another job; waiting for it", self.prefix, index)
            done[ensure(index, wait=True)].append(index)
        return done

    def put(self, index: int, payload: dict, metrics: dict) -> dict:
        """Write item ``index`` atomically and register it in the manifest; returns its entry
        ``{"file", "bytes", "sha256", **metrics}``."""
        path = self.item_path(index)
        atomic_save(payload, path)
        entry = {"file": path.name, "bytes": path.stat().st_size, "sha256": file_digest(path), **metrics}
        self.register(index, entry)
        return entry

    def register(self, index: int, entry: dict) -> None:
        """Record ``entry`` for item ``index`` in the manifest (under its lock)."""
        with self._locked_manifest() as box:
            box["manifest"][self.kind][str(index)] = entry

    def usable(self, max_items: int | None = None) -> list[int]:
        """Indices of finished items whose file exists with the recorded size (the lowest ``max_items``); the
        others are named in a warning."""
        entries = sorted(self.entries().items())
        if max_items is not None:
            entries = entries[:int(max_items)]
        out = []
        for index, entry in entries:
            path = self.item_path(index)
            if not path.is_file():
                log.warning("%s %d: file %s is missing; using the others", self.prefix, index, path)
            elif path.stat().st_size != entry.get("bytes"):
                log.warning("%s %d: file %s is truncated or altered (%d bytes, the manifest says %s); using the "
                            "others", self.prefix, index, path, path.stat().st_size, entry.get("bytes"))
            else:
                out.append(index)
        return out

    def load(self, index: int, keys: tuple[str, ...], mmap: bool = False, verify: bool = True) -> dict:
        """Item ``index`` (``weights_only=True``; memory-mapped with ``mmap``). With ``verify`` the file's sha256
        is checked against the manifest the first time this collection object reads it.

        Raises:
            DataError: missing, corrupt (sha256 differs, unreadable) or not an item of this kind (names the file).
        """
        path = self.item_path(index)
        if verify and index not in self._verified:
            want = self.entries().get(index, {}).get("sha256")
            if want and file_digest(path) != want:
                raise DataError(f"corrupt {self.prefix} file {path} (sha256 differs from the manifest)")
            self._verified.add(index)
        return load_tensors(path, f"{self.prefix} file", keys=keys, mmap=mmap)


# ----------------------------------------------------------------------------------------------------------
# teachers: full state dicts
# ----------------------------------------------------------------------------------------------------------

EXPERT_KEYS = ("trajectory", "names")
TEACHER_KEYS = ("state_dict", "test_acc", "setting")


def teacher_payload(net: nn.Module, index: int, epochs: int, test_acc: float, setting: dict,
                    training: dict) -> dict:
    """The stored form of a trained teacher: its whole ``state_dict`` (BatchNorm running statistics included) on
    the CPU, with what it was trained on."""
    state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    return {"state_dict": state, "index": int(index), "epochs": int(epochs), "test_acc": float(test_acc),
            "setting": setting, "training": training}


def load_teacher(collection: Collection, index: int, net_factory: Callable, real,
                 device: torch.device | str | None = None) -> nn.Module:
    """Teacher ``index`` of ``collection`` as a frozen network in eval mode on ``device``.

    Raises:
        DataError: the file is missing/corrupt, or its state dict does not fit the network (names the file).
    """
    from ddrun.nets import build_net

    item = collection.load(index, TEACHER_KEYS)
    net = build_net(net_factory, real, 0)
    try:
        net.load_state_dict(item["state_dict"], strict=True)
    except RuntimeError as exc:
        raise DataError(f"teacher file {collection.item_path(index)} does not fit this network "
                        f"({str(exc).splitlines()[0]})") from None
    net = net.eval().requires_grad_(False)
    return net if device is None else net.to(device)
