"""``lora-ref audit``: check LoRA's math on this machine and backend, and print the evidence.

Runs every property of :mod:`lora_ref.audit` once on seeded random cases, on the current
backend (``LORA_REF_BACKEND``, or ``--backend``), and prints a table: check, dtype, max error,
tolerance, pass. Exits 0 when every check passes, 1 when any fails, 2 when the backend cannot
run here.
"""

from __future__ import annotations

import argparse
import sys

HELP = "check LoRA's math (merge, init, rank, gradients, backends) on seeded cases and print a table"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", choices=("numpy", "cupy", "array_api_strict"), default=None,
                        help="run on this backend (default: $LORA_REF_BACKEND, else numpy)")
    parser.add_argument("--dtype", choices=("float64", "float32", "both"), default="both",
                        help="precision(s) to check (default: both)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random cases (default: 0)")
    parser.add_argument("--cycles", type=int, default=50,
                        help="merge/unmerge cycles of the drift check (default: 50)")


def run(args: argparse.Namespace) -> int:
    from ..audit import format_table, run_audit
    from ..backend import BackendUnavailableError, get_backend, set_backend

    if args.cycles < 1:
        print(f"lora-ref audit: --cycles must be a positive int, got {args.cycles}", file=sys.stderr)
        return 2
    try:
        if args.backend is not None:
            set_backend(args.backend)
        backend = get_backend()
    except (BackendUnavailableError, ValueError) as exc:
        print(f"lora-ref audit: {exc}", file=sys.stderr)
        return 2
    dtypes = ("float64", "float32") if args.dtype == "both" else (args.dtype,)
    rows = run_audit(seed=args.seed, dtypes=dtypes, cycles=args.cycles)
    print(format_table(rows, backend=backend, seed=args.seed))
    return 0 if all(r.passed for r in rows) else 1
