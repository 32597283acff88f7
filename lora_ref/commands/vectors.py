"""``lora-ref vectors OUT_DIR [--seed N] [--force]``: write the golden vectors (see :mod:`lora_ref.vectors`).

Errors go to standard error as one line: a bad argument (exit 2); an output folder that already
holds files, without ``--force`` (exit 1, the same rule as ``lora-ref demo``); a folder that cannot
be written (read-only, under ``/proc``, under a file: exit 1, naming the path and the reason).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import error, output_folder_problem, seed_problem, write_error

HELP = ("write golden test vectors of every variant (safetensors + manifest.json, format version 2; "
        "docs/vectors-format.md) for checking another implementation")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", metavar="OUT_DIR", type=Path, help="directory to write (created if needed)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    parser.add_argument("--force", action="store_true",
                        help="write into OUT_DIR even if it already holds files (the vectors' files are replaced; "
                             "other files are left alone)")


def _error(message: str, status: int) -> int:
    return error("vectors", message, status)


def run(args: argparse.Namespace) -> int:
    from ..vectors import FORMAT_VERSION, KINDS, load_vectors, write_vectors

    problem = seed_problem(args.seed)
    if problem:
        return _error(problem, 2)
    out: Path = args.out_dir
    try:
        problem = output_folder_problem(out, "OUT_DIR", args.force, "the vectors into it (their files are replaced, "
                                        "other files are left alone)")
        if problem:
            return _error(*problem)
        manifest = write_vectors(out, seed=args.seed, overwrite=True)
        cases = load_vectors(out)              # read back: what was written is what a consumer gets
    except OSError as exc:
        return _error(write_error(exc, out), 1)
    width = max(len(k) for k in KINDS)
    for kind in KINDS:
        mine = [c for c in cases if c.kind == kind]
        dtypes = ", ".join(dict.fromkeys(c.dtype for c in mine))
        print(f"  {kind:<{width}}  {len(mine):>2} cases  ({dtypes})")
    print(f"wrote {len(cases)} cases (format version {FORMAT_VERSION}, seed {args.seed}) to {manifest}")
    return 0
