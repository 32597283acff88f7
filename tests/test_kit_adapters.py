"""check_adapter_set and check_mixed_batch: lora-ref's lora_ref.adapters passes, and so does an
independent per-adapter loop; the wrong ones are in tests/test_kit_mutants.py."""

from __future__ import annotations

from lora_ref import lora_scale
from lora_ref.adapters import adapter_set_linear, merge_adapters, mixed_batch_linear
from lora_ref.kit.adapters import adapter_rounding_counts
from lora_ref.kit.mutants import run_correct
from lora_ref.testing import ADAPTER_SET_PROPERTIES, check_adapter_set, check_mixed_batch


def scaled(adapters):
    return {n: (a["A"], a["B"], lora_scale(a["alpha"], a["r"], a["use_rslora"])) for n, a in adapters.items()}


def test_lora_ref_passes():
    report = check_adapter_set(lambda x, W, ads, active, *, bias: adapter_set_linear(x, W, scaled(ads), active, bias=bias),
                               merge=lambda W, ads, names, *, fan_in_fan_out: merge_adapters(
                                   W, scaled(ads), names, fan_in_fan_out=fan_in_fan_out))
    assert report.ok and [r.name for r in report][::2] == list(ADAPTER_SET_PROPERTIES), str(report)
    mixed = check_mixed_batch(lambda x, W, ads, names, *, bias: mixed_batch_linear(x, W, scaled(ads), names, bias=bias))
    assert mixed.ok and len(mixed) == 6, str(mixed)


def test_independent_loops_pass_for_another_seed():
    assert run_correct("adapter_set", seed=99).ok and run_correct("mixed_batch", seed=99).ok


def test_rounding_counts():
    assert adapter_rounding_counts(7, 4, 3) == {"y": 20, "W_merged": 13, "y_mixed": 19}
