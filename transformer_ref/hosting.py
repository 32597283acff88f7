"""What every model family shares: its table of projections, LoRA targeting, adapters, validation.

A model family (``gpt2.py``, ``llama.py``) is one file that describes itself with a
:class:`Family` record -- its config class, the module prefix of block ``i``, its table of
LoRA-adaptable projections, its parameter shapes, ``init_params``, ``forward`` and ``loss`` --
and is registered once (``transformer_ref/__init__.py``). Everything a family would otherwise
write again lives here, written against that record:

* :func:`project` -- THE projection of every family's forward: base weight, bias, the module's
  adapter, its scale and fused-block flags, its dropout mask, computed by ``ops.linear``. The one
  place a projection is computed, so a variant of LoRA lands here once for every family;
  :func:`embed`, likewise, the token-embedding lookup;
* :func:`add_adapters` -- fresh adapters for every projection a ``lora_ref.LoraConfig`` targets
  (PEFT's matching rules, ``LoraConfig.targets``; ranks, scales, fused blocks from the config);
* :func:`merge_adapters` -- ``W + s B A`` folded into each adapted weight (Section 4.1);
* :func:`check_params`, :func:`check_tokens`, :func:`check_adapters`, :func:`check_ops` -- the
  validation a family's ``forward`` runs first, with messages that say what is wrong and where.

The containers are those of the whole package: ``params`` a dict of arrays keyed by Hugging Face
state-dict names, every projection weight stored ``(d_out, d_in)`` (``y = x W^T + b``: GPT-2's
Conv1D checkpoints are transposed once, by ``checkpoints``); ``adapters`` a dict keyed by module
name (a weight's name without ``.weight``) holding exactly ``{"A": (n r, d_in), "B": (n q, r)}``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np

from lora_ref.backend import dtype_name, getval, namespace
from lora_ref.checks import generator, index_array, is_array, is_integer_array
from lora_ref.lora import LoraConfig, init_lora, merge

from .layers import Ops

__all__ = ["Family", "add_adapters", "check_adapters", "check_dropout", "check_ops", "check_params", "check_tokens", "embed",
           "families", "family_of", "merge_adapters", "project", "register"]


@dataclass(frozen=True)
class Family:
    """A model family, as the host sees it: what a family file provides, in one record.

    name          e.g. ``"gpt2"`` (its config.json ``model_type``)
    config_type   its config class (e.g. ``GPTConfig``); ``forward`` etc. dispatch on it
    block         the module prefix of block ``i``, with ``{i}``: ``"transformer.h.{i}"``
    projections   the LoRA-adaptable projections of one block, in order: module suffix ->
                  ``shape(config) -> (d_out, d_in)`` (e.g. ``"attn.c_attn": (3C, C)``)
    n_blocks      ``n_blocks(config) -> int``, the number of blocks
    param_shapes  ``param_shapes(config) -> {state-dict name: shape}``, every parameter in order
    init_params, forward, loss
                  the family's own functions, with the signatures of ``gpt2.init_params``,
                  ``gpt2.forward`` and ``gpt2.loss`` (``ops=REFERENCE`` by default)
    tied          names a checkpoint may hold that are another parameter (GPT-2:
                  ``{"lm_head.weight": "transformer.wte.weight"}``), for error messages
    matrix_types  the paper's weight-matrix types: type -> ``(projection suffix, block)``, block
                  the row block of a fused projection or None (GPT-2: ``"q": ("attn.c_attn", 0)``,
                  ``"o": ("attn.c_proj", None)``; LLaMA: ``"q": ("self_attn.q_proj", None)``).
                  Empty: one type per projection, named by its last component.
    """

    name: str
    config_type: type
    block: str
    projections: Mapping[str, Callable[[Any], tuple[int, int]]]
    n_blocks: Callable[[Any], int]
    param_shapes: Callable[[Any], dict[str, tuple[int, ...]]]
    init_params: Callable[..., dict[str, Any]]
    forward: Callable[..., Any]
    loss: Callable[..., Any]
    tied: Mapping[str, str] = field(default_factory=dict)
    matrix_types: Mapping[str, tuple[str, int | None]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if "{i}" not in self.block:
            raise ValueError(f"Family.block must contain '{{i}}' (the block index), got {self.block!r}")
        object.__setattr__(self, "projections", MappingProxyType(dict(self.projections)))
        object.__setattr__(self, "tied", MappingProxyType(dict(self.tied)))
        types = dict(self.matrix_types) or {p.rsplit(".", 1)[-1]: (p, None) for p in self.projections}
        for t, (suffix, _) in types.items():
            if suffix not in self.projections:
                raise ValueError(f"Family.matrix_types[{t!r}] names {suffix!r}, which is not one of its projections")
        object.__setattr__(self, "matrix_types", MappingProxyType(types))
        suffixes = "|".join(re.escape(s) for s in self.projections)
        pattern = re.escape(self.block).replace(re.escape("{i}"), r"\d+") + rf"\.(?:{suffixes})"
        object.__setattr__(self, "_projection_re", re.compile(pattern))

    def check_config(self, config: Any) -> None:
        """TypeError unless ``config`` is this family's config class."""
        if not isinstance(config, self.config_type):
            raise TypeError(f"config must be a transformer_ref.{self.config_type.__name__}, got {type(config).__name__}")

    def projection_names(self, config: Any) -> list[str]:
        """The LoRA-adaptable module names, block by block (``transformer.h.0.attn.c_attn``, ...)."""
        self.check_config(config)
        return [f"{self.block.format(i=i)}.{p}" for i in range(self.n_blocks(config)) for p in self.projections]

    def projection_shape(self, config: Any, module: str) -> tuple[int, int]:
        """``(d_out, d_in)`` of a projection, given its name or its suffix (``"mlp.c_fc"``)."""
        for suffix, shape in self.projections.items():
            if module == suffix or module.endswith("." + suffix):
                return shape(config)
        raise ValueError(f"{module!r} is not a projection; projections end in one of {', '.join(self.projections)}")

    def is_projection(self, name: Any) -> bool:
        """Whether ``name`` has the form of one of this family's projections (any block index)."""
        return isinstance(name, str) and self._projection_re.fullmatch(name) is not None

    def describe_projections(self) -> str:
        """How the projections are named, for error messages."""
        return f"'{self.block.format(i=0)}.{next(iter(self.projections))}' ({', '.join(self.projections)} of each block)"

    @property
    def has_fused(self) -> bool:
        """Whether a projection holds several matrix types as row blocks (GPT-2's c_attn): only then
        does loralib's ``enable_lora`` have a meaning for this family."""
        return any(block is not None for _, block in self.matrix_types.values())

    def target_name(self, suffix: str) -> str:
        """The shortest name PEFT's ``target_modules`` list can use for projection ``suffix`` and no
        other projection (the last components that no other suffix ends with): GPT-2 ``"c_attn"``,
        ``"attn.c_proj"`` (``"c_proj"`` would also match ``mlp.c_proj``); LLaMA ``"q_proj"``."""
        parts = suffix.split(".")
        for k in range(1, len(parts) + 1):
            name = ".".join(parts[-k:])
            if not any(p == name or p.endswith("." + name) for p in self.projections if p != suffix):
                return name
        return suffix

    def flops_per_token(self, config: Any) -> int:
        """Multiply-adds x 2 of every projection of the model for one token (the forward's matmul work,
        attention's own T-dependent products aside): ``2 n_blocks sum d_out d_in``."""
        return 2 * self.n_blocks(config) * sum(d_out * d_in for d_out, d_in in (s(config) for s in self.projections.values()))


# ============================================================================================
# The projection and the embedding lookup every family's forward calls
# ============================================================================================


def project(ops: Ops, params: Mapping[str, Any], name: str, x: Any, adapters: Mapping[str, Any] | None = None,
            lora_config: LoraConfig | None = None, dropout: Mapping[str, Any] | None = None, *,
            weight: str | None = None) -> Any:
    """Module ``name`` applied to ``x`` (..., d_in) -> (..., d_out): ``y = x W^T + b``, plus
    ``s B (A (x * mask))`` (Eq. 3) where ``adapters`` has ``name``.

    ``W = params[name + ".weight"]`` (or ``params[weight]``, for a head tied to the embedding),
    ``b = params[name + ".bias"]`` if present; the adapter ``adapters[name]`` with the scale
    ``lora_config.scale_for(name)`` and fused-block flags ``enable_for(name)`` (loralib
    MergedLinear); ``dropout[name]``, the module's explicit inverted-dropout mask, if any. Computed
    by ``ops.linear`` (``lora_ref.lora_linear`` under REFERENCE). No checks: the family's forward
    has validated params, adapters and masks once (``check_params``, ``check_adapters``,
    ``check_dropout``).
    """
    W = params[name + ".weight" if weight is None else weight]
    b = params.get(name + ".bias")
    ad = None if adapters is None else adapters.get(name)
    if ad is None:
        return ops.linear(x, W, None, None, 1.0, b)
    mask = None if dropout is None else dropout.get(name)
    return ops.linear(x, W, ad["A"], ad["B"], lora_config.scale_for(name), b, mask, lora_config.enable_for(name))


def embed(ops: Ops, params: Mapping[str, Any], name: str, ids: Any) -> Any:
    """Rows of the embedding table ``params[name + ".weight"]`` (V, C) for integer ``ids`` (...):
    (..., C), by ``ops.embedding`` (ids checked in range there)."""
    return ops.embedding(params[name + ".weight"], ids)


# ============================================================================================
# The registry: which family a config belongs to
# ============================================================================================

_FAMILIES: dict[type, Family] = {}


def register(family: Family) -> Family:
    """Make ``family`` the one that handles configs of ``family.config_type``; returns it."""
    if not isinstance(family, Family):
        raise TypeError(f"family must be a transformer_ref.hosting.Family, got {type(family).__name__}")
    other = _FAMILIES.get(family.config_type)
    if other is not None and other != family:
        raise ValueError(f"{family.config_type.__name__} is already the config of family {other.name!r}")
    _FAMILIES[family.config_type] = family
    return family


def families() -> tuple[Family, ...]:
    """Every registered family, in registration order."""
    return tuple(_FAMILIES.values())


def family_of(config: Any) -> Family:
    """The registered family whose config class ``config`` is an instance of."""
    for config_type, family in _FAMILIES.items():
        if isinstance(config, config_type):
            return family
    kinds = [f"transformer_ref.{t.__name__}" for t in _FAMILIES]
    names = (", ".join(kinds[:-1]) + " or " + kinds[-1]) if len(kinds) > 1 else (kinds[0] if kinds else
                                                                                 "a registered family's config")
    raise TypeError(f"config must be a {names}, got {type(config).__name__}")


# ============================================================================================
# Adapters: created, merged
# ============================================================================================


def add_adapters(params: Mapping[str, Any], config: Any, lora_config: LoraConfig,
                 rng: int | np.random.Generator = 0) -> dict[str, dict[str, Any]]:
    """Fresh adapters for every projection that ``lora_config`` targets: ``{module: {"A", "B"}}``.

    The projections are the family's table (GPT-2: ``transformer.h.{i}.attn.c_attn``, fused q, k,
    v, (3C, C); ``.attn.c_proj`` (C, C); ``.mlp.c_fc`` (F, C); ``.mlp.c_proj`` (C, F)). A module is
    adapted when ``lora_config.targets(name)`` says so (PEFT's matching, ``layers_to_transform``);
    its rank is ``rank_for(name)``. For ``enable_for(name) = (q, k, v)`` flags (loralib
    MergedLinear) with n enabled of G blocks, A is (n r, d_in) and B is (n d_out / G, r), each
    block drawn on its own. A and B come from ``lora_ref.init_lora`` with ``lora_config.init``
    (B = 0 unless "random"), in the dtype of ``params``, on the current backend. ``rng`` is an
    int seed or a ``numpy.random.Generator``. Raises ValueError if nothing is selected.
    """
    family = family_of(config)
    if not isinstance(lora_config, LoraConfig):
        raise TypeError(f"lora_config must be a lora_ref.LoraConfig, got {type(lora_config).__name__}")
    dtype = check_params(params, family, config)
    rng = generator(rng, "rng")
    names = family.projection_names(config)
    adapters = {}
    for name in names:
        if not lora_config.targets(name):
            continue
        d_out, d_in = family.projection_shape(config, name)
        r, enable = lora_config.rank_for(name), _enable(family, lora_config, name)
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
    if not adapters:
        raise ValueError(
            f"lora_config selects no module (target_modules={lora_config.target_modules!r}, "
            f"layers_to_transform={lora_config.layers_to_transform!r}); the adaptable modules are "
            f"{family.block}.{{{', '.join(family.projections)}}} for i in 0..{family.n_blocks(config) - 1}, "
            f"e.g. {', '.join(names[:4])}")
    return adapters


def merge_adapters(params: Mapping[str, Any], adapters: Mapping[str, Any], lora_config: LoraConfig) -> dict[str, Any]:
    """A new params dict with each adapter folded into its weight: ``W + s B A`` (Section 4.1).

    ``forward(merged, tokens, config)`` then equals ``forward(params, tokens, config, adapters,
    lora_config)`` up to rounding, at the cost of a plain model. Fused blocks follow
    ``lora_config.enable_for``; weights here are (d_out, d_in), so no transpose is involved
    whatever ``lora_config.fan_in_fan_out`` says (that flag describes a checkpoint's storage).
    Only the adapted weights are new arrays; ``params`` is not modified.
    """
    if not isinstance(lora_config, LoraConfig):
        raise TypeError(f"lora_config must be a lora_ref.LoraConfig, got {type(lora_config).__name__}")
    raw = check_adapters(adapters, params, lora_config)
    merged = dict(params)
    for name, ad in raw.items():
        W = params[name + ".weight"]
        merged[name + ".weight"] = merge(W, ad["A"], ad["B"], lora_config.scale_for(name),
                                         enable_lora=lora_config.enable_for(name))
    return merged


# ============================================================================================
# Validation: what is wrong, and where
# ============================================================================================


def check_params(params: Any, family: Family, config: Any) -> str:
    """Every parameter of ``config`` present with its shape, nothing else, one float dtype;
    returns that dtype's name ("float32" or "float64")."""
    family.check_config(config)
    params = getval(params)
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a dict of arrays keyed by {family.name} state-dict names, got {type(params).__name__}")
    shapes = family.param_shapes(config)
    missing = [k for k in shapes if k not in params]
    if missing:
        raise ValueError(f"params is missing {len(missing)} of {len(shapes)} parameters for this config, e.g. {missing[:3]}")
    extra = [k for k in params if k not in shapes]
    if extra:
        tied = "".join(f" ({k} is tied to {v} and has no key)" for k, v in family.tied.items() if k in extra)
        raise ValueError(f"params has names this config does not have: {sorted(extra)[:5]}{tied}")
    dtype = None
    first = next(iter(shapes))
    for name, shape in shapes.items():
        value = getval(params[name])
        if not is_array(value):
            raise TypeError(f"params[{name!r}] must be an array, got {type(value).__name__}")
        if tuple(value.shape) != shape:
            hint = " (projection weights are (d_out, d_in), y = x W^T: transpose a (d_in, d_out) weight such " \
                   "as GPT-2's Conv1D)" if name.endswith(".weight") and tuple(value.shape) == shape[::-1] else ""
            raise ValueError(f"params[{name!r}] has shape {tuple(value.shape)}, expected {shape}{hint}")
        name_dtype = dtype_name(value.dtype)
        if name_dtype not in ("float32", "float64"):
            raise TypeError(f"params[{name!r}] must be float32 or float64, got {name_dtype}")
        if dtype is None:
            dtype = name_dtype
        elif name_dtype != dtype:
            raise TypeError(f"params[{name!r}] is {name_dtype} but {first} is {dtype}; use one dtype")
    return dtype


def check_tokens(tokens: Any, vocab_size: int, context: int, context_name: str) -> None:
    """Integer tokens (B, T), non-empty, T <= ``context`` (named ``context_name`` in messages),
    every id in [0, vocab_size)."""
    if not is_integer_array(tokens):
        kind = dtype_name(getval(tokens).dtype) if is_array(tokens) else type(tokens).__name__
        raise TypeError(f"tokens must be an integer array of shape (B, T), got {kind}")
    if tokens.ndim != 2:
        raise ValueError(f"tokens must have shape (B, T), got shape {tuple(tokens.shape)}")
    if tokens.shape[1] > context:
        raise ValueError(f"tokens has T={tokens.shape[1]} positions but the model has {context_name}={context}")
    if tokens.shape[0] == 0 or tokens.shape[1] == 0:
        raise ValueError(f"tokens must be non-empty, got shape {tuple(tokens.shape)}")
    index_array(tokens, vocab_size, "tokens", "vocab_size")   # CuPy would wrap bad ids silently


def check_ops(ops: Any) -> None:
    """TypeError unless ``ops`` is an op set (``layers.REFERENCE``, ``fast.FAST``, ``traced(...)``)."""
    if not isinstance(ops, Ops):
        raise TypeError(f"ops must be a transformer_ref.layers.Ops (REFERENCE, FAST, ...), got {type(ops).__name__}")


def check_adapters(adapters: Any, params: Any, lora_config: Any, family: Family | None = None,
                   config: Any = None) -> dict[str, Any]:
    """Every adapter names a projection of the model and fits it; returns the unboxed dict.

    With ``family`` and ``config`` the names must be among ``family.projection_names(config)``;
    without them (``merge_adapters``, which has no config) a name must have the form of some
    registered family's projection and its weight must be in ``params``.
    """
    if lora_config is None:
        raise ValueError("adapters were given without lora_config (it holds their scale and fused-block flags)")
    if not isinstance(lora_config, LoraConfig):
        raise TypeError(f"lora_config must be a lora_ref.LoraConfig, got {type(lora_config).__name__}")
    raw = getval(adapters)
    if not isinstance(raw, Mapping):
        raise TypeError(f"adapters must be a dict {{module name: {{'A': array, 'B': array}}}}, got {type(raw).__name__}")
    raw_params = getval(params)
    known = families() if family is None else (family,)
    names = set(family.projection_names(config)) if family is not None else None
    dtype = next((dtype_name(getval(v).dtype) for v in raw_params.values() if is_array(getval(v))), None)
    out = {}
    for name, ad in raw.items():
        ad = getval(ad)
        ok = name in names if names is not None else any(f.is_projection(name) for f in known)
        if not ok or name + ".weight" not in raw_params:
            how = " or ".join(f.describe_projections() for f in known)
            raise ValueError(f"adapters has {name!r}, which is not a projection of this model; projections are "
                             f"named like {how}")
        if not isinstance(ad, Mapping) or set(ad) != {"A", "B"}:
            got = sorted(ad) if isinstance(ad, Mapping) else type(ad).__name__
            raise ValueError(f"adapters[{name!r}] must be a dict with exactly 'A' and 'B', got {got}")
        A, B = getval(ad["A"]), getval(ad["B"])
        for part, arr in (("A", A), ("B", B)):
            if not is_array(arr):
                raise TypeError(f"adapters[{name!r}][{part!r}] must be an array, got {type(arr).__name__}")
            if dtype is not None and dtype_name(arr.dtype) != dtype:
                raise TypeError(f"adapters[{name!r}][{part!r}] is {dtype_name(arr.dtype)} but params are {dtype}; use one dtype")
        d_out, d_in = getval(raw_params[name + ".weight"]).shape
        owner = family if family is not None else next(f for f in known if f.is_projection(name))
        r, enable = lora_config.rank_for(name), _enable(owner, lora_config, name)
        if enable is None:
            want_A, want_B = (r, d_in), (d_out, r)
        else:
            n, G = sum(enable), len(enable)
            want_A, want_B = (n * r, d_in), (n * (d_out // G), r)
        if tuple(A.shape) != want_A or tuple(B.shape) != want_B:
            flags = "" if enable is None else f", enable_lora={enable}"
            raise ValueError(f"adapters[{name!r}] has A {tuple(A.shape)} and B {tuple(B.shape)}; its weight is "
                             f"({d_out}, {d_in}) and lora_config gives rank {r}{flags}, so A must be {want_A} "
                             f"and B {want_B}")
        out[name] = {"A": A, "B": B}
    return out


def _enable(family: Family, lora_config: LoraConfig, name: str) -> tuple[bool, ...] | None:
    """``lora_config.enable_for(name)``, refused for a family without fused projections."""
    enable = lora_config.enable_for(name)
    if enable is not None and not family.has_fused:
        raise ValueError(f"lora_config.enable_lora applies to {name!r}, but enable_lora is loralib's flag for a fused "
                         f"projection (GPT-2's c_attn = [q; k; v]); {family.name}'s projections are separate modules: "
                         f"target them by name instead (e.g. target_modules={[family.target_name(s) for s in family.projections][:3]})")
    return enable


def check_dropout(dropout: Any, adapters: Any, params: Any, tokens_shape: tuple[int, int]) -> None:
    """``{module name: mask}`` with a mask only for adapted modules, each broadcastable to
    (B, T, d_in) of its projection."""
    if not isinstance(dropout, Mapping):
        raise TypeError(f"dropout must be a dict {{module name: mask}}, got {type(dropout).__name__}")
    have = set(getval(adapters)) if adapters is not None else set()
    for name, mask in dropout.items():
        if name not in have:
            raise ValueError(f"dropout has a mask for {name!r}, which has no adapter")
        d_in = getval(params[name + ".weight"]).shape[1]
        want = (int(tokens_shape[0]), int(tokens_shape[1]), d_in)
        try:
            ok = np.broadcast_shapes(tuple(mask.shape), want) == want
        except (ValueError, AttributeError):
            ok = False
        if not ok:
            shape = tuple(mask.shape) if hasattr(mask, "shape") else type(mask).__name__
            raise ValueError(f"dropout[{name!r}] has shape {shape}, which does not broadcast to (B, T, d_in) = {want}")
