"""loralib 0.1.2 (microsoft/LoRA) against lora_ref: Linear and MergedLinear, forward, merge, gradients.

What loralib does (site-packages/loralib/layers.py, read for these tests):

* ``Linear(in, out, r, lora_alpha, lora_dropout, fan_in_fan_out)``: ``lora_A`` (r, in),
  ``lora_B`` (out, r), ``scaling = lora_alpha / r`` (no rsLoRA); with ``fan_in_fan_out`` the
  weight is stored (in, out) and transposed in forward. Forward, unmerged:
  ``F.linear(x, T(W), bias) + (dropout(x) @ A^T @ B^T) * scaling``.
* ``MergedLinear(..., enable_lora=[q, k, v])``: A is (r n, in), B is (out/G n, r); ``merge_AB``
  is a grouped conv1d giving ``B_k A_k`` per enabled block, zero-padded into the rows of the
  disabled blocks (``lora_ind``), transposed under ``fan_in_fan_out``. Forward, unmerged:
  ``F.linear(x, T(W), bias) + dropout(x) @ T(merge_AB().T) * scaling``.
* ``eval()`` merges (``W += T(delta) * scaling``, once; ``merge_weights=True`` by default) and the
  forward then uses W alone; ``train()`` subtracts it again.
* ``lora_dropout`` is a module attribute (``nn.Dropout``, or an identity lambda for p = 0); the
  tests replace it by an explicit mask, applied to the adapter branch only, as in lora_ref.

Bounds: lora_ref's float64 reference against loralib in the test's dtype, ``rtol * M`` with
``rtol = reference_rtol(dtype, rounding_counts(...))`` and M the magnitude (lora_ref.testing).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
loralib = pytest.importorskip("loralib")

from lora_ref.testing import compare_to_reference, reference_outputs, reference_rtol, rounding_counts  # noqa: E402

pytestmark = pytest.mark.interop

TORCH_DTYPES = {"float64": torch.float64, "float32": torch.float32}


class Mask(torch.nn.Module):
    """Dropout with a fixed mask (entries 0 and 1/(1-p)), so both sides see the same one."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.mask = mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask


def build(kind, d_in, d_out, r, alpha, fifo, enable, dtype, rng, dropout=False):
    """A loralib layer with random (non-identity) W, bias, A, B; and the same arrays in NumPy."""
    if kind == "Linear":
        layer = loralib.Linear(d_in, d_out, r=r, lora_alpha=alpha, fan_in_fan_out=fifo)
        n, q = 1, d_out
    else:
        layer = loralib.MergedLinear(d_in, d_out, r=r, lora_alpha=alpha, enable_lora=list(enable),
                                     fan_in_fan_out=fifo)
        n, q = sum(enable), d_out // len(enable)
    layer = layer.to(TORCH_DTYPES[dtype])
    W = rng.standard_normal((d_out, d_in)) / math.sqrt(d_in)          # (d_out, d_in)
    arrays = {"W": W.T if fifo else W,                                 # loralib's stored layout
              "bias": rng.standard_normal(d_out),
              "A": rng.standard_normal((n * r, d_in)),                 # (n r, d_in)
              "B": rng.standard_normal((n * q, r)),                    # (n q, r): nonzero
              "x": rng.standard_normal((2, 3, d_in)),                  # (batch, T, d_in)
              "dy": rng.standard_normal((2, 3, d_out))}
    if dropout:
        arrays["mask"] = (rng.random((2, 3, d_in)) >= 0.5) / 0.5       # p = 0.5: entries 0 or 2
    arrays = {k: v.astype(dtype) for k, v in arrays.items()}
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(arrays["W"]))
        layer.bias.copy_(torch.from_numpy(arrays["bias"]))
        layer.lora_A.copy_(torch.from_numpy(arrays["A"]))
        layer.lora_B.copy_(torch.from_numpy(arrays["B"]))
    if dropout:
        layer.lora_dropout = Mask(torch.from_numpy(arrays["mask"]))
    return layer, arrays


CONFIGS = [
    # (id, kind, d_in, d_out, r, alpha, fan_in_fan_out, enable_lora)
    ("Linear", "Linear", 7, 5, 3, 6, False, None),
    ("Linear-fan_in_fan_out", "Linear", 6, 6, 2, 4, True, None),
    ("Linear-rank_above_dim", "Linear", 3, 4, 6, 3, False, None),
    ("MergedLinear-TFT", "MergedLinear", 5, 12, 2, 4, False, (True, False, True)),
    ("MergedLinear-TFT-fan_in_fan_out", "MergedLinear", 8, 24, 2, 16, True, (True, False, True)),
    ("MergedLinear-FTF-fan_in_fan_out", "MergedLinear", 6, 18, 3, 6, True, (False, True, False)),
    ("MergedLinear-TTT", "MergedLinear", 5, 9, 2, 2, False, (True, True, True)),
]

MAX_REL_ERRORS: dict[str, float] = {}  # name -> largest error / magnitude seen (for reports)


def _check(name, dtype, actual, ref, output, counts):
    res = compare_to_reference(name, dtype, actual.detach().numpy(), ref[output], ref[f"magnitude.{output}"],
                               reference_rtol(dtype, counts[output]))
    MAX_REL_ERRORS[name] = max(MAX_REL_ERRORS.get(name, 0.0), res.error)
    assert res.passed, str(res)
    return res


@pytest.mark.parametrize("dropout", [False, True], ids=["no_dropout", "mask"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_loralib_forward_gradients_and_merge_equal_lora_ref(cfg, dtype, dropout):
    name, kind, d_in, d_out, r, alpha, fifo, enable = cfg
    rng = np.random.default_rng([len(name), d_in, d_out, r])
    layer, a = build(kind, d_in, d_out, r, alpha, fifo, enable, dtype, rng, dropout)
    scale = alpha / r                                                   # loralib: lora_alpha / r
    assert layer.scaling == scale
    mask = a.get("mask")
    ref = reference_outputs(a["x"], a["W"], a["A"], a["B"], scale, bias=a["bias"], dropout_mask=mask,
                            enable_lora=enable, fan_in_fan_out=fifo, dy=a["dy"])
    n = 1 if enable is None else sum(enable)
    counts = rounding_counts(d_in, d_out, r, 6, n)
    tag = f"{name} {dtype}" + (" mask" if dropout else "")

    # Training mode: unmerged forward, and gradients of x, A, B by torch autograd.
    layer.train()
    x = torch.from_numpy(a["x"]).requires_grad_()
    y = layer(x)
    _check(f"{tag} y", dtype, y, ref, "y", counts)
    y.backward(torch.from_numpy(a["dy"]))
    _check(f"{tag} dx", dtype, x.grad, ref, "dx", counts)
    _check(f"{tag} dA", dtype, layer.lora_A.grad, ref, "dA", counts)
    _check(f"{tag} dB", dtype, layer.lora_B.grad, ref, "dB", counts)

    # eval() merges W += T(delta) * scaling in loralib's stored layout; train() unmerges.
    layer.eval()
    assert layer.merged
    _check(f"{tag} W_merged", dtype, layer.weight, ref, "W_merged", counts)
    if not dropout:                                                     # merged forward = unmerged one
        with torch.no_grad():
            _check(f"{tag} y (merged)", dtype, layer(torch.from_numpy(a["x"])), ref, "y", counts)
    layer.train()
    assert not layer.merged
    # W after a merge/unmerge cycle: W + d - d, three roundings of |W| + 2|d| at most; the
    # merged-weight magnitude bounds |W| + |d| (rounding count of W_merged plus the subtraction).
    unmerged = layer.weight.detach().numpy().astype(np.float64)
    rtol = reference_rtol(dtype, counts["W_merged"] + 1)
    assert np.all(np.abs(unmerged - a["W"]) <= 2 * rtol * ref["magnitude.W_merged"])


def test_loralib_mergedlinear_with_no_block_enabled_differs_from_lora_ref():
    # A discrepancy, documented: loralib accepts enable_lora=[False, False, False] and then fails
    # in forward (it has no lora_A to merge); lora_ref refuses such flags up front.
    import lora_ref

    layer = loralib.MergedLinear(4, 6, r=2, lora_alpha=2, enable_lora=[False, False, False])
    with pytest.raises(AttributeError):
        layer(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="enables no block"):
        lora_ref.LoraConfig(r=2, alpha=2.0, enable_lora={"c_attn": (False, False, False)})
