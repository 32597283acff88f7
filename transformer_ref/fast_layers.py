"""GPT-2's LayerNorm, GELU and causal attention in the order that trains fastest, for ``fast.FAST``.

Each layer here computes what its namesake in :mod:`transformer_ref.layers` /
:mod:`transformer_ref.attention` computes -- the same function, the same arguments, the same
gradients up to rounding (tests/transformer/test_speed_paths.py holds value and every VJP to the
reference, by hypothesis, within bounds derived from the rounding chains) -- with fewer passes
over memory. These layers are memory-bound (a few flops per element read), so passes are what
they cost. Measured on one thread (``python -m benchmarks.breakdown``; docs/transformer.md):

* :func:`layer_norm` -- the textbook formula, row means as matrix-vector products (``X @ (1/C)``:
  BLAS, several times faster than NumPy's reduction along a short last axis), without the
  reference's power-of-two row scaling. That scaling only changes exponents, so for every row
  whose variance is finite both give the same value up to rounding; a row whose textbook
  variance overflows (|x| beyond ~1e19 in float32) makes the whole call fall back to the
  reference layer, as does a non-finite input (the reference's NaN row). The squares' work
  array is reused for y, and the backward's for its last term.
* :func:`gelu` -- ``x s`` with ``s = (1 + tanh(u)) / 2``, ``u = c (x + k x^3)``: the reference's
  value, with one work array (x^2, then u, then s, kept for the backward); the backward takes
  ``x (1 - s)`` as ``x - y`` from the output instead of keeping ``x^2``. Fresh arrays cost more
  than passes over warm ones: this was measured 12% faster than keeping ``x^2`` (forward and
  backward at N = 1024, F = 2048, thread CPU time).
* :func:`causal_attention` -- the reference's scores and softmax, computed per block of queries
  against the keys that block can see (3/4 of the T x T work for two blocks); the backward
  takes the softmax's row term from the output, ``rowsum(dP * P) = rowsum(G * Y)``
  (FlashAttention's ``D_i = dO_i . O_i``: ``sum_j dP_ij P_ij = sum_j (g_i . v_j) P_ij = g_i . y_i``),
  a (B, T, C) product instead of a (B, H, T, T) one, the scale rides on the smaller ``G``, and
  with NumPy arrays ``P V`` and the three gradients are written by BLAS straight into y's and
  qkv's layouts (``matmul``'s ``out``, a strided view) instead of through transposing copies
  (measured 9% less for forward and backward at B 8, T 128, C 512, thread CPU time).

In-place updates: each forward and backward here writes, with ``*=``, ``+=``, ``-=`` (and the
attention's backward with slice assignment), into arrays it has just created itself and that
nothing else holds yet (never an argument, never an array already in the cache). That is what
saves the passes: ``u *= x`` reuses memory that is in cache instead of filling a new array. It
is safe under autograd: these functions run on plain arrays inside their primitives, and when
``traced(FAST)`` has autograd.numpy trace the bare forward, an ``ArrayBox`` has no in-place
operators, so ``u *= x`` rebinds ``u`` to a new box -- plain differentiable code. Writing with
``out=`` (:func:`_in_place`, :func:`_into`, :func:`_product_into`) follows the same rule and
happens for NumPy arrays only; other arrays (array_api_strict, a box) get a new array, the same
numbers. The reference layers do not do this.

Shapes: B batch, T tokens, C channels, H heads, D = C / H, N = rows (B T), F = MLP width.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from autograd.extend import defvjp

from lora_ref.backend import getval, namespace, sum_to_shape

from . import layers as _ref_layers
from .attention import _split_heads
from .layers import cached_primitive

__all__ = ["causal_attention", "gelu", "layer_norm"]


def _all_finite(a: Any) -> bool:
    """Whether every entry of ``a`` (a small array, e.g. (N, 1)) is finite; read on its value."""
    a = getval(a)
    xp = namespace(a)
    return bool(xp.all(xp.isfinite(a)))


def _into(name: str, a: Any, b: Any, out: Any) -> Any:
    """The elementwise ``name`` (``"multiply"``, ...) of ``a`` and ``b``, written into ``out`` -- the
    caller's own work array of the result's shape, no longer needed -- where all three are NumPy
    arrays (``out=``: no fresh memory); a new array otherwise."""
    if all(type(z) is np.ndarray for z in (a, b, out)):
        return getattr(np, name)(a, b, out=out)
    return getattr(namespace(a, b), name)(a, b)


def _in_place(f: Any, a: Any) -> Any:
    """``f(a)`` for an elementwise ``f`` (``xp.exp``, ``xp.tanh``), written over ``a`` where ``a`` is a
    NumPy array (``out=``: no fresh memory); a new array otherwise (the array API has no ``out``,
    and an autograd box no buffer). ``a`` must be the caller's own work array."""
    return f(a, out=a) if type(a) is np.ndarray else f(a)


# ============================================================================================
# LayerNorm: y = (x - mean) / sqrt(var + eps) * weight + bias, the textbook order
# ============================================================================================


def _layer_norm(x: Any, weight: Any, bias: Any, eps: float, cache: dict | None = None) -> Any:
    """x (..., C), weight (C,), bias (C,), eps a Python float -> (..., C); layers.layer_norm's value."""
    xp = namespace(x, weight, bias)
    C = x.shape[-1]
    X = xp.reshape(x, (-1, C))                                        # (N, C)
    avg = xp.full((C, 1), 1.0 / C, dtype=X.dtype)                     # (C, 1): X @ avg = row means
    with np.errstate(over="ignore", invalid="ignore"):                # an overflow here is caught below
        xc = X - X @ avg                                              # (N, C) x - mean
        sq = xc * xc                                                  # (N, C) work array, y's later
        var = sq @ avg                                                # (N, 1) biased, as GPT-2
    if not _all_finite(var):                                          # overflow (or a non-finite x):
        return _ref_layers._layer_norm(x, weight, bias, eps, cache)   # the reference's scaled rows
    rstd = 1.0 / xp.sqrt(var + eps)                                   # (N, 1)
    xc *= rstd                                                        # (N, C) xhat = (x - mean) rstd
    y = _into("multiply", xc, weight, sq)
    y += bias                                                         # (N, C) xhat weight + bias
    if cache is not None:
        cache["xhat"], cache["rstd"] = xc, rstd
    return xp.reshape(y, tuple(x.shape))                              # (..., C)


layer_norm = cached_primitive(_layer_norm)
layer_norm.__doc__ = """LayerNorm over the last axis, :func:`transformer_ref.layers.layer_norm`'s value in
    the textbook order (see the module docstring). x (..., C); weight, bias (C,); eps a Python float.
    """


# dL/dx = rstd (gw - mean(gw) - xhat mean(gw xhat)),  gw = g weight   (layers.layer_norm's derivation)
# dL/dweight = sum_rows g xhat,   dL/dbias = sum_rows g.  A call that fell back to the reference
# layer (its cache holds the scaled rows' r and 1/t) takes the reference's VJP.
def _ln_vjp_x(ans, x, weight, bias, eps, cache):
    if "rstd" not in cache:
        return _ref_layers._ln_vjp_x(ans, x, weight, bias, eps, cache)

    def vjp(g):
        xp = namespace(g)
        C = x.shape[-1]
        xhat, rstd = cache["xhat"], cache["rstd"]
        avg = xp.full((C, 1), 1.0 / C, dtype=xhat.dtype)              # (C, 1)
        gw = xp.reshape(g, (-1, C)) * weight                          # (N, C) dL/dxhat
        m1 = gw @ avg                                                 # (N, 1) mean(gw)
        t = gw * xhat                                                 # (N, C) work array
        m2 = t @ avg                                                  # (N, 1) mean(gw xhat)
        t = _into("multiply", xhat, m2, t)
        t += m1
        gw -= t                                                       # gw - mean(gw) - xhat mean(gw xhat)
        gw *= rstd                                                    # (N, C) dL/dx
        return xp.reshape(gw, tuple(x.shape))                         # (..., C)
    return vjp


def _ln_xhat(cache: dict, shape: tuple[int, ...]) -> Any:
    xhat = cache["xhat"]
    return namespace(xhat).reshape(xhat, shape)


defvjp(layer_norm.primitive,
       _ln_vjp_x,
       lambda ans, x, weight, bias, eps, cache: lambda g: sum_to_shape(g * _ln_xhat(cache, tuple(g.shape)),
                                                                       weight.shape),
       lambda ans, x, weight, bias, eps, cache: lambda g: sum_to_shape(g, bias.shape),
       None)


# ============================================================================================
# GELU (tanh approximation): y = x s,  s = (1 + tanh(u)) / 2,  u = c (x + k x^3)
# ============================================================================================

_C = _ref_layers._GELU_C          # sqrt(2 / pi), a Python float
_K = _ref_layers._GELU_K          # 0.044715


def _gelu(x: Any, cache: dict | None = None) -> Any:
    """x (...) -> (...), elementwise; layers.gelu's value: 0.5 x (1 + tanh(u)) = x (1 + tanh(u)) / 2."""
    xp = namespace(x)
    s = x * x                                                         # the one work array: x^2, u, s
    s *= _C * _K
    s += _C
    s *= x                                                            # u = c x + c k x^3
    s = _in_place(xp.tanh, s)
    s *= 0.5
    s += 0.5                                                          # s = (1 + tanh u) / 2
    if cache is not None:
        cache["s"] = s
    return x * s


gelu = cached_primitive(_gelu)
gelu.__doc__ = """GPT-2's GELU (tanh approximation), :func:`transformer_ref.layers.gelu`'s value
    in fewer passes. x any shape, float."""


# y = x s:  dy/dx = s + x ds/dx,  ds/dx = (1 - tanh(u)^2) u' / 2 = 2 s (1 - s) u'  (1 - t^2 = 4 s (1 - s)
# for t = 2 s - 1),  u' = c + 3 c k x^2.  So  dy/dx = s (1 + x (1 - s)(2c + 6 c k x^2)), and
# x (1 - s) = x - y: the forward's output (ans) gives it in one pass, with no array kept for it.
def _gelu_vjp(ans, x, cache):
    def vjp(g):
        s = cache["s"]
        d = x * x
        d *= 6.0 * _C * _K
        d += 2.0 * _C                                                 # 2 u'
        d *= x - ans                                                  # x (1 - s) 2 u'
        d += 1.0
        d *= s                                                        # dy/dx
        d *= g
        return d
    return vjp


defvjp(gelu.primitive, _gelu_vjp)


# ============================================================================================
# Causal self-attention: y = softmax(q k^T scale + causal mask) v, every head at once
# ============================================================================================
#
# Query i attends to keys j <= i only: half the T x T scores are masked. The queries are taken in
# n blocks [s, t), and block [s, t) is scored against keys [0, t) alone -- the keys after t are
# masked for every query of the block -- so the score and P V products, and the softmax's
# elementwise work, cover (n + 1) / (2 n) of the full T x T (3/4 for n = 2): blocks of about 64
# queries, at least 2 (measured fastest at T = 64 and 128; more blocks, smaller matrix products).
# Scores are kept transposed, S^T with keys along axis -2, as in attention.py.


def _query_blocks(T: int) -> list[tuple[int, int]]:
    """[s, t) ranges splitting T queries into max(2, ceil(T / 64)) blocks (one for T = 1)."""
    n = 1 if T < 2 else max(2, -(-T // 64))
    edges = [T * b // n for b in range(n + 1)]
    return list(zip(edges[:-1], edges[1:]))


def _block_bias(xp: Any, s: int, t: int, dtype: Any) -> Any:
    """(t, t - s) additive mask [key j, query i] for keys [0, t) and queries [s, t): 0 where j <= i, -inf after."""
    keep = xp.reshape(xp.arange(t), (t, 1)) <= xp.reshape(xp.arange(s, t), (1, t - s))
    return xp.where(keep, xp.zeros((t, t - s), dtype=dtype), xp.full((t, t - s), -math.inf, dtype=dtype))


def _keys_part(d: Any, t: int, T: int, part: Any, *inner: Any) -> None:
    """Write a block's contribution to the gradient of keys [0, t) into ``d[:, :t, *inner]`` (d is
    (B, T, ...), a backward's own fresh array): the block that sees every key (t = T, taken first)
    sets it, the others add to it."""
    at = (slice(None), slice(0, t)) + inner + (Ellipsis,)
    if t == T:
        d[at] = part
    else:
        d[at] += part


def _product_into(d: Any, rows: slice, i: int, a: Any, b: Any, add: bool = False) -> None:
    """``d[:, rows, i] = a @ b`` (or ``+=`` with ``add``): a (B, H, n, m) @ b (B, H, m, D) is (B, H, n, D),
    stored in d's (B, T, 3, H, D) layout as (B, n, H, D). ``d`` is a backward's own fresh array. With
    NumPy arrays a product that is written, not added, goes straight into d's memory (``matmul``'s
    ``out``, a strided view BLAS writes through): the same numbers, without a (B, H, n, D) temporary
    and its transposing copy."""
    if not add and all(type(z) is np.ndarray for z in (d, a, b)):
        np.matmul(a, b, out=np.transpose(d[:, rows, i], (0, 2, 1, 3)))
        return
    xp = namespace(d, a, b)
    part = xp.permute_dims(a @ b, (0, 2, 1, 3))                           # (B, n, H, D)
    if add:
        d[:, rows, i, :, :] += part
    else:
        d[:, rows, i, :, :] = part


def _causal_attention(qkv: Any, n_head: int, scale: float, cache: dict | None = None) -> Any:
    """qkv (B, T, 3C) = [q | k | v] -> y (B, T, C); attention.causal_attention's value, per block of queries."""
    xp = namespace(qkv)
    Bsz, T, C3 = qkv.shape
    C = C3 // 3
    D = C // n_head
    q, k, v = _split_heads(xp, qkv, n_head)                             # (B, H, T, D) views
    into = type(qkv) is np.ndarray                                      # NumPy: P V written straight into y
    y = np.empty((Bsz, T, n_head, D), dtype=qkv.dtype) if into else None  # (B, T, H, D), y's layout
    PTs, Ys = [], []
    for s, t in _query_blocks(T):
        ST = k[:, :, :t, :] @ xp.matrix_transpose(q[:, :, s:t, :])      # (B, H, t, t - s)  S^T[j, i] = k_j . q_i
        ST *= scale
        ST += _block_bias(xp, s, t, ST.dtype)                           # -inf where key j > query i
        ST -= xp.max(ST, axis=-2, keepdims=True)                        # per query; finite (key j = i)
        PT = xp.exp(ST)                                                 # masked entries: exp(-inf) = 0
        PT /= xp.sum(PT, axis=-2, keepdims=True)                        # P^T, softmax over keys [0, t)
        PTs.append(PT)
        if into:                                                        # (B, H, t - s, D) view of y's rows [s, t)
            np.matmul(xp.matrix_transpose(PT), v[:, :, :t, :], out=np.transpose(y[:, s:t], (0, 2, 1, 3)))
        else:
            Y = xp.matrix_transpose(PT) @ v[:, :, :t, :]                # (B, H, t - s, D)  P V
            Ys.append(xp.permute_dims(Y, (0, 2, 1, 3)))                 # (B, t - s, H, D)
    if cache is not None:
        cache["PT"], cache["q"], cache["k"], cache["v"] = PTs, q, k, v
    return xp.reshape(y if into else xp.concat(Ys, axis=1), (Bsz, T, C))  # (B, T, H, D) -> (B, T, C)


causal_attention = cached_primitive(_causal_attention)
causal_attention.__doc__ = """Causal multi-head self-attention, :func:`transformer_ref.attention.causal_attention`'s
    value (qkv (B, T, 3C), n_head, scale a Python float -> (B, T, C)), scoring each block of
    queries against the keys it can see, with a cheaper backward."""


# With P = softmax(S), Y = P V, G = dL/dY (attention.py's derivation):
#   dS = P * (dP - rowsum(dP * P)),   dP = G V^T,   and  rowsum(dP * P)_i = sum_j (g_i . v_j) P_ij = g_i . y_i
# so the row term is the per-head dot product of g and the output y (= ans): (B, T, C) work, not
# (B, H, T, T). With scale folded into G and the row term:  scale dS^T = P^T * (V (scale G)^T - scale delta);
#   dQ = (scale dS) K,   dK = (scale dS)^T Q,   dV = P^T G,
# per block of queries [s, t): its dQ rows are its own; it adds to dK and dV of keys [0, t). The
# blocks are taken last first, so the block that sees every key writes dK and dV, the others add.
def _attention_vjp(ans, qkv, n_head, scale, cache):
    def vjp(g):
        xp = namespace(g)
        Bsz, T, C = g.shape
        D = C // n_head
        PTs, q, k, v = cache["PT"], cache["q"], cache["k"], cache["v"]
        G = xp.permute_dims(xp.reshape(g, (Bsz, T, n_head, D)), (0, 2, 1, 3))  # (B, H, T, D) dL/dY
        gy = xp.reshape(g * ans, (-1, D))                                 # (B T H, D)
        delta = gy @ xp.full((D, 1), scale, dtype=gy.dtype)               # (B T H, 1)  scale g_i . y_i per head
        delta = xp.reshape(xp.permute_dims(xp.reshape(delta, (Bsz, T, n_head)), (0, 2, 1)),
                           (Bsz, n_head, 1, T))                           # (B, H, 1, T): one per query i
        Gs = G * scale                                                    # (B, H, T, D)
        d = xp.empty((Bsz, T, 3, n_head, D), dtype=g.dtype)               # [dq | dk | dv] in qkv's layout
        for (s, t), PT in reversed(list(zip(_query_blocks(T), PTs))):
            dST = v[:, :, :t, :] @ xp.matrix_transpose(Gs[:, :, s:t, :])  # (B, H, t, t - s)  scale dP^T
            dST -= delta[:, :, :, s:t]
            dST *= PT                                                     # scale dS^T
            _product_into(d, slice(s, t), 0, xp.matrix_transpose(dST), k[:, :, :t, :])        # scale dS K
            _product_into(d, slice(0, t), 1, dST, q[:, :, s:t, :], add=t < T)               # scale dS^T Q
            _product_into(d, slice(0, t), 2, PT, G[:, :, s:t, :], add=t < T)                # P^T G
        return xp.reshape(d, (Bsz, T, 3 * C))                             # (B, T, 3C)
    return vjp


defvjp(causal_attention.primitive, _attention_vjp, None, None)
