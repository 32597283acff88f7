"""check_lora_shrink, check_lora_expand and check_serving: lora-ref's lora_ref.serving passes in
float64, float32, float16 and bfloat16; so does an independent per-token engine; copied entries
(tokens with -1, columns in no slice) must come back bit for bit. Wrong engines: test_kit_mutants.py."""

from __future__ import annotations

import numpy as np

from lora_ref import lora_scale
from lora_ref.kit.mutants import run_correct
from lora_ref.kit.serving import serving_rounding_counts, serving_rtol
from lora_ref.serving import add_lora, lora_expand, lora_shrink, stack_adapters
from lora_ref.testing import check_lora_expand, check_lora_shrink, check_serving, tolerance


def engine(y, x, adapters, indices, slices):
    As, Bs = [], []
    for slots in adapters:
        A, B = stack_adapters([None if a is None else (a["A"], a["B"], lora_scale(a["alpha"], a["r"], a["use_rslora"]))
                               for a in slots])
        As.append(A)
        Bs.append(B)
    return add_lora(y, x, As, Bs, indices, 1.0, slices)


def test_lora_ref_passes_in_every_storage_dtype():
    for report in (check_lora_shrink(lora_shrink), check_lora_expand(lora_expand), check_serving(engine)):
        assert report.ok, str(report)
        assert {r.dtype for r in report} == {"float64", "float32", "float16", "bfloat16"}


def test_an_independent_engine_passes():
    for variant in ("lora_shrink", "lora_expand", "serving"):
        assert run_correct(variant).ok, variant


def test_copied_entries_must_be_bit_for_bit():
    # An expand that writes y + 0 through float32 for -1 tokens is fine (exact); one that rounds the
    # copied columns through float16 on their way is not, in float32 storage.
    def lossy(y, h, B_stack, indices, slices):
        return lora_expand(y, h, B_stack, indices, slices).astype(np.float16).astype(y.dtype)
    report = check_lora_expand(lossy, properties=["expand_no_adapter", "expand_slices"], dtypes=("float32",))
    assert not report.ok and all(r.error == float("inf") for r in report.failed), str(report)


def test_bounds_follow_docs_serving_md():
    assert serving_rounding_counts(8, 4) == {"h": (11, 0), "y_expand": (6, 3), "y_serve": (19, 4)}
    g = tolerance("float64", 5)
    assert serving_rtol("float64", 2, 3) == ((1 + tolerance("float64", 2)) * (1 + tolerance("float64", 3)) - 1 + g) / (1 - g)
    assert serving_rtol("bfloat16", 6, 3) > 3 * 2.0 ** -8
