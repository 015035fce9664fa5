"""Tiny random causal LMs (Llama or Qwen2, with GQA) built from a config in well under a second."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PretrainedConfig, Qwen2Config, Qwen2ForCausalLM


def build_tiny_config(
    arch: str = "llama",
    vocab_size: int = 259,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    max_position_embeddings: int = 512,
    bos_token_id: int = 256,
    eos_token_id: int = 257,
    pad_token_id: int | None = 258,
    tie_word_embeddings: bool = False,
) -> PretrainedConfig:
    """A Llama or Qwen2 config with GQA (`num_kv_heads` < `num_heads`); special ids default to the byte tokenizer's.

    Other folders' tests build their tiny models from this, so every test exercises the same families as
    the real teachers (Llama: no q/k/v bias; Qwen2: q/k/v bias).
    """
    if arch not in ("llama", "qwen2"):
        raise ValueError(f"unknown tiny arch {arch!r}; expected llama or qwen2")
    kwargs = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
        pad_token_id=pad_token_id, tie_word_embeddings=tie_word_embeddings,
    )
    return LlamaConfig(**kwargs) if arch == "llama" else Qwen2Config(**kwargs)


def build_tiny_model(config: PretrainedConfig, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A seeded random model: the same seed gives the same weights."""
    cls = LlamaForCausalLM if config.model_type == "llama" else Qwen2ForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    return model.to(dtype).eval()
