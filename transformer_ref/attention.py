"""Attention: GPT-2's fused causal attention, grouped-query attention and rotary position embedding.

Each layer is an autograd primitive made with :func:`transformer_ref.primitive.cached_primitive`,
under the contract of :mod:`transformer_ref.layers`: the forward is array code on any backend
that fills a ``cache`` with what the backward needs, the VJPs below it are derived by hand with
the equations beside the code, and ``layer.fun`` is the bare forward that ``autograd.numpy``
traces for the tests. These layers are in a file of their own, apart from layers.py, a
deliberate deviation from DESIGN.md (which puts every shared layer in layers.py) to keep each
file under the project's 600-line limit; :class:`transformer_ref.layers.Ops` gathers both.

* :func:`causal_attention` -- GPT-2's: the fused ``c_attn`` output [q | k | v] in, heads out;
  no argument checks (the model checks its inputs once per forward).
* :func:`rope_tables`, :func:`apply_rope`, :func:`rope` -- LLaMA's rotary position embedding,
  half-split (``rotate_half``) convention, default rope type;
* :func:`grouped_query_attention` -- LLaMA's (and Mistral's, Qwen2's) causal attention with
  ``num_key_value_heads`` dividing ``num_attention_heads``.
The LLaMA layers check their arguments (lora_ref.checks) before the primitive runs: they are also
meant to be called one by one, as an oracle. Their facts follow transformers' ``modeling_llama.py``;
where transformers computes in a lower precision than its inputs, the reference does not, and
says so at the layer (RoPE tables in float32, the eager softmax in float32).

Shapes: B batch, T tokens, C channels, H (query) heads, Hk key/value heads, G = H / Hk query heads
per kv head (a group), D head width, ``...`` any leading axes.
"""

from __future__ import annotations

import math
from typing import Any

from autograd.extend import defvjp, defvjp_argnums

from lora_ref import checks
from lora_ref.backend import dtype_name, getval, namespace

from .primitive import cached_primitive

__all__ = ["apply_rope", "causal_attention", "grouped_query_attention", "rope", "rope_tables"]


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


def _split_heads(xp: Any, qkv: Any, n_head: int) -> tuple[Any, Any, Any]:
    """qkv (B, T, 3C) = [q | k | v] -> q, k, v, each (B, H, T, D) (views): channel c of q, k or v
    is (head c // D, position c % D), Hugging Face's split of n_embd into n_head x head_dim."""
    Bsz, T, C3 = qkv.shape
    heads = xp.reshape(qkv, (Bsz, T, 3, n_head, C3 // (3 * n_head)))    # (B, T, 3, H, D)
    return tuple(xp.permute_dims(heads[:, :, i, :, :], (0, 2, 1, 3)) for i in range(3))


def _causal_attention(qkv: Any, n_head: int, scale: float, cache: dict | None = None) -> Any:
    """qkv (B, T, 3C) = [q | k | v] from ``c_attn`` -> y (B, T, C), heads concatenated.

    The heads are split with a reshape and a transpose only (no loop over heads:
    :func:`_split_heads`). The scores are computed transposed, S^T (keys along axis -2), so that the
    softmax reduces over axis -2: NumPy does that as elementwise max / add of whole rows, 1.5-2x
    faster than reducing along a short last axis.
    """
    xp = namespace(qkv)
    Bsz, T, C3 = qkv.shape
    C = C3 // 3
    q, k, v = _split_heads(xp, qkv, n_head)                             # (B, H, T, D) views
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


def _heads_view(xp: Any, x: Any, D: int) -> Any:
    """(B, T, H D) -> (B, T, H, D) (heads along channels: channel c is head c // D); 4-D x as it is."""
    return x if x.ndim == 4 else xp.reshape(x, tuple(x.shape[:2]) + (x.shape[2] // D, D))


def _apply_rope(x: Any, cos: Any, sin: Any, cache: dict | None = None) -> Any:
    """x (B, T, H, D) or (B, T, H D), cos and sin (B, T, D) or (T, D) -> x's shape. No checks (see apply_rope)."""
    xp = namespace(x, cos, sin)
    c = xp.expand_dims(cos, axis=-2)                                       # (B, T, 1, D), one per head
    s = xp.expand_dims(sin, axis=-2)                                       # (B, T, 1, D)
    if cache is not None:
        cache["c"], cache["s"] = c, s
    xh = _heads_view(xp, x, cos.shape[-1])                                 # (B, T, H, D)
    y = xh * c + _rotate_half(xh) * s                                      # x cos + rotate_half(x) sin
    return xp.reshape(y, tuple(x.shape))                                   # x's shape


def _check_apply_rope(x: Any, cos: Any, sin: Any) -> tuple:
    for name, a in (("x", x), ("cos", cos), ("sin", sin)):
        checks.float_array(a, name)
    checks.same_dtype(("x", x), ("cos", cos), ("sin", sin))
    xs, cs = checks.shape_of(x), checks.shape_of(cos)
    D = cs[-1] if cs else 0
    if not ((len(xs) == 4 and xs[-1] % 2 == 0) or (len(xs) == 3 and D and xs[-1] % D == 0)):
        raise ValueError(f"x must have shape (B, T, H, D) with D even, or (B, T, H * D) with D = cos.shape[-1] = "
                         f"{D}, got {xs}")
    D = xs[3] if len(xs) == 4 else D
    if cs not in ((xs[0], xs[1], D), (xs[1], D)):
        raise ValueError(f"cos must have shape (B, T, D) = {(xs[0], xs[1], D)} or (T, D) = "
                         f"{(xs[1], D)} for x of shape {xs}, got {cs}")
    if checks.shape_of(sin) != cs:
        raise ValueError(f"sin must have cos's shape {cs}, got {checks.shape_of(sin)}")
    return x, cos, sin


apply_rope = cached_primitive(_apply_rope, _check_apply_rope)
apply_rope.__doc__ = """Rotate queries or keys by their positions' angles: ``x cos + rotate_half(x) sin``.

    x : (B, T, H, D), or a projection's output (B, T, H D) with the heads along channels (channel
    c is head c // D, as transformers' ``view(B, T, -1, D)``); cos, sin : (B, T, D) or (T, D)
    from :func:`rope_tables`, x's dtype, shared by every head. Returns x's shape.
    transformers' apply_rotary_pos_emb on (B, H, T, D).
    """


# y = x c + R(x) s with R = rotate_half, linear, R^T = -R (a 90-degree turn: R^T R = I, R^2 = -I):
#   dL/dx = c g + R^T(s g) = c g - R(s g)
# and since c and s repeat their halves, that is g rotated by minus the angle: the inverse rotation.
def _apply_rope_vjp(ans, x, cos, sin, cache):
    def vjp(g):
        xp = namespace(g)
        gh = _heads_view(xp, g, cos.shape[-1])                              # (B, T, H, D)
        return xp.reshape(gh * cache["c"] - _rotate_half(gh * cache["s"]), tuple(g.shape))
    return vjp


defvjp(apply_rope.primitive, _apply_rope_vjp, None, None)


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
# Grouped-query causal attention: y = softmax(q k^T * scale + causal mask) v, per query head,
# query head h reading kv head h // G
# ============================================================================================
#
# transformers repeats each kv head G times consecutively (repeat_kv: heads kv0, kv0, kv1, kv1,
# ... for G = 2) and then runs ordinary attention; query head h = kv G + g reads kv head kv. Here
# the repeat is a broadcast: q is viewed as (B, Hk, G, T, D) and each kv head as (B, Hk, 1, T, D),
# so nothing is copied, and the backward's sum over a group is a sum over the G axis. H = Hk
# (G = 1) is ordinary multi-head attention, causal_attention's above.
# transformers' eager attention casts the scores to float32 for the softmax whatever their dtype
# (float64 too), then casts the probabilities back; the reference computes the softmax in the
# input's dtype (float32 or float64; float16 is refused). Scores are kept transposed, S^T with
# keys along axis -2, as in causal_attention above (NumPy reduces faster over axis -2).


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


grouped_query_attention = cached_primitive(_gqa, _check_gqa)
grouped_query_attention.__doc__ = """Causal grouped-query self-attention (LLaMA 2 70B, LLaMA 3, Mistral, Qwen2).

    q : (B, T, H D), k and v : (B, T, Hk D), after RoPE on q and k, heads along channels
    (channel c is head c // D, position c % D);  n_head : H;  n_kv_head : Hk, dividing H;
    scale : positive real (LLaMA: head_dim ** -0.5). Query head h reads kv head h // (H / Hk),
    transformers' repeat_kv order. Returns (B, T, H D): per head ``softmax(q k^T scale, masked to
    keys <= query) v``, heads concatenated (the input of ``o_proj``). float32 or float64; the
    softmax runs in that dtype (transformers' eager path runs it in float32).
    """


# Per batch and query head, with P = softmax(S), Y = P V, Gy = dL/dY (causal_attention's):
#   dV = P^T Gy           dP = Gy V^T
#   dS = P * (dP - rowsum(dP * P))       (softmax's Jacobian; masked entries have P = 0, so dS = 0)
#   dQ = scale dS K       dK = scale dS^T Q
# kept transposed (dP^T = V Gy^T, row sums over axis -2). A kv head feeds the G query heads of its
# group, so its dK and dV are the sums over the G axis of the per-query-head terms.
def _gqa_vjp_setup(argnums: tuple[int, ...], args: tuple, kwargs: dict) -> tuple[int, int, float, dict]:
    """The checks and arguments both grouped-query VJPs (this one, fast_llama's) open with:
    (n_head, n_kv_head, scale, the forward's cache)."""
    if any(i > 2 for i in argnums):
        raise TypeError("grouped_query_attention is differentiable in q, k and v only")
    _, _, _, n_head, n_kv_head, scale = args
    return n_head, n_kv_head, scale, kwargs["cache"]


def _gqa_shapes(xp: Any, g: Any, n_head: int, n_kv_head: int) -> tuple[int, int, int, int, int, int, Any]:
    """(B, T, H D), the group sizes and Gy = dL/dY per kv head's group: (Bsz, T, HD, Hk, G, D, Gy)."""
    Bsz, T, HD = g.shape
    Hk, G, D = n_kv_head, n_head // n_kv_head, HD // n_head
    return Bsz, T, HD, Hk, G, D, _query_groups(xp, g, Hk, G, D)          # Gy (B, Hk, G, T, D)


def _gqa_vjp(argnums, ans, args, kwargs):
    n_head, n_kv_head, scale, cache = _gqa_vjp_setup(argnums, args, kwargs)

    def vjp(g):
        xp = namespace(g)
        PT, qg, kh, vh = cache["PT"], cache["qg"], cache["kh"], cache["vh"]
        Bsz, T, HD, Hk, G, D, Gy = _gqa_shapes(xp, g, n_head, n_kv_head)   # Gy = dL/dY (B, Hk, G, T, D)
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
