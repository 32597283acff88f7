"""PEFT's ``adapter_config.json``: every field of PEFT 0.21.2's ``LoraConfig``, decided.

:mod:`lora_ref.peft_io` reads and writes PEFT adapter directories; this room holds the config half:
:data:`CONFIG_FIELDS` (each field honoured, ignored or refused, with the reason), and the two
translations, :func:`config_from_peft_dict` (a parsed ``adapter_config.json`` -> a
:class:`lora_ref.LoraConfig`) and :func:`config_to_peft_dict` (the other way, every field present,
as PEFT writes it). Both are re-exported by :mod:`lora_ref.peft_io`.

Contract: every field is either honoured, irrelevant to a saved adapter (accepted and
documented), or refused with ``NotImplementedError`` naming it when set. A field PEFT 0.21.2 does
not have is refused unless it is off (null, false, empty). Invalid values raise
:class:`AdapterFormatError` naming the file and the field. Nothing is silently ignored.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from .checks import is_int
from .config import LoraConfig
from .files import FileFormatError

__all__ = ["CONFIG_FIELDS", "CONFIG_NAME", "EMBEDDING_LAYER_NAMES", "PEFT_VERSION", "AdapterFormatError",
           "config_from_peft_dict", "config_to_peft_dict"]

PEFT_VERSION = "0.21.2"            # the PEFT whose LoraConfig fields are classified below
CONFIG_NAME = "adapter_config.json"
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")   # peft.utils.constants: the names ensure_weight_tying acts on


class AdapterFormatError(FileFormatError):
    """A PEFT adapter (its config, its safetensors file, or its fit to a base model) is invalid."""


# ============================================================================================
# adapter_config.json: every field of PEFT 0.21.2's LoraConfig, and what lora-ref does with it
# ============================================================================================

# name -> (decision, explanation). Decisions: "honoured" (mapped onto lora_ref.LoraConfig),
# "ignored" (cannot change a saved adapter's function), "refused" (NotImplementedError when set).
CONFIG_FIELDS: dict[str, tuple[str, str]] = {
    # PeftConfig (peft/config.py)
    "peft_type": ("honoured", 'must be "LORA"; any other PEFT method is refused'),
    "task_type": ("ignored", "picks PEFT's wrapper class; the LoRA math is the same for every task"),
    "auto_mapping": ("ignored", "which base-model class PEFT instantiates"),
    "peft_version": ("ignored", "the PEFT version that wrote the file"),
    "base_model_name_or_path": ("ignored", "informational; the base model is passed to lora-ref"),
    "revision": ("ignored", "informational (the base model's revision)"),
    "inference_mode": ("ignored", "whether PyTorch marks the adapter trainable"),
    # LoraConfig (peft/tuners/lora/config.py)
    "r": ("honoured", "LoraConfig.r"),
    "lora_alpha": ("honoured", "LoraConfig.alpha"),
    "lora_dropout": ("honoured", "LoraConfig.dropout (training only; inference applies none)"),
    "target_modules": ("honoured", 'list or regex string; null and "all-linear" are refused '
                                   "(PEFT resolves them against the model when it creates an adapter)"),
    "fan_in_fan_out": ("honoured", "LoraConfig.fan_in_fan_out: how the base checkpoint stores W"),
    "use_rslora": ("honoured", "LoraConfig.use_rslora: scale alpha/sqrt(r)"),
    "rank_pattern": ("honoured", "LoraConfig.rank_pattern (PEFT's first-matching-key rule)"),
    "alpha_pattern": ("honoured", "LoraConfig.alpha_pattern"),
    "layers_to_transform": ("honoured", "LoraConfig.layers_to_transform (an empty list means all layers)"),
    "layers_pattern": ("honoured", "LoraConfig.layers_pattern"),
    "bias": ("honoured", 'only "none"; "all" and "lora_only" train base biases, refused'),
    "init_lora_weights": ("honoured", 'true, false, "gaussian" -> LoraConfig.init; "eva", "orthogonal", '
                                      '"mica" accepted (creation only, the base is untouched); "pissa*", '
                                      '"olora", "corda", "loftq", "lora_ga" refused (they rewrite the base '
                                      "weights, so the adapter only fits the modified base)"),
    "exclude_modules": ("refused", "changes which modules are targeted; lora_ref.LoraConfig has no exclusions"),
    "modules_to_save": ("refused", "saves whole trained base modules with the adapter"),
    "megatron_config": ("refused", "Megatron parallel layers"),
    "megatron_core": ("ignored", "only read together with megatron_config"),
    "trainable_token_indices": ("refused", "trainable-token embedding deltas"),
    "loftq_config": ("ignored", 'creation only (init_lora_weights="loftq" is refused)'),
    "eva_config": ("ignored", "creation only: EVA's data-driven init; its ranks are saved in rank_pattern"),
    "corda_config": ("ignored", 'creation only (init_lora_weights="corda" is refused)'),
    "lora_ga_config": ("ignored", 'creation only (init_lora_weights="lora_ga" is refused)'),
    "use_dora": ("honoured", "LoraConfig.use_dora: DoRA's magnitude vector (lora_magnitude_vector, (d_out,)) on "
                             "linear layers; DoRA on embeddings or convolutions, and with lora_bias, is refused"),
    "velora_config": ("refused", "VeLoRA: an approximate backward pass (gradients differ from LoRA's)"),
    "alora_invocation_tokens": ("refused", "activated LoRA: the adapter acts only after given tokens"),
    "use_qalora": ("refused", "QA-LoRA: pooled inputs on the adapter branch"),
    "qalora_group_size": ("ignored", "only read together with use_qalora"),
    "monteclora_config": ("refused", "MonteCLoRA: sampled adapters"),
    "layer_replication": ("refused", "repeats base layers, changing the model's depth"),
    "runtime_config": ("ignored", "runtime settings; PEFT does not save them"),
    "lora_bias": ("refused", "a trainable bias on lora_B"),
    "target_parameters": ("refused", "LoRA on bare nn.Parameters (mixture-of-experts weights)"),
    "use_bdlora": ("refused", "block-diagonal LoRA factors"),
    "arrow_config": ("refused", "Arrow routing between several adapters"),
    "kasa_config": ("refused", "KaSA: a singular-value diagonal between A and B, and a truncated base"),
    "ensure_weight_tying": ("refused", "PEFT then gives a tied output head its own adapter sharing the embedding "
                                       "adapter's factors, merges the delta into the shared table twice, and loses the "
                                       "head's adapter on reloading a GPT-2 (docs/embedding.md): the file does not define "
                                       "one model. It acts only when a target is named embed_tokens or lm_head "
                                       "(PEFT's EMBEDDING_LAYER_NAMES); with any other targets PEFT changes nothing, "
                                       "and the file is accepted"),
}

# Refused fields are off when they hold one of these values (PEFT's defaults and its "unset").
_OFF_VALUES: dict[str, tuple[Any, ...]] = {
    "exclude_modules": (None, [], ""), "modules_to_save": (None, []), "megatron_config": (None,),
    "trainable_token_indices": (None,), "velora_config": (None,),
    "alora_invocation_tokens": (None,), "use_qalora": (False, None), "monteclora_config": (None,),
    "layer_replication": (None,), "lora_bias": (False, None), "target_parameters": (None,),
    "use_bdlora": (None,), "arrow_config": (None,), "kasa_config": (None,), "ensure_weight_tying": (False, None),
}
assert set(_OFF_VALUES) == {k for k, (d, _) in CONFIG_FIELDS.items() if d == "refused"}

_INIT_TO_PEFT = {"kaiming": True, "gaussian": "gaussian", "random": False}
_INIT_ACCEPTED = ("eva", "orthogonal", "mica")          # creation-only schemes that leave W alone
_INIT_REFUSED = ("pissa", "olora", "corda", "loftq", "lora_ga")


def _same_json(a: Any, b: Any) -> bool:
    """JSON equality that tells ``false`` from ``0`` (Python's ``False == 0`` does not)."""
    return type(a) is type(b) and a == b


def _is_off(name: str, value: Any, d: Mapping[str, Any]) -> bool:
    if name == "ensure_weight_tying" and value is True and not _ties(d.get("target_modules")):
        return True                        # PEFT only warns: no target it could tie
    return any(_same_json(value, off) for off in _OFF_VALUES[name])


def _ties(targets: Any) -> bool:
    """PEFT 0.21.2's rule (``BaseTuner._check_tied_modules``): ``ensure_weight_tying`` acts when a
    list target's last name part, or a match of a regex target, is in ``EMBEDDING_LAYER_NAMES``.
    (It also needs a base model with tied weights, which a file does not say: assumed.)"""
    if isinstance(targets, str):
        try:
            return any(re.fullmatch(targets, name) for name in EMBEDDING_LAYER_NAMES)
        except re.error:
            return False                   # an invalid regex is refused later, by LoraConfig
    if isinstance(targets, list):
        return any(isinstance(t, str) and t.split(".")[-1] in EMBEDDING_LAYER_NAMES for t in targets)
    return False


def config_from_peft_dict(d: Mapping[str, Any], *, source: str = CONFIG_NAME) -> LoraConfig:
    """A :class:`~lora_ref.lora.LoraConfig` from a parsed ``adapter_config.json``.

    Honoured fields are mapped (``lora_alpha`` -> ``alpha``, ``lora_dropout`` -> ``dropout``,
    ``init_lora_weights`` -> ``init`` ...); fields that cannot change a saved adapter are accepted;
    fields naming a feature lora-ref does not implement raise ``NotImplementedError`` naming the
    field and its value when set (see :data:`CONFIG_FIELDS`). Invalid values raise
    :class:`AdapterFormatError` naming ``source`` and the field.
    """
    if not isinstance(d, Mapping):
        raise AdapterFormatError(f"{source}: must be a JSON object, got {type(d).__name__}")
    fail = lambda msg: AdapterFormatError(f"{source}: {msg}")  # noqa: E731

    peft_type = d.get("peft_type", None)
    if peft_type != "LORA":
        if peft_type is None or not isinstance(peft_type, str):
            raise fail(f'"peft_type" must be "LORA", got {peft_type!r}')
        raise NotImplementedError(f'{source}: "peft_type" is {peft_type!r}; lora-ref reads LoRA adapters ("LORA") only')
    if d.get("use_dora") is True and d.get("lora_bias") is True:
        raise NotImplementedError(f"{source}: use_dora=True with lora_bias=True: PEFT itself refuses this combination, "
                                  "and lora-ref implements neither a bias on lora_B nor its DoRA form")
    for name, value in d.items():
        if not isinstance(name, str):
            raise fail(f"field names must be strings, got {name!r}")
        decision = CONFIG_FIELDS.get(name, ("unknown", ""))[0]
        if decision == "refused" and not _is_off(name, value, d):
            raise NotImplementedError(
                f"{source}: {name}={value!r} is not implemented by lora-ref ({CONFIG_FIELDS[name][1]}); "
                "refusing the adapter rather than ignoring the setting")
        if decision == "unknown" and not any(_same_json(value, off) for off in (None, False, [], {}, "")):
            raise NotImplementedError(
                f"{source}: field {name!r}={value!r} is not a field of PEFT {PEFT_VERSION}'s LoraConfig, "
                "so lora-ref cannot know what it changes; refusing the adapter")
    use_dora = d.get("use_dora", False)
    if use_dora is None:
        use_dora = False
    if not isinstance(use_dora, bool):
        raise fail(f'"use_dora" must be true or false, got {use_dora!r}')
    bias = d.get("bias", "none")
    if bias != "none":
        if not isinstance(bias, str):
            raise fail(f'"bias" must be "none", "all" or "lora_only", got {bias!r}')
        raise NotImplementedError(f'{source}: bias={bias!r} trains base-model biases; lora-ref supports bias="none" only')

    init = _init_from_peft(d.get("init_lora_weights", True), source)
    targets = d.get("target_modules", None)
    if targets is None:
        raise NotImplementedError(
            f'{source}: "target_modules" is null: PEFT fills in a per-architecture default when it creates '
            "the adapter, which lora-ref does not guess; list the modules")
    if isinstance(targets, str) and targets.lower() == "all-linear":
        raise NotImplementedError(
            f'{source}: target_modules="all-linear" is resolved by PEFT against the model at creation (and '
            "saved expanded); lora-ref needs the explicit list of module names")
    if isinstance(targets, list) and not all(isinstance(t, str) for t in targets):
        raise fail(f'"target_modules" must be a list of strings or a regex string, got {targets!r}')
    if not isinstance(targets, (str, list)):
        raise fail(f'"target_modules" must be a list of strings or a regex string, got {targets!r}')
    layers = d.get("layers_to_transform", None)
    if isinstance(layers, list) and not layers:
        layers = None                      # PEFT: an empty list means every layer
    pattern = d.get("layers_pattern", None)
    if pattern in ("", []):
        pattern = None                     # PEFT: an empty pattern means any layer container
    if isinstance(targets, str) and (layers is not None or pattern is not None):
        raise fail("layers_to_transform / layers_pattern cannot be used with a regex target_modules "
                   f"({targets!r}); PEFT refuses this config")
    if pattern is not None and layers is None:
        raise fail(f"layers_pattern={pattern!r} is set but layers_to_transform is not; PEFT refuses this config")
    for name in ("rank_pattern", "alpha_pattern"):
        if d.get(name) is not None and not isinstance(d.get(name), dict):
            raise fail(f'"{name}" must be an object mapping module patterns to values, got {d.get(name)!r}')
    for name in ("fan_in_fan_out", "use_rslora"):
        if not isinstance(d.get(name, False), bool):
            raise fail(f'"{name}" must be true or false, got {d.get(name)!r}')
    if layers is not None and not is_int(layers) and not (isinstance(layers, list) and all(is_int(i) for i in layers)):
        raise fail(f'"layers_to_transform" must be a layer index (an integer) or a list of layer indices, '
                   f"got {layers!r}")
    if isinstance(pattern, list) and not all(isinstance(p, str) for p in pattern):
        raise fail(f'"layers_pattern" must be a name or a list of names, got {pattern!r}')
    try:
        return LoraConfig(
            r=d.get("r", 8), alpha=d.get("lora_alpha", 8), dropout=d.get("lora_dropout", 0.0),
            use_rslora=d.get("use_rslora", False), init=init, fan_in_fan_out=d.get("fan_in_fan_out", False),
            target_modules=targets, rank_pattern=d.get("rank_pattern") or None,
            alpha_pattern=d.get("alpha_pattern") or None, layers_to_transform=layers, layers_pattern=pattern,
            use_dora=use_dora)
    except (TypeError, ValueError) as exc:
        raise fail(f"invalid LoRA setting: {exc}") from exc


def _init_from_peft(value: Any, source: str) -> str:
    if value is True:
        return "kaiming"
    if value is False:
        return "random"
    if not isinstance(value, str):
        raise AdapterFormatError(f'{source}: "init_lora_weights" must be true, false or a scheme name, got {value!r}')
    if value == "gaussian":
        return "gaussian"
    if value.lower() in _INIT_ACCEPTED:
        return "kaiming"                   # creation-only: the saved A and B are all that matters
    if value.lower() == "olora" or value.startswith(_INIT_REFUSED):
        raise NotImplementedError(
            f"{source}: init_lora_weights={value!r} rewrites the base model's weights when the adapter is "
            "created, so this adapter fits only that modified base; convert it to a plain LoRA first "
            "(PEFT: save_pretrained(..., path_initial_model_for_weight_conversion=...))")
    raise NotImplementedError(f"{source}: init_lora_weights={value!r} is not a scheme lora-ref knows")


def config_to_peft_dict(lora_config: LoraConfig, base_model_name_or_path: str | None = None) -> dict[str, Any]:
    """``lora_config`` as the ``adapter_config.json`` dict PEFT 0.21.2 writes (every field present).

    Raises ``ValueError`` for a config PEFT cannot express: ``enable_lora`` (loralib's
    ``MergedLinear``, which adapts only some row-blocks of a fused projection).
    """
    if not isinstance(lora_config, LoraConfig):
        raise TypeError(f"lora_config must be a lora_ref.LoraConfig, got {type(lora_config).__name__}")
    if lora_config.enable_lora:
        raise ValueError(
            f"lora_config.enable_lora={dict(lora_config.enable_lora)!r} is loralib's MergedLinear (an adapter on "
            "some row-blocks of a fused projection); the PEFT format cannot express it. Save the dense "
            "delta instead, or adapt the whole projection (no enable_lora)")
    if base_model_name_or_path is not None and not isinstance(base_model_name_or_path, str):
        raise TypeError(f"base_model_name_or_path must be a string or None, got {base_model_name_or_path!r}")
    number = lambda v: int(v) if float(v).is_integer() else float(v)  # noqa: E731 (8, not 8.0)
    targets = lora_config.target_modules
    if targets is None:
        raise ValueError("lora_config.target_modules is None: a PEFT adapter must name its target modules")
    # (Layer settings PEFT refuses -- with a regex target, or a pattern without layers -- cannot
    # reach here: LoraConfig refuses them on construction.)
    pattern = lora_config.layers_pattern
    out: dict[str, Any] = {name: None for name in CONFIG_FIELDS}
    out.update({
        "peft_type": "LORA", "peft_version": PEFT_VERSION, "task_type": None, "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path, "revision": None, "inference_mode": True,
        "r": lora_config.r, "lora_alpha": number(lora_config.alpha), "lora_dropout": lora_config.dropout,
        "target_modules": targets if isinstance(targets, str) else list(targets),
        "fan_in_fan_out": lora_config.fan_in_fan_out, "use_rslora": lora_config.use_rslora,
        "rank_pattern": dict(lora_config.rank_pattern),
        "alpha_pattern": {k: number(v) for k, v in lora_config.alpha_pattern.items()},
        "layers_to_transform": None if lora_config.layers_to_transform is None else list(lora_config.layers_to_transform),
        "layers_pattern": None if pattern is None else (pattern[0] if len(pattern) == 1 else list(pattern)),
        "bias": "none", "init_lora_weights": _INIT_TO_PEFT[lora_config.init],
        "megatron_core": "megatron.core", "loftq_config": {}, "use_dora": lora_config.use_dora, "use_qalora": False,
        "qalora_group_size": 16, "lora_bias": False, "ensure_weight_tying": False,
    })
    del out["runtime_config"]              # PEFT's to_dict drops it
    return out


