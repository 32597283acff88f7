"""Each layer of transformer_ref.layers on its own (embedding, layer_norm, rms_norm, gelu, silu,
swiglu, cross_entropy, the op sets): forward against a plain NumPy formula, and the hand-written
VJP against autograd.numpy tracing the undecorated forward (``layer.fun``) and against central
finite differences (autograd.test_util.check_grads), in float64; float32 against float64;
array_api_strict against NumPy; the norms at the edges of the float range; bad input. The attention
layers are tested in test_attention.py.

Bounds (lora_ref.testing): one computation of ``n`` chained roundings is within ``gamma_n M`` of
the exact value, ``M`` the computation on absolute values; two computations of the same dtype
differ by at most ``2 gamma_n M``; float32 against float64 by ``(gamma_n(f32) + gamma_n(f64)) M``.
Counting rules: a sum of k terms adds k - 1 roundings to the largest count among its terms
(relative to the sum of their absolute values); a product or quotient adds 1 to the sum of its
factors' counts; sqrt, exp (within 1 ulp) count 2. Counts derived beside each test:

  rms_norm   y: C + 6      dx: 4C + 19     dweight: N + C + 5            (N rows)
  silu       y: 5          dx: 15          swiglu y: 6, dgate: 16, dup: 6
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
from transformer_ref.attention import causal_attention, rope_tables
from transformer_ref.layers import IGNORE_INDEX, cross_entropy, embedding, gelu, layer_norm, rms_norm, silu, swiglu

from _gpt_helpers import rms_magnitudes  # noqa: E402
from _vjp_helpers import both_grads, grads  # noqa: E402

F64, F32, F16 = "float64", "float32", "float16"


shapes = st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 3))  # (B, T, heads)

# ----------------------------------------------------------------------------------------------
# LayerNorm
# ----------------------------------------------------------------------------------------------


@given(shape=shapes, C=st.integers(2, 9), seed=st.integers(0, 2**31))
def test_layer_norm_forward_and_vjps(shape, C, seed):
    rng = np.random.default_rng(seed)
    B, T, _ = shape
    x = rng.standard_normal((B, T, C)) * 3.0 + 1.0
    w, b = rng.standard_normal(C), rng.standard_normal(C)
    g = rng.standard_normal((B, T, C))
    eps = 1e-5
    # Magnitudes. xhat = (x - mu) rstd is computed by cancellation: the roundings of mu and of
    # x - mu are relative to |x| + |mu|, not to |x - mu|, so an error in xhat is bounded relative to
    # X = (|x| + |mu|) rstd (>= |xhat|; X >> |xhat| when the row's spread is small against its mean).
    mu = x.mean(-1, keepdims=True)
    rstd = 1.0 / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps)
    xhat = (x - mu) * rstd
    X = (np.abs(x) + np.abs(mu)) * rstd
    # forward vs the textbook formula: both chain mean (C) + variance (C) + 4 elementwise roundings,
    # on terms of magnitude X |w| + |b|.
    assert_within(layer_norm(x, w, b, eps), xhat * w + b,
                  2 * tolerance(F64, 2 * C + 4) * (X * np.abs(w) + np.abs(b)), what="layer_norm")
    gw = np.abs(g * w)
    # dx = rstd (gw - mean(gw) - xhat mean(gw xhat)): terms bounded by rstd (|gw| + mean|gw| + X mean(|gw| X));
    # the forward quantities it uses carry 2C + 4 roundings, the formula adds 2C + 6 (two means, five ops).
    M_dx = rstd * (gw + gw.mean(-1, keepdims=True) + X * (gw * X).mean(-1, keepdims=True))
    hand, auto = both_grads(layer_norm, (x, w, b, eps), 0, g)
    assert_within(hand, auto, 2 * tolerance(F64, 4 * C + 10) * M_dx, what="layer_norm dx")
    # dw = sum over B T of g xhat: B T terms of magnitude |g| X, each xhat with 2C + 4 roundings.
    N = B * T
    hand, auto = both_grads(layer_norm, (x, w, b, eps), 1, g)
    M_dw = (np.abs(g) * X).reshape(-1, C).sum(0)
    assert_within(hand, auto, 2 * tolerance(F64, N + 2 * C + 5) * M_dw, what="layer_norm dweight")
    hand, auto = both_grads(layer_norm, (x, w, b, eps), 2, g)
    assert_within(hand, auto, 2 * tolerance(F64, N) * np.abs(g).reshape(-1, C).sum(0), what="layer_norm dbias")


def test_layer_norm_finite_differences():
    rng = np.random.default_rng(0)
    x, w, b = rng.standard_normal((2, 3, 5)), rng.standard_normal(5), rng.standard_normal(5)
    check_grads(lambda x, w, b: layer_norm(x, w, b, 1e-5), modes=["rev"], order=1)(x, w, b)


# ----------------------------------------------------------------------------------------------
# GELU
# ----------------------------------------------------------------------------------------------


@given(n=st.integers(1, 40), seed=st.integers(0, 2**31))
def test_gelu_forward_and_vjp(n, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n) * 4.0
    g = rng.standard_normal(n)
    c = math.sqrt(2.0 / math.pi)
    # forward: 0.5 x (1 + tanh(c (x + 0.044715 x^3))): 8 roundings on a value bounded by |x|.
    ref = 0.5 * x * (1.0 + np.tanh(c * (x + 0.044715 * x**3)))
    assert_within(gelu(x), ref, 2 * tolerance(F64, 8) * np.abs(x), what="gelu")
    # derivative terms: 0.5 (1 + t) <= 1 and 0.5 |x| (1 - t^2) c (1 + 3 k x^2); about 12 roundings each.
    M = np.abs(g) * (1.0 + 0.5 * np.abs(x) * c * (1.0 + 3 * 0.044715 * x**2))
    hand, auto = both_grads(gelu, (x,), 0, g)
    assert_within(hand, auto, 2 * tolerance(F64, 16) * M, what="gelu dx")
    check_grads(gelu, modes=["rev"], order=1)(x)



def ln_exact(x, w, b, g, eps):
    """y and dL/dx of LayerNorm in 800-digit decimal arithmetic (no overflow at any float), as floats,
    and the magnitudes of test_layer_norm_forward_and_vjps, X = (|x| + |mu|) rstd for y and
    rstd (|gw| + mean|gw| + X mean(|gw| X)) for dx (inf where they exceed the float range)."""
    with localcontext() as ctx:
        ctx.prec = 800                    # every float64 here, its square and the row sums exactly
        ys, dxs, Ms, Mdxs = [], [], [], []
        W, Bv = [Decimal(v) for v in w.astype(np.float64).tolist()], [Decimal(v) for v in b.astype(np.float64).tolist()]
        for row, grow in zip(x.astype(np.float64).tolist(), g.astype(np.float64).tolist()):
            X = [Decimal(v) for v in row]
            mu = sum(X) / len(X)
            rho = 1 / (sum((v - mu) ** 2 for v in X) / len(X) + Decimal(eps)).sqrt()
            xhat = [(v - mu) * rho for v in X]
            gw = [Decimal(a) * c for a, c in zip(grow, W)]
            m1 = sum(gw) / len(X)
            m2 = sum(a * h for a, h in zip(gw, xhat)) / len(X)
            ys.append([float(h * c + d) for h, c, d in zip(xhat, W, Bv)])
            dxs.append([float(rho * (a - m1 - h * m2)) for a, h in zip(gw, xhat)])
            X = [(abs(v) + abs(mu)) * rho for v in X]
            agw = [abs(a) for a in gw]
            ma, mx = sum(agw) / len(X), sum(a * h for a, h in zip(agw, X)) / len(X)
            Ms.append([float(h * abs(c) + abs(d)) for h, c, d in zip(X, W, Bv)])
            Mdxs.append([float(rho * (a + ma + h * mx)) for a, h in zip(agw, X)])
    return np.array(ys), np.array(dxs), np.array(Ms), np.array(Mdxs)


@pytest.mark.parametrize("dtype, huge, top", [(F64, 2e154, False), (F64, 1e200, False), (F64, 1e300, True),
                                              (F32, 3e19, False), (F32, 1e30, True)])
def test_layer_norm_does_not_overflow(dtype, huge, top):
    """Issue 11, item 2: rows whose variance overflows the dtype (before the fix: zeros, so every
    position got the same logits), a row with a huge mean and a small spread, a constant huge row,
    a row of zeros and an ordinary row, against an exact decimal computation: within one
    computation's bound (the counts of test_layer_norm_forward_and_vjps on the magnitude
    X = (|x| + |mu|) rstd, computed here without overflow) plus the final rounding of the exact value.
    ``top``: the first row also holds the dtype's largest number."""
    rng = np.random.default_rng(5)
    C, eps = 8, 1e-5                                      # C = 8: the mean of a constant row is exact
    base = rng.uniform(0.3, 1.0, size=(6, C)) * np.where(rng.random((6, C)) < 0.5, -1.0, 1.0)
    x = base * np.array([[huge], [huge], [1.0], [1.0], [0.0], [1.0]])
    x[1] = huge / 4 * (1.0 + base[1] * 2.0 ** -20)       # mean ~ huge / 4, spread 2^-20 of it
    x[2] = huge / 2                                       # constant: xhat = 0 exactly, y = bias
    x = x.astype(dtype)
    if top:
        x[0, 0] = np.finfo(dtype).max
    w, b, g = (rng.standard_normal(s).astype(dtype) for s in (C, C, (6, C)))
    with np.errstate(over="ignore", invalid="ignore"):   # the textbook formula really does fail on row 0
        xc = x[:1] - x[:1].mean(-1, keepdims=True)
        textbook = xc / np.sqrt((xc * xc).mean(-1, keepdims=True) + eps)
        assert not np.all(np.isfinite(textbook) & (textbook != 0.0))
    y = layer_norm(x, w, b, eps)
    dx = grads(layer_norm, (x, w, b, eps), (0,), g)[0]
    y_ref, dx_ref, My, Mdx = ln_exact(x, w, b, g, eps)
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(dx))
    assert_within(y, y_ref, tolerance(dtype, 2 * C + 5) * My, what=f"layer_norm at {huge:g}")
    ok = np.isfinite(Mdx).all(-1)                         # the constant huge row's magnitude is not a float
    assert_within(dx[ok], dx_ref[ok], tolerance(dtype, 4 * C + 11) * Mdx[ok], what=f"layer_norm dx at {huge:g}")
    # constant row: dx = (gw - mean(gw)) / sqrt(eps): gw, mean (C), subtract, sqrt (2), divide: C + 5
    gw = np.abs(g[2].astype(np.float64) * w.astype(np.float64))
    assert_within(dx[2], dx_ref[2], tolerance(dtype, C + 5) * (gw + gw.mean()) / math.sqrt(eps),
                  what=f"layer_norm dx of a constant row at {huge:g}")
    assert np.all(y[2] == b) and np.all(y[4] == b)       # constant and zero rows: xhat = 0
    assert np.max(np.abs(y[0] - b)) > 0.1                 # the huge row is normalised, not flattened to the bias


def test_layer_norm_ordinary_rows_are_the_textbook_formula_bit_for_bit():
    """The power-of-two scaling commutes with every rounding: on rows of ordinary size the layer
    gives exactly the unscaled formula's bits (value and dx), in float32 and float64."""
    rng = np.random.default_rng(9)
    for dtype in (F32, F64):
        x = (rng.standard_normal((4, 5, 16)) * 10.0 ** rng.integers(-3, 4, (4, 5, 1))).astype(dtype)
        w, b, g = (rng.standard_normal(s).astype(dtype) for s in (16, 16, (4, 5, 16)))
        mean = x.mean(-1, keepdims=True)
        xc = x - mean
        rstd = 1.0 / np.sqrt((xc * xc).mean(-1, keepdims=True) + 1e-5)
        xhat = xc * rstd
        gw = g * w
        dx = rstd * (gw - gw.mean(-1, keepdims=True) - xhat * (gw * xhat).mean(-1, keepdims=True))
        assert np.array_equal(layer_norm(x, w, b, 1e-5), xhat * w + b)
        assert np.array_equal(grads(layer_norm, (x, w, b, 1e-5), (0,), g)[0], dx)


# ----------------------------------------------------------------------------------------------
# RMSNorm
# ----------------------------------------------------------------------------------------------


def rms_textbook(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


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
# SiLU and SwiGLU
# ----------------------------------------------------------------------------------------------


def sig(x):
    return 1.0 / (1.0 + np.exp(-x))


# silu = x sigma, sigma = a / d with e = exp(-|x|) 2, d = 1 + e 1, a = exp(min(x, 0)), / 1, x sigma 1: 5
# (textbook x / (1 + exp(-x)): 4). a is e itself for x < 0 (the same exp of the same value) and
# exactly 1 for x >= 0, so e's error eta enters a / d as (1 + eta) / (1 + eta e / d): once, not twice.
# silu' = sigma (1 + x sigma(-x)): sigma 4, x sigma(-x) 5, 1 + . 6, sigma * . 11, g * . 12. autograd,
# tracing x a / d, sums three terms: g sigma (5); g x a / d through a (x < 0 only: 6); and
# -g x a e / d^2 through d and |x| (g x, * a, d^2 counting d twice, /, * e, abs's (. x) / |x|: 9, and
# e's error, net at most twice as e^2 / d^2 for x < 0: 4; so 13); the sum adds 2: 15. Those terms
# reach 3x the derivative: for x < 0 they are |g| (sigma + |x| sigma + |x| sigma^2), and sigma <= 1/2
# gives sigma + sigma^2 <= 3 sigma sigma(-x), so M = |g| (sigma + 3 |x| sigma sigma(-x)).
N_SILU, N_SILU_DX = 5, 15
# swiglu = silu(gate) up: 6; dgate = (g up) silu'(gate): hand 13, autograd 1 + 15 = 16; dup = g silu(gate): 6.
N_SWIGLU, N_SWIGLU_DGATE, N_SWIGLU_DUP = 6, 16, 6
def silu_grad_magnitude(x, g):
    return np.abs(g) * (sig(x) + 3.0 * np.abs(x) * sig(x) * sig(-x))


@given(n=st.integers(1, 40), seed=st.integers(0, 2**31))
def test_silu_and_swiglu_forward_and_vjps(n, seed):
    rng = np.random.default_rng(seed)
    x, up, g = rng.standard_normal(n) * 8.0, rng.standard_normal(n), rng.standard_normal(n)
    assert_within(silu(x), x / (1.0 + np.exp(-x)), 2 * tolerance(F64, N_SILU) * np.abs(x * sig(x)), what="silu")
    hand, auto = both_grads(silu, (x,), 0, g)
    assert_within(hand, auto, 2 * tolerance(F64, N_SILU_DX) * silu_grad_magnitude(x, g), what="silu dx")
    assert_within(swiglu(x, up), x / (1.0 + np.exp(-x)) * up,
                  2 * tolerance(F64, N_SWIGLU) * np.abs(x * sig(x) * up), what="swiglu")
    hand, auto = both_grads(swiglu, (x, up), 0, g)
    assert_within(hand, auto, 2 * tolerance(F64, N_SWIGLU_DGATE) * silu_grad_magnitude(x, g * up),
                  what="swiglu dgate")
    hand, auto = both_grads(swiglu, (x, up), 1, g)
    assert_within(hand, auto, 2 * tolerance(F64, N_SWIGLU_DUP) * np.abs(g * x * sig(x)), what="swiglu dup")


def test_silu_finite_differences_float32_and_extremes():
    rng = np.random.default_rng(4)
    x, up = rng.standard_normal((3, 4)) * 3.0, rng.standard_normal((3, 4))
    check_grads(silu, modes=["rev"], order=1)(x)
    check_grads(swiglu, modes=["rev"], order=1)(x, up)
    x32 = x.astype(F32)
    assert silu(x32).dtype == swiglu(x32, up.astype(F32)).dtype == np.float32
    assert_within(silu(x32), silu(x32.astype(F64)),
                  (tolerance(F32, N_SILU) + tolerance(F64, N_SILU)) * np.abs(x32 * sig(x32)), what="silu f32")
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # exp(-|x|) never overflows
        big = np.array([1000.0, -1000.0, -700.0, 0.0, -1e300])
        y, d = silu(big), grads(silu, (big,), (0,), np.ones(5))[0]
    exact = -700.0 * math.exp(-700.0) / (1.0 + math.exp(-700.0))
    assert y[0] == 1000.0 and y[1] == 0.0 and y[3] == 0.0 and y[4] == 0.0
    assert abs(y[2] - exact) <= 2 * tolerance(F64, N_SILU) * abs(exact)
    assert d[0] == 1.0 and d[1] == 0.0 and d[3] == 0.5 and d[4] == 0.0


# ----------------------------------------------------------------------------------------------
# Cross-entropy
# ----------------------------------------------------------------------------------------------


@given(N=st.integers(1, 12), V=st.integers(2, 9), seed=st.integers(0, 2**31))
def test_cross_entropy_forward_and_vjp(N, V, seed):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((N, V)) * 5.0
    targets = rng.integers(0, V, size=N)
    if N > 1:
        targets[0] = IGNORE_INDEX
    kept = targets != IGNORE_INDEX
    # reference: log-softmax by scipy-free NumPy, row by row, mean over kept rows.
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    ref = -np.mean(logp[np.arange(N)[kept], targets[kept]])
    # per row: shift (1), exp (1), sum (V), log (1), subtract (1); the mean adds N. Terms: |z| and
    # log(V) per row, so M = max |z| + log V.
    M = np.abs(z).max() + math.log(V)
    assert_within(cross_entropy(logits, targets), ref, 2 * tolerance(F64, V + N + 4) * M, what="cross_entropy")
    # gradient (softmax - onehot) / n on kept rows: entries <= 1 / n; softmax carries V + 3 roundings.
    hand, auto = both_grads(cross_entropy, (logits, targets), 0, 1.0)
    assert_within(hand, auto, 2 * tolerance(F64, 2 * V + N + 8) / kept.sum(), what="cross_entropy dlogits")
    assert np.all(hand[~kept] == 0.0)
    check_grads(lambda a: cross_entropy(a, targets), modes=["rev"], order=1)(logits)


def test_cross_entropy_is_stable_for_huge_logits():
    # logits 1e4 apart: exp would overflow without the max shift. Exact answer: row 0 puts all
    # mass on its target (loss ~ exp(-1e4) = 0 in float64); row 1 has loss 1e4 (+ log(1 + e^-1e4)).
    logits = np.array([[1e4, 0.0], [1e4, 0.0]])
    loss = cross_entropy(logits, np.array([0, 1]))
    assert float(loss) == (0.0 + 1e4) / 2


# ----------------------------------------------------------------------------------------------
# Embedding
# ----------------------------------------------------------------------------------------------


@given(shape=shapes, V=st.integers(1, 7), C=st.integers(1, 4), seed=st.integers(0, 2**31))
def test_embedding_forward_and_vjp(shape, V, C, seed):
    B, T, _ = shape
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((V, C))
    ids = rng.integers(0, V, size=(B, T))
    g = rng.standard_normal((B, T, C))
    assert_within(embedding(table, ids), table[ids], 0.0, what="embedding")   # a copy: exact
    # dtable[v] = sum of g over positions with id v: at most B T terms, magnitude sum |g|.
    ref = np.zeros((V, C))
    for (b, t), v in np.ndenumerate(ids):
        ref[v] += g[b, t]
    M = np.zeros((V, C))
    for (b, t), v in np.ndenumerate(ids):
        M[v] += np.abs(g[b, t])
    hand, auto = both_grads(embedding, (table, ids), 0, g)
    assert_within(hand, ref, 2 * tolerance(F64, B * T) * M, what="embedding dtable")
    assert_within(auto, ref, 2 * tolerance(F64, B * T) * M, what="embedding dtable (autograd.numpy)")


def test_embedding_one_hot_path_equals_scatter(monkeypatch):
    """The backend-neutral one-hot backward (array_api_strict) equals NumPy's add.at one."""
    from lora_ref import asarray, to_numpy, use_backend

    rng = np.random.default_rng(3)
    table, ids, g = rng.standard_normal((5, 3)), rng.integers(0, 5, (2, 4)), rng.standard_normal((2, 4, 3))
    numpy_grad = autograd.grad(lambda t: autograd.numpy.sum(embedding(t, ids) * g))(table)
    with use_backend("array_api_strict"):
        t_s, ids_s, g_s = asarray(table), asarray(ids), asarray(g)
        ones = asarray(np.ones((24, 1)))
        # sum(embedding * g) as (1, 24) @ (24, 1): what a GenericArrayBox supports between primitives
        strict_grad = autograd.grad(lambda t: ((embedding(t, ids_s) * g_s).reshape((1, 24)) @ ones)[0, 0])(t_s)
    M = np.zeros((5, 3))
    np.add.at(M, ids.reshape(-1), np.abs(g).reshape(-1, 3))
    assert_within(to_numpy(strict_grad), numpy_grad, 2 * tolerance(F64, 8) * M, what="one-hot vs add.at")


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------


def test_layers_reject_bad_ids_and_targets():
    table = np.zeros((4, 2))
    with pytest.raises(TypeError, match="ids must be an integer array, got float64"):
        embedding(table, np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"ids must be in \[0, 4\) \(the table's row count = 4\), got 4 at position \(1,\)"):
        embedding(table, np.array([0, 4]))
    with pytest.raises(ValueError, match=r"got -1 at position \(0, 1\)"):
        embedding(table, np.array([[0, -1]]))
    logits = np.zeros((2, 3))
    with pytest.raises(ValueError, match=r"targets must be in \[0, 3\) or -100.*got 3 at position \(1,\)"):
        cross_entropy(logits, np.array([0, 3]))
    with pytest.raises(ValueError, match="every position is -100"):
        cross_entropy(logits, np.array([-100, -100]))
    with pytest.raises(ValueError, match=r"leading shape \(2,\), got \(3,\)"):
        cross_entropy(logits, np.array([0, 1, 2]))
    with pytest.raises(TypeError, match="targets must be an integer array"):
        cross_entropy(logits, np.array([0.0, 1.0]))


@settings(max_examples=10)
@given(seed=st.integers(0, 2**31))
def test_float32_stays_float32(seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 3, 12)).astype(np.float32)
    w, b = np.ones(12, np.float32), np.zeros(12, np.float32)
    assert layer_norm(x, w, b, 1e-5).dtype == np.float32
    assert gelu(x).dtype == np.float32
    assert causal_attention(x, 2, 0.5).dtype == np.float32
    assert cross_entropy(x, rng.integers(0, 12, (2, 3))).dtype == np.float32
    g = autograd.grad(lambda a: autograd.numpy.sum(causal_attention(a, 2, 0.5)))(x)
    assert g.dtype == np.float32


# ----------------------------------------------------------------------------------------------
# Op sets: REFERENCE, traced(ops), FAST -- values, not switches
# ----------------------------------------------------------------------------------------------


def test_op_sets_are_immutable_values():
    import dataclasses

    from lora_ref import lora_linear
    from transformer_ref import FAST, REFERENCE, Ops, traced
    from transformer_ref import fast, layers

    assert REFERENCE.linear is lora_linear and FAST.linear is fast.linear
    own = ("linear", "layer_norm", "gelu", "causal_attention",                  # fast.py, fast_layers.py
           "rms_norm", "swiglu", "grouped_query_attention")                     # fast_llama.py
    assert all(getattr(FAST, name) is not getattr(REFERENCE, name) for name in own)
    assert all(getattr(REFERENCE, f.name) is getattr(FAST, f.name) for f in dataclasses.fields(Ops)
               if f.name not in own)
    with pytest.raises(dataclasses.FrozenInstanceError):
        REFERENCE.linear = fast.linear                      # nobody can switch the reference
    t = traced(REFERENCE)
    assert t.layer_norm is layers.layer_norm.fun and t.linear is lora_linear.fun
    assert traced(t) == t and REFERENCE.linear is lora_linear and t.dora_linear is REFERENCE.dora_linear.fun
    with pytest.raises(TypeError, match="Ops.gelu must be callable, got int"):
        dataclasses.replace(REFERENCE, gelu=3)
    with pytest.raises(TypeError, match="ops must be a transformer_ref.layers.Ops, got str"):
        traced("REFERENCE")
    assert {f.name for f in dataclasses.fields(Ops)} == {"embedding", "layer_norm", "rms_norm", "gelu", "swiglu",
                                                         "causal_attention", "grouped_query_attention", "apply_rope",
                                                         "cross_entropy", "linear", "dora_linear", "lora_embedding", "lora_delta"}


def test_traced_layers_compute_the_same_values():
    """An undecorated forward is the same code as the primitive's: bitwise the same values."""
    from transformer_ref import REFERENCE, traced

    rng = np.random.default_rng(5)
    x, w, b = rng.standard_normal((2, 3, 4)), rng.standard_normal(4), rng.standard_normal(4)
    t = traced(REFERENCE)
    assert np.array_equal(t.layer_norm(x, w, b, 1e-5), REFERENCE.layer_norm(x, w, b, 1e-5))
    assert np.array_equal(t.gelu(x), REFERENCE.gelu(x))
    qkv = rng.standard_normal((2, 3, 6))
    assert np.array_equal(t.causal_attention(qkv, 2, 0.5), REFERENCE.causal_attention(qkv, 2, 0.5))
    assert np.array_equal(t.rms_norm(x, w, 1e-5), REFERENCE.rms_norm(x, w, 1e-5))
    assert np.array_equal(t.swiglu(x, x), REFERENCE.swiglu(x, x))
    cos, sin = rope_tables(np.arange(3), 4, 1e4, F64)
    x4 = x.reshape(2, 3, 1, 4)                                                       # (B, T, H, D)
    assert np.array_equal(t.apply_rope(x4, cos, sin), REFERENCE.apply_rope(x4, cos, sin))
    q, k = rng.standard_normal((2, 3, 8)), rng.standard_normal((2, 3, 4))
    assert np.array_equal(t.grouped_query_attention(q, k, k, 4, 2, 0.5), REFERENCE.grouped_query_attention(q, k, k, 4, 2, 0.5))


# ----------------------------------------------------------------------------------------------
# array_api_strict: the same code, values and hand gradients equal NumPy's within two computations'
# bounds (the counts above)
# ----------------------------------------------------------------------------------------------


def test_array_api_strict_runs():
    pytest.importorskip("array_api_strict")
    rng = np.random.default_rng(7)
    B, T, C = 2, 3, 5
    x, w, gx = rng.standard_normal((B, T, C)) * 1e3, rng.standard_normal(C), rng.standard_normal((B, T, C))
    b = rng.standard_normal(C)
    n_y, n_dx, n_dw = rms_counts(C, B * T)
    My, Mdx, Mdw = rms_magnitudes(x, w, gx, 1e-5)
    mu = x.mean(-1, keepdims=True)
    rstd = 1.0 / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-5)
    X = (np.abs(x) + np.abs(mu)) * rstd
    gw = np.abs(gx * w)
    M_ln = rstd * (gw + gw.mean(-1, keepdims=True) + X * (gw * X).mean(-1, keepdims=True))
    cases = [  # (layer, args, argnums, upstream, [(bound of value), (bound of each gradient)])
        (layer_norm, (x, w, b, 1e-5), (0,), gx, [2 * tolerance(F64, 2 * C + 4) * (X * np.abs(w) + np.abs(b)),
                                                2 * tolerance(F64, 4 * C + 10) * M_ln]),
        (rms_norm, (x, w, 1e-5), (0, 1), gx, [2 * tolerance(F64, n_y) * My, 2 * tolerance(F64, n_dx) * Mdx,
                                             2 * tolerance(F64, n_dw) * Mdw]),
        (silu, (x / 100,), (0,), gx, [2 * tolerance(F64, N_SILU) * np.abs(x / 100),
                                      2 * tolerance(F64, N_SILU_DX) * silu_grad_magnitude(x / 100, gx)]),
        (swiglu, (x / 100, gx), (0, 1), gx, [2 * tolerance(F64, N_SWIGLU) * np.abs(x / 100 * gx),
                                            2 * tolerance(F64, N_SWIGLU_DGATE) * silu_grad_magnitude(x / 100, gx * gx),
                                            2 * tolerance(F64, N_SWIGLU_DUP) * np.abs(gx * x / 100)]),
    ]
    for layer, args, argnums, up, bounds in cases:
        want = [layer(*args)] + list(grads(layer, args, argnums, up))
        with use_backend("array_api_strict"):
            sargs = tuple(asarray(a) if isinstance(a, np.ndarray) else a for a in args)
            got = [layer(*sargs)] + list(grads(layer, sargs, argnums, asarray(up)))
        assert "array_api_strict" in type(got[0]).__module__
        for i, (a, b_, bound) in enumerate(zip(got, want, bounds)):
            assert_within(to_numpy(a), b_, bound, what=f"{layer.__name__} output {i} on array_api_strict")


def test_llama_layers_refuse_bad_input_with_named_errors():
    x, w = np.zeros((2, 4)), np.ones(4)
    cases = [
        (lambda: rms_norm(x, np.ones(3), 1e-5), ValueError, r"weight must have shape \(C,\) = \(4,\).*got \(3,\)"),
        (lambda: rms_norm(x, w.astype(F32), 1e-5), TypeError, "weight is float32 but x is float64"),
        (lambda: rms_norm(x.astype(int), w, 1e-5), TypeError, "x must have a floating dtype"),
        (lambda: rms_norm(x, w, 0.0), ValueError, "eps must be positive"),
        (lambda: rms_norm(x, w, np.inf), ValueError, "eps must be finite"),
        (lambda: rms_norm(np.zeros(()), np.ones(1), 1e-5), ValueError, "x must have shape"),
        (lambda: swiglu(x, np.zeros((2, 1))), ValueError, "up must have gate's shape"),
        (lambda: silu([1.0, 2.0]), TypeError, "x must be an array"),
    ]
    for call, exc, match in cases:
        with pytest.raises(exc, match=match):
            call()
