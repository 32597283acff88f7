"""One measurement in a fresh interpreter: ``python -m benchmarks.worker``.

Every side of a comparison between libraries runs here, one process each, so no library's
threads, allocator or BLAS settings are there when another is timed (benchmarks/rounds.py
starts these processes in rotating order and divides their times round by round):

    python -m benchmarks.worker step --lib lora-ref --config small --warmup 3 --steps 10
    python -m benchmarks.worker step --lib torch-eager --config large --steps 10
    python -m benchmarks.worker peak --lib numpy --sizes 512,1024,2048
    python -m benchmarks.worker suite --name inference --config small

``--config``: small, large, tiny (GPT-2, LoRA on c_attn) or llama-small, llama-large (LLaMA, LoRA
on q_proj and v_proj, against transformers' LlamaForCausalLM + PEFT). ``step`` libraries: ``lora-ref`` (``transformer_ref.train`` as a user calls it: nothing but the
model and data), ``lora-ref-reference`` (``train(..., ops=REFERENCE, threads=1)``: the paper's
order, no batch split), ``lora-ref-full`` (full fine-tuning), ``torch-eager`` / ``torch-compile``
(transformers + PEFT, eager or ``torch.compile``), ``torch-eager-full``. The result is one JSON
object, on stdout or in ``--json PATH``: every step's seconds (warm-up steps apart), the loss
before the first update, the thread counts before and after, the BLAS kernel.

``--cpus N`` confines the process to N of the cores it may use before any library loads, so
every library (NumPy's BLAS, PyTorch's threads, lora-ref's batch slices) sees N cores.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

__all__ = ["LIBS", "main"]

REF_LIBS = ("lora-ref", "lora-ref-reference", "lora-ref-full")
TORCH_LIBS = ("torch-eager", "torch-compile", "torch-eager-full")
LIBS = REF_LIBS + TORCH_LIBS
SUITE_NAMES = ("inference", "memory", "backends", "profile", "torch-profile", "delta_svd")


def _confine(cpus: int | None) -> None:
    """Run on the first ``cpus`` cores this process may use (before NumPy or PyTorch load, which
    size their thread pools from it)."""
    if cpus is None:
        return
    if not hasattr(os, "sched_setaffinity"):
        raise SystemExit("--cpus needs os.sched_setaffinity (Linux)")
    usable = sorted(os.sched_getaffinity(0))
    if not 1 <= cpus <= len(usable):
        raise SystemExit(f"--cpus must be between 1 and {len(usable)} (the cores this process may use), got {cpus}")
    os.sched_setaffinity(0, set(usable[:cpus]))


def _threads(with_torch: bool) -> dict[str, Any]:
    """Give every library in this process one thread per usable core; return the counts."""
    from .harness import numpy_blas_threads, set_numpy_blas_threads

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    before = numpy_blas_threads()
    set_numpy_blas_threads(cores)
    out: dict[str, Any] = {"cores": cores, "numpy_blas_at_start": before, "numpy_blas": numpy_blas_threads()}
    if with_torch:
        import torch

        torch.set_num_threads(cores)
        out["torch_intra_op"] = torch.get_num_threads()
    return out


def _shape(config: str) -> Any:
    from .suites import ALL_CONFIGS, LLAMA_CONFIGS, llama_available

    if config not in ALL_CONFIGS:
        raise SystemExit(f"--config must be one of {', '.join(ALL_CONFIGS)}, got {config!r}")
    if config in LLAMA_CONFIGS and llama_available() is not None:
        raise SystemExit(f"--config {config}: {llama_available()}")
    return ALL_CONFIGS[config]


def _quiet() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)     # transformers' deprecation notes
    warnings.filterwarnings("ignore", category=UserWarning)


def step(lib: str, config: str, *, warmup: int, steps: int, logits: Path | None = None) -> dict[str, Any]:
    """Time ``warmup + steps`` training steps of ``lib`` on ``config``; see the module docstring."""
    import numpy as np

    from .harness import numpy_blas_info, numpy_blas_threads, torch_info
    from .ref_gpt2 import make_model, train_steps

    shape = _shape(config)
    is_torch = lib in TORCH_LIBS
    if is_torch:
        _quiet()
    threads = _threads(is_torch)
    model = make_model(shape)
    out: dict[str, Any] = {"lib": lib, "config": config, "label": shape.label, "warmup": warmup, "steps": steps}
    if is_torch:
        from transformer_ref import merge_adapters

        from .torch_gpt2 import make_torch_step
        from .torch_llama import make_torch_llama_step

        full = lib.endswith("-full")
        if shape.family == "llama":
            if full:
                raise SystemExit("--lib torch-eager-full: the LLaMA row compares LoRA steps only")
            st = make_torch_llama_step(shape, model["params"], model["adapters"], model["tokens"], model["targets"],
                                       compile=lib == "torch-compile")
        else:
            weights = ({k: np.asarray(v) for k, v in merge_adapters(model["params"], model["adapters"],
                                                                      model["lora_config"]).items()}
                       if full else model["params"])
            st = make_torch_step(shape, "full" if full else "lora", weights, None if full else model["adapters"],
                                 model["tokens"], model["targets"], compile=lib == "torch-compile")
        if logits is not None:
            np.save(logits, st["logits"]())
        gc.collect()
        gc.freeze()                     # setup's objects are never walked by a collection mid-step
        seconds, losses = [], []
        for _ in range(warmup + steps):
            t0 = time.perf_counter()
            losses.append(st["step"]())
            seconds.append(time.perf_counter() - t0)
        gc.unfreeze()
        out["slices"] = None
    else:
        if logits is not None:
            np.save(logits, _ref_logits(model, lib))
        gc.collect()
        gc.freeze()
        run = train_steps(model, lib, warmup + steps)
        gc.unfreeze()
        seconds, losses = run["seconds"], run["losses"]
        out["slices"], out["train_call"] = run["threads"], run["call"]
    timed = seconds[warmup:]
    out.update({
        "runs_s": [round(s, 7) for s in timed], "warmup_s": [round(s, 7) for s in seconds[:warmup]],
        "first_step_s": seconds[0], "median_s": statistics.median(timed), "min_s": min(timed), "max_s": max(timed),
        "initial_loss": losses[0], "final_loss": losses[-1],
        "threads": threads | {"numpy_blas_at_end": numpy_blas_threads()},
        "numpy_blas": numpy_blas_info(), "torch": torch_info(),
        "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
    })
    return out


def _ref_logits(model: dict[str, Any], lib: str) -> Any:
    """The logits (B, T, V) ``lib`` starts from, computed with the op set its training uses."""
    import numpy as np

    from transformer_ref import FAST, REFERENCE, forward, merge_adapters

    config, lc, tokens = model["config"], model["lora_config"], model["tokens"]
    if lib == "lora-ref-full":
        return np.asarray(forward(merge_adapters(model["params"], model["adapters"], lc), tokens, config, ops=FAST))
    ops = REFERENCE if lib == "lora-ref-reference" else FAST
    return np.asarray(forward(model["params"], tokens, config, model["adapters"], lc, ops=ops))


def peak(lib: str, sizes: tuple[int, ...], repeats: int) -> dict[str, Any]:
    """The float32 matmul rate of ``lib`` alone in this process (harness.matmul_peak)."""
    from .harness import matmul_peak, numpy_blas_info, torch_info

    if lib == "torch":
        _quiet()
    threads = _threads(lib == "torch")
    out = matmul_peak(lib, sizes, repeats)
    return out | {"threads": threads, "numpy_blas": numpy_blas_info(), "torch": torch_info()}


def suite(name: str, config: str, *, quick: bool, repeats: int, warmup: int) -> Any:
    """One of the lora-ref-only measurements of benchmarks.suites (or PyTorch's operator profile)."""
    from . import suites

    shape = _shape(config)
    _threads(name == "torch-profile")
    if name == "torch-profile":
        _quiet()
    runners = {
        "inference": lambda: suites.inference_suite(config, shape, repeats=repeats, warmup=warmup),
        "memory": lambda: suites.memory_suite(config, shape),
        "backends": lambda: suites.backends_suite(shape, repeats=repeats, warmup=min(warmup, 1)),
        "profile": lambda: suites.profile_suite(config, shape, repeats=2 if quick else 3),
        "torch-profile": lambda: suites.torch_profile_suite(config, shape, repeats=2 if quick else 3),
        "delta_svd": lambda: suites.delta_svd_suite(quick),
    }
    return runners[name]()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.worker", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    s = sub.add_parser("step", help="time training steps of one library")
    s.add_argument("--lib", choices=LIBS, required=True)
    s.add_argument("--config", required=True)
    s.add_argument("--warmup", type=int, default=3)
    s.add_argument("--steps", type=int, default=10)
    s.add_argument("--logits", type=Path, default=None, help="save the starting logits here (.npy) for the same-function check")
    p = sub.add_parser("peak", help="float32 matmul GFLOP/s of one library")
    p.add_argument("--lib", choices=("numpy", "torch"), required=True)
    p.add_argument("--sizes", default="512,1024,2048")
    p.add_argument("--repeats", type=int, default=5)
    q = sub.add_parser("suite", help="one lora-ref-only measurement")
    q.add_argument("--name", choices=SUITE_NAMES, required=True)
    q.add_argument("--config", required=True)
    q.add_argument("--quick", action="store_true")
    q.add_argument("--repeats", type=int, default=11)
    q.add_argument("--warmup", type=int, default=2)
    for parser in (s, p, q):
        parser.add_argument("--cpus", type=int, default=None, help="run on this many cores (default: every usable one)")
        parser.add_argument("--json", type=Path, default=None, help="write the result here instead of stdout")
    args = ap.parse_args(argv)
    for name in ("warmup", "steps", "repeats"):
        value = getattr(args, name, None)
        if value is not None and value < (0 if name == "warmup" else 1):
            ap.error(f"--{name} must be {'>= 0' if name == 'warmup' else 'a positive int'}, got {value}")
    _confine(args.cpus)
    if args.what == "step":
        result = step(args.lib, args.config, warmup=args.warmup, steps=args.steps, logits=args.logits)
    elif args.what == "peak":
        try:
            sizes = tuple(int(n) for n in args.sizes.split(","))
        except ValueError:
            ap.error(f"--sizes must be comma-separated ints, got {args.sizes!r}")
        result = peak(args.lib, sizes, args.repeats)
    else:
        result = suite(args.name, args.config, quick=args.quick, repeats=args.repeats, warmup=args.warmup)
    text = json.dumps(result)
    if args.json is None:
        print(text)
    else:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
