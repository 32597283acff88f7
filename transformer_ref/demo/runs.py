"""Step 2 of the ``lora-ref demo`` experiment: the fine-tuning runs, each measured.

Every run starts from the same pretrained weights and sees the same batches (the "finetune"
seed); each LoRA run draws its initial A from a generator of its own (:func:`~.common.run_rng`
of its key), except a variant run, which starts from exactly the factors of the LoRA run it is
compared with (its ``partner``), so that the two differ in the variant alone.

* the paper's runs: full fine-tuning; LoRA on (W_q, W_v) at every rank of ``config.ranks``
  (Table 6); W_q alone at twice ``budget_rank`` and all four attention matrices at half of it
  (Table 5's equal budget);
* the variant runs, at ``config.variant_rank`` (issues 13 and 16): **DoRA** (Liu et al. 2024,
  Eq. 5: ``W' = m (W + s B A) / ||W + s B A||_row``, A, B and m trained) next to LoRA on the same
  weights -- on LLaMA the (W_q, W_v) run itself; on GPT-2, whose q, k, v are row blocks of one
  fused ``c_attn`` that DoRA can only normalise as a whole (PEFT has no DoRA per block), DoRA and
  LoRA on the whole ``c_attn`` -- and **QLoRA** (Dettmers et al. 2023): LoRA on (W_q, W_v) with
  every projection of the base held in 4-bit NormalFloat (``train(mode="qlora")``: NF4, blocks of
  64, double quantisation, computed in the training dtype) next to LoRA on the float base.

Each run's row: its settings, per-step losses, held-out evaluation, trainable parameters and
Adam's state (counted on the arrays and by formula), and for an adapter the merge check
(:func:`merge_check`): logits of the merged weights against the adapted forward, within
``2 gamma_n M``. Shapes as in :mod:`transformer_ref.demo.experiment`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from lora_ref.backend import asarray, dtype_name, to_numpy
from lora_ref.checks import positive_int
from lora_ref.lora import LoraConfig
from lora_ref.testing import tolerance

from .. import REFERENCE, add_adapters, forward, merge_adapters
from ..bounds import logit_magnitude, logit_rounding_chain
from ..count import count_parameters, count_trainable, lora_config_for
from ..data import evaluate
from ..hosting import family_of, is_4bit
from ..train import adam_init, train
from .common import DemoConfig, Setup, astype, run_rng, tree_bytes

__all__ = ["GROUPS", "Run", "dequantized", "finetune_all", "lora_config", "merge_check", "runs"]

# Table 5/6 row names for the matrix types of transformer_ref.lora_config_for.
_TYPE_NAMES = {"q": "Wq", "k": "Wk", "v": "Wv", "o": "Wo"}
GROUPS = ("full", "rank sweep", "equal budget", "variant")
"""The runs' groups, in report order: the paper's Tables 5 and 6 are the first three."""


@dataclass(frozen=True)
class Run:
    """One fine-tuning run. ``method``: "full", "lora", "dora" or "qlora"; ``matrices``: the
    paper's matrix types adapted (None for full); ``whole``: adapt the fused projection holding
    them as one weight (GPT-2's ``c_attn``), not block by block (``enable_lora``); ``partner``: the
    key of the LoRA run a variant is compared with, whose initial adapters it starts from."""

    key: str                              # results["runs"] key, e.g. "lora-qv-r8"
    label: str                            # e.g. "LoRA Wq,Wv r=8"
    group: str                            # one of GROUPS
    matrices: tuple[str, ...] | None      # None: full fine-tuning
    r: int | None
    method: str = "lora"
    whole: bool = False
    partner: str | None = None


def runs(config: DemoConfig) -> list[Run]:
    """The runs of an experiment of ``config``, in order (the partners of variants come first)."""
    if not isinstance(config, DemoConfig):
        raise TypeError(f"config must be a transformer_ref.demo.DemoConfig, got {type(config).__name__}")

    def lora(mats: tuple[str, ...], r: int, group: str) -> Run:
        return Run(f"lora-{''.join(mats)}-r{r}", f"LoRA {','.join(_TYPE_NAMES[m] for m in mats)} r={r}",
                   group, mats, r)

    b, v = config.budget_rank, config.variant_rank
    out = [Run("full", "full fine-tuning", "full", None, None, "full")]
    out += [lora(("q", "v"), r, "rank sweep") for r in config.ranks]
    out += [lora(("q",), 2 * b, "equal budget"), lora(("q", "k", "v", "o"), b // 2, "equal budget")]
    qv = f"lora-qv-r{v}"
    if config.family == "gpt2":               # DoRA normalises the whole fused c_attn: LoRA there too
        out += [Run(f"lora-cattn-r{v}", f"LoRA c_attn r={v}", "variant", ("q", "k", "v"), v, "lora", True),
                Run(f"dora-cattn-r{v}", f"DoRA c_attn r={v}", "variant", ("q", "k", "v"), v, "dora", True,
                    f"lora-cattn-r{v}")]
    else:
        out += [Run(f"dora-qv-r{v}", f"DoRA Wq,Wv r={v}", "variant", ("q", "v"), v, "dora", partner=qv)]
    out += [Run(f"qlora-qv-r{v}", f"QLoRA Wq,Wv r={v}", "variant", ("q", "v"), v, "qlora", partner=qv)]
    return out


def lora_config(run: Run, model: Any, alpha: float) -> LoraConfig | None:
    """The run's ``LoraConfig`` for the model config ``model`` (None for full fine-tuning), ``alpha``
    fixed for every rank (scale alpha / r)."""
    if not isinstance(run, Run):
        raise TypeError(f"run must be a transformer_ref.demo.runs.Run (from runs()), got {type(run).__name__}")
    if run.matrices is None:
        return None
    dora = run.method == "dora"
    if not run.whole:
        return lora_config_for(run.matrices, run.r, alpha=alpha, family=model, use_dora=dora)
    family = family_of(model)
    suffixes = dict.fromkeys(family.matrix_types[t][0] for t in run.matrices)
    return LoraConfig(r=run.r, alpha=alpha, target_modules=[family.target_name(s) for s in suffixes], use_dora=dora)


def _formula(config: DemoConfig, run: Run, model: Any) -> tuple[int, str]:
    """Trainable parameters by formula, and the formula. Section 5.1: ``2 L_LoRA d_model r`` for
    L_LoRA adapted (d_model, d_model) matrices; a whole fused projection (d_out = G C, d_in = C):
    ``L r (d_in + d_out)``; DoRA adds its magnitude, d_out per adapted weight."""
    L, C, r = config.n_layer, config.n_embd, run.r
    if run.whole:
        d_out = len(run.matrices) * C
        n, text = L * r * (C + d_out), f"L x r x (d_in + d_out) = {L} x {r} x ({C} + {d_out})"
        extra = (L * d_out, f"L x d_out = {L} x {d_out}")
    else:
        k = L * len(run.matrices)
        n, text = 2 * k * C * r, f"2 x L_LoRA x d_model x r = 2 x {k} x {C} x {r}"
        extra = (k * C, f"L_LoRA x d_model = {k} x {C}")
    if run.method == "dora":
        n, text = n + extra[0], f"{text}, plus DoRA's m: {extra[1]}"
    return n, text


# ============================================================================================
# Fine-tuning, measured
# ============================================================================================


def finetune_all(setup: Setup, all_runs: list[Run], pretrained: Mapping[str, Any], timing: dict[str, Any],
                 bar: Any) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Every fine-tuning run from the same pretrained weights, measured.

    Returns ``(rows, trained, initial)``: the result row of each run, ``{key: (TrainResult,
    LoraConfig or None)}``, and ``{key: adapters before training}`` for the adapter runs.
    ``timing["runs"][key]`` gets each run's seconds (training, evaluation and checks)."""
    heldout_inputs = asarray(setup.downstream.heldout(setup.config.eval_examples)[0])       # (n, T)
    rows: dict[str, Any] = {}
    trained: dict[str, Any] = {}
    initial: dict[str, Any] = {}
    for run in all_runs:
        bar.set_postfix_str(run.label)
        t0 = time.perf_counter()
        res, lc, initial_adapters = _finetune(setup, run, pretrained)
        if initial_adapters is not None:
            initial[run.key] = initial_adapters
        rows[run.key] = _run_row(setup, run, res, lc)
        if lc is not None:
            # a 4-bit base merges in float: its dequantised weights are what the adapted forward computes with
            base = dequantized(res.params) if run.method == "qlora" else pretrained
            rows[run.key]["merge"] = merge_check(base, res.adapters, lc, setup.gpt, heldout_inputs, run.r,
                                                 dora=run.method == "dora")
        timing["runs"][run.key] = time.perf_counter() - t0
        trained[run.key] = (res, lc)
        bar.update(1)
    return rows, trained, initial


def _finetune(setup: Setup, run: Run, pretrained: Mapping[str, Any]) -> tuple[Any, Any, Any]:
    """One run on the downstream task -> ``(TrainResult, LoraConfig or None, initial adapters or None)``."""
    config, gpt = setup.config, setup.gpt
    common = dict(steps=config.finetune_steps, batch_size=config.batch_size, seed=setup.seeds["finetune"],
                  progress=setup.show)
    if run.matrices is None:
        res = train(pretrained, gpt, setup.downstream, mode="full", lr=config.full_lr, **common)
        return res, None, None
    lc = lora_config(run, gpt, config.alpha)
    # each run draws its own initial A (independent of the other runs: a shared stream would
    # make A_r=8 the first rows of A_r=64 and inflate their subspace similarity); a variant
    # draws its partner's, so the two start from the same A and B (DoRA's m is computed from them)
    adapters = add_adapters(pretrained, gpt, lc, run_rng(setup.seeds["adapters"], run.partner or run.key))
    # adapters given: the training generator draws only batches, so every run sees the same ones
    res = train(pretrained, gpt, setup.downstream, mode="qlora" if run.method == "qlora" else "lora",
                lora_config=lc, adapters=adapters, lr=config.lora_lr, **common)
    return res, lc, adapters


def _run_row(setup: Setup, run: Run, res: Any, lc: Any) -> dict[str, Any]:
    """A run's result row: its settings, losses, held-out evaluation and sizes (measured and by formula)."""
    config, gpt = setup.config, setup.gpt
    if lc is None:
        tree, lr = res.params, config.full_lr
        formula = count_parameters(gpt)["base"]
        formula_text = "every parameter of the model"
    else:
        tree, lr = res.adapters, config.lora_lr
        formula, formula_text = _formula(config, run, gpt)
    state = adam_init(tree)                                        # what train() allocates for Adam
    tail = res.losses[-max(1, len(res.losses) // 10):]
    return {
        "label": run.label, "group": run.group, "method": run.method,
        "matrices": list(run.matrices) if run.matrices else None, "whole": run.whole, "partner": run.partner,
        "r": run.r, "lr": lr, "alpha": config.alpha if lc is not None else None,
        "scale": lc.scale if lc is not None else None,
        "losses": [float(v) for v in res.losses], "final_train_loss": float(np.mean(tail)),
        # on a 4-bit base (QLoRA) res.params is that base: the model evaluated is the one trained
        "eval": evaluate(res.params, gpt, res.adapters, lc, setup.downstream, config.eval_examples),
        "trainable": {"measured": count_trainable(tree), "formula": formula, "formula_text": formula_text,
                      "count_parameters": (count_parameters(gpt, lc)["lora"] if lc is not None
                                           else count_parameters(gpt)["base"])},
        "adam_bytes": {"measured": tree_bytes(state.m) + tree_bytes(state.v),
                       "formula": 2 * formula * np.dtype(config.dtype).itemsize},
    }


def dequantized(params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` with every 4-bit weight (``lora_ref.quant.QuantState``) replaced by its dequantised
    array (bitsandbytes' ``fl(level * absmax)`` in float32, widened exactly to the other params'
    float64 if they are): the weights a forward on the 4-bit params computes with when the states
    have no compute dtype of their own (it dequantises each one per call), as plain arrays."""
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a dict of arrays (state-dict names), got {type(params).__name__}")
    states = [v for v in params.values() if is_4bit(v)]
    if not states:
        return dict(params)
    if any(v.compute_dtype is not None for v in states):
        raise ValueError("dequantized: a 4-bit weight computes in a dtype of its own (compute_dtype); "
                         "the demo's QLoRA base computes in the model's dtype")
    from lora_ref.quant import dequantize_4bit

    dtype = next(dtype_name(to_numpy(v).dtype) for v in params.values() if not is_4bit(v))
    return {k: asarray(dequantize_4bit(v, dtype)) if is_4bit(v) else v for k, v in params.items()}


# ============================================================================================
# Merge check: the first-order rounding bound on merged versus unmerged logits
# ============================================================================================


def merge_check(params: Mapping[str, Any], adapters: Mapping[str, Any], lora_config: Any, gpt: Any,
                tokens: Any, r: int, *, dora: bool = False) -> dict[str, Any]:
    """max |merged - unmerged| logits in the training dtype and in float64 (the same weights
    widened exactly), each against its bound ``2 gamma_n M``; and how far the adapters move the
    logits at all (so the check is not vacuous). ``tokens`` (N, T) integer inputs; ``dora``: the
    adapters are DoRA's (``n`` counts its extra roundings, ``logit_rounding_chain(dora=True)``)."""
    r = positive_int(r, "r")
    n = logit_rounding_chain(gpt, r, dora=dora)
    M = logit_magnitude(params, gpt)
    out: dict[str, Any] = {"chain_length": n, "magnitude": M}
    dtype = dtype_name(to_numpy(next(iter(params.values()))).dtype)
    for name in dict.fromkeys((dtype, "float64")):
        p, ad = (params, adapters) if name == dtype else (astype(params, name), astype(adapters, name))
        # REFERENCE: the paper's order W x + s B (A x) (training's FAST op set may fold s B A into W
        # first, which would compare the merge with itself)
        unmerged = to_numpy(forward(p, tokens, gpt, ad, lora_config, ops=REFERENCE)).astype(np.float64)  # (N, T, V)
        merged = to_numpy(forward(merge_adapters(p, ad, lora_config), tokens, gpt, ops=REFERENCE)).astype(np.float64)
        base = to_numpy(forward(p, tokens, gpt, ops=REFERENCE)).astype(np.float64)
        # Both sides are one forward pass of at most n roundings: |each - exact| <= gamma_n M to
        # first order, so |merged - unmerged| <= 2 gamma_n M.
        out[name] = {"max_abs_error": float(np.max(np.abs(merged - unmerged))),
                     "bound": 2.0 * tolerance(name, n) * M,
                     "adapter_effect": float(np.max(np.abs(unmerged - base)))}
    return out
