"""Parameter counts from shapes alone: base model and LoRA adapters, for any size of config.

Nothing here allocates an array, so GPT-3 175B (``GPTConfig(n_embd=12288, n_layer=96,
n_head=96, n_positions=2048)``) is counted as easily as a toy model.

The paper's weight-matrix types map onto GPT-2's modules as follows (C = n_embd, F = MLP width):

    ========  ===========================  ================================================
    type      module                        shape (d_out, d_in)
    ========  ===========================  ================================================
    q, k, v   ``attn.c_attn`` row-blocks    (C, C) each: slices of the fused (3C, C) weight,
                                            adapted separately through ``enable_lora``
    qkv       ``attn.c_attn`` as a whole    (3C, C): one adapter for the fused weight
    o         ``attn.c_proj``               (C, C)
    mlp_in    ``mlp.c_fc``                  (F, C)
    mlp_out   ``mlp.c_proj``                (C, F)
    ========  ===========================  ================================================

One adapter on a (d_out, d_in) weight has ``r (d_in + d_out)`` parameters; with d_in = d_out =
d_model, summed over L layers, that is Section 5.1's ``|Theta| = 2 L d_model r`` per type.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from lora_ref.backend import getval
from lora_ref.lora import LoraConfig

from .gpt2 import FAMILY, GPTConfig, param_shapes

__all__ = ["MATRIX_TYPES", "adapter_counts", "count_parameters", "count_trainable", "lora_config_for",
           "matrix_shapes"]

# type -> (module suffix, block index within the fused c_attn or None)
MATRIX_TYPES: dict[str, tuple[str, int | None]] = {
    "q": ("attn.c_attn", 0), "k": ("attn.c_attn", 1), "v": ("attn.c_attn", 2),
    "o": ("attn.c_proj", None), "mlp_in": ("mlp.c_fc", None), "mlp_out": ("mlp.c_proj", None),
}
_TARGET = {"attn.c_attn": "c_attn", "attn.c_proj": "attn.c_proj", "mlp.c_fc": "c_fc", "mlp.c_proj": "mlp.c_proj"}
_WHOLE_TYPE = {"attn.c_attn": "qkv", "attn.c_proj": "o", "mlp.c_fc": "mlp_in", "mlp.c_proj": "mlp_out"}


def matrix_shapes(config: GPTConfig) -> dict[str, tuple[int, int]]:
    """``(d_out, d_in)`` of each weight-matrix type in one block (q, k, v, qkv, o, mlp_in, mlp_out)."""
    FAMILY.check_config(config)
    C = config.n_embd
    shapes = {t: (C, C) for t in ("q", "k", "v")}
    shapes["qkv"] = FAMILY.projection_shape(config, "attn.c_attn")
    shapes.update({t: FAMILY.projection_shape(config, m) for t, (m, blk) in MATRIX_TYPES.items() if blk is None})
    return shapes


def lora_config_for(matrices: Iterable[str], r: int, alpha: float | None = None, **options: Any) -> LoraConfig:
    """A ``LoraConfig`` adapting the given weight-matrix types in every block.

    ``matrices`` is a subset of ``("q", "k", "v", "o", "mlp_in", "mlp_out")``: q, k and v become
    flags on the fused ``c_attn`` (``enable_lora``, loralib's MergedLinear), each block with its
    own rank-r adapter, as the paper adapts W_q, W_k, W_v separately; ``"o"`` is ``attn.c_proj``;
    ``mlp_in`` / ``mlp_out`` are ``mlp.c_fc`` / ``mlp.c_proj``. ``alpha`` defaults to ``r`` (scale 1,
    the paper's "set alpha to the first r we try"). Other keyword arguments go to ``LoraConfig``
    (``dropout``, ``use_rslora``, ``init``, ``layers_to_transform``, ...).

    >>> cfg = lora_config_for(["q", "v"], r=8)    # the paper's GPT-2 / GPT-3 setting
    >>> cfg.target_modules, dict(cfg.enable_lora)
    (('c_attn',), {'c_attn': (True, False, True)})
    """
    if isinstance(matrices, str):
        matrices = (matrices,)
    matrices = tuple(matrices)
    unknown = [m for m in matrices if m not in MATRIX_TYPES]
    if unknown or not matrices:
        raise ValueError(f"matrices must be a non-empty subset of {tuple(MATRIX_TYPES)}, got {matrices!r}")
    if len(set(matrices)) != len(matrices):
        raise ValueError(f"matrices lists a type twice: {matrices!r}")
    targets = []
    flags = tuple(t in matrices for t in ("q", "k", "v"))
    if any(flags):
        targets.append(_TARGET["attn.c_attn"])
    for t in ("o", "mlp_in", "mlp_out"):
        if t in matrices:
            targets.append(_TARGET[MATRIX_TYPES[t][0]])
    for key in ("target_modules", "enable_lora"):
        if key in options:
            raise TypeError(f"lora_config_for sets {key} from `matrices`; do not pass it")
    enable = {"c_attn": flags} if any(flags) else None
    return LoraConfig(r=r, alpha=float(r) if alpha is None else alpha, target_modules=targets,
                      enable_lora=enable, **options)


def count_parameters(config: GPTConfig, lora_config: LoraConfig | None = None) -> dict[str, Any]:
    """Counts by shape alone: base model, and the adapters ``lora_config`` would add.

    Returns a dict:

    * ``"base"``: parameters of the model (the tied output projection counted once, as ``wte``)
    * ``"base_by_name"``: ``{state-dict name: count}``
    * ``"lora"``: adapter parameters in total (0 when ``lora_config`` is None)
    * ``"lora_by_module"``: ``{module name: count}`` for each adapted module
    * ``"lora_by_type"``: ``{matrix type: count}`` summed over layers (types as in this module's
      docstring; a fused ``c_attn`` with ``enable_lora`` flags splits into q / k / v, one without
      counts as ``qkv``); only types with a nonzero count appear
    * ``"lora_fraction"``: ``lora / base``

    Targeting follows ``lora_config.targets`` / ``rank_for`` / ``enable_for`` exactly as
    :func:`transformer_ref.add_adapters` does, so the counts equal the sizes it would allocate.
    """
    FAMILY.check_config(config)
    if lora_config is not None and not isinstance(lora_config, LoraConfig):
        raise TypeError(f"lora_config must be a lora_ref.LoraConfig or None, got {type(lora_config).__name__}")
    by_name = {name: math.prod(shape) for name, shape in param_shapes(config).items()}
    by_module: dict[str, int] = {}
    by_type: dict[str, int] = {}
    if lora_config is not None:
        for name in FAMILY.projection_names(config):
            if not lora_config.targets(name):
                continue
            d_out, d_in = FAMILY.projection_shape(config, name)
            r, enable = lora_config.rank_for(name), lora_config.enable_for(name)
            suffix = next(m for m in _TARGET if name.endswith("." + m))
            if enable is None:
                parts = {_WHOLE_TYPE[suffix]: r * (d_in + d_out)}
            else:
                if d_out % len(enable):
                    raise ValueError(f"enable_lora={enable} for {name!r}: d_out={d_out} is not divisible into {len(enable)} blocks")
                q = d_out // len(enable)
                names = ("q", "k", "v") if suffix == "attn.c_attn" and len(enable) == 3 else \
                    tuple(f"{_WHOLE_TYPE[suffix]}[{g}]" for g in range(len(enable)))
                parts = {names[g]: r * (d_in + q) for g, on in enumerate(enable) if on}
            by_module[name] = sum(parts.values())
            for t, n in parts.items():
                by_type[t] = by_type.get(t, 0) + n
    base, lora = sum(by_name.values()), sum(by_module.values())
    return {"base": base, "base_by_name": by_name, "lora": lora, "lora_by_module": by_module,
            "lora_by_type": by_type, "lora_fraction": lora / base}


def adapter_counts(config: GPTConfig, matrices: Iterable[str], r: int) -> dict[str, int]:
    """``{matrix type: adapter parameters over all layers}`` for rank ``r`` on each listed type.

    Equal to ``count_parameters(config, lora_config_for(matrices, r))["lora_by_type"]``; for a
    (d_model, d_model) type that is the paper's ``2 L d_model r``.
    """
    return count_parameters(config, lora_config_for(matrices, r))["lora_by_type"]


def count_trainable(tree: Any) -> int:
    """The number of entries in every array of a (nested) dict: adapters, or params for full FT."""
    tree = getval(tree)
    if isinstance(tree, Mapping):
        return sum(count_trainable(v) for v in tree.values())
    if hasattr(tree, "shape"):
        return math.prod(tree.shape)
    raise TypeError(f"count_trainable expects a (nested) dict of arrays, found {type(tree).__name__}")
