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
    def impl(x, W, A, B, *, alpha, r, use_rslora, bias, dropout_mask, fan_in_fan_out, enable_lora=None):
        Wm = W.T if fan_in_fan_out and bug != "fifo_forgotten" else W        # (d_out, d_in)
        s = _scale(alpha, r, use_rslora, bug)
        if bug == "layout_guess":                                           # Keras/Flax layouts guessed
            A = A.T if A.shape[0] == Wm.shape[1] else A
            B = B.T if B.shape[1] == Wm.shape[0] else B
        xd = x if dropout_mask is None or bug == "dropout_ignored" else x * dropout_mask
        y = (xd if bug == "dropout_on_base" else x) @ Wm.T + xd @ (s * (B @ A)).T
        return y if bias is None else y + bias
    return impl


def linear_merge(bug: str | None = None):
    def merge(W, A, B, *, alpha, r, use_rslora, fan_in_fan_out, enable_lora=None):
        s = _scale(alpha, r, use_rslora, bug)
        D = s * (B @ A)                                                      # (d_out, d_in)
        return W + (D.T if fan_in_fan_out and bug != "fifo_forgotten" else D)
    return merge


def linear_grad(bug: str | None = None):
    def grad(x, W, A, B, dy, *, alpha, r, use_rslora, bias, dropout_mask, fan_in_fan_out, enable_lora=None):
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
