"""The demo's building blocks that other commands reuse (``lora-ref combine``) are public, with
stable names, validated arguments and docstrings; nothing imports the demo's private names."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from transformer_ref.demo import experiment
from transformer_ref.demo.experiment import QUICK, Setup, cpu_name, make_setup, pretrain, run_rng, versions

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "transformer_ref" / "demo"


def test_the_shared_steps_are_public():
    for name in ("Setup", "make_setup", "pretrain", "run_rng", "versions", "cpu_name"):
        assert name in experiment.__all__, name
        assert getattr(experiment, name).__doc__, name


def test_no_module_imports_a_private_name_of_the_experiment():
    """combination.py used to import ``_setup``, ``_pretrain``, ``_run_rng`` and ``_versions``."""
    for path in sorted(DEMO.glob("*.py")) + sorted((ROOT / "lora_ref").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").endswith("experiment"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{path.name} imports {private} from the experiment"


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
    (lambda: pretrain(QUICK), TypeError, "setup must be a transformer_ref.demo.experiment.Setup"),
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
