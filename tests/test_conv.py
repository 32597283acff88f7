"""lora_ref.conv: the reference convolution and LoRA on it, checked in float64 and float32.

Tolerances are ``tolerance(dtype, n) * M`` (lora_ref.testing), M the same computation on absolute
values, doubled to compare two computations. Counts, with K = prod(kernel), P = prod(output size):

* conv_nd: each output is a chain of (C_in/G) K products plus the bias: n = (C_in/G) K + 1.
* lora_conv: the adapter term of an output goes through C_in K (A, + 1 for a mask), r/G (B), 2 (s
  rounded to the dtype, times s) and 1 (joined to the base) roundings, + 1 for the bias: at most
  n = C_in K + r + 5; the merged path, r (B A) + 2 (s) + 1 (W +) + C_in K + 1 (bias), is shorter.
* gradients: the longest chain in any entry is one of K1 (C_out K), K2/K3 (N P), L1 through A
  (C_out + r K + 4), L4 (C_out + N P + 3), L5 (C_in K + N P + 3); all are at most
  L = N P + C_in K + C_out K + C_out + r K + 8.
"""

from __future__ import annotations

import itertools
import math

import _pages
import autograd
import numpy as np
import pytest
from autograd.test_util import check_grads

from lora_ref.backend import asarray, to_numpy, use_backend
from lora_ref.conv import (conv_delta_weight, conv_nd, conv_output_shape, init_lora_conv, lora_conv,
                           loralib_conv_delta, merge_conv, unmerge_conv)
from lora_ref.testing import assert_within, tolerance

DTYPES = ("float64", "float32")
C_IN, C_OUT, R = 4, 4, 4
# (spatial size, kernel, geometry): 1-D and 2-D, strides, zero padding, dilation, groups.
GEOMETRIES = [
    ((9,), (3,), dict()),
    ((9,), (3,), dict(stride=2, padding=1)),
    ((11,), (3,), dict(stride=3, padding=2, dilation=2, groups=2)),
    ((6, 7), (3, 2), dict()),
    ((6, 7), (3, 3), dict(stride=2, padding=1, groups=2)),
    ((7, 6), (2, 3), dict(stride=(1, 2), padding=(2, 0), dilation=(2, 1))),
    ((8, 8), (3, 3), dict(stride=2, padding=1, dilation=2, groups=4)),
]
IDS = [f"{len(s)}d-" + ("-".join(f"{k}{v}" for k, v in g.items()) or "plain") for s, _, g in GEOMETRIES]


def f64(a):
    return np.asarray(to_numpy(a), dtype=np.float64)


def tup(v, n):
    return (v,) * n if isinstance(v, int) else tuple(v)


def loop_conv(x, W, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """The convolution's definition, one output at a time, float64 (PyTorch's cross-correlation)."""
    x, W = f64(x), f64(W)
    n = x.ndim - 2
    s, p, d = tup(stride, n), tup(padding, n), tup(dilation, n)
    N, C_in, S = x.shape[0], x.shape[1], x.shape[2:]
    C_out, k = W.shape[0], W.shape[2:]
    O = tuple((S[j] + 2 * p[j] - d[j] * (k[j] - 1) - 1) // s[j] + 1 for j in range(n))
    y = np.zeros((N, C_out) + O)
    for b, o in itertools.product(range(N), range(C_out)):
        g = o // (C_out // groups)
        for q in np.ndindex(O):
            acc = 0.0 if bias is None else f64(bias)[o]
            for c, t in itertools.product(range(C_in // groups), np.ndindex(k)):
                pos = tuple(s[j] * q[j] + d[j] * t[j] - p[j] for j in range(n))
                if all(0 <= pos[j] < S[j] for j in range(n)):
                    acc += W[(o, c) + t] * x[(b, g * (C_in // groups) + c) + pos]
            y[(b, o) + q] = acc
    return y


class Case:
    def __init__(self, size, kernel, geo, dtype, seed=0, mask=False):
        rng = np.random.default_rng(seed)
        n, G = len(size), geo.get("groups", 1)
        self.geo, self.dtype, self.G, self.K, self.scale = geo, dtype, G, math.prod(kernel), 0.75
        u = lambda *shape: rng.uniform(-1, 1, shape).astype(dtype)  # noqa: E731
        self.x, self.W, self.bias = u(2, C_IN, *size), u(C_OUT, C_IN // G, *kernel), u(C_OUT)
        self.A, self.B = u(R, C_IN, *kernel), u(C_OUT, R // G, *(1,) * n)
        self.mask = ((rng.random(self.x.shape) >= 0.25) / 0.75).astype(dtype) if mask else None
        self.out = conv_output_shape(size, kernel, **{k: v for k, v in geo.items() if k != "groups"})
        self.G_up = u(2, C_OUT, *self.out)                     # the upstream gradient dL/dy
        self.NP = 2 * math.prod(self.out)

    def lora(self, fun=None, absolute=False):
        """(fun(x, W, A, B, bias), vjp) at the case; ``absolute``: inputs, s, mask as |.| in float64."""
        t = (lambda a: None if a is None else np.abs(f64(a))) if absolute else (lambda a: a)
        s = abs(self.scale) if absolute else self.scale
        f = lambda x, W, A, B, b: (fun or lora_conv)(x, W, A, B, s, b, dropout_mask=t(self.mask), **self.geo)  # noqa: E731
        vjp, y = autograd.make_vjp(f, argnum=(0, 1, 2, 3, 4))(t(self.x), t(self.W), t(self.A), t(self.B), t(self.bias))
        return y, vjp(t(self.G_up))

    def n_forward(self):
        return C_IN * self.K + R + 5

    def n_grad(self):
        return self.NP + C_IN * self.K + C_OUT * self.K + C_OUT + R * self.K + 8


# ----------------------------------------------------------------------------------------------
# The reference convolution against its definition
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size, kernel, geo", GEOMETRIES, ids=IDS)
def test_conv_matches_the_loop_definition(size, kernel, geo, dtype):
    c = Case(size, kernel, geo, dtype)
    y = conv_nd(c.x, c.W, c.bias, **geo)
    assert y.shape == (2, C_OUT) + c.out and y.dtype == np.dtype(dtype)
    M = loop_conv(np.abs(f64(c.x)), np.abs(f64(c.W)), np.abs(f64(c.bias)), **geo)
    assert_within(y, loop_conv(c.x, c.W, c.bias, **geo), 2 * tolerance(dtype, C_IN // c.G * c.K + 1) * M, what="conv_nd")


def test_output_shape_is_pytorchs_rule():
    assert conv_output_shape((11,), (3,), stride=3, padding=2, dilation=2) == (4,)       # (11 + 4 - 5) // 3 + 1
    assert conv_output_shape((6, 7), (3, 2), stride=(1, 2), padding=(2, 0)) == (8, 3)
    with pytest.raises(ValueError, match=r"narrower than the dilated kernel d \(k - 1\) \+ 1 = 5"):
        conv_output_shape((4,), (3,), dilation=2)


@pytest.mark.parametrize("size, kernel, geo", GEOMETRIES, ids=IDS)
def test_conv_vjps_match_autograd_numpy_trace_and_finite_differences(size, kernel, geo):
    c = Case(size, kernel, geo, "float64")
    grads = {}
    for name, fun in (("hand", conv_nd), ("traced", conv_nd.fun)):
        vjp, _ = autograd.make_vjp(lambda x, W, b: fun(x, W, b, **geo), argnum=(0, 1, 2))(c.x, c.W, c.bias)
        grads[name] = vjp(c.G_up)
    mag_vjp, _ = autograd.make_vjp(lambda x, W, b: conv_nd(x, W, b, **geo), argnum=(0, 1, 2))(
        np.abs(c.x), np.abs(c.W), np.abs(c.bias))
    L = c.NP + C_OUT * c.K + 2
    for name, h, t, m in zip(("x", "W", "bias"), grads["hand"], grads["traced"], mag_vjp(np.abs(c.G_up))):
        assert_within(h, t, 2 * tolerance("float64", L) * m, what=f"conv dL/d{name}")
    np.random.seed(0)
    check_grads(lambda x, W, b: conv_nd(x, W, b, **geo), argnum=(0, 1, 2), modes=["rev"], order=1)(c.x, c.W, c.bias)


# ----------------------------------------------------------------------------------------------
# LoRA on the convolution: definition, merge, gradients, init
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size, kernel, geo", GEOMETRIES, ids=IDS)
def test_lora_conv_matches_its_definition_and_the_merged_kernel(size, kernel, geo, dtype):
    c = Case(size, kernel, geo, dtype, mask=True)
    y, _ = c.lora()
    M, _ = c.lora(absolute=True)
    bound = 2 * tolerance(dtype, c.n_forward()) * M
    base_geo = {k: v for k, v in geo.items() if k != "groups"}
    H = loop_conv(f64(c.x) * f64(c.mask), c.A, **base_geo)                           # A: the base's geometry, groups 1
    want = loop_conv(c.x, c.W, c.bias, **geo) + c.scale * loop_conv(H, c.B, groups=c.G)
    assert_within(y, want, bound, what="lora_conv vs its definition")
    if c.G == 1:                                                                      # (C3): merged == forward
        y0 = lora_conv(c.x, c.W, c.A, c.B, c.scale, c.bias, **geo)
        M0 = lora_conv(np.abs(c.x), np.abs(c.W), np.abs(c.A), np.abs(c.B), c.scale, np.abs(c.bias), **geo)
        merged = merge_conv(c.W, c.A, c.B, c.scale)
        assert_within(conv_nd(c.x, merged, c.bias, **geo), y0, 2 * tolerance(dtype, c.n_forward()) * M0, what="merged")


@pytest.mark.parametrize("size, kernel, geo", GEOMETRIES, ids=IDS)
def test_lora_conv_vjps_three_ways(size, kernel, geo):
    c = Case(size, kernel, geo, "float64", mask=True)
    y_hand, hand = c.lora()
    y_traced, traced = c.lora(lora_conv.fun)
    _, mags = c.lora(absolute=True)
    assert np.array_equal(y_hand, y_traced)
    for name, h, t, m, like in zip(("x", "W", "A", "B", "bias"), hand, traced, mags, (c.x, c.W, c.A, c.B, c.bias)):
        assert h.shape == like.shape and h.dtype == like.dtype, name
        assert_within(h, t, 2 * tolerance("float64", c.n_grad()) * m, what=f"lora_conv dL/d{name}")
    np.random.seed(1)
    f = lambda x, W, A, B, b: lora_conv(x, W, A, B, c.scale, b, dropout_mask=c.mask, **geo)  # noqa: E731
    check_grads(f, argnum=(0, 1, 2, 3, 4), modes=["rev"], order=1)(c.x, c.W, c.A, c.B, c.bias)


def test_second_derivatives_by_finite_differences():
    c = Case((7,), (3,), dict(stride=2, padding=1, groups=2), "float64", mask=True)
    np.random.seed(2)
    f = lambda x, A, B: lora_conv(x, c.W, A, B, c.scale, c.bias, stride=2, padding=1, groups=2, dropout_mask=c.mask)  # noqa: E731
    check_grads(f, argnum=(0, 1, 2), modes=["rev"], order=2)(c.x, c.A, c.B)


@pytest.mark.parametrize("init", ["kaiming", "gaussian", "random"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_init_layout_distribution_and_identity(init, dtype):
    A, B = init_lora_conv(6, 4, (3, 2), 4, groups=2, init=init, rng=np.random.default_rng(9), dtype=dtype)
    assert A.shape == (4, 6, 3, 2) and B.shape == (4, 2, 1, 1) and A.dtype == B.dtype == np.dtype(dtype)
    rng = np.random.default_rng(9)                                 # replay the draws
    want_A = (rng.normal(0, 1 / 4, A.shape) if init == "gaussian" else rng.uniform(-1 / 6, 1 / 6, A.shape))  # 1/sqrt(6*3*2)
    assert np.array_equal(A, want_A.astype(dtype))
    if init == "random":
        assert np.array_equal(B, rng.uniform(-1 / math.sqrt(2), 1 / math.sqrt(2), B.shape).astype(dtype))
        return
    assert not np.any(B)
    x = np.random.default_rng(0).normal(size=(2, 6, 5, 5)).astype(dtype)
    W = np.random.default_rng(1).normal(size=(4, 3, 3, 2)).astype(dtype)
    assert np.array_equal(lora_conv(x, W, A, B, 2.0, padding=1, groups=2), conv_nd(x, W, padding=1, groups=2))
    gA, gB = autograd.grad(lambda A, B: (lora_conv(x, W, A, B, 2.0, padding=1, groups=2) ** 2).sum(), argnum=(0, 1))(A, B)
    assert not np.any(gA) and np.any(gB)                            # L4 with B = 0: only B moves first


@pytest.mark.parametrize("dtype", DTYPES)
def test_unmerge_undoes_merge(dtype):
    c = Case((6, 7), (3, 3), {}, dtype)
    back = unmerge_conv(merge_conv(c.W, c.A, c.B, c.scale), c.A, c.B, c.scale)
    D = c.scale * np.abs(conv_delta_weight(np.abs(f64(c.A)), np.abs(f64(c.B)), 1.0))
    assert_within(back, c.W, tolerance(dtype, 2) * (np.abs(f64(c.W)) + D), what="unmerge(merge(W))")


def test_delta_weight_definition():
    c = Case((6, 7), (3, 2), {}, "float64")
    delta = conv_delta_weight(c.A, c.B, c.scale)
    want = c.scale * np.einsum("or,ritu->oitu", c.B[:, :, 0, 0], c.A)        # dW[o,i,t] = s sum_r B[o,r] A[r,i,t]
    M = c.scale * np.einsum("or,ritu->oitu", np.abs(c.B[:, :, 0, 0]), np.abs(c.A))
    assert_within(delta, want, 2 * tolerance("float64", R + 2) * M)


def test_grouped_adapter_cannot_be_merged():
    c = Case((6, 7), (3, 3), dict(groups=2), "float64")
    with pytest.raises(ValueError, match=r"grouped convolution \(groups = 2\).*no merged weight"):
        conv_delta_weight(c.A, c.B, c.scale)
    with pytest.raises(ValueError, match="grouped convolution"):
        merge_conv(c.W, c.A, c.B, c.scale)


def test_merge_refuses_non_finite():
    c = Case((5,), (3,), {}, "float64")
    with pytest.raises(ValueError, match="non-finite"):
        merge_conv(c.W, np.full_like(c.A, np.inf), np.abs(c.B), 1.0)


# ----------------------------------------------------------------------------------------------
# loralib's ConvLoRA (C4): its rank, and why it does not convert to PEFT's form
# ----------------------------------------------------------------------------------------------


def rank_as_matrix(delta):
    """The rank of a (C_out, C_in/G, *k) delta as a (C_out, C_in K) matrix (NumPy's SVD threshold)."""
    return int(np.linalg.matrix_rank(np.reshape(delta, (delta.shape[0], -1))))


@pytest.mark.parametrize("C_out, C_in, k, r", [(16, 16, 3, 1), (16, 16, 3, 2), (32, 8, 3, 2), (8, 2, 3, 1), (64, 64, 3, 4)])
def test_loralib_rank_reaches_r_k_squared_where_peft_stays_at_r(C_out, C_in, k, r):
    rng = np.random.default_rng(C_out + C_in + r)
    peft = conv_delta_weight(rng.normal(size=(r, C_in, k, k)), rng.normal(size=(C_out, r, 1, 1)), 0.5)
    lora_lib = loralib_conv_delta(rng.normal(size=(r * k, C_in * k)), rng.normal(size=(C_out * k, r * k)), 0.5, k)
    assert peft.shape == lora_lib.shape == (C_out, C_in, k, k)
    assert rank_as_matrix(peft) == r
    assert rank_as_matrix(lora_lib) == min(C_out, r * k * k, C_in * k * k) > r


def test_peft_form_is_a_special_case_of_loralibs():
    # A PEFT adapter converts exactly to loralib's form at the same r: A_l = A reshaped (r k, C_in k),
    # B_l = B kron I_k (C_out k, r k). (The converse needs PEFT rank up to r k^2, test above.)
    rng, (C_out, C_in, k, r) = np.random.default_rng(4), (8, 6, 3, 2)
    A, B = rng.normal(size=(r, C_in, k, k)), rng.normal(size=(C_out, r, 1, 1))
    A_l, B_l = A.reshape(r * k, C_in * k), np.kron(B[:, :, 0, 0], np.eye(k))
    # r k terms in B_l A_l of which r are non-zero (the others are exact zeros), 2 for s.
    M = 0.5 * np.abs(conv_delta_weight(np.abs(A), np.abs(B), 1.0))
    assert_within(loralib_conv_delta(A_l, B_l, 0.5, k), conv_delta_weight(A, B, 0.5), 2 * tolerance("float64", r * k + 2) * M)


# ----------------------------------------------------------------------------------------------
# Mutants: what a wrong implementation computes must fail the bound by far
# ----------------------------------------------------------------------------------------------


def assert_page_shows(line):
    """_pages.assert_page_shows for docs/conv.md (fixed seeds and shapes: the margins are the same
    run to run)."""
    _pages.assert_page_shows(line, "conv.md", "python -m pytest -q -s tests/test_conv.py -k mutants")


@pytest.mark.parametrize("dtype", DTYPES)
def test_mutants_are_caught(dtype):
    margins = {}
    # 1. The delta laid out loralib's way where PEFT's is asked: PEFT computes conv(A^T, B), shape
    #    (C_in, C_out, *k), then TRANSPOSES it to W's layout; the mutant views it to W's shape
    #    (loralib's `.view(self.conv.weight.shape)`).
    c = Case((6, 7), (3, 3), dict(padding=1), dtype)
    y = lora_conv(c.x, c.W, c.A, c.B, c.scale, c.bias, padding=1)
    M, _ = c.lora(absolute=True)
    bound = 2 * tolerance(dtype, c.n_forward()) * M
    in_out = c.scale * np.einsum("or,ritu->iotu", c.B[:, :, 0, 0], c.A)              # (C_in, C_out, k, k)
    viewed = conv_nd(c.x, c.W + in_out.reshape(c.W.shape).astype(dtype), c.bias, padding=1)
    margins["delta viewed, not transposed"] = float(np.max(np.abs(f64(viewed) - f64(y)) / bound))
    # 2. Dilation ignored in the A conv (PEFT's code). Stride 3 makes the output sizes agree, so the
    #    mutant runs; it computes another function.
    c = Case((11,), (3,), dict(stride=3, dilation=2), dtype)
    y, _ = c.lora()
    M, _ = c.lora(absolute=True)
    H = conv_nd(c.x, c.A, stride=3)                                                   # no dilation
    undilated = conv_nd(c.x, c.W, c.bias, stride=3, dilation=2) + c.scale * conv_nd(H, c.B)
    margins["dilation ignored in A"] = float(np.max(np.abs(f64(undilated) - f64(y)) / (2 * tolerance(dtype, c.n_forward()) * M)))
    for name, margin in margins.items():
        assert margin > 1e3, name
    assert_page_shows(f"conv mutant margins ({dtype}, max error / bound): " + ", ".join(f"{k} {v:.2e}" for k, v in margins.items()))


# ----------------------------------------------------------------------------------------------
# array_api_strict: the same code, no NumPy idioms
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size, kernel, geo", [GEOMETRIES[2], GEOMETRIES[6]], ids=[IDS[2], IDS[6]])
def test_array_api_strict_matches_numpy(size, kernel, geo, dtype):
    c = Case(size, kernel, geo, dtype, mask=True)
    y_np, g_np = c.lora()
    _, mags = c.lora(absolute=True)
    with use_backend("array_api_strict"):
        x, W, A, B, b, mask, G = (asarray(a) for a in (c.x, c.W, c.A, c.B, c.bias, c.mask, c.G_up))
        f = lambda x, W, A, B, b: lora_conv(x, W, A, B, c.scale, b, dropout_mask=mask, **geo)  # noqa: E731
        vjp, y = autograd.make_vjp(f, argnum=(0, 1, 2, 3, 4))(x, W, A, B, b)
        grads = vjp(G)
    assert type(y) is type(x) and all(type(g) is type(x) for g in grads)
    M, _ = c.lora(absolute=True)
    assert_within(y, y_np, 2 * tolerance(dtype, c.n_forward()) * M, what="forward on array_api_strict")
    for name, g, ref, m in zip(("x", "W", "A", "B", "bias"), grads, g_np, mags):
        assert_within(g, ref, 2 * tolerance(dtype, c.n_grad()) * m, what=f"dL/d{name} on array_api_strict")


# ----------------------------------------------------------------------------------------------
# Bad input: clear errors naming the argument
# ----------------------------------------------------------------------------------------------

X, W3, A3, B3 = np.ones((2, 4, 9)), np.ones((6, 4, 3)), np.ones((2, 4, 3)), np.ones((6, 2, 1))


@pytest.mark.parametrize("call, error, match", [
    (lambda: conv_nd(np.ones((4, 9)), np.ones((6, 4))), ValueError, "add a batch axis"),
    (lambda: conv_nd(X, np.ones((6, 4, 3, 3))), ValueError, "W must have x's number of axes"),
    (lambda: conv_nd(X, np.ones((6, 2, 3)), groups=3), ValueError, "groups=3 must divide C_in=4"),
    (lambda: conv_nd(X, np.ones((6, 4, 3)), groups=2), ValueError, r"W must be \(C_out, C_in/groups, \*kernel\) = \(6, 2, ...\)"),
    (lambda: conv_nd(X, W3, padding="same"), TypeError, "padding must be an int or a tuple of 1 ints, got the string"),
    (lambda: conv_nd(X, W3, stride=0), ValueError, "stride must be a positive int"),
    (lambda: conv_nd(X, W3, padding=-1), ValueError, "padding must be a non-negative int"),
    (lambda: conv_nd(X, W3, dilation=(1, 1)), ValueError, "dilation must be an int or a tuple of 1 ints"),
    (lambda: conv_nd(X, np.ones((6, 4, 11))), ValueError, "narrower than the dilated kernel"),
    (lambda: conv_nd(X, W3, np.ones(5)), ValueError, r"bias must have shape \(6,\)"),
    (lambda: conv_nd(X, W3.astype(np.float32)), TypeError, "W is float32 but x is float64"),
    (lambda: conv_nd(X.astype(int), W3), TypeError, "x must have a floating dtype"),
    (lambda: lora_conv(X, W3, np.ones((2, 4, 2)), B3, 1.0), ValueError, r"A must be \(r, C_in, \*kernel\) = \(r, 4, 3\)"),
    (lambda: lora_conv(X, np.ones((6, 2, 3)), np.ones((3, 4, 3)), np.ones((6, 1, 1)), 1.0, groups=2), ValueError,
     "rank r=3 must be divisible by groups=2"),
    (lambda: lora_conv(X, W3, A3, np.ones((6, 2, 3)), 1.0), ValueError, r"B must be \(C_out, r/groups, 1, ...\) = \(6, 2, 1\)"),
    (lambda: lora_conv(X, W3, A3, B3, float("inf")), ValueError, "scale must be finite"),
    (lambda: lora_conv(X, W3, A3, B3, 1.0, dropout_mask=np.ones((2, 4, 8))), ValueError, "dropout_mask of shape"),
    (lambda: merge_conv(np.ones((6, 4, 2)), A3, np.ones((6, 2, 1)), 1.0), ValueError, "s B A has shape"),
    (lambda: init_lora_conv(4, 6, 3, 2, rng=np.random.default_rng(0)), TypeError, "kernel_size must be a tuple"),
    (lambda: init_lora_conv(4, 6, (3,), 3, groups=2, rng=np.random.default_rng(0)), ValueError, "r=3"),
    (lambda: init_lora_conv(4, 6, (3,), 2, init="pissa", rng=np.random.default_rng(0)), ValueError, "init must be one of"),
    (lambda: loralib_conv_delta(np.ones((4, 12)), np.ones((18, 5)), 1.0, 3), ValueError, r"A must be \(r 3, C_in 3\)"),
])
def test_bad_input_raises_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("call", [
    lambda: lora_conv(X, W3, A3, B3, 1.0, 2),                  # issue 14's sketch: stride right after scale
    lambda: lora_conv(X, W3, A3, B3, 1.0, (2,)),
    lambda: conv_nd(X, W3, 2),
])
def test_a_setting_passed_where_the_bias_goes_is_refused(call):
    # lora_conv(x, W, A, B, scale, bias=None, stride=1, ...): a positional stride lands on the bias.
    # It must be refused, naming the order and the keyword to use, never run as some other conv.
    with pytest.raises(TypeError, match=r"bias must be an array of shape \(6,\) or None, got (int 2|tuple \(2,\)): a "
                                        r"setting passed where the bias goes\? The order is (lora_conv|conv_nd)\(x, W, .*"
                                        r"bias=None, stride=1, .*\); pass the settings by keyword, e.g. stride="):
        call()
    assert np.array_equal(lora_conv(X, W3, A3, B3, 1.0, None, 2), lora_conv(X, W3, A3, B3, 1.0, stride=2))


def test_settings_are_not_differentiable():
    with pytest.raises(TypeError, match="not differentiable with respect to scale"):
        autograd.grad(lambda s: lora_conv(X, W3, A3, B3, s).sum())(0.5)
