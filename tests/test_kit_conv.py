"""check_lora_conv: lora-ref's own conv LoRA and an independent one (a dense delta, a direct
convolution, autograd's gradients) pass; the two wrong convs of issue 14 are in test_kit_mutants.py."""

from __future__ import annotations

from autograd import make_vjp

from lora_ref import lora_scale
from lora_ref.conv import lora_conv, merge_conv
from lora_ref.kit.conv import conv_rounding_counts
from lora_ref.kit.mutants import run_correct
from lora_ref.testing import CONV_PROPERTIES, check_lora_conv


def impl(x, W, A, B, *, alpha, r, use_rslora, bias, stride, padding, dilation, groups, dropout_mask):
    return lora_conv(x, W, A, B, lora_scale(alpha, r, use_rslora), bias, stride, padding, dilation, groups,
                     dropout_mask)


def merge(W, A, B, *, alpha, r, use_rslora):
    return merge_conv(W, A, B, lora_scale(alpha, r, use_rslora))


def grad(x, W, A, B, dy, **kw):
    return make_vjp(lambda xx, AA, BB: impl(xx, W, AA, BB, **kw), argnum=(0, 1, 2))(x, A, B)[0](dy)


def test_lora_ref_and_an_independent_implementation_pass():
    report = check_lora_conv(impl, merge=merge, grad=grad)
    assert report.ok and [r.name for r in report][::2] == list(CONV_PROPERTIES), str(report)
    assert run_correct("lora_conv").ok


def test_seeds_and_dtypes():
    assert run_correct("lora_conv", seed=12345, dtypes=("float32",)).ok


def test_rounding_counts():
    c = conv_rounding_counts(4, 6, (3, 3), 2, 50)
    assert c["y"] == 4 * 9 + 2 + 7 and c["W_merged"] == 7 and c["dA"] == 50 + 36 + 54 + 6 + 18 + 10
