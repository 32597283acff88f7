"""Training: Adam over any (nested) dict of arrays, and a loop for LoRA or full fine-tuning.

Full fine-tuning (``mode="full"``) is the paper's Eq. 1: every parameter Phi is trained,
    max_Phi  sum_{(x, y) in Z} sum_t log P_Phi(y_t | x, y_<t).
LoRA (``mode="lora"``) is Eq. 2: the pretrained Phi_0 (``params``) stays frozen and only the
adapters Theta (every A and B, and DoRA's magnitudes m) are trained, Phi = Phi_0 + dPhi(Theta),
    max_Theta  sum_{(x, y) in Z} sum_t log p_{Phi_0 + dPhi(Theta)}(y_t | x, y_<t).
Both maximise a log-likelihood by minimising its negative mean, the model's ``loss``. In LoRA
mode the gradient is taken with respect to the adapters alone; ``params`` are closed over, so
autograd never asks for, and never computes, a frozen weight's gradient (the projection's W-VJP
is simply not called). Both are deterministic for a seed (and a thread count).

The loop computes with the op set it is given, ``fast.FAST`` by default (the folded projection,
equal to the reference up to rounding), and each step's loss and gradient on one slice of the
batch per core when the batch is large enough to gain from it (``fast.sharded_value_and_grad``;
NumPy's BLAS thread count is the same after each step as before). It first asks glibc to keep
freed memory for the next step (``machine.keep_freed_memory``: process-wide, no number changes).
This loop is what ``python -m benchmarks.run`` times (docs/performance.md).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from lora_ref.adapters import AdapterSet
from lora_ref.backend import asarray, namespace
from lora_ref.checks import non_negative_int, positive_int, positive_real
from lora_ref.lora import LoraConfig, dropout_mask

from . import machine
from .fast import FAST, _tree_map, auto_threads, sharded_value_and_grad   # fast.py does not import train.py
from .adapting import add_adapters
from .hosting import check_ops, check_params, family_of, is_4bit
from .layers import Ops

__all__ = ["AdamState", "TrainResult", "adam_init", "adam_update", "train"]


# ============================================================================================
# Adam (Kingma & Ba 2015, Algorithm 1), with optional decoupled weight decay (AdamW)
# ============================================================================================


@dataclass(frozen=True)
class AdamState:
    """Adam's moments, shaped like the parameters, and the number of steps taken."""

    step: int
    m: Any
    v: Any


def adam_init(tree: Any) -> AdamState:
    """Zero moments for a (nested) dict of arrays."""
    zeros = _tree_map(lambda p: namespace(p).zeros(p.shape, dtype=p.dtype), tree)
    return AdamState(0, zeros, _tree_map(lambda p: namespace(p).zeros(p.shape, dtype=p.dtype), tree))


def adam_update(tree: Any, grads: Any, state: AdamState, *, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                eps: float = 1e-8, weight_decay: float = 0.0) -> tuple[Any, AdamState]:
    """One Adam step; returns ``(new_tree, new_state)`` (new arrays, nothing modified in place).

        m = b1 m + (1 - b1) g            v = b2 v + (1 - b2) g^2
        m_hat = m / (1 - b1^t)           v_hat = v / (1 - b2^t)            (bias correction)
        p = p - lr (m_hat / (sqrt(v_hat) + eps) + weight_decay p)         (AdamW when decay > 0)

    The constants are Python floats, so float32 parameters stay float32.
    """
    b1, b2 = (float(b) for b in betas)
    lr, eps, wd = float(lr), float(eps), float(weight_decay)
    t = state.step + 1
    c1, c2 = 1.0 - b1 ** t, 1.0 - b2 ** t

    def leaf(p, g, m, v):
        xp = namespace(p)
        m = b1 * m + (1.0 - b1) * g
        v = b2 * v + (1.0 - b2) * (g * g)
        update = (m / c1) / (xp.sqrt(v / c2) + eps)
        if wd:
            update = update + wd * p
        return p - lr * update, m, v

    out = _tree_map(leaf, tree, grads, state.m, state.v)               # leaves: (p, m, v)
    return _tree_map_tuple(out, 0), AdamState(t, _tree_map_tuple(out, 1), _tree_map_tuple(out, 2))


def _tree_map_tuple(tree: Any, i: int) -> Any:
    """Pick element ``i`` of each leaf tuple of a nested dict."""
    if isinstance(tree, Mapping):
        return {k: _tree_map_tuple(v, i) for k, v in tree.items()}
    return tree[i]


@dataclass
class TrainResult:
    """What :func:`train` returns: the trained parameters, the adapters (None for full
    fine-tuning) and the loss before each step's update (a list of Python floats)."""

    params: dict[str, Any]
    adapters: dict[str, dict[str, Any]] | None
    losses: list[float]


def train(params: Mapping[str, Any], config: Any, task: Any, *, mode: str = "lora",
          lora_config: LoraConfig | None = None, adapters: Mapping[str, Any] | None = None,
          steps: int = 100, batch_size: int = 16, lr: float = 1e-3, seed: int = 0,
          betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
          progress: bool | None = None, ops: Ops = FAST, threads: int | None = None) -> TrainResult:
    """Fine-tune with Adam: LoRA (adapters only, base frozen) or full (every parameter).

    Parameters
    ----------
    params : dict of arrays
        The model (e.g. pretrained); never modified.
    config : GPTConfig (or another registered family's config)
    task : object with ``batch(batch_size, rng) -> (inputs, targets)``
        Integer NumPy arrays (B, T); targets of -100 are not scored (see ``transformer_ref.data``).
    mode : "lora", "qlora" or "full"
        QLoRA is LoRA on the base with every projection weight quantised first (QLoRA's recipe,
        ``lora_ref.quant.quantize_params``: NF4, blocks of 64, double quantisation, computed in
        the params' dtype; weights already QuantStates, e.g. computing in bfloat16, are kept);
        ``TrainResult.params`` is that 4-bit base. LoRA also trains on a base holding QuantStates.
        LoRA needs ``lora_config``; its adapters are ``adapters`` if given, else fresh ones from
        :func:`~transformer_ref.add_adapters`; every array of theirs is trained (A and B; with
        ``use_dora`` also m). With ``lora_config.dropout > 0`` each step draws inverted-dropout
        masks for the projections' adapter inputs (embedding adapters take none, as in PEFT).
        One adapter dict is trained at a time: a ``lora_ref.AdapterSet`` is for inference and
        refused here. Full fine-tuning takes no adapters.
    steps, batch_size, lr, betas, eps, weight_decay :
        The loop's length and Adam's settings.
    seed : int
        Seeds one ``numpy.random.Generator`` that draws, in order, the fresh adapters (if any),
        then each step's batch and dropout masks: the run is a function of its arguments.
    progress : bool or None
        Show a tqdm progress bar; None shows it only when stderr is a terminal.
    ops : layers.Ops
        The op set the model computes with: ``fast.FAST`` (default, the training-speed order) or
        ``layers.REFERENCE`` (the paper's order; the same numbers up to rounding, slower).
    threads : int or None
        Each step's loss and gradient are computed on this many slices of the batch at once, one
        per core (:func:`~transformer_ref.fast.sharded_value_and_grad`); None:
        :func:`~transformer_ref.fast.auto_threads` (every core when the batch is large enough to
        gain from it, else 1). The result is the same up to rounding; for a given ``threads`` it
        is deterministic. NumPy's BLAS thread count is restored after every step.

    Before the first step, glibc's malloc is asked to keep freed memory for reuse
    (:func:`~transformer_ref.machine.keep_freed_memory`, process-wide): the step allocates the
    same large temporaries every time, and fetching them from the OS again cost more than some
    layers' arithmetic. The process then keeps its peak heap until it exits.

    Returns a :class:`TrainResult` (``losses[k]`` is the loss at step k, before its update).
    """
    if mode not in ("lora", "full", "qlora"):
        raise ValueError(f"mode must be 'lora', 'qlora' or 'full', got {mode!r}")
    if not hasattr(task, "batch"):
        raise TypeError(f"task must have a batch(batch_size, rng) method, got {type(task).__name__}")
    steps, seed = non_negative_int(steps, "steps"), non_negative_int(seed, "seed")
    batch_size = positive_int(batch_size, "batch_size")
    lr = positive_real(lr, "lr")
    if threads is not None:
        threads = positive_int(threads, "threads", "or None")
    check_ops(ops)
    family = family_of(config)
    dtype = check_params(params, family, config)
    rng = np.random.default_rng(seed)
    params = dict(params)
    if mode == "qlora":    # QLoRA: the projections quantised (NF4, blocks of 64, double quantisation), then LoRA
        from lora_ref.quant import quantize_params

        params, mode = quantize_params(params, [n + ".weight" for n in family.projection_names(config)]), "lora"
    if mode == "full" and any(is_4bit(v) for v in params.values()):
        raise ValueError("mode='full' cannot train 4-bit (QuantState) weights; train adapters on them (mode='lora')")
    if mode == "lora":
        if not isinstance(lora_config, LoraConfig):
            raise TypeError(f"mode='lora' needs lora_config, a lora_ref.LoraConfig; got {type(lora_config).__name__}")
        if isinstance(adapters, AdapterSet):
            raise TypeError("train takes one adapter dict with its lora_config; an AdapterSet is for inference "
                            "(train each adapter on its own, then build the set)")
        trainable = add_adapters(params, config, lora_config, rng) if adapters is None else \
            {k: dict(v) for k, v in adapters.items()}
    else:
        if adapters is not None:
            raise ValueError("mode='full' trains params only; merge the adapters first (merge_adapters)")
        trainable = params

    def objective(tree, inputs, targets, masks):
        if mode == "lora":
            # Eq. 2: the loss of Phi_0 + dPhi(Theta) as a function of Theta (the adapters) alone
            return family.loss(params, inputs, targets, config, tree, lora_config, masks, ops)
        return family.loss(tree, inputs, targets, config, None, None, None, ops)    # Eq. 1: of every Phi

    machine.keep_freed_memory()                           # reuse the last step's memory (no number changes)
    step_fn = None
    state = adam_init(trainable)
    losses: list[float] = []
    show = sys.stderr.isatty() if progress is None else bool(progress)
    bar = tqdm(range(steps), desc=f"{mode} fine-tuning", disable=not show, leave=False)
    for _ in bar:
        inputs, targets = task.batch(batch_size, rng)
        masks = None
        if mode == "lora" and lora_config.dropout > 0.0:
            masks = {name: dropout_mask(inputs.shape + (params[name + ".weight"].shape[1],), lora_config.dropout,
                                        rng, dtype) for name in trainable if not family.is_embedding(name)}
        if step_fn is None:                               # the first batch's shape decides the slicing
            step_fn = sharded_value_and_grad(objective, auto_threads(config, inputs.shape) if threads is None
                                             else threads)
        value, grads = step_fn(trainable, asarray(inputs), asarray(targets), masks)
        trainable, state = adam_update(trainable, grads, state, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        losses.append(float(value))
        bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
    if mode == "lora":
        return TrainResult(params, trainable, losses)
    return TrainResult(trainable, None, losses)
