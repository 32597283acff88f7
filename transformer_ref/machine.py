"""The machine room: BLAS threads, core pinning and the allocator -- the only code that talks to the OS.

Nothing here computes or changes a number; it changes how fast (and on how many cores) NumPy's
arithmetic runs. The reference rooms (``layers``, ``gpt2``) never import it; ``fast`` (the
training-speed op set), ``train`` (the allocator setting), the demo and the benchmarks do.

* :func:`openblas_libraries` -- the one lookup of the OpenBLAS libraries in this process, and
  :func:`numpy_openblas`, the one NumPy's wheel bundles (what NumPy's ``@`` runs on);
* :func:`blas_threads` -- a ``with`` block inside which every BLAS of the process uses ``n`` threads;
* :func:`default_threads`, :func:`per_thread_blas`, :func:`worker_pool` -- the pool of pinned
  worker threads, each running single-threaded BLAS, that ``fast.sharded_value_and_grad`` uses,
  and :func:`single_threaded_blas`, which gives the process's BLAS thread count back after each use;
* :func:`keep_freed_memory` -- glibc's malloc keeps freed memory for the next training step
  (``train()`` calls it).

OpenBLAS has no portable Python interface, so its C API (thread counts, kernel name) is called
through ``ctypes`` (best effort: where no OpenBLAS is found, the functions say so and do nothing).
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import itertools
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np

from lora_ref.checks import positive_int

__all__ = ["OpenBLAS", "WorkerPool", "blas_threads", "default_threads", "keep_freed_memory", "numpy_openblas",
           "openblas_libraries", "per_thread_blas", "single_threaded_blas", "worker_pool"]


# ============================================================================================
# OpenBLAS: found once, by file name (NumPy's bundled copy) and in the process's memory map
# ============================================================================================

# The thread-count setters, in the order tried; each getter is the same name with get_ for set_.
# NumPy's and SciPy's wheels bundle OpenBLAS with prefixed symbols (scipy_openblas_..., with a
# 64_ suffix for the 64-bit-integer build NumPy uses); a system OpenBLAS has the plain names.
_SETTERS = ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
            "openblas_set_num_threads64_", "openblas_set_num_threads")


class OpenBLAS(NamedTuple):
    """One OpenBLAS library loaded in this process: its ``ctypes.CDLL`` and its real path."""

    lib: Any
    path: str

    def function(self, *names: str) -> Any:
        """The first of ``names`` this library exports (a ctypes function), or None."""
        for name in names:
            fn = getattr(self.lib, name, None)
            if fn is not None:
                return fn
        return None

    def _thread_functions(self) -> tuple[Any, Any] | None:
        """``(setter, getter)`` of the process-wide thread count, or None."""
        for name in _SETTERS:
            setter = self.function(name)
            getter = self.function(name.replace("set_num", "get_num"))
            if setter is not None and getter is not None:
                return setter, getter
        return None

    def get_threads(self) -> int | None:
        """The number of threads this OpenBLAS runs on, or None when it has no getter."""
        fns = self._thread_functions()
        return None if fns is None else int(fns[1]())

    def set_threads(self, n: int) -> bool:
        """Set the number of threads for the whole process; returns whether it could."""
        fns = self._thread_functions()
        if fns is not None:
            fns[0](ctypes.c_int(positive_int(n, "n", "BLAS threads")))
        return fns is not None

    def set_threads_local(self) -> Any:
        """``openblas_set_num_threads_local(int) -> int`` (OpenBLAS >= 0.3.27: the count for the
        calling thread; returns the previous one), or None when this OpenBLAS lacks it."""
        fn = self.function("openblas_set_num_threads_local")
        if fn is not None:
            fn.argtypes, fn.restype = (ctypes.c_int,), ctypes.c_int
        return fn

    def text(self, *names: str) -> str | None:
        """The string returned by the first of ``names`` it exports (e.g. ``openblas_get_corename``,
        the CPU kernel it chose), or None."""
        fn = self.function(*names)
        if fn is None:
            return None
        fn.restype = ctypes.c_char_p
        return fn().decode()


def _numpy_library_dirs() -> list[str]:
    """Where NumPy's wheel keeps its bundled libraries (``numpy.libs`` beside it; ``.libs`` inside
    it in older wheels), as real paths."""
    here = os.path.dirname(np.__file__)
    return [os.path.realpath(os.path.join(here, os.pardir, "numpy.libs")), os.path.realpath(os.path.join(here, ".libs"))]


def openblas_libraries() -> list[OpenBLAS]:
    """Every OpenBLAS library this process has loaded, NumPy's bundled copy first.

    The one place that locates OpenBLAS. NumPy's copy is found by file name in NumPy's wheel
    (any OS); the others (SciPy bundles its own) from ``/proc/self/maps`` where it exists
    (Linux). Opening an already loaded library returns the same handle: nothing is loaded twice.
    """
    paths = [path for root in _numpy_library_dirs() for path in sorted(glob.glob(os.path.join(root, "*openblas*.so*")))]
    try:
        with open("/proc/self/maps") as maps:     # lines: address perms offset dev inode [path]
            paths += sorted({line.split()[-1] for line in maps if "openblas" in line.lower() and "/" in line})
    except OSError:
        pass
    found: list[OpenBLAS] = []
    for path in dict.fromkeys(os.path.realpath(p) for p in paths):      # each library once, in order
        try:
            found.append(OpenBLAS(ctypes.CDLL(path), path))
        except OSError:
            continue
    return found


_NUMPY_OPENBLAS: list[OpenBLAS | None] = []   # [the library or None], looked up once


def numpy_openblas() -> OpenBLAS | None:
    """The OpenBLAS NumPy's wheel bundles (the BLAS behind NumPy's ``@``), looked up once; None
    when NumPy uses another BLAS or a build without a bundled copy."""
    if not _NUMPY_OPENBLAS:
        dirs = _numpy_library_dirs()
        _NUMPY_OPENBLAS.append(next((lib for lib in openblas_libraries() if os.path.dirname(lib.path) in dirs), None))
    return _NUMPY_OPENBLAS[0]


# ============================================================================================
# BLAS threads for a block of code
# ============================================================================================


@contextlib.contextmanager
def blas_threads(n: int | None) -> Iterator[str]:
    """Limit every BLAS library of this process to ``n`` threads inside the ``with`` block (None:
    leave them alone); yields a description of what was done. The previous counts are restored
    on exit, also when the block raises.

    threadpoolctl is used when installed; otherwise OpenBLAS's own setter in each library of
    :func:`openblas_libraries`. Float32 results can depend on the thread count (a matmul's sums
    are split differently), so code that promises the same numbers for a seed pins it here.
    """
    if n is None:
        yield "BLAS threads left as configured"
        return
    n = positive_int(n, "n", "the number of BLAS threads")
    try:
        import threadpoolctl
    except ImportError:
        threadpoolctl = None
    if threadpoolctl is not None:
        with threadpoolctl.threadpool_limits(limits=n, user_api="blas"):
            yield f"BLAS limited to {n} thread(s) (threadpoolctl)"
        return
    libs = [lib for lib in openblas_libraries() if lib.get_threads() is not None]
    before = [lib.get_threads() for lib in libs]
    for lib in libs:
        lib.set_threads(n)
    try:
        yield (f"OpenBLAS limited to {n} thread(s) ({len(libs)} librar{'y' if len(libs) == 1 else 'ies'})"
               if libs else "BLAS threads left as configured (no OpenBLAS found to limit)")
    finally:
        for lib, k in zip(libs, before):
            lib.set_threads(k)


# ============================================================================================
# The worker pool: one thread per core, each with single-threaded BLAS
# ============================================================================================
#
# OpenBLAS >= 0.3.27 has openblas_set_num_threads_local(n), meant to set the count for the calling
# thread only. In NumPy's bundled OpenBLAS (a pthreads build) it sets the count of the whole
# process -- measured: after a worker called it with 1, every later NumPy matmul of the process
# ran on one thread (a 2-core machine's float32 peak halved). So the pool sets one BLAS thread
# for the process while its workers run, and puts the previous count back when they are done
# (WorkerPool.map); a worker still calls the local setter on start, which is what a truly
# thread-local build needs. While a map runs, any other thread's BLAS also runs single-threaded.

_SET_LOCAL: list[Any] = []                 # [openblas_set_num_threads_local or None], looked up once
_POOLS: dict[int, WorkerPool] = {}         # thread count -> pool
_SINGLE = threading.Lock()                 # guards _HOLD: maps in flight, the count to restore
_HOLD: list[Any] = [0, None]


def _set_threads_local() -> Any:
    if not _SET_LOCAL:
        lib = numpy_openblas()
        _SET_LOCAL.append(lib.set_threads_local() if lib is not None else None)
    return _SET_LOCAL[0]


def per_thread_blas() -> bool:
    """Whether NumPy's BLAS can be told to run single-threaded in one worker thread (NumPy's
    bundled OpenBLAS >= 0.3.27); without it, workers running multi-threaded BLAS side by side
    would fight over the cores, so :func:`default_threads` is 1."""
    return _set_threads_local() is not None


def default_threads() -> int:
    """How many batch slices ``fast.sharded_value_and_grad`` computes at once by default: the
    cores this process may run on, or 1 when :func:`per_thread_blas` is False."""
    if not per_thread_blas():
        return 1
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    """NumPy's OpenBLAS on one thread, for the whole process, inside the ``with`` block; the count
    it had before is put back on exit (also when the block raises). Blocks may nest and overlap
    across threads: the count is set when the first enters and restored when the last leaves.
    Nothing happens where NumPy has no bundled OpenBLAS."""
    lib = numpy_openblas()
    if lib is None or lib.get_threads() is None:
        yield
        return
    with _SINGLE:
        if _HOLD[0] == 0:
            _HOLD[1] = lib.get_threads()
            lib.set_threads(1)
        _HOLD[0] += 1
    try:
        yield
    finally:
        with _SINGLE:
            _HOLD[0] -= 1
            if _HOLD[0] == 0:
                lib.set_threads(_HOLD[1])


class WorkerPool:
    """``threads`` worker threads, each with single-threaded BLAS and, where the OS allows, pinned
    to its own core of those this process may use (made by :func:`worker_pool`)."""

    def __init__(self, threads: int, executor: ThreadPoolExecutor) -> None:
        self.threads = threads
        self._executor = executor

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]:
        """``[fn(item) for item in items]``, the calls spread over the workers; returns when all
        are done. NumPy's BLAS runs on one thread for the process meanwhile, and on as many as
        before once this returns (:func:`single_threaded_blas`)."""
        with single_threaded_blas():
            return list(self._executor.map(fn, items))


def worker_pool(threads: int) -> WorkerPool:
    """A pool of ``threads`` worker threads (made once per count, then reused), each with
    single-threaded BLAS and, where the OS allows, pinned to its own core of those this process
    may use. Needs :func:`per_thread_blas`.

    Pinning: unpinned, two workers woken after the cores have idled for a fraction of a second
    were measured (2-core VM) to stay on one core for the whole step -- the step then took as long
    as on one thread -- while back-to-back steps ran at the same speed pinned or not.
    """
    threads = positive_int(threads, "threads", "worker threads")
    set_local = _set_threads_local()
    if set_local is None:
        raise RuntimeError("worker_pool needs NumPy's bundled OpenBLAS >= 0.3.27 (per_thread_blas() is False)")
    if threads not in _POOLS:
        cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        numbers = itertools.count()

        def init() -> None:
            # runs in the new worker, always inside WorkerPool.map (threads start on submit),
            # so in a build where this call is process-wide the count is restored with the map's
            set_local(1)
            k = next(numbers)                            # 0, 1, ...: next() is atomic under the GIL
            if len(cores) >= threads:
                os.sched_setaffinity(0, {cores[k % len(cores)]})   # 0: the calling thread on Linux

        _POOLS[threads] = WorkerPool(threads, ThreadPoolExecutor(threads, thread_name_prefix="transformer_ref-slice",
                                                                 initializer=init))
    return _POOLS[threads]


# ============================================================================================
# Memory reuse: a training step allocates the same large temporaries every time
# ============================================================================================


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse; returns whether it applied.

    Array code allocates its temporaries afresh on every step. By default glibc serves
    allocations above a (dynamically raised) threshold with ``mmap`` and returns freed memory at
    the top of the heap to the operating system, so the same megabytes are page-faulted back in,
    and zeroed by the kernel, step after step; for elementwise layers (GELU's backward, LayerNorm)
    that costs more than the arithmetic. This sets ``M_MMAP_THRESHOLD`` to 32 MiB and
    ``M_TRIM_THRESHOLD`` to 1 GiB (the ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``
    environment variables do the same at start-up). The price: the process keeps its peak heap
    until it exits. Process-wide; :func:`transformer_ref.train` calls it, so the step users
    run is the step the benchmarks time. A no-op returning False where there is
    no glibc. Nothing numerical changes.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3          # glibc's <malloc.h>
    return bool(mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))
