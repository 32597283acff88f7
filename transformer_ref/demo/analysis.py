"""Step 3 of the ``lora-ref demo`` experiment: the learned updates of block ``config.analysis_layer``.

* spectra: the singular values of each (W_q, W_v) run's update ``s B A`` of the q and v weights
  (``lora_ref.analysis.spectrum``, never forming dW), and of full fine-tuning's dense difference;
* phi: Figure 3's subspace similarity ``phi(A_r1, A_r2, i, j)`` (Eq. 4) between the A matrices of
  the runs at the two ``phi_ranks``, every layer, after training and before it;
* amplification: Table 7's ``|U^T W V|_F`` and factor at each of the ``amplification_ranks``.

Shapes as in :mod:`transformer_ref.demo.experiment`: a fused ``c_attn`` adapter with n enabled
blocks has A (n r, C) and B (n C, r); block k is ``A[k r:(k+1) r, :]``, ``B[k C:(k+1) C, :]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import scipy.linalg

from lora_ref.analysis import Spectrum, amplification_report, similarity_grid, spectrum
from lora_ref.backend import to_numpy

from ..count import matrix_module
from .common import Setup
from .runs import Run

__all__ = ["analyse"]


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


def analyse(setup: Setup, runs: list[Run], pretrained: Mapping[str, Any], trained: dict[str, Any],
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


def _spectra(setup: Setup, run: Run, pretrained: Mapping[str, Any], res: Any, lc: Any) -> dict[str, Any]:
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
