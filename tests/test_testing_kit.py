"""The oracle kit (lora_ref.testing) against lora-ref itself and deliberately wrong NumPy layers.

Proof that the kit can fail: each wrong implementation below has one bug, and the kit must
name exactly the properties that bug breaks (and pass the others). Proof that it does not fail
spuriously: correct implementations that evaluate the layer in other orders (through the
merged weight, fused blocks as a dense delta, float32 throughout) pass every property, also on
hypothesis-drawn cases. No torch here; tests/interop/test_kit_vs_peft.py runs the kit on PEFT.
"""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
from autograd import make_vjp
from hypothesis import given, settings
from hypothesis import strategies as st

import lora_ref
from lora_ref import testing
from lora_ref.testing import (DEFAULT_PROPERTIES, PROPERTIES, LoraCheckReport, PropertyResult,
                              assert_lora_linear_matches, assert_within, check_lora_linear,
                              compare_to_reference, lora_magnitudes, reference_outputs, reference_rtol,
                              rounding_counts, tolerance)

FORWARD_PROPS = {"forward", "forward_rslora", "zero_B_identity", "fan_in_fan_out", "dropout", "rank_above_dim",
                 "rank_equals_dims", "rank_equals_d_out"}
MERGE_PROPS = {"merge", "merge_rslora", "merge_fan_in_fan_out", "merge_rank_equals_dims", "merge_rank_equals_d_out"}
GRAD_PROPS = {"grad_x", "grad_A", "grad_B"}


# --------------------------------------------------------------------------------------------
# A second implementation, in plain NumPy, written differently from lora_ref: it forms the dense
# delta s * D (D scattered block by block for fused layers) and evaluates x (W + s D)^T. Each
# `bug` switch plants one realistic mistake.
# --------------------------------------------------------------------------------------------


def _scale(alpha, r, use_rslora, bug):
    if bug == "scale_alpha":
        return float(alpha)                                      # forgot to divide by r
    if bug == "rslora_ignored":
        return alpha / r                                         # rsLoRA's scale ignored
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _dense(A, B, enable, d_out, bug=None):
    """D = B A (d_out, d_in); fused: the k-th enabled block's rows get B_k A_k."""
    if enable is None:
        r_keep = min(A.shape[0], *A.shape[1:], d_out) if bug == "rank_truncated" else A.shape[0]
        return B[:, :r_keep] @ A[:r_keep, :]
    G, r = len(enable), B.shape[1]
    q = d_out // G
    D = np.zeros((d_out, A.shape[1]), dtype=A.dtype)
    enabled = [g for g, on in enumerate(enable) if on]
    for k, g in enumerate(enabled):
        row = k if bug == "fused_packed" else g                  # packed: enabled blocks placed first
        D[row * q:(row + 1) * q, :] = B[k * q:(k + 1) * q, :] @ A[k * r:(k + 1) * r, :]
    return D


def guess_layout(A, B, d_in, d_out):
    """What an implementation that also accepts Keras/Flax's layout (A (d_in, r), B (r, d_out))
    does: guess each factor's layout from its shape. Right unless r == d_in (A square) or r == d_out
    (B square), where it transposes a factor given in PEFT's layout."""
    A = A.T if A.shape[0] == d_in else A                                 # "(d_in, r)": Flax's kernel
    B = B.T if B.shape[1] == d_out else B                                # "(r, d_out)": Flax's kernel
    return A, B


def numpy_layer(bug=None):
    def impl(x, W, A, B, *, alpha, r, use_rslora, bias, dropout_mask, fan_in_fan_out, enable_lora=None):
        if bug == "raises":
            raise RuntimeError("not implemented")
        Wm = W.T if fan_in_fan_out and bug != "fifo_forgotten" else W      # (d_out, d_in)
        if bug == "layout_guess":
            A, B = guess_layout(A, B, Wm.shape[1], Wm.shape[0])
        s = _scale(alpha, r, use_rslora, bug)
        D = _dense(A, B, enable_lora, Wm.shape[0], bug)
        if bug == "float32_inside":                                      # always computes in float32
            x, Wm, D = (t.astype(np.float32) for t in (x, Wm, D))
        xd = x
        if dropout_mask is not None and bug != "dropout_ignored":
            xd = x * dropout_mask
        base_in = xd if bug == "dropout_on_base" else x
        y = base_in @ Wm.T + xd @ (D * s).T
        if bias is not None:
            y = y + bias
        if bug == "lora_bias":
            y = y + s * 0.5                                              # an extra learned bias
        if bug == "wrong_dtype":
            y = y.astype(np.float64)
        if bug == "float32_inside":
            y = y.astype(W.dtype)
        if bug == "modifies_input":
            x *= 2.0
        return y
    return impl


def numpy_merge(bug=None):
    def merge(W, A, B, *, alpha, r, use_rslora, fan_in_fan_out, enable_lora=None):
        fifo = fan_in_fan_out and bug != "fifo_forgotten"
        d_out = W.shape[1] if fan_in_fan_out else W.shape[0]
        s = _scale(alpha, r, use_rslora, bug)
        if bug == "layout_guess":
            A, B = guess_layout(A, B, W.shape[0] if fan_in_fan_out else W.shape[1], d_out)
        if bug == "weighted_A_unweighted_B":
            D = _dense(A * math.sqrt(s), B, enable_lora, d_out)           # sqrt(s) on A, none on B
        else:
            D = _dense(A, B, enable_lora, d_out, bug) * s
        return W + (D.T if fifo else D)
    return merge


def numpy_grad(bug=None):
    def grad(x, W, A, B, dy, *, alpha, r, use_rslora, bias, dropout_mask, fan_in_fan_out):
        Wm = W.T if fan_in_fan_out else W                                 # (d_out, d_in)
        s = _scale(alpha, r, use_rslora, bug)
        mask = np.ones_like(x) if dropout_mask is None else dropout_mask
        X, G = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])    # (N, d_in), (N, d_out)
        M = np.broadcast_to(mask, x.shape).reshape(-1, x.shape[-1])        # (N, d_in)
        Xd = X * M
        adapter_dx = (G @ B) @ A * s
        dx = G @ Wm + adapter_dx * (1.0 if bug == "dx_mask_forgotten" else M)
        dA = s * (G @ B).T @ (X if bug == "dA_mask_forgotten" else Xd)
        dB = s * G.T @ ((X if bug == "dB_mask_forgotten" else Xd) @ A.T)
        return dx.reshape(x.shape), dA, dB
    return grad


def lora_ref_layer(x, W, A, B, *, alpha, r, use_rslora, bias, dropout_mask, fan_in_fan_out, enable_lora=None):
    s = lora_ref.lora_scale(alpha, r, use_rslora)
    return lora_ref.lora_linear(x, W.T if fan_in_fan_out else W, A, B, s, bias, dropout_mask, enable_lora)


def lora_ref_merge(W, A, B, *, alpha, r, use_rslora, fan_in_fan_out, enable_lora=None):
    s = lora_ref.lora_scale(alpha, r, use_rslora)
    return lora_ref.merge(W, A, B, s, enable_lora=enable_lora, fan_in_fan_out=fan_in_fan_out)


def lora_ref_grad(x, W, A, B, dy, *, alpha, r, use_rslora, bias, dropout_mask, fan_in_fan_out):
    s = lora_ref.lora_scale(alpha, r, use_rslora)
    Wm = W.T if fan_in_fan_out else W
    vjp, _ = make_vjp(lambda xx, AA, BB: lora_ref.lora_linear(xx, Wm, AA, BB, s, bias, dropout_mask),
                      argnum=(0, 1, 2))(x, A, B)
    return vjp(dy)


ALL = list(PROPERTIES)


# --------------------------------------------------------------------------------------------
# Correct implementations pass
# --------------------------------------------------------------------------------------------


def test_lora_ref_passes_every_property_in_both_dtypes():
    report = check_lora_linear(lora_ref_layer, merge=lora_ref_merge, grad=lora_ref_grad, properties=ALL)
    assert report.ok, str(report)
    assert bool(report) and not report.failed
    assert len(report) == 2 * len(PROPERTIES)                    # one result per property and dtype
    assert [r.name for r in report][::2] == ALL
    assert {r.dtype for r in report} == {"float64", "float32"}


def test_dense_numpy_layer_passes_every_property():
    # A different evaluation order (the merged weight) must stay inside the same bounds.
    report = check_lora_linear(numpy_layer(), merge=numpy_merge(), grad=numpy_grad(), properties=ALL)
    assert report.ok, str(report)


@settings(max_examples=15)
@given(seed=st.integers(min_value=0, max_value=2**32 - 1))
def test_correct_layers_pass_for_any_seed(seed):
    assert_lora_linear_matches(numpy_layer(), merge=numpy_merge(), grad=numpy_grad(), seed=seed)


def test_default_properties_depend_on_the_callables_given():
    only_impl = check_lora_linear(lora_ref_layer)
    assert {r.name for r in only_impl} == FORWARD_PROPS
    with_all = check_lora_linear(lora_ref_layer, merge=lora_ref_merge, grad=lora_ref_grad)
    assert [r.name for r in with_all][::2] == list(DEFAULT_PROPERTIES)
    assert len(check_lora_linear(lora_ref_layer, dtypes=("float32",))) == len(FORWARD_PROPS)


# --------------------------------------------------------------------------------------------
# Wrong implementations fail, and the report names what broke
# --------------------------------------------------------------------------------------------

WRONG_FORWARD = [
    # (bug, the properties it must break; every other one must pass)
    ("scale_alpha", FORWARD_PROPS - {"zero_B_identity"}),     # B = 0 hides any scale
    ("rslora_ignored", {"forward_rslora"}),
    ("fifo_forgotten", {"fan_in_fan_out"}),                   # square W: silently wrong
    ("dropout_on_base", {"dropout"}),
    ("dropout_ignored", {"dropout"}),
    ("rank_truncated", {"rank_above_dim"}),
    ("lora_bias", FORWARD_PROPS),                             # adds something even when B = 0
]


@pytest.mark.parametrize("bug, broken", WRONG_FORWARD, ids=[b for b, _ in WRONG_FORWARD])
def test_wrong_forward_fails_exactly_the_properties_it_breaks(bug, broken):
    report = check_lora_linear(numpy_layer(bug))
    assert not report.ok and not bool(report)
    assert set(report.failed_names) == broken, str(report)
    for res in report.failed:                                 # far outside the bound, in both dtypes
        assert res.error > 100 * res.bound and "worst at" in res.detail
    assert {r.dtype for r in report.failed} == {"float64", "float32"}


def test_guessing_the_layout_from_the_shapes_fails_where_a_rank_equals_a_dimension():
    # Issue 11, item 5: such an implementation passed all 12 properties the kit had, off by 107%
    # and more at r = d_in or r = d_out. The new cases catch it, far outside the bound, forward
    # and merge, in both dtypes; every other property still passes.
    report = check_lora_linear(numpy_layer("layout_guess"), merge=numpy_merge("layout_guess"))
    broken = {"rank_equals_dims", "rank_equals_d_out", "merge_rank_equals_dims", "merge_rank_equals_d_out"}
    assert set(report.failed_names) == broken, str(report)
    assert all(res.error > 1e6 * res.bound for res in report.failed)
    assert {r.dtype for r in report.failed} == {"float64", "float32"}
    old_kit = [p for p in DEFAULT_PROPERTIES if p not in broken | GRAD_PROPS]  # what the kit had before
    assert check_lora_linear(numpy_layer("layout_guess"), merge=numpy_merge("layout_guess"), properties=old_kit).ok


@pytest.mark.parametrize("bug, broken", [
    ("fifo_forgotten", {"merge_fan_in_fan_out"}),
    ("rslora_ignored", {"merge_rslora"}),
    ("weighted_A_unweighted_B", MERGE_PROPS),
])
def test_wrong_merge_fails_the_merge_properties(bug, broken):
    report = check_lora_linear(numpy_layer(), merge=numpy_merge(bug))
    assert set(report.failed_names) == broken, str(report)


@pytest.mark.parametrize("bug, broken", [
    ("dx_mask_forgotten", {"grad_x"}),
    ("dA_mask_forgotten", {"grad_A"}),
    ("dB_mask_forgotten", {"grad_B"}),
    ("scale_alpha", GRAD_PROPS),
])
def test_wrong_gradients_fail_the_gradient_properties(bug, broken):
    report = check_lora_linear(numpy_layer(), grad=numpy_grad(bug))
    assert set(report.failed_names) == broken, str(report)


def test_fused_blocks_in_the_wrong_rows_fail_the_fused_properties():
    props = ["fused_enable_lora", "merge_fused"]
    assert check_lora_linear(numpy_layer(), merge=numpy_merge(), properties=props).ok
    report = check_lora_linear(numpy_layer("fused_packed"), merge=numpy_merge("fused_packed"), properties=props)
    assert set(report.failed_names) == set(props)


def test_float32_accuracy_fails_the_float64_bounds():
    # An implementation that computes in float32 whatever it is given is right to float32
    # accuracy only: the float64 bounds (gamma_n of float64) must reject it, the float32 ones not.
    report = check_lora_linear(numpy_layer("float32_inside"))
    assert set(report.failed_names) == FORWARD_PROPS
    assert {r.dtype for r in report.failed} == {"float64"}


def test_wrong_dtype_crash_and_in_place_writes_are_reported():
    wrong_dtype = check_lora_linear(numpy_layer("wrong_dtype"))
    assert {r.dtype for r in wrong_dtype.failed} == {"float32"}
    assert all("dtype float64 for float32 inputs" in r.detail for r in wrong_dtype.failed)
    crash = check_lora_linear(numpy_layer("raises"))
    assert len(crash.failed) == len(crash)
    assert all(r.detail == "raised RuntimeError: not implemented" and r.error == math.inf for r in crash)
    writes = check_lora_linear(numpy_layer("modifies_input"))
    assert len(writes.failed) == len(writes)
    assert all("modified its input x in place" in r.detail for r in writes)


def test_gradient_callable_must_return_three_arrays():
    report = check_lora_linear(numpy_layer(), grad=lambda *a, **k: np.zeros(3))
    assert set(report.failed_names) == GRAD_PROPS
    assert all("grad must return a tuple (dx, dA, dB)" in r.detail for r in report.failed)


# --------------------------------------------------------------------------------------------
# The report and the assert helper
# --------------------------------------------------------------------------------------------


def test_report_table_summary_and_assert_helper():
    report = check_lora_linear(numpy_layer("rslora_ignored"))
    text = str(report)
    lines = text.splitlines()
    assert lines[0] == report.summary() == "16 checks, 2 failed: forward_rslora (float64, float32)"
    assert lines[1].split() == ["property", "dtype", "rel.", "error", "bound", "result"]
    assert len(lines) == 2 + len(report)
    assert sum("FAIL" in line for line in lines) == 2 and all(line.startswith("forward_rslora")
                                                              for line in lines if "FAIL" in line)
    with pytest.raises(AssertionError, match="forward_rslora"):
        assert_lora_linear_matches(numpy_layer("rslora_ignored"))
    ok = assert_lora_linear_matches(numpy_layer())
    assert isinstance(ok, LoraCheckReport) and ok.summary() == "16 checks, all passed"
    assert repr(ok) == "<LoraCheckReport: 16 checks, all passed>"
    assert not LoraCheckReport([]).ok                          # nothing checked is not a pass


def test_failure_detail_prints_the_difference():
    # Issue 11, item 15: for a small error, got and expected print the same 6 digits; the detail
    # now gives |got - expected| and the bound it broke beside them.
    expected = np.array([1.0, 3.0])
    got = np.array([1.0, 3.0 + 3e-9])
    res = compare_to_reference("p", "float64", got, expected, np.abs(expected), 1e-12)
    assert not res.passed
    assert res.detail == "worst at (1,): got 3, expected 3, |got - expected| = 3e-09 > bound 3e-12"


def test_compare_to_reference_is_exactly_the_bound():
    # Entries perturbed by 0.9 and 1.1 times their allowed error: the first passes, the second fails.
    rng = np.random.default_rng(0)
    expected, magnitude = rng.standard_normal(6), np.abs(rng.standard_normal(6)) + 1.0
    rtol = reference_rtol("float64", 10)
    inside = compare_to_reference("p", "float64", expected + 0.9 * rtol * magnitude, expected, magnitude, rtol)
    outside = compare_to_reference("p", "float64", expected + 1.1 * rtol * magnitude, expected, magnitude, rtol)
    assert inside.passed and outside.error == pytest.approx(1.1 * rtol, rel=0.01)
    assert not outside.passed and outside.detail.startswith("worst at (")
    zero_mag = compare_to_reference("p", "float64", np.array([1e-300]), np.array([0.0]), np.array([0.0]), rtol)
    assert not zero_mag.passed and zero_mag.error == math.inf     # zero magnitude: only exact zero passes
    nan = compare_to_reference("p", "float64", np.array([np.nan]), np.array([1.0]), np.array([1.0]), rtol)
    assert not nan.passed
    shape = compare_to_reference("p", "float64", np.zeros(5), expected, magnitude, rtol)
    assert not shape.passed and shape.detail == "output has shape (5,), expected (6,)"
    ints = compare_to_reference("p", "float64", np.zeros(6, dtype=int), expected, magnitude, rtol)
    assert not ints.passed and "dtype" in ints.detail
    assert isinstance(inside, PropertyResult) and "pass" in str(inside)


# --------------------------------------------------------------------------------------------
# Validation: clear errors naming the argument
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, error, match", [
    ({"impl": 3}, TypeError, "impl must be a callable"),
    ({"merge": "x"}, TypeError, "merge must be a callable"),
    ({"properties": ["forwrd"]}, ValueError, "properties must be names"),
    ({"properties": "forward"}, TypeError, "properties must be a list"),
    ({"properties": ["merge"]}, ValueError, "needs the merge callable"),
    ({"properties": ["grad_A"]}, ValueError, "needs the grad callable"),
    ({"dtypes": ("float16",)}, ValueError, "dtypes must be"),
    ({"dtypes": "float32"}, TypeError, "dtypes must be a list"),
    ({"seed": -1}, ValueError, "seed must be a non-negative int"),
])
def test_invalid_arguments_are_named(kwargs, error, match):
    impl = kwargs.pop("impl", lora_ref_layer)
    with pytest.raises(error, match=match):
        check_lora_linear(impl, **kwargs)


# --------------------------------------------------------------------------------------------
# The bounds themselves
# --------------------------------------------------------------------------------------------


def test_rounding_counts_and_reference_rtol_follow_their_formulas():
    counts = rounding_counts(d_in=7, d_out=5, r=3, n_tokens=6, n_enabled=2)
    # From the docstring's table: chained sum lengths plus 6.
    assert counts == {"y": 7 + 3 + 6, "W_merged": 3 + 6, "dx": 5 + 2 * 3 + 6, "dA": 5 + 6 + 6, "dB": 7 + 6 + 6}
    g64, g32 = tolerance("float64", 16), tolerance("float32", 16)
    assert reference_rtol("float32", 16) == (g32 + g64) / (1.0 - g64)
    assert reference_rtol("float64", 16) == 2 * g64 / (1.0 - g64)
    with pytest.raises(ValueError, match="r must be a positive int"):
        rounding_counts(3, 3, 0, 1)


def test_magnitudes_match_the_absolute_value_formulas():
    # M_y = |x||W|^T + |b| + |s|(|x*m||A|^T)|B|^T, M_dx = |G||W| + |s|((|G||B|)|A|)*|m|, and so on:
    # two float64 evaluations of the same non-negative sums, so they agree to 2 gamma_n M.
    rng = np.random.default_rng(1)
    x, W, A, B = (rng.standard_normal(s) for s in [(4, 6), (5, 6), (3, 6), (5, 3)])
    b, m, G = rng.standard_normal(5), (rng.random((4, 6)) > 0.3) / 0.7, rng.standard_normal((4, 5))
    s = -1.5
    mags = lora_magnitudes(x, W, A, B, s, bias=b, dropout_mask=m, dy=G)
    a = np.abs
    expected = {
        "y": a(x) @ a(W).T + a(b) + a(s) * (a(x * m) @ a(A).T) @ a(B).T,
        "W_merged": a(W) + a(s) * a(B) @ a(A),
        "dx": a(G) @ a(W) + a(s) * ((a(G) @ a(B)) @ a(A)) * a(m),
        "dA": a(s) * (a(G) @ a(B)).T @ a(x * m),
        "dB": a(s) * a(G).T @ (a(x * m) @ a(A).T),
    }
    counts = rounding_counts(6, 5, 3, 4)
    for name, value in expected.items():
        assert_within(mags[name], value, 2 * tolerance("float64", counts[name]) * value, what=name)
    assert np.array_equal(testing.lora_linear_magnitude(x, W, A, B, s, b, m), mags["y"])


@settings(max_examples=40)
@given(data=st.data())
def test_lora_ref_in_float32_and_float64_is_within_the_kit_bounds(data):
    # lora-ref's own computation in the case's dtype, in both evaluation orders (factored and
    # merged), against its float64 reference: the bounds the kit applies to others hold for it.
    strategies = pytest.importorskip("lora_ref.strategies")
    case = data.draw(strategies.lora_cases())
    W_stored = case.W_stored
    dy = np.random.default_rng(case.seed).standard_normal(case.x.shape[:-1] + (case.d_out,)).astype(case.dtype)
    ref = reference_outputs(case.x, W_stored, case.A, case.B, case.scale, bias=case.bias,
                            dropout_mask=case.mask, enable_lora=case.enable_lora,
                            fan_in_fan_out=case.fan_in_fan_out, dy=dy)
    n = 1 if case.enable_lora is None else sum(case.enable_lora)
    counts = rounding_counts(case.d_in, case.d_out, case.r, math.prod(case.x.shape[:-1]), n)
    y = lora_ref.lora_linear(*case.args(), **case.kwargs())
    merged = lora_ref.merge(case.W, case.A, case.B, case.scale, enable_lora=case.enable_lora)
    y_merged = case.x @ merged.T + (0.0 if case.bias is None else case.bias)   # (..., d_out)
    vjp, _ = make_vjp(lambda xx, AA, BB: lora_ref.lora_linear(xx, case.W, AA, BB, case.scale, case.bias,
                                                              case.mask, case.enable_lora), argnum=(0, 1, 2))(
        case.x, case.A, case.B)
    dx, dA, dB = vjp(dy)
    W_merged_stored = lora_ref.merge(W_stored, case.A, case.B, case.scale, enable_lora=case.enable_lora,
                                     fan_in_fan_out=case.fan_in_fan_out)
    checks = [("y", y), ("W_merged", W_merged_stored), ("dx", dx), ("dA", dA), ("dB", dB)]
    if case.mask is None:                                       # dropout has no merged form
        checks.append(("y", y_merged))
    for name, value in checks:
        res = compare_to_reference(name, case.dtype, value, ref[name], ref[f"magnitude.{name}"],
                                   reference_rtol(case.dtype, counts[name]))
        assert res.passed, res


# --------------------------------------------------------------------------------------------
# The kit needs no test extras
# --------------------------------------------------------------------------------------------


def test_the_kit_imports_without_hypothesis():
    code = ("import sys; sys.modules['hypothesis'] = None\n"      # makes `import hypothesis` fail
            "import lora_ref.testing, lora_ref.cases, lora_ref.vectors, lora_ref.audit\n"
            "report = lora_ref.testing.check_lora_linear(lambda x, W, A, B, **kw: None, properties=['forward'])\n"
            "assert not report.ok and report.failed_names == ('forward',)\n"
            "try:\n"
            "    import lora_ref.strategies\n"
            "except ImportError:\n"
            "    print('strategies need hypothesis')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "strategies need hypothesis\n"
