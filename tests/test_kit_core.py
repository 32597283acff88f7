"""lora_ref.kit.core: the two comparison rules, the worst entry every result carries, and the one
way a check calls an implementation (copies, in-place writes, return values of the wrong kind)."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest

from lora_ref.kit.core import (Call, Output, compare_exact, compare_to_reference, property_call, reference_rtol, run_call,
                               tolerance)
from lora_ref.testing import PropertyResult, check_lora_linear, unit_roundoff


def test_every_result_carries_its_worst_entry():
    expected, magnitude = np.array([[1.0, -2.0], [3.0, 4.0]]), np.array([[1.0, 2.0], [3.0, 4.0]])
    rtol = reference_rtol("float64", 8)
    got = expected + np.array([[0.0, 0.5], [0.25, 0.0]]) * rtol * magnitude   # ratios 0, 0.5, 0.25, 0
    res = compare_to_reference("p", "float64", got, expected, magnitude, rtol)
    assert res.passed and res.where == (0, 1) and res.expected == -2.0 and res.got == got[0, 1]
    assert res.difference == abs(got[0, 1] - expected[0, 1]) and not res.exact
    assert res.worst.startswith("at (0, 1): got -2, expected -2, |got - expected| = ")


def test_exact_rule_counts_mismatches_and_shows_the_first():
    expected = np.array([0x12, 0x34, 0x56], dtype=np.uint8)
    assert compare_exact("codes", "float32", expected.copy(), expected) == PropertyResult(
        "codes", "float32", 0.0, 0.0, True, mismatches=0)
    swapped = np.array([0x21, 0x34, 0x65], dtype=np.uint8)                     # nibbles swapped in two bytes
    res = compare_exact("codes", "float32", swapped, expected)
    assert not res.passed and res.exact and res.mismatches == 2 and res.error == 2 and res.bound == 0
    assert res.detail == ("2 of 3 entries differ; first at (0,): got 33 (0x21), expected 18 (0x12), "
                          "|got - expected| = 15")
    assert "         2      exact  FAIL" in str(res)
    assert compare_exact("c", "float32", expected.astype(np.int64), expected).detail == \
        "output has dtype int64, expected uint8"
    assert compare_exact("c", "float32", expected[:2], expected).mismatches == 3
    # Floats compare by their bits: -0.0 is not +0.0, and a NaN equals the same NaN.
    assert not compare_exact("w", "float32", np.array([-0.0], np.float32), np.array([0.0], np.float32)).passed
    assert compare_exact("w", "float32", np.array([np.nan], np.float32), np.array([np.nan], np.float32)).passed


def test_zero_magnitude_entries_must_be_equal():
    res = compare_to_reference("copy", "bfloat16", np.array([1.0, 2.0], ml_dtypes.bfloat16), np.array([1.0, 2.0]),
                               np.zeros(2), reference_rtol("bfloat16", 3))
    assert res.passed
    moved = compare_to_reference("copy", "bfloat16", np.array([1.0, 2.015625], ml_dtypes.bfloat16),
                                 np.array([1.0, 2.0]), np.zeros(2), reference_rtol("bfloat16", 3))
    assert not moved.passed and moved.error == math.inf


def test_bfloat16_has_a_unit_roundoff():
    assert unit_roundoff("bfloat16") == 2.0 ** -8 and tolerance(ml_dtypes.bfloat16, 2) == 2 * 2.0 ** -8 / (1 - 2 * 2.0 ** -8)


def _call(**kwargs):
    out = Output("y", np.zeros(2), "float64", np.ones(2), 1e-15, 1)
    return Call("impl", (np.zeros(2), {"A": np.ones(2), "sub": [np.ones(1)]}), ("x", "adapters"), kwargs, (out,))


def test_run_call_reports_in_place_writes_in_nested_inputs():
    def writes(x, adapters):
        adapters["sub"][0][0] = 5.0
        return np.zeros(2)

    res, = run_call("p", "float64", _call(), writes)
    assert not res.passed and res.detail == "modified its input adapters in place"
    res, = run_call("p", "float64", _call(), lambda x, adapters: np.zeros(2))
    assert res.passed


def test_run_call_reports_crashes_and_wrong_return_kinds():
    out = Output("dA", np.zeros(2), "float64", np.ones(2), 1e-15, 1, pick=1)
    call = Call("grad", (np.zeros(2),), ("x",), {}, (out,), ("dx", "dA"))
    res, = run_call("g", "float64", call, lambda x: np.zeros(2))
    assert res.detail == "grad must return a tuple (dx, dA), got ndarray"
    res, = run_call("g", "float64", call, lambda x: 1 / 0)
    assert res.detail == "raised ZeroDivisionError: division by zero" and res.error == math.inf
    keyed = Output("weight", np.zeros(2, np.uint8), "uint8", pick="weight")
    res, = run_call("q", "float32", Call("impl", (), (), {}, (keyed,)), lambda: {"absmax": 1})
    assert not res.passed and res.mismatches == 2 and res.detail == "impl returned no 'weight' (keys: ['absmax'])"


def test_dtype_argument_lists_what_the_check_allows():
    with pytest.raises(ValueError, match=r"dtypes must be 'float32' and/or 'float64', got \['bfloat16'\]"):
        check_lora_linear(lambda *a, **k: None, dtypes=(ml_dtypes.bfloat16,))


def test_property_call_picks_the_callable_and_one_gradient():
    outs = tuple(Output(n, np.zeros(1), "float64") for n in ("dx", "dA", "dB"))
    asked = []

    def calls(which):
        asked.append(which)
        return Call(which, (), (), {}, outs if which == "grad" else outs[:1])

    assert property_call("merge_rslora", calls).callable == "merge"
    assert property_call("forward", calls).callable == "impl"
    assert property_call("groups", calls).callable == "impl"            # not a gradient property
    grad = property_call("grad_A", calls)
    assert grad.callable == "grad" and [o.name for o in grad.outputs] == ["dA"]
    assert asked == ["merge", "impl", "impl", "grad"]
