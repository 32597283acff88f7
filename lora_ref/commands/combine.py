"""``lora-ref combine [--out DIR] [--seed N] [--quick] [--write-docs [PAGE]]``: audit adapter combination.

Pretrains the demo's small GPT, trains two adapters on two different cipher tasks (the first
with rsLoRA), combines them with ``exact`` and each of PEFT 0.21.2's eleven methods
(:mod:`lora_ref.combine`), and measures per module each result's error against the exact
weighted sum of deltas and its rank, the combined model's loss on both tasks, PEFT 0.21.2's
rsLoRA over-scaling, and ``linear``'s cross terms. Writes ``DIR/audit.md`` (the section of
docs/combination.md) and ``DIR/results.json``; ``--write-docs`` also puts the section into the
page, between its markers. The experiment lives upstairs, in
:mod:`transformer_ref.demo.combination`, imported when the command runs.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import time
from dataclasses import replace
from pathlib import Path

from ._common import error, seed_problem, write_error

HELP = "combine two trained adapters with exact and PEFT's eleven methods, and audit each (docs/combination.md)"

PAGE = Path("docs") / "combination.md"
"""The page ``--write-docs`` regenerates when given no path (relative to the working directory)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", metavar="DIR", type=Path, default=Path("lora-ref-combine"),
                        help="directory for audit.md and results.json (default: ./lora-ref-combine)")
    parser.add_argument("--seed", type=int, default=0, metavar="N", help="seed of every random draw (default 0)")
    parser.add_argument("--quick", action="store_true",
                        help="the small preset (one layer, C = 64, fewer steps): a few seconds instead of one to two minutes")
    parser.add_argument("--write-docs", metavar="PAGE", type=Path, nargs="?", const=PAGE, default=None,
                        help=f"also replace the generated section of PAGE (default {PAGE}, from the "
                             "repository root) with this run's")
    progress = parser.add_mutually_exclusive_group()
    progress.add_argument("--progress", dest="progress", action="store_true", default=None,
                          help="show progress bars (default: only on an interactive terminal)")
    progress.add_argument("--no-progress", dest="progress", action="store_false", help="never show progress bars")


def _fail(message: object) -> int:
    """combine's errors: one line (whitespace collapsed, for messages from below) and exit 1, the
    bad --seed included (demo, vectors and conform exit 2 for it)."""
    return error("combine", " ".join(str(message).split()), 1)


def run(args: argparse.Namespace) -> int:
    seed, out, page = args.seed, args.out, args.write_docs
    problem = seed_problem(seed)                     # argparse gives an int; run() may be called directly
    if problem:
        return _fail(problem)
    if out.exists() and not out.is_dir():
        return _fail(f"--out must be a directory, but {str(out)!r} is a file")
    if page is not None:
        from transformer_ref.demo.combination import BEGIN, END
        from transformer_ref.demo.common import replace_section

        if not page.is_file():
            hint = " (run from the repository root, or give the page's path)" if page == PAGE else ""
            return _fail(f"--write-docs: {str(page)!r} is not a file{hint}")
        try:
            replace_section(page.read_text(encoding="utf-8"), "", BEGIN, END)   # its markers, checked now
        except ValueError:
            return _fail(f"--write-docs: {str(page)!r} must hold the markers {BEGIN} and {END} once each, in "
                         "that order")
    try:
        return _audit(args.quick, seed, out, page, args.progress)
    except OSError as exc:
        return _fail(write_error(exc, out))
    except ValueError as exc:
        return _fail(exc)


def _audit(quick: bool, seed: int, out: Path, page: Path | None, progress: bool | None) -> int:
    from transformer_ref.demo import combination, json_ready
    from transformer_ref.demo.common import replace_section
    from transformer_ref.machine import blas_threads

    importlib.import_module("scipy.linalg")         # load SciPy's BLAS too, so that it is limited with NumPy's

    preset = combination.QUICK if quick else combination.DEFAULT
    config = replace(preset, demo=replace(preset.demo, seed=seed))
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)           # before the computation: a folder that fails, fails now
    # one BLAS thread, as lora-ref demo: small matrices, and float32 sums that depend on the count
    with blas_threads(1) as how:
        result = combination.compute(config, progress=progress)
    result["versions"]["blas_threads"] = how
    command = "lora-ref combine" + " --quick" * quick + (f" --seed {seed}" if seed else "") \
        + " --write-docs" * (page is not None)
    section = combination.render_section(result, command)
    _write(out / "results.json", json.dumps(json_ready(result), indent=1) + "\n")
    _write(out / "audit.md", section)
    print(combination.summary_text(result))
    written = [out / "audit.md", out / "results.json"]
    if page is not None:
        _write(page, replace_section(page.read_text(encoding="utf-8"), section, combination.BEGIN, combination.END))
        written.append(page)
    print(f"wrote {', '.join(str(p) for p in written)} in {time.perf_counter() - start:.1f} s")
    return 0


def _write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file, so a reader never sees half of it."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
