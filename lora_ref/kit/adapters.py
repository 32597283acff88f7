"""The kit for many adapters on one base (:mod:`lora_ref.adapters`): the active set summed (S1),
the disabled state (S0), merging a chosen set (S3), and the mixed batch (S2), one adapter name per
sample with ``"__base__"`` for none.

An *adapter* passed to your callables is a dict ``{"A": (r, d_in), "B": (d_out, r), "alpha":
float, "r": int, "use_rslora": bool}``; its scale is ``alpha / r`` or ``alpha / sqrt(r)``, your
job to compute. Bounds: ``reference_rtol(dtype, n) * M`` with n from
:func:`adapter_rounding_counts` and M the reference on absolute values.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from ..adapters import BASE, adapter_set_linear, merge_adapters, mixed_batch_linear
from ..checks import positive_int
from ..lora import lora_scale
from .core import Call, LoraCheckReport, bounded_output, run_check

__all__ = ["ADAPTER_SET_PROPERTIES", "MIXED_BATCH_PROPERTIES", "adapter_rounding_counts", "adapter_set_calls",
           "as_scaled", "cast_adapters", "check_adapter_set", "check_mixed_batch", "draw_adapters"]


def adapter_rounding_counts(d_in: int, r_max: int, n_adapters: int) -> dict[str, int]:
    """Roundings any term can suffer: each adapter's term as the linear layer's (``d_in + r + 6``,
    :func:`lora_ref.kit.linear.rounding_counts`), plus one addition per other adapter term joined
    to it; a merged weight ``r + 6`` plus one per adapter added. A mixed batch's sample sees one
    adapter term (the others enter times an exact 0): the set's count with one adapter, plus one
    (the 0/1 selector)."""
    d_in, r_max, n = positive_int(d_in, "d_in"), positive_int(r_max, "r_max"), positive_int(n_adapters, "n_adapters")
    return {"y": d_in + r_max + 6 + n, "W_merged": r_max + 6 + n, "y_mixed": d_in + r_max + 8}


def as_scaled(adapters: Mapping[str, Mapping[str, Any]], absolute: bool = False) -> dict[str, tuple]:
    """Adapter records as lora_ref.adapters' ``(A, B, scale)`` in float64 (on absolute values with
    ``absolute``: the magnitudes' inputs)."""
    t = (lambda a: np.abs(np.asarray(a, dtype=np.float64))) if absolute else (lambda a: np.asarray(a, np.float64))
    out = {}
    for name, a in adapters.items():
        s = lora_scale(a["alpha"], a["r"], a["use_rslora"])
        out[name] = (t(a["A"]), t(a["B"]), abs(s) if absolute else s)
    return out


# name -> (rank, alpha, use_rslora): three adapters of different ranks, one rsLoRA
_ADAPTERS = {"a": (2, 4.0, False), "b": (3, 6.0, True), "c": (4, 2.0, False)}


def draw_adapters(d_in: int, d_out: int, rng: np.random.Generator,
                  specs: Mapping[str, tuple[int, float, bool]] = _ADAPTERS) -> dict[str, dict[str, Any]]:
    """float64 adapter records with standard normal A (scaled by 1/sqrt(d_in)) and B, from ``rng``."""
    return {name: {"A": rng.standard_normal((r, d_in)) / np.sqrt(d_in), "B": rng.standard_normal((d_out, r)),
                   "alpha": alpha, "r": r, "use_rslora": rs} for name, (r, alpha, rs) in specs.items()}


def cast_adapters(adapters: Mapping[str, Mapping[str, Any]], dtype: str) -> dict[str, dict[str, Any]]:
    """A copy of ``{name: {"A": (r, d_in), "B": (d_out, r), ...}}`` with every A and B cast to
    ``dtype`` (C-contiguous); the other entries (alpha, r, use_rslora) as they are."""
    return {n: dict(a, A=np.ascontiguousarray(a["A"].astype(dtype)), B=np.ascontiguousarray(a["B"].astype(dtype)))
            for n, a in adapters.items()}


def adapter_set_calls(x: np.ndarray, W: np.ndarray, bias: np.ndarray | None, adapters: Mapping[str, Any],
                      which: str, names: Sequence[str], *, fan_in_fan_out: bool = False,
                      extra_roundings: int = 0) -> Call:
    """One call (arrays already in their dtype): ``which`` = ``"impl"`` (the set with ``names``
    active), ``"merge"`` (``names`` merged; W stored (d_in, d_out) under ``fan_in_fan_out``) or
    ``"mixed"`` (``names``: one per sample)."""
    dtype = W.dtype.name
    r_max = max(a["r"] for a in adapters.values())
    ads, ads_abs = as_scaled(adapters), as_scaled(adapters, absolute=True)
    f64 = lambda t: None if t is None else np.asarray(t, dtype=np.float64)  # noqa: E731
    absf = lambda t: None if t is None else np.abs(f64(t))  # noqa: E731
    d_in = W.shape[0] if fan_in_fan_out else W.shape[1]
    counts = adapter_rounding_counts(d_in, r_max, max(1, len(names)))
    if which == "merge":
        expected = merge_adapters(f64(W), ads, names, fan_in_fan_out=fan_in_fan_out)
        magnitude = merge_adapters(absf(W), ads_abs, names, fan_in_fan_out=fan_in_fan_out)
        n, out_name, args, arg_names = counts["W_merged"], "W_merged", (W, adapters, list(names)), ("W", "adapters", "names")
        kwargs = {"fan_in_fan_out": fan_in_fan_out}
    else:
        fn = adapter_set_linear if which == "impl" else mixed_batch_linear
        expected = fn(f64(x), f64(W), ads, names, bias=f64(bias))
        magnitude = fn(absf(x), absf(W), ads_abs, names, bias=absf(bias))
        n = counts["y"] if which == "impl" else counts["y_mixed"]
        out_name, args = "y", (x, W, adapters, list(names))
        arg_names, kwargs = ("x", "W", "adapters", "active" if which == "impl" else "names"), {"bias": bias}
    n += extra_roundings
    out = bounded_output(out_name, expected, dtype, magnitude, n)
    return Call("merge" if which == "merge" else "impl", args, arg_names, kwargs, (out,))


ADAPTER_SET_PROPERTIES: dict[str, str] = {
    "one_active": "three adapters on W (ranks 2, 3, 4; 'b' rsLoRA), only 'b' active: the others add nothing",
    "two_active": "'a' and 'c' active: y = x W^T + bias + s_a B_a A_a x + s_c B_c A_c x",
    "all_active": "all three active, in the order c, a, b",
    "disabled": "none active (PEFT's disable_adapter()): the base layer x W^T + bias",
    "merge_two": "merge(W, adapters, ['a', 'c']) = W + s_a B_a A_a + s_c B_c A_c",
    "merge_fan_in_fan_out": "all three merged into W stored (d_in, d_out), square: W + (sum s B A)^T",
}
"""Every adapter-set property, with what it checks."""

MIXED_BATCH_PROPERTIES: dict[str, str] = {
    "mixed": "5 samples named a, __base__, c, a, b: each gets x W^T + bias + its own adapter's term (or none)",
    "all_base": "every sample '__base__': the base layer for all",
    "one_adapter": "every sample 'b' (the rsLoRA one)",
}
"""Every mixed-batch property, with what it checks."""

_SET = {"one_active": ["b"], "two_active": ["a", "c"], "all_active": ["c", "a", "b"], "disabled": [],
        "merge_two": ["a", "c"], "merge_fan_in_fan_out": ["a", "b", "c"]}
_MIXED = {"mixed": ["a", BASE, "c", "a", "b"], "all_base": [BASE] * 5, "one_adapter": ["b"] * 5}


def _draw(d_in: int, d_out: int, batch: tuple[int, ...], seed: Any) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((d_out, d_in)) / np.sqrt(d_in)
    return rng.standard_normal(batch + (d_in,)), W, rng.standard_normal(d_out), draw_adapters(d_in, d_out, rng)


def _build_set(name: str, dtype: str, seed: int) -> Call:
    fifo = name == "merge_fan_in_fan_out"
    d = (6, 6) if fifo else (7, 5)
    x, W, bias, ads = _draw(*d, (2, 3), (seed, list(ADAPTER_SET_PROPERTIES).index(name)))
    W = W.T if fifo else W                                                   # the stored layout
    cast = lambda t: np.ascontiguousarray(t.astype(dtype))  # noqa: E731
    which = "merge" if name.startswith("merge") else "impl"
    return adapter_set_calls(cast(x), cast(W), cast(bias), cast_adapters(ads, dtype), which, _SET[name], fan_in_fan_out=fifo)


def _build_mixed(name: str, dtype: str, seed: int) -> Call:
    x, W, bias, ads = _draw(7, 5, (5, 3), (seed, 100 + list(MIXED_BATCH_PROPERTIES).index(name)))
    cast = lambda t: np.ascontiguousarray(t.astype(dtype))  # noqa: E731
    return adapter_set_calls(cast(x), cast(W), cast(bias), cast_adapters(ads, dtype), "mixed", _MIXED[name])


def check_adapter_set(impl: Callable, *, merge: Callable | None = None, properties: Iterable[str] | None = None,
                      dtypes: Sequence[str] = ("float64", "float32"), seed: int = 0) -> LoraCheckReport:
    """Run the adapter-set properties (:data:`ADAPTER_SET_PROPERTIES`) against your implementation.

    Parameters
    ----------
    impl : callable
        ``impl(x, W, adapters, active, *, bias) -> y`` (..., d_out): ``adapters`` a dict of name to
        adapter record (module docstring), ``active`` a list of names, summed in that order
        (PEFT's ``set_adapter([...])``; ``[]`` is ``disable_adapter()``); W (d_out, d_in); bias
        (d_out,) or None.
    merge : callable, optional
        ``merge(W, adapters, names, *, fan_in_fan_out) -> W_merged``: W plus each named adapter's
        ``s B A`` (transposed when W is stored (d_in, d_out)).
    properties, dtypes, seed
        As in every check (:mod:`lora_ref.testing`); dtypes float64 and/or float32.
    """
    return run_check(impl=impl, callables={"merge": merge}, properties=properties, dtypes=dtypes, seed=seed,
                     known=ADAPTER_SET_PROPERTIES, default=tuple(ADAPTER_SET_PROPERTIES),
                     needs={"merge_two": "merge", "merge_fan_in_fan_out": "merge"}, allowed=("float32", "float64"),
                     build=_build_set)


def check_mixed_batch(impl: Callable, *, properties: Iterable[str] | None = None,
                      dtypes: Sequence[str] = ("float64", "float32"), seed: int = 0) -> LoraCheckReport:
    """Run the mixed-batch properties (:data:`MIXED_BATCH_PROPERTIES`) against your implementation.

    ``impl(x, W, adapters, names, *, bias) -> y`` (N, ..., d_out): x (N, ..., d_in) holds N
    samples, ``names`` one adapter name per sample (PEFT's ``adapter_names=``), ``"__base__"`` for
    a sample without adapter; each sample's output is the layer with its own adapter alone.
    ``properties``, ``dtypes``, ``seed`` as in every check.
    """
    return run_check(impl=impl, callables={}, properties=properties, dtypes=dtypes, seed=seed,
                     known=MIXED_BATCH_PROPERTIES, default=tuple(MIXED_BATCH_PROPERTIES), needs={},
                     allowed=("float32", "float64"), build=_build_mixed)
