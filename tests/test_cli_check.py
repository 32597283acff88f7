"""``lora-ref check ADAPTER_DIR --base MODEL_DIR`` (no PyTorch): a tiny GPT-2 written by
``save_hf_gpt2``, adapters written by ``save_peft_adapter``, the command run in-process.

The printed numbers are checked against an independent computation formatted the same way:
the scale from PEFT's formula (alpha / r, or alpha / sqrt(r)), and the relative change from the
dense product, ``|s B A|_F / |W|_F`` with ``numpy.linalg.norm`` (the command itself never forms
B A). Both are printed to 4 significant digits, far coarser than the float64 rounding that
separates the two computations, so the strings agree exactly.
"""

from __future__ import annotations

import errno
import json
import math
import os
import pathlib
import re

import numpy as np
import pytest
import safetensors.numpy

import transformer_ref as tr
from lora_ref import LoraConfig
from lora_ref.cli import main
from lora_ref.peft_io import CONFIG_NAME, KEY_PREFIX, WEIGHTS_NAME, save_peft_adapter
from transformer_ref import save_hf_gpt2

CONFIG = tr.GPTConfig(vocab_size=16, n_positions=8, n_embd=8, n_layer=2, n_head=2)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    params = tr.init_params(CONFIG, seed=0, dtype="float64")
    path = tmp_path_factory.mktemp("base") / "gpt2"
    save_hf_gpt2(path, CONFIG, params)
    return path, params


def write_adapter(path, params, lcfg, seed=0):
    """Adapters from add_adapters with B scaled by 2**-10 (exactly), so that |s B A| is a small
    fraction of |W| as after training (init "random" draws B ~ U(+-1/sqrt(r)), as large as A)."""
    adapters = tr.add_adapters(params, CONFIG, lcfg, rng=seed)
    adapters = {m: {"A": p["A"], "B": p["B"] * 2.0**-10} for m, p in adapters.items()}
    save_peft_adapter(path, lcfg, adapters)
    return adapters


def run_check(capsys, adapter, base_path):
    code = main(["check", str(adapter), "--base", str(base_path)])
    out = capsys.readouterr()
    return code, out.out, out.err


def rows(out: str) -> dict[str, list[str]]:
    """The module table: module name -> its columns."""
    return {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("transformer.h.")}


def test_valid_adapter_reports_scales_and_changes(base, tmp_path, capsys):
    base_path, params = base
    lcfg = LoraConfig(r=2, alpha=6.0, target_modules=["c_attn", "mlp.c_proj"], fan_in_fan_out=True, init="random",
                      rank_pattern={"h.1.attn.c_attn": 3}, alpha_pattern={"mlp.c_proj": 1.5})
    adapters = write_adapter(tmp_path / "ad", params, lcfg)
    code, out, err = run_check(capsys, tmp_path / "ad", base_path)
    assert code == 0, err
    table = rows(out)
    assert sorted(table) == sorted(adapters)
    for module, pair in adapters.items():
        alpha = 1.5 if module.endswith("mlp.c_proj") else 6.0                 # alpha_pattern, else lora_alpha
        r = 3 if module == "transformer.h.1.attn.c_attn" else 2               # rank_pattern, else r
        W = params[module + ".weight"]
        change = np.linalg.norm((alpha / r) * (pair["B"] @ pair["A"])) / np.linalg.norm(W)
        _, shape_out, _, shape_in, r_col, alpha_col, scale_col, change_col = table[module]
        assert (int(shape_out), int(shape_in)) == W.shape and int(r_col) == r
        assert alpha_col == f"{alpha:g}" and scale_col == f"{alpha / r:.4g}" and change_col == f"{change:.3e}"
    assert "OK: the adapter is valid for this base model (0 warnings)" in out
    assert "warnings (" not in out


def test_untrained_adapter_and_large_rank_and_rslora_are_flagged(base, tmp_path, capsys):
    base_path, params = base
    lcfg = LoraConfig(r=9, alpha=3.0, target_modules=["attn.c_proj"], fan_in_fan_out=True, use_rslora=True,
                      init="kaiming")                                       # B = 0; r = 9 > n_embd = 8
    write_adapter(tmp_path / "ad", params, lcfg)
    code, out, err = run_check(capsys, tmp_path / "ad", base_path)
    assert code == 0, err
    for i in range(CONFIG.n_layer):
        assert f"transformer.h.{i}.attn.c_proj: B is all zero" in out
        assert f"transformer.h.{i}.attn.c_proj: rank 9 exceeds min(d_out, d_in) = 8" in out
    assert f"alpha/sqrt(r) = {3 / math.sqrt(9):.4g} vs alpha/r = {3 / 9:.4g}" in out
    assert "some inference engines ignore use_rslora" in out
    assert re.search(r"OK: the adapter is valid for this base model \(5 warnings\)", out)


def test_fan_in_fan_out_false_is_flagged(base, tmp_path, capsys):
    base_path, params = base
    write_adapter(tmp_path / "ad", params, LoraConfig(r=2, alpha=2.0, target_modules=["c_fc"], init="random"))
    code, out, _ = run_check(capsys, tmp_path / "ad", base_path)
    assert code == 0 and "fan_in_fan_out is false" in out


def test_adapter_for_another_model_is_invalid(base, tmp_path, capsys):
    base_path, _ = base
    wide = tr.GPTConfig(vocab_size=16, n_positions=8, n_embd=12, n_layer=2, n_head=2)
    lcfg = LoraConfig(r=2, alpha=2.0, target_modules=["c_attn"], fan_in_fan_out=True, init="random")
    save_peft_adapter(tmp_path / "ad", lcfg, tr.add_adapters(tr.init_params(wide, seed=1), wide, lcfg, rng=1))
    code, out, err = run_check(capsys, tmp_path / "ad", base_path)
    assert code == 1 and "OK" not in out
    assert re.search(r"transformer\.h\.0\.attn\.c_attn.*\(24, 8\).*A must be \(2, 8\).*got A \(2, 12\)", err)
    assert "INVALID" in err


def test_unimplemented_feature_is_invalid(base, tmp_path, capsys):
    base_path, params = base
    write_adapter(tmp_path / "ad", params, LoraConfig(r=2, alpha=2.0, target_modules=["c_attn"], init="random"))
    raw = json.loads((tmp_path / "ad" / CONFIG_NAME).read_text())
    raw["lora_bias"] = True
    (tmp_path / "ad" / CONFIG_NAME).write_text(json.dumps(raw))
    code, _, err = run_check(capsys, tmp_path / "ad", base_path)
    assert code == 1 and "lora_bias=True is not implemented" in err


def test_non_finite_values_are_invalid(base, tmp_path, capsys):
    base_path, params = base
    write_adapter(tmp_path / "ad", params, LoraConfig(r=2, alpha=2.0, target_modules=["c_fc"], init="random"))
    tensors = safetensors.numpy.load_file(str(tmp_path / "ad" / WEIGHTS_NAME))
    key = f"{KEY_PREFIX}transformer.h.1.mlp.c_fc.lora_A.weight"
    tensors[key] = np.where(np.eye(*tensors[key].shape) > 0, np.nan, tensors[key])
    safetensors.numpy.save_file(tensors, str(tmp_path / "ad" / WEIGHTS_NAME))
    code, _, err = run_check(capsys, tmp_path / "ad", base_path)
    assert code == 1 and key in err and "2 non-finite value(s)" in err


def test_missing_directories_are_reported(base, tmp_path, capsys):
    base_path, _ = base
    code, _, err = run_check(capsys, tmp_path / "nothing", base_path)
    assert code == 1 and "does not exist" in err
    code, _, err = run_check(capsys, tmp_path / "nothing", tmp_path / "no-base")
    assert code == 1 and "base model" in err and "does not exist" in err


def test_base_is_required(capsys):
    with pytest.raises(SystemExit) as info:
        main(["check", "somewhere"])
    assert info.value.code == 2 and "--base" in capsys.readouterr().err


def test_change_larger_than_the_weight_is_flagged(base, tmp_path, capsys):
    base_path, params = base
    lcfg = LoraConfig(r=2, alpha=64.0, target_modules=["attn.c_proj"], fan_in_fan_out=True, init="random")
    adapters = tr.add_adapters(params, CONFIG, lcfg, rng=2)  # B ~ U(+-1/sqrt(2)), s = 32, |W| ~ 0.02 per entry
    save_peft_adapter(tmp_path / "ad", lcfg, adapters)
    code, out, _ = run_check(capsys, tmp_path / "ad", base_path)
    assert code == 0
    for module, pair in adapters.items():
        change = np.linalg.norm(32.0 * pair["B"] @ pair["A"]) / np.linalg.norm(params[module + ".weight"])
        assert change > 1 and f"{module}: merging would change W by {change:.3g} times its own norm" in out


@pytest.mark.parametrize("dtype", [np.int32, np.bool_, np.complex64])
def test_integer_bool_and_complex_adapters_are_invalid(base, tmp_path, capsys, dtype):
    # Issue 11, item 1: the loader cast them to float64 and `check` reported the adapter valid.
    base_path, params = base
    write_adapter(tmp_path / "ad", params, LoraConfig(r=2, alpha=2.0, target_modules=["c_fc"], fan_in_fan_out=True,
                                                      init="random"))
    tensors = safetensors.numpy.load_file(str(tmp_path / "ad" / WEIGHTS_NAME))
    safetensors.numpy.save_file({k: (v * 1000).astype(dtype) for k, v in tensors.items()},
                                str(tmp_path / "ad" / WEIGHTS_NAME))
    code, out, err = run_check(capsys, tmp_path / "ad", base_path)
    assert code == 1 and "OK" not in out
    assert re.search(r"lora_[AB]\.weight' is stored as (I32|BOOL|C64) .*not a floating-point type", err)
    assert "INVALID" in err


# --------------------------------------------------------------------------------------------
# Issue 11, item 12: a file that cannot be read is one line on stderr naming it, exit 1
# --------------------------------------------------------------------------------------------


def unreadable(monkeypatch, path):
    """Make reading ``path`` fail as a file without read permission does (for root too, whom
    chmod 000 does not stop)."""
    real = pathlib.Path.read_bytes

    def read_bytes(self):
        if os.path.abspath(self) == os.path.abspath(path):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real(self)

    monkeypatch.setattr(pathlib.Path, "read_bytes", read_bytes)


@pytest.mark.parametrize("which", ["adapter weights", "adapter config", "base weights", "base config"])
def test_an_unreadable_file_is_one_line_naming_it(base, tmp_path, capsys, monkeypatch, which):
    base_path, params = base
    write_adapter(tmp_path / "ad", params, LoraConfig(r=2, alpha=2.0, target_modules=["c_fc"], fan_in_fan_out=True,
                                                      init="random"))
    path = {"adapter weights": tmp_path / "ad" / WEIGHTS_NAME, "adapter config": tmp_path / "ad" / CONFIG_NAME,
            "base weights": base_path / "model.safetensors", "base config": base_path / "config.json"}[which]
    unreadable(monkeypatch, path)
    code, out, err = run_check(capsys, tmp_path / "ad", base_path)
    what = which.split()[0].replace("base", "base model")
    assert code == 1 and out == ""
    assert err == f"lora-ref check: cannot read the {what}: {str(path)!r}: Permission denied\n"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its mode; the test above covers it")
def test_a_file_without_read_permission(base, tmp_path, capsys):
    base_path, params = base
    write_adapter(tmp_path / "ad", params, LoraConfig(r=2, alpha=2.0, target_modules=["c_fc"], init="random"))
    (tmp_path / "ad" / WEIGHTS_NAME).chmod(0)
    code, _, err = run_check(capsys, tmp_path / "ad", base_path)
    assert code == 1 and err.count("\n") == 1 and "Permission denied" in err and WEIGHTS_NAME in err


# --------------------------------------------------------------------------------------------
# LLaMA-family bases (transformer_ref.load_checkpoint picks the family from config.json)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_base(tmp_path_factory):
    config = tr.LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=12, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=8)
    params = tr.init_params(config, seed=0, dtype="float64")
    path = tmp_path_factory.mktemp("llama") / "llama"
    tr.save_hf_llama(path, config, params)
    return path, config, params


def test_a_llama_adapter_against_a_llama_base(llama_base, tmp_path, capsys):
    path, config, params = llama_base
    lcfg = LoraConfig(r=2, alpha=4.0, target_modules=["q_proj", "v_proj", "down_proj"], init="random")
    adapters = tr.add_adapters(params, config, lcfg, rng=1)
    adapters = {m: {"A": p["A"], "B": p["B"] * 2.0**-10} for m, p in adapters.items()}
    save_peft_adapter(tmp_path / "ad", lcfg, adapters)
    code, out, err = run_check(capsys, tmp_path / "ad", path)
    assert code == 0, err
    assert "llama: 2 layers, hidden_size 8, heads 2 (key/value 1), intermediate_size 12, vocab 16" in out
    table = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("model.layers.")}
    assert sorted(table) == sorted(adapters) and "model.layers.1.self_attn.v_proj" in table
    for module, pair in adapters.items():
        W = params[module + ".weight"]
        change = np.linalg.norm(2.0 * (pair["B"] @ pair["A"])) / np.linalg.norm(W)
        assert (int(table[module][1]), int(table[module][3])) == W.shape and table[module][-1] == f"{change:.3e}"
    assert "OK: the adapter is valid for this base model (0 warnings)" in out
    # fan_in_fan_out=True describes GPT-2's Conv1D, not LLaMA's nn.Linear: flagged.
    save_peft_adapter(tmp_path / "fifo", LoraConfig(r=2, alpha=4.0, target_modules=["q_proj"], fan_in_fan_out=True),
                      {m: p for m, p in adapters.items() if m.endswith("q_proj")})
    code, out, _ = run_check(capsys, tmp_path / "fifo", path)
    assert code == 0 and "fan_in_fan_out is true, but llama's projections are nn.Linear" in out


def test_a_gpt2_adapter_against_a_llama_base_is_invalid(base, llama_base, tmp_path, capsys):
    _, params = base
    write_adapter(tmp_path / "ad", params, LoraConfig(r=2, alpha=2.0, target_modules=["c_attn"], fan_in_fan_out=True,
                                                      init="random"))
    code, _, err = run_check(capsys, tmp_path / "ad", llama_base[0])
    assert code == 1 and "INVALID" in err and "transformer.h.0.attn.c_attn" in err


# --------------------------------------------------------------------------------------------
# Variants: DoRA, embedding adapters, several adapters in one directory
# --------------------------------------------------------------------------------------------


def dora_setup(params, tmp_path):
    """A DoRA adapter on c_attn: layer 0's m as if trained (x 1.5 on half the rows), layer 1's at init."""
    lcfg = LoraConfig(r=2, alpha=4.0, target_modules=["c_attn"], fan_in_fan_out=True, init="random", use_dora=True)
    from lora_ref.dora import dora_magnitude

    adapters = tr.add_adapters(params, CONFIG, lcfg, rng=5)
    for module, p in adapters.items():                    # B small (as after training), m its initial value
        p["B"] = p["B"] * 2.0**-10
        p["m"] = dora_magnitude(params[module + ".weight"], p["A"], p["B"], lcfg.scale_for(module))
    m0 = adapters["transformer.h.0.attn.c_attn"]["m"]
    adapters["transformer.h.0.attn.c_attn"]["m"] = m0 * np.where(np.arange(m0.shape[0]) % 2 == 0, 1.5, 1.0)
    save_peft_adapter(tmp_path / "dora", lcfg, adapters)
    return lcfg, adapters


def test_dora_adapter_reports_the_merged_change_and_the_magnitudes(base, tmp_path, capsys):
    base_path, params = base
    lcfg, adapters = dora_setup(params, tmp_path)
    code, out, err = run_check(capsys, tmp_path / "dora", base_path)
    assert code == 0, err
    assert "use_dora=True" in out and "|W'-W|/|W|" in out
    lines = out.splitlines()
    table = {m: next(l.split() for l in lines if l.startswith(m + " ")) for m in adapters}   # the first table
    fmt = lambda v: f"{np.min(v):.4g} / {np.median(v):.4g} / {np.max(v):.4g}"  # noqa: E731
    for module, p in adapters.items():
        W, s = params[module + ".weight"], 2.0
        V = W + s * p["B"] @ p["A"]                                              # (d_out, d_in)
        merged = p["m"][:, None] * V / np.linalg.norm(V, axis=1, keepdims=True)  # Eq. 5, written here
        line = table[module]
        assert line[7] == f"{np.linalg.norm(merged - W) / np.linalg.norm(W):.3e}" and line[8] == "DoRA"
        magnitude_line = [l for l in out.splitlines() if l.startswith(module) and "/" in l][0]
        assert fmt(p["m"] / np.linalg.norm(W, axis=1)) in magnitude_line
        assert fmt(p["m"] / np.linalg.norm(V, axis=1)) in magnitude_line
    assert "transformer.h.1.attn.c_attn: m equals ||W + s B A||_row within rounding" in out
    assert "transformer.h.0.attn.c_attn: m equals" not in out


def test_an_embedding_adapter_is_checked_against_its_table(base, tmp_path, capsys):
    base_path, params = base
    lcfg = LoraConfig(r=3, alpha=3.0, target_modules=["wte", "c_fc"], fan_in_fan_out=True, init="random",
                      embedding_modules=["transformer.wte"])
    adapters = tr.add_adapters(params, CONFIG, lcfg, rng=6)
    assert adapters["transformer.wte"]["A"].shape == (3, 16)                     # (r, V)
    save_peft_adapter(tmp_path / "emb", lcfg, adapters)
    code, out, err = run_check(capsys, tmp_path / "emb", base_path)
    assert code == 0, err
    line = [l.split() for l in out.splitlines() if l.startswith("transformer.wte ")][0]
    E, p = params["transformer.wte.weight"], adapters["transformer.wte"]
    change = np.linalg.norm(1.0 * (p["B"] @ p["A"]).T) / np.linalg.norm(E)       # s (B A)^T against E (V, D)
    assert line[1:4] == ["16", "x", "8"] and line[7] == f"{change:.3e}" and line[8] == "embedding"
    assert "embedding_modules=['transformer.wte']" in out
    assert "transformer.wte: an embedding adapter on a table tied to the output head" in out
    # The same factors declared as a linear adapter do not fit the table, and the message says what to do.
    raw = safetensors.numpy.load_file(str(tmp_path / "emb" / WEIGHTS_NAME))
    raw = {k.replace("lora_embedding_A", "lora_A.weight").replace("lora_embedding_B", "lora_B.weight"): v
           for k, v in raw.items()}
    safetensors.numpy.save_file(raw, str(tmp_path / "emb" / WEIGHTS_NAME))
    code, out, err = run_check(capsys, tmp_path / "emb", base_path)
    assert code == 1 and "list it in LoraConfig.embedding_modules" in err


def test_several_adapters_get_one_report_each(base, tmp_path, capsys):
    base_path, params = base
    from lora_ref.peft_io import save_peft_adapters

    plain = LoraConfig(r=2, alpha=6.0, target_modules=["c_attn"], fan_in_fan_out=True, init="random")
    dora_cfg, dora = dora_setup(params, tmp_path)
    wide = tr.GPTConfig(vocab_size=16, n_positions=8, n_embd=12, n_layer=2, n_head=2)
    save_peft_adapters(tmp_path / "set", {"default": (plain, write_adapter(tmp_path / "x", params, plain)),
                                          "dora": (dora_cfg, dora)})
    code, out, err = run_check(capsys, tmp_path / "set", base_path)
    assert code == 0, err
    assert out.startswith(f"{tmp_path / 'set'}: 2 adapters (default, dora), one report each")
    assert "=== adapter 'default'" in out and "=== adapter 'dora'" in out and out.count("OK: the adapter is valid") == 2
    assert out.rstrip().endswith("OK: all 2 adapters are valid for this base model")
    # One adapter that does not fit: its error, the others' reports, exit 1.
    save_peft_adapter(tmp_path / "set" / "wide", plain, tr.add_adapters(tr.init_params(wide, seed=1), wide, plain, rng=1))
    code, out, err = run_check(capsys, tmp_path / "set", base_path)
    assert code == 1 and "=== adapter 'wide'" in out and out.count("OK: the adapter is valid") == 2
    assert "INVALID: 1 of 3 adapters cannot be used with this base model: wide" in err
