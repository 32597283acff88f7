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
