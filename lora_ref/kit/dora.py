"""The kit for DoRA (Liu et al. 2024, arXiv 2402.09353): forward, initial magnitude, merge, and
both gradients (the norm detached, Section 4.3 and PEFT's; and the exact one, Eq. 6).

The reference is :mod:`lora_ref.dora` in float64; the bounds are ``reference_rtol(dtype, n) * M``
with n from :func:`lora_ref.dora.dora_rounding_counts` and M from
:func:`lora_ref.dora.dora_magnitudes` (which carries the norm's conditioning
``||(|W| + |s||B||A|)_i|| / ||V_i||`` in the factor f). The magnitude m the kit passes is a
"trained" one, ``||W + s B A||_c`` times a factor in +-[1/2, 2] per row, so that ``f = m / ||V||``
is not 1 and a wrong norm shows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
from autograd import make_vjp

from ..backend import to_numpy
from ..cases import LoraCase, normal_entries
from ..dora import dora_linear, dora_magnitude, dora_magnitudes, dora_merge, dora_rounding_counts
from .core import Call, LoraCheckReport, ref_output, run_check

__all__ = ["DORA_DEFAULT_PROPERTIES", "DORA_PROPERTIES", "check_dora_linear", "dora_calls", "dora_reference",
           "draw_dora_case"]

DORA_PROPERTIES: dict[str, str] = {
    "forward": "y = f * (x V^T) + bias, V = W + s B A, f = m / ||V||_c (one norm per output row), m trained",
    "forward_rslora": "the same with use_rslora=True: scale alpha/sqrt(r), r = 4",
    "forward_square": "d_in = d_out = 6: a norm over the input axis (one per input feature) is not a shape error",
    "fan_in_fan_out": "W stored (d_in, d_out) (GPT-2 Conv1D); the norm is still one per output feature",
    "dropout": "PEFT's dropout: y = f (xd V^T) + (x - xd) W^T + bias, xd = x * mask (the outer base term on clean x)",
    "magnitude": "the initial m = ||W + s B A||_c with B != 0 (not ||W||_c), d_in = d_out",
    "magnitude_fan_in_fan_out": "the initial m with W stored (d_in, d_out)",
    "merge": "W' = f V, so that x W'^T + bias is the layer",
    "merge_fan_in_fan_out": "merge with W stored (d_in, d_out): W' in W's layout",
    "grad_x": "dL/dx for L = sum(y * dy), with bias and dropout (the same for both gradient variants)",
    "grad_m": "dL/dm = (E . V) / ||V||, E = dy^T xd (the same for both variants)",
    "grad_A_detached": "dL/dA with the norm a constant (detach_norm=True, Section 4.3, PEFT's)",
    "grad_B_detached": "dL/dB with the norm a constant (detach_norm=True)",
    "grad_A_exact": "dL/dA through the norm (detach_norm=False, Eq. 6)",
    "grad_B_exact": "dL/dB through the norm (detach_norm=False)",
}
"""Every DoRA property, with what it checks."""

DORA_DEFAULT_PROPERTIES = tuple(DORA_PROPERTIES)
"""All of them (those needing ``magnitude``, ``merge`` or ``grad`` only when that callable is given)."""

_NEEDS = {"magnitude": "magnitude", "magnitude_fan_in_fan_out": "magnitude", "merge": "merge",
          "merge_fan_in_fan_out": "merge", **{p: "grad" for p in DORA_PROPERTIES if p.startswith("grad_")}}

_PLAIN = LoraCase(d_in=7, d_out=5, r=3, alpha=6.0)
_SQUARE = LoraCase(d_in=6, d_out=6, r=2, alpha=4.0)
_SQUARE_FIFO = LoraCase(d_in=6, d_out=6, r=2, alpha=4.0, fan_in_fan_out=True)
_DROPOUT = LoraCase(d_in=7, d_out=5, r=3, alpha=6.0, dropout_p=0.5)
_CASES = {"forward": _PLAIN, "forward_rslora": LoraCase(d_in=7, d_out=5, r=4, alpha=8.0, use_rslora=True),
          "forward_square": _SQUARE, "fan_in_fan_out": _SQUARE_FIFO, "dropout": _DROPOUT,
          "magnitude": _SQUARE, "magnitude_fan_in_fan_out": _SQUARE_FIFO,
          "merge": _PLAIN, "merge_fan_in_fan_out": _SQUARE_FIFO,
          **{p: _DROPOUT for p in DORA_PROPERTIES if p.startswith("grad_")}}


def draw_dora_case(spec: LoraCase, seed: Any) -> tuple[LoraCase, np.ndarray]:
    """A float64 DoRA case from ``spec`` and ``seed`` (an int or tuple for ``default_rng``): x, W
    (scaled by 1/sqrt(d_in)), A, B (random, B != 0), bias, dy, mask; and a trained-looking m (d_out,):
    ``||W + s B A||_c`` times a factor uniform in [1/2, 2] with a random sign, per row."""
    case = replace(spec, seed=seed).draw(entries=normal_entries(scaled=("W",)),
                                         order=("x", "W", "A", "B", "bias", "dy", "mask"))
    rng = np.random.default_rng(list(seed) + [1] if isinstance(seed, tuple) else [seed, 1])
    C = np.asarray(dora_magnitude(case.W, case.A, case.B, case.scale))            # (d_out,)
    return case, C * rng.uniform(0.5, 2.0, C.shape) * rng.choice([-1.0, 1.0], C.shape)


def dora_reference(x: Any, W: Any, A: Any, B: Any, m: Any, scale: float, *, bias: Any = None,
                   dropout_mask: Any = None, fan_in_fan_out: bool = False, dy: Any = None,
                   detach_norm: bool = True) -> dict[str, np.ndarray]:
    """lora-ref's DoRA outputs in float64 from the given inputs (upcast exactly), with magnitudes.

    ``W`` is in the base model's layout ((d_in, d_out) under ``fan_in_fan_out``). Returns ``"y"``,
    ``"m_init"`` (``||W + s B A||_c``), ``"W_merged"`` (W's layout) and, with ``dy``, ``"dx"``,
    ``"dA"``, ``"dB"``, ``"dm"`` (``detach_norm`` chooses the gradient), and ``"magnitude.<name>"``
    for each (``magnitude.m_init`` is dora_magnitudes' ``"norm"``).
    """
    f64 = lambda t: None if t is None else np.asarray(to_numpy(t), dtype=np.float64)  # noqa: E731
    x, W, A, B, m, bias, mask, dy = (f64(t) for t in (x, W, A, B, m, bias, dropout_mask, dy))
    W_math = W.T if fan_in_fan_out else W                                   # (d_out, d_in)
    out = {"y": dora_linear(x, W_math, A, B, m, scale, bias, mask, detach_norm),
           "m_init": dora_magnitude(W_math, A, B, scale),
           "W_merged": dora_merge(W, A, B, m, scale, fan_in_fan_out=fan_in_fan_out)}
    mags = dora_magnitudes(x, W_math, A, B, m, scale, bias=bias, dropout_mask=mask, dy=dy, detach_norm=detach_norm)
    out["magnitude.y"], out["magnitude.m_init"] = mags["y"], mags["norm"]
    out["magnitude.W_merged"] = mags["W_merged"].T if fan_in_fan_out else mags["W_merged"]
    if dy is not None:
        f = lambda xx, AA, BB, mm: dora_linear(xx, W_math, AA, BB, mm, scale, bias, mask, detach_norm)  # noqa: E731
        vjp, _ = make_vjp(f, argnum=(0, 1, 2, 3))(x, A, B, m)
        out["dx"], out["dA"], out["dB"], out["dm"] = vjp(dy)
        out.update({f"magnitude.{k}": mags[k] for k in ("dx", "dA", "dB", "dm")})
    return out


def dora_calls(case: LoraCase, m: np.ndarray, which: Sequence[str], extra_roundings: int = 0) -> list[Call]:
    """The calls of the DoRA contract on a case in its dtype (m in that dtype too): ``"impl"``
    (y), ``"magnitude"`` (m_init), ``"merge"`` (W_merged), ``"grad"`` (dx, dA, dB, dm with the norm
    detached) and ``"grad_exact"`` (the same call with ``detach_norm=False``)."""
    dtype, fifo, W = case.dtype, case.fan_in_fan_out, case.W_stored
    counts = dora_rounding_counts(case.d_in, case.d_out, case.r, case.n_tokens)
    counts["m_init"] = counts["norm"]
    options = {"alpha": case.alpha, "r": case.r, "use_rslora": case.use_rslora, "fan_in_fan_out": fifo}
    layer = dict(options, bias=case.bias, dropout_mask=case.mask)

    def outputs(ref, names, picks=None):
        picks = picks or [None] * len(names)
        return tuple(ref_output(ref, counts, n, dtype, extra_roundings, p) for n, p in zip(names, picks))

    calls, refs = [], {}
    for w in which:
        detach, grad = w != "grad_exact", w.startswith("grad")
        if (grad, detach) not in refs:        # impl, magnitude and merge share one reference
            refs[grad, detach] = dora_reference(case.x, W, case.A, case.B, m, case.scale, bias=case.bias,
                                                dropout_mask=case.mask, fan_in_fan_out=fifo,
                                                dy=case.dy if grad else None, detach_norm=detach)
        ref = refs[grad, detach]
        if w == "impl":
            calls.append(Call("impl", (case.x, W, case.A, case.B, m), ("x", "W", "A", "B", "m"), layer,
                              outputs(ref, ["y"])))
        elif w == "magnitude":
            calls.append(Call("magnitude", (W, case.A, case.B), ("W", "A", "B"), options, outputs(ref, ["m_init"])))
        elif w == "merge":
            calls.append(Call("merge", (W, case.A, case.B, m), ("W", "A", "B", "m"), options,
                              outputs(ref, ["W_merged"])))
        else:
            calls.append(Call("grad", (case.x, W, case.A, case.B, m, case.dy), ("x", "W", "A", "B", "m", "dy"),
                              dict(layer, detach_norm=detach),
                              outputs(ref, ["dx", "dA", "dB", "dm"], [0, 1, 2, 3]), ("dx", "dA", "dB", "dm")))
    return calls


def _build(name: str, dtype: str, seed: int) -> Call:
    case, m = draw_dora_case(_CASES[name], (seed, list(DORA_PROPERTIES).index(name)))
    case = case.astype(dtype)
    m = m.astype(dtype)
    which = {"magnitude": "magnitude", "merge": "merge"}.get(name.split("_")[0], "impl")
    if name.startswith("grad_"):
        which = "grad_exact" if name.endswith("_exact") else "grad"
    call = dora_calls(case, m, [which])[0]
    if which.startswith("grad"):
        wanted = "d" + name.split("_")[1]                                  # grad_A_exact -> dA
        call = replace(call, outputs=tuple(o for o in call.outputs if o.name == wanted))
    return call


def check_dora_linear(impl: Callable, *, magnitude: Callable | None = None, merge: Callable | None = None,
                      grad: Callable | None = None, properties: Iterable[str] | None = None,
                      dtypes: Sequence[str] = ("float64", "float32"), seed: int = 0) -> LoraCheckReport:
    """Run DoRA's reference properties (:data:`DORA_PROPERTIES`) against your implementation.

    Parameters
    ----------
    impl : callable
        ``impl(x, W, A, B, m, *, alpha, r, use_rslora, bias, dropout_mask, fan_in_fan_out) -> y``:
        the linear contract of :func:`check_lora_linear` plus ``m`` (d_out,), the magnitude
        (PEFT's ``lora_magnitude_vector``). ``y = f * (xd V^T) + (x - xd) W^T + bias`` with
        ``V = W + s B A`` in the (d_out, d_in) layout, ``f = m / ||V||_c`` (the norm of each
        output row, over the input axis) and ``xd = x * dropout_mask`` (x when None): PEFT's
        dropout, the correction on the dropped input, the outer base term on the clean one.
    magnitude : callable, optional
        ``magnitude(W, A, B, *, alpha, r, use_rslora, fan_in_fan_out) -> m`` (d_out,): the initial
        magnitude ``||W + s B A||_c`` (PEFT's, B != 0 here). Enables the ``magnitude*`` properties.
    merge : callable, optional
        ``merge(W, A, B, m, *, alpha, r, use_rslora, fan_in_fan_out) -> W_merged``, W's layout:
        ``f V`` (transposed back under ``fan_in_fan_out``).
    grad : callable, optional
        ``grad(x, W, A, B, m, dy, *, alpha, r, use_rslora, bias, dropout_mask, fan_in_fan_out,
        detach_norm) -> (dx, dA, dB, dm)``: the gradients of ``L = sum(y * dy)``; with
        ``detach_norm=True`` the norm is a constant (Section 4.3, PEFT), with False the exact
        gradient through it (Eq. 6). Enables the ``grad_*`` properties (both variants).
    properties, dtypes, seed
        As in every check (:mod:`lora_ref.testing`); dtypes float64 and/or float32.

    Returns the :class:`~lora_ref.kit.core.LoraCheckReport`; bounds from
    :func:`lora_ref.dora.dora_rounding_counts` and :func:`lora_ref.dora.dora_magnitudes`.
    """
    return run_check(impl=impl, callables={"magnitude": magnitude, "merge": merge, "grad": grad},
                     properties=properties, dtypes=dtypes, seed=seed, known=DORA_PROPERTIES,
                     default=DORA_DEFAULT_PROPERTIES, needs=_NEEDS, allowed=("float32", "float64"), build=_build)
