"""``ddrun <command> [overrides]``: dispatch to one Hydra app per command.

Only dispatches: it rewrites ``sys.argv`` so that Hydra (which reads it) sees ``ddrun <command>`` as the program,
then imports the command's module lazily, so ``ddrun --help`` imports no torch.
"""

from __future__ import annotations

import importlib
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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from ddrun import __version__

        print(f"ddrun {__version__}")
        return 0
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
