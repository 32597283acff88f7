"""The precision audit: merging and unmerging LoRA in float64, float32, float16 and bfloat16.

The report it answers: "bf16: 2.4e-4 after one cycle, 1.5e-2 after 1,000" (merge_adapter then
unmerge_adapter, repeated, with PEFT on a bfloat16 Linear). One cycle replaces W by
``unmerge(merge(W))``; exact arithmetic gives W back every time. Three ways to do a cycle, with
every rounding named (``cast`` rounds to the weight's dtype, nearest even; ``fl32`` to float32):

    D32 = fl32(fl32(B @ A) * s)       the delta, from the factors widened exactly to float32
                                      (float64 weights: fl64(fl64(B @ A) * s), D = D32 below)
    "one dtype"          D = cast(D32);  merged = cast(W + D);  W' = cast(merged - D)
                         lora_ref.merge / unmerge, and PEFT when the adapters share W's dtype
    "float32 then cast"  merged = cast(fl32(W + D32));  W' = cast(fl32(merged - D32))
    "PEFT"               merged = cast(fl32(W + D32));  W' = cast(merged - cast(D32))
                         PEFT 0.21.2's LoRA Linear with float32 adapters on a 16-bit base:
                         merge does ``weight.data += delta`` (torch adds in float32, then
                         rounds), unmerge ``weight.data -= delta.to(orig_dtype)``

A sum of two float16 / bfloat16 numbers is exact in float32 (or the smaller is below half an
ulp of the larger), so ``cast(a + b)`` computed through float32 is the correctly rounded 16-bit
sum: what torch's CPU kernels and NumPy / ml_dtypes' ufuncs return (tests/test_precision.py
checks the last). NumPy's matmul on ml_dtypes.bfloat16 arrays returns float32: the delta is
never rounded to bfloat16 unless asked, so it is computed explicitly here.

The page is the same on every CPU: ``B @ A`` is summed in a fixed order with no fused
multiply-add (:func:`delta_weight32`), so every number on it, "entries moved" included, is a
function of IEEE arithmetic alone. (With a BLAS ``@`` the float32 sums followed the CPU's
vector width and FMA use, which moved the last bit of a few entries of D32, and the committed
page, compared byte for byte by its test, would differ between machines.)

In "one dtype" and "float32 then cast" the cycle is a fixed map applied to the same W' again:
once ``W' = W`` it never moves, and it gets there after one cycle in every case measured. In
"PEFT" merge adds D32 and unmerge subtracts cast(D32): the cycle moves W by about
``D32 - cast(D32)``, rounded, every time, in the same direction, so the drift grows.
:func:`generate_page` measures all three and writes docs/precision.md.

The second half of the file defines what "computing in bfloat16" means in the reference, for a
LoRA layer whose frozen base is computed in a narrower dtype than its float32 adapters (QLoRA's
recipe): :func:`narrow_linear` (the base, an autograd primitive with its roundings written out),
:func:`mixed_linear` (base + adapter, ``lora_linear``'s signature) and :func:`round_to`. Hosts
use it for a 4-bit base computed in bfloat16 (``lora_ref.quant.base_weight``, docs/quant.md).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from autograd.extend import defvjp, primitive

from .adapters import lora_delta
from .backend import asarray, dtype_name, getval, namespace, to_numpy
from .checks import float_array, positive_int, same_dtype, shape_of
from .kit.core import tolerance

__all__ = ["COMPUTE_DTYPES", "DTYPES", "WAYS", "Drift", "audit_case", "delta_weight32", "drift", "generate_page",
           "merge_cycle", "mixed_linear", "narrow_linear", "round_to"]

DTYPES = ("float64", "float32", "float16", "bfloat16")
WAYS = ("one dtype", "float32 then cast", "PEFT")
_F32 = np.float32


def _np_dtype(dtype: str) -> Any:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if dtype == "bfloat16":
        import ml_dtypes          # here, not at import: it takes about a second to import

        return ml_dtypes.bfloat16
    return np.dtype(dtype)


def _cast(x: np.ndarray, dtype: str) -> np.ndarray:
    return x.astype(_np_dtype(dtype))


def delta_weight32(A: Any, B: Any, scale: float, dtype: str) -> np.ndarray:
    """``fl(fl(B @ A) * s)`` (d_out, d_in): in float64 for a float64 weight, else in float32 from
    the factors widened exactly; not yet rounded to a 16-bit dtype.

    ``B @ A`` is summed in a fixed order, ``(..((B[:, 0] A[0]) + B[:, 1] A[1]) + ..)``, each
    product and each sum rounded (no fused multiply-add): IEEE arithmetic that every CPU does
    identically, so the page is the same everywhere. A BLAS ``@`` would pick its order and its
    use of FMA by CPU kind, and move the last bit of some entries (and the "entries moved"
    column with them). Where every product and partial sum is exact (the interop tests' factors,
    multiples of 1/64 with small numerators) the two agree bit for bit.
    """
    work = np.float64 if dtype == "float64" else _F32
    A, B = np.asarray(A).astype(work), np.asarray(B).astype(work)
    if A.ndim != 2 or B.ndim != 2 or B.shape[1] != A.shape[0]:
        raise ValueError(f"need A (r, d_in) and B (d_out, r), got A {A.shape}, B {B.shape}")
    D = B[:, :1] * A[:1, :]                                      # (d_out, d_in) the k = 0 term
    for k in range(1, A.shape[0]):
        D = D + B[:, k:k + 1] * A[k:k + 1, :]                    # one rounding per product, per sum
    return D * work(scale)


def merge_cycle(W: np.ndarray, D32: np.ndarray, dtype: str, way: str) -> tuple[np.ndarray, np.ndarray]:
    """One cycle, ``(merged, unmerged)``, both in ``dtype``, the way ``way`` rounds (module doc)."""
    if way not in WAYS:
        raise ValueError(f"way must be one of {WAYS}, got {way!r}")
    wide = np.float64 if dtype == "float64" else _F32
    if way == "one dtype":
        D = _cast(D32, dtype).astype(wide)                          # the delta rounded once
        merged = _cast(W.astype(wide) + D, dtype)                   # cast(W + D): one rounding
        return merged, _cast(merged.astype(wide) - D, dtype)        # cast(merged - D)
    merged = _cast(W.astype(wide) + D32, dtype)                     # cast(fl32(W + D32))
    sub = D32 if way == "float32 then cast" else _cast(D32, dtype).astype(wide)
    return merged, _cast(merged.astype(wide) - sub, dtype)


@dataclass(frozen=True)
class Drift:
    """``max |W_k - W|`` at each checkpoint k; the share of entries that moved by the last one;
    the first cycle k with ``W_(k+1) = W_k`` (then nothing moves again), or None."""

    checkpoints: tuple[int, ...]
    max_abs: tuple[float, ...]
    moved: float
    fixed_from: int | None


def drift(W: Any, A: Any, B: Any, scale: float, dtype: str, way: str,
          checkpoints: tuple[int, ...] = (1, 10, 100, 1000)) -> Drift:
    """Apply ``W <- unmerge(merge(W))`` up to ``max(checkpoints)`` times in ``dtype``.

    W (d_out, d_in), A (r, d_in), B (d_out, r) of any float dtype (W is cast to ``dtype`` first;
    cast it yourself to study a given 16-bit weight). A cycle is deterministic, so once W stops
    moving the remaining cycles are skipped: the result is the same.
    """
    float_array(W, "W", ("float16", "float32", "float64", "bfloat16"))
    if not checkpoints or any(positive_int(k, "checkpoints") != k for k in checkpoints):
        raise ValueError(f"checkpoints must be positive ints, got {checkpoints!r}")
    W0 = _cast(np.asarray(W), dtype)
    D32 = delta_weight32(A, B, scale, dtype)
    if D32.shape != W0.shape:
        raise ValueError(f"B @ A has shape {D32.shape} but W has shape {W0.shape}")
    ref = W0.astype(np.float64)
    Wk, fixed, out = W0, None, []
    for k in range(1, max(checkpoints) + 1):
        if fixed is None:
            _, nxt = merge_cycle(Wk, D32, dtype, way)
            if nxt.tobytes() == Wk.tobytes():
                fixed = k - 1 if k > 1 else 0
            Wk = nxt
        if k in checkpoints:
            out.append(float(np.max(np.abs(Wk.astype(np.float64) - ref))))
    moved = float(np.mean(Wk.astype(np.float64) != ref))
    return Drift(tuple(sorted(checkpoints)), tuple(out), moved, fixed)


def audit_case(d: int = 512, r: int = 8, alpha: float = 16.0, seed: int = 0) -> tuple[np.ndarray, ...]:
    """The page's case, float64: W (d, d) ~ U(-1/sqrt(d), 1/sqrt(d)) (nn.Linear's initialisation),
    A (r, d) ~ U(-1/sqrt(d), 1/sqrt(d)), B (d, r) ~ N(0, 0.01^2) (an adapter a few steps into
    training), and s = alpha / r. Returns (W, A, B, s)."""
    rng = np.random.default_rng(seed)
    bound = 1.0 / np.sqrt(d)
    W = rng.uniform(-bound, bound, (d, d))
    A = rng.uniform(-bound, bound, (r, d))
    B = rng.normal(0.0, 0.01, (d, r))
    return W, A, B, alpha / r


# ============================================================================================
# Computing in a narrower dtype: what "bfloat16 compute" means (QLoRA's recipe)
# ============================================================================================
#
# QLoRA trains float32 adapters on a 4-bit base computed in bfloat16 inside a float32 model
# (bitsandbytes' Linear4bit with compute_dtype=bfloat16 under PEFT). lora-ref defines it as what
# transformers + bitsandbytes 0.50.2 + PEFT compute on the CPU, rounding by rounding (c is the
# compute dtype; rnd rounds to it, nearest even, and widens back to x's dtype):
#
#   y = rnd( rnd(x) rnd(W)^T + rnd(b) ) + s ((x * M) A^T) B^T                      forward
#       Linear4bit: x.to(c), the weight dequantised to c, the bias cast to c, torch's CPU GEMM in
#       c -- products of two c numbers are exact in float32 (bfloat16 8 x 8 bits, float16 11 x 11
#       <= 24), sums in float32, the output rounded once, bias included (held against torch in
#       tests/interop/test_qlora_hosts.py) -- then .to(float32); PEFT's adapter branch on the unrounded x, in
#       float32 (lora_ref.adapters.lora_delta).
#   dL/dx = rnd( rnd(G) rnd(W) ) + s ((G B) A) * M                                  backward
#       MatMul4Bit.backward: grad.to(c) @ W in c, rounded, cast back to float32; A and B get
#       lora_delta's VJPs from the float32 G. W and b are frozen: no gradient.
#
# "Rounding is the identity" (straight-through) is the derivative every implementation uses;
# autograd.numpy tracing the forward derives exactly these roundings (its cast VJP casts the
# cotangent), so the hand-written VJP is checked against it bit for bit, and against finite
# differences where c is x's own dtype (no rounding).

COMPUTE_DTYPES = DTYPES                      # the dtypes a product may be computed in: the same four
_WIDTH = {"float64": 3, "float32": 2, "float16": 1, "bfloat16": 1}


def round_to(x: Any, dtype: str) -> Any:
    """``x`` rounded to ``dtype`` (nearest, ties to even) and widened back: x's dtype, x's backend.
    NumPy arrays (and autograd's boxes of them, traced) cast through ml_dtypes; other backends,
    which have no bfloat16, round on the host."""
    raw = getval(x)
    if dtype == dtype_name(raw.dtype):
        return x
    if isinstance(raw, np.ndarray):
        return x.astype(_np_dtype(dtype)).astype(raw.dtype)
    return asarray(_cast(to_numpy(raw), dtype).astype(dtype_name(raw.dtype)))


def _narrow_linear(x: Any, W: Any, bias: Any = None, compute_dtype: str = "bfloat16") -> Any:
    """The undecorated forward (see :func:`narrow_linear`); autograd.numpy can trace it."""
    _check_narrow(x, W, bias, compute_dtype)
    xp, c = namespace(x, W, bias), compute_dtype
    y = round_to(x, c) @ xp.matrix_transpose(round_to(W, c))       # (..., d_out) exact products, wide sums
    if bias is not None:
        y = y + round_to(bias, c)
    return round_to(y, c)                                          # the output rounded once to c


narrow_linear = primitive(_narrow_linear)
narrow_linear.__doc__ = """``rnd(rnd(x) rnd(W)^T + rnd(b))``: a frozen linear layer computed in
    ``compute_dtype`` (rnd rounds to it, nearest even, and widens back; module comment above).

    x (..., d_in), W (d_out, d_in), bias (d_out,) or None: one dtype, float32 or float64;
    ``compute_dtype`` one of :data:`COMPUTE_DTYPES`, not wider than x's. Returns (..., d_out) in
    x's dtype. Gradient for x only (``rnd(rnd(G) rnd(W))``, bitsandbytes' backward); W and bias
    are frozen (asking for theirs is a TypeError). With compute_dtype equal to x's dtype it is
    ``x W^T + b``.
    """


def _narrow_vjp_x(ans, x, W, bias=None, compute_dtype="bfloat16"):
    c = compute_dtype
    return lambda g: round_to(round_to(g, c) @ round_to(W, c), c)   # (..., d_in) dL/dx = rnd(rnd(G) rnd(W))


def _frozen(what: str) -> Any:
    def maker(*args: Any, **kwargs: Any) -> Any:
        raise TypeError(f"narrow_linear is not differentiable with respect to {what}")
    return maker


defvjp(narrow_linear, _narrow_vjp_x, _frozen("W (a frozen base)"), _frozen("bias (frozen with the base)"))


def mixed_linear(x: Any, W: Any, A: Any, B: Any, scale: float, bias: Any = None, dropout_mask: Any = None,
                 enable_lora: Any = None, *, compute_dtype: str) -> Any:
    """A LoRA projection whose frozen base is computed in ``compute_dtype`` and whose adapter in
    x's dtype (QLoRA's recipe): ``narrow_linear(x, W, bias) + lora_delta(x, A, B, s, mask)``,
    ``rnd(rnd(x) rnd(W)^T + rnd(b)) + s ((x * mask) A^T) B^T``. The arguments are
    :func:`lora_ref.lora_linear`'s (A and B None: no adapter), so a host can use it as its
    ``linear``; both terms are autograd primitives with hand-written VJPs."""
    y = narrow_linear(x, W, bias, compute_dtype)                          # (..., d_out) the base, in c
    return y if A is None else y + lora_delta(x, A, B, scale, dropout_mask, enable_lora)   # + s B A x


def _check_narrow(x: Any, W: Any, bias: Any, compute_dtype: Any) -> None:
    for name, a in (("x", x), ("W", W), ("bias", bias)):
        if a is not None or name != "bias":
            float_array(a, name, ("float32", "float64"))
    same_dtype(("x", x), ("W", W), ("bias", bias))
    wide = dtype_name(getval(x).dtype)
    if compute_dtype not in COMPUTE_DTYPES or _WIDTH[compute_dtype] > _WIDTH[wide]:
        raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES} and not wider than x's {wide}, "
                         f"got {compute_dtype!r}")
    xs, ws = shape_of(x), shape_of(W)
    if len(ws) != 2 or not xs or xs[-1] != ws[1]:
        raise ValueError(f"need x (..., d_in) and W (d_out, d_in), got x {xs}, W {ws}")
    if bias is not None and shape_of(bias) != (ws[0],):
        raise ValueError(f"bias must have shape ({ws[0]},), got {shape_of(bias)}")


# ============================================================================================
# docs/precision.md, generated
# ============================================================================================


def _rows() -> list[tuple[str, str, Drift, float]]:
    W, A, B, s = audit_case()
    rows = []
    for dtype in DTYPES:
        ways = WAYS if dtype in ("float16", "bfloat16") else WAYS[:1]
        for way in ways:
            D = np.abs(delta_weight32(np.abs(A), np.abs(B), s, dtype).astype(np.float64))
            bound = tolerance(dtype, 2) * float(np.max(np.abs(_cast(W, dtype).astype(np.float64)) + D))
            rows.append((dtype, way, drift(W, A, B, s, dtype, way), bound))
    return rows


def _g(x: float) -> str:
    """2 significant digits: 0.0037, 2.4e-4."""
    if x == 0 or x >= 1e-3:
        return f"{x:.2g}"
    mantissa, exponent = f"{x:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def generate_page() -> str:
    """docs/precision.md, every number measured now (the tests regenerate it and compare)."""
    rows = _rows()
    find = {(d, w): r for d, w, r, _ in rows}
    peft, one = find[("bfloat16", "PEFT")], find[("bfloat16", "one dtype")]
    f32 = find[("bfloat16", "float32 then cast")]
    within = all(r.max_abs[0] <= bound for _, _, r, bound in rows)
    lines = [
        "# Precision: merging and unmerging in float16 and bfloat16",
        "",
        "<!-- generated by `python -m lora_ref.precision --write docs/precision.md`; edit lora_ref/precision.py -->",
        "",
        "A user measured merge/unmerge drift in bfloat16 with PEFT (`merge_adapter` then",
        "`unmerge_adapter`, repeated): **2.4e-4 after one cycle, 1.5e-2 after 1,000**. Exact arithmetic",
        "would give W back every time. This page measures the drift for three ways of rounding a cycle",
        "([`lora_ref.precision`](../lora_ref/precision.py) writes each rounding out):",
        "",
        "| way | merge | unmerge |",
        "|---|---|---|",
        "| one dtype (`lora_ref.merge`) | `cast(W + D)` | `cast(merged - D)`, the same `D = cast(D32)` |",
        "| float32 then cast | `cast(fl32(W + D32))` | `cast(fl32(merged - D32))` |",
        "| PEFT, float32 adapters on a 16-bit base | `cast(fl32(W + D32))` | `cast(merged - cast(D32))` |",
        "",
        "`D32 = fl32(fl32(B @ A) * s)` is the delta from the factors widened exactly to float32 (float64",
        "for a float64 weight), `cast` rounds to the weight's dtype (nearest even). PEFT 0.21.2's merge",
        "does `weight.data += delta` with the float32 delta (torch adds in float32, then rounds) and its",
        "unmerge `weight.data -= delta.to(orig_dtype)`: the two steps use different deltas.",
        "",
        "The case: W 512 x 512 drawn as `nn.Linear` initialises it (uniform in +-1/sqrt(512)), A (8 x 512)",
        "the same way, B (512 x 8) normal with standard deviation 0.01, s = 16 / 8 = 2; seed 0",
        "([`audit_case`](../lora_ref/precision.py)).",
        "",
        "| dtype | way | max \\|W_1 - W\\| | max \\|W_10 - W\\| | max \\|W_100 - W\\| | max \\|W_1000 - W\\| "
        "| entries moved | fixed from cycle | one-cycle bound `gamma_2 max(\\|W\\| + \\|D\\|)` |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for dtype, way, r, bound in rows:
        fixed = "never (1,000)" if r.fixed_from is None else str(r.fixed_from)
        lines.append(f"| {dtype} | {way} | " + " | ".join(_g(x) for x in r.max_abs)
                     + f" | {100 * r.moved:.1f}% | {fixed} | {_g(bound)} |")
    lines += [
        "",
        "## What it answers",
        "",
        f"* The drift that grows is PEFT's. In bfloat16 it is {_g(peft.max_abs[0])} after one cycle and "
        f"{_g(peft.max_abs[-1])} after 1,000",
        "  here (the report: 2.4e-4 and 1.5e-2; the size depends on how large `s B A` is next to W).",
        "  Merge adds D32 and unmerge subtracts `cast(D32)`, so each cycle moves W by about",
        "  `D32 - cast(D32)`, rounded, in the same direction every time, until the steps round away.",
        f"* Rounding the delta once and using it both ways (one dtype) gives {_g(one.max_abs[0])} after one "
        f"cycle and {_g(one.max_abs[-1])} after",
        "  1,000: the cycle is a fixed map, W_1 is its fixed point, nothing accumulates. Merging in",
        f"  float32 and casting both ways does the same ({_g(f32.max_abs[0])} and {_g(f32.max_abs[-1])}). "
        "Either fix makes merge and",
        "  unmerge use one delta.",
        "* One cycle stays within `gamma_2 (|W| + |D|)` (docs/math.md) "
        + ("in every row: only repeated cycles with two different deltas go beyond it."
           if within else "NOT in every row: see the table."),
        "",
        "## What `lora_ref.merge` needs for bfloat16",
        "",
        "`lora_ref.merge` and `unmerge` accept float16, float32 and float64 today. For bfloat16",
        "(ml_dtypes) arrays they would need: bfloat16 among the accepted dtypes",
        "(`lora_ref.checks.FLOAT_DTYPES` and lora.py's own check); the delta rounded to bfloat16",
        "explicitly, because NumPy's `B @ A` on bfloat16 arrays returns float32 (and `W + float32`",
        "would then silently promote the merged weight to float32); and `lora_ref.testing.tolerance`",
        "works as it is (`numpy.finfo` knows ml_dtypes' bfloat16: u = 2^-8). The arithmetic needs",
        "nothing else: ml_dtypes' `+` and `-` round each bfloat16 result correctly.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_ref.precision", description=__doc__.split("\n")[0])
    parser.add_argument("--write", metavar="PATH", help="write the page here (default: print it)")
    args = parser.parse_args(argv)
    page = generate_page()
    if args.write:
        Path(args.write).write_text(page)
    else:
        sys.stdout.write(page)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
