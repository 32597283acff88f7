"""lora-ref: a reference implementation of LoRA (Hu et al. 2021) in plain array code.

The math lives in :mod:`lora_ref.lora` (read it top to bottom), what to adapt in
:mod:`lora_ref.config`, backends in :mod:`lora_ref.backend`, argument checks in
:mod:`lora_ref.checks`, tolerances and the oracle kit in :mod:`lora_ref.testing`.

Each variant is a room of its own, and its public names (its ``__all__``) are also importable
from here: :mod:`~lora_ref.dora` (DoRA), :mod:`~lora_ref.embedding` and :mod:`~lora_ref.conv`
(LoRA on embeddings and convolutions), :mod:`~lora_ref.adapters` (many adapters on one base),
:mod:`~lora_ref.serving` (what serving engines compute), :mod:`~lora_ref.combine` (adapter
arithmetic) and :mod:`~lora_ref.quant` (QLoRA's 4-bit base). ``import lora_ref`` stays light: the
quant room's names are imported on first use (it needs ml_dtypes, whose import costs more than
all of lora-ref's own), and no room imports SciPy at import time.
"""

import importlib

from .backend import (
    BACKENDS,
    BackendUnavailableError,
    asarray,
    get_backend,
    namespace,
    register_array_type,
    set_backend,
    to_numpy,
    use_backend,
)
from .lora import (  # lora.py imports what it needs from config.py itself; the order here is free
    INIT_SCHEMES,
    delta_weight,
    dropout_mask,
    init_lora,
    lora_linear,
    lora_parameter_count,
    lora_scale,
    merge,
    pissa_init,
    unmerge,
)
from .config import LoraConfig
from . import adapters, combine, conv, dora, embedding, serving  # noqa: E402  (the variant rooms)
from .adapters import *  # noqa: E402, F401, F403  (each room's __all__, listed below)
from .combine import *  # noqa: E402, F401, F403
from .conv import *  # noqa: E402, F401, F403
from .dora import *  # noqa: E402, F401, F403
from .embedding import *  # noqa: E402, F401, F403
from .serving import *  # noqa: E402, F401, F403

__version__ = "0.1.0"


# lora_ref.quant's ``__all__``, written out so that ``import lora_ref`` need not import quant
# (which imports ml_dtypes, about 0.6 s on a small machine); the names are imported on first
# use, by the module __getattr__ below (PEP 562). tests/test_lora.py holds this equal to
# ``quant.__all__``.
_QUANT_NAMES = ("BLOCKSIZES", "NESTED_BLOCKSIZE", "QUANT_TYPES", "QuantState", "base_weight", "dequantize_4bit",
                "dequantize_absmax", "double_quantize", "dynamic_map", "error_bound", "fp4_levels", "linear_4bit",
                "merge_4bit", "nf4_levels", "quantize_4bit", "quantize_params")


def __getattr__(name: str):
    if name in _QUANT_NAMES:
        value = getattr(importlib.import_module(".quant", __name__), name)
        globals()[name] = value                       # later lookups skip this function
        return value
    raise AttributeError(f"module 'lora_ref' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_QUANT_NAMES))


__all__ = [
    "BACKENDS",
    "INIT_SCHEMES",
    "BackendUnavailableError",
    "LoraConfig",
    "__version__",
    "asarray",
    "delta_weight",
    "dropout_mask",
    "get_backend",
    "init_lora",
    "lora_linear",
    "lora_parameter_count",
    "lora_scale",
    "merge",
    "namespace",
    "pissa_init",
    "register_array_type",
    "set_backend",
    "to_numpy",
    "unmerge",
    "use_backend",
] + [*adapters.__all__, *combine.__all__, *conv.__all__, *dora.__all__, *embedding.__all__, *serving.__all__,
     *_QUANT_NAMES]
