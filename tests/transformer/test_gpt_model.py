"""transformer_ref.gpt2 (through the package's dispatching forward/loss) and transformer_ref.hosting:
identity at init, merging, gradients three ways, causality, backends, targeting, and bad input.

Bounds come from _gpt_helpers (chain_length: roundings along the longest path; logit_magnitude
or the largest gradient entry: the magnitude), as ``2 gamma_n M``; exact properties are exact.
"""

from __future__ import annotations

from dataclasses import replace

import autograd
import numpy as np
import pytest
from _gpt_helpers import (
    TINY,
    assert_trees_close,
    chain_length,
    logit_magnitude,
    random_adapters,
    tiny_model,
    tree_asarray,
    tree_to_numpy,
)
from autograd.test_util import check_grads
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_ref import LoraConfig, asarray, dropout_mask, to_numpy, use_backend
from lora_ref.testing import assert_within, tolerance
from transformer_ref import (
    FAST,
    REFERENCE,
    GPTConfig,
    add_adapters,
    count_trainable,
    forward,
    init_params,
    lora_config_for,
    loss,
    merge_adapters,
    projection_names,
    traced,
)

# Targeting variants: (LoraConfig, the modules it must select in TINY's two blocks).
H = "transformer.h"
VARIANTS = {
    "c_attn whole": (LoraConfig(r=2, alpha=4.0, target_modules=["c_attn"]),
                     [f"{H}.0.attn.c_attn", f"{H}.1.attn.c_attn"]),
    "q,v (enable_lora)": (lora_config_for(["q", "v"], r=2, alpha=3.0),
                          [f"{H}.0.attn.c_attn", f"{H}.1.attn.c_attn"]),
    "k only": (lora_config_for(["k"], r=1), [f"{H}.0.attn.c_attn", f"{H}.1.attn.c_attn"]),
    "c_proj suffix (attn and mlp)": (LoraConfig(r=3, alpha=2.0, target_modules=["c_proj"]),
                                     [f"{H}.{i}.{m}" for i in range(2) for m in ("attn.c_proj", "mlp.c_proj")]),
    "all, rsLoRA": (lora_config_for(["q", "k", "v", "o", "mlp_in", "mlp_out"], r=2, use_rslora=True),
                    projection_names(TINY)),
    "regex, layer 1 mlp": (LoraConfig(r=2, alpha=2.0, target_modules=r".*\.h\.1\.mlp\.c_fc"), [f"{H}.1.mlp.c_fc"]),
    "layers_to_transform": (LoraConfig(r=2, alpha=2.0, target_modules=["c_attn", "c_fc"], layers_to_transform=[1]),
                            [f"{H}.1.attn.c_attn", f"{H}.1.mlp.c_fc"]),
    "rank/alpha patterns": (LoraConfig(r=2, alpha=2.0, target_modules=["c_attn", "c_fc"],
                                       rank_pattern={"c_fc": 4}, alpha_pattern={r"h\.1\.attn\.c_attn": 8.0}),
                            [f"{H}.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "mlp.c_fc")]),
}


def logits_bound(params, dtype, r):
    # one forward pass per side; the two sides differ by at most 2 gamma_n M (see _gpt_helpers).
    return 2 * tolerance(dtype, chain_length(TINY, r)) * logit_magnitude(params, TINY)


# ----------------------------------------------------------------------------------------------
# Targeting
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_add_adapters_selects_and_shapes(variant):
    lc, expected = VARIANTS[variant]
    params, _, _ = tiny_model()
    adapters = add_adapters(params, TINY, lc, np.random.default_rng(0))
    assert sorted(adapters) == sorted(expected)
    C, F = TINY.n_embd, TINY.mlp_width
    dims = {"attn.c_attn": (3 * C, C), "attn.c_proj": (C, C), "mlp.c_fc": (F, C), "mlp.c_proj": (C, F)}
    for name, ad in adapters.items():
        d_out, d_in = next(v for k, v in dims.items() if name.endswith(k))
        r, enable = lc.rank_for(name), lc.enable_for(name)
        n, G = (1, 1) if enable is None else (sum(enable), len(enable))
        assert ad["A"].shape == (n * r, d_in) and ad["B"].shape == (n * d_out // G, r), name
        assert np.all(ad["B"] == 0.0)                         # kaiming init: B = 0 (Section 4.1)
        assert np.all(np.abs(ad["A"]) <= 1.0 / np.sqrt(d_in))  # U(-1/sqrt(d_in), 1/sqrt(d_in))
    if variant == "rank/alpha patterns":
        assert adapters[f"{H}.0.mlp.c_fc"]["A"].shape[0] == 4 and adapters[f"{H}.0.attn.c_attn"]["A"].shape[0] == 2
    assert count_trainable(adapters) == sum(a["A"].size + a["B"].size for a in adapters.values())


def test_add_adapters_selecting_nothing_lists_the_modules():
    params, _, _ = tiny_model()
    with pytest.raises(ValueError, match=r"selects no module.*transformer\.h\.0\.attn\.c_attn"):
        add_adapters(params, TINY, LoraConfig(r=2, alpha=2.0, target_modules=["q_proj"]), 0)
    with pytest.raises(ValueError, match="selects no module"):
        add_adapters(params, TINY, LoraConfig(r=2, alpha=2.0, target_modules=["c_attn"], layers_to_transform=[5]), 0)


def test_add_adapters_is_deterministic():
    params, _, _ = tiny_model()
    lc = VARIANTS["all, rsLoRA"][0]
    a1, a2 = (add_adapters(params, TINY, replace(lc, init="random"), 7) for _ in range(2))
    for name in a1:
        assert np.array_equal(a1[name]["A"], a2[name]["A"]) and np.array_equal(a1[name]["B"], a2[name]["B"])


# ----------------------------------------------------------------------------------------------
# Identity at init, merging
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_fresh_adapters_leave_logits_bitwise_unchanged(variant, dtype):
    lc, _ = VARIANTS[variant]
    params, tokens, _ = tiny_model(dtype)
    adapters = add_adapters(params, TINY, lc, np.random.default_rng(0))
    masks = {name: dropout_mask((2, 6, params[name + ".weight"].shape[1]), 0.5, np.random.default_rng(1), dtype)
             for name in adapters}
    base = forward(params, tokens, TINY)
    # B = 0 makes s B A x exactly 0, and y + 0 == y: bitwise equality, with or without dropout.
    assert np.array_equal(forward(params, tokens, TINY, adapters, lc), base)
    assert np.array_equal(forward(params, tokens, TINY, adapters, lc, masks), base)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_merged_equals_unmerged(variant, dtype):
    lc, _ = VARIANTS[variant]
    params, tokens, _ = tiny_model(dtype)
    adapters = random_adapters(params, TINY, lc)
    r = max(a["B"].shape[1] for a in adapters.values())
    unmerged = forward(params, tokens, TINY, adapters, lc, ops=REFERENCE)  # W x + s B (A x), never B A
    merged_params = merge_adapters(params, adapters, lc)
    merged = forward(merged_params, tokens, TINY)
    assert merged.dtype == np.dtype(dtype)
    assert_within(merged, unmerged, logits_bound(params, dtype, r), what=f"merged vs unmerged ({variant}, {dtype})")
    # the adapters matter by more than the bound, so a merge that dropped one would fail above
    assert np.abs(forward(params, tokens, TINY) - unmerged).max() > logits_bound(params, dtype, r)
    # a new dict: only the adapted weights are new arrays, the inputs are untouched
    assert merged_params is not params
    assert all((merged_params[k] is params[k]) == (k.removesuffix(".weight") not in adapters) for k in params)


# ----------------------------------------------------------------------------------------------
# Gradients: hand-written VJPs == autograd.numpy on the undecorated forward == finite differences
# ----------------------------------------------------------------------------------------------
# traced(ops) is the op set of undecorated forwards: autograd.numpy derives every gradient again.

GRAD_VARIANTS = ["q,v (enable_lora)", "all, rsLoRA", "rank/alpha patterns", "layers_to_transform"]


@pytest.mark.parametrize("ops_name", ["REFERENCE", "FAST"])
@pytest.mark.parametrize("variant", GRAD_VARIANTS)
def test_lora_gradients_three_ways(variant, ops_name):
    lc, _ = VARIANTS[variant]
    ops = {"REFERENCE": REFERENCE, "FAST": FAST}[ops_name]
    params, tokens, targets = tiny_model()
    adapters = random_adapters(params, TINY, lc)
    masks = {name: dropout_mask((2, 6, params[name + ".weight"].shape[1]), 0.25, np.random.default_rng(2))
             for name in list(adapters)[:1]}

    def objective(ad, ops=ops):
        return loss(params, tokens, targets, TINY, ad, lc, masks, ops=ops)

    hand = autograd.grad(objective)(adapters)
    second = autograd.grad(lambda ad: objective(ad, traced(ops)))(adapters)
    assert float(objective(adapters, traced(ops))) == pytest.approx(
        float(objective(adapters)), rel=2 * tolerance("float64", chain_length(TINY, 4)))
    r = max(a["B"].shape[1] for a in adapters.values())
    assert_trees_close(hand, second, "float64", 2 * chain_length(TINY, r), what=f"dL/dadapters ({variant}, {ops_name})")
    check_grads(objective, modes=["rev"], order=1)(adapters)


def test_lora_gradient_of_fresh_adapter_is_zero_for_A():
    # B = 0 at init, so dL/dA = s (G B)^T X = 0 exactly and only B moves on the first step.
    lc = VARIANTS["q,v (enable_lora)"][0]
    params, tokens, targets = tiny_model()
    adapters = add_adapters(params, TINY, lc, 0)
    grads = autograd.grad(lambda ad: loss(params, tokens, targets, TINY, ad, lc))(adapters)
    for name, g in grads.items():
        assert np.all(g["A"] == 0.0), name
        assert np.abs(g["B"]).max() > 0.0, name


@pytest.mark.parametrize("ops_name", ["REFERENCE", "FAST"])
def test_full_gradients_three_ways(ops_name):
    ops = {"REFERENCE": REFERENCE, "FAST": FAST}[ops_name]
    params, tokens, targets = tiny_model()

    def objective(p, ops=ops):
        return loss(p, tokens, targets, TINY, ops=ops)

    hand = autograd.grad(objective)(params)
    second = autograd.grad(lambda p: objective(p, traced(ops)))(params)
    assert set(hand) == set(params)
    assert_trees_close(hand, second, "float64", 2 * chain_length(TINY), what=f"dL/dparams ({ops_name})")
    check_grads(objective, modes=["rev"], order=1)(params)


@pytest.mark.parametrize("ops_name", ["REFERENCE", "FAST"])
def test_lora_training_never_computes_frozen_weight_gradients(ops_name, monkeypatch):
    """autograd asks the model's projection (REFERENCE: lora_linear, Eq. 3; FAST: fast.linear)
    only for VJPs of traced arguments: W's VJP never runs in LoRA mode."""
    from autograd.core import primitive_vjps

    ops = {"REFERENCE": REFERENCE, "FAST": FAST}[ops_name]
    prim = getattr(ops.linear, "primitive", ops.linear)   # fast.linear carries .primitive; lora_linear is one
    calls = []
    original = primitive_vjps[prim]                       # (argnums, ans, args, kwargs) -> vjp

    def spy(argnums, ans, args, kwargs):
        calls.extend(a for a in argnums if a == 1)      # argument 1 is W
        return original(argnums, ans, args, kwargs)

    monkeypatch.setitem(primitive_vjps, prim, spy)
    lc = VARIANTS["q,v (enable_lora)"][0]
    params, tokens, targets = tiny_model()
    adapters = random_adapters(params, TINY, lc)
    autograd.grad(lambda ad: loss(params, tokens, targets, TINY, ad, lc, ops=ops))(adapters)
    assert calls == []
    autograd.grad(lambda p: loss(p, tokens, targets, TINY, ops=ops))(params)
    assert len(calls) == 4 * TINY.n_layer + 1   # every projection and the tied lm_head


# ----------------------------------------------------------------------------------------------
# Causality
# ----------------------------------------------------------------------------------------------


@settings(max_examples=15)
@given(t=st.integers(0, 5), seed=st.integers(0, 2**31))
def test_causality(t, seed):
    """Logits at positions <= t are bitwise unchanged when tokens after t change."""
    lc = VARIANTS["all, rsLoRA"][0]
    params, tokens, _ = tiny_model()
    adapters = random_adapters(params, TINY, lc)
    rng = np.random.default_rng(seed)
    changed = tokens.copy()
    changed[:, t + 1:] = rng.integers(0, TINY.vocab_size, size=changed[:, t + 1:].shape)
    a = forward(params, tokens, TINY, adapters, lc)
    b = forward(params, changed, TINY, adapters, lc)
    # masked scores contribute exp(-inf) = 0 exactly, so nothing after t enters: exact equality
    assert_within(b[:, : t + 1], a[:, : t + 1], 0.0, what=f"logits up to position {t}")
    if t < 5 and not np.array_equal(changed, tokens):
        assert not np.array_equal(a[:, t + 1:], b[:, t + 1:])


# ----------------------------------------------------------------------------------------------
# Backends: array_api_strict (proves the code is backend-agnostic), CuPy (GPU)
# ----------------------------------------------------------------------------------------------


def _backend_matches_numpy(backend):
    lc = VARIANTS["q,v (enable_lora)"][0]
    params, tokens, targets = tiny_model()
    adapters = random_adapters(params, TINY, lc)
    ref_logits = forward(params, tokens, TINY, adapters, lc)
    ref_lora = autograd.grad(lambda ad: loss(params, tokens, targets, TINY, ad, lc))(adapters)
    ref_full = autograd.grad(lambda p: loss(p, tokens, targets, TINY))(params)
    with use_backend(backend):
        p, a = tree_asarray(params), tree_asarray(adapters)
        x, y = asarray(tokens), asarray(targets)
        logits = forward(p, x, TINY, a, lc)
        g_lora = autograd.grad(lambda ad: loss(p, x, y, TINY, ad, lc))(a)
        g_full = autograd.grad(lambda q: loss(q, x, y, TINY))(p)
        assert type(logits).__module__.split(".")[0] == backend.split(".")[0]
        assert type(g_full["transformer.wte.weight"]).__module__.split(".")[0] == backend.split(".")[0]
    # the same operations in possibly different summation orders (e.g. the embedding's backward)
    assert_within(to_numpy(logits), ref_logits, logits_bound(params, "float64", 2), what=f"{backend} logits")
    n = 2 * chain_length(TINY, 2)
    assert_trees_close(tree_to_numpy(g_lora), ref_lora, "float64", n, what=f"{backend} dL/dadapters")
    assert_trees_close(tree_to_numpy(g_full), ref_full, "float64", n, what=f"{backend} dL/dparams")


def test_array_api_strict_matches_numpy():
    pytest.importorskip("array_api_strict")
    _backend_matches_numpy("array_api_strict")


@pytest.mark.gpu
def test_cupy_matches_numpy():
    _backend_matches_numpy("cupy")


# ----------------------------------------------------------------------------------------------
# Bad input: ValueError / TypeError naming what is wrong and where
# ----------------------------------------------------------------------------------------------


def test_bad_tokens():
    params, tokens, _ = tiny_model()
    with pytest.raises(ValueError, match=r"tokens must be in \[0, 11\) \(vocab_size = 11\), got 11 at position \(1, 2\)"):
        bad = tokens.copy()
        bad[1, 2] = 11
        forward(params, bad, TINY)
    with pytest.raises(ValueError, match=r"got -3 at position \(0, 0\)"):
        bad = tokens.copy()
        bad[0, 0] = -3
        forward(params, bad, TINY)
    with pytest.raises(ValueError, match="T=9 positions but the model has n_positions=8"):
        forward(params, np.zeros((1, 9), dtype=np.int64), TINY)
    with pytest.raises(TypeError, match="tokens must be an integer array of shape \\(B, T\\), got float64"):
        forward(params, tokens.astype(np.float64), TINY)
    with pytest.raises(TypeError, match="got list"):
        forward(params, tokens.tolist(), TINY)
    with pytest.raises(ValueError, match=r"shape \(B, T\), got shape \(6,\)"):
        forward(params, tokens[0], TINY)


def test_bad_adapters():
    lc = VARIANTS["q,v (enable_lora)"][0]
    params, tokens, _ = tiny_model()
    adapters = add_adapters(params, TINY, lc, 0)
    with pytest.raises(ValueError, match=r"'transformer\.h\.7\.attn\.c_attn', which is not a projection of this model"):
        forward(params, tokens, TINY, {**adapters, "transformer.h.7.attn.c_attn": adapters[f"{H}.0.attn.c_attn"]}, lc)
    with pytest.raises(ValueError, match=r"'transformer\.h\.0\.ln_1', which is not a projection"):
        forward(params, tokens, TINY, {"transformer.h.0.ln_1": adapters[f"{H}.0.attn.c_attn"]}, lc)
    wrong = {**adapters, f"{H}.0.attn.c_attn": {"A": np.zeros((2, 8)), "B": np.zeros((16, 2))}}
    with pytest.raises(ValueError, match=r"c_attn'\] has A \(2, 8\) and B \(16, 2\).*rank 2, enable_lora=\(True, False, True\), "
                                         r"so A must be \(4, 8\) and B \(16, 2\)"):
        forward(params, tokens, TINY, wrong, lc)
    transposed = {f"{H}.0.attn.c_attn": {"A": adapters[f"{H}.0.attn.c_attn"]["A"].T,
                                         "B": adapters[f"{H}.0.attn.c_attn"]["B"]}}
    with pytest.raises(ValueError, match="A must be \\(4, 8\\)"):
        forward(params, tokens, TINY, transposed, lc)
    with pytest.raises(ValueError, match="exactly 'A' and 'B'"):
        forward(params, tokens, TINY, {f"{H}.0.attn.c_attn": {"A": adapters[f"{H}.0.attn.c_attn"]["A"]}}, lc)
    with pytest.raises(ValueError, match="without lora_config"):
        forward(params, tokens, TINY, adapters)
    with pytest.raises(TypeError, match=r"is float32 but params are float64"):
        forward(params, tokens, TINY, {k: {n: v.astype(np.float32) for n, v in a.items()} for k, a in adapters.items()}, lc)
    with pytest.raises(ValueError, match="not a projection"):
        merge_adapters(params, {"transformer.ln_f": adapters[f"{H}.0.attn.c_attn"]}, lc)
    with pytest.raises(ValueError, match=r"'transformer.wte'\] has A \(4, 8\).*table \(V, D\) is \(11, 8\).*so A must be "
                                         r"\(2, 11\) and B \(8, 2\)"):
        merge_adapters(params, {"transformer.wte": adapters[f"{H}.0.attn.c_attn"]}, replace(lc, embedding_modules=["wte"]))
    with pytest.raises(ValueError, match=r"dropout has a mask for 'transformer\.h\.0\.mlp\.c_fc', which has no adapter"):
        forward(params, tokens, TINY, adapters, lc, {f"{H}.0.mlp.c_fc": np.ones((2, 6, 8))})
    with pytest.raises(ValueError, match=r"dropout\['transformer\.h\.0\.attn\.c_attn'\] has shape \(2, 5, 8\)"):
        forward(params, tokens, TINY, adapters, lc, {f"{H}.0.attn.c_attn": np.ones((2, 5, 8))})


def test_bad_params_and_config():
    params, tokens, _ = tiny_model()
    with pytest.raises(ValueError, match="missing 1 of"):
        forward({k: v for k, v in params.items() if k != "transformer.ln_f.bias"}, tokens, TINY)
    with pytest.raises(ValueError, match=r"names this config does not have: \['lm_head\.weight'\]"):
        forward({**params, "lm_head.weight": params["transformer.wte.weight"]}, tokens, TINY)
    name = f"{H}.0.mlp.c_fc.weight"
    with pytest.raises(ValueError, match=r"has shape \(8, 32\), expected \(32, 8\) \(projection weights are \(d_out, d_in\)"):
        forward({**params, name: params[name].T}, tokens, TINY)
    with pytest.raises(TypeError, match="must be float32 or float64, got int64"):
        forward({**params, name: params[name].astype(np.int64)}, tokens, TINY)
    with pytest.raises(TypeError, match="is float32 but transformer.wte.weight is float64"):
        forward({**params, name: params[name].astype(np.float32)}, tokens, TINY)
    with pytest.raises(TypeError, match="config must be a transformer_ref.GPTConfig or transformer_ref.LlamaConfig, got dict"):
        forward(params, tokens, TINY.to_dict())
    with pytest.raises(TypeError, match=r"ops must be a transformer_ref.layers.Ops \(REFERENCE, FAST, ...\), got str"):
        forward(params, tokens, TINY, ops="FAST")
    with pytest.raises(TypeError, match="dtype must be float32 or float64, got float16"):
        init_params(TINY, 0, "float16")
    with pytest.raises(TypeError, match="seed must be an int seed or a numpy.random.Generator, got float"):
        init_params(TINY, 0.5)


# ----------------------------------------------------------------------------------------------
# init_params: GPT-2's initialisation
# ----------------------------------------------------------------------------------------------


def test_init_params_follows_gpt2():
    config = GPTConfig(vocab_size=64, n_positions=16, n_embd=32, n_layer=8, n_head=4)
    params = init_params(config, 0)
    std = config.initializer_range
    assert np.all(params[f"{H}.3.ln_1.weight"] == 1.0) and np.all(params[f"{H}.3.ln_1.bias"] == 0.0)
    assert np.all(params[f"{H}.3.attn.c_attn.bias"] == 0.0)
    # sample standard deviations: the standard error of a sample std over n draws is std / sqrt(2 n);
    # 5 standard errors make a spurious failure a < 1e-6 event while a wrong scale (x4 for the
    # residual projections at n_layer = 8) is hundreds of standard errors off.
    for name, want in ((f"{H}.0.mlp.c_fc.weight", std), ("transformer.wte.weight", std),
                       (f"{H}.0.attn.c_proj.weight", std / np.sqrt(2 * 8)), (f"{H}.0.mlp.c_proj.weight", std / np.sqrt(2 * 8))):
        n = params[name].size
        assert abs(params[name].std() - want) < 5 * want / np.sqrt(2 * n), name
    assert np.array_equal(init_params(config, 3)["transformer.wte.weight"], init_params(config, 3)["transformer.wte.weight"])
    assert init_params(config, 0, "float32")["transformer.wpe.weight"].dtype == np.float32


@pytest.mark.parametrize("dtype, log2_scale", [("float64", 520), ("float32", 72)])
@pytest.mark.parametrize("ops_name", ["REFERENCE", "FAST"])
def test_forward_with_a_residual_stream_whose_variance_overflows(dtype, log2_scale, ops_name):
    """Issue 11, item 2, at the model: embeddings scaled by c = 2^k, so large that the residual
    stream's variance overflows the dtype (c |e| about 1e155 in float64, 1e20 in float32). Before
    the fix LayerNorm returned zeros and every position got the same logits.

    The expected logits follow from LayerNorm's scale invariance: every block adds O(1) to a stream
    of size c |e|, below its last bit, so the stream stays fl(c e) = c e exactly (c a power of two),
    and ln_f(c e) is LayerNorm of e with eps replaced by eps / c^2 (below the last bit: 0). So the
    logits are ln_f(wte[t] + wpe[p]) with eps = 0, times lm_head^T, computed on the unscaled
    embeddings (an untied head, so the head is not scaled): the embedding sum (1 rounding), one
    LayerNorm chain (2C + 5) and one length-C dot product (C)."""
    config = replace(TINY, tie_word_embeddings=False)
    params, tokens, _ = tiny_model("float64", config=config)
    params = {k: v.astype(dtype).astype(np.float64) for k, v in params.items()}        # what the dtype holds
    e = params["transformer.wte.weight"][tokens] + params["transformer.wpe.weight"][np.arange(tokens.shape[1])]
    c = 2.0 ** log2_scale
    big = dict(params)
    for name in ("transformer.wte.weight", "transformer.wpe.weight"):
        big[name] = params[name] * c
    big = {k: v.astype(dtype) for k, v in big.items()}
    with np.errstate(over="ignore"):
        assert not np.isfinite(np.sum(np.square(c * e.astype(dtype)), axis=-1)).all()   # the variance does overflow

    got = to_numpy(forward(big, tokens, config, ops=REFERENCE if ops_name == "REFERENCE" else FAST))

    w, b = params["transformer.ln_f.weight"], params["transformer.ln_f.bias"]
    xc = e - e.mean(-1, keepdims=True)
    rstd = 1.0 / np.sqrt((xc * xc).mean(-1, keepdims=True))                           # eps / var(c e): below the last bit
    head = params["lm_head.weight"]
    expected = (xc * rstd * w + b) @ head.T                                             # (B, T, V)
    C = config.n_embd
    M = (np.abs(xc * rstd * w) + np.abs(b)) @ np.abs(head).T                            # the dot products' terms
    assert np.isfinite(got).all()
    assert_within(got, expected, 2 * tolerance(dtype, 1 + 2 * C + 5 + C) * M, what=f"logits, stream scaled by 2^{log2_scale}")
    assert np.ptp(got, axis=(0, 1)).max() > 0.0                                         # positions differ
