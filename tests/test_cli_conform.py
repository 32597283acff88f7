"""``lora-ref conform``: the kit run against an implementation named on the command line.

A right and a wrong implementation module are written to tmp_path; the right one exits 0, the wrong
one 1 with the failing property in the report; every bad input is one line on stderr with exit 2.
"""

from __future__ import annotations

import sys
import textwrap

import pytest

from lora_ref.cli import main
from lora_ref.commands.conform import VARIANTS
from lora_ref.testing import CHECKS

LINEAR = '''
import math

def scale(alpha, r, use_rslora):
    return alpha / (math.sqrt(r) if use_rslora else r)

def forward(x, W, A, B, *, alpha, r, use_rslora, bias, dropout_mask, fan_in_fan_out):
    W = W.T if fan_in_fan_out else W                                  # (d_out, d_in)
    xd = x if dropout_mask is None else x * dropout_mask
    y = x @ W.T + scale(alpha, r, use_rslora) * (xd @ A.T) @ B.T
    return y if bias is None else y + bias

def merge(W, A, B, *, alpha, r, use_rslora, fan_in_fan_out):
    D = scale(alpha, r, use_rslora) * (B @ A)
    return W + (D.T if fan_in_fan_out else D)

def wrong_forward(x, W, A, B, *, alpha, r, use_rslora, bias, dropout_mask, fan_in_fan_out):
    return forward(x, W, A, B, alpha=alpha, r=r, use_rslora=False, bias=bias,      # rsLoRA ignored
                   dropout_mask=dropout_mask, fan_in_fan_out=fan_in_fan_out)

class Layer:
    """An adapter class: called for the forward, its merge method used for --merge."""
    def __call__(self, *args, **kwargs):
        return forward(*args, **kwargs)

    def merge(self, *args, **kwargs):
        return merge(*args, **kwargs)

class Broken:
    def __init__(self):
        raise RuntimeError("needs a config")

NOT_CALLABLE = 3
'''


@pytest.fixture
def mod(tmp_path, monkeypatch):
    """The module written to tmp_path, importable as ``conform_mine`` from there (the working directory)."""
    (tmp_path / "conform_mine.py").write_text(LINEAR)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "conform_mine", raising=False)
    return tmp_path / "conform_mine.py"


def run(capsys, *argv):
    status = main(["conform", *argv])
    out = capsys.readouterr()
    return status, out.out, out.err


def test_a_right_implementation_conforms(mod, capsys):
    status, out, err = run(capsys, "conform_mine:forward", "--variant", "linear", "--merge", "conform_mine:merge")
    assert status == 0 and err == ""
    lines = out.splitlines()
    assert lines[0] == "26 checks, all passed"
    assert lines[-1] == "lora-ref conform: conform_mine:forward conforms (linear: 26 checks, all passed)"
    assert sum(line.endswith(" pass") for line in lines) == 26


def test_a_wrong_implementation_fails_with_its_property_named(mod, capsys):
    status, out, err = run(capsys, f"{mod}:wrong_forward", "--variant", "lora_linear", "--dtypes", "float64")
    assert status == 1 and err == ""
    failed = [line for line in out.splitlines() if "FAIL" in line]
    assert len(failed) == 1 and failed[0].startswith("forward_rslora ") and "float64" in failed[0]
    assert out.splitlines()[-1].endswith("does NOT conform (lora_linear: 8 checks, 1 failed: forward_rslora (float64))")


def test_an_adapter_class_supplies_its_methods(mod, capsys):
    status, out, _ = run(capsys, "conform_mine:Layer", "--variant", "linear", "--properties", "merge,forward",
                         "--seed", "3")
    assert status == 0
    assert [line.split()[0] for line in out.splitlines()[2:-1]] == ["merge", "merge", "forward", "forward"]


def test_another_variant_by_file_path(tmp_path, capsys):
    path = tmp_path / "quant_mine.py"
    path.write_text(textwrap.dedent('''
        from lora_ref.kit.wrong_many import dequantizer, quantizer
        impl, dequantize = quantizer(), dequantizer()
        swapped = quantizer("low_nibble_first")
    '''))
    assert run(capsys, f"{path}:impl", "--variant", "quantize_4bit", "--dequantize", f"{path}:dequantize",
               "--properties", "nf4,dequant_nf4", "--dtypes", "float32")[0] == 0
    status, out, _ = run(capsys, f"{path}:swapped", "--variant", "quantize_4bit", "--properties", "nf4",
                         "--dtypes", "float32")
    assert status == 1 and "nf4:weight" in out and "entries differ" in out


@pytest.mark.parametrize("argv, message", [
    (["nowhere_to_be_found:f", "--variant", "linear"],
     "IMPL: no module named 'nowhere_to_be_found' (run from the folder that holds it, or give FILE.py:CALLABLE)"),
    (["conform_mine:nope", "--variant", "linear"], "IMPL: 'conform_mine' has no attribute 'nope'"),
    (["conform_mine:NOT_CALLABLE", "--variant", "linear"],
     "IMPL: conform_mine:NOT_CALLABLE is not callable (it is int) and has no forward method"),
    (["conform_mine", "--variant", "linear"], "IMPL must be MODULE:CALLABLE or FILE.py:CALLABLE, got 'conform_mine'"),
    (["conform_mine:Broken", "--variant", "linear"],
     "IMPL: conform_mine:Broken is a class, and Broken() raised RuntimeError: needs a config"),
    (["conform_mine:forward", "--variant", "linear", "--merge", "conform_mine:nope"],
     "--merge: 'conform_mine' has no attribute 'nope'"),
    (["conform_mine:forward", "--variant", "serving", "--grad", "conform_mine:forward"],
     "--grad does not apply to --variant serving (its options: none)"),
    (["conform_mine:forward", "--variant", "linear", "--dequantize", "conform_mine:forward"],
     "--dequantize does not apply to --variant linear (its options: --merge, --grad)"),
    (["conform_mine:forward", "--variant", "linear", "--dtypes", "float16"],
     "dtypes must be 'float32' and/or 'float64', got ['float16']"),
    (["conform_mine:forward", "--variant", "linear", "--properties", "forwards"],
     "properties must be names from forward, forward_rslora, zero_B_identity, fan_in_fan_out, dropout, "
     "rank_above_dim, fused_enable_lora, merge, merge_rslora, merge_fan_in_fan_out, merge_fused, grad_x, grad_A, "
     "grad_B, rank_equals_dims, rank_equals_d_out, merge_rank_equals_dims, merge_rank_equals_d_out; got ['forwards']"),
    (["conform_mine:forward", "--variant", "linear", "--properties", "grad_x"],
     "property 'grad_x' needs the grad callable, but grad=None"),
    (["conform_mine:forward", "--variant", "linear", "--seed", "-1"], "--seed must be a non-negative integer, got -1"),
    (["missing.py:f", "--variant", "linear"], "IMPL: no file 'missing.py'"),
])
def test_bad_input_is_one_line_and_exit_2(mod, capsys, argv, message):
    status, out, err = run(capsys, *argv)
    assert (status, out, err) == (2, "", f"lora-ref conform: {message}\n")


def test_a_module_that_raises_on_import_is_one_line(tmp_path, capsys):
    (tmp_path / "bad.py").write_text("import nowhere_to_be_found_either\n")
    status, out, err = run(capsys, f"{tmp_path / 'bad.py'}:f", "--variant", "linear")
    assert status == 2 and out == ""
    assert err == (f"lora-ref conform: IMPL: importing '{tmp_path / 'bad.py'}' raised ModuleNotFoundError: "
                   "No module named 'nowhere_to_be_found_either'\n")


def test_an_unknown_variant_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["conform", "m:f", "--variant", "bogus"])
    assert exc.value.code == 2 and "invalid choice: 'bogus'" in capsys.readouterr().err


def test_every_check_has_a_variant_name():
    assert set(VARIANTS.values()) == set(CHECKS)
