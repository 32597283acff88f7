"""Golden vectors, format v2: written, read back, deterministic, right, and able to fail every
mutant of their kinds; format v1 refused by name.

The linear expected values are checked against a second implementation written here in
autograd.numpy (a dense delta, scattered block by block for fused layers, differentiated by
autograd), so the vectors do not merely repeat lora_ref.lora_linear's own code path; the other
kinds' expected values are the kit's references, which tests/test_kit_*.py hold to independent
implementations (lora_ref.kit.mutants.CORRECT), run here on the files."""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import replace
from pathlib import Path

import autograd.numpy as anp
import numpy as np
import pytest
from autograd import grad as ag_grad

from lora_ref.cli import main
from lora_ref.kit.linear import rounding_counts
from lora_ref.kit.mutants import CORRECT, MUTANTS
from lora_ref.testing import assert_within, reference_rtol, tolerance
from lora_ref.vectors import (FORMAT_VERSION, KINDS, GoldenCase, check_against_vectors, golden_cases, load_vectors,
                              write_vectors)

LINEAR_KINDS = ("plain", "rslora", "fan_in_fan_out", "dropout", "fused_qkv_q_v", "fused_k_v", "rank_above_dim",
                "rank_equals_dims", "rank_equals_d_out")


@pytest.fixture(scope="module")
def vectors_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vectors")
    write_vectors(out)
    return out


@pytest.fixture(scope="module")
def cases(vectors_dir) -> list[GoldenCase]:
    return load_vectors(vectors_dir)


# --------------------------------------------------------------------------------------------
# Contents
# --------------------------------------------------------------------------------------------


def test_every_kind_with_its_dtypes(cases):
    assert FORMAT_VERSION == 2 and {c.kind for c in cases} == set(KINDS)
    linear = [c.name for c in cases if c.kind == "lora_linear"]
    assert linear == [f"{k}_{d}" for k in LINEAR_KINDS for d in ("float64", "float32")]
    for kind in ("lora_linear", "dora_linear", "lora_shrink", "lora_expand"):     # the C/JS consumer's three
        assert {"float64", "float32"} <= {c.dtype for c in cases if c.kind == kind}
    assert {c.dtype for c in cases if c.kind == "lora_shrink"} == {"float64", "float32", "float16", "bfloat16"}
    assert {c.dtype for c in cases if c.kind == "quantize_4bit"} == {"float32", "float16", "bfloat16"}
    for case in cases:
        floats = [v for k, v in case.inputs.items() if v.dtype.kind == "f" or v.dtype.name == "bfloat16"]
        assert all(v.dtype.name == case.dtype for v in floats if not (case.kind == "lora_expand" and v is case.inputs["h"]))
        for o in case.outputs.values():
            assert (o.rule == "tolerance") == (o.magnitude is not None)
            assert o.expected.dtype.name == ("float64" if o.rule == "tolerance" else o.dtype)
    by = {c.name: c for c in cases}
    assert by["rslora_float64"].params["scale"] == 8.0 / math.sqrt(4)
    assert by["fused_qkv_q_v_float32"].params["enable_lora"] == [True, False, True]
    assert set(by["dora_dropout_float32"].outputs) == {"y", "m_init", "W_merged", "dx", "dA", "dB", "dm",
                                                       "dA_exact", "dB_exact"}
    assert by["expand_bgmv_bfloat16"].inputs["h"].dtype == np.float32                # h in the accumulation dtype
    assert by["quant_double_quant_float32"].outputs["nested_offset"].expected.shape == ()


def dense_forward(x, W_stored, A, B, params, bias, mask):
    """y = x W^T + bias + s (x*mask) D^T with D the dense (d_out, d_in) B A (fused: scattered)."""
    W = W_stored.T if params["fan_in_fan_out"] else W_stored            # (d_out, d_in)
    s = params["alpha"] / (math.sqrt(params["r"]) if params["use_rslora"] else params["r"])
    enable = params["enable_lora"] or [True]
    q, r = W.shape[0] // len(enable), params["r"]
    rows, k = [], 0
    for on in enable:
        if on:
            rows.append(anp.dot(B[k * q:(k + 1) * q, :], A[k * r:(k + 1) * r, :]))   # (q, d_in)
            k += 1
        else:
            rows.append(anp.zeros((q, W.shape[1])))
    D = anp.concatenate(rows, axis=0)                                     # (d_out, d_in)
    xd = x if mask is None else x * mask
    y = anp.dot(x, W.T) + s * anp.dot(xd, D.T)
    return (y if bias is None else y + bias), s * D


def test_linear_expected_values_match_an_independent_dense_implementation(cases):
    # Both are float64 computations of the same sums (n roundings each): 2 gamma_n(float64) M.
    for case in (c for c in cases if c.kind == "lora_linear"):
        t = {k: v.astype(np.float64) for k, v in case.inputs.items()}
        x, W, A, B, dy, bias, mask = (t.get(k) for k in ("x", "W", "A", "B", "dy", "bias", "dropout_mask"))
        y, sD = dense_forward(x, W, A, B, case.params, bias, mask)
        loss = lambda xx, AA, BB: anp.sum(dense_forward(xx, W, AA, BB, case.params, bias, mask)[0] * dy)  # noqa: E731
        ours = {"y": y, "W_merged": W + (sD.T if case.params["fan_in_fan_out"] else sD),
                "dx": ag_grad(loss, 0)(x, A, B), "dA": ag_grad(loss, 1)(x, A, B), "dB": ag_grad(loss, 2)(x, A, B)}
        n = len(case.inputs["A"]) // case.params["r"]
        counts = rounding_counts(A.shape[1], y.shape[-1], case.params["r"], math.prod(x.shape[:-1]), n)
        for name, value in ours.items():
            bound = 2 * tolerance("float64", counts[name]) * case.outputs[name].magnitude
            assert_within(value, case.outputs[name].expected, bound, what=f"{case.name}:{name}")


def test_tolerances_are_derived(cases):
    for case in cases:
        for o in case.outputs.values():
            if o.rule != "tolerance":
                continue
            assert o.atol == o.rtol * o.magnitude.max()
            if case.kind in ("lora_linear", "dora_linear", "lora_embedding", "lora_conv", "adapter_set",
                             "mixed_batch", "combine_adapters"):
                assert o.rtol == reference_rtol(case.dtype, o.roundings), (case.name, o.name)
        if case.kind == "lora_linear":
            A, y = case.inputs["A"], case.outputs["y"].expected
            counts = rounding_counts(A.shape[1], y.shape[-1], case.params["r"],
                                     math.prod(case.inputs["x"].shape[:-1]), len(A) // case.params["r"])
            assert {k: o.roundings for k, o in case.outputs.items()} == {k: counts[k] + 2 for k in counts}


# --------------------------------------------------------------------------------------------
# Checking implementations against them
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [k for k in CORRECT if k in KINDS])
def test_right_implementations_pass_every_case_of_their_kind(vectors_dir, kind):
    # (the independent linear layer has no fused layer: the enable_lora cases are not run for it)
    report = check_against_vectors(**CORRECT[kind](), vectors=vectors_dir, kind=kind)
    n_outputs = sum(len(c.outputs) for c in golden_cases(kinds=[kind]) if not c.params.get("enable_lora"))
    assert report.ok and len(report) == n_outputs, str(report)


def test_lora_ref_itself_passes_the_fused_cases_too(vectors_dir):
    import lora_ref
    from autograd import make_vjp

    def layer(x, W, A, B, *, alpha, r, use_rslora, bias, dropout_mask, fan_in_fan_out, enable_lora=None):
        s = lora_ref.lora_scale(alpha, r, use_rslora)
        return lora_ref.lora_linear(x, W.T if fan_in_fan_out else W, A, B, s, bias, dropout_mask, enable_lora)

    def merge(W, A, B, *, alpha, r, use_rslora, fan_in_fan_out, enable_lora=None):
        return lora_ref.merge(W, A, B, lora_ref.lora_scale(alpha, r, use_rslora), enable_lora=enable_lora,
                              fan_in_fan_out=fan_in_fan_out)

    def grad(x, W, A, B, dy, **kw):
        return make_vjp(lambda xx, AA, BB: layer(xx, W, AA, BB, **kw), argnum=(0, 1, 2))(x, A, B)[0](dy)

    report = check_against_vectors(layer, vectors_dir, merge=merge, grad=grad)
    assert report.ok and len(report) == 18 * 5, str(report)


@pytest.mark.parametrize("name", [n for n, m in MUTANTS.items() if m.variant in KINDS])
def test_every_mutant_of_a_kind_fails_its_vectors(cases, name):
    mutant = MUTANTS[name]
    report = check_against_vectors(**mutant.callables(), vectors=cases, kind=mutant.variant)
    assert not report.ok, name
    assert all(r.exact or r.error > 2 * r.bound for r in report.failed)


def test_the_fan_in_fan_out_adapter_set_case_catches_a_forgotten_transpose(cases):
    # Only the fan_in_fan_out case's W_merged can show this mistake (every other W is (d_out, d_in)).
    mutant = MUTANTS["adapters.merge_transpose_forgotten"]
    report = check_against_vectors(**mutant.callables(), vectors=cases, kind="adapter_set")
    assert {r.name for r in report.failed} == {f"adapters_fan_in_fan_out_{d}:W_merged"
                                               for d in ("float64", "float32")}, str(report)


def test_case_selection_fused_cases_and_arguments(cases):
    plain = [c.name for c in cases if c.kind == "lora_linear" and not c.params["enable_lora"]]
    impl = CORRECT["lora_linear"]()["impl"]                         # takes no enable_lora keyword
    report = check_against_vectors(impl, cases)
    assert report.ok and len(report) == len(plain)                  # the fused cases are not for it
    assert check_against_vectors(impl, cases, cases=plain[:2]).ok
    assert check_against_vectors(impl).ok                           # None: built in memory
    with pytest.raises(ValueError, match="unknown case names \\['nope'\\]"):
        check_against_vectors(impl, cases, cases=["nope"])
    with pytest.raises(TypeError, match="impl must be a callable"):
        check_against_vectors(None, cases)
    with pytest.raises(TypeError, match="kind 'lora_shrink' takes the callables impl only, not 'grad'"):
        check_against_vectors(impl, cases, kind="lora_shrink", grad=impl)
    with pytest.raises(ValueError, match="kind must be one of"):
        check_against_vectors(impl, cases, kind="lora")


# --------------------------------------------------------------------------------------------
# Files: determinism, size, format checks, the command
# --------------------------------------------------------------------------------------------


def test_writing_is_deterministic_and_small(tmp_path, vectors_dir):
    again = tmp_path / "again"
    write_vectors(again)
    files = sorted(p.name for p in vectors_dir.iterdir())
    assert files == sorted(p.name for p in again.iterdir()) and len(files) == len(golden_cases()) + 1
    for name in files:
        assert (vectors_dir / name).read_bytes() == (again / name).read_bytes(), name
    assert sum((vectors_dir / f).stat().st_size for f in files) < 600_000
    other = {c.name: c for c in golden_cases(seed=1)}
    assert not np.array_equal(other["plain_float64"].inputs["x"], load_vectors(again)[0].inputs["x"])


def test_loaded_cases_equal_the_in_memory_ones(cases):
    for loaded, built in zip(cases, golden_cases(), strict=True):
        assert (loaded.name, loaded.kind, loaded.dtype, loaded.params) == (built.name, built.kind, built.dtype,
                                                                          json.loads(json.dumps(built.params)))
        assert loaded.inputs.keys() == built.inputs.keys() and loaded.outputs.keys() == built.outputs.keys()
        for k in loaded.inputs:
            assert loaded.inputs[k].tobytes() == built.inputs[k].tobytes() and loaded.inputs[k].dtype == built.inputs[k].dtype
        for k, o in loaded.outputs.items():
            b = built.outputs[k]
            assert o.expected.tobytes() == b.expected.tobytes() and (o.rule, o.dtype, o.rtol) == (b.rule, b.dtype, b.rtol)


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def _edit_manifest(root: Path, edit) -> None:
    manifest = json.loads((root / "manifest.json").read_text())
    edit(manifest)
    (root / "manifest.json").write_text(json.dumps(manifest))


def test_load_rejects_bad_directories_and_names_version_1(tmp_path, vectors_dir):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_vectors(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="holds no golden vectors"):
        load_vectors(tmp_path)
    bad = _copy(vectors_dir, tmp_path / "v1")
    _edit_manifest(bad, lambda m: m.update(format_version=1))
    with pytest.raises(ValueError, match="format_version 1 is not supported; this lora-ref reads version 2 "
                                         r"\(version 1 held plain linear LoRA only"):
        load_vectors(bad)
    bad = _copy(vectors_dir, tmp_path / "format")
    _edit_manifest(bad, lambda m: m.update(format="something-else"))
    with pytest.raises(ValueError, match="format must be 'lora-ref-golden-vectors'"):
        load_vectors(bad)
    bad = _copy(vectors_dir, tmp_path / "json")
    (bad / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_vectors(bad)
    bad = _copy(vectors_dir, tmp_path / "kind")
    _edit_manifest(bad, lambda m: m["cases"][0].update(kind="lora_moe"))
    with pytest.raises(ValueError, match="unknown kind 'lora_moe'"):
        load_vectors(bad)


def _rewrite(bad: Path, name: str, change) -> None:
    from lora_ref.vectors import _read_safetensors, _write_safetensors
    tensors = _read_safetensors(bad / name)
    change(tensors)
    _write_safetensors(bad / name, tensors, {})
    digest = hashlib.sha256((bad / name).read_bytes()).hexdigest()
    _edit_manifest(bad, lambda m: next(c for c in m["cases"] if c["file"] == name).update(sha256=digest))


def test_load_rejects_changed_or_incomplete_files(tmp_path, vectors_dir):
    bad = _copy(vectors_dir, tmp_path / "tampered")
    path = bad / "plain_float64.safetensors"
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(ValueError, match="plain_float64.*SHA-256"):
        load_vectors(bad)
    path.unlink()
    with pytest.raises(FileNotFoundError, match="plain_float64.safetensors is missing"):
        load_vectors(bad)
    for what, change, match in [
        ("missing", lambda t: t.pop("expected.dB"), "tensor 'expected.dB' is missing"),
        ("dtype", lambda t: t.update({"expected.y": t["expected.y"].astype(np.float32)}),
         "tensor 'expected.y' has dtype float32, expected float64"),
        ("shape", lambda t: t.update(x=t["x"][:1]), "tensor 'x' has shape \\[1, 3, 8\\]"),
        ("extra", lambda t: t.update(z=np.zeros(1)), "holds tensors the manifest does not list: \\['z'\\]"),
    ]:
        bad = _copy(vectors_dir, tmp_path / what)
        _rewrite(bad, "plain_float64.safetensors", change)
        with pytest.raises(ValueError, match=match):
            load_vectors(bad)


def test_write_refuses_to_overwrite(tmp_path, vectors_dir):
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_vectors(vectors_dir)
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match="not a directory"):
        write_vectors(tmp_path / "file")
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        golden_cases(seed=-1)
    with pytest.raises(ValueError, match="unknown kinds \\['dora'\\]"):
        golden_cases(kinds=["dora"])


def test_command_writes_vectors(tmp_path, capsys):
    out = tmp_path / "v"
    n = len(golden_cases())
    assert main(["vectors", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[-1] == f"wrote {n} cases (format version 2, seed 0) to {out / 'manifest.json'}"
    assert [line.split()[0] for line in printed[:-1]] == list(KINDS)
    assert len(load_vectors(out)) == n
    assert main(["vectors", str(out)]) == 1
    assert "use --force" in capsys.readouterr().err
    assert main(["vectors", str(out), "--force", "--seed", "3"]) == 0
    assert json.loads((out / "manifest.json").read_text())["seed"] == 3


def test_the_format_page_names_every_kind_and_tensor():
    page = (Path(__file__).resolve().parent.parent / "docs" / "vectors-format.md").read_text()
    for case in golden_cases():
        assert f"`{case.kind}`" in page, case.kind
        for name in list(case.inputs) + list(case.outputs) + list(case.params):
            generic = name.split(".")[0] + (".<" if "." in name else "")
            assert f"`{name}`" in page or f"`{generic}" in page, (case.kind, name)


# --------------------------------------------------------------------------------------------
# The manifest is strict JSON (RFC 8259): no NaN or infinity is ever written
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field, change", [
    ("params.alpha", lambda c: replace(c, params={**c.params, "alpha": float("nan")})),
    ("outputs.y.rtol", lambda c: replace(c, outputs={**c.outputs, "y": replace(c.outputs["y"], rtol=math.inf)})),
    ("outputs.y.atol", lambda c: replace(c, outputs={**c.outputs, "y": replace(c.outputs["y"], atol=-math.inf)})),
])
def test_a_non_finite_manifest_value_is_refused_before_any_file_is_written(tmp_path, monkeypatch, field, change):
    import lora_ref.vectors as vectors

    built = golden_cases(kinds=["lora_linear"])
    monkeypatch.setattr(vectors, "golden_cases", lambda seed: [built[0], change(built[1])])
    out = tmp_path / "v"
    with pytest.raises(ValueError, match=f"manifest case 'plain_float32'.{re.escape(field)} is -?(nan|inf): the "
                                         r"manifest is strict JSON \(RFC 8259\), which has no NaN or infinity"):
        write_vectors(out)
    assert not out.exists()                                          # refused before anything was written


def test_the_manifest_parses_as_strict_json(vectors_dir):
    def refuse(token):
        raise AssertionError(f"manifest.json holds {token}, which strict JSON parsers refuse")

    raw = (vectors_dir / "manifest.json").read_bytes()
    assert raw.isascii()
    json.loads(raw, parse_constant=refuse)                           # NaN, Infinity, -Infinity would call it
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        from lora_ref.vectors import _dumps
        _dumps({"x": [float("nan")]})


# --------------------------------------------------------------------------------------------
# Magnitudes: docs/vectors-format.md's formula for every kind and output, recomputed here from the
# stored inputs with nothing from lora-ref, against the stored magnitude.<output>
# --------------------------------------------------------------------------------------------


def _f64abs(a) -> np.ndarray:
    return np.abs(np.asarray(a, dtype=np.float64))


def _scale(a: dict) -> float:
    return a["alpha"] / (math.sqrt(a["r"]) if a["use_rslora"] else a["r"])


def _linear_magnitudes(p, t):
    W = t["W"].T if p["fan_in_fan_out"] else t["W"]                      # (d_out, d_in)
    d_out, d_in = W.shape
    s, r = abs(_scale(p)), p["r"]
    x = t["x"].reshape(-1, d_in)                                         # (N, d_in)
    xd = x * t["dropout_mask"].reshape(-1, d_in) if "dropout_mask" in t else x
    mask = t["dropout_mask"].reshape(-1, d_in) if "dropout_mask" in t else np.ones_like(x)
    dy = t["dy"].reshape(-1, d_out)
    enable = p["enable_lora"] or [True]
    q = d_out // len(enable)
    g = [j for j, on in enumerate(enable) if on]                          # the enabled blocks, in order
    A = [t["A"][k * r:(k + 1) * r] for k in range(len(g))]                 # (r, d_in) each
    B = [t["B"][k * q:(k + 1) * q] for k in range(len(g))]                 # (q, r) each
    D = np.zeros((d_out, d_in))
    for k, gk in enumerate(g):
        D[gk * q:(gk + 1) * q] = B[k] @ A[k]
    y = x @ W.T + t.get("bias", 0.0) + s * (xd @ D.T)
    dx = dy @ W + s * mask * (dy @ D)
    dA = np.concatenate([s * (dy[:, gk * q:(gk + 1) * q] @ B[k]).T @ xd for k, gk in enumerate(g)])
    dB = np.concatenate([s * dy[:, gk * q:(gk + 1) * q].T @ (xd @ A[k].T) for k, gk in enumerate(g)])
    Wm = W + s * D
    return {"y": y.reshape(t["dy"].shape), "W_merged": Wm.T if p["fan_in_fan_out"] else Wm,
            "dx": dx.reshape(t["x"].shape), "dA": dA, "dB": dB}


def _dora_magnitudes(p, t, signed):
    Ws = signed["W"].astype(np.float64)
    W = (t["W"].T if p["fan_in_fan_out"] else t["W"])                    # |W|, (d_out, d_in)
    Ws = Ws.T if p["fan_in_fan_out"] else Ws
    d_out, d_in = W.shape
    scale = _scale(p)
    s = abs(scale)
    Va = W + s * (t["B"] @ t["A"])
    V = Ws + scale * (signed["B"].astype(np.float64) @ signed["A"].astype(np.float64))
    C = np.sqrt(np.sum(V * V, axis=1))                                   # (d_out,)
    N = np.sqrt(np.sum(Va * Va, axis=1))
    kappa = N / C
    fm = t["m"] / C * (1 + kappa)
    x = t["x"].reshape(-1, d_in)
    Md = t["dropout_mask"].reshape(-1, d_in) if "dropout_mask" in t else np.ones_like(x)
    xd, b = x * Md, t.get("bias", 0.0)
    y = x @ W.T + b + (fm + 1) * (xd @ W.T + b) + fm * (xd @ (s * t["B"] @ t["A"]).T)
    G = t["dy"].reshape(-1, d_out)
    E = G.T @ xd                                                         # (d_out, d_in)
    phi = np.sum(E * Va, axis=1)
    dV = fm[:, None] * E
    dV_exact = dV + (t["m"] / C * (2 + 3 * kappa) * phi / C**2)[:, None] * Va
    Wm = fm[:, None] * Va
    out = {"y": y.reshape(t["dy"].shape), "m_init": N, "W_merged": Wm.T if p["fan_in_fan_out"] else Wm,
           "dx": (((G * fm) @ Va) * Md + (G @ W) * (1 + 2 * Md)).reshape(t["x"].shape),
           "dA": s * t["B"].T @ dV, "dB": s * dV @ t["A"].T, "dm": phi / C * (1 + kappa),
           "dA_exact": s * t["B"].T @ dV_exact, "dB_exact": s * dV_exact @ t["A"].T}
    return out, float(kappa.max())


def _embedding_magnitudes(p, t, ids):
    s, ids = abs(_scale(p)), ids.reshape(-1)
    dy = t["dy"].reshape(len(ids), -1)                                   # (N, D)
    dA = np.zeros_like(t["A"])
    np.add.at(dA.T, ids, s * dy @ t["B"])                                # each occurrence adds to its column
    return {"y": (t["E"][ids] + s * t["A"].T[ids] @ t["B"].T).reshape(t["dy"].shape),
            "E_merged": t["E"] + s * (t["B"] @ t["A"]).T, "dA": dA, "dB": s * dy.T @ t["A"].T[ids]}


def _conv(x, W, stride, padding, dilation, groups):
    """torch.nn.functional.conv1d/conv2d (cross-correlation, zero padding), x (N, C_in, *S)."""
    nd, k = W.ndim - 2, W.shape[2:]
    xp = np.pad(x, [(0, 0), (0, 0)] + [(q, q) for q in padding])
    O = [(xp.shape[2 + d] - dilation[d] * (k[d] - 1) - 1) // stride[d] + 1 for d in range(nd)]
    N, C, Co = x.shape[0], x.shape[1], W.shape[0]
    y = np.zeros((N, Co, *O))
    for off in np.ndindex(*k):
        window = tuple(slice(off[d] * dilation[d], off[d] * dilation[d] + stride[d] * (O[d] - 1) + 1, stride[d])
                       for d in range(nd))
        patch = xp[(slice(None), slice(None)) + window].reshape(N, groups, C // groups, *O)
        w = W[(slice(None), slice(None)) + off].reshape(groups, Co // groups, C // groups)
        y += np.einsum("goc,ngc...->ngo...", w, patch).reshape(N, Co, *O)
    return y


def _conv_magnitudes(p, t):
    s, geo, G = abs(_scale(p)), [p["stride"], p["padding"], p["dilation"]], p["groups"]
    nd = len(p["stride"])
    one = [[1] * nd, [0] * nd, [1] * nd]
    mask = t.get("dropout_mask", np.ones_like(t["x"]))
    bias = t["bias"].reshape((-1,) + (1,) * nd)

    def lora(x, A, B):
        return s * _conv(_conv(x * mask, A, *geo, 1), B, *one, G)

    def jacobian_t(f, at):                            # J^T |dy| of a map linear in its argument, by basis
        out = np.empty(at.size)
        for j in range(at.size):
            e = np.zeros(at.size)
            e[j] = 1.0
            out[j] = np.sum(f(e.reshape(at.shape)) * t["dy"])
        return out.reshape(at.shape)

    out = {"y": _conv(t["x"], t["W"], *geo, G) + bias + lora(t["x"], t["A"], t["B"]),
           "dx": jacobian_t(lambda e: _conv(e, t["W"], *geo, G) + lora(e, t["A"], t["B"]), t["x"]),
           "dA": jacobian_t(lambda e: lora(t["x"], e, t["B"]), t["A"]),
           "dB": jacobian_t(lambda e: lora(t["x"], t["A"], e), t["B"])}
    if G == 1:
        out["W_merged"] = t["W"] + s * np.einsum("ok,ki...->oi...", t["B"].reshape(t["B"].shape[:2]), t["A"])
    return out


def _adapter_magnitudes(case, p, t):
    ads = {a["name"]: (t[f"A.{a['name']}"], t[f"B.{a['name']}"], abs(_scale(a))) for a in p["adapters"]}
    x, b = t["x"], t["bias"]
    fifo = p.get("fan_in_fan_out", False)
    W = t["W"].T if fifo else t["W"]                                     # (d_out, d_in)
    term = lambda xx, name: ads[name][2] * (xx @ ads[name][0].T) @ ads[name][1].T  # noqa: E731
    if case.kind == "mixed_batch":
        return {"y": np.stack([x[n] @ W.T + b + (0 if a == "__base__" else term(x[n], a))
                               for n, a in enumerate(p["names"])])}
    merged = W + sum(ads[a][2] * ads[a][1] @ ads[a][0] for a in p["merged"])
    return {"y": x @ W.T + b + sum(term(x, a) for a in p["active"]), "W_merged": merged.T if fifo else merged}


def _serving_magnitudes(case, p, t, indices):
    if case.kind == "lora_shrink":
        h = np.zeros(case.outputs["h"].expected.shape)                   # (n_slices, T, R)
        for s in range(p["n_slices"]):
            for k, i in enumerate(indices):
                if i >= 0:
                    h[s, k] = abs(p["scale"]) * t["A_stack"][s, i] @ t["x"][k]
        return {"h": h}
    y = np.zeros(t["y"].shape)                                           # copied entries: 0
    for s, (off, width) in enumerate(p["slices"]):
        for k, i in enumerate(indices):
            if i >= 0:
                y[k, off:off + width] = t["y"][k, off:off + width] + t[f"B_stack.{s}"][i] @ t["h"][s, k]
    return {"y": y}


def _combine_magnitudes(p, t):
    names, w = [a["name"] for a in p["adapters"]], p["weights"]
    ws = [abs(wi * _scale(a)) for wi, a in zip(w, p["adapters"])]
    div = p["density"] if p["method"].startswith("dare") else 1.0
    if p["method"] in ("exact", "cat") or p["method"].endswith("svd"):
        M = sum(v * t[f"B.{n}"] @ t[f"A.{n}"] for v, n in zip(ws, names)) / div
        return {"delta": M + np.sqrt(np.sum(M * M)) if p["method"].endswith("svd") else M}
    M_A = sum(math.sqrt(v) * t[f"A.{n}"] for v, n in zip(ws, names)) / div
    M_B = sum(math.sqrt(v) * t[f"B.{n}"] for v, n in zip(ws, names)) / div
    return {"delta": 1.0 * M_B @ M_A}                                    # the combined adapter's scale, 1


def spec_magnitudes(case: GoldenCase) -> tuple[dict[str, np.ndarray], float]:
    """Every magnitude.<output> of ``case`` by docs/vectors-format.md's formulas, and the factor by
    which DoRA's depend on the conditioning kappa (1 for the other kinds)."""
    t = {k: _f64abs(v) for k, v in case.inputs.items() if v.dtype.kind != "i"}
    p = case.params
    if case.kind == "lora_linear":
        return _linear_magnitudes(p, t), 1.0
    if case.kind == "dora_linear":
        out, kappa = _dora_magnitudes(p, t, case.inputs)
        # f_mag = |m| (1 + kappa) / C needs C, computed from the signed V: two float64 computations
        # of C differ by 2 gamma_n kappa C (dora_magnitudes), so f_mag, phi / C^2 (1 + kappa) and
        # the exact gradient's (2 + 3 kappa) |m| phi / C^3 by at most 2 gamma_n (4 kappa + 2)
        # relatively; with the non-negative sums' own gamma_n: 2 gamma_n (4 kappa + 3) M.
        return out, 4 * kappa + 3
    if case.kind == "lora_embedding":
        return _embedding_magnitudes(p, t, case.inputs["ids"]), 1.0
    if case.kind == "lora_conv":
        return _conv_magnitudes(p, t), 1.0
    if case.kind in ("adapter_set", "mixed_batch"):
        return _adapter_magnitudes(case, p, t), 1.0
    if case.kind in ("lora_shrink", "lora_expand"):
        return _serving_magnitudes(case, p, t, case.inputs["indices"]), 1.0
    if case.kind == "combine_adapters":
        return _combine_magnitudes(p, t), 1.0
    return {}, 1.0                                                       # quantize_4bit: exact outputs only


def test_every_magnitude_is_the_formula_the_format_page_states(cases):
    # Both sides are float64 sums of non-negative terms, each of at most `roundings` roundings:
    # they differ by at most 2 gamma_n M (times DoRA's conditioning factor, derived above).
    checked = 0
    for case in cases:
        mine, factor = spec_magnitudes(case)
        stored = case.magnitudes
        assert set(mine) == set(stored), (case.name, sorted(mine), sorted(stored))
        for name, M in stored.items():
            n = case.outputs[name].roundings
            assert mine[name].shape == M.shape, (case.name, name)
            assert_within(mine[name], M, 2 * tolerance("float64", n) * factor * M, what=f"{case.name}:{name}")
            checked += 1
    assert checked == sum(len(c.magnitudes) for c in cases) > 150


# --------------------------------------------------------------------------------------------
# Rounding counts, the serving rtol, gradients and the general rules: as the format page states
# --------------------------------------------------------------------------------------------


def spec_counts(case: GoldenCase) -> dict[str, int]:
    """docs/vectors-format.md's count for every tolerance output (roundings = count + 2)."""
    p, t = case.params, case.inputs
    if case.kind == "lora_linear":
        d_out, d_in, r = case.outputs["y"].expected.shape[-1], t["x"].shape[-1], p["r"]
        n, N = sum(p["enable_lora"] or [True]), math.prod(t["x"].shape[:-1])
        return {"y": d_in + r + 6, "W_merged": r + 6, "dx": d_out + n * r + 6, "dA": d_out + N + 6,
                "dB": d_in + N + 6}
    if case.kind == "dora_linear":
        d_out, d_in, r, N = len(t["m"]), t["x"].shape[-1], p["r"], math.prod(t["x"].shape[:-1])
        fwd, bwd = d_in + r + 12, N + d_in + d_out + 2 * r + 16
        return {"y": fwd, "m_init": fwd, "W_merged": fwd, **{k: bwd for k in ("dx", "dA", "dB", "dm", "dA_exact",
                                                                             "dB_exact")}}
    if case.kind == "lora_embedding":
        r, D, N = p["r"], t["E"].shape[1], t["ids"].size
        return {"y": r + 5, "E_merged": r + 5, "dA": D + N + 5, "dB": D + N + 5}
    if case.kind == "lora_conv":
        C_out, C_in, K, r = t["W"].shape[0], t["x"].shape[1], math.prod(t["W"].shape[2:]), p["r"]
        NP = t["dy"].shape[0] * math.prod(t["dy"].shape[2:])
        g = NP + C_in * K + C_out * K + C_out + r * K + 10
        return {"y": C_in * K + r + 7, "dx": g, "dA": g, "dB": g, **({"W_merged": r + 5} if p["groups"] == 1 else {})}
    if case.kind in ("adapter_set", "mixed_batch"):
        d_in, r_max = t["x"].shape[-1], max(a["r"] for a in p["adapters"])
        if case.kind == "mixed_batch":
            return {"y": d_in + r_max + 8}
        return {"y": d_in + r_max + 6 + max(1, len(p["active"])), "W_merged": r_max + 6 + max(1, len(p["merged"]))}
    if case.kind == "lora_shrink":
        return {"h": t["x"].shape[1] + 3}
    if case.kind == "lora_expand":
        return {"y": t["h"].shape[2] + 5}
    if case.kind == "combine_adapters":
        n, r = len(p["adapters"]), p["adapters"][0]["r"]
        assert all(a["r"] == r for a in p["adapters"])                  # as the page says
        d_out, d_in = case.outputs["delta"].expected.shape
        if p["method"] in ("exact", "cat"):
            return {"delta": sum(a["r"] for a in p["adapters"]) + 6}
        return {"delta": r + n + 6 + d_out * d_in if p["method"].endswith("svd") else 2 * (n + 3) + r + 3}
    return {}


def test_every_rounding_count_and_rtol_is_the_formula_the_format_page_states(cases):
    for case in cases:
        tol = {k: o for k, o in case.outputs.items() if o.rule == "tolerance"}
        counts = spec_counts(case)
        assert {k: o.roundings for k, o in tol.items()} == {k: c + 2 for k, c in counts.items()}, case.name
        for name, o in tol.items():
            n = o.roundings
            if case.kind in ("lora_shrink", "lora_expand"):            # a in Acc (the 2 added among them), b in S
                acc, b = case.params["accumulation_dtype"], 0 if case.kind == "lora_shrink" else 3
                a = n - b
                g64 = tolerance("float64", a + b)
                rtol = ((1 + tolerance(acc, a)) * (1 + tolerance(case.dtype, b)) - 1 + g64) / (1 - g64)
            else:
                g64 = tolerance("float64", n)
                rtol = (tolerance(case.dtype, n) + g64) / (1 - g64)
            assert o.rtol == rtol and o.atol == rtol * o.magnitude.max(), (case.name, name)


def test_dora_gradients_are_the_formulas_the_format_page_states(cases):
    for case in (c for c in cases if c.kind == "dora_linear"):
        t = {k: v.astype(np.float64) for k, v in case.inputs.items()}
        p = case.params
        W = t["W"].T if p["fan_in_fan_out"] else t["W"]                  # Wm (d_out, d_in)
        s = _scale(p)
        V = W + s * t["B"] @ t["A"]
        C = np.sqrt(np.sum(V * V, axis=1))
        f = t["m"] / C
        x, dy = t["x"].reshape(-1, W.shape[1]), t["dy"].reshape(-1, W.shape[0])
        mask = t["dropout_mask"].reshape(x.shape) if "dropout_mask" in t else np.ones_like(x)
        xd = x * mask
        E = dy.T @ xd
        phi = np.sum(E * V, axis=1)
        dV = f[:, None] * E
        dV_exact = dV - (f * phi / C**2)[:, None] * V
        mine = {"y": f * (xd @ V.T) + (x - xd) @ W.T + t["bias"], "m_init": C,
                "W_merged": (f[:, None] * V).T if p["fan_in_fan_out"] else f[:, None] * V,
                "dx": (dy * f) @ V * mask + (dy @ W) * (1 - mask), "dm": phi / C,
                "dA": s * t["B"].T @ dV, "dB": s * dV @ t["A"].T,
                "dA_exact": s * t["B"].T @ dV_exact, "dB_exact": s * dV_exact @ t["A"].T}
        for name, o in case.outputs.items():
            value = mine[name].reshape(o.expected.shape)
            assert_within(value, o.expected, 2 * tolerance("float64", o.roundings) * o.magnitude,
                          what=f"{case.name}:{name}")


def test_adapter_set_outputs_are_the_formulas_the_format_page_states(cases):
    # Plain NumPy from the stored tensors, W transposed under fan_in_fan_out and W_merged given back
    # in the stored layout; both float64 computations of n roundings: within 2 gamma_n M.
    fifo = 0
    for case in (c for c in cases if c.kind == "adapter_set"):
        t, p = {k: v.astype(np.float64) for k, v in case.inputs.items()}, case.params
        Wm = t["W"].T if p["fan_in_fan_out"] else t["W"]                # (d_out, d_in)
        delta = {a["name"]: _scale(a) * t[f"B.{a['name']}"] @ t[f"A.{a['name']}"] for a in p["adapters"]}
        merged = Wm + sum(delta[a] for a in p["merged"])
        mine = {"y": t["x"] @ Wm.T + t["bias"] + sum(t["x"] @ delta[a].T for a in p["active"]),
                "W_merged": merged.T if p["fan_in_fan_out"] else merged}
        for name, o in case.outputs.items():
            assert_within(mine[name], o.expected, 2 * tolerance("float64", o.roundings) * o.magnitude,
                          what=f"{case.name}:{name}")
        fifo += p["fan_in_fan_out"]
    assert fifo == 2                                                     # float64 and float32


def test_optional_tensors_flags_segments_and_slices_follow_the_general_rules(cases):
    for case in cases:
        p, t = case.params, case.inputs
        if "dropout_p" in p:                                             # null exactly when no mask is stored
            assert (p["dropout_p"] is None) == ("dropout_mask" not in t), case.name
        if case.kind == "adapter_set":                                   # W's layout follows the flag
            d_out, d_in = case.outputs["y"].expected.shape[-1], t["x"].shape[-1]
            assert t["W"].shape == ((d_in, d_out) if p["fan_in_fan_out"] else (d_out, d_in)), case.name
            assert case.outputs["W_merged"].expected.shape == t["W"].shape
        if case.kind in ("lora_linear", "dora_linear"):                   # null, never left out
            assert {"dropout_p", "fan_in_fan_out"} <= set(p) and (case.kind == "dora_linear") != ("enable_lora" in p)
        if case.kind == "combine_adapters":
            base = p["method"].removesuffix("_svd")
            assert (p["density"] is None) == (base not in ("ties", "dare_linear", "dare_ties", "magnitude_prune"))
            assert (p["rank"] is None) == (not p["method"].endswith("svd"))
            masks = {k.split(".")[0] for k in t if k.startswith("mask")}
            assert masks == {"none": set(), "factor": {"mask_A", "mask_B"}, "delta": {"mask"}}[p["masks"]]
        if case.kind in ("lora_shrink", "lora_expand"):
            seg = {k for k in t if k.startswith("seg_")}
            assert seg == (set() if p["index_kind"] == "bgmv" else {"seg_starts", "seg_lengths", "seg_indices"})
            if seg:
                starts, lengths = t["seg_starts"], t["seg_lengths"]
                assert starts[0] == 0 and np.all(lengths >= 0) and np.all(starts[1:] == starts[:-1] + lengths[:-1])
                assert lengths.sum() == len(t["indices"])
                assert np.array_equal(np.repeat(t["seg_indices"], lengths), t["indices"])
            if case.kind == "lora_expand":
                spans = sorted(p["slices"])
                assert all(a + w <= b for (a, w), (b, _) in zip(spans, spans[1:]))
                assert all(t[f"B_stack.{s}"].shape[1] == w and o + w <= t["y"].shape[1]
                           for s, (o, w) in enumerate(p["slices"]))
    # the page's fused example: under fan_in_fan_out, k's block is columns 4..7 of W, left unchanged
    fused = next(c for c in cases if c.name == "fused_qkv_q_v_float64")
    assert [fused.inputs[k].shape for k in ("W", "A", "B")] == [(4, 12), (4, 4), (8, 2)]
    merged, W = fused.outputs["W_merged"].expected, fused.inputs["W"]
    assert np.array_equal(merged[:, 4:8], W[:, 4:8]) and not np.array_equal(merged[:, 0:4], W[:, 0:4])


@pytest.mark.parametrize("starts, lengths, message", [
    ([0, 3], [2, 3], "a gap"),                                           # a gap
    ([0, 1], [2, 3], "segments overlap"),                                # an overlap
    ([2, 0], [3, 2], "the first sequence must start at token 0"),        # not sorted
    ([0], [3], "segments cover 3 tokens but the batch has 5"),           # tokens outside every segment
])
def test_lora_ref_refuses_the_segments_the_format_page_rules_out(starts, lengths, message):
    from lora_ref.serving import Segments, token_indices

    with pytest.raises(ValueError, match=message):
        token_indices(Segments(starts, lengths, [0] * len(starts)), 5)
    assert token_indices(Segments([0, 2, 2], [2, 0, 3], [0, 1, -1]), 5).tolist() == [0, 0, -1, -1, -1]
    with pytest.raises(ValueError, match=r"segments.indices\[1\] = 9 \(segment 1, 0 tokens\) is not a slot"):
        token_indices(Segments([0, 2, 2], [2, 0, 3], [0, 9, -1]), 5, n_slots=2)   # a slot of an empty segment too


def test_lora_ref_refuses_overlapping_slices_and_takes_them_in_any_order():
    from lora_ref.serving import lora_expand

    y, h = np.zeros((2, 6)), np.ones((2, 2, 1))
    B = [np.ones((1, 2, 1)), np.full((1, 3, 1), 2.0)]
    with pytest.raises(ValueError, match="slices overlap"):
        lora_expand(y, h, B, np.array([0, -1]), [(0, 2), (1, 3)])
    out = lora_expand(y, h, B, np.array([0, -1]), [(4, 2), (0, 3)])   # slice 0 at columns 4, 5; a gap at 3
    assert out.tolist() == [[2.0, 2.0, 2.0, 0.0, 1.0, 1.0], [0.0] * 6]
