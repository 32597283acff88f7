"""The kit for LoRA on a convolution (PEFT's layout, :mod:`lora_ref.conv`), 1-D and 2-D.

``y = conv(x, W, bias) + s conv_1x1(conv(x * mask, A), B)``: A (r, C_in, *k) a convolution with
the base's kernel, stride, padding AND dilation (groups 1), B (C_out, r/groups, 1, ...) a 1x1
convolution with the base's groups; merged, ``dW[o, i, t] = s sum_r B[o, r] A[r, i, t]`` (PEFT
transposes the (C_in, C_out, *k) product it forms to W's layout; loralib views it). Bounds:
``reference_rtol(dtype, n) * M`` with n from :func:`conv_rounding_counts`, M the reference on
absolute values.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
from autograd import make_vjp

from ..checks import positive_int
from ..conv import conv_output_shape, lora_conv, merge_conv
from ..lora import lora_scale
from .core import Call, LoraCheckReport, Output, property_call, ref_output, run_check

__all__ = ["CONV_DEFAULT_PROPERTIES", "CONV_PROPERTIES", "check_lora_conv", "conv_calls", "conv_reference",
           "conv_rounding_counts", "draw_conv_case"]


def conv_rounding_counts(C_in: int, C_out: int, kernel: Sequence[int], r: int, n_positions: int) -> dict[str, int]:
    """Roundings any one term of each output can suffer (tests/test_conv.py's derivation, plus 2
    for computing s from alpha and r). K = prod(kernel), NP = batch times output positions.

    * ``y``: the adapter term goes through C_in K (A, + 1 for a mask), r (B), s computed (2),
      rounded (1) and multiplied (1), the join (1) and the bias (1): ``C_in K + r + 7``; the base
      term and the merged path ``conv(x, W + dW)`` (r + 3, then C_in K + 1) are shorter.
    * ``W_merged``: r (B A), s (4), the add (1): ``r + 5``.
    * gradients: the longest chain is one of dx through A (C_out + r K + 6), dA (C_out + NP + 5),
      dB (C_in K + NP + 5); all at most ``NP + C_in K + C_out K + C_out + r K + 10``.
    """
    K = math.prod(positive_int(k, "kernel") for k in kernel)
    C_in, C_out, r, NP = (positive_int(v, n) for v, n in ((C_in, "C_in"), (C_out, "C_out"), (r, "r"),
                                                          (n_positions, "n_positions")))
    g = NP + C_in * K + C_out * K + C_out + r * K + 10
    return {"y": C_in * K + r + 7, "W_merged": r + 5, "dx": g, "dA": g, "dB": g}


def conv_reference(x: Any, W: Any, A: Any, B: Any, scale: float, geometry: dict[str, Any], *, bias: Any = None,
                   dropout_mask: Any = None, dy: Any = None) -> dict[str, np.ndarray]:
    """lora-ref's outputs in float64 from the stored inputs: ``"y"``, ``"W_merged"`` (groups 1
    only) and, with ``dy``, ``"dx"``, ``"dA"``, ``"dB"``; ``"magnitude.<name>"`` the same on
    absolute values. ``geometry`` holds stride, padding, dilation, groups."""
    out: dict[str, np.ndarray] = {}
    for prefix, t in (("", lambda a: None if a is None else np.asarray(a, dtype=np.float64)),
                      ("magnitude.", lambda a: None if a is None else np.abs(np.asarray(a, dtype=np.float64)))):
        s = abs(scale) if prefix else scale
        xx, WW, AA, BB, bb, mm = (t(v) for v in (x, W, A, B, bias, dropout_mask))
        f = lambda x_, A_, B_: lora_conv(x_, WW, A_, B_, s, bb, dropout_mask=mm, **geometry)  # noqa: E731
        if dy is None:
            out[prefix + "y"] = f(xx, AA, BB)
        else:
            vjp, out[prefix + "y"] = make_vjp(f, argnum=(0, 1, 2))(xx, AA, BB)
            out[prefix + "dx"], out[prefix + "dA"], out[prefix + "dB"] = vjp(t(dy))
        if geometry.get("groups", 1) == 1:
            out[prefix + "W_merged"] = merge_conv(WW, AA, BB, s)
    return out


CONV_PROPERTIES: dict[str, str] = {
    "forward_1d": "1-D: C_in 4, C_out 6, kernel 3, padding 1, bias",
    "forward_2d": "2-D: C_in = C_out = 4, kernel (3, 3), stride 2, padding 1",
    "forward_rslora": "1-D with use_rslora=True: scale alpha/sqrt(r), r = 4",
    "groups": "2-D with groups = 2: W (C_out, C_in/2, k, k), B (C_out, r/2, 1, 1), r = 4",
    "dilation": "1-D with dilation 2 and stride 3: A takes the base's dilation (PEFT does not; with this stride "
                "its output sizes agree, so a missing dilation is a wrong number, not an error)",
    "dropout": "1-D with a dropout mask on x, on the adapter branch only",
    "merge_1d": "merge(W, A, B) = W + s sum_r B[o, r] A[r, i, t], (C_out, C_in, k)",
    "merge_2d": "the same for a 2-D kernel (3, 3), C_in != C_out",
    "grad_x": "dL/dx for L = sum(y * dy), 2-D, padding 1, dilation 2, a dropout mask",
    "grad_A": "dL/dA, same case",
    "grad_B": "dL/dB, same case",
}
"""Every conv property, with what it checks."""

CONV_DEFAULT_PROPERTIES = tuple(CONV_PROPERTIES)
_NEEDS = {"merge_1d": "merge", "merge_2d": "merge", "grad_x": "grad", "grad_A": "grad", "grad_B": "grad"}
_GRAD = dict(C_in=3, C_out=4, size=(6, 5), kernel=(3, 2), r=2, alpha=3.0,
             geometry=dict(padding=(1, 0), dilation=(2, 1)), mask=True)
_SPECS = {
    "forward_1d": dict(C_in=4, C_out=6, size=(9,), kernel=(3,), r=2, alpha=4.0, geometry=dict(padding=1)),
    "forward_2d": dict(C_in=4, C_out=4, size=(7, 6), kernel=(3, 3), r=2, alpha=4.0, geometry=dict(stride=2, padding=1)),
    "forward_rslora": dict(C_in=4, C_out=6, size=(9,), kernel=(3,), r=4, alpha=8.0, use_rslora=True,
                           geometry=dict(padding=1)),
    "groups": dict(C_in=4, C_out=6, size=(6, 6), kernel=(3, 3), r=4, alpha=4.0, geometry=dict(padding=1, groups=2)),
    "dilation": dict(C_in=4, C_out=4, size=(11,), kernel=(3,), r=2, alpha=4.0, geometry=dict(stride=3, dilation=2)),
    "dropout": dict(C_in=4, C_out=6, size=(9,), kernel=(3,), r=2, alpha=4.0, geometry=dict(padding=1), mask=True),
    "merge_1d": dict(C_in=4, C_out=6, size=(9,), kernel=(3,), r=2, alpha=4.0, geometry={}),
    "merge_2d": dict(C_in=3, C_out=5, size=(6, 6), kernel=(3, 3), r=2, alpha=4.0, geometry={}),
    "grad_x": _GRAD, "grad_A": _GRAD, "grad_B": _GRAD,
}


def draw_conv_case(spec: dict[str, Any], seed: Any) -> dict[str, np.ndarray]:
    """float64 standard normal x (2, C_in, *size), W (C_out, C_in/groups, *kernel) scaled by
    1/sqrt(fan_in), A (r, C_in, *kernel), B (C_out, r/groups, 1...), bias, dy, and a dropout mask
    (p = 1/2: entries 0 and 2) when ``spec["mask"]``."""
    rng = np.random.default_rng(seed)
    G, k, n = spec["geometry"].get("groups", 1), tuple(spec["kernel"]), len(spec["kernel"])
    fan_in = spec["C_in"] // G * math.prod(k)
    case = {"x": rng.standard_normal((2, spec["C_in"]) + tuple(spec["size"])),
            "W": rng.standard_normal((spec["C_out"], spec["C_in"] // G) + k) / math.sqrt(fan_in),
            "A": rng.standard_normal((spec["r"], spec["C_in"]) + k) / math.sqrt(spec["C_in"] * math.prod(k)),
            "B": rng.standard_normal((spec["C_out"], spec["r"] // G) + (1,) * n),
            "bias": rng.standard_normal(spec["C_out"])}
    geo = {key: v for key, v in spec["geometry"].items() if key != "groups"}
    out = conv_output_shape(tuple(spec["size"]), k, **geo)
    case["dy"] = rng.standard_normal((2, spec["C_out"]) + out)
    if spec.get("mask"):
        case["dropout_mask"] = (rng.random(case["x"].shape) >= 0.5) * 2.0
    return case


def conv_calls(case: dict[str, np.ndarray], settings: dict[str, Any], dtype: str, which: Sequence[str],
               extra_roundings: int = 0) -> list[Call]:
    """The calls of the conv contract on a case (arrays cast to ``dtype``): ``"impl"`` (y),
    ``"merge"`` (W_merged), ``"grad"`` ((dx, dA, dB)). ``settings``: alpha, r, use_rslora and
    the geometry (stride, padding, dilation, groups; absent ones take PyTorch's defaults)."""
    c = {k: np.ascontiguousarray(v.astype(dtype)) for k, v in case.items()}
    geometry = {"stride": 1, "padding": 0, "dilation": 1, "groups": 1, **settings.get("geometry", {})}
    alpha, r, rs = settings["alpha"], settings["r"], settings.get("use_rslora", False)
    ref = conv_reference(c["x"], c["W"], c["A"], c["B"], lora_scale(alpha, r, rs), geometry, bias=c["bias"],
                         dropout_mask=c.get("dropout_mask"), dy=c["dy"] if "grad" in which else None)
    n_pos = c["x"].shape[0] * math.prod(ref["y"].shape[2:])
    counts = conv_rounding_counts(c["x"].shape[1], c["W"].shape[0], c["W"].shape[2:], r, n_pos)
    options = {"alpha": alpha, "r": r, "use_rslora": rs}
    layer = dict(options, bias=c["bias"], dropout_mask=c.get("dropout_mask"), **geometry)

    def out(name: str, pick: int | None = None) -> Output:
        return ref_output(ref, counts, name, dtype, extra_roundings, pick)

    calls = {"impl": Call("impl", (c["x"], c["W"], c["A"], c["B"]), ("x", "W", "A", "B"), layer, (out("y"),))}
    if "merge" in which:
        calls["merge"] = Call("merge", (c["W"], c["A"], c["B"]), ("W", "A", "B"), options, (out("W_merged"),))
    if "grad" in which:
        calls["grad"] = Call("grad", (c["x"], c["W"], c["A"], c["B"], c["dy"]), ("x", "W", "A", "B", "dy"), layer,
                             (out("dx", 0), out("dA", 1), out("dB", 2)), ("dx", "dA", "dB"))
    return [calls[w] for w in which]


def _build(name: str, dtype: str, seed: int) -> Call:
    spec = _SPECS[name]
    case = draw_conv_case(spec, (seed, list(CONV_PROPERTIES).index(name)))
    return property_call(name, lambda which: conv_calls(case, spec, dtype, [which])[0])


def check_lora_conv(impl: Callable, *, merge: Callable | None = None, grad: Callable | None = None,
                    properties: Iterable[str] | None = None, dtypes: Sequence[str] = ("float64", "float32"),
                    seed: int = 0) -> LoraCheckReport:
    """Run the convolution properties (:data:`CONV_PROPERTIES`) against your implementation.

    Parameters
    ----------
    impl : callable
        ``impl(x, W, A, B, *, alpha, r, use_rslora, bias, stride, padding, dilation, groups,
        dropout_mask) -> y`` (N, C_out, *O), channels first as ``torch.nn.functional.conv1d/2d``:
        x (N, C_in, *S), W (C_out, C_in/groups, *k), A (r, C_in, *k) (PEFT's ``lora_A.weight``),
        B (C_out, r/groups, 1, ...) (``lora_B.weight``), bias (C_out,); stride, padding (zeros)
        and dilation are tuples with one int per spatial axis, or ints; A uses the base's stride,
        padding and dilation with groups 1, B is a 1x1 convolution with the base's groups.
        ``dropout_mask`` (x's shape, or None) multiplies x on the adapter branch only.
    merge : callable, optional
        ``merge(W, A, B, *, alpha, r, use_rslora) -> W_merged``, W's shape (groups 1 only):
        ``W + s sum_r B[o, r] A[r, i, ...]``.
    grad : callable, optional
        ``grad(x, W, A, B, dy, *, <impl's keywords>) -> (dx, dA, dB)``, gradients of ``sum(y * dy)``.
    properties, dtypes, seed
        As in every check (:mod:`lora_ref.testing`); dtypes float64 and/or float32.
    """
    return run_check(impl=impl, callables={"merge": merge, "grad": grad}, properties=properties, dtypes=dtypes,
                     seed=seed, known=CONV_PROPERTIES, default=CONV_DEFAULT_PROPERTIES, needs=_NEEDS,
                     allowed=("float32", "float64"), build=_build)
