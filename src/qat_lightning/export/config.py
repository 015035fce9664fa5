"""`ExportConfig`: the Hydra `export` group (where and how a trained student is written as real integers)."""

from __future__ import annotations

from dataclasses import dataclass

FORMAT_VERSION = "qat-lightning-v1"
FLOAT_DTYPES = ("float16", "bfloat16", "float32")


@dataclass
class ExportConfig:
    """How `export_student` writes a model.

    Args:
        out_dir: target folder; None means ``<run dir>/export``.
        format: layout version written to ``quant_config.json``; only "qat-lightning-v1" exists.
        scale_dtype: dtype of stored scales. float16 halves their size; the loader decodes with exactly
            the stored values, so the exported model is self-consistent whatever is chosen.
        fp_dtype: dtype of the parameters kept in full precision (embeddings, norms, lm_head, biases).
            float16 by default so the size is compared honestly with an fp16 checkpoint.
    """

    out_dir: str | None = None
    format: str = FORMAT_VERSION
    scale_dtype: str = "float16"
    fp_dtype: str = "float16"

    def __post_init__(self) -> None:
        if self.format != FORMAT_VERSION:
            raise ValueError(f"export.format must be {FORMAT_VERSION!r} (the only layout), got {self.format!r}")
        for key in ("scale_dtype", "fp_dtype"):
            if getattr(self, key) not in FLOAT_DTYPES:
                raise ValueError(f"export.{key} must be one of {FLOAT_DTYPES}, got {getattr(self, key)!r}")
