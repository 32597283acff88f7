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


# ------------------------------------------------------------------ computing in a narrower dtype


def narrow_case(seed=0, dtype="float32"):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 3, 16)).astype(dtype)
    W = rng.standard_normal((8, 16)).astype(dtype)
    b = rng.standard_normal(8).astype(dtype)
    A, B = rng.standard_normal((4, 16)).astype(dtype), rng.standard_normal((8, 4)).astype(dtype)
    return x, W, b, A, B


@pytest.mark.parametrize("compute", ["bfloat16", "float16"])
def test_round_to_is_the_cast_and_back(compute):
    x = narrow_case()[0]
    want = x.astype(BF16 if compute == "bfloat16" else compute).astype(np.float32)
    assert p.round_to(x, compute).tobytes() == want.tobytes()
    assert p.round_to(x, "float32") is x
    pytest.importorskip("array_api_strict")
    with lr.use_backend("array_api_strict"):
        got = p.round_to(lr.asarray(x), compute)
        assert type(got).__module__.startswith("array_api_strict")
    assert lr.to_numpy(got).tobytes() == want.tobytes()


@pytest.mark.parametrize("compute", ["bfloat16", "float16"])
def test_narrow_linear_rounds_input_weight_bias_and_output(compute):
    """rnd(rnd(x) rnd(W)^T + rnd(b)): the products of two 16-bit numbers are exact in float32, so
    only the float32 sums and the final rounding remain; written out here with NumPy."""
    x, W, b, _, _ = narrow_case()
    rnd = lambda t: p.round_to(t, compute)                                  # noqa: E731
    want = rnd(rnd(x) @ rnd(W).T + rnd(b))
    assert p.narrow_linear(x, W, b, compute).tobytes() == want.tobytes()
    assert p.narrow_linear(x, W, None, "float32").tobytes() == (x @ W.T).tobytes()   # nothing to round


@pytest.mark.parametrize("compute", ["bfloat16", "float16"])
def test_narrow_linear_vjp_is_what_autograd_derives(compute):
    """The hand-written dL/dx = rnd(rnd(G) rnd(W)) is what autograd.numpy derives from the bare
    forward, bit for bit (its cast VJP casts the cotangent as torch's .to() does)."""
    import autograd

    x, W, b, _, _ = narrow_case(1)
    g = np.random.default_rng(2).standard_normal((2, 3, 8)).astype(np.float32)
    hand = autograd.grad(lambda x_: (p.narrow_linear(x_, W, b, compute) * g).sum())(x)
    traced = autograd.grad(lambda x_: (p.narrow_linear.fun(x_, W, b, compute) * g).sum())(x)
    assert hand.tobytes() == traced.tobytes()
    rnd = lambda t: p.round_to(t, compute)                                  # noqa: E731
    assert hand.tobytes() == rnd(rnd(g) @ rnd(W)).tobytes()


def test_narrow_linear_in_its_own_dtype_against_finite_differences():
    from autograd.test_util import check_grads

    x, W, b, _, _ = narrow_case(3, "float64")
    check_grads(lambda x_: p.narrow_linear(x_, W, b, "float64"), modes=["rev"], order=1)(x)


def test_mixed_linear_is_lora_linear_in_its_own_dtype_and_lora_delta_on_top():
    import autograd

    from lora_ref.adapters import lora_delta

    x, W, b, A, B = narrow_case(4)
    assert p.mixed_linear(x, W, A, B, 0.5, b, compute_dtype="float32").tobytes() == \
        lr.lora_linear(x, W, A, B, 0.5, b).tobytes()
    y = p.mixed_linear(x, W, A, B, 0.5, b, compute_dtype="bfloat16")
    assert y.tobytes() == (p.narrow_linear(x, W, b, "bfloat16") + lora_delta(x, A, B, 0.5)).tobytes()
    g = np.random.default_rng(5).standard_normal(y.shape).astype(np.float32)
    dA, dB = autograd.grad(lambda a, b_: (p.mixed_linear(x, W, a, b_, 0.5, b, compute_dtype="bfloat16") * g).sum(),
                           (0, 1))(A, B)
    want = autograd.grad(lambda a, b_: (lr.lora_linear(x, W, a, b_, 0.5, b) * g).sum(), (0, 1))(A, B)
    assert dA.tobytes() == want[0].tobytes() and dB.tobytes() == want[1].tobytes()   # float32, the same VJPs


def test_narrow_linear_refusals():
    import autograd

    x, W, b, _, _ = narrow_case()
    with pytest.raises(ValueError, match="not wider"):
        p.narrow_linear(x, W, b, "float64")
    with pytest.raises(ValueError, match="compute_dtype"):
        p.narrow_linear(x, W, b, "float8")
    with pytest.raises(ValueError, match="bias"):
        p.narrow_linear(x, W, b[:3], "bfloat16")
    with pytest.raises(ValueError, match="d_in"):
        p.narrow_linear(x, W.T, b, "bfloat16")
    with pytest.raises(TypeError, match="bias"):
        autograd.grad(lambda b_: p.narrow_linear(x, W, b_, "bfloat16").sum())(b)
