"""``ddrun <command> [overrides]``: dispatch to one Hydra app per command.

Only dispatches: it rewrites ``sys.argv`` so that Hydra (which reads it) sees ``ddrun <command>`` as the program,
then imports the command's module lazily, so ``ddrun --help`` imports no torch.
"""

from __future__ import annotations

import importlib
import os
import sys

COMMANDS = {
    "distill": ("ddrun.distill", "Distill a synthetic set S from a real dataset (DM, DC, DSA, ...)."),
}

USAGE = """usage: ddrun <command> [hydra options] [key=value overrides]

Commands:
{commands}

Examples:
  ddrun distill method=dm dataset=fashion_mnist ipc=10
  ddrun distill -m method=dm,dc,dsa ipc=1,10          # Hydra multirun sweep
  ddrun distill method=dc ipc=10 --cfg job --resolve  # print the values the run will use
  ddrun distill --help                                # the command's config groups and options

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
    sys.argv = [f"ddrun {cmd}", *rest]
    module = importlib.import_module(COMMANDS[cmd][0])
    module.main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
