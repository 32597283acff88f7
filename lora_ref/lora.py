"""LoRA, the math: clean, minimal, reference.

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv 2106.09685 (v2).
Read top to bottom; each paper equation is cited by its number.

Layout (the same as PEFT's ``lora_A.weight`` / ``lora_B.weight``)::

    W  (d_out, d_in)    frozen pretrained weight,  y = x @ W.T + bias
    A  (r, d_in)        down-projection,  initialised random
    B  (d_out, r)       up-projection,    initialised zero
    x  (..., d_in)      any number of leading (batch, token) dimensions; N = their product
    s                   scale: alpha / r, or alpha / sqrt(r) with rsLoRA

Eq. 3:   h = W0 x + dW x = W0 x + B A x,     with dW x scaled by s:  h = W0 x + s B A x.

Fused projections (GPT-2's ``c_attn`` holds q, k and v in one (3C, C) weight) follow loralib's
``MergedLinear``: ``enable_lora=(q, k, v)`` flags which of the G equal row-blocks of W are adapted.
With n of them enabled, A is (n r, d_in) and B is (n d_out/G, r); enabled block k gets
``s B_k A_k`` with ``A_k = A[k r:(k+1) r]`` and ``B_k = B[k d_out/G:(k+1) d_out/G]``; disabled blocks
get nothing. ``enable_lora=None`` is the plain case (one block, enabled).
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np
from autograd.extend import defvjp, primitive

from .backend import asarray, dtype_name, float_dtype, getval, namespace, to_numpy

__all__ = [
    "INIT_SCHEMES",
    "LoraConfig",
    "delta_weight",
    "dropout_mask",
    "init_lora",
    "lora_linear",
    "lora_parameter_count",
    "lora_scale",
    "merge",
    "pissa_init",
    "unmerge",
]

INIT_SCHEMES = ("kaiming", "gaussian", "random")

# ============================================================================================
# Configuration and scaling
# ============================================================================================


def lora_scale(alpha: float, r: int, use_rslora: bool = False) -> float:
    """The factor s multiplying B A x (Section 4.1 of the paper; rsLoRA, arXiv 2312.03732).

    ``s = alpha / r`` (LoRA), or ``s = alpha / sqrt(r)`` (rsLoRA, rank-stabilised). Returned as a
    Python float so that a float32 computation stays float32 under NumPy 2's promotion rules.
    """
    r = _check_rank(r, "r")
    alpha = _check_finite_real(alpha, "alpha")
    return float(alpha) / (math.sqrt(r) if use_rslora else r)


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


def _check_enable(value: Any, name: str) -> tuple[bool, ...]:
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
        How :func:`init_lora` draws A and B (see there).
    fan_in_fan_out : bool
        The *base model* stores weights as (d_in, d_out) (GPT-2's Conv1D). Adapters keep the
        layout above either way; loaders and :func:`merge` transpose the delta when this is set.
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
        set_("r", _check_rank(self.r, "r"))
        set_("alpha", float(_check_finite_real(self.alpha, "alpha")))
        dropout = _check_finite_real(self.dropout, "dropout")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        set_("dropout", float(dropout))
        for flag in ("use_rslora", "fan_in_fan_out"):
            if not isinstance(getattr(self, flag), (bool, np.bool_)):
                raise TypeError(f"{flag} must be a bool, got {getattr(self, flag)!r}")
            set_(flag, bool(getattr(self, flag)))
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
        set_("rank_pattern", _frozen_mapping(self.rank_pattern, "rank_pattern", _check_rank))
        set_("alpha_pattern", _frozen_mapping(self.alpha_pattern, "alpha_pattern",
                                              lambda v, n: float(_check_finite_real(v, n))))
        set_("enable_lora", _frozen_mapping(self.enable_lora, "enable_lora", _check_enable))
        layers = self.layers_to_transform
        if layers is not None:
            layers = (layers,) if isinstance(layers, numbers.Integral) else tuple(layers)
            if not layers or not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) and i >= 0
                                     for i in layers):
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


# ============================================================================================
# Initialisation (Section 4.1: "random Gaussian initialization for A and zero for B")
# ============================================================================================


def init_lora(d_in: int, d_out: int, r: int, *, init: str = "kaiming", rng: np.random.Generator,
              dtype: Any = "float64") -> tuple[Any, Any]:
    """Draw ``(A, B)`` for a ``(d_out, d_in)`` weight; A is ``(r, d_in)``, B is ``(d_out, r)``.

    * ``"kaiming"``: A ~ U(-1/sqrt(d_in), 1/sqrt(d_in)), B = 0. This is PyTorch's
      ``kaiming_uniform_(a=sqrt(5))`` on A, which PEFT (``init_lora_weights=True``) and loralib use:
      gain sqrt(2/(1+a^2)) = sqrt(1/3), bound sqrt(3) gain / sqrt(fan_in) = 1/sqrt(d_in).
    * ``"gaussian"``: A ~ N(0, (1/r)^2), B = 0 (PEFT's ``init_lora_weights="gaussian"``).
    * ``"random"``: A as kaiming, B ~ U(-1/sqrt(r), 1/sqrt(r)): a *non-identity* adapter for
      tests (PEFT's ``init_lora_weights=False``, which leaves both at nn.Linear's default init).

    With B = 0 the adapted layer starts identical to the base (Eq. 3 with B A = 0). Randomness
    comes only from ``rng``; arrays are created on the current backend.
    """
    d_in, d_out, r = (_check_rank(v, n) for v, n in ((d_in, "d_in"), (d_out, "d_out"), (r, "r")))
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    np_dtype = float_dtype(dtype)
    if init == "kaiming" or init == "random":
        bound = 1.0 / math.sqrt(d_in)
        A = rng.uniform(-bound, bound, size=(r, d_in))
    elif init == "gaussian":
        A = rng.normal(0.0, 1.0 / r, size=(r, d_in))
    else:
        raise ValueError(f"init must be one of {', '.join(INIT_SCHEMES)}, got {init!r}")
    if init == "random":
        bound_b = 1.0 / math.sqrt(r)
        B = rng.uniform(-bound_b, bound_b, size=(d_out, r))
    else:
        B = np.zeros((d_out, r))
    return asarray(A.astype(np_dtype)), asarray(B.astype(np_dtype))


def pissa_init(W: Any, r: int, scale: float) -> tuple[Any, Any, Any]:
    """PiSSA (arXiv 2404.02948): adapters from W's top-r singular triplets, base = the residual.

    With ``W = U S V^T`` (SciPy SVD, descending S), ``A = sqrt(S_r) V_r^T / sqrt(s)`` (r, d_in),
    ``B = U_r sqrt(S_r) / sqrt(s)`` (d_out, r), so ``s B A = U_r S_r V_r^T``, the best rank-r
    approximation of W (Eckart-Young), and ``W_residual = W - s B A``. Returns
    ``(A, B, W_residual)``; ``W_residual + s B A`` reproduces W up to rounding, so the adapted
    model's output is preserved at initialisation. Requires ``r <= min(d_out, d_in)``.
    """
    import scipy.linalg

    W_np = to_numpy(W)
    _check_float_array(W_np, "W")
    if W_np.ndim != 2:
        raise ValueError(f"W must be 2-D (d_out, d_in), got shape {W_np.shape}")
    r = _check_rank(r, "r")
    if r > min(W_np.shape):
        raise ValueError(f"pissa_init: r={r} exceeds min(d_out, d_in)={min(W_np.shape)} for W of shape {W_np.shape}")
    scale = _check_finite_real(scale, "scale")
    if scale <= 0:
        raise ValueError(f"pissa_init: scale must be positive, got {scale!r}")
    U, S, Vt = scipy.linalg.svd(W_np.astype(np.float64), full_matrices=False)
    root = np.sqrt(S[:r])
    A = (root[:, None] * Vt[:r]) / math.sqrt(scale)              # (r, d_in)
    B = (U[:, :r] * root[None, :]) / math.sqrt(scale)            # (d_out, r)
    A, B = A.astype(W_np.dtype), B.astype(W_np.dtype)
    W_res = W_np - scale * (B @ A)
    return asarray(A), asarray(B), asarray(W_res)


def dropout_mask(shape: tuple[int, ...], p: float, rng: np.random.Generator, dtype: Any = "float64") -> Any:
    """An inverted-dropout mask: each entry is 0 with probability p, else ``1/(1-p)``.

    Passing this to :func:`lora_linear` applies dropout to the adapter branch only, as PEFT does,
    and keeps the computation deterministic (the randomness is in the mask you pass).
    """
    p = _check_finite_real(p, "p")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability p must be in [0, 1), got {p!r}")
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    np_dtype = float_dtype(dtype)
    keep = rng.random(size=tuple(shape)) >= p
    return asarray((keep / (1.0 - p)).astype(np_dtype))


# ============================================================================================
# The forward pass (Eq. 3) and its gradients, written out
# ============================================================================================


def _blocks(enable: tuple[bool, ...] | None, d_out: int, r: int) -> list[tuple[slice, slice, slice]]:
    """For each enabled block k: (rows of A, rows of B, rows of W / columns of y) as slices."""
    if enable is None:
        return [(slice(0, r), slice(0, d_out), slice(0, d_out))]
    q = d_out // len(enable)
    out, k = [], 0
    for g, on in enumerate(enable):
        if on:
            out.append((slice(k * r, (k + 1) * r), slice(k * q, (k + 1) * q), slice(g * q, (g + 1) * q)))
            k += 1
    return out


def _scatter(xp: Any, parts: list[Any], enable: tuple[bool, ...] | None, block_shape: tuple[int, ...],
             axis: int, dtype: Any) -> Any:
    """Concatenate the enabled blocks' arrays along ``axis``, zeros of ``block_shape`` for the
    disabled ones (loralib's zero-padding of a MergedLinear's output)."""
    if enable is None:
        return parts[0]
    it = iter(parts)
    zero = xp.zeros(block_shape, dtype=dtype) if not all(enable) else None
    return xp.concat([next(it) if on else zero for on in enable], axis=axis)


def _lora_linear(x: Any, W: Any, A: Any, B: Any, scale: float, bias: Any = None, dropout_mask: Any = None,
                 enable_lora: tuple[bool, ...] | None = None) -> Any:
    """The undecorated forward (see :func:`lora_linear`); autograd.numpy can trace it."""
    _validate(x, W, A, B, scale, bias, dropout_mask, enable_lora)
    xp = namespace(x, W, A, B, bias, dropout_mask)
    y = x @ xp.matrix_transpose(W)                                # (..., d_out)   W0 x
    if bias is not None:
        y = y + bias
    if A is None:
        return y
    xd = x if dropout_mask is None else x * dropout_mask          # dropout on the adapter branch only
    h = xd @ xp.matrix_transpose(A)                               # (..., n r)     A x
    if enable_lora is None:
        delta = h @ xp.matrix_transpose(B)                        # (..., d_out)   B A x
    else:
        blocks = _blocks(enable_lora, W.shape[0], B.shape[-1])
        parts = [h[..., ra] @ xp.matrix_transpose(B[rb, :]) for ra, rb, _ in blocks]  # (..., q): B_k A_k x
        q = W.shape[0] // len(enable_lora)
        delta = _scatter(xp, parts, enable_lora, tuple(x.shape[:-1]) + (q,), -1, x.dtype)  # (..., d_out)
    return y + delta * scale                                      # Eq. 3: W0 x + s B A x


lora_linear = primitive(_lora_linear)
lora_linear.__doc__ = """LoRA's adapted linear layer, Eq. 3: ``y = x W^T + bias + s ((x * mask) A^T) B^T``.

    Parameters
    ----------
    x : array (..., d_in)
    W : array (d_out, d_in)          frozen base weight (differentiated only if traced)
    A : array (r, d_in) or None      None: a plain linear layer, no adapter
    B : array (d_out, r)
    scale : float                    s, e.g. ``config.scale_for(name)``; a Python number
    bias : array (d_out,), optional
    dropout_mask : array broadcastable to x, optional
        Multiplies x on the adapter branch only; carries inverted-dropout scaling already
        (see :func:`dropout_mask`).
    enable_lora : tuple of bool, optional
        loralib MergedLinear: adapt only the flagged row-blocks of W; then A is (n r, d_in) and
        B is (n d_out / G, r) for n enabled of G blocks.

    Returns
    -------
    y : array (..., d_out), same dtype as x.

    Never forms ``B @ A``: the adapter branch costs ``r (d_in + d_out)`` multiply-adds per
    token, not ``d_in d_out``. An autograd primitive: gradients for x, W, A, B and bias are the
    hand-written VJPs below (autograd only asks for those of traced arguments, so a frozen W
    costs nothing in LoRA training). All arrays must share one floating dtype.
    """


# Gradients, with G = dL/dy (..., d_out), X = x flattened to (N, d_in), M the mask, Xd = X * M,
# H = Xd A^T (N, r), and for block k: G_k = G[:, cols_k], H_k = H[:, rows of A_k]:
#   dL/dx    = G W + s (sum_k (G_k B_k) A_k) * M
#   dL/dW    = G^T X                       (only when W is trained: full fine-tuning)
#   dL/dbias = sum over N of G
#   dL/dA_k  = s (G_k B_k)^T Xd            (r, d_in)
#   dL/dB_k  = s G_k^T H_k                 (q, r)
# At init B = 0, so dL/dA = 0 exactly and dL/dB = s G^T (X A^T): only B moves on the first step.


def _flat(t: Any) -> Any:
    """(..., n) -> (N, n): fold the leading dimensions into one."""
    return namespace(t).reshape(t, (-1, t.shape[-1]))


def _vjp_x(ans, x, W, A, B, scale, bias=None, dropout_mask=None, enable_lora=None):
    def vjp(g):
        xp = namespace(g)
        dx = g @ W                                                           # (..., d_in)
        if A is not None:
            r = B.shape[-1]
            gB = [g[..., rw] @ B[rb, :] for _, rb, rw in _blocks(enable_lora, W.shape[0], r)]  # (..., r)
            gBA = (gB[0] if len(gB) == 1 else xp.concat(gB, axis=-1)) @ A      # (..., d_in)
            if dropout_mask is not None:
                gBA = gBA * dropout_mask
            dx = dx + gBA * scale
        return _sum_to_shape(dx, x.shape)
    return vjp


def _vjp_W(ans, x, W, A, B, scale, bias=None, dropout_mask=None, enable_lora=None):
    return lambda g: namespace(g).matrix_transpose(_flat(g)) @ _flat(x)     # (d_out, d_in)


def _vjp_A(ans, x, W, A, B, scale, bias=None, dropout_mask=None, enable_lora=None):
    def vjp(g):
        xp = namespace(g)
        xd = _flat(x if dropout_mask is None else x * dropout_mask)         # (N, d_in)
        G, r = _flat(g), B.shape[-1]
        gB = [G[:, rw] @ B[rb, :] for _, rb, rw in _blocks(enable_lora, W.shape[0], r)]  # (N, r) each
        gB = gB[0] if len(gB) == 1 else xp.concat(gB, axis=-1)              # (N, n r)
        return (xp.matrix_transpose(gB) @ xd) * scale                        # (n r, d_in)
    return vjp


def _vjp_B(ans, x, W, A, B, scale, bias=None, dropout_mask=None, enable_lora=None):
    def vjp(g):
        xp = namespace(g)
        xd = _flat(x if dropout_mask is None else x * dropout_mask)         # (N, d_in)
        H, G, r = xd @ xp.matrix_transpose(A), _flat(g), B.shape[-1]        # (N, n r)
        parts = [xp.matrix_transpose(G[:, rw]) @ H[:, ra] for ra, _, rw in _blocks(enable_lora, W.shape[0], r)]
        dB = parts[0] if len(parts) == 1 else xp.concat(parts, axis=0)      # (n q, r)
        return dB * scale
    return vjp


def _vjp_bias(ans, x, W, A, B, scale, bias=None, dropout_mask=None, enable_lora=None):
    return lambda g: namespace(g).sum(_flat(g), axis=0)                     # (d_out,)


def _no_grad(what):
    def maker(*args, **kwargs):
        raise TypeError(f"lora_linear is not differentiable with respect to {what}")
    return maker


defvjp(lora_linear, _vjp_x, _vjp_W, _vjp_A, _vjp_B, _no_grad("scale (a constant)"), _vjp_bias,
       _no_grad("dropout_mask (a constant)"))


def _sum_to_shape(t: Any, shape: tuple[int, ...]) -> Any:
    """dx has x's shape already unless x was broadcast; sum any broadcast leading dims away."""
    xp = namespace(t)
    while t.ndim > len(shape):
        t = xp.sum(t, axis=0)
    return t


# ============================================================================================
# Merging (Section 4.1: "no additional inference latency")
# ============================================================================================


def delta_weight(A: Any, B: Any, scale: float, enable_lora: tuple[bool, ...] | None = None,
                 d_out: int | None = None) -> Any:
    """``dW = s B A``, shape (d_out, d_in) -- the update LoRA adds to W (Eq. 3).

    With ``enable_lora`` (fused projection), the blocks ``s B_k A_k`` are placed in their rows of
    a (d_out, d_in) matrix and disabled blocks are zero; ``d_out`` (the full fused height) is then
    required when it cannot be derived (it can: ``B.shape[0] / n_enabled * G``).
    """
    xp = namespace(A, B)
    _check_pair(A, B)
    scale = _check_finite_real(scale, "scale")
    if enable_lora is None:
        if A.shape[0] != B.shape[1]:
            raise ValueError(f"A has rank {A.shape[0]} (shape {tuple(A.shape)}) but B has rank {B.shape[1]} (shape {tuple(B.shape)})")
        return (B @ A) * scale                                               # (d_out, d_in)
    enable = _check_enable(enable_lora, "enable_lora")
    n, G = sum(enable), len(enable)
    r = B.shape[1]
    if A.shape[0] != n * r or B.shape[0] % n:
        raise ValueError(f"enable_lora={enable}: A must be ({n}*r, d_in) and B ({n}*q, r); got A {tuple(A.shape)}, B {tuple(B.shape)}")
    q = B.shape[0] // n
    full = q * G if d_out is None else d_out
    if full != q * G:
        raise ValueError(f"d_out={d_out} does not match enable_lora={enable} with block height {q}")
    rows = [(B[rb, :] @ A[ra, :]) * scale for ra, rb, _ in _blocks(enable, full, r)]  # (q, d_in) each
    return _scatter(xp, rows, enable, (q, A.shape[1]), 0, A.dtype)              # (d_out, d_in)


def _delta_for(W: Any, A: Any, B: Any, scale: float, enable_lora: Any, fan_in_fan_out: bool) -> Any:
    xp = namespace(W, A, B)
    _check_float_array(W, "W")
    if W.ndim != 2:
        raise ValueError(f"W must be 2-D, got shape {tuple(W.shape)}")
    d_out, d_in = (W.shape[1], W.shape[0]) if fan_in_fan_out else tuple(W.shape)
    _check_same_dtype(("W", W), ("A", A), ("B", B))
    if A.shape[-1] != d_in:
        layout = " (W stored (d_in, d_out): fan_in_fan_out=True)" if fan_in_fan_out else ""
        raise ValueError(f"A has d_in={A.shape[-1]} but W{layout} has d_in={d_in}; W shape {tuple(W.shape)}, A shape {tuple(A.shape)}")
    delta = delta_weight(A, B, scale, enable_lora, d_out=d_out if enable_lora is not None else None)
    if tuple(delta.shape) != (d_out, d_in):
        raise ValueError(f"B has d_out={delta.shape[0]} but W has d_out={d_out}; W shape {tuple(W.shape)}, B shape {tuple(B.shape)}")
    return xp.matrix_transpose(delta) if fan_in_fan_out else delta


def merge(W: Any, A: Any, B: Any, scale: float, *, enable_lora: tuple[bool, ...] | None = None,
          fan_in_fan_out: bool = False) -> Any:
    """``W + s B A``: the merged weight, so inference costs nothing extra (Section 4.1).

    W is (d_out, d_in), or (d_in, d_out) with ``fan_in_fan_out=True`` (the delta is then
    transposed before it is added, as PEFT does for GPT-2's Conv1D). Returns a new array.
    Raises ``ValueError`` instead of returning non-finite weights (PEFT's ``safe_merge``), naming
    how many entries of A, B and the result are non-finite.
    """
    delta = _delta_for(W, A, B, scale, enable_lora, fan_in_fan_out)
    merged = W + delta
    xp = namespace(merged)
    if not bool(xp.all(xp.isfinite(merged))):
        counts = {n: int(xp.sum(xp.astype(~xp.isfinite(t), xp.int64))) for n, t in (("A", A), ("B", B), ("W", W))}
        raise ValueError(
            "merge: the merged weight would contain non-finite values "
            f"(non-finite entries: A {counts['A']}, B {counts['B']}, W {counts['W']}; "
            f"max |s B A| = {float(xp.max(xp.abs(delta)))}); refusing to merge")
    return merged


def unmerge(W_merged: Any, A: Any, B: Any, scale: float, *, enable_lora: tuple[bool, ...] | None = None,
            fan_in_fan_out: bool = False) -> Any:
    """``W_merged - s B A``: recover the base weight from a merged one.

    Exact only in exact arithmetic: in floating point each entry of ``unmerge(merge(W))`` differs
    from W by at most a few units of roundoff of ``|W| + |s B A|`` (docs/math.md derives the bound
    and reports the drift over 1,000 merge/unmerge cycles).
    """
    return W_merged - _delta_for(W_merged, A, B, scale, enable_lora, fan_in_fan_out)


def lora_parameter_count(d_in: int, d_out: int, r: int) -> int:
    """Trainable parameters of one adapter: ``r (d_in + d_out)`` (A has r d_in, B has d_out r).

    Section 5.1's ``|Theta| = 2 L d_model r`` is this with d_in = d_out = d_model, summed over
    the L adapted matrices.
    """
    d_in, d_out, r = (_check_rank(v, n) for v, n in ((d_in, "d_in"), (d_out, "d_out"), (r, "r")))
    return r * (d_in + d_out)


# ============================================================================================
# Validation: every public function checks its input and says what is wrong
# ============================================================================================


def _check_rank(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _check_finite_real(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(float(value)):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


def _is_float(arr: Any) -> bool:
    return dtype_name(getval(arr).dtype) in ("float16", "float32", "float64")


def _check_float_array(arr: Any, name: str) -> None:
    if not hasattr(arr, "shape") or not hasattr(arr, "dtype"):
        raise TypeError(f"{name} must be an array, got {type(arr).__name__}")
    if not _is_float(arr):
        raise TypeError(f"{name} must have a floating dtype (float16, float32 or float64), got {dtype_name(arr.dtype)}")


def _check_same_dtype(*named: tuple[str, Any]) -> None:
    present = [(n, a) for n, a in named if a is not None]
    first_name, first = present[0]
    for name, arr in present[1:]:
        if dtype_name(arr.dtype) != dtype_name(first.dtype):
            raise TypeError(
                f"{name} is {dtype_name(arr.dtype)} but {first_name} is {dtype_name(first.dtype)}; "
                "lora_ref does not mix precisions silently: cast them to one dtype first")


def _check_pair(A: Any, B: Any) -> None:
    _check_float_array(A, "A")
    _check_float_array(B, "B")
    if A.ndim != 2 or B.ndim != 2:
        raise ValueError(f"A must be 2-D (r, d_in) and B 2-D (d_out, r); got A {tuple(A.shape)}, B {tuple(B.shape)}")
    _check_same_dtype(("A", A), ("B", B))


def _validate(x, W, A, B, scale, bias, mask, enable_lora) -> None:
    for name, arr in (("x", x), ("W", W)):
        _check_float_array(arr, name)
    if x.ndim < 1:
        raise ValueError(f"x must have at least 1 dimension (..., d_in), got shape {tuple(x.shape)}")
    if W.ndim != 2:
        raise ValueError(f"W must be 2-D (d_out, d_in), got shape {tuple(W.shape)}")
    d_out, d_in = W.shape
    if x.shape[-1] != d_in:
        raise ValueError(f"x has d_in={x.shape[-1]} (shape {tuple(x.shape)}) but W has d_in={d_in} (shape {tuple(W.shape)})")
    if bias is not None:
        _check_float_array(bias, "bias")
        if tuple(bias.shape) != (d_out,):
            raise ValueError(f"bias must have shape ({d_out},) to match W {tuple(W.shape)}, got {tuple(bias.shape)}")
    if (A is None) != (B is None):
        raise ValueError("A and B must both be given or both be None")
    if A is None:
        _check_same_dtype(("x", x), ("W", W), ("bias", bias))
        return
    _check_pair(A, B)
    _check_finite_real(scale, "scale")
    _check_same_dtype(("x", x), ("W", W), ("A", A), ("B", B), ("bias", bias), ("dropout_mask", mask))
    if A.shape[1] != d_in:
        raise ValueError(f"A has d_in={A.shape[1]} (shape {tuple(A.shape)}) but W has d_in={d_in} (shape {tuple(W.shape)})")
    r = B.shape[1]
    if enable_lora is None:
        if A.shape[0] != r:
            raise ValueError(f"A has rank {A.shape[0]} (shape {tuple(A.shape)}) but B has rank {r} (shape {tuple(B.shape)})")
        if B.shape[0] != d_out:
            raise ValueError(f"B has d_out={B.shape[0]} (shape {tuple(B.shape)}) but W has d_out={d_out} (shape {tuple(W.shape)})")
    else:
        enable = _check_enable(enable_lora, "enable_lora")
        G, n = len(enable), sum(enable)
        if d_out % G:
            raise ValueError(f"enable_lora has {G} blocks but W's d_out={d_out} is not divisible by {G}")
        if A.shape[0] != n * r or B.shape[0] != n * (d_out // G):
            raise ValueError(
                f"enable_lora={enable} on W {tuple(W.shape)} needs A ({n * r}, {d_in}) and B ({n * (d_out // G)}, {r}); "
                f"got A {tuple(A.shape)}, B {tuple(B.shape)}")
    if mask is not None:
        _check_float_array(mask, "dropout_mask")
        try:
            np.broadcast_shapes(tuple(mask.shape), tuple(x.shape))
            ok = np.broadcast_shapes(tuple(mask.shape), tuple(x.shape)) == tuple(x.shape)
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(f"dropout_mask of shape {tuple(mask.shape)} does not broadcast to x's shape {tuple(x.shape)}")
