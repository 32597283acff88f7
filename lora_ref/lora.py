"""LoRA, the math: clean, minimal, reference.

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv 2106.09685 (v2).
Read top to bottom; each paper equation is cited by its number.

Eq. 1, full fine-tuning: train every weight Phi of the model,
    max_Phi  sum_{(x, y) in Z} sum_t log P_Phi(y_t | x, y_<t).
Eq. 2, LoRA's objective: keep the pretrained Phi_0 frozen and train only a small Theta that
encodes the update, Phi = Phi_0 + dPhi(Theta):
    max_Theta  sum_{(x, y) in Z} sum_t log p_{Phi_0 + dPhi(Theta)}(y_t | x, y_<t).
Eq. 3, the update of one weight matrix is low-rank, dW = B A, so a layer computes
    h = W0 x + dW x = W0 x + B A x,       with dW x scaled by s (Section 4.1):  h = W0 x + s B A x.

Theta is the (A, B) of every adapted matrix. This file is Eq. 3 for one linear layer: its forward
(:func:`lora_linear`), the gradients written out (table G1-G5 below), initialisation, merging.
Training "Theta alone" (Eq. 2) is ``autograd.grad`` with respect to A and B only: W is closed
over, so its gradient G2 is never computed. (:mod:`lora_ref.config` says which layers get adapters.)

Layout (the same as PEFT's ``lora_A.weight`` / ``lora_B.weight``)::

    W  (d_out, d_in)    frozen pretrained weight W0,  y = x @ W.T + bias
    A  (r, d_in)        down-projection,  initialised random
    B  (d_out, r)       up-projection,    initialised zero
    x  (..., d_in)      any number of leading (batch, token) dimensions; N = their product
    s                   scale: alpha / r, or alpha / sqrt(r) with rsLoRA

(B is always LoRA's up-projection here, never a batch size.)

Fused projections (GPT-2's ``c_attn`` holds q, k and v in one (3C, C) weight) follow loralib's
``MergedLinear``: ``enable_lora`` flags which of the G equal row-blocks of W are adapted (for
GPT-2's q, k, v, ``(True, False, True)`` adapts q and v).
With n of them enabled, A is (n r, d_in) and B is (n q, r), q = d_out / G; enabled block k gets
``s B_k A_k`` with ``A_k = A[k r:(k+1) r]`` and ``B_k = B[k q:(k+1) q]``; disabled blocks get
nothing. ``enable_lora=None`` is the plain case (one block, enabled).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from autograd.extend import defvjp, primitive

from .backend import asarray, dtype_name, float_dtype, namespace, sum_to_shape, to_numpy
from .checks import (FLOAT_DTYPES, broadcastable_mask, finite_real, float_array, numpy_generator, positive_int,
                     positive_real, probability, same_dtype)
from .config import INIT_SCHEMES, LoraConfig, check_enable_lora, lora_scale

__all__ = [
    "INIT_SCHEMES",
    "LoraConfig",
    "delta_weight",
    "dropout_mask",
    "init_lora",
    "lora_linear",
    "lora_parameter_count",
    "lora_scale",
    "merge",
    "pissa_init",
    "unmerge",
]

MERGE_DTYPES = FLOAT_DTYPES + ("bfloat16",)   # merge / unmerge / delta_weight (bfloat16: ml_dtypes, NumPy)


# ============================================================================================
# Initialisation (Section 4.1: "random Gaussian initialization for A and zero for B")
# ============================================================================================


def init_lora(d_in: int, d_out: int, r: int, *, init: str = "kaiming", rng: np.random.Generator,
              dtype: Any = "float64") -> tuple[Any, Any]:
    """Draw ``(A, B)`` for a ``(d_out, d_in)`` weight; A is ``(r, d_in)``, B is ``(d_out, r)``.

    * ``"kaiming"``: A ~ U(-1/sqrt(d_in), 1/sqrt(d_in)), B = 0. This is PyTorch's
      ``kaiming_uniform_(a=sqrt(5))`` on A, which PEFT (``init_lora_weights=True``) and loralib use:
      gain sqrt(2/(1+a^2)) = sqrt(1/3), bound sqrt(3) gain / sqrt(fan_in) = 1/sqrt(d_in).
    * ``"gaussian"``: A ~ N(0, (1/r)^2), B = 0 (PEFT's ``init_lora_weights="gaussian"``).
    * ``"random"``: A as kaiming, B ~ U(-1/sqrt(r), 1/sqrt(r)): a *non-identity* adapter for
      tests (PEFT's ``init_lora_weights=False``, which leaves both at nn.Linear's default init).

    With B = 0 the adapted layer starts identical to the base (Eq. 3 with B A = 0). Randomness
    comes only from ``rng``; arrays are created on the current backend.
    """
    d_in, d_out, r = positive_int(d_in, "d_in"), positive_int(d_out, "d_out"), positive_int(r, "r")
    numpy_generator(rng, "rng")
    np_dtype = float_dtype(dtype)
    if init == "kaiming" or init == "random":
        bound = 1.0 / math.sqrt(d_in)
        A = rng.uniform(-bound, bound, size=(r, d_in))
    elif init == "gaussian":
        A = rng.normal(0.0, 1.0 / r, size=(r, d_in))
    else:
        raise ValueError(f"init must be one of {', '.join(INIT_SCHEMES)}, got {init!r}")
    if init == "random":
        bound_b = 1.0 / math.sqrt(r)
        B = rng.uniform(-bound_b, bound_b, size=(d_out, r))
    else:
        B = np.zeros((d_out, r))
    return asarray(A.astype(np_dtype)), asarray(B.astype(np_dtype))


def pissa_init(W: Any, r: int, scale: float) -> tuple[Any, Any, Any]:
    """PiSSA (arXiv 2404.02948): adapters from W's top-r singular triplets, base = the residual.

    With ``W = U S V^T`` (SciPy SVD, descending S), ``A = sqrt(S_r) V_r^T / sqrt(s)`` (r, d_in),
    ``B = U_r sqrt(S_r) / sqrt(s)`` (d_out, r), so ``s B A = U_r S_r V_r^T``, the best rank-r
    approximation of W (Eckart-Young), and ``W_residual = W - s B A``. Returns
    ``(A, B, W_residual)``; ``W_residual + s B A`` reproduces W up to rounding, so the adapted
    model's output is preserved at initialisation. Requires ``r <= min(d_out, d_in)``.
    """
    import scipy.linalg

    W_np = to_numpy(W)
    float_array(W_np, "W")
    if W_np.ndim != 2:
        raise ValueError(f"W must be 2-D (d_out, d_in), got shape {W_np.shape}")
    bad = int(W_np.size - np.count_nonzero(np.isfinite(W_np)))
    if bad:
        raise ValueError(f"W has {bad} non-finite value(s) (inf or nan); pissa_init's SVD needs a finite weight")
    r = positive_int(r, "r")
    if r > min(W_np.shape):
        raise ValueError(f"pissa_init: r={r} exceeds min(d_out, d_in)={min(W_np.shape)} for W of shape {W_np.shape}")
    scale = positive_real(scale, "scale")
    U, S, Vt = scipy.linalg.svd(W_np.astype(np.float64), full_matrices=False)
    root = np.sqrt(S[:r])
    A = (root[:, None] * Vt[:r]) / math.sqrt(scale)              # (r, d_in)
    B = (U[:, :r] * root[None, :]) / math.sqrt(scale)            # (d_out, r)
    A, B = A.astype(W_np.dtype), B.astype(W_np.dtype)
    W_res = W_np - scale * (B @ A)
    return asarray(A), asarray(B), asarray(W_res)


def dropout_mask(shape: tuple[int, ...], p: float, rng: np.random.Generator, dtype: Any = "float64") -> Any:
    """An inverted-dropout mask: each entry is 0 with probability p, else ``1/(1-p)``.

    Passing this to :func:`lora_linear` applies dropout to the adapter branch only, as PEFT does,
    and keeps the computation deterministic (the randomness is in the mask you pass).
    """
    p = probability(p, "p")
    numpy_generator(rng, "rng")
    np_dtype = float_dtype(dtype)
    keep = rng.random(size=tuple(shape)) >= p
    return asarray((keep / (1.0 - p)).astype(np_dtype))


# ============================================================================================
# The forward pass (Eq. 3), an autograd primitive
# ============================================================================================


def _blocks(enable: tuple[bool, ...] | None, d_out: int, r: int) -> list[tuple[slice, slice, slice]]:
    """For each enabled block k: (rows of A, rows of B, rows of W / columns of y) as slices."""
    if enable is None:
        return [(slice(0, r), slice(0, d_out), slice(0, d_out))]
    q = d_out // len(enable)
    out, k = [], 0
    for g, on in enumerate(enable):
        if on:
            out.append((slice(k * r, (k + 1) * r), slice(k * q, (k + 1) * q), slice(g * q, (g + 1) * q)))
            k += 1
    return out


def _scatter(xp: Any, parts: list[Any], enable: tuple[bool, ...] | None, block_shape: tuple[int, ...],
             axis: int, dtype: Any) -> Any:
    """Concatenate the enabled blocks' arrays along ``axis``, zeros of ``block_shape`` for the
    disabled ones (loralib's zero-padding of a MergedLinear's output)."""
    if enable is None:
        return parts[0]
    it = iter(parts)
    zero = xp.zeros(block_shape, dtype=dtype) if not all(enable) else None
    return xp.concat([next(it) if on else zero for on in enable], axis=axis)


def _lora_linear(x: Any, W: Any, A: Any, B: Any, scale: float, bias: Any = None, dropout_mask: Any = None,
                 enable_lora: tuple[bool, ...] | None = None) -> Any:
    """The undecorated forward (see :func:`lora_linear`); autograd.numpy can trace it."""
    scale = _validate(x, W, A, B, scale, bias, dropout_mask, enable_lora)  # a Python float from here on
    xp = namespace(x, W, A, B, bias, dropout_mask)
    # x keeps its leading dimensions: NumPy's (..., d_in) @ (d_in, d_out) computes each sample with
    # the same BLAS call whatever else is in the batch, so a sample's output does not depend on its
    # batch (lora_ref.adapters' mixed batch equals each sample run alone, bit for bit). One 2-D
    # product over all N rows is faster, but BLAS may round a row differently as N changes.
    y = x @ xp.matrix_transpose(W)                                # (..., d_out)   W0 x
    if bias is not None:
        y = y + bias
    if A is None:
        return y
    xd = x if dropout_mask is None else x * dropout_mask          # dropout on the adapter branch only
    h = xd @ xp.matrix_transpose(A)                               # (..., n r)     A x
    if enable_lora is None:
        return y + (h @ xp.matrix_transpose(B)) * scale           # (..., d_out)   Eq. 3: W0 x + s B (A x)
    d_out = W.shape[0]
    q, blocks = d_out // len(enable_lora), iter(_blocks(enable_lora, d_out, B.shape[-1]))
    parts = []
    for g, on in enumerate(enable_lora):                          # block g: y_g + s B_k (A_k x), or y_g alone
        y_g = y[..., g * q:(g + 1) * q]                           # (..., q)       W0_g x (+ bias_g)
        if on:
            ra, rb, _ = next(blocks)
            y_g = y_g + (h[..., ra] @ xp.matrix_transpose(B[rb, :])) * scale  # (..., q)  Eq. 3, block k
        parts.append(y_g)
    return xp.concat(parts, axis=-1)                              # (..., d_out)


lora_linear = primitive(_lora_linear)
lora_linear.__doc__ = """LoRA's adapted linear layer, Eq. 3: ``y = x W^T + bias + s ((x * mask) A^T) B^T``.

    Parameters
    ----------
    x : array (..., d_in)
    W : array (d_out, d_in)          frozen base weight (differentiated only if traced)
    A : array (r, d_in) or None      None: a plain linear layer, no adapter
    B : array (d_out, r)
    scale : float                    s, e.g. ``config.scale_for(name)``; any real number (a NumPy
                                     scalar is made a Python float, so float32 stays float32)
    bias : array (d_out,), optional
    dropout_mask : array broadcastable to x, optional
        Multiplies x on the adapter branch only; carries inverted-dropout scaling already
        (see :func:`dropout_mask`).
    enable_lora : tuple of bool, optional
        loralib MergedLinear: adapt only the flagged row-blocks of W; then A is (n r, d_in) and
        B is (n d_out / G, r) for n enabled of G blocks.

    Returns
    -------
    y : array (..., d_out), same dtype as x.

    Never forms ``B @ A``: the adapter branch costs ``r (d_in + d_out)`` multiply-adds per
    token, not ``d_in d_out``. An autograd primitive: gradients for x, W, A, B and bias are the
    hand-written VJPs G1-G5 below (autograd only asks for those of traced arguments, so a frozen W
    costs nothing in LoRA training). All arrays must share one floating dtype.
    """


# ============================================================================================
# The gradients, written out (each VJP below names its line)
# ============================================================================================
#
# y = x W^T + bias + s ((x * M) A^T) B^T  (Eq. 3). With X = x flattened to (N, d_in), G = dL/dy
# flattened to (N, d_out), M the dropout mask, Xd = X * M, H = Xd A^T (N, n r), and for enabled block
# k of a fused projection: G_k = G[:, rows of block k] (N, q), A_k (r, d_in), B_k (q, r), H_k = H[:, rows of A_k]:
#
#   G1  dL/dx    = G W + s (sum_k (G_k B_k) A_k) * M     (..., d_in)   y is linear in x through two paths
#   G2  dL/dW    = G^T X                                 (d_out, d_in) only if W is trained (Eq. 1)
#   G3  dL/dbias = sum over the N rows of G              (d_out,)
#   G4  dL/dA_k  = s (G_k B_k)^T Xd                      (r, d_in)     y_k = s (Xd A_k^T) B_k^T
#   G5  dL/dB_k  = s G_k^T H_k                           (q, r)        y_k = s H_k B_k^T
#
# Eq. 2 training asks for G4 and G5 (and G1 to reach earlier layers), never G2. At init B = 0, so
# G4 = 0 exactly and G5 = s G^T (X A^T): only B moves on the first step. In the plain case
# (enable_lora=None) there is one block, k = 1, holding all of A, B and G.
#
# The VJPs compute on the flattened X and G, so each product is one 2-D matrix product over all N
# rows (faster than NumPy's stacked (..., d_in) products, one per leading index; the forward keeps
# those, see _lora_linear). The mask M broadcasts to x's shape, not necessarily to X's, so G1
# applies it after reshaping back to x's shape.


def _flat(t: Any) -> Any:
    """(..., n) -> (N, n): fold the leading dimensions into one."""
    return namespace(t).reshape(t, (-1, t.shape[-1]))


def _vjp_x(ans, x, W, A, B, scale, bias=None, dropout_mask=None, enable_lora=None):
    """G1: dL/dx = G W + s (sum_k (G_k B_k) A_k) * M."""
    def vjp(g):
        xp = namespace(g)
        G = _flat(g)                                                         # (N, d_out)
        dx = xp.reshape(G @ W, x.shape)                                      # (..., d_in)   G W
        if A is not None:
            r = B.shape[-1]
            gB = [G[:, rw] @ B[rb, :] for _, rb, rw in _blocks(enable_lora, W.shape[0], r)]  # (N, r) G_k B_k
            gBA = (gB[0] if len(gB) == 1 else xp.concat(gB, axis=-1)) @ A      # (N, d_in)     sum_k (G_k B_k) A_k
            gBA = xp.reshape(gBA, x.shape)                                   # (..., d_in)
            if dropout_mask is not None:
                gBA = gBA * dropout_mask
            dx = dx + gBA * finite_real(scale, "scale")
        return dx             # x's shape: the mask broadcasts *to* x (validated), never beyond it
    return vjp


def _vjp_W(ans, x, W, A, B, scale, bias=None, dropout_mask=None, enable_lora=None):
    """G2: dL/dW = G^T X."""
    return lambda g: namespace(g).matrix_transpose(_flat(g)) @ _flat(x)     # (d_out, d_in)


def _vjp_A(ans, x, W, A, B, scale, bias=None, dropout_mask=None, enable_lora=None):
    """G4: dL/dA_k = s (G_k B_k)^T Xd, stacked over the enabled blocks."""
    def vjp(g):
        xp = namespace(g)
        xd = _flat(x if dropout_mask is None else x * dropout_mask)         # (N, d_in)
        G, r = _flat(g), B.shape[-1]
        gB = [G[:, rw] @ B[rb, :] for _, rb, rw in _blocks(enable_lora, W.shape[0], r)]  # (N, r) each
        gB = gB[0] if len(gB) == 1 else xp.concat(gB, axis=-1)              # (N, n r)
        return (xp.matrix_transpose(gB) @ xd) * finite_real(scale, "scale")  # (n r, d_in)
    return vjp


def _vjp_B(ans, x, W, A, B, scale, bias=None, dropout_mask=None, enable_lora=None):
    """G5: dL/dB_k = s G_k^T H_k, stacked over the enabled blocks."""
    def vjp(g):
        xp = namespace(g)
        xd = _flat(x if dropout_mask is None else x * dropout_mask)         # (N, d_in)
        H, G, r = xd @ xp.matrix_transpose(A), _flat(g), B.shape[-1]        # (N, n r)
        parts = [xp.matrix_transpose(G[:, rw]) @ H[:, ra] for ra, _, rw in _blocks(enable_lora, W.shape[0], r)]
        dB = parts[0] if len(parts) == 1 else xp.concat(parts, axis=0)      # (n q, r)
        return dB * finite_real(scale, "scale")
    return vjp


def _vjp_bias(ans, x, W, A, B, scale, bias=None, dropout_mask=None, enable_lora=None):
    """G3: dL/dbias = sum over the N rows of G."""
    return lambda g: sum_to_shape(g, tuple(bias.shape))                     # (d_out,)


def _no_grad(what):
    def maker(*args, **kwargs):
        raise TypeError(f"lora_linear is not differentiable with respect to {what}")
    return maker


defvjp(lora_linear, _vjp_x, _vjp_W, _vjp_A, _vjp_B, _no_grad("scale (a constant)"), _vjp_bias,
       _no_grad("dropout_mask (a constant)"))


# ============================================================================================
# Merging (Section 4.1: "no additional inference latency")
# ============================================================================================


def delta_weight(A: Any, B: Any, scale: float, enable_lora: tuple[bool, ...] | None = None,
                 d_out: int | None = None) -> Any:
    """``dW = s B A``, shape (d_out, d_in) -- the update LoRA adds to W (Eq. 3).

    With ``enable_lora`` (fused projection), the blocks ``s B_k A_k`` are placed in their rows of
    a (d_out, d_in) matrix and disabled blocks are zero; ``d_out`` (the full fused height) is then
    required when it cannot be derived (it can: ``B.shape[0] / n_enabled * G``).

    bfloat16 (ml_dtypes, NumPy only) is accepted here and in :func:`merge` / :func:`unmerge`:
    NumPy's ``B @ A`` on bfloat16 returns float32 (each product is exact in float32, the r-term
    sum is rounded in float32), ``* s`` is rounded in float32, and the delta is then rounded to
    bfloat16 once, explicitly, so the result has the factors' dtype.
    """
    xp = namespace(A, B)
    _check_pair(A, B, MERGE_DTYPES)
    scale = finite_real(scale, "scale")
    if enable_lora is None:
        if A.shape[0] != B.shape[1]:
            raise ValueError(f"A has rank {A.shape[0]} (shape {tuple(A.shape)}) but B has rank {B.shape[1]} (shape {tuple(B.shape)})")
        return _as_factor_dtype(xp, (B @ A) * scale, A)                        # (d_out, d_in)
    enable = check_enable_lora(enable_lora, "enable_lora")
    n, G = sum(enable), len(enable)
    r = B.shape[1]
    if A.shape[0] != n * r or B.shape[0] % n:
        raise ValueError(f"enable_lora={enable}: A must be ({n}*r, d_in) and B ({n}*q, r); got A {tuple(A.shape)}, B {tuple(B.shape)}")
    q = B.shape[0] // n
    full = q * G if d_out is None else d_out
    if full != q * G:
        raise ValueError(f"d_out={d_out} does not match enable_lora={enable} with block height {q}")
    rows = [_as_factor_dtype(xp, (B[rb, :] @ A[ra, :]) * scale, A) for ra, rb, _ in _blocks(enable, full, r)]  # (q, d_in)
    return _scatter(xp, rows, enable, (q, A.shape[1]), 0, A.dtype)              # (d_out, d_in)


def _as_factor_dtype(xp: Any, delta: Any, A: Any) -> Any:
    """``delta`` rounded to A's dtype when they differ: bfloat16 factors give a float32 ``B @ A``
    (NumPy with ml_dtypes); every other dtype is returned as it is (no copy)."""
    return delta if dtype_name(delta.dtype) == dtype_name(A.dtype) else xp.astype(delta, A.dtype)


def _delta_for(W: Any, A: Any, B: Any, scale: float, enable_lora: Any, fan_in_fan_out: bool) -> Any:
    xp = namespace(W, A, B)
    float_array(W, "W", MERGE_DTYPES)
    if W.ndim != 2:
        raise ValueError(f"W must be 2-D, got shape {tuple(W.shape)}")
    d_out, d_in = (W.shape[1], W.shape[0]) if fan_in_fan_out else tuple(W.shape)
    same_dtype(("W", W), ("A", A), ("B", B))
    if A.shape[-1] != d_in:
        layout = " (W stored (d_in, d_out): fan_in_fan_out=True)" if fan_in_fan_out else ""
        raise ValueError(f"A has d_in={A.shape[-1]} but W{layout} has d_in={d_in}; W shape {tuple(W.shape)}, A shape {tuple(A.shape)}")
    delta = delta_weight(A, B, scale, enable_lora, d_out=d_out if enable_lora is not None else None)
    if tuple(delta.shape) != (d_out, d_in):
        raise ValueError(f"B has d_out={delta.shape[0]} but W has d_out={d_out}; W shape {tuple(W.shape)}, B shape {tuple(B.shape)}")
    return xp.matrix_transpose(delta) if fan_in_fan_out else delta


def merge(W: Any, A: Any, B: Any, scale: float, *, enable_lora: tuple[bool, ...] | None = None,
          fan_in_fan_out: bool = False) -> Any:
    """``W + s B A``: the merged weight, so inference costs nothing extra (Section 4.1).

    W is (d_out, d_in), or (d_in, d_out) with ``fan_in_fan_out=True`` (the delta is then
    transposed before it is added, as PEFT does for GPT-2's Conv1D). Returns a new array of W's
    dtype; bfloat16 is accepted (see :func:`delta_weight` for where it rounds; the addition is
    rounded to bfloat16).
    Raises ``ValueError`` instead of returning non-finite weights (PEFT's ``safe_merge``), naming
    how many entries of A, B and the result are non-finite.
    """
    delta = _delta_for(W, A, B, scale, enable_lora, fan_in_fan_out)
    return _refuse_non_finite("merge", W + delta, W, A, B, delta)


def unmerge(W_merged: Any, A: Any, B: Any, scale: float, *, enable_lora: tuple[bool, ...] | None = None,
            fan_in_fan_out: bool = False) -> Any:
    """``W_merged - s B A``: recover the base weight from a merged one.

    Exact only in exact arithmetic: in floating point each entry of ``unmerge(merge(W))`` differs
    from W by at most a few units of roundoff of ``|W| + |s B A|`` (docs/math.md derives the bound
    and reports the drift over 1,000 merge/unmerge cycles). Like :func:`merge`, raises
    ``ValueError`` instead of returning non-finite weights.
    """
    delta = _delta_for(W_merged, A, B, scale, enable_lora, fan_in_fan_out)
    return _refuse_non_finite("unmerge", W_merged - delta, W_merged, A, B, delta)


def _refuse_non_finite(what: str, result: Any, W: Any, A: Any, B: Any, delta: Any) -> Any:
    """``result``, or ``ValueError`` naming how many entries of A, B and W are non-finite
    (PEFT's ``safe_merge``): a weight with inf or NaN would poison every later output."""
    xp = namespace(result)
    if bool(xp.all(xp.isfinite(result))):
        return result
    counts = {n: int(xp.sum(xp.astype(~xp.isfinite(t), xp.int64))) for n, t in (("A", A), ("B", B), ("W", W))}
    weight = "merged" if what == "merge" else "unmerged"
    raise ValueError(
        f"{what}: the {weight} weight would contain non-finite values "
        f"(non-finite entries: A {counts['A']}, B {counts['B']}, W {counts['W']}; "
        f"max |s B A| = {float(xp.max(xp.abs(delta)))}); refusing to {what}")


def lora_parameter_count(d_in: int, d_out: int, r: int) -> int:
    """Trainable parameters of one adapter: ``r (d_in + d_out)`` (A has r d_in, B has d_out r).

    Section 5.1's ``|Theta| = 2 L d_model r`` is this with d_in = d_out = d_model, summed over
    the L adapted matrices.
    """
    d_in, d_out, r = positive_int(d_in, "d_in"), positive_int(d_out, "d_out"), positive_int(r, "r")
    return r * (d_in + d_out)


# ============================================================================================
# Validation: every public function checks its input and says what is wrong (lora_ref.checks)
# ============================================================================================


def _check_pair(A: Any, B: Any, dtypes: tuple[str, ...] = FLOAT_DTYPES) -> None:
    float_array(A, "A", dtypes)
    float_array(B, "B", dtypes)
    if A.ndim != 2 or B.ndim != 2:
        raise ValueError(f"A must be 2-D (r, d_in) and B 2-D (d_out, r); got A {tuple(A.shape)}, B {tuple(B.shape)}")
    same_dtype(("A", A), ("B", B))


def _validate(x, W, A, B, scale, bias, mask, enable_lora) -> float | None:
    """Check lora_linear's arguments; return ``scale`` as a Python float (None without an adapter):
    NumPy 2 promotes ``float32_array * np.float64(2)`` to float64, so no NumPy scalar may reach the
    array code."""
    float_array(x, "x")
    float_array(W, "W")
    if x.ndim < 1:
        raise ValueError(f"x must have at least 1 dimension (..., d_in), got shape {tuple(x.shape)}")
    if W.ndim != 2:
        raise ValueError(f"W must be 2-D (d_out, d_in), got shape {tuple(W.shape)}")
    d_out, d_in = W.shape
    if x.shape[-1] != d_in:
        raise ValueError(f"x has d_in={x.shape[-1]} (shape {tuple(x.shape)}) but W has d_in={d_in} (shape {tuple(W.shape)})")
    if bias is not None:
        float_array(bias, "bias")
        if tuple(bias.shape) != (d_out,):
            raise ValueError(f"bias must have shape ({d_out},) to match W {tuple(W.shape)}, got {tuple(bias.shape)}")
    if (A is None) != (B is None):
        raise ValueError("A and B must both be given or both be None")
    if A is None:
        same_dtype(("x", x), ("W", W), ("bias", bias))
        return None
    _check_pair(A, B)
    scale = finite_real(scale, "scale")
    same_dtype(("x", x), ("W", W), ("A", A), ("B", B), ("bias", bias), ("dropout_mask", mask))
    if A.shape[1] != d_in:
        raise ValueError(f"A has d_in={A.shape[1]} (shape {tuple(A.shape)}) but W has d_in={d_in} (shape {tuple(W.shape)})")
    r = B.shape[1]
    if enable_lora is None:
        if A.shape[0] != r:
            raise ValueError(f"A has rank {A.shape[0]} (shape {tuple(A.shape)}) but B has rank {r} (shape {tuple(B.shape)})")
        if B.shape[0] != d_out:
            raise ValueError(f"B has d_out={B.shape[0]} (shape {tuple(B.shape)}) but W has d_out={d_out} (shape {tuple(W.shape)})")
    else:
        enable = check_enable_lora(enable_lora, "enable_lora")
        G, n = len(enable), sum(enable)
        if d_out % G:
            raise ValueError(f"enable_lora has {G} blocks but W's d_out={d_out} is not divisible by {G}")
        if A.shape[0] != n * r or B.shape[0] != n * (d_out // G):
            raise ValueError(
                f"enable_lora={enable} on W {tuple(W.shape)} needs A ({n * r}, {d_in}) and B ({n * (d_out // G)}, {r}); "
                f"got A {tuple(A.shape)}, B {tuple(B.shape)}")
    if mask is not None:
        float_array(mask, "dropout_mask")
        broadcastable_mask(mask, x)
    return scale
