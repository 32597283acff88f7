"""Many adapters on one model: a lora_ref.AdapterSet in both families' forward (lora_ref.adapters'
(S0)-(S3) per module), mixed batches (``adapter_names=``) and merging a chosen set.

Exact properties are tested exactly: one active adapter is that adapter's model bit for bit, a
disabled set is the base model, each row of a mixed batch is that row alone with its adapter (the
0/1 selectors add exact zeros). Sums of several adapters are compared with the merged model
within ``2 gamma_n M`` (_gpt_helpers), n the chain of a model adapted at the largest rank plus
the adapters' count (each added term one more rounding).
"""

from __future__ import annotations

from dataclasses import replace

import autograd
import numpy as np
import pytest
from _gpt_helpers import HOST_LLAMA, TINY, assert_trees_close, family_model, tree_asarray

import transformer_ref as tr
from lora_ref import LoraConfig, asarray, to_numpy, use_backend
from lora_ref.adapters import BASE, AdapterSet
from lora_ref.testing import assert_within, tolerance
from transformer_ref import FAST, REFERENCE, traced
from transformer_ref.bounds import logit_magnitude, logit_rounding_chain

LLAMA = HOST_LLAMA
CONFIGS = {
    "gpt2": (TINY, [LoraConfig(r=2, alpha=3.0, target_modules=["c_attn", "wte"], embedding_modules=["wte"]),
                    LoraConfig(r=3, alpha=5.0, target_modules=["c_attn", "mlp.c_proj", "wpe"], use_rslora=True,
                               embedding_modules=["wpe"]),
                    LoraConfig(r=4, alpha=4.0, target_modules=["c_fc"], enable_lora=None, layers_to_transform=[1])]),
    "llama": (LLAMA, [LoraConfig(r=2, alpha=3.0, target_modules=["q_proj", "v_proj", "embed_tokens"],
                               embedding_modules=["embed_tokens"]),
                      LoraConfig(r=3, alpha=5.0, target_modules=["q_proj", "down_proj"], use_rslora=True),
                      LoraConfig(r=4, alpha=4.0, target_modules=["k_proj", "up_proj"], rank_pattern={"up_proj": 2})]),
}
NAMES = ("north", "south", "east")


def model(config, dtype="float64", seed=0):
    """_gpt_helpers.family_model (LLaMA's targets all scored), doubled to 4 rows."""
    params, tokens, targets = family_model(config, dtype, seed, ignore_target=False)
    tokens = np.concatenate([tokens, tokens[::-1]])                     # 4 rows, for mixed batches
    return params, tokens, np.concatenate([targets, targets[::-1]])


def adapter_set(family, dtype="float64", dora=False):
    config, lcs = CONFIGS[family]
    params, tokens, targets = model(config, dtype)
    if dora:
        tables = ("wte", "wpe", "embed_tokens")                         # DoRA on an embedding is refused
        lcs = [lcs[0], replace(lcs[1], use_dora=True, target_modules=[t for t in lcs[1].target_modules if t not in tables],
                               embedding_modules=()), lcs[2]]
    entries = {}
    for i, (name, lc) in enumerate(zip(NAMES, lcs)):
        ad = tr.add_adapters(params, config, replace(lc, init="random"), 10 + i)
        entries[name] = (lc, {k: {f: (v * 0.3).astype(dtype) if f != "m" else v for f, v in a.items()}
                              for k, a in ad.items()})
    return config, params, tokens, targets, AdapterSet(entries, list(entries))


def bound(params, config, dtype, n_terms=3):
    return 2 * tolerance(dtype, logit_rounding_chain(config, 4 + 6 + n_terms, T=6)) * logit_magnitude(params, config)


@pytest.mark.parametrize("family", CONFIGS)
def test_one_active_adapter_is_that_adapters_model_and_none_is_the_base(family):
    config, params, tokens, _, S = adapter_set(family)
    for name in S.names:
        alone = tr.forward(params, tokens, config, S.modules(name), S.config(name))
        assert np.array_equal(tr.forward(params, tokens, config, S.with_active([name])), alone), name
    assert np.array_equal(tr.forward(params, tokens, config, S.disabled()), tr.forward(params, tokens, config))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("family", CONFIGS)
def test_active_adapters_are_summed(family, dtype):
    """(S1): the set's forward equals the model with every active adapter merged (S3), in either
    order; merge_adapters of the set unties a tied head like a single embedding adapter's."""
    config, params, tokens, _, S = adapter_set(family, dtype)
    y = tr.forward(params, tokens, config, S)
    merged = tr.merge_adapters(params, S)
    run = tr.untie(config) if "lm_head.weight" in merged and "lm_head.weight" not in params else config
    b = bound(params, config, dtype)
    assert_within(tr.forward(merged, tokens, run), y, b, what=f"set vs its merge ({family}, {dtype})")
    assert_within(tr.forward(params, tokens, config, S.with_active(S.names[::-1])), y, b, what="reversed order")
    for leave_out in S.names:                                           # each adapter matters by more than the bound
        rest = [n for n in S.names if n != leave_out]
        assert np.abs(tr.forward(params, tokens, config, S.with_active(rest)) - y).max() > np.max(b)
    two = tr.merge_adapters(params, S, names=["south", "east"])          # a chosen set
    assert all(two[k] is params[k] for k in params if not any(k.removesuffix(".weight") in S.modules(n)
                                                               for n in ("south", "east")))
    assert_within(tr.forward(two, tokens, config), tr.forward(params, tokens, config, S.with_active(["south", "east"])),
                  b, what="merging a chosen set")


@pytest.mark.parametrize("ops_name", ["REFERENCE", "FAST"])
@pytest.mark.parametrize("family", CONFIGS)
def test_mixed_batch_rows_equal_each_row_alone(family, ops_name):
    ops = {"REFERENCE": REFERENCE, "FAST": FAST}[ops_name]
    config, params, tokens, _, S = adapter_set(family)
    names = ["south", BASE, "north", "south"]
    y = tr.forward(params, tokens, config, S, ops=ops, adapter_names=names)
    for i, name in enumerate(names):
        alone = tr.forward(params, tokens[i:i + 1], config, S.with_active([] if name == BASE else [name]), ops=ops)
        if ops is REFERENCE:                 # PEFT's sub-batch arithmetic: row i is exactly row i alone
            assert np.array_equal(y[i:i + 1], alone), (i, name)
        else:                                # FAST folds s B A into W for a whole batch, not for a single row
            assert_within(y[i:i + 1], alone, bound(params, config, "float64"), what=f"FAST row {i}")
    assert np.array_equal(tr.forward(params, tokens, config, S.disabled(), ops=ops, adapter_names=names), y)  # active ignored
    assert np.array_equal(tr.forward(params, tokens, config, S, ops=ops, adapter_names=[BASE] * 4),
                          tr.forward(params, tokens, config, ops=ops))


@pytest.mark.parametrize("family", CONFIGS)
def test_gradients_through_a_set(family):
    """A set is for inference (train refuses it), but it is differentiable all the same: the
    hand-written VJPs (lora_delta's, lora_linear's, lora_embedding's) == autograd.numpy's."""
    config, params, tokens, targets, S = adapter_set(family)
    arrays = {n: {m: dict(a) for m, a in S.modules(n).items()} for n in S.names}

    def objective(arr, ops=REFERENCE, names=None):
        built = AdapterSet({n: (S.config(n), arr[n]) for n in S.names}, S.active)
        return tr.loss(params, tokens, targets, config, built, ops=ops, adapter_names=names)

    for names in (None, ["east", "north", BASE, "south"]):
        hand = autograd.grad(lambda a: objective(a, names=names))(arrays)
        second = autograd.grad(lambda a: objective(a, traced(REFERENCE), names))(arrays)
        n = 2 * logit_rounding_chain(config, 4 + 3 + 3, T=6, loss_batch=24)
        assert_trees_close(hand, second, "float64", n, what=f"dL/dset ({family}, adapter_names={names})")


@pytest.mark.parametrize("family", CONFIGS)
def test_dora_in_a_set(family):
    """A DoRA adapter active alone is its own model; with others, it adds its change of the base
    layer's output (docs/dora.md's order-free meaning); a mixed batch refuses it, as PEFT does."""
    config, params, tokens, _, S = adapter_set(family, dora=True)
    assert S.uses_dora() == ("south",)
    assert np.array_equal(tr.forward(params, tokens, config, S.with_active(["south"])),
                          tr.forward(params, tokens, config, S.modules("south"), S.config("south")))
    y = tr.forward(params, tokens, config, S)
    merged = tr.merge_adapters(params, S)
    run = tr.untie(config) if "lm_head.weight" in merged and "lm_head.weight" not in params else config
    assert_within(tr.forward(merged, tokens, run), y, bound(params, config, "float64"), what=f"DoRA set ({family})")
    with pytest.raises(ValueError, match=r"a mixed batch cannot use DoRA adapters \('south'\): PEFT refuses it"):
        tr.forward(params, tokens, config, S, adapter_names=["south", BASE, BASE, BASE])
    tr.forward(params, tokens, config, S, adapter_names=["north", BASE, "east", BASE])   # no DoRA row: fine


def test_from_peft_and_bad_sets():
    config, params, tokens, _, S = adapter_set("gpt2")
    mapping = {("default" if n == "north" else n): S[n] for n in S.names}
    peft_like = AdapterSet.from_peft(mapping)
    assert peft_like.active == ("default",) and peft_like.names == ("default", "south", "east")
    assert AdapterSet.from_peft(mapping, active=["east"]).active == ("east",)
    with pytest.raises(ValueError, match="activates PEFT's 'default' adapter, which is not among"):
        AdapterSet.from_peft({n: S[n] for n in S.names})
    lc, ad = S["north"]
    with pytest.raises(ValueError, match=r"'__base__' \(reserved for 'no adapter'\)"):
        AdapterSet({BASE: (lc, ad)}, [])
    with pytest.raises(TypeError, match=r"adapters\['x'\]\[0\] must be a lora_ref.LoraConfig"):
        AdapterSet({"x": ({"r": 2}, ad)}, [])
    with pytest.raises(ValueError, match=r"must hold exactly 'A' and 'B' \(its config has no use_dora\)"):
        AdapterSet({"x": (lc, {k: {**a, "m": a["A"][0]} for k, a in ad.items()})}, [])
    with pytest.raises(ValueError, match=r"active\[0\] = 'west' is not an adapter here"):
        S.with_active(["west"])
    with pytest.raises(ValueError, match="active names an adapter twice"):
        S.with_active(["east", "east"])
    with pytest.raises(ValueError, match="lora_config must be None when adapters is an AdapterSet"):
        tr.forward(params, tokens, config, S, lc)
    with pytest.raises(ValueError, match="adapter 'north': adapters has 'transformer.h.9.attn.c_attn'"):
        tr.forward(params, tokens, config, AdapterSet({"north": (lc, {"transformer.h.9.attn.c_attn":
                                                                     ad["transformer.h.0.attn.c_attn"]})}, []))
    with pytest.raises(ValueError, match=r"adapter_names has 3 names but the batch has 4 rows"):
        tr.forward(params, tokens, config, S, adapter_names=["north"] * 3)
    with pytest.raises(ValueError, match=r"adapter_names\[1\] = 'west' is not an adapter of the set"):
        tr.forward(params, tokens, config, S, adapter_names=["north", "west", BASE, BASE])
    with pytest.raises(TypeError, match="adapter_names names adapters of a lora_ref.AdapterSet"):
        tr.forward(params, tokens, config, ad, lc, adapter_names=["north"] * 4)
    with pytest.raises(ValueError, match="dropout masks cannot be given with an AdapterSet"):
        tr.forward(params, tokens, config, S, dropout={})
    with pytest.raises(TypeError, match="names= chooses adapters of a lora_ref.AdapterSet"):
        tr.merge_adapters(params, ad, lc, names=["north"])
    from transformer_ref.data import pretraining_task

    with pytest.raises(TypeError, match="an AdapterSet is for inference"):
        tr.train(params, config, pretraining_task(n_symbols=4, length=2, seed=0), lora_config=lc, adapters=S, steps=1)


def test_a_set_on_array_api_strict():
    pytest.importorskip("array_api_strict")
    config, params, tokens, _, S = adapter_set("gpt2", dora=True)
    ref = tr.forward(params, tokens, config, S)
    mixed = tr.forward(params, tokens, config, S.with_active(["north", "east"]), adapter_names=["east", BASE, "north", BASE])
    with use_backend("array_api_strict"):
        strict = AdapterSet({n: (S.config(n), tree_asarray({m: dict(a) for m, a in S.modules(n).items()}))
                             for n in S.names}, S.active)
        p, x = tree_asarray(params), asarray(tokens)
        got, got_mixed = tr.forward(p, x, config, strict), tr.forward(p, x, config, strict, adapter_names=[
            "east", BASE, "north", BASE])
        assert type(got).__module__.split(".")[0] == "array_api_strict"
    b = bound(params, config, "float64")
    assert_within(to_numpy(got), ref, b, what="array_api_strict set")
    assert_within(to_numpy(got_mixed), mixed, b, what="array_api_strict mixed batch")
