"""Wrong implementations the kit must fail, and the right ones it must pass, for every variant.

Each :class:`Mutant` is a plain NumPy implementation of one variant's contract (written here,
independently of lora-ref's own code: PEFT's formulas where PEFT has them) with ONE deliberate
bug, and the exact set of properties of its check that must fail. :data:`MUTANTS` lists them all
by name; :data:`CORRECT` gives, per variant, the same implementations without a bug, which must
pass every property. ``run_mutant(MUTANTS[name])`` runs the check and returns its report, so a zoo,
a conformance command or a bug catalogue can iterate over them::

    from lora_ref.kit.mutants import MUTANTS, run_mutant
    for m in MUTANTS.values():
        report = run_mutant(m)
        assert set(report.failed_names) == m.caught_by

The implementations live in :mod:`lora_ref.kit.wrong` (linear-family variants) and
:mod:`lora_ref.kit.wrong_many` (adapters, serving, combination, quantisation).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import wrong as w
from . import wrong_many as wm

__all__ = ["CORRECT", "MUTANTS", "Mutant", "run_correct", "run_mutant"]


@dataclass(frozen=True)
class Mutant:
    """One wrong implementation: ``callables`` builds the keyword arguments of the variant's check
    (``impl`` and the optional callables, one of them wrong); ``caught_by`` is the exact set of
    properties that must fail (every other one passes); ``options`` are extra check arguments
    (``properties=``, ``dtypes=``)."""

    name: str
    variant: str
    description: str
    callables: Callable[[], dict[str, Any]]
    caught_by: frozenset[str]
    options: Mapping[str, Any] = field(default_factory=dict)


def _checks() -> dict[str, Callable]:
    from ..testing import CHECKS
    return CHECKS


def run_mutant(mutant: Mutant) -> Any:
    """The variant's check run on the mutant: a :class:`~lora_ref.kit.core.LoraCheckReport`."""
    return _checks()[mutant.variant](**mutant.callables(), **mutant.options)


def run_correct(variant: str, **options: Any) -> Any:
    """The variant's check run on the correct implementations of :data:`CORRECT`."""
    return _checks()[variant](**CORRECT[variant](), **options)


SERVING_ALL = ("serve", "serve_no_adapter", "serve_segments", "serve_slices", "serve_rslora", "serve_empty_slot")
COMBINE_FACTOR = ("linear", "linear_rslora_first", "ties", "ties_frequency", "dare_linear", "dare_ties",
                  "magnitude_prune")
QUANT_ALL = ("nf4", "fp4", "blocks_span_rows", "odd_count", "ties", "blocksize_256", "double_quant", "dequant_nf4",
             "dequant_fp4", "dequant_blocks_span_rows", "dequant_odd_count", "dequant_double_quant")
QUANT_PER_ROW = ("blocks_span_rows", "odd_count", "ties", "blocksize_256", "double_quant", "dequant_blocks_span_rows",
                 "dequant_odd_count", "dequant_double_quant")
_DORA_FORWARD = {"forward", "forward_rslora", "forward_square", "fan_in_fan_out", "dropout"}

CORRECT: dict[str, Callable[[], dict[str, Any]]] = {
    "lora_linear": lambda: {"impl": w.linear_layer(), "merge": w.linear_merge(), "grad": w.linear_grad()},
    "dora_linear": lambda: {"impl": w.dora_layer(), "magnitude": w.dora_magnitude(), "merge": w.dora_merge(),
                            "grad": w.dora_grad()},
    "lora_embedding": lambda: {"impl": w.embedding_layer(), "merge": w.embedding_merge(), "grad": w.embedding_grad()},
    "lora_conv": lambda: {"impl": w.conv_layer(), "merge": w.conv_merge(), "grad": w.conv_grad()},
    "adapter_set": lambda: {"impl": wm.adapter_set(), "merge": wm.adapter_set_merge()},
    "mixed_batch": lambda: {"impl": wm.mixed_batch()},
    "lora_shrink": lambda: {"impl": wm.shrink_kernel()},
    "lora_expand": lambda: {"impl": wm.expand_kernel()},
    "serving": lambda: {"impl": wm.serving_engine()},
    "combine_adapters": lambda: {"impl": wm.combine()},
    "quantize_4bit": lambda: {"impl": wm.quantizer(), "dequantize": wm.dequantizer()},
}
"""Per variant, the right implementations (the mutants' code without a bug)."""

_LIN_FORWARD = {"forward", "forward_rslora", "fan_in_fan_out", "dropout", "rank_above_dim", "rank_equals_dims",
                "rank_equals_d_out"}
_LIN_MERGE = {"merge", "merge_rslora", "merge_fan_in_fan_out", "merge_rank_equals_dims", "merge_rank_equals_d_out"}


def _linear(bug: str, *parts: str) -> Callable[[], dict[str, Any]]:
    factories = {"impl": w.linear_layer, "merge": w.linear_merge, "grad": w.linear_grad}
    return lambda: {p: factories[p](bug if p in parts else None) for p in factories}


_LIST = [
    # ---- plain LoRA, rsLoRA (the kit's first properties) ----------------------------------------
    Mutant("linear.scale_alpha", "lora_linear", "the scale alpha, not alpha / r",
           _linear("scale_alpha", "impl", "merge", "grad"),
           frozenset(_LIN_FORWARD | _LIN_MERGE | {"grad_x", "grad_A", "grad_B"})),
    Mutant("linear.rslora_ignored", "lora_linear", "alpha / r although use_rslora (llama.cpp's converter, SGLang)",
           _linear("rslora_ignored", "impl", "merge"), frozenset({"forward_rslora", "merge_rslora"})),
    Mutant("linear.fan_in_fan_out_forgotten", "lora_linear", "W stored (d_in, d_out) used as (d_out, d_in)",
           _linear("fifo_forgotten", "impl", "merge"), frozenset({"fan_in_fan_out", "merge_fan_in_fan_out"})),
    Mutant("linear.dropout_on_base", "lora_linear", "the dropout mask applied to the base branch too",
           _linear("dropout_on_base", "impl"), frozenset({"dropout"})),
    Mutant("linear.dropout_ignored", "lora_linear", "the dropout mask not applied at all",
           _linear("dropout_ignored", "impl"), frozenset({"dropout"})),
    Mutant("linear.layout_guessed_from_shapes", "lora_linear",
           "A, B transposed when their shapes look like Keras/Flax's (d_in, r), (r, d_out)",
           _linear("layout_guess", "impl", "merge"),
           frozenset({"rank_equals_dims", "rank_equals_d_out", "merge_rank_equals_dims", "merge_rank_equals_d_out"})),
    Mutant("linear.factors_in_float32", "lora_linear",
           "A and B held in float32 whatever the layer's dtype (Keras 3's enable_lora): float64 results off by ~1e-8",
           _linear("factors_float32", "impl", "merge"),
           frozenset((_LIN_FORWARD | _LIN_MERGE))),
    # ---- DoRA (issue 13) --------------------------------------------------------------------
    Mutant("dora.norm_over_input_axis", "dora_linear",
           "the norm over the output axis, one per INPUT feature (LyCORIS/kohya's dora_scale convention)",
           lambda: {"impl": w.dora_layer("input_axis"), "magnitude": w.dora_magnitude("input_axis"),
                    "merge": w.dora_merge("input_axis")},
           frozenset(_DORA_FORWARD | {"magnitude", "magnitude_fan_in_fan_out", "merge",
                                      "merge_fan_in_fan_out"})),
    Mutant("dora.exact_gradient_where_detached_asked", "dora_linear",
           "the gradient through the norm although detach_norm=True (PEFT's, Section 4.3) was asked",
           lambda: {"impl": w.dora_layer(), "grad": w.dora_grad("always_exact")},
           frozenset({"grad_A_detached", "grad_B_detached"})),
    Mutant("dora.detached_gradient_where_exact_asked", "dora_linear",
           "the norm treated as a constant although detach_norm=False (Eq. 6) was asked",
           lambda: {"impl": w.dora_layer(), "grad": w.dora_grad("always_detached")},
           frozenset({"grad_A_exact", "grad_B_exact"})),
    Mutant("dora.magnitude_from_W_alone", "dora_linear",
           "the initial m = ||W||_c although B != 0 (PEFT includes s B A)",
           lambda: {"impl": w.dora_layer(), "magnitude": w.dora_magnitude("W_alone")},
           frozenset({"magnitude", "magnitude_fan_in_fan_out"})),
    Mutant("dora.dropout_on_the_base_term", "dora_linear",
           "the dropout mask applied to the outer base term too: y = f (xd V^T) + bias",
           lambda: {"impl": w.dora_layer("dropout_on_base"), "grad": w.dora_grad("dropout_on_base")},
           frozenset({"dropout", "grad_x"})),
    # ---- embedding and convolution (issue 14) ------------------------------------------------
    Mutant("embedding.roles_swapped", "lora_embedding",
           "A and B used the linear layer's way: the table gets s B A (D, V), not s (B A)^T (V, D)",
           lambda: {"impl": w.embedding_layer("roles_swapped"), "merge": w.embedding_merge("roles_swapped")},
           frozenset({"forward", "forward_rslora", "square", "no_dropout", "zero_A_identity", "merge",
                      "merge_square"})),
    Mutant("embedding.dropout_on_path", "lora_embedding",
           "the config's lora_dropout applied to the looked-up A rows (PEFT and loralib apply none)",
           lambda: {"impl": w.embedding_layer("dropout_on_path")}, frozenset({"no_dropout"})),
    Mutant("conv.delta_viewed_loralib_way", "lora_conv",
           "the (C_in, C_out, *k) product viewed as W's (C_out, C_in, *k) (loralib's .view), not transposed",
           lambda: {"impl": w.conv_layer("loralib_view"), "merge": w.conv_merge("loralib_view")},
           frozenset({"forward_1d", "forward_2d", "forward_rslora", "groups", "dilation", "dropout",
                      "merge_1d", "merge_2d"})),
    Mutant("conv.dilation_ignored_in_A", "lora_conv",
           "the A convolution without the base's dilation (PEFT 0.21.2's layer)",
           lambda: {"impl": w.conv_layer("dilation_ignored"), "grad": w.conv_grad("dilation_ignored")},
           frozenset({"dilation", "grad_x", "grad_A", "grad_B"})),
    # ---- many adapters and serving (issue 15) ------------------------------------------------
    Mutant("adapters.inactive_applied", "adapter_set", "every loaded adapter summed, whatever is active",
           lambda: {"impl": wm.adapter_set("inactive_applied")}, frozenset({"one_active", "two_active", "disabled"})),
    Mutant("adapters.last_active_only", "adapter_set", "only the last of the active adapters applied",
           lambda: {"impl": wm.adapter_set("last_active_only")}, frozenset({"two_active", "all_active"})),
    Mutant("adapters.rslora_ignored", "adapter_set", "the rsLoRA adapter 'b' scaled alpha / r, in the sum and the merge",
           lambda: {"impl": wm.adapter_set("rslora_ignored"), "merge": wm.adapter_set_merge("rslora_ignored")},
           frozenset({"one_active", "all_active", "merge_fan_in_fan_out"})),
    Mutant("adapters.merge_transpose_forgotten", "adapter_set",
           "the deltas added untransposed to a W stored (d_in, d_out)",
           lambda: {"impl": wm.adapter_set(), "merge": wm.adapter_set_merge("fifo_forgotten")},
           frozenset({"merge_fan_in_fan_out"})),
    Mutant("mixed.base_is_last", "mixed_batch", "'__base__' read as index -1, i.e. the last adapter",
           lambda: {"impl": wm.mixed_batch("base_is_last")}, frozenset({"mixed", "all_base"})),
    Mutant("mixed.first_sample_adapter", "mixed_batch", "every sample given the first sample's adapter",
           lambda: {"impl": wm.mixed_batch("first_sample_adapter")}, frozenset({"mixed"})),
    Mutant("mixed.rslora_ignored", "mixed_batch", "the rsLoRA adapter 'b' scaled alpha / r",
           lambda: {"impl": wm.mixed_batch("rslora_ignored")}, frozenset({"mixed", "one_adapter"})),
    Mutant("serving.minus_one_is_last", "serving",
           "index -1 read as the last slot (vLLM's CPU fallback: lora_weights[indices])",
           lambda: {"impl": wm.serving_engine("minus_one_is_last")},
           frozenset({"serve_no_adapter", "serve_segments"})),
    Mutant("serving.scale_twice", "serving", "the scale folded into B at load AND applied in the shrink",
           lambda: {"impl": wm.serving_engine("scale_twice")}, frozenset(SERVING_ALL)),
    Mutant("serving.padding_not_zero", "serving",
           "the rank padding of a slot keeps values of a previous, larger adapter",
           lambda: {"impl": wm.serving_engine("padding_not_zero")}, frozenset(SERVING_ALL)),
    Mutant("serving.segment_off_by_one", "serving", "SGMV segments read one token late",
           lambda: {"impl": wm.serving_engine("segment_off_by_one")}, frozenset({"serve_segments"})),
    Mutant("serving.rslora_ignored", "serving", "the adapter's scale alpha / r although it is rsLoRA (SGLang #40835)",
           lambda: {"impl": wm.serving_engine("rslora_ignored")}, frozenset({"serve_rslora"})),
    Mutant("shrink.minus_one_is_last", "lora_shrink", "index -1 read as the last slot in the shrink kernel",
           lambda: {"impl": wm.shrink_kernel("minus_one_is_last")},
           frozenset({"shrink_no_adapter", "shrink_segments"})),
    Mutant("shrink.segment_off_by_one", "lora_shrink", "SGMV segments read one token late in the shrink",
           lambda: {"impl": wm.shrink_kernel("segment_off_by_one")}, frozenset({"shrink_segments"})),
    Mutant("expand.minus_one_is_last", "lora_expand", "index -1 read as the last slot in the expand kernel",
           lambda: {"impl": wm.expand_kernel("minus_one_is_last")},
           frozenset({"expand_no_adapter", "expand_segments"})),
    Mutant("expand.segment_off_by_one", "lora_expand", "SGMV segments read one token late in the expand",
           lambda: {"impl": wm.expand_kernel("segment_off_by_one")}, frozenset({"expand_segments"})),
    # ---- combinations (issue 15) ------------------------------------------------------------
    Mutant("combine.weights_without_square_root", "combine_adapters",
           "the weights w_i s_i applied to A and B both, without the square root: (w s)^2 B A",
           lambda: {"impl": wm.combine("no_square_root")}, frozenset(COMBINE_FACTOR)),
    Mutant("combine.peft_rslora_scale", "combine_adapters",
           "the combined adapter keeps the first adapter's use_rslora: scale sqrt(rank), not 1 (PEFT 0.21.2)",
           lambda: {"impl": wm.combine("peft_rslora_scale")}, frozenset({"linear_rslora_first"})),
    # ---- 4-bit quantisation (issue 16) -------------------------------------------------------
    Mutant("quant.low_nibble_first", "quantize_4bit", "the first value of each pair packed in the LOW nibble",
           lambda: {"impl": wm.quantizer("low_nibble_first"), "dequantize": wm.dequantizer("low_nibble_first")},
           frozenset(QUANT_ALL)),
    Mutant("quant.ties_up", "quantize_4bit", "a value exactly halfway between two levels rounded to the upper one",
           lambda: {"impl": wm.quantizer("ties_up")}, frozenset({"ties"}), {"dtypes": ("float32",)}),
    Mutant("quant.per_row_blocks", "quantize_4bit", "blocks formed within each row instead of the row-major flattening",
           lambda: {"impl": wm.quantizer("per_row_blocks"), "dequantize": wm.dequantizer("per_row_blocks")},
           frozenset(QUANT_PER_ROW)),
    Mutant("quant.nested_offset_forgotten", "quantize_4bit",
           "double quantisation without the mean: absmax quantised uncentred, and dequantised without adding it back",
           lambda: {"impl": wm.quantizer("offset_forgotten"), "dequantize": wm.dequantizer("offset_forgotten")},
           frozenset({"double_quant", "dequant_double_quant"})),
]

MUTANTS: dict[str, Mutant] = {m.name: m for m in _LIST}
"""Every mutant, by name (``<variant>.<bug>``)."""
