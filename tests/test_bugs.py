"""The bug catalogue (lora_ref.kit.bugs): each known bug of a shipping implementation is a test.

For every entry the kit must fail the released behaviour on exactly the properties the entry
names, and pass the fixed one: first on the NumPy re-implementations (always), then on the real
package where it is installed (the interop extra; Keras 3 with the torch backend), which must get
the same verdict: the same results failing, errors within a factor of two, the same mismatch
counts and the same error messages. docs/bugs.md must be what the entries give:
``python -m pytest tests/test_bugs.py --write-bugs-page`` rewrites it.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import math
import os
import warnings
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

from lora_ref.kit.bugs import BUGS, render_page, run_bug

ROOT = Path(__file__).resolve().parent.parent
BY_NAME = {bug.name: bug for bug in BUGS}


@functools.lru_cache(maxsize=None)
def released(name: str):
    return run_bug(BY_NAME[name])


@pytest.mark.parametrize("name", list(BY_NAME))
def test_the_kit_fails_the_released_behaviour_and_passes_the_fixed_one(name):
    bug = BY_NAME[name]
    report = released(name)
    assert set(report.failed_names) == bug.fails, str(report)
    for res in report.failed:                     # by far: bits, a crash, or many times the bound
        assert (res.mismatches or 0) > 0 if res.exact else res.error > 4 * res.bound, str(res)
    fixed = run_bug(bug, fixed=True)
    assert fixed.ok and len(fixed) == len(report), str(fixed)


def test_the_catalogue_covers_what_it_must():
    software = {bug.software for bug in BUGS}
    assert software >= {"PEFT", "loralib", "bitsandbytes", "Keras", "vLLM", "llama.cpp", "SGLang"}
    assert all(bug.package is None or bug.package in REAL_PACKAGES for bug in BUGS)
    assert {bug.name for bug in BUGS if bug.package} == set(REAL)


def test_the_committed_page_is_what_the_entries_give(request):
    page, path = render_page(), ROOT / "docs" / "bugs.md"
    if request.config.getoption("--write-bugs-page", default=False):
        path.write_text(page)
    assert path.read_text() == page, "docs/bugs.md is stale: python -m pytest tests/test_bugs.py --write-bugs-page"


# ============================================================================================
# The real packages
# ============================================================================================

REAL_PACKAGES = {"peft": ("torch", "transformers", "peft"), "loralib": ("torch", "loralib"),
                 "bitsandbytes": ("torch", "bitsandbytes"), "keras": ("torch", "keras")}


def _need(package: str):
    """Import the real package (and what it runs on), or skip saying which is missing."""
    if package == "keras":
        os.environ.setdefault("KERAS_BACKEND", "torch")
    for name in REAL_PACKAGES[package]:
        pytest.importorskip(name, reason=f"{name} is not installed: the entry is checked on its re-implementation only")
    if package == "keras":
        import keras
        if keras.backend.backend() != "torch":
            pytest.skip(f"Keras runs on the {keras.backend.backend()} backend; the entry needs the torch one")
    if package == "bitsandbytes":
        from bitsandbytes.backends.cpu import ops
        if not ops._has_avx512:
            pytest.skip("this CPU does not take bitsandbytes' AVX-512 dequantise path, where the bug is")
    return importlib.import_module(package)


def t(a):
    """A NumPy array (bfloat16 from ml_dtypes included) as a torch tensor, sharing nothing."""
    import ml_dtypes
    import torch
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.array(a))


def n(x):
    """A torch tensor as a NumPy array of its dtype (bfloat16 as ml_dtypes')."""
    import ml_dtypes
    import torch
    x = x.detach()
    if x.dtype == torch.bfloat16:
        return x.view(torch.int16).numpy().copy().view(ml_dtypes.bfloat16)
    return x.numpy().copy()


def _holder(child):
    import torch

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = child

        def forward(self, x):
            return self.layer(x)
    return Holder()


def _mask(mask):
    import torch

    class Mask(torch.nn.Module):                  # PEFT's dropout module replaced by a fixed mask
        def forward(self, x):
            return x * t(mask)
    return Mask()


def _quiet():
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    return stack


# ---- PEFT: add_weighted_adapter ------------------------------------------------------------


def _peft_linear(adapters, W=None, **options):
    """``(PEFT model, its LoRA layer)``: one bias-free Linear (weight ``W`` if given, else PEFT's
    random init; the dtype of ``W``, else of the first A) holding each of ``adapters``
    (``{name: {"A", "B", "r", "alpha", "use_rslora"[, "m"]}}``) in order, its factors (and with
    ``use_dora=True`` its magnitude m) copied in; ``options`` go to every ``peft.LoraConfig``."""
    import peft
    import torch

    first = next(iter(adapters.values()))
    d_out, d_in = W.shape if W is not None else (first["B"].shape[0], first["A"].shape[1])
    base = _holder(torch.nn.Linear(d_in, d_out, bias=False)).to(t(first["A"] if W is None else W).dtype)
    model = None
    with _quiet(), torch.no_grad():
        if W is not None:
            base.layer.weight.copy_(t(W))
        for name, a in adapters.items():
            config = peft.LoraConfig(r=a["r"], lora_alpha=a["alpha"], use_rslora=a["use_rslora"],
                                     target_modules=["layer"], **options)
            if model is None:
                model = peft.get_peft_model(base, config, adapter_name=name)
            else:
                model.add_adapter(name, config)
            layer = model.base_model.model.layer
            layer.lora_A[name].weight.copy_(t(a["A"]))
            layer.lora_B[name].weight.copy_(t(a["B"]))
            if options.get("use_dora"):
                layer.lora_magnitude_vector[name].weight.copy_(t(a["m"]))
    return model, layer


def peft_combine(method=None, *, scale_from_config_without_rslora=False):
    """PEFT's add_weighted_adapter on one Linear holding the given adapters; ``method`` replaces the
    kit's method (PEFT's name for what is asked)."""
    import torch

    def impl(adapters, weights, kit_method, *, density, majority_sign, masks, rank):
        model, layer = _peft_linear(adapters, init_lora_weights=False)
        with _quiet(), torch.no_grad():
            model.add_weighted_adapter(list(adapters), list(weights), "mix", combination_type=method or kit_method)
        config = model.peft_config["mix"]
        scale = config.lora_alpha / config.r if scale_from_config_without_rslora else layer.scaling["mix"]
        return n(layer.lora_A["mix"].weight), n(layer.lora_B["mix"].weight), scale
    return impl


def peft_dora_combine(fixed=False):
    """add_weighted_adapter on one Linear holding DoRA adapters; fixed: the sources' magnitudes
    carried over (sum w_i m_i) after it."""
    import torch

    def impl(W, adapters, weights):
        model, layer = _peft_linear(adapters, W, use_dora=True)
        with _quiet(), torch.no_grad():
            model.add_weighted_adapter(list(adapters), list(weights), "mix", combination_type="cat")
            m = layer.lora_magnitude_vector["mix"].weight
            if fixed:
                m.copy_(sum(w * layer.lora_magnitude_vector[name].weight for name, w in zip(adapters, weights)))
        return n(layer.lora_A["mix"].weight), n(layer.lora_B["mix"].weight), layer.scaling["mix"], n(m)
    return impl


# ---- PEFT: a tied embedding on transformers' tiny GPT-2 --------------------------------------


def peft_tied(fixed=False):
    import peft
    import torch
    import transformers

    def impl(E, A, B, *, alpha, r, use_rslora, head_adapted):
        V, D = E.shape
        torch.manual_seed(0)
        config = transformers.GPT2Config(n_embd=D, n_layer=1, n_head=2, vocab_size=V, n_positions=8,
                                         bos_token_id=0, eos_token_id=0)
        model = transformers.GPT2LMHeadModel(config).to(t(E).dtype).eval()
        with torch.no_grad():
            model.transformer.wte.weight.copy_(t(E))
        assert model.lm_head.weight is model.transformer.wte.weight                  # tied
        if fixed and not head_adapted:                                              # the fix: untie first
            model.lm_head.weight = torch.nn.Parameter(model.transformer.wte.weight.detach().clone())
        lora = peft.LoraConfig(r=r, lora_alpha=alpha, use_rslora=use_rslora, init_lora_weights=False,
                               target_modules=["lm_head"] if head_adapted else ["wte"],
                               ensure_weight_tying=head_adapted)
        with _quiet():
            pm = peft.get_peft_model(model, lora)
        wte = pm.base_model.model.transformer.wte
        with torch.no_grad():
            wte.lora_embedding_A["default"].copy_(t(A))
            wte.lora_embedding_B["default"].copy_(t(B))
        with _quiet():
            if fixed and head_adapted:                                              # the fix: merge once
                wte.merge()
                inner = pm.base_model.model
                return n(inner.transformer.wte.get_base_layer().weight), n(inner.lm_head.get_base_layer().weight)
            merged = pm.merge_and_unload()
        return n(merged.transformer.wte.weight), n(merged.lm_head.weight)
    return impl


# ---- PEFT: DoRA's gradient of the base weight --------------------------------------------------


def peft_dora_grad_W(fixed=False):
    import peft
    import peft.tuners.lora.dora as dora_module
    import torch
    from transformers.pytorch_utils import Conv1D

    def impl(x, W, A, B, m, dy, *, alpha, r, use_rslora, bias, dropout_mask, fan_in_fan_out):
        dtype = t(W).dtype
        if fan_in_fan_out:
            base = Conv1D(W.shape[1], W.shape[0])                                   # weight (d_in, d_out)
        else:
            base = torch.nn.Linear(W.shape[1], W.shape[0], bias=True)
        model = _holder(base).to(dtype)
        with torch.no_grad():
            base.weight.copy_(t(W))
            base.bias.copy_(t(bias))
        config = peft.LoraConfig(r=r, lora_alpha=alpha, use_rslora=use_rslora, use_dora=True,
                                 fan_in_fan_out=fan_in_fan_out, target_modules=["layer"], init_lora_weights=False)
        with _quiet():
            model = peft.get_peft_model(model, config)
        layer = model.base_model.model.layer
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(t(A))
            layer.lora_B["default"].weight.copy_(t(B))
            layer.lora_magnitude_vector["default"].weight.copy_(t(m))
        layer.lora_dropout["default"] = _mask(dropout_mask)
        model.train()                                                               # DoRA's dropout path
        layer.base_layer.weight.requires_grad_(True)
        plain = lambda weight, fan_in_fan_out: weight.T if fan_in_fan_out else weight  # noqa: E731
        with mock.patch.object(dora_module, "transpose", plain) if fixed else contextlib.nullcontext():
            model(t(x)).backward(t(dy))
        return n(layer.base_layer.weight.grad)
    return impl


# ---- PEFT: conv LoRA ------------------------------------------------------------------------


def peft_conv(fixed=False):
    import peft
    import torch

    def impl(x, W, A, B, *, alpha, r, use_rslora, bias, stride, padding, dilation, groups, dropout_mask):
        conv_type = {3: torch.nn.Conv1d, 4: torch.nn.Conv2d}[x.ndim]
        conv = conv_type(W.shape[1] * groups, W.shape[0], W.shape[2:], stride=stride, padding=padding,
                         dilation=dilation, groups=groups, bias=bias is not None).to(t(W).dtype)
        with torch.no_grad():
            conv.weight.copy_(t(W))
            if bias is not None:
                conv.bias.copy_(t(bias))
        config = peft.LoraConfig(r=r, lora_alpha=alpha, use_rslora=use_rslora, target_modules=["layer"],
                                 init_lora_weights=False)
        with _quiet():
            model = peft.get_peft_model(_holder(conv), config)
        layer = model.base_model.model.layer
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(t(A))
            layer.lora_B["default"].weight.copy_(t(B))
        if dropout_mask is not None:
            layer.lora_dropout["default"] = _mask(dropout_mask)
        if fixed:
            layer.lora_A["default"].dilation = conv.dilation                        # the fix
        with torch.no_grad():
            return n(model(t(x)))
    return impl


# ---- PEFT: merge / unmerge cycles on a 16-bit Linear -------------------------------------------


def peft_cycles(fixed=False):
    import peft
    import torch

    def impl(W, A, B, *, alpha, r, use_rslora, cycles):
        host = torch.nn.Sequential(torch.nn.Linear(W.shape[1], W.shape[0], bias=False)).to(t(W).dtype)
        config = peft.LoraConfig(r=r, lora_alpha=alpha, use_rslora=use_rslora, target_modules=["0"],
                                 init_lora_weights=False)
        model = peft.get_peft_model(host, config)
        layer = model.base_model.model[0]
        assert layer.lora_A["default"].weight.dtype == torch.float32                # PEFT's adapter dtype
        with torch.no_grad():
            layer.base_layer.weight.copy_(t(W))
            layer.lora_A["default"].weight.copy_(t(A))
            layer.lora_B["default"].weight.copy_(t(B))
            for _ in range(cycles):
                layer.merge()
                if fixed:                                                           # the same float32 delta
                    layer.base_layer.weight.data -= layer.get_delta_weight(layer.merged_adapters.pop())
                else:
                    layer.unmerge()
        return n(layer.base_layer.weight)
    return impl


# ---- loralib: ConvLoRA ------------------------------------------------------------------------


def loralib_conv(fixed=False):
    import loralib
    import torch

    def build(W, A, B, alpha, r, bias=None, **geometry):
        c_out, c_in, k = W.shape[:3]
        conv = {3: loralib.Conv1d, 5: loralib.Conv3d}[W.ndim]                        # loralib's ConvLoRA
        layer = conv(c_in, c_out, k, r=r, lora_alpha=alpha, bias=bias is not None,
                     **{key: v for key, v in geometry.items() if key != "groups"}).to(t(W).dtype)
        with torch.no_grad():
            layer.conv.weight.copy_(t(W))
            if bias is not None:
                layer.conv.bias.copy_(t(bias))
            if fixed:                                                               # factors sized for W
                layer.lora_A = torch.nn.Parameter(t(A.reshape(r, -1)))
                layer.lora_B = torch.nn.Parameter(t(B.reshape(c_out, r)))
        return layer

    def impl(x, W, A, B, *, alpha, r, use_rslora, bias, stride, padding, dilation, groups, dropout_mask):
        layer = build(W, A, B, alpha, r, bias, stride=stride, padding=padding, dilation=dilation)
        layer.train()
        with torch.no_grad():
            return n(layer(t(x)))

    def merge(W, A, B, *, alpha, r, use_rslora):
        layer = build(W, A, B, alpha, r)
        layer.train()
        layer.train(False)                                                          # loralib merges on eval
        return n(layer.conv.weight)
    return {"impl": impl, "merge": merge}


# ---- bitsandbytes: dequantize_4bit on the CPU ---------------------------------------------------


def bnb_dequantize(fixed=False):
    import bitsandbytes.functional as F
    import torch
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    from lora_ref.quant import dynamic_map

    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

    def dequantize(weight, absmax, *, shape, dtype, blocksize, quant_type, nested_absmax, nested_offset):
        code, size = F.get_4bit_type(quant_type, device="cpu"), torch.Size(shape)
        if nested_absmax is None:
            state = F.QuantState(absmax=t(absmax), shape=size, code=code, blocksize=blocksize,
                                 quant_type=quant_type, dtype=dtypes[dtype])
        else:
            nested = F.QuantState(absmax=t(nested_absmax), code=t(dynamic_map()), blocksize=256, dtype=torch.float32)
            state = F.QuantState(absmax=t(absmax), shape=size, code=code, blocksize=blocksize, quant_type=quant_type,
                                 dtype=dtypes[dtype], offset=torch.tensor(nested_offset, dtype=torch.float32),
                                 state2=nested)
        packed = t(weight).reshape(-1, 1)
        if not fixed:
            return n(F.dequantize_4bit(packed, state))                             # the native CPU kernel
        scales = state.absmax
        if state.nested:
            scales = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
        return n(_dequantize_4bit_compute.__wrapped__(packed.reshape(-1), scales, code, blocksize, size,
                                                      dtypes[dtype]))               # its pure-PyTorch path
    return dequantize


# ---- Keras 3: Dense.enable_lora on the torch backend ---------------------------------------------


def keras_dense(*, fixed_dtype=False, pass_alpha=True):
    """Keras' Dense with enable_lora, on the torch backend; ``fixed_dtype``: the factors in the layer's
    dtype and 64-bit results kept (result_type's float64 -> float32 map removed while it runs)."""
    import keras
    from keras.src.backend.common import dtypes as keras_dtypes

    def wide():
        return (mock.patch.dict(keras_dtypes.BIT64_TO_BIT32_DTYPE, {"float64": "float64"}) if fixed_dtype
                else contextlib.nullcontext())

    def build(W, A, B, alpha, r, use_rslora, fan_in_fan_out, bias):
        Wm = W.T if fan_in_fan_out else W                                           # (d_out, d_in)
        layer = keras.layers.Dense(Wm.shape[0], use_bias=bias is not None, dtype=str(W.dtype))
        layer.build((None, Wm.shape[1]))
        layer._kernel.assign(Wm.T)                                                  # Keras: (d_in, d_out)
        if bias is not None:
            layer.bias.assign(bias)
        if fixed_dtype:                                                             # the fix: the layer's dtype
            add_weight = layer.add_weight
            layer.add_weight = lambda *a, dtype=None, **k: add_weight(*a, dtype=layer.variable_dtype, **k)
        lora_alpha = (alpha * math.sqrt(r) if use_rslora else alpha) if pass_alpha else None
        layer.enable_lora(r, lora_alpha=lora_alpha)
        layer.lora_kernel_a.assign(A.T)
        layer.lora_kernel_b.assign(B.T)
        return layer

    def impl(x, W, A, B, *, alpha, r, use_rslora, bias, dropout_mask, fan_in_fan_out):
        assert dropout_mask is None, "Keras' enable_lora has no dropout"
        with wide():
            layer = build(W, A, B, alpha, r, use_rslora, fan_in_fan_out, bias)
            return keras.ops.convert_to_numpy(layer(x))

    def merge(W, A, B, *, alpha, r, use_rslora, fan_in_fan_out):
        with wide():
            kernel = keras.ops.convert_to_numpy(build(W, A, B, alpha, r, use_rslora, fan_in_fan_out, None).kernel)
        return kernel if fan_in_fan_out else kernel.T
    return {"impl": impl, "merge": merge}


def _impl(factory):
    return lambda: {"impl": factory()}


REAL = {
    # entry: (package, the released version's callables, the fixed version's)
    "peft.add_weighted_adapter.rslora_first": (
        "peft", lambda: {"impl": peft_combine()}, lambda: {"impl": peft_combine(scale_from_config_without_rslora=True)}),
    "peft.add_weighted_adapter.linear_cross_terms": (
        "peft", lambda: {"impl": peft_combine("linear")}, lambda: {"impl": peft_combine("cat")}),
    "peft.add_weighted_adapter.dora_magnitudes_ignored": (
        "peft", _impl(peft_dora_combine), lambda: {"impl": peft_dora_combine(True)}),
    "peft.tied_embedding.merge_moves_head": ("peft", _impl(peft_tied), lambda: {"impl": peft_tied(True)}),
    "peft.ensure_weight_tying.merges_twice": ("peft", _impl(peft_tied), lambda: {"impl": peft_tied(True)}),
    "peft.dora.fan_in_fan_out_dropout_base_gradient": (
        "peft", _impl(peft_dora_grad_W), lambda: {"impl": peft_dora_grad_W(True)}),
    "peft.conv.dilation_ignored_in_A": ("peft", _impl(peft_conv), lambda: {"impl": peft_conv(True)}),
    "peft.merge_unmerge.16bit_drift": ("peft", _impl(peft_cycles), lambda: {"impl": peft_cycles(True)}),
    "loralib.conv1d.kernel_above_one": ("loralib", loralib_conv, lambda: loralib_conv(True)),
    "loralib.conv3d.kernel_above_one": ("loralib", loralib_conv, lambda: loralib_conv(True)),
    "bitsandbytes.cpu_dequantize.row_straddling_blocks": (
        "bitsandbytes", lambda: {"impl": lambda *a, **k: None, "dequantize": bnb_dequantize()},
        lambda: {"impl": lambda *a, **k: None, "dequantize": bnb_dequantize(True)}),
    "keras.enable_lora.float32_on_torch": ("keras", keras_dense, lambda: keras_dense(fixed_dtype=True)),
    "keras.enable_lora.alpha_defaults_to_rank": (
        "keras", lambda: {"impl": keras_dense(pass_alpha=False)["impl"]}, lambda: {"impl": keras_dense()["impl"]}),
}


def assert_same_verdict(real, ours):
    """The real package's report and the re-implementation's: the same results, the same failures,
    errors within a factor of two, the same mismatch counts and crash messages."""
    key = lambda r: (r.name, r.dtype, r.output, r.passed)  # noqa: E731
    assert [key(r) for r in real] == [key(r) for r in ours], f"real:\n{real}\nre-implementation:\n{ours}"
    for a, b in zip(real.failed, ours.failed):
        if b.exact:
            assert a.mismatches == b.mismatches, (a, b)
        elif math.isinf(b.error) or math.isinf(a.error):
            assert math.isinf(a.error) and math.isinf(b.error), (a, b)
            if b.detail.startswith("raised"):
                assert a.detail == b.detail, (a.detail, b.detail)
            else:
                assert 0.5 <= a.difference / b.difference <= 2, (a, b)
        else:
            assert 0.5 <= a.error / b.error <= 2, (a, b)


@pytest.mark.interop
@pytest.mark.parametrize("name", list(REAL))
def test_the_real_package_gets_the_same_verdict(name):
    package, buggy, fixed = REAL[name]
    _need(package)
    bug = BY_NAME[name]
    with _quiet():
        real = run_bug(bug, buggy())
    assert set(real.failed_names) == bug.fails, str(real)
    assert_same_verdict(real, released(name))
    with _quiet():
        real_fixed = run_bug(bug, fixed())
    assert real_fixed.ok, str(real_fixed)


def test_the_verdicts_are_compared_strictly():
    # assert_same_verdict itself: another failing dtype, an error 3 times larger, another mismatch count
    import dataclasses

    from lora_ref.kit.core import LoraCheckReport

    ours = released("peft.add_weighted_adapter.rslora_first")
    bigger = LoraCheckReport([dataclasses.replace(r, error=3 * r.error) if not r.passed else r for r in ours])
    with pytest.raises(AssertionError):
        assert_same_verdict(bigger, ours)
    passed = LoraCheckReport([dataclasses.replace(r, passed=True) for r in ours])
    with pytest.raises(AssertionError):
        assert_same_verdict(passed, ours)
    quant = released("bitsandbytes.cpu_dequantize.row_straddling_blocks")
    other = LoraCheckReport([dataclasses.replace(r, mismatches=r.mismatches + 1) if not r.passed else r for r in quant])
    with pytest.raises(AssertionError):
        assert_same_verdict(other, quant)
    assert_same_verdict(copy.copy(quant), quant)
