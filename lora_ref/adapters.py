"""Many adapters on one base: adapter sets, mixed batches, merging a chosen set.

One frozen weight, several named LoRA adapters (one per customer, task or style). Layout as in
:mod:`lora_ref.lora` (PEFT's ``lora_A.weight`` / ``lora_B.weight``)::

    W    (d_out, d_in)    frozen base weight,  y = x @ W.T + bias
    x    (..., d_in)      any leading (batch, token) dimensions; a mixed batch needs (N, ..., d_in)
    A_a  (r_a, d_in)      adapter a's down-projection (each adapter has its own rank r_a)
    B_a  (d_out, r_a)     adapter a's up-projection
    s_a                   adapter a's scale, alpha_a / r_a (or / sqrt(r_a) with rsLoRA): its own LoraConfig

Eq. 3 of the paper (Hu et al. 2021, arXiv 2106.09685), once per adapter. PEFT's LoRA layer with
several active adapters (``base_model.set_adapter([...])``) adds them one by one, in the order
they were activated; that is (S1). Disabling the adapters (``disable_adapter()``) leaves the base::

    (S1)  y    = W x + bias + sum_{a in active} s_a B_a A_a x        active: a sequence of names
    (S0)  y    = W x + bias                                           active = () : disabled
    (S2)  y[n] = W x[n] + bias + s_{a(n)} B_{a(n)} A_{a(n)} x[n]      mixed batch, one name a(n) per
                                                                      sample n, "__base__" for none
    (S3)  W'   = W + sum_{a in chosen} s_a B_a A_a                    merging a chosen set, added
                                                                      one at a time (PEFT's order)

(S2) is PEFT's ``model(x, adapter_names=[...])``: each sample gets exactly its own adapter,
whatever the active set is; it equals running each sample alone with its adapter.

How it is computed, and why
---------------------------
The base term is :func:`lora_ref.lora_linear` with no adapter; each adapter term is one call of
:func:`lora_delta`, an autograd primitive with hand-written VJPs defined below, whose arithmetic
is exactly lora_linear's adapter branch (``((x A^T) B^T) * s``). So a set of one adapter gives
lora_linear's output bit for bit, and every gradient is a hand-written VJP. Composing
lora_linear calls alone cannot express (S1) exactly: each call adds ``W x`` again. Stacking the
factors into one wide adapter (``A = [s_a A_a]``, ``B = [B_a]``, the ``cat`` construction of
:mod:`lora_ref.combine`) is the same map in exact arithmetic but rounds differently (the scales
enter A before the products, the sums over adapters merge into the rank sum), so it is the
combination, not this layer.

The mixed batch multiplies each adapter's term by a 0/1 selector per sample before adding it:
``1 * v = v`` and ``v + 0 = v`` exactly, so sample n's output is ``base[n] + delta_{a(n)}[n]``
with no other rounding, the same arithmetic as running it alone. The price is clarity over speed:
each adapter named in the batch is evaluated on the whole batch (``lora_ref.serving`` gathers
per token instead, as engines do). A non-finite input in one sample would reach the others
through ``0 * inf``; inputs are expected finite.

Fused projections (GPT-2's ``c_attn``) use ``enable_lora`` per adapter, as in lora.py.

A whole model's adapters: :class:`AdapterSet`
---------------------------------------------
The functions above take one weight's adapters. A model's are an :class:`AdapterSet`: named
adapters, each a dict ``{module name: {"A", "B"[, "m"]}}`` with its own :class:`LoraConfig` (the
layout of ``transformer_ref``'s single-adapter dicts), plus the active names. It is what
``lora_ref.peft_io.load_peft_adapters`` returns for a PEFT directory holding several adapters
(:meth:`AdapterSet.from_peft`), and what ``transformer_ref.forward`` takes instead of one adapter
dict: (S1) per module over the active adapters that adapt it, (S2) with ``adapter_names=``, (S3)
with ``transformer_ref.merge_adapters(params, adapter_set, names=...)``. The host checks each
adapter against the model; this class checks only what needs no model.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import Any, NamedTuple

from autograd.extend import defvjp, primitive

from . import checks
from .backend import getval, namespace
from .config import LoraConfig
from .lora import _blocks, lora_linear, merge, unmerge   # _blocks: a fused adapter's blocks, one rule

__all__ = [
    "BASE",
    "Adapter",
    "AdapterSet",
    "adapter_set_linear",
    "as_adapters",
    "lora_delta",
    "merge_adapters",
    "mixed_batch_linear",
    "unmerge_adapters",
]

BASE = "__base__"
"""The name that means "no adapter" in a mixed batch (PEFT's spelling)."""


class Adapter(NamedTuple):
    """One adapter on one linear weight: ``(A, B, scale)``, plus loralib's fused-block flags.

    A plain ``(A, B, scale)`` tuple is accepted wherever an Adapter is. ``A`` is (r, d_in) (or
    (n r, d_in) with ``enable_lora``), ``B`` (d_out, r) (or (n d_out / G, r)), ``scale`` a Python
    number: the adapter's own ``alpha / r`` or ``alpha / sqrt(r)``.
    """

    A: Any
    B: Any
    scale: float
    enable_lora: tuple[bool, ...] | None = None

    @classmethod
    def from_config(cls, A: Any, B: Any, config: Any, module_name: str | None = None) -> Adapter:
        """The adapter with the scale, rank and fused blocks its LoraConfig gives ``module_name``.

        ``config`` is a :class:`lora_ref.LoraConfig`; with ``module_name`` its ``rank_pattern``,
        ``alpha_pattern`` and ``enable_lora`` apply (``config.scale_for(module_name)``). Raises
        ``ValueError`` if A's row count is not the rank the config gives.
        """
        if module_name is None:
            rank, scale, enable = config.r, config.scale, None
        else:
            rank, scale = config.rank_for(module_name), config.scale_for(module_name)
            enable = config.enable_for(module_name)
        n = 1 if enable is None else sum(enable)
        checks.float_array(A, "A")
        if A.ndim != 2 or A.shape[0] != n * rank:
            where = f" for {module_name!r}" if module_name is not None else ""
            raise ValueError(f"A must have {n * rank} rows (rank {rank}{where} from the config"
                             f"{f', {n} enabled blocks' if n > 1 else ''}), got shape {tuple(A.shape)}")
        return cls(A, B, scale, enable)


def as_adapters(adapters: Any, name: str = "adapters") -> dict[str, Adapter]:
    """``adapters`` (a mapping of adapter name to Adapter or ``(A, B, scale[, enable_lora])``)
    as a dict of :class:`Adapter`, validated: names are non-empty strings other than ``"__base__"``,
    A and B 2-D arrays of one floating dtype with matching rank, scale a finite real number."""
    if not isinstance(adapters, Mapping):
        raise TypeError(f"{name} must be a mapping of adapter name to (A, B, scale), got {type(adapters).__name__}")
    out = {}
    for key, value in adapters.items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"{name} keys must be non-empty adapter names (str), got {key!r}")
        if key == BASE:
            raise ValueError(f"{name}: {BASE!r} is reserved for 'no adapter' and cannot name an adapter")
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) not in (3, 4):
            raise TypeError(f"{name}[{key!r}] must be (A, B, scale) or an Adapter, got {type(value).__name__}")
        A, B, scale, *rest = value
        where = f"{name}[{key!r}]"
        checks.float_array(A, f"{where}.A")
        checks.float_array(B, f"{where}.B")
        if A.ndim != 2 or B.ndim != 2:
            raise ValueError(f"{where}: A must be 2-D (r, d_in) and B 2-D (d_out, r); "
                             f"got A {tuple(A.shape)}, B {tuple(B.shape)}")
        checks.same_dtype((f"{where}.A", A), (f"{where}.B", B))
        enable = rest[0] if rest else None
        if enable is not None:
            enable = checks.enable_flags(enable, f"{where}.enable_lora")
        n = 1 if enable is None else sum(enable)
        if A.shape[0] != n * B.shape[1]:
            raise ValueError(f"{where}: A has {A.shape[0]} rows but B has rank {B.shape[1]}"
                             f"{f' and {n} enabled blocks' if n > 1 else ''} (A {tuple(A.shape)}, B {tuple(B.shape)})")
        out[key] = Adapter(A, B, checks.finite_real(scale, f"{where}.scale"), enable)
    return out


# ============================================================================================
# One adapter's term, s B A x: the primitive every (S1)/(S2) term goes through
# ============================================================================================


def _d_out(B: Any, enable: tuple[bool, ...] | None) -> int:
    """The full output width: B's rows, or (rows per block) x (blocks) for a fused adapter."""
    return B.shape[0] if enable is None else B.shape[0] // sum(enable) * len(enable)


def _lora_delta(x: Any, A: Any, B: Any, scale: float, dropout_mask: Any = None,
                enable_lora: tuple[bool, ...] | None = None) -> Any:
    """The undecorated forward of :func:`lora_delta`; autograd.numpy can trace it."""
    scale = _validate_delta(x, A, B, scale, dropout_mask, enable_lora)   # s as a Python float
    xp = namespace(x, A, B, dropout_mask)
    xd = x if dropout_mask is None else x * dropout_mask             # dropout on the adapter branch
    h = xd @ xp.matrix_transpose(A)                                   # (..., n r)   A x
    if enable_lora is None:
        return (h @ xp.matrix_transpose(B)) * scale                   # (..., d_out) s B A x  (Eq. 3)
    d_out, r = _d_out(B, enable_lora), B.shape[1]
    parts = iter([h[..., ra] @ xp.matrix_transpose(B[rb, :])         # (..., q)     B_k A_k x
                  for ra, rb, _ in _blocks(enable_lora, d_out, r)])
    q = d_out // len(enable_lora)
    zero = xp.zeros(tuple(x.shape[:-1]) + (q,), dtype=getval(x).dtype) if not all(enable_lora) else None
    delta = xp.concat([next(parts) if on else zero for on in enable_lora], axis=-1)  # (..., d_out)
    return delta * scale


lora_delta = primitive(_lora_delta)
lora_delta.__doc__ = """One adapter's term of Eq. 3: ``s ((x * mask) A^T) B^T``, shape (..., d_out).

    Parameters
    ----------
    x : array (..., d_in)
    A : array (r, d_in), or (n r, d_in) with ``enable_lora``
    B : array (d_out, r), or (n q, r) with ``enable_lora`` (q = d_out / G)
    scale : float                    the adapter's s; a Python number
    dropout_mask : array broadcastable to x, optional (inverted-dropout scaling included)
    enable_lora : tuple of bool, optional   loralib MergedLinear blocks, as in lora_linear

    The arithmetic is lora_linear's adapter branch, operation for operation, so
    ``lora_linear(x, W, None, None, 0, bias) + lora_delta(x, A, B, s)`` equals
    ``lora_linear(x, W, A, B, s, bias)`` bit for bit. An autograd primitive with hand-written
    VJPs for x, A and B; all arrays share one floating dtype.
    """

# Gradients, with G = dL/dy (..., d_out), Xd = x * M flattened to (N, d_in), H = Xd A^T (N, n r),
# and for block k: G_k = G[:, cols_k] (N, q), H_k = H[:, rows of A_k] (N, r):
#   dL/dx   = s (concat_k (G_k B_k)) A * M      (..., d_in)   y = s H B^T, H = (x M) A^T
#   dL/dA_k = s (G_k B_k)^T Xd                  (r, d_in)     d(s G_k . (Xd A_k^T B_k^T))/dA_k
#   dL/dB_k = s G_k^T H_k                       (q, r)        d(s G_k . (H_k B_k^T))/dB_k


def _flat(t: Any) -> Any:
    """(..., n) -> (N, n): fold the leading dimensions into one."""
    return namespace(t).reshape(t, (-1, t.shape[-1]))


def _gB(g: Any, B: Any, enable: tuple[bool, ...] | None) -> Any:
    """concat_k (G_k B_k), shape (..., n r): the upstream gradient pulled back through B."""
    xp = namespace(g, B)
    parts = [g[..., cols] @ B[rb, :] for _, rb, cols in _blocks(enable, _d_out(B, enable), B.shape[1])]
    return parts[0] if len(parts) == 1 else xp.concat(parts, axis=-1)


def _vjp_x(ans, x, A, B, scale, dropout_mask=None, enable_lora=None):
    def vjp(g):
        dx = _gB(g, B, enable_lora) @ A                                  # (..., d_in)  (G B) A
        if dropout_mask is not None:
            dx = dx * dropout_mask                                       # * M
        return dx * checks.finite_real(scale, "scale")                   # * s
    return vjp


def _vjp_A(ans, x, A, B, scale, dropout_mask=None, enable_lora=None):
    def vjp(g):
        xp = namespace(g)
        xd = _flat(x if dropout_mask is None else x * dropout_mask)      # (N, d_in)
        gB = _flat(_gB(g, B, enable_lora))                               # (N, n r)
        return (xp.matrix_transpose(gB) @ xd) * checks.finite_real(scale, "scale")  # (n r, d_in)  s (G B)^T Xd
    return vjp


def _vjp_B(ans, x, A, B, scale, dropout_mask=None, enable_lora=None):
    def vjp(g):
        xp = namespace(g)
        xd = _flat(x if dropout_mask is None else x * dropout_mask)      # (N, d_in)
        H, G = xd @ xp.matrix_transpose(A), _flat(g)                     # (N, n r), (N, d_out)
        parts = [xp.matrix_transpose(G[:, cols]) @ H[:, ra]              # (q, r)  G_k^T H_k
                 for ra, _, cols in _blocks(enable_lora, _d_out(B, enable_lora), B.shape[1])]
        dB = parts[0] if len(parts) == 1 else xp.concat(parts, axis=0)   # (n q, r)
        return dB * checks.finite_real(scale, "scale")
    return vjp


def _no_grad(what):
    def maker(*args, **kwargs):
        raise TypeError(f"lora_delta is not differentiable with respect to {what}")
    return maker


defvjp(lora_delta, _vjp_x, _vjp_A, _vjp_B, _no_grad("scale (a constant)"),
       _no_grad("dropout_mask (a constant)"))


def _validate_delta(x, A, B, scale, mask, enable) -> float:
    for name, arr in (("x", x), ("A", A), ("B", B)):
        checks.float_array(arr, name)
    if x.ndim < 1 or A.ndim != 2 or B.ndim != 2:
        raise ValueError(f"x must be (..., d_in), A 2-D (r, d_in) and B 2-D (d_out, r); "
                         f"got x {tuple(x.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)}")
    checks.same_dtype(("x", x), ("A", A), ("B", B), ("dropout_mask", mask))
    scale = checks.finite_real(scale, "scale")           # returned: a NumPy scalar must not reach array code
    if x.shape[-1] != A.shape[1]:
        raise ValueError(f"x has d_in={x.shape[-1]} (shape {tuple(x.shape)}) but A has d_in={A.shape[1]} "
                         f"(shape {tuple(A.shape)})")
    n = 1
    if enable is not None:
        enable = checks.enable_flags(enable, "enable_lora")
        n = sum(enable)
        if B.shape[0] % n:
            raise ValueError(f"enable_lora={enable}: B's {B.shape[0]} rows do not split into {n} blocks")
    if A.shape[0] != n * B.shape[1]:
        raise ValueError(f"A has {A.shape[0]} rows but B has rank {B.shape[1]}"
                         f"{f' and {n} enabled blocks' if n > 1 else ''} (A {tuple(A.shape)}, B {tuple(B.shape)})")
    if mask is not None:
        checks.broadcastable_mask(mask, x)
    return scale


# ============================================================================================
# (S0), (S1): the active set summed; () is the disabled state
# ============================================================================================


def _check_with_base(x: Any, W: Any, adapters: dict[str, Adapter], names: Sequence[str]) -> None:
    """Shapes and dtypes of the named adapters against W and x (lora_linear checks x, W, bias)."""
    checks.float_array(W, "W")
    if W.ndim != 2:
        raise ValueError(f"W must be 2-D (d_out, d_in), got shape {tuple(W.shape)}")
    d_out, d_in = (int(n) for n in W.shape)
    for name in names:
        a = adapters[name]
        checks.same_dtype(("W", W), (f"adapters[{name!r}].A", a.A), (f"adapters[{name!r}].B", a.B))
        if a.A.shape[1] != d_in or _d_out(a.B, a.enable_lora) != d_out or (
                a.enable_lora is not None and d_out % len(a.enable_lora)):
            raise ValueError(f"adapters[{name!r}] does not fit W {tuple(W.shape)}: A {tuple(a.A.shape)}, "
                             f"B {tuple(a.B.shape)}" + (f", enable_lora={a.enable_lora}" if a.enable_lora else ""))


def _check_names(names: Any, adapters: dict[str, Adapter], what: str, *, allow_base: bool,
                 unique: bool) -> tuple[str, ...]:
    if isinstance(names, (str, bytes)) or not isinstance(names, Sequence):
        raise TypeError(f"{what} must be a list of adapter names, got {names!r}")
    for i, n in enumerate(names):
        if not isinstance(n, str):
            raise TypeError(f"{what}[{i}] must be an adapter name (str), got {n!r}")
        if n == BASE and allow_base:
            continue
        if n not in adapters:
            known = ", ".join(repr(k) for k in adapters) or "none"
            extra = f" or {BASE!r}" if allow_base else ""
            raise ValueError(f"{what}[{i}] = {n!r} is not an adapter here (known: {known}{extra})")
    if unique and len(set(names)) != len(names):
        raise ValueError(f"{what} names an adapter twice: {list(names)}")
    return tuple(names)


def adapter_set_linear(x: Any, W: Any, adapters: Mapping[str, Any], active: Sequence[str], *,
                       bias: Any = None, dropout_masks: Mapping[str, Any] | None = None) -> Any:
    """(S1): ``y = x W^T + bias + sum_{a in active} s_a ((x * M_a) A_a^T) B_a^T``, shape (..., d_out).

    Parameters
    ----------
    x : array (..., d_in)
    W : array (d_out, d_in)
    adapters : mapping of name -> :class:`Adapter` or ``(A, B, scale[, enable_lora])``
        All the adapters on this weight (each its own rank and scale).
    active : sequence of names
        The adapters to apply, summed in this order (PEFT: the order of ``set_adapter([...])``).
        ``()`` is the disabled state (S0): the base layer alone, PEFT's ``disable_adapter()``.
    bias : array (d_out,), optional
    dropout_masks : mapping of active name -> mask broadcastable to x, optional
        Each adapter's own dropout on its branch (PEFT gives each adapter its dropout module).

    Differentiable in x, W, bias and every adapter's A and B (hand-written VJPs: lora_linear's
    and :func:`lora_delta`'s). With one active adapter the result is lora_linear's, bit for bit.
    """
    adapters = as_adapters(adapters)
    active = _check_names(active, adapters, "active", allow_base=False, unique=True)
    masks = {} if dropout_masks is None else dict(dropout_masks)
    if not isinstance(masks, dict) or not set(masks) <= set(active):
        raise ValueError(f"dropout_masks must be keyed by active adapters {list(active)}, got {list(masks)}")
    _check_with_base(x, W, adapters, active)
    y = lora_linear(x, W, None, None, 1.0, bias)                          # (..., d_out)  W x + b
    for name in active:                                                   # (S1), in activation order
        a = adapters[name]
        y = y + lora_delta(x, a.A, a.B, a.scale, masks.get(name), a.enable_lora)
    return y


# ============================================================================================
# (S2): the mixed batch, one adapter name per sample
# ============================================================================================


def mixed_batch_linear(x: Any, W: Any, adapters: Mapping[str, Any], names: Sequence[str], *,
                       bias: Any = None) -> Any:
    """(S2): sample n gets ``x[n] W^T + bias + s_{a(n)} B_{a(n)} A_{a(n)} x[n]``; shape (N, ..., d_out).

    Parameters
    ----------
    x : array (N, ..., d_in)      N samples (the first axis), any token axes after it
    W : array (d_out, d_in)
    adapters : mapping of name -> :class:`Adapter` or ``(A, B, scale[, enable_lora])``
    names : sequence of N adapter names, ``"__base__"`` for a sample without adapter
        PEFT's ``adapter_names=``. A host whose adapter does not target this weight passes
        ``"__base__"`` for its samples here (PEFT skips such a layer the same way).
    bias : array (d_out,), optional

    Each sample's output equals :func:`adapter_set_linear` on that sample alone with
    ``active=(a(n),)`` (or ``()``), with no other rounding: the other adapters' terms enter
    multiplied by an exact 0. No dropout: a mixed batch is inference (PEFT refuses it in
    training mode). Differentiable all the same (the selectors are constants).
    """
    adapters = as_adapters(adapters)
    names = _check_names(names, adapters, "names", allow_base=True, unique=False)
    checks.float_array(x, "x")
    if x.ndim < 2 or x.shape[0] != len(names):
        raise ValueError(f"x must be (N, ..., d_in) with N = len(names) = {len(names)} samples, "
                         f"got shape {tuple(x.shape)}")
    used = list(dict.fromkeys(n for n in names if n != BASE))              # first-appearance order
    _check_with_base(x, W, adapters, used)
    xp = namespace(x)
    y = lora_linear(x, W, None, None, 1.0, bias)                          # (N, ..., d_out)  W x + b
    for name in used:
        a = adapters[name]
        pick = xp.asarray([1.0 if n == name else 0.0 for n in names], dtype=getval(x).dtype)  # (N,)
        pick = xp.reshape(pick, (len(names),) + (1,) * (x.ndim - 1))      # (N, 1, ..., 1)
        y = y + lora_delta(x, a.A, a.B, a.scale, None, a.enable_lora) * pick  # exact 0 elsewhere
    return y


# ============================================================================================
# (S3): merging a chosen set into the weight, and back
# ============================================================================================


def merge_adapters(W: Any, adapters: Mapping[str, Any], names: Sequence[str], *,
                   fan_in_fan_out: bool = False) -> Any:
    """(S3): ``W + s_a B_a A_a`` for each named adapter, added one at a time in ``names`` order.

    PEFT's ``merge_adapter()`` / ``merge_and_unload()`` on several active adapters adds their
    deltas to the weight in the same order. ``W`` is (d_out, d_in), or (d_in, d_out) with
    ``fan_in_fan_out=True`` (GPT-2's Conv1D). Each step is :func:`lora_ref.merge`, which refuses
    non-finite results. ``names = ()`` returns W unchanged (a new reference, not a copy).
    """
    adapters = as_adapters(adapters)
    names = _check_names(names, adapters, "names", allow_base=False, unique=True)
    checks.boolean(fan_in_fan_out, "fan_in_fan_out")
    for name in names:
        a = adapters[name]
        W = merge(W, a.A, a.B, a.scale, enable_lora=a.enable_lora, fan_in_fan_out=fan_in_fan_out)
    return W


def unmerge_adapters(W_merged: Any, adapters: Mapping[str, Any], names: Sequence[str], *,
                     fan_in_fan_out: bool = False) -> Any:
    """Undo :func:`merge_adapters`: subtract the named deltas, last merged first (PEFT's order).

    Exact only in exact arithmetic; each entry is back within a few roundings of
    ``|W| + sum_a |s_a B_a A_a|`` (see :func:`lora_ref.unmerge`).
    """
    adapters = as_adapters(adapters)
    names = _check_names(names, adapters, "names", allow_base=False, unique=True)
    checks.boolean(fan_in_fan_out, "fan_in_fan_out")
    for name in reversed(names):
        a = adapters[name]
        W_merged = unmerge(W_merged, a.A, a.B, a.scale, enable_lora=a.enable_lora,
                           fan_in_fan_out=fan_in_fan_out)
    return W_merged


# ============================================================================================
# A whole model's adapters: named, each with its own LoraConfig, some of them active
# ============================================================================================


class AdapterSet:
    """Several named adapters on one base model, each with its own :class:`LoraConfig`, and the
    active ones (PEFT's ``PeftModel`` with several adapters, as plain data).

    adapters : mapping of adapter name -> ``(LoraConfig, {module name: {"A", "B"[, "m"]}})``
        Exactly what ``lora_ref.peft_io.load_peft_adapters(path)`` returns; each inner dict in
        ``transformer_ref``'s layout for one adapter (``m`` (d_out,) only with ``use_dora``).
        Names are non-empty strings other than ``"__base__"``.
    active : sequence of adapter names
        Applied by a forward, summed per module in this order (PEFT's ``set_adapter([...])``);
        ``()`` is the disabled state (the base model).

    Immutable: :meth:`with_active` and :meth:`disabled` return new sets sharing the arrays. Only
    what needs no model is checked here; ``transformer_ref`` checks each adapter against the model.
    """

    __slots__ = ("_entries", "_active")

    def __init__(self, adapters: Mapping[str, Any], active: Sequence[str]) -> None:
        if isinstance(adapters, AdapterSet):
            adapters = adapters._entries
        if not isinstance(adapters, Mapping) or not adapters:
            raise TypeError(f"adapters must be a non-empty mapping of adapter name -> (LoraConfig, {{module: "
                            f"{{'A', 'B'}}}}), got {adapters!r}"[:300])
        for name in adapters:
            if not isinstance(name, str) or not name or name == BASE:
                raise ValueError(f"adapters keys must be adapter names: non-empty strings other than {BASE!r} "
                                 f"(reserved for 'no adapter'), got {name!r}")
        self._entries = {name: _check_entry(v, f"adapters[{name!r}]") for name, v in adapters.items()}
        self._active = _check_names(active, self._entries, "active", allow_base=False, unique=True)

    @classmethod
    def from_peft(cls, adapters: Mapping[str, Any], active: Sequence[str] | None = None) -> AdapterSet:
        """The set of ``lora_ref.peft_io.load_peft_adapters(path)``'s ``{name: (LoraConfig, adapters)}``.
        ``active`` None activates ``"default"`` alone, as PEFT does after loading a directory (the
        root adapter is ``"default"``; the sub-folders' adapters are loaded inactive)."""
        if active is None:
            if not isinstance(adapters, Mapping) or "default" not in adapters:
                raise ValueError(f"active=None activates PEFT's 'default' adapter, which is not among "
                                 f"{list(adapters) if isinstance(adapters, Mapping) else adapters!r}; pass active=[...]")
            active = ("default",)
        return cls(adapters, active)

    @property
    def names(self) -> tuple[str, ...]:
        """Every adapter's name, in the order given."""
        return tuple(self._entries)

    @property
    def active(self) -> tuple[str, ...]:
        """The active adapters, in summation order; ``()`` when disabled."""
        return self._active

    def config(self, name: str) -> LoraConfig:
        """Adapter ``name``'s LoraConfig (ranks, scales, DoRA flag)."""
        return self[name][0]

    def modules(self, name: str) -> Mapping[str, Mapping[str, Any]]:
        """Adapter ``name``'s arrays, ``{module name: {"A", "B"[, "m"]}}`` (read-only)."""
        return self[name][1]

    def __getitem__(self, name: str) -> tuple[LoraConfig, Mapping[str, Mapping[str, Any]]]:
        if name not in self._entries:
            raise KeyError(f"{name!r} is not an adapter of this set (known: {', '.join(map(repr, self._entries))})")
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __repr__(self) -> str:
        return f"AdapterSet({list(self._entries)}, active={list(self._active)})"

    def terms(self, module: str, names: Sequence[str] | None = None) -> list[tuple[str, Mapping[str, Any], LoraConfig]]:
        """``(adapter name, its arrays for module, its LoraConfig)`` for each adapter of ``names``
        (default: the active ones) that adapts ``module``, in the order of ``names``."""
        return [(n, self[n][1][module], self[n][0]) for n in (self._active if names is None else names)
                if n != BASE and module in self[n][1]]

    def uses_dora(self, names: Sequence[str] | None = None) -> tuple[str, ...]:
        """The adapters among ``names`` (default: all) whose config has ``use_dora``."""
        return tuple(n for n in (self.names if names is None else names) if n != BASE and self[n][0].use_dora)

    def with_active(self, active: Sequence[str]) -> AdapterSet:
        """The same adapters with ``active`` as the active names (PEFT's ``set_adapter``)."""
        return self._sharing(active)

    def disabled(self) -> AdapterSet:
        """The same adapters, none active: the base model (PEFT's ``disable_adapter()``)."""
        return self._sharing(())

    def _sharing(self, active: Sequence[str]) -> AdapterSet:
        """A set sharing this one's already-checked entries (read-only, never mutated), with
        ``active`` checked against them: ``__init__`` would re-check every adapter's arrays, which
        ``transformer_ref`` pays twice per forward."""
        new = object.__new__(AdapterSet)
        new._entries = self._entries
        new._active = _check_names(active, self._entries, "active", allow_base=False, unique=True)
        return new


def _check_entry(value: Any, where: str) -> tuple[LoraConfig, Mapping[str, Mapping[str, Any]]]:
    """One adapter of a set: ``(LoraConfig, {module: {"A", "B"[, "m"]}})``, as a read-only pair."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise TypeError(f"{where} must be a pair (LoraConfig, {{module: {{'A', 'B'}}}}), got {type(value).__name__}")
    config, modules = value
    if not isinstance(config, LoraConfig):
        raise TypeError(f"{where}[0] must be a lora_ref.LoraConfig, got {type(config).__name__}")
    if not isinstance(getval(modules), Mapping) or not len(modules):      # an autograd DictBox is one too
        raise TypeError(f"{where}[1] must be a non-empty dict {{module name: {{'A': array, 'B': array}}}}, got {modules!r}"[:300])
    keys = {"A", "B", "m"} if config.use_dora else {"A", "B"}
    out = {}
    for module, arrays in modules.items():
        if not isinstance(module, str) or not module:
            raise TypeError(f"{where}[1] keys must be module names (str), got {module!r}")
        if not isinstance(getval(arrays), Mapping) or not {"A", "B"} <= set(arrays) <= keys:
            got = sorted(arrays) if isinstance(getval(arrays), Mapping) else type(arrays).__name__
            want = "'A', 'B' and, for DoRA, 'm'" if config.use_dora else "exactly 'A' and 'B' (its config has no use_dora)"
            raise ValueError(f"{where}[1][{module!r}] must hold {want}, got {got}")
        for key, arr in arrays.items():
            checks.float_array(arr, f"{where}[1][{module!r}][{key!r}]")
        out[module] = MappingProxyType(dict(arrays))
    return config, MappingProxyType(out)
