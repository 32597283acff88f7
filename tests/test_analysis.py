"""Tests for lora_ref.analysis: factored SVD, spectrum summaries, Eq. 4, amplification, plots.

Error bounds (every one below is built from lora_ref.testing.tolerance = gamma_n = n u / (1 - n u)):

* Backward stability. Householder QR of an (m, n) matrix and LAPACK's SVD of an (m, n) matrix
  return the exact factorisation of a matrix perturbed by E with |E| <= gamma~_{mn} times the
  input's norm (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., Thm 19.4 for QR;
  Sec. 19.7 / Demmel's Applied Numerical Linear Algebra Sec. 5.4 for the SVD). Higham's
  gamma~ carries an unspecified small constant c; we take c = 1, i.e. one rounding per entry of
  the matrix, which majorises the error of every long chain of operations actually performed
  (rounding errors are observed to grow like sqrt(n), not n).
* Weyl: singular values move by at most |E|_2.  Wedin (1972): the top-k singular subspaces move
  by sin(theta) <= |E|_2 / delta, delta = the gap sigma_k - sigma_{k+1}, less what E may take
  from it.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import scipy.linalg
from hypothesis import given
from hypothesis import strategies as st

from lora_ref import analysis
from lora_ref.analysis import (
    Spectrum,
    amplification_factor,
    amplification_report,
    delta_svd,
    expected_random_projection,
    projection_distance,
    similarity_grid,
    spectrum,
    subspace_similarity,
)
from lora_ref.testing import assert_within, tolerance

DTYPES = [np.float64, np.float32]


# --------------------------------------------------------------------------------------------
# Bounds
# --------------------------------------------------------------------------------------------


def factored_svd_error(dtype, d_out, d_in, r, scale, A, B) -> float:
    """Bound on |E|_2 for delta_svd's result = exact SVD of s B A + E.

    QR of B (d_out, r): gamma_{d_out r} |B|_F; QR of A^T (d_in, r): gamma_{d_in r} |A|_F; the
    core s R_B R_A^T: r + 1 roundings per entry; the core's SVD: gamma_{r^2}. Each relative to
    |s| |B|_F |A|_F (>= |s B A|_2), and gamma_a + gamma_b <= gamma_{a+b}.
    """
    n = d_out * r + d_in * r + (r + 1) + r * r
    return tolerance(dtype, n) * abs(scale) * np.linalg.norm(B.astype(np.float64)) * np.linalg.norm(A.astype(np.float64))


def dense_svd_error(dtype, d_out, d_in, r, scale, A, B) -> float:
    """Bound on |E|_2 for the dense reference: forming s B A (r + 1 roundings per entry, relative
    to |s| |B| |A| entrywise, whose 2-norm is <= |s| |B|_F |A|_F), then LAPACK's SVD of the
    (d_out, d_in) result (gamma_{d_out d_in} |M|_2 <= gamma |s| |B|_F |A|_F)."""
    n = (r + 1) + d_out * d_in
    return tolerance(dtype, n) * abs(scale) * np.linalg.norm(B.astype(np.float64)) * np.linalg.norm(A.astype(np.float64))


def sin_angle(X, Y) -> float:
    """sin of the largest principal angle between the column spans of X and Y (float64)."""
    return float(np.sin(np.max(scipy.linalg.subspace_angles(X.astype(np.float64), Y.astype(np.float64)))))


def rng_orthonormal(rng, n, k):
    """An (n, k) matrix with orthonormal columns (to rounding), from QR of a Gaussian."""
    return np.linalg.qr(rng.standard_normal((n, k)))[0]


# --------------------------------------------------------------------------------------------
# delta_svd equals the dense SVD of the formed product
# --------------------------------------------------------------------------------------------


@st.composite
def factor_cases(draw):
    """A, B with a product of known rank K and well-separated singular values K, K-1, ..., 1
    (times a magnitude), rank-deficient in A, in B, in both, or plain Gaussian factors.

    B A = U0 diag(sigma) X Y V0^T with X Y = I_K; Z terms are added that vanish in the product
    (Z Y = 0 or X Z = 0), so one factor has full rank while the product keeps rank K.
    """
    d_out, d_in, r = draw(st.integers(1, 16)), draw(st.integers(1, 16)), draw(st.integers(1, 10))
    kind = draw(st.sampled_from(["A deficient", "B deficient", "both deficient", "gaussian"]))
    K = draw(st.integers(1, min(r, d_out, d_in)))
    seed = draw(st.integers(0, 2**32 - 1))
    scale = draw(st.sampled_from([1.0, 0.5, -2.0, 16.0]))
    magnitude = 10.0 ** draw(st.integers(-3, 3))
    rng = np.random.default_rng(seed)
    if kind == "gaussian":
        return rng.standard_normal((r, d_in)) * magnitude, rng.standard_normal((d_out, r)), scale, None
    U0, V0 = rng_orthonormal(rng, d_out, K), rng_orthonormal(rng, d_in, K)
    sigma = np.arange(K, 0, -1, dtype=np.float64) * magnitude                  # K, ..., 1
    Q_x = rng_orthonormal(rng, r, K)                                            # (r, K)
    D_x = rng.uniform(0.5, 2.0, size=K)
    X = D_x[:, None] * Q_x.T                                                    # (K, r)
    Y = Q_x / D_x[None, :]                                                      # (r, K), X Y = I
    B = (U0 * sigma) @ X                                                        # (d_out, r)
    A = Y @ V0.T                                                                # (r, d_in)
    complement = np.eye(r) - Q_x @ Q_x.T                                        # (r, r)
    if kind == "A deficient":                                                   # B full rank
        B = B + sigma[0] * rng.standard_normal((d_out, r)) @ complement / 4.0
    elif kind == "B deficient":                                                 # A full rank
        A = A + complement @ rng.standard_normal((r, d_in)) / 4.0
    return A, B, scale, K


@pytest.mark.parametrize("dtype", DTYPES)
@given(case=factor_cases())
def test_delta_svd_matches_dense_svd(dtype, case):
    A64, B64, scale, K = case
    A, B = A64.astype(dtype), B64.astype(dtype)
    d_out, r, d_in = B.shape[0], B.shape[1], A.shape[1]
    k = min(r, d_out, d_in)
    U, S, Vh = delta_svd(A, B, scale)
    assert (U.shape, S.shape, Vh.shape) == ((d_out, k), (k,), (k, d_in))
    assert U.dtype == S.dtype == Vh.dtype == np.dtype(dtype)

    # The reference: SciPy's SVD of the dense product, formed in float64 from the same values
    # (float32 -> float64 is exact), so the float32 run is held against a float64 oracle.
    A_ref, B_ref = A.astype(np.float64), B.astype(np.float64)
    U_d, S_d, Vh_d = scipy.linalg.svd((B_ref @ A_ref) * scale, full_matrices=False)
    e = factored_svd_error(dtype, d_out, d_in, r, scale, A, B) + dense_svd_error(
        np.float64, d_out, d_in, r, scale, A_ref, B_ref)
    # Weyl, for each computation against the exact values: |S - S_d| <= e_ours + e_dense.
    assert_within(S, S_d[:k], e, what="delta_svd singular values")
    # The product has rank <= k: the dense SVD's further values are exact zeros, perturbed.
    assert_within(S_d[k:], np.zeros(S_d.size - k), e, what="dense singular values beyond r")

    # Singular subspaces: Wedin per gap. Each computed basis is, to gamma_n, an orthonormal
    # singular basis of its perturbed matrix; the angles between the two computed subspaces are
    # at most the sum of each one's angle to the exact subspace (the largest principal angle is
    # a metric), each <= e_p / gap with gap >= S_d[i-1] - S_d[i] - 2e (Weyl again).
    orth = 2 * tolerance(dtype, max(d_out, d_in) * r) + tolerance(np.float64, d_out + d_in)
    S_next = np.append(S_d, 0.0)
    checked = []
    for i in range(1, k + 1):
        gap = S_d[i - 1] - S_next[i] - 2 * e
        if gap <= 0:
            continue
        bound = e / gap + orth
        assert sin_angle(U[:, :i], U_d[:, :i]) <= bound, f"left subspace {i}"
        assert sin_angle(Vh[:i].T, Vh_d[:i].T) <= bound, f"right subspace {i}"
        checked.append(i)
    if K is not None and dtype == np.float64:
        # Known rank K with singular values >= magnitude, the rest exactly zero: the top-K
        # subspace test must have run (the test is not vacuous).
        assert K in checked


def test_delta_svd_any_backend_and_half_precision():
    array_api_strict = pytest.importorskip("array_api_strict")
    rng = np.random.default_rng(1)
    A, B = rng.standard_normal((3, 9)), rng.standard_normal((7, 3))
    expected = delta_svd(A, B, 0.5)
    got = delta_svd(array_api_strict.asarray(A), array_api_strict.asarray(B), 0.5)
    for name, a, b in zip("U S Vh".split(), got, expected):
        np.testing.assert_array_equal(a, b, err_msg=name)   # same numbers in, same LAPACK calls
    half = delta_svd(A.astype(np.float16), B.astype(np.float16), 1.0)
    assert half.S.dtype == np.float32                       # LAPACK has no half precision
    np.testing.assert_array_equal(half.S, delta_svd(A.astype(np.float16).astype(np.float32),
                                                    B.astype(np.float16).astype(np.float32)).S)


def test_delta_svd_zero_update_and_zero_scale():
    rng = np.random.default_rng(2)
    A = rng.standard_normal((4, 6))
    assert not np.any(delta_svd(A, np.zeros((5, 4))).S)      # B = 0 (LoRA's initialisation)
    assert not np.any(delta_svd(A, rng.standard_normal((5, 4)), 0.0).S)


# --------------------------------------------------------------------------------------------
# spectrum
# --------------------------------------------------------------------------------------------


def test_spectrum_formulas_on_known_values():
    # sigma = (4, 3, 0) of a (5, 7) matrix; every expected value is the definition evaluated with
    # Python's math module: energy 16/25; stable rank 25/16; entropy of (4/7, 3/7).
    spec = Spectrum.from_singular_values(np.array([4.0, 3.0, 0.0]), (5, 7))
    p = (4 / 7, 3 / 7)
    # Each summary is a short chain of float64 operations on exact inputs: a sum of 3 terms and
    # one division (energy, stable rank), or 3 logs/products, a sum, an exp (effective rank,
    # whose relative error is at most that of its exponent's absolute error plus one rounding).
    bound = tolerance(np.float64, 8)
    assert_within(spec.energy_at(1), 16 / 25, bound, what="energy at 1")
    assert spec.energy_at(2) == spec.energy_at(3) == spec.energy_at(100) == 1.0
    assert_within(spec.stable_rank, 25 / 16, bound * 25 / 16, what="stable rank")
    erank = math.exp(-sum(q * math.log(q) for q in p))
    assert_within(spec.effective_rank, erank, bound * erank * 4, what="effective rank")
    assert spec.numerical_rank == 2
    assert spec.tol == 7 * np.finfo(np.float64).eps * 4.0   # NumPy matrix_rank's default
    assert Spectrum.from_singular_values(np.array([4.0, 3.0, 0.0]), (5, 7), tol=3.0).numerical_rank == 1
    assert Spectrum.from_singular_values(np.array([4.0, 3.0, 0.0]), (5, 7), rtol=0.5).numerical_rank == 2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K", [1, 3, 6])
def test_spectrum_of_equal_singular_values(dtype, K):
    # B (d_out, K) and A (K, d_in) with orthonormal columns / rows: s B A has K singular values
    # equal to |s|, so effective rank = stable rank = numerical rank = K and energy_at(i) = i/K.
    rng = np.random.default_rng(K)
    d_out, d_in, s = 12, 9, -3.0
    B = rng_orthonormal(rng, d_out, K).astype(dtype)
    A = rng_orthonormal(rng, d_in, K).T.astype(dtype)
    spec = spectrum(A, B, s)
    # Each singular value is within e of |s| (Weyl; B, A orthonormal to gamma_{d K} each,
    # then delta_svd's own backward error); the summaries are smooth functions of the
    # relative spread e / |s|, each changing by at most a few times it (first-order).
    e = factored_svd_error(dtype, d_out, d_in, K, s, A, B) + 2 * tolerance(dtype, max(d_out, d_in) * K) * abs(s)
    rel = e / abs(s)
    assert_within(spec.singular_values, np.full(K, abs(s)), e, what="singular values")
    assert spec.numerical_rank == K
    assert_within(spec.effective_rank, K, 4 * K * rel, what="effective rank")
    assert_within(spec.stable_rank, K, 4 * K * rel, what="stable rank")
    assert_within(spec.energy, np.arange(1, K + 1) / K, 4 * rel, what="energy")


def test_spectrum_numerical_rank_at_a_derived_tolerance():
    # rank-2 product of rank-4 factors (A's last two rows are combinations of the first two):
    # computed singular values 3 and 4 are exact zeros perturbed by at most e, so at tol = e the
    # numerical rank is exactly 2 (the nonzero ones are far above e).
    rng = np.random.default_rng(3)
    A2 = rng.standard_normal((2, 20))
    A = np.vstack([A2, rng.standard_normal((2, 2)) @ A2])                   # (4, 20), rank 2
    B = rng.standard_normal((15, 4))
    e = factored_svd_error(np.float64, 15, 20, 4, 1.0, A, B)
    spec = spectrum(A, B, tol=e)
    assert spec.numerical_rank == 2 and spec.tol == e
    assert spec.singular_values[1] > 100 * e                                 # not a borderline case


def test_spectrum_of_zero_update():
    spec = spectrum(np.ones((2, 3)), np.zeros((4, 2)))
    assert (spec.numerical_rank, spec.effective_rank, spec.stable_rank) == (0, 0.0, 0.0)
    assert np.all(np.isnan(spec.energy))
    assert spec.to_dict()["numerical_rank"] == 0


# --------------------------------------------------------------------------------------------
# Subspace similarity (Eq. 4) and projection distance
# --------------------------------------------------------------------------------------------


def right_vectors(A, driver):
    """Right singular vectors (d_in, m) of A, and its singular values, by a chosen LAPACK driver."""
    _, S, Vh = scipy.linalg.svd(A, full_matrices=False, lapack_driver=driver)
    return Vh.T, S


def subspace_error(S, i, e) -> float:
    """Wedin bound on sin(angle) between a computed and the exact top-i right singular subspace
    of a matrix with computed singular values S (A's singular values beyond its min(r, d_in) are
    zero when i < d_in; none remain when i = d_in: the subspace is all of R^d_in)."""
    nxt = S[i] if i < S.size else 0.0
    gap = S[i - 1] - nxt - 2 * e
    return e / gap if gap > 0 else math.inf


def phi_error(A1, A2, i, j, dtype, extra1=0.0, extra2=0.0) -> float:
    """Bound on |phi_computed - phi_exact| for one SVD-based evaluation.

    phi = tr(P1 P2) / p with P the projectors; |tr((P1' - P1) P2)| <= |P1' - P1|_F |P2|_F
    <= sqrt(2 i) sin(theta1) sqrt(j), likewise for P2, so |dphi| <= sqrt(2 i j) (sin1 + sin2) / p.
    sin from Wedin with the SVD's backward error gamma_{r d} |A|_2 (+ extra, e.g. from forming A).
    Then the computed frames are orthonormal to gamma_{r d} and G = U1^T U2 has i j entries each
    off by at most that plus a dot product's gamma_d; |G|_F^2 moves by <= 2 i j times that.
    """
    (r1, d), (r2, _) = A1.shape, A2.shape
    _, S1 = right_vectors(A1.astype(np.float64), "gesdd")
    _, S2 = right_vectors(A2.astype(np.float64), "gesdd")
    e1 = tolerance(dtype, r1 * d) * S1[0] + extra1
    e2 = tolerance(dtype, r2 * d) * S2[0] + extra2
    p = min(i, j)
    sines = subspace_error(S1, i, e1) + subspace_error(S2, j, e2)
    entry = 2 * tolerance(dtype, max(r1, r2) * d) + tolerance(dtype, d)
    return math.sqrt(2 * i * j) * sines / p + 2 * i * j * entry / p


@st.composite
def a_pairs(draw):
    d = draw(st.integers(2, 24))
    r1, r2 = draw(st.integers(1, 10)), draw(st.integers(1, 10))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return rng.standard_normal((r1, d)), rng.standard_normal((r2, d))


@pytest.mark.parametrize("dtype", DTYPES)
@given(pair=a_pairs())
def test_similarity_grid_against_principal_angles(dtype, pair):
    A1, A2 = (a.astype(dtype) for a in pair)
    grid = similarity_grid(A1, A2)
    m1, m2 = min(A1.shape), min(A2.shape)
    assert grid.shape == (m1, m2) and grid.dtype == np.float64
    assert np.all((grid >= 0.0) & (grid <= 1.0))                  # Gaussian A: full rank, no NaN
    # Oracle: principal angles (scipy.linalg.subspace_angles) between right singular subspaces
    # computed in float64 by another LAPACK driver (gesvd, not gesdd): phi = mean cos^2 theta.
    V1, _ = right_vectors(A1.astype(np.float64), "gesvd")
    V2, _ = right_vectors(A2.astype(np.float64), "gesvd")
    for i in range(1, m1 + 1):
        for j in range(1, m2 + 1):
            theta = scipy.linalg.subspace_angles(V1[:, :i], V2[:, :j])
            oracle = float(np.sum(np.cos(theta) ** 2)) / min(i, j)
            bound = phi_error(A1, A2, i, j, dtype) + phi_error(A1, A2, i, j, np.float64)
            assert_within(grid[i - 1, j - 1], oracle, bound, what=f"phi({i}, {j})")
            assert grid[i - 1, j - 1] == subspace_similarity(A1, A2, i, j)
            # phi = 1 - d^2 / p, d^2 = sum sin^2 theta (the projection distance): d is computed
            # from the same |G|_F^2 as phi, so only a few roundings separate them (p - g, sqrt,
            # its square, the division by p, and 1 - ...), relative to 1.
            dist = projection_distance(A1, A2, i, j)
            assert_within(1.0 - dist**2 / min(i, j), grid[i - 1, j - 1], tolerance(np.float64, 6),
                          what=f"1 - d^2/p at ({i}, {j})")
            assert_within(dist**2, float(np.sum(np.sin(theta) ** 2)), min(i, j) * bound,
                          what=f"d^2 at ({i}, {j})")


@pytest.mark.parametrize("dtype", DTYPES)
def test_phi_of_a_matrix_with_itself_is_one(dtype):
    rng = np.random.default_rng(4)
    r, d = 8, 40
    A = rng.standard_normal((r, d)).astype(dtype)
    # Same frames on both sides: G = V_i^T V_i = I + F with |F_ab| <= f = gamma_{r d} (frame
    # orthogonality) + gamma_d (dot product), so | |G|_F^2 / i - 1 | <= 2 f + i f^2.
    f = tolerance(dtype, r * d) + tolerance(dtype, d)
    for i in range(1, r + 1):
        assert_within(subspace_similarity(A, A, i, i), 1.0, 2 * f + i * f * f, what=f"phi(A, A, {i}, {i})")
        assert_within(projection_distance(A, A, i, i) ** 2, 0.0, i * (2 * f + i * f * f), what="d(A, A)^2")
    grid = similarity_grid(A, A)
    assert_within(np.diag(grid), np.ones(r), 2 * f + r * f * f, what="diagonal of phi(A, A)")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", [1.0, -3.0, 1e-3, 250.0])
def test_phi_invariant_to_rotation_and_scaling_of_A(dtype, c):
    # A1 with singular values 2, 2 - 1/r, ..., i.e. gaps of 1/r: its top-i right subspaces are
    # well determined, and Q A1 c (Q orthogonal r x r) has the same ones in exact arithmetic.
    rng = np.random.default_rng(5)
    r1, r2, d = 6, 9, 30
    sig = 2.0 - np.arange(r1) / r1
    A1 = ((rng_orthonormal(rng, r1, r1) * sig) @ rng_orthonormal(rng, d, r1).T).astype(dtype)
    A2 = rng.standard_normal((r2, d)).astype(dtype)
    Q = rng_orthonormal(rng, r1, r1).astype(dtype)
    QA1 = (Q @ A1) * c
    # Forming Q A1 c: r + 1 roundings per entry relative to |c| |Q| |A1|, 2-norm <= |c| |Q|_F |A1|_F.
    forming = tolerance(dtype, r1 + 1) * abs(c) * np.linalg.norm(Q.astype(np.float64)) * np.linalg.norm(A1.astype(np.float64))
    g1, g2 = similarity_grid(A1, A2), similarity_grid(QA1, A2)
    for i in range(1, r1 + 1):
        for j in range(1, r2 + 1):
            # Both are off from the exact phi by at most phi_error; Q A1 c's exact subspaces are
            # A1's, so the two computed values are within the sum of the bounds.
            bound = phi_error(A1, A2, i, j, dtype) + phi_error(QA1, A2, i, j, dtype, extra1=forming)
            assert_within(g2[i - 1, j - 1], g1[i - 1, j - 1], bound, what=f"phi({i}, {j}) after A1 -> c Q A1")


def test_phi_of_random_subspaces_averages_max_ij_over_d():
    # For a fixed i-subspace U1 and a uniformly random j-subspace U2 of R^d, E[U2 U2^T] = (j/d) I
    # (rotation invariance), so E|U1^T U2|_F^2 = tr(U1^T E[U2 U2^T] U1) = i j / d and
    # E phi = max(i, j) / d. The top-j right singular subspace of a Gaussian (r2, d) matrix is
    # uniformly distributed (its law is invariant under A -> A G^T for orthogonal G).
    # Hoeffding: each phi lies in [0, 1], so for the mean of N independent draws
    # P(|mean - E phi| >= t) <= 2 exp(-2 N t^2). Union bound over the m = r1 r2 cells:
    # t = sqrt(ln(2 m / delta) / (2 N)) gives a false failure with probability < delta = 1e-7.
    rng = np.random.default_rng(6)
    d, r1, r2, N = 24, 3, 6, 30000
    delta = 1e-7
    A1 = rng.standard_normal((r1, d))
    total = np.zeros((r1, r2))
    for _ in range(N):
        total += similarity_grid(A1, rng.standard_normal((r2, d)))
    mean = total / N
    i, j = np.meshgrid(np.arange(1, r1 + 1), np.arange(1, r2 + 1), indexing="ij")
    t = math.sqrt(math.log(2 * r1 * r2 / delta) / (2 * N))
    assert_within(mean, np.maximum(i, j) / d, t, what="mean phi over random subspaces")
    # Not vacuous: the nearest wrong normalisation (dividing i j / d by max(i, j), giving
    # min(i, j) / d) differs from max(i, j) / d by >= 1/d > 2 t in every cell with i != j.
    assert 1.0 / d > 2 * t


def test_rank_deficient_A_leaves_undetermined_directions_out():
    rng = np.random.default_rng(7)
    A1 = np.vstack([rng.standard_normal((2, 10)), np.zeros((2, 10))])      # (4, 10), rank 2
    A2 = rng.standard_normal((3, 10))
    grid = similarity_grid(A1, A2)
    assert grid.shape == (4, 3)
    assert np.all(np.isfinite(grid[:2])) and np.all(np.isnan(grid[2:]))
    with pytest.raises(ValueError, match=r"i=3 exceeds the numerical rank 2 of A1"):
        subspace_similarity(A1, A2, 3, 1)
    # r larger than d_in: only d_in right singular vectors exist.
    wide = rng.standard_normal((12, 5))
    assert similarity_grid(wide, rng.standard_normal((2, 5))).shape == (5, 2)


# --------------------------------------------------------------------------------------------
# Amplification (Section 7.3)
# --------------------------------------------------------------------------------------------


def exact_orthogonal(n, rng):
    """A dense n x n orthogonal matrix whose entries are exact binary fractions.

    H = I - (1/2) 1 1^T on blocks of 4 is orthogonal with entries +-1/2; products of such block
    matrices and signed permutations have entries that are multiples of 1/16 and are exactly
    orthogonal in floating point (checked by the caller).
    """
    assert n % 4 == 0
    H = np.kron(np.eye(n // 4), np.eye(4) - 0.5)
    def signed_perm():
        return np.eye(n)[rng.permutation(n)] * rng.choice([-1.0, 1.0], size=n)
    return signed_perm() @ H @ signed_perm() @ H @ signed_perm()


def constructed(dtype, rng, d_out=16, d_in=12, r=3, offset=0):
    """W = U0 diag(w) V0^T and dW = B A = U0[:, o:o+r] diag(delta) V0[:, o:o+r]^T, all exact."""
    U0, V0 = exact_orthogonal(d_out, rng), exact_orthogonal(d_in, rng)
    assert np.array_equal(U0.T @ U0, np.eye(d_out)) and np.array_equal(V0.T @ V0, np.eye(d_in))
    m = min(d_out, d_in)
    w = np.arange(2 * m, m, -1, dtype=np.float64)                  # distinct integers, descending
    W = (U0[:, :m] * w) @ V0[:, :m].T                              # exact: multiples of 1/256
    delta = np.array([5.0, 3.0, 2.0, 1.0, 7.0][:r])
    sl = slice(offset, offset + r)
    B, A = U0[:, sl] * delta / 2.0, V0[:, sl].T                    # s = 2: s B A = U0 diag(delta) V0^T
    for t in (W, B, A):
        assert np.array_equal(t.astype(dtype).astype(np.float64), t)   # representable exactly
    return W.astype(dtype), A.astype(dtype), B.astype(dtype), 2.0, w, delta


def amplification_error(dtype, W, A, B, s, delta, proj) -> float:
    """Relative error bound of the computed factor |dW|_F / |U^T W V|_F.

    * |dW|_F = |S|: each S_i within e (delta_svd's backward error, Weyl): sqrt(r) e, plus
      gamma_r for the norm's sum.
    * U, V: the top-r subspaces of dW are exact up to sin <= e / (sigma_r - e) (Wedin; the next
      singular value is 0), so |P' W P'| moves by <= 2 sin sqrt(r) |W|_2 (|P' - P|_2 = sin).
    * The computed frames are orthonormal to gamma_n: at most 2 r gamma_n sqrt(r) |W|_2 more.
    * Forming (U^T W) V: each of the r^2 entries off by gamma_{d_out + d_in} |u|^T |W| |v|
      <= gamma |W|_F, so r gamma |W|_F in Frobenius norm; one more rounding for the division.
    """
    d_out, r, d_in = B.shape[0], B.shape[1], A.shape[1]
    n = d_out * r + d_in * r + (r + 1) + r * r
    e = factored_svd_error(dtype, d_out, d_in, r, s, A, B)
    W64 = W.astype(np.float64)
    norm2, normF = np.linalg.norm(W64, 2), np.linalg.norm(W64)
    sigma_r = abs(s) * float(np.min(np.abs(delta)))
    sin = e / (sigma_r - e)
    num = (math.sqrt(r) * e) / float(np.linalg.norm(abs(s) * delta)) + tolerance(dtype, r)
    den_abs = 2 * sin * math.sqrt(r) * norm2 + 2 * r * tolerance(dtype, n) * math.sqrt(r) * norm2 \
        + r * tolerance(dtype, d_out + d_in) * normF
    return num + den_abs / (proj - den_abs) + tolerance(dtype, 1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_amplification_aligned_with_top_directions(dtype):
    # dW lies in W's top-r singular directions: U^T W V = diag(w_1..w_r) (up to a rotation that
    # leaves the Frobenius norm alone), so the factor is |delta| / |w[:r]|.
    W, A, B, s, w, delta = constructed(dtype, np.random.default_rng(8))
    r = delta.size
    expected_proj = float(np.linalg.norm(w[:r]))
    expected = float(np.linalg.norm(delta)) / expected_proj
    got = amplification_factor(W, A, B, s)
    assert isinstance(got, float)
    assert_within(got, expected, expected * amplification_error(dtype, W, A, B, s, delta, expected_proj),
                  what="amplification factor (aligned)")


@pytest.mark.parametrize("dtype", DTYPES)
def test_amplification_orthogonal_to_top_directions(dtype):
    # dW in W's singular directions r+1..2r, orthogonal to the top r: U^T W V = diag(w_{r+1..2r}).
    rng = np.random.default_rng(9)
    W, A, B, s, w, delta = constructed(dtype, rng, offset=3)
    r = delta.size
    expected_proj = float(np.linalg.norm(w[r:2 * r]))
    expected = float(np.linalg.norm(delta)) / expected_proj
    assert_within(amplification_factor(W, A, B, s), expected,
                  expected * amplification_error(dtype, W, A, B, s, delta, expected_proj),
                  what="amplification factor (orthogonal)")
    # W with nothing in dW's directions at all: infinite amplification.
    assert amplification_factor(np.zeros_like(W), A, B, s) == math.inf


def test_amplification_report_against_exact_values():
    dtype = np.float64
    W, A, B, s, w, delta = constructed(dtype, np.random.default_rng(10), d_out=8, d_in=8, r=2)
    k, d = delta.size, 8
    # Hoeffding for the random column: X = |U^T W V|_F^2 lies in [0, sum_{l<=k} sigma_l(W)^2]
    # (the singular values of U^T W V interlace W's), so with R that range,
    # P(|mean X - E X| >= t) <= 2 exp(-2 N t^2 / R^2); t for a false failure < 1e-7.
    N, fail = 20000, 1e-7
    report = amplification_report(W, A, B, s, rng=np.random.default_rng(11), n_random=N)
    assert report.k == k and report.proj_random.shape == (N,)
    weight_norm = float(np.linalg.norm(w))
    # Norms of exact inputs: a sum of d^2 squares then a square root.
    assert_within(report.weight_norm, weight_norm, tolerance(dtype, d * d + 1) * weight_norm, what="|W|_F")
    # svdvals of W: Weyl with LAPACK's backward error gamma_{d^2} |W|_2 per value.
    top = float(np.linalg.norm(w[:k]))
    assert_within(report.proj_weight, top, math.sqrt(k) * tolerance(dtype, d * d) * w[0] + tolerance(dtype, k) * top,
                  what="projection on W's top directions")
    expected_proj = float(np.linalg.norm(w[:k]))
    assert_within(report.factor, float(np.linalg.norm(delta)) / expected_proj,
                  report.factor * amplification_error(dtype, W, A, B, s, delta, expected_proj), what="factor")
    # The analytic expectation, from its formula: (k/d_out)(k/d_in)|W|_F^2 under the root.
    assert_within(report.proj_random_expected, k / d * weight_norm, tolerance(dtype, d * d + 4) * k / d * weight_norm,
                  what="analytic random projection")
    # Ky Fan: with orthonormal frames no draw can exceed the top-k projection (up to the frames'
    # orthogonality, gamma_{d k} each, and forming U^T W V: k gamma_{2d} |W|_F in Frobenius norm).
    ceiling = top * (1 + 2 * tolerance(dtype, d * k)) + k * tolerance(dtype, 2 * d) * weight_norm
    assert np.all(report.proj_random <= ceiling) and np.all(report.proj_random > 0)
    R = top**2
    t = R * math.sqrt(math.log(2 / fail) / (2 * N))
    assert_within(report.proj_random_rms**2, (k / d) ** 2 * weight_norm**2, t, what="mean square random projection")
    # Not vacuous: the formula without the square, (k/d)|W|_F^2, or with one factor, differ by > 2t.
    assert abs((k / d) * weight_norm**2 - (k / d) ** 2 * weight_norm**2) > 2 * t


def test_table_7_random_column_from_the_formula():
    # Hu et al. 2021, Table 7 (GPT-3 175B, layer 48, W_q of shape 12288 x 12288,
    # |W_q|_F = 61.95): |U^T W_q V^T|_F with random directions is printed as 0.02 (r = 4) and
    # 0.33 (r = 64). The analytic root-mean-square (r/d)|W|_F:
    r4 = expected_random_projection(61.95, 12288, 12288, 4)
    r64 = expected_random_projection(61.95, 12288, 12288, 64)
    assert_within(r4, 4 / 12288 * 61.95, tolerance(np.float64, 4) * r4, what="(4/d)|W|_F")
    assert round(r4, 2) == 0.02                 # Table 7 prints 0.02: reproduced
    # 64 / 12288 * 61.95 = 0.32266 rounds to 0.32, one unit below Table 7's 0.33. The paper's
    # column is a draw of random directions, not this expectation, and by Jensen a draw's mean
    # norm is at most the RMS, so the printed 0.33 is a draw above the mean, not a formula value.
    assert round(r64, 2) == 0.32


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


GOOD_A, GOOD_B = np.ones((2, 5)), np.ones((4, 2))


@pytest.mark.parametrize("call, error, message", [
    (lambda: delta_svd(np.ones((2, 5)), np.ones((4, 3))), ValueError, r"share r: A has r=2 .* B has r=3"),
    (lambda: delta_svd(np.ones(5), GOOD_B), ValueError, r"A must be 2-D \(r, d_in\), got shape \(5,\)"),
    (lambda: delta_svd(GOOD_A, np.ones((4, 2), dtype=np.int64)), TypeError, r"B must have a floating dtype .* got int64"),
    (lambda: delta_svd([[1.0]], [[1.0]]), TypeError, r"A must be an array"),
    (lambda: delta_svd(np.array([[1.0, np.nan, 0, 0, 0], [0, 0, 0, 0, np.inf]]), GOOD_B), ValueError,
     r"A must be finite, but 2 of its 10 entries"),
    (lambda: delta_svd(GOOD_A, GOOD_B.astype(np.float32)), TypeError, r"B is float32 but A is float64"),
    (lambda: delta_svd(GOOD_A, GOOD_B, float("nan")), ValueError, r"scale must be finite"),
    (lambda: delta_svd(GOOD_A, GOOD_B, "1"), TypeError, r"scale must be a real number"),
    (lambda: delta_svd(np.ones((0, 5)), np.ones((4, 0))), ValueError, r"A must be non-empty"),
    (lambda: subspace_similarity(np.ones((2, 5)), np.ones((2, 6)), 1, 1), ValueError,
     r"same d_in .* A1 has d_in=5 .* A2 has d_in=6"),
    (lambda: subspace_similarity(np.eye(2, 5), np.eye(3, 5), 3, 1), ValueError, r"i must be in \[1, 2\] .* got 3"),
    (lambda: subspace_similarity(np.eye(2, 5), np.eye(3, 5), 1, 0), ValueError, r"j must be in \[1, 3\] .* got 0"),
    (lambda: subspace_similarity(np.eye(2, 5), np.eye(3, 5), 1.0, 1), TypeError, r"i must be an int"),
    (lambda: subspace_similarity(np.eye(2, 5), np.eye(3, 5), True, 1), TypeError, r"i must be an int"),
    (lambda: projection_distance(np.eye(2, 5), np.eye(3, 5), 1, 4), ValueError, r"j must be in \[1, 3\]"),
    (lambda: similarity_grid(np.full((2, 5), np.inf), np.eye(3, 5)), ValueError, r"A1 must be finite"),
    (lambda: similarity_grid(np.eye(2, 5), np.eye(3, 5, dtype=np.float32)), TypeError, r"A2 is float32 but A1 is float64"),
    (lambda: amplification_factor(np.ones((4, 6)), GOOD_A, GOOD_B), ValueError,
     r"W must be \(d_out, d_in\) = \(4, 5\) .* got shape \(4, 6\)"),
    (lambda: amplification_factor(np.ones((4, 5)), GOOD_A, np.zeros((4, 2))), ValueError, r"update s B A is zero"),
    (lambda: amplification_factor(np.ones((4, 5)), np.eye(2, 5), np.eye(4, 2), k=3), ValueError,
     r"k must be in \[1, 2\] \(the numerical rank of s B A is 2\), got 3"),
    (lambda: amplification_report(np.ones((4, 5)), np.eye(2, 5), np.eye(4, 2), rng=0), TypeError,
     r"rng must be a numpy.random.Generator"),
    (lambda: amplification_report(np.ones((4, 5)), np.eye(2, 5), np.eye(4, 2), rng=np.random.default_rng(0),
                                  n_random=0), ValueError, r"n_random must be a positive int"),
    (lambda: Spectrum.from_singular_values(np.array([1.0, 2.0]), (3, 3)), ValueError, r"descending"),
    (lambda: Spectrum.from_singular_values(np.array([2.0, 1.0]), (3, 3), tol=1.0, rtol=0.1), ValueError,
     r"give tol or rtol, not both"),
    (lambda: Spectrum.from_singular_values(np.array([3.0, 2.0, 1.0]), (2, 3)), ValueError, r"at most 2 singular values"),
    (lambda: spectrum(GOOD_A, GOOD_B).energy_at(0), ValueError, r"k must be a positive int"),
])
def test_bad_input_raises_a_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call()


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------


@pytest.fixture
def agg():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    return matplotlib


def test_plot_spectrum(agg, tmp_path):
    rng = np.random.default_rng(12)
    A, B = rng.standard_normal((5, 20)), rng.standard_normal((16, 5))
    spec = spectrum(A, B, 0.5)
    path = tmp_path / "spectrum.png"
    fig = analysis.plot_spectrum(spec, path=path, title="dW")
    (line,) = fig.axes[0].get_lines()
    np.testing.assert_array_equal(line.get_xdata(), np.arange(1, 6))
    np.testing.assert_array_equal(line.get_ydata(), spec.singular_values)
    assert fig.axes[0].get_yscale() == "log"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Into a given Axes, overlaying a second spectrum (a DeltaSVD and a plain array).
    import matplotlib.figure
    ax = matplotlib.figure.Figure().add_subplot()
    assert analysis.plot_spectrum(delta_svd(A, B), ax=ax, label="s=1") is ax.figure
    analysis.plot_spectrum(np.array([3.0, 1.0]), ax=ax, label="other", log=False)
    assert [len(line.get_xdata()) for line in ax.get_lines()] == [5, 2]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["s=1", "other"]


def test_plot_similarity(agg, tmp_path):
    rng = np.random.default_rng(13)
    grid = similarity_grid(np.vstack([rng.standard_normal((3, 12)), np.zeros((1, 12))]), rng.standard_normal((6, 12)))
    path = tmp_path / "phi.png"
    fig = analysis.plot_similarity(grid, path=path, title="phi")
    (image,) = fig.axes[0].get_images()
    shown = np.ma.getdata(image.get_array())
    assert shown.shape == (4, 6)
    np.testing.assert_array_equal(shown, grid)                           # NaN row included
    assert image.get_clim() == (0.0, 1.0)
    assert image.get_extent() == [0.5, 6.5, 4.5, 0.5]                   # 1-based i down, j across
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_without_matplotlib(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pip install 'lora-ref\[plots\]'"):
        analysis.plot_spectrum(np.array([1.0]))
    with pytest.raises(ImportError, match=r"matplotlib, which is not installed"):
        analysis.plot_similarity(np.ones((2, 2)))


def test_plot_bad_input(agg):
    with pytest.raises(ValueError, match=r"grid must be a non-empty 2-D array"):
        analysis.plot_similarity(np.ones(3))
    with pytest.raises(TypeError, match=r"ax must be a matplotlib Axes"):
        analysis.plot_spectrum(np.ones(3), ax="left")
    with pytest.raises(TypeError, match=r"path must be a str or pathlib.Path"):
        analysis.plot_spectrum(np.ones(3), path=3)
