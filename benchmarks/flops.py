"""The training step's floating-point operations and memory, counted analytically.

Letters: N = batch * T tokens, C = n_embd, F = MLP width (4C), L = layers, T = sequence length,
V = vocabulary, r = LoRA rank. LoRA adapts the fused ``c_attn`` (d_in = C, d_out = 3C) of every
layer, as PEFT's ``target_modules=["c_attn"]`` does. A product of an (m, k) and a (k, n) matrix
costs 2 m k n FLOPs; only matrix products are counted (LayerNorm, GELU, softmax, Adam are
O(N C) or O(params) and are left out, as is usual for a FLOP count).

Forward, per token:
    dense projections   2 (3C C + C C + F C + C F) = 24 C^2 per layer (F = 4C)
    attention           4 T C per layer (Q K^T and P V, counted dense: the causal mask is applied
                        to the full T x T scores, as the reference computes them)
    LoRA on c_attn      2 r C + 2 r 3C = 8 r C per layer
    LM head (tied wte)  2 C V

Backward of full fine-tuning: every product needs the gradient of both operands, twice the
forward, so the full step costs 3 x the base forward.

Backward of LoRA: the frozen weights need no gradient, only the activations do:
    per layer           24 C^2 (activation gradients of the four projections)
                        + 8 T C (attention: dS, dV, dQ, dK)
                        + 16 r C (LoRA: dB, d(Ax), dA, and dx through A)
    layer 0             minus 6 C^2 + 2 r C: below its c_attn nothing is trainable, so neither
                        the base weight's nor A's path to the input gradient is needed
    LM head             2 C V (activation gradient only; wte is frozen)

So LoRA's step is about 2/3 of full fine-tuning's: the paper's limit on its training speed-up.

The step count above is the reference order's (lora_ref.lora_linear: thin products x A^T and
(x A^T) B^T). transformer_ref's training path forms W + s B A once per call instead when that is
cheaper (N (d_in + d_out) >= d_in d_out), which costs 2 r d_in d_out per adapted matrix rather
than the forward's 2 N r (d_in + d_out) (its backward costs the same 16 r C N per layer). That
takes 0.8% (small config) and 0.15% (large) off the step's count; the FLOP/s figures use the
reference count, for both libraries alike.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["StepShape", "memory_accounting", "param_counts", "step_flops"]


@dataclass(frozen=True)
class StepShape:
    """The shapes of one benchmark configuration: GPT-2 with LoRA on c_attn, or (``family =
    "llama"``) LLaMA with LoRA on q_proj and v_proj, MLP width F = 4C, as many key/value heads as
    query heads and an untied output head."""

    n_embd: int
    n_layer: int
    seq_len: int
    batch: int
    vocab: int = 128
    n_head: int | None = None   # default: head width 64, as in GPT-2
    r: int = 8
    family: str = "gpt2"

    @property
    def heads(self) -> int:
        return self.n_head if self.n_head is not None else max(1, self.n_embd // 64)

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len

    @property
    def label(self) -> str:
        prefix = "LLaMA " if self.family == "llama" else ""
        return f"{prefix}C={self.n_embd} L={self.n_layer} T={self.seq_len} B={self.batch}"


def step_flops(s: StepShape) -> dict[str, float]:
    """FLOPs of one forward, and of one LoRA and one full fine-tuning step (forward + backward)."""
    if s.family == "llama":
        return _llama_step_flops(s)
    C, L, T, V, r, N = s.n_embd, s.n_layer, s.seq_len, s.vocab, s.r, s.tokens
    F = 4 * C
    dense = 2 * (3 * C * C + C * C + F * C + C * F)        # 24 C^2 per token per layer
    attn = 4 * T * C
    lora = 8 * r * C
    head = 2 * C * V
    base_forward = N * (L * (dense + attn) + head)
    lora_forward = N * (L * (dense + attn + lora) + head)
    lora_backward = N * (L * (dense + 2 * attn + 2 * lora) - (6 * C * C + 2 * r * C) + head)
    # transformer_ref's projection forms W + s B A first when N (d_in + d_out) >= d_in d_out
    # (fast.linear): then the adapter costs 2 r d_in d_out per matrix per forward, not per token.
    folded = s.tokens * (C + 3 * C) >= C * 3 * C
    folded_forward = base_forward + L * 2 * r * C * 3 * C
    return {
        "base_forward": float(base_forward),
        "lora_forward": float(lora_forward),
        "lora_step": float(lora_forward + lora_backward),
        "full_step": float(3 * base_forward),
        "lora_forward_overhead": lora_forward / base_forward - 1.0,
        "lora_forward_folded": folded,
        "lora_forward_overhead_folded": folded_forward / base_forward - 1.0,
    }


def _llama_step_flops(s: StepShape) -> dict[str, float]:
    """LLaMA's count, the same way (module docstring), for LoRA on q_proj and v_proj (each C -> C):

        forward, per token and layer   2 (4 C^2 + 3 C F) (q, k, v, o; gate, up, down)
                                       + 4 T C (attention) + 2 x 4 r C (two adapters)
        LoRA backward                  activation gradients of every projection, attention's four
                                       products, 8 r C per adapter; layer 0 skips the input
                                       gradients of q, k, v (6 C^2) and of both A's (4 r C)
        LM head (untied)               2 C V forward, 2 C V backward (activation gradient)

    The element-wise work (RMSNorm, RoPE, SwiGLU, softmax) is left out, as for GPT-2.
    """
    C, L, T, V, r, N = s.n_embd, s.n_layer, s.seq_len, s.vocab, s.r, s.tokens
    F = 4 * C
    dense = 2 * (4 * C * C + 3 * C * F)
    attn = 4 * T * C
    lora = 2 * 4 * r * C
    head = 2 * C * V
    base_forward = N * (L * (dense + attn) + head)
    lora_forward = N * (L * (dense + attn + lora) + head)
    lora_backward = N * (L * (dense + 2 * attn + 2 * lora) - (6 * C * C + 4 * r * C) + head)
    return {"base_forward": float(base_forward), "lora_forward": float(lora_forward),
            "lora_step": float(lora_forward + lora_backward), "full_step": float(3 * base_forward),
            "lora_forward_overhead": lora_forward / base_forward - 1.0,
            "lora_forward_folded": None, "lora_forward_overhead_folded": None}


def param_counts(s: StepShape) -> dict[str, int]:
    """Parameters of the model (GPT-2: tied LM head, n_positions = T) and of its LoRA adapters."""
    C, L, V, T, r = s.n_embd, s.n_layer, s.vocab, s.seq_len, s.r
    if s.family == "llama":                  # embedding, 4 C^2 + 3 C F + 2 C per block, norm, untied head
        return {"base": 2 * V * C + L * (4 * C * C + 3 * C * 4 * C + 2 * C) + C, "lora": L * 2 * r * (C + C)}
    per_layer = 12 * C * C + 13 * C          # ln_1, ln_2 (4C) + c_attn (3C^2+3C) + c_proj (C^2+C)
    #                                          + c_fc (4C^2+4C) + mlp.c_proj (4C^2+C)
    base = V * C + T * C + L * per_layer + 2 * C
    return {"base": base, "lora": L * r * (C + 3 * C)}


def memory_accounting(s: StepShape, bytes_per_value: int = 4) -> dict[str, dict[str, int]]:
    """Bytes of trainable parameters, their gradients and Adam's two moments, LoRA vs full.

    LoRA trains ``L r (C + 3C)`` values; full fine-tuning trains all of them. Each trainable value
    carries a gradient and two Adam moments (m and v) of the same dtype.
    """
    counts = param_counts(s)
    out = {}
    for mode, trainable in (("lora", counts["lora"]), ("full", counts["base"])):
        out[mode] = {"trainable_params": trainable,
                     "param_bytes": trainable * bytes_per_value,
                     "grad_bytes": trainable * bytes_per_value,
                     "adam_state_bytes": 2 * trainable * bytes_per_value,
                     "total_bytes": 4 * trainable * bytes_per_value}
    out["frozen_base_bytes"] = {"params": counts["base"], "bytes": counts["base"] * bytes_per_value}
    return out
