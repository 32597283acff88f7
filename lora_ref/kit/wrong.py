"""Plain NumPy implementations of the linear-family contracts (LoRA, DoRA, embedding, conv), each
with optional deliberate bugs: the material of :mod:`lora_ref.kit.mutants`.

Written independently of lora-ref's code (PEFT's formulas where PEFT has them: DoRA's
``x W^T + b + (f - 1) xd W^T + f s xd A^T B^T``, the conv delta through einsum), so that the
correct versions passing the kit is evidence about the kit, not lora-ref agreeing with itself.
Every factory takes ``bug`` (None: correct) and returns a callable with the check's signature.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["conv_grad", "conv_layer", "conv_merge", "dora_base_grad", "dora_combine", "dora_grad", "dora_layer", "dora_magnitude",
           "dora_merge", "embedding_grad", "embedding_layer", "embedding_merge", "linear_grad", "linear_layer",
           "linear_merge", "keras_dense_layer", "keras_dense_merge", "llama_cpp_layer", "loralib_conv_layer", "loralib_conv_merge", "merge_cycles",
           "tied_embedding_merge"]


def _scale(alpha: float, r: int, use_rslora: bool, bug: str | None = None) -> float:
    if bug == "scale_alpha":
        return float(alpha)                                          # forgot to divide by r
    if bug == "rslora_ignored":
        return alpha / r                                             # rsLoRA's scale ignored
    if bug == "alpha_default_rank":
        return 1.0                                                   # alpha left at its default, r
    return alpha / math.sqrt(r) if use_rslora else alpha / r


# ============================================================================================
# Plain LoRA: the dense delta s B A, then x (W + s D)^T
# ============================================================================================


def linear_layer(bug: str | None = None):
    def impl(x, W, A, B, *, alpha, r, use_rslora, bias, dropout_mask, fan_in_fan_out):
        Wm = W.T if fan_in_fan_out and bug != "fifo_forgotten" else W        # (d_out, d_in)
        s = _scale(alpha, r, use_rslora, bug)
        if bug == "layout_guess":                                           # Keras/Flax layouts guessed
            A = A.T if A.shape[0] == Wm.shape[1] else A
            B = B.T if B.shape[1] == Wm.shape[0] else B
        xd = x if dropout_mask is None or bug == "dropout_ignored" else x * dropout_mask
        y = (xd if bug == "dropout_on_base" else x) @ Wm.T + xd @ _delta(A, B, s, bug).T
        return y if bias is None else y + bias
    return impl


def _delta(A, B, s, bug):
    """``s B A`` (d_out, d_in); with ``factors_float32`` (Keras 3's ``enable_lora``: its factors are
    float32 variables whatever the layer's dtype) formed in float32 and widened back."""
    if bug == "factors_float32":
        return (np.float32(s) * (B.astype(np.float32) @ A.astype(np.float32))).astype(A.dtype)
    return s * (B @ A)


def linear_merge(bug: str | None = None):
    def merge(W, A, B, *, alpha, r, use_rslora, fan_in_fan_out):
        s = _scale(alpha, r, use_rslora, bug)
        if bug == "layout_guess":
            d_in, d_out = W.shape if fan_in_fan_out else W.shape[::-1]
            A = A.T if A.shape[0] == d_in else A
            B = B.T if B.shape[1] == d_out else B
        D = _delta(A, B, s, bug)                                             # (d_out, d_in)
        return W + (D.T if fan_in_fan_out and bug != "fifo_forgotten" else D)
    return merge


def linear_grad(bug: str | None = None):
    def grad(x, W, A, B, dy, *, alpha, r, use_rslora, bias, dropout_mask, fan_in_fan_out):
        Wm = W.T if fan_in_fan_out else W
        s = _scale(alpha, r, use_rslora, bug)
        M = np.ones_like(x) if dropout_mask is None else np.broadcast_to(dropout_mask, x.shape)
        X, G, Mf = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1]), M.reshape(-1, x.shape[-1])
        dx = G @ Wm + ((G @ B) @ A) * s * Mf
        dA = s * (G @ B).T @ (X * Mf)
        dB = s * G.T @ ((X * Mf) @ A.T)
        return dx.reshape(x.shape), dA, dB
    return grad


# ============================================================================================
# DoRA, PEFT's formula: y = x W^T + b + (f - 1) (xd W^T) + f s (xd A^T) B^T, f = m / ||W + s B A||
# ============================================================================================


def _dora_parts(W, A, B, m, alpha, r, use_rslora, fan_in_fan_out, bug):
    Wm = W.T if fan_in_fan_out else W                                        # (d_out, d_in)
    s = _scale(alpha, r, use_rslora)
    V = Wm + s * (B @ A)
    C = np.sqrt(np.sum(V * V, axis=0 if bug == "input_axis" else 1))         # (d_in,) for the bug
    return Wm, s, V, C, None if m is None else m / C


def dora_layer(bug: str | None = None):
    def impl(x, W, A, B, m, *, alpha, r, use_rslora, bias, dropout_mask, fan_in_fan_out):
        Wm, s, V, C, f = _dora_parts(W, A, B, m, alpha, r, use_rslora, fan_in_fan_out, bug)
        xd = x if dropout_mask is None else x * dropout_mask
        b = 0.0 if bias is None else bias
        if bug == "dropout_on_base":
            return f * (xd @ V.T) + b
        if bug == "input_axis":                                              # m, C per input feature
            return x @ (V * f).T + b
        return x @ Wm.T + b + (f - 1.0) * (xd @ Wm.T) + f * s * ((xd @ A.T) @ B.T)
    return impl


def dora_magnitude(bug: str | None = None):
    def magnitude(W, A, B, *, alpha, r, use_rslora, fan_in_fan_out):
        Wm, s, V, C, _ = _dora_parts(W, A, B, None, alpha, r, use_rslora, fan_in_fan_out, bug)
        return np.sqrt(np.sum(Wm * Wm, axis=1)) if bug == "W_alone" else C
    return magnitude


def dora_merge(bug: str | None = None):
    def merge(W, A, B, m, *, alpha, r, use_rslora, fan_in_fan_out):
        Wm, s, V, C, f = _dora_parts(W, A, B, m, alpha, r, use_rslora, fan_in_fan_out, bug)
        merged = V * f if bug == "input_axis" else V * f[:, None]            # (d_out, d_in)
        return merged.T if fan_in_fan_out else merged
    return merge


def dora_grad(bug: str | None = None):
    """(dx, dA, dB, dm), written out: E = G^T Xd, phi = E . V per row, dm = phi / C,
    dV = f E (detached) or f (E - (phi / C^2) V) (exact), dA = s B^T dV, dB = s dV A^T."""
    def grad(x, W, A, B, m, dy, *, alpha, r, use_rslora, bias, dropout_mask, fan_in_fan_out, detach_norm):
        Wm, s, V, C, f = _dora_parts(W, A, B, m, alpha, r, use_rslora, fan_in_fan_out, None)
        M = np.ones_like(x) if dropout_mask is None else np.broadcast_to(dropout_mask, x.shape)
        X, G, Mf = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1]), M.reshape(-1, x.shape[-1])
        E = G.T @ (X * Mf)                                                   # (d_out, d_in)
        phi = np.sum(E * V, axis=1)
        exact = (not detach_norm or bug == "always_exact") and bug != "always_detached"
        dV = f[:, None] * (E - ((phi / C) / C)[:, None] * V) if exact else f[:, None] * E
        base = 0.0 if bug == "dropout_on_base" else (G @ Wm) * (1.0 - Mf)
        dx = ((G * f) @ V) * Mf + base
        return dx.reshape(x.shape), s * B.T @ dV, s * dV @ A.T, phi / C
    return grad


# ============================================================================================
# Embedding: y = E[ids] + s (A^T[ids]) B^T; gradients by autograd on this forward
# ============================================================================================


def _embedding_forward(ids, E, A, B, s, lora_dropout, bug):
    import autograd.numpy as anp

    H = anp.transpose(A)[ids]                                                # (..., r)
    if bug == "dropout_on_path" and lora_dropout > 0:                        # a mask on the looked-up rows
        keep = np.random.default_rng(0).random(H.shape) >= lora_dropout
        H = H * (keep / (1.0 - lora_dropout)).astype(E.dtype)
    if bug == "roles_swapped":                                               # the linear layer's s B A
        return (E + s * anp.dot(B, A))[ids]
    return E[ids] + s * anp.dot(H, anp.transpose(B))


def embedding_layer(bug: str | None = None):
    def impl(ids, E, A, B, *, alpha, r, use_rslora, lora_dropout):
        return _embedding_forward(ids, E, A, B, _scale(alpha, r, use_rslora), lora_dropout, bug)
    return impl


def embedding_merge(bug: str | None = None):
    def merge(E, A, B, *, alpha, r, use_rslora):
        s = _scale(alpha, r, use_rslora)
        return E + s * (B @ A if bug == "roles_swapped" else (B @ A).T)
    return merge


def embedding_grad(bug: str | None = None):
    def grad(ids, E, A, B, dy, *, alpha, r, use_rslora):
        from autograd import make_vjp
        s = _scale(alpha, r, use_rslora)
        vjp, _ = make_vjp(lambda AA, BB: _embedding_forward(ids, E, AA, BB, s, 0.0, bug), argnum=(0, 1))(A, B)
        return vjp(dy)
    return grad


# ============================================================================================
# Convolution: the dense delta dW = s B A as one kernel, applied as a second convolution
# ============================================================================================


def _per_axis(v, n):
    return (v,) * n if isinstance(v, int) else tuple(v)


def _conv(x, W, stride, padding, dilation, groups):
    """A direct convolution (PyTorch's cross-correlation) summed over kernel offsets, in
    autograd.numpy so that it can be differentiated. x (N, C_in, *S), W (C_out, C_in/G, *k)."""
    import autograd.numpy as anp

    n = x.ndim - 2
    s, p, d = _per_axis(stride, n), _per_axis(padding, n), _per_axis(dilation, n)
    for j in range(n):
        if p[j]:
            z = anp.zeros(x.shape[:2 + j] + (p[j],) + x.shape[3 + j:], dtype=x.dtype)
            x = anp.concatenate([z, x, z], axis=2 + j)
    k, N, C_out = W.shape[2:], x.shape[0], W.shape[0]
    O = tuple((x.shape[2 + j] - d[j] * (k[j] - 1) - 1) // s[j] + 1 for j in range(n))
    P, G, cin_g = math.prod(O), groups, W.shape[1]
    y = None
    for t in np.ndindex(*k):
        window = (slice(None), slice(None)) + tuple(slice(d[j] * t[j], d[j] * t[j] + s[j] * (O[j] - 1) + 1, s[j])
                                                    for j in range(n))
        xs = anp.reshape(x[window], (N, G, cin_g, P))                       # (N, G, C_in/G, P)
        Wt = anp.reshape(W[(slice(None), slice(None)) + t], (G, C_out // G, cin_g))
        term = anp.einsum("goc,ngcp->ngop", Wt, xs)
        y = term if y is None else y + term
    return anp.reshape(y, (N, C_out) + O)


def _conv_delta(A, B, s, groups, bug):
    """dW (C_out, C_in, *k): dW[o, i, t] = s sum_j B[o, j] A[g(o) r/G + j, i, t], g(o) the group of o."""
    import autograd.numpy as anp

    G, C_out, r, k = groups, B.shape[0], A.shape[0], A.shape[2:]
    Bg = anp.reshape(B, (G, C_out // G, r // G))                              # (G, C_out/G, r/G)
    Ag = anp.reshape(A, (G, r // G, A.shape[1], math.prod(k)))               # (G, r/G, C_in, K)
    if bug == "loralib_view":                                                 # (C_in, C_out, K) viewed as W
        in_out = anp.einsum("goj,gjik->igok", Bg, Ag)
        return s * anp.reshape(in_out, (C_out, A.shape[1]) + k)
    return s * anp.reshape(anp.einsum("goj,gjik->goik", Bg, Ag), (C_out, A.shape[1]) + k)


def _conv_forward(x, W, A, B, s, bias, stride, padding, dilation, groups, dropout_mask, bug):
    import autograd.numpy as anp

    y = _conv(x, W, stride, padding, dilation, groups)
    if bias is not None:
        y = y + anp.reshape(bias, (-1,) + (1,) * (x.ndim - 2))
    xd = x if dropout_mask is None else x * dropout_mask
    d_A = 1 if bug == "dilation_ignored" else dilation                       # PEFT's A conv: no dilation
    return y + _conv(xd, _conv_delta(A, B, s, groups, bug), stride, padding, d_A, 1)


def conv_layer(bug: str | None = None):
    def impl(x, W, A, B, *, alpha, r, use_rslora, bias, stride, padding, dilation, groups, dropout_mask):
        return _conv_forward(x, W, A, B, _scale(alpha, r, use_rslora), bias, stride, padding, dilation, groups,
                             dropout_mask, bug)
    return impl


def conv_merge(bug: str | None = None):
    def merge(W, A, B, *, alpha, r, use_rslora):
        return W + _conv_delta(A, B, _scale(alpha, r, use_rslora), 1, bug)
    return merge


def conv_grad(bug: str | None = None):
    def grad(x, W, A, B, dy, *, alpha, r, use_rslora, bias, stride, padding, dilation, groups, dropout_mask):
        from autograd import make_vjp
        s = _scale(alpha, r, use_rslora)
        f = lambda xx, AA, BB: _conv_forward(xx, W, AA, BB, s, bias, stride, padding, dilation, groups,  # noqa: E731
                                             dropout_mask, bug)
        vjp, _ = make_vjp(f, argnum=(0, 1, 2))(x, A, B)
        return vjp(dy)
    return grad


# ============================================================================================
# Shipping implementations, re-implemented from their source (lora_ref.kit.bugs' material):
# bug=None is the fixed version, the named bug the released one.
# ============================================================================================


def llama_cpp_layer(bug: str | None = None):
    """llama.cpp's LoRA path for a PEFT adapter: convert_lora_to_gguf.py writes
    ``adapter.lora.alpha = adapter_config["lora_alpha"]`` (float32 metadata; ``use_rslora`` is never
    read: bug ``"alpha_copied"``; the fix writes ``lora_alpha * sqrt(r)`` for an rsLoRA adapter), and
    llama-adapter.h's ``get_scale`` applies ``adapter_scale * alpha / rank`` in float, rank = B's r."""
    def impl(x, W, A, B, *, alpha, r, use_rslora, bias, dropout_mask, fan_in_fan_out):
        written = alpha * math.sqrt(r) if use_rslora and bug != "alpha_copied" else alpha   # the converter
        meta = np.float32(written)                                                      # GGUF float32
        scale = np.float32(1.0) * meta / np.float32(B.shape[1])                          # get_scale
        Wm = W.T if fan_in_fan_out else W
        xd = x if dropout_mask is None else x * dropout_mask
        y = x @ Wm.T + (xd @ A.T) @ B.T * x.dtype.type(scale)
        return y if bias is None else y + bias
    return impl


def _keras_kernel(W, A, B, alpha, r, use_rslora, fan_in_fan_out, bug):
    """Keras 3.15.1's ``Dense.kernel`` with LoRA: ``cast(kernel + (lora_alpha / rank) *
    matmul(lora_kernel_a, lora_kernel_b), compute_dtype)``, kernel (d_in, d_out). With bug
    ``"float32"`` (the torch backend): the factors are float32 variables (``enable_lora``'s
    ``dtype="float32"``), and ``ops.matmul`` computes in float32 anyway (``result_type`` maps float64
    to float32, as JAX does by default). Fixed: the factors and the product in the layer's dtype.
    The scale is passed as lora_alpha = alpha (times sqrt(r) for rsLoRA: Keras has none); with bug
    ``"alpha_default_rank"`` it is not passed, and lora_alpha defaults to the rank: scale 1."""
    kernel = W if fan_in_fan_out else W.T                                     # (d_in, d_out)
    scale = (alpha * math.sqrt(r) if use_rslora else alpha) / r
    if bug == "alpha_default_rank":                                           # enable_lora(rank): alpha = rank
        scale = 1.0
    a, b = A.T, B.T                                                           # Keras' (d_in, r), (r, d_out)
    if bug == "float32":
        a, b = a.astype(np.float32), b.astype(np.float32)
    return (kernel + scale * _ordered_matmul(a, b)).astype(W.dtype)


def _ordered_matmul(a, b):
    """``a @ b`` summed in a fixed order, one rounding per product and per sum (no FMA): the same
    bits on every CPU, so that the page written from it is too."""
    out = a[..., :, :1] * b[:1, :]
    for k in range(1, a.shape[-1]):
        out = out + a[..., :, k:k + 1] * b[k:k + 1, :]
    return out


def keras_dense_layer(bug: str | None = None):
    """Keras 3.15.1's ``Dense.call``: ``matmul(inputs, kernel)``, then ``add(x, bias)``. With bug
    ``"float32"`` (the torch backend) a float64 matmul is computed and returned in float32, and
    adding the float64 bias (``torch.add``) widens the result back: a float64 layer without bias
    returns float32. No dropout."""
    def impl(x, W, A, B, *, alpha, r, use_rslora, bias, dropout_mask, fan_in_fan_out):
        if dropout_mask is not None:
            raise NotImplementedError("Keras' enable_lora has no dropout")
        kernel = _keras_kernel(W, A, B, alpha, r, use_rslora, fan_in_fan_out, bug)
        narrow = np.float32 if bug == "float32" and x.dtype == np.float64 else x.dtype
        y = _ordered_matmul(x.astype(narrow), kernel.astype(narrow))
        return y if bias is None else y.astype(np.result_type(y, bias)) + bias
    return impl


def keras_dense_merge(bug: str | None = None):
    """``Dense.kernel`` with LoRA (what saving a merged model writes), back in W's layout."""
    def merge(W, A, B, *, alpha, r, use_rslora, fan_in_fan_out):
        kernel = _keras_kernel(W, A, B, alpha, r, use_rslora, fan_in_fan_out, bug)
        return kernel if fan_in_fan_out else kernel.T
    return merge


def _loralib_factors(A, B, kernel: int, bug: str | None):
    """loralib 0.1.2's ConvLoRA sizes its factors lora_A (r k, C_in k), lora_B (C_out k, r k) (bug
    ``"kernel_squared"``; zeros, as nothing of a PEFT adapter fits them); the fix sizes them for the
    weight: lora_A (r, C_in k) = A flattened, lora_B (C_out, r)."""
    r, c_in, c_out = A.shape[0], A.shape[1], B.shape[0]
    if bug == "kernel_squared":
        return np.zeros((r * kernel, c_in * kernel), A.dtype), np.zeros((c_out * kernel, r * kernel), B.dtype)
    return A.reshape(r, -1), B.reshape(c_out, r)


def _loralib_view(lora_A, lora_B, shape):
    """``(lora_B @ lora_A).view(conv.weight.shape)``, raising torch's error where the sizes differ."""
    delta = lora_B @ lora_A
    if delta.size != math.prod(shape):
        raise RuntimeError(f"shape '[{', '.join(map(str, shape))}]' is invalid for input of size {delta.size}")
    return delta.reshape(shape)


def loralib_conv_layer(bug: str | None = None):
    """loralib's ConvLoRA forward: ``conv(x, W + (lora_B @ lora_A).view(W.shape) * scaling, bias)``
    (no dropout, no rsLoRA), 1-D or 3-D here (loralib's Conv2d is right)."""
    def impl(x, W, A, B, *, alpha, r, use_rslora, bias, stride, padding, dilation, groups, dropout_mask):
        lora_A, lora_B = _loralib_factors(A, B, W.shape[2], bug)
        merged = W + _loralib_view(lora_A, lora_B, W.shape) * x.dtype.type(alpha / r)
        y = _conv(x, merged, stride, padding, dilation, groups)
        return y + bias.reshape((-1,) + (1,) * (x.ndim - 2))
    return impl


def loralib_conv_merge(bug: str | None = None):
    """loralib merges on ``eval()``: ``weight += (lora_B @ lora_A).view(weight.shape) * scaling``."""
    def merge(W, A, B, *, alpha, r, use_rslora):
        lora_A, lora_B = _loralib_factors(A, B, W.shape[2], bug)
        return W + _loralib_view(lora_A, lora_B, W.shape) * W.dtype.type(alpha / r)
    return merge


def tied_embedding_merge(bug: str | None = None):
    """Merging an embedding adapter into a table the output head shares. PEFT 0.21.2 adds
    ``s (B A)^T`` to the one shared table, so the head moves too (bug ``"shared_table"``); with
    ``ensure_weight_tying`` the head's Linear adapter shares the factors and is merged as well,
    adding the delta twice (bug ``"shared_table"`` with ``head_adapted``). The fix unties: the
    lookup gets ``E + s (B A)^T``, the head what the unmerged model's head computes with."""
    def impl(E, A, B, *, alpha, r, use_rslora, head_adapted):
        D = (B @ A).T * E.dtype.type(_scale(alpha, r, use_rslora))               # (V, D)
        if bug == "shared_table":
            table = E + D + D if head_adapted else E + D                         # merged once per adapter
            return table, table
        return E + D, (E + D if head_adapted else E.copy())
    return impl


def dora_base_grad(bug: str | None = None):
    """dL/dW of DoRA's layer in PEFT's dropout form with the norm detached:
    ``y = x W^T + b + (f - 1) (xd W^T) + f s (xd A^T) B^T``, f constant, so
    ``dL/dW = G^T X + ((f - 1) G)^T Xd`` (d_out, d_in), returned in W's layout. PEFT 0.21.2 with
    ``fan_in_fan_out`` computes the second term's ``W^T`` as ``nn.Parameter(W.T)``, a new leaf, so
    it sends nothing to W (bug ``"transpose_leaf"``)."""
    def grad(x, W, A, B, m, dy, *, alpha, r, use_rslora, bias, dropout_mask, fan_in_fan_out):
        Wm, s, V, C, f = _dora_parts(W, A, B, m, alpha, r, use_rslora, fan_in_fan_out, None)
        M = np.ones_like(x) if dropout_mask is None else np.broadcast_to(dropout_mask, x.shape)
        X, G, Mf = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1]), M.reshape(-1, x.shape[-1])
        dW = G.T @ X                                                          # the base layer's term
        if not (bug == "transpose_leaf" and fan_in_fan_out):
            dW = dW + ((f - 1.0) * G).T @ (X * Mf)                             # the correction's term
        return dW.T if fan_in_fan_out else dW
    return grad


def dora_combine(bug: str | None = None):
    """A weighted combination of DoRA adapters as PEFT 0.21.2's add_weighted_adapter builds it
    ('cat': A = [w_i s_i A_i] stacked, B = [B_i], scale 1). The combined adapter is created anew
    with use_dora, so its magnitude is DoRA's initial ``||W + s B0 A0||`` with B0 = 0, i.e.
    ``||W||`` row by row, and the factors are written afterwards: the sources' m are ignored (bug
    ``"magnitude_ignored"``). Fixed: the magnitudes carried over, ``sum w_i m_i`` (one source of
    weight 1: its own m, the only case with one right answer, and the one the kit checks)."""
    def impl(W, adapters, weights):
        ads = list(adapters.values())
        A = np.concatenate([a["A"] * W.dtype.type(w * _scale(a["alpha"], a["r"], a["use_rslora"]))
                            for a, w in zip(ads, weights)])                    # (sum r_i, d_in)
        B = np.concatenate([a["B"] for a in ads], axis=1)                    # (d_out, sum r_i)
        if bug == "magnitude_ignored":
            return A, B, 1.0, np.sqrt(np.sum(W * W, axis=1))                  # ||W + s 0 A0|| = ||W||
        return A, B, 1.0, sum(W.dtype.type(w) * a["m"] for a, w in zip(ads, weights))
    return impl


def merge_cycles(bug: str | None = None):
    """``cycles`` times merge then unmerge of float32 factors into a 16-bit W, as PEFT 0.21.2's LoRA
    Linear does on the CPU: the delta ``D32 = fl32(fl32(B @ A) * s)``; merge ``W = cast(fl32(W +
    D32))`` (``weight.data += delta``); unmerge ``W = cast(W - cast(D32))`` (``weight.data -=
    delta.to(orig_dtype)``: bug ``"rounded_delta"``), or, fixed, ``cast(fl32(W - D32))``."""
    def impl(W, A, B, *, alpha, r, use_rslora, cycles):
        f32 = np.float32
        D32 = (B.astype(f32) @ A.astype(f32)) * f32(_scale(alpha, r, use_rslora))
        sub = D32.astype(W.dtype).astype(f32) if bug == "rounded_delta" else D32
        for _ in range(cycles):
            W = (W.astype(f32) + D32).astype(W.dtype)                          # merge
            W = (W.astype(f32) - sub).astype(W.dtype)                          # unmerge
        return W
    return impl
