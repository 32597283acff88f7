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


# --------------------------------------------------------------------------------------------
# The BLAS thread count is the same after the pool has run as before (issue 18's leak: NumPy's
# bundled OpenBLAS treats openblas_set_num_threads_local as process-wide)
# --------------------------------------------------------------------------------------------


def _numpy_blas_count():
    lib = machine.numpy_openblas()
    count = None if lib is None else lib.get_threads()
    if count is None:
        pytest.skip("NumPy's BLAS thread count cannot be read here (no bundled OpenBLAS)")
    return lib


def test_single_threaded_blas_sets_one_thread_and_restores_nested_and_on_error():
    lib = _numpy_blas_count()
    with machine.blas_threads(2):                                 # a count other than 1 to come back to
        with machine.single_threaded_blas():
            assert lib.get_threads() == 1
            with machine.single_threaded_blas():                  # nested: still one, not restored early
                assert lib.get_threads() == 1
            assert lib.get_threads() == 1
        assert lib.get_threads() == 2
        with pytest.raises(RuntimeError, match="inside"), machine.single_threaded_blas():
            raise RuntimeError("inside")
        assert lib.get_threads() == 2


def test_worker_pool_runs_single_threaded_blas_and_gives_the_count_back():
    lib = _numpy_blas_count()
    if not machine.per_thread_blas():
        pytest.skip("no per-thread BLAS here: the pool is not used")
    with machine.blas_threads(2):
        pool = machine.worker_pool(2)
        seen = pool.map(lambda _: lib.get_threads(), range(4))
        assert seen == [1, 1, 1, 1]                               # inside the workers: one thread
        assert lib.get_threads() == 2                             # after: the count from before

        def fail(_):
            raise ValueError("a slice failed")

        with pytest.raises(ValueError, match="a slice failed"):
            pool.map(fail, range(2))
        assert lib.get_threads() == 2


class _FixedBatch:
    """A task whose every batch is the same random tokens (the benchmark's kind of task)."""

    def __init__(self, vocab, B, T):
        rng = np.random.default_rng(0)
        self.inputs = rng.integers(0, vocab, size=(B, T))        # (B, T)
        self.targets = rng.integers(0, vocab, size=(B, T))       # (B, T)

    def batch(self, batch_size, rng):
        return self.inputs[:batch_size], self.targets[:batch_size]


@pytest.mark.parametrize("threads", [None, 1, 2])
def test_numpy_blas_thread_count_is_unchanged_after_training_steps(threads):
    """The leak of issue 18: after a sharded step every later NumPy matmul of the process ran on
    one thread. train() must leave the count as it found it, whatever ``threads`` it is given."""
    from transformer_ref import GPTConfig, init_params, lora_config_for, train

    lib = _numpy_blas_count()
    config = GPTConfig(vocab_size=32, n_positions=8, n_embd=16, n_layer=1, n_head=2)
    params = init_params(config, 0, "float32")
    with machine.blas_threads(2):
        result = train(params, config, _FixedBatch(32, 4, 8), lora_config=lora_config_for(["q", "v"], r=2),
                       steps=2, batch_size=4, progress=False, threads=threads)
        assert len(result.losses) == 2
        assert lib.get_threads() == 2
