"""DoRA in the model families (transformer_ref.hosting / adapting): an adapter holding a magnitude
``m`` is computed by ``ops.dora_linear`` (lora_ref.dora's Eq. 5) wherever it sits, in GPT-2 and
LLaMA; ``add_adapters`` initialises ``m = ||W + s B A||_row``; ``merge_adapters`` folds Eq. 5's
weight in; ``train`` trains A, B and m.

Bounds as in _gpt_helpers (``2 gamma_n M``, n the longest chain of roundings). A DoRA projection
takes ``lora_ref.dora.dora_rounding_counts(...)["y"] = d_in + r + 12`` roundings where a LoRA one
takes ``d_in + r + 6`` (``lora_ref.kit.linear.rounding_counts``): ``bounds.logit_rounding_chain(...,
dora=True)`` counts every projection DoRA-adapted, the chain of a LoRA model of rank ``r + 6``.
"""

from __future__ import annotations

from dataclasses import replace

import autograd
import numpy as np
import pytest
from _gpt_helpers import HOST_LLAMA, TINY, assert_trees_close, chain_length, family_model, logit_magnitude
from autograd.test_util import check_grads

import transformer_ref as tr
from lora_ref import LoraConfig, dropout_mask
from lora_ref.dora import dora_linear, dora_magnitude, dora_rounding_counts
from lora_ref.testing import assert_within, tolerance
from transformer_ref import FAST, REFERENCE, traced
from transformer_ref.bounds import logit_rounding_chain

LLAMA = HOST_LLAMA
CASES = {
    "gpt2 c_attn, c_proj": (TINY, LoraConfig(r=2, alpha=4.0, target_modules=["c_attn", "c_proj"], use_dora=True)),
    "gpt2 all, rsLoRA, patterns": (TINY, LoraConfig(r=2, alpha=3.0, target_modules=["c_attn", "c_proj", "c_fc"],
                                                    use_rslora=True, use_dora=True, rank_pattern={"c_fc": 3},
                                                    alpha_pattern={r"h\.1\.attn\.c_attn": 5.0})),
    "llama q, v, down": (LLAMA, LoraConfig(r=2, alpha=4.0, target_modules=["q_proj", "v_proj", "down_proj"],
                                           use_dora=True)),
}


def trained(params, config, lc, seed=1):
    """DoRA adapters as after some training: A, B random, m = its init times 1 + 0.2 N(0, 1)."""
    rng = np.random.default_rng(seed)
    ad = tr.add_adapters(params, config, replace(lc, init="random"), rng)
    return {k: {**a, "m": a["m"] * (1.0 + 0.2 * rng.standard_normal(a["m"].shape)).astype(a["m"].dtype)}
            for k, a in ad.items()}


def rank(lc, adapters):
    return max(a["B"].shape[1] for a in adapters.values())


def bound(params, config, dtype, r, T=6):
    return 2 * tolerance(dtype, logit_rounding_chain(config, r, T=T, dora=True)) * logit_magnitude(params, config)


@pytest.mark.parametrize("case", CASES)
def test_add_adapters_initialises_the_magnitude(case):
    config, lc = CASES[case]
    params, tokens, _ = family_model(config)
    for init in ("kaiming", "random"):
        ad = tr.add_adapters(params, config, replace(lc, init=init), 3)
        for name, a in ad.items():
            assert sorted(a) == ["A", "B", "m"]
            W, s = params[name + ".weight"], lc.scale_for(name)
            assert np.array_equal(a["m"], dora_magnitude(W, a["A"], a["B"], s)), name   # ||W + s B A||_row
            if init == "kaiming":                                  # B = 0: ||W||_row
                assert np.allclose(a["m"], np.linalg.norm(W, axis=1), rtol=2 * tolerance("float64", W.shape[1] + 3))
            else:                                                  # PEFT: includes s B A when both are random
                assert not np.allclose(a["m"], np.linalg.norm(W, axis=1))
    # B = 0 and m = ||W||: f = 1 exactly and V = W exactly, so the logits are the base model's bit for bit
    fresh = tr.add_adapters(params, config, lc, 3)
    assert np.array_equal(tr.forward(params, tokens, config, fresh, lc), tr.forward(params, tokens, config))


@pytest.mark.parametrize("case", CASES)
def test_a_dora_projection_is_dora_linear(case):
    """hosting.project computes Eq. 5 (lora_ref.dora.dora_linear) for every adapter holding m:
    checked by replacing the op set's dora_linear with a spy that records the modules it serves."""
    config, lc = CASES[case]
    params, tokens, _ = family_model(config)
    ad = trained(params, config, lc)
    seen = []

    def spy(x, W, A, B, m, s, *rest):
        seen.append(next(n for n, a in ad.items() if a["A"] is A))
        assert s == lc.scale_for(seen[-1]) and W is params[seen[-1] + ".weight"]
        return dora_linear(x, W, A, B, m, s, *rest)

    ops = replace(REFERENCE, dora_linear=spy)
    y = tr.forward(params, tokens, config, ad, lc, ops=ops)
    assert sorted(seen) == sorted(ad) and np.array_equal(y, tr.forward(params, tokens, config, ad, lc))


def frozen_norm_dora(norms):
    """DoRA's layer with ``||W + s B A||_row`` a constant, ``norms[id(W)]``: plain array code whose
    exact derivative is Section 4.3's detached gradient (PEFT's, dora_linear's hand-written VJPs)."""
    def layer(x, W, A, B, m, s, bias=None, mask=None, detach_norm=True):
        V = W + (B @ A) * s                                              # (d_out, d_in)
        xd = x if mask is None else x * mask
        y = (xd @ V.T) * (m / norms[id(W)])                              # Eq. 5, C frozen
        y = y if mask is None else y + (x - xd) @ W.T                    # PEFT's dropout: W0 on the dropped part
        return y if bias is None else y + bias
    return layer


@pytest.mark.parametrize("ops_name", ["REFERENCE", "FAST"])
@pytest.mark.parametrize("case", CASES)
def test_dora_gradients_three_ways(case, ops_name):
    """dL/dA, dL/dB, dL/dm: hand-written VJPs == autograd.numpy on the bare forwards (where
    dora_linear's detach_norm holds the norm constant) == finite differences of the model with the
    norm frozen at the evaluation point, with a dropout mask on one DoRA projection (PEFT's DoRA
    dropout semantics). The detached gradient is not the derivative of the model itself (Section
    4.3 drops the norm's term), so finite differences of the plain forward would not match it."""
    config, lc = CASES[case]
    ops = {"REFERENCE": REFERENCE, "FAST": FAST}[ops_name]
    params, tokens, targets = family_model(config)
    ad = trained(params, config, lc)
    first = next(iter(ad))
    masks = {first: dropout_mask((2, 6, params[first + ".weight"].shape[1]), 0.25, np.random.default_rng(2))}

    def objective(a, ops=ops):
        return tr.loss(params, tokens, targets, config, a, lc, masks, ops=ops)

    hand = autograd.grad(objective)(ad)
    assert all(sorted(g) == ["A", "B", "m"] and np.abs(g["m"]).max() > 0 for g in hand.values())  # m is trained
    second = autograd.grad(lambda a: objective(a, traced(ops)))(ad)
    n = 2 * logit_rounding_chain(config, rank(lc, ad), T=6, loss_batch=12, dora=True)
    assert_trees_close(hand, second, "float64", n, what=f"dL/dadapters ({case}, {ops_name})")
    norms = {id(params[k + ".weight"]): dora_magnitude(params[k + ".weight"], a["A"], a["B"], lc.scale_for(k))
             for k, a in ad.items()}
    frozen = replace(traced(ops), dora_linear=frozen_norm_dora(norms))
    assert float(objective(ad, frozen)) == float(objective(ad, traced(ops)))   # the same value at the point
    check_grads(lambda a: objective(a, frozen), modes=["rev"], order=1)(ad)
    assert_trees_close(autograd.grad(lambda a: objective(a, frozen))(ad), hand, "float64", n, what="frozen-norm grad")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", CASES)
def test_dora_merged_equals_unmerged(case, dtype):
    config, lc = CASES[case]
    params, tokens, _ = family_model(config, dtype)
    ad = trained(params, config, lc)
    unmerged = tr.forward(params, tokens, config, ad, lc)
    merged_params = tr.merge_adapters(params, ad, lc)
    merged = tr.forward(merged_params, tokens, config)
    assert merged.dtype == np.dtype(dtype)
    b = bound(params, config, dtype, rank(lc, ad))
    assert_within(merged, unmerged, b, what=f"DoRA merged vs unmerged ({case}, {dtype})")
    # a LoRA merge of the same factors (m ignored) is another model: the bound catches it
    plain = {k: {"A": a["A"], "B": a["B"]} for k, a in ad.items()}
    lora = tr.forward(tr.merge_adapters(params, plain, replace(lc, use_dora=False)), tokens, config)
    assert np.abs(lora - unmerged).max() > np.max(b)
    for name in ad:                                                 # each merged row has norm |m_i|
        norms = np.linalg.norm(merged_params[name + ".weight"].astype(np.float64), axis=1)
        assert_within(norms, np.abs(ad[name]["m"]), 2 * tolerance(dtype, dora_rounding_counts(
            params[name + ".weight"].shape[1], 1, rank(lc, ad), 1)["W_merged"] + 3) * np.abs(ad[name]["m"]), what=name)


def test_train_lora_mode_trains_a_b_and_m():
    from transformer_ref.data import downstream_task, pretraining_task

    pre = pretraining_task(n_symbols=6, length=3, seed=0)
    small = pre.gpt_config(n_embd=16, n_layer=1, n_head=2)
    params = tr.init_params(small, seed=0)
    lc = LoraConfig(r=2, alpha=4.0, target_modules=["c_attn"], use_dora=True, dropout=0.1)
    out = tr.train(params, small, downstream_task(pre, n_swaps=1, seed=1), mode="lora", lora_config=lc, steps=5,
                   batch_size=8, lr=1e-2, seed=0, threads=1)
    fresh = tr.add_adapters(params, small, lc, np.random.default_rng(0))      # train's first draws
    for name, a in out.adapters.items():
        assert sorted(a) == ["A", "B", "m"]
        assert not np.array_equal(a["m"], fresh[name]["m"]) and not np.array_equal(a["B"], fresh[name]["B"])
    assert np.isfinite(out.losses).all() and len(out.losses) == 5


def test_dora_adapters_are_checked():
    config, lc = CASES["gpt2 c_attn, c_proj"]
    params, tokens, _ = family_model(config)
    ad = trained(params, config, lc)
    name = next(iter(ad))
    with pytest.raises(ValueError, match=r"must be a dict with exactly 'A', 'B' and 'm' \(lora_config.use_dora"):
        tr.forward(params, tokens, config, {**ad, name: {"A": ad[name]["A"], "B": ad[name]["B"]}}, lc)
    with pytest.raises(ValueError, match=r"exactly 'A' and 'B' \(m is DoRA's magnitude: set use_dora"):
        tr.forward(params, tokens, config, ad, replace(lc, use_dora=False))
    with pytest.raises(ValueError, match=r"has A \(2, 8\) and B \(24, 2\) and m \(23,\).*so A must be \(2, 8\) and "
                                         r"B \(24, 2\) and m \(24,\)"):
        tr.forward(params, tokens, config, {**ad, name: {**ad[name], "m": ad[name]["m"][:-1]}}, lc)
    with pytest.raises(ValueError, match="use_dora=True cannot be combined with enable_lora"):
        LoraConfig(r=2, alpha=2.0, target_modules=["c_attn"], use_dora=True, enable_lora={"c_attn": (True, False, True)})
    with pytest.raises(ValueError, match=r"adapts 'transformer.wte', an embedding, with use_dora"):
        tr.forward(params, tokens, config, {"transformer.wte": {"A": np.zeros((2, 11)), "B": np.zeros((8, 2))}}, lc)


def test_chain_length_helper_is_the_lora_one():
    # the DoRA chains above are the LoRA chains of rank r + 6 (dora_rounding_counts' y is 6 longer
    # than rounding_counts'), and the helper the other tests use agrees
    assert dora_rounding_counts(8, 8, 3, 1)["y"] - (8 + 3 + 6) == 6
    for config in (TINY, LLAMA):
        for r in (2, 3):
            assert logit_rounding_chain(config, r, T=6, loss_batch=12, dora=True) == logit_rounding_chain(
                config, r + 6, T=6, loss_batch=12)
    assert chain_length(TINY, 3 + 6, T=6) == logit_rounding_chain(TINY, 3, T=6, loss_batch=12, dora=True)
