"""transformer_ref: decoder models in array code, hosting LoRA-wrapped projections.

* :mod:`transformer_ref.layers`: embedding, layer_norm, rms_norm, gelu, silu/swiglu,
  cross_entropy, each a forward plus its hand-written backward; the op sets :data:`REFERENCE`
  (the default everywhere) and :func:`traced` (autograd.numpy's independent derivation, for tests).
* :mod:`transformer_ref.attention`: GPT-2's causal attention, grouped-query attention, RoPE (a
  file of their own, apart from layers.py, to keep each under 600 lines: a deliberate deviation
  from DESIGN.md).
* :mod:`transformer_ref.gpt2`: GPT-2 -- :class:`GPTConfig`, parameters, forward, loss.
* :mod:`transformer_ref.llama`: LLaMA (and Mistral, Qwen2) -- :class:`LlamaConfig`, parameters,
  forward, loss; the same shape as gpt2.py.
* :mod:`transformer_ref.hosting`: what every family shares -- the projection and the embedding
  lookup every forward calls (LoRA, DoRA, embedding adapters, adapter sets), targeting,
  validation -- and the family registry; :mod:`transformer_ref.adapting`: :func:`add_adapters`,
  :func:`merge_adapters` and :func:`untie`.
* :mod:`transformer_ref.checkpoints`: Hugging Face checkpoints (:func:`load_checkpoint` for any family,
  :func:`load_hf_gpt2`, :func:`save_hf_gpt2`, :func:`load_hf_llama`, :func:`save_hf_llama`).
* :mod:`transformer_ref.fast`: the training-speed op set :data:`FAST`, tested equal to REFERENCE.
* :mod:`transformer_ref.machine`: BLAS threads, core pinning, allocator settings.
* :mod:`transformer_ref.train`: Adam and :func:`train` (LoRA or full fine-tuning).
* :mod:`transformer_ref.count`: parameter counts from shapes alone (GPT-3 175B included).
* :mod:`transformer_ref.data`: small generated tasks and :func:`~transformer_ref.data.evaluate`.

:func:`forward`, :func:`loss`, :func:`init_params`, :func:`param_shapes` and
:func:`projection_names` dispatch on the config's type to its family's functions, so a new family
plugs in by registering its :class:`~transformer_ref.hosting.Family` below, without touching GPT-2.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lora_ref.lora import LoraConfig

from . import gpt2, hosting, llama
from .checkpoints import CheckpointFormatError, load_checkpoint, load_hf_gpt2, load_hf_llama, save_hf_gpt2, save_hf_llama
from .count import adapter_counts, count_parameters, count_trainable, lora_config_for, matrix_shapes
from .fast import FAST
from .gpt2 import GPTConfig
from .llama import LlamaConfig
from .adapting import add_adapters, merge_adapters, untie
from .layers import REFERENCE, Ops, traced
from .train import train

# The model families, one registration each: forward & co. below dispatch on the config's type.
hosting.register(gpt2.FAMILY)
hosting.register(llama.FAMILY)

__all__ = [
    "FAST",
    "REFERENCE",
    "CheckpointFormatError",
    "GPTConfig",
    "LlamaConfig",
    "Ops",
    "adapter_counts",
    "add_adapters",
    "count_parameters",
    "count_trainable",
    "forward",
    "init_params",
    "load_checkpoint",
    "load_hf_gpt2",
    "load_hf_llama",
    "lora_config_for",
    "loss",
    "matrix_shapes",
    "merge_adapters",
    "param_shapes",
    "projection_names",
    "save_hf_gpt2",
    "save_hf_llama",
    "traced",
    "train",
    "untie",
]


def forward(params: Mapping[str, Any], tokens: Any, config: Any, adapters: Any = None,
            lora_config: LoraConfig | None = None, dropout: Mapping[str, Any] | None = None,
            ops: Ops = REFERENCE, *, adapter_names: Sequence[str] | None = None) -> Any:
    """Logits ``(B, T, V)``: the forward of ``config``'s family (:func:`gpt2.forward`, :func:`llama.forward`).
    ``adapters`` is one adapter dict (with its ``lora_config``) or a ``lora_ref.AdapterSet``;
    ``adapter_names`` (with a set) one adapter name per batch row, ``"__base__"`` for none."""
    family = hosting.family_of(config)
    if adapter_names is None:                  # a family whose forward predates mixed batches needs no new keyword
        return family.forward(params, tokens, config, adapters, lora_config, dropout, ops)
    return family.forward(params, tokens, config, adapters, lora_config, dropout, ops, adapter_names=adapter_names)


def loss(params: Mapping[str, Any], tokens: Any, targets: Any, config: Any, adapters: Any = None,
         lora_config: LoraConfig | None = None, dropout: Mapping[str, Any] | None = None,
         ops: Ops = REFERENCE, *, adapter_names: Sequence[str] | None = None) -> Any:
    """Mean next-token cross-entropy (0-d array): the loss of ``config``'s family (:func:`gpt2.loss`,
    :func:`llama.loss`); arguments as :func:`forward`'s."""
    family = hosting.family_of(config)
    if adapter_names is None:
        return family.loss(params, tokens, targets, config, adapters, lora_config, dropout, ops)
    return family.loss(params, tokens, targets, config, adapters, lora_config, dropout, ops, adapter_names=adapter_names)


def init_params(config: Any, seed: int | np.random.Generator = 0, dtype: Any = "float64") -> dict[str, Any]:
    """Fresh parameters of ``config``'s family (GPT-2: :func:`gpt2.init_params`)."""
    return hosting.family_of(config).init_params(config, seed, dtype)


def param_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """Every parameter's state-dict name and shape, in order (GPT-2: :func:`gpt2.param_shapes`)."""
    return hosting.family_of(config).param_shapes(config)


def projection_names(config: Any) -> list[str]:
    """The LoRA-adaptable module names of ``config``'s model, block by block."""
    return hosting.family_of(config).projection_names(config)
