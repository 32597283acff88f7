"""The kit for adapter combinations (:mod:`lora_ref.combine`): lora-ref's ``exact`` and PEFT's
``add_weighted_adapter`` methods, compared through the combined delta ``scale * B @ A``.

Your callable returns the combined adapter's factors and its scale; the kit forms the delta in
float64 from them and holds it to lora-ref's (float64, from the same stored inputs). The cases
keep every rounding PEFT's weights go through exact: each ``w_i s_i`` is a square of a dyadic
number (0.25, 0.5625, 1), so ``sqrt|w_i s_i|`` and its float32 rounding are exact, and an
implementation need not reproduce torch's float32 weights to pass. Decisions (which entries
magnitude pruning keeps, which sign TIES elects) are made on values whose margin exceeds float32
rounding; the kit redraws a case until they are (``_decisive``).

Bounds, ``reference_rtol(dtype, n) * M`` (:func:`combine_rounding_counts`), M on absolute values:
the factor methods ``|scale| M_B M_A`` with ``M_A = sum_i |a_i| |A_i| / density``; the SVD methods
``M_T + ||M_T||_F`` with ``M_T = sum_i |w_i s_i| |B_i| |A_i| / density``, the second term LAPACK's
backward error of the SVD (``||E||_2 <= p(m, n) u ||T||_2``, p(m, n) taken as m n, as in
tests/test_combine.py). The SVD methods are asked for rank ``min(d_out, d_in)``: no truncation,
so the product of the factors is the operator's result itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from ..checks import positive_int
from ..combine import FACTOR_METHODS, SVD_METHODS, combine_adapters, dare_masks
from .adapters import as_scaled, cast_adapters
from .core import Call, LoraCheckReport, Output, reference_rtol, run_check, tolerance

__all__ = ["COMBINE_PROPERTIES", "check_combine_adapters", "combine_calls", "combine_rounding_counts",
           "draw_combine_case"]


def combine_rounding_counts(method: str, n_adapters: int, r: int, d_out: int, d_in: int) -> int:
    """Roundings of any term of the combined delta (the kit forms ``scale * B @ A`` in float64).

    * ``exact``, ``cat``: ``(A_i w_i) s_i`` (at most 3 with s computed), the stacked product over
      R = sum r_i (counted as r here: pass the total rank) and the scale: ``r + 6``.
    * factor methods: each factor through its operator (the weight product, the sum over n
      adapters, DARE's division, TIES' division by the count: ``n + 3``), the two factors' errors
      compound (``(1 + gamma_a)(1 + gamma_b) - 1 <= gamma_{a+b}``), then the product and scale:
      ``2 (n + 3) + r + 3``.
    * SVD methods: the deltas ``(B_i A_i) s_i`` (r + 3), the operator (n + 3), then LAPACK's
      backward error p(m, n) = m n: ``r + n + 6 + d_out d_in``.
    """
    n, r = positive_int(n_adapters, "n_adapters"), positive_int(r, "r")
    if method in ("exact", "cat"):
        return r + 6
    if method in FACTOR_METHODS:
        return 2 * (n + 3) + r + 3
    return r + n + 6 + d_out * d_in


# name -> (rank, alpha, use_rslora, weight): w s = 0.25, -0.5625, 1 (dyadic squares)
_ADAPTERS = {"t0": (2, 4.0, False, 0.125), "t1": (2, 2.0, False, -0.5625), "t2": (2, 1.0, False, 2.0)}
_RSLORA_FIRST = {"t0": (4, 4.0, True, 0.125), "t1": (4, 4.0, False, 1.0)}
_D_OUT, _D_IN, _DENSITY = 5, 6, 0.5

COMBINE_PROPERTIES: dict[str, str] = {
    "exact": "sum_i w_i s_i B_i A_i (lora-ref's method), three rank-2 adapters",
    "cat": "PEFT's cat: A = [w_i s_i A_i] stacked, B = [B_i]: the weighted sum of deltas, scale 1",
    "linear": "PEFT's linear: A = sum sign(w s) sqrt|w s| A_i, B = sum sqrt|w s| B_i (cross terms included), scale 1",
    "linear_rslora_first": "linear with the first adapter rsLoRA: the new adapter's scale is 1 (PEFT 0.21.2: sqrt(rank))",
    "ties": "TIES on the factors: magnitude prune (density 0.5), sign elected by the total, disjoint mean",
    "ties_frequency": "TIES with the sign elected by frequency",
    "dare_linear": "DARE on the factors with given 0/1 masks (density 0.5, rescaled by 1/density), then linear",
    "dare_ties": "DARE with given masks, then TIES' election and disjoint mean",
    "magnitude_prune": "magnitude pruning of the factors (density 0.5), then linear",
    "svd": "task arithmetic on the deltas s_i B_i A_i, then an SVD at rank min(d_out, d_in): B = U S, A = V^T",
    "ties_svd": "TIES on the deltas, then the SVD",
    "dare_linear_svd": "DARE on the deltas with given masks, then the SVD",
    "dare_ties_svd": "DARE then TIES on the deltas, then the SVD",
    "magnitude_prune_svd": "magnitude pruning of the deltas, then the SVD",
}
"""Every combination property (a method, or a case of one), with what it checks."""


def _method(name: str) -> tuple[str, str]:
    """(combination method, majority_sign) of a property."""
    if name == "linear_rslora_first":
        return "linear", "total"
    if name == "ties_frequency":
        return "ties", "frequency"
    return name, "total"


def _prune(t: np.ndarray, density: float) -> np.ndarray:
    """Keep the int(density * size) largest |entries| (ties: the lower flat index), zero the rest."""
    k = int(density * t.size)
    keep = np.zeros(t.size, dtype=bool)
    keep[np.argsort(-np.abs(t).reshape(-1), kind="stable")[:k]] = True
    return t * keep.reshape(t.shape)


def _decisive(ads: dict[str, tuple], method: str, density: float | None, majority: str, masks: Any) -> bool:
    """Whether every discrete decision of ``method`` on this case comes out the same for any
    float32 or float64 computation: the values compared (the deltas ``(B_i A_i) s_i`` of the SVD
    methods are computed, within ``e = 2 gamma_{r+4}(float32) |s| |B_i| |A_i|``; the factors are
    inputs, rounded once to float32: e = u |t|) are farther apart than their errors. Checked: the kept/pruned boundary of
    magnitude pruning, the sign of every kept entry, and TIES' elected sign by total (the sum of
    at most n values, within ``2 gamma_n(float32)`` of their absolute sum plus their errors)."""
    svd = method in SVD_METHODS
    base = method[:-4] if svd else method
    if base not in ("ties", "dare_ties", "magnitude_prune"):
        return True
    items = list(ads.values())
    if svd:
        g = 2 * tolerance("float32", items[0][0].shape[0] + 4)
        groups = [[((B @ A) * s, g * np.abs(B) @ np.abs(A) * abs(s)) for A, B, s in items]]
    else:
        u = tolerance("float32", 1)                                  # the inputs' rounding to float32
        groups = [[(A, u * np.abs(A)) for A, _, _ in items], [(B, u * np.abs(B)) for _, B, _ in items]]
    for k, pairs in enumerate(groups):
        if base == "dare_ties":                                       # t * mask / density
            ms = [masks[n] if svd else masks[n][k] for n in ads]
            pairs = [(t * m / density, e * m / density * (1 + tolerance("float32", 1))) for (t, e), m in zip(pairs, ms)]
        else:
            for t, e in pairs:                                        # the prune boundary
                a, err = np.abs(t).reshape(-1), e.reshape(-1)
                order, keep = np.argsort(-a, kind="stable"), int(density * a.size)
                if 0 < keep < a.size and a[order[keep - 1]] - a[order[keep]] <= err[order[keep - 1]] + err[order[keep]]:
                    return False
            pairs = [(_prune(t, density), e * (_prune(t, density) != 0)) for t, e in pairs]
        if base == "magnitude_prune":
            continue
        for t, e in pairs:                                            # each kept entry's sign
            if np.any((t != 0) & (np.abs(t) <= e)):
                return False
        if majority == "total":
            total = sum(t for t, _ in pairs)
            size = sum(np.abs(t) for t, _ in pairs)
            err = 2 * tolerance("float32", len(pairs)) * size + sum(e for _, e in pairs)
            if np.any((size > 0) & (np.abs(total) <= err)):
                return False
    return True


def draw_combine_case(name: str, seed: Any) -> dict[str, Any]:
    """The float64 case of property ``name``: adapter records (A, B standard normal), weights, the
    method's options (density, majority_sign, masks, rank), redrawn until :func:`_decisive`."""
    method, majority = _method(name)
    specs = _RSLORA_FIRST if name == "linear_rslora_first" else _ADAPTERS
    svd, base = method in SVD_METHODS, method[:-4] if method in SVD_METHODS else method
    for attempt in range(100):
        rng = np.random.default_rng(list(seed) + [attempt] if isinstance(seed, tuple) else [seed, attempt])
        ads = {n: {"A": rng.standard_normal((r, _D_IN)), "B": rng.standard_normal((_D_OUT, r)), "alpha": alpha,
                   "r": r, "use_rslora": rs} for n, (r, alpha, rs, _) in specs.items()}
        weights = [w for (*_, w) in specs.values()]
        density = _DENSITY if base in ("ties", "dare_linear", "dare_ties", "magnitude_prune") else None
        masks = (dare_masks(as_scaled(ads), method, density, rng) if base in ("dare_linear", "dare_ties") else None)
        if _decisive(as_scaled(ads), method, density, majority, masks):
            return {"adapters": ads, "weights": weights, "method": method, "density": density,
                    "majority_sign": majority, "masks": masks, "rank": min(_D_OUT, _D_IN) if svd else None}
    raise RuntimeError(f"no decisive case for {name!r} in 100 draws")  # pragma: no cover


def _delta(d_out: int, d_in: int, dtype: str, rank: int | None, r_factor: int | None) -> Callable:
    """pick: ``(A, B, scale)`` -> the float64 delta ``scale * B @ A``, checking the factors."""
    def pick(got: Any) -> tuple[Any, str]:
        if not isinstance(got, (tuple, list)) or len(got) != 3:
            return None, f"impl must return a tuple (A, B, scale), got {type(got).__name__}"
        A, B, scale = np.asarray(got[0]), np.asarray(got[1]), got[2]
        if A.ndim != 2 or B.ndim != 2 or A.shape[1] != d_in or B.shape[0] != d_out or A.shape[0] != B.shape[1]:
            return None, f"A {A.shape} and B {B.shape} do not form a ({d_out}, {d_in}) delta B @ A"
        if A.dtype.name != dtype or B.dtype.name != dtype:
            return None, f"A is {A.dtype.name} and B {B.dtype.name}, expected {dtype}"
        want = rank if rank is not None else r_factor
        if want is not None and A.shape[0] != want:
            return None, f"the combined rank is {A.shape[0]}, expected {want}"
        if not isinstance(scale, (int, float, np.floating, np.integer)) or isinstance(scale, bool):
            return None, f"scale must be a number, got {type(scale).__name__}"
        return (B.astype(np.float64) @ A.astype(np.float64)) * float(scale), ""
    return pick


def combine_calls(case: dict[str, Any], dtype: str, extra_roundings: int = 0) -> Call:
    """The call of the combination contract on a case (arrays cast to ``dtype``)."""
    ads = cast_adapters(case["adapters"], dtype)
    masks = case["masks"]
    if masks is not None:
        masks = {n: (tuple(np.asarray(t, dtype=dtype) for t in m) if isinstance(m, tuple) else np.asarray(m, dtype=dtype))
                 for n, m in masks.items()}
    method, weights, density = case["method"], list(case["weights"]), case["density"]
    scaled = as_scaled(ads)
    ref = combine_adapters(scaled, weights, method, rank=case["rank"], density=density,
                           majority_sign=case["majority_sign"], masks=masks)
    expected = (ref.B @ ref.A) * ref.scale
    r = next(iter(ads.values()))["r"]
    div = 1.0 if density is None or not method.startswith("dare") else density
    if method in ("exact", "cat") or method in SVD_METHODS:
        M = sum(abs(w * s) * np.abs(B) @ np.abs(A) for (A, B, s), w in zip(scaled.values(), weights)) / div
        if method in SVD_METHODS:
            M = M + np.linalg.norm(M)
        r_total = sum(a["r"] for a in ads.values()) if method in ("exact", "cat") else r
    else:
        roots = [math.sqrt(abs(w * s)) for (_, _, s), w in zip(scaled.values(), weights)]
        M_A = sum(v * np.abs(A) for (A, _, _), v in zip(scaled.values(), roots)) / div
        M_B = sum(v * np.abs(B) for (_, B, _), v in zip(scaled.values(), roots)) / div
        M, r_total = abs(ref.scale) * M_B @ M_A, r
    n = combine_rounding_counts(method, len(ads), r_total, _D_OUT, _D_IN) + extra_roundings
    pick = _delta(_D_OUT, _D_IN, dtype, case["rank"], r if method in FACTOR_METHODS else None)
    out = Output("delta", expected, "any", M, reference_rtol(dtype, n), n, pick)
    kwargs = {"density": density, "majority_sign": case["majority_sign"], "masks": masks, "rank": case["rank"]}
    return Call("impl", (ads, weights, method), ("adapters", "weights", "method"), kwargs, (out,))


def _build(name: str, dtype: str, seed: int) -> Call:
    return combine_calls(draw_combine_case(name, (seed, list(COMBINE_PROPERTIES).index(name))), dtype)


def check_combine_adapters(impl: Callable, *, properties: Iterable[str] | None = None,
                           dtypes: Sequence[str] = ("float64", "float32"), seed: int = 0) -> LoraCheckReport:
    """Run the combination properties (:data:`COMBINE_PROPERTIES`) against your implementation.

    ``impl(adapters, weights, method, *, density, majority_sign, masks, rank) -> (A, B, scale)``:
    ``adapters`` a dict of name to adapter record (``{"A", "B", "alpha", "r", "use_rslora"}``, in
    order), ``weights`` one float per adapter, ``method`` one of lora-ref's ``"exact"`` and PEFT's
    ``combination_type`` names; ``density`` (None unless the method prunes), ``majority_sign``
    ("total" or "frequency"), ``masks`` (None, or DARE's 0/1 masks by adapter name: ``(mask_A,
    mask_B)`` for the factor methods, one (d_out, d_in) mask for the SVD ones, in the adapters'
    dtype) and ``rank`` (the SVD rank, None otherwise). Return the combined adapter: A (k, d_in),
    B (d_out, k) in the adapters' dtype and its scale (a number: 1 for ``r = alpha = k``). The kit
    compares ``scale * B @ A``. ``properties``, ``dtypes``, ``seed`` as in every check.
    """
    return run_check(impl=impl, callables={}, properties=properties, dtypes=dtypes, seed=seed,
                     known=COMBINE_PROPERTIES, default=tuple(COMBINE_PROPERTIES), needs={},
                     allowed=("float32", "float64"), build=_build)
