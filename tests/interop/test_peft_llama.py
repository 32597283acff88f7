"""PEFT LoRA adapters on LLaMA-family models: lora-ref against PEFT 0.21.2 + transformers (PyTorch,
CPU), float64.

PEFT adapters with non-zero B (``init_lora_weights=False``) on all seven projections with
``rank_pattern`` / ``alpha_pattern`` and rsLoRA, and on q, v, down of one layer
(``layers_to_transform``), on LLaMA (tied and untied heads) and Qwen2 (q/k/v biases): PEFT's
saved adapter loads with ``lora_ref.load_peft_adapter``; the logits, ``merge_and_unload``'s
weights and the gradients of a cross-entropy with respect to every lora_A / lora_B (torch
autograd; the loss computed here from the logits, as transformers' ``labels=`` loss upcasts) equal
lora-ref's; an adapter saved by ``save_peft_adapter`` reloads in PEFT with the same logits.

The comparisons run transformers with its float32 RMSNorm and RoPE steps in float64
(_llama_helpers.float64_transformers), so the bounds are float64 rounding: logits
``(gamma(n_ours) + gamma(n_torch)) M`` (chains with the adapters' rank); a merged weight
``W + s B A``: r + 2 roundings on ``|W| + |s| |B| |A|`` per side; a gradient array: two
computations of the backward chain (at most twice the forward one) on its largest entry, as
tests/transformer/_gpt_helpers.assert_trees_close.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import autograd  # noqa: E402
from _llama_helpers import (  # noqa: E402
    BATCH,
    SIZES,
    T,
    float64_transformers,
    logits_bound,
    random_model,
    report,
    torch_logits,
)

import transformer_ref as tr  # noqa: E402
from lora_ref.peft_io import load_peft_adapter, save_peft_adapter  # noqa: E402
from lora_ref.testing import assert_within, tolerance  # noqa: E402
from transformer_ref.bounds import logit_rounding_chain  # noqa: E402

pytestmark = pytest.mark.interop

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {
    "all seven, patterns, rsLoRA": dict(r=2, lora_alpha=5, target_modules=SEVEN, rank_pattern={"down_proj": 3},
                                        alpha_pattern={"k_proj": 7}, use_rslora=True),
    "q, v, down of layer 1": dict(r=3, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                  layers_to_transform=[1]),
}
CASES = [("llama untied", "all seven, patterns, rsLoRA"), ("llama tied", "q, v, down of layer 1"),
         ("qwen2", "all seven, patterns, rsLoRA")]


@pytest.fixture(scope="module")
def tokens():
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, SIZES["vocab_size"], size=(BATCH, T))
    targets = rng.integers(0, SIZES["vocab_size"], size=(BATCH, T))
    targets[0, :3] = -100
    return tokens, targets


def peft_model(variant, adapter, seed):
    """A float64 PEFT model on the random base of ``variant`` (seed), adapter B != 0."""
    base = random_model(variant, seed=seed).double()
    return peft.get_peft_model(base, peft.LoraConfig(init_lora_weights=False, lora_dropout=0.0, **ADAPTERS[adapter]))


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """(variant, adapter) -> (base directory, adapter directory written by PEFT)."""
    out = {}
    for i, (variant, adapter) in enumerate(CASES):
        root = tmp_path_factory.mktemp("peft")
        random_model(variant, seed=10 + i).save_pretrained(root / "base")
        torch.manual_seed(i)
        peft_model(variant, adapter, 10 + i).save_pretrained(root / "adapter")
        out[(variant, adapter)] = (root / "base", root / "adapter", 10 + i)
    return out


def load(cases, case):
    base, adapter_dir, _ = cases[case]
    config, params = tr.load_checkpoint(base, dtype="float64")
    lora_config, adapters = load_peft_adapter(adapter_dir, params)
    return config, params, lora_config, adapters


def reloaded(cases, case):
    """PEFT's own model of the saved adapter, float64."""
    base, adapter_dir, seed = cases[case]
    return peft.PeftModel.from_pretrained(random_model(case[0], seed=seed).double(), adapter_dir).eval()


@pytest.mark.parametrize("case", CASES, ids=[f"{v}: {a}" for v, a in CASES])
def test_peft_adapter_loads_and_gives_peft_logits(cases, case, tokens, monkeypatch):
    config, params, lc, adapters = load(cases, case)
    expected = {f"model.layers.{i}.{m}" for i in range(2) for m in
                (["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                  "mlp.up_proj", "mlp.down_proj"] if case[1].startswith("all") else [])}
    if not case[1].startswith("all"):
        expected = {f"model.layers.1.{m}" for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")}
    assert set(adapters) == expected and all(np.abs(a["B"]).max() > 0 for a in adapters.values())
    if case[1].startswith("all"):
        assert lc.rank_for("model.layers.0.mlp.down_proj") == 3 and lc.scale_for("model.layers.1.self_attn.k_proj") == \
            7 / np.sqrt(2)                                        # alpha_pattern, rsLoRA: alpha / sqrt(r)
    r = max(a["B"].shape[1] for a in adapters.values())
    model = reloaded(cases, case)
    with float64_transformers(monkeypatch):
        theirs = torch_logits(model, tokens[0])
    ours = tr.forward(params, tokens[0], config, adapters, lc)
    bound = logits_bound(params, config, T, r=r)
    report("peft-llama", f"{case[0]}, {case[1]}: logits, float64", ours, theirs, bound)
    assert np.max(np.abs(ours - tr.forward(params, tokens[0], config))) > np.max(bound)    # the adapter matters


@pytest.mark.parametrize("case", CASES, ids=[f"{v}: {a}" for v, a in CASES])
def test_merge_and_unload_weights(cases, case):
    config, params, lc, adapters = load(cases, case)
    merged = {k: v.detach().numpy() for k, v in reloaded(cases, case).merge_and_unload().state_dict().items()}
    ours = tr.merge_adapters(params, adapters, lc)
    worst = 0.0
    for name, ad in adapters.items():
        W, A, B, s = params[name + ".weight"], ad["A"], ad["B"], lc.scale_for(name)
        r = A.shape[0]
        bound = 2 * tolerance("float64", r + 2) * (np.abs(W) + abs(s) * np.abs(B) @ np.abs(A))   # W + s B A, each side
        worst = max(worst, assert_within(ours[name + ".weight"], merged[name + ".weight"], bound, what=f"merged {name}"))
    for name in params:
        if name.removesuffix(".weight") not in adapters:
            assert np.array_equal(ours[name], merged[name]), name       # untouched weights, bit for bit
    print(f"\n[peft-llama] {case[0]}, {case[1]}: merge_and_unload, worst error/bound {worst:.2e}")


@pytest.mark.parametrize("case", CASES, ids=[f"{v}: {a}" for v, a in CASES])
def test_gradients_of_every_factor_equal_torch_autograd(cases, case, tokens, monkeypatch):
    config, params, lc, adapters = load(cases, case)
    inputs, targets = tokens
    model = reloaded(cases, case)
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    with float64_transformers(monkeypatch):
        logits = model(torch.tensor(inputs)).logits                                   # (B, T, V)
    kept = torch.tensor(targets != -100)
    logp = torch.log_softmax(logits, dim=-1)
    picked = logp.gather(-1, torch.tensor(np.where(targets == -100, 0, targets))[..., None])[..., 0]
    (-(picked * kept).sum() / kept.sum()).backward()                                  # mean over kept targets
    theirs = {}
    for n, p in model.named_parameters():
        if "lora_" in n:                # base_model.model.<module>.lora_A.default.weight
            module, factor = n.removeprefix("base_model.model.").split(".lora_")
            theirs.setdefault(module, {})[factor[0]] = p.grad.numpy()
    ours = autograd.grad(lambda ad: tr.loss(params, inputs, targets, config, ad, lc))(adapters)
    assert set(theirs) == set(ours)
    r = max(a["B"].shape[1] for a in adapters.values())
    n = 2 * (logit_rounding_chain(config, r, T=T, loss_batch=BATCH * T) + config.num_hidden_layers * (4 * T + 5))
    worst, rel = 0.0, 0.0
    for module in ours:
        for f in ("A", "B"):
            M = float(np.abs(theirs[module][f]).max())
            worst = max(worst, assert_within(ours[module][f], theirs[module][f], 2 * tolerance("float64", n) * M,
                                             what=f"dL/d{f} of {module}"))
            rel = max(rel, float(np.abs(ours[module][f] - theirs[module][f]).max()) / M)
    print(f"\n[peft-llama] {case[0]}, {case[1]}: gradients of {2 * len(ours)} factors, max |diff| / max |grad| "
          f"{rel:.2e}, worst error/bound {worst:.2e}")


@pytest.mark.parametrize("case", CASES[:2], ids=[f"{v}: {a}" for v, a in CASES[:2]])
def test_adapter_saved_by_lora_ref_reloads_in_peft(cases, case, tokens, tmp_path, monkeypatch):
    config, params, lc, adapters = load(cases, case)
    rng = np.random.default_rng(3)
    changed = {m: {f: a + 0.1 * rng.standard_normal(a.shape) for f, a in pair.items()} for m, pair in adapters.items()}
    save_peft_adapter(tmp_path / "ours", lc, changed)
    base, _, seed = cases[case]
    model = peft.PeftModel.from_pretrained(random_model(case[0], seed=seed).double(), tmp_path / "ours").eval()
    with float64_transformers(monkeypatch):
        theirs = torch_logits(model, tokens[0])
    r = max(a["B"].shape[1] for a in changed.values())
    report("peft-llama", f"{case[0]}, {case[1]}: save_peft_adapter -> PEFT logits, float64",
           tr.forward(params, tokens[0], config, changed, lc), theirs, logits_bound(params, config, T, r=r))


def test_as_shipped_peft_logits(cases, tokens):
    """transformers untouched: agreement to the float32 roundings of its RMSNorm and RoPE tables."""
    case = CASES[0]
    config, params, lc, adapters = load(cases, case)
    r = max(a["B"].shape[1] for a in adapters.values())
    report("peft-llama", f"{case[0]}, {case[1]}: logits, float64 model as shipped",
           tr.forward(params, tokens[0], config, adapters, lc), torch_logits(reloaded(cases, case), tokens[0]),
           logits_bound(params, config, T, r=r, float32_steps=True))
