"""The training-speed op set: the same model, evaluated in the order that trains fastest.

Nothing here changes what is computed, only the order and the cores it runs on; every function is
tested equal to the reference (tests/transformer/test_speed_paths.py: values and every VJP, by
hypothesis). Whoever wants speed passes it explicitly -- ``train(..., ops=FAST)`` is the default
of the training loop, ``forward(..., ops=FAST)`` anywhere else -- and a reader of that call sees
which computation runs.

* :func:`linear` -- every projection as one (N, d_in) @ (d_in, d_out) product, with ``W + s B A``
  formed first when that is cheaper;
* :data:`FAST` -- :data:`~transformer_ref.layers.REFERENCE` with this projection and the
  memory-lean layers of :mod:`transformer_ref.fast_layers` (GPT-2's LayerNorm, GELU, attention)
  and :mod:`transformer_ref.fast_llama` (LLaMA's RMSNorm, SwiGLU, grouped-query attention);
* :func:`sharded_value_and_grad` -- ``autograd.value_and_grad`` of a loss computed on slices of
  the batch at once, one per core (the pool of :mod:`transformer_ref.machine`), and
  :func:`auto_threads`, how many slices pay off for a model and batch size.

Shapes: B batch, T tokens, N = B T rows, d_in / d_out a projection's sizes, r rank.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from typing import Any

import numpy as np
from autograd import value_and_grad
from autograd.extend import defvjp

from lora_ref.backend import getval, namespace, sum_to_shape
from lora_ref.checks import positive_int

from . import fast_layers, fast_llama, machine
from .hosting import family_of
from .layers import IGNORE_INDEX, REFERENCE, Ops, cached_primitive

__all__ = ["FAST", "auto_threads", "linear", "sharded_value_and_grad"]


# ============================================================================================
# Projections: lora_ref.lora_linear's Eq. 3, y = x W^T + bias + s ((x * mask) A^T) B^T,
# evaluated in the order that trains fastest
# ============================================================================================
#
# lora_ref.lora_linear is the reference: it never forms B A, and its products keep x's leading
# (B, T) dimensions. This layer computes the same value and the same gradients (equal up to
# rounding: tests/transformer/test_speed_paths.py holds it to lora_linear) in another order:
#
# * x is folded to (N, d_in), so every product is one (N, d_in) @ (d_in, d_out) matrix
#   multiplication; NumPy runs a (B, T, d_in) @ (d_in, d_out) product as B smaller ones.
# * Without dropout, when N (d_in + d_out) >= d_in d_out -- the thin products x A^T and
#   (x A^T) B^T would cost at least what forming W + s B A does -- the adapter is added to the
#   weight first: y = x (W + s B A)^T, one product for both branches, and in the backward
#   dL/dx = G (W + s B A) likewise. For a single token (generation) the thin products stay.
#   A fused projection's W + s B A is built block by block: each adapted block of rows is
#   W_g + s B_k A_k, the others are W's rows as they are (no zero blocks, one pass over W).
# * When the batch is split over threads (sharded_value_and_grad below), the slices share one
#   W + s B A per projection per step: the first slice to reach the layer forms it, the others
#   wait for it (_Folds). The same numbers either way: the same function of the same arrays.
#   This saves CPU time (measured: about 4 thread-ms of a ~1000 thread-ms GPT-2 step, n_embd 512),
#   not wall time when the slices reach each layer together; it helps a slice that runs late.


def _lora_blocks(enable: tuple[bool, ...] | None, d_out: int, r: int) -> list[tuple[slice, slice, slice]]:
    """For each adapted block of a fused weight: (rows of A, rows of B, columns of y)."""
    if enable is None:
        return [(slice(0, r), slice(0, d_out), slice(0, d_out))]
    q = d_out // len(enable)
    enabled = [g for g, on in enumerate(enable) if on]                  # k-th adapted block is block g
    return [(slice(k * r, (k + 1) * r), slice(k * q, (k + 1) * q), slice(g * q, (g + 1) * q))
            for k, g in enumerate(enabled)]


def _folded(W: Any, A: Any, B: Any, scale: float, enable_lora: tuple[bool, ...] | None) -> Any:
    """W + s B A (d_out, d_in): each adapted block of rows W_g + s B_k A_k, the others W_g."""
    xp = namespace(W, A, B)
    if enable_lora is None:
        return W + (B @ A) * scale                                      # (d_out, d_in)
    q = W.shape[0] // len(enable_lora)
    blocks = iter(_lora_blocks(enable_lora, W.shape[0], B.shape[-1]))
    rows = []
    for g, on in enumerate(enable_lora):
        W_g = W[g * q:(g + 1) * q, :]                                    # (q, d_in) block g of W
        if on:
            ra, rb, _ = next(blocks)
            W_g = W_g + (B[rb, :] @ A[ra, :]) * scale                    # W_g + s B_k A_k
        rows.append(W_g)
    return xp.concat(rows, axis=0)                                       # (d_out, d_in)


class _Folds:
    """The W + s B A of each projection, formed once for all the slices of one sharded step.

    Keyed by the identity of (W, A, B) and the settings; the arrays are held here for the step,
    so an identity cannot be reused while the key lives. The first thread to ask forms the
    weight; a thread asking meanwhile waits for it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._made: dict[tuple, tuple[Any, Future]] = {}

    def get(self, W: Any, A: Any, B: Any, scale: float, enable_lora: tuple[bool, ...] | None) -> Any:
        key = (id(W), id(A), id(B), scale, enable_lora)
        with self._lock:
            held = self._made.get(key)
            mine = held is None
            if mine:
                held = self._made[key] = ((W, A, B), Future())
        if mine:
            try:
                held[1].set_result(_folded(W, A, B, scale, enable_lora))
            except BaseException as exc:
                held[1].set_exception(exc)
                raise
        return held[1].result()


_SLICE = threading.local()    # .folds: the _Folds of the sharded step this worker thread computes a slice of


def _linear(x: Any, W: Any, A: Any, B: Any, scale: float, bias: Any = None, dropout_mask: Any = None,
            enable_lora: tuple[bool, ...] | None = None, cache: dict | None = None) -> Any:
    """x (..., d_in), W (d_out, d_in), A (n r, d_in) or None, B (n q, r) -> y (..., d_out).

    The arguments are lora_ref.lora_linear's (see there, with enable_lora). Unlike lora_linear
    it does not check them: a model checks all its inputs once per forward (``hosting``), which
    matters at ~25 us per call.
    """
    xp = namespace(x, W, A, B, bias, dropout_mask)
    d_out, d_in = W.shape
    lead = tuple(x.shape[:-1])
    X = xp.reshape(x, (-1, d_in))                                        # (N, d_in)
    N = X.shape[0]
    fold = A is not None and dropout_mask is None and N * (d_in + d_out) >= d_in * d_out
    if fold:                                                             # W + s B A  (d_out, d_in)
        folds = getattr(_SLICE, "folds", None)
        shared = folds is not None and all(type(a) is np.ndarray for a in (W, A, B))   # not while traced
        W_run = folds.get(W, A, B, scale, enable_lora) if shared else _folded(W, A, B, scale, enable_lora)
    else:
        W_run = W
    Y = X @ xp.matrix_transpose(W_run)                                   # (N, d_out)
    if bias is not None:
        Y += bias                                                        # in place: Y is this call's own
    Xd = X
    if A is not None and not fold:
        if dropout_mask is not None:                                     # dropout on the adapter branch only
            Xd = xp.reshape(x * dropout_mask, (-1, d_in))                # (N, d_in)
        H = Xd @ xp.matrix_transpose(A)                                  # (N, n r)   A x
        r = B.shape[-1]
        parts = [H[:, ra] @ xp.matrix_transpose(B[rb, :]) for ra, rb, _ in _lora_blocks(enable_lora, d_out, r)]
        if enable_lora is None:
            delta = parts[0]                                             # (N, d_out)  B A x
        else:
            q, it = d_out // len(enable_lora), iter(parts)
            zero = xp.zeros((N, q), dtype=Y.dtype)
            delta = xp.concat([next(it) if on else zero for on in enable_lora], axis=-1)  # (N, d_out)
        Y = Y + delta * scale
    if cache is not None:
        cache["X"], cache["Xd"], cache["W_run"] = X, Xd, W_run
    return xp.reshape(Y, lead + (d_out,))                                # (..., d_out)


linear = cached_primitive(_linear)
linear.__doc__ = """The model's projection: lora_ref.lora_linear's Eq. 3, ``x W^T + bias + s ((x * mask) A^T) B^T``.

    Same arguments and value (up to rounding) as :func:`lora_ref.lora_linear`, without its input
    checks (the model makes them once per forward); computed as one matrix product per call, with
    ``W + s B A`` formed first when that is cheaper (no dropout, N (d_in + d_out) >= d_in d_out
    for N tokens). x (..., d_in) -> (..., d_out).
    """


# With G = dL/dy folded to (N, d_out), X = x folded to (N, d_in), Xd = X * mask, H = Xd A^T, and
# for block k: G_k = G[:, cols_k] (N, q), A_k (r, d_in), B_k (q, r)  (lora_ref.lora's formulas):
#   dL/dx    = G W + s sum_k ((G_k B_k) A_k) * mask  =  G (W + s B A)  when there is no mask
#   dL/dW    = G^T X                       (full fine-tuning only: LoRA never asks for it)
#   dL/dA_k  = s (G_k B_k)^T Xd            dL/dB_k = s G_k^T H_k          dL/dbias = sum_N G
def _flat_g(g: Any, d_out: int) -> Any:
    return namespace(g).reshape(g, (-1, d_out))                          # (N, d_out)


def _linear_vjp_x(ans, x, W, A, B, scale, bias=None, dropout_mask=None, enable_lora=None, cache=None):
    def vjp(g):
        xp = namespace(g)
        G = _flat_g(g, W.shape[0])
        dX = G @ cache["W_run"]                                          # (N, d_in)  G W (+ s G B A if folded)
        if A is not None and cache["W_run"] is W:                        # not folded: the adapter branch apart
            r = B.shape[-1]
            gB = [G[:, cols] @ B[rb, :] for _, rb, cols in _lora_blocks(enable_lora, W.shape[0], r)]  # (N, r) each
            gBA = (gB[0] if len(gB) == 1 else xp.concat(gB, axis=-1)) @ A                              # (N, d_in)
            if dropout_mask is not None:
                gBA = xp.reshape(xp.reshape(gBA, x.shape) * dropout_mask, (-1, x.shape[-1]))
            dX = dX + gBA * scale
        return xp.reshape(dX, x.shape)                                   # (..., d_in)
    return vjp


def _linear_vjp_W(ans, x, W, A, B, scale, bias=None, dropout_mask=None, enable_lora=None, cache=None):
    return lambda g: namespace(g).matrix_transpose(_flat_g(g, W.shape[0])) @ cache["X"]   # (d_out, d_in)


def _linear_vjp_A(ans, x, W, A, B, scale, bias=None, dropout_mask=None, enable_lora=None, cache=None):
    def vjp(g):
        xp = namespace(g)
        G, r = _flat_g(g, W.shape[0]), B.shape[-1]
        gB = [G[:, cols] @ B[rb, :] for _, rb, cols in _lora_blocks(enable_lora, W.shape[0], r)]  # (N, r) each
        gB = gB[0] if len(gB) == 1 else xp.concat(gB, axis=-1)                                    # (N, n r)
        return (xp.matrix_transpose(gB) @ cache["Xd"]) * scale           # (n r, d_in)
    return vjp


def _linear_vjp_B(ans, x, W, A, B, scale, bias=None, dropout_mask=None, enable_lora=None, cache=None):
    def vjp(g):
        xp = namespace(g)
        G, r = _flat_g(g, W.shape[0]), B.shape[-1]
        H = cache["Xd"] @ xp.matrix_transpose(A)                         # (N, n r)
        parts = [xp.matrix_transpose(G[:, cols]) @ H[:, ra] for ra, _, cols in _lora_blocks(enable_lora, W.shape[0], r)]
        return (parts[0] if len(parts) == 1 else xp.concat(parts, axis=0)) * scale   # (n q, r)
    return vjp


def _linear_vjp_bias(ans, x, W, A, B, scale, bias=None, dropout_mask=None, enable_lora=None, cache=None):
    return lambda g: sum_to_shape(g, bias.shape)                        # (..., d_out) -> (d_out,)


def _linear_not_differentiable(what: str) -> Callable[..., Any]:
    def maker(*args: Any, **kwargs: Any) -> Any:
        raise TypeError(f"linear is not differentiable with respect to {what}")
    return maker


defvjp(linear.primitive, _linear_vjp_x, _linear_vjp_W, _linear_vjp_A, _linear_vjp_B,
       _linear_not_differentiable("scale (a constant)"), _linear_vjp_bias,
       _linear_not_differentiable("dropout_mask (a constant)"))


FAST: Ops = dataclasses.replace(
    REFERENCE, linear=linear, layer_norm=fast_layers.layer_norm, gelu=fast_layers.gelu,
    causal_attention=fast_layers.causal_attention, rms_norm=fast_llama.rms_norm, swiglu=fast_llama.swiglu,
    grouped_query_attention=fast_llama.grouped_query_attention)
"""The training-speed op set: :data:`~transformer_ref.layers.REFERENCE` with the folded projection
:func:`linear`, GPT-2's LayerNorm, GELU and causal attention from :mod:`transformer_ref.fast_layers`
and LLaMA's RMSNorm, SwiGLU and grouped-query attention from :mod:`transformer_ref.fast_llama`
(each equal to the reference up to rounding)."""


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


def auto_threads(config: Any, batch_shape: tuple[int, int]) -> int:
    """The slices ``train`` uses by default (``threads=None``) for batches of ``batch_shape`` (B, T).

    Every core (:func:`~transformer_ref.machine.default_threads`) when each slice's forward is
    worth at least 0.2 GFLOP (the projections' ``Family.flops_per_token``, GPT-2's 24 n_layer
    n_embd^2, per token), else 1: handing work to threads costs 1-3 ms a step, which was measured
    (2 cores) to outweigh the gain below about that size -- e.g. a 128-wide, 4-layer GPT-2 gained
    15% at 256 tokens a step and lost 16% at 128. ``config`` is any registered family's config.
    """
    B, T = (int(v) for v in batch_shape)
    n = machine.default_threads()
    per_slice = family_of(config).flops_per_token(config) * B * T / n
    return n if n > 1 and per_slice >= 2e8 else 1


def _tree_map(f: Callable[..., Any], tree: Any, *rest: Any) -> Any:
    """Apply ``f`` leaf-wise over nested dicts of arrays (all trees share ``tree``'s keys)."""
    if isinstance(tree, Mapping):
        return {k: _tree_map(f, tree[k], *(r[k] for r in rest)) for k in tree}
    return f(tree, *rest)


def sharded_value_and_grad(objective: Callable[..., Any], threads: int | None = None) -> Callable[..., Any]:
    """``autograd.value_and_grad(objective)``, computed on ``threads`` slices of the batch at once.

    ``objective(tree, inputs, targets, masks)`` must be a mean over the kept targets (those not
    equal to ``layers.IGNORE_INDEX``) of per-position losses, as :func:`~transformer_ref.loss` is;
    ``inputs`` and ``targets`` are (B, T) arrays; ``masks`` is None or a dict of dropout masks,
    each (B, T, d_in) or broadcasting over the batch. Returns ``f(tree, inputs, targets, masks)
    -> (value, grads)`` with the gradient with respect to ``tree``.

    ``threads``: None for :func:`~transformer_ref.machine.default_threads`; 1 (or a batch of one
    row, or arrays that are not NumPy's: CuPy and array_api_strict have their own parallelism)
    computes it in one piece.
    """
    whole = value_and_grad(objective)
    if threads is not None:
        positive_int(threads, "threads", "or None")

    def f(tree: Any, inputs: Any, targets: Any, masks: Any = None) -> tuple[Any, Any]:
        n_threads = machine.default_threads() if threads is None else int(threads)
        t = getval(targets)
        n_slices = min(n_threads, int(t.shape[0]))
        if n_slices < 2 or not isinstance(t, np.ndarray) or not isinstance(getval(inputs), np.ndarray) \
                or not machine.per_thread_blas():
            return whole(tree, inputs, targets, masks)
        from autograd.tracer import trace_stack

        bounds = np.linspace(0, t.shape[0], n_slices + 1).astype(int)          # row slices [b0, b1)
        rows = [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]
        kept = [int(np.sum(t[r] != IGNORE_INDEX)) for r in rows]
        total = sum(kept)
        if total == 0:
            return whole(tree, inputs, targets, masks)   # raises loss's own "every position ignored" error
        jobs = [(r, k) for r, k in zip(rows, kept) if k > 0]   # a slice with nothing to score adds nothing

        folds = _Folds()                                                          # this step's W + s B A

        def part(r: slice) -> tuple[Any, Any]:
            # a mask with a batch axis (B, T, d_in) is sliced with the batch; one that broadcasts
            # over the batch ((1, T, d_in), (T, d_in), (d_in,)) applies to every slice as it is
            sliced = None if masks is None else {
                name: (m[r] if m.ndim == 3 and m.shape[0] == t.shape[0] else m) for name, m in masks.items()}
            _SLICE.folds = folds
            try:
                return whole(tree, inputs[r], targets[r], sliced)
            finally:
                del _SLICE.folds

        top = trace_stack.top
        try:
            results = list(machine.worker_pool(n_slices).map(part, [r for r, _ in jobs]))
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
