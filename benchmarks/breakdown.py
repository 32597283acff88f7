"""Where a lora-ref training step spends its time: per layer type, forward and backward.

A model computes with the op set it is given (``transformer_ref.layers.Ops``), and autograd finds
each op's hand-written backward in ``autograd.core.primitive_vjps``. :func:`timed_ops` returns a
copy of an op set whose members time themselves: each forward call, and each backward through a
new autograd primitive registered with timed copies of the original's VJPs. Nothing global is
replaced: a step built with the timed op set (``make_ref_step(..., ops=timed)``) is profiled, any
other computation in the process is not. It sees exactly the code that runs in training: forward
time per layer type, backward time per layer type, and the rest (Adam, autograd's bookkeeping,
residual additions, gradient accumulation).

This is a profile, so timers add a little overhead of their own (two clock reads per layer
call); the step time it reports is measured with the timers in place. When the step runs its
batch slices in several threads, a layer's time is summed over the threads (thread-
milliseconds), so the parts can add up to more than the step's wall time. With
``clock=time.thread_time`` each layer is charged the CPU time of the thread that ran it, which
other processes on a shared machine disturb far less than wall time.

Each layer's matrix-product work is counted from its arguments (:func:`matmul_flops`, the
reference order's products, none counted twice), so a layer's time can be set against the
machine's matmul limit -- the time those FLOPs take at the best float32 rate of one thread:

    python -m benchmarks.breakdown --n-embd 512 --n-layer 6 --seq 128 --batch 8 --matrices q,v
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

__all__ = ["main", "matmul_flops", "step_breakdown", "timed_ops"]


def timed_ops(ops: Any, *, clock: Callable[[], float] = time.perf_counter,
              flops: dict[str, float] | None = None) -> tuple[Any, dict[str, float]]:
    """``(timed, totals)``: ``ops`` with every member timed into ``totals`` (seconds of ``clock``
    per ``"<op> forward"`` / ``"<op> backward"``), and that dict (cleared by :func:`step_breakdown`).
    With ``flops``, each call also adds its matrix-product FLOPs there (:func:`matmul_flops`)."""
    from autograd.core import primitive_vjps
    from autograd.extend import primitive

    totals: dict[str, float] = defaultdict(float)
    members = {}
    for f in dataclasses.fields(ops):
        op = getattr(ops, f.name)
        prim = getattr(op, "primitive", op)            # layers' ops carry .primitive; lora_linear is one
        if prim not in primitive_vjps:                 # plain array code: autograd traces it, forward only
            members[f.name] = _timed(op, f.name, totals, clock, flops)
            continue
        twin = primitive(prim.fun)                     # the same forward, a primitive of its own
        primitive_vjps[twin] = _timed_vjp(primitive_vjps[prim], f.name, totals, clock, flops)
        call = (lambda *args, p=twin: p(*args, cache={})) if prim is not op else twin
        members[f.name] = _timed(call, f.name, totals, clock, flops)
    return dataclasses.replace(ops, **members), totals


def _size(a: Any) -> int:
    return math.prod(int(n) for n in a.shape)


def matmul_flops(op: str, args: tuple[Any, ...], argnums: tuple[int, ...] | None = None) -> float:
    """Matrix-product FLOPs (2 m k n per product) of one call of op ``op`` on ``args``: its
    forward (``argnums`` None) or the VJPs for ``argnums``; 0 for elementwise layers.

    The count is the reference order's necessary work: ``linear`` (any op set's projection, with
    lora_linear's arguments ``x, W, A, B, ...``) is ``2 N d_in d_out`` plus the thin products
    ``x A^T`` and ``(x A^T) B^T`` forward; backward ``G W`` for x, ``G^T X`` for W, the shared
    ``G_k B_k`` once for x and A, ``(G B) A`` for x, ``(G B)^T X`` for A and ``G^T (X A^T)`` for B.
    Attention is ``4 B T^2 C`` forward (``Q K^T``, ``P V``, the causal half counted dense, as
    computed) and twice that backward.
    """
    if op == "linear":
        x, W, A, B = args[:4]
        d_out, d_in = (int(n) for n in W.shape)
        N = _size(x) // d_in
        thin = 0 if A is None else 2 * N * int(A.shape[0]) * d_in         # X A^T, or (G B) A, or (G B)^T X
        thin_b = 0 if A is None else 2 * N * int(B.shape[0]) * int(B.shape[1])   # H B^T, or G_k B_k, or G^T H
        if argnums is None:
            return float(2 * N * d_in * d_out + thin + thin_b)
        total = 0
        if 0 in argnums:
            total += 2 * N * d_in * d_out + thin
        if 1 in argnums:
            total += 2 * N * d_in * d_out
        if 0 in argnums or 2 in argnums:
            total += thin_b                                                # G_k B_k, shared
        if 2 in argnums:
            total += thin
        if 3 in argnums:
            total += thin_b
        return float(total)
    if op == "causal_attention":
        Bsz, T, C3 = (int(n) for n in args[0].shape)
        fwd = 4 * Bsz * T * T * (C3 // 3)
        return float(fwd if argnums is None else 2 * fwd)
    if op == "grouped_query_attention":
        Bsz, T, HD = (int(n) for n in args[0].shape)
        fwd = 4 * Bsz * T * T * HD
        return float(fwd if argnums is None else 2 * fwd)
    return 0.0


_LOCK = threading.Lock()       # the step may run in several threads


def _add(totals: dict[str, float], key: str, seconds: float) -> None:
    with _LOCK:
        totals[key] += seconds


def _timed(fn: Callable[..., Any], name: str, totals: dict[str, float], clock: Callable[[], float],
           flops: dict[str, float] | None) -> Callable[..., Any]:
    key = f"{name} forward"

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if flops is not None:
            _add(flops, key, matmul_flops(name, args))
        t0 = clock()
        try:
            return fn(*args, **kwargs)
        finally:
            _add(totals, key, clock() - t0)
    return wrapper


def _timed_vjp(maker: Callable[..., Any], name: str, totals: dict[str, float], clock: Callable[[], float],
               flops: dict[str, float] | None) -> Callable[..., Any]:
    key = f"{name} backward"

    def timed_maker(argnums: Any, ans: Any, args: Any, kwargs: Any) -> Callable[[Any], Any]:
        if flops is not None:
            _add(flops, key, matmul_flops(name, args, tuple(argnums)))
        t0 = clock()
        vjp = maker(argnums, ans, args, kwargs)
        _add(totals, key, clock() - t0)

        def timed(g: Any) -> tuple[Any, ...]:
            t1 = clock()
            out = tuple(vjp(g))                        # autograd may return a lazy generator
            _add(totals, key, clock() - t1)
            return out
        return timed
    return timed_maker


def step_breakdown(step: Callable[[], Any], totals: dict[str, float], *, repeats: int = 3,
                   clock: Callable[[], float] = time.perf_counter) -> dict[str, Any]:
    """Median milliseconds per step of each layer type's forward and backward, and the rest.

    ``step()`` runs one training step built with the op set of :func:`timed_ops`, whose ``totals``
    are given (after at least one warm-up step by the caller). Returns ``{"step_ms": ...,
    "parts_ms": {name: ms}}``: the step's time by ``clock`` and (thread-)time inside each layer's
    forward and backward; what is in no layer is autograd's graph walk, residual additions, the
    combination of the slices' gradients, Adam and Python.
    """
    per_run: list[dict[str, float]] = []
    step_ms: list[float] = []
    for _ in range(repeats):
        totals.clear()
        t0 = clock()
        step()
        step_ms.append(1e3 * (clock() - t0))
        per_run.append(dict(totals))
    names = sorted({k for run in per_run for k in run})
    parts = {k: statistics.median(1e3 * run.get(k, 0.0) for run in per_run) for k in names}
    parts = dict(sorted(parts.items(), key=lambda kv: -kv[1]))
    median_step = statistics.median(step_ms)
    return {"step_ms": median_step, "parts_ms": parts}


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.breakdown``: a LoRA step's time per layer against the matmul limit."""
    from transformer_ref import FAST, REFERENCE, lora_config_for
    from transformer_ref.machine import blas_threads, keep_freed_memory

    from .flops import StepShape
    from .harness import matmul_peak
    from .ref_gpt2 import make_model, make_ref_step

    ap = argparse.ArgumentParser(prog="python -m benchmarks.breakdown", description=main.__doc__)
    ap.add_argument("--n-embd", type=int, default=128)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-head", type=int, default=None, help="default: head width 64")
    ap.add_argument("--seq", type=int, default=64, help="T")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=128)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--matrices", default="q,v", help="comma-separated subset of q,k,v,o,mlp_in,mlp_out "
                    "(LLaMA: q,k,v,o,gate,up,down)")
    ap.add_argument("--family", choices=("gpt2", "llama"), default="gpt2",
                    help="gpt2, or llama (MLP width 4C, as many key/value heads as query heads, untied head)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--reference", action="store_true", help="the REFERENCE op set (default FAST)")
    ap.add_argument("--threads", type=int, default=1, help="batch slices in parallel (default 1)")
    ap.add_argument("--clock", choices=("thread", "wall"), default="thread",
                    help="thread: each layer's CPU time on its thread (default); wall: perf_counter")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    shape = StepShape(n_embd=args.n_embd, n_layer=args.n_layer, seq_len=args.seq, batch=args.batch, vocab=args.vocab,
                      n_head=args.n_head, r=args.rank, family=args.family)
    lc = lora_config_for(args.matrices.split(","), r=args.rank, alpha=16.0, init="random", family=args.family)
    model = make_model(shape, dtype=args.dtype, lora_config=lc)
    keep_freed_memory()                                     # as transformer_ref.train does
    with blas_threads(1):                                   # one thread's rate, on this thread's CPU clock
        peak = matmul_peak("numpy", (1024, 2048), repeats=5, clock=time.thread_time)
    flops: dict[str, float] = defaultdict(float)
    ops, totals = timed_ops(REFERENCE if args.reference else FAST, clock=clock, flops=flops)
    step = make_ref_step(model, "lora", threads=args.threads, ops=ops)
    with blas_threads(1 if args.threads == 1 else None):
        step["step"]()
        step["step"]()
        flops.clear()
        out = step_breakdown(step["step"], totals, repeats=args.repeats,
                             clock=clock if args.threads == 1 else time.perf_counter)
    per_step = {k: v / args.repeats for k, v in flops.items()}
    rate = peak["peak_gflops"] * 1e6                               # FLOPs per ms, one thread
    print(f"{'REFERENCE' if args.reference else 'FAST'} {args.family} LoRA step, {args.dtype}, n_embd={args.n_embd} "
          f"n_layer={args.n_layer} T={args.seq} batch={args.batch} r={args.rank} on {args.matrices}, "
          f"{args.threads} slice(s); clock: {args.clock}; one thread's float32 matmul limit "
          f"{peak['peak_gflops']:.1f} GFLOP/s")
    print(f"{'part':<34}{'ms':>9}{'GFLOP':>11}{'limit ms':>11}{'over ms':>9}")
    total, total_limit = 0.0, 0.0
    for name, ms in out["parts_ms"].items():
        limit = per_step.get(name, 0.0) / rate
        total += ms
        total_limit += limit
        print(f"{name:<34}{ms:>9.1f}{per_step.get(name, 0.0) / 1e9:>11.4g}{limit:>11.4g}{ms - limit:>9.1f}")
    print(f"{'layers, total':<34}{total:>9.1f}{sum(per_step.values()) / 1e9:>11.4g}{total_limit:>11.4g}"
          f"{total - total_limit:>9.1f}")
    label = "step (thread CPU)" if args.threads == 1 and args.clock == "thread" else "step (wall)"
    print(f"{label:<34}{out['step_ms']:>9.1f}   rest (Adam, autograd, residuals): {out['step_ms'] - total:.1f}"
          if args.threads == 1 else f"{label:<34}{out['step_ms']:>9.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
