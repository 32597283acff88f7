"""The lora-ref side: transformer_ref's GPT-2, LoRA on ``c_attn``, ``value_and_grad`` and Adam.

This is exactly what ``transformer_ref.train`` does per step (and what a user writes): the loss,
computed with the training op set ``transformer_ref.FAST`` (train's default), is differentiated
with respect to the adapters (LoRA) or to every parameter (full fine-tuning), and ``adam_update``
returns the new arrays.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .flops import StepShape

__all__ = ["make_model", "make_ref_step"]


def make_model(shape: StepShape, *, dtype: str = "float32", seed: int = 0) -> dict[str, Any]:
    """A GPT-2 of ``shape`` with random weights and non-zero LoRA adapters on every ``c_attn``,
    plus a batch of random tokens and targets: ``{"config", "lora_config", "params",
    "adapters", "tokens", "targets"}``. Both sides of a comparison are built from this."""
    from lora_ref import LoraConfig
    from transformer_ref import GPTConfig, add_adapters, init_params

    config = GPTConfig(vocab_size=shape.vocab, n_positions=shape.seq_len, n_embd=shape.n_embd,
                       n_layer=shape.n_layer, n_head=shape.heads)
    # init="random": B is non-zero too, so the adapters change the loss and the check that both
    # sides compute the same loss also covers the LoRA branch.
    lora_config = LoraConfig(r=shape.r, alpha=16.0, target_modules=["c_attn"], init="random")
    rng = np.random.default_rng(seed)
    params = init_params(config, rng, dtype)
    adapters = add_adapters(params, config, lora_config, rng)
    tokens = rng.integers(0, shape.vocab, size=(shape.batch, shape.seq_len))     # (B, T)
    targets = rng.integers(0, shape.vocab, size=(shape.batch, shape.seq_len))    # (B, T)
    return {"config": config, "lora_config": lora_config, "params": params, "adapters": adapters,
            "tokens": tokens, "targets": targets}


def make_ref_step(model: dict[str, Any], mode: str, *, lr: float = 1e-3, threads: int | None = None,
                  ops: Any = None) -> dict[str, Any]:
    """One training step of ``model`` (from :func:`make_model`): LoRA or full fine-tuning.

    The step is ``transformer_ref.train``'s: :func:`~transformer_ref.fast.sharded_value_and_grad`
    (``threads`` slices of the batch at once; None: ``auto_threads``, what ``train`` chooses) of
    the loss computed with ``ops`` (None: ``transformer_ref.FAST``, train's default), then
    ``adam_update``.

    Returns ``{"step", "loss", "logits", "trainable"}``: ``step()`` runs forward, backward and
    Adam, keeps the updated arrays for the next call, and returns the loss (float); ``loss()`` and
    ``logits()`` evaluate the current model; ``trainable`` counts the trained parameters.
    """
    from transformer_ref import FAST, forward, loss, merge_adapters
    from transformer_ref.fast import auto_threads, sharded_value_and_grad
    from transformer_ref.train import adam_init, adam_update

    if mode not in ("lora", "full"):
        raise ValueError(f"mode must be 'lora' or 'full', got {mode!r}")
    config, lora_config = model["config"], model["lora_config"]
    params, tokens, targets = model["params"], model["tokens"], model["targets"]
    ops = FAST if ops is None else ops
    if mode == "lora":
        state = {"tree": {k: dict(v) for k, v in model["adapters"].items()}}

        def objective(adapters: Any, x: Any = tokens, y: Any = targets, masks: Any = None) -> Any:
            return loss(params, x, y, config, adapters, lora_config, masks, ops)

        def logits() -> np.ndarray:
            return np.asarray(forward(params, tokens, config, state["tree"], lora_config, ops=ops))   # (B, T, V)
    else:
        # Full fine-tuning of the same function: the adapters folded into the weights.
        state = {"tree": merge_adapters(params, model["adapters"], lora_config)}

        def objective(tree: Any, x: Any = tokens, y: Any = targets, masks: Any = None) -> Any:
            return loss(tree, x, y, config, ops=ops)

        def logits() -> np.ndarray:
            return np.asarray(forward(state["tree"], tokens, config, ops=ops))                # (B, T, V)

    threads = auto_threads(config, tokens.shape) if threads is None else threads
    value_grad = sharded_value_and_grad(objective, threads)
    state["adam"] = adam_init(state["tree"])

    def step() -> float:
        value, grads = value_grad(state["tree"], tokens, targets, None)
        state["tree"], state["adam"] = adam_update(state["tree"], grads, state["adam"], lr=lr)
        return float(value)

    def eval_loss() -> float:
        return float(objective(state["tree"]))

    trainable = sum(int(np.prod(a.shape)) for a in _leaves(state["tree"]))
    return {"step": step, "loss": eval_loss, "logits": logits, "trainable": trainable, "threads": threads}


def _leaves(tree: Any) -> list[Any]:
    if isinstance(tree, dict):
        return [leaf for v in tree.values() for leaf in _leaves(v)]
    return [tree]
