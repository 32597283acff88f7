"""Moved: GPTConfig is in transformer_ref.gpt2 (this module goes away with issue #10)."""

from .gpt2 import INERT_KEYS, PROJECTIONS, FAMILY, GPTConfig, param_shapes  # noqa: F401

projection_names = FAMILY.projection_names
projection_shape = FAMILY.projection_shape
