"""Small generated tasks (no downloads), deterministic for a seed, and an evaluation helper.

The tasks are substitution ciphers: a sequence is a random string ``x_1 .. x_n`` of symbols,
a separator, then the string enciphered symbol by symbol, ``c(x_1) .. c(x_n)``::

    x_1 x_2 ... x_n  SEP  c(x_1) c(x_2) ... c(x_n)

Only the enciphered half is scored (the string itself is random, so unpredictable): the model
must learn to attend from answer position i back to ``x_i`` (a fixed offset, learned from the
position embeddings) and to map each symbol through the cipher ``c``.

* :func:`pretraining_task`: a random cipher ``c`` over ``n_symbols`` symbols.
* :func:`downstream_task`: the same cipher with a few pairs of outputs swapped. Fine-tuning has
  something real to learn -- for the swapped symbols the pretrained model is confidently wrong --
  while the change is small in a precise sense: ``2 * n_swaps`` symbols are re-routed, so a
  low-rank update of the value path can express it. Accuracy is measured on the answer tokens,
  and separately on the swapped symbols, where the pretrained model scores 0.

Token ids: symbols ``0 .. n_symbols - 1``, the separator ``n_symbols``; vocab size
``n_symbols + 1``; inputs and targets have T = 2 n positions.

Sizes that make a pretrain-then-fine-tune comparison fast on 2 CPU cores (measured with
``OPENBLAS_NUM_THREADS=1``, float32, on a shared machine): ``pretraining_task(16, 8)`` and
``downstream_task(pre, n_swaps=2)`` with ``GPTConfig(n_embd=64, n_layer=2, n_head=4)``; full
pretraining, 600 steps of batch 32 at lr 3e-3, reaches held-out accuracy 1.0 in about 16 s;
LoRA on W_q, W_v for 200 steps at lr 1e-2 takes 3-4 s per rank and reaches changed-symbol
accuracy 0.53 at r = 1 and 1.0 at r = 2, 4, 8, 64; full fine-tuning (200 steps, lr 1e-3) about 7 s,
accuracy 1.0.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from lora_ref.backend import asarray, to_numpy
from lora_ref.checks import int_in_range, is_int, numpy_generator, positive_int
from lora_ref.lora import LoraConfig

from .gpt2 import GPTConfig
from .llama import LlamaConfig
from .hosting import family_of
from .layers import IGNORE_INDEX, REFERENCE, Ops

__all__ = ["CipherTask", "downstream_task", "evaluate", "pretraining_task"]


@dataclass(frozen=True)
class CipherTask:
    """Copy a random string through the substitution ``cipher`` (symbol a -> ``cipher[a]``).

    Parameters
    ----------
    cipher : tuple of int
        A permutation of ``range(n_symbols)``.
    length : int
        n, the length of each string.
    name : str
        For display.
    heldout_seed : int
        Seed of the held-out evaluation set (:meth:`heldout`); training batches come from the
        generator passed to :meth:`batch`, so with 16^8 possible strings the two overlap with
        negligible probability.
    changed : tuple of int
        Symbols whose cipher differs from the pretraining task's (empty for pretraining);
        :func:`evaluate` reports accuracy on them separately.
    """

    cipher: tuple[int, ...]
    length: int = 8
    name: str = "cipher"
    heldout_seed: int = 12345
    changed: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        cipher = tuple(int(c) for c in self.cipher)
        if sorted(cipher) != list(range(len(cipher))) or len(cipher) < 2:
            raise ValueError(f"cipher must be a permutation of range(n_symbols) with n_symbols >= 2, got {self.cipher!r}")
        object.__setattr__(self, "cipher", cipher)
        object.__setattr__(self, "length", positive_int(self.length, "length"))
        if not set(self.changed) <= set(range(len(cipher))):
            raise ValueError(f"changed must list symbols in [0, {len(cipher)}), got {self.changed!r}")

    @property
    def n_symbols(self) -> int:
        return len(self.cipher)

    @property
    def sep(self) -> int:
        """The separator's token id (``n_symbols``)."""
        return self.n_symbols

    @property
    def vocab_size(self) -> int:
        return self.n_symbols + 1

    @property
    def seq_len(self) -> int:
        """T, the number of input (and target) positions: ``2 * length``."""
        return 2 * self.length

    def gpt_config(self, **kwargs: Any) -> GPTConfig:
        """A ``GPTConfig`` whose ``vocab_size`` and ``n_positions`` fit this task; other fields
        from ``kwargs`` (e.g. ``n_embd=64, n_layer=2, n_head=4``)."""
        return GPTConfig(vocab_size=self.vocab_size, n_positions=self.seq_len, **kwargs)

    def llama_config(self, **kwargs: Any) -> LlamaConfig:
        """A ``LlamaConfig`` whose ``vocab_size`` and ``max_position_embeddings`` fit this task;
        other fields from ``kwargs`` (e.g. ``hidden_size=64, num_hidden_layers=2, ...``)."""
        return LlamaConfig(vocab_size=self.vocab_size, max_position_embeddings=self.seq_len, **kwargs)

    def sequences(self, batch_size: int, rng: np.random.Generator) -> np.ndarray:
        """``(batch_size, 2 n + 1)`` int64: ``x, SEP, cipher(x)`` for random strings x."""
        rng = numpy_generator(rng, "rng")
        batch_size = positive_int(batch_size, "batch_size")
        x = rng.integers(0, self.n_symbols, size=(batch_size, self.length))      # (B, n)
        y = np.asarray(self.cipher)[x]                                           # (B, n)
        sep = np.full((batch_size, 1), self.sep)
        return np.concatenate([x, sep, y], axis=1).astype(np.int64)              # (B, 2n + 1)

    def batch(self, batch_size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """``(inputs, targets)``, each ``(batch_size, 2 n)`` int64 NumPy arrays.

        ``targets`` is ``inputs`` shifted by one, with the string's positions set to
        ``IGNORE_INDEX`` (-100): only the n enciphered tokens are scored.
        """
        s = self.sequences(batch_size, rng)
        inputs, targets = s[:, :-1], s[:, 1:].copy()                             # (B, T) each
        targets[:, : self.length] = IGNORE_INDEX                                 # x_2 .. x_n, SEP: not scored
        return inputs, targets

    def heldout(self, n_examples: int = 512) -> tuple[np.ndarray, np.ndarray]:
        """The held-out set: ``batch(n_examples, default_rng(heldout_seed))``, always the same."""
        return self.batch(n_examples, np.random.default_rng(self.heldout_seed))


def pretraining_task(n_symbols: int = 16, length: int = 8, seed: int = 0) -> CipherTask:
    """A random cipher over ``n_symbols`` symbols (a permutation drawn from ``seed``)."""
    if not is_int(n_symbols) or n_symbols < 2:
        raise ValueError(f"n_symbols must be an int >= 2, got {n_symbols!r}")
    cipher = np.random.default_rng(seed).permutation(int(n_symbols))
    return CipherTask(tuple(int(c) for c in cipher), length=length, name="pretraining")


def downstream_task(pretraining: CipherTask, n_swaps: int = 2, seed: int = 1) -> CipherTask:
    """The pretraining cipher with ``n_swaps`` disjoint pairs of symbols' outputs exchanged.

    ``2 * n_swaps`` symbols change their encipherment (listed in ``changed``); the rest keep it.
    The pairs are drawn from ``seed``.
    """
    if not isinstance(pretraining, CipherTask):
        raise TypeError(f"pretraining must be a CipherTask, got {type(pretraining).__name__}")
    n_swaps = int_in_range(n_swaps, "n_swaps", 1, pretraining.n_symbols // 2, "disjoint pairs of symbols")
    chosen = np.random.default_rng(seed).choice(pretraining.n_symbols, size=2 * n_swaps, replace=False)
    cipher = list(pretraining.cipher)
    for a, b in chosen.reshape(n_swaps, 2):                                      # (n_swaps, 2) pairs
        cipher[a], cipher[b] = cipher[b], cipher[a]
    return CipherTask(tuple(cipher), length=pretraining.length, name="downstream",
                      heldout_seed=pretraining.heldout_seed + 1, changed=tuple(sorted(int(c) for c in chosen)))


def evaluate(params: Mapping[str, Any], config: Any, adapters: Mapping[str, Any] | None,
             lora_config: LoraConfig | None, task: CipherTask, n_examples: int = 512,
             batch_size: int = 256, ops: Ops = REFERENCE) -> dict[str, float]:
    """Loss and accuracy on ``task``'s held-out set (no dropout), the model run with ``ops``.

    Returns ``{"loss", "accuracy", "changed_accuracy", "sequence_accuracy"}``: mean cross-entropy
    over the answer tokens; the fraction of answer tokens whose argmax is right; the same over
    answer tokens whose source symbol is in ``task.changed`` (NaN if there are none); and the
    fraction of strings enciphered entirely right.
    """
    if not isinstance(task, CipherTask):
        raise TypeError(f"task must be a CipherTask, got {type(task).__name__}")
    forward = family_of(config).forward
    inputs, targets = task.heldout(n_examples)
    total, correct, kept, seq_ok = 0.0, 0, 0, 0
    changed_correct, changed_kept = 0, 0
    changed = np.isin(inputs[:, : task.length], np.asarray(task.changed, dtype=np.int64))  # (n, length)
    for start in range(0, n_examples, batch_size):
        x, t = inputs[start:start + batch_size], targets[start:start + batch_size]          # (b, T)
        logits = to_numpy(forward(params, asarray(x), config, adapters, lora_config, None, ops)).astype(np.float64)
        z = logits - logits.max(axis=-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))                           # (b, T, V)
        mask = t != IGNORE_INDEX
        picked = np.take_along_axis(logp, np.where(mask, t, 0)[..., None], axis=-1)[..., 0]
        total += float(-(picked * mask).sum())
        right = (logits.argmax(axis=-1) == t) & mask                                        # (b, T)
        correct += int(right.sum())
        kept += int(mask.sum())
        seq_ok += int((right.sum(axis=1) == mask.sum(axis=1)).sum())
        answers = right[:, task.length:]                                                    # (b, n): answer i
        ch = changed[start:start + batch_size]
        changed_correct += int((answers & ch).sum())
        changed_kept += int(ch.sum())
    return {"loss": total / kept, "accuracy": correct / kept,
            "changed_accuracy": changed_correct / changed_kept if changed_kept else float("nan"),
            "sequence_accuracy": seq_ok / n_examples}
