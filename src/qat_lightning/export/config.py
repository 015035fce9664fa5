"""`ExportConfig`: the Hydra `export` group (where and how a trained student is written as real integers)."""

from __future__ import annotations

from dataclasses import dataclass

FORMAT_VERSION = "qat-lightning-v1"
FORMATS = (FORMAT_VERSION, "native", "gguf", "compressed-tensors")  # "native" is the qat-lightning-v1 layout
FLOAT_DTYPES = ("float16", "bfloat16", "float32")
GGUF_FLOAT_TYPES = ("f16", "f32")


@dataclass
class ExportConfig:
    """How `export_student` (native) or `export.gguf.export_gguf` (gguf) writes a model.

    Args:
        out_dir: target folder; None means ``<run dir>/export``.
        format: "qat-lightning-v1" / "native" (our safetensors layout, read by `load_exported`), "gguf"
            (a llama.cpp file of a quant=q4_0 / q8_0 student: its codes as they are, docs/GGUF.md) or
            "compressed-tensors" (a transformers / vLLM checkpoint of a W4A16 / W8A16 / W8A8 student, in the
            student's dtype, docs/COMPRESSED_TENSORS.md).
        scale_dtype: dtype of stored scales (native). float16 halves their size; the loader decodes with
            exactly the stored values, so the exported model is self-consistent whatever is chosen.
        fp_dtype: dtype of the parameters kept in full precision (native: embeddings, norms, lm_head,
            biases). float16 by default so the size is compared honestly with an fp16 checkpoint.
        gguf_file: file name of the GGUF inside `out_dir`.
        gguf_dtype: f16 | f32, the GGUF type of tensors that are not quantized (norms are always F32).
        gguf_source: the GGUF the model was converted from, whose tokenizer is copied verbatim; None: the
            embedded model's (`models.smollm2_gguf_path()`) when model.source is smollm2, else the tokenizer
            is written from the HF one.
        gguf_tokenizer_pre: llama.cpp's pre-tokenizer name when the tokenizer is written from HF (e.g.
            "llama-bpe"); None: llama.cpp's "default".
        key_center_pairs: before writing a GGUF, give k_proj a bias that removes the keys' mean on this many
            of RoPE's slowest pairs (`export/key_center.py`; lowers a q4_0 KV cache's cost); 0: off.
        key_center_sequences: generated-corpus sequences the keys' mean is taken over (data-free).
    """

    out_dir: str | None = None
    format: str = FORMAT_VERSION
    scale_dtype: str = "float16"
    fp_dtype: str = "float16"
    gguf_file: str = "model.gguf"
    gguf_dtype: str = "f16"
    gguf_source: str | None = None
    gguf_tokenizer_pre: str | None = None
    key_center_pairs: int = 0
    key_center_sequences: int = 128

    def __post_init__(self) -> None:
        if self.key_center_pairs < 0 or self.key_center_sequences < 1:
            raise ValueError("export.key_center_pairs must be >= 0 and export.key_center_sequences >= 1, got "
                             f"{self.key_center_pairs} / {self.key_center_sequences}")
        if self.key_center_pairs and self.format != "gguf":
            raise ValueError("export.key_center_pairs is for llama.cpp's KV cache: it needs export.format=gguf, "
                             f"got {self.format!r}")
        if self.format not in FORMATS:
            raise ValueError(f"export.format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        for key in ("scale_dtype", "fp_dtype"):
            if getattr(self, key) not in FLOAT_DTYPES:
                raise ValueError(f"export.{key} must be one of {FLOAT_DTYPES}, got {getattr(self, key)!r}")
        if self.gguf_dtype not in GGUF_FLOAT_TYPES:
            raise ValueError(f"export.gguf_dtype must be one of {GGUF_FLOAT_TYPES}, got {self.gguf_dtype!r}")
        if not self.gguf_file.endswith(".gguf") or "/" in self.gguf_file:
            raise ValueError(f"export.gguf_file must be a file name ending in .gguf, got {self.gguf_file!r}")

    @property
    def is_gguf(self) -> bool:
        return self.format == "gguf"

    @property
    def is_compressed_tensors(self) -> bool:
        return self.format == "compressed-tensors"
