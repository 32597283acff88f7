"""transformer_ref.llama (through the package's dispatching forward/loss) and the hosting it shares:
the config against transformers' names and defaults, identity at init, merging, gradients three
ways, causality, backends, targeting, and bad input.

Bounds as in _gpt_helpers: ``2 gamma_n M`` with n the roundings along the longest input-to-loss
path (transformer_ref.bounds.logit_rounding_chain, which counts LLaMA's RMSNorm, RoPE, attention,
SwiGLU and projections) and M the logits' magnitude (bounds.logit_magnitude) or the largest entry
of a gradient (whose backward path is at most the forward path again: 2n); exact properties exact.
"""

from __future__ import annotations

import warnings
from dataclasses import replace

import autograd
import numpy as np
import pytest
from _gpt_helpers import assert_trees_close, tree_asarray, tree_to_numpy
from autograd.test_util import check_grads
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_ref import LoraConfig, asarray, dropout_mask, to_numpy, use_backend
from lora_ref.testing import assert_within, tolerance
from transformer_ref import (
    FAST,
    REFERENCE,
    LlamaConfig,
    add_adapters,
    count_parameters,
    count_trainable,
    forward,
    init_params,
    lora_config_for,
    loss,
    merge_adapters,
    param_shapes,
    projection_names,
    traced,
)
from transformer_ref.bounds import logit_magnitude, logit_rounding_chain
from transformer_ref.fast import auto_threads

TINY = LlamaConfig(vocab_size=11, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=8, rope_theta=500000.0, rms_norm_eps=1e-5)
L = "model.layers"
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

VARIANTS = {
    "q,v (PEFT's default)": (LoraConfig(r=2, alpha=4.0, target_modules=["q_proj", "v_proj"]),
                             [f"{L}.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")]),
    "all seven, rsLoRA": (lora_config_for(["q", "k", "v", "o", "gate", "up", "down"], r=2, use_rslora=True,
                                          family="llama"), projection_names(TINY)),
    "rank/alpha patterns, layer 1": (LoraConfig(r=2, alpha=2.0, target_modules=SEVEN, layers_to_transform=[1],
                                                rank_pattern={"down_proj": 4}, alpha_pattern={"k_proj": 8.0}),
                                     [n for n in projection_names(TINY) if n.startswith(f"{L}.1.")]),
    "regex, mlp of layer 0": (LoraConfig(r=3, alpha=2.0, target_modules=r".*layers\.0\.mlp\..*"),
                              [f"{L}.0.mlp.{m}" for m in ("gate_proj", "up_proj", "down_proj")]),
}


def tiny_model(dtype="float64", seed=0, config=TINY):
    """Params with non-trivial norm weights and biases (so their gradients are exercised), weights
    scaled up so the logits are not all near zero; tokens (2, 6), targets (2, 6) with one ignored."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, value in init_params(config, rng, dtype).items():
        v = to_numpy(value).astype(np.float64)
        v = v + 0.3 * rng.standard_normal(v.shape) if name.endswith((".bias", "norm.weight")) else v * 10.0
        out[name] = v.astype(dtype)
    tokens = rng.integers(0, config.vocab_size, size=(2, 6))
    targets = rng.integers(0, config.vocab_size, size=(2, 6))
    targets[0, 0] = -100
    return out, tokens, targets


def random_adapters(params, config, lora_config, seed=1):
    return add_adapters(params, config, replace(lora_config, init="random"), np.random.default_rng(seed))


def chain(config=TINY, r=0):
    return logit_rounding_chain(config, r, T=6, loss_batch=12)


def logits_bound(params, dtype, r, config=TINY):
    return 2 * tolerance(dtype, chain(config, r)) * logit_magnitude(params, config)


# ----------------------------------------------------------------------------------------------
# Config: transformers' names and defaults, config.json in and out
# ----------------------------------------------------------------------------------------------


def test_config_defaults_are_transformers_llama_2_7b():
    c = LlamaConfig()
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads) == \
        (32000, 4096, 11008, 32, 32)
    assert (c.num_key_value_heads, c.head_dim, c.max_position_embeddings, c.rms_norm_eps, c.rope_theta) == \
        (32, 128, 2048, 1e-6, 10000.0)
    assert not (c.tie_word_embeddings or c.attention_bias or c.mlp_bias) and c.hidden_act == "silu"
    assert TINY.head_dim == 4 and TINY.attn_scale == 4 ** -0.5
    assert TINY.describe() == ("llama: 2 layers, hidden_size 16, 4 heads (2 key/value) of 4, intermediate_size 24, "
                               "vocab 11, max_position_embeddings 8")


def test_config_dict_round_trip_and_rope_spellings():
    d = TINY.to_dict()
    assert d["rope_parameters"] == {"rope_theta": 500000.0, "rope_type": "default"} and "rope_theta" not in d
    assert LlamaConfig.from_dict(d) == TINY and LlamaConfig.from_dict(d).to_dict() == d
    legacy = {k: v for k, v in d.items() if k != "rope_parameters"} | {"rope_theta": 500000.0, "rope_scaling": None}
    assert LlamaConfig.from_dict(legacy) == TINY
    meta = LlamaConfig.from_dict({**d, "architectures": ["LlamaForCausalLM"], "pad_token_id": None, "pretraining_tp": 1})
    assert meta == TINY and meta.to_dict()["architectures"] == ["LlamaForCausalLM"]
    with pytest.warns(UserWarning, match=r"keys \['new_thing'\] are not llama settings"):
        assert LlamaConfig.from_dict({**d, "new_thing": 1}).extra["new_thing"] == 1


@pytest.mark.parametrize("change, error, message", [
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, NotImplementedError, r"rope_scaling: rope_type='llama3'"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, NotImplementedError, "rope_parameters: rope_type='yarn'"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     NotImplementedError, r"\['partial_rotary_factor'\] are not implemented"),
    ({"rope_theta": 1e4, "rope_parameters": {"rope_theta": 5e5}}, ValueError, "rope_theta=10000.0 but rope_parameters"),
    ({"hidden_act": "gelu"}, NotImplementedError, "hidden_act='gelu' is not implemented"),
    ({"num_key_value_heads": 3}, ValueError, r"num_attention_heads \(4\) must be divisible by num_key_value_heads \(3\)"),
    ({"head_dim": 5}, ValueError, "head_dim must be even"),
    ({"head_dim": None, "hidden_size": 18}, ValueError, r"hidden_size \(18\) must be divisible by num_attention_heads"),
    ({"model_type": "gemma"}, ValueError, "model_type must be one of llama, mistral, qwen2, got 'gemma'"),
    ({"vocab_size": 0}, ValueError, "vocab_size must be a positive int"),
    ({"rms_norm_eps": -1.0}, ValueError, "rms_norm_eps must be positive"),
])
def test_config_refuses_what_is_not_implemented(change, error, message):
    with pytest.raises(error, match=message):
        LlamaConfig.from_dict({**TINY.to_dict(), **change})


def test_mistral_and_qwen2_are_this_architecture():
    base = {k: v for k, v in TINY.to_dict().items() if k not in ("attention_bias", "mlp_bias", "model_type")}
    mistral = LlamaConfig.from_dict({**base, "model_type": "mistral", "sliding_window": None})
    assert mistral.model_type == "mistral" and not any(mistral.has_bias(p) for p in ("self_attn.q_proj", "mlp.up_proj"))
    assert LlamaConfig.from_dict({**base, "model_type": "mistral", "sliding_window": 8}).extra["sliding_window"] == 8
    with pytest.raises(NotImplementedError, match=r"sliding_window: sliding-window attention \(sliding_window=4 < "):
        LlamaConfig.from_dict({**base, "model_type": "mistral", "sliding_window": 4})
    with pytest.raises(NotImplementedError, match="sliding_window=4096"):            # transformers' default
        LlamaConfig.from_dict({**{k: v for k, v in base.items() if k != "max_position_embeddings"},
                               "model_type": "mistral"})
    qwen = LlamaConfig.from_dict({**base, "model_type": "qwen2", "use_sliding_window": False, "sliding_window": None,
                                  "max_window_layers": 28, "layer_types": ["full_attention"] * 2})
    shapes = param_shapes(qwen)
    assert all(f"{L}.1.self_attn.{m}.bias" in shapes for m in ("q_proj", "k_proj", "v_proj"))
    assert f"{L}.1.self_attn.o_proj.bias" not in shapes and f"{L}.1.mlp.up_proj.bias" not in shapes
    with pytest.raises(NotImplementedError, match="use_sliding_window"):
        LlamaConfig.from_dict({**base, "model_type": "qwen2", "use_sliding_window": True, "sliding_window": 4})
    assert LlamaConfig.from_dict({"model_type": "qwen2"}).vocab_size == 151936     # Qwen2Config's defaults
    with pytest.raises(ValueError, match="attention_bias and mlp_bias are LLaMA settings"):
        LlamaConfig(model_type="qwen2", attention_bias=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match=r"\['attention_bias'\] are not mistral settings"):
            LlamaConfig.from_dict({**base, "model_type": "mistral", "sliding_window": None, "attention_bias": True})


def test_param_shapes_follow_transformers_state_dict():
    shapes = param_shapes(TINY)
    assert list(shapes)[:3] == ["model.embed_tokens.weight", f"{L}.0.self_attn.q_proj.weight",
                                f"{L}.0.self_attn.k_proj.weight"]
    assert shapes[f"{L}.0.self_attn.k_proj.weight"] == (8, 16) and shapes[f"{L}.0.self_attn.o_proj.weight"] == (16, 16)
    assert shapes[f"{L}.1.mlp.down_proj.weight"] == (16, 24) and shapes["lm_head.weight"] == (11, 16)
    assert list(shapes)[-2:] == ["model.norm.weight", "lm_head.weight"]
    tied = param_shapes(replace(TINY, tie_word_embeddings=True))
    assert "lm_head.weight" not in tied and len(tied) == len(shapes) - 1
    biased = param_shapes(replace(TINY, attention_bias=True, mlp_bias=True))
    assert len(biased) == len(shapes) + 2 * 7 and biased[f"{L}.0.self_attn.v_proj.bias"] == (8,)
    # 2 layers x (q 256 + k 128 + v 128 + o 256 + 3 x 384 + 2 norms 32) + embed 176 + norm 16 + head 176
    assert count_parameters(TINY)["base"] == 2 * (256 + 128 + 128 + 256 + 3 * 384 + 32) + 176 + 16 + 176


def test_init_params_follows_transformers():
    config = replace(TINY, hidden_size=64, intermediate_size=96, initializer_range=0.05, extra={"pad_token_id": 3})
    params = init_params(config, 0)
    std = config.initializer_range
    assert np.all(params[f"{L}.1.input_layernorm.weight"] == 1.0) and np.all(params["model.norm.weight"] == 1.0)
    assert np.all(params["model.embed_tokens.weight"][3] == 0.0)                   # the padding row
    for name in (f"{L}.0.mlp.down_proj.weight", f"{L}.1.self_attn.o_proj.weight", "lm_head.weight"):
        n = params[name].size              # no residual down-scaling (unlike GPT-2): every weight N(0, std^2)
        assert abs(params[name].std() - std) < 5 * std / np.sqrt(2 * n), name
    biased = init_params(replace(config, attention_bias=True), 1, "float32")
    assert np.all(biased[f"{L}.0.self_attn.q_proj.bias"] == 0.0) and biased["lm_head.weight"].dtype == np.float32


# ----------------------------------------------------------------------------------------------
# Targeting, identity at init, merging
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_add_adapters_selects_and_shapes(variant):
    lc, expected = VARIANTS[variant]
    params, _, _ = tiny_model()
    adapters = add_adapters(params, TINY, lc, 0)
    assert sorted(adapters) == sorted(expected)
    for name, ad in adapters.items():
        d_out, d_in = params[name + ".weight"].shape
        assert ad["A"].shape == (lc.rank_for(name), d_in) and ad["B"].shape == (d_out, lc.rank_for(name)), name
        assert np.all(ad["B"] == 0.0) and np.all(np.abs(ad["A"]) <= 1.0 / np.sqrt(d_in))
    assert count_parameters(TINY, lc)["lora"] == count_trainable(adapters)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("variant", VARIANTS)
def test_identity_at_init_and_merged_equals_unmerged(variant, tied, dtype):
    config = replace(TINY, tie_word_embeddings=tied, attention_bias=tied)
    lc, _ = VARIANTS[variant]
    params, tokens, _ = tiny_model(dtype, config=config)
    base = forward(params, tokens, config)
    fresh = add_adapters(params, config, lc, 0)
    masks = {n: dropout_mask((2, 6, params[n + ".weight"].shape[1]), 0.5, np.random.default_rng(1), dtype) for n in fresh}
    assert np.array_equal(forward(params, tokens, config, fresh, lc), base)            # B = 0: y + 0 == y
    assert np.array_equal(forward(params, tokens, config, fresh, lc, masks), base)
    adapters = random_adapters(params, config, lc)
    r = max(a["B"].shape[1] for a in adapters.values())
    unmerged = forward(params, tokens, config, adapters, lc)
    merged = forward(merge_adapters(params, adapters, lc), tokens, config)
    assert merged.dtype == np.dtype(dtype)
    bound = logits_bound(params, dtype, r, config)
    assert_within(merged, unmerged, bound, what=f"merged vs unmerged ({variant}, {dtype})")
    assert np.abs(base - unmerged).max() > bound                                    # the adapters matter


# ----------------------------------------------------------------------------------------------
# Gradients: hand-written VJPs == autograd.numpy on the undecorated forward == finite differences
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ops_name", ["REFERENCE", "FAST"])
@pytest.mark.parametrize("variant", ["all seven, rsLoRA", "rank/alpha patterns, layer 1"])
def test_lora_gradients_three_ways(variant, ops_name):
    lc, _ = VARIANTS[variant]
    ops = {"REFERENCE": REFERENCE, "FAST": FAST}[ops_name]
    params, tokens, targets = tiny_model()
    adapters = random_adapters(params, TINY, lc)
    first = sorted(adapters)[0]
    masks = {first: dropout_mask((2, 6, params[first + ".weight"].shape[1]), 0.25, np.random.default_rng(2))}

    def objective(ad, ops=ops):
        return loss(params, tokens, targets, TINY, ad, lc, masks, ops=ops)

    hand = autograd.grad(objective)(adapters)
    second = autograd.grad(lambda ad: objective(ad, traced(ops)))(adapters)
    r = max(a["B"].shape[1] for a in adapters.values())
    assert_trees_close(hand, second, "float64", 2 * chain(TINY, r), what=f"dL/dadapters ({variant}, {ops_name})")
    check_grads(objective, modes=["rev"], order=1)(adapters)


@pytest.mark.parametrize("tied", [False, True])
def test_full_gradients_three_ways(tied):
    config = replace(TINY, tie_word_embeddings=tied, mlp_bias=True)
    params, tokens, targets = tiny_model(config=config)

    def objective(p, ops=REFERENCE):
        return loss(p, tokens, targets, config, ops=ops)

    hand = autograd.grad(objective)(params)
    assert set(hand) == set(params)
    assert_trees_close(hand, autograd.grad(lambda p: objective(p, traced(REFERENCE)))(params), "float64",
                       2 * chain(config), what="dL/dparams")
    assert_trees_close(autograd.grad(lambda p: objective(p, FAST))(params), hand, "float64", 2 * chain(config),
                       what="dL/dparams FAST")
    check_grads(objective, modes=["rev"], order=1)(params)


@settings(max_examples=10)
@given(t=st.integers(0, 4), seed=st.integers(0, 2**31))
def test_causality(t, seed):
    """Logits at positions <= t are bitwise unchanged when tokens after t change."""
    lc = VARIANTS["all seven, rsLoRA"][0]
    params, tokens, _ = tiny_model()
    adapters = random_adapters(params, TINY, lc)
    changed = tokens.copy()
    changed[:, t + 1:] = np.random.default_rng(seed).integers(0, TINY.vocab_size, size=changed[:, t + 1:].shape)
    a, b = forward(params, tokens, TINY, adapters, lc), forward(params, changed, TINY, adapters, lc)
    assert_within(b[:, : t + 1], a[:, : t + 1], 0.0, what=f"logits up to position {t}")


def test_array_api_strict_matches_numpy():
    pytest.importorskip("array_api_strict")
    lc = VARIANTS["q,v (PEFT's default)"][0]
    params, tokens, targets = tiny_model()
    adapters = random_adapters(params, TINY, lc)
    ref_logits = forward(params, tokens, TINY, adapters, lc)
    ref_lora = autograd.grad(lambda ad: loss(params, tokens, targets, TINY, ad, lc))(adapters)
    with use_backend("array_api_strict"):
        p, a, x, y = tree_asarray(params), tree_asarray(adapters), asarray(tokens), asarray(targets)
        logits = forward(p, x, TINY, a, lc)
        g_lora = autograd.grad(lambda ad: loss(p, x, y, TINY, ad, lc))(a)
        assert type(logits).__module__.startswith("array_api_strict")
    assert_within(to_numpy(logits), ref_logits, logits_bound(params, "float64", 2), what="array_api_strict logits")
    assert_trees_close(tree_to_numpy(g_lora), ref_lora, "float64", 2 * chain(TINY, 2), what="array_api_strict dL/dA, dL/dB")


def test_auto_threads_reads_the_family():
    # the projections of one token: 2 L sum d_out d_in = 2 * 2 * (256 + 128 + 128 + 256 + 3 * 384) flops
    from transformer_ref.hosting import family_of

    assert family_of(TINY).flops_per_token(TINY) == 4 * (768 + 3 * 384)
    assert auto_threads(TINY, (2, 6)) == 1                      # far below the 0.2 GFLOP a slice must be worth


# ----------------------------------------------------------------------------------------------
# Bad input: each a named error
# ----------------------------------------------------------------------------------------------


def test_bad_tokens_and_positions():
    params, tokens, _ = tiny_model()
    bad = tokens.copy()
    bad[1, 2] = 11
    with pytest.raises(ValueError, match=r"tokens must be in \[0, 11\) \(vocab_size = 11\), got 11 at position \(1, 2\)"):
        forward(params, bad, TINY)
    with pytest.raises(ValueError, match="T=9 positions but the model has max_position_embeddings=8"):
        forward(params, np.zeros((1, 9), dtype=np.int64), TINY)


def test_bad_adapters_and_params():
    lc = VARIANTS["q,v (PEFT's default)"][0]
    params, tokens, _ = tiny_model()
    adapters = add_adapters(params, TINY, lc, 0)
    q0 = adapters[f"{L}.0.self_attn.q_proj"]
    for name in (f"{L}.0.self_attn.qkv_proj", "transformer.h.0.attn.c_attn", f"{L}.0.input_layernorm", f"{L}.2.mlp.up_proj"):
        with pytest.raises(ValueError, match=rf"'{name}', which is not a projection of this model"):
            forward(params, tokens, TINY, {name: q0}, lc)
    with pytest.raises(ValueError, match=r"k_proj'\] has A \(2, 16\) and B \(16, 2\); its weight is \(8, 16\)"):
        forward(params, tokens, TINY, {f"{L}.0.self_attn.k_proj": q0}, replace(lc, target_modules=("k_proj",)))
    fused = LoraConfig(r=2, alpha=2.0, target_modules=["q_proj"], enable_lora={"q_proj": (True, False)})
    with pytest.raises(ValueError, match="enable_lora is loralib's flag for a fused projection .* llama's projections"):
        add_adapters(params, TINY, fused, 0)
    with pytest.raises(ValueError, match=r"missing 1 of .* parameters"):
        forward({k: v for k, v in params.items() if k != "lm_head.weight"}, tokens, TINY)
    tied = replace(TINY, tie_word_embeddings=True)
    with pytest.raises(ValueError, match=r"\['lm_head.weight'\] \(lm_head.weight is tied to model.embed_tokens.weight"):
        forward(params, tokens, tied)
    name = f"{L}.0.self_attn.q_proj.weight"
    with pytest.raises(ValueError, match=r"q_proj.weight'\] has shape \(16, 16\), expected \(8, 16\)"):
        forward(params, tokens, replace(TINY, head_dim=2))                    # head_dim * heads != the weights
    with pytest.raises(TypeError, match="is float32 but model.embed_tokens.weight is float64"):
        forward({**params, name: params[name].astype(np.float32)}, tokens, TINY)
    with pytest.raises(TypeError, match="config must be a transformer_ref.GPTConfig or transformer_ref.LlamaConfig"):
        forward(params, tokens, TINY.to_dict())
    with pytest.raises(ValueError, match=r"lora_config selects no module.*model\.layers\.0\.self_attn\.q_proj"):
        add_adapters(params, TINY, LoraConfig(r=2, alpha=2.0, target_modules=["c_attn"]), 0)
