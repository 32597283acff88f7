"""``lora-ref demo``: the report's numbers are consistent with each other, with their formulas and
with the library, the run is a function of its seed, and the command works end to end.

The demo itself runs on a tiny configuration (C = 32, one block, a few dozen steps): the tests
check content and consistency, not the quality of the training or the speed.
"""

from __future__ import annotations

import copy
import json
import math
import errno
import os
import sys
from dataclasses import replace

import numpy as np
import pytest

from lora_ref.cli import main
from lora_ref.testing import tolerance
from transformer_ref import GPTConfig, LlamaConfig, demo
from transformer_ref import init_params
from transformer_ref.bounds import logit_magnitude, logit_rounding_chain
from transformer_ref.demo import DemoConfig, compute, run_demo, summary_text, write_report
from transformer_ref.machine import blas_threads

TINY = DemoConfig(n_embd=32, n_layer=1, n_head=2, n_symbols=8, length=4, n_swaps=1, pretrain_steps=40,
                  finetune_steps=15, batch_size=8, ranks=(1, 2, 4, 8, 16), budget_rank=4, phi_ranks=(8, 16),
                  amplification_ranks=(4, 16), eval_examples=64, n_random=8)
FIGURES = {"loss_curves.png", "rank_sweep.png", "parameters.png", "spectra.png", "phi.png"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    result = run_demo(TINY, out, progress=False)
    return result, out


def without_timing(result):
    """The result less what is not a function of the configuration (seconds, thread settings)."""
    r = json.loads(json.dumps(demo.json_ready(result)))
    for key in ("timing", "figures"):
        r.pop(key)
    r["versions"].pop("blas_threads", None)
    return r


def tiny_result_keys(family: str) -> list[str]:
    """The runs of TINY: the paper's (Tables 5 and 6), then the variants at variant_rank."""
    b, v = TINY.budget_rank, TINY.variant_rank
    paper = ["full"] + [f"lora-qv-r{r}" for r in TINY.ranks] + [f"lora-q-r{2 * b}", f"lora-qkvo-r{b // 2}"]
    dora = [f"lora-cattn-r{v}", f"dora-cattn-r{v}"] if family == "gpt2" else [f"dora-qv-r{v}"]
    return paper + dora + [f"qlora-qv-r{v}"]


def lora_count(row: dict, C: int, L: int) -> int:
    """An adapter run's trainable parameters by hand: Section 5.1's 2 L_LoRA d_model r on (C, C) matrices;
    GPT-2's whole fused c_attn (3C, C): L r (C + 3C); DoRA adds one magnitude per output feature."""
    k, r = L * len(row["matrices"]), row["r"]
    if row["whole"]:
        return L * r * (C + 3 * C) + (L * 3 * C if row["method"] == "dora" else 0)
    return 2 * k * C * r + (k * C if row["method"] == "dora" else 0)


def table(report: str, header_start: str) -> list[list[str]]:
    """The cells of each row of the Markdown table whose header line starts with ``header_start``."""
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def g4(x: float) -> str:
    """The report's format for a measured value: 4 significant digits."""
    return f"{x:.4g}"


# ----------------------------------------------------------------------------------------------
# The runs and their counts
# ----------------------------------------------------------------------------------------------


def test_runs_are_the_papers_table_5_and_6(tiny):
    result, _ = tiny
    runs = result["runs"]
    b = TINY.budget_rank
    assert list(runs) == tiny_result_keys("gpt2")
    assert [runs[k]["matrices"] for k in runs if runs[k]["group"] == "equal budget"] == [["q"], ["q", "k", "v", "o"]]
    # Table 5: W_q at 2b, (W_q, W_v) at b and all four at b / 2 train the same number of parameters.
    budget = {runs[k]["trainable"]["measured"] for k in (f"lora-q-r{2 * b}", f"lora-qv-r{b}", f"lora-qkvo-r{b // 2}")}
    assert len(budget) == 1


def test_trainable_parameters_and_adam_bytes_match_their_formulas(tiny):
    result, _ = tiny
    C, L, V, T = TINY.n_embd, TINY.n_layer, TINY.n_symbols + 1, 2 * TINY.length
    F = 4 * C
    # GPT-2's parameters, from its state dict: wte, wpe, ln_f; per block ln_1, ln_2, c_attn, attn.c_proj, c_fc, mlp.c_proj
    per_block = 2 * 2 * C + (3 * C * C + 3 * C) + (C * C + C) + (F * C + F) + (C * F + C)
    n_full = V * C + T * C + 2 * C + L * per_block
    assert result["model"]["parameters"] == n_full
    itemsize = np.dtype(TINY.dtype).itemsize
    for key, row in result["runs"].items():
        expected = n_full if key == "full" else lora_count(row, C, L)
        t = row["trainable"]
        assert t["measured"] == t["formula"] == t["count_parameters"] == expected, key
        assert row["adam_bytes"]["measured"] == row["adam_bytes"]["formula"] == 2 * expected * itemsize, key


def test_losses_and_evaluation_are_recorded(tiny):
    result, _ = tiny
    assert len(result["pretraining"]["losses"]) == TINY.pretrain_steps
    # pretraining learns something: the last steps' loss is below the first step's
    assert np.mean(result["pretraining"]["losses"][-5:]) < result["pretraining"]["losses"][0]
    for row in result["runs"].values():
        assert len(row["losses"]) == TINY.finetune_steps
        tail = row["losses"][-max(1, TINY.finetune_steps // 10):]
        assert row["final_train_loss"] == pytest.approx(float(np.mean(tail)), rel=tolerance("float64", len(tail)))
        e = row["eval"]
        assert 0.0 <= e["accuracy"] <= 1.0 and 0.0 <= e["changed_accuracy"] <= 1.0 and e["loss"] > 0.0


# ----------------------------------------------------------------------------------------------
# Merge check
# ----------------------------------------------------------------------------------------------


def test_logit_rounding_chain_counts_every_operation():
    # C = 8, one block, 2 heads (D = 4), F = 32, T = 4, r = 1, counted by hand:
    # LayerNorm 2C + 8 = 24; a projection from d_in is d_in + r + 6 (15 from C, 39 from F);
    # attention D + 2T + 4 = 16; GELU 8; residual adds 1 each.
    block = 24 + 15 + 16 + 15 + 1 + 24 + 15 + 8 + 39 + 1
    def chain(n_layer, r, **kw):
        return logit_rounding_chain(GPTConfig(vocab_size=5, n_positions=4, n_embd=8, n_layer=n_layer, n_head=2,
                                              n_inner=32), r, **kw)

    assert chain(1, 1) == 1 + block + 24 + 8  # + embeddings' add, ln_f, lm_head (C)
    # one more block adds one more block's count; one more rank adds one per projection (4 per block)
    assert chain(2, 1) - chain(1, 1) == block
    assert chain(1, 2) - chain(1, 1) == 4
    # the mean cross-entropy over N positions adds shift, exp, sum (V), log, subtract, mean (N)
    assert chain(1, 1, loss_batch=6) - chain(1, 1) == 5 + 6 + 4


def test_logit_rounding_chain_counts_doras_extra_roundings():
    """A DoRA projection is lora_ref.dora.dora_rounding_counts' d_in + r + 12 roundings, 6 more than
    LoRA's: four projections on each block's path, in both families."""
    gpt = GPTConfig(vocab_size=5, n_positions=4, n_embd=8, n_layer=2, n_head=2, n_inner=32)
    llama = LlamaConfig(vocab_size=5, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                        num_attention_heads=2, max_position_embeddings=4)
    for config in (gpt, llama):
        assert logit_rounding_chain(config, 3, dora=True) - logit_rounding_chain(config, 3) == 2 * 4 * 6
    with pytest.raises(TypeError, match="dora must be True or False, got 1"):
        logit_rounding_chain(gpt, 3, dora=1)


@pytest.mark.parametrize("config", [
    GPTConfig(vocab_size=7, n_positions=4, n_embd=8, n_layer=1, n_head=2, tie_word_embeddings=False),
    LlamaConfig(vocab_size=7, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=4, tie_word_embeddings=False)], ids=["gpt2", "llama"])
def test_logit_magnitude_reads_the_head_the_params_hold(config):
    """Untied params: the bound is on lm_head.weight, not on the embedding table (which it used to read)."""
    params = init_params(config, 0)
    table = "transformer.wte.weight" if isinstance(config, GPTConfig) else "model.embed_tokens.weight"
    tied = {k: v for k, v in params.items() if k != "lm_head.weight"}
    # the head doubled (exact in binary): every term doubles, so the bound does too, exactly
    untied = {**tied, "lm_head.weight": 2.0 * params[table]}
    assert logit_magnitude(untied, config) == 2.0 * logit_magnitude(tied, config)
    # and it is the formula on the head: max_v sum_c |head[v, c]| (sqrt(C) |g_c| + |b_c|)
    g, b = ((params["transformer.ln_f.weight"], params["transformer.ln_f.bias"]) if isinstance(config, GPTConfig)
            else (params["model.norm.weight"], 0.0))
    head = np.abs(params["lm_head.weight"])
    assert logit_magnitude(params, config) == float((head @ (math.sqrt(8) * np.abs(g) + np.abs(b))).max())


def test_merge_check_is_within_its_bound_and_not_vacuous(tiny):
    result, _ = tiny
    for key, row in result["runs"].items():
        if key == "full":
            assert "merge" not in row
            continue
        m = row["merge"]
        n = logit_rounding_chain(GPTConfig(vocab_size=5, n_positions=2 * TINY.length, n_embd=TINY.n_embd,
                                           n_layer=TINY.n_layer, n_head=TINY.n_head), row["r"],
                                 dora=row["method"] == "dora")
        assert m["chain_length"] == n
        for dtype in ("float32", "float64"):
            check = m[dtype]
            assert check["bound"] == 2 * tolerance(dtype, n) * m["magnitude"]
            assert check["max_abs_error"] <= check["bound"], (key, dtype)
            # the adapters move the logits by far more than the bound: a merge that dropped them would fail
            assert check["adapter_effect"] > check["bound"], (key, dtype)


# ----------------------------------------------------------------------------------------------
# Analysis: spectra, phi, amplification
# ----------------------------------------------------------------------------------------------


def test_spectra_are_consistent(tiny):
    result, _ = tiny
    for key, rows in result["spectra"].items():
        for kind, s in rows.items():
            sv = np.asarray(s["singular_values"])
            k = TINY.n_embd if key == "full" else result["runs"][key]["r"]
            assert sv.shape == (k,) and np.all(np.diff(sv) <= 0) and sv[-1] >= 0
            # |dW|_F^2 = sum sigma_i^2: a sum of k squares, rounded once more for the root
            assert s["norm"] == pytest.approx(math.sqrt(float(np.sum(sv ** 2))), rel=2 * tolerance("float64", k + 2))
            assert 1 <= s["numerical_rank"] <= k
            assert s["energy_top1"] <= s["energy_top2"] <= s["energy_top4"] <= 1.0


def test_phi_grid_and_summary_numbers(tiny):
    result, _ = tiny
    r1, r2 = TINY.phi_ranks
    C = TINY.n_embd
    for kind in ("q", "v"):
        per_layer = result["phi"][kind]
        assert [p["layer"] for p in per_layer] == list(range(TINY.n_layer))
        for p in per_layer:
            grid = np.asarray(p["grid"])
            assert grid.shape == (r1, r2) and np.all((grid >= 0) & (grid <= 1))
            assert (p["phi_1_1"], p["phi_p_p"], p["phi_r1_r2"]) == (grid[0, 0], grid[r1 - 1, r1 - 1], grid[r1 - 1, r2 - 1])
            assert (p["random_1_1"], p["random_p_p"], p["random_r1_r2"]) == (1 / C, r1 / C, r2 / C)
            for name in ("init_1_1", "init_p_p", "init_r1_r2"):
                assert 0.0 <= p[name] <= 1.0


def test_amplification_numbers_follow_their_definitions(tiny):
    result, _ = tiny
    C = TINY.n_embd
    assert sorted(map(int, result["amplification"])) == sorted(TINY.amplification_ranks)
    for r, rows in result["amplification"].items():
        for kind, a in rows.items():
            assert a["k"] == int(r)
            # each is one division or product of float64 values: one rounding each, compared 2 gamma_2 apart
            rel = 2 * tolerance("float64", 2)
            assert a["factor"] == pytest.approx(a["delta_norm"] / a["proj_delta"], rel=rel)
            assert a["proj_random_expected"] == pytest.approx(a["k"] / C * a["weight_norm"], rel=rel)
            assert a["delta_norm"] == pytest.approx(result["spectra"][f"lora-qv-r{r}"][kind]["norm"], rel=rel)
            # projections of W onto k-frames cannot exceed W's best k-frame, nor |W|_F
            assert a["proj_delta"] <= a["proj_weight"] * (1 + rel) and a["proj_weight"] <= a["weight_norm"] * (1 + rel)


# ----------------------------------------------------------------------------------------------
# The report and its files
# ----------------------------------------------------------------------------------------------


def test_report_shows_the_computed_numbers(tiny):
    result, out = tiny
    report = (out / "report.md").read_text()
    runs = result["runs"]
    rows = table(report, "| run | trainable | held-out loss")
    paper = [row for row in runs.values() if row["group"] != "variant"]          # the variants: test_demo_variants
    assert [r[0] for r in rows] == ["pretrained, not fine-tuned"] + [row["label"] for row in paper]
    for cells, row in zip(rows[1:], paper):
        e = row["eval"]
        assert cells[1:7] == [f"{row['trainable']['measured']:,}", g4(e["loss"]), g4(e["accuracy"]),
                              g4(e["changed_accuracy"]), g4(e["sequence_accuracy"]), g4(row["final_train_loss"])]
    merge_rows = table(report, "| run | n | M | dtype")
    assert len(merge_rows) == 2 * (len(runs) - 1)
    for cells in merge_rows:
        m = next(row["merge"] for row in runs.values() if row["label"] == cells[0])
        assert cells[4] == f"{m[cells[3]]['max_abs_error']:.3e}" and cells[5] == f"{m[cells[3]]['bound']:.3e}"
    amp_rows = table(report, "| r | matrix | k |")
    assert len(amp_rows) == 2 * len(TINY.amplification_ranks)                       # Wq and Wv at each rank
    for cells in amp_rows:
        a = result["amplification"][cells[0]][cells[1].removeprefix("W")]
        assert cells[5:10] == [g4(a["proj_delta"]), g4(a["proj_weight"]), g4(a["proj_random_rms"]),
                               g4(a["proj_random_expected"]), f"{a['factor']:.3g}"]
    # the configuration and the software are stated
    for text in (f"n_embd={TINY.n_embd}", f"{TINY.pretrain_steps} steps", f"lr {TINY.lora_lr:g}",
                 f"| seed | {TINY.seed}", "numpy ", "autograd ", "lora-ref "):
        assert text in report, text


def test_files_written(tiny):
    result, out = tiny
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(demo.json_ready(result)))
    assert set(result["figures"]) == FIGURES
    report = (out / "report.md").read_text()
    for name in FIGURES:
        assert (out / "figures" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"(figures/{name})" in report
    assert "Figures skipped" not in report


def test_without_matplotlib_the_report_is_written_and_says_so(tiny, tmp_path, monkeypatch):
    result, _ = tiny
    result = copy.deepcopy(result)
    monkeypatch.setitem(sys.modules, "matplotlib", None)          # import matplotlib -> ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    path = write_report(result, tmp_path)
    report = path.read_text()
    assert "**Figures skipped:**" in report and "pip install 'lora-ref[plots]'" in report
    assert "![" not in report and not (tmp_path / "figures").exists()
    assert result["figures"] == [] and "matplotlib" in result["figures_skipped"]
    assert "figures skipped" in summary_text(result, tmp_path)
    with pytest.raises(ImportError, match="matplotlib"):
        write_report(result, tmp_path, plots=True)


def test_summary_has_the_rank_table_phi_amplification_and_time(tiny):
    result, out = tiny
    text = summary_text(result, out, wall_s=12.5)
    for row in result["runs"].values():
        assert row["label"] in text and f"{row['trainable']['measured']:,}" in text
    layer = result["analysis_layer"]
    for kind in ("q", "v"):
        assert f"phi(1,1) {result['phi'][kind][layer]['phi_1_1']:.3f}" in text
    for r, rows in result["amplification"].items():
        assert f"amplification r={r} Wq:" in text and f"factor {rows['q']['factor']:.3g}" in text
    assert "wall time 12.5 s" in text and str(out / "report.md") in text
    assert len(text.splitlines()) <= 30                            # one screen


# ----------------------------------------------------------------------------------------------
# Determinism, float64, the command
# ----------------------------------------------------------------------------------------------


def test_deterministic_for_a_seed(tiny):
    result, _ = tiny
    with blas_threads(1):               # as run_demo does: float32 results may depend on BLAS's thread count
        again = compute(TINY, progress=False)
        other = compute(replace(TINY, seed=1), progress=False)
    assert without_timing(again) == without_timing(result)
    assert other["runs"]["full"]["losses"] != result["runs"]["full"]["losses"]


def test_float64_run():
    config = replace(TINY, dtype="float64", pretrain_steps=10, finetune_steps=5, ranks=(2, 4, 8, 16),
                     amplification_ranks=(2, 16))
    result = compute(config, progress=False)
    for key, row in result["runs"].items():
        assert row["adam_bytes"]["measured"] == 2 * row["trainable"]["measured"] * 8
        if key != "full":
            assert list(row["merge"]) == ["chain_length", "magnitude", "float64"]
            assert row["merge"]["float64"]["max_abs_error"] <= row["merge"]["float64"]["bound"]


def test_cli_runs_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(demo.PRESETS, "quick", TINY)               # --quick, made tiny
    out = tmp_path / "run"
    assert main(["demo", "--quick", "--out", str(out), "--seed", "3", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "wall time" in text and "LoRA Wq,Wv r=16" in text
    saved = json.loads((out / "results.json").read_text())
    assert saved["config"] == replace(TINY, seed=3).to_dict()
    assert "lora-ref demo --quick --seed 3" in (out / "report.md").read_text()     # how to reproduce it


@pytest.mark.parametrize("argv, message", [
    (["--seed", "-1"], "--seed must be a non-negative integer"),
    (["--threads", "-2"], "--threads must be a non-negative integer"),
])
def test_cli_rejects_bad_arguments(argv, message, tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), *argv]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.out == ""                # errors go to stderr


def test_cli_rejects_a_file_as_out(tmp_path, capsys):
    path = tmp_path / "file"
    path.write_text("")
    assert main(["demo", "--out", str(path)]) == 2
    assert "must be a directory" in capsys.readouterr().err


def one_line_error(capsys, *words):
    """Issue 11, item 12: one line on stderr naming the path and the reason, nothing on stdout."""
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert captured.out == "" and len(lines) == 1 and lines[0].startswith("lora-ref demo: "), captured.err
    assert "Traceback" not in captured.err and all(w in lines[0] for w in words), lines[0]


def test_cli_refuses_unwritable_output_before_running(tmp_path, monkeypatch, capsys):
    """A path under a file, and a directory that cannot be made (/proc): exit 1, one line naming the
    path and the reason, before the experiment (whose compute is made to fail loudly here)."""
    monkeypatch.setattr(demo, "compute", lambda *a, **k: pytest.fail("the experiment ran before the output check"))
    (tmp_path / "file").write_text("")
    under_file = tmp_path / "file" / "out"
    assert main(["demo", "--out", str(under_file)]) == 1
    one_line_error(capsys, "cannot write to", str(under_file), "Not a directory")
    assert main(["demo", "--out", "/proc/lora-ref-demo-test"]) == 1
    one_line_error(capsys, "cannot write to", "/proc/lora-ref-demo-test")


def test_cli_refuses_a_folder_it_cannot_write_as_root_too(tmp_path, monkeypatch, capsys):
    """The read-only case below, as root sees it too (root writes into a 0555 folder regardless):
    the first write the demo makes fails with EACCES; one line names the folder, before any training."""
    monkeypatch.setattr(demo, "compute", lambda *a, **k: pytest.fail("the experiment ran before the output check"))

    def refuse(out):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(out))

    monkeypatch.setattr(demo, "prepare_output", refuse)
    ro = tmp_path / "ro"
    assert main(["demo", "--out", str(ro)]) == 1
    one_line_error(capsys, "cannot write to", str(ro), "Permission denied")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into read-only directories")
def test_cli_refuses_a_read_only_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "compute", lambda *a, **k: pytest.fail("the experiment ran before the output check"))
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert main(["demo", "--out", str(ro)]) == 1
        one_line_error(capsys, "cannot write to", str(ro), "Permission denied")
    finally:
        ro.chmod(0o755)


def test_cli_refuses_an_existing_report_without_force(tmp_path, monkeypatch, capsys):
    """As ``lora-ref vectors``: an output folder that already holds files is refused unless --force."""
    monkeypatch.setitem(demo.PRESETS, "quick", TINY)
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 1
    one_line_error(capsys, str(out), "already exists and is not empty", "--force")
    assert main(["demo", "--quick", "--out", str(out), "--no-progress", "--force"]) == 0
    assert (out / "report.md").is_file() and (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("change, message", [
    ({"ranks": (1, 2, 4, 64)}, "at most n_embd=32"),
    ({"ranks": (4, 2)}, "increasing order"),
    ({"budget_rank": 3, "ranks": (1, 3, 8, 16)}, "budget_rank must be an even rank"),
    ({"phi_ranks": (8, 32)}, "phi_ranks must be two ranks from ranks"),
    ({"amplification_ranks": (16, 4)}, "smaller first"),
    ({"dtype": "float16"}, "dtype must be 'float32' or 'float64'"),
    ({"seed": -1}, "seed must be a non-negative int"),
    ({"lora_lr": 0.0}, "lora_lr must be positive"),
    ({"alpha": float("inf")}, "alpha must be finite"),
    ({"n_layer": 1.5}, "n_layer must be a positive int"),
    ({"n_head": 3}, "n_embd must be divisible by n_head"),
    ({"variant_rank": 3}, r"variant_rank must be one of ranks \(1, 2, 4, 8, 16\)"),
    ({"n_swaps": 3}, "n_swaps must be at most n_symbols / 4 = 2"),
    ({"finetune_steps": 0}, "finetune_steps must be a positive int"),
])
def test_config_validation_names_the_field(change, message):
    with pytest.raises((ValueError, TypeError), match=message):
        replace(TINY, **change)


def test_run_demo_validates_its_arguments(tmp_path):
    with pytest.raises(TypeError, match="config must be a transformer_ref.demo.DemoConfig"):
        run_demo({"n_embd": 32}, tmp_path)
    with pytest.raises(TypeError, match="progress must be True, False or None"):
        run_demo(TINY, tmp_path, progress="yes")
    with pytest.raises(ValueError, match="threads must be a positive int, got 0"):
        run_demo(TINY, tmp_path, threads=0)
    (tmp_path / "f").write_text("")
    with pytest.raises(ValueError, match="must be a directory"):
        run_demo(TINY, tmp_path / "f")


def test_presets_fit_the_issue():
    assert demo.PRESETS == {"default": demo.DEFAULT, "quick": demo.QUICK}
    for preset in (demo.DEFAULT, demo.QUICK):
        assert preset.ranks == (1, 2, 4, 8, 64) and max(preset.ranks) < preset.n_embd
        assert preset.phi_ranks == (8, 64) and preset.amplification_ranks == (4, 64)
        assert preset.budget_rank == 4                            # W_q r=8, (W_q, W_v) r=4, all four r=2
        assert preset.variant_rank == 4                           # DoRA and QLoRA next to LoRA Wq,Wv r=4


# ----------------------------------------------------------------------------------------------
# The LLaMA architecture (--model llama)
# ----------------------------------------------------------------------------------------------

TINY_LLAMA = replace(TINY, family="llama")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo-llama")
    return run_demo(TINY_LLAMA, out, progress=False), out


def test_llama_run_counts_and_merge_check(tiny_llama):
    result, out = tiny_llama
    C, L, V = TINY.n_embd, TINY.n_layer, TINY.n_symbols + 1
    F = TINY_LLAMA.llama_mlp_width
    assert F == 96                                                 # 8 * 32 / 3 = 85.3, up to a multiple of 32
    # LLaMA's parameters from its state dict: embed_tokens and the untied lm_head V C each, per block
    # q, k, v, o C^2 each (as many kv heads as heads), gate, up, down C F each, two RMSNorms C; the final norm C
    n_full = 2 * V * C + L * (4 * C * C + 3 * C * F + 2 * C) + C
    assert result["model"]["parameters"] == n_full and result["model"]["family"] == "llama"
    assert list(result["runs"]) == tiny_result_keys("llama")
    itemsize = np.dtype(TINY.dtype).itemsize
    for key, row in result["runs"].items():
        expected = n_full if key == "full" else lora_count(row, C, L)
        assert row["trainable"]["measured"] == row["trainable"]["formula"] == expected, key
        assert row["adam_bytes"]["measured"] == 2 * expected * itemsize, key
        if key == "full":
            continue
        m = row["merge"]
        llama = LlamaConfig(vocab_size=V, hidden_size=C, intermediate_size=F, num_hidden_layers=L,
                            num_attention_heads=TINY.n_head, max_position_embeddings=2 * TINY.length, rms_norm_eps=1e-5)
        assert m["chain_length"] == logit_rounding_chain(llama, row["r"], dora=row["method"] == "dora")
        for dtype in ("float32", "float64"):
            assert m[dtype]["max_abs_error"] <= m[dtype]["bound"] < m[dtype]["adapter_effect"], (key, dtype)





def test_llama_report_and_summary(tiny_llama):
    result, out = tiny_llama
    report = (out / "report.md").read_text()
    assert report.startswith("# lora-ref demo: LoRA on a small LLaMA") and "LLaMA architecture (RMSNorm, RoPE" in report
    assert "`q_proj` or `v_proj`" in report and "family='llama'" in report          # how to reproduce it
    assert summary_text(result).startswith("lora-ref demo: LLaMA n_embd=32")
    assert set(result["spectra"]["full"]) == {"q", "v"} and len(result["phi"]["v"]) == TINY.n_layer
    assert set(result["figures"]) == FIGURES


def test_cli_model_llama(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(demo.PRESETS, "quick", replace(TINY, pretrain_steps=5, finetune_steps=3))
    out = tmp_path / "run"
    assert main(["demo", "--quick", "--model", "llama", "--out", str(out), "--seed", "3", "--no-progress"]) == 0
    assert capsys.readouterr().out.startswith("lora-ref demo: LLaMA")
    assert json.loads((out / "results.json").read_text())["config"]["family"] == "llama"
    assert "lora-ref demo --quick --model llama --seed 3" in (out / "report.md").read_text()
    with pytest.raises(ValueError, match="family must be one of 'gpt2', 'llama', got 'bert'"):
        replace(TINY, family="bert")
