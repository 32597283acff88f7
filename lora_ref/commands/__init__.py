"""Subcommands of the ``lora-ref`` command, one module each (see :mod:`lora_ref.cli`).

Each module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``, and
imports at module level only the standard library (and lora_ref's light modules): its real work,
and any import of ``transformer_ref`` or matplotlib, happens inside ``run``. So importing every
command, as :data:`COMMANDS` does, costs nothing, and ``lora-ref --help`` stays fast.
"""

from . import analyze, audit, check, combine, conform, count, demo, vectors

COMMANDS = {module.__name__.rsplit(".", 1)[1]: module
            for module in (analyze, audit, check, combine, conform, count, demo, vectors)}
"""Command name -> its module, in the order ``lora-ref --help`` lists them."""
