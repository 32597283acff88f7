"""Rounding-error bounds for the whole model: how many roundings, and on what magnitude.

Two computations of the same logits (merged vs unmerged weights, hand-written vs traced
gradients, float32 vs float64), each a chain of at most ``n`` roundings away from the exact
value, differ by at most ``2 gamma_n M`` to first order (``lora_ref.testing.tolerance`` gives
gamma_n), where ``M`` bounds the terms rounded on the path's last step. This module gives ``n``
(:func:`logit_rounding_chain`) and ``M`` (:func:`logit_magnitude`) for :func:`transformer_ref.forward` (GPT-2 and LLaMA).
They are first-order bounds (LayerNorm and softmax are not covered by a rigorous proof): a real
mistake -- a missing scale, a transposed weight -- shows up at the size of ``M`` itself.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from lora_ref.backend import to_numpy
from lora_ref.dora import dora_rounding_counts
from lora_ref.testing import rounding_counts

from .hosting import family_of
from .llama import LlamaConfig

__all__ = ["logit_magnitude", "logit_rounding_chain"]


def logit_rounding_chain(config: Any, r: int = 1, *, T: int | None = None,
                         loss_batch: int | None = None, dora: bool = False) -> int:
    """Roundings along the longest input-to-logit path of :func:`transformer_ref.forward`, every
    projection counted as LoRA-adapted at rank ``r`` (an upper bound for those that are not), or
    with ``dora=True`` as DoRA-adapted: ``lora_ref.dora.dora_rounding_counts(...)["y"]`` = d_in + r + 12
    per projection (the norm of each row of W + s B A and the magnitude's factor m / norm: 6 more).

    Per operation (C = n_embd, D = head_dim, F = mlp_width, T = sequence length, default
    n_positions), a sum or dot product of length k counting k:

    * LayerNorm: mean (C), subtract it, square, variance (C), add eps, square root, reciprocal,
      normalise, times weight, plus bias = 2C + 8;
    * a projection d_in -> d_out: ``lora_ref.testing.rounding_counts(...)["y"]`` = d_in + r + 6
      (base dot product, adapter chain, scale, bias and the join; the same for a merged weight);
    * attention: scores (D), scale, max shift, exp, sum (T), divide, P V (T) = D + 2T + 4;
    * GELU: 8 elementwise; each residual add: 1; the embeddings' add: 1;
    * the tied output projection: a dot product of length C.

    For LLaMA (C = hidden_size, D = head_dim, H query heads, F = intermediate_size, T default
    max_position_embeddings): RMSNorm C + 6 (mean of squares (C), add eps, square root,
    reciprocal, normalise, times weight, as tests/transformer/test_layers.py counts them); RoPE 3 on
    q and k; attention D + 2T + 4; SwiGLU 7 after its gate projection; each residual add 1; no add
    after the embedding; the output projection a dot product of length C.

    With ``loss_batch`` (the number of scored positions N), the mean cross-entropy's chain is
    added: shift, exp, sum (V), log, subtract, mean (N) = V + N + 4.
    """
    family_of(config)                       # a registered family's config, else TypeError
    if not isinstance(dora, bool):
        raise TypeError(f"dora must be True or False, got {dora!r}")

    def proj(d_in: int, d_out: int) -> int:
        if dora:
            return dora_rounding_counts(d_in, d_out, max(r, 1), 1)["y"]
        return rounding_counts(d_in, d_out, max(r, 1), 1)["y"]

    if isinstance(config, LlamaConfig):
        C, D, F = config.hidden_size, config.head_dim, config.intermediate_size
        T = config.max_position_embeddings if T is None else T
        HD, norm = config.num_attention_heads * D, C + 6
        block = (norm + proj(C, HD) + 3 + (D + 2 * T + 4) + proj(HD, C) + 1
                 + norm + proj(C, F) + 7 + proj(F, C) + 1)
        n = config.num_hidden_layers * block + norm + C
        return n + (config.vocab_size + loss_batch + 4 if loss_batch is not None else 0)
    C, D, F = config.n_embd, config.head_dim, config.mlp_width
    T = config.n_positions if T is None else T
    ln = 2 * C + 8
    block = (ln + proj(C, 3 * C) + (D + 2 * T + 4) + proj(C, C) + 1
             + ln + proj(C, F) + 8 + proj(F, C) + 1)
    n = 1 + config.n_layer * block + ln + C
    if loss_batch is not None:
        n += config.vocab_size + loss_batch + 4
    return n


def logit_magnitude(params: Mapping[str, Any], config: Any) -> float:
    """``max_v sum_c |head[v, c]| (sqrt(C) |ln_f.weight[c]| + |ln_f.bias[c]|)``: a bound on every
    logit and on the sum of the absolute values of the terms of its last dot product (the
    LayerNorm output satisfies ``|xhat_c| <= sqrt(C)``). For LLaMA, ``max_v sum_c |head[v, c]|
    sqrt(C) |norm.weight[c]|``: RMSNorm's output satisfies ``|xhat_c| <= sqrt(C)`` too. The head
    is the one the params hold: ``lm_head.weight`` when present (an untied model, or a tied one
    untied by merging an embedding adapter), else the token embedding it is tied to (GPT-2's
    ``transformer.wte.weight``, LLaMA's ``model.embed_tokens.weight``)."""
    family_of(config)                       # a registered family's config, else TypeError
    llama = isinstance(config, LlamaConfig)
    table = "model.embed_tokens.weight" if llama else "transformer.wte.weight"
    head = params["lm_head.weight"] if "lm_head.weight" in params else params[table]
    W = np.abs(to_numpy(head).astype(np.float64))                                     # (V, C)
    if llama:
        g = np.abs(to_numpy(params["model.norm.weight"]).astype(np.float64))           # (C,)
        return float((W @ (math.sqrt(config.hidden_size) * g)).max())
    g = np.abs(to_numpy(params["transformer.ln_f.weight"]).astype(np.float64))        # (C,)
    b = np.abs(to_numpy(params["transformer.ln_f.bias"]).astype(np.float64))          # (C,)
    return float((W @ (math.sqrt(config.n_embd) * g + b)).max())
