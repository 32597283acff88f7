"""The layers of GPT-2, each a forward in array code and a backward written out: clean, minimal, reference.

Every layer is an autograd primitive. Its forward runs on any backend (the namespace comes from
its arrays) and fills a ``cache`` dict with what the backward needs (llm.c's ``forward -> (out,
cache)``); its VJPs, below it, are the hand-derived gradients with the equations beside the code.
Autograd only chains them, and only asks for the VJPs of arguments that are being traced.

The same forward, undecorated (``layer.fun``), is ordinary differentiable array code: inside
:func:`undecorated` the model calls the undecorated forwards, so ``autograd.numpy`` derives every
gradient a second time, independently of the hand-written ones (the tests compare the two).

Shapes: B batch, T tokens, C channels, H heads, D = C / H head width, V vocabulary,
N = B * T rows, ``...`` any leading dimensions.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import numpy as np
from autograd.extend import defvjp, primitive

from lora_ref.backend import dtype_name, getval, namespace
from lora_ref.lora import lora_linear

__all__ = [
    "IGNORE_INDEX",
    "causal_attention",
    "cross_entropy",
    "embedding",
    "gelu",
    "layer_norm",
    "ops",
    "undecorated",
]

IGNORE_INDEX = -100  # a target equal to this is left out of the loss (PyTorch's and HF's convention)


def _layer(forward: Callable[..., Any]) -> Callable[..., Any]:
    """Make ``forward(*args, cache=None)`` an autograd primitive called with a fresh cache dict.

    The returned function has ``.fun`` (the undecorated forward) and ``.primitive`` (the autograd
    primitive, on which the VJPs are defined). The VJP makers receive the same ``cache`` dict the
    forward filled, so nothing is computed twice.
    """
    p = primitive(forward)

    @functools.wraps(forward)
    def layer(*args: Any) -> Any:
        return p(*args, cache={})

    layer.fun = forward
    layer.primitive = p
    return layer


# ============================================================================================
# Embedding: x = table[ids]
# ============================================================================================


def _embedding(table: Any, ids: Any, cache: dict | None = None) -> Any:
    """Rows of ``table`` (V, C) picked by integer ``ids`` (...): returns (..., C)."""
    xp = namespace(table)
    _check_ids(ids, table.shape[0], "ids")
    flat = xp.reshape(ids, (-1,))                                   # (N,)
    rows = xp.take(table, flat, axis=0)                             # (N, C)
    return xp.reshape(rows, tuple(ids.shape) + (table.shape[1],))   # (..., C)


embedding = _layer(_embedding)
embedding.__doc__ = """Token (or position) embedding: ``out[..., :] = table[ids[...], :]``.

    table : array (V, C), float;  ids : integer array (...) with values in [0, V).
    Returns (..., C). Raises TypeError for non-integer ids, ValueError for ids out of range
    (CuPy would silently wrap them).
    """


# dL/dtable[v] = sum of dL/dout over the positions where ids == v: a scatter-add. The Array API
# has none, so NumPy uses ``add.at``, CuPy ``cupyx.scatter_add``, and any other backend the
# one-hot product  dtable = onehot(ids)^T @ g  (N V C work: fine for the small vocabularies
# array_api_strict is used with, in tests).
def _embedding_vjp(ans, table, ids, cache=None):
    def vjp(g):
        xp = namespace(g)
        V, C = table.shape
        flat_ids = xp.reshape(ids, (-1,))                           # (N,)
        flat_g = xp.reshape(g, (-1, C))                             # (N, C)
        if isinstance(flat_g, np.ndarray):
            out = np.zeros((V, C), dtype=flat_g.dtype)
            np.add.at(out, np.asarray(flat_ids), flat_g)
            return out
        if type(flat_g).__module__.startswith("cupy"):
            import cupyx

            out = xp.zeros((V, C), dtype=flat_g.dtype)
            cupyx.scatter_add(out, flat_ids, flat_g)
            return out
        onehot = xp.astype(flat_ids[:, None] == xp.arange(V)[None, :], flat_g.dtype)  # (N, V)
        return xp.matrix_transpose(onehot) @ flat_g                 # (V, C)
    return vjp


defvjp(embedding.primitive, _embedding_vjp, None)


# ============================================================================================
# LayerNorm: y = (x - mean) / sqrt(var + eps) * weight + bias, over the last axis
# ============================================================================================


def _layer_norm(x: Any, weight: Any, bias: Any, eps: float, cache: dict | None = None) -> Any:
    """x (..., C), weight (C,), bias (C,), eps a Python float -> (..., C)."""
    xp = namespace(x, weight, bias)
    mean = xp.mean(x, axis=-1, keepdims=True)                       # (..., 1)
    xc = x - mean                                                   # (..., C)
    var = xp.mean(xc * xc, axis=-1, keepdims=True)                  # (..., 1) biased, as GPT-2
    rstd = 1.0 / xp.sqrt(var + eps)                                 # (..., 1)
    xhat = xc * rstd                                                # (..., C)
    if cache is not None:
        cache["xhat"], cache["rstd"] = xhat, rstd
    return xhat * weight + bias


layer_norm = _layer(_layer_norm)
layer_norm.__doc__ = """LayerNorm over the last axis: ``(x - mean) / sqrt(var + eps) * weight + bias``.

    x : (..., C); weight, bias : (C,); eps : Python float (GPT-2: 1e-5). Returns (..., C).
    The variance is the biased one (divide by C), as in PyTorch and GPT-2.
    """


def _sum_leading(t: Any) -> Any:
    """(..., C) -> (C,): sum over every leading axis."""
    xp = namespace(t)
    return xp.sum(xp.reshape(t, (-1, t.shape[-1])), axis=0)


# With xhat = (x - mean) * rstd and g = dL/dy:
#   dL/dbias   = sum_rows g
#   dL/dweight = sum_rows g * xhat
#   dL/dx      = rstd * (gw - mean(gw) - xhat * mean(gw * xhat)),  gw = g * weight
# (the last line is d xhat/dx applied to gw: the two means remove the components along the
#  directions that the centring and the normalisation take away).
def _ln_vjp_x(ans, x, weight, bias, eps, cache):
    def vjp(g):
        xp = namespace(g)
        xhat, rstd = cache["xhat"], cache["rstd"]
        gw = g * weight                                                            # (..., C)
        return rstd * (gw - xp.mean(gw, axis=-1, keepdims=True)
                       - xhat * xp.mean(gw * xhat, axis=-1, keepdims=True))        # (..., C)
    return vjp


defvjp(layer_norm.primitive,
       _ln_vjp_x,
       lambda ans, x, weight, bias, eps, cache: lambda g: _sum_leading(g * cache["xhat"]),
       lambda ans, x, weight, bias, eps, cache: lambda g: _sum_leading(g),
       None)


# ============================================================================================
# GELU, GPT-2's tanh approximation ("gelu_new"): y = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
# ============================================================================================

_GELU_C = math.sqrt(2.0 / math.pi)   # Python floats: a float32 computation stays float32
_GELU_K = 0.044715


def _gelu(x: Any, cache: dict | None = None) -> Any:
    """x (...) -> (...), elementwise."""
    xp = namespace(x)
    t = xp.tanh(_GELU_C * (x + _GELU_K * (x * x * x)))
    if cache is not None:
        cache["t"] = t
    return 0.5 * x * (1.0 + t)


gelu = _layer(_gelu)
gelu.__doc__ = """GPT-2's GELU (tanh approximation, Hugging Face ``gelu_new``), elementwise.

    ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``; x any shape, float.
    """


# dy/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2),  t the tanh above
# (product rule; d tanh(u) = (1 - tanh(u)^2) du).
def _gelu_vjp(ans, x, cache):
    def vjp(g):
        t = cache["t"]
        dydx = 0.5 * (1.0 + t) + (0.5 * _GELU_C) * x * (1.0 - t * t) * (1.0 + (3.0 * _GELU_K) * (x * x))
        return g * dydx
    return vjp


defvjp(gelu.primitive, _gelu_vjp)


# ============================================================================================
# Causal self-attention, all heads at once: y = softmax(q k^T * scale + causal mask) v
# ============================================================================================


def _causal_attention(qkv: Any, n_head: int, scale: float, cache: dict | None = None) -> Any:
    """qkv (B, T, 3C) = [q | k | v] from ``c_attn`` -> y (B, T, C), heads concatenated.

    The heads are split with transposes and reshapes only (no loop over heads): after
    ``matrix_transpose`` the channel axis is second to last, and channel c of q, k or v is
    (head c // D, position c % D) -- Hugging Face's split of n_embd into n_head x head_dim.
    """
    xp = namespace(qkv)
    Bsz, T, C3 = qkv.shape
    C = C3 // 3
    D = C // n_head
    qkvT = xp.reshape(xp.matrix_transpose(qkv), (Bsz, 3, n_head, D, T))  # (B, 3, H, D, T)
    qT, kT, vT = (qkvT[:, i, :, :, :] for i in range(3))                # (B, H, D, T) each
    S = (xp.matrix_transpose(qT) @ kT) * scale                          # (B, H, T, T)  q k^T / sqrt(D)
    causal = xp.tril(xp.ones((T, T), dtype=xp.bool))                    # (T, T) key <= query
    S = xp.where(causal, S, -math.inf)
    S = S - xp.max(S, axis=-1, keepdims=True)                           # the diagonal is finite
    E = xp.exp(S)                                                       # masked entries: exp(-inf) = 0
    P = E / xp.sum(E, axis=-1, keepdims=True)                           # (B, H, T, T)  softmax
    Y = P @ xp.matrix_transpose(vT)                                     # (B, H, T, D)
    if cache is not None:
        cache["P"], cache["qT"], cache["kT"], cache["vT"] = P, qT, kT, vT
    y = xp.reshape(xp.matrix_transpose(Y), (Bsz, C, T))                 # (B, C, T): channel = (head, d)
    return xp.matrix_transpose(y)                                       # (B, T, C)


causal_attention = _layer(_causal_attention)
causal_attention.__doc__ = """Causal multi-head self-attention, every head in one batched matmul.

    qkv : (B, T, 3C), the output of the fused ``c_attn`` projection, [q | k | v] along channels.
    n_head : H, with C divisible by H;  scale : Python float, GPT-2's 1/sqrt(C/H).
    Returns (B, T, C): for each head, ``softmax(q k^T * scale, masked to keys <= query) v``,
    heads concatenated along channels (the input of ``attn.c_proj``).
    """


# With P = softmax(S), Y = P V (per batch and head), G = dL/dY:
#   dV = P^T G            dP = G V^T
#   dS = P * (dP - rowsum(dP * P))       (softmax's Jacobian; masked entries have P = 0, so dS = 0)
#   dQ = scale dS K       dK = scale dS^T Q
# Written transposed, (B, H, D, T), so that the three stack straight back into qkv's layout:
#   dQ^T = scale K^T dS^T,  dK^T = scale Q^T dS,  dV^T = G^T P.
def _attention_vjp(ans, qkv, n_head, scale, cache):
    def vjp(g):
        xp = namespace(g)
        Bsz, T, C = g.shape
        P, qT, kT, vT = cache["P"], cache["qT"], cache["kT"], cache["vT"]
        GT = xp.reshape(xp.matrix_transpose(g), (Bsz, n_head, C // n_head, T))  # (B, H, D, T) = dL/dY^T
        dP = xp.matrix_transpose(GT) @ vT                                 # (B, H, T, T)
        dS = P * (dP - xp.sum(dP * P, axis=-1, keepdims=True))
        dS = dS * scale
        dqT = kT @ xp.matrix_transpose(dS)                                # (B, H, D, T)
        dkT = qT @ dS                                                     # (B, H, D, T)
        dvT = GT @ P                                                      # (B, H, D, T)
        d = xp.reshape(xp.stack((dqT, dkT, dvT), axis=1), (Bsz, 3 * C, T))  # (B, 3C, T)
        return xp.matrix_transpose(d)                                     # (B, T, 3C)
    return vjp


defvjp(causal_attention.primitive, _attention_vjp, None, None)


# ============================================================================================
# Cross-entropy fused with log-softmax: loss = mean over kept rows of (logsumexp(z) - z[target])
# ============================================================================================


def _cross_entropy(logits: Any, targets: Any, cache: dict | None = None) -> Any:
    """logits (..., V), integer targets (...) in [0, V) or IGNORE_INDEX -> scalar mean loss."""
    xp = namespace(logits)
    V = logits.shape[-1]
    n = _check_targets(targets, tuple(logits.shape[:-1]), V)
    z = xp.reshape(logits, (-1, V))                                   # (N, V)
    t = xp.reshape(targets, (-1,))                                    # (N,)
    z = z - xp.max(z, axis=-1, keepdims=True)                         # log-sum-exp shift: exp <= 1
    E = xp.exp(z)                                                     # (N, V)
    s = xp.sum(E, axis=-1)                                            # (N,)
    onehot = t[:, None] == xp.arange(V, dtype=t.dtype)[None, :]       # (N, V) bool; ignored rows all False
    kept = t != IGNORE_INDEX                                          # (N,)
    picked = xp.sum(xp.where(onehot, z, 0.0), axis=-1)                # (N,)  z[target]
    per_row = xp.where(kept, xp.log(s) - picked, 0.0)                 # (N,)  -log softmax(z)[target]
    if cache is not None:
        cache["E"], cache["s"], cache["onehot"], cache["kept"], cache["n"] = E, s, onehot, kept, n
    return xp.sum(per_row) / float(n)


cross_entropy = _layer(_cross_entropy)
cross_entropy.__doc__ = """Mean cross-entropy of ``softmax(logits)`` against integer targets, fused.

    logits : (..., V) float;  targets : (...) integers in [0, V), or ``IGNORE_INDEX`` (-100) to
    leave a position out (as PyTorch's ``ignore_index``). Returns a 0-d array: the mean over kept
    positions of ``logsumexp(logits) - logits[target]``, computed stably (max subtracted).
    """


# d loss / d z = (softmax(z) - onehot(target)) / n on kept rows, 0 on ignored rows.
def _cross_entropy_vjp(ans, logits, targets, cache):
    def vjp(g):
        xp = namespace(logits)
        E, s, onehot, kept = cache["E"], cache["s"], cache["onehot"], cache["kept"]
        probs = E / s[:, None]                                            # (N, V)
        d = (probs - xp.astype(onehot, probs.dtype)) * xp.astype(kept, probs.dtype)[:, None]
        return xp.reshape(d * (g / float(cache["n"])), logits.shape)      # (..., V)
    return vjp


defvjp(cross_entropy.primitive, _cross_entropy_vjp, None)


# ============================================================================================
# The ops the model calls, and the switch to their undecorated forwards
# ============================================================================================

ops = SimpleNamespace(embedding=embedding, layer_norm=layer_norm, gelu=gelu,
                      causal_attention=causal_attention, cross_entropy=cross_entropy,
                      lora_linear=lora_linear)


@contextlib.contextmanager
def undecorated() -> Iterator[None]:
    """Inside this block the model calls each layer's *undecorated* forward (``layer.fun``).

    ``autograd.grad`` of the model then traces plain array code with ``autograd.numpy`` (NumPy
    backend only) instead of using the hand-written VJPs: an independent second derivation of
    every gradient, for tests. Not thread-safe (it swaps module-level references).
    """
    saved = dict(vars(ops))
    try:
        for name, fn in saved.items():
            setattr(ops, name, fn.fun)
        yield
    finally:
        for name, fn in saved.items():
            setattr(ops, name, fn)


# ============================================================================================
# Validation
# ============================================================================================


def _is_integer_array(a: Any) -> bool:
    return hasattr(a, "dtype") and hasattr(a, "shape") and dtype_name(getval(a).dtype) in (
        "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")


def _check_ids(ids: Any, V: int, what: str, size_name: str = "the table's row count") -> None:
    """Integer dtype, values in [0, V): ValueError naming the first offending value and position."""
    if not _is_integer_array(ids):
        kind = dtype_name(ids.dtype) if hasattr(ids, "dtype") else type(ids).__name__
        raise TypeError(f"{what} must be an integer array, got {kind}")
    ids = getval(ids)
    if math.prod(ids.shape) == 0:
        return
    xp = namespace(ids)
    lo, hi = int(xp.min(ids)), int(xp.max(ids))
    if lo < 0 or hi >= V:
        host = _np(ids)
        bad = tuple(int(i) for i in np.argwhere((host < 0) | (host >= V))[0])
        raise ValueError(f"{what} must be in [0, {V}) ({size_name} = {V}), got {int(host[bad])} at position {bad}")


def _check_targets(targets: Any, shape: tuple[int, ...], V: int) -> int:
    """Targets: integers of ``shape`` in [0, V) or IGNORE_INDEX; returns how many are kept."""
    if not _is_integer_array(targets):
        kind = dtype_name(targets.dtype) if hasattr(targets, "dtype") else type(targets).__name__
        raise TypeError(f"targets must be an integer array, got {kind}")
    targets = getval(targets)
    if tuple(targets.shape) != shape:
        raise ValueError(f"targets must have the logits' leading shape {shape}, got {tuple(targets.shape)}")
    t = _np(targets)
    bad = (t != IGNORE_INDEX) & ((t < 0) | (t >= V))
    if bad.any():
        pos = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"targets must be in [0, {V}) or {IGNORE_INDEX} (ignored), got {int(t[pos])} at position {pos}")
    n = int((t != IGNORE_INDEX).sum())
    if n == 0:
        raise ValueError(f"targets: every position is {IGNORE_INDEX} (ignored); the mean loss is undefined")
    return n


def _np(a: Any) -> np.ndarray:
    from lora_ref.backend import to_numpy

    return to_numpy(a)
