"""The house rules, checked on the source: three floors, imports point only down (README.md's
"Layout" and docs/index.md's "The code, in reading order" describe the floors).

* floor 1, ``lora_ref`` (all but ``lora_ref/commands/``), never imports ``transformer_ref``;
  the CLI's commands may, lazily, inside the command;
* floor 2, ``transformer_ref``, never imports the CLI (``lora_ref.commands``, ``lora_ref.cli``)
  nor the demo (``transformer_ref.demo``), which is floor 3; only the demo itself imports the demo;
* hypothesis is a test extra: in ``lora_ref`` only ``strategies.py`` imports it;
* no file under ``lora_ref/`` or ``transformer_ref/`` exceeds 600 lines;
* no run of six significant lines stands twice in the two packages (see :func:`repeated_runs`).

Every ``import`` statement counts, at module level or inside a function.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 600
RUN = 6                                # issue 10: "no block of six or more lines stands twice"


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _name(path: Path) -> str:
    """lora_ref/commands/audit.py -> lora_ref.commands.audit; a package's __init__ -> the package."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> dict[str, int]:
    """Every module ``path`` imports, as an absolute dotted name -> the first line importing it.

    ``from a.b import c`` counts as importing ``a.b`` and ``a.b.c`` (c may be a submodule);
    relative imports are resolved against the file's package.
    """
    module = _name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module
            names = [stem] + [f"{stem}.{alias.name}" for alias in node.names if alias.name != "*"]
        else:
            continue
        for name in names:
            found.setdefault(name, node.lineno)
    return found


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _violations(files: list[Path], forbidden: tuple[str, ...]) -> list[str]:
    return [f"{path.relative_to(ROOT)}:{line} imports {name}"
            for path in files for name, line in imports(path).items()
            if any(_within(name, f) for f in forbidden)]


def test_the_import_parser_sees_every_form(tmp_path, monkeypatch):
    pkg = tmp_path / "lora_ref" / "commands"
    pkg.mkdir(parents=True)
    (pkg / "x.py").write_text("import a.b\nfrom .. import lora\nfrom ..config import C\n"
                              "def f():\n    from transformer_ref.demo import run\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    found = imports(pkg / "x.py")
    assert {"a.b", "lora_ref", "lora_ref.lora", "lora_ref.config", "lora_ref.config.C",
            "transformer_ref.demo", "transformer_ref.demo.run"} <= set(found)
    assert found["transformer_ref.demo"] == 5
    assert _violations([pkg / "x.py"], ("transformer_ref",)) == [
        "lora_ref/commands/x.py:5 imports transformer_ref.demo", "lora_ref/commands/x.py:5 imports transformer_ref.demo.run"]


def test_floor_one_never_imports_the_transformer():
    files = [p for p in _modules("lora_ref") if not _within(_name(p), "lora_ref.commands")]
    assert files, "no lora_ref modules found"
    bad = _violations(files, ("transformer_ref",))
    assert not bad, "lora_ref (floor 1) imports transformer_ref (floor 2); only lora_ref/commands/ may, " \
                    "lazily:\n" + "\n".join(bad)


def test_floor_two_never_imports_the_cli_or_the_demo():
    files = [p for p in _modules("transformer_ref") if not _within(_name(p), "transformer_ref.demo")]
    assert files, "no transformer_ref modules found"
    bad = _violations(files, ("lora_ref.commands", "lora_ref.cli", "transformer_ref.demo"))
    assert not bad, "transformer_ref (floor 2) imports floor 3:\n" + "\n".join(bad)


def test_hypothesis_is_imported_only_by_the_strategies():
    bad = [v for v in _violations(_modules("lora_ref"), ("hypothesis",)) if not v.startswith("lora_ref/strategies.py:")]
    assert not bad, "hypothesis is a test extra; only lora_ref/strategies.py may import it:\n" + "\n".join(bad)


@pytest.mark.parametrize("package", ["lora_ref", "transformer_ref"])
def test_no_file_exceeds_600_lines(package):
    long = {str(p.relative_to(ROOT)): n for p in _modules(package)
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines (split them by job): {long}"


def test_the_cli_imports_nothing_heavy():
    code = ("import sys, lora_ref.cli\n"
            "print(sorted(m for m in ('transformer_ref', 'matplotlib', 'hypothesis', 'scipy.linalg') "
            "if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "[]\n", f"`import lora_ref.cli` imports {out.stdout.strip()}: command modules must " \
                                 "import their heavy dependencies inside run()"


# --------------------------------------------------------------------------------------------
# Nothing written twice: no run of six significant lines stands twice in the two packages
# --------------------------------------------------------------------------------------------

_TRIVIAL = re.compile(r"""[\s()\[\]{},:;'"\\]*""")      # only brackets, quotes and punctuation


def significant_lines(text: str, name: str = "<text>") -> list[tuple[int, str]]:
    """(line number, stripped line) of each line that says something: not blank, not a comment,
    not only brackets, quotes and punctuation (``)``, ``],``, a docstring's closing quotes), not
    part of an ``import`` statement (found by ``ast``, so a parenthesised import's name lines are
    skipped too: two files importing the same names is not code written twice)."""
    in_imports = set()
    for node in ast.walk(ast.parse(text, name)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            in_imports.update(range(node.lineno, node.end_lineno + 1))
    return [(n, s) for n, line in enumerate(text.splitlines(), 1)
            if n not in in_imports and (s := line.strip()) and not s.startswith("#") and not _TRIVIAL.fullmatch(s)]


def repeated_runs(files: list[Path], run: int = RUN) -> list[str]:
    """Each place where ``run`` consecutive significant lines (:func:`significant_lines`; the lines
    skipped between them do not break a run) stand twice, in one file or two, as
    ``"a.py:first-last == b.py:first-last"``, overlapping windows merged into the longest run."""
    lines = {path: significant_lines(path.read_text(), str(path)) for path in files}
    where = defaultdict(list)                            # the run's text -> [(path, index of its first line)]
    for path, found in lines.items():
        for i in range(len(found) - run + 1):
            where[tuple(s for _, s in found[i:i + run])].append((path, i))
    pairs = {(a, b) for places in where.values() for k, a in enumerate(places) for b in places[k + 1:]}
    out = []
    for (fa, i), (fb, j) in sorted(pairs, key=str):
        if ((fa, i - 1), (fb, j - 1)) in pairs:          # not the start of its run: reported with it
            continue
        k = 0
        while ((fa, i + k + 1), (fb, j + k + 1)) in pairs:
            k += 1
        (a0, _), (a1, _), (b0, _), (b1, _) = lines[fa][i], lines[fa][i + k + run - 1], lines[fb][j], lines[fb][j + k + run - 1]
        out.append(f"{fa.relative_to(ROOT)}:{a0}-{a1} == {fb.relative_to(ROOT)}:{b0}-{b1}")
    return out


def test_the_repeat_scanner_finds_a_copied_block(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    body = ("def f(x):\n    a = x + 1\n    # a comment\n\n    b = a * 2\n    c = b - 3\n"
            "    d = c / 4\n    return (\n        d\n    )\n")
    assert significant_lines(body) == [(1, "def f(x):"), (2, "a = x + 1"), (5, "b = a * 2"), (6, "c = b - 3"),
                                       (7, "d = c / 4"), (8, "return ("), (9, "d")]
    (tmp_path / "a.py").write_text(body)
    (tmp_path / "b.py").write_text("from os import (\n    path,\n)\n" + body.replace("def f", "def g"))
    assert repeated_runs([tmp_path / "a.py", tmp_path / "b.py"]) == ["a.py:2-9 == b.py:5-12"]   # 6 lines, 2 to 9
    (tmp_path / "b.py").write_text(body.replace("c = b - 3", "c = b - 4"))                   # one line differs
    assert repeated_runs([tmp_path / "a.py", tmp_path / "b.py"]) == []
    (tmp_path / "a.py").write_text(body + body.replace("def f", "def g"))                    # twice in one file
    assert repeated_runs([tmp_path / "a.py"]) == ["a.py:2-9 == a.py:12-19"]


def test_no_block_of_six_lines_stands_twice():
    """No exclusions: every repeated run of six significant lines in ``lora_ref/`` and
    ``transformer_ref/`` is a block to write once (a shared function, a loop, a table)."""
    files = _modules("lora_ref") + _modules("transformer_ref")
    assert files, "no modules found"
    repeats = repeated_runs(files)
    assert not repeats, f"blocks of {RUN} or more significant lines written twice (write them once):\n" + \
        "\n".join(repeats)
