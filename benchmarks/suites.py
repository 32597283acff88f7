"""The measurements, one function each; every one returns a JSON-ready dict.

The comparison between libraries (the training step) is not here: each library runs in its own
process (benchmarks/worker.py, benchmarks/rounds.py). What is here measures lora-ref against
itself -- forwards merged and unmerged, memory, backends, where a step's time goes -- and runs in
one process per measurement (``python -m benchmarks.worker suite --name ...``), timed with
:func:`benchmarks.harness.alternate`; PyTorch's operator profile runs in a process of its own.
"""

from __future__ import annotations

import dataclasses
import gc
import importlib.util
import statistics
import timeit
import tracemalloc
from typing import Any

import numpy as np

from .flops import StepShape, memory_accounting, step_flops
from .harness import alternate, paired_ratio, summarize
from .ref_gpt2 import make_model, make_ref_step
from .torch_gpt2 import available as torch_available
from .torch_gpt2 import make_torch_step

__all__ = ["ALL_CONFIGS", "CONFIGS", "LLAMA_CONFIGS", "LLAMA_SIDES", "LLAMA_TINY", "TINY", "backends_suite", "delta_svd_suite", "gpu_suite",
           "inference_suite", "llama_available", "memory_suite", "profile_suite", "same_function_bound",
           "shape_dict", "torch_profile_suite"]

# Issue #7's two configurations (the default), and a tiny one to check the harness quickly.
CONFIGS = {
    "small": StepShape(n_embd=128, n_layer=4, seq_len=64, batch=16),
    "large": StepShape(n_embd=512, n_layer=6, seq_len=128, batch=8),
}
TINY = StepShape(n_embd=32, n_layer=2, seq_len=16, batch=2, vocab=64, n_head=2, r=4)

# The LLaMA rows (issue 18): LoRA on q_proj and v_proj (r = 8) of transformer_ref.llama against
# transformers' LlamaForCausalLM + PEFT, eager, at the GPT-2 configs' shapes (MLP width 4C, as
# many key/value heads as query heads). Where transformer_ref.llama cannot be imported, the page
# shows these rows as not measured, with the reason (llama_available).
LLAMA_CONFIGS = {"llama-small": dataclasses.replace(CONFIGS["small"], family="llama"),
                 "llama-large": dataclasses.replace(CONFIGS["large"], family="llama")}
LLAMA_SIDES = ("lora-ref", "lora-ref-reference", "torch-eager")
LLAMA_TINY = dataclasses.replace(TINY, family="llama")
ALL_CONFIGS = {**CONFIGS, "tiny": TINY, **LLAMA_CONFIGS, "llama-tiny": LLAMA_TINY}


def llama_available() -> str | None:
    """None when the LLaMA rows can be measured; otherwise why not."""
    if importlib.util.find_spec("transformer_ref.llama") is None:
        return "not measured: transformer_ref.llama does not exist yet"
    return None


def shape_dict(s: StepShape) -> dict[str, Any]:
    return {"family": s.family, "n_embd": s.n_embd, "n_layer": s.n_layer, "n_head": s.heads, "seq_len": s.seq_len,
            "batch": s.batch, "vocab": s.vocab, "r": s.r, "lora_alpha": 16.0,
            "lora_targets": "q_proj, v_proj" if s.family == "llama" else "c_attn", "dtype": "float32"}


def same_function_bound(shape: StepShape) -> float:
    """Relative bound on the difference of two float32 evaluations of the same logits.

    ``tolerance(float32, n)`` with n the chained roundings of the longest dot products on a
    logit's path: per block the c_attn/c_proj/c_fc/mlp.c_proj sums (C, C, C, F terms), the
    attention sums over T keys and D channels, then the LM head's C terms; doubled for two
    independent evaluations. It is a heuristic scale for a whole network (LayerNorm can amplify
    errors), used only to prove both sides run the same model: a wrong weight, adapter or scale
    changes the logits by O(1) relative to their size, thousands of times more.
    """
    from lora_ref.testing import tolerance

    C, F, T = shape.n_embd, 4 * shape.n_embd, shape.seq_len
    n = shape.n_layer * (3 * C + F + T + C // shape.heads) + C
    return 2.0 * tolerance(np.float32, n)


# --------------------------------------------------------------------------------------------
# 4. Inference: merged vs base forward (no added latency), unmerged overhead vs FLOP count
# --------------------------------------------------------------------------------------------


def inference_suite(size: str, shape: StepShape, *, repeats: int, warmup: int = 2, pause: float = 0.0) -> dict[str, Any]:
    """Forward passes (logits) of the base model, the merged model and the unmerged LoRA model,
    all with the training op set ``transformer_ref.FAST`` (as a training loop evaluates)."""
    from transformer_ref import FAST, forward, merge_adapters

    model = make_model(shape)
    config, lc, params, adapters, tokens = (model[k] for k in ("config", "lora_config", "params", "adapters", "tokens"))
    merged = merge_adapters(params, adapters, lc)
    fns = {"base": lambda: forward(params, tokens, config, ops=FAST),
           "merged": lambda: forward(merged, tokens, config, ops=FAST),
           "unmerged": lambda: forward(params, tokens, config, adapters, lc, ops=FAST)}
    times = alternate(fns, repeats=repeats, warmup=warmup, pause=pause)
    flops = step_flops(shape)
    return {"size": size, "label": shape.label, "shape": shape_dict(shape),
            "times": {k: summarize(v) for k, v in times.items()},
            "ratios": {"merged/base": paired_ratio(times["merged"], times["base"]),
                       "unmerged/base": paired_ratio(times["unmerged"], times["base"]),
                       "unmerged/merged": paired_ratio(times["unmerged"], times["merged"])},
            "predicted_unmerged_overhead": (flops["lora_forward_overhead_folded"] if flops["lora_forward_folded"]
                                            else flops["lora_forward_overhead"]),
            "predicted_unmerged_overhead_reference_order": flops["lora_forward_overhead"],
            "unmerged_path": ("W + s B A formed once per call (fast.linear)" if flops["lora_forward_folded"]
                              else "thin products x A^T, (x A^T) B^T"),
            "flops": {"base_forward": flops["base_forward"], "lora_forward": flops["lora_forward"]}}


# --------------------------------------------------------------------------------------------
# 5. Memory: tracemalloc peak of one step, LoRA vs full, beside the byte accounting
# --------------------------------------------------------------------------------------------


def memory_suite(size: str, shape: StepShape) -> dict[str, Any]:
    """Peak bytes NumPy allocates during one training step (after a warm-up step), LoRA and full."""
    model = make_model(shape)
    out: dict[str, Any] = {"size": size, "label": shape.label, "shape": shape_dict(shape),
                           "accounting": memory_accounting(shape)}
    for mode in ("lora", "full"):
        step = make_ref_step(model, mode)
        step["step"]()                     # Adam's moments exist from here on, as in training
        gc.collect()
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            before = tracemalloc.get_traced_memory()[0]
            step["step"]()
            after, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        out[mode] = {"peak_bytes": peak - before, "retained_bytes": after - before}
        del step
        gc.collect()
    out["ratio_lora_full"] = out["lora"]["peak_bytes"] / out["full"]["peak_bytes"]
    return out


# --------------------------------------------------------------------------------------------
# 7. The cost of array_api_strict, of autograd's engine and of array_api_compat's wrappers
# --------------------------------------------------------------------------------------------


def backends_suite(shape: StepShape, *, repeats: int, warmup: int = 1) -> dict[str, Any]:
    """Forward of one model on NumPy, on array_api_strict, traced by autograd; per-call costs.
    Every row computes with the training op set ``transformer_ref.FAST``; the last one with
    ``traced(FAST)``, its undecorated forwards differentiated by autograd.numpy."""
    from autograd import make_vjp, value_and_grad

    from lora_ref.backend import asarray, use_backend
    from transformer_ref import FAST, forward, loss, traced

    model = make_model(shape)
    config, lc, params, adapters, tokens, targets = (
        model[k] for k in ("config", "lora_config", "params", "adapters", "tokens", "targets"))
    with use_backend("array_api_strict"):
        s_params = {k: asarray(np.asarray(v)) for k, v in params.items()}
        s_adapters = {k: {n: asarray(np.asarray(a)) for n, a in v.items()} for k, v in adapters.items()}
        s_tokens = asarray(tokens)

    def objective(ad: Any, ops: Any = FAST) -> Any:
        return loss(params, tokens, targets, config, ad, lc, ops=ops)

    second = traced(FAST)

    def traced_undecorated() -> Any:
        return value_and_grad(lambda ad: objective(ad, second))(adapters)

    fns = {
        "numpy": lambda: forward(params, tokens, config, adapters, lc, ops=FAST),
        "array_api_strict": lambda: forward(s_params, s_tokens, config, s_adapters, lc, ops=FAST),
        "autograd trace (forward only)": lambda: make_vjp(objective)(adapters),
        "autograd value_and_grad (hand-written VJPs)": lambda: value_and_grad(objective)(adapters),
        "autograd value_and_grad (autograd.numpy VJPs)": traced_undecorated,
    }
    times = alternate(fns, repeats=repeats, warmup=warmup)
    base = statistics.median(times["numpy"])
    forward_rows = {name: {**summarize(ts), "vs_numpy": statistics.median(ts) / base} for name, ts in times.items()}
    return {"label": shape.label, "shape": shape_dict(shape), "forward": forward_rows,
            "per_call": _per_call_overhead(),
            "note": ("The two value_and_grad rows include the backward pass (they are a LoRA step "
                     "without Adam); autograd.numpy's VJPs are the independent derivation the tests "
                     "use, not the training path.")}


def _per_call_overhead(number: int = 20000) -> dict[str, dict[str, float]]:
    """Microseconds per call on small arrays: NumPy itself vs array_api_compat.numpy's function
    and lora_ref.backend.namespace's lookup (medians of 5 timeit runs)."""
    import array_api_compat.numpy as compat

    from lora_ref.backend import namespace

    x = np.ones((8, 8), dtype=np.float32)
    pairs = {
        "namespace lookup (lora_ref.backend.namespace vs none)": (lambda: None, lambda: namespace(x)),
        "matmul": (lambda: np.matmul(x, x), lambda: compat.matmul(x, x)),
        "matrix_transpose": (lambda: np.swapaxes(x, -1, -2), lambda: compat.matrix_transpose(x)),
        "zeros": (lambda: np.zeros((8, 8), dtype=np.float32), lambda: compat.zeros((8, 8), dtype=compat.float32)),
        "astype": (lambda: x.astype(np.float64), lambda: compat.astype(x, compat.float64)),
        "exp": (lambda: np.exp(x), lambda: compat.exp(x)),
    }
    out = {}
    for name, (plain, wrapped) in pairs.items():
        t_plain = statistics.median(timeit.repeat(plain, number=number, repeat=5)) / number * 1e6
        t_wrapped = statistics.median(timeit.repeat(wrapped, number=number, repeat=5)) / number * 1e6
        out[name] = {"numpy_us": t_plain, "compat_us": t_wrapped}
    return out


# --------------------------------------------------------------------------------------------
# Where the time goes: lora-ref per layer, PyTorch per operator
# --------------------------------------------------------------------------------------------


def profile_suite(size: str, shape: StepShape, *, repeats: int = 3) -> dict[str, Any]:
    """A LoRA step's time per layer type (forward, backward) in lora-ref, on one thread and on
    every core (thread-milliseconds). PyTorch's profile is :func:`torch_profile_suite`, run in a
    process of its own."""
    from transformer_ref import FAST
    from transformer_ref.machine import blas_threads

    from .breakdown import step_breakdown, timed_ops

    model = make_model(shape)
    out: dict[str, Any] = {"size": size, "label": shape.label}
    for name, threads in (("lora-ref, 1 thread", 1), ("lora-ref, every core", None)):
        ops, totals = timed_ops(FAST)
        step = make_ref_step(model, "lora", threads=threads, ops=ops)
        step["step"]()
        with blas_threads(1 if threads == 1 else None):     # every BLAS on one thread, restored after
            out[name] = step_breakdown(step["step"], totals, repeats=repeats)
    return out


def torch_profile_suite(size: str, shape: StepShape, *, repeats: int = 3) -> dict[str, Any]:
    """PyTorch + PEFT's top operators by self CPU time in an eager LoRA step."""
    reason = torch_available()
    if reason is not None:
        return {"size": size, "label": shape.label, "not_measured": reason}
    import torch

    model = make_model(shape)
    step = make_torch_step(shape, "lora", model["params"], model["adapters"], model["tokens"], model["targets"])
    step["step"]()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            step["step"]()
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]
    return {"size": size, "label": shape.label,
            "top_ops_ms_per_step": {e.key: e.self_cpu_time_total / 1e3 / repeats for e in rows},
            "calls_per_step": {e.key: e.count / repeats for e in rows},
            "note": "self CPU time of each operator on its calling thread (its intra-op threads work inside it)"}


# --------------------------------------------------------------------------------------------
# 6. delta_svd (benchmarks/bench_delta_svd.py) and 8. GPU
# --------------------------------------------------------------------------------------------


def delta_svd_suite(quick: bool) -> dict[str, Any]:
    """``benchmarks.bench_delta_svd.run(quick)``, or why it could not run."""
    try:
        from . import bench_delta_svd
    except ImportError as exc:
        return {"not_measured": f"not measured: benchmarks/bench_delta_svd.py is not importable ({exc})"}
    if not hasattr(bench_delta_svd, "run"):
        return {"not_measured": "not measured: benchmarks/bench_delta_svd.py has no run(quick) function"}
    return bench_delta_svd.run(quick=quick)


def gpu_suite() -> str:
    """Whether a GPU could be measured here (CuPy and a CUDA device); the reason when not."""
    from lora_ref.backend import BackendUnavailableError, use_backend

    try:
        with use_backend("cupy"):
            pass
    except BackendUnavailableError as exc:
        return f"not measured: no GPU lent to this run ({str(exc).split(':')[0]})"
    return "not measured: a GPU is present, but the GPU benchmark (CuPy against PyTorch CUDA eager) is not written yet"
