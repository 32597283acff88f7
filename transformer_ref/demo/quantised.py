"""The QLoRA run's base: what holding the pretrained projections in 4-bit NormalFloat costs on the task.

``train(mode="qlora")`` quantises every projection weight of the pretrained model with QLoRA's
recipe (``lora_ref.quant.quantize_params``: NF4, blocks of 64, double quantisation; Dettmers et al.
2023, Section 3) and trains LoRA on that frozen 4-bit base; its ``TrainResult.params`` is the base.
:func:`quantisation_error` measures that base before any fine-tuning, against the float one:

* per weight, ``||W - Q(W)||_F / ||W||_F`` with ``Q(W)`` the dequantised weight (the least, the
  largest, and over all the weights together);
* the bytes the weights take in the training dtype and as bitsandbytes stores them (codes,
  constants, maps: ``QuantState.storage_bytes``), and bits per weight;
* the 4-bit base's held-out loss and accuracy on the pretraining and the downstream task (the
  float base's are the result's ``pretraining`` section), and ``max |logits_4bit - logits_float|``
  on the downstream task's held-out inputs beside ``max |logits_float|``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from lora_ref.backend import asarray, dtype_name, to_numpy

from .. import REFERENCE, forward
from ..data import evaluate
from ..hosting import is_4bit
from .common import Setup
from .runs import dequantized

__all__ = ["quantisation_error"]


def quantisation_error(setup: Setup, pretrained: Mapping[str, Any], quantised: Mapping[str, Any]) -> dict[str, Any]:
    """The result's ``"qlora"`` section for the pretrained params and the same params with their
    projections quantised (``quantised``: the QLoRA run's ``TrainResult.params``)."""
    if not isinstance(setup, Setup):
        raise TypeError(f"setup must be a transformer_ref.demo.common.Setup (from make_setup), got {type(setup).__name__}")
    names = [k for k, v in quantised.items() if is_4bit(v)]
    if not names:
        raise ValueError("quantised holds no 4-bit weight (lora_ref.quant.QuantState): pass the QLoRA run's params")
    config, gpt = setup.config, setup.gpt
    plain = dequantized(quantised)
    num = den = 0.0
    rel = []
    for k in names:
        W = to_numpy(pretrained[k]).astype(np.float64)                    # (d_out, d_in)
        E = to_numpy(plain[k]).astype(np.float64) - W
        num, den = num + float(np.sum(E * E)), den + float(np.sum(W * W))
        rel.append(float(np.linalg.norm(E) / np.linalg.norm(W)))
    numel = sum(math.prod(quantised[k].shape) for k in names)
    stored = sum(sum(quantised[k].storage_bytes().values()) for k in names)
    itemsize = np.dtype(dtype_name(to_numpy(pretrained[names[0]]).dtype)).itemsize
    inputs = asarray(setup.downstream.heldout(config.eval_examples)[0])                # (n, T)
    z = to_numpy(forward(pretrained, inputs, gpt, ops=REFERENCE)).astype(np.float64)    # (n, T, V)
    zq = to_numpy(forward(quantised, inputs, gpt, ops=REFERENCE)).astype(np.float64)
    recipe = quantised[names[0]]
    return {
        "weights": len(names), "parameters": numel,
        "recipe": {"quant_type": recipe.quant_type, "blocksize": recipe.blocksize, "double_quant": recipe.nested},
        "bytes": {"float": numel * itemsize, "4bit": stored, "bits_per_weight": 8.0 * stored / numel},
        "weight_error": {"min": min(rel), "max": max(rel), "all": math.sqrt(num / den)},
        "pretraining": evaluate(quantised, gpt, None, None, setup.pretraining, config.eval_examples),
        "downstream": evaluate(quantised, gpt, None, None, setup.downstream, config.eval_examples),
        "logits": {"max_abs_change": float(np.max(np.abs(zq - z))), "max_abs": float(np.max(np.abs(z)))},
    }
