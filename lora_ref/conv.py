"""LoRA on a convolution, the math: clean, minimal, reference.

A convolution is a linear map of its input and of its weight, so Eq. 3 of Hu et al. 2021
(arXiv 2106.09685), ``h = W0 x + s B A x``, applies to it once "A x" is read as "convolve with A".
This file holds a reference convolution in plain array code (C1, with its gradients K1-K3), LoRA on
it in PEFT's layout (C2, gradients L1-L5), the merged weight (C3), and loralib's different
ConvLoRA parametrisation (C4).

Shapes, channels first as in PyTorch (``N`` is the batch; ``B`` is always LoRA's up-projection)::

    x     (N, C_in, *S)           S = (L,) for 1-D, (H, W) for 2-D, (D, H, W) for 3-D
    W     (C_out, C_in/G, *k)     G = groups; output channel o reads input group o // (C_out/G)
    bias  (C_out,)
    y     (N, C_out, *O)          O_j = floor((S_j + 2 p_j - d_j (k_j - 1) - 1) / s_j) + 1
    stride s, padding p (zeros), dilation d: one int per spatial axis (an int means all axes)
    K = prod(k) kernel offsets t, P = prod(O) output positions q

(C1) The convolution (a cross-correlation, as ``torch.nn.functional.conv*d``), x_pad = x with p
zeros on both sides of each spatial axis:

    y[n, o, q] = bias[o] + sum_{c < C_in/G} sum_t W[o, c, t] x_pad[n, g(o) C_in/G + c, s q + d t]

computed by im2col: ``cols[n, i, t, q] = x_pad[n, i, s q + d t]`` (one strided slice per offset
t), then per group one matrix product, ``y_g = W_g cols_g`` with W_g ((C_out/G), (C_in/G) K) and
cols_g ((C_in/G) K, P).

(C2) LoRA in PEFT's layout (peft 0.21.2, tuners/lora/layer.py, ``_ConvNd.update_layer``)::

    A  (r, C_in, *k)          a convolution with the base's kernel, stride and padding, groups 1
    B  (C_out, r/G, 1, ...)   a 1x1 convolution, stride 1, no padding, the base's groups
    y = conv(x, W, bias) + s conv_1x1(conv(x * M, A), B)           M: a dropout mask on x

PEFT requires r divisible by G. It does NOT pass the base's dilation (nor padding_mode) to A.
lora-ref applies the base's dilation to A, because that is what makes (C3) hold: A and W must
share stride, padding and dilation for ``conv(x, W) + s B(A(x)) = conv(x, W + dW)``. With a
dilated base, PEFT's forward raises a shape-mismatch RuntimeError in most cases, and where stride
makes the output sizes coincide it silently computes a different function from its own merged
model (docs/conv.md measures both).

(C3) Merging (groups 1; conv is linear in its weight and A, W share the geometry):

    dW[o, i, t] = s sum_r B[o, r] A[r, i, t]        i.e. reshape(s B_2d A_2d), A_2d (r, C_in K)

With G > 1, A mixes all C_in input channels while a grouped W connects output o to C_in/G of
them: ``s B A`` has no place in W. PEFT refuses to merge (NotImplementedError); so does lora-ref.

(C4) loralib's ConvLoRA (loralib 0.1.2, ``layers.ConvLoRA``, square kernel k, 2-D only) is
another parametrisation: A (r k, C_in k), B (C_out/G k, r k), ``dW = s reshape(B A)`` to W's
shape. As an (C_out, C_in k^2) matrix PEFT's dW has rank <= r; loralib's reaches
min(C_out, r k^2, C_in k^2). A PEFT delta fits loralib's form at the same r (viewed as loralib's
(C_out k, C_in k) matrix its rank is <= r k), but a loralib delta needs PEFT rank up to r k^2.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, NamedTuple

import numpy as np
from autograd.extend import defvjp, primitive

from .backend import asarray, float_dtype, namespace, sum_to_shape
from .checks import (broadcastable_mask, finite_merge, finite_real, float_array, is_int, non_negative_int,
                     numpy_generator, positive_int, same_dtype, shape_of)

__all__ = ["CONV_INIT_SCHEMES", "conv_delta_weight", "conv_nd", "conv_output_shape", "init_lora_conv", "lora_conv",
           "loralib_conv_delta", "merge_conv", "unmerge_conv"]

CONV_INIT_SCHEMES = ("kaiming", "gaussian", "random")


# ============================================================================================
# Geometry: what stride, padding, dilation and groups mean for the shapes
# ============================================================================================


class _Geo(NamedTuple):
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    kernel: tuple[int, ...]
    size: tuple[int, ...]       # S, the unpadded spatial size
    out: tuple[int, ...]        # O

    @property
    def offsets(self) -> list[tuple[int, ...]]:
        """The K kernel offsets t in W's row-major order (the order of W.reshape(..., K))."""
        return list(itertools.product(*(range(k) for k in self.kernel)))


def _per_axis(value: Any, n: int, name: str, check: Any) -> tuple[int, ...]:
    """An int, or a tuple of n ints, as a tuple of n checked Python ints."""
    if is_int(value):
        return (check(value, name),) * n
    if isinstance(value, str):
        raise TypeError(f"{name} must be an int or a tuple of {n} ints, got the string {value!r} "
                        "(lora_ref takes explicit numbers, e.g. padding=1 for a 3-wide kernel)")
    if not isinstance(value, (tuple, list)) or len(value) != n:
        raise ValueError(f"{name} must be an int or a tuple of {n} ints (one per spatial axis), got {value!r}")
    return tuple(check(v, f"{name}[{j}]") for j, v in enumerate(value))


def conv_output_shape(size: tuple[int, ...], kernel: tuple[int, ...], stride: Any = 1, padding: Any = 0,
                      dilation: Any = 1) -> tuple[int, ...]:
    """O_j = floor((S_j + 2 p_j - d_j (k_j - 1) - 1) / s_j) + 1 for each spatial axis (PyTorch's rule).

    Raises ``ValueError`` when the dilated kernel, ``d (k - 1) + 1``, is wider than the padded
    input on some axis (no output position).
    """
    n = len(size)
    s = _per_axis(stride, n, "stride", positive_int)
    p = _per_axis(padding, n, "padding", non_negative_int)
    d = _per_axis(dilation, n, "dilation", positive_int)
    out = []
    for j in range(n):
        extent = d[j] * (kernel[j] - 1) + 1
        if size[j] + 2 * p[j] < extent:
            raise ValueError(f"spatial axis {j}: the input is {size[j]} wide with padding {p[j]} on each side, "
                             f"narrower than the dilated kernel d (k - 1) + 1 = {extent} (k = {kernel[j]}, d = {d[j]})")
        out.append((size[j] + 2 * p[j] - extent) // s[j] + 1)
    return tuple(out)


def _geometry(x: Any, W: Any, stride: Any, padding: Any, dilation: Any, groups: Any, wname: str = "W") -> _Geo:
    """Validate x and a conv weight together; return the geometry. (No dtype checks here.)"""
    float_array(x, "x")
    float_array(W, wname)
    if x.ndim not in (3, 4, 5):
        raise ValueError(f"x must be (N, C_in, *spatial) with 1, 2 or 3 spatial axes, got shape {shape_of(x)} "
                         "(add a batch axis of 1 for a single example)")
    if W.ndim != x.ndim:
        raise ValueError(f"{wname} must have x's number of axes, (C_out, C_in/groups, *kernel), got "
                         f"{wname} {shape_of(W)} for x {shape_of(x)}")
    n = x.ndim - 2
    G = positive_int(groups, "groups")
    C_in, C_out = int(x.shape[1]), int(W.shape[0])
    if C_in % G or C_out % G:
        raise ValueError(f"groups={G} must divide C_in={C_in} and C_out={C_out}")
    if W.shape[1] != C_in // G:
        raise ValueError(f"{wname} must be (C_out, C_in/groups, *kernel) = ({C_out}, {C_in // G}, ...) for x with "
                         f"C_in={C_in} and groups={G}, got {wname} {shape_of(W)}")
    kernel, size = shape_of(W)[2:], shape_of(x)[2:]
    out = conv_output_shape(size, kernel, stride, padding, dilation)
    return _Geo(_per_axis(stride, n, "stride", positive_int), _per_axis(padding, n, "padding", non_negative_int),
                _per_axis(dilation, n, "dilation", positive_int), G, kernel, size, out)


# ============================================================================================
# (C1) The reference convolution: im2col and one matrix product per group
# ============================================================================================


def _pad(xp: Any, x: Any, padding: tuple[int, ...]) -> Any:
    """Zeros on both sides of each spatial axis: (N, C, *S) -> (N, C, *(S + 2 p))."""
    for j, p in enumerate(padding):
        if p:
            axis = 2 + j
            zeros = xp.zeros(tuple(x.shape[:axis]) + (p,) + tuple(x.shape[axis + 1:]), dtype=x.dtype)
            x = xp.concat([zeros, x, zeros], axis=axis)
    return x


def _window(geo: _Geo, t: tuple[int, ...]) -> tuple[slice, ...]:
    """The index of x_pad[:, :, s q + d t] over all output positions q: a strided slice per axis."""
    return (slice(None), slice(None)) + tuple(
        slice(d * tj, d * tj + s * (o - 1) + 1, s) for tj, s, d, o in zip(t, geo.stride, geo.dilation, geo.out))


def _cols(xp: Any, x: Any, geo: _Geo) -> Any:
    """im2col: (N, C_in, *S) -> (N, G, (C_in/G) K, P), cols[n, g, c K + t, q] = x_pad[n, g C_in/G + c, s q + d t]."""
    x_pad = _pad(xp, x, geo.padding)                               # (N, C_in, *(S + 2p))
    cols = xp.stack([x_pad[_window(geo, t)] for t in geo.offsets], axis=2)  # (N, C_in, K, *O)
    N, C_in, G = x.shape[0], x.shape[1], geo.groups
    return xp.reshape(cols, (N, G, (C_in // G) * math.prod(geo.kernel), math.prod(geo.out)))


def _grouped(xp: Any, W: Any, G: int) -> Any:
    """(C_out, C_in/G, *k) -> (G, C_out/G, (C_in/G) K): one matrix per group."""
    return xp.reshape(W, (G, W.shape[0] // G, math.prod(shape_of(W)[1:])))


def _conv(xp: Any, x: Any, W: Any, geo: _Geo) -> Any:
    """(C1) without the bias: y (N, C_out, *O)."""
    y = _grouped(xp, W, geo.groups) @ _cols(xp, x, geo)            # (N, G, C_out/G, P)
    return xp.reshape(y, (x.shape[0], W.shape[0]) + geo.out)       # (N, C_out, *O)


def _conv_nd(x: Any, W: Any, bias: Any = None, stride: Any = 1, padding: Any = 0, dilation: Any = 1,
             groups: int = 1) -> Any:
    """The undecorated forward of :func:`conv_nd`; autograd.numpy can trace it."""
    geo = _geometry(x, W, stride, padding, dilation, groups)
    _check_bias(bias, W, "conv_nd(x, W, bias=None, stride=1, padding=0, dilation=1, groups=1)")
    same_dtype(("x", x), ("W", W), ("bias", bias))
    xp = namespace(x, W, bias)
    y = _conv(xp, x, W, geo)                                        # (N, C_out, *O)
    if bias is not None:
        y = y + xp.reshape(bias, (W.shape[0],) + (1,) * len(geo.out))
    return y


conv_nd = primitive(_conv_nd)
conv_nd.__doc__ = """The reference convolution (C1), channels first, as ``torch.nn.functional.conv1d/2d/3d``.

    x (N, C_in, *S), W (C_out, C_in/groups, *k), bias (C_out,) or None; stride, padding (zeros),
    dilation: an int or one int per spatial axis; groups divides C_in and C_out. Returns
    (N, C_out, *O), O from :func:`conv_output_shape`. One floating dtype for all arrays.
    An autograd primitive with the hand-written VJPs K1-K3 below.
    """


# ============================================================================================
# The gradients of (C1), written out (each VJP below names its line)
# ============================================================================================
#
# With G = dL/dy viewed per group as G_g (N, G, C_out/G, P) and cols as above:
#
#   K1  dL/dx    = col2im(W_g^T G_g)           (N, C_in, *S)  the transpose of im2col: each offset's
#                                                             block goes back to x_pad[:, :, s q + d t]
#                                                             (summed where windows overlap), then
#                                                             the padding is cut off
#   K2  dL/dW    = sum_n G_g cols_g^T          (C_out, C_in/G, *k)
#   K3  dL/dbias = sum over n and q of G       (C_out,)
#
# col2im is written without in-place writes: each block is spread along each axis by interleaving
# s - 1 zeros (the transpose of a stride-s slice), then framed by zeros (the transpose of taking
# a window at offset d t).


def _spread(xp: Any, t: Any, axis: int, start: int, step: int, length: int) -> Any:
    """The transpose of ``u[..., start : start + step (n - 1) + 1 : step, ...]`` along ``axis``:
    t (..., n, ...) -> (..., length, ...) holding t at start, start + step, ... and zeros elsewhere."""
    n = t.shape[axis]
    before, after = tuple(t.shape[:axis]), tuple(t.shape[axis + 1:])
    if step > 1:
        zeros = xp.zeros_like(t)
        t = xp.stack([t] + [zeros] * (step - 1), axis=axis + 1)     # (..., n, step, ...)
        t = xp.reshape(t, before + (n * step,) + after)             # (..., n step, ...)
        t = t[(slice(None),) * axis + (slice(0, step * (n - 1) + 1), ...)]
    tail = length - start - (step * (n - 1) + 1)
    parts = [xp.zeros(before + (start,) + after, dtype=t.dtype)] if start else []
    parts += [t] + ([xp.zeros(before + (tail,) + after, dtype=t.dtype)] if tail else [])
    return xp.concat(parts, axis=axis) if len(parts) > 1 else t


def _conv_dx(xp: Any, g: Any, W: Any, geo: _Geo, x_shape: tuple[int, ...]) -> Any:
    """K1: dL/dx = col2im(W_g^T G_g)."""
    N, C_in, G = x_shape[0], x_shape[1], geo.groups
    Gg = xp.reshape(g, (N, G, W.shape[0] // G, math.prod(geo.out)))           # (N, G, C_out/G, P)
    dcols = xp.matrix_transpose(_grouped(xp, W, G)) @ Gg                      # (N, G, (C_in/G) K, P)
    dcols = xp.reshape(dcols, (N, C_in, math.prod(geo.kernel)) + geo.out)     # (N, C_in, K, *O)
    padded = tuple(S + 2 * p for S, p in zip(geo.size, geo.padding))
    dx_pad = None
    for k, t in enumerate(geo.offsets):
        block = dcols[:, :, k, ...]                                           # (N, C_in, *O)
        for j, tj in enumerate(t):
            block = _spread(xp, block, 2 + j, geo.dilation[j] * tj, geo.stride[j], padded[j])
        dx_pad = block if dx_pad is None else dx_pad + block                  # (N, C_in, *(S + 2p))
    crop = tuple(slice(p, p + S) for p, S in zip(geo.padding, geo.size))
    return dx_pad[(slice(None), slice(None)) + crop]                          # (N, C_in, *S)


def _conv_dW(xp: Any, g: Any, x: Any, geo: _Geo, W_shape: tuple[int, ...]) -> Any:
    """K2: dL/dW = sum_n G_g cols_g^T."""
    N, G = x.shape[0], geo.groups
    Gg = xp.reshape(g, (N, G, W_shape[0] // G, math.prod(geo.out)))           # (N, G, C_out/G, P)
    dW = xp.sum(Gg @ xp.matrix_transpose(_cols(xp, x, geo)), axis=0)          # (G, C_out/G, (C_in/G) K)
    return xp.reshape(dW, W_shape)


def _conv_dbias(xp: Any, g: Any) -> Any:
    """K3: dL/dbias = sum over n and q of G."""
    return xp.sum(g, axis=(0,) + tuple(range(2, g.ndim)))                    # (C_out,)


def _conv_vjp_x(ans, x, W, bias=None, stride=1, padding=0, dilation=1, groups=1):
    geo = _geometry(x, W, stride, padding, dilation, groups)                  # K1
    return lambda g: _conv_dx(namespace(g), g, W, geo, shape_of(x))


def _conv_vjp_W(ans, x, W, bias=None, stride=1, padding=0, dilation=1, groups=1):
    geo = _geometry(x, W, stride, padding, dilation, groups)                  # K2
    return lambda g: _conv_dW(namespace(g), g, x, geo, shape_of(W))


def _conv_vjp_bias(ans, x, W, bias=None, stride=1, padding=0, dilation=1, groups=1):
    return lambda g: _conv_dbias(namespace(g), g)                              # K3


def _no_grad(fun: str, what: str):
    def maker(*args, **kwargs):
        raise TypeError(f"{fun} is not differentiable with respect to {what}")
    return maker


defvjp(conv_nd, _conv_vjp_x, _conv_vjp_W, _conv_vjp_bias,
       *[_no_grad("conv_nd", f"{w} (a setting)") for w in ("stride", "padding", "dilation", "groups")])


# ============================================================================================
# (C2) LoRA on a convolution, PEFT's layout, an autograd primitive
# ============================================================================================


def _lora_conv(x: Any, W: Any, A: Any, B: Any, scale: float, bias: Any = None, stride: Any = 1, padding: Any = 0,
               dilation: Any = 1, groups: int = 1, dropout_mask: Any = None) -> Any:
    """The undecorated forward of :func:`lora_conv`; autograd.numpy can trace it."""
    geo, geo_A, geo_B, scale = _validate(x, W, A, B, scale, bias, stride, padding, dilation, groups, dropout_mask)
    xp = namespace(x, W, A, B, bias, dropout_mask)
    y = _conv(xp, x, W, geo)                                        # (N, C_out, *O)   W0 x
    if bias is not None:
        y = y + xp.reshape(bias, (W.shape[0],) + (1,) * len(geo.out))
    xd = x if dropout_mask is None else x * dropout_mask            # dropout on the adapter branch only
    H = _conv(xp, xd, A, geo_A)                                     # (N, r, *O)       A x
    U = _conv(xp, H, B, geo_B)                                      # (N, C_out, *O)   B A x
    return y + U * scale                                            # (C2) = Eq. 3: W0 x + s B A x


LORA_CONV_ORDER = ("lora_conv(x, W, A, B, scale, bias=None, stride=1, padding=0, dilation=1, groups=1, "
                   "dropout_mask=None)")

lora_conv = primitive(_lora_conv)
lora_conv.__doc__ = """LoRA's adapted convolution (C2): ``y = conv(x, W, bias) + s conv_1x1(conv(x * mask, A), B)``.

    The order is ``lora_conv(x, W, A, B, scale, bias=None, stride=1, padding=0, dilation=1,
    groups=1, dropout_mask=None)``: the bias comes right after the scale, as in
    ``torch.nn.functional.conv2d(x, W, bias, stride, ...)`` (issue 14 sketched the settings right
    after the scale; that is not this order). Pass the settings by keyword; a setting passed where
    the bias goes (an int or a tuple of ints) is refused with a TypeError saying so.

    Parameters
    ----------
    x : array (N, C_in, *S)                1, 2 or 3 spatial axes
    W : array (C_out, C_in/groups, *k)     frozen base weight (differentiated only if traced)
    A : array (r, C_in, *k)                PEFT's ``lora_A.weight``: the base's kernel, groups 1
    B : array (C_out, r/groups, 1, ...)    PEFT's ``lora_B.weight``: a 1x1 grouped convolution
    scale : float                          s; a Python number
    bias : array (C_out,), optional
    stride, padding, dilation : int or tuple of ints, the base's; applied to A as well (dilation
        included, unlike PEFT: see the module docstring)
    groups : int                           the base's; B uses it too; r must be divisible by it
    dropout_mask : array broadcastable to x, optional   multiplies x on the adapter branch only

    Returns y (N, C_out, *O), the inputs' dtype. Never forms the merged weight. An autograd
    primitive with the hand-written VJPs L1-L5 below.
    """


# ============================================================================================
# The gradients of (C2), written out, from K1-K2 applied to its three convolutions
# ============================================================================================
#
# With Xd = x * M, H = conv(Xd, A) (N, r, *O) and dH = s K1_{1x1}(G; B) = dL/dH (N, r, *O):
#
#   L1  dL/dx    = K1(G; W) + M * K1(dH; A)         (N, C_in, *S)   two paths, as the linear G1
#   L2  dL/dW    = K2(G; x)                         W's shape       only if W is trained
#   L3  dL/dbias = K3(G)                            (C_out,)
#   L4  dL/dA    = K2(dH; Xd)                       (r, C_in, *k)
#   L5  dL/dB    = s K2_{1x1}(G; H)                 (C_out, r/G, 1...)
#
# At init B = 0, so dH = 0 and L4 = 0 exactly: only B moves on the first step (as for lora_linear).


def _geos(x, W, A, B, stride, padding, dilation, groups):
    """The geometries of the base conv, of A (the base's, groups 1) and of B (1x1 on H, the base's
    groups), and H's shape (N, r, *O)."""
    geo = _geometry(x, W, stride, padding, dilation, groups)
    geo_A = _geometry(x, A, stride, padding, dilation, 1, "A")
    n = len(geo.out)
    geo_B = geo_A._replace(stride=(1,) * n, padding=(0,) * n, dilation=(1,) * n, groups=geo.groups,
                           kernel=shape_of(B)[2:], size=geo_A.out)
    return geo, geo_A, geo_B, (int(x.shape[0]), int(A.shape[0])) + geo_A.out


def _dH(xp, g, B, scale, geo_B, H_shape):
    return _conv_dx(xp, g, B, geo_B, H_shape) * finite_real(scale, "scale")   # (N, r, *O)   dL/dH


def _lora_vjp_x(ans, x, W, A, B, scale, bias=None, stride=1, padding=0, dilation=1, groups=1, dropout_mask=None):
    """L1: dL/dx = K1(G; W) + M * K1(dH; A)."""
    geo, geo_A, geo_B, H_shape = _geos(x, W, A, B, stride, padding, dilation, groups)

    def vjp(g):
        xp = namespace(g)
        through_A = _conv_dx(xp, _dH(xp, g, B, scale, geo_B, H_shape), A, geo_A, shape_of(x))
        if dropout_mask is not None:
            through_A = through_A * dropout_mask
        return sum_to_shape(_conv_dx(xp, g, W, geo, shape_of(x)) + through_A, shape_of(x))
    return vjp


def _lora_vjp_W(ans, x, W, A, B, scale, bias=None, stride=1, padding=0, dilation=1, groups=1, dropout_mask=None):
    """L2: dL/dW = K2(G; x)."""
    geo = _geometry(x, W, stride, padding, dilation, groups)
    return lambda g: _conv_dW(namespace(g), g, x, geo, shape_of(W))


def _lora_vjp_A(ans, x, W, A, B, scale, bias=None, stride=1, padding=0, dilation=1, groups=1, dropout_mask=None):
    """L4: dL/dA = K2(dH; Xd)."""
    _, geo_A, geo_B, H_shape = _geos(x, W, A, B, stride, padding, dilation, groups)

    def vjp(g):
        xp = namespace(g)
        xd = x if dropout_mask is None else x * dropout_mask
        return _conv_dW(xp, _dH(xp, g, B, scale, geo_B, H_shape), xd, geo_A, shape_of(A))
    return vjp


def _lora_vjp_B(ans, x, W, A, B, scale, bias=None, stride=1, padding=0, dilation=1, groups=1, dropout_mask=None):
    """L5: dL/dB = s K2_{1x1}(G; H), H = conv(Xd, A)."""
    _, geo_A, geo_B, _ = _geos(x, W, A, B, stride, padding, dilation, groups)

    def vjp(g):
        xp = namespace(g)
        xd = x if dropout_mask is None else x * dropout_mask
        H = _conv(xp, xd, A, geo_A)                                    # (N, r, *O)
        return _conv_dW(xp, g, H, geo_B, shape_of(B)) * finite_real(scale, "scale")
    return vjp


def _lora_vjp_bias(ans, x, W, A, B, scale, bias=None, stride=1, padding=0, dilation=1, groups=1, dropout_mask=None):
    """L3: dL/dbias = K3(G)."""
    return lambda g: _conv_dbias(namespace(g), g)


defvjp(lora_conv, _lora_vjp_x, _lora_vjp_W, _lora_vjp_A, _lora_vjp_B, _no_grad("lora_conv", "scale (a constant)"),
       _lora_vjp_bias, *[_no_grad("lora_conv", f"{w} (a setting)") for w in ("stride", "padding", "dilation", "groups")],
       _no_grad("lora_conv", "dropout_mask (a constant)"))


# ============================================================================================
# Initialisation (PEFT: A as PyTorch's default conv init, B zero)
# ============================================================================================


def init_lora_conv(in_channels: int, out_channels: int, kernel_size: tuple[int, ...], r: int, *, groups: int = 1,
                   init: str = "kaiming", rng: np.random.Generator, dtype: Any = "float64") -> tuple[Any, Any]:
    """Draw ``(A, B)`` for a convolution: A ``(r, C_in, *kernel_size)``, B ``(C_out, r/groups, 1, ...)``.

    ``kernel_size`` is a tuple, one entry per spatial axis ((k,) for 1-D, (kh, kw) for 2-D).

    * ``"kaiming"`` (PEFT's ``init_lora_weights=True``): A ~ U(+-1/sqrt(C_in K)) -- PyTorch's
      ``kaiming_uniform_(a=sqrt(5))`` with fan_in = C_in K (A has groups 1) -- and B = 0.
    * ``"gaussian"``: A ~ N(0, (1/r)^2), B = 0.
    * ``"random"`` (PEFT's ``init_lora_weights=False``: both at PyTorch's default conv init): A as
      kaiming, B ~ U(+-1/sqrt(r/groups)). A non-identity adapter, for tests.

    Raises ``ValueError`` when r is not divisible by groups (PEFT does too).
    """
    C_in, C_out = positive_int(in_channels, "in_channels"), positive_int(out_channels, "out_channels")
    r, G = positive_int(r, "r"), positive_int(groups, "groups")
    if not isinstance(kernel_size, tuple) or not 1 <= len(kernel_size) <= 3:
        raise TypeError(f"kernel_size must be a tuple of 1 to 3 ints (one per spatial axis), got {kernel_size!r}")
    kernel = tuple(positive_int(k, f"kernel_size[{j}]") for j, k in enumerate(kernel_size))
    if C_in % G or C_out % G or r % G:
        raise ValueError(f"groups={G} must divide in_channels={C_in}, out_channels={C_out} and r={r} "
                         "(PEFT limits conv LoRA to ranks divisible by groups)")
    if init not in CONV_INIT_SCHEMES:
        raise ValueError(f"init must be one of {', '.join(CONV_INIT_SCHEMES)}, got {init!r}")
    numpy_generator(rng, "rng")
    np_dtype = float_dtype(dtype)
    A_shape, B_shape = (r, C_in) + kernel, (C_out, r // G) + (1,) * len(kernel)
    bound_A, bound_B = 1.0 / math.sqrt(C_in * math.prod(kernel)), 1.0 / math.sqrt(r // G)   # 1/sqrt(fan_in)
    A = rng.normal(0.0, 1.0 / r, size=A_shape) if init == "gaussian" else rng.uniform(-bound_A, bound_A, size=A_shape)
    B = rng.uniform(-bound_B, bound_B, size=B_shape) if init == "random" else np.zeros(B_shape)
    return asarray(A.astype(np_dtype)), asarray(B.astype(np_dtype))


# ============================================================================================
# (C3) Merging, and (C4) loralib's parametrisation
# ============================================================================================


def conv_delta_weight(A: Any, B: Any, scale: float) -> Any:
    """(C3) ``dW[o, i, ...] = s sum_r B[o, r] A[r, i, ...]``, shape (C_out, C_in, *k).

    A is (r, C_in, *k), B (C_out, r, 1, ...). An adapter on a grouped convolution (B with r/groups
    columns) has no merged weight: ``ValueError`` (PEFT raises NotImplementedError when merging).
    """
    float_array(A, "A")
    float_array(B, "B")
    same_dtype(("A", A), ("B", B))
    scale = finite_real(scale, "scale")
    if A.ndim not in (3, 4, 5) or B.ndim != A.ndim or any(int(k) != 1 for k in B.shape[2:]):
        raise ValueError(f"A must be (r, C_in, *k) and B (C_out, r, 1, ...) with as many axes, "
                         f"got A {shape_of(A)}, B {shape_of(B)}")
    r = int(A.shape[0])
    if B.shape[1] != r:
        if B.shape[1] and r % int(B.shape[1]) == 0:
            raise ValueError(f"B has {B.shape[1]} columns for A's rank {r}: an adapter on a grouped convolution "
                             f"(groups = {r // int(B.shape[1])}). Its A reads all C_in input channels, which a "
                             "grouped weight cannot hold, so it has no merged weight (PEFT refuses to merge it too)")
        raise ValueError(f"A has rank {r} (shape {shape_of(A)}) but B has {B.shape[1]} columns (shape {shape_of(B)})")
    xp = namespace(A, B)
    B2 = xp.reshape(B, (B.shape[0], r))                             # (C_out, r)
    A2 = xp.reshape(A, (r, math.prod(shape_of(A)[1:])))             # (r, C_in K)
    return xp.reshape((B2 @ A2) * scale, (B.shape[0],) + shape_of(A)[1:])   # (C_out, C_in, *k)


def _delta_for(W: Any, A: Any, B: Any, scale: float) -> Any:
    float_array(W, "W")
    same_dtype(("W", W), ("A", A), ("B", B))
    delta = conv_delta_weight(A, B, scale)
    if shape_of(delta) != shape_of(W):
        raise ValueError(f"s B A has shape {shape_of(delta)} but W has shape {shape_of(W)} (A {shape_of(A)}, "
                         f"B {shape_of(B)}); a grouped W cannot take an adapter whose A reads all C_in channels")
    return delta


def merge_conv(W: Any, A: Any, B: Any, scale: float) -> Any:
    """``W + dW`` (C3): the merged kernel, so that ``conv_nd(x, W')`` equals :func:`lora_conv`.

    Returns a new array. Refuses (``ValueError``) a grouped convolution's adapter and a merge that
    would produce non-finite values (PEFT's ``safe_merge``).
    """
    delta = _delta_for(W, A, B, scale)
    return finite_merge(W + delta, delta, "merge_conv", "weight", "dW")


def unmerge_conv(W_merged: Any, A: Any, B: Any, scale: float) -> Any:
    """``W_merged - dW``: the base kernel back, up to a few roundings of ``|W| + |dW|``."""
    return W_merged - _delta_for(W_merged, A, B, scale)


def loralib_conv_delta(A: Any, B: Any, scale: float, kernel: int, *, groups: int = 1) -> Any:
    """(C4) loralib's ConvLoRA delta: ``s reshape(B A)`` to (C_out, C_in/groups, kernel, kernel).

    A is (r kernel, C_in kernel), B is (C_out/groups kernel, r kernel), as ``loralib.Conv2d``
    stores them (square kernel, 2-D). The (C_out/groups kernel, C_in kernel) product is reshaped
    row-major into the weight's shape, as loralib's ``.view(self.conv.weight.shape)``. Its rank as a
    (C_out, C_in kernel^2) matrix can reach min(C_out, r kernel^2, C_in kernel^2), where PEFT's
    (:func:`conv_delta_weight`) is at most r. loralib's 1-D and 3-D forms cannot be built (the
    product has C_out C_in k^2 / G entries; a 1-D weight has C_out C_in k / G), so this is 2-D only.
    """
    float_array(A, "A")
    float_array(B, "B")
    same_dtype(("A", A), ("B", B))
    scale = finite_real(scale, "scale")
    k, G = positive_int(kernel, "kernel"), positive_int(groups, "groups")
    if A.ndim != 2 or B.ndim != 2:
        raise ValueError(f"A must be 2-D (r k, C_in k) and B 2-D (C_out/groups k, r k), got A {shape_of(A)}, B {shape_of(B)}")
    if A.shape[0] % k or A.shape[1] % k or B.shape[0] % k or B.shape[1] != A.shape[0]:
        raise ValueError(f"with kernel={k}, A must be (r {k}, C_in {k}) and B (C_out/groups {k}, r {k}); "
                         f"got A {shape_of(A)}, B {shape_of(B)}")
    C_in, C_out = int(A.shape[1]) // k, G * (int(B.shape[0]) // k)
    if C_in % G:
        raise ValueError(f"groups={G} must divide C_in={C_in} (A's {A.shape[1]} columns / kernel {k})")
    xp = namespace(A, B)
    return xp.reshape((B @ A) * scale, (C_out, C_in // G, k, k))    # (C_out, C_in/G, k, k)


# ============================================================================================
# Validation
# ============================================================================================


def _check_bias(bias: Any, W: Any, signature: str) -> None:
    if bias is None:
        return
    if isinstance(bias, int) or (isinstance(bias, tuple | list) and bias and all(isinstance(v, int) for v in bias)):
        raise TypeError(f"bias must be an array of shape ({W.shape[0]},) or None, got {type(bias).__name__} {bias!r}: "
                        f"a setting passed where the bias goes? The order is {signature}; pass the settings by "
                        f"keyword, e.g. stride={bias!r}")
    float_array(bias, "bias")
    if shape_of(bias) != (int(W.shape[0]),):
        raise ValueError(f"bias must have shape ({W.shape[0]},) to match W {shape_of(W)}, got {shape_of(bias)}")


def _validate(x, W, A, B, scale, bias, stride, padding, dilation, groups, mask):
    """Check lora_conv's arguments; return the three geometries and ``scale`` as a Python float
    (NumPy 2 promotes ``float32_array * np.float64(s)`` to float64)."""
    geo = _geometry(x, W, stride, padding, dilation, groups)
    _check_bias(bias, W, LORA_CONV_ORDER)
    float_array(A, "A")
    float_array(B, "B")
    scale = finite_real(scale, "scale")
    same_dtype(("x", x), ("W", W), ("A", A), ("B", B), ("bias", bias), ("dropout_mask", mask))
    n, G = len(geo.out), geo.groups
    if A.ndim != x.ndim or shape_of(A)[1:] != (int(x.shape[1]),) + geo.kernel:
        raise ValueError(f"A must be (r, C_in, *kernel) = (r, {x.shape[1]}, {', '.join(map(str, geo.kernel))}) "
                         f"(PEFT's lora_A: the base's kernel, groups 1), got A {shape_of(A)}")
    r = int(A.shape[0])
    if r % G:
        raise ValueError(f"A's rank r={r} must be divisible by groups={G} (PEFT's rule for conv LoRA)")
    want_B = (int(W.shape[0]), r // G) + (1,) * n
    if shape_of(B) != want_B:
        raise ValueError(f"B must be (C_out, r/groups, 1, ...) = {want_B} (PEFT's lora_B: a 1x1 convolution "
                         f"with the base's groups), got B {shape_of(B)}")
    if mask is not None:
        float_array(mask, "dropout_mask")
        broadcastable_mask(mask, x)
    return (*_geos(x, W, A, B, stride, padding, dilation, groups)[:3], scale)
