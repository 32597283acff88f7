"""Hugging Face checkpoints, read and written without PyTorch: GPT-2 and the LLaMA family.

A checkpoint is what ``save_pretrained`` writes:

    config.json                      the model's config (-> GPTConfig or LlamaConfig, key for key)
    model.safetensors                the state dict; or, sharded,
    model.safetensors.index.json     {"weight_map": {name: shard file}} and the shard files

:func:`load_checkpoint` reads either family, chosen by ``config.json``'s ``model_type``
(``gpt2``; ``llama``, ``mistral``, ``qwen2``). :func:`load_hf_gpt2` returns ``(config, params)``
with every Conv1D projection weight (``attn.c_attn``, ``attn.c_proj``, ``mlp.c_fc``,
``mlp.c_proj``) transposed once to lora-ref's ``(d_out, d_in)``; :func:`save_hf_gpt2` transposes
them back. LLaMA's nn.Linear weights are already (d_out, d_in): :func:`load_hf_llama` and
:func:`save_hf_llama` move them as they are.

What is checked on load (each failure names the file and key), in this order: the sizes that
config.json declares against the tensors present -- the number of blocks, the embedding's
vocabulary and width, and (LLaMA) the MLP width and the heads' widths -- before any per-layer
work, so that a config field cannot make the loader build what the file does not hold; then
every parameter present with its shape, nothing unexpected, one float dtype, finite values; a
stored ``lm_head.weight`` of a tied model equal to the embedding; GPT-2's causal-mask buffers
``attn.bias`` lower triangular (``attn.masked_bias`` skipped); old LLaMA checkpoints'
``rotary_emb.inv_freq`` buffers equal to the default RoPE's. Settings the models do not implement
raise ``NotImplementedError`` naming the field. Checkpoints saved from ``GPT2Model`` /
``LlamaModel`` (keys without ``transformer.`` / ``model.``) are accepted.

bitsandbytes 4-bit checkpoints (transformers' ``load_in_4bit``; config.json's
``quantization_config``) are read too: each quantised weight's tensors (``weight`` packed uint8,
``weight.absmax``, ``weight.quant_map``, ``weight.nested_absmax``, ``weight.nested_quant_map``,
``weight.quant_state.bitsandbytes__nf4``) become one ``lora_ref.quant.QuantState`` in params,
computed in ``bnb_4bit_compute_dtype`` (:func:`_read_4bit`), before the declared sizes are checked
(a state's shape is its JSON blob's, checked against its packed bytes). GPT-2's Conv1D weights
are stored (d_out, d_in) once quantised (transformers transposes them first): not transposed.
``dtype=`` converts the float parameters only. Saving 4-bit params is not implemented.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy

from lora_ref.backend import asarray, to_numpy
from lora_ref.files import FileFormatError, load_dtype, read_json, read_tensors, write_directory_atomically

from .gpt2 import PROJECTIONS, GPTConfig
from .hosting import is_4bit
from .gpt2 import param_shapes as gpt2_shapes
from .llama import MODEL_TYPES, LlamaConfig
from .llama import param_shapes as llama_shapes

__all__ = ["CONFIG_NAME", "INDEX_NAME", "WEIGHTS_NAME", "CheckpointFormatError", "load_checkpoint", "load_hf_gpt2",
           "load_hf_llama", "save_hf_gpt2", "save_hf_llama"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_CONV1D = tuple(f"{p}.weight" for p in PROJECTIONS)          # stored (d_in, d_out) by Hugging Face's Conv1D

# GPT-2 config.json settings the model does not implement: field -> (the value it must have, why).
_UNSUPPORTED = {
    "activation_function": ("gelu_new", "GPT-2's tanh-approximated GELU is the only activation implemented"),
    "add_cross_attention": (False, "cross-attention (an encoder-decoder setting) is not implemented"),
}
_4BIT_BLOB = re.compile(r"(.+\.weight)\.quant_state\.bitsandbytes__(?:nf4|fp4)")   # bitsandbytes' JSON blob key
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


class CheckpointFormatError(FileFormatError):
    """A checkpoint directory is damaged or inconsistent (the message names the file and key)."""


# ============================================================================================
# Either family
# ============================================================================================


def load_checkpoint(path: str | os.PathLike, *, dtype: Any = None) -> tuple[Any, dict[str, Any]]:
    """Read a Hugging Face checkpoint directory of any implemented family; return ``(config, params)``.

    The family comes from ``config.json``'s ``model_type``: ``"gpt2"`` -> :func:`load_hf_gpt2`,
    ``"llama"``, ``"mistral"``, ``"qwen2"`` -> :func:`load_hf_llama`. Another ``model_type`` (or
    none) raises ``NotImplementedError`` naming it; ``dtype`` as in the two loaders.
    """
    folder = _folder(path)
    raw = _read_config_json(folder)
    model_type = raw.get("model_type")
    if model_type == "gpt2":
        return load_hf_gpt2(folder, dtype=dtype)
    if model_type in MODEL_TYPES:
        return load_hf_llama(folder, dtype=dtype)
    raise NotImplementedError(f"{folder / CONFIG_NAME}: model_type={model_type!r} is not implemented; transformer_ref "
                              f"reads gpt2, {', '.join(MODEL_TYPES)} checkpoints")


def _folder(path: str | os.PathLike) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a path (str or os.PathLike), got {type(path).__name__}")
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(folder)!r} does not exist (or is not a directory)")
    return folder


def _read_config_json(folder: Path) -> dict[str, Any]:
    config_file = folder / CONFIG_NAME
    if not config_file.is_file():
        raise CheckpointFormatError(f"{folder}: {CONFIG_NAME} is missing")
    raw = read_json(config_file, error=CheckpointFormatError)
    if not isinstance(raw, dict):
        raise CheckpointFormatError(f"{config_file}: must be a JSON object, got {type(raw).__name__}")
    return raw


def _read_weights(folder: Path) -> tuple[dict[str, np.ndarray], dict[str, str], str]:
    """``({name: array}, {name: safetensors dtype code}, where)`` from model.safetensors, or from
    the shards an index lists (every listed tensor in its shard, every shard's tensor listed)."""
    single, index = folder / WEIGHTS_NAME, folder / INDEX_NAME
    if single.is_file():
        read = read_tensors(single, error=CheckpointFormatError)
        return {k: t.array for k, t in read.items()}, {k: t.code for k, t in read.items()}, str(single)
    if not index.is_file():
        for other, why in (("pytorch_model.bin", "PyTorch pickles are not read (re-save with safe_serialization=True)"),
                           ("pytorch_model.bin.index.json", "PyTorch pickles are not read")):
            if (folder / other).is_file():
                raise NotImplementedError(f"{folder}: only {other} is present; {why}")
        raise CheckpointFormatError(f"{folder}: {WEIGHTS_NAME} (or {INDEX_NAME} and its shards) is missing")
    raw = read_json(index, error=CheckpointFormatError)
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CheckpointFormatError(f"{index}: must hold a non-empty \"weight_map\" of tensor name -> shard file name")
    arrays: dict[str, np.ndarray] = {}
    codes: dict[str, str] = {}
    for shard in sorted(set(weight_map.values())):
        if Path(shard).name != shard or shard in (".", ".."):
            raise CheckpointFormatError(f"{index}: shard {shard!r} must be a file name in the checkpoint directory")
        if not (folder / shard).is_file():
            raise CheckpointFormatError(f"{index}: shard {shard!r} is missing from {folder}")
        read = read_tensors(folder / shard, error=CheckpointFormatError)
        for name, t in read.items():
            if weight_map.get(name) != shard:
                raise CheckpointFormatError(f"{folder / shard}: key {name!r} is not listed for this shard in {INDEX_NAME}"
                                            f" (listed: {weight_map.get(name)!r})")
            arrays[name], codes[name] = t.array, t.code
    missing = sorted(k for k in weight_map if k not in arrays)
    if missing:
        raise CheckpointFormatError(f"{index}: lists {len(missing)} tensor(s) its shards do not hold, e.g. {missing[:3]}")
    return arrays, codes, f"{folder} (sharded, {INDEX_NAME})"


def _blocks(names: Any, pattern: str) -> list[int]:
    """The sorted block indices i of the names matching ``pattern`` (a regex with one (\\d+) group)."""
    found = re.compile(pattern)
    return sorted({int(m.group(1)) for m in map(found.match, names) if m})


def _check_declared(where: str, declared: list[tuple[str, Any, Any, str]]) -> None:
    """Each ``(config field, declared value, value the tensors give, how)`` must agree: checked
    before any per-layer work, so a size in config.json cannot make the loader build what the
    file does not hold (issue 11, item 6)."""
    for field_name, value, observed, how in declared:
        if observed is not None and value != observed:
            raise CheckpointFormatError(f"{where}: config.json says {field_name}={value!r} but the tensors give "
                                        f"{observed!r} ({how})")


def _check_layers(where: str, field_name: str, value: int, blocks: list[int], prefix: str) -> None:
    if blocks != list(range(len(blocks))) or value != len(blocks):
        held = f"blocks {blocks[:8]}{' ...' if len(blocks) > 8 else ''}" if blocks else "no blocks"
        raise CheckpointFormatError(f"{where}: config.json says {field_name}={value!r} but the file holds {held} "
                                    f"({prefix}.0 .. {prefix}.{value - 1 if isinstance(value, int) else '?'} expected)")


def _finish(where: str, tensors: Mapping[str, np.ndarray], stored: Mapping[str, str], shapes: Mapping[str, tuple],
            target: str | None, transposed: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """Every parameter of ``shapes`` from ``tensors``: shape (transposed for ``transposed`` names,
    stored (d_in, d_out)), a float dtype (F16/BF16 only with ``target``), finite; one dtype."""
    missing = [k for k in shapes if k not in tensors]
    if missing:
        raise CheckpointFormatError(f"{where}: missing {len(missing)} parameter(s) of this config, e.g. {missing[:3]}")
    codes = {stored[k] for k in shapes if not is_4bit(tensors[k])}
    if target is None and codes & {"F16", "BF16"}:
        raise CheckpointFormatError(f"{where}: the weights are stored as {sorted(codes & {'F16', 'BF16'})[0]}; pass "
                                    "dtype='float32' or 'float64' to widen them (exactly)")
    params: dict[str, Any] = {}
    for name, shape in shapes.items():
        arr, flip = tensors[name], name.endswith(transposed) if transposed else False
        if is_4bit(arr):                    # 4-bit: (d_out, d_in) even for Conv1D (transformers transposes first)
            if arr.shape != shape:
                raise CheckpointFormatError(f"{where}: 4-bit key {name!r} has shape {arr.shape}, expected {shape}")
            params[name] = arr
            continue
        hf_shape = shape[::-1] if flip else shape
        if tuple(arr.shape) != hf_shape:
            raise CheckpointFormatError(f"{where}: key {name!r} has shape {tuple(arr.shape)}, expected {hf_shape} "
                                        f"for this config{' (Conv1D: (d_in, d_out))' if flip else ''}")
        if arr.dtype not in (np.float16, np.float32, np.float64):
            raise CheckpointFormatError(f"{where}: key {name!r} has dtype {stored[name]}, not a floating dtype")
        if target is not None:
            arr = arr.astype(target)
        bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        if bad:
            raise CheckpointFormatError(f"{where}: key {name!r} has {bad} non-finite value(s) (inf or nan)")
        params[name] = np.ascontiguousarray(arr.T) if flip else arr   # Conv1D (d_in, d_out) -> (d_out, d_in)
    kinds = sorted({p.dtype.name for p in params.values() if not is_4bit(p)})
    if len(kinds) > 1:
        raise CheckpointFormatError(f"{where}: mixed dtypes {kinds}; pass dtype='float32' or 'float64' to convert")
    return params


def _read_4bit(where: str, raw: Mapping[str, Any], tensors: dict[str, Any]) -> dict[str, Any]:
    """``tensors`` with each bitsandbytes 4-bit weight's tensors (``P.weight`` packed uint8,
    ``P.weight.absmax``, ``.quant_map``, ``.nested_absmax``, ``.nested_quant_map`` and the JSON blob
    ``P.weight.quant_state.bitsandbytes__<nf4|fp4>``) replaced by one ``lora_ref.quant.QuantState``
    under ``P.weight``, computed in config.json's ``quantization_config.bnb_4bit_compute_dtype``.
    The states are checked against their own blobs here (sizes, maps, double quantisation) and
    against config.json's quant type and double quantisation; no array is allocated beyond the
    file's. Other quantisation methods and 8-bit raise NotImplementedError."""
    blobs = {k: m.group(1) for k in tensors if (m := _4BIT_BLOB.fullmatch(k))}
    qc = raw.get("quantization_config")
    if qc is None:
        if blobs:
            raise CheckpointFormatError(f"{where}: holds bitsandbytes 4-bit weights ({sorted(blobs)[0]} ...) but "
                                        "config.json has no quantization_config")
        return tensors
    from lora_ref.precision import COMPUTE_DTYPES        # here: quant imports ml_dtypes (about a second)
    from lora_ref.quant import QUANT_TYPES, QuantState
    if not isinstance(qc, Mapping) or qc.get("quant_method") != "bitsandbytes" or qc.get("load_in_8bit") \
            or qc.get("load_in_4bit") is not True:
        what = qc.get("quant_method") if isinstance(qc, Mapping) else qc
        raise NotImplementedError(f"{where}: quantization_config (quant_method={what!r}) is not implemented; "
                                  "transformer_ref reads bitsandbytes 4-bit checkpoints (load_in_4bit)")
    compute = qc.get("bnb_4bit_compute_dtype") or "float32"         # transformers' default: float32
    settings = {"bnb_4bit_quant_storage": (qc.get("bnb_4bit_quant_storage", "uint8"), ("uint8",)),
                "bnb_4bit_compute_dtype": (compute, COMPUTE_DTYPES),
                "bnb_4bit_quant_type": (qc.get("bnb_4bit_quant_type", "fp4"), QUANT_TYPES)}
    for key, (value, allowed) in settings.items():
        if value not in allowed:
            raise NotImplementedError(f"{CONFIG_NAME} quantization_config.{key}={value!r} is not implemented "
                                      f"(implemented: {', '.join(allowed)})")
    if not blobs:
        raise CheckpointFormatError(f"{where}: config.json asks for 4-bit weights but the file holds none")
    double = bool(qc.get("bnb_4bit_use_double_quant", False))
    out = dict(tensors)
    for blob, prefix in blobs.items():
        parts = {k: out.pop(k) for k in [k for k in out if k.startswith(prefix + ".")]}
        if prefix not in out:
            raise CheckpointFormatError(f"{where}: {blob} has no packed weight {prefix!r}")
        parts = {"weight": out[prefix], **{k[len(prefix) + 1:]: v for k, v in parts.items()}}
        try:
            state = QuantState.from_bnb_tensors(parts, error=CheckpointFormatError, compute_dtype=compute)
        except CheckpointFormatError as exc:
            raise CheckpointFormatError(f"{where}: 4-bit weight {prefix!r}: {exc}") from exc
        if (state.quant_type, state.nested) != (settings["bnb_4bit_quant_type"][0], double):
            raise CheckpointFormatError(f"{where}: 4-bit weight {prefix!r} is {state.quant_type} with double "
                                        f"quantisation {state.nested}, but quantization_config says "
                                        f"{settings['bnb_4bit_quant_type'][0]}, {double}")
        out[prefix] = state
    return out


def _tied_copy(where: str, tensors: Mapping[str, np.ndarray], stored: Mapping[str, str], embedding: str,
               family: str) -> None:
    """A stored ``lm_head.weight`` of a tied model must be the embedding, bit for bit."""
    head, emb = tensors["lm_head.weight"], tensors[embedding]
    if head.shape != emb.shape or stored["lm_head.weight"] != stored[embedding] or not np.array_equal(head, emb):
        raise NotImplementedError(f"{where}: lm_head.weight differs from {embedding}, but config.json ties them: a "
                                  f"{family} output projection of its own needs tie_word_embeddings=false in config.json")


def _prepare_save(config: Any, params: Mapping[str, Any], shapes: Mapping[str, tuple],
                  transposed: tuple[str, ...]) -> dict[str, np.ndarray]:
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a mapping of parameter name to array, got {type(params).__name__}")
    missing = [k for k in shapes if k not in params]
    extra = sorted(k for k in params if k not in shapes)
    if missing or extra:
        raise ValueError(f"params must have exactly this config's parameters: missing {missing[:3]}, unexpected {extra[:3]}")
    tensors = {}
    for name, shape in shapes.items():
        if is_4bit(params[name]):
            raise NotImplementedError(f"params[{name!r}] is 4-bit: saving bitsandbytes checkpoints is not implemented "
                                      "(save lora_ref.quant.dequantize_4bit of it, or save with transformers)")
        arr = to_numpy(params[name])
        if tuple(arr.shape) != shape:
            raise ValueError(f"params[{name!r}] has shape {tuple(arr.shape)}, expected {shape} (lora-ref layout, (d_out, d_in))")
        if arr.dtype not in (np.float32, np.float64):
            raise TypeError(f"params[{name!r}] is {arr.dtype.name}; save float32 or float64")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"params[{name!r}] has non-finite values")
        flip = bool(transposed) and name.endswith(transposed)
        tensors[name] = np.ascontiguousarray(arr.T if flip else arr)   # (d_out, d_in) -> Conv1D (d_in, d_out)
    kinds = sorted({a.dtype.name for a in tensors.values()})
    if len(kinds) > 1:
        raise TypeError(f"params mix dtypes {kinds}; use one")
    return tensors


def _write(path: str | os.PathLike, config_dict: dict[str, Any], tensors: dict[str, np.ndarray],
           architecture: str) -> Path:
    config_dict.setdefault("architectures", [architecture])
    dtype = next(iter(tensors.values())).dtype.name
    config_dict["dtype"] = dtype                     # what the file holds (transformers reads it)
    if "torch_dtype" in config_dict:
        config_dict["torch_dtype"] = dtype
    text = json.dumps(config_dict, indent=2, sort_keys=True) + "\n"

    def write(folder: Path) -> None:
        (folder / CONFIG_NAME).write_text(text, encoding="utf-8")
        safetensors.numpy.save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})

    return write_directory_atomically(path, write)


# ============================================================================================
# GPT-2
# ============================================================================================


def load_hf_gpt2(path: str | os.PathLike, *, dtype: Any = None) -> tuple[GPTConfig, dict[str, Any]]:
    """Read a Hugging Face GPT-2 ``save_pretrained`` directory; return ``(config, params)``.

    Parameters
    ----------
    path : directory holding ``config.json`` and ``model.safetensors`` (or a sharded index)
    dtype : "float32" or "float64", optional
        Convert the parameters to this dtype. Without it they keep the file's dtype, which must be
        float32 or float64; float16 and bfloat16 checkpoints need it (widening them is exact).

    Returns
    -------
    config : GPTConfig
    params : dict, state-dict name -> array on the current backend, in ``param_shapes(config)``
        order; projection weights (d_out, d_in) (transposed from Conv1D's (d_in, d_out)); no
        ``lm_head.weight`` (it is ``transformer.wte.weight``) unless config.json has
        ``tie_word_embeddings: false``, which needs the checkpoint's own ``lm_head.weight`` (V, C).

    Raises :class:`CheckpointFormatError` (a ``ValueError``) for damaged or inconsistent files,
    ``NotImplementedError`` naming a config field the model does not implement, and
    ``FileNotFoundError`` when ``path`` is not a directory.
    """
    folder = _folder(path)
    target = load_dtype(dtype)
    config, raw = _read_gpt2_config(folder)
    tensors, stored, where = _read_weights(folder)

    # Keys: GPT2LMHeadModel saves "transformer.*" (+ maybe lm_head.weight); GPT2Model saves them bare.
    if not any(k.startswith("transformer.") for k in tensors):
        rename = {k: (k if k == "lm_head.weight" else "transformer." + k) for k in tensors}
        tensors = {rename[k]: v for k, v in tensors.items()}
        stored = {rename[k]: v for k, v in stored.items()}
    tensors = _read_4bit(where, raw, tensors)                            # 4-bit weights -> QuantStates
    wte, wpe = tensors.get("transformer.wte.weight"), tensors.get("transformer.wpe.weight")
    _check_layers(where, "n_layer", config.n_layer, _blocks(tensors, r"transformer\.h\.(\d+)\."), "transformer.h")
    _check_declared(where, [
        ("vocab_size", config.vocab_size, None if wte is None else wte.shape[0], "rows of transformer.wte.weight"),
        ("n_embd", config.n_embd, None if wte is None else wte.shape[-1], "columns of transformer.wte.weight"),
        ("n_positions", config.n_positions, None if wpe is None else wpe.shape[0], "rows of transformer.wpe.weight"),
    ])
    shapes = gpt2_shapes(config)
    masks = {f"transformer.h.{i}.attn.bias" for i in range(config.n_layer)}
    buffers = (masks | {f"transformer.h.{i}.attn.masked_bias" for i in range(config.n_layer)}) & set(tensors)
    for key in sorted(buffers & masks):
        _check_causal_mask(key, tensors[key], config, where)
    unexpected = sorted(set(tensors) - set(shapes) - buffers - {"lm_head.weight"})
    if unexpected:
        raise CheckpointFormatError(f"{where}: unexpected key(s) {unexpected[:5]}: not part of a GPT-2 LM of this config")
    if "lm_head.weight" in shapes and "lm_head.weight" not in tensors:
        raise CheckpointFormatError(f"{where}: lm_head.weight is missing and config.json has tie_word_embeddings="
                                    "false (a GPT2Model checkpoint holds no output head)")
    params = _finish(where, tensors, stored, shapes, target, _CONV1D)
    if config.tie_word_embeddings and "lm_head.weight" in tensors:
        _tied_copy(where, tensors, stored, "transformer.wte.weight", "GPT-2")
    return config, {name: arr if is_4bit(arr) else asarray(arr) for name, arr in params.items()}


def _read_gpt2_config(folder: Path) -> tuple[GPTConfig, dict[str, Any]]:
    """config.json read once -> (the GPTConfig, the parsed JSON: its quantization_config is _read_4bit's)."""
    config_file = folder / CONFIG_NAME
    raw = _read_config_json(folder)
    model_type = raw.get("model_type", "gpt2")
    if model_type != "gpt2":
        raise NotImplementedError(f"{config_file}: model_type={model_type!r}; load_hf_gpt2 reads GPT-2 ('gpt2') "
                                  "checkpoints (transformer_ref.load_checkpoint reads every implemented family)")
    for field_name, (value, why) in _UNSUPPORTED.items():
        if field_name in raw and not (type(raw[field_name]) is type(value) and raw[field_name] == value):
            raise NotImplementedError(f"{config_file}: {field_name}={raw[field_name]!r} is not implemented ({why})")
    try:
        return GPTConfig.from_dict({k: v for k, v in raw.items() if k != "quantization_config"}), raw
    except (TypeError, ValueError) as exc:
        raise CheckpointFormatError(f"{config_file}: invalid GPT-2 config: {exc}") from exc


def _check_causal_mask(key: str, arr: np.ndarray, config: GPTConfig, where: str) -> None:
    """Old checkpoints store each block's causal mask, (1, 1, P, P) lower-triangular ones."""
    P = config.n_positions
    if arr.ndim != 4 or arr.shape != (1, 1, P, P):
        raise CheckpointFormatError(f"{where}: buffer {key!r} has shape {arr.shape}, expected a (1, 1, {P}, {P}) causal mask")
    if not np.array_equal(arr[0, 0] != 0, np.tril(np.ones((P, P), dtype=bool))):
        raise NotImplementedError(f"{where}: buffer {key!r} is not a causal (lower-triangular) mask; "
                                  "attention patterns other than causal are not implemented")


def save_hf_gpt2(path: str | os.PathLike, config: GPTConfig, params: Mapping[str, Any]) -> Path:
    """Write ``(config, params)`` as a directory that ``GPT2LMHeadModel.from_pretrained`` loads.

    ``params`` are in lora-ref's layout (projection weights (d_out, d_in), no ``lm_head`` unless the
    config is untied), any backend, all float32 or all float64; they are written with projection
    weights transposed to Conv1D's (d_in, d_out), keys ``transformer.*``, ``lm_head`` left to the
    tying (an untied config's ``lm_head.weight`` (V, C) is written as it is, nn.Linear's layout).
    ``config.json`` is ``config.to_dict()`` with ``architectures: ["GPT2LMHeadModel"]`` added
    unless present and ``dtype`` set to the parameters' dtype. The directory is replaced atomically
    (:func:`lora_ref.files.write_directory_atomically`). Returns ``path`` as a ``Path``.
    """
    if not isinstance(config, GPTConfig):
        raise TypeError(f"config must be a transformer_ref.GPTConfig, got {type(config).__name__}")
    tensors = _prepare_save(config, params, gpt2_shapes(config), _CONV1D)
    return _write(path, config.to_dict(), tensors, "GPT2LMHeadModel")


# ============================================================================================
# LLaMA, Mistral, Qwen2
# ============================================================================================


def load_hf_llama(path: str | os.PathLike, *, dtype: Any = None) -> tuple[LlamaConfig, dict[str, Any]]:
    """Read a Hugging Face LLaMA, Mistral or Qwen2 ``save_pretrained`` directory; return ``(config, params)``.

    Parameters
    ----------
    path : directory holding ``config.json`` and ``model.safetensors``, or a sharded
        ``model.safetensors.index.json`` and its shards
    dtype : "float32" or "float64", optional
        As for :func:`load_hf_gpt2`: float16 and bfloat16 checkpoints need it (widening is exact).

    Returns
    -------
    config : LlamaConfig
    params : dict, state-dict name -> array on the current backend, in ``param_shapes(config)``
        order; nn.Linear weights (d_out, d_in) as stored; ``lm_head.weight`` unless tied.

    Raises :class:`CheckpointFormatError` for damaged or inconsistent files (a size in config.json
    that the tensors contradict among them, checked first), ``NotImplementedError`` naming a
    setting the model does not implement (rope scaling, sliding windows, another ``model_type``),
    ``FileNotFoundError`` when ``path`` is not a directory.
    """
    folder = _folder(path)
    target = load_dtype(dtype)
    config_file = folder / CONFIG_NAME
    raw = _read_config_json(folder)
    if raw.get("model_type") not in MODEL_TYPES:
        raise NotImplementedError(f"{config_file}: model_type={raw.get('model_type')!r}; load_hf_llama reads "
                                  f"{', '.join(MODEL_TYPES)} checkpoints")
    try:
        config = LlamaConfig.from_dict({k: v for k, v in raw.items() if k != "quantization_config"})
    except (TypeError, ValueError) as exc:
        raise CheckpointFormatError(f"{config_file}: invalid {raw['model_type']} config: {exc}") from exc
    tensors, stored, where = _read_weights(folder)

    # Keys: LlamaForCausalLM saves "model.*" (+ lm_head.weight unless tied); LlamaModel saves them bare.
    if not any(k.startswith("model.") for k in tensors):
        rename = {k: (k if k == "lm_head.weight" else "model." + k) for k in tensors}
        tensors = {rename[k]: v for k, v in tensors.items()}
        stored = {rename[k]: v for k, v in stored.items()}
    tensors = _read_4bit(where, raw, tensors)                            # 4-bit weights -> QuantStates
    rotary = {k for k in tensors if re.fullmatch(r"model\.(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq", k)}
    emb, q, k = (tensors.get(f"model.{n}.weight") for n in ("embed_tokens", "layers.0.self_attn.q_proj",
                                                          "layers.0.self_attn.k_proj"))
    gate = tensors.get("model.layers.0.mlp.gate_proj.weight")
    D = config.head_dim
    _check_layers(where, "num_hidden_layers", config.num_hidden_layers, _blocks(tensors, r"model\.layers\.(\d+)\."),
                  "model.layers")
    _check_declared(where, [
        ("vocab_size", config.vocab_size, None if emb is None else emb.shape[0], "rows of model.embed_tokens.weight"),
        ("hidden_size", config.hidden_size, None if emb is None else emb.shape[-1],
         "columns of model.embed_tokens.weight"),
        ("intermediate_size", config.intermediate_size, None if gate is None else gate.shape[0],
         "rows of model.layers.0.mlp.gate_proj.weight"),
        ("num_attention_heads * head_dim", config.num_attention_heads * D, None if q is None else q.shape[0],
         "rows of model.layers.0.self_attn.q_proj.weight"),
        ("num_key_value_heads * head_dim", config.num_key_value_heads * D, None if k is None else k.shape[0],
         "rows of model.layers.0.self_attn.k_proj.weight"),
    ])
    for key in sorted(rotary):
        _check_inv_freq(key, tensors[key], config, where)
    shapes = llama_shapes(config)
    tied_copy = config.tie_word_embeddings and "lm_head.weight" in tensors
    unexpected = sorted(set(tensors) - set(shapes) - rotary - ({"lm_head.weight"} if tied_copy else set()))
    if unexpected:
        raise CheckpointFormatError(f"{where}: unexpected key(s) {unexpected[:5]}: not part of a "
                                    f"{config.model_type} causal LM of this config")
    if "lm_head.weight" in shapes and "lm_head.weight" not in tensors:
        raise CheckpointFormatError(f"{where}: lm_head.weight is missing and config.json has tie_word_embeddings="
                                    "false (a LlamaModel checkpoint holds no output head)")
    params = _finish(where, tensors, stored, shapes, target)
    if tied_copy:
        _tied_copy(where, tensors, stored, "model.embed_tokens.weight", config.model_type)
    return config, {name: arr if is_4bit(arr) else asarray(arr) for name, arr in params.items()}


def _check_inv_freq(key: str, arr: np.ndarray, config: LlamaConfig, where: str) -> None:
    """Old LLaMA checkpoints store RoPE's inv_freq (D/2,) per layer, computed in float32 by
    transformers: it must be the default rope's ``theta^(-2i/D)`` within that computation's
    rounding (i/D, the power amplified by up to ln theta, the reciprocal: ceil(ln theta) + 3 in
    float32), or the checkpoint was made with another rope type."""
    D, theta = config.head_dim, config.rope_theta
    want = np.array([1.0 / theta ** (2 * i / D) for i in range(D // 2)])
    if arr.shape != want.shape or arr.dtype.kind != "f":
        raise CheckpointFormatError(f"{where}: buffer {key!r} has shape {arr.shape}, expected ({D // 2},) (head_dim / 2)")
    from lora_ref.testing import tolerance

    bound = tolerance("float32", math.ceil(math.log(theta)) + 3) * want
    if not np.all(np.abs(arr.astype(np.float64) - want) <= bound):
        raise NotImplementedError(f"{where}: buffer {key!r} is not the default RoPE's inverse frequencies for "
                                  f"rope_theta={theta:g}, head_dim={D}; other rope types are not implemented")


def save_hf_llama(path: str | os.PathLike, config: LlamaConfig, params: Mapping[str, Any]) -> Path:
    """Write ``(config, params)`` as a directory that ``LlamaForCausalLM.from_pretrained`` (or
    Mistral's, Qwen2's, after ``config.model_type``) loads.

    ``params`` are in lora-ref's layout (nn.Linear weights (d_out, d_in), as transformers stores
    them; ``lm_head.weight`` unless tied), any backend, all float32 or all float64. ``config.json``
    is ``config.to_dict()`` (transformers 5's spelling, ``rope_parameters``) with ``architectures``
    added unless present and ``dtype`` set to the parameters' dtype; ``model.safetensors`` holds
    every parameter under its name. The directory is replaced atomically. Returns ``path``.
    """
    if not isinstance(config, LlamaConfig):
        raise TypeError(f"config must be a transformer_ref.LlamaConfig, got {type(config).__name__}")
    tensors = _prepare_save(config, params, llama_shapes(config), ())
    return _write(path, config.to_dict(), tensors, _ARCHITECTURES[config.model_type])
