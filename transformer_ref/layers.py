"""The layers every model family shares, each a forward in array code and a backward written out.

Every layer is an autograd primitive. Its forward runs on any backend (the namespace comes from
its arrays) and fills a ``cache`` dict with what the backward needs (llm.c's ``forward -> (out,
cache)``); its VJPs, below it, are the hand-derived gradients with the equations beside the code.
Autograd only chains them, and only asks for the VJPs of arguments that are being traced.

The layers here are: embedding, layer_norm (GPT-2), rms_norm (LLaMA), gelu (GPT-2), silu and
swiglu (LLaMA's MLP), cross_entropy. The attention layers -- GPT-2's fused causal attention,
grouped-query attention and rotary position embeddings -- are in :mod:`transformer_ref.attention`.
(DESIGN.md puts every shared layer in this one file; they are split in two, deliberately, to keep
each file under the project's 600-line limit: the split is by topic, norms and pointwise layers
here, attention there.) A model calls them, and its projections, through an op set passed to it
as an argument (:class:`Ops`, defined at the end of this file with both files' layers):

* :data:`REFERENCE` -- these layers and :func:`lora_ref.lora_linear`, Eq. 3 in the order the
  paper writes it, ``W x + b + s B (A x)``. Every model's default.
* ``transformer_ref.fast.FAST`` -- the same layers and a projection evaluated in the order that
  trains fastest; tested equal to REFERENCE. Chosen explicitly by whoever wants speed.
* ``traced(ops)`` -- each op's bare forward (``op.fun``, without its hand-written VJPs): plain
  differentiable array code, so ``autograd.numpy`` derives every gradient a second time,
  independently (the tests compare the two). A value like the others, not a switch.

GPT-2's layers take their arguments unchecked (the model checks its inputs once per forward);
the LLaMA layers (rms_norm, silu, swiglu, and grouped-query attention and RoPE) check theirs,
as they are also meant to be called one by one, as an oracle.

Shapes: B batch, T tokens, C channels, V vocabulary, N = B * T rows, ``...`` any leading dimensions.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import numpy as np
from autograd.extend import defvjp

from lora_ref import checks
from lora_ref.backend import dtype_name, getval, namespace, scatter_add_rows, sum_to_shape, to_numpy
from lora_ref.adapters import lora_delta
from lora_ref.checks import index_array, integer_array
from lora_ref.dora import dora_linear
from lora_ref.embedding import lora_embedding
from lora_ref.lora import lora_linear

from .primitive import cached_primitive

__all__ = [
    "IGNORE_INDEX",
    "REFERENCE",
    "Ops",
    "cached_primitive",
    "cross_entropy",
    "embedding",
    "gelu",
    "layer_norm",
    "rms_norm",
    "silu",
    "swiglu",
    "traced",
]

IGNORE_INDEX = -100  # a target equal to this is left out of the loss (PyTorch's and HF's convention)


# ============================================================================================
# Embedding: x = table[ids]
# ============================================================================================


def _embedding(table: Any, ids: Any, cache: dict | None = None) -> Any:
    """Rows of ``table`` (V, C) picked by integer ``ids`` (...): returns (..., C)."""
    xp = namespace(table)
    index_array(ids, table.shape[0], "ids")     # CuPy would wrap bad ids silently
    flat = xp.reshape(ids, (-1,))                                   # (N,)
    rows = xp.take(table, flat, axis=0)                             # (N, C)
    return xp.reshape(rows, tuple(ids.shape) + (table.shape[1],))   # (..., C)


embedding = cached_primitive(_embedding)
embedding.__doc__ = """Token (or position) embedding: ``out[..., :] = table[ids[...], :]``.

    table : array (V, C), float;  ids : integer array (...) with values in [0, V).
    Returns (..., C). Raises TypeError for non-integer ids, ValueError for ids out of range
    (CuPy would silently wrap them).
    """


# dL/dtable[v] = sum of dL/dout over the positions where ids == v: a scatter-add, which the Array
# API lacks; lora_ref.backend.scatter_add_rows has one path per backend (lora_embedding's too).
def _embedding_vjp(ans, table, ids, cache=None):
    def vjp(g):
        xp = namespace(g)
        V, C = table.shape
        flat_ids = xp.reshape(ids, (-1,))                           # (N,)
        flat_g = xp.reshape(g, (-1, C))                             # (N, C)
        return scatter_add_rows(flat_ids, flat_g, V)                # (V, C)
    return vjp


defvjp(embedding.primitive, _embedding_vjp, None)


# ============================================================================================
# Norms without overflow: each row scaled by a power of two first
# ============================================================================================
#
# LayerNorm's variance and RMSNorm's mean square overflow once |x| reaches ~1e154 (float64) or
# ~1e19 (float32): mean(x^2) = inf, 1/sqrt(inf) = 0, and the textbook formula returns zeros
# (or NaN) for a row whose exact normalisation is finite. Both norms here first divide each row
# by s = 2^e, a power of two near its largest magnitude: exact, only the exponent changes. eps does
# not scale with the row, so it is rescaled too, and the identity is exact for any s > 0:
#     x / sqrt(mean(x^2) + eps) = (x/s) / sqrt(mean((x/s)^2) + eps/s^2),
# because mean(x^2) + eps = s^2 (mean((x/s)^2) + eps/s^2). Rows whose largest magnitude is below 2
# keep s = 1, so eps/s^2 never overflows and such rows are computed exactly as the textbook
# formula. A row scaled by s > 1 has max |x/s| in [1, 2), so mean((x/s)^2) >= 1/(4C) and eps/s^2
# either is exact or underflows only where it is below rounding against it. Scaling by a power of
# two commutes with every rounding (no overflow or underflow occurring), so an ordinary row gives
# bit for bit the value of the unscaled formula. s is piecewise constant: it has no gradient term.
# A non-finite x gives NaN in its row.


def _row_exponent(x: Any, offset: Any = None) -> Any:
    """(..., C) -> (..., 1): ``e = floor(log2(max|x|)) (+ offset)`` per row, clipped to [0, emax]:
    ``2^e`` is the power of two that scales the row (1 for rows below 2, or of zeros).

    ``offset`` (an exponent of the same shape) gives the exponent of ``max|x| 2^offset`` without
    forming that product (which may overflow). A constant: computed on unboxed values.
    """
    x = getval(x)
    xp = namespace(x)
    top = xp.max(xp.abs(x), axis=-1, keepdims=True)                        # (..., 1)
    e = xp.floor(xp.log2(xp.where(top > 0.0, top, xp.ones_like(top))))     # (..., 1), 0 for zero rows
    if offset is not None:
        e = xp.where(top > 0.0, e + offset, xp.zeros_like(e))              # a zero row stays at 0
    # the largest exponent of the dtype (IEEE: 1 - log2(smallest normal)); caps log2 rounding up at the top
    emax = 1 - round(math.log2(float(xp.finfo(x.dtype).smallest_normal)))
    return xp.clip(e, 0.0, float(emax))


def _pow2(e: Any) -> Any:
    """2^e for an array of integer-valued exponents (exact)."""
    return 2.0 ** e


# ============================================================================================
# LayerNorm: y = (x - mean) / sqrt(var + eps) * weight + bias, over the last axis
# ============================================================================================
#
# Two scales (both powers of two, see above): s from max|x| so that the mean's sum cannot
# overflow, then t from max|x - mean| for the variance (a row with a small spread around a huge
# mean needs the second: its centred values are small). With z = x / s and w = (x - mean) / t:
#     rstd = 1 / sqrt(var(x) + eps) = (1/t) r,   r = 1 / sqrt(mean(w^2) + eps / t^2),   xhat = w r.


def _layer_norm(x: Any, weight: Any, bias: Any, eps: float, cache: dict | None = None) -> Any:
    """x (..., C), weight (C,), bias (C,), eps a Python float -> (..., C)."""
    xp = namespace(x, weight, bias)
    e_s = _row_exponent(x)                                           # (..., 1) s = 2^e_s >= 1
    z = x * _pow2(-e_s)                                              # (..., C) x / s, exact
    zc = z - xp.mean(z, axis=-1, keepdims=True)                      # (..., C) (x - mean) / s
    e_t = _row_exponent(zc, e_s)                                     # (..., 1) t = 2^e_t >= 1 from max|x - mean|
    w = zc * _pow2(e_s - e_t)                                        # (..., C) (x - mean) / t, exact
    var = xp.mean(w * w, axis=-1, keepdims=True)                     # (..., 1) biased, as GPT-2: var / t^2
    inv_t = _pow2(-e_t)                                              # (..., 1) 1 / t
    r = 1.0 / xp.sqrt(var + eps * (inv_t * inv_t))                   # (..., 1) t rstd
    xhat = w * r                                                     # (..., C) (x - mean) rstd
    if cache is not None:
        cache["xhat"], cache["r"], cache["inv_t"] = xhat, r, inv_t
    return xhat * weight + bias


layer_norm = cached_primitive(_layer_norm)
layer_norm.__doc__ = """LayerNorm over the last axis: ``(x - mean) / sqrt(var + eps) * weight + bias``.

    x : (..., C); weight, bias : (C,); eps : Python float (GPT-2: 1e-5). Returns (..., C).
    The variance is the biased one (divide by C), as in PyTorch and GPT-2. Each row is scaled by
    powers of two first, so no row overflows (see the comment above the layer).
    """


# With xhat = (x - mean) * rstd and g = dL/dy:
#   dL/dbias   = sum_rows g
#   dL/dweight = sum_rows g * xhat
#   dL/dx      = rstd * (gw - mean(gw) - xhat * mean(gw * xhat)),  gw = g * weight
# (the last line is d xhat/dx applied to gw: the two means remove the components along the
#  directions that the centring and the normalisation take away). rstd = r / t: r first, 1/t last.
def _ln_vjp_x(ans, x, weight, bias, eps, cache):
    def vjp(g):
        xp = namespace(g)
        xhat = cache["xhat"]
        gw = g * weight                                                            # (..., C)
        return cache["r"] * (gw - xp.mean(gw, axis=-1, keepdims=True)
                             - xhat * xp.mean(gw * xhat, axis=-1, keepdims=True)) * cache["inv_t"]   # (..., C)
    return vjp


defvjp(layer_norm.primitive,
       _ln_vjp_x,
       lambda ans, x, weight, bias, eps, cache: lambda g: sum_to_shape(g * cache["xhat"], weight.shape),
       lambda ans, x, weight, bias, eps, cache: lambda g: sum_to_shape(g, bias.shape),
       None)


# ============================================================================================
# RMSNorm: y = x / sqrt(mean(x^2) + eps) * weight, over the last axis (LlamaRMSNorm)
# ============================================================================================
#
# transformers (LlamaRMSNorm) casts x to float32 -- whatever its dtype, float64 included --
# computes x * rsqrt(mean(x^2) + eps) there, casts back to x's dtype, then multiplies by the
# weight. The reference computes in x's own dtype for float32 and float64 and in float32 for
# float16, then casts back before the weight, as transformers does. Squaring in float32,
# transformers returns 0 for rows from ~1e19 on in both dtypes (NaN for float64 rows beyond
# float32's range); the reference scales each row first (see above), with s from max|x|.


def _compute_dtype(xp: Any, x: Any) -> Any:
    """float16 is computed in float32 (as transformers does); float32 and float64 in themselves."""
    return xp.float32 if dtype_name(getval(x).dtype) == "float16" else getval(x).dtype


def _cast(xp: Any, x: Any, dtype: Any) -> Any:
    return x if dtype_name(getval(x).dtype) == dtype_name(dtype) else xp.astype(x, dtype)


def _rms_norm(x: Any, weight: Any, eps: float, cache: dict | None = None) -> Any:
    """x (..., C), weight (C,), eps a Python float -> (..., C). No checks (see rms_norm)."""
    xp = namespace(x, weight)
    xc = _cast(xp, x, _compute_dtype(xp, x))                               # (..., C) compute dtype
    inv_s = _pow2(-_row_exponent(xc))                                      # (..., 1) 1 / s, exact
    z = xc * inv_s                                                         # (..., C) x / s, exact
    ms = xp.mean(z * z, axis=-1, keepdims=True)                            # (..., 1) mean((x/s)^2)
    r = 1.0 / xp.sqrt(ms + eps * (inv_s * inv_s))                          # (..., 1) s rsqrt(mean(x^2) + eps)
    xhat = z * r                                                           # (..., C) x rsqrt(mean(x^2) + eps)
    out = _cast(xp, xhat, getval(x).dtype)                                 # back to x's dtype, then the weight
    if cache is not None:
        cache["xhat"], cache["r"], cache["inv_s"], cache["out"] = xhat, r, inv_s, out
    return out * weight


def _check_rms_norm(x: Any, weight: Any, eps: Any) -> tuple:
    checks.float_array(x, "x")
    checks.float_array(weight, "weight")
    checks.same_dtype(("x", x), ("weight", weight))
    xs = checks.shape_of(x)
    if not xs:
        raise ValueError("x must have shape (..., C), got a 0-d array")
    if checks.shape_of(weight) != (xs[-1],):
        raise ValueError(f"weight must have shape (C,) = {(xs[-1],)} (C = x.shape[-1]), got {checks.shape_of(weight)}")
    return x, weight, checks.positive_real(eps, "eps")


rms_norm = cached_primitive(_rms_norm, _check_rms_norm)
rms_norm.__doc__ = """RMSNorm over the last axis: ``x / sqrt(mean(x^2) + eps) * weight`` (LlamaRMSNorm).

    x : (..., C) float16, float32 or float64;  weight : (C,), x's dtype;  eps : positive real
    (LLaMA: ``rms_norm_eps``, 1e-5 or 1e-6). Returns (..., C) in x's dtype. eps is inside the
    square root. float32 and float64 are computed in their own precision (transformers casts
    even float64 to float32); float16 in float32, cast back before the weight (as transformers).
    Each row is scaled by a power of two first, so no row overflows (see above).
    """


# xhat = x rho with rho = (mean(x^2) + eps)^(-1/2);  d rho / d x_j = -rho^3 x_j / C, so
#   d xhat_i / d x_j = rho (delta_ij - xhat_i xhat_j / C), and with gw = dL/dxhat = g * weight:
#   dL/dx      = rho (gw - xhat mean(gw xhat))        rho = r / s: r first, then 1/s (underflows last)
#   dL/dweight = sum over rows of g xhat
def _rms_norm_vjp_x(ans, x, weight, eps, cache):
    def vjp(g):
        xp = namespace(g)
        xhat = cache["xhat"]
        gw = _cast(xp, g * weight, xhat.dtype)                                       # (..., C) dL/dxhat
        dx = (gw - xhat * xp.mean(gw * xhat, axis=-1, keepdims=True)) * cache["r"]   # (..., C) s dL/dx
        return _cast(xp, dx * cache["inv_s"], getval(x).dtype)                       # (..., C)
    return vjp


defvjp(rms_norm.primitive,
       _rms_norm_vjp_x,
       lambda ans, x, weight, eps, cache: lambda g: sum_to_shape(g * cache["out"], weight.shape),
       None)


# ============================================================================================
# GELU, GPT-2's tanh approximation ("gelu_new"): y = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
# ============================================================================================

_GELU_C = math.sqrt(2.0 / math.pi)   # Python floats: a float32 computation stays float32
_GELU_K = 0.044715


def _gelu(x: Any, cache: dict | None = None) -> Any:
    """x (...) -> (...), elementwise."""
    xp = namespace(x)
    x2 = x * x
    t = xp.tanh(_GELU_C * (x + _GELU_K * (x2 * x)))
    h = 1.0 + t
    if cache is not None:
        cache["x2"], cache["h"] = x2, h                   # kept for the backward: 4 fewer passes there
    return 0.5 * x * h


gelu = cached_primitive(_gelu)
gelu.__doc__ = """GPT-2's GELU (tanh approximation, Hugging Face ``gelu_new``), elementwise.

    ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``; x any shape, float.
    """


# dy/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2),  t the tanh above
# (product rule; d tanh(u) = (1 - tanh(u)^2) du). With h = 1 + t, 1 - t^2 = (2 - h) h, so
#       dy/dx = 0.5 h (1 + x (2 - h) (c + 3 c k x^2)),   c = sqrt(2/pi), k = 0.044715:
# the same value in 9 passes over the array instead of 13 (these layers are memory-bound).
def _gelu_vjp(ans, x, cache):
    def vjp(g):
        x2, h = cache["x2"], cache["h"]
        inner = x * (2.0 - h) * (_GELU_C + (3.0 * _GELU_C * _GELU_K) * x2)
        return (0.5 * g) * (h * (1.0 + inner))
    return vjp


defvjp(gelu.primitive, _gelu_vjp)


# ============================================================================================
# SiLU and SwiGLU: silu(x) = x sigmoid(x);  swiglu(gate, up) = silu(gate) * up  (LlamaMLP)
# ============================================================================================
#
# LLaMA's MLP is down_proj(silu(gate_proj(x)) * up_proj(x)) (Shazeer 2020, "GLU Variants Improve
# Transformer", Eq. 5-6, SwiGLU with beta = 1). With e = exp(-|x|) <= 1 and d = 1 + e in [1, 2]:
#     sigmoid(x)  = 1 / (1 + exp(-x)) = exp(min(x, 0)) / d     (x >= 0: 1 / d;  x < 0: e / d)
#     sigmoid(-x) = 1 - sigmoid(x)    = exp(-max(x, 0)) / d    (x <= 0: 1 / d;  x > 0: e / d)
# Every exp has a non-positive argument, so nothing overflows; 1 - sigmoid(x) is never formed, so
# nothing cancels; and no `where` picks between branches (each line is one formula for every x).
# exp(min(x, 0)) is e itself for x < 0 (the same exp of the same value) and exactly 1 for x >= 0.


def _sigmoids(x: Any) -> tuple[Any, Any]:
    """x -> (sigmoid(x), sigmoid(-x)), each within 4 roundings (exp counted as 2), for any finite x."""
    xp = namespace(x)
    d = 1.0 + xp.exp(-xp.abs(x))                                           # (...) in [1, 2]
    return xp.exp(xp.minimum(x, 0.0)) / d, xp.exp(-xp.maximum(x, 0.0)) / d


def _silu(x: Any, cache: dict | None = None) -> Any:
    """x (...) -> (...), elementwise."""
    sig, sig_neg = _sigmoids(x)
    if cache is not None:
        cache["sig"], cache["sig_neg"] = sig, sig_neg
    return x * sig


def _check_elementwise(x: Any) -> tuple:
    checks.float_array(x, "x")
    return (x,)


silu = cached_primitive(_silu, _check_elementwise)
silu.__doc__ = """SiLU (swish), elementwise: ``x * sigmoid(x)``; x any shape, float. LLaMA's ``hidden_act``."""


# d/dx [x sigmoid(x)] = sigmoid(x) + x sigmoid(x)(1 - sigmoid(x)) = sigmoid(x) (1 + x sigmoid(-x))
def _silu_grad(x: Any, cache: dict) -> Any:
    return cache["sig"] * (1.0 + x * cache["sig_neg"])


defvjp(silu.primitive, lambda ans, x, cache: lambda g: g * _silu_grad(x, cache))


def _swiglu(gate: Any, up: Any, cache: dict | None = None) -> Any:
    """gate (...), up (...) of one shape -> (...), elementwise."""
    sig, sig_neg = _sigmoids(gate)
    act = gate * sig                                                       # silu(gate)
    if cache is not None:
        cache["sig"], cache["sig_neg"], cache["act"] = sig, sig_neg, act
    return act * up


def _check_swiglu(gate: Any, up: Any) -> tuple:
    checks.float_array(gate, "gate")
    checks.float_array(up, "up")
    checks.same_dtype(("gate", gate), ("up", up))
    if checks.shape_of(gate) != checks.shape_of(up):
        raise ValueError(f"up must have gate's shape {checks.shape_of(gate)} (no broadcasting), "
                         f"got {checks.shape_of(up)}")
    return gate, up


swiglu = cached_primitive(_swiglu, _check_swiglu)
swiglu.__doc__ = """SwiGLU's gating, elementwise: ``silu(gate) * up``, the input of LLaMA's ``down_proj``.

    gate, up : the outputs of ``gate_proj`` and ``up_proj``, same shape (..., I) and dtype.
    """


# y = silu(gate) up:  dL/dgate = g up silu'(gate),   dL/dup = g silu(gate)
defvjp(swiglu.primitive,
       lambda ans, gate, up, cache: lambda g: (g * up) * _silu_grad(gate, cache),
       lambda ans, gate, up, cache: lambda g: g * cache["act"])


# ============================================================================================
# Cross-entropy fused with log-softmax: loss = mean over kept rows of (logsumexp(z) - z[target])
# ============================================================================================


def _cross_entropy(logits: Any, targets: Any, cache: dict | None = None) -> Any:
    """logits (..., V), integer targets (...) in [0, V) or IGNORE_INDEX -> scalar mean loss."""
    xp = namespace(logits)
    V = logits.shape[-1]
    n = _check_targets(targets, tuple(logits.shape[:-1]), V)
    z = xp.reshape(logits, (-1, V))                                   # (N, V)
    t = xp.reshape(targets, (-1,))                                    # (N,)
    z = z - xp.max(z, axis=-1, keepdims=True)                         # log-sum-exp shift: exp <= 1
    E = xp.exp(z)                                                     # (N, V)
    s = xp.sum(E, axis=-1)                                            # (N,)
    onehot = t[:, None] == xp.arange(V, dtype=t.dtype)[None, :]       # (N, V) bool; ignored rows all False
    kept = t != IGNORE_INDEX                                          # (N,)
    picked = xp.sum(xp.where(onehot, z, 0.0), axis=-1)                # (N,)  z[target]
    per_row = xp.where(kept, xp.log(s) - picked, 0.0)                 # (N,)  -log softmax(z)[target]
    if cache is not None:
        cache["E"], cache["s"], cache["onehot"], cache["kept"], cache["n"] = E, s, onehot, kept, n
    return xp.sum(per_row) / float(n)


cross_entropy = cached_primitive(_cross_entropy)
cross_entropy.__doc__ = """Mean cross-entropy of ``softmax(logits)`` against integer targets, fused.

    logits : (..., V) float;  targets : (...) integers in [0, V), or ``IGNORE_INDEX`` (-100) to
    leave a position out (as PyTorch's ``ignore_index``). Returns a 0-d array: the mean over kept
    positions of ``logsumexp(logits) - logits[target]``, computed stably (max subtracted).
    """


# d loss / d z = (softmax(z) - onehot(target)) / n on kept rows, 0 on ignored rows.
def _cross_entropy_vjp(ans, logits, targets, cache):
    def vjp(g):
        xp = namespace(logits)
        E, s, onehot, kept = cache["E"], cache["s"], cache["onehot"], cache["kept"]
        probs = E / s[:, None]                                            # (N, V)
        d = (probs - xp.astype(onehot, probs.dtype)) * xp.astype(kept, probs.dtype)[:, None]
        return xp.reshape(d * (g / float(cache["n"])), logits.shape)      # (..., V)
    return vjp


defvjp(cross_entropy.primitive, _cross_entropy_vjp, None)


# ============================================================================================
# Op sets: which computation a model runs, passed to it as a value
# ============================================================================================

# The attention layers live in attention.py, which takes cached_primitive from this file: imported
# here, after everything it needs is defined (transformer_ref/__init__.py imports this file first).
from .attention import apply_rope, causal_attention, grouped_query_attention  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Ops:
    """The callables a model computes with (immutable: build another with ``dataclasses.replace``).

    Each member takes the arguments of the layer of the same name (in this module or in
    :mod:`transformer_ref.attention`); ``linear`` takes :func:`lora_ref.lora_linear`'s ``(x, W, A,
    B, scale, bias=None, dropout_mask=None, enable_lora=None)`` (A and B None for a projection
    without an adapter). GPT-2 calls embedding, layer_norm, gelu, causal_attention, linear and
    cross_entropy; LLaMA embedding, rms_norm, apply_rope, grouped_query_attention, swiglu, linear
    and cross_entropy. The LoRA variants, called by ``hosting`` where an adapter asks for them:
    ``dora_linear`` (:func:`lora_ref.dora.dora_linear`, a DoRA projection), ``lora_embedding``
    (:func:`lora_ref.embedding.lora_embedding`, an adapted lookup) and ``lora_delta``
    (:func:`lora_ref.adapters.lora_delta`, one adapter's term ``s B A x`` when several are summed);
    each defaults to that reference function, so an op set built without them computes them so.
    """

    embedding: Callable[..., Any]
    layer_norm: Callable[..., Any]
    rms_norm: Callable[..., Any]
    gelu: Callable[..., Any]
    swiglu: Callable[..., Any]
    causal_attention: Callable[..., Any]
    grouped_query_attention: Callable[..., Any]
    apply_rope: Callable[..., Any]
    cross_entropy: Callable[..., Any]
    linear: Callable[..., Any]
    dora_linear: Callable[..., Any] = dora_linear
    lora_embedding: Callable[..., Any] = lora_embedding
    lora_delta: Callable[..., Any] = lora_delta

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if not callable(getattr(self, f.name)):
                raise TypeError(f"Ops.{f.name} must be callable, got {type(getattr(self, f.name)).__name__}")


REFERENCE = Ops(embedding=embedding, layer_norm=layer_norm, rms_norm=rms_norm, gelu=gelu, swiglu=swiglu,
                causal_attention=causal_attention, grouped_query_attention=grouped_query_attention,
                apply_rope=apply_rope, cross_entropy=cross_entropy, linear=lora_linear)
"""The reference op set: these layers, and every projection :func:`lora_ref.lora_linear` (Eq. 3 as
the paper writes it, ``W x + b + s B (A x)``, never forming ``B A``). Every model's default."""


def traced(ops: Ops) -> Ops:
    """The op set whose members are ``ops``' bare forwards (each primitive's ``.fun``).

    Differentiating a model run with ``traced(ops)`` makes ``autograd.numpy`` trace plain array
    code (NumPy backend) instead of calling the hand-written VJPs: an independent second
    derivation of every gradient, for tests. A member that is not a primitive (no ``.fun``) is
    already plain array code and is kept, so ``traced(traced(ops)) == traced(ops)``. The bare
    forwards do not check their arguments (the model has checked its inputs).
    """
    if not isinstance(ops, Ops):
        raise TypeError(f"ops must be a transformer_ref.layers.Ops, got {type(ops).__name__}")
    return Ops(**{f.name: getattr(getattr(ops, f.name), "fun", getattr(ops, f.name)) for f in dataclasses.fields(ops)})


# ============================================================================================
# Validation
# ============================================================================================


def _check_targets(targets: Any, shape: tuple[int, ...], V: int) -> int:
    """Targets: integers of ``shape`` in [0, V) or IGNORE_INDEX; returns how many are kept."""
    integer_array(targets, "targets")
    targets = getval(targets)
    if tuple(targets.shape) != shape:
        raise ValueError(f"targets must have the logits' leading shape {shape}, got {tuple(targets.shape)}")
    t = to_numpy(targets)
    bad = (t != IGNORE_INDEX) & ((t < 0) | (t >= V))
    if bad.any():
        pos = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"targets must be in [0, {V}) or {IGNORE_INDEX} (ignored), got {int(t[pos])} at position {pos}")
    n = int((t != IGNORE_INDEX).sum())
    if n == 0:
        raise ValueError(f"targets: every position is {IGNORE_INDEX} (ignored); the mean loss is undefined")
    return n

