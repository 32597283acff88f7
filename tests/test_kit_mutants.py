"""The mutant zoo: every wrong implementation of lora_ref.kit.mutants is caught, and by the properties it names.

Each mutant fails exactly the properties it names (every other one passes), far outside the bound
(or with a crash, or with mismatching bits where the property is exact), and every variant's right
implementation passes everything. ``test_mutant_zoo`` runs them all and prints the catch rate
(``pytest -s`` shows the table; the terminal summary shows the rate); it fails unless it is 100%.
"""

from __future__ import annotations

from collections import Counter

import pytest

from lora_ref.kit.mutants import CORRECT, MUTANTS, run_correct, run_mutant
from lora_ref.testing import CHECKS


def far_outside(res) -> bool:
    """A failure by far: bits that differ, a crash (inf), or an error 100 times the bound (2 times in
    float16 / bfloat16, whose bounds are coarse)."""
    if res.exact:
        return res.mismatches > 0
    return res.error > (100 if res.dtype in ("float64", "float32") else 2) * res.bound


def caught(mutant, report) -> bool:
    return set(report.failed_names) == mutant.caught_by and all(far_outside(r) for r in report.failed)


class _ZooLine:
    """A pytest plugin registered by the zoo test: puts the catch rate into the terminal summary."""

    def __init__(self, line: str) -> None:
        self.line = line

    def pytest_terminal_summary(self, terminalreporter) -> None:
        terminalreporter.write_line(self.line)


def test_mutant_zoo(request):
    rows, missed = [], []
    for name, mutant in MUTANTS.items():
        report = run_mutant(mutant)
        ok = caught(mutant, report)
        rows.append(f"  {'caught' if ok else 'MISSED':<7}{name:<44} by {', '.join(sorted(mutant.caught_by))}")
        if not ok:
            missed.append(f"{name}: expected {sorted(mutant.caught_by)}, failed {list(report.failed_names)}\n{report}")
    per_variant = Counter(m.variant for m in MUTANTS.values())
    n, k = len(MUTANTS), len(MUTANTS) - len(missed)
    line = f"mutant zoo: caught {k}/{n} ({100 * k // n}%) across {len(per_variant)} variants"
    print("\n" + "\n".join(rows) + "\n" + line)
    plugins = request.config.pluginmanager
    if not any(isinstance(p, _ZooLine) for p in plugins.get_plugins()):
        plugins.register(_ZooLine(line))
    assert not missed, "\n".join(missed)
    assert n >= 30 and set(per_variant) == set(CHECKS) and min(per_variant.values()) >= 2, per_variant


@pytest.mark.parametrize("name", list(MUTANTS))
def test_each_mutant_fails_exactly_its_properties(name):
    mutant = MUTANTS[name]
    report = run_mutant(mutant)
    assert set(report.failed_names) == mutant.caught_by, str(report)
    assert all(far_outside(res) for res in report.failed), str(report)


@pytest.mark.parametrize("variant", list(CORRECT))
def test_each_variants_right_implementation_passes(variant):
    report = run_correct(variant)
    assert report.ok, str(report)


def test_every_variant_has_a_right_implementation_and_mutants():
    assert set(CORRECT) == set(CHECKS)
    assert {m.variant for m in MUTANTS.values()} == set(CHECKS)
    assert all(name.split(".")[0] and m.description and m.caught_by for name, m in MUTANTS.items())
    assert all(m.caught_by <= set(_properties(m.variant)) for m in MUTANTS.values())


def _properties(variant: str) -> dict[str, str]:
    """Every property of a variant's check, with what it checks."""
    from lora_ref import testing as t

    return {"lora_linear": t.PROPERTIES, "dora_linear": t.DORA_PROPERTIES, "lora_embedding": t.EMBEDDING_PROPERTIES,
            "lora_conv": t.CONV_PROPERTIES, "adapter_set": t.ADAPTER_SET_PROPERTIES,
            "mixed_batch": t.MIXED_BATCH_PROPERTIES, "lora_shrink": t.SHRINK_PROPERTIES,
            "lora_expand": t.EXPAND_PROPERTIES, "serving": t.SERVING_PROPERTIES,
            "combine_adapters": t.COMBINE_PROPERTIES, "quantize_4bit": t.QUANT_PROPERTIES}[variant]
