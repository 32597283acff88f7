"""Training: Adam over any (nested) dict of arrays, and a loop for LoRA or full fine-tuning.

LoRA (``mode="lora"``): the gradient is taken with respect to the adapters alone; the pretrained
``params`` are closed over, so autograd never asks for, and never computes, a frozen weight's
gradient (the projection's W-VJP is simply not called). Full fine-tuning (``mode="full"``)
differentiates every parameter. Both are deterministic for a seed (and a thread count).

Each step's loss and gradient are computed on one slice of the batch per core, in parallel
(:func:`sharded_value_and_grad`), when the batch is large enough to gain from it.

Run ``python -m transformer_ref.train --bench`` to time one LoRA training step; the benchmarks
against PyTorch are in ``benchmarks/`` (docs/performance.md).
"""

from __future__ import annotations

import argparse
import math
import numbers
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from autograd import value_and_grad
from tqdm.auto import tqdm

from lora_ref.backend import asarray, dtype_name, getval, namespace, numpy_openblas
from lora_ref.lora import LoraConfig, dropout_mask

from .config import GPTConfig
from .model import add_adapters, loss

__all__ = ["AdamState", "TrainResult", "adam_init", "adam_update", "auto_threads", "default_threads",
           "keep_freed_memory", "sharded_value_and_grad", "train"]


# ============================================================================================
# Adam (Kingma & Ba 2015, Algorithm 1), with optional decoupled weight decay (AdamW)
# ============================================================================================


@dataclass(frozen=True)
class AdamState:
    """Adam's moments, shaped like the parameters, and the number of steps taken."""

    step: int
    m: Any
    v: Any


def _tree_map(f: Callable[..., Any], tree: Any, *rest: Any) -> Any:
    """Apply ``f`` leaf-wise over nested dicts of arrays (all trees share ``tree``'s keys)."""
    if isinstance(tree, Mapping):
        return {k: _tree_map(f, tree[k], *(r[k] for r in rest)) for k in tree}
    return f(tree, *rest)


def adam_init(tree: Any) -> AdamState:
    """Zero moments for a (nested) dict of arrays."""
    zeros = _tree_map(lambda p: namespace(p).zeros(p.shape, dtype=p.dtype), tree)
    return AdamState(0, zeros, _tree_map(lambda p: namespace(p).zeros(p.shape, dtype=p.dtype), tree))


def adam_update(tree: Any, grads: Any, state: AdamState, *, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                eps: float = 1e-8, weight_decay: float = 0.0) -> tuple[Any, AdamState]:
    """One Adam step; returns ``(new_tree, new_state)`` (new arrays, nothing modified in place).

        m = b1 m + (1 - b1) g            v = b2 v + (1 - b2) g^2
        m_hat = m / (1 - b1^t)           v_hat = v / (1 - b2^t)            (bias correction)
        p = p - lr (m_hat / (sqrt(v_hat) + eps) + weight_decay p)         (AdamW when decay > 0)

    The constants are Python floats, so float32 parameters stay float32.
    """
    b1, b2 = (float(b) for b in betas)
    lr, eps, wd = float(lr), float(eps), float(weight_decay)
    t = state.step + 1
    c1, c2 = 1.0 - b1 ** t, 1.0 - b2 ** t

    def leaf(p, g, m, v):
        xp = namespace(p)
        m = b1 * m + (1.0 - b1) * g
        v = b2 * v + (1.0 - b2) * (g * g)
        update = (m / c1) / (xp.sqrt(v / c2) + eps)
        if wd:
            update = update + wd * p
        return p - lr * update, m, v

    out = _tree_map(leaf, tree, grads, state.m, state.v)               # leaves: (p, m, v)
    return _tree_map_tuple(out, 0), AdamState(t, _tree_map_tuple(out, 1), _tree_map_tuple(out, 2))


def _tree_map_tuple(tree: Any, i: int) -> Any:
    """Pick element ``i`` of each leaf tuple of a nested dict."""
    if isinstance(tree, Mapping):
        return {k: _tree_map_tuple(v, i) for k, v in tree.items()}
    return tree[i]


# ============================================================================================
# One step's loss and gradient, on every core: the batch split into row slices
# ============================================================================================
#
# NumPy runs elementwise work (GELU, LayerNorm, softmax) on one core, and multi-threaded BLAS
# pays a thread synchronisation on every matmul -- hundreds per step, most of them small (the
# attention's per-head products), and each a stall when another process holds the other core.
# Splitting the batch into slices, one per core, each slice's forward and backward in its own
# Python thread with single-threaded BLAS, uses every core for every layer and synchronises once
# per step. NumPy releases the GIL inside ufuncs and BLAS, so the threads truly overlap.
#
# The loss is a mean over kept targets, so with n_i kept targets in slice i and n = sum n_i:
#     loss = sum_i (n_i / n) loss_i,      dloss/dtheta = sum_i (n_i / n) dloss_i/dtheta.
# The same numbers up to rounding (tests/transformer/test_speed_paths.py holds them to the
# unsplit computation), and deterministic: the slices and the order of the sum are fixed.


def _find_openblas_local() -> Callable[[int], int] | None:
    """``openblas_set_num_threads_local`` of the OpenBLAS that NumPy's wheel bundles (OpenBLAS
    >= 0.3.27: a BLAS thread count for the calling thread only), or None when there is none."""
    import ctypes

    found = numpy_openblas()
    fn = getattr(found[0], "openblas_set_num_threads_local", None) if found else None
    if fn is not None:
        fn.argtypes, fn.restype = (ctypes.c_int,), ctypes.c_int
    return fn


_OPENBLAS_LOCAL: list[Any] = []          # [function or None], looked up once
_POOLS: dict[int, Any] = {}               # thread count -> ThreadPoolExecutor


def _blas_local() -> Callable[[int], int] | None:
    if not _OPENBLAS_LOCAL:
        _OPENBLAS_LOCAL.append(_find_openblas_local())
    return _OPENBLAS_LOCAL[0]


def default_threads() -> int:
    """How many slices :func:`sharded_value_and_grad` uses by default: the cores this process may
    run on, or 1 when NumPy's BLAS cannot be told to use one thread per slice (two slices each
    running multi-threaded BLAS would fight over the cores)."""
    import os

    if _blas_local() is None:
        return 1
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def auto_threads(config: GPTConfig, batch_shape: tuple[int, int]) -> int:
    """The slices :func:`train` uses by default (``threads=None``) for batches of ``batch_shape``.

    Every core (:func:`default_threads`) when each slice's forward is worth at least 0.2 GFLOP
    (24 n_layer n_embd^2 per token), else 1: handing work to threads costs 1-3 ms a step, which
    was measured (2 cores) to outweigh the gain below about that size -- e.g. a 128-wide, 4-layer
    model gained 15% at 256 tokens a step and lost 16% at 128.
    """
    B, T = (int(v) for v in batch_shape)
    n = default_threads()
    per_slice = 24.0 * config.n_layer * config.n_embd ** 2 * B * T / n
    return n if n > 1 and per_slice >= 2e8 else 1


def _pool(threads: int) -> Any:
    """A pool of ``threads`` worker threads, each with single-threaded BLAS and, where the OS
    allows, pinned to its own core of those this process may use.

    Pinning: unpinned, two workers woken after the cores have idled for a fraction of a second
    were measured (2-core VM) to stay on one core for the whole step -- the step then took as long
    as on one thread -- while back-to-back steps ran at the same speed pinned or not.
    """
    import itertools
    import os
    from concurrent.futures import ThreadPoolExecutor

    if threads not in _POOLS:
        set_local = _blas_local()
        cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        numbers_ = itertools.count()

        def init() -> None:
            set_local(1)
            k = next(numbers_)                           # 0, 1, ...: next() is atomic under the GIL
            if len(cores) >= threads:
                os.sched_setaffinity(0, {cores[k % len(cores)]})   # 0: the calling thread on Linux

        _POOLS[threads] = ThreadPoolExecutor(threads, thread_name_prefix="transformer_ref-slice", initializer=init)
    return _POOLS[threads]


def sharded_value_and_grad(objective: Callable[..., Any], threads: int | None = None) -> Callable[..., Any]:
    """``autograd.value_and_grad(objective)``, computed on ``threads`` slices of the batch at once.

    ``objective(tree, inputs, targets, masks)`` must be a mean over the kept targets (those not
    equal to ``layers.IGNORE_INDEX``) of per-position losses, as :func:`~transformer_ref.loss` is;
    ``inputs`` and ``targets`` are (B, T) arrays; ``masks`` is None or a dict of dropout masks,
    each (B, T, d_in) or broadcasting over the batch. Returns ``f(tree, inputs, targets, masks)
    -> (value, grads)`` with the gradient with respect to ``tree``.

    ``threads``: None for :func:`default_threads`; 1 (or a batch of one row, or arrays that are
    not NumPy's: CuPy and array_api_strict have their own parallelism) computes it in one piece.
    """
    whole = value_and_grad(objective)
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, numbers.Integral) or threads < 1):
        raise ValueError(f"threads must be a positive int or None, got {threads!r}")

    def f(tree: Any, inputs: Any, targets: Any, masks: Any = None) -> tuple[Any, Any]:
        n_threads = default_threads() if threads is None else int(threads)
        t = getval(targets)
        n_slices = min(n_threads, int(t.shape[0]))
        if n_slices < 2 or not isinstance(t, np.ndarray) or not isinstance(getval(inputs), np.ndarray) \
                or _blas_local() is None:
            return whole(tree, inputs, targets, masks)
        from autograd.tracer import trace_stack

        from .layers import IGNORE_INDEX

        bounds = np.linspace(0, t.shape[0], n_slices + 1).astype(int)          # row slices [b0, b1)
        rows = [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]
        kept = [int(np.sum(t[r] != IGNORE_INDEX)) for r in rows]
        total = sum(kept)
        if total == 0:
            return whole(tree, inputs, targets, masks)   # raises loss's own "every position ignored" error
        jobs = [(r, k) for r, k in zip(rows, kept) if k > 0]   # a slice with nothing to score adds nothing

        def part(r: slice) -> tuple[Any, Any]:
            # a mask with a batch axis (B, T, d_in) is sliced with the batch; one that broadcasts
            # over the batch ((1, T, d_in), (T, d_in), (d_in,)) applies to every slice as it is
            sliced = None if masks is None else {
                name: (m[r] if m.ndim == 3 and m.shape[0] == t.shape[0] else m) for name, m in masks.items()}
            return whole(tree, inputs[r], targets[r], sliced)

        top = trace_stack.top
        try:
            results = list(_pool(n_slices).map(part, [r for r, _ in jobs]))
        finally:
            # autograd numbers its traces with one unlocked counter (trace_stack.top += 1 on entry,
            # -= 1 on exit). Each thread's trace only ever meets its own boxes, so a shared number
            # is harmless, but a race could leave the counter off by one; every slice is finished
            # here, so put it back where it was.
            trace_stack.top = top
        weights = [k / total for _, k in jobs]                                   # n_i / n, Python floats
        value = sum(w * v for w, (v, _) in zip(weights, results))
        grads = _tree_map(lambda *gs: sum(w * g for w, g in zip(weights, gs)), *[g for _, g in results])
        return value, grads

    return f


# ============================================================================================
# The training loop
# ============================================================================================


@dataclass
class TrainResult:
    """What :func:`train` returns: the trained parameters, the adapters (None for full
    fine-tuning) and the loss before each step's update (a list of Python floats)."""

    params: dict[str, Any]
    adapters: dict[str, dict[str, Any]] | None
    losses: list[float]


def train(params: Mapping[str, Any], config: GPTConfig, task: Any, *, mode: str = "lora",
          lora_config: LoraConfig | None = None, adapters: Mapping[str, Any] | None = None,
          steps: int = 100, batch_size: int = 16, lr: float = 1e-3, seed: int = 0,
          betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
          progress: bool | None = None, threads: int | None = None) -> TrainResult:
    """Fine-tune with Adam: LoRA (adapters only, base frozen) or full (every parameter).

    Parameters
    ----------
    params : dict of arrays
        The model (e.g. pretrained); never modified.
    task : object with ``batch(batch_size, rng) -> (inputs, targets)``
        Integer NumPy arrays (B, T); targets of -100 are not scored (see ``transformer_ref.data``).
    mode : "lora" or "full"
        LoRA needs ``lora_config``; its adapters are ``adapters`` if given, else fresh ones from
        :func:`~transformer_ref.add_adapters`. With ``lora_config.dropout > 0`` each step draws
        inverted-dropout masks for the adapter inputs. Full fine-tuning takes no adapters.
    steps, batch_size, lr, betas, eps, weight_decay :
        The loop's length and Adam's settings.
    seed : int
        Seeds one ``numpy.random.Generator`` that draws, in order, the fresh adapters (if any),
        then each step's batch and dropout masks: the run is a function of its arguments.
    progress : bool or None
        Show a tqdm progress bar; None shows it only when stderr is a terminal.
    threads : int or None
        Each step's loss and gradient are computed on this many slices of the batch at once, one
        per core (:func:`sharded_value_and_grad`); None: :func:`auto_threads` (every core when the
        batch is large enough to gain from it, else 1). The result is the same up to rounding; for
        a given ``threads`` it is deterministic.

    Returns a :class:`TrainResult` (``losses[k]`` is the loss at step k, before its update).
    """
    if mode not in ("lora", "full"):
        raise ValueError(f"mode must be 'lora' or 'full', got {mode!r}")
    if not hasattr(task, "batch"):
        raise TypeError(f"task must have a batch(batch_size, rng) method, got {type(task).__name__}")
    for name, value in (("steps", steps), ("batch_size", batch_size), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < (0 if name != "batch_size" else 1):
            raise ValueError(f"{name} must be a {'positive' if name == 'batch_size' else 'non-negative'} int, got {value!r}")
    if not (isinstance(lr, numbers.Real) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, numbers.Integral) or threads < 1):
        raise ValueError(f"threads must be a positive int or None, got {threads!r}")
    rng = np.random.default_rng(seed)
    params = dict(params)
    if mode == "lora":
        if not isinstance(lora_config, LoraConfig):
            raise TypeError(f"mode='lora' needs lora_config, a lora_ref.LoraConfig; got {type(lora_config).__name__}")
        trainable = add_adapters(params, config, lora_config, rng) if adapters is None else \
            {k: dict(v) for k, v in adapters.items()}
    else:
        if adapters is not None:
            raise ValueError("mode='full' trains params only; merge the adapters first (merge_adapters)")
        trainable = params
    dtype = dtype_name(getval(params["transformer.wte.weight"]).dtype)

    def objective(tree, inputs, targets, masks):
        if mode == "lora":
            return loss(params, inputs, targets, config, tree, lora_config, masks)
        return loss(tree, inputs, targets, config)

    step_fn = None
    state = adam_init(trainable)
    losses: list[float] = []
    show = sys.stderr.isatty() if progress is None else bool(progress)
    bar = tqdm(range(steps), desc=f"{mode} fine-tuning", disable=not show, leave=False)
    for _ in bar:
        inputs, targets = task.batch(batch_size, rng)
        masks = None
        if mode == "lora" and lora_config.dropout > 0.0:
            masks = {name: dropout_mask(inputs.shape + (params[name + ".weight"].shape[1],), lora_config.dropout,
                                        rng, dtype) for name in trainable}
        if step_fn is None:                               # the first batch's shape decides the slicing
            step_fn = sharded_value_and_grad(objective, auto_threads(config, inputs.shape) if threads is None
                                             else threads)
        value, grads = step_fn(trainable, asarray(inputs), asarray(targets), masks)
        trainable, state = adam_update(trainable, grads, state, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        losses.append(float(value))
        bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
    if mode == "lora":
        return TrainResult(params, trainable, losses)
    return TrainResult(trainable, None, losses)


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
    until it exits. Process-wide, opt-in, and a no-op returning False where there is no glibc.
    Nothing numerical changes.
    """
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3          # glibc's <malloc.h>
    return bool(mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))


# ============================================================================================
# python -m transformer_ref.train --bench: milliseconds per LoRA training step
# ============================================================================================


def _bench(argv: list[str] | None = None) -> int:
    from .count import lora_config_for
    from .model import init_params

    ap = argparse.ArgumentParser(prog="python -m transformer_ref.train",
                                 description="Time LoRA training steps (value_and_grad + Adam) on random tokens.")
    ap.add_argument("--bench", action="store_true", required=True)
    ap.add_argument("--n-embd", type=int, default=128)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64, help="T")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--matrices", default="q,v", help="comma-separated subset of q,k,v,o,mlp_in,mlp_out")
    ap.add_argument("--mode", choices=("lora", "full"), default="lora")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--default-malloc", action="store_true",
                    help="leave glibc's malloc settings alone (by default keep_freed_memory() is called)")
    ap.add_argument("--threads", type=int, default=None,
                    help="batch slices computed in parallel (default: auto_threads, as train() chooses)")
    args = ap.parse_args(argv)
    tuned = False if args.default_malloc else keep_freed_memory()
    config = GPTConfig(vocab_size=args.vocab, n_positions=args.seq, n_embd=args.n_embd, n_layer=args.n_layer,
                       n_head=args.n_head)
    params = init_params(config, 0, args.dtype)
    lc = lora_config_for(args.matrices.split(","), r=args.rank, alpha=16.0)
    rng = np.random.default_rng(0)
    trainable = add_adapters(params, config, lc, rng) if args.mode == "lora" else params
    if args.mode == "lora":
        objective = lambda ad, x, y, masks=None: loss(params, x, y, config, ad, lc)  # noqa: E731
    else:
        objective = lambda p, x, y, masks=None: loss(p, x, y, config)  # noqa: E731
    threads = auto_threads(config, (args.batch, args.seq)) if args.threads is None else args.threads
    f = sharded_value_and_grad(objective, threads)
    state = adam_init(trainable)
    times = []
    for i in range(args.warmup + args.steps):
        x = asarray(rng.integers(0, args.vocab, size=(args.batch, args.seq)))
        y = asarray(rng.integers(0, args.vocab, size=(args.batch, args.seq)))
        t0 = time.perf_counter()
        value, grads = f(trainable, x, y)
        trainable, state = adam_update(trainable, grads, state, lr=1e-3)
        float(value)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    ms = [1e3 * t for t in times]
    print(f"{args.mode} step, {args.dtype}, n_embd={args.n_embd} n_layer={args.n_layer} n_head={args.n_head} "
          f"T={args.seq} batch={args.batch} vocab={args.vocab} r={args.rank} on {args.matrices}: "
          f"median {statistics.median(ms):.2f} ms (min {min(ms):.2f}, max {max(ms):.2f}, {len(ms)} steps "
          f"after {args.warmup} warm-up; keep_freed_memory: {tuned}; {threads} batch slice(s) in parallel)")
    return 0


if __name__ == "__main__":
    raise SystemExit(_bench())
