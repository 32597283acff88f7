"""Running the demo: the output folder, BLAS threads, and the files (results.json, report.md, figures/).

:func:`run_demo` is what ``lora-ref demo`` calls: it checks its arguments, runs
:func:`transformer_ref.demo.compute` with BLAS limited to ``threads`` threads, and writes the
result with :func:`write_report`.

Why one BLAS thread by default: the demo's matrices are small (at most 512 x 512 by 128 x 128),
so a second BLAS thread gains nothing on an idle machine, while on a busy one OpenBLAS's threads
wait for each other: measured on a shared 2-core machine, a LoRA step took 11 to 30 times longer
with 2 threads than with 1 (and the same time, within 8%, when the machine was idle). Float32
results can also depend on the thread count, so the thread count is part of what makes a run
repeatable (:func:`transformer_ref.machine.blas_threads`).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from lora_ref.checks import positive_int

from ..machine import blas_threads
from .common import DEFAULT, DemoConfig
from .experiment import compute
from .figures import write_figures
from .report import report_markdown

__all__ = ["prepare_output", "run_demo", "write_report"]


def run_demo(config: DemoConfig = DEFAULT, out_dir: str | os.PathLike[str] = "lora-ref-demo", *,
             progress: bool | None = None, plots: bool | None = None, threads: int | None = 1) -> dict[str, Any]:
    """Run the experiment (:mod:`transformer_ref.demo.experiment`) and write its report.

    Parameters
    ----------
    config : DemoConfig
        :data:`DEFAULT`, :data:`QUICK`, or your own (``dataclasses.replace(QUICK, seed=1)``).
    out_dir : path
        Created if needed; receives ``report.md``, ``results.json`` and ``figures/*.png``.
    progress : bool or None
        tqdm progress bars; None shows them only when stderr is a terminal.
    plots : bool or None
        Write the PNG figures; None writes them when matplotlib can be imported. Without
        matplotlib the report says that the figures were skipped and how to get them.
    threads : int or None
        BLAS threads while the demo runs (default 1, see this module's docstring); None leaves
        the setting alone. Restored afterwards.

    Returns
    -------
    dict
        Every number of the report (``results.json`` holds the same): the dict of
        :func:`transformer_ref.demo.compute`, with ``"figures"`` (the files written) and
        ``"versions"["blas_threads"]`` (what was done to BLAS) filled in.
    """
    if not isinstance(config, DemoConfig):
        raise TypeError(f"config must be a transformer_ref.demo.DemoConfig (e.g. transformer_ref.demo.QUICK), "
                        f"got {type(config).__name__}")
    if not isinstance(out_dir, (str, os.PathLike)):
        raise TypeError(f"out_dir must be a path (str or os.PathLike), got {type(out_dir).__name__}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir must be a directory, but {str(out)!r} is an existing file")
    for name, value in (("progress", progress), ("plots", plots)):
        if value is not None and not isinstance(value, bool):
            raise TypeError(f"{name} must be True, False or None, got {value!r}")
    if threads is not None:
        threads = positive_int(threads, "threads")
    prepare_output(out)                      # fail before minutes of training, not after
    import scipy.linalg  # noqa: F401  (load SciPy's BLAS too, so that it is limited with NumPy's)

    with blas_threads(threads) as how:
        result = compute(config, progress=progress)
    result["versions"]["blas_threads"] = how
    write_report(result, out, plots=plots)
    return result


def prepare_output(out_dir: str | os.PathLike[str]) -> Path:
    """Create ``out_dir`` (and its parents) if needed and check that a file can be written in it;
    returns it as a ``Path``. Raises the ``OSError`` of the failing step (a parent that is a file,
    a read-only directory, ...) with ``filename`` set to ``out_dir``."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise type(exc)(exc.errno, exc.strerror or str(exc), str(out)) from None
    return out


def write_report(result: dict[str, Any], out_dir: str | os.PathLike[str], *, plots: bool | None = None) -> Path:
    """Write ``report.md``, ``results.json`` and (matplotlib permitting) ``figures/*.png`` for a
    :func:`transformer_ref.demo.compute` result into ``out_dir``; returns the report's path. Sets
    ``result["figures"]`` to the figures written and, when they are skipped,
    ``result["figures_skipped"]`` to why. ``plots``: as in :func:`run_demo` (True and no
    matplotlib is an ImportError)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result["figures"] = []
    result.pop("figures_skipped", None)
    if plots is False:
        result["figures_skipped"] = "plots=False was given"
    else:
        missing = _has_matplotlib()
        if missing is not None:
            if plots:
                raise ImportError(f"plots=True but matplotlib cannot be imported ({missing}): pip install 'lora-ref[plots]'")
            result["figures_skipped"] = f"matplotlib could not be imported ({missing})"
        else:
            result["figures"] = write_figures(result, out / "figures")
    result["timing"]["report_s"] = time.perf_counter() - t0
    (out / "results.json").write_text(json.dumps(json_ready(result), indent=1) + "\n")
    path = out / "report.md"
    path.write_text(report_markdown(result))
    return path


def _has_matplotlib() -> str | None:
    """None if matplotlib can be imported, else why not."""
    try:
        import matplotlib.figure  # noqa: F401
    except ImportError as exc:
        return str(exc) or "matplotlib is not installed"
    return None


def json_ready(value: Any) -> Any:
    """``value`` with what JSON cannot hold made plain: dict keys as str, tuples as lists, NumPy
    scalars as Python numbers, NaN as null and infinities as the strings "inf" / "-inf"."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    if isinstance(value, np.generic):
        return json_ready(value.item())
    return value
