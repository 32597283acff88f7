"""``lora-ref demo [--out DIR] [--model gpt2|llama] [--quick] [--seed N] [--threads N] [--force]``: the paper's experiments in miniature.

Pretrains a small GPT-2 (or, with ``--model llama``, LLaMA) architecture model (transformer_ref)
on a cipher task, fine-tunes it with full fine-tuning and with LoRA at several ranks and target
sets, and writes ``DIR/report.md`` with figures: loss curves, loss and accuracy versus rank,
trainable parameters and optimizer bytes, the merge check, singular-value spectra, subspace
similarity (Figure 3) and amplification (Table 7). Beside LoRA at one rank: DoRA, and QLoRA on the
model quantised to 4-bit NF4 (with the quantised base's error on the task); and a second adapter
trained on a second task, both served in one mixed batch, then combined (exact, cat, svd, linear). The experiment lives upstairs, in
:mod:`transformer_ref.demo` (it needs a model); this command imports it when it runs, so
importing ``lora_ref`` never imports ``transformer_ref``. See docs/reproduction.md.

Errors go to stderr as one line naming what is wrong: a bad argument (exit 2); an output folder
that cannot be written, checked before the experiment runs, or one that already holds files
without ``--force`` (exit 1).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

from ._common import error, output_folder_problem, seed_problem, write_error

HELP = ("pretrain a small GPT-2 or LLaMA, fine-tune it with LoRA, DoRA, QLoRA and in full, serve and combine "
        "two adapters, and write a report (the paper's Tables 5-7, Figure 3)")

RUN_TIMES = {"default": (90, 180), "quick": (10, 60)}
"""Seconds a run of each preset takes on 2 CPU cores shared with other work: the range measured while
docs/reproduction.md was made (its committed runs fall within it; tests/test_demo_page.py checks)."""


def run_time_text(name: str) -> str:
    """How long the preset ``name`` ("default" or "quick") takes, as the help and the docs say it."""
    if name not in RUN_TIMES:
        raise ValueError(f"name must be one of {', '.join(map(repr, RUN_TIMES))}, got {name!r}")
    lo, hi = RUN_TIMES[name]
    return f"{lo}-{hi} s"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", metavar="DIR", type=Path, default=Path("lora-ref-demo"),
                        help="directory for report.md, results.json and figures/ (default: ./lora-ref-demo)")
    parser.add_argument("--model", choices=("gpt2", "llama"), default="gpt2",
                        help="the architecture: gpt2 (default) or llama (RMSNorm, RoPE, SwiGLU, separate q/k/v/o)")
    parser.add_argument("--quick", action="store_true",
                        help=f"a smaller run (one layer, fewer steps): {run_time_text('quick')} on 2 CPU cores, "
                             f"against {run_time_text('default')} for the default run")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random draw (default 0)")
    parser.add_argument("--threads", type=int, default=1, metavar="N",
                        help="BLAS threads while the demo runs (default 1: its matrices are small, and extra "
                             "threads slow it down badly on a busy machine); 0 leaves the setting alone")
    parser.add_argument("--force", action="store_true",
                        help="write into DIR even if it already holds files (its report, results and figures "
                             "are replaced; other files are left alone)")
    progress = parser.add_mutually_exclusive_group()
    progress.add_argument("--progress", dest="progress", action="store_true", default=None,
                          help="show progress bars (default: only on an interactive terminal)")
    progress.add_argument("--no-progress", dest="progress", action="store_false", help="never show progress bars")


def _error(message: str, status: int) -> int:
    return error("demo", message, status)


def run(args: argparse.Namespace) -> int:
    problem = seed_problem(args.seed)
    if problem:
        return _error(problem, 2)
    if args.threads < 0:
        return _error(f"--threads must be a non-negative integer, got {args.threads}", 2)
    out: Path = args.out
    problem = output_folder_problem(out, "--out", args.force, "the report into it (report.md, results.json and "
                                    "figures/ are replaced)", file_status=2)
    if problem:
        return _error(*problem)
    from transformer_ref import demo

    config = replace(demo.PRESETS["quick" if args.quick else "default"], seed=args.seed, family=args.model)
    start = time.perf_counter()
    try:
        demo.prepare_output(out)                     # before the experiment: a write that fails, fails now
        result = demo.run_demo(config, out, progress=args.progress, threads=args.threads or None)
    except OSError as exc:
        return _error(write_error(exc, out), 1)
    print(demo.summary_text(result, out, wall_s=time.perf_counter() - start))
    return 0
