"""Atomic, content-hashed files: the only way data crosses stage boundaries."""

from __future__ import annotations

import codecs
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# Suffix of every temporary file: `.dvcignore` ignores it, so a write killed half-way never changes
# DVC's hash of an output directory, and a later run can find and remove it.
TMP_SUFFIX = ".gdro-tmp"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fingerprint(obj: Any) -> str:
    """Stable hash of a JSON-able description (params, seeds, model hash) of how data was made."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


class DiskFullError(OSError):
    """No space left where a file had to be written; the message names the place and what is free."""


FULL_DISK_TEXTS = ("file write failed", "unexpected pos", "No space left on device", "ENOSPC")
"""How writers that do not raise OSError(ENOSPC) report a full disk: torch's zip writer (RuntimeError "[enforce
fail at inline_container.cc] ... file write failed" or "... unexpected pos"), safetensors (SafetensorError "... No
space left on device")."""


def _out_of_space(err: BaseException) -> bool:
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return True
    return not isinstance(err, OSError) and any(text in str(err) for text in FULL_DISK_TEXTS)


@contextmanager
def explain_full_disk(path: Path) -> Iterator[None]:
    """Re-raise a full-disk failure while writing ``path`` as one that says so, with the free space left."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - re-raised as it was unless it is a full disk
        if not _out_of_space(err):
            raise
        free = shutil.disk_usage(Path(path).parent if Path(path).parent.exists() else Path.cwd()).free
        raise DiskFullError(
            errno.ENOSPC,
            f"no space left on the device while writing {path} ({free / 2**20:.0f} MiB free): free some disk space "
            "(or point paths.* elsewhere) and rerun; finished shards and checkpoints are kept and reused",
        ) from err


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Let ``write`` fill a temp file beside ``path``, then rename it into place (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        with explain_full_disk(path):
            write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: Path, data: Any) -> Path:
    return atomic_write(path, lambda p: p.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n"))


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def text_lines(path: Path, error: type[Exception]) -> list[str]:
    """The lines of a UTF-8 text file a user wrote. A byte-order mark (Windows editors write one) is dropped, not
    read as part of the first prompt, and one of UTF-16 (what Windows PowerShell's ``>`` writes) is read as such; a
    file in another encoding raises ``error`` naming the line and the fix."""
    data = Path(path).read_bytes()
    try:
        if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            return data.decode("utf-16").splitlines()
        return data.decode("utf-8-sig").splitlines()
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise error(f"{path}:{line}: not UTF-8 text (byte 0x{data[err.start]:02x}): save the file as UTF-8") from None


def jsonl_records(path: Path, error: type[Exception], missing: str) -> list[tuple[str, Any]]:
    """The JSON value of every non-blank line of ``path``, each with its ``path:line`` for error messages.

    A missing file raises ``error(missing)``; a line that is not JSON raises ``error`` naming that line.
    """
    path = Path(path)
    if not path.is_file():
        raise error(missing)
    out = []
    for n, line in enumerate(text_lines(path, error), 1):
        if line.strip():
            try:
                out.append((f"{path}:{n}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise error(f"{path}:{n}: not JSON ({err.msg})") from None
    return out


def dir_hash(root: Path, pattern: str = "*") -> str:
    """Hash of every file's relative name and content under ``root`` (a data version)."""
    h = hashlib.sha256()
    for p in sorted(q for q in Path(root).rglob(pattern) if q.is_file()):
        h.update(str(p.relative_to(root)).encode())
        h.update(sha256_file(p).encode())
    return h.hexdigest()


def canonical_safetensors(path: Path) -> Path:
    """Rewrite a safetensors header with sorted keys, in place: the writer emits its metadata in hash-map order,
    which differs between processes, so the same weights would not give the same bytes (or DVC hash)."""
    import struct

    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        if len(text) > n:
            raise ValueError(f"{path}: canonical safetensors header is longer than the original")
        f.seek(8)
        f.write(text.ljust(n))  # same length: the tensor offsets stay valid
    return path
