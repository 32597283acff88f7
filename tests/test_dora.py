"""Properties of lora_ref.dora: DoRA's math (Liu et al. 2024), checked in float64 and float32.

Every tolerance is ``tolerance(dtype, n) * M`` with ``n`` from ``dora_rounding_counts`` and the
magnitude ``M`` from ``dora_magnitudes`` (both derived in lora_ref/dora.py: the computation on
absolute values, with the norm's conditioning ``||(|W| + |s||B||A|)_i|| / ||V_i||`` carried by the
factor f); comparing two computations doubles it. Exact properties are checked exactly.
"""

from __future__ import annotations

import array_api_strict
import autograd
import numpy as np
import pytest
from autograd.extend import defvjp_argnum, primitive
from autograd.test_util import check_grads
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_ref import lora_linear, to_numpy
from lora_ref.dora import (
    dora_linear,
    dora_magnitude,
    dora_magnitudes,
    dora_merge,
    dora_rounding_counts,
    dora_unmerge,
)
from lora_ref.strategies import lora_cases
from lora_ref.testing import assert_within, tolerance

ARGS = ("x", "W", "A", "B", "m", "bias")

# ----------------------------------------------------------------------------------------------
# Cases and bounds
# ----------------------------------------------------------------------------------------------


def f64(a):
    return np.asarray(to_numpy(a), dtype=np.float64)


def draw_case(data, **kwargs):
    """A LoRA case (lora_ref.strategies) plus a trained-looking magnitude m: the initial
    ||W + s B A||_c times a factor in +-[1/2, 2] per row (m can change sign in training)."""
    case = data.draw(lora_cases(enable_lora=False, **kwargs))
    rng = np.random.default_rng(case.seed + 3)
    C = f64(dora_magnitude(case.W, case.A, case.B, case.scale))
    factor = rng.uniform(0.5, 2.0, C.shape) * rng.choice([-1.0, 1.0], C.shape)
    return case, (C * factor).astype(case.dtype)


def n_tokens(case):
    return int(np.prod(case.batch_shape, dtype=np.int64))


def bound(case, m, key, *, dy=None, detach=True, mask=True, copies=2):
    """``copies * gamma_n * M`` for output ``key`` of the case (copies = computations compared)."""
    mags = dora_magnitudes(case.x, case.W, case.A, case.B, m, case.scale, bias=case.bias,
                           dropout_mask=case.mask if mask else None, dy=dy, detach_norm=detach)
    n = dora_rounding_counts(case.d_in, case.d_out, case.r, n_tokens(case))[key]
    return copies * tolerance(case.dtype, n) * mags[key]


def upstream(case, seed_offset=1):
    rng = np.random.default_rng(case.seed + seed_offset)
    return rng.uniform(-1.0, 1.0, case.batch_shape + (case.d_out,)).astype(case.dtype)


def grads(fun, case, m, G, *, detach=True, mask=True):
    """(y, (dx, dW, dA, dB, dm, dbias)) of fun(x, W, A, B, m, s, bias, mask, detach) at upstream G."""
    f = lambda x, W, A, B, mm, b: fun(x, W, A, B, mm, case.scale, b, case.mask if mask else None, detach)  # noqa: E731
    argnum = (0, 1, 2, 3, 4) if case.bias is None else (0, 1, 2, 3, 4, 5)     # no gradient for an absent bias
    vjp, y = autograd.make_vjp(f, argnum=argnum)(case.x, case.W, case.A, case.B, m, case.bias)
    return y, tuple(vjp(G)) + (() if case.bias is not None else (None,))


# ----------------------------------------------------------------------------------------------
# Section 4.1: initialisation and the decomposition
# ----------------------------------------------------------------------------------------------


@given(data=st.data())
def test_initial_magnitude_makes_the_layer_the_base_layer(data):
    # B = 0 and m = ||W||_c: V = W + 0 exactly, f = m / C = 1 exactly (the same norm code on the
    # same V), so Eq. 5 gives x W^T + bias up to the forward's own rounding.
    case = data.draw(lora_cases(enable_lora=False, init="kaiming", bias=True))
    m = dora_magnitude(case.W, case.A, case.B, case.scale)
    assert not np.any(case.B) and m.dtype == case.W.dtype and m.shape == (case.d_out,)
    y = dora_linear(case.x, case.W, case.A, case.B, m, case.scale, case.bias, case.mask)
    base = case.x @ case.W.T + case.bias
    assert y.dtype == base.dtype
    assert_within(y, base, bound(case, m, "y"), what="DoRA at init vs the base layer")


@given(data=st.data())
def test_initial_magnitude_with_random_B_makes_the_layer_the_lora_layer(data):
    # PEFT initialises m = ||W + s B A||_c (B random with init_lora_weights=False): f = 1 and the
    # DoRA layer equals the LoRA layer W + s B A (Eq. 5 at m = ||V||_c).
    case = data.draw(lora_cases(enable_lora=False, bias=True))
    m = dora_magnitude(case.W, case.A, case.B, case.scale)
    y = dora_linear(case.x, case.W, case.A, case.B, m, case.scale, case.bias, case.mask)
    y_lora = lora_linear(case.x, case.W, case.A, case.B, case.scale, case.bias, case.mask)
    assert_within(y, y_lora, bound(case, m, "y"), what="DoRA at init vs LoRA")


@given(data=st.data())
def test_magnitude_is_the_row_norm_per_output_feature(data):
    case, _ = draw_case(data)
    V = f64(case.W) + case.scale * f64(case.B) @ f64(case.A)                 # (d_out, d_in)
    C = dora_magnitude(case.W_stored, case.A, case.B, case.scale, fan_in_fan_out=case.fan_in_fan_out)
    # float64 V within gamma_{r+3} |V|_abs of exact, its norm within ||that||; the library's C
    # within gamma_n N (dora_rounding_counts["norm"]): 2 gamma_n N bounds the difference.
    n = dora_rounding_counts(case.d_in, case.d_out, case.r, 1)["norm"]
    N_row = dora_magnitudes(case.x, case.W, case.A, case.B, C, case.scale)["norm"]
    assert_within(C, np.linalg.norm(V, axis=1), 2 * tolerance(case.dtype, n) * N_row, what="||W + s B A||_c")


# ----------------------------------------------------------------------------------------------
# Merge (Section 4.1, no inference latency) and the exact inverse
# ----------------------------------------------------------------------------------------------


@given(data=st.data())
def test_merge_equals_the_forward(data):
    case, m = draw_case(data, dropout=False, bias=True)
    W_merged = dora_merge(case.W_stored, case.A, case.B, m, case.scale, fan_in_fan_out=case.fan_in_fan_out)
    assert W_merged.shape == case.W_stored.shape and W_merged.dtype == case.W.dtype
    W_eff = W_merged if case.fan_in_fan_out else W_merged.T                   # (d_in, d_out)
    y = dora_linear(case.x, case.W, case.A, case.B, m, case.scale, case.bias)
    # x W'^T + b: W' = f V (f's error in f_mag, r + 4 roundings), then d_in + 1: within the "y" count.
    assert_within(y, case.x @ W_eff + case.bias, bound(case, m, "y"), what="dora_linear vs merged weight")


@given(data=st.data())
def test_merged_rows_have_norm_m(data):
    case, m = draw_case(data, dropout=False)
    W_merged = f64(dora_merge(case.W, case.A, case.B, m, case.scale))
    # ||f V_i|| = |m_i|: each entry of W' within gamma_n W_merged-magnitude, so the norm within its norm.
    err = np.linalg.norm(bound(case, m, "W_merged", copies=1), axis=1)
    assert_within(np.linalg.norm(W_merged, axis=1), np.abs(f64(m)), err + tolerance("float64", case.d_in + 2) * np.abs(f64(m)))


def _round_trip_bound(case):
    """unmerge(merge(W)) with the cached norm: the factor (m/C)(C/m) = 1 to 2 roundings, V = W + D
    one, times f and times C/m two, minus D one (D = s B A is the same computed array in both
    calls). So unmerge(merge(W)) = (W + D)(1 + theta_5) - D, rounded once more: within
    gamma_6 (|W| + |D|) of W."""
    D = np.abs(case.scale) * np.abs(f64(case.B)) @ np.abs(f64(case.A))
    D = D.T if case.fan_in_fan_out else D
    return tolerance(case.dtype, 6) * (np.abs(f64(case.W_stored)) + D)


@given(data=st.data())
def test_unmerge_recovers_W(data):
    case, m = draw_case(data, dropout=False)
    kw = {"fan_in_fan_out": case.fan_in_fan_out}
    norm = dora_magnitude(case.W_stored, case.A, case.B, case.scale, **kw)    # what PEFT caches
    merged = dora_merge(case.W_stored, case.A, case.B, m, case.scale, **kw)
    W = dora_unmerge(merged, case.A, case.B, m, case.scale, norm=norm, **kw)
    assert W.shape == case.W_stored.shape and W.dtype == case.W_stored.dtype
    assert_within(W, case.W_stored, _round_trip_bound(case), what="dora_unmerge(dora_merge(W))")


def test_the_merged_weight_does_not_determine_the_norm():
    # Why unmerge needs the cached norm: W2 = (C2 / m) W' - s B A with C2 = 2 C merges to the same
    # W', yet W2 != W. Its norm ||W2 + s B A|| = (C2 / |m|) |m| = C2.
    rng = np.random.default_rng(11)
    W, A, B, s = rng.normal(size=(4, 6)), rng.normal(size=(2, 6)), rng.normal(size=(4, 2)), 0.5
    m = rng.uniform(0.5, 2.0, 4)
    merged = dora_merge(W, A, B, m, s)
    C = dora_magnitude(W, A, B, s)
    W2 = dora_unmerge(merged, A, B, m, s, norm=2 * C)
    assert np.max(np.abs(W2 - W)) > 0.1                                       # a different base weight
    # W2 carries the unmerge's error (6 roundings, as in _round_trip_bound, on |W2| + |s||B||A|),
    # then merging it adds the "W_merged" chain: one bound with the sum of the counts.
    n = dora_rounding_counts(6, 4, 2, 1)["W_merged"] + 6
    b = 2 * tolerance("float64", n) * dora_magnitudes(np.zeros((1, 6)), W2, A, B, m, s)["W_merged"]
    assert_within(dora_merge(W2, A, B, m, s), merged, b, what="merge of the other base weight")


# ----------------------------------------------------------------------------------------------
# Section 4.2 / 4.3: gradients, three ways
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("detach", [True, False], ids=["detached", "exact"])
@given(data=st.data())
def test_vjps_match_autograd_numpy_trace(detach, data):
    case, m = draw_case(data, bias=True, max_dim=24)
    G = upstream(case)
    y_hand, hand = grads(dora_linear, case, m, G, detach=detach)              # hand-written VJPs
    y_trace, traced = grads(dora_linear.fun, case, m, G, detach=detach)       # autograd.numpy
    assert np.array_equal(y_hand, y_trace)                                    # same forward code
    for name, h, t, like in zip(ARGS, hand, traced, (case.x, case.W, case.A, case.B, m, case.bias)):
        assert h.shape == like.shape and h.dtype == like.dtype, name
        assert_within(h, t, bound(case, m, f"d{name}", dy=G, detach=detach), what=f"dL/d{name}")


@pytest.mark.parametrize("dropout", [False, True])
@settings(max_examples=15)
@given(data=st.data())
def test_exact_gradient_matches_finite_differences(dropout, data):
    # Eq. 6 and 7: the exact VJPs are the derivative of the layer (first and second order).
    case, m = draw_case(data, dtype="float64", bias=True, max_dim=10, dropout=dropout)
    np.random.seed(case.seed)  # check_grads draws its directions from NumPy's global generator
    f = lambda x, W, A, B, mm, b: dora_linear(x, W, A, B, mm, case.scale, b, case.mask, False)  # noqa: E731
    check_grads(f, modes=["rev"], order=2)(case.x, case.W, case.A, case.B, m, case.bias)


def _frozen_norm_layer(case, C0):
    """The layer with ||V||_c frozen at C0 (Section 4.3's surrogate), whose gradient at the point
    where ||V||_c = C0 is the detached VJP of dora_linear: finite differences can check that."""
    @primitive
    def layer(x, W, A, B, m, b):
        V = W + (B @ A) * case.scale
        xd = x if case.mask is None else x * case.mask
        y = (xd @ V.T) * (m / C0) + b
        return y if case.mask is None else y + (x - xd) @ W.T

    def vjpmaker(argnum, ans, args, kwargs):
        f = lambda *a: dora_linear(*a[:5], case.scale, a[5], case.mask, True)  # noqa: E731
        return autograd.make_vjp(f, argnum=argnum)(*args)[0]

    defvjp_argnum(layer, vjpmaker)
    return layer


@pytest.mark.parametrize("dropout", [False, True])
@settings(max_examples=15)
@given(data=st.data())
def test_detached_gradient_matches_finite_differences_of_the_frozen_norm_layer(dropout, data):
    case, m = draw_case(data, dtype="float64", bias=True, max_dim=10, dropout=dropout)
    C0 = dora_magnitude(case.W, case.A, case.B, case.scale)
    np.random.seed(case.seed)
    check_grads(_frozen_norm_layer(case, C0), modes=["rev"], order=1)(case.x, case.W, case.A, case.B, m, case.bias)


def test_detached_gradient_is_not_the_layers_gradient():
    # Guard for the two tests above: the detached VJP must fail the check against the real layer.
    rng = np.random.default_rng(3)
    x, W, A, B = rng.normal(size=(3, 5)), rng.normal(size=(4, 5)), rng.normal(size=(2, 5)), rng.normal(size=(4, 2))
    m = rng.uniform(0.5, 2.0, 4)
    np.random.seed(0)
    with pytest.raises(AssertionError):
        check_grads(lambda A_: dora_linear(x, W, A_, B, m, 1.0), modes=["rev"], order=1)(A)


@given(data=st.data())
def test_exact_minus_detached_is_the_projection_term(data):
    # (g4): dL/dV_exact - dL/dV_detached = -f (phi / C^2) V = -(f dm / C) V =: R, so
    # dA differs by s B^T R, dB by s R A^T, dW by R; dm, dx, dbias do not change at all.
    case, m = draw_case(data, bias=True, max_dim=24)
    G = upstream(case)
    _, det = grads(dora_linear, case, m, G, detach=True)
    _, ex = grads(dora_linear, case, m, G, detach=False)
    for k in (0, 4, 5):
        assert np.array_equal(det[k], ex[k]), ARGS[k]
    V = f64(case.W) + case.scale * f64(case.B) @ f64(case.A)
    C = np.linalg.norm(V, axis=1)
    R = -(f64(m) / C * f64(ex[4]) / C)[:, None] * V                            # (d_out, d_in)
    terms = {"W": R, "A": case.scale * f64(case.B).T @ R, "B": case.scale * R @ f64(case.A).T}
    # Three computations (exact, detached, the float64 term): 3 gamma_n M_exact bounds the sum.
    for k, name in ((1, "W"), (2, "A"), (3, "B")):
        b = bound(case, m, f"d{name}", dy=G, detach=False, copies=3)
        assert_within(f64(ex[k]) - f64(det[k]), terms[name], b, what=f"projection term in dL/d{name}")


@given(data=st.data())
def test_exact_weight_gradient_is_orthogonal_to_each_row_of_V(data):
    # Without dropout y is unchanged when V_i is scaled (Eq. 5), so sum_j dL/dW_ij V_ij = 0.
    case, m = draw_case(data, dropout=False, max_dim=24)
    G = upstream(case)
    _, (_, dW, *_) = grads(dora_linear, case, m, G, detach=False, mask=False)
    V = f64(case.W) + case.scale * f64(case.B) @ f64(case.A)
    mags = dora_magnitudes(case.x, case.W, case.A, case.B, m, case.scale, dy=G, detach_norm=False)
    Va = np.abs(f64(case.W)) + abs(case.scale) * np.abs(f64(case.B)) @ np.abs(f64(case.A))
    n = dora_rounding_counts(case.d_in, case.d_out, case.r, n_tokens(case))["dW"] + case.d_in + case.r + 3
    assert_within(np.sum(f64(dW) * V, axis=1), np.zeros(case.d_out),
                  2 * tolerance(case.dtype, n) * np.sum(mags["dW"] * Va, axis=1), what="dL/dW_i . V_i")


# ----------------------------------------------------------------------------------------------
# The norm never overflows or underflows (issue 11, item 2)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, power", [("float64", 664), ("float64", -664), ("float32", 100), ("float32", -100)])
def test_huge_and_tiny_rows(dtype, power):
    # Rows near 1e200 / 1e-200 (float64) and 1e30 / 1e-30 (float32): sum(V^2) overflows to inf or
    # underflows to 0, but DoRA is scale-free: W, B, m, bias times k = 2**power (exact) must give
    # exactly k times the output, the same f, and gradients scaled as the math says.
    k = 2.0 ** power
    rng = np.random.default_rng(5)
    x, W, A, B, b = (rng.uniform(-1, 1, shape).astype(dtype) for shape in ((3, 6), (4, 6), (2, 6), (4, 2), (4,)))
    m = rng.uniform(0.5, 2.0, 4).astype(dtype)
    big = lambda a: (a * k).astype(dtype)  # noqa: E731
    V_big = big(W) + big(B) @ A * 0.5
    with np.errstate(over="ignore", under="ignore"):
        naive = np.sqrt(np.sum(V_big * V_big, axis=1))
    assert np.all(naive == (np.inf if power > 0 else 0.0))                    # the naive norm fails here
    assert np.array_equal(dora_magnitude(big(W), A, big(B), 0.5), big(dora_magnitude(W, A, B, 0.5)))
    G = rng.uniform(-1, 1, (3, 4)).astype(dtype)
    for detach in (True, False):
        f = lambda W_, A_, B_, m_, b_: dora_linear(x, W_, A_, B_, m_, 0.5, b_, None, detach)  # noqa: E731
        vjp, y = autograd.make_vjp(f, argnum=(0, 1, 2, 3, 4))(W, A, B, m, b)
        vjp_big, y_big = autograd.make_vjp(f, argnum=(0, 1, 2, 3, 4))(big(W), A, big(B), big(m), big(b))
        assert np.all(np.isfinite(y_big)) and np.array_equal(y_big, big(y))
        dW, dA, dB, dm, db = vjp(G)
        dW_big, dA_big, dB_big, dm_big, db_big = vjp_big(G)
        # dV = f E and dm = phi / C do not change; dA = s B^T dV scales with B.
        assert np.array_equal(dW_big, dW) and np.array_equal(dB_big, dB) and np.array_equal(dm_big, dm)
        assert np.array_equal(dA_big, big(dA)) and np.array_equal(db_big, db)
    merged = dora_merge(big(W), A, big(B), big(m), 0.5)
    assert np.array_equal(merged, big(dora_merge(W, A, B, m, 0.5)))
    back = dora_unmerge(merged, A, big(B), big(m), 0.5, norm=dora_magnitude(big(W), A, big(B), 0.5))
    assert np.array_equal(back, big(dora_unmerge(dora_merge(W, A, B, m, 0.5), A, B, m, 0.5, norm=dora_magnitude(W, A, B, 0.5))))


# ----------------------------------------------------------------------------------------------
# Mutants: what wrong implementations get wrong, each far outside the derived bound
# ----------------------------------------------------------------------------------------------


def _mutant_case(dtype):
    """A square layer (so the input-axis norm is shape-compatible), with bias, dropout, random B."""
    rng = np.random.default_rng(17)
    d, r = 6, 2
    x, W = rng.uniform(-1, 1, (2, 3, d)), rng.uniform(-1, 1, (d, d))
    A, B, b = rng.uniform(-1, 1, (r, d)), rng.uniform(-1, 1, (d, r)), rng.uniform(-1, 1, d)
    mask = (rng.random((2, 3, d)) >= 0.5) / 0.5
    m = np.linalg.norm(W + 2.0 * B @ A, axis=1) * rng.uniform(0.5, 2.0, d)
    case = type("Case", (), {})()
    for name, value in dict(x=x, W=W, A=A, B=B, bias=b, mask=mask, m=m).items():
        setattr(case, name, value.astype(dtype))
    case.scale, case.dtype, case.d_in, case.d_out, case.r, case.seed = 2.0, dtype, d, d, r, 17
    case.batch_shape = (2, 3)
    return case


def _margin(wrong, right, b, what):
    ratio = float(np.max(np.abs(f64(wrong) - f64(right)) / b))
    assert ratio > 1e3, f"{what}: the mutant is only {ratio:.3g} times the bound from the reference"
    print(f"[dora mutant] {what}: max |mutant - reference| / bound = {ratio:.3g}")
    return ratio


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_mutant_norm_over_the_input_axis(dtype):
    # (a) LyCORIS/kohya dora_scale: one norm per INPUT feature, ||V||_c over the output axis.
    c = _mutant_case(dtype)
    V = c.W + (c.B @ c.A) * c.scale
    C_in = np.sqrt(np.sum(V * V, axis=0))                                      # (d_in,) wrong axis
    y_wrong = c.x @ (V * (c.m / C_in)[None, :]).T + c.bias
    y = dora_linear(c.x, c.W, c.A, c.B, c.m, c.scale, c.bias)
    _margin(y_wrong, y, bound(c, c.m, "y", mask=False), "norm over the input axis (forward)")
    _margin(C_in, dora_magnitude(c.W, c.A, c.B, c.scale), bound(c, c.m, "norm"), "norm over the input axis (init)")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("asked", [True, False], ids=["detached asked", "exact asked"])
def test_mutant_gradient_variant_swapped(dtype, asked):
    # (b) the exact gradient where the detached one is asked, and the reverse.
    c = _mutant_case(dtype)
    G = np.random.default_rng(2).uniform(-1, 1, (2, 3, c.d_out)).astype(dtype)
    _, right = grads(dora_linear, c, c.m, G, detach=asked)
    _, wrong = grads(dora_linear, c, c.m, G, detach=not asked)
    for k, name in ((2, "A"), (3, "B")):
        _margin(wrong[k], right[k], bound(c, c.m, f"d{name}", dy=G, detach=asked),
                f"{'exact' if asked else 'detached'} dL/d{name} where {'detached' if asked else 'exact'} asked")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_mutant_magnitude_from_W_alone(dtype):
    # (c) m initialised to ||W||_c although B != 0 (PEFT includes s B A: init_lora_weights=False).
    c = _mutant_case(dtype)
    m_wrong = np.sqrt(np.sum(c.W * c.W, axis=1))
    m_right = dora_magnitude(c.W, c.A, c.B, c.scale)
    _margin(m_wrong, m_right, bound(c, m_right, "norm"), "magnitude from W alone (init)")
    y_wrong = dora_linear(c.x, c.W, c.A, c.B, m_wrong, c.scale, c.bias)
    y_right = dora_linear(c.x, c.W, c.A, c.B, m_right, c.scale, c.bias)
    _margin(y_wrong, y_right, bound(c, m_right, "y", mask=False), "magnitude from W alone (forward)")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_mutant_dropout_on_the_base_term(dtype):
    # (d) the mask applied to the outer base term too: y = f (xd V^T) + bias.
    c = _mutant_case(dtype)
    V = c.W + (c.B @ c.A) * c.scale
    f = c.m / np.sqrt(np.sum(V * V, axis=1))
    y_wrong = ((c.x * c.mask) @ V.T) * f + c.bias
    y = dora_linear(c.x, c.W, c.A, c.B, c.m, c.scale, c.bias, c.mask)
    _margin(y_wrong, y, bound(c, c.m, "y"), "dropout on the outer base term")


# ----------------------------------------------------------------------------------------------
# Backends and scalars
# ----------------------------------------------------------------------------------------------


def _strict(*arrays):
    return tuple(None if a is None else array_api_strict.asarray(a) for a in arrays)


@pytest.mark.parametrize("detach", [True, False], ids=["detached", "exact"])
@settings(max_examples=15)
@given(data=st.data())
def test_array_api_strict_matches_numpy(detach, data):
    case, m = draw_case(data, bias=True, max_dim=16)
    G = upstream(case)
    y_np, g_np = grads(dora_linear, case, m, G, detach=detach)
    x, W, A, B, mm, b, mask, Gs = _strict(case.x, case.W, case.A, case.B, m, case.bias, case.mask, G)
    f = lambda *a: dora_linear(*a[:5], case.scale, a[5], mask, detach)  # noqa: E731
    vjp, y = autograd.make_vjp(f, argnum=(0, 1, 2, 3, 4, 5))(x, W, A, B, mm, b)
    assert type(y) is type(x)
    assert_within(y, y_np, bound(case, m, "y"), what="forward on array_api_strict")
    for name, gs, gn in zip(ARGS, vjp(Gs), g_np):
        assert type(gs) is type(x)
        assert_within(gs, gn, bound(case, m, f"d{name}", dy=G, detach=detach), what=f"dL/d{name} on array_api_strict")
    kw = {"fan_in_fan_out": case.fan_in_fan_out}
    Ws, = _strict(case.W_stored)
    merged = dora_merge(Ws, A, B, mm, case.scale, **kw)
    b_merged = bound(case, m, "W_merged")
    assert_within(merged, dora_merge(case.W_stored, case.A, case.B, m, case.scale, **kw),
                  b_merged.T if case.fan_in_fan_out else b_merged, what="dora_merge on array_api_strict")
    back = dora_unmerge(merged, A, B, mm, case.scale, norm=dora_magnitude(Ws, A, B, case.scale, **kw), **kw)
    assert_within(back, case.W_stored, _round_trip_bound(case), what="dora_unmerge on array_api_strict")


def test_numpy_scalar_scale_keeps_float32():
    # issue 11 item 3: a NumPy scalar must not turn float32 into float64.
    rng = np.random.default_rng(0)
    x, W, A, B = (rng.normal(size=s).astype(np.float32) for s in ((3, 5), (4, 5), (2, 5), (4, 2)))
    m = np.ones(4, np.float32)
    for s in (np.float64(2.0), np.int64(2), np.float32(0.5)):
        assert dora_magnitude(W, A, B, s).dtype == np.float32
        assert dora_merge(W, A, B, m, s).dtype == np.float32
        assert dora_unmerge(W, A, B, m, s, norm=m).dtype == np.float32
        for detach in (True, False):
            g = autograd.grad(lambda A_: dora_linear(x, W, A_, B, m, s, None, None, detach).sum())(A)
            assert dora_linear(x, W, A, B, m, s).dtype == np.float32 and g.dtype == np.float32


# ----------------------------------------------------------------------------------------------
# Bad input gets a clear error, never a wrong number
# ----------------------------------------------------------------------------------------------

_r = np.random.default_rng(0)
X, W_, A_, B_ = _r.normal(size=(3, 5)), _r.normal(size=(4, 5)), _r.normal(size=(2, 5)), _r.normal(size=(4, 2))
M_ = np.ones(4)
W_zero = W_.copy()
W_zero[2] = 0.0
B_zero = B_.copy()
B_zero[2] = 0.0


@pytest.mark.parametrize("call, error, match", [
    (lambda: dora_linear(X, W_, A_, B_, M_.astype(np.float32), 1.0), TypeError, r"m is float32 but W is float64"),
    (lambda: dora_linear(X, W_, A_, B_, np.ones(5), 1.0), ValueError, r"m must have shape \(4,\), one value per output feature, got \(5,\)"),
    (lambda: dora_linear(X, W_, A_, B_, np.ones((4, 1)), 1.0), ValueError, r"m must have shape \(4,\)"),
    (lambda: dora_linear(X, W_, A_, B_, [1.0] * 4, 1.0), TypeError, r"m must be an array, got list"),
    (lambda: dora_linear(X.astype(np.int64), W_, A_, B_, M_, 1.0), TypeError, r"x must have a floating dtype .*got int64"),
    (lambda: dora_linear(X.astype(np.float32), W_, A_, B_, M_, 1.0), TypeError, r"W is float64 but x is float32"),
    (lambda: dora_linear(X, W_, A_, B_, M_, float("nan")), ValueError, r"scale must be finite, got nan"),
    (lambda: dora_linear(X, W_, A_, B_, M_, "2"), TypeError, r"scale must be a real number, got '2' \(str\)"),
    (lambda: dora_linear(X, W_, A_, B_, M_, 1.0, detach_norm=1), TypeError, r"detach_norm must be a bool, got 1"),
    (lambda: dora_linear(X, W_, A_, B_, M_, 1.0, np.ones(3)), ValueError, r"bias must have shape \(4,\)"),
    (lambda: dora_linear(X, W_, A_, B_, M_, 1.0, None, np.ones((2, 5))), ValueError,
     r"dropout_mask of shape \(2, 5\) does not broadcast to x's shape \(3, 5\)"),
    (lambda: dora_linear(_r.normal(size=(3, 6)), W_, A_, B_, M_, 1.0), ValueError, r"x has d_in=6 \(shape \(3, 6\)\) but W has d_in=5"),
    (lambda: dora_linear(X, W_, _r.normal(size=(2, 6)), B_, M_, 1.0), ValueError, r"A has d_in=6 \(shape \(2, 6\)\) but W has d_in=5"),
    (lambda: dora_linear(X, W_, A_, _r.normal(size=(3, 2)), M_, 1.0), ValueError, r"B has d_out=3 \(shape \(3, 2\)\) but W has d_out=4"),
    (lambda: dora_linear(X, W_, _r.normal(size=(3, 5)), B_, M_, 1.0), ValueError, r"A has rank 3 \(shape \(3, 5\)\) but B has rank 2"),
    (lambda: dora_linear(X, W_zero, A_, B_zero, M_, 1.0), ValueError, r"row\(s\) \[2\] of W \+ s B A are all zero"),
    (lambda: dora_magnitude(W_zero, A_, B_zero, 1.0), ValueError, r"row\(s\) \[2\] of W \+ s B A are all zero"),
    (lambda: dora_magnitude(W_, A_, B_, 1.0, fan_in_fan_out=True), ValueError,
     r"A has d_in=5 \(shape \(2, 5\)\) but W \(stored \(d_in, d_out\): fan_in_fan_out=True\) has d_in=4"),
    (lambda: dora_magnitude(W_, A_, B_, 1.0, fan_in_fan_out="yes"), TypeError, r"fan_in_fan_out must be a bool"),
    (lambda: dora_merge(W_, np.full((2, 5), np.inf), B_, M_, 1.0), ValueError,
     r"dora_merge: the result would contain non-finite values \(non-finite entries: W 0, A 10, B 0, m 0\)"),
    (lambda: dora_merge(W_, A_, B_, np.full(4, np.nan), 1.0), ValueError, r"non-finite entries: W 0, A 0, B 0, m 4"),
    (lambda: dora_unmerge(W_, A_, B_, np.array([1.0, 0.0, 1.0, 1.0]), 1.0, norm=M_), ValueError,
     r"dora_unmerge: m is zero in row\(s\) \[1\]"),
    (lambda: dora_unmerge(W_, A_, B_, M_, 1.0, norm=np.ones(5)), ValueError, r"norm must have shape \(4,\)"),
    (lambda: dora_unmerge(W_, A_, B_, M_, 1.0, norm=np.array([1.0, np.inf, 1.0, 1.0])), ValueError,
     r"dora_unmerge: the result would contain non-finite values \(non-finite entries: W_merged 0, A 0, B 0, m 0, norm 1\)"),
    (lambda: dora_unmerge(W_.astype(np.float32), A_, B_, M_, 1.0, norm=M_), TypeError, r"A is float64 but W_merged is float32"),
])
def test_bad_input_raises_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_unmerge_needs_the_norm():
    with pytest.raises(TypeError, match="norm"):
        dora_unmerge(W_, A_, B_, M_, 1.0)  # type: ignore[call-arg]


def test_scale_mask_and_setting_are_not_differentiable():
    with pytest.raises(TypeError, match="not differentiable with respect to scale"):
        autograd.grad(lambda s: dora_linear(X, W_, A_, B_, M_, s).sum())(0.5)
    with pytest.raises(TypeError, match="not differentiable with respect to dropout_mask"):
        autograd.grad(lambda k: dora_linear(X, W_, A_, B_, M_, 0.5, None, k).sum())(np.ones((3, 5)))
