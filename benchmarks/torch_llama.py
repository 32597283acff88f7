"""The PyTorch side of the LLaMA row: transformers' ``LlamaForCausalLM`` with PEFT's LoRA.

LoRA (r = 8, alpha = 16) on every ``q_proj`` and ``v_proj``, ``torch.optim.Adam`` with its CPU
defaults, float32, eager (or ``torch.compile``), no dropout -- the model given the *same* weights
(LLaMA's nn.Linear weights are stored (d_out, d_in) as lora-ref keeps them: no transpose) and
adapters as the lora-ref side, so the two compute the same loss; the runner checks the logits.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .flops import StepShape
from .torch_gpt2 import training_step

__all__ = ["make_torch_llama_step"]


def make_torch_llama_step(shape: StepShape, params: Mapping[str, np.ndarray],
                          adapters: Mapping[str, Mapping[str, np.ndarray]], tokens: np.ndarray, targets: np.ndarray,
                          *, alpha: float = 16.0, lr: float = 1e-3, compile: bool = False) -> dict[str, Any]:
    """One LoRA training step of transformers' LLaMA + PEFT; returns ``{"step", "loss", "logits",
    "trainable"}`` as :func:`benchmarks.torch_gpt2.make_torch_step` does. ``params`` are keyed by
    Hugging Face LLaMA state-dict names; ``adapters`` by module name (``model.layers.{i}.self_attn.q_proj``)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.n_embd, intermediate_size=4 * shape.n_embd,
                         num_hidden_layers=shape.n_layer, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.heads, max_position_embeddings=shape.seq_len, rms_norm_eps=1e-6,
                         tie_word_embeddings=False, attention_dropout=0.0, use_cache=False)
    model = LlamaForCausalLM(config)
    state = {k: torch.from_numpy(np.ascontiguousarray(np.asarray(v))).clone() for k, v in params.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    model = model.float()
    model = get_peft_model(model, LoraConfig(r=shape.r, lora_alpha=alpha, target_modules=["q_proj", "v_proj"],
                                             lora_dropout=0.0, bias="none"))
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith(("self_attn.q_proj", "self_attn.v_proj")) and hasattr(module, "lora_A"):
                key = name[name.index("model.layers."):]
                module.lora_A["default"].weight.copy_(torch.from_numpy(np.asarray(adapters[key]["A"])))
                module.lora_B["default"].weight.copy_(torch.from_numpy(np.asarray(adapters[key]["B"])))
    return training_step(model, tokens, targets, shape.vocab, lr=lr, compile=compile)
