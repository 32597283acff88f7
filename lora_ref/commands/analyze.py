"""``lora-ref analyze ADAPTER_DIR``: rank analysis of a PEFT LoRA adapter (see :mod:`lora_ref.analysis`).

For each adapted module: its rank, top singular values of ``dW = s B A``, numerical, effective
and stable rank, and the fraction of ``|dW|_F^2`` in the top k. With ``--compare OTHER_DIR``:
the subspace similarity phi (the paper's Eq. 4) between the two adapters' A matrices, module by
module. ``--json`` prints everything as JSON (NaN as null); ``--plot PATH`` saves a PNG (the
spectra, or with ``--compare`` one phi heatmap per module).

Variants: a DoRA adapter's spectrum is that of its low-rank direction update ``s B A``; its
magnitude ``m`` is summarised (min / median / max), and with ``--base MODEL_DIR`` related to the
base's row norms (``m / ||W||_row``, and ``m / ||W + s B A||_row``, 1 where m is untrained). An
embedding adapter's ``s B A`` is (D, V), the transpose of the table's delta. A convolution
adapter's delta is analysed as the (C_out, C_in K) matrix it applies to each input patch (K the
kernel size; with groups, B is block-diagonal over them). A directory holding several adapters
(PEFT's layout: the default at the root, the others in sub-folders) gets one report per adapter.

Errors go to standard error as one line: a bad argument (exit 2); an adapter that is invalid or
cannot be read, or a plot that cannot be written (exit 1, naming the path and the reason).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from ._common import error, read_error

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
    parser.add_argument("--base", metavar="MODEL_DIR", type=Path,
                        help="a GPT-2 or LLaMA-family checkpoint: check the adapter against it and relate DoRA "
                             "magnitudes to its row norms")
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


def _matrix(adapter_config: Any, module: str, pair: dict) -> tuple[Any, Any, str, str]:
    """``(A2, B2, kind, note)``: the factors of the module's delta as a matrix product ``B2 A2``."""
    import numpy as np

    from ..backend import to_numpy

    A, B = pair["A"], pair["B"]
    if A.ndim >= 3:                                      # conv: A (r, C_in, *k), B (C_out, r/G, 1, ...)
        A, B = to_numpy(A), to_numpy(B)
        r, C_out, per = A.shape[0], B.shape[0], B.shape[1]
        G = r // per
        q = C_out // G
        B2 = np.zeros((C_out, r), dtype=B.dtype)         # (C_out, r): group g's rows read its r/G channels
        for g in range(G):
            B2[g * q:(g + 1) * q, g * per:(g + 1) * per] = B[g * q:(g + 1) * q].reshape(q, per)
        A2 = A.reshape(r, -1)                            # (r, C_in K)
        note = (f"convolution adapter: s B A as the (C_out, C_in K) = {B2.shape[0]} x {A2.shape[1]} matrix "
                f"applied to each input patch{f', B block-diagonal over {G} groups' if G > 1 else ''}")
        return A2, B2, "conv", note
    if adapter_config.is_embedding(module):
        return A, B, "embedding", (f"embedding adapter: s B A is (D, V) = {B.shape[0]} x {A.shape[1]}, the "
                                   "transpose of the table's delta s (B A)^T")
    return A, B, "dora" if "m" in pair else "linear", ""


def _spectra(adapter_config: Any, adapters: dict, top: int, ks: list[int],
             params: dict | None = None) -> dict[str, dict[str, Any]]:
    import numpy as np

    from ..analysis import spectrum
    from ..backend import to_numpy

    out = {}
    for module, pair in adapters.items():
        scale = adapter_config.scale_for(module)
        A, B, kind, note = _matrix(adapter_config, module, pair)
        spec = spectrum(A, B, scale)
        out[module] = {
            "kind": kind, "shape": list(spec.shape), "r": int(pair["A"].shape[0]), "scale": scale,
            "singular_values": [float(v) for v in spec.singular_values[:top]],
            "numerical_rank": spec.numerical_rank, "tol": spec.tol,
            "effective_rank": spec.effective_rank, "stable_rank": spec.stable_rank,
            "energy_at": {str(k): spec.energy_at(k) for k in ks},
            "_spectrum": spec, "_note": note,
        }
        if kind == "dora":
            m = to_numpy(pair["m"]).astype(np.float64)
            stats = lambda v: {"min": float(np.min(v)), "median": float(np.median(v)), "max": float(np.max(v))}  # noqa: E731
            out[module]["magnitude"] = stats(m)
            if params is not None:
                W = to_numpy(params[module + ".weight"]).astype(np.float64)                # (d_out, d_in)
                V = W + scale * (to_numpy(B).astype(np.float64) @ to_numpy(A).astype(np.float64))
                out[module]["m_over_row_norm"] = stats(m / np.linalg.norm(W, axis=1))
                out[module]["m_over_adapted_row_norm"] = stats(m / np.linalg.norm(V, axis=1))
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
    return error("analyze", message, status)


def _read_error(exc: OSError, path: Path) -> int:
    return _error(read_error(exc, path), 1)


def run(args: argparse.Namespace) -> int:
    from ..peft_io import list_peft_adapters, load_peft_adapter

    if args.top < 1:
        return _error(f"--top must be a positive integer, got {args.top}", 2)
    if any(k < 1 for k in args.energy_at):
        return _error(f"--energy-at values must be positive integers, got {args.energy_at}", 2)
    params = None
    if args.base is not None:
        from transformer_ref import load_checkpoint    # floor 2, imported when the command runs

        try:
            params = load_checkpoint(args.base, dtype=args.dtype)[1]
        except (ValueError, NotImplementedError) as exc:
            return _error(f"base model: {exc}", 1)
        except OSError as exc:
            return _read_error(exc, args.base)
    folders = {}
    for path in (args.adapter, args.compare):
        if path is None:
            continue
        try:
            folders[path] = list_peft_adapters(path)
        except (ValueError, NotImplementedError) as exc:
            return _error(str(exc), 1)
        except OSError as exc:
            return _read_error(exc, path)
    several = folders[args.adapter] != {"default": args.adapter}
    if args.compare is not None and (several or folders[args.compare] != {"default": args.compare}):
        multi = args.adapter if several else args.compare
        return _error(f"--compare compares two single adapters, but {multi} holds several "
                      f"({', '.join(folders[multi])}): give one of its sub-folders", 2)
    loaded, other = {}, None
    jobs = [(name, folder) for name, folder in folders[args.adapter].items()]
    for name, folder in jobs + ([(None, args.compare)] if args.compare is not None else []):
        try:
            adapter = load_peft_adapter(folder, params, dtype=args.dtype)
        except (ValueError, NotImplementedError) as exc:
            return _error(str(exc), 1)
        except OSError as exc:
            return _read_error(exc, folder)
        if name is None:
            other = adapter                    # --compare's adapter
        else:
            loaded[name] = adapter
    reports = {name: _spectra(*loaded[name], args.top, args.energy_at, params) for name in loaded}
    comparison = _comparison(loaded["default"][1], other[1]) if other is not None else None
    if args.plot is not None:
        try:
            _plot(args.plot, {f"{n}: {m}" if several else m: row for n, rep in reports.items() for m, row in rep.items()},
                  comparison)
        except OSError as exc:
            return _error(f"cannot write the plot {str(args.plot)!r}: {exc.strerror or exc}", 1)
        except (ImportError, ValueError) as exc:
            return _error(f"cannot write the plot {str(args.plot)!r}: {exc}", 1)

    if args.json:
        strip = lambda rep: {m: {k: v for k, v in row.items() if not k.startswith("_")} for m, row in rep.items()}  # noqa: E731
        result: dict[str, Any] = {"adapter": str(args.adapter), "dtype": args.dtype}
        if several:
            result["adapters"] = {n: {"path": str(folders[args.adapter][n]), "modules": strip(rep)}
                                  for n, rep in reports.items()}
        else:
            result["modules"] = strip(reports["default"])
        if comparison is not None:
            result["compare"] = {"other": str(args.compare), **comparison}
        if args.plot is not None:
            result["plot"] = str(args.plot)
        print(json.dumps(_clean(result), indent=2))
        return 0

    if several:
        print(f"{args.adapter}: {len(reports)} adapters ({', '.join(reports)}), one report each")
    for name, spectra in reports.items():
        adapter_config = loaded[name][0]
        if several:
            print(f"\n=== adapter {name!r}")
        print(f"adapter {folders[args.adapter][name]}: {len(spectra)} module(s), r={adapter_config.r}, "
              f"alpha={adapter_config.alpha:g}{', rsLoRA' if adapter_config.use_rslora else ''}"
              f"{', DoRA' if adapter_config.use_dora else ''} (analysed in {args.dtype})")
        _print_table(spectra, args.energy_at)
    if comparison is not None:
        _print_comparison(args, comparison)
    if args.plot is not None:
        print(f"plot written to {args.plot}")
    return 0


def _print_table(spectra: dict, energy_at: list[int]) -> None:
    energy_cols = "  ".join(f"E@{k:<4}" for k in energy_at)
    print(f"{'module':<40} {'d_out x d_in':>13} {'r':>3} {'scale':>7} {'num':>4} {'eff':>6} {'stable':>6}  "
          f"{energy_cols}  top singular values")
    for module, row in spectra.items():
        energies = "  ".join(f"{_fmt(row['energy_at'][str(k)], 3):<6}" for k in energy_at)
        top = " ".join(_fmt(v) for v in row["singular_values"])
        shape = f"{row['shape'][0]} x {row['shape'][1]}"
        print(f"{module:<40} {shape:>13} {row['r']:>3} {row['scale']:>7.4g} {row['numerical_rank']:>4} "
              f"{row['effective_rank']:>6.3f} {row['stable_rank']:>6.3f}  {energies}  {top}")
    for module, row in spectra.items():
        if row["_note"]:
            print(f"  {module}: {row['_note']}")
    dora = {m: row for m, row in spectra.items() if row["kind"] == "dora"}
    if dora:
        based = all("m_over_row_norm" in row for row in dora.values())
        print("DoRA magnitudes m (min / median / max over the output rows)"
              + ("" if based else "; --base MODEL_DIR relates them to the base's row norms") + ":")
        triple = lambda d: f"{_fmt(d['min'])} / {_fmt(d['median'])} / {_fmt(d['max'])}"  # noqa: E731
        print(f"  {'module':<40} {'m':>26}" + (f"  {'m / ||W||_row':>26}  {'m / ||W + s B A||_row':>26}" if based else ""))
        for module, row in dora.items():
            extra = f"  {triple(row['m_over_row_norm']):>26}  {triple(row['m_over_adapted_row_norm']):>26}" if based else ""
            print(f"  {module:<40} {triple(row['magnitude']):>26}{extra}")


def _print_comparison(args: argparse.Namespace, comparison: dict) -> None:
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
