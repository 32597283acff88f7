"""The ``lora-ref`` command.

Each subcommand is a module in :mod:`lora_ref.commands` (listed in
:data:`lora_ref.commands.COMMANDS`) that defines ``HELP`` (one line), ``add_arguments(parser)``
and ``run(args) -> int`` (the exit status). The modules import their heavy dependencies
(matplotlib, the transformer) inside ``run``, so ``lora-ref --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys

from . import __version__
from .commands import COMMANDS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lora-ref",
        description="lora-ref: a reference implementation of LoRA, and an oracle for other implementations.")
    parser.add_argument("--version", action="version", version=f"lora-ref {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in COMMANDS.items():
        sub.add_parser(name, help=module.HELP, description=module.HELP, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if not argv or argv[0] not in COMMANDS:
        args = parser.parse_args(argv)  # prints help / version / an error naming the valid commands
        if args.command is None:
            parser.print_help()
            return 2
    name = argv[0]
    module = COMMANDS[name]
    command_parser = argparse.ArgumentParser(prog=f"lora-ref {name}", description=module.HELP)
    module.add_arguments(command_parser)
    args = command_parser.parse_args(argv[1:])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
