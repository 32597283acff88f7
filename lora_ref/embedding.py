"""LoRA on an embedding table, the math: clean, minimal, reference.

Hu et al. 2021 (arXiv 2106.09685) write Eq. 3 for a weight applied to a vector. An embedding lookup
is such a weight applied to a one-hot vector: with the table E (V, D) and ``e_v`` the v-th unit
vector of length V, ``E[v] = E^T e_v``, so the frozen weight is ``W0 = E^T`` (D, V) and Eq. 3,
    h = W0 x + s B A x,      x = e_v,
becomes, row by row of a batch of token ids,

    y = E[ids] + s (A^T[ids]) B^T                         (E1)

``A^T[ids]`` is a lookup too: A's column v is token v's r coordinates. The update is
``dW = s B A`` (D, V), i.e. ``s (B A)^T`` (V, D) in the table's layout; merging gives
``E' = E + s (B A)^T`` and ``E'[ids]`` equals (E1) up to rounding.

Layout (PEFT's ``lora_embedding_A`` / ``lora_embedding_B``; loralib's ``Embedding`` is the same)::

    E    (V, D)      frozen table: V = num_embeddings, D = embedding_dim
    A    (r, V)      initialised ZERO          (roles swapped against the linear layer:
    B    (D, r)      initialised N(0, 1)        there A is random and B zero)
    ids  (...)       integer ids in [0, V); N = their count
    s                scale: alpha / r, or alpha / sqrt(r) with rsLoRA (lora_ref.lora.lora_scale)

Facts read in peft 0.21.2 (tuners/lora/layer.py, ``Embedding.update_layer`` and
``reset_lora_parameters``) and loralib 0.1.2 (``layers.Embedding``): A is ``zeros_``, B is
``normal_`` (mean 0, std 1), the update still starts at ``B A = 0``. **No dropout on this path**:
PEFT builds ``lora_dropout`` for an embedding but its forward never calls it; loralib passes
``lora_dropout=0``. So :func:`lora_embedding` takes no dropout mask.

``padding_idx`` (PyTorch's ``nn.Embedding(padding_idx=p)``; transformers' LLaMA passes
``pad_token_id``): the lookup is unchanged, but row p of the table gets no gradient. PEFT passes
the base layer's padding_idx to the A lookup as well, so A's column p never trains. That is a rule
about gradients, not part of the function; :func:`lora_embedding` applies it in G1 and G2 when
asked.

Tied output head (GPT-2's ``lm_head`` is ``wte``): this function adapts the input lookup only, as
PEFT's unmerged forward does; merging into a tied table would change the output head as well.
docs/embedding.md measures what PEFT does and states what lora-ref's hosts do.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from autograd.extend import defvjp, primitive

from .backend import asarray, float_dtype, namespace, scatter_add_rows
from .checks import (finite_merge, finite_real, float_array, index_array, int_in_range, numpy_generator,
                     positive_int, same_dtype, shape_of)

__all__ = [
    "embedding_delta",
    "init_lora_embedding",
    "lora_embedding",
    "merge_embedding",
    "unmerge_embedding",
]


# ============================================================================================
# Initialisation (PEFT and loralib: A zero, B standard normal)
# ============================================================================================


def init_lora_embedding(num_embeddings: int, embedding_dim: int, r: int, *, rng: np.random.Generator,
                        dtype: Any = "float64") -> tuple[Any, Any]:
    """Draw ``(A, B)`` for a ``(num_embeddings, embedding_dim)`` table, as PEFT and loralib do.

    A is ``(r, num_embeddings)``, all zeros; B is ``(embedding_dim, r)``, each entry N(0, 1)
    (``nn.init.normal_``). With A = 0 the adapted lookup starts identical to the base one, and the
    first gradient step moves A only (G3 below is ``s G^T (A^T[ids]) = 0`` while A = 0). Randomness
    comes only from ``rng``; arrays are created on the current backend in ``dtype``
    (float32 or float64).
    """
    V = positive_int(num_embeddings, "num_embeddings")
    D = positive_int(embedding_dim, "embedding_dim")
    r = positive_int(r, "r")
    numpy_generator(rng, "rng")
    np_dtype = float_dtype(dtype)
    A = np.zeros((r, V), dtype=np_dtype)                           # (r, V)
    B = rng.standard_normal(size=(D, r)).astype(np_dtype)          # (D, r)
    return asarray(A), asarray(B)


# ============================================================================================
# The forward pass (E1), an autograd primitive
# ============================================================================================


def _lora_embedding(ids: Any, E: Any, A: Any, B: Any, scale: float, padding_idx: int | None = None) -> Any:
    """The undecorated forward (see :func:`lora_embedding`); autograd.numpy can trace it.

    ``padding_idx`` does not change the value (it is validated here and applied by the VJPs), so
    a trace of this function gives the true derivative, padding row included.
    """
    scale = _validate(ids, E, A, B, scale, padding_idx)   # a Python float: np.float64(s) would promote float32
    xp = namespace(ids, E, A, B)
    D = E.shape[1]
    flat = xp.reshape(ids, (-1,))                                  # (N,)
    base = xp.take(E, flat, axis=0)                                # (N, D)   E[ids]
    H = xp.take(xp.matrix_transpose(A), flat, axis=0)              # (N, r)   A^T[ids]
    y = base + (H @ xp.matrix_transpose(B)) * scale                # (N, D)   (E1)
    return xp.reshape(y, shape_of(ids) + (D,))                     # (..., D)


lora_embedding = primitive(_lora_embedding)
lora_embedding.__doc__ = """LoRA's adapted embedding lookup (E1): ``y = E[ids] + s (A^T[ids]) B^T``.

    Parameters
    ----------
    ids : integer array (...)        token ids, each in [0, V); checked (CuPy would wrap them)
    E : array (V, D)                 frozen table (differentiated only if traced)
    A : array (r, V)                 PEFT's ``lora_embedding_A`` (no ``.weight`` suffix)
    B : array (D, r)                 PEFT's ``lora_embedding_B``
    scale : float                    s; a Python number
    padding_idx : int, optional      PyTorch's padding_idx: row ``padding_idx`` of E and column
                                     ``padding_idx`` of A get zero gradient (the value is unchanged)

    Returns
    -------
    y : array (..., D), the dtype of E, A and B (one floating dtype).

    No dropout: PEFT and loralib apply none on this path. An autograd primitive with the
    hand-written VJPs G1-G3 below; ids, scale and padding_idx are constants.
    """


# ============================================================================================
# The gradients, written out (each VJP below names its line)
# ============================================================================================
#
# (E1) y = E[ids] + s H B^T with H = A^T[ids] (N, r). With G = dL/dy flattened to (N, D), and
# scatter(ids, Z) the (V, .) array whose row v is the sum of the rows i of Z with ids[i] == v
# (the transpose of a lookup; every id adds, a repeated id adds more than once):
#
#   G1  dL/dE = scatter(ids, G)                 (V, D)   only if E is trained (full fine-tuning)
#   G2  dL/dA = scatter(ids, s G B)^T           (r, V)   y_i = s A[:, ids_i]^T B^T, so column v
#                                                        of A collects s (G_i B) over ids_i = v
#   G3  dL/dB = s G^T H                         (D, r)   the linear layer's G5 with X = onehot(ids)
#
# padding_idx p zeroes row p of G1 and column p of G2 (torch.nn.functional.embedding's rule, which
# PEFT's A lookup inherits). At init A = 0, so H = 0 and G3 = 0 exactly: only A moves on the first
# step (the linear layer is the other way round).
#
# The Array API has no scatter-add, so `scatter` is lora_ref.backend.scatter_add_rows: one path per
# backend (NumPy `np.add.at`, CuPy `cupyx.scatter_add`, else the one-hot product onehot(ids)^T Z),
# the same helper transformer_ref.layers' embedding VJP uses.


def _without_row(t: Any, row: int | None) -> Any:
    """``t`` with row ``row`` multiplied by zero (padding_idx): (V, C) -> (V, C); exact elsewhere."""
    if row is None:
        return t
    xp = namespace(t)
    keep = xp.astype(xp.arange(t.shape[0]) != row, t.dtype)       # (V,)
    return t * keep[:, None]


def _vjp_E(ans, ids, E, A, B, scale, padding_idx=None):
    """G1: dL/dE = scatter(ids, G)."""
    def vjp(g):
        xp = namespace(g)
        G = xp.reshape(g, (-1, E.shape[1]))                         # (N, D)
        return _without_row(scatter_add_rows(xp.reshape(ids, (-1,)), G, E.shape[0]), padding_idx)
    return vjp


def _vjp_A(ans, ids, E, A, B, scale, padding_idx=None):
    """G2: dL/dA = scatter(ids, s G B)^T."""
    def vjp(g):
        xp = namespace(g)
        G = xp.reshape(g, (-1, E.shape[1]))                         # (N, D)
        dH = (G @ B) * finite_real(scale, "scale")                 # (N, r)   dL/dH = s G B
        dAT = scatter_add_rows(xp.reshape(ids, (-1,)), dH, A.shape[1])  # (V, r)
        return xp.matrix_transpose(_without_row(dAT, padding_idx))   # (r, V)
    return vjp


def _vjp_B(ans, ids, E, A, B, scale, padding_idx=None):
    """G3: dL/dB = s G^T H, H = A^T[ids]."""
    def vjp(g):
        xp = namespace(g)
        G = xp.reshape(g, (-1, E.shape[1]))                         # (N, D)
        H = xp.take(xp.matrix_transpose(A), xp.reshape(ids, (-1,)), axis=0)  # (N, r)
        return (xp.matrix_transpose(G) @ H) * finite_real(scale, "scale")   # (D, r)
    return vjp


def _no_grad(what: str):
    def maker(*args, **kwargs):
        raise TypeError(f"lora_embedding is not differentiable with respect to {what}")
    return maker


defvjp(lora_embedding, _no_grad("ids (integers)"), _vjp_E, _vjp_A, _vjp_B, _no_grad("scale (a constant)"),
       _no_grad("padding_idx (an index)"))


# ============================================================================================
# Merging: the delta in the table's layout
# ============================================================================================


def embedding_delta(A: Any, B: Any, scale: float) -> Any:
    """``s (B A)^T``, shape (V, D): what merging adds to the table E (PEFT's ``get_delta_weight``).

    A is (r, V), B is (D, r). Computed as ``(A^T B^T) s``, the same products as ``(B A)^T``.
    """
    _check_pair(A, B)
    scale = finite_real(scale, "scale")
    xp = namespace(A, B)
    return (xp.matrix_transpose(A) @ xp.matrix_transpose(B)) * scale   # (V, D)


def merge_embedding(E: Any, A: Any, B: Any, scale: float) -> Any:
    """``E + s (B A)^T``: the merged table, so that ``E'[ids]`` equals :func:`lora_embedding`.

    Returns a new (V, D) array. Raises ``ValueError`` instead of returning non-finite values
    (PEFT's ``safe_merge``). Merging a table that is also a tied output head (GPT-2's
    ``lm_head``) changes that head too; this function only computes the table, the host decides
    (docs/embedding.md).
    """
    delta = _delta_for(E, A, B, scale)
    return finite_merge(E + delta, delta, "merge_embedding", "table", "s (B A)^T")


def unmerge_embedding(E_merged: Any, A: Any, B: Any, scale: float) -> Any:
    """``E_merged - s (B A)^T``: the base table back, up to a few roundings of ``|E| + |delta|``."""
    return E_merged - _delta_for(E_merged, A, B, scale)


def _delta_for(E: Any, A: Any, B: Any, scale: float) -> Any:
    float_array(E, "E")
    if E.ndim != 2:
        raise ValueError(f"E must be 2-D (num_embeddings, embedding_dim), got shape {shape_of(E)}")
    _check_pair(A, B)
    same_dtype(("E", E), ("A", A), ("B", B))
    V, D = shape_of(E)
    if A.shape[1] != V or B.shape[0] != D:
        raise ValueError(f"E is (num_embeddings, embedding_dim) = ({V}, {D}), so A must be (r, {V}) and "
                         f"B ({D}, r); got A {shape_of(A)}, B {shape_of(B)}")
    return embedding_delta(A, B, scale)


# ============================================================================================
# Validation
# ============================================================================================


def _check_pair(A: Any, B: Any) -> None:
    float_array(A, "A")
    float_array(B, "B")
    if A.ndim != 2 or B.ndim != 2:
        raise ValueError(f"A must be 2-D (r, num_embeddings) and B 2-D (embedding_dim, r); "
                         f"got A {shape_of(A)}, B {shape_of(B)}")
    same_dtype(("A", A), ("B", B))
    if A.shape[0] != B.shape[1]:
        raise ValueError(f"A has rank {A.shape[0]} (shape {shape_of(A)}) but B has rank {B.shape[1]} "
                         f"(shape {shape_of(B)})")


def _validate(ids: Any, E: Any, A: Any, B: Any, scale: Any, padding_idx: Any) -> float:
    """Check lora_embedding's arguments; return ``scale`` as a Python float."""
    float_array(E, "E")
    if E.ndim != 2:
        raise ValueError(f"E must be 2-D (num_embeddings, embedding_dim), got shape {shape_of(E)}")
    V, D = shape_of(E)
    index_array(ids, V, "ids", "num_embeddings, E's row count")
    _check_pair(A, B)
    same_dtype(("E", E), ("A", A), ("B", B))
    if A.shape[1] != V:
        raise ValueError(f"A must be (r, num_embeddings) = (r, {V}) to match E {shape_of(E)}, "
                         f"got A {shape_of(A)} (PEFT's lora_embedding_A is (r, num_embeddings))")
    if B.shape[0] != D:
        raise ValueError(f"B must be (embedding_dim, r) = ({D}, r) to match E {shape_of(E)}, "
                         f"got B {shape_of(B)} (PEFT's lora_embedding_B is (embedding_dim, r))")
    scale = finite_real(scale, "scale")
    if padding_idx is not None:
        int_in_range(padding_idx, "padding_idx", 0, V - 1,
                     "a row of E; PyTorch's negative padding_idx p is V + p here")
    return scale
