"""What the benchmarks share: the embedded SmolLM2-135M or a small random Llama, and writing results."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from qat_lightning.models import load_model


def load_bench_model(name: str) -> nn.Module:
    """`smollm2`: SmolLM2-135M-Instruct (fp32); `tiny`: a random 4-layer Llama with GQA (hidden 128)."""
    if name == "smollm2":
        model, _ = load_model({"source": "smollm2"})
    else:
        model, _ = load_model({"source": "tiny", "hidden_size": 128, "intermediate_size": 352, "num_layers": 4,
                               "num_heads": 4, "num_kv_heads": 2, "vocab_size": 512})
    return model.float()


def write_json(path: str | Path, obj) -> None:
    """Write `obj` as JSON under a temporary name, then rename: a killed run leaves no half-written result."""
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.rename(path)
