"""Export a trained fake-quant student as real low-bit integers and serve it with an integer KV cache.

pack.py (int4 nibble packing) -> exporter.py (`export_student`) -> loader.py (`load_exported`,
`QuantizedLinear`) and kv_cache.py (`QuantizedKVCache`). File layout: docs/EXPORT_FORMAT.md.
Imports are lazy so that `qat_lightning.config` (which needs `ExportConfig`) does not pull in transformers.
"""

from __future__ import annotations

from qat_lightning.lazy import lazy_exports

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

__all__, __getattr__ = lazy_exports(__name__, {"FORMAT_VERSION": "config", "ExportConfig": "config", **_LAZY})
