"""Embedding adapters in the model families: GPT-2's ``transformer.wte`` / ``.wpe`` and LLaMA's
``model.embed_tokens`` are targeted by the usual LoraConfig rules, looked up by
``ops.lora_embedding`` (lora_ref.embedding's (E1), no dropout, LLaMA's ``pad_token_id`` as
``padding_idx``), and merged into their table; a tied output head keeps the base table (the merge
unties it, ``transformer_ref.untie``). Untied GPT-2 (``lm_head.weight``) runs, saves and loads.

Bounds as in _gpt_helpers: an adapted lookup adds ``r + 3`` roundings before the first block, fewer
than one adapted projection adds, so the chain of a model counted with every projection adapted
at rank ``r + 3`` bounds it; for untied params the magnitude reads ``lm_head.weight``.
"""

from __future__ import annotations

import math
from dataclasses import replace

import autograd
import numpy as np
import pytest
from _gpt_helpers import HOST_LLAMA, TINY, assert_trees_close, family_model
from autograd.test_util import check_grads

import transformer_ref as tr
from lora_ref import LoraConfig, dropout_mask
from lora_ref.embedding import lora_embedding
from lora_ref.testing import assert_within, tolerance
from transformer_ref import FAST, REFERENCE, traced
from transformer_ref.bounds import logit_rounding_chain
from transformer_ref.checkpoints import CheckpointFormatError, load_hf_gpt2, save_hf_gpt2

LLAMA = replace(HOST_LLAMA, extra={"pad_token_id": 3})
CASES = {
    "gpt2 wte": (TINY, LoraConfig(r=2, alpha=4.0, target_modules=["wte"], embedding_modules=["wte"])),
    "gpt2 wte, wpe, c_attn, rsLoRA": (TINY, LoraConfig(r=2, alpha=3.0, target_modules=["wte", "wpe", "c_attn"],
                                                       embedding_modules=["wte", "wpe"], use_rslora=True,
                                                       rank_pattern={"wpe": 3})),
    "llama embed_tokens, q_proj (pad 3)": (LLAMA, LoraConfig(r=2, alpha=4.0, target_modules=["embed_tokens", "q_proj"],
                                                                        embedding_modules=["embed_tokens"])),
    "llama tied, embed_tokens": (replace(LLAMA, tie_word_embeddings=True),
                                 LoraConfig(r=3, alpha=4.0, target_modules=["embed_tokens"],
                                            embedding_modules=["embed_tokens"])),
}


def model(config, dtype="float64", seed=0):
    """_gpt_helpers.family_model, with LLaMA's pad id 3 among the tokens."""
    params, tokens, targets = family_model(config, dtype, seed)
    if config is not TINY:
        tokens[1, 2] = 3                                                 # the pad id appears
    return params, tokens, targets


def magnitude(params, config):
    """bounds.logit_magnitude, reading the head the params actually hold (lm_head.weight once untied)."""
    head = params.get("lm_head.weight", params.get("transformer.wte.weight", params.get("model.embed_tokens.weight")))
    norm = params.get("transformer.ln_f.weight", params.get("model.norm.weight"))
    bias = np.abs(params.get("transformer.ln_f.bias", np.zeros_like(norm)))
    C = head.shape[1]
    return float((np.abs(head.astype(np.float64)) @ (math.sqrt(C) * np.abs(norm) + bias)).max())


def bound(params, config, dtype, r):
    return 2 * tolerance(dtype, logit_rounding_chain(config, r + 3, T=6)) * magnitude(params, config)


def rank(adapters):
    return max(a["B"].shape[1] for a in adapters.values())


@pytest.mark.parametrize("case", CASES)
def test_targeting_shapes_and_init(case):
    config, lc = CASES[case]
    params, tokens, _ = model(config)
    ad = tr.add_adapters(params, config, lc, 0)
    tables = [n for n in ad if n in tr.hosting.family_of(config).embeddings]
    assert tables and list(ad)[:len(tables)] == tables                  # the tables first, in state-dict order
    for name in tables:
        V, D = params[name + ".weight"].shape
        r = lc.rank_for(name)
        assert ad[name]["A"].shape == (r, V) and ad[name]["B"].shape == (D, r)
        assert not ad[name]["A"].any() and ad[name]["B"].all()           # PEFT: A = 0, B ~ N(0, 1)
    # A = 0: the adapted lookup is the base one bit for bit, so the logits are the base model's
    assert np.array_equal(tr.forward(params, tokens, config, ad, lc), tr.forward(params, tokens, config))
    rand = tr.add_adapters(params, config, replace(lc, init="random"), 0)  # PEFT's init_lora_weights=False
    assert all(rand[n]["A"].all() and rand[n]["B"].all() for n in tables)
    wpe_only = LoraConfig(r=2, alpha=2.0, target_modules=["wpe"], embedding_modules=["wpe"], layers_to_transform=[0])
    if config is TINY:                                                   # an embedding has no layer index
        with pytest.raises(ValueError, match="selects no module"):
            tr.add_adapters(params, config, wpe_only, 0)


@pytest.mark.parametrize("case", CASES)
def test_the_lookup_is_lora_embedding(case):
    config, lc = CASES[case]
    params, tokens, _ = model(config)
    ad = tr.add_adapters(params, config, replace(lc, init="random"), 1)
    seen = {}

    def spy(ids, E, A, B, s, padding_idx=None):
        name = next(n for n, a in ad.items() if a["A"] is A)
        seen[name] = (s, padding_idx)
        return lora_embedding(ids, E, A, B, s, padding_idx)

    y = tr.forward(params, tokens, config, ad, lc, ops=replace(REFERENCE, lora_embedding=spy))
    assert np.array_equal(y, tr.forward(params, tokens, config, ad, lc))
    pad = 3 if config is not TINY else None
    assert seen == {n: (lc.scale_for(n), pad) for n in ad if n in tr.hosting.family_of(config).embeddings}


@pytest.mark.parametrize("ops_name", ["REFERENCE", "FAST"])
@pytest.mark.parametrize("case", CASES)
def test_embedding_gradients_three_ways(case, ops_name):
    config, lc = CASES[case]
    ops = {"REFERENCE": REFERENCE, "FAST": FAST}[ops_name]
    params, tokens, targets = model(config)
    ad = tr.add_adapters(params, config, replace(lc, init="random"), 1)

    def objective(a, ops=ops):
        return tr.loss(params, tokens, targets, config, a, lc, ops=ops)

    hand = autograd.grad(objective)(ad)
    second = autograd.grad(lambda a: objective(a, traced(ops)))(ad)
    n = 2 * logit_rounding_chain(config, rank(ad) + 3, T=6, loss_batch=12)
    if config is not TINY:                       # padding_idx = pad_token_id: A's column 3 never trains,
        assert np.all(hand["model.embed_tokens"]["A"][:, 3] == 0.0)      # though token 3 is in the batch
        no_pad = replace(config, extra={})
        free = autograd.grad(lambda a: tr.loss(params, tokens, targets, no_pad, a, lc, ops=ops))(ad)
        assert np.abs(free["model.embed_tokens"]["A"][:, 3]).max() > 0.0
        # the traced bare forward differentiates the lookup itself, padding row included: only the
        # hand-written VJP applies padding_idx, so the two are compared away from that column
        hand["model.embed_tokens"]["A"] = np.delete(hand["model.embed_tokens"]["A"], 3, axis=1)
        second["model.embed_tokens"]["A"] = np.delete(second["model.embed_tokens"]["A"], 3, axis=1)
    assert_trees_close(hand, second, "float64", n, what=f"dL/dadapters ({case}, {ops_name})")
    check_grads(lambda a: objective(a, traced(ops)), modes=["rev"], order=1)(ad)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", CASES)
def test_merge_unties_a_tied_head(case, dtype):
    config, lc = CASES[case]
    params, tokens, _ = model(config, dtype)
    ad = tr.add_adapters(params, config, replace(lc, init="random"), 1)
    ad = {k: {f: (v * 0.1).astype(dtype) for f, v in a.items()} for k, a in ad.items()}   # a trained-size update
    unmerged = tr.forward(params, tokens, config, ad, lc)
    merged = tr.merge_adapters(params, ad, lc)
    tied = "lm_head.weight" not in params
    table = "transformer.wte.weight" if config is TINY else "model.embed_tokens.weight"
    if table.removesuffix(".weight") in ad and tied:
        assert merged["lm_head.weight"] is params[table] and list(merged)[-1] == "lm_head.weight"
        with pytest.raises(ValueError, match=r"lm_head.weight is tied to .*run such params with transformer_ref.untie"):
            tr.forward(merged, tokens, config)
        config = tr.untie(config)
    out = tr.forward(merged, tokens, config)
    b = bound(params, config, dtype, rank(ad))
    assert_within(out, unmerged, b, what=f"merged (untied) vs unmerged ({case}, {dtype})")
    if table.removesuffix(".weight") in ad and tied:                     # PEFT's tied merge: another model
        peft_like = {k: v for k, v in merged.items() if k != "lm_head.weight"}
        assert np.abs(tr.forward(peft_like, tokens, replace(config, tie_word_embeddings=True)) - unmerged).max() > np.max(b)


def test_untied_gpt2(tmp_path):
    untied = replace(TINY, tie_word_embeddings=False)
    assert tr.untie(TINY) == untied and list(tr.param_shapes(untied))[-1] == "lm_head.weight"
    params = tr.init_params(untied, 0)
    assert params["lm_head.weight"].shape == (TINY.vocab_size, TINY.n_embd)
    assert all(np.array_equal(v, tr.init_params(TINY, 0)[k]) for k, v in params.items() if k != "lm_head.weight")
    tokens = np.random.default_rng(0).integers(0, TINY.vocab_size, (2, 6))
    head = {**params, "lm_head.weight": params["transformer.wte.weight"]}
    tied_params = {k: v for k, v in params.items() if k != "lm_head.weight"}
    assert np.array_equal(tr.forward(head, tokens, untied), tr.forward(tied_params, tokens, TINY))
    save_hf_gpt2(tmp_path / "untied", untied, params)
    config, loaded = load_hf_gpt2(tmp_path / "untied")
    assert config == untied and all(np.array_equal(loaded[k], v) for k, v in params.items())
    assert np.array_equal(tr.forward(loaded, tokens, config), tr.forward(params, tokens, untied))
    save_hf_gpt2(tmp_path / "tied", TINY, tied_params)
    with pytest.raises(ValueError, match=r"params must have exactly this config's parameters: .*unexpected \['lm_head"):
        save_hf_gpt2(tmp_path / "x", TINY, params)
    import json
    raw = json.loads((tmp_path / "tied" / "config.json").read_text())
    (tmp_path / "tied" / "config.json").write_text(json.dumps({**raw, "tie_word_embeddings": False}))
    with pytest.raises(CheckpointFormatError, match="lm_head.weight is missing and config.json has tie_word_embeddings"):
        load_hf_gpt2(tmp_path / "tied")


def test_embedding_adapters_are_checked():
    params, tokens, _ = model(TINY)
    lc = CASES["gpt2 wte, wpe, c_attn, rsLoRA"][1]
    ad = tr.add_adapters(params, TINY, lc, 0)
    with pytest.raises(ValueError, match=r"dropout has a mask for 'transformer.wte', an embedding: LoRA on an embedding "
                                         r"has no dropout"):
        tr.forward(params, tokens, TINY, ad, lc, {"transformer.wte": dropout_mask((2, 6, 8), 0.5, np.random.default_rng(0))})
    with pytest.raises(ValueError, match=r"enable_lora applies to 'transformer.wte', an embedding table"):
        tr.add_adapters(params, TINY, LoraConfig(r=2, alpha=2.0, target_modules=["wte"],
                                                 enable_lora={"wte": (True, False)}), 0)
    with pytest.raises(ValueError, match=r"adapts 'transformer.wte', an embedding, with use_dora: DoRA on an embedding "
                                         r".* is not implemented"):
        tr.add_adapters(params, TINY, LoraConfig(r=2, alpha=2.0, target_modules=["wte", "c_attn"], use_dora=True), 0)
    with pytest.raises(ValueError, match=r"adapts 'transformer.wte', an embedding table, which its embedding_modules does "
                                         r"not list; add it \(e.g. embedding_modules=\['wte'\]\)"):
        tr.add_adapters(params, TINY, LoraConfig(r=2, alpha=2.0, target_modules=["wte"]), 0)
    with pytest.raises(ValueError, match=r"embedding_modules \['wte', 'wpe', 'c_attn'\] matches 'transformer.h.0.attn."
                                         r"c_attn', which is not an embedding table of gpt2"):
        tr.forward(params, tokens, TINY, ad, replace(lc, embedding_modules=["wte", "wpe", "c_attn"]))
    transposed = {**ad, "transformer.wte": {"A": ad["transformer.wte"]["B"].T, "B": ad["transformer.wte"]["A"].T}}
    with pytest.raises(ValueError, match=r"'transformer.wte'\] has A \(2, 8\) and B \(11, 2\); its table \(V, D\) is "
                                         r"\(11, 8\).*so A must be \(2, 11\) and B \(8, 2\)"):
        tr.forward(params, tokens, TINY, transposed, lc)
    bad = replace(LLAMA, extra={"pad_token_id": 13})
    lp, lt, _ = model(LLAMA)
    la = tr.add_adapters(lp, LLAMA, CASES["llama embed_tokens, q_proj (pad 3)"][1], 0)
    with pytest.raises(ValueError, match=r"pad_token_id=13 is not a row of the embedding \(vocab_size=13\)"):
        tr.forward(lp, lt, bad, la, CASES["llama embed_tokens, q_proj (pad 3)"][1])
    assert tr.llama.padding_idx(replace(LLAMA, extra={"pad_token_id": -1})) == 12   # PyTorch's negative index
    tr.forward(lp, lt, bad)                                              # no embedding adapter: not consulted
