"""What every model family shares: its table of projections, LoRA targeting, adapters, validation.

A model family (``gpt2.py``, ``llama.py``) is one file that describes itself with a
:class:`Family` record -- its config class, the module prefix of block ``i``, its table of
LoRA-adaptable projections, its parameter shapes, ``init_params``, ``forward`` and ``loss`` --
and is registered once (``transformer_ref/__init__.py``). Everything a family would otherwise
write again lives here, written against that record:

* :func:`project` -- THE projection of every family's forward: base weight, bias, the module's
  adapter, its scale and fused-block flags, its dropout mask, computed by ``ops.linear`` (LoRA)
  or ``ops.dora_linear`` (DoRA). The one place a projection is computed, so a variant of LoRA
  lands here once for every family; :func:`embed`, likewise, the embedding lookup
  (``ops.lora_embedding`` where an embedding adapter exists);
* ``add_adapters`` and ``merge_adapters`` -- fresh adapters for every module a
  ``lora_ref.LoraConfig`` targets, and each adapter folded into its weight -- are in
  :mod:`transformer_ref.adapting` (split from this file to keep both under 600 lines);
* :func:`check_forward` (:func:`check_params`, :func:`check_tokens`, :func:`check_adapters`, ...) -- the
  validation a family's ``forward`` runs first, with messages that say what is wrong and where;
  :func:`config_extra` and :func:`warn_unknown_keys`, the config.json keys a family's config keeps
  without using them.

The containers are those of the whole package: ``params`` a dict of arrays keyed by Hugging Face
state-dict names, every projection weight stored ``(d_out, d_in)`` (``y = x W^T + b``: GPT-2's
Conv1D checkpoints are transposed once, by ``checkpoints``); ``adapters`` a dict keyed by module
name (a weight's name without ``.weight``) holding exactly ``{"A": (n r, d_in), "B": (n q, r)}``,
plus ``"m": (d_out,)`` with ``use_dora``; an embedding table's adapter ``{"A": (r, V), "B": (D, r)}``
(PEFT's layout, :mod:`lora_ref.embedding`). Several named adapters are a ``lora_ref.AdapterSet``,
accepted wherever one adapter dict is (each adapter with its own config; ``lora_config`` None).
"""

from __future__ import annotations

import re
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from functools import partial
from types import MappingProxyType
from typing import Any

from lora_ref.adapters import BASE, AdapterSet
from lora_ref.backend import dtype_name, getval, namespace
from lora_ref.checks import broadcasts_to, index_array, is_array, is_integer_array
from lora_ref.lora import LoraConfig

from .layers import Ops

__all__ = ["Family", "adapts", "check_adapter_names", "check_adapters", "check_dropout", "check_forward", "check_ops",
           "check_params", "check_tokens", "config_extra", "embed", "embedding_flag", "enable_flags", "families",
           "family_of", "is_4bit", "project", "register", "warn_unknown_keys"]


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
    embeddings    the LoRA-adaptable embedding tables: full module name -> ``shape(config) ->
                  (V, D)`` (GPT-2: ``"transformer.wte"``, ``"transformer.wpe"``), targeted by the
                  same LoraConfig rules as the projections
    padding_idx   ``padding_idx(config, module) -> int or None``: the row of an embedding that
                  gets no gradient (transformers' LLaMA: ``pad_token_id``), asked by :func:`embed`
                  when an adapter is on that table; None: never
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
    embeddings: Mapping[str, Callable[[Any], tuple[int, int]]] = field(default_factory=dict)
    padding_idx: Callable[[Any, str], int | None] | None = None

    def __post_init__(self) -> None:
        if "{i}" not in self.block:
            raise ValueError(f"Family.block must contain '{{i}}' (the block index), got {self.block!r}")
        object.__setattr__(self, "projections", MappingProxyType(dict(self.projections)))
        object.__setattr__(self, "tied", MappingProxyType(dict(self.tied)))
        object.__setattr__(self, "embeddings", MappingProxyType(dict(self.embeddings)))
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

    def adaptable_names(self, config: Any) -> list[str]:
        """Every module an adapter may sit on: the embedding tables, then the projections block by block."""
        self.check_config(config)
        return list(self.embeddings) + self.projection_names(config)

    def is_embedding(self, name: Any) -> bool:
        """Whether ``name`` is one of this family's adaptable embedding tables."""
        return isinstance(name, str) and name in self.embeddings

    def projection_shape(self, config: Any, module: str) -> tuple[int, int]:
        """``(d_out, d_in)`` of a projection, given its name or its suffix (``"mlp.c_fc"``); ``(V, D)``
        of an embedding table."""
        if self.is_embedding(module):
            return self.embeddings[module](config)
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


def project(ops: Ops, params: Mapping[str, Any], name: str, x: Any, adapters: Any = None,
            lora_config: LoraConfig | None = None, dropout: Mapping[str, Any] | None = None, *,
            weight: str | None = None, adapter_names: Sequence[str] | None = None) -> Any:
    """Module ``name`` applied to ``x`` (..., d_in) -> (..., d_out): ``y = x W^T + b``, plus
    ``s B (A (x * mask))`` (Eq. 3) where ``adapters`` has ``name``.

    ``W = params[name + ".weight"]`` (or ``params[weight]``, for a head tied to the embedding),
    ``b = params[name + ".bias"]`` if present; the adapter ``adapters[name]`` with the scale
    ``lora_config.scale_for(name)`` and fused-block flags ``enable_for(name)`` (loralib
    MergedLinear); ``dropout[name]``, the module's explicit inverted-dropout mask, if any. Computed
    by ``ops.linear`` (``lora_ref.lora_linear`` under REFERENCE), or by ``ops.dora_linear``
    (DoRA's Eq. 5, ``lora_ref.dora.dora_linear``) when the adapter holds a magnitude ``m``.
    ``adapters`` may be a ``lora_ref.AdapterSet``: see :func:`_set_terms` (and ``adapter_names``,
    one adapter name per batch row). No checks: the family's forward has validated params,
    adapters and masks once (``check_params``, ``check_adapters``, ``check_dropout``).
    """
    W = params[name + ".weight" if weight is None else weight]
    b = params.get(name + ".bias")
    if is_4bit(W):                  # QLoRA: a frozen 4-bit base, dequantised per forward (docs/quant.md)
        from lora_ref.precision import mixed_linear
        from lora_ref.quant import base_weight

        W, compute = base_weight(W, x)
        ops = ops if compute is None else replace(ops, linear=partial(mixed_linear, compute_dtype=compute))
    if isinstance(adapters, AdapterSet):
        return _set_terms(adapters, name, adapter_names, W, base=lambda: ops.linear(x, W, None, None, 1.0, b),
                          one=lambda ad, lc: _adapted(ops, x, W, b, ad, lc.scale_for(name), lc.enable_for(name)),
                          delta=lambda ad, lc: _delta(ops, x, W, ad, lc.scale_for(name), lc.enable_for(name)))
    ad = None if adapters is None else adapters.get(name)
    if ad is None:
        return ops.linear(x, W, None, None, 1.0, b)
    mask = None if dropout is None else dropout.get(name)
    return _adapted(ops, x, W, b, ad, lora_config.scale_for(name), lora_config.enable_for(name), mask)


def _adapted(ops: Ops, x: Any, W: Any, b: Any, ad: Any, s: float, enable: Any, mask: Any = None) -> Any:
    """One adapter's projection: DoRA's Eq. 5 when it holds a magnitude ``m``, else LoRA's Eq. 3."""
    if "m" in ad:
        return ops.dora_linear(x, W, ad["A"], ad["B"], ad["m"], s, b, mask)    # m (W + s B A) / ||W + s B A||
    return ops.linear(x, W, ad["A"], ad["B"], s, b, mask, enable)              # W x + b + s B A x


def _delta(ops: Ops, x: Any, W: Any, ad: Any, s: float, enable: Any) -> Any:
    """One adapter's term relative to the base layer, when several are summed: ``s B A x`` (exactly
    lora_linear's adapter branch), or for DoRA ``y_dora - x W^T`` (docs/dora.md: each adapter
    contributes its own change of the base layer's output, whatever the order)."""
    if "m" in ad:
        return ops.dora_linear(x, W, ad["A"], ad["B"], ad["m"], s) - ops.linear(x, W, None, None, 1.0)
    return ops.lora_delta(x, ad["A"], ad["B"], s, None, enable)


def _set_terms(aset: AdapterSet, module: str, adapter_names: Sequence[str] | None, like: Any, *,
               base: Callable[[], Any], one: Callable[..., Any], delta: Callable[..., Any]) -> Any:
    """Module ``module`` under an adapter set (``lora_ref.adapters``' (S0)-(S2), per module).

    Without ``adapter_names``: the active adapters that adapt this module. None: ``base()``; one:
    ``one(arrays, config)``, the single-adapter computation itself (so a set with one active
    adapter is that adapter's model, bit for bit); several: ``base() + sum_k delta_k`` in the
    active order (S1). With ``adapter_names`` (one name per batch row, ``"__base__"`` for none;
    the active names are not consulted, as in PEFT): (S2), ``base() + sum_a delta_a * pick_a``
    with ``pick_a`` (N, 1, 1) one on adapter a's rows and zero elsewhere: ``v * 1 = v`` and
    ``v + 0 = v`` exactly, so each row is what that row alone with its adapter gives.
    """
    if adapter_names is None:
        terms = aset.terms(module)
        if len(terms) == 1:
            return one(terms[0][1], terms[0][2])
        y = base()
        for _, ad, lc in terms:                                            # (S1), in activation order
            y = y + delta(ad, lc)
        return y
    xp, dtype, n = namespace(getval(like)), getval(like).dtype, len(adapter_names)
    y = base()
    for name in dict.fromkeys(adapter_names):                              # (S2), first appearance order
        for _, ad, lc in aset.terms(module, (name,)):
            pick = xp.reshape(xp.asarray([1.0 if a == name else 0.0 for a in adapter_names], dtype=dtype), (n, 1, 1))
            y = y + delta(ad, lc) * pick                                   # (N, T, d): zero off its rows
    return y


def adapts(adapters: Any, module: str) -> bool:
    """Whether ``adapters`` (an adapter dict, an AdapterSet or None) has an adapter on ``module``."""
    raw = getval(adapters)
    if isinstance(raw, AdapterSet):
        return any(module in raw.modules(n) for n in raw.names)
    return raw is not None and module in raw


def is_4bit(value: Any) -> bool:
    """Whether ``value`` is a ``lora_ref.quant.QuantState`` (a QLoRA 4-bit weight), without importing
    lora_ref.quant (and ml_dtypes, about a second): if it was never imported, no state exists."""
    quant = sys.modules.get("lora_ref.quant")
    return quant is not None and isinstance(value, quant.QuantState)


def embed(ops: Ops, params: Mapping[str, Any], name: str, ids: Any, adapters: Any = None,
          lora_config: LoraConfig | None = None, *, family: Family | None = None, config: Any = None,
          adapter_names: Sequence[str] | None = None) -> Any:
    """Rows of the embedding table ``E = params[name + ".weight"]`` (V, C) for integer ``ids`` (...):
    (..., C), by ``ops.embedding`` (ids checked in range there); where ``adapters`` has ``name``,
    ``E[ids] + s (A^T[ids]) B^T`` by ``ops.lora_embedding`` (:mod:`lora_ref.embedding`: no
    dropout on this path, as in PEFT; row ``family.padding_idx(config, name)`` of E and that
    column of A get no gradient, asked only when an adapter is on ``name``).
    A ``lora_ref.AdapterSet`` as in :func:`project`; an adapter's term alone is
    ``lora_embedding(ids, 0, A, B, s)`` (the zero table: ``0 + v = v`` exactly)."""
    E = params[name + ".weight"]
    if not adapts(adapters, name):
        return ops.embedding(E, ids)                                    # no adapter on this table
    pad = None if family is None or family.padding_idx is None else family.padding_idx(config, name)
    if isinstance(adapters, AdapterSet):
        def delta(ad, lc):  # one adapter's term, on the zero table (V, C): built only when terms are summed
            zero = namespace(getval(E)).zeros(getval(E).shape, dtype=getval(E).dtype)
            return ops.lora_embedding(ids, zero, ad["A"], ad["B"], lc.scale_for(name), pad)
        return _set_terms(adapters, name, adapter_names, E, base=lambda: ops.embedding(E, ids), delta=delta,
                          one=lambda ad, lc: ops.lora_embedding(ids, E, ad["A"], ad["B"], lc.scale_for(name), pad))
    ad = adapters.get(name)
    if ad is None:
        return ops.embedding(E, ids)
    return ops.lora_embedding(ids, E, ad["A"], ad["B"], lora_config.scale_for(name), pad)   # (E1)


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
# Validation: what is wrong, and where
# ============================================================================================


def config_extra(config: Any, reserved: Sequence[str] = (), what: str = "fields") -> Mapping[str, Any]:
    """A family config's ``extra`` (every other config.json key), checked: a mapping that repeats
    none of the config's fields nor ``reserved`` (``what`` names them), as a read-only copy."""
    extra = {} if config.extra is None else config.extra
    if not isinstance(extra, Mapping):
        raise TypeError(f"extra must be a mapping of config.json keys, got {type(extra).__name__}")
    clash = sorted(set(extra) & ({f.name for f in fields(config)} | set(reserved)))
    if clash:
        raise ValueError(f"extra must not repeat {type(config).__name__} {what}, got {clash}")
    return MappingProxyType(dict(extra))


def warn_unknown_keys(extra: Mapping[str, Any], inert: frozenset[str], settings: str, config_type: type) -> None:
    """A ``UserWarning`` (pointing at the caller's caller, who called ``from_dict``) naming the keys
    of ``extra`` that are neither fields nor known metadata (``inert``): kept, with no effect."""
    unknown = sorted(k for k in extra if k not in inert)
    if unknown:
        warnings.warn(f"config.json keys {unknown} are not {settings} settings transformer_ref knows; they are kept "
                      f"in {config_type.__name__}.extra and have no effect on the model", stacklevel=3)


def check_forward(family: Family, config: Any, params: Any, tokens: Any, adapters: Any, lora_config: Any,
                  dropout: Any, ops: Any, adapter_names: Any, context: str) -> str:
    """What every family's ``forward`` checks first, in this order: params, tokens (at most
    ``getattr(config, context)`` positions), adapters, dropout masks, adapter_names, ops.
    Returns the params' dtype name (:func:`check_params`)."""
    dtype = check_params(params, family, config)
    check_tokens(tokens, config.vocab_size, getattr(config, context), context)
    if adapters is not None:
        check_adapters(adapters, params, lora_config, family, config)
    if dropout is not None:
        check_dropout(dropout, adapters, params, tuple(tokens.shape))
    check_adapter_names(adapter_names, adapters, tokens.shape[0])
    check_ops(ops)
    return dtype


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
        tied = "".join(f" ({k} is tied to {v} and has no key; merge_adapters adds it when it merges an embedding "
                       f"adapter into a tied table: run such params with transformer_ref.untie(config))"
                       for k, v in family.tied.items() if k in extra)
        raise ValueError(f"params has names this config does not have: {sorted(extra)[:5]}{tied}")
    dtype = None
    first = next(iter(shapes))
    for name, shape in shapes.items():
        value = getval(params[name])
        if is_4bit(value):                             # QLoRA's frozen 4-bit base: projections and lm_head
            if not (family.is_projection(name.removesuffix(".weight")) or name == "lm_head.weight") or value.shape != shape:
                raise ValueError(f"params[{name!r}] is a 4-bit QuantState of shape {value.shape}; only projection "
                                 f"weights and lm_head.weight may be, with their (d_out, d_in) = {shape}")
            continue
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
                   config: Any = None) -> Any:
    """Every adapter names an adaptable module of the model and fits it; returns the unboxed dict
    (or, for a ``lora_ref.AdapterSet``, the set, after checking each adapter with its own config).

    With ``family`` and ``config`` the names must be among ``family.adaptable_names(config)``;
    without them (``merge_adapters``, which has no config) a name must have the form of some
    registered family's projection (or be one of its embeddings) and its weight must be in ``params``.
    """
    raw = getval(adapters)
    if isinstance(raw, AdapterSet):
        if lora_config is not None:
            raise ValueError("lora_config must be None when adapters is an AdapterSet: each of its adapters has its own")
        for name in raw.names:
            _check_one(raw.modules(name), params, raw.config(name), family, config, f"adapter {name!r}: ")
        return raw
    if lora_config is None:
        raise ValueError("adapters were given without lora_config (it holds their scale and fused-block flags)")
    if not isinstance(lora_config, LoraConfig):
        raise TypeError(f"lora_config must be a lora_ref.LoraConfig, got {type(lora_config).__name__}")
    if not isinstance(raw, Mapping):
        raise TypeError(f"adapters must be a dict {{module name: {{'A': array, 'B': array}}}} or a lora_ref.AdapterSet, "
                        f"got {type(raw).__name__}")
    return _check_one(raw, params, lora_config, family, config, "")


def _check_one(raw: Mapping[str, Any], params: Any, lora_config: LoraConfig, family: Family | None, config: Any,
               where: str) -> dict[str, Any]:
    """:func:`check_adapters` for one adapter dict; ``where`` prefixes every message."""
    raw_params = getval(params)
    known = families() if family is None else (family,)
    names = set(family.adaptable_names(config)) if family is not None else None
    dtype = next((dtype_name(getval(v).dtype) for v in raw_params.values() if is_array(getval(v))), None)
    out = {}
    for name, ad in raw.items():
        ad = getval(ad)
        owner = next((f for f in known if f.is_projection(name) or f.is_embedding(name)), None)
        ok = name in names if names is not None else owner is not None
        if not ok or name + ".weight" not in raw_params:
            how = " or ".join(f.describe_projections() for f in known)
            tables = ", ".join(e for f in known for e in f.embeddings)
            raise ValueError(f"{where}adapters has {name!r}, which is not a projection of this model; projections are "
                             f"named like {how}" + (f"; embedding tables are {tables}" if tables else ""))
        table = embedding_flag(owner, lora_config, name, where)
        keys = {"A", "B", "m"} if lora_config.use_dora and not table else {"A", "B"}
        if not isinstance(ad, Mapping) or set(ad) != keys:
            got = sorted(ad) if isinstance(ad, Mapping) else type(ad).__name__
            why = " (lora_config.use_dora: A, B and the magnitude m)" if "m" in keys else \
                " (m is DoRA's magnitude: set use_dora in lora_config)" if isinstance(ad, Mapping) and "m" in ad else ""
            want = " and ".join(", ".join(repr(k) for k in sorted(keys)).rsplit(", ", 1))
            raise ValueError(f"{where}adapters[{name!r}] must be a dict with exactly {want}{why}, got {got}")
        arrays = {k: getval(ad[k]) for k in sorted(keys)}
        for part, arr in arrays.items():
            if not is_array(arr):
                raise TypeError(f"{where}adapters[{name!r}][{part!r}] must be an array, got {type(arr).__name__}")
            if dtype is not None and dtype_name(arr.dtype) != dtype:
                raise TypeError(f"{where}adapters[{name!r}][{part!r}] is {dtype_name(arr.dtype)} but params are {dtype}; "
                                "use one dtype")
        d_out, d_in = getval(raw_params[name + ".weight"]).shape
        r, enable = lora_config.rank_for(name), enable_flags(owner, lora_config, name)
        if table:                                          # E (V, D): A (r, V), B (D, r), PEFT's layout
            want = {"A": (r, d_out), "B": (d_in, r)}
        elif enable is None:
            want = {"A": (r, d_in), "B": (d_out, r), "m": (d_out,)}
        else:
            n, G = sum(enable), len(enable)
            want = {"A": (n * r, d_in), "B": (n * (d_out // G), r)}
        if any(tuple(arr.shape) != want[k] for k, arr in arrays.items()):
            got = " and ".join(f"{k} {tuple(arr.shape)}" for k, arr in arrays.items())
            flags = "" if enable is None else f", enable_lora={enable}"
            kind = "its table (V, D) is" if table else "its weight is"
            raise ValueError(f"{where}adapters[{name!r}] has {got}; {kind} ({d_out}, {d_in}) and lora_config gives rank "
                             f"{r}{flags}, so A must be " + " and ".join(f"{k} {want[k]}" for k in arrays)[2:])
        out[name] = arrays
    return out


def embedding_flag(family: Family, lora_config: LoraConfig, name: str, where: str = "") -> bool:
    """Whether module ``name`` is an embedding table, which the family and ``lora_config.embedding_modules``
    must agree on (the config records the adapter's layout, A (r, V) and B (D, r), for the files that
    store it: ``save_peft_adapter`` writes ``lora_embedding_A/B`` from it). DoRA on one is refused."""
    table = family.is_embedding(name)
    if table and lora_config.use_dora:
        raise ValueError(f"{where}lora_config adapts {name!r}, an embedding, with use_dora: DoRA on an embedding (PEFT's "
                         "norm over the vocabulary axis) is not implemented; adapt the embedding without use_dora, or "
                         "leave it out of target_modules")
    if table and not lora_config.is_embedding(name):
        raise ValueError(f"{where}lora_config adapts {name!r}, an embedding table, which its embedding_modules does not "
                         f"list; add it (e.g. embedding_modules=[{name.rsplit('.', 1)[-1]!r}]): the config records which "
                         "adapters have the embedding layout A (r, V), B (D, r), as PEFT's files do")
    if not table and lora_config.is_embedding(name):
        raise ValueError(f"{where}lora_config.embedding_modules {list(lora_config.embedding_modules)} matches {name!r}, "
                         f"which is not an embedding table of {family.name} (its tables: {', '.join(family.embeddings)})")
    return table


def enable_flags(family: Family, lora_config: LoraConfig, name: str) -> tuple[bool, ...] | None:
    """``lora_config.enable_for(name)``, refused for an embedding and for a family without fused projections."""
    enable = lora_config.enable_for(name)
    if enable is not None and family.is_embedding(name):
        raise ValueError(f"lora_config.enable_lora applies to {name!r}, an embedding table; enable_lora is loralib's "
                         "flag for a fused projection (GPT-2's c_attn = [q; k; v])")
    if enable is not None and not family.has_fused:
        raise ValueError(f"lora_config.enable_lora applies to {name!r}, but enable_lora is loralib's flag for a fused "
                         f"projection (GPT-2's c_attn = [q; k; v]); {family.name}'s projections are separate modules: "
                         f"target them by name instead (e.g. target_modules={[family.target_name(s) for s in family.projections][:3]})")
    return enable


def check_dropout(dropout: Any, adapters: Any, params: Any, tokens_shape: tuple[int, int]) -> None:
    """``{module name: mask}`` with a mask only for adapted projections, each broadcastable to
    (B, T, d_in) of its projection (an embedding adapter takes none, as in PEFT; an AdapterSet
    none at all: a set is for inference)."""
    if not isinstance(dropout, Mapping):
        raise TypeError(f"dropout must be a dict {{module name: mask}}, got {type(dropout).__name__}")
    if isinstance(getval(adapters), AdapterSet):
        raise ValueError("dropout masks cannot be given with an AdapterSet: a set of adapters is for inference "
                         "(train one adapter dict at a time)")
    have = set(getval(adapters)) if adapters is not None else set()
    for name, mask in dropout.items():
        if name not in have:
            raise ValueError(f"dropout has a mask for {name!r}, which has no adapter")
        if any(f.is_embedding(name) for f in families()):
            raise ValueError(f"dropout has a mask for {name!r}, an embedding: LoRA on an embedding has no dropout "
                             "(PEFT and loralib apply none on this path)")
        d_in = getval(params[name + ".weight"]).shape[1]
        want = (int(tokens_shape[0]), int(tokens_shape[1]), d_in)
        if not (hasattr(mask, "shape") and broadcasts_to(mask.shape, want)):
            shape = tuple(mask.shape) if hasattr(mask, "shape") else type(mask).__name__
            raise ValueError(f"dropout[{name!r}] has shape {shape}, which does not broadcast to (B, T, d_in) = {want}")


def check_adapter_names(adapter_names: Any, adapters: Any, batch: int) -> None:
    """``adapter_names`` (a mixed batch): one name per batch row, each an adapter of the AdapterSet
    ``adapters`` or ``"__base__"``, none of them DoRA (PEFT refuses that too)."""
    if adapter_names is None:
        return
    aset = getval(adapters)
    if not isinstance(aset, AdapterSet):
        raise TypeError(f"adapter_names names adapters of a lora_ref.AdapterSet; adapters is {type(aset).__name__}")
    if isinstance(adapter_names, (str, bytes)) or not isinstance(adapter_names, Sequence):
        raise TypeError(f"adapter_names must be a list of adapter names, one per batch row, got {adapter_names!r}")
    if len(adapter_names) != batch:
        raise ValueError(f"adapter_names has {len(adapter_names)} names but the batch has {batch} rows (one name each, "
                         f"{BASE!r} for no adapter)")
    for i, n in enumerate(adapter_names):
        if n != BASE and n not in aset:
            raise ValueError(f"adapter_names[{i}] = {n!r} is not an adapter of the set (known: "
                             f"{', '.join(map(repr, aset.names))}, or {BASE!r} for none)")
    dora = aset.uses_dora(list(dict.fromkeys(adapter_names)))
    if dora:
        raise ValueError(f"adapter_names: a mixed batch cannot use DoRA adapters ({', '.join(map(repr, dora))}): "
                         "PEFT refuses it ('Cannot pass `adapter_names` when DoRA is enabled'); run their rows as "
                         "separate batches with the adapter active")
