"""``lora-ref vectors OUT_DIR``: write the golden vectors (see :mod:`lora_ref.vectors`)."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "write golden test vectors (safetensors + manifest.json) for checking another LoRA implementation"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", metavar="OUT_DIR", type=Path, help="directory to write (created if needed)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    parser.add_argument("--force", action="store_true", help="overwrite vectors already in OUT_DIR")


def run(args: argparse.Namespace) -> int:
    from ..vectors import FORMAT_VERSION, load_vectors, write_vectors

    if args.seed < 0:
        print(f"lora-ref vectors: --seed must be a non-negative integer, got {args.seed}")
        return 2
    try:
        manifest = write_vectors(args.out_dir, seed=args.seed, overwrite=args.force)
    except FileExistsError:
        print(f"lora-ref vectors: {args.out_dir / 'manifest.json'} already exists; use --force to replace it")
        return 1
    except NotADirectoryError as exc:
        print(f"lora-ref vectors: {exc}")
        return 1
    cases = load_vectors(args.out_dir)  # read back: what was written is what a consumer gets
    width = max(len(c.name) for c in cases)
    for case in cases:
        print(f"  {case.name:<{width}}  {case.description}")
    print(f"wrote {len(cases)} cases (format version {FORMAT_VERSION}, seed {args.seed}) to {manifest}")
    return 0
