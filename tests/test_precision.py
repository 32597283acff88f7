"""lora_ref.precision: the page is what the code measures now, the rounding model is what NumPy /
ml_dtypes compute, "one dtype" is lora_ref.merge, and drift behaves as the page says.
(tests/interop/test_quant_bnb.py holds the "PEFT" way against PEFT itself, bit for bit.)"""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import lora_ref as lr
from lora_ref import precision as p
from lora_ref.testing import tolerance

ROOT = Path(__file__).resolve().parent.parent
BF16 = ml_dtypes.bfloat16


def test_committed_page_is_the_generated_page(tmp_path):
    out = tmp_path / "precision.md"
    assert p.main(["--write", str(out)]) == 0
    assert (ROOT / "docs" / "precision.md").read_text() == out.read_text(), (
        "docs/precision.md is stale: run python -m lora_ref.precision --write docs/precision.md")


@pytest.mark.parametrize("dtype", [BF16, np.float16])
def test_sixteen_bit_sums_through_float32_are_what_numpy_computes(dtype):
    rng = np.random.default_rng(0)
    a = (rng.standard_normal(20000) * 10.0 ** rng.uniform(-6, 3, 20000)).astype(np.float32).astype(dtype)
    b = (rng.standard_normal(20000) * 10.0 ** rng.uniform(-6, 3, 20000)).astype(np.float32).astype(dtype)
    for native, through in ((a + b, a.astype(np.float32) + b.astype(np.float32)),
                            (a - b, a.astype(np.float32) - b.astype(np.float32))):
        assert native.dtype == dtype
        assert native.tobytes() == through.astype(dtype).tobytes()


def test_bfloat16_matmul_returns_float32():
    # the fact behind the page's "what lora_ref.merge needs": the delta is not rounded to bfloat16
    A = np.ones((2, 3), BF16)
    assert (A.T @ A).dtype == np.float32
    assert (A + np.ones(3, np.float32)).dtype == np.float32


def exact_factors(d: int, r: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A (r, d), B (d, r): multiples of 1/64 with numerators in [-8, 8], so every product and
    partial sum of B @ A is exact in float32 and any summation order gives the same bits."""
    rng = np.random.default_rng(seed)
    return rng.integers(-8, 9, (r, d)) / 64, rng.integers(-8, 9, (d, r)) / 64


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_one_dtype_is_lora_ref_merge(dtype):
    W, _, _, s = p.audit_case(d=64, r=4)
    A, B = exact_factors(64, 4)                  # lora_ref.merge's B @ A is a BLAS call: exact inputs
    W, A, B = W.astype(dtype), A.astype(dtype), B.astype(dtype)
    merged, unmerged = p.merge_cycle(W, p.delta_weight32(A, B, s, dtype), dtype, "one dtype")
    ref = lr.merge(W, A, B, s)
    assert merged.tobytes() == ref.tobytes()
    assert unmerged.tobytes() == lr.unmerge(ref, A, B, s).tobytes()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_delta_is_summed_in_a_fixed_order_without_fma(dtype):
    """delta_weight32 is the sequential sum over k of rounded products (what every CPU computes
    identically), written out here one entry at a time in Python scalars of the dtype."""
    _, A, B, s = p.audit_case(d=6, r=5, seed=3)
    t = np.dtype(dtype).type
    A, B = A.astype(dtype), B.astype(dtype)
    want = np.empty((6, 6), dtype)
    for i in range(6):
        for j in range(6):
            acc = t(B[i, 0] * A[0, j])
            for k in range(1, 5):
                acc = t(acc + t(B[i, k] * A[k, j]))
            want[i, j] = t(acc * t(s))
    assert p.delta_weight32(A, B, s, dtype).tobytes() == want.tobytes()
    A, B = exact_factors(40, 8)
    assert p.delta_weight32(A, B, s, dtype).tobytes() == ((B.astype(dtype) @ A.astype(dtype)) * t(s)).tobytes()
    with pytest.raises(ValueError, match="A"):
        p.delta_weight32(A, A, s, dtype)


@given(d=st.integers(2, 40), r=st.integers(1, 6), seed=st.integers(0, 2**31),
       dtype=st.sampled_from(p.DTYPES), way=st.sampled_from(p.WAYS))
def test_one_cycle_within_gamma2(d, r, seed, dtype, way):
    W, A, B, s = p.audit_case(d=d, r=r, seed=seed)
    W = W.astype(np.float32).astype(BF16 if dtype == "bfloat16" else dtype)
    D32 = p.delta_weight32(A, B, s, dtype)
    _, W1 = p.merge_cycle(W, D32, dtype, way)
    Wf = W.astype(np.float64)
    bound = tolerance(dtype, 2) * (np.abs(Wf) + np.abs(D32.astype(np.float64)))
    if way != "one dtype":   # D32 is rounded to the dtype inside the cycle: one more rounding of D
        bound = tolerance(dtype, 3) * (np.abs(Wf) + np.abs(D32.astype(np.float64)))
    assert np.all(np.abs(W1.astype(np.float64) - Wf) <= bound)


@pytest.mark.parametrize("dtype", p.DTYPES)
def test_one_dtype_and_float32_then_cast_reach_a_fixed_point(dtype):
    W, A, B, s = p.audit_case(d=96, r=8)
    for way in p.WAYS[:2]:
        r = p.drift(W, A, B, s, dtype, way, checkpoints=(1, 50))
        assert r.fixed_from is not None and r.fixed_from <= 1 and r.max_abs[0] == r.max_abs[1]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_peft_way_grows(dtype):
    W, A, B, s = p.audit_case(d=96, r=8)
    r = p.drift(W, A, B, s, dtype, "PEFT", checkpoints=(1, 100))
    assert r.max_abs[1] > 2 * r.max_abs[0]


def test_peft_way_equals_one_dtype_in_float32():
    W, A, B, s = p.audit_case(d=48, r=4)
    assert p.drift(W, A, B, s, "float32", "PEFT", (1, 5)) == p.drift(W, A, B, s, "float32", "one dtype", (1, 5))


def test_refusals():
    W, A, B, s = p.audit_case(d=8, r=2)
    with pytest.raises(ValueError, match="way"):
        p.merge_cycle(W, W, "float32", "stochastic")
    with pytest.raises(ValueError, match="dtype"):
        p.drift(W, A, B, s, "float8", "PEFT")
    with pytest.raises(ValueError, match="checkpoints"):
        p.drift(W, A, B, s, "float32", "PEFT", checkpoints=())
    with pytest.raises(ValueError, match="checkpoints"):
        p.drift(W, A, B, s, "float32", "PEFT", checkpoints=(0, 3))
    with pytest.raises(ValueError, match="shape"):
        p.drift(W[:4], A, B, s, "float32", "PEFT")
    with pytest.raises(TypeError, match="W"):
        p.drift(W.astype(np.int64), A, B, s, "float32", "PEFT")
