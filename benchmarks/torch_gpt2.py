"""The PyTorch side: what a user would run instead of lora-ref.

transformers' ``GPT2LMHeadModel`` (its default attention, SDPA), PEFT LoRA on ``c_attn`` with
``fan_in_fan_out=True`` (GPT-2's Conv1D), ``torch.optim.Adam`` with its CPU defaults, float32,
dropout off everywhere (lora-ref's forward has none); eager mode, or the model wrapped in
``torch.compile`` (default backend, inductor), the one-line change a user would try for speed.
The model receives the *same* weights and adapters as the lora-ref side, so the two compute the
same loss; the runner checks that before it compares times.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .flops import StepShape

__all__ = ["available", "make_torch_step", "training_step"]


def available() -> str | None:
    """None when torch, transformers and peft import; otherwise why not."""
    try:
        import peft  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        return f"not measured: {exc.name} is not installed"
    return None


def _hf_state_dict(params: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """transformer_ref parameters (projections (d_out, d_in)) as a GPT-2 state dict (Conv1D
    weights (d_in, d_out))."""
    import torch

    out = {}
    for name, value in params.items():
        value = np.asarray(value)
        is_proj = name.endswith(".weight") and any(p in name for p in (".c_attn.", ".c_proj.", ".c_fc."))
        out[name] = torch.from_numpy(np.ascontiguousarray(value.T if is_proj else value)).clone()
    return out


def make_torch_step(shape: StepShape, mode: str, params: Mapping[str, np.ndarray],
                    adapters: Mapping[str, Mapping[str, np.ndarray]] | None, tokens: np.ndarray,
                    targets: np.ndarray, *, alpha: float = 16.0, lr: float = 1e-3,
                    compile: bool = False) -> dict[str, Any]:
    """One training step of transformers GPT-2 (+ PEFT LoRA on c_attn when ``mode == "lora"``);
    with ``compile`` the model is ``torch.compile(model)`` (compiled at the first step).

    ``params``: float32 arrays keyed by GPT-2 state-dict names, projections (d_out, d_in);
    ``adapters``: ``{"transformer.h.{i}.attn.c_attn": {"A": (r, C), "B": (3C, r)}}`` for LoRA;
    ``tokens``, ``targets``: int arrays (batch, T). Returns ``{"step", "loss", "logits", "trainable"}``:
    ``step()`` runs forward, backward and Adam and returns the loss (float); ``loss()`` and
    ``logits()`` evaluate the current model without training, eagerly (the compiled model shares
    its parameters; evaluating it would compile a second, inference graph); ``trainable`` counts
    parameters.
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    if mode not in ("lora", "full"):
        raise ValueError(f"mode must be 'lora' or 'full', got {mode!r}")
    config = GPT2Config(vocab_size=shape.vocab, n_positions=shape.seq_len, n_embd=shape.n_embd,
                        n_layer=shape.n_layer, n_head=shape.heads, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, use_cache=False)
    model = GPT2LMHeadModel(config)
    missing, unexpected = model.load_state_dict(_hf_state_dict(params), strict=False)
    # lm_head.weight is tied to wte (absent from the state dict); nothing else may be missing.
    if [k for k in missing if k != "lm_head.weight"] or unexpected:
        raise RuntimeError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    model = model.float()
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        peft_config = LoraConfig(r=shape.r, lora_alpha=alpha, target_modules=["c_attn"], lora_dropout=0.0,
                                 fan_in_fan_out=True, bias="none")
        model = get_peft_model(model, peft_config)
        with torch.no_grad():
            for name, module in model.named_modules():
                if name.endswith("attn.c_attn") and hasattr(module, "lora_A"):
                    key = name[name.index("transformer."):]
                    module.lora_A["default"].weight.copy_(torch.from_numpy(adapters[key]["A"]))
                    module.lora_B["default"].weight.copy_(torch.from_numpy(adapters[key]["B"]))
    return training_step(model, tokens, targets, shape.vocab, lr=lr, compile=compile)


def training_step(model: Any, tokens: np.ndarray, targets: np.ndarray, vocab: int, *, lr: float,
                  compile: bool) -> dict[str, Any]:
    """The step both PyTorch sides (GPT-2 here, LLaMA in :mod:`benchmarks.torch_llama`) time, on a
    causal LM ``model`` with its trainable parameters set: cross-entropy over ``vocab`` of the
    logits for ``tokens`` (batch, T) against ``targets`` (batch, T), backward, ``torch.optim.Adam``.
    Returns ``{"step", "loss", "logits", "trainable"}`` as :func:`make_torch_step` documents."""
    import torch
    import torch.nn.functional as F

    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=lr)
    x = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
    y = torch.from_numpy(np.asarray(targets, dtype=np.int64)).reshape(-1)   # (B*T,)
    run = torch.compile(model) if compile else model

    def loss(module: Any = model) -> Any:
        logits = module(input_ids=x, use_cache=False).logits                 # (B, T, V)
        return F.cross_entropy(logits.reshape(-1, vocab), y)

    def step() -> float:
        value = loss(run)
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()
        return float(value.detach())

    def eval_loss() -> float:
        with torch.no_grad():
            return float(loss())

    def eval_logits() -> np.ndarray:
        with torch.no_grad():
            return model(input_ids=x, use_cache=False).logits.numpy()          # (B, T, V)

    return {"step": step, "loss": eval_loss, "logits": eval_logits, "trainable": sum(p.numel() for p in trainable)}
