"""The bug catalogue's own checks (:mod:`lora_ref.kit.bugs`): what the variants' checks
(:data:`lora_ref.testing.CHECKS`) do not cover, each with the kit's calling convention and report.

* :func:`check_tied_embedding_merge`: merging an embedding adapter into a table the output head
  shares (``tie_word_embeddings``), which the unmerged model does not adapt unless asked.
* :func:`check_dora_base_gradient`: DoRA's dL/dW for a base weight that is trained.
* :func:`check_merge_cycles`: merge then unmerge, repeated, on a 16-bit weight.
* :func:`check_dora_combination`: a weighted combination of DoRA adapters keeps their magnitudes.
* :func:`check_lora_conv3d`: the conv contract on a 3-D convolution.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
from autograd import make_vjp

from ..cases import LoraCase
from ..dora import dora_linear, dora_magnitude, dora_magnitudes, dora_merge, dora_rounding_counts
from ..embedding import merge_embedding
from ..lora import lora_scale
from .conv import conv_calls, draw_conv_case
from .core import (Call, LoraCheckReport, Output, bounded_output, numpy_dtype, property_call, reference_rtol,
                   run_check)
from .dora import draw_dora_case

__all__ = ["CATALOGUE_CHECKS", "CONV3D_PROPERTIES", "DORA_BASE_GRADIENT_PROPERTIES", "DORA_COMBINE_PROPERTIES",
           "MERGE_CYCLE_PROPERTIES", "TIED_MERGE_PROPERTIES", "check_dora_base_gradient", "check_dora_combination",
           "check_lora_conv3d", "check_merge_cycles", "check_tied_embedding_merge"]


# ============================================================================================
# Tied tables: merging an embedding adapter when the output head shares the table
# ============================================================================================

TIED_MERGE_PROPERTIES: dict[str, str] = {
    "tied_merge": "E (12, 8) shared by the lookup and the output head, an adapter on the lookup only: merged, "
                  "the lookup's table is E + s (B A)^T and the head's is still E, bit for bit (as unmerged)",
    "tied_merge_head_adapted": "the head adapted too, by the same factors (PEFT's ensure_weight_tying): both "
                               "tables E + s (B A)^T, the delta added once",
}


def _build_tied(name: str, dtype: str, seed: int) -> Call:
    rng = np.random.default_rng((seed, list(TIED_MERGE_PROPERTIES).index(name)))
    V, D, r, alpha = 12, 8, 2, 4.0
    E, A, B = (rng.standard_normal(shape).astype(dtype) for shape in ((V, D), (r, V), (D, r)))
    f64 = lambda t: t.astype(np.float64)  # noqa: E731
    s = lora_scale(alpha, r)
    merged = merge_embedding(f64(E), f64(A), f64(B), s)                        # (V, D) = E + s (B A)^T
    magnitude = merge_embedding(*(np.abs(f64(t)) for t in (E, A, B)), abs(s))  # the same on |.|
    head_adapted = name == "tied_merge_head_adapted"
    n = r + 6                                                                  # as a merged linear weight
    outs = (bounded_output("input_table", merged, dtype, magnitude, n, 0),
            bounded_output("head_table", merged if head_adapted else f64(E), dtype,
                           magnitude if head_adapted else np.zeros_like(magnitude), n, 1))
    return Call("impl", (E, A, B), ("E", "A", "B"), {"alpha": alpha, "r": r, "use_rslora": False,
                                                      "head_adapted": head_adapted}, outs, ("E_input", "E_head"))


def check_tied_embedding_merge(impl: Callable, *, properties: Iterable[str] | None = None,
                               dtypes: Sequence[str] = ("float64", "float32"), seed: int = 0) -> LoraCheckReport:
    """Run :data:`TIED_MERGE_PROPERTIES` against your merge of a tied model's embedding adapter.

    ``impl(E, A, B, *, alpha, r, use_rslora, head_adapted) -> (E_input, E_head)``: E (V, D) the
    table the lookup and the output head share, A (r, V), B (D, r) the embedding adapter
    (PEFT's ``lora_embedding_A`` / ``_B``); ``head_adapted`` whether the unmerged model's head
    carries the adapter too (PEFT's ``ensure_weight_tying=True``). Return the tables the merged
    model uses for the lookup and for the head: the merged model must compute what the
    unmerged one did. ``properties``, ``dtypes``, ``seed`` as in every check.
    """
    return run_check(impl=impl, callables={}, properties=properties, dtypes=dtypes, seed=seed,
                     known=TIED_MERGE_PROPERTIES, default=tuple(TIED_MERGE_PROPERTIES), needs={},
                     allowed=("float32", "float64"), build=_build_tied)


# ============================================================================================
# DoRA: the gradient of a trained base weight
# ============================================================================================

DORA_BASE_GRADIENT_PROPERTIES: dict[str, str] = {
    "grad_W": "dL/dW of DoRA's layer for L = sum(y * dy), W (5, 7) trained, PEFT's dropout form, the norm detached",
    "grad_W_fan_in_fan_out": "the same with W stored (d_in, d_out) (GPT-2's Conv1D): dL/dW in W's layout",
}


def _build_dora_base(name: str, dtype: str, seed: int) -> Call:
    fifo = name.endswith("fan_in_fan_out")
    spec = LoraCase(d_in=7, d_out=5, r=3, alpha=6.0, dropout_p=0.5, fan_in_fan_out=fifo)
    case, m = draw_dora_case(spec, (seed, 50 + list(DORA_BASE_GRADIENT_PROPERTIES).index(name)))
    c = case.astype(dtype)
    f64 = lambda t: np.asarray(t, dtype=np.float64)  # noqa: E731
    x, W, A, B, mm, bias, mask, dy = (f64(t) for t in (c.x, c.W, c.A, c.B, m.astype(dtype), c.bias, c.mask, c.dy))
    s = c.scale                                                                # W is (d_out, d_in) here
    vjp, _ = make_vjp(lambda WW: dora_linear(x, WW, A, B, mm, s, bias, mask, True))(W)
    dW = vjp(dy)
    mag = dora_magnitudes(x, W, A, B, mm, s, bias=bias, dropout_mask=mask, dy=dy, detach_norm=True)["dW"]
    n = dora_rounding_counts(c.d_in, c.d_out, c.r, c.n_tokens)["dW"]
    layout = (lambda t: t.T) if fifo else (lambda t: t)  # noqa: E731
    out = bounded_output("dW", layout(dW), dtype, layout(mag), n)
    settings = {"alpha": c.alpha, "r": c.r, "use_rslora": False, "bias": c.bias, "dropout_mask": c.mask,
                "fan_in_fan_out": fifo}
    return Call("impl", (c.x, c.W_stored, c.A, c.B, m.astype(dtype), c.dy), ("x", "W", "A", "B", "m", "dy"),
                settings, (out,))


def check_dora_base_gradient(impl: Callable, *, properties: Iterable[str] | None = None,
                             dtypes: Sequence[str] = ("float64", "float32"), seed: int = 0) -> LoraCheckReport:
    """Run :data:`DORA_BASE_GRADIENT_PROPERTIES` against your DoRA layer's gradient of W.

    ``impl(x, W, A, B, m, dy, *, alpha, r, use_rslora, bias, dropout_mask, fan_in_fan_out) -> dW``:
    the arguments of :func:`lora_ref.testing.check_dora_linear`'s ``grad``; return dL/dW for
    ``L = sum(y * dy)``, in W's layout, with the norm treated as a constant (PEFT's, Section 4.3
    of the DoRA paper). Only a model that trains its base weight needs it.
    """
    return run_check(impl=impl, callables={}, properties=properties, dtypes=dtypes, seed=seed,
                     known=DORA_BASE_GRADIENT_PROPERTIES, default=tuple(DORA_BASE_GRADIENT_PROPERTIES), needs={},
                     allowed=("float32", "float64"), build=_build_dora_base)


# ============================================================================================
# Merge and unmerge, repeated, on a 16-bit weight
# ============================================================================================

MERGE_CYCLE_PROPERTIES: dict[str, str] = {
    "one_cycle": "W (8, 8) in the dtype, float32 factors A (2, 8), B (8, 2) (PEFT's default adapter dtype) "
                 "whose s B A, s = 2, is exact in float32 but not in the dtype: merge then unmerge gives W back within gamma_4 (|W| + |s| |B| |A|)",
    "hundred_cycles": "100 cycles: still within that one-cycle bound (merge and unmerge that use one delta reach "
                      "a fixed point; two differently rounded deltas make W drift)",
}
_CYCLES = {"one_cycle": 1, "hundred_cycles": 100}


def _build_cycles(name: str, dtype: str, seed: int) -> Call:
    from ..precision import round_to

    rng = np.random.default_rng((seed, 60 + list(MERGE_CYCLE_PROPERTIES).index(name)))
    d, r, alpha = 8, 2, 4.0
    W = rng.uniform(-1 / math.sqrt(d), 1 / math.sqrt(d), (d, d))                 # nn.Linear's initialisation
    # Multiples of 2^-10 in (-1, 1): s B A (multiples of 2^-19 below 4) is exact in float32 in any
    # summation order, so the case is the same on every CPU, but not in a 16-bit dtype.
    A, B = (rng.integers(-1023, 1024, shape).astype(np.float32) / np.float32(1024) for shape in ((r, d), (d, r)))
    W = round_to(W, dtype)                                                     # float64 holding the dtype's values
    s = lora_scale(alpha, r)
    magnitude = np.abs(W) + abs(s) * (np.abs(B.astype(np.float64)) @ np.abs(A.astype(np.float64)))
    W_in = W.astype(numpy_dtype(dtype))
    out = bounded_output("W", W, dtype, magnitude, 4)
    return Call("impl", (W_in, A, B), ("W", "A", "B"),
                {"alpha": alpha, "r": r, "use_rslora": False, "cycles": _CYCLES[name]}, (out,))


def check_merge_cycles(impl: Callable, *, properties: Iterable[str] | None = None,
                       dtypes: Sequence[str] = ("bfloat16", "float16"), seed: int = 0) -> LoraCheckReport:
    """Run :data:`MERGE_CYCLE_PROPERTIES` against your merge / unmerge of a LoRA layer.

    ``impl(W, A, B, *, alpha, r, use_rslora, cycles) -> W'``: W (d_out, d_in) in the dtype
    (bfloat16 is ml_dtypes'), A (r, d_in) and B (d_out, r) float32; merge the adapter into W
    and unmerge it ``cycles`` times, and return W (its dtype). The bound is that of one cycle,
    ``gamma_4 (|W| + |s| |B| |A|)`` (each of merge and unmerge rounds once in float32 and once to
    the dtype; a delta used both ways cancels). ``dtypes``: bfloat16, float16, float32.
    """
    return run_check(impl=impl, callables={}, properties=properties, dtypes=dtypes, seed=seed,
                     known=MERGE_CYCLE_PROPERTIES, default=tuple(MERGE_CYCLE_PROPERTIES), needs={},
                     allowed=("bfloat16", "float16", "float32"), build=_build_cycles)


# ============================================================================================
# Combining DoRA adapters; a 3-D convolution
# ============================================================================================

DORA_COMBINE_PROPERTIES: dict[str, str] = {
    "dora_one_source": "one DoRA adapter on W (5, 6), r 2, s 1, its trained m not ||W + s B A||, weight 1: the "
                       "combination is that adapter, m' V' / ||V'|| = m V / ||V|| row by row (V = W + s B A)",
}


def _build_dora_combine(name: str, dtype: str, seed: int) -> Call:
    rng = np.random.default_rng((seed, 70))
    d_out, d_in, r, alpha = 5, 6, 2, 2.0
    W, A, B = (rng.standard_normal(shape).astype(dtype) for shape in ((d_out, d_in), (r, d_in), (d_out, r)))
    f64 = lambda t: np.asarray(t, dtype=np.float64)  # noqa: E731
    s = lora_scale(alpha, r)
    m = (dora_magnitude(f64(W), f64(A), f64(B), s) * rng.uniform(0.5, 1.5, d_out)).astype(dtype)   # trained
    V = np.abs(f64(W)) + abs(s) * np.abs(f64(B)) @ np.abs(f64(A))                 # |W| + |s| |B| |A|
    magnitude = np.abs(f64(m))[:, None] * V / np.linalg.norm(f64(W) + s * f64(B) @ f64(A), axis=1)[:, None]
    n = r + d_in + 10          # V' (r + 3), its norm (d_in + 2), m / norm and the product (2), A', B' (3)

    def pick(got: Any) -> tuple[Any, str]:
        if not isinstance(got, (tuple, list)) or len(got) != 4:
            return None, f"impl must return a tuple (A, B, scale, m), got {type(got).__name__}"
        A2, B2, s2, m2 = f64(got[0]), f64(got[1]), float(got[2]), f64(got[3])
        if A2.ndim != 2 or B2.shape != (d_out, A2.shape[0]) or A2.shape[1] != d_in or m2.shape != (d_out,):
            return None, f"A {A2.shape}, B {B2.shape} and m {m2.shape} do not form a DoRA adapter of W {W.shape}"
        return dora_merge(f64(W), A2, B2, m2, s2), ""
    adapters = {"src": {"A": A, "B": B, "m": m, "alpha": alpha, "r": r, "use_rslora": False}}
    out = Output("W_dora", dora_merge(f64(W), f64(A), f64(B), f64(m), s), "any", magnitude,
                 reference_rtol(dtype, n), n, pick)
    return Call("impl", (W, adapters, [1.0]), ("W", "adapters", "weights"), {}, (out,), ("A", "B", "scale", "m"))


def check_dora_combination(impl: Callable, *, properties: Iterable[str] | None = None,
                           dtypes: Sequence[str] = ("float64", "float32"), seed: int = 0) -> LoraCheckReport:
    """Run :data:`DORA_COMBINE_PROPERTIES` against your combination of DoRA adapters.

    ``impl(W, adapters, weights) -> (A, B, scale, m)``: W (d_out, d_in), ``adapters`` a mapping
    of name to ``{"A": (r, d_in), "B": (d_out, r), "m": (d_out,), "alpha", "r", "use_rslora"}``,
    ``weights`` one per adapter; return the combined DoRA adapter. The kit compares the layer's
    weight ``m (W + s B A) / ||W + s B A||`` (rows), formed in float64 from what you return.
    """
    return run_check(impl=impl, callables={}, properties=properties, dtypes=dtypes, seed=seed,
                     known=DORA_COMBINE_PROPERTIES, default=tuple(DORA_COMBINE_PROPERTIES), needs={},
                     allowed=("float32", "float64"), build=_build_dora_combine)


CONV3D_PROPERTIES: dict[str, str] = {
    "forward_3d": "3-D: C_in 2, C_out 3, x (2, 2, 4, 4, 4), kernel (3, 3, 3), padding 1, bias",
    "merge_3d": "merge(W, A, B) = W + s sum_r B[o, r] A[r, i, t], (C_out, C_in, 3, 3, 3)",
}
_CONV3D = dict(C_in=2, C_out=3, size=(4, 4, 4), kernel=(3, 3, 3), r=2, alpha=4.0, geometry=dict(padding=1))


def check_lora_conv3d(impl: Callable, *, merge: Callable | None = None, properties: Iterable[str] | None = None,
                      dtypes: Sequence[str] = ("float64", "float32"), seed: int = 0) -> LoraCheckReport:
    """Run :data:`CONV3D_PROPERTIES`: :func:`lora_ref.testing.check_lora_conv`'s contract (``impl``,
    ``merge``) on a 3-D convolution, which that check's cases (1-D and 2-D) do not reach."""
    def build(name: str, dtype: str, seed: int) -> Call:
        case = draw_conv_case(_CONV3D, (seed, 80 + list(CONV3D_PROPERTIES).index(name)))
        return property_call(name, lambda which: conv_calls(case, _CONV3D, dtype, [which])[0])
    return run_check(impl=impl, callables={"merge": merge}, properties=properties, dtypes=dtypes, seed=seed,
                     known=CONV3D_PROPERTIES, default=tuple(CONV3D_PROPERTIES), needs={"merge_3d": "merge"},
                     allowed=("float32", "float64"), build=build)


CATALOGUE_CHECKS = {"tied_embedding_merge": check_tied_embedding_merge,
                    "dora_base_gradient": check_dora_base_gradient, "merge_cycles": check_merge_cycles,
                    "dora_combination": check_dora_combination, "lora_conv3d": check_lora_conv3d}
"""The catalogue's own checks, by name (the variants' checks are :data:`lora_ref.testing.CHECKS`)."""
