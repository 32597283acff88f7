"""``lora-ref analyze ADAPTER_DIR``: rank analysis of a PEFT LoRA adapter (see :mod:`lora_ref.analysis`).

For each adapted module: its rank, top singular values of ``dW = s B A``, numerical, effective
and stable rank, and the fraction of ``|dW|_F^2`` in the top k. With ``--compare OTHER_DIR``:
the subspace similarity phi (the paper's Eq. 4) between the two adapters' A matrices, module by
module. ``--json`` prints everything as JSON (NaN as null); ``--plot PATH`` saves a PNG (the
spectra, or with ``--compare`` one phi heatmap per module).

Errors go to standard error as one line: a bad argument (exit 2); an adapter that is invalid or
cannot be read, or a plot that cannot be written (exit 1, naming the path and the reason).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

HELP = "rank analysis of a PEFT LoRA adapter: spectra, effective/stable rank, energy, and phi between two adapters"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter", metavar="ADAPTER_DIR", type=Path,
                        help="PEFT adapter directory (adapter_config.json + adapter_model.safetensors)")
    parser.add_argument("--compare", metavar="OTHER_DIR", type=Path,
                        help="a second adapter: report phi(A1, A2, i, j) for the modules both adapt")
    parser.add_argument("--json", action="store_true", help="print the full result as JSON")
    parser.add_argument("--plot", metavar="PATH", type=Path,
                        help="save a PNG: the singular values, or with --compare the phi heatmaps")
    parser.add_argument("--top", type=int, default=4, metavar="N",
                        help="how many singular values to list per module (default 4)")
    parser.add_argument("--energy-at", type=int, nargs="+", default=[1, 2, 4], metavar="K",
                        help="report the energy fraction in the top K singular values (default: 1 2 4)")
    parser.add_argument("--dtype", choices=("float64", "float32"), default="float64",
                        help="precision of the analysis; the stored factors are widened exactly "
                             "(default float64)")


def _clean(value: Any) -> Any:
    """JSON-ready: NaN -> None, NumPy scalars and arrays -> Python."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "tolist"):
        return _clean(value.tolist())
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _fmt(value: float, digits: int = 4) -> str:
    return "nan" if math.isnan(value) else f"{value:.{digits}g}"


def _spectra(adapter_config: Any, adapters: dict, top: int, ks: list[int]) -> dict[str, dict[str, Any]]:
    from ..analysis import spectrum

    out = {}
    for module, pair in adapters.items():
        scale = adapter_config.scale_for(module)
        spec = spectrum(pair["A"], pair["B"], scale)
        out[module] = {
            "shape": list(spec.shape), "r": int(pair["A"].shape[0]), "scale": scale,
            "singular_values": [float(v) for v in spec.singular_values[:top]],
            "numerical_rank": spec.numerical_rank, "tol": spec.tol,
            "effective_rank": spec.effective_rank, "stable_rank": spec.stable_rank,
            "energy_at": {str(k): spec.energy_at(k) for k in ks},
            "_spectrum": spec,
        }
    return out


def _comparison(adapters: dict, others: dict) -> dict[str, Any]:
    import numpy as np

    from ..analysis import similarity_grid

    both = sorted(set(adapters) & set(others))
    modules = {}
    for module in both:
        A1, A2 = adapters[module]["A"], others[module]["A"]
        try:
            grid = similarity_grid(A1, A2)
        except (ValueError, TypeError) as exc:
            modules[module] = {"error": str(exc)}
            continue
        d_in = int(A1.shape[1])
        # p: the largest i = j for which both subspaces are determined (finite cells).
        p = int(min(np.sum(np.isfinite(grid[:, 0])), np.sum(np.isfinite(grid[0, :]))))
        modules[module] = {
            "r1": int(A1.shape[0]), "r2": int(A2.shape[0]), "d_in": d_in, "p": p,
            "phi_1_1": float(grid[0, 0]) if p else math.nan,
            "phi_p_p": float(grid[p - 1, p - 1]) if p else math.nan,
            "random_baseline_p_p": p / d_in,
            "grid": grid,
        }
    return {"modules": modules, "only_in_adapter": sorted(set(adapters) - set(others)),
            "only_in_other": sorted(set(others) - set(adapters))}


def _plot(path: Path, spectra: dict, comparison: dict | None) -> None:
    from ..analysis import _figure_module, plot_similarity, plot_spectrum

    figure = _figure_module()
    if comparison is None:
        fig = figure.Figure(figsize=(7.0, 4.5), layout="constrained")
        ax = fig.add_subplot()
        for module, row in spectra.items():
            if row["_spectrum"].numerical_rank:
                plot_spectrum(row["_spectrum"], ax=ax, label=module if len(spectra) <= 12 else None)
        ax.set_title("singular values of s B A")
        fig.savefig(path, format="png", dpi=120)
        return
    grids = {m: row["grid"] for m, row in comparison["modules"].items() if "grid" in row}
    if not grids:
        raise ValueError("no module could be compared, so there is no heatmap to plot")
    cols = min(4, len(grids))
    rows = -(-len(grids) // cols)
    fig = figure.Figure(figsize=(4.0 * cols, 3.2 * rows), layout="constrained")
    for n, (module, grid) in enumerate(grids.items(), start=1):
        plot_similarity(grid, ax=fig.add_subplot(rows, cols, n), title=module, xlabel="j (other)", ylabel="i (adapter)")
    fig.savefig(path, format="png", dpi=100)


def _error(message: str, status: int) -> int:
    print(f"lora-ref analyze: {message}", file=sys.stderr)
    return status


def run(args: argparse.Namespace) -> int:
    from ..peft_io import load_peft_adapter

    if args.top < 1:
        return _error(f"--top must be a positive integer, got {args.top}", 2)
    if any(k < 1 for k in args.energy_at):
        return _error(f"--energy-at values must be positive integers, got {args.energy_at}", 2)
    loaded = []
    for path in (args.adapter, args.compare):
        if path is None:
            continue
        try:
            loaded.append(load_peft_adapter(path, dtype=args.dtype))
        except (ValueError, NotImplementedError) as exc:
            return _error(str(exc), 1)
        except OSError as exc:
            if exc.strerror is None:           # a message of our own (a missing directory)
                return _error(str(exc), 1)
            where = exc.filename if exc.filename is not None else path
            return _error(f"cannot read {str(where)!r}: {exc.strerror}", 1)
    (adapter_config, adapters), other = loaded[0], (loaded[1] if len(loaded) > 1 else None)
    spectra = _spectra(adapter_config, adapters, args.top, args.energy_at)
    comparison = _comparison(adapters, other[1]) if other is not None else None
    if args.plot is not None:
        try:
            _plot(args.plot, spectra, comparison)
        except OSError as exc:
            return _error(f"cannot write the plot {str(args.plot)!r}: {exc.strerror or exc}", 1)
        except (ImportError, ValueError) as exc:
            return _error(f"cannot write the plot {str(args.plot)!r}: {exc}", 1)

    if args.json:
        result: dict[str, Any] = {
            "adapter": str(args.adapter), "dtype": args.dtype,
            "modules": {m: {k: v for k, v in row.items() if k != "_spectrum"} for m, row in spectra.items()},
        }
        if comparison is not None:
            result["compare"] = {"other": str(args.compare), **comparison}
        if args.plot is not None:
            result["plot"] = str(args.plot)
        print(json.dumps(_clean(result), indent=2))
        return 0

    print(f"adapter {args.adapter}: {len(spectra)} module(s), r={adapter_config.r}, alpha={adapter_config.alpha:g}"
          f"{', rsLoRA' if adapter_config.use_rslora else ''} (analysed in {args.dtype})")
    energy_cols = "  ".join(f"E@{k:<4}" for k in args.energy_at)
    print(f"{'module':<40} {'d_out x d_in':>13} {'r':>3} {'scale':>7} {'num':>4} {'eff':>6} {'stable':>6}  "
          f"{energy_cols}  top singular values")
    for module, row in spectra.items():
        energies = "  ".join(f"{_fmt(row['energy_at'][str(k)], 3):<6}" for k in args.energy_at)
        top = " ".join(_fmt(v) for v in row["singular_values"])
        shape = f"{row['shape'][0]} x {row['shape'][1]}"
        print(f"{module:<40} {shape:>13} {row['r']:>3} {row['scale']:>7.4g} {row['numerical_rank']:>4} "
              f"{row['effective_rank']:>6.3f} {row['stable_rank']:>6.3f}  {energies}  {top}")
    if comparison is not None:
        print(f"\nphi(A1, A2, i, j) against {args.compare} (Eq. 4, right singular vectors of A; "
              f"random subspaces give max(i, j) / d_in on average)")
        print(f"{'module':<40} {'r1':>3} {'r2':>3} {'phi(1,1)':>8} {'p':>3} {'phi(p,p)':>8} {'random p/d_in':>13}")
        for module, row in comparison["modules"].items():
            if "error" in row:
                print(f"{module:<40} not comparable: {row['error']}")
                continue
            print(f"{module:<40} {row['r1']:>3} {row['r2']:>3} {_fmt(row['phi_1_1'], 3):>8} {row['p']:>3} "
                  f"{_fmt(row['phi_p_p'], 3):>8} {_fmt(row['random_baseline_p_p'], 3):>13}")
        for key, label in (("only_in_adapter", str(args.adapter)), ("only_in_other", str(args.compare))):
            if comparison[key]:
                print(f"only in {label}: {', '.join(comparison[key])}")
    if args.plot is not None:
        print(f"plot written to {args.plot}")
    return 0
