"""DoRA in lora-ref's model families against PEFT 0.21.2 (``use_dora=True``) + transformers, at the
MODEL level, float64: a tiny GPT-2 (Conv1D projections, ``fan_in_fan_out``) and a tiny LLaMA
(nn.Linear), with rsLoRA and rank/alpha patterns.

PEFT's adapters get non-zero B (``init_lora_weights=False``) and a magnitude moved away from its
initial value (as after training), and their tensors are copied into lora-ref's adapter dicts
directly (``{"A", "B", "m"}``); the adapter PEFT saves is also read back with
``lora_ref.peft_io.load_peft_adapter`` and must give the same arrays bit for bit. Compared:

* the logits (``transformer_ref.forward`` against PEFT's model in eval mode);
* the gradients of a mean cross-entropy (computed here from the logits) with respect to every
  ``lora_A``, ``lora_B`` and ``lora_magnitude_vector`` (torch autograd against lora-ref's
  hand-written VJPs: both the detached-norm gradient of the paper's Section 4.3);
* ``merge_and_unload()``'s weights against ``transformer_ref.merge_adapters``, and PEFT's
  ``unmerge_adapter()`` (which divides by the norm it cached at merge) against
  ``lora_ref.dora.dora_unmerge`` given ``dora_magnitude`` of the base weight.

Bounds (``2 gamma_n M``, lora_ref.testing): a DoRA projection takes 6 more roundings than a LoRA one
(``dora_rounding_counts(...)["y"] = d_in + r + 12`` against ``d_in + r + 6``), so the logit chains
are those of a LoRA model of rank ``r + 6``: for LLaMA _llama_helpers' (transformers with its
float32 RMSNorm/RoPE steps in float64), for GPT-2 the same chain for both sides, torch's attention
counted 4T + 5 longer per layer as for LLaMA; M = ``transformer_ref.bounds.logit_magnitude``. A
gradient array: twice the forward chain plus the loss, on its largest entry (as test_peft_llama).
A merged weight: ``dora_rounding_counts(...)["W_merged"]`` on ``dora_magnitudes(...)["W_merged"]``.
Run with ``pytest -s`` to see every maximum error and its ratio to the bound.
"""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import autograd  # noqa: E402
from _llama_helpers import float64_transformers, random_model  # noqa: E402

import transformer_ref as tr  # noqa: E402
from lora_ref import LoraConfig  # noqa: E402
from lora_ref.dora import dora_magnitude, dora_magnitudes, dora_rounding_counts, dora_unmerge  # noqa: E402
from lora_ref.peft_io import load_peft_adapter, save_peft_adapter  # noqa: E402
from lora_ref.testing import assert_within, tolerance  # noqa: E402
from transformer_ref.bounds import logit_magnitude, logit_rounding_chain  # noqa: E402

pytestmark = pytest.mark.interop

GPT2 = dict(n_embd=16, n_layer=2, n_head=2, vocab_size=24, n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
BATCH, T = 2, 12
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CASES = {
    "gpt2 c_attn, c_proj, c_fc: rsLoRA, patterns": ("gpt2", dict(
        r=2, lora_alpha=5, target_modules=["c_attn", "c_proj", "c_fc"], use_rslora=True, rank_pattern={"c_fc": 3},
        alpha_pattern={r"h\.1\.attn\.c_attn": 7})),
    "gpt2 c_attn of layer 1": ("gpt2", dict(r=3, lora_alpha=4, target_modules=["c_attn"], layers_to_transform=[1])),
    "llama all seven: rsLoRA, patterns": ("llama untied", dict(
        r=2, lora_alpha=5, target_modules=SEVEN, use_rslora=True, rank_pattern={"down_proj": 3},
        alpha_pattern={"k_proj": 7})),
    "llama tied: q, v, down": ("llama tied", dict(r=3, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"])),
}


# ============================================================================================
# Shared by the three test_hosts_* files: tiny bases, PEFT models, tensors copied, comparisons
# ============================================================================================


def gpt2_model(seed=0, **changes):
    """A tiny float64 GPT2LMHeadModel with random weights (LayerNorm and biases perturbed too)."""
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**GPT2, **changes})).double().eval()
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name or name.endswith(".bias"):
                p.add_(torch.tensor(0.3 * rng.standard_normal(tuple(p.shape))))
    return model


def base_model(family, seed=0):
    """``(torch model, lora-ref config, lora-ref params)`` of one random base, float64."""
    if family == "gpt2":
        model = gpt2_model(seed)
    else:
        model = random_model(family, seed=seed).double()
    return (model, *ref_params(model))


def ref_params(model):
    """The torch model's weights as lora-ref's (config, params): GPT-2's Conv1D transposed once."""
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    if isinstance(model, transformers.GPT2LMHeadModel):
        config = tr.GPTConfig.from_dict({k: v for k, v in model.config.to_dict().items() if k in GPT2 or k == "n_inner"})
        shapes = tr.param_shapes(config)
        return config, {k: (state[k].T.copy() if k.endswith(CONV1D) else state[k]) for k in shapes}
    c = model.config
    config = tr.LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                            num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                            num_key_value_heads=c.num_key_value_heads, max_position_embeddings=c.max_position_embeddings,
                            rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_parameters["rope_theta"],
                            tie_word_embeddings=c.tie_word_embeddings,
                            extra={} if c.pad_token_id is None else {"pad_token_id": c.pad_token_id})
    return config, {k: state[k] for k in tr.param_shapes(config)}


def peft_model(model, adapter_name="default", **kwargs):
    """PEFT on ``model`` with non-zero B (``init_lora_weights=False``), no dropout."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, lora_dropout=0.0, **kwargs),
                                   adapter_name=adapter_name)


def lora_layers(pm):
    """``{lora-ref module name: PEFT LoRA layer}`` of every adapted module."""
    return {name.removeprefix("base_model.model."): mod for name, mod in pm.named_modules()
            if isinstance(mod, peft.tuners.lora.LoraLayer)}


def copied(pm, adapter="default"):
    """PEFT's tensors of ``adapter`` in lora-ref's layout: {module: {"A", "B"[, "m"]}} (copies)."""
    out = {}
    for module, layer in lora_layers(pm).items():
        if adapter in layer.lora_A:
            ad = {"A": layer.lora_A[adapter].weight, "B": layer.lora_B[adapter].weight}
            if adapter in layer.lora_magnitude_vector:
                ad["m"] = layer.lora_magnitude_vector[adapter].weight
        elif adapter in layer.lora_embedding_A:
            ad = {"A": layer.lora_embedding_A[adapter], "B": layer.lora_embedding_B[adapter]}
        else:
            continue
        out[module] = {k: v.detach().numpy().copy() for k, v in ad.items()}
    return out


def ref_config(peft_kwargs, **extra):
    """lora-ref's LoraConfig for PEFT's settings."""
    names = {"lora_alpha": "alpha", "layers_to_transform": "layers_to_transform"}
    kwargs = {names.get(k, k): v for k, v in peft_kwargs.items()}
    return LoraConfig(**kwargs, **extra)


def torch_loss(logits, targets):
    """Mean next-token cross-entropy over the kept targets (-100 ignored), as transformer_ref.loss."""
    kept = torch.tensor(targets != -100)
    logp = torch.log_softmax(logits, dim=-1)
    picked = logp.gather(-1, torch.tensor(np.where(targets == -100, 0, targets))[..., None])[..., 0]
    return -(picked * kept).sum() / kept.sum()


def chain(config, r, *, loss_batch=None, dora=False):
    """Roundings along the longest path, for lora-ref and for torch (its attention 4T + 5 longer per
    layer); ``dora=True`` counts every projection DoRA-adapted (``bounds.logit_rounding_chain``)."""
    L = config.n_layer if isinstance(config, tr.GPTConfig) else config.num_hidden_layers
    return logit_rounding_chain(config, r, T=T, loss_batch=loss_batch, dora=dora) + L * (4 * T + 5)


def logits_bound(params, config, r, dora=False):
    return 2 * tolerance("float64", chain(config, r, dora=dora)) * logit_magnitude(params, config)


def report(tag, what, ours, theirs, bound):
    """assert_within, printing the largest |difference|, relative to max |PEFT|, and error/bound."""
    ratio = assert_within(ours, theirs, bound, what=what)
    theirs = np.asarray(theirs, dtype=np.float64)
    err = float(np.max(np.abs(np.asarray(ours, dtype=np.float64) - theirs)))
    print(f"\n[{tag}] {what}: max |diff| {err:.2e}, relative {err / float(np.max(np.abs(theirs))):.2e}, "
          f"error/bound {ratio:.2e}")
    return err


def tokens_and_targets(vocab, seed=1):
    rng = np.random.default_rng(seed)
    tokens, targets = rng.integers(0, vocab, (BATCH, T)), rng.integers(0, vocab, (BATCH, T))
    targets[0, :3] = -100
    return tokens, targets


def peft_logits(pm, tokens, monkeypatch, grad=False):
    with float64_transformers(monkeypatch), torch.set_grad_enabled(grad):
        out = pm(torch.tensor(tokens)).logits
    return out if grad else out.numpy()


# ============================================================================================
# DoRA
# ============================================================================================


@pytest.fixture(scope="module")
def dora_cases():
    """case -> (PEFT model, lora-ref config, params, LoraConfig, adapters copied from PEFT)."""
    out = {}
    for i, (case, (family, kwargs)) in enumerate(CASES.items()):
        model, config, params = base_model(family, seed=10 + i)
        torch.manual_seed(i)
        pm = peft_model(model, use_dora=True, **kwargs).eval()
        rng = np.random.default_rng(20 + i)
        with torch.no_grad():                      # a trained magnitude: m = ||W + s B A|| (1 + 0.2 N(0, 1))
            for layer in lora_layers(pm).values():
                mag = layer.lora_magnitude_vector["default"].weight
                mag.mul_(torch.tensor(1.0 + 0.2 * rng.standard_normal(tuple(mag.shape))))
        lc = ref_config(kwargs, use_dora=True, fan_in_fan_out=family == "gpt2")
        out[case] = (pm, config, params, lc, copied(pm))
    return out


def rank(adapters):
    return max(a["B"].shape[1] for a in adapters.values())


def test_the_dora_chain_is_six_longer():
    for d_in, r in ((16, 2), (48, 3)):
        assert dora_rounding_counts(d_in, 4, r, 1)["y"] - (d_in + r + 6) == 6
    for family, _ in CASES.values():              # so chain(..., dora=True) is the LoRA chain of rank r + 6
        config = base_model(family)[1]
        for r in (2, 3, 6, 7):
            for loss_batch in (None, BATCH * T):
                assert chain(config, r, loss_batch=loss_batch, dora=True) == chain(config, r + 6, loss_batch=loss_batch)


@pytest.mark.parametrize("case", CASES)
def test_copied_adapters_are_what_the_file_holds(dora_cases, case, tmp_path):
    """PEFT's tensors, copied, are what lora_ref.peft_io reads from the directory PEFT saves: the
    same modules, arrays bit for bit, and the scale PEFT uses per module."""
    pm, config, params, lc, adapters = dora_cases[case]
    m0 = {k: dora_magnitude(params[k + ".weight"], a["A"], a["B"], lc.scale_for(k)) for k, a in adapters.items()}
    assert all(not np.allclose(a["m"], m0[k]) for k, a in adapters.items())          # m was moved
    pm.save_pretrained(tmp_path)
    lc_file, from_file = load_peft_adapter(tmp_path, params)
    assert lc_file.use_dora and set(from_file) == set(adapters)
    for module, ad in adapters.items():
        assert all(np.array_equal(from_file[module][k], ad[k]) for k in ("A", "B", "m")), module
        assert lc_file.scale_for(module) == lc.scale_for(module) == lora_layers(pm)[module].scaling["default"]
        assert lc.rank_for(module) == ad["A"].shape[0]


@pytest.mark.parametrize("case", CASES)
def test_dora_logits_equal_peft(dora_cases, case, monkeypatch):
    pm, config, params, lc, adapters = dora_cases[case]
    tokens, _ = tokens_and_targets(config.vocab_size)
    theirs = peft_logits(pm, tokens, monkeypatch)
    ours = tr.forward(params, tokens, config, adapters, lc)
    b = logits_bound(params, config, rank(adapters), dora=True)
    report("hosts-dora", f"{case}: logits", ours, theirs, b)
    plain = {k: {"A": a["A"], "B": a["B"]} for k, a in adapters.items()}       # the same factors without m
    lora = tr.forward(params, tokens, config, plain, ref_config({}, r=lc.r, alpha=lc.alpha, target_modules=lc.target_modules,
                                                                rank_pattern=lc.rank_pattern, alpha_pattern=lc.alpha_pattern,
                                                                use_rslora=lc.use_rslora,
                                                                layers_to_transform=lc.layers_to_transform))
    assert np.max(np.abs(lora - theirs)) > np.max(b)                            # m matters by more than the bound


def test_llama_dora_saved_by_lora_ref_loads_in_peft(tmp_path, monkeypatch):
    """The other direction, LLaMA: a DoRA adapter made by lora-ref (``add_adapters`` with random
    factors on all seven projections, rsLoRA, rank and alpha patterns; m moved as after training)
    and written by ``save_peft_adapter`` loads with ``PeftModel.from_pretrained`` onto the same
    transformers base: PEFT holds lora-ref's arrays bit for bit, uses its scales, and gives its
    logits within the logits bound; m at its initial value would be farther than the bound."""
    case = "llama all seven: rsLoRA, patterns"
    family, kwargs = CASES[case]
    model, config, params = base_model(family, seed=10 + list(CASES).index(case))
    lc = ref_config(kwargs, use_dora=True, init="random")
    made = tr.add_adapters(params, config, lc, rng=40)
    rng = np.random.default_rng(41)                # a trained magnitude: m0 (1 + 0.2 N(0, 1))
    adapters = {k: {**a, "m": a["m"] * (1.0 + 0.2 * rng.standard_normal(a["m"].shape))} for k, a in made.items()}
    save_peft_adapter(tmp_path / "ours", lc, adapters)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(model, tmp_path / "ours").eval()
    held = copied(pm)
    assert set(held) == set(adapters) and len(adapters) == len(SEVEN) * config.num_hidden_layers
    for module, ad in adapters.items():
        assert all(np.array_equal(held[module][k], ad[k]) for k in ("A", "B", "m")), module
        assert lora_layers(pm)[module].scaling["default"] == lc.scale_for(module), module
    tokens, _ = tokens_and_targets(config.vocab_size)
    theirs = peft_logits(pm, tokens, monkeypatch)
    ours = tr.forward(params, tokens, config, adapters, lc)
    b = logits_bound(params, config, rank(adapters), dora=True)
    report("hosts-dora", f"{case}: saved by lora-ref, loaded by PEFT: logits", ours, theirs, b)
    assert not any(np.allclose(a["m"], made[k]["m"]) for k, a in adapters.items())
    assert np.max(np.abs(tr.forward(params, tokens, config, made, lc) - theirs)) > np.max(b)   # m matters


@pytest.mark.parametrize("case", CASES)
def test_dora_gradients_equal_torch_autograd(dora_cases, case, monkeypatch):
    pm, config, params, lc, adapters = dora_cases[case]
    tokens, targets = tokens_and_targets(config.vocab_size)
    for n, p in pm.named_parameters():
        p.requires_grad_("lora_" in n)
        p.grad = None
    torch_loss(peft_logits(pm, tokens, monkeypatch, grad=True), targets).backward()
    layers = lora_layers(pm)
    theirs = {m: {"A": layers[m].lora_A["default"].weight.grad.numpy(), "B": layers[m].lora_B["default"].weight.grad.numpy(),
                  "m": layers[m].lora_magnitude_vector["default"].weight.grad.numpy()} for m in adapters}
    ours = autograd.grad(lambda ad: tr.loss(params, tokens, targets, config, ad, lc))(adapters)
    n = 2 * chain(config, rank(adapters), loss_batch=BATCH * T, dora=True)
    worst = {}
    for module in ours:
        for f in ("A", "B", "m"):
            M = float(np.abs(theirs[module][f]).max())
            assert_within(ours[module][f], theirs[module][f], 2 * tolerance("float64", n) * M, what=f"dL/d{f} of {module}")
            worst[f] = max(worst.get(f, 0.0), float(np.abs(ours[module][f] - theirs[module][f]).max()) / M)
    print(f"\n[hosts-dora] {case}: gradients of {len(ours)} modules, max |diff| / max |grad|: "
          + ", ".join(f"lora_{'magnitude_vector' if f == 'm' else f} {v:.2e}" for f, v in worst.items()))


@pytest.mark.parametrize("case", CASES)
def test_dora_merge_and_unmerge_equal_peft(dora_cases, case):
    pm, config, params, lc, adapters = dora_cases[case]
    layers = lora_layers(pm)
    gpt2 = isinstance(config, tr.GPTConfig)
    stored = lambda w: w.detach().numpy().copy().T if gpt2 else w.detach().numpy().copy()  # noqa: E731  Conv1D
    state = copy.deepcopy(pm).merge_and_unload().state_dict()
    unloaded = {m: stored(state[m + ".weight"]) for m in adapters}
    pm.merge_adapter()                                       # PEFT caches ||W + s B A|| at merge
    peft_merged = {m: stored(layers[m].base_layer.weight) for m in adapters}
    assert all(np.array_equal(unloaded[m], peft_merged[m]) for m in adapters)   # merge_and_unload = merge_adapter
    pm.unmerge_adapter()
    peft_unmerged = {m: stored(layers[m].base_layer.weight) for m in adapters}
    ours = tr.merge_adapters(params, adapters, lc)
    worst_merge, worst_unmerge = 0.0, 0.0
    for module, ad in adapters.items():
        W, s, r = params[module + ".weight"], lc.scale_for(module), ad["A"].shape[0]
        d_out, d_in = W.shape
        M = dora_magnitudes(np.zeros((1, d_in)), W, ad["A"], ad["B"], ad["m"], s)["W_merged"]
        n = dora_rounding_counts(d_in, d_out, r, 1)["W_merged"]
        worst_merge = max(worst_merge, report("hosts-dora", f"{case}: merged {module}", ours[module + ".weight"],
                                              peft_merged[module], 2 * tolerance("float64", n) * M) / np.abs(M).max())
        # unmerge: W = W' (C / m) - s B A, C = ||W + s B A|| of the base W (PEFT's cached norm): the merged
        # weight's error scaled by C / m, then r + 5 roundings (C / m, the product, B A, s, the subtraction)
        C = dora_magnitude(W, ad["A"], ad["B"], s)
        back = dora_unmerge(ours[module + ".weight"], ad["A"], ad["B"], ad["m"], s, norm=C)
        M_back = M * np.abs(C / ad["m"])[:, None] + abs(s) * np.abs(ad["B"]) @ np.abs(ad["A"])
        b = 2 * tolerance("float64", n + r + 5) * M_back
        worst_unmerge = max(worst_unmerge, report("hosts-dora", f"{case}: unmerged {module}", back, peft_unmerged[module], b)
                            / np.abs(M_back).max())
        assert_within(back, W, b, what=f"unmerge gives W back ({module})")
    print(f"\n[hosts-dora] {case}: merged weights max |diff| / max M {worst_merge:.2e}, unmerged {worst_unmerge:.2e}")
    assert math.isfinite(worst_merge)
