"""What to adapt and how: :class:`LoraConfig`, and PEFT's rules for choosing target modules.

LoRA's math (:mod:`lora_ref.lora`) takes a rank, a scale and arrays; a *configuration* says which
modules of a model get an adapter and with which rank and scale. The rules here are PEFT 0.21.2's
(``peft/tuners/tuners_utils.py``: ``check_target_module_exists``; ``peft/tuners/lora/config.py``),
quoted in each method, so an adapter file PEFT writes selects the same modules here:

* ``target_modules``: a list selects a module whose name equals an entry or ends with
  ``"." + entry``; a string is a regular expression matched against the whole name.
* ``layers_to_transform`` / ``layers_pattern``: restrict list targets to some layer indices.
* ``rank_pattern`` / ``alpha_pattern``: per-module overrides of ``r`` / ``alpha``; the first key
  (in insertion order) whose regex matches the end of the name wins.
* ``enable_lora`` (loralib ``MergedLinear``, not PEFT): adapt only some row-blocks of a fused
  projection such as GPT-2's ``c_attn``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np

from .checks import boolean, finite_real, is_int, positive_int, probability
from .lora import INIT_SCHEMES, lora_scale

__all__ = ["LoraConfig", "check_enable_lora"]


def _pattern_lookup(pattern: Mapping[str, Any], module_name: str) -> Any | None:
    """PEFT's rule for rank_pattern / alpha_pattern: the first key ``k`` (in insertion order) for
    which ``re.match(rf"(.*\\.)?({k})$", module_name)`` matches wins -- that is, the name equals
    ``k`` or ends with ``"." + k``, with ``k`` read as a regular expression."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return None


def _frozen_mapping(value: Any, name: str, check: Any) -> Mapping[str, Any]:
    if value is None:
        return MappingProxyType({})
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a mapping of module-name pattern to value, got {type(value).__name__}")
    out = {}
    for key, item in value.items():
        if not isinstance(key, str):
            raise TypeError(f"{name} keys must be strings, got {key!r}")
        try:
            re.compile(key)
        except re.error as exc:
            raise ValueError(f"{name} key {key!r} is not a valid regular expression: {exc}") from exc
        out[key] = check(item, f"{name}[{key!r}]")
    return MappingProxyType(out)


def check_enable_lora(value: Any, name: str) -> tuple[bool, ...]:
    """loralib ``enable_lora`` flags: a non-empty tuple of bools, at least one True."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        raise TypeError(f"{name} must be a non-empty sequence of booleans such as (True, False, True), got {value!r}")
    flags = tuple(value)
    if not all(isinstance(f, (bool, np.bool_)) for f in flags):
        raise TypeError(f"{name} must contain booleans only, got {value!r}")
    if not any(flags):
        raise ValueError(f"{name} enables no block: {value!r}; leave the module out of the targets instead")
    return tuple(bool(f) for f in flags)


@dataclass(frozen=True)
class LoraConfig:
    """What to adapt and how: rank, alpha, dropout, scaling, init, targeting. Immutable; validated.

    Parameters
    ----------
    r : int
        The rank (Section 4.1). Any positive integer; a rank above ``min(d_in, d_out)`` is legal
        (as in PEFT) but wasteful: ``B @ A`` can never exceed rank ``min(d_in, d_out)``.
    alpha : float
        ``lora_alpha``; the update is scaled by ``alpha / r`` (or ``alpha / sqrt(r)``).
    dropout : float
        Dropout probability on the adapter branch's input, in ``[0, 1)``.
    use_rslora : bool
        Scale by ``alpha / sqrt(r)`` instead of ``alpha / r``.
    init : {"kaiming", "gaussian", "random"}
        How :func:`lora_ref.lora.init_lora` draws A and B (see there).
    fan_in_fan_out : bool
        The *base model* stores weights as (d_in, d_out) (GPT-2's Conv1D). Adapters keep the
        layout of :mod:`lora_ref.lora` either way; loaders and :func:`lora_ref.lora.merge`
        transpose the delta when this is set.
    target_modules : list of str, str, or None
        Which modules get adapters. A list matches a module whose name equals an entry or ends
        with ``"." + entry``; a string is a regular expression matched against the whole name.
    rank_pattern, alpha_pattern : mapping of str to int / float
        Per-module overrides of ``r`` / ``alpha`` (see :meth:`rank_for`).
    layers_to_transform : int or list of int
        Only modules in these layer indices get adapters.
    layers_pattern : str or list of str, optional
        The name of the layer container in module names (``"h"`` for GPT-2), used with
        ``layers_to_transform``; by default the first ``.<name>.<digits>.`` found is the index.
    enable_lora : mapping of str to tuple of bool
        loralib ``MergedLinear`` for fused projections: for modules matching a key (same rule as
        ``rank_pattern``), adapt only the flagged row-blocks, e.g. ``{"c_attn": (True, False, True)}``
        adapts q and v of GPT-2's fused qkv, as the paper's GPT-2 experiments did.
    """

    r: int
    alpha: float
    dropout: float = 0.0
    use_rslora: bool = False
    init: str = "kaiming"
    fan_in_fan_out: bool = False
    target_modules: tuple[str, ...] | str | None = None
    rank_pattern: Mapping[str, int] = field(default=None)  # type: ignore[assignment]
    alpha_pattern: Mapping[str, float] = field(default=None)  # type: ignore[assignment]
    layers_to_transform: tuple[int, ...] | None = None
    layers_pattern: tuple[str, ...] | None = None
    enable_lora: Mapping[str, tuple[bool, ...]] = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        set_("r", positive_int(self.r, "r"))
        set_("alpha", finite_real(self.alpha, "alpha"))
        set_("dropout", probability(self.dropout, "dropout"))
        set_("use_rslora", boolean(self.use_rslora, "use_rslora"))
        set_("fan_in_fan_out", boolean(self.fan_in_fan_out, "fan_in_fan_out"))
        if self.init not in INIT_SCHEMES:
            raise ValueError(f"init must be one of {', '.join(INIT_SCHEMES)}, got {self.init!r}")
        targets = self.target_modules
        if targets is not None and not isinstance(targets, str):
            if isinstance(targets, bytes) or not isinstance(targets, Sequence | set | frozenset):
                raise TypeError(f"target_modules must be a list of names, a regex string, or None, got {targets!r}")
            targets = tuple(sorted(targets)) if isinstance(targets, set | frozenset) else tuple(targets)
            if not targets or not all(isinstance(t, str) and t for t in targets):
                raise ValueError(f"target_modules must be non-empty module names, got {self.target_modules!r}")
        elif isinstance(targets, str):
            try:
                re.compile(targets)
            except re.error as exc:
                raise ValueError(f"target_modules regex {targets!r} is invalid: {exc}") from exc
        set_("target_modules", targets)
        set_("rank_pattern", _frozen_mapping(self.rank_pattern, "rank_pattern", positive_int))
        set_("alpha_pattern", _frozen_mapping(self.alpha_pattern, "alpha_pattern", finite_real))
        set_("enable_lora", _frozen_mapping(self.enable_lora, "enable_lora", check_enable_lora))
        layers = self.layers_to_transform
        if layers is not None:
            layers = (layers,) if is_int(layers) else tuple(layers)
            if not layers or not all(is_int(i) and i >= 0 for i in layers):
                raise ValueError(f"layers_to_transform must be non-negative layer indices, got {self.layers_to_transform!r}")
            layers = tuple(int(i) for i in layers)
        set_("layers_to_transform", layers)
        pattern = self.layers_pattern
        if pattern is not None:
            pattern = (pattern,) if isinstance(pattern, str) else tuple(pattern)
            if not pattern or not all(isinstance(p, str) and p for p in pattern):
                raise ValueError(f"layers_pattern must be a name or list of names, got {self.layers_pattern!r}")
        set_("layers_pattern", pattern)
        # PEFT's LoraConfig refuses these combinations rather than ignoring the layer settings.
        if isinstance(targets, str) and (layers is not None or pattern is not None):
            raise ValueError(
                "layers_to_transform and layers_pattern cannot be used when target_modules is a regex "
                f"string ({targets!r}): put the layer restriction in the regex instead")
        if pattern is not None and layers is None:
            raise ValueError(f"layers_pattern={self.layers_pattern!r} needs layers_to_transform as well")

    @property
    def scale(self) -> float:
        """``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA (modules without pattern overrides)."""
        return lora_scale(self.alpha, self.r, self.use_rslora)

    def rank_for(self, module_name: str) -> int:
        """The rank of ``module_name``'s adapter: ``rank_pattern``'s first matching key, else ``r``."""
        found = _pattern_lookup(self.rank_pattern, module_name)
        return self.r if found is None else found

    def alpha_for(self, module_name: str) -> float:
        """``alpha_pattern``'s first matching key for ``module_name``, else ``alpha``."""
        found = _pattern_lookup(self.alpha_pattern, module_name)
        return self.alpha if found is None else found

    def scale_for(self, module_name: str) -> float:
        """The scale of ``module_name``'s adapter: ``alpha_for / rank_for`` (or ``/ sqrt``)."""
        return lora_scale(self.alpha_for(module_name), self.rank_for(module_name), self.use_rslora)

    def enable_for(self, module_name: str) -> tuple[bool, ...] | None:
        """The ``enable_lora`` flags for ``module_name`` (None: the whole weight is adapted)."""
        return _pattern_lookup(self.enable_lora, module_name)

    def layer_index(self, module_name: str) -> int | None:
        """The layer index in ``module_name``, by PEFT's rule (``check_target_module_exists``).

        Without ``layers_pattern``: the digits of the first ``.<name>.<digits>.`` that follows at
        least one dot (``"transformer.h.3.attn"`` -> 3; a bare ``"h.3.attn"`` -> None). With it: for
        each pattern in order, the first ``<pattern>.<digits>.`` at the start or after a dot; the
        first pattern that matches wins.
        """
        if not self.layers_pattern:
            found = re.match(r".*?\.[^.]*\.(\d+)\.", module_name)
        else:
            found = None
            for pattern in self.layers_pattern:
                found = re.match(rf"(?:^|.*?\.){re.escape(pattern)}\.(\d+)\.", module_name)
                if found:
                    break
        return int(found.group(1)) if found else None

    def targets(self, module_name: str) -> bool:
        """Whether ``module_name`` gets an adapter, by PEFT's rule (``check_target_module_exists``).

        A regex string must match the whole name (``layers_to_transform`` is then not consulted);
        a list entry equal to the name selects it; an entry the name ends with (after a dot)
        selects it if its :meth:`layer_index` is in ``layers_to_transform`` (when that is set).
        """
        targets = self.target_modules
        if targets is None:
            return False
        if isinstance(targets, str):
            hit = re.fullmatch(targets, module_name) is not None
        elif module_name in targets:
            hit = True  # named exactly: PEFT adapts it whatever layers_to_transform says
        else:
            hit = any(module_name.endswith("." + t) for t in targets)
            if hit and self.layers_to_transform is not None:
                hit = self.layer_index(module_name) in self.layers_to_transform
        return hit
