"""The demo's number formats and run selections, shared by the report, its variant sections and
docs/reproduction.md's generator: every number is printed the same way wherever it appears (the
page's tests match the prose's numbers against its tables)."""

from __future__ import annotations

import math
from typing import Any

# The names keep their leading underscore: they are the demo's own helpers, not a public API.


# ============================================================================================
# Number formats and run selections
# ============================================================================================


def _fmt(value: float, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}g}"


def _int(n: int) -> str:
    return f"{n:,}"


def _bytes(n: int) -> str:
    for unit, size in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _list(items: list[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _sweep_keys(result: dict[str, Any]) -> list[str]:
    return [k for k, row in result["runs"].items() if row["group"] == "rank sweep"]


def _lora_keys(result: dict[str, Any]) -> list[str]:
    """Every adapter run: the paper's and the variants (each has a merge check)."""
    return [k for k, row in result["runs"].items() if row["group"] != "full"]


def _paper_keys(result: dict[str, Any]) -> list[str]:
    """The LoRA runs of the paper's Tables 5 and 6: the rank sweep and the equal-budget runs."""
    return [k for k, row in result["runs"].items() if row["group"] in ("rank sweep", "equal budget")]


def _variant_pairs(result: dict[str, Any]) -> list[tuple[str, str]]:
    """``(LoRA run, variant run)`` for each variant compared with a LoRA run (DoRA, QLoRA), in run order."""
    runs = result["runs"]
    return [(row["partner"], k) for k, row in runs.items() if row.get("partner")]


def _merge_ratios(result: dict[str, Any]) -> list[tuple[float, float, str, str]]:
    """``(max_abs_error, bound, dtype, run key)`` of every merge check of every adapter run."""
    runs = result["runs"]
    return [(runs[k]["merge"][d]["max_abs_error"], runs[k]["merge"][d]["bound"], d, k)
            for k in _lora_keys(result) for d in runs[k]["merge"] if isinstance(runs[k]["merge"][d], dict)]


# family -> (short name, architecture, the W that Table 7 projects)
_ARCH = {"gpt2": ("GPT", "GPT-2 architecture", "the q or v rows of `c_attn`"),
         "llama": ("LLaMA", "LLaMA architecture (RMSNorm, RoPE, SwiGLU, untied head)", "`q_proj` or `v_proj`")}


def _family(result: dict[str, Any]) -> str:
    return result["config"].get("family", "gpt2")


def _figure(result: dict[str, Any], name: str, caption: str) -> list[str]:
    """The Markdown link of a figure, if the run wrote it."""
    return [f"![{caption}](figures/{name})", ""] if name in result.get("figures", []) else []


