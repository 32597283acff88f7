"""The benchmark harness works: one tiny configuration end to end, and its arithmetic.

Nothing here asserts on time: timings are the benchmarks' output, not a property to test. What
is tested is that the runner runs, writes JSON and a page, and that its FLOP formula and ratio
arithmetic are right. PyTorch is left out (this file is not an interop test).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _importable(monkeypatch: pytest.MonkeyPatch) -> None:
    # benchmarks/ is a folder of the repository, not an installed package.
    if str(ROOT) not in sys.path:
        monkeypatch.syspath_prepend(str(ROOT))


def _products(C: int, L: int, T: int, N: int, V: int, r: int, n_batch: int) -> dict[str, float]:
    """FLOPs of one step, enumerated product by product as (m, k, n) shapes: an independent
    derivation of benchmarks.flops.step_flops's closed forms (2 m k n per product)."""
    F = 4 * C
    f = lambda m, k, n: 2.0 * m * k * n  # noqa: E731
    layer_fwd = [f(N, C, 3 * C), f(N, C, C), f(N, C, F), f(N, F, C),          # c_attn, c_proj, c_fc, mlp.c_proj
                 n_batch * f(T, C, T), n_batch * f(T, T, C)]                  # Q K^T and P V over all heads
    lora_fwd = [f(N, C, r), f(N, r, 3 * C)]                                   # x A^T, (x A^T) B^T
    head = f(N, C, V)
    fwd_base = L * sum(layer_fwd) + head
    fwd_lora = fwd_base + L * sum(lora_fwd)
    # LoRA backward: input gradients of the four projections (transposed shapes, same cost),
    # attention's four products, LoRA's dB, d(xA^T), dA, dx; layer 0 skips c_attn's dx and A's dx.
    layer_bwd = sum(layer_fwd[:4]) + 2 * sum(layer_fwd[4:])
    lora_bwd = [f(3 * C, N, r), f(N, 3 * C, r), f(r, N, C), f(N, r, C)]
    bwd_lora = L * (layer_bwd + sum(lora_bwd)) - f(N, 3 * C, C) - f(N, r, C) + head
    return {"base_forward": fwd_base, "lora_forward": fwd_lora, "lora_step": fwd_lora + bwd_lora,
            "full_step": 3 * fwd_base}


@pytest.mark.parametrize("dims", [(128, 4, 64, 16, 128, 8), (512, 6, 128, 8, 128, 8), (32, 2, 16, 2, 64, 4)])
def test_flop_formula_matches_product_by_product_count(dims: tuple[int, ...]) -> None:
    from benchmarks.flops import StepShape, step_flops

    C, L, T, batch, V, r = dims
    shape = StepShape(n_embd=C, n_layer=L, seq_len=T, batch=batch, vocab=V, r=r)
    want = _products(C, L, T, batch * T, V, r, batch)
    got = step_flops(shape)
    for key, value in want.items():
        assert got[key] == value, key   # integers below 2^53: exact in float64


def test_flop_formula_matches_prototype() -> None:
    """The hand-written NumPy prototype (the team's PERFORMANCE.md notes) counted its step at
    3.69 / 5.34 GFLOP (small, LoRA / full) and 81.4 / 121.2 GFLOP (large) with vocabulary 128;
    the formula reproduces those to the digits reported."""
    from benchmarks.flops import step_flops
    from benchmarks.suites import CONFIGS

    small, large = step_flops(CONFIGS["small"]), step_flops(CONFIGS["large"])
    assert (round(small["lora_step"] / 1e9, 2), round(small["full_step"] / 1e9, 2)) == (3.69, 5.34)
    assert (round(large["lora_step"] / 1e9, 1), round(large["full_step"] / 1e9, 1)) == (81.4, 121.2)


def test_alternate_rotates_order_and_counts_runs() -> None:
    from benchmarks.harness import alternate

    calls: list[str] = []
    times = alternate({"a": lambda: calls.append("a"), "b": lambda: calls.append("b"),
                       "c": lambda: calls.append("c")}, repeats=3, warmup=1)
    # one warm-up round in order, then rounds rotated by one each time
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}
    assert all(t >= 0.0 for ts in times.values() for t in ts)


def test_paired_ratio_is_median_of_per_round_ratios() -> None:
    from benchmarks.harness import paired_ratio

    # per-round ratios 1/1, 4/2, 9/3 = 1, 2, 3: median 2; medians 4 / 2 = 2; extremes 1 and 3.
    out = paired_ratio([1.0, 4.0, 9.0], [1.0, 2.0, 3.0])
    assert (out["median"], out["min"], out["max"], out["ratio_of_medians"]) == (2.0, 1.0, 3.0, 2.0)
    with pytest.raises(ValueError, match="equally long"):
        paired_ratio([1.0], [1.0, 2.0])


def test_tiny_run_writes_json_page_and_plot(tmp_path: Path) -> None:
    from benchmarks import report
    from benchmarks.run import main, run_all
    from benchmarks.suites import TINY

    results = run_all(quick=True, configs={"tiny": TINY}, with_torch=False, repeats=1, warmup=0,
                      suites=("peak", "training", "inference", "memory", "backends", "gpu"),
                      peak_sizes=(32, 64))
    results = json.loads(json.dumps(results))                      # JSON-ready as is
    (train,) = results["training"]
    assert set(train["times"]) == {"ref_lora", "ref_full"}
    for t in train["times"].values():
        assert len(t["runs_s"]) == 1 and t["median_s"] > 0.0
    # the same-function check ran and passed: LoRA-adapted vs merged-then-full logits
    assert train["same_logits"]["ref_lora vs ref_full"] <= train["same_logits"]["bound"]
    ratio = train["ratios"]["ref_lora/ref_full"]
    assert math.isclose(ratio["median"], train["times"]["ref_lora"]["median_s"] / train["times"]["ref_full"]["median_s"],
                        rel_tol=1e-3)                                # runs are stored to 1 microsecond
    assert train["trainable"]["ref_lora"] == TINY.n_layer * TINY.r * 4 * TINY.n_embd   # r (C + 3C) per layer
    (inf,) = results["inference"]
    assert set(inf["times"]) == {"base", "merged", "unmerged"}
    (mem,) = results["memory"]
    assert mem["lora"]["peak_bytes"] > 0 and mem["full"]["peak_bytes"] > 0
    assert results["gpu"].startswith("not measured") or results["gpu"]
    assert [t["met"] for t in results["targets"]][:4] == [None] * 4   # small/large not run here

    page = tmp_path / "performance.md"
    plot = report.write_plot(results, tmp_path / "performance.png")
    text = report.write_page(results, page, plot.name)
    assert plot.stat().st_size > 0 and page.read_text() == text
    assert "## Training step" in text and TINY.label in text
    assert "```python" not in text                                  # the docs test would run it

    # the command line: JSON and page where asked
    out = tmp_path / "cli.json"
    assert main(["--sizes", "tiny", "--no-torch", "--quick", "--only", "training",
                 "--out", str(out), "--page", str(tmp_path / "cli.md")]) == 0
    assert json.loads(out.read_text())["training"][0]["label"] == TINY.label
    assert (tmp_path / "cli.md").exists() and (tmp_path / "cli.png").exists()


def test_profile_times_a_copy_of_the_op_set_and_leaves_fast_alone() -> None:
    """benchmarks.breakdown times a copy of an op set (new primitives with the same forwards and
    VJPs): the copy computes the very same numbers, FAST itself is untouched, every timed layer is
    seen forward and (for what LoRA differentiates) backward."""
    import dataclasses

    import autograd
    import numpy as np

    from benchmarks.breakdown import step_breakdown, timed_ops
    from benchmarks.ref_gpt2 import make_model, make_ref_step
    from benchmarks.suites import TINY
    from transformer_ref import FAST, loss

    before = {f.name: getattr(FAST, f.name) for f in dataclasses.fields(FAST)}
    ops, totals = timed_ops(FAST)
    model = make_model(TINY)
    params, tokens, targets, adapters, lc, config = (model[k] for k in (
        "params", "tokens", "targets", "adapters", "lora_config", "config"))
    value, grads = autograd.value_and_grad(lambda ad: loss(params, tokens, targets, config, ad, lc, ops=ops))(adapters)
    ref_value, ref_grads = autograd.value_and_grad(lambda ad: loss(params, tokens, targets, config, ad, lc, ops=FAST))(adapters)
    assert float(value) == float(ref_value)                       # the same code: bitwise
    assert all(np.array_equal(grads[k][p], ref_grads[k][p]) for k in grads for p in ("A", "B"))
    assert {f.name: getattr(FAST, f.name) for f in dataclasses.fields(FAST)} == before
    for layer in ("linear", "layer_norm", "gelu", "causal_attention", "cross_entropy", "embedding"):
        assert totals[f"{layer} forward"] > 0.0, layer
    for layer in ("linear", "layer_norm", "gelu", "causal_attention", "cross_entropy"):
        assert totals[f"{layer} backward"] > 0.0, layer
    step = make_ref_step(model, "lora", threads=1, ops=ops)
    step["step"]()
    out = step_breakdown(step["step"], totals, repeats=1)
    assert out["step_ms"] > 0.0 and "linear forward" in out["parts_ms"]


def test_step_command_runs(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks.step import main

    assert main(["--n-embd", "16", "--n-layer", "1", "--n-head", "2", "--seq", "8", "--batch", "2",
                 "--vocab", "16", "--warmup", "0", "--steps", "1", "--threads", "1", "--default-malloc"]) == 0
    line = capsys.readouterr().out
    assert line.startswith("lora step, float32, n_embd=16") and "1 batch slice(s) in parallel" in line
