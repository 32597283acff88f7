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

Variants: a DoRA adapter's change is ``|W' - W|_F / |W|_F`` with ``W'`` the merged DoRA weight
(:func:`lora_ref.dora.dora_merge`), and a second table relates its magnitude ``m`` to the base's
row norms: ``m / ||W||_row`` (how much merging rescales each output row of the base) and
``m / ||W + s B A||_row`` (1 where ``m`` is still its initial value: DoRA then computes LoRA's
weight). An embedding adapter (``lora_embedding_A`` / ``_B``) is checked against its table
``(V, D)``, and a warning says when the table is tied to the output head (merging it would change
the head too: docs/embedding.md). A directory holding several adapters (PEFT's layout: the
default at the root, the others in sub-folders) gets one report per adapter.

Exit status: 0 when the adapter is valid for the base model (warnings allowed), 1 when it is not
(the message says why on standard error) or a file cannot be read (one line naming the path and
the reason). With several adapters: 0 when every one is valid.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ..backend import to_numpy
from ._common import error, read_error

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

    from ..files import FileFormatError
    from ..peft_io import list_peft_adapters

    try:
        config, params = load_checkpoint(args.base, dtype="float64")
    except (FileFormatError, NotImplementedError) as exc:
        return _fail(f"base model: {exc}")
    except OSError as exc:
        return _os_error("base model", args.base, exc)
    try:
        folders = list_peft_adapters(args.adapter_dir)
    except FileFormatError as exc:
        return _fail(f"adapter: {exc}")
    except OSError as exc:
        return _os_error("adapter", args.adapter_dir, exc)
    if folders == {"default": args.adapter_dir}:                 # one adapter, at the root
        return _check_one(args, args.adapter_dir, config, params)
    print(f"{args.adapter_dir}: {len(folders)} adapters ({', '.join(folders)}), one report each\n")
    failed = []
    for name, folder in folders.items():
        print(f"=== adapter {name!r}")
        if _check_one(args, folder, config, params):
            failed.append(name)
        print()
    if failed:
        print(f"INVALID: {len(failed)} of {len(folders)} adapters cannot be used with this base model: "
              f"{', '.join(failed)}", file=sys.stderr)
        return 1
    print(f"OK: all {len(folders)} adapters are valid for this base model")
    return 0


def _check_one(args: argparse.Namespace, folder: Path, config: Any, params: dict) -> int:
    """Load, validate and report one adapter directory; 0 when valid, 1 (message on stderr) if not."""
    from ..files import FileFormatError, read_tensors
    from ..peft_io import WEIGHTS_NAME, AdapterFormatError, load_peft_adapter

    try:
        lora_config, adapters = load_peft_adapter(folder, params, dtype="float64")
        tensors = read_tensors(folder / WEIGHTS_NAME, error=AdapterFormatError)
    except (FileFormatError, NotImplementedError) as exc:
        return _fail(f"adapter: {exc}")
    except OSError as exc:
        return _os_error("adapter", folder, exc)
    stored = sorted({t.code for t in tensors.values()})          # safetensors dtype codes: F32, BF16, ...

    _print_header(folder, args.base, config, lora_config, adapters, stored)
    warnings = _print_modules(params, lora_config, adapters)
    if lora_config.use_dora:
        warnings += _print_magnitudes(params, lora_config, adapters, stored)
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
    """One line on stderr: which file (the ``what``) could not be read, and why (exit 1)."""
    return error("check", read_error(exc, given, what), 1)


def _is_gpt2(config: Any) -> bool:
    return hasattr(config, "n_embd")


def _print_header(folder: Path, base: Path, config: Any, lc: Any, adapters: dict, stored: list[str]) -> None:
    """The adapter's settings, the base model's sizes, and the verdict on shapes."""
    targets = lc.target_modules if isinstance(lc.target_modules, str) else list(lc.target_modules)
    print(f"adapter   {folder}")
    print(f"          r={lc.r} lora_alpha={lc.alpha:g} use_rslora={lc.use_rslora} "
          f"fan_in_fan_out={lc.fan_in_fan_out} dropout={lc.dropout:g} stored as {', '.join(stored)}"
          f"{' use_dora=True' if lc.use_dora else ''}")
    print(f"          target_modules={targets!r}")
    for name in ("rank_pattern", "alpha_pattern", "layers_to_transform", "layers_pattern", "embedding_modules"):
        value = getattr(lc, name)
        if value:
            print(f"          {name}={dict(value) if hasattr(value, 'items') else list(value)!r}")
    print(f"base      {base}")
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
    """One row per adapted module (shape, r, alpha, s, change); returns its warnings.

    The change is ``|s B A|_F / |W|_F`` (an embedding's ``s (B A)^T`` has the same norm), from two
    (r, r) Gram matrices; for DoRA it is ``|W' - W|_F / |W|_F`` with W' the merged DoRA weight.
    """
    from ..dora import dora_merge

    width = max(len(m) for m in adapters)
    kinds = {m: "DoRA" if "m" in p else "embedding" if lc.is_embedding(m) else "" for m, p in adapters.items()}
    tail = "  kind" if any(kinds.values()) else ""
    change_name = "|W'-W|/|W|" if lc.use_dora else "|sBA|/|W|"
    print(f"{'module':<{width}}  {'d_out x d_in':>12}  {'r':>3}  {'alpha':>7}  {'scale':>9}  {change_name:>10}{tail}")
    warnings = []
    for module, pair in adapters.items():
        A, B = to_numpy(pair["A"]), to_numpy(pair["B"])          # (r, d_in), (d_out, r), float64
        W = to_numpy(params[module + ".weight"])                 # (d_out, d_in); an embedding's table (V, D)
        r, alpha, s = lc.rank_for(module), lc.alpha_for(module), lc.scale_for(module)
        if "m" in pair:
            change = float(np.linalg.norm(to_numpy(dora_merge(W, A, B, pair["m"], s)) - W) / np.linalg.norm(W))
        else:
            gram = float(np.sum((B.T @ B) * (A @ A.T)))          # |B A|_F^2 from two (r, r) matrices
            change = abs(s) * math.sqrt(max(gram, 0.0)) / float(np.linalg.norm(W))
        d_out, d_in = W.shape
        kind = f"  {kinds[module]}" if kinds[module] else ""
        print(f"{module:<{width}}  {f'{d_out} x {d_in}':>12}  {r:>3}  {alpha:>7g}  {s:>9.4g}  {change:>10.3e}{kind}")
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


def _print_magnitudes(params: dict, lc: Any, adapters: dict, stored: list[str]) -> list[str]:
    """DoRA: each magnitude m (d_out,) against the base's row norms; returns warnings.

    ``m / ||W||_row`` is how much merging rescales each output row of the base weight;
    ``m / ||W + s B A||_row`` is 1 where m still has its initial value (PEFT's init), so a
    magnitude that is everywhere 1 within rounding was not trained: DoRA then equals LoRA.
    """
    from ..testing import tolerance

    width = max(len(m) for m in adapters)
    print("\nDoRA magnitudes m (d_out,) against the base's row norms (min / median / max over the rows):")
    print(f"{'module':<{width}}  {'m / ||W||_row':>26}  {'m / ||W + s B A||_row':>26}")
    warnings = []
    low = "float32" if set(stored) & {"F32", "F16", "BF16"} else "float64"     # the precision m was computed in
    for module, pair in adapters.items():
        A, B, m = (to_numpy(pair[k]) for k in ("A", "B", "m"))
        W, s = to_numpy(params[module + ".weight"]), lc.scale_for(module)
        base_ratio = m / np.linalg.norm(W, axis=1)
        init_ratio = m / np.linalg.norm(W + s * (B @ A), axis=1)
        stats = lambda v: f"{np.min(v):.4g} / {np.median(v):.4g} / {np.max(v):.4g}"  # noqa: E731
        print(f"{module:<{width}}  {stats(base_ratio):>26}  {stats(init_ratio):>26}")
        if np.max(np.abs(init_ratio - 1.0)) <= 2 * tolerance(low, W.shape[1] + B.shape[1] + 12):
            warnings.append(f"{module}: m equals ||W + s B A||_row within rounding (its initial value): the magnitude "
                            "was not trained, and DoRA computes LoRA's weight here")
        if np.any(m <= 0):
            warnings.append(f"{module}: {int(np.sum(m <= 0))} magnitude(s) are zero or negative: those output rows "
                            "are zeroed or flipped")
    return warnings


def _config_warnings(config: Any, lc: Any, adapters: dict) -> list[str]:
    """Settings that other implementations read differently: rsLoRA's scale, fan_in_fan_out, an
    embedding adapter on a table tied to the output head."""
    warnings = []
    tied = getattr(config, "tie_word_embeddings", _is_gpt2(config))
    for module in adapters:
        if tied and lc.is_embedding(module) and module in ("transformer.wte", "model.embed_tokens"):
            warnings.append(f"{module}: an embedding adapter on a table tied to the output head: lora-ref and PEFT adapt "
                            "the input lookup only, but PEFT's merge_and_unload writes the delta into the shared table, "
                            "changing the head too (merged != unmerged; docs/embedding.md)")
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
