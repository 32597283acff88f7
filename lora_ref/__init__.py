"""lora-ref: a reference implementation of LoRA (Hu et al. 2021) in plain array code.

The math lives in :mod:`lora_ref.lora` (read it top to bottom), what to adapt in
:mod:`lora_ref.config`, backends in :mod:`lora_ref.backend`, argument checks in
:mod:`lora_ref.checks`, tolerances and the oracle kit in :mod:`lora_ref.testing`.
"""

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
from .lora import (  # first: lora.py imports config.py at its end (see there)
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

__version__ = "0.1.0"

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
]
