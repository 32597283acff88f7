"""How much faster is the factored SVD of s B A (lora_ref.analysis.delta_svd) than the dense one?

For d x d weights and rank r, three ways to the singular values of ``dW = s B A``:

* ``delta_svd(A, B, s)``: QR of B and A^T, SVD of the r x r core; O(d r^2), dW never formed;
* dense SVD: form ``s * B @ A`` (d x d), then ``scipy.linalg.svd(full_matrices=False)``;
* dense values only: form it, then ``scipy.linalg.svdvals``.

The three are timed alternately in one process (so drifting machine load hits all of them
alike), each several times; medians are reported, and speedups are ratios of medians. Every
run's singular values are checked against the dense ones. BLAS threads are left as configured
(set OPENBLAS_NUM_THREADS=1 before starting to time single-threaded; a machine shared with other
jobs punishes multithreaded OpenBLAS); the result records the thread variables and load average.

    python benchmarks/bench_delta_svd.py            # d = 1024 and 4096, r = 8 (minutes)
    python benchmarks/bench_delta_svd.py --quick    # d = 256 and 1024, for a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import numpy as np
import scipy
import scipy.linalg

from lora_ref.analysis import delta_svd


def _timed(fn, min_seconds: float = 0.05) -> tuple[float, object]:
    """Seconds per call of ``fn()`` (repeated until ``min_seconds`` have passed), and its result."""
    calls, start = 0, time.perf_counter()
    while True:
        out = fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return elapsed / calls, out


def measure(d: int, r: int, repeats: int, seed: int = 0) -> dict:
    """Median seconds of the three methods for a (d, d) update of rank r, float64."""
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((r, d)) / np.sqrt(d)                         # (r, d)
    B = rng.standard_normal((d, r))                                      # (d, r)
    s = 2.0
    times: dict[str, list[float]] = {"delta_svd": [], "dense_svd": [], "dense_svdvals": []}
    worst = 0.0
    for _ in range(repeats):
        t, (U, S, Vh) = _timed(lambda: delta_svd(A, B, s))
        times["delta_svd"].append(t)
        t, (_, S_dense, _) = _timed(lambda: scipy.linalg.svd((B @ A) * s, full_matrices=False), 0.0)
        times["dense_svd"].append(t)
        t, S_vals = _timed(lambda: scipy.linalg.svdvals((B @ A) * s), 0.0)
        times["dense_svdvals"].append(t)
        worst = max(worst, float(np.max(np.abs(S - S_dense[:r])) / S_dense[0]),
                    float(np.max(np.abs(S - S_vals[:r])) / S_vals[0]))
    med = {name: statistics.median(v) for name, v in times.items()}
    return {
        "d": d, "r": r, "repeats": repeats,
        "delta_svd_s": med["delta_svd"], "dense_svd_s": med["dense_svd"], "dense_svdvals_s": med["dense_svdvals"],
        "speedup_vs_svd": med["dense_svd"] / med["delta_svd"],
        "speedup_vs_svdvals": med["dense_svdvals"] / med["delta_svd"],
        "max_relative_difference": worst,
        "all_s": times,
    }


def run(quick: bool = False) -> dict:
    """Time delta_svd against the dense SVD at r = 8; return the numbers as a dict.

    ``quick``: d = 256 and 1024, 3 repeats each (seconds); otherwise d = 1024 with 5 repeats
    and d = 4096 with 3 (minutes: one dense SVD of a 4096 x 4096 matrix takes tens of seconds
    on 2 cores).
    """
    plan = ((256, 3), (1024, 3)) if quick else ((1024, 5), (4096, 3))
    results = [measure(d, 8, repeats) for d, repeats in plan]
    return {
        "benchmark": "delta_svd",
        "quick": quick,
        "dtype": "float64",
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "numpy": np.__version__, "scipy": scipy.__version__,
                    "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
                    "threads_env": {k: os.environ[k] for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
                                                               "MKL_NUM_THREADS") if k in os.environ}},
        "results": results,
    }


def _table(report: dict) -> str:
    lines = ["| d | r | delta_svd | dense svd | dense svdvals | speedup vs svd | vs svdvals | max rel. diff |",
             "|---|---|---|---|---|---|---|---|"]
    for row in report["results"]:
        lines.append(f"| {row['d']} | {row['r']} | {row['delta_svd_s'] * 1e3:.3f} ms | {row['dense_svd_s']:.3f} s "
                     f"| {row['dense_svdvals_s']:.3f} s | {row['speedup_vs_svd']:,.0f}x "
                     f"| {row['speedup_vs_svdvals']:,.0f}x | {row['max_relative_difference']:.1e} |")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    parser.add_argument("--json", action="store_true", help="print the full result as JSON")
    args = parser.parse_args()
    report = run(quick=args.quick)
    print(json.dumps(report, indent=2) if args.json else _table(report))
