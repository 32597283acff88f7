"""Issue 11, item 17: docs/reproduction.md cannot say what its results do not.

The page's results part is generated (:mod:`transformer_ref.demo.reproduction`) from three
committed ``results.json`` files, docs/reproduction/{default,quick,llama}.json. Float32 training
differs in its last bits across CPUs and core counts, so the committed page is held to those
files, byte for byte, not to a fresh run. What is checked:

* the committed section IS ``render_section`` of the committed results, and those results are
  what the commands the page names write (their configurations are the presets);
* every number in the section's discussion is a cell of its tables or a number its terminal
  output prints (or a paper constant, or a small count), so prose cannot contradict a table;
* the hand-written rest of the page quotes no measured number (only the presets' settings and
  references to the paper);
* a fresh ``lora-ref demo --quick`` renders a section of the same structure that passes the same
  prose check, and ``update_page`` writes it into a copy of docs/;
* ``lora-ref demo --help`` states run times that the committed runs fall within.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from lora_ref.cli import main
from lora_ref.commands import demo as demo_command
from transformer_ref import demo
from transformer_ref.demo import common
from transformer_ref.demo.reproduction import BEGIN, END, NAMES, render_section, replace_section, update_page

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGE = DOCS / "reproduction.md"
COMMANDS = {"default": "lora-ref demo --seed 0", "quick": "lora-ref demo --quick --seed 0",
            "llama": "lora-ref demo --model llama --seed 0"}
PRESETS = {"default": demo.DEFAULT, "quick": demo.QUICK, "llama": replace(demo.DEFAULT, family="llama")}
HEADINGS = ["## What the default run shows, and what it does not", "## The terminal output", "## The default run's report"]
# Numbers the discussion may quote that are not results: the paper's (Figure 3's phi(1,1) above 0.5;
# Table 7's factors 21.5 and 1.9 and norms 6.91, 3.57, 61.95; GPT-3's width 12,288).
PAPER = {"0.5", "21.5", "1.9", "6.91", "3.57", "61.95", "12,288"}
NUMBER = re.compile(r"(?<![\w.])\d+(?:,\d{3})*(?:\.\d+)?(?:e[-+]?\d+)?%?(?!\w)")


def committed() -> dict:
    return {name: json.loads((DOCS / "reproduction" / f"{name}.json").read_text()) for name in NAMES}


def section_of(page: str) -> str:
    assert page.count(BEGIN) == 1 and page.count(END) == 1, "the page must hold the generated section's markers once"
    return page.split(BEGIN)[1].split(END)[0].removeprefix("\n")


def parts(text: str) -> dict[str, list[str]]:
    """Lines of ``text`` by kind: ``tables`` (rows), ``code`` (inside fences), ``headings``,
    ``quotes`` (the provenance), ``prose`` (the rest, figure links left out)."""
    out: dict[str, list[str]] = {"tables": [], "code": [], "headings": [], "quotes": [], "prose": []}
    fenced = False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
            continue
        kind = ("code" if fenced else "tables" if line.startswith("|") else "headings" if line.startswith("#")
                else "quotes" if line.startswith(">") else "prose" if line.strip() and not line.startswith("![") else None)
        if kind:
            out[kind].append(line)
    return out


def unsupported_numbers(section: str) -> list[str]:
    """Numbers in the discussion (the section up to its terminal output) that are neither a token of
    the section's tables, code blocks or headings, nor a paper constant, nor a small count (< 20)."""
    discussion = section.split(HEADINGS[1])[0]
    p = parts(section)
    shown = set(NUMBER.findall("\n".join(p["tables"] + p["code"] + p["headings"])))
    return [n for n in NUMBER.findall("\n".join(parts(discussion)["prose"]))
            if n not in shown and n not in PAPER and not (n.isdigit() and int(n) < 20)]


# ----------------------------------------------------------------------------------------------
# The committed page and its committed results
# ----------------------------------------------------------------------------------------------


def test_the_committed_section_is_generated_from_the_committed_results():
    assert section_of(PAGE.read_text()) == render_section(committed()), (
        "docs/reproduction.md's results section differs from what docs/reproduction/*.json give: "
        "run `python -m transformer_ref.demo.reproduction` from the repository root")


@pytest.mark.parametrize("name", NAMES)
def test_the_committed_results_are_what_the_named_commands_write(name):
    result = committed()[name]
    assert result["config"] == PRESETS[name].to_dict()
    assert f"`{COMMANDS[name]}`" in section_of(PAGE.read_text())
    # the page says which CPU and software produced them
    v = result["versions"]
    assert v["cpu"] and v["platform"] and "blas_threads" in v
    provenance = parts(section_of(PAGE.read_text()))["quotes"][0]
    if name == "default":
        for text in (v["cpu"], v["platform"], v["numpy"], v["blas"], v["blas_threads"]):
            assert text in provenance, text


def test_the_discussion_quotes_only_numbers_its_tables_show():
    section = section_of(PAGE.read_text())
    assert [h for h in parts(section)["headings"] if h.startswith("## ")] == HEADINGS
    assert unsupported_numbers(section) == []


def test_the_prose_check_catches_a_typed_number():
    section = section_of(PAGE.read_text())
    tampered = section.replace("**Memory.** The measured counts", "**Memory.** In 7,777 of 0.1234 cases the measured counts")
    assert unsupported_numbers(tampered) == ["7,777", "0.1234"]


def allowed_in_hand_written_prose() -> set[str]:
    """The presets' settings, the CLI's defaults shown in the option table, and the paper's references."""
    values = set()
    for preset in (demo.DEFAULT, demo.QUICK):
        for v in preset.to_dict().values():
            for x in (v if isinstance(v, list) else [v]):
                if isinstance(x, (int, float)) and not isinstance(x, bool):
                    values.add(f"{x:g}" if isinstance(x, float) else str(x))
    values |= {str(2 * demo.DEFAULT.n_swaps)}                    # "the four re-routed symbols" as a count
    paper = {"2021", "3", "4", "5", "6", "7", "5.1", "7.3"}     # the year, Tables 3/5/6/7, Figure 3, Eq. 4, Sections
    return values | paper | {"0", "1", "2"}                       # CLI defaults: seed 0, 1 thread, --threads 2


def test_the_hand_written_part_quotes_no_measured_number():
    page = PAGE.read_text()
    hand = page.split(BEGIN)[0]
    prose = "\n".join(parts(hand)["prose"] + parts(hand)["tables"] + parts(hand)["headings"])
    # words like LLaMA-3, 8C/3 and 4C are names and sizes of architectures, not results
    prose = re.sub(r"LLaMA-3|8C/3|4C\b|C x C", "", prose)
    extra = sorted(set(NUMBER.findall(prose)) - allowed_in_hand_written_prose())
    assert extra == [], f"numbers in the hand-written part of docs/reproduction.md that no command there writes: {extra}"


# ----------------------------------------------------------------------------------------------
# A fresh --quick run renders a section of the same structure
# ----------------------------------------------------------------------------------------------

TINY_LLAMA = demo.DemoConfig(n_embd=32, n_layer=1, n_head=2, n_symbols=8, length=4, n_swaps=1, pretrain_steps=20,
                             finetune_steps=8, batch_size=8, ranks=(1, 2, 4, 8, 16), phi_ranks=(8, 16),
                             amplification_ranks=(4, 16), eval_examples=32, n_random=4, family="llama")


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """``lora-ref demo --quick`` (the preset as it is) and a tiny LLaMA run, in folders as the commands write them."""
    base = tmp_path_factory.mktemp("page")
    assert main(["demo", "--quick", "--out", str(base / "quick"), "--no-progress"]) == 0
    demo.run_demo(TINY_LLAMA, base / "llama", progress=False)
    return base


def test_a_fresh_quick_run_renders_a_section_of_the_same_structure(fresh, capsys):
    capsys.readouterr()
    quick = json.loads((fresh / "quick" / "results.json").read_text())
    llama = json.loads((fresh / "llama" / "results.json").read_text())
    section = render_section({"default": quick, "quick": quick, "llama": llama})
    p = parts(section)
    assert [h for h in p["headings"] if h.startswith("## ")] == HEADINGS
    assert len(p["quotes"]) == 1 and quick["versions"]["cpu"] in p["quotes"][0]
    # the three terminal outputs, each headed by the command that reproduces it
    assert section.count("```text\n$ ") == len(NAMES)
    assert "```text\n$ lora-ref demo --quick --seed 0\nlora-ref demo: GPT" in section
    assert "$ python -c" in section and "family='llama'" in section          # a configuration no preset has
    # the embedded report: its sections one level down, every run in its table
    assert "\n### Findings\n" in section and "\n## Findings" not in section
    for row in quick["runs"].values():
        assert f"| {row['label']} |" in section
    assert unsupported_numbers(section) == []


def test_update_page_writes_the_section_and_copies_the_results(fresh, tmp_path):
    docs = tmp_path / "docs"
    (docs / "figures").mkdir(parents=True)
    shutil.copyfile(PAGE, docs / "reproduction.md")
    runs = {"default": fresh / "quick", "quick": fresh / "quick", "llama": fresh / "llama"}
    with pytest.raises(ValueError, match="must be a GPT-2 run, got 'llama'"):
        update_page(docs, {**runs, "default": fresh / "llama"})
    update_page(docs, runs)
    results = {n: json.loads((docs / "reproduction" / f"{n}.json").read_text()) for n in NAMES}
    assert results["quick"] == json.loads((fresh / "quick" / "results.json").read_text())
    page = (docs / "reproduction.md").read_text()
    assert section_of(page) == render_section(results)
    assert page.split(BEGIN)[0] == PAGE.read_text().split(BEGIN)[0]             # the hand-written part kept
    assert sorted(p.name for p in (docs / "figures").glob("*.png")) == sorted(results["default"]["figures"])


def test_bad_input_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="markers"):
        replace_section("# a page without markers\n", "x")
    with pytest.raises(ValueError, match="results must map exactly"):
        render_section({"default": {}})
    with pytest.raises(FileNotFoundError, match="reproduction.md"):
        update_page(tmp_path)
    with pytest.raises(ValueError, match="runs must name the output folders of exactly"):
        update_page(DOCS, {"default": tmp_path})


# ----------------------------------------------------------------------------------------------
# Run times: the help text and the committed runs agree
# ----------------------------------------------------------------------------------------------


def preset_doc(name: str) -> str:
    """The docstring under DEFAULT or QUICK in common.py (Python keeps no attribute docstrings)."""
    after = Path(common.__file__).read_text().split(f"\n{name.upper()} = ", 1)[1]
    return " ".join(after.split('"""')[1].split())


@pytest.mark.parametrize("name", ["default", "quick"])
def test_the_help_states_run_times_the_committed_runs_fall_within(name):
    lo, hi = demo_command.RUN_TIMES[name]
    timing = committed()[name]["timing"]
    assert lo <= timing["total_s"] + timing["report_s"] <= hi, (name, timing)
    parser = argparse.ArgumentParser()
    demo_command.add_arguments(parser)
    text = demo_command.run_time_text(name)
    assert text in " ".join(parser.format_help().split())           # lora-ref demo --help
    assert text in preset_doc(name)                                  # the preset's own docstring
    with pytest.raises(ValueError, match="name must be one of 'default', 'quick', got 'llama'"):
        demo_command.run_time_text("llama")


def test_the_readme_states_the_same_run_times():
    """The README's opening paragraph quotes both presets' run times (typeset with an en dash):
    the same ranges as RUN_TIMES, so the README, the help and the docstrings cannot disagree."""
    readme = " ".join((Path(__file__).parents[1] / "README.md").read_text().split())
    for name, flag in (("default", "on 2 CPU cores"), ("quick", "`lora-ref demo --quick` takes")):
        lo, hi = demo_command.RUN_TIMES[name]
        quoted = f"{lo}\u2013{hi} s"
        assert quoted in readme, (name, quoted)
        assert (f"({quoted} {flag}" if name == "default" else f"{flag} {quoted}") in readme, (name, flag)
