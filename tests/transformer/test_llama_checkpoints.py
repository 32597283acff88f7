"""transformer_ref.checkpoints for the LLaMA family, and the size checks of both loaders, without PyTorch.

A checkpoint written by save_hf_llama reads back bit for bit (tied and untied heads, biases,
sharded with an index, LlamaModel's bare keys); load_checkpoint picks the family from model_type;
damaged or inconsistent files raise errors that name the file and key; the sizes config.json
declares are checked against the tensors before any per-layer work (issue 11, item 6), so an
inflated num_hidden_layers / n_layer fails at once with little memory.
"""

from __future__ import annotations

import json
import tracemalloc
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

from transformer_ref import (
    CheckpointFormatError,
    GPTConfig,
    LlamaConfig,
    init_params,
    load_checkpoint,
    load_hf_gpt2,
    load_hf_llama,
    param_shapes,
    save_hf_gpt2,
    save_hf_llama,
)

TINY = LlamaConfig(vocab_size=11, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=8, rope_theta=500000.0, rms_norm_eps=1e-5)
GPT = GPTConfig(vocab_size=11, n_positions=8, n_embd=8, n_layer=2, n_head=2)


def read(path: Path) -> dict[str, np.ndarray]:
    return dict(safetensors.numpy.load_file(str(path)))


def rewrite(folder: Path, change) -> None:
    safetensors.numpy.save_file(change({k: np.array(v) for k, v in read(folder / "model.safetensors").items()}),
                                str(folder / "model.safetensors"))


def edit_config(folder: Path, **changes) -> None:
    raw = json.loads((folder / "config.json").read_text())
    raw.update(changes)
    (folder / "config.json").write_text(json.dumps(raw))


@pytest.mark.parametrize("config", [TINY, replace(TINY, tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
                                    replace(TINY, model_type="qwen2"), replace(TINY, model_type="mistral")],
                         ids=["untied", "tied+biases", "qwen2", "mistral"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_round_trip(tmp_path, config, dtype):
    params = init_params(config, 3, dtype)
    save_hf_llama(tmp_path / "m", config, params)
    stored = read(tmp_path / "m" / "model.safetensors")
    assert set(stored) == set(param_shapes(config)) and ("lm_head.weight" in stored) != config.tie_word_embeddings
    raw = json.loads((tmp_path / "m" / "config.json").read_text())
    assert raw["model_type"] == config.model_type and raw["dtype"] == dtype
    assert raw["architectures"] == [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                                     "qwen2": "Qwen2ForCausalLM"}[config.model_type]]
    loaded_config, loaded = load_checkpoint(tmp_path / "m")
    assert loaded_config == config and list(loaded) == list(param_shapes(config))
    for name, value in params.items():       # nn.Linear (d_out, d_in): stored as it is, no transpose
        assert loaded[name].dtype == value.dtype and np.array_equal(loaded[name], value) and \
            np.array_equal(stored[name], value), name
    assert load_hf_llama(tmp_path / "m", dtype="float64")[1]["model.norm.weight"].dtype == np.float64


def test_sharded_checkpoints_and_bare_llama_model_keys(tmp_path):
    params = init_params(TINY, 4, "float32")
    save_hf_llama(tmp_path / "m", TINY, params)
    tensors = read(tmp_path / "m" / "model.safetensors")
    (tmp_path / "m" / "model.safetensors").unlink()
    names = list(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:7], "model-00002-of-00002.safetensors": names[7:]}
    for shard, keys in shards.items():
        safetensors.numpy.save_file({k: tensors[k] for k in keys}, str(tmp_path / "m" / shard))
    index = {"metadata": {"total_size": 0}, "weight_map": {k: s for s, keys in shards.items() for k in keys}}
    (tmp_path / "m" / "model.safetensors.index.json").write_text(json.dumps(index))
    _, loaded = load_hf_llama(tmp_path / "m")
    assert all(np.array_equal(loaded[k], v) for k, v in params.items())
    # a shard holding a tensor the index does not list for it, a listed tensor missing, a path as shard
    bad = {**index["weight_map"], "model.norm.weight": "model-00001-of-00002.safetensors"}
    (tmp_path / "m" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": bad}))
    with pytest.raises(CheckpointFormatError, match=r"key 'model.norm.weight' is not listed for this shard"):
        load_hf_llama(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {**index["weight_map"], "extra.weight": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(CheckpointFormatError, match=r"lists 1 tensor\(s\) its shards do not hold"):
        load_hf_llama(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../x.safetensors"}}))
    with pytest.raises(CheckpointFormatError, match="must be a file name in the checkpoint directory"):
        load_hf_llama(tmp_path / "m")
    # LlamaModel's keys have no "model." prefix (and no head: a tied config needs none)
    tied = replace(TINY, tie_word_embeddings=True)
    save_hf_llama(tmp_path / "bare", tied, init_params(tied, 5))
    rewrite(tmp_path / "bare", lambda t: {k.removeprefix("model."): v for k, v in t.items()})
    assert np.array_equal(load_hf_llama(tmp_path / "bare")[1]["model.embed_tokens.weight"],
                          init_params(tied, 5)["model.embed_tokens.weight"])
    save_hf_llama(tmp_path / "bare2", TINY, init_params(TINY, 5))
    rewrite(tmp_path / "bare2", lambda t: {k.removeprefix("model."): v for k, v in t.items() if k != "lm_head.weight"})
    with pytest.raises(CheckpointFormatError, match="lm_head.weight is missing and config.json has tie_word_embeddings"):
        load_hf_llama(tmp_path / "bare2")


def test_old_checkpoints_rotary_buffers(tmp_path):
    save_hf_llama(tmp_path / "m", TINY, init_params(TINY, 6, "float32"))
    D = TINY.head_dim
    inv = (1.0 / TINY.rope_theta ** (np.arange(0, D, 2, dtype=np.float32) / D)).astype(np.float32)   # as torch did
    rewrite(tmp_path / "m", lambda t: {**t, **{f"model.layers.{i}.self_attn.rotary_emb.inv_freq": inv for i in range(2)}})
    load_hf_llama(tmp_path / "m")
    rewrite(tmp_path / "m", lambda t: {**t, "model.layers.0.self_attn.rotary_emb.inv_freq": inv / 8})   # scaled rope
    with pytest.raises(NotImplementedError, match="not the default RoPE's inverse frequencies"):
        load_hf_llama(tmp_path / "m")


@pytest.mark.parametrize("change, error, words", [
    (lambda t: {**t, "lm_head.weight": t["model.embed_tokens.weight"]}, CheckpointFormatError, None),  # untied: fine
    (lambda t: {k: v for k, v in t.items() if k != "model.norm.weight"}, CheckpointFormatError, "missing 1"),
    (lambda t: {**t, "score.weight": np.zeros((2, 16), np.float32)}, CheckpointFormatError, r"unexpected.*score.weight"),
    (lambda t: {**t, "model.layers.1.mlp.up_proj.weight": t["model.layers.1.mlp.up_proj.weight"].T.copy()},
     CheckpointFormatError, r"up_proj.weight' has shape \(16, 24\), expected \(24, 16\)"),
    (lambda t: {**t, "model.norm.weight": t["model.norm.weight"].astype(np.float64)}, CheckpointFormatError, "mixed"),
    (lambda t: {**t, "model.norm.weight": np.full(16, np.inf, np.float32)}, CheckpointFormatError, "16 non-finite"),
    (lambda t: {**t, "model.norm.weight": np.ones(16, np.int32)}, CheckpointFormatError, "I32, not a floating dtype"),
    (lambda t: {**t, "model.norm.weight": t["model.norm.weight"].astype(np.float16)}, CheckpointFormatError,
     "stored as F16; pass dtype="),
    (lambda t: {**t, "model.layers.2.mlp.up_proj.weight": t["model.layers.1.mlp.up_proj.weight"]}, CheckpointFormatError,
     r"num_hidden_layers=2 but the file holds blocks \[0, 1, 2\]"),
    (lambda t: {**t, "model.embed_tokens.weight": np.zeros((12, 16), np.float32)}, CheckpointFormatError,
     r"vocab_size=11 but the tensors give 12 \(rows of model.embed_tokens.weight\)"),
    (lambda t: {**t, "model.layers.0.self_attn.k_proj.weight": np.zeros((16, 16), np.float32)}, CheckpointFormatError,
     r"num_key_value_heads \* head_dim=8 but the tensors give 16"),
])
def test_bad_checkpoints(tmp_path, change, error, words):
    save_hf_llama(tmp_path / "m", TINY, init_params(TINY, 7, "float32"))
    rewrite(tmp_path / "m", change)
    if words is None:
        load_hf_llama(tmp_path / "m")
        return
    with pytest.raises(error, match=words):
        load_hf_llama(tmp_path / "m")


def test_tied_head_must_equal_the_embedding(tmp_path):
    tied = replace(TINY, tie_word_embeddings=True)
    save_hf_llama(tmp_path / "m", tied, init_params(tied, 8, "float32"))
    rewrite(tmp_path / "m", lambda t: {**t, "lm_head.weight": t["model.embed_tokens.weight"]})
    load_hf_llama(tmp_path / "m")                                                   # a tied copy: accepted
    rewrite(tmp_path / "m", lambda t: {**t, "lm_head.weight": t["model.embed_tokens.weight"] + 1})
    with pytest.raises(NotImplementedError, match="lm_head.weight differs from model.embed_tokens.weight.*tie_word"):
        load_hf_llama(tmp_path / "m")


@pytest.mark.parametrize("changes, error, words", [
    ({"model_type": "bert"}, NotImplementedError, r"model_type='bert' is not implemented; transformer_ref reads gpt2"),
    ({"model_type": None}, NotImplementedError, "model_type=None is not implemented"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, NotImplementedError, "rope_scaling"),
    ({"num_key_value_heads": 3}, CheckpointFormatError, r"invalid llama config: num_attention_heads \(4\) must be"),
    ({"hidden_act": "relu"}, NotImplementedError, "hidden_act='relu'"),
])
def test_config_problems_are_named(tmp_path, changes, error, words):
    save_hf_llama(tmp_path / "m", TINY, init_params(TINY, 9, "float32"))
    edit_config(tmp_path / "m", **changes)
    with pytest.raises(error, match=words):
        load_checkpoint(tmp_path / "m")


def test_load_checkpoint_dispatches_on_model_type(tmp_path):
    save_hf_gpt2(tmp_path / "g", GPT, init_params(GPT, 1))
    save_hf_llama(tmp_path / "l", TINY, init_params(TINY, 1))
    assert isinstance(load_checkpoint(tmp_path / "g")[0], GPTConfig)
    assert isinstance(load_checkpoint(tmp_path / "l", dtype="float32")[0], LlamaConfig)
    with pytest.raises(NotImplementedError, match="load_hf_llama reads llama, mistral, qwen2"):
        load_hf_llama(tmp_path / "g")
    with pytest.raises(NotImplementedError, match="model_type='llama'; load_hf_gpt2 reads GPT-2"):
        load_hf_gpt2(tmp_path / "l")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nothing")
    with pytest.raises(TypeError, match="config must be a transformer_ref.LlamaConfig, got GPTConfig"):
        save_hf_llama(tmp_path / "x", GPT, init_params(GPT, 1))
    params = init_params(TINY, 1)
    with pytest.raises(ValueError, match=r"missing \['model.norm.weight'\]"):
        save_hf_llama(tmp_path / "x", TINY, {k: v for k, v in params.items() if k != "model.norm.weight"})
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("family, field", [("llama", "num_hidden_layers"), ("gpt2", "n_layer")])
def test_an_inflated_layer_count_fails_fast_with_little_memory(tmp_path, family, field):
    """Issue 11, item 6: config.json saying 10^7 layers over a 2-layer file is refused before any
    per-layer structure is built (before the fix, GPT-2's loader built one per declared layer: 18 s
    and 2.8 GB at 10^6)."""
    if family == "llama":
        save_hf_llama(tmp_path / "m", TINY, init_params(TINY, 2, "float32"))
    else:
        save_hf_gpt2(tmp_path / "m", GPT, init_params(GPT, 2, "float32"))
    edit_config(tmp_path / "m", **{field: 10**7})
    tracemalloc.start()
    with pytest.raises(CheckpointFormatError, match=rf"config.json says {field}=10000000 but the file holds blocks \[0, 1\]"):
        load_checkpoint(tmp_path / "m")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 20 * 2**20, f"peak {peak / 2**20:.1f} MiB"           # the file is a few kB; 10^7 layers would be GBs


@pytest.mark.parametrize("field, what", [("vocab_size", "rows of transformer.wte.weight"),
                                         ("n_embd", "columns of transformer.wte.weight"),
                                         ("n_positions", "rows of transformer.wpe.weight")])
def test_gpt2_size_fields_are_checked_against_the_tensors_first(tmp_path, field, what):
    """Issue 11, item 6, GPT-2's other size fields: an inflated one is refused, naming the field, the
    tensor that contradicts it, and before any per-layer work (little memory)."""
    save_hf_gpt2(tmp_path / "m", GPT, init_params(GPT, 2, "float32"))
    declared = 2**20 * (GPT.n_head if field == "n_embd" else 1)      # n_embd stays divisible by n_head
    edit_config(tmp_path / "m", **{field: declared})
    tracemalloc.start()
    with pytest.raises(CheckpointFormatError, match=rf"config.json says {field}={declared} but the tensors give "
                                                    rf"\d+ \({what}\)"):
        load_checkpoint(tmp_path / "m")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 20 * 2**20, f"peak {peak / 2**20:.1f} MiB"


def test_peft_adapters_with_llama_keys(tmp_path):
    """lora_ref.peft_io is generic: LLaMA's module names become PEFT's keys
    (base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight) and back, bit for bit; an
    adapter for modules a LLaMA base does not have is refused by name."""
    from lora_ref import LoraConfig
    from lora_ref.peft_io import AdapterFormatError, load_peft_adapter, save_peft_adapter
    from transformer_ref import add_adapters

    params = init_params(TINY, 1)
    lc = LoraConfig(r=2, alpha=4.0, target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={"down_proj": 3},
                    init="random")
    adapters = add_adapters(params, TINY, lc, 2)
    save_peft_adapter(tmp_path / "a", lc, adapters)
    keys = read(tmp_path / "a" / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert keys["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"].shape == (16, 3)
    loaded_config, loaded = load_peft_adapter(tmp_path / "a", params)
    assert loaded_config.rank_for("model.layers.1.mlp.down_proj") == 3 and set(loaded) == set(adapters)
    assert all(np.array_equal(loaded[m][f], adapters[m][f]) for m in adapters for f in "AB")
    gpt_params = init_params(GPT, 1)
    gpt_lc = LoraConfig(r=2, alpha=4.0, target_modules=["c_attn"], init="random")
    save_peft_adapter(tmp_path / "g", gpt_lc, add_adapters(gpt_params, GPT, gpt_lc, 2))
    with pytest.raises(AdapterFormatError, match=r"transformer.h.0.attn.c_attn.*the base model has no weight"):
        load_peft_adapter(tmp_path / "g", params)
