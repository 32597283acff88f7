"""check_dora_linear: right DoRA implementations pass (in both dtypes, for any seed), the four kinds
of wrong DoRA of issue 13 fail, each named by the properties that catch it, far outside the bound."""

from __future__ import annotations

import numpy as np
import pytest
from autograd import make_vjp
from hypothesis import given, settings
from hypothesis import strategies as st

import lora_ref
from lora_ref.dora import dora_linear, dora_magnitude, dora_merge
from lora_ref.kit.mutants import CORRECT, MUTANTS, run_correct, run_mutant
from lora_ref.testing import DORA_PROPERTIES, check_dora_linear


def ref_impl(x, W, A, B, m, *, alpha, r, use_rslora, bias, dropout_mask, fan_in_fan_out):
    s = lora_ref.lora_scale(alpha, r, use_rslora)
    return dora_linear(x, W.T if fan_in_fan_out else W, A, B, m, s, bias, dropout_mask)


def ref_magnitude(W, A, B, *, alpha, r, use_rslora, fan_in_fan_out):
    return dora_magnitude(W, A, B, lora_ref.lora_scale(alpha, r, use_rslora), fan_in_fan_out=fan_in_fan_out)


def ref_merge(W, A, B, m, *, alpha, r, use_rslora, fan_in_fan_out):
    return dora_merge(W, A, B, m, lora_ref.lora_scale(alpha, r, use_rslora), fan_in_fan_out=fan_in_fan_out)


def ref_grad(x, W, A, B, m, dy, *, alpha, r, use_rslora, bias, dropout_mask, fan_in_fan_out, detach_norm):
    s = lora_ref.lora_scale(alpha, r, use_rslora)
    Wm = W.T if fan_in_fan_out else W
    f = lambda xx, AA, BB, mm: dora_linear(xx, Wm, AA, BB, mm, s, bias, dropout_mask, detach_norm)  # noqa: E731
    vjp, _ = make_vjp(f, argnum=(0, 1, 2, 3))(x, A, B, m)
    return vjp(dy)


def test_lora_ref_in_each_dtype_passes_every_property():
    report = check_dora_linear(ref_impl, magnitude=ref_magnitude, merge=ref_merge, grad=ref_grad)
    assert report.ok, str(report)
    assert [r.name for r in report][::2] == list(DORA_PROPERTIES) and len(report) == 2 * len(DORA_PROPERTIES)


def test_an_independent_peft_style_implementation_passes():
    report = run_correct("dora_linear")
    assert report.ok and len(report) == 2 * len(DORA_PROPERTIES), str(report)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_right_implementations_pass_for_any_seed(seed):
    assert check_dora_linear(**CORRECT["dora_linear"](), seed=seed).ok


def test_only_the_given_callables_run():
    assert [r.name for r in check_dora_linear(ref_impl)][::2] == ["forward", "forward_rslora", "forward_square",
                                                                  "fan_in_fan_out", "dropout"]
    with pytest.raises(ValueError, match="property 'merge' needs the merge callable"):
        check_dora_linear(ref_impl, properties=["merge"])


DORA_MUTANTS = [name for name in MUTANTS if name.startswith("dora.")]


@pytest.mark.parametrize("name", DORA_MUTANTS)
def test_wrong_dora_fails_exactly_the_properties_that_catch_it(name):
    mutant = MUTANTS[name]
    report = run_mutant(mutant)
    assert set(report.failed_names) == mutant.caught_by, str(report)
    assert {r.dtype for r in report.failed} == {"float64", "float32"}
    for res in report.failed:                          # far outside the bound (or a crash: shape error)
        assert res.error > 100 * res.bound, str(res)


def test_the_input_axis_norm_is_a_shape_error_only_where_shapes_differ():
    report = run_mutant(MUTANTS["dora.norm_over_input_axis"])
    by = {(r.name, r.dtype): r for r in report}
    assert by["forward", "float64"].detail.startswith("raised ValueError")          # (5,) against (7,)
    assert by["forward_square", "float64"].detail.startswith("worst at")            # a wrong number
    assert by["magnitude", "float32"].detail.startswith("worst at")


def test_the_two_gradient_variants_really_differ_here():
    # Guard: the detached and exact dA of the kit's case are far apart (else mutant b would be vacuous).
    exact = check_dora_linear(ref_impl, grad=ref_grad, properties=["grad_A_exact"], dtypes=("float64",))
    swapped = check_dora_linear(ref_impl, grad=lambda *a, detach_norm, **k: ref_grad(*a, detach_norm=True, **k),
                                properties=["grad_A_exact"], dtypes=("float64",))
    assert exact.ok and not swapped.ok and swapped[0].error > 1e6 * swapped[0].bound
