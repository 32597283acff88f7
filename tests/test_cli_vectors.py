"""``lora-ref vectors``: errors are one line on stderr (issue 11, item 12), and an existing output
folder is treated as ``lora-ref demo`` treats it (refused without ``--force``)."""

from __future__ import annotations

import errno
import os

import pytest

from lora_ref.cli import main
from lora_ref.vectors import load_vectors


def one_error_line(capsys) -> str:
    """What the command printed, which must be one line on stderr and nothing on stdout."""
    out = capsys.readouterr()
    assert out.out == "" and out.err.count("\n") == 1 and out.err.startswith("lora-ref vectors: "), out
    return out.err


def test_an_existing_folder_is_refused_without_force_as_demo_does(tmp_path, capsys):
    out = tmp_path / "v"
    out.mkdir()
    (out / "README.md").write_text("mine")
    assert main(["vectors", str(out)]) == 1
    assert one_error_line(capsys) == (f"lora-ref vectors: {str(out)!r} already exists and is not empty; use --force "
                                      "to write the vectors into it (their files are replaced, other files are left "
                                      "alone)\n")
    assert sorted(p.name for p in out.iterdir()) == ["README.md"]
    assert main(["vectors", str(out), "--force"]) == 0
    assert (out / "README.md").read_text() == "mine" and load_vectors(out)
    capsys.readouterr()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["vectors", str(empty)]) == 0                         # an empty folder holds nothing to lose


@pytest.mark.parametrize("where, reason", [
    ("/proc/lora-ref-vectors", "No such file or directory"),
    ("{tmp}/file/v", "Not a directory"),
])
def test_a_folder_that_cannot_be_made_is_one_line(tmp_path, capsys, where, reason):
    (tmp_path / "file").write_text("")
    out = where.format(tmp=tmp_path)
    assert main(["vectors", out]) == 1
    err = one_error_line(capsys)
    assert err.startswith("lora-ref vectors: cannot write to '") and err.endswith(f"': {reason}\n")


def test_a_folder_that_cannot_be_written_is_one_line(tmp_path, capsys, monkeypatch):
    # A read-only folder, as root sees one too (root writes into a 0555 folder regardless).
    import lora_ref.vectors

    def refuse(path, tensors, metadata):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    monkeypatch.setattr(lora_ref.vectors, "_write_file", refuse)
    assert main(["vectors", str(tmp_path / "v")]) == 1
    err = one_error_line(capsys)
    assert err.startswith(f"lora-ref vectors: cannot write to '{tmp_path / 'v'}/") and err.endswith(
        ".safetensors': Permission denied\n")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder; the test above covers it")
def test_a_read_only_folder(tmp_path, capsys):
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o555)
    try:
        assert main(["vectors", str(tmp_path / "ro" / "v")]) == 1
        assert "Permission denied" in one_error_line(capsys)
    finally:
        (tmp_path / "ro").chmod(0o755)


def test_bad_arguments_go_to_stderr(tmp_path, capsys):
    assert main(["vectors", str(tmp_path / "v"), "--seed", "-1"]) == 2
    assert "--seed must be a non-negative integer, got -1" in one_error_line(capsys)
    (tmp_path / "file").write_text("")
    assert main(["vectors", str(tmp_path / "file")]) == 1
    assert "is a file" in one_error_line(capsys)


def test_the_output_folder_rule_is_shared_with_the_demo(tmp_path):
    from lora_ref.commands._common import output_folder_problem

    assert output_folder_problem(tmp_path / "new", "OUT_DIR", False, "it") is None        # created later
    assert output_folder_problem(tmp_path, "OUT_DIR", False, "it") is None                 # empty
    (tmp_path / "f").write_text("x")
    assert output_folder_problem(tmp_path / "f", "--out", False, "it", file_status=2) == (
        f"--out must be a directory, but {str(tmp_path / 'f')!r} is a file", 2)
    assert output_folder_problem(tmp_path, "OUT_DIR", False, "the files into it") == (
        f"{str(tmp_path)!r} already exists and is not empty; use --force to write the files into it", 1)
    assert output_folder_problem(tmp_path, "OUT_DIR", True, "it") is None
