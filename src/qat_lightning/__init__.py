"""qat-lightning: data-free quantization-aware training of LLMs (LLM-QAT)."""

__version__ = "0.1.0"
