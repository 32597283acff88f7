"""PEFT LoRA adapters on disk, read and written without PyTorch.

A PEFT adapter is a directory with two files:

    adapter_config.json          PEFT's ``LoraConfig`` as JSON (``r``, ``lora_alpha``, ``target_modules`` ...)
    adapter_model.safetensors    the factors, keyed ``base_model.model.<module>.<name>``:

    module kind        saved names (PEFT 0.21.2)                 lora-ref's adapters[module]
    linear (Conv1D)    lora_A.weight (r, d_in), lora_B.weight     {"A": (r, d_in), "B": (d_out, r)}
                       (d_out, r)
    + DoRA (use_dora)  ... and lora_magnitude_vector (d_out,)     ... and "m": (d_out,)
    embedding table    lora_embedding_A (r, V),                   {"A": (r, V), "B": (D, r)}, the module
                       lora_embedding_B (D, r)  (no ".weight")    in LoraConfig.embedding_modules
    convolution        lora_A.weight (r, C_in, *k),               {"A": (r, C_in, *k),
    (1-D, 2-D, 3-D)    lora_B.weight (C_out, r/groups, 1, ...)     "B": (C_out, r/groups, 1, ...)}

(PEFT strips the adapter name, e.g. ``default``, from the saved keys; the layouts are PEFT's, and
the ones :mod:`lora_ref.lora`, :mod:`lora_ref.dora`, :mod:`lora_ref.embedding` and
:mod:`lora_ref.conv` take.) A directory may hold several adapters, as ``PeftModel.save_pretrained``
writes them: the one named ``default`` at the root, each other one in a sub-folder named after it
(:func:`load_peft_adapters`, :func:`save_peft_adapters`).

Contract
--------
* Every field of PEFT 0.21.2's ``LoraConfig`` is honoured, irrelevant to a saved adapter, or
  refused when set: :data:`CONFIG_FIELDS` (:mod:`lora_ref.peft_config`, re-exported here).
  Nothing is silently ignored. Combinations lora-ref does not implement raise
  ``NotImplementedError`` naming them: DoRA on an embedding or a convolution, DoRA with
  ``lora_bias``, ``ensure_weight_tying`` where PEFT would tie.
* A damaged or inconsistent adapter raises :class:`AdapterFormatError` (a ``ValueError``) naming
  the file and the key: truncated or corrupt safetensors, bad JSON, missing or extra keys, shapes
  that disagree with the config or with the base model, non-float dtypes, non-finite values.
* Saves write every file into a fresh directory beside the target and swap it in with one
  ``rename`` (:func:`lora_ref.files.write_directory_atomically`): an interrupted save leaves the
  previous directory as it was.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy

from .backend import asarray, dtype_name, to_numpy
from .config import LoraConfig, embedding_entry_names
from .files import load_dtype, read_json, read_tensors, write_directory_atomically
from .peft_config import (CONFIG_FIELDS, CONFIG_NAME, PEFT_VERSION, AdapterFormatError, config_from_peft_dict,
                          config_to_peft_dict)

__all__ = [
    "CONFIG_FIELDS",
    "CONFIG_NAME",
    "DEFAULT_ADAPTER",
    "KEY_PREFIX",
    "PEFT_VERSION",
    "WEIGHTS_NAME",
    "AdapterFormatError",
    "config_from_peft_dict",
    "config_to_peft_dict",
    "list_peft_adapters",
    "load_peft_adapter",
    "load_peft_adapters",
    "save_peft_adapter",
    "save_peft_adapters",
    "validate_adapter",
]

WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."   # PeftModel's prefix: PeftModel.from_pretrained ignores keys without it
DEFAULT_ADAPTER = "default"        # PEFT's name for the adapter at a directory's root
_KEY = re.compile(r"^(?P<module>.+)\.(?:lora_(?P<linear>[AB])\.weight|lora_embedding_(?P<embedding>[AB])"
                  r"|(?P<magnitude>lora_magnitude_vector))$")
_FLOAT_CODES = ("F64", "F32", "F16", "BF16")   # safetensors codes a factor may be stored as
_FLOATS = ("float16", "float32", "float64")


# ============================================================================================
# Key names and module kinds
# ============================================================================================


def _kind(lora_config: LoraConfig, module: str, A: Any) -> str:
    """"embedding" (declared in the config), "conv" (A has kernel axes) or "linear"."""
    if lora_config.is_embedding(module):
        return "embedding"
    return "conv" if getattr(A, "ndim", 2) >= 3 else "linear"


def _key(module: str, slot: str, kind: str = "linear") -> str:
    """The saved key of ``adapters[module][slot]`` (slot "A", "B" or "m")."""
    if slot == "m":
        return f"{KEY_PREFIX}{module}.lora_magnitude_vector"
    if kind == "embedding":
        return f"{KEY_PREFIX}{module}.lora_embedding_{slot}"
    return f"{KEY_PREFIX}{module}.lora_{slot}.weight"


def _where(source: str | None, module: str, slot: str | None = None, kind: str = "linear") -> str:
    if source:
        return f"{source}: key {_key(module, slot, kind)!r}" if slot else f"{source}: key {module!r}"
    return f"adapters[{module!r}]" + (f"[{slot!r}]" if slot else "")


# ============================================================================================
# Validation against the config and against a base model
# ============================================================================================


def _check_structure(lora_config: LoraConfig, adapters: Mapping[str, Any], source: str | None) -> None:
    """What can be checked without the base model: the arrays each module's kind needs (linear,
    DoRA, embedding, conv), their ranks as the config says (rank_pattern included), one float
    dtype throughout, finite values, targeted modules."""
    if not isinstance(lora_config, LoraConfig):
        raise TypeError(f"lora_config must be a lora_ref.LoraConfig, got {type(lora_config).__name__}")
    if not isinstance(adapters, Mapping):
        raise TypeError(f"adapters must be a mapping of module name to {{'A': ..., 'B': ...}}, got {type(adapters).__name__}")
    slots = {"A", "B", "m"} if lora_config.use_dora else {"A", "B"}
    dtypes: dict[str, str] = {}
    for module, pair in adapters.items():
        if not isinstance(module, str) or not module:
            raise TypeError(f"adapter module names must be non-empty strings, got {module!r}")
        if not isinstance(pair, Mapping) or set(pair) != slots:
            got = sorted(pair) if isinstance(pair, Mapping) else type(pair).__name__
            why = (" (use_dora is set: each module also needs its magnitude m, PEFT's lora_magnitude_vector)"
                   if lora_config.use_dora else " (m is DoRA's magnitude, but use_dora is false)"
                   if isinstance(pair, Mapping) and "m" in pair else "")
            raise AdapterFormatError(f"{_where(source, module)}: needs exactly the arrays {sorted(slots)}, got {got}{why}")
        for slot in sorted(slots):
            arr = pair[slot]
            if not hasattr(arr, "shape") or not hasattr(arr, "dtype"):
                raise TypeError(f"{_where(source, module, slot)}: must be an array, got {type(arr).__name__}")
            if dtype_name(arr.dtype) not in _FLOATS:
                raise AdapterFormatError(f"{_where(source, module, slot)}: dtype {dtype_name(arr.dtype)} is not "
                                         "a floating dtype (float32 or float64 expected)")
            dtypes[f"{module}.{slot}"] = dtype_name(arr.dtype)
        A = pair["A"]
        kind = _kind(lora_config, module, A)
        if kind == "conv" and lora_config.use_dora:
            raise NotImplementedError(f"{_where(source, module)}: DoRA on a convolution (PEFT's magnitude "
                                      "(1, C_out, 1, ...)) is not implemented by lora-ref")
        _check_shapes(lora_config, module, kind, pair, source)
        for slot in sorted(slots):
            values = to_numpy(pair[slot])
            bad = int(np.size(values) - np.count_nonzero(np.isfinite(values)))
            if bad:
                raise AdapterFormatError(f"{_where(source, module, slot, kind)}: {bad} non-finite value(s) (inf or nan)")
    if len(set(dtypes.values())) > 1:
        first = next(iter(dtypes.items()))
        other = next((k, v) for k, v in dtypes.items() if v != first[1])
        raise AdapterFormatError(f"{source or 'adapters'}: mixed dtypes: {first[0]} is {first[1]} but {other[0]} is {other[1]}")
    for entry in lora_config.embedding_modules:
        if not any(embedding_entry_names(entry, m) for m in adapters):
            raise AdapterFormatError(f"{source or 'adapters'}: lora_config.embedding_modules names {entry!r}, "
                                     f"but no adapter is on such a module (modules: {', '.join(sorted(adapters)[:5])})")


def _check_shapes(lora_config: LoraConfig, module: str, kind: str, pair: Mapping[str, Any], source: str | None) -> None:
    """One module's shapes against its kind and its rank (no base model needed)."""
    A, B = pair["A"], pair["B"]
    where = _where(source, module)
    if not lora_config.targets(module):
        raise AdapterFormatError(
            f"{where}: the config does not target this module (target_modules={lora_config.target_modules!r}, "
            f"layers_to_transform={lora_config.layers_to_transform!r}); PEFT would drop these weights")
    r = lora_config.rank_for(module)
    enable = lora_config.enable_for(module)
    rank_from = f"r={lora_config.r}, rank_pattern={dict(lora_config.rank_pattern)!r}"
    if kind == "conv":
        if enable is not None:
            raise AdapterFormatError(f"{where}: enable_lora (loralib's fused blocks) does not apply to a convolution")
        if not 3 <= A.ndim <= 5 or B.ndim != A.ndim or any(n != 1 for n in B.shape[2:]):
            raise AdapterFormatError(
                f"{where}: a convolution adapter has A (r, C_in, *k) and B (C_out, r/groups, 1, ...), both 3-D to 5-D; "
                f"got A {tuple(A.shape)}, B {tuple(B.shape)}")
        G = r // B.shape[1] if B.shape[1] and r % B.shape[1] == 0 else 0
        if A.shape[0] != r or not G or A.shape[1] % G or B.shape[0] % G:
            raise AdapterFormatError(
                f"{where}: the config gives this module rank {r} ({rank_from}), so A must be ({r}, C_in, *k) and B "
                f"(C_out, {r}/groups, 1, ...) with groups dividing {r}, C_in and C_out; got A {tuple(A.shape)}, "
                f"B {tuple(B.shape)}")
        return
    for slot, arr in (("A", A), ("B", B)):
        if arr.ndim != 2:
            raise AdapterFormatError(f"{_where(source, module, slot, kind)}: must be 2-D, got shape {tuple(arr.shape)}")
    if kind == "embedding":
        if enable is not None:
            raise AdapterFormatError(f"{where}: enable_lora (loralib's fused blocks) does not apply to an embedding")
        if A.shape[0] != r or B.shape[1] != r:
            raise AdapterFormatError(f"{where}: the config gives this module rank {r} ({rank_from}), so A "
                                     f"({r}, num_embeddings) and B (embedding_dim, {r}); got A {tuple(A.shape)}, "
                                     f"B {tuple(B.shape)}")
        return
    n = 1 if enable is None else sum(enable)
    if A.shape[0] != n * r or B.shape[1] != r:
        expected = f"A ({n * r}, d_in) and B (d_out, {r})" if n == 1 else f"A ({n}*{r}, d_in) and B ({n}*q, {r})"
        raise AdapterFormatError(f"{where}: the config gives this module rank {r} ({rank_from}), so {expected}; "
                                 f"got A {tuple(A.shape)}, B {tuple(B.shape)}")
    if "m" in pair and tuple(pair["m"].shape) != (B.shape[0],):
        raise AdapterFormatError(f"{_where(source, module, 'm')}: DoRA's magnitude (lora_magnitude_vector) has one entry per "
                                 f"output feature, shape ({B.shape[0]},) to match B {tuple(B.shape)}; got {tuple(pair['m'].shape)}")


def validate_adapter(lora_config: LoraConfig, adapters: Mapping[str, Mapping[str, Any]],
                     params: Mapping[str, Any], *, source: str | None = None) -> None:
    """Check that ``adapters`` fits the base model ``params`` under ``lora_config``; return None.

    ``params`` maps state-dict names to arrays in lora-ref's layout; module ``m``'s weight is
    ``params[m + ".weight"]``, and its kind decides the adapter's shapes:

    * linear: W (d_out, d_in) (as :func:`transformer_ref.load_checkpoint` returns it; GPT-2's
      Conv1D already transposed), A (r, d_in), B (d_out, r), with DoRA m (d_out,); loralib
      ``enable_lora``: A (n r, d_in), B (n d_out / G, r);
    * embedding (``m`` in ``lora_config.embedding_modules``): E (V, D), A (r, V), B (D, r);
    * convolution (A has kernel axes): W (C_out, C_in/groups, *k), A (r, C_in, *k),
      B (C_out, r/groups, 1, ...), groups = r / B.shape[1].

    Also checked: every adapted module is targeted, r from ``rank_pattern`` / ``r``, every
    targeted module that has a 2-D to 5-D ``.weight`` in ``params`` has an adapter, factors have
    the base weight's dtype and finite values. Raises :class:`AdapterFormatError` naming the
    module (and ``source``, e.g. the file, when given), the expected and the actual shapes;
    ``TypeError`` for arguments of the wrong kind.
    """
    _check_params(params)
    _check_structure(lora_config, adapters, source)
    _check_against_base(lora_config, adapters, params, source)


def _check_params(params: Any) -> None:
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a mapping of parameter name to array, got {type(params).__name__}")


def _check_against_base(lora_config: LoraConfig, adapters: Mapping[str, Mapping[str, Any]],
                        params: Mapping[str, Any], source: str | None) -> None:
    """validate_adapter's checks against ``params``, for adapters that already passed
    :func:`_check_structure` (the loader runs that once; converting and isfinite-checking every
    array a second time would double its cost)."""
    for module, pair in adapters.items():
        where, name = _where(source, module), module + ".weight"
        W, A, B = params.get(name), pair["A"], pair["B"]
        if W is None:
            raise AdapterFormatError(f"{where}: the base model has no weight {name!r} for this adapter")
        kind = _kind(lora_config, module, A)
        if kind == "conv":
            if W.ndim != A.ndim:
                raise AdapterFormatError(f"{where}: the base weight {name!r} has shape {tuple(W.shape)}, but a "
                                         f"{A.ndim - 2}-D convolution adapter needs a {A.ndim}-D kernel; got A "
                                         f"{tuple(A.shape)}, B {tuple(B.shape)}")
            G = A.shape[0] // B.shape[1]                                     # groups = r / (r/groups)
            expected_A = (A.shape[0], W.shape[1] * G, *W.shape[2:])          # (r, C_in, *k)
            if tuple(A.shape) != expected_A or B.shape[0] != W.shape[0]:
                raise AdapterFormatError(
                    f"{where}: the base kernel {name!r} is (C_out, C_in/groups, *k) = {tuple(W.shape)}; with groups = "
                    f"r / B.shape[1] = {G} the adapter must be A {expected_A} and B ({W.shape[0]}, {B.shape[1]}, "
                    f"{', '.join(['1'] * (B.ndim - 2))}); got A {tuple(A.shape)}, B {tuple(B.shape)}")
        elif kind == "embedding":
            if W.ndim != 2 or A.shape[1] != W.shape[0] or B.shape[0] != W.shape[1]:
                raise AdapterFormatError(
                    f"{where}: the embedding table {name!r} is (num_embeddings, embedding_dim) = {tuple(W.shape)}, so A "
                    f"must be ({A.shape[0]}, num_embeddings) and B (embedding_dim, {A.shape[0]}); got A "
                    f"{tuple(A.shape)}, B {tuple(B.shape)}")
        else:
            _check_linear(lora_config, module, W, A, B, where, name)
        if dtype_name(A.dtype) != dtype_name(W.dtype):
            raise AdapterFormatError(f"{where}: the adapter is {dtype_name(A.dtype)} but the base weight is "
                                     f"{dtype_name(W.dtype)}; load it with dtype={dtype_name(W.dtype)!r} to convert it")
    missing = [name[: -len(".weight")] for name, W in params.items()
               if isinstance(name, str) and name.endswith(".weight") and 2 <= getattr(W, "ndim", 0) <= 5
               and lora_config.targets(name[: -len(".weight")]) and name[: -len(".weight")] not in adapters]
    if missing:
        raise AdapterFormatError(
            f"{source or 'adapters'}: the config targets {len(missing)} module(s) of the base model that have no "
            f"adapter weights: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")


def _check_linear(lora_config: LoraConfig, module: str, W: Any, A: Any, B: Any, where: str, name: str) -> None:
    if W.ndim != 2:
        kernel = " (a convolution kernel: its adapter's A is (r, C_in, *k))" if 3 <= W.ndim <= 5 else ""
        raise AdapterFormatError(f"{where}: the base weight {name!r} has shape {tuple(W.shape)}{kernel}; this "
                                 "adapter's 2-D factors fit a (d_out, d_in) weight")
    d_out, d_in = W.shape
    enable = lora_config.enable_for(module)
    rows = d_out if enable is None else (d_out // len(enable)) * sum(enable)
    if enable is not None and d_out % len(enable):
        raise AdapterFormatError(f"{where}: enable_lora has {len(enable)} blocks but the base weight's d_out={d_out} "
                                 f"is not divisible by {len(enable)}")
    if A.shape[1] != d_in or B.shape[0] != rows:
        hint = ""
        if enable is None and A.shape[1] == d_out and B.shape[0] == d_in:
            hint = (f"; if {module!r} is an embedding table, list it in LoraConfig.embedding_modules "
                    "(PEFT saves it as lora_embedding_A / lora_embedding_B)")
        raise AdapterFormatError(
            f"{where}: the base weight {name!r} is (d_out, d_in) = {tuple(W.shape)}, so A must be ({A.shape[0]}, {d_in}) "
            f"and B ({rows}, {B.shape[1]}); got A {tuple(A.shape)}, B {tuple(B.shape)}{hint}")


# ============================================================================================
# One adapter: load and save
# ============================================================================================


def load_peft_adapter(path: str | os.PathLike, params: Mapping[str, Any] | None = None, *,
                      dtype: Any = None) -> tuple[LoraConfig, dict[str, dict[str, Any]]]:
    """Read a PEFT LoRA adapter directory; return ``(lora_config, adapters)``.

    Parameters
    ----------
    path : directory holding ``adapter_config.json`` and ``adapter_model.safetensors``
    params : mapping, optional
        The base model's parameters (lora-ref layout); when given, the adapter is checked against
        it with :func:`validate_adapter` (shapes, dtype, no targeted module missing).
    dtype : "float32" or "float64", optional
        Convert the arrays to this dtype. Without it they keep the file's dtype, which must be
        float32 or float64; float16 and bfloat16 files need it (widening them is exact). The
        stored dtype is checked first: integer, boolean and complex tensors are refused, never cast.

    Returns
    -------
    lora_config : LoraConfig, with ``embedding_modules`` the modules stored as embedding adapters
    adapters : dict ``{module: {"A": ..., "B": ...}}`` (plus ``"m"`` with ``use_dora``) in the
        layouts of the module docstring, on the current backend, sorted by module name.

    Raises
    ------
    AdapterFormatError
        Damaged or inconsistent files (the message names the file and key).
    NotImplementedError
        A PEFT feature lora-ref does not implement (lora_bias, modules_to_save, DoRA on an
        embedding or convolution, another peft_type, ...), named.
    FileNotFoundError
        ``path`` is not a directory.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"PEFT adapter directory {str(folder)!r} does not exist (or is not a directory)")
    target = load_dtype(dtype)
    config_file, weights_file = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    for file in (config_file, weights_file):
        if file.is_dir():
            raise AdapterFormatError(f"{file}: is a directory; a PEFT adapter holds a file of that name")
    if not config_file.is_file():
        inside = sorted(entry.name for entry in folder.iterdir() if _is_adapter_folder(entry))
        more = f"; it holds adapters in sub-folders ({', '.join(inside)}): use load_peft_adapters" if inside else ""
        raise AdapterFormatError(f"{folder}: {CONFIG_NAME} is missing{more}")
    if not weights_file.is_file():
        if (folder / "adapter_model.bin").is_file():
            raise NotImplementedError(f"{folder}: only adapter_model.bin (a PyTorch pickle) is present; lora-ref reads "
                                      f"{WEIGHTS_NAME} only (convert it with PEFT: save_pretrained(safe_serialization=True))")
        raise AdapterFormatError(f"{folder}: {WEIGHTS_NAME} is missing")
    raw = read_json(config_file, error=AdapterFormatError)
    lora_config = config_from_peft_dict(raw, source=str(config_file))
    stored = read_tensors(weights_file, error=AdapterFormatError)

    arrays: dict[str, dict[str, np.ndarray]] = {}
    kinds: dict[str, str] = {}                     # module -> "linear" or "embedding", from the A/B keys
    for key, (code, arr) in stored.items():
        module, slot, is_embedding = _parse_key(key, weights_file)
        # The stored dtype is checked before anything is converted: astype would turn integers,
        # booleans and complex numbers (dropping the imaginary part) into plausible floats.
        if code not in _FLOAT_CODES:
            raise AdapterFormatError(
                f"{weights_file}: key {key!r} is stored as {code} ({arr.dtype.name}), not a floating-point type; "
                "LoRA factors are F32 or F64 (F16 or BF16 with dtype=), and lora-ref converts no integer, "
                "boolean or complex tensor")
        found = arrays.setdefault(module, {})
        kind = "embedding" if is_embedding else "linear"
        if slot in found or (slot != "m" and kinds.setdefault(module, kind) != kind):
            raise AdapterFormatError(f"{weights_file}: module {module!r} has both lora_A/lora_B.weight and "
                                     "lora_embedding_A/B keys (a linear and an embedding adapter at once)")
        found[slot] = arr
    if not arrays:
        raise AdapterFormatError(f"{weights_file}: holds no LoRA weights")
    embeddings = sorted(m for m, kind in kinds.items() if kind == "embedding")
    untargeted = [m for m in arrays if not lora_config.targets(m)]
    if untargeted and raw.get("ensure_weight_tying") is True:
        raise NotImplementedError(
            f"{weights_file}: ensure_weight_tying=True: PEFT saved an adapter on the tied module(s) {untargeted} "
            f"but rewrote target_modules to {lora_config.target_modules!r}, so its own reload drops them on some models "
            "and keeps them on others (docs/embedding.md); lora-ref refuses rather than guess which model the file means")
    for module, found in arrays.items():
        _check_variant(lora_config, module, found, module in embeddings, weights_file)
    codes = {code for code, _ in stored.values()}
    if target is None and codes & {"F16", "BF16"}:
        raise AdapterFormatError(f"{weights_file}: the weights are stored as {sorted(codes & {'F16', 'BF16'})[0]}; pass "
                                 "dtype='float32' or 'float64' to widen them (exactly)")
    if embeddings:
        lora_config = dataclasses.replace(lora_config, embedding_modules=tuple(embeddings))
    adapters = {m: {s: (a if target is None else a.astype(target)) for s, a in sorted(arrays[m].items())}
                for m in sorted(arrays)}
    _check_structure(lora_config, adapters, str(weights_file))
    if params is not None:                                # validate_adapter without a second _check_structure
        _check_params(params)
        _check_against_base(lora_config, adapters, params, str(weights_file))
    return lora_config, {m: {s: asarray(a) for s, a in pair.items()} for m, pair in adapters.items()}


def _check_variant(lora_config: LoraConfig, module: str, found: dict[str, np.ndarray], is_embedding: bool,
                   weights_file: Path) -> None:
    """The keys of one module make one adapter of a kind lora-ref implements (before shape checks)."""
    kind = "embedding" if is_embedding else "linear"
    for slot in ("A", "B"):
        if slot not in found:
            have = next(s for s in ("A", "B", "m") if s in found)
            raise AdapterFormatError(f"{weights_file}: key {_key(module, have, kind)!r} has no partner "
                                     f"{_key(module, slot, kind)!r}")
    dora = lora_config.use_dora or "m" in found
    if dora and is_embedding:
        raise NotImplementedError(f"{weights_file}: module {module!r} is an embedding adapter with use_dora: DoRA on an "
                                  "embedding layer is not implemented by lora-ref")
    if dora and (found["A"].ndim >= 3 or ("m" in found and found["m"].ndim > 1)):
        raise NotImplementedError(f"{weights_file}: module {module!r} is a convolution adapter with use_dora: DoRA on a "
                                  "convolution (PEFT's magnitude (1, C_out, 1, ...)) is not implemented by lora-ref")
    if "m" in found and not lora_config.use_dora:
        raise AdapterFormatError(f"{weights_file}: key {_key(module, 'm')!r} is DoRA's magnitude, but "
                                 f"{CONFIG_NAME} has use_dora false (PEFT would not load it)")


def _parse_key(key: str, weights_file: Path) -> tuple[str, str, bool]:
    """``(module, slot, is_embedding)`` of a saved key; a key of anything else raises, naming it."""
    if not key.startswith(KEY_PREFIX):
        raise AdapterFormatError(
            f"{weights_file}: key {key!r} does not start with {KEY_PREFIX!r}; PEFT's PeftModel.from_pretrained "
            "would not load it (files written by transformers' add_adapter lack the prefix)")
    rest = key[len(KEY_PREFIX):]
    found = _KEY.match(rest)
    if found:
        slot = found["linear"] or found["embedding"] or "m"
        return found["module"], slot, found["embedding"] is not None
    features = (("modules_to_save", "a whole module saved with the adapter (modules_to_save)"),
                ("trainable_tokens", "trainable-token deltas (trainable_token_indices)"))
    for marker, feature in features:
        if marker in rest:
            raise NotImplementedError(f"{weights_file}: key {key!r} is {feature}, which lora-ref does not implement")
    if re.search(r"\.lora_[AB]\.bias$", rest):
        raise NotImplementedError(f"{weights_file}: key {key!r} is a bias on a LoRA factor (lora_bias), which lora-ref does not implement")
    named = re.fullmatch(r"(?P<module>.+)\.(?P<name>lora_[AB]|lora_embedding_[AB]|lora_magnitude_vector)"
                         r"\.(?P<adapter>[^.]+)(?P<weight>\.weight)?", rest)
    if named:
        plain = named["name"] + (".weight" if named["name"] in ("lora_A", "lora_B") else "")
        raise AdapterFormatError(
            f"{weights_file}: key {key!r} carries the adapter name {named['adapter']!r}: the weights were saved from "
            f"the model's state_dict, not with PEFT's save_pretrained, which strips the name; rename the key to "
            f"'{KEY_PREFIX}{named['module']}.{plain}'")
    if ".lora_" in rest:
        raise NotImplementedError(f"{weights_file}: key {key!r} belongs to a LoRA variant lora-ref does not implement")
    raise NotImplementedError(
        f"{weights_file}: key {key!r} is a base-model weight saved with the adapter (bias='all', an embedding table "
        "saved by PEFT's save_embedding_layers, resized embeddings, ...); lora-ref reads LoRA factors only (PEFT: "
        "save_pretrained(..., save_embedding_layers=False) leaves the base table out)")


def _adapter_files(lora_config: LoraConfig, adapters: Mapping[str, Mapping[str, Any]],
                   base_model_name_or_path: str | None) -> tuple[str, dict[str, np.ndarray]]:
    """The text of ``adapter_config.json`` and the tensors of ``adapter_model.safetensors``."""
    config = config_to_peft_dict(lora_config, base_model_name_or_path)
    _check_structure(lora_config, adapters, None)
    if not adapters:
        raise ValueError("adapters is empty: there is nothing to save")
    tensors = {}
    for module, pair in adapters.items():
        kind = _kind(lora_config, module, pair["A"])
        for slot in sorted(pair):
            arr = np.ascontiguousarray(to_numpy(pair[slot]))
            if arr.dtype not in (np.float32, np.float64):
                raise TypeError(f"adapters[{module!r}][{slot!r}] is {arr.dtype.name}; save float32 or float64")
            tensors[_key(module, slot, kind)] = arr
    return json.dumps(config, indent=2, sort_keys=True) + "\n", tensors


def _write_adapter(folder: Path, text: str, tensors: dict[str, np.ndarray]) -> None:
    (folder / CONFIG_NAME).write_text(text, encoding="utf-8")
    safetensors.numpy.save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})


def save_peft_adapter(path: str | os.PathLike, lora_config: LoraConfig, adapters: Mapping[str, Mapping[str, Any]],
                      base_model_name_or_path: str | None = None) -> Path:
    """Write ``adapters`` as a PEFT adapter directory that ``peft.PeftModel.from_pretrained`` loads.

    ``adapters`` is ``{module: {"A": ..., "B": ...}}`` (plus ``"m"`` with ``use_dora``; any
    backend; float32 or float64) in the layouts of the module docstring; each module's key names
    follow its kind (``lora_config.embedding_modules`` -> ``lora_embedding_A`` / ``_B``). The
    adapters are checked against ``lora_config`` first (targets, ranks, kinds, one dtype, finite
    values). The directory ``path`` is replaced atomically
    (:func:`lora_ref.files.write_directory_atomically`): other files and sub-folders already in
    it (other adapters among them) are kept. Returns ``path`` as a ``Path``.

    Raises ``ValueError`` for a config PEFT cannot express (``enable_lora``, no target_modules)
    and :class:`AdapterFormatError` for adapters that do not match the config.
    """
    text, tensors = _adapter_files(lora_config, adapters, base_model_name_or_path)
    return write_directory_atomically(path, lambda folder: _write_adapter(folder, text, tensors))


# ============================================================================================
# Several adapters in one directory (PeftModel.save_pretrained with more than one adapter)
# ============================================================================================


def _is_adapter_folder(entry: Path) -> bool:
    """A visible sub-folder holding an ``adapter_config.json`` (hidden ones are temporaries)."""
    return not entry.name.startswith(".") and entry.is_dir() and (entry / CONFIG_NAME).exists()


def list_peft_adapters(path: str | os.PathLike, *, default: str = DEFAULT_ADAPTER) -> dict[str, Path]:
    """The adapters a PEFT directory holds, ``{name: folder}``, as ``PeftModel.save_pretrained``
    lays them out: the root's adapter (if ``adapter_config.json`` is there) named ``default``
    first, then each visible sub-folder holding an ``adapter_config.json``, named after it, sorted.

    Raises ``FileNotFoundError`` when ``path`` is not a directory and :class:`AdapterFormatError`
    when it holds no adapter, or the root's adapter and a sub-folder both claim ``default``.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"PEFT adapter directory {str(folder)!r} does not exist (or is not a directory)")
    found = {default: folder} if (folder / CONFIG_NAME).exists() else {}
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if _is_adapter_folder(entry):
            if entry.name in found:
                raise AdapterFormatError(f"{folder}: the root holds an adapter, which PEFT names {default!r}, and so "
                                         f"does the sub-folder {entry.name!r}: two adapters with one name")
            found[entry.name] = entry
    if not found:
        raise AdapterFormatError(f"{folder}: holds no PEFT adapter ({CONFIG_NAME} neither at the root nor in a "
                                 "sub-folder)")
    return found


def load_peft_adapters(path: str | os.PathLike, params: Mapping[str, Any] | None = None, *, dtype: Any = None,
                       default: str = DEFAULT_ADAPTER) -> dict[str, tuple[LoraConfig, dict[str, dict[str, Any]]]]:
    """Read every adapter of a PEFT directory: ``{name: (lora_config, adapters)}``.

    The layout is ``PeftModel.save_pretrained``'s (:func:`list_peft_adapters`): the adapter at
    the root is named ``default`` (PEFT's ``from_pretrained`` name), each other one after its
    sub-folder. Each is read by :func:`load_peft_adapter` with ``params`` and ``dtype``, so each
    has its own config (rank, alpha, rsLoRA, DoRA ...); a failure names the adapter's folder.
    This is the mapping :meth:`lora_ref.adapters.AdapterSet.from_peft` takes.
    """
    load_dtype(dtype)
    return {name: load_peft_adapter(folder, params, dtype=dtype)
            for name, folder in list_peft_adapters(path, default=default).items()}


def _check_adapter_name(name: Any) -> str:
    if not isinstance(name, str) or not name:
        raise TypeError(f"adapter names must be non-empty strings, got {name!r}")
    if name in (".", "..") or name.startswith(".") or any(c in name for c in "/\\\0") or name in (CONFIG_NAME, WEIGHTS_NAME):
        raise ValueError(f"adapter name {name!r} cannot name a sub-folder: it must not start with '.', contain '/' "
                         f"or '\\\\', or be {CONFIG_NAME!r} / {WEIGHTS_NAME!r}")
    return name


def save_peft_adapters(path: str | os.PathLike, adapters: Mapping[str, tuple[LoraConfig, Mapping[str, Any]]],
                       default: str | None = DEFAULT_ADAPTER, *, base_model_name_or_path: str | None = None) -> Path:
    """Write several named adapters into one directory, as ``PeftModel.save_pretrained`` does.

    ``adapters`` maps each name to ``(lora_config, adapters)`` (what :func:`load_peft_adapters`
    returns). The adapter named ``default`` goes at the root (PEFT loads it with
    ``PeftModel.from_pretrained(model, path)``), every other one into ``path/<name>/``
    (``peft_model.load_adapter(path / name, adapter_name=name)``); ``default=None`` puts all of
    them in sub-folders, as PEFT does when no adapter is called "default". Each is checked as
    :func:`save_peft_adapter` checks one, all before anything is written; then the whole
    directory is replaced in one atomic swap. The directory then holds exactly these adapters:
    adapters of a previous save that are not in ``adapters`` (its root files, sub-folders with an
    ``adapter_config.json``) are not carried over; other files are. Returns ``path`` as a ``Path``.
    """
    if not isinstance(adapters, Mapping) or not adapters:
        raise TypeError(f"adapters must be a non-empty mapping of name to (lora_config, adapters), got {adapters!r:.80}")
    if default is not None and default not in adapters:
        raise ValueError(f"default={default!r} is not one of the adapters ({', '.join(map(repr, adapters))}); name "
                         "the one to write at the root, or pass default=None to write every adapter in a sub-folder")
    files = {}
    for name, pair in adapters.items():
        _check_adapter_name(name)
        if not isinstance(pair, tuple) or len(pair) != 2:
            raise TypeError(f"adapters[{name!r}] must be a (lora_config, adapters) pair, got {type(pair).__name__}")
        try:
            files[name] = _adapter_files(pair[0], pair[1], base_model_name_or_path)
        except (ValueError, TypeError, NotImplementedError) as exc:
            raise type(exc)(f"adapter {name!r}: {exc}") from exc

    def write(folder: Path) -> None:
        for name, (text, tensors) in files.items():
            where = folder if name == default else folder / name
            where.mkdir(exist_ok=True)
            _write_adapter(where, text, tensors)

    def keep(entry: Path) -> bool:                 # drop the previous save's adapters, keep the rest
        if entry.name in (CONFIG_NAME, WEIGHTS_NAME):
            return default is not None
        return not _is_adapter_folder(entry)

    return write_directory_atomically(path, write, keep=keep)
