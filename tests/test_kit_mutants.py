"""Every mutant of lora_ref.kit.mutants fails exactly the properties it names, far outside the bound
(or with a crash, or with mismatching bits where the property is exact), and every variant's right
implementation passes everything. This is the catalogue a mutant zoo or `lora-ref conform` reuses."""

from __future__ import annotations

import pytest

from lora_ref.kit.mutants import CORRECT, MUTANTS, run_correct, run_mutant
from lora_ref.testing import CHECKS


@pytest.mark.parametrize("name", list(MUTANTS))
def test_each_mutant_fails_exactly_its_properties(name):
    mutant = MUTANTS[name]
    report = run_mutant(mutant)
    assert set(report.failed_names) == mutant.caught_by, str(report)
    for res in report.failed:
        if res.exact:
            assert res.mismatches > 0, str(res)
        elif res.dtype in ("float64", "float32"):
            assert res.error > 100 * res.bound, str(res)          # by far, or a crash (inf)
        else:                                                     # float16/bfloat16: the bound is coarse
            assert res.error > 2 * res.bound, str(res)


@pytest.mark.parametrize("variant", list(CORRECT))
def test_each_variants_right_implementation_passes(variant):
    report = run_correct(variant)
    assert report.ok, str(report)


def test_every_variant_has_a_right_implementation_and_mutants():
    assert set(CORRECT) == set(CHECKS)
    assert {m.variant for m in MUTANTS.values()} <= set(CHECKS)
    assert all(name.split(".")[0] and m.description and m.caught_by for name, m in MUTANTS.items())
