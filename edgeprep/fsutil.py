"""Atomic file and directory writes.

Everything edgeprep writes goes to a temporary name in the same directory and is renamed into
place, so an interrupted run never leaves a half-written file that looks complete. The renamed file
or directory gets the mode a plain ``open()`` / ``mkdir()`` would give it under the current umask
(0644 / 0755 under umask 022): ``mkstemp`` / ``mkdtemp`` create 0600 / 0700, which would leave
report.json unreadable to a CI upload step or a teammate sharing the run directory.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


def current_umask() -> int:
    """The process's umask, without changing it where /proc tells it (os.umask can only swap it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)  # elsewhere: swap and restore (a moment with another umask)
    os.umask(old)
    return old


def plain_file_mode(path: Path) -> None:
    """Give a file another library wrote the mode a plain open() would (some write 0600)."""
    os.chmod(path, 0o666 & ~current_umask())


def write_bytes_atomic(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    # numpy scalars and paths show up in metrics; keep report.json plain JSON.
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a fresh temporary directory next to ``final``; on success it replaces ``final``.

    On any exception the temporary directory is removed and ``final`` is left untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~current_umask())
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        trash = final.with_name(f".{final.name}.old")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)


def _package_files(path: Path) -> list[Path]:
    return sorted(p for p in Path(path).rglob("*") if p.is_file())


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """sha256 of a file, or of a package directory (a Core ML .mlpackage): every file's relative
    path and contents in sorted order, so renaming or editing any file inside changes it."""
    h = hashlib.sha256()
    path = Path(path)
    files = _package_files(path) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            h.update(f.relative_to(path).as_posix().encode() + b"\0")
        with open(f, "rb") as fh:
            while block := fh.read(chunk_bytes):
                h.update(block)
    return h.hexdigest()


def path_bytes(path: Path) -> int:
    """Bytes on disk of a model file, or the sum over a package directory's files."""
    path = Path(path)
    return sum(f.stat().st_size for f in _package_files(path)) if path.is_dir() else path.stat().st_size
