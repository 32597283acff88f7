"""The oracle kit: tolerances, error bounds and assertions for testing a LoRA implementation.

Tolerances
----------
Every tolerance in lora-ref (its own tests included) comes from :func:`tolerance`, derived from
the dtype's unit roundoff ``u = eps / 2`` by the standard rounding-error analysis (Higham,
*Accuracy and Stability of Numerical Algorithms*, 2nd ed., Lemma 3.1 and Section 3.5):

* a chain of ``n`` roundings (a dot product of length n, a sum of n terms) has relative error
  at most ``gamma_n = n u / (1 - n u)``, *relative to the sum of absolute values* of the terms;
* so two computations of the same quantity that each take at most ``n`` roundings differ by at
  most ``2 gamma_n * M``, where ``M`` is the value computed with every term replaced by its
  absolute value (:func:`lora_linear_magnitude` computes M for the LoRA layer).

These bounds are rigorous (any summation order, with or without FMA), so a test that uses them
never fails spuriously; and they are far below the size of any real mistake (a wrong scale, a
forgotten transpose), so they still catch those.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .backend import dtype_name, to_numpy

__all__ = [
    "assert_within",
    "lora_linear_magnitude",
    "tolerance",
    "unit_roundoff",
]


def unit_roundoff(dtype: Any) -> float:
    """``u = eps / 2``: the largest relative error of one correctly rounded operation.

    float64: 1.11e-16; float32: 5.96e-08; float16: 4.88e-04.
    """
    return float(np.finfo(np.dtype(dtype_name(dtype))).eps) / 2.0


def tolerance(dtype: Any, n: int = 1) -> float:
    """``gamma_n = n u / (1 - n u)``: the relative error bound of ``n`` chained roundings in ``dtype``.

    Multiply by the magnitude of the computation (the same expression evaluated on absolute
    values) to get an absolute bound; double it to compare two independent computations.
    Raises ``ValueError`` when ``n u >= 1`` (no bound exists: the dtype is too coarse for ``n``).
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    u = unit_roundoff(dtype)
    if n * u >= 1.0:
        raise ValueError(f"n={n} roundings in {dtype_name(dtype)} (u={u:.3g}) admit no error bound: n*u >= 1")
    return n * u / (1.0 - n * u)


def lora_linear_magnitude(x: Any, W: Any, A: Any = None, B: Any = None, scale: float = 1.0,
                          bias: Any = None, dropout_mask: Any = None) -> np.ndarray:
    """``M = |x| |W|^T + |bias| + |s| (|x * mask| |A|^T) |B|^T`` in float64, shape (..., d_out).

    The magnitude against which rounding errors of :func:`lora_ref.lora_linear` (either
    evaluation order, merged or not) are measured. For a fused ``enable_lora`` adapter pass the
    dense ``delta_weight`` instead, as ``A=delta, B=identity`` is not needed: use ``W + |dW|``.
    """
    x, W = (np.abs(to_numpy(t).astype(np.float64)) for t in (x, W))
    M = x @ W.T
    if bias is not None:
        M = M + np.abs(to_numpy(bias).astype(np.float64))
    if A is not None:
        xd = x if dropout_mask is None else x * np.abs(to_numpy(dropout_mask).astype(np.float64))
        A_, B_ = (np.abs(to_numpy(t).astype(np.float64)) for t in (A, B))
        M = M + abs(scale) * ((xd @ A_.T) @ B_.T)
    return M


def assert_within(actual: Any, expected: Any, bound: Any, *, what: str = "value") -> float:
    """Assert ``|actual - expected| <= bound`` elementwise; return the largest ``error / bound``.

    ``bound`` is a scalar or an array broadcastable to the values (typically
    ``2 * tolerance(dtype, n) * magnitude``). Shapes must match exactly. On failure the
    message names ``what``, the worst entry, its error and its bound.
    """
    a = to_numpy(actual).astype(np.float64)
    e = to_numpy(expected).astype(np.float64)
    if a.shape != e.shape:
        raise AssertionError(f"{what}: shape {a.shape} differs from expected {e.shape}")
    if not np.all(np.isfinite(a) == np.isfinite(e)):
        raise AssertionError(f"{what}: non-finite values differ from expected")
    err = np.abs(a - e)
    err = np.where(np.isfinite(e), err, 0.0)
    bound = np.broadcast_to(np.asarray(bound, dtype=np.float64), err.shape)
    # Where the bound is exactly zero, only exact equality passes.
    ratio = np.where(bound > 0, err / np.where(bound > 0, bound, 1.0), np.where(err > 0, np.inf, 0.0))
    worst = float(ratio.max()) if ratio.size else 0.0
    if worst > 1.0:
        idx = np.unravel_index(int(np.argmax(ratio)), ratio.shape)
        raise AssertionError(
            f"{what}: |actual - expected| exceeds its bound at index {tuple(int(i) for i in idx)}: "
            f"error {err[idx]:.3e} > bound {bound[idx]:.3e} (actual {a[idx]!r}, expected {e[idx]!r}); "
            f"max error {err.max():.3e}")
    return worst
