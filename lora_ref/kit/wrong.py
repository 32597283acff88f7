"""Plain NumPy implementations of the linear-family contracts (LoRA, DoRA, embedding, conv), each
with optional deliberate bugs: the material of :mod:`lora_ref.kit.mutants`.

Written independently of lora-ref's code (PEFT's formulas where PEFT has them: DoRA's
``x W^T + b + (f - 1) xd W^T + f s xd A^T B^T``, the conv delta through einsum), so that the
correct versions passing the kit is evidence about the kit, not lora-ref agreeing with itself.
Every factory takes ``bug`` (None: correct) and returns a callable with the check's signature.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["conv_grad", "conv_layer", "conv_merge", "dora_grad", "dora_layer", "dora_magnitude", "dora_merge",
           "embedding_grad", "embedding_layer", "embedding_merge", "linear_grad", "linear_layer", "linear_merge"]


def _scale(alpha: float, r: int, use_rslora: bool, bug: str | None = None) -> float:
    if bug == "scale_alpha":
        return float(alpha)                                          # forgot to divide by r
    if bug == "rslora_ignored":
        return alpha / r                                             # rsLoRA's scale ignored
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
