"""What the commands share: their one-line errors on stderr, the ``--seed`` rule, the wording of a
failed read or write, and the output-folder rule of the commands that write a folder
(``lora-ref demo``, ``lora-ref vectors``). Each command keeps its own wording around these."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from ..checks import is_int


def error(prog: str, message: Any, status: int) -> int:
    """Print ``lora-ref PROG: MESSAGE`` on stderr as the command's error; return ``status``."""
    print(f"lora-ref {prog}: {message}", file=sys.stderr)
    return status


def seed_problem(seed: Any) -> str | None:
    """Why ``seed`` is not a valid ``--seed`` (a non-negative int, not a bool), or None.

    argparse gives an int; a caller of ``run()`` may pass anything, so the value is shown with repr.
    """
    if not is_int(seed) or seed < 0:
        return f"--seed must be a non-negative integer, got {seed!r}"
    return None


def _where(exc: OSError, default_path: Path) -> str:
    """The path an OSError names, else ``default_path``, quoted."""
    return repr(str(exc.filename if exc.filename is not None else default_path))


def write_error(exc: OSError, default_path: Path) -> str:
    """``cannot write to 'PATH': REASON`` for a failed write under ``default_path``."""
    return f"cannot write to {_where(exc, default_path)}: {exc.strerror or exc}"


def read_error(exc: OSError, default_path: Path, what: str | None = None) -> str:
    """A failed read: ``cannot read [the WHAT: ]'PATH': REASON``; an OSError of our own (no
    strerror, e.g. a missing directory) is its message, after ``WHAT: `` when given."""
    if exc.strerror is None:
        return str(exc) if what is None else f"{what}: {exc}"
    return f"cannot read {'' if what is None else f'the {what}: '}{_where(exc, default_path)}: {exc.strerror}"


def output_folder_problem(out: Path, name: str, force: bool, writes: str, *,
                          file_status: int = 1) -> tuple[str, int] | None:
    """Why ``out`` cannot take the command's files, with the exit status, or None.

    ``out`` must be a directory or not exist yet (else ``file_status``; ``name`` is the argument
    that gave it), and an empty one unless ``force`` (else 1; ``writes`` says what ``--force``
    would write into it and what it replaces).
    """
    if out.exists() and not out.is_dir():
        return f"{name} must be a directory, but {str(out)!r} is a file", file_status
    if out.is_dir() and any(out.iterdir()) and not force:
        return f"{str(out)!r} already exists and is not empty; use --force to write {writes}", 1
    return None
