"""lora_ref.serving against a direct per-token loop written here, in float64, float32, float16 and
bfloat16: -1 tokens and unsliced columns untouched, padded ranks, SGMV = BGMV, the scale fold,
the mixed batch of lora_ref.adapters, array_api_strict, bad input, and four wrong engines (mutants).

The bound (derived in lora_ref/serving.py's contract): each term ``s x_j A_kj B_ok`` of the exact
``y + s B A x`` reaches the result through at most d_in + R + 4 roundings in the accumulation
dtype (two sums, the two products when they are not exact, the scale and its rounding) and 3 in
the storage dtype S (h to S, c to S, y + c), so each computation is within
``E = ((1 + gamma_{d_in+R+4}(Acc)) (1 + gamma_3(S)) - 1) M`` of the exact value, with
``M = |y| + |s| (|x| |A|^T) |B|^T``; two computations differ by at most 2E.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_ref import lora_linear, to_numpy
from lora_ref.adapters import BASE, mixed_batch_linear
from lora_ref.serving import (
    Segments,
    accumulation_dtype,
    add_lora,
    lora_expand,
    lora_shrink,
    segments_for,
    stack_adapters,
    token_indices,
)
from lora_ref.testing import tolerance

DTYPES = {"float64": np.float64, "float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def f64(a):
    return np.asarray(to_numpy(a)).astype(np.float64)


def gamma(dtype, n):
    """tolerance() for the storage dtype; bfloat16 (8 significant bits, u = 2^-8) by its own u."""
    if dtype == "bfloat16":
        u = 2.0 ** -8
        return n * u / (1 - n * u)
    return tolerance(dtype, n)


@st.composite
def serving_cases(draw, dtype=None):
    dtype = draw(st.sampled_from(list(DTYPES))) if dtype is None else dtype
    T, d_in = draw(st.integers(1, 7)), draw(st.integers(1, 10))
    n_slots = draw(st.integers(1, 4))
    widths = draw(st.lists(st.integers(1, 5), min_size=1, max_size=3))          # q/k/v-like slices
    gap = draw(st.integers(0, 2))                                               # unsliced columns
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    ranks = [draw(st.integers(1, 4)) for _ in range(n_slots)]
    empty = draw(st.integers(-1, n_slots - 1))                                  # an empty slot, or none
    dt = DTYPES[dtype]
    u = lambda *shape: rng.uniform(-1, 1, size=shape).astype(dt)               # noqa: E731
    adapters = [[None if i == empty and n_slots > 1 else (u(r, d_in), u(w, r), float(rng.choice([0.5, 2.0, 0.7])))
                 for i, r in enumerate(ranks)] for w in widths]                 # per slice, per slot
    offsets, col = [], gap
    for w in widths:
        offsets.append(col)
        col += w + gap
    idx = rng.integers(-1, n_slots, size=T)
    return dict(dtype=dtype, x=u(T, d_in), y=u(T, col), adapters=adapters, slices=list(zip(offsets, widths)),
                idx=idx, R=max(ranks), d_in=d_in, T=T)


def loop_reference(case, A_stacks, B_stacks, idx, scale):
    """The contract (V1)-(V2), one token and one slice at a time, in NumPy."""
    S = DTYPES[case["dtype"]]
    acc = np.float64 if case["dtype"] == "float64" else np.float32
    y = case["y"].copy()
    for t in range(case["T"]):
        i = int(idx[t])
        if i < 0:
            continue
        for (off, w), A, B in zip(case["slices"], A_stacks, B_stacks):
            h = np.dot(A[i].astype(acc), case["x"][t].astype(acc)) * acc(scale)       # (R,)
            c = np.dot(B[i].astype(acc), h.astype(S).astype(acc)).astype(S)          # (w,)
            y[t, off:off + w] = (y[t, off:off + w].astype(acc) + c.astype(acc)).astype(S)
    return y


def magnitude(case, idx, scale=1.0, fold=True):
    """M = |y| + |s| (|x| |A|^T) |B|^T per token with its own slot, float64."""
    M = np.abs(f64(case["y"]))
    for t in range(case["T"]):
        i = int(idx[t])
        if i < 0:
            continue
        for (off, w), slots in zip(case["slices"], case["adapters"]):
            if slots[i] is None:
                continue
            A, B, s = slots[i]
            M[t, off:off + w] += abs(s) * (np.abs(f64(B)) @ (np.abs(f64(A)) @ np.abs(f64(case["x"][t]))))
    return M


def bound(case, M):
    acc = accumulation_dtype(case["dtype"])
    E = (1 + gamma(acc, case["d_in"] + case["R"] + 4)) * (1 + gamma(case["dtype"], 3)) - 1
    return 2 * E * M


def ratio(got, ref, bnd):
    """max |got - ref| / bound (inf where the bound is 0 and they differ)."""
    err = np.abs(f64(got) - f64(ref))
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(bnd > 0, err / bnd, np.where(err > 0, np.inf, 0.0))
    return float(r.max())


def stacks(case, **kw):
    pairs = [stack_adapters(slots, max_rank=case["R"], **kw) for slots in case["adapters"]]
    return [p[0] for p in pairs], [p[1] for p in pairs]


# ----------------------------------------------------------------------------------------------
# BGMV and SGMV against the per-token loop
# ----------------------------------------------------------------------------------------------


@settings(max_examples=60)
@given(case=serving_cases())
def test_shrink_expand_equal_a_per_token_loop(case):
    A, B = stacks(case)
    h = lora_shrink(case["x"], A, case["idx"], 1.0)
    assert h.shape == (len(A), case["T"], case["R"]) and h.dtype == accumulation_dtype(case["dtype"])
    y = lora_expand(case["y"], h, B, case["idx"], case["slices"])
    assert y.dtype == case["y"].dtype and y.shape == case["y"].shape
    ref = loop_reference(case, A, B, case["idx"], 1.0)
    assert ratio(y, ref, bound(case, magnitude(case, case["idx"]))) <= 1
    # -1 tokens and columns in no slice: y's values, bit for bit
    inside = np.zeros(y.shape[1], bool)
    for off, w in case["slices"]:
        inside[off:off + w] = True
    assert np.array_equal(f64(y)[case["idx"] < 0], f64(case["y"])[case["idx"] < 0])
    assert np.array_equal(f64(y)[:, ~inside], f64(case["y"])[:, ~inside])
    assert np.all(h[:, case["idx"] < 0, :] == 0)
    # and the exact value, in float64, within E (the contract's own rounding)
    exact = loop_reference({**case, "dtype": "float64", "x": f64(case["x"]), "y": f64(case["y"])},
                           [f64(a) for a in A], [f64(b) for b in B], case["idx"], 1.0)
    assert ratio(y, exact, bound(case, magnitude(case, case["idx"])) / 2) <= 1


@settings(max_examples=40)
@given(case=serving_cases(), data=st.data())
def test_segments_equal_per_token_indices(case, data):
    n_slots = len(case["adapters"][0])
    cuts = sorted(data.draw(st.lists(st.integers(0, case["T"]), max_size=4)))
    bounds_ = [0, *cuts, case["T"]]
    lengths = [b - a for a, b in zip(bounds_, bounds_[1:])]
    seg_idx = data.draw(st.lists(st.integers(-1, n_slots - 1), min_size=len(lengths), max_size=len(lengths)))
    seg = Segments(np.asarray(bounds_[:-1]), np.asarray(lengths), np.asarray(seg_idx))
    per_token = np.repeat(seg_idx, lengths)
    assert np.array_equal(token_indices(seg, case["T"]), per_token)
    A, B = stacks(case)
    y_seg = add_lora(case["y"], case["x"], A, B, seg, 1.0, case["slices"])
    y_tok = add_lora(case["y"], case["x"], A, B, per_token, 1.0, case["slices"])
    assert np.array_equal(f64(y_seg), f64(y_tok))                    # SGMV is BGMV, by definition
    # and an independent segment loop: each sequence's tokens with its slot
    ref = case["y"].copy()
    for start, length, i in zip(bounds_[:-1], lengths, seg_idx):
        sub = {**case, "T": length, "x": case["x"][start:start + length], "y": case["y"][start:start + length]}
        ref[start:start + length] = loop_reference(sub, A, B, np.full(length, i), 1.0)
    assert ratio(y_seg, ref, bound(case, magnitude(case, per_token))) <= 1


@settings(max_examples=30)
@given(case=serving_cases())
def test_padded_ranks_change_nothing(case):
    # The same adapters stacked at their own max rank and at a larger R: h's extra columns are
    # exact zeros and y is the same within the bound.
    A, B = stacks(case)
    A2, B2 = [], []
    for slots in case["adapters"]:
        a, b = stack_adapters(slots, max_rank=case["R"] + 3)
        A2.append(a)
        B2.append(b)
    h2 = lora_shrink(case["x"], A2, case["idx"], 1.0)
    assert np.all(h2[:, :, case["R"]:] == 0)
    y1 = add_lora(case["y"], case["x"], A, B, case["idx"], 1.0, case["slices"])
    y2 = lora_expand(case["y"], h2, B2, case["idx"], case["slices"])
    assert ratio(y2, y1, bound({**case, "R": case["R"] + 3}, magnitude(case, case["idx"]))) <= 1


def test_scale_in_the_shrink_or_folded_at_load():
    rng = np.random.default_rng(0)
    ads = [(rng.normal(size=(r, 6)), rng.normal(size=(5, r)), 0.75) for r in (2, 3)]
    x, y, idx = rng.normal(size=(4, 6)), rng.normal(size=(4, 5)), np.array([1, 0, -1, 1])
    Af, Bf = stack_adapters(ads)                                   # B s at load, scale 1 in the shrink
    A, B = stack_adapters(ads, fold_scale=False)                   # B as is, scale s in the shrink
    y1 = add_lora(y, x, Af, Bf, idx, 1.0, [(0, 5)])
    y2 = add_lora(y, x, A, B, idx, 0.75, [(0, 5)])
    case = dict(dtype="float64", y=y, x=x, adapters=[ads], slices=[(0, 5)], T=4, d_in=6, R=3)
    assert ratio(y1, y2, bound(case, magnitude(case, idx))) <= 1
    with pytest.raises(ValueError, match="scales differ .* fold them into B"):
        stack_adapters([ads[0], (ads[1][0], ads[1][1], 2.0)], fold_scale=False)


def test_mixed_batch_is_serving_in_float64():
    # lora_ref.adapters' mixed batch (S2) = the base layer + shrink/expand with one slot per
    # sample's tokens: the two descriptions of one batch agree.
    rng = np.random.default_rng(1)
    N, T, d_in, d_out = 3, 4, 6, 5
    ads = {"north": (rng.normal(size=(2, d_in)), rng.normal(size=(d_out, 2)), 0.5),
           "south": (rng.normal(size=(4, d_in)), rng.normal(size=(d_out, 4)), 1.5)}
    x, W = rng.normal(size=(N, T, d_in)), rng.normal(size=(d_out, d_in))
    names = ["south", BASE, "north"]
    y = mixed_batch_linear(x, W, ads, names)
    slots = ["north", "south"]
    seg = segments_for(names, slots, [T] * N)
    A, B = stack_adapters([ads[n] for n in slots])
    base = lora_linear(x, W, None, None, 1.0).reshape(N * T, d_out)
    served = add_lora(base, x.reshape(N * T, d_in), A, B, seg, 1.0, [(0, d_out)]).reshape(N, T, d_out)
    idx = token_indices(seg, N * T)
    case = dict(dtype="float64", y=base, x=x.reshape(N * T, d_in), adapters=[[ads[n] for n in slots]],
                slices=[(0, d_out)], T=N * T, d_in=d_in, R=4)
    M = magnitude({**case, "y": np.abs(x.reshape(N * T, d_in)) @ np.abs(W).T}, idx)
    assert ratio(served.reshape(N * T, d_out), y.reshape(N * T, d_out), bound(case, M)) <= 1


# ----------------------------------------------------------------------------------------------
# Wrong engines (mutants) must differ from the reference by more than the bound
# ----------------------------------------------------------------------------------------------


def _mutant_case(dtype):
    rng = np.random.default_rng(2)
    dt = DTYPES[dtype]
    u = lambda *shape: rng.uniform(-1, 1, size=shape).astype(dt)    # noqa: E731
    adapters = [[(u(2, 8), u(6, 2), 2.0), (u(4, 8), u(6, 4), 0.5)]]
    return dict(dtype=dtype, x=u(6, 8), y=u(6, 6), adapters=adapters, slices=[(0, 6)], T=6, d_in=8, R=4,
                idx=np.array([0, 0, -1, 1, 1, 1]))


def mutant_margins(dtype):
    """max |mutant - reference| / bound for each wrong engine (the report quotes these)."""
    case = _mutant_case(dtype)
    A, B = stacks(case)
    idx, x, y, sl = case["idx"], case["x"], case["y"], case["slices"]
    ref = add_lora(y, x, A, B, idx, 1.0, sl)
    bnd = bound(case, magnitude(case, idx))
    out = {}
    # 1. -1 read as the last slot (vLLM's CPU fallback: lora_weights[indices])
    last = np.where(idx < 0, len(case["adapters"][0]) - 1, idx)
    out["minus_one_is_last"] = ratio(loop_reference(case, A, B, last, 1.0), ref, bnd)
    # 2. the scale applied twice: folded into B at load and passed to the shrink again
    s = case["adapters"][0][1][2]
    out["scale_twice"] = ratio(add_lora(y, x, A, B, idx, s, sl), ref, bnd)
    # 3. padding rows not zero: slot 0 (rank 2 of R = 4) keeps rows of a previous rank-4 adapter
    A_bad = [a.copy() for a in A]
    A_bad[0][0, 2:, :] = A[0][1, 2:, :]
    B_bad = [b.copy() for b in B]
    B_bad[0][0, :, 2:] = B[0][1, :, 2:]
    out["padding_not_zero"] = ratio(add_lora(y, x, A_bad, B_bad, idx, 1.0, sl), ref, bnd)
    # 4. a segment off by one: sequences [0, 2), [2, 3), [3, 6) read one token late
    late = np.concatenate([[idx[0]], idx[:-1]])
    out["segment_off_by_one"] = ratio(add_lora(y, x, A, B, late, 1.0, sl), ref, bnd)
    return out


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_mutants_fail_the_bound(dtype):
    margins = mutant_margins(dtype)
    assert all(m > 1 for m in margins.values()), margins


# ----------------------------------------------------------------------------------------------
# array_api_strict, and bad input
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_array_api_strict_gives_numpys_result(dtype):
    xs = pytest.importorskip("array_api_strict")
    case = _mutant_case(dtype)
    A, B = stacks(case)
    seg = Segments([0, 3], [3, 3], [1, -1])
    y_np = add_lora(case["y"], case["x"], A, B, seg, 0.5, case["slices"])
    A_s, B_s = zip(*(stack_adapters([(xs.asarray(a), xs.asarray(b), s) for a, b, s in slots], max_rank=4)
                     for slots in case["adapters"]))
    y_s = add_lora(xs.asarray(case["y"]), xs.asarray(case["x"]), list(A_s), list(B_s), seg, 0.5, case["slices"])
    assert isinstance(y_s, type(xs.asarray(0.0)))
    assert ratio(y_s, y_np, bound(case, magnitude(case, token_indices(seg, 6), 0.5))) <= 1


def test_bad_input():
    rng = np.random.default_rng(3)
    A, B = stack_adapters([(rng.normal(size=(2, 4)), rng.normal(size=(3, 2)), 1.0)])
    x, y = rng.normal(size=(2, 4)), rng.normal(size=(2, 3))
    with pytest.raises(ValueError, match=r"indices must be in \[-1, 1\) .* got 1 at token 1"):
        lora_shrink(x, A, [0, 1], 1.0)
    with pytest.raises(ValueError, match=r"indices must have one entry per token \(2\)"):
        lora_shrink(x, A, [0], 1.0)
    with pytest.raises(TypeError, match="indices must be an integer array"):
        lora_shrink(x, A, np.array([0.0, 1.0]), 1.0)
    with pytest.raises(ValueError, match=r"segments.starts\[1\] = 2 but the sequences before it end at 1"):
        lora_shrink(x, A, Segments([0, 2], [1, 1], [0, 0]), 1.0)
    with pytest.raises(ValueError, match="segments cover 3 tokens but the batch has 2"):
        lora_shrink(x, A, Segments([0, 1], [1, 2], [0, 0]), 1.0)
    with pytest.raises(TypeError, match="A_stack.* is float32 but x is float64"):
        lora_shrink(x, A.astype(np.float32), [0, 0], 1.0)
    with pytest.raises(ValueError, match=r"x must be \(T, d_in\)"):
        lora_shrink(x[None], A, [0, 0], 1.0)
    h = lora_shrink(x, A, [0, -1], 1.0)
    with pytest.raises(TypeError, match=r"h must have a floating dtype \(float64\)"):
        lora_expand(y, h.astype(np.float32), B, [0, -1], [(0, 3)])
    with pytest.raises(ValueError, match=r"slices\[0\] has width 2 but B_stack\[0\] has 3 output rows"):
        lora_expand(y, h, B, [0, -1], [(0, 2)])
    with pytest.raises(ValueError, match=r"slices\[0\] = \(1, 3\) ends at column 4, past y's 3"):
        lora_expand(y, h, B, [0, -1], [(1, 3)])
    with pytest.raises(ValueError, match="slices overlap"):
        lora_expand(np.zeros((2, 6)), np.concatenate([h, h]), [B, B], [0, -1], [(0, 3), (2, 3)])
    with pytest.raises(ValueError, match="max_rank=1 is below the largest adapter rank 2"):
        stack_adapters([(np.ones((2, 4)), np.ones((3, 2)), 1.0)], max_rank=1)
    with pytest.raises(ValueError, match="every slot is empty"):
        stack_adapters([None])
    with pytest.raises(ValueError, match=r"names\[0\] = 'x' is in no slot"):
        segments_for(["x"], ["a"], [1])
    with pytest.raises(TypeError, match="storage dtype must be one of"):
        accumulation_dtype("int8")


def test_every_segment_slot_is_checked_even_an_empty_segment():
    # Segment 1 has length 0, so slot 9 reaches no token; it is still no slot of 2 and is refused.
    x = np.ones((5, 4))
    A, B = stack_adapters([(np.ones((2, 4)), np.ones((3, 2)), 1.0)] * 2)              # 2 slots
    bad = Segments([0, 2, 2], [2, 0, 3], [0, 9, 1])
    message = r"segments.indices\[1\] = 9 \(segment 1, 0 tokens\) is not a slot: .* \[-1, 2\)"
    with pytest.raises(ValueError, match=message):
        lora_shrink(x, A, bad, 1.0)
    with pytest.raises(ValueError, match=message):
        lora_expand(np.zeros((5, 3)), np.zeros((1, 5, 2)), B, bad, [(0, 3)])
    with pytest.raises(ValueError, match=message):
        token_indices(bad, 5, n_slots=2)
    with pytest.raises(ValueError, match=r"segments.indices\[0\] = -2 \(segment 0, 2 tokens\) .* >= -1"):
        token_indices(Segments([0, 2], [2, 3], [-2, 0]), 5)                   # below -1: refused without n_slots
    assert token_indices(bad, 5).tolist() == [0, 0, 1, 1, 1]                     # no slot count: no upper bound
    good = Segments([0, 2, 2], [2, 0, 3], [0, 1, -1])                            # the empty segment's slot in range
    assert token_indices(good, 5, n_slots=2).tolist() == [0, 0, -1, -1, -1]
    h = lora_shrink(x, A, good, 1.0)
    assert np.array_equal(h, lora_shrink(x, A, [0, 0, -1, -1, -1], 1.0))
    with pytest.raises(ValueError, match=r"segments.indices\[2\] = 2 .* \[-1, 2\)"):        # a slot one past the end
        lora_shrink(x, A, Segments([0, 2, 2], [2, 0, 3], [0, 1, 2]), 1.0)


@pytest.mark.parametrize("starts, lengths, message", [
    ([0, 1], [2, 3], r"segments.starts\[1\] = 1 but the sequences before it end at 2: segments overlap"),
    ([0, 3], [2, 3], r"segments.starts\[1\] = 3 but the sequences before it end at 2: a gap \(token 2 in no"),
    ([0, 4], [2, 1], r"a gap \(tokens 2 to 3 in no segment\)"),
    ([2, 0], [3, 2], r"segments.starts\[0\] = 2 but the first sequence must start at token 0"),
])
def test_bad_segment_starts_are_named_overlap_or_gap(starts, lengths, message):
    with pytest.raises(ValueError, match=message + ".*without gaps or overlaps"):
        token_indices(Segments(starts, lengths, [0] * len(starts)), 5)
