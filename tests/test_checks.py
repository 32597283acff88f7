"""lora_ref.checks: each validator returns what array code wants, or names the argument."""

from __future__ import annotations

import array_api_strict
import numpy as np
import pytest

from lora_ref import checks


@pytest.mark.parametrize("check, value, expected", [
    (checks.positive_int, np.int64(3), 3),
    (checks.non_negative_int, 0, 0),
    (checks.finite_real, np.float32(0.5), 0.5),
    (checks.non_negative_real, 0, 0.0),
    (checks.positive_real, 2, 2.0),
    (checks.probability, 0.25, 0.25),
    (checks.boolean, np.bool_(True), True),
])
def test_values_come_back_as_python_scalars(check, value, expected):
    out = check(value, "v")
    assert out == expected and type(out) is type(expected)      # never a NumPy scalar


@pytest.mark.parametrize("check, value, error, words", [
    (checks.positive_int, True, TypeError, r"n must be a positive int \(a count\), got True \(bool\)"),
    (checks.positive_int, 0, ValueError, r"n must be a positive int \(a count\), got 0"),
    (checks.non_negative_int, 2.0, TypeError, r"n must be a non-negative int \(a count\), got 2\.0 \(float\)"),
    (checks.finite_real, "1", TypeError, r"n must be a real number, got '1' \(str\)"),
    (checks.finite_real, float("inf"), ValueError, r"n must be finite, got inf"),
    (checks.non_negative_real, -0.5, ValueError, r"n must be non-negative, got -0\.5"),
    (checks.positive_real, 0.0, ValueError, r"n must be positive, got 0\.0"),
    (checks.probability, 1.0, ValueError, r"n must be in \[0, 1\), got 1\.0"),
    (checks.boolean, 1, TypeError, r"n must be a bool, got 1 \(int\)"),
    (checks.numpy_generator, 0, TypeError, r"n must be a numpy\.random\.Generator, got int"),
])
def test_bad_values_are_named(check, value, error, words):
    args = (value, "n", "a count") if check in (checks.positive_int, checks.non_negative_int) else (value, "n")
    with pytest.raises(error, match=words):
        check(*args)


def test_int_in_range_and_generators():
    assert checks.int_in_range(3, "k", 1, 3) == 3
    with pytest.raises(ValueError, match=r"k must be in \[1, 3\] \(the rank\), got 4"):
        checks.int_in_range(4, "k", 1, 3, "the rank")
    rng = np.random.default_rng(0)
    assert checks.numpy_generator(rng, "rng") is rng and checks.generator(rng, "rng") is rng
    assert checks.generator(5, "seed").random() == np.random.default_rng(5).random()


def test_arrays_of_any_backend():
    x = array_api_strict.ones((2, 3), dtype=array_api_strict.float32)
    checks.float_array(x, "x")
    assert checks.shape_of(x) == (2, 3) and checks.is_float_array(x) and not checks.is_integer_array(x)
    with pytest.raises(TypeError, match=r"x must have a floating dtype \(float64\), got float32"):
        checks.float_array(x, "x", ("float64",))
    with pytest.raises(TypeError, match=r"ids must be an integer array, got float64"):
        checks.integer_array(np.ones(2), "ids")
    with pytest.raises(TypeError, match=r"A is float64 but x is float32"):
        checks.same_dtype(("x", np.ones(1, np.float32)), ("b", None), ("A", np.ones(1)))


def test_index_array_names_the_first_bad_index():
    checks.index_array(np.array([[0, 4], [2, 1]]), 5, "tokens")
    with pytest.raises(ValueError, match=r"tokens must be in \[0, 5\) \(the vocabulary = 5\), got 7 at position \(1, 0\)"):
        checks.index_array(np.array([[0, 4], [7, -1]]), 5, "tokens", "the vocabulary")
    checks.index_array(np.zeros((0,), np.int64), 5, "tokens")                     # empty: nothing to check


@pytest.mark.parametrize("shape, target, fits", [
    ((2, 3), (2, 3), True), ((3,), (2, 3), True), ((1, 3), (2, 3), True), ((1,), (0,), True),
    ((2, 1), (2, 3), True), ((3, 3), (2, 3), False), ((2, 3), (3,), False), ((4,), (2, 3), False),
    ((0,), (1,), False), ((2, 2, 3), (2, 3), False),
])
def test_broadcasts_to_never_grows_the_target(shape, target, fits):
    assert checks.broadcasts_to(shape, target) is fits


def test_broadcastable_mask_names_both_shapes():
    x = array_api_strict.ones((2, 3), dtype=array_api_strict.float64)
    checks.broadcastable_mask(array_api_strict.ones((1, 3), dtype=array_api_strict.float64), x)
    with pytest.raises(ValueError, match=r"mask of shape \(2, 2\) does not broadcast to x's shape \(2, 3\)"):
        checks.broadcastable_mask(np.ones((2, 2)), np.ones((2, 3)), "mask")


def test_finite_merge_refuses_inf_and_nan_and_says_how_many():
    merged = np.array([[1.0, 2.0], [3.0, 4.0]])
    assert checks.finite_merge(merged, np.ones((2, 2)), "merge_x", "weight", "dW") is merged
    bad = np.array([[1.0, np.inf], [np.nan, 4.0]])
    with pytest.raises(ValueError, match=r"merge_x: the merged table would contain 2 non-finite values "
                                         r"\(max \|dW\| = 3\.0\); refusing to merge"):
        checks.finite_merge(bad, np.array([[0.5, -3.0], [1.0, 2.0]]), "merge_x", "table", "dW")
