"""lora_ref.cases: the one record of a LoRA case, drawn deterministically."""

from __future__ import annotations

import numpy as np
import pytest

from lora_ref import lora_linear, lora_scale
from lora_ref.cases import LoraCase, normal_entries, uniform_entries

ORDER = ("x", "W", "A", "B", "bias", "dy", "mask")


def test_shapes_and_derived_settings():
    case = LoraCase(d_in=5, d_out=12, r=2, alpha=4.0, batch_shape=(2, 3), enable_lora=(True, False, True),
                    dropout_p=0.5, use_rslora=True)
    assert (case.n_blocks, case.n_enabled, case.block_rows, case.n_tokens) == (3, 2, 4, 6)
    assert case.scale == lora_scale(4.0, 2, use_rslora=True)
    assert case.shapes() == {"x": (2, 3, 5), "W": (12, 5), "A": (4, 5), "B": (8, 2), "dy": (2, 3, 12),
                             "bias": (12,), "mask": (2, 3, 5)}
    assert "bias" not in LoraCase(d_in=2, d_out=2, r=1, alpha=1.0, has_bias=False).shapes()


def test_draw_follows_the_seed_and_the_order():
    case = LoraCase(d_in=4, d_out=3, r=2, alpha=2.0, dropout_p=0.25, dtype="float32", seed=(7, 1))
    a = case.draw(entries=normal_entries(scaled=("W",)), order=ORDER)
    b = case.draw(np.random.default_rng([7, 1]), entries=normal_entries(scaled=("W",)), order=ORDER)
    assert all(np.array_equal(getattr(a, n), getattr(b, n)) for n in ORDER)
    # What the order and the entries mean, replayed by hand from the same stream:
    rng = np.random.default_rng([7, 1])
    x = rng.standard_normal((2, 3, 4))
    W = rng.standard_normal((3, 4)) / 2.0                               # scaled by 1/sqrt(d_in)
    A, B, bias, dy = (rng.standard_normal(s) for s in ((2, 4), (3, 2), (3,), (2, 3, 3)))
    mask = (rng.random((2, 3, 4)) >= 0.25) / 0.75
    for name, value in zip(ORDER, (x, W, A, B, bias, dy, mask)):
        got = getattr(a, name)
        assert got.dtype == np.float32 and np.array_equal(got, value.astype(np.float32)), name
    swapped = case.draw(entries=normal_entries(scaled=("W",)), order=("W", "x") + ORDER[2:])
    assert not np.array_equal(swapped.x, a.x)


def test_draw_in_parts_and_replace_arrays():
    case = LoraCase(d_in=3, d_out=2, r=1, alpha=1.0, has_bias=False)
    rng = np.random.default_rng(0)
    part = case.draw(rng, entries=uniform_entries(), order=("x", "bias"))   # no bias: nothing drawn for it
    assert part.x.shape == (2, 3, 3) and part.bias is None and part.W is None
    whole = part.draw(rng, entries=uniform_entries(), order=("W", "A", "B"))
    assert whole.x is part.x and np.all(np.abs(whole.W) <= 1.0)
    zero = whole.with_arrays(B=np.zeros_like(whole.B))
    y = lora_linear(*zero.args(), **zero.kwargs())
    assert np.array_equal(y, zero.x @ zero.W.T)                        # B = 0: the base layer exactly
    assert whole.astype("float32").W.dtype == np.float32 and whole.W.dtype == np.float64
    fifo = LoraCase(d_in=3, d_out=2, r=1, alpha=1.0, fan_in_fan_out=True).draw(
        rng, entries=uniform_entries(), order=("W",))
    assert fifo.W_stored.shape == (3, 2) and np.array_equal(fifo.W_stored, fifo.W.T)


@pytest.mark.parametrize("kwargs, error, words", [
    ({"r": 0}, ValueError, "r must be a positive int"),
    ({"d_in": 2.0}, TypeError, "d_in must be a positive int"),
    ({"alpha": float("nan")}, ValueError, "alpha must be finite"),
    ({"d_out": 4, "enable_lora": (True, False, True)}, ValueError, "d_out=4 must be a multiple of the 3 blocks"),
    ({"dropout_p": 1.0}, ValueError, r"dropout_p must be in \[0, 1\)"),
    ({"dropout_p": 0.5, "mask_shape": (3, 3)}, ValueError, r"mask_shape \(3, 3\) does not broadcast"),
    ({"batch_shape": (0,)}, ValueError, "batch_shape must be a tuple of positive ints"),
    ({"dtype": "int32"}, ValueError, "dtype must be one of"),
    ({"init": "pissa"}, ValueError, "init must be"),
])
def test_bad_settings_are_named(kwargs, error, words):
    with pytest.raises(error, match=words):
        LoraCase(**{"d_in": 4, "d_out": 6, "r": 2, "alpha": 1.0, **kwargs})


def test_draw_refuses_unknown_names_and_a_missing_seed():
    case = LoraCase(d_in=2, d_out=2, r=1, alpha=1.0)
    with pytest.raises(ValueError, match=r"order names arrays \['y'\]"):
        case.draw(np.random.default_rng(0), entries=uniform_entries(), order=("x", "y"))
    with pytest.raises(ValueError, match="draw needs rng, or a case with a seed"):
        case.draw(entries=uniform_entries(), order=("x",))
    with pytest.raises(TypeError, match="rng must be a numpy.random.Generator, got int"):
        case.draw(3, entries=uniform_entries(), order=("x",))
