"""The ``lora-ref`` command.

Each subcommand is a module in :mod:`lora_ref.commands` that defines ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int`` (the exit status). Modules are imported only
when their command runs, so ``lora-ref --help`` stays fast and a command's heavy dependencies
(matplotlib, the transformer) load only for it.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import pkgutil
import sys
from pathlib import Path

from . import __version__, commands


def _command_help() -> dict[str, str]:
    """Each command module's ``HELP`` string, read without importing the module."""
    helps = {}
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        tree = ast.parse(Path(commands.__path__[0], f"{info.name}.py").read_text())
        text = next((node.value.value for node in tree.body
                     if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "HELP" for t in node.targets)
                     and isinstance(node.value, ast.Constant)), "")
        helps[info.name] = text
    return helps


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lora-ref",
        description="lora-ref: a reference implementation of LoRA, and an oracle for other implementations.")
    parser.add_argument("--version", action="version", version=f"lora-ref {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, text in _command_help().items():
        sub.add_parser(name, help=text, description=text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    known = _command_help()
    if not argv or argv[0] not in known:
        args = parser.parse_args(argv)  # prints help / version / an error naming the valid commands
        if args.command is None:
            parser.print_help()
            return 2
    name = argv[0]
    module = importlib.import_module(f"lora_ref.commands.{name}")
    command_parser = argparse.ArgumentParser(prog=f"lora-ref {name}", description=module.HELP)
    module.add_arguments(command_parser)
    args = command_parser.parse_args(argv[1:])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
