"""A GPT-2-architecture decoder whose projections are LoRA layers: clean, minimal, reference.

    params    dict: Hugging Face GPT-2 state-dict name -> array; projection weights (d_out, d_in)
    adapters  dict: module name (e.g. ``transformer.h.0.attn.c_attn``) -> {"A": array, "B": array}
    lora_config  lora_ref.LoraConfig: rank, alpha, targeting, and per-module options

``forward(params, tokens, config, adapters, lora_config)`` is a pure function. Every projection is
``lora_ref.lora_linear``'s Eq. 3: ``y = x W^T + b + s ((x A^T) B^T)`` where an adapter exists,
``x W^T + b`` elsewhere, computed by ``layers.linear`` (the same value up to rounding, in the order
that trains fastest; tests/transformer/test_speed_paths.py holds it to lora_linear). LoRA training
differentiates with respect to ``adapters`` alone, with ``params`` closed over, so autograd never
computes a gradient for a frozen weight.

Shapes: B batch, T tokens, C = n_embd, F = MLP width, V = vocab_size, r rank.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np

from lora_ref.backend import asarray, dtype_name, float_dtype, getval, namespace
from lora_ref.lora import LoraConfig, init_lora, merge

from .config import GPTConfig, _check_config, param_shapes, projection_names, projection_shape
from .count import count_parameters, count_trainable  # noqa: F401  (re-exported: the shape counters)
from .layers import _check_ids, _is_integer_array, ops

__all__ = ["add_adapters", "count_parameters", "count_trainable", "forward", "init_params", "loss",
           "merge_adapters"]


# ============================================================================================
# Parameters
# ============================================================================================


def init_params(config: GPTConfig, seed: int | np.random.Generator = 0, dtype: Any = "float64") -> dict[str, Any]:
    """Fresh GPT-2 parameters: a dict keyed by state-dict names (see ``config.param_shapes``).

    GPT-2's initialisation (Hugging Face ``GPT2PreTrainedModel._init_weights``): every weight and
    embedding ~ N(0, initializer_range^2), except the residual projections ``attn.c_proj`` and
    ``mlp.c_proj``, ~ N(0, (initializer_range / sqrt(2 n_layer))^2); biases 0; LayerNorm weight 1,
    bias 0. ``seed`` is an int or a ``numpy.random.Generator``; ``dtype`` float32 or float64.
    Arrays are created on the current backend. There is no ``lm_head.weight``: it is ``wte``.
    """
    _check_config(config)
    rng = _rng(seed, "seed")
    np_dtype = float_dtype(dtype)
    std = config.initializer_range
    params = {}
    for name, shape in param_shapes(config).items():
        if ".ln_" in name or name.startswith("transformer.ln_f"):
            value = np.ones(shape) if name.endswith(".weight") else np.zeros(shape)
        elif name.endswith(".bias"):
            value = np.zeros(shape)
        elif name.endswith(("attn.c_proj.weight", "mlp.c_proj.weight")):
            value = rng.normal(0.0, std / math.sqrt(2 * config.n_layer), size=shape)
        else:
            value = rng.normal(0.0, std, size=shape)
        params[name] = asarray(value.astype(np_dtype))
    return params


def add_adapters(params: Mapping[str, Any], config: GPTConfig, lora_config: LoraConfig,
                 rng: int | np.random.Generator = 0) -> dict[str, dict[str, Any]]:
    """Fresh adapters for every projection that ``lora_config`` targets: ``{module: {"A", "B"}}``.

    The projections are ``transformer.h.{i}.attn.c_attn`` (fused q, k, v; (3C, C)),
    ``.attn.c_proj`` (C, C), ``.mlp.c_fc`` (F, C) and ``.mlp.c_proj`` (C, F). A module is adapted
    when ``lora_config.targets(name)`` says so (PEFT's matching, ``layers_to_transform``); its rank
    is ``rank_for(name)``. For ``enable_for(name) = (q, k, v)`` flags (loralib MergedLinear) with
    n enabled of G blocks, A is (n r, d_in) and B is (n d_out / G, r), each block drawn on its own.
    A and B come from ``lora_ref.init_lora`` with ``lora_config.init`` (B = 0 unless "random"), in
    the dtype of ``params``, on the current backend. Raises ValueError if nothing is selected.
    """
    _check_config(config)
    if not isinstance(lora_config, LoraConfig):
        raise TypeError(f"lora_config must be a lora_ref.LoraConfig, got {type(lora_config).__name__}")
    _check_params(params, config)
    rng = _rng(rng, "rng")
    dtype = dtype_name(getval(params["transformer.wte.weight"]).dtype)
    names = projection_names(config)
    adapters = {}
    for name in names:
        if not lora_config.targets(name):
            continue
        d_out, d_in = projection_shape(config, name)
        r, enable = lora_config.rank_for(name), lora_config.enable_for(name)
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
            f"transformer.h.{{i}}.{{attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj}} for i in 0..{config.n_layer - 1}, "
            f"e.g. {', '.join(names[:4])}")
    return adapters


# ============================================================================================
# The model
# ============================================================================================


def forward(params: Mapping[str, Any], tokens: Any, config: GPTConfig, adapters: Mapping[str, Any] | None = None,
            lora_config: LoraConfig | None = None, dropout: Mapping[str, Any] | None = None) -> Any:
    """Logits ``(B, T, V)`` for integer ``tokens`` ``(B, T)``: GPT-2, LoRA-adapted where adapters exist.

    params      dict of arrays from :func:`init_params` (or a loaded checkpoint)
    tokens      integer array (B, T), values in [0, vocab_size), T <= n_positions
    adapters    ``{module name: {"A": (n r, d_in), "B": (n d_out / G, r)}}`` or None; every name
                must be a projection, every shape must fit it, ``lora_config`` gives the scale
                (``scale_for``) and fused-block flags (``enable_for``)
    dropout     ``{module name: mask}`` or None: LoRA dropout on that adapter's input, as explicit
                inverted-dropout masks broadcastable to (B, T, d_in) (``lora_ref.dropout_mask``);
                None means no dropout (evaluation). The base model has no dropout (eval mode).
    """
    _check_inputs(params, tokens, config, adapters, lora_config, dropout)
    adapters = {} if adapters is None else adapters
    dropout = {} if dropout is None else dropout
    p = params
    T = tokens.shape[1]

    def linear(name, x):  # one projection, y = x W^T + b (+ s B A x where `name` has an adapter)
        W, b = p[name + ".weight"], p[name + ".bias"]
        if name not in adapters:
            return ops.linear(x, W, None, None, 1.0, b)
        ad = adapters[name]
        return ops.linear(x, W, ad["A"], ad["B"], lora_config.scale_for(name), b, dropout.get(name),
                          lora_config.enable_for(name))

    def ln(name, x):
        return ops.layer_norm(x, p[name + ".weight"], p[name + ".bias"], config.layer_norm_epsilon)

    def attn(h, i, x):
        qkv = linear(h + ".attn.c_attn", x)                                     # (B, T, 3C)
        y = ops.causal_attention(qkv, config.n_head, config.attn_scale(i))      # (B, T, C)
        return linear(h + ".attn.c_proj", y)                                    # (B, T, C)

    def mlp(h, x):
        return linear(h + ".mlp.c_proj", ops.gelu(linear(h + ".mlp.c_fc", x)))  # (B, T, F) -> (B, T, C)

    positions = namespace(tokens).arange(T)                                     # (T,)
    x = ops.embedding(p["transformer.wte.weight"], tokens) + ops.embedding(p["transformer.wpe.weight"], positions)
    for i in range(config.n_layer):                                             # x: (B, T, C) throughout
        h = f"transformer.h.{i}"
        # x = x + attn(ln_1(x)), written branch first: when only the branch is traced (LoRA), the
        # traced value must be the left operand, as non-NumPy arrays refuse `array + autograd box`.
        x = attn(h, i, ln(h + ".ln_1", x)) + x
        x = mlp(h, ln(h + ".ln_2", x)) + x
    x = ln("transformer.ln_f", x)
    return ops.linear(x, p["transformer.wte.weight"], None, None, 1.0)          # (B, T, V): lm_head = wte


def loss(params: Mapping[str, Any], tokens: Any, targets: Any, config: GPTConfig,
         adapters: Mapping[str, Any] | None = None, lora_config: LoraConfig | None = None,
         dropout: Mapping[str, Any] | None = None) -> Any:
    """Mean next-token cross-entropy: a 0-d array.

    ``tokens`` (B, T) are the inputs and ``targets`` (B, T) the token expected at each position
    (usually ``tokens`` shifted left by one: for a sequence ``s`` of length T+1,
    ``tokens = s[:, :-1]``, ``targets = s[:, 1:]``). A target of -100 (``layers.IGNORE_INDEX``)
    leaves its position out of the mean, e.g. to score only the answer of a prompt.
    The other arguments are :func:`forward`'s.
    """
    return ops.cross_entropy(forward(params, tokens, config, adapters, lora_config, dropout), targets)


def merge_adapters(params: Mapping[str, Any], adapters: Mapping[str, Any], lora_config: LoraConfig) -> dict[str, Any]:
    """A new params dict with each adapter folded into its weight: ``W + s B A`` (Section 4.1).

    ``forward(merged, tokens, config)`` then equals ``forward(params, tokens, config, adapters,
    lora_config)`` up to rounding, at the cost of a plain model. Fused blocks follow
    ``lora_config.enable_for``; weights here are (d_out, d_in), so no transpose is involved
    whatever ``lora_config.fan_in_fan_out`` says (that flag describes a checkpoint's storage).
    """
    if not isinstance(lora_config, LoraConfig):
        raise TypeError(f"lora_config must be a lora_ref.LoraConfig, got {type(lora_config).__name__}")
    raw = _check_adapter_dict(adapters, params, lora_config)
    merged = dict(params)
    for name, ad in raw.items():
        W = params[name + ".weight"]
        merged[name + ".weight"] = merge(W, ad["A"], ad["B"], lora_config.scale_for(name),
                                         enable_lora=lora_config.enable_for(name))
    return merged


# ============================================================================================
# Validation: what is wrong, and where
# ============================================================================================


def _check_params(params: Any, config: GPTConfig) -> None:
    params = getval(params)
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a dict of arrays keyed by GPT-2 state-dict names, got {type(params).__name__}")
    shapes = param_shapes(config)
    missing = [k for k in shapes if k not in params]
    if missing:
        raise ValueError(f"params is missing {len(missing)} of {len(shapes)} parameters for this config, e.g. {missing[:3]}")
    extra = [k for k in params if k not in shapes]
    if extra:
        raise ValueError(f"params has names this config does not have: {sorted(extra)[:5]} "
                         f"(lm_head is tied to transformer.wte.weight and has no key)")
    dtype = None
    for name, shape in shapes.items():
        value = getval(params[name])
        if not hasattr(value, "shape") or not hasattr(value, "dtype"):
            raise TypeError(f"params[{name!r}] must be an array, got {type(value).__name__}")
        if tuple(value.shape) != shape:
            hint = " (projection weights are (d_out, d_in): transpose Hugging Face's Conv1D weights)" \
                if name.endswith(".weight") and tuple(value.shape) == shape[::-1] else ""
            raise ValueError(f"params[{name!r}] has shape {tuple(value.shape)}, expected {shape}{hint}")
        name_dtype = dtype_name(value.dtype)
        if name_dtype not in ("float32", "float64"):
            raise TypeError(f"params[{name!r}] must be float32 or float64, got {name_dtype}")
        if dtype is None:
            dtype = name_dtype
        elif name_dtype != dtype:
            raise TypeError(f"params[{name!r}] is {name_dtype} but transformer.wte.weight is {dtype}; use one dtype")


def _check_adapter_dict(adapters: Any, params: Any, lora_config: LoraConfig) -> dict[str, Any]:
    """Every adapter names an existing projection and fits it; returns the unboxed dict."""
    raw = getval(adapters)
    if not isinstance(raw, Mapping):
        raise TypeError(f"adapters must be a dict {{module name: {{'A': array, 'B': array}}}}, got {type(raw).__name__}")
    raw_params = getval(params)
    dtype = dtype_name(getval(raw_params["transformer.wte.weight"]).dtype) if "transformer.wte.weight" in raw_params else None
    out = {}
    for name, ad in raw.items():
        ad = getval(ad)
        is_projection = isinstance(name, str) and name.endswith(
            (".attn.c_attn", ".attn.c_proj", ".mlp.c_fc", ".mlp.c_proj"))
        if not is_projection or name + ".weight" not in raw_params:
            raise ValueError(f"adapters has {name!r}, which is not a projection of this model; "
                             f"projections are named like 'transformer.h.0.attn.c_attn' "
                             f"(attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj of each block)")
        if not isinstance(ad, Mapping) or set(ad) != {"A", "B"}:
            got = sorted(ad) if isinstance(ad, Mapping) else type(ad).__name__
            raise ValueError(f"adapters[{name!r}] must be a dict with exactly 'A' and 'B', got {got}")
        A, B = getval(ad["A"]), getval(ad["B"])
        for part, arr in (("A", A), ("B", B)):
            if not hasattr(arr, "shape") or not hasattr(arr, "dtype"):
                raise TypeError(f"adapters[{name!r}][{part!r}] must be an array, got {type(arr).__name__}")
            if dtype is not None and dtype_name(arr.dtype) != dtype:
                raise TypeError(f"adapters[{name!r}][{part!r}] is {dtype_name(arr.dtype)} but params are {dtype}; use one dtype")
        d_out, d_in = getval(raw_params[name + ".weight"]).shape
        r, enable = lora_config.rank_for(name), lora_config.enable_for(name)
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


def _check_inputs(params, tokens, config, adapters, lora_config, dropout) -> None:
    _check_config(config)
    _check_params(params, config)
    if not _is_integer_array(tokens):
        kind = dtype_name(tokens.dtype) if hasattr(tokens, "dtype") else type(tokens).__name__
        raise TypeError(f"tokens must be an integer array of shape (B, T), got {kind}")
    if tokens.ndim != 2:
        raise ValueError(f"tokens must have shape (B, T), got shape {tuple(tokens.shape)}")
    if tokens.shape[1] > config.n_positions:
        raise ValueError(f"tokens has T={tokens.shape[1]} positions but the model has n_positions={config.n_positions}")
    if tokens.shape[0] == 0 or tokens.shape[1] == 0:
        raise ValueError(f"tokens must be non-empty, got shape {tuple(tokens.shape)}")
    _check_ids(tokens, config.vocab_size, "tokens", "vocab_size")   # CuPy would wrap bad ids silently
    if adapters is not None:
        if lora_config is None:
            raise ValueError("adapters were given without lora_config (it holds their scale and fused-block flags)")
        if not isinstance(lora_config, LoraConfig):
            raise TypeError(f"lora_config must be a lora_ref.LoraConfig, got {type(lora_config).__name__}")
        _check_adapter_dict(adapters, params, lora_config)
    if dropout is not None:
        if not isinstance(dropout, Mapping):
            raise TypeError(f"dropout must be a dict {{module name: mask}}, got {type(dropout).__name__}")
        have = set(getval(adapters)) if adapters is not None else set()
        for name, mask in dropout.items():
            if name not in have:
                raise ValueError(f"dropout has a mask for {name!r}, which has no adapter")
            d_in = getval(params[name + ".weight"]).shape[1]
            want = (tokens.shape[0], tokens.shape[1], d_in)
            try:
                ok = np.broadcast_shapes(tuple(mask.shape), want) == want
            except (ValueError, AttributeError):
                ok = False
            if not ok:
                shape = tuple(mask.shape) if hasattr(mask, "shape") else type(mask).__name__
                raise ValueError(f"dropout[{name!r}] has shape {shape}, which does not broadcast to (B, T, d_in) = {want}")


def _rng(seed: Any, name: str) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"{name} must be an int seed or a numpy.random.Generator, got {type(seed).__name__}")
    return np.random.default_rng(int(seed))
