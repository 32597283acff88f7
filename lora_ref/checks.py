"""Argument validation, once, for both packages: what every public function checks first.

Each checker takes the value and the argument's name, returns the value in the form array code
wants (a Python ``int``/``float``/``bool``: NumPy 2 promotes ``float32_array * np.float64(2)`` to
float64, so a NumPy scalar must never reach array code), and otherwise raises ``TypeError`` (wrong
kind) or ``ValueError`` (right kind, wrong value) with a message that names the argument, what was
expected and what was given. Nothing here computes; nothing here imports ``transformer_ref``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np

from .backend import dtype_name, getval, namespace, to_numpy

__all__ = [
    "FLOAT_DTYPES",
    "INTEGER_DTYPES",
    "boolean",
    "broadcastable_mask",
    "broadcasts_to",
    "enable_flags",
    "finite_merge",
    "finite_real",
    "float_array",
    "generator",
    "index_array",
    "int_in_range",
    "integer_array",
    "is_array",
    "is_float_array",
    "is_int",
    "is_integer_array",
    "non_negative_int",
    "non_negative_real",
    "numpy_generator",
    "positive_int",
    "positive_real",
    "probability",
    "same_dtype",
    "shape_of",
]

FLOAT_DTYPES = ("float16", "float32", "float64")
INTEGER_DTYPES = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")


# ============================================================================================
# Python scalars
# ============================================================================================


def is_int(value: Any) -> bool:
    """An integer that is not a bool (``True`` is an ``int`` in Python, never a size here)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _kind(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def positive_int(value: Any, name: str, what: str | None = None) -> int:
    """``value`` as a Python int >= 1; ``what`` (optional) says what it counts, in the message."""
    about = f" ({what})" if what else ""
    if not is_int(value):
        raise TypeError(f"{name} must be a positive int{about}, got {_kind(value)}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int{about}, got {value!r}")
    return int(value)


def non_negative_int(value: Any, name: str, what: str | None = None) -> int:
    """``value`` as a Python int >= 0."""
    about = f" ({what})" if what else ""
    if not is_int(value):
        raise TypeError(f"{name} must be a non-negative int{about}, got {_kind(value)}")
    if value < 0:
        raise ValueError(f"{name} must be a non-negative int{about}, got {value!r}")
    return int(value)


def int_in_range(value: Any, name: str, low: int, high: int, why: str | None = None) -> int:
    """``value`` as a Python int in the closed range ``[low, high]``."""
    about = f" ({why})" if why else ""
    if not is_int(value):
        raise TypeError(f"{name} must be an int in [{low}, {high}]{about}, got {_kind(value)}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}]{about}, got {value!r}")
    return int(value)


def finite_real(value: Any, name: str) -> float:
    """``value`` (int, float, NumPy scalar; not bool, not complex) as a finite Python float."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {_kind(value)}")
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return out


def non_negative_real(value: Any, name: str) -> float:
    """A finite real number >= 0, as a Python float."""
    out = finite_real(value, name)
    if out < 0.0:
        raise ValueError(f"{name} must be non-negative, got {value!r}")
    return out


def positive_real(value: Any, name: str) -> float:
    """A finite real number > 0, as a Python float."""
    out = finite_real(value, name)
    if out <= 0.0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return out


def probability(value: Any, name: str) -> float:
    """A dropout-style probability in ``[0, 1)``, as a Python float."""
    out = finite_real(value, name)
    if not 0.0 <= out < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return out


def boolean(value: Any, name: str) -> bool:
    """A bool (Python or NumPy), as a Python bool; 0 and 1 are not accepted."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {_kind(value)}")
    return bool(value)


def numpy_generator(value: Any, name: str) -> np.random.Generator:
    """A ``numpy.random.Generator``, passed through; a seed is refused (the caller owns the stream)."""
    if not isinstance(value, np.random.Generator):
        raise TypeError(f"{name} must be a numpy.random.Generator, got {type(value).__name__}")
    return value


def enable_flags(value: Any, name: str) -> tuple[bool, ...]:
    """loralib ``enable_lora`` flags (which row-blocks of a fused weight are adapted): a non-empty
    sequence of bools with at least one True, as a tuple of Python bools."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        raise TypeError(f"{name} must be a non-empty sequence of booleans such as (True, False, True), got {value!r}")
    flags = tuple(value)
    if not all(isinstance(f, (bool, np.bool_)) for f in flags):
        raise TypeError(f"{name} must contain booleans only, got {value!r}")
    if not any(flags):
        raise ValueError(f"{name} enables no block: {value!r}; leave the module out of the targets instead")
    return tuple(bool(f) for f in flags)


def generator(seed: Any, name: str) -> np.random.Generator:
    """A ``numpy.random.Generator`` passed through, or an int seed made into one."""
    if isinstance(seed, np.random.Generator):
        return seed
    if not is_int(seed):
        raise TypeError(f"{name} must be an int seed or a numpy.random.Generator, got {type(seed).__name__}")
    return np.random.default_rng(int(seed))


# ============================================================================================
# Arrays (of any backend, boxed by autograd or not)
# ============================================================================================


def is_array(value: Any) -> bool:
    """Has ``shape`` and ``dtype`` (any backend's array, or an autograd box of one)."""
    return hasattr(value, "shape") and hasattr(value, "dtype")


def shape_of(value: Any) -> tuple[int, ...]:
    """The shape as a tuple of Python ints."""
    return tuple(int(n) for n in value.shape)


def is_float_array(value: Any, dtypes: tuple[str, ...] = FLOAT_DTYPES) -> bool:
    return is_array(value) and dtype_name(getval(value).dtype) in dtypes


def is_integer_array(value: Any) -> bool:
    return is_array(value) and dtype_name(getval(value).dtype) in INTEGER_DTYPES


def float_array(value: Any, name: str, dtypes: tuple[str, ...] = FLOAT_DTYPES) -> None:
    """An array of one of ``dtypes`` (float16, float32 or float64 unless narrowed)."""
    if not is_array(value):
        raise TypeError(f"{name} must be an array, got {type(value).__name__}")
    if not is_float_array(value, dtypes):
        raise TypeError(f"{name} must have a floating dtype ({', '.join(dtypes)}), "
                        f"got {dtype_name(getval(value).dtype)}")


def integer_array(value: Any, name: str) -> None:
    """An array of an integer dtype (bool and floats are refused)."""
    if not is_integer_array(value):
        kind = dtype_name(getval(value).dtype) if is_array(value) else type(value).__name__
        raise TypeError(f"{name} must be an integer array, got {kind}")


def index_array(ids: Any, size: int, name: str, size_name: str = "the table's row count") -> None:
    """Integer ``ids`` with every value in ``[0, size)``.

    CuPy wraps out-of-range indices silently and NumPy wraps negative ones, so every lookup is
    checked. The error names the first offending value and its position.
    """
    integer_array(ids, name)
    ids = getval(ids)
    if math.prod(ids.shape) == 0:
        return
    xp = namespace(ids)
    lo, hi = int(xp.min(ids)), int(xp.max(ids))            # two scalars leave the device, not ids
    if lo < 0 or hi >= size:
        host = to_numpy(ids)
        bad = tuple(int(i) for i in np.argwhere((host < 0) | (host >= size))[0])
        raise ValueError(f"{name} must be in [0, {size}) ({size_name} = {size}), "
                         f"got {int(host[bad])} at position {bad}")


def same_dtype(*named: tuple[str, Any]) -> None:
    """All the given ``(name, array)`` pairs share one dtype; ``None`` arrays are skipped."""
    present = [(n, a) for n, a in named if a is not None]
    if not present:
        return
    first_name, first = present[0]
    first_dtype = dtype_name(getval(first).dtype)
    for name, arr in present[1:]:
        dtype = dtype_name(getval(arr).dtype)
        if dtype != first_dtype:
            raise TypeError(
                f"{name} is {dtype} but {first_name} is {first_dtype}; "
                "lora_ref does not mix precisions silently: cast them to one dtype first")


def broadcasts_to(shape: Sequence[int], target: Sequence[int]) -> bool:
    """Whether an array of ``shape`` broadcasts to ``target`` without changing it (NumPy's rules)."""
    try:
        return np.broadcast_shapes(tuple(shape), tuple(target)) == tuple(target)
    except ValueError:
        return False


def broadcastable_mask(mask: Any, x: Any, name: str = "dropout_mask") -> None:
    """``mask`` (an explicit dropout mask) broadcasts to ``x``'s shape without changing it."""
    if not broadcasts_to(shape_of(mask), shape_of(x)):
        raise ValueError(f"{name} of shape {shape_of(mask)} does not broadcast to x's shape {shape_of(x)}")


def finite_merge(merged: Any, delta: Any, who: str, what: str, delta_name: str) -> Any:
    """``merged`` (a base plus ``delta``), or ``ValueError`` when it holds an inf or NaN (PEFT's
    ``safe_merge``), naming ``who`` refuses, how many entries and the largest ``|delta|``."""
    xp = namespace(merged)
    if not bool(xp.all(xp.isfinite(merged))):
        bad = int(xp.sum(xp.astype(~xp.isfinite(merged), xp.int64)))
        raise ValueError(f"{who}: the merged {what} would contain {bad} non-finite values "
                         f"(max |{delta_name}| = {float(xp.max(xp.abs(delta)))}); refusing to merge")
    return merged
