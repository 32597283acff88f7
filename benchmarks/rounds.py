"""The comparison between libraries: fresh processes, rounds in rotating order, per-round ratios.

Round ``i`` runs, for each configuration, every side once -- each a fresh
``python -m benchmarks.worker step`` -- in an order rotated by ``i``, so no side always runs first
or right after a given other. Each side's figure for the round is the median of its timed steps;
a ratio between two sides is the median over rounds of the per-round ratios, with their min and
max. In round 0 every side also saves the logits it starts from, and they are held to each other
(to float32 rounding) before anything is compared: the sides train the same function.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .flops import StepShape, param_counts, step_flops
from .harness import paired_ratio

__all__ = ["RATIOS", "SIDE_NAMES", "WorkerError", "compare", "run_worker"]

ROOT = Path(__file__).resolve().parent.parent

# What each side is, for the page.
SIDE_NAMES = {
    "lora-ref": "lora-ref `train()`",
    "lora-ref-reference": "lora-ref reference path",
    "lora-ref-full": "lora-ref full fine-tuning",
    "torch-eager": "PyTorch+PEFT eager",
    "torch-compile": "PyTorch+PEFT `torch.compile`",
    "torch-eager-full": "PyTorch full fine-tuning, eager",
}

# (numerator, denominator): the ratios computed round by round when both sides ran.
RATIOS = (("lora-ref", "torch-eager"), ("lora-ref", "torch-compile"), ("lora-ref-reference", "torch-eager"),
          ("lora-ref", "lora-ref-full"), ("torch-compile", "torch-eager"), ("torch-eager", "torch-eager-full"))


class WorkerError(RuntimeError):
    """A worker process failed; the message holds its command and the end of its stderr."""


def run_worker(args: Sequence[str], *, timeout: float = 3600.0) -> dict[str, Any]:
    """Run ``python -m benchmarks.worker *args`` in a fresh interpreter (from the repository root)
    and return the JSON it writes; :class:`WorkerError` when it fails or times out."""
    fd, path = tempfile.mkstemp(suffix=".json", prefix="lora-ref-bench-")
    os.close(fd)
    cmd = [sys.executable, "-m", "benchmarks.worker", *args, "--json", path]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              timeout=timeout, check=False)
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
            raise WorkerError(f"{' '.join(cmd[2:-2])} exited with {proc.returncode}:\n{tail}")
        return json.loads(Path(path).read_text())
    except subprocess.TimeoutExpired as exc:
        raise WorkerError(f"{' '.join(cmd[2:-2])} ran past {timeout:.0f} s") from exc
    finally:
        Path(path).unlink(missing_ok=True)


def _loss_bound(shape: StepShape, max_logit: float, loss: float) -> float:
    """How far two sides' starting losses may differ. The mean cross-entropy moves by at most
    twice the largest logit difference (logsumexp is 1-Lipschitz in the max norm, plus the
    target's logit), and the logits agree to ``same_function_bound`` times their largest
    magnitude; then each side rounds its own sums over V classes and N positions (float32)."""
    import numpy as np

    from lora_ref.testing import tolerance

    from .suites import same_function_bound

    return 2.0 * same_function_bound(shape) * max_logit + 2.0 * tolerance(np.float32, shape.tokens + shape.vocab) * loss


def _check_logits(shape: StepShape, files: Mapping[str, Path]) -> dict[str, Any]:
    """Hold every side's starting logits to lora-ref's; RuntimeError when one differs by more
    than float32 rounding allows (then the sides do not compute the same function)."""
    import numpy as np

    from .suites import same_function_bound

    bound = same_function_bound(shape)
    base_name = "lora-ref" if "lora-ref" in files else next(iter(files))
    base = np.load(files[base_name]).astype(np.float64)
    scale = float(np.max(np.abs(base)))
    out: dict[str, Any] = {"against": base_name, "bound": bound, "max_abs_logit": scale, "relative_difference": {}}
    for name, path in files.items():
        if name == base_name:
            continue
        rel = float(np.max(np.abs(np.load(path).astype(np.float64) - base)) / scale)
        out["relative_difference"][name] = rel
        if not rel <= bound:
            raise RuntimeError(f"{name} and {base_name} do not start from the same logits: relative difference "
                               f"{rel:.3g} > bound {bound:.3g}; the comparison would be meaningless")
    return out


def compare(configs: Mapping[str, StepShape], sides: Sequence[str], *, rounds: int, warmup: int, steps: int,
            cpus: int | None = None, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Time every side of ``sides`` on every config in fresh processes, ``rounds`` rounds in
    rotating order; return one JSON-ready entry per config (see :func:`_entry`). A side whose
    worker fails is recorded with the error and left out of later rounds."""
    if rounds < 1 or steps < 1 or warmup < 0:
        raise ValueError(f"rounds and steps must be >= 1 and warmup >= 0, got {rounds}, {steps}, {warmup}")
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {size: {s: [] for s in sides} for size in configs}
    failed: dict[str, dict[str, str]] = {size: {} for size in configs}
    checks: dict[str, dict[str, Any]] = {}
    common = ["--warmup", str(warmup), "--steps", str(steps)] + ([] if cpus is None else ["--cpus", str(cpus)])
    with tempfile.TemporaryDirectory(prefix="lora-ref-bench-logits-") as tmp:
        for i in range(rounds):
            k = i % len(sides)
            order = list(sides[k:]) + list(sides[:k])
            for size in configs:
                files = {}
                for side in order:
                    if side in failed[size]:
                        continue
                    args = ["step", "--lib", side, "--config", size, *common]
                    if i == 0:
                        files[side] = Path(tmp) / f"{size}-{side}.npy"
                        args += ["--logits", str(files[side])]
                    log(f"round {i + 1}/{rounds}, {size}: {side}")
                    try:
                        runs[size][side].append(run_worker(args))
                    except WorkerError as exc:
                        failed[size][side] = str(exc)
                        files.pop(side, None)
                        log(f"  failed: {str(exc).splitlines()[0]}")
                if i == 0:
                    checks[size] = _check_logits(configs[size], files) if len(files) > 1 else {}
    return [_entry(size, shape, runs[size], failed[size], checks[size]) for size, shape in configs.items()]


def _entry(size: str, shape: StepShape, runs: Mapping[str, list[dict[str, Any]]], failed: Mapping[str, str],
           check: dict[str, Any]) -> dict[str, Any]:
    """One config's results: per side its rounds and summary, the per-round ratios, FLOP/s."""
    from .suites import shape_dict

    flops = step_flops(shape)
    sides: dict[str, Any] = {}
    for side, rs in runs.items():
        if not rs:
            if side in failed:
                sides[side] = {"not_measured": f"not measured: the worker failed: {failed[side]}"}
            continue
        medians = [r["median_s"] for r in rs]
        summary: dict[str, Any] = {
            "median_s": statistics.median(medians), "round_medians_s": medians,
            "min_s": min(r["min_s"] for r in rs), "max_s": max(r["max_s"] for r in rs),
            "first_step_s": [r["first_step_s"] for r in rs], "initial_loss": [r["initial_loss"] for r in rs],
            "rounds": rs,
        }
        if side == "torch-compile":
            # the first step compiles (forward and backward graphs); what it took beyond a step
            summary["compile_s"] = [r["first_step_s"] - r["median_s"] for r in rs]
        count = flops["full_step"] if side.endswith("-full") else flops["lora_step"]
        summary["gflops"] = count / summary["median_s"] / 1e9
        sides[side] = summary
    ratios = {}
    for a, b in RATIOS:
        if a in sides and b in sides and "round_medians_s" in sides[a] and "round_medians_s" in sides[b]:
            n = min(len(sides[a]["round_medians_s"]), len(sides[b]["round_medians_s"]))
            ratios[f"{a}/{b}"] = paired_ratio(sides[a]["round_medians_s"][:n], sides[b]["round_medians_s"][:n])
    # every round's starting loss, held to lora-ref's (the logits were held in round 0)
    losses = [loss for s in sides.values() for loss in s.get("initial_loss", [])]
    if losses and check:
        spread = max(losses) - min(losses)
        check["initial_loss_spread"] = spread
        check["initial_loss_bound"] = _loss_bound(shape, check["max_abs_logit"], max(abs(v) for v in losses))
        check["initial_losses_agree"] = spread <= check["initial_loss_bound"]
    return {"size": size, "family": shape.family, "label": shape.label, "shape": shape_dict(shape), "flops": flops,
            "params": param_counts(shape), "sides": sides, "ratios": ratios, "same_function": check}
