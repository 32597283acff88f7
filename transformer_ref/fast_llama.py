"""LLaMA's RMSNorm, SwiGLU and grouped-query attention in the order that trains fastest, for ``fast.FAST``.

The LLaMA counterpart of :mod:`transformer_ref.fast_layers` (read its docstring: the same
contract -- each layer the reference's function, tested equal to it in value and every VJP by
tests/transformer/test_speed_paths.py; in-place updates only on arrays the function has just
created). These layers check their arguments as the reference layers do, with the reference's
own checks. Measured on one thread at n_embd 512, 6 layers, T 128, batch 8
(``python -m benchmarks.breakdown --family llama``; docs/transformer.md):

* :func:`swiglu` -- ``silu(gate) up`` with ``sigmoid(x) = 1 / (1 + exp(-x))``: the reference
  (``layers._sigmoids``) computes both sigmoids from ``d = 1 + exp(-|x|)`` as ``exp(min(x, 0)) / d``
  and ``exp(-max(x, 0)) / d``, three exponentials per element that never overflow; here ``exp(-x)``
  overflows to inf for x below about -88 (float32) or -709 (float64), where 1 / inf = 0 is the sigmoid rounded to zero -- the reference's answer there
  is a subnormal number or zero as well -- and the backward's ``sigmoid(-x) = 1 / (1 + exp(x))``
  likewise, so nothing is computed by cancellation and nothing becomes NaN.
* :func:`rms_norm` -- the textbook formula with the mean square as a matrix-vector product,
  without the reference's power-of-two row scaling (exact, so it changes no finite result);
  falling back to the reference where the mean square overflows, and for float16 (computed in
  float32 there).
* :func:`grouped_query_attention` -- per block of queries against the keys it sees, the softmax
  row term of the backward from the output (as :func:`transformer_ref.fast_layers.causal_attention`).

Shapes: B batch, T tokens, C channels, H query heads, Hk key/value heads, G = H / Hk, D head width.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from autograd.extend import defvjp, defvjp_argnums

from lora_ref.backend import dtype_name, getval, namespace, sum_to_shape

from . import attention as _ref_attention
from . import layers as _ref_layers
from .fast_layers import _all_finite, _block_bias, _keys_part, _query_blocks
from .layers import cached_primitive

__all__ = ["grouped_query_attention", "rms_norm", "swiglu"]


# ============================================================================================
# SwiGLU: silu(gate) up = gate sigmoid(gate) up
# ============================================================================================


def _swiglu(gate: Any, up: Any, cache: dict | None = None) -> Any:
    """gate (...), up (...) of one shape -> (...): layers.swiglu's value."""
    xp = namespace(gate, up)
    with np.errstate(over="ignore"):                                   # exp(-x) = inf: sigmoid 0 (see above)
        s = xp.exp(-gate)
    s += 1.0
    s = 1.0 / s                                                        # sigmoid(gate)
    act = gate * s                                                     # silu(gate)
    if cache is not None:
        cache["s"], cache["act"] = s, act
    return act * up


swiglu = cached_primitive(_swiglu, _ref_layers._check_swiglu)
swiglu.__doc__ = """SwiGLU's gating ``silu(gate) * up``, :func:`transformer_ref.layers.swiglu`'s value
    (same arguments and checks) in a third of the passes."""


# silu'(x) = sigmoid(x) (1 + x sigmoid(-x)),  sigmoid(-x) = 1 / (1 + exp(x))   (no cancellation)
#   dL/dgate = g up silu'(gate),   dL/dup = g silu(gate)
def _swiglu_vjp_gate(ans, gate, up, cache):
    def vjp(g):
        xp = namespace(g)
        with np.errstate(over="ignore"):                               # exp(x) = inf: sigmoid(-x) = 0
            d = xp.exp(gate)
        d += 1.0
        d = 1.0 / d                                                    # sigmoid(-gate)
        d *= gate
        d += 1.0
        d *= cache["s"]                                                # silu'(gate)
        d *= g
        d *= up
        return d
    return vjp


defvjp(swiglu.primitive, _swiglu_vjp_gate, lambda ans, gate, up, cache: lambda g: g * cache["act"])


# ============================================================================================
# RMSNorm: y = x / sqrt(mean(x^2) + eps) * weight, the textbook order
# ============================================================================================


def _rms_norm(x: Any, weight: Any, eps: float, cache: dict | None = None) -> Any:
    """x (..., C), weight (C,), eps a Python float -> (..., C): layers.rms_norm's value."""
    xp = namespace(x, weight)
    if dtype_name(getval(x).dtype) not in ("float32", "float64"):     # float16: computed in float32 there
        return _ref_layers._rms_norm(x, weight, eps, cache)
    C = x.shape[-1]
    X = xp.reshape(x, (-1, C))                                        # (N, C)
    with np.errstate(over="ignore", invalid="ignore"):                # an overflow here is caught below
        ms = (X * X) @ xp.full((C, 1), 1.0 / C, dtype=X.dtype)        # (N, 1) mean(x^2)
    if not _all_finite(ms):                                           # overflow (or a non-finite x):
        return _ref_layers._rms_norm(x, weight, eps, cache)           # the reference's scaled rows
    rho = 1.0 / xp.sqrt(ms + eps)                                     # (N, 1) rsqrt(mean(x^2) + eps)
    xhat = X * rho                                                    # (N, C)
    if cache is not None:
        cache["xhat"], cache["rho"] = xhat, rho
    return xp.reshape(xhat * weight, tuple(x.shape))                  # (..., C)


rms_norm = cached_primitive(_rms_norm, _ref_layers._check_rms_norm)
rms_norm.__doc__ = """RMSNorm over the last axis, :func:`transformer_ref.layers.rms_norm`'s value (same
    arguments and checks) in the textbook order."""


# dL/dx = rho (gw - xhat mean(gw xhat)),  gw = g weight;   dL/dweight = sum_rows g xhat   (layers.py).
# A call that fell back to the reference layer takes the reference's VJPs.
def _rms_norm_vjp_x(ans, x, weight, eps, cache):
    if "rho" not in cache:
        return _ref_layers._rms_norm_vjp_x(ans, x, weight, eps, cache)

    def vjp(g):
        xp = namespace(g)
        C = x.shape[-1]
        xhat, rho = cache["xhat"], cache["rho"]
        gw = xp.reshape(g, (-1, C)) * weight                          # (N, C) dL/dxhat
        m = (gw * xhat) @ xp.full((C, 1), 1.0 / C, dtype=xhat.dtype)  # (N, 1) mean(gw xhat)
        gw -= xhat * m
        gw *= rho                                                     # (N, C) dL/dx
        return xp.reshape(gw, tuple(x.shape))                         # (..., C)
    return vjp


def _rms_norm_vjp_weight(ans, x, weight, eps, cache):
    if "rho" not in cache:
        return lambda g: sum_to_shape(g * cache["out"], weight.shape)
    return lambda g: sum_to_shape(g * namespace(g).reshape(cache["xhat"], tuple(g.shape)), weight.shape)


defvjp(rms_norm.primitive, _rms_norm_vjp_x, _rms_norm_vjp_weight, None)


# ============================================================================================
# Grouped-query causal attention, per block of queries
# ============================================================================================


def _gqa(q: Any, k: Any, v: Any, n_head: int, n_kv_head: int, scale: float, cache: dict | None = None) -> Any:
    """q (B, T, H D), k and v (B, T, Hk D) -> y (B, T, H D): attention.grouped_query_attention's value."""
    xp = namespace(q, k, v)
    Bsz, T, HD = q.shape
    D, G = HD // n_head, n_head // n_kv_head
    qg = _ref_attention._query_groups(xp, q, n_kv_head, G, D)             # (B, Hk, G, T, D)
    kh = xp.expand_dims(_ref_attention._heads(xp, k, n_kv_head, D), axis=2)  # (B, Hk, 1, T, D), shared by G heads
    vh = xp.expand_dims(_ref_attention._heads(xp, v, n_kv_head, D), axis=2)  # (B, Hk, 1, T, D)
    PTs, Ys = [], []
    for s, t in _query_blocks(T):
        ST = kh[..., :t, :] @ xp.matrix_transpose(qg[..., s:t, :])        # (B, Hk, G, t, t - s)  k_j . q_i
        ST *= scale
        ST += _block_bias(xp, s, t, ST.dtype)                             # -inf where key j > query i
        ST -= xp.max(ST, axis=-2, keepdims=True)
        PT = xp.exp(ST)
        PT /= xp.sum(PT, axis=-2, keepdims=True)                          # P^T, softmax over keys [0, t)
        PTs.append(PT)
        Y = xp.matrix_transpose(PT) @ vh[..., :t, :]                      # (B, Hk, G, t - s, D)  P V
        Ys.append(xp.permute_dims(Y, (0, 3, 1, 2, 4)))                    # (B, t - s, Hk, G, D)
    if cache is not None:
        cache["PT"], cache["qg"], cache["kh"], cache["vh"] = PTs, qg, kh, vh
    return xp.reshape(xp.concat(Ys, axis=1), (Bsz, T, HD))                # (B, T, Hk, G, D) -> (B, T, H D)


grouped_query_attention = cached_primitive(_gqa, _ref_attention._check_gqa)
grouped_query_attention.__doc__ = """Causal grouped-query self-attention,
    :func:`transformer_ref.attention.grouped_query_attention`'s value (same arguments and checks),
    per block of queries, with a cheaper backward."""


def _group_sum(xp: Any, a: Any) -> Any:
    """(B, Hk, G, t, D) -> (B, Hk, t, D): the sum over a kv head's G query heads."""
    return a[:, :, 0, :, :] if a.shape[2] == 1 else xp.sum(a, axis=2)


# Per query head (attention.py's derivation, fast_layers.causal_attention's row term
# rowsum(dP * P)_i = g_i . y_i): scale dS^T = P^T * (V (scale Gy)^T - scale delta);
#   dQ = (scale dS) K,  dK = sum over the group of (scale dS)^T Q,  dV = sum over the group of P^T Gy,
# per block of queries [s, t): its dQ rows, and additions to dK and dV of keys [0, t).
def _gqa_vjp(argnums, ans, args, kwargs):
    n_head, n_kv_head, scale, cache = _ref_attention._gqa_vjp_setup(argnums, args, kwargs)

    def vjp(g):
        xp = namespace(g)
        PTs, qg, kh, vh = cache["PT"], cache["qg"], cache["kh"], cache["vh"]
        Bsz, T, HD, Hk, G, D, Gy = _ref_attention._gqa_shapes(xp, g, n_head, n_kv_head)   # Gy (B, Hk, G, T, D)
        scores = 0 in argnums or 1 in argnums
        if scores:
            delta = xp.reshape(g * ans, (-1, D)) @ xp.full((D, 1), scale, dtype=g.dtype)    # (B T H, 1)
            delta = xp.reshape(xp.permute_dims(xp.reshape(delta, (Bsz, T, Hk, G)), (0, 2, 3, 1)),
                               (Bsz, Hk, G, 1, T))                        # scale g_i . y_i, one per query i
            Gs = Gy * scale
        dq = xp.empty((Bsz, T, Hk, G, D), dtype=g.dtype)                 # q's layout (B, T, H D)
        dk = xp.empty((Bsz, T, Hk, D), dtype=g.dtype)
        dv = xp.empty((Bsz, T, Hk, D), dtype=g.dtype)
        for (s, t), PT in reversed(list(zip(_query_blocks(T), PTs))):   # the last block sees every key
            if scores:
                dST = vh[..., :t, :] @ xp.matrix_transpose(Gs[..., s:t, :])   # (B, Hk, G, t, t - s)  scale dP^T
                dST -= delta[..., s:t]
                dST *= PT                                                 # scale dS^T
                dq[:, s:t, ...] = xp.permute_dims(xp.matrix_transpose(dST) @ kh[..., :t, :], (0, 3, 1, 2, 4))
                _keys_part(dk, t, T, xp.permute_dims(_group_sum(xp, dST @ qg[..., s:t, :]), (0, 2, 1, 3)))  # (B, t, Hk, D)
            if 2 in argnums:
                _keys_part(dv, t, T, xp.permute_dims(_group_sum(xp, PT @ Gy[..., s:t, :]), (0, 2, 1, 3)))   # (B, t, Hk, D)
        out = {0: xp.reshape(dq, (Bsz, T, HD)), 1: xp.reshape(dk, (Bsz, T, Hk * D)), 2: xp.reshape(dv, (Bsz, T, Hk * D))}
        return tuple(out[i] for i in argnums)

    return vjp


defvjp_argnums(grouped_query_attention.primitive, _gqa_vjp)
