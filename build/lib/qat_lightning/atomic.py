"""The one way this project writes files and folders: to a fresh temp name beside the target, then a rename.

A reader (or a crashed run's successor) sees the old version or the new one, never half of either; a stale
temp from a crash is never reused (every temp name is new), and replacing a folder moves the old one aside
before the rename and deletes it only after, so a crash at any point leaves the last good copy on disk.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_dir", "atomic_file", "write_bytes_atomic", "write_json_atomic", "write_text_atomic"]


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb") -> Iterator[Path]:
    """Yield a temp path beside `path`; on success fsync it and rename it over `path`.

    Usage: ``with atomic_file(p) as tmp: save_file(tensors, tmp)``. On an exception the temp is removed
    and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: str | os.PathLike, obj: object) -> None:
    """JSON (indented, sorted keys, trailing newline) written atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a new empty temp folder beside `path`; on success it replaces `path` (an old `path` is moved
    aside first and deleted only after the rename). On an exception the temp folder is removed and `path`
    is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
