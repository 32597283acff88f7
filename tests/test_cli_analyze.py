"""``lora-ref analyze``: the numbers it prints are lora_ref.analysis's, read from real PEFT files."""

from __future__ import annotations

import errno
import json
import os
import pathlib

import numpy as np
import pytest
import safetensors.numpy

from lora_ref import LoraConfig
from lora_ref.analysis import similarity_grid, spectrum
from lora_ref.cli import main
from lora_ref.peft_io import save_peft_adapter

MODULES = ("model.layers.0.q_proj", "model.layers.0.v_proj", "model.layers.1.q_proj")


def make_adapter(path, seed, r=4, alpha=8.0, modules=MODULES, dtype=np.float64, zero_b=False):
    """A PEFT adapter directory with random factors (d_in = 24, d_out = 16); returns its dicts."""
    rng = np.random.default_rng(seed)
    cfg = LoraConfig(r=r, alpha=alpha, target_modules=["q_proj", "v_proj"],
                     rank_pattern={"layers.1.q_proj": r + 2})
    adapters = {}
    for m in modules:
        rank = cfg.rank_for(m)
        B = np.zeros((16, rank)) if zero_b else rng.standard_normal((16, rank))
        adapters[m] = {"A": rng.standard_normal((rank, 24)).astype(dtype), "B": B.astype(dtype)}
    save_peft_adapter(path, cfg, adapters)
    return cfg, adapters


def run_json(capsys, *argv):
    assert main(["analyze", *map(str, argv), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_report_matches_the_library(tmp_path, capsys):
    cfg, adapters = make_adapter(tmp_path / "ad", seed=0)
    out = run_json(capsys, tmp_path / "ad", "--top", "3", "--energy-at", "1", "5")
    assert sorted(out["modules"]) == sorted(MODULES)
    for module, pair in adapters.items():
        row = out["modules"][module]
        # The command must print exactly what the library computes for the stored factors
        # (float64 files, analysed in float64: the same calls on the same numbers).
        spec = spectrum(pair["A"], pair["B"], cfg.scale_for(module))
        assert row["shape"] == [16, 24] and row["r"] == pair["A"].shape[0]
        assert row["scale"] == cfg.scale_for(module)
        assert row["singular_values"] == [float(v) for v in spec.singular_values[:3]]
        assert (row["numerical_rank"], row["effective_rank"], row["stable_rank"]) == (
            spec.numerical_rank, spec.effective_rank, spec.stable_rank)
        assert row["energy_at"] == {"1": spec.energy_at(1), "5": spec.energy_at(5)}
    assert out["modules"]["model.layers.1.q_proj"]["r"] == 6                 # rank_pattern honoured


def test_text_report(tmp_path, capsys):
    make_adapter(tmp_path / "ad", seed=1)
    assert main(["analyze", str(tmp_path / "ad")]) == 0
    text = capsys.readouterr().out
    assert "3 module(s), r=4, alpha=8" in text
    for module in MODULES:
        assert module in text
    assert "E@1" in text and "E@4" in text


def test_compare_reports_phi(tmp_path, capsys):
    _, first = make_adapter(tmp_path / "one", seed=2)
    _, second = make_adapter(tmp_path / "two", seed=3, r=2, modules=MODULES[:2])
    # The command reports what similarity_grid computes (its correctness is tested in
    # test_analysis.py); here: the plumbing, the summary cells and the module bookkeeping.
    out = run_json(capsys, tmp_path / "one", "--compare", tmp_path / "two")
    cmp = out["compare"]
    assert cmp["only_in_adapter"] == ["model.layers.1.q_proj"] and cmp["only_in_other"] == []
    for module in MODULES[:2]:
        row = cmp["modules"][module]
        grid = similarity_grid(first[module]["A"], second[module]["A"])
        assert row["grid"] == grid.tolist()
        assert (row["r1"], row["r2"], row["d_in"], row["p"]) == (4, 2, 24, 2)
        assert row["phi_1_1"] == grid[0, 0] and row["phi_p_p"] == grid[1, 1]
        assert row["random_baseline_p_p"] == 2 / 24


def test_zero_update_and_nan_become_null(tmp_path, capsys):
    make_adapter(tmp_path / "ad", seed=4, zero_b=True)                      # B = 0: a fresh adapter
    out = run_json(capsys, tmp_path / "ad")
    row = out["modules"][MODULES[0]]
    assert row["numerical_rank"] == 0 and row["energy_at"]["1"] is None


def test_float32_files_and_dtype_option(tmp_path, capsys):
    cfg, adapters = make_adapter(tmp_path / "ad", seed=5, dtype=np.float32)
    out = run_json(capsys, tmp_path / "ad", "--dtype", "float32")
    pair = adapters[MODULES[0]]
    spec = spectrum(pair["A"], pair["B"], cfg.scale_for(MODULES[0]))
    assert out["modules"][MODULES[0]]["singular_values"] == [float(v) for v in spec.singular_values]
    out64 = run_json(capsys, tmp_path / "ad")                                # widened exactly to float64
    spec64 = spectrum(pair["A"].astype(np.float64), pair["B"].astype(np.float64), cfg.scale_for(MODULES[0]))
    assert out64["modules"][MODULES[0]]["singular_values"] == [float(v) for v in spec64.singular_values]


def test_plots(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    make_adapter(tmp_path / "one", seed=6)
    make_adapter(tmp_path / "two", seed=7)
    assert main(["analyze", str(tmp_path / "one"), "--plot", str(tmp_path / "s.png")]) == 0
    assert main(["analyze", str(tmp_path / "one"), "--compare", str(tmp_path / "two"),
                 "--plot", str(tmp_path / "phi.png")]) == 0
    for name in ("s.png", "phi.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "plot written to" in capsys.readouterr().out


def one_error_line(capsys) -> str:
    """What the command printed, which must be one line on stderr and nothing on stdout."""
    out = capsys.readouterr()
    assert out.out == "" and out.err.count("\n") == 1 and out.err.startswith("lora-ref analyze: "), out
    return out.err


def test_errors(tmp_path, capsys):
    # Issue 11, item 12: errors go to stderr, as one line.
    assert main(["analyze", str(tmp_path / "missing")]) == 1
    assert "does not exist" in one_error_line(capsys)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "adapter_config.json").write_text("{not json")
    (tmp_path / "broken" / "adapter_model.safetensors").write_bytes(b"")
    assert main(["analyze", str(tmp_path / "broken")]) == 1
    assert "not valid JSON" in one_error_line(capsys)
    make_adapter(tmp_path / "ad", seed=8)
    assert main(["analyze", str(tmp_path / "ad"), "--top", "0"]) == 2
    assert "--top must be a positive integer" in one_error_line(capsys)
    assert main(["analyze", str(tmp_path / "ad"), "--compare", str(tmp_path / "missing")]) == 1
    assert "missing' does not exist" in one_error_line(capsys)
    # Different d_in in the two adapters: reported per module, not a crash.
    rng = np.random.default_rng(9)
    cfg = LoraConfig(r=4, alpha=8.0, target_modules=["q_proj"])
    save_peft_adapter(tmp_path / "wide", cfg, {MODULES[0]: {"A": rng.standard_normal((4, 30)),
                                                            "B": rng.standard_normal((16, 4))}})
    out = run_json(capsys, tmp_path / "ad", "--compare", tmp_path / "wide")
    assert "same d_in" in out["compare"]["modules"][MODULES[0]]["error"]


@pytest.mark.parametrize("dtype", [np.int32, np.bool_, np.complex64])
def test_integer_bool_and_complex_adapters_are_refused(tmp_path, capsys, dtype):
    # Issue 11, item 1: analyze cast an int32 adapter to float64 and exited 0.
    make_adapter(tmp_path / "ad", seed=10)
    path = tmp_path / "ad" / "adapter_model.safetensors"
    tensors = safetensors.numpy.load_file(str(path))
    safetensors.numpy.save_file({k: (v * 1000).astype(dtype) for k, v in tensors.items()}, str(path))
    for extra in ([], ["--dtype", "float32"]):
        assert main(["analyze", str(tmp_path / "ad"), *extra]) == 1
        out = capsys.readouterr()
        assert "not a floating-point type" in out.out + out.err


def test_unreadable_files_and_unwritable_plots_are_one_line(tmp_path, capsys, monkeypatch):
    # Issue 11, item 12: an OSError was a traceback (reading) or went to stdout (the plot).
    pytest.importorskip("matplotlib")
    make_adapter(tmp_path / "ad", seed=11)
    weights = tmp_path / "ad" / "adapter_model.safetensors"
    real = pathlib.Path.read_bytes

    def read_bytes(self):                       # as a file without read permission (root reads anyway)
        if self == weights:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real(self)

    with monkeypatch.context() as patch:
        patch.setattr(pathlib.Path, "read_bytes", read_bytes)
        assert main(["analyze", str(tmp_path / "ad")]) == 1
    assert one_error_line(capsys) == f"lora-ref analyze: cannot read {str(weights)!r}: Permission denied\n"
    (tmp_path / "file").write_text("")
    assert main(["analyze", str(tmp_path / "ad"), "--plot", str(tmp_path / "file" / "s.png")]) == 1
    assert one_error_line(capsys) == (f"lora-ref analyze: cannot write the plot {str(tmp_path / 'file' / 's.png')!r}: "
                                      "Not a directory\n")


# --------------------------------------------------------------------------------------------
# Variants: DoRA, embedding and convolution adapters; several adapters in one directory
# --------------------------------------------------------------------------------------------


def stats(v):
    return {"min": float(np.min(v)), "median": float(np.median(v)), "max": float(np.max(v))}


def test_dora_magnitudes_and_their_relation_to_the_base(tmp_path, capsys):
    import transformer_ref as tr

    config = tr.GPTConfig(vocab_size=16, n_positions=8, n_embd=8, n_layer=2, n_head=2)
    params = tr.init_params(config, seed=0, dtype="float64")
    tr.save_hf_gpt2(tmp_path / "base", config, params)
    cfg = LoraConfig(r=2, alpha=4.0, target_modules=["c_fc"], fan_in_fan_out=True, init="random", use_dora=True)
    adapters = tr.add_adapters(params, config, cfg, rng=3)
    adapters = {m: {**p, "m": p["m"] * np.linspace(0.5, 1.5, p["m"].shape[0])} for m, p in adapters.items()}
    save_peft_adapter(tmp_path / "dora", cfg, adapters)
    out = run_json(capsys, tmp_path / "dora")
    for module, p in adapters.items():
        row = out["modules"][module]
        spec = spectrum(p["A"], p["B"], 2.0)                      # the direction's update s B A
        assert row["kind"] == "dora" and row["singular_values"] == [float(v) for v in spec.singular_values[:4]]
        assert row["magnitude"] == stats(p["m"]) and "m_over_row_norm" not in row
    out = run_json(capsys, tmp_path / "dora", "--base", tmp_path / "base")
    for module, p in adapters.items():
        W = params[module + ".weight"]                            # (d_out, d_in)
        row = out["modules"][module]
        assert row["m_over_row_norm"] == stats(p["m"] / np.linalg.norm(W, axis=1))
        assert row["m_over_adapted_row_norm"] == stats(p["m"] / np.linalg.norm(W + 2.0 * p["B"] @ p["A"], axis=1))
    assert main(["analyze", str(tmp_path / "dora"), "--base", str(tmp_path / "base")]) == 0
    text = capsys.readouterr().out
    assert "DoRA magnitudes m (min / median / max over the output rows):" in text and "m / ||W||_row" in text
    assert main(["analyze", str(tmp_path / "dora")]) == 0
    assert "--base MODEL_DIR relates them to the base's row norms" in capsys.readouterr().out


def test_embedding_and_conv_adapters(tmp_path, capsys):
    rng = np.random.default_rng(12)
    cfg = LoraConfig(r=4, alpha=2.0, target_modules=["embed_tokens", "c1", "c2"], embedding_modules=["embed_tokens"])
    adapters = {"model.embed_tokens": {"A": rng.standard_normal((4, 40)), "B": rng.standard_normal((12, 4))},
                "c1": {"A": rng.standard_normal((4, 6, 3)), "B": rng.standard_normal((8, 2, 1))},      # groups 2
                "c2": {"A": rng.standard_normal((4, 3, 2, 2)), "B": rng.standard_normal((5, 4, 1, 1))}}
    save_peft_adapter(tmp_path / "ad", cfg, adapters)
    out = run_json(capsys, tmp_path / "ad")
    emb = out["modules"]["model.embed_tokens"]
    assert emb["kind"] == "embedding" and emb["shape"] == [12, 40]          # s B A is (D, V)
    # A convolution's delta on each input patch: out[o] = s sum_j B2[o, j] (A_j . patch) with
    # B2[o, j] = B[o, j - g r/G] when j is in output o's group g = o // (C_out/G), else 0.
    for module, groups in (("c1", 2), ("c2", 1)):
        A, B = adapters[module]["A"], adapters[module]["B"]
        r, C_out = A.shape[0], B.shape[0]
        o, j = np.meshgrid(np.arange(C_out), np.arange(r), indexing="ij")
        same_group = (o // (C_out // groups)) == (j // (r // groups))
        B2 = np.where(same_group, B.reshape(C_out, -1)[o, j % (r // groups)], 0.0)              # (C_out, r)
        spec = spectrum(A.reshape(r, -1), B2, 0.5)
        row = out["modules"][module]
        assert row["kind"] == "conv" and row["shape"] == [C_out, int(np.prod(A.shape[1:]))]
        assert row["singular_values"] == [float(v) for v in spec.singular_values[:4]]
    assert main(["analyze", str(tmp_path / "ad")]) == 0
    text = capsys.readouterr().out
    assert "c1: convolution adapter: s B A as the (C_out, C_in K) = 8 x 18 matrix applied to each input patch, " \
           "B block-diagonal over 2 groups" in text
    assert "model.embed_tokens: embedding adapter: s B A is (D, V) = 12 x 40" in text


def test_several_adapters_get_one_report_each(tmp_path, capsys):
    from lora_ref.peft_io import load_peft_adapters, save_peft_adapters

    first, second = make_adapter(tmp_path / "a", seed=13), make_adapter(tmp_path / "b", seed=14, r=2)
    save_peft_adapters(tmp_path / "set", {"default": first, "other": second})
    out = run_json(capsys, tmp_path / "set")
    assert list(out["adapters"]) == ["default", "other"] and "modules" not in out
    assert out["adapters"]["other"]["path"] == str(tmp_path / "set" / "other")
    for name, (cfg, adapters) in load_peft_adapters(tmp_path / "set").items():
        for module, p in adapters.items():
            spec = spectrum(p["A"], p["B"], cfg.scale_for(module))
            assert out["adapters"][name]["modules"][module]["singular_values"] == [
                float(v) for v in spec.singular_values[:4]]
    assert main(["analyze", str(tmp_path / "set")]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"{tmp_path / 'set'}: 2 adapters (default, other), one report each")
    assert "=== adapter 'default'" in text and "=== adapter 'other'" in text
    assert main(["analyze", str(tmp_path / "set"), "--compare", str(tmp_path / "a")]) == 2
    assert "--compare compares two single adapters" in one_error_line(capsys)


# --------------------------------------------------------------------------------------------
# A LLaMA base: the module names model.layers.*.self_attn.* / mlp.*, nn.Linear (d_out, d_in)
# --------------------------------------------------------------------------------------------


def llama_base(path):
    """A tiny LLaMA checkpoint written by save_hf_llama (GQA: H = 4, H_kv = 2, so k/v are 8 wide)."""
    import transformer_ref as tr

    config = tr.LlamaConfig(vocab_size=11, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8)
    params = tr.init_params(config, seed=0, dtype="float64")
    tr.save_hf_llama(path, config, params)
    return config, params


LLAMA_TARGETS = ["q_proj", "v_proj", "down_proj"]
LLAMA_MODULES = sorted(f"model.layers.{i}.{kind}" for i in range(2)
                       for kind in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"))


@pytest.mark.parametrize("use_dora", [True, False], ids=["dora", "lora"])
def test_llama_base(tmp_path, capsys, use_dora):
    import transformer_ref as tr

    config, params = llama_base(tmp_path / "base")
    cfg = LoraConfig(r=2, alpha=4.0, target_modules=LLAMA_TARGETS, init="random", use_dora=use_dora,
                     rank_pattern={"down_proj": 3})
    adapters = tr.add_adapters(params, config, cfg, rng=3)
    assert sorted(adapters) == LLAMA_MODULES
    if use_dora:                     # a trained magnitude: away from its initial ||W + s B A||_row
        adapters = {m: {**p, "m": p["m"] * np.linspace(0.5, 1.5, p["m"].shape[0])} for m, p in adapters.items()}
    save_peft_adapter(tmp_path / "ad", cfg, adapters)
    assert main(["analyze", str(tmp_path / "ad"), "--base", str(tmp_path / "base"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert sorted(out["modules"]) == LLAMA_MODULES
    for module, p in adapters.items():
        row, W, s = out["modules"][module], params[module + ".weight"], cfg.scale_for(module)   # W (d_out, d_in)
        spec = spectrum(p["A"], p["B"], s)
        assert row["kind"] == ("dora" if use_dora else "linear") and row["shape"] == list(W.shape)
        assert row["r"] == (3 if module.endswith("down_proj") else 2) and row["scale"] == s
        assert row["singular_values"] == [float(v) for v in spec.singular_values[:4]]
        if not use_dora:
            assert "magnitude" not in row and "m_over_row_norm" not in row
            continue
        assert row["magnitude"] == stats(p["m"])
        assert row["m_over_row_norm"] == stats(p["m"] / np.linalg.norm(W, axis=1))
        assert row["m_over_adapted_row_norm"] == stats(p["m"] / np.linalg.norm(W + s * (p["B"] @ p["A"]), axis=1))
        assert row["m_over_adapted_row_norm"]["min"] < 0.75 and row["m_over_adapted_row_norm"]["max"] > 1.25
    assert out["modules"]["model.layers.0.self_attn.v_proj"]["shape"] == [8, 16]      # GQA: 2 kv heads of 4, d_in 16
    assert main(["analyze", str(tmp_path / "ad"), "--base", str(tmp_path / "base")]) == 0
    text = capsys.readouterr().out
    assert all(module in text for module in LLAMA_MODULES)
    assert ("m / ||W + s B A||_row" in text) == use_dora
