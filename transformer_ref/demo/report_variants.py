"""The report's sections on the variants: DoRA and QLoRA next to LoRA at the same rank (issues 13
and 16), QLoRA's 4-bit base on the task, and two adapters on one base -- one mixed batch, then
combined (issue 15).

As in :mod:`transformer_ref.demo.report`, every number is read from the result of
:func:`transformer_ref.demo.compute`, each statement is computed from those numbers, and each
caveat (``*_caveat``) is a function of the result that returns None where it does not apply.
"""

from __future__ import annotations

from typing import Any

from lora_ref.adapters import BASE

from .formats import _bytes, _fmt, _int, _variant_pairs

__all__ = ["combination_caveat", "two_tasks_section", "variant_caveat", "variant_findings", "variant_summary",
           "variants_section"]



def _e(x: float) -> str:
    """An error or a bound: 3 significant digits, in exponent form (as the merge check's)."""
    return f"{x:.3e}"


def _loss_diff(v: dict[str, Any], p: dict[str, Any]) -> str:
    return f"{_fmt(v['eval']['loss'])} against {_fmt(p['eval']['loss'])}"


# ============================================================================================
# Caveats
# ============================================================================================


def variant_caveat(result: dict[str, Any]) -> str | None:
    """Variants that end below the LoRA run they are compared with, on held-out loss: what else
    differs between the two (DoRA trains its magnitudes too; QLoRA's base is another model, whose
    own loss is given), and that one seed does not separate a difference from run-to-run variation."""
    runs, parts = result["runs"], []
    for partner, key in _variant_pairs(result):
        v, p = runs[key], runs[partner]
        if v["eval"]["loss"] >= p["eval"]["loss"]:
            continue
        text = f"{v['label']} ends below {p['label']} ({_loss_diff(v, p)})"
        if v["method"] == "dora":
            extra = v["trainable"]["measured"] - p["trainable"]["measured"]
            text += f" while training {_int(extra)} more parameters (DoRA's magnitudes m)"
        elif v["method"] == "qlora" and "qlora" in result:
            q, before = result["qlora"]["downstream"], result["pretraining"]["downstream_before"]
            text += (f" on a base that alone scores held-out loss {_fmt(q['loss'])} against the float base's "
                     f"{_fmt(before['loss'])}")
        parts.append(text)
    if not parts:
        return None
    return ("Below the LoRA run it is compared with: " + "; ".join(parts) + ". The two runs of a pair start from "
            "the same A and B and see the same batches, so they differ in the variant alone; but this is one seed, "
            "and a different computation rounds differently from the first step on, so a difference of this size is "
            "not shown to be more than run-to-run variation.")


def combination_caveat(result: dict[str, Any]) -> str | None:
    """How the combined models' losses must be read. (1) The exact sum doing worse on a task than
    that task's adapter alone: each task's strings hold the other task's swapped symbols, which the
    sum re-routes too. (2) A method with a lower loss than the exact sum on one task and fewer of the
    other task's swapped symbols right: its lower loss is a weaker edit of the other task."""
    comb = result["two_tasks"]["combinations"]
    methods, base = comb["methods"], comb["baselines"]
    exact = methods["exact"]["eval"]
    parts = []
    hits = [f"on task {task} {_fmt(exact[task]['loss'])} against {_fmt(base[own][task]['loss'])} for adapter {own} alone"
            for task, own in (("A", "a"), ("B", "b")) if exact[task]["loss"] > base[own][task]["loss"]]
    if hits:
        parts.append("The exact sum does worse than each adapter alone on its own task (" + "; ".join(hits) + "). It "
                     "applies both tasks' swaps to every string, and each task's strings also hold the symbols the "
                     "other task swaps, which the sum re-routes the other task's way, wrongly for this one: a "
                     "combination suits a model that must do both edits at once; tasks that conflict are served "
                     "apart, each row with its own adapter, as the mixed batch above does exactly.")
    weaker = [f"`{m}` on task {task} ({_fmt(v['eval'][task]['loss'])} against {_fmt(exact[task]['loss'])}, with task "
              f"{other}'s swapped symbols right {_fmt(v['eval'][other]['changed_accuracy'])} of the time against "
              f"{_fmt(exact[other]['changed_accuracy'])})"
              for m, v in methods.items() if m not in ("exact", "cat")
              for task, other in (("A", "B"), ("B", "A"))
              if v["eval"][task]["loss"] < exact[task]["loss"]
              and v["eval"][other]["changed_accuracy"] < exact[other]["changed_accuracy"]]
    if weaker:
        parts.append("A loss below the exact sum's is not a better combination here: " + "; ".join(weaker) + ". "
                     "Each such model applies the other task's edit less, which that task's strings do not want; "
                     "read the loss with the swapped columns.")
    return " ".join(parts) or None


# ============================================================================================
# DoRA and QLoRA next to LoRA
# ============================================================================================


def variants_section(result: dict[str, Any]) -> list[str]:
    runs, cfg, timing = result["runs"], result["config"], result["timing"]
    pairs = _variant_pairs(result)
    if not pairs:
        return []
    r = cfg["variant_rank"]
    dora = [k for _, k in pairs if runs[k]["method"] == "dora"]
    whole = any(runs[k]["whole"] for k in dora)
    lines = ["## DoRA and QLoRA next to LoRA at the same rank", "",
             f"Each variant at r = {r} beside the LoRA run it is compared with: the same rank, weights, initial A "
             "and B, batches and learning rate, so that the two differ in the variant alone. **DoRA** (Liu et al. "
             "2024, Eq. 5: `W' = m (W + s B A) / ||W + s B A||_row`, trained A, B and the magnitudes m, initialised "
             "to the rows' norms) "
             + ("adapts GPT-2's fused `c_attn` as one weight: DoRA normalises whole rows of a weight and has no "
                "per-block form (PEFT applies it to the whole fused weight only), so its LoRA partner adapts the whole "
                "`c_attn` too (one A for q, k and v)" if whole else "adapts the same matrices as its LoRA partner")
             + ". **QLoRA** (Dettmers et al. 2023) trains LoRA on a base whose projection weights are all held in "
             "4-bit NormalFloat (`train(mode=\"qlora\")`: NF4, blocks of 64, double quantisation, dequantised in "
             f"{result['model']['dtype']} at every forward); its held-out numbers are those of the model it trained, "
             "adapters on the 4-bit base.", "",
             "| run | compared with | base | trainable | held-out loss | accuracy | swapped | strings | train loss | "
             "time (s) |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    shown = ["full"] + [k for pair in pairs for k in pair]
    for key in dict.fromkeys(shown):
        row, e = runs[key], runs[key]["eval"]
        base = "NF4, 4-bit" if row["method"] == "qlora" else result["model"]["dtype"]
        partner = runs[row["partner"]]["label"] if row.get("partner") else ""
        lines.append(f"| {row['label']} | {partner} | {base} | {_int(row['trainable']['measured'])} | {_fmt(e['loss'])} "
                     f"| {_fmt(e['accuracy'])} | {_fmt(e['changed_accuracy'])} | {_fmt(e['sequence_accuracy'])} | "
                     f"{_fmt(row['final_train_loss'])} | {timing['runs'][key]:.1f} |")
    caveat = variant_caveat(result)
    lines += ["", *([caveat, ""] if caveat else [])]
    return lines + _quantised_base(result)


def _quantised_base(result: dict[str, Any]) -> list[str]:
    """QLoRA's 4-bit base before fine-tuning, against the float base."""
    if "qlora" not in result:
        return []
    q, pre = result["qlora"], result["pretraining"]
    dtype, b = result["model"]["dtype"], q["bytes"]
    recipe = q["recipe"]
    name = (f"{recipe['quant_type'].upper()}, blocks of {recipe['blocksize']}"
            + (", double quantisation" if recipe["double_quant"] else ""))
    rows = ((dtype, b["float"], 8.0 * b["float"] / q["parameters"], pre["eval"], pre["downstream_before"]),
            (name, b["4bit"], b["bits_per_weight"], q["pretraining"], q["downstream"]))
    lines = ["### QLoRA's 4-bit base before fine-tuning", "",
             f"The pretrained model with its {q['weights']} projection weights ({_int(q['parameters'])} numbers) "
             "quantised as QLoRA's run holds them, before any adapter, against the same model in "
             f"{dtype}. *bytes*: the projection weights as stored (bitsandbytes' codes, block constants and maps, "
             "`QuantState.storage_bytes`); the rest of the model (embeddings, norms, biases) stays in "
             f"{dtype}.", "",
             "| projection weights | bytes | bits per weight | pretraining task: loss | accuracy | downstream task: "
             "loss | accuracy | swapped |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, nbytes, bits, p, d in rows:
        lines.append(f"| {label} | {_int(nbytes)} ({_bytes(nbytes)}) | {bits:.3g} | {_fmt(p['loss'])} | "
                     f"{_fmt(p['accuracy'])} | {_fmt(d['loss'])} | {_fmt(d['accuracy'])} | "
                     f"{_fmt(d['changed_accuracy'])} |")
    w, z = q["weight_error"], q["logits"]
    return lines + ["", f"Quantisation error: `||W - Q(W)||_F / ||W||_F` is {_fmt(w['min'], 3)} to {_fmt(w['max'], 3)} "
                        f"over the weights ({_fmt(w['all'], 3)} over all of them together), and the 4-bit base's logits "
                        f"on the downstream task's held-out strings differ from the float base's by at most "
                        f"{_fmt(z['max_abs_change'], 3)} (the largest logit is {_fmt(z['max_abs'], 3)}).", ""]


# ============================================================================================
# Two adapters on one base
# ============================================================================================


def two_tasks_section(result: dict[str, Any]) -> list[str]:
    if "two_tasks" not in result:
        return []
    tt, runs = result["two_tasks"], result["runs"]
    a = runs[tt["adapters"]["a"]["run"]]
    mb, comb = tt["mixed_batch"], tt["combinations"]
    lines = ["## Two adapters on one base: one mixed batch, then combined", "",
             f"Task A is the downstream task (symbols {', '.join(map(str, tt['tasks']['A']['changed']))} swapped in "
             f"pairs); task B is the same cipher with other pairs swapped (symbols "
             f"{', '.join(map(str, tt['tasks']['B']['changed']))}). Adapter a is the {a['label']} run, trained on A; "
             f"adapter b has the same configuration and is trained on B with the same steps, batch size and learning "
             f"rate (final training loss {_fmt(tt['adapters']['b']['final_train_loss'])}).", "",
             "### One mixed batch", "",
             f"One forward of {mb['rows']} interleaved rows with an `AdapterSet` of both adapters and one adapter name "
             "per row (`forward(..., adapter_names=[...])`, PEFT's mixed batch; `__base__` for none), in "
             f"{mb['dtype']}, each row's loss held against the same row's loss when its group runs alone with its own "
             "adapter. *bound*: `4 gamma_n M + 2 gamma_k(float64) (2M + log V)`: each side's logits are within "
             f"`gamma_n M` of the exact ones (n = {_int(mb['chain_length'])} roundings, M = {_fmt(mb['magnitude'])}, as "
             "in the merge check), a row's loss moves by at most twice its logits' largest change, and the float64 "
             "loss adds `gamma_k (2M + log V)` per side (k = V + T + 4). *effect*: how far the row's loss moves with "
             "the other adapter (adapter a for the rows without one): a batch that gave a row the wrong adapter would "
             "miss the bound by that much.", "",
             "| rows | task | adapter | in the batch | max \\|loss in the batch - loss alone\\| | bound | loss alone "
             "(mean) | with the other adapter (mean) | effect (max) |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, g in mb["groups"].items():
        adapter = "none (`__base__`)" if name == BASE else name
        lines.append(f"| {name} | {g['task']} | {adapter} | {g['samples']} | {_e(g['max_abs_error'])} | "
                     f"{_e(mb['bound'])} | {_fmt(g['loss_alone'])} | {_fmt(g['loss_other'])} | {_fmt(g['effect'])} |")
    within = mb["max_abs_error"] <= mb["bound"]
    lines += ["", ("Every row's loss equals its own adapter's, within the bound." if within else
                   "A row's loss differs from its own adapter's by MORE than the bound: a defect."), "",
              "### Combined into one adapter", "",
              f"`lora_ref.combine.combine_adapters` with weights {tuple(tt['weights'])}, per adapted weight (a fused "
              "`c_attn` block by block), in float64 (the models are then evaluated in the training dtype, as every "
              "run is): `exact` is the sum of the deltas `dW* = s B_a A_a + s B_b A_b` "
              "as factors, `cat` PEFT's same construction, `svd` the best approximation of dW* at one adapter's rank, "
              "`linear` PEFT's `(B_a + B_b)(A_a + A_b)`, which adds the cross terms `s (B_a A_b + B_b A_a)` (PEFT issue "
              "#3004; [combination.md](combination.md)). *error*: the largest `||dW - dW*||_F / ||dW*||_F` over the "
              "weights; *rounding bound*: the largest `||2 gamma_n M||_F / ||dW*||_F` that `exact` and `cat` must stay "
              "within (n = 2r + 3 roundings, M = `|s| |B_a| |A_a| + |s| |B_b| |A_b|`). Each model on both tasks' "
              "held-out strings:", "",
              "| model | rank | error | rounding bound | loss on A | loss on B | swapped A | swapped B |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    base = comb["baselines"]
    for key, label in (("pretrained", "no adapter"), ("a", "adapter a alone"), ("b", "adapter b alone")):
        ev, rank = base[key], "" if key == "pretrained" else str(tt["rank"])
        lines.append(f"| {label} | {rank} | | | {_fmt(ev['A']['loss'])} | {_fmt(ev['B']['loss'])} | "
                     f"{_fmt(ev['A']['changed_accuracy'])} | {_fmt(ev['B']['changed_accuracy'])} |")
    for method, m in comb["methods"].items():
        ev = m["eval"]
        bound = "" if m["bound"] is None else _fmt(m["bound"], 3)
        lines.append(f"| `{method}` | {m['rank']} | {_fmt(m['error'], 3)} | {bound} | {_fmt(ev['A']['loss'])} | "
                     f"{_fmt(ev['B']['loss'])} | {_fmt(ev['A']['changed_accuracy'])} | "
                     f"{_fmt(ev['B']['changed_accuracy'])} |")
    exact = [comb["methods"][k] for k in ("exact", "cat") if k in comb["methods"]]
    lines += ["", ("`exact` and `cat` are the sum of the deltas to rounding: each error is within its bound."
                   if all(m["error"] <= m["bound"] for m in exact) else
                   "`exact` or `cat` is NOT within its rounding bound of the sum of the deltas: a defect."), ""]
    caveat = combination_caveat(result)
    return lines + [*([caveat, ""] if caveat else [])]


# ============================================================================================
# Findings and the terminal summary
# ============================================================================================


def variant_findings(result: dict[str, Any]) -> list[str]:
    """The Findings' statements about the variants and the two adapters."""
    runs, lines = result["runs"], []
    for partner, key in _variant_pairs(result):
        v, p = runs[key], runs[partner]
        text = (f"{v['label']} against {p['label']}: held-out loss {_loss_diff(v, p)}, accuracy on the swapped symbols "
                f"{_fmt(v['eval']['changed_accuracy'])} against {_fmt(p['eval']['changed_accuracy'])}")
        if v["method"] == "dora":
            text += (f", training {_int(v['trainable']['measured'])} against {_int(p['trainable']['measured'])} "
                     "parameters")
        elif v["method"] == "qlora" and "qlora" in result:
            q, before = result["qlora"], result["pretraining"]["downstream_before"]
            text += (f"; its 4-bit base alone (weights {_fmt(q['weight_error']['all'], 3)} off in relative Frobenius "
                     f"norm) has downstream held-out loss {_fmt(q['downstream']['loss'])} against {_fmt(before['loss'])} "
                     "for the float base")
        lines.append(text + ".")
    lines += [c for c in (variant_caveat(result),) if c]
    if "two_tasks" in result:
        mb, comb = result["two_tasks"]["mixed_batch"], result["two_tasks"]["combinations"]
        effect = min(g["effect"] for g in mb["groups"].values())
        lines.append(f"Mixed batch: every row's loss {'equals' if mb['max_abs_error'] <= mb['bound'] else 'does NOT equal'}"
                     f" its own adapter's, {_e(mb['max_abs_error'])} apart at most against a bound of {_e(mb['bound'])}; "
                     f"in every group the wrong adapter moves some row's loss by at least {_fmt(effect)}.")
        ex, base = comb["methods"]["exact"]["eval"], comb["baselines"]
        lin = comb["methods"]["linear"]
        lines.append(f"Combined, the exact sum scores held-out loss {_fmt(ex['A']['loss'])} on task A and "
                     f"{_fmt(ex['B']['loss'])} on task B, against {_fmt(base['a']['A']['loss'])} and "
                     f"{_fmt(base['b']['B']['loss'])} for each task's own adapter; `linear`, off by "
                     f"{_fmt(lin['error'], 3)} from the exact sum, scores {_fmt(lin['eval']['A']['loss'])} and "
                     f"{_fmt(lin['eval']['B']['loss'])}.")
        lines += [c for c in (combination_caveat(result),) if c]
    return lines


def variant_summary(result: dict[str, Any]) -> list[str]:
    """Terminal lines: QLoRA's base, the mixed batch, the combinations."""
    lines = []
    if "qlora" in result:
        q, before = result["qlora"], result["pretraining"]["downstream_before"]
        lines.append(f"4-bit base ({q['recipe']['quant_type'].upper()}): weight error {_fmt(q['weight_error']['all'], 3)}, "
                     f"{q['bytes']['bits_per_weight']:.3g} bits per weight; downstream loss {_fmt(q['downstream']['loss'])} "
                     f"against {_fmt(before['loss'])} in {result['model']['dtype']}")
    if "two_tasks" in result:
        mb, comb = result["two_tasks"]["mixed_batch"], result["two_tasks"]["combinations"]
        lines.append(f"mixed batch: max |loss in the batch - alone| {mb['max_abs_error']:.2e}, bound {mb['bound']:.2e}, "
                     f"{mb['rows']} rows")
        lines.append("combined a + b, loss on A / B: " + ", ".join(
            f"{m} {_fmt(v['eval']['A']['loss'])} / {_fmt(v['eval']['B']['loss'])}" for m, v in comb["methods"].items()))
    return lines
