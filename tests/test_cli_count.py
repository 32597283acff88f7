"""``lora-ref count``: every expected number is derived here, by formula, independently of the command.

Architecture numbers (d_model, layers) and where they come from:

    RoBERTa base   768 / 12   Hugging Face roberta-base config.json (hidden_size, num_hidden_layers)
    RoBERTa large 1024 / 24   Hugging Face roberta-large config.json
    DeBERTa XXL   1536 / 48   Hugging Face microsoft/deberta-v2-xxlarge config.json
    GPT-2 M       1024 / 24   Hugging Face gpt2-medium config.json (n_embd, n_layer)
    GPT-2 L       1280 / 36   Hugging Face gpt2-large config.json
    GPT-3 175B   12288 / 96   Brown et al. 2020, Table 2.1 (d_model, n_layers)

LoRA's count (Hu et al. 2021, Section 5.1): ``|Theta| = 2 * L * d_model * r`` per adapted
d_model x d_model matrix; an MLP matrix (F, d) or (d, F) has ``L * r * (d + F)``. The reported
strings of the audit are quoted from the paper (arXiv 2106.09685v2): RoBERTa / DeBERTa from
Table 2, GPT-2 M / L from Table 3, GPT-3 from Table 4. All counts are integers, so they are
compared exactly; the one float (full / LoRA) is compared with the same single division.
"""

from __future__ import annotations

import contextlib
import io
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_ref.cli import main
from lora_ref.counting import (
    GATED_MATRICES,
    PRESETS,
    adam_state_bytes,
    checkpoint_bytes,
    classify,
    deberta_v2_parameters,
    format_size,
    lora_parameters,
    parse_reported,
    parse_targets,
    roberta_parameters,
    round_reported,
    target_shape,
)

DIMS = {  # preset: (d_model, layers, MLP width F), sources in the module docstring
    "roberta-base": (768, 12, 3072), "roberta-large": (1024, 24, 4096), "deberta-xxlarge": (1536, 48, 6144),
    "gpt2-medium": (1024, 24, 4096), "gpt2-large": (1280, 36, 5120), "gpt3-175b": (12288, 96, 49152),
    "gpt2": (768, 12, 3072),
}

# LLaMA presets (Hugging Face meta-llama config.json files): vocabulary, d_model, MLP width F,
# layers, query heads H, key/value heads Hk. Head width D = d / H; k and v are (Hk D, d).
LLAMA = {"llama-2-7b": (32000, 4096, 11008, 32, 32, 32), "llama-2-13b": (32000, 5120, 13824, 40, 40, 40),
         "llama-2-70b": (32000, 8192, 28672, 80, 64, 8), "llama-3-8b": (128256, 4096, 14336, 32, 32, 8),
         "llama-3-70b": (128256, 8192, 28672, 80, 64, 8),
         "llama-65b": (32000, 8192, 22016, 80, 64, 64)}      # LLaMA 1 (Touvron et al. 2023, Table 2)


def llama_params(V, d, F, L, H, Hk):
    """LlamaForCausalLM: embedding and untied lm_head V d each, final RMSNorm d; per layer q and o
    d^2 each, k and v d Hk D each, gate, up, down d F each, two RMSNorms d. (transformers gives
    6,738,415,616 and 8,030,261,248 for LLaMA-2 7B and LLaMA-3 8B; Meta's model cards say 7B, 8B.)"""
    kv = Hk * (d // H)
    return 2 * V * d + d + L * (2 * d * d + 2 * d * kv + 3 * d * F + 2 * d)


def llama_lora(d, F, L, H, Hk, r, targets):
    """LoRA over every layer: r (d_in + d_out) per adapted matrix, (d_out, d_in) as above."""
    kv = Hk * (d // H)
    per = {"q": d + d, "k": d + kv, "v": d + kv, "o": d + d, "gate": d + F, "up": d + F, "down": F + d}
    return {t: L * r * per[t] for t in targets}


def lora_params(d: int, L: int, r: int, n_matrices: int) -> int:
    """Section 5.1: |Theta| = 2 x L x d_model x r x (number of adapted d_model x d_model types)."""
    return 2 * L * d * r * n_matrices


def gpt2_params(d: int, L: int, vocab: int = 50257, positions: int = 1024) -> int:
    """GPT-2 with tied lm_head: (V + P) d + L (12 d^2 + 13 d) + 2 d.

    Per block: c_attn 3d^2 + 3d, attn c_proj d^2 + d, c_fc 4d^2 + 4d, mlp c_proj 4d^2 + d, two
    LayerNorms 4d: 12 d^2 + 13 d. Then ln_f 2d. (Transformers' GPT2LMHeadModel gives 354,823,168
    and 774,030,080 for medium / large.)
    """
    return (vocab + positions) * d + L * (12 * d * d + 13 * d) + 2 * d


def encoder_layers(d: int, L: int, F: int) -> int:
    """BERT-style layer: q, k, v, o 4(d^2 + d), MLP 2 d F + F + d, two LayerNorms 4d = 4d^2 + 2dF + 9d + F."""
    return L * (4 * d * d + 2 * d * F + 9 * d + F)


def roberta_backbone(d: int, L: int, F: int, vocab: int = 50265, positions: int = 514, types: int = 1) -> int:
    """RobertaModel without pooler: (V + P + T) d + 2d (embedding LayerNorm) + layers.
    (Transformers gives 124,055,040 / 354,310,144 for base / large.)"""
    return (vocab + positions + types) * d + 2 * d + encoder_layers(d, L, F)


def deberta_xxl_backbone(d: int = 1536, L: int = 48, F: int = 6144, vocab: int = 128100, buckets: int = 256,
                         kernel: int = 3) -> int:
    """DebertaV2Model: V d + 2d, layers, relative embeddings 2 buckets d + 2d, conv k d^2 + d + 2d.
    (Transformers gives 1,564,549,632.)"""
    return vocab * d + 2 * d + encoder_layers(d, L, F) + 2 * buckets * d + 2 * d + kernel * d * d + d + 2 * d


def run_json(capsys, *argv: str) -> dict:
    assert main(["count", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def millions(n: int, places: int) -> str:
    """n in millions, rounded: the way the paper prints counts (no tie occurs in these numbers)."""
    return f"{round(n / 1e6, places):.{places}f}M"


# ============================================================================================
# Counting mode
# ============================================================================================


@pytest.mark.parametrize("preset", list(DIMS))
def test_preset_lora_counts_and_bytes(capsys, preset):
    d, L, _ = DIMS[preset]
    out = run_json(capsys, preset, "--targets", "q,v", "--rank", "4")
    n = lora_params(d, L, 4, 2)
    assert (out["model"], out["d_model"], out["layers"], out["targets"], out["rank"]) == (preset, d, L, ["q", "v"], 4)
    assert out["lora"]["params"] == n
    assert out["lora"]["params_by_target"] == {"q": n // 2, "v": n // 2}
    # fp16 2 bytes, fp32 4 bytes per parameter; Adam: 2 moments x 4 bytes (fp32).
    assert out["lora"]["checkpoint_bytes"] == {"fp16": 2 * n, "fp32": 4 * n}
    assert out["lora"]["adam_state_bytes"] == 8 * n


def test_defaults_are_q_v_rank_4(capsys):
    d, L, _ = DIMS["gpt2-medium"]
    out = run_json(capsys, "gpt2-medium")
    assert (out["targets"], out["rank"]) == (["q", "v"], 4)
    assert out["lora"]["params"] == lora_params(d, L, 4, 2) == 393_216   # Table 3's "0.35M" row, recomputed


def test_all_targets_including_mlp(capsys):
    d, L, F = DIMS["gpt2-large"]
    out = run_json(capsys, "gpt2-large", "--targets", "q,k,v,o,mlp", "--rank", "8")
    by = out["lora"]["params_by_target"]
    assert list(by) == ["q", "k", "v", "o", "mlp_in", "mlp_out"]
    for t in "qkvo":
        assert by[t] == lora_params(d, L, 8, 1)
    assert by["mlp_in"] == by["mlp_out"] == L * 8 * (d + F)       # A (r, d) + B (F, r), and transposed
    assert out["lora"]["params"] == lora_params(d, L, 8, 4) + 2 * L * 8 * (d + F)


def test_explicit_dimensions(capsys):
    out = run_json(capsys, "--d-model", "96", "--layers", "3", "--ffn", "200", "--targets", "k,o,mlp_out", "--rank", "5")
    assert out["model"] is None and out["ffn_width"] == 200
    assert out["lora"]["params_by_target"] == {"k": lora_params(96, 3, 5, 1), "o": lora_params(96, 3, 5, 1),
                                               "mlp_out": 3 * 5 * (96 + 200)}
    assert out["full"]["params"] is None and out["full_over_lora"] is None and out["lora_fraction"] is None
    default_ffn = run_json(capsys, "--d-model", "96", "--layers", "3", "--targets", "mlp_in", "--rank", "5")
    assert default_ffn["ffn_width"] == 4 * 96
    assert default_ffn["lora"]["params"] == 3 * 5 * (96 + 4 * 96)


@settings(max_examples=25)             # each example is a whole CLI run; 25 cover the formula's terms
@given(d=st.integers(1, 4096), L=st.integers(1, 96), r=st.integers(1, 64),
       targets=st.lists(st.sampled_from("qkvo"), min_size=1, max_size=4, unique=True))
def test_explicit_dimensions_follow_the_formula(d, L, r, targets):
    r = min(r, d)                                  # a rank above d_model is refused (tested below)
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        status = main(["count", "--d-model", str(d), "--layers", str(L), "--targets", ",".join(targets),
                       "--rank", str(r), "--json"])
    assert status == 0
    out = json.loads(buffer.getvalue())
    assert out["lora"]["params"] == lora_params(d, L, r, len(targets))
    assert out["lora"]["checkpoint_bytes"]["fp16"] == 2 * lora_params(d, L, r, len(targets))


@pytest.mark.parametrize("preset, expected", [
    ("gpt2-medium", gpt2_params(1024, 24)),
    ("gpt2-large", gpt2_params(1280, 36)),
    ("roberta-base", roberta_backbone(768, 12, 3072)),
    ("roberta-large", roberta_backbone(1024, 24, 4096)),
    ("deberta-xxlarge", deberta_xxl_backbone()),
])
def test_full_model_counts(capsys, preset, expected):
    out = run_json(capsys, preset)
    full = out["full"]
    assert full["params"] == expected and full["exact"] is True
    assert full["checkpoint_bytes"] == {"fp16": 2 * expected, "fp32": 4 * expected}
    assert full["adam_state_bytes"] == 8 * expected
    assert out["full_over_lora"] == expected / out["lora"]["params"]      # the same one division


def test_gpt3_full_model_is_the_papers_reported_count(capsys):
    out = run_json(capsys, "gpt3-175b", "--targets", "q,v", "--rank", "4")
    reported = 175_255_800_000                     # Table 4, GPT-3 (FT): "175,255.8M"
    assert out["full"]["params"] == reported and out["full"]["exact"] is False
    assert out["full"]["reported"] == "175,255.8M"
    assert out["full_over_lora"] == reported / lora_params(12288, 96, 4, 2)


def test_text_report_shows_the_headline_numbers(capsys):
    assert main(["count", "gpt3-175b"]) == 0
    text = capsys.readouterr().out
    n = lora_params(12288, 96, 4, 2)                                   # 18,874,368
    assert f"= {n:,} parameters (A and B)" in text
    assert f"{2 * n:,} B = {2 * n / 1e6:.1f} MB ({2 * n / 2**20:.1f} MiB)" in text   # fp16: 37.7 MB, 36.0 MiB
    assert f"full / LoRA = {175_255_800_000 / n:,.1f}x" in text
    assert "reported as 175,255.8M" in text


def test_text_report_without_a_preset_has_no_full_model(capsys):
    assert main(["count", "--d-model", "64", "--layers", "2"]) == 0
    text = capsys.readouterr().out
    assert f"= {lora_params(64, 2, 4, 2):,} parameters" in text
    assert "full model: n/a" in text


# ============================================================================================
# The paper audit
# ============================================================================================


@pytest.fixture(scope="module")
def paper() -> dict:
    """``count --paper --json``, run once for the tests that only read it."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert main(["count", "--paper", "--json"]) == 0
    return json.loads(buffer.getvalue())


def find(claims, source, model, reported, targets=None, rank=None):
    rows = [c for c in claims if (c["source"], c["model"], c["reported"]) == (source, model, reported)
            and (rank is None or (c["stated"] or {}).get("rank") == rank)
            and (targets is None or (c["stated"] or {}).get("targets") == targets)]
    assert len(rows) == 1, (source, model, reported, rows)
    return rows[0]


# (source, preset, reported string as printed in the paper, stated rank, targets, expected status)
LORA_CLAIMS = [
    ("Table 2", "roberta-base", "0.3M", 8, ["q", "v"], "ok"),
    ("Table 2", "roberta-large", "0.8M", 8, ["q", "v"], "ok"),
    ("Table 2", "deberta-xxlarge", "4.7M", 8, ["q", "v"], "mismatch"),    # Table 10 says r = 8
    ("Table 3", "gpt2-medium", "0.35M", 4, ["q", "v"], "mismatch"),
    ("Table 3", "gpt2-large", "0.77M", 4, ["q", "v"], "mismatch"),
    ("Table 4", "gpt3-175b", "4.7M", 1, ["q", "v"], "ok"),
    ("Table 4", "gpt3-175b", "37.7M", 8, ["q", "v"], "ok"),
]


@pytest.mark.parametrize("source, preset, reported, r, targets, status", LORA_CLAIMS)
def test_paper_lora_figures(paper, source, preset, reported, r, targets, status):
    row = find(paper["claims"], source, preset, reported, targets, r)
    d, L, _ = DIMS[preset]
    n = lora_params(d, L, r, len(targets))
    places = len(reported[:-1].split(".")[1])
    assert row["recomputed"] == n
    assert row["recomputed_as_reported"] == millions(n, places)
    # The status is derived here: does n, rounded like the paper prints it, give the string?
    assert (millions(n, places) == reported) == (status == "ok")
    assert row["status"] == status and row["flagged"] == (status != "ok")
    assert row["explanation"]                                       # every row says why, in one line


def test_paper_deberta_recomputes_at_rank_16(paper):
    row = find(paper["claims"], "Table 2", "deberta-xxlarge", "4.7M")
    n16 = lora_params(1536, 48, 16, 2)                              # 4,718,592
    assert millions(n16, 1) == "4.7M"
    assert row["alternative"] == {"targets": ["q", "v"], "rank": 16, "recomputed": n16, "status": "ok"}


def test_paper_gpt3_figures_that_recompute(paper):
    claims = paper["claims"]
    # Table 15 (arXiv v2) prints r_q=r_v=4 as "18.8M": 18,874,368 rounds to 18.9M, truncates to 18.8M.
    row = find(claims, "Table 15", "gpt3-175b", "18.8M", ["q", "v"], 4)
    n = lora_params(12288, 96, 4, 2)
    assert millions(n, 1) == "18.9M" and row["recomputed"] == n and row["status"] == "truncated"
    # Appendix D.4 gives r=2 on all four as a 37.7M configuration: that is 18,874,368 too.
    row = find(claims, "Appendix D.4", "gpt3-175b", "37.7M", ["q", "k", "v", "o"], 2)
    assert row["recomputed"] == lora_params(12288, 96, 2, 4) == n and row["status"] == "mismatch"
    assert row["alternative"]["rank"] == 4 and millions(row["alternative"]["recomputed"], 1) == "37.7M"


def test_paper_full_model_figures(paper):
    claims = paper["claims"]
    medium = find(claims, "Table 3", "gpt2-medium", "354.92M")
    assert medium["recomputed"] == gpt2_params(1024, 24) and medium["status"] == "mismatch"    # 354.82M
    large = find(claims, "Table 3", "gpt2-large", "774.03M")
    assert large["recomputed"] == gpt2_params(1280, 36) and millions(large["recomputed"], 2) == "774.03M"
    assert large["status"] == "ok"
    gpt3 = find(claims, "Table 4", "gpt3-175b", "175,255.8M")
    assert gpt3["recomputed"] is None and gpt3["status"] == "n/a" and not gpt3["flagged"]


def test_paper_headline(paper):
    out = paper
    h = out["headline"]
    n = lora_params(12288, 96, 4, 2)
    assert (h["lora_params"], h["lora_fp16_bytes"]) == (n, 2 * n)
    assert (h["lora_fp16"], h["lora_fp16_binary"]) == (f"{2 * n / 1e6:.1f} MB", f"{2 * n / 2**20:.1f} MiB")
    assert h["full_fp16_bytes"] == 2 * 175_255_800_000
    assert h["ratio"] == 175_255_800_000 / n
    checkpoint = find(out["claims"], "Section 4.2", "gpt3-175b", "35MB")
    assert checkpoint["recomputed"] == 2 * n and checkpoint["status"] == "mismatch"   # 37.7 MB, 36.0 MiB
    assert out["flagged"] == sum(c["status"] in ("truncated", "mismatch") for c in out["claims"])


def test_paper_text_flags_and_exit_status(capsys):
    assert main(["count", "--paper"]) == 0                         # flags are information
    text = capsys.readouterr().out
    flags = [line for line in text.splitlines() if line.startswith("  Table 3, GPT-2 M, 0.35M:")]
    assert len(flags) == 1 and f"{lora_params(1024, 24, 4, 2):,}" in flags[0]
    assert any(line.startswith("  Table 2, DeBERTa XXL, 4.7M:") and "r=16" in line for line in text.splitlines())
    assert any(line.startswith("  Table 3, GPT-2 L, 0.77M:") and f"{lora_params(1280, 36, 4, 2):,}" in line
               for line in text.splitlines())
    ok_rows = [line for line in text.splitlines() if line.startswith("Table 2      RoBERTa base  LoRA params")]
    assert len(ok_rows) == 1 and ok_rows[0].rstrip().endswith("ok")
    assert f"ratio {175_255_800_000 / lora_params(12288, 96, 4, 2):,.0f}x" in text


# ============================================================================================
# Bad input
# ============================================================================================


@pytest.mark.parametrize("argv, message", [
    (["gpt5"], "unknown model 'gpt5'"),
    (["gpt2-medium", "--rank", "0"], "--rank must be a positive integer, got 0"),
    (["gpt2-medium", "--rank", "-2"], "--rank must be a positive integer, got -2"),
    (["gpt2-medium", "--rank", "1025"], "--rank must be at most 1024"),
    (["gpt2-medium", "--targets", "q,x"], "unknown target 'x'"),
    (["gpt2-medium", "--targets", "q,q"], "target 'q' is listed twice"),
    (["gpt2-medium", "--targets", ""], "comma-separated list"),
    (["gpt2-medium", "--layers", "3"], "not both"),
    (["--d-model", "64"], "missing --layers"),
    (["--d-model", "0", "--layers", "2"], "--d-model must be a positive integer, got 0"),
    (["--paper", "gpt2-medium"], "--paper audits fixed configurations and takes no MODEL"),
    (["--paper", "--rank", "4"], "takes no --rank"),
    (["--paper", "--ffn", "5"], "--paper audits fixed configurations and takes no --ffn"),
    (["--paper", "--kv-dim", "5"], "--paper audits fixed configurations and takes no --kv-dim"),   # was ignored, exit 0
    (["--paper", "gpt2", "--kv-dim", "5", "--rank", "4"], "takes no MODEL, --kv-dim, --rank"),
])
def test_bad_input_is_refused_with_a_clear_message(capsys, argv, message):
    assert main(["count", *argv]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.out == ""
    assert captured.err.startswith("lora-ref count: ")


def test_non_integer_rank_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["count", "gpt2-medium", "--rank", "four"])
    assert exc.value.code == 2 and "invalid int value: 'four'" in capsys.readouterr().err


# ============================================================================================
# lora_ref.counting helpers
# ============================================================================================


def test_parse_and_round_reported():
    r = parse_reported("175,255.8M")
    assert (r.value, r.unit, r.places) == (175_255_800_000, "M", 1)
    assert round_reported(393_216, parse_reported("0.35M")) == "0.39M"
    mb = parse_reported("35MB")
    n = 2 * lora_params(12288, 96, 4, 2)
    assert round_reported(n, mb) == "38MB" and round_reported(n, mb, binary=True) == "36MiB"
    assert round_reported(18_874_368, parse_reported("18.8M"), "truncate") == "18.8M"
    for bad in ("12", "abcM", "-1M", "1e400X"):
        with pytest.raises(ValueError, match="text must"):
            parse_reported(bad)


def test_classify():
    assert classify(parse_reported("0.3M"), 294_912) == "ok"
    assert classify(parse_reported("0.25M"), 250_000) == "ok"
    assert classify(parse_reported("0.3M"), 250_000) == "ok"          # 0.25 rounds half up to 0.3
    assert classify(parse_reported("0.2M"), 250_000) == "truncated"
    assert classify(parse_reported("0.35M"), 393_216) == "mismatch"
    assert classify(parse_reported("36MB"), 37_748_736) == "ok"       # 36.0 MiB: binary units count too
    assert classify(parse_reported("0.3M"), None) == "n/a"
    with pytest.raises(TypeError, match="reported must be a Reported"):
        classify("0.3M", 294_912)


def test_bytes_and_sizes():
    assert checkpoint_bytes(10, "fp16") == 20 and checkpoint_bytes(10, "fp32") == 40
    assert adam_state_bytes(10) == 80
    assert format_size(999) == "999 B" and format_size(37_748_736) == "37.7 MB"
    assert format_size(37_748_736, binary=True) == "36.0 MiB"
    with pytest.raises(ValueError, match="dtype must be one of fp16, bf16, fp32, got 'fp8'"):
        checkpoint_bytes(10, "fp8")
    with pytest.raises(ValueError, match="n_params must be a non-negative int, got -1"):
        checkpoint_bytes(-1, "fp16")
    with pytest.raises(TypeError, match="n_trainable must be a non-negative int"):
        adam_state_bytes(1.5)


def test_parse_targets():
    assert parse_targets("q,v") == ("q", "v")
    assert parse_targets("o, mlp") == ("o", "mlp_in", "mlp_out")
    assert parse_targets("all") == ("q", "k", "v", "o", "mlp_in", "mlp_out")
    assert parse_targets("v,mlp", GATED_MATRICES) == ("v", "gate", "up", "down")
    assert parse_targets("all", GATED_MATRICES) == GATED_MATRICES
    with pytest.raises(ValueError, match="unknown target 'W_q'"):
        parse_targets("W_q")
    with pytest.raises(ValueError, match="unknown target 'gate': expected some of q, k, v, o, mlp_in, mlp_out"):
        parse_targets("gate")
    with pytest.raises(ValueError, match="unknown target 'mlp_in': expected some of q, k, v, o, gate, up, down"):
        parse_targets("mlp_in", GATED_MATRICES)
    with pytest.raises(ValueError, match="target 'v' is listed twice"):
        parse_targets("v,all")


def test_lora_parameters_and_target_shapes():
    assert target_shape("q", 8, 20) == target_shape("o", 8, 20) == (8, 8)
    assert target_shape("mlp_in", 8, 20) == (20, 8) and target_shape("mlp_out", 8, 20) == (8, 20)
    # L r (d_in + d_out) per target: Section 5.1 for q, v; an MLP matrix (F, d) or (d, F) has L r (d + F)
    assert lora_parameters("q,mlp", 3, d_model=8, layers=2, ffn_width=20) == {
        "q": 2 * 2 * 8 * 3, "mlp_in": 2 * 3 * (8 + 20), "mlp_out": 2 * 3 * (8 + 20)}
    assert lora_parameters(("v",), 1, d_model=4, layers=1, ffn_width=16) == {"v": 8}
    with pytest.raises(ValueError, match="target must be one of q, k, v, o, mlp_in, mlp_out, gate, up, down, got 'qkv'"):
        target_shape("qkv", 8, 20)
    with pytest.raises(ValueError, match="rank must be a positive int, got 0"):
        lora_parameters("q", 0, d_model=8, layers=2, ffn_width=20)
    with pytest.raises(TypeError, match="layers must be a positive int"):
        lora_parameters("q", 1, d_model=8, layers=2.0, ffn_width=20)


@pytest.mark.parametrize("preset", ["gpt2-medium", "gpt2-large"])
def test_lora_parameters_equal_the_adapters_transformer_ref_allocates(preset):
    # a second implementation: transformer_ref counts the adapters it would add to the real GPT-2
    # config (fused c_attn adapted per q/k/v block, o = attn.c_proj, mlp = c_fc and mlp.c_proj)
    from transformer_ref import GPTConfig
    from transformer_ref.count import count_parameters, lora_config_for

    p = PRESETS[preset]
    targets = ("q", "k", "v", "o", "mlp_in", "mlp_out")
    by_type = count_parameters(GPTConfig(**p.config), lora_config_for(targets, 8))["lora_by_type"]
    assert lora_parameters(targets, 8, d_model=p.d_model, layers=p.layers, ffn_width=p.ffn_width) == by_type


def test_encoder_counters_match_the_formulas_and_refuse_other_architectures():
    assert roberta_parameters(PRESETS["roberta-base"].config) == roberta_backbone(768, 12, 3072)
    assert deberta_v2_parameters(PRESETS["deberta-xxlarge"].config) == deberta_xxl_backbone()
    with pytest.raises(ValueError, match="config is missing 'vocab_size'"):
        roberta_parameters({"hidden_size": 8})
    with pytest.raises(ValueError, match="position_biased_input must be False"):
        deberta_v2_parameters({**PRESETS["deberta-xxlarge"].config, "position_biased_input": True})
    with pytest.raises(TypeError, match="config must be a mapping"):
        roberta_parameters([1, 2])


# ============================================================================================
# LLaMA presets, the common settings table, the overview
# ============================================================================================


@pytest.mark.parametrize("preset", list(LLAMA))
def test_llama_presets(capsys, preset):
    V, d, F, L, H, Hk = LLAMA[preset]
    out = run_json(capsys, preset, "--targets", "all", "--rank", "16")
    assert (out["d_model"], out["layers"], out["ffn_width"], out["kv_dim"]) == (d, L, F, Hk * (d // H))
    seven = ("q", "k", "v", "o", "gate", "up", "down")
    assert out["lora"]["params_by_target"] == llama_lora(d, F, L, H, Hk, 16, seven)
    full = llama_params(V, d, F, L, H, Hk)
    assert out["full"]["params"] == full and out["full"]["exact"] is True
    assert out["full"]["checkpoint_bytes"] == {"fp16": 2 * full, "fp32": 4 * full}
    rows = {(tuple(c["targets"]), c["rank"]): c for c in out["common"]}
    assert list(rows) == [(("q", "v"), r) for r in (8, 16, 64)] + [(seven, r) for r in (8, 16, 64)]
    for (targets, r), row in rows.items():
        n = sum(llama_lora(d, F, L, H, Hk, r, targets).values())
        assert row["params"] == n and row["checkpoint_bytes"] == {"fp16": 2 * n, "fp32": 4 * n}
        assert row["adam_state_bytes"] == 8 * n


def test_llama_text_and_mlp_alias(capsys):
    assert main(["count", "llama-2-70b", "--targets", "q,mlp", "--rank", "8"]) == 0
    text = capsys.readouterr().out
    V, d, F, L, H, Hk = LLAMA["llama-2-70b"]
    lora = llama_lora(d, F, L, H, Hk, 8, ("q", "gate", "up", "down"))
    assert "k/v width 1024" in text and f"= {sum(lora.values()):,} parameters (A and B)" in text
    n = sum(llama_lora(d, F, L, H, Hk, 64, ("q", "k", "v", "o", "gate", "up", "down")).values())
    assert any(line.startswith("r=64 on q,k,v,o,gate,up,down") and f"{n:,}" in line for line in text.splitlines())
    assert main(["count", "llama-3-8b", "--targets", "mlp_in"]) == 2
    assert "unknown target 'mlp_in': expected some of q, k, v, o, gate, up, down" in capsys.readouterr().err
    # explicit sizes: --kv-dim narrows k and v; gate/up/down name a gated MLP
    out = run_json(capsys, "--d-model", "64", "--layers", "2", "--ffn", "96", "--kv-dim", "16", "--targets", "k,down",
                   "--rank", "4")
    assert out["lora"]["params_by_target"] == {"k": 2 * 4 * (64 + 16), "down": 2 * 4 * (96 + 64)}
    assert main(["count", "--d-model", "64", "--layers", "2", "--kv-dim", "16", "--targets", "k", "--rank", "17"]) == 2
    assert "--rank must be at most 16" in capsys.readouterr().err


def test_gpt2_small_preset(capsys):
    out = run_json(capsys, "gpt2", "--targets", "q,v", "--rank", "8")
    assert out["full"]["params"] == gpt2_params(768, 12) == 124_439_808      # transformers' GPT2LMHeadModel
    assert out["lora"]["params"] == lora_params(768, 12, 8, 2)
    assert {tuple(c["targets"]) for c in out["common"]} == {("q", "v"), ("q", "k", "v", "o", "mlp_in", "mlp_out")}


def test_count_without_arguments_lists_the_presets_and_the_audit(capsys):
    """Issue 11, item 13: ``lora-ref count`` alone no longer fails."""
    assert main(["count"]) == 0
    text = capsys.readouterr().out
    for name, preset in PRESETS.items():
        assert any(line.startswith(f"  {name} ") and preset.label in line for line in text.splitlines()), name
    assert f"{llama_params(*LLAMA['llama-3-8b']):,} parameters" in text
    audit = run_json(capsys, "--paper")
    n_mis = sum(c["status"] == "mismatch" for c in audit["claims"])
    assert (f"of {len(audit['claims'])} figures, {audit['flagged']} do not recompute as printed ({n_mis} mismatch, "
            f"{audit['flagged'] - n_mis} truncated)") in text
    out = run_json(capsys)
    assert [p["model"] for p in out["presets"]] == list(PRESETS) and out["paper"]["flagged"] == audit["flagged"]


@pytest.mark.parametrize("preset", ["llama-2-70b", "llama-3-8b"])
def test_llama_lora_parameters_equal_the_adapters_transformer_ref_allocates(preset):
    from transformer_ref import LlamaConfig
    from transformer_ref.count import count_parameters, lora_config_for

    p = PRESETS[preset]
    by_type = count_parameters(LlamaConfig(**p.config), lora_config_for(GATED_MATRICES, 8, family="llama"))["lora_by_type"]
    assert lora_parameters("all", 8, d_model=p.d_model, layers=p.layers, ffn_width=p.ffn_width, kv_dim=p.kv_dim,
                           matrices=p.matrices) == by_type


# ============================================================================================
# --qlora: 4-bit weights, their constants, adapters, Adam (Dettmers et al. 2023)
# ============================================================================================


def bnb_bytes(n: int, double_quant: bool) -> int:
    """What bitsandbytes stores for a weight of n values in blocks of 64 (n a multiple of 64 here):
    n / 2 bytes of codes, the 16 float32 levels, and one float32 absmax per block; or with double
    quantisation one uint8 per block, a float32 per 256 blocks, the 256 float32 map, the offset."""
    nb = n // 64
    return n // 2 + 64 + (nb + 4 * -(-nb // 256) + 1024 + 4 if double_quant else 4 * nb)


def test_qlora_llama_65b(capsys):
    V, d, F, L, H, Hk = LLAMA["llama-65b"]
    out = run_json(capsys, "--qlora")
    full = llama_params(V, d, F, L, H, Hk)
    weights = [d * d] * 2 + [d * (Hk * d // H)] * 2 + [d * F] * 3          # q, o; k, v; gate, up, down
    quantised = L * sum(weights)
    lora = sum(llama_lora(d, F, L, H, Hk, 64, ("q", "k", "v", "o", "gate", "up", "down")).values())
    assert (out["model"], out["params"], out["quantised_params"], out["quantised_weights"]) == \
        ("llama-65b", full, quantised, 7 * L)
    assert (out["rank"], out["lora_params"]) == (64, lora)
    b = out["bytes"]
    assert b["codes"] == quantised // 2 and b["rest_bf16"] == 2 * (full - quantised)
    for dq, key in ((True, "constants_double_quant"), (False, "constants_float32")):
        assert b[key] == L * sum(bnb_bytes(n, dq) for n in weights) - quantised // 2
    assert b["adapters_bf16"] == b["adapter_gradients_bf16"] == 2 * lora and b["adam_state"] == 8 * lora
    common = quantised // 2 + 2 * (full - quantised) + 4 * lora + 8 * lora
    assert out["total_bytes"] == {"double_quant": common + b["constants_double_quant"],
                                  "float32_constants": common + b["constants_float32"]}
    assert out["full_16bit_bytes"] == 12 * full and out["peft_float32_extra_bytes"] == 4 * lora
    bits = out["constants_bits"]
    assert (bits["formula_float32"], bits["formula_double_quant"]) == (32 / 64, 8 / 64 + 32 / (64 * 256))
    assert bits["stored_double_quant"] == 8 * b["constants_double_quant"] / quantised
    assert [c["source"] for c in out["claims"]] == ["Section 3", "Section 1", "Abstract"]
    assert all(c["status"] == "ok" for c in out["claims"])
    assert 12 * full > 780 * 10**9 and out["total_bytes"]["double_quant"] < 48 * 10**9    # the claims, by hand


def test_qlora_text_and_other_presets(capsys):
    assert main(["count", "--qlora"]) == 0
    text = capsys.readouterr().out
    V, d, F, L, H, Hk = LLAMA["llama-65b"]
    assert f"{12 * llama_params(V, d, F, L, H, Hk):,} bytes" in text and text.count(": ok") == 3
    out = run_json(capsys, "gpt2", "--qlora", "--targets", "q,v", "--rank", "8")
    C, F, L = DIMS["gpt2"][0], DIMS["gpt2"][2], DIMS["gpt2"][1]
    weights = [3 * C * C, C * C, F * C, C * F]                       # c_attn is one (3C, C) weight
    assert out["quantised_weights"] == 4 * L and out["quantised_params"] == L * sum(weights)
    assert out["bytes"]["constants_double_quant"] == L * sum(bnb_bytes(n, True) - n // 2 for n in weights)
    assert out["lora_params"] == lora_params(C, L, 8, 2) and [c["source"] for c in out["claims"]] == ["Section 3"]


@pytest.mark.parametrize("argv,match", [
    (["--qlora", "--paper"], "two audits"),
    (["--qlora", "--d-model", "64", "--layers", "2"], "counts a preset"),
    (["roberta-base", "--qlora"], "GPT-2 and LLaMA presets"),
    (["--qlora", "--rank", "9000"], "--rank must be at most"),
    (["--qlora", "--targets", "mlp_in"], "--targets"),
])
def test_qlora_refusals(capsys, argv, match):
    assert main(["count", *argv]) == 2
    assert match in capsys.readouterr().err


def test_quant_bytes_is_what_a_quant_state_stores():
    import numpy as np

    from lora_ref import quant as q
    from lora_ref.counting import constants_bits, quant_bytes

    for shape in [(7,), (33,), (2, 48), (64, 64), (300, 70), (96, 224)]:
        W = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        for blocksize in (64, 256):
            for dq in (False, True):
                assert quant_bytes(shape, blocksize, dq) == q.quantize_4bit(W, blocksize, "nf4", dq).storage_bytes()
    assert (constants_bits(64, False), constants_bits(64, True)) == (0.5, 0.126953125)
