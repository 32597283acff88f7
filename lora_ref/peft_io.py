"""PEFT LoRA adapters on disk, read and written without PyTorch.

A PEFT adapter is a directory with two files:

    adapter_config.json          PEFT's ``LoraConfig`` as JSON (``r``, ``lora_alpha``, ``target_modules`` ...)
    adapter_model.safetensors    one tensor per factor, keyed
                                 ``base_model.model.<module>.lora_A.weight``  A (r, d_in)
                                 ``base_model.model.<module>.lora_B.weight``  B (d_out, r)

(PEFT strips the adapter name, e.g. ``default``, from the saved keys.) lora-ref reads it into a
:class:`~lora_ref.lora.LoraConfig` and an adapters dict ``{module: {"A": (r, d_in), "B": (d_out, r)}}``
and writes it back, using ``safetensors``' NumPy API. The layout of A and B is the same as PEFT's
whatever ``fan_in_fan_out`` says (that flag describes the *base* weight's storage).

Contract
--------
* Every field of PEFT 0.21.2's ``LoraConfig`` is either honoured, irrelevant to a saved adapter
  (accepted and documented), or refused with ``NotImplementedError`` naming it when set: see
  :data:`CONFIG_FIELDS` (docs/files.md prints it). A field PEFT 0.21.2 does not have is refused
  unless it is off (null, false, empty). Nothing is silently ignored.
* A damaged or inconsistent adapter raises :class:`AdapterFormatError` (a ``ValueError``) naming
  the file and the key: truncated or corrupt safetensors, bad JSON, missing or extra keys, shapes
  that disagree with the config or with the base model, non-float dtypes, non-finite values.
* :func:`save_peft_adapter` writes both files into a fresh directory beside the target and then
  swaps it in with one ``rename`` (see :func:`lora_ref.files.write_directory_atomically` for
  exactly what is atomic); an interrupted save leaves the previous adapter as it was.
* The generic parts (safetensors header checks, JSON, atomic writes) are :mod:`lora_ref.files`'s;
  this module holds the PEFT format only: its config fields and its key names.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy

from .backend import asarray, dtype_name, to_numpy
from .checks import is_int
from .config import LoraConfig
from .files import FileFormatError, read_json, read_tensors, write_directory_atomically

__all__ = [
    "CONFIG_FIELDS",
    "CONFIG_NAME",
    "KEY_PREFIX",
    "PEFT_VERSION",
    "WEIGHTS_NAME",
    "AdapterFormatError",
    "config_from_peft_dict",
    "config_to_peft_dict",
    "load_peft_adapter",
    "save_peft_adapter",
    "validate_adapter",
]

PEFT_VERSION = "0.21.2"            # the PEFT whose LoraConfig fields are classified below
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."   # PeftModel's prefix: PeftModel.from_pretrained ignores keys without it
_FACTOR = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>[AB])\.weight$")
_FLOAT_CODES = ("F64", "F32", "F16", "BF16")   # safetensors codes a factor may be stored as


class AdapterFormatError(FileFormatError):
    """A PEFT adapter (its config, its safetensors file, or its fit to a base model) is invalid."""


# ============================================================================================
# adapter_config.json: every field of PEFT 0.21.2's LoraConfig, and what lora-ref does with it
# ============================================================================================

# name -> (decision, explanation). Decisions: "honoured" (mapped onto lora_ref.LoraConfig),
# "ignored" (cannot change a saved adapter's function), "refused" (NotImplementedError when set).
CONFIG_FIELDS: dict[str, tuple[str, str]] = {
    # PeftConfig (peft/config.py)
    "peft_type": ("honoured", 'must be "LORA"; any other PEFT method is refused'),
    "task_type": ("ignored", "picks PEFT's wrapper class; the LoRA math is the same for every task"),
    "auto_mapping": ("ignored", "which base-model class PEFT instantiates"),
    "peft_version": ("ignored", "the PEFT version that wrote the file"),
    "base_model_name_or_path": ("ignored", "informational; the base model is passed to lora-ref"),
    "revision": ("ignored", "informational (the base model's revision)"),
    "inference_mode": ("ignored", "whether PyTorch marks the adapter trainable"),
    # LoraConfig (peft/tuners/lora/config.py)
    "r": ("honoured", "LoraConfig.r"),
    "lora_alpha": ("honoured", "LoraConfig.alpha"),
    "lora_dropout": ("honoured", "LoraConfig.dropout (training only; inference applies none)"),
    "target_modules": ("honoured", 'list or regex string; null and "all-linear" are refused '
                                   "(PEFT resolves them against the model when it creates an adapter)"),
    "fan_in_fan_out": ("honoured", "LoraConfig.fan_in_fan_out: how the base checkpoint stores W"),
    "use_rslora": ("honoured", "LoraConfig.use_rslora: scale alpha/sqrt(r)"),
    "rank_pattern": ("honoured", "LoraConfig.rank_pattern (PEFT's first-matching-key rule)"),
    "alpha_pattern": ("honoured", "LoraConfig.alpha_pattern"),
    "layers_to_transform": ("honoured", "LoraConfig.layers_to_transform (an empty list means all layers)"),
    "layers_pattern": ("honoured", "LoraConfig.layers_pattern"),
    "bias": ("honoured", 'only "none"; "all" and "lora_only" train base biases, refused'),
    "init_lora_weights": ("honoured", 'true, false, "gaussian" -> LoraConfig.init; "eva", "orthogonal", '
                                      '"mica" accepted (creation only, the base is untouched); "pissa*", '
                                      '"olora", "corda", "loftq", "lora_ga" refused (they rewrite the base '
                                      "weights, so the adapter only fits the modified base)"),
    "exclude_modules": ("refused", "changes which modules are targeted; lora_ref.LoraConfig has no exclusions"),
    "modules_to_save": ("refused", "saves whole trained base modules with the adapter"),
    "megatron_config": ("refused", "Megatron parallel layers"),
    "megatron_core": ("ignored", "only read together with megatron_config"),
    "trainable_token_indices": ("refused", "trainable-token embedding deltas"),
    "loftq_config": ("ignored", 'creation only (init_lora_weights="loftq" is refused)'),
    "eva_config": ("ignored", "creation only: EVA's data-driven init; its ranks are saved in rank_pattern"),
    "corda_config": ("ignored", 'creation only (init_lora_weights="corda" is refused)'),
    "lora_ga_config": ("ignored", 'creation only (init_lora_weights="lora_ga" is refused)'),
    "use_dora": ("refused", "DoRA: a magnitude vector rescales W + s B A"),
    "velora_config": ("refused", "VeLoRA: an approximate backward pass (gradients differ from LoRA's)"),
    "alora_invocation_tokens": ("refused", "activated LoRA: the adapter acts only after given tokens"),
    "use_qalora": ("refused", "QA-LoRA: pooled inputs on the adapter branch"),
    "qalora_group_size": ("ignored", "only read together with use_qalora"),
    "monteclora_config": ("refused", "MonteCLoRA: sampled adapters"),
    "layer_replication": ("refused", "repeats base layers, changing the model's depth"),
    "runtime_config": ("ignored", "runtime settings; PEFT does not save them"),
    "lora_bias": ("refused", "a trainable bias on lora_B"),
    "target_parameters": ("refused", "LoRA on bare nn.Parameters (mixture-of-experts weights)"),
    "use_bdlora": ("refused", "block-diagonal LoRA factors"),
    "arrow_config": ("refused", "Arrow routing between several adapters"),
    "kasa_config": ("refused", "KaSA: a singular-value diagonal between A and B, and a truncated base"),
    "ensure_weight_tying": ("ignored", "ties adapters of tied embedding layers; embedding adapters are refused"),
}

# Refused fields are off when they hold one of these values (PEFT's defaults and its "unset").
_OFF_VALUES: dict[str, tuple[Any, ...]] = {
    "exclude_modules": (None, [], ""), "modules_to_save": (None, []), "megatron_config": (None,),
    "trainable_token_indices": (None,), "use_dora": (False, None), "velora_config": (None,),
    "alora_invocation_tokens": (None,), "use_qalora": (False, None), "monteclora_config": (None,),
    "layer_replication": (None,), "lora_bias": (False, None), "target_parameters": (None,),
    "use_bdlora": (None,), "arrow_config": (None,), "kasa_config": (None,),
}
assert set(_OFF_VALUES) == {k for k, (d, _) in CONFIG_FIELDS.items() if d == "refused"}

_INIT_TO_PEFT = {"kaiming": True, "gaussian": "gaussian", "random": False}
_INIT_ACCEPTED = ("eva", "orthogonal", "mica")          # creation-only schemes that leave W alone
_INIT_REFUSED = ("pissa", "olora", "corda", "loftq", "lora_ga")


def _same_json(a: Any, b: Any) -> bool:
    """JSON equality that tells ``false`` from ``0`` (Python's ``False == 0`` does not)."""
    return type(a) is type(b) and a == b


def _is_off(name: str, value: Any) -> bool:
    return any(_same_json(value, off) for off in _OFF_VALUES[name])


def config_from_peft_dict(d: Mapping[str, Any], *, source: str = CONFIG_NAME) -> LoraConfig:
    """A :class:`~lora_ref.lora.LoraConfig` from a parsed ``adapter_config.json``.

    Honoured fields are mapped (``lora_alpha`` -> ``alpha``, ``lora_dropout`` -> ``dropout``,
    ``init_lora_weights`` -> ``init`` ...); fields that cannot change a saved adapter are accepted;
    fields naming a feature lora-ref does not implement raise ``NotImplementedError`` naming the
    field and its value when set (see :data:`CONFIG_FIELDS`). Invalid values raise
    :class:`AdapterFormatError` naming ``source`` and the field.
    """
    if not isinstance(d, Mapping):
        raise AdapterFormatError(f"{source}: must be a JSON object, got {type(d).__name__}")
    fail = lambda msg: AdapterFormatError(f"{source}: {msg}")  # noqa: E731

    peft_type = d.get("peft_type", None)
    if peft_type != "LORA":
        if peft_type is None or not isinstance(peft_type, str):
            raise fail(f'"peft_type" must be "LORA", got {peft_type!r}')
        raise NotImplementedError(f'{source}: "peft_type" is {peft_type!r}; lora-ref reads LoRA adapters ("LORA") only')
    for name, value in d.items():
        if not isinstance(name, str):
            raise fail(f"field names must be strings, got {name!r}")
        decision = CONFIG_FIELDS.get(name, ("unknown", ""))[0]
        if decision == "refused" and not _is_off(name, value):
            raise NotImplementedError(
                f"{source}: {name}={value!r} is not implemented by lora-ref ({CONFIG_FIELDS[name][1]}); "
                "refusing the adapter rather than ignoring the setting")
        if decision == "unknown" and not any(_same_json(value, off) for off in (None, False, [], {}, "")):
            raise NotImplementedError(
                f"{source}: field {name!r}={value!r} is not a field of PEFT {PEFT_VERSION}'s LoraConfig, "
                "so lora-ref cannot know what it changes; refusing the adapter")
    bias = d.get("bias", "none")
    if bias != "none":
        if not isinstance(bias, str):
            raise fail(f'"bias" must be "none", "all" or "lora_only", got {bias!r}')
        raise NotImplementedError(f'{source}: bias={bias!r} trains base-model biases; lora-ref supports bias="none" only')

    init = _init_from_peft(d.get("init_lora_weights", True), source)
    targets = d.get("target_modules", None)
    if targets is None:
        raise NotImplementedError(
            f'{source}: "target_modules" is null: PEFT fills in a per-architecture default when it creates '
            "the adapter, which lora-ref does not guess; list the modules")
    if isinstance(targets, str) and targets.lower() == "all-linear":
        raise NotImplementedError(
            f'{source}: target_modules="all-linear" is resolved by PEFT against the model at creation (and '
            "saved expanded); lora-ref needs the explicit list of module names")
    if isinstance(targets, list) and not all(isinstance(t, str) for t in targets):
        raise fail(f'"target_modules" must be a list of strings or a regex string, got {targets!r}')
    if not isinstance(targets, (str, list)):
        raise fail(f'"target_modules" must be a list of strings or a regex string, got {targets!r}')
    layers = d.get("layers_to_transform", None)
    if isinstance(layers, list) and not layers:
        layers = None                      # PEFT: an empty list means every layer
    pattern = d.get("layers_pattern", None)
    if pattern in ("", []):
        pattern = None                     # PEFT: an empty pattern means any layer container
    if isinstance(targets, str) and (layers is not None or pattern is not None):
        raise fail("layers_to_transform / layers_pattern cannot be used with a regex target_modules "
                   f"({targets!r}); PEFT refuses this config")
    if pattern is not None and layers is None:
        raise fail(f"layers_pattern={pattern!r} is set but layers_to_transform is not; PEFT refuses this config")
    for name in ("rank_pattern", "alpha_pattern"):
        if d.get(name) is not None and not isinstance(d.get(name), dict):
            raise fail(f'"{name}" must be an object mapping module patterns to values, got {d.get(name)!r}')
    for name in ("fan_in_fan_out", "use_rslora"):
        if not isinstance(d.get(name, False), bool):
            raise fail(f'"{name}" must be true or false, got {d.get(name)!r}')
    if layers is not None and not is_int(layers) and not (isinstance(layers, list) and all(is_int(i) for i in layers)):
        raise fail(f'"layers_to_transform" must be a layer index (an integer) or a list of layer indices, '
                   f"got {layers!r}")
    if isinstance(pattern, list) and not all(isinstance(p, str) for p in pattern):
        raise fail(f'"layers_pattern" must be a name or a list of names, got {pattern!r}')
    try:
        return LoraConfig(
            r=d.get("r", 8), alpha=d.get("lora_alpha", 8), dropout=d.get("lora_dropout", 0.0),
            use_rslora=d.get("use_rslora", False), init=init, fan_in_fan_out=d.get("fan_in_fan_out", False),
            target_modules=targets, rank_pattern=d.get("rank_pattern") or None,
            alpha_pattern=d.get("alpha_pattern") or None, layers_to_transform=layers, layers_pattern=pattern)
    except (TypeError, ValueError) as exc:
        raise fail(f"invalid LoRA setting: {exc}") from exc


def _init_from_peft(value: Any, source: str) -> str:
    if value is True:
        return "kaiming"
    if value is False:
        return "random"
    if not isinstance(value, str):
        raise AdapterFormatError(f'{source}: "init_lora_weights" must be true, false or a scheme name, got {value!r}')
    if value == "gaussian":
        return "gaussian"
    if value.lower() in _INIT_ACCEPTED:
        return "kaiming"                   # creation-only: the saved A and B are all that matters
    if value.lower() == "olora" or value.startswith(_INIT_REFUSED):
        raise NotImplementedError(
            f"{source}: init_lora_weights={value!r} rewrites the base model's weights when the adapter is "
            "created, so this adapter fits only that modified base; convert it to a plain LoRA first "
            "(PEFT: save_pretrained(..., path_initial_model_for_weight_conversion=...))")
    raise NotImplementedError(f"{source}: init_lora_weights={value!r} is not a scheme lora-ref knows")


def config_to_peft_dict(lora_config: LoraConfig, base_model_name_or_path: str | None = None) -> dict[str, Any]:
    """``lora_config`` as the ``adapter_config.json`` dict PEFT 0.21.2 writes (every field present).

    Raises ``ValueError`` for a config PEFT cannot express: ``enable_lora`` (loralib's
    ``MergedLinear``, which adapts only some row-blocks of a fused projection).
    """
    if not isinstance(lora_config, LoraConfig):
        raise TypeError(f"lora_config must be a lora_ref.LoraConfig, got {type(lora_config).__name__}")
    if lora_config.enable_lora:
        raise ValueError(
            f"lora_config.enable_lora={dict(lora_config.enable_lora)!r} is loralib's MergedLinear (an adapter on "
            "some row-blocks of a fused projection); the PEFT format cannot express it. Save the dense "
            "delta instead, or adapt the whole projection (no enable_lora)")
    if base_model_name_or_path is not None and not isinstance(base_model_name_or_path, str):
        raise TypeError(f"base_model_name_or_path must be a string or None, got {base_model_name_or_path!r}")
    number = lambda v: int(v) if float(v).is_integer() else float(v)  # noqa: E731 (8, not 8.0)
    targets = lora_config.target_modules
    if targets is None:
        raise ValueError("lora_config.target_modules is None: a PEFT adapter must name its target modules")
    # (Layer settings PEFT refuses -- with a regex target, or a pattern without layers -- cannot
    # reach here: LoraConfig refuses them on construction.)
    pattern = lora_config.layers_pattern
    out: dict[str, Any] = {name: None for name in CONFIG_FIELDS}
    out.update({
        "peft_type": "LORA", "peft_version": PEFT_VERSION, "task_type": None, "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path, "revision": None, "inference_mode": True,
        "r": lora_config.r, "lora_alpha": number(lora_config.alpha), "lora_dropout": lora_config.dropout,
        "target_modules": targets if isinstance(targets, str) else list(targets),
        "fan_in_fan_out": lora_config.fan_in_fan_out, "use_rslora": lora_config.use_rslora,
        "rank_pattern": dict(lora_config.rank_pattern),
        "alpha_pattern": {k: number(v) for k, v in lora_config.alpha_pattern.items()},
        "layers_to_transform": None if lora_config.layers_to_transform is None else list(lora_config.layers_to_transform),
        "layers_pattern": None if pattern is None else (pattern[0] if len(pattern) == 1 else list(pattern)),
        "bias": "none", "init_lora_weights": _INIT_TO_PEFT[lora_config.init],
        "megatron_core": "megatron.core", "loftq_config": {}, "use_dora": False, "use_qalora": False,
        "qalora_group_size": 16, "lora_bias": False, "ensure_weight_tying": False,
    })
    del out["runtime_config"]              # PEFT's to_dict drops it
    return out


# ============================================================================================
# Validation against the config and against a base model
# ============================================================================================


def _where(source: str | None, module: str, factor: str | None = None) -> str:
    key = f"{KEY_PREFIX}{module}.lora_{factor}.weight" if factor else module
    return f"{source}: key {key!r}" if source else f"adapters[{module!r}]" + (f"[{factor!r}]" if factor else "")


def _check_structure(lora_config: LoraConfig, adapters: Mapping[str, Any], source: str | None) -> None:
    """What can be checked without the base model: two 2-D float factors per module, ranks as the
    config says (rank_pattern included), one dtype throughout, finite values, targeted modules."""
    if not isinstance(lora_config, LoraConfig):
        raise TypeError(f"lora_config must be a lora_ref.LoraConfig, got {type(lora_config).__name__}")
    if not isinstance(adapters, Mapping):
        raise TypeError(f"adapters must be a mapping of module name to {{'A': ..., 'B': ...}}, got {type(adapters).__name__}")
    dtypes: dict[str, str] = {}
    for module, pair in adapters.items():
        if not isinstance(module, str) or not module:
            raise TypeError(f"adapter module names must be non-empty strings, got {module!r}")
        if not isinstance(pair, Mapping) or set(pair) != {"A", "B"}:
            got = sorted(pair) if isinstance(pair, Mapping) else type(pair).__name__
            raise AdapterFormatError(f"{_where(source, module)}: needs exactly the factors A and B, got {got}")
        for factor in ("A", "B"):
            arr = pair[factor]
            if not hasattr(arr, "shape") or not hasattr(arr, "dtype"):
                raise TypeError(f"{_where(source, module, factor)}: must be an array, got {type(arr).__name__}")
            if dtype_name(arr.dtype) not in ("float16", "float32", "float64"):
                raise AdapterFormatError(f"{_where(source, module, factor)}: dtype {dtype_name(arr.dtype)} is not "
                                         "a floating dtype (float32 or float64 expected)")
            if arr.ndim != 2:
                raise AdapterFormatError(f"{_where(source, module, factor)}: must be 2-D, got shape {tuple(arr.shape)}")
            dtypes[f"{module}.{factor}"] = dtype_name(arr.dtype)
        A, B = pair["A"], pair["B"]
        if not lora_config.targets(module):
            raise AdapterFormatError(
                f"{_where(source, module)}: the config does not target this module (target_modules="
                f"{lora_config.target_modules!r}, layers_to_transform={lora_config.layers_to_transform!r}); "
                "PEFT would drop these weights")
        r = lora_config.rank_for(module)
        enable = lora_config.enable_for(module)
        n = 1 if enable is None else sum(enable)
        if A.shape[0] != n * r or B.shape[1] != r:
            expected = f"A ({n * r}, d_in) and B (d_out, {r})" if n == 1 else f"A ({n}*{r}, d_in) and B ({n}*q, {r})"
            raise AdapterFormatError(
                f"{_where(source, module)}: the config gives this module rank {r} (r={lora_config.r}, "
                f"rank_pattern={dict(lora_config.rank_pattern)!r}), so {expected}; got A {tuple(A.shape)}, B {tuple(B.shape)}")
        for factor, arr in (("A", A), ("B", B)):
            values = to_numpy(arr)
            bad = int(np.size(values) - np.count_nonzero(np.isfinite(values)))
            if bad:
                raise AdapterFormatError(f"{_where(source, module, factor)}: {bad} non-finite value(s) (inf or nan)")
    if len(set(dtypes.values())) > 1:
        first = next(iter(dtypes.items()))
        other = next((k, v) for k, v in dtypes.items() if v != first[1])
        raise AdapterFormatError(f"{source or 'adapters'}: mixed dtypes: {first[0]} is {first[1]} but {other[0]} is {other[1]}")


def validate_adapter(lora_config: LoraConfig, adapters: Mapping[str, Mapping[str, Any]],
                     params: Mapping[str, Any], *, source: str | None = None) -> None:
    """Check that ``adapters`` fits the base model ``params`` under ``lora_config``; return None.

    ``params`` maps state-dict names to arrays in lora-ref's layout: a linear module ``m`` has
    ``params[m + ".weight"]`` of shape (d_out, d_in) (as :func:`transformer_ref.load_hf_gpt2`
    returns; ``fan_in_fan_out`` describes the original checkpoint and is not applied here).
    Checked: every adapted module has a 2-D base weight, is targeted by the config, and has
    A (r, d_in), B (d_out, r) with r from ``rank_pattern`` / ``r`` (loralib ``enable_lora``:
    A (n r, d_in), B (n d_out / G, r)); every targeted module that has a 2-D ``.weight`` in
    ``params`` has an adapter; factors have the base weight's dtype and finite values.

    Raises :class:`AdapterFormatError` naming the module (and ``source``, e.g. the file, when
    given), the expected and the actual shapes; ``TypeError`` for arguments of the wrong kind.
    """
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a mapping of parameter name to array, got {type(params).__name__}")
    _check_structure(lora_config, adapters, source)
    for module, pair in adapters.items():
        W = params.get(module + ".weight")
        if W is None:
            raise AdapterFormatError(f"{_where(source, module)}: the base model has no weight "
                                     f"{module + '.weight'!r} for this adapter")
        if W.ndim != 2:
            raise AdapterFormatError(f"{_where(source, module)}: the base weight {module + '.weight'!r} has shape "
                                     f"{tuple(W.shape)}; LoRA adapts 2-D (d_out, d_in) weights only")
        d_out, d_in = W.shape
        A, B = pair["A"], pair["B"]
        enable = lora_config.enable_for(module)
        rows = d_out if enable is None else (d_out // len(enable)) * sum(enable)
        if enable is not None and d_out % len(enable):
            raise AdapterFormatError(f"{_where(source, module)}: enable_lora has {len(enable)} blocks but the base "
                                     f"weight's d_out={d_out} is not divisible by {len(enable)}")
        if A.shape[1] != d_in or B.shape[0] != rows:
            r = B.shape[1]
            raise AdapterFormatError(
                f"{_where(source, module)}: the base weight {module + '.weight'!r} is (d_out, d_in) = {tuple(W.shape)}, "
                f"so A must be ({A.shape[0]}, {d_in}) and B ({rows}, {r}); got A {tuple(A.shape)}, B {tuple(B.shape)}")
        if dtype_name(A.dtype) != dtype_name(W.dtype):
            raise AdapterFormatError(
                f"{_where(source, module)}: the adapter is {dtype_name(A.dtype)} but the base weight is "
                f"{dtype_name(W.dtype)}; load it with dtype={dtype_name(W.dtype)!r} to convert it")
    missing = [name[: -len(".weight")] for name, W in params.items()
               if isinstance(name, str) and name.endswith(".weight") and getattr(W, "ndim", 0) == 2
               and lora_config.targets(name[: -len(".weight")]) and name[: -len(".weight")] not in adapters]
    if missing:
        raise AdapterFormatError(
            f"{source or 'adapters'}: the config targets {len(missing)} module(s) of the base model that have no "
            f"adapter weights: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")


# ============================================================================================
# Load and save
# ============================================================================================


def load_peft_adapter(path: str | os.PathLike, params: Mapping[str, Any] | None = None, *,
                      dtype: Any = None) -> tuple[LoraConfig, dict[str, dict[str, Any]]]:
    """Read a PEFT LoRA adapter directory; return ``(lora_config, adapters)``.

    Parameters
    ----------
    path : directory holding ``adapter_config.json`` and ``adapter_model.safetensors``
    params : mapping, optional
        The base model's parameters (lora-ref layout, W (d_out, d_in)); when given, the adapter is
        checked against it with :func:`validate_adapter` (shapes, dtype, no targeted module missing).
    dtype : "float32" or "float64", optional
        Convert the factors to this dtype. Without it they keep the file's dtype, which must be
        float32 or float64; float16 and bfloat16 files need it (widening them is exact). The
        stored dtype is checked first: integer, boolean and complex tensors are refused, never cast.

    Returns
    -------
    lora_config : LoraConfig
    adapters : dict ``{module: {"A": (r, d_in), "B": (d_out, r)}}`` on the current backend,
        ``module`` as in the base model (``transformer.h.0.attn.c_attn``), sorted by name.

    Raises
    ------
    AdapterFormatError
        Damaged or inconsistent files (the message names the file and key).
    NotImplementedError
        A PEFT feature lora-ref does not implement (DoRA, lora_bias, modules_to_save, embedding
        adapters, another peft_type, ...), named.
    FileNotFoundError
        ``path`` is not a directory.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"PEFT adapter directory {str(folder)!r} does not exist (or is not a directory)")
    target = None
    if dtype is not None:
        target = dtype_name(dtype) if not isinstance(dtype, str) else dtype
        if target not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    config_file, weights_file = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    for file in (config_file, weights_file):
        if file.is_dir():
            raise AdapterFormatError(f"{file}: is a directory; a PEFT adapter holds a file of that name")
    if not config_file.is_file():
        raise AdapterFormatError(f"{folder}: {CONFIG_NAME} is missing")
    if not weights_file.is_file():
        if (folder / "adapter_model.bin").is_file():
            raise NotImplementedError(f"{folder}: only adapter_model.bin (a PyTorch pickle) is present; lora-ref reads "
                                      f"{WEIGHTS_NAME} only (convert it with PEFT: save_pretrained(safe_serialization=True))")
        raise AdapterFormatError(f"{folder}: {WEIGHTS_NAME} is missing")
    raw = read_json(config_file, error=AdapterFormatError)
    lora_config = config_from_peft_dict(raw, source=str(config_file))
    stored = read_tensors(weights_file, error=AdapterFormatError)

    factors: dict[str, dict[str, np.ndarray]] = {}
    for key, (code, arr) in stored.items():
        _check_key(key, weights_file)
        # The stored dtype is checked before anything is converted: astype would turn integers,
        # booleans and complex numbers (dropping the imaginary part) into plausible floats.
        if code not in _FLOAT_CODES:
            raise AdapterFormatError(
                f"{weights_file}: key {key!r} is stored as {code} ({arr.dtype.name}), not a floating-point type; "
                "LoRA factors are F32 or F64 (F16 or BF16 with dtype=), and lora-ref converts no integer, "
                "boolean or complex tensor")
        found = _FACTOR.match(key[len(KEY_PREFIX):])
        factors.setdefault(found["module"], {})[found["factor"]] = arr
    for module, pair in factors.items():
        for factor in ("A", "B"):
            if factor not in pair:
                other = "B" if factor == "A" else "A"
                raise AdapterFormatError(f"{weights_file}: key {KEY_PREFIX + module + '.lora_' + other + '.weight'!r} "
                                         f"has no partner {KEY_PREFIX + module + '.lora_' + factor + '.weight'!r}")
    if not factors:
        raise AdapterFormatError(f"{weights_file}: holds no LoRA weights")
    codes = {code for code, _ in stored.values()}
    if target is None and codes & {"F16", "BF16"}:
        raise AdapterFormatError(f"{weights_file}: the weights are stored as {sorted(codes & {'F16', 'BF16'})[0]}; pass "
                                 "dtype='float32' or 'float64' to widen them (exactly)")
    adapters = {m: {"A": factors[m]["A"], "B": factors[m]["B"]} for m in sorted(factors)}
    if target is not None:
        adapters = {m: {f: a.astype(target) for f, a in pair.items()} for m, pair in adapters.items()}
    _check_structure(lora_config, adapters, str(weights_file))
    if params is not None:
        validate_adapter(lora_config, adapters, params, source=str(weights_file))
    return lora_config, {m: {f: asarray(a) for f, a in pair.items()} for m, pair in adapters.items()}


def _check_key(key: str, weights_file: Path) -> None:
    """A saved key must be ``base_model.model.<module>.lora_A.weight`` or ``...lora_B.weight``."""
    if not key.startswith(KEY_PREFIX):
        raise AdapterFormatError(
            f"{weights_file}: key {key!r} does not start with {KEY_PREFIX!r}; PEFT's PeftModel.from_pretrained "
            "would not load it (files written by transformers' add_adapter lack the prefix)")
    rest = key[len(KEY_PREFIX):]
    if _FACTOR.match(rest):
        return
    features = (("lora_embedding_", "an embedding adapter (lora_embedding_A/B)"),
                ("lora_magnitude_vector", "DoRA's magnitude vector (use_dora)"),
                ("modules_to_save", "a whole module saved with the adapter (modules_to_save)"),
                ("trainable_tokens", "trainable-token deltas (trainable_token_indices)"))
    for marker, feature in features:
        if marker in rest:
            raise NotImplementedError(f"{weights_file}: key {key!r} is {feature}, which lora-ref does not implement")
    named = re.fullmatch(r"(?P<module>.+)\.lora_(?P<factor>[AB])\.(?P<adapter>[^.]+)\.weight", rest)
    if named:
        raise AdapterFormatError(
            f"{weights_file}: key {key!r} carries the adapter name {named['adapter']!r} (lora_{named['factor']}."
            f"{named['adapter']}.weight): the weights were saved from the model's state_dict, not with PEFT's "
            f"save_pretrained, which strips the name; rename the keys to "
            f"'{KEY_PREFIX}{named['module']}.lora_{named['factor']}.weight'")
    if re.search(r"\.lora_[AB]\.bias$", rest):
        raise NotImplementedError(f"{weights_file}: key {key!r} is a bias on a LoRA factor (lora_bias), which lora-ref does not implement")
    if ".lora_" in rest:
        raise NotImplementedError(f"{weights_file}: key {key!r} belongs to a LoRA variant lora-ref does not implement")
    raise NotImplementedError(
        f"{weights_file}: key {key!r} is a base-model weight saved with the adapter (bias='all', resized "
        "embeddings, ...); lora-ref reads LoRA factors only")


def save_peft_adapter(path: str | os.PathLike, lora_config: LoraConfig, adapters: Mapping[str, Mapping[str, Any]],
                      base_model_name_or_path: str | None = None) -> Path:
    """Write ``adapters`` as a PEFT adapter directory that ``peft.PeftModel.from_pretrained`` loads.

    ``adapters`` is ``{module: {"A": (r, d_in), "B": (d_out, r)}}`` (any backend; written as
    NumPy, float32 or float64, keys ``base_model.model.<module>.lora_A.weight``), checked against
    ``lora_config`` first (targets, ranks, one dtype, finite values). The directory ``path``
    is replaced atomically (:func:`lora_ref.files.write_directory_atomically`): other files already in it are
    kept. Returns ``path`` as a ``Path``.

    Raises ``ValueError`` for a config PEFT cannot express (``enable_lora``, no target_modules)
    and :class:`AdapterFormatError` for adapters that do not match the config.
    """
    config = config_to_peft_dict(lora_config, base_model_name_or_path)
    _check_structure(lora_config, adapters, None)
    if not adapters:
        raise ValueError("adapters is empty: there is nothing to save")
    tensors = {}
    for module, pair in adapters.items():
        for factor in ("A", "B"):
            arr = np.ascontiguousarray(to_numpy(pair[factor]))
            if arr.dtype not in (np.float32, np.float64):
                raise TypeError(f"adapters[{module!r}][{factor!r}] is {arr.dtype.name}; save float32 or float64")
            tensors[f"{KEY_PREFIX}{module}.lora_{factor}.weight"] = arr
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"

    def write(folder: Path) -> None:
        (folder / CONFIG_NAME).write_text(text, encoding="utf-8")
        safetensors.numpy.save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})

    return write_directory_atomically(path, write)
