"""The lora-ref side: transformer_ref's GPT-2 (LoRA on ``c_attn``) or LLaMA (LoRA on ``q_proj``,
``v_proj``), trained by the public loop.

:func:`train_steps` times ``transformer_ref.train`` itself -- the loop users call, with its own
defaults (op set ``FAST``, ``threads=None``: ``auto_threads``, the allocator setting) -- step by
step: its task hands out the same batch every step and notes the time at which each step asks
for it. The benchmark's step is the user's step by construction.

:func:`make_ref_step` rebuilds that step by hand (``sharded_value_and_grad`` of the loss, then
``adam_update``) for the measurements that need to hold a step in their hand: the per-layer
profile (a timed copy of the op set) and the memory trace.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from .flops import StepShape

__all__ = ["SIDES", "FixedBatches", "make_model", "make_ref_step", "time_train", "train_steps"]

# The lora-ref sides of the comparison: how each calls transformer_ref.train. "lora-ref" passes
# nothing but the model and the data: what a user gets.
SIDES = {
    "lora-ref": {"mode": "lora"},
    "lora-ref-reference": {"mode": "lora", "ops": "REFERENCE", "threads": 1},
    "lora-ref-full": {"mode": "full"},
}


def make_model(shape: StepShape, *, dtype: str = "float32", seed: int = 0, lora_config: Any = None) -> dict[str, Any]:
    """A model of ``shape`` with random weights and non-zero LoRA adapters -- GPT-2 with LoRA on
    every ``c_attn``, or (``shape.family == "llama"``) LLaMA with LoRA on every ``q_proj`` and
    ``v_proj``, or the adapters ``lora_config`` asks for (a ``LoraConfig``; default ``None``: those
    at rank ``shape.r``, alpha 16, ``init="random"``) -- plus a batch of random tokens and targets:
    ``{"config", "lora_config", "params", "adapters", "tokens", "targets"}``. Every side of a
    comparison is built from this."""
    from lora_ref import LoraConfig
    from transformer_ref import GPTConfig, LlamaConfig, add_adapters, init_params

    if shape.family == "llama":
        config: Any = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.n_embd, intermediate_size=4 * shape.n_embd,
                                  num_hidden_layers=shape.n_layer, num_attention_heads=shape.heads,
                                  max_position_embeddings=shape.seq_len)
        target_modules = ["q_proj", "v_proj"]
    else:
        config = GPTConfig(vocab_size=shape.vocab, n_positions=shape.seq_len, n_embd=shape.n_embd,
                           n_layer=shape.n_layer, n_head=shape.heads)
        target_modules = ["c_attn"]
    # init="random": B is non-zero too, so the adapters change the loss and the check that both
    # sides compute the same loss also covers the LoRA branch.
    if lora_config is None:
        lora_config = LoraConfig(r=shape.r, alpha=16.0, target_modules=target_modules, init="random")
    elif not isinstance(lora_config, LoraConfig):
        raise TypeError(f"lora_config must be a lora_ref.LoraConfig or None, got {type(lora_config).__name__}")
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


class FixedBatches:
    """A task for ``transformer_ref.train``: the same ``(tokens, targets)`` every step (as the
    PyTorch side trains on), and ``starts``, the ``time.perf_counter()`` at which each step asked
    for its batch -- a step is the time from one request to the next."""

    def __init__(self, tokens: np.ndarray, targets: np.ndarray) -> None:
        self.tokens, self.targets = tokens, targets
        self.starts: list[float] = []

    def batch(self, batch_size: int, rng: Any) -> tuple[np.ndarray, np.ndarray]:
        if batch_size != self.tokens.shape[0]:
            raise ValueError(f"batch_size must be {self.tokens.shape[0]} (the fixed batch), got {batch_size}")
        self.starts.append(time.perf_counter())
        return self.tokens, self.targets


def time_train(params: Any, config: Any, tokens: np.ndarray, targets: np.ndarray, steps: int,
               **train_kwargs: Any) -> tuple[list[float], Any]:
    """``transformer_ref.train(params, config, task, steps=steps, batch_size=B, progress=False,
    **train_kwargs)`` on a :class:`FixedBatches` task of ``tokens``, ``targets`` (B, T); returns
    the seconds of each step (from one batch request to the next, the last to train's return)
    and train's result."""
    import transformer_ref

    task = FixedBatches(tokens, targets)
    result = transformer_ref.train(params, config, task, steps=steps, batch_size=tokens.shape[0], progress=False,
                                   **train_kwargs)
    bounds = task.starts + [time.perf_counter()]
    return [b - a for a, b in zip(bounds[:-1], bounds[1:])], result


def train_steps(model: dict[str, Any], side: str, steps: int, *, lr: float = 1e-3) -> dict[str, Any]:
    """Run ``transformer_ref.train`` for ``steps`` steps on ``model``'s batch (from
    :func:`make_model`) as ``side`` of :data:`SIDES` calls it; returns ``{"seconds": [per step],
    "losses": [...], "threads": batch slices per step, "call": what train was given}``.

    LoRA trains ``model``'s adapters; full fine-tuning trains the weights with the adapters merged
    in (the same function). The first steps include one-time work (the worker pool, the first
    page faults): the caller discards its warm-up steps.
    """
    from transformer_ref import REFERENCE, merge_adapters
    from transformer_ref.fast import auto_threads

    if side not in SIDES:
        raise ValueError(f"side must be one of {sorted(SIDES)}, got {side!r}")
    how = dict(SIDES[side])
    config, lc, tokens = model["config"], model["lora_config"], model["tokens"]
    kwargs: dict[str, Any] = {"mode": how.pop("mode"), "lr": lr}
    if "ops" in how:
        kwargs["ops"] = {"REFERENCE": REFERENCE}[how.pop("ops")]
    kwargs.update(how)
    if kwargs["mode"] == "lora":
        seconds, result = time_train(model["params"], config, tokens, model["targets"], steps, lora_config=lc,
                                     adapters=model["adapters"], **kwargs)
    else:
        seconds, result = time_train(merge_adapters(model["params"], model["adapters"], lc), config, tokens,
                                     model["targets"], steps, **kwargs)
    threads = kwargs.get("threads")
    call = {k: v for k, v in kwargs.items() if k != "ops"}
    call["ops"] = "REFERENCE" if kwargs.get("ops") is REFERENCE else "FAST (train's default)"
    return {"seconds": seconds, "losses": result.losses,
            "threads": auto_threads(config, tokens.shape) if threads is None else threads, "call": call}
