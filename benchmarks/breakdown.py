"""Where a lora-ref training step spends its time: per layer type, forward and backward.

A model computes with the op set it is given (``transformer_ref.layers.Ops``), and autograd finds
each op's hand-written backward in ``autograd.core.primitive_vjps``. :func:`timed_ops` returns a
copy of an op set whose members time themselves: each forward call, and each backward through a
new autograd primitive registered with timed copies of the original's VJPs. Nothing global is
replaced: a step built with the timed op set (``make_ref_step(..., ops=timed)``) is profiled, any
other computation in the process is not. It sees exactly the code that runs in training: forward
time per layer type, backward time per layer type, and the rest (Adam, autograd's bookkeeping,
residual additions, gradient accumulation).

This is a profile, so timers add a little overhead of their own (two ``perf_counter`` calls
per layer call); the step time it reports is measured with the timers in place. When the step
runs its batch slices in several threads, a layer's time is summed over the threads (thread-
milliseconds), so the parts can add up to more than the step's wall time.
"""

from __future__ import annotations

import dataclasses
import statistics
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

__all__ = ["step_breakdown", "timed_ops"]


def timed_ops(ops: Any) -> tuple[Any, dict[str, float]]:
    """``(timed, totals)``: ``ops`` with every member timed into ``totals`` (seconds per
    ``"<op> forward"`` / ``"<op> backward"``), and that dict (cleared by :func:`step_breakdown`)."""
    from autograd.core import primitive_vjps
    from autograd.extend import primitive

    totals: dict[str, float] = defaultdict(float)
    members = {}
    for f in dataclasses.fields(ops):
        op = getattr(ops, f.name)
        prim = getattr(op, "primitive", op)            # layers' ops carry .primitive; lora_linear is one
        if prim not in primitive_vjps:                 # plain array code: autograd traces it, forward only
            members[f.name] = _timed(op, f"{f.name} forward", totals)
            continue
        twin = primitive(prim.fun)                     # the same forward, a primitive of its own
        primitive_vjps[twin] = _timed_vjp(primitive_vjps[prim], f"{f.name} backward", totals)
        call = (lambda *args, p=twin: p(*args, cache={})) if prim is not op else twin
        members[f.name] = _timed(call, f"{f.name} forward", totals)
    return dataclasses.replace(ops, **members), totals


_LOCK = threading.Lock()       # the step may run in several threads


def _add(totals: dict[str, float], key: str, seconds: float) -> None:
    with _LOCK:
        totals[key] += seconds


def _timed(fn: Callable[..., Any], key: str, totals: dict[str, float]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            _add(totals, key, time.perf_counter() - t0)
    return wrapper


def _timed_vjp(maker: Callable[..., Any], key: str, totals: dict[str, float]) -> Callable[..., Any]:
    def timed_maker(argnums: Any, ans: Any, args: Any, kwargs: Any) -> Callable[[Any], Any]:
        t0 = time.perf_counter()
        vjp = maker(argnums, ans, args, kwargs)
        _add(totals, key, time.perf_counter() - t0)

        def timed(g: Any) -> tuple[Any, ...]:
            t1 = time.perf_counter()
            out = tuple(vjp(g))                        # autograd may return a lazy generator
            _add(totals, key, time.perf_counter() - t1)
            return out
        return timed
    return timed_maker


def step_breakdown(step: Callable[[], Any], totals: dict[str, float], *, repeats: int = 3) -> dict[str, Any]:
    """Median milliseconds per step of each layer type's forward and backward, and the rest.

    ``step()`` runs one training step built with the op set of :func:`timed_ops`, whose ``totals``
    are given (after at least one warm-up step by the caller). Returns ``{"step_ms": ...,
    "parts_ms": {name: ms}}``: wall time of the step and (thread-)time inside each layer's
    forward and backward; what is in no layer is autograd's graph walk, residual additions, the
    combination of the slices' gradients, Adam and Python.
    """
    per_run: list[dict[str, float]] = []
    step_ms: list[float] = []
    for _ in range(repeats):
        totals.clear()
        t0 = time.perf_counter()
        step()
        step_ms.append(1e3 * (time.perf_counter() - t0))
        per_run.append(dict(totals))
    names = sorted({k for run in per_run for k in run})
    parts = {k: statistics.median(1e3 * run.get(k, 0.0) for run in per_run) for k in names}
    parts = dict(sorted(parts.items(), key=lambda kv: -kv[1]))
    median_step = statistics.median(step_ms)
    return {"step_ms": median_step, "parts_ms": parts}
