"""``lora-ref demo [--out DIR] [--quick] [--seed N] [--threads N]``: the paper's experiments in miniature.

Pretrains a small GPT (transformer_ref) on a cipher task, fine-tunes it with full fine-tuning and
with LoRA at several ranks and target sets, and writes ``DIR/report.md`` with figures: loss
curves, loss and accuracy versus rank, trainable parameters and optimizer bytes, the merge
check, singular-value spectra, subspace similarity (Figure 3) and amplification (Table 7).
The experiment lives upstairs, in :mod:`transformer_ref.demo` (it needs a model); this command
imports it when it runs, so importing ``lora_ref`` never imports ``transformer_ref``. See
docs/reproduction.md.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

HELP = "pretrain a small GPT, fine-tune it with LoRA and in full, and write a report (the paper's Tables 5-7, Figure 3)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", metavar="DIR", type=Path, default=Path("lora-ref-demo"),
                        help="directory for report.md, results.json and figures/ (default: ./lora-ref-demo)")
    parser.add_argument("--quick", action="store_true",
                        help="a smaller run (one layer, fewer steps): under a minute instead of a few")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random draw (default 0)")
    parser.add_argument("--threads", type=int, default=1, metavar="N",
                        help="BLAS threads while the demo runs (default 1: its matrices are small, and extra "
                             "threads slow it down badly on a busy machine); 0 leaves the setting alone")
    progress = parser.add_mutually_exclusive_group()
    progress.add_argument("--progress", dest="progress", action="store_true", default=None,
                          help="show progress bars (default: only on an interactive terminal)")
    progress.add_argument("--no-progress", dest="progress", action="store_false", help="never show progress bars")


def run(args: argparse.Namespace) -> int:
    from transformer_ref import demo

    if args.seed < 0:
        print(f"lora-ref demo: --seed must be a non-negative integer, got {args.seed}")
        return 2
    if args.threads < 0:
        print(f"lora-ref demo: --threads must be a non-negative integer, got {args.threads}")
        return 2
    if args.out.exists() and not args.out.is_dir():
        print(f"lora-ref demo: --out must be a directory, but {str(args.out)!r} is a file")
        return 2
    config = replace(demo.PRESETS["quick" if args.quick else "default"], seed=args.seed)
    start = time.perf_counter()
    result = demo.run_demo(config, args.out, progress=args.progress, threads=args.threads or None)
    print(demo.summary_text(result, args.out, wall_s=time.perf_counter() - start))
    return 0
