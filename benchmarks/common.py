"""What the benchmarks share: the embedded SmolLM2-135M or a small random Llama and the llama.cpp Q4_0 preset.
(Results are written with `qat_lightning.atomic.write_json_atomic`.)"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from torch import nn

from qat_lightning.models import load_model
from qat_lightning.quant import QuantConfig, as_quant_config

KV_BITS = {"f16": 16, "q8_0": 8, "q4_0": 4}  # llama.cpp's KV cache types


def load_bench_model(name: str) -> nn.Module:
    """`smollm2`: SmolLM2-135M-Instruct (fp32); `smollm2_shapes`: a random Llama of its layer shapes, head
    untied (for timings where the weights are not at hand); `tiny`: a random 4-layer Llama with GQA (hidden 128)."""
    if name == "smollm2":
        model, _ = load_model({"source": "smollm2"})
    elif name == "smollm2_shapes":
        model, _ = load_model({"source": "tiny", "hidden_size": 576, "intermediate_size": 1536, "num_layers": 30,
                               "num_heads": 9, "num_kv_heads": 3, "vocab_size": 49152,
                               "max_position_embeddings": 2048})
    else:
        model, _ = load_model({"source": "tiny", "hidden_size": 128, "intermediate_size": 352, "num_layers": 4,
                               "num_heads": 4, "num_kv_heads": 2, "vocab_size": 512})
    return model.float()


def q4_0_config(kv: str) -> QuantConfig:
    """quant=q4_0 (conf/quant/q4_0.yaml) with the KV cache of `kv`."""
    from hydra import compose, initialize_config_dir

    conf = Path(__file__).resolve().parents[1] / "src" / "qat_lightning" / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name="quant/q4_0")  # the group file alone: its defaults chain, nothing else
    return dataclasses.replace(as_quant_config(cfg.quant), kv_bits=KV_BITS[kv])
