"""transformer_ref.hosting: a second model family plugs in by describing itself, GPT-2 untouched.

A toy family (embedding, one residual projection per block, tied output) is declared here with
its own config class and projection table; add_adapters, merge_adapters, the package's forward,
loss and init_params, and train then work on it through the registry, exactly as for GPT-2.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import autograd
import numpy as np
import pytest

import transformer_ref as tr
from lora_ref import LoraConfig, asarray
from lora_ref.checks import generator
from lora_ref.testing import assert_within, tolerance
from transformer_ref import REFERENCE, hosting
from transformer_ref.data import pretraining_task


@dataclass(frozen=True)
class ToyConfig:
    vocab_size: int = 7
    width: int = 4
    n_layer: int = 2


def toy_shapes(config):
    shapes = {"model.embed.weight": (config.vocab_size, config.width)}
    for i in range(config.n_layer):
        shapes[f"model.blocks.{i}.proj.weight"] = (config.width, config.width)
        shapes[f"model.blocks.{i}.proj.bias"] = (config.width,)
    return shapes


def toy_init(config, seed=0, dtype="float64"):
    rng = generator(seed, "seed")
    return {k: asarray(rng.standard_normal(s).astype(dtype)) for k, s in toy_shapes(config).items()}


def toy_forward(params, tokens, config, adapters=None, lora_config=None, dropout=None, ops=REFERENCE):
    hosting.check_params(params, TOY, config)
    hosting.check_tokens(tokens, config.vocab_size, 16, "context")
    if adapters is not None:
        hosting.check_adapters(adapters, params, lora_config, TOY, config)
    adapters = {} if adapters is None else adapters
    x = ops.embedding(params["model.embed.weight"], tokens)                              # (B, T, C)
    for i in range(config.n_layer):
        name = f"model.blocks.{i}.proj"
        ad = adapters.get(name)
        A, B, s = (ad["A"], ad["B"], lora_config.scale_for(name)) if ad else (None, None, 1.0)
        x = ops.linear(x, params[name + ".weight"], A, B, s, params[name + ".bias"]) + x
    return ops.linear(x, params["model.embed.weight"], None, None, 1.0)                  # (B, T, V)


def toy_loss(params, tokens, targets, config, adapters=None, lora_config=None, dropout=None, ops=REFERENCE):
    return ops.cross_entropy(toy_forward(params, tokens, config, adapters, lora_config, dropout, ops), targets)


TOY = hosting.Family(name="toy", config_type=ToyConfig, block="model.blocks.{i}",
                     projections={"proj": lambda c: (c.width, c.width)}, n_blocks=lambda c: c.n_layer,
                     param_shapes=toy_shapes, init_params=toy_init, forward=toy_forward, loss=toy_loss)


@pytest.fixture
def toy(monkeypatch):
    """The toy family registered for one test (the registry is left as it was afterwards)."""
    monkeypatch.setattr(hosting, "_FAMILIES", dict(hosting._FAMILIES))
    hosting.register(TOY)
    return ToyConfig()


def test_a_second_family_plugs_in(toy):
    config = toy
    params = tr.init_params(config, 0)
    assert list(params) == list(toy_shapes(config)) and tr.projection_names(config) == ["model.blocks.0.proj", "model.blocks.1.proj"]
    lc = LoraConfig(r=2, alpha=4.0, target_modules=["proj"], layers_to_transform=[1], init="random")
    adapters = tr.add_adapters(params, config, lc, 0)
    assert list(adapters) == ["model.blocks.1.proj"] and adapters["model.blocks.1.proj"]["A"].shape == (2, 4)
    tokens = np.array([[0, 3, 6], [1, 2, 5]])
    unmerged = tr.forward(params, tokens, config, adapters, lc)
    merged = tr.forward(tr.merge_adapters(params, adapters, lc), tokens, config)
    # two forwards of one function: per block a projection (C + r + 6 roundings, rounding_counts)
    # and the residual add, then the tied output's C; the magnitude is the same forward on
    # absolute values (every operation here is monotone in them)
    n = config.n_layer * (config.width + 2 + 7) + config.width
    M = tr.forward({k: np.abs(v) for k, v in params.items()}, tokens, config,
                   {k: {p: np.abs(v) for p, v in ad.items()} for k, ad in adapters.items()}, lc)
    assert_within(merged, unmerged, 2 * tolerance("float64", n) * M, what="toy merged vs unmerged")
    assert not np.allclose(unmerged, tr.forward(params, tokens, config))          # the adapter matters
    grads = autograd.grad(lambda ad: tr.loss(params, tokens, tokens, config, ad, lc))(adapters)
    assert set(grads) == {"model.blocks.1.proj"}
    assert math.isfinite(float(tr.loss(params, tokens, tokens, config, ops=tr.FAST)))
    task = pretraining_task(n_symbols=config.vocab_size - 1, length=3)              # vocab 7, T = 6
    result = tr.train(params, config, task, mode="lora", lora_config=lc, steps=2, batch_size=4, threads=1)
    assert len(result.losses) == 2 and list(result.adapters) == ["model.blocks.1.proj"]


def test_family_messages_name_the_family(toy):
    config = toy
    params = tr.init_params(config, 0)
    with pytest.raises(ValueError, match=r"selects no module.*model\.blocks\.\{i\}\.\{proj\} for i in 0\.\.1"):
        tr.add_adapters(params, config, LoraConfig(r=1, alpha=1.0, target_modules=["c_attn"]), 0)
    with pytest.raises(ValueError, match=r"'model\.embed', which is not a projection of this model; projections are "
                                         r"named like 'transformer\.h\.0\.attn\.c_attn' .* or 'model\.blocks\.0\.proj'"):
        tr.merge_adapters({**params, "model.embed.weight": params["model.embed.weight"]},
                          {"model.embed": {"A": np.zeros((1, 4)), "B": np.zeros((7, 1))}}, LoraConfig(r=1, alpha=1.0))
    with pytest.raises(TypeError, match="config must be a transformer_ref.GPTConfig, transformer_ref.LlamaConfig or transformer_ref.ToyConfig, got dict"):
        tr.forward(params, np.zeros((1, 2), dtype=np.int64), {})


def test_registry_refuses_a_second_family_for_one_config(toy):
    other = hosting.Family(name="other", config_type=ToyConfig, block="b.{i}", projections={"p": lambda c: (1, 1)},
                           n_blocks=lambda c: 1, param_shapes=toy_shapes, init_params=toy_init,
                           forward=toy_forward, loss=toy_loss)
    with pytest.raises(ValueError, match="ToyConfig is already the config of family 'toy'"):
        hosting.register(other)
    assert hosting.register(TOY) is TOY                                              # the same again: fine
    with pytest.raises(ValueError, match=r"Family.block must contain '\{i\}'"):
        hosting.Family(name="x", config_type=int, block="blocks", projections={}, n_blocks=len,
                       param_shapes=toy_shapes, init_params=toy_init, forward=toy_forward, loss=toy_loss)
    assert hosting.family_of(tr.GPTConfig()).name == "gpt2" and hosting.family_of(ToyConfig()) is TOY


@pytest.mark.parametrize("make, repeats", [
    (lambda **kw: tr.GPTConfig(n_embd=8, n_head=2, n_layer=1, vocab_size=11, n_positions=8, **kw),
     r"extra must not repeat GPTConfig fields, got \['n_embd'\]"),
    (lambda **kw: tr.LlamaConfig(hidden_size=8, num_attention_heads=2, intermediate_size=16, num_hidden_layers=1,
                                 vocab_size=11, **kw),
     r"extra must not repeat LlamaConfig fields or rope settings, got \['rope_theta'\]"),
])
def test_both_families_check_their_config_the_shared_way(make, repeats):
    with pytest.raises(ValueError, match=r"initializer_range must be non-negative, got -0\.5"):
        make(initializer_range=-0.5)
    with pytest.raises(TypeError, match=r"initializer_range must be a real number, got '0\.02' \(str\)"):
        make(initializer_range="0.02")
    with pytest.raises(TypeError, match=r"extra must be a mapping of config.json keys, got list"):
        make(extra=[])
    clash = {"n_embd": 8} if "GPT" in repeats else {"rope_theta": 1.0}
    with pytest.raises(ValueError, match=repeats):
        make(extra=clash)
    extra = make(extra={"note": "kept"}).extra
    assert dict(extra) == {"note": "kept"}
    with pytest.raises(TypeError):
        extra["note"] = "changed"                        # a read-only copy


@pytest.mark.parametrize("config_type, settings", [(tr.GPTConfig, "GPT-2"), (tr.LlamaConfig, "llama")])
def test_unknown_config_keys_warn_at_the_from_dict_call(config_type, settings):
    with pytest.warns(UserWarning, match=rf"config.json keys \['mystery'\] are not {settings} settings transformer_ref "
                                         rf"knows; they are kept in {config_type.__name__}.extra") as record:
        config_type.from_dict({"mystery": 1})
    assert record[0].filename == __file__                 # the caller's line, not hosting's


def test_every_family_and_the_package_default_to_the_reference_ops():
    """Issue 10: every model family's forward and loss take ``ops`` and default to REFERENCE (the
    order of lora_ref.lora_linear); the fast op set is only ever passed explicitly."""
    registered = hosting.families()
    assert {f.name for f in registered} >= {"gpt2", "llama"}, [f.name for f in registered]
    functions = {"transformer_ref.forward": tr.forward, "transformer_ref.loss": tr.loss}
    functions.update({f"{f.name}.{job}": getattr(f, job) for f in registered for job in ("forward", "loss")})
    for where, f in functions.items():
        ops = inspect.signature(f).parameters.get("ops")
        assert ops is not None, f"{where} takes no ops argument"
        assert ops.default is REFERENCE, f"{where} defaults ops to {ops.default!r}, not transformer_ref.REFERENCE"


def test_embed_takes_the_row_without_gradient_from_the_family():
    """hosting.embed asks ``family.padding_idx(config, name)`` for the lookup's padding_idx, only
    when an adapter is on that table, and passes it to ops.lora_embedding; an AdapterSet with one
    adapter on the table is that adapter's lookup (no zero table built), two sum their terms."""
    from dataclasses import replace

    from lora_ref import AdapterSet
    from lora_ref.embedding import lora_embedding

    asked, seen = [], []

    def pad(config, name):
        asked.append((config, name))
        return 2

    def spy(ids, E, A, B, s, padding_idx=None):
        seen.append((bool(np.any(np.asarray(E))), padding_idx))       # the table, or the zero table
        return lora_embedding(ids, E, A, B, s, padding_idx)

    fam, config = replace(TOY, padding_idx=pad), ToyConfig()
    ops = replace(REFERENCE, lora_embedding=spy)
    params = toy_init(config)
    ids = np.array([[0, 2, 5]])
    rng = np.random.default_rng(0)
    ad = {"A": asarray(rng.standard_normal((2, 7))), "B": asarray(rng.standard_normal((4, 2)))}
    lc = LoraConfig(r=2, alpha=2.0, target_modules=["embed"], embedding_modules=["embed"])
    base = hosting.embed(ops, params, "model.embed", ids, {"model.blocks.0.proj": ad}, lc, family=fam, config=config)
    assert np.array_equal(base, REFERENCE.embedding(params["model.embed.weight"], ids)) and asked == [] == seen
    one = hosting.embed(ops, params, "model.embed", ids, {"model.embed": ad}, lc, family=fam, config=config)
    assert asked == [(config, "model.embed")] and seen == [(True, 2)]
    assert np.array_equal(one, lora_embedding(ids, params["model.embed.weight"], ad["A"], ad["B"], lc.scale_for("model.embed"), 2))
    seen.clear()
    aset = AdapterSet({"a": (lc, {"model.embed": ad}), "b": (lc, {"model.embed": ad})}, ["a"])
    hosting.embed(ops, params, "model.embed", ids, aset, family=fam, config=config)
    assert seen == [(True, 2)]                                        # one adapter: no zero table
    seen.clear()
    hosting.embed(ops, params, "model.embed", ids, aset.with_active(["a", "b"]), family=fam, config=config)
    assert seen == [(False, 2), (False, 2)]                           # two: each term on the zero table
