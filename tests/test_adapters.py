"""Properties of lora_ref.adapters: adapter sets (S1), the disabled state (S0), mixed batches (S2)
and merging a chosen set (S3), in float64 and float32, with gradients checked three ways.

Bounds: ``2 gamma_n M`` (lora_ref.testing.tolerance), M the same computation on absolute values
(computed by the function under test itself on |inputs| in float64: every output is a sum of
products, so that is the sum of the absolute values of its terms). The rounding count n of one
output entry, either way of computing it (adapter terms one by one, or through the merged weight
``x (W + sum_a s_a B_a A_a)^T``): a term ``x_j A_kj B_ik s_a`` goes through d_in - 1 additions in
``x A^T``, r_a - 1 in ``(.) B^T``, 2 products, the product by s_a and the rounding of s_a to the
dtype, then at most k + 1 additions joining the k active terms and the bias to the base:
``n = d_in + r_max + k + 4`` (+1 for a dropout mask). Exact properties are checked exactly.
"""

from __future__ import annotations

import autograd
import autograd.numpy as anp
import numpy as np
import pytest
from autograd.test_util import check_grads
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_ref import LoraConfig, lora_linear, to_numpy
from lora_ref.adapters import (
    BASE,
    Adapter,
    AdapterSet,
    adapter_set_linear,
    as_adapters,
    lora_delta,
    merge_adapters,
    mixed_batch_linear,
    unmerge_adapters,
)
from lora_ref.testing import assert_within, tolerance


def f64(a):
    return np.asarray(to_numpy(a), dtype=np.float64)


def absolute(adapters):
    return {k: (np.abs(f64(a.A)), np.abs(f64(a.B)), abs(a.scale), a.enable_lora)
            for k, a in as_adapters(adapters).items()}


@st.composite
def adapter_cases(draw, dtype=None, max_dim=12, max_adapters=3, samples=None):
    """x (N, T, d_in) or (N, d_in), W, bias, and 1-3 adapters of different ranks and scales."""
    dtype = draw(st.sampled_from(["float32", "float64"])) if dtype is None else dtype
    d_in, d_out = draw(st.integers(1, max_dim)), draw(st.integers(1, max_dim))
    n = draw(st.integers(1, max_adapters))
    ranks = [draw(st.integers(1, 6)) for _ in range(n)]
    N = draw(st.integers(1, 4)) if samples is None else samples
    tokens = draw(st.sampled_from([(), (1,), (3,)]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    u = lambda *shape: rng.uniform(-1.0, 1.0, size=shape).astype(dtype)  # noqa: E731
    adapters = {f"task{i}": (u(r, d_in), u(d_out, r), float(rng.choice([0.25, 0.5, 1.0, 2.0, 1.41])))
                for i, r in enumerate(ranks)}
    bias = u(d_out) if draw(st.booleans()) else None
    return dict(x=u(N, *tokens, d_in), W=u(d_out, d_in), bias=bias, adapters=adapters, d_in=d_in,
                r_max=max(ranks), dtype=dtype, rng=rng)


def bound(case, active, x=None, extra=0):
    x = case["x"] if x is None else x
    M = adapter_set_linear(np.abs(f64(x)), np.abs(f64(case["W"])), absolute(case["adapters"]), active,
                           bias=None if case["bias"] is None else np.abs(f64(case["bias"])))
    n = case["d_in"] + case["r_max"] + len(active) + 4 + extra
    return 2 * tolerance(case["dtype"], n) * M


# ----------------------------------------------------------------------------------------------
# (S1) the active set summed, (S0) disabled
# ----------------------------------------------------------------------------------------------


@given(case=adapter_cases(), data=st.data())
def test_active_set_equals_merged_weight_and_sum_of_terms(case, data):
    names = list(case["adapters"])
    active = data.draw(st.permutations(names).flatmap(lambda p: st.integers(1, len(p)).map(lambda k: p[:k])))
    y = adapter_set_linear(case["x"], case["W"], case["adapters"], active, bias=case["bias"])
    assert y.dtype == case["x"].dtype and y.shape == case["x"].shape[:-1] + (case["W"].shape[0],)
    # Oracle 1: the merged weight x (W + sum_a s_a B_a A_a)^T + b, another order of the same sums.
    W_merged = merge_adapters(case["W"], case["adapters"], active)
    y_merged = lora_linear(case["x"], W_merged, None, None, 1.0, case["bias"])
    assert_within(y, y_merged, bound(case, active), what="adapter set vs merged weight")
    # Oracle 2: float64 base plus each adapter's own lora_linear delta (its output minus the base).
    x, W, b = f64(case["x"]), f64(case["W"]), None if case["bias"] is None else f64(case["bias"])
    base = lora_linear(x, W, None, None, 1.0, b)
    expected = base + sum(lora_linear(x, W, f64(A), f64(B), s, b) - base
                          for A, B, s in (case["adapters"][k] for k in active))
    assert_within(y, expected, bound(case, active, extra=len(active)), what="adapter set vs per-adapter lora_linear")


@given(case=adapter_cases())
def test_one_active_adapter_is_lora_linear_bit_for_bit(case):
    name = next(iter(case["adapters"]))
    A, B, s = case["adapters"][name]
    y = adapter_set_linear(case["x"], case["W"], case["adapters"], [name], bias=case["bias"])
    assert np.array_equal(y, lora_linear(case["x"], case["W"], A, B, s, case["bias"]))


@given(case=adapter_cases())
def test_disabled_is_the_base_layer_exactly(case):
    y = adapter_set_linear(case["x"], case["W"], case["adapters"], (), bias=case["bias"])
    assert np.array_equal(y, lora_linear(case["x"], case["W"], None, None, 1.0, case["bias"]))


def test_fused_adapter_and_dropout_masks_in_a_set():
    rng = np.random.default_rng(3)
    x, W, b = rng.normal(size=(2, 4, 6)), rng.normal(size=(9, 6)), rng.normal(size=9)
    fused = Adapter(rng.normal(size=(4, 6)), rng.normal(size=(6, 2)), 0.75, (True, False, True))
    plain = (rng.normal(size=(3, 6)), rng.normal(size=(9, 3)), 1.25)
    mask = (rng.random(size=(2, 4, 6)) > 0.3) / 0.7
    ads = {"qv": fused, "all": plain}
    y1 = adapter_set_linear(x, W, ads, ["qv"], bias=b, dropout_masks={"qv": mask})
    assert np.array_equal(y1, lora_linear(x, W, fused.A, fused.B, 0.75, b, mask, (True, False, True)))
    y2 = adapter_set_linear(x, W, ads, ["qv", "all"], bias=b, dropout_masks={"qv": mask})
    d_all = lora_linear(x, W, *plain, b) - lora_linear(x, W, None, None, 1.0, b)
    M = adapter_set_linear(np.abs(x), np.abs(W), {"qv": (np.abs(fused.A), np.abs(fused.B), 0.75, fused.enable_lora),
                                                 "all": (np.abs(plain[0]), np.abs(plain[1]), 1.25)},
                           ["qv", "all"], bias=np.abs(b), dropout_masks={"qv": np.abs(mask)})
    # n = d_in + r_max + 2 active + 4, + 1 for the mask, + 2 for the oracle's own subtraction and sum.
    assert_within(y2, y1 + d_all, 2 * tolerance("float64", 6 + 3 + 2 + 4 + 1 + 2) * M, what="fused + plain set")


def test_adapter_from_config_takes_scale_rank_and_blocks():
    cfg = LoraConfig(r=4, alpha=8.0, use_rslora=True, rank_pattern={"c_attn": 2}, alpha_pattern={"c_attn": 3.0},
                     enable_lora={"c_attn": (True, False, True)})
    A, B = np.ones((4, 6)), np.ones((6, 2))
    a = Adapter.from_config(A, B, cfg, "h.0.attn.c_attn")
    assert a.scale == 3.0 / np.sqrt(2) and a.enable_lora == (True, False, True)
    assert Adapter.from_config(np.ones((4, 6)), np.ones((9, 4)), cfg).scale == 8.0 / 2
    with pytest.raises(ValueError, match=r"A must have 4 rows \(rank 2 for 'h.0.attn.c_attn'.*got shape \(2, 6\)"):
        Adapter.from_config(np.ones((2, 6)), B, cfg, "h.0.attn.c_attn")


# ----------------------------------------------------------------------------------------------
# (S2) mixed batch
# ----------------------------------------------------------------------------------------------


@given(case=adapter_cases(), data=st.data())
def test_mixed_batch_equals_each_sample_with_its_own_adapter(case, data):
    N = case["x"].shape[0]
    names = data.draw(st.lists(st.sampled_from([BASE, *case["adapters"]]), min_size=N, max_size=N))
    y = mixed_batch_linear(case["x"], case["W"], case["adapters"], names, bias=case["bias"])
    base = lora_linear(case["x"], case["W"], None, None, 1.0, case["bias"])
    for n, name in enumerate(names):
        active = () if name == BASE else (name,)
        alone = adapter_set_linear(case["x"][n:n + 1], case["W"], case["adapters"], active, bias=case["bias"])
        assert_within(y[n:n + 1], alone, bound(case, active, x=case["x"][n:n + 1]), what=f"sample {n} ({name})")
        if name == BASE:   # no adapter term reaches a base sample: bit for bit the batch's base layer
            assert np.array_equal(y[n], base[n])


def test_mixed_batch_a_sample_never_sees_another_adapter():
    # Two adapters whose deltas differ by 10^6 in size: any leak would dwarf the bound.
    rng = np.random.default_rng(0)
    x, W = rng.normal(size=(3, 5)), rng.normal(size=(4, 5))
    ads = {"small": (rng.normal(size=(2, 5)), rng.normal(size=(4, 2)), 1e-3),
           "large": (rng.normal(size=(2, 5)), rng.normal(size=(4, 2)), 1e3)}
    y = mixed_batch_linear(x, W, ads, ["small", "large", "small"])
    mags = {k: adapter_set_linear(np.abs(x), np.abs(W), {k: tuple(np.abs(t) for t in v)}, [k]) for k, v in ads.items()}
    for n, name in enumerate(["small", "large", "small"]):
        alone = adapter_set_linear(x[n:n + 1], W, ads, [name])[0]
        ratio = assert_within(y[n], alone, 2 * tolerance("float64", 5 + 2 + 1 + 4) * mags[name][n], what=name)
        assert ratio <= 1.0   # (a leak of the large adapter into a small sample would be ~1e12 bounds)


# ----------------------------------------------------------------------------------------------
# (S3) merging a chosen set
# ----------------------------------------------------------------------------------------------


@given(case=adapter_cases(), fan_in_fan_out=st.booleans())
def test_merge_then_unmerge_a_chosen_set(case, fan_in_fan_out):
    names = list(case["adapters"])[::-1]
    W = case["W"].T if fan_in_fan_out else case["W"]
    merged = merge_adapters(W, case["adapters"], names, fan_in_fan_out=fan_in_fan_out)
    back = unmerge_adapters(merged, case["adapters"], names, fan_in_fan_out=fan_in_fan_out)
    absW = np.abs(f64(case["W"])) + sum(abs(s) * np.abs(f64(B)) @ np.abs(f64(A))
                                        for A, B, s in case["adapters"].values())
    absW = absW.T if fan_in_fan_out else absW
    # Each entry: r roundings in B A, 2 for s, and len(names) additions each way.
    n = case["r_max"] + 2 * len(names) + 4
    assert_within(back, W, 2 * tolerance(case["dtype"], n) * absW, what="unmerge(merge(W))")
    assert merge_adapters(W, case["adapters"], (), fan_in_fan_out=fan_in_fan_out) is W


# ----------------------------------------------------------------------------------------------
# Gradients: hand VJPs vs autograd.numpy tracing vs finite differences
# ----------------------------------------------------------------------------------------------


def _delta_vjps(fun, x, A, B, s, mask, enable, G):
    vjp, y = autograd.make_vjp(lambda x_, A_, B_: fun(x_, A_, B_, s, mask, enable), argnum=(0, 1, 2))(x, A, B)
    return vjp(G), y


@settings(max_examples=30)
@given(dtype=st.sampled_from(["float32", "float64"]), fused=st.booleans(), masked=st.booleans(),
       seed=st.integers(0, 2**32 - 1), r=st.integers(1, 4), N=st.integers(1, 5))
def test_lora_delta_vjps_match_autograd_numpy_trace(dtype, fused, masked, seed, r, N):
    rng = np.random.default_rng(seed)
    u = lambda *shape: rng.uniform(-1, 1, size=shape).astype(dtype)  # noqa: E731
    d_in, q = 5, 3
    enable = (True, False, True) if fused else None
    n = 2 if fused else 1
    x, A, B = u(N, d_in), u(n * r, d_in), u(n * q, r)
    d_out = 3 * q if fused else q
    mask = ((rng.random(size=(N, d_in)) > 0.5) * 2.0).astype(dtype) if masked else None
    G, s = u(N, d_out), 0.75
    hand, y_hand = _delta_vjps(lora_delta, x, A, B, s, mask, enable, G)
    traced, y_traced = _delta_vjps(lora_delta.fun, x, A, B, s, mask, enable, G)
    mags, _ = _delta_vjps(lora_delta, *(np.abs(f64(t)) for t in (x, A, B)), s,
                          None if mask is None else np.abs(f64(mask)), enable, np.abs(f64(G)))
    assert np.array_equal(y_hand, y_traced)
    L = N + d_in + d_out + n * r + 4        # the longest chain in any gradient entry (as lora_linear's)
    for name, h, t, m, like in zip("xAB", hand, traced, mags, (x, A, B)):
        assert h.shape == like.shape and h.dtype == like.dtype, name
        assert_within(h, t, 2 * tolerance(dtype, L) * m, what=f"dL/d{name}")


def _plain_set(x, W, b, ads, active):
    """(S1) written directly in autograd.numpy, for an independent derivation of its gradients."""
    y = anp.dot(x, W.T) + b
    for name in active:
        A, B, s = ads[name]
        y = y + anp.dot(anp.dot(x, A.T), B.T) * s
    return y


def test_adapter_set_gradients_three_ways():
    rng = np.random.default_rng(7)
    x, W, b = rng.normal(size=(2, 3, 5)), rng.normal(size=(4, 5)), rng.normal(size=4)
    ads = {"t1": (rng.normal(size=(2, 5)), rng.normal(size=(4, 2)), 0.5),
           "t2": (rng.normal(size=(3, 5)), rng.normal(size=(4, 3)), 1.5)}
    G = rng.normal(size=(2, 3, 4))

    def f(fun):
        return lambda x_, W_, b_, A1, B1, A2, B2: fun(x_, W_, b_, {"t1": (A1, B1, 0.5), "t2": (A2, B2, 1.5)},
                                                      ["t2", "t1"])
    ours = lambda x_, W_, b_, ads_, act: adapter_set_linear(x_, W_, ads_, act, bias=b_)  # noqa: E731
    args = (x, W, b, *ads["t1"][:2], *ads["t2"][:2])
    argnum = tuple(range(7))
    hand = autograd.make_vjp(f(ours), argnum=argnum)(*args)[0](G)
    plain = autograd.make_vjp(f(_plain_set), argnum=argnum)(*args)[0](G)
    mags = autograd.make_vjp(f(ours), argnum=argnum)(*(np.abs(a) for a in args))[0](np.abs(G))
    for name, h, p, m in zip("x W b A1 B1 A2 B2".split(), hand, plain, mags):
        assert_within(h, p, 2 * tolerance("float64", 6 + 5 + 4 + 3 + 6) * m, what=f"dL/d{name}")
    np.random.seed(7)   # check_grads draws its directions from NumPy's global generator
    check_grads(f(ours), argnum=argnum, modes=["rev"], order=2)(*args)


def test_mixed_batch_gradients_finite_differences():
    rng = np.random.default_rng(8)
    x, W = rng.normal(size=(3, 2, 5)), rng.normal(size=(4, 5))
    B2 = rng.normal(size=(4, 3))
    f = lambda x_, W_, A1, B1, A2: mixed_batch_linear(  # noqa: E731
        x_, W_, {"t1": (A1, B1, 0.5), "t2": (A2, B2, 1.5)}, ["t2", BASE, "t1"])
    np.random.seed(8)
    check_grads(f, modes=["rev"], order=2, argnum=(0, 1, 2, 3, 4))(
        x, W, rng.normal(size=(2, 5)), rng.normal(size=(4, 2)), rng.normal(size=(3, 5)))
    # The base sample's row of x gets W^T g only: no adapter's A or B ever sees it.
    g = np.zeros((3, 2, 4))
    g[1] = 1.0
    grads = autograd.grad(lambda A1: (mixed_batch_linear(x, W, {"t1": (A1, rng.normal(size=(4, 2)), 0.5)},
                                                         ["t1", BASE, "t1"]) * g).sum())(np.ones((2, 5)))
    assert np.array_equal(grads, np.zeros((2, 5)))


# ----------------------------------------------------------------------------------------------
# Backends: array_api_strict gives NumPy's forward and gradients
# ----------------------------------------------------------------------------------------------


def test_array_api_strict_forward_and_gradients():
    xs = pytest.importorskip("array_api_strict")
    rng = np.random.default_rng(11)
    x, W = rng.normal(size=(3, 2, 5)), rng.normal(size=(4, 5))
    t1 = (rng.normal(size=(2, 5)), rng.normal(size=(4, 2)))
    t2 = (rng.normal(size=(3, 5)), rng.normal(size=(4, 3)))
    G = rng.normal(size=(3, 2, 4))
    names = ["t1", "t2", BASE]
    results = {}
    cases = (("numpy", lambda a: a, False), ("strict", xs.asarray, False), ("magnitude", np.abs, True))
    for label, conv, absolute_values in cases:
        def run(A1, B1, fn):
            ads = {"t1": (A1, B1, 0.5), "t2": (conv(t2[0]), conv(t2[1]), 1.5)}
            if fn == "set":
                return adapter_set_linear(conv(x), conv(W), ads, ["t2", "t1"])
            return mixed_batch_linear(conv(x), conv(W), ads, names)
        for fn in ("set", "mixed"):
            vjp, y = autograd.make_vjp(lambda A1, B1: run(A1, B1, fn), argnum=(0, 1))(conv(t1[0]), conv(t1[1]))
            results[label, fn] = [f64(y), *(f64(g) for g in vjp(conv(G)))]
    # Longest chain: dL/dA1 = s (G B1)^T x: d_out + N (6 tokens) + 3; forward: d_in + r + 2 + 4.
    n = 4 + 6 + 5 + 3 + 4
    for fn in ("set", "mixed"):
        for what, a, b, m in zip(("y", "dA1", "dB1"), results["numpy", fn], results["strict", fn],
                                 results["magnitude", fn]):
            assert_within(b, a, 2 * tolerance("float64", n) * m, what=f"strict {fn} {what}")


# ----------------------------------------------------------------------------------------------
# Bad input: clear errors naming the argument
# ----------------------------------------------------------------------------------------------


def test_bad_input():
    x, W = np.ones((2, 3)), np.ones((4, 3))
    ads = {"t1": (np.ones((2, 3)), np.ones((4, 2)), 1.0)}
    with pytest.raises(ValueError, match=r"active\[0\] = 'nope' is not an adapter here \(known: 't1'\)"):
        adapter_set_linear(x, W, ads, ["nope"])
    with pytest.raises(TypeError, match="active must be a list of adapter names"):
        adapter_set_linear(x, W, ads, "t1")
    with pytest.raises(ValueError, match="names an adapter twice"):
        adapter_set_linear(x, W, ads, ["t1", "t1"])
    with pytest.raises(ValueError, match="'__base__' is reserved"):
        adapter_set_linear(x, W, {BASE: ads["t1"]}, [])
    with pytest.raises(ValueError, match=r"does not fit W \(4, 3\)"):
        adapter_set_linear(x, W, {"t1": (np.ones((2, 3)), np.ones((5, 2)), 1.0)}, ["t1"])
    with pytest.raises(ValueError, match="A has 3 rows but B has rank 2"):
        adapter_set_linear(x, W, {"t1": (np.ones((3, 3)), np.ones((4, 2)), 1.0)}, ["t1"])
    with pytest.raises(TypeError, match=r"adapters\['t1'\].B is float32 but adapters\['t1'\].A is float64"):
        adapter_set_linear(x, W, {"t1": (np.ones((2, 3)), np.ones((4, 2), np.float32), 1.0)}, ["t1"])
    with pytest.raises(ValueError, match=r"adapters\['t1'\].scale must be finite"):
        adapter_set_linear(x, W, {"t1": (np.ones((2, 3)), np.ones((4, 2)), float("nan"))}, ["t1"])
    with pytest.raises(ValueError, match="dropout_masks must be keyed by active adapters"):
        adapter_set_linear(x, W, ads, [], dropout_masks={"t1": np.ones(3)})
    with pytest.raises(ValueError, match=r"x must be \(N, ..., d_in\) with N = len\(names\) = 3"):
        mixed_batch_linear(x, W, ads, ["t1", BASE, "t1"])
    with pytest.raises(ValueError, match=r"names\[1\] = 'x' is not an adapter here \(known: 't1' or '__base__'\)"):
        mixed_batch_linear(x, W, ads, ["t1", "x"])
    with pytest.raises(ValueError, match=r"names\[0\] = '__base__' is not an adapter here"):
        merge_adapters(W, ads, [BASE])
    with pytest.raises(TypeError, match="adapters must be a mapping"):
        adapter_set_linear(x, W, [ads["t1"]], [])
    with pytest.raises(TypeError, match=r"must be \(A, B, scale\) or an Adapter"):
        adapter_set_linear(x, W, {"t1": np.ones(3)}, [])
    with pytest.raises(TypeError, match="lora_delta is not differentiable with respect to scale"):
        autograd.grad(lambda s: lora_delta(x, *ads["t1"][:2], s).sum())(0.5)


def test_adapter_set_with_active_shares_the_checked_arrays():
    """with_active/disabled reuse the set's checked entries (no copies) and check only the names,
    with the constructor's messages."""
    lc = LoraConfig(r=2, alpha=2.0, target_modules=["q"])
    ads = {n: (lc, {"q": {"A": np.ones((2, 3)), "B": np.ones((4, 2))}}) for n in ("a", "b")}
    S = AdapterSet(ads, ["a"])
    T = S.with_active(["b", "a"])
    assert T.active == ("b", "a") and S.active == ("a",) and S.disabled().active == ()
    assert all(T[n] is S[n] and S.disabled()[n] is S[n] for n in S.names)
    for bad, match in ((["c"], r"active\[0\] = 'c' is not an adapter here"), (["a", "a"], "names an adapter twice"),
                       ([BASE], r"active\[0\] = '__base__'")):
        with pytest.raises(ValueError, match=match):
            AdapterSet(ads, bad)
        with pytest.raises(ValueError, match=match):
            S.with_active(bad)
    with pytest.raises(TypeError, match="active must be a list of adapter names"):
        S.with_active("a")
