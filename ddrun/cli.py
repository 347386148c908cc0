"""``ddrun <command> [overrides]``: dispatch to one Hydra app per command.

Only dispatches: it rewrites ``sys.argv`` so that Hydra (which reads it) sees ``ddrun <command>`` as the program,
then imports the command's module lazily, so ``ddrun --help`` imports no torch.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

COMMANDS = {
    "distill": ("ddrun.distill", "Distill a synthetic set S from a real dataset (DM, DC, DSA, ...)."),
    "buffer": ("ddrun.buffers", "Train expert networks and store their trajectories (for method=mtt)."),
    "teacher": ("ddrun.teachers",
                "Train teacher networks and store them (for method=sre2l / gvbsm / rded / edc, evaluator=kd)."),
    "evaluate": ("ddrun.evaluate", "Evaluate a saved S (or the whole training set) on one or many architectures."),
    "export": ("ddrun.export", "Write a saved S as an image folder (format=imagefolder) for other tools."),
    "report": ("ddrun.report", "Tables (Markdown, CSV) and plots from run directories and sweeps."),
}

USAGE = """usage: ddrun <command> [hydra options] [key=value overrides]

Commands:
{commands}

Examples:
  ddrun distill method=dm dataset=fashion_mnist ipc=10
  ddrun distill -m method=dm,dc,dsa ipc=1,10          # Hydra multirun sweep
  ddrun distill method=dc ipc=10 --cfg job --resolve  # print the values the run will use
  ddrun distill --help                                # the command's config groups and options
  ddrun distill -m hydra/launcher=slurm method=dm,dc ipc=1,10,50 seed=0,1,2   # one SLURM job per point
  ddrun evaluate synthetic=outputs/.../synthetic.pt evaluator=cross_arch     # S on the architecture pool
  ddrun report outputs/multirun/<date> --compare      # mean +- std over seeds, published figures beside
  ddrun teacher dataset=cifar10                       # a teacher for method=sre2l / gvbsm / rded / edc and evaluator=kd
  ddrun export synthetic=.../synthetic.pt format=imagefolder out=DIR   # per-class PNG folders

Each command is a Hydra app: `-m/--multirun`, `--cfg job --resolve`, `--info`, `-sc install=bash`
(tab completion) all work after the command name.
"""


def usage() -> str:
    return USAGE.format(commands="\n".join(f"  {name:<10} {doc}" for name, (_, doc) in COMMANDS.items()))


def _complete(argv: list[str]) -> int:
    """Shell completion query (``ddrun -sc query=bash`` with ``COMP_LINE`` set by the script that
    ``ddrun <command> -sc install=bash`` prints): complete the command name, or hand the rest of the line to
    the command's Hydra app as if the command were the program."""
    line = os.environ["COMP_LINE"]
    words = line.split()
    if len(words) < 2 or (len(words) == 2 and not line.endswith(" ")):
        prefix = words[1] if len(words) == 2 else ""
        print("\n".join(c for c in COMMANDS if c.startswith(prefix)))
        return 0
    cmd = words[1]
    if cmd not in COMMANDS:
        return 0
    cut = line.index(cmd) + len(cmd)
    os.environ["COMP_LINE"] = words[0] + line[cut:]
    point = int(os.environ.get("COMP_POINT", len(line)))
    os.environ["COMP_POINT"] = str(max(point - (cut - len(words[0])), 0))
    sys.argv = [f"ddrun {cmd}", *argv]
    importlib.import_module(COMMANDS[cmd][0]).main()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from ddrun import __version__

        print(f"ddrun {__version__}")
        return 0
    if argv[0] in ("-sc", "--shell-completion") and "COMP_LINE" in os.environ:
        return _complete(argv)
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"ddrun: unknown command {cmd!r}; valid commands: {', '.join(COMMANDS)}\n", file=sys.stderr)
        print(usage(), file=sys.stderr)
        return 2
    bad = (bad_top_level_value(cmd, rest) or bad_group_choice(cmd, rest) or unwritable_run_dir(cmd, rest)
           or other_run_in_run_dir(cmd, rest) or no_slurm(rest))
    if bad:
        print(f"ddrun {cmd}: error: {bad}", file=sys.stderr)
        return 1
    hint = unknown_keys(cmd, rest)
    if hint:
        print(hint, file=sys.stderr)
        return 1
    sys.argv = [f"ddrun {cmd}", *rest]
    module = importlib.import_module(COMMANDS[cmd][0])
    try:
        module.main()
    except SystemExit as exc:
        sweep = is_sweep(rest)  # unknown_keys composed only the first values of a sweep
        if exc.code == 1 and sweep:  # Hydra rejected a later value, or a job failed: name mistyped keys
            hint = typo_hint(cmd, rest)
            if hint:
                print(hint, file=sys.stderr)
        raise
    return 0


def unwritable_run_dir(cmd: str, args: list[str]) -> str | None:
    """One line when the folder the command's outputs go to (``hydra.run.dir``, ``hydra.sweep.dir`` with ``-m``,
    else ``./outputs``) cannot be written, before Hydra tries (it would fail with a traceback); else None."""
    if cmd == "report":
        return None
    multirun = is_sweep(args)
    key = "hydra.sweep.dir=" if multirun else "hydra.run.dir="
    given = [a[len(key):] for a in args if a.startswith(key)]
    target = Path(given[-1] if given else "outputs").expanduser().absolute()
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.is_dir() and os.access(existing, os.W_OK | os.X_OK):
        return None
    why = "not a folder" if not existing.is_dir() else "read-only or not writable"
    return (f"cannot write the run directory {target} ({existing} is {why}); pass "
            f"{key.rstrip('=')}=<a writable folder>")


def is_sweep(args: list[str]) -> bool:
    """Whether the command line asks Hydra for a multirun (``-m`` / ``--multirun``)."""
    return "-m" in args or "--multirun" in args


def no_slurm(args: list[str]) -> str | None:
    """One line when a sweep goes to ``hydra/launcher=slurm`` but SLURM's ``sbatch`` / ``srun`` are not on PATH
    (off the cluster): submitit would stop with a traceback after Hydra made the sweep folder; else None."""
    import shutil

    if not is_sweep(args):
        return None
    launchers = [a.split("=", 1)[1] for a in overrides_of(args) if a.startswith("hydra/launcher=")]
    if not launchers or launchers[-1] != "slurm":
        return None
    missing = [tool for tool in ("sbatch", "srun") if shutil.which(tool) is None]
    if not missing:
        return None
    return (f"hydra/launcher=slurm submits with SLURM's sbatch and srun, and {' and '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not on PATH: run it on the cluster's login node (or load "
            f"SLURM's module there), or use hydra/launcher=local to run the sweep's jobs on this machine")


def other_run_in_run_dir(cmd: str, args: list[str]) -> str | None:
    """One line when the folder given as ``hydra.run.dir`` holds a run this command would overwrite: a run record
    (``results.json``) or a distill's ``checkpoint.pt`` / ``synthetic.pt``. Only ``ddrun distill`` may rerun in
    its own distill folder (that resumes it); ``evaluate`` never rewrites an earlier evaluation. Checked before
    Hydra writes ``.hydra/``; else None."""
    given = [a.split("=", 1)[1] for a in overrides_of(args) if a.startswith("hydra.run.dir=")]
    if cmd == "report" or not given or is_sweep(args):
        return None
    import json

    run_dir = Path(given[-1]).expanduser()
    holder = None
    if (run_dir / "results.json").is_file():
        try:
            holder = json.loads((run_dir / "results.json").read_text()).get("command", "distill")
        except (OSError, ValueError, AttributeError):
            holder = "ddrun"
    if holder is None and any((run_dir / f).exists() for f in ("checkpoint.pt", "synthetic.pt")):
        holder = "distill"
    if holder is None or (cmd == "distill" and holder == "distill"):
        return None
    return (f"hydra.run.dir={run_dir} holds a ddrun {holder} run: {cmd} would replace its record, metrics and "
            f".hydra/; pass hydra.run.dir=<another folder>")


SWEEP_SYNTAX = ("(", ")", "[", "]", "{", "}", "*", "$")
VALUE_FLAGS = ("-c", "--cfg", "-p", "--package", "-i", "--info", "-cp", "--config-path", "-cn", "--config-name",
               "-cd", "--config-dir", "--experimental-rerun")


def overrides_of(args: list[str]) -> list[str]:
    """The ``key=value`` overrides of a Hydra command line: not its flags, nor a flag's value (``-sc install=bash``,
    ``--cfg job``)."""
    out, skip = [], False
    for i, arg in enumerate(args):
        if skip:
            skip = False
            continue
        if arg in ("-sc", "--shell-completion"):
            skip = True
        elif arg in VALUE_FLAGS:
            skip = i + 1 < len(args) and "=" not in args[i + 1]
        elif "=" in arg and not arg.startswith("-"):
            out.append(arg)
    return out


def bad_group_choice(cmd: str, args: list[str]) -> str | None:
    """One line for the first ``group=option`` (also ``group@package=option``, ``hydra/launcher=...``, each value
    of a ``-m`` sweep ``a,b``) whose option the group does not have, listing the valid ones (Hydra's config
    repository: ddrun's configs and the installed plugins'); else None. Hydra would print about 25 lines."""
    from hydra.core.object_type import ObjectType

    from ddrun.conf import config_repository

    if cmd == "report":
        return None
    repo = config_repository()
    for arg in overrides_of(args):
        key, eq, value = arg.partition("=")
        if arg.startswith(("+", "~")) or any(c in value for c in SWEEP_SYNTAX) or value == "null":
            continue
        group = key.split("@", 1)[0]
        if "." in group or not repo.group_exists(group):
            continue
        options = repo.get_group_options(group, ObjectType.CONFIG)
        wrong = [v for v in value.split(",") if v not in options]
        if wrong:
            return f"{key}={wrong[0]}: no such choice; valid: {', '.join(options)}"
    return None


def _first_values(overrides: list[str]) -> list[str]:
    """A ``-m`` sweep's overrides with each ``a,b,c`` list cut to its first value (the keys are what is checked);
    function-style sweeps (``range(...)``, ``choice(...)``) are left out."""
    out = []
    for arg in overrides:
        key, _, value = arg.partition("=")
        if not any(c in value for c in SWEEP_SYNTAX):
            out.append(f"{key}={value.split(',')[0]}")
    return out


def unknown_keys(cmd: str, args: list[str]) -> str | None:
    """One line per mistyped key (:func:`typo_hint`) or per group this command does not have, but only when Hydra
    would refuse the overrides: the command's config is composed with them first (a ``-m`` sweep with each list's
    first value). None when it composes, or when the failure is not one this can name (Hydra then reports it)."""
    if cmd == "report" or any(a in ("-sc", "--shell-completion") for a in args):
        return None
    overrides = [a for a in overrides_of(args) if not a.startswith(("hydra.", "hydra/"))]
    if is_sweep(args):
        overrides = _first_values(overrides)
    if not overrides:
        return None
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import ConfigCompositionException

    GlobalHydra.instance().clear()
    try:
        with initialize_config_module("ddrun.conf", version_base="1.3"):
            try:
                compose(cmd, overrides=overrides)
                return None
            except ConfigCompositionException:
                groups = set(compose(cmd, return_hydra_config=True).hydra.runtime.choices)
        return typo_hint(cmd, overrides) or _foreign_groups(cmd, overrides, groups)
    except Exception:  # noqa: BLE001 - anything else is Hydra's to report
        return None
    finally:
        GlobalHydra.instance().clear()


def _foreign_groups(cmd: str, overrides: list[str], groups: set[str]) -> str | None:
    """One line for a ``group=option`` whose group exists (another command has it) but not in ``cmd``'s config.
    An appended group at an explicit package (``+stage@stages.relabel=relabel``) is the way to add one: skipped."""
    from ddrun.conf import config_repository

    repo = config_repository()
    for arg in overrides:
        key = arg.split("=", 1)[0]
        if key.startswith("+") and "@" in key:
            continue
        key = key.lstrip("+")
        group = key.split("@", 1)[0]
        if "." not in group and group not in groups and repo.group_exists(group):
            own = sorted(g for g in groups if not g.startswith("hydra/"))
            return f"ddrun {cmd}: error: {arg}: this command has no {group!r} group (its groups: {', '.join(own)})"
    return None


def bad_top_level_value(cmd: str, args: list[str]) -> str | None:
    """One line for the first ``key=value`` argument whose top-level key has a type in the command's schema
    (``ddrun/schema.py``) that the value does not fit (``ipc=abc``, ``ipc=1.5``, ``resume=maybe``), else None.
    Hydra would refuse these too, over several lines."""
    from dataclasses import fields

    from omegaconf import OmegaConf
    from omegaconf.errors import ValidationError

    from ddrun.schema import SCHEMAS

    schema = SCHEMAS.get(cmd)
    if schema is None or is_sweep(args):  # sweep values (ipc=1,10): Hydra parses them
        return None
    types = {f.name: f.type for f in fields(schema)}
    for arg in args:
        key, _, value = arg.partition("=")
        if not _ or key not in types or types[key] == "Any":
            continue
        try:
            OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.from_dotlist([arg]))
        except ValidationError:
            return f"{key}={value}: must be of type {types[key]}"
    return None


def typo_hint(cmd: str, args: list[str]) -> str | None:
    """For a Hydra command: one line per ``key=value`` argument whose key is neither a config key nor a config
    group of the composed config, with the nearest valid one (difflib), e.g. ``unknown key 'ipcc'; did you mean
    'ipc'?``. Hydra's struct mode rejects such keys; this names what was probably meant. None when all are known."""
    import difflib
    from importlib import resources

    root = resources.files("ddrun.conf")
    if not root.joinpath(f"{cmd}.yaml").is_file():
        return None
    keys = [a.split("=", 1)[0] for a in overrides_of(args) if not a.startswith(("+", "~"))]
    keys = [k for k in keys if not k.startswith("hydra") and "@" not in k]
    if not keys:
        return None
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    def group_names(node, prefix=""):
        for child in node.iterdir():
            if child.is_dir() and not child.name.startswith(("_", ".")):
                if any(c.name.endswith(".yaml") for c in child.iterdir()):
                    yield prefix + child.name
                yield from group_names(child, f"{prefix}{child.name}/")

    groups = set(group_names(root))
    choices = [a for a in overrides_of(args) if a.split("=", 1)[0].split("@", 1)[0] in groups]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module("ddrun.conf", version_base="1.3"):
            try:
                cfg = compose(cmd, overrides=choices)
            except Exception:  # noqa: BLE001 - a bad group choice (Hydra has named it): keep the others
                good = []
                for choice in choices:
                    try:
                        compose(cmd, overrides=[*good, choice])
                        good.append(choice)
                    except Exception:  # noqa: BLE001
                        pass
                cfg = compose(cmd, overrides=good)
    except Exception:  # noqa: BLE001 - no hint is better than a second error
        return None
    finally:
        GlobalHydra.instance().clear()
    known: set[str] = set()

    def walk(node, prefix=""):
        for k, v in node.items():
            known.add(prefix + str(k))
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")

    walk(OmegaConf.to_container(cfg, resolve=False))
    lines = []
    for k in keys:
        if k in known or k in groups:
            continue
        near = difflib.get_close_matches(k, sorted(known | groups), n=1, cutoff=0.6)
        lines.append(f"ddrun {cmd}: unknown key {k!r}" + (f"; did you mean {near[0]!r}?" if near else
                                                           " (list the keys with --cfg job)"))
    return "\n".join(lines) or None


if __name__ == "__main__":
    sys.exit(main())
