"""Where a lora-ref training step spends its time: per layer type, forward and backward.

The model calls its layers through ``transformer_ref.layers.ops``, and autograd finds each
layer's hand-written backward in ``autograd.core.primitive_vjps``. :func:`step_breakdown` wraps
both with timers for the duration of a measurement (and restores them afterwards), so it sees
exactly the code that runs in training: forward time per layer type, backward time per layer
type, Adam, and the rest (autograd's bookkeeping, residual additions, gradient accumulation).

This is a profile, so timers add a little overhead of their own (two ``perf_counter`` calls
per layer call); the step time it reports is measured with the timers in place. When the step
runs its batch slices in several threads, a layer's time is summed over the threads (thread-
milliseconds), so the parts can add up to more than the step's wall time.
"""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["step_breakdown"]


@contextlib.contextmanager
def _timed_layers(totals: dict[str, float]) -> Iterator[None]:
    """Wrap every op in ``transformer_ref.layers.ops`` (forward) and its VJPs (backward)."""
    from autograd.core import primitive_vjps

    from transformer_ref import layers

    saved_ops = dict(vars(layers.ops))
    saved_vjps = {}
    try:
        for name, op in saved_ops.items():
            prim = getattr(op, "primitive", op)        # layers' ops carry .primitive; lora_linear is one
            if prim in primitive_vjps and prim not in saved_vjps:
                saved_vjps[prim] = primitive_vjps[prim]
                primitive_vjps[prim] = _timed_vjp(saved_vjps[prim], f"{name} backward", totals)
            setattr(layers.ops, name, _timed(op, f"{name} forward", totals))
        yield
    finally:
        for name, op in saved_ops.items():
            setattr(layers.ops, name, op)
        for prim, maker in saved_vjps.items():
            primitive_vjps[prim] = maker


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


def step_breakdown(step: Callable[[], Any], *, repeats: int = 3) -> dict[str, Any]:
    """Median milliseconds per step of each layer type's forward and backward, and the rest.

    ``step()`` runs one training step (after at least one warm-up step by the caller). Returns
    ``{"step_ms": ..., "parts_ms": {name: ms}}``: wall time of the step and (thread-)time inside
    each layer's forward and backward; what is in no layer is autograd's graph walk, residual
    additions, the combination of the slices' gradients, Adam and Python.
    """
    per_run: list[dict[str, float]] = []
    step_ms: list[float] = []
    for _ in range(repeats):
        totals: dict[str, float] = defaultdict(float)
        with _timed_layers(totals):
            t0 = time.perf_counter()
            step()
            step_ms.append(1e3 * (time.perf_counter() - t0))
        per_run.append(dict(totals))
    names = sorted({k for run in per_run for k in run})
    parts = {k: statistics.median(1e3 * run.get(k, 0.0) for run in per_run) for k in names}
    parts = dict(sorted(parts.items(), key=lambda kv: -kv[1]))
    median_step = statistics.median(step_ms)
    return {"step_ms": median_step, "parts_ms": parts}
