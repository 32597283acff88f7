"""The golden cases of every variant (format v2, :mod:`lora_ref.vectors`): built from the kit's own
calls, so a vector checks exactly what the kit's property checks, and rebuilt into calls to check
an implementation against a loaded case.

Each kind has a builder (its cases: inputs, params, outputs with their tolerances, a formula)
and a reader (:func:`case_calls`: the case's inputs and params back into the calls of the
kind's contract, the same callables and signatures as ``check_<kind>``). docs/vectors-format.md
lists every kind's tensors and params.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ..cases import LoraCase, normal_entries
from ..lora import lora_scale
from ..serving import Segments
from . import (adapters as kad, combine as kco, conv as kcv, dora as kdo, embedding as kem, quant as kqu,
               serving as kse)
from .core import Call, Output, numpy_dtype
from .linear import linear_calls

__all__ = ["EXTRA_ROUNDINGS", "KINDS", "GoldenCase", "GoldenOutput", "build_cases", "case_calls"]

EXTRA_ROUNDINGS = 2
"""Added to every tolerance output's rounding count: rounding ``expected`` to the case's dtype
and subtracting in it, so a consumer may compare in the case's dtype instead of float64."""


@dataclass(frozen=True)
class GoldenOutput:
    """One expected output: ``rule`` "tolerance" (``|yours - expected| <= rtol * magnitude``, or
    ``<= atol``; expected and magnitude float64) or "exact" (bit for bit; expected in the output's
    own dtype). ``dtype`` is the dtype your value must have ("any": any floating dtype)."""

    name: str
    rule: str
    expected: np.ndarray
    dtype: str
    magnitude: np.ndarray | None = None
    roundings: int = 0
    rtol: float = 0.0
    atol: float = 0.0

    @classmethod
    def from_output(cls, out: Output, name: str | None = None) -> GoldenOutput:
        if out.magnitude is None:
            return cls(name or out.name, "exact", np.array(out.expected, order="C"), out.expected.dtype.name)
        mag = np.array(np.broadcast_to(out.magnitude, out.expected.shape), dtype=np.float64, order="C")
        return cls(name or out.name, "tolerance", np.array(out.expected, dtype=np.float64, order="C"), out.dtype,
                   mag, out.roundings, out.rtol, float(out.rtol * mag.max()) if mag.size else 0.0)

    def output(self, pick: Any = None) -> Output:
        """This output as the kit's :class:`~lora_ref.kit.core.Output`, returned by ``pick``."""
        return Output(self.name, self.expected, self.dtype, self.magnitude, self.rtol, self.roundings, pick)


@dataclass(frozen=True)
class GoldenCase:
    """One golden case: its kind, storage dtype, params (JSON values), input tensors (by name, as
    in the file) and expected outputs (by name)."""

    name: str
    kind: str
    dtype: str
    description: str
    formula: str
    params: Mapping[str, Any]
    inputs: Mapping[str, np.ndarray]
    outputs: Mapping[str, GoldenOutput] = field(repr=False)

    @property
    def expected(self) -> dict[str, np.ndarray]:
        return {k: o.expected for k, o in self.outputs.items()}

    @property
    def magnitudes(self) -> dict[str, np.ndarray]:
        return {k: o.magnitude for k, o in self.outputs.items() if o.magnitude is not None}

    @property
    def tolerance(self) -> dict[str, dict[str, float]]:
        return {k: {"roundings": o.roundings, "rtol": o.rtol, "atol": o.atol}
                for k, o in self.outputs.items() if o.rule == "tolerance"}


def _seed(seed: int, name: str) -> tuple[int, int]:
    return (seed, zlib.crc32(name.encode()))     # each case its own stream: adding one changes no other


def _outputs(calls: list[Call], suffix: Mapping[int, str] | None = None) -> dict[str, GoldenOutput]:
    """Every output of the calls by name (the first of a repeated name), call k's names suffixed
    with ``suffix[k]`` where given (DoRA's exact gradients: ``dA_exact``)."""
    out: dict[str, GoldenOutput] = {}
    for k, call in enumerate(calls):
        for o in call.outputs:
            key = o.name + (suffix or {}).get(k, "")
            out.setdefault(key, GoldenOutput.from_output(o, key))
    return out


def _adapter_params(adapters: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [{"name": n, "alpha": a["alpha"], "r": a["r"], "use_rslora": a["use_rslora"],
             "scale": lora_scale(a["alpha"], a["r"], a["use_rslora"])} for n, a in adapters.items()]


def _adapters_from(case: GoldenCase, dtype: str | None = None) -> dict[str, dict[str, Any]]:
    return {a["name"]: {"A": case.inputs[f"A.{a['name']}"], "B": case.inputs[f"B.{a['name']}"], "alpha": a["alpha"],
                        "r": a["r"], "use_rslora": a["use_rslora"]} for a in case.params["adapters"]}


def _both(spec_list):
    return [(name, desc, spec, dtype) for name, desc, spec in spec_list for dtype in ("float64", "float32")]


# ============================================================================================
# lora_linear: the nine kinds of format v1, unchanged inputs
# ============================================================================================

_LINEAR = [
    ("plain", "plain LoRA, scale alpha/r = 8", LoraCase(d_in=8, d_out=6, r=2, alpha=16.0)),
    ("rslora", "rsLoRA, scale alpha/sqrt(r) = 4 (alpha/r would be 2)",
     LoraCase(d_in=8, d_out=6, r=4, alpha=8.0, use_rslora=True)),
    ("fan_in_fan_out", "W stored (d_in, d_out) as GPT-2's Conv1D; square, so a missed transpose is not a shape error",
     LoraCase(d_in=6, d_out=6, r=2, alpha=4.0, fan_in_fan_out=True)),
    ("dropout", "explicit inverted-dropout mask (p = 0.25) on the adapter branch only",
     LoraCase(d_in=8, d_out=6, r=2, alpha=4.0, dropout_p=0.25)),
    ("fused_qkv_q_v", "GPT-2 c_attn as loralib MergedLinear(enable_lora=[True, False, True], fan_in_fan_out=True): "
     "q and v adapted, k not", LoraCase(d_in=4, d_out=12, r=2, alpha=4.0, fan_in_fan_out=True,
                                        enable_lora=(True, False, True))),
    ("fused_k_v", "loralib MergedLinear(enable_lora=[False, True, True]) on an nn.Linear layout weight",
     LoraCase(d_in=5, d_out=9, r=1, alpha=2.0, enable_lora=(False, True, True))),
    ("rank_above_dim", "rank 6 above min(d_in, d_out) = 3; no bias; x is 2-D",
     LoraCase(d_in=3, d_out=4, r=6, alpha=3.0, batch_shape=(5,), has_bias=False)),
    ("rank_equals_dims", "r = d_in = d_out = 4: A and B square, so their layout cannot be guessed from the shapes",
     LoraCase(d_in=4, d_out=4, r=4, alpha=6.0)),
    ("rank_equals_d_out", "r = d_out = 3, d_in = 6: B square, A not", LoraCase(d_in=6, d_out=3, r=3, alpha=6.0)),
]


def _linear_formula(spec: LoraCase) -> str:
    s = "alpha / sqrt(r)" if spec.use_rslora else "alpha / r"
    W = "W.T" if not spec.fan_in_fan_out else "W"
    xd = "(x * dropout_mask)" if spec.dropout_p is not None else "x"
    bias = " + bias" if spec.has_bias else ""
    if spec.enable_lora is None:
        y = f"y = x @ {W}{bias} + s * (({xd} @ A.T) @ B.T)"
        dW = "s * (B @ A).T" if spec.fan_in_fan_out else "s * (B @ A)"
    else:
        enable = list(spec.enable_lora)
        g = [j for j, on in enumerate(enable) if on]
        y = (f"with enable_lora = {enable}: G = {len(enable)} blocks, n = {len(g)} enabled (g_k = {g} for k = "
             f"0..{len(g) - 1}), q = d_out / G; D is the (d_out, d_in) delta with D[g_k q + j, :] = "
             f"B[k q + j, :] @ A[k r:(k+1) r, :] for j < q, and the rows of disabled blocks 0; "
             f"y = x @ {W}{bias} + s * ({xd} @ D.T)")
        dW = ("s * D.T (block g is columns g q:(g+1) q of the stored W)" if spec.fan_in_fan_out
              else "s * D (block g is rows g q:(g+1) q of W)")
    return f"s = {s}; {y}; W_merged = W + {dW}; dx, dA, dB = gradients of sum(y * dy) with respect to x, A, B"


def _linear_cases(seed: int) -> list[GoldenCase]:
    out = []
    for name, desc, spec, dtype in _both(_LINEAR):
        full = f"{name}_{dtype}"
        case = replace(spec, name=full, dtype=dtype, seed=_seed(seed, full))
        case = case.draw(entries=normal_entries(scaled=("W", "A")), order=("W", "x", "A", "B", "bias", "dy", "mask"))
        calls = linear_calls(case, ["impl", "merge", "grad"], EXTRA_ROUNDINGS)
        named = {"x": case.x, "W": case.W_stored, "A": case.A, "B": case.B, "bias": case.bias, "dy": case.dy,
                 "dropout_mask": case.mask}
        params = {"alpha": spec.alpha, "r": spec.r, "use_rslora": spec.use_rslora, "scale": case.scale,
                  "fan_in_fan_out": spec.fan_in_fan_out,
                  "enable_lora": None if spec.enable_lora is None else list(spec.enable_lora), "dropout_p": spec.dropout_p}
        out.append(GoldenCase(full, "lora_linear", dtype, desc, _linear_formula(spec), params,
                              {k: np.ascontiguousarray(v) for k, v in named.items() if v is not None}, _outputs(calls)))
    return out


def _linear_calls(case: GoldenCase) -> dict[str, Call]:
    p, t, o = case.params, case.inputs, case.outputs
    opts = {"alpha": p["alpha"], "r": p["r"], "use_rslora": p["use_rslora"], "fan_in_fan_out": p["fan_in_fan_out"]}
    if p["enable_lora"] is not None:
        opts["enable_lora"] = tuple(p["enable_lora"])
    layer = dict(opts, bias=t.get("bias"), dropout_mask=t.get("dropout_mask"))
    return {"impl": Call("impl", (t["x"], t["W"], t["A"], t["B"]), ("x", "W", "A", "B"), layer, (o["y"].output(),)),
            "merge": Call("merge", (t["W"], t["A"], t["B"]), ("W", "A", "B"), opts, (o["W_merged"].output(),)),
            "grad": Call("grad", (t["x"], t["W"], t["A"], t["B"], t["dy"]), ("x", "W", "A", "B", "dy"), layer,
                         (o["dx"].output(0), o["dA"].output(1), o["dB"].output(2)), ("dx", "dA", "dB"))}


# ============================================================================================
# dora_linear: forward, initial magnitude, merge, both gradients
# ============================================================================================

_DORA = [
    ("dora_plain", "DoRA, m trained (not ||W + s B A||), bias", LoraCase(d_in=7, d_out=5, r=3, alpha=6.0)),
    ("dora_rslora", "DoRA with rsLoRA's scale alpha/sqrt(r)", LoraCase(d_in=7, d_out=5, r=4, alpha=8.0, use_rslora=True)),
    ("dora_dropout", "DoRA with PEFT's dropout: the outer base term on the clean x",
     LoraCase(d_in=7, d_out=5, r=3, alpha=6.0, dropout_p=0.5)),
    ("dora_fan_in_fan_out", "DoRA with W stored (d_in, d_out) (GPT-2 Conv1D); the norm is still per output feature",
     LoraCase(d_in=6, d_out=6, r=2, alpha=4.0, fan_in_fan_out=True)),
]
_DORA_FORMULA = ("s = alpha / r (alpha / sqrt(r) if use_rslora); Wm = W.T if fan_in_fan_out else W, (d_out, d_in); "
                 "V = Wm + s * (B @ A); C = sqrt(sum(V * V, axis=1)), (d_out,); f = m / C; xd = x * dropout_mask "
                 "(x without one); y = f * (xd @ V.T) + (x - xd) @ Wm.T + bias; m_init = C; W_merged = f[:, None] * V "
                 "(transposed back under fan_in_fan_out); dx, dA, dB, dm = gradients of sum(y * dy) with C held "
                 "constant (detach_norm=True, PEFT's); dA_exact, dB_exact the same through C (detach_norm=False); "
                 "dx and dm are the same for both")


def _dora_cases(seed: int) -> list[GoldenCase]:
    out = []
    for name, desc, spec, dtype in _both(_DORA):
        full = f"{name}_{dtype}"
        case, m = kdo.draw_dora_case(spec, _seed(seed, full))
        case, m = case.astype(dtype), m.astype(dtype)
        calls = kdo.dora_calls(case, m, ["impl", "magnitude", "merge", "grad", "grad_exact"], EXTRA_ROUNDINGS)
        outputs = _outputs(calls, {4: "_exact"})
        outputs = {k: v for k, v in outputs.items() if k not in ("dx_exact", "dm_exact")}   # equal to dx, dm
        named = {"x": case.x, "W": case.W_stored, "A": case.A, "B": case.B, "m": m, "bias": case.bias,
                 "dropout_mask": case.mask, "dy": case.dy}
        params = {"alpha": spec.alpha, "r": spec.r, "use_rslora": spec.use_rslora, "scale": case.scale,
                  "fan_in_fan_out": spec.fan_in_fan_out, "dropout_p": spec.dropout_p}
        out.append(GoldenCase(full, "dora_linear", dtype, desc, _DORA_FORMULA, params,
                              {k: np.ascontiguousarray(v) for k, v in named.items() if v is not None}, outputs))
    return out


def _dora_calls(case: GoldenCase) -> dict[str, Call]:
    p, t, o = case.params, case.inputs, case.outputs
    opts = {"alpha": p["alpha"], "r": p["r"], "use_rslora": p["use_rslora"], "fan_in_fan_out": p["fan_in_fan_out"]}
    layer = dict(opts, bias=t.get("bias"), dropout_mask=t.get("dropout_mask"))
    grad_args = (t["x"], t["W"], t["A"], t["B"], t["m"], t["dy"])
    names = ("x", "W", "A", "B", "m", "dy")
    return {"impl": Call("impl", (t["x"], t["W"], t["A"], t["B"], t["m"]), names[:5], layer, (o["y"].output(),)),
            "magnitude": Call("magnitude", (t["W"], t["A"], t["B"]), ("W", "A", "B"), opts, (o["m_init"].output(),)),
            "merge": Call("merge", (t["W"], t["A"], t["B"], t["m"]), ("W", "A", "B", "m"), opts,
                          (o["W_merged"].output(),)),
            "grad": Call("grad", grad_args, names, dict(layer, detach_norm=True),
                         (o["dx"].output(0), o["dA"].output(1), o["dB"].output(2), o["dm"].output(3)),
                         ("dx", "dA", "dB", "dm")),
            "grad_exact": Call("grad", grad_args, names, dict(layer, detach_norm=False),
                               (o["dA_exact"].output(1), o["dB_exact"].output(2)), ("dx", "dA", "dB", "dm"))}


# ============================================================================================
# lora_embedding and lora_conv
# ============================================================================================

_EMBEDDING = [("embedding_plain", "embedding LoRA, ids (2, 4) with a repeated id", (11, 5, 3, 6.0, False, 0.0)),
              ("embedding_rslora", "embedding LoRA with rsLoRA's scale", (11, 5, 4, 8.0, True, 0.0)),
              ("embedding_lora_dropout", "lora_dropout = 0.5 in the config: still no dropout on this path",
               (11, 5, 3, 6.0, False, 0.5))]
_EMBEDDING_FORMULA = ("s = alpha / r (alpha / sqrt(r) if use_rslora); y = E[ids] + s * (A.T[ids] @ B.T), no dropout "
                      "whatever lora_dropout is; E_merged = E + s * (B @ A).T; dA, dB = gradients of sum(y * dy) "
                      "(every occurrence of a repeated id adds to its column of dA)")


def _embedding_cases(seed: int) -> list[GoldenCase]:
    out = []
    for name, desc, (V, D, r, alpha, rs, p), dtype in _both(_EMBEDDING):
        full = f"{name}_{dtype}"
        case = kem.draw_embedding_case(V, D, r, (2, 4), _seed(seed, full))
        settings = {"alpha": alpha, "r": r, "use_rslora": rs, "lora_dropout": p}
        calls = kem.embedding_calls(case, settings, dtype, ["impl", "merge", "grad"], EXTRA_ROUNDINGS)
        inputs = {"ids": case["ids"], **{k: np.ascontiguousarray(case[k].astype(dtype)) for k in ("E", "A", "B", "dy")}}
        out.append(GoldenCase(full, "lora_embedding", dtype, desc, _EMBEDDING_FORMULA,
                              dict(settings, scale=lora_scale(alpha, r, rs)), inputs, _outputs(calls)))
    return out


def _embedding_calls(case: GoldenCase) -> dict[str, Call]:
    p, t, o = case.params, case.inputs, case.outputs
    opts = {"alpha": p["alpha"], "r": p["r"], "use_rslora": p["use_rslora"]}
    return {"impl": Call("impl", (t["ids"], t["E"], t["A"], t["B"]), ("ids", "E", "A", "B"),
                         dict(opts, lora_dropout=p["lora_dropout"]), (o["y"].output(),)),
            "merge": Call("merge", (t["E"], t["A"], t["B"]), ("E", "A", "B"), opts, (o["E_merged"].output(),)),
            "grad": Call("grad", (t["ids"], t["E"], t["A"], t["B"], t["dy"]), ("ids", "E", "A", "B", "dy"), opts,
                         (o["dA"].output(0), o["dB"].output(1)), ("dA", "dB"))}


_CONV = [("conv1d", "1-D conv LoRA, padding 1, a dropout mask", "dropout"),
         ("conv2d", "2-D conv LoRA, stride 2, padding 1", "forward_2d"),
         ("conv2d_groups", "2-D conv LoRA with groups 2 (no merged weight)", "groups"),
         ("conv1d_dilation", "1-D conv LoRA, dilation 2 and stride 3 (A takes the base's dilation)", "dilation")]
_CONV_FORMULA = ("s = alpha / r (alpha / sqrt(r) if use_rslora); y = conv(x, W, bias, stride, padding, dilation, "
                 "groups) + s * conv(conv(x * dropout_mask, A, stride, padding, dilation, groups=1), B, groups=groups) "
                 "(conv: torch.nn.functional.conv1d/2d, B a 1x1 kernel); W_merged[o, i, ...] = W + s * sum_k B[o, k, "
                 "...] A[k, i, ...] (groups 1 only); dx, dA, dB = gradients of sum(y * dy)")


def _geometry(spec: Mapping[str, Any]) -> dict[str, Any]:
    n = len(spec["kernel"])
    geo = {"stride": 1, "padding": 0, "dilation": 1, "groups": 1, **spec["geometry"]}
    return {k: (v if k == "groups" else list((v,) * n if isinstance(v, int) else v)) for k, v in geo.items()}


def _conv_cases(seed: int) -> list[GoldenCase]:
    out = []
    for name, desc, prop, dtype in _both(_CONV):
        full = f"{name}_{dtype}"
        spec = kcv._SPECS[prop]
        case = kcv.draw_conv_case(spec, _seed(seed, full))
        geo = _geometry(spec)
        settings = {"alpha": spec["alpha"], "r": spec["r"], "use_rslora": spec.get("use_rslora", False),
                    "geometry": {k: (tuple(v) if isinstance(v, list) else v) for k, v in geo.items()}}
        which = ["impl", "grad"] + (["merge"] if geo["groups"] == 1 else [])
        calls = kcv.conv_calls(case, settings, dtype, which, EXTRA_ROUNDINGS)
        params = {"alpha": spec["alpha"], "r": spec["r"], "use_rslora": settings["use_rslora"],
                  "scale": lora_scale(spec["alpha"], spec["r"], settings["use_rslora"]), **geo}
        out.append(GoldenCase(full, "lora_conv", dtype, desc, _CONV_FORMULA, params,
                              {k: np.ascontiguousarray(v.astype(dtype)) for k, v in case.items()}, _outputs(calls)))
    return out


def _conv_calls(case: GoldenCase) -> dict[str, Call]:
    p, t, o = case.params, case.inputs, case.outputs
    opts = {"alpha": p["alpha"], "r": p["r"], "use_rslora": p["use_rslora"]}
    layer = dict(opts, bias=t["bias"], dropout_mask=t.get("dropout_mask"), groups=p["groups"],
                 **{k: tuple(p[k]) for k in ("stride", "padding", "dilation")})
    calls = {"impl": Call("impl", (t["x"], t["W"], t["A"], t["B"]), ("x", "W", "A", "B"), layer, (o["y"].output(),)),
             "grad": Call("grad", (t["x"], t["W"], t["A"], t["B"], t["dy"]), ("x", "W", "A", "B", "dy"), layer,
                          (o["dx"].output(0), o["dA"].output(1), o["dB"].output(2)), ("dx", "dA", "dB"))}
    if "W_merged" in o:
        calls["merge"] = Call("merge", (t["W"], t["A"], t["B"]), ("W", "A", "B"), opts, (o["W_merged"].output(),))
    return calls


# ============================================================================================
# adapter_set and mixed_batch
# ============================================================================================

_SCALES = "s_a = alpha_a / r_a (alpha_a / sqrt(r_a) if use_rslora); "
_SET_FORMULA = (_SCALES + "y = x @ W.T + bias + sum over a in active (in order) of s_a * ((x @ A_a.T) @ B_a.T); "
                "W_merged = W + sum over a in merged of s_a * (B_a @ A_a)")
_SET_FIFO_FORMULA = (_SCALES + "W stored (d_in, d_out) (fan_in_fan_out), Wm = W.T; y = x @ Wm.T + bias + sum over a "
                     "in active (in order) of s_a * ((x @ A_a.T) @ B_a.T); W_merged = W + (sum over a in merged of "
                     "s_a * (B_a @ A_a)).T, in W's stored layout: W_merged[i, o] = W[i, o] + that sum's [o, i]")
_MIXED_FORMULA = ("s_a as for adapter_set; y[n] = x[n] @ W.T + bias + s_a * ((x[n] @ A_a.T) @ B_a.T) with a = "
                  "names[n], and y[n] = x[n] @ W.T + bias where names[n] is '__base__'")
_SETS = [  # (kind, name, description, (d_in, d_out), active or names, merged, fan_in_fan_out)
    ("adapter_set", "adapters_active", "three adapters (ranks 2, 3, 4; 'b' rsLoRA), 'c' then 'b' active, 'a' and 'b' "
     "merged: each output leaves one adapter out and uses the rsLoRA one", (7, 5), ["c", "b"], ["a", "b"], False),
    ("adapter_set", "adapters_fan_in_fan_out", "W stored (d_in, d_out) as GPT-2's Conv1D, square (6 x 6) so a merge "
     "that forgets the transpose is not a shape error; 'b' then 'a' active, all three merged", (6, 6), ["b", "a"],
     ["a", "b", "c"], True),
    ("mixed_batch", "adapters_mixed", "five samples named a, __base__, c, a, b", (7, 5),
     ["a", "__base__", "c", "a", "b"], None, None),
]


def _set_cases(seed: int) -> list[GoldenCase]:
    out = []
    for kind, name, desc, (d_in, d_out), names, merged, fifo in _SETS:
        for dtype in ("float64", "float32"):
            full = f"{name}_{dtype}"
            x, W, bias, ads = kad._draw(d_in, d_out, (5, 3) if kind == "mixed_batch" else (2, 3), _seed(seed, full))
            cast = lambda a: np.ascontiguousarray(a.astype(dtype))  # noqa: E731
            x, W, bias, ads = cast(x), cast(W), cast(bias), kad.cast_adapters(ads, dtype)  # W (d_out, d_in)
            stored = np.ascontiguousarray(W.T) if fifo else W                        # (d_in, d_out) under fifo
            if kind == "adapter_set":
                calls = [kad.adapter_set_calls(x, W, bias, ads, "impl", names, extra_roundings=EXTRA_ROUNDINGS),
                         kad.adapter_set_calls(x, stored, bias, ads, "merge", merged, fan_in_fan_out=fifo,
                                               extra_roundings=EXTRA_ROUNDINGS)]
                params = {"adapters": _adapter_params(ads), "active": names, "merged": merged, "fan_in_fan_out": fifo}
            else:
                calls = [kad.adapter_set_calls(x, W, bias, ads, "mixed", names, extra_roundings=EXTRA_ROUNDINGS)]
                params = {"adapters": _adapter_params(ads), "names": names}
            formula = {False: _SET_FORMULA, True: _SET_FIFO_FORMULA, None: _MIXED_FORMULA}[fifo]
            inputs = {"x": x, "W": stored, "bias": bias, **{f"{p}.{n}": a[p] for n, a in ads.items() for p in "AB"}}
            out.append(GoldenCase(full, kind, dtype, desc, formula, params, inputs, _outputs(calls)))
    return out


def _set_calls(case: GoldenCase) -> dict[str, Call]:
    t, o, p = case.inputs, case.outputs, case.params
    ads = _adapters_from(case)
    if case.kind == "mixed_batch":
        return {"impl": Call("impl", (t["x"], t["W"], ads, list(p["names"])), ("x", "W", "adapters", "names"),
                             {"bias": t["bias"]}, (o["y"].output(),))}
    W = t["W"].T if p["fan_in_fan_out"] else t["W"]        # impl takes the (d_out, d_in) weight
    return {"impl": Call("impl", (t["x"], W, ads, list(p["active"])), ("x", "W", "adapters", "active"),
                         {"bias": t["bias"]}, (o["y"].output(),)),
            "merge": Call("merge", (t["W"], ads, list(p["merged"])), ("W", "adapters", "names"),
                          {"fan_in_fan_out": p["fan_in_fan_out"]}, (o["W_merged"].output(),))}


# ============================================================================================
# lora_shrink and lora_expand (float64 and float32, plus float16 and bfloat16 per-token cases)
# ============================================================================================

_SERVING = [  # (name, description, which, draw options, scale, dtypes)
    ("shrink_bgmv", "per-token slots with -1 tokens, ranks 2, 4, 3 padded to 4, scale 0.75", "shrink",
     {"indices": "no_adapter"}, 0.75, kse.STORAGE_DTYPES),
    ("shrink_sgmv", "segments (starts, lengths, one slot each) with a -1 segment", "shrink",
     {"indices": kse._SEGMENTS}, 1.0, ("float64", "float32")),
    ("shrink_slices", "three slices (q/k/v), one A stack each", "shrink", {"widths": (4, 2, 2), "gap": 1}, 1.0,
     ("float64", "float32")),
    ("expand_bgmv", "per-token slots with -1 tokens (their rows of y unchanged)", "expand",
     {"indices": "no_adapter"}, 1.0, kse.STORAGE_DTYPES),
    ("expand_sgmv", "segments with a -1 segment", "expand", {"indices": kse._SEGMENTS}, 1.0, ("float64", "float32")),
    ("expand_slices", "three slices of widths 4, 2, 2, a column in no slice around each (unchanged)", "expand",
     {"widths": (4, 2, 2), "gap": 1}, 1.0, ("float64", "float32")),
]
_SHRINK_FORMULA = ("(V1) Acc = float64 for float64 storage, float32 otherwise; fl_D rounds to D; for each slice s "
                   "and token t with i = indices[t]: h[s, t, k] = fl_Acc(fl_Acc(sum_j x[t, j] A_stack[s, i, k, j]) * "
                   "fl_Acc(scale)) if i >= 0 (the sum in Acc, any order), h[s, t, k] = 0 if i = -1")
_EXPAND_FORMULA = ("(V2) fl_D rounds to D; for each slice s = (offset, width) and token t with i = indices[t] >= 0: "
                   "c[t, o] = fl_S(sum_k fl_S(h[s, t, k]) B_stack.s[i, o, k]), the sum over k in Acc, then "
                   "y_out[t, offset + o] = fl_S(y[t, offset + o] + c[t, o]), the add in Acc, for o < width; every "
                   "other entry of y_out (tokens with i = -1, columns in no slice) equals y bit for bit")


def _serving_cases(seed: int) -> list[GoldenCase]:
    out = []
    for name, desc, which, opts, scale, dtypes in _SERVING:
        for dtype in dtypes:
            full = f"{name}_{dtype}"
            case = kse.draw_serving_case(dtype, _seed(seed, full), **opts)
            call = kse.serving_calls(case, which, scale=scale, extra_roundings=EXTRA_ROUNDINGS)
            idx = case["indices"]
            tokens = kse.token_indices(idx, 7) if isinstance(idx, Segments) else idx
            inputs = {"indices": np.asarray(tokens, dtype=np.int64)}
            if isinstance(idx, Segments):
                inputs.update({f"seg_{k}": np.asarray(getattr(idx, k), dtype=np.int64)
                               for k in ("starts", "lengths", "indices")})
            stacks = kse._stacks(case)
            params = {"index_kind": "sgmv" if isinstance(idx, Segments) else "bgmv", "n_slices": len(case["slices"]),
                      "accumulation_dtype": kse.accumulation_dtype(dtype)}
            if which == "shrink":
                inputs.update(x=case["x"], A_stack=np.ascontiguousarray(np.stack(stacks[0])))
                params["scale"] = scale
            else:
                inputs.update(y=case["y"], h=case["h"], **{f"B_stack.{k}": B for k, B in enumerate(stacks[1])})
                params["slices"] = [list(s) for s in case["slices"]]
            out.append(GoldenCase(full, f"lora_{which}", dtype, desc,
                                  _SHRINK_FORMULA if which == "shrink" else _EXPAND_FORMULA, params,
                                  {k: np.ascontiguousarray(v) for k, v in inputs.items()}, _outputs([call])))
    return out


def _indices(case: GoldenCase) -> Any:
    t = case.inputs
    if case.params["index_kind"] == "sgmv":
        return Segments(t["seg_starts"], t["seg_lengths"], t["seg_indices"])
    return t["indices"]


def _serving_calls(case: GoldenCase) -> dict[str, Call]:
    t, o, p = case.inputs, case.outputs, case.params
    if case.kind == "lora_shrink":
        A_stack = [t["A_stack"][s] for s in range(p["n_slices"])]
        return {"impl": Call("impl", (t["x"], A_stack, _indices(case), p["scale"]), ("x", "A_stack", "indices", "scale"),
                             {}, (o["h"].output(),))}
    B_stack = [t[f"B_stack.{s}"] for s in range(p["n_slices"])]
    slices = [tuple(s) for s in p["slices"]]
    return {"impl": Call("impl", (t["y"], t["h"], B_stack, _indices(case), slices),
                         ("y", "h", "B_stack", "indices", "slices"), {}, (o["y"].output(),))}


# ============================================================================================
# combine_adapters (every method in float64; linear and svd in float32 too) and quantize_4bit
# ============================================================================================

_COMBINE_FORMULA = ("s_i = alpha_i / r_i (alpha_i / sqrt(r_i) if use_rslora); the method combines the adapters "
                    "with weights w_i (lora_ref.combine, PEFT 0.21.2's add_weighted_adapter; exact and cat: "
                    "sum_i w_i s_i B_i A_i); delta = scale * (B @ A) of the combined adapter (A, B, scale), formed in "
                    "float64; the expected scale is 1 (r = alpha = the new rank)")


def _combine_cases(seed: int) -> list[GoldenCase]:
    out = []
    todo = [(p, "float64") for p in kco.COMBINE_PROPERTIES] + [("linear", "float32"), ("svd", "float32")]
    for prop, dtype in todo:
        full = f"combine_{prop}_{dtype}"
        case = kco.draw_combine_case(prop, _seed(seed, full))
        call = kco.combine_calls(case, dtype, EXTRA_ROUNDINGS)
        ads = call.args[0]
        inputs = {f"{p}.{n}": a[p] for n, a in ads.items() for p in ("A", "B")}
        masks = call.kwargs["masks"]
        for n, m in (masks or {}).items():
            if isinstance(m, tuple):
                inputs.update({f"mask_A.{n}": m[0], f"mask_B.{n}": m[1]})
            else:
                inputs[f"mask.{n}"] = m
        params = {"adapters": _adapter_params(ads), "weights": list(case["weights"]), "method": case["method"],
                  "density": case["density"], "majority_sign": case["majority_sign"], "rank": case["rank"],
                  "masks": "none" if masks is None else ("delta" if case["method"].endswith("svd") else "factor")}
        desc = kco.COMBINE_PROPERTIES[prop]
        out.append(GoldenCase(full, "combine_adapters", dtype, desc, _COMBINE_FORMULA, params,
                              {k: np.ascontiguousarray(v) for k, v in inputs.items()}, _outputs([call])))
    return out


def _combine_calls(case: GoldenCase) -> dict[str, Call]:
    t, p = case.inputs, case.params
    names = [a["name"] for a in p["adapters"]]
    masks = None
    if p["masks"] == "factor":
        masks = {n: (t[f"mask_A.{n}"], t[f"mask_B.{n}"]) for n in names}
    elif p["masks"] == "delta":
        masks = {n: t[f"mask.{n}"] for n in names}
    first = case.inputs[f"A.{names[0]}"]
    r = p["adapters"][0]["r"]
    pick = kco._delta(t[f"B.{names[0]}"].shape[0], first.shape[1], case.dtype, p["rank"],
                      r if p["method"] in kco.FACTOR_METHODS else None)
    kwargs = {"density": p["density"], "majority_sign": p["majority_sign"], "masks": masks, "rank": p["rank"]}
    return {"impl": Call("impl", (_adapters_from(case), list(p["weights"]), p["method"]),
                         ("adapters", "weights", "method"), kwargs, (case.outputs["delta"].output(pick),))}


_QUANT = [("quant_nf4", "nf4", "float32"), ("quant_fp4", "fp4", "bfloat16"),
          ("quant_blocks_span_rows", "blocks_span_rows", "float16"), ("quant_odd_count", "odd_count", "float32"),
          ("quant_ties", "ties", "float32"), ("quant_double_quant", "double_quant", "float32")]
_QUANT_FORMULA = ("bitsandbytes 0.50.2's 4-bit quantisation on the CPU (lora_ref.quant): W flattened row-major, "
                  "blocks of blocksize values (spanning rows; the last may be partial), absmax per block (float32), "
                  "each value scaled into [-1, 1] and replaced by the code of its nearest level (halfway: the lower), "
                  "two codes per byte with the first value in the high nibble; double_quant: absmax minus its mean "
                  "(nested_offset) quantised to 8 bits in blocks of 256; W_dequantized = level[code] * absmax in "
                  "float32, cast to W's dtype, from the expected state")


def _quant_cases(seed: int) -> list[GoldenCase]:
    out = []
    for name, prop, dtype in _QUANT:
        shape, blocksize, quant_type, dq = kqu._SPECS[prop]
        shape = (4, 1040) if dq else shape                      # 65 blocks, one nested block: small files
        W = kqu.draw_quant_case(shape, blocksize, quant_type, _seed(seed, name), ties=prop == "ties",
                                dyadic_absmax=dq).astype(numpy_dtype(dtype))
        calls = [kqu.quant_calls(W, blocksize, quant_type, dq, "impl"),
                 kqu.quant_calls(W, blocksize, quant_type, dq, "dequantize")]
        outputs = _outputs(calls)
        outputs["W_dequantized"] = replace(outputs.pop("W"), name="W_dequantized")
        if dq:                                                   # the offset: a float32 scalar, compared exactly
            off = outputs["nested_offset"]
            outputs["nested_offset"] = GoldenOutput("nested_offset", "exact", np.asarray(off.expected, np.float32),
                                                    "float32")
        params = {"blocksize": blocksize, "quant_type": quant_type, "double_quant": dq, "shape": list(shape)}
        out.append(GoldenCase(f"{name}_{dtype}", "quantize_4bit", dtype, kqu.QUANT_PROPERTIES[prop], _QUANT_FORMULA,
                              params, {"W": np.ascontiguousarray(W)}, outputs))
    return out


def _quant_calls(case: GoldenCase) -> dict[str, Call]:
    p, o = case.params, case.outputs
    outs = [o["weight"].output(kqu._weight(case.inputs["W"].size)), o["absmax"].output("absmax")]
    if p["double_quant"]:
        outs.append(o["nested_absmax"].output("nested_absmax"))
        off = o["nested_offset"]
        outs.append(Output("nested_offset", off.expected.astype(np.float64), "any", np.zeros(()), 0.0, 0,
                           "nested_offset"))
    settings = {"blocksize": p["blocksize"], "quant_type": p["quant_type"]}
    deq = dict(settings, shape=tuple(p["shape"]), dtype=case.dtype,
               nested_absmax=o["nested_absmax"].expected if p["double_quant"] else None,
               nested_offset=float(o["nested_offset"].expected) if p["double_quant"] else None)
    return {"impl": Call("impl", (case.inputs["W"],), ("W",), dict(settings, double_quant=p["double_quant"]),
                         tuple(outs)),
            "dequantize": Call("dequantize", (o["weight"].expected, o["absmax"].expected), ("weight", "absmax"), deq,
                               (o["W_dequantized"].output(),))}


# ============================================================================================
# The registry
# ============================================================================================

KINDS: dict[str, dict[str, Any]] = {
    "lora_linear": {"build": _linear_cases, "calls": _linear_calls, "callables": ("merge", "grad")},
    "dora_linear": {"build": _dora_cases, "calls": _dora_calls, "callables": ("magnitude", "merge", "grad")},
    "lora_embedding": {"build": _embedding_cases, "calls": _embedding_calls, "callables": ("merge", "grad")},
    "lora_conv": {"build": _conv_cases, "calls": _conv_calls, "callables": ("merge", "grad")},
    "adapter_set": {"build": _set_cases, "calls": _set_calls, "callables": ("merge",)},
    "mixed_batch": {"build": None, "calls": _set_calls, "callables": ()},
    "lora_shrink": {"build": _serving_cases, "calls": _serving_calls, "callables": ()},
    "lora_expand": {"build": None, "calls": _serving_calls, "callables": ()},
    "combine_adapters": {"build": _combine_cases, "calls": _combine_calls, "callables": ()},
    "quantize_4bit": {"build": _quant_cases, "calls": _quant_calls, "callables": ("dequantize",)},
}
"""Every kind of golden case: its builder (None where another kind's builder makes its cases too),
the reader of its calls, and the optional callables of its contract (as ``check_<kind>``)."""


def build_cases(seed: int = 0) -> list[GoldenCase]:
    """Every golden case of every kind, in a fixed order, deterministic in ``seed``."""
    return [case for spec in KINDS.values() if spec["build"] is not None for case in spec["build"](seed)]


def case_calls(case: GoldenCase) -> dict[str, Call]:
    """The calls of ``case``'s contract, keyed by callable (``"impl"``, ``"merge"``, ``"grad"``,
    ``"grad_exact"`` (DoRA's exact gradient, made with the ``grad`` callable), ...)."""
    if case.kind not in KINDS:
        raise ValueError(f"unknown case kind {case.kind!r}; the kinds are {', '.join(KINDS)}")
    return KINDS[case.kind]["calls"](case)
