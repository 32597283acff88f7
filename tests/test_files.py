"""lora_ref.files: the safetensors reader and JSON reader every format shares."""

from __future__ import annotations

import errno
import json
import os
import stat
import struct
import subprocess
import sys

import numpy as np
import pytest
import safetensors.numpy

from lora_ref import files
from lora_ref.files import FileFormatError, StoredTensor, read_json, read_tensors, write_directory_atomically


class _MyFormatError(FileFormatError):
    pass


def _write_with_header(path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def test_tensors_come_back_in_data_order_with_their_stored_codes(tmp_path):
    a, b = np.arange(3, dtype="<f8"), np.arange(2, dtype="<f4")
    # The header lists "a" first but b's data comes first in the file.
    _write_with_header(tmp_path / "t.safetensors", {
        "a": {"dtype": "F64", "shape": [3], "data_offsets": [8, 32]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
    }, b.tobytes() + a.tobytes())
    stored = read_tensors(tmp_path / "t.safetensors")
    assert list(stored) == ["b", "a"]
    code, arr = stored["a"]
    assert isinstance(stored["a"], StoredTensor) and code == "F64" and np.array_equal(arr, a)
    assert stored["b"].code == "F32" and stored["b"].array.dtype == np.float32
    arr[0] = 7.0                                                    # writable, a copy of the file's bytes


def test_bfloat16_is_widened_exactly_to_float32(tmp_path):
    values = np.array([1.0, -2.5, 2.0 ** 127, 2.0 ** -130], dtype=np.float32)   # each exact in bfloat16
    assert not np.any(values.view(np.uint32) & 0xFFFF)             # the low halves are zero
    top_halves = (values.view(np.uint32) >> 16).astype("<u2")      # their bfloat16 encodings
    _write_with_header(tmp_path / "t.safetensors",
                       {"w": {"dtype": "BF16", "shape": [4], "data_offsets": [0, 8]}}, top_halves.tobytes())
    code, arr = read_tensors(tmp_path / "t.safetensors")["w"]
    assert code == "BF16" and arr.dtype == np.float32 and np.array_equal(arr, values)


@pytest.mark.parametrize("header, data, words", [
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "cover 8 bytes of data but the file holds 4"),
    ({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "key 'w': shape \\[3\\] of F32 needs 12"),
    ({"w": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 1]}}, b"\0", "key 'w': unknown or unsupported dtype"),
    ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, "key 'w': data starts at byte 4, expected 0"),
])
def test_damaged_files_raise_the_callers_error_naming_file_and_key(tmp_path, header, data, words):
    path = tmp_path / "bad.safetensors"
    _write_with_header(path, header, data)
    with pytest.raises(_MyFormatError, match=str(path).replace(".", r"\.") + ": .*" + words):
        read_tensors(path, error=_MyFormatError)


def test_a_file_the_library_writes_reads_back(tmp_path):
    tensors = {"z": np.ones((2, 3), np.float32), "a": np.arange(4, dtype=np.int64)}
    safetensors.numpy.save_file(tensors, str(tmp_path / "t.safetensors"))
    stored = read_tensors(tmp_path / "t.safetensors")
    assert {k: (t.code, t.array.tolist()) for k, t in stored.items()} == {
        "z": ("F32", tensors["z"].tolist()), "a": ("I64", tensors["a"].tolist())}


def test_read_json_refuses_duplicate_keys_and_bad_bytes(tmp_path):
    (tmp_path / "ok.json").write_text('{"a": [1, 2], "b": null}')
    assert read_json(tmp_path / "ok.json") == {"a": [1, 2], "b": None}
    (tmp_path / "dup.json").write_text('{"a": 1, "a": 2}')
    with pytest.raises(_MyFormatError, match="not valid JSON .*duplicate key 'a'"):
        read_json(tmp_path / "dup.json", error=_MyFormatError)
    (tmp_path / "bytes.json").write_bytes(b'{"a": "\xff"}')
    with pytest.raises(FileFormatError, match="not valid JSON"):
        read_json(tmp_path / "bytes.json")


# ============================================================================================
# Saving (issue 11, items 8, 9, 10 and the full disk of item 14)
# ============================================================================================


def _writer(text: str):
    """A ``write(folder)`` that puts one file, ``a.txt``, holding ``text``."""
    return lambda folder: (folder / "a.txt").write_text(text)


def _litter(folder) -> list[str]:
    """Temporaries a save left in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def test_a_symlink_is_followed_and_its_directory_replaced(tmp_path):
    # Item 8: the new adapter was written, then "Cannot call rmtree on a symbolic link" was raised,
    # the link was replaced by a real directory and left as litter.
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "a.txt").write_text("old")
    (tmp_path / "real" / "README.md").write_text("kept")
    (tmp_path / "links").mkdir()
    link = tmp_path / "links" / "ad"
    link.symlink_to(tmp_path / "real", target_is_directory=True)
    assert write_directory_atomically(link, _writer("new")) == link
    assert link.is_symlink() and link.resolve() == (tmp_path / "real").resolve()
    assert (tmp_path / "real" / "a.txt").read_text() == "new"
    assert (tmp_path / "real" / "README.md").read_text() == "kept"
    assert _litter(tmp_path) == [] and _litter(tmp_path / "links") == []


def test_a_dangling_symlink_gets_its_directory_created(tmp_path):
    link = tmp_path / "ad"
    link.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    write_directory_atomically(link, _writer("new"))
    assert link.is_symlink() and (tmp_path / "elsewhere" / "a.txt").read_text() == "new"


def test_a_read_only_directory_is_refused_before_anything_is_written(tmp_path):
    # Item 8: saving over a 0555 adapter swapped, then raised PermissionError and left litter.
    target = tmp_path / "ad"
    target.mkdir()
    (target / "a.txt").write_text("old")
    target.chmod(0o555)
    try:
        with pytest.raises(PermissionError, match=r"ad is read-only \(mode 0555\); .*make it writable"):
            write_directory_atomically(target, _writer("new"))
        assert (target / "a.txt").read_text() == "old" and _litter(tmp_path) == []
    finally:
        target.chmod(0o755)


def test_nothing_raised_after_the_swap(tmp_path, monkeypatch):
    # Item 8: once the new directory is in place the save has succeeded; failing to delete the old
    # one (here: every deletion fails) must not turn it into an error.
    target = tmp_path / "ad"
    write_directory_atomically(target, _writer("old"))

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(files.shutil, "rmtree", refuse)
    write_directory_atomically(target, _writer("new"))
    assert (target / "a.txt").read_text() == "new"


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_saved_directories_get_the_mode_mkdir_would(tmp_path, umask):
    # Item 9: mkdtemp made them 0700, and replacing a 0755 directory silently made it 0700.
    previous = os.umask(umask)
    try:
        os.mkdir(tmp_path / "plain")
        expected = stat.S_IMODE((tmp_path / "plain").stat().st_mode)
        assert expected == 0o777 & ~umask
        target = tmp_path / "ad"
        write_directory_atomically(target, _writer("first"))           # created
        assert stat.S_IMODE(target.stat().st_mode) == expected
        write_directory_atomically(target, _writer("second"))          # replaced
        assert stat.S_IMODE(target.stat().st_mode) == expected
        assert stat.S_IMODE((target / "a.txt").stat().st_mode) == 0o666 & ~umask
    finally:
        os.umask(previous)


KILLED_SAVE = """
import sys, time
from lora_ref.files import write_directory_atomically

def write(folder):
    (folder / "weights.bin").write_bytes(bytes(1 << 16))
    print("writing", flush=True)
    time.sleep(600)                 # killed here, mid-save

write_directory_atomically(sys.argv[1], write)
"""


def test_a_killed_save_leaves_temporaries_the_next_save_removes(tmp_path):
    # Item 10: a save killed with SIGKILL left .ad.tmp-XXXX behind, and no later save removed it.
    target = tmp_path / "ad"
    write_directory_atomically(target, _writer("old"))
    child = subprocess.Popen([sys.executable, "-c", KILLED_SAVE, str(target)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "writing\n"
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
    assert len(_litter(tmp_path)) == 1 and (target / "a.txt").read_text() == "old"
    # A temporary of a process that is still running (this one: another save in progress) stays.
    live = tmp_path / f".ad.tmp-{os.getpid()}-0123abcd"
    live.mkdir()
    other = tmp_path / ".other.tmp-1-0123abcd"                          # another target's: not ours to touch
    other.mkdir()
    write_directory_atomically(target, _writer("new"))
    assert (target / "a.txt").read_text() == "new"
    assert _litter(tmp_path) == sorted([live.name, other.name])


def test_a_full_disk_says_the_previous_directory_is_intact(tmp_path, monkeypatch):
    from lora_ref.files import DirectoryWriteError

    # Item 14: ENOSPC during a save surfaces as lora-ref's error, saying the old adapter is intact.
    target = tmp_path / "ad"
    write_directory_atomically(target, _writer("old"))

    def full(folder):
        (folder / "a.txt").write_text("partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(DirectoryWriteError, match=r"saving failed before anything was replaced \(No space left on "
                                                  r"device\); the previous .*ad is intact") as info:
        write_directory_atomically(target, full)
    assert info.value.errno == errno.ENOSPC and isinstance(info.value, OSError)
    assert (target / "a.txt").read_text() == "old" and _litter(tmp_path) == []
    with pytest.raises(DirectoryWriteError, match=r"new was not created"):
        write_directory_atomically(tmp_path / "new", full)
    assert not (tmp_path / "new").exists()


def test_errors_of_the_writer_that_are_not_os_errors_pass_through(tmp_path):
    def broken(folder):
        raise ValueError("a bug in the writer")

    with pytest.raises(ValueError, match="a bug in the writer"):
        write_directory_atomically(tmp_path / "ad", broken)
    assert list(tmp_path.iterdir()) == []


# ============================================================================================
# Item 11: the order of the tensors, and so which of two problems is reported, is the file's
# ============================================================================================

READ_ORDER = """
import sys
from lora_ref.files import read_tensors
print(" ".join(read_tensors(sys.argv[1])))
"""


def test_the_order_is_the_same_in_every_process(tmp_path):
    # The safetensors library hands tensors back in its hash map's order, which changes from
    # process to process; read_tensors sorts by the header's data offsets.
    names = [f"t{i:02d}" for i in range(24)]
    order = list(np.random.default_rng(0).permutation(names))          # data order, not name order
    header, offset = {}, 0
    for name in order:
        header[name] = {"dtype": "F32", "shape": [1], "data_offsets": [offset, offset + 4]}
        offset += 4
    _write_with_header(tmp_path / "t.safetensors", dict(sorted(header.items())), bytes(offset))
    for seed in ("0", "1", "2"):
        out = subprocess.run([sys.executable, "-c", READ_ORDER, str(tmp_path / "t.safetensors")], check=True,
                             capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": seed})
        assert out.stdout.split() == order


def test_a_failed_restore_says_where_the_previous_directory_is(tmp_path, monkeypatch):
    # Two renames (no renameat2): the new directory cannot move in, and the old one cannot move
    # back. The error must not claim the target is intact; it says where the old one is.
    from lora_ref.files import DirectoryWriteError

    target = tmp_path / "ad"
    write_directory_atomically(target, _writer("old"))
    monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    real, calls = os.rename, []

    def rename(src, dst):
        calls.append((src, dst))
        if len(calls) >= 2:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(src, dst)

    monkeypatch.setattr(files.os, "rename", rename)
    with pytest.raises(DirectoryWriteError, match=r"could not be moved back: it is complete at .*\.ad\.old-.*/x") as info:
        write_directory_atomically(target, _writer("new"))
    kept = calls[0][1]                                              # where the first rename put it
    assert str(kept) in str(info.value) and (kept / "a.txt").read_text() == "old"


def test_keep_decides_which_entries_of_the_previous_directory_are_carried_over(tmp_path):
    target = tmp_path / "d"
    write_directory_atomically(target, lambda f: [(f / n).write_text(n) for n in ("a", "b", "c")])
    (target / "sub").mkdir()
    seen = []

    def keep(entry):
        seen.append(entry.name)
        return entry.name != "b"

    write_directory_atomically(target, lambda f: (f / "a").write_text("new a"), keep=keep)
    assert sorted(p.name for p in target.iterdir()) == ["a", "c", "sub"]
    assert (target / "a").read_text() == "new a" and (target / "c").read_text() == "c"
    assert sorted(seen) == ["b", "c", "sub"]              # asked only about entries write did not produce


def test_load_dtype_is_none_or_a_float_name_for_every_loader():
    assert files.load_dtype(None) is None
    assert files.load_dtype("float32") == "float32" and files.load_dtype(np.dtype("float64")) == "float64"
    assert files.load_dtype(np.float32) == "float32" and type(files.load_dtype(np.str_("float64"))) is str
    for bad in ("float16", np.float16, "int64", "f4", "double", "<f8", int, object()):   # names only, not NumPy's aliases
        with pytest.raises(ValueError, match=r"dtype must be 'float32' or 'float64', got "):
            files.load_dtype(bad)
