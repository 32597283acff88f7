"""The ``lora-ref demo`` experiment: the LoRA paper's Tables 5, 6, 7 and Figure 3, in miniature,
with DoRA, QLoRA and two adapters on one base beside them.

One call of :func:`compute` does, deterministically for a seed:

1. pretrain a small GPT-2-architecture model (:mod:`transformer_ref`), or with ``family="llama"`` a
   LLaMA-architecture one (RMSNorm, RoPE, SwiGLU), from scratch on the pretraining cipher task
   (:func:`transformer_ref.data.pretraining_task`);
2. fine-tune it on the downstream task (the same cipher with a few pairs of symbols swapped,
   :func:`transformer_ref.data.downstream_task`) with full fine-tuning, and with LoRA on
   (W_q, W_v) at every rank of ``config.ranks`` (Table 6's rank sweep), plus W_q alone and all
   four attention projections at the parameter budget of (W_q, W_v) at ``budget_rank``
   (Table 5: W_q at 2b, (W_q, W_v) at b, (W_q, W_k, W_v, W_o) at b / 2). On GPT-2, q, k and v
   are row blocks of the fused ``attn.c_attn`` adapted through ``LoraConfig.enable_lora``
   (loralib's MergedLinear) and o is ``attn.c_proj``; on LLaMA they are ``self_attn.{q,k,v,o}_proj``
   (PEFT's target_modules; multi-head, so that every type is (C, C) and Table 5's budgets stay
   equal). Then the variants at ``variant_rank``, each beside the LoRA run it differs from in the
   variant alone: DoRA, and QLoRA on the 4-bit NF4 base (:mod:`~transformer_ref.demo.runs`).
   Every fine-tuning run starts from the same pretrained weights and sees the same batches;
3. measure: held-out loss and accuracy of each run; trainable parameters and Adam's state bytes,
   counted on the arrays and by formula; merged versus unmerged logits; the singular values of
   the learned updates; the subspace similarity phi(A_{r=8}, A_{r=64}) (Figure 3); the
   amplification factor (Table 7) (:mod:`~transformer_ref.demo.analysis`); what the 4-bit base
   costs on the task (:mod:`~transformer_ref.demo.quantised`);
4. train a second adapter on a second task, serve both in one mixed batch, and combine them
   (:mod:`~transformer_ref.demo.two_tasks`).

:mod:`transformer_ref.demo.run` writes the result (``report.md``, ``results.json``, figures);
:mod:`~transformer_ref.demo.common` holds the configuration and what every step shares.

Shapes follow :mod:`lora_ref`: W (d_out, d_in), A (r, d_in), B (d_out, r), dW = s B A with
s = alpha / r. C = n_embd. A fused ``c_attn`` adapter with n enabled blocks has A (n r, C) and
B (n C, r); block k is ``A[k r:(k+1) r, :]``, ``B[k C:(k+1) C, :]`` and acts on the rows
``W[g C:(g+1) C, :]`` of the g-th of the q, k, v blocks.
"""

from __future__ import annotations

import time
from typing import Any

from tqdm.auto import tqdm

from ..count import count_parameters
from .analysis import analyse
from .common import DEFAULT, DemoConfig, Setup, make_setup, pretrain, versions
from .quantised import quantisation_error
from .runs import finetune_all, runs
from .two_tasks import two_tasks

__all__ = ["compute"]


def compute(config: DemoConfig = DEFAULT, *, progress: bool | None = None) -> dict[str, Any]:
    """The experiment without the writing: every number of the report, as a dict.

    Keys: ``"config"``, ``"model"``, ``"task"``, ``"versions"``, ``"seeds"``, ``"pretraining"``,
    ``"runs"`` (per run: losses, held-out evaluation, parameter and optimizer-state counts, merge
    check), ``"analysis_layer"``, ``"spectra"``, ``"phi"``, ``"amplification"``, ``"qlora"`` (the
    4-bit base against the float one), ``"two_tasks"`` (the second adapter, the mixed batch, the
    combinations), ``"timing"`` (seconds; the only entry that is not a function of ``config``)
    and ``"figures"`` (empty here). ``progress``: tqdm progress bars; None shows them only when
    stderr is a terminal.
    """
    if not isinstance(config, DemoConfig):
        raise TypeError(f"config must be a transformer_ref.demo.DemoConfig, got {type(config).__name__}")
    start = time.perf_counter()
    setup = make_setup(config, progress)
    all_runs = runs(config)
    result = _describe(setup)
    timing: dict[str, Any] = {"runs": {}}
    bar = tqdm(total=2 + len(all_runs), desc="lora-ref demo", unit="run", disable=not setup.show)
    bar.set_postfix_str("pretraining")
    t0 = time.perf_counter()
    pretrained, result["pretraining"] = pretrain(setup)
    timing["pretraining_s"] = time.perf_counter() - t0
    bar.update(1)
    result["runs"], trained, initial = finetune_all(setup, all_runs, pretrained, timing, bar)
    t0 = time.perf_counter()
    known = {"pretrained": result["pretraining"]["downstream_before"],          # task A's evaluations, made already
             "a": result["runs"][f"lora-qv-r{config.variant_rank}"]["eval"]}
    result["two_tasks"] = two_tasks(setup, pretrained, trained, timing, bar, known)
    timing["two_tasks_s"] = time.perf_counter() - t0
    bar.update(1)
    bar.close()
    t0 = time.perf_counter()
    result.update(analyse(setup, all_runs, pretrained, trained, initial))
    result["qlora"] = quantisation_error(setup, pretrained, trained[f"qlora-qv-r{config.variant_rank}"][0].params)
    timing["analysis_s"] = time.perf_counter() - t0
    timing["total_s"] = time.perf_counter() - start
    result["timing"] = timing
    result["figures"] = []
    return result


def _describe(setup: Setup) -> dict[str, Any]:
    """The result's head: configuration, model and task sizes, software versions, seeds."""
    config, gpt = setup.config, setup.gpt
    pre_task, down_task = setup.pretraining, setup.downstream
    return {
        "config": config.to_dict(),
        "model": {"family": config.family, "n_embd": config.n_embd, "n_layer": config.n_layer,
                  "n_head": config.n_head, "vocab_size": gpt.vocab_size, "n_positions": setup.pretraining.seq_len,
                  "mlp_width": gpt.mlp_width if config.family == "gpt2" else gpt.intermediate_size,
                  "parameters": count_parameters(gpt)["base"], "dtype": config.dtype},
        "task": {"n_symbols": pre_task.n_symbols, "length": pre_task.length, "n_swaps": config.n_swaps,
                 "changed": list(down_task.changed), "seq_len": pre_task.seq_len,
                 "pretraining_cipher": list(pre_task.cipher), "downstream_cipher": list(down_task.cipher)},
        "versions": versions(),
        "seeds": setup.seeds,
    }
