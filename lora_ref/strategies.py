"""Hypothesis strategies for LoRA cases: shapes, ranks, scales, dtypes, masks, fused weights.

Importing this module requires `hypothesis <https://hypothesis.readthedocs.io>`_, which is a
*test* extra (``pip install 'lora-ref[test]'``), not a dependency of the library itself.

The main entry point is :func:`lora_cases`, which draws a complete
:class:`lora_ref.cases.LoraCase` (``x, W, A, B, bias, mask``, the ``scale`` and the settings they
came from) as **NumPy** arrays; move them to another backend with :func:`lora_ref.asarray`. The smaller strategies
(:func:`dtypes`, :func:`dims`, :func:`ranks`, :func:`batch_shapes`, :func:`alphas`,
:func:`enable_flags`) compose into custom cases.

Shapes (letters as in :mod:`lora_ref.lora`)::

    x     (*batch, d_in)     batch has 0 to ``max_batch_dims`` dimensions
    W     (d_out, d_in)      (``case.W_stored`` is (d_in, d_out) when ``fan_in_fan_out``)
    A     (n r, d_in)        n = number of enabled blocks (1 without enable_lora)
    B     (n q, r)           q = d_out / G rows per block of the G blocks (q = d_out without)
    bias  (d_out,)
    mask  broadcastable to x's shape (inverted dropout: entries 0 or 1/(1-p))

Why the magnitudes are bounded
------------------------------
Array entries are drawn uniformly from ``[-m, m]`` with ``m`` a power of two between 1/8 and 8
(powers of two so that scaling is exact), and entries smaller than ``2**-20 m`` in magnitude are
set to exactly zero. This keeps every case inside the range where the rounding-error model
behind :func:`lora_ref.testing.tolerance` holds (``fl(a op b) = (a op b)(1 + delta)``,
``|delta| <= u``):

* no overflow: with d <= 64, r <= 72 and |alpha| <= 64, every intermediate of the LoRA layer is
  below about 10**9, far from float32's 3.4e38;
* no underflow: a product of up to four nonzero entries (x, A, B and the scale) is at least
  about 2**-90 in magnitude, above float32's smallest normal number 2**-126, so no result lands
  among the subnormals, where rounding errors are absolute rather than relative.

Unbounded floats (hypothesis's default) would mostly test overflow handling, which is not LoRA's
math; those inputs have their own tests (non-finite merges raise).

Randomness: each array is drawn from a ``numpy.random.Generator`` seeded by an integer that
hypothesis draws, so a failing example is reproduced exactly by the seed hypothesis prints.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import strategies as st

from .backend import to_numpy
from .cases import LoraCase
from .lora import init_lora

__all__ = [
    "DTYPES",
    "LoraCase",
    "alphas",
    "batch_shapes",
    "bounded_array",
    "dims",
    "dtypes",
    "enable_flags",
    "lora_cases",
    "ranks",
]

DTYPES = ("float32", "float64")
MAGNITUDES = (0.125, 1.0, 8.0)   # powers of two: multiplying by them is exact
_TINY = 2.0 ** -20               # relative size below which an entry is flushed to zero


def dtypes(choices: tuple[str, ...] = DTYPES) -> st.SearchStrategy[str]:
    """A floating dtype name, ``"float32"`` or ``"float64"`` by default."""
    return st.sampled_from(choices)


def dims(max_dim: int = 64) -> st.SearchStrategy[int]:
    """A layer width d (d_in or d_out) in ``1..max_dim``."""
    return st.integers(min_value=1, max_value=max_dim)


def ranks(d_in: int, d_out: int, *, beyond: int = 4) -> st.SearchStrategy[int]:
    """A rank r in ``1..min(d_in, d_out) + beyond``.

    Ranks above ``min(d_in, d_out)`` are legal (PEFT accepts them) though wasteful, since
    ``B @ A`` can never have rank above ``min(d_in, d_out)``; ``beyond=0`` excludes them.
    """
    return st.integers(min_value=1, max_value=min(d_in, d_out) + beyond)


def batch_shapes(max_dims: int = 2, max_size: int = 4) -> st.SearchStrategy[tuple[int, ...]]:
    """Leading (batch, token) dimensions of x: 0 to ``max_dims`` sizes, each ``1..max_size``."""
    return st.lists(st.integers(1, max_size), min_size=0, max_size=max_dims).map(tuple)


def alphas() -> st.SearchStrategy[float]:
    """``lora_alpha``: a finite float in ``[1/16, 64]`` (PEFT's defaults are 8, 16 or 32)."""
    return st.floats(min_value=1.0 / 16.0, max_value=64.0, allow_nan=False, allow_infinity=False)


def enable_flags(max_blocks: int = 3) -> st.SearchStrategy[tuple[bool, ...]]:
    """loralib ``MergedLinear`` flags: 1 to ``max_blocks`` booleans, at least one True."""
    return (st.lists(st.booleans(), min_size=1, max_size=max_blocks)
            .filter(any).map(tuple))


def bounded_array(rng: np.random.Generator, shape: tuple[int, ...], dtype: str,
                  magnitude: float = 1.0) -> np.ndarray:
    """Entries uniform in ``[-magnitude, magnitude]``, those below ``2**-20 magnitude`` set to 0.

    A NumPy array of ``shape`` and ``dtype``; see the module docstring for why it is bounded.
    """
    a = rng.uniform(-1.0, 1.0, size=shape)
    a = np.where(np.abs(a) < _TINY, 0.0, a) * magnitude
    return a.astype(dtype)


def _maybe(flag: bool | None) -> st.SearchStrategy[bool]:
    return st.booleans() if flag is None else st.just(bool(flag))


@st.composite
def lora_cases(draw: Any, *, dtype: str | tuple[str, ...] | None = None, max_dim: int = 64,
               max_batch_dims: int = 2, init: str = "random", enable_lora: bool | None = False,
               dropout: bool | None = None, bias: bool | None = None,
               use_rslora: bool | None = None, fan_in_fan_out: bool | None = None,
               rank_beyond: int = 4) -> LoraCase:
    """A strategy for :class:`lora_ref.cases.LoraCase` with its arrays drawn (``dy`` is not).

    Parameters
    ----------
    dtype : str or tuple of str, optional
        ``"float32"``, ``"float64"`` or a tuple to choose from (default: both).
    max_dim : int
        Largest d_in and d_out (each drawn from ``1..max_dim``).
    max_batch_dims : int
        Largest number of leading dimensions of x (0 means x is 1-D, ``(d_in,)``).
    init : {"random", "kaiming", "gaussian"}
        ``"random"``: A and B both nonzero (a non-identity adapter, what most properties need).
        ``"kaiming"`` / ``"gaussian"``: A and B from :func:`lora_ref.init_lora` (so B = 0).
    enable_lora, dropout, bias, use_rslora, fan_in_fan_out : bool or None
        True: always; False: never; None: hypothesis chooses. ``enable_lora`` draws loralib
        MergedLinear flags (1 to 3 blocks, d_out a multiple of the block count); ``dropout`` draws
        an inverted-dropout mask of x's shape (or broadcastable to it) with p in {0.1, 0.5}.
    rank_beyond : int
        Ranks go up to ``min(d_in, q) + rank_beyond`` (q = d_out, or the block height with
        ``enable_lora``); over-complete ranks are legal.
    """
    choices = DTYPES if dtype is None else ((dtype,) if isinstance(dtype, str) else tuple(dtype))
    if init not in ("random", "kaiming", "gaussian"):
        raise ValueError(f"init must be 'random', 'kaiming' or 'gaussian', got {init!r}")
    dt = draw(st.sampled_from(choices))
    flags = draw(enable_flags()) if draw(_maybe(enable_lora)) else None
    G = 1 if flags is None else len(flags)
    d_in = draw(dims(max_dim))
    q = draw(st.integers(1, max(1, max_dim // G)))          # rows per block
    r = draw(ranks(d_in, q, beyond=rank_beyond))                   # per block: B_k is (q, r)
    batch = draw(batch_shapes(max_batch_dims))
    alpha = draw(alphas())
    rs = draw(_maybe(use_rslora))
    fifo = draw(_maybe(fan_in_fan_out))
    with_bias = draw(_maybe(bias))
    with_mask = draw(_maybe(dropout))
    mags = [draw(st.sampled_from(MAGNITUDES)) for _ in range(3)]   # x, W, adapters
    seed = draw(st.integers(min_value=0, max_value=2**32 - 1))
    p, mask_shape = None, None
    if with_mask:
        p = draw(st.sampled_from((0.1, 0.5)))
        mask_shape = draw(st.sampled_from([batch + (d_in,), (d_in,), (1,) * len(batch) + (d_in,)]))
    case = LoraCase(d_in=d_in, d_out=q * G, r=r, alpha=alpha, batch_shape=batch, use_rslora=rs,
                    fan_in_fan_out=fifo, has_bias=with_bias, dropout_p=p, mask_shape=mask_shape,
                    enable_lora=flags, dtype=dt, init=init, seed=seed)
    magnitude = {"x": mags[0], "W": mags[1], "bias": mags[1], "A": mags[2], "B": mags[2]}

    def entries(rng: np.random.Generator, name: str, shape: tuple[int, ...]) -> np.ndarray:
        return bounded_array(rng, shape, "float64", magnitude[name])

    # One stream, in this order: x, W, then A and B (drawn, or made by init_lora), bias, mask.
    rng = np.random.default_rng(seed)
    case = case.draw(rng, entries=entries, order=("x", "W"))
    if init == "random":
        case = case.draw(rng, entries=entries, order=("A", "B"))
    else:
        pairs = [init_lora(d_in, q, r, init=init, rng=rng, dtype=dt) for _ in range(case.n_enabled)]
        case = case.with_arrays(A=np.concatenate([to_numpy(a) for a, _ in pairs], axis=0),   # (n r, d_in)
                                B=np.concatenate([to_numpy(b) for _, b in pairs], axis=0))   # (n q, r)
    return case.draw(rng, entries=entries, order=("bias", "mask"))
