"""Run every benchmark of issue #7; write benchmarks/results.json and docs/performance.md (+ .png).

    python -m benchmarks.run            # full: more repeats (about five minutes on 2 cores)
    python -m benchmarks.run --quick    # fewer repeats (about two minutes)

Options: ``--only training,inference,...`` to run a subset, ``--sizes small`` for one config
(``tiny`` is a toy config that checks the harness in seconds), ``--no-torch`` to leave PyTorch
out, ``--out PATH`` for the JSON, ``--page PATH`` for the markdown page (the PNG goes next to it),
``--no-page`` to write no page, ``--threads N`` for the thread count of every library.

``--unset-openblas-env`` reruns the benchmarks in a fresh process without ``OPENBLAS_CORETYPE``
and ``OPENBLAS_L2_SIZE`` (set on some machines; they pin NumPy's OpenBLAS to older kernels) and
writes ``benchmarks/results-openblas-unset.json``; docs/performance.md then shows its targets
beside those of the main run. The main run always measures the environment as it is.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from . import report
from .flops import StepShape
from .harness import blas_threads, machine_info, matmul_peak, set_numpy_blas_threads
from .suites import (
    CONFIGS,
    TINY,
    backends_suite,
    delta_svd_suite,
    gpu_suite,
    inference_suite,
    memory_suite,
    profile_suite,
    training_suite,
)

__all__ = ["SUITES", "main", "run_all"]

SUITES = ("peak", "training", "profile", "inference", "memory", "backends", "delta_svd", "gpu")
OPENBLAS_ENV = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
_UNSET_MARK = "LORA_REF_BENCH_UNSET_OPENBLAS"      # set by --unset-openblas-env for the fresh process

# (quick, full) repeats per measurement; warm-up runs come on top.
REPEATS = {"training": (7, 15), "inference": (11, 25), "backends": (5, 11), "peak": (5, 9)}


def _log(message: str) -> None:
    print(f"[benchmarks {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _threads(with_torch: bool, threads: int | None) -> int:
    """Give every library the same number of threads: ``threads``, or every core this process may
    use. PyTorch's intra-op threads and NumPy's BLAS threads get that number; lora-ref's batch
    slices (``transformer_ref.fast.sharded_value_and_grad``) too when ``threads`` is given, else
    what ``train()`` would choose (``auto_threads``: every core for issue #7's two sizes)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    n = cores if threads is None else threads
    set_numpy_blas_threads(n)
    if with_torch:
        try:
            import torch
        except ImportError:
            return n
        torch.set_num_threads(n)
    return n


def run_all(*, quick: bool = False, configs: Mapping[str, StepShape] | None = None,
            suites: Sequence[str] = SUITES, with_torch: bool = True, repeats: int | None = None,
            warmup: int = 2, peak_sizes: tuple[int, ...] = (512, 1024, 2048),
            threads: int | None = None) -> dict[str, Any]:
    """Run the chosen ``suites`` on ``configs`` (default: issue #7's small and large); return the
    results as a JSON-ready dict. ``repeats`` overrides every suite's number of timed runs;
    ``peak_sizes`` are the matrix sizes of the matmul-peak measurement; ``threads`` the thread
    count of every library (None: every usable core).

    Before measuring, it calls ``transformer_ref.machine.keep_freed_memory()`` (glibc keeps freed
    memory for reuse instead of page-faulting it in again each step): process-wide, so PyTorch
    runs with the same allocator settings.
    """
    from transformer_ref.machine import keep_freed_memory

    unknown = sorted(set(suites) - set(SUITES))
    if unknown:
        raise ValueError(f"unknown suites {unknown}; valid: {', '.join(SUITES)}")
    configs = dict(CONFIGS if configs is None else configs)
    started = time.perf_counter()
    n_threads = _threads(with_torch, threads)
    malloc_tuned = keep_freed_memory()
    if with_torch:
        warnings.filterwarnings("ignore", category=FutureWarning)   # transformers' deprecation notes
    pick = lambda name: repeats if repeats is not None else REPEATS[name][0 if quick else 1]  # noqa: E731
    results: dict[str, Any] = {"meta": {"quick": quick, "started": datetime.datetime.now().isoformat(timespec="seconds"),
                                        "suites": list(suites), "threads": n_threads,
                                        "openblas_env": (f"unset by --unset-openblas-env (was {os.environ[_UNSET_MARK]})"
                                                         if _UNSET_MARK in os.environ else "as set in the environment"),
                                        "keep_freed_memory": malloc_tuned, "machine": machine_info()}}
    peak = None
    if "peak" in suites:
        _log("float32 matmul peak")
        results["peak"] = matmul_peak(peak_sizes, repeats=pick("peak"), with_torch=with_torch)
        peak = results["peak"]["peak_gflops"]
    if "training" in suites:
        results["training"] = []
        for size, shape in configs.items():
            _log(f"training step, {size} ({shape.label})")
            results["training"].append(training_suite(size, shape, repeats=pick("training"), warmup=warmup,
                                                      peak_gflops=peak, with_torch=with_torch, threads=threads))
        if "peak" in suites:                      # the peak again, after: it drifts; keep the higher
            again = matmul_peak(peak_sizes, repeats=pick("peak"), with_torch=with_torch)
            results["peak"]["after_training"] = again
            if again["peak_gflops"] > peak:
                results["peak"].update({k: again[k] for k in ("gflops", "peak_gflops", "peak_from")})
                for entry in results["training"]:
                    for eff in entry.get("efficiency", {}).values():
                        eff["fraction_of_peak"] = eff["gflops"] / again["peak_gflops"]
    if "profile" in suites:
        results["profile"] = []
        for size, shape in configs.items():
            _log(f"profile, {size}")
            results["profile"].append(profile_suite(size, shape, repeats=2 if quick else 3, with_torch=with_torch))
    if "inference" in suites:
        results["inference"] = []
        for size, shape in configs.items():
            _log(f"inference, {size}")
            results["inference"].append(inference_suite(size, shape, repeats=pick("inference"), warmup=warmup))
    if "memory" in suites:
        results["memory"] = []
        for size, shape in configs.items():
            _log(f"memory, {size}")
            results["memory"].append(memory_suite(size, shape))
    if "backends" in suites:
        _log("backends")
        first = next(iter(configs.values()))
        results["backends"] = backends_suite(first, repeats=pick("backends"), warmup=min(warmup, 1))
    if "delta_svd" in suites:
        _log("delta_svd")
        results["delta_svd"] = delta_svd_suite(quick)
    if "gpu" in suites:
        results["gpu"] = gpu_suite()
    results["targets"] = report.targets(results)
    results["meta"]["threads_at_end"] = blas_threads()
    results["meta"]["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    results["meta"]["duration_s"] = time.perf_counter() - started
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats (under five minutes)")
    ap.add_argument("--only", default=",".join(SUITES), help=f"comma-separated subset of {','.join(SUITES)}")
    sizes_known = {**CONFIGS, "tiny": TINY}
    ap.add_argument("--sizes", default=",".join(CONFIGS), help=f"comma-separated subset of {','.join(sizes_known)}")
    ap.add_argument("--no-torch", action="store_true", help="leave PyTorch out (no comparison)")
    ap.add_argument("--threads", type=int, default=None, help="threads for every library (default: every core)")
    ap.add_argument("--out", type=Path, default=report.RESULTS, help="where to write the JSON")
    ap.add_argument("--page", type=Path, default=report.PAGE, help="where to write the page (the PNG goes beside it)")
    ap.add_argument("--no-page", action="store_true", help="write no page and no plot")
    ap.add_argument("--unset-openblas-env", action="store_true",
                    help=f"rerun without {', '.join(OPENBLAS_ENV)}; writes {report.RESULTS_UNSET.name}, no page")
    args = ap.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        ap.error(f"--threads must be a positive int, got {args.threads}")
    if args.unset_openblas_env:
        # OpenBLAS reads these when NumPy loads it, so only a fresh process can drop them.
        argv = list(sys.argv[1:] if argv is None else argv)
        argv.remove("--unset-openblas-env")
        env = {k: v for k, v in os.environ.items() if k not in OPENBLAS_ENV}
        env[_UNSET_MARK] = ",".join(f"{k}={os.environ[k]}" for k in OPENBLAS_ENV if k in os.environ) or "(none were set)"
        if "--out" not in argv:
            argv += ["--out", str(report.RESULTS_UNSET)]
        if "--page" not in argv:
            argv.append("--no-page")
        os.execve(sys.executable, [sys.executable, "-m", "benchmarks.run", *argv], env)
    sizes = [s for s in args.sizes.split(",") if s]
    bad = [s for s in sizes if s not in sizes_known]
    if bad or not sizes:
        ap.error(f"unknown sizes {bad or sizes}; valid: {', '.join(sizes_known)}")
    suites = [s for s in args.only.split(",") if s]
    try:
        results = run_all(quick=args.quick, configs={s: sizes_known[s] for s in sizes}, suites=suites,
                          with_torch=not args.no_torch, threads=args.threads,
                          peak_sizes=(64, 128, 256) if sizes == ["tiny"] else (512, 1024, 2048))
    except ValueError as exc:
        ap.error(str(exc))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    _log(f"wrote {args.out}")
    if not args.no_page:
        plot = report.write_plot(results, args.page.with_suffix(".png"))
        unset = (json.loads(report.RESULTS_UNSET.read_text())
                 if args.page == report.PAGE and report.RESULTS_UNSET.exists() else None)
        report.write_page(results, args.page, plot.name if plot else None, unset_results=unset)
        _log(f"wrote {args.page}" + (f" and {plot}" if plot else ""))
    for t in results["targets"]:
        value = "—" if t["value"] is None else f"{t['value']:.3f}"
        _log(f"{t['name']}: {value} (target {t['target']}) {report._met(t['met'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
