"""Every Python code block in docs/*.md and README.md runs, and its shown output is checked.

Rules for writing docs (so that examples cannot rot):
* Each fenced ```python block runs, in page order, in one namespace per page, with the working
  directory set to a fresh temporary folder.
* A fenced ```output block right after a python block is that block's expected standard output,
  compared exactly (print rounded numbers, not raw floats).
* A block fenced ```python no-run is shown but not run (use it only for code that needs an
  optional package missing here, e.g. PyTorch; say so beside it).
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```\s*$", re.S | re.M)


def blocks(page: Path) -> list[tuple[str, str, str | None]]:
    """(info, code, expected output or None) for each python block of a page."""
    found = [(m.group(1).strip(), m.group(2)) for m in FENCE.finditer(page.read_text())]
    out = []
    for i, (info, body) in enumerate(found):
        if info == "python":
            expected = found[i + 1][1] if i + 1 < len(found) and found[i + 1][0] == "output" else None
            out.append((info, body, expected))
    return out


@pytest.mark.parametrize("page", [p for p in PAGES if p.exists()], ids=lambda p: p.name)
def test_page_examples_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    for n, (_, code, expected) in enumerate(blocks(page), start=1):
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            try:
                exec(compile(code, f"{page.name}[block {n}]", "exec"), namespace)
            except Exception as exc:
                raise AssertionError(f"{page.name}, python block {n} raised {type(exc).__name__}: {exc}\n{code}") from exc
        if expected is not None:
            assert buffer.getvalue() == expected, (
                f"{page.name}, python block {n}: output differs\n--- shown in the docs ---\n{expected}"
                f"--- printed ---\n{buffer.getvalue()}")
