"""What decides a result, as a hash: the package's own source code, for the run memo and the eval cache.

`__version__` never changed while quantizers did, so caches keyed on it replayed stale numbers. A hash of
every `.py` file of the installed package changes with any code change, editable install or wheel alike.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

__all__ = ["source_hash"]


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
