"""DoRA, the math: weight-decomposed low-rank adaptation, clean, minimal, reference.

Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", arXiv 2402.09353 (ICML 2024).
Read top to bottom: Section 4.1 (Eq. 2 and 5), Section 4.2 (the gradients, Eq. 6 and 7),
Section 4.3 (the norm treated as a constant), then merging.

Layout (PEFT's, the same as :mod:`lora_ref.lora`)::

    W  (d_out, d_in)    frozen pretrained weight, y = x @ W.T + bias
    A  (r, d_in)        LoRA down-projection;  B (d_out, r) up-projection
    m  (d_out,)         magnitude, one per output feature (PEFT's ``lora_magnitude_vector``)
    x  (..., d_in)      any leading (batch, token) dimensions; N = their product
    s                   scale: alpha / r, or alpha / sqrt(r) with rsLoRA
    M                   dropout mask, broadcastable to x (entries 0 or 1/(1-p)); xd = x * M

The paper writes a weight (d, k) acting as ``x W`` and its norm ``||.||_c`` "across each column":
one norm per *output* feature. In the (d_out, d_in) layout that is the norm of each ROW, over the
input axis: ``||V||_c[i] = sqrt(sum_j V_ij^2)``, shape (d_out,). (LyCORIS/kohya's ``dora_scale``
normalises over the other axis, one value per input feature: a different, incompatible adapter.)
GPT-2's Conv1D stores W as (d_in, d_out) (``fan_in_fan_out=True``); the norm is still per output
feature, i.e. over axis 0 of the stored array.

Eq. 2    W = m V / ||V||_c = ||W||_c W / ||W||_c           magnitude times direction
Eq. 5    W' = m (W0 + s B A) / ||W0 + s B A||_c            DoRA: LoRA moves the direction only

with m trained and initialised to ``||W0 + s B A||_c`` (:func:`dora_magnitude`), so that W' starts
equal to the LoRA weight ``W0 + s B A`` (to W0 itself when B = 0). Writing ``V = W0 + s B A``,
``C = ||V||_c`` and ``f = m / C`` (d_out,), the layer without dropout is Eq. 5 applied to x::

    y = f * (x V^T) + bias                                  (Eq. 5)

With dropout, PEFT applies the mask to the adapter's input only and keeps the outer base term
on the clean input: ``y = x W^T + bias + (f - 1) * (xd W^T) + f * s (xd A^T) B^T``. Since
``xd W^T + s (xd A^T) B^T = xd V^T`` this is::

    y = f * (xd V^T) + (x - xd) W^T + bias                  (Eq. 5 with PEFT's dropout)

the kept part of x sees the DoRA weight, the dropped part sees the frozen W0. Without dropout
(``xd = x``) it is Eq. 5 exactly. This is one adapter on one layer; PEFT with several active
adapters rescales whatever precedes a DoRA adapter (docs/dora.md).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from autograd.extend import defvjp, primitive

from .backend import getval, namespace, to_numpy
from .checks import boolean, broadcastable_mask, finite_real, float_array, same_dtype, shape_of

__all__ = [
    "dora_linear",
    "dora_magnitude",
    "dora_magnitudes",
    "dora_merge",
    "dora_rounding_counts",
    "dora_unmerge",
]

# ============================================================================================
# Section 4.1: the decomposition (Eq. 2) and its norm
# ============================================================================================


def _row_norm(V: Any) -> Any:
    """``||V||_c``: the Euclidean norm of each row of V, (d_out, d_in) -> (d_out,).

    Each row is divided by its largest magnitude t before squaring, so that
    ``t * sqrt(sum((V / t)^2))`` neither overflows (rows near 1e154 in float64, 1e19 in float32,
    would square to inf) nor underflows (rows near 1e-162 / 1e-23 would square to 0). The largest
    scaled entry is 1, so the sum lies in [1, d_in]. A row of zeros has no direction: refused.
    """
    xp = namespace(V)
    t = xp.max(xp.abs(V), axis=-1)                             # (d_out,) largest |V_ij| per row
    raw = getval(t)
    zero = raw == 0.0
    if bool(namespace(raw).any(zero)):
        rows = [int(i) for i in np.flatnonzero(to_numpy(zero))]
        raise ValueError(
            f"row(s) {rows[:5]} of W + s B A are all zero: the direction V / ||V|| is undefined there "
            "(DoRA needs every output feature's adapted weight row to be nonzero)")
    u = V / xp.reshape(t, (-1, 1))                             # (d_out, d_in), |u| <= 1
    return t * xp.sqrt(xp.sum(u * u, axis=-1))                # (d_out,)


def _adapted(W: Any, A: Any, B: Any, scale: float) -> Any:
    """``V = W0 + s B A`` (d_out, d_in): Eq. 5's numerator, the LoRA-adapted weight."""
    return W + (B @ A) * scale


def dora_magnitude(W: Any, A: Any, B: Any, scale: float, *, fan_in_fan_out: bool = False) -> Any:
    """``||W + s B A||_c``, shape (d_out,): the initial magnitude m (Section 4.1), PEFT's axis.

    This is what PEFT stores in ``lora_magnitude_vector`` when the adapter is created (it equals
    ``||W||_c`` when B = 0, and includes ``s B A`` when both A and B are random), and it is also
    the norm PEFT caches when it merges (see :func:`dora_unmerge`). W is (d_out, d_in), or
    (d_in, d_out) with ``fan_in_fan_out=True`` (GPT-2's Conv1D): the norm is per output feature
    either way. Computed without overflow or underflow; raises ``ValueError`` on a zero row.
    """
    W_math, scale = _check_weights(W, A, B, None, scale, fan_in_fan_out)
    return _row_norm(_adapted(W_math, A, B, scale))


# ============================================================================================
# The forward pass (Eq. 5) and its gradients (Eq. 6, 7; Section 4.3)
# ============================================================================================


def _factor(W: Any, A: Any, B: Any, m: Any, scale: float, detach_norm: bool) -> tuple[Any, Any, Any]:
    """``(V, C, f)``: the adapted weight (d_out, d_in), its row norms and ``f = m / C`` (d_out,).

    The VJPs get the caller's arguments unconverted, so ``scale`` becomes a Python float here too.

    With ``detach_norm`` the norm is computed from the raw values under any autograd box, so a
    trace of the forward treats C as a constant: exactly Section 4.3's "detaching it from the
    gradient graph". Without it, autograd differentiates through the norm (Eq. 6).
    """
    V = _adapted(W, A, B, finite_real(scale, "scale"))         # (d_out, d_in)  Eq. 5 numerator
    C = _row_norm(getval(V) if detach_norm else V)             # (d_out,)       ||V||_c
    return V, C, m / C                                         # f = m / ||V||_c


def _dora_linear(x: Any, W: Any, A: Any, B: Any, m: Any, scale: float, bias: Any = None,
                 dropout_mask: Any = None, detach_norm: bool = True) -> Any:
    """The undecorated forward (see :func:`dora_linear`); autograd.numpy can trace it."""
    scale, detach_norm = _check_linear(x, W, A, B, m, scale, bias, dropout_mask, detach_norm)
    xp = namespace(x, W, A, B, m, bias, dropout_mask)
    V, C, f = _factor(W, A, B, m, scale, detach_norm)
    xd = x if dropout_mask is None else x * dropout_mask      # (..., d_in) dropout, adapter input only
    y = (xd @ xp.matrix_transpose(V)) * f                      # (..., d_out)  Eq. 5: f * (xd V^T)
    if dropout_mask is not None:
        y = y + (x - xd) @ xp.matrix_transpose(W)              # the dropped part of x sees W0 only
    return y if bias is None else y + bias


dora_linear = primitive(_dora_linear)
dora_linear.__doc__ = """DoRA's adapted linear layer, Eq. 5 with PEFT's dropout semantics.

    ``y = f * (xd V^T) + (x - xd) W^T + bias`` with ``V = W + s B A``, ``f = m / ||V||_c``,
    ``xd = x * dropout_mask``; without a mask, ``y = x (f * V)^T + bias`` (Eq. 5). The same
    number as PEFT's ``x W^T + bias + (f - 1) (xd W^T) + f s (xd A^T) B^T``.

    Parameters
    ----------
    x : array (..., d_in)
    W : array (d_out, d_in)          frozen base weight (differentiated only if traced)
    A : array (r, d_in);  B : array (d_out, r)
    m : array (d_out,)               magnitude (PEFT's ``lora_magnitude_vector``)
    scale : float                    s, a Python number (NumPy scalars are converted)
    bias : array (d_out,), optional
    dropout_mask : array broadcastable to x, optional
        Inverted-dropout mask (see :func:`lora_ref.dropout_mask`) on the adapter's input.
    detach_norm : bool
        True (default, PEFT's): ``||V||_c`` is a constant in the backward pass (Section 4.3).
        False: the exact gradient through the norm (Eq. 6).

    Returns
    -------
    y : array (..., d_out), same dtype as x.

    An autograd primitive: the gradients for x, W, A, B, m and bias are the hand-written VJPs
    below (autograd asks only for those of traced arguments; pass those positionally). All
    arrays share one floating dtype. Raises ``ValueError`` if a row of ``W + s B A`` is zero.
    """


# Gradients. G = dL/dy flattened to (N, d_out), X and Xd = X * M flattened to (N, d_in), V, C, f
# as in the forward (f broadcast over the N rows of G, and over the d_in columns of V).
#
#   (g1) E      = G^T Xd                                           (d_out, d_in)  grad_W' L (kept part)
#   (g2) phi    = sum_j E_ij V_ij                                  (d_out,)       E_i . V_i
#   (g3) dL/dm  = phi / C                                          (d_out,)   Eq. 7
#   (g4) dL/dV  = f E                       (detach_norm, Section 4.3: C is a constant)
#               = f (E - (phi / C^2) V)     (exact, Eq. 6: (m/C)(I - V V^T / C^2) E, row by row)
#   (g5) dL/dA  = s B^T dL/dV                                      (r, d_in)     V = W + s B A
#   (g6) dL/dB  = s dL/dV A^T                                      (d_out, r)
#   (g7) dL/dW  = dL/dV + G^T (X - Xd)      (only when W is trained; no second term without dropout)
#   (g8) dL/dx  = (G f) V * M + (G W) * (1 - M)    (= (G f) V without dropout; C does not depend on x)
#   (g9) dL/dbias = sum over N of G
#
# Derivation. y_ni = f_i (Xd V^T)_ni + ((X - Xd) W^T)_ni + b_i. Holding f fixed, y is linear in
# V, X, W, b, giving (g4, first line), (g7), (g8), (g9) by the usual matmul rules. f enters as
# dL/df_i = sum_n G_ni (Xd V^T)_ni = sum_j (G^T Xd)_ij V_ij = phi_i. With f_i = m_i / C_i:
# df_i/dm_i = 1 / C_i gives (g3), and dC_i/dV_ij = V_ij / C_i gives df_i/dV_ij = -m_i V_ij / C_i^3,
# so the norm contributes -phi_i m_i V_ij / C_i^3 = -f_i (phi_i / C_i^2) V_ij, the projection term
# of (g4, second line). Section 4.3 drops exactly that term. Without dropout (Xd = X), E is
# the paper's grad_W' L and (g4) is Eq. 6; the exact dL/dV is then orthogonal to each row of V
# (y is unchanged when V_i is scaled), which the tests check. phi / C^2 is formed as
# (phi / C) / C so that C near 1e200 does not overflow.


def _flat(t: Any) -> Any:
    """(..., n) -> (N, n): fold the leading dimensions into one."""
    return namespace(t).reshape(t, (-1, t.shape[-1]))


def _kept(x: Any, dropout_mask: Any) -> Any:
    """Xd = x * M flattened to (N, d_in), with the mask broadcast to x's shape first."""
    return _flat(x if dropout_mask is None else x * dropout_mask)


def _grad_V(g, x, W, A, B, m, scale, dropout_mask, detach_norm):
    """(dL/dV, dL/dm): (g1)-(g4) for upstream g (..., d_out)."""
    xp = namespace(g)
    V, C, f = _factor(W, A, B, m, scale, detach_norm)
    E = xp.matrix_transpose(_flat(g)) @ _kept(x, dropout_mask)    # (g1) (d_out, d_in)
    phi = xp.sum(E * V, axis=-1)                                   # (g2) (d_out,)
    dm = phi / C                                                   # (g3) Eq. 7
    if detach_norm:
        return E * xp.reshape(f, (-1, 1)), dm                      # (g4) Section 4.3
    proj = xp.reshape(dm / C, (-1, 1)) * V                         # (phi / C^2) V, (d_out, d_in)
    return (E - proj) * xp.reshape(f, (-1, 1)), dm                 # (g4) Eq. 6


def _vjp_x(ans, x, W, A, B, m, scale, bias=None, dropout_mask=None, detach_norm=True):
    V, C, f = _factor(W, A, B, m, scale, detach_norm)

    def vjp(g):
        dx = (g * f) @ V                                           # (g8) (..., d_in)
        if dropout_mask is not None:
            dx = dx * dropout_mask + (g @ W) * (1.0 - dropout_mask)
        return dx
    return vjp


def _vjp_W(ans, x, W, A, B, m, scale, bias=None, dropout_mask=None, detach_norm=True):
    def vjp(g):
        dV, _ = _grad_V(g, x, W, A, B, m, scale, dropout_mask, detach_norm)
        if dropout_mask is None:
            return dV                                              # (g7)
        xp = namespace(g)
        return dV + xp.matrix_transpose(_flat(g)) @ (_flat(x) - _kept(x, dropout_mask))
    return vjp


def _vjp_A(ans, x, W, A, B, m, scale, bias=None, dropout_mask=None, detach_norm=True):
    def vjp(g):
        dV, _ = _grad_V(g, x, W, A, B, m, scale, dropout_mask, detach_norm)
        return (namespace(g).matrix_transpose(B) @ dV) * finite_real(scale, "scale")   # (g5) (r, d_in)
    return vjp


def _vjp_B(ans, x, W, A, B, m, scale, bias=None, dropout_mask=None, detach_norm=True):
    def vjp(g):
        dV, _ = _grad_V(g, x, W, A, B, m, scale, dropout_mask, detach_norm)
        return (dV @ namespace(g).matrix_transpose(A)) * finite_real(scale, "scale")   # (g6) (d_out, r)
    return vjp


def _vjp_m(ans, x, W, A, B, m, scale, bias=None, dropout_mask=None, detach_norm=True):
    return lambda g: _grad_V(g, x, W, A, B, m, scale, dropout_mask, detach_norm)[1]   # (g3)


def _vjp_bias(ans, x, W, A, B, m, scale, bias=None, dropout_mask=None, detach_norm=True):
    return lambda g: namespace(g).sum(_flat(g), axis=0)           # (g9) (d_out,)


def _no_grad(what):
    def maker(*args, **kwargs):
        raise TypeError(f"dora_linear is not differentiable with respect to {what}")
    return maker


defvjp(dora_linear, _vjp_x, _vjp_W, _vjp_A, _vjp_B, _vjp_m, _no_grad("scale (a constant)"), _vjp_bias,
       _no_grad("dropout_mask (a constant)"), _no_grad("detach_norm (a setting)"))


# ============================================================================================
# Merging (Section 4.1: "no additional inference latency") and its exact inverse
# ============================================================================================


def dora_merge(W: Any, A: Any, B: Any, m: Any, scale: float, *, fan_in_fan_out: bool = False) -> Any:
    """``W' = (m / ||W + s B A||_c) (W + s B A)``: Eq. 5's weight, so inference costs nothing extra.

    W is (d_out, d_in), or (d_in, d_out) with ``fan_in_fan_out=True`` (each output feature's
    column is scaled then); the result has W's layout. Every row of the merged weight has norm
    ``|m_i|``: the merge keeps m but forgets ``||W + s B A||_c`` (see :func:`dora_unmerge`).
    Raises ``ValueError`` instead of returning non-finite weights (PEFT's ``safe_merge``).
    """
    W_math, scale = _check_weights(W, A, B, m, scale, fan_in_fan_out)
    xp = namespace(W, A, B, m)
    _refuse_non_finite(None, "dora_merge", W=W, A=A, B=B, m=m)
    V = _adapted(W_math, A, B, scale)                              # (d_out, d_in)
    merged = V * xp.reshape(m / _row_norm(V), (-1, 1))             # Eq. 5: f V
    _refuse_non_finite(merged, "dora_merge", W=W, A=A, B=B, m=m)
    return xp.matrix_transpose(merged) if fan_in_fan_out else merged


def dora_unmerge(W_merged: Any, A: Any, B: Any, m: Any, scale: float, *, norm: Any,
                 fan_in_fan_out: bool = False) -> Any:
    """Recover W from ``W' = f (W + s B A)``: ``W = W' (norm / m) - s B A``, the exact inverse.

    **What unmerge needs.** Besides A, B, m and s it needs ``norm = ||W + s B A||_c`` (d_out,)
    *of the original W*, i.e. :func:`dora_magnitude` computed before merging. The merged weight
    cannot give it back: every row of W' has norm ``|m_i|`` whatever C_i was, and for any C_i > 0
    the weight ``(C_i / m_i) W'_i - s (B A)_i`` merges to the same W'_i. That is why PEFT caches it:
    ``merge`` stores the detached ``||W + s B A||_c`` (computed from the unmerged base weight) in
    the layer's ``_caches`` under ``"<adapter>-weight_norm"``, and ``unmerge`` pops it and returns
    ``W' / (m / norm) - s B A``. (A new process that loads a merged model cannot unmerge it.)

    Needs every ``m_i != 0`` (a zero magnitude erases its row). Raises ``ValueError`` instead of
    returning non-finite weights. W_merged is in the base model's layout (see :func:`dora_merge`).
    """
    W_math, scale = _check_weights(W_merged, A, B, m, scale, fan_in_fan_out, name="W_merged")
    _check_vector(norm, "norm", W_math.shape[0], W_merged, "W_merged")
    xp = namespace(W_merged, A, B, m, norm)
    if bool(xp.any(m == 0.0)):
        rows = [int(i) for i in np.flatnonzero(to_numpy(m) == 0)]
        raise ValueError(f"dora_unmerge: m is zero in row(s) {rows[:5]}; those rows of W cannot be recovered")
    _refuse_non_finite(None, "dora_unmerge", W_merged=W_merged, A=A, B=B, m=m, norm=norm)
    W_rec = W_math * xp.reshape(norm / m, (-1, 1)) - (B @ A) * scale   # W' / f - s B A
    _refuse_non_finite(W_rec, "dora_unmerge", W_merged=W_merged, A=A, B=B, m=m, norm=norm)
    return xp.matrix_transpose(W_rec) if fan_in_fan_out else W_rec


# ============================================================================================
# Validation: every public function checks its input and says what is wrong
# ============================================================================================


def _check_vector(v: Any, name: str, d_out: int, like: Any, like_name: str = "W") -> None:
    float_array(v, name)
    if shape_of(v) != (d_out,):
        raise ValueError(f"{name} must have shape ({d_out},), one value per output feature, got {shape_of(v)}")
    same_dtype((like_name, like), (name, v))


def _check_weights(W: Any, A: Any, B: Any, m: Any, scale: Any, fan_in_fan_out: Any,
                   name: str = "W") -> tuple[Any, float]:
    """Validate W (in its stored layout), A, B, m (may be None) and s; return (W as (d_out, d_in), s)."""
    for arr, n in ((W, name), (A, "A"), (B, "B")):
        float_array(arr, n)
        if arr.ndim != 2:
            raise ValueError(f"{n} must be 2-D, got shape {shape_of(arr)}")
    fan_in_fan_out = boolean(fan_in_fan_out, "fan_in_fan_out")
    scale = finite_real(scale, "scale")
    same_dtype((name, W), ("A", A), ("B", B))
    W_math = namespace(W).matrix_transpose(W) if fan_in_fan_out else W     # (d_out, d_in)
    d_out, d_in = shape_of(W_math)
    layout = " (stored (d_in, d_out): fan_in_fan_out=True)" if fan_in_fan_out else ""
    if A.shape[1] != d_in:
        raise ValueError(f"A has d_in={A.shape[1]} (shape {shape_of(A)}) but {name}{layout} has d_in={d_in} (shape {shape_of(W)})")
    if B.shape[0] != d_out:
        raise ValueError(f"B has d_out={B.shape[0]} (shape {shape_of(B)}) but {name}{layout} has d_out={d_out} (shape {shape_of(W)})")
    if A.shape[0] != B.shape[1]:
        raise ValueError(f"A has rank {A.shape[0]} (shape {shape_of(A)}) but B has rank {B.shape[1]} (shape {shape_of(B)})")
    if m is not None:
        _check_vector(m, "m", d_out, W, name)
    return W_math, scale


def _check_linear(x, W, A, B, m, scale, bias, mask, detach_norm) -> tuple[float, bool]:
    float_array(x, "x")
    if x.ndim < 1:
        raise ValueError(f"x must have at least 1 dimension (..., d_in), got shape {shape_of(x)}")
    _, scale = _check_weights(W, A, B, m, scale, False)
    detach_norm = boolean(detach_norm, "detach_norm")
    d_out, d_in = shape_of(W)
    if x.shape[-1] != d_in:
        raise ValueError(f"x has d_in={x.shape[-1]} (shape {shape_of(x)}) but W has d_in={d_in} (shape {shape_of(W)})")
    same_dtype(("x", x), ("W", W))
    if bias is not None:
        _check_vector(bias, "bias", d_out, W)
    if mask is not None:
        float_array(mask, "dropout_mask")
        same_dtype(("x", x), ("dropout_mask", mask))
        broadcastable_mask(mask, x)
    return scale, detach_norm


def _refuse_non_finite(result: Any, who: str, **inputs: Any) -> None:
    """Raise if ``result`` (or, when it is None, any of the inputs) has a NaN or an infinity."""
    checked = list(inputs.values()) if result is None else [result]
    if all(bool(namespace(t).all(namespace(t).isfinite(t))) for t in checked):
        return
    counts = ", ".join(f"{n} {int(np.sum(~np.isfinite(to_numpy(t))))}" for n, t in inputs.items())
    raise ValueError(f"{who}: the result would contain non-finite values (non-finite entries: {counts}); refusing")


# ============================================================================================
# Error bounds: the magnitudes tests and the kit compare within (see lora_ref.testing)
# ============================================================================================


def dora_rounding_counts(d_in: int, d_out: int, r: int, n_tokens: int) -> dict[str, int]:
    """How many roundings (an upper bound) any one term of each DoRA output can suffer.

    Chains, in any evaluation order (PEFT's included): V = W + s B A is r + 3 (the r-term dot, s
    rounded to the dtype, times s, the add); C = ||V||_c adds d_in + 3 (divide by t, square, the
    d_in-term sum, sqrt, times t); f = m / C one more, f - 1 another: d_in + r + 8. The output
    ``f (xd V^T) + (x - xd) W^T + b`` (or PEFT's ``x W^T + b + (f - 1) xd W^T + f s xd A^T B^T``,
    with its ``result - bias``) takes at most d_in + r + 4 more (mask, dot, products, adds),
    and the error of f is carried by its own magnitude term (:func:`dora_magnitudes`), so the
    counts take the larger chain, plus the adds: ``y`` d_in + r + 12. Gradients add a sum over the
    N tokens and one over d_out (dL/dx, and B^T dL/dV) to these: at most N + d_in + d_out + 2 r + 16.
    """
    fwd = d_in + r + 12
    bwd = n_tokens + d_in + d_out + 2 * r + 16
    return {"norm": fwd, "y": fwd, "W_merged": fwd,
            "dx": bwd, "dW": bwd, "dA": bwd, "dB": bwd, "dm": bwd, "dbias": bwd}


def dora_magnitudes(x: Any, W: Any, A: Any, B: Any, m: Any, scale: float, *, bias: Any = None,
                    dropout_mask: Any = None, dy: Any = None, detach_norm: bool = True) -> dict[str, np.ndarray]:
    """Magnitudes M of every DoRA output, float64 NumPy: ``|computed - exact| <= gamma_n M``.

    ``n`` from :func:`dora_rounding_counts`; two computations differ by at most ``2 gamma_n M``.
    Each is the output's formula on absolute values, with f replaced by
    ``f_mag = |f| (1 + kappa)``, ``kappa = N_i / C_i`` where ``N_i = || |W| + |s| |B| |A| ||_i``:
    a computed C is within ``gamma N_i`` of the exact one, so f's relative error is ``gamma kappa``,
    large only where W + s B A cancels (kappa >> 1). The exact gradient's projection term
    ``f (phi / C^2) V`` gets ``|f| (2 + 3 kappa) phi_abs / C^2 (|W| + |s||B||A|)`` (f, C twice, phi,
    V each carry an error). W is (d_out, d_in). Returns ``"norm"`` (N_i), ``"y"``, ``"W_merged"``
    (d_out, d_in) and, with ``dy`` (..., d_out), ``"dx"``, ``"dW"``, ``"dA"``, ``"dB"``, ``"dm"``,
    ``"dbias"``.
    """
    f64 = lambda t: None if t is None else np.asarray(to_numpy(t), dtype=np.float64)  # noqa: E731
    x, W, A, B, m, bias, mask, dy = (f64(t) for t in (x, W, A, B, m, bias, dropout_mask, dy))
    scale = finite_real(scale, "scale")
    s, d_out, d_in = abs(scale), W.shape[0], W.shape[1]
    Wa, Da = np.abs(W), abs(scale) * (np.abs(B) @ np.abs(A))      # (d_out, d_in) |W|, |s||B||A|
    Va = Wa + Da
    C = to_numpy(_row_norm(W + scale * (B @ A)))                   # (d_out,) the norm, float64
    N_row = to_numpy(_row_norm(Va))
    kappa = N_row / C                                              # >= 1; large where V cancels
    fm = np.abs(m) / C * (1.0 + kappa)                             # f_mag (d_out,)
    X = np.abs(x.reshape(-1, d_in))                                # (N, d_in)
    Md = np.ones_like(X) if mask is None else np.abs(np.broadcast_to(mask, x.shape)).reshape(-1, d_in)
    Xd = X * Md
    b = 0.0 if bias is None else np.abs(bias)
    y = X @ Wa.T + b + (fm + 1.0) * (Xd @ Wa.T + b) + fm * (Xd @ Da.T)   # (N, d_out)
    out = {"norm": N_row, "y": y.reshape(x.shape[:-1] + (d_out,)), "W_merged": fm[:, None] * Va}
    if dy is None:
        return out
    G = np.abs(dy.reshape(-1, d_out))                              # (N, d_out)
    E = G.T @ Xd                                                   # (d_out, d_in)
    phi = np.sum(E * Va, axis=-1)                                  # (d_out,)
    dV = fm[:, None] * E
    if not boolean(detach_norm, "detach_norm"):
        dV = dV + (np.abs(m) / C * (2.0 + 3.0 * kappa) * phi / C / C)[:, None] * Va
    dx = ((G * fm) @ Va) * Md + (G @ Wa) * (1.0 + 2.0 * Md)
    out.update({"dV": dV, "dA": s * np.abs(B).T @ dV, "dB": s * dV @ np.abs(A).T,
                "dW": dV + G.T @ X + G.T @ Xd, "dm": phi / C * (1.0 + kappa),
                "dx": dx.reshape(x.shape), "dbias": np.sum(G, axis=0)})
    return out
