"""check_combine_adapters: lora-ref's combine_adapters and an independent PEFT-formula implementation
pass every method; the kit's cases are decisive (pruning and TIES' signs do not hinge on rounding),
and a result with the wrong rank or kind is reported. Wrong combinations: tests/test_kit_mutants.py."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_ref import lora_scale
from lora_ref.combine import combine_adapters
from lora_ref.kit.combine import _decisive, draw_combine_case
from lora_ref.kit.adapters import as_scaled
from lora_ref.kit.mutants import CORRECT, run_correct
from lora_ref.testing import COMBINE_PROPERTIES, check_combine_adapters


def ref(adapters, weights, method, *, density, majority_sign, masks, rank):
    scaled = {n: (a["A"], a["B"], lora_scale(a["alpha"], a["r"], a["use_rslora"])) for n, a in adapters.items()}
    c = combine_adapters(scaled, weights, method, density=density, majority_sign=majority_sign, masks=masks, rank=rank)
    return c.A, c.B, c.scale


def test_lora_ref_and_an_independent_implementation_pass_every_method():
    report = check_combine_adapters(ref)
    assert report.ok and [r.name for r in report][::2] == list(COMBINE_PROPERTIES), str(report)
    assert run_correct("combine_adapters").ok


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_any_seed(seed):
    assert check_combine_adapters(**CORRECT["combine_adapters"](), seed=seed).ok


def test_cases_are_decisive_and_weights_exact():
    for name in COMBINE_PROPERTIES:
        case = draw_combine_case(name, (0, 1))
        assert _decisive(as_scaled(case["adapters"]), case["method"], case["density"], case["majority_sign"],
                         case["masks"])
        for a, w in zip(case["adapters"].values(), case["weights"]):
            root = np.sqrt(abs(w * lora_scale(a["alpha"], a["r"], a["use_rslora"])))
            assert float(np.float32(root)) == root                     # PEFT's float32 weights are exact here


def test_wrong_rank_and_wrong_kinds_are_reported():
    report = check_combine_adapters(lambda *a, **k: ref(*a, **k)[:2], properties=["linear"], dtypes=("float64",))
    assert report[0].detail == "impl must return a tuple (A, B, scale), got tuple"

    def truncated(*a, **k):
        A, B, s = ref(*a, **k)
        return A[:4], B[:, :4], s
    report = check_combine_adapters(truncated, properties=["svd"], dtypes=("float64",))
    assert report[0].detail == "the combined rank is 4, expected 5"
