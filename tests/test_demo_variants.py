"""Issues 13, 15 and 16, their demo part: DoRA and QLoRA rows next to LoRA at the same rank, the
4-bit base's error on the task, and two adapters on one base -- one mixed batch, then combined.

The demo runs on the tiny configuration of tests/test_demo.py (both families): these tests check
that the numbers are consistent with their definitions, that every check passes its derived bound
and is not vacuous, and that the report shows what the result holds -- not the training's quality.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from lora_ref.testing import tolerance
from transformer_ref import forward, init_params, lora_config_for
from transformer_ref.bounds import logit_rounding_chain
from transformer_ref.data import evaluate, pretraining_task
from transformer_ref.demo import DemoConfig, run_demo, summary_text
from transformer_ref.demo.quantised import quantisation_error
from transformer_ref.demo.runs import dequantized, lora_config, merge_check, runs
from transformer_ref.demo.two_tasks import MIXED_ROWS, sample_losses, two_tasks

TINY = DemoConfig(n_embd=32, n_layer=1, n_head=2, n_symbols=8, length=4, n_swaps=1, pretrain_steps=40,
                  finetune_steps=15, batch_size=8, ranks=(1, 2, 4, 8, 16), budget_rank=4, phi_ranks=(8, 16),
                  amplification_ranks=(4, 16), eval_examples=64, n_random=8)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def tiny(request, tmp_path_factory):
    config = replace(TINY, family=request.param)
    out = tmp_path_factory.mktemp(f"variants-{request.param}")
    return config, run_demo(config, out, progress=False), (out / "report.md").read_text()


def table(report: str, header_start: str) -> dict[str, list[str]]:
    """The rows of the Markdown table whose header starts with ``header_start``, by first cell."""
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def g4(x: float) -> str:
    return f"{x:.4g}"


# ----------------------------------------------------------------------------------------------
# The runs: which, with what configuration
# ----------------------------------------------------------------------------------------------


def test_each_variant_is_next_to_a_lora_run_of_the_same_rank_and_weights():
    for family in ("gpt2", "llama"):
        config = replace(TINY, family=family)
        by_key = {run.key: run for run in runs(config)}
        variants = [run for run in by_key.values() if run.group == "variant"]
        assert {run.method for run in variants} >= {"dora", "qlora"}
        model = pretraining_task(8, 4).gpt_config(n_embd=32, n_layer=1, n_head=2) if family == "gpt2" else \
            pretraining_task(8, 4).llama_config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                intermediate_size=96)
        for run in variants:
            if run.partner is None:
                continue
            partner = by_key[run.partner]
            assert list(by_key).index(partner.key) < list(by_key).index(run.key)       # trained first
            assert (partner.method, partner.r, partner.matrices, partner.whole) == ("lora", run.r, run.matrices, run.whole)
            assert run.r == config.variant_rank
            lc, plc = lora_config(run, model, 8.0), lora_config(partner, model, 8.0)
            assert lc.use_dora == (run.method == "dora") and not plc.use_dora
            assert replace(lc, use_dora=False) == plc                                  # the variant alone differs
    # GPT-2's DoRA adapts the whole fused c_attn (no enable_lora), and so does its LoRA partner
    gpt2 = {run.key: run for run in runs(TINY)}
    assert gpt2["dora-cattn-r4"].whole and gpt2["dora-cattn-r4"].partner == "lora-cattn-r4"
    assert gpt2["qlora-qv-r4"].partner == "lora-qv-r4"


def test_variant_rows_count_their_parameters_and_pass_the_merge_check(tiny):
    config, result, _ = tiny
    runs_ = result["runs"]
    for key, row in runs_.items():
        if row["group"] != "variant":
            continue
        partner = runs_.get(row["partner"]) if row["partner"] else None
        if partner is not None:
            extra = row["trainable"]["measured"] - partner["trainable"]["measured"]
            # DoRA adds one magnitude per output feature of each adapted weight; QLoRA trains what LoRA does
            d_out = 3 * config.n_embd if row["whole"] else config.n_embd
            n_weights = config.n_layer * (1 if row["whole"] else len(row["matrices"]))
            assert extra == (n_weights * d_out if row["method"] == "dora" else 0), key
        m = row["merge"]
        for dtype in ("float32", "float64"):
            assert m[dtype]["max_abs_error"] <= m[dtype]["bound"] < m[dtype]["adapter_effect"], (key, dtype)


def test_the_report_shows_the_variants_next_to_their_lora_runs(tiny):
    _, result, report = tiny
    rows = table(report, "| run | compared with | base |")
    runs_ = result["runs"]
    pairs = [(row["partner"], key) for key, row in runs_.items() if row["partner"]]
    assert list(rows) == list(dict.fromkeys(["full fine-tuning"] + [runs_[k]["label"] for p in pairs for k in p]))
    for label, cells in rows.items():
        row = next(r for r in runs_.values() if r["label"] == label)
        e = row["eval"]
        assert cells[0] == (runs_[row["partner"]]["label"] if row["partner"] else "")
        assert cells[1] == ("NF4, 4-bit" if row["method"] == "qlora" else "float32")
        assert cells[3:8] == [g4(e["loss"]), g4(e["accuracy"]), g4(e["changed_accuracy"]),
                              g4(e["sequence_accuracy"]), g4(row["final_train_loss"])]
    assert "## DoRA and QLoRA next to LoRA at the same rank" in report


# ----------------------------------------------------------------------------------------------
# QLoRA's base
# ----------------------------------------------------------------------------------------------


def test_the_4bit_base_is_measured_against_the_float_base(tiny):
    config, result, report = tiny
    q = result["qlora"]
    C, L, F = config.n_embd, config.n_layer, (4 * config.n_embd if config.family == "gpt2" else config.llama_mlp_width)
    # every projection is quantised: GPT-2 c_attn, c_proj, c_fc, mlp.c_proj; LLaMA q, k, v, o, gate, up, down
    shapes = ([(3 * C, C), (C, C), (F, C), (C, F)] if config.family == "gpt2"
              else [(C, C)] * 4 + [(F, C), (F, C), (C, F)]) * L
    assert q["weights"] == len(shapes) and q["parameters"] == sum(a * b for a, b in shapes)
    assert q["recipe"] == {"quant_type": "nf4", "blocksize": 64, "double_quant": True}
    # bitsandbytes' storage, by hand: two codes per byte, one 8-bit absmax per block of 64, its float32
    # maps (16 levels, 256 dynamic codes), one float32 absmax per 256 absmaxes and the float32 offset
    def stored(n):
        blocks = math.ceil(n / 64)
        return math.ceil(n / 2) + blocks + 16 * 4 + 4 * math.ceil(blocks / 256) + 256 * 4 + 4
    assert q["bytes"]["4bit"] == sum(stored(a * b) for a, b in shapes)
    assert q["bytes"]["float"] == 4 * q["parameters"]
    assert q["bytes"]["bits_per_weight"] == 8.0 * q["bytes"]["4bit"] / q["parameters"]
    w = q["weight_error"]
    assert 0.0 < w["min"] <= w["all"] <= w["max"] < 1.0
    assert q["logits"]["max_abs_change"] > 0.0                      # the 4-bit base is another model
    for task in ("pretraining", "downstream"):
        assert set(q[task]) == {"loss", "accuracy", "changed_accuracy", "sequence_accuracy"}
    rows = table(report, "| projection weights | bytes |")
    assert list(rows) == ["float32", "NF4, blocks of 64, double quantisation"]
    assert rows["NF4, blocks of 64, double quantisation"][2:] == [
        g4(q["pretraining"]["loss"]), g4(q["pretraining"]["accuracy"]), g4(q["downstream"]["loss"]),
        g4(q["downstream"]["accuracy"]), g4(q["downstream"]["changed_accuracy"])]
    before = result["pretraining"]["downstream_before"]
    assert rows["float32"][4] == g4(before["loss"])


# ----------------------------------------------------------------------------------------------
# Two adapters: the mixed batch
# ----------------------------------------------------------------------------------------------


def test_sample_losses_average_to_evaluates_loss():
    """Every held-out string has the same number of scored positions, so the mean of the per-row
    losses is data.evaluate's loss: the same float64 log-probabilities, summed in another order. Both
    sum the 16 x 8 nonnegative terms (-log p, or 0 where not scored) and divide at most twice: each is
    within gamma_130 of the exact mean, relative, so they differ by at most 2 gamma_130."""
    task = pretraining_task(8, 4)
    config = task.gpt_config(n_embd=16, n_layer=1, n_head=2)
    params = init_params(config, 0, "float64")
    x, t = task.heldout(16)
    per_row = sample_losses(forward(params, x, config), t)
    assert per_row.shape == (16,)
    expected = evaluate(params, config, None, None, task, 16)["loss"]
    assert float(np.mean(per_row)) == pytest.approx(expected, rel=2 * tolerance("float64", 16 * 8 + 2), abs=0.0)
    with pytest.raises(ValueError, match="logits must be"):
        sample_losses(np.zeros((2, 3)), t)


def test_the_mixed_batch_gives_each_row_its_own_adapters_loss(tiny):
    config, result, report = tiny
    tt = result["two_tasks"]
    mb = tt["mixed_batch"]
    n = min(config.eval_examples, MIXED_ROWS)
    assert mb["rows"] == 3 * n and [g["samples"] for g in mb["groups"].values()] == [n, n, n]
    assert list(mb["groups"]) == ["a", "b", "__base__"]
    # the bound, from its derivation: 4 gamma_n(float32) M + 2 gamma_k(float64) (2M + log V)
    V, T = config.n_symbols + 1, 2 * config.length
    assert mb["chain_length"] > 0 and mb["magnitude"] > 0
    bound = (4 * tolerance("float32", mb["chain_length"]) * mb["magnitude"]
             + 2 * tolerance("float64", V + T + 4) * (2 * mb["magnitude"] + math.log(V)))
    assert mb["bound"] == bound
    for g in mb["groups"].values():
        assert g["max_abs_error"] <= mb["bound"]
        assert g["effect"] > mb["bound"]                             # a wrong adapter would fail the check
    assert mb["max_abs_error"] == max(g["max_abs_error"] for g in mb["groups"].values())
    rows = table(report, "| rows | task | adapter |")
    assert list(rows) == ["a", "b", "__base__"]
    for name, cells in rows.items():
        g = mb["groups"][name]
        assert cells[3:] == [f"{g['max_abs_error']:.3e}", f"{mb['bound']:.3e}", g4(g["loss_alone"]),
                             g4(g["loss_other"]), g4(g["effect"])]
    assert "Every row's loss equals its own adapter's, within the bound." in report


def test_the_mixed_batch_bound_uses_the_models_chain_and_magnitude(tiny):
    """chain_length and magnitude are those of transformer_ref.bounds for the demo's model at variant_rank."""
    config, result, _ = tiny
    mb = result["two_tasks"]["mixed_batch"]
    task = pretraining_task(config.n_symbols, config.length)
    model = (task.gpt_config(n_embd=config.n_embd, n_layer=config.n_layer, n_head=config.n_head)
             if config.family == "gpt2" else
             task.llama_config(hidden_size=config.n_embd, num_hidden_layers=config.n_layer,
                               num_attention_heads=config.n_head, intermediate_size=config.llama_mlp_width,
                               rms_norm_eps=1e-5))
    assert mb["chain_length"] == logit_rounding_chain(model, config.variant_rank)
    # logit_magnitude of the pretrained model, as the merge checks use it
    assert mb["magnitude"] == result["runs"][f"lora-qv-r{config.variant_rank}"]["merge"]["magnitude"]


# ----------------------------------------------------------------------------------------------
# Two adapters: the combinations
# ----------------------------------------------------------------------------------------------


def test_the_combinations_ranks_errors_and_losses(tiny):
    config, result, report = tiny
    tt = result["two_tasks"]
    comb = tt["combinations"]
    r = config.variant_rank
    assert tt["tasks"]["A"]["changed"] == result["task"]["changed"]
    assert not set(tt["tasks"]["A"]["changed"]) & set(tt["tasks"]["B"]["changed"])
    methods = comb["methods"]
    assert list(methods) == ["exact", "cat", "svd", "linear"]
    assert [methods[m]["rank"] for m in methods] == [2 * r, 2 * r, r, r]
    assert all(m["scale"] == 1.0 for m in methods.values())
    for name in ("exact", "cat"):                                    # (C1) to rounding, in float64
        assert methods[name]["error"] <= methods[name]["bound"] < tolerance("float32", 2)
    # svd keeps the best rank-r part of a rank-2r sum: an error, but less than all of it;
    # linear's cross terms are an error of the size of the sum itself here
    assert 0.0 < methods["svd"]["error"] < 1.0 and methods["linear"]["error"] > methods["exact"]["bound"]
    for m in methods.values():
        assert m["bound"] is None or m["bound"] > 0
        for task in "AB":
            assert set(m["eval"][task]) == {"loss", "accuracy", "changed_accuracy"}
    # the baselines on task A are the demo's own evaluations: the pretrained model, adapter a's run
    keep = ("loss", "accuracy", "changed_accuracy")
    assert comb["baselines"]["a"]["A"] == {k: result["runs"][f"lora-qv-r{r}"]["eval"][k] for k in keep}
    assert comb["baselines"]["pretrained"]["A"] == {k: result["pretraining"]["downstream_before"][k] for k in keep}
    rows = table(report, "| model | rank | error | rounding bound |")
    assert list(rows) == ["no adapter", "adapter a alone", "adapter b alone", "`exact`", "`cat`", "`svd`", "`linear`"]
    for name, m in methods.items():
        cells = rows[f"`{name}`"]
        assert cells[0] == str(m["rank"]) and cells[1] == f"{m['error']:.3g}"
        assert cells[3:] == [g4(m["eval"]["A"]["loss"]), g4(m["eval"]["B"]["loss"]),
                             g4(m["eval"]["A"]["changed_accuracy"]), g4(m["eval"]["B"]["changed_accuracy"])]


def test_the_summary_states_the_new_checks_on_one_screen(tiny):
    _, result, _ = tiny
    text = summary_text(result, wall_s=1.0)
    mb = result["two_tasks"]["mixed_batch"]
    assert f"mixed batch: max |loss in the batch - alone| {mb['max_abs_error']:.2e}, bound {mb['bound']:.2e}" in text
    assert "combined a + b, loss on A / B: exact " in text and "4-bit base (NF4): weight error" in text
    for row in result["runs"].values():
        assert row["label"] in text
    assert len(text.splitlines()) <= 30


def test_lora_config_for_the_combined_adapters_keeps_the_blocks():
    """The combined GPT-2 adapter keeps enable_lora's (q, v) blocks at the new rank, scale 1."""
    lc = lora_config_for(("q", "v"), 8, alpha=8.0, family="gpt2")
    assert lc.enable_for("transformer.h.0.attn.c_attn") == (True, False, True) and lc.scale == 1.0


@pytest.mark.parametrize("call, error, message", [
    (lambda: runs({"n_embd": 32}), TypeError, "config must be a transformer_ref.demo.DemoConfig, got dict"),
    (lambda: lora_config("lora-qv-r4", None, 8.0), TypeError, "run must be a transformer_ref.demo.runs.Run"),
    (lambda: dequantized([]), TypeError, "params must be a dict of arrays"),
    (lambda: merge_check({}, {}, None, None, None, 0), ValueError, "r must be a positive int, got 0"),
    (lambda: two_tasks(None, {}, {}, {}), TypeError, "setup must be a transformer_ref.demo.common.Setup"),
    (lambda: quantisation_error(None, {}, {}), TypeError, "setup must be a transformer_ref.demo.common.Setup"),
])
def test_bad_arguments_are_named(call, error, message):
    with pytest.raises(error, match=message):
        call()
