"""Hugging Face GPT-2 checkpoints: transformer_ref.checkpoints against transformers (PyTorch, CPU).

A random-initialised tiny ``GPT2LMHeadModel`` saved with ``save_pretrained`` must load with
``load_hf_gpt2`` and give transformers' logits; parameters written by ``save_hf_gpt2`` must load
into ``GPT2LMHeadModel.from_pretrained`` unchanged and give transformer_ref's logits.

The tolerance (how it is derived)
---------------------------------
Both sides evaluate the same formulas in a different order, so they differ by rounding only. We
count ``n``, the longest chain of roundings that feeds one logit (:func:`forward_roundings`: each
dot product of length k is k roundings, LayerNorm 2C + 7, softmax T + 3, GELU 9, ...), and bound
the difference by ``2 gamma_n M`` (``lora_ref.testing.tolerance``), where ``M = |h| |wte|^T`` is
the magnitude of the last product (h the final LayerNorm's output, taken from transformers). This
is the first-order rounding model applied to the whole network as one chain; LayerNorm rescales
relative errors rather than amplifying them, and the printed ``error/bound`` ratios show the
observed errors far below it. The main comparison is in **float64** (the torch model converted
with ``.double()``, the float32 file widened exactly by ``load_hf_gpt2(dtype="float64")``): there
a formula slip as small as 1e-12 relative would fail, whereas in float32 it could hide under
roundings. Float32 is checked too, with the same n.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import transformer_ref as tr  # noqa: E402
from lora_ref.testing import assert_within, tolerance  # noqa: E402
from transformer_ref.checkpoints import load_hf_gpt2, save_hf_gpt2  # noqa: E402

TINY = dict(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
BATCH, T = 2, 16


def forward_roundings(config: tr.GPTConfig, T: int, r: int = 0) -> int:
    """The longest chain of roundings feeding one logit of a GPT-2 forward pass on T tokens.

    C = n_embd, F = MLP width, D = head width; a LoRA branch of rank r on a projection with input
    width k is k + r + 2 roundings (x A^T, then B, then s, then the add) instead of k + 1 (+ bias).
    """
    C, F, D = config.n_embd, config.mlp_width, config.head_dim
    layer_norm = 2 * C + 7        # mean (C), centre, square + variance (C + 1), eps, sqrt, divide, gain, shift
    proj = lambda k: k + r + 2    # noqa: E731  dot of length k (+ adapter), bias
    block = (layer_norm + proj(C)                   # ln_1, c_attn
             + (D + 1) + (T + 3) + T                # q.k scaled, softmax (max, exp, sum of T, divide), P V
             + proj(C) + 1                          # c_proj, residual add
             + layer_norm + proj(C) + 9             # ln_2, c_fc, gelu_new (cube, 3 mul, 2 add, tanh)
             + proj(F) + 1)                         # mlp c_proj, residual add
    return 1 + config.n_layer * block + layer_norm + C  # wte + wpe, blocks, ln_f, logits (dot of C)


def logits_bound(config, hidden, wte, dtype, r: int = 0):
    """``2 gamma_n M``: M = |h| |wte|^T (B, T, V) in float64, n from :func:`forward_roundings`."""
    M = np.abs(np.asarray(hidden, dtype=np.float64)) @ np.abs(np.asarray(wte, dtype=np.float64)).T
    return 2.0 * tolerance(dtype, forward_roundings(config, hidden.shape[1], r)) * M


def report(what: str, ours, theirs, bound) -> None:
    ratio = assert_within(ours, theirs, bound, what=what)
    theirs = np.asarray(theirs, dtype=np.float64)
    rel = float(np.max(np.abs(np.asarray(ours, dtype=np.float64) - theirs)) / np.max(np.abs(theirs)))
    print(f"\n[hf-gpt2] {what}: max relative error {rel:.2e} (max |diff| / max |ref|), error/bound {ratio:.2e}")


def torch_logits(model, tokens):
    with torch.no_grad():
        out = model(torch.tensor(tokens), output_hidden_states=True)
    return out.logits.numpy(), out.hidden_states[-1].numpy()  # the last hidden state is after ln_f


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**TINY)).eval()
    path = tmp_path_factory.mktemp("hf") / "tiny-gpt2"
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(0, TINY["vocab_size"], size=(BATCH, T))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_loaded_checkpoint_gives_transformers_logits(hf_dir, tokens, dtype):
    config, params = load_hf_gpt2(hf_dir, dtype=dtype if dtype == "float64" else None)
    assert all(p.dtype == np.dtype(dtype) for p in params.values())
    model = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    if dtype == "float64":
        model = model.double()
    theirs, hidden = torch_logits(model, tokens)
    ours = tr.forward(params, tokens, config)
    report(f"load_hf_gpt2 logits, {dtype}", ours, theirs,
           logits_bound(config, hidden, params["transformer.wte.weight"], dtype))


def test_loader_transposes_conv1d_once(hf_dir):
    config, params = load_hf_gpt2(hf_dir)
    state = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).state_dict()
    for name, value in params.items():
        expected = state[name].numpy()
        if name.endswith(("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")):
            expected = expected.T                  # Conv1D (d_in, d_out) -> (d_out, d_in)
        assert np.array_equal(value, expected), name  # moved, not computed: bit for bit
    assert config.n_embd == TINY["n_embd"] and config.n_layer == TINY["n_layer"]


def test_saved_checkpoint_loads_in_transformers(tmp_path, tokens):
    config = tr.GPTConfig.from_dict(TINY)
    params = tr.init_params(config, seed=1, dtype="float32")
    save_hf_gpt2(tmp_path / "ours", config, params)
    model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "ours").eval()
    state = model.state_dict()
    for name, value in params.items():
        stored = state[name].numpy()
        if name.endswith(("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")):
            stored = stored.T
        assert np.array_equal(stored, value), name
    assert np.array_equal(state["lm_head.weight"].numpy(), params["transformer.wte.weight"])  # tied
    theirs, hidden = torch_logits(model.double(), tokens)
    params64 = {k: v.astype(np.float64) for k, v in params.items()}
    report("save_hf_gpt2 -> transformers logits, float64", tr.forward(params64, tokens, config), theirs,
           logits_bound(config, hidden, params64["transformer.wte.weight"], "float64"))
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["n_embd"] == TINY["n_embd"]


def test_scale_attn_by_inverse_layer_idx_is_honoured(tmp_path, tokens):
    torch.manual_seed(2)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**TINY, scale_attn_by_inverse_layer_idx=True))
    model.save_pretrained(tmp_path / "m")
    config, params = load_hf_gpt2(tmp_path / "m", dtype="float64")
    assert config.scale_attn_by_inverse_layer_idx
    theirs, hidden = torch_logits(model.double().eval(), tokens)
    report("scale_attn_by_inverse_layer_idx logits, float64", tr.forward(params, tokens, config), theirs,
           logits_bound(config, hidden, params["transformer.wte.weight"], "float64"))
