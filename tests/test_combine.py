"""Properties of lora_ref.combine: the exact combination, PEFT's methods against independent
per-entry re-implementations written here, the cross terms of ``linear`` (C2), the SVD truncation,
DARE's masks, the rsLoRA option, bad input, array_api_strict, and wrong combinations (mutants).

Bounds: ``2 gamma_n M`` with M the same sums on absolute values; n counted beside each test.
The SVD tests use LAPACK's backward error, ``U S V^T = D + E``, ``||E||_2 <= p(m, n) u ||D||_2``
(LAPACK Users' Guide, Section 4.9), with p(m, n) taken as m n: ``tolerance(dtype, m n) ||D||_F``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_ref import delta_weight, to_numpy
from lora_ref.combine import (
    FACTOR_METHODS,
    METHODS,
    SVD_METHODS,
    combine_adapters,
    dare_masks,
    linear_cross_terms,
    weighted_delta,
)
from lora_ref.testing import assert_within, tolerance


def f64(a):
    return np.asarray(to_numpy(a), dtype=np.float64)


@st.composite
def combine_cases(draw, same_rank=False, dtype=None, n_max=3):
    dtype = draw(st.sampled_from(["float32", "float64"])) if dtype is None else dtype
    d_in, d_out = draw(st.integers(2, 9)), draw(st.integers(2, 9))
    n = draw(st.integers(1, n_max))
    r0 = draw(st.integers(1, 4))
    ranks = [r0] * n if same_rank else [draw(st.integers(1, 4)) for _ in range(n)]
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    ads = {f"task{i}": (rng.uniform(-1, 1, (r, d_in)).astype(dtype), rng.uniform(-1, 1, (d_out, r)).astype(dtype),
                        float(rng.choice([0.5, 2.0, 1.7, 0.35]))) for i, r in enumerate(ranks)}
    weights = [float(w) for w in rng.choice([0.7, -0.4, 1.3, 0.25, -1.0], size=n)]
    return dict(ads=ads, weights=weights, dtype=dtype, d_in=d_in, d_out=d_out, ranks=ranks, rng=rng)


def abs_weighted(case, weights=None):
    weights = case["weights"] if weights is None else weights
    return sum(abs(w * s) * np.abs(f64(B)) @ np.abs(f64(A)) for (A, B, s), w in zip(case["ads"].values(), weights))


def peft_factor_weights(case, rounding=np.float32):
    """a_i, b_i as PEFT computes them (Python floats, sqrt, then torch.tensor: float32)."""
    a, b = [], []
    for (_, _, s), w in zip(case["ads"].values(), case["weights"]):
        root = math.sqrt(abs(w * s))
        a.append(float(rounding(root if w * s >= 0 else -root)))
        b.append(float(rounding(root)))
    return a, b


# ----------------------------------------------------------------------------------------------
# exact and cat: (C1) as factors
# ----------------------------------------------------------------------------------------------


@given(case=combine_cases())
def test_exact_and_cat_are_the_weighted_sum_of_deltas(case):
    target = weighted_delta(case["ads"], case["weights"])
    R = sum(case["ranks"])
    # exact: fl(w s), times A, times B, a sum of R products; weighted_delta: B A (r), times fl(w s)
    # (2), a sum of len(ads) terms. Both within n = R + len + 4 roundings of (C1); cat has one more.
    bound = 2 * tolerance(case["dtype"], R + len(case["ads"]) + 5) * abs_weighted(case)
    methods = ("exact", "cat") if len(case["ads"]) > 1 else ("exact",)
    if len(case["ads"]) == 1:                    # PEFT runs linear for one adapter, cat included
        assert combine_adapters(case["ads"], case["weights"], "cat").method == "linear"
    for method in methods:
        c = combine_adapters(case["ads"], case["weights"], method)
        assert c.rank == R and c.alpha == R and c.scale == 1.0
        assert c.A.shape == (R, case["d_in"]) and c.B.shape == (case["d_out"], R) and c.A.dtype == case["dtype"]
        assert_within(delta_weight(c.A, c.B, c.scale), target, bound, what=method)


def test_cat_rounds_as_peft_does():
    # PEFT: A * weight * scaling, left to right: two roundings, (A w) s, not A (w s).
    A, B = np.array([[0.1, 0.7]]), np.array([[1.0]])
    c = combine_adapters({"t0": (A, B, 0.3), "t1": (A, B, 0.3)}, [0.1, 0.1], "cat")
    assert np.array_equal(c.A[:1], (A * 0.1) * 0.3)
    e = combine_adapters({"t0": (A, B, 0.3), "t1": (A, B, 0.3)}, [0.1, 0.1], "exact")
    assert np.array_equal(e.A[:1], A * (0.1 * 0.3))


# ----------------------------------------------------------------------------------------------
# linear: separately combined factors and their cross terms (C2)
# ----------------------------------------------------------------------------------------------


@given(case=combine_cases(same_rank=True))
def test_linear_is_the_weighted_sum_plus_the_cross_terms(case):
    c = combine_adapters(case["ads"], case["weights"], "linear")
    a, b = peft_factor_weights(case)
    As, Bs = [f64(t[0]) for t in case["ads"].values()], [f64(t[1]) for t in case["ads"].values()]
    # The factors themselves: A = sum_i a_i A_i, B = sum_i b_i B_i (n products and sums each).
    n = len(As)
    assert_within(c.A, sum(ai * Ai for ai, Ai in zip(a, As)),
                  2 * tolerance(case["dtype"], n + 2) * sum(abs(ai) * np.abs(Ai) for ai, Ai in zip(a, As)), what="A")
    # (C2): B A = sum_i a_i b_i B_i A_i + cross. B A: the factors' 2n + 2 roundings, then r more;
    # the right side: (B_i A_j) (r), times b_i a_j (2), a sum of n^2 terms.
    cross = linear_cross_terms(case["ads"], case["weights"])
    diag = sum(ai * bi * (Bi @ Ai) for ai, bi, Ai, Bi in zip(a, b, As, Bs))
    M = sum(abs(bi * aj) * np.abs(Bi) @ np.abs(Aj) for bi, Bi in zip(b, Bs) for aj, Aj in zip(a, As))
    rounds = n * n + 2 * n + case["ranks"][0] + 6
    assert_within(delta_weight(c.A, c.B, c.scale), diag + f64(cross), 2 * tolerance(case["dtype"], rounds) * M,
                  what="linear = diagonal + cross terms")


@given(case=combine_cases(same_rank=True, dtype="float64"))
def test_cross_terms_formula(case):
    # sum_{i != j} sign(w_j s_j) sqrt(|w_i s_i| |w_j s_j|) B_i A_j, written out here, unrounded weights.
    ts = list(case["ads"].values())
    ws = [w * t[2] for w, t in zip(case["weights"], ts)]
    expected = np.zeros((case["d_out"], case["d_in"]))
    M = np.zeros_like(expected)
    for i, (_, Bi, _) in enumerate(ts):
        for j, (Aj, _, _) in enumerate(ts):
            if i != j:
                c = math.copysign(1.0, ws[j]) * math.sqrt(abs(ws[i]) * abs(ws[j]))
                expected += c * (Bi @ Aj)
                M += abs(c) * np.abs(Bi) @ np.abs(Aj)
    got = linear_cross_terms(case["ads"], case["weights"], weight_dtype=None)
    # per term: B_i A_j (r), the weight (sqrt, products: 4), a sum of n^2 terms
    assert_within(got, expected, 2 * tolerance("float64", len(ts) ** 2 + case["ranks"][0] + 6) * M, what="cross")
    # and linear's error against (C1) is exactly these cross terms (plus the sqrt's roundings):
    c = combine_adapters(case["ads"], case["weights"], "linear", weight_dtype=None)
    err = f64(delta_weight(c.A, c.B, 1.0)) - f64(weighted_delta(case["ads"], case["weights"]))
    Mfull = M + 2 * abs_weighted(case)
    assert_within(err, expected, 2 * tolerance("float64", 2 * len(ts) ** 2 + case["ranks"][0] + 12) * Mfull,
                  what="linear - exact")


def test_linear_is_exact_for_one_adapter_and_not_for_two():
    rng = np.random.default_rng(5)
    one = {"t0": (rng.normal(size=(2, 4)), rng.normal(size=(3, 2)), 1.5)}
    c = combine_adapters(one, [-0.6], "svd")                  # PEFT runs linear for a single adapter
    assert c.method == "linear" and c.rank == 2
    M = 0.9 * np.abs(one["t0"][1]) @ np.abs(one["t0"][0])
    # a b = w s up to the two float32 roundings of the weights, then r + 4 float64 roundings.
    bound = 2 * (tolerance("float32", 2) + tolerance("float64", 2 + 4)) * M
    assert_within(delta_weight(c.A, c.B, c.scale), weighted_delta(one, [-0.6]), bound, what="one adapter")
    two = {**one, "t1": (rng.normal(size=(2, 4)), rng.normal(size=(3, 2)), 0.5)}
    c = combine_adapters(two, [-0.6, 1.0], "linear")
    M = 0.9 * np.abs(two["t0"][1]) @ np.abs(two["t0"][0]) + 0.5 * np.abs(two["t1"][1]) @ np.abs(two["t1"][0])
    with pytest.raises(AssertionError, match="exceeds its bound"):    # the cross terms are no rounding error
        assert_within(delta_weight(c.A, c.B, 1.0), weighted_delta(two, [-0.6, 1.0]), bound * 2, what="two")


# ----------------------------------------------------------------------------------------------
# TIES, DARE, magnitude pruning: against per-entry loops written here
# ----------------------------------------------------------------------------------------------


def prune_loop(t, density):
    flat = t.reshape(-1)
    if density >= 1:
        return t.copy()
    k = int(density * flat.size)
    keep = sorted(range(flat.size), key=lambda i: (-abs(flat[i]), i))[:k]
    out = np.zeros_like(flat)
    out[keep] = flat[keep]
    return out.reshape(t.shape)


def operator_loop(base, ts, vs, density, majority, masks):
    if base in ("dare_linear", "dare_ties") and density < 1:
        ts = [(t * m) / density for t, m in zip(ts, masks)]
    elif base in ("ties", "magnitude_prune"):
        ts = [prune_loop(t, density) for t in ts]
    if base in ("linear", "dare_linear", "magnitude_prune"):
        return sum(v * t for v, t in zip(vs, ts))
    out = np.zeros_like(ts[0])
    for idx in np.ndindex(out.shape):
        vals = [float(t[idx]) for t in ts]
        vote = sum(vals) if majority == "total" else sum(np.sign(vals))
        elected = 1.0 if vote >= 0 else -1.0
        agree = [i for i, v in enumerate(vals) if np.sign(v) == elected]
        out[idx] = sum(vals[i] * vs[i] for i in agree) / max(1, len(agree))
    return out


@settings(max_examples=30)
@given(case=combine_cases(same_rank=True, dtype="float64"), method=st.sampled_from(FACTOR_METHODS),
       density=st.sampled_from([0.0, 0.3, 0.5, 0.9, 1.0]), majority=st.sampled_from(["total", "frequency"]))
def test_factor_methods_against_entry_loops(case, method, density, majority):
    if len(case["ads"]) == 1 or (method.startswith("dare") and density == 0.0):
        return
    kw = {} if method == "linear" else {"density": density}
    masks = None
    if method.startswith("dare") and density < 1:
        masks = dare_masks(case["ads"], method, density, case["rng"])
        kw["masks"] = masks
    c = combine_adapters(case["ads"], case["weights"], method, majority_sign=majority, **kw)
    a, b = peft_factor_weights(case)
    names = list(case["ads"])
    for which, vs, k in (("A", a, 0), ("B", b, 1)):
        ts = [case["ads"][n][k] for n in names]
        ms = None if masks is None else [masks[n][k] for n in names]
        expected = operator_loop(method, ts, vs, density, majority, ms)
        # Each entry: DARE's division (1), the products v_i t_i (1), a sum of n (n - 1), TIES'
        # division by the count (1); M = sum_i |v_i t_i| / density bounds every partial sum.
        rescale = 1 / density if method.startswith("dare") and density < 1 else 1.0
        M = sum(abs(v) * np.abs(t) for v, t in zip(vs, ts)) * rescale
        assert_within(getattr(c, which), expected, 2 * tolerance("float64", len(ts) + 4) * M, what=f"{method} {which}")


@settings(max_examples=20)
@given(case=combine_cases(dtype="float64"), method=st.sampled_from(SVD_METHODS),
       density=st.sampled_from([0.3, 0.6, 1.0]))
def test_svd_methods_against_entry_loops_and_eckart_young(case, method, density):
    if len(case["ads"]) == 1:
        return
    base = "linear" if method == "svd" else method[:-4]
    kw = {} if base == "linear" else {"density": density}
    masks = None
    if base.startswith("dare") and density < 1:
        masks = dare_masks(case["ads"], method, density, case["rng"])
        kw["masks"] = masks
    rank = max(case["ranks"])
    k = min(case["d_out"], case["d_in"], rank)
    full = rank <= min(case["d_out"], case["d_in"]) or case["d_out"] == case["d_in"]
    c = combine_adapters(case["ads"], case["weights"], method, svd_full_matrices=full, **kw)
    assert c.rank == rank and c.scale == 1.0 and c.A.shape == (k, case["d_in"]) and c.B.shape == (case["d_out"], k)
    deltas = [(B @ A) * s for A, B, s in case["ads"].values()]
    vs = [float(np.float32(w)) for w in case["weights"]]
    D = operator_loop(base, deltas, vs, density, "total", None if masks is None else list(masks.values()))
    S = np.linalg.svd(D, compute_uv=False)
    m, n = D.shape
    # Eckart-Young: the rank-k truncation's error has spectral norm sigma_{k+1} (0 when k = rank D).
    err = np.linalg.norm(D - f64(c.B) @ f64(c.A), 2)
    tail = S[k] if k < len(S) else 0.0
    # Two SVDs (ours, and NumPy's inside the spectral norm), each within gamma_{mn} ||D||_F, the
    # product B A and the subtraction (k + 1 roundings of at most ||D||_F each): 4 gamma_{mn} ||D||_F.
    assert abs(err - tail) <= 4 * tolerance("float64", m * n) * np.linalg.norm(D)


def test_magnitude_prune_keeps_int_density_times_numel():
    # PEFT's k = int(density * numel): 0.29 * 100 = 28.999999999999996 keeps 28 entries, not 29.
    rng = np.random.default_rng(0)
    A = rng.permutation(np.arange(1.0, 101.0)).reshape(20, 5) * rng.choice([-1, 1], size=(20, 5))
    ads = {"t0": (A, np.ones((3, 20)), 1.0), "t1": (A, np.ones((3, 20)), 1.0)}
    c = combine_adapters(ads, [1.0, 1.0], "magnitude_prune", density=0.29, weight_dtype=None)
    kept = np.sort(np.abs(c.A[c.A != 0]))
    assert kept.size == 28 and np.array_equal(kept, 2 * np.arange(73.0, 101.0))


def test_dare_masks_rescale_and_density_one():
    rng = np.random.default_rng(2)
    ads = {f"t{i}": (rng.normal(size=(2, 4)), rng.normal(size=(3, 2)), 1.0) for i in range(2)}
    ones = {n: (np.ones((2, 4)), np.ones((3, 2))) for n in ads}
    lin = combine_adapters(ads, [0.5, 0.5], "linear")
    dare = combine_adapters(ads, [0.5, 0.5], "dare_linear", density=0.5, masks=ones)
    assert np.array_equal(dare.A, combine_adapters({n: (A / 0.5, B, s) for n, (A, B, s) in ads.items()},
                                                   [0.5, 0.5], "linear").A)   # (t * 1) / d = t / d
    same = combine_adapters(ads, [0.5, 0.5], "dare_linear", density=1.0)      # nothing pruned, no masks
    assert np.array_equal(same.A, lin.A) and np.array_equal(same.B, lin.B)
    m = dare_masks(ads, "dare_ties_svd", 0.3, np.random.default_rng(0))
    assert set(m) == set(ads) and m["t0"].shape == (3, 4) and set(np.unique(m["t0"])) <= {0.0, 1.0}


def test_svd_clamp_and_rank():
    rng = np.random.default_rng(4)
    ads = {f"t{i}": (rng.normal(size=(3, 6)), rng.normal(size=(5, 3)), 1.0) for i in range(2)}
    full = combine_adapters(ads, [1.0, 1.0], "svd", rank=2)
    values = np.concatenate([full.B.ravel(), full.A.ravel()])
    for q in (0.9, 0.3):
        c = combine_adapters(ads, [1.0, 1.0], "svd", rank=2, svd_clamp=q)
        hi = np.quantile(values, q)                      # NumPy's "linear" quantile, torch's default
        # torch.clamp(t, -h, h) = min(max(t, -h), h); for q = 0.3, h < 0 and every entry becomes h.
        for got, ref in ((c.B, full.B), (c.A, full.A)):
            assert_within(got, np.minimum(np.maximum(ref, -hi), hi), 2 * tolerance("float64", 4) * np.abs(values).max(),
                          what=f"clamp {q}")
    assert hi < 0 and np.all(c.A == c.A.flat[0])
    gesvd = combine_adapters(ads, [1.0, 1.0], "svd", rank=5, svd_driver="gesvd", svd_full_matrices=False)
    D = weighted_delta(ads, [1.0, 1.0])
    # rank 5 = min(d_out, d_in): the truncation keeps everything; the SVD's backward error and the
    # product B A, each within gamma_{mn} ||D||_F.
    assert_within(gesvd.B @ gesvd.A, D, 2 * tolerance("float64", 5 * 6) * np.linalg.norm(D), what="gesvd")


# ----------------------------------------------------------------------------------------------
# PEFT 0.21.2's rsLoRA over-scaling, as an option
# ----------------------------------------------------------------------------------------------


def test_peft_rslora_bug_scales_by_sqrt_rank():
    rng = np.random.default_rng(1)
    ads = {f"t{i}": (rng.normal(size=(r, 4)), rng.normal(size=(3, r)), 1.0) for i, r in enumerate((2, 3))}
    good = combine_adapters(ads, [1.0, 1.0], "cat")
    bad = combine_adapters(ads, [1.0, 1.0], "cat", peft_rslora_bug=True)
    assert (good.rank, good.alpha, good.scale) == (5, 5.0, 1.0)
    assert bad.scale == 5.0 / math.sqrt(5) and np.array_equal(bad.A, good.A)
    with pytest.raises(ValueError, match="'exact' is lora-ref's own"):
        combine_adapters(ads, [1.0, 1.0], "exact", peft_rslora_bug=True)


# ----------------------------------------------------------------------------------------------
# Mutants: wrong placements of the weights must fail the bound
# ----------------------------------------------------------------------------------------------


def _mutant_ratio(case, mutate):
    """max |mutant - reference| / bound over the entries, for the single-adapter linear combination
    (where PEFT's linear is exact, so the bound is tight)."""
    name = next(iter(case["ads"]))
    one = {name: case["ads"][name]}
    w = case["weights"][0]
    A, B, s = (f64(t) if i < 2 else t for i, t in enumerate(one[name]))
    ref = f64(weighted_delta(one, [w]))
    bound = 2 * tolerance(case["dtype"], case["ranks"][0] + 8) * abs(w * s) * np.abs(B) @ np.abs(A)
    mutant = mutate(A, B, w * s)
    return float(np.max(np.abs(mutant - ref) / bound))


@given(case=combine_cases())
def test_mutants_fail_the_bound(case):
    w, s = case["weights"][0], case["ads"]["task0"][2]
    assert abs(w * s) != 1.0 and s != 1.0           # the cases' weights and scales make both visible
    # Weights applied to A and B both, without the square root: (w s)^2 B A instead of w s B A.
    assert _mutant_ratio(case, lambda A, B, ws: (ws * B) @ (ws * A)) > 1
    # Weighted A, unweighted B, the adapter's scale forgotten (REFERENCE's "weighted A with
    # unweighted B"): w B A instead of w s B A.
    assert _mutant_ratio(case, lambda A, B, ws: B @ (A * w)) > 1


# ----------------------------------------------------------------------------------------------
# array_api_strict, and bad input
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_array_api_strict_gives_numpys_factors(method):
    xs = pytest.importorskip("array_api_strict")
    rng = np.random.default_rng(9)
    ads = {f"t{i}": (rng.normal(size=(3, 6)), rng.normal(size=(5, 3)), 0.5 + i) for i in range(3)}
    kw = {}
    if method not in ("exact", "cat", "linear", "svd"):
        kw["density"] = 0.5
    if "dare" in method:
        kw["masks"] = dare_masks(ads, method, 0.5, np.random.default_rng(1))
    c = combine_adapters(ads, [0.7, -0.4, 1.3], method, **kw)
    conv = lambda v: tuple(xs.asarray(t) for t in v) if isinstance(v, tuple) else xs.asarray(v)  # noqa: E731
    sads = {k: (xs.asarray(A), xs.asarray(B), s) for k, (A, B, s) in ads.items()}
    if "masks" in kw:
        kw["masks"] = {k: conv(v) for k, v in kw["masks"].items()}
    cs = combine_adapters(sads, [0.7, -0.4, 1.3], method, **kw)
    assert isinstance(cs.A, type(xs.asarray(0.0))) and cs.rank == c.rank and cs.scale == c.scale
    if method in SVD_METHODS:    # two SVDs, each within gamma_{mn} ||D||_F of D (module doc)
        D = c.B @ c.A
        assert_within(f64(cs.B) @ f64(cs.A), D, 2 * tolerance("float64", 5 * 6) * np.linalg.norm(D), what=method)
    else:                        # the same arithmetic, operation for operation
        assert np.array_equal(f64(cs.A), c.A) and np.array_equal(f64(cs.B), c.B)


def test_bad_input():
    ads = {"t0": (np.ones((2, 3)), np.ones((4, 2)), 1.0), "t1": (np.ones((3, 3)), np.ones((4, 3)), 1.0)}
    with pytest.raises(ValueError, match="method must be one of exact, cat, linear"):
        combine_adapters(ads, [1, 1], "average")
    with pytest.raises(ValueError, match=r"linear needs adapters of one rank .*'t0': 2, 't1': 3"):
        combine_adapters(ads, [1, 1], "linear")
    with pytest.raises(ValueError, match="'ties' needs density"):
        combine_adapters(ads, [1, 1], "ties")
    with pytest.raises(ValueError, match="density applies to the ties, dare and magnitude_prune methods, not 'svd'"):
        combine_adapters(ads, [1, 1], "svd", density=0.5)
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\] \(DARE divides by it"):
        combine_adapters(ads, [1, 1], "dare_linear_svd", density=0.0)
    with pytest.raises(ValueError, match="lora-ref refuses them; got 1.5"):
        combine_adapters(ads, [1, 1], "ties_svd", density=1.5)
    with pytest.raises(ValueError, match="'dare_ties_svd' needs masks"):
        combine_adapters(ads, [1, 1], "dare_ties_svd", density=0.5)
    with pytest.raises(ValueError, match=r"masks\['t0'\] \(delta\) must hold only 0 and 1"):
        combine_adapters(ads, [1, 1], "dare_ties_svd", density=0.5, masks={n: np.full((4, 3), 0.5) for n in ads})
    with pytest.raises(ValueError, match=r"masks\['t0'\] \(delta\) must be an array of shape \(4, 3\)"):
        combine_adapters(ads, [1, 1], "dare_ties_svd", density=0.5, masks={n: np.ones((3, 4)) for n in ads})
    with pytest.raises(ValueError, match="masks are DARE's random masks; 'ties' takes none"):
        combine_adapters(ads, [1, 1], "ties", density=0.5, masks={})
    with pytest.raises(ValueError, match=r"rank=4 exceeds min\(d_out, d_in\) = 3 .* different ranks"):
        combine_adapters(ads, [1, 1], "svd", rank=4)
    assert combine_adapters(ads, [1, 1], "svd", rank=4, svd_full_matrices=False).A.shape == (3, 3)
    with pytest.raises(ValueError, match="rank, svd_clamp, svd_driver and svd apply to the SVD methods only"):
        combine_adapters(ads, [1, 1], "cat", rank=2)
    with pytest.raises(ValueError, match=r"svd_clamp is a quantile and must be in \[0, 1\]"):
        combine_adapters(ads, [1, 1], "svd", svd_clamp=99)
    with pytest.raises(ValueError, match="'gesvdj' and 'gesvda' are cuSOLVER drivers"):
        combine_adapters(ads, [1, 1], "svd", svd_driver="gesvdj")
    with pytest.raises(ValueError, match="weights has 1 entries but there are 2 adapters"):
        combine_adapters(ads, [1], "cat")
    with pytest.raises(ValueError, match=r"weights\[1\] must be finite"):
        combine_adapters(ads, [1, float("inf")], "cat")
    with pytest.raises(ValueError, match="majority_sign must be 'total' or 'frequency'"):
        combine_adapters(ads, [1, 1], "ties_svd", density=0.5, majority_sign="mean")
    with pytest.raises(TypeError, match=r"adapters\['t0'\].A must have a floating dtype \(float32, float64\)"):
        combine_adapters({"t0": (np.ones((2, 3), np.float16), np.ones((4, 2), np.float16), 1.0)}, [1], "cat")
    with pytest.raises(ValueError, match=r"adapters\['t1'\] is for a \(5, 3\) weight"):
        combine_adapters({**ads, "t1": (np.ones((2, 3)), np.ones((5, 2)), 1.0)}, [1, 1], "cat")
    with pytest.raises(ValueError, match="fused"):
        combine_adapters({"t0": (np.ones((4, 3)), np.ones((4, 2)), 1.0, (True, False, True))}, [1], "cat")
    with pytest.raises(ValueError, match="weight_dtype must be 'float32'"):
        combine_adapters(ads, [1, 1], "cat", weight_dtype="bfloat16")
