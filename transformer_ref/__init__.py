"""transformer_ref: a minimal GPT-2-architecture decoder, in array code, hosting LoRA projections.

* :mod:`transformer_ref.config`: :class:`GPTConfig` (Hugging Face GPT-2 ``config.json`` names) and
  the parameter names (:func:`param_shapes`, :func:`projection_names`).
* :mod:`transformer_ref.layers`: embedding, layer_norm, causal_attention, gelu, cross_entropy,
  each a forward plus its hand-written backward.
* :mod:`transformer_ref.model`: :func:`init_params`, :func:`add_adapters`, :func:`forward`,
  :func:`loss`, :func:`merge_adapters`.
* :mod:`transformer_ref.count`: parameter counts from shapes alone (GPT-3 175B included).
* :mod:`transformer_ref.train`: Adam and :func:`train` (LoRA or full fine-tuning).
* :mod:`transformer_ref.data`: small generated tasks and :func:`evaluate`.
"""

from .config import GPTConfig, param_shapes, projection_names
from .count import adapter_counts, count_parameters, count_trainable, lora_config_for, matrix_shapes
from .model import add_adapters, forward, init_params, loss, merge_adapters

__all__ = [
    "GPTConfig",
    "adapter_counts",
    "add_adapters",
    "count_parameters",
    "count_trainable",
    "forward",
    "init_params",
    "lora_config_for",
    "loss",
    "matrix_shapes",
    "merge_adapters",
    "param_shapes",
    "projection_names",
]
