"""Rank analysis of learned LoRA updates: spectra, ranks, subspace similarity, amplification.

Hu et al. 2021 (arXiv 2106.09685), Section 7: the update ``dW = s B A`` learned by LoRA has a very
low "intrinsic rank". This module measures that on real adapters, with the paper's definitions
made precise. Everything here is SciPy linear algebra on the host.

Shapes (the layout of :mod:`lora_ref.lora` and PEFT)::

    A   (r, d_in)        B   (d_out, r)        W   (d_out, d_in)       dW = s B A  (d_out, d_in)
    k = min(r, d_out, d_in)   the number of singular triplets dW can have

Precision: inputs of any backend (NumPy, CuPy, array_api_strict) are copied to NumPy with
:func:`lora_ref.backend.to_numpy`. float64 input is analysed in float64, float32 in float32 (no
silent upcasting, as everywhere in lora_ref; SciPy's LAPACK has both precisions). float16 and
bfloat16 are analysed in float32, because LAPACK has no half precision and every half-precision
value is exact in float32. Arrays that take part in one computation must share a dtype.
Results are NumPy arrays in that working dtype; scalar summaries are Python floats.

The measures, and where the paper is ambiguous:

* :func:`delta_svd` -- the thin SVD of ``s B A`` from QR factorisations of B and A^T:
  ``B = Q_B R_B``, ``A^T = Q_A R_A``, so ``s B A = Q_B (s R_B R_A^T) Q_A^T``; the SVD of the small
  core ``s R_B R_A^T = U_c S V_c^T`` gives ``U = Q_B U_c``, ``Vh = V_c^T Q_A^T``. Cost
  O((d_in + d_out) r^2); the (d_out, d_in) matrix is never formed.
* :func:`spectrum` -- energy in the top k, effective rank (Roy & Vetterli 2007), stable rank,
  numerical rank at a stated tolerance.
* :func:`subspace_similarity` -- Eq. 4, ``phi(A1, A2, i, j) = |U1_i^T U2_j|_F^2 / min(i, j)``.
  **U are the right singular vectors of A** (an orthonormal basis of A's row space in R^{d_in}),
  as Section 7.2's text says. Appendix G says "left" and the figure captions "columns of A"; we
  follow the text because it is the only reading under which Eq. 4 is defined for A1 (r1, d_in)
  and A2 (r2, d_in) of different ranks (left singular vectors live in R^{r1} and R^{r2}, which
  cannot be compared when r1 != r2, as in the paper's r = 8 vs r = 64 Figure 3), and the only
  one invariant under ``A -> Q A`` (Q orthogonal), the change of basis of the rank coordinate
  that leaves ``B A`` unchanged when ``B -> B Q^T``.
* :func:`projection_distance` -- ``d = sqrt(sum_k sin^2 theta_k)`` over the ``p = min(i, j)``
  principal angles, so ``phi = 1 - d^2 / p``. (Appendix G prints ``(1/p)(1 - d^2)``; ``1 - d^2/p``
  is what makes phi = 1 for equal subspaces.)
* :func:`amplification_factor` -- Section 7.3: ``|dW|_F / |U^T W V|_F`` with U, V the top singular
  directions of dW.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import scipy.linalg

from .backend import dtype_name, getval, to_numpy
from .checks import (FLOAT_DTYPES, finite_real, float_array, int_in_range, is_int, non_negative_real,
                     numpy_generator, positive_int, same_dtype)

__all__ = [
    "AmplificationReport",
    "DeltaSVD",
    "Spectrum",
    "amplification_factor",
    "amplification_report",
    "delta_svd",
    "expected_random_projection",
    "plot_similarity",
    "plot_spectrum",
    "projection_distance",
    "similarity_grid",
    "spectrum",
    "subspace_similarity",
]

# ============================================================================================
# Input: any backend in, validated NumPy out
# ============================================================================================

_HALF = ("float16", "bfloat16")  # analysed in float32: LAPACK has no half precision


def _matrix(x: Any, name: str, expected: str) -> np.ndarray:
    """``x`` as a finite 2-D floating NumPy array in its working dtype (float16 -> float32)."""
    x = getval(x)
    float_array(x, name, FLOAT_DTYPES + ("bfloat16",))
    kind = dtype_name(x.dtype)
    if len(x.shape) != 2:
        raise ValueError(f"{name} must be 2-D {expected}, got shape {tuple(x.shape)}")
    if 0 in tuple(x.shape):
        raise ValueError(f"{name} must be non-empty {expected}, got shape {tuple(x.shape)}")
    try:
        out = to_numpy(x)
    except (RuntimeError, TypeError, BufferError, ValueError) as exc:   # e.g. a bfloat16 tensor via DLPack
        raise TypeError(f"{name}: cannot copy this {type(x).__name__} of dtype {kind} to NumPy ({exc}); "
                        "convert it to float32 first") from exc
    out = out.astype(np.float32) if kind in _HALF else np.asarray(out)
    bad = int(np.count_nonzero(~np.isfinite(out)))
    if bad:
        raise ValueError(f"{name} must be finite, but {bad} of its {out.size} entries are NaN or infinite")
    return out


def _factors(A: Any, B: Any) -> tuple[np.ndarray, np.ndarray]:
    A = _matrix(A, "A", "(r, d_in)")
    B = _matrix(B, "B", "(d_out, r)")
    if A.shape[0] != B.shape[1]:
        raise ValueError(f"A (r, d_in) and B (d_out, r) must share r: A has r={A.shape[0]} "
                         f"(shape {A.shape}), B has r={B.shape[1]} (shape {B.shape})")
    same_dtype(("A", A), ("B", B))
    return A, B


# ============================================================================================
# The thin SVD of s B A, without forming it
# ============================================================================================


class DeltaSVD(NamedTuple):
    """``s B A = U @ diag(S) @ Vh``, singular values descending.

    U (d_out, k), S (k,), Vh (k, d_in), k = min(r, d_out, d_in); U and Vh have orthonormal
    columns / rows. Unpacks like ``scipy.linalg.svd``: ``U, S, Vh = delta_svd(A, B, s)``.
    """

    U: np.ndarray
    S: np.ndarray
    Vh: np.ndarray


def _delta_svd(A: np.ndarray, B: np.ndarray, scale: float) -> DeltaSVD:
    Q_B, R_B = scipy.linalg.qr(B, mode="economic", check_finite=False)       # (d_out, kb), (kb, r)
    Q_A, R_A = scipy.linalg.qr(A.T, mode="economic", check_finite=False)     # (d_in, ka), (ka, r)
    core = (R_B @ R_A.T) * scale                                              # (kb, ka)  s R_B R_A^T
    U_c, S, Vh_c = scipy.linalg.svd(core, full_matrices=False, check_finite=False)  # (kb, k) (k,) (k, ka)
    return DeltaSVD(Q_B @ U_c, S, Vh_c @ Q_A.T)                               # (d_out, k) (k,) (k, d_in)


def delta_svd(A: Any, B: Any, scale: float = 1.0) -> DeltaSVD:
    """The thin SVD of the LoRA update ``dW = s B A`` (Eq. 3), without forming dW.

    Parameters
    ----------
    A : array (r, d_in)
    B : array (d_out, r)
    scale : float
        s, e.g. ``lora_scale(alpha, r)`` or ``config.scale_for(name)``. Negative is allowed (the
        sign goes into U); zero gives all-zero singular values.

    Returns
    -------
    DeltaSVD(U (d_out, k), S (k,), Vh (k, d_in)), k = min(r, d_out, d_in).

    With ``B = Q_B R_B`` and ``A^T = Q_A R_A`` (economic QR), ``s B A = Q_B (s R_B R_A^T) Q_A^T``,
    and the SVD of the (at most r x r) core gives the rest. Cost O((d_in + d_out) r^2) instead of
    the dense SVD's O(d_out d_in min(d_out, d_in)). Backward stable: the result is the exact SVD
    of ``s B A + E`` with ``|E|_2`` a few units of roundoff times ``|s| |B|_F |A|_F``.
    """
    A, B = _factors(A, B)
    return _delta_svd(A, B, finite_real(scale, "scale"))


# ============================================================================================
# Spectrum summaries
# ============================================================================================


@dataclass(frozen=True, eq=False)
class Spectrum:
    """Summary of a matrix's singular values (see :func:`spectrum`).

    Attributes
    ----------
    singular_values : ndarray (k,)     descending, in the working dtype
    shape : (d_out, d_in)              the shape of the matrix they belong to
    tol : float                        singular values above it count toward numerical_rank
    numerical_rank : int               #{i : sigma_i > tol}
    effective_rank : float             exp(entropy of sigma / sum(sigma)), Roy & Vetterli 2007
    stable_rank : float                |M|_F^2 / |M|_2^2 = sum(sigma^2) / sigma_1^2
    energy : ndarray (k,) float64      energy[i-1] = sum_{l<=i} sigma_l^2 / sum_l sigma_l^2

    For the zero matrix (e.g. a freshly initialised adapter, B = 0) every rank is 0 and the
    energy fractions, 0/0, are NaN.
    """

    singular_values: np.ndarray
    shape: tuple[int, int]
    tol: float
    numerical_rank: int
    effective_rank: float
    stable_rank: float
    energy: np.ndarray = field(repr=False)

    @classmethod
    def from_singular_values(cls, singular_values: Any, shape: tuple[int, int], *,
                             tol: float | None = None, rtol: float | None = None) -> Spectrum:
        """Summarise given singular values of a ``shape`` matrix (e.g. from ``scipy.linalg.svdvals``).

        ``tol`` is an absolute threshold, ``rtol`` one relative to the largest singular value;
        give at most one. Default: ``rtol = max(shape) * eps`` of the values' dtype (NumPy's
        ``matrix_rank`` convention: below that, a singular value cannot be told apart from the
        rounding error of computing it).
        """
        s = np.asarray(to_numpy(singular_values))
        if s.ndim != 1 or s.size == 0:
            raise ValueError(f"singular_values must be a non-empty 1-D array, got shape {s.shape}")
        if dtype_name(s.dtype) not in ("float32", "float64"):
            raise TypeError(f"singular_values must be float32 or float64, got {dtype_name(s.dtype)}")
        if not np.all(np.isfinite(s)) or np.any(s < 0) or np.any(np.diff(s) > 0):
            raise ValueError("singular_values must be finite, non-negative and in descending order, "
                             f"got {s!r}")
        if not isinstance(shape, tuple) or len(shape) != 2 or not all(is_int(n) and n >= 1 for n in shape):
            raise ValueError(f"shape must be (d_out, d_in), two positive ints, got {shape!r}")
        if s.size > min(shape):
            raise ValueError(f"a {shape} matrix has at most {min(shape)} singular values, got {s.size}")
        if tol is not None and rtol is not None:
            raise ValueError(f"give tol or rtol, not both (got tol={tol!r}, rtol={rtol!r})")
        top = float(s[0])
        if tol is None:
            rtol = max(shape) * float(np.finfo(s.dtype).eps) if rtol is None else non_negative_real(rtol, "rtol")
            tol = rtol * top
        else:
            tol = non_negative_real(tol, "tol")
        s64 = s.astype(np.float64)
        if top == 0.0:
            erank = srank = 0.0
            energy = np.full(s.shape, np.nan)
        else:
            p = s64 / np.sum(s64)                                    # normalised singular values
            p = p[p > 0]
            erank = float(np.exp(-np.sum(p * np.log(p))))            # exp(Shannon entropy)
            sq = (s64 / top) ** 2                                    # scaled: no overflow
            srank = float(np.sum(sq))                                # |M|_F^2 / |M|_2^2
            energy = np.cumsum(sq) / np.sum(sq)
            energy[-1] = 1.0                                          # exact by definition
        return cls(singular_values=s, shape=(int(shape[0]), int(shape[1])), tol=float(tol),
                   numerical_rank=int(np.count_nonzero(s > tol)), effective_rank=erank,
                   stable_rank=srank, energy=energy)

    def energy_at(self, k: int) -> float:
        """Fraction of ``|M|_F^2`` in the top ``k`` singular values (1.0 once k covers them all)."""
        k = positive_int(k, "k", "a count of singular values")
        return float(self.energy[min(k, self.energy.size) - 1])

    def to_dict(self, top: int | None = None) -> dict[str, Any]:
        """Plain-Python summary (JSON-ready); ``top`` limits how many singular values are listed."""
        values = self.singular_values if top is None else self.singular_values[:top]
        return {"shape": list(self.shape), "singular_values": [float(v) for v in values],
                "numerical_rank": self.numerical_rank, "tol": self.tol,
                "effective_rank": self.effective_rank, "stable_rank": self.stable_rank,
                "energy": [float(e) for e in self.energy[:len(values)]]}


def spectrum(A: Any, B: Any, scale: float = 1.0, *, tol: float | None = None,
             rtol: float | None = None) -> Spectrum:
    """Singular-value summary of the update ``dW = s B A`` (A (r, d_in), B (d_out, r)).

    * ``energy_at(k)`` = ``sum_{i<=k} sigma_i^2 / sum_i sigma_i^2``: how much of ``|dW|_F^2`` the
      best rank-k approximation keeps (Eckart-Young).
    * ``effective_rank`` = ``exp(-sum_i p_i log p_i)`` with ``p_i = sigma_i / sum_l sigma_l``
      (Roy & Vetterli, "The effective rank", EUSIPCO 2007): between 1 and k, equal to k
      when all nonzero singular values are equal.
    * ``stable_rank`` = ``|dW|_F^2 / |dW|_2^2``: at most the rank, insensitive to tiny values.
    * ``numerical_rank`` = how many singular values exceed ``tol`` (default: ``rtol *
      sigma_1`` with ``rtol = max(d_out, d_in) * eps``, NumPy's ``matrix_rank`` convention).
    """
    A, B = _factors(A, B)
    svd = _delta_svd(A, B, finite_real(scale, "scale"))
    return Spectrum.from_singular_values(svd.S, (B.shape[0], A.shape[1]), tol=tol, rtol=rtol)


# ============================================================================================
# Subspace similarity between two A matrices (Section 7.2, Eq. 4; Appendix G)
# ============================================================================================


def _row_space(A: np.ndarray) -> tuple[np.ndarray, int]:
    """Right singular vectors of A (r, d_in) as rows (m, d_in), m = min(r, d_in), and A's
    numerical rank (NumPy's matrix_rank tolerance): beyond it the directions are arbitrary."""
    _, S, Vh = scipy.linalg.svd(A, full_matrices=False, check_finite=False)   # (m,), (m, d_in)
    rank = int(np.count_nonzero(S > max(A.shape) * float(np.finfo(A.dtype).eps) * S[0]))
    return Vh, rank


def _overlap(A1: Any, A2: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """Validate A1 (r1, d_in) and A2 (r2, d_in); return them, ``C[i-1, j-1] = |U1_i^T U2_j|_F^2``
    for all i, j (2-D prefix sums of G^2), and their numerical ranks."""
    A1 = _matrix(A1, "A1", "(r1, d_in)")
    A2 = _matrix(A2, "A2", "(r2, d_in)")
    if A1.shape[1] != A2.shape[1]:
        raise ValueError(f"A1 and A2 must have the same d_in (columns) to compare their row spaces: "
                         f"A1 has d_in={A1.shape[1]} (shape {A1.shape}), A2 has d_in={A2.shape[1]} (shape {A2.shape})")
    same_dtype(("A1", A1), ("A2", A2))
    V1, rank1 = _row_space(A1)                                  # (m1, d_in)
    V2, rank2 = _row_space(A2)                                  # (m2, d_in)
    G = V1 @ V2.T                                               # (m1, m2)  cosines' matrix U1^T U2
    C = np.cumsum(np.cumsum(G.astype(np.float64) ** 2, axis=0), axis=1)  # (m1, m2)
    return A1, A2, C, rank1, rank2


def _check_ij(i: Any, j: Any, A1: np.ndarray, A2: np.ndarray, rank1: int, rank2: int) -> tuple[int, int]:
    i = int_in_range(i, "i", 1, min(A1.shape), f"A1 {A1.shape} has min(r1, d_in)={min(A1.shape)} right singular vectors")
    j = int_in_range(j, "j", 1, min(A2.shape), f"A2 {A2.shape} has min(r2, d_in)={min(A2.shape)} right singular vectors")
    for name, n, rank, arr in (("i", i, rank1, "A1"), ("j", j, rank2, "A2")):
        if n > rank:
            raise ValueError(f"{name}={n} exceeds the numerical rank {rank} of {arr}: its top-{n} right "
                             f"singular subspace is not determined by {arr} (directions beyond the rank are arbitrary)")
    return i, j


def subspace_similarity(A1: Any, A2: Any, i: int, j: int) -> float:
    """Eq. 4: ``phi(A1, A2, i, j) = |U1_i^T U2_j|_F^2 / min(i, j)``, a number in [0, 1].

    Parameters
    ----------
    A1 : array (r1, d_in)
    A2 : array (r2, d_in)
    i, j : int
        How many top right singular vectors of A1 and A2 to compare; ``1 <= i <= min(r1, d_in)``
        and i at most A1's numerical rank (likewise j for A2).

    ``U1_i`` (d_in, i) holds the top-i **right** singular vectors of A1, an orthonormal basis of
    the i-dimensional subspace of A1's row space that A1 stretches most (see the module docstring
    for why right, not left). phi is the mean squared cosine of the ``min(i, j)`` principal angles
    between the two subspaces: 1 when one contains the other, 0 when they are orthogonal, and
    ``max(i, j) / d_in`` on average for random subspaces. Rounding can push the computed value a
    few ulps outside [0, 1]; it is clipped back.
    """
    A1, A2, C, rank1, rank2 = _overlap(A1, A2)
    i, j = _check_ij(i, j, A1, A2, rank1, rank2)
    return float(np.clip(C[i - 1, j - 1] / min(i, j), 0.0, 1.0))


def similarity_grid(A1: Any, A2: Any) -> np.ndarray:
    """``phi(A1, A2, i, j)`` for every i and j (the paper's Figure 3), shape (m1, m2) float64.

    ``grid[i-1, j-1] = phi(A1, A2, i, j)`` with ``m1 = min(r1, d_in)``, ``m2 = min(r2, d_in)``.
    Rows (columns) beyond A1's (A2's) numerical rank are NaN: those subspaces are not determined.
    Costs two small SVDs and an (m1, m2) product, however many entries.
    """
    A1, A2, C, rank1, rank2 = _overlap(A1, A2)
    m1, m2 = C.shape
    p = np.minimum.outer(np.arange(1, m1 + 1), np.arange(1, m2 + 1))         # (m1, m2) min(i, j)
    grid = np.clip(C / p, 0.0, 1.0)
    grid[rank1:, :] = np.nan
    grid[:, rank2:] = np.nan
    return grid


def projection_distance(A1: Any, A2: Any, i: int, j: int) -> float:
    """Projection (chordal) distance between A1's top-i and A2's top-j right singular subspaces.

    ``d = sqrt(sum_{k<=p} sin^2 theta_k) = sqrt(p - |U1_i^T U2_j|_F^2)``, p = min(i, j), over the
    p principal angles theta_k; for i = j it equals ``|P1 - P2|_F / sqrt(2)`` with P the
    orthogonal projectors (Ham & Lee 2008's projection distance on the Grassmannian). Between 0
    and sqrt(p), and ``phi(A1, A2, i, j) = 1 - d^2 / p`` (the paper's Appendix G, with its
    ``(1/p)(1 - d^2)`` misprint corrected). Arguments as for :func:`subspace_similarity`.
    """
    A1, A2, C, rank1, rank2 = _overlap(A1, A2)
    i, j = _check_ij(i, j, A1, A2, rank1, rank2)
    p = min(i, j)
    return math.sqrt(min(max(p - float(C[i - 1, j - 1]), 0.0), float(p)))


# ============================================================================================
# Amplification (Section 7.3, Table 7)
# ============================================================================================


def _weight_and_delta(W: Any, A: Any, B: Any, scale: Any, k: Any) -> tuple[np.ndarray, DeltaSVD, int]:
    A, B = _factors(A, B)
    W = _matrix(W, "W", "(d_out, d_in)")
    if W.shape != (B.shape[0], A.shape[1]):
        raise ValueError(f"W must be (d_out, d_in) = ({B.shape[0]}, {A.shape[1]}) to match B {B.shape} "
                         f"and A {A.shape}, got shape {W.shape}")
    same_dtype(("W", W), ("A", A), ("B", B))
    svd = _delta_svd(A, B, finite_real(scale, "scale"))
    rank = Spectrum.from_singular_values(svd.S, W.shape).numerical_rank
    if rank == 0:
        raise ValueError("the update s B A is zero (e.g. B = 0 at initialisation, or scale = 0): "
                         "it has no directions to amplify")
    if k is None:
        k = rank
    k = int_in_range(k, "k", 1, rank, f"the numerical rank of s B A is {rank}")
    return W, svd, k


def _project(W: np.ndarray, U: np.ndarray, V: np.ndarray) -> float:
    """``|U^T W V|_F`` for U (d_out, k), V (d_in, k)."""
    return float(np.linalg.norm((U.T @ W) @ V))                                # (k, k)


def amplification_factor(W: Any, A: Any, B: Any, scale: float = 1.0, *, k: int | None = None) -> float:
    """Section 7.3: ``|dW|_F / |U^T W V|_F``, how much LoRA amplifies the directions it adapts.

    Parameters
    ----------
    W : array (d_out, d_in)    the frozen pretrained weight (a fused projection: pass the rows
                               of the block the adapter belongs to)
    A : array (r, d_in)
    B : array (d_out, r)
    scale : float              s, so that dW = s B A
    k : int, optional          how many top singular directions of dW to use (U (d_out, k),
                               V (d_in, k)); default and maximum: dW's numerical rank (= r for a
                               trained adapter; directions beyond the rank are not determined)

    ``|U^T W V|_F`` is how much of W lies in the subspace that dW uses; the paper (Table 7,
    GPT-3 layer 48, W_q) finds 0.32 against ``|dW|_F = 6.91`` for r = 4: a factor of about 21.5.
    Returns ``math.inf`` when W has no component there. Raises ``ValueError`` when dW is zero.
    """
    W, svd, k = _weight_and_delta(W, A, B, scale, k)
    projected = _project(W, svd.U[:, :k], svd.Vh[:k, :].T)
    norm_delta = float(np.linalg.norm(svd.S.astype(np.float64)))               # |dW|_F
    return norm_delta / projected if projected > 0.0 else math.inf


@dataclass(frozen=True, eq=False)
class AmplificationReport:
    """Section 7.3 / Table 7 for one adapted weight (see :func:`amplification_report`).

    Attributes
    ----------
    k : int                     directions used
    weight_norm : float         |W|_F
    delta_norm : float          |dW|_F
    factor : float              delta_norm / proj_delta
    proj_delta : float          |U^T W V|_F, U, V the top-k singular directions of dW
    proj_weight : float         the same with W's own top-k directions = sqrt(sum_{i<=k} sigma_i(W)^2)
    proj_random : ndarray       the same with n_random draws of random orthonormal U, V
    proj_random_rms : float     sqrt(mean(proj_random^2))
    proj_random_expected : float  sqrt(E|U^T W V|_F^2) = (k / sqrt(d_out d_in)) |W|_F, exact
    """

    k: int
    weight_norm: float
    delta_norm: float
    factor: float
    proj_delta: float
    proj_weight: float
    proj_random: np.ndarray = field(repr=False)
    proj_random_rms: float
    proj_random_expected: float

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python summary (JSON-ready)."""
        out = {name: getattr(self, name) for name in self.__dataclass_fields__ if name != "proj_random"}
        out["proj_random"] = [float(v) for v in self.proj_random]
        return out


def expected_random_projection(weight_norm: float, d_out: int, d_in: int, k: int) -> float:
    """``sqrt(E |U^T W V|_F^2) = (k / sqrt(d_out d_in)) |W|_F`` for uniformly random k-frames.

    U (d_out, k) and V (d_in, k) independent, uniformly distributed orthonormal frames:
    ``E[U U^T] = (k / d_out) I`` by rotation invariance, so
    ``E |U^T W V|_F^2 = tr(E[U U^T] W E[V V^T] W^T) = (k / d_out)(k / d_in) |W|_F^2``.
    Only ``|W|_F`` matters. For square W, ``(k / d) |W|_F``: with Table 7's ``|W_q|_F = 61.95``
    and d = 12288 that is 0.0202 for k = 4 (printed 0.02) and 0.3227 for k = 64 (printed 0.33,
    a random draw; see docs/analysis.md).
    """
    weight_norm = non_negative_real(weight_norm, "weight_norm")            # a Frobenius norm
    d_out = positive_int(d_out, "d_out", "rows of W")
    d_in = positive_int(d_in, "d_in", "columns of W")
    k = int_in_range(k, "k", 1, min(d_out, d_in), f"a k-frame needs k <= min(d_out, d_in) = {min(d_out, d_in)}")
    return k / math.sqrt(d_out * d_in) * weight_norm


def _random_orthonormal(rng: np.random.Generator, n: int, d: int, k: int, dtype: np.dtype) -> np.ndarray:
    """n independent uniformly distributed k-frames in R^d, shape (n, d, k).

    The column span of a Gaussian (d, k) matrix is uniform on the Grassmannian (rotation
    invariance); QR gives an orthonormal basis of that span.
    """
    G = rng.standard_normal((n, d, k))                                        # (n, d, k)
    Q, _ = np.linalg.qr(G)                                                    # (n, d, k)
    return Q.astype(dtype)


def amplification_report(W: Any, A: Any, B: Any, scale: float = 1.0, *, rng: np.random.Generator,
                         k: int | None = None, n_random: int = 100) -> AmplificationReport:
    """:func:`amplification_factor` with the paper's Table 7 comparisons.

    Projects W onto three pairs of k-dimensional subspaces and reports ``|U^T W V|_F`` for each:
    dW's own top-k singular directions (Table 7's "dW_q" column), W's top-k directions
    ("W_q"; equal to ``sqrt(sigma_1^2 + ... + sigma_k^2)`` of W, so computed from W's singular
    values), and ``n_random`` draws of uniformly random orthonormal directions ("Random"),
    whose root mean square has the exact expectation :func:`expected_random_projection` derives.
    Randomness only from ``rng``. The dense singular values of W cost O(d_out d_in min(d_out, d_in)).
    """
    W, svd, k = _weight_and_delta(W, A, B, scale, k)
    numpy_generator(rng, "rng")
    n_random = positive_int(n_random, "n_random", "a number of random draws")
    d_out, d_in = W.shape
    weight_norm = float(np.linalg.norm(W.astype(np.float64)))
    delta_norm = float(np.linalg.norm(svd.S.astype(np.float64)))
    proj_delta = _project(W, svd.U[:, :k], svd.Vh[:k, :].T)
    sigma_W = scipy.linalg.svdvals(W, check_finite=False).astype(np.float64)
    proj_weight = float(np.linalg.norm(sigma_W[:k]))
    chunk = max(1, min(n_random, (1 << 24) // max(1, k * (d_out + d_in))))   # bound the memory used
    draws = []
    for start in range(0, n_random, chunk):
        n = min(chunk, n_random - start)
        U = _random_orthonormal(rng, n, d_out, k, W.dtype)                    # (n, d_out, k)
        V = _random_orthonormal(rng, n, d_in, k, W.dtype)                     # (n, d_in, k)
        P = np.swapaxes(U, -1, -2) @ W @ V                                    # (n, k, k)
        draws.append(np.linalg.norm(P.astype(np.float64), axis=(-2, -1)))     # (n,)
    proj_random = np.concatenate(draws)
    return AmplificationReport(
        k=k, weight_norm=weight_norm, delta_norm=delta_norm,
        factor=delta_norm / proj_delta if proj_delta > 0.0 else math.inf,
        proj_delta=proj_delta, proj_weight=proj_weight, proj_random=proj_random,
        proj_random_rms=float(np.sqrt(np.mean(proj_random ** 2))),
        proj_random_expected=expected_random_projection(weight_norm, d_out, d_in, k))


# ============================================================================================
# Plots (matplotlib, the optional extra "plots"; imported only when a plot is asked for)
# ============================================================================================


def _figure_module() -> Any:
    try:
        import matplotlib.figure
    except ImportError as exc:
        raise ImportError("lora_ref.analysis plots need matplotlib, which is not installed: "
                          "pip install 'lora-ref[plots]'") from exc
    return matplotlib.figure


def _figure_and_axes(ax: Any) -> tuple[Any, Any]:
    module = _figure_module()
    if ax is None:
        fig = module.Figure(figsize=(5.0, 3.6), layout="constrained")
        return fig, fig.add_subplot()
    if not hasattr(ax, "figure") or not hasattr(ax, "plot"):
        raise TypeError(f"ax must be a matplotlib Axes, got {type(ax).__name__}")
    return ax.figure, ax


def _save(fig: Any, path: Any) -> None:
    if path is None:
        return
    if not isinstance(path, (str, Path)):
        raise TypeError(f"path must be a str or pathlib.Path, got {type(path).__name__}")
    path = Path(path)
    fig.savefig(path, format=path.suffix[1:] if path.suffix else "png", dpi=120)


def plot_spectrum(values: Any, *, ax: Any = None, path: Any = None, label: str | None = None,
                  log: bool = True, title: str | None = None) -> Any:
    """Plot singular values sigma_i against i = 1, 2, ...; return the matplotlib Figure.

    ``values``: a :class:`Spectrum`, a :class:`DeltaSVD`, or a 1-D array of singular values.
    ``ax``: draw into these Axes (e.g. to overlay several adapters, each with a ``label``);
    otherwise a new Figure is made (not registered with pyplot: save it, or pass an ``ax`` from
    ``plt.subplots()`` to show it interactively). ``path``: also save the figure there (PNG
    unless the suffix names another format). ``log``: logarithmic y axis (zeros are not drawn).
    """
    if isinstance(values, Spectrum):
        s = values.singular_values
    elif isinstance(values, DeltaSVD):
        s = values.S
    else:
        s = np.asarray(to_numpy(getval(values)))
    if s.ndim != 1 or s.size == 0:
        raise ValueError(f"values must be a Spectrum, a DeltaSVD or a non-empty 1-D array, got shape {s.shape}")
    fig, ax = _figure_and_axes(ax)
    ax.plot(np.arange(1, s.size + 1), s.astype(np.float64), marker="o", label=label)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("index i")
    ax.set_ylabel("singular value $\\sigma_i$")
    if title:
        ax.set_title(title)
    if label:
        ax.legend()
    _save(fig, path)
    return fig


def plot_similarity(grid: Any, *, ax: Any = None, path: Any = None, title: str | None = None,
                    xlabel: str = "j", ylabel: str = "i", cmap: str = "viridis") -> Any:
    """Heatmap of a :func:`similarity_grid` (the paper's Figure 3); return the matplotlib Figure.

    Cell (i, j), 1-based, shows ``phi(A1, A2, i, j)`` on a fixed 0..1 colour scale, i down the
    rows as in the paper. NaN cells (beyond an A's rank) are left blank. ``ax`` and ``path`` as
    for :func:`plot_spectrum`.
    """
    g = np.asarray(to_numpy(getval(grid)), dtype=np.float64)
    if g.ndim != 2 or g.size == 0:
        raise ValueError(f"grid must be a non-empty 2-D array (m1, m2), got shape {g.shape}")
    fig, ax = _figure_and_axes(ax)
    image = ax.imshow(g, vmin=0.0, vmax=1.0, cmap=cmap, origin="upper", interpolation="nearest",
                      extent=(0.5, g.shape[1] + 0.5, g.shape[0] + 0.5, 0.5), aspect="auto")
    fig.colorbar(image, ax=ax, label="$\\phi$")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    _save(fig, path)
    return fig
