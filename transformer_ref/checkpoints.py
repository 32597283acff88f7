"""Hugging Face GPT-2 checkpoints, read and written without PyTorch.

A checkpoint is what ``GPT2LMHeadModel.save_pretrained`` writes:

    config.json          GPT2Config (-> :class:`transformer_ref.GPTConfig`, key for key)
    model.safetensors    the state dict; Conv1D projection weights stored (d_in, d_out)

:func:`load_hf_gpt2` returns ``(config, params)`` with params keyed by state-dict names and every
projection weight (``attn.c_attn``, ``attn.c_proj``, ``mlp.c_fc``, ``mlp.c_proj``) transposed once
to lora-ref's ``(d_out, d_in)``; :func:`save_hf_gpt2` transposes them back. Shapes: C = n_embd,
F = MLP width, V = vocab_size, P = n_positions.

What is checked on load (each failure names the file and key): every parameter present with its
shape, nothing unexpected, one float dtype, finite values; ``lm_head.weight``, if stored, equal to
``transformer.wte.weight`` (GPT-2 ties them); causal-mask buffers ``attn.bias``, if stored, lower
triangular; ``attn.masked_bias`` (an unused constant of old checkpoints) skipped. Settings the model
does not implement raise ``NotImplementedError`` naming the field. Checkpoints saved from
``GPT2Model`` (keys without ``transformer.``, as on the Hub's ``gpt2``) are accepted.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy

from lora_ref.backend import asarray, dtype_name, to_numpy
from lora_ref.files import FileFormatError, read_json, read_tensors, write_directory_atomically

from .gpt2 import PROJECTIONS, GPTConfig, param_shapes

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "CheckpointFormatError", "load_hf_gpt2", "save_hf_gpt2"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
_CONV1D = tuple(f"{p}.weight" for p in PROJECTIONS)          # stored (d_in, d_out) by Hugging Face's Conv1D
_PREFIX = "transformer."

# config.json settings the model does not implement: field -> (the value it must have, why).
_UNSUPPORTED = {
    "activation_function": ("gelu_new", "GPT-2's tanh-approximated GELU is the only activation implemented"),
    "add_cross_attention": (False, "cross-attention (an encoder-decoder setting) is not implemented"),
    "tie_word_embeddings": (True, "an output projection separate from wte is not implemented"),
}


class CheckpointFormatError(FileFormatError):
    """A GPT-2 checkpoint directory is damaged or inconsistent (the message names the file and key)."""


def _is_conv1d(name: str) -> bool:
    return name.endswith(_CONV1D)


def load_hf_gpt2(path: str | os.PathLike, *, dtype: Any = None) -> tuple[GPTConfig, dict[str, Any]]:
    """Read a Hugging Face GPT-2 ``save_pretrained`` directory; return ``(config, params)``.

    Parameters
    ----------
    path : directory holding ``config.json`` and ``model.safetensors``
    dtype : "float32" or "float64", optional
        Convert the parameters to this dtype. Without it they keep the file's dtype, which must be
        float32 or float64; float16 and bfloat16 checkpoints need it (widening them is exact).

    Returns
    -------
    config : GPTConfig
    params : dict, state-dict name -> array on the current backend, in ``param_shapes(config)``
        order; projection weights (d_out, d_in) (transposed from Conv1D's (d_in, d_out)); no
        ``lm_head.weight`` (it is ``transformer.wte.weight``).

    Raises :class:`CheckpointFormatError` (a ``ValueError``) for damaged or inconsistent files,
    ``NotImplementedError`` naming a config field the model does not implement, and
    ``FileNotFoundError`` when ``path`` is not a directory.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"GPT-2 checkpoint directory {str(folder)!r} does not exist (or is not a directory)")
    target = None
    if dtype is not None:
        target = dtype if isinstance(dtype, str) else dtype_name(dtype)
        if target not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    config_file, weights_file = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not config_file.is_file():
        raise CheckpointFormatError(f"{folder}: {CONFIG_NAME} is missing")
    if not weights_file.is_file():
        for other, why in (("model.safetensors.index.json", "sharded checkpoints are not read"),
                           ("pytorch_model.bin", "PyTorch pickles are not read (re-save with safe_serialization=True)")):
            if (folder / other).is_file():
                raise NotImplementedError(f"{folder}: only {other} is present; {why}")
        raise CheckpointFormatError(f"{folder}: {WEIGHTS_NAME} is missing")
    config = _read_config(config_file)
    read = read_tensors(weights_file, error=CheckpointFormatError)
    tensors = {k: t.array for k, t in read.items()}                    # name -> array, file order
    stored = {k: t.code for k, t in read.items()}                      # name -> safetensors dtype code
    where = str(weights_file)

    # Keys: GPT2LMHeadModel saves "transformer.*" (+ maybe lm_head.weight); GPT2Model saves them bare.
    if not any(k.startswith(_PREFIX) for k in tensors):
        tensors = {(k if k == "lm_head.weight" else _PREFIX + k): v for k, v in tensors.items()}
        stored = {(k if k == "lm_head.weight" else _PREFIX + k): v for k, v in stored.items()}
    shapes = param_shapes(config)
    masks = {f"transformer.h.{i}.attn.bias" for i in range(config.n_layer)}
    buffers = (masks | {f"transformer.h.{i}.attn.masked_bias" for i in range(config.n_layer)}) & set(tensors)
    for key in sorted(buffers & masks):
        _check_causal_mask(key, tensors[key], config, where)
    lm_head = tensors.get("lm_head.weight")
    unexpected = sorted(set(tensors) - set(shapes) - buffers - {"lm_head.weight"})
    if unexpected:
        raise CheckpointFormatError(f"{where}: unexpected key(s) {unexpected[:5]}: not part of a GPT-2 LM of this config")
    missing = [k for k in shapes if k not in tensors]
    if missing:
        raise CheckpointFormatError(f"{where}: missing {len(missing)} parameter(s) of this config, e.g. {missing[:3]}")

    codes = {stored[k] for k in shapes}
    if target is None and codes & {"F16", "BF16"}:
        raise CheckpointFormatError(f"{where}: the weights are stored as {sorted(codes & {'F16', 'BF16'})[0]}; pass "
                                    "dtype='float32' or 'float64' to widen them (exactly)")
    params: dict[str, Any] = {}
    for name, shape in shapes.items():
        arr = tensors[name]
        hf_shape = shape[::-1] if _is_conv1d(name) else shape
        if tuple(arr.shape) != hf_shape:
            raise CheckpointFormatError(f"{where}: key {name!r} has shape {tuple(arr.shape)}, expected {hf_shape} "
                                        f"for this config{' (Conv1D: (d_in, d_out))' if _is_conv1d(name) else ''}")
        if arr.dtype not in (np.float16, np.float32, np.float64):
            raise CheckpointFormatError(f"{where}: key {name!r} has dtype {stored[name]}, not a floating dtype")
        if target is not None:
            arr = arr.astype(target)
        bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        if bad:
            raise CheckpointFormatError(f"{where}: key {name!r} has {bad} non-finite value(s) (inf or nan)")
        params[name] = np.ascontiguousarray(arr.T) if _is_conv1d(name) else arr   # Conv1D (d_in, d_out) -> (d_out, d_in)
    kinds = sorted({p.dtype.name for p in params.values()})
    if len(kinds) > 1:
        raise CheckpointFormatError(f"{where}: mixed dtypes {kinds}; pass dtype='float32' or 'float64' to convert")
    if lm_head is not None:
        wte = tensors["transformer.wte.weight"]
        if lm_head.shape != wte.shape or stored["lm_head.weight"] != stored["transformer.wte.weight"] \
                or not np.array_equal(lm_head, wte):
            raise NotImplementedError(f"{where}: lm_head.weight differs from transformer.wte.weight; an output "
                                      "projection not tied to the token embedding is not implemented")
    return config, {name: asarray(arr) for name, arr in params.items()}


def _read_config(config_file: Path) -> GPTConfig:
    raw = read_json(config_file, error=CheckpointFormatError)
    if not isinstance(raw, dict):
        raise CheckpointFormatError(f"{config_file}: must be a JSON object, got {type(raw).__name__}")
    model_type = raw.get("model_type", "gpt2")
    if model_type != "gpt2":
        raise NotImplementedError(f"{config_file}: model_type={model_type!r}; only GPT-2 ('gpt2') checkpoints are read")
    for field, (value, why) in _UNSUPPORTED.items():
        if field in raw and not (type(raw[field]) is type(value) and raw[field] == value):
            raise NotImplementedError(f"{config_file}: {field}={raw[field]!r} is not implemented ({why})")
    try:
        return GPTConfig.from_dict(raw)
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

    ``params`` are in lora-ref's layout (projection weights (d_out, d_in), no ``lm_head``), any
    backend, all float32 or all float64; they are written with projection weights transposed to
    Conv1D's (d_in, d_out), keys ``transformer.*``, ``lm_head`` left to the tying.
    ``config.json`` is ``config.to_dict()`` with ``architectures: ["GPT2LMHeadModel"]`` added
    unless present and ``dtype`` set to the parameters' dtype. The directory is replaced atomically
    (:func:`lora_ref.files.write_directory_atomically`). Returns ``path`` as a ``Path``.
    """
    if not isinstance(config, GPTConfig):
        raise TypeError(f"config must be a transformer_ref.GPTConfig, got {type(config).__name__}")
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a mapping of parameter name to array, got {type(params).__name__}")
    shapes = param_shapes(config)
    missing = [k for k in shapes if k not in params]
    extra = sorted(k for k in params if k not in shapes)
    if missing or extra:
        raise ValueError(f"params must have exactly this config's parameters: missing {missing[:3]}, unexpected {extra[:3]}")
    tensors = {}
    for name, shape in shapes.items():
        arr = to_numpy(params[name])
        if tuple(arr.shape) != shape:
            raise ValueError(f"params[{name!r}] has shape {tuple(arr.shape)}, expected {shape} (lora-ref layout, (d_out, d_in))")
        if arr.dtype not in (np.float32, np.float64):
            raise TypeError(f"params[{name!r}] is {arr.dtype.name}; save float32 or float64")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"params[{name!r}] has non-finite values")
        tensors[name] = np.ascontiguousarray(arr.T if _is_conv1d(name) else arr)   # (d_out, d_in) -> Conv1D (d_in, d_out)
    kinds = sorted({a.dtype.name for a in tensors.values()})
    if len(kinds) > 1:
        raise TypeError(f"params mix dtypes {kinds}; use one")
    config_dict = config.to_dict()
    config_dict.setdefault("architectures", ["GPT2LMHeadModel"])
    config_dict["dtype"] = kinds[0]                     # what the file holds (transformers reads it)
    if "torch_dtype" in config_dict:
        config_dict["torch_dtype"] = kinds[0]
    text = json.dumps(config_dict, indent=2, sort_keys=True) + "\n"

    def write(folder: Path) -> None:
        (folder / CONFIG_NAME).write_text(text, encoding="utf-8")
        safetensors.numpy.save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})

    return write_directory_atomically(path, write)
