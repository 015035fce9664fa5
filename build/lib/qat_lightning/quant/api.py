"""Turn any HF causal LM into its fake-quantized student without forking model files.

Decoder linears are every `nn.Linear` under the adapter's decoder layers (q, k, v, o, gate, up, down); they
become `QuantLinear`s quantizing weight (per channel) and input (per token). The KV cache is quantized by
one `KVQuantizer` per attention block (`quant/kv.py`): before RoPE (the reference) or after it (engines).
Works for the families of `models.adapter` (Llama 1/2/3 with GQA, Mistral, Qwen2).
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from torch import nn

from qat_lightning.coerce import as_config
from qat_lightning.models.adapter import adapter_for
from qat_lightning.quant.kv import KVQuantizer, attach_kv_quantizers, iter_kv_quantizers
from qat_lightning.quant.modules import QuantEmbedding, QuantLinear
from qat_lightning.quant.spec import QuantConfig, QuantSpec

__all__ = [
    "iter_quant_linears",
    "quant_summary",
    "quantization_enabled",
    "quantize_model",
    "set_quantization_enabled",
]

def as_quant_config(cfg: Any) -> QuantConfig:
    """A `QuantConfig` from itself, a mapping of its fields or an OmegaConf DictConfig (Hydra's `cfg.quant`)."""
    return as_config(QuantConfig, cfg, "quant")


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
    if any(isinstance(m, _SWITCHABLE) for m in model.modules()):
        raise ValueError("model is already quantized (it contains QuantLinear or KVQuantizer modules)")
    ad = adapter_for(model)
    ad.decoder(model)  # validate before copying
    student = model if inplace else copy.deepcopy(model)

    for name, linear in list(ad.decoder_linears(student)):
        if cfg.is_skipped(name):
            continue
        new = QuantLinear.from_linear(linear, cfg.weight_spec(name), cfg.act_spec(name))
        student.set_submodule(name, new)
    attach_kv_quantizers(student, lambda attn: _kv_specs(cfg, attn, ad.head_dim), cfg.kv_placement)

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
        # a row (or llama.cpp's blocks of a row, estimator ggml) per token: what a lookup table can be stored as
        if spec.granularity not in ("channel", "group") or spec.learnable:
            raise ValueError("quantize_embeddings needs w_granularity channel or group and lsq=False")
        student.set_input_embeddings(QuantEmbedding.from_embedding(emb, spec))

    student.quant_config = cfg
    return student


def _kv_specs(cfg: QuantConfig, attn: str, head_dim: int):
    """(k spec, v spec) of one attention block; overrides match the k_proj / v_proj names as before."""
    skipped = [cfg.is_skipped(f"{attn}.{p}") for p in ("k_proj", "v_proj")]
    specs = [cfg.kv_spec(f"{attn}.{p}", head_dim) for p in ("k_proj", "v_proj")]
    return tuple(QuantSpec(bits=16) if skip else spec for skip, spec in zip(skipped, specs))


def iter_quant_linears(model: nn.Module) -> Iterator[tuple[str, QuantLinear]]:
    """(name, module) for every `QuantLinear` in `model`, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            yield name, module


def quant_summary(model: nn.Module) -> dict[str, int]:
    """Flat counts for logs and results.json.

    Keys: num_quant_linears (QuantLinear modules), num_quantized_linears (with any spec enabled),
    w{b}_linears / a{b}_linears (counts by bit width, 16 = full precision), kv_quantized (linears whose
    output is quantized: k_proj and v_proj of each block with a KV quantizer), lsq_params (elements of
    learnable scales), quantized_embeddings.
    """
    out: dict[str, int] = {"num_quant_linears": 0, "num_quantized_linears": 0, "kv_quantized": 0, "lsq_params": 0}
    w_bits, a_bits = Counter(), Counter()
    for _, m in iter_quant_linears(model):
        out["num_quant_linears"] += 1
        specs = (m.weight_spec, m.act_spec, m.out_spec)
        out["num_quantized_linears"] += any(s.enabled for s in specs)
        w_bits[min(m.weight_spec.bits, 16)] += 1
        a_bits[min(m.act_spec.bits, 16)] += 1
        if m.weight_scale is not None:
            out["lsq_params"] += m.weight_scale.numel()
    out.update({f"w{b}_linears": n for b, n in sorted(w_bits.items())})
    out.update({f"a{b}_linears": n for b, n in sorted(a_bits.items())})
    for _, kvq in iter_kv_quantizers(model):
        out["kv_quantized"] += int(kvq.k_spec.enabled) + int(kvq.v_spec.enabled)
    out["quantized_embeddings"] = sum(isinstance(m, QuantEmbedding) for m in model.modules())
    return out


_SWITCHABLE = (QuantLinear, QuantEmbedding, KVQuantizer)


def set_quantization_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch fake quantization on or off in every quantized module (off: plain Linear/Embedding)."""
    for m in model.modules():
        if isinstance(m, _SWITCHABLE):
            m.quant_enabled = bool(enabled)


@contextmanager
def quantization_enabled(model: nn.Module, enabled: bool) -> Iterator[nn.Module]:
    """Context manager form of `set_quantization_enabled`; restores each module's previous state."""
    modules = [m for m in model.modules() if isinstance(m, _SWITCHABLE)]
    before = [m.quant_enabled for m in modules]
    try:
        for m in modules:
            m.quant_enabled = bool(enabled)
        yield model
    finally:
        for m, state in zip(modules, before):
            m.quant_enabled = state
