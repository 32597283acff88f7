"""GPTConfig: the shape of a GPT-2-architecture model, with Hugging Face ``config.json`` names.

The field names and defaults are those of ``transformers.GPT2Config`` (GPT-2 small: 12 layers,
768 channels, 12 heads, 50257 tokens, 1024 positions), so a Hugging Face ``config.json`` maps
onto it key for key (:meth:`GPTConfig.from_dict` / :meth:`GPTConfig.to_dict`).

The architecture is fixed to what GPT-2 does: pre-LayerNorm blocks, learned position
embeddings, tanh-approximated GELU (``activation_function="gelu_new"``), attention scaled by
``1/sqrt(head_dim)``, and the output projection tied to the token embedding (``lm_head`` is
``wte``). Settings that would need a different architecture are refused, not ignored.

This module also fixes the parameter names (:func:`param_shapes`) -- Hugging Face GPT-2
state-dict names -- and which of them are LoRA-adaptable projections (:func:`projection_names`).
Projection weights are stored ``(d_out, d_in)`` (``y = x @ W.T + b``), the transpose of GPT-2's
``Conv1D`` storage; loaders and savers transpose once at the file boundary.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any

__all__ = ["GPTConfig", "INERT_KEYS", "PROJECTIONS", "param_shapes", "projection_names"]

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

# The four LoRA-adaptable projections of each block: (module suffix, d_out, d_in) as functions of
# (C = n_embd, F = MLP width). c_attn is fused q, k, v: its rows are [q; k; v], C each.
PROJECTIONS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


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
        Must be True: the output projection is ``wte``.
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
            set_(name, _positive_int(getattr(self, name), name))
        if self.n_inner is not None:
            set_("n_inner", _positive_int(self.n_inner, "n_inner"))
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd must be divisible by n_head, got n_embd={self.n_embd}, n_head={self.n_head}")
        if self.activation_function != "gelu_new":
            raise ValueError(f"activation_function must be 'gelu_new' (GPT-2's tanh GELU), got {self.activation_function!r}")
        for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
            p = _real(getattr(self, name), name)
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {p!r}")
            set_(name, p)
        eps = _real(self.layer_norm_epsilon, "layer_norm_epsilon")
        if not eps > 0.0:
            raise ValueError(f"layer_norm_epsilon must be positive, got {eps!r}")
        set_("layer_norm_epsilon", eps)
        init = _real(self.initializer_range, "initializer_range")
        if init < 0.0:
            raise ValueError(f"initializer_range must be non-negative, got {init!r}")
        set_("initializer_range", init)
        for name in ("scale_attn_weights", "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn",
                     "tie_word_embeddings", "add_cross_attention"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if not self.tie_word_embeddings:
            raise ValueError("tie_word_embeddings must be True: the output projection is wte (GPT-2's tying)")
        if self.add_cross_attention:
            raise ValueError("add_cross_attention must be False: this is a decoder-only model")
        extra = {} if self.extra is None else self.extra
        if not isinstance(extra, Mapping):
            raise TypeError(f"extra must be a mapping of config.json keys, got {type(extra).__name__}")
        clash = sorted(set(extra) & {f.name for f in fields(self)})
        if clash:
            raise ValueError(f"extra must not repeat GPTConfig fields, got {clash}")
        if "n_ctx" in extra and extra["n_ctx"] != self.n_positions:
            raise ValueError(f"config.json has n_ctx={extra['n_ctx']!r} but n_positions={self.n_positions}; "
                             "they must agree (n_ctx is GPT-2's old name for the context length)")
        set_("extra", MappingProxyType(dict(extra)))

    # ---- derived sizes ----------------------------------------------------------------------

    @property
    def head_dim(self) -> int:
        """``n_embd // n_head``: the width of one attention head."""
        return self.n_embd // self.n_head

    @property
    def mlp_width(self) -> int:
        """F, the MLP's hidden width: ``n_inner`` or ``4 * n_embd``."""
        return 4 * self.n_embd if self.n_inner is None else self.n_inner

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
        unknown = sorted(k for k in extra if k not in INERT_KEYS)
        if unknown:
            warnings.warn(f"config.json keys {unknown} are not GPT-2 settings transformer_ref knows; they are kept "
                          "in GPTConfig.extra and have no effect on the model", stacklevel=2)
        return cls(**kwargs, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """The config as a Hugging Face GPT-2 ``config.json`` dict (fields, then :attr:`extra`;
        ``model_type`` is ``"gpt2"`` unless ``extra`` says otherwise)."""
        out: dict[str, Any] = {"model_type": "gpt2"}
        out.update({f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"})
        out.update(self.extra)
        return out


# --------------------------------------------------------------------------------------------
# Parameter names and shapes (Hugging Face GPT-2 state-dict names; projections (d_out, d_in))
# --------------------------------------------------------------------------------------------


def projection_names(config: GPTConfig) -> list[str]:
    """The LoRA-adaptable module names, block by block: ``transformer.h.{i}.attn.c_attn``, ...

    Each is the state-dict name of a projection weight without ``.weight``.
    """
    _check_config(config)
    return [f"transformer.h.{i}.{p}" for i in range(config.n_layer) for p in PROJECTIONS]


def projection_shape(config: GPTConfig, module: str) -> tuple[int, int]:
    """``(d_out, d_in)`` of a projection given its name (or its suffix, e.g. ``"mlp.c_fc"``)."""
    C, F = config.n_embd, config.mlp_width
    shapes = {"attn.c_attn": (3 * C, C), "attn.c_proj": (C, C), "mlp.c_fc": (F, C), "mlp.c_proj": (C, F)}
    for suffix, shape in shapes.items():
        if module == suffix or module.endswith("." + suffix):
            return shape
    raise ValueError(f"{module!r} is not a projection; projections end in one of {', '.join(PROJECTIONS)}")


def param_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's name and shape, in state-dict order. C = n_embd, F = mlp width, V = vocab.

    ``transformer.wte.weight`` (V, C) -- also the output projection (tied; no ``lm_head`` key)
    ``transformer.wpe.weight`` (n_positions, C)
    per block i, prefix ``transformer.h.{i}.``:
        ``ln_1.weight``, ``ln_1.bias`` (C,)
        ``attn.c_attn.weight`` (3C, C), ``attn.c_attn.bias`` (3C,)   rows [q; k; v]
        ``attn.c_proj.weight`` (C, C), ``attn.c_proj.bias`` (C,)
        ``ln_2.weight``, ``ln_2.bias`` (C,)
        ``mlp.c_fc.weight`` (F, C), ``mlp.c_fc.bias`` (F,)
        ``mlp.c_proj.weight`` (C, F), ``mlp.c_proj.bias`` (C,)
    ``transformer.ln_f.weight``, ``transformer.ln_f.bias`` (C,)

    Projection weights are (d_out, d_in): the transpose of Hugging Face's Conv1D ``(d_in, d_out)``.
    """
    _check_config(config)
    C = config.n_embd
    shapes: dict[str, tuple[int, ...]] = {
        "transformer.wte.weight": (config.vocab_size, C),
        "transformer.wpe.weight": (config.n_positions, C),
    }
    for i in range(config.n_layer):
        h = f"transformer.h.{i}."
        shapes[h + "ln_1.weight"] = shapes[h + "ln_1.bias"] = (C,)
        for p in PROJECTIONS:
            if p == "mlp.c_fc":
                shapes[h + "ln_2.weight"] = shapes[h + "ln_2.bias"] = (C,)
            d_out, d_in = projection_shape(config, p)
            shapes[h + p + ".weight"] = (d_out, d_in)
            shapes[h + p + ".bias"] = (d_out,)
    shapes["transformer.ln_f.weight"] = shapes["transformer.ln_f.bias"] = (C,)
    return shapes


# --------------------------------------------------------------------------------------------


def _check_config(config: Any) -> None:
    if not isinstance(config, GPTConfig):
        raise TypeError(f"config must be a transformer_ref.GPTConfig, got {type(config).__name__}")


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _real(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(float(value)):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)
