"""check_quantize_4bit: lora-ref's quantize_4bit/dequantize_4bit and an independent bitsandbytes-
convention quantiser pass bit for bit; the cases hold what they claim (exact halfway values in
float32, blocks spanning rows, a dyadic absmax so the offset is the same in any summation order).
The four wrong quantisers of issue 16 are in tests/test_kit_mutants.py."""

from __future__ import annotations

import numpy as np

from lora_ref.kit.mutants import MUTANTS, run_correct, run_mutant
from lora_ref.kit.quant import draw_quant_case
from lora_ref.quant import QuantState, dequantize_4bit, dynamic_map, fp4_levels, nf4_levels, quantize_4bit
from lora_ref.testing import QUANT_PROPERTIES, check_quantize_4bit


def dequantize(weight, absmax, *, shape, dtype, blocksize, quant_type, nested_absmax, nested_offset):
    nested = {} if nested_absmax is None else dict(nested_absmax=nested_absmax, nested_quant_map=dynamic_map(),
                                                   nested_offset=nested_offset, nested_blocksize=256,
                                                   nested_dtype="float32")
    state = QuantState(weight=weight, absmax=absmax, quant_map=nf4_levels() if quant_type == "nf4" else fp4_levels(),
                       shape=shape, dtype=dtype, blocksize=blocksize, quant_type=quant_type, **nested)
    return dequantize_4bit(state)


def test_lora_ref_and_an_independent_quantiser_pass_bit_for_bit():
    report = check_quantize_4bit(lambda W, **kw: quantize_4bit(W, **kw), dequantize=dequantize)
    assert report.ok, str(report)
    assert {r.name for r in report} == set(QUANT_PROPERTIES) and all(r.exact or r.bound == 0 for r in report)
    assert run_correct("quantize_4bit").ok


def test_the_report_names_each_output_of_a_property():
    report = run_mutant(MUTANTS["quant.nested_offset_forgotten"])
    rows = [str(r).split()[0] for r in report if r.name == "double_quant" and r.dtype == "float32"]
    assert rows == ["double_quant:weight", "double_quant:absmax", "double_quant:nested_absmax",
                    "double_quant:nested_offset"]
    failed = {r.output for r in report.failed if r.name == "double_quant" and r.dtype == "float32"}
    assert failed == {"absmax", "nested_absmax", "nested_offset"}                # the codes stay right


def test_cases_hold_what_they_claim():
    W = draw_quant_case((2, 32), 64, "nf4", 0, ties=True).astype(np.float32)
    s = np.sort(nf4_levels())
    mids = (s[:-1] + s[1:]) / np.float32(2)
    assert np.abs(W).max() == 1.0 and set(mids) <= set(W.reshape(-1))        # exact halfway values
    W = draw_quant_case((16, 1040), 64, "nf4", 0, dyadic_absmax=True)
    absmax = np.abs(W.reshape(-1, 64)).max(axis=1)
    assert absmax.size == 260 and np.all(absmax * 8 == np.round(absmax * 8))
    state = quantize_4bit(W.astype(np.float32), 64, "nf4", True)
    assert state.nested_absmax.size == 2 and state.nested_offset == float(np.float32(absmax.sum() / 260))
