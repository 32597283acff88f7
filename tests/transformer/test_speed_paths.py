"""The training-speed op set (transformer_ref.fast) computes what the reference computes.

* ``fast.linear`` (FAST's projection) against ``lora_ref.lora_linear`` (REFERENCE's): forward
  value and every gradient, on both of its paths (``W + s B A`` formed first, or the thin
  products kept), with fused blocks (enable_lora), dropout masks, float64 and float32.
* the whole model: ``loss(..., ops=FAST)`` against ``ops=REFERENCE``, value and every gradient.
* ``fast.sharded_value_and_grad`` (the batch split over threads) against one
  ``autograd.value_and_grad`` of the whole batch.

Bounds are ``2 gamma_n M`` (two computations of one exact value), with ``n`` the longest chain
of roundings and ``M`` the computation on absolute values, derived beside each assertion.
"""

from __future__ import annotations

import math
import warnings

import autograd
import numpy as np
import pytest
from _gpt_helpers import TINY, assert_trees_close, chain_length, random_adapters, rms_magnitudes, tiny_model
from autograd.test_util import check_grads
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_ref import asarray, delta_weight, dropout_mask, lora_linear, to_numpy, use_backend
from lora_ref.strategies import lora_cases
from lora_ref.testing import assert_within, lora_linear_magnitude, tolerance
from transformer_ref import FAST, REFERENCE, fast_layers, fast_llama, lora_config_for, loss, machine
from transformer_ref.attention import causal_attention, grouped_query_attention
from transformer_ref.fast import _linear, linear, sharded_value_and_grad
from transformer_ref.layers import gelu, layer_norm, rms_norm, swiglu

# ----------------------------------------------------------------------------------------------
# fast.linear == lora_ref.lora_linear
# ----------------------------------------------------------------------------------------------


def f64(a):
    return np.asarray(to_numpy(a), dtype=np.float64)


def magnitude(case, x):
    """|x| |W|^T + |bias| + |s| |x * mask| (|B| |A|)^T (fused blocks: the dense |s| |B_k| |A_k|)."""
    if case.enable_lora is None:
        return lora_linear_magnitude(x, case.W, case.A, case.B, case.scale, case.bias, case.mask)
    xd = np.abs(f64(x)) if case.mask is None else np.abs(f64(x) * f64(case.mask))
    dense = f64(delta_weight(np.abs(f64(case.A)), np.abs(f64(case.B)), abs(case.scale), case.enable_lora))
    return lora_linear_magnitude(x, case.W, bias=case.bias) + xd @ dense.T


def vjps(fun, case, x, G, absolute=False):
    """(y, (dx, dW, dA, dB, dbias)) of fun(x, W, A, B, s, bias, mask, enable_lora) for upstream G;
    ``absolute``: every input, s and G replaced by absolute values in float64 (the magnitudes of
    the same sums of products)."""
    t = (lambda a: np.abs(f64(a))) if absolute else (lambda a: a)
    scale = abs(case.scale) if absolute else case.scale
    mask = None if case.mask is None else t(case.mask)
    f = lambda x, W, A, B, b: fun(x, W, A, B, scale, b, mask, case.enable_lora)  # noqa: E731
    vjp, y = autograd.make_vjp(f, argnum=(0, 1, 2, 3, 4))(t(x), t(case.W), t(case.A), t(case.B), t(case.bias))
    return y, vjp(t(G))


def inputs(case, rows):
    """x with the case's trailing shape and ``rows`` rows in total: "as drawn", one row (the thin
    products stay unless the weight is tiny), or enough rows that W + s B A is formed first."""
    if rows == "as drawn":
        return case.x
    X = case.x.reshape(-1, case.d_in)
    if case.mask is not None and case.mask.ndim > 1 and case.mask.shape[:-1] != (1,) * (case.mask.ndim - 1):
        return case.x                                   # a full-shape mask pins x's shape
    n = 1 if rows == "one" else case.d_in * case.d_out // (case.d_in + case.d_out) + 1
    reps = -(-n // X.shape[0])
    return np.tile(X, (reps, 1))[:n].reshape((n,) + (1,) * max(case.x.ndim - 2, 0) + (case.d_in,)) \
        if case.x.ndim >= 2 else X[0]


@given(case=lora_cases(bias=True, max_dim=24, enable_lora=None, dropout=None),
       rows=st.sampled_from(["as drawn", "one", "many"]))
def test_linear_equals_lora_linear(case, rows):
    x = inputs(case, rows)
    if case.mask is not None and np.broadcast_shapes(case.mask.shape, x.shape) != x.shape:
        x = case.x
    N = int(np.prod(x.shape[:-1], dtype=np.int64))
    G = np.random.default_rng(case.seed).uniform(-1.0, 1.0, size=x.shape[:-1] + (case.d_out,)).astype(case.dtype)
    y_ref, g_ref = vjps(lora_linear, case, x, G)
    y, g = vjps(linear, case, x, G)
    _, mags = vjps(lora_linear, case, x, G, absolute=True)
    # Forward: the reference chains d_in (x A^T) + r + 3 (s rounded, times s, added) roundings
    # (+1 mask, +1 bias); forming W + s B A first chains r + 3 then d_in: the same count.
    n = case.d_in + case.r + 3 + int(case.mask is not None) + int(case.bias is not None)
    assert y.shape == y_ref.shape and y.dtype == y_ref.dtype
    assert_within(y, y_ref, 2 * tolerance(case.dtype, n) * magnitude(case, x), what=f"linear forward ({rows})")
    # Gradients: the longest chain is N + d_in + d_out + n r + 4 (tests/test_lora.py derives it);
    # dL/dx = G (W + s B A) chains r + 3 + d_out, within it.
    L = N + case.d_in + case.d_out + case.A.shape[0] + 4
    for name, a, b, m, like in zip("x W A B bias".split(), g, g_ref, mags, (x, case.W, case.A, case.B, case.bias)):
        assert a.shape == like.shape and a.dtype == like.dtype, name
        assert_within(a, b, 2 * tolerance(case.dtype, L) * m, what=f"dL/d{name} ({rows})")


def test_linear_takes_both_paths():
    """Many tokens: W + s B A is formed first; one token: the thin products stay."""
    rng = np.random.default_rng(0)
    W, A, B = rng.standard_normal((6, 4)), rng.standard_normal((2, 4)), rng.standard_normal((6, 2))
    many, one = {}, {}
    _linear(rng.standard_normal((3, 5, 4)), W, A, B, 2.0, cache=many)
    _linear(rng.standard_normal((1, 4)), W, A, B, 2.0, cache=one)
    assert many["W_run"] is not W and one["W_run"] is W
    # with a dropout mask the adapter branch must stay apart, whatever the size
    masked = {}
    _linear(rng.standard_normal((3, 5, 4)), W, A, B, 2.0, None, np.ones((3, 5, 4)), cache=masked)
    assert masked["W_run"] is W


def test_linear_float32_stays_float32():
    rng = np.random.default_rng(1)
    x, W = rng.standard_normal((2, 8, 4)).astype(np.float32), rng.standard_normal((6, 4)).astype(np.float32)
    A, B = rng.standard_normal((2, 4)).astype(np.float32), rng.standard_normal((6, 2)).astype(np.float32)
    grads = autograd.grad(lambda a: autograd.numpy.sum(linear(x, W, a, B, 2.0)), 0)(A)
    assert linear(x, W, A, B, 2.0).dtype == np.float32 and grads.dtype == np.float32


# ----------------------------------------------------------------------------------------------
# The whole model: FAST == REFERENCE, the loss and every gradient
# ----------------------------------------------------------------------------------------------


@settings(max_examples=10, deadline=None)
@given(matrices=st.sets(st.sampled_from(["q", "k", "v", "o", "mlp_in", "mlp_out"]), min_size=1),
       r=st.integers(1, 3), dropout=st.booleans(), dtype=st.sampled_from(["float64", "float32"]),
       seed=st.integers(0, 2**31))
def test_fast_model_equals_reference_model(matrices, r, dropout, dtype, seed):
    lc = lora_config_for(sorted(matrices), r=r, alpha=2.0 * r)
    params, tokens, targets = tiny_model(dtype, seed % 1000)
    adapters = random_adapters(params, TINY, lc, seed)
    masks = None if not dropout else {
        name: dropout_mask((2, 6, params[name + ".weight"].shape[1]), 0.25, np.random.default_rng(seed), dtype)
        for name in adapters}

    def lora(ops):
        return autograd.value_and_grad(lambda ad: loss(params, tokens, targets, TINY, ad, lc, masks, ops=ops))(adapters)

    def full(ops):
        return autograd.value_and_grad(lambda p: loss(p, tokens, targets, TINY, ops=ops))(params)

    # Two computations of one model, forward and backward: 2 * chain_length roundings apart at most
    # (_gpt_helpers), measured against each value's own size; FAST's LayerNorm chains one more
    # rounding than bounds.py's count (2C + 9: the row means' 1/C factor) and its GELU two (10:
    # its constants), so 2 more per LayerNorm and GELU on the path (two of each per block, ln_f).
    n = 2 * (chain_length(TINY, r) + 2 * (3 * TINY.n_layer + 1))
    for what, run in (("LoRA", lora), ("full", full)):
        (value, grads), (ref_value, ref_grads) = run(FAST), run(REFERENCE)
        assert np.asarray(value).dtype == np.dtype(dtype)
        assert_within(value, ref_value, 2 * tolerance(dtype, n) * abs(float(ref_value)), what=f"{what} loss")
        assert_trees_close(grads, ref_grads, dtype, n, what=f"{what} gradients")


@settings(max_examples=10, deadline=None)
@given(matrices=st.sets(st.sampled_from(["q", "k", "v", "o", "gate", "up", "down"]), min_size=1),
       r=st.integers(1, 3), dtype=st.sampled_from(["float64", "float32"]), seed=st.integers(0, 2**31))
def test_fast_llama_model_equals_reference_model(matrices, r, dtype, seed):
    from transformer_ref import LlamaConfig, add_adapters, init_params
    from transformer_ref.bounds import logit_rounding_chain

    config = LlamaConfig(vocab_size=11, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8, rms_norm_eps=1e-5)
    rng = np.random.default_rng(seed % 1000)
    params = {k: (np.asarray(v, np.float64) * (1.0 if k.endswith("norm.weight") else 10.0)).astype(dtype)
              for k, v in init_params(config, rng, "float64").items()}
    tokens, targets = rng.integers(0, 11, size=(2, 6)), rng.integers(0, 11, size=(2, 6))
    lc = lora_config_for(sorted(matrices), r=r, alpha=2.0 * r, family="llama", init="random")
    adapters = add_adapters(params, config, lc, rng)

    def run(ops):
        return autograd.value_and_grad(lambda ad: loss(params, tokens, targets, config, ad, lc, ops=ops))(adapters)

    # as for GPT-2 above: forward and backward, 2 * the chain, with FAST's RMSNorm 2 roundings longer
    # (C + 8, its 1/C factor and the sum's) on each of the 2 per block and the final one
    n = 2 * (logit_rounding_chain(config, r, T=6, loss_batch=12) + 2 * (2 * config.num_hidden_layers + 1))
    (value, grads), (ref_value, ref_grads) = run(FAST), run(REFERENCE)
    assert np.asarray(value).dtype == np.dtype(dtype)
    assert_within(value, ref_value, 2 * tolerance(dtype, n) * abs(float(ref_value)), what="LLaMA loss")
    assert_trees_close(grads, ref_grads, dtype, n, what="LLaMA gradients")


# ----------------------------------------------------------------------------------------------
# sharded_value_and_grad == value_and_grad of the whole batch
# ----------------------------------------------------------------------------------------------


def _objective(params, lc):
    def objective(ad, x, y, masks):
        return loss(params, x, y, TINY, ad, lc, masks)
    return objective


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("masks", ["none", "per row", "shared", "shared 2-D"])
def test_sharded_equals_whole_batch(threads, masks, monkeypatch):
    from autograd.tracer import trace_stack

    lc = lora_config_for(["q", "v"], r=2, alpha=3.0)
    params, tokens, targets = tiny_model()                 # (2, 6); target (0, 0) ignored: slices weigh 5 and 6
    adapters = random_adapters(params, TINY, lc)
    name = "transformer.h.0.attn.c_attn"
    rng = np.random.default_rng(3)
    mask = {"none": None,
            "per row": {name: dropout_mask((2, 6, TINY.n_embd), 0.25, rng)},
            "shared": {name: dropout_mask((1, 1, TINY.n_embd), 0.25, rng)},
            "shared 2-D": {name: dropout_mask((6, TINY.n_embd), 0.25, rng)}}[masks]
    objective = _objective(params, lc)
    slices = []
    original_pool = machine.worker_pool
    monkeypatch.setattr(machine, "worker_pool", lambda n: slices.append(n) or original_pool(n))
    top = trace_stack.top
    value, grads = sharded_value_and_grad(objective, threads)(adapters, tokens, targets, mask)
    assert trace_stack.top == top                           # autograd's trace counter is where it was
    ref_value, ref_grads = autograd.value_and_grad(objective)(adapters, tokens, targets, mask)
    if machine.per_thread_blas():
        assert slices == [2]                                # the batch was split (2 rows: 2 slices)
    # Each slice is a forward and backward of the model (chain_length roundings each way), then
    # a weighted sum of two terms (+2): 2 * chain_length + 2, as for the model's own gradients.
    n = 2 * chain_length(TINY, 2) + 2
    assert_within(value, ref_value, 2 * tolerance("float64", n) * abs(float(ref_value)), what="sharded loss")
    assert_trees_close(grads, ref_grads, "float64", n, what="sharded dL/dadapters")
    again = sharded_value_and_grad(objective, threads)(adapters, tokens, targets, mask)
    assert float(again[0]) == float(value)                  # deterministic: fixed slices, fixed order
    assert all(np.array_equal(again[1][k][p], grads[k][p]) for k in grads for p in ("A", "B"))


def test_sharded_skips_a_slice_with_nothing_to_score_and_keeps_loss_errors():
    lc = lora_config_for(["v"], r=2)
    params, tokens, targets = tiny_model()
    adapters = random_adapters(params, TINY, lc)
    objective = _objective(params, lc)
    targets = targets.copy()
    targets[0, :] = -100                                    # slice 0 scores nothing
    value, grads = sharded_value_and_grad(objective, 2)(adapters, tokens, targets, None)
    ref_value, ref_grads = autograd.value_and_grad(objective)(adapters, tokens, targets, None)
    n = 2 * chain_length(TINY, 2) + 2
    assert_within(value, ref_value, 2 * tolerance("float64", n) * abs(float(ref_value)), what="loss")
    assert_trees_close(grads, ref_grads, "float64", n, what="dL/dadapters")
    targets[:, :] = -100
    with pytest.raises(ValueError, match="every position is -100"):
        sharded_value_and_grad(objective, 2)(adapters, tokens, targets, None)
    with pytest.raises(ValueError, match=r"threads must be a positive int \(or None\), got 0"):
        sharded_value_and_grad(objective, 0)


def test_sharded_float32_stays_float32():
    lc = lora_config_for(["q", "v"], r=2)
    params, tokens, targets = tiny_model("float32")
    adapters = random_adapters(params, TINY, lc)
    value, grads = sharded_value_and_grad(_objective(params, lc), 2)(adapters, tokens, targets, None)
    assert np.asarray(value).dtype == np.float32
    assert all(g.dtype == np.float32 for ad in grads.values() for g in ad.values())


# ----------------------------------------------------------------------------------------------
# fast_layers (FAST's LayerNorm, GELU, causal attention) == the reference layers
# ----------------------------------------------------------------------------------------------
#
# Bounds as in tests/transformer/test_layers.py and test_attention.py: one computation of n
# chained roundings is within gamma_n M of the exact value (M the computation on absolute values),
# so two computations within 2 gamma_n M, with n the longer of the two chains. Counting rules: a
# sum of k terms adds k - 1 roundings to the largest count among its terms; a product or quotient
# adds 1 to the sum of its factors' counts; sqrt, exp, tanh (within 1 ulp) count 2; a Python
# constant rounded to the dtype counts 1. Both computations are evaluated in the dtype drawn.


def both_vjps(layer, args, argnums, g):
    """(value, hand VJPs at upstream g for argnums) of ``layer(*args)``."""
    vjp, y = autograd.make_vjp(lambda *a: layer(*a), argnum=tuple(argnums))(*args)
    return y, vjp(g)


def traced_vjp(layer, args, argnum, g):
    """autograd.numpy's derivative of sum(layer.fun(*args) * g) in args[argnum]: a second derivation."""
    def f(a):
        full = list(args)
        full[argnum] = a
        return autograd.numpy.sum(layer.fun(*full, cache=None) * g)
    return autograd.grad(f)(args[argnum])


def untouched(args):
    """Copies of the array arguments, to show afterwards that nothing was written into them."""
    return [np.array(a, copy=True) if isinstance(a, np.ndarray) else a for a in args]


def same(before, after):
    return all(not isinstance(a, np.ndarray) or np.array_equal(a, b) for a, b in zip(before, after))


@settings(deadline=None)
@given(B=st.integers(1, 3), T=st.integers(1, 5), C=st.integers(2, 12), dtype=st.sampled_from(["float64", "float32"]),
       seed=st.integers(0, 2**31))
def test_fast_layer_norm_equals_reference(B, T, C, dtype, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((B, T, C)) * 3.0 + rng.uniform(-4, 4, (B, T, 1))).astype(dtype)
    w, b, g = (rng.standard_normal(s).astype(dtype) for s in (C, C, (B, T, C)))
    args, eps = (x, w, b, 1e-5), 1e-5
    before = untouched(args + (g,))
    y, (dx, dw, db) = both_vjps(fast_layers.layer_norm, args, (0, 1, 2), g)
    y_ref, (dx_ref, dw_ref, db_ref) = both_vjps(layer_norm, args, (0, 1, 2), g)
    assert same(before, args + (g,))
    assert all(a.dtype == np.dtype(dtype) for a in (y, dx, dw, db))
    # Magnitudes (test_layers): xhat's roundings are relative to X = (|x| + |mu|) rstd.
    x64, w64, b64, g64 = (f64(a) for a in (x, w, b, g))
    mu = x64.mean(-1, keepdims=True)
    rstd = 1.0 / np.sqrt(((x64 - mu) ** 2).mean(-1, keepdims=True) + eps)
    X = (np.abs(x64) + np.abs(mu)) * rstd
    # fast y: mean = sum of x (1/C) (1/C: 1, product: 1, sum: C - 1 -> C + 1), x - mean (C + 2),
    # var = sum of xc^2 (1/C) (2C + 6), + eps, sqrt, 1/ (2C + 10), xhat (4C + 13), * w, + b (4C + 15);
    # the reference's (scaled rows, reductions by NumPy's mean) chain is shorter.
    n_y = 4 * C + 15
    assert_within(y, y_ref, 2 * tolerance(dtype, n_y) * (X * np.abs(w64) + np.abs(b64)), what="layer_norm")
    # dx = rstd (gw - mean(gw) - xhat mean(gw xhat)): gw (1), mean(gw xhat) (n_y + C + 2), xhat times it
    # (2 n_y + C + 3), two subtractions, times rstd (2C + 10): 2 n_y + 3C + 16.
    gw = np.abs(g64 * w64)
    M_dx = rstd * (gw + gw.mean(-1, keepdims=True) + X * (gw * X).mean(-1, keepdims=True))
    assert_within(dx, dx_ref, 2 * tolerance(dtype, 2 * n_y + 3 * C + 16) * M_dx, what="layer_norm dx")
    # dweight: B T terms g xhat (n_y + 1 each); dbias: the same sum of g, computed the same way.
    M_dw = (np.abs(g64) * X).reshape(-1, C).sum(0)
    assert_within(dw, dw_ref, 2 * tolerance(dtype, B * T + n_y + 1) * M_dw, what="layer_norm dweight")
    assert np.array_equal(db, db_ref)
    # the hand-written VJP against autograd.numpy on the bare forward (in-place updates and all)
    assert_within(dx, traced_vjp(fast_layers.layer_norm, args, 0, g), 2 * tolerance(dtype, 2 * n_y + 3 * C + 16) * M_dx,
                  what="layer_norm dx (autograd.numpy)")


def test_fast_layer_norm_falls_back_to_the_reference_where_the_textbook_overflows():
    """A row whose textbook variance overflows (float32 |x| ~ 3e19) or a non-finite row: the call
    is the reference layer's, bit for bit, value and gradients (with its NaN row for a NaN input)."""
    rng = np.random.default_rng(4)
    for dtype, huge in (("float32", 3e19), ("float64", 1e200)):
        x = rng.standard_normal((2, 3, 8)).astype(dtype)
        x[0, 1] *= dtype == "float32" and np.float32(huge) or huge
        w, b, g = (rng.standard_normal(s).astype(dtype) for s in (8, 8, (2, 3, 8)))
        nan = x.copy()
        nan[1, 0, 3] = np.nan
        for xs in (x, nan):
            got = both_vjps(fast_layers.layer_norm, (xs, w, b, 1e-5), (0, 1, 2), g)
            ref = both_vjps(layer_norm, (xs, w, b, 1e-5), (0, 1, 2), g)
            assert np.array_equal(got[0], ref[0], equal_nan=True)
            assert all(np.array_equal(a, c, equal_nan=True) for a, c in zip(got[1], ref[1]))
        assert np.all(np.isnan(got[0][1, 0])) and np.all(np.isfinite(got[0][0]))   # NaN stays in its row


@settings(deadline=None)
@given(n=st.integers(1, 40), dtype=st.sampled_from(["float64", "float32"]), seed=st.integers(0, 2**31))
def test_fast_gelu_equals_reference(n, dtype, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(n) * 4.0).astype(dtype)
    g = rng.standard_normal(n).astype(dtype)
    before = untouched((x, g))
    y, (dx,) = both_vjps(fast_layers.gelu, (x,), (0,), g)
    y_ref, (dx_ref,) = both_vjps(gelu, (x,), (0,), g)
    assert same(before, (x, g)) and y.dtype == dx.dtype == np.dtype(dtype)
    # y = x s, s = (1 + tanh u) / 2, u = c x + c k x^3. u: x^2 (1), times c k (a constant: 1 + 1),
    # + c (1 + 1), times x (5); tanh (7: its error is relative to |s| <= 1, as u's is, since
    # |d tanh / du| |u| < 1/2); / 2 exact, + 1/2 (8); times x (9), on M = |x|. The reference:
    # 0.5 x (1 + tanh(c (x + k x^3))), 8 (test_layers) plus its two constants: 10.
    x64, g64 = f64(x), f64(g)
    assert_within(y, y_ref, 2 * tolerance(dtype, 10) * np.abs(x64), what="gelu")
    # dy/dx = s (1 + (x - y)(2c + 6 c k x^2)), x - y = x (1 - s): 2c + 6ck x^2 (5); y (9, above), x - y
    # (10), product (16), + 1 (17), times s (26), times g (27); the reference's 0.5 h (1 + x (2 - h)(c +
    # 3ck x^2)) the same rules give 26. Terms bounded by |g| (1 + 0.5 |x| c (1 + 3 k x^2)) (test_layers).
    c = math.sqrt(2.0 / math.pi)
    M = np.abs(g64) * (1.0 + 0.5 * np.abs(x64) * c * (1.0 + 3 * 0.044715 * x64**2))
    assert_within(dx, dx_ref, 2 * tolerance(dtype, 27) * M, what="gelu dx")
    with np.errstate(over="ignore"):            # autograd's tanh VJP g / cosh(u)^2: cosh overflows to inf, g/inf = 0
        auto = traced_vjp(fast_layers.gelu, (x,), 0, g)
    assert_within(dx, auto, 2 * tolerance(dtype, 27) * M, what="gelu dx (autograd.numpy)")


@settings(deadline=None)
@given(B=st.integers(1, 3), T=st.integers(1, 6), H=st.integers(1, 3), D=st.integers(1, 4),
       dtype=st.sampled_from(["float64", "float32"]), seed=st.integers(0, 2**31))
def test_fast_attention_equals_reference(B, T, H, D, dtype, seed):
    rng = np.random.default_rng(seed)
    C = H * D
    qkv = (rng.standard_normal((B, T, 3 * C)) * rng.uniform(0.2, 2.0)).astype(dtype)
    g = rng.standard_normal((B, T, C)).astype(dtype)
    scale = 1.0 / math.sqrt(D)
    args = (qkv, H, scale)
    before = untouched(args + (g,))
    y, (d,) = both_vjps(fast_layers.causal_attention, args, (0,), g)
    y_ref, (d_ref,) = both_vjps(causal_attention, args, (0,), g)
    assert same(before, args + (g,)) and y.dtype == d.dtype == np.dtype(dtype)
    # A = the largest score magnitude, scale sum_d |q_d k_d|: a score carries D + 1 roundings
    # relative to A, the shifted score D + 2 relative to 2A, and exp turns that absolute error into a
    # relative one, so each P is within e_P = 4 A gamma_{D+2} + gamma_{T+4} of exact, relative to P
    # (exp 2, a sum over at most T keys, a divide). Forward: y = P V sums at most T terms, each P
    # times |v| <= max|v|: within (e_P + gamma_T) max|v| for either computation (the fast one sums
    # over the keys a block of queries sees, the reference over all T with exact zeros).
    q64, k64 = (f64(qkv[..., i * C:(i + 1) * C]).reshape(B, T, H, D) for i in range(2))
    A = float(np.max(scale * np.einsum("bihd,bjhd->bhij", np.abs(q64), np.abs(k64))))
    vmax, gmax, qkmax = (float(np.abs(f64(a)).max()) for a in (qkv[..., 2 * C:], g, qkv[..., :2 * C]))
    e_P = 4 * A * tolerance(dtype, D + 2) + tolerance(dtype, T + 4)
    assert_within(y, y_ref, 2 * (e_P + tolerance(dtype, T)) * vmax, what="attention")
    # Backward. Reference: dP = G V^T (D), dP P summed over T (D + T + 1), minus, times P, times
    # scale (D + T + 4), dq = sum over T (D + 2T + 4). Fast: y = P V (T), g y summed over D with
    # scale (T + D + 2), V (scale G)^T (D + 1), minus, times P (T + D + 4), dq (D + 2T + 4); dk and dv
    # sum at most T terms whichever blocks they come from (any grouping of a sum of T terms rounds at
    # most T - 1 times). Both within (e_P + gamma_{D+2T+4}) M, where
    # M = max(2 D T max|g| max|v| scale max|q, k|, T max|g|) bounds every entry of dq, dk, dv
    # (test_attention's magnitude).
    M = max(2 * D * T * gmax * vmax * scale * qkmax, T * gmax)
    bound = 2 * (e_P + tolerance(dtype, D + 2 * T + 4)) * M
    assert_within(d, d_ref, bound, what="attention dqkv")
    assert_within(d, traced_vjp(fast_layers.causal_attention, args, 0, g), bound, what="attention dqkv (autograd.numpy)")


def test_fast_layers_finite_differences():
    rng = np.random.default_rng(6)
    x, w, b = rng.standard_normal((2, 3, 5)), rng.standard_normal(5), rng.standard_normal(5)
    check_grads(lambda x, w, b: fast_layers.layer_norm(x, w, b, 1e-5), modes=["rev"], order=1)(x, w, b)
    check_grads(fast_layers.gelu, modes=["rev"], order=1)(rng.standard_normal(7) * 3.0)
    check_grads(lambda a: fast_layers.causal_attention(a, 2, 0.5), modes=["rev"], order=1)(rng.standard_normal((2, 4, 12)))


def test_fast_layers_vjps_can_be_called_twice():
    """A VJP that wrote into its cache would give another answer the second time."""
    rng = np.random.default_rng(7)
    x, w, b, g = rng.standard_normal((2, 4, 6)), rng.standard_normal(6), rng.standard_normal(6), rng.standard_normal((2, 4, 6))
    qkv, gy = rng.standard_normal((2, 4, 18)), rng.standard_normal((2, 4, 6))
    for layer, args, argnums, gg in ((fast_layers.layer_norm, (x, w, b, 1e-5), (0, 1, 2), g),
                                     (fast_layers.gelu, (x,), (0,), g),
                                     (fast_layers.causal_attention, (qkv, 2, 0.5), (0,), gy)):
        vjp, _ = autograd.make_vjp(lambda *a: layer(*a), argnum=argnums)(*args)
        first = [np.array(a, copy=True) for a in vjp(gg)]
        assert all(np.array_equal(a, c) for a, c in zip(first, vjp(gg))), layer.__name__


def test_fast_layers_on_array_api_strict():
    """The same array code on array_api_strict (whose in-place operators follow the standard's
    rules) gives NumPy's numbers."""
    pytest.importorskip("array_api_strict")
    rng = np.random.default_rng(8)
    x, w, b, g = rng.standard_normal((2, 4, 6)), rng.standard_normal(6), rng.standard_normal(6), rng.standard_normal((2, 4, 6))
    qkv, gy = rng.standard_normal((2, 4, 18)), rng.standard_normal((2, 4, 6))
    cases = ((fast_layers.layer_norm, (x, w, b, 1e-5), (0,), g), (fast_layers.gelu, (x,), (0,), g),
             (fast_layers.causal_attention, (qkv, 2, 0.5), (0,), gy))
    for layer, args, argnums, gg in cases:
        y, (dx,) = both_vjps(layer, args, argnums, gg)
        with use_backend("array_api_strict"):
            sargs = tuple(asarray(a) if isinstance(a, np.ndarray) else a for a in args)
            sy, (sdx,) = both_vjps(layer, sargs, argnums, asarray(gg))
        assert type(sy).__module__.startswith("array_api_strict")
        assert np.array_equal(to_numpy(sy), y) and np.array_equal(to_numpy(sdx), dx), layer.__name__


def test_sharded_step_forms_each_folded_weight_once(monkeypatch):
    """The batch slices of one sharded step share W + s B A: formed once per adapted projection
    (not once per slice), and the result is the unsplit computation's (test_sharded_equals_whole_batch)."""
    from transformer_ref import fast

    if not machine.per_thread_blas():
        pytest.skip("NumPy's BLAS cannot run single-threaded per worker here: no batch split")
    lc = lora_config_for(["q", "v"], r=2, alpha=3.0)
    params, tokens, targets = tiny_model()
    adapters = random_adapters(params, TINY, lc)
    formed = []
    original = fast._folded
    monkeypatch.setattr(fast, "_folded", lambda *a: formed.append(id(a[1])) or original(*a))
    def objective(ad, x, y, masks):
        return loss(params, x, y, TINY, ad, lc, masks, ops=FAST)

    value, grads = sharded_value_and_grad(objective, 2)(adapters, tokens, targets, None)
    assert sorted(formed) == sorted(id(ad["A"]) for ad in adapters.values())     # each once, both slices folded
    again = sharded_value_and_grad(objective, 2)(adapters, tokens, targets, None)   # whichever slice folds
    assert float(again[0]) == float(value)
    assert all(np.array_equal(again[1][k][p], grads[k][p]) for k in grads for p in ("A", "B"))
    formed.clear()
    ref_value, ref_grads = autograd.value_and_grad(objective)(adapters, tokens, targets, None)
    assert len(formed) == len(adapters)                                         # unsplit: once each as well
    n = 2 * chain_length(TINY, 2) + 2                                           # as test_sharded_equals_whole_batch
    assert_within(value, ref_value, 2 * tolerance("float64", n) * abs(float(ref_value)), what="sharded FAST loss")
    assert_trees_close(grads, ref_grads, "float64", n, what="sharded FAST dL/dadapters")


# ----------------------------------------------------------------------------------------------
# fast_llama (FAST's RMSNorm, SwiGLU, grouped-query attention) == the reference layers
# ----------------------------------------------------------------------------------------------


def sig(x):
    return 1.0 / (1.0 + np.exp(-x))


@settings(deadline=None)
@given(n=st.integers(1, 40), dtype=st.sampled_from(["float64", "float32"]), seed=st.integers(0, 2**31))
def test_fast_swiglu_equals_reference(n, dtype, seed):
    rng = np.random.default_rng(seed)
    gate, up, g = (rng.standard_normal(n) * 8.0).astype(dtype), *(rng.standard_normal((2, n)).astype(dtype))
    before = untouched((gate, up, g))
    y, (dgate, dup) = both_vjps(fast_llama.swiglu, (gate, up), (0, 1), g)
    y_ref, (dgate_ref, dup_ref) = both_vjps(swiglu, (gate, up), (0, 1), g)
    assert same(before, (gate, up, g)) and y.dtype == dgate.dtype == dup.dtype == np.dtype(dtype)
    x, u, gg = f64(gate), f64(up), f64(g)
    # y: exp(-x) 2, + 1 3, 1/. 4 (sigmoid), times x 5, times up 6; the reference 7 (test_layers).
    assert_within(y, y_ref, 2 * tolerance(dtype, 7) * np.abs(x * sig(x) * u), what="swiglu")
    # dgate = g up s (1 + x sigmoid(-x)), sigmoid(-x) = 1 / (1 + exp(x)) (4), times x 5, + 1 6, times s
    # 11, times g 12, times up 13; the reference 17, on |g up| (s + 3 |x| s sigmoid(-x)) (test_layers:
    # the terms autograd's chain forms; the hand formulas' terms are within it).
    M = np.abs(gg * u) * (sig(x) + 3.0 * np.abs(x) * sig(x) * sig(-x))
    assert_within(dgate, dgate_ref, 2 * tolerance(dtype, 17) * M, what="swiglu dgate")
    assert_within(dup, dup_ref, 2 * tolerance(dtype, 7) * np.abs(gg * x * sig(x)), what="swiglu dup")
    assert_within(dgate, traced_vjp(fast_llama.swiglu, (gate, up), 0, g), 2 * tolerance(dtype, 17) * M,
                  what="swiglu dgate (autograd.numpy)")


def test_fast_swiglu_at_the_ends_of_the_range():
    """Where exp(-x) or exp(x) overflows the sigmoid is 0 (the reference's is 0 or subnormal there):
    no NaN, no warning, silu(x) = x for large x and 0 for very negative x, the derivative 1 and 0."""
    for dtype in ("float32", "float64"):
        x = np.array([1000.0, -1000.0, 0.0, 50.0, -50.0], dtype=dtype)
        one = np.ones_like(x)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            y, (dgate,) = both_vjps(fast_llama.swiglu, (x, one), (0,), one)
        y_ref, (dgate_ref,) = both_vjps(swiglu, (x, one), (0,), one)
        assert np.all(np.isfinite(y)) and np.all(np.isfinite(dgate))
        assert y[0] == 1000.0 and y[1] == 0.0 and y[2] == 0.0 and dgate[0] == 1.0 and dgate[1] == 0.0 and dgate[2] == 0.5
        tiny = float(np.finfo(dtype).smallest_normal)           # where the reference underflows too
        assert np.all(np.abs(y - y_ref) <= 2 * tolerance(dtype, 7) * np.abs(y_ref) + 1000.0 * tiny)
        assert np.all(np.abs(dgate - dgate_ref) <= 2 * tolerance(dtype, 17) * (1.0 + np.abs(x)) + 1000.0 * tiny)


@settings(deadline=None)
@given(B=st.integers(1, 3), T=st.integers(1, 4), C=st.integers(1, 9), dtype=st.sampled_from(["float64", "float32"]),
       seed=st.integers(0, 2**31))
def test_fast_rms_norm_equals_reference(B, T, C, dtype, seed):
    rng = np.random.default_rng(seed)
    x = ((rng.standard_normal((B, T, C)) + 0.5) * 10.0 ** rng.integers(-3, 4, size=(B, T, 1))).astype(dtype)
    w, g, eps = rng.standard_normal(C).astype(dtype), rng.standard_normal((B, T, C)).astype(dtype), 1e-5
    before = untouched((x, w, g))
    y, (dx, dw) = both_vjps(fast_llama.rms_norm, (x, w, eps), (0, 1), g)
    y_ref, (dx_ref, dw_ref) = both_vjps(rms_norm, (x, w, eps), (0, 1), g)
    assert same(before, (x, w, g)) and y.dtype == dx.dtype == dw.dtype == np.dtype(dtype)
    My, Mdx, Mdw = rms_magnitudes(x, w, g, eps)
    # Fast: x^2 1, times 1/C (a constant: 1 + 1), sum of C (C + 2), + eps (C + 3), sqrt (C + 5), 1/.
    # (C + 6) = rho; x rho (C + 7), times weight (C + 8). dx = rho (gw - xhat mean(gw xhat)): gw 1,
    # gw xhat (C + 9), the mean (2C + 10), xhat times it (3C + 18), minus (3C + 19), times rho (4C + 26).
    # dweight: g xhat (C + 8) summed over N rows (N + C + 7). The reference's counts (test_layers:
    # C + 6, 4C + 19, N + C + 5) are within these.
    n_y, n_dx, n_dw = C + 8, 4 * C + 26, B * T + C + 7
    assert_within(y, y_ref, 2 * tolerance(dtype, n_y) * My, what="rms_norm")
    assert_within(dx, dx_ref, 2 * tolerance(dtype, n_dx) * Mdx, what="rms_norm dx")
    assert_within(dw, dw_ref, 2 * tolerance(dtype, n_dw) * Mdw, what="rms_norm dweight")
    assert_within(dx, traced_vjp(fast_llama.rms_norm, (x, w, eps), 0, g), 2 * tolerance(dtype, n_dx) * Mdx,
                  what="rms_norm dx (autograd.numpy)")


def test_fast_rms_norm_falls_back_where_the_textbook_overflows_and_for_float16():
    rng = np.random.default_rng(9)
    for dtype, huge in (("float32", 1e30), ("float64", 1e200), ("float16", 1.0)):
        x = rng.standard_normal((2, 3, 8)).astype(dtype)
        x[0, 1] *= np.asarray(huge, dtype)
        w, g = rng.standard_normal(8).astype(dtype), rng.standard_normal((2, 3, 8)).astype(dtype)
        got = both_vjps(fast_llama.rms_norm, (x, w, 1e-5), (0, 1), g)
        ref = both_vjps(rms_norm, (x, w, 1e-5), (0, 1), g)
        assert np.array_equal(got[0], ref[0]) and all(np.array_equal(a, b) for a, b in zip(got[1], ref[1])), dtype
        assert np.all(np.isfinite(got[0]))
    with pytest.raises(ValueError, match="weight must have shape"):       # the reference's checks
        fast_llama.rms_norm(np.ones((2, 3)), np.ones(4), 1e-5)


def gqa_bounds(q, k, v, g, H, Hk, scale, dtype):
    """Per-entry bounds of one computation of y, dq, dk, dv: test_attention.attention_reference's error
    model (a_il = scale |q_i|.|k_l|, eps_P = 4 A_i gamma(D + 2) + gamma(T + 4), Ms = scale P (b +
    rowsum(b P)), b = |Gy| |V|^T), with the fast backward's counts, one longer than the reference's:
    its row term g_i . y_i (y: eps_P + gamma(T) on P|V|; times g, summed over D with scale: T + D + 2,
    on scale rowsum(b P)) and V (scale G)^T (D + 1), minus, times P: dS within 2 eps_P + gamma(D + T + 4)
    of Ms; dq + T, dk + T + G, dv + T + G (sums over at most T keys or queries, in any grouping)."""
    q, k, v, g = (f64(a) for a in (q, k, v, g))
    B, T, HD = q.shape
    D, G = HD // H, H // Hk
    gam = lambda n: tolerance(dtype, n)   # noqa: E731
    out = {name: np.zeros(a.shape) for name, a in (("y", q), ("dq", q), ("dk", k), ("dv", v))}
    causal = np.tril(np.ones((T, T), bool))
    for b, h in np.ndindex(B, H):
        qc, kc = slice(h * D, (h + 1) * D), slice((h // G) * D, (h // G + 1) * D)
        Q, K, V, Gy = q[b, :, qc], k[b, :, kc], v[b, :, kc], g[b, :, qc]
        S = np.where(causal, Q @ K.T * scale, -np.inf)
        P = np.exp(S - S.max(1, keepdims=True))
        P /= P.sum(1, keepdims=True)
        a = np.where(causal, np.abs(Q) @ np.abs(K).T * scale, 0.0)
        eps_P = 4 * a.max(1) * gam(D + 2) + gam(T + 4)                           # (T,) per query
        bmat = np.abs(Gy) @ np.abs(V).T
        Ms = scale * P * (bmat + (bmat * P).sum(1, keepdims=True))
        e_S = 2 * eps_P + gam(D + T + 4)
        out["y"][b, :, qc] = (eps_P + gam(T))[:, None] * (P @ np.abs(V))
        out["dq"][b, :, qc] = (e_S + gam(T))[:, None] * (Ms @ np.abs(K))
        out["dk"][b, :, kc] += Ms.T @ (np.abs(Q) * (e_S + gam(T + G))[:, None])
        out["dv"][b, :, kc] += P.T @ (np.abs(Gy) * (eps_P + gam(T + G))[:, None])
    return out


@settings(deadline=None)
@given(B=st.integers(1, 2), T=st.integers(1, 6), Hk=st.integers(1, 3), G=st.integers(1, 3), D=st.integers(1, 4),
       dtype=st.sampled_from(["float64", "float32"]), seed=st.integers(0, 2**31))
def test_fast_gqa_equals_reference(B, T, Hk, G, D, dtype, seed):
    rng = np.random.default_rng(seed)
    H, scale = Hk * G, D ** -0.5
    q, g = (rng.standard_normal((B, T, H * D)).astype(dtype) for _ in range(2))
    k, v = (rng.standard_normal((B, T, Hk * D)).astype(dtype) for _ in range(2))
    args = (q, k, v, H, Hk, scale)
    before = untouched(args + (g,))
    y, grads = both_vjps(fast_llama.grouped_query_attention, args, (0, 1, 2), g)
    y_ref, grads_ref = both_vjps(grouped_query_attention, args, (0, 1, 2), g)
    assert same(before, args + (g,)) and all(a.dtype == np.dtype(dtype) for a in (y, *grads))
    bound = gqa_bounds(q, k, v, g, H, Hk, scale, dtype)
    assert_within(y, y_ref, 2 * bound["y"], what="gqa")
    for i, name in enumerate(("dq", "dk", "dv")):
        assert_within(grads[i], grads_ref[i], 2 * bound[name], what=f"gqa {name}")
        assert_within(grads[i], traced_vjp(fast_llama.grouped_query_attention, args, i, g), 2 * bound[name],
                      what=f"gqa {name} (autograd.numpy)")
    # a VJP asked for one argument alone gives that argument's gradient of the VJP asked for all three
    for i in range(3):
        assert np.array_equal(both_vjps(fast_llama.grouped_query_attention, args, (i,), g)[1][0], grads[i])


def test_fast_llama_layers_finite_differences_and_array_api_strict():
    rng = np.random.default_rng(10)
    x, up, w = rng.standard_normal((2, 3, 5)) * 2.0, rng.standard_normal((2, 3, 5)), rng.standard_normal(5)
    q, k, v = rng.standard_normal((2, 4, 12)), rng.standard_normal((2, 4, 6)), rng.standard_normal((2, 4, 6))
    check_grads(fast_llama.swiglu, modes=["rev"], order=1)(x, up)
    check_grads(lambda x, w: fast_llama.rms_norm(x, w, 1e-5), modes=["rev"], order=1)(x, w)
    check_grads(lambda q, k, v: fast_llama.grouped_query_attention(q, k, v, 4, 2, 0.5), modes=["rev"], order=1)(q, k, v)
    pytest.importorskip("array_api_strict")
    cases = ((fast_llama.swiglu, (x, up), (0, 1), x), (fast_llama.rms_norm, (x, w, 1e-5), (0, 1), x),
             (fast_llama.grouped_query_attention, (q, k, v, 4, 2, 0.5), (0, 1, 2), q))
    for layer, args, argnums, gg in cases:
        y, gs = both_vjps(layer, args, argnums, gg)
        with use_backend("array_api_strict"):
            sy, sgs = both_vjps(layer, tuple(asarray(a) if isinstance(a, np.ndarray) else a for a in args), argnums,
                                asarray(gg))
        assert type(sy).__module__.startswith("array_api_strict")
        assert np.array_equal(to_numpy(sy), y) and all(np.array_equal(to_numpy(a), b) for a, b in zip(sgs, gs))
