"""transformer_ref.machine: the one OpenBLAS lookup, BLAS threads for a block, the worker pool."""

from __future__ import annotations

import os

import numpy as np
import pytest

from transformer_ref import machine


def test_numpy_openblas_is_numpys_bundled_library_found_once():
    found = machine.numpy_openblas()
    assert machine.numpy_openblas() is found                      # looked up once
    if found is None:
        pytest.skip("NumPy does not bundle OpenBLAS here")
    assert "openblas" in os.path.basename(found.path).lower()
    assert os.path.dirname(found.path) in [os.path.realpath(os.path.join(os.path.dirname(np.__file__), *p))
                                           for p in ((os.pardir, "numpy.libs"), (".libs",))]
    lib, path = found                                             # still unpacks as (CDLL, path)
    assert path == found.path and lib is found.lib
    assert found.path in [lib.path for lib in machine.openblas_libraries()]   # the same single lookup


def test_openblas_libraries_are_distinct_real_paths():
    paths = [lib.path for lib in machine.openblas_libraries()]
    assert len(paths) == len(set(paths))
    assert all(os.path.realpath(p) == p for p in paths)


def test_blas_threads_sets_and_restores_every_library():
    with machine.blas_threads(None) as how:
        assert "left as configured" in how
    libs = [lib for lib in machine.openblas_libraries() if lib.get_threads() is not None]
    if not libs:
        pytest.skip("no OpenBLAS library found in this process")
    before = [lib.get_threads() for lib in libs]
    with machine.blas_threads(1) as how:
        assert [lib.get_threads() for lib in libs] == [1] * len(libs)
        assert "limited to 1 thread" in how
    assert [lib.get_threads() for lib in libs] == before
    with pytest.raises(RuntimeError), machine.blas_threads(1):    # restored when the block raises too
        raise RuntimeError("inside")
    assert [lib.get_threads() for lib in libs] == before


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_blas_threads_refuses_a_bad_count(bad):
    with pytest.raises((TypeError, ValueError), match="n must be a positive int"), machine.blas_threads(bad):
        pass


def test_default_threads_and_pool():
    n = machine.default_threads()
    assert isinstance(n, int) and n >= 1
    if not machine.per_thread_blas():
        assert n == 1
        with pytest.raises(RuntimeError, match="per_thread_blas"):
            machine.worker_pool(2)
        return
    pool = machine.worker_pool(2)
    assert machine.worker_pool(2) is pool                       # made once per count
    assert sorted(pool.map(lambda k: k * k, range(4))) == [0, 1, 4, 9]
    with pytest.raises(ValueError, match="threads must be a positive int"):
        machine.worker_pool(0)


def test_keep_freed_memory_reports_whether_it_applied():
    assert isinstance(machine.keep_freed_memory(), bool)
