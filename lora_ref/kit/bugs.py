"""The bug catalogue: known bugs of shipping LoRA implementations, and the kit's verdict on each.

Each :class:`Bug` names the software and version, the smallest case that shows the bug, the
check that catches it (a check of :data:`lora_ref.testing.CHECKS`, or one of
:mod:`lora_ref.kit.bug_checks` for what those do not cover), the properties that must fail, and two implementations written here in
NumPy from the software's source: the released behaviour (``buggy``) and the fixed one
(``fixed``). The kit must fail the first on exactly those properties and pass the second.
tests/test_bugs.py runs both, and, where the software is installed (the interop extra: torch,
peft, transformers, loralib, bitsandbytes; Keras 3 when installed with the torch backend), runs
the same check on the real package and requires the same verdict: the same failing properties,
errors of the same size. docs/bugs.md is written from these entries by :func:`render_page`
(``python -m lora_ref.kit.bugs --write docs/bugs.md``, or ``pytest tests/test_bugs.py
--write-bugs-page``), from the NumPy re-implementations, so it is the same on every machine.

The checks beyond the variants' own (tied tables, DoRA's base gradient, merge cycles, DoRA
combinations, 3-D convolutions) live in :mod:`lora_ref.kit.bug_checks` and are re-exported here.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import wrong as w
from . import wrong_many as wm
from .bug_checks import (CATALOGUE_CHECKS, CONV3D_PROPERTIES, DORA_BASE_GRADIENT_PROPERTIES, DORA_COMBINE_PROPERTIES,
                         MERGE_CYCLE_PROPERTIES, TIED_MERGE_PROPERTIES, check_dora_base_gradient,
                         check_dora_combination, check_lora_conv3d, check_merge_cycles, check_tied_embedding_merge)
from .core import LoraCheckReport

__all__ = ["BUGS", "Bug", "CATALOGUE_CHECKS", "CONV3D_PROPERTIES", "DORA_BASE_GRADIENT_PROPERTIES",
           "DORA_COMBINE_PROPERTIES", "MERGE_CYCLE_PROPERTIES", "TIED_MERGE_PROPERTIES", "check_dora_base_gradient",
           "check_dora_combination", "check_lora_conv3d", "check_merge_cycles", "check_tied_embedding_merge",
           "render_page", "run_bug"]

PAGE = Path("docs") / "bugs.md"


# ============================================================================================
# The catalogue
# ============================================================================================


@dataclass(frozen=True)
class Bug:
    """One known bug. ``check`` names a check of :data:`lora_ref.testing.CHECKS` or of
    :data:`CATALOGUE_CHECKS`; ``buggy()`` and ``fixed()`` build its keyword arguments (``impl`` and
    the optional callables) from NumPy re-implementations; ``fails`` is the exact set of properties
    the released version fails (with ``options``: ``properties=``, ``dtypes=``). ``package`` is the
    distribution tests/test_bugs.py runs the real software from (None: not installable here);
    ``real`` says where that happens, ``source`` where the facts come from."""

    name: str
    software: str
    version: str
    package: str | None
    title: str
    facts: str
    fix: str
    check: str
    buggy: Callable[[], dict[str, Any]]
    fixed: Callable[[], dict[str, Any]]
    fails: frozenset[str]
    options: Mapping[str, Any] = field(default_factory=dict)
    real: str = "the real package, when installed (the interop extra)"
    source: str = ""


def _combine_as(method: str, bug: str | None = None) -> Callable[[], dict[str, Any]]:
    """PEFT's add_weighted_adapter asked for lora-ref's ``exact`` weighted sum by ``method``."""
    inner = wm.combine(bug)
    return lambda: {"impl": lambda ads, ws, _method, **kw: inner(ads, ws, method, **kw)}


BUGS: tuple[Bug, ...] = (
    Bug("peft.add_weighted_adapter.rslora_first", "PEFT", "0.21.2", "peft",
        "add_weighted_adapter over-scales the combination by sqrt(new rank) when the FIRST adapter is rsLoRA",
        "The combined adapter's config is a copy of the first source's with r and lora_alpha set to the new "
        "rank, so use_rslora is kept: its scale is r / sqrt(r) = sqrt(r) instead of r / r = 1 "
        "(peft/tuners/lora/model.py, add_weighted_adapter).",
        "the combined adapter scaled by 1 (use_rslora=False in its config)",
        "combine_adapters", lambda: {"impl": wm.combine("peft_rslora_scale")}, lambda: {"impl": wm.combine()},
        frozenset({"linear_rslora_first"}), {"properties": ("linear", "linear_rslora_first")},
        source="REFERENCE.md; tests/interop/test_adapters_peft.py::test_rslora_over_scaling"),
    Bug("peft.add_weighted_adapter.linear_cross_terms", "PEFT", "0.21.2", "peft",
        "combination_type='linear' is not the weighted sum of the adapters' deltas",
        "'linear' sums the factors, A = sum sign(w s) sqrt|w s| A_i and B = sum sqrt|w s| B_i, so B A holds "
        "the cross terms B_i A_j (i != j). Asked for the weighted sum sum w_i s_i B_i A_i, it gives another "
        "matrix; 'cat' (rank sum r_i) gives the weighted sum.",
        "combination_type='cat' for the weighted sum",
        "combine_adapters", _combine_as("linear"), _combine_as("cat"), frozenset({"exact"}),
        {"properties": ("exact",)}, source="REFERENCE.md; docs/combination.md"),
    Bug("peft.add_weighted_adapter.dora_magnitudes_ignored", "PEFT", "0.21.2", "peft",
        "add_weighted_adapter ignores DoRA sources' magnitudes: one adapter at weight 1 comes back changed",
        "The combined adapter's config is a copy of the first source's, so use_dora is kept and the new adapter "
        "gets DoRA's initial magnitude ||W + s B A|| with B = 0, i.e. ||W|| row by row; add_weighted_adapter then "
        "writes A and B and never touches lora_magnitude_vector, so the sources' trained magnitudes are lost "
        "(peft/tuners/lora/model.py, add_weighted_adapter).",
        "the combined adapter's magnitude taken from the sources (one source: its m)",
        "dora_combination", lambda: {"impl": w.dora_combine("magnitude_ignored")}, lambda: {"impl": w.dora_combine()},
        frozenset({"dora_one_source"}), source="REFERENCE.md; peft/tuners/lora/model.py (add_weighted_adapter)"),
    Bug("peft.tied_embedding.merge_moves_head", "PEFT", "0.21.2", "peft",
        "merging an embedding adapter into a tied table changes the output head: merged != unmerged",
        "On a model with tie_word_embeddings (GPT-2's wte and lm_head), an adapter on the embedding adapts "
        "the lookup only, but merge_and_unload adds s (B A)^T to the one table both share, so the merged "
        "model's head differs from the unmerged model's.",
        "untie before merging: the head keeps E",
        "tied_embedding_merge", lambda: {"impl": w.tied_embedding_merge("shared_table")},
        lambda: {"impl": w.tied_embedding_merge()}, frozenset({"tied_merge"}), {"properties": ("tied_merge",)},
        real="the real package (PEFT on transformers' tiny GPT-2), when installed",
        source="REFERENCE.md; tests/interop/test_embedding_conv_peft.py::test_peft_gpt2_wte_and_the_tied_head"),
    Bug("peft.ensure_weight_tying.merges_twice", "PEFT", "0.21.2", "peft",
        "with ensure_weight_tying=True the tied table gets the delta twice on merge",
        "Targeting lm_head with ensure_weight_tying=True gives wte an embedding adapter and lm_head a "
        "linear adapter whose factors share storage with it; merge_and_unload merges both into the one "
        "shared table: E + 2 s (B A)^T, while the unmerged model computes with E + s (B A)^T at both ends.",
        "merge the shared delta once (wte's adapter only)",
        "tied_embedding_merge", lambda: {"impl": w.tied_embedding_merge("shared_table")},
        lambda: {"impl": w.tied_embedding_merge()}, frozenset({"tied_merge_head_adapted"}),
        {"properties": ("tied_merge_head_adapted",)},
        real="the real package (PEFT on transformers' tiny GPT-2), when installed",
        source="REFERENCE.md; tests/interop/test_embedding_conv_peft.py::test_peft_ensure_weight_tying_merges_twice"),
    Bug("peft.dora.fan_in_fan_out_dropout_base_gradient", "PEFT", "0.21.2", "peft",
        "DoRA with fan_in_fan_out and dropout sends no gradient to W through the (f - 1) xd W^T term",
        "In training with dropout, DoRA computes xd W^T with peft.utils.other.transpose(weight, True), which "
        "returns nn.Parameter(weight.T): a new leaf, cut from the graph. dL/dW is short by (f - 1) G^T xd "
        "(only a trained base weight sees it; the adapter's gradients are right).",
        "a plain weight.T (no new Parameter)",
        "dora_base_gradient", lambda: {"impl": w.dora_base_grad("transpose_leaf")},
        lambda: {"impl": w.dora_base_grad()}, frozenset({"grad_W_fan_in_fan_out"}),
        source="tests/interop/test_dora_peft.py::test_forward_and_gradients; docs/dora.md"),
    Bug("peft.conv.dilation_ignored_in_A", "PEFT", "0.21.2", "peft",
        "conv LoRA builds lora_A without the base layer's dilation",
        "lora_A is a convolution with the base's kernel, stride and padding but dilation 1. Usually the "
        "output sizes then differ and the forward raises; where the stride makes them agree (kernel 3, "
        "dilation 2, stride 3, length 11) it silently computes another function than its own merged model.",
        "lora_A with the base's dilation",
        "lora_conv", lambda: {"impl": w.conv_layer("dilation_ignored")}, lambda: {"impl": w.conv_layer()},
        frozenset({"dilation"}), {"properties": ("forward_1d", "dilation")},
        source="tests/interop/test_embedding_conv_peft.py::test_peft_conv_with_dilation"),
    Bug("peft.merge_unmerge.16bit_drift", "PEFT", "0.21.2", "peft",
        "merge/unmerge on a bfloat16/float16 weight drifts: unmerge subtracts a differently rounded delta",
        "With float32 adapters on a 16-bit base, merge does weight.data += delta (float32, rounded once) and "
        "unmerge weight.data -= delta.to(orig_dtype): two different deltas, so every cycle moves W by about "
        "the delta's rounding error, in the same direction (lora_ref.precision, docs/precision.md).",
        "unmerge subtracts the same float32 delta",
        "merge_cycles", lambda: {"impl": w.merge_cycles("rounded_delta")}, lambda: {"impl": w.merge_cycles()},
        frozenset({"hundred_cycles"}),
        source="docs/precision.md; tests/interop/test_quant_bnb.py::test_peft_merge_unmerge_drift_is_lora_ref_precision_peft_way"),
    Bug("loralib.conv1d.kernel_above_one", "loralib", "0.1.2", "loralib",
        "Conv1d with kernel_size > 1 fails at the first forward (and at merge)",
        "ConvLoRA sizes lora_A (r k, C_in k) and lora_B (C_out k, r k), so B A has C_out C_in k^2 entries: "
        "right for a 2-D kernel (C_out, C_in, k, k), but a 1-D weight has C_out C_in k, and "
        "(lora_B @ lora_A).view(weight.shape) raises.",
        "factors sized for the weight: lora_A (r, C_in k), lora_B (C_out, r)",
        "lora_conv", lambda: {"impl": w.loralib_conv_layer("kernel_squared"), "merge": w.loralib_conv_merge("kernel_squared")},
        lambda: {"impl": w.loralib_conv_layer(), "merge": w.loralib_conv_merge()},
        frozenset({"forward_1d", "merge_1d"}), {"properties": ("forward_1d", "merge_1d")},
        source="REFERENCE.md; tests/interop/test_embedding_conv_peft.py::test_loralib_conv1d_with_kernel_above_one_fails"),
    Bug("loralib.conv3d.kernel_above_one", "loralib", "0.1.2", "loralib",
        "Conv3d with kernel_size > 1 fails at the first forward (and at merge)",
        "Conv3d is the same ConvLoRA: lora_A (r k, C_in k), lora_B (C_out k, r k), so B A has C_out C_in k^2 "
        "entries where a 3-D weight (C_out, C_in, k, k, k) has C_out C_in k^3, and (lora_B @ lora_A)"
        ".view(weight.shape) raises (loralib/layers.py, ConvLoRA).",
        "factors sized for the weight: lora_A (r, C_in k^3), lora_B (C_out, r)",
        "lora_conv3d", lambda: {"impl": w.loralib_conv_layer("kernel_squared"), "merge": w.loralib_conv_merge("kernel_squared")},
        lambda: {"impl": w.loralib_conv_layer(), "merge": w.loralib_conv_merge()},
        frozenset({"forward_3d", "merge_3d"}), source="REFERENCE.md; loralib/layers.py (ConvLoRA)"),
    Bug("bitsandbytes.cpu_dequantize.row_straddling_blocks", "bitsandbytes", "0.50.2", "bitsandbytes",
        "the native CPU dequantize_4bit scales blocks that straddle rows by the wrong absmax",
        "The AVX-512 kernel (last dim n even and a multiple of 16, block < 2048, more than one row) reads "
        "absmax[row * (n // blocksize) + col // blocksize]: right only when every row starts a block. "
        "bitsandbytes' own pure-PyTorch path, and the format, use the row-major block (row n + col) // "
        "blocksize. Weights whose in_features is a multiple of the block are not affected.",
        "bitsandbytes' pure-PyTorch dequantize (backends/default)",
        "quantize_4bit", lambda: {"impl": wm.quantizer(), "dequantize": wm.bnb_native_dequantizer("row_index")},
        lambda: {"impl": wm.quantizer(), "dequantize": wm.bnb_native_dequantizer()},
        frozenset({"dequant_blocks_span_rows", "dequant_double_quant"}),
        {"properties": ("dequant_nf4", "dequant_fp4", "dequant_blocks_span_rows", "dequant_odd_count",
                        "dequant_double_quant")},
        real="the real package on a CPU that takes its AVX-512 path (skipped elsewhere)",
        source="tests/interop/test_quant_bnb.py::test_bnb_native_dequantize_bug"),
    Bug("keras.enable_lora.float32_on_torch", "Keras", "3.15.1", "keras",
        "on the torch backend a float64 Dense layer with enable_lora computes in float32",
        "Dense.enable_lora adds lora_kernel_a (d_in, r) and lora_kernel_b (r, d_out) with dtype='float32' "
        "whatever the layer's dtype; and on the torch backend keras.ops.matmul computes two float64 "
        "tensors in float32 and returns float32 (backend.result_type maps float64 to float32, JAX's "
        "default), so the layer's x @ kernel is float32 too (float64 again only when a float64 bias is "
        "added). Float32 layers are right.",
        "factors in the layer's dtype and 64-bit results kept (result_type's float64 -> float32 map removed)",
        "lora_linear", lambda: {"impl": w.keras_dense_layer("float32"), "merge": w.keras_dense_merge("float32")},
        lambda: {"impl": w.keras_dense_layer(), "merge": w.keras_dense_merge()},
        frozenset({"forward", "rank_above_dim", "merge"}), {"properties": ("forward", "rank_above_dim", "merge")},
        real="the real package, when installed with the torch backend (not in the interop extra)",
        source="keras/src/layers/core/dense.py (enable_lora, kernel, call); keras/src/backend/common/dtypes.py "
               "(BIT64_TO_BIT32_DTYPE)"),
    Bug("keras.enable_lora.alpha_defaults_to_rank", "Keras", "3.15.1", "keras",
        "enable_lora(rank) leaves lora_alpha at the rank: a PEFT adapter loaded that way gets scale 1",
        "Keras' scale is lora_alpha / rank with lora_alpha defaulting to rank; PEFT's is lora_alpha / r with "
        "its own lora_alpha (default 8). An adapter moved across without passing lora_alpha is applied at "
        "scale 1, not alpha / r. (Keras has no rsLoRA either.) A default that differs, more than a bug.",
        "enable_lora(r, lora_alpha=alpha)",
        "lora_linear", lambda: {"impl": w.keras_dense_layer("alpha_default_rank")},
        lambda: {"impl": w.keras_dense_layer()},
        frozenset({"forward"}), {"properties": ("forward", "zero_B_identity"), "dtypes": ("float32",)},
        real="the real package, when installed with the torch backend (not in the interop extra)",
        source="keras/src/layers/core/dense.py (__init__, enable_lora)"),
    Bug("vllm.cpu_punica.index_minus_one", "vLLM", "CPU fallback (torch_ops)", None,
        "the CPU fallback's shrink reads a token's index -1 (no adapter) as the last adapter",
        "bgmv_shrink selects lora_a_weights[lora_indices_tensor]; PyTorch reads index -1 as the last slot, "
        "so tokens without an adapter get the last adapter's A x (sgmv_shrink repeat_interleaves the "
        "sequences' indices first). The Triton kernel returns early for -1.",
        "tokens with index -1 left at zero, as the Triton kernel does",
        "lora_shrink", lambda: {"impl": wm.vllm_shrink("index_minus_one")}, lambda: {"impl": wm.vllm_shrink()},
        frozenset({"shrink_no_adapter", "shrink_segments"}),
        {"properties": ("shrink", "shrink_no_adapter", "shrink_segments")},
        real="a re-implementation (vLLM is not installable here)",
        source="REFERENCE.md; vllm/lora/ops/torch_ops/lora_ops.py"),
    Bug("llama.cpp.convert_lora_to_gguf.rslora_ignored", "llama.cpp", "convert_lora_to_gguf.py", None,
        "the PEFT-to-GGUF converter copies lora_alpha and ignores use_rslora",
        "convert_lora_to_gguf.py writes adapter.lora.alpha = adapter_config['lora_alpha'] and never reads "
        "use_rslora; llama.cpp then applies alpha / rank (llama-adapter.h, get_scale). An rsLoRA adapter "
        "runs at alpha / r instead of alpha / sqrt(r).",
        "write lora_alpha * sqrt(r) for an rsLoRA adapter",
        "lora_linear", lambda: {"impl": w.llama_cpp_layer("alpha_copied")}, lambda: {"impl": w.llama_cpp_layer()},
        frozenset({"forward_rslora"}), {"properties": ("forward", "forward_rslora"), "dtypes": ("float32",)},
        real="a re-implementation (llama.cpp is not installable here)",
        source="REFERENCE.md; convert_lora_to_gguf.py; src/llama-adapter.h"),
    Bug("sglang.rslora_ignored", "SGLang", "#40835", None,
        "SGLang serves rsLoRA adapters at alpha / r",
        "LoRAAdapter.scaling = lora_alpha / r; use_rslora is not read, so an rsLoRA adapter is applied at "
        "alpha / r instead of alpha / sqrt(r).",
        "scaling alpha / sqrt(r) when use_rslora",
        "serving", lambda: {"impl": wm.sglang_engine("rslora_ignored")}, lambda: {"impl": wm.sglang_engine()},
        frozenset({"serve_rslora"}), {"properties": ("serve", "serve_rslora")},
        real="a re-implementation (SGLang is not installable here)",
        source="REFERENCE.md; sglang/srt/lora/lora.py"),
)
"""Every entry, in the order docs/bugs.md lists them."""


def _check(name: str) -> Callable:
    from ..testing import CHECKS

    return {**CHECKS, **CATALOGUE_CHECKS}[name]


def run_bug(bug: Bug, callables: Mapping[str, Any] | None = None, *, fixed: bool = False) -> LoraCheckReport:
    """The entry's check on ``callables`` (default: its re-implementation, buggy or ``fixed``)."""
    if callables is None:
        callables = (bug.fixed if fixed else bug.buggy)()
    return _check(bug.check)(**callables, **bug.options)


# ============================================================================================
# docs/bugs.md, written from the entries
# ============================================================================================

_CALLS = {"combine_adapters": "check_combine_adapters", "lora_conv": "check_lora_conv",
          "lora_linear": "check_lora_linear", "lora_shrink": "check_lora_shrink", "serving": "check_serving",
          "quantize_4bit": "check_quantize_4bit", "tied_embedding_merge": "bugs.check_tied_embedding_merge",
          "dora_base_gradient": "bugs.check_dora_base_gradient", "merge_cycles": "bugs.check_merge_cycles",
          "dora_combination": "bugs.check_dora_combination", "lora_conv3d": "bugs.check_lora_conv3d"}


def _properties(check: str) -> Mapping[str, str]:
    from .. import testing as t

    return {"lora_linear": t.PROPERTIES, "lora_conv": t.CONV_PROPERTIES, "lora_shrink": t.SHRINK_PROPERTIES,
            "serving": t.SERVING_PROPERTIES, "combine_adapters": t.COMBINE_PROPERTIES,
            "quantize_4bit": t.QUANT_PROPERTIES, "tied_embedding_merge": TIED_MERGE_PROPERTIES,
            "dora_base_gradient": DORA_BASE_GRADIENT_PROPERTIES, "merge_cycles": MERGE_CYCLE_PROPERTIES,
            "dora_combination": DORA_COMBINE_PROPERTIES, "lora_conv3d": CONV3D_PROPERTIES}[check]


def _times(x: float) -> str:
    """``x`` to one significant digit, ``6e14``: coarse enough to be the same on every CPU."""
    mantissa, exponent = f"{x:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}" if not -3 <= int(exponent) <= 3 else f"{float(f'{x:.0e}'):g}"


def verdict(res: Any) -> str:
    """One result in words, without the last-bit numbers of the run."""
    if res.passed:
        return "pass"
    if res.exact:
        return f"FAIL: {res.detail.split(';')[0]}"
    if math.isinf(res.error) and res.difference is not None and res.detail.startswith("worst at"):
        return f"FAIL: changed where it must be equal, by up to {res.difference:.2g}"
    if math.isinf(res.error) or not res.detail.startswith("worst at"):
        return f"FAIL: {res.detail}"
    return f"FAIL: error {_times(res.error / res.bound)} times the bound"


def _options(bug: Bug) -> str:
    shown = [f"{k}={list(v)!r}" for k, v in bug.options.items()]
    return ", ".join(["impl"] + [f"{k}=..." for k in bug.buggy() if k != "impl"] + shown)


EXAMPLE = '''from lora_ref.kit.bugs import BUGS, run_bug

bug = {bugs}[0]
print(bug.software, bug.version, "-", bug.title)
print("released:", run_bug(bug).summary())
print("fixed:   ", run_bug(bug, fixed=True).summary())
print(run_bug(bug).failed[0])'''


def render_page() -> str:
    """docs/bugs.md: every entry, its case, its check and the kit's verdict on both versions."""
    rows, sections = [], []
    for i, bug in enumerate(BUGS, start=1):
        buggy, fixed = run_bug(bug), run_bug(bug, fixed=True)
        real = "real package + re-implementation" if bug.package else "re-implementation"
        rows.append(f"| {i} | {bug.software} | {bug.version} | {bug.title} | {real} | "
                    f"{', '.join(f'`{p}`' for p in buggy.failed_names)} |")
        props = _properties(bug.check)
        case = "\n".join(f"  * `{p}`: {props[p]}" for p in dict.fromkeys(r.name for r in buggy))
        table = "\n".join(f"| `{r.name}{':' + r.output if r.output else ''}` | {r.dtype} | {verdict(r)} |"
                          for r in buggy)
        sections.append(f"""## {i}. {bug.software} {bug.version}: {bug.title}

{bug.facts}

* Check: `{_CALLS[bug.check]}({_options(bug)})`, on these properties:
{case}
* Released behaviour ({bug.name}): {buggy.summary()}.

| property | dtype | kit's verdict |
|---|---|---|
{table}

* Fixed ({bug.fix}): {fixed.summary()}.
* Run against: {bug.real}. Source: {bug.source}.
""")
    example = EXAMPLE.format(bugs="BUGS")
    namespace: dict[str, Any] = {}
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        exec(example, namespace)                                              # the page's own example
    return f"""# Known bugs in shipping LoRA implementations

<!-- generated from lora_ref/kit/bugs.py by `python -m lora_ref.kit.bugs --write docs/bugs.md`
     (or `python -m pytest tests/test_bugs.py --write-bugs-page`); tests/test_bugs.py checks it -->

lora-ref's kit is worth what it catches. Each entry below is a bug in released software (or a
default that differs from PEFT's), the smallest case that shows it, and the kit's verdict: which
properties fail and by how much, next to the bound each had to meet (docs/oracle.md explains the
bounds). Each entry is a test in tests/test_bugs.py: the kit must fail the released behaviour on
exactly the properties listed, and pass the fixed one.

How the verdicts were obtained. The numbers on this page come from NumPy re-implementations of
each program's code path, written from its source (lora_ref/kit/wrong.py and wrong_many.py), so
that the page is the same on every machine; they are rounded to one significant digit. Where the
software can be installed (PEFT, loralib, bitsandbytes with torch and transformers: the interop
extra; Keras 3 with the torch backend), tests/test_bugs.py runs the same check on the real
package too, and requires the same verdict: the same properties failing in the same dtypes, the
same errors within a factor of two, the same mismatch counts and error messages ("real package +
re-implementation" below). vLLM, llama.cpp and SGLang cannot be installed here: their entries
are re-implementations only, written from the facts in the source files named.

| # | software | version | bug | run against | properties the released behaviour fails |
|---|---|---|---|---|---|
{chr(10).join(rows)}

{chr(10).join(sections)}
## Running an entry yourself

`lora_ref.kit.bugs.BUGS` holds the entries; `run_bug(bug)` runs the kit on the released behaviour
and `run_bug(bug, fixed=True)` on the fixed one, and `run_bug(bug, callables)` on your own
(the keyword arguments of the entry's check). tests/test_bugs.py passes the real packages that way.

```python
{example}
```

```output
{buffer.getvalue()}```

Five checks here go beyond the variants' own (lora_ref/kit/bug_checks.py, re-exported by
lora_ref.kit.bugs): `check_tied_embedding_merge` (merging into a table the output head shares),
`check_dora_base_gradient` (DoRA's dL/dW for a trained base weight), `check_merge_cycles` (merge
and unmerge, repeated, on a 16-bit weight), `check_dora_combination` (combining DoRA adapters
keeps their magnitudes) and `check_lora_conv3d` (the conv contract on a 3-D convolution). They
take the kit's calling convention and return its report. docs/oracle.md shows the workflow
for every variant; docs/vectors-format.md the golden vectors.
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_ref.kit.bugs", description="write docs/bugs.md")
    parser.add_argument("--write", metavar="PAGE", type=Path, nargs="?", const=PAGE, default=None,
                        help=f"write the page there (default {PAGE}); without --write, print it")
    args = parser.parse_args(argv)
    page = render_page()
    if args.write is None:
        sys.stdout.write(page)
    else:
        args.write.write_text(page)
        print(f"wrote {args.write}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
