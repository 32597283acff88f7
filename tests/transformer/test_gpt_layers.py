"""Each layer of transformer_ref.layers on its own: forward against a plain NumPy formula, and the
hand-written VJP against autograd.numpy tracing the undecorated forward and against finite
differences (autograd.test_util.check_grads), float64.

Bounds: ``2 gamma_n M`` with ``n`` the roundings chained in one output entry and ``M`` the
computation evaluated on absolute values (counts and magnitudes derived in each test).
"""

from __future__ import annotations

import math

import autograd
import numpy as np
import pytest
from autograd.test_util import check_grads
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_ref.testing import assert_within, tolerance
from transformer_ref.layers import (
    IGNORE_INDEX,
    causal_attention,
    cross_entropy,
    embedding,
    gelu,
    layer_norm,
)

F64 = "float64"


def both_grads(layer, args, argnum, g):
    """d/d args[argnum] of sum(layer(*args) * g): (hand-written VJP, autograd.numpy on .fun)."""
    def through(fn):
        def f(a):
            full = list(args)
            full[argnum] = a
            return autograd.numpy.sum(fn(*full) * g)
        return autograd.grad(f)(args[argnum])
    return through(layer), through(lambda *a: layer.fun(*a, cache=None))


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
    assert all(getattr(REFERENCE, n) is getattr(FAST, n) for n in ("embedding", "layer_norm", "gelu",
                                                                    "causal_attention", "cross_entropy"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        REFERENCE.linear = fast.linear                      # nobody can switch the reference
    t = traced(REFERENCE)
    assert t.layer_norm is layers.layer_norm.fun and t.linear is lora_linear.fun
    assert traced(t) == t and REFERENCE.linear is lora_linear   # idempotent; REFERENCE untouched
    with pytest.raises(TypeError, match="Ops.gelu must be callable, got int"):
        dataclasses.replace(REFERENCE, gelu=3)
    with pytest.raises(TypeError, match="ops must be a transformer_ref.layers.Ops, got str"):
        traced("REFERENCE")
    assert {f.name for f in dataclasses.fields(Ops)} == {"embedding", "layer_norm", "gelu", "causal_attention",
                                                         "cross_entropy", "linear"}


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
