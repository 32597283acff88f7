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

import autograd
import numpy as np
import pytest
from _gpt_helpers import TINY, assert_trees_close, chain_length, random_adapters, tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_ref import delta_weight, dropout_mask, lora_linear, to_numpy
from lora_ref.strategies import lora_cases
from lora_ref.testing import assert_within, lora_linear_magnitude, tolerance
from transformer_ref import FAST, REFERENCE, lora_config_for, loss, machine
from transformer_ref.fast import _linear, linear, sharded_value_and_grad

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
    # (_gpt_helpers), measured against each value's own size.
    n = 2 * chain_length(TINY, r)
    for what, run in (("LoRA", lora), ("full", full)):
        (value, grads), (ref_value, ref_grads) = run(FAST), run(REFERENCE)
        assert np.asarray(value).dtype == np.dtype(dtype)
        assert_within(value, ref_value, 2 * tolerance(dtype, n) * abs(float(ref_value)), what=f"{what} loss")
        assert_trees_close(grads, ref_grads, dtype, n, what=f"{what} gradients")


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
