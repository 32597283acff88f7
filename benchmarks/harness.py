"""Timing, machine facts and BLAS thread control for the benchmarks.

Timing rules (they are what makes a ratio between two libraries on a shared, noisy machine
meaningful):

* every figure is the **median** of several runs, after warm-up runs that are not counted;
* a comparison runs its sides **alternately in one process** (round ``i`` runs every side once,
  the order rotated each round so no side always goes first), and a ratio is the median of the
  per-round ratios, so slow drift of the machine (other processes, clock changes) cancels;
* Python's garbage collector runs before each timed call and is off during it (as ``timeit``
  does): with PyTorch and transformers loaded, a full collection walks millions of objects
  (~0.2 s here) and would land in whichever call happened to cross its threshold.
"""

from __future__ import annotations

import gc
import importlib.metadata
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from transformer_ref.machine import numpy_openblas

__all__ = [
    "alternate",
    "blas_threads",
    "machine_info",
    "matmul_peak",
    "numpy_blas_threads",
    "paired_ratio",
    "set_numpy_blas_threads",
    "summarize",
]


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def alternate(fns: Mapping[str, Callable[[], Any]], *, repeats: int, warmup: int = 1,
              pause: float = 0.0) -> dict[str, list[float]]:
    """Time each callable ``repeats`` times, round-robin, after ``warmup`` untimed rounds.

    Returns ``{name: [seconds per run]}``; run ``i`` of every name belongs to round ``i``, so
    :func:`paired_ratio` can divide them round by round. ``pause`` seconds of sleep before each
    timed call lets the previous library's idle worker threads (OpenBLAS, OpenMP) stop spinning
    before the next one starts, so neither side pays for the other's spin-down.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    enabled = gc.isenabled()
    try:
        for i in range(repeats):
            k = i % len(names)
            for name in names[k:] + names[:k]:             # rotate the order each round
                gc.enable()
                gc.collect()
                if pause:
                    time.sleep(pause)
                gc.disable()
                t0 = time.perf_counter()
                fns[name]()
                times[name].append(time.perf_counter() - t0)
    finally:
        if enabled:
            gc.enable()
    return times


def summarize(seconds: list[float]) -> dict[str, Any]:
    """Median, min, max and every run of a list of timings (seconds)."""
    return {"median_s": statistics.median(seconds), "min_s": min(seconds), "max_s": max(seconds),
            "runs_s": [round(s, 6) for s in seconds]}


def paired_ratio(a: list[float], b: list[float]) -> dict[str, Any]:
    """``a / b``: the median of the per-round ratios, with their spread and the ratio of medians."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired_ratio needs two equally long, non-empty lists; got {len(a)} and {len(b)}")
    ratios = sorted(x / y for x, y in zip(a, b))
    return {"median": statistics.median(ratios), "min": ratios[0], "max": ratios[-1],
            "ratio_of_medians": statistics.median(a) / statistics.median(b)}


# --------------------------------------------------------------------------------------------
# OpenBLAS (NumPy's BLAS): found by transformer_ref.machine, the one place that looks it up
# --------------------------------------------------------------------------------------------

OPENBLAS = numpy_openblas()     # transformer_ref.machine.OpenBLAS, or None when NumPy uses another BLAS


def numpy_blas_threads() -> int | None:
    """NumPy's OpenBLAS thread count, or None when there is no OpenBLAS to ask."""
    return OPENBLAS.get_threads() if OPENBLAS is not None else None


def set_numpy_blas_threads(n: int) -> None:
    """Set NumPy's OpenBLAS thread count (process-wide); nothing when there is no OpenBLAS."""
    if OPENBLAS is not None:
        OPENBLAS.set_threads(n)


def _openblas_text(*names: str) -> str | None:
    return OPENBLAS.text(*names) if OPENBLAS is not None else None


def blas_threads() -> dict[str, Any]:
    """Thread counts of every library that computes: NumPy's OpenBLAS, PyTorch (if imported)."""
    out: dict[str, Any] = {"numpy_openblas": numpy_blas_threads()}
    torch = sys.modules.get("torch")
    if torch is not None:
        out["torch_intra_op"] = torch.get_num_threads()
        out["torch_inter_op"] = torch.get_num_interop_threads()
    return out


# --------------------------------------------------------------------------------------------
# Machine facts
# --------------------------------------------------------------------------------------------

_PACKAGES = ("numpy", "scipy", "autograd", "array-api-compat", "array-api-strict", "torch",
             "transformers", "peft", "matplotlib", "lora-ref")
_ENV = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
        "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "LORA_REF_BACKEND")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """Machine, library versions, thread counts and the environment variables that change speed."""
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    try:
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        mem_gib = None
    torch = sys.modules.get("torch")
    return {
        "cpu": _cpu_model(),
        "machine": platform.machine(),
        "system": f"{platform.system()} {platform.release()}",
        "logical_cpus": os.cpu_count(),
        "usable_cpus": affinity,
        "memory_gib": mem_gib,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": sys.version.split()[0],
        "versions": versions,
        "threads": blas_threads(),
        "numpy_blas": {"library": getattr(OPENBLAS, "path", None),
                       "kernel": _openblas_text("scipy_openblas_get_corename64_", "openblas_get_corename"),
                       "config": _openblas_text("scipy_openblas_get_config64_", "openblas_get_config")},
        "torch_blas": (torch.__config__.parallel_info().splitlines()[-1].strip()
                       if torch is not None else None),
        "environment": {name: os.environ.get(name) for name in _ENV},
    }


# --------------------------------------------------------------------------------------------
# The machine's float32 matmul peak
# --------------------------------------------------------------------------------------------


def matmul_peak(sizes: tuple[int, ...] = (512, 1024, 2048), repeats: int = 5,
                with_torch: bool = True) -> dict[str, Any]:
    """Float32 GFLOP/s of square ``n x n @ n x n`` products (``2 n^3`` FLOPs), median of
    ``repeats`` runs per size, with NumPy and (if ``with_torch`` and importable) PyTorch, all
    threads of this process.

    ``peak_gflops`` is the largest of these medians: the machine's single-process float32
    matmul limit as the libraries at hand reach it.
    """
    rng = np.random.default_rng(0)
    libs: dict[str, dict[str, float]] = {"numpy": {}}
    torch = None
    if with_torch:
        try:
            import torch
        except ImportError:
            pass
    if torch is not None:
        libs["torch"] = {}
    for n in sizes:
        a = rng.standard_normal((n, n), dtype=np.float32)
        b = rng.standard_normal((n, n), dtype=np.float32)
        fns: dict[str, Callable[[], Any]] = {"numpy": lambda a=a, b=b: a @ b}
        if torch is not None:
            ta, tb = torch.from_numpy(a), torch.from_numpy(b)
            fns["torch"] = lambda ta=ta, tb=tb: ta @ tb
        times = alternate(fns, repeats=repeats, warmup=1)
        for name, ts in times.items():
            libs[name][str(n)] = 2.0 * n**3 / statistics.median(ts) / 1e9
    best = max((g, lib, n) for lib, per in libs.items() for n, g in per.items())
    return {"gflops": libs, "peak_gflops": best[0], "peak_from": f"{best[1]} n={best[2]}",
            "formula": "2 n^3 FLOPs per n x n @ n x n product, float32"}
