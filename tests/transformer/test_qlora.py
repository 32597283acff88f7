"""LoRA on a 4-bit base in the hosts (QLoRA): params whose projection weights are
``lora_ref.quant.QuantState``s, dequantised per forward in their compute dtype; adapters trained
alone; ``train(mode="qlora")``; merging into the 4-bit base; 4-bit checkpoints read without torch.

Bounds as in _gpt_helpers: ``2 gamma_n M``, n the float roundings of the longest path
(``transformer_ref.bounds.logit_rounding_chain``), M the logits' magnitude
(``bounds.logit_magnitude``, on the dequantised weights); in bfloat16 compute each projection
adds two roundings to bfloat16 (its input and its output: 8 per block on the path), ``gamma_bf16``.
Properties that are exact (a 4-bit model is its dequantised float model) are checked bit for bit.
(tests/interop/test_qlora_hosts.py holds all of it against transformers + bitsandbytes + PEFT.)
"""

from __future__ import annotations

import json
from dataclasses import replace

import autograd
import numpy as np
import pytest
import safetensors.numpy
from autograd.test_util import check_grads

import transformer_ref as tr
from lora_ref import LoraConfig, asarray, to_numpy, use_backend
from lora_ref import quant as q
from lora_ref.testing import assert_within, tolerance
from transformer_ref.bounds import logit_magnitude, logit_rounding_chain
from transformer_ref.checkpoints import CheckpointFormatError
from transformer_ref.data import pretraining_task

LLAMA = tr.LlamaConfig(vocab_size=11, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=8, rms_norm_eps=1e-5)
GPT2 = tr.GPTConfig(vocab_size=11, n_positions=8, n_embd=8, n_layer=2, n_head=2)
LORA = {"llama": LoraConfig(r=2, alpha=4.0, target_modules=["q_proj", "v_proj", "down_proj"], init="random"),
        "gpt2": LoraConfig(r=2, alpha=4.0, target_modules=["c_attn", "c_fc"], init="random")}
CONFIGS = {"llama": LLAMA, "gpt2": GPT2}


def model(family, dtype="float32", compute=None, seed=0):
    """(config, float params, 4-bit params, dequantised params, adapters, lora_config, tokens, targets)."""
    config = CONFIGS[family]
    rng = np.random.default_rng(seed)
    params = {k: (to_numpy(v) * (1.0 if k.endswith(("bias", "norm.weight")) or ".ln_" in k else 10.0)).astype(dtype)
              for k, v in tr.init_params(config, rng, dtype).items()}
    names = [n + ".weight" for n in tr.projection_names(config)]
    quantised = q.quantize_params(params, names, compute_dtype=compute)
    dequantised = {k: q.dequantize_4bit(v, dtype) if k in names else v for k, v in quantised.items()}
    lc = LORA[family]
    adapters = tr.add_adapters(params, config, lc, np.random.default_rng(1))
    tokens, targets = rng.integers(0, config.vocab_size, (2, 6)), rng.integers(0, config.vocab_size, (2, 6))
    return config, params, quantised, dequantised, adapters, lc, tokens, targets


def logits_bound(config, params, dtype, r=2, bf16_roundings=0):
    n = logit_rounding_chain(config, r)
    gamma = tolerance(dtype, n) + (tolerance("bfloat16", bf16_roundings) if bf16_roundings else 0.0)
    return 2 * gamma * logit_magnitude(params, config)


# ------------------------------------------------------------------ the forward


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_4bit_model_is_its_dequantised_model(family, dtype):
    """Computed in the model's dtype, the 4-bit base is exactly its dequantised weights, with or
    without adapters, under REFERENCE and FAST."""
    config, _, quantised, dequantised, adapters, lc, tokens, _ = model(family, dtype)
    assert all(isinstance(quantised[n + ".weight"], q.QuantState) for n in tr.projection_names(config))
    for ops in (tr.REFERENCE, tr.FAST):
        for ad, c in ((None, None), (adapters, lc)):
            ours = tr.forward(quantised, tokens, config, ad, c, ops=ops)
            assert ours.dtype == np.dtype(dtype)
            assert ours.tobytes() == tr.forward(dequantised, tokens, config, ad, c, ops=ops).tobytes()


def test_gpt2_fused_blocks_on_a_4bit_base():
    config, _, quantised, dequantised, _, _, tokens, _ = model("gpt2")
    lc = LoraConfig(r=2, alpha=4.0, target_modules=["c_attn"], enable_lora={"c_attn": (True, False, True)}, init="random")
    adapters = tr.add_adapters(dequantised, config, lc, 3)
    want = tr.forward(dequantised, tokens, config, adapters, lc)
    assert tr.forward(quantised, tokens, config, adapters, lc).tobytes() == want.tobytes()
    bf16 = {k: replace(v, compute_dtype="bfloat16") if isinstance(v, q.QuantState) else v for k, v in quantised.items()}
    assert_within(tr.forward(bf16, tokens, config, adapters, lc), want,
                  logits_bound(config, dequantised, "float32", 2, 8 * config.n_layer), what="bfloat16 compute, fused")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_bfloat16_compute(family):
    """bfloat16 compute rounds each projection's input and output (8 roundings per block on the
    longest path): within that bound of the float32 computation, and not equal to it."""
    config, _, quantised, dequantised, adapters, lc, tokens, _ = model(family, compute="bfloat16")
    L = config.num_hidden_layers if family == "llama" else config.n_layer
    ours = tr.forward(quantised, tokens, config, adapters, lc)
    want = tr.forward(dequantised, tokens, config, adapters, lc)
    assert ours.dtype == np.float32 and not np.array_equal(ours, want)
    assert_within(ours, want, logits_bound(config, dequantised, "float32", 2, 8 * L), what="bfloat16 vs float32 compute")


def test_compute_dtype_is_refused_wider_than_the_model():
    config, _, quantised, _, _, _, tokens, _ = model("llama")
    wide = {k: replace(v, compute_dtype="float64") if isinstance(v, q.QuantState) else v for k, v in quantised.items()}
    with pytest.raises(ValueError, match="not wider"):
        tr.forward(wide, tokens, config)


# ------------------------------------------------------------------ gradients: the adapters only


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_adapter_gradients_three_ways_on_a_4bit_base(family):
    """float64 model, the 4-bit base widened exactly: hand-written VJPs, autograd.numpy tracing the
    bare forwards, and finite differences agree; the base is closed over and never differentiated."""
    config, _, quantised, dequantised, adapters, lc, tokens, targets = model(family, "float64")

    def f(ops):
        return lambda ad: tr.loss(quantised, tokens, targets, config, ad, lc, ops=ops)

    hand, traced = autograd.grad(f(tr.REFERENCE))(adapters), autograd.grad(f(tr.traced(tr.REFERENCE)))(adapters)
    n = 2 * (logit_rounding_chain(config, 2, loss_batch=12))
    for module in adapters:
        for k in ("A", "B"):
            assert_within(hand[module][k], traced[module][k], 2 * tolerance("float64", n) * np.abs(traced[module][k]).max(),
                          what=f"dL/d{k} {module}")
    check_grads(f(tr.REFERENCE), modes=["rev"], order=1)(adapters)
    want = autograd.grad(lambda ad: tr.loss(dequantised, tokens, targets, config, ad, lc))(adapters)
    assert all(hand[m][k].tobytes() == want[m][k].tobytes() for m in want for k in ("A", "B"))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_adapter_gradients_in_bfloat16_compute(family):
    config, _, quantised, dequantised, adapters, lc, tokens, targets = model(family, compute="bfloat16")
    L = config.num_hidden_layers if family == "llama" else config.n_layer
    ours = autograd.grad(lambda ad: tr.loss(quantised, tokens, targets, config, ad, lc))(adapters)
    want = autograd.grad(lambda ad: tr.loss(dequantised, tokens, targets, config, ad, lc))(adapters)
    n = 2 * logit_rounding_chain(config, 2, loss_batch=12)
    for module in want:
        for k in ("A", "B"):
            assert ours[module][k].dtype == np.float32
            rel = 2 * (tolerance("float32", n) + tolerance("bfloat16", 2 * 8 * L))     # forward and back
            assert_within(ours[module][k], want[module][k], rel * np.abs(want[module][k]).max(), what=f"dL/d{k} {module}")


def test_the_base_is_frozen():
    from lora_ref.precision import narrow_linear

    x, W = np.ones((2, 4), np.float32), np.ones((3, 4), np.float32)
    with pytest.raises(TypeError, match="W"):
        autograd.grad(lambda w: narrow_linear(x, w, None, "bfloat16").sum())(W)
    config, params, quantised, *_ = model("llama")
    with pytest.raises(ValueError, match="mode='full'"):
        tr.train(quantised, config, pretraining_task(n_symbols=8, length=3), mode="full", steps=1, progress=False)


# ------------------------------------------------------------------ training


def test_train_qlora_is_lora_on_the_quantised_base():
    config = tr.LlamaConfig(vocab_size=10, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                            num_attention_heads=2, max_position_embeddings=16)
    task = pretraining_task(n_symbols=8, length=6)
    params = {k: to_numpy(v) * 10.0 for k, v in tr.init_params(config, 0, "float32").items()}
    lc = LoraConfig(r=2, alpha=4.0, target_modules=["q_proj", "v_proj"])
    run = tr.train(params, config, task, mode="qlora", lora_config=lc, steps=6, batch_size=4, lr=1e-2, progress=False)
    names = [n + ".weight" for n in tr.projection_names(config)]
    assert all(isinstance(run.params[n], q.QuantState) and run.params[n].nested for n in names)
    assert run.params["model.embed_tokens.weight"] is params["model.embed_tokens.weight"]      # the rest untouched
    assert all(np.abs(ad["B"]).max() > 0 for ad in run.adapters.values())                       # B = 0 at init moved
    again = tr.train(q.quantize_params(params, names), config, task, mode="lora", lora_config=lc, steps=6,
                     batch_size=4, lr=1e-2, progress=False)
    assert again.losses == run.losses
    assert all(again.adapters[m][k].tobytes() == run.adapters[m][k].tobytes() for m in run.adapters for k in "AB")


# ------------------------------------------------------------------ merging into the 4-bit base


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_merge_into_the_4bit_base(family):
    """PEFT's path: dequantise, add s B A, requantise; each merged weight within the quantiser's
    own error bound of W + s B A (lora_ref.quant.error_bound)."""
    config, _, quantised, dequantised, adapters, lc, tokens, _ = model(family)
    merged = tr.merge_adapters(quantised, adapters, lc)
    for name, ad in adapters.items():
        state = merged[name + ".weight"]
        assert state == q.merge_4bit(quantised[name + ".weight"], ad["A"], ad["B"], lc.scale_for(name))
        exact = dequantised[name + ".weight"].astype(np.float64) + lc.scale_for(name) * (
            ad["B"].astype(np.float64) @ ad["A"].astype(np.float64))
        err = np.abs(q.dequantize_4bit(state, "float64") - exact).reshape(-1)
        blocks = np.arange(err.size) // state.blocksize
        slack = 2 * tolerance("float32", lc.r + 2) * np.abs(exact).reshape(-1)              # s B A and W + in float32
        assert np.all(err <= q.error_bound(state)[blocks] + slack), name
    for name in quantised:
        if name.removesuffix(".weight") not in adapters:
            assert merged[name] is quantised[name]
    unmerged = tr.forward(quantised, tokens, config, adapters, lc)
    float_merge = tr.merge_adapters(dequantised, adapters, lc)
    assert_within(tr.forward(float_merge, tokens, config), unmerged, logits_bound(config, dequantised, "float32"),
                  what="merged in float32")
    assert np.max(np.abs(tr.forward(merged, tokens, config) - unmerged)) > np.max(
        logits_bound(config, dequantised, "float32"))                                    # requantising is lossy


# ------------------------------------------------------------------ validation, backends


def test_quant_states_only_where_a_projection_is():
    config, _, quantised, *_ , tokens, _ = model("llama")
    bad = dict(quantised)
    bad["model.norm.weight"] = q.quantize_4bit(np.ones(16, np.float32))
    with pytest.raises(ValueError, match="only projection"):
        tr.forward(bad, tokens, config)
    bad = dict(quantised)
    bad["model.layers.0.self_attn.q_proj.weight"] = q.quantize_4bit(np.ones((8, 16), np.float32))
    with pytest.raises(ValueError, match=r"\(16, 16\)"):
        tr.forward(bad, tokens, config)


@pytest.mark.parametrize("compute", [None, "bfloat16"])
def test_array_api_strict_matches_numpy(compute):
    pytest.importorskip("array_api_strict")
    config, _, quantised, _, adapters, lc, tokens, targets = model("llama", compute=compute)
    want = tr.forward(quantised, tokens, config, adapters, lc)
    grads = autograd.grad(lambda ad: tr.loss(quantised, tokens, targets, config, ad, lc))(adapters)
    with use_backend("array_api_strict"):
        p = {k: v if isinstance(v, q.QuantState) else asarray(v) for k, v in quantised.items()}
        a = {m: {k: asarray(v) for k, v in ad.items()} for m, ad in adapters.items()}
        got = tr.forward(p, asarray(tokens), config, a, lc)
        g = autograd.grad(lambda ad: tr.loss(p, asarray(tokens), asarray(targets), config, ad, lc))(a)
        assert type(got).__module__.startswith("array_api_strict")
    assert_within(to_numpy(got), want, logits_bound(config, quantised | {k: q.dequantize_4bit(v) for k, v in quantised.items()
                                                                          if isinstance(v, q.QuantState)}, "float32"),
                  what="array_api_strict logits")
    n = 2 * logit_rounding_chain(config, 2, loss_batch=12)
    for m in grads:
        for k in ("A", "B"):
            assert_within(to_numpy(g[m][k]), grads[m][k], 2 * tolerance("float32", n) * np.abs(grads[m][k]).max(),
                          what=f"array_api_strict dL/d{k} {m}")


# ------------------------------------------------------------------ 4-bit checkpoints, written without torch


def write_4bit(path, config, quantised, compute="bfloat16", **changes):
    """A bitsandbytes 4-bit checkpoint as transformers saves one (keys, JSON blob, quantization_config)."""
    tr.save_hf_llama(path, config, {k: q.dequantize_4bit(v) if isinstance(v, q.QuantState) else v
                                    for k, v in quantised.items()})
    tensors = safetensors.numpy.load_file(path / "model.safetensors")
    for name, state in quantised.items():
        if isinstance(state, q.QuantState):
            for key, value in state.to_bnb_tensors().items():
                tensors[name if key == "weight" else f"{name}.{key}"] = value
    raw = json.loads((path / "config.json").read_text())
    raw["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
                                  "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
                                  "bnb_4bit_compute_dtype": compute, "bnb_4bit_quant_storage": "uint8", **changes}
    (path / "config.json").write_text(json.dumps(raw))
    safetensors.numpy.save_file(tensors, str(path / "model.safetensors"))
    return tensors


def test_4bit_checkpoint_round_trip(tmp_path):
    config, _, quantised, *_ , tokens, _ = model("llama")
    with pytest.raises(NotImplementedError, match="4-bit"):
        tr.save_hf_llama(tmp_path / "no", config, quantised)
    write_4bit(tmp_path / "m", config, quantised)
    loaded_config, params = tr.load_checkpoint(tmp_path / "m")
    assert loaded_config == config
    for name, value in quantised.items():
        if isinstance(value, q.QuantState):
            assert params[name] == replace(value, compute_dtype="bfloat16")
        else:
            assert np.array_equal(params[name], value)
    bf16 = {k: replace(v, compute_dtype="bfloat16") if isinstance(v, q.QuantState) else v for k, v in quantised.items()}
    assert tr.forward(params, tokens, config).tobytes() == tr.forward(bf16, tokens, config).tobytes()


@pytest.mark.parametrize("change,error,match", [
    ({"load_in_8bit": True, "load_in_4bit": False}, NotImplementedError, "quant_method"),
    ({"quant_method": "gptq"}, NotImplementedError, "gptq"),
    ({"bnb_4bit_compute_dtype": "int8"}, NotImplementedError, "bnb_4bit_compute_dtype"),
    ({"bnb_4bit_quant_storage": "float16"}, NotImplementedError, "quant_storage"),
    ({"bnb_4bit_quant_type": "fp4"}, CheckpointFormatError, "quantization_config says fp4"),
    ({"bnb_4bit_use_double_quant": False}, CheckpointFormatError, "double"),
])
def test_4bit_checkpoint_settings_refused(tmp_path, change, error, match):
    config, _, quantised, *_ = model("llama")
    write_4bit(tmp_path / "m", config, quantised, **change)
    with pytest.raises(error, match=match):
        tr.load_checkpoint(tmp_path / "m")


def test_4bit_checkpoint_damage_is_named(tmp_path):
    config, _, quantised, *_ = model("llama")
    tensors = write_4bit(tmp_path / "m", config, quantised)
    key = "model.layers.1.mlp.up_proj.weight"
    del tensors[key + ".absmax"]
    safetensors.numpy.save_file(tensors, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(CheckpointFormatError, match=f"{key}.*absmax"):
        tr.load_checkpoint(tmp_path / "m")
    raw = json.loads((tmp_path / "m" / "config.json").read_text())
    del raw["quantization_config"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointFormatError, match="no quantization_config"):
        tr.load_checkpoint(tmp_path / "m")


def test_4bit_checkpoint_declared_sizes_checked_first(tmp_path):
    """A config.json that contradicts the 4-bit weights' own shapes is refused before any layer is
    built (the blob's shape is what the file declares for the weight)."""
    config, _, quantised, *_ = model("llama")
    write_4bit(tmp_path / "m", config, quantised)
    raw = json.loads((tmp_path / "m" / "config.json").read_text())
    raw["intermediate_size"] = 10**9
    (tmp_path / "m" / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointFormatError, match="intermediate_size"):
        tr.load_checkpoint(tmp_path / "m")
