"""The kit for LoRA on a linear map: plain LoRA, rsLoRA and fused (``enable_lora``) projections.

:func:`check_lora_linear` runs a fixed set of named properties (:data:`PROPERTIES`) against your
layer, given as a Python callable on NumPy arrays, in float64 and float32, and returns a
:class:`~lora_ref.kit.core.LoraCheckReport`. Every property compares your output with lora-ref's,
computed in float64 from the same inputs, within ``reference_rtol(dtype, n) * M``: n from
:func:`rounding_counts`, M from :func:`lora_magnitudes`. The cases are
:class:`lora_ref.cases.LoraCase` records.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
from autograd import make_vjp

from ..backend import to_numpy
from ..cases import LoraCase, normal_entries
from ..checks import positive_int
from ..lora import delta_weight, lora_linear, merge as _ref_merge
from .core import Call, LoraCheckReport, Output, property_call, ref_output, run_check

__all__ = ["DEFAULT_PROPERTIES", "PROPERTIES", "assert_lora_linear_matches", "check_lora_linear",
           "lora_linear_magnitude", "lora_magnitudes", "reference_outputs", "rounding_counts"]


# ============================================================================================
# Rounding counts and magnitudes
# ============================================================================================


def rounding_counts(d_in: int, d_out: int, r: int, n_tokens: int, n_enabled: int = 1) -> dict[str, int]:
    """How many roundings any one term of each LoRA output can suffer, in any evaluation order.

    ``r`` is the rank of one block (``B.shape[1]``), ``n_enabled`` the number of enabled blocks
    of a fused (``enable_lora``) adapter, ``n_tokens`` the number N of rows of x once its leading
    dimensions are flattened. Each count is ``L1 + L2 + 6``, where L1 and L2 are the lengths of
    the (at most two) chained sums the quantity is made of. A term of the longest chain, the
    adapter branch of y ``s * mask_j x_j A_kj B_ik``, goes through ``L1 - 1 + L2 - 1`` additions
    inside the two sums, 3 multiplications (by the mask, by A, by B), the multiplication by s,
    the rounding of s itself (at most 3: the square root of rsLoRA, the division, the cast to the
    dtype) and the one addition joining it to the base branch: ``L1 + L2 + 6``. Every other term
    (the base branch, the bias, a merged weight's entries) goes through fewer. Evaluating through
    the merged weight ``x (W + s B A)^T`` instead needs the same count.

    ===========  ==========================  ====================================================
    output       chained sums                count
    ===========  ==========================  ====================================================
    y            d_in, then r                ``d_in + r + 6``
    W_merged     r                           ``r + 6``
    dx           d_out, then n_enabled r     ``d_out + n_enabled r + 6``
    dA           d_out, then N               ``d_out + N + 6``
    dB           d_in, then N                ``d_in + N + 6``
    ===========  ==========================  ====================================================
    """
    d_in, d_out, r = positive_int(d_in, "d_in"), positive_int(d_out, "d_out"), positive_int(r, "r")
    n_tokens, n_enabled = positive_int(n_tokens, "n_tokens"), positive_int(n_enabled, "n_enabled")
    return {"y": d_in + r + 6, "W_merged": r + 6, "dx": d_out + n_enabled * r + 6,
            "dA": d_out + n_tokens + 6, "dB": d_in + n_tokens + 6}


def lora_linear_magnitude(x: Any, W: Any, A: Any = None, B: Any = None, scale: float = 1.0,
                          bias: Any = None, dropout_mask: Any = None,
                          enable_lora: tuple[bool, ...] | None = None) -> np.ndarray:
    """``M = |x| |W|^T + |bias| + |s| (|x * mask| |A|^T) |B|^T`` in float64, shape (..., d_out).

    The magnitude against which rounding errors of :func:`lora_ref.lora_linear` (either
    evaluation order, merged or not) are measured. ``W`` is (d_out, d_in). With ``enable_lora``
    (a fused adapter) the adapter term is summed block by block, as :func:`lora_ref.lora_linear`
    does, so disabled blocks contribute nothing.
    """
    return lora_magnitudes(x, W, A, B, scale, bias=bias, dropout_mask=dropout_mask,
                           enable_lora=enable_lora)["y"]


def lora_magnitudes(x: Any, W: Any, A: Any, B: Any, scale: float, *, bias: Any = None,
                    dropout_mask: Any = None, enable_lora: tuple[bool, ...] | None = None,
                    dy: Any = None) -> dict[str, np.ndarray]:
    """Magnitudes of every LoRA output: the reference evaluated on absolute values, in float64.

    Every LoRA output is a sum of products of the inputs, so evaluating the same formulas on
    ``|x|, |W|, |A|, |B|, |s|, |bias|, |mask|`` (and ``|dy|``) gives the sum of the absolute values
    of its terms, the ``M`` of the error bounds. ``W`` is (d_out, d_in). Returns a dict with
    ``"y"`` (..., d_out) and ``"W_merged"`` (d_out, d_in), plus, when the upstream gradient ``dy``
    (..., d_out) is given, ``"dx"`` (..., d_in), ``"dA"`` (n r, d_in) and ``"dB"`` (n q, r).
    ``A`` and ``B`` may be None (no adapter: only ``"y"`` and ``"W_merged"`` = ``|W|``).
    """
    absf = lambda t: None if t is None else np.abs(np.asarray(to_numpy(t), dtype=np.float64))  # noqa: E731
    x_, W_, A_, B_, b_, m_ = (absf(t) for t in (x, W, A, B, bias, dropout_mask))
    s = abs(float(scale))
    out = {"y": lora_linear(x_, W_, A_, B_, s, b_, m_, enable_lora)}
    if A_ is None:
        out["W_merged"] = W_
        return out
    out["W_merged"] = W_ + delta_weight(A_, B_, s, enable_lora, d_out=W_.shape[0] if enable_lora else None)
    if dy is not None:
        vjp, _ = make_vjp(lambda xx, AA, BB: lora_linear(xx, W_, AA, BB, s, b_, m_, enable_lora),
                          argnum=(0, 1, 2))(x_, A_, B_)
        out["dx"], out["dA"], out["dB"] = vjp(absf(dy))
    return out


def reference_outputs(x: Any, W: Any, A: Any, B: Any, scale: float, *, bias: Any = None,
                      dropout_mask: Any = None, enable_lora: tuple[bool, ...] | None = None,
                      fan_in_fan_out: bool = False, dy: Any = None) -> dict[str, np.ndarray]:
    """lora-ref's outputs in float64 (inputs are upcast exactly), with their magnitudes.

    ``W`` is in the base model's layout: (d_out, d_in), or (d_in, d_out) when ``fan_in_fan_out``.
    Returns ``"y"`` (..., d_out), ``"W_merged"`` (in W's layout) and, when ``dy`` (..., d_out) is
    given, ``"dx"``, ``"dA"``, ``"dB"`` (the vector-Jacobian products of y at dy, i.e. the
    gradients of ``sum(y * dy)``); and ``"magnitude.<name>"`` for each (see :func:`lora_magnitudes`).
    """
    f64 = lambda t: None if t is None else np.asarray(to_numpy(t), dtype=np.float64)  # noqa: E731
    x, W, A, B, bias, mask, dy = (f64(t) for t in (x, W, A, B, bias, dropout_mask, dy))
    W_math = W.T if fan_in_fan_out else W                                   # (d_out, d_in)
    out = {"y": lora_linear(x, W_math, A, B, scale, bias, mask, enable_lora),
           "W_merged": _ref_merge(W, A, B, scale, enable_lora=enable_lora, fan_in_fan_out=fan_in_fan_out)}
    if dy is not None:
        vjp, _ = make_vjp(lambda xx, AA, BB: lora_linear(xx, W_math, AA, BB, scale, bias, mask, enable_lora),
                          argnum=(0, 1, 2))(x, A, B)
        out["dx"], out["dA"], out["dB"] = vjp(dy)
    mags = lora_magnitudes(x, W_math, A, B, scale, bias=bias, dropout_mask=mask, enable_lora=enable_lora, dy=dy)
    if fan_in_fan_out:
        mags["W_merged"] = mags["W_merged"].T                               # back to (d_in, d_out)
    out.update({f"magnitude.{k}": v for k, v in mags.items()})
    return out


# ============================================================================================
# The properties
# ============================================================================================

PROPERTIES: dict[str, str] = {
    "forward": "y = x W^T + bias + (alpha/r) (x A^T) B^T, x with two leading dims",
    "forward_rslora": "the same with use_rslora=True: scale alpha/sqrt(r) (r=4, so it differs from alpha/r)",
    "zero_B_identity": "B = 0: the output equals the base layer's x W^T + bias",
    "fan_in_fan_out": "W given as (d_in, d_out) (GPT-2 Conv1D layout), square so a missed transpose is not a shape error",
    "dropout": "a dropout mask (entries 0 and 1/(1-p)) multiplies x on the adapter branch only",
    "rank_above_dim": "r = 6 above min(d_in, d_out) = 3",
    "fused_enable_lora": "loralib MergedLinear: enable_lora=(True, False, True) on a fused (12, 5) weight",
    "merge": "merge(W, A, B) = W + (alpha/r) B A",
    "merge_rslora": "merge with use_rslora=True: W + (alpha/sqrt(r)) B A",
    "merge_fan_in_fan_out": "merge with W stored (d_in, d_out): W + s (B A)^T, square W",
    "merge_fused": "merge with enable_lora=(True, False, True): each enabled row block gets s B_k A_k",
    "grad_x": "dL/dx for L = sum(y * dy), with bias and a dropout mask",
    "grad_A": "dL/dA, same case",
    "grad_B": "dL/dB, same case",
    # Last, so that each earlier property keeps its random stream (seeded by its position here).
    "rank_equals_dims": "r = d_in = d_out = 4: A and B are square, so a layout guessed from the shapes is wrong",
    "rank_equals_d_out": "r = d_out = 3, d_in = 6: B is square (A is not), the other way to guess wrong",
    "merge_rank_equals_dims": "merge with r = d_in = d_out = 4 (square A and B)",
    "merge_rank_equals_d_out": "merge with r = d_out = 3, d_in = 6 (square B)",
}
"""Every property the kit knows, with what it checks."""

DEFAULT_PROPERTIES = ("forward", "forward_rslora", "zero_B_identity", "fan_in_fan_out", "dropout",
                      "rank_above_dim", "rank_equals_dims", "rank_equals_d_out",
                      "merge", "merge_rslora", "merge_fan_in_fan_out", "merge_rank_equals_dims",
                      "merge_rank_equals_d_out", "grad_x", "grad_A", "grad_B")
"""The properties checked when ``properties`` is not given (those needing ``merge`` or ``grad`` only
when that callable is given). The fused (``enable_lora``) ones are opt-in, as many implementations
have no fused layer."""

_NEEDS = {"merge": "merge", "merge_rslora": "merge", "merge_fan_in_fan_out": "merge", "merge_fused": "merge",
          "merge_rank_equals_dims": "merge", "merge_rank_equals_d_out": "merge",
          "grad_x": "grad", "grad_A": "grad", "grad_B": "grad"}

_FORWARD = LoraCase(d_in=7, d_out=5, r=3, alpha=6.0)
_RSLORA = LoraCase(d_in=7, d_out=5, r=4, alpha=8.0, use_rslora=True)
_SQUARE_FIFO = LoraCase(d_in=6, d_out=6, r=2, alpha=4.0, fan_in_fan_out=True)
_DROPOUT = LoraCase(d_in=7, d_out=5, r=3, alpha=6.0, dropout_p=0.5)
_FUSED = LoraCase(d_in=5, d_out=12, r=2, alpha=4.0, enable_lora=(True, False, True))
# A rank equal to a dimension: the only shapes at which an implementation that guesses the factors'
# layout from their shapes (one that also accepts Keras/Flax's A (d_in, r), B (r, d_out)) goes wrong.
_SQUARE_RANK = LoraCase(d_in=4, d_out=4, r=4, alpha=6.0)
_RANK_D_OUT = LoraCase(d_in=6, d_out=3, r=3, alpha=6.0)
_CASES = {
    "forward": _FORWARD, "forward_rslora": _RSLORA, "zero_B_identity": _FORWARD,
    "fan_in_fan_out": _SQUARE_FIFO, "dropout": _DROPOUT,
    "rank_above_dim": LoraCase(d_in=3, d_out=4, r=6, alpha=3.0, batch_shape=(5,), has_bias=False),
    "rank_equals_dims": _SQUARE_RANK, "rank_equals_d_out": _RANK_D_OUT,
    "fused_enable_lora": _FUSED,
    "merge_rank_equals_dims": _SQUARE_RANK, "merge_rank_equals_d_out": _RANK_D_OUT,
    "merge": _FORWARD, "merge_rslora": _RSLORA, "merge_fan_in_fan_out": _SQUARE_FIFO, "merge_fused": _FUSED,
    "grad_x": _DROPOUT, "grad_A": _DROPOUT, "grad_B": _DROPOUT,
}
_DRAW_ORDER = ("x", "W", "A", "B", "bias", "dy", "mask")


def _draw(name: str, seed: int) -> LoraCase:
    """The float64 case of property ``name`` (cast to each dtype later): standard normal entries,
    W scaled by 1/sqrt(d_in); B zeroed for ``zero_B_identity``. Each property has its own stream."""
    case = replace(_CASES[name], seed=(seed, list(PROPERTIES).index(name)))
    case = case.draw(entries=normal_entries(scaled=("W",)), order=_DRAW_ORDER)
    return case.with_arrays(B=np.zeros_like(case.B)) if name == "zero_B_identity" else case


def linear_calls(case: LoraCase, which: Sequence[str], extra_roundings: int = 0) -> list[Call]:
    """The calls of the linear contract on a drawn case (in its dtype): ``"impl"`` (y), ``"merge"``
    (W_merged) and ``"grad"`` (dx, dA, dB), each with lora-ref's float64 outputs and bounds
    (``extra_roundings`` added to every count: the golden vectors add 2)."""
    x, A, B, bias, mask, dy = case.x, case.A, case.B, case.bias, case.mask, case.dy
    fifo, W_stored, dtype = case.fan_in_fan_out, case.W_stored, case.dtype
    ref = reference_outputs(x, W_stored, A, B, case.scale, bias=bias, dropout_mask=mask, enable_lora=case.enable_lora,
                            fan_in_fan_out=fifo, dy=dy if "grad" in which else None)
    counts = rounding_counts(case.d_in, case.d_out, case.r, case.n_tokens, case.n_enabled)
    options = {"alpha": case.alpha, "r": case.r, "use_rslora": case.use_rslora, "fan_in_fan_out": fifo}
    if case.enable_lora is not None:
        options["enable_lora"] = case.enable_lora

    def out(name: str, pick: int | None = None) -> Output:
        return ref_output(ref, counts, name, dtype, extra_roundings, pick)

    calls = {"impl": Call("impl", (x, W_stored, A, B), ("x", "W", "A", "B"),
                          dict(options, bias=bias, dropout_mask=mask), (out("y"),)),
             "merge": Call("merge", (W_stored, A, B), ("W", "A", "B"), options, (out("W_merged"),))}
    if "grad" in which:
        calls["grad"] = Call("grad", (x, W_stored, A, B, dy), ("x", "W", "A", "B", "dy"),
                             dict(options, bias=bias, dropout_mask=mask),
                             (out("dx", 0), out("dA", 1), out("dB", 2)), ("dx", "dA", "dB"))
    return [calls[w] for w in which]


def _build(name: str, dtype: str, seed: int) -> Call:
    case = _draw(name, seed).astype(dtype)
    return property_call(name, lambda which: linear_calls(case, [which])[0])


def check_lora_linear(impl: Callable, *, merge: Callable | None = None, grad: Callable | None = None,
                      properties: Iterable[str] | None = None,
                      dtypes: Sequence[str] = ("float64", "float32"), seed: int = 0) -> LoraCheckReport:
    """Run the reference properties of a LoRA linear layer against your implementation.

    Parameters
    ----------
    impl : callable
        ``impl(x, W, A, B, *, alpha, r, use_rslora, bias, dropout_mask, fan_in_fan_out) -> y``,
        the adapted layer's forward pass on NumPy arrays, all of one dtype (float32 or float64):

        * ``x`` (*batch, d_in), any number of leading dimensions (the kit uses 1 and 2);
        * ``W`` the frozen weight, (d_out, d_in), or (d_in, d_out) when ``fan_in_fan_out`` is
          True (the GPT-2 Conv1D layout); ``A`` (r, d_in) and ``B`` (d_out, r) in either case;
        * ``alpha`` (float) and ``r`` (int, equal to ``B.shape[1]``): the scale is ``alpha / r``,
          or ``alpha / sqrt(r)`` when ``use_rslora`` is True; computing it is your job;
        * ``bias`` (d_out,) or None;
        * ``dropout_mask``: None, or an array of x's shape with entries 0 and ``1/(1-p)``; the
          adapter branch must use ``x * dropout_mask`` in place of x, the base branch plain x;
        * for the fused properties only, a keyword ``enable_lora`` (a tuple of bools, loralib's
          ``MergedLinear``): W's rows are ``len(enable_lora)`` equal blocks of q rows; with n
          enabled, A is (n r, d_in), B is (n q, r), and the k-th enabled block gets
          ``s B_k A_k`` with ``A_k = A[k r:(k+1) r]``, ``B_k = B[k q:(k+1) q]``; disabled blocks
          get nothing. The keyword is passed only then, so an implementation without fused
          layers need not accept it.

        Return y (*batch, d_out) as a NumPy array (or anything ``numpy.asarray`` reads, e.g. a
        CPU torch tensor without grad) of the inputs' dtype. Do not modify the inputs.
    merge : callable, optional
        ``merge(W, A, B, *, alpha, r, use_rslora, fan_in_fan_out) -> W_merged`` in W's layout:
        ``W + s B A``, or ``W + s (B A)^T`` under ``fan_in_fan_out`` (plus ``enable_lora`` for
        ``merge_fused``). Enables the ``merge*`` properties.
    grad : callable, optional
        ``grad(x, W, A, B, dy, *, alpha, r, use_rslora, bias, dropout_mask, fan_in_fan_out)
        -> (dx, dA, dB)``: the gradients of ``L = sum(y * dy)`` with respect to x, A and B, for
        the upstream gradient ``dy`` (*batch, d_out). Enables the ``grad_*`` properties.
    properties : iterable of str, optional
        Which properties to run (names from :data:`PROPERTIES`); default
        :data:`DEFAULT_PROPERTIES`, less those whose callable is not given.
    dtypes : sequence of str
        The dtypes each property runs in (default float64, then float32).
    seed : int
        Seeds the (standard normal) data; each property draws its own.

    Returns
    -------
    LoraCheckReport
        One :class:`PropertyResult` per property and dtype: ``|yours - reference|`` against
        ``rtol * M`` (:func:`reference_rtol` with :func:`rounding_counts`; M from
        :func:`lora_magnitudes`), where the reference is lora-ref in float64 on the same inputs.
        An exception, a wrong shape or dtype, a non-finite value or an input modified in place
        fails the property, with the reason in ``detail``. Nothing is raised for a failure.
    """
    return run_check(impl=impl, callables={"merge": merge, "grad": grad}, properties=properties, dtypes=dtypes,
                     seed=seed, known=PROPERTIES, default=DEFAULT_PROPERTIES, needs=_NEEDS,
                     allowed=("float32", "float64"), build=_build)


def assert_lora_linear_matches(impl: Callable, **kwargs: Any) -> LoraCheckReport:
    """:func:`check_lora_linear`, raising ``AssertionError`` with the report's table on a failure.

    Takes the same arguments; returns the report when every property passed.
    """
    report = check_lora_linear(impl, **kwargs)
    if not report.ok:
        raise AssertionError(f"the implementation does not match lora-ref:\n{report}")
    return report
