"""The ``lora-ref demo`` experiment: the LoRA paper's Tables 5, 6, 7 and Figure 3, in miniature.

One call of :func:`compute` does, deterministically for a seed:

1. pretrain a small GPT-2-architecture model (:mod:`transformer_ref`), or with ``family="llama"`` a
   LLaMA-architecture one (RMSNorm, RoPE, SwiGLU), from scratch on the pretraining cipher task
   (:func:`transformer_ref.data.pretraining_task`);
2. fine-tune it on the downstream task (the same cipher with a few pairs of symbols swapped,
   :func:`transformer_ref.data.downstream_task`) with full fine-tuning, and with LoRA on
   (W_q, W_v) at every rank of ``config.ranks`` (Table 6's rank sweep), plus W_q alone and all
   four attention projections at the parameter budget of (W_q, W_v) at ``budget_rank``
   (Table 5: W_q at 2b, (W_q, W_v) at b, (W_q, W_k, W_v, W_o) at b / 2). On GPT-2, q, k and v
   are row blocks of the fused ``attn.c_attn`` adapted through ``LoraConfig.enable_lora``
   (loralib's MergedLinear) and o is ``attn.c_proj``; on LLaMA they are ``self_attn.{q,k,v,o}_proj``
   (PEFT's target_modules; multi-head, so that every type is (C, C) and Table 5's budgets stay
   equal). Every fine-tuning run starts from the same pretrained weights and sees the same batches;
3. measure: held-out loss and accuracy of each run; trainable parameters and Adam's state bytes,
   counted on the arrays and by formula; merged versus unmerged logits; the singular values of
   the learned updates; the subspace similarity phi(A_{r=8}, A_{r=64}) (Figure 3); the
   amplification factor (Table 7).

:mod:`transformer_ref.demo.run` writes the result (``report.md``, ``results.json``, figures).

Shapes follow :mod:`lora_ref`: W (d_out, d_in), A (r, d_in), B (d_out, r), dW = s B A with
s = alpha / r. C = n_embd. A fused ``c_attn`` adapter with n enabled blocks has A (n r, C) and
B (n C, r); block k is ``A[k r:(k+1) r, :]``, ``B[k C:(k+1) C, :]`` and acts on the rows
``W[g C:(g+1) C, :]`` of the g-th of the q, k, v blocks.
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import platform
import sys
import time
import zlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import scipy.linalg
from tqdm.auto import tqdm

from lora_ref import __version__
from lora_ref.analysis import Spectrum, amplification_report, similarity_grid, spectrum
from lora_ref.backend import asarray, dtype_name, namespace, to_numpy
from lora_ref.checks import non_negative_int, positive_int, positive_real
from lora_ref.testing import tolerance

from .. import REFERENCE, add_adapters, forward, init_params, merge_adapters
from ..bounds import logit_magnitude, logit_rounding_chain
from ..count import count_parameters, count_trainable, lora_config_for, matrix_module
from ..data import downstream_task, evaluate, pretraining_task
from ..train import adam_init, train

__all__ = ["DEFAULT", "FAMILIES", "PRESETS", "QUICK", "DemoConfig", "Setup", "compute", "cpu_name", "make_setup", "pretrain",
           "run_rng", "versions"]

# Table 5/6 row names for the matrix types of transformer_ref.lora_config_for.
_TYPE_NAMES = {"q": "Wq", "k": "Wk", "v": "Wv", "o": "Wo"}
FAMILIES = ("gpt2", "llama")
"""The model families the demo runs (``lora-ref demo --model``)."""


# ============================================================================================
# Configuration
# ============================================================================================


@dataclass(frozen=True)
class DemoConfig:
    """Everything that decides the demo's numbers (the seed included). Immutable; validated.

    Model: ``family`` ("gpt2" or "llama"), ``n_embd`` (C), ``n_layer``, ``n_head``; a LLaMA has as
    many key/value heads (multi-head attention), MLP width :attr:`llama_mlp_width`, an untied
    output head, rms_norm_eps 1e-5 and rope_theta 10000; the vocabulary and context come from the task
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
    family: str = "gpt2"

    def __post_init__(self) -> None:
        for name in ("n_embd", "n_layer", "n_head", "n_symbols", "length", "n_swaps", "pretrain_steps",
                     "finetune_steps", "batch_size", "budget_rank", "eval_examples", "n_random"):
            object.__setattr__(self, name, positive_int(getattr(self, name), name))
        object.__setattr__(self, "seed", non_negative_int(self.seed, "seed"))
        for name in ("pretrain_lr", "full_lr", "lora_lr", "alpha"):
            object.__setattr__(self, name, positive_real(getattr(self, name), name))
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd must be divisible by n_head, got n_embd={self.n_embd}, n_head={self.n_head}")
        if 2 * self.n_swaps > self.n_symbols:
            raise ValueError(f"n_swaps must be at most n_symbols / 2 = {self.n_symbols // 2}, got {self.n_swaps}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {', '.join(map(repr, FAMILIES))}, got {self.family!r}")
        if self.family == "llama" and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"n_embd / n_head must be even for a LLaMA (RoPE rotates pairs), got {self.n_embd // self.n_head}")
        object.__setattr__(self, "ranks", self._checked_ranks())
        b = self.budget_rank
        if b not in self.ranks or b % 2 or 2 * b > self.n_embd:
            raise ValueError(f"budget_rank must be an even rank from ranks {self.ranks} with 2 * budget_rank <= "
                             f"n_embd={self.n_embd} (W_q alone gets 2 * budget_rank, all four budget_rank / 2), "
                             f"got {b!r}")
        for name in ("phi_ranks", "amplification_ranks"):
            object.__setattr__(self, name, self._checked_pair(name))

    def _checked_ranks(self) -> tuple[int, ...]:
        ranks = self.ranks
        if isinstance(ranks, (str, bytes)) or not hasattr(ranks, "__iter__"):
            raise TypeError(f"ranks must be a sequence of ints, got {ranks!r}")
        ranks = tuple(positive_int(r, "each rank in ranks") for r in ranks)
        if not ranks or list(ranks) != sorted(set(ranks)):
            raise ValueError(f"ranks must be distinct positive ints in increasing order, got {self.ranks!r}")
        if ranks[-1] > self.n_embd:
            raise ValueError(f"ranks must be at most n_embd={self.n_embd} (A is (r, n_embd)), got {ranks[-1]}")
        return ranks

    def _checked_pair(self, name: str) -> tuple[int, int]:
        pair = getattr(self, name)
        if isinstance(pair, (str, bytes)) or not hasattr(pair, "__iter__") or len(tuple(pair)) != 2:
            raise TypeError(f"{name} must be two ranks (smaller, larger), got {pair!r}")
        pair = tuple(pair)
        if not all(r in self.ranks for r in pair) or pair[0] >= pair[1]:
            raise ValueError(f"{name} must be two ranks from ranks {self.ranks}, smaller first, got {pair!r}")
        return (int(pair[0]), int(pair[1]))

    @property
    def llama_mlp_width(self) -> int:
        """A LLaMA's intermediate_size: 8C/3 rounded up to a multiple of 32 (LLaMA's SwiGLU keeps the
        parameters and work of a 4C GELU MLP with three matrices of 8C/3; 352 for C = 128)."""
        return 32 * math.ceil(8 * self.n_embd / 3 / 32)

    @property
    def analysis_layer(self) -> int:
        """The layer (block) whose updates Figure 3 and Table 7 analyse: ``n_layer // 2`` (the paper:
        layer 48 of GPT-3's 96)."""
        return self.n_layer // 2

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python fields (JSON-ready)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


DEFAULT = DemoConfig()
"""The default run (``lora-ref demo``): C = 128 so that r = 64 is below it; 90-180 s on 2 CPU cores."""

QUICK = replace(DEFAULT, n_layer=1, pretrain_steps=300, finetune_steps=100, batch_size=16, eval_examples=256,
                n_random=50)
"""``lora-ref demo --quick``: one layer, fewer and smaller steps; 10-60 s on 2 CPU cores."""

PRESETS: dict[str, DemoConfig] = {"default": DEFAULT, "quick": QUICK}
"""The presets by name: ``"quick"`` is ``lora-ref demo --quick``, ``"default"`` plain ``lora-ref demo``."""


# ============================================================================================
# The runs, their random streams, their sizes
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


def run_rng(seed: int, key: str) -> np.random.Generator:
    """A generator of its own for run ``key`` (a name, e.g. ``"lora-qv-r8"``), derived from the
    non-negative int ``seed`` and the name: the same pair always gives the same stream, and two
    names give independent ones (``lora-ref combine`` draws its adapters this way too)."""
    seed = non_negative_int(seed, "seed")
    if not isinstance(key, str):
        raise TypeError(f"key must be a str (the run's name), got {type(key).__name__}")
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


@dataclass(frozen=True)
class Setup:
    """What every step of the experiment shares: the configuration, the seeds, the tasks, the model."""

    config: DemoConfig
    seeds: dict[str, int]
    pretraining: Any                      # transformer_ref.data.CipherTask
    downstream: Any                       # the same cipher, n_swaps pairs swapped
    gpt: Any                              # the model's config (GPTConfig or LlamaConfig) sized for the task
    show: bool                            # progress bars on?


def make_setup(config: DemoConfig, progress: bool | None = None) -> Setup:
    """What every step of an experiment of ``config`` shares (:class:`Setup`): the seeds of each
    random stream, the pretraining and downstream tasks, and the model's config sized for them.
    ``progress``: tqdm progress bars; None shows them only when stderr is a terminal."""
    if not isinstance(config, DemoConfig):
        raise TypeError(f"config must be a transformer_ref.demo.DemoConfig, got {type(config).__name__}")
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"progress must be True, False or None, got {progress!r}")
    seeds = _seeds(config.seed)
    pre_task = pretraining_task(config.n_symbols, config.length, seed=seeds["task"])
    down_task = downstream_task(pre_task, config.n_swaps, seed=seeds["task"] + 1)
    if config.family == "gpt2":
        gpt = pre_task.gpt_config(n_embd=config.n_embd, n_layer=config.n_layer, n_head=config.n_head)
    else:
        gpt = pre_task.llama_config(hidden_size=config.n_embd, num_hidden_layers=config.n_layer,
                                    num_attention_heads=config.n_head, intermediate_size=config.llama_mlp_width,
                                    rms_norm_eps=1e-5)
    show = sys.stderr.isatty() if progress is None else progress
    return Setup(config, seeds, pre_task, down_task, gpt, show)


# ============================================================================================
# The experiment
# ============================================================================================


def compute(config: DemoConfig = DEFAULT, *, progress: bool | None = None) -> dict[str, Any]:
    """The experiment without the writing: every number of the report, as a dict.

    Keys: ``"config"``, ``"model"``, ``"task"``, ``"versions"``, ``"seeds"``, ``"pretraining"``,
    ``"runs"`` (per run: losses, held-out evaluation, parameter and optimizer-state counts, merge
    check), ``"analysis_layer"``, ``"spectra"``, ``"phi"``, ``"amplification"``, ``"timing"``
    (seconds; the only entry that is not a function of ``config``) and ``"figures"`` (empty here).
    ``progress``: tqdm progress bars; None shows them only when stderr is a terminal.
    """
    if not isinstance(config, DemoConfig):
        raise TypeError(f"config must be a transformer_ref.demo.DemoConfig, got {type(config).__name__}")
    start = time.perf_counter()
    setup = make_setup(config, progress)
    runs = _runs(config)
    result = _describe(setup)
    timing: dict[str, Any] = {"runs": {}}
    bar = tqdm(total=1 + len(runs), desc="lora-ref demo", unit="run", disable=not setup.show)
    bar.set_postfix_str("pretraining")
    t0 = time.perf_counter()
    pretrained, result["pretraining"] = pretrain(setup)
    timing["pretraining_s"] = time.perf_counter() - t0
    bar.update(1)
    result["runs"], trained, initial = _finetune_all(setup, runs, pretrained, timing, bar)
    bar.close()
    t0 = time.perf_counter()
    result.update(_analyse(setup, runs, pretrained, trained, initial))
    timing["analysis_s"] = time.perf_counter() - t0
    timing["total_s"] = time.perf_counter() - start
    result["timing"] = timing
    result["figures"] = []
    return result


def _describe(setup: Setup) -> dict[str, Any]:
    """The result's head: configuration, model and task sizes, software versions, seeds."""
    config, gpt = setup.config, setup.gpt
    pre_task, down_task = setup.pretraining, setup.downstream
    return {
        "config": config.to_dict(),
        "model": {"family": config.family, "n_embd": config.n_embd, "n_layer": config.n_layer,
                  "n_head": config.n_head, "vocab_size": gpt.vocab_size, "n_positions": setup.pretraining.seq_len,
                  "mlp_width": gpt.mlp_width if config.family == "gpt2" else gpt.intermediate_size,
                  "parameters": count_parameters(gpt)["base"], "dtype": config.dtype},
        "task": {"n_symbols": pre_task.n_symbols, "length": pre_task.length, "n_swaps": config.n_swaps,
                 "changed": list(down_task.changed), "seq_len": pre_task.seq_len,
                 "pretraining_cipher": list(pre_task.cipher), "downstream_cipher": list(down_task.cipher)},
        "versions": versions(),
        "seeds": setup.seeds,
    }


def cpu_name() -> str:
    """The CPU's model name (Linux: the first ``model name`` of /proc/cpuinfo), else what
    :mod:`platform` says, else ``"unknown CPU"``."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def versions() -> dict[str, str]:
    """The software and machine the numbers were computed with (informational): Python, lora-ref
    and each dependency's version, NumPy's BLAS, the CPU (:func:`cpu_name`), the platform and
    its CPU count, and any BLAS thread variables set in the environment. Float32 training results
    can differ in their last bits between CPUs, BLAS builds and core counts, so a report names them."""
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
    out["cpu"] = cpu_name()
    out["platform"] = f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs"
    threads = {k: os.environ[k] for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
               if k in os.environ}
    if threads:
        out["threads"] = ", ".join(f"{k}={v}" for k, v in threads.items())
    return out


def pretrain(setup: Setup) -> tuple[dict[str, Any], dict[str, Any]]:
    """Step 1: full training from scratch on the pretraining task of ``setup`` (:func:`make_setup`)
    -> ``(params, section)``: the pretrained parameters (HF state-dict names, the config's dtype)
    and the result's ``"pretraining"`` section (per-step losses, held-out evaluation on the
    pretraining task, and on the downstream task before any fine-tuning)."""
    if not isinstance(setup, Setup):
        raise TypeError(f"setup must be a transformer_ref.demo.experiment.Setup (from make_setup), "
                        f"got {type(setup).__name__}")
    config, gpt = setup.config, setup.gpt
    params0 = init_params(gpt, setup.seeds["init"], config.dtype)
    pre = train(params0, gpt, setup.pretraining, mode="full", steps=config.pretrain_steps,
                batch_size=config.batch_size, lr=config.pretrain_lr, seed=setup.seeds["pretrain"], progress=setup.show)
    section = {
        "losses": [float(v) for v in pre.losses],
        "eval": evaluate(pre.params, gpt, None, None, setup.pretraining, config.eval_examples),
        "downstream_before": evaluate(pre.params, gpt, None, None, setup.downstream, config.eval_examples),
    }
    return pre.params, section


def _finetune_all(setup: Setup, runs: list[_Run], pretrained: Mapping[str, Any], timing: dict[str, Any],
                  bar: Any) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Step 2: every fine-tuning run from the same pretrained weights, measured.

    Returns ``(rows, trained, initial)``: the result row of each run, ``{key: (TrainResult,
    LoraConfig or None)}``, and ``{key: adapters before training}`` for the LoRA runs."""
    heldout_inputs = asarray(setup.downstream.heldout(setup.config.eval_examples)[0])       # (n, T)
    rows: dict[str, Any] = {}
    trained: dict[str, Any] = {}
    initial: dict[str, Any] = {}
    for run in runs:
        bar.set_postfix_str(run.label)
        t0 = time.perf_counter()
        res, lc, initial_adapters = _finetune(setup, run, pretrained)
        timing["runs"][run.key] = time.perf_counter() - t0
        if initial_adapters is not None:
            initial[run.key] = initial_adapters
        rows[run.key] = _run_row(setup, run, res, lc)
        if lc is not None:
            rows[run.key]["merge"] = _merge_check(pretrained, res.adapters, lc, setup.gpt, heldout_inputs, run.r)
        trained[run.key] = (res, lc)
        bar.update(1)
    return rows, trained, initial


def _finetune(setup: Setup, run: _Run, pretrained: Mapping[str, Any]) -> tuple[Any, Any, Any]:
    """One run on the downstream task -> ``(TrainResult, LoraConfig or None, initial adapters or None)``."""
    config, gpt = setup.config, setup.gpt
    common = dict(steps=config.finetune_steps, batch_size=config.batch_size, seed=setup.seeds["finetune"],
                  progress=setup.show)
    if run.matrices is None:
        res = train(pretrained, gpt, setup.downstream, mode="full", lr=config.full_lr, **common)
        return res, None, None
    lc = lora_config_for(run.matrices, run.r, alpha=config.alpha, family=gpt)
    # each run draws its own initial A (independent of the other runs: a shared stream would
    # make A_r=8 the first rows of A_r=64 and inflate their subspace similarity)
    adapters = add_adapters(pretrained, gpt, lc, run_rng(setup.seeds["adapters"], run.key))
    # adapters given: the training generator draws only batches, so every run sees the same ones
    res = train(pretrained, gpt, setup.downstream, mode="lora", lora_config=lc, adapters=adapters,
                lr=config.lora_lr, **common)
    return res, lc, adapters


def _run_row(setup: Setup, run: _Run, res: Any, lc: Any) -> dict[str, Any]:
    """A run's result row: its settings, losses, held-out evaluation and sizes (measured and by formula)."""
    config, gpt = setup.config, setup.gpt
    L, C = config.n_layer, config.n_embd
    if lc is None:
        tree, lr = res.params, config.full_lr
        formula = count_parameters(gpt)["base"]
        formula_text = "every parameter of the model"
    else:
        tree, lr = res.adapters, config.lora_lr
        formula = 2 * (L * len(run.matrices)) * C * run.r         # Section 5.1: 2 L_LoRA d_model r
        formula_text = f"2 x L_LoRA x d_model x r = 2 x {L * len(run.matrices)} x {C} x {run.r}"
    state = adam_init(tree)                                        # what train() allocates for Adam
    tail = res.losses[-max(1, len(res.losses) // 10):]
    return {
        "label": run.label, "group": run.group, "matrices": list(run.matrices) if run.matrices else None,
        "r": run.r, "lr": lr, "alpha": config.alpha if lc is not None else None,
        "scale": lc.scale if lc is not None else None,
        "losses": [float(v) for v in res.losses], "final_train_loss": float(np.mean(tail)),
        "eval": evaluate(res.params, gpt, res.adapters, lc, setup.downstream, config.eval_examples),
        "trainable": {"measured": count_trainable(tree), "formula": formula, "formula_text": formula_text,
                      "count_parameters": (count_parameters(gpt, lc)["lora"] if lc is not None
                                           else count_parameters(gpt)["base"])},
        "adam_bytes": {"measured": _tree_bytes(state.m) + _tree_bytes(state.v),
                       "formula": 2 * formula * np.dtype(config.dtype).itemsize},
    }


# ============================================================================================
# Merge check: the first-order rounding bound on merged versus unmerged logits
# ============================================================================================


def _merge_check(params: Mapping[str, Any], adapters: Mapping[str, Any], lora_config: Any, gpt: Any,
                 tokens: Any, r: int) -> dict[str, Any]:
    """max |merged - unmerged| logits in the training dtype and in float64 (the same weights
    widened exactly), each against its bound ``2 gamma_n M``; and how far the adapters move the
    logits at all (so the check is not vacuous)."""
    n = logit_rounding_chain(gpt, r)
    M = logit_magnitude(params, gpt)
    out: dict[str, Any] = {"chain_length": n, "magnitude": M}
    dtype = dtype_name(to_numpy(next(iter(params.values()))).dtype)
    for name in dict.fromkeys((dtype, "float64")):
        p, ad = (params, adapters) if name == dtype else (_astype(params, name), _astype(adapters, name))
        # REFERENCE: the paper's order W x + s B (A x) (training's FAST op set may fold s B A into W
        # first, which would compare the merge with itself)
        unmerged = to_numpy(forward(p, tokens, gpt, ad, lora_config, ops=REFERENCE)).astype(np.float64)  # (N, T, V)
        merged = to_numpy(forward(merge_adapters(p, ad, lora_config), tokens, gpt, ops=REFERENCE)).astype(np.float64)
        base = to_numpy(forward(p, tokens, gpt, ops=REFERENCE)).astype(np.float64)
        # Both sides are one forward pass of at most n roundings: |each - exact| <= gamma_n M to
        # first order, so |merged - unmerged| <= 2 gamma_n M.
        out[name] = {"max_abs_error": float(np.max(np.abs(merged - unmerged))),
                     "bound": 2.0 * tolerance(name, n) * M,
                     "adapter_effect": float(np.max(np.abs(unmerged - base)))}
    return out


# ============================================================================================
# Step 3: analysis of the learned updates (block `config.analysis_layer`)
# ============================================================================================


def _block(adapters: Mapping[str, Any], params: Mapping[str, Any], lora_config: Any, layer: int,
           kind: str, model: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """(W, A, B, s) of matrix type ``kind`` ("q", "k", "v" or "o") in block ``layer``, as NumPy:
    W (C, C) the frozen weight (GPT-2's q, k, v: the rows of their block of c_attn), A (r, C), B (C, r)."""
    name, rows = matrix_module(model, kind, layer)
    W, ad, s = to_numpy(params[name + ".weight"]), adapters[name], lora_config.scale_for(name)
    if rows is None:
        return W, to_numpy(ad["A"]), to_numpy(ad["B"]), s
    enable = lora_config.enable_for(name)
    g = rows.start // (rows.stop - rows.start)            # the block of the fused weight
    if enable is None or not enable[g]:
        raise ValueError(f"{name} has no adapter block for {kind!r} (enable_lora={enable})")
    k = sum(enable[:g])                                   # position of block g among the enabled ones
    r, q = lora_config.rank_for(name), rows.stop - rows.start
    A = to_numpy(ad["A"])[k * r:(k + 1) * r, :]                          # (r, C)
    B = to_numpy(ad["B"])[k * q:(k + 1) * q, :]                          # (C, r)
    return W[rows, :], A, B, s


def _analyse(setup: Setup, runs: list[_Run], pretrained: Mapping[str, Any], trained: dict[str, Any],
             initial: dict[str, Any]) -> dict[str, Any]:
    """Step 3: ``analysis_layer``, ``spectra``, ``phi`` and ``amplification`` of the result."""
    layer = setup.config.analysis_layer
    spectra = {run.key: _spectra(setup, run, pretrained, *trained[run.key])
               for run in runs if run.group in ("rank sweep", "full")}
    return {"analysis_layer": layer, "spectra": spectra, "phi": _phi(setup, pretrained, trained, initial),
            "amplification": _amplification(setup, pretrained, trained)}


def _spectrum_row(spec: Any) -> dict[str, Any]:
    s = spec.singular_values.astype(np.float64)
    return {"singular_values": [float(v) for v in s], "norm": float(np.linalg.norm(s)),
            "numerical_rank": spec.numerical_rank, "effective_rank": spec.effective_rank,
            "stable_rank": spec.stable_rank, "energy_top1": spec.energy_at(1),
            "energy_top2": spec.energy_at(2), "energy_top4": spec.energy_at(4)}


def _spectra(setup: Setup, run: _Run, pretrained: Mapping[str, Any], res: Any, lc: Any) -> dict[str, Any]:
    """The spectrum of the q and v updates: ``s B A`` factored for LoRA, the dense difference for full."""
    layer = setup.config.analysis_layer
    if run.group != "full":
        return {kind: _spectrum_row(spectrum(*_block(res.adapters, pretrained, lc, layer, kind, setup.gpt)[1:]))
                for kind in ("q", "v")}
    rows = {}
    for kind in ("q", "v"):
        name, block = matrix_module(setup.gpt, kind, layer)
        dW = (to_numpy(res.params[name + ".weight"]) - to_numpy(pretrained[name + ".weight"]))   # (d_out, C)
        dW = dW if block is None else dW[block, :]                                                 # (C, C)
        sv = scipy.linalg.svdvals(dW)
        rows[kind] = _spectrum_row(Spectrum.from_singular_values(sv, dW.shape))
    return rows


def _phi(setup: Setup, pretrained: Mapping[str, Any], trained: dict[str, Any],
         initial: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Figure 3: phi(A_r1, A_r2, i, j) of the (Wq, Wv) runs at the two ``phi_ranks``, every layer,
    after training (*phi*) and for the A matrices the runs started from (*init*)."""
    config = setup.config
    C, (r1, r2) = config.n_embd, config.phi_ranks
    k1, k2 = f"lora-qv-r{r1}", f"lora-qv-r{r2}"
    lc1, lc2 = trained[k1][1], trained[k2][1]
    p = min(r1, r2)
    phi = {}
    for kind in ("q", "v"):
        per_layer = []
        for i in range(config.n_layer):
            A1 = _block(trained[k1][0].adapters, pretrained, lc1, i, kind, setup.gpt)[1]
            A2 = _block(trained[k2][0].adapters, pretrained, lc2, i, kind, setup.gpt)[1]
            grid = similarity_grid(A1, A2)                                     # (r1, r2)
            # the same for the A matrices the two runs started from: what training added
            I1 = _block(initial[k1], pretrained, lc1, i, kind, setup.gpt)[1]
            I2 = _block(initial[k2], pretrained, lc2, i, kind, setup.gpt)[1]
            init = similarity_grid(I1, I2)                                     # (r1, r2)
            per_layer.append({
                "layer": i, "grid": [[float(v) for v in row] for row in grid],
                "phi_1_1": float(grid[0, 0]), "phi_p_p": float(grid[p - 1, p - 1]),
                "phi_r1_r2": float(grid[r1 - 1, r2 - 1]),
                "init_1_1": float(init[0, 0]), "init_p_p": float(init[p - 1, p - 1]),
                "init_r1_r2": float(init[r1 - 1, r2 - 1]),
                "random_1_1": 1.0 / C, "random_p_p": p / C, "random_r1_r2": max(r1, r2) / C,
            })
        phi[kind] = per_layer
    return phi


def _amplification(setup: Setup, pretrained: Mapping[str, Any], trained: dict[str, Any]) -> dict[str, Any]:
    """Table 7: ``lora_ref.analysis.amplification_report`` of the q and v updates at each of the
    ``amplification_ranks`` (the random projections drawn from the "analysis" seed, in this order)."""
    config = setup.config
    amp: dict[str, Any] = {}
    analysis_rng = np.random.default_rng(setup.seeds["analysis"])
    for r in config.amplification_ranks:
        res, lc = trained[f"lora-qv-r{r}"]
        amp[str(r)] = {}
        for kind in ("q", "v"):
            W, A, B, s = _block(res.adapters, pretrained, lc, config.analysis_layer, kind, setup.gpt)
            d = amplification_report(W, A, B, s, rng=analysis_rng, n_random=config.n_random).to_dict()
            d.pop("proj_random")
            amp[str(r)][kind] = d
    return amp
