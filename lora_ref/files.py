"""Files, read and written with care: validated safetensors reading and atomic directory writes.

Every format lora-ref reads or writes (PEFT adapters in :mod:`lora_ref.peft_io`, Hugging Face
checkpoints in ``transformer_ref.checkpoints``) is a directory of a JSON config and a
``.safetensors`` file. This room holds what they share; the formats hold only their own fields
and key names.

Contract
--------
* :func:`read_tensors` checks a safetensors file's header itself before the safetensors library
  reads the data, so a damaged file raises a :class:`FileFormatError` (a ``ValueError``; each
  format passes its own subclass as ``error``) naming the file and the key, never a crash deep
  in a parser, and never an allocation larger than the file. Tensors come back in the order of
  their data in the file (the header's ``data_offsets``), so a reader's result does not depend
  on hash-map order.
* :func:`read_json` reads a UTF-8 JSON file and refuses duplicate keys (JSON parsers disagree on
  which of two equal keys wins).
* :func:`write_directory_atomically` replaces a whole directory so that readers see the old one
  or the new one, each complete. It follows a symbolic link (the directory it points to is
  replaced; the link stays), refuses a read-only directory before writing anything, gives the new
  directory the mode ``mkdir`` would (``0o777`` less the umask), removes the temporaries a killed
  save of the same target left behind, and, once the new directory is in place, never raises.
  A failure before the swap (a full disk) raises :class:`DirectoryWriteError`, saying that the
  previous directory is intact.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import math
import os
import re
import secrets
import shutil
import stat
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import safetensors.numpy

from .backend import float_dtype
from .checks import is_int

__all__ = ["DirectoryWriteError", "FileFormatError", "StoredTensor", "load_dtype", "read_json", "read_tensors",
           "write_directory_atomically"]


class FileFormatError(ValueError):
    """A file that lora-ref reads is damaged or inconsistent (the message names the file and key)."""


class DirectoryWriteError(OSError):
    """Writing a new directory failed before it replaced anything (a full disk, say): the previous
    directory, if there was one, is intact. ``errno`` is the underlying error's; ``filename`` the
    target directory; the original exception is the ``__cause__``."""


class StoredTensor(NamedTuple):
    """One tensor of a safetensors file: its stored dtype code and its values.

    ``code`` is the safetensors dtype as written in the file (``"F32"``, ``"F16"``, ``"BF16"``,
    ``"I64"``, ...); ``array`` a writable NumPy array in native byte order (``BF16`` widened
    exactly to float32, NumPy having no bfloat16). Unpacks as ``code, array = stored``.
    """

    code: str
    array: np.ndarray


# ============================================================================================
# JSON
# ============================================================================================


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def read_json(path: str | os.PathLike, *, error: type[FileFormatError] = FileFormatError) -> Any:
    """The parsed content of a UTF-8 JSON file; ``error`` ("<path>: not valid JSON (...)") for
    bytes that are not UTF-8, invalid JSON, nesting too deep, or an object with a duplicate key."""
    try:
        return json.loads(Path(path).read_bytes().decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise error(f"{path}: not valid JSON ({exc})") from None


def load_dtype(dtype: Any) -> str | None:
    """A loader's ``dtype`` argument: None (keep the stored dtypes) or the name of the float dtype,
    ``"float32"`` or ``"float64"``, that every tensor is widened to (a string or a dtype object)."""
    if dtype is None:
        return None
    try:
        target = float_dtype(dtype).name                  # the backend's one float32/float64 rule
    except TypeError:
        target = None
    if target is None or (isinstance(dtype, str) and dtype != target):  # names only: "f4", "double" refused
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    return target


# ============================================================================================
# safetensors, read with a header check of our own (so that errors name the file and key)
# ============================================================================================

# safetensors dtype code -> (little-endian NumPy dtype or None for bfloat16, bytes per element)
_ST_DTYPES: dict[str, tuple[str | None, int]] = {
    "F64": ("<f8", 8), "F32": ("<f4", 4), "F16": ("<f2", 2), "BF16": (None, 2),
    "I64": ("<i8", 8), "I32": ("<i4", 4), "I16": ("<i2", 2), "I8": ("i1", 1),
    "U64": ("<u8", 8), "U32": ("<u4", 4), "U16": ("<u2", 2), "U8": ("u1", 1), "BOOL": ("?", 1),
    "C64": ("<c8", 8),
}
_MAX_HEADER = 100_000_000                  # the safetensors library's own limit


def _parse_header(blob: bytes, where: str, error: type[FileFormatError]) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
    """Check a safetensors byte string's header; return ``{name: (dtype, shape, begin, end)}``.

    Format: 8 bytes little-endian u64 N, N bytes of JSON header, then the data buffer. The
    header maps each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets
    into the buffer) plus an optional ``"__metadata__"`` of strings; the tensors must tile the
    buffer exactly.
    """
    if len(blob) < 8:
        raise error(f"{where}: truncated: {len(blob)} bytes, shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", blob[:8])
    if n > _MAX_HEADER or 8 + n > len(blob):
        raise error(f"{where}: header length {n} does not fit in the file ({len(blob)} bytes): truncated or corrupt")
    try:
        header = json.loads(blob[8:8 + n].decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise error(f"{where}: the header is not valid JSON ({exc}): corrupt file") from None
    if not isinstance(header, dict):
        raise error(f"{where}: the header must be a JSON object, got {type(header).__name__}")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise error(f"{where}: __metadata__ must map strings to strings, got {meta!r}")
    size = len(blob) - 8 - n
    entries = {}
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise error(f"{where}: key {name!r}: entry must have exactly dtype, shape, data_offsets, got {info!r}")
        code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(code, str) or code not in _ST_DTYPES:
            raise error(f"{where}: key {name!r}: unknown or unsupported dtype {code!r}")
        if not isinstance(shape, list) or not all(is_int(s) and s >= 0 for s in shape):
            raise error(f"{where}: key {name!r}: shape must be a list of non-negative ints, got {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(is_int(o) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise error(f"{where}: key {name!r}: data_offsets must be [begin, end] with 0 <= begin <= end, got {offsets!r}")
        if math.prod(shape) * _ST_DTYPES[code][1] != offsets[1] - offsets[0]:
            raise error(f"{where}: key {name!r}: shape {shape} of {code} needs {math.prod(shape) * _ST_DTYPES[code][1]} "
                        f"bytes but data_offsets {offsets} span {offsets[1] - offsets[0]}")
        entries[name] = (code, tuple(shape), offsets[0], offsets[1])
    position = 0
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda item: (item[1][2], item[1][3])):
        if begin != position:
            raise error(f"{where}: key {name!r}: data starts at byte {begin}, expected {position}: "
                        "tensors overlap or leave a gap (corrupt file)")
        position = end
    if position != size:
        raise error(f"{where}: the tensors cover {position} bytes of data but the file holds {size}: truncated or corrupt")
    return entries


def read_tensors(path: str | os.PathLike, *, error: type[FileFormatError] = FileFormatError
                 ) -> dict[str, StoredTensor]:
    """Every tensor of a safetensors file, ``{name: StoredTensor(code, array)}``, in file order.

    File order is the order of the tensors' data (the header's ``data_offsets``). The header is
    checked first: its length fits the file, it is a JSON object without duplicate keys, each
    entry has exactly ``dtype`` (a known code), ``shape`` (non-negative ints) and
    ``data_offsets`` spanning ``prod(shape) * itemsize`` bytes, and the tensors tile the data
    buffer with no gap or overlap. Then ``safetensors.numpy.deserialize`` (the safetensors
    library's own parser) reads the data and must agree with the header. Every failure raises
    ``error`` (a :class:`FileFormatError` subclass of the caller's format) naming the file and,
    where there is one, the key. The format's own checks (which keys, shapes and dtypes it
    expects) are the caller's.
    """
    where = str(path)
    try:
        blob = Path(path).read_bytes()
    except IsADirectoryError:
        raise error(f"{where}: is a directory, expected a safetensors file") from None
    entries = _parse_header(blob, where, error)
    try:
        views = dict(safetensors.numpy.deserialize(blob))
    except Exception as exc:  # noqa: BLE001 - safetensors raises SafetensorError and others
        raise error(f"{where}: the safetensors library rejects the file: {exc}") from None
    if set(views) != set(entries):
        raise error(f"{where}: the safetensors library and the header disagree on the keys")
    out: dict[str, StoredTensor] = {}
    for name, (code, shape, _, _) in sorted(entries.items(), key=lambda item: (item[1][2], item[1][3])):
        view = views[name]
        if code != view["dtype"] or tuple(view["shape"]) != shape:
            raise error(f"{where}: key {name!r}: the safetensors library reads {view['dtype']} {view['shape']}, "
                        f"the header says {code} {shape}")
        np_dtype = _ST_DTYPES[code][0]
        if np_dtype is None:               # bfloat16 -> float32: put the 16 bits on top
            bits = np.frombuffer(view["data"], dtype="<u2").astype(np.uint32) << 16
            arr = bits.view(np.float32).reshape(shape)
        else:
            arr = np.frombuffer(view["data"], dtype=np_dtype).reshape(shape)
            arr = arr.astype(arr.dtype.newbyteorder("="))   # a writable copy in native byte order
        out[name] = StoredTensor(code, arr)
    return out


# ============================================================================================
# Atomic directory replacement
# ============================================================================================


def write_directory_atomically(path: str | os.PathLike, write: Callable[[Path], None], *,
                               keep: Callable[[Path], bool] | None = None) -> Path:
    """Create or replace directory ``path`` with what ``write(folder)`` puts into a fresh folder.

    1. A temporary directory ``.<name>.tmp-<pid>-<random>`` is made in ``path``'s parent (same
       filesystem) with ``os.mkdir``, so it gets the mode a plain ``mkdir`` would (``0o777`` less
       the umask). ``write`` fills it, entries of an existing ``path`` that ``write`` did not
       produce are hard-linked (or copied) in -- except those for which ``keep(entry)`` (an
       optional predicate on the old entry's path) is false, which go with the old directory --
       and every file is flushed to disk (``fsync``).
    2. The temporary directory takes ``path``'s place with one system call: ``rename`` when
       ``path`` does not exist; on Linux, ``renameat2(RENAME_EXCHANGE)`` when it does, which
       swaps the two directories in one atomic step. Where that call is unavailable, two renames
       (``path`` -> ``.<name>.old-<pid>-<random>/x``, temporary -> ``path``); a crash between them
       leaves the complete old directory under the ``.old`` name and the complete new one under
       the ``.tmp`` name, never a directory holding a mix.
    3. The old directory is deleted, as far as possible: the save has succeeded by then, so this
       step never raises (what it cannot delete, the next save of the same target does).

    Before step 1: a ``path`` that is a symbolic link is followed (the directory it points to is
    replaced, the link itself stays); a ``path`` that exists and is not a directory raises
    ``NotADirectoryError``; an existing directory without write permission for its owner (mode
    0555, say) raises ``PermissionError`` rather than being replaced; and temporaries
    ``.<name>.tmp-*`` / ``.<name>.old-*`` left by earlier saves of the same target whose process
    is gone (killed mid-save) are deleted.

    If ``write`` (or anything before the swap) raises, the temporary directory is removed and
    ``path`` is untouched; an ``OSError`` (``ENOSPC``: the disk is full) is raised as
    :class:`DirectoryWriteError`, which says so. Readers see either the old directory or the new
    one, each complete. Not atomic: the deletion in step 3 (harmless) and concurrent writers (the
    last swap wins). Returns ``path`` as given (the link, when it is one).
    """
    given = Path(path)
    target = Path(os.path.realpath(given)) if given.is_symlink() else given
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{str(target)!r} exists and is not a directory")
    existed = target.is_dir()
    if existed and not _owner_writable(target):
        raise PermissionError(errno.EACCES, f"{target} is read-only (mode {stat.S_IMODE(target.stat().st_mode):04o}); "
                              "lora-ref does not replace a directory you made read-only: make it writable "
                              "(chmod u+w) and save again", str(target))
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(parent, target.name)
    tmp = _fresh_directory(parent, f".{target.name}.tmp-")
    old = None
    try:
        try:
            write(tmp)
            if existed:
                for entry in target.iterdir():
                    if not (tmp / entry.name).exists() and (keep is None or keep(entry)):
                        _carry_over(entry, tmp / entry.name)
            for file in tmp.rglob("*"):
                if file.is_file():
                    _fsync(file)
            _fsync(tmp)
            if not existed:
                os.rename(tmp, target)
            elif _exchange(tmp, target):
                old = tmp                      # tmp now holds the old directory
            else:
                old = _fresh_directory(parent, f".{target.name}.old-")
                os.rename(target, old / "x")   # into a fresh empty folder: never clobbers anything
                try:
                    os.rename(tmp, target)
                except BaseException:
                    try:
                        os.rename(old / "x", target)   # put the previous directory back
                    except OSError as lost:
                        raise DirectoryWriteError(lost.errno, "saving failed, and the previous directory could not "
                                                  f"be moved back: it is complete at {old / 'x'}", str(target)) from lost
                    old.rmdir()
                    old = None
                    raise
        except DirectoryWriteError:
            raise
        except OSError as exc:
            before = f"the previous {target} is intact" if existed else f"{target} was not created"
            raise DirectoryWriteError(exc.errno, f"saving failed before anything was replaced "
                                      f"({exc.strerror or exc}); {before}", str(target)) from exc
    except BaseException:
        if old is not tmp:
            _remove_quietly(tmp)
        raise
    if old is not None:
        _remove_quietly(old)
    with contextlib.suppress(OSError):
        _fsync(parent)
    return given


def _owner_writable(folder: Path) -> bool:
    """Whether ``folder`` may be replaced: its owner may write it (mode bits, so that root, for
    whom ``os.access`` always says yes, also respects a directory made read-only)."""
    return bool(folder.stat().st_mode & stat.S_IWUSR) and os.access(folder, os.W_OK)


def _fresh_directory(parent: Path, prefix: str) -> Path:
    """``parent / (prefix + "<pid>-<8 hex digits>")``, created with mode 0o777 less the umask (as a
    plain mkdir), never an existing one. The pid says whose it is (see _remove_stale_temporaries)."""
    while True:
        folder = parent / f"{prefix}{os.getpid()}-{secrets.token_hex(4)}"
        try:
            os.mkdir(folder, 0o777)
            return folder
        except FileExistsError:
            continue


# .<name>.tmp-<pid>-<hex> (this module) or .<name>.tmp-<8 chars> (tempfile.mkdtemp, earlier versions)
_TEMPORARY = re.compile(r"(?:(?P<pid>\d+)-[0-9a-f]{8}|[a-z0-9_]{8})")


def _remove_stale_temporaries(parent: Path, name: str) -> None:
    """Delete ``.<name>.tmp-*`` and ``.<name>.old-*`` directories whose process is gone.

    A save killed mid-way (SIGKILL, a crash) leaves its temporary directory, up to the size of
    what it was writing. A temporary whose pid is a running process (another save of the same
    target, in this process or another) is left alone; one without a pid (written by an earlier
    version) counts as stale.
    """
    for kind in ("tmp", "old"):
        prefix = f".{name}.{kind}-"
        with contextlib.suppress(OSError):
            for entry in parent.iterdir():
                found = _TEMPORARY.fullmatch(entry.name[len(prefix):]) if entry.name.startswith(prefix) else None
                if found and entry.is_dir() and not entry.is_symlink() and not _alive(found["pid"]):
                    _remove_quietly(entry)


def _alive(pid: str | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True                        # exists, owned by someone else (or not a pid we can test)
    return True


def _remove_quietly(folder: Path) -> None:
    """Delete ``folder`` and what it holds, making read-only subfolders writable on the way; what
    still cannot be deleted stays (never raises: called after a save has succeeded)."""
    def retry(function: Any, name: str, *_: Any) -> None:
        with contextlib.suppress(OSError):
            for folder in (os.path.dirname(name), name):
                if os.path.isdir(folder) and not os.path.islink(folder):
                    os.chmod(folder, stat.S_IRWXU)
            function(name)

    with contextlib.suppress(OSError):
        if sys.version_info >= (3, 12):
            shutil.rmtree(folder, onexc=retry)
        else:
            shutil.rmtree(folder, onerror=retry)


def _carry_over(source: Path, dest: Path) -> None:
    def link_or_copy(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    if source.is_dir() and not source.is_symlink():
        shutil.copytree(source, dest, symlinks=True, copy_function=link_or_copy)
    elif source.is_symlink():
        os.symlink(os.readlink(source), dest)
    else:
        link_or_copy(str(source), str(dest))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap directories ``a`` and ``b`` atomically (Linux renameat2 RENAME_EXCHANGE); False where
    the system cannot (then the caller falls back to two renames)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))
