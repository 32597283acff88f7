"""The benchmark harness works: a quick run end to end, and its arithmetic.

Nothing here asserts on time: timings are the benchmarks' output, not a property to test. What
is tested is that the runner runs its sides in fresh processes in rotating order, writes a
results file per CPU kind and a page, that the lora-ref side is the public train() loop with its
defaults, and that its FLOP formula and ratio arithmetic are right. PyTorch is left out (this
file is not an interop test).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
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


@pytest.mark.parametrize("dims", [(128, 4, 64, 16, 128, 8), (512, 6, 128, 8, 128, 8), (32, 2, 16, 2, 64, 4)])
def test_llama_flop_formula_matches_product_by_product_count(dims: tuple[int, ...]) -> None:
    """LLaMA (q, k, v, o; gate, up, down with F = 4C; LoRA on q and v; untied head), enumerated."""
    from benchmarks.flops import StepShape, step_flops

    C, L, T, batch, V, r = dims
    N, F = batch * T, 4 * C
    f = lambda m, k, n: 2.0 * m * k * n  # noqa: E731
    layer_fwd = [f(N, C, C)] * 4 + [f(N, C, F), f(N, C, F), f(N, F, C)] + [batch * f(T, C, T), batch * f(T, T, C)]
    lora_fwd = 2 * [f(N, C, r), f(N, r, C)]                                   # q and v: x A^T, (x A^T) B^T
    head = f(N, C, V)
    fwd_base = L * sum(layer_fwd) + head
    fwd_lora = fwd_base + L * sum(lora_fwd)
    layer_bwd = sum(layer_fwd[:7]) + 2 * sum(layer_fwd[7:])                   # activation gradients; attention x2
    lora_bwd = 2 * [f(C, N, r), f(N, C, r), f(r, N, C), f(N, r, C)]           # dB, d(x A^T), dA, dx per adapter
    # layer 0: nothing below is trainable, so no input gradient of q, k, v nor through either A
    bwd_lora = L * (layer_bwd + sum(lora_bwd)) - 3 * f(N, C, C) - 2 * f(N, r, C) + head
    got = step_flops(StepShape(n_embd=C, n_layer=L, seq_len=T, batch=batch, vocab=V, r=r, family="llama"))
    assert got["lora_step"] == fwd_lora + bwd_lora and got["full_step"] == 3 * fwd_base
    assert got["base_forward"] == fwd_base and got["lora_forward"] == fwd_lora


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


def test_cpu_kind_names_vendor_and_family() -> None:
    from benchmarks.harness import cpu_kind, cpu_model

    assert cpu_kind("Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz") == "intel-xeon"
    assert cpu_kind("AMD EPYC 7B13 64-Core Processor") == "amd-epyc"
    assert cpu_kind("AMD EPYC") == "amd-epyc"
    assert cpu_kind("Intel(R) Core(TM) i7-10700 CPU @ 2.90GHz") == "intel-core"
    assert cpu_kind("").startswith("cpu-")                          # no name: the architecture
    assert cpu_kind() == cpu_kind(cpu_model())


def test_rounds_rotate_and_ratio_is_median_of_per_round_ratios(monkeypatch: pytest.MonkeyPatch) -> None:
    """compare() without processes: a fake worker returns made-up medians; the order rotates
    each round and every ratio is the median of the per-round ratios of the sides' medians."""
    from benchmarks import rounds
    from benchmarks.suites import TINY

    calls: list[str] = []
    medians = {"lora-ref": [1.0, 4.0, 9.0], "torch-eager": [1.0, 2.0, 3.0], "lora-ref-full": [2.0, 2.0, 2.0]}

    def fake(args: list[str], **_: object) -> dict[str, object]:
        side = args[args.index("--lib") + 1]
        calls.append(side)
        m = medians[side][sum(c == side for c in calls) - 1]
        if "--logits" in args:
            np.save(args[args.index("--logits") + 1], np.ones((2, 3, 4), dtype=np.float32))
        return {"median_s": m, "min_s": m, "max_s": m, "first_step_s": m, "initial_loss": 1.0}

    monkeypatch.setattr(rounds, "run_worker", fake)
    (entry,) = rounds.compare({"tiny": TINY}, ["lora-ref", "torch-eager", "lora-ref-full"], rounds=3, warmup=0,
                              steps=1, log=lambda _: None)
    assert calls == ["lora-ref", "torch-eager", "lora-ref-full", "torch-eager", "lora-ref-full", "lora-ref",
                     "lora-ref-full", "lora-ref", "torch-eager"]
    ratio = entry["ratios"]["lora-ref/torch-eager"]          # per round 1/1, 4/2, 9/3
    assert (ratio["median"], ratio["min"], ratio["max"]) == (2.0, 1.0, 3.0)
    assert entry["sides"]["lora-ref"]["round_medians_s"] == [1.0, 4.0, 9.0]
    assert entry["same_function"]["relative_difference"] == {"torch-eager": 0.0, "lora-ref-full": 0.0}
    assert entry["same_function"]["initial_losses_agree"] is True


def test_benchmark_times_the_public_train_loop_with_its_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """The lora-ref side is transformer_ref.train as a user calls it: the same function object,
    op set and threads (train's defaults: FAST, None), and one timing per step it runs."""
    import inspect

    import transformer_ref
    from benchmarks import worker
    from transformer_ref import FAST, REFERENCE
    from transformer_ref.machine import blas_threads, numpy_openblas

    real = transformer_ref.train
    seen: list[dict[str, object]] = []

    def spy(*args: object, **kwargs: object) -> object:
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(transformer_ref, "train", spy)
    blas = numpy_openblas()
    with blas_threads(None if blas is None else blas.get_threads()):   # the worker sets the count; put it back
        out = worker.step("lora-ref", "tiny", warmup=1, steps=2)
        seen_lora = list(seen)
        seen.clear()
        worker.step("lora-ref-reference", "tiny", warmup=0, steps=1)
    (kwargs,) = seen_lora
    assert "ops" not in kwargs and "threads" not in kwargs      # train's own defaults, as users get them
    defaults = inspect.signature(real).parameters
    assert defaults["ops"].default is FAST and defaults["threads"].default is None
    assert kwargs["steps"] == 3 and len(out["runs_s"]) == 2 and len(out["warmup_s"]) == 1
    assert out["threads"]["numpy_blas_at_end"] == out["threads"]["numpy_blas"]     # no thread-count leak
    assert seen[0]["ops"] is REFERENCE and seen[0]["threads"] == 1


def test_quick_run_end_to_end_writes_results_and_page(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """python -m benchmarks.run --quick --no-torch (fresh worker processes; smaller still), then the
    page for a full run built from the same file."""
    from benchmarks import report
    from benchmarks.harness import cpu_kind
    from benchmarks.run import main
    from benchmarks.suites import TINY

    page = tmp_path / "performance.md"
    assert main(["--quick", "--no-torch", "--sizes", "tiny", "--steps", "1", "--rounds", "2",
                 "--only", "peak,training,inference,gpu", "--results-dir", str(tmp_path), "--page", str(page)]) == 0
    out = tmp_path / "quick" / f"{cpu_kind()}.json"
    results = json.loads(out.read_text())
    assert results["meta"]["quick"] is True and results["meta"]["machine"]["cpu"]
    (entry,) = results["training"]
    assert entry["label"] == TINY.label and set(entry["sides"]) == {"lora-ref", "lora-ref-reference", "lora-ref-full"}
    for side in entry["sides"].values():
        assert len(side["rounds"]) == 2 and side["median_s"] > 0.0
        for r in side["rounds"]:
            assert r["threads"]["numpy_blas_at_end"] == r["threads"]["numpy_blas"]
    assert entry["same_function"]["relative_difference"]["lora-ref-full"] <= entry["same_function"]["bound"]
    assert set(results["peak"]) >= {"before", "after", "best_gflops"}            # both kept
    assert results["peak"]["before"]["numpy"]["numpy_blas"]["kernel"] is not None or \
        results["peak"]["before"]["numpy"]["numpy_blas"]["library"] is None
    assert results["gpu"].startswith("not measured")
    text = page.read_text()
    assert "Quick smoke runs: not measurements" in text and "No full measurement is recorded yet" in text
    assert "```python" not in text                                  # the docs test would run it
    printed = capsys.readouterr().out
    assert printed.startswith("QUICK SMOKE RUN") and "| config |" in printed

    # the same file as if it were a full run: every section renders, the CPU kind is named
    results["meta"]["quick"] = False
    full_text = report.write_page([results], [], tmp_path / "full.md", None)
    assert results["meta"]["machine"]["cpu"] in full_text and "Every side, LoRA against full" in full_text
    assert "The machine's float32 matmul rate" in full_text and "## Quick smoke runs" not in full_text
    kind = results["meta"]["machine"]["cpu_kind"]
    for vendor in ("Intel", "AMD"):                                 # a vendor without a run is named as missing
        said = f"No full measurement on an {vendor}" in full_text or f"or {vendor} CPU is recorded" in full_text
        assert said is (not kind.startswith(vendor.lower())), (vendor, kind)
    results["meta"]["machine"]["cpu_kind"] = "intel-xeon"
    other = dict(results, meta=dict(results["meta"], machine=dict(results["meta"]["machine"], cpu_kind="amd-epyc")))
    both = report.write_page([results, other], [], tmp_path / "both.md", None)
    assert "No full measurement on an" not in both


def test_llama_rows_run_and_say_why_when_they_cannot(monkeypatch: pytest.MonkeyPatch) -> None:
    """The LLaMA rows: lora-ref's LLaMA (LoRA on q_proj, v_proj) trained by train() in fresh
    processes; where transformer_ref.llama is missing, the row says so instead."""
    from benchmarks import run
    from benchmarks.suites import LLAMA_TINY

    results = run.run_all(configs={"llama-tiny": LLAMA_TINY}, suites=("training",), with_torch=False,
                          log=lambda _: None, rounds=1, warmup=0, steps=1)
    (entry,) = results["training"]
    assert entry["family"] == "llama" and set(entry["sides"]) == {"lora-ref", "lora-ref-reference"}
    assert entry["label"].startswith("LLaMA") and entry["shape"]["lora_targets"] == "q_proj, v_proj"
    assert entry["same_function"]["relative_difference"]["lora-ref-reference"] <= entry["same_function"]["bound"]

    monkeypatch.setattr(run, "llama_available", lambda: "not measured: transformer_ref.llama does not exist yet")
    results = run.run_all(configs={"llama-tiny": LLAMA_TINY}, suites=("training",), with_torch=False,
                          log=lambda _: None)
    (entry,) = results["training"]
    assert entry["not_measured"] == "not measured: transformer_ref.llama does not exist yet"
    assert "transformer_ref.llama does not exist yet" in __import__("benchmarks.report").report.main_table(results)


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


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_breakdown_counts_the_step_flop_formula_layer_by_layer(family: str) -> None:
    """benchmarks.breakdown.matmul_flops, summed over the calls of one LoRA step (counted from each
    call's arguments, whatever the op set computes), is benchmarks.flops.step_flops's count: the
    forward's projections, LoRA products and attention, and the backward's, layer 0's input
    gradients left out because autograd never asks for them."""
    import dataclasses
    from collections import defaultdict

    import autograd

    from benchmarks.breakdown import timed_ops
    from benchmarks.flops import step_flops
    from benchmarks.ref_gpt2 import make_model
    from benchmarks.suites import LLAMA_TINY, TINY
    from transformer_ref import FAST, REFERENCE, loss

    shape = LLAMA_TINY if family == "llama" else TINY
    model = make_model(shape)
    params, tokens, targets, adapters, lc, config = (model[k] for k in (
        "params", "tokens", "targets", "adapters", "lora_config", "config"))
    want = step_flops(shape)
    for base in (FAST, REFERENCE):
        flops: dict[str, float] = defaultdict(float)
        ops, _ = timed_ops(base, flops=flops)
        autograd.value_and_grad(lambda ad: loss(params, tokens, targets, config, ad, lc, ops=ops))(adapters)
        forward = sum(v for k, v in flops.items() if k.endswith("forward"))
        assert forward == want["lora_forward"], dataclasses.asdict(shape)
        assert sum(flops.values()) == want["lora_step"]


def test_breakdown_command_prints_each_layer_against_the_limit(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks.breakdown import main

    assert main(["--n-embd", "16", "--n-layer", "1", "--n-head", "2", "--seq", "8", "--batch", "2", "--vocab", "16",
                 "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("FAST gpt2 LoRA step, float32, n_embd=16") and "matmul limit" in out
    rows = {line.split()[0] + " " + line.split()[1]: line.split()[2:] for line in out.splitlines()[2:]
            if line.split()[1] in ("forward", "backward")}
    assert {"linear forward", "linear backward", "causal_attention forward", "gelu backward"} <= set(rows)
    assert float(rows["gelu forward"][1]) == 0.0 and float(rows["linear forward"][1]) > 0.0   # GFLOP column
    assert float(rows["gelu forward"][2]) == 0.0 and float(rows["linear forward"][2]) > 0.0   # limit ms
    assert "rest (Adam, autograd, residuals)" in out


def test_step_command_times_train(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks.step import main

    assert main(["--n-embd", "16", "--n-layer", "1", "--n-head", "2", "--seq", "8", "--batch", "2",
                 "--vocab", "16", "--warmup", "0", "--steps", "1", "--threads", "1"]) == 0
    line = capsys.readouterr().out
    assert line.startswith("lora step, float32, n_embd=16") and "transformer_ref.train, 1 batch slice(s)" in line


@pytest.mark.parametrize("value, op, limit, met, printed", [
    (1.0031, "<=", 1.0, False, "1.003"),          # would print 1.00, read as meeting <= 1.0
    (0.8964, "<=", 0.9, True, "0.90"),            # 0.90 <= 0.9: the two digits already agree
    (0.9004, "<=", 0.9, False, "0.9004"),
    (0.5996, ">=", 0.60, False, "0.5996"),
    (0.73, ">=", 0.60, True, "0.73"),
    (24627.0, ">=", 100.0, True, "24627x"),
    (99.6, ">=", 100.0, False, "99.6x"),          # would print 100x beside missed
])
def test_a_targets_printed_value_agrees_with_its_verdict(value, op, limit, met, printed):
    """The targets table prints enough digits that the number and met/missed beside it agree."""
    from benchmarks import report

    assert report._value({"value": value, "op": op, "limit": limit, "met": met}) == printed


def test_the_llama_rows_are_held_to_the_gpt2_rows_target():
    """Issue 12: the LLaMA rows' target is the GPT-2 rows' (train() / eager <= 0.9): each gets its own
    verdict; a results file without LLaMA rows says "not measured" instead."""
    from benchmarks import report

    def entry(size, median):
        return {"size": size, "sides": {}, "ratios": {"lora-ref/torch-eager": {"median": median, "min": median,
                                                                              "max": median}}}

    rows = {t["name"]: t for t in report.targets({"training": [entry("small", 0.8), entry("llama-large", 0.92)]})}
    assert rows["`train()` step / PyTorch+PEFT eager (llama-large)"]["met"] is False
    assert rows["`train()` step / PyTorch+PEFT eager (small)"]["met"] is True
    assert rows["`train()` step / PyTorch+PEFT eager (llama-small)"]["met"] is None
