"""The oracle kit: tolerances, error bounds and checks for testing a LoRA implementation.

Tolerances
----------
Every tolerance in lora-ref (its own tests included) comes from :func:`tolerance`, derived from
the dtype's unit roundoff ``u = eps / 2`` by the standard rounding-error analysis (Higham,
*Accuracy and Stability of Numerical Algorithms*, 2nd ed., Lemma 3.1 and Section 3.5):

* a chain of ``n`` roundings (a dot product of length n, a sum of n terms) has relative error
  at most ``gamma_n = n u / (1 - n u)``, *relative to the sum of absolute values* of the terms;
* so two computations of the same quantity that each take at most ``n`` roundings differ by at
  most ``2 gamma_n * M``, where ``M`` is the value computed with every term replaced by its
  absolute value (:func:`lora_linear_magnitude` computes M for the LoRA layer).

These bounds are rigorous (any summation order, with or without FMA, as long as nothing
overflows or underflows into the subnormals), so a test that uses them never fails spuriously;
and they are far below the size of any real mistake (a wrong scale, a forgotten transpose), so
they still catch those.

Checking another implementation: one calling convention for every variant
-------------------------------------------------------------------------
Each variant has one check, ``check_<variant>(impl, *, <optional callables>, properties=None,
dtypes=..., seed=0) -> LoraCheckReport``:

* ``impl`` is your forward pass (or, for the bit-level variant, your quantiser): a Python
  callable on NumPy arrays. The optional callables (``merge=``, ``grad=``, ...) enable the
  properties that need them. Each receives its arrays positionally and the settings by keyword,
  exactly as the check's docstring lists them, and returns NumPy arrays (or anything
  ``numpy.asarray`` reads) of the inputs' dtype. Computing a scale from ``alpha``, ``r`` and
  ``use_rslora`` is always your job. Inputs must not be modified.
* An *adapter*, where a callable receives several, is a dict ``{"A": (r, d_in), "B": (d_out, r),
  "alpha": float, "r": int, "use_rslora": bool}``; its scale is ``alpha / r``, or
  ``alpha / sqrt(r)``.
* ``properties`` picks properties by name (each check's ``*_PROPERTIES`` dict describes them);
  ``dtypes`` the dtypes each runs in; ``seed`` the data (each property draws its own).
* The report holds one :class:`PropertyResult` per property, dtype and output: ``error``,
  ``bound``, ``passed``, ``detail`` and the worst entry (``where``, ``got``, ``expected``,
  ``difference`` = ``|got - expected|``). Tolerance properties pass when
  ``|yours - reference| <= rtol * M`` entry by entry, against lora-ref computed in float64 from
  the same inputs, ``rtol = reference_rtol(dtype, n)`` with n the output's rounding count and M
  its magnitude. Bit-exact properties (4-bit codes) count mismatching entries (``mismatches``).
  A crash, a wrong shape or dtype, or an input modified in place fails the property, by name;
  a check never raises for a failure. :data:`CHECKS` lists every check by variant.

``docs/oracle.md`` walks through every variant. The kit speaks NumPy: it is the boundary where
other implementations' numbers come in, so unlike the rest of lora_ref it does not follow the
backend switch. The kit's linear cases are :class:`lora_ref.cases.LoraCase` records; hypothesis
strategies that draw random ones are in :mod:`lora_ref.strategies`, which needs hypothesis, a
test extra (``pip install 'lora-ref[test]'``); this module does not. The code lives in
:mod:`lora_ref.kit`, one module per variant.
"""

from __future__ import annotations

from .kit.core import (CheckReport, LoraCheckReport, PropertyResult, assert_within, compare_exact,
                       compare_to_reference, reference_rtol, tolerance, unit_roundoff)
from .kit.dora import DORA_DEFAULT_PROPERTIES, DORA_PROPERTIES, check_dora_linear, dora_reference
from .kit.adapters import ADAPTER_SET_PROPERTIES, MIXED_BATCH_PROPERTIES, check_adapter_set, check_mixed_batch
from .kit.combine import COMBINE_PROPERTIES, check_combine_adapters
from .kit.conv import CONV_DEFAULT_PROPERTIES, CONV_PROPERTIES, check_lora_conv
from .kit.embedding import EMBEDDING_DEFAULT_PROPERTIES, EMBEDDING_PROPERTIES, check_lora_embedding
from .kit.linear import (DEFAULT_PROPERTIES, PROPERTIES, assert_lora_linear_matches, check_lora_linear,
                         lora_linear_magnitude, lora_magnitudes, reference_outputs, rounding_counts)
from .kit.quant import QUANT_PROPERTIES, check_quantize_4bit
from .kit.serving import (EXPAND_PROPERTIES, SERVING_PROPERTIES, SHRINK_PROPERTIES, check_lora_expand,
                          check_lora_shrink, check_serving)

__all__ = ["ADAPTER_SET_PROPERTIES", "CHECKS", "COMBINE_PROPERTIES", "CONV_DEFAULT_PROPERTIES", "CONV_PROPERTIES", "DEFAULT_PROPERTIES", "DORA_DEFAULT_PROPERTIES", "DORA_PROPERTIES", "EMBEDDING_DEFAULT_PROPERTIES",
           "EMBEDDING_PROPERTIES", "EXPAND_PROPERTIES", "MIXED_BATCH_PROPERTIES",
           "QUANT_PROPERTIES", "SERVING_PROPERTIES", "SHRINK_PROPERTIES", "PROPERTIES", "CheckReport", "LoraCheckReport", "PropertyResult",
           "assert_lora_linear_matches", "assert_within", "check_adapter_set", "check_combine_adapters",
           "check_dora_linear", "check_lora_conv",
           "check_lora_embedding", "check_lora_expand", "check_lora_linear",
           "check_lora_shrink", "check_mixed_batch", "check_quantize_4bit", "check_serving", "compare_exact",
           "compare_to_reference", "dora_reference", "lora_linear_magnitude", "lora_magnitudes", "reference_outputs",
           "reference_rtol", "rounding_counts", "tolerance", "unit_roundoff"]

CHECKS = {"lora_linear": check_lora_linear, "dora_linear": check_dora_linear,
          "lora_embedding": check_lora_embedding, "lora_conv": check_lora_conv, "adapter_set": check_adapter_set,
          "mixed_batch": check_mixed_batch, "lora_shrink": check_lora_shrink, "lora_expand": check_lora_expand,
          "serving": check_serving, "combine_adapters": check_combine_adapters,
          "quantize_4bit": check_quantize_4bit}
"""Every check of the kit, by variant name (what ``lora-ref conform`` and the mutant zoo iterate)."""
