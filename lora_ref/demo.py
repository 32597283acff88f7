"""The ``lora-ref demo`` experiment: the LoRA paper's Tables 5, 6, 7 and Figure 3, in miniature.

One run of :func:`run_demo` does, deterministically for a seed:

1. pretrain a small GPT-2-architecture model (:mod:`transformer_ref`) from scratch on the
   pretraining cipher task (:func:`transformer_ref.data.pretraining_task`);
2. fine-tune it on the downstream task (the same cipher with a few pairs of symbols swapped,
   :func:`transformer_ref.data.downstream_task`) with full fine-tuning, and with LoRA on
   (W_q, W_v) at every rank of ``config.ranks`` (Table 6's rank sweep), plus W_q alone and all
   four attention projections at the parameter budget of (W_q, W_v) at ``budget_rank``
   (Table 5: W_q at 2b, (W_q, W_v) at b, (W_q, W_k, W_v, W_o) at b / 2). q, k and v are row
   blocks of GPT-2's fused ``attn.c_attn`` adapted through ``LoraConfig.enable_lora``
   (loralib's MergedLinear); o is ``attn.c_proj``. Every fine-tuning run starts from the same
   pretrained weights and sees the same batches;
3. measure: held-out loss and accuracy of each run; trainable parameters and Adam's state bytes,
   counted on the arrays and by formula; merged versus unmerged logits; the singular values of
   the learned updates; the subspace similarity phi(A_{r=8}, A_{r=64}) (Figure 3); the
   amplification factor (Table 7);
4. write ``report.md`` (tables; every number computed), ``results.json`` (the same numbers) and,
   when matplotlib is installed, PNG figures in ``figures/``.

Shapes follow :mod:`lora_ref`: W (d_out, d_in), A (r, d_in), B (d_out, r), dW = s B A with
s = alpha / r. C = n_embd. A fused ``c_attn`` adapter with n enabled blocks has A (n r, C) and
B (n C, r); block k is ``A[k r:(k+1) r, :]``, ``B[k C:(k+1) C, :]`` and acts on the rows
``W[g C:(g+1) C, :]`` of the g-th of the q, k, v blocks.

This is the one place in :mod:`lora_ref` that uses :mod:`transformer_ref`; it is imported when
:func:`run_demo` runs, never when :mod:`lora_ref` is imported.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import math
import numbers
import os
import platform
import sys
import time
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .backend import dtype_name, namespace, to_numpy
from .testing import tolerance

__all__ = ["DEFAULT", "QUICK", "DemoConfig", "blas_threads", "compute",
           "report_markdown", "run_demo", "summary_text", "write_report"]

# Table 5/6 row names for the matrix types of transformer_ref.lora_config_for.
_TYPE_NAMES = {"q": "Wq", "k": "Wk", "v": "Wv", "o": "Wo"}
_QKV = ("q", "k", "v")


# ============================================================================================
# Configuration
# ============================================================================================


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class DemoConfig:
    """Everything that decides the demo's numbers (the seed included). Immutable; validated.

    Model: ``n_embd`` (C), ``n_layer``, ``n_head``; the vocabulary and context come from the task
    (``n_symbols + 1`` tokens, ``2 * length`` positions). Task: ``n_symbols`` symbols, strings of
    ``length``, ``n_swaps`` swapped pairs downstream. Training: Adam with ``batch_size``;
    ``pretrain_steps`` at ``pretrain_lr``; each fine-tuning run ``finetune_steps`` at ``full_lr``
    (full) or ``lora_lr`` (LoRA, ``alpha`` fixed for every rank, so ``s = alpha / r`` as in the
    paper). ``ranks``: the (W_q, W_v) rank sweep, every rank at most C. ``budget_rank``: the
    (W_q, W_v) rank whose budget W_q alone (at twice it) and all four attention matrices (at half
    of it) share. ``phi_ranks``: the two ranks whose A matrices Figure 3 compares;
    ``amplification_ranks``: the ranks of Table 7; both taken from ``ranks``. ``eval_examples``:
    held-out strings; ``n_random``: random draws for Table 7's "random" column. ``dtype``:
    float32 or float64.
    """

    n_embd: int = 128
    n_layer: int = 2
    n_head: int = 4
    n_symbols: int = 16
    length: int = 8
    n_swaps: int = 2
    pretrain_steps: int = 600
    finetune_steps: int = 300
    batch_size: int = 32
    pretrain_lr: float = 3e-3
    full_lr: float = 1e-3
    lora_lr: float = 1e-2
    alpha: float = 8.0
    ranks: tuple[int, ...] = (1, 2, 4, 8, 64)
    budget_rank: int = 4
    phi_ranks: tuple[int, int] = (8, 64)
    amplification_ranks: tuple[int, int] = (4, 64)
    eval_examples: int = 512
    n_random: int = 100
    dtype: str = "float32"
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n_embd", "n_layer", "n_head", "n_symbols", "length", "n_swaps", "pretrain_steps",
                     "finetune_steps", "batch_size", "budget_rank", "eval_examples", "n_random"):
            _positive_int(getattr(self, name), name)
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {self.seed!r}")
        for name in ("pretrain_lr", "full_lr", "lora_lr", "alpha"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
            object.__setattr__(self, name, float(value))
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd must be divisible by n_head, got n_embd={self.n_embd}, n_head={self.n_head}")
        if 2 * self.n_swaps > self.n_symbols:
            raise ValueError(f"n_swaps must be at most n_symbols / 2 = {self.n_symbols // 2}, got {self.n_swaps}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")
        ranks = self.ranks
        if isinstance(ranks, (str, bytes)) or not hasattr(ranks, "__iter__"):
            raise TypeError(f"ranks must be a sequence of ints, got {ranks!r}")
        ranks = tuple(ranks)
        for r in ranks:
            _positive_int(r, "each rank in ranks")
        if not ranks or list(ranks) != sorted(set(ranks)):
            raise ValueError(f"ranks must be distinct positive ints in increasing order, got {self.ranks!r}")
        if ranks[-1] > self.n_embd:
            raise ValueError(f"ranks must be at most n_embd={self.n_embd} (A is (r, n_embd)), got {ranks[-1]}")
        object.__setattr__(self, "ranks", tuple(int(r) for r in ranks))
        b = self.budget_rank
        if b not in ranks or b % 2 or 2 * b > self.n_embd:
            raise ValueError(f"budget_rank must be an even rank from ranks {ranks} with 2 * budget_rank <= "
                             f"n_embd={self.n_embd} (W_q alone gets 2 * budget_rank, all four budget_rank / 2), "
                             f"got {b!r}")
        for name in ("phi_ranks", "amplification_ranks"):
            pair = getattr(self, name)
            if isinstance(pair, (str, bytes)) or not hasattr(pair, "__iter__") or len(tuple(pair)) != 2:
                raise TypeError(f"{name} must be two ranks (smaller, larger), got {pair!r}")
            pair = tuple(pair)
            if not all(r in ranks for r in pair) or pair[0] >= pair[1]:
                raise ValueError(f"{name} must be two ranks from ranks {ranks}, smaller first, got {pair!r}")
            object.__setattr__(self, name, tuple(int(r) for r in pair))

    @property
    def analysis_layer(self) -> int:
        """The layer (block) whose updates Figure 3 and Table 7 analyse: ``n_layer // 2`` (the paper:
        layer 48 of GPT-3's 96)."""
        return self.n_layer // 2

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python fields (JSON-ready)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


DEFAULT = DemoConfig()
"""The default run (``lora-ref demo``): C = 128 so that r = 64 is below it; a few minutes on 2 cores."""

QUICK = replace(DEFAULT, n_layer=1, pretrain_steps=300, finetune_steps=100, batch_size=16, eval_examples=256,
                n_random=50)
"""``lora-ref demo --quick``: one layer, fewer and smaller steps; within a minute on 2 cores."""


# ============================================================================================
# The runs
# ============================================================================================


@dataclass(frozen=True)
class _Run:
    key: str                              # results["runs"] key, e.g. "lora-qv-r8"
    label: str                            # e.g. "LoRA Wq,Wv r=8"
    group: str                            # "full", "rank sweep" or "equal budget"
    matrices: tuple[str, ...] | None      # None: full fine-tuning
    r: int | None


def _runs(config: DemoConfig) -> list[_Run]:
    def lora(mats: tuple[str, ...], r: int, group: str) -> _Run:
        return _Run(f"lora-{''.join(mats)}-r{r}", f"LoRA {','.join(_TYPE_NAMES[m] for m in mats)} r={r}",
                    group, mats, r)

    b = config.budget_rank
    runs = [_Run("full", "full fine-tuning", "full", None, None)]
    runs += [lora(("q", "v"), r, "rank sweep") for r in config.ranks]
    runs += [lora(("q",), 2 * b, "equal budget"), lora(("q", "k", "v", "o"), b // 2, "equal budget")]
    return runs


def _seeds(seed: int) -> dict[str, int]:
    """Independent int seeds for each random stream, all derived from ``seed``."""
    names = ("task", "init", "pretrain", "adapters", "finetune", "analysis")
    children = np.random.SeedSequence(seed).spawn(len(names))
    return {n: int(c.generate_state(1, np.uint32)[0]) for n, c in zip(names, children)}


def _run_rng(seed: int, key: str) -> np.random.Generator:
    """A generator of its own for run ``key``, derived from ``seed`` and the run's name."""
    return np.random.default_rng([seed, zlib.crc32(key.encode())])


def _tree_bytes(tree: Any) -> int:
    """Bytes held by every array of a (nested) dict."""
    if isinstance(tree, Mapping):
        return sum(_tree_bytes(v) for v in tree.values())
    return math.prod(tree.shape) * np.dtype(dtype_name(tree.dtype)).itemsize


def _astype(tree: Any, dtype: str) -> Any:
    """A (nested) dict of arrays cast to ``dtype`` (exact when widening float32 to float64)."""
    if isinstance(tree, Mapping):
        return {k: _astype(v, dtype) for k, v in tree.items()}
    xp = namespace(tree)
    return xp.astype(tree, getattr(xp, dtype))


# ============================================================================================
# Merge check: the first-order rounding bound on merged versus unmerged logits
# ============================================================================================


def _merge_check(tr: Any, params: Mapping[str, Any], adapters: Mapping[str, Any], lora_config: Any,
                 gpt: Any, tokens: Any, r: int) -> dict[str, Any]:
    """max |merged - unmerged| logits in the training dtype and in float64 (the same weights
    widened exactly), each against its bound ``2 gamma_n M``; and how far the adapters move the
    logits at all (so the check is not vacuous)."""
    from transformer_ref.bounds import logit_magnitude, logit_rounding_chain
    from transformer_ref.layers import reference_projections

    n = logit_rounding_chain(gpt, r)
    M = logit_magnitude(params, gpt)
    out: dict[str, Any] = {"chain_length": n, "magnitude": M}
    dtype = dtype_name(to_numpy(params["transformer.wte.weight"]).dtype)
    for name in dict.fromkeys((dtype, "float64")):
        p, ad = (params, adapters) if name == dtype else (_astype(params, name), _astype(adapters, name))
        # the reference order W x + s B (A x): the training path may fold s B A into W first
        with reference_projections():
            unmerged = to_numpy(tr.forward(p, tokens, gpt, ad, lora_config)).astype(np.float64)   # (N, T, V)
        merged = to_numpy(tr.forward(tr.merge_adapters(p, ad, lora_config), tokens, gpt)).astype(np.float64)
        base = to_numpy(tr.forward(p, tokens, gpt)).astype(np.float64)
        # Both sides are one forward pass of at most n roundings: |each - exact| <= gamma_n M to
        # first order, so |merged - unmerged| <= 2 gamma_n M.
        out[name] = {"max_abs_error": float(np.max(np.abs(merged - unmerged))),
                     "bound": 2.0 * tolerance(name, n) * M,
                     "adapter_effect": float(np.max(np.abs(unmerged - base)))}
    return out


# ============================================================================================
# Analysis of the learned updates
# ============================================================================================


def _block(adapters: Mapping[str, Any], params: Mapping[str, Any], lora_config: Any, layer: int,
           kind: str, C: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """(W, A, B, s) of matrix type ``kind`` ("q", "k", "v" or "o") in block ``layer``, as NumPy:
    W (C, C) the frozen weight's rows, A (r, C), B (C, r)."""
    if kind == "o":
        name = f"transformer.h.{layer}.attn.c_proj"
        ad = adapters[name]
        return (to_numpy(params[name + ".weight"]), to_numpy(ad["A"]), to_numpy(ad["B"]),
                lora_config.scale_for(name))
    name = f"transformer.h.{layer}.attn.c_attn"
    enable = lora_config.enable_for(name)
    g = _QKV.index(kind)
    if enable is None or not enable[g]:
        raise ValueError(f"{name} has no adapter block for {kind!r} (enable_lora={enable})")
    k = sum(enable[:g])                                   # position of block g among the enabled ones
    r = lora_config.rank_for(name)
    ad = adapters[name]
    W = to_numpy(params[name + ".weight"])[g * C:(g + 1) * C, :]          # (C, C) rows of block g
    A = to_numpy(ad["A"])[k * r:(k + 1) * r, :]                          # (r, C)
    B = to_numpy(ad["B"])[k * C:(k + 1) * C, :]                          # (C, r)
    return W, A, B, lora_config.scale_for(name)


def _spectrum_row(spec: Any) -> dict[str, Any]:
    s = spec.singular_values.astype(np.float64)
    return {"singular_values": [float(v) for v in s], "norm": float(np.linalg.norm(s)),
            "numerical_rank": spec.numerical_rank, "effective_rank": spec.effective_rank,
            "stable_rank": spec.stable_rank, "energy_top1": spec.energy_at(1),
            "energy_top2": spec.energy_at(2), "energy_top4": spec.energy_at(4)}


# ============================================================================================
# BLAS threads
# ============================================================================================
# The demo's matrices are small (at most 512 x 512 by 128 x 128), so a second BLAS thread gains
# nothing on an idle machine, while on a busy one OpenBLAS's threads wait for each other: measured
# on a shared 2-core machine, a LoRA step took 11 to 30 times longer with 2 threads than with 1
# (and the same time, within 8%, when the machine was idle). So the demo runs BLAS on one thread
# unless told otherwise. There is no portable API for this; threadpoolctl is used when installed,
# otherwise OpenBLAS's own setter in the libraries this process has loaded (Linux), best effort.

_OPENBLAS_SETTERS = ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
                     "openblas_set_num_threads64_", "openblas_set_num_threads")


def _openblas_libraries() -> list[Any]:
    import ctypes

    try:
        with open("/proc/self/maps") as maps:
            paths = sorted({line.split()[-1] for line in maps if "openblas" in line.lower() and "/" in line})
    except OSError:
        return []
    libs = []
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in _OPENBLAS_SETTERS:
            setter = getattr(lib, name, None)
            getter = getattr(lib, name.replace("set_num", "get_num"), None)
            if setter is not None and getter is not None:
                libs.append((path, setter, getter))
                break
    return libs


@contextlib.contextmanager
def blas_threads(n: int | None) -> Iterator[str]:
    """Limit the BLAS libraries of this process to ``n`` threads inside the block (None: leave
    them alone); yields a description of what was done. Previous settings are restored."""
    if n is None:
        yield "BLAS threads left as configured"
        return
    _positive_int(n, "n (the number of BLAS threads)")
    try:
        import threadpoolctl
    except ImportError:
        threadpoolctl = None
    if threadpoolctl is not None:
        with threadpoolctl.threadpool_limits(limits=n, user_api="blas"):
            yield f"BLAS limited to {n} thread(s) (threadpoolctl)"
        return
    libs = _openblas_libraries()
    before = [int(getter()) for _, _, getter in libs]
    for _, setter, _ in libs:
        setter(n)
    try:
        yield (f"OpenBLAS limited to {n} thread(s) ({len(libs)} librar{'y' if len(libs) == 1 else 'ies'})"
               if libs else "BLAS threads left as configured (no OpenBLAS found to limit)")
    finally:
        for (_, setter, _), k in zip(libs, before):
            setter(k)


# ============================================================================================
# The experiment
# ============================================================================================


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "lora-ref": __version__}
    for package in ("numpy", "scipy", "autograd", "tqdm", "matplotlib"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = "not installed"
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        out["blas"] = f"{blas.get('name', '?')} {blas.get('version', '')}".strip()
    except Exception:  # noqa: BLE001 - informational only; numpy's config layout is not an API
        out["blas"] = "unknown"
    out["platform"] = f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs"
    threads = {k: os.environ[k] for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
               if k in os.environ}
    if threads:
        out["threads"] = ", ".join(f"{k}={v}" for k, v in threads.items())
    return out


def run_demo(config: DemoConfig = DEFAULT, out_dir: str | os.PathLike[str] = "lora-ref-demo", *,
             progress: bool | None = None, plots: bool | None = None, threads: int | None = 1) -> dict[str, Any]:
    """Run the experiment described in this module's docstring and write its report.

    Parameters
    ----------
    config : DemoConfig
        :data:`DEFAULT`, :data:`QUICK`, or your own (``dataclasses.replace(QUICK, seed=1)``).
    out_dir : path
        Created if needed; receives ``report.md``, ``results.json`` and ``figures/*.png``.
    progress : bool or None
        tqdm progress bars; None shows them only when stderr is a terminal.
    plots : bool or None
        Write the PNG figures; None writes them when matplotlib can be imported. Without
        matplotlib the report says that the figures were skipped and how to get them.
    threads : int or None
        BLAS threads while the demo runs (default 1, see :func:`blas_threads`); None leaves the
        setting alone. Restored afterwards.

    Returns
    -------
    dict
        Every number of the report (``results.json`` holds the same): ``"config"``, ``"model"``,
        ``"task"``, ``"versions"``, ``"pretraining"``, ``"runs"`` (per run: losses, held-out
        evaluation, parameter and optimizer-state counts, merge check), ``"spectra"``, ``"phi"``,
        ``"amplification"``, ``"figures"``, and ``"timing"`` (seconds; the only entry that is
        not a function of ``config``).
    """
    if not isinstance(config, DemoConfig):
        raise TypeError(f"config must be a lora_ref.demo.DemoConfig (e.g. lora_ref.demo.QUICK), got {type(config).__name__}")
    if not isinstance(out_dir, (str, os.PathLike)):
        raise TypeError(f"out_dir must be a path (str or os.PathLike), got {type(out_dir).__name__}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir must be a directory, but {str(out)!r} is an existing file")
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"progress must be True, False or None, got {progress!r}")
    if plots is not None and not isinstance(plots, bool):
        raise TypeError(f"plots must be True, False or None, got {plots!r}")
    if threads is not None:
        _positive_int(threads, "threads")
    out.mkdir(parents=True, exist_ok=True)
    import scipy.linalg  # noqa: F401  (load SciPy's BLAS too, so that it is limited with NumPy's)

    with blas_threads(threads) as how:
        result = compute(config, progress=progress)
    result["versions"]["blas_threads"] = how
    write_report(result, out, plots=plots)
    return result


def compute(config: DemoConfig = DEFAULT, *, progress: bool | None = None) -> dict[str, Any]:
    """The experiment without the writing: the dict :func:`run_demo` returns (``"figures"`` empty)."""
    # transformer_ref is imported here only: lora_ref itself never depends on it.
    import scipy.linalg
    import transformer_ref as tr
    from tqdm.auto import tqdm
    from transformer_ref.data import downstream_task, evaluate, pretraining_task
    from transformer_ref.train import adam_init, train

    from .analysis import Spectrum, amplification_report, similarity_grid, spectrum
    from .backend import asarray

    if not isinstance(config, DemoConfig):
        raise TypeError(f"config must be a lora_ref.demo.DemoConfig, got {type(config).__name__}")
    start = time.perf_counter()
    seeds = _seeds(config.seed)
    pre_task = pretraining_task(config.n_symbols, config.length, seed=seeds["task"])
    down_task = downstream_task(pre_task, config.n_swaps, seed=seeds["task"] + 1)
    gpt = pre_task.gpt_config(n_embd=config.n_embd, n_layer=config.n_layer, n_head=config.n_head)
    C, L = config.n_embd, config.n_layer
    runs = _runs(config)
    show = sys.stderr.isatty() if progress is None else progress
    timing: dict[str, Any] = {"runs": {}}

    result: dict[str, Any] = {
        "config": config.to_dict(),
        "model": {"n_embd": C, "n_layer": L, "n_head": config.n_head, "vocab_size": gpt.vocab_size,
                  "n_positions": gpt.n_positions, "mlp_width": gpt.mlp_width,
                  "parameters": tr.count_parameters(gpt)["base"], "dtype": config.dtype},
        "task": {"n_symbols": pre_task.n_symbols, "length": pre_task.length, "n_swaps": config.n_swaps,
                 "changed": list(down_task.changed), "seq_len": pre_task.seq_len,
                 "pretraining_cipher": list(pre_task.cipher), "downstream_cipher": list(down_task.cipher)},
        "versions": _versions(),
        "seeds": seeds,
    }

    bar = tqdm(total=1 + len(runs), desc="lora-ref demo", unit="run", disable=not show)
    # ---- 1. pretraining ------------------------------------------------------------------
    bar.set_postfix_str("pretraining")
    t0 = time.perf_counter()
    params0 = tr.init_params(gpt, seeds["init"], config.dtype)
    pre = train(params0, gpt, pre_task, mode="full", steps=config.pretrain_steps, batch_size=config.batch_size,
                lr=config.pretrain_lr, seed=seeds["pretrain"], progress=show)
    pretrained = pre.params
    timing["pretraining_s"] = time.perf_counter() - t0
    result["pretraining"] = {
        "losses": [float(v) for v in pre.losses],
        "eval": evaluate(pretrained, gpt, None, None, pre_task, config.eval_examples),
        "downstream_before": evaluate(pretrained, gpt, None, None, down_task, config.eval_examples),
    }
    bar.update(1)

    # ---- 2. fine-tuning runs ---------------------------------------------------------------
    heldout_inputs = asarray(down_task.heldout(config.eval_examples)[0])          # (n, T)
    itemsize = np.dtype(config.dtype).itemsize
    trained: dict[str, Any] = {}
    initial: dict[str, Any] = {}
    result["runs"] = {}
    for run in runs:
        bar.set_postfix_str(run.label)
        t0 = time.perf_counter()
        if run.matrices is None:
            lc = None
            res = train(pretrained, gpt, down_task, mode="full", steps=config.finetune_steps,
                        batch_size=config.batch_size, lr=config.full_lr, seed=seeds["finetune"], progress=show)
            tree = res.params
            formula = tr.count_parameters(gpt)["base"]
            formula_text = "every parameter of the model"
            lr = config.full_lr
        else:
            lc = tr.lora_config_for(run.matrices, run.r, alpha=config.alpha)
            # each run draws its own initial A (independent of the other runs: a shared stream would
            # make A_r=8 the first rows of A_r=64 and inflate their subspace similarity)
            adapters = tr.add_adapters(pretrained, gpt, lc, _run_rng(seeds["adapters"], run.key))
            initial[run.key] = adapters
            # adapters given: the training generator draws only batches, so every run sees the same ones
            res = train(pretrained, gpt, down_task, mode="lora", lora_config=lc, adapters=adapters,
                        steps=config.finetune_steps, batch_size=config.batch_size, lr=config.lora_lr,
                        seed=seeds["finetune"], progress=show)
            tree = res.adapters
            formula = 2 * (L * len(run.matrices)) * C * run.r         # Section 5.1: 2 L_LoRA d_model r
            formula_text = f"2 x L_LoRA x d_model x r = 2 x {L * len(run.matrices)} x {C} x {run.r}"
            lr = config.lora_lr
        timing["runs"][run.key] = time.perf_counter() - t0
        state = adam_init(tree)                                        # what train() allocates for Adam
        n_trained = tr.count_trainable(tree)
        tail = res.losses[-max(1, len(res.losses) // 10):]
        row: dict[str, Any] = {
            "label": run.label, "group": run.group, "matrices": list(run.matrices) if run.matrices else None,
            "r": run.r, "lr": lr, "alpha": config.alpha if lc is not None else None,
            "scale": lc.scale if lc is not None else None,
            "losses": [float(v) for v in res.losses], "final_train_loss": float(np.mean(tail)),
            "eval": evaluate(res.params, gpt, res.adapters, lc, down_task, config.eval_examples),
            "trainable": {"measured": n_trained, "formula": formula, "formula_text": formula_text,
                          "count_parameters": (tr.count_parameters(gpt, lc)["lora"] if lc is not None
                                               else tr.count_parameters(gpt)["base"])},
            "adam_bytes": {"measured": _tree_bytes(state.m) + _tree_bytes(state.v),
                           "formula": 2 * formula * itemsize},
        }
        if lc is not None:
            row["merge"] = _merge_check(tr, pretrained, res.adapters, lc, gpt, heldout_inputs, run.r)
        result["runs"][run.key] = row
        trained[run.key] = (res, lc)
        bar.update(1)
    bar.close()

    # ---- 3. analysis of the learned updates (block `layer`) ---------------------------------
    t0 = time.perf_counter()
    layer = config.analysis_layer
    result["analysis_layer"] = layer
    spectra: dict[str, Any] = {}
    for run in runs:
        res, lc = trained[run.key]
        if run.group == "rank sweep":
            spectra[run.key] = {kind: _spectrum_row(spectrum(*_block(res.adapters, pretrained, lc, layer, kind, C)[1:]))
                                for kind in ("q", "v")}
        elif run.group == "full":
            rows = {}
            for kind in ("q", "v"):
                name = f"transformer.h.{layer}.attn.c_attn.weight"
                g = _QKV.index(kind)
                dW = (to_numpy(res.params[name]) - to_numpy(pretrained[name]))[g * C:(g + 1) * C, :]  # (C, C)
                sv = scipy.linalg.svdvals(dW)
                rows[kind] = _spectrum_row(Spectrum.from_singular_values(sv, dW.shape))
            spectra[run.key] = rows
    result["spectra"] = spectra

    r1, r2 = config.phi_ranks
    phi = {}
    for kind in ("q", "v"):
        per_layer = []
        for i in range(L):
            A1 = _block(trained[f"lora-qv-r{r1}"][0].adapters, pretrained, trained[f"lora-qv-r{r1}"][1], i, kind, C)[1]
            A2 = _block(trained[f"lora-qv-r{r2}"][0].adapters, pretrained, trained[f"lora-qv-r{r2}"][1], i, kind, C)[1]
            grid = similarity_grid(A1, A2)                                     # (r1, r2)
            # the same for the A matrices the two runs started from: what training added
            I1 = _block(initial[f"lora-qv-r{r1}"], pretrained, trained[f"lora-qv-r{r1}"][1], i, kind, C)[1]
            I2 = _block(initial[f"lora-qv-r{r2}"], pretrained, trained[f"lora-qv-r{r2}"][1], i, kind, C)[1]
            init = similarity_grid(I1, I2)                                     # (r1, r2)
            p = min(r1, r2)
            per_layer.append({
                "layer": i, "grid": [[float(v) for v in row] for row in grid],
                "phi_1_1": float(grid[0, 0]), "phi_p_p": float(grid[p - 1, p - 1]),
                "phi_r1_r2": float(grid[r1 - 1, r2 - 1]),
                "init_1_1": float(init[0, 0]), "init_p_p": float(init[p - 1, p - 1]),
                "init_r1_r2": float(init[r1 - 1, r2 - 1]),
                "random_1_1": 1.0 / C, "random_p_p": p / C, "random_r1_r2": max(r1, r2) / C,
            })
        phi[kind] = per_layer
    result["phi"] = phi

    amp: dict[str, Any] = {}
    analysis_rng = np.random.default_rng(seeds["analysis"])
    for r in config.amplification_ranks:
        res, lc = trained[f"lora-qv-r{r}"]
        amp[str(r)] = {}
        for kind in ("q", "v"):
            W, A, B, s = _block(res.adapters, pretrained, lc, layer, kind, C)
            rep = amplification_report(W, A, B, s, rng=analysis_rng, n_random=config.n_random)
            d = rep.to_dict()
            d.pop("proj_random")
            amp[str(r)][kind] = d
    result["amplification"] = amp
    timing["analysis_s"] = time.perf_counter() - t0
    timing["total_s"] = time.perf_counter() - start
    result["timing"] = timing
    result["figures"] = []
    return result


# ============================================================================================
# Writing: report.md, results.json, figures/
# ============================================================================================


def _fmt(value: float, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}g}"


def _int(n: int) -> str:
    return f"{n:,}"


def _bytes(n: int) -> str:
    for unit, size in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _has_matplotlib() -> str | None:
    """None if matplotlib can be imported, else why not."""
    try:
        import matplotlib.figure  # noqa: F401
    except ImportError as exc:
        return str(exc) or "matplotlib is not installed"
    return None


def write_report(result: dict[str, Any], out_dir: str | os.PathLike[str], *, plots: bool | None = None) -> Path:
    """Write ``report.md``, ``results.json`` and (matplotlib permitting) ``figures/*.png`` for a
    :func:`compute` result into ``out_dir``; returns the report's path. Sets ``result["figures"]``
    to the figures written and, when they are skipped, ``result["figures_skipped"]`` to why."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result["figures"] = []
    result.pop("figures_skipped", None)
    if plots is False:
        result["figures_skipped"] = "plots=False was given"
    else:
        missing = _has_matplotlib()
        if missing is not None:
            if plots:
                raise ImportError(f"plots=True but matplotlib cannot be imported ({missing}): pip install 'lora-ref[plots]'")
            result["figures_skipped"] = f"matplotlib could not be imported ({missing})"
        else:
            result["figures"] = _write_figures(result, out / "figures")
    result["timing"]["report_s"] = time.perf_counter() - t0
    (out / "results.json").write_text(json.dumps(_json_ready(result), indent=1) + "\n")
    path = out / "report.md"
    path.write_text(report_markdown(result))
    return path


def _json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    if isinstance(value, np.generic):
        return _json_ready(value.item())
    return value


def _sweep_keys(result: dict[str, Any]) -> list[str]:
    return [k for k, row in result["runs"].items() if row["group"] == "rank sweep"]


def _lora_keys(result: dict[str, Any]) -> list[str]:
    return [k for k, row in result["runs"].items() if row["group"] != "full"]


def _findings(result: dict[str, Any]) -> list[str]:
    """Plain statements computed from the numbers (no hand-typed claims)."""
    runs = result["runs"]
    full = runs["full"]["eval"]
    lines = []
    before = result["pretraining"]["downstream_before"]
    lines.append(f"Before fine-tuning, the pretrained model scores {_fmt(before['accuracy'])} accuracy on the "
                 f"downstream task and {_fmt(before['changed_accuracy'])} on the swapped symbols (it applies the "
                 f"old cipher); full fine-tuning reaches {_fmt(full['accuracy'])} and {_fmt(full['changed_accuracy'])}.")
    matched = [runs[k]["label"] for k in _lora_keys(result) if runs[k]["eval"]["accuracy"] >= full["accuracy"]]
    short = [runs[k]["label"] for k in _lora_keys(result) if runs[k]["eval"]["accuracy"] < full["accuracy"]]
    if matched:
        lines.append(f"Held-out accuracy at least that of full fine-tuning: {', '.join(matched)}.")
    if short:
        lines.append("Held-out accuracy below full fine-tuning: " + ", ".join(
            f"{runs[k]['label']} ({_fmt(runs[k]['eval']['accuracy'])}, swapped symbols "
            f"{_fmt(runs[k]['eval']['changed_accuracy'])})" for k in _lora_keys(result)
            if runs[k]["eval"]["accuracy"] < full["accuracy"]) + ".")
    sweep = _sweep_keys(result)
    lo, hi = runs[sweep[0]], runs[sweep[-1]]
    lines.append(f"Smallest versus largest rank of the sweep: {lo['label']} held-out loss {_fmt(lo['eval']['loss'])}, "
                 f"{hi['label']} {_fmt(hi['eval']['loss'])}; full fine-tuning {_fmt(full['loss'])}.")
    worst = max((runs[k]["merge"][d]["max_abs_error"] / runs[k]["merge"][d]["bound"], k, d)
                for k in _lora_keys(result) for d in runs[k]["merge"] if isinstance(runs[k]["merge"][d], dict))
    lines.append(f"Merging: the largest merged-versus-unmerged logit error is {_fmt(worst[0], 2)} of its bound "
                 f"({runs[worst[1]]['label']}, {worst[2]}).")
    return lines


def report_markdown(result: dict[str, Any]) -> str:
    """The report as Markdown (figures linked as ``figures/NAME.png``)."""
    cfg, model, task, runs = result["config"], result["model"], result["task"], result["runs"]
    timing, layer = result["timing"], result["analysis_layer"]
    figs = set(result.get("figures", []))
    r1, r2 = cfg["phi_ranks"]
    lines: list[str] = []
    add = lines.append

    def figure(name: str, caption: str) -> None:
        if name in figs:
            add(f"![{caption}](figures/{name})")
            add("")

    add("# lora-ref demo: LoRA on a small GPT, the paper's Tables 5-7 and Figure 3 in miniature")
    add("")
    add("Generated by `lora-ref demo`; every number below is computed by the run (`results.json` holds them all).")
    add("")
    add("## Configuration")
    add("")
    add("| | |")
    add("|---|---|")
    add(f"| model | GPT-2 architecture (transformer_ref): n_embd={model['n_embd']}, n_layer={model['n_layer']}, "
        f"n_head={model['n_head']}, MLP width {model['mlp_width']}, vocab {model['vocab_size']}, "
        f"context {model['n_positions']}; {_int(model['parameters'])} parameters, {model['dtype']} |")
    add(f"| pretraining task | substitution cipher over {task['n_symbols']} symbols, strings of {task['length']}, "
        f"only the enciphered half scored |")
    add(f"| downstream task | the same cipher with {task['n_swaps']} pairs of outputs swapped: symbols "
        f"{', '.join(map(str, task['changed']))} are re-routed |")
    add(f"| pretraining | {cfg['pretrain_steps']} steps of Adam, lr {cfg['pretrain_lr']:g}, batch {cfg['batch_size']} |")
    add(f"| fine-tuning | {cfg['finetune_steps']} steps of Adam per run, batch {cfg['batch_size']}, identical batches "
        f"for every run; full: lr {cfg['full_lr']:g}; LoRA: lr {cfg['lora_lr']:g}, alpha {cfg['alpha']:g} for every "
        f"rank (scale alpha / r), A kaiming-uniform, B = 0, no dropout |")
    add(f"| evaluation | {cfg['eval_examples']} held-out strings (never trained on) |")
    add(f"| seed | {cfg['seed']} (every random draw derives from it) |")
    add(f"| analysed layer | {layer} of 0..{model['n_layer'] - 1} (`n_layer // 2`, as the paper's layer 48 of 96) |")
    add(f"| wall time | {timing['total_s']:.1f} s for training and analysis (pretraining {timing['pretraining_s']:.1f} s) |")
    add(f"| software | {', '.join(f'{k} {v}' for k, v in result['versions'].items())} |")
    add("")
    if "figures_skipped" in result:
        add(f"**Figures skipped:** {result['figures_skipped']}. Install matplotlib (`pip install 'lora-ref[plots]'`) "
            "and run the demo again to get them; the tables below are complete without them.")
        add("")

    add("## Findings")
    add("")
    for line in _findings(result):
        add(f"- {line}")
    add("")

    add("## Training")
    add("")
    pre = result["pretraining"]
    add(f"Pretraining ends at training loss {_fmt(float(np.mean(pre['losses'][-max(1, len(pre['losses']) // 10):])))} "
        f"(mean of the last 10% of steps); held-out loss {_fmt(pre['eval']['loss'])}, accuracy "
        f"{_fmt(pre['eval']['accuracy'])} on the pretraining task.")
    add("")
    figure("loss_curves.png", "training loss per step")

    add("## Final loss and accuracy versus rank and target set (Tables 5 and 6 in miniature)")
    add("")
    add("Held-out downstream task. *accuracy*: answer tokens right; *swapped*: accuracy on the re-routed "
        "symbols only; *strings*: strings enciphered entirely right; *train loss*: mean of the last 10% of steps.")
    add("")
    add("| run | trainable | held-out loss | accuracy | swapped | strings | train loss | time (s) |")
    add("|---|---:|---:|---:|---:|---:|---:|---:|")
    before = pre["downstream_before"]
    add(f"| pretrained, not fine-tuned | 0 | {_fmt(before['loss'])} | {_fmt(before['accuracy'])} | "
        f"{_fmt(before['changed_accuracy'])} | {_fmt(before['sequence_accuracy'])} | | |")
    for key, row in runs.items():
        e = row["eval"]
        add(f"| {row['label']} | {_int(row['trainable']['measured'])} | {_fmt(e['loss'])} | {_fmt(e['accuracy'])} | "
            f"{_fmt(e['changed_accuracy'])} | {_fmt(e['sequence_accuracy'])} | {_fmt(row['final_train_loss'])} | "
            f"{timing['runs'][key]:.1f} |")
    add("")
    budget = [k for k, row in runs.items() if row["group"] == "equal budget"]
    qv_budget = f"lora-qv-r{cfg['budget_rank']}"
    add(f"Equal parameter budget (Table 5): {', '.join(runs[k]['label'] for k in [budget[0], qv_budget, budget[1]])} "
        f"each train {', '.join(_int(runs[k]['trainable']['measured']) for k in [budget[0], qv_budget, budget[1]])} "
        f"parameters.")
    add("")
    figure("rank_sweep.png", "held-out loss and accuracy versus rank")

    add("## Trainable parameters and optimizer state, LoRA versus full fine-tuning")
    add("")
    add("*measured*: entries of the arrays the run actually trained (`count_trainable` of the trained dict), and "
        "bytes of Adam's two moment arrays as `transformer_ref.train.adam_init` allocates them for that dict (the "
        "call `train` makes). *formula*: Section 5.1's `2 x L_LoRA x d_model x r` for LoRA (L_LoRA adapted "
        "matrices), the model's parameter count for full fine-tuning; Adam keeps 2 numbers per trained parameter.")
    add("")
    add("| run | trainable (measured) | trainable (formula) | formula | share of full | Adam bytes (measured) | Adam bytes (formula) |")
    add("|---|---:|---:|---|---:|---:|---:|")
    n_full = runs["full"]["trainable"]["measured"]
    for row in runs.values():
        t, a = row["trainable"], row["adam_bytes"]
        add(f"| {row['label']} | {_int(t['measured'])} | {_int(t['formula'])} | {t['formula_text']} | "
            f"{t['measured'] / n_full:.3%} | {_int(a['measured'])} ({_bytes(a['measured'])}) | {_int(a['formula'])} |")
    add("")
    figure("parameters.png", "trainable parameters and Adam state bytes")

    add("## Merge check: merged versus unmerged logits")
    add("")
    add("Logits of the held-out inputs computed with the adapters (`forward(params, x, adapters)`) and with the "
        "adapters merged into the weights (`forward(merge_adapters(params, adapters), x)`), in the training "
        "dtype and again in float64 (the same weights, widened exactly). *bound*: `2 gamma_n M`, "
        "`gamma_n = lora_ref.testing.tolerance(dtype, n)`, n the roundings along the longest input-to-logit path "
        "(`transformer_ref.bounds.logit_rounding_chain`: every LayerNorm, projection, attention, GELU and residual add "
        "counted), M a bound on every logit's terms (`transformer_ref.bounds.logit_magnitude`). It is a first-order bound: each side "
        "is within `gamma_n M` of the exact logits if rounding errors are not amplified along the path "
        "(LayerNorm and softmax are well conditioned here). *adapter effect*: max |logits with adapters - "
        "logits without|, to show the check is not vacuous.")
    add("")
    add("| run | n | M | dtype | max abs error | bound | error / bound | adapter effect |")
    add("|---|---:|---:|---|---:|---:|---:|---:|")
    for key in _lora_keys(result):
        m = runs[key]["merge"]
        for d in (k for k in m if isinstance(m[k], dict)):
            add(f"| {runs[key]['label']} | {_int(m['chain_length'])} | {_fmt(m['magnitude'])} | {d} | "
                f"{m[d]['max_abs_error']:.3e} | {m[d]['bound']:.3e} | {m[d]['max_abs_error'] / m[d]['bound']:.2g} | "
                f"{_fmt(m[d]['adapter_effect'])} |")
    add("")

    add(f"## Singular values of the learned updates (layer {layer})")
    add("")
    add("For each (Wq, Wv) run, the update `dW = s B A` of the q and v blocks (`lora_ref.analysis.spectrum`, "
        "never forming dW); for full fine-tuning, the dense difference `W_finetuned - W_pretrained` of the same "
        "rows. *energy top k*: share of `|dW|_F^2` in the top k singular values; *effective rank*: Roy and "
        "Vetterli's exp(entropy); *numerical rank*: singular values above `max(d_out, d_in) eps sigma_1`.")
    add("")
    add("| run | matrix | \\|dW\\|_F | sigma_1 | numerical rank | effective rank | stable rank | energy top 1 | top 2 | top 4 |")
    add("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for key, rows in result["spectra"].items():
        for kind, s in rows.items():
            add(f"| {runs[key]['label']} | W{kind} | {_fmt(s['norm'])} | {_fmt(s['singular_values'][0])} | "
                f"{s['numerical_rank']} | {_fmt(s['effective_rank'], 3)} | {_fmt(s['stable_rank'], 3)} | "
                f"{_fmt(s['energy_top1'], 3)} | {_fmt(s['energy_top2'], 3)} | {_fmt(s['energy_top4'], 3)} |")
    add("")
    figure("spectra.png", "singular values of the learned updates")

    add(f"## Subspace similarity phi(A_r={r1}, A_r={r2}) (Figure 3 in miniature)")
    add("")
    add(f"Eq. 4: `phi(A1, A2, i, j) = |U1_i^T U2_j|_F^2 / min(i, j)`, U the top right singular vectors of A "
        f"(`lora_ref.analysis.similarity_grid`), between the A matrices of the (Wq, Wv) runs at r={r1} and "
        f"r={r2}. 1 means the smaller subspace lies inside the larger; random subspaces give "
        f"`max(i, j) / d_in` on average (d_in = {model['n_embd']}). *trained*: the A matrices after "
        f"fine-tuning; *init*: the same pair before it (each run draws its own A), so the difference is "
        f"what training did.")
    add("")
    q = min(r1, r2)
    add(f"| matrix | layer | phi(1,1) trained | init | random | phi({q},{q}) trained | init | random | "
        f"phi({r1},{r2}) trained | init | random |")
    add("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for kind, per_layer in result["phi"].items():
        for p in per_layer:
            add(f"| W{kind} | {p['layer']} | " + " | ".join(
                _fmt(p[f"{what}_{ij}"], 3) for ij in ("1_1", "p_p", "r1_r2") for what in ("phi", "init", "random"))
                + " |")
    add("")
    figure("phi.png", "subspace similarity heatmaps")

    add(f"## Amplification factor (Table 7 in miniature, layer {layer})")
    add("")
    add("`|U^T W V|_F` for the frozen pretrained W (the q or v rows of `c_attn`) projected onto k-dimensional "
        "subspaces (`lora_ref.analysis.amplification_report`): the top-k singular directions of dW, of W "
        "itself, and uniformly random ones (measured: root mean square over the draws; expected: the exact "
        "`(k / sqrt(d_out d_in)) |W|_F`). *factor*: `|dW|_F / |U^T W V|_F` with dW's directions: how much "
        "the update amplifies directions that W already has but does not emphasise.")
    add("")
    add("| r | matrix | k | \\|W\\|_F | \\|dW\\|_F | dW's directions | W's top directions | random (measured) | random (expected) | factor |")
    add("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r, rows in result["amplification"].items():
        for kind, a in rows.items():
            add(f"| {r} | W{kind} | {a['k']} | {_fmt(a['weight_norm'])} | {_fmt(a['delta_norm'])} | "
                f"{_fmt(a['proj_delta'])} | {_fmt(a['proj_weight'])} | {_fmt(a['proj_random_rms'])} | "
                f"{_fmt(a['proj_random_expected'])} | {_fmt(a['factor'], 3)} |")
    add("")
    add("## Reproduce")
    add("")
    add("```text")
    add(_command_line(cfg))
    add("```")
    add("")
    return "\n".join(lines)


def _command_line(cfg: dict[str, Any]) -> str:
    """The command that reproduces a run of this configuration."""
    config = DemoConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()})
    for preset, flag in ((DEFAULT, ""), (QUICK, " --quick")):
        if replace(config, seed=preset.seed) == preset:
            return f"lora-ref demo{flag} --seed {config.seed}"
    changed = {f.name: getattr(config, f.name) for f in fields(DemoConfig)
               if getattr(config, f.name) != getattr(DEFAULT, f.name)}
    args = ", ".join(f"{k}={v!r}" for k, v in changed.items())
    return f'python -c "from lora_ref.demo import DemoConfig, run_demo; run_demo(DemoConfig({args}))"'


# ============================================================================================
# Figures
# ============================================================================================


def _write_figures(result: dict[str, Any], fig_dir: Path) -> list[str]:
    import matplotlib.figure

    from .analysis import plot_similarity

    fig_dir.mkdir(parents=True, exist_ok=True)
    runs, written = result["runs"], []

    def save(fig: Any, name: str) -> None:
        fig.savefig(fig_dir / name, format="png", dpi=100)
        written.append(name)

    # loss curves
    fig = matplotlib.figure.Figure(figsize=(11, 4), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    pre = result["pretraining"]["losses"]
    ax1.plot(np.arange(len(pre)), pre, lw=0.8)
    ax1.set(yscale="log", xlabel="step", ylabel="training loss", title="pretraining (full, from scratch)")
    for key, row in runs.items():
        style = {"full": "k-", "rank sweep": "-", "equal budget": "--"}[row["group"]]
        ax2.plot(np.arange(len(row["losses"])), row["losses"], style, lw=0.8, label=row["label"])
    ax2.set(yscale="log", xlabel="step", ylabel="training loss", title="fine-tuning on the downstream task")
    ax2.legend(fontsize=7)
    save(fig, "loss_curves.png")

    # loss / accuracy versus rank
    sweep = _sweep_keys(result)
    ranks = [runs[k]["r"] for k in sweep]
    fig = matplotlib.figure.Figure(figsize=(11, 4), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, metric, title, log in ((axes[0], "loss", "held-out loss", True),
                                   (axes[1], "changed_accuracy", "held-out accuracy on swapped symbols", False)):
        ax.plot(ranks, [runs[k]["eval"][metric] for k in sweep], "o-", label="LoRA Wq,Wv")
        ax.axhline(runs["full"]["eval"][metric], color="k", ls="--", label="full fine-tuning")
        for key, row in runs.items():
            if row["group"] == "equal budget":
                ax.plot([row["r"]], [row["eval"][metric]], "s", label=row["label"])
        ax.axhline(result["pretraining"]["downstream_before"][metric], color="grey", ls=":", label="before fine-tuning")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str(r) for r in ranks])
        if log:
            ax.set_yscale("log")
        ax.set(xlabel="rank r", title=title)
        ax.legend(fontsize=7)
    save(fig, "rank_sweep.png")

    # parameters and optimizer state
    fig = matplotlib.figure.Figure(figsize=(11, 4), layout="constrained")
    axes = fig.subplots(1, 2)
    labels = [row["label"] for row in runs.values()]
    y = np.arange(len(labels))
    for ax, field_, title in ((axes[0], "trainable", "trainable parameters"), (axes[1], "adam_bytes", "Adam state bytes")):
        ax.barh(y, [row[field_]["measured"] for row in runs.values()], color="tab:blue")
        ax.set_yticks(y, labels, fontsize=7)
        ax.invert_yaxis()
        ax.set(xscale="log", title=f"{title} (measured)")
    save(fig, "parameters.png")

    # spectra
    layer = result["analysis_layer"]
    fig = matplotlib.figure.Figure(figsize=(11, 4), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, kind in zip(axes, ("q", "v")):
        for key, rows in result["spectra"].items():
            s = np.asarray(rows[kind]["singular_values"])
            s = s[s > 0]
            ax.plot(np.arange(1, s.size + 1), s, "k--" if key == "full" else "o-", ms=2, lw=0.8,
                    label=runs[key]["label"] + (" (dense dW)" if key == "full" else ""))
        ax.set(xscale="log", yscale="log", xlabel="index i", ylabel="singular value",
               title=f"dW of W{kind}, layer {layer}")
        ax.legend(fontsize=7)
    save(fig, "spectra.png")

    # phi heatmaps
    r1, r2 = result["config"]["phi_ranks"]
    fig = matplotlib.figure.Figure(figsize=(11, 6), layout="constrained")
    axes = fig.subplots(2, 2, gridspec_kw={"width_ratios": [3, 1]})
    for row_axes, kind in zip(axes, ("q", "v")):
        grid = np.asarray(result["phi"][kind][layer]["grid"], dtype=np.float64)       # (r1, r2)
        plot_similarity(grid, ax=row_axes[0], title=f"W{kind}: phi(A_r={r1}, A_r={r2}, i, j)",
                        xlabel=f"j (r={r2})", ylabel=f"i (r={r1})")
        p = min(r1, r2)
        plot_similarity(grid[:p, :p], ax=row_axes[1], title=f"W{kind}: j <= {p}", xlabel="j", ylabel="i")
    save(fig, "phi.png")
    return written


# ============================================================================================
# The terminal summary
# ============================================================================================


def summary_text(result: dict[str, Any], out_dir: str | os.PathLike[str] | None = None,
                 wall_s: float | None = None) -> str:
    """One screen: the rank table, the phi and amplification numbers, the merge check, wall time."""
    cfg, model, runs = result["config"], result["model"], result["runs"]
    layer = result["analysis_layer"]
    lines = [f"lora-ref demo: GPT n_embd={model['n_embd']} n_layer={model['n_layer']} n_head={model['n_head']} "
             f"({_int(model['parameters'])} params, {model['dtype']}), seed {cfg['seed']}, "
             f"{cfg['pretrain_steps']} pretraining + {cfg['finetune_steps']} fine-tuning steps per run"]
    before = result["pretraining"]["downstream_before"]
    lines.append(f"{'run':<26}{'trainable':>10}{'loss':>10}{'acc':>8}{'swapped':>9}{'strings':>9}")
    lines.append(f"{'pretrained (no tuning)':<26}{0:>10}{_fmt(before['loss']):>10}{before['accuracy']:>8.4f}"
                 f"{before['changed_accuracy']:>9.4f}{before['sequence_accuracy']:>9.4f}")
    for row in runs.values():
        e = row["eval"]
        lines.append(f"{row['label']:<26}{row['trainable']['measured']:>10,}{_fmt(e['loss']):>10}{e['accuracy']:>8.4f}"
                     f"{e['changed_accuracy']:>9.4f}{e['sequence_accuracy']:>9.4f}")
    r1, r2 = cfg["phi_ranks"]
    p = min(r1, r2)
    for kind in ("q", "v"):
        ph = result["phi"][kind][layer]
        lines.append(f"phi(A_r={r1}, A_r={r2}) W{kind} layer {layer} [trained / init / random]: "
                     f"phi(1,1) {ph['phi_1_1']:.3f} / {ph['init_1_1']:.3f} / {ph['random_1_1']:.3f}, "
                     f"phi({p},{p}) {ph['phi_p_p']:.3f} / {ph['init_p_p']:.3f} / {ph['random_p_p']:.3f}, "
                     f"phi({r1},{r2}) {ph['phi_r1_r2']:.3f} / {ph['init_r1_r2']:.3f} / {ph['random_r1_r2']:.3f}")
    for r, rows in result["amplification"].items():
        for kind, a in rows.items():
            lines.append(f"amplification r={r} W{kind}: |dW|={_fmt(a['delta_norm'], 3)} |U^T W V|: dW dirs "
                         f"{_fmt(a['proj_delta'], 3)}, W top {_fmt(a['proj_weight'], 3)}, random "
                         f"{_fmt(a['proj_random_rms'], 3)} (expected {_fmt(a['proj_random_expected'], 3)}); "
                         f"factor {_fmt(a['factor'], 3)}")
    ratios = [(runs[k]["merge"][d]["max_abs_error"], runs[k]["merge"][d]["bound"], d)
              for k in _lora_keys(result) for d in runs[k]["merge"] if isinstance(runs[k]["merge"][d], dict)]
    for d in dict.fromkeys(x[2] for x in ratios):
        err = max(x[0] for x in ratios if x[2] == d)
        bound = min(x[1] for x in ratios if x[2] == d)
        lines.append(f"merge check ({d}): max |merged - unmerged| logits {err:.2e}, smallest bound {bound:.2e} "
                     f"over {sum(1 for x in ratios if x[2] == d)} LoRA runs")
    wall = result["timing"]["total_s"] if wall_s is None else wall_s
    tail = f"wall time {wall:.1f} s"
    if out_dir is not None:
        tail += f"; report: {Path(out_dir) / 'report.md'}"
    if result.get("figures_skipped"):
        tail += f" (figures skipped: {result['figures_skipped']}; pip install 'lora-ref[plots]')"
    lines.append(tail)
    return "\n".join(lines)

