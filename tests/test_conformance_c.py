"""The golden vectors read and checked by a program that shares nothing with lora-ref.

conformance/ is a C program (libc and libm only) written from docs/vectors-format.md: its own
JSON and safetensors readers, its own LoRA, DoRA and serving shrink/expand kernels. This module
writes the vectors with `lora-ref vectors`, builds the program with the machine's C compiler and
runs it: it must pass every output of every case of the kinds it implements (plain LoRA, DoRA,
several adapters on one weight, serving shrink and expand) and list every other case as skipped.
Then each deliberately broken build (-DCONFORMANCE_BREAK=<name>, conformance/broken.h) must fail,
and fail exactly the case outputs its mistake touches, predicted here from the manifest and the
case files, not typed by hand.

Skipped, with the reason, where no C compiler is found (CC, gcc, cc or clang).
"""

import json
import os
import shutil
import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

SOURCE = Path(__file__).resolve().parents[1] / "conformance"
CHECKED_KINDS = ("lora_linear", "dora_linear", "adapter_set", "mixed_batch", "lora_shrink", "lora_expand")
BREAKS = ("scale", "rslora", "layout", "dora_axis", "dora_exact", "merge_transpose", "minus_one", "slice_offset")
# The Makefile's flags; the broken builds skip the optimiser to build faster.
FLAGS = ["-std=c99", "-O2", "-Wall", "-Wextra", "-pedantic"]


def _compiler():
    for name in (os.environ.get("CC"), "gcc", "cc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _run_command(command):
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(map(str, command))} failed:\n{done.stderr}"


def _build(compiler, out, break_name=None):
    """The program, or a broken one: -O0 and the files that test BROKEN(...) only, to build fast."""
    flags = FLAGS if break_name is None else ["-std=c99", "-O0", f"-DCONFORMANCE_BREAK={break_name}"]
    _run_command([compiler, *flags, "-o", out, *sorted(SOURCE.glob("*.c")), "-lm"])
    return out


@pytest.fixture(scope="module")
def compiler():
    found = _compiler()
    if found is None:
        pytest.skip("no C compiler found (tried $CC, gcc, cc, clang): the C consumer cannot be built")
    return found


@pytest.fixture(scope="module")
def built(compiler, tmp_path_factory):
    """{None: the program, name: the program broken by CONFORMANCE_BREAK=name}.

    The program is built as the Makefile builds it. The broken ones are built at -O0, the files
    that do not include broken.h compiled once for all of them; every compile runs in parallel."""
    where = tmp_path_factory.mktemp("conformance_build")
    sources = sorted(SOURCE.glob("*.c"))
    breaking = [s for s in sources if '#include "broken.h"' in s.read_text()]
    common = [s for s in sources if s not in breaking]
    jobs = [[compiler, *FLAGS, "-o", where / "lora-conformance", *sources, "-lm"]]
    jobs += [[compiler, "-std=c99", "-O0", "-c", s, "-o", where / f"{s.stem}.o"] for s in common]
    for name in BREAKS:
        jobs += [[compiler, "-std=c99", "-O0", f"-DCONFORMANCE_BREAK={name}", "-c", s,
                  "-o", where / f"{s.stem}-{name}.o"] for s in breaking]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        list(pool.map(_run_command, jobs))
        links = [[compiler, "-o", where / f"lora-conformance-{name}",
                  *[where / f"{s.stem}.o" for s in common],
                  *[where / f"{s.stem}-{name}.o" for s in breaking], "-lm"] for name in BREAKS]
        list(pool.map(_run_command, links))
    return {None: where / "lora-conformance", **{name: where / f"lora-conformance-{name}" for name in BREAKS}}


@pytest.fixture(scope="module")
def vectors(tmp_path_factory):
    out = tmp_path_factory.mktemp("vectors")
    done = subprocess.run([sys.executable, "-m", "lora_ref.cli", "vectors", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture(scope="module")
def manifest(vectors):
    return json.loads((vectors / "manifest.json").read_text())


_CODES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "U8": "u1"}


def _read_case(vectors, case):
    """The case file's tensors as NumPy arrays (bfloat16 left as its raw uint16 bits)."""
    blob = (vectors / case["file"]).read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    header.pop("__metadata__", None)
    data = blob[8 + n:]
    return {name: np.frombuffer(data[t["data_offsets"][0]:t["data_offsets"][1]], _CODES[t["dtype"]])
            .reshape(t["shape"]) for name, t in header.items()}


def _run(program, vectors):
    done = subprocess.run([str(program), str(vectors)], capture_output=True, text=True, timeout=60)
    lines = {}
    for line in done.stdout.splitlines():
        if line.startswith(("PASS ", "FAIL ", "SKIP ")):
            verdict, kind, name, output, detail = line.split(None, 4)
            lines[(name, output)] = (verdict, kind, detail)
    return done, lines


def _outputs(manifest, keep):
    """{(case name, output name)} of the cases keep(case) selects."""
    return {(c["name"], o) for c in manifest["cases"] if keep(c) for o in c["outputs"]}


def _failed(lines):
    return {key for key, (verdict, _, _) in lines.items() if verdict == "FAIL"}


def test_the_c_consumer_passes_every_case_of_its_kinds(built, vectors, manifest):
    done, lines = _run(built[None], vectors)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr
    checked = _outputs(manifest, lambda c: c["kind"] in CHECKED_KINDS)
    passed = {key for key, (verdict, _, _) in lines.items() if verdict == "PASS"}
    assert passed == checked                      # every output of the four kinds, each passing
    assert not _failed(lines)
    skipped = {c["name"] for c in manifest["cases"] if c["kind"] not in CHECKED_KINDS}
    assert {name for (name, output), (v, _, _) in lines.items() if v == "SKIP"} == skipped
    assert all(output == "(case)" for (_, output), (v, _, _) in lines.items() if v == "SKIP")
    n_cases = sum(c["kind"] in CHECKED_KINDS for c in manifest["cases"])
    summary = (f"conformance: all pass: {n_cases} cases, {len(checked)} outputs checked, 0 failed; "
               f"{len(skipped)} cases skipped")
    assert summary in done.stdout
    ratios = [float(detail.split()[1]) for _, (_, _, detail) in lines.items() if detail.startswith("err/bound")]
    assert len(ratios) == len(checked) and max(ratios) <= 1
    for kind in CHECKED_KINDS:                    # every kind and both float dtypes really ran
        assert {c["dtype"] for c in manifest["cases"] if c["kind"] == kind} >= {"float64", "float32"}


def _adapters_used(case, output):
    """The params of the adapters an output of an adapter_set / mixed_batch case is made from."""
    params = case["params"]
    names = {"y": params.get("active", params.get("names")), "W_merged": params.get("merged")}[output]
    return [a for a in params["adapters"] if a["name"] in names]


def _touched(manifest, linear, adapter):
    """{(case, output)}: every output of the linear cases where linear(params) holds, and the
    outputs of the several-adapter cases that use an adapter where adapter(params) holds."""
    return _outputs(manifest, lambda c: c["kind"] in ("lora_linear", "dora_linear") and linear(c["params"])) | {
        (c["name"], o) for c in manifest["cases"] if c["kind"] in ("adapter_set", "mixed_batch")
        for o in c["outputs"] if any(adapter(a) for a in _adapters_used(c, o))}


def _predicted(name, vectors, manifest):
    """{(case, output)} that the mistake `name` must fail, from the manifest and the case files."""
    serving = ("lora_shrink", "lora_expand")
    if name == "scale":                           # alpha instead of alpha / r: wrong unless r = 1
        return _touched(manifest, lambda p: p["r"] != 1, lambda a: a["r"] != 1)
    if name == "rslora":                          # alpha / r instead of alpha / sqrt(r)
        def rslora(p):
            return p["use_rslora"] and p["r"] != 1
        return _touched(manifest, rslora, rslora)
    if name == "layout":                          # A read transposed: wherever an A is used
        return _touched(manifest, lambda p: True, lambda a: True)
    if name == "dora_axis":                       # only a square V can be normed the wrong way
        return _outputs(manifest, lambda c: c["kind"] == "dora_linear"
                        and len(set(c["inputs"]["W"]["shape"])) == 1)
    if name == "dora_exact":                      # the norm's term left out of the exact gradients
        return {(c["name"], o) for c in manifest["cases"] if c["kind"] == "dora_linear"
                for o in ("dA_exact", "dB_exact")}
    if name == "merge_transpose":                 # W + D instead of W + D^T: only a square stored W shows it
        return {(c["name"], "W_merged") for c in manifest["cases"] if c["kind"] == "adapter_set"
                and c["params"]["fan_in_fan_out"] and len(set(c["inputs"]["W"]["shape"])) == 1}
    if name == "minus_one":                       # the cases with a token that has no adapter
        return _outputs(manifest, lambda c: c["kind"] in serving
                        and bool(np.any(_read_case(vectors, c)["indices"] == -1)))
    if name == "slice_offset":                    # slices not packed side by side from column 0
        def unpacked(c):
            if c["kind"] != "lora_expand":
                return False
            offsets, widths = zip(*c["params"]["slices"])
            return list(offsets) != np.cumsum((0,) + widths[:-1]).tolist()
        return _outputs(manifest, unpacked)
    raise AssertionError(name)


@pytest.mark.parametrize("name", BREAKS)
def test_each_broken_build_fails_exactly_the_cases_its_mistake_touches(name, built, vectors, manifest):
    done, lines = _run(built[name], vectors)
    predicted = _predicted(name, vectors, manifest)
    assert predicted, f"no case exercises CONFORMANCE_BREAK={name}: the vectors lost a case"
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr
    assert f"BROKEN BUILD (CONFORMANCE_BREAK={name})" in done.stdout
    assert _failed(lines) == predicted
    # everything else still passes: the mistake is caught by name, not by a crash
    assert {key for key, (v, _, _) in lines.items() if v == "PASS"} == (
        _outputs(manifest, lambda c: c["kind"] in CHECKED_KINDS) - predicted)


def test_every_break_in_broken_h_is_tested():
    text = (SOURCE / "broken.h").read_text()
    listed = text[text.index("BREAKS[][2] = {"):text.index("};", text.index("BREAKS[][2] = {"))]
    names = {line.split('"')[1] for line in listed.splitlines() if line.strip().startswith('{"')}
    assert names == set(BREAKS)


def test_the_readme_table_has_a_row_for_every_break():
    text = (SOURCE / "README.md").read_text()
    table = text[text.index("## Broken builds"):text.index("An unknown name is refused")]
    rows = [line.split("|")[1].strip().strip("`") for line in table.splitlines() if line.startswith("| `")]
    assert rows == list(BREAKS)


def test_an_unknown_break_name_is_refused(compiler, tmp_path, vectors):
    program = _build(compiler, tmp_path / "typo", "scael")
    done = subprocess.run([str(program), str(vectors)], capture_output=True, text=True)
    assert done.returncode == 2 and "CONFORMANCE_BREAK=scael" in done.stderr and "scale" in done.stderr


def test_damaged_vectors_fail_with_a_reason(built, vectors, tmp_path, manifest):
    """A changed byte, another format version: a clear FAIL or refusal, never a pass or a crash."""
    damaged = tmp_path / "damaged"
    shutil.copytree(vectors, damaged)
    case = next(c for c in manifest["cases"] if c["name"] == "plain_float64")
    path = damaged / case["file"]
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 1                                  # the last byte of the data buffer
    path.write_bytes(bytes(blob))
    done, lines = _run(built[None], damaged)
    assert done.returncode == 1
    verdict, _, detail = lines[("plain_float64", "(case)")]
    assert verdict == "FAIL" and "sha256" in detail
    (damaged / "manifest.json").write_text(json.dumps({**manifest, "format_version": 1}))
    done = subprocess.run([str(built[None]), str(damaged)], capture_output=True, text=True)
    assert done.returncode == 2 and "format_version 1" in done.stderr
