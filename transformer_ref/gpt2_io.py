"""Moved: Hugging Face checkpoints are in transformer_ref.checkpoints (this module goes away with issue #10)."""

from .checkpoints import CONFIG_NAME, WEIGHTS_NAME, CheckpointFormatError, load_hf_gpt2, save_hf_gpt2  # noqa: F401
