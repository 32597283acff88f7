"""One record of "a LoRA case": a layer's settings and, once drawn, its arrays.

The oracle kit (:mod:`lora_ref.testing`), the golden vectors (:mod:`lora_ref.vectors`), the audit
(:mod:`lora_ref.audit`) and the hypothesis strategies (:mod:`lora_ref.strategies`) all test LoRA
on cases; each is a :class:`LoraCase`. They differ only in how the numbers are drawn (normal or
uniform entries, in which order), which each says when it calls :meth:`LoraCase.draw`.

Shapes (letters as in :mod:`lora_ref.lora`; with ``enable_lora``, G blocks of which n enabled,
q = d_out / G rows each; without, G = n = 1 and q = d_out)::

    x     (*batch_shape, d_in)       the layer's input
    W     (d_out, d_in)              always this layout here; ``W_stored`` is (d_in, d_out) under
                                     ``fan_in_fan_out``, as the base model would store it
    A     (n r, d_in)                B  (n q, r)
    bias  (d_out,)                   when ``has_bias``
    mask  mask_shape (x's shape unless given; it broadcasts to x): inverted dropout, entries 0 and
          1/(1-p), when ``dropout_p`` is set
    dy    (*batch_shape, d_out)      an upstream gradient dL/dy, for the gradient checks

Arrays are NumPy, of ``dtype``; this module needs only NumPy (hypothesis is imported by
:mod:`lora_ref.strategies` alone).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from .checks import FLOAT_DTYPES, broadcasts_to, finite_real, is_int, numpy_generator, positive_int, probability
from .config import check_enable_lora
from .lora import lora_scale

__all__ = ["ARRAYS", "Entries", "LoraCase", "normal_entries", "uniform_entries"]

ARRAYS = ("x", "W", "A", "B", "bias", "mask", "dy")
"""The arrays a case can hold, by name (the names :meth:`LoraCase.draw`'s ``order`` uses)."""

Entries = Callable[[np.random.Generator, str, tuple[int, ...]], np.ndarray]
"""``entries(rng, name, shape)``: float64 values for the array ``name`` of ``shape``."""


def normal_entries(scaled: Sequence[str] = ()) -> Entries:
    """Standard normal entries; the arrays named in ``scaled`` are divided by ``sqrt(d_in)`` (their
    last axis), so that ``x W^T`` and ``x A^T`` keep unit-size entries however wide the layer."""
    scaled = tuple(scaled)

    def entries(rng: np.random.Generator, name: str, shape: tuple[int, ...]) -> np.ndarray:
        values = rng.standard_normal(shape)
        return values / math.sqrt(shape[-1]) if name in scaled else values

    return entries


def uniform_entries(low: float = -1.0, high: float = 1.0) -> Entries:
    """Entries uniform in ``[low, high)``."""
    return lambda rng, name, shape: rng.uniform(low, high, size=shape)


@dataclass(frozen=True, eq=False)
class LoraCase:
    """A LoRA layer and its input: settings, then (after :meth:`draw`) NumPy arrays of ``dtype``.

    Settings: ``d_in``, ``d_out``, the rank ``r`` (per block), ``alpha`` and ``use_rslora`` (so the
    scale is :attr:`scale`), ``batch_shape`` (x's leading dimensions), ``fan_in_fan_out`` (how the
    base model stores W), ``has_bias``, ``dropout_p`` (None: no dropout mask) and ``mask_shape``,
    ``enable_lora`` (loralib MergedLinear flags, or None), ``dtype``; ``init`` says how A and B were
    made ("random": drawn like the other arrays; "kaiming" or "gaussian": :func:`lora_ref.init_lora`,
    so B = 0); ``seed`` what the arrays were drawn from (an int or a tuple of ints for
    ``numpy.random.default_rng``; None when drawn from a running generator); ``name`` and
    ``description`` for reports. Arrays: ``x, W, A, B, bias, mask, dy`` (see the module docstring),
    None until drawn.
    """

    d_in: int
    d_out: int
    r: int
    alpha: float
    batch_shape: tuple[int, ...] = (2, 3)
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    has_bias: bool = True
    dropout_p: float | None = None
    mask_shape: tuple[int, ...] | None = None
    enable_lora: tuple[bool, ...] | None = None
    dtype: str = "float64"
    init: str = "random"
    seed: int | tuple[int, ...] | None = None
    name: str = ""
    description: str = ""
    x: np.ndarray | None = field(default=None, repr=False)
    W: np.ndarray | None = field(default=None, repr=False)
    A: np.ndarray | None = field(default=None, repr=False)
    B: np.ndarray | None = field(default=None, repr=False)
    bias: np.ndarray | None = field(default=None, repr=False)
    mask: np.ndarray | None = field(default=None, repr=False)
    dy: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        for name in ("d_in", "d_out", "r"):
            set_(name, positive_int(getattr(self, name), name))
        set_("alpha", finite_real(self.alpha, "alpha"))
        set_("batch_shape", self._shape(self.batch_shape, "batch_shape"))
        if self.enable_lora is not None:
            set_("enable_lora", check_enable_lora(self.enable_lora, "enable_lora"))
            if self.d_out % len(self.enable_lora):
                raise ValueError(f"d_out={self.d_out} must be a multiple of the {len(self.enable_lora)} "
                                 f"blocks of enable_lora={self.enable_lora}")
        if self.dropout_p is not None:
            set_("dropout_p", probability(self.dropout_p, "dropout_p"))
        x_shape = self.batch_shape + (self.d_in,)
        if self.mask_shape is not None:
            set_("mask_shape", self._shape(self.mask_shape, "mask_shape"))
            if not broadcasts_to(self.mask_shape, x_shape):
                raise ValueError(f"mask_shape {self.mask_shape} does not broadcast to x's shape {x_shape}")
        if self.dtype not in FLOAT_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(FLOAT_DTYPES)}, got {self.dtype!r}")
        if self.init not in ("random", "kaiming", "gaussian"):
            raise ValueError(f"init must be 'random', 'kaiming' or 'gaussian', got {self.init!r}")

    @staticmethod
    def _shape(value: Any, name: str) -> tuple[int, ...]:
        shape = tuple(value)
        if not all(is_int(n) and n >= 1 for n in shape):
            raise ValueError(f"{name} must be a tuple of positive ints, got {value!r}")
        return tuple(int(n) for n in shape)

    # ---- derived settings ------------------------------------------------------------------

    @property
    def scale(self) -> float:
        """``s = alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA, a Python float."""
        return lora_scale(self.alpha, self.r, self.use_rslora)

    @property
    def n_blocks(self) -> int:
        """G, the number of row-blocks of W (1 without ``enable_lora``)."""
        return 1 if self.enable_lora is None else len(self.enable_lora)

    @property
    def n_enabled(self) -> int:
        """n, the number of adapted blocks (1 without ``enable_lora``)."""
        return 1 if self.enable_lora is None else sum(self.enable_lora)

    @property
    def block_rows(self) -> int:
        """q = d_out / G, the rows of one block of W."""
        return self.d_out // self.n_blocks

    @property
    def n_tokens(self) -> int:
        """N, the number of rows of x once its leading dimensions are flattened."""
        return math.prod(self.batch_shape)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every array's shape, by name (``bias`` and ``mask`` only when the case has them)."""
        out = {"x": self.batch_shape + (self.d_in,), "W": (self.d_out, self.d_in),
               "A": (self.n_enabled * self.r, self.d_in), "B": (self.n_enabled * self.block_rows, self.r),
               "dy": self.batch_shape + (self.d_out,)}
        if self.has_bias:
            out["bias"] = (self.d_out,)
        if self.dropout_p is not None:
            out["mask"] = self.mask_shape or out["x"]
        return out

    # ---- the arrays ------------------------------------------------------------------------

    def draw(self, rng: np.random.Generator | None = None, *, entries: Entries,
             order: Sequence[str]) -> LoraCase:
        """A copy holding the arrays named in ``order``, drawn in that order.

        ``rng`` (default: a new generator from ``seed``) gives every random number; ``entries``
        the values of each array (:func:`normal_entries`, :func:`uniform_entries`, or your own);
        the mask is ``(rng.random(mask shape) >= p) / (1 - p)`` whatever ``entries`` is. Names of
        arrays the case does not have (``bias`` without ``has_bias``, ``mask`` without
        ``dropout_p``) draw nothing. Values are drawn in float64 and rounded once to ``dtype``.
        The order fixes which random numbers each array gets: the golden vectors depend on it.
        """
        if rng is None:
            if self.seed is None:
                raise ValueError("draw needs rng, or a case with a seed")
            rng = np.random.default_rng(list(self.seed) if isinstance(self.seed, tuple) else self.seed)
        numpy_generator(rng, "rng")
        unknown = [name for name in order if name not in ARRAYS]
        if unknown:
            raise ValueError(f"order names arrays {unknown}; a case holds {', '.join(ARRAYS)}")
        shapes, drawn = self.shapes(), {}
        for name in order:
            if name not in shapes:
                continue
            if name == "mask":
                values = (rng.random(size=shapes[name]) >= self.dropout_p) / (1.0 - self.dropout_p)
            else:
                values = entries(rng, name, shapes[name])
            drawn[name] = values.astype(self.dtype)
        return replace(self, **drawn)

    def with_arrays(self, **arrays: np.ndarray | None) -> LoraCase:
        """A copy with the given arrays replaced (e.g. ``B=np.zeros_like(case.B)``)."""
        unknown = [name for name in arrays if name not in ARRAYS]
        if unknown:
            raise ValueError(f"unknown arrays {unknown}; a case holds {', '.join(ARRAYS)}")
        return replace(self, **arrays)

    def astype(self, dtype: str) -> LoraCase:
        """A copy in ``dtype``: settings kept, every array rounded to it (C-contiguous)."""
        cast = lambda a: None if a is None else np.ascontiguousarray(a.astype(dtype))  # noqa: E731
        return replace(self, dtype=dtype, **{name: cast(getattr(self, name)) for name in ARRAYS})

    @property
    def W_stored(self) -> np.ndarray:
        """W as the base model stores it: (d_in, d_out) under ``fan_in_fan_out``, else (d_out, d_in)."""
        return np.ascontiguousarray(self.W.T) if self.fan_in_fan_out else self.W

    def args(self) -> tuple[Any, ...]:
        """``(x, W, A, B, scale)``, the positional arguments of :func:`lora_ref.lora_linear`."""
        return (self.x, self.W, self.A, self.B, self.scale)

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :func:`lora_ref.lora_linear` besides ``x, W, A, B, scale``."""
        return {"bias": self.bias, "dropout_mask": self.mask, "enable_lora": self.enable_lora}
