"""Parameter and memory accounting for ``lora-ref count``: model presets and the paper's figures.

Nothing here allocates an array: every count is arithmetic on shapes. This module holds:

* :func:`lora_parameters`: LoRA's count per adapted matrix type, ``L r (d_in + d_out)`` with the
  shape of each type (:func:`target_shape`), by :func:`lora_ref.lora_parameter_count`;
* :data:`PRESETS`: the six models of the paper, GPT-2 small, and LLaMA-2 7B/13B/70B and LLaMA-3
  8B/70B (grouped-query attention, a gated MLP), each with the configuration values it is counted
  from and where those values come from;
* the base-model counters for the two encoder families (:func:`roberta_parameters`,
  :func:`deberta_v2_parameters`), written from their Hugging Face architectures;
* the byte accounting (:func:`checkpoint_bytes`, :func:`adam_state_bytes`);
* :data:`PAPER_CLAIMS`: the paper's reported counts and sizes, with the configuration the paper
  states for each, and :func:`classify`, which decides whether a reported string recomputes;
* QLoRA's 4-bit accounting (:func:`quant_bytes`, bitsandbytes' bytes for one weight;
  :func:`constants_bits`, the QLoRA paper's bits of constants per parameter; :data:`QLORA_CLAIMS`).

Accounting (Hu et al. 2021, Section 5.1): an adapter on a ``(d_out, d_in)`` weight is ``A`` of
shape ``(r, d_in)`` plus ``B`` of shape ``(d_out, r)``, so ``r (d_in + d_out)`` parameters; for a
``d_model x d_model`` attention matrix in each of ``L`` layers that is ``|Theta| = 2 L d_model r``
per adapted matrix type. A LoRA checkpoint holds A and B only; a full checkpoint holds every
parameter of the model. Adam keeps two moments (``m`` and ``v``) per trainable parameter, in fp32.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import ROUND_DOWN, ROUND_HALF_UP, Decimal
from fractions import Fraction
from types import MappingProxyType
from typing import Any

from .checks import finite_real, non_negative_int, positive_int
from .lora import lora_parameter_count

__all__ = [
    "ADAM_MOMENTS",
    "BYTES_PER_PARAMETER",
    "GATED_MATRICES",
    "MATRIX_TARGETS",
    "PLAIN_MATRICES",
    "PAPER_CLAIMS",
    "PRESETS",
    "QLORA_BLOCKSIZE",
    "QLORA_CLAIMS",
    "ModelPreset",
    "PaperClaim",
    "Reported",
    "adam_state_bytes",
    "checkpoint_bytes",
    "classify",
    "constants_bits",
    "deberta_v2_parameters",
    "format_size",
    "lora_parameters",
    "parse_reported",
    "parse_targets",
    "quant_bytes",
    "roberta_parameters",
    "round_reported",
    "target_shape",
]

BYTES_PER_PARAMETER = MappingProxyType({"fp16": 2, "bf16": 2, "fp32": 4})
ADAM_MOMENTS = 2                      # Adam's m and v, one of each per trainable parameter
ADAM_STATE_BYTES_PER_MOMENT = 4       # kept in fp32 (also under mixed precision)

# Weight-matrix types a rank can be put on (the names transformer_ref.count's families use too):
# q, k, v, o are the attention projections, d_model x d_model except k and v under grouped-query
# attention, (kv_dim, d_model); mlp_in (F, d_model) and mlp_out (d_model, F) the two matrices of a
# GELU MLP (GPT-2, the encoders); gate, up (F, d_model) and down (d_model, F) the three of a gated
# MLP (LLaMA's SwiGLU). "mlp" on the command line means a model's MLP matrices; "all", every type.
MATRIX_TARGETS = ("q", "k", "v", "o", "mlp_in", "mlp_out", "gate", "up", "down")
PLAIN_MATRICES = ("q", "k", "v", "o", "mlp_in", "mlp_out")
GATED_MATRICES = ("q", "k", "v", "o", "gate", "up", "down")


# ============================================================================================
# Model presets
# ============================================================================================


@dataclass(frozen=True)
class ModelPreset:
    """One model of the paper and the configuration values it is counted from.

    ``family`` says how the full model is counted: ``"gpt2"`` / ``"llama"`` from a GPT-2 / LLaMA
    config by :mod:`transformer_ref` (``lora-ref count`` imports it for these presets only),
    ``"roberta"`` / ``"deberta-v2"`` by this module's encoder counters, ``"gpt3"`` not at all
    (the figure the paper reports is used, marked as reported).
    ``config`` holds Hugging Face ``config.json`` keys with the values used, ``source`` says
    where they are from.
    """

    name: str
    label: str
    family: str
    d_model: int
    layers: int
    ffn_width: int
    config: Mapping[str, Any]
    source: str
    counted: str
    reported_full: str | None = None
    kv_dim: int | None = None

    @property
    def matrices(self) -> tuple[str, ...]:
        """The weight-matrix types of one layer: a gated MLP (LLaMA) has gate, up, down."""
        return GATED_MATRICES if self.family == "llama" else PLAIN_MATRICES


def _llama(name: str, label: str, source: str, *, vocab: int, d: int, F: int, L: int, H: int, Hk: int,
           positions: int, theta: float, eps: float = 1e-5) -> ModelPreset:
    """A LLaMA preset from its Hugging Face config.json values (untied head, no biases)."""
    config = {"vocab_size": vocab, "hidden_size": d, "intermediate_size": F, "num_hidden_layers": L,
              "num_attention_heads": H, "num_key_value_heads": Hk, "max_position_embeddings": positions,
              "rms_norm_eps": eps, "rope_theta": theta, "tie_word_embeddings": False}
    return ModelPreset(name=name, label=label, family="llama", d_model=d, layers=L, ffn_width=F,
                       config=MappingProxyType(config), source=source, kv_dim=Hk * (d // H),
                       counted=f"LlamaForCausalLM: token embeddings ({vocab}), {L} layers ({H} query heads, "
                               f"{Hk} key/value heads, SwiGLU MLP), final RMSNorm, untied lm_head")


def _roberta(name: str, label: str, *, d: int, F: int, L: int, H: int) -> ModelPreset:
    """A RoBERTa preset from its Hugging Face config.json values (50265 tokens, 514 positions, one token type)."""
    config = {"vocab_size": 50265, "hidden_size": d, "num_hidden_layers": L, "num_attention_heads": H,
              "intermediate_size": F, "max_position_embeddings": 514, "type_vocab_size": 1}
    return ModelPreset(name=name, label=label, family="roberta", d_model=d, layers=L, ffn_width=F,
                       config=MappingProxyType(config), source=f"Hugging Face {name} config.json",
                       counted="RobertaModel encoder: word (50265), position (514) and token-type (1) embeddings "
                               f"with their LayerNorm, {L} layers; no pooler, no LM or classification head")


def _gpt2(name: str, label: str, *, d: int, L: int, H: int) -> ModelPreset:
    """A GPT-2 preset from its Hugging Face config.json values (50257 tokens, 1024 positions, F = 4 d)."""
    config = {"n_embd": d, "n_layer": L, "n_head": H, "vocab_size": 50257, "n_positions": 1024}
    return ModelPreset(name=name, label=label, family="gpt2", d_model=d, layers=L, ffn_width=4 * d,
                       config=MappingProxyType(config), source=f"Hugging Face {name} config.json",
                       counted="GPT2LMHeadModel as saved by Hugging Face: token (50257) and position (1024) "
                               f"embeddings, {L} blocks, final LayerNorm; lm_head tied to wte, counted once")


PRESETS: Mapping[str, ModelPreset] = MappingProxyType({p.name: p for p in (
    _roberta("roberta-base", "RoBERTa base", d=768, F=3072, L=12, H=12),
    _roberta("roberta-large", "RoBERTa large", d=1024, F=4096, L=24, H=16),
    ModelPreset(
        name="deberta-xxlarge", label="DeBERTa XXL", family="deberta-v2", d_model=1536, layers=48, ffn_width=6144,
        config=MappingProxyType({"vocab_size": 128100, "hidden_size": 1536, "num_hidden_layers": 48,
                                 "num_attention_heads": 24, "attention_head_size": 64,
                                 "intermediate_size": 6144, "type_vocab_size": 0,
                                 "position_biased_input": False, "relative_attention": True,
                                 "position_buckets": 256, "norm_rel_ebd": "layer_norm",
                                 "share_att_key": True, "pos_att_type": "p2c|c2p",
                                 "conv_kernel_size": 3}),
        source="Hugging Face microsoft/deberta-v2-xxlarge config.json",
        counted="DebertaV2Model: word embeddings (128100) and their LayerNorm, 48 layers (shared "
                "attention keys: no separate position projections), relative-position embeddings "
                "(2 x 256 buckets) with their LayerNorm, the convolution after layer 0 with its "
                "LayerNorm; no pooler, no classification head"),
    _gpt2("gpt2-medium", "GPT-2 M", d=1024, L=24, H=16),
    _gpt2("gpt2-large", "GPT-2 L", d=1280, L=36, H=20),
    ModelPreset(
        name="gpt3-175b", label="GPT-3 175B", family="gpt3", d_model=12288, layers=96, ffn_width=49152,
        config=MappingProxyType({"n_embd": 12288, "n_layer": 96, "n_head": 96, "n_ctx": 2048}),
        source="Brown et al. 2020 (GPT-3), Table 2.1 (d_ff = 4 d_model, Section 2.1)",
        counted="not recomputed: GPT-3's paper does not publish every detail an exact count needs "
                "(vocabulary, biases, tying); the LoRA paper's own count (Table 4, GPT-3 FT) is used",
        reported_full="175,255.8M"),
    _gpt2("gpt2", "GPT-2 (124M)", d=768, L=12, H=12),
    _llama("llama-2-7b", "LLaMA-2 7B", "Hugging Face meta-llama/Llama-2-7b-hf config.json",
           vocab=32000, d=4096, F=11008, L=32, H=32, Hk=32, positions=4096, theta=10000.0),
    _llama("llama-2-13b", "LLaMA-2 13B", "Hugging Face meta-llama/Llama-2-13b-hf config.json",
           vocab=32000, d=5120, F=13824, L=40, H=40, Hk=40, positions=4096, theta=10000.0),
    _llama("llama-2-70b", "LLaMA-2 70B", "Hugging Face meta-llama/Llama-2-70b-hf config.json",
           vocab=32000, d=8192, F=28672, L=80, H=64, Hk=8, positions=4096, theta=10000.0),
    _llama("llama-3-8b", "LLaMA-3 8B", "Hugging Face meta-llama/Meta-Llama-3-8B config.json",
           vocab=128256, d=4096, F=14336, L=32, H=32, Hk=8, positions=8192, theta=500000.0),
    _llama("llama-3-70b", "LLaMA-3 70B", "Hugging Face meta-llama/Meta-Llama-3-70B config.json",
           vocab=128256, d=8192, F=28672, L=80, H=64, Hk=8, positions=8192, theta=500000.0),
    _llama("llama-65b", "LLaMA 65B", "Touvron et al. 2023 (LLaMA), Table 2; Hugging Face huggyllama/llama-65b "
           "config.json", vocab=32000, d=8192, F=22016, L=80, H=64, Hk=64, positions=2048, theta=10000.0, eps=1e-6),
)})


# ============================================================================================
# Base-model counts for the encoders (Hugging Face architectures)
# ============================================================================================


def roberta_parameters(config: Mapping[str, Any]) -> int:
    """Parameters of Hugging Face ``RobertaModel(config, add_pooling_layer=False)``.

    With C = ``hidden_size``, F = ``intermediate_size``, L = ``num_hidden_layers``:
    embeddings ``(vocab + positions + token types) C`` plus their LayerNorm ``2C``; per layer the
    four attention projections ``4 (C^2 + C)``, two LayerNorms ``4C`` and the MLP
    ``(F C + F) + (C F + C)``. The pooler (``C^2 + C``) and task heads are not included.
    """
    vocab, C, L, F, positions, types = (_config_int(config, k) for k in (
        "vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size",
        "max_position_embeddings", "type_vocab_size"))
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"config position_embedding_type must be 'absolute', got {config['position_embedding_type']!r}")
    if config.get("embedding_size", C) != C:
        raise ValueError(f"config embedding_size must equal hidden_size={C}, got {config['embedding_size']!r}")
    embeddings = (vocab + positions + types) * C + 2 * C
    return embeddings + L * _encoder_layer(C, F)


def deberta_v2_parameters(config: Mapping[str, Any]) -> int:
    """Parameters of Hugging Face ``DebertaV2Model(config)`` (which has no pooler).

    Supports the configuration family of the DeBERTa-v2 checkpoints: relative attention with
    shared keys (``share_att_key``: no separate position projections), no absolute position or
    token-type embeddings, ``embedding_size == hidden_size``. With C, F, L as in
    :func:`roberta_parameters` and k = ``conv_kernel_size``: word embeddings ``vocab C`` and their
    LayerNorm ``2C``; L layers as in RoBERTa; relative-position embeddings ``2 buckets C`` (buckets
    = ``position_buckets``, or ``max_relative_positions`` / ``max_position_embeddings`` without
    bucketing) and, with ``norm_rel_ebd="layer_norm"``, their LayerNorm ``2C``; with ``k > 0`` the
    convolution after the first layer ``k C^2 + C`` and its LayerNorm ``2C``.
    """
    vocab, C, L, F = (_config_int(config, k) for k in (
        "vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size"))
    unsupported = {"relative_attention": True, "share_att_key": True, "position_biased_input": False,
                   "type_vocab_size": 0}
    for key, needed in unsupported.items():
        if config.get(key) != needed:
            raise ValueError(f"config {key} must be {needed!r} (the DeBERTa-v2 checkpoints' setting), "
                             f"got {config.get(key)!r}")
    if config.get("embedding_size", C) != C:
        raise ValueError(f"config embedding_size must equal hidden_size={C}, got {config['embedding_size']!r}")
    if config.get("conv_groups", 1) != 1:
        raise ValueError(f"config conv_groups must be 1, got {config['conv_groups']!r}")
    buckets = config.get("position_buckets", -1)
    if buckets is None or buckets <= 0:
        buckets = config.get("max_relative_positions", -1)
        if buckets is None or buckets < 1:
            buckets = _config_int(config, "max_position_embeddings")
    total = vocab * C + 2 * C + L * _encoder_layer(C, F)
    total += 2 * int(buckets) * C
    if "layer_norm" in str(config.get("norm_rel_ebd", "none")).lower():
        total += 2 * C
    k = int(config.get("conv_kernel_size", 0) or 0)
    if k > 0:
        total += k * C * C + C + 2 * C
    return total


def _encoder_layer(C: int, F: int) -> int:
    attention = 4 * (C * C + C)            # query, key, value, output dense
    mlp = (F * C + F) + (C * F + C)        # intermediate dense (F, C), output dense (C, F)
    return attention + mlp + 2 * (2 * C)   # + the two LayerNorms


def _config_int(config: Mapping[str, Any], key: str) -> int:
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a mapping of config.json keys, got {type(config).__name__}")
    if key not in config:
        raise ValueError(f"config is missing {key!r}")
    return non_negative_int(config[key], f"config {key}")


# ============================================================================================
# Bytes
# ============================================================================================


def checkpoint_bytes(n_params: int, dtype: str) -> int:
    """Bytes of a checkpoint holding ``n_params`` parameters in ``dtype`` (fp16, bf16 or fp32).

    Only the tensors' data: a file format's header (a few kB in safetensors) is not included.
    """
    n_params = non_negative_int(n_params, "n_params")
    if dtype not in BYTES_PER_PARAMETER:
        raise ValueError(f"dtype must be one of {', '.join(BYTES_PER_PARAMETER)}, got {dtype!r}")
    return n_params * BYTES_PER_PARAMETER[dtype]


def adam_state_bytes(n_trainable: int) -> int:
    """Bytes of Adam's state for ``n_trainable`` parameters: two fp32 moments each (8 bytes).

    Gradients, fp32 master weights under mixed precision and activations are not included.
    """
    n_trainable = non_negative_int(n_trainable, "n_trainable")
    return n_trainable * ADAM_MOMENTS * ADAM_STATE_BYTES_PER_MOMENT


def format_size(n_bytes: int | float, binary: bool = False) -> str:
    """``37748736 -> '37.7 MB'`` (powers of 1000) or, with ``binary``, ``'36.0 MiB'`` (powers of 1024)."""
    if finite_real(n_bytes, "n_bytes") < 0:
        raise ValueError(f"n_bytes must be a non-negative number, got {n_bytes!r}")
    base = 1024 if binary else 1000
    units = ("KiB", "MiB", "GiB", "TiB", "PiB") if binary else ("kB", "MB", "GB", "TB", "PB")
    if n_bytes < base:
        return f"{int(n_bytes)} B"
    value, unit = float(n_bytes), "B"
    for unit in units:
        value /= base
        if value < base or unit == units[-1]:
            break
    return f"{value:.1f} {unit}"


# ============================================================================================
# Targets
# ============================================================================================


def parse_targets(text: str | Iterable[str], matrices: tuple[str, ...] = PLAIN_MATRICES) -> tuple[str, ...]:
    """``"q,v" -> ("q", "v")``: the weight-matrix types to adapt, among ``matrices`` (a model's types:
    :data:`PLAIN_MATRICES` by default, :data:`GATED_MATRICES` for LLaMA).

    ``"mlp"`` expands to the model's MLP matrices (mlp_in, mlp_out; or gate, up, down) and ``"all"``
    to every type; order is kept, a name given twice (also through an alias) is an error.
    """
    if isinstance(text, str):
        names = [t.strip() for t in text.split(",")]
    else:
        names = [str(t).strip() for t in text]
    if not names or any(not t for t in names):
        raise ValueError(f"targets must be a comma-separated list such as 'q,v', got {text!r}")
    aliases = {"mlp": tuple(m for m in matrices if m not in ("q", "k", "v", "o")), "all": tuple(matrices)}
    out: list[str] = []
    for name in names:
        for t in aliases.get(name, (name,)):
            if t not in matrices:
                raise ValueError(f"unknown target {name!r}: expected some of {', '.join(matrices)}, mlp (the MLP "
                                 f"matrices) or all, got {text!r}")
            if t in out:
                raise ValueError(f"target {t!r} is listed twice in {text!r}")
            out.append(t)
    return tuple(out)


# ============================================================================================
# LoRA's count
# ============================================================================================


def target_shape(target: str, d_model: int, ffn_width: int, kv_dim: int | None = None) -> tuple[int, int]:
    """``(d_out, d_in)`` of a weight-matrix type: q, o are ``(d_model, d_model)``, k, v
    ``(kv_dim, d_model)`` (``kv_dim`` = key/value heads x head width, d_model without grouped-query
    attention), mlp_in, gate, up ``(ffn_width, d_model)`` (they widen), mlp_out, down
    ``(d_model, ffn_width)``."""
    d_model = positive_int(d_model, "d_model")
    ffn_width = positive_int(ffn_width, "ffn_width", "the MLP width")
    kv = d_model if kv_dim is None else positive_int(kv_dim, "kv_dim", "the key/value width")
    if target not in MATRIX_TARGETS:
        raise ValueError(f"target must be one of {', '.join(MATRIX_TARGETS)}, got {target!r}")
    wide, narrow = (ffn_width, d_model), (d_model, ffn_width)
    return {"k": (kv, d_model), "v": (kv, d_model), "mlp_in": wide, "gate": wide, "up": wide,
            "mlp_out": narrow, "down": narrow}.get(target, (d_model, d_model))


def lora_parameters(targets: str | Iterable[str], rank: int, *, d_model: int, layers: int,
                    ffn_width: int, kv_dim: int | None = None,
                    matrices: tuple[str, ...] = PLAIN_MATRICES) -> dict[str, int]:
    """``{target: parameters of A and B over all layers}`` for rank ``rank`` on each target type.

    One adapter on a ``(d_out, d_in)`` weight has ``r (d_in + d_out)`` parameters
    (:func:`lora_ref.lora_parameter_count`), one per layer: ``layers r (d_in + d_out)``, which for
    a ``d_model x d_model`` type is Section 5.1's ``2 L d_model r``. ``targets`` as for
    :func:`parse_targets` (``"q,v"``, ``"mlp"``, ``"all"``, or a sequence of names) among
    ``matrices``; ``kv_dim`` the width of k and v (:func:`target_shape`). The count depends on
    these shapes only: an encoder's separate query / key / value projections and GPT-2's fused
    ``c_attn`` adapted per block (loralib's MergedLinear) give the same numbers.

    >>> lora_parameters("q,v", 4, d_model=1024, layers=24, ffn_width=4096)   # GPT-2 M, Table 3
    {'q': 196608, 'v': 196608}
    """
    layers = positive_int(layers, "layers")
    rank = positive_int(rank, "rank")
    out = {}
    for t in parse_targets(targets, matrices):
        d_out, d_in = target_shape(t, d_model, ffn_width, kv_dim)
        out[t] = layers * lora_parameter_count(d_in, d_out, rank)
    return out


# ============================================================================================
# The paper's figures
# ============================================================================================


@dataclass(frozen=True)
class Reported:
    """A figure as printed in the paper: ``"0.35M"`` is 0.35 (2 places) x 10^6 parameters."""

    text: str
    number: Decimal
    unit: str       # "M" (parameters), "MB" or "GB" (bytes)
    scale: int      # 10**6 or 10**9
    places: int     # digits after the decimal point

    @property
    def value(self) -> int:
        """The figure as a plain integer (``175,255.8M -> 175255800000``)."""
        return int(self.number * self.scale)


_UNITS = {"MB": 10**6, "GB": 10**9, "M": 10**6}
_BINARY = {"MB": 2**20, "GB": 2**30}


def parse_reported(text: str) -> Reported:
    """Parse ``"0.35M"``, ``"175,255.8M"``, ``"35MB"``, ``"350GB"`` into a :class:`Reported`."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str such as '0.35M', got {type(text).__name__}")
    s = text.strip().replace(",", "")
    unit = next((u for u in _UNITS if s.endswith(u)), None)
    if unit is None:
        raise ValueError(f"text must end in one of {', '.join(_UNITS)}, got {text!r}")
    number = s[: -len(unit)].strip()
    try:
        value = Decimal(number)
    except ArithmeticError:
        raise ValueError(f"text must be a number followed by a unit, got {text!r}") from None
    if not value.is_finite() or value < 0:
        raise ValueError(f"text must be a non-negative number followed by a unit, got {text!r}")
    places = len(number.split(".")[1]) if "." in number else 0
    return Reported(text=text, number=value, unit=unit, scale=_UNITS[unit], places=places)


def _rounded(exact: int, reported: Reported, mode: str, binary: bool) -> Decimal:
    scale = _BINARY[reported.unit] if binary else reported.scale
    quantum = Decimal(1).scaleb(-reported.places)
    return (Decimal(exact) / Decimal(scale)).quantize(quantum, ROUND_HALF_UP if mode == "round" else ROUND_DOWN)


def round_reported(exact: int, reported: Reported, mode: str = "round", binary: bool = False) -> str:
    """``exact`` written the way ``reported`` is: same unit, same number of decimals.

    ``mode="round"`` rounds half up, ``mode="truncate"`` drops the extra digits. With ``binary``
    a byte figure is written in powers of 1024 (``MiB``, ``GiB``). ``393216`` as ``"0.35M"`` is
    ``"0.39M"``; ``37748736`` as ``"35MB"`` is ``"38MB"``, or ``"36MiB"`` with ``binary``.
    """
    exact = non_negative_int(exact, "exact")
    if mode not in ("round", "truncate"):
        raise ValueError(f"mode must be 'round' or 'truncate', got {mode!r}")
    if binary and reported.unit not in _BINARY:
        raise ValueError(f"binary applies to byte figures (MB, GB), got {reported.text!r}")
    unit = reported.unit[0] + "iB" if binary else reported.unit
    return f"{_rounded(exact, reported, mode, binary):,}{unit}"


def classify(reported: Reported, exact: int | None) -> str:
    """Does a reported figure recompute? ``"ok"``, ``"truncated"``, ``"mismatch"`` or ``"n/a"``.

    ``"ok"``: ``exact`` rounded (half up) to the reported precision gives the reported number (for
    bytes, in powers of 1000 or of 1024). ``"truncated"``: only dropping digits gives it.
    ``"mismatch"``: neither. ``"n/a"``: nothing to compare with (``exact`` is None).
    """
    if not isinstance(reported, Reported):
        raise TypeError(f"reported must be a Reported (see parse_reported), got {type(reported).__name__}")
    if exact is None:
        return "n/a"
    exact = non_negative_int(exact, "exact")
    binaries = (False, True) if reported.unit in _BINARY else (False,)
    for mode, status in (("round", "ok"), ("truncate", "truncated")):
        if any(_rounded(exact, reported, mode, b) == reported.number for b in binaries):
            return status
    return "mismatch"


@dataclass(frozen=True)
class PaperClaim:
    """One figure of the paper, the configuration the paper states for it, and where.

    ``quantity``: ``"lora"`` (trainable LoRA parameters), ``"full"`` (parameters of the model),
    ``"lora_fp16_bytes"`` / ``"full_fp16_bytes"`` (checkpoint sizes at 2 bytes per parameter).
    ``targets``/``rank``: the stated LoRA configuration (for lora quantities). ``alternative``:
    ``(targets, rank)`` that does give the figure, when one is known. ``remark``: what the
    numbers alone do not say (one short clause).
    """

    source: str
    model: str
    quantity: str
    reported: str
    targets: tuple[str, ...] = ()
    rank: int | None = None
    stated_in: str = ""
    alternative: tuple[tuple[str, ...], int] | None = None
    remark: str = ""
    reported_parsed: Reported = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "reported_parsed", parse_reported(self.reported))


# Reported strings verbatim from arXiv 2106.09685v2. Configurations: Tables 9-12 and Appendix D.
PAPER_CLAIMS: tuple[PaperClaim, ...] = (
    PaperClaim("Table 2", "roberta-base", "lora", "0.3M", ("q", "v"), 8, "Table 9",
               remark="the released scripts also pass --lora_r 8"),
    PaperClaim("Table 2", "roberta-large", "lora", "0.8M", ("q", "v"), 8, "Table 9"),
    PaperClaim("Table 2", "deberta-xxlarge", "lora", "4.7M", ("q", "v"), 8, "Table 10",
               alternative=(("q", "v"), 16),
               remark="r=16 is what microsoft/LoRA's examples/NLU/deberta_v2_xxlarge_*.sh pass (--lora_r 16)"),
    PaperClaim("Table 3", "gpt2-medium", "lora", "0.35M", ("q", "v"), 4, "Table 11",
               remark="0.35M is also the PreLayer baseline's figure in the same table"),
    PaperClaim("Table 3", "gpt2-large", "lora", "0.77M", ("q", "v"), 4, "Table 11",
               remark="0.77M is also the PreLayer baseline's figure in the same table"),
    PaperClaim("Table 4", "gpt3-175b", "lora", "4.7M", ("q", "v"), 1, "Appendix D.4"),
    PaperClaim("Table 4", "gpt3-175b", "lora", "37.7M", ("q", "v"), 8, "Appendix D.4"),
    PaperClaim("Appendix D.4", "gpt3-175b", "lora", "37.7M", ("q", "k", "v", "o"), 2, "Appendix D.4",
               alternative=(("q", "k", "v", "o"), 4),
               remark="Table 15 lists r=2 on all four as 18.8M and r=4 on all four as 37.7M"),
    PaperClaim("Section 7.1", "gpt3-175b", "lora", "18M", ("q", "v"), 4, "Section 7.1",
               remark="it is Table 5's budget, which r=8 on one type, r=4 on two and r=2 on four all meet exactly"),
    PaperClaim("Table 15", "gpt3-175b", "lora", "18.8M", ("q", "v"), 4, "Table 15"),
    PaperClaim("Table 15", "gpt3-175b", "lora", "18.8M", ("q", "k", "v", "o"), 2, "Table 15"),
    PaperClaim("Table 15", "gpt3-175b", "lora", "301.9M", ("q", "v"), 64, "Table 15"),
    PaperClaim("Table 15", "gpt3-175b", "lora", "603.8M", ("q", "k", "v", "o"), 64, "Table 15"),
    PaperClaim("Section 4.2", "gpt3-175b", "lora_fp16_bytes", "35MB", ("q", "v"), 4, "Section 4.2",
               remark="the paper says 'roughly'; Section 7.1 calls 18M parameters 'roughly 35MB' in fp16"),
    PaperClaim("Section 4.2", "gpt3-175b", "full_fp16_bytes", "350GB",
               remark="350GB is the nominal 175B x 2 bytes"),
    PaperClaim("Table 2", "roberta-base", "full", "125.0M",
               remark="RoBERTa base's nominal size, quoted from prior work (*), not a count"),
    PaperClaim("Table 2", "roberta-large", "full", "355.0M",
               remark="RoBERTa large's nominal size, quoted from prior work (*), not a count"),
    PaperClaim("Table 2", "deberta-xxlarge", "full", "1500.0M",
               remark="the model card's nominal 1.5B, quoted from prior work (*), not a count"),
    PaperClaim("Table 3", "gpt2-medium", "full", "354.92M",
               remark="quoted from prior work (Li & Liang 2021, marked *)"),
    PaperClaim("Table 3", "gpt2-large", "full", "774.03M",
               remark="quoted from prior work (Li & Liang 2021, marked *)"),
    PaperClaim("Table 4", "gpt3-175b", "full", "175,255.8M",
               remark="not recomputable: GPT-3's exact architecture (vocabulary, biases, tying) is unpublished"),
)


# ============================================================================================
# QLoRA (Dettmers et al. 2023, arXiv 2305.14314): 4-bit weights and their constants
# ============================================================================================

QLORA_BLOCKSIZE = 64            # Section 3: "a blocksize of 64 for W"
QLORA_NESTED_BLOCKSIZE = 256    # "... and a blocksize of 256 for c2" (the constants' own blocks)

# The QLoRA paper's memory figures (arXiv 2305.14314v1; its numbers, our words), audited by ``lora-ref count --qlora``.
QLORA_CLAIMS = MappingProxyType({
    "constants": ("Section 3", "32/64 = 0.5 bits per parameter without double quantization, "
                               "8/64 + 32/(64 * 256) = 0.127 bits with it"),
    "full": ("Section 1", "finetuning a 65B parameter model needs >780GB of GPU memory"),
    "qlora": ("Abstract", "QLoRA finetunes a 65B parameter model on a single 48GB GPU"),
})


def quant_bytes(shape: Iterable[int], blocksize: int = QLORA_BLOCKSIZE, double_quant: bool = True) -> dict[str, int]:
    """Bytes bitsandbytes stores for one 4-bit weight of ``shape`` (what
    ``lora_ref.quant.QuantState.storage_bytes`` gives, from the shape alone): the codes
    ``ceil(n / 2)``; absmax, one float32 per block of ``blocksize`` (or one uint8 code with double
    quantisation, plus a float32 per 256 blocks, the 256-entry float32 map and the float32 offset);
    the 16-entry float32 level table."""
    n = 1
    for d in shape:
        n *= positive_int(d, "shape")
    nb = -(-n // positive_int(blocksize, "blocksize"))
    out = {"weight": (n + 1) // 2, "absmax": nb if double_quant else 4 * nb, "quant_map": 16 * 4}
    if double_quant:
        out.update(nested_absmax=4 * -(-nb // QLORA_NESTED_BLOCKSIZE), nested_quant_map=256 * 4, nested_offset=4)
    return out


def constants_bits(blocksize: int = QLORA_BLOCKSIZE, double_quant: bool = True) -> Fraction:
    """Bits of constants per weight as the paper counts them (Section 3): ``32 / b`` (one float32
    absmax per block), or ``8 / b + 32 / (b * 256)`` with double quantisation: exact."""
    b = positive_int(blocksize, "blocksize")
    return Fraction(8, b) + Fraction(32, b * QLORA_NESTED_BLOCKSIZE) if double_quant else Fraction(32, b)
