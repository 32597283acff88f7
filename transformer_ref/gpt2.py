"""GPT-2, a decoder hosting LoRA-wrapped projections: config, parameters, forward. Clean, minimal, reference.

    params       dict: Hugging Face GPT-2 state-dict name -> array; projection weights (d_out, d_in)
    adapters     dict: module name (e.g. ``transformer.h.0.attn.c_attn``) -> {"A": array, "B": array}
                 (+ "m" with DoRA; an embedding ``transformer.wte`` / ``.wpe`` too), or a
                 ``lora_ref.AdapterSet`` of several named adapters
    lora_config  lora_ref.LoraConfig: rank, alpha, targeting, and per-module options
    ops          the op set the forward computes with: ``layers.REFERENCE`` unless you pass another

``forward(params, tokens, config, adapters, lora_config, dropout, ops)`` is a pure function. Every
projection is ``ops.linear``, with ``REFERENCE`` :func:`lora_ref.lora_linear`'s Eq. 3 as the paper
writes it, ``y = x W^T + b + s ((x A^T) B^T)`` where an adapter exists, ``x W^T + b`` elsewhere;
``fast.FAST`` computes the same in the order that trains fastest. LoRA training differentiates
with respect to ``adapters`` alone, with ``params`` closed over, so autograd never computes a
gradient for a frozen weight. What every family shares (targeting, adapters, merging, input
validation) is in ``hosting.py``; Hugging Face checkpoints are read and written by ``checkpoints.py``.

The architecture is GPT-2's: pre-LayerNorm blocks, learned position embeddings, tanh-approximated
GELU, attention scaled by ``1/sqrt(head_dim)``, the output projection tied to the token embedding
(``lm_head`` is ``wte``) unless ``tie_word_embeddings`` is False (then ``lm_head.weight`` is its own
parameter: what merging an embedding adapter into ``wte`` gives, ``transformer_ref.adapting``).
Settings that would need another architecture are refused, not ignored.

Shapes: B batch, T tokens, C = n_embd, F = MLP width, V = vocab_size, r rank.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any

import numpy as np

from lora_ref.backend import asarray, float_dtype, namespace
from lora_ref.checks import boolean, generator, non_negative_real, positive_int, positive_real, probability
from lora_ref.lora import LoraConfig

from . import hosting
from .layers import REFERENCE, Ops

__all__ = ["FAMILY", "INERT_KEYS", "PROJECTIONS", "GPTConfig", "forward", "init_params", "loss", "param_shapes"]


# ============================================================================================
# Config: Hugging Face GPT2Config's names and defaults (GPT-2 small), config.json key for key
# ============================================================================================

# Keys of a Hugging Face GPT-2 config.json known not to change the network's function (metadata,
# token ids, the double-heads model's summary head, generation and runtime settings): kept in
# ``GPTConfig.extra`` so that ``to_dict(from_dict(d)) == d``, never read by the model. A key in
# neither this set nor the fields is kept as well, with a warning, as it might matter.
INERT_KEYS = frozenset({
    "model_type", "architectures", "transformers_version", "_name_or_path", "dtype", "torch_dtype",
    "use_cache", "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id",
    "summary_type", "summary_use_proj", "summary_activation", "summary_proj_to_labels",
    "summary_first_dropout", "task_specific_params", "id2label", "label2id", "num_labels", "_num_labels",
    "problem_type", "return_dict", "output_attentions", "output_hidden_states", "output_past",
    "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder", "tie_encoder_decoder",
    "tokenizer_class", "prefix", "finetuning_task", "n_ctx", "gradient_checkpointing", "torchscript",
    "use_bfloat16", "tf_legacy_loss", "pruned_heads", "attn_implementation", "max_length", "do_sample",
    "temperature", "top_k", "top_p",
})

# Hugging Face's aliases (GPT2Config.attribute_map): accepted on input when consistent.
_ALIASES = {"hidden_size": "n_embd", "max_position_embeddings": "n_positions",
            "num_attention_heads": "n_head", "num_hidden_layers": "n_layer"}

@dataclass(frozen=True)
class GPTConfig:
    """Hyperparameters of a GPT-2-architecture decoder (Hugging Face ``GPT2Config`` names).

    Parameters
    ----------
    vocab_size, n_positions, n_embd, n_layer, n_head : int
        Tokens V, context length, channels C, blocks L, heads H (``n_embd % n_head == 0``).
    n_inner : int or None
        MLP width F; None means ``4 * n_embd`` (GPT-2's choice).
    activation_function : str
        Must be ``"gelu_new"`` (GPT-2's tanh-approximated GELU); anything else is refused.
    resid_pdrop, embd_pdrop, attn_pdrop : float
        Recorded for round-tripping; the reference forward applies no dropout to the base model
        (it computes what Hugging Face computes in ``eval()`` mode). LoRA dropout is separate.
    layer_norm_epsilon : float
        The epsilon inside LayerNorm's square root.
    initializer_range : float
        Standard deviation of the normal init (0.02); see ``transformer_ref.init_params``.
    scale_attn_weights : bool
        Divide attention scores by ``sqrt(head_dim)`` (GPT-2: True).
    scale_attn_by_inverse_layer_idx : bool
        Also divide layer i's scores by ``i + 1`` (used by some GPT-2 variants).
    reorder_and_upcast_attn : bool
        In Hugging Face this changes only the order of operations under mixed precision; the
        function is the same, so it is recorded and has no effect here.
    tie_word_embeddings : bool
        True (GPT-2's): the output projection is ``wte``. False: it is its own ``lm_head.weight``
        (V, C), as after merging an embedding adapter into ``wte`` (``transformer_ref.untie``).
    add_cross_attention : bool
        Must be False (a decoder-only model).
    extra : mapping
        Every other ``config.json`` key, kept verbatim for :meth:`to_dict` and never used.
    """

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    reorder_and_upcast_attn: bool = False
    tie_word_embeddings: bool = True
    add_cross_attention: bool = False
    extra: Mapping[str, Any] = field(default=None, compare=False, repr=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            set_(name, positive_int(getattr(self, name), name))
        if self.n_inner is not None:
            set_("n_inner", positive_int(self.n_inner, "n_inner"))
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd must be divisible by n_head, got n_embd={self.n_embd}, n_head={self.n_head}")
        if self.activation_function != "gelu_new":
            raise ValueError(f"activation_function must be 'gelu_new' (GPT-2's tanh GELU), got {self.activation_function!r}")
        for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
            set_(name, probability(getattr(self, name), name))
        set_("layer_norm_epsilon", positive_real(self.layer_norm_epsilon, "layer_norm_epsilon"))
        set_("initializer_range", non_negative_real(self.initializer_range, "initializer_range"))
        for name in ("scale_attn_weights", "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn",
                     "tie_word_embeddings", "add_cross_attention"):
            set_(name, boolean(getattr(self, name), name))
        if self.add_cross_attention:
            raise ValueError("add_cross_attention must be False: this is a decoder-only model")
        extra = hosting.config_extra(self)
        if "n_ctx" in extra and extra["n_ctx"] != self.n_positions:
            raise ValueError(f"config.json has n_ctx={extra['n_ctx']!r} but n_positions={self.n_positions}; "
                             "they must agree (n_ctx is GPT-2's old name for the context length)")
        set_("extra", extra)

    # ---- derived sizes ----------------------------------------------------------------------

    @property
    def head_dim(self) -> int:
        """``n_embd // n_head``: the width of one attention head."""
        return self.n_embd // self.n_head

    @property
    def mlp_width(self) -> int:
        """F, the MLP's hidden width: ``n_inner`` or ``4 * n_embd``."""
        return 4 * self.n_embd if self.n_inner is None else self.n_inner

    def describe(self) -> str:
        """One line for reports: the family and the sizes (``lora-ref check`` prints it)."""
        return (f"GPT-2: {self.n_layer} layers, n_embd {self.n_embd}, n_head {self.n_head}, vocab {self.vocab_size}, "
                f"n_positions {self.n_positions}")

    def attn_scale(self, layer: int) -> float:
        """The factor on layer ``layer``'s attention scores, a Python float."""
        s = 1.0 / math.sqrt(self.head_dim) if self.scale_attn_weights else 1.0
        return s / (layer + 1) if self.scale_attn_by_inverse_layer_idx else s

    # ---- config.json ------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GPTConfig:
        """A config from a Hugging Face GPT-2 ``config.json`` dict.

        Known fields are validated; aliases (``hidden_size`` ...) are accepted when consistent;
        every other key is kept in :attr:`extra`. Settings that change the network, such as
        ``activation_function``, are fields and are refused when unsupported; keys in
        :data:`INERT_KEYS` are metadata; any other key is kept with a ``UserWarning`` naming it.
        ``model_type``, if present, must be ``"gpt2"``.
        """
        if not isinstance(d, Mapping):
            raise TypeError(f"from_dict needs a mapping (a parsed config.json), got {type(d).__name__}")
        names = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in d.items() if k in names}
        for alias, name in _ALIASES.items():
            if alias in d:
                if name in kwargs and kwargs[name] != d[alias]:
                    raise ValueError(f"config.json has {alias}={d[alias]!r} but {name}={kwargs[name]!r}")
                kwargs[name] = d[alias]
        extra = {k: v for k, v in d.items() if k not in names and k not in _ALIASES}
        if extra.get("model_type", "gpt2") != "gpt2":
            raise ValueError(f"config.json model_type must be 'gpt2', got {extra['model_type']!r}")
        hosting.warn_unknown_keys(extra, INERT_KEYS, "GPT-2", cls)
        return cls(**kwargs, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """The config as a Hugging Face GPT-2 ``config.json`` dict (fields, then :attr:`extra`;
        ``model_type`` is ``"gpt2"`` unless ``extra`` says otherwise)."""
        out: dict[str, Any] = {"model_type": "gpt2"}
        out.update({f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"})
        out.update(self.extra)
        return out


# ============================================================================================
# Parameters: Hugging Face GPT-2 state-dict names; projection weights (d_out, d_in)
# ============================================================================================

# The four LoRA-adaptable projections of each block: module suffix -> (d_out, d_in), for
# C = n_embd and F = MLP width. c_attn is fused q, k, v: its rows are [q; k; v], C each.
PROJECTIONS = MappingProxyType({
    "attn.c_attn": lambda config: (3 * config.n_embd, config.n_embd),
    "attn.c_proj": lambda config: (config.n_embd, config.n_embd),
    "mlp.c_fc": lambda config: (config.mlp_width, config.n_embd),
    "mlp.c_proj": lambda config: (config.n_embd, config.mlp_width),
})


def param_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's name and shape, in state-dict order. C = n_embd, F = mlp width, V = vocab.

    ``transformer.wte.weight`` (V, C) -- also the output projection when tied (no ``lm_head`` key)
    ``transformer.wpe.weight`` (n_positions, C)
    per block i, prefix ``transformer.h.{i}.``:
        ``ln_1.weight``, ``ln_1.bias`` (C,)
        ``attn.c_attn.weight`` (3C, C), ``attn.c_attn.bias`` (3C,)   rows [q; k; v]
        ``attn.c_proj.weight`` (C, C), ``attn.c_proj.bias`` (C,)
        ``ln_2.weight``, ``ln_2.bias`` (C,)
        ``mlp.c_fc.weight`` (F, C), ``mlp.c_fc.bias`` (F,)
        ``mlp.c_proj.weight`` (C, F), ``mlp.c_proj.bias`` (C,)
    ``transformer.ln_f.weight``, ``transformer.ln_f.bias`` (C,)
    ``lm_head.weight`` (V, C), only when ``tie_word_embeddings`` is False

    Projection weights are (d_out, d_in): the transpose of Hugging Face's Conv1D ``(d_in, d_out)``.
    """
    FAMILY.check_config(config)
    C = config.n_embd
    shapes: dict[str, tuple[int, ...]] = {
        "transformer.wte.weight": (config.vocab_size, C),
        "transformer.wpe.weight": (config.n_positions, C),
    }
    for i in range(config.n_layer):
        h = f"transformer.h.{i}."
        shapes[h + "ln_1.weight"] = shapes[h + "ln_1.bias"] = (C,)
        for p, shape in PROJECTIONS.items():
            if p == "mlp.c_fc":
                shapes[h + "ln_2.weight"] = shapes[h + "ln_2.bias"] = (C,)
            d_out, d_in = shape(config)
            shapes[h + p + ".weight"] = (d_out, d_in)
            shapes[h + p + ".bias"] = (d_out,)
    shapes["transformer.ln_f.weight"] = shapes["transformer.ln_f.bias"] = (C,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, C)
    return shapes


def init_params(config: GPTConfig, seed: int | np.random.Generator = 0, dtype: Any = "float64") -> dict[str, Any]:
    """Fresh GPT-2 parameters: a dict keyed by state-dict names (see :func:`param_shapes`).

    GPT-2's initialisation (Hugging Face ``GPT2PreTrainedModel._init_weights``): every weight and
    embedding ~ N(0, initializer_range^2), except the residual projections ``attn.c_proj`` and
    ``mlp.c_proj``, ~ N(0, (initializer_range / sqrt(2 n_layer))^2); biases 0; LayerNorm weight 1,
    bias 0. ``seed`` is an int or a ``numpy.random.Generator``; ``dtype`` float32 or float64.
    Arrays are created on the current backend. There is no ``lm_head.weight`` (it is ``wte``) unless
    the config unties it; then it is drawn last, ~ N(0, initializer_range^2) like the embeddings.
    """
    FAMILY.check_config(config)
    rng = generator(seed, "seed")
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


# ============================================================================================
# The model
# ============================================================================================


def forward(params: Mapping[str, Any], tokens: Any, config: GPTConfig, adapters: Any = None,
            lora_config: LoraConfig | None = None, dropout: Mapping[str, Any] | None = None,
            ops: Ops = REFERENCE, *, adapter_names: Sequence[str] | None = None) -> Any:
    """Logits ``(B, T, V)`` for integer ``tokens`` ``(B, T)``: GPT-2, LoRA-adapted where adapters exist.

    params      dict of arrays from :func:`init_params` (or a loaded checkpoint)
    tokens      integer array (B, T), values in [0, vocab_size), T <= n_positions
    adapters    ``{module name: {"A": (n r, d_in), "B": (n d_out / G, r)}}`` or None; every name
                must be a projection, every shape must fit it, ``lora_config`` gives the scale
                (``scale_for``) and fused-block flags (``enable_for``). With ``use_dora`` each also
                holds ``"m": (d_out,)`` (DoRA, ``ops.dora_linear``). ``transformer.wte`` /
                ``transformer.wpe`` take ``{"A": (r, V), "B": (C, r)}`` (``ops.lora_embedding``;
                the tied head keeps reading the base ``wte``, as in PEFT). Or a
                ``lora_ref.AdapterSet`` (``lora_config`` None): its active adapters summed per module
    dropout     ``{module name: mask}`` or None: LoRA dropout on that adapter's input, as explicit
                inverted-dropout masks broadcastable to (B, T, d_in) (``lora_ref.dropout_mask``);
                None means no dropout (evaluation). The base model has no dropout (eval mode).
    ops         the op set: ``layers.REFERENCE`` (default), ``fast.FAST``, ``layers.traced(...)``
    adapter_names  with an AdapterSet: one adapter name per row (``"__base__"`` for none), each
                row computed with its own adapter (PEFT's mixed batch); not with DoRA adapters
    """
    hosting.check_forward(FAMILY, config, params, tokens, adapters, lora_config, dropout, ops, adapter_names,
                          "n_positions")
    adapters = {} if adapters is None else adapters
    dropout = {} if dropout is None else dropout
    p = params

    def linear(name, x):  # one projection, y = x W^T + b (+ s B A x where `name` has an adapter)
        return hosting.project(ops, p, name, x, adapters, lora_config, dropout, adapter_names=adapter_names)

    def embed(name, ids):  # one lookup, E[ids] (+ s A^T[ids] B^T where `name` has an adapter)
        return hosting.embed(ops, p, name, ids, adapters, lora_config, family=FAMILY, config=config,
                             adapter_names=adapter_names)

    def ln(name, x):
        return ops.layer_norm(x, p[name + ".weight"], p[name + ".bias"], config.layer_norm_epsilon)

    def attn(h, i, x):
        qkv = linear(h + ".attn.c_attn", x)                                     # (B, T, 3C)
        y = ops.causal_attention(qkv, config.n_head, config.attn_scale(i))      # (B, T, C)
        return linear(h + ".attn.c_proj", y)                                    # (B, T, C)

    def mlp(h, x):
        return linear(h + ".mlp.c_proj", ops.gelu(linear(h + ".mlp.c_fc", x)))  # (B, T, F) -> (B, T, C)

    positions = namespace(tokens).arange(tokens.shape[1])               # (T,)
    x = embed("transformer.wte", tokens) + embed("transformer.wpe", positions)     # (B, T, C)
    for i in range(config.n_layer):                                             # x: (B, T, C) throughout
        h = f"transformer.h.{i}"
        x = x + attn(h, i, ln(h + ".ln_1", x))                                 # pre-LN residual blocks
        x = x + mlp(h, ln(h + ".ln_2", x))
    x = ln("transformer.ln_f", x)
    head = "transformer.wte.weight" if config.tie_word_embeddings else None         # tied: lm_head = base wte
    return hosting.project(ops, p, "lm_head", x, weight=head)                      # (B, T, V)


def loss(params: Mapping[str, Any], tokens: Any, targets: Any, config: GPTConfig, adapters: Any = None,
         lora_config: LoraConfig | None = None, dropout: Mapping[str, Any] | None = None, ops: Ops = REFERENCE, *,
         adapter_names: Sequence[str] | None = None) -> Any:
    """Mean next-token cross-entropy: a 0-d array, ``-(1/n) sum_t log p(targets_t | tokens_<=t)``.

    ``tokens`` (B, T) are the inputs and ``targets`` (B, T) the token expected at each position
    (usually ``tokens`` shifted left by one: for a sequence ``s`` of length T+1,
    ``tokens = s[:, :-1]``, ``targets = s[:, 1:]``). A target of -100 (``layers.IGNORE_INDEX``)
    leaves its position out of the mean, e.g. to score only the answer of a prompt.
    The other arguments are :func:`forward`'s.
    """
    logits = forward(params, tokens, config, adapters, lora_config, dropout, ops, adapter_names=adapter_names)
    return ops.cross_entropy(logits, targets)


FAMILY = hosting.Family(
    name="gpt2", config_type=GPTConfig, block="transformer.h.{i}", projections=PROJECTIONS,
    n_blocks=lambda config: config.n_layer, param_shapes=param_shapes, init_params=init_params,
    forward=forward, loss=loss, tied={"lm_head.weight": "transformer.wte.weight"},
    embeddings={"transformer.wte": lambda c: (c.vocab_size, c.n_embd), "transformer.wpe": lambda c: (c.n_positions, c.n_embd)},
    matrix_types={"q": ("attn.c_attn", 0), "k": ("attn.c_attn", 1), "v": ("attn.c_attn", 2),
                  "o": ("attn.c_proj", None), "mlp_in": ("mlp.c_fc", None), "mlp_out": ("mlp.c_proj", None)})
"""GPT-2 as the host sees it (``hosting.Family``): registered in ``transformer_ref/__init__.py``."""
