"""QLoRA's 4-bit base, the math: NormalFloat, blockwise quantisation, double quantisation.

Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", arXiv 2305.14314 (v1).
Read top to bottom: Section 2's blockwise quantisation (Eq. 1, 2), Section 3's 4-bit NormalFloat
(Eq. 4) and double quantisation, the weight a layer uses (Eq. 6), error bounds, merging, and
the QLoRA layer (Eq. 5: :func:`linear_4bit`; hosts use :func:`base_weight` for a QuantState).

Eq. 1   X^q = round(c X),  c = 1 / absmax(X), per block      (the paper: 127 / absmax for Int8)
Eq. 2   dequant(c, X^q) = X^q / c
Eq. 4   q_i = (Q_X(i / (2^k + 1)) + Q_X((i + 1) / (2^k + 1))) / 2     (k-bit quantile quantisation)
Eq. 5   Y = X doubleDequant(c1, c2, W^NF4) + X L1 L2           (QLoRA: the base is 4-bit, LoRA not)
Eq. 6   doubleDequant(c1, c2, W^k-bit) = dequant(dequant(c1, c2), W^4bit) = W

"round" is "the nearest level of a 16-entry table": NF4 (Section 3) or FP4. This file is the
reference, and it is bit-for-bit bitsandbytes 0.50.2 on the CPU, whose conventions it states:

* layout: W of any shape is flattened row-major; blocks of ``blocksize`` (b) consecutive values
  may span rows; the last block may be partial. n = W.size, nb = ceil(n / b) blocks.
* scale: absmax per block in float32; a full block is scaled by ``x * fl(1 / absmax)``, the
  partial last block by ``x / absmax`` (bitsandbytes does both; the last bits can differ).
* rounding: nearest level; a value exactly halfway between two levels goes to the LOWER level
  (``bucketize`` on the float32 midpoints). FP4's codes are its bit patterns, not value order.
* packing: two 4-bit codes per byte, the FIRST value in the HIGH nibble; an odd n is padded with
  the code of 0. Dequantised: ``fl(level[code] * absmax)`` in float32, cast to the dtype.
* double quantisation (Section 3): absmax (nb,) minus its mean, quantised blockwise (256) to 8
  bits with bitsandbytes' signed dynamic map; bitsandbytes' CPU kernel picks each 8-bit code
  through a 65,536-point table (:func:`double_quantize`), so a code can differ from the exact
  nearest level; lora-ref follows it. Dequantised: ``fl(fl(code * nested_absmax) + offset)``.

NumPy only: this is the bit level (float32 arithmetic, ml_dtypes' bfloat16); linear_4bit moves
the dequantised weight to its input's backend. Shapes: n values, nb = ceil(n / b) blocks, nb2 = ceil(nb / 256).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from fractions import Fraction
from functools import lru_cache
from typing import Any

import ml_dtypes
import numpy as np

from .backend import asarray, dtype_name, getval, to_numpy
from .checks import boolean, finite_real, float_array, is_int, shape_of
from .lora import lora_linear
from .precision import COMPUTE_DTYPES, mixed_linear
from .kit.core import tolerance, unit_roundoff

__all__ = ["BLOCKSIZES", "NESTED_BLOCKSIZE", "QUANT_TYPES", "QuantState", "base_weight", "dequantize_4bit",
           "dequantize_absmax", "double_quantize", "dynamic_map", "error_bound", "fp4_levels", "linear_4bit",
           "merge_4bit", "nf4_levels", "quantize_4bit", "quantize_params"]

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)   # what bitsandbytes' quantize_4bit accepts
QUANT_TYPES = ("nf4", "fp4")
NESTED_BLOCKSIZE = 256                                    # Section 3: "a blocksize of 256"
DTYPES = ("float32", "float16", "bfloat16")               # what bitsandbytes quantises
NF4_OFFSET = 0.9677083      # bitsandbytes' outermost quantile (~ mean of 1 - 1/30 and 1 - 1/32)
_F32 = np.float32

# ============================================================================================
# The levels: NF4 (Section 3, Eq. 4), FP4, and the 8-bit dynamic map of double quantisation
# ============================================================================================


def _round_f32(q: Fraction) -> np.float32:
    """The exact rational ``q`` rounded once to float32 (nearest, ties to even)."""
    y = _F32(float(q))
    near = [np.nextafter(y, _F32(-np.inf)), y, np.nextafter(y, _F32(np.inf))]
    return min(near, key=lambda c: (abs(Fraction(float(c)) - q), int(c.view(np.uint32)) & 1))


def _linspace_f32(start: float, stop: float, num: int) -> np.ndarray:
    """``torch.linspace(start, stop, num)`` in float32 on the CPU, which bitsandbytes builds its
    tables with: ``step = fl((stop - start) / (num - 1))``; the first half ``start + i step``, the
    second half ``stop - (num - 1 - i) step``, each one fused multiply-add (one rounding)."""
    a, z = _F32(start), _F32(stop)
    step = (z - a) / _F32(num - 1)
    S, A, Z = Fraction(float(step)), Fraction(float(a)), Fraction(float(z))
    return np.array([_round_f32(A + i * S if i < num // 2 else Z - (num - 1 - i) * S)
                     for i in range(num)], dtype=_F32)


@lru_cache(maxsize=None)
def _nf4() -> np.ndarray:
    from scipy.stats import norm
    # Eq. 4 made asymmetric so that 0 is exact: 8 positive quantiles of N(0, 1) between 0.5 and
    # NF4_OFFSET, 7 negative ones, and 0 (Section 3: "unify these sets ... remove one of the two zeros")
    pos = norm.ppf(_linspace_f32(NF4_OFFSET, 0.5, 9)[:-1].astype(np.float64))      # (8,)
    neg = -norm.ppf(_linspace_f32(NF4_OFFSET, 0.5, 8)[:-1].astype(np.float64))     # (7,)
    v = np.sort(np.concatenate([pos, [0.0], neg]).astype(_F32))                     # (16,)
    return _frozen(v / v.max())                                  # normalised into [-1, 1]


def nf4_levels() -> np.ndarray:
    """The 16 NF4 levels (float32, ascending; code i is level i), derived as bitsandbytes'
    ``create_normal_map`` derives them: -1.0, -0.6961928, ..., 0, 0.0795803, ..., 0.7229568, 1.0."""
    return _nf4().copy()


@lru_cache(maxsize=None)
def _fp4() -> np.ndarray:
    # bitsandbytes' FP4: bit 3 sign, bits 2-1 exponent e, bit 0 mantissa m;
    # |value| = 2^(4 - e) (1 + m / 2) for e = 1..3 (8, 12, 4, 6, 2, 3), and m / 16 for e = 0 (0, 0.0625)
    mag = [m / 16 if e == 0 else 2.0 ** (4 - e) * (1 + m / 2) for e in range(4) for m in range(2)]
    v = np.array(mag + [-x if x else 0.0 for x in mag], dtype=_F32)   # (16,) bit-pattern order;
    # code 8 (sign bit, zero) is +0.0 in bitsandbytes' tables (its list's "-0" is Python's int 0)
    return _frozen(v / np.abs(v).max())                           # divided by 12, in float32


def fp4_levels() -> np.ndarray:
    """The 16 FP4 levels (float32) in bit-pattern order, as bitsandbytes defines FP4: 1 sign bit,
    2 exponent bits, 1 mantissa bit, normalised by 12: [0, 1/192, 2/3, 1, 1/3, 1/2, 1/6, 1/4,
    0, -1/192, ...] (code 8 is +0.0, as in bitsandbytes). Not OCP's E2M1 (magnitudes 0, 0.5, 1,
    1.5, 2, 3, 4, 6)."""
    return _fp4().copy()


@lru_cache(maxsize=None)
def _dynamic() -> np.ndarray:
    # bitsandbytes' create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8): for each
    # decade 10^(i - 6), i = 0..6, the 2^i midpoints of linspace(0.1, 1, 2^i + 1), with both signs
    data = []
    for i in range(7):
        b = _linspace_f32(0.1, 1.0, 2 ** i + 1)
        means = (b[:-1] + b[1:]) / _F32(2.0)                                # (2^i,) float32
        data += list(_F32(10.0 ** (i - 6)) * means) + list(-(_F32(10.0 ** (i - 6)) * means))
    return _frozen(np.sort(np.array(data + [0.0, 1.0], dtype=_F32)))        # (256,)


def dynamic_map() -> np.ndarray:
    """bitsandbytes' signed 8-bit dynamic map (float32, (256,), ascending): 0, 1.0, and 127
    values of each sign spread over seven decades down to 5.5e-7; the smallest is -0.99296875
    (no -1). Double quantisation's 8-bit levels."""
    return _dynamic().copy()


def _frozen(a: np.ndarray) -> np.ndarray:
    a = np.array(a)
    a.setflags(write=False)
    return a


@lru_cache(maxsize=None)
def _bounds(quant_type: str) -> tuple[np.ndarray, np.ndarray]:
    """(midpoints (15,) float32 of the levels sorted by value, codes (16,) in value order)."""
    levels = _nf4() if quant_type == "nf4" else _fp4()
    order = np.argsort(levels, kind="stable")      # FP4's two zeros: code 0 sorts before code 8
    s = levels[order]
    return _frozen((s[:-1] + s[1:]) / _F32(2.0)), _frozen(order.astype(np.uint8))


# ============================================================================================
# The quantised state: bitsandbytes' QuantState, with its serialized key names
# ============================================================================================


@dataclass(frozen=True, eq=False)
class QuantState:
    """A 4-bit weight. Field names are bitsandbytes' serialized keys (``<module>.weight``,
    ``<module>.weight.absmax``, ...; the JSON blob ``weight.quant_state.bitsandbytes__<type>``
    holds ``quant_type, blocksize, dtype, shape`` and the ``nested_*`` scalars).

    weight            uint8 ((n + 1) // 2,)  two codes per byte, the first value in the high nibble
    absmax            float32 (nb,); uint8 (nb,) 8-bit codes when double-quantised
    quant_map         float32 (16,)   the levels, indexed by code
    shape, dtype      of the weight (dtype: float32, float16 or bfloat16)
    blocksize         b;  quant_type "nf4" | "fp4"
    nested_absmax     float32 (nb2,)  absmax of each 256-block of (absmax - offset), or None
    nested_quant_map  float32 (256,)  the dynamic map, or None
    nested_offset     float (a float32 value): the mean subtracted from absmax, or None
    nested_blocksize  256, nested_dtype "float32", or None
    compute_dtype     what a host computes this weight in (:func:`linear_4bit`): float64, float32,
                      float16, bfloat16, or None for the model's own dtype. Not in bitsandbytes'
                      tensors: transformers keeps it in config.json (``bnb_4bit_compute_dtype``).

    Immutable; arrays are read-only copies; ``==`` compares every bit.
    """

    weight: np.ndarray
    absmax: np.ndarray
    quant_map: np.ndarray
    shape: tuple[int, ...]
    dtype: str
    blocksize: int
    quant_type: str
    nested_absmax: np.ndarray | None = None
    nested_quant_map: np.ndarray | None = None
    nested_offset: float | None = None
    nested_blocksize: int | None = None
    nested_dtype: str | None = None
    compute_dtype: str | None = None

    def __post_init__(self) -> None:
        err = ValueError
        shape = self.shape
        if not isinstance(shape, tuple) or not shape or not all(is_int(d) and d >= 1 for d in shape):
            raise err(f"QuantState.shape must be a non-empty tuple of positive ints, got {shape!r}")
        if self.dtype not in DTYPES:
            raise err(f"QuantState.dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.compute_dtype is not None and self.compute_dtype not in COMPUTE_DTYPES:
            raise err(f"QuantState.compute_dtype must be None or one of {COMPUTE_DTYPES}, got {self.compute_dtype!r}")
        if self.quant_type not in QUANT_TYPES:
            raise err(f"QuantState.quant_type must be one of {QUANT_TYPES}, got {self.quant_type!r}")
        _check_blocksize(self.blocksize, "QuantState.blocksize")
        n = math.prod(shape)
        nb = -(-n // self.blocksize)
        nested = self.nested_absmax is not None
        fields = (self.nested_quant_map, self.nested_offset, self.nested_blocksize, self.nested_dtype)
        if any((f is None) == nested for f in fields):
            raise err("QuantState: nested_absmax, nested_quant_map, nested_offset, nested_blocksize and "
                      "nested_dtype must all be given (double quantisation) or all be None")
        expect = {"weight": ("uint8", ((n + 1) // 2,)), "absmax": ("uint8" if nested else "float32", (nb,)),
                  "quant_map": ("float32", (16,))}
        if nested:
            if not is_int(self.nested_blocksize) or self.nested_blocksize < 1:
                raise err(f"QuantState.nested_blocksize must be a positive int, got {self.nested_blocksize!r}")
            if self.nested_dtype != "float32":
                raise err(f"QuantState.nested_dtype must be 'float32', got {self.nested_dtype!r}")
            finite_real(self.nested_offset, "QuantState.nested_offset")
            if float(_F32(self.nested_offset)) != float(self.nested_offset):
                raise err(f"QuantState.nested_offset must be a float32 value, got {self.nested_offset!r}")
            expect["nested_absmax"] = ("float32", (-(-nb // self.nested_blocksize),))
            expect["nested_quant_map"] = ("float32", (256,))
        for name, (dt, shp) in expect.items():
            a = getattr(self, name)
            if not isinstance(a, np.ndarray) or a.dtype.name != dt or a.shape != shp:
                got = f"{a.dtype.name} {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
                raise err(f"QuantState.{name} must be a {dt} array of shape {shp} for shape {shape}, "
                          f"blocksize {self.blocksize}; got {got}")
            if dt == "float32" and not np.all(np.isfinite(a)):
                raise err(f"QuantState.{name} has non-finite values")
            object.__setattr__(self, name, _frozen(a))
        if not _same_bits(self.quant_map, _nf4() if self.quant_type == "nf4" else _fp4()):
            raise err(f"QuantState.quant_map is not the {self.quant_type} table; bitsandbytes dequantises "
                      "with its built-in table whatever quant_map holds, so lora-ref refuses a different one")

    @property
    def nested(self) -> bool:
        """Double-quantised (the absmax vector is itself 8-bit)."""
        return self.nested_absmax is not None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, QuantState):
            return NotImplemented
        a, b = vars(self), vars(other)
        return all(_same_bits(a[k], b[k]) for k in a)

    __hash__ = None  # type: ignore[assignment]

    def storage_bytes(self) -> dict[str, int]:
        """Bytes of each stored part: the 4-bit codes, the constants, the maps (for counting)."""
        parts = {k: getattr(self, k) for k in ("weight", "absmax", "quant_map", "nested_absmax", "nested_quant_map")}
        out = {k: int(v.nbytes) for k, v in parts.items() if v is not None}
        if self.nested:
            out["nested_offset"] = 4
        return out

    def to_bnb_tensors(self) -> dict[str, np.ndarray]:
        """The tensors bitsandbytes saves for this weight, keyed as after ``<module>.weight.``
        (and ``"weight"`` for ``<module>.weight``, shaped ((n + 1) // 2, 1) as bitsandbytes
        stores it); the JSON blob is UTF-8 bytes as a uint8 array, byte for byte bitsandbytes'."""
        blob = {"quant_type": self.quant_type, "blocksize": self.blocksize, "dtype": self.dtype,
                "shape": list(self.shape)}
        out = {"weight": self.weight.reshape(-1, 1).copy(), "absmax": self.absmax.copy(),
               "quant_map": self.quant_map.copy()}
        if self.nested:
            out["nested_absmax"] = self.nested_absmax.copy()
            out["nested_quant_map"] = self.nested_quant_map.copy()
            blob.update(nested_blocksize=self.nested_blocksize, nested_dtype=self.nested_dtype,
                        nested_offset=self.nested_offset)
        out[f"quant_state.bitsandbytes__{self.quant_type}"] = np.frombuffer(
            json.dumps(blob).encode("utf-8"), dtype=np.uint8).copy()
        return out

    @classmethod
    def from_bnb_tensors(cls, tensors: Mapping[str, Any], *, error: type[Exception] = ValueError,
                         compute_dtype: str | None = None) -> "QuantState":
        """Rebuild a state from bitsandbytes' serialized tensors (keys as :meth:`to_bnb_tensors`
        writes them; NumPy arrays, e.g. from ``safetensors.numpy``). Anything missing, extra or
        inconsistent raises ``error`` (a loader passes its file-format error) naming the key."""
        blobs = [k for k in tensors if k.startswith("quant_state.")]
        if len(blobs) != 1 or blobs[0] not in ("quant_state.bitsandbytes__nf4", "quant_state.bitsandbytes__fp4"):
            raise error(f"expected one key quant_state.bitsandbytes__nf4 or __fp4, got {sorted(blobs)}")
        raw = np.asarray(tensors[blobs[0]])
        if raw.dtype != np.uint8 or raw.ndim != 1:
            raise error(f"{blobs[0]} must be a 1-D uint8 array (JSON bytes), got {raw.dtype} {raw.shape}")
        try:
            meta = json.loads(raw.tobytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise error(f"{blobs[0]} is not UTF-8 JSON: {exc}") from exc
        nested = "nested_absmax" in tensors
        want = {"quant_type", "blocksize", "dtype", "shape"}
        want |= {"nested_blocksize", "nested_dtype", "nested_offset"} if nested else set()
        if not isinstance(meta, dict) or set(meta) != want:
            got = sorted(meta) if isinstance(meta, dict) else type(meta).__name__
            raise error(f"{blobs[0]} must hold exactly {sorted(want)}, got {got}")
        if meta["quant_type"] != blobs[0].rsplit("__", 1)[1]:
            raise error(f"{blobs[0]} says quant_type {meta['quant_type']!r}")
        keys = {"weight", "absmax", "quant_map", blobs[0]} | ({"nested_absmax", "nested_quant_map"} if nested else set())
        if set(tensors) != keys:
            raise error(f"expected keys {sorted(keys)}, got {sorted(tensors)}")
        weight = np.asarray(tensors["weight"])
        if weight.ndim == 2 and weight.shape[1:] == (1,):
            weight = weight.reshape(-1)                          # ((n + 1) // 2, 1) -> ((n + 1) // 2,)
        shape = meta["shape"]
        try:
            return cls(weight=weight, absmax=np.asarray(tensors["absmax"]),
                       quant_map=np.asarray(tensors["quant_map"]),
                       shape=tuple(shape) if isinstance(shape, list) else shape,
                       dtype=meta["dtype"], blocksize=meta["blocksize"], quant_type=meta["quant_type"],
                       compute_dtype=compute_dtype,
                       **({"nested_absmax": np.asarray(tensors["nested_absmax"]),
                           "nested_quant_map": np.asarray(tensors["nested_quant_map"]),
                           "nested_offset": meta["nested_offset"], "nested_blocksize": meta["nested_blocksize"],
                           "nested_dtype": meta["nested_dtype"]} if nested else {}))
        except (TypeError, ValueError) as exc:
            raise error(f"bitsandbytes 4-bit state: {exc}") from exc


def _same_bits(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype
                and a.shape == b.shape and a.tobytes() == b.tobytes())
    return type(a) is type(b) and a == b


# ============================================================================================
# Section 2, Eq. 1: blockwise absmax quantisation to the nearest of 16 levels, packed
# ============================================================================================


def quantize_4bit(W: Any, blocksize: int = 64, quant_type: str = "nf4", double_quant: bool = False) -> QuantState:
    """Quantise W (any shape, float32 / float16 / bfloat16, finite) to 4 bits (Eq. 1).

    Each block of ``blocksize`` consecutive values of the row-major flattened W is scaled by its
    absmax into [-1, 1] and each value replaced by the code of its nearest level (NF4 or FP4;
    halfway goes to the lower level). With ``double_quant`` the absmax vector is quantised too
    (:func:`double_quantize`). Bit for bit bitsandbytes 0.50.2's ``quantize_4bit`` on the CPU.
    """
    float_array(W, "W", DTYPES)
    W = np.asarray(W)
    if W.ndim < 1 or W.size == 0:
        raise ValueError(f"W must have at least one dimension and one value, got shape {W.shape}")
    blocksize = _check_blocksize(blocksize, "blocksize")
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    double_quant = boolean(double_quant, "double_quant")
    x = W.reshape(-1).astype(_F32)                                # (n,) exact for float16 / bfloat16
    if not np.all(np.isfinite(x)):
        raise ValueError(f"W has {int(np.sum(~np.isfinite(x)))} non-finite values; quantisation needs finite weights")
    n = x.size
    full = n - n % blocksize
    blocks = x[:full].reshape(-1, blocksize)                      # (n // b, b) blocks may span rows
    absmax = np.max(np.abs(blocks), axis=1)                       # (n // b,)  c = 1 / absmax, Eq. 1
    inv = _F32(1.0) / np.maximum(absmax, _F32(1e-38))             # fl(1 / absmax), a zero block stays 0
    scaled = np.clip(blocks * inv[:, None], -1, 1).reshape(-1)    # (full,) in [-1, 1]
    if full < n:                                                  # the partial last block is divided
        last = np.maximum(np.max(np.abs(x[full:])), _F32(1e-38))
        absmax = np.append(absmax, last)                          # (nb,) stored clamped, as bnb does
        scaled = np.concatenate([scaled, np.clip(x[full:] / last, -1, 1)])
    if n % 2:
        scaled = np.append(scaled, _F32(0.0))                     # (n + 1,) padded with the code of 0
    mid, order = _bounds(quant_type)
    codes = order[np.searchsorted(mid, scaled, side="left")]      # nearest level; halfway -> lower
    packed = (codes[0::2] << 4) | codes[1::2]                     # ((n + 1) // 2,) first value high
    levels = _nf4() if quant_type == "nf4" else _fp4()
    state = QuantState(weight=packed.astype(np.uint8), absmax=absmax.astype(_F32), quant_map=levels,
                       shape=shape_of(W), dtype=dtype_name(W.dtype), blocksize=blocksize, quant_type=quant_type)
    if not double_quant:
        return state
    q, nested_absmax, offset = double_quantize(state.absmax)
    return replace(state, absmax=q, nested_absmax=nested_absmax, nested_quant_map=_dynamic(),
                   nested_offset=offset, nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32")


def _check_blocksize(blocksize: Any, name: str) -> int:
    if not is_int(blocksize):
        raise TypeError(f"{name} must be an int, got {blocksize!r} ({type(blocksize).__name__})")
    if blocksize not in BLOCKSIZES:
        why = "not a power of two" if blocksize < 1 or blocksize & (blocksize - 1) else "outside bitsandbytes' range"
        raise ValueError(f"{name} must be one of {BLOCKSIZES} (bitsandbytes' 4-bit block sizes), got {blocksize} ({why})")
    return int(blocksize)


# ============================================================================================
# Section 3, double quantisation: the absmax vector itself, 8 bits per 256-block
# ============================================================================================


@lru_cache(maxsize=None)
def _lut() -> np.ndarray:
    """bitsandbytes' CPU table: grid point ``p_i = -1 + 2 i / 65535`` (float32) -> the code of
    the dynamic-map level nearest to it (midpoints in float32; halfway -> lower)."""
    code = _dynamic()
    mid = (code[:-1] + code[1:]) * _F32(0.5)                                  # (255,)
    grid = _F32(-1.0) + (_F32(2.0) * np.arange(65536, dtype=_F32)) / _F32(65535)
    return _frozen(np.searchsorted(mid, grid, side="left").astype(np.uint8))  # (65536,)


def double_quantize(absmax: Any, offset: float | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """Quantise the float32 absmax vector (nb,) to 8 bits: ``(codes uint8 (nb,), nested_absmax
    float32 (nb2,), offset)``, bitsandbytes' ``quantize_blockwise(absmax - offset, blocksize=256)``
    on the CPU.

    ``offset`` defaults to the mean of absmax, rounded once to float32 (absmax is positive, so
    the centred values use the map's both signs). bitsandbytes takes torch's float32 ``mean``,
    whose summation order depends on the CPU's vector width and thread count and can differ by
    an ulp; pass its offset to reproduce its codes exactly. Each centred value d is scaled by
    ``fl(1 / max|d|)`` over its 256-block, snapped to the grid ``-1 + 2 i / 65535`` (i =
    ``floor((v + 1) / 2 * 65535 + 0.5)``), and the grid point's nearest level taken (:func:`_lut`);
    a block of zeros gets code 0 and absmax 0.
    """
    float_array(absmax, "absmax", ("float32",))
    a = np.asarray(absmax)
    if a.ndim != 1 or a.size == 0 or not np.all(np.isfinite(a)):
        raise ValueError(f"absmax must be a non-empty 1-D finite float32 array, got shape {a.shape}")
    if offset is None:
        ints = (a.astype(np.float64) * 2.0 ** 149).astype(object)    # exact: float32 = k 2^-149
        offset = _round_f32(Fraction(int(sum(int(k) for k in ints)), a.size * 2 ** 149))
    elif float(_F32(finite_real(offset, "offset"))) != float(offset):
        raise ValueError(f"offset must be a float32 value, got {offset!r}")
    d = a - _F32(offset)                                              # (nb,) fl(absmax - offset)
    nb = d.size
    pad = -nb % NESTED_BLOCKSIZE
    blocks = np.append(d, np.zeros(pad, _F32)).reshape(-1, NESTED_BLOCKSIZE)     # (nb2, 256)
    nested = np.max(np.abs(blocks), axis=1)                           # (nb2,)
    inv = _F32(1.0) / np.where(nested == 0, _F32(1.0), nested)        # fl(1 / max|d|)
    v = np.clip(blocks * inv[:, None], _F32(-1.0), _F32(1.0))
    i = np.floor((v + _F32(1.0)) * _F32(0.5) * _F32(65535) + _F32(0.5)).astype(np.int64)
    codes = np.where(nested[:, None] == 0, 0, _lut()[i]).reshape(-1)[:nb]
    return codes.astype(np.uint8), nested.astype(_F32), float(offset)


def dequantize_absmax(state: QuantState) -> np.ndarray:
    """The float32 absmax (nb,) the 4-bit codes are scaled by: stored, or for a double-quantised
    state ``fl(fl(map[code] * nested_absmax) + offset)`` (Eq. 6's inner dequant(c1, c2))."""
    if not isinstance(state, QuantState):
        raise TypeError(f"state must be a QuantState, got {type(state).__name__}")
    if not state.nested:
        return state.absmax.copy()
    j = np.arange(state.absmax.size) // state.nested_blocksize        # (nb,) nested block of each
    return state.nested_quant_map[state.absmax] * state.nested_absmax[j] + _F32(state.nested_offset)


# ============================================================================================
# Eq. 2 and 6: dequantisation
# ============================================================================================


def dequantize_4bit(state: QuantState, dtype: str | None = None) -> np.ndarray:
    """W back from its 4-bit state, shape ``state.shape`` (Eq. 2; Eq. 6 when double-quantised).

    Each value is ``fl(level[code] * absmax)`` in float32, then cast (round to nearest even) to
    ``dtype``: the state's own dtype by default, or float32 / float16 / bfloat16, or float64 (the
    float32 result widened exactly, for float64 reference computations).
    """
    absmax = dequantize_absmax(state)
    dtype = state.dtype if dtype is None else dtype_name(dtype)
    if dtype not in DTYPES + ("float64",):
        raise ValueError(f"dtype must be one of {DTYPES + ('float64',)}, got {dtype!r}")
    n = math.prod(state.shape)
    codes = np.empty(2 * state.weight.size, np.uint8)                  # (2 ceil(n / 2),)
    codes[0::2], codes[1::2] = state.weight >> 4, state.weight & 0x0F  # high nibble first
    block = np.arange(n) // state.blocksize                            # (n,) block of each value
    out = state.quant_map[codes[:n]] * absmax[block]                   # (n,) float32
    return out.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype).reshape(state.shape)


# ============================================================================================
# Error bounds
# ============================================================================================


def _half_gap(levels: np.ndarray) -> float:
    s = np.sort(levels.astype(np.float64))
    return float(np.max(np.diff(s))) / 2.0


def error_bound(state: QuantState) -> np.ndarray:
    """A bound (float64, (nb,)) on ``|dequantize_4bit(state) - W|`` over each block, for the W
    that ``quantize_4bit`` was given (docs/quant.md derives it):

        a (g / 2 + gamma_3) + u_out a' (1 + u)                      without double quantisation
        E + (a' + E) (g / 2 + gamma_3) + u_out a' (1 + u)           with it, |absmax error| <= E,
        E = N (G / 2 + 1 / 65535) + gamma_12 (3 N + a')

    a: the block's absmax; a': the dequantised absmax; g: the largest gap between adjacent levels
    (NF4 0.2770, FP4 1/3); u, gamma_k: float32's unit roundoff and gamma_k = k u / (1 - k u);
    u_out: the unit roundoff of the output dtype (0 for float32); N: the nested block's absmax;
    G: the dynamic map's largest gap (0.0140625). The level is nearest to ``fl(x fl(1/a))``,
    within g / 2 + gamma_2 of x / a; ``fl(level a')`` adds u a'; the cast u_out; the 8-bit code
    is nearest to a grid point within 1 / 65535 (+ 5u) of the scaled centred absmax.
    """
    a2 = dequantize_absmax(state).astype(np.float64)                     # (nb,) a'
    g = _half_gap(state.quant_map)
    u, g3 = unit_roundoff("float32"), tolerance("float32", 3)
    u_out = 0.0 if state.dtype == "float32" else unit_roundoff(state.dtype)
    cast = u_out * a2 * (1.0 + u)
    if not state.nested:
        return a2 * (g + g3) + cast
    N = state.nested_absmax.astype(np.float64)[np.arange(a2.size) // state.nested_blocksize]   # (nb,)
    E = N * (_half_gap(state.nested_quant_map) + 1.0 / 65535) + tolerance("float32", 12) * (3.0 * N + a2)
    return E + (a2 + E) * (g + g3) + cast


# ============================================================================================
# Merging LoRA into a 4-bit base (PEFT's path for bitsandbytes' Linear4bit)
# ============================================================================================


def merge_4bit(state: QuantState, A: Any, B: Any, scale: float) -> QuantState:
    """Merge ``s B A`` into a 4-bit weight: dequantise, add, requantise (PEFT's ``Linear4bit.merge``).

    state holds W (d_out, d_in); A (r, d_in) and B (d_out, r) share a dtype (float32, float16,
    bfloat16, or float64). ``s B A`` is computed in float32 (``fl(fl(B @ A) * s)``; float64 for
    float64 factors) and rounded to the adapters' dtype; it is added to the dequantised W in the
    state's dtype when the adapters share it, otherwise in float32 (PEFT adds ``W + delta`` with
    torch's promotion: a bfloat16 base and float32 adapters give float32; float64 factors: in
    float64, rounded to float32), and the sum is quantised again with the state's blocksize,
    quant_type and double quantisation. The result records that dtype (and the state's compute
    dtype). Lossy: the merged weight is rounded to the 4-bit grid again (docs/quant.md measures
    it). Unmerging is the same call with ``-scale``.
    """
    if not isinstance(state, QuantState):
        raise TypeError(f"state must be a QuantState, got {type(state).__name__}")
    float_array(A, "A", DTYPES + ("float64",))
    float_array(B, "B", DTYPES + ("float64",))
    A, B = np.asarray(A), np.asarray(B)
    scale = finite_real(scale, "scale")
    if A.dtype != B.dtype:
        raise TypeError(f"B is {dtype_name(B.dtype)} but A is {dtype_name(A.dtype)}; cast them to one dtype first")
    if len(state.shape) != 2 or A.ndim != 2 or B.ndim != 2:
        raise ValueError(f"need W 2-D (d_out, d_in), A (r, d_in), B (d_out, r); got W {state.shape}, "
                         f"A {A.shape}, B {B.shape}")
    d_out, d_in = state.shape
    if A.shape[1] != d_in or B.shape != (d_out, A.shape[0]):
        raise ValueError(f"A {A.shape} and B {B.shape} do not fit W {state.shape}: need A (r, {d_in}), B ({d_out}, r)")
    W = dequantize_4bit(state)                                                   # (d_out, d_in)
    work = np.float64 if A.dtype == np.float64 else _F32
    with np.errstate(over="ignore", invalid="ignore"):                           # refused below
        delta = ((B.astype(work) @ A.astype(work)) * work(scale)).astype(A.dtype)   # (d_out, d_in)
        merged = W + delta if W.dtype == delta.dtype else W.astype(work) + delta.astype(work)
        merged = merged.astype(_F32) if merged.dtype == np.float64 else merged   # bitsandbytes' input dtypes
    if not np.all(np.isfinite(merged.astype(_F32))):
        raise ValueError("merge_4bit: the merged weight would contain non-finite values; refusing to merge")
    out = quantize_4bit(merged, state.blocksize, state.quant_type, state.nested)
    return replace(out, compute_dtype=state.compute_dtype)


# ============================================================================================
# Eq. 5, the QLoRA layer: a frozen 4-bit base, dequantised per forward, and float adapters
# ============================================================================================


def base_weight(state: QuantState, x: Any) -> tuple[Any, str | None]:
    """Eq. 6 for a host: ``(W, compute_dtype)``, W (d_out, d_in) bitsandbytes' ``fl(level * absmax)``
    in float32 (widened exactly for a float64 x) in x's dtype and backend; ``compute_dtype`` None
    when the state computes in x's dtype (W is then used as any weight is), else the narrower
    dtype (QLoRA's bfloat16) that :func:`lora_ref.precision.mixed_linear` computes it in."""
    if not isinstance(state, QuantState) or len(state.shape) != 2:
        raise TypeError(f"state must be a 2-D QuantState (d_out, d_in), got {type(state).__name__}")
    float_array(x, "x", ("float32", "float64"))
    wide = dtype_name(getval(x).dtype)
    W = dequantize_4bit(state, wide)                                    # (d_out, d_in) Eq. 6
    W = W if isinstance(getval(x), np.ndarray) else asarray(W)          # on x's backend
    return W, None if state.compute_dtype in (None, wide) else state.compute_dtype


def linear_4bit(x: Any, state: QuantState, A: Any = None, B: Any = None, scale: float = 1.0, bias: Any = None,
                dropout_mask: Any = None, enable_lora: Any = None) -> Any:
    """Eq. 5, the QLoRA layer: ``Y = X doubleDequant(c1, c2, W^NF4)^T + b + s (X A^T) B^T``, the
    base dequantised for this call (:func:`base_weight`). :func:`lora_ref.lora_linear`'s arguments
    with ``state`` in W's place; computed by lora_linear in x's dtype, or by
    :func:`lora_ref.precision.mixed_linear` in the state's narrower compute dtype. Gradients for
    x, A and B (the state is not an array and never gets one)."""
    W, c = base_weight(state, x)
    if c is None:
        return lora_linear(x, W, A, B, scale, bias, dropout_mask, enable_lora)
    return mixed_linear(x, W, A, B, scale, bias, dropout_mask, enable_lora, compute_dtype=c)


def quantize_params(params: Mapping[str, Any], names: Any, *, blocksize: int = 64, quant_type: str = "nf4",
                    double_quant: bool = True, compute_dtype: str | None = None) -> dict[str, Any]:
    """``params`` with ``names`` (e.g. every projection weight) made QuantStates, QLoRA's recipe by
    default (NF4, blocks of 64, double quantisation); float64 weights rounded to float32 first
    (bitsandbytes' input dtypes); QuantStates and the other entries kept as they are."""
    names, out = list(names), dict(params)
    if any(n not in params for n in names):
        raise ValueError(f"names not in params: {[n for n in names if n not in params][:3]}")
    for n in names:
        if not isinstance(out[n], QuantState):
            W = to_numpy(out[n])
            W = W.astype(_F32) if W.dtype == np.float64 else W
            out[n] = replace(quantize_4bit(W, blocksize, quant_type, double_quant), compute_dtype=compute_dtype)
    return out
