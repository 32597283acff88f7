"""lora_ref.strategies keeps its contract: shapes that chain, one dtype, bounded magnitudes."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from lora_ref import lora_scale
from lora_ref.strategies import MAGNITUDES, batch_shapes, enable_flags, lora_cases, ranks


@given(lora_cases(enable_lora=None, max_dim=64))
def test_case_shapes_dtype_and_bounds(case):
    G = 1 if case.enable_lora is None else len(case.enable_lora)
    n = 1 if case.enable_lora is None else sum(case.enable_lora)
    q = case.d_out // G
    assert case.d_out == q * G and 1 <= case.d_in <= 64 and 1 <= case.d_out <= 64
    assert case.x.shape == case.batch_shape + (case.d_in,) and len(case.batch_shape) <= 2
    assert case.A.shape == (n * case.r, case.d_in) and case.B.shape == (n * q, case.r)
    assert 1 <= case.r <= min(case.d_in, q) + 4
    arrays = [a for a in (case.x, case.W, case.A, case.B, case.bias, case.mask) if a is not None]
    assert {a.dtype for a in arrays} == {np.dtype(case.dtype)}
    assert case.scale == lora_scale(case.alpha, case.r, case.use_rslora)
    # Bounded: |entries| <= 8 (the largest magnitude) and nonzero entries >= 2^-20 / 8 (the
    # smallest), up to the rounding into float32 of the product (at most one unit roundoff).
    lo = 2.0**-20 * min(MAGNITUDES) * (1 - 2.0**-24)
    for a in (case.x, case.W, case.A, case.B) + (() if case.bias is None else (case.bias,)):
        mags = np.abs(a.astype(np.float64))
        assert mags.max(initial=0.0) <= max(MAGNITUDES)
        assert np.all((mags == 0) | (mags >= lo))
    if case.mask is not None:
        assert np.broadcast_shapes(case.mask.shape, case.x.shape) == case.x.shape
        assert set(np.unique(case.mask).tolist()) <= {0.0, float(np.asarray(1 / 0.9, case.dtype)),
                                                       float(np.asarray(1 / 0.5, case.dtype))}
    assert case.W_stored.shape == ((case.d_in, case.d_out) if case.fan_in_fan_out else (case.d_out, case.d_in))


@given(lora_cases(init="gaussian", enable_lora=True))
def test_zero_init_cases_have_zero_B(case):
    assert not np.any(case.B) and np.any(case.A)


@given(st.data())
def test_small_strategies(data):
    d_in, d_out = data.draw(st.integers(1, 64)), data.draw(st.integers(1, 64))
    assert 1 <= data.draw(ranks(d_in, d_out, beyond=0)) <= min(d_in, d_out)
    flags = data.draw(enable_flags())
    assert 1 <= len(flags) <= 3 and any(flags)
    shape = data.draw(batch_shapes(max_dims=3, max_size=2))
    assert len(shape) <= 3 and all(1 <= s <= 2 for s in shape)


def test_same_seed_same_case():
    # Drawing is deterministic given hypothesis's choices (arrays come from the drawn seed).
    seen = []
    given(lora_cases(dtype="float64"))(lambda c: seen.append(c))()
    c = seen[0]
    again = np.random.default_rng(c.seed).uniform(-1.0, 1.0, size=c.x.shape)
    again = np.where(np.abs(again) < 2.0**-20, 0.0, again)
    assert any(np.array_equal(c.x, again * m) for m in MAGNITUDES)
