"""The oracle kit: tolerances, error bounds and checks for testing a LoRA implementation.

Tolerances
----------
Every tolerance in lora-ref (its own tests included) comes from :func:`tolerance`, derived from
the dtype's unit roundoff ``u = eps / 2`` by the standard rounding-error analysis (Higham,
*Accuracy and Stability of Numerical Algorithms*, 2nd ed., Lemma 3.1 and Section 3.5):

* a chain of ``n`` roundings (a dot product of length n, a sum of n terms) has relative error
  at most ``gamma_n = n u / (1 - n u)``, *relative to the sum of absolute values* of the terms;
* so two computations of the same quantity that each take at most ``n`` roundings differ by at
  most ``2 gamma_n * M``, where ``M`` is the value computed with every term replaced by its
  absolute value (:func:`lora_linear_magnitude` computes M for the LoRA layer).

These bounds are rigorous (any summation order, with or without FMA, as long as nothing
overflows or underflows into the subnormals), so a test that uses them never fails spuriously;
and they are far below the size of any real mistake (a wrong scale, a forgotten transpose), so
they still catch those.

Checking another implementation
-------------------------------
:func:`check_lora_linear` runs a fixed set of named properties (:data:`PROPERTIES`) against
your implementation, given as a Python callable on NumPy arrays, in float64 and float32, and
returns a :class:`LoraCheckReport`; :func:`assert_lora_linear_matches` raises ``AssertionError``
with that report for use in pytest. Every property compares your output with lora-ref's, computed
in float64 from the same inputs, within the bound :func:`reference_rtol` derives. The contract
of the callables is in :func:`check_lora_linear`; ``docs/oracle.md`` walks through an example.

The kit speaks NumPy: it is the boundary where other implementations' numbers come in, so unlike
the rest of lora_ref it does not follow the backend switch.

The kit's cases are :class:`lora_ref.cases.LoraCase` records. Hypothesis strategies that draw
random ones are in :mod:`lora_ref.strategies` (``lora_cases``, ``dims``, ``ranks``, ...), which
needs hypothesis, a test extra (``pip install 'lora-ref[test]'``); this module does not.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from autograd import make_vjp

from .backend import dtype_name, to_numpy
from .cases import LoraCase, normal_entries
from .checks import non_negative_int, non_negative_real, positive_int
from .lora import delta_weight, lora_linear, merge as _ref_merge

__all__ = ["DEFAULT_PROPERTIES", "PROPERTIES", "LoraCheckReport", "PropertyResult",
           "assert_lora_linear_matches", "assert_within", "check_lora_linear", "compare_to_reference",
           "lora_linear_magnitude", "lora_magnitudes", "reference_outputs", "reference_rtol",
           "rounding_counts", "tolerance", "unit_roundoff"]


# ============================================================================================
# Tolerances
# ============================================================================================


def unit_roundoff(dtype: Any) -> float:
    """``u = eps / 2``: the largest relative error of one correctly rounded operation.

    float64: 1.11e-16; float32: 5.96e-08; float16: 4.88e-04.
    """
    return float(np.finfo(np.dtype(dtype_name(dtype))).eps) / 2.0


def tolerance(dtype: Any, n: int = 1) -> float:
    """``gamma_n = n u / (1 - n u)``: the relative error bound of ``n`` chained roundings in ``dtype``.

    Multiply by the magnitude of the computation (the same expression evaluated on absolute
    values) to get an absolute bound; double it to compare two independent computations.
    Raises ``ValueError`` when ``n u >= 1`` (no bound exists: the dtype is too coarse for ``n``).
    """
    n = non_negative_int(n, "n")
    u = unit_roundoff(dtype)
    if n * u >= 1.0:
        raise ValueError(f"n={n} roundings in {dtype_name(dtype)} (u={u:.3g}) admit no error bound: n*u >= 1")
    return n * u / (1.0 - n * u)


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


def reference_rtol(dtype: Any, n: int) -> float:
    """The bound on ``|yours - reference| / magnitude`` for a quantity of ``n`` roundings.

    Your implementation computes in ``dtype`` (error at most ``gamma_n(dtype) * M``); lora-ref's
    reference computes in float64 from the same inputs (at most ``gamma_n(float64) * M``); and
    the magnitude M is itself a float64 sum of non-negative terms, computed low by at most a
    factor ``1 - gamma_n(float64)``. Hence::

        rtol = (gamma_n(dtype) + gamma_n(float64)) / (1 - gamma_n(float64))

    and the check is ``|yours - reference| <= rtol * M`` entry by entry.
    """
    g64 = tolerance("float64", n)
    return (tolerance(dtype, n) + g64) / (1.0 - g64)


# ============================================================================================
# Magnitudes: the computation with every term replaced by its absolute value
# ============================================================================================


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
# Assertions and results
# ============================================================================================


def assert_within(actual: Any, expected: Any, bound: Any, *, what: str = "value") -> float:
    """Assert ``|actual - expected| <= bound`` elementwise; return the largest ``error / bound``.

    ``bound`` is a scalar or an array broadcastable to the values (typically
    ``2 * tolerance(dtype, n) * magnitude``). Shapes must match exactly. On failure the
    message names ``what``, the worst entry, its error and its bound.
    """
    a = to_numpy(actual).astype(np.float64)
    e = to_numpy(expected).astype(np.float64)
    if a.shape != e.shape:
        raise AssertionError(f"{what}: shape {a.shape} differs from expected {e.shape}")
    if not np.all(np.isfinite(a) == np.isfinite(e)):
        raise AssertionError(f"{what}: non-finite values differ from expected")
    err = np.abs(a - e)
    err = np.where(np.isfinite(e), err, 0.0)
    bound = np.broadcast_to(np.asarray(bound, dtype=np.float64), err.shape)
    # Where the bound is exactly zero, only exact equality passes.
    ratio = np.where(bound > 0, err / np.where(bound > 0, bound, 1.0), np.where(err > 0, np.inf, 0.0))
    worst = float(ratio.max()) if ratio.size else 0.0
    if worst > 1.0:
        idx = np.unravel_index(int(np.argmax(ratio)), ratio.shape)
        raise AssertionError(
            f"{what}: |actual - expected| exceeds its bound at index {tuple(int(i) for i in idx)}: "
            f"error {err[idx]:.3e} > bound {bound[idx]:.3e} (actual {a[idx]!r}, expected {e[idx]!r}); "
            f"max error {err.max():.3e}")
    return worst


@dataclass(frozen=True)
class PropertyResult:
    """One property checked in one dtype.

    ``error`` is the largest ``|yours - reference| / magnitude`` over the entries (``inf`` when
    an entry with zero magnitude is nonzero, or when no comparable output came back); ``bound``
    the largest it may be (:func:`reference_rtol`); ``passed`` whether ``error <= bound`` and the
    output had the expected shape and dtype; ``detail`` says what went wrong ("" when passed).
    """

    name: str
    dtype: str
    error: float
    bound: float
    passed: bool
    detail: str = ""

    def __str__(self) -> str:
        status = "pass" if self.passed else "FAIL"
        row = f"{self.name:<24} {self.dtype:<8} {self.error:>10.2e} {self.bound:>10.2e}  {status}"
        return row + (f"  {self.detail}" if self.detail else "")


class LoraCheckReport(Sequence):
    """The results of a check: a sequence of :class:`PropertyResult`, one per property and dtype.

    ``report.ok`` is True when every result passed (``bool(report)`` is the same, so
    ``assert report`` works); ``report.failed`` lists the failures; ``str(report)`` is a table;
    :meth:`summary` is one line.
    """

    def __init__(self, results: Iterable[PropertyResult]) -> None:
        self._results = tuple(results)
        for res in self._results:
            if not isinstance(res, PropertyResult):
                raise TypeError(f"results must be PropertyResult objects, got {type(res).__name__}")

    def __getitem__(self, index):  # type: ignore[override]
        return self._results[index]

    def __len__(self) -> int:
        return len(self._results)

    def __iter__(self) -> Iterator[PropertyResult]:
        return iter(self._results)

    def __bool__(self) -> bool:
        return self.ok

    @property
    def ok(self) -> bool:
        """True when every property passed (and at least one was checked)."""
        return bool(self._results) and all(r.passed for r in self._results)

    @property
    def failed(self) -> tuple[PropertyResult, ...]:
        """The results that did not pass."""
        return tuple(r for r in self._results if not r.passed)

    @property
    def failed_names(self) -> tuple[str, ...]:
        """The names of the failed properties, each once, in check order."""
        return tuple(dict.fromkeys(r.name for r in self.failed))

    def summary(self) -> str:
        """One line: how many results passed, and the failed properties with their dtypes."""
        n, bad = len(self._results), self.failed
        if not bad:
            return f"{n} checks, all passed"
        names = {}
        for res in bad:
            names.setdefault(res.name, []).append(res.dtype)
        listed = ", ".join(f"{k} ({', '.join(v)})" for k, v in names.items())
        return f"{n} checks, {len(bad)} failed: {listed}"

    def __str__(self) -> str:
        head = f"{'property':<24} {'dtype':<8} {'rel. error':>10} {'bound':>10}  result"
        return "\n".join([self.summary(), head] + [str(r) for r in self._results])

    def __repr__(self) -> str:
        return f"<LoraCheckReport: {self.summary()}>"


def compare_to_reference(name: str, dtype: Any, actual: Any, expected: np.ndarray, magnitude: np.ndarray,
                         rtol: float) -> PropertyResult:
    """Compare ``actual`` with ``expected`` entry by entry: pass when ``|a - e| <= rtol * magnitude``.

    ``actual`` must have ``expected``'s shape and the dtype ``dtype`` (the dtype the inputs had);
    it may be anything :func:`numpy.asarray` accepts. ``expected`` and ``magnitude`` are float64
    (from :func:`reference_outputs`). Never raises for a bad ``actual``: the result says what
    is wrong with it.
    """
    dtype = dtype_name(dtype)
    expected, magnitude = np.asarray(expected, dtype=np.float64), np.asarray(magnitude, dtype=np.float64)
    if expected.shape != magnitude.shape:
        raise ValueError(f"magnitude has shape {magnitude.shape} but expected has shape {expected.shape}")
    rtol = non_negative_real(rtol, "rtol")
    try:
        a = np.asarray(actual)
    except Exception as exc:  # noqa: BLE001 - whatever the implementation returned, report it
        return PropertyResult(name, dtype, math.inf, rtol, False,
                              f"output could not be read as an array: {type(exc).__name__}: {exc}")
    if a.shape != expected.shape:
        return PropertyResult(name, dtype, math.inf, rtol, False,
                              f"output has shape {a.shape}, expected {expected.shape}")
    if a.dtype.kind != "f":
        return PropertyResult(name, dtype, math.inf, rtol, False, f"output has dtype {a.dtype}, expected {dtype}")
    a64 = a.astype(np.float64)
    err = np.abs(a64 - expected)
    err = np.where(np.isnan(err), np.inf, err)                      # NaN or inf outputs fail
    ratio = np.where(magnitude > 0, err / np.where(magnitude > 0, magnitude, 1.0),
                     np.where(err > 0, np.inf, 0.0))
    worst = float(ratio.max()) if ratio.size else 0.0
    problems = []
    if a.dtype.name != dtype:
        problems.append(f"output has dtype {a.dtype.name} for {dtype} inputs")
    if not worst <= rtol:
        idx = np.unravel_index(int(np.argmax(ratio)), ratio.shape)
        where = tuple(int(i) for i in idx)
        # |got - expected| beside both: for a small error, got and expected print the same digits.
        problems.append(f"worst at {where}: got {a64[idx]:.6g}, expected {expected[idx]:.6g}, "
                        f"|got - expected| = {err[idx]:.3g} > bound {rtol * magnitude[idx]:.3g}")
    return PropertyResult(name, dtype, worst, rtol, not problems, "; ".join(problems))


# ============================================================================================
# The kit: named properties run against a user's implementation
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


def _check_callable(value: Any, name: str) -> None:
    if value is not None and not callable(value):
        raise TypeError(f"{name} must be a callable or None, got {type(value).__name__}")


def _select(properties: Iterable[str] | None, merge: Any, grad: Any) -> tuple[str, ...]:
    if properties is None:
        given = {"merge": merge is not None, "grad": grad is not None}
        return tuple(p for p in DEFAULT_PROPERTIES if p not in _NEEDS or given[_NEEDS[p]])
    if isinstance(properties, str):
        raise TypeError(f"properties must be a list of property names, got the string {properties!r}")
    chosen = tuple(properties)
    unknown = [p for p in chosen if p not in PROPERTIES]
    if unknown or not chosen:
        raise ValueError(f"properties must be names from {', '.join(PROPERTIES)}; got {list(chosen)!r}")
    for p in chosen:
        needed = _NEEDS.get(p)
        if needed and {"merge": merge, "grad": grad}[needed] is None:
            raise ValueError(f"property {p!r} needs the {needed} callable, but {needed}=None")
    return chosen


def _run_property(name: str, dtype: str, case: LoraCase, impl: Callable, merge: Callable | None,
                  grad: Callable | None) -> list[PropertyResult]:
    case = case.astype(dtype)
    x, A, B, bias, mask, dy = case.x, case.A, case.B, case.bias, case.mask, case.dy
    fifo = case.fan_in_fan_out
    W_stored = case.W_stored                                           # the layout fan_in_fan_out says
    s = case.scale
    is_grad = name.startswith("grad_")
    ref = reference_outputs(x, W_stored, A, B, s, bias=bias, dropout_mask=mask, enable_lora=case.enable_lora,
                            fan_in_fan_out=fifo, dy=dy if is_grad else None)
    counts = rounding_counts(case.d_in, case.d_out, case.r, case.n_tokens, case.n_enabled)
    options = {"alpha": case.alpha, "r": case.r, "use_rslora": case.use_rslora, "fan_in_fan_out": fifo}
    if case.enable_lora is not None:
        options["enable_lora"] = case.enable_lora
    if name.startswith("merge"):
        fn, args, kwargs, outputs = merge, (W_stored, A, B), options, ("W_merged",)
    else:
        kwargs = dict(options, bias=bias, dropout_mask=mask)
        if is_grad:
            fn, args, outputs = grad, (x, W_stored, A, B, dy), ("dx", "dA", "dB")
        else:
            fn, args, outputs = impl, (x, W_stored, A, B), ("y",)
    copies = [None if a is None else a.copy() for a in args]
    kw_copies = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in kwargs.items()}
    pick = {"dx": 0, "dA": 1, "dB": 2}
    wanted = outputs if not is_grad else ({"grad_x": "dx", "grad_A": "dA", "grad_B": "dB"}[name],)
    rtol = {o: reference_rtol(dtype, counts[o]) for o in wanted}
    try:
        got = fn(*copies, **kw_copies)
    except Exception as exc:  # noqa: BLE001 - a crash is a failed property, reported by name
        return [PropertyResult(name, dtype, math.inf, rtol[o], False, f"raised {type(exc).__name__}: {exc}")
                for o in wanted]
    changed = [n for n, a, c in zip(("x", "W", "A", "B", "dy"), args, copies) if a is not None and
               not np.array_equal(a, c, equal_nan=True)]
    changed += [k for k, v in kwargs.items() if isinstance(v, np.ndarray) and not np.array_equal(v, kw_copies[k])]
    results = []
    for o in wanted:
        if is_grad:
            if not isinstance(got, tuple | list) or len(got) != 3:
                results.append(PropertyResult(name, dtype, math.inf, rtol[o], False,
                                              f"grad must return a tuple (dx, dA, dB), got {type(got).__name__}"))
                continue
            value = got[pick[o]]
        else:
            value = got
        res = compare_to_reference(name, dtype, value, ref[o], ref[f"magnitude.{o}"], rtol[o])
        if changed:
            detail = "; ".join(filter(None, [res.detail, f"modified its input {', '.join(changed)} in place"]))
            res = PropertyResult(res.name, res.dtype, res.error, res.bound, False, detail)
        results.append(res)
    return results


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
    if not callable(impl):
        raise TypeError(f"impl must be a callable, got {type(impl).__name__}")
    _check_callable(merge, "merge")
    _check_callable(grad, "grad")
    seed = non_negative_int(seed, "seed")
    if isinstance(dtypes, str):
        raise TypeError(f"dtypes must be a list of dtype names, got the string {dtypes!r}")
    dtypes = tuple(dtype_name(d) for d in dtypes)
    bad = [d for d in dtypes if d not in ("float32", "float64")]
    if bad or not dtypes:
        raise ValueError(f"dtypes must be 'float32' and/or 'float64', got {list(dtypes)!r}")
    chosen = _select(properties, merge, grad)
    results = []
    for name in chosen:
        case = _draw(name, int(seed))
        for dtype in dtypes:
            results.extend(_run_property(name, dtype, case, impl, merge, grad))
    return LoraCheckReport(results)


def assert_lora_linear_matches(impl: Callable, **kwargs: Any) -> LoraCheckReport:
    """:func:`check_lora_linear`, raising ``AssertionError`` with the report's table on a failure.

    Takes the same arguments; returns the report when every property passed.
    """
    report = check_lora_linear(impl, **kwargs)
    if not report.ok:
        raise AssertionError(f"the implementation does not match lora-ref:\n{report}")
    return report
