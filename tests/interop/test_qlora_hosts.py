"""QLoRA's hosts against transformers + bitsandbytes 0.50.2 + PEFT 0.21.2 on the CPU: a tiny LLaMA
and a tiny GPT-2 quantised by transformers (QLoRA's recipe: NF4, double quantisation, compute
dtype float32 or bfloat16), saved, read by ``transformer_ref.load_checkpoint`` without torch; its
projections and logits; PEFT LoRA on it (logits, adapter gradients); PEFT's merge into it.

What transformers + bitsandbytes compute (read in their source, held here)
---------------------------------------------------------------------------
* transformers quantises every nn.Linear of the blocks, and GPT-2's Conv1D too (transposed to
  (out, in) before quantising: the 4-bit weights of both families are (d_out, d_in) in the file);
  lm_head and the embeddings stay float.
* Linear4bit.forward: ``x.to(compute_dtype)``, the weight dequantised to it, the bias cast to it,
  ``F.linear``, ``.to(input dtype)``; MatMul4Bit.backward: ``grad @ W`` in the compute dtype. PEFT
  adds its float32 adapter branch on the unrounded x. lora_ref.precision.mixed_linear is that.
* On a CPU with AVX512-BF16, Linear4bit in eval mode under no_grad first repacks its weight for a
  fused kernel that computes in bfloat16 with absmax rounded to bfloat16, whatever compute_dtype
  says (the repacking also changes what save_pretrained writes: test_quant_bnb.py). Every model
  here has it switched off (``support_avx512bf16_for_cpu = False``), so the tests hold one
  computation on every CPU; :func:`test_packed_cpu_path_ignores_compute_dtype` measures the other.

Tolerances
----------
Per projection, given transformers' own input (forward hooks): both float32 sums are within
``e = gamma_32(n) M`` of the exact one (n = d_in + 1 forward, d_out backward; M the sum on absolute
values), so in float32 compute they differ by at most 2e; in bfloat16 the outputs rounded to it can
differ only where a bfloat16 rounding boundary lies within 2e of our sum. Everywhere else they must
be equal bit for bit, and where one does, by one unit in the last place at most.

End to end (logits, gradients): the first-order chain model of test_hf_gpt2.py / _llama_helpers.py.
Each side is within ``(gamma_32(n) + gamma_c(k)) M`` of the exact network: n the float32 roundings
of its longest path (``transformer_ref.bounds.logit_rounding_chain``, torch's SDPA and float32 RoPE
tables counted longer), k the roundings to the compute dtype c on it (the input and the output of
each of the 4 projections a block puts on the path: 8 per block; 0 in float32), ``M = |h| |head|^T``
with h the final norm's output (from transformers). Gradients: forward and backward chains
(twice each), relative to the largest entry. Run with ``pytest -s`` for the measured errors.
"""

from __future__ import annotations

import math

import autograd
import numpy as np
import pytest

torch = pytest.importorskip("torch")
bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import transformer_ref as tr  # noqa: E402
from lora_ref import LoraConfig, quant as q  # noqa: E402
from lora_ref.precision import round_to  # noqa: E402
from lora_ref.testing import assert_within, tolerance  # noqa: E402
from transformer_ref.bounds import logit_rounding_chain  # noqa: E402

pytestmark = pytest.mark.interop

BATCH, T, V = 2, 16, 96
COMPUTE = ["float32", "bfloat16"]
FAMILIES = {
    "llama": ("LlamaConfig", dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                  rope_theta=10000.0, attn_implementation="sdpa"), ["q_proj", "v_proj", "down_proj"]),
    "gpt2": ("GPT2Config", dict(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=32, resid_pdrop=0.0,
                                embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                                attn_implementation="sdpa"), ["c_attn", "mlp.c_proj"]),
}
CASES = [(f, c) for f in FAMILIES for c in COMPUTE]


@pytest.fixture(autouse=True)
def no_torch_compile():
    with torch._dynamo.config.patch(disable=True):     # bitsandbytes' torch kernels, run eagerly
        yield


def unpacked(model):
    """Linear4bit's documented computation on every CPU: no AVX512-BF16 repacking (module doc)."""
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    return model


def recipe(compute: str):
    return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                           bnb_4bit_use_double_quant=True,
                                           bnb_4bit_compute_dtype=getattr(torch, compute))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> float checkpoint with every weight random (0.3 N(0, 1), norm gains 1 + that, so
    logits are of order 10); (family, compute) -> (4-bit checkpoint, transformers' 4-bit model)."""
    root, out = tmp_path_factory.mktemp("qlora"), {}
    for family, (config_class, sizes, _) in FAMILIES.items():
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, config_class)(**sizes))
        with torch.no_grad():
            for name, p in model.named_parameters():
                gain = 1.0 if ("norm" in name or ".ln_" in name) and name.endswith("weight") else 0.0
                p.copy_(torch.randn_like(p) * 0.3 + gain)
        model.save_pretrained(root / family)
        out[family] = root / family
        for compute in COMPUTE:
            quantised = transformers.AutoModelForCausalLM.from_pretrained(root / family, quantization_config=recipe(compute),
                                                                          device_map="cpu")
            quantised.save_pretrained(root / f"{family}-{compute}")
            out[family, compute] = root / f"{family}-{compute}", unpacked(quantised.eval())
    return out


@pytest.fixture(scope="module")
def tokens():
    rng = np.random.default_rng(0)
    return rng.integers(0, V, (BATCH, T)), rng.integers(0, V, (BATCH, T))


def report(what: str, ours, theirs, bound) -> float:
    ratio = assert_within(ours, theirs, bound, what=what)
    err = float(np.max(np.abs(np.asarray(ours, np.float64) - np.asarray(theirs, np.float64))))
    print(f"\n[qlora] {what}: max |diff| {err:.2e} (max |theirs| {float(np.max(np.abs(theirs))):.3g}), "
          f"error/bound {ratio:.2e}")
    return err


def agree(ours, theirs, pre, e, compute: str, what: str) -> None:
    """Outputs rounded to ``compute`` from float32 sums within e of the exact one (ours ``pre``):
    equal wherever no rounding boundary lies within 2 e of ``pre``, else at most one unit apart."""
    if compute == "float32":
        assert_within(ours, theirs, 2 * e, what=what)
        return
    f32 = np.float32
    lo = round_to(np.nextafter((pre - 2 * e).astype(f32), f32(-np.inf)), compute)
    hi = round_to(np.nextafter((pre + 2 * e).astype(f32), f32(np.inf)), compute)
    near = lo != hi
    assert np.array_equal(ours[~near], theirs[~near]), what
    assert np.all(np.abs(ours[near] - theirs[near]) <= hi[near] - lo[near]), what
    print(f"\n[qlora] {what}: {int(np.sum(ours == theirs))} of {ours.size} bit for bit, {int(near.sum())} near "
          f"a {compute} rounding boundary")


def chains(config, r: int, loss: bool = False) -> tuple[int, int, int]:
    """(ours, torch's) float32 roundings of the longest path; bfloat16 roundings on it (8 per block)."""
    L = config.num_hidden_layers if isinstance(config, tr.LlamaConfig) else config.n_layer
    n = logit_rounding_chain(config, r, T=T, loss_batch=BATCH * T if loss else None)
    rope = 2 * L * ((T - 1) * (math.ceil(math.log(config.rope_theta)) + 4) + 2) if isinstance(config, tr.LlamaConfig) else 0
    return n + 2 * L, n + L * (4 * T + 5) + rope, 8 * L


def logits_bound(config, compute: str, M, r: int = 0):
    n_ours, n_torch, k = chains(config, r)
    return (tolerance("float32", n_ours) + tolerance("float32", n_torch)
            + (2 * tolerance(compute, k) if compute != "float32" else 0.0)) * M


def head_magnitude(model, tokens, params, config):
    """M = |h| |head|^T (B, T, V): h the final norm's output, from transformers."""
    with torch.no_grad():
        h = model(torch.tensor(tokens), output_hidden_states=True).hidden_states[-1].float().numpy()
    head = params["lm_head.weight" if "lm_head.weight" in params else
                  ("transformer.wte.weight" if "transformer.wte.weight" in params else "model.embed_tokens.weight")]
    return np.abs(h.astype(np.float64)) @ np.abs(np.asarray(head, np.float64)).T


# ------------------------------------------------------------------ torch's CPU GEMM in 16 bits


@pytest.mark.parametrize("compute", ["bfloat16", "float16"])
@pytest.mark.parametrize("shape", [(32, 64), (2, 16, 64), (3, 256)])
def test_torch_cpu_linear_rounds_once(compute, shape):
    """torch's F.linear on 16-bit CPU tensors is lora_ref.precision.narrow_linear's arithmetic:
    exact products, float32 sums, the bias added before the one rounding of the output."""
    rng = np.random.default_rng(len(shape))
    x, W, b = (rng.standard_normal(s).astype(np.float32) for s in (shape, (96, shape[-1]), (96,)))
    xc, Wc, bc = (round_to(t, compute) for t in (x, W, b))
    c = getattr(torch, compute)
    theirs = torch.nn.functional.linear(*(torch.from_numpy(t).to(c) for t in (xc, Wc, bc))).float().numpy()
    pre = xc @ Wc.T + bc
    M = np.abs(xc.astype(np.float64)) @ np.abs(Wc.astype(np.float64)).T + np.abs(bc)
    agree(round_to(pre, compute), theirs, pre, tolerance("float32", shape[-1] + 1) * M, compute,
          f"torch F.linear in {compute} on {shape}")


# ------------------------------------------------------------------ the checkpoint, read without torch


@pytest.mark.parametrize("family,compute", CASES)
def test_checkpoint_reads_as_quant_states(saved, family, compute):
    path, model = saved[family, compute]
    config, params = tr.load_checkpoint(path)
    names = [n + ".weight" for n in tr.projection_names(config)]
    assert sorted(k for k, v in params.items() if isinstance(v, q.QuantState)) == sorted(names)
    for name in names:
        state = params[name]
        assert (state.quant_type, state.nested, state.compute_dtype, state.shape) == \
            ("nf4", True, compute, tr.param_shapes(config)[name])
        weight = model.get_submodule(name.removesuffix(".weight")).weight
        theirs = bnb.functional.dequantize_4bit(weight.data, weight.quant_state).numpy()
        assert q.dequantize_4bit(state).tobytes() == theirs.tobytes(), name      # GPT-2 Conv1D: no transpose


# ------------------------------------------------------------------ each projection, given transformers' input


@pytest.mark.parametrize("family,compute", CASES)
def test_projections_forward_and_backward(saved, tokens, family, compute):
    path, model = saved[family, compute]
    config, params = tr.load_checkpoint(path)
    seen, hooks = {}, []
    for name in tr.projection_names(config):
        module = model.get_submodule(name)
        hooks.append(module.register_forward_hook(lambda m, i, o, n=name: seen.update({n: (m, i[0].detach())}) and None))
    with torch.no_grad():
        model(torch.tensor(tokens[0]))
    for h in hooks:
        h.remove()
    rng = np.random.default_rng(1)
    for name, (module, x) in seen.items():
        x = x.float().numpy()
        state, b = params[name + ".weight"], params.get(name + ".bias")
        xt = torch.tensor(x, requires_grad=True)
        y = module(xt)                                                  # MatMul4Bit, as in training
        g = rng.standard_normal(tuple(y.shape)).astype(np.float32)
        y.backward(torch.tensor(g))
        vjp, ours = autograd.make_vjp(lambda x_: q.linear_4bit(x_, state, bias=b))(x)
        W = q.dequantize_4bit(state)
        xc, Wc = round_to(x, compute), round_to(W, compute)
        pre = xc @ Wc.T + (0.0 if b is None else round_to(b, compute))          # our sum before rounding
        assert ours.tobytes() == round_to(pre, compute).tobytes()
        M = np.abs(xc.astype(np.float64)) @ np.abs(Wc.astype(np.float64)).T + (0.0 if b is None else np.abs(b))
        agree(ours, y.detach().float().numpy(), pre, tolerance("float32", W.shape[1] + 1) * M, compute,
              f"{family} {compute} {name} forward")
        gc = round_to(g, compute)
        pre = gc @ Wc
        Mg = np.abs(gc.astype(np.float64)) @ np.abs(Wc.astype(np.float64))
        agree(vjp(g), xt.grad.numpy(), pre, tolerance("float32", W.shape[0]) * Mg, compute,
              f"{family} {compute} {name} dL/dx")


# ------------------------------------------------------------------ the whole model


@pytest.mark.parametrize("family,compute", CASES)
def test_logits_equal_transformers(saved, tokens, family, compute):
    path, model = saved[family, compute]
    config, params = tr.load_checkpoint(path)
    with torch.no_grad():
        theirs = model(torch.tensor(tokens[0])).logits.float().numpy()
    ours = tr.forward(params, tokens[0], config)
    bound = logits_bound(config, compute, head_magnitude(model, tokens[0], params, config))
    report(f"{family}, compute {compute}: logits of the 4-bit checkpoint", ours, theirs, bound)
    _, float_params = tr.load_checkpoint(saved[family])
    assert np.max(np.abs(tr.forward(float_params, tokens[0], config) - theirs)) > np.max(bound)   # 4 bits matter


def test_packed_cpu_path_ignores_compute_dtype(saved, tokens):
    """bitsandbytes' AVX512-BF16 inference path (eval, no_grad) computes in bfloat16 with absmax in
    bfloat16 even for compute_dtype=float32: its logits leave the float32 computation's bound."""
    if not bnb.functional.has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never takes the packed path")
    path, documented = saved["llama", "float32"]
    model = transformers.AutoModelForCausalLM.from_pretrained(path, device_map="cpu").eval()
    config, params = tr.load_checkpoint(path)
    with torch.no_grad():
        theirs = model(torch.tensor(tokens[0])).logits.float().numpy()
    ours = tr.forward(params, tokens[0], config)
    bound = logits_bound(config, "float32", head_magnitude(documented, tokens[0], params, config))
    err = float(np.max(np.abs(ours - theirs)))
    print(f"\n[qlora] llama, compute float32, bitsandbytes' packed CPU path: max |diff| {err:.3g} "
          f"(max |logit| {float(np.max(np.abs(theirs))):.3g}), {err / float(np.max(bound)):.3g} x the float32 bound")
    assert err > np.max(bound)


# ------------------------------------------------------------------ PEFT LoRA on the 4-bit model


def peft_model(saved, family, compute, seed=2):
    path, _ = saved[family, compute]
    base = unpacked(transformers.AutoModelForCausalLM.from_pretrained(path, device_map="cpu"))
    targets = FAMILIES[family][2]
    torch.manual_seed(seed)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0,
                                                      init_lora_weights=False)).eval()
    adapters = {}
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
        if "lora_" in n:                                    # base_model.model.<module>.lora_A.default.weight
            module, factor = n.removeprefix("base_model.model.").split(".lora_")
            adapters.setdefault(module, {})[factor[0]] = p.detach().numpy().copy()
    return model, adapters, LoraConfig(r=4, alpha=8.0, target_modules=targets)


@pytest.mark.parametrize("family,compute", CASES)
def test_peft_lora_logits_and_gradients(saved, tokens, family, compute):
    model, adapters, lc = peft_model(saved, family, compute)
    config, params = tr.load_checkpoint(saved[family, compute][0])
    inputs, targets = tokens
    logits = model(torch.tensor(inputs)).logits
    ours = tr.forward(params, inputs, config, adapters, lc)
    bound = logits_bound(config, compute, head_magnitude(model, inputs, params, config), r=4)
    report(f"{family}, compute {compute}: PEFT LoRA logits", ours, logits.detach().numpy(), bound)
    assert np.max(np.abs(ours - tr.forward(params, inputs, config))) > np.max(bound)       # the adapters matter
    torch.nn.functional.cross_entropy(logits.reshape(-1, V), torch.tensor(targets).reshape(-1)).backward()
    grads = autograd.grad(lambda ad: tr.loss(params, inputs, targets, config, ad, lc))(adapters)
    n_ours, n_torch, k = chains(config, 4, loss=True)
    rel = 2 * (tolerance("float32", 2 * n_ours) + tolerance("float32", 2 * n_torch)
               + (2 * tolerance(compute, 2 * k) if compute != "float32" else 0.0))
    worst = 0.0
    for n, p in model.named_parameters():
        if "lora_" in n:
            module, factor = n.removeprefix("base_model.model.").split(".lora_")
            theirs = p.grad.numpy()
            worst = max(worst, assert_within(grads[module][factor[0]], theirs, rel * np.abs(theirs).max(),
                                             what=f"dL/d{factor[0]} of {module}"))
    diff = max(float(np.abs(grads[m][f[0]] - p.grad.numpy()).max() / np.abs(p.grad.numpy()).max())
               for n, p in model.named_parameters() if "lora_" in n
               for m, f in [n.removeprefix("base_model.model.").split(".lora_")])
    print(f"\n[qlora] {family}, compute {compute}: PEFT adapter gradients, max |diff| / max |grad| {diff:.2e}, "
          f"worst error/bound {worst:.2e}")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_peft_merge_into_4bit_equals_lora_ref(saved, tokens, family):
    """PEFT's merge_and_unload on the 4-bit model (dequantise, add s B A, requantise) and
    transformer_ref.merge_adapters agree bit for bit. The factors are multiples of 1/64 with small
    numerators, so B @ A is exact in float32 whatever the summation order; the double-quantisation
    offset is torch's float32 mean, which may differ from lora-ref's correctly rounded one by an ulp."""
    model, adapters, lc = peft_model(saved, family, "float32")
    rng = np.random.default_rng(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                module, factor = n.removeprefix("base_model.model.").split(".lora_")
                value = (rng.integers(-8, 9, tuple(p.shape)) / 64).astype(np.float32)
                p.copy_(torch.from_numpy(value))
                adapters[module][factor[0]] = value
    config, params = tr.load_checkpoint(saved[family, "float32"][0])
    ours = tr.merge_adapters(params, adapters, lc)
    with pytest.warns(UserWarning, match="rounding errors"):
        merged = model.merge_and_unload()
    same_offset = 0
    for module in adapters:
        weight = merged.get_submodule(module).weight
        tensors = {k: v.numpy() for k, v in weight.quant_state.as_dict(packed=True).items()}
        theirs = q.QuantState.from_bnb_tensors({"weight": weight.data.numpy(), **tensors}, compute_dtype="float32")
        mine = ours[module + ".weight"]
        if mine.nested_offset != theirs.nested_offset:            # torch's mean: requantise with it
            W = q.dequantize_4bit(params[module + ".weight"]) + (adapters[module]["B"] @ adapters[module]["A"]) * 2
            codes, nested, off = q.double_quantize(q.quantize_4bit(W).absmax, offset=theirs.nested_offset)
            mine = q.QuantState(**{**vars(q.quantize_4bit(W)), "absmax": codes, "nested_absmax": nested,
                                   "nested_quant_map": q.dynamic_map(), "nested_offset": off, "nested_blocksize": 256,
                                   "nested_dtype": "float32", "compute_dtype": "float32"})
        else:
            same_offset += 1
        assert mine == theirs, module
    with torch.no_grad():
        theirs = unpacked(merged)(torch.tensor(tokens[0])).logits.numpy()
    report(f"{family}: PEFT-merged 4-bit model vs merge_adapters' ({same_offset} of {len(adapters)} offsets equal)",
           tr.forward(ours, tokens[0], config), theirs,
           logits_bound(config, "float32", head_magnitude(merged, tokens[0], ours, config)))
