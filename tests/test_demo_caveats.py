"""Issue 11, item 18: report.md states the caveats its numbers imply, computed from the result.

Each caveat is a function of the result dict. Each test crafts results from a committed one
(docs/reproduction/quick.json, so no training runs here) on both sides of the caveat's condition
and checks that the sentence is in the report exactly when the condition holds, in its section.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import scipy.stats

from lora_ref.testing import tolerance
from transformer_ref.demo.report import (PAPER_TABLE_7, _phi_chance_moments, accuracy_saturation_caveat,
                                         amplification_regime_caveat, below_untuned_caveat, phi_chance,
                                         phi_chance_caveat, report_markdown)
from transformer_ref.demo.report_variants import combination_caveat, variant_caveat

ROOT = Path(__file__).resolve().parent.parent
BASE = json.loads((ROOT / "docs" / "reproduction" / "quick.json").read_text())


def crafted(**accuracy_and_loss):
    """A copy of the base result with every run's held-out accuracy and loss set: runs not named
    get accuracy 0.9 and loss 0.5; a named run gets ``(accuracy, loss)``."""
    result = copy.deepcopy(BASE)
    for key, row in result["runs"].items():
        row["eval"]["accuracy"], row["eval"]["loss"] = accuracy_and_loss.get(key.replace("-", "_"), (0.9, 0.5))
    result["pretraining"]["downstream_before"].update(accuracy=0.75, loss=3.0)
    return result


def section(report: str, heading: str) -> str:
    """The text of the report's section whose heading starts with ``heading`` (up to the next one)."""
    start = report.index("\n## " + heading)
    end = report.find("\n## ", start + 1)
    return report[start:end if end >= 0 else None]


# ----------------------------------------------------------------------------------------------
# Accuracy saturates at 1: compare held-out loss
# ----------------------------------------------------------------------------------------------


def test_saturation_is_said_when_two_runs_reach_accuracy_one():
    result = crafted(full=(1.0, 0.001), lora_qv_r4=(1.0, 0.002), lora_qv_r8=(1.0, 0.004))
    sentence = accuracy_saturation_caveat(result)
    assert sentence.startswith(f"Accuracy saturates: 3 of the {len(BASE['runs'])} runs get every held-out answer right")
    # the loss ranks them: lowest full fine-tuning, highest r=8
    assert "lowest for full fine-tuning (0.001) and highest for LoRA Wq,Wv r=8 (0.004)" in sentence
    assert sentence in section(report_markdown(result), "Findings")


@pytest.mark.parametrize("tops", [{}, {"full": (1.0, 0.001)}, {"full": (0.999, 0.001), "lora_qv_r4": (0.998, 0.002)}])
def test_no_saturation_sentence_below_two_runs_at_one(tops):
    result = crafted(**tops)
    assert accuracy_saturation_caveat(result) is None
    assert "Accuracy saturates" not in report_markdown(result)


# ----------------------------------------------------------------------------------------------
# A run below the untuned model
# ----------------------------------------------------------------------------------------------


def test_a_run_below_the_untuned_model_is_named():
    # untuned: accuracy 0.75, loss 3.0 (crafted); one run worse on accuracy, one worse on loss
    result = crafted(lora_q_r8=(0.74, 2.1), lora_qv_r1=(0.9, 3.5))
    sentence = below_untuned_caveat(result)
    assert sentence.startswith("Below the untuned model: ")
    assert "LoRA Wq r=8, held-out accuracy 0.74 against 0.75 before fine-tuning" in sentence
    assert "LoRA Wq,Wv r=1, held-out loss 3.5 against 3 before fine-tuning" in sentence
    assert "these runs worse than not fine-tuning at all" in sentence
    assert sentence in section(report_markdown(result), "Findings")


def test_no_untuned_sentence_when_every_run_is_at_least_as_good():
    result = crafted(lora_q_r8=(0.75, 3.0))                      # equal to the untuned model: not below it
    assert below_untuned_caveat(result) is None
    assert "Below the untuned model" not in report_markdown(result)


# ----------------------------------------------------------------------------------------------
# phi at chance level
# ----------------------------------------------------------------------------------------------


def with_phi(value_1_1: float) -> dict:
    """The base result with every trained phi(1,1) set to ``value_1_1`` and every other trained
    phi entry set far above chance."""
    result = copy.deepcopy(BASE)
    for per_layer in result["phi"].values():
        for p in per_layer:
            p.update(phi_1_1=value_1_1, phi_p_p=0.9, phi_r1_r2=0.95)
    return result


def test_phi_at_chance_is_said_and_above_it_is_not():
    d = BASE["model"]["n_embd"]
    mean, q95 = phi_chance(1, 1, d)
    at_chance = with_phi(mean)                                   # exactly what random directions give on average
    sentence = phi_chance_caveat(at_chance)
    layers = [p["layer"] for p in at_chance["phi"]["q"]]
    assert sentence.startswith("At chance level: phi(1,1) of Wq layer ")
    assert all(f"W{kind} layer {i} ({mean:.3g})" in sentence for kind in ("q", "v") for i in layers)
    assert f"are at most {q95:.3g}, the 95th percentile of phi(1,1) for random subspaces of dimension d_in = {d}" in sentence
    assert "phi(8,8)" not in sentence and "phi(8,64)" not in sentence
    assert sentence in section(report_markdown(at_chance), "Subspace similarity")
    # at the 95th percentile itself: still chance; just above it, or at 0.5: not
    assert phi_chance_caveat(with_phi(q95)) is not None
    for value in (math.nextafter(q95, 1.0), 0.5):
        assert phi_chance_caveat(with_phi(value)) is None
        assert "At chance level" not in report_markdown(with_phi(value))


def test_phi_chance_moments_are_exact():
    d = 128
    # min(i, j) = 1: phi is Beta(max / 2, (d - max) / 2), mean and variance by scipy, the quantile exactly it
    for j in (1, 8, 64):
        law = scipy.stats.beta(j / 2, (d - j) / 2)
        mean, var = _phi_chance_moments(1, j, d)
        assert mean == pytest.approx(law.mean(), rel=2 * tolerance("float64", 8), abs=0)
        assert var == pytest.approx(law.var(), rel=2 * tolerance("float64", 16), abs=0)
        # betaincinv and scipy.stats' ppf are one special function, inverted the same way
        assert phi_chance(1, j, d)[1] == pytest.approx(law.ppf(0.95), rel=2 * tolerance("float64", 16), abs=0)
    # two planes in R^3 (i = j = 2): tr(P1 P2) = 1 + c^2, c the cosine between their normals, c^2 ~ Beta(1/2, 1),
    # so phi = (1 + c^2) / 2 has mean (1 + 1/3) / 2 = 2/3 and variance Var(c^2) / 4 = (4 / 45) / 4 = 1/45
    mean, var = _phi_chance_moments(2, 2, 3)
    assert mean == pytest.approx(2 / 3, rel=2 * tolerance("float64", 4), abs=0)
    assert var == pytest.approx(1 / 45, rel=2 * tolerance("float64", 12), abs=0)
    # a subspace that is all of R^d: phi = 1 always
    assert phi_chance(3, 5, 5) == (1.0, 1.0)


@pytest.mark.parametrize("args, message", [
    ((0, 1, 128), "i must be a positive int"),
    ((1, 1, 1), "need 2 <= d"),
    ((1, 200, 128), "i, j <= d"),
    ((1, 1, 128, 1.0), r"q must be in \(0, 1\)"),
])
def test_phi_chance_names_a_bad_argument(args, message):
    with pytest.raises(ValueError, match=message):
        phi_chance(*args)


# ----------------------------------------------------------------------------------------------
# Amplification: |dW| larger than |W| is another regime than Table 7's
# ----------------------------------------------------------------------------------------------


def with_norms(delta_norm: float, weight_norm: float) -> dict:
    result = copy.deepcopy(BASE)
    for per_kind in result["amplification"].values():
        for a in per_kind.values():
            a.update(delta_norm=delta_norm, weight_norm=weight_norm)
    return result


def test_update_larger_than_the_weight_is_said_in_the_amplification_section():
    result = with_norms(12.5, 4.0)
    sentence = amplification_regime_caveat(result)
    assert sentence.startswith("Here `|dW|_F` exceeds `|W|_F` (Wq at r = 4: 12.5 against 4;")
    t7 = PAPER_TABLE_7
    assert (f"`|dW_q|_F` is {t7['delta_norm'][4]} (r = 4) and {t7['delta_norm'][64]} (r = 64) against "
            f"`|W_q|_F` = {t7['weight_norm']}") in sentence
    assert sentence in section(report_markdown(result), "Amplification factor")


@pytest.mark.parametrize("delta_norm", [4.0, 0.4])               # equal to |W|_F, and a tenth of it
def test_no_regime_sentence_when_the_update_is_not_larger(delta_norm):
    result = with_norms(delta_norm, 4.0)
    assert amplification_regime_caveat(result) is None
    assert "exceeds `|W|_F`" not in report_markdown(result)


# ----------------------------------------------------------------------------------------------
# DoRA and QLoRA below the LoRA run they are compared with
# ----------------------------------------------------------------------------------------------


def with_losses(**losses) -> dict:
    """The base result with the named runs' held-out losses set (every other run's left as it is)."""
    result = copy.deepcopy(BASE)
    for key, loss in losses.items():
        result["runs"][key.replace("_", "-")]["eval"]["loss"] = loss
    return result


def test_a_variant_below_its_lora_run_is_qualified():
    result = with_losses(dora_cattn_r4=0.25, lora_cattn_r4=0.5, qlora_qv_r4=0.125, lora_qv_r4=0.5)
    sentence = variant_caveat(result)
    runs = result["runs"]
    extra = runs["dora-cattn-r4"]["trainable"]["measured"] - runs["lora-cattn-r4"]["trainable"]["measured"]
    q, before = result["qlora"]["downstream"]["loss"], result["pretraining"]["downstream_before"]["loss"]
    assert sentence.startswith("Below the LoRA run it is compared with: DoRA c_attn r=4 ends below LoRA c_attn r=4 "
                               f"(0.25 against 0.5) while training {extra:,} more parameters (DoRA's magnitudes m); "
                               "QLoRA Wq,Wv r=4 ends below LoRA Wq,Wv r=4 (0.125 against 0.5) on a base that alone "
                               f"scores held-out loss {q:.4g} against the float base's {before:.4g}.")
    assert "not shown to be more than run-to-run variation" in sentence
    report = report_markdown(result)
    assert sentence in section(report, "DoRA and QLoRA next to LoRA") and sentence in section(report, "Findings")


def test_no_variant_sentence_when_each_variant_is_at_least_its_lora_runs_loss():
    result = with_losses(dora_cattn_r4=0.5, lora_cattn_r4=0.5, qlora_qv_r4=0.75, lora_qv_r4=0.5)
    assert variant_caveat(result) is None
    assert "Below the LoRA run it is compared with" not in report_markdown(result)


# ----------------------------------------------------------------------------------------------
# Two adapters: the combinations, and a mixed batch beyond its bound
# ----------------------------------------------------------------------------------------------


def with_combination(exact, a_alone, b_alone, linear) -> dict:
    """The base result with the combinations' evaluations set: each argument is
    ``((loss A, swapped A), (loss B, swapped B))``; svd like exact."""
    result = copy.deepcopy(BASE)
    comb = result["two_tasks"]["combinations"]
    def put(ev, values):
        for task, (loss, swapped) in zip("AB", values):
            ev[task].update(loss=loss, changed_accuracy=swapped)
    for name in ("exact", "cat", "svd"):
        put(comb["methods"][name]["eval"], exact)
    put(comb["methods"]["linear"]["eval"], linear)
    put(comb["baselines"]["a"], a_alone)
    put(comb["baselines"]["b"], b_alone)
    return result


def test_the_exact_sum_worse_than_each_adapter_alone_is_explained():
    result = with_combination(exact=((2.0, 1.0), (3.0, 1.0)), a_alone=((0.5, 1.0), (4.0, 0.0)),
                              b_alone=((4.0, 0.0), (0.25, 1.0)), linear=((2.5, 1.0), (3.5, 1.0)))
    sentence = combination_caveat(result)
    assert sentence.startswith("The exact sum does worse than each adapter alone on its own task (on task A 2 against "
                               "0.5 for adapter a alone; on task B 3 against 0.25 for adapter b alone).")
    assert "A loss below the exact sum's" not in sentence
    assert sentence in section(report_markdown(result), "Two adapters on one base")


def test_a_lower_loss_from_a_weaker_edit_of_the_other_task_is_explained():
    result = with_combination(exact=((2.0, 1.0), (3.0, 1.0)), a_alone=((2.0, 1.0), (4.0, 0.0)),
                              b_alone=((4.0, 0.0), (3.0, 1.0)), linear=((1.0, 1.0), (3.5, 0.25)))
    sentence = combination_caveat(result)
    assert sentence == ("A loss below the exact sum's is not a better combination here: `linear` on task A (1 against "
                        "2, with task B's swapped symbols right 0.25 of the time against 1). Each such model applies "
                        "the other task's edit less, which that task's strings do not want; read the loss with the "
                        "swapped columns.")


def test_no_combination_sentence_when_the_sum_is_as_good_and_no_loss_hides_a_weaker_edit():
    result = with_combination(exact=((0.5, 1.0), (0.25, 1.0)), a_alone=((0.5, 1.0), (4.0, 0.0)),
                              b_alone=((4.0, 0.0), (0.25, 1.0)), linear=((1.0, 1.0), (0.125, 1.0)))
    assert combination_caveat(result) is None
    report = report_markdown(result)
    assert "The exact sum does worse" not in report and "A loss below the exact sum's" not in report


def test_a_mixed_batch_or_a_sum_beyond_its_bound_is_called_a_defect():
    result = copy.deepcopy(BASE)
    mb = result["two_tasks"]["mixed_batch"]
    assert "Every row's loss equals its own adapter's, within the bound." in report_markdown(result)
    mb["groups"]["b"]["max_abs_error"] = mb["max_abs_error"] = 2 * mb["bound"]
    report = report_markdown(result)
    assert "A row's loss differs from its own adapter's by MORE than the bound: a defect." in report
    assert "every row's loss does NOT equal its own adapter's" in section(report, "Findings")
    result["two_tasks"]["combinations"]["methods"]["cat"]["error"] = 1.0
    assert "`exact` or `cat` is NOT within its rounding bound" in report_markdown(result)
