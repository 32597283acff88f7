"""lora_ref.embedding: LoRA on an embedding table, checked in float64 and float32.

Tolerances are ``tolerance(dtype, n) * M`` (lora_ref.testing): n counts the roundings chained in one
output entry, M is the same computation on absolute values; comparing two computations doubles it.
Counts used below, for r the rank, D the embedding dim, N the number of ids:

* y = E[ids] + s (A^T[ids]) B^T: the r-term dot (r roundings), s rounded to the dtype (1), times s
  (1), plus E[ids] (1): n = r + 3. The merged lookup (E + s (B A)^T)[ids] has the same count.
* G1 dL/dE: a sum over at most N positions: n = N. G2 dL/dA: G B (D terms), s (2), then a sum over
  at most N positions: n = D + N + 2. G3 dL/dB: the sum over N, s (2): n = N + 2. One L = D + N + 3
  bounds them all.
"""

from __future__ import annotations

import array_api_strict
import autograd
import numpy as np
import pytest
from autograd.test_util import check_grads
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_ref.backend import asarray, to_numpy, use_backend
from lora_ref.embedding import embedding_delta, init_lora_embedding, lora_embedding, merge_embedding, unmerge_embedding
from lora_ref.testing import assert_within, tolerance

DTYPES = ("float64", "float32")


def f64(a):
    return np.asarray(to_numpy(a), dtype=np.float64)


class Case:
    """A random embedding-LoRA case: table E (V, D), A (r, V), B (D, r), ids (batch), scale, G."""

    def __init__(self, V, D, r, batch, dtype, seed, scale):
        rng = np.random.default_rng(seed)
        self.V, self.D, self.r, self.dtype, self.scale = V, D, r, dtype, scale
        self.E = rng.uniform(-1, 1, (V, D)).astype(dtype)
        self.A = rng.uniform(-1, 1, (r, V)).astype(dtype)
        self.B = rng.normal(size=(D, r)).astype(dtype)
        self.ids = rng.integers(0, V, size=batch)
        self.ids.flat[-1] = self.ids.flat[0]                   # at least one repeated id
        self.G = rng.uniform(-1, 1, batch + (D,)).astype(dtype)
        self.N = int(np.prod(batch))

    def magnitude(self):
        """M of the forward: |E[ids]| + |s| |A^T[ids]| |B|^T, float64."""
        return np.abs(f64(self.E))[self.ids] + abs(self.scale) * np.abs(f64(self.A)).T[self.ids] @ np.abs(f64(self.B)).T


@st.composite
def cases(draw, dtype=None, max_dim=12):
    V, D = draw(st.integers(1, max_dim)), draw(st.integers(1, max_dim))
    r = draw(st.integers(1, 6))
    batch = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=2)))
    dtype = dtype or draw(st.sampled_from(DTYPES))
    scale = draw(st.sampled_from([0.5, 2.0, -1.25, 1 / 3]))
    return Case(V, D, r, batch, dtype, draw(st.integers(0, 2**32 - 1)), scale)


def loop_definition(case):
    """(E1) one position at a time, in float64: E[v] + s sum_r A[r, v] B[:, r]."""
    E, A, B = f64(case.E), f64(case.A), f64(case.B)
    out = np.empty(case.ids.shape + (case.D,))
    for pos in np.ndindex(case.ids.shape):
        v = case.ids[pos]
        out[pos] = E[v] + case.scale * sum(A[k, v] * B[:, k] for k in range(case.r))
    return out


# ----------------------------------------------------------------------------------------------
# Forward: the definition, the merged table, zero init
# ----------------------------------------------------------------------------------------------


@given(case=cases())
def test_forward_matches_the_definition_and_the_merged_table(case):
    y = lora_embedding(case.ids, case.E, case.A, case.B, case.scale)
    assert y.shape == case.ids.shape + (case.D,) and y.dtype == case.E.dtype
    bound = 2 * tolerance(case.dtype, case.r + 3) * case.magnitude()
    assert_within(y, loop_definition(case), bound, what="y vs the loop definition")
    merged = merge_embedding(case.E, case.A, case.B, case.scale)
    assert_within(merged[case.ids], y, bound, what="merged lookup vs forward")


@given(case=cases())
def test_delta_is_the_transpose_of_B_A(case):
    delta = embedding_delta(case.A, case.B, case.scale)
    assert delta.shape == (case.V, case.D)
    # r roundings in B A, 2 for s: within gamma_{r+2} |s| (|B| |A|)^T of the float64 product.
    M = abs(case.scale) * (np.abs(f64(case.B)) @ np.abs(f64(case.A))).T
    assert_within(delta, case.scale * (f64(case.B) @ f64(case.A)).T, 2 * tolerance(case.dtype, case.r + 2) * M)


@pytest.mark.parametrize("dtype", DTYPES)
def test_init_is_peft_layout_and_identity(dtype):
    A, B = init_lora_embedding(11, 5, 3, rng=np.random.default_rng(7), dtype=dtype)
    assert A.shape == (3, 11) and B.shape == (5, 3) and A.dtype == B.dtype == np.dtype(dtype)
    assert not np.any(A)                                            # A = 0 (PEFT zeros_)
    assert np.array_equal(B, np.random.default_rng(7).standard_normal((5, 3)).astype(dtype))  # N(0, 1)
    E = np.random.default_rng(1).normal(size=(11, 5)).astype(dtype)
    ids = np.array([[0, 3, 10], [3, 3, 1]])
    assert np.array_equal(lora_embedding(ids, E, A, B, 2.0), E[ids])  # bitwise: the update is exactly 0
    # The first gradient step moves A only: dL/dB = s G^T A^T[ids] = 0 exactly (G3 with A = 0).
    gA, gB = autograd.grad(lambda A, B: (lora_embedding(ids, E, A, B, 2.0) ** 2).sum(), argnum=(0, 1))(A, B)
    assert not np.any(gB) and np.any(gA)


# ----------------------------------------------------------------------------------------------
# Gradients: hand-written VJPs == autograd.numpy tracing the forward == finite differences
# ----------------------------------------------------------------------------------------------


def vjps(fun, case, padding_idx=None, absolute=False):
    """(dL/dE, dL/dA, dL/dB) of fun at the case for upstream G; ``absolute``: every input, s and G
    replaced by absolute values in float64, which evaluates the gradients' magnitudes."""
    t = (lambda a: np.abs(f64(a))) if absolute else (lambda a: a)
    s = abs(case.scale) if absolute else case.scale
    f = lambda E, A, B: fun(case.ids, E, A, B, s, padding_idx)  # noqa: E731
    vjp, _ = autograd.make_vjp(f, argnum=(0, 1, 2))(t(case.E), t(case.A), t(case.B))
    return vjp(t(case.G))


@given(case=cases())
def test_vjps_match_autograd_numpy_trace(case):
    hand, traced = vjps(lora_embedding, case), vjps(lora_embedding.fun, case)
    mags = vjps(lora_embedding, case, absolute=True)
    L = case.D + case.N + 3
    for name, h, t, m, like in zip("EAB", hand, traced, mags, (case.E, case.A, case.B)):
        assert h.shape == like.shape and h.dtype == like.dtype, name
        assert_within(h, t, 2 * tolerance(case.dtype, L) * m, what=f"dL/d{name}")


@settings(max_examples=15)
@given(case=cases(dtype="float64", max_dim=8))
def test_vjps_match_finite_differences(case):
    np.random.seed(case.V * 1000 + case.D)   # check_grads draws its directions from NumPy's global generator
    f = lambda E, A, B: lora_embedding(case.ids, E, A, B, case.scale)  # noqa: E731
    check_grads(f, argnum=(0, 1, 2), modes=["rev"], order=2)(case.E, case.A, case.B)


@given(case=cases())
def test_padding_idx_zeroes_one_row_of_dE_and_one_column_of_dA(case):
    p = int(case.ids.flat[0])                                         # a padding id that occurs
    gE, gA, gB = vjps(lora_embedding, case, padding_idx=p)
    rE, rA, rB = vjps(lora_embedding, case)
    assert not np.any(gE[p]) and not np.any(gA[:, p])
    keep = np.arange(case.V) != p
    assert np.array_equal(gE[keep], rE[keep]) and np.array_equal(gA[:, keep], rA[:, keep]) and np.array_equal(gB, rB)
    assert np.array_equal(lora_embedding(case.ids, case.E, case.A, case.B, case.scale, p),
                          lora_embedding(case.ids, case.E, case.A, case.B, case.scale))  # value unchanged


def test_ids_scale_padding_are_not_differentiable():
    E, A, B, ids = np.ones((4, 3)), np.ones((2, 4)), np.ones((3, 2)), np.array([1, 2])
    with pytest.raises(TypeError, match="not differentiable with respect to scale"):
        autograd.grad(lambda s: lora_embedding(ids, E, A, B, s).sum())(0.5)


# ----------------------------------------------------------------------------------------------
# Merge and unmerge
# ----------------------------------------------------------------------------------------------


@given(case=cases())
def test_unmerge_undoes_merge(case):
    merged = merge_embedding(case.E, case.A, case.B, case.scale)
    back = unmerge_embedding(merged, case.A, case.B, case.scale)
    assert back.dtype == case.E.dtype
    D = abs(case.scale) * (np.abs(f64(case.B)) @ np.abs(f64(case.A))).T
    # fl(fl(E + d) - d) with the same d: two roundings of |E| + |d| (as tests/test_lora.py).
    assert_within(back, case.E, tolerance(case.dtype, 2) * (np.abs(f64(case.E)) + D), what="unmerge(merge(E))")


def test_merge_refuses_non_finite():
    E, A, B = np.ones((4, 3)), np.full((2, 4), np.inf), np.ones((3, 2))
    with pytest.raises(ValueError, match="non-finite"):
        merge_embedding(E, A, B, 1.0)


# ----------------------------------------------------------------------------------------------
# Another backend: array_api_strict takes the one-hot path of the scatter-add
# ----------------------------------------------------------------------------------------------


@settings(max_examples=25)
@given(case=cases())
def test_array_api_strict_matches_numpy(case):
    with use_backend("array_api_strict"):
        ids, E, A, B, G = (asarray(a) for a in (case.ids, case.E, case.A, case.B, case.G))
        vjp, y = autograd.make_vjp(lambda E, A, B: lora_embedding(ids, E, A, B, case.scale), argnum=(0, 1, 2))(E, A, B)
        grads = vjp(G)
        merged = merge_embedding(E, A, B, case.scale)
    assert type(y) is type(E) and all(type(g) is type(E) for g in grads)
    bound = 2 * tolerance(case.dtype, case.r + 3) * case.magnitude()
    assert_within(y, lora_embedding(case.ids, case.E, case.A, case.B, case.scale), bound, what="forward")
    assert_within(merged, merge_embedding(case.E, case.A, case.B, case.scale),
                  2 * tolerance(case.dtype, case.r + 3) * (np.abs(f64(case.E)) + abs(case.scale)
                                                           * (np.abs(f64(case.B)) @ np.abs(f64(case.A))).T))
    L = case.D + case.N + 3
    for name, g, ref, m in zip("EAB", grads, vjps(lora_embedding, case), vjps(lora_embedding, case, absolute=True)):
        assert_within(g, ref, 2 * tolerance(case.dtype, L) * m, what=f"dL/d{name} on array_api_strict")


# ----------------------------------------------------------------------------------------------
# Mutants: what a wrong implementation computes must fail the bound by far
# ----------------------------------------------------------------------------------------------


def mutant_margin(mutant, reference, bound):
    """max |mutant - reference| / bound over the entries: how many bounds away the mutant is."""
    return float(np.max(np.abs(f64(mutant) - f64(reference)) / bound))


@pytest.mark.parametrize("dtype", DTYPES)
def test_mutants_are_caught(dtype):
    # A square table (V = D) so that swapped roles are not a shape error.
    case = Case(V=16, D=16, r=4, batch=(3, 8), dtype=dtype, seed=3, scale=2.0)
    y = lora_embedding(case.ids, case.E, case.A, case.B, case.scale)
    bound = 2 * tolerance(dtype, case.r + 3) * case.magnitude()
    # 1. A/B roles swapped: the delta taken as s B A (the linear layer's layout) instead of s (B A)^T.
    swapped = (case.E + case.scale * (case.B @ case.A))[case.ids]
    # 2. Dropout applied on the embedding path (p = 0.5 on the looked-up A rows, inverted scaling).
    keep = (np.random.default_rng(5).random(case.ids.shape + (case.r,)) >= 0.5) / 0.5
    dropped = case.E[case.ids] + case.scale * ((case.A.T[case.ids] * keep.astype(dtype)) @ case.B.T)
    margins = {"roles swapped": mutant_margin(swapped, y, bound), "dropout on the path": mutant_margin(dropped, y, bound)}
    print(f"\nembedding mutant margins ({dtype}, max error / bound): "
          + ", ".join(f"{k} {v:.2e}" for k, v in margins.items()))
    for name, margin in margins.items():
        assert margin > 1e3, name          # caught, with three orders of magnitude to spare


# ----------------------------------------------------------------------------------------------
# Bad input: clear errors naming the argument
# ----------------------------------------------------------------------------------------------

E4, A4, B4, IDS = np.ones((4, 3)), np.ones((2, 4)), np.ones((3, 2)), np.array([0, 3])


@pytest.mark.parametrize("call, error, match", [
    (lambda: lora_embedding(IDS.astype(float), E4, A4, B4, 1.0), TypeError, "ids must be an integer array"),
    (lambda: lora_embedding(np.array([0, 4]), E4, A4, B4, 1.0), ValueError, r"ids must be in \[0, 4\).*got 4 at position \(1,\)"),
    (lambda: lora_embedding(np.array([-1]), E4, A4, B4, 1.0), ValueError, "got -1"),
    (lambda: lora_embedding(IDS, np.ones(4), A4, B4, 1.0), ValueError, "E must be 2-D"),
    (lambda: lora_embedding(IDS, E4, np.ones((2, 3)), B4, 1.0), ValueError, r"A must be \(r, num_embeddings\) = \(r, 4\)"),
    (lambda: lora_embedding(IDS, E4, A4, np.ones((4, 2)), 1.0), ValueError, r"B must be \(embedding_dim, r\) = \(3, r\)"),
    (lambda: lora_embedding(IDS, E4, A4, np.ones((3, 1)), 1.0), ValueError, "A has rank 2.*B has rank 1"),
    (lambda: lora_embedding(IDS, E4, A4.astype(np.float32), B4, 1.0), TypeError, "B is float64 but A is float32"),
    (lambda: lora_embedding(IDS, E4, A4, B4, float("nan")), ValueError, "scale must be finite"),
    (lambda: lora_embedding(IDS, E4, A4, B4, True), TypeError, "scale must be a real number"),
    (lambda: lora_embedding(IDS, E4, A4, B4, 1.0, 4), ValueError, r"padding_idx must be in \[0, 3\]"),
    (lambda: merge_embedding(np.ones((5, 3)), A4, B4, 1.0), ValueError, r"A must be \(r, 5\)"),
    (lambda: init_lora_embedding(0, 3, 2, rng=np.random.default_rng(0)), ValueError, "num_embeddings must be a positive int"),
    (lambda: init_lora_embedding(4, 3, 2, rng=0), TypeError, "rng"),
    (lambda: init_lora_embedding(4, 3, 2, rng=np.random.default_rng(0), dtype="int32"), TypeError, "float32 or float64"),
])
def test_bad_input_raises_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_array_api_strict_ids_are_checked_too():
    with use_backend("array_api_strict"):
        E, A, B = asarray(E4), asarray(A4), asarray(B4)
        with pytest.raises(ValueError, match="got 7"):
            lora_embedding(array_api_strict.asarray([1, 7]), E, A, B, 1.0)
