"""The kit's core: tolerances, one result type, one report type, and the one way a check calls you.

Tolerances
----------
Every tolerance in lora-ref (its own tests included) comes from :func:`tolerance`, ``gamma_n =
n u / (1 - n u)`` for ``n`` chained roundings in the dtype's unit roundoff ``u``, times a magnitude
``M`` (the computation on absolute values; each variant's kit module computes its own). The
derivation, and why the bound never fails spuriously yet catches real mistakes, opens
:mod:`lora_ref.testing`.

Comparing your output with the reference
----------------------------------------
Every property compares each output of your callable with lora-ref's, computed in float64 from
the same stored inputs, by one of two rules:

* **tolerance** (:func:`compare_to_reference`): pass when ``|yours - reference| <= rtol * M``
  entry by entry, ``rtol = reference_rtol(dtype, n)`` for the output's rounding count n. An entry
  with ``M = 0`` (a value the computation copies or that is exactly zero) must match exactly.
* **exact** (:func:`compare_exact`): pass when every entry is bit for bit equal (4-bit codes,
  packed bytes, dequantised weights). The result counts the mismatching entries.

Either way the :class:`PropertyResult` holds the worst entry: its index, got, expected and
``|got - expected|``. A :class:`Call` is one invocation of your callable with the outputs expected
of it; :func:`run_call` makes it on copies of the inputs and reports an exception, a wrong shape,
dtype or return type, a non-finite value, or an input modified in place as a failure, by name.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..backend import dtype_name, to_numpy
from ..checks import non_negative_int, non_negative_real

__all__ = ["Call", "CheckReport", "LoraCheckReport", "Output", "PropertyResult", "assert_within", "bounded_output",
           "compare_exact", "compare_to_reference", "numpy_dtype", "property_call", "ref_output", "reference_rtol",
           "run_call", "run_check", "tolerance", "unit_roundoff"]


# ============================================================================================
# Tolerances
# ============================================================================================


def numpy_dtype(name: str) -> np.dtype:
    """NumPy's dtype named ``name`` ("float32", "uint8", ...), bfloat16 included: ml_dtypes' type,
    imported only then (it takes about a second to import). ``TypeError`` for a name NumPy does not
    know; a check that accepts only some dtypes refuses the others first, with its own message."""
    if name == "bfloat16":
        import ml_dtypes          # here, not at import: it takes about a second to import

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def unit_roundoff(dtype: Any) -> float:
    """``u = eps / 2``: the largest relative error of one correctly rounded operation.

    float64: 1.11e-16; float32: 5.96e-08; float16: 4.88e-04; bfloat16 (ml_dtypes): 3.91e-03.
    """
    return float(np.finfo(numpy_dtype(dtype_name(dtype))).eps) / 2.0


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


# ============================================================================================
# Results and reports
# ============================================================================================


@dataclass(frozen=True)
class PropertyResult:
    """One property checked in one dtype (for one output of the callable).

    Tolerance rule: ``error`` is the largest ``|yours - reference| / magnitude`` over the entries
    (``inf`` when an entry of zero magnitude differs, or no comparable output came back) and
    ``bound`` the largest it may be (the rtol). Exact rule: ``mismatches`` counts the entries that
    differ, ``error`` is that count and ``bound`` 0. ``passed`` means ``error <= bound`` and the
    output had the expected shape and dtype; ``detail`` says what went wrong ("" when passed).
    ``where``, ``got``, ``expected`` and ``difference`` (``|got - expected|``) describe the worst
    entry (the first mismatch under the exact rule); None when no array came back. ``output``
    names the output compared when the property's call returns several (the table shows
    ``property:output``), "" otherwise.
    """

    name: str
    dtype: str
    error: float
    bound: float
    passed: bool
    detail: str = ""
    where: tuple[int, ...] | None = None
    got: float | None = None
    expected: float | None = None
    difference: float | None = None
    mismatches: int | None = None
    output: str = ""

    @property
    def exact(self) -> bool:
        """True for a bit-exact property (``mismatches`` counted instead of a bound)."""
        return self.mismatches is not None

    @property
    def worst(self) -> str:
        """The worst entry in words: ``at (i, j): got g, expected e, |got - expected| = d``."""
        if self.where is None:
            return "no entry compared"
        return (f"at {self.where}: got {self.got:.6g}, expected {self.expected:.6g}, "
                f"|got - expected| = {self.difference:.3g}")

    def __str__(self) -> str:
        status = "pass" if self.passed else "FAIL"
        label = f"{self.name}:{self.output}" if self.output else self.name
        if self.exact:
            row = f"{label:<24} {self.dtype:<8} {self.mismatches:>10d} {'exact':>10}  {status}"
        else:
            row = f"{label:<24} {self.dtype:<8} {self.error:>10.2e} {self.bound:>10.2e}  {status}"
        return row + (f"  {self.detail}" if self.detail else "")


class LoraCheckReport(Sequence):
    """The results of a check: a sequence of :class:`PropertyResult`, one per property and dtype.

    Every ``check_*`` of the kit returns one. ``report.ok`` is True when every result passed
    (``bool(report)`` is the same, so ``assert report`` works); ``report.failed`` lists the
    failures and ``report.failed_names`` their properties; ``str(report)`` is a table (for an exact
    property the error column counts mismatching entries); :meth:`summary` is one line.
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
        names: dict[str, list[str]] = {}
        for res in bad:
            names.setdefault(res.name, []).append(res.dtype)
        listed = ", ".join(f"{k} ({', '.join(v)})" for k, v in names.items())
        return f"{n} checks, {len(bad)} failed: {listed}"

    def __str__(self) -> str:
        head = f"{'property':<24} {'dtype':<8} {'rel. error':>10} {'bound':>10}  result"
        return "\n".join([self.summary(), head] + [str(r) for r in self._results])

    def __repr__(self) -> str:
        return f"<LoraCheckReport: {self.summary()}>"


CheckReport = LoraCheckReport
"""The one report type of the kit (the name says what it was first written for)."""


# ============================================================================================
# The two comparison rules
# ============================================================================================


def _is_float(dt: np.dtype) -> bool:
    return dt.kind == "f" or dt.name == "bfloat16"


def _read(name: str, dtype: str, actual: Any, bound: float) -> tuple[np.ndarray | None, PropertyResult | None]:
    try:
        return np.asarray(actual), None
    except Exception as exc:  # noqa: BLE001 - whatever the implementation returned, report it
        return None, PropertyResult(name, dtype, math.inf, bound, False,
                                    f"output could not be read as an array: {type(exc).__name__}: {exc}")


def compare_to_reference(name: str, dtype: Any, actual: Any, expected: np.ndarray, magnitude: np.ndarray,
                         rtol: float, *, want_dtype: Any = None) -> PropertyResult:
    """Compare ``actual`` with ``expected`` entry by entry: pass when ``|a - e| <= rtol * magnitude``.

    ``actual`` must have ``expected``'s shape and the dtype ``want_dtype`` (default ``dtype``, the
    dtype the inputs had; ``"any"``: any floating dtype); it may be anything :func:`numpy.asarray` accepts. ``expected`` and
    ``magnitude`` are float64. An entry of zero magnitude passes only if equal. Never raises for
    a bad ``actual``: the result says what is wrong with it.
    """
    dtype = dtype_name(dtype)
    want = dtype if want_dtype is None else dtype_name(want_dtype)
    expected, magnitude = np.asarray(expected, dtype=np.float64), np.asarray(magnitude, dtype=np.float64)
    if expected.shape != magnitude.shape:
        raise ValueError(f"magnitude has shape {magnitude.shape} but expected has shape {expected.shape}")
    rtol = non_negative_real(rtol, "rtol")
    a, bad = _read(name, dtype, actual, rtol)
    if bad is not None:
        return bad
    if a.shape != expected.shape:
        return PropertyResult(name, dtype, math.inf, rtol, False,
                              f"output has shape {a.shape}, expected {expected.shape}")
    if not _is_float(a.dtype):
        return PropertyResult(name, dtype, math.inf, rtol, False, f"output has dtype {a.dtype}, expected {want}")
    a64 = a.astype(np.float64)
    err = np.abs(a64 - expected)
    err = np.where(np.isnan(err), np.inf, err)                      # NaN or inf outputs fail
    ratio = np.where(magnitude > 0, err / np.where(magnitude > 0, magnitude, 1.0),
                     np.where(err > 0, np.inf, 0.0))
    worst = float(ratio.max()) if ratio.size else 0.0
    where = got = exp = diff = None
    if ratio.size:
        idx = np.unravel_index(int(np.argmax(ratio)), ratio.shape)
        where, got, exp, diff = tuple(int(i) for i in idx), float(a64[idx]), float(expected[idx]), float(err[idx])
    problems = []
    if want != "any" and a.dtype.name != want:
        problems.append(f"output has dtype {a.dtype.name} for {dtype} inputs" if want == dtype
                        else f"output has dtype {a.dtype.name}, expected {want} for {dtype} inputs")
    if not worst <= rtol:
        # |got - expected| beside both: for a small error, got and expected print the same digits.
        problems.append(f"worst at {where}: got {got:.6g}, expected {exp:.6g}, "
                        f"|got - expected| = {diff:.3g} > bound {rtol * magnitude[idx]:.3g}")
    return PropertyResult(name, dtype, worst, rtol, not problems, "; ".join(problems), where, got, exp, diff)


def compare_exact(name: str, dtype: Any, actual: Any, expected: np.ndarray) -> PropertyResult:
    """Compare ``actual`` with ``expected`` bit for bit: same shape, same dtype, every entry's bytes equal.

    For integer outputs (4-bit codes, packed bytes) and values a reference defines exactly
    (dequantised weights). ``error`` is the number of mismatching entries, ``bound`` 0; the worst
    entry is the first mismatch (row-major). Never raises for a bad ``actual``.
    """
    dtype = dtype_name(dtype)
    expected = np.asarray(expected)
    a, bad = _read(name, dtype, actual, 0.0)
    if bad is not None:
        return dataclasses.replace(bad, mismatches=expected.size)
    fail = lambda detail: PropertyResult(name, dtype, float(expected.size), 0.0, False, detail,  # noqa: E731
                                         mismatches=int(expected.size))
    if a.shape != expected.shape:
        return fail(f"output has shape {a.shape}, expected {expected.shape}")
    if a.dtype != expected.dtype:
        return fail(f"output has dtype {a.dtype.name}, expected {expected.dtype.name}")
    width = expected.dtype.itemsize
    bits = lambda t: np.ascontiguousarray(t).reshape(-1).view(f"V{width}")  # noqa: E731  (raw bytes per entry)
    differs = (bits(a) != bits(expected)).reshape(expected.shape)
    n = int(np.count_nonzero(differs))
    if n == 0:
        return PropertyResult(name, dtype, 0.0, 0.0, True, mismatches=0)
    idx = np.unravel_index(int(np.argmax(differs.reshape(-1))), expected.shape)   # the first mismatch
    g, e = a[idx], expected[idx]
    num = (lambda v: int(v)) if expected.dtype.kind in "iub" else (lambda v: float(v))  # noqa: E731
    diff = abs(float(num(g)) - float(num(e)))
    shown = (lambda v: f"{int(v)} (0x{int(v):02X})") if expected.dtype == np.uint8 else (lambda v: f"{num(v)!r}")  # noqa: E731
    detail = (f"{n} of {expected.size} entries differ; first at {tuple(int(i) for i in idx)}: got {shown(g)}, "
              f"expected {shown(e)}, |got - expected| = {diff:.6g}")
    return PropertyResult(name, dtype, float(n), 0.0, False, detail, tuple(int(i) for i in idx),
                          float(num(g)), float(num(e)), diff, n)


# ============================================================================================
# Calls: one invocation of your callable and the outputs expected of it
# ============================================================================================


@dataclass(frozen=True, eq=False)
class Output:
    """One output expected of a call. ``pick``: None (the return value itself), an int (its
    position in a returned tuple), a str (a key of a returned mapping, or an attribute), or a
    callable ``pick(returned) -> (value, problem)`` (problem "" when the value could be formed).
    ``magnitude`` None means the exact rule; otherwise ``expected`` and ``magnitude`` are float64
    and ``rtol`` the bound (``roundings`` the n it came from). ``dtype``: what the value must be."""

    name: str
    expected: np.ndarray
    dtype: str
    magnitude: np.ndarray | None = None
    rtol: float = 0.0
    roundings: int = 0
    pick: int | str | Callable[[Any], tuple[Any, str]] | None = None


def bounded_output(name: str, expected: np.ndarray, dtype: str, magnitude: np.ndarray, n: int,
                   pick: int | str | Callable[[Any], tuple[Any, str]] | None = None) -> Output:
    """The :class:`Output` ``name`` under the tolerance rule for a quantity of ``n`` roundings in
    ``dtype``: ``expected`` and ``magnitude`` float64 arrays of one shape, ``rtol =
    reference_rtol(dtype, n)``; ``pick`` as in :class:`Output`."""
    return Output(name, expected, dtype, magnitude, reference_rtol(dtype, n), n, pick)


def ref_output(ref: Mapping[str, np.ndarray], counts: Mapping[str, int], name: str, dtype: str, extra: int = 0,
               pick: int | str | Callable[[Any], tuple[Any, str]] | None = None) -> Output:
    """:func:`bounded_output` for output ``name`` of a variant's float64 reference: ``ref[name]`` the
    value, ``ref[f"magnitude.{name}"]`` its magnitude (same shape), ``counts[name] + extra`` its
    rounding count (``extra``: the golden vectors add 2)."""
    return bounded_output(name, ref[name], dtype, ref[f"magnitude.{name}"], counts[name] + extra, pick)


@dataclass(frozen=True, eq=False)
class Call:
    """``fn(*args, **kwargs)`` for the callable named ``callable``, and what it must return.

    ``arg_names`` name the positional arguments (for the in-place report); ``returns`` names the
    items of a tuple return value (for the message when it is not one)."""

    callable: str
    args: tuple[Any, ...]
    arg_names: tuple[str, ...]
    kwargs: Mapping[str, Any]
    outputs: tuple[Output, ...]
    returns: tuple[str, ...] = ()


def property_call(name: str, calls: Callable[[str], Call]) -> Call:
    """The call property ``name`` makes: ``calls("merge")`` for a ``merge*`` property, ``calls("grad")``
    for a ``grad_<v>`` one, reporting only its output ``d<v>`` (``grad_A``: ``dA``), else
    ``calls("impl")``; ``calls(which)`` builds the variant's call of that callable."""
    which = "merge" if name.startswith("merge") else "grad" if name.startswith("grad_") else "impl"
    call = calls(which)
    if which == "grad":                                  # each gradient property reports one output
        call = dataclasses.replace(call, outputs=tuple(o for o in call.outputs if o.name == "d" + name[len("grad_"):]))
    return call


def _same(a: Any, b: Any) -> bool:
    """Whether an argument still equals its pristine copy (arrays bit for bit, containers deeply)."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.shape == b.shape
                and a.dtype == b.dtype and a.tobytes() == b.tobytes())
    if isinstance(a, Mapping):
        return isinstance(b, Mapping) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if dataclasses.is_dataclass(a) and not isinstance(a, type):
        return type(a) is type(b) and all(_same(getattr(a, f.name), getattr(b, f.name))
                                          for f in dataclasses.fields(a))
    return a == b


def _pick(got: Any, out: Output, call: Call) -> tuple[Any, str]:
    if out.pick is None:
        return got, ""
    if callable(out.pick):
        try:
            return out.pick(got)
        except Exception as exc:  # noqa: BLE001 - a return value the kit cannot read is a failure
            return None, f"{call.callable} returned {type(got).__name__}, which could not be read: {exc}"
    if isinstance(out.pick, int):
        if not isinstance(got, (tuple, list)) or len(got) != len(call.returns):
            return None, (f"{call.callable} must return a tuple ({', '.join(call.returns)}), "
                          f"got {type(got).__name__}")
        return got[out.pick], ""
    if isinstance(got, Mapping):
        if out.pick not in got:
            return None, f"{call.callable} returned no {out.pick!r} (keys: {sorted(map(str, got))})"
        return got[out.pick], ""
    if hasattr(got, out.pick):
        return getattr(got, out.pick), ""
    return None, f"{call.callable} must return a mapping with {out.pick!r}, got {type(got).__name__}"


def _failed(name: str, label: str, out: Output, detail: str) -> PropertyResult:
    if out.magnitude is None:
        return PropertyResult(name, label, float(out.expected.size), 0.0, False, detail,
                              mismatches=int(out.expected.size))
    return PropertyResult(name, label, math.inf, out.rtol, False, detail)


def run_call(name: str, label: str, call: Call, fn: Callable) -> list[PropertyResult]:
    """Make ``call`` with ``fn`` on deep copies of its inputs; one result per output, named ``name``.

    ``label`` is the dtype the row is reported under. An exception, a return value of the wrong
    kind, and inputs modified in place are failures (with the reason in ``detail``).
    """
    args, kwargs = copy.deepcopy(tuple(call.args)), copy.deepcopy(dict(call.kwargs))
    try:
        got = fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - a crash is a failed property, reported by name
        return [_failed(name, label, o, f"raised {type(exc).__name__}: {exc}") for o in call.outputs]
    changed = [n for n, a, c in zip(call.arg_names, call.args, args) if not _same(a, c)]
    changed += [k for k, v in call.kwargs.items() if not _same(v, kwargs[k])]
    results = []
    for out in call.outputs:
        value, problem = _pick(got, out, call)
        if problem:
            res = _failed(name, label, out, problem)
            results.append(dataclasses.replace(res, output=out.name) if len(call.outputs) > 1 else res)
            continue
        if out.magnitude is None:
            res = compare_exact(name, label, value, out.expected)
        else:
            res = compare_to_reference(name, label, value, out.expected, out.magnitude, out.rtol,
                                       want_dtype=out.dtype)
        if changed:
            detail = "; ".join(filter(None, [res.detail, f"modified its input {', '.join(changed)} in place"]))
            res = dataclasses.replace(res, passed=False, detail=detail)
        if len(call.outputs) > 1:
            res = dataclasses.replace(res, output=out.name)
        results.append(res)
    return results


# ============================================================================================
# A whole check: validate the arguments, choose the properties, run each in each dtype
# ============================================================================================


def _check_callable(value: Any, name: str) -> None:
    if value is not None and not callable(value):
        raise TypeError(f"{name} must be a callable or None, got {type(value).__name__}")


def _select(properties: Iterable[str] | None, known: Mapping[str, str], default: Sequence[str],
            needs: Mapping[str, str], given: Mapping[str, Any]) -> tuple[str, ...]:
    if properties is None:
        return tuple(p for p in default if p not in needs or given[needs[p]] is not None)
    if isinstance(properties, str):
        raise TypeError(f"properties must be a list of property names, got the string {properties!r}")
    chosen = tuple(properties)
    unknown = [p for p in chosen if p not in known]
    if unknown or not chosen:
        raise ValueError(f"properties must be names from {', '.join(known)}; got {list(chosen)!r}")
    for p in chosen:
        needed = needs.get(p)
        if needed and given[needed] is None:
            raise ValueError(f"property {p!r} needs the {needed} callable, but {needed}=None")
    return chosen


def _dtypes(dtypes: Any, allowed: Sequence[str]) -> tuple[str, ...]:
    if isinstance(dtypes, str):
        raise TypeError(f"dtypes must be a list of dtype names, got the string {dtypes!r}")
    names = []
    for d in dtypes:
        try:
            names.append(dtype_name(d))
        except Exception:  # noqa: BLE001 - reported below as not allowed
            names.append(repr(d))
    if not names or any(d not in allowed for d in names):
        listed = (" and/or ".join(repr(a) for a in sorted(allowed)) if len(allowed) == 2
                  else "one or more of " + ", ".join(repr(a) for a in allowed))
        raise ValueError(f"dtypes must be {listed}, got {names!r}")
    return tuple(names)


def run_check(*, impl: Callable, callables: Mapping[str, Callable | None], properties: Iterable[str] | None,
              dtypes: Any, seed: Any, known: Mapping[str, str], default: Sequence[str],
              needs: Mapping[str, str], allowed: Sequence[str],
              build: Callable[[str, str, int], Call]) -> LoraCheckReport:
    """The loop every ``check_*`` runs: validate, select, then for each property and each dtype
    ``build(property, dtype, seed)`` a :class:`Call` and :func:`run_call` it with the callable it
    names (``"impl"`` or one of ``callables``)."""
    if not callable(impl):
        raise TypeError(f"impl must be a callable, got {type(impl).__name__}")
    for cname, fn in callables.items():
        _check_callable(fn, cname)
    seed = non_negative_int(seed, "seed")
    dtypes = _dtypes(dtypes, allowed)
    given = dict(callables, impl=impl)
    chosen = _select(properties, known, default, needs, given)
    results = []
    for name in chosen:
        for dtype in dtypes:
            call = build(name, dtype, seed)
            results.extend(run_call(name, dtype, call, given[call.callable]))
    return LoraCheckReport(results)
