"""LLaMA, a decoder hosting LoRA-wrapped projections: config, parameters, forward. Clean, minimal, reference.

    params       dict: Hugging Face LLaMA state-dict name -> array; projection weights (d_out, d_in)
    adapters     dict: module name (e.g. ``model.layers.0.self_attn.q_proj``) -> {"A": array, "B": array}
                 (+ "m" with DoRA; the embedding ``model.embed_tokens`` too), or a ``lora_ref.AdapterSet``
    lora_config  lora_ref.LoraConfig: rank, alpha, targeting, and per-module options
    ops          the op set the forward computes with: ``layers.REFERENCE`` unless you pass another

``forward(params, tokens, config, adapters, lora_config, dropout, ops)`` is a pure function with
GPT-2's signature (``gpt2.py``). Every projection is ``hosting.project``: ``ops.linear``, under
``REFERENCE`` :func:`lora_ref.lora_linear`'s Eq. 3 as the paper writes it, ``y = x W^T + b +
s ((x A^T) B^T)`` where an adapter exists. The seven LoRA-adaptable projections of a block are
``self_attn.{q,k,v,o}_proj`` and ``mlp.{gate,up,down}_proj``, nn.Linear weights already stored
(d_out, d_in) in Hugging Face checkpoints (PEFT's ``fan_in_fan_out`` is False).

The architecture is transformers' ``modeling_llama.py`` (LLaMA 1-3; Mistral and Qwen2 are the same
network, selected by ``model_type``): pre-RMSNorm blocks, rotary position embeddings (default
rope type, half-split ``rotate_half`` layout) on q and k, grouped-query causal attention scaled
by ``head_dim ** -0.5``, the SwiGLU MLP ``down(silu(gate(x)) * up(x))``, a final RMSNorm and an
output projection ``lm_head`` (or the token embedding, when ``tie_word_embeddings``). Settings
that would need another architecture (rope scaling, sliding windows, other activations) raise
``NotImplementedError`` naming the field. Where transformers computes in float32 inside a float64
model (RMSNorm, the RoPE tables, the eager softmax), the reference does not: see attention.py.

Shapes: B batch, T tokens, C = hidden_size, H query heads, Hk key/value heads, D = head_dim,
F = intermediate_size, V = vocab_size, r rank.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any

import numpy as np

from lora_ref.backend import asarray, float_dtype, namespace
from lora_ref.checks import boolean, generator, is_int, non_negative_real, positive_int, positive_real, probability
from lora_ref.lora import LoraConfig

from . import hosting
from .attention import rope_tables
from .layers import REFERENCE, Ops

__all__ = ["FAMILY", "INERT_KEYS", "MODEL_TYPES", "PROJECTIONS", "LlamaConfig", "forward", "init_params", "loss",
           "padding_idx", "param_shapes"]


# ============================================================================================
# Config: Hugging Face LlamaConfig's names and defaults (LLaMA-2 7B), config.json key for key
# ============================================================================================

MODEL_TYPES = ("llama", "mistral", "qwen2")
"""``model_type`` values read as this architecture. They differ only in which projections carry a
bias: LLaMA ``attention_bias`` (q, k, v, o) and ``mlp_bias`` (gate, up, down), both off by
default; Mistral none; Qwen2 q, k and v (transformers' Qwen2Attention: ``bias=True``), never o."""

# Keys of a config.json known not to change the network's function (metadata, token ids,
# generation and runtime settings, transformers 4.x's pretraining_tp, which splits the matmuls
# into slices: the same products in another order): kept in ``LlamaConfig.extra`` so that
# ``to_dict(from_dict(d)) == d`` up to the rope spelling, never read by the model (the sliding
# window keys once from_dict has checked that no window restricts attention; the rope keys are
# read into rope_theta). A key in neither this set nor the fields is kept, with a warning.
INERT_KEYS = frozenset({
    "model_type", "architectures", "transformers_version", "_name_or_path", "dtype", "torch_dtype",
    "use_cache", "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id",
    "id2label", "label2id", "num_labels", "problem_type", "return_dict", "output_attentions",
    "output_hidden_states", "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder",
    "tie_encoder_decoder", "tokenizer_class", "prefix", "finetuning_task", "torchscript", "use_bfloat16",
    "tf_legacy_loss", "pruned_heads", "attn_implementation", "max_length", "do_sample", "temperature",
    "top_k", "top_p", "pretraining_tp", "max_window_layers", "use_sliding_window", "sliding_window",
    "layer_types", "rope_scaling", "rope_theta", "rope_parameters",
})
_ROPE_KEYS = ("rope_theta", "rope_parameters", "rope_scaling")
# transformers' defaults where MistralConfig and Qwen2Config differ from LlamaConfig (a key absent
# from their config.json takes these)
_DEFAULTS = {
    "mistral": {"intermediate_size": 14336, "num_key_value_heads": 8, "max_position_embeddings": 4096 * 32},
    "qwen2": {"vocab_size": 151936, "intermediate_size": 22016, "num_key_value_heads": 32,
              "max_position_embeddings": 32768},
}


@dataclass(frozen=True)
class LlamaConfig:
    """Hyperparameters of a LLaMA-architecture decoder (Hugging Face ``LlamaConfig`` names).

    Parameters
    ----------
    vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads : int
        V, C, the MLP width F, the blocks L, the query heads H.
    num_key_value_heads : int or None
        Hk, dividing H (grouped-query attention; H for multi-head). None means H.
    head_dim : int or None
        D, even (RoPE rotates pairs); None means ``hidden_size // num_attention_heads`` (which must
        then divide exactly). q_proj is (H D, C), k_proj and v_proj (Hk D, C), o_proj (C, H D).
    hidden_act : str
        Must be ``"silu"`` (SwiGLU); anything else raises NotImplementedError.
    max_position_embeddings : int
        The longest sequence the forward accepts (positions 0 .. max - 1).
    initializer_range : float
        Standard deviation of the normal init (see :func:`init_params`).
    rms_norm_eps : float
        The epsilon inside RMSNorm's square root.
    rope_theta : float
        RoPE's base (LLaMA 2: 10000, LLaMA 3: 500000), transformers 5's ``rope_parameters
        ["rope_theta"]``; only the default rope type is implemented.
    tie_word_embeddings : bool
        The output projection is ``model.embed_tokens`` (no ``lm_head.weight``) when True.
    attention_bias, mlp_bias : bool
        Biases on q, k, v, o and on gate, up, down (LLaMA only; see :data:`MODEL_TYPES`).
    attention_dropout : float
        Recorded for round-tripping; the reference forward applies no dropout to the base model
        (it computes what transformers computes in ``eval()`` mode). LoRA dropout is separate.
    model_type : str
        One of :data:`MODEL_TYPES`.
    extra : mapping
        Every other ``config.json`` key, kept verbatim for :meth:`to_dict` and never used.
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    attention_dropout: float = 0.0
    model_type: str = "llama"
    extra: Mapping[str, Any] = field(default=None, compare=False, repr=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "max_position_embeddings"):
            set_(name, positive_int(getattr(self, name), name))
        H, C = self.num_attention_heads, self.hidden_size
        Hk = H if self.num_key_value_heads is None else positive_int(self.num_key_value_heads, "num_key_value_heads")
        if H % Hk:
            raise ValueError(f"num_attention_heads ({H}) must be divisible by num_key_value_heads ({Hk}): each "
                             "key/value head serves num_attention_heads / num_key_value_heads query heads")
        set_("num_key_value_heads", Hk)
        if self.head_dim is None:
            if C % H:
                raise ValueError(f"hidden_size ({C}) must be divisible by num_attention_heads ({H}) when head_dim "
                                 "is not given (head_dim = hidden_size // num_attention_heads)")
            set_("head_dim", C // H)
        set_("head_dim", positive_int(self.head_dim, "head_dim"))
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even (RoPE rotates pairs of channels), got {self.head_dim}")
        if self.hidden_act != "silu":
            raise NotImplementedError(f"hidden_act={self.hidden_act!r} is not implemented: LLaMA's MLP is SwiGLU "
                                      "(hidden_act='silu')")
        set_("rms_norm_eps", positive_real(self.rms_norm_eps, "rms_norm_eps"))
        set_("rope_theta", positive_real(self.rope_theta, "rope_theta"))
        set_("initializer_range", non_negative_real(self.initializer_range, "initializer_range"))
        set_("attention_dropout", probability(self.attention_dropout, "attention_dropout"))
        for name in ("tie_word_embeddings", "attention_bias", "mlp_bias"):
            set_(name, boolean(getattr(self, name), name))
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type must be one of {', '.join(MODEL_TYPES)}, got {self.model_type!r}")
        if self.model_type != "llama" and (self.attention_bias or self.mlp_bias):
            raise ValueError(f"attention_bias and mlp_bias are LLaMA settings; {self.model_type}'s biases are fixed "
                             f"by its architecture (model_type={self.model_type!r} needs both False)")
        set_("extra", hosting.config_extra(self, _ROPE_KEYS, "fields or rope settings"))

    # ---- derived sizes ----------------------------------------------------------------------

    @property
    def attn_scale(self) -> float:
        """``head_dim ** -0.5``, the factor on the attention scores (a Python float, as transformers')."""
        return self.head_dim ** -0.5

    def describe(self) -> str:
        """One line for reports: the family and the sizes (``lora-ref check`` prints it)."""
        return (f"{self.model_type}: {self.num_hidden_layers} layers, hidden_size {self.hidden_size}, "
                f"{self.num_attention_heads} heads ({self.num_key_value_heads} key/value) of {self.head_dim}, "
                f"intermediate_size {self.intermediate_size}, vocab {self.vocab_size}, "
                f"max_position_embeddings {self.max_position_embeddings}")

    def has_bias(self, projection: str) -> bool:
        """Whether projection ``projection`` (e.g. ``"self_attn.o_proj"``) has a bias (see :data:`MODEL_TYPES`)."""
        attention = projection.startswith("self_attn.")
        if self.model_type == "qwen2":
            return attention and not projection.endswith("o_proj")
        return self.attention_bias if attention else self.mlp_bias

    # ---- config.json ------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LlamaConfig:
        """A config from a Hugging Face LLaMA, Mistral or Qwen2 ``config.json`` dict.

        Known fields are validated; the rope settings may be spelled ``rope_theta`` (+ ``rope_scaling``,
        transformers 4) or ``rope_parameters`` (transformers 5). Settings that change the network
        and are not implemented raise ``NotImplementedError`` naming the field: a rope type other
        than ``"default"`` (``rope_scaling``, ``rope_parameters["rope_type"]``), a sliding window
        shorter than ``max_position_embeddings`` (Mistral's ``sliding_window``, Qwen2's
        ``use_sliding_window``). Keys in
        :data:`INERT_KEYS` are metadata; any other key is kept with a ``UserWarning`` naming it.
        """
        if not isinstance(d, Mapping):
            raise TypeError(f"from_dict needs a mapping (a parsed config.json), got {type(d).__name__}")
        model_type = d.get("model_type", "llama")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"config.json model_type must be one of {', '.join(MODEL_TYPES)}, got {model_type!r}")
        names = {f.name for f in fields(cls)} - {"extra", "model_type", "rope_theta"}
        if model_type != "llama":          # Mistral and Qwen2 have no such settings (transformers ignores them)
            names -= {"attention_bias", "mlp_bias"}
        kwargs = {**_DEFAULTS.get(model_type, {}), **{k: v for k, v in d.items() if k in names}}
        kwargs["rope_theta"] = _rope_theta(d)
        max_pos = kwargs.get("max_position_embeddings", cls.max_position_embeddings)
        _check_windows(d, model_type, max_pos)
        extra = {k: v for k, v in d.items() if k not in names and k not in _ROPE_KEYS}
        extra.pop("model_type", None)
        hosting.warn_unknown_keys(extra, INERT_KEYS, model_type, cls)
        return cls(**kwargs, model_type=model_type, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """The config as a Hugging Face ``config.json`` dict, as transformers 5 writes it (fields,
        ``rope_parameters = {"rope_theta": ..., "rope_type": "default"}``, then :attr:`extra`)."""
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)
                               if f.name not in ("extra", "rope_theta")}
        if self.model_type != "llama":
            out.pop("attention_bias")
            out.pop("mlp_bias")
        out["rope_parameters"] = {"rope_theta": self.rope_theta, "rope_type": "default"}
        out.update(self.extra)
        return out


def _rope_theta(d: Mapping[str, Any]) -> float:
    """RoPE's base from a config.json, which may spell it three ways; other rope types refused."""
    theta = d.get("rope_theta", LlamaConfig.rope_theta)
    for key in ("rope_scaling", "rope_parameters"):
        rope = d.get(key)
        if rope is None:
            continue
        if not isinstance(rope, Mapping):
            raise ValueError(f"config.json {key} must be an object or null, got {rope!r}")
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind != "default":
            raise NotImplementedError(f"config.json {key}: rope_type={kind!r} is not implemented (only the default "
                                      "rotary embedding is)")
        other = sorted(set(rope) - {"rope_type", "type", "rope_theta"})
        if other:
            raise NotImplementedError(f"config.json {key}: {other} are not implemented (the default rope type takes "
                                      "only rope_theta)")
        if "rope_theta" in rope:
            if "rope_theta" in d and d["rope_theta"] != rope["rope_theta"]:
                raise ValueError(f"config.json has rope_theta={d['rope_theta']!r} but {key}.rope_theta="
                                 f"{rope['rope_theta']!r}")
            theta = rope["rope_theta"]
    return theta


def _check_windows(d: Mapping[str, Any], model_type: str, max_pos: Any) -> None:
    """Sliding-window attention is not implemented: refuse a window that would restrict attention.

    Mistral always applies ``sliding_window`` (transformers' default 4096 when the key is absent);
    Qwen2 only with ``use_sliding_window`` (its ``layer_types`` and ``max_window_layers`` then pick
    the layers). A window of at least ``max_position_embeddings`` keys never restricts anything
    (key j is seen by query i when i - j < window, and i - j < T <= max_position_embeddings).
    """
    if model_type == "mistral":
        window, name = d.get("sliding_window", 4096), "sliding_window"
    elif model_type == "qwen2" and d.get("use_sliding_window", False):
        window, name = d.get("sliding_window", 4096), "use_sliding_window"
    else:
        return
    if window is not None and not (isinstance(max_pos, int) and isinstance(window, int) and window >= max_pos):
        raise NotImplementedError(f"config.json {name}: sliding-window attention (sliding_window={window!r} < "
                                  f"max_position_embeddings={max_pos!r}) is not implemented; only full causal "
                                  "attention is (a null window, or one of at least max_position_embeddings, is fine)")


# ============================================================================================
# Parameters: Hugging Face LLaMA state-dict names; projection weights (d_out, d_in)
# ============================================================================================

# The seven LoRA-adaptable projections of each block: module suffix -> (d_out, d_in), with
# H D the query width and Hk D the key/value width.
PROJECTIONS = MappingProxyType({
    "self_attn.q_proj": lambda c: (c.num_attention_heads * c.head_dim, c.hidden_size),
    "self_attn.k_proj": lambda c: (c.num_key_value_heads * c.head_dim, c.hidden_size),
    "self_attn.v_proj": lambda c: (c.num_key_value_heads * c.head_dim, c.hidden_size),
    "self_attn.o_proj": lambda c: (c.hidden_size, c.num_attention_heads * c.head_dim),
    "mlp.gate_proj": lambda c: (c.intermediate_size, c.hidden_size),
    "mlp.up_proj": lambda c: (c.intermediate_size, c.hidden_size),
    "mlp.down_proj": lambda c: (c.hidden_size, c.intermediate_size),
})


def param_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's name and shape, in state-dict order (transformers' module order).

    ``model.embed_tokens.weight`` (V, C)
    per block i, prefix ``model.layers.{i}.``:
        ``self_attn.q_proj.weight`` (H D, C), ``self_attn.k_proj.weight``, ``self_attn.v_proj.weight``
        (Hk D, C), ``self_attn.o_proj.weight`` (C, H D), each with a ``.bias`` (d_out,) where
        ``config.has_bias`` says so;
        ``mlp.gate_proj.weight``, ``mlp.up_proj.weight`` (F, C), ``mlp.down_proj.weight`` (C, F)
        (biases with ``mlp_bias``);
        ``input_layernorm.weight``, ``post_attention_layernorm.weight`` (C,)
    ``model.norm.weight`` (C,)
    ``lm_head.weight`` (V, C), unless ``tie_word_embeddings`` (then the head is embed_tokens).
    """
    FAMILY.check_config(config)
    C = config.hidden_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, C)}
    for i in range(config.num_hidden_layers):
        h = f"model.layers.{i}."
        for p, shape in PROJECTIONS.items():
            d_out, d_in = shape(config)
            shapes[h + p + ".weight"] = (d_out, d_in)
            if config.has_bias(p):
                shapes[h + p + ".bias"] = (d_out,)
        shapes[h + "input_layernorm.weight"] = shapes[h + "post_attention_layernorm.weight"] = (C,)
    shapes["model.norm.weight"] = (C,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, C)
    return shapes


def init_params(config: LlamaConfig, seed: int | np.random.Generator = 0, dtype: Any = "float64") -> dict[str, Any]:
    """Fresh LLaMA parameters: a dict keyed by state-dict names (see :func:`param_shapes`).

    transformers' initialisation (``LlamaPreTrainedModel._init_weights``): every projection weight
    and the embedding ~ N(0, initializer_range^2) (the embedding's ``pad_token_id`` row, if the
    config names one, zero), biases 0, RMSNorm weights 1. ``seed`` is an int or a
    ``numpy.random.Generator``; ``dtype`` float32 or float64. Arrays on the current backend.
    """
    FAMILY.check_config(config)
    rng = generator(seed, "seed")
    np_dtype = float_dtype(dtype)
    params = {}
    for name, shape in param_shapes(config).items():
        if name.endswith("norm.weight"):
            value = np.ones(shape)
        elif name.endswith(".bias"):
            value = np.zeros(shape)
        else:
            value = rng.normal(0.0, config.initializer_range, size=shape)
        if name == "model.embed_tokens.weight" and isinstance(config.extra.get("pad_token_id"), int) \
                and 0 <= config.extra["pad_token_id"] < config.vocab_size:
            value[config.extra["pad_token_id"]] = 0.0
        params[name] = asarray(value.astype(np_dtype))
    return params


# ============================================================================================
# The model
# ============================================================================================


def padding_idx(config: LlamaConfig, module: str = "model.embed_tokens") -> int | None:
    """The row of ``model.embed_tokens`` that gets no gradient: ``pad_token_id``, as transformers
    builds ``nn.Embedding(V, C, padding_idx=pad_token_id)`` (and PEFT's embedding adapter passes it
    to its A lookup too); negative ids count from the end, as PyTorch's. None without one."""
    pad, V = config.extra.get("pad_token_id"), config.vocab_size
    if pad is None or module != "model.embed_tokens":
        return None
    if not is_int(pad) or not -V <= pad < V:
        raise ValueError(f"config.json pad_token_id={pad!r} is not a row of the embedding (vocab_size={V}); "
                         "PyTorch's nn.Embedding refuses it as padding_idx")
    return int(pad) % V                              # a Python int, whatever integer type it came as


def forward(params: Mapping[str, Any], tokens: Any, config: LlamaConfig, adapters: Any = None,
            lora_config: LoraConfig | None = None, dropout: Mapping[str, Any] | None = None,
            ops: Ops = REFERENCE, *, adapter_names: Sequence[str] | None = None) -> Any:
    """Logits ``(B, T, V)`` for integer ``tokens`` ``(B, T)``: LLaMA, LoRA-adapted where adapters exist.

    params      dict of arrays from :func:`init_params` (or a loaded checkpoint)
    tokens      integer array (B, T), values in [0, vocab_size), T <= max_position_embeddings;
                token t sits at position t (no padding, no cache)
    adapters    ``{module name: {"A": (r, d_in), "B": (d_out, r)}}`` or None; every name must be one
                of the seven projections of a block, every shape must fit it; ``lora_config`` gives
                the scale (``scale_for``). With ``use_dora`` each also holds ``"m": (d_out,)``;
                ``model.embed_tokens`` takes ``{"A": (r, V), "B": (C, r)}`` (no dropout; its
                :func:`padding_idx` row gets no gradient; a tied head keeps the base table, as in
                PEFT). Or a ``lora_ref.AdapterSet`` (``lora_config`` None), as in GPT-2's forward
    dropout     ``{module name: mask}`` or None: LoRA dropout on that adapter's input, as explicit
                inverted-dropout masks broadcastable to (B, T, d_in) (``lora_ref.dropout_mask``);
                None means no dropout (evaluation). The base model has no dropout (eval mode).
    ops         the op set: ``layers.REFERENCE`` (default), ``fast.FAST``, ``layers.traced(...)``
    adapter_names  with an AdapterSet: one adapter name per row, ``"__base__"`` for none (PEFT's
                mixed batch); not with DoRA adapters
    """
    dtype = hosting.check_forward(FAMILY, config, params, tokens, adapters, lora_config, dropout, ops, adapter_names,
                                  "max_position_embeddings")
    p, H, Hk = params, config.num_attention_heads, config.num_key_value_heads
    # RoPE's tables for positions 0 .. T-1, once per forward: cos, sin (T, D), the model's dtype
    cos, sin = rope_tables(namespace(tokens).arange(tokens.shape[1]), config.head_dim, config.rope_theta, dtype)

    def linear(name, x):  # one projection, y = x W^T + b (+ s B A x where `name` has an adapter)
        return hosting.project(ops, p, name, x, adapters, lora_config, dropout, adapter_names=adapter_names)

    def norm(name, x):
        return ops.rms_norm(x, p[name + ".weight"], config.rms_norm_eps)

    def attn(h, x):
        q = ops.apply_rope(linear(h + ".self_attn.q_proj", x), cos, sin)           # (B, T, H D), rotated
        k = ops.apply_rope(linear(h + ".self_attn.k_proj", x), cos, sin)           # (B, T, Hk D), rotated
        v = linear(h + ".self_attn.v_proj", x)                                      # (B, T, Hk D)
        y = ops.grouped_query_attention(q, k, v, H, Hk, config.attn_scale)         # (B, T, H D)
        return linear(h + ".self_attn.o_proj", y)                                   # (B, T, C)

    def mlp(h, x):
        gated = ops.swiglu(linear(h + ".mlp.gate_proj", x), linear(h + ".mlp.up_proj", x))   # (B, T, F)
        return linear(h + ".mlp.down_proj", gated)                                            # (B, T, C)

    x = hosting.embed(ops, p, "model.embed_tokens", tokens, adapters, lora_config, family=FAMILY, config=config,
                      adapter_names=adapter_names)                                  # (B, T, C), FAMILY's padding_idx
    for i in range(config.num_hidden_layers):                                       # x: (B, T, C) throughout
        h = f"model.layers.{i}"
        x = x + attn(h, norm(h + ".input_layernorm", x))                            # pre-norm residual blocks
        x = x + mlp(h, norm(h + ".post_attention_layernorm", x))
    x = norm("model.norm", x)
    head = "model.embed_tokens.weight" if config.tie_word_embeddings else None      # tied: the base table
    return hosting.project(ops, p, "lm_head", x, weight=head)                      # (B, T, V)


def loss(params: Mapping[str, Any], tokens: Any, targets: Any, config: LlamaConfig, adapters: Any = None,
         lora_config: LoraConfig | None = None, dropout: Mapping[str, Any] | None = None, ops: Ops = REFERENCE, *,
         adapter_names: Sequence[str] | None = None) -> Any:
    """Mean next-token cross-entropy: a 0-d array, ``-(1/n) sum_t log p(targets_t | tokens_<=t)``.

    ``tokens`` (B, T) are the inputs and ``targets`` (B, T) the token expected at each position
    (for a sequence ``s`` of length T+1: ``tokens = s[:, :-1]``, ``targets = s[:, 1:]``); a target
    of -100 (``layers.IGNORE_INDEX``) leaves its position out. The other arguments are :func:`forward`'s.
    """
    logits = forward(params, tokens, config, adapters, lora_config, dropout, ops, adapter_names=adapter_names)
    return ops.cross_entropy(logits, targets)


FAMILY = hosting.Family(
    name="llama", config_type=LlamaConfig, block="model.layers.{i}", projections=PROJECTIONS,
    n_blocks=lambda config: config.num_hidden_layers, param_shapes=param_shapes, init_params=init_params,
    forward=forward, loss=loss, tied={"lm_head.weight": "model.embed_tokens.weight"},
    embeddings={"model.embed_tokens": lambda c: (c.vocab_size, c.hidden_size)}, padding_idx=padding_idx,
    matrix_types={"q": ("self_attn.q_proj", None), "k": ("self_attn.k_proj", None), "v": ("self_attn.v_proj", None),
                  "o": ("self_attn.o_proj", None), "gate": ("mlp.gate_proj", None), "up": ("mlp.up_proj", None),
                  "down": ("mlp.down_proj", None)})
"""LLaMA as the host sees it (``hosting.Family``): registered in ``transformer_ref/__init__.py``."""
