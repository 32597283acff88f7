"""Issue 11, item 19: the demo's figures say what they show.

Drawn from the committed results of the default run (docs/reproduction/default.json; no training
here): every axis has a label, the figures about one layer name it in every title, index axes
carry integer ticks, the phi map has a chance-level reference, and parameters.png shows what the
table beside it does not (held-out loss against the parameters trained). docs/figures/ holds the
default run's figures.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

matplotlib = pytest.importorskip("matplotlib")
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from transformer_ref.demo.figures import FIGURES  # noqa: E402
from transformer_ref.demo.report import phi_chance  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULT = json.loads((ROOT / "docs" / "reproduction" / "default.json").read_text())
ONE_LAYER = ("spectra.png", "phi.png")                      # the figures about the analysed layer only


def drawn(name: str) -> Figure:
    size, draw = FIGURES[name]
    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    draw(fig, RESULT)
    fig.canvas.draw()                                       # tick labels exist only once drawn
    return fig


def plot_axes(fig: Figure) -> list:
    """The axes that hold data (not colorbars), with their secondary axes."""
    return [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]


def visible_tick_labels(axis) -> list[str]:
    lo, hi = sorted(axis.get_view_interval())
    return [t.get_text() for t in axis.get_majorticklabels()
            if t.get_text() and lo <= t.get_position()[0 if axis.axis_name == "x" else 1] <= hi]


def as_integer(text: str) -> int:
    assert re.fullmatch(r"[0-9,]+", text.replace("\u2212", "-")), f"tick label {text!r} is not an integer"
    return int(text.replace(",", ""))


@pytest.mark.parametrize("name", list(FIGURES))
def test_every_axis_is_labelled(name):
    fig = drawn(name)
    for ax in plot_axes(fig):
        assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title(), (name, ax.get_title())
        for child in ax.child_axes:                          # parameters.png's top axis: Adam bytes
            assert child.get_xlabel() or child.get_ylabel(), name
    for ax in fig.axes:
        if ax.get_label() == "<colorbar>":
            assert ax.get_ylabel() or ax.get_xlabel(), f"{name}: a colorbar without a label"


@pytest.mark.parametrize("name", ONE_LAYER)
def test_the_layer_is_in_every_title(name):
    layer = RESULT["analysis_layer"]
    for ax in plot_axes(drawn(name)):
        assert f"layer {layer}" in ax.get_title(), (name, ax.get_title())


@pytest.mark.parametrize("name, axes_of", [
    ("spectra.png", lambda ax: [ax.xaxis]),                                   # index i of sigma_i
    ("phi.png", lambda ax: [ax.xaxis] + ([ax.yaxis] if ax.get_ylabel().startswith("i ") else [])),   # i and j
    ("rank_sweep.png", lambda ax: [ax.xaxis]),                                # ranks
    ("loss_curves.png", lambda ax: [ax.xaxis]),                               # steps
])
def test_index_axes_have_integer_ticks(name, axes_of):
    for ax in plot_axes(drawn(name)):
        for axis in axes_of(ax):
            labels = visible_tick_labels(axis)
            assert labels, (name, ax.get_title())
            for text in labels:
                as_integer(text)


def test_spectra_ticks_are_indices_of_singular_values():
    ticks = [as_integer(t) for ax in plot_axes(drawn("spectra.png")) for t in visible_tick_labels(ax.xaxis)]
    assert 1 in ticks and RESULT["model"]["n_embd"] in ticks      # the first and the last index of the dense update


def test_the_phi_map_has_a_chance_reference():
    """Random subspaces give phi(i, j) = max(i, j) / d on average: each matrix has a panel of grid
    rows against that line, and cells at chance level are marked on the heat map (with a key)."""
    fig = drawn("phi.png")
    d, layer = RESULT["model"]["n_embd"], RESULT["analysis_layer"]
    r1, r2 = RESULT["config"]["phi_ranks"]
    for kind in ("q", "v"):
        grid = np.asarray(RESULT["phi"][kind][layer]["grid"])
        mine = [ax for ax in plot_axes(fig) if ax.get_title().startswith(f"W{kind},")]
        rows = next(ax for ax in mine if "rows" in ax.get_title())
        lines = {line.get_label(): line for line in rows.get_lines()}
        for i in (1, r1):
            chance = lines[f"i = {i}, random: mean max(i, j)/{d}, shaded to 95%"]
            j = np.asarray(chance.get_xdata())
            assert np.array_equal(chance.get_ydata(), np.maximum(i, j) / d)
            assert np.array_equal(lines[f"i = {i}, trained"].get_ydata(), grid[i - 1])
        # the cells marked at chance are exactly those at most the 95th percentile of random subspaces
        q95 = np.array([[phi_chance(i, j, d)[1] for j in range(1, r2 + 1)] for i in range(1, r1 + 1)])
        heat = next(ax for ax in mine if "phi(A_r" in ax.get_title())
        marks = next(line for line in heat.get_lines() if line.get_marker() == "x")
        expected = np.argwhere(grid <= q95) + 1                                  # (n, 2) 1-based (i, j)
        assert np.array_equal(np.column_stack([marks.get_ydata(), marks.get_xdata()]).astype(int).reshape(-1, 2),
                              expected.reshape(-1, 2))
        assert "at chance" in heat.get_legend().get_texts()[0].get_text()


def test_parameters_figure_shows_loss_against_parameters():
    """The parameters table lists counts and bytes; the figure puts each run's held-out loss
    against its trainable parameters (Adam's bytes on the top axis), which no table does."""
    fig = drawn("parameters.png")
    (ax,) = plot_axes(fig)
    points = {line.get_label(): (line.get_xdata()[0], line.get_ydata()[0]) for line in ax.get_lines()
              if len(line.get_xdata()) == 1}
    for row in RESULT["runs"].values():
        assert points[row["label"]] == (row["trainable"]["measured"], row["eval"]["loss"])
    assert "held-out loss" in ax.get_ylabel() and "Adam state bytes" in ax.child_axes[0].get_xlabel()


def test_docs_figures_are_the_default_runs():
    assert sorted(RESULT["figures"]) == sorted(FIGURES)
    for name in FIGURES:
        assert (ROOT / "docs" / "figures" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (ROOT / "docs" / "figures").glob("*.png")) == sorted(FIGURES)
