"""The demo's PNG figures, one function each, drawn from a result of :func:`transformer_ref.demo.compute`.

matplotlib is optional (``pip install 'lora-ref[plots]'``): it is imported when
:func:`write_figures` runs, and :func:`transformer_ref.demo.write_report` calls that only when
matplotlib can be imported. Figures are made with ``matplotlib.figure.Figure`` (no pyplot, no
global state), so drawing them never opens a window or touches another figure.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from lora_ref.analysis import plot_similarity

__all__ = ["FIGURES", "write_figures"]


def write_figures(result: dict[str, Any], fig_dir: Path) -> list[str]:
    """Draw every figure of :data:`FIGURES` into ``fig_dir`` (created); returns the file names written."""
    import matplotlib.figure

    fig_dir = Path(fig_dir)
    fig_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (size, draw) in FIGURES.items():
        fig = matplotlib.figure.Figure(figsize=size, layout="constrained")
        draw(fig, result)
        fig.savefig(fig_dir / name, format="png", dpi=100)
        written.append(name)
    return written


def _loss_curves(fig: Any, result: dict[str, Any]) -> None:
    """Training loss per step: pretraining, and every fine-tuning run."""
    ax1, ax2 = fig.subplots(1, 2)
    pre = result["pretraining"]["losses"]
    ax1.plot(np.arange(len(pre)), pre, lw=0.8)
    ax1.set(yscale="log", xlabel="step", ylabel="training loss", title="pretraining (full, from scratch)")
    for row in result["runs"].values():
        style = {"full": "k-", "rank sweep": "-", "equal budget": "--"}[row["group"]]
        ax2.plot(np.arange(len(row["losses"])), row["losses"], style, lw=0.8, label=row["label"])
    ax2.set(yscale="log", xlabel="step", ylabel="training loss", title="fine-tuning on the downstream task")
    ax2.legend(fontsize=7)


def _rank_sweep(fig: Any, result: dict[str, Any]) -> None:
    """Held-out loss and accuracy on the swapped symbols versus rank (Table 6), with the other runs."""
    runs = result["runs"]
    sweep = [k for k, row in runs.items() if row["group"] == "rank sweep"]
    ranks = [runs[k]["r"] for k in sweep]
    axes = fig.subplots(1, 2)
    for ax, metric, title, log in ((axes[0], "loss", "held-out loss", True),
                                   (axes[1], "changed_accuracy", "held-out accuracy on swapped symbols", False)):
        ax.plot(ranks, [runs[k]["eval"][metric] for k in sweep], "o-", label="LoRA Wq,Wv")
        ax.axhline(runs["full"]["eval"][metric], color="k", ls="--", label="full fine-tuning")
        for row in runs.values():
            if row["group"] == "equal budget":
                ax.plot([row["r"]], [row["eval"][metric]], "s", label=row["label"])
        ax.axhline(result["pretraining"]["downstream_before"][metric], color="grey", ls=":", label="before fine-tuning")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str(r) for r in ranks])
        if log:
            ax.set_yscale("log")
        ax.set(xlabel="rank r", title=title)
        ax.legend(fontsize=7)


def _parameters(fig: Any, result: dict[str, Any]) -> None:
    """Trainable parameters and Adam state bytes of every run (measured), log scale."""
    runs = result["runs"]
    axes = fig.subplots(1, 2)
    labels = [row["label"] for row in runs.values()]
    y = np.arange(len(labels))
    for ax, field_, title in ((axes[0], "trainable", "trainable parameters"), (axes[1], "adam_bytes", "Adam state bytes")):
        ax.barh(y, [row[field_]["measured"] for row in runs.values()], color="tab:blue")
        ax.set_yticks(y, labels, fontsize=7)
        ax.invert_yaxis()
        ax.set(xscale="log", title=f"{title} (measured)")


def _spectra(fig: Any, result: dict[str, Any]) -> None:
    """Singular values of the learned q and v updates (nonzero ones), every analysed run."""
    runs, layer = result["runs"], result["analysis_layer"]
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


def _phi(fig: Any, result: dict[str, Any]) -> None:
    """Figure 3: phi(A_r1, A_r2, i, j) heatmaps for Wq and Wv, whole grid and its top-left square."""
    layer = result["analysis_layer"]
    r1, r2 = result["config"]["phi_ranks"]
    axes = fig.subplots(2, 2, gridspec_kw={"width_ratios": [3, 1]})
    for row_axes, kind in zip(axes, ("q", "v")):
        grid = np.asarray(result["phi"][kind][layer]["grid"], dtype=np.float64)       # (r1, r2)
        plot_similarity(grid, ax=row_axes[0], title=f"W{kind}: phi(A_r={r1}, A_r={r2}, i, j)",
                        xlabel=f"j (r={r2})", ylabel=f"i (r={r1})")
        p = min(r1, r2)
        plot_similarity(grid[:p, :p], ax=row_axes[1], title=f"W{kind}: j <= {p}", xlabel="j", ylabel="i")


FIGURES: dict[str, tuple[tuple[float, float], Callable[[Any, dict[str, Any]], None]]] = {
    "loss_curves.png": ((11, 4), _loss_curves),
    "rank_sweep.png": ((11, 4), _rank_sweep),
    "parameters.png": ((11, 4), _parameters),
    "spectra.png": ((11, 4), _spectra),
    "phi.png": ((11, 6), _phi),
}
"""Each figure's file name -> (size in inches, the function that draws it on a fresh
``matplotlib.figure.Figure`` of that size)."""
