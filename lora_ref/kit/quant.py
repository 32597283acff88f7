"""The kit for QLoRA's 4-bit quantisation (:mod:`lora_ref.quant`): bit for bit, no tolerance.

``quantize_4bit`` and ``dequantize_4bit`` are defined to the bit by bitsandbytes' conventions
(row-major blocks that may span rows and end partial, per-block absmax, nearest level with
exact halfway values going to the LOWER level, the first value in the HIGH nibble, the absmax
vector double-quantised with its mean subtracted), so every property here is exact: the report
counts mismatching entries and shows the first. The one float a quantiser returns besides its
arrays, the double quantisation's offset (the mean of absmax), is checked for equality too: the
cases make every block's absmax a multiple of 1/8, so the sum is exact in float32 in any order
and the mean is one correctly rounded division, the same for every correct implementation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from .core import Call, LoraCheckReport, Output, numpy_dtype, run_check

__all__ = ["QUANT_DTYPES", "QUANT_PROPERTIES", "check_quantize_4bit", "draw_quant_case", "quant_calls"]

QUANT_DTYPES = ("float32", "float16", "bfloat16")

QUANT_PROPERTIES: dict[str, str] = {
    "nf4": "W (8, 64), blocksize 64, NF4: packed codes (first value in the high nibble) and absmax",
    "fp4": "the same in bitsandbytes' FP4 (codes are bit patterns, not value order)",
    "blocks_span_rows": "W (6, 48), blocksize 64: blocks of the row-major flattening span rows, the last is partial "
                        "(rows of a multiple of 16, as bitsandbytes' AVX-512 CPU kernel takes)",
    "odd_count": "W (3, 7), FP4: 21 values, one partial block, the last byte padded with the code of 0",
    "ties": "W (2, 32) with absmax 1 and values exactly halfway between NF4 levels: they go to the lower level "
            "(exact halfway values exist in float32 only)",
    "blocksize_256": "W (4, 128), blocksize 256: one block spanning all four rows, and a partial one none",
    "double_quant": "W (16, 1040), NF4, double quantisation: absmax (260 blocks) minus its mean, 8-bit codes in "
                    "two nested blocks of 256, nested absmax, the offset",
    "dequant_nf4": "dequantize the 'nf4' state: level[code] * absmax in float32, cast to W's dtype",
    "dequant_fp4": "dequantize the 'fp4' state",
    "dequant_blocks_span_rows": "dequantize the 'blocks_span_rows' state",
    "dequant_odd_count": "dequantize the 'odd_count' state (the padding nibble is not a value)",
    "dequant_double_quant": "dequantize the 'double_quant' state: absmax = map[code] * nested_absmax + offset",
}
"""Every quantisation property, with what it checks."""

# name -> (shape, blocksize, quant_type, double_quant)
_SPECS = {"nf4": ((8, 64), 64, "nf4", False), "fp4": ((8, 64), 64, "fp4", False),
          "blocks_span_rows": ((6, 48), 64, "nf4", False), "odd_count": ((3, 7), 64, "fp4", False),
          "ties": ((2, 32), 64, "nf4", False), "blocksize_256": ((4, 128), 256, "nf4", False),
          "double_quant": ((16, 1040), 64, "nf4", True)}
_NEEDS = {p: "dequantize" for p in QUANT_PROPERTIES if p.startswith("dequant_")}


def draw_quant_case(shape: tuple[int, ...], blocksize: int, quant_type: str, seed: Any, *, ties: bool = False,
                    dyadic_absmax: bool = False) -> np.ndarray:
    """A float64 W of ``shape``: standard normal; with ``ties`` one block of [1, the 15 float32
    midpoints of the levels] repeated (absmax 1, so the scaled values are the midpoints exactly);
    with ``dyadic_absmax`` each block rescaled so that its absmax is k/8, k in [8, 64]."""
    from .. import quant as q

    rng = np.random.default_rng(seed)
    n = math.prod(shape)
    W = rng.standard_normal(n)
    if ties:
        levels = np.sort((q.nf4_levels() if quant_type == "nf4" else q.fp4_levels()).astype(np.float32))
        mids = (levels[:-1] + levels[1:]) / np.float32(2.0)                  # float32, as bitsandbytes
        W = np.resize(np.concatenate([[1.0], mids.astype(np.float64)]), n)
    if dyadic_absmax:
        for start in range(0, n, blocksize):
            block = W[start:start + blocksize]
            W[start:start + blocksize] = block / np.max(np.abs(block)) * (rng.integers(8, 65) / 8.0)
    return W.reshape(shape)


def _weight(n: int) -> Callable:
    """pick: the packed weight, accepted as ((n + 1) // 2,) or bitsandbytes' ((n + 1) // 2, 1)."""
    def pick(state: Any) -> tuple[Any, str]:
        w = state.get("weight") if isinstance(state, Mapping) else getattr(state, "weight", None)
        if w is None:
            return None, f"impl must return a mapping (or object) with 'weight', got {type(state).__name__}"
        w = np.asarray(w)
        return (w.reshape(-1) if w.shape == ((n + 1) // 2, 1) else w), ""
    return pick


def quant_calls(W: np.ndarray, blocksize: int, quant_type: str, double_quant: bool, which: str) -> Call:
    """The call of ``which`` ("impl": quantise W, or "dequantize": dequantise lora-ref's state of W)
    with lora-ref's exact result. W is already in its dtype."""
    from .. import quant as q

    state = q.quantize_4bit(W, blocksize, quant_type, double_quant)
    dtype = W.dtype.name
    settings = {"blocksize": blocksize, "quant_type": quant_type}
    if which == "dequantize":
        expected = q.dequantize_4bit(state)
        kwargs = dict(settings, shape=tuple(W.shape), dtype=dtype, nested_absmax=state.nested_absmax,
                      nested_offset=state.nested_offset)
        return Call("dequantize", (state.weight.copy(), state.absmax.copy()), ("weight", "absmax"), kwargs,
                    (Output("W", expected, dtype),))
    outs = [Output("weight", state.weight, "uint8", pick=_weight(W.size)), Output("absmax", state.absmax, state.absmax.dtype.name, pick="absmax")]
    if double_quant:
        outs.append(Output("nested_absmax", state.nested_absmax, "float32", pick="nested_absmax"))
        outs.append(Output("nested_offset", np.asarray(float(state.nested_offset)), "any", np.zeros(()), 0.0, 0,
                           pick="nested_offset"))
    return Call("impl", (W,), ("W",), dict(settings, double_quant=double_quant), tuple(outs))


def _build(name: str, dtype: str, seed: int) -> Call:
    base = name[len("dequant_"):] if name.startswith("dequant_") else name
    shape, blocksize, quant_type, dq = _SPECS[base]
    W = draw_quant_case(shape, blocksize, quant_type, (seed, list(QUANT_PROPERTIES).index(base)),
                        ties=base == "ties", dyadic_absmax=dq)
    return quant_calls(W.astype(numpy_dtype(dtype)), blocksize, quant_type, dq,
                       "dequantize" if name.startswith("dequant_") else "impl")


def check_quantize_4bit(impl: Callable, *, dequantize: Callable | None = None, properties: Iterable[str] | None = None,
                        dtypes: Sequence[str] = QUANT_DTYPES, seed: int = 0) -> LoraCheckReport:
    """Run the 4-bit properties (:data:`QUANT_PROPERTIES`) against your quantiser, bit for bit.

    Parameters
    ----------
    impl : callable
        ``impl(W, *, blocksize, quant_type, double_quant) -> state``: W any shape, float32, float16
        or bfloat16 (ml_dtypes); ``state`` a mapping (or an object with these attributes):
        ``"weight"`` uint8 ((n + 1) // 2,) (or bitsandbytes' ((n + 1) // 2, 1)), two codes per
        byte, the first value in the high nibble; ``"absmax"`` float32 (nb,), nb = ceil(n /
        blocksize), or uint8 (nb,) 8-bit codes when ``double_quant``; and when ``double_quant``
        ``"nested_absmax"`` float32 (ceil(nb / 256),) and ``"nested_offset"`` (a float).
    dequantize : callable, optional
        ``dequantize(weight, absmax, *, shape, dtype, blocksize, quant_type, nested_absmax,
        nested_offset) -> W`` of ``shape`` and ``dtype``: lora-ref's state of the case, to be
        dequantised bit for bit (``nested_absmax`` and ``nested_offset`` None without double
        quantisation). Enables the ``dequant_*`` properties.
    properties, seed
        As in every check (:mod:`lora_ref.testing`).
    dtypes : sequence of str
        W's dtypes: float32, float16, bfloat16 (default all three).

    Every output is compared exactly (:func:`lora_ref.kit.core.compare_exact`): a result counts
    the mismatching entries (``mismatches``) and shows the first.
    """
    return run_check(impl=impl, callables={"dequantize": dequantize}, properties=properties, dtypes=dtypes,
                     seed=seed, known=QUANT_PROPERTIES, default=tuple(QUANT_PROPERTIES), needs=_NEEDS,
                     allowed=QUANT_DTYPES, build=_build)
