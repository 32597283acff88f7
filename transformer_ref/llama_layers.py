"""The layers the LLaMA family adds to GPT-2's: RMSNorm, rotary position embedding (RoPE),
SiLU / SwiGLU and grouped-query causal attention. Each is a forward in array code and a backward
written out, as in transformer_ref.layers.

Contract (the same as transformer_ref.layers'): every differentiable layer is an autograd
primitive. Its forward runs on any backend (the namespace comes from its arrays) and fills a
``cache`` dict with what the backward needs (llm.c's ``forward -> (out, cache)``); its VJPs, below
it, are the hand-derived gradients with the equations beside the code. ``layer.fun`` is the same
forward undecorated: plain differentiable array code that ``autograd.numpy`` traces, so the tests
derive every gradient a second time and hold the two against each other and finite differences.
Unlike transformer_ref.layers, each public layer checks its arguments (lora_ref.checks) before
the primitive runs: these are also meant to be called one by one, as an oracle.

The facts follow transformers' ``modeling_llama.py`` (the LLaMA, Mistral, Qwen2 architecture).
Where transformers computes in a lower precision than its inputs, the reference does not, and
says so at the layer (RMSNorm and RoPE tables in float32, softmax in float32).

Shapes: B batch, T tokens, C channels (hidden_size), H query heads, Hk key/value heads,
G = H / Hk query heads per kv head (a group), D head width (head_dim), ``...`` any leading axes.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

from autograd.extend import defvjp, defvjp_argnums, primitive

from lora_ref import checks
from lora_ref.backend import dtype_name, getval, namespace

__all__ = [
    "apply_rope",
    "grouped_query_attention",
    "rms_norm",
    "rope",
    "rope_tables",
    "silu",
    "swiglu",
]


def _layer(forward: Callable[..., Any], check: Callable[..., tuple]) -> Callable[..., Any]:
    """Make ``forward(*args, cache=None)`` an autograd primitive called with a fresh cache dict,
    after ``check(*args)`` has validated the arguments (it returns them, scalars as Python types).

    The same idea as transformer_ref.layers' ``_layer`` (copied, not imported: that file is being
    restructured), plus the argument check. ``.fun`` is the undecorated forward (no checks),
    ``.primitive`` the autograd primitive on which the VJPs are defined.
    """
    p = primitive(forward)

    @functools.wraps(forward)
    def layer(*args: Any) -> Any:
        return p(*check(*args), cache={})

    layer.fun = forward
    layer.primitive = p
    return layer


def _compute_dtype(xp: Any, x: Any) -> Any:
    """float16 is computed in float32 (as transformers does); float32 and float64 in themselves."""
    return xp.float32 if dtype_name(getval(x).dtype) == "float16" else getval(x).dtype


def _cast(xp: Any, x: Any, dtype: Any) -> Any:
    return x if dtype_name(getval(x).dtype) == dtype_name(dtype) else xp.astype(x, dtype)


# ============================================================================================
# RMSNorm: y = x / sqrt(mean(x^2) + eps) * weight, over the last axis
# ============================================================================================
#
# transformers (LlamaRMSNorm) casts x to float32 -- whatever its dtype, float64 included --
# computes x * rsqrt(mean(x^2) + eps) there, casts back to x's dtype, then multiplies by the
# weight. The reference computes in x's own dtype for float32 and float64 and in float32 for
# float16, then casts back before the weight, as transformers does.
#
# Overflow. mean(x^2) overflows once |x| reaches ~1e154 (float64) or ~1e19 (float32); squaring in
# float32, transformers returns 0 for such rows from ~1e19 on in both dtypes (and NaN for float64
# rows beyond float32's range). The reference first divides each row by s, a power of
# two near its largest magnitude (exact: only the exponent changes). eps does not scale with the
# row, so it is rescaled too, and the identity is exact for any s > 0:
#   x rsqrt(mean(x^2) + eps) = (x/s) rsqrt(mean((x/s)^2) + eps/s^2)
#   because mean(x^2) + eps = s^2 (mean((x/s)^2) + eps/s^2).
# Rows with max|x| <= 1 keep s = 1 (so eps/s^2 never overflows, and ordinary rows are computed
# exactly as the textbook formula); for s > 1, eps/s^2 is exact or underflows only where it is
# below rounding against mean((x/s)^2) >= 1/(4C). A row of zeros gives 0 (and gradient w g/sqrt(eps)).
# Rounding stays relative to mean(x^2) + eps (a sum of non-negative terms) as long as eps is at
# least the dtype's smallest normal number. A non-finite x gives NaN in its row.


def _row_scale(x: Any) -> Any:
    """(..., C) -> (..., 1): per row, 2^floor(log2(max|x|)) when max|x| > 1, else 1 (an exact power of two)."""
    xp = namespace(x)
    top = xp.max(xp.abs(x), axis=-1, keepdims=True)                        # (..., 1)
    one = xp.ones_like(top)
    e = xp.floor(xp.log2(xp.where(top > 1.0, top, one)))                   # (..., 1) >= 0
    # the largest exponent of the dtype (IEEE: 1 - log2(smallest normal)); caps log2 rounding up at the top
    emax = 1 - round(math.log2(float(xp.finfo(getval(x).dtype).smallest_normal)))
    e = xp.where(e > emax, one * float(emax), e)
    return 2.0 ** e                                                        # (..., 1)


def _rms_norm(x: Any, weight: Any, eps: float, cache: dict | None = None) -> Any:
    """x (..., C), weight (C,), eps a Python float -> (..., C). No checks (see rms_norm)."""
    xp = namespace(x, weight)
    xc = _cast(xp, x, _compute_dtype(xp, x))                               # (..., C) compute dtype
    inv_s = 1.0 / _row_scale(xc)                                           # (..., 1) exact
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


rms_norm = _layer(_rms_norm, _check_rms_norm)
rms_norm.__doc__ = """RMSNorm over the last axis: ``x / sqrt(mean(x^2) + eps) * weight`` (LlamaRMSNorm).

    x : (..., C) float16, float32 or float64;  weight : (C,), x's dtype;  eps : positive real
    (LLaMA: ``rms_norm_eps``, 1e-5 or 1e-6). Returns (..., C) in x's dtype. eps is inside the
    square root. float32 and float64 are computed in their own precision (transformers casts
    even float64 to float32); float16 in float32, cast back before the weight (as transformers).
    Each row is scaled by a power of two first, so no row overflows (see the comment above).
    """


# xhat = x rho with rho = (mean(x^2) + eps)^(-1/2);  d rho / d x_j = -rho^3 x_j / C, so
#   d xhat_i / d x_j = rho (delta_ij - xhat_i xhat_j / C), and with gw = dL/dxhat = g * weight:
#   dL/dx      = rho (gw - xhat mean(gw xhat))        rho = r / s: r first, then 1/s (underflows last)
#   dL/dweight = sum over rows of g xhat
# (s, a piecewise-constant power of two, does not change y at all: it has no gradient term.)
def _rms_norm_vjp_x(ans, x, weight, eps, cache):
    def vjp(g):
        xp = namespace(g)
        xhat = cache["xhat"]
        gw = _cast(xp, g * weight, xhat.dtype)                                       # (..., C) dL/dxhat
        dx = (gw - xhat * xp.mean(gw * xhat, axis=-1, keepdims=True)) * cache["r"]   # (..., C) s dL/dx
        return _cast(xp, dx * cache["inv_s"], getval(x).dtype)                       # (..., C)
    return vjp


def _sum_leading(t: Any) -> Any:
    """(..., C) -> (C,): sum over every leading axis."""
    xp = namespace(t)
    return xp.sum(xp.reshape(t, (-1, t.shape[-1])), axis=0)                # (N, C) -> (C,)


defvjp(rms_norm.primitive,
       _rms_norm_vjp_x,
       lambda ans, x, weight, eps, cache: lambda g: _sum_leading(g * cache["out"]),
       None)


# ============================================================================================
# Rotary position embedding (RoPE), half-split ("rotate_half") convention, default rope type
# ============================================================================================
#
#   inv_freq_i = 1 / theta^(2i / D),  i = 0 .. D/2 - 1      angle(p)  = p inv_freq, duplicated to D
#   x' = x cos(angle) + rotate_half(x) sin(angle),          rotate_half(x) = [-x[D/2:], x[:D/2]]
# i.e. channels i and i + D/2 are rotated together by angle p inv_freq_i (transformers' layout,
# not the interleaved pairs of the RoFormer paper; checkpoints converted from Meta's weights had
# q_proj/k_proj rows permuted to match it).
#
# The tables: inv_freq as Python floats, angles and cos/sin in float64, then one rounding to the
# dtype. transformers computes inv_freq, angles and cos/sin in float32 whatever the model's
# dtype, so its angle at position p is off by about p * 6e-8 rad; the reference is not.


def rope_tables(positions: Any, head_dim: int, theta: float, dtype: Any,
                max_position_embeddings: int | None = None) -> tuple[Any, Any]:
    """cos, sin tables (..., D) of the default RoPE for integer ``positions`` (...), e.g. (B, T) or (T,).

    head_dim : D, even;  theta : the base (``rope_theta``, LLaMA 2: 10000, LLaMA 3: 500000);
    dtype : the tables' dtype name ("float16", "float32", "float64"), that of the arrays they rotate.
    positions must be in [0, max_position_embeddings) when that is given, else non-negative.
    Constants, not differentiated. Computed in float64 and rounded once (see above).
    """
    D = checks.positive_int(head_dim, "head_dim")
    if D % 2:
        raise ValueError(f"head_dim must be even (RoPE rotates channel pairs), got {D}")
    theta = checks.positive_real(theta, "theta")
    name = dtype_name(dtype)
    if name not in checks.FLOAT_DTYPES:
        raise TypeError(f"dtype must be one of {', '.join(checks.FLOAT_DTYPES)}, got {name}")
    checks.integer_array(positions, "positions")
    if max_position_embeddings is not None:
        limit = checks.positive_int(max_position_embeddings, "max_position_embeddings")
        checks.index_array(positions, limit, "positions", "max_position_embeddings")
    elif math.prod(checks.shape_of(positions)):
        low = int(namespace(getval(positions)).min(getval(positions)))
        if low < 0:
            raise ValueError(f"positions must be non-negative, got {low}")
    positions = getval(positions)
    xp = namespace(positions)
    inv_freq = xp.asarray([1.0 / theta ** (2 * i / D) for i in range(D // 2)], dtype=xp.float64)  # (D/2,)
    angles = xp.astype(positions, xp.float64)[..., None] * inv_freq        # (..., D/2)  p inv_freq_i
    angles = xp.concat([angles, angles], axis=-1)                          # (..., D)  duplicated halves
    out = getattr(xp, name)
    return xp.astype(xp.cos(angles), out), xp.astype(xp.sin(angles), out)


def _rotate_half(x: Any) -> Any:
    """[x1, x2] -> [-x2, x1] on the last axis: a 90-degree turn in each (i, i + D/2) plane."""
    xp = namespace(x)
    h = x.shape[-1] // 2
    return xp.concat([-x[..., h:], x[..., :h]], axis=-1)


def _apply_rope(x: Any, cos: Any, sin: Any, cache: dict | None = None) -> Any:
    """x (B, T, H, D), cos and sin (B, T, D) or (T, D) -> (B, T, H, D). No checks (see apply_rope)."""
    xp = namespace(x, cos, sin)
    c = xp.expand_dims(cos, axis=-2)                                       # (B, T, 1, D), one per head
    s = xp.expand_dims(sin, axis=-2)                                       # (B, T, 1, D)
    if cache is not None:
        cache["c"], cache["s"] = c, s
    return x * c + _rotate_half(x) * s                                     # x cos + rotate_half(x) sin


def _check_apply_rope(x: Any, cos: Any, sin: Any) -> tuple:
    for name, a in (("x", x), ("cos", cos), ("sin", sin)):
        checks.float_array(a, name)
    checks.same_dtype(("x", x), ("cos", cos), ("sin", sin))
    xs, cs = checks.shape_of(x), checks.shape_of(cos)
    if len(xs) != 4 or xs[-1] % 2:
        raise ValueError(f"x must have shape (B, T, H, D) with D even, got {xs}")
    if cs not in ((xs[0], xs[1], xs[3]), (xs[1], xs[3])):
        raise ValueError(f"cos must have shape (B, T, D) = {(xs[0], xs[1], xs[3])} or (T, D) = "
                         f"{(xs[1], xs[3])} for x of shape (B, T, H, D) = {xs}, got {cs}")
    if checks.shape_of(sin) != cs:
        raise ValueError(f"sin must have cos's shape {cs}, got {checks.shape_of(sin)}")
    return x, cos, sin


apply_rope = _layer(_apply_rope, _check_apply_rope)
apply_rope.__doc__ = """Rotate queries or keys by their positions' angles: ``x cos + rotate_half(x) sin``.

    x : (B, T, H, D), a projection's output (B, T, H D) reshaped without a transpose (the layout
    the attention below reads); cos, sin : (B, T, D) or (T, D) from :func:`rope_tables`, x's dtype,
    shared by every head. Returns (B, T, H, D). transformers' apply_rotary_pos_emb on (B, H, T, D).
    """


# y = x c + R(x) s with R = rotate_half, linear, R^T = -R (a 90-degree turn: R^T R = I, R^2 = -I):
#   dL/dx = c g + R^T(s g) = c g - R(s g)
# and since c and s repeat their halves, that is g rotated by minus the angle: the inverse rotation.
defvjp(apply_rope.primitive,
       lambda ans, x, cos, sin, cache: lambda g: g * cache["c"] - _rotate_half(g * cache["s"]),
       None, None)


def rope(x: Any, positions: Any, theta: float, max_position_embeddings: int | None = None) -> Any:
    """RoPE in one call: ``apply_rope(x, *rope_tables(positions, D, theta, x.dtype, ...))``.

    x : (B, T, H, D);  positions : integers (B, T) or (T,). Differentiable in x. A model builds the
    tables once per forward and calls :func:`apply_rope` for q and k of every layer instead.
    """
    checks.float_array(x, "x")
    xs = checks.shape_of(x)
    if len(xs) != 4:
        raise ValueError(f"x must have shape (B, T, H, D), got {xs}")
    if checks.is_array(positions) and checks.shape_of(positions) not in (xs[:2], xs[1:2]):
        raise ValueError(f"positions must have shape (B, T) = {xs[:2]} or (T,) = {xs[1:2]} for x of shape "
                         f"(B, T, H, D) = {xs}, got {checks.shape_of(positions)}")
    cos, sin = rope_tables(positions, xs[-1], theta, getval(x).dtype, max_position_embeddings)
    return apply_rope(x, cos, sin)


# ============================================================================================
# SiLU and SwiGLU: silu(x) = x sigmoid(x);  swiglu(gate, up) = silu(gate) * up  (LlamaMLP)
# ============================================================================================
#
# LLaMA's MLP is down_proj(silu(gate_proj(x)) * up_proj(x)) (Shazeer 2020, "GLU Variants Improve
# Transformer", Eq. 5-6, SwiGLU with beta = 1). sigmoid is evaluated from e = exp(-|x|) <= 1, which
# never overflows, and 1 - sigmoid(x) = sigmoid(-x) is kept apart, free of cancellation.


def _sigmoids(x: Any) -> tuple[Any, Any]:
    """x -> (sigmoid(x), sigmoid(-x)), each to a few roundings, for any finite x."""
    xp = namespace(x)
    e = xp.exp(-xp.abs(x))                                                 # in (0, 1]
    p = 1.0 / (1.0 + e)                                                    # sigmoid(|x|)
    q = e * p                                                              # sigmoid(-|x|)
    pos = x >= 0.0
    return xp.where(pos, p, q), xp.where(pos, q, p)


def _silu(x: Any, cache: dict | None = None) -> Any:
    """x (...) -> (...), elementwise."""
    sig, sig_neg = _sigmoids(x)
    if cache is not None:
        cache["sig"], cache["sig_neg"] = sig, sig_neg
    return x * sig


def _check_elementwise(x: Any) -> tuple:
    checks.float_array(x, "x")
    return (x,)


silu = _layer(_silu, _check_elementwise)
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


swiglu = _layer(_swiglu, _check_swiglu)
swiglu.__doc__ = """SwiGLU's gating, elementwise: ``silu(gate) * up``, the input of LLaMA's ``down_proj``.

    gate, up : the outputs of ``gate_proj`` and ``up_proj``, same shape (..., I) and dtype.
    """


# y = silu(gate) up:  dL/dgate = g up silu'(gate),   dL/dup = g silu(gate)
defvjp(swiglu.primitive,
       lambda ans, gate, up, cache: lambda g: (g * up) * _silu_grad(gate, cache),
       lambda ans, gate, up, cache: lambda g: g * cache["act"])


# ============================================================================================
# Grouped-query causal attention: y = softmax(q k^T * scale + causal mask) v, per query head,
# query head h reading kv head h // G
# ============================================================================================
#
# transformers repeats each kv head G times consecutively (repeat_kv: heads kv0, kv0, kv1, kv1,
# ... for G = 2) and then runs ordinary attention; query head h = kv G + g reads kv head kv. Here
# the repeat is a broadcast: q is viewed as (B, Hk, G, T, D) and each kv head as (B, Hk, 1, T, D),
# so nothing is copied, and the backward's sum over a group is a sum over the G axis. H = Hk
# (G = 1) is ordinary multi-head attention, transformer_ref.layers.causal_attention's.
# transformers' eager attention casts the scores to float32 for the softmax whatever their dtype
# (float64 too), then casts the probabilities back; the reference computes the softmax in the
# input's dtype (float32 or float64; float16 is refused). Scores are kept transposed, S^T with
# keys along axis -2, as in transformer_ref.layers (NumPy reduces faster over axis -2).


def _causal_bias(xp: Any, T: int, dtype: Any) -> Any:
    """(T, T) additive mask in the transposed layout [key j, query i]: 0 where j <= i, -inf after."""
    keep = xp.triu(xp.ones((T, T), dtype=xp.bool))                         # key j <= query i
    return xp.where(keep, xp.zeros((T, T), dtype=dtype), xp.full((T, T), -math.inf, dtype=dtype))


def _heads(xp: Any, t: Any, n: int, D: int) -> Any:
    """(B, T, n D) -> (B, n, T, D)."""
    Bsz, T, _ = t.shape
    return xp.permute_dims(xp.reshape(t, (Bsz, T, n, D)), (0, 2, 1, 3))     # (B, T, n, D) -> (B, n, T, D)


def _query_groups(xp: Any, t: Any, Hk: int, G: int, D: int) -> Any:
    """(B, T, H D) -> (B, Hk, G, T, D): query head h = kv G + g sits at [kv, g]."""
    Bsz, T, _ = t.shape
    return xp.permute_dims(xp.reshape(t, (Bsz, T, Hk, G, D)), (0, 2, 3, 1, 4))  # (B, T, Hk, G, D) -> (B, Hk, G, T, D)


def _gqa(q: Any, k: Any, v: Any, n_head: int, n_kv_head: int, scale: float, cache: dict | None = None) -> Any:
    """q (B, T, H D), k and v (B, T, Hk D) -> y (B, T, H D). No checks (see grouped_query_attention)."""
    xp = namespace(q, k, v)
    Bsz, T, HD = q.shape
    D, G = HD // n_head, n_head // n_kv_head
    qg = _query_groups(xp, q, n_kv_head, G, D)                             # (B, Hk, G, T, D)
    kh = xp.expand_dims(_heads(xp, k, n_kv_head, D), axis=2)               # (B, Hk, 1, T, D), shared by G heads
    vh = xp.expand_dims(_heads(xp, v, n_kv_head, D), axis=2)               # (B, Hk, 1, T, D)
    ST = (kh @ xp.matrix_transpose(qg)) * scale                            # (B, Hk, G, T, T)  S^T[j, i] = k_j.q_i scale
    ST = ST + _causal_bias(xp, T, ST.dtype)                                # -inf where key j > query i
    ST = ST - xp.max(ST, axis=-2, keepdims=True)                           # per query; finite (key j = i)
    E = xp.exp(ST)                                                         # masked entries: exp(-inf) = 0
    PT = E / xp.sum(E, axis=-2, keepdims=True)                             # (B, Hk, G, T, T)  P^T, softmax over keys
    Y = xp.matrix_transpose(PT) @ vh                                       # (B, Hk, G, T, D)  P V
    if cache is not None:
        cache["PT"], cache["qg"], cache["kh"], cache["vh"] = PT, qg, kh, vh
    return xp.reshape(xp.permute_dims(Y, (0, 3, 1, 2, 4)), (Bsz, T, HD))  # (B, T, Hk, G, D) -> (B, T, H D)


def _check_gqa(q: Any, k: Any, v: Any, n_head: Any, n_kv_head: Any, scale: Any) -> tuple:
    H = checks.positive_int(n_head, "n_head", "query heads")
    Hk = checks.positive_int(n_kv_head, "n_kv_head", "key/value heads")
    if H % Hk:
        raise ValueError(f"n_head ({H}) must be divisible by n_kv_head ({Hk}): each kv head serves "
                         "n_head / n_kv_head query heads")
    for name, a in (("q", q), ("k", k), ("v", v)):
        checks.float_array(a, name, ("float32", "float64"))
    checks.same_dtype(("q", q), ("k", k), ("v", v))
    qs = checks.shape_of(q)
    if len(qs) != 3 or qs[2] % H or qs[1] < 1:
        raise ValueError(f"q must have shape (B, T, n_head * D) with n_head = {H} and T >= 1, got {qs}")
    want = (qs[0], qs[1], Hk * (qs[2] // H))
    for name, a in (("k", k), ("v", v)):
        if checks.shape_of(a) != want:
            raise ValueError(f"{name} must have shape (B, T, n_kv_head * D) = {want} (D = {qs[2] // H} from q), "
                             f"got {checks.shape_of(a)}")
    return q, k, v, H, Hk, checks.positive_real(scale, "scale")


grouped_query_attention = _layer(_gqa, _check_gqa)
grouped_query_attention.__doc__ = """Causal grouped-query self-attention (LLaMA 2 70B, LLaMA 3, Mistral, Qwen2).

    q : (B, T, H D), k and v : (B, T, Hk D), after RoPE on q and k, heads along channels
    (channel c is head c // D, position c % D);  n_head : H;  n_kv_head : Hk, dividing H;
    scale : positive real (LLaMA: head_dim ** -0.5). Query head h reads kv head h // (H / Hk),
    transformers' repeat_kv order. Returns (B, T, H D): per head ``softmax(q k^T scale, masked to
    keys <= query) v``, heads concatenated (the input of ``o_proj``). float32 or float64; the
    softmax runs in that dtype (transformers' eager path runs it in float32).
    """


# Per batch and query head, with P = softmax(S), Y = P V, Gy = dL/dY (transformer_ref.layers'):
#   dV = P^T Gy           dP = Gy V^T
#   dS = P * (dP - rowsum(dP * P))       (softmax's Jacobian; masked entries have P = 0, so dS = 0)
#   dQ = scale dS K       dK = scale dS^T Q
# kept transposed (dP^T = V Gy^T, row sums over axis -2). A kv head feeds the G query heads of its
# group, so its dK and dV are the sums over the G axis of the per-query-head terms.
def _gqa_vjp(argnums, ans, args, kwargs):
    if any(i > 2 for i in argnums):
        raise TypeError("grouped_query_attention is differentiable in q, k and v only")
    q, k, v, n_head, n_kv_head, scale = args
    cache = kwargs["cache"]

    def vjp(g):
        xp = namespace(g)
        PT, qg, kh, vh = cache["PT"], cache["qg"], cache["kh"], cache["vh"]
        Bsz, T, HD = g.shape
        Hk, G, D = n_kv_head, n_head // n_kv_head, HD // n_head
        Gy = _query_groups(xp, g, Hk, G, D)                                # (B, Hk, G, T, D)  dL/dY
        out = {}
        if 0 in argnums or 1 in argnums:
            dPT = vh @ xp.matrix_transpose(Gy)                             # (B, Hk, G, T, T)  dP^T = V Gy^T
            dST = PT * (dPT - xp.sum(dPT * PT, axis=-2, keepdims=True)) * scale   # scale dS^T
            dq = xp.matrix_transpose(dST) @ kh                             # (B, Hk, G, T, D)  scale dS K
            out[0] = xp.reshape(xp.permute_dims(dq, (0, 3, 1, 2, 4)), (Bsz, T, HD))  # (B, T, Hk, G, D) -> (B, T, H D)
            dk = xp.sum(dST @ qg, axis=2)                                  # (B, Hk, T, D)  group sum of scale dS^T Q
            out[1] = xp.reshape(xp.permute_dims(dk, (0, 2, 1, 3)), (Bsz, T, Hk * D))  # (B, T, Hk, D) -> (B, T, Hk D)
        if 2 in argnums:
            dv = xp.sum(PT @ Gy, axis=2)                                   # (B, Hk, T, D)  sum over the group of P^T Gy
            out[2] = xp.reshape(xp.permute_dims(dv, (0, 2, 1, 3)), (Bsz, T, Hk * D))  # (B, T, Hk D)
        return tuple(out[i] for i in argnums)

    return vjp


defvjp_argnums(grouped_query_attention.primitive, _gqa_vjp)
