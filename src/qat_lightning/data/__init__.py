"""Data-free corpus generation (the teacher writes its own data) and the DataModules that feed training.

Names are imported lazily so that reading the config schemas (`qat_lightning.data.config`) does not pull
in torch, transformers and Lightning.
"""

from __future__ import annotations

from qat_lightning.lazy import lazy_exports

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

__all__, __getattr__ = lazy_exports(__name__, _EXPORTS)
