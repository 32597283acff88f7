"""Timing, machine facts, BLAS thread counts and the matmul peak for the benchmarks.

Timing rules (they are what makes a ratio between two libraries on any CPU meaningful):

* **each library in its own process.** A comparison between libraries never runs them in one
  interpreter: OpenBLAS's worker threads keep spinning after NumPy's work and slowed the PyTorch
  step that followed, and a thread count one library sets can be process-wide. Every side of a
  comparison is a fresh ``python -m benchmarks.worker`` (benchmarks/rounds.py runs them);
* **rounds in rotating order.** Round ``i`` runs every side once, the order rotated each round so
  no side always goes first; a ratio is the **median of the per-round ratios** (each side's
  median step of that round), shown with their min and max, so slow drift of the machine cancels;
* every figure is a **median** of several runs after warm-up runs that are not counted;
* within one process (the matmul peak, the lora-ref-only measurements), :func:`alternate` times
  its callables round-robin in rotating order, with Python's garbage collector run before each
  timed call and off during it (as ``timeit`` does).
"""

from __future__ import annotations

import gc
import importlib.metadata
import os
import platform
import re
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
    "cpu_kind",
    "cpu_model",
    "machine_info",
    "matmul_peak",
    "numpy_blas_info",
    "numpy_blas_threads",
    "paired_ratio",
    "set_numpy_blas_threads",
    "summarize",
    "torch_info",
]


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def alternate(fns: Mapping[str, Callable[[], Any]], *, repeats: int, warmup: int = 1,
              pause: float = 0.0, clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Time each callable ``repeats`` times, round-robin, after ``warmup`` untimed rounds.

    Returns ``{name: [seconds per run]}``; run ``i`` of every name belongs to round ``i``, so
    :func:`paired_ratio` can divide them round by round. ``pause`` seconds of sleep before each
    timed call lets the previous library's idle worker threads (OpenBLAS, OpenMP) stop spinning
    before the next one starts, so neither side pays for the other's spin-down. ``clock`` reads
    seconds: wall time by default, ``time.thread_time`` for this thread's CPU time.
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
                t0 = clock()
                fns[name]()
                times[name].append(clock() - t0)
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


def cpu_model() -> str:
    """The CPU's model name (Linux: ``/proc/cpuinfo``'s first ``model name``), else what
    :mod:`platform` says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


_NOT_A_KIND = {"cpu", "processor", "genuine", "authentic"}


def cpu_kind(model: str | None = None) -> str:
    """A short, file-name-safe name for a kind of CPU: vendor and family from the model name
    (``"Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz"`` -> ``"intel-xeon"``, ``"AMD EPYC 7B13"``
    -> ``"amd-epyc"``), ``"cpu-<architecture>"`` when the name gives neither. Results are kept per
    kind (``benchmarks/results/<kind>.json``): the last run on each kind of machine."""
    model = cpu_model() if model is None else model
    text = re.sub(r"\((?:r|tm|c)\)", " ", model.lower())          # Intel(R) Xeon(R) -> intel xeon
    words = [w for w in re.findall(r"(?<![a-z0-9])[a-z][a-z0-9]*", text) if w not in _NOT_A_KIND]
    if not words:
        return f"cpu-{re.sub(r'[^a-z0-9_]+', '', platform.machine().lower()) or 'unknown'}"
    return "-".join(words[:2])


def machine_info() -> dict[str, Any]:
    """Machine, library versions, NumPy's BLAS (its CPU kernel) and the environment variables
    that change speed. It asks, it computes nothing (safe in the runner's own process)."""
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
    model = cpu_model()
    return {
        "cpu": model,
        "cpu_kind": cpu_kind(model),
        "machine": platform.machine(),
        "system": f"{platform.system()} {platform.release()}",
        "logical_cpus": os.cpu_count(),
        "usable_cpus": affinity,
        "memory_gib": mem_gib,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": sys.version.split()[0],
        "versions": versions,
        "numpy_blas": numpy_blas_info(),
        "environment": {name: os.environ.get(name) for name in _ENV},
    }


def numpy_blas_info() -> dict[str, Any]:
    """NumPy's BLAS: the library, the CPU kernel OpenBLAS chose (its corename, e.g. SkylakeX,
    Haswell, Zen), its build configuration and thread count."""
    return {"library": getattr(OPENBLAS, "path", None),
            "kernel": _openblas_text("scipy_openblas_get_corename64_", "openblas_get_corename"),
            "config": _openblas_text("scipy_openblas_get_config64_", "openblas_get_config"),
            "threads": numpy_blas_threads()}


def torch_info() -> dict[str, Any] | None:
    """PyTorch's threads, the CPU instruction set its kernels use and its BLAS, if it is imported."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    return {"threads": blas_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "blas": next(iter(re.findall(r"BLAS_INFO=(\w+)", torch.__config__.show())), None),
            "parallel": torch.__config__.parallel_info().splitlines()[-1].strip()}


# --------------------------------------------------------------------------------------------
# The machine's float32 matmul peak
# --------------------------------------------------------------------------------------------


def matmul_peak(lib: str = "numpy", sizes: tuple[int, ...] = (512, 1024, 2048), repeats: int = 5, *,
                clock: Callable[[], float] = time.perf_counter) -> dict[str, Any]:
    """Float32 GFLOP/s of square ``n x n @ n x n`` products (``2 n^3`` FLOPs) with ``lib``
    ("numpy" or "torch"), median of ``repeats`` runs per size timed by ``clock`` (see
    :func:`alternate`), on every BLAS thread this process has. Run it in a process of its own
    (``python -m benchmarks.worker peak``): the other library's threads must not be there.
    ``peak_gflops`` is the largest of the medians."""
    if lib not in ("numpy", "torch"):
        raise ValueError(f"lib must be 'numpy' or 'torch', got {lib!r}")
    rng = np.random.default_rng(0)
    per: dict[str, float] = {}
    for n in sizes:
        a = rng.standard_normal((n, n), dtype=np.float32)
        b = rng.standard_normal((n, n), dtype=np.float32)
        if lib == "torch":
            import torch

            ta, tb = torch.from_numpy(a), torch.from_numpy(b)
            fn: Callable[[], Any] = lambda ta=ta, tb=tb: ta @ tb  # noqa: E731
        else:
            fn = lambda a=a, b=b: a @ b  # noqa: E731
        (times,) = alternate({lib: fn}, repeats=repeats, warmup=1, clock=clock).values()
        per[str(n)] = 2.0 * n**3 / statistics.median(times) / 1e9
    best = max(per, key=per.__getitem__)
    return {"lib": lib, "gflops": per, "peak_gflops": per[best], "peak_from": f"{lib} n={best}",
            "formula": "2 n^3 FLOPs per n x n @ n x n product, float32"}
