"""Turn any HF causal LM into its fake-quantized student without forking model files.

Decoder linears are every `nn.Linear` under `model.model.layers` (q, k, v, o, gate, up, down); they
become `QuantLinear`s quantizing weight (per channel) and input (per token). The outputs of `k_proj`
and `v_proj` are the KV cache (before RoPE, as the reference) and get the KV spec. Works for Llama
1/2/3 (GQA), Mistral, Qwen2 and anything else with `k_proj`/`v_proj` linears.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from torch import nn

from qat_lightning.coerce import as_config
from qat_lightning.quant.modules import QuantEmbedding, QuantLinear
from qat_lightning.quant.spec import QuantConfig

__all__ = [
    "iter_quant_linears",
    "quant_summary",
    "quantization_enabled",
    "quantize_model",
    "set_quantization_enabled",
]

KV_PROJECTIONS = ("k_proj", "v_proj")


def as_quant_config(cfg: Any) -> QuantConfig:
    """A `QuantConfig` from itself, a mapping of its fields or an OmegaConf DictConfig (Hydra's `cfg.quant`)."""
    return as_config(QuantConfig, cfg, "quant")


def _head_dim(config: Any) -> int:
    head_dim = getattr(config, "head_dim", None)
    return head_dim or config.hidden_size // config.num_attention_heads


def _decoder_layers(model: nn.Module) -> nn.Module:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.Module):
        name = type(model).__name__
        raise ValueError(f"expected a HF causal LM with decoder layers at model.model.layers, got {name}")
    return layers


def _untie_lm_head(model: nn.Module) -> None:
    """Give lm_head its own copy of a weight tied to the input embeddings (student only)."""
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and emb is not None and head.weight is emb.weight:
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
    if getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False  # so a later tie_weights() does not re-tie them


def quantize_model(model: nn.Module, cfg: QuantConfig | Mapping, inplace: bool = False) -> nn.Module:
    """Build the fake-quantized student of `model` (a deep copy unless `inplace`).

    Args:
        model: a HF causal LM with `model.model.layers` (Llama, Mistral, Qwen2, ...).
        cfg: a `QuantConfig` (or a dict / DictConfig of its fields).
        inplace: modify `model` itself instead of a copy (saves memory when the FP model is not needed).

    Returns:
        The student, with `student.quant_config = cfg`. With every bit width >= 16 its logits equal
        the model's exactly.
    """
    cfg = as_quant_config(cfg)
    if any(isinstance(m, (QuantLinear, QuantEmbedding)) for m in model.modules()):
        raise ValueError("model is already quantized (it contains QuantLinear modules)")
    layers = _decoder_layers(model)  # validate before copying
    student = model if inplace else copy.deepcopy(model)
    layers = _decoder_layers(student)
    head_dim = _head_dim(student.config)

    targets = [(f"model.layers.{n}", m) for n, m in layers.named_modules() if isinstance(m, nn.Linear)]
    for name, linear in targets:
        if cfg.is_skipped(name):
            continue
        leaf = name.rsplit(".", 1)[-1]
        out_spec = cfg.kv_spec(name, head_dim) if leaf in KV_PROJECTIONS else None
        new = QuantLinear.from_linear(linear, cfg.weight_spec(name), cfg.act_spec(name), out_spec)
        student.set_submodule(name, new)

    if cfg.quantize_lm_head and not cfg.is_skipped("lm_head"):
        _untie_lm_head(student)
        head = student.get_output_embeddings()
        if not isinstance(head, nn.Linear):
            raise ValueError(f"quantize_lm_head needs an nn.Linear lm_head, got {type(head).__name__}")
        new_head = QuantLinear.from_linear(head, cfg.weight_spec("lm_head"), cfg.act_spec("lm_head"))
        student.set_output_embeddings(new_head)
    if cfg.quantize_embeddings:
        emb = student.get_input_embeddings()
        spec = cfg.weight_spec("model.embed_tokens")
        if spec.granularity != "channel" or spec.learnable:
            raise ValueError("quantize_embeddings needs w_granularity='channel' and lsq=False (one scale per row)")
        student.set_input_embeddings(QuantEmbedding.from_embedding(emb, spec))

    student.quant_config = cfg
    return student


def iter_quant_linears(model: nn.Module) -> Iterator[tuple[str, QuantLinear]]:
    """(name, module) for every `QuantLinear` in `model`, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            yield name, module


def quant_summary(model: nn.Module) -> dict[str, int]:
    """Flat counts for logs and results.json.

    Keys: num_quant_linears (QuantLinear modules), num_quantized_linears (with any spec enabled),
    w{b}_linears / a{b}_linears (counts by bit width, 16 = full precision), kv_quantized (linears whose
    output is quantized), lsq_params (elements of learnable scales), quantized_embeddings.
    """
    out: dict[str, int] = {"num_quant_linears": 0, "num_quantized_linears": 0, "kv_quantized": 0, "lsq_params": 0}
    w_bits, a_bits = Counter(), Counter()
    for _, m in iter_quant_linears(model):
        out["num_quant_linears"] += 1
        specs = (m.weight_spec, m.act_spec, m.out_spec)
        out["num_quantized_linears"] += any(s.enabled for s in specs)
        out["kv_quantized"] += m.out_spec.enabled
        w_bits[min(m.weight_spec.bits, 16)] += 1
        a_bits[min(m.act_spec.bits, 16)] += 1
        if m.weight_scale is not None:
            out["lsq_params"] += m.weight_scale.numel()
    out.update({f"w{b}_linears": n for b, n in sorted(w_bits.items())})
    out.update({f"a{b}_linears": n for b, n in sorted(a_bits.items())})
    out["quantized_embeddings"] = sum(isinstance(m, QuantEmbedding) for m in model.modules())
    return out


def set_quantization_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch fake quantization on or off in every quantized module (off: plain Linear/Embedding)."""
    for m in model.modules():
        if isinstance(m, (QuantLinear, QuantEmbedding)):
            m.quant_enabled = bool(enabled)


@contextmanager
def quantization_enabled(model: nn.Module, enabled: bool) -> Iterator[nn.Module]:
    """Context manager form of `set_quantization_enabled`; restores each module's previous state."""
    modules = [m for m in model.modules() if isinstance(m, (QuantLinear, QuantEmbedding))]
    before = [m.quant_enabled for m in modules]
    try:
        for m in modules:
            m.quant_enabled = bool(enabled)
        yield model
    finally:
        for m, state in zip(modules, before):
            m.quant_enabled = state
