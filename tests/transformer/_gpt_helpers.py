"""Shared fixtures-by-function for the transformer_ref tests: tiny models and derived error bounds.

Error bounds follow lora_ref.testing: two computations of the same quantity, each a chain of at
most ``n`` roundings away from the exact value, differ by at most ``2 gamma_n M`` to first order,
where ``M`` is the scale of the terms being rounded. For a whole model, ``n`` is the number of
roundings along the longest path from an input to the output (:func:`chain_length`: every
dot product and reduction of length k contributes k, every elementwise operation 1), and ``M``
is a magnitude that bounds the terms on that path's last step (:func:`logit_magnitude` for
logits; the largest entry of a gradient array for gradients, whose backward path is at most the
forward path again, so ``2 * chain_length``). These are first-order bounds for a tiny,
well-conditioned model in float64/float32; a real mistake (a missing scale, a transposed weight,
a wrong sign) shows up at the size of ``M`` itself, ~1e12 times larger in float64.
"""

from __future__ import annotations


import numpy as np

from lora_ref import to_numpy
from lora_ref.testing import assert_within, tolerance
from transformer_ref import GPTConfig, LlamaConfig, add_adapters, init_params
from transformer_ref.bounds import logit_magnitude as _logit_magnitude
from transformer_ref.bounds import logit_rounding_chain

TINY = GPTConfig(vocab_size=11, n_positions=8, n_embd=8, n_layer=2, n_head=2)
HOST_LLAMA = LlamaConfig(vocab_size=13, hidden_size=8, intermediate_size=12, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, max_position_embeddings=8)   # the test_host_* files' LLaMA


def tiny_model(dtype="float64", seed=0, config=TINY):
    """Params with non-trivial LayerNorm and biases (so their gradients are exercised), tokens
    (2, 6) and targets (2, 6) with one ignored target."""
    rng = np.random.default_rng(seed)
    params = init_params(config, rng, dtype)
    # GPT-2 init makes biases 0 and LN weights 1; perturb them so every term of every formula matters,
    # and scale weights up so the logits are not all near zero.
    out = {}
    for name, value in params.items():
        v = to_numpy(value).astype(np.float64)
        if name.endswith(".bias") or ".ln_" in name or "ln_f" in name:
            v = v + 0.3 * rng.standard_normal(v.shape)
        else:
            v = v * 10.0
        out[name] = v.astype(dtype)
    tokens = rng.integers(0, config.vocab_size, size=(2, 6))
    targets = rng.integers(0, config.vocab_size, size=(2, 6))
    targets[0, 0] = -100
    return out, tokens, targets


def family_model(config, dtype="float64", seed=0, *, ignore_target=True):
    """Params, tokens (2, 6) and targets (2, 6) of either family. ``TINY``: :func:`tiny_model`
    (one target always ignored). Any other config (LLaMA): ``init_params`` drawn in float64, every
    weight but the RMSNorm ones times 10, then tokens, then targets from the same generator, and
    ``targets[0, 0] = -100`` unless ``ignore_target=False``."""
    if config is TINY:
        return tiny_model(dtype, seed)
    rng = np.random.default_rng(seed)
    params = {k: (v * (1.0 if k.endswith("norm.weight") else 10.0)).astype(dtype)
              for k, v in init_params(config, rng, "float64").items()}
    tokens, targets = rng.integers(0, config.vocab_size, (2, 6)), rng.integers(0, config.vocab_size, (2, 6))
    if ignore_target:
        targets[0, 0] = -100
    return params, tokens, targets


def random_adapters(params, config, lora_config, seed=1):
    """Adapters with both A and B random (init="random" semantics whatever the config says)."""
    from dataclasses import replace

    return add_adapters(params, config, replace(lora_config, init="random"), np.random.default_rng(seed))


def chain_length(config: GPTConfig, r: int = 0, T: int | None = None) -> int:
    """Roundings along the longest input-to-loss path (forward) for these tests' batches of 2
    sequences: :func:`transformer_ref.bounds.logit_rounding_chain` plus the mean cross-entropy
    over N = 2T positions."""
    T = config.n_positions if T is None else T
    return logit_rounding_chain(config, r, T=T, loss_batch=2 * T)


def logit_magnitude(params, config: GPTConfig) -> float:
    """See :func:`transformer_ref.bounds.logit_magnitude`."""
    return _logit_magnitude(params, config)


def assert_trees_close(actual, expected, dtype, n, *, what):
    """Every array of two (nested) dicts within ``2 gamma_n max|expected array|``."""
    if isinstance(expected, dict):
        assert set(actual) == set(expected), f"{what}: keys differ"
        for k in expected:
            assert_trees_close(actual[k], expected[k], dtype, n, what=f"{what}[{k!r}]")
        return
    e = to_numpy(expected).astype(np.float64)
    M = float(np.abs(e).max()) if e.size else 0.0
    assert_within(actual, e, 2 * tolerance(dtype, n) * M, what=what)


def tree_to_numpy(tree):
    if isinstance(tree, dict):
        return {k: tree_to_numpy(v) for k, v in tree.items()}
    return to_numpy(tree)


def tree_asarray(tree):
    from lora_ref import asarray

    if isinstance(tree, dict):
        return {k: tree_asarray(v) for k, v in tree.items()}
    return asarray(tree)


def rms_magnitudes(x, w, g, eps):
    """(|y|, M_dx, M_dw) in float64; rho = rsqrt(mean(x^2) + eps), xhat = x rho (no cancellation in y).
    rho is computed with each row divided by its largest magnitude s (when s > 1), so it does not overflow."""
    x, w, g = (np.asarray(a, np.float64) for a in (x, w, g))
    top = np.abs(x).max(axis=-1, keepdims=True)
    s = np.where(top > 1.0, top, 1.0)
    rho = (1.0 / s) / np.sqrt(np.mean((x / s) ** 2, axis=-1, keepdims=True) + eps / s / s)
    xhat, gw = np.abs(x) * rho, np.abs(g * w)
    M_dx = rho * (gw + xhat * np.mean(gw * xhat, axis=-1, keepdims=True))
    return xhat * np.abs(w), M_dx, (np.abs(g) * xhat).reshape(-1, x.shape[-1]).sum(0)
