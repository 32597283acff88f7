"""``lora-ref check ADAPTER_DIR --base MODEL_DIR``: validate a PEFT adapter against a base checkpoint.

Loads both (:func:`lora_ref.peft_io.load_peft_adapter`, :func:`transformer_ref.load_checkpoint`,
which reads GPT-2 and LLaMA-family checkpoints after ``config.json``'s ``model_type``), checks
every module's shapes against the base model and the config, and prints, per adapted module, its
rank, alpha, scale s and the size of the change merging it would make, ``|s B A|_F / |W|_F``
(computed from the r x r Gram matrices, ``|B A|_F^2 = sum((B^T B) * (A A^T))``, without forming
B A). Then anything suspicious: a factor that is all zero (the adapter changes nothing), a rank
above ``min(d_out, d_in)``, a change larger than the weight itself, rsLoRA (some inference engines
ignore ``use_rslora`` and would scale by alpha/r), a ``fan_in_fan_out`` that does not describe the
base's layout.

Exit status: 0 when the adapter is valid for the base model (warnings allowed), 1 when it is not
(the message says why on standard error) or a file cannot be read (one line naming the path and
the reason).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ..backend import to_numpy

HELP = "validate a PEFT LoRA adapter against a GPT-2 or LLaMA checkpoint and report its scales and weight changes"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter_dir", metavar="ADAPTER_DIR", type=Path,
                        help="PEFT adapter directory (adapter_config.json + adapter_model.safetensors)")
    parser.add_argument("--base", metavar="MODEL_DIR", type=Path, required=True,
                        help="Hugging Face checkpoint directory (config.json + model.safetensors) of a GPT-2 or "
                             "LLaMA-family (llama, mistral, qwen2) model")


def run(args: argparse.Namespace) -> int:
    # The base model is read by transformer_ref (floor 2): imported when the command runs.
    from transformer_ref import load_checkpoint

    from ..files import FileFormatError, read_tensors
    from ..peft_io import WEIGHTS_NAME, AdapterFormatError, load_peft_adapter

    try:
        config, params = load_checkpoint(args.base, dtype="float64")
    except (FileFormatError, NotImplementedError) as exc:
        return _fail(f"base model: {exc}")
    except OSError as exc:
        return _os_error("base model", args.base, exc)
    try:
        lora_config, adapters = load_peft_adapter(args.adapter_dir, params, dtype="float64")
        tensors = read_tensors(args.adapter_dir / WEIGHTS_NAME, error=AdapterFormatError)
    except (FileFormatError, NotImplementedError) as exc:
        return _fail(f"adapter: {exc}")
    except OSError as exc:
        return _os_error("adapter", args.adapter_dir, exc)
    stored = sorted({t.code for t in tensors.values()})          # safetensors dtype codes: F32, BF16, ...

    _print_header(args, config, lora_config, adapters, stored)
    warnings = _print_modules(params, lora_config, adapters)
    warnings += _config_warnings(config, lora_config, adapters)
    if warnings:
        print(f"\nwarnings ({len(warnings)}):")
        for w in warnings:
            print(f"  - {w}")
    print(f"\nOK: the adapter is valid for this base model ({len(warnings)} warning{'s' if len(warnings) != 1 else ''})")
    return 0


def _fail(message: str) -> int:
    print(f"lora-ref check: error: {message}", file=sys.stderr)
    print("INVALID: the adapter cannot be used with this base model", file=sys.stderr)
    return 1


def _os_error(what: str, given: Path, exc: OSError) -> int:
    """One line on stderr: which file could not be read, and why (exit 1)."""
    if exc.strerror is None:                     # a message of our own (a missing directory)
        print(f"lora-ref check: {what}: {exc}", file=sys.stderr)
    else:
        path = exc.filename if exc.filename is not None else given
        print(f"lora-ref check: cannot read the {what}: {str(path)!r}: {exc.strerror}", file=sys.stderr)
    return 1


def _is_gpt2(config: Any) -> bool:
    return hasattr(config, "n_embd")


def _print_header(args: argparse.Namespace, config: Any, lc: Any, adapters: dict, stored: list[str]) -> None:
    """The adapter's settings, the base model's sizes, and the verdict on shapes."""
    targets = lc.target_modules if isinstance(lc.target_modules, str) else list(lc.target_modules)
    print(f"adapter   {args.adapter_dir}")
    print(f"          r={lc.r} lora_alpha={lc.alpha:g} use_rslora={lc.use_rslora} "
          f"fan_in_fan_out={lc.fan_in_fan_out} dropout={lc.dropout:g} stored as {', '.join(stored)}")
    print(f"          target_modules={targets!r}")
    for name in ("rank_pattern", "alpha_pattern", "layers_to_transform", "layers_pattern"):
        value = getattr(lc, name)
        if value:
            print(f"          {name}={dict(value) if hasattr(value, 'items') else list(value)!r}")
    print(f"base      {args.base}")
    if _is_gpt2(config):
        print(f"          GPT-2: {config.n_layer} layers, n_embd {config.n_embd}, n_head {config.n_head}, "
              f"vocab {config.vocab_size}, n_positions {config.n_positions}")
    else:
        kv = config.num_key_value_heads or config.num_attention_heads
        print(f"          {config.model_type}: {config.num_hidden_layers} layers, hidden_size {config.hidden_size}, "
              f"heads {config.num_attention_heads} (key/value {kv}), intermediate_size {config.intermediate_size}, "
              f"vocab {config.vocab_size}")
    print(f"valid     {len(adapters)} adapted modules; every shape fits the base model\n")


def _print_modules(params: dict, lc: Any, adapters: dict) -> list[str]:
    """One row per adapted module (shape, r, alpha, s, |s B A|_F / |W|_F); returns its warnings."""
    width = max(len(m) for m in adapters)
    print(f"{'module':<{width}}  {'d_out x d_in':>12}  {'r':>3}  {'alpha':>7}  {'scale':>9}  {'|sBA|/|W|':>10}")
    warnings = []
    for module, pair in adapters.items():
        A, B = to_numpy(pair["A"]), to_numpy(pair["B"])          # (r, d_in), (d_out, r), float64
        W = to_numpy(params[module + ".weight"])                 # (d_out, d_in)
        r, alpha, s = lc.rank_for(module), lc.alpha_for(module), lc.scale_for(module)
        gram = float(np.sum((B.T @ B) * (A @ A.T)))              # |B A|_F^2 from two (r, r) matrices
        change = abs(s) * math.sqrt(max(gram, 0.0)) / float(np.linalg.norm(W))
        d_out, d_in = W.shape
        print(f"{module:<{width}}  {f'{d_out} x {d_in}':>12}  {r:>3}  {alpha:>7g}  {s:>9.4g}  {change:>10.3e}")
        for factor, arr in (("B", B), ("A", A)):
            if not np.any(arr):
                warnings.append(f"{module}: {factor} is all zero, so this adapter changes nothing "
                                "(untrained, or saved at initialisation)")
        if r > min(d_out, d_in):
            warnings.append(f"{module}: rank {r} exceeds min(d_out, d_in) = {min(d_out, d_in)}; B A has rank at most "
                            f"{min(d_out, d_in)}, the other {r - min(d_out, d_in)} dimensions are wasted")
        if change > 1.0:
            warnings.append(f"{module}: merging would change W by {change:.3g} times its own norm")
    return warnings


def _config_warnings(config: Any, lc: Any, adapters: dict) -> list[str]:
    """Settings that other implementations read differently: rsLoRA's scale, fan_in_fan_out."""
    warnings = []
    if lc.use_rslora:
        pairs = sorted({(lc.rank_for(m), lc.alpha_for(m)) for m in adapters})
        detail = "; ".join(f"r={r}: alpha/sqrt(r) = {a / math.sqrt(r):.4g} vs alpha/r = {a / r:.4g}" for r, a in pairs)
        warnings.append(f"use_rslora is set: PEFT scales by alpha/sqrt(r), but some inference engines ignore "
                        f"use_rslora and would scale by alpha/r ({detail})")
    if _is_gpt2(config) and not lc.fan_in_fan_out:
        warnings.append("fan_in_fan_out is false, but GPT-2's projections are Conv1D (stored (d_in, d_out)); PEFT "
                        "sets it to true when it loads this adapter (harmless here, wrong for a merge that trusts it)")
    if not _is_gpt2(config) and lc.fan_in_fan_out:
        warnings.append(f"fan_in_fan_out is true, but {config.model_type}'s projections are nn.Linear (stored "
                        "(d_out, d_in)); PEFT sets it to false when it loads this adapter (harmless here, wrong for "
                        "a merge that trusts it)")
    return warnings
