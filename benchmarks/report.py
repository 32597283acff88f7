"""results.json -> docs/performance.md (tables) and docs/performance.png (plot).

The page is regenerated from the JSON alone, so ``python -m benchmarks.report`` rewrites it
from the last run without measuring anything again.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results.json"
RESULTS_UNSET = ROOT / "benchmarks" / "results-openblas-unset.json"   # python -m benchmarks.run --unset-openblas-env
PAGE = ROOT / "docs" / "performance.md"
PLOT = ROOT / "docs" / "performance.png"

__all__ = ["targets", "write_page", "write_plot"]


# --------------------------------------------------------------------------------------------
# Targets (issue #7): each ratio beside what it should reach
# --------------------------------------------------------------------------------------------


def _training(results: dict[str, Any], size: str) -> dict[str, Any] | None:
    for entry in results.get("training", []):
        if entry.get("size") == size and "ratios" in entry:
            return entry
    return None


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target of issue #7 with its measured value and whether it is met (None: not measured)."""
    rows: list[dict[str, Any]] = []

    def add(name: str, value: float | None, target: str, met: bool | None, note: str = "") -> None:
        rows.append({"name": name, "value": value, "target": target, "met": met, "note": note})

    for size in ("small", "large"):
        entry = _training(results, size)
        ratio = entry["ratios"].get("ref_lora/torch_lora") if entry else None
        value = ratio["median"] if ratio else None
        add(f"LoRA step, lora-ref / PyTorch+PEFT ({size})", value, "<= 0.8 (minimum < 1.0)",
            None if value is None else value <= 0.8,
            "" if value is None or value <= 0.8 else ("below 1.0" if value < 1.0 else "slower than PyTorch"))
    large = _training(results, "large")
    pct = large["efficiency"]["ref_lora"]["fraction_of_peak"] if large else None
    add("LoRA step, fraction of float32 matmul peak (large)", pct, ">= 0.70",
        None if pct is None else pct >= 0.70)
    ratio = large["ratios"].get("ref_lora/ref_full") if large else None
    value = ratio["median"] if ratio else None
    add("LoRA / full fine-tuning step, lora-ref (large)", value, "<= 0.75 (limit ~2/3)",
        None if value is None else value <= 0.75)
    inf = [e for e in results.get("inference", []) if "ratios" in e]
    if inf:
        worst = max(e["ratios"]["merged/base"]["median"] for e in inf)
        add("merged forward / base forward (worst config)", worst, "<= 1.02", worst <= 1.02)
    svd = results.get("delta_svd", {})
    speedup = _svd_speedup(svd, 4096)
    note = ""
    if speedup is None:
        measured = {d: _svd_speedup(svd, d) for d in _svd_sizes(svd)}
        note = "; ".join(f"d={d}: {v:.0f}x" for d, v in measured.items() if v is not None)
        note = f"this run measured only smaller sizes ({note})" if note else ""
    add("delta_svd speed-up over dense SVD, d=4096", speedup, ">= 100x",
        None if speedup is None else speedup >= 100.0, note)
    return rows


def _svd_rows(svd: Any) -> list[dict[str, Any]]:
    rows = svd.get("results") if isinstance(svd, dict) else None
    return [row for row in rows if isinstance(row, dict)] if isinstance(rows, list) else []


def _svd_sizes(svd: Any) -> list[int]:
    return [row["d"] for row in _svd_rows(svd) if "d" in row]


def _svd_speedup(svd: Any, d: int) -> float | None:
    """The speed-up of delta_svd over the dense SVD at size ``d`` in bench_delta_svd's result."""
    for row in _svd_rows(svd):
        if row.get("d") == d:
            for key in ("speedup_vs_svd", "speedup"):
                if isinstance(row.get(key), (int, float)):
                    return float(row[key])
    return None


# --------------------------------------------------------------------------------------------
# Formatting helpers
# --------------------------------------------------------------------------------------------


def _ms(seconds: float | None) -> str:
    return "—" if seconds is None else f"{1000.0 * seconds:.1f}"


def _f(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _pct(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{100.0 * value:.1f}%" if abs(value) < 0.1 else f"{100.0 * value:.0f}%"


def _mib(n: float | None) -> str:
    return "—" if n is None else f"{n / 2**20:.1f}"


def _loadavg(values: list[float] | None) -> str:
    return "?" if not values else " ".join(f"{v:.1f}" for v in values)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _met(met: bool | None) -> str:
    return {True: "met", False: "**missed**", None: "not measured"}[met]


# --------------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------------


def _targets_table(results: dict[str, Any], measured_only: bool = False) -> str:
    rows = [t for t in targets(results) if t["value"] is not None or not measured_only]
    return _table(["measurement", "value", "target", ""],
                  [[t["name"], _f(t["value"]) if t["value"] is None or t["value"] < 10 else f"{t['value']:.0f}x",
                    t["target"], _met(t["met"]) + (f" ({t['note']})" if t["note"] else "")]
                   for t in rows])


def write_page(results: dict[str, Any], page: Path = PAGE, plot_name: str | None = PLOT.name,
               unset_results: dict[str, Any] | None = None) -> str:
    """Write docs/performance.md from ``results``; returns the text. ``unset_results``: a run made
    with ``--unset-openblas-env``, shown beside it when given."""
    meta = results.get("meta", {})
    machine = meta.get("machine", {})
    versions = machine.get("versions", {})
    out: list[str] = []
    w = out.append
    w("# Performance")
    w("")
    w("How fast lora-ref trains and runs, measured against what you would otherwise use (PyTorch with")
    w("PEFT) and against the machine's own limit (its float32 matrix-multiply speed). This page is")
    w("generated by the benchmark runner from `benchmarks/results.json`; do not edit it by hand.")
    w("")
    w("```bash")
    w("python -m benchmarks.run                       # every measurement, about five minutes")
    w("python -m benchmarks.run --quick               # fewer repeats, two to three minutes")
    w("python -m benchmarks.run --only training --sizes small   # one measurement, one size")
    w("python -m benchmarks.report                    # rewrite this page from the last results.json")
    w("```")
    w("")
    w("Run them from the repository root. Every time below is the median of several runs after")
    w("warm-up runs. When two things are compared (lora-ref and PyTorch, LoRA and full")
    w("fine-tuning), they run in the same process, alternately, round by round, and a ratio is the")
    w("median of the per-round ratios: whatever else the machine is doing slows both sides of a")
    w("round alike, so it cancels in the ratio. Absolute times drift from run to run on a shared")
    w("machine (the load averages below say how busy it was); the ratios are the result.")
    w("")
    w(f"This run: {'quick' if meta.get('quick') else 'full'}, {meta.get('started', '?')}, "
      f"{meta.get('duration_s', 0):.0f} s; every library ran on {meta.get('threads', '?')} threads; NumPy's "
      f"OpenBLAS settings: {meta.get('openblas_env', '?')}.")
    w("")
    w("## Targets")
    w("")
    w(_targets_table(results))
    w("")
    if unset_results is not None:
        w("The same measurements in a process started without `OPENBLAS_CORETYPE` and `OPENBLAS_L2_SIZE`")
        w("(`python -m benchmarks.run --unset-openblas-env`): they force NumPy's OpenBLAS onto older")
        w("kernels on this machine, which halves its matmul speed; PyTorch uses its own BLAS either way.")
        w(f"That run: {unset_results.get('meta', {}).get('started', '?')}, float32 matmul peak "
          f"{unset_results.get('peak', {}).get('peak_gflops', 0):.0f} GFLOP/s.")
        w("")
        w(_targets_table(unset_results, measured_only=True))
        w("")
    w("## Machine")
    w("")
    threads = machine.get("threads", {})
    env = {k: v for k, v in machine.get("environment", {}).items() if v is not None}
    rows = [
        ["CPU", f"{machine.get('cpu', '?')}, {machine.get('usable_cpus', '?')} usable cores, "
                f"{machine.get('memory_gib', '?')} GiB"],
        ["threads", ", ".join(f"{k} {v}" for k, v in threads.items())],
        ["NumPy BLAS", f"{(machine.get('numpy_blas') or {}).get('kernel', '?')} kernels "
                       f"({(machine.get('numpy_blas') or {}).get('config', '?')})"],
        ["PyTorch BLAS", str(machine.get("torch_blas"))],
        ["environment", ", ".join(f"`{k}={v}`" for k, v in env.items()) or "none set"],
        ["allocator", "glibc keeps freed memory (`transformer_ref.machine.keep_freed_memory()`)"
                      if meta.get("keep_freed_memory") else "default"],
        ["versions", ", ".join(f"{k} {v}" for k, v in versions.items() if v)],
        ["load average (1, 5, 15 min)", f"{_loadavg(machine.get('load_average'))} at start, "
                                        f"{_loadavg(meta.get('load_average_at_end'))} at end"],
    ]
    w(_table(["", ""], rows))
    w("")
    peak = results.get("peak", {})
    if peak:
        per = peak.get("gflops", {})
        w("Float32 matmul peak of this process, measured in the same run (before and after the training")
        w(f"steps; the higher is kept): **{peak.get('peak_gflops', 0):.0f} GFLOP/s** ({peak.get('peak_from')};")
        w(f"{peak.get('formula')}, median per size).")
        w("")
        sizes = sorted({n for lib in per.values() for n in lib}, key=int)
        w(_table(["library"] + [f"n={n} GFLOP/s" for n in sizes],
                 [[lib] + [_f(per[lib].get(n), 0) for n in sizes] for lib in per]))
        w("")

    training = results.get("training", [])
    if training:
        _training_section(w, training, plot_name)
    profile = results.get("profile", [])
    if profile:
        _profile_section(w, profile)
    _speed_notes(w)

    inference = results.get("inference", [])
    if inference:
        w("## Inference")
        w("")
        w("LoRA adds no latency once merged (Section 4.1 of the paper): `W + s B A` is one matrix of")
        w("the base model's shape, so the merged forward should cost what the base model's does.")
        w("Unmerged, the reference order (`lora_ref.lora_linear`) adds `2 r (d_in + d_out)` FLOPs per")
        w("token and adapted matrix; the training projection (`transformer_ref.fast.linear`) instead")
        w("forms `W + s B A` once per call when the batch is large enough (`2 r d_in d_out` FLOPs), so")
        w("both predictions are shown. Forward passes, logits only, float32.")
        w("")
        rows = []
        for e in inference:
            if "ratios" not in e:
                rows.append([e.get("label", "?"), e.get("not_measured", "")] + [""] * 5)
                continue
            t, r = e["times"], e["ratios"]
            rows.append([e["label"], _ms(t["base"]["median_s"]), _ms(t["merged"]["median_s"]),
                         _f(r["merged/base"]["median"], 3), _pct(r["unmerged/base"]["median"] - 1.0),
                         _pct(e["predicted_unmerged_overhead"]),
                         _pct(e.get("predicted_unmerged_overhead_reference_order"))])
        w(_table(["config", "base ms", "merged ms", "merged / base", "unmerged overhead (measured)",
                  "predicted (order used)", "predicted (reference order)"], rows))
        w("")

    memory = results.get("memory", [])
    if memory:
        w("## Memory")
        w("")
        w("Peak memory allocated during one training step (after the parameters and Adam's moments")
        w("exist), traced with `tracemalloc` (NumPy reports its allocations to it), beside what the")
        w("trainable parameters' gradients and Adam's two moments need by formula (4 bytes per float32")
        w("value, times the trainable count). The rest of the peak is activations kept for the backward")
        w("pass, which LoRA needs as much as full fine-tuning does: LoRA's saving is the gradient and")
        w("optimizer state of the frozen weights (the paper's 1.2 TB to 350 GB on GPT-3 is mostly that).")
        w("")
        rows = []
        for e in memory:
            if "lora" not in e:
                rows.append([e.get("label", "?"), e.get("not_measured", "")] + [""] * 5)
                continue
            acc = e["accounting"]
            rows.append([e["label"], _mib(e["lora"]["peak_bytes"]), _mib(e["full"]["peak_bytes"]),
                         _f(e["lora"]["peak_bytes"] / e["full"]["peak_bytes"]),
                         _mib(acc["lora"]["grad_bytes"] + acc["lora"]["adam_state_bytes"]),
                         _mib(acc["full"]["grad_bytes"] + acc["full"]["adam_state_bytes"]),
                         _mib(acc["frozen_base_bytes"]["bytes"])])
        w(_table(["config", "LoRA step peak MiB", "full step peak MiB", "LoRA / full",
                  "LoRA grads + Adam MiB", "full grads + Adam MiB", "weights MiB"], rows))
        w("")

    svd = results.get("delta_svd")
    if svd is not None:
        w("## `delta_svd`: the SVD of `s B A` without forming it")
        w("")
        w(_svd_section(svd))
        w("")

    backends = results.get("backends")
    if backends:
        w("## The cost of portability (report only)")
        w("")
        w("The same model forward timed on plain NumPy, on `array_api_strict` (the strict namespace")
        w("that proves the code is backend-agnostic), and traced by autograd (forward only, and a")
        w("full gradient), relative to the plain NumPy forward; then the per-call cost of")
        w("`array_api_compat`'s NumPy functions against NumPy's own, and what the namespace lookup")
        w("costs a whole training step.")
        w("")
        w(_backends_section(backends))
        w("")

    w("## GPU")
    w("")
    w(str(results.get("gpu", "not measured")))
    w("")
    text = "\n".join(out)
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(text)
    return text


def _training_section(w: Any, training: list[dict[str, Any]], plot_name: str | None) -> None:
    w("## Training step")
    w("")
    w("One step is forward, backward and Adam, float32, on a GPT-2-architecture model (vocabulary")
    w("128, head width 64) with LoRA (r = 8, alpha = 16) on every layer's fused `c_attn`, as")
    w("`transformer_ref.train` runs it. The PyTorch side is transformers' `GPT2LMHeadModel` with")
    w("PEFT's LoRA on the same `c_attn`, `torch.optim.Adam`, eager mode, given the same weights,")
    w("adapters and tokens; before timing, the runner checks that every side computes the same")
    w("logits (to float32 rounding). Full fine-tuning trains every weight of the same model (the")
    w("adapters merged into it). The issue's targets: lora-ref / PyTorch <= 0.8 (below 1.0 at the")
    w("least); a throwaway hand-written NumPy step reached 0.77 (small) and 0.86 (large) here.")
    w("")
    header = ["config", "lora-ref LoRA ms", "PyTorch LoRA ms", "lora-ref / PyTorch",
              "lora-ref full ms", "PyTorch full ms", "LoRA / full (lora-ref)", "LoRA / full (PyTorch)"]
    rows = []
    for e in training:
        if "times" not in e:
            rows.append([e.get("label", "?"), e.get("not_measured", "not measured")] + [""] * (len(header) - 2))
            continue
        ms = {k: _ms(v["median_s"]) for k, v in e["times"].items()}
        ratio = {k: _f(v["median"]) for k, v in e["ratios"].items()}
        rows.append([e["label"], ms.get("ref_lora", "—"), ms.get("torch_lora", "—"),
                     ratio.get("ref_lora/torch_lora", "—"), ms.get("ref_full", "—"), ms.get("torch_full", "—"),
                     ratio.get("ref_lora/ref_full", "—"), ratio.get("torch_lora/torch_full", "—")])
    w(_table(header, rows))
    w("")
    spread = [f"{e['label']}: {r['min']:.2f} to {r['max']:.2f}" for e in training
              for r in [e.get("ratios", {}).get("ref_lora/torch_lora")] if r]
    if spread:
        w("Per-round lora-ref / PyTorch ratios ranged " + "; ".join(spread) + ".")
        w("")
    w("### Achieved FLOP/s")
    w("")
    w("The step's FLOPs are counted analytically (matrix products only; N = batch x T tokens,")
    w("C = n_embd, L layers, V vocabulary, r rank; `benchmarks/flops.py` derives each term):")
    w("")
    w("```text")
    w("forward      N (L (24 C^2 + 4 T C + 8 r C) + 2 C V)          (8 r C: LoRA on c_attn)")
    w("LoRA back    N (L (24 C^2 + 8 T C + 16 r C) - 6 C^2 - 2 r C + 2 C V)")
    w("full step    3 N (L (24 C^2 + 4 T C) + 2 C V)")
    w("```")
    w("")
    w("LoRA's backward needs activation gradients only: no frozen weight gets a gradient, and")
    w("below layer 0's `c_attn` nothing is trainable, so that product's input gradient is skipped")
    w("too. That is why a LoRA step costs about 2/3 of a full one (the paper's GPT-3 speed-up,")
    w("25%, is below that limit). A measured LoRA / full ratio below 2/3 means the full step ran at")
    w("a lower FLOP rate: its weight-gradient products, the embedding's scatter-add and Adam over")
    w("every weight take time that a count of matrix products leaves out. The issue's target:")
    w(">= 70% of the matmul peak at the large size.")
    w("")
    rows = []
    for e in training:
        if "efficiency" not in e:
            continue
        f = e["flops"]
        cells = {k: f"{v['gflops']:.0f} ({_pct(v['fraction_of_peak'])})" for k, v in e["efficiency"].items()}
        rows.append([e["label"], f"{f['lora_step'] / 1e9:.2f}", f"{f['full_step'] / 1e9:.2f}"]
                    + [cells.get(k, "—") for k in ("ref_lora", "torch_lora", "ref_full", "torch_full")])
    w(_table(["config", "LoRA GFLOP", "full GFLOP", "lora-ref LoRA GFLOP/s (of peak)",
              "PyTorch LoRA", "lora-ref full", "PyTorch full"], rows))
    w("")
    if plot_name:
        w(f"![Training step time relative to PyTorch + PEFT, and achieved FLOP/s]({plot_name})")
        w("")


def _profile_section(w: Any, profile: list[dict[str, Any]]) -> None:
    w("### Where the time goes")
    w("")
    w("A LoRA step of lora-ref, timed per layer type (`benchmarks/breakdown.py` wraps the model's")
    w("layers and their backward passes with timers): on one thread, and on every core, where the")
    w("batch is split into one slice per core and a layer's time is summed over the threads. The")
    w("projections (`linear`) are matrix products running near the BLAS peak; the rest is")
    w("memory-bound elementwise work and Python. PyTorch's top operators by self time follow.")
    w("")
    for e in profile:
        parts = {k: v for k, v in e.items() if isinstance(v, dict) and "parts_ms" in v}
        if parts:
            names: list[str] = []
            for v in parts.values():
                names += [n for n in v["parts_ms"] if n not in names]
            header = ["layer (ms per step)"] + list(parts)
            rows = [[n] + [_f(v["parts_ms"].get(n), 1) for v in parts.values()] for n in names]
            rows.append(["**step (wall)**"] + [_f(v["step_ms"], 1) for v in parts.values()])
            w(f"{e['label']}:")
            w("")
            w(_table(header, rows))
            w("")
        torch_prof = e.get("PyTorch+PEFT")
        if torch_prof:
            ops = torch_prof["top_ops_ms_per_step"]
            w(f"PyTorch + PEFT, {e['label']}, top operators ({torch_prof['note']}):")
            w("")
            w(_table(["operator", "ms per step", "calls per step"],
                     [[f"`{k}`", _f(v, 2), _f(torch_prof["calls_per_step"].get(k), 0)] for k, v in ops.items()]))
            w("")


def _speed_notes(w: Any) -> None:
    w("### What makes the lora-ref step fast")
    w("")
    w("The reference forward, `lora_ref.lora_linear` (`W x + s B (A x)`), is unchanged; the model's")
    w("training path computes the same numbers in a faster order, and tests hold each change to the")
    w("reference (`tests/transformer/test_speed_paths.py`, and the layer tests against textbook")
    w("formulas and finite differences):")
    w("")
    w("* **Every core, one synchronisation per step.** `transformer_ref.fast.sharded_value_and_grad`")
    w("  splits the batch into one slice per core; each slice's forward and backward run in their own")
    w("  thread with single-threaded BLAS (NumPy releases the GIL inside BLAS and ufuncs), and the")
    w("  slices' losses and gradients are combined weighted by their scored tokens. `train()` does")
    w("  this by default when the batch is large enough to gain (`auto_threads`); `threads=1` turns")
    w("  it off. The worker threads are pinned to their cores.")
    w("* **Memory reuse.** `transformer_ref.machine.keep_freed_memory()` stops glibc from returning")
    w("  freed megabytes to the OS (and page-faulting them back in) at every step. The runner calls it")
    w("  once, for both libraries in the process; call it in your own training script.")
    w("* **One matrix product per projection.** `transformer_ref.fast.linear` folds (B, T) into one")
    w("  dimension and, when the batch is large enough, adds `s B A` to the frozen weight once per call,")
    w("  so an adapted projection is one GEMM forward and one backward, like a frozen one.")
    w("* **Frozen weights get no gradient.** LoRA training differentiates the adapters only, so")
    w("  autograd never asks for a weight's VJP.")
    w("* **Attention** keeps its scores transposed (keys along axis -2), so the softmax's max and sum")
    w("  are vectorised row operations, masks by adding a 0/-inf matrix instead of `where`, and")
    w("  writes its outputs and gradients straight into the layout the next product reads.")
    w("* **GELU's backward** reuses `x^2` and `1 + tanh` from the forward: 9 passes over the array")
    w("  instead of 13. Constants are Python floats throughout, so float32 never becomes float64.")
    w("")


def _svd_section(svd: Any) -> str:
    if not isinstance(svd, dict) or "not_measured" in svd:
        return str(svd.get("not_measured") if isinstance(svd, dict) else svd)
    rows = _svd_rows(svd)
    if not rows:
        return "```text\n" + json.dumps(svd, indent=2) + "\n```"
    keys = [k for k in rows[0] if not isinstance(rows[0][k], (dict, list))]
    text = ("`lora_ref.analysis.delta_svd` finds the singular values and vectors of `s B A` from QR\n"
            "factorisations of the thin factors and an r x r SVD, never forming the d x d matrix.\n"
            "Timed against forming it and running SciPy's dense SVD (`benchmarks/bench_delta_svd.py`,\n"
            f"{svd.get('dtype', 'float64')}, r = {rows[0].get('r', '?')}; times in seconds).\n\n")
    return text + _table(keys, [[_cell(row.get(k)) for k in keys] for row in rows])


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _backends_section(b: dict[str, Any]) -> str:
    parts = []
    fw = b.get("forward")
    if fw:
        rows = [[name, _ms(v["median_s"]), _f(v.get("vs_numpy"))] for name, v in fw.items()]
        parts.append(f"Model: {b.get('label', '')}.\n\n" + _table(["forward", "ms", "vs plain NumPy"], rows))
    calls = b.get("per_call")
    if calls:
        rows = [[name, f"{v['numpy_us']:.2f}", f"{v['compat_us']:.2f}", f"{v['compat_us'] - v['numpy_us']:+.2f}"]
                for name, v in calls.items()]
        parts.append(_table(["call", "numpy µs", "array_api_compat µs", "overhead µs"], rows))
    if b.get("note"):
        parts.append(b["note"])
    ns = b.get("namespace_lookup")
    if ns:
        parts.append(
            f"A LoRA training step asks `lora_ref.backend.namespace` {ns['calls_per_step']} times. With its NumPy "
            f"fast path (plain ndarrays return `array_api_compat.numpy` at once) the step took "
            f"{ns['fast_path_ms']:.1f} ms; forced through the generic `array_api_compat.array_namespace` "
            f"lookup, {ns['generic_ms']:.1f} ms (fast / generic, median of alternated rounds: "
            f"{ns['fast/generic']['median']:.3f}). `array_api_compat.numpy`'s own functions are NumPy's "
            "for all but a few (matmul, matrix_transpose, zeros, astype), which add well under a "
            "microsecond per call: nothing worth bypassing.")
    return "\n\n".join(parts)


# --------------------------------------------------------------------------------------------
# The plot
# --------------------------------------------------------------------------------------------


def write_plot(results: dict[str, Any], path: Path = PLOT) -> Path | None:
    """Two panels: step time per config and side, and achieved GFLOP/s against the peak."""
    training = [e for e in results.get("training", []) if "times" in e]
    if not training:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sides = [("ref_lora", "lora-ref LoRA"), ("torch_lora", "PyTorch+PEFT LoRA"),
             ("ref_full", "lora-ref full FT"), ("torch_full", "PyTorch full FT")]
    unit = "torch_lora" if all("torch_lora" in e["times"] for e in training) else "ref_lora"
    unit_label = dict(sides)[unit]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(sides)
    for j, (key, label) in enumerate(sides):
        xs = [i + (j - (len(sides) - 1) / 2) * width for i in range(len(training))]
        ys = [e["times"][key]["median_s"] / e["times"][unit]["median_s"]
              if key in e["times"] else 0.0 for e in training]
        ax1.bar(xs, ys, width, label=label)
    ax1.axhline(1.0, color="k", lw=0.8)
    ax1.set_xticks(range(len(training)), [e["label"] for e in training], fontsize=8)
    ax1.set_ylabel(f"step time / {unit_label} step")
    ax1.set_title("Training step (median of alternated runs)")
    ax1.legend(fontsize=8)
    peak = results.get("peak", {}).get("peak_gflops")
    for j, (key, label) in enumerate(sides):
        xs = [i + (j - (len(sides) - 1) / 2) * width for i in range(len(training))]
        ys = [e["efficiency"][key]["gflops"] if key in e.get("efficiency", {}) else 0.0 for e in training]
        ax2.bar(xs, ys, width, label=label)
    if peak:
        ax2.axhline(peak, color="k", ls="--", lw=1.0, label=f"float32 matmul peak {peak:.0f}")
    ax2.set_xticks(range(len(training)), [e["label"] for e in training], fontsize=8)
    ax2.set_ylabel("GFLOP/s (analytic FLOPs / median time)")
    ax2.set_title("Achieved FLOP/s")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    """Rewrite docs/performance.md and docs/performance.png from benchmarks/results.json."""
    path = Path(argv[0]) if argv else RESULTS
    results = json.loads(path.read_text())
    unset = json.loads(RESULTS_UNSET.read_text()) if RESULTS_UNSET.exists() else None
    write_plot(results)
    write_page(results, unset_results=unset)
    print(f"wrote {PAGE.relative_to(ROOT)} and {PLOT.relative_to(ROOT)} from {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
