"""What every step of the ``lora-ref demo`` experiment shares: its configuration, its random
streams, its tasks and model, and the pretraining they all start from.

* :class:`DemoConfig` and the presets :data:`DEFAULT` and :data:`QUICK` (:data:`PRESETS`);
* :func:`make_setup` -> :class:`Setup` (seeds, the pretraining, downstream and second downstream
  tasks, the model's config), :func:`pretrain` (step 1 of the experiment);
* :func:`run_rng` (each run's own generator), :func:`second_task` (the task pairing of the
  two-adapter steps, shared with ``lora-ref combine``), :func:`versions` and :func:`cpu_name`
  (what the numbers were computed with);
* :func:`replace_section` (a docs page's generated section between its two markers, for
  docs/reproduction.md and ``lora-ref combine --write-docs``).

The runs themselves are :mod:`~transformer_ref.demo.runs`; :func:`~transformer_ref.demo.compute`
(:mod:`~transformer_ref.demo.experiment`) puts the steps together.
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import platform
import sys
import zlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from lora_ref import __version__
from lora_ref.backend import dtype_name, namespace
from lora_ref.checks import non_negative_int, positive_int, positive_real
from lora_ref.testing import tolerance

from .. import add_adapters, init_params
from ..data import CipherTask, downstream_task, evaluate, pretraining_task
from ..train import train

__all__ = ["DEFAULT", "FAMILIES", "PRESETS", "QUICK", "DemoConfig", "Setup", "abs_sum", "astype", "cpu_name",
           "exact_bound", "make_setup", "one_value", "pretrain", "rel_norm", "replace_section", "run_rng",
           "second_task", "train_adapter", "tree_bytes", "versions"]

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
    ``amplification_ranks``: the ranks of Table 7; both taken from ``ranks``. ``variant_rank``:
    the rank of the variant runs -- DoRA, QLoRA and the two-task adapters -- taken from ``ranks``,
    so that the (W_q, W_v) LoRA run at that rank is there to compare them with. ``eval_examples``:
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
    variant_rank: int = 4
    eval_examples: int = 512
    n_random: int = 100
    dtype: str = "float32"
    seed: int = 0
    family: str = "gpt2"

    def __post_init__(self) -> None:
        for name in ("n_embd", "n_layer", "n_head", "n_symbols", "length", "n_swaps", "pretrain_steps",
                     "finetune_steps", "batch_size", "budget_rank", "variant_rank", "eval_examples", "n_random"):
            object.__setattr__(self, name, positive_int(getattr(self, name), name))
        object.__setattr__(self, "seed", non_negative_int(self.seed, "seed"))
        for name in ("pretrain_lr", "full_lr", "lora_lr", "alpha"):
            object.__setattr__(self, name, positive_real(getattr(self, name), name))
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd must be divisible by n_head, got n_embd={self.n_embd}, n_head={self.n_head}")
        if 4 * self.n_swaps > self.n_symbols:
            raise ValueError(f"n_swaps must be at most n_symbols / 4 = {self.n_symbols // 4} (two downstream tasks "
                             f"swap disjoint pairs), got {self.n_swaps}")
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
        if self.variant_rank not in self.ranks:
            raise ValueError(f"variant_rank must be one of ranks {self.ranks} (the DoRA and QLoRA rows sit next to "
                             f"the (W_q, W_v) LoRA run at that rank), got {self.variant_rank!r}")

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
# Random streams, sizes, dtypes
# ============================================================================================


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


def tree_bytes(tree: Any) -> int:
    """Bytes held by every array of a (nested) dict."""
    if isinstance(tree, Mapping):
        return sum(tree_bytes(v) for v in tree.values())
    return math.prod(tree.shape) * np.dtype(dtype_name(tree.dtype)).itemsize


def astype(tree: Any, dtype: str) -> Any:
    """A (nested) dict of arrays cast to ``dtype`` (exact when widening float32 to float64)."""
    if isinstance(tree, Mapping):
        return {k: astype(v, dtype) for k, v in tree.items()}
    xp = namespace(tree)
    return xp.astype(tree, getattr(xp, dtype))


# ============================================================================================
# The tasks and the model every step shares
# ============================================================================================


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



def second_task(setup: Setup) -> CipherTask:
    """Task B of the two-adapter steps (the demo's two tasks, ``lora-ref combine``'s audit): the
    pretraining cipher with other pairs swapped, disjoint from those of ``setup.downstream`` (task
    A): the first seed after A's that gives disjoint pairs (:class:`DemoConfig` ensures there is
    room for them, ``4 n_swaps <= n_symbols``)."""
    if not isinstance(setup, Setup):
        raise TypeError(f"setup must be a transformer_ref.demo.common.Setup (from make_setup), got {type(setup).__name__}")
    first = set(setup.downstream.changed)
    for k in range(2, 10_000):
        task = downstream_task(setup.pretraining, setup.config.n_swaps, seed=setup.seeds["task"] + k)
        if not first & set(task.changed):
            return task
    raise RuntimeError("no second task with swaps disjoint from the first was found")  # pragma: no cover


def pretrain(setup: Setup) -> tuple[dict[str, Any], dict[str, Any]]:
    """Step 1: full training from scratch on the pretraining task of ``setup`` (:func:`make_setup`)
    -> ``(params, section)``: the pretrained parameters (HF state-dict names, the config's dtype)
    and the result's ``"pretraining"`` section (per-step losses, held-out evaluation on the
    pretraining task, and on the downstream task before any fine-tuning)."""
    if not isinstance(setup, Setup):
        raise TypeError(f"setup must be a transformer_ref.demo.common.Setup (from make_setup), "
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


# ============================================================================================
# What the numbers were computed with
# ============================================================================================


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



# ============================================================================================
# Two adapters on one base: shared by two_tasks (the demo's step 4) and combination (lora-ref combine)
# ============================================================================================


def train_adapter(setup: Setup, pretrained: Mapping[str, Any], task: CipherTask, lora_config: Any, key: str) -> Any:
    """An adapter of ``lora_config`` trained on ``task`` from ``pretrained`` -> ``train``'s
    TrainResult, as the demo's runs: the initial factors from the run's own generator
    (``run_rng(setup.seeds["adapters"], key)``), the batches from the fine-tuning seed, the demo's
    steps, batch size and LoRA learning rate."""
    demo = setup.config
    initial = add_adapters(pretrained, setup.gpt, lora_config, run_rng(setup.seeds["adapters"], key))
    return train(pretrained, setup.gpt, task, mode="lora", lora_config=lora_config, adapters=initial,
                 steps=demo.finetune_steps, batch_size=demo.batch_size, lr=demo.lora_lr,
                 seed=setup.seeds["finetune"], progress=setup.show)


def one_value(values: Any, what: str = "modules") -> Any:
    """The one value every module shares (rank, scale); RuntimeError naming ``what`` otherwise."""
    found = set(values)
    if len(found) != 1:
        raise RuntimeError(f"{what} disagree: {sorted(found)}")
    return found.pop()


def rel_norm(x: np.ndarray, ref: np.ndarray) -> float:
    """``||x||_F / ||ref||_F`` as a Python float."""
    return float(np.linalg.norm(x) / np.linalg.norm(ref))


def abs_sum(sources: Mapping[str, Any], weights: Any) -> np.ndarray:
    """M = sum_i |w_i s_i| |B_i| |A_i| (d_out, d_in): (C1) on absolute values; ``sources``
    ``{name: (A (r, d_in), B (d_out, r), s)}``, ``weights`` one per source."""
    return sum(abs(w * s) * (np.abs(B) @ np.abs(A)) for (A, B, s), w in zip(sources.values(), weights))


def exact_bound(sources: Mapping[str, Any], weights: Any, target: np.ndarray) -> dict[str, Any]:
    """exact / cat against (C1) ``target`` (d_out, d_in): ``2 gamma_n M`` entrywise, n = R + n_a + 1
    roundings (R the sum of the ranks, n_a adapters; :mod:`transformer_ref.demo.combination`'s
    derivation) -> ``{"n": n, "bound": ||2 gamma_n M||_F / ||target||_F}``."""
    n = sum(A.shape[0] for A, _, _ in sources.values()) + len(sources) + 1
    bound = 2.0 * tolerance("float64", n) * abs_sum(sources, weights)                  # (d_out, d_in)
    return {"n": n, "bound": rel_norm(bound, target)}


# ============================================================================================
# A docs page's generated section
# ============================================================================================


def replace_section(page: str, section: str, begin: str, end: str) -> str:
    """``page`` with the text between the markers ``begin`` and ``end`` replaced by ``section``
    (the markers kept, ``begin`` then a newline). Raises ValueError unless each marker occurs
    exactly once, ``begin`` first; ``replace_section(page, "", begin, end)`` checks a page."""
    if page.count(begin) != 1 or page.count(end) != 1 or page.index(begin) > page.index(end):
        raise ValueError(f"the page must hold the markers {begin!r} and {end!r} once each, in that order")
    head, rest = page.split(begin)
    _, tail = rest.split(end)
    return f"{head}{begin}\n{section}{end}{tail}"
