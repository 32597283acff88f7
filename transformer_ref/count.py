"""Parameter counts from shapes alone: base model and LoRA adapters, for any size of config.

Nothing here allocates an array, so GPT-3 175B (``GPTConfig(n_embd=12288, n_layer=96,
n_head=96, n_positions=2048)``) or LLaMA-2 70B is counted as easily as a toy model. Every
function works on any registered family's config (:class:`~transformer_ref.GPTConfig`,
:class:`~transformer_ref.LlamaConfig`), through its ``Family.matrix_types``.

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

and onto LLaMA's seven projections one to one: q, k, v, o are ``self_attn.{q,k,v,o}_proj``
((H D, C), (Hk D, C) twice, (C, H D): k and v are narrower under grouped-query attention), gate,
up, down are ``mlp.{gate,up,down}_proj`` ((F, C), (F, C), (C, F)).

One adapter on a (d_out, d_in) weight has ``r (d_in + d_out)`` parameters; with d_in = d_out =
d_model, summed over L layers, that is Section 5.1's ``|Theta| = 2 L d_model r`` per type.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from lora_ref.backend import getval
from lora_ref.lora import LoraConfig

from .gpt2 import FAMILY as GPT2
from .hosting import Family, embedding_flag, families, family_of

__all__ = ["MATRIX_TYPES", "adapter_counts", "count_parameters", "count_trainable", "lora_config_for",
           "matrix_shapes", "matrix_module"]

MATRIX_TYPES: Mapping[str, tuple[str, int | None]] = GPT2.matrix_types
"""GPT-2's types: type -> (module suffix, block index within the fused c_attn or None)."""


def _family(model: Any) -> Family:
    """A Family from a family name ("gpt2", "llama"), a Family, or a config of a registered family."""
    if isinstance(model, Family):
        return model
    if isinstance(model, str):
        for f in families():
            if f.name == model:
                return f
        raise ValueError(f"family must be one of {', '.join(f.name for f in families())}, got {model!r}")
    return family_of(model)


def _fused(family: Family) -> dict[str, tuple[str, ...]]:
    """``{suffix: (type of block 0, type of block 1, ...)}`` for each fused projection (GPT-2's c_attn)."""
    out: dict[str, dict[int, str]] = {}
    for t, (suffix, block) in family.matrix_types.items():
        if block is not None:
            out.setdefault(suffix, {})[block] = t
    return {suffix: tuple(blocks[g] for g in sorted(blocks)) for suffix, blocks in out.items()}


def _whole_type(family: Family, suffix: str) -> str:
    """The type name of projection ``suffix`` adapted as a whole: its type, or its blocks' names
    joined for a fused one (GPT-2's c_attn: "qkv")."""
    fused = _fused(family)
    if suffix in fused:
        return "".join(fused[suffix])
    return next(t for t, (s, _) in family.matrix_types.items() if s == suffix)


def matrix_shapes(config: Any) -> dict[str, tuple[int, int]]:
    """``(d_out, d_in)`` of each weight-matrix type in one block (GPT-2: q, k, v, qkv, o, mlp_in,
    mlp_out; LLaMA: q, k, v, o, gate, up, down)."""
    family = family_of(config)
    fused = _fused(family)
    shapes = {}
    for t, (suffix, block) in family.matrix_types.items():
        d_out, d_in = family.projection_shape(config, suffix)
        shapes[t] = (d_out // len(fused[suffix]), d_in) if block is not None else (d_out, d_in)
        if block is not None and t == fused[suffix][-1]:
            shapes[_whole_type(family, suffix)] = (d_out, d_in)
    return shapes


def matrix_module(config: Any, kind: str, layer: int) -> tuple[str, slice | None]:
    """``(module name, rows)`` of matrix type ``kind`` in block ``layer``: rows the slice of the fused
    weight's rows that the type occupies, or None when the type is a whole projection (GPT-2's
    ``("transformer.h.0.attn.c_attn", slice(0, C))`` for q; LLaMA's ``("model.layers.0.self_attn.q_proj", None)``)."""
    family = family_of(config)
    if kind not in family.matrix_types:
        raise ValueError(f"kind must be one of {tuple(family.matrix_types)} for {family.name}, got {kind!r}")
    suffix, block = family.matrix_types[kind]
    name = f"{family.block.format(i=layer)}.{suffix}"
    if block is None:
        return name, None
    q = family.projection_shape(config, suffix)[0] // len(_fused(family)[suffix])
    return name, slice(block * q, (block + 1) * q)


def lora_config_for(matrices: Iterable[str], r: int, alpha: float | None = None, *, family: Any = "gpt2",
                    **options: Any) -> LoraConfig:
    """A ``LoraConfig`` adapting the given weight-matrix types in every block of ``family``'s models.

    ``family``: "gpt2" (default), "llama", a ``hosting.Family`` or a config of the family. For
    GPT-2, ``matrices`` is a subset of ``("q", "k", "v", "o", "mlp_in", "mlp_out")``: q, k and v
    become flags on the fused ``c_attn`` (``enable_lora``, loralib's MergedLinear), each block with
    its own rank-r adapter, as the paper adapts W_q, W_k, W_v separately; ``"o"`` is
    ``attn.c_proj``; ``mlp_in`` / ``mlp_out`` are ``mlp.c_fc`` / ``mlp.c_proj``. For LLaMA, a subset
    of ``("q", "k", "v", "o", "gate", "up", "down")``, PEFT's ``target_modules=["q_proj", ...]``.
    ``alpha`` defaults to ``r`` (scale 1, the paper's "set alpha to the first r we try"). Other
    keyword arguments go to ``LoraConfig`` (``dropout``, ``use_rslora``, ``init``,
    ``layers_to_transform``, ...).

    >>> cfg = lora_config_for(["q", "v"], r=8)    # the paper's GPT-2 / GPT-3 setting
    >>> cfg.target_modules, dict(cfg.enable_lora)
    (('c_attn',), {'c_attn': (True, False, True)})
    >>> lora_config_for(["q", "v"], r=8, family="llama").target_modules
    ('q_proj', 'v_proj')
    """
    fam = _family(family)
    if isinstance(matrices, str):
        matrices = (matrices,)
    matrices = tuple(matrices)
    unknown = [m for m in matrices if m not in fam.matrix_types]
    if unknown or not matrices:
        raise ValueError(f"matrices must be a non-empty subset of {tuple(fam.matrix_types)}, got {matrices!r}")
    if len(set(matrices)) != len(matrices):
        raise ValueError(f"matrices lists a type twice: {matrices!r}")
    for key in ("target_modules", "enable_lora"):
        if key in options:
            raise TypeError(f"lora_config_for sets {key} from `matrices`; do not pass it")
    fused = _fused(fam)
    targets, enable = [], {}
    for suffix in fam.projections:                       # the family's order: c_attn first, ...
        if suffix in fused:
            flags = tuple(t in matrices for t in fused[suffix])
            if any(flags):
                targets.append(fam.target_name(suffix))
                enable[fam.target_name(suffix)] = flags
        elif any(fam.matrix_types[t][0] == suffix for t in matrices):
            targets.append(fam.target_name(suffix))
    return LoraConfig(r=r, alpha=float(r) if alpha is None else alpha, target_modules=targets,
                      enable_lora=enable or None, **options)


def count_parameters(config: Any, lora_config: LoraConfig | None = None) -> dict[str, Any]:
    """Counts by shape alone: base model, and the adapters ``lora_config`` would add.

    Returns a dict:

    * ``"base"``: parameters of the model (a tied output projection counted once, as the embedding)
    * ``"base_by_name"``: ``{state-dict name: count}``
    * ``"lora"``: adapter parameters in total (0 when ``lora_config`` is None), DoRA's magnitudes included
    * ``"lora_by_module"``: ``{module name: count}`` for each adapted module, embedding tables included
    * ``"lora_by_type"``: ``{matrix type: count}`` summed over layers (types as in this module's
      docstring; a fused ``c_attn`` with ``enable_lora`` flags splits into q / k / v, one without
      counts as ``qkv``; an embedding table is its own type, its module name's last part: ``wte``,
      ``wpe``, ``embed_tokens``); only types with a nonzero count appear
    * ``"dora_magnitude"``: the entries of DoRA's magnitudes m among ``lora`` (``d_out`` per adapted
      projection with ``use_dora``, else 0)
    * ``"lora_fraction"``: ``lora / base``

    Per module: a projection ``(d_out, d_in)`` has ``r (d_in + d_out)`` (A and B; a fused one with n
    of G blocks enabled ``n r (d_in + d_out / G)``), plus ``d_out`` with ``use_dora``; an embedding
    table ``(V, D)`` has ``r (V + D)`` (A (r, V), B (D, r)). Targeting follows ``lora_config.targets``
    / ``rank_for`` / ``enable_for`` / ``embedding_modules`` exactly as
    :func:`transformer_ref.add_adapters` does, so the counts equal the sizes it would allocate.
    """
    family = family_of(config)
    if lora_config is not None and not isinstance(lora_config, LoraConfig):
        raise TypeError(f"lora_config must be a lora_ref.LoraConfig or None, got {type(lora_config).__name__}")
    by_name = {name: math.prod(shape) for name, shape in family.param_shapes(config).items()}
    fused = _fused(family)
    by_module: dict[str, int] = {}
    by_type: dict[str, int] = {}
    magnitudes = 0
    if lora_config is not None:
        for name in family.adaptable_names(config):
            if not lora_config.targets(name):
                continue
            if embedding_flag(family, lora_config, name):                # (V, D): A (r, V), B (D, r)
                V, D = family.projection_shape(config, name)
                by_module[name] = lora_config.rank_for(name) * (V + D)
                t = name.rsplit(".", 1)[-1]
                by_type[t] = by_type.get(t, 0) + by_module[name]
                continue
            d_out, d_in = family.projection_shape(config, name)
            r, enable = lora_config.rank_for(name), lora_config.enable_for(name)
            suffix = next(m for m in family.projections if name.endswith("." + m))
            if enable is None:
                parts = {_whole_type(family, suffix): r * (d_in + d_out)}
            else:
                if d_out % len(enable):
                    raise ValueError(f"enable_lora={enable} for {name!r}: d_out={d_out} is not divisible into {len(enable)} blocks")
                q = d_out // len(enable)
                names = fused[suffix] if suffix in fused and len(enable) == len(fused[suffix]) else \
                    tuple(f"{_whole_type(family, suffix)}[{g}]" for g in range(len(enable)))
                parts = {names[g]: r * (d_in + q) for g, on in enumerate(enable) if on}
            if lora_config.use_dora:                                      # DoRA's m (d_out,): never fused
                parts = {t: n + d_out for t, n in parts.items()}
                magnitudes += d_out
            by_module[name] = sum(parts.values())
            for t, n in parts.items():
                by_type[t] = by_type.get(t, 0) + n
    base, lora = sum(by_name.values()), sum(by_module.values())
    return {"base": base, "base_by_name": by_name, "lora": lora, "lora_by_module": by_module,
            "lora_by_type": by_type, "dora_magnitude": magnitudes, "lora_fraction": lora / base}


def adapter_counts(config: Any, matrices: Iterable[str], r: int) -> dict[str, int]:
    """``{matrix type: adapter parameters over all layers}`` for rank ``r`` on each listed type.

    Equal to ``count_parameters(config, lora_config_for(matrices, r, family=config))["lora_by_type"]``;
    for a (d_model, d_model) type that is the paper's ``2 L d_model r``.
    """
    return count_parameters(config, lora_config_for(matrices, r, family=config))["lora_by_type"]


def count_trainable(tree: Any) -> int:
    """The number of entries in every array of a (nested) dict: adapters, or params for full FT."""
    tree = getval(tree)
    if isinstance(tree, Mapping):
        return sum(count_trainable(v) for v in tree.values())
    if hasattr(tree, "shape"):
        return math.prod(tree.shape)
    raise TypeError(f"count_trainable expects a (nested) dict of arrays, found {type(tree).__name__}")
