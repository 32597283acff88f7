"""Adapters on a model family's modules: created (:func:`add_adapters`) and merged (:func:`merge_adapters`).

Split from ``hosting.py`` (which keeps the family record, the projection and the embedding lookup
every forward calls, and the input checks) to keep each file under the project's 600 lines; both
work on the same :class:`~transformer_ref.hosting.Family` record.

The adapters of one module, by kind (shapes as in ``hosting``; s the module's scale):

    LoRA        {"A": (r, d_in), "B": (d_out, r)}          W' = W + s B A                (Section 4.1)
    DoRA        {"A", "B", "m": (d_out,)}                  W' = m (W + s B A) / ||W + s B A||_row  (Eq. 5)
    embedding   {"A": (r, V), "B": (D, r)}                 E' = E + s (B A)^T            (lora_ref.embedding)

A tied output head (GPT-2's ``lm_head`` is ``wte``; LLaMA with ``tie_word_embeddings``) reads the
*base* table in the adapted model's forward, as PEFT's forward does: only the input lookup is
adapted. Merging an embedding adapter into such a table therefore **unties** the head: the merged
params hold the adapted table and, as ``lm_head.weight``, the base one, and run with
:func:`untie` (config) -- the merged model is the adapted model. PEFT's ``merge_and_unload`` writes
the delta into the one shared tensor instead, which changes the head too (merged != unmerged);
docs/embedding.md measures both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lora_ref.adapters import AdapterSet
from lora_ref.backend import asarray, namespace, to_numpy
from lora_ref.checks import generator
from lora_ref.dora import dora_magnitude, dora_merge
from lora_ref.embedding import init_lora_embedding, merge_embedding
from lora_ref.lora import LoraConfig, init_lora, merge

from .hosting import check_adapters, check_params, embedding_flag, enable_flags, families, family_of, is_4bit

__all__ = ["add_adapters", "merge_adapters", "untie"]


def add_adapters(params: Mapping[str, Any], config: Any, lora_config: LoraConfig,
                 rng: int | np.random.Generator = 0) -> dict[str, dict[str, Any]]:
    """Fresh adapters for every module that ``lora_config`` targets: ``{module: {"A", "B"[, "m"]}}``.

    The modules are the family's embedding tables (GPT-2: ``transformer.wte`` (V, C),
    ``transformer.wpe``; LLaMA: ``model.embed_tokens``) and its projection table (GPT-2:
    ``transformer.h.{i}.attn.c_attn``, fused q, k, v, (3C, C); ``.attn.c_proj`` (C, C); ``.mlp.c_fc``
    (F, C); ``.mlp.c_proj`` (C, F)), in that order. A module is adapted when
    ``lora_config.targets(name)`` says so (PEFT's matching, ``layers_to_transform``); its rank is
    ``rank_for(name)``.

    * A projection: A and B from ``lora_ref.init_lora`` with ``lora_config.init`` (B = 0 unless
      "random"). For ``enable_for(name) = (q, k, v)`` flags (loralib MergedLinear) with n enabled of
      G blocks, A is (n r, d_in) and B is (n d_out / G, r), each block drawn on its own. With
      ``use_dora`` also ``m = ||W + s B A||_row`` (``lora_ref.dora.dora_magnitude``), as PEFT
      initialises it at creation (``||W||_row`` when B = 0; it includes s B A when both are random).
    * An embedding table (V, D): PEFT's layout, A (r, V) zero and B (D, r) ~ N(0, 1)
      (``lora_ref.embedding.init_lora_embedding``); with ``init="random"`` both ~ N(0, 1), as PEFT's
      ``init_lora_weights=False``. The config must list it in ``embedding_modules`` (it records the
      layout for the files); DoRA on an embedding and ``enable_lora`` on one are refused.

    Arrays in the dtype of ``params``, on the current backend; ``rng`` an int seed or a
    ``numpy.random.Generator``, drawn from in module order. Raises ValueError if nothing is selected.
    """
    family = family_of(config)
    if not isinstance(lora_config, LoraConfig):
        raise TypeError(f"lora_config must be a lora_ref.LoraConfig, got {type(lora_config).__name__}")
    dtype = check_params(params, family, config)
    rng = generator(rng, "rng")
    names = family.adaptable_names(config)
    adapters = {}
    for name in names:
        if not lora_config.targets(name):
            continue
        r, enable = lora_config.rank_for(name), enable_flags(family, lora_config, name)
        if embedding_flag(family, lora_config, name):
            V, D = family.projection_shape(config, name)
            if lora_config.init == "random":                               # PEFT's init_lora_weights=False
                A = asarray(rng.standard_normal((r, V)).astype(dtype))     # (r, V)
                B = asarray(rng.standard_normal((D, r)).astype(dtype))     # (D, r)
            else:
                A, B = init_lora_embedding(V, D, r, rng=rng, dtype=dtype)  # A = 0, B ~ N(0, 1)
            adapters[name] = {"A": A, "B": B}
            continue
        d_out, d_in = family.projection_shape(config, name)
        if enable is None:
            A, B = init_lora(d_in, d_out, r, init=lora_config.init, rng=rng, dtype=dtype)
        else:
            if d_out % len(enable):
                raise ValueError(f"enable_lora={enable} for {name!r}: d_out={d_out} is not divisible into {len(enable)} blocks")
            pairs = [init_lora(d_in, d_out // len(enable), r, init=lora_config.init, rng=rng, dtype=dtype)
                     for on in enable if on]
            xp = namespace(pairs[0][0])
            A = xp.concat([a for a, _ in pairs], axis=0)                   # (n r, d_in)
            B = xp.concat([b for _, b in pairs], axis=0)                   # (n d_out / G, r)
        adapters[name] = {"A": A, "B": B}
        if lora_config.use_dora:                                           # m = ||W + s B A||_row  (Section 4.1)
            adapters[name]["m"] = dora_magnitude(params[name + ".weight"], A, B, lora_config.scale_for(name))
    if not adapters:
        embeddings = f"{', '.join(family.embeddings)} and " if family.embeddings else ""
        raise ValueError(
            f"lora_config selects no module (target_modules={lora_config.target_modules!r}, "
            f"layers_to_transform={lora_config.layers_to_transform!r}); the adaptable modules are {embeddings}"
            f"{family.block}.{{{', '.join(family.projections)}}} for i in 0..{family.n_blocks(config) - 1}, "
            f"e.g. {', '.join(names[:4])}")
    return adapters


def merge_adapters(params: Mapping[str, Any], adapters: Any, lora_config: LoraConfig | None = None, *,
                   names: Sequence[str] | None = None) -> dict[str, Any]:
    """A new params dict with the adapters folded into the weights, so that ``forward(merged,
    tokens, config)`` equals the adapted forward up to rounding, at the cost of a plain model.

    * LoRA: ``W + s B A`` (Section 4.1); fused blocks follow ``lora_config.enable_for``. Weights
      here are (d_out, d_in), so no transpose whatever ``lora_config.fan_in_fan_out`` says.
    * DoRA (an adapter with ``m``): ``m (W + s B A) / ||W + s B A||_row`` (``lora_ref.dora.dora_merge``).
      Unmerging needs ``||W + s B A||_row`` of the base W, which the merged weight forgets: keep
      ``dora_magnitude(W, A, B, s)`` if you will unmerge (``lora_ref.dora.dora_unmerge``).
    * An embedding table: ``E + s (B A)^T``. If the table is also the output head (tied; the
      params hold no ``lm_head.weight``), the head keeps the base table: the result gains
      ``lm_head.weight`` = E, and is a model of config :func:`untie` (config) -- untied, as the
      adapted forward was (see the module docstring).

    ``adapters`` is one adapter dict with its ``lora_config``, or a ``lora_ref.AdapterSet`` (then
    ``lora_config`` None) of which ``names`` are merged (default: its active ones), per weight in
    that order (``lora_ref.adapters``' (S3), PEFT's order): LoRA deltas added one by one; a DoRA
    adapter that is not alone on its weight adds its own change ``dora_merge(W) - W`` of the base
    weight (the order-free meaning its forward has, docs/dora.md). ``params`` is not modified;
    only merged weights (and an untied head) are new arrays.
    """
    if isinstance(adapters, AdapterSet):
        if lora_config is not None:
            raise ValueError("lora_config must be None when adapters is an AdapterSet: each of its adapters has its own")
        chosen = adapters.active if names is None else adapters.with_active(names).active
        check_adapters(adapters.with_active(chosen), params, None)
        modules = dict.fromkeys(m for n in chosen for m in adapters.modules(n))
        terms = {m: [(ad, lc) for _, ad, lc in adapters.terms(m, chosen)] for m in modules}
    else:
        if names is not None:
            raise TypeError("names= chooses adapters of a lora_ref.AdapterSet; a single adapter dict is merged whole")
        if not isinstance(lora_config, LoraConfig):
            raise TypeError(f"lora_config must be a lora_ref.LoraConfig, got {type(lora_config).__name__}")
        terms = {m: [(ad, lora_config)] for m, ad in check_adapters(adapters, params, lora_config).items()}
    merged = dict(params)
    for module, pairs in terms.items():
        merged[module + ".weight"] = _merge_module(params[module + ".weight"], module, pairs)
    for family in families():                          # a tied head keeps the base table: untie
        for head, table in family.tied.items():
            if family.is_embedding(table.removesuffix(".weight")) and table.removesuffix(".weight") in terms \
                    and head not in params:
                merged[head] = params[table]
    return merged


def _merge_module(W: Any, module: str, pairs: list[tuple[Mapping[str, Any], LoraConfig]]) -> Any:
    """W with each (arrays, config) of ``pairs`` merged, in order (see :func:`merge_adapters`)."""
    if is_4bit(W):                   # a 4-bit base: PEFT's path per adapter, dequantise + s B A + requantise
        from lora_ref.quant import merge_4bit

        for ad, lc in pairs:
            if "m" in ad or lc.enable_for(module) is not None:
                raise NotImplementedError(f"merging a DoRA or enable_lora adapter into the 4-bit {module} is not implemented")
            W = merge_4bit(W, to_numpy(ad["A"]), to_numpy(ad["B"]), lc.scale_for(module))   # lossy: docs/quant.md
        return W
    if any(f.is_embedding(module) for f in families()):
        for ad, lc in pairs:
            W = merge_embedding(W, ad["A"], ad["B"], lc.scale_for(module))           # E + s (B A)^T
        return W
    if len(pairs) == 1 and "m" in pairs[0][0]:
        ad, lc = pairs[0]
        return dora_merge(W, ad["A"], ad["B"], ad["m"], lc.scale_for(module))         # Eq. 5
    out = W
    for ad, lc in pairs:
        s = lc.scale_for(module)
        if "m" in ad:
            out = out + (dora_merge(W, ad["A"], ad["B"], ad["m"], s) - W)             # its own change of W
        else:
            out = merge(out, ad["A"], ad["B"], s, enable_lora=lc.enable_for(module))  # + s B A
    return out


def untie(config: Any) -> Any:
    """``config`` with ``tie_word_embeddings=False``: the config of what :func:`merge_adapters`
    returns after merging an embedding adapter into a tied table (the head keeps the base table,
    as ``lm_head.weight``). Any registered family whose config has that field (GPT-2, LLaMA)."""
    family = family_of(config)
    if not any(f.name == "tie_word_embeddings" for f in dataclasses.fields(config)):
        raise TypeError(f"{family.name}'s config has no tie_word_embeddings field: there is no head to untie")
    return dataclasses.replace(config, tie_word_embeddings=False)
