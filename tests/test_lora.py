"""Properties of lora_ref.lora: the paper's math, checked on random cases in float64 and float32.

Every tolerance is ``tolerance(dtype, n) * M`` (``gamma_n`` times a magnitude), where ``n`` counts
the roundings chained in one output entry and ``M`` is the same computation evaluated on
absolute values; the count is derived beside each test. Comparing two computations that are each
within ``gamma_n M`` of the exact value gives ``2 gamma_n M`` (see lora_ref.testing and
docs/math.md). Exact properties (zero-init identity, zero gradient of A) are checked exactly.
"""

from __future__ import annotations

import math
import re

import autograd
import numpy as np
import pytest
import scipy.linalg
from autograd.test_util import check_grads
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_ref import (
    LoraConfig,
    delta_weight,
    dropout_mask,
    init_lora,
    lora_linear,
    lora_parameter_count,
    lora_scale,
    merge,
    pissa_init,
    to_numpy,
    unmerge,
)
from lora_ref.strategies import lora_cases
from lora_ref.testing import assert_within, lora_linear_magnitude, tolerance

# ----------------------------------------------------------------------------------------------
# Helpers: magnitudes and rounding counts
# ----------------------------------------------------------------------------------------------


def f64(a):
    return np.asarray(to_numpy(a), dtype=np.float64)


def abs_delta(case):
    """|s| |B_k| |A_k| in each enabled block (zeros elsewhere), float64, (d_out, d_in): the magnitude
    of s B A, and of its fused (enable_lora) form."""
    return f64(delta_weight(np.abs(f64(case.A)), np.abs(f64(case.B)), abs(case.scale), case.enable_lora))


def magnitude(case, *, with_mask=True):
    """M = |x| |W|^T + |bias| + |s| |x * mask| (|B| |A|)^T in float64, shape (*batch, d_out): the
    LoRA layer evaluated on absolute values, merged or not."""
    mask = case.mask if with_mask else None
    if case.enable_lora is None:
        return lora_linear_magnitude(case.x, case.W, case.A, case.B, case.scale, case.bias, mask)
    xd = np.abs(f64(case.x)) if mask is None else np.abs(f64(case.x) * f64(mask))
    return lora_linear_magnitude(case.x, case.W, bias=case.bias) + xd @ abs_delta(case).T


def forward_roundings(case, *, with_mask=True):
    """Roundings chained in one output entry of lora_linear (and of x @ merge(W).T):
    adapter term: d_in (x A^T) + r (then B^T) + 1 (s rounded to the dtype) + 1 (times s) + 1 (added
    to x W^T), + 1 if x is multiplied by a mask, + 1 if a bias is added. The merged path has the
    same count: r (B A) + 2 (s, times s) + 1 (W +) + d_in (x W'^T) [+ 1 bias]. The base term
    x W^T (d_in roundings) is shorter, and gamma_n grows with n, so gamma_n M bounds both."""
    mask = with_mask and case.mask is not None
    return case.d_in + case.r + 3 + int(mask) + int(case.bias is not None)


def upstream(case, shape, seed_offset=0):
    """A random upstream gradient G = dL/dy of ``shape`` in the case's dtype (bounded like x)."""
    rng = np.random.default_rng(case.seed + 1 + seed_offset)
    return rng.uniform(-1.0, 1.0, size=shape).astype(case.dtype)


# ----------------------------------------------------------------------------------------------
# Merge equivalence (Section 4.1: no inference latency)
# ----------------------------------------------------------------------------------------------


@given(lora_cases(dropout=False, enable_lora=None))
def test_merge_equivalence(case):
    # lora_linear and x @ merge(W).T compute the same exact value; each is within gamma_n M of it
    # (n = forward_roundings), so they differ by at most 2 gamma_n M.
    y = lora_linear(*case.args(), bias=case.bias, enable_lora=case.enable_lora)
    W_merged = merge(case.W_stored, case.A, case.B, case.scale, enable_lora=case.enable_lora,
                     fan_in_fan_out=case.fan_in_fan_out)
    assert W_merged.shape == case.W_stored.shape and W_merged.dtype == case.W.dtype
    W_eff = W_merged if case.fan_in_fan_out else W_merged.T               # (d_in, d_out)
    y_merged = case.x @ W_eff if case.bias is None else case.x @ W_eff + case.bias
    assert y.dtype == np.dtype(case.dtype) and y.shape == case.batch_shape + (case.d_out,)
    bound = 2 * tolerance(case.dtype, forward_roundings(case)) * magnitude(case)
    assert_within(y, y_merged, bound, what="lora_linear vs merged weight")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_merge_equivalence_catches_a_forgotten_transpose(dtype):
    # The bound is tight enough to see the classic bug: the delta added untransposed to a square
    # fan_in_fan_out weight. The wrong output differs from the right one by x (dW - dW^T)^T,
    # about 0.1 of M here, while the bound is 2 gamma_n M (1e-14 of M in float64, 1e-5 in float32).
    rng = np.random.default_rng(5)
    d, r, s = 16, 4, 2.0
    x, W = rng.uniform(-1, 1, (3, d)).astype(dtype), rng.uniform(-1, 1, (d, d)).astype(dtype)  # W stored (d_in, d_out)
    A, B = (a.astype(dtype) for a in (rng.uniform(-1, 1, (r, d)), rng.uniform(-1, 1, (d, r))))
    y = lora_linear(x, np.ascontiguousarray(W.T), A, B, s)
    bound = 2 * tolerance(dtype, d + r + 3) * lora_linear_magnitude(x, W.T, A, B, s)
    assert_within(y, x @ merge(W, A, B, s, fan_in_fan_out=True), bound)      # right
    wrong = W + s * (B @ A)                                                  # forgot the transpose
    with pytest.raises(AssertionError, match="exceeds its bound"):
        assert_within(y, x @ wrong, bound)


# ----------------------------------------------------------------------------------------------
# Zero init: the adapted layer starts as the base layer
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
@given(data=st.data())
def test_zero_init_is_identity_bitwise(init, data):
    case = data.draw(lora_cases(init=init, enable_lora=None))
    assert not np.any(case.B)                                            # B = 0 (Section 4.1)
    y = lora_linear(*case.args(), **case.kwargs())
    base = case.x @ case.W.T if case.bias is None else case.x @ case.W.T + case.bias
    # B = 0 makes (x A^T) B^T exactly zero, times s still zero, and y + 0 == y exactly.
    # (array_equal compares values, so a -0.0 base entry equals the +0.0 it becomes.)
    assert np.array_equal(y, base)
    assert y.dtype == base.dtype


@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
@given(data=st.data())
def test_zero_init_gradients(init, data):
    case = data.draw(lora_cases(init=init, enable_lora=None))
    G = upstream(case, case.batch_shape + (case.d_out,))                 # dL/dy
    f = lambda A, B: lora_linear(case.x, case.W, A, B, case.scale, **case.kwargs())  # noqa: E731
    vjp, _ = autograd.make_vjp(f, argnum=(0, 1))(case.A, case.B)
    dA, dB = vjp(G)
    # dL/dA = s (G B) ... with B = 0 every term is a product with zero: exactly zero.
    assert dA.shape == case.A.shape and not np.any(dA)
    # dL/dB_k = s G_k^T (Xd A_k^T) in closed form, block by block (Xd = x * mask, flattened).
    X = case.x.reshape(-1, case.d_in)                                    # (N, d_in)
    Xd = X if case.mask is None else (case.x * case.mask).reshape(-1, case.d_in)
    Gf = G.reshape(-1, case.d_out)                                       # (N, d_out)
    Xd_abs = np.abs(f64(X)) if case.mask is None else np.abs(f64(case.x) * f64(case.mask)).reshape(-1, case.d_in)
    flags = case.enable_lora or (True,)
    q, r = case.d_out // len(flags), case.r
    expected, mag, k = [], [], 0
    for g, on in enumerate(flags):
        if not on:
            continue
        Gk, Ak = Gf[:, g * q:(g + 1) * q], case.A[k * r:(k + 1) * r, :]
        expected.append(Gk.T @ (Xd @ Ak.T) * case.scale)                 # (q, r)
        mag.append(np.abs(f64(Gk)).T @ (Xd_abs @ np.abs(f64(Ak)).T) * abs(case.scale))
        k += 1
    expected, mag = np.concatenate(expected, axis=0), np.concatenate(mag, axis=0)
    # Roundings: d_in (Xd A^T) + N (G^T H) + 2 (s rounded, times s) + 1 if masked; twice for two
    # computations of the same sum.
    N = X.shape[0]
    n = case.d_in + N + 2 + int(case.mask is not None)
    assert_within(dB, expected, 2 * tolerance(case.dtype, n) * mag, what="dL/dB at init")


# ----------------------------------------------------------------------------------------------
# Rank and parameter count
# ----------------------------------------------------------------------------------------------


@given(lora_cases(dropout=False, bias=False, rank_beyond=8))
def test_delta_rank_at_most_r(case):
    dW = f64(delta_weight(case.A, case.B, case.scale, case.enable_lora))  # (d_out, d_in)
    sv = scipy.linalg.svdvals(dW)
    # Rank tolerance. The computed dW = exact + E, |E| <= gamma_{r+2} |s||B||A| entrywise (r products
    # summed, s rounded, times s), so by Weyl sigma_{k}(dW) <= ||E||_2 <= ||E||_F for every k
    # beyond the exact rank. SciPy's SVD (float64) adds a backward error p(m, n) u ||dW||_2 with
    # p a "modest function" (Golub & Van Loan 8.6); we take p = m n, i.e. gamma_{m n}(float64).
    E = tolerance(case.dtype, case.r + 2) * np.linalg.norm(abs_delta(case))
    tol = E + tolerance("float64", dW.size) * (sv[0] if sv.size else 0.0)
    rank = int(np.sum(sv > tol))
    n_blocks = 1 if case.enable_lora is None else sum(case.enable_lora)
    # A fused adapter has n blocks of rank <= r, stacked in disjoint rows: rank <= n r.
    assert rank <= min(n_blocks * case.r, case.d_in, case.d_out)
    # And the bound is not vacuous: a random rank-r product has rank min(r, d_in, d_out) in each
    # block, so the top singular value is well above tol.
    assert sv[0] > tol


@given(lora_cases(dropout=False))
def test_parameter_count(case):
    n_blocks = 1 if case.enable_lora is None else sum(case.enable_lora)
    q = case.d_out // (1 if case.enable_lora is None else len(case.enable_lora))
    # Each enabled block is an (q, d_in) adapter of rank r: r (d_in + q) parameters.
    assert case.A.size + case.B.size == n_blocks * lora_parameter_count(case.d_in, q, case.r)
    assert lora_parameter_count(case.d_in, case.d_out, case.r) == case.r * (case.d_in + case.d_out)


def test_parameter_count_section_5_1():
    # Section 5.1: |Theta| = 2 L_LoRA d_model r. Table 5 compares adapter choices at one
    # "18M" budget on GPT-3 175B (d_model 12288, 96 layers): W_q at r=8 (96 matrices), W_q and
    # W_v at r=4 (192), all four at r=2 (384). The formula gives the same count for all three.
    d, layers = 12288, 96
    budgets = {(1, 8), (2, 4), (4, 2)}
    counts = {n_kinds * layers * lora_parameter_count(d, d, r) for n_kinds, r in budgets}
    assert counts == {2 * (96 * 1) * d * 8}
    assert round(counts.pop() / 1e6, 1) == 18.9  # the paper's "18M"


# ----------------------------------------------------------------------------------------------
# Merge / unmerge round trip
# ----------------------------------------------------------------------------------------------


def _round_trip_bound(case, cycles):
    """Bound on |W_k - W| after k merge/unmerge cycles (derived in docs/math.md):
    one cycle: merged = (W + D)(1 + d1), unmerged = (merged - D)(1 + d2) with D the computed delta
    (identical in both calls), so unmerged - W = (W + D) d1 (1 + d2) + W d2, at most
    gamma_2 (|W| + |D|) = b. Over k cycles e_{j+1} <= (1 + gamma_2) e_j + b, so
    e_k <= k b (1 + gamma_2)^(k-1) <= k b (1 + gamma_{2(k-1)})."""
    D = np.abs(f64(delta_weight(case.A, case.B, case.scale, case.enable_lora)))
    D = D.T if case.fan_in_fan_out else D
    b = tolerance(case.dtype, 2) * (np.abs(f64(case.W_stored)) + D)
    return cycles * b * (1.0 + tolerance(case.dtype, 2 * (cycles - 1)))


@given(lora_cases(dropout=False))
def test_unmerge_merge_round_trip(case):
    kw = {"enable_lora": case.enable_lora, "fan_in_fan_out": case.fan_in_fan_out}
    W = unmerge(merge(case.W_stored, case.A, case.B, case.scale, **kw), case.A, case.B, case.scale, **kw)
    assert W.shape == case.W_stored.shape and W.dtype == case.W_stored.dtype
    assert_within(W, case.W_stored, _round_trip_bound(case, 1), what="unmerge(merge(W))")


@settings(max_examples=10)
@given(lora_cases(dropout=False, max_dim=32))
def test_fifty_merge_unmerge_cycles(case):
    kw = {"enable_lora": case.enable_lora, "fan_in_fan_out": case.fan_in_fan_out}
    W = case.W_stored
    for _ in range(50):
        W = unmerge(merge(W, case.A, case.B, case.scale, **kw), case.A, case.B, case.scale, **kw)
    assert_within(W, case.W_stored, _round_trip_bound(case, 50), what="50 merge/unmerge cycles")


def test_merge_fan_in_fan_out_transposes_the_delta():
    rng = np.random.default_rng(0)
    W, A, B = rng.normal(size=(5, 3)), rng.normal(size=(2, 5)), rng.normal(size=(3, 2))  # W stored (d_in, d_out)
    merged = merge(W, A, B, 0.5, fan_in_fan_out=True)
    # Each entry is one addition of W and the matching entry of (s B A)^T: within gamma_{r+3}.
    bound = tolerance("float64", 2 + 3) * (np.abs(W) + 0.5 * (np.abs(B) @ np.abs(A)).T)
    assert_within(merged, W + 0.5 * (B @ A).T, bound)


def test_merge_refuses_non_finite():
    W, A, B = np.ones((2, 2)), np.full((1, 2), np.inf), np.ones((2, 1))
    with pytest.raises(ValueError, match=r"non-finite entries: A 2, B 0, W 0"):
        merge(W, A, B, 1.0)


@pytest.mark.parametrize("bad", ["A", "B", "W"])
@pytest.mark.parametrize("value", [np.inf, np.nan])
def test_unmerge_refuses_non_finite_like_merge(bad, value):
    # Issue 11, item 4: unmerge used to return NaN weights for the input merge refuses.
    arrays = {"W": np.ones((2, 2)), "A": np.ones((1, 2)), "B": np.ones((2, 1))}
    arrays[bad] = arrays[bad].copy()
    arrays[bad][0, 0] = value
    counts = ", ".join(f"{n} {int(n == bad)}" for n in ("A", "B", "W"))
    for fn, verb in ((merge, "merge"), (unmerge, "unmerge")):
        with pytest.raises(ValueError, match=rf"^{verb}: .*non-finite entries: {counts}; .*refusing to {verb}$"):
            fn(arrays["W"], arrays["A"], arrays["B"], 1.0)


# ----------------------------------------------------------------------------------------------
# Scaling and configuration
# ----------------------------------------------------------------------------------------------


@given(st.floats(-64, 64, allow_nan=False), st.integers(1, 512))
def test_scale_alpha_over_r_and_rslora(alpha, r):
    assert lora_scale(alpha, r) == alpha / r                     # LoRA, Section 4.1
    assert lora_scale(alpha, r, use_rslora=True) == alpha / math.sqrt(r)  # rsLoRA
    assert type(lora_scale(alpha, r)) is float                   # a Python float: no dtype promotion
    config = LoraConfig(r=r, alpha=alpha, use_rslora=False)
    assert config.scale == alpha / r
    assert LoraConfig(r=r, alpha=alpha, use_rslora=True).scale == alpha / math.sqrt(r)


def test_scale_keeps_float32():
    x = np.ones((2, 3), np.float32)
    W, A, B = np.ones((4, 3), np.float32), np.ones((2, 3), np.float32), np.ones((4, 2), np.float32)
    assert lora_linear(x, W, A, B, lora_scale(16, 8)).dtype == np.float32


def test_rank_and_alpha_patterns():
    config = LoraConfig(r=8, alpha=16,
                        rank_pattern={"h\\.[0-2]\\.attn\\.c_attn": 2, "c_attn": 4, "attn.c_attn": 6},
                        alpha_pattern={"mlp.c_fc": 32, "c_fc": 1})
    # Expected ranks from PEFT's rule (first key k in order with re.match(rf"(.*\.)?({k})$", name)):
    assert config.rank_for("transformer.h.1.attn.c_attn") == 2     # the regex key, listed first
    assert config.rank_for("transformer.h.7.attn.c_attn") == 4     # "c_attn" and "attn.c_attn" both match: first wins
    assert config.rank_for("transformer.h.7.attn.c_proj") == 8     # no key: r
    assert config.rank_for("transformer.h.7.attn.xc_attn") == 8    # "c_attn" must follow a dot or start the name
    assert config.alpha_for("transformer.h.0.mlp.c_fc") == 32.0    # both alpha keys match: first wins
    assert config.alpha_for("transformer.h.0.attn.c_attn") == 16.0
    assert config.scale_for("transformer.h.1.attn.c_attn") == 16.0 / 2
    assert config.scale_for("transformer.h.1.mlp.c_fc") == 32.0 / 8
    rs = LoraConfig(r=8, alpha=16, use_rslora=True, rank_pattern={"c_attn": 4})
    assert rs.scale_for("h.0.attn.c_attn") == 16.0 / math.sqrt(4)
    assert rs.scale_for("h.0.mlp.c_fc") == 16.0 / math.sqrt(8)


def test_enable_for():
    config = LoraConfig(r=4, alpha=8, enable_lora={"c_attn": (True, False, True)})
    assert config.enable_for("transformer.h.3.attn.c_attn") == (True, False, True)
    assert config.enable_for("transformer.h.3.attn.c_proj") is None
    assert LoraConfig(r=4, alpha=8).enable_for("c_attn") is None


# Module names, and which of them PEFT 0.21.2's check_target_module_exists selects (verified by
# running it on these names with the same settings; the rule is quoted in LoraConfig.targets).
NAMES = ["transformer.h.1.attn.c_attn", "transformer.h.0.attn.c_attn", "transformer.h.5.attn.c_attn",
         "h.1.attn.c_attn", "c_attn", "transformer.h.1.attn.c_proj", "transformer.h.1.attn.xc_attn"]


@pytest.mark.parametrize("kwargs, selected", [
    ({"target_modules": ["c_attn"]}, {0, 1, 2, 3, 4}),
    ({"target_modules": ["c_attn", "c_proj"]}, {0, 1, 2, 3, 4, 5}),
    ({"target_modules": r"transformer\.h\.[01]\.attn\.c_.*"}, {0, 1, 5}),
    ({"target_modules": ["c_attn"], "layers_to_transform": [1]}, {0, 4}),  # "h.1..." has no dot before "h"; "c_attn" is named exactly
    ({"target_modules": ["c_attn"], "layers_to_transform": 1, "layers_pattern": "h"}, {0, 3, 4}),
    ({"target_modules": ["c_attn", "transformer.h.5.attn.c_attn"], "layers_to_transform": [0]}, {1, 2, 4}),  # named exactly
    ({}, set()),
])
def test_targets(kwargs, selected):
    config = LoraConfig(r=2, alpha=4, **kwargs)
    assert {i for i, name in enumerate(NAMES) if config.targets(name)} == selected


@pytest.mark.parametrize("pattern, name, index", [
    (None, "transformer.h.3.attn.c_attn", 3),
    (None, "base_model.model.transformer.h.11.mlp.c_fc", 11),
    (None, "h.3.attn.c_attn", None),                           # PEFT needs a dot before <name>.<digits>.
    (None, "model.layers.3.experts.7.w1", 3),                  # the first index, not the expert's
    ("h", "h.3.attn.c_attn", 3),
    (["blocks", "h"], "a.h.4.blocks.2.attn", 2),               # the first pattern that matches wins
    ("layers", "transformer.h.3.attn.c_attn", None),
    # Issue 11, item 14: a regular expression, as in PEFT (which inserts it unescaped).
    ("[h]", "transformer.h.3.attn.c_attn", 3),
    ("(?:layers|h)", "transformer.h.5.attn.c_attn", 5),
    ("layers|h", "transformer.h.5.attn.c_attn", None),        # unescaped, "|" splits PEFT's whole regex
    ("layers|h", "h.5.attn.c_attn", 5),
    ("layers|h", "model.layers.5.self_attn.q_proj", None),    # matches "model.layers" without an index
    (r"\w", "model.x.2.y", 2),
    (".", "transformer.h.3.attn.c_attn", 3),                  # "." matches "h", as PEFT reads it
])
def test_layer_index(pattern, name, index):
    # layers_pattern needs layers_to_transform (PEFT's rule); which layers does not matter here.
    layers = None if pattern is None else [0]
    assert LoraConfig(r=1, alpha=1, layers_pattern=pattern, layers_to_transform=layers).layer_index(name) == index


@pytest.mark.parametrize("kwargs, error, match", [
    ({"r": 0}, ValueError, r"r must be a positive int, got 0"),
    ({"r": 2.0}, TypeError, r"r must be a positive int, got 2\.0 \(float\)"),
    ({"r": True}, TypeError, r"r must be a positive int, got True"),
    ({"alpha": float("nan")}, ValueError, r"alpha must be finite, got nan"),
    ({"alpha": float("inf")}, ValueError, r"alpha must be finite, got inf"),
    ({"alpha": "16"}, TypeError, r"alpha must be a real number, got '16' \(str\)"),
    ({"dropout": 1.0}, ValueError, r"dropout must be in \[0, 1\), got 1\.0"),
    ({"dropout": -0.1}, ValueError, r"dropout must be in \[0, 1\), got -0\.1"),
    ({"dropout": float("nan")}, ValueError, r"dropout must be finite, got nan"),
    ({"use_rslora": "yes"}, TypeError, r"use_rslora must be a bool, got 'yes'"),
    ({"fan_in_fan_out": 1}, TypeError, r"fan_in_fan_out must be a bool, got 1"),
    ({"init": "pissa"}, ValueError, r"init must be one of kaiming, gaussian, random, got 'pissa'"),
    ({"target_modules": 3}, TypeError, r"target_modules must be a list of names, a regex string, or None, got 3"),
    ({"target_modules": []}, ValueError, r"target_modules must be non-empty module names, got \[\]"),
    ({"target_modules": "(("}, ValueError, r"target_modules regex '\(\(' is not a valid regular expression"),
    ({"rank_pattern": {"q": 0}}, ValueError, r"rank_pattern\['q'\] must be a positive int, got 0"),
    ({"rank_pattern": ["q"]}, TypeError, r"rank_pattern must be a mapping of module-name pattern to value, got list"),
    ({"rank_pattern": {"((": 2}}, ValueError, r"rank_pattern key '\(\(' is not a valid regular expression"),
    ({"alpha_pattern": {"q": float("inf")}}, ValueError, r"alpha_pattern\['q'\] must be finite, got inf"),
    ({"enable_lora": {"c_attn": (False, False)}}, ValueError, r"enable_lora\['c_attn'\] enables no block"),
    ({"enable_lora": {"c_attn": (1, 0)}}, TypeError, r"enable_lora\['c_attn'\] must contain booleans only, got \(1, 0\)"),
    ({"enable_lora": {"c_attn": "TFT"}}, TypeError, r"enable_lora\['c_attn'\] must be a non-empty sequence of booleans"),
    ({"layers_to_transform": [-1]}, ValueError, r"layers_to_transform must be non-negative layer indices, got \[-1\]"),
    ({"layers_pattern": [""]}, ValueError, r"layers_pattern must be a name or list of names, got \[''\]"),
])
def test_config_validation(kwargs, error, match):
    with pytest.raises(error, match=match):
        LoraConfig(**{"r": 8, "alpha": 16, **kwargs})


def test_config_is_immutable_and_normalised():
    config = LoraConfig(r=4, alpha=8, target_modules={"c_proj", "c_attn"}, layers_to_transform=2,
                        layers_pattern="h", rank_pattern={"c_attn": 2})
    assert config.target_modules == ("c_attn", "c_proj")
    assert config.layers_to_transform == (2,) and config.layers_pattern == ("h",)
    assert isinstance(config.alpha, float) and config.alpha == 8.0
    with pytest.raises(Exception, match="cannot assign"):
        config.r = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.rank_pattern["c_proj"] = 2  # type: ignore[index]


# ----------------------------------------------------------------------------------------------
# Gradients: hand-written VJPs == autograd.numpy tracing the forward == finite differences
# ----------------------------------------------------------------------------------------------

VARIANTS = {"plain": {"enable_lora": False, "dropout": False},
            "enable_lora": {"enable_lora": True, "dropout": False},
            "dropout": {"enable_lora": False, "dropout": True}}


def _vjps(fun, case, G, absolute=False):
    """The VJPs of fun(x, W, A, B, bias) at the case, for upstream G; with ``absolute`` every input
    (and s, the mask, G) is replaced by its absolute value in float64, which evaluates the same
    formulas' magnitudes (each gradient is a sum of products, so no cancellation is possible)."""
    t = (lambda a: np.abs(f64(a))) if absolute else (lambda a: a)
    scale = abs(case.scale) if absolute else case.scale
    mask = None if case.mask is None else t(case.mask)
    f = lambda x, W, A, B, b: fun(x, W, A, B, scale, b, mask, case.enable_lora)  # noqa: E731
    vjp, y = autograd.make_vjp(f, argnum=(0, 1, 2, 3, 4))(t(case.x), t(case.W), t(case.A), t(case.B), t(case.bias))
    return vjp(t(G)), y


@pytest.mark.parametrize("variant", list(VARIANTS))
@given(data=st.data())
def test_vjps_match_autograd_numpy_trace(variant, data):
    case = data.draw(lora_cases(bias=True, max_dim=32, **VARIANTS[variant]))
    G = upstream(case, case.batch_shape + (case.d_out,))
    hand, y_hand = _vjps(lora_linear, case, G)            # the primitive: hand-written VJPs
    traced, y_traced = _vjps(lora_linear.fun, case, G)    # autograd.numpy tracing the same forward
    mags, _ = _vjps(lora_linear, case, G, absolute=True)
    assert np.array_equal(y_hand, y_traced)               # same forward code, same arithmetic
    # Longest rounding chain in any gradient entry: dL/dx = G W (d_out) + s ((G_k B_k) A) * mask:
    # q + n r + 4 (s rounded, times s, times mask, sum); dL/dA: q + N + 3; dL/dB: d_in + N + 3;
    # dL/dW and dL/dbias: N. All are at most L = N + d_in + d_out + n r + 4.
    N = int(np.prod(case.batch_shape, dtype=np.int64))
    L = N + case.d_in + case.d_out + case.A.shape[0] + 4
    for name, h, t, m, like in zip("x W A B bias".split(), hand, traced, mags,
                                   (case.x, case.W, case.A, case.B, case.bias)):
        assert h.shape == like.shape and h.dtype == like.dtype, name
        assert_within(h, t, 2 * tolerance(case.dtype, L) * m, what=f"dL/d{name}")


@pytest.mark.parametrize("variant", list(VARIANTS))
@settings(max_examples=15)
@given(data=st.data())
def test_vjps_match_finite_differences(variant, data):
    # autograd's check_grads (float64 only): <v, J^T g> against a central difference along a
    # random direction, for the first and the second derivatives (VJPs of the VJPs).
    case = data.draw(lora_cases(dtype="float64", bias=True, max_dim=12, **VARIANTS[variant]))
    np.random.seed(case.seed)  # check_grads draws its directions from NumPy's global generator
    f = lambda x, W, A, B, b: lora_linear(x, W, A, B, case.scale, b, case.mask, case.enable_lora)  # noqa: E731
    check_grads(f, argnum=(0, 1, 2, 3, 4), modes=["rev"], order=2)(case.x, case.W, case.A, case.B, case.bias)


def test_finite_differences_can_fail():
    # A VJP with a wrong scale must be caught by check_grads (guards the test above).
    from autograd.extend import defvjp, primitive

    wrong = primitive(lambda A: lora_linear.fun(np.ones((2, 3)), np.ones((4, 3)), A, np.ones((4, 2)), 0.5))
    defvjp(wrong, lambda ans, A: lambda g: (np.ones((4, 2)).T @ g.sum(0, keepdims=True).T
                                            @ np.ones((1, 3))) * 2.0)
    with pytest.raises(AssertionError, match="Derivative"):
        check_grads(wrong, modes=["rev"], order=1)(np.ones((2, 3)))


def test_frozen_weight_gets_no_gradient_call(monkeypatch):
    # The compute saving: autograd asks a primitive only for the VJPs of its traced arguments, so
    # training A and B never evaluates dL/dW = G^T X (a d_out x d_in product per step).
    import autograd.core

    asked = []
    make_vjps = autograd.core.primitive_vjps[lora_linear]
    monkeypatch.setitem(autograd.core.primitive_vjps, lora_linear,
                        lambda argnums, *rest: asked.append(tuple(argnums)) or make_vjps(argnums, *rest))
    rng = np.random.default_rng(0)
    x, W = rng.normal(size=(3, 5)), rng.normal(size=(4, 5))
    A, B = init_lora(5, 4, 2, init="random", rng=rng)
    grads = autograd.grad(lambda ad: (lora_linear(x, W, ad["A"], ad["B"], 1.0) ** 2).sum())({"A": A, "B": B})
    assert asked == [(2, 3)] and set(grads) == {"A", "B"}           # argnums 2, 3: A and B only
    autograd.grad(lambda W_: (lora_linear(x, W_, A, B, 1.0) ** 2).sum())(W)
    assert asked[-1] == (1,)                                        # full fine-tuning: W only


def test_scale_and_mask_are_not_differentiable():
    x, W, A, B = np.ones((2, 3)), np.ones((4, 3)), np.ones((2, 3)), np.ones((4, 2))
    with pytest.raises(TypeError, match="not differentiable with respect to scale"):
        autograd.grad(lambda s: lora_linear(x, W, A, B, s).sum())(0.5)
    with pytest.raises(TypeError, match="not differentiable with respect to dropout_mask"):
        autograd.grad(lambda m: lora_linear(x, W, A, B, 0.5, None, m).sum())(np.ones((2, 3)))


# ----------------------------------------------------------------------------------------------
# Initialisation, dropout, PiSSA
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_init_lora_distributions(dtype):
    d_in, d_out, r, seed = 40, 24, 6, 123
    # The expected arrays replay the documented distribution on an identically seeded generator.
    A, B = init_lora(d_in, d_out, r, init="kaiming", rng=np.random.default_rng(seed), dtype=dtype)
    ref = np.random.default_rng(seed)
    assert np.array_equal(A, ref.uniform(-1 / math.sqrt(d_in), 1 / math.sqrt(d_in), (r, d_in)).astype(dtype))
    assert B.shape == (d_out, r) and not np.any(B) and A.dtype == B.dtype == np.dtype(dtype)
    A, B = init_lora(d_in, d_out, r, init="gaussian", rng=np.random.default_rng(seed), dtype=dtype)
    assert np.array_equal(A, np.random.default_rng(seed).normal(0.0, 1.0 / r, (r, d_in)).astype(dtype))
    assert not np.any(B)
    A, B = init_lora(d_in, d_out, r, init="random", rng=np.random.default_rng(seed), dtype=dtype)
    ref = np.random.default_rng(seed)
    ref_A = ref.uniform(-1 / math.sqrt(d_in), 1 / math.sqrt(d_in), (r, d_in))
    assert np.array_equal(B, ref.uniform(-1 / math.sqrt(r), 1 / math.sqrt(r), (d_out, r)).astype(dtype))
    assert np.array_equal(A, ref_A.astype(dtype))


def test_dropout_mask():
    p, shape = 0.25, (64, 64)
    m = to_numpy(dropout_mask(shape, p, np.random.default_rng(0), "float32"))
    assert m.shape == shape and m.dtype == np.float32
    assert set(np.unique(m).tolist()) == {0.0, float(np.float32(1 / (1 - p)))}
    keep = np.random.default_rng(0).random(shape) >= p          # replay the generator
    assert np.array_equal(m != 0, keep)
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\), got 1\.0"):
        dropout_mask(shape, 1.0, np.random.default_rng(0))


@given(lora_cases(dropout=False, enable_lora=False, rank_beyond=0, max_batch_dims=1))
def test_pissa_preserves_output(case):
    A, B, W_res = pissa_init(case.W, case.r, case.scale)
    assert A.shape == (case.r, case.d_in) and B.shape == (case.d_out, case.r) and W_res.dtype == case.W.dtype
    y = lora_linear(case.x, W_res, A, B, case.scale, case.bias)
    y_base = case.x @ case.W.T + (0.0 if case.bias is None else case.bias)
    # W_res = W - s B A is computed with r + 3 roundings per entry (B A, s rounded, times s,
    # minus) relative to |W| + |s||B||A|; the forward adds d_in + r + 3 (+1 bias), the base
    # d_in (+1). So both are within gamma_n (n = d_in + 2 r + 7) of x W^T + bias, magnitude
    # M = |x| (|W| + 2 |s||B||A|)^T + |bias| (|W_res| <= |W| + |s||B||A| up to rounding).
    n = case.d_in + 2 * case.r + 7
    abs_sBA = abs(case.scale) * (np.abs(f64(B)) @ np.abs(f64(A)))
    M = np.abs(f64(case.x)) @ (np.abs(f64(case.W)) + 2 * abs_sBA).T
    if case.bias is not None:
        M = M + np.abs(f64(case.bias))
    assert_within(y, y_base, 2 * tolerance(case.dtype, n) * M, what="PiSSA output at init")


@given(lora_cases(dtype="float64", dropout=False, enable_lora=False, rank_beyond=0))
def test_pissa_is_the_best_rank_r_approximation(case):
    A, B, W_res = pissa_init(case.W, case.r, case.scale)
    sv = scipy.linalg.svdvals(case.W)
    tail = np.sqrt(np.sum(sv[case.r:] ** 2))                   # Eckart-Young: min ||W - rank r||_F
    # ||W_res||_F is tail up to: the SVDs' backward errors (pissa_init's and svdvals here), each
    # at most gamma_{m n}(float64) ||W||_F (p(m, n) = m n, see test_delta_rank_at_most_r), and the
    # rounding of W_res (r + 3 roundings of |W| + |s||B||A|).
    svd_err = 2 * tolerance("float64", case.W.size) * np.linalg.norm(case.W)
    res_err = tolerance("float64", case.r + 3) * np.linalg.norm(np.abs(case.W) + abs(case.scale) * np.abs(B) @ np.abs(A))
    assert abs(np.linalg.norm(W_res) - tail) <= svd_err + res_err
    # The spectral norm too: sigma_1(W_res) = sigma_{r+1}(W) (0 if r = min(d_in, d_out)).
    next_sv = sv[case.r] if case.r < sv.size else 0.0
    assert abs(scipy.linalg.svdvals(W_res)[0] - next_sv) <= svd_err + res_err


def test_pissa_rejects_rank_above_min():
    with pytest.raises(ValueError, match=r"r=5 exceeds min\(d_out, d_in\)=4 for W of shape \(4, 5\)"):
        pissa_init(np.ones((4, 5)), 5, 1.0)


# ----------------------------------------------------------------------------------------------
# Bad input gets a clear error, never a wrong number
# ----------------------------------------------------------------------------------------------

_rng = np.random.default_rng(0)
X, W_, A_, B_ = _rng.normal(size=(3, 5)), _rng.normal(size=(4, 5)), _rng.normal(size=(2, 5)), _rng.normal(size=(4, 2))


@pytest.mark.parametrize("call, error, match", [
    (lambda: lora_linear(X.astype(np.int64), W_, A_, B_, 1.0), TypeError, r"x must have a floating dtype .*got int64"),
    (lambda: lora_linear(X, W_.astype(np.int32), A_, B_, 1.0), TypeError, r"W must have a floating dtype .*got int32"),
    (lambda: lora_linear(X, W_, A_.astype(bool), B_, 1.0), TypeError, r"A must have a floating dtype .*got bool"),
    (lambda: lora_linear([[1.0] * 5], W_, A_, B_, 1.0), TypeError, r"x must be an array, got list"),
    (lambda: lora_linear(X.astype(np.float32), W_, A_, B_, 1.0), TypeError, r"W is float64 but x is float32"),
    (lambda: lora_linear(X, W_, A_, B_.astype(np.float32), 1.0), TypeError, r"B is float32 but A is float64"),
    (lambda: lora_linear(X, W_, A_, B_, 1.0, np.ones(4, np.float32)), TypeError, r"bias is float32 but x is float64"),
    (lambda: lora_linear(X, W_, _rng.normal(size=(2, 6)), B_, 1.0), ValueError,
     r"A has d_in=6 \(shape \(2, 6\)\) but W has d_in=5 \(shape \(4, 5\)\)"),
    (lambda: lora_linear(X, W_, A_, _rng.normal(size=(3, 2)), 1.0), ValueError,
     r"B has d_out=3 \(shape \(3, 2\)\) but W has d_out=4"),
    (lambda: lora_linear(X, W_, _rng.normal(size=(3, 5)), B_, 1.0), ValueError,
     r"A has rank 3 \(shape \(3, 5\)\) but B has rank 2 \(shape \(4, 2\)\)"),
    (lambda: lora_linear(_rng.normal(size=(3, 6)), W_, A_, B_, 1.0), ValueError,
     r"x has d_in=6 \(shape \(3, 6\)\) but W has d_in=5"),
    (lambda: lora_linear(X, W_, A_, None, 1.0), ValueError, r"A and B must both be given or both be None"),
    (lambda: lora_linear(X, W_, A_, B_, float("nan")), ValueError, r"scale must be finite, got nan"),
    (lambda: lora_linear(X, W_, A_, B_, "2"), TypeError, r"scale must be a real number, got '2' \(str\)"),
    (lambda: lora_linear(X, W_, A_, B_, 1.0, np.ones(3)), ValueError, r"bias must have shape \(4,\) to match W \(4, 5\), got \(3,\)"),
    (lambda: lora_linear(X, W_, A_, B_, 1.0, None, np.ones((2, 5))), ValueError,
     r"dropout_mask of shape \(2, 5\) does not broadcast to x's shape \(3, 5\)"),
    (lambda: lora_linear(X, W_, A_, B_, 1.0, None, np.ones((2, 3, 5))), ValueError,
     r"dropout_mask of shape \(2, 3, 5\) does not broadcast to x's shape \(3, 5\)"),
    (lambda: lora_linear(X, np.ones((6, 5)), A_, np.ones((3, 2)), 1.0, enable_lora=(True, False, False)), ValueError,
     r"enable_lora=\(True, False, False\) on W \(6, 5\) needs A \(2, 5\) and B \(2, 2\); got A \(2, 5\), B \(3, 2\)"),
    (lambda: lora_linear(X, W_, A_, B_, 1.0, enable_lora=(True, True, False)), ValueError,
     r"enable_lora has 3 blocks but W's d_out=4 is not divisible by 3"),
    (lambda: merge(W_, _rng.normal(size=(2, 6)), B_, 1.0), ValueError, r"A has d_in=6 but W has d_in=5"),
    (lambda: merge(W_, A_, _rng.normal(size=(3, 2)), 1.0), ValueError, r"B has d_out=3 but W has d_out=4"),
    (lambda: merge(W_, _rng.normal(size=(3, 5)), B_, 1.0), ValueError, r"A has rank 3 \(shape \(3, 5\)\) but B has rank 2"),
    (lambda: merge(W_.astype(np.float32), A_, B_, 1.0), TypeError, r"A is float64 but W is float32"),
    (lambda: merge(W_, A_, B_, 1.0, fan_in_fan_out=True), ValueError,
     r"A has d_in=5 but W \(W stored \(d_in, d_out\): fan_in_fan_out=True\) has d_in=4"),
    (lambda: unmerge(W_.astype(np.float16), A_, B_, 1.0), TypeError, r"A is float64 but W is float16"),
    (lambda: delta_weight(A_.astype(np.int64), B_, 1.0), TypeError, r"A must have a floating dtype .*got int64"),
    (lambda: init_lora(4, 4, 0, rng=_rng), ValueError, r"r must be a positive int, got 0"),
    (lambda: init_lora(4, 4, 2.5, rng=_rng), TypeError, r"r must be a positive int, got 2\.5 \(float\)"),
    (lambda: init_lora(4, 4, 2, rng=0), TypeError, r"rng must be a numpy.random.Generator, got int"),
    (lambda: init_lora(4, 4, 2, rng=_rng, dtype="int32"), TypeError, r"dtype must be float32 or float64, got int32"),
    (lambda: init_lora(4, 4, 2, rng=_rng, init="zeros"), ValueError, r"init must be one of kaiming, gaussian, random, got 'zeros'"),
    (lambda: lora_scale(float("inf"), 4), ValueError, r"alpha must be finite, got inf"),
    (lambda: lora_scale(8, -1), ValueError, r"r must be a positive int, got -1"),
    (lambda: lora_parameter_count(4, 0, 2), ValueError, r"d_out must be a positive int, got 0"),
])
def test_bad_input_raises_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_pissa_names_a_non_finite_weight():
    # Issue 11, item 14: SciPy's SVD used to say only "array must not contain infs or NaNs".
    W = np.ones((4, 5))
    W[1, 2], W[3, 3] = np.inf, np.nan
    with pytest.raises(ValueError, match=r"^W has 2 non-finite value\(s\) \(inf or nan\); pissa_init"):
        pissa_init(W, 2, 1.0)


@pytest.mark.parametrize("value", [2.5, "2", {"a": 1}, None.__class__])
def test_layers_to_transform_of_the_wrong_kind_gets_a_sentence(value):
    # Issue 11, item 14: 2.5 used to raise "'float' object is not iterable".
    with pytest.raises(TypeError, match=r"^layers_to_transform must be a layer index \(an int\) or a list of layer "
                                        rf"indices, got {re.escape(repr(value))} \({type(value).__name__}\)$"):
        LoraConfig(r=2, alpha=4, target_modules=["c_attn"], layers_to_transform=value)


# Issue 11, item 7: regular expressions whose backtracking explodes are refused, not matched.
CATASTROPHIC = ["(.*.*)*q", "(a+)+$", r"(\w?)*x", "(a|ab)*c", "(x+x+)+y", "(.{1,30}){1,30}z"]


@pytest.mark.parametrize("pattern", CATASTROPHIC)
@pytest.mark.parametrize("where", ["target_modules", "rank_pattern", "alpha_pattern", "enable_lora", "layers_pattern"])
def test_catastrophic_regexes_are_refused_before_any_matching(pattern, where):
    kwargs = {"target_modules": ["c_attn"]}
    if where == "target_modules":
        kwargs["target_modules"] = pattern
    elif where == "layers_pattern":
        kwargs.update(layers_pattern=pattern, layers_to_transform=[0])
    else:
        kwargs[where] = {pattern: {"rank_pattern": 2, "alpha_pattern": 2.0, "enable_lora": (True, False)}[where]}
    with pytest.raises(ValueError, match=r"inside a repetition .*exponential time .*catastrophic backtracking"):
        LoraConfig(r=2, alpha=4, **kwargs)


def test_the_refusal_is_what_stops_the_hang():
    # What the refusal prevents, kept small: on 8 characters the match fails quickly, but its time
    # grows exponentially with the name's length.
    from lora_ref.config import check_regex

    assert re.fullmatch("(.*.*)*q", "a" * 8) is None
    with pytest.raises(ValueError, match=r"'\(\.\*\.\*\)\*q' has a repetition inside a repetition \(\*\)"):
        check_regex("(.*.*)*q", "target_modules regex")


def test_too_many_repetitions_are_refused_and_ordinary_patterns_pass():
    from lora_ref.config import MAX_REPETITIONS, check_regex

    with pytest.raises(ValueError, match=rf"has 4 repetitions .*at most {MAX_REPETITIONS}"):
        check_regex(".*.*.*.*q", "target_modules regex")
    for ok in (r".*\.(q_proj|v_proj)", r"model\.layers\.\d+\.self_attn\.(q|k|v)_proj", "(?:q|k|v)*_proj",
               r"^(?!.*vision).*(q_proj|v_proj)", r"h\.[0-3]\.attn\.c_attn", "c_attn", "layers|h", "[h]"):
        assert check_regex(ok, "x") == ok
    with pytest.raises(ValueError, match="is not a valid regular expression"):
        check_regex("(unclosed", "rank_pattern key")
    with pytest.raises(TypeError, match="must be a string"):
        check_regex(3, "layers_pattern")


def test_rank_above_min_is_legal():
    # As in PEFT: r = 7 > min(5, 4) works (and is wasteful: B A still has rank <= 4).
    rng = np.random.default_rng(0)
    A, B = init_lora(5, 4, 7, init="random", rng=rng)
    W = rng.normal(size=(4, 5))
    assert lora_linear(rng.normal(size=(3, 5)), W, A, B, 1.0).shape == (3, 4)
    dW = delta_weight(A, B, 1.0)
    assert np.linalg.matrix_rank(dW) == 4


@pytest.mark.parametrize("kwargs, message", [
    ({"target_modules": r".*c_attn", "layers_to_transform": [0]}, "cannot be used when target_modules is a regex"),
    ({"target_modules": r".*c_attn", "layers_to_transform": [0], "layers_pattern": "h"}, "cannot be used when target_modules is a regex"),
    ({"target_modules": ["c_attn"], "layers_pattern": "h"}, "needs layers_to_transform"),
])
def test_layer_settings_peft_refuses(kwargs, message):
    # PEFT 0.21.2's LoraConfig.__post_init__ raises ValueError for these combinations; so do we.
    with pytest.raises(ValueError, match=message):
        LoraConfig(r=2, alpha=4, **kwargs)


def test_use_dora_is_a_validated_flag_refused_with_enable_lora():
    import lora_ref as lr

    assert lr.LoraConfig(r=2, alpha=4.0).use_dora is False
    assert lr.LoraConfig(r=2, alpha=4.0, use_dora=True).use_dora is True
    with pytest.raises(TypeError, match="use_dora must be a bool"):
        lr.LoraConfig(r=2, alpha=4.0, use_dora=1)
    with pytest.raises(ValueError, match="use_dora=True cannot be combined with enable_lora"):
        lr.LoraConfig(r=2, alpha=4.0, use_dora=True, enable_lora={"c_attn": (True, False, True)})


# --------------------------------------------------------------------------------------------
# bfloat16 merges (ml_dtypes): the dtype of a 4-bit QLoRA base's compute weights
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("enable_lora", [None, (True, False, True)])
def test_merge_and_unmerge_accept_bfloat16(fan_in_fan_out, enable_lora):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    from lora_ref import delta_weight, merge, unmerge

    bf16, rng = ml_dtypes.bfloat16, np.random.default_rng(7)
    d_out, d_in, r, s = 18, 12, 4, 0.75
    n = 1 if enable_lora is None else sum(enable_lora)
    rows = d_out if enable_lora is None else n * d_out // len(enable_lora)
    W = rng.standard_normal((d_in, d_out) if fan_in_fan_out else (d_out, d_in)).astype(bf16)
    A, B = rng.standard_normal((n * r, d_in)).astype(bf16), rng.standard_normal((rows, r)).astype(bf16)
    merged = merge(W, A, B, s, enable_lora=enable_lora, fan_in_fan_out=fan_in_fan_out)
    back = unmerge(merged, A, B, s, enable_lora=enable_lora, fan_in_fan_out=fan_in_fan_out)
    assert merged.dtype == bf16 and back.dtype == bf16
    assert delta_weight(A, B, s, enable_lora).dtype == bf16
    # The reference: the same sum in float64 from the same bfloat16 values.
    W64 = W.astype(np.float64).T if fan_in_fan_out else W.astype(np.float64)       # (d_out, d_in)
    D64 = np.asarray(delta_weight(A.astype(np.float64), B.astype(np.float64), s, enable_lora))
    D_abs = np.asarray(delta_weight(np.abs(A.astype(np.float64)), np.abs(B.astype(np.float64)), s, enable_lora))
    M = np.abs(W64) + D_abs                                     # the merge on absolute values
    # B @ A in float32 (r roundings of the sum, each product exact), * s in float32 (1), then the
    # delta rounded to bfloat16 (1) and the sum rounded to bfloat16 (1): a relative error of at
    # most (1 + gamma_{r+1}(float32)) (1 + gamma_2(bfloat16)) - 1 of M.
    rel = (1 + tolerance("float32", r + 1)) * (1 + tolerance("bfloat16", 2)) - 1
    got = merged.astype(np.float64).T if fan_in_fan_out else merged.astype(np.float64)
    assert_within(got, W64 + D64, rel * M, what="bfloat16 merge")
    # Unmerging repeats the delta's roundings and rounds the difference: within two merges' error.
    got = back.astype(np.float64).T if fan_in_fan_out else back.astype(np.float64)
    assert_within(got, W64, 2 * rel * (M + np.abs(W64 + D64)), what="bfloat16 unmerge")


def test_bfloat16_is_for_merging_only():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    from lora_ref import lora_linear

    bf16 = ml_dtypes.bfloat16
    W, A, B = np.ones((3, 2), bf16), np.ones((1, 2), bf16), np.ones((3, 1), bf16)
    with pytest.raises(TypeError, match=r"x must have a floating dtype \(float16, float32, float64\), got bfloat16"):
        lora_linear(np.ones((1, 2), bf16), W, A, B, 1.0)
    with pytest.raises(TypeError, match="A is float32 but W is bfloat16|W is bfloat16 but A is float32"):
        from lora_ref import merge

        merge(W, A.astype(np.float32), B.astype(np.float32), 1.0)


# --------------------------------------------------------------------------------------------
# The package's top level: every variant room's public names, and a light import
# --------------------------------------------------------------------------------------------


def test_every_variant_rooms_public_names_are_re_exported():
    import lora_ref
    from lora_ref import adapters, combine, conv, dora, embedding, quant, serving

    assert lora_ref._QUANT_NAMES == tuple(quant.__all__)   # the literal list in lora_ref/__init__.py, held to quant.__all__
    for room in (adapters, combine, conv, dora, embedding, quant, serving):
        for name in room.__all__:
            assert getattr(lora_ref, name) is getattr(room, name), (room.__name__, name)
            assert name in lora_ref.__all__ and name in dir(lora_ref)
    assert len(set(lora_ref.__all__)) == len(lora_ref.__all__)              # no room shadows another's name
    with pytest.raises(AttributeError, match="has no attribute 'nothing_here'"):
        lora_ref.nothing_here  # noqa: B018


def test_import_lora_ref_stays_light():
    import subprocess
    import sys

    code = ("import sys, lora_ref; heavy = [m for m in ('ml_dtypes', 'scipy', 'scipy.stats', 'matplotlib', "
            "'transformer_ref', 'torch') if m in sys.modules]; print(heavy); lora_ref.nf4_levels(); "
            "print('ml_dtypes' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "[]" and out[1] == "True"          # quant (and ml_dtypes) load on first use
