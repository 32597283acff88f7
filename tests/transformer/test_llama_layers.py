"""transformer_ref.llama_layers, each layer on its own: forward against a textbook formula, the
hand-written VJP against autograd.numpy tracing the undecorated forward (``layer.fun``) and
against central finite differences (autograd.test_util.check_grads), in float64; float32 against
float64; array_api_strict against NumPy; RMSNorm at the edges of the float range; bad input.

Bounds (lora_ref.testing): one computation of ``n`` chained roundings is within ``gamma_n M`` of
the exact value, ``M`` the computation on absolute values; two computations of the same dtype
differ by at most ``2 gamma_n M``; float32 against float64 by ``(gamma_n(f32) + gamma_n(f64)) M``.
Counting rules used below: a sum of k terms adds k - 1 roundings to the largest count among its
terms (relative to the sum of their absolute values); a product or quotient adds 1 to the sum of
its factors' counts; sqrt, exp, cos, sin (within 1 ulp) count 2 (halving, for sqrt, an error
already in its argument). Each layer's counts are derived beside its test:

  rms_norm   y: C + 6      dx: 4C + 19     dweight: N + C + 5            (N rows)
  apply_rope y: 3          dx: 2           (4 and 3 in float32 with tables rounded from float64)
  silu       y: 6          dx: 16          swiglu y: 7, dgate: 17, dup: 7
  attention  y: 4 A gamma(D + 2) + gamma(2T + 4), dq: 2 eps_P + gamma(D + 2T + 3), dk: ... + G,
             dv: eps_P + gamma(T + G), eps_P = 4 A gamma(D + 2) + gamma(T + 4)   (A: see below)
"""

from __future__ import annotations

import math
import warnings
from decimal import Decimal, localcontext

import autograd
import numpy as np
import pytest
from autograd.test_util import check_grads
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_ref import asarray, to_numpy, use_backend
from lora_ref.testing import assert_within, tolerance, unit_roundoff
from transformer_ref.layers import causal_attention
from transformer_ref.llama_layers import (
    apply_rope,
    grouped_query_attention,
    rms_norm,
    rope,
    rope_tables,
    silu,
    swiglu,
)

F64, F32, F16 = "float64", "float32", "float16"


def both_grads(layer, args, argnum, g):
    """d/d args[argnum] of sum(layer(*args) * g): (hand-written VJP, autograd.numpy on .fun)."""
    def through(fn):
        def f(a):
            full = list(args)
            full[argnum] = a
            return autograd.numpy.sum(fn(*full) * g)
        return autograd.grad(f)(args[argnum])
    return through(layer), through(lambda *a: layer.fun(*a, cache=None))


def grads(layer, args, argnums, g):
    """The hand VJPs of ``layer`` at upstream gradient g, for each argnum (any backend)."""
    vjp, _ = autograd.make_vjp(lambda *a: layer(*a), argnum=tuple(argnums))(*args)
    return vjp(g)


# ----------------------------------------------------------------------------------------------
# RMSNorm
# ----------------------------------------------------------------------------------------------


def rms_textbook(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rms_magnitudes(x, w, g, eps):
    """(|y|, M_dx, M_dw) in float64; rho = rsqrt(mean(x^2) + eps), xhat = x rho (no cancellation in y).
    rho is computed with each row divided by its largest magnitude s (when s > 1), so it does not overflow."""
    x, w, g = (np.asarray(a, np.float64) for a in (x, w, g))
    top = np.abs(x).max(axis=-1, keepdims=True)
    s = np.where(top > 1.0, top, 1.0)
    rho = (1.0 / s) / np.sqrt(np.mean((x / s) ** 2, axis=-1, keepdims=True) + eps / s / s)
    xhat, gw = np.abs(x) * rho, np.abs(g * w)
    M_dx = rho * (gw + xhat * np.mean(gw * xhat, axis=-1, keepdims=True))
    return xhat * np.abs(w), M_dx, (np.abs(g) * xhat).reshape(-1, x.shape[-1]).sum(0)


# Counts. Forward: z = x/s exact; z*z 1; mean of C (C - 1 adds, 1 divide) -> C + 1; + eps -> C + 2
# (eps itself: 1 rounding to float32); sqrt 2 -> C + 3 (conservative); 1/. -> C + 4; z r -> C + 5;
# * weight -> C + 6. The textbook formula has C + 5. Backward dx = rho (gw - xhat mean(gw xhat)):
# gw 1; gw xhat 1 + 1 + (C + 5) = C + 7; mean + C -> 2C + 7; xhat * it: (C + 5) + 1 -> 3C + 13;
# difference -> 3C + 14 (relative to |gw| + |xhat| mean|gw xhat|); * r (C + 4) -> 4C + 19; 1/s exact.
# autograd's path (d r through 1/sqrt, d ms, 2 z d ms / C, sum of the two branches) is as long.
# dweight = sum over N rows of g * out: out C + 5, * g -> C + 6, sum -> N + C + 5.
def rms_counts(C, N):
    return C + 6, 4 * C + 19, N + C + 5


@given(B=st.integers(1, 3), T=st.integers(1, 4), C=st.integers(1, 9), seed=st.integers(0, 2**31))
def test_rms_norm_forward_and_vjps(B, T, C, seed):
    rng = np.random.default_rng(seed)
    # rows from 1e-3 to 1e3: rows above 1 take the rescaled path, rows below it do not
    x = (rng.standard_normal((B, T, C)) + 0.5) * 10.0 ** rng.integers(-3, 4, size=(B, T, 1))
    w, g, eps = rng.standard_normal(C), rng.standard_normal((B, T, C)), 1e-5
    n_y, n_dx, n_dw = rms_counts(C, B * T)
    My, Mdx, Mdw = rms_magnitudes(x, w, g, eps)
    assert_within(rms_norm(x, w, eps), rms_textbook(x, w, eps), 2 * tolerance(F64, n_y) * My, what="rms_norm")
    hand, auto = both_grads(rms_norm, (x, w, eps), 0, g)
    assert_within(hand, auto, 2 * tolerance(F64, n_dx) * Mdx, what="rms_norm dx")
    hand, auto = both_grads(rms_norm, (x, w, eps), 1, g)
    assert_within(hand, auto, 2 * tolerance(F64, n_dw) * Mdw, what="rms_norm dweight")


def test_rms_norm_finite_differences():
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((2, 3, 5)), rng.standard_normal(5)
    check_grads(lambda x, w: rms_norm(x, w, 1e-5), modes=["rev"], order=1)(x, w)
    check_grads(lambda x, w: rms_norm(x, w, 1e-5), modes=["rev"], order=1)(x * 1e3, w)   # the rescaled path


@settings(max_examples=20)
@given(C=st.integers(1, 16), seed=st.integers(0, 2**31))
def test_rms_norm_float32_and_float16(C, seed):
    rng = np.random.default_rng(seed)
    x64, w64, g64 = rng.standard_normal((3, C)) * 3.0, rng.standard_normal(C), rng.standard_normal((3, C))
    x, w, g = x64.astype(F32), w64.astype(F32), g64.astype(F32)
    n_y, n_dx, n_dw = rms_counts(C, 3)
    My, Mdx, Mdw = rms_magnitudes(x, w, g, 1e-5)
    both = lambda n: tolerance(F32, n) + tolerance(F64, n)   # noqa: E731
    y = rms_norm(x, w, 1e-5)
    assert y.dtype == np.float32
    assert_within(y, rms_textbook(x.astype(F64), w.astype(F64), 1e-5), both(n_y) * My, what="rms_norm f32")
    dx, dw = grads(rms_norm, (x, w, 1e-5), (0, 1), g)
    dx64, dw64 = grads(rms_norm, (x.astype(F64), w.astype(F64), 1e-5), (0, 1), g.astype(F64))
    assert dx.dtype == dw.dtype == np.float32
    assert_within(dx, dx64, both(n_dx) * Mdx, what="rms_norm dx f32")
    assert_within(dw, dw64, both(n_dw) * Mdw, what="rms_norm dweight f32")
    # float16: the C + 5 roundings of xhat happen in float32, then 2 in float16 (the cast back, the
    # weight), each with an absolute floor of u16 * smallest normal (float16's subnormals).
    xh, wh = x64.astype(F16), w64.astype(F16)
    yh = rms_norm(xh, wh, 1e-5)
    assert yh.dtype == np.float16
    My = rms_magnitudes(xh, wh, g, 1e-5)[0]
    floor16 = unit_roundoff(F16) * float(np.finfo(np.float16).smallest_normal) * (1.0 + np.abs(wh.astype(F64)))
    bound = (tolerance(F32, C + 5) + tolerance(F16, 2) + tolerance(F64, n_y)) * My + floor16
    assert_within(yh, rms_textbook(xh.astype(F64), wh.astype(F64), 1e-5), bound, what="rms_norm f16")


def rms_exact(x, w, g, eps):
    """y and dL/dx of RMSNorm in 50-digit decimal arithmetic (no overflow at any float), as floats."""
    with localcontext() as ctx:
        ctx.prec = 50
        ys, dxs = [], []
        for row, grow in zip(x.astype(np.float64).tolist(), g.astype(np.float64).tolist()):
            X = [Decimal(v) for v in row]
            rho = 1 / ((sum(v * v for v in X) / len(X)) + Decimal(eps)).sqrt()
            xhat = [v * rho for v in X]
            gw = [Decimal(a) * Decimal(b) for a, b in zip(grow, w.astype(np.float64).tolist())]
            c = sum(a * b for a, b in zip(gw, xhat)) / len(X)
            ys.append([float(v * Decimal(b)) for v, b in zip(xhat, w.astype(np.float64).tolist())])
            dxs.append([float(rho * (a - h * c)) for a, h in zip(gw, xhat)])
    return np.array(ys), np.array(dxs)


@pytest.mark.parametrize("dtype, huge, tiny", [(F64, 1e200, 1e-200), (F64, 1.7e308, 1e-300), (F32, 1e30, 1e-30),
                                               (F32, 3e38, 1e-38)])
def test_rms_norm_does_not_overflow(dtype, huge, tiny):
    """Rows whose squares overflow (or underflow) the dtype, a row of zeros and an ordinary row,
    against an exact decimal computation: within one computation's bound plus the final rounding
    of the exact value (1 more rounding)."""
    rng = np.random.default_rng(5)
    C, eps = 6, 1e-5
    base = rng.uniform(0.3, 1.0, size=(4, C)) * np.where(rng.random((4, C)) < 0.5, -1.0, 1.0)
    x = (base * np.array([[huge], [tiny], [0.0], [1.0]])).astype(dtype)
    x[0, 0] = np.finfo(dtype).max                      # the largest float: its log2 rounds up to the top exponent
    w, g = rng.standard_normal(C).astype(dtype), rng.standard_normal((4, C)).astype(dtype)
    with np.errstate(over="ignore"):          # the textbook formula really does fail on these rows
        assert np.all(rms_textbook(x[:1], w, eps) == 0.0)
    y, dx = rms_norm(x, w, eps), grads(rms_norm, (x, w, eps), (0,), g)[0]
    y_ref, dx_ref = rms_exact(x, w, g, eps)
    n_y, n_dx, _ = rms_counts(C, 4)
    My, Mdx, _ = rms_magnitudes(x, w, g, eps)
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(dx))
    assert_within(y, y_ref, tolerance(dtype, n_y + 1) * My, what=f"rms_norm at {huge:g}/{tiny:g}")
    assert_within(dx, dx_ref, tolerance(dtype, n_dx + 1) * Mdx, what=f"rms_norm dx at {huge:g}/{tiny:g}")
    assert np.all(y[2] == 0.0)


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
# SiLU and SwiGLU
# ----------------------------------------------------------------------------------------------


def sig(x):
    return 1.0 / (1.0 + np.exp(-x))


# silu: e = exp(-|x|) 2, 1 + e 1, 1/. 1, e p 1, x sigma 1: 6 (textbook x / (1 + exp(-x)): 4).
# silu' = sigma (1 + x sigma(-x)): sigma 5, x sigma(-x) 6, 1 + . 7, sigma * . 13, g * . 14; autograd's
# chain through 1/(1+e), exp and where is 16 long, and its terms reach 3x the derivative's: for
# x < 0 it forms d(e p)/de = p - e p^2 with p <= 2 p^2, so M = |g| (sigma + 3 |x| sigma sigma(-x)).
def silu_grad_magnitude(x, g):
    return np.abs(g) * (sig(x) + 3.0 * np.abs(x) * sig(x) * sig(-x))


@given(n=st.integers(1, 40), seed=st.integers(0, 2**31))
def test_silu_and_swiglu_forward_and_vjps(n, seed):
    rng = np.random.default_rng(seed)
    x, up, g = rng.standard_normal(n) * 8.0, rng.standard_normal(n), rng.standard_normal(n)
    assert_within(silu(x), x / (1.0 + np.exp(-x)), 2 * tolerance(F64, 6) * np.abs(x * sig(x)), what="silu")
    hand, auto = both_grads(silu, (x,), 0, g)
    assert_within(hand, auto, 2 * tolerance(F64, 16) * silu_grad_magnitude(x, g), what="silu dx")
    # swiglu = silu(gate) up: 7; dgate = (g up) silu'(gate): 17; dup = g silu(gate): 7.
    assert_within(swiglu(x, up), x / (1.0 + np.exp(-x)) * up, 2 * tolerance(F64, 7) * np.abs(x * sig(x) * up),
                  what="swiglu")
    hand, auto = both_grads(swiglu, (x, up), 0, g)
    assert_within(hand, auto, 2 * tolerance(F64, 17) * silu_grad_magnitude(x, g * up), what="swiglu dgate")
    hand, auto = both_grads(swiglu, (x, up), 1, g)
    assert_within(hand, auto, 2 * tolerance(F64, 7) * np.abs(g * x * sig(x)), what="swiglu dup")


def test_silu_finite_differences_float32_and_extremes():
    rng = np.random.default_rng(4)
    x, up = rng.standard_normal((3, 4)) * 3.0, rng.standard_normal((3, 4))
    check_grads(silu, modes=["rev"], order=1)(x)
    check_grads(swiglu, modes=["rev"], order=1)(x, up)
    x32 = x.astype(F32)
    assert silu(x32).dtype == swiglu(x32, up.astype(F32)).dtype == np.float32
    assert_within(silu(x32), silu(x32.astype(F64)), (tolerance(F32, 6) + tolerance(F64, 6)) * np.abs(x32 * sig(x32)),
                  what="silu f32")
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # exp(-|x|) never overflows
        big = np.array([1000.0, -1000.0, -700.0, 0.0, -1e300])
        y, d = silu(big), grads(silu, (big,), (0,), np.ones(5))[0]
    exact = -700.0 * math.exp(-700.0) / (1.0 + math.exp(-700.0))
    assert y[0] == 1000.0 and y[1] == 0.0 and y[3] == 0.0 and y[4] == 0.0
    assert abs(y[2] - exact) <= 2 * tolerance(F64, 6) * abs(exact)
    assert d[0] == 1.0 and d[1] == 0.0 and d[3] == 0.5 and d[4] == 0.0


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
    H, C = Hk * G, 5
    x, w, gx = rng.standard_normal((B, T, C)) * 1e3, rng.standard_normal(C), rng.standard_normal((B, T, C))
    xr, gr = rng.standard_normal((B, T, H, D)), rng.standard_normal((B, T, H, D))
    pos = np.array([[0, 1, 2], [7, 8, 9]])
    q, k, v, g = attention_inputs(rng, B, T, H, Hk, D)
    ref = attention_reference(q, k, v, g, H, Hk, 0.5, F64)
    n_y, n_dx, n_dw = rms_counts(C, B * T)
    My, Mdx, Mdw = rms_magnitudes(x, w, gx, 1e-5)
    cos, sin = rope_tables(pos, D, 10000.0, F64)
    Mr, Mrg = rope_magnitude(xr, cos, sin), rope_magnitude(gr, cos, sin)
    cases = [  # (layer, args, argnums, upstream, [(bound of value), (bound of each gradient)])
        (rms_norm, (x, w, 1e-5), (0, 1), gx, [2 * tolerance(F64, n_y) * My, 2 * tolerance(F64, n_dx) * Mdx,
                                             2 * tolerance(F64, n_dw) * Mdw]),
        (rope, (xr, pos, 10000.0), (0,), gr, [2 * tolerance(F64, 3) * Mr, 2 * tolerance(F64, 2) * Mrg]),
        (silu, (x / 100,), (0,), gx, [2 * tolerance(F64, 6) * np.abs(x / 100),
                                      2 * tolerance(F64, 16) * silu_grad_magnitude(x / 100, gx)]),
        (swiglu, (x / 100, gx), (0, 1), gx, [2 * tolerance(F64, 7) * np.abs(x / 100 * gx),
                                            2 * tolerance(F64, 17) * silu_grad_magnitude(x / 100, gx * gx),
                                            2 * tolerance(F64, 7) * np.abs(gx * x / 100)]),
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
    x, w = np.zeros((2, 4)), np.ones(4)
    q, k = np.zeros((1, 3, 8)), np.zeros((1, 3, 4))
    cases = [
        (lambda: rms_norm(x, np.ones(3), 1e-5), ValueError, r"weight must have shape \(C,\) = \(4,\).*got \(3,\)"),
        (lambda: rms_norm(x, w.astype(F32), 1e-5), TypeError, "weight is float32 but x is float64"),
        (lambda: rms_norm(x.astype(int), w, 1e-5), TypeError, "x must have a floating dtype"),
        (lambda: rms_norm(x, w, 0.0), ValueError, "eps must be positive"),
        (lambda: rms_norm(x, w, np.inf), ValueError, "eps must be finite"),
        (lambda: rms_norm(np.zeros(()), np.ones(1), 1e-5), ValueError, "x must have shape"),
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
         r"x must have shape \(B, T, H, D\)"),
        (lambda: apply_rope(np.zeros((1, 3, 2, 4)), np.zeros((3, 4)), np.zeros((2, 4))), ValueError, "sin must have"),
        (lambda: swiglu(x, np.zeros((2, 1))), ValueError, "up must have gate's shape"),
        (lambda: silu([1.0, 2.0]), TypeError, "x must be an array"),
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
