"""``lora-ref audit``: passes on every backend here, fails (exit 1) when the math is broken, exits 2
when the backend cannot run, and needs none of the test extras."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest

import lora_ref.audit as audit
from lora_ref import backend, lora
from lora_ref.cli import main

ROW = re.compile(r"^(?P<check>.+?)\s{2,}(?P<dtype>float64|float32|-)\s+(?P<err>\S+)\s+(?P<tol>\S+)\s+(?P<ok>yes|NO)$")


@pytest.fixture(autouse=True)
def restore_backend():
    saved = dict(backend._state)
    yield
    backend._state.update(saved)


def table_rows(text: str) -> list[dict]:
    return [m.groupdict() for line in text.splitlines() if (m := ROW.match(line))]


def test_audit_passes_on_numpy(capsys):
    backend.set_backend("numpy")
    assert main(["audit"]) == 0
    out = capsys.readouterr().out
    rows = table_rows(out)
    assert out.startswith("lora-ref audit: backend numpy, seed 0")
    assert len(rows) == 29 and all(r["ok"] == "yes" for r in rows)
    assert all(float(r["err"]) <= float(r["tol"]) for r in rows)
    assert {r["dtype"] for r in rows} == {"float64", "float32", "-"}
    assert out.rstrip().endswith("all 29 checks passed")
    # The tolerances printed are the derived ones: e.g. unmerge(merge(W)) is gamma_2 of the dtype.
    unmerge_rows = {r["dtype"]: float(r["tol"]) for r in rows if r["check"] == "unmerge(merge(W)) == W"}
    assert unmerge_rows == {"float64": float(f"{2 * 2.0**-53 / (1 - 2 * 2.0**-53):.2e}"),
                            "float32": float(f"{2 * 2.0**-24 / (1 - 2 * 2.0**-24):.2e}")}


@pytest.mark.parametrize("how", ["env", "flag"])
def test_audit_passes_on_array_api_strict(how, capsys, monkeypatch):
    if how == "env":
        monkeypatch.setitem(backend._state, "name", None)
        monkeypatch.setenv("LORA_REF_BACKEND", "array_api_strict")
        argv = ["audit", "--dtype", "float32"]
    else:
        argv = ["audit", "--dtype", "float32", "--backend", "array_api_strict"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("lora-ref audit: backend array_api_strict")
    assert all(r["ok"] == "yes" for r in table_rows(out)) and "all 15 checks passed" in out


@pytest.mark.gpu
def test_audit_passes_on_cupy(capsys):
    assert main(["audit", "--backend", "cupy"]) == 0
    assert "all 29 checks passed" in capsys.readouterr().out


def test_audit_fails_when_merge_forgets_the_transpose(capsys, monkeypatch):
    # A fan_in_fan_out bug: the delta reshaped to W's stored (d_in, d_out) shape instead of
    # transposed (for a square weight, simply forgetting the transpose). The audit must notice it.
    def bad_merge(W, A, B, scale, *, enable_lora=None, fan_in_fan_out=False):
        delta = lora.delta_weight(A, B, scale, enable_lora)
        return W + (delta.reshape(W.shape) if fan_in_fan_out else delta)

    backend.set_backend("numpy")
    monkeypatch.setattr(audit, "merge", bad_merge)
    assert main(["audit", "--dtype", "float64"]) == 1
    out = capsys.readouterr().out
    failed = {r["check"] for r in table_rows(out) if r["ok"] == "NO"}
    assert "merge: x @ merge(W).T == lora_linear" in failed
    assert re.search(r"\d+ of 16 checks FAILED", out)


def test_audit_fails_on_a_wrong_gradient(capsys, monkeypatch):
    # A VJP for B that forgets the scale s: caught by both gradient checks.
    from autograd.extend import defvjp, primitive

    wrong = primitive(lora.lora_linear.fun)
    defvjp(wrong, lora._vjp_x, lora._vjp_W, lora._vjp_A,
           lambda ans, x, W, A, B, scale, *rest, **kw: lora._vjp_B(ans, x, W, A, B, 1.0, *rest, **kw), None, lora._vjp_bias)
    backend.set_backend("numpy")
    monkeypatch.setattr(audit, "lora_linear", wrong)
    assert main(["audit", "--dtype", "float64"]) == 1
    failed = {r["check"] for r in table_rows(capsys.readouterr().out) if r["ok"] == "NO"}
    assert {"VJPs == autograd.numpy trace (plain)", "VJPs == central differences (x, W, A, B, bias)"} <= failed


def test_audit_fails_on_an_inexact_zero_init(capsys, monkeypatch):
    def tiny_B(d_in, d_out, r, **kw):
        A, B = lora.init_lora(d_in, d_out, r, **kw)
        return A, B + 1e-30                                                 # "almost" zero
    backend.set_backend("numpy")
    monkeypatch.setattr(audit, "init_lora", tiny_B)
    assert main(["audit", "--dtype", "float64"]) == 1
    failed = {r["check"] for r in table_rows(capsys.readouterr().out) if r["ok"] == "NO"}
    assert "zero init: dL/dA == 0 (exact)" in failed


def test_audit_backend_unavailable(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    assert main(["audit", "--backend", "cupy"]) == 2
    assert "backend 'cupy' needs CuPy, which is not installed" in capsys.readouterr().err


def test_audit_unknown_backend_from_env(capsys, monkeypatch):
    monkeypatch.setitem(backend._state, "name", None)
    monkeypatch.setenv("LORA_REF_BACKEND", "jax")
    assert main(["audit"]) == 2
    assert "unknown backend 'jax'; valid backends are numpy, cupy, array_api_strict" in capsys.readouterr().err


def test_audit_rejects_bad_arguments(capsys):
    assert main(["audit", "--cycles", "0"]) == 2
    assert "--cycles must be a positive int, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["audit", "--dtype", "float16"])
    with pytest.raises(ValueError, match=r"dtypes must be among float64, float32, got 'float16'"):
        audit.run_audit(dtypes=("float16",))
    with pytest.raises(ValueError, match=r"cycles must be a positive int, got 0"):
        audit.merge_unmerge_drift(np.ones((2, 2)), np.ones((1, 2)), np.ones((2, 1)), 1.0, 0)


def test_audit_runs_without_the_test_extras():
    # A plain `pip install -e .` has no hypothesis, pytest or array_api_strict: block them.
    code = ("import sys\n"
            "for m in ('hypothesis', 'pytest', 'array_api_strict'): sys.modules[m] = None\n"
            "from lora_ref.cli import main\n"
            "raise SystemExit(main(['audit', '--dtype', 'float32']))\n")
    env = {k: v for k, v in os.environ.items() if k != "LORA_REF_BACKEND"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "all 15 checks passed" in done.stdout


def test_drift_is_within_its_bound():
    rng = np.random.default_rng(0)
    W, A, B = rng.uniform(-1, 1, (12, 10)), rng.uniform(-1, 1, (3, 10)), rng.uniform(-1, 1, (12, 3))
    max_abs, rel, bound = audit.merge_unmerge_drift(W, A, B, 0.7, 20)
    # bound = k gamma_2 (1 + gamma_{2(k-1)}) for k = 20 cycles in float64 (u = 2^-53).
    u = 2.0**-53
    assert bound == 20 * (2 * u / (1 - 2 * u)) * (1 + 38 * u / (1 - 38 * u))
    assert 0 <= rel <= bound and max_abs <= rel * (1 + np.abs(W).max() + 0.7 * (np.abs(B) @ np.abs(A)).max())
