"""The base-model counts of ``lora-ref count`` against transformers' own modules (meta device).

Builds RobertaModel (no pooler), DebertaV2Model
and GPT2LMHeadModel from the preset config values on PyTorch's meta device (no memory, no
download) and counts their parameters.
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


@pytest.mark.parametrize("name", ["gpt2-medium", "gpt2-large"])
def test_gpt2(name):
    from transformer_ref import GPTConfig
    from transformer_ref.count import count_parameters

    config = transformers.GPT2Config(**PRESETS[name].config)
    with torch.device("meta"):
        model = transformers.GPT2LMHeadModel(config)
    assert count_parameters(GPTConfig(**PRESETS[name].config))["base"] == n_params(model)
