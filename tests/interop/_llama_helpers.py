"""Shared by the LLaMA interop tests: tiny transformers models with random weights, transformers
with its float32 casts removed, and the error bounds of a whole forward pass.

What transformers 5 computes in float32 inside a float64 LLaMA
-------------------------------------------------------------
``LlamaRMSNorm`` casts its input to float32 (and back) and the rotary tables (``inv_freq``, the
angles, cos and sin) are computed in float32, whatever the model's dtype; the eager attention's
softmax too (so float64 comparisons use ``attn_implementation="sdpa"``). Two comparisons follow:

* **architecture** (:func:`float64_transformers`): the two float32 steps replaced by the same
  formulas in float64 (a test-only patch of ``LlamaRMSNorm.forward`` and
  ``LlamaRotaryEmbedding.forward`` in the llama, mistral and qwen2 modules). Every other operation is
  transformers' own, so agreement to float64 rounding shows that the two compute the same
  function: bound ``(gamma_64(n_ours) + gamma_64(n_torch)) M``;
* **as shipped**: transformers untouched, bound ``(gamma_32(n_32) + gamma_64(n_ours) +
  gamma_64(n_torch)) M`` with n_32 the float32 roundings transformers adds (:func:`float32_chain`).

The chains (first-order model, the whole network as one chain of roundings, as in
tests/interop/test_hf_gpt2.py): ``n_ours`` is ``transformer_ref.bounds.logit_rounding_chain``;
``n_torch`` the same with torch's CPU ``scaled_dot_product_attention`` counted as the previous
engineer derived it in test_llama_layers_hf.py (scores D + 5, softmax 4T + 4, P V 2T: 4T + 5 more
per layer than ours). ``M = max_v sum_c |head[v, c]| sqrt(C) |norm.weight[c]|`` bounds every logit
and the terms of its last dot product (``transformer_ref.bounds.logit_magnitude``). A formula slip
(a wrong rope base, a head order, a missing bias) moves the logits by the size of M itself.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import transformers

from lora_ref.testing import assert_within, tolerance
from transformer_ref.bounds import logit_magnitude, logit_rounding_chain

SIZES = dict(vocab_size=32, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=64)
THETA = 500000.0
BATCH, T = 2, 16

# variant -> (transformers config class, model class, extra config fields)
VARIANTS = {
    "llama untied": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama tied": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": True}),
    "llama biases": ("LlamaConfig", "LlamaForCausalLM", {"attention_bias": True, "mlp_bias": True}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
}


def hf_config(variant: str, **changes):
    cfg_class, _, extra = VARIANTS[variant]
    return getattr(transformers, cfg_class)(**SIZES, rope_theta=THETA, attn_implementation="sdpa", **extra, **changes)


def random_model(variant: str, seed: int = 0, **changes):
    """A transformers model of ``variant`` in float32 whose every weight is random: norm weights
    1 + 0.3 N(0, 1), biases 0.3 N(0, 1), everything else 0.3 N(0, 1) (logits of order 10)."""
    config = hf_config(variant, **changes)
    model = getattr(transformers, VARIANTS[variant][1])(config).eval()
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            value = rng.standard_normal(tuple(p.shape)) * 0.3
            p.copy_(torch.tensor(value + 1.0 if "norm" in name else value))
    return model


def torch_logits(model, tokens) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


def _rms_norm_f64(self, hidden_states):
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def _rotary_f64(self, x, position_ids):
    c = self.config
    D = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads     # as transformers reads it
    inv_freq = 1.0 / self.config.rope_parameters["rope_theta"] ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    freqs = position_ids[..., None].double() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


@contextlib.contextmanager
def float64_transformers(monkeypatch):
    """transformers' LLaMA, Mistral and Qwen2 with RMSNorm and the RoPE tables in the model's dtype."""
    from transformers.models.llama import modeling_llama
    from transformers.models.mistral import modeling_mistral
    from transformers.models.qwen2 import modeling_qwen2

    for module, prefix in ((modeling_llama, "Llama"), (modeling_mistral, "Mistral"), (modeling_qwen2, "Qwen2")):
        monkeypatch.setattr(getattr(module, prefix + "RMSNorm"), "forward", _rms_norm_f64)
        monkeypatch.setattr(getattr(module, prefix + "RotaryEmbedding"), "forward", _rotary_f64)
    yield


def torch_chain(config, T: int, r: int = 0) -> int:
    """Roundings along torch's longest path: ours with SDPA's longer attention (4T + 5 more per layer)."""
    return logit_rounding_chain(config, r, T=T) + config.num_hidden_layers * (4 * T + 5)


def float32_chain(config, T: int) -> int:
    """The float32 roundings transformers adds to a float64 LLaMA: each of the 2L + 1 RMSNorms
    (C + 7: the cast of x, the mean of squares, eps, rsqrt, normalise, the cast back), and the RoPE
    tables: the angle p theta^(-2i/D) off by gamma(ceil(ln theta) + 4) relative (i/D, the power
    amplified by ln theta, the reciprocal, the product), i.e. by (T - 1) times that absolutely at
    the last position, plus cos/sin's own 2; q and k both, per layer."""
    C, L = config.hidden_size, config.num_hidden_layers
    rope = (T - 1) * (math.ceil(math.log(config.rope_theta)) + 4) + 2
    return (2 * L + 1) * (C + 7) + L * 2 * rope


def logits_bound(params, config, T: int, *, float32_steps: bool = False, r: int = 0, dtype: str = "float64") -> float:
    n_ours, n_torch = logit_rounding_chain(config, r, T=T), torch_chain(config, T, r)
    gamma = tolerance(dtype, n_ours) + tolerance(dtype, n_torch)
    if float32_steps:
        gamma += tolerance("float32", float32_chain(config, T))
    return gamma * logit_magnitude(params, config)


def report(tag: str, what: str, ours, theirs, bound) -> float:
    ratio = assert_within(ours, theirs, bound, what=what)
    theirs = np.asarray(theirs, dtype=np.float64)
    err = float(np.max(np.abs(np.asarray(ours, dtype=np.float64) - theirs)))
    print(f"\n[{tag}] {what}: max |diff| {err:.2e}, max relative {err / float(np.max(np.abs(theirs))):.2e}, "
          f"error/bound {ratio:.2e}")
    return err
