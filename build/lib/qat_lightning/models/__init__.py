"""Model loading: hub ids or local paths, tiny random models, and the embedded SmolLM2-135M."""

from qat_lightning.models.byte_tokenizer import ByteTokenizer
from qat_lightning.models.config import ModelConfig
from qat_lightning.models.loading import load_model, load_model_config
from qat_lightning.models.smollm2 import convert_smollm2, smollm2_gguf_path
from qat_lightning.models.tiny import build_tiny_config, build_tiny_model

__all__ = [
    "ByteTokenizer",
    "ModelConfig",
    "build_tiny_config",
    "build_tiny_model",
    "convert_smollm2",
    "load_model",
    "load_model_config",
    "smollm2_gguf_path",
]
