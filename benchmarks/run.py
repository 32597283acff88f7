"""Run the benchmarks; write benchmarks/results/<cpu-kind>.json and regenerate docs/performance.md.

    python -m benchmarks.run            # the measurement: small and large, 3 rounds (see --help)
    python -m benchmarks.run --quick    # a smoke run at a tiny size, 2 rounds: about a minute

Each library runs in its own fresh process per round (benchmarks/worker.py), the rounds in
rotating order (benchmarks/rounds.py); the matmul rate of NumPy and of PyTorch is measured alone,
before and after. The results go to ``benchmarks/results/<cpu-kind>.json`` (``<cpu-kind>`` from
the CPU's model name, e.g. ``amd-epyc``, ``intel-xeon``: the last full run per kind of machine is
kept), a quick run's to ``benchmarks/results/quick/<cpu-kind>.json``; the page is regenerated from
every file there. The table and the targets are printed at the end.

Options: ``--only training,peak,...`` a subset of the measurements, ``--sizes small`` one config,
``--no-torch`` leave PyTorch out, ``--cpus N`` run every process on N cores, ``--rounds``,
``--steps``, ``--warmup``, ``--results-dir``, ``--page``, ``--no-page``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from . import report
from .flops import StepShape
from .harness import machine_info
from .rounds import WorkerError, compare, run_worker
from .suites import CONFIGS, LLAMA_CONFIGS, LLAMA_SIDES, gpu_suite, llama_available
from .torch_gpt2 import available as torch_available

__all__ = ["SIDES", "SUITES", "main", "run_all"]

SUITES = ("peak", "training", "profile", "inference", "memory", "backends", "delta_svd", "gpu")
QUICK_SUITES = ("peak", "training", "inference", "memory", "gpu")
SIDES = ("lora-ref", "lora-ref-reference", "lora-ref-full", "torch-eager", "torch-compile", "torch-eager-full")
FULL = {"rounds": 3, "warmup": 3, "steps": 10, "peak_sizes": (512, 1024, 2048), "peak_repeats": 7, "repeats": 25}
QUICK_SIDES = tuple(s for s in SIDES if s != "torch-eager-full")     # the slowest to start, and no target
QUICK = {"rounds": 2, "warmup": 1, "steps": 3, "peak_sizes": (64, 128, 256), "peak_repeats": 3, "repeats": 3}


def _log(message: str) -> None:
    print(f"[benchmarks {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _peaks(libs: Sequence[str], sizes: Sequence[int], repeats: int, cpus: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for lib in libs:
        try:
            out[lib] = run_worker(["peak", "--lib", lib, "--sizes", ",".join(map(str, sizes)),
                                   "--repeats", str(repeats), *cpus])
        except WorkerError as exc:
            out[lib] = {"not_measured": f"not measured: {exc}"}
    return out


def _suite(name: str, size: str, quick: bool, repeats: int, cpus: list[str]) -> Any:
    args = ["suite", "--name", name, "--config", size, "--repeats", str(repeats), *cpus] + (["--quick"] if quick else [])
    try:
        return run_worker(args)
    except WorkerError as exc:
        return {"size": size, "label": size, "not_measured": f"not measured: {exc}"}


def run_all(*, quick: bool = False, configs: Mapping[str, StepShape] | None = None, suites: Sequence[str] = SUITES,
            with_torch: bool = True, cpus: int | None = None, log: Callable[[str], None] = _log,
            **settings: Any) -> dict[str, Any]:
    """Run the chosen ``suites`` on ``configs`` (names of benchmarks.suites.ALL_CONFIGS; default
    small and large, and the LLaMA slot); return the results as a JSON-ready dict. ``settings``
    override :data:`FULL` / :data:`QUICK` (rounds, warmup, steps, peak_sizes, peak_repeats,
    repeats). Every measurement runs in fresh processes; this one only starts them."""
    unknown = sorted(set(suites) - set(SUITES))
    if unknown:
        raise ValueError(f"unknown suites {unknown}; valid: {', '.join(SUITES)}")
    bad = sorted(set(settings) - set(FULL))
    if bad:
        raise ValueError(f"unknown settings {bad}; valid: {', '.join(FULL)}")
    plan = {**(QUICK if quick else FULL), **settings}
    configs = dict({**CONFIGS, **LLAMA_CONFIGS} if configs is None else configs)
    gpt2 = {k: v for k, v in configs.items() if v.family == "gpt2"}
    llama = {k: v for k, v in configs.items() if v.family == "llama"}
    torch_reason = torch_available() if with_torch else "not measured: PyTorch left out (--no-torch)"
    sides = [s for s in (QUICK_SIDES if quick else SIDES) if torch_reason is None or not s.startswith("torch")]
    cpu_args = [] if cpus is None else ["--cpus", str(cpus)]
    machine = machine_info()
    started = time.perf_counter()
    results: dict[str, Any] = {"meta": {
        "quick": quick, "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": "python -m benchmarks.run " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "suites": list(suites), "sides": sides, "torch": torch_reason or "measured",
        "cpus": cpus if cpus is not None else machine["usable_cpus"],
        "rounds": plan["rounds"], "warmup": plan["warmup"], "steps": plan["steps"],
        "method": "each side a fresh process per round, rounds in rotating order, ratio = median of per-round ratios",
        "machine": machine}}
    peak_libs = ["numpy"] + (["torch"] if torch_reason is None else [])
    if "peak" in suites:
        log("float32 matmul rate, before")
        results["peak"] = {"before": _peaks(peak_libs, plan["peak_sizes"], plan["peak_repeats"], cpu_args),
                           "formula": "2 n^3 FLOPs per n x n @ n x n product, float32"}
    if "training" in suites:
        rounds = {"rounds": plan["rounds"], "warmup": plan["warmup"], "steps": plan["steps"], "cpus": cpus, "log": log}
        results["training"] = compare(gpt2, sides, **rounds) if gpt2 else []
        reason = llama_available()
        if llama and reason is None:          # the LLaMA rows: LoRA on q and v against LlamaForCausalLM + PEFT
            results["training"] += compare(llama, [s for s in LLAMA_SIDES if s in sides], **rounds)
        elif llama:
            results["training"] += [{"size": k, "family": "llama", "label": v.label, "not_measured": reason}
                                    for k, v in llama.items()]
    if "peak" in suites:
        log("float32 matmul rate, after")
        results["peak"]["after"] = _peaks(peak_libs, plan["peak_sizes"], plan["peak_repeats"], cpu_args)
        best = [(d["peak_gflops"], f"{lib} {when}, n={d['peak_from'].split('n=')[-1]}")
                for when in ("before", "after") for lib, d in results["peak"][when].items() if "peak_gflops" in d]
        if best:
            results["peak"]["best_gflops"], results["peak"]["best_from"] = max(best)
            for entry in results.get("training", []):
                for side in entry.get("sides", {}).values():
                    if "gflops" in side:
                        side["fraction_of_peak"] = side["gflops"] / results["peak"]["best_gflops"]
    for name in ("profile", "inference", "memory"):
        if name in suites:
            results[name] = []
            for size in gpt2:
                log(f"{name}, {size}")
                results[name].append(_suite(name, size, quick, plan["repeats"], cpu_args))
                if name == "profile" and torch_reason is None:
                    results[name][-1].update({k: v for k, v in _suite("torch-profile", size, quick, plan["repeats"],
                                                                      cpu_args).items() if k not in ("size", "label")})
    if "backends" in suites and gpt2:
        log("backends")
        results["backends"] = _suite("backends", next(iter(gpt2)), quick, max(3, plan["repeats"] // 3), cpu_args)
    if "delta_svd" in suites:
        log("delta_svd")
        results["delta_svd"] = _suite("delta_svd", next(iter(gpt2), "small"), quick, 1, cpu_args)
    if "gpu" in suites:
        results["gpu"] = gpu_suite()
    results["targets"] = report.targets(results)
    results["meta"]["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    results["meta"]["duration_s"] = time.perf_counter() - started
    return results


def main(argv: list[str] | None = None) -> int:
    from .suites import ALL_CONFIGS

    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run: tiny size, 2 rounds of 3 steps (about a minute)")
    ap.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(SUITES)}")
    ap.add_argument("--sizes", default=None, help=f"comma-separated subset of {','.join(ALL_CONFIGS)} "
                                                  "(default: small,large,llama-small,llama-large; --quick: "
                                                  "tiny,llama-tiny)")
    ap.add_argument("--no-torch", action="store_true", help="leave PyTorch out (no comparison)")
    ap.add_argument("--cpus", type=int, default=None, help="cores for every process (default: every usable one)")
    for name in ("rounds", "warmup", "steps"):
        ap.add_argument(f"--{name}", type=int, default=None, help=f"default {FULL[name]} ({QUICK[name]} with --quick)")
    ap.add_argument("--results-dir", type=Path, default=report.RESULTS_DIR, help="where results files are kept")
    ap.add_argument("--page", type=Path, default=report.PAGE, help="the page to regenerate (the PNG goes beside it)")
    ap.add_argument("--no-page", action="store_true", help="write no page and no plot")
    args = ap.parse_args(argv)
    sizes = [s for s in (args.sizes or ("tiny,llama-tiny" if args.quick else "small,large,llama-small,llama-large"))
             .split(",") if s]
    bad = [s for s in sizes if s not in ALL_CONFIGS]
    if bad or not sizes:
        ap.error(f"unknown sizes {bad or sizes}; valid: {', '.join(ALL_CONFIGS)}")
    suites = [s for s in (args.only or ",".join(QUICK_SUITES if args.quick else SUITES)).split(",") if s]
    settings = {k: getattr(args, k) for k in ("rounds", "warmup", "steps") if getattr(args, k) is not None}
    for k, v in settings.items():
        if v < (0 if k == "warmup" else 1):
            ap.error(f"--{k} must be {'>= 0' if k == 'warmup' else 'a positive int'}, got {v}")
    try:
        results = run_all(quick=args.quick, configs={s: ALL_CONFIGS[s] for s in sizes}, suites=suites,
                          with_torch=not args.no_torch, cpus=args.cpus, **settings)
    except ValueError as exc:
        ap.error(str(exc))
    out = report.result_path(results["meta"]["machine"]["cpu_kind"], args.quick, args.results_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    _log(f"wrote {out}")
    if not args.no_page:
        page, plot = report.regenerate(args.results_dir, args.page)
        _log(f"wrote {page}" + (f" and {plot}" if plot else ""))
    print(report.text_summary(results))
    disagree = [e["label"] for e in results.get("training", []) if (e.get("same_function") or {}).get("initial_losses_agree") is False]
    if disagree:
        _log(f"the sides' starting losses disagree beyond rounding at {', '.join(disagree)}: see the results file")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
