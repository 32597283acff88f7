"""PEFT adapters: lora_ref.peft_io + transformer_ref against PEFT on PyTorch (CPU).

For each PEFT configuration below, a tiny random GPT-2 gets a PEFT LoRA adapter with non-zero B
(``init_lora_weights=False``); PEFT saves it; lora-ref loads it and must reproduce

* which modules PEFT adapted, with PEFT's rank and scale for each (exactly: the same Python
  float formula on the same numbers),
* PEFT's logits (float64 and float32),
* ``merge_and_unload()``'s weights, against ``transformer_ref.merge_adapters``,
* the gradients of every ``lora_A`` / ``lora_B`` from PyTorch autograd through the whole model's
  loss, against ``autograd.grad`` of ``transformer_ref.loss`` (float64).

An adapter written by ``save_peft_adapter`` must load in ``PeftModel.from_pretrained`` and give
transformer_ref's logits. Run with ``pytest -s`` to see the maximum relative error of every
comparison (``max |ours - PEFT| / max |PEFT|``) and its ratio to the bound.

Tolerances (how they are derived)
---------------------------------
Everything is compared against a bound ``2 gamma_n M`` (``lora_ref.testing.tolerance``):

* logits: n = the longest chain of roundings feeding one logit (:func:`forward_roundings`, each
  LoRA projection of rank r adding r + 1 roundings), M = |h| |wte|^T with h the final LayerNorm's
  output (from PyTorch);
* merged weights: ``W + s B A`` is r + 2 roundings (the r-term dot, the scale, the add), M =
  |W| + |s| |B| |A|;
* gradients: n = the forward chain plus the cross-entropy (V + 3 roundings for log-softmax, N for
  the mean over N = B (T - 1) positions), doubled for the backward pass, plus N for the sum over
  positions inside dL/dA and dL/dB; M is the gradient formula on absolute values,
  ``|s| (|G| |B|)^T |x|`` for A and ``|s| |G|^T (|x| |A|^T)`` for B, with x the module's input
  and G = dL/dy its output gradient, captured from PyTorch with hooks.

This is the first-order rounding model applied to the whole network as one chain (see
tests/interop/test_hf_gpt2.py); the comparisons are in float64, where any slip in the math
(a wrong scale, a missed transpose, a wrong rank) is many orders of magnitude above the bound.
PyTorch's own loss (``labels=``) upcasts logits to float32, so the float64 loss is computed here
with ``torch.nn.functional.cross_entropy`` on float64 logits.
"""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import autograd  # noqa: E402

import transformer_ref as tr  # noqa: E402
from lora_ref import LoraConfig  # noqa: E402
from lora_ref.peft_io import CONFIG_FIELDS, load_peft_adapter, save_peft_adapter  # noqa: E402
from lora_ref.testing import assert_within, tolerance  # noqa: E402
from transformer_ref import load_hf_gpt2  # noqa: E402

TINY = dict(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
BATCH, T = 2, 16
PREFIX = "base_model.model."

# PEFT configurations verified (each with init_lora_weights=False, fan_in_fan_out=True as PEFT
# forces for GPT-2's Conv1D). "c_proj" matches both attn.c_proj and mlp.c_proj.
CONFIGS = {
    "c_attn r=4 alpha=8": dict(target_modules=["c_attn"], r=4, lora_alpha=8),
    "c_attn+c_proj r=2 alpha=16": dict(target_modules=["c_attn", "c_proj"], r=2, lora_alpha=16),
    "c_fc r=8 alpha=4 rslora": dict(target_modules=["c_fc"], r=8, lora_alpha=4, use_rslora=True),
    "rank_pattern+alpha_pattern": dict(target_modules=["c_attn", "c_fc"], r=4, lora_alpha=8,
                                       rank_pattern={"h.1.attn.c_attn": 2}, alpha_pattern={"mlp.c_fc": 32}),
    "layers_to_transform=[1] layers_pattern=h": dict(target_modules=["c_attn", "c_proj", "c_fc"], r=3, lora_alpha=5,
                                                     layers_to_transform=[1], layers_pattern="h"),
    "regex targets rslora rank_pattern": dict(target_modules=r"transformer\.h\.\d\.(attn\.c_attn|mlp\.c_proj)", r=5,
                                              lora_alpha=6, use_rslora=True, rank_pattern={"h.0.mlp.c_proj": 7}),
}


# --------------------------------------------------------------------------------------------
# Bounds
# --------------------------------------------------------------------------------------------


def forward_roundings(config: tr.GPTConfig, T: int, r: int = 0) -> int:
    """The longest chain of roundings feeding one logit (as in tests/interop/test_hf_gpt2.py).

    C = n_embd, F = MLP width, D = head width; a LoRA projection of rank r with input width k is
    k + r + 2 roundings (x A^T, then B, the scale, the add) instead of k + 1 (+ bias).
    """
    C, F, D = config.n_embd, config.mlp_width, config.head_dim
    layer_norm = 2 * C + 7
    proj = lambda k: k + r + 2  # noqa: E731
    block = (layer_norm + proj(C) + (D + 1) + (T + 3) + T + proj(C) + 1
             + layer_norm + proj(C) + 9 + proj(F) + 1)
    return 1 + config.n_layer * block + layer_norm + C


def gradient_roundings(config: tr.GPTConfig, T: int, r: int, n_positions: int) -> int:
    """Forward chain + log-softmax (V + 3) + mean (N), doubled for the backward, + N for the sum
    over positions in dL/dA and dL/dB."""
    forward = forward_roundings(config, T, r) + config.vocab_size + 3 + n_positions
    return 2 * forward + n_positions


def max_relative_error(ours, theirs) -> float:
    theirs = np.asarray(theirs, dtype=np.float64)
    return float(np.max(np.abs(np.asarray(ours, dtype=np.float64) - theirs)) / np.max(np.abs(theirs)))


def check(what: str, ours, theirs, bound, record: dict) -> None:
    ratio = assert_within(ours, theirs, bound, what=what)
    worst = record.setdefault(what.split(":")[0], [0.0, 0.0])
    worst[0], worst[1] = max(worst[0], max_relative_error(ours, theirs)), max(worst[1], ratio)


def print_record(name: str, record: dict) -> None:
    print(f"\n[peft] {name}:")
    for what, (rel, ratio) in record.items():
        print(f"    {what:<22} max relative error {rel:.2e}   error/bound {ratio:.2e}")


# --------------------------------------------------------------------------------------------
# Fixtures and helpers
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A random tiny GPT-2 saved by transformers, and lora-ref's float32 / float64 loads of it."""
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**TINY)).eval()
    path = tmp_path_factory.mktemp("base") / "tiny-gpt2"
    model.save_pretrained(path)
    config, params32 = load_hf_gpt2(path)
    _, params64 = load_hf_gpt2(path, dtype="float64")
    return dict(path=path, model=model, config=config, params32=params32, params64=params64)


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(1).integers(0, TINY["vocab_size"], size=(BATCH, T))


def lora_layers(pm) -> dict:
    """PEFT's LoRA layers by base-model module name (``transformer.h.0.attn.c_attn``)."""
    return {name.removeprefix(PREFIX): module for name, module in pm.named_modules()
            if isinstance(module, peft.tuners.lora.LoraLayer) and "default" in getattr(module, "lora_A", {})}


def run_peft(pm, tokens, capture: bool = False):
    """PEFT's logits, final hidden state, float64-safe loss, and (optionally) each LoRA layer's
    input x and output gradient G."""
    seen = {}
    handles = []
    if capture:
        for name, module in lora_layers(pm).items():
            def hook(mod, args, out, name=name):
                seen[name] = {"x": args[0].detach().numpy()}
                out.register_hook(lambda g: seen[name].__setitem__("G", g.detach().numpy()))
            handles.append(module.register_forward_hook(hook))
    tt = torch.tensor(tokens)
    out = pm(tt, output_hidden_states=True)
    V = out.logits.shape[-1]
    loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, V), tt[:, 1:].reshape(-1))
    for h in handles:
        h.remove()
    return out.logits.detach().numpy(), out.hidden_states[-1].detach().numpy(), loss, seen


def logits_bound(config, hidden, wte, dtype, r):
    M = np.abs(hidden.astype(np.float64)) @ np.abs(np.asarray(wte, dtype=np.float64)).T   # (B, T, V)
    return 2.0 * tolerance(dtype, forward_roundings(config, hidden.shape[1], r)) * M


# --------------------------------------------------------------------------------------------
# PEFT -> lora-ref
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
def test_peft_adapter_reproduced(base, tokens, tmp_path, name):
    config, record = base["config"], {}
    torch.manual_seed(len(name))
    pm = peft.get_peft_model(copy.deepcopy(base["model"]),
                             peft.LoraConfig(init_lora_weights=False, fan_in_fan_out=True, **CONFIGS[name])).eval()
    pm.save_pretrained(tmp_path / "ad32")

    # Which modules, which rank, which scale: exactly PEFT's.
    lcfg, ad32 = load_peft_adapter(tmp_path / "ad32", base["params32"])
    layers = lora_layers(pm)
    assert sorted(ad32) == sorted(layers)
    for module, layer in layers.items():
        assert lcfg.rank_for(module) == layer.r["default"], module
        assert lcfg.scale_for(module) == layer.scaling["default"], module   # same float formula
        assert np.array_equal(ad32[module]["A"], layer.lora_A["default"].weight.detach().numpy())
        assert np.array_equal(ad32[module]["B"], layer.lora_B["default"].weight.detach().numpy())
        assert np.any(ad32[module]["B"] != 0)
    r_max = max(lcfg.rank_for(m) for m in ad32)

    # Logits, float32.
    with torch.no_grad():
        logits, hidden, _, _ = run_peft(pm, tokens)
    check("logits float32", tr.forward(base["params32"], tokens, config, ad32, lcfg), logits,
          logits_bound(config, hidden, base["params32"]["transformer.wte.weight"], "float32", r_max), record)

    # Logits and gradients, float64.
    pm = pm.double()
    pm.save_pretrained(tmp_path / "ad64")
    lcfg64, ad64 = load_peft_adapter(tmp_path / "ad64", base["params64"])
    assert lcfg64 == lcfg
    params = base["params64"]
    logits, hidden, loss, seen = run_peft(pm, tokens, capture=True)
    loss.backward()
    check("logits float64", tr.forward(params, tokens, config, ad64, lcfg), logits.astype(np.float64),
          logits_bound(config, hidden, params["transformer.wte.weight"], "float64", r_max), record)
    ours_loss = tr.loss(params, tokens[:, :-1], tokens[:, 1:], config, ad64, lcfg)
    grads = autograd.grad(lambda ad: tr.loss(params, tokens[:, :-1], tokens[:, 1:], config, ad, lcfg))(ad64)
    N = BATCH * (T - 1)
    n_grad = gradient_roundings(config, T, r_max, N)
    for module, layer in layers.items():
        s, A, B = lcfg.scale_for(module), np.abs(ad64[module]["A"]), np.abs(ad64[module]["B"])
        x = np.abs(seen[module]["x"]).reshape(-1, A.shape[1])                  # (B T, d_in)
        G = np.abs(seen[module]["G"]).reshape(-1, B.shape[0])                  # (B T, d_out)
        M_A = abs(s) * (G @ B).T @ x                                            # (r, d_in)
        M_B = abs(s) * G.T @ (x @ A.T)                                          # (d_out, r)
        check(f"grad A float64: {module}", grads[module]["A"], layer.lora_A["default"].weight.grad.numpy(),
              2.0 * tolerance("float64", n_grad) * M_A, record)
        check(f"grad B float64: {module}", grads[module]["B"], layer.lora_B["default"].weight.grad.numpy(),
              2.0 * tolerance("float64", n_grad) * M_B, record)
    assert np.isfinite(float(ours_loss))

    # merge_and_unload() against merge_adapters; modules without adapters stay bit-identical.
    merged_ours = tr.merge_adapters(params, ad64, lcfg)
    merged_peft = {k: v.detach().numpy() for k, v in pm.merge_and_unload().state_dict().items()}
    for key, value in merged_ours.items():
        stored = merged_peft[key]
        module = key.removesuffix(".weight")
        if key.endswith(("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")):
            stored = stored.T                                                   # Conv1D (d_in, d_out)
        if module not in ad64:
            assert np.array_equal(value, stored), key
            continue
        r, s = lcfg.rank_for(module), lcfg.scale_for(module)
        M = np.abs(params[key]) + abs(s) * np.abs(ad64[module]["B"]) @ np.abs(ad64[module]["A"])
        check(f"merged weights: {module}", value, stored, 2.0 * tolerance("float64", r + 2) * M, record)
    print_record(name, record)


def test_every_peft_lora_config_field_is_classified():
    fields = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    assert fields == set(CONFIG_FIELDS), (sorted(fields - set(CONFIG_FIELDS)), sorted(set(CONFIG_FIELDS) - fields))


# --------------------------------------------------------------------------------------------
# lora-ref -> PEFT
# --------------------------------------------------------------------------------------------


def test_save_peft_adapter_loads_in_peft(base, tokens, tmp_path):
    config, params, record = base["config"], base["params64"], {}
    lcfg = LoraConfig(r=3, alpha=6.0, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, use_rslora=True,
                      init="random", rank_pattern={"h.0.attn.c_proj": 5}, alpha_pattern={"h.1.attn.c_attn": 2.5})
    adapters = tr.add_adapters(params, config, lcfg, rng=3)
    save_peft_adapter(tmp_path / "ours", lcfg, adapters, base_model_name_or_path=str(base["path"]))
    model = transformers.GPT2LMHeadModel.from_pretrained(base["path"]).double().eval()
    pm = peft.PeftModel.from_pretrained(model, tmp_path / "ours").eval()
    layers = lora_layers(pm)
    assert sorted(layers) == sorted(adapters)
    for module, layer in layers.items():
        assert layer.r["default"] == lcfg.rank_for(module) and layer.scaling["default"] == lcfg.scale_for(module)
        assert np.array_equal(layer.lora_A["default"].weight.detach().numpy(), adapters[module]["A"])
        assert np.array_equal(layer.lora_B["default"].weight.detach().numpy(), adapters[module]["B"])
    with torch.no_grad():
        logits, hidden, _, _ = run_peft(pm, tokens)
    r_max = max(lcfg.rank_for(m) for m in adapters)
    check("logits float64", tr.forward(params, tokens, config, adapters, lcfg), logits,
          logits_bound(config, hidden, params["transformer.wte.weight"], "float64", r_max), record)
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["use_rslora"] is True
    print_record("save_peft_adapter -> PeftModel.from_pretrained (c_attn+c_proj, rslora, patterns)", record)


# --------------------------------------------------------------------------------------------
# Real PEFT files with features lora-ref does not implement: refused, naming the feature
# --------------------------------------------------------------------------------------------


# PEFT 0.21.2 warns on saving a lora_bias adapter that its 1-D lora_B.bias looks like an
# un-gathered DeepSpeed shard: a false alarm about PEFT's own file, irrelevant to the refusal tested.
@pytest.mark.filterwarnings("ignore:Adapter 'default'.*invalid shape.*lora_B.bias")
# (DoRA and embedding adapters are read since issues 13 and 14: tests/interop/test_peft_files_variants.py.)
@pytest.mark.parametrize("settings, words", [
    (dict(target_modules=["c_attn"], lora_bias=True), "lora_bias"),
    (dict(target_modules=["c_attn"], modules_to_save=["ln_f"]), "modules_to_save"),
    (dict(target_modules=["c_attn"], bias="all"), "bias='all'"),
    (dict(target_modules=["c_attn"], exclude_modules=["h.0.attn.c_attn"]), "exclude_modules"),
], ids=["lora_bias", "modules_to_save", "bias-all", "exclude_modules"])
def test_real_peft_features_are_refused(base, tmp_path, settings, words):
    pm = peft.get_peft_model(copy.deepcopy(base["model"]), peft.LoraConfig(r=2, fan_in_fan_out=True, **settings))
    pm.save_pretrained(tmp_path / "ad")
    with pytest.raises(NotImplementedError, match=words):
        load_peft_adapter(tmp_path / "ad")


# --------------------------------------------------------------------------------------------
# Targeting rules, name by name, against PEFT's own function
# --------------------------------------------------------------------------------------------

TARGET_NAMES = ["transformer.h.1.attn.c_attn", "transformer.h.0.attn.c_attn", "transformer.h.5.attn.c_attn",
                "h.1.attn.c_attn", "h.5.attn.c_attn", "c_attn", "transformer.h.1.attn.c_proj",
                "model.layers.5.self_attn.q_proj", "model.layers.1.mlp.experts.5.c_attn", "transformer.h.1.attn.xc_attn"]


@pytest.mark.parametrize("settings", [
    dict(target_modules=["c_attn"]),
    dict(target_modules=["c_attn", "q_proj"], layers_to_transform=[1]),
    dict(target_modules=["c_attn"], layers_to_transform=1, layers_pattern="h"),
    # Issue 11, item 14: layers_pattern is a regular expression in PEFT, inserted unescaped.
    dict(target_modules=["c_attn", "q_proj"], layers_to_transform=[1, 5], layers_pattern="[h]"),
    dict(target_modules=["c_attn", "q_proj"], layers_to_transform=[5], layers_pattern="(?:layers|h)"),
    dict(target_modules=["c_attn", "q_proj"], layers_to_transform=[5], layers_pattern="layers|h"),
    dict(target_modules=["c_attn", "q_proj"], layers_to_transform=[5], layers_pattern=["x", r"\w+"]),
    dict(target_modules=r".*\.(c_attn|q_proj)"),
], ids=str)
def test_targeting_is_peft_check_target_module_exists(settings):
    from peft.tuners.tuners_utils import check_target_module_exists

    theirs = peft.LoraConfig(r=2, **settings)
    ours = LoraConfig(r=2, alpha=8.0, **settings)
    got = {name: ours.targets(name) for name in TARGET_NAMES}
    assert got == {name: bool(check_target_module_exists(theirs, name)) for name in TARGET_NAMES}
