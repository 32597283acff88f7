"""benchmarks/results/*.json -> docs/performance.md (tables) and docs/performance.png (plot).

One results file per kind of CPU (``benchmarks/results/<cpu-kind>.json``: the last full run on
that kind of machine); quick smoke runs go to ``benchmarks/results/quick/`` and appear on the
page in a section of their own, marked as what they are. The page is regenerated from the files
alone, so ``python -m benchmarks.report`` rewrites it without measuring anything.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"
PAGE = ROOT / "docs" / "performance.md"
PLOT = ROOT / "docs" / "performance.png"

__all__ = ["load_results", "result_path", "targets", "text_summary", "write_page", "write_plot"]

# the table: these sides, in this order, each against PyTorch+PEFT eager
MAIN_SIDES = (("lora-ref", "lora-ref `train()`"), ("lora-ref-reference", "lora-ref reference path"),
              ("torch-eager", "PyTorch+PEFT eager"), ("torch-compile", "`torch.compile`"))


def result_path(kind: str, quick: bool, results_dir: Path = RESULTS_DIR) -> Path:
    """Where a run on a CPU of ``kind`` keeps its results (quick runs apart)."""
    return (results_dir / "quick" if quick else results_dir) / f"{kind}.json"


def load_results(results_dir: Path = RESULTS_DIR) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(full, quick)``: every results file of ``results_dir`` and of its ``quick/``, by name."""
    def read(folder: Path) -> list[dict[str, Any]]:
        return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []
    return read(results_dir), read(results_dir / "quick")


# --------------------------------------------------------------------------------------------
# Targets (issue 18, and issue 7's that still hold): each ratio beside what it should reach
# --------------------------------------------------------------------------------------------


def _entry(results: dict[str, Any], size: str) -> dict[str, Any] | None:
    return next((e for e in results.get("training", []) if e.get("size") == size and "sides" in e), None)


def _ratio(results: dict[str, Any], size: str, key: str) -> dict[str, Any] | None:
    entry = _entry(results, size)
    return entry["ratios"].get(key) if entry else None


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target with its measured value, spread and whether it is met (None: not measured)."""
    rows: list[dict[str, Any]] = []

    def add(name: str, value: float | None, op: str, limit: float, target: str | None = None, note: str = "") -> None:
        """A row: ``value`` against ``op limit`` (``target``: how the limit is written, default ``op limit``)."""
        met = None if value is None else (value <= limit if op == "<=" else value >= limit)
        rows.append({"name": name, "value": value, "op": op, "limit": limit, "target": target or f"{op} {limit}",
                     "met": met, "note": note})

    def ratio_target(name: str, size: str, key: str, limit: float) -> None:
        r = _ratio(results, size, key)
        value = r["median"] if r else None
        note = f"per-round {r['min']:.2f} to {r['max']:.2f}" if r else ""
        add(f"{name} ({size})", value, "<=", limit, note=note)

    for size in ("small", "large", "llama-small", "llama-large"):      # LLaMA: the GPT-2 rows' target (issue 12)
        ratio_target("`train()` step / PyTorch+PEFT eager", size, "lora-ref/torch-eager", 0.9)
    for size in ("small", "large"):
        ratio_target("`train()` step / `torch.compile` (stretch)", size, "lora-ref/torch-compile", 1.0)
    for size in ("small", "large"):
        ratio_target("reference path / PyTorch+PEFT eager", size, "lora-ref-reference/torch-eager", 1.25)
    large = _entry(results, "large")
    side = large["sides"].get("lora-ref", {}) if large else {}
    share = side.get("fraction_of_peak")
    add("LoRA step, share of the best float32 matmul rate (large)", share, ">=", 0.60, target=">= 0.60")
    ratio_target("LoRA / full fine-tuning step, lora-ref", "large", "lora-ref/lora-ref-full", 0.75)
    inf = [e for e in results.get("inference", []) if "ratios" in e and e.get("size") in ("small", "large")]
    worst = max((e["ratios"]["merged/base"]["median"] for e in inf), default=None)
    add("merged forward / base forward (worst config)", worst, "<=", 1.02)
    svd = results.get("delta_svd", {})
    speedup = _svd_speedup(svd, 4096)
    add("delta_svd speed-up over dense SVD, d=4096", speedup, ">=", 100.0, target=">= 100x")
    return rows


def _svd_rows(svd: Any) -> list[dict[str, Any]]:
    rows = svd.get("results") if isinstance(svd, dict) else None
    return [row for row in rows if isinstance(row, dict)] if isinstance(rows, list) else []


def _svd_speedup(svd: Any, d: int) -> float | None:
    for row in _svd_rows(svd):
        if row.get("d") == d and isinstance(row.get("speedup_vs_svd"), (int, float)):
            return float(row["speedup_vs_svd"])
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


def _value(t: dict[str, Any]) -> str:
    """The measured value, with as many digits as it takes for the printed number to give the
    verdict beside it (1.003 against "<= 1.0" prints 1.003, not a 1.00 marked missed)."""
    v = t["value"]
    if v is None:
        return "—"
    digits, suffix = (0, "x") if v >= 10 else (2, "")
    text = f"{v:.{digits}f}"
    if t.get("met") is not None:
        op, limit = t["op"], t["limit"]
        while digits < 8 and ((float(text) <= limit) if op == "<=" else (float(text) >= limit)) != t["met"]:
            digits += 1
            text = f"{v:.{digits}f}"
    return text + suffix


def _side_cell(entry: dict[str, Any], side: str) -> str:
    """``ms (ratio to eager, per-round min to max)`` for one side of one config."""
    s = entry["sides"].get(side)
    if s is None:
        return "—"
    if "median_s" not in s:
        return s.get("not_measured", "not measured")
    cell = f"{_ms(s['median_s'])} ms"
    r = entry["ratios"].get(f"{side}/torch-eager") if side != "torch-eager" else None
    if r is None and side == "torch-compile":
        r = entry["ratios"].get("torch-compile/torch-eager")
    if r is not None:
        cell += f" ({r['median']:.2f}x; {r['min']:.2f}–{r['max']:.2f})"
    return cell


def main_table(results: dict[str, Any]) -> str:
    """The issue's table: each config x the sides users choose between, times and ratios to eager."""
    header = ["config"] + [name for _, name in MAIN_SIDES] + ["`torch.compile` compile time"]
    rows = []
    for e in results.get("training", []):
        label = e.get("label", "?")
        if "sides" not in e:
            rows.append([label, e.get("not_measured", "not measured")] + [""] * (len(header) - 2))
            continue
        compile_s = e["sides"].get("torch-compile", {}).get("compile_s")
        rows.append([label] + [_side_cell(e, side) for side, _ in MAIN_SIDES]
                    + [f"{min(compile_s):.1f}–{max(compile_s):.1f} s" if compile_s else "—"])
    gpu = results.get("gpu")
    if gpu is not None:
        rows.append(["GPU: CuPy vs PyTorch CUDA eager (large)", str(gpu)] + [""] * (len(header) - 2))
    return _table(header, rows)


def targets_table(results: dict[str, Any]) -> str:
    return _table(["measurement", "value", "target", "", "spread"],
                  [[t["name"], _value(t), t["target"], _met(t["met"]), t["note"]] for t in targets(results)])


def text_summary(results: dict[str, Any]) -> str:
    """What ``python -m benchmarks.run`` prints: the main table and the targets, as Markdown."""
    meta = results.get("meta", {})
    machine = meta.get("machine", {})
    head = (f"{'QUICK SMOKE RUN (tiny size; not a measurement) ' if meta.get('quick') else ''}"
            f"{machine.get('cpu', '?')} ({machine.get('cpu_kind', '?')}), {meta.get('cpus', '?')} cores, "
            f"NumPy BLAS kernel {_numpy_kernel(results)}")
    tail = ("The targets are evaluated at the small and large configs only, so not in a quick run."
            if meta.get("quick") else targets_table(results))
    return "\n\n".join([head, main_table(results), tail])


def _numpy_kernel(results: dict[str, Any]) -> str:
    return str(((results.get("meta", {}).get("machine") or {}).get("numpy_blas") or {}).get("kernel", "?"))


# --------------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------------


_VENDORS = ("Intel", "AMD")   # the CPU vendors the page should show one full run each of


def write_page(full: list[dict[str, Any]], quick: list[dict[str, Any]], page: Path = PAGE,
               plot_name: str | None = PLOT.name) -> str:
    """Write docs/performance.md from every full run (one per CPU kind) and every quick smoke
    run; returns the text."""
    out: list[str] = []
    w = out.append
    w("# Performance")
    w("")
    w("How fast lora-ref trains, measured against what you would otherwise use (PyTorch with PEFT,")
    w("eager and `torch.compile`) and against the machine's own limit (its float32 matrix-multiply")
    w("rate). This page is generated by `python -m benchmarks.run` from `benchmarks/results/`, one")
    w("file per kind of CPU (the last full run on it); do not edit it by hand.")
    w("")
    w("```bash")
    w("python -m benchmarks.run                 # the full measurement on this machine's CPU kind")
    w("python -m benchmarks.run --quick         # a smoke run at a tiny size (about a minute)")
    w("python -m benchmarks.run --only training --sizes small   # one measurement, one size")
    w("python -m benchmarks.report              # rewrite this page from benchmarks/results/")
    w("```")
    w("")
    _method(w)
    if not full:
        w("## Results")
        w("")
        w("No full measurement is recorded yet. Run `python -m benchmarks.run` from the repository")
        w("root on a machine that is otherwise idle; it writes `benchmarks/results/<cpu-kind>.json`")
        w("and regenerates this page.")
        w("")
    for results in full:
        _run_section(w, results, quick=False)
    missing = [v for v in _VENDORS if full and not any(
        str(r.get("meta", {}).get("machine", {}).get("cpu_kind", "")).startswith(v.lower()) for r in full)]
    if missing:
        w(f"No full measurement on an {' or '.join(missing)} CPU is recorded yet: the figures above come")
        w("from the CPU named in their heading only. Run `python -m benchmarks.run` on such a machine")
        w("to add its section; BLAS kernels and thread behaviour differ between vendors.")
        w("")
    if full and plot_name:
        w(f"![Step time relative to PyTorch+PEFT eager, per CPU kind]({plot_name})")
        w("")
    if quick:
        w("## Quick smoke runs: not measurements")
        w("")
        w("`python -m benchmarks.run --quick` runs every side at a tiny size with few steps, to show")
        w("that the harness works end to end. Its times say nothing about speed; they are here")
        w("only because the page is generated from every results file present.")
        w("")
        for results in quick:
            _run_section(w, results, quick=True)
    _speed_notes(w)
    text = "\n".join(out)
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(text)
    return text


def _method(w: Any) -> None:
    w("## How it is measured")
    w("")
    w("* **Each library in its own process.** Every side of a comparison is a fresh")
    w("  `python -m benchmarks.worker step --lib ... --config ...`: no library's threads, allocator")
    w("  or BLAS settings are present while another is timed. (Alternating two libraries in one")
    w("  process is not neutral: OpenBLAS's worker threads keep spinning after NumPy's work and slow")
    w("  whatever runs next, and a thread count one library sets can hold for the whole process.)")
    w("* **Rounds in rotating order.** Each round runs every side once, the order rotated by one each")
    w("  round. A side's time is the median of its steps after warm-up steps; a ratio is the median")
    w("  over rounds of the per-round ratios, shown with their min and max.")
    w("* **The step users run.** The lora-ref side calls the public `transformer_ref.train()` with its")
    w("  defaults (op set `FAST`, batch slices chosen by `auto_threads`, glibc keeping freed memory),")
    w("  and times each step from one batch request to the next. The reference path is")
    w("  `train(..., ops=REFERENCE, threads=1)`: the paper's order, what the oracle runs. PyTorch's")
    w("  side is transformers' GPT-2 with PEFT's LoRA and `torch.optim.Adam`, eager or wrapped in")
    w("  `torch.compile` (its first step compiles; that time is reported apart).")
    w("* **The same function.** Every side gets the same weights, adapters (LoRA r = 8, alpha = 16")
    w("  on every `c_attn`) and tokens, float32; before comparing, the runner holds each side's")
    w("  starting logits to lora-ref's (float32 rounding) and every round's starting loss likewise.")
    w("* **The machine's limit.** The float32 matmul rate of NumPy and of PyTorch, each alone in a")
    w("  process, before and after the training rounds; both are kept, and the best of them is the")
    w("  limit a step's FLOP rate is compared with. The CPU model, NumPy's BLAS kernel")
    w("  (OpenBLAS's corename) and PyTorch's instruction set are recorded with the results.")
    w("")


def _run_section(w: Any, results: dict[str, Any], *, quick: bool) -> None:
    meta = results.get("meta", {})
    machine = meta.get("machine", {})
    level = "###" if quick else "##"
    title = f"{machine.get('cpu', '?')} (`{machine.get('cpu_kind', '?')}`)"
    w(f"{level} {title}" + (": quick smoke run" if quick else ""))
    w("")
    w(f"{'Quick smoke run' if quick else 'Measured'} {meta.get('started', '?')} ({meta.get('duration_s', 0):.0f} s). "
      f"CPU: {machine.get('cpu', '?')}, {meta.get('cpus', '?')} of {machine.get('logical_cpus', '?')} logical CPUs used, "
      f"{machine.get('memory_gib', '?')} GiB. NumPy's BLAS: OpenBLAS with `{_numpy_kernel(results)}` kernels; "
      f"PyTorch: {_torch_kernel(results)}. {meta.get('rounds', '?')} rounds of {meta.get('warmup', '?')} warm-up "
      f"and {meta.get('steps', '?')} timed steps per side. Load average (1, 5, 15 min): "
      f"{_loadavg(machine.get('load_average'))} at the start, {_loadavg(meta.get('load_average_at_end'))} at the end.")
    w("")
    if results.get("training"):
        w(main_table(results))
        w("")
        w("Times are milliseconds per training step (forward, backward, Adam); in brackets the ratio to")
        w("PyTorch+PEFT eager (median of the per-round ratios; their min–max). The compile time is what")
        w("`torch.compile`'s first step took beyond a step, fastest–slowest over the rounds (inductor")
        w("keeps compiled kernels in a cache on disk, so a later round may compile faster than the first).")
        w("")
    if quick:
        w("The targets are evaluated at the small and large configs only, so not in a quick run.")
        w("")
        return
    w(targets_table(results))
    w("")
    sub = "###"
    training = [e for e in results.get("training", []) if "sides" in e]
    if training:
        _training_details(w, results, training, sub)
    _peak_section(w, results, sub)
    _machine_section(w, results, sub)
    if results.get("profile"):
        _profile_section(w, results["profile"], sub)
    if results.get("inference"):
        _inference_section(w, results["inference"], sub)
    if results.get("memory"):
        _memory_section(w, results["memory"], sub)
    if results.get("delta_svd") is not None:
        w(f"{sub} `delta_svd`: the SVD of `s B A` without forming it")
        w("")
        w(_svd_section(results["delta_svd"]))
        w("")
    if results.get("backends"):
        w(f"{sub} The cost of portability (report only)")
        w("")
        w("The same model forward on plain NumPy, on `array_api_strict`, traced by autograd (forward")
        w("only, and a full gradient), relative to the plain NumPy forward; then the per-call cost of")
        w("`array_api_compat`'s NumPy functions against NumPy's own.")
        w("")
        w(_backends_section(results["backends"]))
        w("")


def _torch_kernel(results: dict[str, Any]) -> str:
    info = (results.get("peak", {}).get("before", {}).get("torch") or {}).get("torch") or {}
    return f"{info.get('cpu_capability', '?')} kernels, BLAS {info.get('blas', '?')}" if info else "not measured"


def _training_details(w: Any, results: dict[str, Any], training: list[dict[str, Any]], sub: str) -> None:
    w(f"{sub} Every side, LoRA against full fine-tuning, FLOP/s")
    w("")
    sides = [s for s in ("lora-ref", "lora-ref-reference", "lora-ref-full", "torch-eager", "torch-compile",
                         "torch-eager-full") if any(s in e["sides"] for e in training)]
    from .rounds import SIDE_NAMES

    rows = []
    for e in training:
        for s in sides:
            d = e["sides"].get(s)
            if d is None:
                continue
            if "median_s" not in d:
                rows.append([e["label"], SIDE_NAMES[s], d.get("not_measured", "")] + [""] * 4)
                continue
            rows.append([e["label"], SIDE_NAMES[s], _ms(d["median_s"]),
                         " ".join(_ms(m) for m in d["round_medians_s"]),
                         f"{_ms(d['min_s'])}–{_ms(d['max_s'])}", f"{d['gflops']:.1f}", _pct(d.get("fraction_of_peak"))])
    w(_table(["config", "side", "median ms", "each round's median ms", "fastest–slowest step ms", "GFLOP/s",
              "of best matmul rate"], rows))
    w("")
    rows = []
    for e in training:
        r = e["ratios"]
        rows.append([e["label"]] + [f"{r[k]['median']:.2f} ({r[k]['min']:.2f}–{r[k]['max']:.2f})" if k in r else "—"
                                    for k in ("lora-ref/lora-ref-full", "torch-eager/torch-eager-full",
                                              "torch-compile/torch-eager")])
    w(_table(["config", "LoRA / full, lora-ref", "LoRA / full, PyTorch eager", "`torch.compile` / eager"], rows))
    w("")
    w("The step's FLOPs are counted analytically (matrix products only; `benchmarks/flops.py`")
    w("derives each term): a LoRA step needs activation gradients only, so it costs about 2/3 of a")
    w("full fine-tuning step; a measured LoRA / full ratio below that means the full step ran at a")
    w("lower FLOP rate (its weight gradients, the embedding's scatter-add, Adam over every weight).")
    w("")
    checks = [(e["label"], e.get("same_function") or {}) for e in training]
    parts = []
    for label, c in checks:
        if not c:
            continue
        worst = max(c["relative_difference"].values(), default=0.0)
        agree = c.get("initial_losses_agree")
        parts.append(f"{label}: largest relative logit difference {worst:.1e} (bound {c['bound']:.1e}); "
                     f"starting losses {'agree' if agree else '**disagree**' if agree is False else 'not compared'}"
                     + (f" (spread {c['initial_loss_spread']:.1e}, bound {c['initial_loss_bound']:.1e})"
                        if "initial_loss_spread" in c else ""))
    if parts:
        w("Same function on every side: " + "; ".join(parts) + ".")
        w("")


def _peak_section(w: Any, results: dict[str, Any], sub: str) -> None:
    peak = results.get("peak")
    if not peak:
        return
    w(f"{sub} The machine's float32 matmul rate")
    w("")
    w(f"Each library alone in a fresh process, every core ({peak.get('formula', '')}, median per size), before")
    w(f"and after the training rounds. Best: **{peak.get('best_gflops', 0):.0f} GFLOP/s** ({peak.get('best_from')}),")
    w("the limit the FLOP rates above are compared with.")
    w("")
    sizes = sorted({n for when in ("before", "after") for lib in (peak.get(when) or {}).values()
                    if isinstance(lib, dict) for n in lib.get("gflops", {})}, key=int)
    rows = []
    for when in ("before", "after"):
        for lib, d in (peak.get(when) or {}).items():
            if isinstance(d, dict) and "gflops" in d:
                rows.append([f"{lib}, {when}"] + [_f(d["gflops"].get(n), 0) for n in sizes])
            else:
                rows.append([f"{lib}, {when}", str(d.get("not_measured") if isinstance(d, dict) else d)] + [""] * (len(sizes) - 1))
    w(_table(["library"] + [f"n={n} GFLOP/s" for n in sizes], rows))
    w("")


def _machine_section(w: Any, results: dict[str, Any], sub: str) -> None:
    meta = results.get("meta", {})
    machine = meta.get("machine", {})
    blas = machine.get("numpy_blas") or {}
    env = {k: v for k, v in (machine.get("environment") or {}).items() if v is not None}
    w(f"{sub} Machine")
    w("")
    w(_table(["", ""], [
        ["CPU", f"{machine.get('cpu', '?')} ({machine.get('machine', '?')}, {machine.get('system', '?')})"],
        ["cores used", f"{meta.get('cpus', '?')} of {machine.get('usable_cpus', '?')} usable"],
        ["NumPy BLAS", f"`{blas.get('kernel', '?')}` kernels ({blas.get('config', '?')})"],
        ["PyTorch", _torch_kernel(results)],
        ["environment", ", ".join(f"`{k}={v}`" for k, v in env.items()) or "none of the variables that change speed set"],
        ["versions", ", ".join(f"{k} {v}" for k, v in (machine.get("versions") or {}).items() if v)],
        ["command", f"`{meta.get('command', '?')}`"],
    ]))
    w("")


def _profile_section(w: Any, profile: list[dict[str, Any]], sub: str) -> None:
    w(f"{sub} Where the time goes")
    w("")
    w("A LoRA step of lora-ref, timed per layer type (`benchmarks/breakdown.py` wraps the model's")
    w("layers and their backward passes with timers): on one thread, and on every core, where the")
    w("batch is split into one slice per core and a layer's time is summed over the threads. PyTorch's")
    w("top operators by self time follow (measured in a process of its own).")
    w("")
    for e in profile:
        parts = {k: v for k, v in e.items() if isinstance(v, dict) and "parts_ms" in v}
        if parts:
            names: list[str] = []
            for v in parts.values():
                names += [n for n in v["parts_ms"] if n not in names]
            rows = [[n] + [_f(v["parts_ms"].get(n), 1) for v in parts.values()] for n in names]
            rows.append(["**step (wall)**"] + [_f(v["step_ms"], 1) for v in parts.values()])
            w(f"{e['label']}:")
            w("")
            w(_table(["layer (ms per step)"] + list(parts), rows))
            w("")
        ops = e.get("top_ops_ms_per_step")
        if ops:
            w(f"PyTorch + PEFT, {e['label']}, top operators ({e['note']}):")
            w("")
            w(_table(["operator", "ms per step", "calls per step"],
                     [[f"`{k}`", _f(v, 2), _f(e["calls_per_step"].get(k), 0)] for k, v in ops.items()]))
            w("")


def _inference_section(w: Any, inference: list[dict[str, Any]], sub: str) -> None:
    w(f"{sub} Inference")
    w("")
    w("LoRA adds no latency once merged (Section 4.1 of the paper): `W + s B A` is one matrix of")
    w("the base model's shape, so the merged forward should cost what the base model's does.")
    w("Unmerged, the reference order adds `2 r (d_in + d_out)` FLOPs per token and adapted matrix;")
    w("the training projection (`transformer_ref.fast.linear`) forms `W + s B A` once per call when")
    w("the batch is large enough (`2 r d_in d_out` FLOPs). Forward passes, logits only, float32.")
    w("")
    rows = []
    for e in inference:
        if "ratios" not in e:
            rows.append([e.get("label", "?"), e.get("not_measured", "")] + [""] * 5)
            continue
        t, r = e["times"], e["ratios"]
        rows.append([e["label"], _ms(t["base"]["median_s"]), _ms(t["merged"]["median_s"]),
                     _f(r["merged/base"]["median"], 3), _pct(r["unmerged/base"]["median"] - 1.0),
                     _pct(e["predicted_unmerged_overhead"]), _pct(e.get("predicted_unmerged_overhead_reference_order"))])
    w(_table(["config", "base ms", "merged ms", "merged / base", "unmerged overhead (measured)",
              "predicted (order used)", "predicted (reference order)"], rows))
    w("")


def _memory_section(w: Any, memory: list[dict[str, Any]], sub: str) -> None:
    w(f"{sub} Memory")
    w("")
    w("Peak memory NumPy allocates during one training step (after Adam's moments exist), traced")
    w("with `tracemalloc`, beside what the trainable parameters' gradients and Adam's two moments")
    w("need by formula. The rest of the peak is activations kept for the backward pass, which LoRA")
    w("needs as much as full fine-tuning does: LoRA's saving is the frozen weights' gradients and")
    w("optimizer state.")
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
    w(_table(["config", "LoRA step peak MiB", "full step peak MiB", "LoRA / full", "LoRA grads + Adam MiB",
              "full grads + Adam MiB", "weights MiB"], rows))
    w("")


def _speed_notes(w: Any) -> None:
    w("## What makes the lora-ref step fast")
    w("")
    w("The reference forward, `lora_ref.lora_linear` (`W x + s B (A x)`), is unchanged; the training")
    w("op set `transformer_ref.FAST` computes the same numbers in a faster order, and tests hold each")
    w("change to the reference (`tests/transformer/test_speed_paths.py`):")
    w("")
    w("* **Every core, one synchronisation per step.** `transformer_ref.fast.sharded_value_and_grad`")
    w("  splits the batch into one slice per core; each slice's forward and backward run in their own")
    w("  pinned thread with single-threaded BLAS (NumPy releases the GIL inside BLAS and ufuncs), and")
    w("  the slices' losses and gradients are combined weighted by their scored tokens. `train()` does")
    w("  this when the batch is large enough to gain (`auto_threads`). NumPy's BLAS thread count is")
    w("  process-wide in its bundled OpenBLAS, so it is set to one for the step and given back after.")
    w("* **Memory reuse.** `train()` calls `transformer_ref.machine.keep_freed_memory()`, so glibc")
    w("  keeps freed megabytes for the next step instead of page-faulting them in again.")
    w("* **One matrix product per projection.** `transformer_ref.fast.linear` folds (B, T) into one")
    w("  dimension and, when the batch is large enough, adds `s B A` to the frozen weight once per call.")
    w("* **Frozen weights get no gradient.** LoRA training differentiates the adapters only.")
    w("")


def _svd_section(svd: Any) -> str:
    if not isinstance(svd, dict) or "not_measured" in svd:
        return str(svd.get("not_measured") if isinstance(svd, dict) else svd)
    rows = _svd_rows(svd)
    if not rows:
        return "```text\n" + json.dumps(svd, indent=2) + "\n```"
    keys = [k for k in rows[0] if not isinstance(rows[0][k], (dict, list))]
    text = ("`lora_ref.analysis.delta_svd` finds the singular values and vectors of `s B A` from QR\n"
            "factorisations of the thin factors and an r x r SVD, never forming the d x d matrix; timed\n"
            f"against forming it and running SciPy's dense SVD ({svd.get('dtype', 'float64')}, times in seconds).\n\n")
    return text + _table(keys, [[f"{row.get(k):.4g}" if isinstance(row.get(k), float) else str(row.get(k))
                                 for k in keys] for row in rows])


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
    return "\n\n".join(parts)


# --------------------------------------------------------------------------------------------
# The plot
# --------------------------------------------------------------------------------------------


def write_plot(full: list[dict[str, Any]], path: Path = PLOT) -> Path | None:
    """One panel per CPU kind: each side's step time relative to PyTorch+PEFT eager, per config.
    None (and nothing written) when no full run has a PyTorch eager side."""
    kinds = [r for r in full if any("torch-eager" in e.get("sides", {}) for e in r.get("training", []))]
    if not kinds:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sides = [("lora-ref", "lora-ref train()"), ("lora-ref-reference", "lora-ref reference path"),
             ("torch-compile", "torch.compile")]
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 4), squeeze=False)
    for ax, results in zip(axes[0], kinds):
        training = [e for e in results["training"] if "torch-eager" in e.get("sides", {})]
        width = 0.8 / len(sides)
        for j, (key, label) in enumerate(sides):
            ratio_key = "torch-compile/torch-eager" if key == "torch-compile" else f"{key}/torch-eager"
            xs = [i + (j - (len(sides) - 1) / 2) * width for i in range(len(training))]
            ys = [e["ratios"][ratio_key]["median"] if ratio_key in e["ratios"] else 0.0 for e in training]
            ax.bar(xs, ys, width, label=label)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhline(0.9, color="k", ls="--", lw=0.8, label="target for train(): 0.9")
        ax.set_xticks(range(len(training)), [e["label"] for e in training], fontsize=8)
        ax.set_ylabel("step time / PyTorch+PEFT eager step")
        machine = results.get("meta", {}).get("machine", {})
        ax.set_title(f"{machine.get('cpu', '?')} ({machine.get('cpu_kind', '?')})", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def regenerate(results_dir: Path = RESULTS_DIR, page: Path = PAGE) -> tuple[Path, Path | None]:
    """Rewrite the page (and its plot, beside it) from every file in ``results_dir``. A plot left
    from earlier runs is removed when no run has one to show."""
    full, quick = load_results(results_dir)
    plot_path = page.with_suffix(".png")
    plot = write_plot(full, plot_path)
    if plot is None:
        plot_path.unlink(missing_ok=True)
    write_page(full, quick, page, plot.name if plot else None)
    return page, plot


def main(argv: list[str] | None = None) -> int:
    """Rewrite docs/performance.md (and .png) from benchmarks/results/ (or the folder given)."""
    argv = sys.argv[1:] if argv is None else argv
    results_dir = Path(argv[0]) if argv else RESULTS_DIR
    page, plot = regenerate(results_dir)
    print(f"wrote {page}" + (f" and {plot}" if plot else "") + f" from {results_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
