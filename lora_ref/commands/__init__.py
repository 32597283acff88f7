"""Subcommands of the ``lora-ref`` command, one module each (see :mod:`lora_ref.cli`)."""
