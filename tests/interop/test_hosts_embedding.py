"""Embedding adapters in lora-ref's model families against PEFT 0.21.2 + transformers, at the MODEL
level, float64: PEFT's Embedding LoRA on a tiny GPT-2 (``target_modules=["wte"]`` and with
``c_attn``), on a tiny LLaMA (``embed_tokens``, with a ``pad_token_id``), and on a tied LLaMA.

PEFT's factors (``init_lora_weights=False``: both random, scaled to a trained update's size) are
copied into lora-ref's adapter dicts; the saved adapter read by ``lora_ref.peft_io.load_peft_adapter``
gives the same arrays and a LoraConfig whose ``embedding_modules`` the hosts accept. Compared: the
logits, the gradients of a mean cross-entropy with respect to ``lora_embedding_A`` /
``lora_embedding_B`` (and the linear adapters' ``lora_A`` / ``lora_B``), the merged tables; then
the tied output head, measured (``pytest -s`` prints the lines docs/embedding.md quotes):

* PEFT's forward adapts the input lookup only; lora-ref's forward is the same function;
* PEFT's ``merge_and_unload`` writes ``E + s (B A)^T`` into the one tensor the head shares, so its
  merged model differs from its unmerged one; lora-ref's ``merge_adapters`` unties instead
  (``lm_head.weight`` keeps E, ``transformer_ref.untie(config)``) and equals PEFT's unmerged model
  within the rounding bound;
* ``ensure_weight_tying=True`` on a tied LLaMA (``embed_tokens`` is one of PEFT's tying names): the
  head gets a linear adapter sharing the factors, the unmerged model adapts both ends, and the
  merge adds the delta twice into the shared tensor.

Bounds as in test_hosts_dora (``2 gamma_n M``): an adapted lookup adds ``r + 3`` roundings, fewer
than the adapted projection the chain of rank ``r + 3`` counts; a merged table ``r + 3`` roundings
on ``|E| + |s| (|B| |A|)^T`` (test_embedding_conv_peft); M of logits read from the head actually used.

The tied-head lines docs/embedding.md quotes are printed through ``assert_page_shows``, which fails
when the page does not show the line verbatim (every number in them is bit-for-bit the same run to
run: fixed seeds, fixed shapes), so the page cannot drift from what this test measures.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import _pages  # noqa: E402
import autograd  # noqa: E402
from test_hosts_dora import (  # noqa: E402
    BATCH,
    T,
    base_model,
    chain,
    copied,
    lora_layers,
    peft_logits,
    peft_model,
    ref_config,
    report,
    tokens_and_targets,
    torch_loss,
)

import transformer_ref as tr  # noqa: E402
from lora_ref.embedding import merge_embedding  # noqa: E402
from lora_ref.peft_io import load_peft_adapter  # noqa: E402
from lora_ref.testing import assert_within, tolerance  # noqa: E402

pytestmark = pytest.mark.interop

PAD = 5
CASES = {
    "gpt2 wte": ("gpt2", dict(r=2, lora_alpha=4, target_modules=["wte"]), ["wte"]),
    "gpt2 wte, c_attn": ("gpt2", dict(r=2, lora_alpha=4, target_modules=["wte", "c_attn"]), ["wte"]),
    "llama embed_tokens, q_proj, rsLoRA (pad 5)": ("llama untied", dict(
        r=3, lora_alpha=5, target_modules=["embed_tokens", "q_proj"], use_rslora=True), ["embed_tokens"]),
    "llama tied embed_tokens": ("llama tied", dict(r=2, lora_alpha=4, target_modules=["embed_tokens"]), ["embed_tokens"]),
}


COMMAND = 'python -m pytest -q -s tests/interop/test_hosts_embedding.py -k "tied_head or ensure"'




def assert_page_shows(line):
    """_pages.assert_page_shows for docs/embedding.md, printed by COMMAND."""
    _pages.assert_page_shows(line, "embedding.md", COMMAND)


def report_shown(what, ours, theirs, bound):
    """test_hosts_dora.report (assert_within, then the largest |difference|, relative to max |PEFT|,
    and error/bound), its line one that docs/embedding.md must show."""
    ratio = assert_within(ours, theirs, bound, what=what)
    theirs = np.asarray(theirs, dtype=np.float64)
    err = float(np.max(np.abs(np.asarray(ours, dtype=np.float64) - theirs)))
    assert_page_shows(f"[hosts-embedding] {what}: max |diff| {err:.2e}, relative {err / float(np.max(np.abs(theirs))):.2e}, "
                      f"error/bound {ratio:.2e}")


def magnitude(params, config):
    """transformer_ref.bounds.logit_magnitude, reading the head the params hold (lm_head.weight once untied)."""
    gpt2 = isinstance(config, tr.GPTConfig)
    table = "transformer.wte.weight" if gpt2 else "model.embed_tokens.weight"
    head = np.abs(params.get("lm_head.weight", params[table]))
    norm = np.abs(params["transformer.ln_f.weight" if gpt2 else "model.norm.weight"])
    bias = np.abs(params["transformer.ln_f.bias"]) if gpt2 else 0.0
    return float((head @ (math.sqrt(head.shape[1]) * norm + bias)).max())


def bound(params, config, r, *, loss_batch=None):
    return 2 * tolerance("float64", chain(config, r + 3, loss_batch=loss_batch)) * magnitude(params, config)


@pytest.fixture(scope="module")
def cases():
    """case -> (PEFT model, config, params, LoraConfig, adapters copied from PEFT)."""
    out = {}
    for i, (case, (family, kwargs, tables)) in enumerate(CASES.items()):
        model, config, params = base_model(family, seed=30 + i)
        if family.startswith("llama") and "untied" in family:
            model.config.pad_token_id = PAD                      # transformers: nn.Embedding(padding_idx=pad)
            model.model.embed_tokens.padding_idx = PAD
            config = replace(config, extra={"pad_token_id": PAD})
        torch.manual_seed(i)
        pm = peft_model(model, **kwargs).eval()
        with torch.no_grad():                                    # N(0, 1) factors scaled to a trained update's size
            for layer in lora_layers(pm).values():
                for p in (*layer.lora_embedding_A.values(), *layer.lora_embedding_B.values()):
                    p.mul_(0.05 if family == "gpt2" else 0.2)
        out[case] = (pm, config, params, ref_config(kwargs, embedding_modules=tables), copied(pm))
    return out


@pytest.mark.parametrize("case", CASES)
def test_the_file_peft_saves_reads_back(cases, case, tmp_path):
    pm, config, params, lc, adapters = cases[case]
    pm.save_pretrained(tmp_path, save_embedding_layers=False)   # "auto" would also save LLaMA's base table
    lc_file, from_file = load_peft_adapter(tmp_path, params)
    assert set(from_file) == set(adapters)
    for module, ad in adapters.items():
        assert all(np.array_equal(from_file[module][k], ad[k]) for k in ad), module
        assert lc_file.scale_for(module) == lc.scale_for(module) == lora_layers(pm)[module].scaling["default"]
        assert lc_file.is_embedding(module) == lc.is_embedding(module)
    tokens, _ = tokens_and_targets(config.vocab_size)
    assert np.array_equal(tr.forward(params, tokens, config, from_file, lc_file), tr.forward(params, tokens, config, adapters, lc))


@pytest.mark.parametrize("case", CASES)
def test_embedding_logits_and_gradients_equal_peft(cases, case, monkeypatch):
    pm, config, params, lc, adapters = cases[case]
    tokens, targets = tokens_and_targets(config.vocab_size)
    tokens[1, 4] = PAD                                           # the pad id is in the batch (LLaMA: no gradient)
    r = max(lc.rank_for(m) for m in adapters)
    ours = tr.forward(params, tokens, config, adapters, lc)
    report("hosts-embedding", f"{case}: logits", ours, peft_logits(pm, tokens, monkeypatch), bound(params, config, r))
    assert np.max(np.abs(ours - tr.forward(params, tokens, config))) > np.max(bound(params, config, r))
    for n, p in pm.named_parameters():
        p.requires_grad_("lora_" in n)
        p.grad = None
    torch_loss(peft_logits(pm, tokens, monkeypatch, grad=True), targets).backward()
    theirs = {}
    for module, layer in lora_layers(pm).items():
        a, b = ((layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]) if layer.lora_embedding_A else
                (layer.lora_A["default"].weight, layer.lora_B["default"].weight))
        theirs[module] = {"A": a.grad.numpy(), "B": b.grad.numpy()}
    grads = autograd.grad(lambda ad: tr.loss(params, tokens, targets, config, ad, lc))(adapters)
    n = 2 * chain(config, r + 3, loss_batch=BATCH * T)
    worst = {}
    for module in grads:
        for f in ("A", "B"):
            M = float(np.abs(theirs[module][f]).max())
            assert_within(grads[module][f], theirs[module][f], 2 * tolerance("float64", n) * M, what=f"dL/d{f} of {module}")
            kind = f"lora_embedding_{f}" if lc.is_embedding(module) else f"lora_{f}"
            worst[kind] = max(worst.get(kind, 0.0), float(np.abs(grads[module][f] - theirs[module][f]).max()) / M)
    print(f"\n[hosts-embedding] {case}: gradients, max |diff| / max |grad|: "
          + ", ".join(f"{k} {v:.2e}" for k, v in worst.items()))
    if "pad" in case:                                            # padding_idx: PEFT's A column PAD never trains
        table = next(m for m in adapters if lc.is_embedding(m))
        assert np.all(theirs[table]["A"][:, PAD] == 0.0) and np.all(grads[table]["A"][:, PAD] == 0.0)


@pytest.mark.parametrize("case", [c for c in CASES if c.startswith("gpt2")])
def test_an_untied_merged_gpt2_saves_and_loads_in_transformers(cases, case, monkeypatch, tmp_path):
    """save_hf_gpt2 of the untying merge (tie_word_embeddings false, lm_head.weight written) is a
    checkpoint GPT2LMHeadModel loads untied, and its logits are PEFT's unmerged model's."""
    from transformer_ref.checkpoints import save_hf_gpt2

    pm, config, params, lc, adapters = cases[case]
    merged = tr.merge_adapters(params, adapters, lc)
    save_hf_gpt2(tmp_path, tr.untie(config), merged)
    model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).double().eval()
    assert not model.config.tie_word_embeddings and model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr()
    assert np.array_equal(model.lm_head.weight.detach().numpy(), params["transformer.wte.weight"])
    tokens, _ = tokens_and_targets(config.vocab_size)
    with torch.no_grad():
        theirs = model(torch.tensor(tokens)).logits.numpy()
    report("hosts-embedding", f"{case}: merged, saved untied, transformers' logits vs PEFT unmerged", theirs,
           peft_logits(pm, tokens, monkeypatch), bound(merged, tr.untie(config), max(lc.rank_for(m) for m in adapters)))


@pytest.mark.parametrize("case", CASES)
def test_merged_tables_and_the_tied_head(cases, case, monkeypatch):
    pm, config, params, lc, adapters = cases[case]
    tokens, _ = tokens_and_targets(config.vocab_size)
    table = next(m for m in adapters if lc.is_embedding(m))
    E, A, B, s = params[table + ".weight"], adapters[table]["A"], adapters[table]["B"], lc.scale_for(table)
    unmerged = peft_logits(pm, tokens, monkeypatch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merged_model = copy.deepcopy(pm).merge_and_unload()
    warned = any("tie_word_embeddings=True" in str(w.message) for w in caught)
    with float64_patch(monkeypatch), torch.no_grad():
        peft_merged = merged_model(torch.tensor(tokens)).logits.numpy()
    state = {k: v.detach().numpy() for k, v in merged_model.state_dict().items()}
    ours = tr.merge_adapters(params, adapters, lc)
    r = lc.rank_for(table)
    M = np.abs(E) + abs(s) * (np.abs(B) @ np.abs(A)).T
    report("hosts-embedding", f"{case}: merged table", ours[table + ".weight"], state[table + ".weight"],
           2 * tolerance("float64", r + 3) * M)
    tied = "lm_head.weight" not in params
    run = tr.untie(config) if tied else config
    ours_logits = tr.forward(ours, tokens, run)
    report("hosts-embedding", f"{case}: lora-ref merged ({'untied' if tied else 'untied already'}) vs PEFT unmerged "
           "logits", ours_logits, unmerged, bound(ours, run, max(lc.rank_for(m) for m in adapters)))
    if tied:
        head = merged_model.lm_head.weight
        emb = merged_model.get_input_embeddings().weight
        assert head is emb or head.data_ptr() == emb.data_ptr()  # PEFT: the head moved with the table
        assert ours["lm_head.weight"] is E                        # lora-ref: the head keeps the base table
        diff = float(np.max(np.abs(peft_merged - unmerged)))
        assert_page_shows(f"[hosts-embedding] tied head, {case}: PEFT merged vs unmerged logits max |diff| {diff:.4f} "
                          f"(max |logits| {np.max(np.abs(unmerged)):.4f}); lora-ref's untied merge vs PEFT unmerged "
                          f"{np.max(np.abs(ours_logits - unmerged)):.1e}; PEFT warned: {warned}")
        assert diff > np.max(bound(ours, run, r))
        assert warned == table.endswith("embed_tokens")          # PEFT warns for its tying names only, not GPT-2's wte


def float64_patch(monkeypatch):
    from _llama_helpers import float64_transformers

    return float64_transformers(monkeypatch)


def test_ensure_weight_tying_on_a_tied_llama_merges_twice(monkeypatch):
    """embed_tokens is one of PEFT's tying names: with ensure_weight_tying=True the tied head gets
    a linear adapter sharing the embedding's factors (lora_A = lora_embedding_B^T), so the unmerged
    model adapts both ends, and merge_and_unload adds s (B A)^T once per layer into the one shared
    tensor: E + 2 s (B A)^T. lora-ref refuses such a file (lora_ref.peft_io, by name) and its hosts
    do not adapt lm_head; the merge PEFT should have made (each end's delta added into its own
    tensor, once) is built here by hand and equals PEFT's unmerged model."""
    model, config, params = base_model("llama tied", seed=40)
    torch.manual_seed(40)                                        # PEFT draws the factors: the same ones whatever ran before
    pm = peft_model(model, r=2, lora_alpha=4, target_modules=["embed_tokens"], ensure_weight_tying=True).eval()
    layers = lora_layers(pm)
    assert set(layers) == {"model.embed_tokens", "lm_head"}
    emb, head = layers["model.embed_tokens"], layers["lm_head"]
    assert emb.lora_embedding_B["default"].data_ptr() == head.lora_A["default"].weight.data_ptr()
    with torch.no_grad():
        for p in (emb.lora_embedding_A["default"], emb.lora_embedding_B["default"]):
            p.mul_(0.2)
    E, A, B = (t.detach().numpy().copy() for t in (emb.base_layer.weight, emb.lora_embedding_A["default"],
                                                    emb.lora_embedding_B["default"]))
    s = emb.scaling["default"]
    tokens, _ = tokens_and_targets(config.vocab_size)
    unmerged = peft_logits(pm, tokens, monkeypatch)
    both = {**params, "model.embed_tokens.weight": merge_embedding(E, A, B, s)}   # a tied model with E + s (B A)^T
    b = bound(both, config, 2)
    report_shown("ensure_weight_tying unmerged = tied model with E + s (B A)^T", tr.forward(both, tokens, config),
                 unmerged, b)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merged_model = pm.merge_and_unload()
    assert any("tie_word_embeddings=True" in str(w.message) for w in caught)
    twice = merged_model.get_input_embeddings().weight.detach().numpy()
    M = np.abs(E) + 2 * abs(s) * (np.abs(B) @ np.abs(A)).T
    assert_within(twice, merge_embedding(merge_embedding(E, A, B, s), A, B, s), 2 * tolerance("float64", 2 * (2 + 3)) * M,
                  what="E + 2 s (B A)^T")
    with float64_patch(monkeypatch), torch.no_grad():
        merged = merged_model(torch.tensor(tokens)).logits.numpy()
    diff = float(np.max(np.abs(merged - unmerged)))
    assert_page_shows(f"[hosts-embedding] ensure_weight_tying, tied LLaMA: merged table = E + 2 s (B A)^T; PEFT merged vs "
                      f"unmerged logits max |diff| {diff:.4f} (max |logits| {np.max(np.abs(unmerged)):.4f})")
    assert diff > np.max(b)
    # The honest merge, by hand (lora-ref's hosts cannot adapt lm_head): the embedding adapter merged
    # into the table, the head's linear adapter (lora_A = B^T, lora_B = A^T) into an untied copy of E.
    two = tr.untie(config)
    merged_each = {**params, "model.embed_tokens.weight": merge_embedding(E, A, B, s),
                   "lm_head.weight": E + (B @ A).T * s}                      # W + s B' A', B' = A^T, A' = B^T
    report_shown("two adapters merged each into its own tensor vs PEFT unmerged", tr.forward(merged_each, tokens, two),
                 unmerged, bound(merged_each, two, 2))

