"""Export a trained fake-quant student as real low-bit integers and serve it with an integer KV cache.

pack.py (int4 nibble packing) -> exporter.py (`export_student`) -> loader.py (`load_exported`,
`QuantizedLinear`) and kv_cache.py (`QuantizedKVCache`). File layout: docs/EXPORT_FORMAT.md.
Imports are lazy so that `qat_lightning.config` (which needs `ExportConfig`) does not pull in transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

from qat_lightning.export.config import FORMAT_VERSION, ExportConfig

_LAZY = {
    "export_student": "exporter",
    "QuantizedKVCache": "kv_cache",
    "kv_cache_bytes": "kv_cache",
    "theoretical_kv_bytes": "kv_cache",
    "QuantizedEmbedding": "loader",
    "QuantizedLinear": "loader",
    "load_exported": "loader",
    "read_export_meta": "loader",
    "pack_int4": "pack",
    "unpack_int4": "pack",
}

__all__ = ["FORMAT_VERSION", "ExportConfig", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"qat_lightning.export.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'qat_lightning.export' has no attribute {name!r}")
