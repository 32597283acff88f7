"""Golden vectors, format version 2: every variant's cases with their expected outputs, as files
any language can read (docs/vectors-format.md specifies the format for a reader in any language).

``write_vectors(out_dir)`` (or ``lora-ref vectors OUT_DIR``) writes one safetensors file per case
and a ``manifest.json``; :func:`load_vectors` reads them back, checking the format version and
every file; :func:`check_against_vectors` runs your implementation of one kind on them, with the
same callables as that kind's ``check_<kind>`` in :mod:`lora_ref.testing`.

A case file holds the case's **inputs** under their own names (``x``, ``W``, ``A.<adapter>``,
``indices``, ...) in the case's dtype (integer tensors: indices, ids; uint8: packed 4-bit codes),
and for each output ``expected.<output>`` and, under the tolerance rule, ``magnitude.<output>``
(float64: lora-ref's value computed in float64 from the stored inputs, and the same computation
on absolute values). The manifest gives each case's kind, params, tensors and, per output, the
rule: ``tolerance`` (pass when ``|yours - expected| <= rtol * magnitude`` entry by entry, or,
simpler and looser, ``<= atol``; a zero magnitude means equal) or ``exact`` (bit for bit).
Format version 1 (plain linear LoRA only) is refused with a message naming the version.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import numbers
import struct
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .checks import non_negative_int
from .kit.core import LoraCheckReport, PropertyResult, numpy_dtype, run_call
from .kit.golden import KINDS, GoldenCase, GoldenOutput, build_cases, case_calls

__all__ = ["FORMAT", "FORMAT_VERSION", "KINDS", "GoldenCase", "GoldenOutput", "check_against_vectors", "golden_cases",
           "load_vectors", "write_vectors"]

FORMAT = "lora-ref-golden-vectors"
FORMAT_VERSION = 2
MANIFEST = "manifest.json"

# NumPy dtype name -> safetensors dtype code (little-endian data; BF16: the top 16 bits of a float32)
_CODES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64", "uint8": "U8"}

_COMPARISON = {
    "tolerance": "pass when |yours - expected| <= rtol * magnitude for every entry, compared in float64 (an entry "
                 "whose magnitude is 0 must be equal); or, simpler and looser, |yours - expected| <= atol = "
                 "max(rtol * magnitude). rtol = (gamma_n(dtype) + gamma_n(float64)) / (1 - gamma_n(float64)), "
                 "gamma_n = n u / (1 - n u), u = eps / 2 of the dtype, n = roundings (your computation's count plus "
                 "2, so that comparing in the case's dtype after rounding expected to it is also safe); the serving "
                 "kinds use their own rtol (docs/serving.md), given per output like every rtol",
    "exact": "pass when yours has the output's dtype and shape and every entry's bytes equal expected's",
}


def golden_cases(seed: int = 0, kinds: Iterable[str] | None = None) -> list[GoldenCase]:
    """The golden cases, built in memory (what :func:`write_vectors` writes), deterministic in
    ``seed``; ``kinds`` picks kinds (default all: :data:`lora_ref.kit.golden.KINDS`)."""
    seed = non_negative_int(seed, "seed")
    cases = build_cases(seed)
    if kinds is None:
        return cases
    kinds = _kinds(kinds)
    return [c for c in cases if c.kind in kinds]


def _kinds(kinds: Iterable[str]) -> set[str]:
    if isinstance(kinds, str):
        raise TypeError(f"kinds must be a list of kind names, got the string {kinds!r}")
    chosen = set(kinds)
    unknown = sorted(chosen - set(KINDS))
    if unknown:
        raise ValueError(f"unknown kinds {unknown}; the kinds are {', '.join(KINDS)}")
    return chosen


# ============================================================================================
# Files: a small deterministic safetensors writer, the manifest
# ============================================================================================


def _write_safetensors(path: Path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> None:
    """safetensors: 8 bytes little-endian header length N, N bytes of JSON (sorted keys, padded
    with spaces to a multiple of 8), then the tensors' little-endian bytes, in name order."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    chunks, offset = [], 0
    for name in sorted(tensors):
        a = np.asarray(tensors[name], order="C")                 # (ascontiguousarray would make a 0-d array 1-d)
        code = _CODES[a.dtype.name]
        data = (a.view(np.uint16).astype("<u2") if code == "BF16" else a.astype(a.dtype.newbyteorder("<"))).tobytes()
        header[name] = {"dtype": code, "shape": list(a.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    blob = json.dumps(header, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + b"".join(chunks))


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """The file's tensors, checked by lora_ref.files (header, tiling, the safetensors library);
    BF16 back to ml_dtypes' bfloat16 (lora_ref.files widens it to float32, exactly)."""
    from .files import read_tensors

    out = {}
    for name, (code, arr) in read_tensors(path).items():
        if code == "BF16":
            arr = arr.astype(numpy_dtype("bfloat16"))
        out[name] = arr
    return out


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _spec(a: np.ndarray) -> dict[str, Any]:
    return {"dtype": a.dtype.name, "shape": list(a.shape)}


def _entry(case: GoldenCase) -> dict[str, Any]:
    """The case's manifest entry; ``sha256`` is filled in once its file is written."""
    outputs = {}
    for name, o in case.outputs.items():
        e = {"rule": o.rule, "dtype": o.dtype, "expected": f"expected.{name}", "shape": list(o.expected.shape)}
        if o.rule == "tolerance":
            e.update(magnitude=f"magnitude.{name}", roundings=o.roundings, rtol=o.rtol, atol=o.atol)
        outputs[name] = e
    return {"name": case.name, "kind": case.kind, "file": f"{case.name}.safetensors", "sha256": "",
            "dtype": case.dtype, "description": case.description, "formula": case.formula,
            "params": dict(case.params), "inputs": {k: _spec(case.inputs[k]) for k in sorted(case.inputs)},
            "outputs": outputs}


def _strict_json(value: Any, where: str) -> None:
    """Refuse, naming the field, what strict JSON (RFC 8259) cannot hold: NaN and infinities (which
    ``json.dumps`` would write as ``NaN``/``Infinity``, refused by strict parsers), non-string keys,
    and values that are not None, bool, int, float, str, list or dict."""
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where} is {value!r}: the manifest is strict JSON (RFC 8259), which has no NaN "
                             "or infinity; a golden case must have finite params and tolerances")
    elif isinstance(value, dict):
        for key, v in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where} has the key {key!r} of type {type(key).__name__}; JSON keys are strings")
            _strict_json(v, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _strict_json(v, f"{where}[{i}]")
    elif value is not None and not isinstance(value, (bool, int, str)):
        raise TypeError(f"{where} is a {type(value).__name__}, which JSON cannot hold")


def write_vectors(out_dir: str | Path, *, seed: int = 0, overwrite: bool = False) -> Path:
    """Write every golden case to ``out_dir`` (created if needed); return the manifest's path.

    One ``<case>.safetensors`` per case and ``manifest.json``. Refuses (``FileExistsError``) to
    write into a directory that already has a manifest unless ``overwrite`` is True. The same
    seed on the same machine gives byte-identical files.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"out_dir {str(out)!r} exists and is not a directory")
    if (out / MANIFEST).exists() and not overwrite:
        raise FileExistsError(f"{out / MANIFEST} already exists; pass overwrite=True to replace it")
    cases = golden_cases(seed)
    entries = [_entry(case) for case in cases]
    for entry in entries:                             # before any file is written
        _strict_json(entry, f"manifest case {entry['name']!r}")
    out.mkdir(parents=True, exist_ok=True)
    for case, entry in zip(cases, entries):
        tensors = {**case.inputs, **{f"expected.{k}": o.expected for k, o in case.outputs.items()},
                   **{f"magnitude.{k}": o.magnitude for k, o in case.outputs.items() if o.magnitude is not None}}
        path = out / entry["file"]
        _write_file(path, tensors, {"format": FORMAT, "format_version": str(FORMAT_VERSION), "case": case.name,
                                    "kind": case.kind})
        entry["sha256"] = _sha256(path)
    from . import __version__

    kinds = {k: {"callables": ["impl", *KINDS[k]["callables"]], "cases": sum(c.kind == k for c in cases)}
             for k in KINDS}
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "generator": f"lora-ref {__version__}",
                "seed": int(seed), "comparison": _COMPARISON, "kinds": kinds, "cases": entries}
    _strict_json(manifest, "manifest")
    path = out / MANIFEST
    path.write_bytes((_dumps(manifest) + "\n").encode("ascii"))     # json.dumps escapes non-ASCII: ASCII text
    return path


def _dumps(value: Any, indent: str = "") -> str:
    """JSON with one key per line, except that an object or list holding no object, and lists of
    scalars only (a tensor's dtype and shape, an output's tolerance, a list of names), stays on
    one line."""
    def flat(v: Any) -> bool:                         # no object inside, lists of scalars only
        items = v.values() if isinstance(v, dict) else v
        return all(not isinstance(x, dict) and (not isinstance(x, list) or all(not isinstance(y, (dict, list))
                                                                               for y in x)) for x in items)

    if not isinstance(value, (dict, list)) or flat(value):
        return json.dumps(value, separators=(", ", ": "), allow_nan=False)
    inner = indent + " "
    if isinstance(value, list):
        return "[\n" + ",\n".join(inner + _dumps(v, inner) for v in value) + "\n" + indent + "]"
    return ("{\n" + ",\n".join(f"{inner}{json.dumps(k, allow_nan=False)}: {_dumps(v, inner)}" for k, v in value.items())
            + "\n" + indent + "}")


_write_file = _write_safetensors       # (a seam for tests that simulate a failing disk)


# ============================================================================================
# Reading
# ============================================================================================


def _require(entry: Mapping[str, Any], key: str, where: str) -> Any:
    if not isinstance(entry, Mapping) or key not in entry:
        raise ValueError(f"{where}: missing key {key!r}")
    return entry[key]


def _load_case(root: Path, entry: Any, i: int, manifest_path: Path) -> GoldenCase:
    where = f"{manifest_path} case {i}"
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: must be a JSON object, got {type(entry).__name__}")
    name = _require(entry, "name", where)
    where = f"{manifest_path} case {name!r}"
    kind = _require(entry, "kind", where)
    if kind not in KINDS:
        raise ValueError(f"{where}: unknown kind {kind!r}; this lora-ref knows {', '.join(KINDS)}")
    dtype = _require(entry, "dtype", where)
    path = root / _require(entry, "file", where)
    if not path.is_file():
        raise FileNotFoundError(f"{where}: file {path} is missing")
    digest = _sha256(path)
    if digest != _require(entry, "sha256", where):
        raise ValueError(f"{where}: {path.name} has SHA-256 {digest}, the manifest says {entry['sha256']}; "
                         "the file was changed or truncated")
    tensors = _read_safetensors(path)
    inputs, outs = _require(entry, "inputs", where), _require(entry, "outputs", where)
    if not isinstance(inputs, dict) or not isinstance(outs, dict):
        raise ValueError(f"{where}: 'inputs' and 'outputs' must be JSON objects keyed by tensor and output name")
    listed = dict(inputs)
    for out_name, o in outs.items():
        rule, shape = _require(o, "rule", f"{where} output {out_name!r}"), _require(o, "shape", f"{where} output {out_name!r}")
        listed[_require(o, "expected", f"{where} output {out_name!r}")] = {
            "dtype": "float64" if rule == "tolerance" else o.get("dtype"), "shape": shape}
        if rule == "tolerance":
            listed[_require(o, "magnitude", f"{where} output {out_name!r}")] = {"dtype": "float64", "shape": shape}
    for key, spec in listed.items():
        if key not in tensors:
            raise ValueError(f"{where}: tensor {key!r} is missing from {path.name}")
        arr = tensors[key]
        if arr.dtype.name != _require(spec, "dtype", f"{where} tensor {key!r}"):
            raise ValueError(f"{where}: tensor {key!r} has dtype {arr.dtype.name}, expected {spec['dtype']}")
        if list(arr.shape) != list(_require(spec, "shape", f"{where} tensor {key!r}")):
            raise ValueError(f"{where}: tensor {key!r} has shape {list(arr.shape)}, the manifest says {spec['shape']}")
    extra = sorted(set(tensors) - set(listed))
    if extra:
        raise ValueError(f"{where}: {path.name} holds tensors the manifest does not list: {extra}")
    outputs = {}
    for out_name, o in outs.items():
        rule = _require(o, "rule", f"{where} output {out_name!r}")
        expected = tensors[_require(o, "expected", f"{where} output {out_name!r}")]
        if rule == "exact":
            outputs[out_name] = GoldenOutput(out_name, "exact", expected, o["dtype"])
            continue
        if rule != "tolerance":
            raise ValueError(f"{where}: output {out_name!r} has rule {rule!r}; expected 'tolerance' or 'exact'")
        if not all(isinstance(o.get(k), numbers.Real) for k in ("rtol", "atol", "roundings")):
            raise ValueError(f"{where}: output {out_name!r} needs numeric 'rtol', 'atol' and 'roundings', got {o!r}")
        outputs[out_name] = GoldenOutput(out_name, "tolerance", expected, o["dtype"], tensors[o["magnitude"]],
                                         int(o["roundings"]), float(o["rtol"]), float(o["atol"]))
    return GoldenCase(name, kind, dtype, entry.get("description", ""), entry.get("formula", ""),
                      dict(_require(entry, "params", where)), {k: tensors[k] for k in inputs}, outputs)


def load_vectors(directory: str | Path) -> list[GoldenCase]:
    """Read golden vectors written by :func:`write_vectors` (or ``lora-ref vectors``).

    Checks the format name and version (version 1 is refused by name), each file's SHA-256, that
    every tensor the manifest lists is present with its dtype and shape, and nothing else is.
    Raises ``FileNotFoundError`` for a missing directory, manifest or case file and ``ValueError``
    for anything inconsistent, naming it.
    """
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
        old = (" (version 1 held plain linear LoRA only, with expected values under the output's own name)"
               if version == 1 else "")
        raise ValueError(f"{manifest_path}: format_version {version!r} is not supported; this lora-ref reads version "
                         f"{FORMAT_VERSION}{old}; regenerate with `lora-ref vectors`")
    entries = _require(manifest, "cases", str(manifest_path))
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{manifest_path}: 'cases' must be a non-empty list")
    return [_load_case(root, entry, i, manifest_path) for i, entry in enumerate(entries)]


# ============================================================================================
# Checking an implementation against them
# ============================================================================================


def _accepts(fn: Callable, keyword: str) -> bool:
    """Whether ``fn`` takes ``keyword`` (by name, or through ``**kwargs``); True when its
    signature cannot be read (then it runs, and a failure is reported)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.kind is p.VAR_KEYWORD or (p.name == keyword and p.kind is not p.POSITIONAL_ONLY) for p in params)


def check_against_vectors(impl: Callable, vectors: str | Path | Iterable[GoldenCase] | None = None, *,
                          kind: str = "lora_linear", cases: Iterable[str] | None = None,
                          **callables: Callable | None) -> LoraCheckReport:
    """Run ``impl`` (and the kind's optional callables) on the golden cases of one kind.

    ``vectors`` is a directory written by :func:`write_vectors`, a list of :class:`GoldenCase`, or
    None (build them in memory). ``kind`` picks the cases (default ``"lora_linear"``); ``impl``
    and the keyword callables follow that kind's check in :mod:`lora_ref.testing` (for example
    ``kind="dora_linear"`` takes ``magnitude=``, ``merge=``, ``grad=`` as ``check_dora_linear``;
    DoRA's exact gradients are asked of ``grad`` with ``detach_norm=False``). Linear cases with
    ``enable_lora`` run only for a callable that accepts that keyword (by name or ``**kwargs``).
    ``cases`` selects cases by name. One result per case and output, named ``<case>:<output>``.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if not callable(impl):
        raise TypeError(f"impl must be a callable, got {type(impl).__name__}")
    allowed = KINDS[kind]["callables"]
    for name, fn in callables.items():
        if name not in allowed:
            raise TypeError(f"kind {kind!r} takes the callables {', '.join(allowed) or 'impl only'}, not {name!r}")
        if fn is not None and not callable(fn):
            raise TypeError(f"{name} must be a callable or None, got {type(fn).__name__}")
    if vectors is None:
        loaded = golden_cases(kinds=[kind])
    elif isinstance(vectors, (str, Path)):
        loaded = load_vectors(vectors)
    else:
        loaded = list(vectors)
        if not all(isinstance(c, GoldenCase) for c in loaded):
            raise TypeError("vectors must be a directory or a list of GoldenCase")
    loaded = [c for c in loaded if c.kind == kind]
    if cases is not None:
        if isinstance(cases, str):
            raise TypeError(f"cases must be a list of case names, got the string {cases!r}")
        names = list(cases)
        known = {c.name for c in loaded}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"unknown case names {unknown}; the {kind} cases are {', '.join(sorted(known))}")
        loaded = [c for c in loaded if c.name in names]
    given = {"impl": impl, **callables}
    results: list[PropertyResult] = []
    for case in loaded:
        for key, call in case_calls(case).items():
            fn = given.get("grad" if key == "grad_exact" else key)
            if fn is None or ("enable_lora" in call.kwargs and not _accepts(fn, "enable_lora")):
                continue                      # not given, or no fused layer: those cases are not for it
            for res in run_call(case.name, case.dtype, call, fn):
                out = res.output or call.outputs[0].name
                results.append(PropertyResult(f"{case.name}:{out}", res.dtype, res.error, res.bound, res.passed,
                                              res.detail, res.where, res.got, res.expected, res.difference,
                                              res.mismatches))
    return LoraCheckReport(results)
