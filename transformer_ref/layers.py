"""The layers every model family shares, each a forward in array code and a backward written out.

Every layer is an autograd primitive. Its forward runs on any backend (the namespace comes from
its arrays) and fills a ``cache`` dict with what the backward needs (llm.c's ``forward -> (out,
cache)``); its VJPs, below it, are the hand-derived gradients with the equations beside the code.
Autograd only chains them, and only asks for the VJPs of arguments that are being traced.

The layers are: embedding, layer_norm, gelu, causal_attention, cross_entropy. A model calls them,
and its projections, through an op set passed to it as an argument (:class:`Ops`):

* :data:`REFERENCE` -- these layers and :func:`lora_ref.lora_linear`, Eq. 3 in the order the
  paper writes it, ``W x + b + s B (A x)``. Every model's default.
* ``transformer_ref.fast.FAST`` -- the same layers and a projection evaluated in the order that
  trains fastest; tested equal to REFERENCE. Chosen explicitly by whoever wants speed.
* ``traced(ops)`` -- each op's bare forward (``op.fun``, without its hand-written VJPs): plain
  differentiable array code, so ``autograd.numpy`` derives every gradient a second time,
  independently (the tests compare the two). A value like the others, not a switch.

Shapes: B batch, T tokens, C channels, H heads, D = C / H head width, V vocabulary,
N = B * T rows, ``...`` any leading dimensions.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import numpy as np
from autograd.extend import defvjp, primitive

from lora_ref.backend import getval, namespace, sum_to_shape, to_numpy
from lora_ref.checks import index_array, integer_array
from lora_ref.lora import lora_linear

__all__ = [
    "IGNORE_INDEX",
    "REFERENCE",
    "Ops",
    "causal_attention",
    "cached_primitive",
    "cross_entropy",
    "embedding",
    "gelu",
    "layer_norm",
    "traced",
]

IGNORE_INDEX = -100  # a target equal to this is left out of the loss (PyTorch's and HF's convention)


def cached_primitive(forward: Callable[..., Any]) -> Callable[..., Any]:
    """Make ``forward(*args, cache=None)`` an autograd primitive called with a fresh cache dict.

    The returned function has ``.fun`` (the bare forward, traceable by autograd.numpy) and
    ``.primitive`` (the autograd primitive, on which the VJPs are defined with ``defvjp``). The
    VJP makers receive the same ``cache`` dict the forward filled, so nothing is computed twice;
    a new dict per call, so nothing is shared between calls or threads.
    """
    p = primitive(forward)

    @functools.wraps(forward)
    def layer(*args: Any) -> Any:
        return p(*args, cache={})

    layer.fun = forward
    layer.primitive = p
    return layer


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


# dL/dtable[v] = sum of dL/dout over the positions where ids == v: a scatter-add. The Array API
# has none, so NumPy uses ``add.at``, CuPy ``cupyx.scatter_add``, and any other backend the
# one-hot product  dtable = onehot(ids)^T @ g  (N V C work: fine for the small vocabularies
# array_api_strict is used with, in tests).
def _embedding_vjp(ans, table, ids, cache=None):
    def vjp(g):
        xp = namespace(g)
        V, C = table.shape
        flat_ids = xp.reshape(ids, (-1,))                           # (N,)
        flat_g = xp.reshape(g, (-1, C))                             # (N, C)
        if isinstance(flat_g, np.ndarray):
            out = np.zeros((V, C), dtype=flat_g.dtype)
            np.add.at(out, np.asarray(flat_ids), flat_g)
            return out
        if type(flat_g).__module__.startswith("cupy"):
            import cupyx

            out = xp.zeros((V, C), dtype=flat_g.dtype)
            cupyx.scatter_add(out, flat_ids, flat_g)
            return out
        onehot = xp.astype(flat_ids[:, None] == xp.arange(V)[None, :], flat_g.dtype)  # (N, V)
        return xp.matrix_transpose(onehot) @ flat_g                 # (V, C)
    return vjp


defvjp(embedding.primitive, _embedding_vjp, None)


# ============================================================================================
# LayerNorm: y = (x - mean) / sqrt(var + eps) * weight + bias, over the last axis
# ============================================================================================


def _layer_norm(x: Any, weight: Any, bias: Any, eps: float, cache: dict | None = None) -> Any:
    """x (..., C), weight (C,), bias (C,), eps a Python float -> (..., C)."""
    xp = namespace(x, weight, bias)
    mean = xp.mean(x, axis=-1, keepdims=True)                       # (..., 1)
    xc = x - mean                                                   # (..., C)
    var = xp.mean(xc * xc, axis=-1, keepdims=True)                  # (..., 1) biased, as GPT-2
    rstd = 1.0 / xp.sqrt(var + eps)                                 # (..., 1)
    xhat = xc * rstd                                                # (..., C)
    if cache is not None:
        cache["xhat"], cache["rstd"] = xhat, rstd
    return xhat * weight + bias


layer_norm = cached_primitive(_layer_norm)
layer_norm.__doc__ = """LayerNorm over the last axis: ``(x - mean) / sqrt(var + eps) * weight + bias``.

    x : (..., C); weight, bias : (C,); eps : Python float (GPT-2: 1e-5). Returns (..., C).
    The variance is the biased one (divide by C), as in PyTorch and GPT-2.
    """


# With xhat = (x - mean) * rstd and g = dL/dy:
#   dL/dbias   = sum_rows g
#   dL/dweight = sum_rows g * xhat
#   dL/dx      = rstd * (gw - mean(gw) - xhat * mean(gw * xhat)),  gw = g * weight
# (the last line is d xhat/dx applied to gw: the two means remove the components along the
#  directions that the centring and the normalisation take away).
def _ln_vjp_x(ans, x, weight, bias, eps, cache):
    def vjp(g):
        xp = namespace(g)
        xhat, rstd = cache["xhat"], cache["rstd"]
        gw = g * weight                                                            # (..., C)
        return rstd * (gw - xp.mean(gw, axis=-1, keepdims=True)
                       - xhat * xp.mean(gw * xhat, axis=-1, keepdims=True))        # (..., C)
    return vjp


defvjp(layer_norm.primitive,
       _ln_vjp_x,
       lambda ans, x, weight, bias, eps, cache: lambda g: sum_to_shape(g * cache["xhat"], weight.shape),
       lambda ans, x, weight, bias, eps, cache: lambda g: sum_to_shape(g, bias.shape),
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
# Causal self-attention, all heads at once: y = softmax(q k^T * scale + causal mask) v
# ============================================================================================


def _causal_bias(xp: Any, T: int, dtype: Any) -> Any:
    """(T, T) additive mask in the transposed layout [key j, query i]: 0 where j <= i, -inf after.

    Adding it (exact: x + 0 = x) is a plain broadcast add; ``where(mask, S, -inf)`` over the
    (B, H, T, T) scores measured 6x slower in NumPy.
    """
    keep = xp.triu(xp.ones((T, T), dtype=xp.bool))                      # key j <= query i
    return xp.where(keep, xp.zeros((T, T), dtype=dtype), xp.full((T, T), -math.inf, dtype=dtype))


def _causal_attention(qkv: Any, n_head: int, scale: float, cache: dict | None = None) -> Any:
    """qkv (B, T, 3C) = [q | k | v] from ``c_attn`` -> y (B, T, C), heads concatenated.

    The heads are split with a reshape and a transpose only (no loop over heads): channel c of
    q, k or v is (head c // D, position c % D) -- Hugging Face's split of n_embd into
    n_head x head_dim. The scores are computed transposed, S^T (keys along axis -2), so that the
    softmax reduces over axis -2: NumPy does that as elementwise max / add of whole rows, 1.5-2x
    faster than reducing along a short last axis.
    """
    xp = namespace(qkv)
    Bsz, T, C3 = qkv.shape
    C = C3 // 3
    D = C // n_head
    heads = xp.reshape(qkv, (Bsz, T, 3, n_head, D))                      # (B, T, 3, H, D)
    q, k, v = (xp.permute_dims(heads[:, :, i, :, :], (0, 2, 1, 3)) for i in range(3))  # (B, H, T, D) views
    ST = (k @ xp.matrix_transpose(q)) * scale                           # (B, H, T, T)  S^T[j, i] = k_j . q_i / sqrt(D)
    ST = ST + _causal_bias(xp, T, ST.dtype)                             # -inf where key j > query i
    ST = ST - xp.max(ST, axis=-2, keepdims=True)                        # per query; finite (key j = i)
    E = xp.exp(ST)                                                      # masked entries: exp(-inf) = 0
    PT = E / xp.sum(E, axis=-2, keepdims=True)                          # (B, H, T, T)  P^T, softmax over keys
    Y = xp.matrix_transpose(PT) @ v                                     # (B, H, T, D)  P V
    if cache is not None:
        cache["PT"], cache["q"], cache["k"], cache["v"] = PT, q, k, v
    return xp.reshape(xp.permute_dims(Y, (0, 2, 1, 3)), (Bsz, T, C))    # (B, T, H, D) -> (B, T, C)


causal_attention = cached_primitive(_causal_attention)
causal_attention.__doc__ = """Causal multi-head self-attention, every head in one batched matmul.

    qkv : (B, T, 3C), the output of the fused ``c_attn`` projection, [q | k | v] along channels.
    n_head : H, with C divisible by H;  scale : Python float, GPT-2's 1/sqrt(C/H).
    Returns (B, T, C): for each head, ``softmax(q k^T * scale, masked to keys <= query) v``,
    heads concatenated along channels (the input of ``attn.c_proj``).
    """


# With P = softmax(S), Y = P V (per batch and head), G = dL/dY:
#   dV = P^T G            dP = G V^T
#   dS = P * (dP - rowsum(dP * P))       (softmax's Jacobian; masked entries have P = 0, so dS = 0)
#   dQ = scale dS K       dK = scale dS^T Q
# with the transposed scores kept by the forward: dP^T = V G^T, and the row sums of dP * P are
# sums over axis -2 of dP^T * P^T. The three gradients are stacked straight into qkv's layout.
def _attention_vjp(ans, qkv, n_head, scale, cache):
    def vjp(g):
        xp = namespace(g)
        Bsz, T, C = g.shape
        PT, q, k, v = cache["PT"], cache["q"], cache["k"], cache["v"]
        G = xp.permute_dims(xp.reshape(g, (Bsz, T, n_head, C // n_head)), (0, 2, 1, 3))  # (B, H, T, D) dL/dY
        dPT = v @ xp.matrix_transpose(G)                                  # (B, H, T, T)  dP^T = V G^T
        dST = PT * (dPT - xp.sum(dPT * PT, axis=-2, keepdims=True)) * scale  # scale dS^T
        dq = xp.matrix_transpose(dST) @ k                                 # (B, H, T, D)  scale dS K
        dk = dST @ q                                                      # (B, H, T, D)  scale dS^T Q
        dv = PT @ G                                                       # (B, H, T, D)  P^T G
        d = xp.stack([xp.permute_dims(t, (0, 2, 1, 3)) for t in (dq, dk, dv)], axis=2)  # (B, T, 3, H, D)
        return xp.reshape(d, (Bsz, T, 3 * C))                             # (B, T, 3C)
    return vjp


defvjp(causal_attention.primitive, _attention_vjp, None, None)


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


@dataclasses.dataclass(frozen=True)
class Ops:
    """The callables a model computes with (immutable: build another with ``dataclasses.replace``).

    Each member takes the arguments of the layer of the same name in this module; ``linear``
    takes :func:`lora_ref.lora_linear`'s ``(x, W, A, B, scale, bias=None, dropout_mask=None,
    enable_lora=None)`` (A and B None for a projection without an adapter).
    """

    embedding: Callable[..., Any]
    layer_norm: Callable[..., Any]
    gelu: Callable[..., Any]
    causal_attention: Callable[..., Any]
    cross_entropy: Callable[..., Any]
    linear: Callable[..., Any]

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if not callable(getattr(self, f.name)):
                raise TypeError(f"Ops.{f.name} must be callable, got {type(getattr(self, f.name)).__name__}")


REFERENCE = Ops(embedding=embedding, layer_norm=layer_norm, gelu=gelu, causal_attention=causal_attention,
                cross_entropy=cross_entropy, linear=lora_linear)
"""The reference op set: these layers, and every projection :func:`lora_ref.lora_linear` (Eq. 3 as
the paper writes it, ``W x + b + s B (A x)``, never forming ``B A``). Every model's default."""


def traced(ops: Ops) -> Ops:
    """The op set whose members are ``ops``' bare forwards (each primitive's ``.fun``).

    Differentiating a model run with ``traced(ops)`` makes ``autograd.numpy`` trace plain array
    code (NumPy backend) instead of calling the hand-written VJPs: an independent second
    derivation of every gradient, for tests. A member that is not a primitive (no ``.fun``) is
    already plain array code and is kept, so ``traced(traced(ops)) == traced(ops)``.
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

