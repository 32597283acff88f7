"""The base-model counts of ``lora-ref count`` against transformers' own modules (meta device).

Builds RobertaModel (no pooler), DebertaV2Model, GPT2LMHeadModel and LlamaForCausalLM from the
preset config values on PyTorch's meta device (no memory, no download) and counts their
parameters; for the LLaMA presets also the LoRA parameters PEFT adds (q, v and all seven
projections), on the meta device too.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from lora_ref.counting import PRESETS, deberta_v2_parameters, roberta_parameters  # noqa: E402


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())   # tied weights appear once


@pytest.mark.parametrize("name", ["roberta-base", "roberta-large"])
def test_roberta(name):
    config = transformers.RobertaConfig(**PRESETS[name].config)
    with torch.device("meta"):
        model = transformers.RobertaModel(config, add_pooling_layer=False)
    assert roberta_parameters(PRESETS[name].config) == n_params(model)


def test_deberta_v2_xxlarge():
    cfg = dict(PRESETS["deberta-xxlarge"].config)
    config = transformers.DebertaV2Config(**cfg)
    with torch.device("meta"):
        model = transformers.DebertaV2Model(config)
    assert deberta_v2_parameters(cfg) == n_params(model)


@pytest.mark.parametrize("name", ["gpt2-medium", "gpt2-large", "gpt2"])
def test_gpt2(name):
    from transformer_ref import GPTConfig
    from transformer_ref.count import count_parameters

    config = transformers.GPT2Config(**PRESETS[name].config)
    with torch.device("meta"):
        model = transformers.GPT2LMHeadModel(config)
    assert count_parameters(GPTConfig(**PRESETS[name].config))["base"] == n_params(model)


LLAMA_PRESETS = ["llama-2-7b", "llama-2-13b", "llama-2-70b", "llama-3-8b", "llama-3-70b"]


def llama_on_meta(name):
    config = transformers.LlamaConfig(**PRESETS[name].config)
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(config)


@pytest.mark.parametrize("name", LLAMA_PRESETS)
def test_llama(name):
    from transformer_ref import LlamaConfig
    from transformer_ref.count import count_parameters

    assert count_parameters(LlamaConfig(**PRESETS[name].config))["base"] == n_params(llama_on_meta(name))


@pytest.mark.parametrize("name", ["llama-2-70b", "llama-3-8b"])
@pytest.mark.parametrize("targets", [("q", "v"), ("q", "k", "v", "o", "gate", "up", "down")])
def test_llama_lora_counts_equal_peft(name, targets):
    peft = pytest.importorskip("peft")
    from lora_ref.counting import lora_parameters

    p = PRESETS[name]
    model = peft.get_peft_model(llama_on_meta(name), peft.LoraConfig(r=16, target_modules=[t + "_proj" for t in targets]))
    trainable = sum(t.numel() for t in model.parameters() if t.requires_grad)
    assert sum(lora_parameters(targets, 16, d_model=p.d_model, layers=p.layers, ffn_width=p.ffn_width,
                               kv_dim=p.kv_dim, matrices=p.matrices).values()) == trainable
