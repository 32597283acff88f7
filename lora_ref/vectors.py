"""Golden vectors: LoRA cases with their expected outputs, as files any language can read.

``write_vectors(out_dir)`` (or ``lora-ref vectors OUT_DIR``) writes one safetensors file per case
and a ``manifest.json``; :func:`load_vectors` reads them back, checking the format version and
every file; :func:`check_against_vectors` runs your implementation on them (the same callable
contract as :func:`lora_ref.testing.check_lora_linear`). docs/oracle.md shows a PyTorch consumer.

Each case (a ``<name>.safetensors`` file) holds

* inputs, in the case's dtype: ``x`` (*batch, d_in); ``W`` (d_out, d_in), or (d_in, d_out) when
  the case's ``fan_in_fan_out`` is true; ``A`` (n r, d_in); ``B`` (n q, r); ``bias`` (d_out,)
  when the case has one; ``dropout_mask`` (x's shape) when it has one; ``dy`` (*batch, d_out),
  the upstream gradient;
* expected outputs, always **float64**, computed by lora-ref in float64 from the stored inputs
  (upcast exactly, so a float32 case's expected values carry no float32 rounding): ``y``,
  ``W_merged`` (in W's layout), and ``dx``, ``dA``, ``dB``, the gradients of ``sum(y * dy)``;
* ``magnitude.<output>`` (float64): each output evaluated on the absolute values of the inputs,
  the ``M`` of the error bound.

The manifest gives, for each case and output, ``roundings`` n (:func:`lora_ref.testing.rounding_counts`
plus 2), ``rtol`` and ``atol``. Your output passes when, entry by entry::

    |yours - expected| <= rtol * magnitude          (tight)   or
    |yours - expected| <= atol = max(rtol * magnitude)       (one number, simpler, looser)

with ``rtol = (gamma_n(dtype) + gamma_n(float64)) / (1 - gamma_n(float64))``
(:func:`lora_ref.testing.reference_rtol`): your rounding in the case's dtype plus the reference's
in float64. The 2 extra roundings let you round ``expected`` to the case's dtype and subtract in
that dtype if you prefer not to compare in float64.

Plain cases n = 1 (one block); fused cases (loralib ``MergedLinear``) carry ``enable_lora``:
W's rows are ``len(enable_lora)`` equal blocks of q rows, n of them enabled.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import numbers
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .cases import LoraCase, normal_entries
from .checks import non_negative_int
from .testing import (LoraCheckReport, PropertyResult, compare_to_reference, reference_outputs,
                      reference_rtol, rounding_counts)

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "GoldenCase",
    "check_against_vectors",
    "golden_cases",
    "load_vectors",
    "write_vectors",
]

FORMAT = "lora-ref-golden-vectors"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
OUTPUTS = ("y", "W_merged", "dx", "dA", "dB")
EXTRA_ROUNDINGS = 2  # rounding `expected` to the case's dtype, and the subtraction in it

_COMPARISON = ("pass when |yours - expected| <= rtol * magnitude entry by entry (or, simpler and "
               "looser, <= atol = the largest rtol * magnitude), comparing in float64; "
               "rtol = (gamma_n(dtype) + gamma_n(float64)) / (1 - gamma_n(float64)), "
               "gamma_n = n u / (1 - n u), u = eps/2 of the dtype, n = roundings (counts your "
               "computation's roundings plus 2 so that comparing in the case's dtype is also safe)")


def _specs() -> list[LoraCase]:
    both = []
    base = [
        LoraCase(name="plain", description="plain LoRA, scale alpha/r = 8", d_in=8, d_out=6, r=2, alpha=16.0),
        LoraCase(name="rslora", description="rsLoRA, scale alpha/sqrt(r) = 4 (alpha/r would be 2)", d_in=8,
                 d_out=6, r=4, alpha=8.0, use_rslora=True),
        LoraCase(name="fan_in_fan_out", description="W stored (d_in, d_out) as GPT-2's Conv1D; square, so a "
                 "missed transpose is not a shape error", d_in=6, d_out=6, r=2, alpha=4.0, fan_in_fan_out=True),
        LoraCase(name="dropout", description="explicit inverted-dropout mask (p = 0.25) on the adapter branch only",
                 d_in=8, d_out=6, r=2, alpha=16.0, dropout_p=0.25),
        LoraCase(name="fused_qkv_q_v", description="GPT-2 c_attn as loralib MergedLinear(enable_lora=[True, "
                 "False, True], fan_in_fan_out=True): q and v adapted, k not", d_in=4, d_out=12, r=2, alpha=4.0,
                 fan_in_fan_out=True, enable_lora=(True, False, True)),
        LoraCase(name="fused_k_v", description="loralib MergedLinear(enable_lora=[False, True, True]) on an "
                 "nn.Linear layout weight", d_in=5, d_out=9, r=3, alpha=6.0, enable_lora=(False, True, True)),
        LoraCase(name="rank_above_dim", description="rank 6 above min(d_in, d_out) = 3; no bias; x is 2-D", d_in=3,
                 d_out=4, r=6, alpha=3.0, batch_shape=(5,), has_bias=False),
        # A rank equal to a dimension: where an implementation that guesses A's and B's layout from
        # their shapes (to accept Keras/Flax's (d_in, r), (r, d_out) too) transposes one wrongly.
        LoraCase(name="rank_equals_dims", description="r = d_in = d_out = 4: A and B square, so their layout "
                 "cannot be guessed from the shapes", d_in=4, d_out=4, r=4, alpha=8.0),
        LoraCase(name="rank_equals_d_out", description="r = d_out = 3, d_in = 6: B square, A not", d_in=6, d_out=3,
                 r=3, alpha=6.0),
    ]
    for spec in base:
        for dtype in ("float64", "float32"):
            both.append(replace(spec, name=f"{spec.name}_{dtype}", dtype=dtype))
    return both


def _formula(spec: LoraCase) -> str:
    s = "alpha / sqrt(r)" if spec.use_rslora else "alpha / r"
    W = "W.T" if not spec.fan_in_fan_out else "W"
    xd = "(x * dropout_mask)" if spec.dropout_p is not None else "x"
    bias = " + bias" if spec.has_bias else ""
    if spec.enable_lora is None:
        y = f"y = x @ {W}{bias} + s * (({xd} @ A.T) @ B.T)"
        dW = "s * (B @ A).T" if spec.fan_in_fan_out else "s * (B @ A)"
    else:
        y = (f"y = x @ {W}{bias} + s * delta, where, with q = d_out / {len(spec.enable_lora)} and the k-th "
             f"enabled block g_k (enable_lora = {list(spec.enable_lora)}), delta[..., g_k q:(g_k+1) q] = "
             f"({xd} @ A[k r:(k+1) r].T) @ B[k q:(k+1) q].T and disabled blocks of delta are 0")
        dW = ("s * D.T" if spec.fan_in_fan_out else "s * D") + \
             " with D[g_k q:(g_k+1) q, :] = B[k q:(k+1) q] @ A[k r:(k+1) r], disabled rows 0"
    return (f"s = {s}; {y}; W_merged = W + {dW}; dx, dA, dB = gradients of sum(y * dy) "
            f"with respect to x, A, B")


@dataclass(frozen=True)
class GoldenCase:
    """One golden case: its inputs, expected float64 outputs, magnitudes and tolerances.

    ``params`` has ``alpha``, ``r`` (per block), ``use_rslora``, ``scale``, ``fan_in_fan_out``,
    ``enable_lora`` (list or None), ``dropout_p`` (or None). ``tolerance[output]`` has
    ``roundings``, ``rtol`` and ``atol`` (see the module docstring).
    """

    name: str
    dtype: str
    description: str
    formula: str
    params: Mapping[str, Any]
    inputs: Mapping[str, np.ndarray]
    expected: Mapping[str, np.ndarray]
    magnitudes: Mapping[str, np.ndarray]
    tolerance: Mapping[str, Mapping[str, float]] = field(repr=False)

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments of the kit's ``impl`` contract for this case."""
        p = self.params
        kw = {"alpha": p["alpha"], "r": p["r"], "use_rslora": p["use_rslora"],
              "bias": self.inputs.get("bias"), "dropout_mask": self.inputs.get("dropout_mask"),
              "fan_in_fan_out": p["fan_in_fan_out"]}
        if p["enable_lora"] is not None:
            kw["enable_lora"] = tuple(p["enable_lora"])
        return kw

    def compare(self, output: str, actual: Any) -> PropertyResult:
        """Compare your value of ``output`` ("y", "W_merged", "dx", "dA" or "dB") with this case's."""
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {', '.join(OUTPUTS)}, got {output!r}")
        return compare_to_reference(f"{self.name}:{output}", self.dtype, actual, self.expected[output],
                                    self.magnitudes[output], self.tolerance[output]["rtol"])


def _build(spec: LoraCase, seed: int) -> GoldenCase:
    # Each case has its own stream, so adding a case never changes another one. The draw order
    # (W first) and the entries (W and A scaled by 1/sqrt(d_in)) are fixed: the files depend on them.
    case = replace(spec, seed=(seed, zlib.crc32(spec.name.encode())))
    case = case.draw(entries=normal_entries(scaled=("W", "A")), order=("W", "x", "A", "B", "bias", "dy", "mask"))
    enable = case.enable_lora
    named = {"x": case.x, "W": case.W_stored, "A": case.A, "B": case.B, "bias": case.bias, "dy": case.dy,
             "dropout_mask": case.mask}
    inputs = {k: np.ascontiguousarray(v) for k, v in named.items() if v is not None}
    scale = case.scale
    ref = reference_outputs(inputs["x"], inputs["W"], inputs["A"], inputs["B"], scale, bias=inputs.get("bias"),
                            dropout_mask=inputs.get("dropout_mask"), enable_lora=enable,
                            fan_in_fan_out=spec.fan_in_fan_out, dy=inputs["dy"])
    expected = {o: np.ascontiguousarray(ref[o]) for o in OUTPUTS}
    magnitudes = {o: np.ascontiguousarray(ref[f"magnitude.{o}"]) for o in OUTPUTS}
    counts = rounding_counts(case.d_in, case.d_out, case.r, case.n_tokens, case.n_enabled)
    tol = {}
    for o in OUTPUTS:
        nr = counts[o] + EXTRA_ROUNDINGS
        rtol = reference_rtol(spec.dtype, nr)
        tol[o] = {"roundings": nr, "rtol": rtol, "atol": float(rtol * magnitudes[o].max())}
    params = {"alpha": spec.alpha, "r": spec.r, "use_rslora": spec.use_rslora, "scale": scale,
              "fan_in_fan_out": spec.fan_in_fan_out,
              "enable_lora": None if enable is None else list(enable), "dropout_p": spec.dropout_p}
    return GoldenCase(spec.name, spec.dtype, spec.description, _formula(spec), params, inputs, expected,
                      magnitudes, tol)


def golden_cases(seed: int = 0) -> list[GoldenCase]:
    """The golden cases, built in memory (what :func:`write_vectors` writes). Deterministic in ``seed``.

    Nine kinds (plain, rsLoRA, fan_in_fan_out, dropout, fused q/v with fan_in_fan_out, fused k/v,
    rank above a dimension, rank equal to both dimensions, rank equal to d_out), each in float64
    and float32.
    """
    seed = non_negative_int(seed, "seed")
    return [_build(spec, seed) for spec in _specs()]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_vectors(out_dir: str | Path, *, seed: int = 0, overwrite: bool = False) -> Path:
    """Write the golden cases to ``out_dir`` (created if needed); return the manifest's path.

    One ``<case>.safetensors`` per case and ``manifest.json``. Refuses (``FileExistsError``) to
    write into a directory that already has a manifest unless ``overwrite`` is True. The same
    seed on the same machine gives byte-identical files.
    """
    from safetensors.numpy import save_file

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"out_dir {str(out)!r} exists and is not a directory")
    if (out / MANIFEST).exists() and not overwrite:
        raise FileExistsError(f"{out / MANIFEST} already exists; pass overwrite=True to replace it")
    cases = golden_cases(seed)
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for case in cases:
        tensors = {**case.inputs, **case.expected, **{f"magnitude.{k}": v for k, v in case.magnitudes.items()}}
        path = out / f"{case.name}.safetensors"
        # One metadata key: safetensors keeps metadata in a hash map, so several keys would be
        # written in an order that changes from run to run, and the files would not be reproducible.
        save_file(tensors, str(path), metadata={"lora_ref": f"{FORMAT} {FORMAT_VERSION} {case.name}"})
        entries.append({
            "name": case.name, "file": path.name, "sha256": _sha256(path), "dtype": case.dtype,
            "description": case.description, "formula": case.formula, "params": dict(case.params),
            "inputs": sorted(case.inputs), "expected": list(OUTPUTS),
            "shapes": {k: list(v.shape) for k, v in tensors.items()},
            "tolerance": {k: dict(v) for k, v in case.tolerance.items()},
        })
    from . import __version__

    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "generator": f"lora-ref {__version__}",
                "seed": int(seed), "expected_dtype": "float64", "comparison": _COMPARISON, "cases": entries}
    path = out / MANIFEST
    path.write_text(json.dumps(manifest, indent=1) + "\n")
    return path


def _require(entry: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in entry:
        raise ValueError(f"{where}: missing key {key!r}")
    return entry[key]


def load_vectors(directory: str | Path) -> list[GoldenCase]:
    """Read golden vectors written by :func:`write_vectors` (or ``lora-ref vectors``).

    Checks the format name and version, each file's SHA-256, and that every tensor the manifest
    lists is present with the listed shape and the expected dtype (inputs in the case's dtype,
    expected values and magnitudes in float64). Raises ``FileNotFoundError`` for a missing
    directory, manifest or case file and ``ValueError`` for anything inconsistent, naming it.
    """
    from safetensors.numpy import load_file

    root = Path(directory)
    manifest_path = root / MANIFEST
    if not root.is_dir():
        raise FileNotFoundError(f"golden-vector directory {str(root)!r} does not exist; "
                                f"write one with `lora-ref vectors {root}`")
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path} not found: {str(root)!r} holds no golden vectors; "
                                f"write them with `lora-ref vectors {root}`")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{manifest_path} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ValueError(f"{manifest_path}: format must be {FORMAT!r}, got {found!r}")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{manifest_path}: format_version {version!r} is not supported; this lora-ref "
                         f"reads version {FORMAT_VERSION} (regenerate with `lora-ref vectors`)")
    entries = _require(manifest, "cases", str(manifest_path))
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{manifest_path}: 'cases' must be a non-empty list")
    cases = []
    for i, entry in enumerate(entries):
        where = f"{manifest_path} case {i}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: must be a JSON object, got {type(entry).__name__}")
        name = _require(entry, "name", where)
        where = f"{manifest_path} case {name!r}"
        dtype = _require(entry, "dtype", where)
        if dtype not in ("float32", "float64"):
            raise ValueError(f"{where}: dtype must be 'float32' or 'float64', got {dtype!r}")
        path = root / _require(entry, "file", where)
        if not path.is_file():
            raise FileNotFoundError(f"{where}: file {path} is missing")
        digest = _sha256(path)
        if digest != _require(entry, "sha256", where):
            raise ValueError(f"{where}: {path.name} has SHA-256 {digest}, the manifest says {entry['sha256']}; "
                             "the file was changed or truncated")
        tensors = load_file(str(path))
        shapes = _require(entry, "shapes", where)
        if not isinstance(shapes, dict):
            raise ValueError(f"{where}: 'shapes' must be an object of tensor name to shape, got {shapes!r}")
        input_names, tol = _require(entry, "inputs", where), _require(entry, "tolerance", where)
        for required in ("x", "W", "A", "B", "dy"):
            if required not in input_names:
                raise ValueError(f"{where}: input {required!r} is not listed")
        wanted = {**{k: dtype for k in input_names}, **{k: "float64" for k in OUTPUTS},
                  **{f"magnitude.{k}": "float64" for k in OUTPUTS}}
        for key, want in wanted.items():
            if key not in tensors:
                raise ValueError(f"{where}: tensor {key!r} is missing from {path.name}")
            arr = tensors[key]
            if arr.dtype.name != want:
                raise ValueError(f"{where}: tensor {key!r} has dtype {arr.dtype.name}, expected {want}")
            if list(arr.shape) != list(shapes.get(key, [])):
                raise ValueError(f"{where}: tensor {key!r} has shape {list(arr.shape)}, the manifest says "
                                 f"{shapes.get(key)}")
        for o in OUTPUTS:
            t = tol.get(o)
            if not isinstance(t, dict) or not all(isinstance(t.get(k), numbers.Real) for k in ("rtol", "atol")):
                raise ValueError(f"{where}: tolerance for {o!r} must have numeric 'rtol' and 'atol', got {t!r}")
        params = dict(_require(entry, "params", where))
        for key in ("alpha", "r", "use_rslora", "fan_in_fan_out", "enable_lora"):
            _require(params, key, f"{where} params")
        cases.append(GoldenCase(
            name, dtype, entry.get("description", ""), entry.get("formula", ""), params,
            {k: tensors[k] for k in input_names}, {k: tensors[k] for k in OUTPUTS},
            {k: tensors[f"magnitude.{k}"] for k in OUTPUTS}, {k: dict(v) for k, v in tol.items()}))
    return cases


def _accepts(fn: Callable, keyword: str) -> bool:
    """Whether ``fn`` takes ``keyword`` (by name, or through ``**kwargs``); True when its
    signature cannot be read (then it runs, and a failure is reported)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.kind is p.VAR_KEYWORD or (p.name == keyword and p.kind is not p.POSITIONAL_ONLY) for p in params)


def check_against_vectors(impl: Callable, vectors: str | Path | Iterable[GoldenCase] | None = None, *,
                          merge: Callable | None = None, grad: Callable | None = None,
                          cases: Iterable[str] | None = None) -> LoraCheckReport:
    """Run ``impl`` (and ``merge``, ``grad``) on golden cases; one result per case and output.

    ``vectors`` is a directory written by :func:`write_vectors`, a list of :class:`GoldenCase`,
    or None (build them in memory with :func:`golden_cases`). The callables follow the contract
    of :func:`lora_ref.testing.check_lora_linear`; fused cases pass ``enable_lora`` as a keyword,
    so they run only for a callable whose signature accepts it (a parameter of that name, or
    ``**kwargs``): an implementation without fused layers is not reported failing them, as in
    :func:`~lora_ref.testing.check_lora_linear`. ``cases`` selects cases by name. Results are
    named ``<case>:<output>``.
    """
    if not callable(impl):
        raise TypeError(f"impl must be a callable, got {type(impl).__name__}")
    for fn, nm in ((merge, "merge"), (grad, "grad")):
        if fn is not None and not callable(fn):
            raise TypeError(f"{nm} must be a callable or None, got {type(fn).__name__}")
    if vectors is None:
        loaded = golden_cases()
    elif isinstance(vectors, (str, Path)):
        loaded = load_vectors(vectors)
    else:
        loaded = list(vectors)
        if not all(isinstance(c, GoldenCase) for c in loaded):
            raise TypeError("vectors must be a directory or a list of GoldenCase")
    if cases is not None:
        if isinstance(cases, str):
            raise TypeError(f"cases must be a list of case names, got the string {cases!r}")
        names = list(cases)
        known = {c.name for c in loaded}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"unknown case names {unknown}; the cases are {', '.join(sorted(known))}")
        loaded = [c for c in loaded if c.name in names]
    results = []
    for case in loaded:
        inp = case.inputs
        calls = [(impl, (inp["x"], inp["W"], inp["A"], inp["B"]), case.kwargs(), ("y",))]
        if merge is not None:
            kw = {k: v for k, v in case.kwargs().items() if k not in ("bias", "dropout_mask")}
            calls.append((merge, (inp["W"], inp["A"], inp["B"]), kw, ("W_merged",)))
        if grad is not None:
            calls.append((grad, (inp["x"], inp["W"], inp["A"], inp["B"], inp["dy"]), case.kwargs(),
                          ("dx", "dA", "dB")))
        for fn, args, kwargs, outputs in calls:
            if "enable_lora" in kwargs and not _accepts(fn, "enable_lora"):
                continue                       # no fused layer: the fused cases are not for it
            copies = [a.copy() for a in args]
            kwargs = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in kwargs.items()}
            try:
                got = fn(*copies, **kwargs)
            except Exception as exc:  # noqa: BLE001 - reported as a failed result
                for o in outputs:
                    results.append(PropertyResult(f"{case.name}:{o}", case.dtype, math.inf,
                                                  case.tolerance[o]["rtol"], False,
                                                  f"raised {type(exc).__name__}: {exc}"))
                continue
            if len(outputs) == 3:
                if not isinstance(got, tuple | list) or len(got) != 3:
                    for o in outputs:
                        results.append(PropertyResult(f"{case.name}:{o}", case.dtype, math.inf,
                                                      case.tolerance[o]["rtol"], False,
                                                      f"grad must return (dx, dA, dB), got {type(got).__name__}"))
                    continue
                values = dict(zip(outputs, got))
            else:
                values = {outputs[0]: got}
            for o, v in values.items():
                results.append(case.compare(o, v))
    return LoraCheckReport(results)
