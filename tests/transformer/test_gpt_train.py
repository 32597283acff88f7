"""transformer_ref.train (Adam, the LoRA / full fine-tuning loop) and transformer_ref.data (the
generated cipher tasks, evaluate)."""

from __future__ import annotations

import dataclasses
import inspect
import math

import numpy as np
import pytest

from lora_ref.testing import assert_within, tolerance
from transformer_ref import FAST, REFERENCE, add_adapters, init_params, lora_config_for
from transformer_ref.bounds import logit_magnitude, logit_rounding_chain
from transformer_ref.data import CipherTask, downstream_task, evaluate, pretraining_task
from transformer_ref.layers import IGNORE_INDEX
from transformer_ref.train import adam_init, adam_update, train

# ----------------------------------------------------------------------------------------------
# Adam
# ----------------------------------------------------------------------------------------------


def reference_adam(p, grads, lr, b1=0.9, b2=0.999, eps=1e-8):
    """PyTorch's arrangement of Algorithm 1: p -= (lr / c1) m / (sqrt(v) / sqrt(c2) + eps)."""
    m, v = np.zeros_like(p), np.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - (lr / (1 - b1**t)) * m / (np.sqrt(v) / math.sqrt(1 - b2**t) + eps)
    return p


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_adam_matches_the_algorithm(dtype):
    rng = np.random.default_rng(0)
    p0 = {"a": {"x": rng.standard_normal((3, 4))}, "b": rng.standard_normal(5)}
    grads = [{"a": {"x": rng.standard_normal((3, 4))}, "b": rng.standard_normal(5)} for _ in range(3)]
    tree = {"a": {"x": p0["a"]["x"].astype(dtype)}, "b": p0["b"].astype(dtype)}
    state = adam_init(tree)
    for g in grads:
        tree, state = adam_update(tree, {"a": {"x": g["a"]["x"].astype(dtype)}, "b": g["b"].astype(dtype)},
                                  state, lr=0.01)
    assert state.step == 3 and tree["b"].dtype == np.dtype(dtype)
    for path in (("a", "x"), ("b",)):
        got, start = tree, p0
        for k in path:
            got, start = got[k], start[k]
        ref = reference_adam(start, [_get(g, path) for g in grads], 0.01)
        # each step: ~12 roundings on the moments and the update (|update| <= lr / (1 - b1) for Adam's
        # bounded step; here 3 steps of at most lr * sqrt(t)-ish), plus the input cast and the sum into p.
        # 3 steps x 12 roundings, magnitude |p| + 3 lr / (1 - 0.9) covers every term.
        M = np.abs(start) + 3 * 0.01 / (1 - 0.9)
        assert_within(got, ref, 2 * tolerance(dtype, 3 * 12 + 1) * M, what=f"adam {path} {dtype}")


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def test_adam_weight_decay_is_decoupled():
    p = {"w": np.array([2.0])}
    g = {"w": np.array([0.0])}
    new, _ = adam_update(p, g, adam_init(p), lr=0.1, weight_decay=0.5)
    # zero gradient: m = v = 0, so the step is lr * weight_decay * p = 0.1 (AdamW), exactly.
    assert new["w"][0] == 2.0 - 0.1 * 0.5 * 2.0


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def test_cipher_task_batches():
    task = pretraining_task(n_symbols=6, length=3, seed=4)
    inputs, targets = task.batch(5, np.random.default_rng(0))
    assert inputs.shape == targets.shape == (5, 6) and inputs.dtype == np.int64
    assert task.vocab_size == 7 and task.seq_len == 6
    x = inputs[:, :3]
    assert np.all(inputs[:, 3] == task.sep)
    assert np.all(targets[:, :3] == IGNORE_INDEX)                         # x_2, x_3, SEP: not scored
    assert np.array_equal(targets[:, 3:], np.asarray(task.cipher)[x])     # the answers
    assert np.array_equal(inputs[:, 4:], targets[:, 3:5])                 # inputs are targets shifted
    again = task.batch(5, np.random.default_rng(0))
    assert np.array_equal(again[0], inputs) and np.array_equal(again[1], targets)
    assert np.array_equal(task.heldout(7)[0], task.heldout(7)[0])


def test_downstream_task_swaps_pairs():
    pre = pretraining_task(16, 8, seed=0)
    down = downstream_task(pre, n_swaps=3, seed=2)
    differs = [a for a in range(16) if pre.cipher[a] != down.cipher[a]]
    assert differs == list(down.changed) and len(differs) == 6
    assert sorted(down.cipher) == list(range(16))
    assert down.heldout_seed != pre.heldout_seed
    with pytest.raises(ValueError, match=r"n_swaps must be in \[1, 8\] \(disjoint pairs of symbols\), got 9"):
        downstream_task(pre, n_swaps=9)
    with pytest.raises(ValueError, match="cipher must be a permutation"):
        CipherTask((0, 0, 1))


# ----------------------------------------------------------------------------------------------
# Training: pretrain a tiny GPT once, then fine-tune on the downstream task
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pretrained():
    pre = pretraining_task(n_symbols=8, length=4, seed=0)
    down = downstream_task(pre, n_swaps=2, seed=1)
    config = pre.gpt_config(n_embd=32, n_layer=1, n_head=2)
    result = train(init_params(config, 0), config, pre, mode="full", steps=150, batch_size=32, lr=1e-2, seed=0)
    return config, result.params, pre, down


def test_pretraining_learns_the_cipher(pretrained):
    config, params, pre, down = pretrained
    on_pre = evaluate(params, config, None, None, pre, n_examples=256)
    on_down = evaluate(params, config, None, None, down, n_examples=256)
    assert on_pre["accuracy"] == 1.0
    # having learned the pretraining cipher, the model is wrong on every changed symbol downstream
    assert on_down["changed_accuracy"] == 0.0 and on_down["loss"] > on_pre["loss"]


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_fine_tuning_learns_the_downstream_task(pretrained, mode):
    config, params, pre, down = pretrained
    lc = lora_config_for(["q", "v"], r=4) if mode == "lora" else None
    kwargs = dict(mode=mode, lora_config=lc, steps=40, batch_size=32, lr=1e-2 if mode == "lora" else 3e-3, seed=1)
    before = evaluate(params, config, None, None, down, n_examples=256)
    result = train(params, config, down, **kwargs)
    after = evaluate(result.params, config, result.adapters, lc, down, n_examples=256)
    assert len(result.losses) == 40
    assert after["loss"] < before["loss"]
    # the changed symbols: from 0 to better than guessing among the 8 symbols
    assert after["changed_accuracy"] > 1 / down.n_symbols
    if mode == "lora":
        assert result.params is not params and all(result.params[k] is params[k] for k in params)   # base frozen
        assert sorted(result.adapters) == ["transformer.h.0.attn.c_attn"]
    else:
        assert result.adapters is None
    # deterministic: the same arguments give the same run, bit for bit
    again = train(params, config, down, **kwargs)
    assert again.losses == result.losses


def test_lora_dropout_training_is_deterministic(pretrained, capsys):
    config, params, _, down = pretrained
    lc = lora_config_for(["q", "v"], r=2, dropout=0.1)
    runs = [train(params, config, down, mode="lora", lora_config=lc, steps=5, batch_size=8, seed=s) for s in (3, 3, 4)]
    assert runs[0].losses == runs[1].losses and runs[0].losses != runs[2].losses
    for name in runs[0].adapters:
        assert np.array_equal(runs[0].adapters[name]["B"], runs[1].adapters[name]["B"])
    assert capsys.readouterr().err == ""      # no progress bar when stderr is not a terminal


def test_train_continues_given_adapters(pretrained):
    config, params, _, down = pretrained
    lc = lora_config_for(["v"], r=2)
    adapters = add_adapters(params, config, lc, 0)
    result = train(params, config, down, mode="lora", lora_config=lc, adapters=adapters, steps=2, batch_size=4)
    assert not np.array_equal(result.adapters["transformer.h.0.attn.c_attn"]["B"],
                              adapters["transformer.h.0.attn.c_attn"]["B"])
    assert np.all(adapters["transformer.h.0.attn.c_attn"]["B"] == 0.0)     # the input is not modified


def test_train_rejects_bad_arguments(pretrained):
    config, params, _, down = pretrained
    with pytest.raises(ValueError, match="mode must be 'lora', 'qlora' or 'full', got 'half'"):
        train(params, config, down, mode="half")
    with pytest.raises(TypeError, match="mode='lora' needs lora_config"):
        train(params, config, down, mode="lora")
    with pytest.raises(ValueError, match="mode='full' trains params only"):
        train(params, config, down, mode="full", adapters={})
    with pytest.raises(TypeError, match="task must have a batch"):
        train(params, config, [1, 2], mode="full")
    with pytest.raises(ValueError, match="lr must be positive, got -1"):
        train(params, config, down, mode="full", lr=-1)
    with pytest.raises(TypeError, match="ops must be a transformer_ref.layers.Ops"):
        train(params, config, down, mode="full", ops=None)
    with pytest.raises(ValueError, match=r"threads must be a positive int \(or None\), got 0"):
        train(params, config, down, mode="full", threads=0)


def _counting(ops):
    """``ops`` with its projection counted: proves an op set reaches the model."""
    calls = []

    def linear(*args):
        calls.append(1)
        return ops.linear(*args)
    return dataclasses.replace(ops, linear=linear), calls


def test_train_and_evaluate_compute_with_the_op_set_given(pretrained):
    config, params, _, down = pretrained
    assert inspect.signature(train).parameters["ops"].default is FAST          # training: the speed order
    assert inspect.signature(evaluate).parameters["ops"].default is REFERENCE  # evaluation: the reference
    lc = lora_config_for(["v"], r=2)
    ops, calls = _counting(REFERENCE)
    result = train(params, config, down, mode="lora", lora_config=lc, steps=1, batch_size=4, ops=ops, threads=1)
    assert len(calls) == 4 * config.n_layer + 1                                # one forward: every projection
    default = train(params, config, down, mode="lora", lora_config=lc, steps=1, batch_size=4, ops=FAST, threads=1)
    # the first loss (before any update) in two evaluation orders: one forward each, so at most
    # 2 gamma_n M apart, n the roundings along the longest path to the loss (float64) and M bounding
    # its terms: shifted logits within 2 max|logit| of 0, log of a sum of V terms <= 1 each
    n = logit_rounding_chain(config, 2, T=down.seq_len, loss_batch=4 * down.seq_len)
    M = 2 * logit_magnitude(params, config) + math.log(config.vocab_size)
    assert_within(result.losses[0], default.losses[0], 2 * tolerance("float64", n) * M,
                  what="first loss, REFERENCE vs FAST")
    ops, calls = _counting(FAST)
    evaluate(params, config, None, None, down, n_examples=8, ops=ops)
    assert len(calls) == 4 * config.n_layer + 1
