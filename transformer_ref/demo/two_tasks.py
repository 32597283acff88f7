"""Step 4 of the ``lora-ref demo`` experiment: two adapters on one base (issue 15), served together
in one mixed batch, then combined into one.

Task A is the demo's downstream task; task B swaps other pairs of symbols
(:func:`~transformer_ref.demo.common.second_task`, the pairing ``lora-ref combine`` uses too).
Adapter ``a`` is the demo's LoRA (W_q, W_v) run at ``variant_rank`` (trained on task A); adapter
``b`` has the same configuration, its own initial A, and is trained on task B with the same steps,
batch size, learning rate and batch seed.

**The mixed batch** (``lora_ref.adapters``' (S2), PEFT's ``adapter_names=``): ``n`` held-out strings
of task A with adapter a, ``n`` of task B with adapter b and ``n`` of the pretraining task with no
adapter (``"__base__"``), interleaved in one batch of 3n rows through one forward of
``transformer_ref.forward(params, x, config, AdapterSet, adapter_names=[...])``. Each row's loss
(mean cross-entropy over its answer tokens, computed in float64 from the logits) is held against the
same row's loss when its group runs alone with its own adapter (a single adapter dict, or none).

Bound. Each side's logits are one forward pass of at most ``n_c`` roundings
(``transformer_ref.bounds.logit_rounding_chain``), so to first order each is within ``gamma_nc M``
of the exact logits (M: ``logit_magnitude``) and they differ by at most ``2 gamma_nc M`` (the merge
check's argument). A row's loss ``(1/N) sum_t (logsumexp(z_t) - z_t[y_t])`` has gradient
``(p_t - e_y) / N`` in each position's logits, of l1 norm at most 2 / N, so the two exact losses
differ by at most ``2 max |dz| <= 4 gamma_nc M``. Computing the loss in float64 from each side's
logits adds at most ``gamma_k (2M + log V)`` per side, k = V + T + 4 (shift, exp, the V-term sum,
log, subtract, the mean over at most T positions; each term at most 2M + log V in size):

    |loss_mixed - loss_alone| <= 4 gamma_nc(dtype) M + 2 gamma_k(float64) (2M + log V)      (MB)

*effect*: how far the row's loss moves with the other adapter (adapter b for task A's rows, a for
task B's and for the base rows): a mixed batch that gave a row the wrong adapter would fail (MB)
by that much.

**The combinations** (``lora_ref.combine.combine_adapters``, weights (1, 1)): ``exact`` (the sum of
deltas (C1) ``dW* = s B_a A_a + s B_b A_b`` as factors, rank 2r), PEFT's ``cat`` (the same
construction, rounded as PEFT does), ``svd`` (the best rank-r approximation of (C1)) and ``linear``
(``(B_a + B_b)(A_a + A_b) s``, which adds the cross terms ``s (B_a A_b + B_b A_a)``: PEFT issue
#3004). A fused ``c_attn`` adapter is combined block by block (each block is an adapter of its own
(C, C) rows) and put back together with the same ``enable_lora`` flags. As ``lora-ref combine``
does, the trained factors are widened exactly to float64 and combined there: *error* is
``max ||dW - dW*||_F / ||dW*||_F`` over the adapted weights (for ``exact`` and ``cat`` beside its
rounding bound, ``||2 gamma_n M||_F / ||dW*||_F``, n = 2r + 3, M = sum_i |s| |B_i| |A_i|: the
derivation of :mod:`transformer_ref.demo.combination`). Each combined model -- its factors rounded
to the training dtype -- is then evaluated as the demo evaluates every run (``data.evaluate``, the
REFERENCE op set, the training dtype), on both tasks' held-out strings: held-out loss and
swapped-symbol accuracy. The baselines on task A are the demo's own numbers (the pretrained model
before fine-tuning, adapter a's run).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from lora_ref.adapters import BASE, AdapterSet
from lora_ref.backend import asarray, dtype_name, to_numpy
from lora_ref.combine import combine_adapters, weighted_delta
from lora_ref.testing import tolerance

from .. import REFERENCE, forward
from ..bounds import logit_magnitude, logit_rounding_chain
from ..count import lora_config_for
from ..data import evaluate
from ..layers import IGNORE_INDEX
from .common import Setup, exact_bound, one_value, rel_norm, second_task, train_adapter

__all__ = ["METHODS", "MIXED_ROWS", "sample_losses", "two_tasks"]

METHODS = ("exact", "cat", "svd", "linear")
"""The combinations the demo measures (``lora_ref.combine.METHODS`` has PEFT's others)."""
MIXED_ROWS = 32
"""Rows of each group (task A, task B, no adapter) in the mixed batch, at most ``eval_examples``."""
_WEIGHTS = (1.0, 1.0)


def two_tasks(setup: Setup, pretrained: Mapping[str, Any], trained: Mapping[str, Any], timing: dict[str, Any],
              progress: Any = None, known: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The result's ``"two_tasks"`` section: adapter b trained on task B, the mixed batch and the
    combinations (this module's docstring). ``trained``: ``{run key: (TrainResult, LoraConfig)}``
    of the demo's runs, which must hold ``lora-qv-r{variant_rank}`` (adapter a). Seconds go to
    ``timing``: ``adapter_b_s`` (training adapter b), ``mixed_batch_s``, ``combinations_s``;
    ``progress``: a tqdm bar whose postfix names the step, or None. ``known``: evaluations on task
    A the demo already made, ``{"pretrained": ..., "a": ...}`` (``data.evaluate`` of the pretrained
    model and of adapter a's run, as the combinations evaluate), reused instead of recomputed."""
    if not isinstance(setup, Setup):
        raise TypeError(f"setup must be a transformer_ref.demo.common.Setup (from make_setup), got {type(setup).__name__}")
    config = setup.config
    key_a = f"lora-qv-r{config.variant_rank}"
    if key_a not in trained:
        raise ValueError(f"trained must hold the run {key_a!r} (adapter a), got {sorted(trained)}")
    t0 = time.perf_counter()
    res_a, lc = trained[key_a]
    tasks = {"A": setup.downstream, "B": second_task(setup)}
    res_b = train_adapter(setup, pretrained, tasks["B"], lc, f"task-b-qv-r{config.variant_rank}")
    adapters = {"a": res_a.adapters, "b": res_b.adapters}
    tail = res_b.losses[-max(1, len(res_b.losses) // 10):]
    out: dict[str, Any] = {
        "rank": config.variant_rank, "matrices": ["q", "v"], "weights": list(_WEIGHTS),
        "tasks": {k: {"changed": list(t.changed)} for k, t in tasks.items()},
        "adapters": {"a": {"task": "A", "run": key_a},
                     "b": {"task": "B", "losses": [float(v) for v in res_b.losses],
                           "final_train_loss": float(np.mean(tail))}},
    }
    timing["adapter_b_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if progress is not None:
        progress.set_postfix_str("mixed batch")
    out["mixed_batch"] = _mixed_batch(setup, pretrained, adapters, lc, tasks)
    timing["mixed_batch_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if progress is not None:
        progress.set_postfix_str("combinations")
    out["combinations"] = _combinations(setup, pretrained, adapters, lc, tasks, dict(known or {}))
    timing["combinations_s"] = time.perf_counter() - t0
    return out


# ============================================================================================
# The mixed batch
# ============================================================================================


def sample_losses(logits: Any, targets: Any) -> np.ndarray:
    """Each row's mean cross-entropy over its scored positions, in float64: logits (N, T, V),
    targets (N, T) with ``IGNORE_INDEX`` (-100) where not scored -> (N,)."""
    z = to_numpy(logits).astype(np.float64)
    t = np.asarray(to_numpy(targets))
    if z.ndim != 3 or t.shape != z.shape[:2]:
        raise ValueError(f"logits must be (N, T, V) and targets (N, T), got {z.shape} and {t.shape}")
    z = z - z.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))                           # (N, T, V)
    mask = t != IGNORE_INDEX
    picked = np.take_along_axis(logp, np.where(mask, t, 0)[..., None], axis=-1)[..., 0]  # (N, T)
    return -(picked * mask).sum(axis=1) / mask.sum(axis=1)


def _mixed_batch(setup: Setup, params: Mapping[str, Any], adapters: dict[str, Any], lc: Any,
                 tasks: dict[str, Any]) -> dict[str, Any]:
    """(S2) in one forward against each group alone, per row, within the bound (MB)."""
    config, gpt = setup.config, setup.gpt
    n = min(config.eval_examples, MIXED_ROWS)
    groups = {"a": tasks["A"], "b": tasks["B"], BASE: setup.pretraining}                 # name -> its rows' task
    other = {"a": "b", "b": "a", BASE: "a"}                                              # the wrong adapter
    data = {g: task.heldout(n) for g, task in groups.items()}                            # (n, T) inputs, targets
    names = [g for _ in range(n) for g in groups]                                        # a, b, base, a, b, ...
    x = np.stack([data[g][0][i] for i in range(n) for g in groups])                     # (3n, T) interleaved
    t = np.stack([data[g][1][i] for i in range(n) for g in groups])                     # (3n, T)
    aset = AdapterSet({k: (lc, ad) for k, ad in adapters.items()}, active=list(adapters))
    mixed = sample_losses(forward(params, asarray(x), gpt, aset, adapter_names=names, ops=REFERENCE), t)  # (3n,)

    def alone(name: str, g: str) -> np.ndarray:
        ad, c = (None, None) if name == BASE else (adapters[name], lc)
        return sample_losses(forward(params, asarray(data[g][0]), gpt, ad, c, ops=REFERENCE), data[g][1])  # (n,)

    dtype = dtype_name(to_numpy(next(iter(params.values()))).dtype)
    nc, M, V = logit_rounding_chain(gpt, config.variant_rank), logit_magnitude(params, gpt), gpt.vocab_size
    k = V + setup.pretraining.seq_len + 4
    bound = 4.0 * tolerance(dtype, nc) * M + 2.0 * tolerance("float64", k) * (2.0 * M + math.log(V))   # (MB)
    out: dict[str, Any] = {"rows": 3 * n, "dtype": dtype, "chain_length": nc, "magnitude": M, "bound": bound,
                           "groups": {}}
    for j, g in enumerate(groups):
        own, wrong = alone(g, g), alone(other[g], g)
        in_batch = mixed[j::len(groups)]                                                 # (n,) this group's rows
        out["groups"][g] = {"task": {"a": "A", "b": "B", BASE: "pretraining"}[g], "samples": n,
                            "other": other[g], "max_abs_error": float(np.max(np.abs(in_batch - own))),
                            "loss_alone": float(np.mean(own)), "loss_other": float(np.mean(wrong)),
                            "effect": float(np.max(np.abs(wrong - own)))}
    out["max_abs_error"] = max(v["max_abs_error"] for v in out["groups"].values())
    return out


# ============================================================================================
# The combinations
# ============================================================================================


def _pieces(ad: Mapping[str, Any], lc: Any, module: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """The weights an adapter of ``module`` acts on, each as ``(A (r, d_in), B (d_out, r))`` in
    float64 (exact widening): the module itself, or each enabled block of a fused one."""
    A, B = to_numpy(ad["A"]).astype(np.float64), to_numpy(ad["B"]).astype(np.float64)
    enable = lc.enable_for(module)
    if enable is None:
        return [(A, B)]
    n, r = sum(enable), lc.rank_for(module)
    q = B.shape[0] // n
    return [(A[k * r:(k + 1) * r, :], B[k * q:(k + 1) * q, :]) for k in range(n)]      # (r, C), (q, r)


def _combinations(setup: Setup, pretrained: Mapping[str, Any], adapters: dict[str, Any], lc: Any,
                  tasks: dict[str, Any], known: dict[str, Any]) -> dict[str, Any]:
    """Each method's rank, scale and error against (C1), in float64, and the combined model on both
    tasks, with the baselines (no adapter, each adapter alone), in the training dtype."""
    config, gpt = setup.config, setup.gpt
    dtype = dtype_name(to_numpy(next(iter(pretrained.values()))).dtype)
    keep = ("loss", "accuracy", "changed_accuracy")

    def on_tasks(ads: Any, c: Any, name: str | None = None) -> dict[str, Any]:
        return {k: {m: e[m] for m in keep}
                for k, task in tasks.items()
                for e in ((known[name] if k == "A" and name in known else
                           evaluate(pretrained, gpt, ads, c, task, config.eval_examples)),)}

    out: dict[str, Any] = {"baselines": {"pretrained": on_tasks(None, None, "pretrained")}, "methods": {}}
    for name, ad in adapters.items():
        out["baselines"][name] = on_tasks(ad, lc, name)
    modules = list(adapters["a"])
    pieces = {m: [_pieces(adapters[n][m], lc, m) for n in adapters] for m in modules}     # [a's, b's] per module
    for method in METHODS:
        combined, errors, bounds = {}, [], []
        for m in modules:
            parts = []
            for (Aa, Ba), (Ab, Bb) in zip(*pieces[m]):
                s = lc.scale_for(m)
                sources = {"a": (Aa, Ba, s), "b": (Ab, Bb, s)}
                c = combine_adapters(sources, _WEIGHTS, method)
                target = weighted_delta(sources, _WEIGHTS)                                # (C1), (d_out, d_in)
                errors.append(rel_norm(c.scale * (c.B @ c.A) - target, target))
                # exact and cat against (C1): 2 gamma_n M entrywise, n = R + n_a + 1 roundings (R = sum of the
                # ranks, n_a adapters), M = sum_i |w_i s_i| |B_i| |A_i| (lora-ref combine's derivation)
                bounds.append(exact_bound(sources, _WEIGHTS, target)["bound"])
                parts.append(c)
            combined[m] = parts
        every = [c for parts in combined.values() for c in parts]
        rank = one_value((c.rank for c in every), f"{method}: the weights' combinations' ranks")
        scale = one_value((c.scale for c in every), f"{method}: the weights' combinations' scales")
        new = lora_config_for(("q", "v"), rank, alpha=rank * scale, family=gpt)
        # the combined factors rounded to the training dtype: each model is evaluated as the demo's runs are
        ads = {m: {"A": asarray(np.concatenate([c.A for c in parts], axis=0).astype(dtype)),   # (n rank, C)
                   "B": asarray(np.concatenate([c.B for c in parts], axis=0).astype(dtype))}   # (n q, rank)
               for m, parts in combined.items()}
        if any(new.scale_for(m) != scale or new.enable_for(m) != lc.enable_for(m) for m in modules):
            raise RuntimeError(f"{method}: the combined LoraConfig does not give scale {scale} and the adapters' blocks")
        out["methods"][method] = {"rank": rank, "scale": scale, "error": max(errors),
                                  "bound": max(bounds) if method in ("exact", "cat") else None,
                                  "eval": on_tasks(ads, new)}
    return out
