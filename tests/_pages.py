"""Measured lines that a docs page quotes, held to the tests that print them.

A test prints each line it measures through :func:`assert_page_shows`, which fails unless the
page shows that line (tests/test_docs.py checks that every such text block on a page is pinned this
way), so a page cannot drift from what its tests measure.
"""

from __future__ import annotations

import re
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"
ROUNDOFF = re.compile(r"\d\.\d+e-\d+")


def roundoff_masked(line: str) -> str:
    """``line`` with its roundoff-level figures (scientific notation with a negative exponent:
    differences at float64 rounding and their error/bound ratios) masked. Their last digits depend
    on the BLAS kernels of the CPU that runs the test; the test holds each to its derived bound with
    assert_within, and the page records what the machine the docs were made on measured. Every
    other number (the differences a library really makes, the margins) must match the page verbatim."""
    return ROUNDOFF.sub("<roundoff>", line)


def assert_page_shows(line: str, name: str, command: str) -> None:
    """Print ``line``, a measured line that docs/``name`` quotes, and assert the page shows it as one
    of its lines (verbatim but for roundoff-level figures, :func:`roundoff_masked`). ``command`` is
    what prints the line, named in the failure so the page can be brought up to date."""
    print("\n" + line)
    shown = (DOCS / name).read_text().splitlines()
    if line not in shown and roundoff_masked(line) not in {roundoff_masked(old) for old in shown}:
        head = re.split(r"\d", line, maxsplit=1)[0]
        was = [old for old in shown if old.startswith(head)] or [f"(no line begins {head!r})"]
        raise AssertionError(f"docs/{name} must show, verbatim, the measured line this test prints now. Run\n"
                             f"    {command}\nand in the page replace\n    " + "\n    ".join(was) +
                             f"\nwith\n    {line}\n(and the prose quoting its numbers)")
