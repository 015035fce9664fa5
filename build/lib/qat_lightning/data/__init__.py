"""Data-free corpus generation (the teacher writes its own data) and the DataModules that feed training.

Names are imported lazily so that reading the config schemas (`qat_lightning.data.config`) does not pull
in torch, transformers and Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DataConfig": "config",
    "GenerationConfig": "config",
    "generate_corpus": "generate",
    "generate_batch": "generate",
    "load_generated": "shards",
    "corpus_is_complete": "shards",
    "pack_documents": "packing",
    "BlockDataset": "packing",
    "GeneratedDataModule": "datamodules",
    "TextCorpusDataModule": "datamodules",
    "MixedDataModule": "datamodules",
    "build_datamodule": "datamodules",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
    return getattr(module, name)
