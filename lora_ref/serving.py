"""What serving engines compute when one batch mixes many adapters: shrink and expand, as a contract.

Serving engines (vLLM's punica ops, S-LoRA, Punica, SGLang, LoRAX) keep every loaded adapter in
stacked tensors and give each token the slot of its request's adapter. These are reference
versions of their two kernels, with each rounding stated, so an engine's kernels can be tested
against them (docs/serving.md states the contract with examples).

Shapes (T tokens, n slots, R the stack's max rank, one stack per output slice)::

    x        (T, d_in)                    the layer input, tokens of all requests flattened
    A_stack  (n, R, d_in)  per slice      slot i holds A_i (r_i, d_in) in rows [0, r_i), zeros after
    B_stack  (n, w, R)     per slice      slot i holds B_i (w, r_i) in columns [0, r_i), zeros after
    h        (n_slices, T, R)             shrink's output (vLLM's float32 "buffer")
    y        (T, d_out)                   the base layer's output, expanded into
    indices  (T,) ints in [-1, n)         BGMV: one slot per token, -1 = no adapter
             or Segments                  SGMV: sequences (starts, lengths), one slot per sequence
    slices   ((offset, width), ...)       where each slice's output goes in y (q/k/v, gate/up packed)

The contract. S is the storage dtype shared by x, the stacks and y (float16, bfloat16 via
ml_dtypes, float32, float64); Acc, the accumulation dtype, is float32 for S in {float16, bfloat16,
float32} and float64 for float64; fl_D rounds to D; i = indices[t]::

    (V1)  shrink:  h[s, t, k]   = fl_Acc( fl_Acc( sum_j x[t, j] A_s[i, k, j] ) * fl_Acc(scale) )   if i >= 0
                                = 0                                                               if i = -1
    (V2)  expand:  c[t, o]      = fl_S( sum_k fl_S(h[s, t, k]) B_s[i, o, k] )    summed in Acc
                   y'[t, off+o] = fl_S( y[t, off+o] + c[t, o] )                  if i >= 0 (add_inputs)
                   y'[t, col]   = y[t, col]                                      if i = -1, or col in no slice

The products inside each sum are exact (a float16 or bfloat16 product fits a float32); the sums'
order is not part of the contract. Each implementation of it is within
``E = ((1 + gamma_{d_in+R+4}(Acc)) (1 + gamma_3(S)) - 1) M`` of the exact value, with
``M = |y| + |s| (|x| |A|^T) |B|^T`` (two sums, the products when inexact, the scale and its
rounding in Acc; three roundings to S), so two implementations differ by at most 2E per entry.
Rounding h to S before the expand (V2) is vLLM's Triton kernel (``CAST_TYPE``: float32 input,
16-bit weights); an engine that keeps h in float32 is closer to the exact value by one rounding.

Where the scale goes. ``scale`` is one number for the whole batch, applied in float32 in the
shrink, as the kernels' ``scaling`` argument. Adapters have different scales (alpha_i / r_i, or
/ sqrt(r_i)), so vLLM folds each into its B at load (``LoRALayerWeights.optimize``:
``lora_b *= scaling``) and passes ``scale = 1.0``; :func:`stack_adapters` does the same by default
(``B_i s_i``, rounded once to S). Folding at load AND scaling in the shrink applies s twice.

-1 means no adapter. Engines early-exit on -1 (vLLM's Triton kernels: ``if lora_id == -1:
return``). vLLM's CPU fallback (vllm/lora/ops/torch_ops/lora_ops.py) gathers ``lora_weights[
indices]``, so -1 selects the LAST slot (PyTorch's negative indexing): a base-model request in a
mixed batch silently gets the last adapter (fix proposed in vllm-project/vllm#48421).

Ranks are zero-padded to R: a slot with r_i < R contributes ``x . 0 = 0`` exactly in the padded
rows of h, and ``0 * 0`` in the padded columns of B, so padding changes nothing if the padding is
zero. Left-over values there (a previous, larger adapter in the same slot) are added to h.

SGMV: :class:`Segments` (starts, lengths, indices) cover the T tokens in order without gaps;
token t of sequence q gets indices[q]. It is BGMV with ``torch.repeat_interleave(indices,
lengths)`` (:func:`token_indices`), which is what vLLM's fallback does.

Not differentiable (inference); any backend for float32/float64 (NumPy, CuPy, array_api_strict);
float16/bfloat16 on NumPy (ml_dtypes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import checks
from .backend import dtype_name, getval, namespace, to_numpy

__all__ = [
    "NO_ADAPTER",
    "STORAGE_DTYPES",
    "Segments",
    "accumulation_dtype",
    "add_lora",
    "lora_expand",
    "lora_shrink",
    "segments_for",
    "stack_adapters",
    "token_indices",
]

NO_ADAPTER = -1
STORAGE_DTYPES = ("float16", "bfloat16", "float32", "float64")


def accumulation_dtype(storage: Any) -> str:
    """``"float64"`` for float64 storage, ``"float32"`` for float32, float16 and bfloat16."""
    name = dtype_name(storage)
    if name not in STORAGE_DTYPES:
        raise TypeError(f"storage dtype must be one of {', '.join(STORAGE_DTYPES)}, got {name}")
    return "float64" if name == "float64" else "float32"


def _dtype(xp: Any, name: str) -> Any:
    """The namespace's dtype object for ``name`` (ml_dtypes' bfloat16 for NumPy)."""
    if name == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return getattr(xp, name)


@dataclass(frozen=True)
class Segments:
    """SGMV's description of a batch: sequence q holds tokens ``[starts[q], starts[q] + lengths[q])``
    and uses slot ``indices[q]`` (-1: no adapter). 1-D integer arrays (or lists) of one length."""

    starts: Any
    lengths: Any
    indices: Any


def _host_ints(value: Any, name: str) -> np.ndarray:
    """A 1-D integer array (any backend) or a list of ints, as a NumPy int64 array."""
    if isinstance(value, (list, tuple)):
        if not all(checks.is_int(v) for v in value):
            raise TypeError(f"{name} must hold integers, got {value!r}")
        arr = np.asarray(value, dtype=np.int64).reshape(-1)
    else:
        checks.integer_array(value, name)
        arr = to_numpy(value).astype(np.int64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    return arr


def token_indices(segments: Segments, n_tokens: int, *, n_slots: int | None = None) -> np.ndarray:
    """SGMV -> BGMV: the (T,) per-token slots, ``repeat_interleave(indices, lengths)``.

    Checks that the segments cover ``[0, n_tokens)`` in order with no gap or overlap
    (``starts[0] = 0``, ``starts[q + 1] = starts[q] + lengths[q]``, ``sum(lengths) = n_tokens``)
    and that every segment's slot is ``>= -1``, and ``< n_slots`` when ``n_slots`` is given: a
    zero-length segment too, although it covers no token (the kernels pass ``n_slots``).
    """
    if not isinstance(segments, Segments):
        raise TypeError(f"segments must be a Segments, got {type(segments).__name__}")
    n_tokens = checks.non_negative_int(n_tokens, "n_tokens")
    if n_slots is not None:
        n_slots = checks.non_negative_int(n_slots, "n_slots")
    starts, lengths, idx = (_host_ints(v, f"segments.{n}") for v, n in
                            ((segments.starts, "starts"), (segments.lengths, "lengths"), (segments.indices, "indices")))
    if not len(starts) == len(lengths) == len(idx):
        raise ValueError(f"segments.starts, lengths and indices must have one length, got "
                         f"{len(starts)}, {len(lengths)}, {len(idx)}")
    if np.any(lengths < 0):
        raise ValueError(f"segments.lengths must be >= 0, got {lengths.tolist()}")
    bad = idx < NO_ADAPTER
    if n_slots is not None:
        bad |= idx >= n_slots
    if np.any(bad):
        q = int(np.argmax(bad))
        slots = f"[-1, {n_slots}) (-1: no adapter; {n_slots} slots)" if n_slots is not None else ">= -1 (-1: no adapter)"
        raise ValueError(f"segments.indices[{q}] = {int(idx[q])} (segment {q}, {int(lengths[q])} tokens) is not a "
                         f"slot: every segment's slot must be {slots}")
    expected = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if len(lengths) else lengths
    if not np.array_equal(starts, expected):
        q = int(np.argmax(starts != expected))
        start, end = int(starts[q]), int(expected[q])
        if q == 0:
            what = "the first sequence must start at token 0"
        elif start < end:
            what = f"the sequences before it end at {end}: segments overlap"
        else:
            gap = f"token {end}" if start == end + 1 else f"tokens {end} to {start - 1}"
            what = f"the sequences before it end at {end}: a gap ({gap} in no segment)"
        raise ValueError(f"segments.starts[{q}] = {start} but {what}; segments must cover the tokens in order, "
                         "without gaps or overlaps")
    if int(lengths.sum()) != n_tokens:
        raise ValueError(f"segments cover {int(lengths.sum())} tokens but the batch has {n_tokens}")
    return np.repeat(idx, lengths)                                        # (T,)


def segments_for(names: Sequence[str], slots: Sequence[str], lengths: Sequence[int]) -> Segments:
    """The Segments of a batch of sequences given by adapter name (``"__base__"``: none).

    ``slots`` lists the adapter loaded in each slot (its position is its index). Ties a mixed
    batch (:func:`lora_ref.adapters.mixed_batch_linear`, one name per sample) to SGMV.
    """
    from .adapters import BASE

    slots = list(slots)
    if len(set(slots)) != len(slots):
        raise ValueError(f"slots names an adapter twice: {slots}")
    idx = []
    for q, name in enumerate(names):
        if name != BASE and name not in slots:
            raise ValueError(f"names[{q}] = {name!r} is in no slot (slots: {slots}, or {BASE!r})")
        idx.append(NO_ADAPTER if name == BASE else slots.index(name))
    lengths = [checks.non_negative_int(n, f"lengths[{q}]") for q, n in enumerate(lengths)]
    if len(lengths) != len(idx):
        raise ValueError(f"lengths has {len(lengths)} entries but names has {len(idx)}")
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if lengths else np.zeros(0, np.int64)
    return Segments(starts, np.asarray(lengths, dtype=np.int64), np.asarray(idx, dtype=np.int64))


# ============================================================================================
# Stacking adapters into slots (what an engine does at load)
# ============================================================================================


def stack_adapters(adapters: Sequence[Any], *, max_rank: int | None = None,
                   fold_scale: bool = True) -> tuple[Any, Any]:
    """Slots for one slice: ``(A_stack (n, R, d_in), B_stack (n, d_out, R))``, zero-padded to R.

    ``adapters[i]`` is slot i's ``(A_i (r_i, d_in), B_i (d_out, r_i), s_i)``, or None for an empty
    slot (all zeros). ``max_rank`` R defaults to the largest r_i. With ``fold_scale`` (vLLM's
    load), slot i's B is ``fl_S(B_i s_i)`` (the product in float64, one rounding to S) and the
    shrink's scale is then 1.0; without it all s_i must be equal and you pass that s to the
    shrink. Arrays share one storage dtype; the stacks are created on the adapters' backend.
    """
    if isinstance(adapters, (str, bytes)) or not isinstance(adapters, Sequence) or not adapters:
        raise TypeError("adapters must be a non-empty list of (A, B, scale) or None, one per slot")
    checks.boolean(fold_scale, "fold_scale")
    present = [(i, a) for i, a in enumerate(adapters) if a is not None]
    if not present:
        raise ValueError("adapters has no adapter: every slot is empty")
    for i, a in present:
        if isinstance(a, (str, bytes)) or not isinstance(a, Sequence) or len(a) != 3:
            raise TypeError(f"adapters[{i}] must be (A, B, scale) or None, got {type(a).__name__}")
        for name, arr in ((f"adapters[{i}].A", a[0]), (f"adapters[{i}].B", a[1])):
            checks.float_array(arr, name, STORAGE_DTYPES)
            if arr.ndim != 2:
                raise ValueError(f"{name} must be 2-D, got shape {tuple(arr.shape)}")
        checks.finite_real(a[2], f"adapters[{i}].scale")
    A0, B0 = present[0][1][0], present[0][1][1]
    S = dtype_name(getval(A0).dtype)
    d_in, d_out = int(A0.shape[1]), int(B0.shape[0])
    for i, (A, B, _) in present:
        checks.same_dtype(("adapters[0].A", A0), (f"adapters[{i}].A", A), (f"adapters[{i}].B", B))
        if A.shape[1] != d_in or B.shape[0] != d_out or A.shape[0] != B.shape[1]:
            raise ValueError(f"adapters[{i}]: A {tuple(A.shape)} and B {tuple(B.shape)} do not make a "
                             f"({d_out}, {d_in}) adapter like adapters[{present[0][0]}]")
    ranks = [int(a[0].shape[0]) for _, a in present]
    R = max(ranks) if max_rank is None else checks.positive_int(max_rank, "max_rank")
    if R < max(ranks):
        raise ValueError(f"max_rank={R} is below the largest adapter rank {max(ranks)}")
    scales = {float(a[2]) for _, a in present}
    if not fold_scale and len(scales) > 1:
        raise ValueError(f"the adapters' scales differ ({sorted(scales)}) but the shrink takes one scale for "
                         "the batch: fold them into B (fold_scale=True), as engines do at load")
    xp = namespace(A0)
    dt = _dtype(xp, S)
    As, Bs = [], []
    for a in adapters:
        if a is None:
            As.append(xp.zeros((1, R, d_in), dtype=dt))
            Bs.append(xp.zeros((1, d_out, R), dtype=dt))
            continue
        A, B, s = a
        r = int(A.shape[0])
        if fold_scale:
            B = xp.astype(xp.astype(B, xp.float64) * float(s), dt)       # fl_S(B s): one rounding
        A = xp.concat([A, xp.zeros((R - r, d_in), dtype=dt)], axis=0)    # (R, d_in)  zero rows
        B = xp.concat([B, xp.zeros((d_out, R - r), dtype=dt)], axis=1)   # (d_out, R) zero columns
        As.append(xp.reshape(A, (1, R, d_in)))
        Bs.append(xp.reshape(B, (1, d_out, R)))
    return xp.concat(As, axis=0), xp.concat(Bs, axis=0)                  # (n, R, d_in), (n, d_out, R)


# ============================================================================================
# Shrink (V1) and expand (V2)
# ============================================================================================


def _per_slice(stack: Any, name: str) -> list[Any]:
    if checks.is_array(stack):
        return [stack]
    if isinstance(stack, (list, tuple)) and stack and all(checks.is_array(s) for s in stack):
        return list(stack)
    raise TypeError(f"{name} must be a 3-D array (one slice) or a list of them, one per slice")


def _indices(indices: Any, n_tokens: int, n_slots: int, xp: Any) -> tuple[Any, Any]:
    """Per-token slots as (safe gather index with -1 -> 0, has-adapter mask (T,)) in namespace xp."""
    host = (token_indices(indices, n_tokens, n_slots=n_slots) if isinstance(indices, Segments)
            else _host_ints(indices, "indices"))
    if host.shape != (n_tokens,):
        raise ValueError(f"indices must have one entry per token ({n_tokens}), got {host.shape[0]}")
    bad = (host < NO_ADAPTER) | (host >= n_slots)
    if np.any(bad):
        t = int(np.argmax(bad))
        raise ValueError(f"indices must be in [-1, {n_slots}) (-1: no adapter; {n_slots} slots), "
                         f"got {int(host[t])} at token {t}")
    return xp.asarray(np.where(host < 0, 0, host)), xp.asarray(host >= 0)


def lora_shrink(x: Any, A_stack: Any, indices: Any, scale: float) -> Any:
    """(V1): ``h[s, t] = fl_Acc(fl_Acc(x[t] . A_s[indices[t]]^T) * fl_Acc(scale))``, 0 where -1.

    x (T, d_in); A_stack (n, R, d_in), or a list of them, one per output slice; indices (T,)
    slots or :class:`Segments`; scale a Python number (1.0 when scales are folded into B).
    Returns h (n_slices, T, R) in the accumulation dtype (float32, or float64 for float64 input).
    """
    checks.float_array(x, "x", STORAGE_DTYPES)
    if x.ndim != 2:
        raise ValueError(f"x must be (T, d_in) with the tokens flattened, got shape {tuple(x.shape)}")
    stacks = _per_slice(A_stack, "A_stack")
    T, d_in = (int(n) for n in x.shape)
    for q, A in enumerate(stacks):
        checks.same_dtype(("x", x), (f"A_stack[{q}]", A))
        if A.ndim != 3 or A.shape[2] != d_in or A.shape[:2] != stacks[0].shape[:2]:
            raise ValueError(f"A_stack[{q}] must be (n, R, d_in={d_in}) like the first slice "
                             f"{tuple(stacks[0].shape)}, got {tuple(A.shape)}")
    scale = checks.finite_real(scale, "scale")
    xp = namespace(x, *stacks)
    acc = _dtype(xp, accumulation_dtype(getval(x).dtype))
    safe, has = _indices(indices, T, int(stacks[0].shape[0]), xp)
    xa = xp.reshape(xp.astype(x, acc), (T, 1, d_in))                      # (T, 1, d_in)  exact upcast
    out = []
    for A in stacks:
        A_tok = xp.astype(xp.take(A, safe, axis=0), acc)                  # (T, R, d_in)  gather per token
        h = xp.reshape(xa @ xp.matrix_transpose(A_tok), (T, -1))         # (T, R)  sum in Acc
        h = h * scale                                                     # fl_Acc(h * fl_Acc(scale))
        out.append(xp.where(xp.reshape(has, (T, 1)), h, xp.zeros_like(h)))  # -1: h = 0
    return xp.stack(out, axis=0)                                          # (n_slices, T, R)


def lora_expand(y: Any, h: Any, B_stack: Any, indices: Any, slices: Sequence[tuple[int, int]], *,
                add_inputs: bool = True) -> Any:
    """(V2): ``y'[t, off + o] = fl_S(y[t, off + o] + fl_S(sum_k fl_S(h[s, t, k]) B_s[i, o, k]))``.

    y (T, d_out) in the storage dtype S; h (n_slices, T, R) from :func:`lora_shrink`; B_stack
    (n, w_s, R), or a list of them, one per slice; slices ``((offset, width), ...)`` with width_s =
    w_s, non-overlapping, inside y. Tokens with index -1 and columns outside every slice keep y's
    values bit for bit. ``add_inputs=False`` writes c instead of adding it (vLLM's option).
    Returns a new array y' (T, d_out); y is not modified.
    """
    checks.float_array(y, "y", STORAGE_DTYPES)
    checks.boolean(add_inputs, "add_inputs")
    if y.ndim != 2:
        raise ValueError(f"y must be (T, d_out), got shape {tuple(y.shape)}")
    T, d_out = (int(n) for n in y.shape)
    stacks = _per_slice(B_stack, "B_stack")
    S = dtype_name(getval(y).dtype)
    acc_name = accumulation_dtype(S)
    checks.float_array(h, "h", (acc_name,))
    if h.ndim != 3 or tuple(h.shape[:2]) != (len(stacks), T):
        raise ValueError(f"h must be (n_slices={len(stacks)}, T={T}, R), got shape {tuple(h.shape)}")
    R = int(h.shape[2])
    slices = _check_slices(slices, stacks, d_out)
    for q, B in enumerate(stacks):
        checks.same_dtype(("y", y), (f"B_stack[{q}]", B))
        if B.ndim != 3 or B.shape[2] != R or B.shape[0] != stacks[0].shape[0]:
            raise ValueError(f"B_stack[{q}] must be (n={stacks[0].shape[0]}, width, R={R}), got {tuple(B.shape)}")
    xp = namespace(y, h, *stacks)
    acc, dt = _dtype(xp, acc_name), _dtype(xp, S)
    safe, has = _indices(indices, T, int(stacks[0].shape[0]), xp)
    keep = xp.reshape(has, (T, 1))
    pieces, col = [], 0
    for q in sorted(range(len(stacks)), key=lambda q: slices[q][0]):
        off, width = slices[q]
        if off > col:
            pieces.append(y[:, col:off])                                  # columns in no slice
        hS = xp.astype(xp.astype(h[q, ...], dt), acc)                     # (T, R)  fl_S(h), exact back
        B_tok = xp.astype(xp.take(stacks[q], safe, axis=0), acc)          # (T, w, R)  gather per token
        c = xp.reshape(B_tok @ xp.reshape(hS, (T, R, 1)), (T, width))     # (T, w)  sum in Acc
        c = xp.astype(c, dt)                                              # fl_S(c)
        old = y[:, off:off + width]
        new = xp.astype(xp.astype(old, acc) + xp.astype(c, acc), dt) if add_inputs else c  # fl_S(y + c)
        pieces.append(xp.where(keep, new, old))                           # -1: y unchanged
        col = off + width
    if col < d_out:
        pieces.append(y[:, col:])
    return xp.concat(pieces, axis=1)                                      # (T, d_out)


def add_lora(y: Any, x: Any, A_stack: Any, B_stack: Any, indices: Any, scale: float,
             slices: Sequence[tuple[int, int]]) -> Any:
    """Shrink then expand, vLLM's ``add_lora_linear``: ``lora_expand(y, lora_shrink(x, ...), ...)``."""
    return lora_expand(y, lora_shrink(x, A_stack, indices, scale), B_stack, indices, slices)


def _check_slices(slices: Any, stacks: list[Any], d_out: int) -> list[tuple[int, int]]:
    if isinstance(slices, (str, bytes)) or not isinstance(slices, Sequence) or len(slices) != len(stacks):
        raise ValueError(f"slices must list (offset, width) for each of the {len(stacks)} slices, got {slices!r}")
    out = []
    for q, item in enumerate(slices):
        if not isinstance(item, Sequence) or len(item) != 2:
            raise ValueError(f"slices[{q}] must be (offset, width), got {item!r}")
        off = checks.non_negative_int(item[0], f"slices[{q}] offset")
        width = checks.positive_int(item[1], f"slices[{q}] width")
        if width != stacks[q].shape[1]:
            raise ValueError(f"slices[{q}] has width {width} but B_stack[{q}] has {stacks[q].shape[1]} output rows")
        if off + width > d_out:
            raise ValueError(f"slices[{q}] = ({off}, {width}) ends at column {off + width}, past y's {d_out}")
        out.append((off, width))
    spans = sorted(out)
    for (a0, w0), (a1, _) in zip(spans, spans[1:]):
        if a0 + w0 > a1:
            raise ValueError(f"slices overlap: ({a0}, {w0}) and one starting at {a1}")
    return out
