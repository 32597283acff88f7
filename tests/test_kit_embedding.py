"""check_lora_embedding: lora-ref's own embedding LoRA and an independent one pass; the counts follow
their derivation; the two wrong embeddings of issue 14 are in tests/test_kit_mutants.py."""

from __future__ import annotations

import numpy as np
from autograd import make_vjp
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_ref import lora_scale
from lora_ref.embedding import lora_embedding, merge_embedding
from lora_ref.kit.embedding import embedding_rounding_counts
from lora_ref.kit.mutants import CORRECT, run_correct
from lora_ref.testing import EMBEDDING_PROPERTIES, check_lora_embedding


def impl(ids, E, A, B, *, alpha, r, use_rslora, lora_dropout):
    return lora_embedding(ids, E, A, B, lora_scale(alpha, r, use_rslora))


def merge(E, A, B, *, alpha, r, use_rslora):
    return merge_embedding(E, A, B, lora_scale(alpha, r, use_rslora))


def grad(ids, E, A, B, dy, *, alpha, r, use_rslora):
    s = lora_scale(alpha, r, use_rslora)
    return make_vjp(lambda AA, BB: lora_embedding(ids, E, AA, BB, s), argnum=(0, 1))(A, B)[0](dy)


def test_lora_ref_and_an_independent_implementation_pass():
    report = check_lora_embedding(impl, merge=merge, grad=grad)
    assert report.ok and [r.name for r in report][::2] == list(EMBEDDING_PROPERTIES), str(report)
    assert run_correct("lora_embedding").ok


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_any_seed(seed):
    assert check_lora_embedding(**CORRECT["lora_embedding"](), seed=seed).ok


def test_repeated_ids_must_add_in_the_gradient():
    # A scatter that keeps only one occurrence of a repeated id (NumPy's buffered A[:, ids] += ...)
    def buffered(ids, E, A, B, dy, *, alpha, r, use_rslora):
        s = lora_scale(alpha, r, use_rslora)
        dA = np.zeros_like(A)
        dA[:, ids.reshape(-1)] += (s * dy.reshape(-1, dy.shape[-1]) @ B).T       # buffered: repeats overwrite
        return dA, s * dy.reshape(-1, dy.shape[-1]).T @ A.T[ids.reshape(-1)]
    report = check_lora_embedding(impl, grad=buffered, properties=["grad_A", "grad_B"])
    assert report.failed_names == ("grad_A",), str(report)


def test_rounding_counts():
    assert embedding_rounding_counts(3, 5, 8) == {"y": 8, "E_merged": 8, "dA": 18, "dB": 18}
