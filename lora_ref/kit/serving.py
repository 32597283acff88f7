"""The kit for serving many adapters in one batch (:mod:`lora_ref.serving`, docs/serving.md):
the shrink and expand kernels, and a whole serving step from the adapters as loaded.

Contract (docs/serving.md): S the storage dtype (float64, float32, float16, bfloat16), Acc the
accumulation dtype (float64 for float64, float32 otherwise)::

    shrink  h[s, t] = scale * A_s[i] x[t]  (in Acc; 0 where i = indices[t] = -1)
    expand  y'[t, off_s:off_s + w_s] = y + h[s, t] B_s[i]^T  (rounded to S; unchanged where i = -1)
    serve   y'[t] = y[t] + s_i B_i A_i x[t]  per slice, the adapters' scales folded into B at load

Bounds: each computation is within ``E = ((1 + gamma_a(Acc)) (1 + gamma_b(S)) - 1) M`` of the
exact value (a roundings in Acc, b in S; docs/serving.md's derivation), the float64 reference
within ``gamma_{a+b}(float64) M``: :func:`serving_rtol`. Entries the contract copies (tokens with
-1, columns in no slice) have magnitude 0: they must come back bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from ..checks import positive_int
from ..lora import lora_scale
from ..serving import Segments, accumulation_dtype, add_lora, lora_expand, lora_shrink, stack_adapters, token_indices
from .core import Call, LoraCheckReport, Output, numpy_dtype, run_check, tolerance

__all__ = ["EXPAND_PROPERTIES", "SERVING_PROPERTIES", "SHRINK_PROPERTIES", "STORAGE_DTYPES", "check_lora_expand",
           "check_lora_shrink", "check_serving", "draw_serving_case", "serving_calls", "serving_rounding_counts",
           "serving_rtol"]

STORAGE_DTYPES = ("float64", "float32", "float16", "bfloat16")


def serving_rounding_counts(d_in: int, R: int) -> dict[str, tuple[int, int]]:
    """(roundings in Acc, roundings in S) for each output (docs/serving.md's bound E).

    * shrink ``h``: the d_in-term sum, the products when inexact (1), ``fl_Acc(scale)`` (1) and
      the product with it (1): ``(d_in + 3, 0)``.
    * expand ``y'``: the R-term sum and inexact products (R + 1), the add y + c in Acc (1); h
      rounded to S, c rounded to S, y + c rounded to S: ``(R + 2, 3)``.
    * serve ``y'``: the scale computed from alpha and r (2), the shrink and the expand sums and
      products (d_in + R + 2), the scale's rounding (1) and product (1), the add (1); three
      roundings to S plus the fold ``fl_S(B s)``: ``(d_in + R + 7, 4)``.
    """
    d_in, R = positive_int(d_in, "d_in"), positive_int(R, "R")
    return {"h": (d_in + 3, 0), "y_expand": (R + 2, 3), "y_serve": (d_in + R + 7, 4)}


def serving_rtol(storage: Any, n_acc: int, n_storage: int) -> float:
    """``((1 + gamma_a(Acc)) (1 + gamma_b(S)) - 1 + gamma_{a+b}(float64)) / (1 - gamma_{a+b}(float64))``:
    your rounding (a in Acc, b in S) plus the float64 reference's, M computed in float64 too."""
    g64 = tolerance("float64", n_acc + n_storage)
    acc = accumulation_dtype(storage)
    mixed = (1.0 + tolerance(acc, n_acc)) * (1.0 + tolerance(storage, n_storage)) - 1.0
    return (mixed + g64) / (1.0 - g64)


# ============================================================================================
# Cases
# ============================================================================================

_INDICES = {"plain": [0, 2, 1, 1, 0, 2, 1], "no_adapter": [0, -1, 1, 2, -1, 1, 0]}
_SEGMENTS = Segments(starts=[0, 2, 3, 6], lengths=[2, 1, 3, 1], indices=[1, -1, 2, 0])
# slot -> (rank, alpha, use_rslora): ranks 2, 4, 3 padded to R = 4; scales 1.5, 0.5, 2 (none is 1)
_SLOTS = [(2, 3.0, False), (4, 2.0, False), (3, 6.0, False)]


def draw_serving_case(dtype: str, seed: Any, *, widths: Sequence[int] = (6,), gap: int = 0,
                      slots: Sequence[tuple[int, float, bool] | None] = tuple(_SLOTS),
                      indices: Any = "plain", d_in: int = 8) -> dict[str, Any]:
    """A batch of T = 7 tokens in storage dtype ``dtype``: x (T, d_in), y (T, d_out), per slice
    (``widths``, separated and surrounded by ``gap`` columns in no slice) per slot an adapter record
    with A, B uniform in [-1, 1) (or None: an empty slot), the slices ``[(offset, width)]``, the
    indices (a name from ``_INDICES`` or a :class:`Segments`), and h (n_slices, T, R) in Acc."""
    rng = np.random.default_rng(seed)
    dt = numpy_dtype(dtype)
    u = lambda *shape: rng.uniform(-1.0, 1.0, size=shape).astype(dt)  # noqa: E731
    offsets, col = [], gap
    for w in widths:
        offsets.append(col)
        col += w + gap
    adapters = [[None if spec is None else {"A": u(spec[0], d_in), "B": u(w, spec[0]), "alpha": spec[1], "r": spec[0],
                                            "use_rslora": spec[2]} for spec in slots] for w in widths]
    R = max(spec[0] for spec in slots if spec is not None)
    acc = accumulation_dtype(dtype)
    return {"dtype": dtype, "x": u(7, d_in), "y": u(7, col), "adapters": adapters, "R": R,
            "slices": list(zip(offsets, widths)), "d_in": d_in,
            "indices": indices if isinstance(indices, Segments) else np.array(_INDICES[indices], dtype=np.int64),
            "h": rng.uniform(-1.0, 1.0, size=(len(widths), 7, R)).astype(acc)}


def _stacks(case: dict[str, Any], f64: bool = False, absolute: bool = False) -> tuple[list, list]:
    """Per slice (A_stack, B_stack), the scales folded into B (fl_S(B s)); in float64 (absolute
    values) with ``f64`` (``absolute``)."""
    def conv(a):
        a = np.asarray(a, dtype=np.float64) if f64 else a
        return np.abs(a) if absolute else a
    As, Bs = [], []
    for slots in case["adapters"]:
        ads = [None if a is None else (conv(a["A"]), conv(a["B"]), lora_scale(a["alpha"], a["r"], a["use_rslora"]))
               for a in slots]
        if absolute:
            ads = [None if t is None else (t[0], t[1], abs(t[2])) for t in ads]
        A, B = stack_adapters(ads, max_rank=case["R"])
        As.append(A)
        Bs.append(B)
    return As, Bs


def _copied(case: dict[str, Any]) -> np.ndarray:
    """(T, d_out) True where the contract copies y: tokens with -1 and columns in no slice."""
    T, d_out = case["y"].shape
    idx = case["indices"]
    tok = token_indices(idx, T) if isinstance(idx, Segments) else np.asarray(idx)
    inside = np.zeros(d_out, dtype=bool)
    for off, w in case["slices"]:
        inside[off:off + w] = True
    return (tok < 0)[:, None] | ~inside[None, :]


def serving_calls(case: dict[str, Any], which: str, *, scale: float = 1.0, extra_roundings: int = 0) -> Call:
    """The call of ``which`` ("shrink", "expand" or "serve") on a case, with lora-ref's float64
    result (the reference functions evaluated on float64 copies of the stored inputs)."""
    dtype, idx, slices = case["dtype"], case["indices"], case["slices"]
    f64 = lambda a: np.asarray(a, dtype=np.float64)  # noqa: E731
    counts = serving_rounding_counts(case["d_in"], case["R"])
    if which == "shrink":
        A_stack, _ = _stacks(case)
        A64, _ = _stacks(case, f64=True)
        Aabs, _ = _stacks(case, f64=True, absolute=True)
        expected = lora_shrink(f64(case["x"]), A64, idx, scale)
        magnitude = lora_shrink(np.abs(f64(case["x"])), Aabs, idx, abs(scale))
        a, b = counts["h"]
        out = Output("h", expected, accumulation_dtype(dtype), magnitude,
                     serving_rtol(dtype, a + extra_roundings, b), a + b + extra_roundings)
        return Call("impl", (case["x"], A_stack, idx, scale), ("x", "A_stack", "indices", "scale"), {}, (out,))
    copied = _copied(case)
    if which == "expand":
        _, B_stack = _stacks(case)
        h = case["h"]
        expected = lora_expand(f64(case["y"]), f64(h), [f64(B) for B in B_stack], idx, slices)
        magnitude = lora_expand(np.abs(f64(case["y"])), np.abs(f64(h)), [np.abs(f64(B)) for B in B_stack], idx, slices)
        a, b = counts["y_expand"]
        args, names = (case["y"], h, B_stack, idx, slices), ("y", "h", "B_stack", "indices", "slices")
    else:
        A64, B64 = _stacks(case, f64=True)
        Aabs, Babs = _stacks(case, f64=True, absolute=True)
        expected = add_lora(f64(case["y"]), f64(case["x"]), A64, B64, idx, 1.0, slices)
        magnitude = add_lora(np.abs(f64(case["y"])), np.abs(f64(case["x"])), Aabs, Babs, idx, 1.0, slices)
        a, b = counts["y_serve"]
        args, names = (case["y"], case["x"], case["adapters"], idx, slices), ("y", "x", "adapters", "indices", "slices")
    magnitude = np.where(copied, 0.0, magnitude)                   # copied entries: bit for bit
    out = Output("y", expected, dtype, magnitude, serving_rtol(dtype, a + extra_roundings, b), a + b + extra_roundings)
    return Call("impl", args, names, {}, (out,))


SHRINK_PROPERTIES: dict[str, str] = {
    "shrink": "h = scale x A_i^T per token (BGMV), 3 slots of ranks 2, 4, 3 zero-padded to R = 4, scale 1 (folded)",
    "shrink_scale": "the same with scale 0.75 applied in the shrink",
    "shrink_no_adapter": "tokens with index -1 (no adapter) get h = 0, not the last slot's",
    "shrink_segments": "SGMV: Segments(starts, lengths, indices) with a -1 sequence",
    "shrink_slices": "three slices (q/k/v), one A stack each",
}
EXPAND_PROPERTIES: dict[str, str] = {
    "expand": "y' = y + h B_i^T per token into one slice, rounded to the storage dtype",
    "expand_no_adapter": "tokens with index -1 keep y bit for bit",
    "expand_segments": "SGMV indices with a -1 sequence",
    "expand_slices": "three slices of widths 4, 2, 2 with a column in no slice around each: those keep y",
}
SERVING_PROPERTIES: dict[str, str] = {
    "serve": "y' = y + s_i B_i A_i x per token from the adapters as loaded (ranks 2, 4, 3; scales 1.5, 0.5, 2)",
    "serve_no_adapter": "tokens with index -1 keep y bit for bit",
    "serve_segments": "SGMV indices with a -1 sequence",
    "serve_slices": "three slices of widths 4, 2, 2 around columns in no slice",
    "serve_rslora": "slot 1 rsLoRA (r = 4, alpha = 3): its scale is alpha/sqrt(r) = 1.5, not alpha/r = 0.75",
    "serve_empty_slot": "slot 2 empty (None): its tokens keep y",
}


def _spec(name: str) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    if name.endswith("no_adapter"):
        kw["indices"] = "no_adapter"
    if name.endswith("segments"):
        kw["indices"] = _SEGMENTS
    if name.endswith("slices"):
        kw.update(widths=(4, 2, 2), gap=1)
    if name == "serve_rslora":
        kw["slots"] = (_SLOTS[0], (4, 3.0, True), _SLOTS[2])
    if name == "serve_empty_slot":
        kw["slots"] = (_SLOTS[0], _SLOTS[1], None)
    return kw


def _builder(props: dict[str, str], which: str, offset: int) -> Callable[[str, str, int], Call]:
    def build(name: str, dtype: str, seed: int) -> Call:
        case = draw_serving_case(dtype, (seed, offset + list(props).index(name)), **_spec(name))
        return serving_calls(case, which, scale=0.75 if name == "shrink_scale" else 1.0)
    return build


def _run(impl, props, which, offset, properties, dtypes, seed) -> LoraCheckReport:
    return run_check(impl=impl, callables={}, properties=properties, dtypes=dtypes, seed=seed, known=props,
                     default=tuple(props), needs={}, allowed=STORAGE_DTYPES, build=_builder(props, which, offset))


def check_lora_shrink(impl: Callable, *, properties: Iterable[str] | None = None,
                      dtypes: Sequence[str] = STORAGE_DTYPES, seed: int = 0) -> LoraCheckReport:
    """Run the shrink properties (:data:`SHRINK_PROPERTIES`) against your kernel.

    ``impl(x, A_stack, indices, scale) -> h`` (n_slices, T, R) in the accumulation dtype: x
    (T, d_in) in the storage dtype S; ``A_stack`` a list of (n, R, d_in) arrays, one per output
    slice, slot i holding adapter i's A in rows [0, r_i) and zeros after; ``indices`` (T,) int64
    in [-1, n) (BGMV) or a :class:`lora_ref.serving.Segments` (SGMV: starts, lengths, indices);
    ``scale`` a Python float. dtypes: any of float64, float32, float16, bfloat16 (ml_dtypes).
    """
    return _run(impl, SHRINK_PROPERTIES, "shrink", 0, properties, dtypes, seed)


def check_lora_expand(impl: Callable, *, properties: Iterable[str] | None = None,
                      dtypes: Sequence[str] = STORAGE_DTYPES, seed: int = 0) -> LoraCheckReport:
    """Run the expand properties (:data:`EXPAND_PROPERTIES`) against your kernel.

    ``impl(y, h, B_stack, indices, slices) -> y'`` (T, d_out) in S: y (T, d_out) in S; h
    (n_slices, T, R) in the accumulation dtype; ``B_stack`` a list of (n, w_s, R) arrays (slot i's
    B, scale folded in, in columns [0, r_i)); ``slices`` a list of (offset, width); indices as for
    the shrink. y must not be modified; a new array comes back.
    """
    return _run(impl, EXPAND_PROPERTIES, "expand", 20, properties, dtypes, seed)


def check_serving(impl: Callable, *, properties: Iterable[str] | None = None,
                  dtypes: Sequence[str] = STORAGE_DTYPES, seed: int = 0) -> LoraCheckReport:
    """Run a whole serving step (:data:`SERVING_PROPERTIES`) against your engine.

    ``impl(y, x, adapters, indices, slices) -> y'`` (T, d_out): ``adapters[s][i]`` is slot i's
    adapter record for slice s (``{"A", "B", "alpha", "r", "use_rslora"}``, A (r_i, d_in), B
    (w_s, r_i), in S) or None for an empty slot. Your engine loads them (stacks, pads, folds or
    applies the scales) and runs its kernels; the result is held to ``y + s_i B_i A_i x`` per token.
    """
    return _run(impl, SERVING_PROPERTIES, "serve", 40, properties, dtypes, seed)
