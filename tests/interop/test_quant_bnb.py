"""lora_ref.quant against bitsandbytes 0.50.2 on the CPU, bit for bit; a transformers 4-bit
checkpoint read without torch; PEFT's 4-bit merge; bitsandbytes' CPU bugs written down; torchao's
NF4 and how its conventions differ.

What is compared, every bit (``tobytes`` equality, so -0.0 != 0.0):

* the levels: ``create_normal_map`` / ``get_4bit_type`` / ``create_dynamic_map``;
* ``quantize_4bit``: packed bytes and absmax over many shapes (blocks spanning rows, partial last
  blocks, odd counts), every block size bitsandbytes allows, NF4 and FP4, float32 / float16 /
  bfloat16 input; with double quantisation the 8-bit codes and nested absmax, given
  bitsandbytes' offset. The offset itself is torch's float32 ``mean`` (its summation order
  follows the CPU's vector width and thread count); lora-ref takes the correctly rounded mean.
  They are counted equal or not, and always within the bound of any float32 summation;
* ``dequantize_4bit``: against bitsandbytes' pure-torch path everywhere, and against its native
  CPU kernel wherever that kernel is right (see ``test_bnb_native_dequantize_bug``). FP4's code 8
  is +0.0 in bitsandbytes' Python tables and AVX-512 kernel but -0.0 in its scalar C++ table, so
  against the native kernel FP4 zeros are compared by value (-0.0 == 0.0).

Run with ``pytest -s`` to see the counts of tensors and bytes compared.
"""

from __future__ import annotations

import dataclasses
import json
import math

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
bnb = pytest.importorskip("bitsandbytes")
F = pytest.importorskip("bitsandbytes.functional")

from lora_ref import quant as q  # noqa: E402
from lora_ref.testing import tolerance  # noqa: E402

pytestmark = pytest.mark.interop

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SHAPES = [(1,), (7,), (33,), (2, 48), (3, 5), (4, 32), (3, 96), (5, 33), (16, 64), (8, 100), (64, 64),
          (17, 130), (96, 224), (300, 70), (1, 4097)]


@pytest.fixture(autouse=True)
def no_torch_compile():
    """bitsandbytes wraps its pure-torch kernels in torch.compile; run them eagerly here."""
    with torch._dynamo.config.patch(disable=True):
        yield


def bits(a) -> bytes:
    a = a.detach().cpu() if isinstance(a, torch.Tensor) else a
    if isinstance(a, torch.Tensor):
        a = a.view(torch.int16).numpy() if a.dtype == torch.bfloat16 else a.numpy()
    elif a.dtype == ml_dtypes.bfloat16:
        a = a.view(np.int16)
    return np.ascontiguousarray(a).tobytes()


def to_torch(W: np.ndarray) -> "torch.Tensor":
    if W.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(W.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(W.copy())


def weight(shape, dtype: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    W = (rng.standard_normal(shape) * 10.0 ** rng.uniform(-3, 1)).astype(np.float32)
    return W.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)


def bnb_tensors(packed, state) -> dict[str, np.ndarray]:
    """bitsandbytes' serialized form of a weight, as NumPy arrays (what safetensors would hold)."""
    out = {k: v.numpy() for k, v in state.as_dict(packed=True).items()}
    out["weight"] = packed.numpy()
    return out


def ours_with_offset(W, blocksize, quant_type, double_quant, offset) -> q.QuantState:
    """lora-ref's state, its double quantisation done with the given (bitsandbytes') offset."""
    s = q.quantize_4bit(W, blocksize, quant_type, False)
    if not double_quant:
        return s
    codes, nested, off = q.double_quantize(s.absmax, offset=offset)
    return dataclasses.replace(s, absmax=codes, nested_absmax=nested, nested_quant_map=q.dynamic_map(),
                               nested_offset=off, nested_blocksize=256, nested_dtype="float32")


def native_is_wrong(shape, blocksize) -> bool:
    """Where bitsandbytes' AVX-512 CPU dequantise kernel indexes absmax as (rows, n / blocksize):
    last dim n even, a multiple of 16, blocksize < 2048, more than one row, blocks not row-aligned."""
    from bitsandbytes.backends.cpu import ops as cpu_ops
    n, rows = shape[-1], math.prod(shape[:-1])
    return (cpu_ops._has_avx512 and n % 2 == 0 and n % 16 == 0 and blocksize < 2048 and rows > 1
            and n % blocksize != 0)


def bnb_torch_dequantize(packed, state, dtype):
    """bitsandbytes' pure-torch dequantise (backends/default), nested absmax resolved as it does."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    absmax = state.absmax
    if state.nested:
        absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    code = F.get_4bit_type(state.quant_type, device="cpu")
    return _dequantize_4bit_compute.__wrapped__(packed.reshape(-1), absmax, code, state.blocksize,
                                                state.shape, dtype)


# ------------------------------------------------------------------ the levels


def test_levels_equal_bitsandbytes():
    assert bits(q.nf4_levels()) == bits(F.get_4bit_type("nf4", device="cpu"))
    normal = F.create_normal_map()                                 # 256 entries, the 16 levels at the ends
    assert bits(q.nf4_levels()) == bits(torch.cat([normal[:7], normal[-9:]]))
    assert bits(q.fp4_levels()) == bits(F.get_4bit_type("fp4", device="cpu"))
    assert bits(q.dynamic_map()) == bits(F.create_dynamic_map())


# ------------------------------------------------------------------ quantize_4bit, bit for bit


def test_quantize_4bit_bit_for_bit():
    tensors = nbytes = nested = same_offset = 0
    for i, shape in enumerate(SHAPES):
        for dtype in TORCH_DTYPES:
            for blocksize in q.BLOCKSIZES:
                for quant_type in q.QUANT_TYPES:
                    for dq in (False, True):
                        W = weight(shape, dtype, seed=i)
                        packed, state = F.quantize_4bit(to_torch(W), blocksize=blocksize,
                                                        compress_statistics=dq, quant_type=quant_type)
                        theirs = bnb_tensors(packed, state)
                        offset = float(state.offset) if dq else None
                        ours = ours_with_offset(W, blocksize, quant_type, dq, offset)
                        mine = ours.to_bnb_tensors()
                        assert mine.keys() == theirs.keys()
                        for key in mine:                           # packed bytes, absmax, maps, JSON
                            assert bits(mine[key]) == bits(theirs[key]), (shape, dtype, blocksize, quant_type, dq, key)
                            nbytes += mine[key].nbytes
                        assert q.QuantState.from_bnb_tensors(theirs) == ours
                        tensors += 1
                        if dq:
                            nested += 1
                            own = q.quantize_4bit(W, blocksize, quant_type, True).nested_offset
                            mean = float(np.mean(q.quantize_4bit(W, blocksize, quant_type).absmax, dtype=np.float64))
                            nb = ours.absmax.size
                            assert abs(own - offset) <= 2 * tolerance("float32", nb + 1) * mean
                            same_offset += own == offset
    print(f"\nquantize_4bit: {tensors} tensors, {nbytes} bytes equal to bitsandbytes; {nested} double-"
          f"quantised, whose own offset (the correctly rounded mean) equals torch's mean in {same_offset}")
    assert tensors == len(SHAPES) * 3 * len(q.BLOCKSIZES) * 2 * 2


# ------------------------------------------------------------------ dequantize_4bit, bit for bit


def test_dequantize_4bit_bit_for_bit():
    checked = native_checked = values = 0
    for i, shape in enumerate(SHAPES):
        for blocksize in q.BLOCKSIZES:
            for quant_type in q.QUANT_TYPES:
                for dq in (False, True):
                    W = weight(shape, "float32", seed=100 + i)
                    packed, state = F.quantize_4bit(to_torch(W), blocksize=blocksize,
                                                    compress_statistics=dq, quant_type=quant_type)
                    ours = q.QuantState.from_bnb_tensors(bnb_tensors(packed, state))
                    for dtype, tdtype in TORCH_DTYPES.items():
                        mine = q.dequantize_4bit(ours, dtype)
                        assert bits(mine) == bits(bnb_torch_dequantize(packed, state, tdtype))
                        checked += 1
                        values += mine.size
                        if not native_is_wrong(shape, blocksize):
                            state.dtype = tdtype
                            native = F.dequantize_4bit(packed, state)
                            if quant_type == "fp4":               # its scalar kernel's code 8 is -0.0
                                native, mine = native + 0.0, mine + mine.dtype.type(0.0)
                            assert bits(mine) == bits(native), (shape, blocksize, dtype)
                            native_checked += 1
    print(f"\ndequantize_4bit: {checked} outputs ({values} values) equal to bitsandbytes' torch path; "
          f"{native_checked} also equal to its native CPU kernel")


def test_bnb_native_dequantize_bug():
    """bitsandbytes 0.50.2's AVX-512 CPU dequantise kernel reads absmax[row * (n // blocksize) +
    col // blocksize], which is right only when every row starts a block. For (2, 48) at block 64
    the second row's values 64..95 (block 1) are scaled by block 0's absmax. Its pure-torch path,
    and lora-ref, scale them by block 1's. Real weights whose in_features is a multiple of the
    block size are not affected. (Fails, as it should, once bitsandbytes is fixed.)"""
    if not native_is_wrong((2, 48), 64):
        pytest.skip("this CPU does not take bitsandbytes' AVX-512 dequantise path")
    W = np.arange(1, 97, dtype=np.float32).reshape(2, 48)         # block 0 absmax 64, block 1 absmax 96
    packed, state = F.quantize_4bit(to_torch(W), blocksize=64, quant_type="nf4")
    ours = q.dequantize_4bit(q.QuantState.from_bnb_tensors(bnb_tensors(packed, state)))
    native = F.dequantize_4bit(packed, state).numpy()
    assert bits(ours) == bits(bnb_torch_dequantize(packed, state, torch.float32))
    assert np.array_equal(native[0], ours[0]) and np.array_equal(native[1, :16], ours[1, :16])
    assert np.allclose(native[1, 16:] / ours[1, 16:], 64 / 96)     # block 1 scaled by block 0's absmax


# ------------------------------------------------------------------ a transformers 4-bit checkpoint


@pytest.fixture(scope="module")
def llama_4bit(tmp_path_factory):
    """A tiny LLaMA quantised by transformers + bitsandbytes on the CPU (QLoRA's recipe: NF4,
    double quantisation) and saved; in_features 64 and 128, multiples of the block."""
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("llama4bit")
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(root / "float")
    recipe = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(root / "float", quantization_config=recipe, device_map="cpu")
    model.save_pretrained(root / "4bit")
    return root, model


def states_from_file(tensors: dict[str, np.ndarray]) -> dict[str, q.QuantState]:
    """What a torch-free reader does: every key ``P.weight.quant_state.bitsandbytes__<type>`` marks
    a 4-bit module P; its tensors are ``P.weight`` and ``P.weight.<field>``."""
    out = {}
    for key in tensors:
        if ".weight.quant_state.bitsandbytes__" in key:
            prefix = key.split(".quant_state.")[0]                 # "model.layers.0.self_attn.q_proj.weight"
            mine = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
            out[prefix] = q.QuantState.from_bnb_tensors({"weight": tensors[prefix], **mine})
    return out


def test_transformers_4bit_checkpoint_read_without_torch(llama_4bit):
    from safetensors.numpy import load_file
    root, model = llama_4bit
    saved = load_file(root / "4bit" / "model.safetensors")         # NumPy only from here on
    original = load_file(root / "float" / "model.safetensors")
    states = states_from_file(saved)
    projections = [f"model.layers.{i}.{m}.weight" for i in range(2) for m in
                   ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    assert sorted(states) == sorted(projections)                 # lm_head and embeddings stay float
    for key in ("lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"):
        assert saved[key].dtype == np.float32
    suffixes = {k[len(p):] for p in projections for k in saved if k.startswith(p)}
    assert suffixes == {"", ".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map",
                        ".quant_state.bitsandbytes__nf4"}
    for name, state in states.items():
        meta = json.loads(saved[name + ".quant_state.bitsandbytes__nf4"].tobytes())
        assert list(meta) == ["quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype",
                              "nested_offset"]
        assert (meta["quant_type"], meta["blocksize"], meta["dtype"], meta["nested_blocksize"]) == ("nf4", 64, "float32", 256)
        assert saved[name].shape == (math.prod(state.shape) // 2, 1) and saved[name + ".absmax"].dtype == np.uint8
        module = model.get_submodule(name[: -len(".weight")])
        theirs = F.dequantize_4bit(module.weight.data, module.weight.quant_state)
        assert bits(q.dequantize_4bit(state)) == bits(theirs)    # transformers' dequantised weight
        again = ours_with_offset(original[name], 64, "nf4", True, state.nested_offset)
        assert again == state                                    # and the file, from the float weight
    config = json.loads((root / "4bit" / "config.json").read_text())["quantization_config"]
    assert {k: config[k] for k in ("quant_method", "load_in_4bit", "bnb_4bit_quant_type",
                                   "bnb_4bit_use_double_quant", "bnb_4bit_quant_storage")} == {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True, "bnb_4bit_quant_storage": "uint8"}


# ------------------------------------------------------------------ bitsandbytes' CPU inference bugs


def linear_4bit(d_in: int, d_out: int, double_quant: bool):
    torch.manual_seed(1)
    return bnb.nn.Linear4bit(d_in, d_out, bias=False, compute_dtype=torch.float32,
                             compress_statistics=double_quant, quant_type="nf4").to("cpu")


def needs_avx512bf16():
    if not F.has_avx512bf16():
        pytest.skip("bitsandbytes repacks 4-bit weights for inference only on CPUs with AVX512-BF16")


def test_bnb_cpu_inference_fails_when_in_features_is_not_a_multiple_of_the_block():
    """On an AVX512-BF16 CPU, Linear4bit.forward in eval mode without grad repacks the weight and
    reshapes absmax to (out, in / blocksize): a RuntimeError when in_features % blocksize != 0.
    (Training mode, or a CPU without AVX512-BF16, takes the dequantise path and works.)"""
    needs_avx512bf16()
    layer = linear_4bit(96, 64, False).eval()
    with torch.no_grad(), pytest.raises(RuntimeError, match="invalid for input of size 96"):
        layer(torch.ones(2, 96))


def test_bnb_cpu_inference_then_save_changes_the_constants():
    """The same repacking casts absmax to bfloat16; saving afterwards undoes the packing but
    re-quantises the rounded absmax, so a model saved after one eval forward is not the model
    that was loaded: the 4-bit codes are kept, the constants and dequantised weights move."""
    needs_avx512bf16()
    layer = linear_4bit(64, 64, True).eval()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with torch.no_grad():
        layer(torch.ones(2, 64))
    after = layer.state_dict()
    changed = sorted(k for k in before if bits(before[k]) != bits(after[k]))
    assert changed == ["weight.absmax", "weight.nested_absmax", "weight.quant_state.bitsandbytes__nf4"]
    load = lambda sd: q.QuantState.from_bnb_tensors({k[len("weight."):] if k != "weight" else k: v.numpy()  # noqa: E731
                                                     for k, v in sd.items()})
    moved = np.abs(q.dequantize_4bit(load(after), "float64") - q.dequantize_4bit(load(before), "float64"))
    assert moved.max() > 0


# ------------------------------------------------------------------ PEFT's merge into a 4-bit base


@pytest.mark.parametrize("double_quant", [False, True])
def test_merge_4bit_equals_peft(double_quant):
    """PEFT's Linear4bit.merge (dequantise, add s B A, requantise) and merge_4bit agree bit for
    bit. A and B are multiples of 1/64 with small numerators, so B @ A is exact in float32 and
    the two sides cannot differ by BLAS summation order."""
    peft = pytest.importorskip("peft")

    class Host(torch.nn.Module):
        is_loaded_in_4bit = True                                   # PEFT dispatches to its bnb layer on this

        def __init__(self):
            super().__init__()
            self.proj = linear_4bit(128, 32, double_quant)

        def forward(self, x):
            return self.proj(x)

    host = Host()
    base = q.QuantState.from_bnb_tensors(bnb_tensors(host.proj.weight.data, host.proj.weight.quant_state))
    model = peft.get_peft_model(host, peft.LoraConfig(target_modules=["proj"], r=4, lora_alpha=8,
                                                      init_lora_weights=False))
    layer = model.base_model.model.proj
    rng = np.random.default_rng(0)
    A = (rng.integers(-8, 9, (4, 128)) / 64).astype(np.float32)
    B = (rng.integers(-8, 9, (32, 4)) / 64).astype(np.float32)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(torch.from_numpy(A))
        layer.lora_B["default"].weight.copy_(torch.from_numpy(B))
    with pytest.warns(UserWarning, match="rounding errors"):
        layer.merge()
    merged = layer.base_layer.weight
    theirs = q.QuantState.from_bnb_tensors(bnb_tensors(merged.data, merged.quant_state))
    ours = q.merge_4bit(base, A, B, 8 / 4)
    assert bits(ours.weight) == bits(theirs.weight)
    if double_quant and ours.nested_offset != theirs.nested_offset:   # torch's mean vs the exact one
        ours = ours_with_offset(q.dequantize_4bit(base) + (B @ A) * np.float32(2.0), 64, "nf4", True,
                                theirs.nested_offset)
    assert ours == theirs


# ------------------------------------------------------------------ torchao's NF4


def test_torchao_nf4_conventions():
    """torchao's NF4Tensor (0.18): the same blocks, absmax, packing (first value high) and mean-
    subtracted double quantisation in blocks of 256, but (1) its NF4 table has 4 decimals
    (-0.6962 for -0.6961928), (2) values are divided by absmax, (3) the absmax vector is quantised
    linearly to int8 (round(d * 128 / max|d|), clamped to [-128, 127]) with one float factor per
    256-block, not with bitsandbytes' dynamic map, (4) it computes in the weight's dtype, and (5)
    it refuses sizes that are not a multiple of the block or whose block count is not a multiple
    of 256. So its 4-bit codes mostly agree with bitsandbytes' and its state does not."""
    pytest.importorskip("torchao")
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4
    rng = np.random.default_rng(0)
    W = (rng.standard_normal((128, 512)) * 0.02).astype(np.float32)   # 1024 blocks: 4 of 256
    theirs = to_nf4(torch.from_numpy(W), 64, 256)
    ours = q.quantize_4bit(W, 64, "nf4", True)

    def unpack(b):
        c = np.empty(2 * b.size, np.uint8)
        c[0::2], c[1::2] = b >> 4, b & 0x0F
        return c

    codes_ao, codes = unpack(theirs.quantized_data.numpy()), unpack(ours.weight)
    differ = int(np.sum(codes_ao != codes))
    # a code can differ only where the value lies between bitsandbytes' and torchao's midpoint
    table = np.array([-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0, 0.0796, 0.1609,
                      0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0], dtype=np.float32)
    scaled = (W.reshape(-1, 64) / q.quantize_4bit(W, 64).absmax[:, None]).reshape(-1)
    mids = lambda t: (t[:-1] + t[1:]) / 2                                    # noqa: E731
    between = np.any((scaled[:, None] - mids(table)) * (scaled[:, None] - mids(q.nf4_levels())) <= 0, axis=1)
    assert 0 < differ <= int(np.sum(between)) and np.all(codes_ao[~between] == codes[~between])
    assert theirs.quantized_scalers.dtype == torch.int8 and theirs.quantization_factor.shape == (4,)
    with pytest.raises(AssertionError, match="divisible"):
        to_nf4(torch.ones(2, 48), 64, 256)
    with pytest.raises(AssertionError, match="divisible"):
        to_nf4(torch.ones(64, 64), 64, 256)
    err_ao = np.abs(theirs.get_original_weight().numpy() - W).max()
    err = np.abs(q.dequantize_4bit(ours) - W).max()
    print(f"\ntorchao NF4: {differ} of {codes.size} codes differ from bitsandbytes'; max |error| "
          f"torchao {err_ao:.3g}, bitsandbytes/lora-ref {err:.3g}")


# ------------------------------------------------------------------ PEFT's bfloat16 merge/unmerge drift


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_peft_merge_unmerge_drift_is_lora_ref_precision_peft_way(dtype):
    """PEFT's merge / unmerge on a 16-bit nn.Linear with float32 adapters (PEFT's default
    autocast), 60 cycles, equals lora_ref.precision's "PEFT" way bit for bit at every cycle.
    A and B are multiples of 1/64 with small numerators, so B @ A is exact in float32 and BLAS
    order cannot differ; W is random."""
    peft = pytest.importorskip("peft")
    from lora_ref import precision

    torch.manual_seed(0)
    host = torch.nn.Sequential(torch.nn.Linear(64, 48, bias=False)).to(TORCH_DTYPES[dtype])
    model = peft.get_peft_model(host, peft.LoraConfig(target_modules=["0"], r=4, lora_alpha=8,
                                                      init_lora_weights=False))
    layer = model.base_model.model[0]
    assert layer.lora_A["default"].weight.dtype == torch.float32
    rng = np.random.default_rng(1)
    A = (rng.integers(-8, 9, (4, 64)) / 64).astype(np.float32)
    B = (rng.integers(-8, 9, (48, 4)) / 64).astype(np.float32)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(torch.from_numpy(A))
        layer.lora_B["default"].weight.copy_(torch.from_numpy(B))
    W = layer.base_layer.weight.detach().clone()
    ours = W.float().numpy().astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)
    D32 = precision.delta_weight32(A, B, 8 / 4, dtype)
    for _ in range(60):
        layer.merge()
        merged, ours = precision.merge_cycle(ours, D32, dtype, "PEFT")
        assert bits(layer.base_layer.weight.detach()) == bits(merged)
        layer.unmerge()
        assert bits(layer.base_layer.weight.detach()) == bits(ours)
    moved = float(np.max(np.abs(ours.astype(np.float64) - W.double().numpy())))
    assert moved > 0                                               # and it did drift
