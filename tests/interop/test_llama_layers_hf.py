"""The LLaMA layers (transformer_ref.layers, transformer_ref.attention) against transformers'
LLaMA (modeling_llama.py), PyTorch CPU.

Compared, forward and gradients (torch autograd), on a tiny ``LlamaConfig`` with grouped-query
attention (H = 4, H_kv = 2), ``rope_theta`` = 500000 and ``rms_norm_eps`` = 1e-5:
``LlamaRMSNorm``; ``LlamaRotaryEmbedding`` (the cos/sin tables) and ``apply_rotary_pos_emb``;
the attention core, ``eager_attention_forward`` (with ``repeat_kv``) and ``sdpa_attention_forward``,
fed the q, k, v that ``LlamaAttention``'s own projections and RoPE produce; the SiLU of LlamaMLP.

What transformers computes in float32 even for a float64 model -- RMSNorm (the input is cast to
float32), the RoPE tables (inv_freq, angles, cos/sin) and the eager softmax -- is compared within
bounds that count those roundings in float32: a float64 run agrees with the reference only to
float32's precision there. The bounds: each side's rounding chain (counted in
tests/transformer/test_layers.py and test_attention.py for the reference; for transformers below, beside each
test) in its precision, times the magnitude of the computation, summed over the two sides.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from transformers import LlamaConfig  # noqa: E402
from transformers.activations import ACT2FN  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402
from transformers.models.llama import modeling_llama as hf  # noqa: E402

from lora_ref.testing import assert_within, tolerance  # noqa: E402
from transformer_ref.attention import apply_rope, grouped_query_attention, rope_tables  # noqa: E402
from transformer_ref.layers import rms_norm, silu  # noqa: E402

pytestmark = pytest.mark.interop

F64, F32 = "float64", "float32"
THETA, EPS = 500000.0, 1e-5
CONFIG = dict(vocab_size=11, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
              num_key_value_heads=2, rope_theta=THETA, rms_norm_eps=EPS, max_position_embeddings=4096)
B, T = 2, 7
TORCH = {F64: torch.float64, F32: torch.float32}


def config(**changes):
    c = LlamaConfig(**{**CONFIG, **changes})
    c._attn_implementation = "eager"
    return c


def tt(a, requires_grad=False):
    return torch.tensor(np.asarray(a), requires_grad=requires_grad)


def vjp(layer, args, argnums, g):
    import autograd

    back, _ = autograd.make_vjp(lambda *a: layer(*a), argnum=tuple(argnums))(*args)
    return back(g)


def rot_abs(a):
    h = a.shape[-1] // 2
    return np.concatenate([a[..., h:], a[..., :h]], axis=-1)


# ----------------------------------------------------------------------------------------------
# RMSNorm
# ----------------------------------------------------------------------------------------------


def rms_magnitudes(x, w, g):
    x, w, g = (np.asarray(a, np.float64) for a in (x, w, g))
    rho = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + EPS)
    xhat, gw = np.abs(x) * rho, np.abs(g * w)
    M_dx = rho * (gw + xhat * np.mean(gw * xhat, axis=-1, keepdims=True))
    return xhat * np.abs(w), M_dx, (np.abs(g) * xhat).reshape(-1, x.shape[-1]).sum(0)


def llama_rms_norm(x, w, g, dtype):
    norm = hf.LlamaRMSNorm(x.shape[-1], eps=EPS).to(TORCH[dtype])
    with torch.no_grad():
        norm.weight.copy_(tt(w))
    xt = tt(x, requires_grad=True)
    y = norm(xt)
    y.backward(tt(g))
    return y.detach().numpy(), xt.grad.numpy(), norm.weight.grad.numpy()


@pytest.mark.parametrize("dtype", [F64, F32])
def test_rms_norm_matches_llama_rms_norm(dtype):
    """transformers: x cast to float32 (2 roundings' worth on xhat: x_i and the row's rms both move),
    x^2 1, mean C, + eps 1, rsqrt 2, * 1: C + 7 in float32; then the weight in the dtype: 1.
    Backward: the reference's 4C + 19 in float32 plus 2 for each of the three uses of the rounded
    xhat and rsqrt and 1 for g w cast to float32: 4C + 26; dweight: C + 7 in float32, then g * . and
    the sum over N rows in the dtype: N. The reference (its own counts): C + 6, 4C + 19, N + C + 5."""
    rng = np.random.default_rng(0)
    C = CONFIG["hidden_size"]
    x = (rng.standard_normal((B, T, C)) * 3.0).astype(dtype)
    w, g = rng.standard_normal(C).astype(dtype), rng.standard_normal((B, T, C)).astype(dtype)
    y_hf, dx_hf, dw_hf = llama_rms_norm(x, w, g, dtype)
    y = rms_norm(x, w, EPS)
    dx, dw = vjp(rms_norm, (x, w, EPS), (0, 1), g)
    My, Mdx, Mdw = rms_magnitudes(x, w, g)
    N = B * T
    assert_within(y, y_hf, (tolerance(F32, C + 7) + tolerance(dtype, 1) + tolerance(dtype, C + 6)) * My,
                  what=f"rms_norm vs LlamaRMSNorm {dtype}")
    assert_within(dx, dx_hf, (tolerance(F32, 4 * C + 26) + tolerance(dtype, 4 * C + 19)) * Mdx,
                  what=f"rms_norm dx vs LlamaRMSNorm {dtype}")
    assert_within(dw, dw_hf, (tolerance(F32, C + 7) + tolerance(dtype, N) + tolerance(dtype, N + C + 5)) * Mdw,
                  what=f"rms_norm dweight vs LlamaRMSNorm {dtype}")


def test_llama_rms_norm_loses_rows_whose_squares_overflow_float32():
    """A known limit of LlamaRMSNorm (transformers 5): it squares in float32 whatever the dtype, so a
    row with entries near 1e20 comes out as zeros (x^2 = inf, rsqrt(inf) = 0), in float32 and in
    float64 alike, and float64 entries beyond float32's range (1e39) as NaN. The reference scales
    each row first and gives x / rms(x) * w there (here against the textbook formula in float64,
    where 1e20 squared does not overflow: C + 6 roundings for the reference, C + 5 for the textbook)."""
    rng = np.random.default_rng(1)
    C = 8
    base, w, g = rng.uniform(0.5, 1.0, (1, C)), rng.standard_normal(C), rng.standard_normal((1, C))
    for dtype in (F32, F64):
        x, wd = (base * 1e20).astype(dtype), w.astype(dtype)
        y_hf = llama_rms_norm(x, wd, g.astype(dtype), dtype)[0]
        assert np.all(y_hf == 0.0)
        x64, w64 = x.astype(F64), wd.astype(F64)
        textbook = x64 / np.sqrt(np.mean(x64 * x64, axis=-1, keepdims=True) + EPS) * w64
        assert_within(rms_norm(x, wd, EPS), textbook,
                      (tolerance(dtype, C + 6) + tolerance(F64, C + 5)) * rms_magnitudes(x, wd, g)[0],
                      what=f"rms_norm at 1e20 ({dtype})")
    y_hf = llama_rms_norm(base * 1e39, w, g, F64)[0]
    assert np.all(np.isnan(y_hf))


# ----------------------------------------------------------------------------------------------
# RoPE
# ----------------------------------------------------------------------------------------------


def positions(rng):
    return np.sort(rng.integers(0, CONFIG["max_position_embeddings"], size=(B, T)), axis=1)


def test_rope_tables_match_llama_rotary_embedding():
    """transformers computes the tables in float32 for every dtype: inv_freq = 1 / theta^(i/D):
    i/D 1 rounding, amplified by up to ln(theta) in the power, the power 2 (1 ulp), the reciprocal
    1: ceil(ln theta) + 3; the angle p inv_freq 1 more (p < 2^24 is exact). So the angle is off by at
    most gamma(ceil(ln theta) + 4) |angle|, and cos, sin by that plus their own 2 (1 ulp of <= 1).
    The reference: the same chain in float64."""
    rng = np.random.default_rng(2)
    cfg = config()
    D = cfg.head_dim
    pos = positions(rng)
    emb = hf.LlamaRotaryEmbedding(cfg).to(torch.float64)
    cos_hf, sin_hf = (t.numpy() for t in emb(torch.zeros(1, dtype=torch.float64), torch.tensor(pos)))
    cos, sin = rope_tables(pos, D, THETA, F64, CONFIG["max_position_embeddings"])
    n = math.ceil(math.log(THETA)) + 4
    angle = pos[..., None] * np.tile([1.0 / THETA ** (2 * i / D) for i in range(D // 2)], 2)
    bound = (tolerance(F32, n) + tolerance(F64, n)) * angle + tolerance(F32, 2) + tolerance(F64, 2)
    assert_within(cos, cos_hf, bound, what="cos vs LlamaRotaryEmbedding")
    assert_within(sin, sin_hf, bound, what="sin vs LlamaRotaryEmbedding")


@pytest.mark.parametrize("dtype", [F64, F32])
def test_apply_rope_matches_apply_rotary_pos_emb(dtype):
    """Given the same tables: x cos + rotate_half(x) sin, 3 roundings on |x||cos| + |Rx||sin| on
    each side; the VJP 2 (torch: g cos + R^T(g sin), the reference: g cos - R(g sin))."""
    rng = np.random.default_rng(3)
    cfg = config()
    H, Hk, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    pos = positions(rng)
    cos, sin = rope_tables(pos, D, THETA, dtype)
    q, k = rng.standard_normal((B, T, H, D)).astype(dtype), rng.standard_normal((B, T, Hk, D)).astype(dtype)
    gq, gk = rng.standard_normal(q.shape).astype(dtype), rng.standard_normal(k.shape).astype(dtype)
    qt, kt = tt(q.transpose(0, 2, 1, 3), True), tt(k.transpose(0, 2, 1, 3), True)   # (B, H, T, D), HF's layout
    q_hf, k_hf = hf.apply_rotary_pos_emb(qt, kt, tt(cos), tt(sin))
    (q_hf * tt(gq.transpose(0, 2, 1, 3))).sum().add((k_hf * tt(gk.transpose(0, 2, 1, 3))).sum()).backward()
    c, s = np.abs(cos[:, :, None]).astype(F64), np.abs(sin[:, :, None]).astype(F64)
    for x, g, y_hf, dx_hf, name in ((q, gq, q_hf, qt.grad, "q"), (k, gk, k_hf, kt.grad, "k")):
        M = np.abs(x) * c + rot_abs(np.abs(x)) * s
        Mg = np.abs(g) * c + rot_abs(np.abs(g)) * s
        assert_within(apply_rope(x, cos, sin), y_hf.detach().numpy().transpose(0, 2, 1, 3), 2 * tolerance(dtype, 3) * M,
                      what=f"rope {name} vs apply_rotary_pos_emb {dtype}")
        assert_within(vjp(apply_rope, (x, cos, sin), (0,), g)[0], dx_hf.numpy().transpose(0, 2, 1, 3),
                      2 * tolerance(dtype, 2) * Mg, what=f"rope d{name} vs apply_rotary_pos_emb {dtype}")


# ----------------------------------------------------------------------------------------------
# Attention core
# ----------------------------------------------------------------------------------------------
#
# Error model (derived in tests/transformer/test_layers.py and test_attention.py): with A_i the largest
# scale |q_i|.|k_l| over the keys a query sees, the softmax's relative error is
# eps_P = 4 A_i S + P, where S bounds the relative rounding of the scores before the max is
# subtracted and P that of exp, sum and divide; then
#   y: eps_P + out(T) on P|v|        dq: 2 eps_P + dP + out(T) on Ms|K|
#   dk: 2 eps_P + dP + out(T + G) on Ms^T|Q|      dv: eps_P + out(T + G) on P^T|Gy|
# with dP the chain of dP - rowsum(dP P) up to dS and out(n) a length-n product in the output dtype.


def attention_bounds(q, k, v, g, H, Hk, scale, *, S, P, dP, out):
    """Bounds (B, T, .) on one computation's error in y, dq, dk, dv (see the model above)."""
    q, k, v, g = (np.asarray(a, np.float64) for a in (q, k, v, g))
    _, T, HD = q.shape
    D, G = HD // H, H // Hk
    res = {n: np.zeros(a.shape) for n, a in (("y", q), ("dq", q), ("dk", k), ("dv", v))}
    causal = np.tril(np.ones((T, T), bool))
    for b, h in np.ndindex(q.shape[0], H):
        qc, kc = slice(h * D, (h + 1) * D), slice((h // G) * D, (h // G + 1) * D)
        Q, K, V, Gy = (np.abs(a) for a in (q[b, :, qc], k[b, :, kc], v[b, :, kc], g[b, :, qc]))
        Sc = np.where(causal, q[b, :, qc] @ k[b, :, kc].T * scale, -np.inf)
        Pm = np.exp(Sc - Sc.max(1, keepdims=True))
        Pm /= Pm.sum(1, keepdims=True)
        eps_P = 4 * np.where(causal, Q @ K.T * scale, 0.0).max(1) * S + P           # (T,)
        bm = Gy @ V.T
        Ms = scale * Pm * (bm + (bm * Pm).sum(1, keepdims=True))
        res["y"][b, :, qc] = (eps_P + out(T))[:, None] * (Pm @ V)
        res["dq"][b, :, qc] = (2 * eps_P + dP + out(T))[:, None] * (Ms @ K)
        res["dk"][b, :, kc] += Ms.T @ (Q * (2 * eps_P + dP + out(T + G))[:, None])
        res["dv"][b, :, kc] += Pm.T @ (Gy * (eps_P + out(T + G))[:, None])
    return res


def reference_counts(dtype, D, T):
    """The reference (transformer_ref.attention), all in ``dtype``."""
    return dict(S=tolerance(dtype, D + 2), P=tolerance(dtype, T + 4), dP=tolerance(dtype, D + T + 3),
                out=lambda n: tolerance(dtype, n))


def eager_counts(dtype, D, T):
    """eager_attention_forward: scores in the dtype (dot D, * scaling 1), cast to float32 (1) and
    the max subtracted there (1); softmax in float32 (T + 4); P cast back (exact for float64) and P V
    in the dtype. Backward: dP = Gy V^T in the dtype (D), cast to float32 (1), softmax backward in
    float32 (T + 3); dq, dk, dv products in the dtype."""
    return dict(S=tolerance(dtype, D + 2) + tolerance(F32, 2), P=tolerance(F32, T + 4),
                dP=tolerance(dtype, D) + tolerance(F32, T + 4), out=lambda n: tolerance(dtype, n))


def sdpa_counts(dtype, D, T):
    """torch's scaled_dot_product_attention on CPU, whose kernel may apply sqrt(scale) to q and k
    apart (3 more on the scores) and run the softmax online over blocks of keys, rescaling the
    running sums and the output once per block (at most 3 roundings per block, at most T blocks):
    counted as D + 5 for the scores, 4T + 4 for the softmax, twice the length of each product."""
    return dict(S=tolerance(dtype, D + 5), P=tolerance(dtype, 4 * T + 4), dP=tolerance(dtype, D + 4 * T + 3),
                out=lambda n: tolerance(dtype, 2 * n))


def llama_qkv(cfg, dtype, rng):
    """q (B, H, T, D), k, v (B, H_kv, T, D) from LlamaAttention's projections (random weights) and
    transformers' RoPE at random positions, as in LlamaAttention.forward; and the module."""
    attn = hf.LlamaAttention(cfg, layer_idx=0).to(TORCH[dtype]).eval()
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(tt(rng.standard_normal(tuple(p.shape)) * 0.4))
    x = tt(rng.standard_normal((B, T, cfg.hidden_size)).astype(dtype))
    cos, sin = hf.LlamaRotaryEmbedding(cfg).to(TORCH[dtype])(x, torch.tensor(positions(rng)))
    heads = lambda t: t.view(B, T, -1, cfg.head_dim).transpose(1, 2)   # noqa: E731  (B, T, n D) -> (B, n, T, D)
    with torch.no_grad():
        q, k = hf.apply_rotary_pos_emb(heads(attn.q_proj(x)), heads(attn.k_proj(x)), cos, sin)
        v = heads(attn.v_proj(x))
    return attn, q, k, v


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("kernel", ["eager", "sdpa"])
def test_gqa_matches_llama_attention_core(dtype, kernel):
    rng = np.random.default_rng(4)
    cfg = config()
    H, Hk, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    attn, q, k, v = llama_qkv(cfg, dtype, rng)
    q, k, v = (t.clone().requires_grad_(True) for t in (q, k, v))
    g = rng.standard_normal((B, T, H * D)).astype(dtype)
    if kernel == "eager":
        mask = torch.full((T, T), -math.inf, dtype=TORCH[dtype]).triu(1)[None, None]   # (1, 1, T, T)
        y_hf, _ = hf.eager_attention_forward(attn, q, k, v, mask, scaling=attn.scaling)
    else:
        y_hf, _ = sdpa_attention_forward(attn, q, k, v, None, scaling=attn.scaling)
    y_hf = y_hf.reshape(B, T, H * D)                                    # (B, T, H, D) -> (B, T, H D)
    y_hf.backward(tt(g))
    flat = lambda t: t.detach().transpose(1, 2).reshape(B, T, -1).numpy()   # noqa: E731  (B, n, T, D) -> (B, T, n D)
    qn, kn, vn = flat(q), flat(k), flat(v)
    args = (qn, kn, vn, H, Hk, attn.scaling)
    ours = {"y": grouped_query_attention(*args)}
    ours["dq"], ours["dk"], ours["dv"] = vjp(grouped_query_attention, args, (0, 1, 2), g)
    theirs = {"y": y_hf.detach().numpy(), "dq": flat(q.grad), "dk": flat(k.grad), "dv": flat(v.grad)}
    mine = attention_bounds(qn, kn, vn, g, H, Hk, attn.scaling, **reference_counts(dtype, D, T))
    other = attention_bounds(qn, kn, vn, g, H, Hk, attn.scaling,
                             **(eager_counts if kernel == "eager" else sdpa_counts)(dtype, D, T))
    for name in ("y", "dq", "dk", "dv"):
        assert_within(ours[name], theirs[name], mine[name] + other[name], what=f"gqa {name} vs {kernel} {dtype}")


# ----------------------------------------------------------------------------------------------
# SiLU (LlamaMLP's act_fn)
# ----------------------------------------------------------------------------------------------


def test_silu_matches_llama_act_fn():
    """torch's silu: x sigmoid(x), at most 5 roundings (the reference 6). Its backward
    sigma (1 + x (1 - sigma)) forms 1 - sigma by cancellation: an absolute error up to 6u, times |x|.
    The reference's derivative: 16 on |g| (sigma + 3 |x| sigma sigma(-x)) (see the unit tests)."""
    rng = np.random.default_rng(5)
    x, g = rng.standard_normal((3, 40)) * 8.0, rng.standard_normal((3, 40))
    xt = tt(x, True)
    y_hf = ACT2FN[config().hidden_act](xt)
    y_hf.backward(tt(g))
    sig = 1.0 / (1.0 + np.exp(-x))
    assert_within(silu(x), y_hf.detach().numpy(), 2 * tolerance(F64, 6) * np.abs(x * sig), what="silu vs torch")
    M = np.abs(g) * (sig + 3.0 * np.abs(x) * sig * (1.0 - sig))
    assert_within(vjp(silu, (x,), (0,), g)[0], xt.grad.numpy(),
                  2 * tolerance(F64, 16) * M + tolerance(F64, 6) * np.abs(g * x) * sig, what="silu dx vs torch")
