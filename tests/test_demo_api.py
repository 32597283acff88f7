"""The demo's building blocks that other commands reuse (``lora-ref combine``) are public, with
stable names, validated arguments and docstrings (transformer_ref.demo.common); nothing imports
the private names of another module of the demo's steps, and each shared function exists once."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from transformer_ref.demo import common
from transformer_ref.demo.common import QUICK, Setup, cpu_name, make_setup, pretrain, run_rng, second_task, versions

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "transformer_ref" / "demo"


STEPS = ("common", "experiment", "runs", "analysis", "quantised", "two_tasks")


def test_the_shared_steps_are_public():
    for name in ("Setup", "make_setup", "pretrain", "run_rng", "second_task", "versions", "cpu_name"):
        assert name in common.__all__, name
        assert getattr(common, name).__doc__, name


def test_no_module_imports_a_private_name_of_the_experiments_steps():
    """combination.py used to import ``_setup``, ``_pretrain``, ``_run_rng`` and ``_versions``."""
    for path in sorted(DEMO.glob("*.py")) + sorted((ROOT / "lora_ref").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            module = node.module or ""
            in_demo = (node.level == 1 and path.parent == DEMO) or module.startswith("transformer_ref.demo.")
            if in_demo and module.rpartition(".")[2] in STEPS:
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{path.name} imports {private} from {module}"


def test_each_shared_function_is_defined_once():
    """combination.py had its own cpu_name and its own second task; both live in common.py now."""
    defined: dict[str, list[str]] = {}
    for path in sorted(DEMO.glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
                defined.setdefault(node.name, []).append(path.name)
    for name in ("cpu_name", "second_task", "versions", "run_rng", "make_setup", "pretrain"):
        assert defined[name] == ["common.py"], (name, defined[name])


def test_run_rng_is_a_function_of_seed_and_name():
    a, b = run_rng(0, "lora-qv-r8").standard_normal(4), run_rng(0, "lora-qv-r8").standard_normal(4)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, run_rng(0, "lora-qv-r64").standard_normal(4))
    assert not np.array_equal(a, run_rng(1, "lora-qv-r8").standard_normal(4))


@pytest.mark.parametrize("call, error, message", [
    (lambda: run_rng(-1, "x"), ValueError, "seed must be a non-negative int, got -1"),
    (lambda: run_rng(0, 3), TypeError, "key must be a str"),
    (lambda: make_setup({"n_embd": 32}), TypeError, "config must be a transformer_ref.demo.DemoConfig, got dict"),
    (lambda: make_setup(QUICK, progress="yes"), TypeError, "progress must be True, False or None"),
    (lambda: pretrain(QUICK), TypeError, "setup must be a transformer_ref.demo.common.Setup"),
    (lambda: second_task(QUICK), TypeError, "setup must be a transformer_ref.demo.common.Setup"),
])
def test_bad_arguments_are_named(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_make_setup_and_versions():
    setup = make_setup(QUICK, progress=False)
    assert isinstance(setup, Setup) and setup.config is QUICK and not setup.show
    assert setup.gpt.n_layer == QUICK.n_layer and setup.downstream.n_symbols == QUICK.n_symbols
    v = versions()
    assert v["cpu"] == cpu_name() and cpu_name().strip() == cpu_name() != ""
    assert {"python", "lora-ref", "numpy", "blas", "platform"} <= set(v)


def test_the_second_task_swaps_other_symbols_of_the_same_cipher():
    setup = make_setup(QUICK, progress=False)
    b = second_task(setup)
    a, pre = setup.downstream, setup.pretraining
    assert not set(a.changed) & set(b.changed) and len(b.changed) == 2 * QUICK.n_swaps
    # the same cipher but on b's swapped symbols, which exchange their outputs in pairs
    assert [s for s in range(pre.n_symbols) if b.cipher[s] != pre.cipher[s]] == list(b.changed)
    assert sorted(b.cipher[s] for s in b.changed) == sorted(pre.cipher[s] for s in b.changed)
    assert second_task(setup) == b                                   # a function of the setup
