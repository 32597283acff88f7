"""The output-folder rule of the commands that write a folder (``lora-ref demo``, ``lora-ref vectors``)."""

from __future__ import annotations

from pathlib import Path


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
