"""Plain NumPy implementations of the many-adapter contracts (adapter sets, mixed batches, the
serving kernels and a serving engine), with optional deliberate bugs: material of
:mod:`lora_ref.kit.mutants`. Written per token and per adapter, independently of lora-ref's code."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["adapter_set", "adapter_set_merge", "bnb_native_dequantizer", "combine", "dequantizer", "expand_kernel",
           "mixed_batch", "quantizer", "serving_engine", "sglang_engine", "shrink_kernel", "vllm_shrink"]


def _s(a: dict, bug: str | None = None) -> float:
    if bug == "rslora_ignored":
        return a["alpha"] / a["r"]
    return a["alpha"] / (math.sqrt(a["r"]) if a["use_rslora"] else a["r"])


# ============================================================================================
# Adapter sets and mixed batches
# ============================================================================================


def adapter_set(bug: str | None = None):
    def impl(x, W, adapters, active, *, bias):
        y = x @ W.T + (0.0 if bias is None else bias)
        names = list(adapters) if bug == "inactive_applied" else list(active)   # the bug: every loaded adapter
        if bug == "last_active_only":                                       # set_adapter([...]) keeping one
            names = names[-1:]
        for name in names:
            a = adapters[name]
            y = y + _s(a, bug) * ((x @ a["A"].T) @ a["B"].T)
        return y
    return impl


def adapter_set_merge(bug: str | None = None):
    def merge(W, adapters, names, *, fan_in_fan_out):
        for name in names:
            a = adapters[name]
            D = _s(a, bug) * (a["B"] @ a["A"])
            W = W + (D.T if fan_in_fan_out and bug != "fifo_forgotten" else D)
        return W
    return merge


def mixed_batch(bug: str | None = None):
    def impl(x, W, adapters, names, *, bias):
        order = list(adapters)
        y = x @ W.T + (0.0 if bias is None else bias)
        if bug == "first_sample_adapter":                                  # the batch takes sample 0's adapter
            names = [names[0]] * len(names)
        out = []
        for n, name in enumerate(names):
            if name == "__base__":
                if bug != "base_is_last":
                    out.append(y[n])
                    continue
                name = order[-1]                                           # index -1 read as the last one
            a = adapters[name]
            out.append(y[n] + _s(a, bug) * ((x[n] @ a["A"].T) @ a["B"].T))
        return np.stack(out)
    return impl


# ============================================================================================
# Serving: the two kernels (float32 accumulation for 16-bit storage) and an engine that loads
# ============================================================================================


def _acc(dtype) -> type:
    return np.float64 if np.dtype(dtype) == np.float64 else np.float32


def _tokens(indices, T: int, bug: str | None) -> np.ndarray:
    if not hasattr(indices, "starts"):
        return np.asarray(indices)
    out = np.repeat(np.asarray(indices.indices), np.asarray(indices.lengths))   # (T,)
    if bug == "segment_off_by_one":                                       # every sequence starts a token late
        out = np.concatenate([out[:1], out[:-1]])
    return out


def _slot(i: int, n: int, bug: str | None) -> int | None:
    if i < 0:
        return n - 1 if bug == "minus_one_is_last" else None               # torch's lora_weights[-1]
    return i


def shrink_kernel(bug: str | None = None):
    def shrink(x, A_stack, indices, scale):
        acc = _acc(x.dtype)
        T, R = x.shape[0], A_stack[0].shape[1]
        idx = _tokens(indices, T, bug)
        h = np.zeros((len(A_stack), T, R), dtype=acc)
        for s, A in enumerate(A_stack):
            for t in range(T):
                i = _slot(int(idx[t]), A.shape[0], bug)
                if i is not None:
                    h[s, t] = (A[i].astype(acc) @ x[t].astype(acc)) * acc(scale)
        return h
    return shrink


def expand_kernel(bug: str | None = None):
    def expand(y, h, B_stack, indices, slices):
        S, acc = y.dtype, h.dtype
        out = y.copy()
        idx = _tokens(indices, y.shape[0], bug)
        for s, ((off, w), B) in enumerate(zip(slices, B_stack)):
            for t in range(y.shape[0]):
                i = _slot(int(idx[t]), B.shape[0], bug)
                if i is not None:
                    c = (B[i].astype(acc) @ h[s, t].astype(S).astype(acc)).astype(S)
                    out[t, off:off + w] = (out[t, off:off + w].astype(acc) + c.astype(acc)).astype(S)
        return out
    return expand


def serving_engine(bug: str | None = None):
    """Loads each slice's adapters into zero-padded stacks with the scale folded into B (vLLM's
    ``lora_b *= scaling``), then runs the two kernels with scale 1."""
    def serve(y, x, adapters, indices, slices):
        S = y.dtype
        R = max(a["r"] for slots in adapters for a in slots if a is not None)
        A_stack, B_stack = [], []
        for slots, (_, w) in zip(adapters, slices):
            A = np.zeros((len(slots), R, x.shape[1]), dtype=S)
            B = np.zeros((len(slots), w, R), dtype=S)
            for i, a in enumerate(slots):
                if a is None:
                    continue
                r = a["r"]
                A[i, :r] = a["A"]
                B[i, :, :r] = (a["B"].astype(np.float64) * _s(a, bug)).astype(S)   # folded at load
                if bug == "padding_not_zero" and r < R:                   # left over from a larger adapter
                    A[i, r:] = 0.5
                    B[i, :, r:] = 0.5
            A_stack.append(A)
            B_stack.append(B)
        scale = 1.0
        if bug == "scale_twice":                                         # and again in the shrink
            scale = _s(next(a for slots in adapters for a in slots if a is not None))
        h = shrink_kernel(bug)(x, A_stack, indices, scale)
        return expand_kernel(bug)(y, h, B_stack, indices, slices)
    return serve


# ============================================================================================
# Combinations: PEFT's add_weighted_adapter written out (and lora-ref's exact)
# ============================================================================================


def _prune_top(t, density):
    k = int(density * t.size)
    keep = np.zeros(t.size, dtype=bool)
    keep[np.argsort(-np.abs(t).reshape(-1), kind="stable")[:k]] = True
    return t * keep.reshape(t.shape).astype(t.dtype)


def _operator(base, ts, vs, density, majority, masks):
    if base in ("dare_linear", "dare_ties"):
        ts = [(t * m) / t.dtype.type(density) for t, m in zip(ts, masks)]
    elif base in ("ties", "magnitude_prune"):
        ts = [_prune_top(t, density) for t in ts]
    if base not in ("ties", "dare_ties"):
        return sum(t * t.dtype.type(v) for t, v in zip(ts, vs))
    votes = sum(ts) if majority == "total" else sum(np.sign(t) for t in ts)
    elected = np.where(votes >= 0, 1.0, -1.0)
    agree = [(np.sign(t) == elected).astype(ts[0].dtype) for t in ts]
    total = sum(a * t * t.dtype.type(v) for a, t, v in zip(agree, ts, vs))
    return total / np.maximum(sum(agree), 1.0).astype(ts[0].dtype)


def combine(bug: str | None = None):
    def impl(adapters, weights, method, *, density, majority_sign, masks, rank):
        items = list(adapters.items())
        scales = [_s(a) for _, a in items]
        dt = items[0][1]["A"].dtype
        if method in ("exact", "cat"):
            A = np.concatenate([(a["A"] * w) * s for (_, a), w, s in zip(items, weights, scales)])
            return A, np.concatenate([a["B"] for _, a in items], axis=1), 1.0
        svd = method.endswith("svd")
        base = {"svd": "linear"}.get(method, method[:-4] if svd else method)
        if svd:
            deltas = [(a["B"] @ a["A"]) * dt.type(s) for (_, a), s in zip(items, scales)]
            ms = None if masks is None else [masks[n] for n, _ in items]
            T = _operator(base, deltas, weights, density, majority_sign, ms)
            U, S, Vh = np.linalg.svd(T, full_matrices=True)
            return Vh[:rank], U[:, :rank] * S[:rank], 1.0
        if bug == "no_square_root":                                       # w s on both factors
            a = b = [w * s for w, s in zip(weights, scales)]
        else:
            b = [math.sqrt(abs(w * s)) for w, s in zip(weights, scales)]
            a = [math.copysign(v, w * s) for v, w, s in zip(b, weights, scales)]
        mA = None if masks is None else [masks[n][0] for n, _ in items]
        mB = None if masks is None else [masks[n][1] for n, _ in items]
        A = _operator(base, [x["A"] for _, x in items], a, density, majority_sign, mA)
        B = _operator(base, [x["B"] for _, x in items], b, density, majority_sign, mB)
        r = A.shape[0]
        first_rslora = items[0][1]["use_rslora"]
        scale = r / math.sqrt(r) if bug == "peft_rslora_scale" and first_rslora else 1.0
        return A, B, scale
    return impl


# ============================================================================================
# 4-bit quantisation, bitsandbytes' conventions written out (the level tables and double
# quantisation's 8-bit lookup are lora-ref's: data, not convention)
# ============================================================================================


def _levels(quant_type):
    from ..quant import fp4_levels, nf4_levels
    return nf4_levels() if quant_type == "nf4" else fp4_levels()


def _blocks(n, blocksize, shape, bug):
    """[(start, stop)] of each block: the row-major flattening, or (the bug) each row on its own."""
    if bug == "per_row_blocks":
        cols = shape[-1]
        return [(r0 + c, r0 + min(c + blocksize, cols)) for r0 in range(0, n, cols) for c in range(0, cols, blocksize)]
    return [(b, min(b + blocksize, n)) for b in range(0, n, blocksize)]


def quantizer(bug: str | None = None):
    def impl(W, *, blocksize, quant_type, double_quant):
        from ..quant import double_quantize

        x = np.asarray(W).reshape(-1).astype(np.float32)
        levels = _levels(quant_type)
        order = np.argsort(levels, kind="stable")                          # codes in value order
        s = levels[order]
        mid = (s[:-1] + s[1:]) / np.float32(2.0)                          # (15,) float32 midpoints
        absmax, codes = [], []
        for start, stop in _blocks(x.size, blocksize, W.shape, bug):
            seg = x[start:stop]
            a = max(np.max(np.abs(seg)), np.float32(1e-38))
            full = stop - start == blocksize
            v = np.clip(seg * (np.float32(1.0) / a) if full else seg / a, -1, 1)
            below = (mid[None, :] <= v[:, None]) if bug == "ties_up" else (mid[None, :] < v[:, None])
            codes.append(order[np.sum(below, axis=1)])                    # halfway -> lower (the bug: upper)
            absmax.append(a)
        c = np.concatenate(codes).astype(np.uint8)
        if c.size % 2:
            c = np.append(c, order[np.sum(mid < 0)]).astype(np.uint8)     # the code of 0
        hi, lo = (c[1::2], c[0::2]) if bug == "low_nibble_first" else (c[0::2], c[1::2])
        state = {"weight": ((hi << 4) | lo).astype(np.uint8), "absmax": np.array(absmax, dtype=np.float32)}
        if double_quant:
            offset = 0.0 if bug == "offset_forgotten" else None
            q, nested, off = double_quantize(state["absmax"], offset)
            state.update(absmax=q, nested_absmax=nested, nested_offset=off)
        return state
    return impl


def dequantizer(bug: str | None = None):
    def dequantize(weight, absmax, *, shape, dtype, blocksize, quant_type, nested_absmax, nested_offset):
        import ml_dtypes
        from ..quant import dynamic_map

        n = math.prod(shape)
        codes = np.stack([weight & 0x0F, weight >> 4] if bug == "low_nibble_first" else [weight >> 4, weight & 0x0F],
                         axis=1).reshape(-1)[:n]
        if nested_absmax is not None:
            j = np.arange(absmax.size) // 256
            a = dynamic_map()[absmax] * nested_absmax[j]
            absmax = a if bug == "offset_forgotten" else a + np.float32(nested_offset)
        out = np.empty(n, dtype=np.float32)
        for k, (start, stop) in enumerate(_blocks(n, blocksize, shape, bug)):
            out[start:stop] = _levels(quant_type)[codes[start:stop]] * absmax[k]
        return out.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype).reshape(shape)
    return dequantize


# ============================================================================================
# Shipping implementations, re-implemented from their source (lora_ref.kit.bugs' material):
# bug=None is the fixed version, the named bug the released one.
# ============================================================================================


def vllm_shrink(bug: str | None = None):
    """vLLM's CPU fallback (vllm/lora/ops/torch_ops/lora_ops.py): ``bgmv_shrink`` selects
    ``lora_a_weights[lora_indices_tensor]``, so a token's index -1 (no adapter) picks the LAST slot,
    as PyTorch (and NumPy) indexing does (bug ``"index_minus_one"``); ``sgmv_shrink`` expands the
    sequences' indices with ``repeat_interleave`` first. The fix leaves those tokens' rows at zero,
    as the Triton kernel does (``if lora_index == -1: return`` into a zeroed buffer)."""
    def shrink(x, A_stack, indices, scale):
        acc = _acc(x.dtype)
        idx = np.asarray(indices) if not hasattr(indices, "starts") else \
            np.repeat(np.asarray(indices.indices), np.asarray(indices.lengths))       # repeat_interleave
        out = np.zeros((len(A_stack), x.shape[0], A_stack[0].shape[1]), dtype=acc)
        for s, A in enumerate(A_stack):
            selected = A[idx].astype(acc)                                            # (T, R, d_in)
            h = np.einsum("bi,boi->bo", x.astype(acc), selected) * acc(scale)       # (T, R)
            out[s] = h if bug == "index_minus_one" else np.where((idx >= 0)[:, None], h, acc(0.0))
        return out
    return shrink


def sglang_engine(bug: str | None = None):
    """SGLang's LoRA serving step: each adapter's scaling is ``LoRAAdapter.scaling = lora_alpha / r``
    (``use_rslora`` not read: bug ``"rslora_ignored"``; fixed: ``alpha / sqrt(r)``), applied per token
    to its adapter's ``A x`` (float32 accumulation), then the expand adds ``h B^T`` to y."""
    def serve(y, x, adapters, indices, slices):
        S, acc = y.dtype, _acc(y.dtype)
        R = max(a["r"] for slots in adapters for a in slots if a is not None)
        idx = _tokens(indices, x.shape[0], None)
        out = y.copy()
        for slots, (off, w) in zip(adapters, slices):
            for t in range(x.shape[0]):
                a = slots[idx[t]] if idx[t] >= 0 else None
                if a is None:
                    continue
                A = np.zeros((R, x.shape[1]), S)
                B = np.zeros((w, R), S)
                A[:a["r"]], B[:, :a["r"]] = a["A"], a["B"]                          # zero-padded to R
                h = (A.astype(acc) @ x[t].astype(acc)) * acc(_s(a, bug))
                c = (B.astype(acc) @ h.astype(S).astype(acc)).astype(S)
                out[t, off:off + w] = (out[t, off:off + w].astype(acc) + c.astype(acc)).astype(S)
        return out
    return serve


def bnb_native_dequantizer(bug: str | None = None):
    """bitsandbytes 0.50.2's native CPU ``dequantize_4bit`` (backends/cpu/ops.py, csrc's AVX-512
    kernel): W viewed as (m, n) rows; where the kernel runs (n even; on an AVX-512 CPU a block below
    2048; and, as measured, n a multiple of 16) it scales entry (i, j) by ``absmax[i * (n //
    blocksize) + j // blocksize]``, which is right only when every row starts a block (bug
    ``"row_index"``); bitsandbytes' pure-PyTorch path (the fix) uses the row-major block
    ``(i n + j) // blocksize``. The nested absmax is resolved first, as bitsandbytes does."""
    right = dequantizer()

    def dequantize(weight, absmax, *, shape, dtype, blocksize, quant_type, nested_absmax, nested_offset):
        import ml_dtypes
        from ..quant import dynamic_map

        n, m = shape[-1], math.prod(shape[:-1])
        if not (bug == "row_index" and n % 2 == 0 and n % 16 == 0 and blocksize < 2048 and m > 1
                and n % blocksize):
            return right(weight, absmax, shape=shape, dtype=dtype, blocksize=blocksize, quant_type=quant_type,
                         nested_absmax=nested_absmax, nested_offset=nested_offset)
        if nested_absmax is not None:
            j = np.arange(absmax.size) // 256
            absmax = dynamic_map()[absmax] * nested_absmax[j] + np.float32(nested_offset)
        codes = np.stack([weight >> 4, weight & 0x0F], axis=1).reshape(m, n)              # (m, n)
        block = np.arange(m)[:, None] * (n // blocksize) + np.arange(n)[None, :] // blocksize
        out = _levels(quant_type)[codes] * absmax[block]                                 # float32
        return out.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype).reshape(shape)
    return dequantize
