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

Every regular expression (a string ``target_modules``, pattern keys, ``layers_pattern``) comes from
a file that may be hostile, and Python's ``re`` backtracks: ``"(.*.*)*q"`` takes minutes on one
module name (PEFT hangs on it). So each is checked by :func:`check_regex` before it is used: no
repetition inside a repetition, no alternation or optional part inside one, at most
:data:`MAX_REPETITIONS` repetitions in all. Matching then costs a polynomial in the name's length,
never an exponential. docs/files.md says why this rule rather than a time limit.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from .checks import boolean, enable_flags as check_enable_lora, finite_real, is_int, positive_int, probability

try:                                        # the parser of Python's re (3.11+), for check_regex
    from re import _constants as _sre
    from re import _parser as _sre_parse
except ImportError:                         # Python 3.10
    import sre_constants as _sre
    import sre_parse as _sre_parse

__all__ = ["INIT_SCHEMES", "MAX_REPETITIONS", "LoraConfig", "check_enable_lora", "check_regex", "lora_scale"]

INIT_SCHEMES = ("kaiming", "gaussian", "random")
"""How :func:`lora_ref.lora.init_lora` may draw A and B (``LoraConfig.init``)."""


# The scale s (Section 4.1: "We then scale dW x by alpha / r"): the one number the config's rank
# and alpha decide; lora_ref.lora applies it.
def lora_scale(alpha: float, r: int, use_rslora: bool = False) -> float:
    """The factor s multiplying B A x (Section 4.1 of the paper; rsLoRA, arXiv 2312.03732).

    ``s = alpha / r`` (LoRA), or ``s = alpha / sqrt(r)`` (rsLoRA, rank-stabilised). Returned as a
    Python float so that a float32 computation stays float32 under NumPy 2's promotion rules.
    """
    r = positive_int(r, "r")
    alpha = finite_real(alpha, "alpha")
    return alpha / (math.sqrt(r) if use_rslora else r)


MAX_REPETITIONS = 3
"""The most repetitions (``*``, ``+``, ``{m,n}`` with n > 1) a pattern may hold: matching a name of
n characters against k unnested ones backtracks through at most about n^(k+1) states."""

_REPEATS = tuple(getattr(_sre, op) for op in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT") if hasattr(_sre, op))


def _repetitions(items: Any, pattern: str, name: str, loop: str | None) -> int:
    """Count the repetitions in parsed ``items``; raise ValueError for an ambiguous one.

    ``loop`` is the text of the enclosing repetition's operator, None outside any. Inside a
    repetition nothing may offer the matcher a choice (another repetition, an optional part, an
    alternation): each choice multiplies the ways to split a name, which is what makes
    backtracking exponential.
    """
    def refuse(what: str) -> ValueError:
        return ValueError(
            f"{name} {pattern!r} has {what} inside a repetition ({loop}): Python's regular expressions can take "
            "exponential time to match such a pattern (catastrophic backtracking), so lora-ref refuses it "
            "(PEFT would accept it, and may hang); write it without the nesting ('.*q' matches what '(.*.*)*q' "
            "matches)")

    count = 0
    for op, av in items:
        if op in _REPEATS:
            low, high, body = av
            is_loop = high == _sre.MAXREPEAT or high > 1
            if loop is not None and (is_loop or low != high):
                raise refuse("a repetition" if is_loop else "an optional part (?)")
            text = "*" if low == 0 and high == _sre.MAXREPEAT else "+" if high == _sre.MAXREPEAT else f"{{{low},{high}}}"
            count += is_loop + _repetitions(body, pattern, name, text if is_loop else None)
        elif op == _sre.BRANCH:
            if loop is not None:
                raise refuse("an alternation (|)")
            count += sum(_repetitions(branch, pattern, name, loop) for branch in av[1])
        elif op == _sre.GROUPREF_EXISTS:
            if loop is not None:
                raise refuse("a conditional group")
            count += sum(_repetitions(branch, pattern, name, loop) for branch in av[1:] if branch is not None)
        elif op == _sre.SUBPATTERN:
            count += _repetitions(av[3], pattern, name, loop)
        elif op in (_sre.ASSERT, _sre.ASSERT_NOT):
            count += _repetitions(av[1], pattern, name, loop)
        elif op == getattr(_sre, "ATOMIC_GROUP", None):
            count += _repetitions(av, pattern, name, loop)
    return count


def check_regex(pattern: Any, name: str) -> str:
    """``pattern`` if it is a regular expression lora-ref will match; else ValueError or TypeError.

    Refused, with a message naming ``name``: a pattern that does not compile; one with a repetition
    (``*``, ``+``, ``{m,n}``), an optional part (``?``) or an alternation (``|``) inside a
    repetition, such as ``"(.*.*)*q"`` or ``"(a|ab)+"``; one with more than
    :data:`MAX_REPETITIONS` repetitions. These bound the backtracking of Python's ``re``: the
    refused forms take exponential (or high-polynomial) time on a name that almost matches.
    Character classes such as ``(q|k|v)`` (``re`` reads single characters as a set) are fine.
    """
    if not isinstance(pattern, str):
        raise TypeError(f"{name} must be a string (a regular expression), got {pattern!r}")
    try:
        re.compile(pattern)
        parsed = _sre_parse.parse(pattern)
    except re.error as exc:
        raise ValueError(f"{name} {pattern!r} is not a valid regular expression: {exc}") from None
    count = _repetitions(parsed, pattern, name, None)
    if count > MAX_REPETITIONS:
        raise ValueError(
            f"{name} {pattern!r} has {count} repetitions (* + {{m,n}}); lora-ref allows at most {MAX_REPETITIONS}, "
            "because matching time grows like (name length)^(repetitions + 1) when a name almost matches")
    return pattern


def embedding_entry_names(entry: str, module_name: str) -> bool:
    """Whether the ``embedding_modules`` entry ``entry`` names ``module_name``: equal to it, or a
    suffix of it after a dot (``"wte"`` names ``"transformer.wte"``). The one spelling of the rule,
    for :meth:`LoraConfig.is_embedding` and the adapter loaders' check that each entry is used."""
    return module_name == entry or module_name.endswith("." + entry)


def _pattern_lookup(pattern: Mapping[str, Any], module_name: str) -> Any | None:
    """PEFT's rule for rank_pattern / alpha_pattern: the first key ``k`` (in insertion order) for
    which ``re.match(rf"(.*\\.)?({k})$", module_name)`` matches wins -- that is, the name equals
    ``k`` or ends with ``"." + k``, with ``k`` read as a regular expression."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return None


def _layer_regex(pattern: str) -> str:
    """PEFT's regex for the layer index after ``layers_pattern`` (``check_target_module_exists``)."""
    return rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\."


def _frozen_mapping(value: Any, name: str, check: Any) -> Mapping[str, Any]:
    if value is None:
        return MappingProxyType({})
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a mapping of module-name pattern to value, got {type(value).__name__}")
    out = {}
    for key, item in value.items():
        if not isinstance(key, str):
            raise TypeError(f"{name} keys must be strings, got {key!r}")
        check_regex(key, f"{name} key")
        out[key] = check(item, f"{name}[{key!r}]")
    return MappingProxyType(out)


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
    use_dora : bool
        DoRA (Liu et al. 2024, :mod:`lora_ref.dora`): each adapted linear projection also carries
        a magnitude vector ``m`` (d_out,) and computes ``m * (W + s B A) / ||W + s B A||_row``.
        Not combinable with ``enable_lora`` (PEFT applies DoRA to the whole fused weight only), nor
        with ``embedding_modules`` (PEFT has a DoRA for embeddings; lora-ref does not).
    embedding_modules : list of str
        Which targeted modules are embedding tables (PyTorch ``nn.Embedding``: GPT-2's ``wte``,
        LLaMA's ``embed_tokens``), matched like a ``target_modules`` list (the name equals an entry
        or ends with ``"." + entry``). Their adapters have the layout of :mod:`lora_ref.embedding`
        (A (r, V), B (D, r)), which an adapter dict cannot tell from a linear one; the PEFT
        format stores them under other keys (``lora_embedding_A`` / ``lora_embedding_B``), so
        :func:`lora_ref.peft_io.load_peft_adapter` fills this in from the keys and
        :func:`~lora_ref.peft_io.save_peft_adapter` writes the keys from it (and refuses an entry
        that matches no adapter). Default: none.
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
    use_dora: bool = False
    embedding_modules: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        set_("r", positive_int(self.r, "r"))
        set_("alpha", finite_real(self.alpha, "alpha"))
        set_("dropout", probability(self.dropout, "dropout"))
        set_("use_rslora", boolean(self.use_rslora, "use_rslora"))
        set_("fan_in_fan_out", boolean(self.fan_in_fan_out, "fan_in_fan_out"))
        set_("use_dora", boolean(self.use_dora, "use_dora"))
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
            check_regex(targets, "target_modules regex")
        set_("target_modules", targets)
        set_("rank_pattern", _frozen_mapping(self.rank_pattern, "rank_pattern", positive_int))
        set_("alpha_pattern", _frozen_mapping(self.alpha_pattern, "alpha_pattern", finite_real))
        set_("enable_lora", _frozen_mapping(self.enable_lora, "enable_lora", check_enable_lora))
        if self.use_dora and self.enable_lora:
            raise ValueError("use_dora=True cannot be combined with enable_lora: DoRA normalises the whole "
                             "weight's rows, and a fused projection's disabled blocks have no adapter of their own")
        set_("embedding_modules", self._check_embedding_modules())
        layers = self.layers_to_transform
        if layers is not None:
            if is_int(layers):
                layers = (layers,)
            elif isinstance(layers, (str, bytes, Mapping)) or not isinstance(layers, Iterable):
                raise TypeError(f"layers_to_transform must be a layer index (an int) or a list of layer indices, "
                                f"got {layers!r} ({type(layers).__name__})")
            layers = tuple(layers)
            if not layers or not all(is_int(i) and i >= 0 for i in layers):
                raise ValueError(f"layers_to_transform must be non-negative layer indices, got {self.layers_to_transform!r}")
            layers = tuple(int(i) for i in layers)
        set_("layers_to_transform", layers)
        pattern = self.layers_pattern
        if pattern is not None:
            pattern = (pattern,) if isinstance(pattern, str) else tuple(pattern)
            if not pattern or not all(isinstance(p, str) and p for p in pattern):
                raise ValueError(f"layers_pattern must be a name or list of names, got {self.layers_pattern!r}")
            for p in pattern:                # a regular expression, as PEFT reads it (see layer_index)
                check_regex(p, "layers_pattern")
                try:
                    re.compile(_layer_regex(p))
                except re.error as exc:
                    raise ValueError(f"layers_pattern {p!r} cannot be used in PEFT's layer regex "
                                     f"{_layer_regex(p)!r}: {exc}") from None
        set_("layers_pattern", pattern)
        # PEFT's LoraConfig refuses these combinations rather than ignoring the layer settings.
        if isinstance(targets, str) and (layers is not None or pattern is not None):
            raise ValueError(
                "layers_to_transform and layers_pattern cannot be used when target_modules is a regex "
                f"string ({targets!r}): put the layer restriction in the regex instead")
        if pattern is not None and layers is None:
            raise ValueError(f"layers_pattern={self.layers_pattern!r} needs layers_to_transform as well")

    def _check_embedding_modules(self) -> tuple[str, ...]:
        names = self.embedding_modules
        if names is None:
            return ()
        if isinstance(names, (str, bytes)) or not isinstance(names, Iterable) or isinstance(names, Mapping):
            raise TypeError(f"embedding_modules must be a list of module names, got {names!r}")
        names = tuple(sorted(set(names)) if isinstance(names, set | frozenset) else names)
        if not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"embedding_modules must be non-empty module names, got {self.embedding_modules!r}")
        if len(set(names)) != len(names):
            raise ValueError(f"embedding_modules lists a name twice: {self.embedding_modules!r}")
        if names and self.use_dora:
            raise ValueError(f"use_dora=True with embedding_modules={list(names)!r}: DoRA on an embedding table is not "
                             "implemented by lora-ref (PEFT's embedding DoRA normalises over the vocabulary axis)")
        for name in names:
            if self.enable_lora and _pattern_lookup(self.enable_lora, name) is not None:
                raise ValueError(f"embedding_modules entry {name!r} also matches enable_lora: an embedding table is not "
                                 "a fused projection")
        return names

    def is_embedding(self, module_name: str) -> bool:
        """Whether ``module_name`` is one of :attr:`embedding_modules` (equal, or ends with ``"." + entry``)."""
        return any(embedding_entry_names(n, module_name) for n in self.embedding_modules)

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
        r"""The layer index in ``module_name``, by PEFT's rule (``check_target_module_exists``).

        Without ``layers_pattern``: the digits of the first ``.<name>.<digits>.`` that follows at
        least one dot (``"transformer.h.3.attn"`` -> 3; a bare ``"h.3.attn"`` -> None). With it: for
        each pattern in order, the first ``<pattern>.<digits>.`` at the start or after a dot; the
        first pattern that matches wins. Each pattern is a regular expression, inserted unescaped
        as PEFT 0.21.2 does (``re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)``), so
        ``"[h]"`` or ``"(?:layers|h)"`` work as in PEFT (and a bare ``"layers|h"`` splits the whole
        regex in two, as in PEFT).
        """
        if not self.layers_pattern:
            found = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module_name)
        else:
            found = None
            for pattern in self.layers_pattern:
                found = re.match(_layer_regex(pattern), module_name)
                if found:
                    break
        index = found.group("idx") if found else None   # None also when a "|" in the pattern
        return None if index is None else int(index)    # matched without the index group (as PEFT)

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
