"""Every Python code block in docs/*.md and README.md runs, and its shown output is checked.

Rules for writing docs (so that examples cannot rot):
* Each fenced ```python block runs, in page order, in one namespace per page, with the working
  directory set to a fresh temporary folder.
* A fenced ```output block right after a python block is that block's expected standard output,
  compared exactly (print rounded numbers, not raw floats).
* A block fenced ```python needs:torch (several: ```python needs:torch needs:peft) runs only when
  those packages import; without them it and its output are skipped, the rest of the page still
  runs, and the page's test reports a skip naming them. So the suite passes with only the test
  extra installed (``pip install -e ".[test]"``), as the README promises. Later blocks must not
  depend on such a block.
* A block fenced ```python no-run is shown but not run (for code that cannot run here at all).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import io
import re
import sys
from pathlib import Path

import _pages
import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```\s*$", re.S | re.M)
OPTIONAL = ("torch", "peft", "transformers", "loralib", "bitsandbytes")   # the interop extra


def blocks(page: Path) -> list[tuple[tuple[str, ...], str, str | None]]:
    """(packages the block needs, code, expected output or None) for each python block to run."""
    found = [(m.group(1).split(), m.group(2)) for m in FENCE.finditer(page.read_text())]
    out = []
    for i, (info, body) in enumerate(found):
        if info[:1] == ["python"] and "no-run" not in info:
            unknown = [w for w in info[1:] if not w.startswith("needs:")]
            assert not unknown, f"{page.name}: unknown options {unknown} on a python block"
            expected = found[i + 1][1] if i + 1 < len(found) and found[i + 1][0] == ["output"] else None
            out.append((tuple(w[len("needs:"):] for w in info[1:]), body, expected))
    return out


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


def run_page(page: Path) -> list[str]:
    """Run every block of ``page`` whose packages import (in the current directory); return the
    packages of the blocks skipped for want of them."""
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    missing: list[str] = []
    for n, (needs, code, expected) in enumerate(blocks(page), start=1):
        absent = [name for name in needs if not _importable(name)]
        if absent:
            missing += [name for name in absent if name not in missing]
            continue
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
    return missing


@pytest.mark.parametrize("page", [p for p in PAGES if p.exists()], ids=lambda p: p.name)
def test_page_examples_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    missing = run_page(page)
    if missing:
        pytest.skip(f"{page.name}: every other block ran and matched; the blocks needing "
                    f"{', '.join(missing)} were skipped (not installed)")


class _Hidden(importlib.abc.MetaPathFinder):
    """Makes ``import name`` (and its submodules) fail as for a package that is not installed."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names

    def find_spec(self, fullname, path=None, target=None):
        if any(fullname == n or fullname.startswith(n + ".") for n in self.names):
            raise ModuleNotFoundError(f"No module named {fullname!r} (hidden by the test)", name=fullname)
        return None


def _hide(monkeypatch: pytest.MonkeyPatch, names: tuple[str, ...]) -> None:
    """Uninstall ``names`` for this test, as far as imports can tell. Not ``sys.modules[n] = None``:
    libraries that look a package up in sys.modules (array_api_compat asks for ``torch.Tensor``
    there) would then find None instead of nothing."""
    for key in [k for k in sys.modules if any(k == n or k.startswith(n + ".") for n in names)]:
        monkeypatch.delitem(sys.modules, key)
    monkeypatch.setattr(sys, "meta_path", [_Hidden(tuple(names)), *sys.meta_path])


def _mentions_optional(page: Path) -> bool:
    code = "\n".join(body for _, body, _ in blocks(page))
    return any(re.search(rf"\b{name}\b", code) for name in OPTIONAL)


@pytest.mark.parametrize("page", [p for p in PAGES if p.exists() and _mentions_optional(p)], ids=lambda p: p.name)
def test_pages_pass_or_skip_without_the_interop_packages(page: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # Issue 11, item 16: with only the test extra, docs/oracle.md's PyTorch consumer failed the suite.
    _hide(monkeypatch, (*OPTIONAL, "safetensors.torch"))
    monkeypatch.chdir(tmp_path)
    missing = run_page(page)
    assert set(missing) <= set(OPTIONAL)


def test_the_oracle_page_skips_its_torch_block_without_torch(tmp_path, monkeypatch):
    _hide(monkeypatch, ("torch", "safetensors.torch"))
    page = ROOT / "docs" / "oracle.md"
    with pytest.raises(pytest.skip.Exception, match=r"oracle\.md: every other block ran .*needing torch were skipped"):
        test_page_examples_run(page, tmp_path, monkeypatch)


MEASURED = re.compile(r"(?<![\w.])(\d+\.\d+e[-+]?\d+|\d+e[-+]\d+|\d+\.\d{3,}|\d+(?:\.\d+)?%)(?![\w.])")
"""Numbers that look measured: scientific notation, three or more decimals, percentages."""


TEST_FILE = re.compile(r"(?<![\w/])tests/[\w/]+\.py\b")


def pinned_text_blocks(name: str) -> list[str]:
    """The ```text blocks of docs/<name> that a test holds the page to: each right after a ```bash
    block running pytest on test files that print their measured lines through
    ``assert_page_shows`` with this page (that function fails unless the page shows each line
    verbatim), e.g. docs/embedding.md's PEFT measurements."""
    fenced = [(m.group(1).split(), m.group(2)) for m in FENCE.finditer((ROOT / "docs" / name).read_text())]
    out = []
    for (before, command), (info, body) in zip(fenced, fenced[1:]):
        if info != ["text"] or before != ["bash"] or "pytest" not in command:
            continue
        files = [ROOT / f for f in TEST_FILE.findall(command)]
        if files and all(f.is_file() and "assert_page_shows(" in f.read_text() and name in f.read_text() for f in files):
            out.append(body)
    return out


@pytest.mark.parametrize("name", ["embedding.md", "conv.md"])
def test_measured_lines_on_the_page_are_pinned_by_the_tests_that_print_them(name):
    # Issue 14/15 audit: docs/embedding.md's PEFT measurements (plain-text blocks) were checked by
    # nothing and one line had drifted. Each such block now follows the command that prints it, and
    # that test fails unless the page shows every line it prints verbatim.
    fenced = [(m.group(1).split(), m.group(2)) for m in FENCE.finditer((ROOT / "docs" / name).read_text())]
    text_blocks = [body for info, body in fenced if info == ["text"]]
    assert text_blocks, f"{name} has no measured text block: drop it from this test"
    unpinned = [body for body in text_blocks if body not in pinned_text_blocks(name)]
    assert not unpinned, (f"{name}: these text blocks do not follow a ```bash block running pytest on test files that "
                          f"print their lines through assert_page_shows({name!r}...):\n" + "\n".join(unpinned))


@pytest.mark.parametrize("name", ["math.md", "oracle.md", "files.md", "embedding.md", "conv.md"])
def test_prose_quotes_only_numbers_the_page_prints(name):
    # Issue 11, item 17: docs/math.md's prose and table quoted merge drifts that its own code no
    # longer gave. A measured-looking number outside the code blocks must appear in an output block
    # (or in a text block a test pins line by line, pinned_text_blocks).
    text = (ROOT / "docs" / name).read_text()
    fenced = [(m.group(1).split(), m.group(2)) for m in FENCE.finditer(text)]
    printed = "\n".join([body for info, body in fenced if info == ["output"]] + pinned_text_blocks(name))
    prose = re.sub(r"arXiv[ /:]*\d{4}\.\d{4,5}|\(https?://[^)]*\)", "", FENCE.sub("", text))   # citations
    quoted = [n for n in MEASURED.findall(prose) if n not in printed and n.rstrip("%") not in printed]
    assert not quoted, f"{name} quotes numbers that no output block (nor test-pinned text block) prints: {quoted}"


def test_the_page_check_masks_only_roundoff_figures():
    """_pages.assert_page_shows lets roundoff-level figures differ (CPU-dependent last digits, bounded by the
    test itself) and nothing else: a changed real difference still fails."""
    a = "[x] merged: max |diff| 1.15e-14, relative 2.16e-15, error/bound 1.11e-03; moves 5.1788 of 5.3506"
    assert _pages.roundoff_masked(a) == _pages.roundoff_masked(a.replace("1.15e-14", "9.87e-15").replace("1.11e-03", "9.53e-04"))
    assert _pages.roundoff_masked(a) != _pages.roundoff_masked(a.replace("5.1788", "5.1789"))
    assert _pages.roundoff_masked("margin 4.23e+13") == "margin 4.23e+13"
