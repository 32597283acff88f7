"""The demo's words: ``report.md`` section by section, and the one-screen terminal summary.

Every number printed here is read from the result of :func:`transformer_ref.demo.compute`; the
statements of the "Findings" section are computed from those numbers, never typed by hand. Each
``_section`` function returns the Markdown lines of one section of the report, in report order.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import scipy.special

from lora_ref.checks import finite_real, positive_int

from .common import DEFAULT, PRESETS, DemoConfig
from .formats import (_ARCH, _bytes, _family, _figure, _fmt, _int, _list, _lora_keys, _merge_ratios, _paper_keys,
                      _sweep_keys)
from .report_variants import two_tasks_section, variant_findings, variant_summary, variants_section

__all__ = ["PAPER_TABLE_7", "accuracy_saturation_caveat", "amplification_regime_caveat", "below_untuned_caveat",
           "phi_chance", "phi_chance_caveat", "report_markdown", "summary_text"]


# ============================================================================================
# Caveats: how the numbers must be read, each computed from the result (None: it does not apply)
# ============================================================================================

PAPER_TABLE_7 = {"weight_norm": 61.95, "delta_norm": {4: 6.91, 64: 3.57}}
"""The paper's Table 7 (GPT-3 175B, layer 48, W_q): ``|W_q|_F`` and ``|dW_q|_F`` at r = 4 and 64."""


def accuracy_saturation_caveat(result: dict[str, Any]) -> str | None:
    """Two or more runs (full fine-tuning included) at held-out accuracy 1: accuracy cannot rank
    them, held-out loss can; says which of them has the lowest loss and which the highest."""
    runs = result["runs"]
    top = sorted((k for k, row in runs.items() if row["eval"]["accuracy"] >= 1.0), key=lambda k: runs[k]["eval"]["loss"])
    if len(top) < 2:
        return None
    lo, hi = runs[top[0]], runs[top[-1]]
    return (f"Accuracy saturates: {len(top)} of the {len(runs)} runs get every held-out answer right, so accuracy "
            f"cannot rank them. Held-out loss can: among them it is lowest for {lo['label']} "
            f"({_fmt(lo['eval']['loss'])}) and highest for {hi['label']} ({_fmt(hi['eval']['loss'])}).")


def below_untuned_caveat(result: dict[str, Any]) -> str | None:
    """Runs that end worse than the pretrained model before fine-tuning, on held-out accuracy or loss."""
    before = result["pretraining"]["downstream_before"]
    parts = []
    for row in result["runs"].values():
        e = row["eval"]
        worse = ([f"accuracy {_fmt(e['accuracy'])} against {_fmt(before['accuracy'])}"] * (e["accuracy"] < before["accuracy"])
                 + [f"loss {_fmt(e['loss'])} against {_fmt(before['loss'])}"] * (e["loss"] > before["loss"]))
        if worse:
            parts.append(f"{row['label']}, held-out {' and '.join(worse)} before fine-tuning")
    if not parts:
        return None
    return (f"Below the untuned model: {'; '.join(parts)}. Fine-tuning made "
            f"{'this run' if len(parts) == 1 else 'these runs'} worse than not fine-tuning at all.")


def _phi_chance_moments(i: int, j: int, d: int) -> tuple[float, float]:
    """Mean and variance of phi(A1, A2, i, j) for independent uniformly random subspaces of R^d.
    With P1, P2 the orthogonal projections on the i- and j-dimensional subspaces,
    phi = tr(P1 P2) / min(i, j) (Eq. 4), E tr(P1 P2) = i j / d and
    Var tr(P1 P2) = 2 i j (d - i)(d - j) / (d^2 (d - 1)(d + 2)) (fourth moments of a Haar rotation)."""
    m = min(i, j)
    mean = i * j / d / m                                                  # = max(i, j) / d
    var = 2.0 * i * j * (d - i) * (d - j) / (d * d * (d - 1) * (d + 2)) / (m * m)
    return mean, var


def phi_chance(i: int, j: int, d: int, q: float = 0.95) -> tuple[float, float]:
    """``(mean, q-quantile)`` of the subspace similarity phi(A1, A2, i, j) (Eq. 4) when the two
    row spaces are independent, uniformly random subspaces of R^d of dimensions at least i and j:
    what chance gives, to hold a measured phi against. The mean is ``max(i, j) / d``. The
    quantile is that of the Beta law with phi's exact mean and variance, which IS phi's law when
    ``min(i, j) = 1`` (phi is then the squared length of a random unit vector's projection on a
    ``max(i, j)``-dimensional subspace: Beta(max / 2, (d - max) / 2)); otherwise an approximation."""
    i, j, d = positive_int(i, "i"), positive_int(j, "j"), positive_int(d, "d")
    q = finite_real(q, "q")
    if not 0.0 < q < 1.0:
        raise ValueError(f"q must be in (0, 1), got {q!r}")
    if d < 2 or max(i, j) > d:
        raise ValueError(f"need 2 <= d and i, j <= d, got i={i}, j={j}, d={d}")
    mean, var = _phi_chance_moments(i, j, d)
    if var == 0.0:                                   # one subspace is all of R^d: phi = 1 always
        return mean, mean
    k = mean * (1.0 - mean) / var - 1.0              # Beta(a, b): mean a / (a + b), a + b = k
    return mean, float(scipy.special.betaincinv(mean * k, (1.0 - mean) * k, q))


def _phi_entries(result: dict[str, Any]) -> list[tuple[str, int, int]]:
    """The (key suffix, i, j) of the phi entries the report shows: (1, 1), (p, p), (r1, r2)."""
    r1, r2 = result["config"]["phi_ranks"]
    p = min(r1, r2)
    return [("1_1", 1, 1), ("p_p", p, p), ("r1_r2", r1, r2)]


def phi_chance_caveat(result: dict[str, Any]) -> str | None:
    """Trained phi values no larger than the 95th percentile of random subspaces' (:func:`phi_chance`):
    those A matrices share no more of those directions than random ones would."""
    d = result["model"]["n_embd"]
    parts = []
    for suffix, i, j in _phi_entries(result):
        q95 = phi_chance(i, j, d)[1]
        hits = [f"W{kind} layer {p['layer']} ({_fmt(p['phi_' + suffix], 3)})"
                for kind, per_layer in result["phi"].items() for p in per_layer if p["phi_" + suffix] <= q95]
        if hits:
            parts.append(f"phi({i},{j}) of {_list(hits)} {'is' if len(hits) == 1 else 'are'} at most {_fmt(q95, 3)}, "
                         f"the 95th percentile of "
                         f"phi({i},{j}) for random subspaces of dimension d_in = {d}")
    if not parts:
        return None
    return (f"At chance level: {'; '.join(parts)}. There, the two runs' A matrices share no more of those "
            "directions than random ones would.")


def amplification_regime_caveat(result: dict[str, Any]) -> str | None:
    """Updates with ``|dW|_F > |W|_F``: a different regime from the paper's Table 7, where dW is
    a small fraction of W (:data:`PAPER_TABLE_7`)."""
    rows = [(r, kind, a) for r, per_kind in result["amplification"].items() for kind, a in per_kind.items()
            if a["delta_norm"] > a["weight_norm"]]
    if not rows:
        return None
    t7 = PAPER_TABLE_7
    return ("Here `|dW|_F` exceeds `|W|_F` (" + "; ".join(f"W{kind} at r = {r}: {_fmt(a['delta_norm'])} against "
                                                       f"{_fmt(a['weight_norm'])}" for r, kind, a in rows)
            + "): the update is larger than the weight it adapts. That is a different regime from the paper's "
            f"Table 7, where `|dW_q|_F` is {t7['delta_norm'][4]} (r = 4) and {t7['delta_norm'][64]} (r = 64) against "
            f"`|W_q|_F` = {t7['weight_norm']}, so compare how the factor changes with the rank, not its size.")


# ============================================================================================
# report.md
# ============================================================================================


def report_markdown(result: dict[str, Any]) -> str:
    """The report as Markdown (figures linked as ``figures/NAME.png``) for a result of
    :func:`transformer_ref.demo.compute` (with ``"figures"`` set by the writer)."""
    sections: tuple[Callable[[dict[str, Any]], list[str]], ...] = (
        _configuration_section, _findings_section, _training_section, _rank_section, variants_section,
        _parameters_section, _merge_section, _spectra_section, _phi_section, _amplification_section,
        two_tasks_section, _reproduce_section)
    lines = [f"# lora-ref demo: LoRA on a small {_ARCH[_family(result)][0]}, the paper's Tables 5-7 and Figure 3 "
             "in miniature, with DoRA, QLoRA and two adapters on one base", "",
             "Generated by `lora-ref demo`; every number below is computed by the run (`results.json` holds them all).",
             ""]
    for section in sections:
        lines += section(result)
    return "\n".join(lines)


def _configuration_section(result: dict[str, Any]) -> list[str]:
    cfg, model, task, timing = result["config"], result["model"], result["task"], result["timing"]
    layer = result["analysis_layer"]
    lines = ["## Configuration", "", "| | |", "|---|---|",
             f"| model | {_ARCH[_family(result)][1]} (transformer_ref): n_embd={model['n_embd']}, "
             f"n_layer={model['n_layer']}, n_head={model['n_head']}, MLP width {model['mlp_width']}, vocab {model['vocab_size']}, "
             f"context {model['n_positions']}; {_int(model['parameters'])} parameters, {model['dtype']} |",
             f"| pretraining task | substitution cipher over {task['n_symbols']} symbols, strings of {task['length']}, "
             f"only the enciphered half scored |",
             f"| downstream task | the same cipher with {task['n_swaps']} pairs of outputs swapped: symbols "
             f"{', '.join(map(str, task['changed']))} are re-routed |",
             f"| pretraining | {cfg['pretrain_steps']} steps of Adam, lr {cfg['pretrain_lr']:g}, batch {cfg['batch_size']} |",
             f"| fine-tuning | {cfg['finetune_steps']} steps of Adam per run, batch {cfg['batch_size']}, identical batches "
             f"for every run; full: lr {cfg['full_lr']:g}; LoRA: lr {cfg['lora_lr']:g}, alpha {cfg['alpha']:g} for every "
             f"rank (scale alpha / r), A kaiming-uniform, B = 0, no dropout |",
             f"| evaluation | {cfg['eval_examples']} held-out strings (never trained on) |",
             f"| seed | {cfg['seed']} (every random draw derives from it) |",
             f"| analysed layer | {layer} of 0..{model['n_layer'] - 1} (`n_layer // 2`, as the paper's layer 48 of 96) |",
             f"| wall time | {timing['total_s']:.1f} s for training and analysis (pretraining {timing['pretraining_s']:.1f} s) |",
             f"| software | {', '.join(f'{k} {v}' for k, v in result['versions'].items())} |",
             ""]
    if "figures_skipped" in result:
        lines += [f"**Figures skipped:** {result['figures_skipped']}. Install matplotlib (`pip install 'lora-ref[plots]'`) "
                  "and run the demo again to get them; the tables below are complete without them.", ""]
    return lines


def _findings_section(result: dict[str, Any]) -> list[str]:
    return ["## Findings", "", *(f"- {line}" for line in _findings(result)), ""]


def _findings(result: dict[str, Any]) -> list[str]:
    """Plain statements computed from the numbers (no hand-typed claims)."""
    runs = result["runs"]
    full = runs["full"]["eval"]
    before = result["pretraining"]["downstream_before"]
    lines = [f"Before fine-tuning, the pretrained model scores {_fmt(before['accuracy'])} accuracy on the "
             f"downstream task and {_fmt(before['changed_accuracy'])} on the swapped symbols (it applies the "
             f"old cipher); full fine-tuning reaches {_fmt(full['accuracy'])} and {_fmt(full['changed_accuracy'])}."]
    matched = [runs[k]["label"] for k in _lora_keys(result) if runs[k]["eval"]["accuracy"] >= full["accuracy"]]
    short = [k for k in _lora_keys(result) if runs[k]["eval"]["accuracy"] < full["accuracy"]]
    if matched:
        lines.append(f"Held-out accuracy at least that of full fine-tuning: {', '.join(matched)}.")
    lines += [c for c in (accuracy_saturation_caveat(result),) if c]
    if short:
        lines.append("Held-out accuracy below full fine-tuning: " + ", ".join(
            f"{runs[k]['label']} ({_fmt(runs[k]['eval']['accuracy'])}, swapped symbols "
            f"{_fmt(runs[k]['eval']['changed_accuracy'])})" for k in short) + ".")
    lines += [c for c in (below_untuned_caveat(result),) if c]
    sweep = _sweep_keys(result)
    lo, hi = runs[sweep[0]], runs[sweep[-1]]
    lines.append(f"Smallest versus largest rank of the sweep: {lo['label']} held-out loss {_fmt(lo['eval']['loss'])}, "
                 f"{hi['label']} {_fmt(hi['eval']['loss'])}; full fine-tuning {_fmt(full['loss'])}.")
    worst = max((err / bound, key, d) for err, bound, d, key in _merge_ratios(result))
    lines.append(f"Merging: the largest merged-versus-unmerged logit error is {_fmt(worst[0], 2)} of its bound "
                 f"({runs[worst[1]]['label']}, {worst[2]}).")
    return lines + variant_findings(result)


def _training_section(result: dict[str, Any]) -> list[str]:
    pre = result["pretraining"]
    tail = pre["losses"][-max(1, len(pre["losses"]) // 10):]
    return ["## Training", "",
            f"Pretraining ends at training loss {_fmt(float(np.mean(tail)))} (mean of the last 10% of steps); "
            f"held-out loss {_fmt(pre['eval']['loss'])}, accuracy {_fmt(pre['eval']['accuracy'])} on the "
            f"pretraining task.",
            "", *_figure(result, "loss_curves.png", "training loss per step")]


def _rank_section(result: dict[str, Any]) -> list[str]:
    cfg, runs, timing = result["config"], result["runs"], result["timing"]
    before = result["pretraining"]["downstream_before"]
    lines = ["## Final loss and accuracy versus rank and target set (Tables 5 and 6 in miniature)", "",
             "Held-out downstream task. *accuracy*: answer tokens right; *swapped*: accuracy on the re-routed "
             "symbols only; *strings*: strings enciphered entirely right; *train loss*: mean of the last 10% of steps.",
             "", "| run | trainable | held-out loss | accuracy | swapped | strings | train loss | time (s) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|",
             f"| pretrained, not fine-tuned | 0 | {_fmt(before['loss'])} | {_fmt(before['accuracy'])} | "
             f"{_fmt(before['changed_accuracy'])} | {_fmt(before['sequence_accuracy'])} | | |"]
    for key in ["full"] + _paper_keys(result):                     # the variants have a section of their own
        row, e = runs[key], runs[key]["eval"]
        lines.append(f"| {row['label']} | {_int(row['trainable']['measured'])} | {_fmt(e['loss'])} | "
                     f"{_fmt(e['accuracy'])} | {_fmt(e['changed_accuracy'])} | {_fmt(e['sequence_accuracy'])} | "
                     f"{_fmt(row['final_train_loss'])} | {timing['runs'][key]:.1f} |")
    budget = [k for k, row in runs.items() if row["group"] == "equal budget"]
    same = [budget[0], f"lora-qv-r{cfg['budget_rank']}", budget[1]]
    lines += ["", f"Equal parameter budget (Table 5): {', '.join(runs[k]['label'] for k in same)} "
                  f"each train {', '.join(_int(runs[k]['trainable']['measured']) for k in same)} parameters.", ""]
    return lines + _figure(result, "rank_sweep.png", "held-out loss and accuracy versus rank")


def _parameters_section(result: dict[str, Any]) -> list[str]:
    runs = result["runs"]
    lines = ["## Trainable parameters and optimizer state, LoRA versus full fine-tuning", "",
             "*measured*: entries of the arrays the run actually trained (`count_trainable` of the trained dict), and "
             "bytes of Adam's two moment arrays as `transformer_ref.train.adam_init` allocates them for that dict (the "
             "call `train` makes). *formula*: Section 5.1's `2 x L_LoRA x d_model x r` for LoRA (L_LoRA adapted "
             "matrices), `L x r x (d_in + d_out)` for a fused weight adapted whole, plus DoRA's magnitudes (one per "
             "output feature of each adapted weight), the model's parameter count for full fine-tuning; Adam keeps "
             "2 numbers per trained parameter.",
             "", "| run | trainable (measured) | trainable (formula) | formula | share of full | Adam bytes (measured) "
                 "| Adam bytes (formula) |",
             "|---|---:|---:|---|---:|---:|---:|"]
    n_full = runs["full"]["trainable"]["measured"]
    for row in runs.values():
        t, a = row["trainable"], row["adam_bytes"]
        lines.append(f"| {row['label']} | {_int(t['measured'])} | {_int(t['formula'])} | {t['formula_text']} | "
                     f"{t['measured'] / n_full:.3%} | {_int(a['measured'])} ({_bytes(a['measured'])}) | "
                     f"{_int(a['formula'])} |")
    return lines + ["", *_figure(result, "parameters.png",
                                 "held-out loss against trainable parameters, Adam state bytes on the top axis")]


def _merge_section(result: dict[str, Any]) -> list[str]:
    runs = result["runs"]
    lines = ["## Merge check: merged versus unmerged logits", "",
             "Logits of the held-out inputs computed with the adapters (`forward(params, x, adapters)`) and with the "
             "adapters merged into the weights (`forward(merge_adapters(params, adapters), x)`), in the training "
             "dtype and again in float64 (the same weights, widened exactly). *bound*: `2 gamma_n M`, "
             "`gamma_n = lora_ref.testing.tolerance(dtype, n)`, n the roundings along the longest input-to-logit path "
             "(`transformer_ref.bounds.logit_rounding_chain`: every LayerNorm, projection, attention, GELU and residual "
             "add counted), M a bound on every logit's terms (`transformer_ref.bounds.logit_magnitude`). It is a "
             "first-order bound: each side is within `gamma_n M` of the exact logits if rounding errors are not "
             "amplified along the path (LayerNorm and softmax are well conditioned here). A DoRA projection counts 6 "
             "roundings more (the norm of each row of `W + s B A` and the factor `m / norm`, "
             "`lora_ref.dora.dora_rounding_counts`); QLoRA's adapters are merged into the dequantised 4-bit weights, "
             "which are what its forward computes with (merging into the 4-bit base requantises, a lossy step measured "
             "in [quant.md](quant.md)). *adapter effect*: max |logits with adapters - logits without|, to show the "
             "check is not vacuous.",
             "", "| run | n | M | dtype | max abs error | bound | error / bound | adapter effect |",
             "|---|---:|---:|---|---:|---:|---:|---:|"]
    for key in _lora_keys(result):
        m = runs[key]["merge"]
        for d in (k for k in m if isinstance(m[k], dict)):
            lines.append(f"| {runs[key]['label']} | {_int(m['chain_length'])} | {_fmt(m['magnitude'])} | {d} | "
                         f"{m[d]['max_abs_error']:.3e} | {m[d]['bound']:.3e} | "
                         f"{m[d]['max_abs_error'] / m[d]['bound']:.2g} | {_fmt(m[d]['adapter_effect'])} |")
    return lines + [""]


def _spectra_section(result: dict[str, Any]) -> list[str]:
    runs = result["runs"]
    lines = [f"## Singular values of the learned updates (layer {result['analysis_layer']})", "",
             "For each (Wq, Wv) run, the update `dW = s B A` of the q and v blocks (`lora_ref.analysis.spectrum`, "
             "never forming dW); for full fine-tuning, the dense difference `W_finetuned - W_pretrained` of the same "
             "rows. *energy top k*: share of `|dW|_F^2` in the top k singular values; *effective rank*: Roy and "
             "Vetterli's exp(entropy); *numerical rank*: singular values above `max(d_out, d_in) eps sigma_1`.",
             "", "| run | matrix | \\|dW\\|_F | sigma_1 | numerical rank | effective rank | stable rank | "
                 "energy top 1 | top 2 | top 4 |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key, rows in result["spectra"].items():
        for kind, s in rows.items():
            lines.append(f"| {runs[key]['label']} | W{kind} | {_fmt(s['norm'])} | {_fmt(s['singular_values'][0])} | "
                         f"{s['numerical_rank']} | {_fmt(s['effective_rank'], 3)} | {_fmt(s['stable_rank'], 3)} | "
                         f"{_fmt(s['energy_top1'], 3)} | {_fmt(s['energy_top2'], 3)} | {_fmt(s['energy_top4'], 3)} |")
    return lines + ["", *_figure(result, "spectra.png", "singular values of the learned updates")]


def _phi_section(result: dict[str, Any]) -> list[str]:
    r1, r2 = result["config"]["phi_ranks"]
    q = min(r1, r2)
    lines = [f"## Subspace similarity phi(A_r={r1}, A_r={r2}) (Figure 3 in miniature)", "",
             f"Eq. 4: `phi(A1, A2, i, j) = |U1_i^T U2_j|_F^2 / min(i, j)`, U the top right singular vectors of A "
             f"(`lora_ref.analysis.similarity_grid`), between the A matrices of the (Wq, Wv) runs at r={r1} and "
             f"r={r2}. 1 means the smaller subspace lies inside the larger; random subspaces give "
             f"`max(i, j) / d_in` on average (d_in = {result['model']['n_embd']}) and at most the *95%* value in 95% "
             f"of draws (`transformer_ref.demo.report.phi_chance`). *trained*: the A matrices after "
             f"fine-tuning; *init*: the same pair before it (each run draws its own A), so the difference is "
             f"what training did.",
             "", f"| matrix | layer | phi(1,1) trained | init | random | phi({q},{q}) trained | init | random | "
                 f"phi({r1},{r2}) trained | init | random |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    d = result["model"]["n_embd"]
    q95 = {suffix: phi_chance(i, j, d)[1] for suffix, i, j in _phi_entries(result)}
    for kind, per_layer in result["phi"].items():
        for p in per_layer:
            lines.append(f"| W{kind} | {p['layer']} | " + " | ".join(
                f"{_fmt(p['phi_' + ij], 3)} | {_fmt(p['init_' + ij], 3)} | {_fmt(p['random_' + ij], 3)} "
                f"(95%: {_fmt(q95[ij], 3)})" for ij, _, _ in _phi_entries(result)) + " |")
    caveat = phi_chance_caveat(result)
    return lines + ["", *([caveat, ""] if caveat else []), *_figure(result, "phi.png", "subspace similarity heatmaps")]


def _amplification_section(result: dict[str, Any]) -> list[str]:
    lines = [f"## Amplification factor (Table 7 in miniature, layer {result['analysis_layer']})", "",
             f"`|U^T W V|_F` for the frozen pretrained W ({_ARCH[_family(result)][2]}) projected onto k-dimensional "
             "subspaces (`lora_ref.analysis.amplification_report`): the top-k singular directions of dW, of W "
             "itself, and uniformly random ones (measured: root mean square over the draws; expected: the exact "
             "`(k / sqrt(d_out d_in)) |W|_F`). *factor*: `|dW|_F / |U^T W V|_F` with dW's directions: how much "
             "the update amplifies directions that W already has but does not emphasise.",
             "", "| r | matrix | k | \\|W\\|_F | \\|dW\\|_F | dW's directions | W's top directions | "
                 "random (measured) | random (expected) | factor |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r, rows in result["amplification"].items():
        for kind, a in rows.items():
            lines.append(f"| {r} | W{kind} | {a['k']} | {_fmt(a['weight_norm'])} | {_fmt(a['delta_norm'])} | "
                         f"{_fmt(a['proj_delta'])} | {_fmt(a['proj_weight'])} | {_fmt(a['proj_random_rms'])} | "
                         f"{_fmt(a['proj_random_expected'])} | {_fmt(a['factor'], 3)} |")
    caveat = amplification_regime_caveat(result)
    return lines + ["", *([caveat, ""] if caveat else [])]


def _reproduce_section(result: dict[str, Any]) -> list[str]:
    return ["## Reproduce", "", "```text", _command_line(result["config"]), "```", ""]


def _command_line(cfg: dict[str, Any]) -> str:
    """The command that reproduces a run of this configuration."""
    config = DemoConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()})
    model = "" if config.family == DEFAULT.family else f" --model {config.family}"
    for name, preset in PRESETS.items():
        if replace(config, seed=preset.seed, family=preset.family) == preset:
            return f"lora-ref demo{'' if name == 'default' else ' --' + name}{model} --seed {config.seed}"
    changed = {f.name: getattr(config, f.name) for f in fields(DemoConfig)
               if getattr(config, f.name) != getattr(DEFAULT, f.name)}
    args = ", ".join(f"{k}={v!r}" for k, v in changed.items())
    return f'python -c "from transformer_ref.demo import DemoConfig, run_demo; run_demo(DemoConfig({args}))"'


# ============================================================================================
# The terminal summary
# ============================================================================================


def summary_text(result: dict[str, Any], out_dir: str | os.PathLike[str] | None = None,
                 wall_s: float | None = None) -> str:
    """One screen: the rank table, the phi and amplification numbers, the merge check, wall time."""
    cfg, model = result["config"], result["model"]
    lines = [f"lora-ref demo: {_ARCH[_family(result)][0]} n_embd={model['n_embd']} n_layer={model['n_layer']} "
             f"n_head={model['n_head']} "
             f"({_int(model['parameters'])} params, {model['dtype']}), seed {cfg['seed']}, "
             f"{cfg['pretrain_steps']} pretraining + {cfg['finetune_steps']} fine-tuning steps per run"]
    lines += _summary_runs(result) + _summary_analysis(result) + variant_summary(result)
    ratios = _merge_ratios(result)
    for d in dict.fromkeys(x[2] for x in ratios):
        err = max(x[0] for x in ratios if x[2] == d)
        bound = min(x[1] for x in ratios if x[2] == d)
        lines.append(f"merge check ({d}): max |merged - unmerged| logits {err:.2e}, smallest bound {bound:.2e} "
                     f"over {sum(1 for x in ratios if x[2] == d)} adapter runs")
    wall = result["timing"]["total_s"] if wall_s is None else wall_s
    tail = f"wall time {wall:.1f} s"
    if out_dir is not None:
        tail += f"; report: {Path(out_dir) / 'report.md'}"
    if result.get("figures_skipped"):
        tail += f" (figures skipped: {result['figures_skipped']}; pip install 'lora-ref[plots]')"
    lines.append(tail)
    return "\n".join(lines)


def _summary_runs(result: dict[str, Any]) -> list[str]:
    """The rank table: trainable parameters, held-out loss and accuracies of every run."""
    before = result["pretraining"]["downstream_before"]
    lines = [f"{'run':<26}{'trainable':>10}{'loss':>10}{'acc':>8}{'swapped':>9}{'strings':>9}",
             f"{'pretrained (no tuning)':<26}{0:>10}{_fmt(before['loss']):>10}{before['accuracy']:>8.4f}"
             f"{before['changed_accuracy']:>9.4f}{before['sequence_accuracy']:>9.4f}"]
    for row in result["runs"].values():
        e = row["eval"]
        lines.append(f"{row['label']:<26}{row['trainable']['measured']:>10,}{_fmt(e['loss']):>10}{e['accuracy']:>8.4f}"
                     f"{e['changed_accuracy']:>9.4f}{e['sequence_accuracy']:>9.4f}")
    return lines


def _summary_analysis(result: dict[str, Any]) -> list[str]:
    """phi (trained / init / random) and the amplification factors, one line each."""
    layer = result["analysis_layer"]
    r1, r2 = result["config"]["phi_ranks"]
    p = min(r1, r2)
    lines = []
    for kind in ("q", "v"):
        ph = result["phi"][kind][layer]
        lines.append(f"phi(A_r={r1}, A_r={r2}) W{kind} layer {layer} [trained / init / random]: "
                     f"phi(1,1) {ph['phi_1_1']:.3f} / {ph['init_1_1']:.3f} / {ph['random_1_1']:.3f}, "
                     f"phi({p},{p}) {ph['phi_p_p']:.3f} / {ph['init_p_p']:.3f} / {ph['random_p_p']:.3f}, "
                     f"phi({r1},{r2}) {ph['phi_r1_r2']:.3f} / {ph['init_r1_r2']:.3f} / {ph['random_r1_r2']:.3f}")
    for r, rows in result["amplification"].items():
        for kind, a in rows.items():
            lines.append(f"amplification r={r} W{kind}: |dW|={_fmt(a['delta_norm'], 3)} |U^T W V|: dW dirs "
                         f"{_fmt(a['proj_delta'], 3)}, W top {_fmt(a['proj_weight'], 3)}, random "
                         f"{_fmt(a['proj_random_rms'], 3)} (expected {_fmt(a['proj_random_expected'], 3)}); "
                         f"factor {_fmt(a['factor'], 3)}")
    return lines
