"""GPTConfig (config.json round trip, validation), parameter names, and shape-only counting,
including the LoRA paper's parameter counts (Section 5.1, |Theta| = 2 L d_model r per matrix type)."""

from __future__ import annotations

import json

import pytest

from lora_ref import LoraConfig
from transformer_ref import (
    GPTConfig,
    LlamaConfig,
    adapter_counts,
    add_adapters,
    count_parameters,
    count_trainable,
    init_params,
    lora_config_for,
    matrix_shapes,
    param_shapes,
    projection_names,
)

# openai-community/gpt2's config.json as published on the Hugging Face Hub (data, not derived).
GPT2_CONFIG_JSON = """{
  "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1,
  "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256, "initializer_range": 0.02,
  "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": 1024, "n_embd": 768, "n_head": 12,
  "n_layer": 12, "n_positions": 1024, "resid_pdrop": 0.1, "summary_activation": null,
  "summary_first_dropout": 0.1, "summary_proj_to_labels": true, "summary_type": "cls_index",
  "summary_use_proj": true, "task_specific_params": {"text-generation": {"do_sample": true, "max_length": 50}},
  "vocab_size": 50257
}"""


# ----------------------------------------------------------------------------------------------
# GPTConfig
# ----------------------------------------------------------------------------------------------


def test_config_json_round_trip(recwarn):
    d = json.loads(GPT2_CONFIG_JSON)
    config = GPTConfig.from_dict(d)
    assert not [w for w in recwarn if "not GPT-2 settings" in str(w.message)]   # every key is known
    assert config == GPTConfig()          # GPT-2 small is the default
    assert config.extra["n_ctx"] == 1024 and config.extra["architectures"] == ["GPT2LMHeadModel"]
    out = config.to_dict()
    assert {k: out[k] for k in d} == d    # every key of the file comes back unchanged
    assert GPTConfig.from_dict(json.loads(json.dumps(out))) == config
    assert config.head_dim == 64 and config.mlp_width == 3072 and GPTConfig(n_inner=100).mlp_width == 100
    assert GPTConfig.from_dict({"hidden_size": 64, "num_attention_heads": 4}).n_embd == 64


@pytest.mark.parametrize("bad, error, message", [
    ({"n_embd": 10, "n_head": 3}, ValueError, "n_embd must be divisible by n_head, got n_embd=10, n_head=3"),
    ({"activation_function": "relu"}, ValueError, "activation_function must be 'gelu_new'"),
    ({"tie_word_embeddings": "no"}, TypeError, "tie_word_embeddings must be a bool"),
    ({"add_cross_attention": True}, ValueError, "add_cross_attention must be False"),
    ({"n_layer": 0}, ValueError, "n_layer must be a positive int, got 0"),
    ({"n_head": 2.0}, TypeError, "n_head must be a positive int, got 2.0"),
    ({"layer_norm_epsilon": 0.0}, ValueError, "layer_norm_epsilon must be positive"),
    ({"attn_pdrop": 1.0}, ValueError, r"attn_pdrop must be in \[0, 1\)"),
    ({"scale_attn_weights": "yes"}, TypeError, "scale_attn_weights must be a bool"),
])
def test_config_validation(bad, error, message):
    with pytest.raises(error, match=message):
        GPTConfig(**bad)


def test_unknown_config_keys_are_kept_with_a_warning():
    with pytest.warns(UserWarning, match=r"\['rotary_dim'\] are not GPT-2 settings"):
        config = GPTConfig.from_dict({"n_embd": 32, "n_head": 4, "rotary_dim": 8})
    assert config.extra["rotary_dim"] == 8 and config.to_dict()["rotary_dim"] == 8


def test_config_from_dict_refuses_contradictions():
    with pytest.raises(ValueError, match="n_ctx=512 but n_positions=1024"):
        GPTConfig.from_dict({"n_ctx": 512, "n_positions": 1024})
    with pytest.raises(ValueError, match="model_type must be 'gpt2', got 'llama'"):
        GPTConfig.from_dict({"model_type": "llama"})
    with pytest.raises(ValueError, match="hidden_size=64 but n_embd=32"):
        GPTConfig.from_dict({"hidden_size": 64, "n_embd": 32, "n_head": 4})
    with pytest.raises(TypeError, match="needs a mapping"):
        GPTConfig.from_dict('{"n_embd": 4}')


def test_attention_scale_options():
    c = GPTConfig(n_embd=64, n_head=4, scale_attn_by_inverse_layer_idx=True)
    assert c.attn_scale(0) == 1.0 / 4.0 and c.attn_scale(3) == 1.0 / 16.0   # 1/sqrt(16) / (i + 1)
    assert GPTConfig(n_embd=64, n_head=4, scale_attn_weights=False).attn_scale(2) == 1.0


# ----------------------------------------------------------------------------------------------
# Parameter names and counts
# ----------------------------------------------------------------------------------------------


def test_param_names_are_gpt2_state_dict_names():
    shapes = param_shapes(GPTConfig(n_layer=1))
    assert list(shapes) == [
        "transformer.wte.weight", "transformer.wpe.weight",
        "transformer.h.0.ln_1.weight", "transformer.h.0.ln_1.bias",
        "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_attn.bias",
        "transformer.h.0.attn.c_proj.weight", "transformer.h.0.attn.c_proj.bias",
        "transformer.h.0.ln_2.weight", "transformer.h.0.ln_2.bias",
        "transformer.h.0.mlp.c_fc.weight", "transformer.h.0.mlp.c_fc.bias",
        "transformer.h.0.mlp.c_proj.weight", "transformer.h.0.mlp.c_proj.bias",
        "transformer.ln_f.weight", "transformer.ln_f.bias"]
    assert shapes["transformer.h.0.attn.c_attn.weight"] == (3 * 768, 768)   # (d_out, d_in)
    assert shapes["transformer.h.0.mlp.c_proj.weight"] == (768, 3072)
    assert projection_names(GPTConfig(n_layer=2))[-1] == "transformer.h.1.mlp.c_proj"


def test_gpt2_small_base_count():
    # V C + P C + L (12 C^2 + 13 C) + 2 C: per block 3C^2 + 3C (c_attn) + C^2 + C (c_proj)
    # + 4C^2 + 4C (c_fc) + 4C^2 + C (mlp c_proj) + 4C (two LayerNorms); tied lm_head not counted.
    V, P, C, L = 50257, 1024, 768, 12
    expected = V * C + P * C + L * (12 * C * C + 13 * C) + 2 * C
    assert expected == 124_439_808          # GPT-2 small's published size
    counts = count_parameters(GPTConfig())
    assert counts["base"] == expected and counts["lora"] == 0


PAPER = [
    # (name, L, d_model, matrix types, r, the paper's |Theta|) -- Section 5.1 / Table 5-6 captions
    ("RoBERTa-base q,v r=8", 12, 768, ("q", "v"), 8, 294_912),
    ("RoBERTa-large q,v r=8", 24, 1024, ("q", "v"), 8, 786_432),
    ("GPT-3 q,v r=1", 96, 12288, ("q", "v"), 1, 4_718_592),
    ("GPT-3 q,v r=8", 96, 12288, ("q", "v"), 8, 37_748_736),
    ("GPT-3 W_q r=8", 96, 12288, ("q",), 8, 18_874_368),
    ("GPT-3 W_o r=8", 96, 12288, ("o",), 8, 18_874_368),
    ("GPT-3 all four r=2", 96, 12288, ("q", "k", "v", "o"), 2, 18_874_368),
]


@pytest.mark.parametrize("name, L, d, types, r, paper", PAPER, ids=[p[0] for p in PAPER])
def test_paper_parameter_counts(name, L, d, types, r, paper):
    # |Theta| = 2 * L_LoRA * d_model * r, L_LoRA = (number of types) * L adapted matrices
    assert 2 * (len(types) * L) * d * r == paper
    config = GPTConfig(n_embd=d, n_layer=L, n_head=d // 64, n_positions=2048)
    counts = count_parameters(config, lora_config_for(types, r))
    assert counts["lora"] == paper
    assert counts["lora_by_type"] == {t: 2 * L * d * r for t in types}
    assert adapter_counts(config, types, r) == counts["lora_by_type"]
    assert len(counts["lora_by_module"]) == L * (("o" in types) + any(t in types for t in "qkv"))


def test_gpt3_base_count_by_shape():
    # 175B-class: 12 L C^2 weights dominate; the formula of test_gpt2_small_base_count again.
    V, P, C, L = 50257, 2048, 12288, 96
    counts = count_parameters(GPTConfig(n_embd=C, n_layer=L, n_head=96, n_positions=P))
    assert counts["base"] == V * C + P * C + L * (12 * C * C + 13 * C) + 2 * C
    assert 174e9 < counts["base"] < 176e9


def test_counts_equal_allocated_adapters():
    config = GPTConfig(vocab_size=16, n_positions=8, n_embd=16, n_layer=3, n_head=2)
    params = init_params(config, 0)
    assert count_parameters(config)["base"] == count_trainable(params)
    for lc in (lora_config_for(["q", "v", "mlp_out"], r=3),
               LoraConfig(r=2, alpha=1.0, target_modules=["c_attn", "c_fc"], rank_pattern={"c_fc": 5},
                          layers_to_transform=[0, 2]),
               LoraConfig(r=4, alpha=1.0, target_modules=r".*h\.1\..*")):
        adapters = add_adapters(params, config, lc, 0)
        counts = count_parameters(config, lc)
        assert counts["lora"] == count_trainable(adapters)
        assert counts["lora_by_module"] == {k: count_trainable(v) for k, v in adapters.items()}
        assert sum(counts["lora_by_type"].values()) == counts["lora"]
        assert counts["lora_fraction"] == counts["lora"] / counts["base"]
    whole = count_parameters(config, LoraConfig(r=2, alpha=1.0, target_modules=["c_attn"]))
    assert whole["lora_by_type"] == {"qkv": 3 * 2 * (16 + 48)}
    assert whole["dora_magnitude"] == 0


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_counts_include_embedding_adapters_and_doras_magnitudes(family):
    """An embedding table (V, D) adapts with r (V + D) entries, a DoRA projection (d_out, d_in) with
    r (d_in + d_out) + d_out: the counts equal what add_adapters allocates, entry for entry."""
    if family == "gpt2":
        config = GPTConfig(vocab_size=16, n_positions=8, n_embd=16, n_layer=2, n_head=2)
        tables, D = {"transformer.wte": 16, "transformer.wpe": 8}, 16
        embedded = LoraConfig(r=3, alpha=1.0, target_modules=["wte", "wpe", "c_proj"], embedding_modules=["wte", "wpe"])
        dora = LoraConfig(r=2, alpha=1.0, target_modules=["c_attn", "c_fc"], use_dora=True, layers_to_transform=[1])
        dora_shapes = {"transformer.h.1.attn.c_attn": (48, 16), "transformer.h.1.mlp.c_fc": (64, 16)}
    else:
        config = LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=8)
        tables, D = {"model.embed_tokens": 16}, 16
        embedded = LoraConfig(r=3, alpha=1.0, target_modules=["embed_tokens", "o_proj"], embedding_modules=["embed_tokens"])
        dora = LoraConfig(r=2, alpha=1.0, target_modules=["k_proj", "down_proj"], use_dora=True, layers_to_transform=[1])
        dora_shapes = {"model.layers.1.self_attn.k_proj": (8, 16), "model.layers.1.mlp.down_proj": (16, 32)}
    params = init_params(config, 0)
    for lc in (embedded, dora):
        adapters = add_adapters(params, config, lc, 0)
        counts = count_parameters(config, lc)
        assert counts["lora"] == count_trainable(adapters) == sum(counts["lora_by_type"].values())
        assert counts["lora_by_module"] == {k: count_trainable(v) for k, v in adapters.items()}
    counts = count_parameters(config, embedded)
    for name, n_rows in tables.items():                                   # r (V + D), by formula
        assert counts["lora_by_module"][name] == 3 * (n_rows + D)
        assert counts["lora_by_type"][name.rsplit(".", 1)[-1]] == 3 * (n_rows + D)
    assert counts["dora_magnitude"] == 0
    counts = count_parameters(config, dora)
    assert counts["lora_by_module"] == {m: 2 * (d_in + d_out) + d_out for m, (d_out, d_in) in dora_shapes.items()}
    assert counts["dora_magnitude"] == sum(d_out for d_out, _ in dora_shapes.values())
    plain = count_parameters(config, LoraConfig(r=2, alpha=1.0, target_modules=dora.target_modules,
                                                layers_to_transform=[1]))
    assert counts["lora"] - plain["lora"] == counts["dora_magnitude"]


def test_matrix_shapes_and_lora_config_for():
    shapes = matrix_shapes(GPTConfig(n_embd=32, n_head=4, n_inner=40))
    assert shapes == {"q": (32, 32), "k": (32, 32), "v": (32, 32), "qkv": (96, 32), "o": (32, 32),
                      "mlp_in": (40, 32), "mlp_out": (32, 40)}
    lc = lora_config_for(["v", "q", "mlp_in"], r=4, dropout=0.1)
    assert lc.enable_for("transformer.h.0.attn.c_attn") == (True, False, True)
    assert lc.targets("transformer.h.3.mlp.c_fc") and not lc.targets("transformer.h.3.mlp.c_proj")
    assert lc.scale == 1.0 and lc.dropout == 0.1
    with pytest.raises(ValueError, match=r"subset of \('q', 'k', 'v', 'o', 'mlp_in', 'mlp_out'\), got \('w_q',\)"):
        lora_config_for(["w_q"], r=4)
    with pytest.raises(TypeError, match="sets target_modules"):
        lora_config_for(["q"], r=4, target_modules=["c_attn"])
    with pytest.raises(TypeError, match="count_trainable expects a"):
        count_trainable({"a": [1, 2]})
