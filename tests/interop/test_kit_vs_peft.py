"""The oracle kit on PEFT's LoRA layer: PEFT passes, deliberately broken variants of it fail.

PEFT 0.21 (peft/tuners/lora/layer.py, ``Linear``): ``result = base_layer(x) + lora_B(lora_A(dropout(x)))
* scaling`` with ``scaling = lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``); for
transformers' ``Conv1D`` base layer (weight stored (in, out)) ``fan_in_fan_out=True`` and the merge
adds ``transpose(B @ A) * scaling``. The adapters below wrap a one-layer model in
``get_peft_model`` with ``init_lora_weights=False`` and then set A, B (and the dropout module, to a
fixed mask) explicitly. Gradients of x, A and B come from torch autograd.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

from transformers.pytorch_utils import Conv1D  # noqa: E402

from lora_ref.testing import DEFAULT_PROPERTIES, check_lora_linear  # noqa: E402

pytestmark = pytest.mark.interop

TORCH_DTYPES = {np.dtype("float64"): torch.float64, np.dtype("float32"): torch.float32}


class Mask(torch.nn.Module):
    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.mask = mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask


class OneLayer(torch.nn.Module):
    def __init__(self, proj: torch.nn.Module) -> None:
        super().__init__()
        self.proj = proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def peft_model(W, A, B, *, alpha, r, use_rslora, bias, dropout_mask, fan_in_fan_out, bug=None):
    """get_peft_model on a Linear (or, under fan_in_fan_out, a GPT-2 Conv1D) holding W, bias, A, B."""
    dtype = TORCH_DTYPES[W.dtype]
    fifo = fan_in_fan_out and bug != "fifo_forgotten"    # the bug: an nn.Linear fed the (in, out) W
    if fifo:
        d_in, d_out = W.shape
        base = Conv1D(d_out, d_in)                        # weight (d_in, d_out), always has a bias
    else:
        d_out, d_in = W.shape
        base = torch.nn.Linear(d_in, d_out, bias=bias is not None)
    model = OneLayer(base).to(dtype)
    with torch.no_grad():
        base.weight.copy_(torch.from_numpy(W))
        if base.bias is not None:
            base.bias.copy_(torch.from_numpy(bias) if bias is not None else torch.zeros(d_out, dtype=dtype))
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"], init_lora_weights=False,
                             use_rslora=use_rslora and bug != "rslora_ignored", fan_in_fan_out=fifo)
    model = peft.get_peft_model(model, config)
    layer = model.base_model.model.proj
    s = layer.scaling["default"]
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(torch.from_numpy(A))
        layer.lora_B["default"].weight.copy_(torch.from_numpy(B))
        if bug == "scale_alpha":
            layer.scaling["default"] = alpha
        if bug == "weighted_A_unweighted_B":            # sqrt(s) folded into A, B left unweighted
            layer.lora_A["default"].weight.mul_(math.sqrt(s))
            layer.scaling["default"] = 1.0
    if dropout_mask is not None and bug != "dropout_on_base":
        layer.lora_dropout["default"] = Mask(torch.from_numpy(dropout_mask))
    return model, layer


def peft_layer(bug=None):
    def impl(x, W, A, B, **kw):
        model, _ = peft_model(W, A, B, bug=bug, **kw)
        x = torch.from_numpy(x)
        if bug == "dropout_on_base" and kw["dropout_mask"] is not None:
            x = x * torch.from_numpy(kw["dropout_mask"])  # the mask hits the base branch too
        with torch.no_grad():
            return model(x).numpy()
    return impl


def peft_merge(bug=None):
    def merge(W, A, B, **kw):
        model, _ = peft_model(W, A, B, bias=None, dropout_mask=None, bug=bug, **kw)
        merged = model.merge_and_unload()                 # PEFT's merge: W += T(B @ A) * scaling
        return merged.proj.weight.detach().numpy().copy()
    return merge


def peft_grad(bug=None):
    def grad(x, W, A, B, dy, **kw):
        model, layer = peft_model(W, A, B, bug=bug, **kw)
        xt = torch.from_numpy(x).requires_grad_()
        inp = xt * torch.from_numpy(kw["dropout_mask"]) if bug == "dropout_on_base" else xt
        model(inp).backward(torch.from_numpy(dy))
        return (xt.grad.numpy(), layer.lora_A["default"].weight.grad.numpy(),
                layer.lora_B["default"].weight.grad.numpy())
    return grad


def test_peft_lora_layer_passes_the_kit():
    # Linear and Conv1D (fan_in_fan_out), with and without rsLoRA, dropout, rank above the
    # dimensions, merge_and_unload, and autograd gradients of x, A, B; float64 and float32.
    report = check_lora_linear(peft_layer(), merge=peft_merge(), grad=peft_grad())
    assert report.ok, str(report)
    assert [r.name for r in report][::2] == list(DEFAULT_PROPERTIES)


def test_peft_gradients_equal_lora_ref_in_float64():
    report = check_lora_linear(peft_layer(), grad=peft_grad(), properties=["grad_x", "grad_A", "grad_B"],
                               dtypes=("float64",), seed=7)
    assert report.ok and len(report) == 3, str(report)


FORWARD = {"forward", "forward_rslora", "zero_B_identity", "fan_in_fan_out", "dropout", "rank_above_dim",
           "rank_equals_dims", "rank_equals_d_out"}
MERGES = {"merge", "merge_rslora", "merge_fan_in_fan_out", "merge_rank_equals_dims", "merge_rank_equals_d_out"}

BROKEN = [
    # (bug planted in the PEFT layer, the properties the kit must name)
    ("scale_alpha", (FORWARD - {"zero_B_identity"}) | MERGES | {"grad_x", "grad_A", "grad_B"}),
    ("rslora_ignored", {"forward_rslora", "merge_rslora"}),
    ("fifo_forgotten", {"fan_in_fan_out", "merge_fan_in_fan_out"}),
    ("dropout_on_base", {"dropout", "grad_x"}),            # dA, dB see x * mask either way
    ("weighted_A_unweighted_B", (FORWARD - {"zero_B_identity"}) | MERGES | {"grad_x", "grad_A", "grad_B"}),
]


@pytest.mark.parametrize("bug, broken", BROKEN, ids=[b for b, _ in BROKEN])
def test_broken_peft_layers_fail_and_are_named(bug, broken):
    report = check_lora_linear(peft_layer(bug), merge=peft_merge(bug), grad=peft_grad(bug))
    assert set(report.failed_names) == broken, str(report)
    assert {r.name for r in report if r.passed} == set(DEFAULT_PROPERTIES) - broken   # the rest passes
    assert all(r.error > 100 * r.bound for r in report.failed)                         # by far


# --------------------------------------------------------------------------------------------
# DoRA (use_dora=True) and embedding LoRA: PEFT's real layers pass the kit's other checks
# --------------------------------------------------------------------------------------------

from lora_ref.testing import DORA_PROPERTIES, EMBEDDING_PROPERTIES, check_dora_linear, check_lora_embedding  # noqa: E402


def peft_dora(W, A, B, m, *, alpha, r, use_rslora, bias, dropout_mask, fan_in_fan_out):
    """PEFT's DoRA layer holding W, bias, A, B and m (m None: PEFT recomputes it from W, A, B);
    in train mode with the fixed mask as its dropout when there is one (PEFT applies DoRA's
    dropout form only then), else eval mode."""
    dtype = TORCH_DTYPES[W.dtype]
    if fan_in_fan_out:
        d_in, d_out = W.shape
        base = Conv1D(d_out, d_in)
    else:
        d_out, d_in = W.shape
        base = torch.nn.Linear(d_in, d_out, bias=True)
    model = OneLayer(base).to(dtype)
    with torch.no_grad():
        base.weight.copy_(torch.from_numpy(W))
        base.bias.copy_(torch.from_numpy(bias) if bias is not None else torch.zeros(d_out, dtype=dtype))
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"], init_lora_weights=False, use_dora=True,
                             use_rslora=use_rslora, fan_in_fan_out=fan_in_fan_out)
    model = peft.get_peft_model(model, config)
    layer = model.base_model.model.proj
    magnitude = layer.lora_magnitude_vector["default"]
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(torch.from_numpy(A))
        layer.lora_B["default"].weight.copy_(torch.from_numpy(B))
        if m is None:                                     # PEFT's own initial magnitude, ||W + s B A||
            magnitude.update_layer(base_layer=layer.get_base_layer(), lora_A=layer.lora_A["default"].weight,
                                   lora_B=layer.lora_B["default"].weight, scaling=layer.scaling["default"])
        else:
            magnitude.weight.copy_(torch.from_numpy(m))
    if dropout_mask is not None:
        layer.lora_dropout["default"] = Mask(torch.from_numpy(dropout_mask))
        model.train()
    else:
        model.eval()
    return model, layer


def peft_dora_impl(x, W, A, B, m, **kw):
    model, _ = peft_dora(W, A, B, m, **kw)
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def peft_dora_magnitude(W, A, B, *, alpha, r, use_rslora, fan_in_fan_out):
    _, layer = peft_dora(W, A, B, None, alpha=alpha, r=r, use_rslora=use_rslora, bias=None, dropout_mask=None,
                         fan_in_fan_out=fan_in_fan_out)
    return layer.lora_magnitude_vector["default"].weight.detach().numpy().copy()


def peft_dora_merge(W, A, B, m, **kw):
    model, _ = peft_dora(W, A, B, m, bias=None, dropout_mask=None, **kw)
    return model.merge_and_unload().proj.weight.detach().numpy().copy()


def peft_dora_grad(x, W, A, B, m, dy, *, detach_norm, **kw):
    if not detach_norm:
        raise NotImplementedError("PEFT computes DoRA's gradient with the norm detached only")
    model, layer = peft_dora(W, A, B, m, **kw)
    xt = torch.from_numpy(x).requires_grad_()
    model(xt).backward(torch.from_numpy(dy))
    return (xt.grad.numpy(), layer.lora_A["default"].weight.grad.numpy(), layer.lora_B["default"].weight.grad.numpy(),
            layer.lora_magnitude_vector["default"].weight.grad.numpy())


DETACHED_ONLY = [p for p in DORA_PROPERTIES if not p.endswith("_exact")]


def test_peft_dora_passes_the_dora_kit():
    # Linear and Conv1D, rsLoRA, PEFT's train-mode dropout, its initial magnitude, merge_and_unload,
    # and torch-autograd gradients of x, lora_A, lora_B, lora_magnitude_vector (the norm detached).
    report = check_dora_linear(peft_dora_impl, magnitude=peft_dora_magnitude, merge=peft_dora_merge,
                               grad=peft_dora_grad, properties=DETACHED_ONLY)
    assert report.ok and len(report) == 2 * len(DETACHED_ONLY), str(report)
    exact = check_dora_linear(peft_dora_impl, grad=peft_dora_grad, properties=["grad_A_exact"], dtypes=("float64",))
    assert exact[0].detail == "raised NotImplementedError: PEFT computes DoRA's gradient with the norm detached only"


def test_peft_dora_with_the_magnitude_of_W_alone_fails_the_magnitude_properties():
    def from_W(W, A, B, **kw):
        return peft_dora_magnitude(W, A, 0 * B, **kw)        # PEFT's update_layer with B = 0: ||W||
    report = check_dora_linear(peft_dora_impl, magnitude=from_W)
    assert set(report.failed_names) == {"magnitude", "magnitude_fan_in_fan_out"}, str(report)


class OneEmbedding(torch.nn.Module):
    def __init__(self, emb: torch.nn.Module) -> None:
        super().__init__()
        self.emb = emb

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.emb(ids)


def peft_embedding(E, A, B, *, alpha, r, use_rslora, lora_dropout=0.0):
    dtype = TORCH_DTYPES[E.dtype]
    model = OneEmbedding(torch.nn.Embedding(*E.shape)).to(dtype)
    with torch.no_grad():
        model.emb.weight.copy_(torch.from_numpy(E))
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["emb"], init_lora_weights=False,
                             use_rslora=use_rslora, lora_dropout=lora_dropout)
    model = peft.get_peft_model(model, config)
    layer = model.base_model.model.emb
    with torch.no_grad():
        layer.lora_embedding_A["default"].copy_(torch.from_numpy(A))
        layer.lora_embedding_B["default"].copy_(torch.from_numpy(B))
    model.train()                                             # dropout would act now, if PEFT applied it
    return model, layer


def test_peft_embedding_lora_passes_the_embedding_kit():
    # Including no_dropout: lora_dropout=0.5 in train mode changes nothing on PEFT's embedding path.
    def impl(ids, E, A, B, **kw):
        model, _ = peft_embedding(E, A, B, **kw)
        with torch.no_grad():
            return model(torch.from_numpy(ids)).numpy()

    def merge(E, A, B, **kw):
        model, _ = peft_embedding(E, A, B, **kw)
        return model.merge_and_unload().emb.weight.detach().numpy().copy()

    def grad(ids, E, A, B, dy, **kw):
        model, layer = peft_embedding(E, A, B, **kw)
        model(torch.from_numpy(ids)).backward(torch.from_numpy(dy))
        return layer.lora_embedding_A["default"].grad.numpy(), layer.lora_embedding_B["default"].grad.numpy()

    report = check_lora_embedding(impl, merge=merge, grad=grad)
    assert report.ok and len(report) == 2 * len(EMBEDDING_PROPERTIES), str(report)
