"""transformer_ref.attention, each layer on its own: GPT-2's fused causal attention, rotary
position embedding (RoPE) and grouped-query attention. Forward against a textbook formula, the
hand-written VJP against autograd.numpy tracing the undecorated forward (``layer.fun``) and
against central finite differences (autograd.test_util.check_grads), in float64; float32 against
float64; array_api_strict against NumPy; bad input.

Bounds (lora_ref.testing): one computation of ``n`` chained roundings is within ``gamma_n M`` of
the exact value, ``M`` the computation on absolute values; two computations of the same dtype
differ by at most ``2 gamma_n M``; float32 against float64 by ``(gamma_n(f32) + gamma_n(f64)) M``.
Counting rules used below: a sum of k terms adds k - 1 roundings to the largest count among its
terms (relative to the sum of their absolute values); a product or quotient adds 1 to the sum of
its factors' counts; sqrt, exp, cos, sin (within 1 ulp) count 2. Each layer's counts are derived
beside its test:

  apply_rope y: 3          dx: 2           (4 and 3 in float32 with tables rounded from float64)
  attention  y: 4 A gamma(D + 2) + gamma(2T + 4), dq: 2 eps_P + gamma(D + 2T + 3), dk: ... + G,
             dv: eps_P + gamma(T + G), eps_P = 4 A gamma(D + 2) + gamma(T + 4)   (A: see below)
"""

from __future__ import annotations

import math

import autograd
import numpy as np
import pytest
from autograd.test_util import check_grads
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_ref import asarray, to_numpy, use_backend
from lora_ref.testing import assert_within, tolerance
from transformer_ref.attention import apply_rope, causal_attention, grouped_query_attention, rope, rope_tables

from _vjp_helpers import both_grads, grads  # noqa: E402

F64, F32, F16 = "float64", "float32", "float16"


shapes = st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 3))  # (B, T, heads)

# ----------------------------------------------------------------------------------------------
# Causal attention
# ----------------------------------------------------------------------------------------------


def reference_attention(qkv, H, scale):
    """Per head, a Python loop, the textbook formula (the layer's oracle)."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    D = C // H
    q, k, v = qkv[..., :C], qkv[..., C:2 * C], qkv[..., 2 * C:]
    out = np.zeros((B, T, C))
    for h in range(H):
        cols = slice(h * D, (h + 1) * D)
        S = q[..., cols] @ np.swapaxes(k[..., cols], -1, -2) * scale        # (B, T, T)
        S = np.where(np.tril(np.ones((T, T), bool)), S, -np.inf)
        P = np.exp(S - S.max(-1, keepdims=True))
        P = P / P.sum(-1, keepdims=True)
        out[..., cols] = P @ v[..., cols]
    return out


@given(shape=shapes, D=st.integers(1, 4), seed=st.integers(0, 2**31))
def test_attention_forward_and_vjp(shape, D, seed):
    B, T, H = shape
    C = H * D
    rng = np.random.default_rng(seed)
    qkv = rng.standard_normal((B, T, 3 * C))
    g = rng.standard_normal((B, T, C))
    scale = 1.0 / math.sqrt(D)
    # forward: scores (D + 1), softmax (max, exp, sum over T, divide: T + 3), P V (T): n = D + 2T + 4;
    # the output is an average of v rows (P sums to 1), so |y| <= max |v| in its head's columns.
    vmax = np.abs(qkv[..., 2 * C:]).max()
    assert_within(causal_attention(qkv, H, scale), reference_attention(qkv, H, scale),
                  2 * tolerance(F64, D + 2 * T + 4) * vmax, what="attention")
    # backward: dP = G V^T (D), dS = P (dP - sum(dP P)) (T + 2), dq = scale dS K (T + 1) on top of
    # the forward's D + 2T + 4. Terms bounded by: |dP| <= D max|g| max|v|, so
    # |dS| <= 2 D max|g| max|v| and |dq|, |dk| <= T * that * scale * max|q,k|; |dv| <= T max|g|.
    gmax, qkmax = np.abs(g).max(), np.abs(qkv[..., :2 * C]).max()
    M = max(2 * D * gmax * vmax * scale * qkmax * T, T * gmax)
    hand, auto = both_grads(causal_attention, (qkv, H, scale), 0, g)
    assert_within(hand, auto, 2 * tolerance(F64, 2 * D + 5 * T + 10) * M, what="attention dqkv")


def test_attention_finite_differences():
    rng = np.random.default_rng(1)
    qkv = rng.standard_normal((2, 4, 12))
    check_grads(lambda a: causal_attention(a, 2, 0.5), modes=["rev"], order=1)(qkv)


# ----------------------------------------------------------------------------------------------
# RoPE
# ----------------------------------------------------------------------------------------------


def rope_textbook(x, positions, theta):
    """Pair by pair: channels i and i + D/2 turned by angle p / theta^(2i/D) (Python math)."""
    B, T, H, D = x.shape
    h = D // 2
    pos = np.broadcast_to(positions, (B, T))
    out = np.empty_like(x)
    for b, t, i in np.ndindex(B, T, h):
        a = float(pos[b, t]) * (1.0 / theta ** (2 * i / D))
        c, s = math.cos(a), math.sin(a)
        out[b, t, :, i] = x[b, t, :, i] * c - x[b, t, :, i + h] * s
        out[b, t, :, i + h] = x[b, t, :, i + h] * c + x[b, t, :, i] * s
    return out


def rotate_abs(a):
    """|rotate_half(a)| = the halves of |a| swapped."""
    h = a.shape[-1] // 2
    return np.concatenate([a[..., h:], a[..., :h]], axis=-1)


def rope_magnitude(a, cos, sin):
    """|a| |cos| + |rotate_half(a)| |sin|, the magnitude of apply_rope(a) and of its VJP at a."""
    a = np.abs(np.asarray(a, np.float64))
    return a * np.abs(np.expand_dims(cos, -2)) + rotate_abs(a) * np.abs(np.expand_dims(sin, -2))


def test_rope_tables():
    """Exact values where they are known; elsewhere within 2 ulp of a value <= 1 (both sides take
    the same float64 angle; numpy's and math's cos/sin are each within 1 ulp)."""
    D, theta = 8, 500000.0
    pos = np.array([[0, 1, 7, 1000]])
    cos, sin = rope_tables(pos, D, theta, F64)
    assert cos.shape == sin.shape == (1, 4, D) and cos.dtype == np.float64
    assert np.all(cos[0, 0] == 1.0) and np.all(sin[0, 0] == 0.0)                   # position 0
    assert np.array_equal(cos[..., :4], cos[..., 4:]) and np.array_equal(sin[..., :4], sin[..., 4:])
    ref = np.array([[1.0 / theta ** (2 * i / D) for i in range(D // 2)] * 2]) * pos[0, :, None]
    assert np.all(ref[:, 0] == pos[0])                                             # inv_freq_0 = 1 exactly
    assert_within(cos[0], np.vectorize(math.cos)(ref), 2 * tolerance(F64, 2), what="cos table")
    assert_within(sin[0], np.vectorize(math.sin)(ref), 2 * tolerance(F64, 2), what="sin table")
    c32, s32 = rope_tables(pos[0], D, theta, F32)                                  # (T,) positions
    assert c32.shape == (4, D) and c32.dtype == np.float32
    for t32, t64 in ((c32, cos[0]), (s32, sin[0])):   # one rounding of a value <= 1, after up to 2u of libm
        assert_within(t32, t64, tolerance(F32, 1) + 2 * tolerance(F64, 2), what="float32 table")


# apply_rope: y = x c + R(x) s: two products (1 each) and an add: 3 roundings on M = |x||c| + |Rx||s|
# (the textbook formula, pair by pair, the same 3). dx = g c - R(g s): 2, as autograd's g c + R^T(g s).
@given(B=st.integers(1, 2), T=st.integers(1, 5), H=st.integers(1, 3), half=st.integers(1, 4),
       per_batch=st.booleans(), seed=st.integers(0, 2**31))
def test_rope_forward_and_vjp(B, T, H, half, per_batch, seed):
    rng = np.random.default_rng(seed)
    D, theta = 2 * half, float(rng.choice([10000.0, 500000.0]))
    x, g = rng.standard_normal((B, T, H, D)), rng.standard_normal((B, T, H, D))
    pos = rng.integers(0, 4096, size=(B, T) if per_batch else (T,))
    cos, sin = rope_tables(pos, D, theta, F64)
    c, s = np.abs(np.expand_dims(cos, -2)), np.abs(np.expand_dims(sin, -2))
    rot = rotate_abs
    M = rope_magnitude(x, cos, sin)
    # the textbook takes its own angles (math.cos vs numpy.cos of the same float64 angle: 2u of <= 1 each)
    bound = 2 * tolerance(F64, 3) * M + 2 * tolerance(F64, 2) * (np.abs(x) + rot(np.abs(x)))
    assert_within(rope(x, pos, theta), rope_textbook(x, pos, theta), bound, what="rope")
    hand, auto = both_grads(apply_rope, (x, cos, sin), 0, g)
    assert_within(hand, auto, 2 * tolerance(F64, 2) * rope_magnitude(g, cos, sin), what="rope dx")
    # the VJP is the inverse rotation: the gradient of y at g = y is x (one computation against exact x:
    # y's 3 roundings, rotated back, plus the VJP's 2, on |y| c + |R y| s <= M c + R(M) s)
    back = grads(apply_rope, (x, cos, sin), (0,), apply_rope(x, cos, sin))[0]
    assert_within(back, x, tolerance(F64, 5) * (M * c + rot(M) * s), what="rope inverse")


def test_rope_on_heads_along_channels_is_rope_per_head():
    """x (B, T, H D), heads along channels (a projection's output), is the (B, T, H, D) layout's
    rotation, bit for bit, value and gradient: the same arithmetic on a reshaped view."""
    rng = np.random.default_rng(8)
    x, g = rng.standard_normal((2, 3, 4, 6)), rng.standard_normal((2, 3, 4, 6))
    cos, sin = rope_tables(np.arange(3), 6, 500000.0, F64)
    flat = lambda a: a.reshape(2, 3, 24)   # noqa: E731  (B, T, H, D) -> (B, T, H D)
    assert np.array_equal(apply_rope(flat(x), cos, sin), flat(apply_rope(x, cos, sin)))
    assert np.array_equal(grads(apply_rope, (flat(x), cos, sin), (0,), flat(g))[0],
                          flat(grads(apply_rope, (x, cos, sin), (0,), g)[0]))
    hand, auto = both_grads(apply_rope, (flat(x), cos, sin), 0, flat(g))
    assert_within(hand, auto, 2 * tolerance(F64, 2) * flat(rope_magnitude(g, cos, sin)), what="rope dx (B, T, H D)")


def test_rope_finite_differences_and_float32():
    rng = np.random.default_rng(2)
    x, pos = rng.standard_normal((2, 3, 2, 6)), np.array([[0, 5, 9], [3, 4, 100]])
    check_grads(lambda a: rope(a, pos, 10000.0), modes=["rev"], order=1)(x)
    x32, g = x.astype(F32), rng.standard_normal(x.shape).astype(F32)
    cos, sin = rope_tables(pos, 6, 10000.0, F64)
    M = rope_magnitude(x32, cos, sin)
    y = rope(x32, pos, 10000.0)          # float32 tables: one more rounding than float64's
    assert y.dtype == np.float32
    assert_within(y, apply_rope(x32.astype(F64), cos, sin), (tolerance(F32, 4) + tolerance(F64, 3)) * M,
                  what="rope f32")
    Mg = rope_magnitude(g, cos, sin)
    dx = grads(rope, (x32, pos, 10000.0), (0,), g)[0]
    dx64 = grads(apply_rope, (x32.astype(F64), cos, sin), (0,), g.astype(F64))[0]
    assert dx.dtype == np.float32
    assert_within(dx, dx64, (tolerance(F32, 3) + tolerance(F64, 2)) * Mg, what="rope dx f32")


# ----------------------------------------------------------------------------------------------
# Grouped-query attention
# ----------------------------------------------------------------------------------------------
#
# Error model of one computation (per query head, query i, key l <= i; textbook float64 as the
# oracle for the values and the magnitudes). a_il = scale |q_i| . |k_l| bounds |S_il| and
# A_i = max_l a_il. S carries gamma(D + 1) a_il (dot, scale); S - max(S) an absolute error
# <= 2 A_i gamma(D + 2), which exp turns into a relative one (plus its own 2u): the amplification
# by A_i that a plain count misses. E, sum, divide: eps_P = 4 A_i gamma(D + 2) + gamma(T + 4).
# Y = P V: eps_P + gamma(T) on P|v|. Backward: dP = Gy V^T gamma(D) on b = |Gy| |V|^T;
# rowsum(dP P) + T; subtract, * P, * scale: dS within 2 eps_P + gamma(D + T + 3) of
# Ms = scale P (b + rowsum(b P)); dq = dS K: + T on Ms |K|; dk = sum over the group and the queries
# of dS^T Q: + T + G on Ms^T |Q|; dv = sum of P^T Gy: eps_P + gamma(T + G) on P^T |Gy|.


def attention_reference(q, k, v, g, H, Hk, scale, dtype):
    """Textbook per-head attention in float64 (query head h reads kv head h // (H / Hk)) with its
    VJP, and the error bound of one ``dtype`` computation of each: dict of y, dq, dk, dv and
    bound_y, bound_dq, bound_dk, bound_dv."""
    q, k, v, g = (np.asarray(to_numpy(a), np.float64) for a in (q, k, v, g))
    B, T, HD = q.shape
    D, G = HD // H, H // Hk
    gam = lambda n: tolerance(dtype, n)   # noqa: E731
    out = {name: np.zeros(a.shape) for name, a in (("y", q), ("dq", q), ("dk", k), ("dv", v),
                                                    ("bound_y", q), ("bound_dq", q), ("bound_dk", k), ("bound_dv", v))}
    causal = np.tril(np.ones((T, T), bool))
    for b, h in np.ndindex(B, H):
        qc, kc = slice(h * D, (h + 1) * D), slice((h // G) * D, (h // G + 1) * D)
        Q, K, V, Gy = q[b, :, qc], k[b, :, kc], v[b, :, kc], g[b, :, qc]
        S = np.where(causal, Q @ K.T * scale, -np.inf)
        P = np.exp(S - S.max(1, keepdims=True))
        P /= P.sum(1, keepdims=True)
        dP = Gy @ V.T
        dS = P * (dP - (dP * P).sum(1, keepdims=True)) * scale
        a = np.where(causal, np.abs(Q) @ np.abs(K).T * scale, 0.0)
        eps_P = 4 * a.max(1) * gam(D + 2) + gam(T + 4)                           # (T,) per query
        bmat = np.abs(Gy) @ np.abs(V).T
        Ms = scale * P * (bmat + (bmat * P).sum(1, keepdims=True))
        out["y"][b, :, qc] = P @ V
        out["dq"][b, :, qc] = dS @ K
        out["dk"][b, :, kc] += dS.T @ Q
        out["dv"][b, :, kc] += P.T @ Gy
        out["bound_y"][b, :, qc] = (eps_P + gam(T))[:, None] * (P @ np.abs(V))
        out["bound_dq"][b, :, qc] = (2 * eps_P + gam(D + 2 * T + 3))[:, None] * (Ms @ np.abs(K))
        out["bound_dk"][b, :, kc] += Ms.T @ (np.abs(Q) * (2 * eps_P + gam(D + 2 * T + 3 + G))[:, None])
        out["bound_dv"][b, :, kc] += P.T @ (np.abs(Gy) * (eps_P + gam(T + G))[:, None])
    return out


def attention_inputs(rng, B, T, H, Hk, D, dtype=F64):
    q = rng.standard_normal((B, T, H * D))
    k, v = rng.standard_normal((B, T, Hk * D)), rng.standard_normal((B, T, Hk * D))
    g = rng.standard_normal((B, T, H * D))
    return tuple(a.astype(dtype) for a in (q, k, v, g))


gqa_shapes = st.tuples(st.integers(1, 2), st.integers(1, 5), st.integers(1, 3), st.integers(1, 3),
                       st.integers(1, 4))       # (B, T, Hk, G, D)


@given(shape=gqa_shapes, seed=st.integers(0, 2**31))
def test_gqa_forward_and_vjps(shape, seed):
    B, T, Hk, G, D = shape
    H, scale = Hk * G, D ** -0.5
    q, k, v, g = attention_inputs(np.random.default_rng(seed), B, T, H, Hk, D)
    ref = attention_reference(q, k, v, g, H, Hk, scale, F64)
    args = (q, k, v, H, Hk, scale)
    assert_within(grouped_query_attention(*args), ref["y"], 2 * ref["bound_y"], what="gqa")
    for i, name in enumerate(("dq", "dk", "dv")):
        hand, auto = both_grads(grouped_query_attention, args, i, g)
        assert_within(hand, ref[name], 2 * ref["bound_" + name], what=f"gqa {name}")
        assert_within(auto, ref[name], 2 * ref["bound_" + name], what=f"gqa {name} (autograd.numpy)")


def test_gqa_finite_differences():
    q, k, v, _ = attention_inputs(np.random.default_rng(6), 2, 4, 4, 2, 3)
    check_grads(lambda q, k, v: grouped_query_attention(q, k, v, 4, 2, 0.5), modes=["rev"], order=1)(q, k, v)


@given(shape=gqa_shapes, seed=st.integers(0, 2**31))
def test_gqa_is_mha_with_repeated_kv_heads(shape, seed):
    """GQA equals GPT-2's causal_attention (transformer_ref.layers) on k, v with each kv head
    repeated G times consecutively (transformers' repeat_kv); its dk, dv are the group sums."""
    B, T, Hk, G, D = shape
    H, scale = Hk * G, D ** -0.5
    q, k, v, g = attention_inputs(np.random.default_rng(seed), B, T, H, Hk, D)
    rep = lambda a: np.repeat(a.reshape(B, T, Hk, 1, D), G, axis=3).reshape(B, T, H * D)  # noqa: E731  (B, T, H D)
    ref = attention_reference(q, k, v, g, H, Hk, scale, F64)
    qkv = np.concatenate([q, rep(k), rep(v)], axis=-1)                    # (B, T, 3 H D)
    assert_within(grouped_query_attention(q, k, v, H, Hk, scale), causal_attention(qkv, H, scale),
                  2 * ref["bound_y"], what="gqa vs mha")
    dq, dk, dv = grads(grouped_query_attention, (q, k, v, H, Hk, scale), (0, 1, 2), g)
    dqkv = grads(causal_attention, (qkv, H, scale), (0,), g)[0]
    group_sum = lambda a: a.reshape(B, T, Hk, G, D).sum(3).reshape(B, T, Hk * D)  # noqa: E731
    assert_within(dq, dqkv[..., :H * D], 2 * ref["bound_dq"], what="gqa dq vs mha")
    assert_within(dk, group_sum(dqkv[..., H * D:2 * H * D]), 2 * ref["bound_dk"], what="gqa dk vs mha")
    assert_within(dv, group_sum(dqkv[..., 2 * H * D:]), 2 * ref["bound_dv"], what="gqa dv vs mha")


@settings(max_examples=20)
@given(shape=gqa_shapes, seed=st.integers(0, 2**31))
def test_gqa_float32(shape, seed):
    B, T, Hk, G, D = shape
    H, scale = Hk * G, D ** -0.5
    q, k, v, g = attention_inputs(np.random.default_rng(seed), B, T, H, Hk, D, F32)
    r32 = attention_reference(q, k, v, g, H, Hk, scale, F32)
    r64 = attention_reference(q, k, v, g, H, Hk, scale, F64)
    y = grouped_query_attention(q, k, v, H, Hk, scale)
    assert y.dtype == np.float32
    assert_within(y, r64["y"], r32["bound_y"] + r64["bound_y"], what="gqa f32")
    for name, d in zip(("dq", "dk", "dv"), grads(grouped_query_attention, (q, k, v, H, Hk, scale), (0, 1, 2), g)):
        assert d.dtype == np.float32
        assert_within(d, r64[name], r32["bound_" + name] + r64["bound_" + name], what=f"gqa {name} f32")


# ----------------------------------------------------------------------------------------------
# array_api_strict: the same code, values and hand gradients equal NumPy's within two computations'
# bounds (the counts above)
# ----------------------------------------------------------------------------------------------


def test_array_api_strict_runs():
    pytest.importorskip("array_api_strict")
    rng = np.random.default_rng(7)
    B, T, Hk, G, D = 2, 3, 2, 2, 4
    H = Hk * G
    xr, gr = rng.standard_normal((B, T, H, D)), rng.standard_normal((B, T, H, D))
    pos = np.array([[0, 1, 2], [7, 8, 9]])
    q, k, v, g = attention_inputs(rng, B, T, H, Hk, D)
    ref = attention_reference(q, k, v, g, H, Hk, 0.5, F64)
    cos, sin = rope_tables(pos, D, 10000.0, F64)
    Mr, Mrg = rope_magnitude(xr, cos, sin), rope_magnitude(gr, cos, sin)
    qm, km, vm, gm = attention_inputs(rng, B, T, H, H, D)                 # multi-head: GPT-2's layer
    mha = attention_reference(qm, km, vm, gm, H, H, 0.5, F64)
    qkv = np.concatenate([qm, km, vm], axis=-1)                           # (B, T, 3C), C = H D
    d_qkv = np.concatenate([mha["bound_dq"], mha["bound_dk"], mha["bound_dv"]], axis=-1)
    cases = [  # (layer, args, argnums, upstream, [(bound of value), (bound of each gradient)])
        (causal_attention, (qkv, H, 0.5), (0,), gm, [2 * mha["bound_y"], 2 * d_qkv]),
        (grouped_query_attention, (q, k, v, H, Hk, 0.5), (0, 1, 2), g,
         [2 * ref["bound_y"], 2 * ref["bound_dq"], 2 * ref["bound_dk"], 2 * ref["bound_dv"]]),
        (apply_rope, (xr, cos, sin), (0,), gr, [2 * tolerance(F64, 3) * Mr, 2 * tolerance(F64, 2) * Mrg]),
    ]
    for layer, args, argnums, up, bounds in cases:
        want = [layer(*args)] + list(grads(layer, args, argnums, up))
        with use_backend("array_api_strict"):
            sargs = tuple(asarray(a) if isinstance(a, np.ndarray) else a for a in args)
            got = [layer(*sargs)] + list(grads(layer, sargs, argnums, asarray(up)))
        assert "array_api_strict" in type(got[0]).__module__
        for i, (a, b, bound) in enumerate(zip(got, want, bounds)):
            assert_within(to_numpy(a), b, bound, what=f"{layer.__name__} output {i} on array_api_strict")


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------


def test_bad_input_is_refused_with_named_errors():
    q, k = np.zeros((1, 3, 8)), np.zeros((1, 3, 4))
    cases = [
        (lambda: rope_tables(np.arange(3), 5, 1e4, F64), ValueError, "head_dim must be even"),
        (lambda: rope_tables(np.arange(3.0), 4, 1e4, F64), TypeError, "positions must be an integer array"),
        (lambda: rope_tables(np.array([0, -1]), 4, 1e4, F64), ValueError, "positions must be non-negative, got -1"),
        (lambda: rope_tables(np.array([0, 8]), 4, 1e4, F64, 8), ValueError,
         r"positions must be in \[0, 8\) \(max_position_embeddings = 8\), got 8 at position \(1,\)"),
        (lambda: rope_tables(np.arange(3), 4, -1.0, F64), ValueError, "theta must be positive"),
        (lambda: rope_tables(np.arange(3), 4, 1e4, "int32"), TypeError, "dtype must be one of"),
        (lambda: rope(np.zeros((1, 3, 2, 4)), np.arange(4), 1e4), ValueError,
         r"positions must have shape \(B, T\) = \(1, 3\) or \(T,\) = \(3,\).*got \(4,\)"),
        (lambda: apply_rope(np.zeros((1, 3, 2, 4)), np.zeros((4, 4)), np.zeros((4, 4))), ValueError,
         r"cos must have shape \(B, T, D\)"),
        (lambda: apply_rope(np.zeros((3, 2, 4)), np.zeros((3, 4)), np.zeros((3, 4))), ValueError,
         r"cos must have shape \(B, T, D\) = \(3, 2, 4\) or \(T, D\) = \(2, 4\) for x of shape \(3, 2, 4\)"),
        (lambda: apply_rope(np.zeros((1, 2, 6)), np.zeros((2, 4)), np.zeros((2, 4))), ValueError,
         r"x must have shape \(B, T, H, D\) with D even, or \(B, T, H \* D\) with D = cos.shape\[-1\] = 4"),
        (lambda: apply_rope(np.zeros((1, 2, 1, 2, 4)), np.zeros((2, 4)), np.zeros((2, 4))), ValueError,
         "x must have shape"),
        (lambda: apply_rope(np.zeros((1, 3, 2, 4)), np.zeros((3, 4)), np.zeros((2, 4))), ValueError, "sin must have"),
        (lambda: grouped_query_attention(q, k, k, 4, 3, 0.5), ValueError,
         r"n_head \(4\) must be divisible by n_kv_head \(3\)"),
        (lambda: grouped_query_attention(q, k, k, 4, True, 0.5), TypeError, "n_kv_head must be a positive int"),
        (lambda: grouped_query_attention(q, np.zeros((1, 3, 6)), k, 4, 2, 0.5), ValueError,
         r"k must have shape \(B, T, n_kv_head \* D\) = \(1, 3, 4\) \(D = 2 from q\), got \(1, 3, 6\)"),
        (lambda: grouped_query_attention(q, k, np.zeros((1, 2, 4)), 4, 2, 0.5), ValueError, "v must have shape"),
        (lambda: grouped_query_attention(np.zeros((1, 3, 7)), k, k, 4, 2, 0.5), ValueError, "q must have shape"),
        (lambda: grouped_query_attention(q.astype(F16), k.astype(F16), k.astype(F16), 4, 2, 0.5), TypeError,
         r"q must have a floating dtype \(float32, float64\), got float16"),
        (lambda: grouped_query_attention(q, k.astype(F32), k, 4, 2, 0.5), TypeError, "k is float32 but q is float64"),
        (lambda: grouped_query_attention(q, k, k, 4, 2, 0.0), ValueError, "scale must be positive"),
    ]
    for call, exc, match in cases:
        with pytest.raises(exc, match=match):
            call()
    with pytest.raises(TypeError, match="differentiable in q, k and v only"):
        autograd.grad(lambda s: autograd.numpy.sum(grouped_query_attention.primitive(q, k, k, 4, 2, s, cache={})))(0.5)
