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

from .report import phi_chance

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


def _integer_axis(axis: Any, values: Any = None) -> None:
    """Integer tick labels on an index axis: at ``values`` (e.g. powers of 2 on a log axis), or
    wherever matplotlib puts them, restricted to integers."""
    from matplotlib.ticker import FixedLocator, MaxNLocator, NullLocator, ScalarFormatter

    if values is None:
        axis.set_major_locator(MaxNLocator(integer=True))
        return
    axis.set_major_locator(FixedLocator([float(v) for v in values]))
    axis.set_major_formatter(ScalarFormatter())
    axis.set_minor_locator(NullLocator())


def _powers_of_two(n: int) -> list[int]:
    """1, 2, 4, ... up to n, and n itself."""
    out = [2 ** k for k in range(int(n).bit_length()) if 2 ** k <= n]
    return out + [n] * (out[-1] != n)


def _loss_curves(fig: Any, result: dict[str, Any]) -> None:
    """Training loss per step: pretraining, and every fine-tuning run."""
    ax1, ax2 = fig.subplots(1, 2)
    pre = result["pretraining"]["losses"]
    n_layer = result["model"]["n_layer"]
    ax1.plot(np.arange(len(pre)), pre, lw=0.8)
    ax1.set(yscale="log", xlabel="step", ylabel="training loss",
            title=f"pretraining (full, from scratch; all {n_layer} layers)")
    for row in result["runs"].values():
        style = {"full": "k-", "rank sweep": "-", "equal budget": "--", "variant": ":"}[row["group"]]
        ax2.plot(np.arange(len(row["losses"])), row["losses"], style, lw=0.8, label=row["label"])
    ax2.set(yscale="log", xlabel="step", ylabel="training loss",
            title=f"fine-tuning on the downstream task (adapters on all {n_layer} layers)")
    ax2.legend(fontsize=7)
    for ax in (ax1, ax2):
        _integer_axis(ax.xaxis)


def _rank_sweep(fig: Any, result: dict[str, Any]) -> None:
    """Held-out loss and accuracy on the swapped symbols versus rank (Table 6), with the other runs
    (Table 5's at their rank as squares, the variants -- DoRA, QLoRA -- as diamonds)."""
    runs = result["runs"]
    sweep = [k for k, row in runs.items() if row["group"] == "rank sweep"]
    ranks = [runs[k]["r"] for k in sweep]
    axes = fig.subplots(1, 2)
    for ax, metric, ylabel, title, log in (
            (axes[0], "loss", "held-out loss (cross-entropy, nats)", "held-out loss versus rank", True),
            (axes[1], "changed_accuracy", "held-out accuracy on the swapped symbols", "swapped symbols versus rank",
             False)):
        ax.plot(ranks, [runs[k]["eval"][metric] for k in sweep], "o-", label="LoRA Wq,Wv")
        ax.axhline(runs["full"]["eval"][metric], color="k", ls="--", label="full fine-tuning")
        for row in runs.values():
            if row["group"] in ("equal budget", "variant"):
                ax.plot([row["r"]], [row["eval"][metric]], "s" if row["group"] == "equal budget" else "D", ms=5,
                        label=row["label"])
        ax.axhline(result["pretraining"]["downstream_before"][metric], color="grey", ls=":", label="before fine-tuning")
        ax.set_xscale("log", base=2)
        _integer_axis(ax.xaxis, ranks)
        if log:
            ax.set_yscale("log")
        ax.set(xlabel="rank r", ylabel=ylabel, title=title)
        ax.legend(fontsize=7)


def _parameters(fig: Any, result: dict[str, Any]) -> None:
    """What each run buys with its parameters: held-out loss against trainable parameters (log-log),
    Adam's state bytes on the top axis (2 moments per parameter), the untuned model for reference.
    The tables give the counts and the losses apart; this puts them together."""
    runs = result["runs"]
    itemsize = np.dtype(result["model"]["dtype"]).itemsize
    ax = fig.subplots()
    styles = {"full": ("k*", 12), "rank sweep": ("o", 7), "equal budget": ("s", 7), "variant": ("D", 6)}
    for row in runs.values():
        marker, size = styles[row["group"]]
        ax.plot([row["trainable"]["measured"]], [row["eval"]["loss"]], marker, ms=size, label=row["label"])
    ax.axhline(result["pretraining"]["downstream_before"]["loss"], color="grey", ls=":", label="before fine-tuning")
    ax.set(xscale="log", yscale="log", xlabel="trainable parameters (measured)",
           ylabel="held-out loss (cross-entropy, nats)",
           title="held-out loss against trainable parameters (all layers)")
    top = ax.secondary_xaxis("top", functions=(lambda n: 2 * itemsize * n, lambda b: b / (2 * itemsize)))
    top.set_xlabel(f"Adam state bytes (2 moments x {itemsize} bytes per parameter)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))


def _spectra(fig: Any, result: dict[str, Any]) -> None:
    """Singular values of the learned q and v updates (nonzero ones), every analysed run."""
    runs, layer = result["runs"], result["analysis_layer"]
    axes = fig.subplots(1, 2)
    for ax, kind in zip(axes, ("q", "v")):
        longest = 1
        for key, rows in result["spectra"].items():
            s = np.asarray(rows[kind]["singular_values"])
            s = s[s > 0]
            longest = max(longest, s.size)
            ax.plot(np.arange(1, s.size + 1), s, "k--" if key == "full" else "o-", ms=2, lw=0.8,
                    label=runs[key]["label"] + (" (dense dW)" if key == "full" else ""))
        ax.set(xscale="log", yscale="log", xlabel="index i (largest first)", ylabel="singular value sigma_i",
               title=f"singular values of dW, W{kind}, layer {layer}")
        _integer_axis(ax.xaxis, _powers_of_two(longest))
        ax.legend(fontsize=7)


def _phi(fig: Any, result: dict[str, Any]) -> None:
    """Figure 3: phi(A_r1, A_r2, i, j) heatmaps for Wq and Wv in the analysed layer, the whole grid
    and its top-left square, cells at chance level marked; and rows of the grid against what
    random subspaces give (mean max(i, j) / d, shaded up to its 95th percentile)."""
    from matplotlib.lines import Line2D

    layer, d = result["analysis_layer"], result["model"]["n_embd"]
    r1, r2 = result["config"]["phi_ranks"]
    p = min(r1, r2)
    q95 = np.array([[phi_chance(i, j, d)[1] for j in range(1, r2 + 1)] for i in range(1, r1 + 1)])   # (r1, r2)
    axes = fig.subplots(2, 3, gridspec_kw={"width_ratios": [3, 1.2, 1.6]})
    chance_mark = dict(ls="none", marker="x", color="white", ms=4, mew=1)
    for row_axes, kind in zip(axes, ("q", "v")):
        grid = np.asarray(result["phi"][kind][layer]["grid"], dtype=np.float64)       # (r1, r2)
        at_chance = np.argwhere(grid <= q95)                                            # (n, 2) 0-based (i, j)
        for ax, cols, title in ((row_axes[0], r2, f"W{kind}, layer {layer}: phi(A_r={r1}, A_r={r2}, i, j)"),
                                (row_axes[1], p, f"W{kind}, layer {layer}: j <= {p}")):
            plot_similarity(grid[:, :cols], ax=ax, title=title, xlabel=f"j (of A_r={r2})", ylabel=f"i (of A_r={r1})")
            cells = at_chance[at_chance[:, 1] < cols]
            ax.plot(cells[:, 1] + 1, cells[:, 0] + 1, **chance_mark)
            _integer_axis(ax.xaxis)
            _integer_axis(ax.yaxis)
        row_axes[0].legend(handles=[Line2D([], [], **{**chance_mark, "color": "k"},
                                           label="at chance: phi <= 95th percentile of random")],
                           fontsize=7, loc="lower right")
        ax = row_axes[2]
        j = np.arange(1, r2 + 1)
        for i, color in ((1, "tab:blue"), (r1, "tab:orange")):
            ax.plot(j, grid[i - 1], color=color, lw=1, label=f"i = {i}, trained")
            ax.plot(j, np.maximum(i, j) / d, color=color, ls="--", lw=0.8,
                    label=f"i = {i}, random: mean max(i, j)/{d}, shaded to 95%")
            ax.fill_between(j, 0, q95[i - 1], color=color, alpha=0.15, lw=0)
        ax.set(xscale="log", ylim=(0, 1), xlabel=f"j (of A_r={r2})", ylabel="phi(i, j)",
               title=f"W{kind}, layer {layer}: rows of the grid")
        _integer_axis(ax.xaxis, _powers_of_two(r2))
        ax.legend(fontsize=6, loc="best")


FIGURES: dict[str, tuple[tuple[float, float], Callable[[Any, dict[str, Any]], None]]] = {
    "loss_curves.png": ((11, 4), _loss_curves),
    "rank_sweep.png": ((11, 4), _rank_sweep),
    "parameters.png": ((10, 4.5), _parameters),
    "spectra.png": ((11, 4), _spectra),
    "phi.png": ((14, 6.5), _phi),
}
"""Each figure's file name -> (size in inches, the function that draws it on a fresh
``matplotlib.figure.Figure`` of that size)."""
