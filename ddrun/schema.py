"""The typed schema of the commands' top-level knobs, and the checks that run before any work.

Each command's primary config (``conf/distill.yaml``, ``evaluate.yaml``, ``buffer.yaml``) starts its defaults list
with a structured config registered here (Hydra's ConfigStore), so OmegaConf checks the types of the top-level knobs
when the command line is merged (``ipc=abc``, ``ipc=1.5`` and ``seed=abc`` are refused naming the key). The ranges
of those knobs live beside their types (``field(metadata={"min": ...})``) and :func:`check_top_level` applies them;
:func:`check_component_keys` refuses keys that the component a config node builds does not take (``+objective.foo=1``);
:func:`unknown_top_level` finds added top-level keys (``+ipcc=3``). Component values are checked by the components'
constructors, which ddrun builds before it loads any data.

This module imports no torch: ``ddrun.conf`` imports it to register the schemas.
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass, field, fields
from typing import Any, Dict, Optional

from hydra.core.config_store import ConfigStore


def knob(default, lo: float | None = None, hi: float | None = None, exclusive_lo: bool = False):
    """A schema field with a range: ``lo <= value`` (``lo < value`` with ``exclusive_lo``), ``value <= hi``."""
    return field(default=default, metadata={"min": lo, "max": hi, "exclusive_lo": exclusive_lo})


@dataclass
class Common:
    """What every command has: the config groups it composes (typed Any: each group's component checks its own
    values), the seed, the device, ``deterministic`` (``ddrun.speed``) and the progress lines."""

    paths: Any = None
    dataset: Any = None
    net: Any = None
    augment: Any = None
    evaluator: Any = None
    logger: Any = None
    seed: int = knob(0, 0)
    device: str = "auto"
    deterministic: bool = False
    progress_every: float = knob(60.0, 0)


@dataclass
class EarlyStoppingSchema:
    """``early_stopping`` (``ddrun.selection``); its ranges are checked by ``EarlyStopping``."""

    every: Optional[int] = None
    patience: Optional[int] = None
    val_per_class: int = 500
    revert: bool = True


@dataclass
class DistillSchema(Common):
    ipc: int = knob(10, 1)
    iterations: int = knob(1000, 0)
    eval_every: int = knob(500, 1)
    eval_at_start: bool = True
    log_every: int = knob(10, 1)
    resume: bool = True
    overwrite: bool = False
    checkpoint_every: int = knob(100, 1)
    stages: Dict[str, Any] = field(default_factory=dict)
    beside: Dict[str, Any] = field(default_factory=dict)
    keep_best: bool = False
    beside_protocols: bool = True
    early_stopping: EarlyStoppingSchema = field(default_factory=EarlyStoppingSchema)
    preset: Any = None
    init: Any = None
    fetcher: Any = None
    schedule: Any = None
    objective: Any = None
    parametrization: Any = None
    syn_optimizer: Any = None
    syn_scheduler: Any = None
    speed: Any = None


@dataclass
class EvaluateSchema(Common):
    synthetic: Optional[str] = None
    full: bool = False
    label: Optional[str] = None
    parametrization: Any = None
    speed: Any = None


@dataclass
class BufferSchema(Common):
    num_experts: int = knob(100, 1)
    expert_offset: int = knob(0, 0)
    train_epochs: int = knob(50, 1)
    lr_teacher: float = knob(0.01, 0, exclusive_lo=True)
    momentum: float = knob(0.0, 0, 1)
    weight_decay: float = knob(0.0, 0)
    batch_train: int = knob(256, 1)


@dataclass
class TeacherSchema(Common):
    recipe: Any = None
    num_teachers: int = knob(1, 1)
    teacher_offset: int = knob(0, 0)
    test_every: int = knob(10, 1)


SCHEMAS = {"distill": DistillSchema, "evaluate": EvaluateSchema, "buffer": BufferSchema, "teacher": TeacherSchema}


def register() -> None:
    """Register every schema as ``<command>_schema`` in Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    for name, node in SCHEMAS.items():
        cs.store(name=f"{name}_schema", node=node)


def _names(schema) -> set[str]:
    return {f.name for f in fields(schema)}


def unknown_top_level(cfg, command: str) -> list[str]:
    """Top-level keys of ``cfg`` that the command's schema does not declare (added with ``+key=...``)."""
    return sorted(set(cfg.keys()) - _names(SCHEMAS[command]) - {"hydra"})


def check_top_level(cfg, command: str) -> None:
    """Unknown top-level keys and out-of-range values are one-line ConfigErrors naming the key, the value and
    what is allowed."""
    from ddrun.utils import ConfigError

    schema = SCHEMAS[command]
    for key in unknown_top_level(cfg, command):
        near = difflib.get_close_matches(key, sorted(_names(schema)), n=1)
        raise ConfigError(f"unknown key {key!r}" + (f"; did you mean {near[0]!r}?" if near else
                                                    f"; valid keys: {', '.join(sorted(_names(schema)))}"))
    for f in fields(schema):
        lo, hi = f.metadata.get("min"), f.metadata.get("max")
        if lo is None and hi is None:
            continue
        value = cfg.get(f.name)
        if value is None:
            continue
        low_bad = lo is not None and (value <= lo if f.metadata.get("exclusive_lo") else value < lo)
        if low_bad or (hi is not None and value > hi):
            allowed = " and ".join(x for x in (
                None if lo is None else f"{'>' if f.metadata.get('exclusive_lo') else '>='} {lo:g}",
                None if hi is None else f"<= {hi:g}") if x)
            raise ConfigError(f"{f.name}={value}: must be {allowed}")


# keys of a config node that Hydra reads itself
_HYDRA_KEYS = {"_target_", "_partial_", "_convert_", "_recursive_", "_args_"}


def target_object(target: Any) -> Any | None:
    """The class (or function) a dotted ``_target_`` names, read with Hydra's ``get_object``; None for no target or
    one that cannot be imported (building it reports that in its own words). The one way a check asks a component's
    class what it accepts, is (``ReplayEvaluator``) or can do (``Objective.stores_steps``) before anything is built."""
    from hydra.utils import get_object

    if target is None:
        return None
    try:
        return get_object(str(target))
    except Exception:  # noqa: BLE001 - reported when it is built
        return None


def accepted_keys(target: Any) -> set[str] | None:
    """The keyword arguments ``target`` (a class or function) accepts, following ``**kwargs`` up a class's MRO;
    None when it swallows anything (a ``**kwargs`` that goes nowhere we can see)."""
    if inspect.isclass(target):
        names: set[str] = set()
        for cls in target.__mro__:
            if "__init__" not in cls.__dict__:
                continue
            try:
                params = inspect.signature(cls.__dict__["__init__"]).parameters.values()
            except (TypeError, ValueError):  # a constructor without a readable signature (C extension)
                return None
            names |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
            if not any(p.kind == p.VAR_KEYWORD for p in params):
                return names - {"self"}
        return None
    try:
        params = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def check_component_keys(node: Any, path: str = "") -> None:
    """Every config node with a ``_target_`` (searched recursively) may only hold keys its target accepts.

    Raises:
        ConfigError: names the key, the component and the keys it takes.
    """
    from omegaconf import DictConfig, OmegaConf

    from ddrun.utils import ConfigError

    if not isinstance(node, DictConfig):
        return
    target = OmegaConf.select(node, "_target_", throw_on_missing=False)
    if isinstance(target, str):
        obj = target_object(target)
        accepted = accepted_keys(obj) if obj is not None else None
        if accepted is not None:
            for key in node.keys():
                if key not in accepted and key not in _HYDRA_KEYS:
                    near = difflib.get_close_matches(str(key), sorted(accepted), n=1)
                    raise ConfigError(f"{path}{key}: not a setting of {target}" +
                                      (f"; did you mean {path}{near[0]}?" if near else
                                       f"; its settings: {', '.join(sorted(accepted))}"))
    for key in node.keys():
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_interpolation():
            check_component_keys(child, f"{path}{key}.")


LOGGER_MODES = ("auto", "online", "offline", "disabled")
ZCA_FORMS = ("absolute", "relative")   # ddrun.data.zca.ZCA's forms (dataset.zca_form)


def check_dataset_preprocessing(dataset) -> None:
    """``dataset.zca_form`` is one of :data:`ZCA_FORMS`; ``dataset.zca``, ``dataset.zca_centre`` and
    ``dataset.layernorm`` are booleans (absent or null keys are not checked: the loaders' defaults apply).

    Raises:
        ConfigError: one line naming the key, the bad value and the valid values.
    """
    from ddrun.utils import ConfigError

    if dataset is None:
        return
    form = dataset.get("zca_form")
    if form is not None and form not in ZCA_FORMS:
        raise ConfigError(f"dataset.zca_form={form}: valid values are {', '.join(ZCA_FORMS)}")
    for key in ("zca", "zca_centre", "layernorm"):
        value = dataset.get(key)
        if value is not None and not isinstance(value, bool):
            raise ConfigError(f"dataset.{key}={value}: valid values are true, false")


def check_common(cfg, command: str) -> None:
    """The checks every command makes before any work: the schema's types, ranges and known keys
    (``ddrun.schema``), the keys of every component, the device, the logger mode, the dataset's ZCA / layernorm
    options and the dataset subsets.

    Raises:
        ConfigError: one line naming the key, the bad value and what is allowed.
    """
    from omegaconf import OmegaConf

    from ddrun.utils import ConfigError, resolve_device

    check_top_level(cfg, command)
    check_component_keys(cfg)
    resolve_device(cfg.device)
    mode = OmegaConf.select(cfg, "logger.mode")
    if mode is not None and mode not in LOGGER_MODES:
        raise ConfigError(f"logger.mode={mode}: valid values are {', '.join(LOGGER_MODES)}")
    check_dataset_preprocessing(cfg.get("dataset"))
    for key in ("train_subset", "test_subset"):
        n = OmegaConf.select(cfg, f"dataset.{key}")
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
            raise ConfigError(f"dataset.{key}={n}: must be a whole number >= 1 (images per class) or null (all)")
