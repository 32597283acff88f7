"""Adapter arithmetic: several adapters on one weight combined into one, exactly or as PEFT does.

Letters as in :mod:`lora_ref.lora`: adapter i has ``A_i`` (r_i, d_in), ``B_i`` (d_out, r_i), scale
``s_i``; the user's weights are ``w_i``. The target of every method is the weighted sum of deltas

    (C1)  dW* = sum_i w_i s_i B_i A_i                                       (d_out, d_in)

``exact`` gives (C1) as factors: the ``cat`` construction, ``A = [w_1 s_1 A_1; w_2 s_2 A_2; ...]``
(rows stacked), ``B = [B_1, B_2, ...]`` (columns stacked), scale 1, rank ``sum_i r_i``; then
``B A = sum_i B_i (w_i s_i A_i)`` is (C1) exactly, in exact arithmetic.

PEFT 0.21.2's ``add_weighted_adapter`` (peft/tuners/lora/model.py; the merge operators in
peft/utils/merge_utils.py) is reproduced operation for operation:

* ``cat``: as ``exact``, with A_i multiplied by w_i, then by s_i (two roundings, in that order).
* ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune`` (the *factor* methods)
  combine the A's and the B's SEPARATELY, with ``a_i = sign(w_i s_i) sqrt|w_i s_i|`` on A and
  ``b_i = sqrt|w_i s_i|`` on B (sign(0) = +1). For ``linear``, ``A = sum_i a_i A_i``,
  ``B = sum_j b_j B_j``, so (PEFT issue #3004)

      (C2)  B A = sum_i a_i b_i B_i A_i + sum_{i != j} b_i a_j B_i A_j
                = dW*  +  sum_{i != j} sign(w_j s_j) sqrt(|w_i s_i| |w_j s_j|) B_i A_j

  (:func:`linear_cross_terms` computes the second sum). It is (C1) only for one adapter, or when
  the cross products B_i A_j vanish. All adapters must share one rank, which is the new rank.
* ``svd``, ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd`` apply the
  operator to the full deltas ``D_i = (B_i @ A_i) * s_i`` with weights w_i, then keep the top
  ``rank`` singular triplets of the result, ``U S V^T``: ``B = U_r S_r`` (d_out, rank),
  ``A = V_r^T`` (rank, d_in). ``rank`` defaults to the largest r_i. With ``svd_clamp = q``, U_r S_r
  and V_r^T are clipped to ``[-h, h]``, h the q-quantile (linear interpolation) of their entries
  together (when h < 0, as for a q below the entries' median, torch.clamp sets every entry to h).
  Singular vectors are LAPACK's (gesdd, as torch's CPU SVD): each pair is defined up to
  a sign, which changes nothing but what svd_clamp's quantile sees.

The operators, each on a list of tensors t_i (A's, B's or deltas) with weights v_i:

    task arithmetic     sum_i v_i t_i
    magnitude prune     keep the k = int(density * numel) largest |entries| of each t_i, zero the rest
    DARE                t_i * mask_i / density, mask_i a 0/1 array drawn Bernoulli(density)
    TIES                prune by magnitude; elect a sign per entry from the UNWEIGHTED pruned t_i,
                        sign(sum_i t_i) ("total") or sign(sum_i sign t_i) ("frequency"), ties to +;
                        average the weighted entries v_i t_i whose sign agrees (zeros never do):
                        sum_i [sign t_i = e] v_i t_i / max(1, #{i: sign t_i = e})
    dare_ties           DARE's pruning, then TIES' election and disjoint mean

``density >= 1`` prunes nothing (PEFT warns); lora-ref takes density in [0, 1] (DARE: (0, 1],
since PEFT divides by it: density 0 gives NaN there). DARE's masks are arguments (``masks``;
:func:`dare_masks` draws them from a ``numpy.random.Generator``). PEFT draws them with
``torch.bernoulli`` in this order, per module: factor methods, the A's in adapter order then the
B's; SVD methods, one mask per delta in adapter order. The weights pass through
``torch.tensor(weights)``, i.e. torch's default dtype, float32 unless changed:
``weight_dtype="float32"`` rounds them the same way (v_i = fl32(a_i), fl32(b_i), or fl32(w_i) for
the SVD methods; ``cat`` uses Python floats, unrounded). With a single adapter PEFT runs
``linear`` whatever method was asked for; so does lora-ref, and :class:`Combined` says so.

The new adapter gets ``r = lora_alpha = rank``, so its scale is 1. PEFT 0.21.2 copies the FIRST
adapter's config, ``use_rslora`` included, so when that adapter is rsLoRA the new one is applied
with ``alpha / sqrt(r) = sqrt(rank)`` instead of 1: its delta is sqrt(rank) times too large.
``peft_rslora_bug=True`` reproduces that scale (set it when the first adapter uses rsLoRA, to
predict what PEFT computes); the default gives the intended scale 1.

Not differentiable (PEFT works on ``.data``); any backend (NumPy, CuPy, array_api_strict); float32
or float64. Embeddings, convolutions and DoRA magnitudes are out of scope (linear weights only).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from . import checks
from .adapters import as_adapters
from .backend import dtype_name, getval, namespace, to_numpy

__all__ = [
    "FACTOR_METHODS",
    "METHODS",
    "SVD_METHODS",
    "Combined",
    "combine_adapters",
    "dare_masks",
    "linear_cross_terms",
    "weighted_delta",
]

FACTOR_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_METHODS = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
METHODS = ("exact", "cat") + FACTOR_METHODS + SVD_METHODS
_DENSITY = {"ties", "dare_linear", "dare_ties", "magnitude_prune"}     # base operators taking density
_DARE = {"dare_linear", "dare_ties"}


class Combined(NamedTuple):
    """A combined adapter: apply it as ``scale * B @ A`` (:func:`lora_ref.delta_weight`).

    ``A`` (rank, d_in), ``B`` (d_out, rank) (fewer rows/columns when an SVD rank exceeds
    min(d_out, d_in)); ``alpha`` and ``rank`` are the config PEFT writes
    (``r = lora_alpha = rank``); ``scale`` is ``alpha / rank = 1``, or ``alpha / sqrt(rank)`` under
    ``peft_rslora_bug``; ``method`` is the method that ran (``linear`` for a single adapter).
    """

    A: Any
    B: Any
    scale: float
    rank: int
    alpha: float
    method: str


# ============================================================================================
# Weights: where they go, and how PEFT rounds them
# ============================================================================================


def _round(value: float, weight_dtype: str | None) -> float:
    """A Python float through ``weight_dtype`` (PEFT: ``torch.tensor(list)``, float32 by default)."""
    return value if weight_dtype is None else float(np.asarray(value, dtype=weight_dtype))


def _factor_weights(scales: list[float], weights: list[float], weight_dtype: str | None):
    """``a_i = sign(w_i s_i) sqrt|w_i s_i|`` (on A), ``b_i = sqrt|w_i s_i|`` (on B), each rounded
    through weight_dtype; ``w_i * s_i`` and the square root in Python floats, as PEFT."""
    a, b = [], []
    for w, s in zip(weights, scales):
        ws = w * s
        root = math.sqrt(abs(ws))
        a.append(_round(root * (1 if ws >= 0 else -1), weight_dtype))
        b.append(_round(root, weight_dtype))
    return a, b


def weighted_delta(adapters: Mapping[str, Any], weights: Sequence[float]) -> Any:
    """(C1): ``sum_i w_i s_i B_i A_i``, shape (d_out, d_in): what every method aims at.

    Each term is ``(B_i @ A_i) * (w_i * s_i)``; weights are not rounded.
    """
    ads, ws = _check_inputs(adapters, weights)
    out = None
    for (A, B, s, _), w in zip(ads.values(), ws):
        term = (B @ A) * (w * s)                                          # (d_out, d_in)
        out = term if out is None else out + term
    return out


def linear_cross_terms(adapters: Mapping[str, Any], weights: Sequence[float], *,
                       weight_dtype: str | None = "float32") -> Any:
    """(C2)'s error term: ``sum_{i != j} b_i a_j B_i A_j``, shape (d_out, d_in).

    With PEFT's ``linear`` result ``(A, B)``: ``B @ A = sum_i a_i b_i B_i A_i + linear_cross_terms``,
    where ``a_i b_i = w_i s_i`` up to the rounding of the square roots (and of weight_dtype).
    All adapters must share one rank.
    """
    ads, ws = _check_inputs(adapters, weights)
    _same_rank(ads, "linear_cross_terms")
    weight_dtype = _check_weight_dtype(weight_dtype)
    items = list(ads.values())
    a, b = _factor_weights([t.scale for t in items], ws, weight_dtype)
    out = None
    for i, ti in enumerate(items):
        for j, tj in enumerate(items):
            if i != j:
                term = (ti.B @ tj.A) * (b[i] * a[j])                      # (d_out, d_in)  B_i A_j
                out = term if out is None else out + term
    if out is None:
        xp = namespace(items[0].A)
        out = xp.zeros((items[0].B.shape[0], items[0].A.shape[1]), dtype=getval(items[0].A).dtype)
    return out


# ============================================================================================
# The merge operators of peft/utils/merge_utils.py, on lists of arrays
# ============================================================================================


def _magnitude_prune(t: Any, density: float) -> Any:
    """Keep the ``k = int(density * numel)`` entries largest in |value| (ties: the lower flat index
    first; PEFT's torch.topk leaves ties unspecified), zero the others."""
    if density >= 1:
        return t
    xp = namespace(t)
    n = math.prod(t.shape)
    k = int(density * n)                                                  # PEFT's truncation
    flat = xp.reshape(xp.abs(t), (n,))
    order = xp.argsort(flat, descending=True, stable=True)                # largest first
    rank_of = xp.argsort(order, stable=True)                              # inverse permutation
    keep = xp.reshape(xp.astype(rank_of < k, t.dtype), tuple(t.shape))
    return t * keep


def _random_prune(t: Any, density: float, mask: Any) -> Any:
    """DARE: ``t * mask / density`` (PEFT multiplies, then divides); density 1 leaves t as it is."""
    return t if density >= 1 else (t * mask) / density


def _task_arithmetic(ts: list[Any], vs: list[float]) -> Any:
    out = ts[0] * vs[0]
    for t, v in zip(ts[1:], vs[1:]):
        out = out + t * v
    return out


def _majority_agrees(ts: list[Any], method: str) -> list[Any]:
    """TIES' election on the unweighted tensors: for each i, where sign(t_i) is the elected sign."""
    xp = namespace(ts[0])
    signs = [xp.sign(t) for t in ts]
    votes = ts if method == "total" else signs
    total = votes[0]
    for v in votes[1:]:
        total = total + v
    elected = xp.where(total >= 0, xp.ones_like(total), -xp.ones_like(total))  # ties go to +1
    return [xp.astype(s == elected, ts[0].dtype) for s in signs]


def _disjoint_merge(ts: list[Any], vs: list[float], agree: list[Any]) -> Any:
    """``sum_i agree_i v_i t_i / max(1, sum_i agree_i)``: the mean of the agreeing weighted entries."""
    xp = namespace(ts[0])
    total, count = None, None
    for t, v, m in zip(ts, vs, agree):
        term = (t * v) * m
        total = term if total is None else total + term
        count = m if count is None else count + m
    return total / xp.maximum(count, xp.ones_like(count))


def _operator(base: str, ts: list[Any], vs: list[float], density: float | None, majority_sign: str,
              masks: list[Any] | None) -> Any:
    """One of PEFT's task_arithmetic / ties / dare_linear / dare_ties / magnitude_prune."""
    masks = [None] * len(ts) if masks is None else masks                  # DARE at density 1: none
    if base == "linear":
        return _task_arithmetic(ts, vs)
    if base == "magnitude_prune":
        return _task_arithmetic([_magnitude_prune(t, density) for t in ts], vs)
    if base == "dare_linear":
        return _task_arithmetic([_random_prune(t, density, m) for t, m in zip(ts, masks)], vs)
    pruned = ([_magnitude_prune(t, density) for t in ts] if base == "ties"
              else [_random_prune(t, density, m) for t, m in zip(ts, masks)])   # dare_ties
    return _disjoint_merge(pruned, vs, _majority_agrees(pruned, majority_sign))


# ============================================================================================
# The SVD step
# ============================================================================================


def _quantile(values: Any, q: float) -> Any:
    """torch.quantile's default ("linear"): sorted v, position p = q (n - 1), lerp between
    v[floor p] and v[ceil p] with torch.lerp's formula. Returns a 0-D array of values' dtype."""
    xp = namespace(values)
    v = xp.sort(values)
    n = v.shape[0]
    pos = float(np.asarray(q, dtype=dtype_name(v.dtype)) * np.asarray(n - 1, dtype=dtype_name(v.dtype)))
    lo, hi = int(math.floor(pos)), int(math.ceil(pos))
    w = pos - lo
    a, b = v[lo], v[hi]
    return a + w * (b - a) if w < 0.5 else b - (b - a) * (1.0 - w)        # torch.lerp


def _truncated_svd(delta: Any, rank: int, clamp: float | None, full_matrices: bool,
                   driver: str | None, svd: Any) -> tuple[Any, Any]:
    """``B = U_r S_r`` (d_out, rank), ``A = V_r^T`` (rank, d_in), optionally clamped (see module doc)."""
    xp = namespace(delta)
    if svd is not None:                                                   # the caller's factorisation
        U, S, Vh = svd(delta, full_matrices)
        k = min(delta.shape)
        if U.shape[0] != delta.shape[0] or U.shape[1] < k or S.shape != (k,) or Vh.shape[1] != delta.shape[1] \
                or Vh.shape[0] < k:
            raise ValueError(f"svd returned U {tuple(U.shape)}, S {tuple(S.shape)}, Vh {tuple(Vh.shape)} "
                             f"for a {tuple(delta.shape)} matrix")
    elif driver is None:
        U, S, Vh = xp.linalg.svd(delta, full_matrices=full_matrices)
    else:                                                                 # NumPy only, via SciPy
        import scipy.linalg
        U, S, Vh = (np.asarray(t) for t in scipy.linalg.svd(to_numpy(delta), full_matrices=full_matrices,
                                                            lapack_driver=driver))
    B = U[:, :rank] * S[:rank]                                            # (d_out, rank)  U_r diag(S_r)
    A = Vh[:rank, :]                                                      # (rank, d_in)   V_r^T
    if clamp is not None:
        dist = xp.concat([xp.reshape(B, (-1,)), xp.reshape(A, (-1,))])
        hi = _quantile(dist, clamp)
        # torch.clamp(t, -h, h) is min(max(t, -h), h): when h < 0 (a low quantile q), every entry
        # becomes h. The Array API leaves clip with min > max unspecified, so it is spelt out.
        B = xp.minimum(xp.maximum(B, -hi), hi)
        A = xp.minimum(xp.maximum(A, -hi), hi)
    return A, B


# ============================================================================================
# combine_adapters
# ============================================================================================


def combine_adapters(adapters: Mapping[str, Any], weights: Sequence[float], method: str, *,
                     rank: int | None = None, density: float | None = None,
                     majority_sign: str = "total", masks: Mapping[str, Any] | None = None,
                     svd_clamp: float | None = None, svd_full_matrices: bool = True,
                     svd_driver: str | None = None, svd: Any = None,
                     weight_dtype: str | None = "float32", peft_rslora_bug: bool = False) -> Combined:
    """Combine the adapters of one linear weight into one adapter (see the module doc for the math).

    Parameters
    ----------
    adapters : mapping name -> (A (r_i, d_in), B (d_out, r_i), scale s_i), in PEFT's list order
    weights : sequence of real numbers, one per adapter (negative subtracts an adapter)
    method : one of :data:`METHODS` (``"exact"`` is lora-ref's; the others are PEFT's
        ``combination_type``)
    rank : int, SVD methods only (PEFT's ``svd_rank``); default the largest r_i (see the module
        doc for a rank above min(d_out, d_in))
    density : float, required by the ties, dare and magnitude_prune methods, refused by the others
    majority_sign : "total" or "frequency" (ties and dare_ties variants)
    masks : mapping name -> 0/1 array(s), DARE methods only (required unless density is 1):
        factor methods ``(mask_A (r, d_in), mask_B (d_out, r))``, SVD methods one (d_out, d_in)
    svd_clamp : quantile in [0, 1], SVD methods only;  svd_full_matrices : bool (PEFT's default True)
    svd_driver : None (the backend's linalg.svd), or "gesdd" / "gesvd" (SciPy, NumPy arrays)
    svd : callable ``(delta, full_matrices) -> (U, S, Vh)``, optional, instead of the above: the
        singular vectors' signs are the LAPACK build's choice (NumPy's and torch's differ on some
        shapes), and svd_clamp's quantile sees them; pass another implementation's SVD to
        reproduce its clamped factors
    weight_dtype : "float32" (PEFT, torch's default dtype), "float64" or None (no rounding)
    peft_rslora_bug : the scale PEFT 0.21.2 gives the result when the first adapter is rsLoRA

    Returns a :class:`Combined`; its delta ``scale * B @ A`` is (d_out, d_in).
    """
    ads, ws = _check_inputs(adapters, weights)
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if method != "exact" and len(ads) == 1:
        method = "linear"                                                 # PEFT's rule for one adapter
    svd_method = method in SVD_METHODS
    base = method[:-4] if svd_method else method                          # "ties_svd" -> "ties"
    base = "linear" if base == "" else base                               # "svd" -> task arithmetic
    weight_dtype = _check_weight_dtype(weight_dtype)
    checks.boolean(peft_rslora_bug, "peft_rslora_bug")
    checks.boolean(svd_full_matrices, "svd_full_matrices")
    if method == "exact" and peft_rslora_bug:
        raise ValueError("peft_rslora_bug reproduces PEFT's methods; 'exact' is lora-ref's own and has no such bug")
    if majority_sign not in ("total", "frequency"):
        raise ValueError(f"majority_sign must be 'total' or 'frequency', got {majority_sign!r}")
    density = _check_density(density, base, method)
    items = list(ads.values())
    d_out, d_in = items[0].B.shape[0], items[0].A.shape[1]
    mask_list = _check_masks(masks, ads, base, svd_method, density, method)
    if not svd_method and (rank is not None or svd_clamp is not None or svd_driver is not None or svd is not None):
        raise ValueError(f"rank, svd_clamp, svd_driver and svd apply to the SVD methods only, not {method!r}")
    if svd is not None and (svd_driver is not None or not callable(svd)):
        raise ValueError("svd must be a callable (delta, full_matrices) -> (U, S, Vh), and excludes svd_driver")

    if method in ("exact", "cat"):
        if method == "exact":                                            # w_i s_i A_i, one rounding
            As = [t.A * (w * t.scale) for t, w in zip(items, ws)]
        else:                                                            # PEFT: (A_i * w_i) * s_i
            As = [(t.A * w) * t.scale for t, w in zip(items, ws)]
        xp = namespace(*As)
        A = xp.concat(As, axis=0)                                         # (sum r_i, d_in)
        B = xp.concat([t.B for t in items], axis=1)                       # (d_out, sum r_i)
    elif not svd_method:
        _same_rank(ads, method)
        a, b = _factor_weights([t.scale for t in items], ws, weight_dtype)
        mA = None if mask_list is None else [m[0] for m in mask_list]
        mB = None if mask_list is None else [m[1] for m in mask_list]
        A = _operator(base, [t.A for t in items], a, density, majority_sign, mA)   # (r, d_in)
        B = _operator(base, [t.B for t in items], b, density, majority_sign, mB)   # (d_out, r)
    else:
        new_rank = max(t.A.shape[0] for t in items) if rank is None else checks.positive_int(rank, "rank")
        if new_rank > min(d_out, d_in) and svd_full_matrices and d_out != d_in:
            raise ValueError(f"rank={new_rank} exceeds min(d_out, d_in) = {min(d_out, d_in)} for a ({d_out}, {d_in}) "
                             "weight: with svd_full_matrices=True PEFT builds A and B of different ranks here; "
                             f"pass a rank <= {min(d_out, d_in)} or svd_full_matrices=False")
        if svd_clamp is not None:
            svd_clamp = checks.finite_real(svd_clamp, "svd_clamp")
            if not 0.0 <= svd_clamp <= 1.0:
                raise ValueError(f"svd_clamp is a quantile and must be in [0, 1], got {svd_clamp!r}")
        if svd_driver not in (None, "gesdd", "gesvd"):
            raise ValueError(f"svd_driver must be None, 'gesdd' or 'gesvd' (PEFT's 'gesvdj' and 'gesvda' "
                             f"are cuSOLVER drivers, for CUDA only), got {svd_driver!r}")
        deltas = [(t.B @ t.A) * t.scale for t in items]                  # (d_out, d_in)  get_delta_weight
        v = [_round(w, weight_dtype) for w in ws]
        total = _operator(base, deltas, v, density, majority_sign, mask_list)
        A, B = _truncated_svd(total, new_rank, svd_clamp, svd_full_matrices, svd_driver, svd)
    r_new = new_rank if svd_method else int(A.shape[0])                  # the r PEFT writes in the config
    if method == "exact":
        return Combined(A, B, 1.0, r_new, float(r_new), method)
    alpha = float(r_new)                                                  # PEFT: r = lora_alpha = rank
    scale = alpha / math.sqrt(r_new) if peft_rslora_bug else alpha / r_new  # rsLoRA's scale, or LoRA's
    return Combined(A, B, scale, r_new, alpha, method)


def dare_masks(adapters: Mapping[str, Any], method: str, density: float, rng: np.random.Generator) -> dict[str, Any]:
    """DARE's random masks, drawn Bernoulli(density) from ``rng``, in the form ``masks=`` takes.

    Factor methods (dare_linear, dare_ties): ``{name: (mask_A, mask_B)}``; SVD methods: ``{name:
    mask (d_out, d_in)}``. NumPy arrays of the adapters' dtype, entries 0 or 1.
    """
    ads = as_adapters(adapters)
    if method not in ("dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"):
        raise ValueError(f"method must be a DARE method, got {method!r}")
    density = checks.finite_real(density, "density")
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    rng = checks.generator(rng, "rng")

    def draw(shape, dtype):
        return (rng.random(size=shape) < density).astype(dtype_name(dtype))

    out = {}
    for name, t in ads.items():
        dt = getval(t.A).dtype
        if method.endswith("_svd"):
            out[name] = draw((t.B.shape[0], t.A.shape[1]), dt)
        else:
            out[name] = (draw(tuple(t.A.shape), dt), draw(tuple(t.B.shape), dt))
    return out


# ============================================================================================
# Validation
# ============================================================================================


def _check_inputs(adapters: Any, weights: Any):
    ads = as_adapters(adapters)
    if not ads:
        raise ValueError("adapters is empty: nothing to combine")
    first_name, first = next(iter(ads.items()))
    for name, t in ads.items():
        if t.enable_lora is not None:
            raise ValueError(f"adapters[{name!r}] is a fused (enable_lora) adapter; "
                             "combine its blocks' weights separately")
        checks.float_array(t.A, f"adapters[{name!r}].A", ("float32", "float64"))
        checks.same_dtype((f"adapters[{first_name!r}].A", first.A), (f"adapters[{name!r}].A", t.A))
        if t.A.shape[1] != first.A.shape[1] or t.B.shape[0] != first.B.shape[0]:
            raise ValueError(f"adapters[{name!r}] is for a ({t.B.shape[0]}, {t.A.shape[1]}) weight but "
                             f"adapters[{first_name!r}] for a ({first.B.shape[0]}, {first.A.shape[1]}) one")
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise TypeError(f"weights must be a list of numbers, one per adapter, got {type(weights).__name__}")
    if len(weights) != len(ads):
        raise ValueError(f"weights has {len(weights)} entries but there are {len(ads)} adapters")
    return ads, [checks.finite_real(w, f"weights[{i}]") for i, w in enumerate(weights)]


def _same_rank(ads: dict, what: str) -> None:
    ranks = {n: int(t.A.shape[0]) for n, t in ads.items()}
    if len(set(ranks.values())) != 1:
        raise ValueError(f"{what} needs adapters of one rank (PEFT refuses otherwise), got ranks {ranks}")


def _check_weight_dtype(weight_dtype: Any) -> str | None:
    if weight_dtype not in (None, "float32", "float64"):
        raise ValueError(f"weight_dtype must be 'float32' (PEFT under torch's default dtype), 'float64' or None, "
                         f"got {weight_dtype!r}")
    return weight_dtype


def _check_density(density: Any, base: str, method: str) -> float | None:
    if base not in _DENSITY:
        if density is not None:
            raise ValueError(f"density applies to the ties, dare and magnitude_prune methods, not {method!r}")
        return None
    if density is None:
        raise ValueError(f"{method!r} needs density, the fraction of entries kept, in [0, 1]")
    density = checks.finite_real(density, "density")
    low_ok = density > 0.0 if base in _DARE else density >= 0.0
    if not low_ok or density > 1.0:
        why = " (DARE divides by it: PEFT returns NaN at 0)" if base in _DARE else ""
        raise ValueError(f"density must be in {'(0' if base in _DARE else '[0'}, 1]{why}; PEFT treats values "
                         f"above 1 as 1 with a warning, lora-ref refuses them; got {density!r}")
    return density


def _check_masks(masks: Any, ads: dict, base: str, svd: bool, density: float | None, method: str):
    if base not in _DARE or density >= 1:
        if masks is not None:
            raise ValueError(f"masks are DARE's random masks; {method!r}"
                             f"{' with density 1 (nothing pruned)' if base in _DARE else ''} takes none")
        return None
    if not isinstance(masks, Mapping) or set(masks) != set(ads):
        got = sorted(masks) if isinstance(masks, Mapping) else type(masks).__name__
        raise ValueError(f"{method!r} needs masks: a mapping with one entry per adapter {list(ads)}, got {got}")
    out = []
    for name, t in ads.items():
        m = masks[name]
        shapes = [(t.B.shape[0], t.A.shape[1])] if svd else [tuple(t.A.shape), tuple(t.B.shape)]
        parts = [m] if svd else (list(m) if isinstance(m, (tuple, list)) else None)
        if parts is None or len(parts) != len(shapes):
            raise ValueError(f"masks[{name!r}] must be {'one (d_out, d_in) array' if svd else '(mask_A, mask_B)'} "
                             f"for {method!r}")
        fixed = []
        for part, shape, which in zip(parts, shapes, ("A", "B") if not svd else ("delta",)):
            what = f"masks[{name!r}] ({which})"
            if not checks.is_array(part) or tuple(part.shape) != shape:
                raise ValueError(f"{what} must be an array of shape {shape}, got "
                                 f"{tuple(part.shape) if checks.is_array(part) else type(part).__name__}")
            xp = namespace(part)
            values = xp.astype(part, getval(t.A).dtype)
            if not bool(xp.all((values == 0) | (values == 1))):
                raise ValueError(f"{what} must hold only 0 and 1 (a Bernoulli draw)")
            fixed.append(values)
        out.append(fixed[0] if svd else tuple(fixed))
    return out
