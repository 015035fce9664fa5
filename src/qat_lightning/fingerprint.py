"""What decides a result, as a hash: the package's own source code (run memo, eval cache) and config digests.

`__version__` never changed while quantizers did, so caches keyed on it replayed stale numbers. A hash of
every `.py` file of the installed package changes with any code change, editable install or wheel alike.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

__all__ = ["digest", "source_hash"]


def digest(obj: Any, length: int = 10) -> str:
    """A short sha256 of `obj` as canonical JSON (sorted keys; non-JSON values by str): folder and cache keys."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:length]


@functools.cache
def source_hash() -> str:
    """sha256 over (relative path, bytes) of every Python file of `qat_lightning`, in path order (~10 ms)."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(b"\0")
        h.update(path.read_bytes())
    return h.hexdigest()[:16]
