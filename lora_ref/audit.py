"""The checks behind ``lora-ref audit``: LoRA's properties on seeded random cases, each with a
derived tolerance.

Every check computes an *error* and a *tolerance*, both relative to the check's magnitude ``M``
(the same computation evaluated on absolute values, in float64), so they read the same way in
every row: a rounding-error bound ``gamma_n = n u / (1 - n u)`` (:func:`lora_ref.testing.tolerance`)
for ``n`` chained roundings of unit roundoff ``u``, doubled when two computations of one exact
value are compared. Exact properties (the zero-init identity, a parameter count) have tolerance
0. docs/math.md derives each bound.

The cases are drawn from ``numpy.random.default_rng(seed)`` and moved to the current backend
(:func:`lora_ref.get_backend`), where the computation under test runs; magnitudes, inner
products and reference values are computed on the host in float64. Needs only the core
dependencies (NumPy, SciPy, autograd), not the test extras.

Shapes (letters as in :mod:`lora_ref.lora`): ``x (N1, N2, d_in)``, ``W (d_out, d_in)``,
``A (r, d_in)``, ``B (d_out, r)``; fused (``enable_lora``) cases have G = 3 blocks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import autograd
import numpy as np

from .backend import asarray, get_backend, namespace, to_numpy
from .cases import LoraCase, uniform_entries
from .checks import positive_int
from .config import LoraConfig
from .lora import delta_weight, init_lora, lora_linear, lora_parameter_count, lora_scale, merge, pissa_init, unmerge
from .kit.core import tolerance   # not the lora_ref.testing facade, which imports every kit module

__all__ = [
    "CheckResult",
    "check_bad_input",
    "check_merge_equivalence",
    "check_parameter_count",
    "check_pissa",
    "check_rank",
    "check_scaling",
    "check_unmerge",
    "check_vjps_vs_differences",
    "check_vjps_vs_trace",
    "check_zero_init",
    "format_table",
    "merge_unmerge_drift",
    "run_audit",
]

DTYPES = ("float64", "float32")


@dataclass(frozen=True)
class CheckResult:
    """One row of the audit: ``error <= tolerance`` passes (both relative to the check's magnitude)."""

    check: str
    dtype: str
    error: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return bool(self.error <= self.tolerance)  # False for NaN


# ----------------------------------------------------------------------------------------------
# Host-side helpers (NumPy, float64)
# ----------------------------------------------------------------------------------------------


def _h(a: Any) -> np.ndarray | None:
    """A host float64 copy (None stays None)."""
    return None if a is None else np.asarray(to_numpy(a), dtype=np.float64)


def _abs(a: Any) -> np.ndarray | None:
    return None if a is None else np.abs(_h(a))


def _ratio(err: np.ndarray, mag: np.ndarray) -> float:
    """max err / mag over entries; an entry with mag 0 counts 0 if its error is 0, else inf."""
    err, mag = np.broadcast_arrays(np.asarray(err, np.float64), np.asarray(mag, np.float64))
    if err.size == 0:
        return 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(mag > 0, err / np.where(mag > 0, mag, 1.0), np.where(err > 0, np.inf, 0.0))
    r = np.where(np.isnan(err), np.inf, r)
    return float(r.max())


def _worst(name: str, dtype: str, parts: Sequence[tuple[float, float]]) -> CheckResult:
    """Combine sub-cases (error, tolerance) into one row: the one nearest to (or past) its bound."""
    def key(p: tuple[float, float]) -> float:
        e, t = p
        return math.inf if (t == 0 and e > 0) or math.isnan(e) else (0.0 if e == 0 else e / t)
    e, t = max(parts, key=key)
    return CheckResult(name, dtype, e, t)


def _abs_delta(A: Any, B: Any, scale: float, enable: tuple[bool, ...] | None) -> np.ndarray:
    """|s| |B_k| |A_k| in each enabled block, zeros elsewhere: (d_out, d_in), the magnitude of s B A."""
    return delta_weight(_abs(A), _abs(B), abs(scale), enable)


def _forward_magnitude(x, W, A, B, scale, bias=None, mask=None, enable=None) -> np.ndarray:
    """M = |x| |W|^T + |bias| + |x * mask| (|s| |B| |A|)^T: (..., d_out), float64."""
    M = _abs(x) @ _abs(W).T
    if bias is not None:
        M = M + _abs(bias)
    if A is not None:
        xd = _abs(x) if mask is None else _abs(x) * _abs(mask)
        M = M + xd @ _abs_delta(A, B, scale, enable).T
    return M


def _forward_roundings(d_in: int, r: int, bias: bool, mask: bool) -> int:
    """Roundings chained in one output of lora_linear (and of x @ merge(W).T): d_in (x A^T) + r
    (then B^T) + 1 (s rounded to the dtype) + 1 (times s) + 1 (added to x W^T), + 1 with a mask
    (x * mask), + 1 with a bias. docs/math.md, "Merging"."""
    return d_in + r + 3 + int(bias) + int(mask)


def _grad_roundings(N: int, d_in: int, d_out: int, rows_A: int) -> int:
    """An upper bound on the roundings chained in any gradient entry of lora_linear:
    dL/dx: d_out (G W) + q (G_k B_k) + n r (then A) + 4 (s rounded, times s, times mask, sum);
    dL/dA: q + N + 3; dL/dB: d_in + N + 3; dL/dW, dL/dbias: N. All <= N + d_in + d_out + n r + 4."""
    return N + d_in + d_out + rows_A + 4


def _vjps(fun: Callable, x, W, A, B, scale, bias, mask, enable, G):
    """(y, (dx, dW, dA, db... )) of fun(x, W, A, B, scale, bias, mask, enable) for upstream G."""
    f = lambda x_, W_, A_, B_, b_: fun(x_, W_, A_, B_, scale, b_, mask, enable)  # noqa: E731
    vjp, y = autograd.make_vjp(f, argnum=(0, 1, 2, 3, 4))(x, W, A, B, bias)
    return y, tuple(vjp(G))


def _T(a: Any) -> Any:
    """matrix_transpose in the array's own namespace."""
    return namespace(a).matrix_transpose(a)


def _dev(*arrays: Any) -> list[Any]:
    """Host arrays moved to the current backend."""
    return [None if a is None else asarray(a) for a in arrays]


# ----------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------


def _case(rng: np.random.Generator, dtype: str, *, d_in=48, d_out=36, r=8, batch=(2, 5),
          enable=None, mask=False, bias=True, alpha=12.0) -> LoraCase:
    """A random case with entries uniform in [-1, 1] (host NumPy), drawn from the running ``rng``
    (mask first). The scale is rsLoRA's alpha / sqrt(r), not a power of two, so that rounding it
    into float32 is exercised; the mask is inverted dropout with p = 1/4."""
    case = LoraCase(d_in=d_in, d_out=d_out, r=r, alpha=alpha, batch_shape=batch, use_rslora=True,
                    has_bias=bias, dropout_p=0.25 if mask else None, enable_lora=enable, dtype=dtype)
    return case.draw(rng, entries=uniform_entries(), order=("mask", "x", "W", "A", "B", "bias"))


QV = (True, False, True)  # loralib MergedLinear on GPT-2's fused qkv: adapt q and v


# ----------------------------------------------------------------------------------------------
# The checks
# ----------------------------------------------------------------------------------------------


def check_merge_equivalence(rng: np.random.Generator, dtype: str, enable=None) -> CheckResult:
    """lora_linear(x, W, A, B, s) == x @ merge(W, A, B, s).T (+ bias), both weight layouts.
    Each side is within gamma_n M of the exact value, so they differ by at most 2 gamma_n M."""
    c = _case(rng, dtype, enable=enable)
    x, W, A, B, b = _dev(c.x, c.W, c.A, c.B, c.bias)
    y = _h(lora_linear(x, W, A, B, c.scale, b, enable_lora=enable))
    M = _forward_magnitude(c.x, c.W, c.A, c.B, c.scale, c.bias, enable=enable)
    tol = 2 * tolerance(dtype, _forward_roundings(c.d_in, c.r, True, False))
    parts = []
    for fifo in (False, True):
        W_stored = asarray(np.ascontiguousarray(c.W.T)) if fifo else W
        merged = merge(W_stored, A, B, c.scale, enable_lora=enable, fan_in_fan_out=fifo)
        W_eff = merged if fifo else _T(merged)                                 # (d_in, d_out)
        y_m = _h(x @ W_eff + b)
        parts.append((_ratio(np.abs(y - y_m), M), tol))
    label = "merge: x @ merge(W).T == lora_linear" + (" (enable_lora q,v)" if enable else "")
    return _worst(label, dtype, parts)


def check_zero_init(rng: np.random.Generator, dtype: str) -> list[CheckResult]:
    """B = 0 (kaiming and gaussian init): output == base output exactly, dL/dA == 0 exactly, and
    dL/dB == s G^T (x A^T) (two computations of one sum: 2 gamma_{d_in + N + 2})."""
    out, dA_max, dB_parts = [], 0.0, []
    for init in ("kaiming", "gaussian"):
        c = _case(rng, dtype, mask=True)
        A, B = init_lora(c.d_in, c.d_out, c.r, init=init, rng=rng, dtype=dtype)  # on the backend
        x, W, b, mask, G = _dev(c.x, c.W, c.bias, c.mask, rng.uniform(-1, 1, c.x.shape[:-1] + (c.d_out,)).astype(dtype))
        y, (_, _, dA, dB, _) = _vjps(lora_linear, x, W, A, B, c.scale, b, mask, None, G)
        base = _h(x @ _T(W) + b)
        out.append(float(np.max(np.abs(_h(y) - base))))
        dA_max = max(dA_max, float(np.max(np.abs(_h(dA)))))
        X = (_h(c.x) * _h(c.mask)).reshape(-1, c.d_in)                        # (N, d_in), exact in float64 for float32
        Gf = _h(G).reshape(-1, c.d_out)                                       # (N, d_out)
        expected = c.scale * (Gf.T @ (X @ _h(A).T))                           # (d_out, r)
        mag = abs(c.scale) * (np.abs(Gf).T @ (np.abs(X) @ _abs(A).T))
        n = c.d_in + c.n_tokens + 3                                                   # + 1: x * mask
        dB_parts.append((_ratio(np.abs(_h(dB) - expected), mag), 2 * tolerance(dtype, n)))
    return [CheckResult("zero init: output == base output (exact)", dtype, max(out), 0.0),
            CheckResult("zero init: dL/dA == 0 (exact)", dtype, dA_max, 0.0),
            _worst("zero init: dL/dB == s G^T (x A^T)", dtype, dB_parts)]


def check_rank(rng: np.random.Generator, dtype: str) -> CheckResult:
    """rank(s B A) <= min(r, d_in, d_out), counting singular values above a derived tolerance:
    the computed s B A is within gamma_{r+2} |s||B||A| of a rank-r matrix (Weyl), plus SciPy's SVD
    backward error, taken as gamma_{m n}(float64) sigma_1. Error: sigma_{k+1} / ||M||_F, k the bound."""
    import scipy.linalg

    parts = []
    for d_in, d_out, r, enable in ((48, 36, 8, None), (10, 6, 8, None), (48, 36, 4, QV)):
        c = _case(rng, dtype, d_in=d_in, d_out=d_out, r=r, enable=enable)
        A, B = _dev(c.A, c.B)
        dW = _h(delta_weight(A, B, c.scale, enable))
        sv = scipy.linalg.svdvals(dW)
        norm = float(np.linalg.norm(_abs_delta(c.A, c.B, c.scale, enable)))
        tol = tolerance(dtype, r + 2) * norm + tolerance("float64", dW.size) * sv[0]
        k = min((1 if enable is None else sum(enable)) * r, d_in, d_out)
        tail = float(sv[k]) if k < sv.size else 0.0
        parts.append((tail / norm, tol / norm))
    return _worst("rank(s B A) <= min(r, d_in, d_out)", dtype, parts)


def check_parameter_count(rng: np.random.Generator, dtype: str) -> CheckResult:
    """r (d_in + d_out) == A.size + B.size (Section 5.1's 2 L d_model r when square), exact."""
    wrong = 0
    for d_in, d_out, r in ((48, 36, 8), (10, 6, 8), (768, 768, 4)):
        A, B = init_lora(d_in, d_out, r, rng=rng, dtype=dtype)
        wrong += abs(lora_parameter_count(d_in, d_out, r) - (math.prod(A.shape) + math.prod(B.shape)))
    return CheckResult("parameter count r (d_in + d_out)", dtype, float(wrong), 0.0)


def merge_unmerge_drift(W: Any, A: Any, B: Any, scale: float, cycles: int, *,
                        enable_lora: tuple[bool, ...] | None = None,
                        fan_in_fan_out: bool = False) -> tuple[float, float, float]:
    """Apply ``W <- unmerge(merge(W))`` ``cycles`` times; measure how far W drifts.

    Returns ``(max_abs, relative, bound)``: the largest ``|W_k - W|``; the largest
    ``|W_k - W| / (|W| + |s B A|)`` entrywise; and its derived bound
    ``k gamma_2 (1 + gamma_{2(k-1)})`` (docs/math.md, "Unmerging").
    """
    cycles = positive_int(cycles, "cycles")
    kw = {"enable_lora": enable_lora, "fan_in_fan_out": fan_in_fan_out}
    Wk = W
    for _ in range(cycles):
        Wk = unmerge(merge(Wk, A, B, scale, **kw), A, B, scale, **kw)
    D = _abs(delta_weight(A, B, scale, enable_lora))
    D = D.T if fan_in_fan_out else D
    err = np.abs(_h(Wk) - _h(W))
    dtype = str(to_numpy(W).dtype)
    bound = cycles * tolerance(dtype, 2) * (1.0 + tolerance(dtype, 2 * (cycles - 1)))
    return float(err.max()), _ratio(err, _abs(W) + D), bound


def check_unmerge(rng: np.random.Generator, dtype: str, cycles: int) -> list[CheckResult]:
    """unmerge(merge(W)) within gamma_2 (|W| + |s B A|) of W; ``cycles`` cycles within
    k gamma_2 (1 + gamma_{2(k-1)}) of it. Both layouts, plain and enable_lora."""
    one, many = [], []
    for enable, fifo in ((None, False), (None, True), (QV, False), (QV, True)):
        c = _case(rng, dtype, enable=enable)
        W_stored = np.ascontiguousarray(c.W.T) if fifo else c.W
        W, A, B = _dev(W_stored, c.A, c.B)
        _, rel, bound = merge_unmerge_drift(W, A, B, c.scale, 1, enable_lora=enable, fan_in_fan_out=fifo)
        one.append((rel, bound))
        _, rel, bound = merge_unmerge_drift(W, A, B, c.scale, cycles, enable_lora=enable, fan_in_fan_out=fifo)
        many.append((rel, bound))
    return [_worst("unmerge(merge(W)) == W", dtype, one),
            _worst(f"merge/unmerge drift, {cycles} cycle{'' if cycles == 1 else 's'}", dtype, many)]


def check_scaling() -> CheckResult:
    """s = alpha / r and alpha / sqrt(r) (rsLoRA); rank_pattern / alpha_pattern: first matching
    key wins, regex keys allowed. Error: the number of wrong answers (exact)."""
    wrong = 0
    for alpha, r in ((16, 8), (8, 3), (32, 64), (1.5, 7)):
        wrong += lora_scale(alpha, r) != alpha / r
        wrong += lora_scale(alpha, r, use_rslora=True) != alpha / math.sqrt(r)
    config = LoraConfig(r=8, alpha=16, rank_pattern={r"h\.[0-2]\.attn\.c_attn": 2, "c_attn": 4, "attn.c_attn": 6},
                        alpha_pattern={"c_fc": 32})
    expected = {"transformer.h.1.attn.c_attn": (2, 16 / 2), "transformer.h.7.attn.c_attn": (4, 16 / 4),
                "transformer.h.7.attn.xc_attn": (8, 16 / 8), "transformer.h.7.mlp.c_fc": (8, 32 / 8)}
    for name, (rank, scale) in expected.items():
        wrong += config.rank_for(name) != rank
        wrong += config.scale_for(name) != scale
    return CheckResult("scale alpha/r, rsLoRA alpha/sqrt(r), patterns", "-", float(wrong), 0.0)


def check_vjps_vs_trace(rng: np.random.Generator, dtype: str, variant: str) -> CheckResult:
    """Hand-written VJPs (on the current backend) == autograd.numpy tracing the undecorated
    forward ``lora_linear.fun`` (on NumPy): 2 gamma_L of the VJPs evaluated on absolute values."""
    enable, mask = (QV, True) if variant == "enable_lora, dropout" else (None, False)
    c = _case(rng, dtype, enable=enable, mask=mask)
    G = rng.uniform(-1.0, 1.0, size=c.x.shape[:-1] + (c.d_out,)).astype(dtype)
    dev = _dev(c.x, c.W, c.A, c.B, c.bias, c.mask, G)
    _, hand = _vjps(lora_linear, *dev[:4], c.scale, dev[4], dev[5], enable, dev[6])
    _, traced = _vjps(lora_linear.fun, c.x, c.W, c.A, c.B, c.scale, c.bias, c.mask, enable, G)
    _, mags = _vjps(lora_linear, _abs(c.x), _abs(c.W), _abs(c.A), _abs(c.B), abs(c.scale), _abs(c.bias),
                    _abs(c.mask), enable, np.abs(G.astype(np.float64)))
    tol = 2 * tolerance(dtype, _grad_roundings(c.n_tokens, c.d_in, c.d_out, c.A.shape[0]))
    parts = [(_ratio(np.abs(_h(h) - _h(t)), m), tol) for h, t, m in zip(hand, traced, mags)]
    return _worst(f"VJPs == autograd.numpy trace ({variant})", dtype, parts)


def check_vjps_vs_differences(rng: np.random.Generator, dtype: str) -> CheckResult:
    """Hand-written VJPs == central differences, for x, W, A, B and bias in turn.

    lora_linear is linear in each argument P alone, so the central difference along v = P,
    ``(f(2P) - f(0)) / 2``, equals J P exactly in exact arithmetic (and 2P, 0 are exact in
    floating point): its only error is rounding, bounded by gamma_n (M(2P) + M(0)) / 2 + u |fd|.
    Compared as scalars: <G, fd> against <VJP(G), P>, relative to <|J|^T |G|, |P|>.
    """
    c = _case(rng, dtype, enable=QV, mask=True)
    G = rng.uniform(-1.0, 1.0, size=c.x.shape[:-1] + (c.d_out,)).astype(dtype)
    host = [c.x, c.W, c.A, c.B, c.bias]
    dev = _dev(*host, c.mask, G)
    n_fwd = _forward_roundings(c.d_in, c.r, True, True)
    L = _grad_roundings(c.n_tokens, c.d_in, c.d_out, c.A.shape[0])
    _, vjps = _vjps(lora_linear, *dev[:4], c.scale, dev[4], dev[5], QV, dev[6])
    _, mags = _vjps(lora_linear, *[_abs(a) for a in host[:4]], abs(c.scale), _abs(c.bias), _abs(c.mask), QV,
                    np.abs(G.astype(np.float64)))
    parts = []
    for i in range(5):
        def f(P, i=i):
            args = list(dev[:5])
            args[i] = P
            return lora_linear(args[0], args[1], args[2], args[3], c.scale, args[4], dev[5], QV)

        P = dev[i]
        fd = _h((f(P * 2.0) - f(P * 0.0)) * 0.5)                              # = J P up to rounding
        def mag(scale_P, i=i):
            args = [_abs(a) for a in host]
            args[i] = args[i] * scale_P
            return _forward_magnitude(args[0], args[1], args[2], args[3], c.scale, args[4], c.mask, QV)
        # |fd - J P| <= (gamma_n M(2P) + gamma_n M(0)) / 2 + gamma_1 |fd|: two forwards, one subtraction.
        e_fd = tolerance(dtype, n_fwd) * (mag(2.0) + mag(0.0)) / 2 + tolerance(dtype, 1) * np.abs(fd)
        g = np.abs(G.astype(np.float64))
        K = g.size
        s_fd = float(np.sum(_h(G) * fd))
        vjp, Pa = _h(vjps[i]), _abs(host[i])
        s_vjp = float(np.sum(vjp * _h(host[i])))
        Z = float(np.sum(Pa * mags[i]))
        bound = (float(np.sum(g * e_fd)) + tolerance("float64", K) * float(np.sum(g * np.abs(fd)))
                 + tolerance(dtype, L) * Z + tolerance("float64", Pa.size) * float(np.sum(np.abs(vjp) * Pa)))
        parts.append((abs(s_fd - s_vjp) / Z, bound / Z))
    return _worst("VJPs == central differences (x, W, A, B, bias)", dtype, parts)


def check_pissa(rng: np.random.Generator, dtype: str) -> list[CheckResult]:
    """PiSSA: the adapted output at init equals the base output (2 gamma_{d_in + 2r + 7}); in
    float64, ||W - s B A||_F equals the tail singular values' norm (Eckart-Young) up to the SVDs'
    backward errors (gamma_{m n}(float64) ||W||_F each) and the rounding of the residual."""
    import scipy.linalg

    c = _case(rng, dtype, r=6)
    W, x, b = _dev(c.W, c.x, c.bias)
    A, B, W_res = pissa_init(W, c.r, c.scale)
    y = _h(lora_linear(x, W_res, A, B, c.scale, b))
    base = _h(x @ _T(W) + b)
    abs_sBA = abs(c.scale) * (_abs(B) @ _abs(A))
    M = _abs(c.x) @ (_abs(c.W) + 2 * abs_sBA).T + _abs(c.bias)
    rows = [CheckResult("PiSSA: output at init == base output", dtype, _ratio(np.abs(y - base), M),
                        2 * tolerance(dtype, c.d_in + 2 * c.r + 7))]
    if dtype == "float64":
        sv = scipy.linalg.svdvals(c.W)
        tail = float(np.sqrt(np.sum(sv[c.r:] ** 2)))
        norm_W = float(np.linalg.norm(c.W))
        bound = (2 * tolerance("float64", c.W.size) * norm_W
                 + tolerance("float64", c.r + 3) * float(np.linalg.norm(np.abs(c.W) + abs_sBA)))
        rows.append(CheckResult("PiSSA: ||W - s B A||_F == tail singular values", dtype,
                                abs(float(np.linalg.norm(_h(W_res))) - tail) / norm_W, bound / norm_W))
    return rows


def check_bad_input(rng: np.random.Generator) -> CheckResult:
    """Bad input raises ValueError/TypeError (never a wrong number). Error: calls that did not."""
    x, W, A, B = _dev(*(rng.uniform(-1, 1, s) for s in ((3, 5), (4, 5), (2, 5), (4, 2))))
    A6, B3 = _dev(rng.uniform(-1, 1, (2, 6)), rng.uniform(-1, 1, (3, 2)))
    calls = [
        lambda: LoraConfig(r=0, alpha=8), lambda: LoraConfig(r=2.5, alpha=8),
        lambda: LoraConfig(r=4, alpha=math.inf), lambda: LoraConfig(r=4, alpha=8, dropout=1.0),
        lambda: lora_linear(x, W, A6, B, 1.0), lambda: lora_linear(x, W, A, B3, 1.0),
        lambda: lora_linear(asarray(np.ones((3, 5), np.int64)), W, A, B, 1.0),
        lambda: lora_linear(asarray(np.ones((3, 5), np.float32)), W, A, B, 1.0),
        lambda: lora_linear(x, W, A, B, 1.0, None, asarray(np.ones((2, 5)))),
        lambda: lora_linear(x, W, A, B, math.nan),
        lambda: merge(W, A6, B, 1.0), lambda: merge(W, A, B, 1.0, fan_in_fan_out=True),
    ]
    missed = 0
    for call in calls:
        try:
            call()
        except (ValueError, TypeError):
            continue
        missed += 1
    return CheckResult("bad input raises ValueError/TypeError", "-", float(missed), 0.0)


def run_audit(*, seed: int = 0, dtypes: Sequence[str] = DTYPES, cycles: int = 50) -> list[CheckResult]:
    """Run every check once on the current backend; returns the rows in table order.

    ``seed`` seeds all cases; ``dtypes`` is any of ``("float64", "float32")``; ``cycles`` is the
    number of merge/unmerge cycles of the drift check.
    """
    for dt in dtypes:
        if dt not in DTYPES:
            raise ValueError(f"dtypes must be among {', '.join(DTYPES)}, got {dt!r}")
    cycles = positive_int(cycles, "cycles")
    rng = np.random.default_rng(seed)
    rows: list[CheckResult] = []
    for dt in dtypes:
        rows.append(check_merge_equivalence(rng, dt))
        rows.append(check_merge_equivalence(rng, dt, enable=QV))
        rows.extend(check_zero_init(rng, dt))
        rows.append(check_rank(rng, dt))
        rows.append(check_parameter_count(rng, dt))
        rows.extend(check_unmerge(rng, dt, cycles))
        rows.append(check_vjps_vs_trace(rng, dt, "plain"))
        rows.append(check_vjps_vs_trace(rng, dt, "enable_lora, dropout"))
        rows.append(check_vjps_vs_differences(rng, dt))
        rows.extend(check_pissa(rng, dt))
    rows.append(check_scaling())
    rows.append(check_bad_input(rng))
    return rows


def format_table(rows: Sequence[CheckResult], *, backend: str | None = None, seed: int = 0) -> str:
    """The audit table as text: check, dtype, max error, tolerance, pass; then a summary line."""
    backend = backend or get_backend()
    width = max(len(r.check) for r in rows)
    lines = [f"lora-ref audit: backend {backend}, seed {seed}",
             "(error and tolerance are relative to each check's magnitude; tolerances from gamma_n, docs/math.md)",
             "",
             f"{'check':<{width}}  {'dtype':<7}  {'max error':>9}  {'tolerance':>9}  pass",
             f"{'-' * width}  {'-' * 7}  {'-' * 9}  {'-' * 9}  ----"]
    for r in rows:
        lines.append(f"{r.check:<{width}}  {r.dtype:<7}  {r.error:>9.2e}  {r.tolerance:>9.2e}  "
                     f"{'yes' if r.passed else 'NO'}")
    failed = sum(not r.passed for r in rows)
    lines.append("")
    lines.append(f"all {len(rows)} checks passed" if not failed else f"{failed} of {len(rows)} checks FAILED")
    return "\n".join(lines)
