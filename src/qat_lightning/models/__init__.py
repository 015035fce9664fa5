"""Model loading: hub ids or local paths, tiny random models, and the embedded SmolLM2-135M.

Names are imported lazily so that reading the config schema (`qat_lightning.models.config`) does not pull in
transformers.
"""

from __future__ import annotations

from qat_lightning.lazy import lazy_exports

_EXPORTS = {
    "ByteTokenizer": "byte_tokenizer",
    "ModelConfig": "config",
    "build_tiny_config": "tiny",
    "build_tiny_model": "tiny",
    "convert_smollm2": "smollm2",
    "load_model": "loading",
    "load_model_config": "loading",
    "smollm2_gguf_path": "smollm2",
}

__all__, __getattr__ = lazy_exports(__name__, _EXPORTS)
