"""lora_ref.files: the safetensors reader and JSON reader every format shares."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import safetensors.numpy

from lora_ref.files import FileFormatError, StoredTensor, read_json, read_tensors


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
