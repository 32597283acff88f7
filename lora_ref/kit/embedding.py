"""The kit for LoRA on an embedding table (PEFT's and loralib's layout, :mod:`lora_ref.embedding`).

``y = E[ids] + s (A^T[ids]) B^T`` with A (r, V), B (D, r): the roles of A and B are swapped
against the linear layer (the delta in the table's layout is ``s (B A)^T``), and no dropout is
applied on this path even when the adapter's config has ``lora_dropout > 0`` (PEFT builds the
dropout module and never calls it; loralib passes 0). Bounds: ``reference_rtol(dtype, n) * M``
with n from :func:`embedding_rounding_counts` and M the reference on absolute values.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
from autograd import make_vjp

from ..checks import positive_int
from ..embedding import lora_embedding, merge_embedding
from ..lora import lora_scale
from .core import Call, LoraCheckReport, Output, property_call, ref_output, run_check

__all__ = ["EMBEDDING_DEFAULT_PROPERTIES", "EMBEDDING_PROPERTIES", "check_lora_embedding", "draw_embedding_case",
           "embedding_calls", "embedding_reference", "embedding_rounding_counts"]


def embedding_rounding_counts(r: int, D: int, n_ids: int) -> dict[str, int]:
    """Roundings any one term of each output can suffer (tests/test_embedding.py's counts, plus 2
    for computing s from alpha and r: the square root of rsLoRA and the division).

    * ``y = E[ids] + s (A^T[ids]) B^T``: the r-term dot (r), s computed (2) and rounded to the dtype
      (1), times s (1), plus E[ids] (1): ``r + 5``. The merged lookup ``(E + s (B A)^T)[ids]`` too.
    * ``E_merged = E + s (B A)^T``: the same chain: ``r + 5``.
    * ``dA = scatter(ids, s G B)^T`` (D terms, then at most N ids adding into one column),
      ``dB = s G^T A^T[ids]`` (N terms): at most ``D + N + 5``.
    """
    r, D, n_ids = positive_int(r, "r"), positive_int(D, "D"), positive_int(n_ids, "n_ids")
    return {"y": r + 5, "E_merged": r + 5, "dA": D + n_ids + 5, "dB": D + n_ids + 5}


def embedding_reference(ids: Any, E: Any, A: Any, B: Any, scale: float, *, dy: Any = None) -> dict[str, np.ndarray]:
    """lora-ref's outputs in float64 from the stored inputs: ``"y"``, ``"E_merged"`` and, with ``dy``,
    ``"dA"``, ``"dB"`` (gradients of ``sum(y * dy)``); ``"magnitude.<name>"`` is the same
    computation on ``|E|, |A|, |B|, |s|, |dy|`` (every output is a sum of products)."""
    out: dict[str, np.ndarray] = {}
    for prefix, t in (("", lambda a: np.asarray(a, dtype=np.float64)),
                      ("magnitude.", lambda a: np.abs(np.asarray(a, dtype=np.float64)))):
        s = abs(scale) if prefix else scale
        e, a, b = t(E), t(A), t(B)
        out[prefix + "y"] = lora_embedding(ids, e, a, b, s)
        out[prefix + "E_merged"] = merge_embedding(e, a, b, s)
        if dy is not None:
            vjp, _ = make_vjp(lambda AA, BB: lora_embedding(ids, e, AA, BB, s), argnum=(0, 1))(a, b)
            out[prefix + "dA"], out[prefix + "dB"] = vjp(t(dy))
    return out


EMBEDDING_PROPERTIES: dict[str, str] = {
    "forward": "y = E[ids] + s (A^T[ids]) B^T, A (r, V), B (D, r), ids (2, 4) with repeated ids",
    "forward_rslora": "the same with use_rslora=True: scale alpha/sqrt(r), r = 4",
    "square": "V = D = 6: A and B used the linear layer's way (delta s B A, not s (B A)^T) is not a shape error",
    "no_dropout": "lora_dropout=0.5 in the config: still no dropout on the embedding path (PEFT, loralib)",
    "zero_A_identity": "A = 0 (PEFT's initialisation): y = E[ids]",
    "merge": "merge(E, A, B) = E + s (B A)^T, (V, D)",
    "merge_square": "merge with V = D = 6",
    "grad_A": "dL/dA = scatter(ids, s G B)^T for L = sum(y * dy): every occurrence of a repeated id adds",
    "grad_B": "dL/dB = s G^T A^T[ids]",
}
"""Every embedding property, with what it checks."""

EMBEDDING_DEFAULT_PROPERTIES = tuple(EMBEDDING_PROPERTIES)
_NEEDS = {"merge": "merge", "merge_square": "merge", "grad_A": "grad", "grad_B": "grad"}
# (V, D, r, alpha, use_rslora, ids shape, lora_dropout)
_SPECS = {"forward": (11, 5, 3, 6.0, False, (2, 4), 0.0), "forward_rslora": (11, 5, 4, 8.0, True, (2, 4), 0.0),
          "square": (6, 6, 2, 4.0, False, (2, 4), 0.0), "no_dropout": (11, 5, 3, 6.0, False, (2, 4), 0.5),
          "zero_A_identity": (11, 5, 3, 6.0, False, (2, 4), 0.0), "merge": (11, 5, 3, 6.0, False, (2, 4), 0.0),
          "merge_square": (6, 6, 2, 4.0, False, (2, 4), 0.0), "grad_A": (11, 5, 3, 6.0, False, (3, 4), 0.0),
          "grad_B": (11, 5, 3, 6.0, False, (3, 4), 0.0)}


def draw_embedding_case(V: int, D: int, r: int, ids_shape: tuple[int, ...], seed: Any) -> dict[str, np.ndarray]:
    """float64 ``E`` (V, D), ``A`` (r, V), ``B`` (D, r), ``dy`` (*ids_shape, D) standard normal, and int64
    ``ids`` with its last id repeating its first (so a scatter-add must add twice)."""
    rng = np.random.default_rng(seed)
    case = {"E": rng.standard_normal((V, D)), "A": rng.standard_normal((r, V)), "B": rng.standard_normal((D, r))}
    ids = rng.integers(0, V, size=ids_shape).astype(np.int64)
    ids.flat[-1] = ids.flat[0]
    case["ids"], case["dy"] = ids, rng.standard_normal(ids_shape + (D,))
    return case


def embedding_calls(case: dict[str, np.ndarray], settings: dict[str, Any], dtype: str, which: Sequence[str],
                    extra_roundings: int = 0) -> list[Call]:
    """The calls of the embedding contract on a case (float arrays cast to ``dtype``): ``"impl"``
    (y), ``"merge"`` (E_merged), ``"grad"`` ((dA, dB))."""
    ids = case["ids"]
    E, A, B, dy = (np.ascontiguousarray(case[k].astype(dtype)) for k in ("E", "A", "B", "dy"))
    alpha, r, rs = settings["alpha"], settings["r"], settings["use_rslora"]
    ref = embedding_reference(ids, E, A, B, lora_scale(alpha, r, rs), dy=dy if "grad" in which else None)
    counts = embedding_rounding_counts(r, E.shape[1], ids.size)
    options = {"alpha": alpha, "r": r, "use_rslora": rs}

    def out(name: str, pick: int | None = None) -> Output:
        return ref_output(ref, counts, name, dtype, extra_roundings, pick)

    calls = {"impl": Call("impl", (ids, E, A, B), ("ids", "E", "A", "B"),
                          dict(options, lora_dropout=settings.get("lora_dropout", 0.0)), (out("y"),)),
             "merge": Call("merge", (E, A, B), ("E", "A", "B"), options, (out("E_merged"),))}
    if "grad" in which:
        calls["grad"] = Call("grad", (ids, E, A, B, dy), ("ids", "E", "A", "B", "dy"), options,
                             (out("dA", 0), out("dB", 1)), ("dA", "dB"))
    return [calls[w] for w in which]


def _build(name: str, dtype: str, seed: int) -> Call:
    V, D, r, alpha, rs, shape, p = _SPECS[name]
    case = draw_embedding_case(V, D, r, shape, (seed, list(EMBEDDING_PROPERTIES).index(name)))
    if name == "zero_A_identity":
        case["A"] = np.zeros_like(case["A"])
    settings = {"alpha": alpha, "r": r, "use_rslora": rs, "lora_dropout": p}
    return property_call(name, lambda which: embedding_calls(case, settings, dtype, [which])[0])


def check_lora_embedding(impl: Callable, *, merge: Callable | None = None, grad: Callable | None = None,
                         properties: Iterable[str] | None = None, dtypes: Sequence[str] = ("float64", "float32"),
                         seed: int = 0) -> LoraCheckReport:
    """Run the embedding properties (:data:`EMBEDDING_PROPERTIES`) against your implementation.

    Parameters
    ----------
    impl : callable
        ``impl(ids, E, A, B, *, alpha, r, use_rslora, lora_dropout) -> y`` (*ids.shape, D):
        ``ids`` int64 in [0, V), ``E`` (V, D) the frozen table, ``A`` (r, V) and ``B`` (D, r)
        (PEFT's ``lora_embedding_A`` / ``lora_embedding_B``). ``lora_dropout`` is the adapter
        config's dropout probability; embedding LoRA applies none (PEFT, loralib), so y must not
        depend on it.
    merge : callable, optional
        ``merge(E, A, B, *, alpha, r, use_rslora) -> E_merged`` (V, D) = ``E + s (B A)^T``.
    grad : callable, optional
        ``grad(ids, E, A, B, dy, *, alpha, r, use_rslora) -> (dA, dB)``, the gradients of
        ``sum(y * dy)``.
    properties, dtypes, seed
        As in every check (:mod:`lora_ref.testing`); dtypes float64 and/or float32.
    """
    return run_check(impl=impl, callables={"merge": merge, "grad": grad}, properties=properties, dtypes=dtypes,
                     seed=seed, known=EMBEDDING_PROPERTIES, default=EMBEDDING_DEFAULT_PROPERTIES, needs=_NEEDS,
                     allowed=("float32", "float64"), build=_build)
