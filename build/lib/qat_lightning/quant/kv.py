"""The one owner of KV-cache quantization: a `KVQuantizer` attached to each attention block.

Why one owner: training, evaluation, export and the integer KV cache must agree on *what* is quantized
(the spec) and *where*:

- ``pre_rope``: the outputs of k_proj / v_proj, before RoPE (the paper and the reference). Applied by
  forward hooks on the two projections, so HF's attention code runs unchanged.
- ``post_rope``: the keys and values the attention reads, keys after RoPE (what llama.cpp and vLLM store in
  their caches). Applied through transformers' attention interface: the model's attention implementation is
  swapped for a registered wrapper (`qat_kv_sdpa` / `qat_kv_eager`) that quantizes K/V and then calls the
  original one. No model file is forked.

In both places K/V are quantized in the k_proj output layout ``(B, T, n_kv * head_dim)``, so a spec means
the same thing wherever it applies (per token across all KV heads, per head, or blocks along the head dim).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from qat_lightning.quant.primitives import fake_quantize
from qat_lightning.quant.spec import DISABLED_BITS, KV_PLACEMENTS, QuantSpec

__all__ = ["KVQuantizer", "attach_kv_quantizers", "iter_kv_quantizers", "kv_quantizer_of"]

ATTR = "kv_quantizer"  # the attention block's attribute holding its KVQuantizer
_WRAPPED = {"sdpa": "qat_kv_sdpa", "eager": "qat_kv_eager"}


class KVQuantizer(nn.Module):
    """Fake-quantizes one attention block's K and V (no parameters, nothing in the state dict)."""

    def __init__(self, k_spec: QuantSpec, v_spec: QuantSpec, placement: str, num_kv_heads: int, head_dim: int):
        super().__init__()
        if placement not in KV_PLACEMENTS:
            raise ValueError(f"KV placement must be one of {', '.join(KV_PLACEMENTS)}, got {placement!r}")
        self.k_spec, self.v_spec, self.placement = k_spec, v_spec, placement
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.quant_enabled = True
        width = num_kv_heads * head_dim
        for spec in (k_spec, v_spec):
            size = spec.group_size if spec.granularity == "group" else spec.head_dim
            if spec.enabled and spec.granularity in ("group", "head") and width % size:
                raise ValueError(f"KV {spec.granularity} size {size} does not divide n_kv * head_dim = {width}")

    @property
    def enabled(self) -> bool:
        return self.quant_enabled and (self.k_spec.enabled or self.v_spec.enabled)

    def quantize_flat(self, x: torch.Tensor, which: str) -> torch.Tensor:
        """x (B, T, n_kv * head_dim), the k_proj / v_proj output layout -> fake-quantized x."""
        if not self.quant_enabled:
            return x
        return fake_quantize(x, self.k_spec if which == "k" else self.v_spec)

    def quantize_heads(self, x: torch.Tensor, which: str) -> torch.Tensor:
        """x (B, n_kv, T, head_dim), the layout attention reads -> fake-quantized x (same layout)."""
        spec = self.k_spec if which == "k" else self.v_spec
        if not self.quant_enabled or not spec.enabled:
            return x
        flat = x.transpose(1, 2).flatten(2)  # (B, T, n_kv * head_dim)
        return fake_quantize(flat, spec).unflatten(-1, (x.shape[1], x.shape[3])).transpose(1, 2)

    # forward hooks of k_proj / v_proj (pre-RoPE placement); bound methods, so deepcopy rebinds them
    def _hook_k(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return self.quantize_flat(output, "k")

    def _hook_v(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return self.quantize_flat(output, "v")

    def extra_repr(self) -> str:
        bits = [s.bits if s.enabled else DISABLED_BITS for s in (self.k_spec, self.v_spec)]
        return f"k_bits={bits[0]}, v_bits={bits[1]}, granularity={self.k_spec.granularity}, {self.placement}"


def _wrapped_attention(inner: str):
    """An attention function that quantizes post-RoPE K/V (B, n_kv, T, D), then runs `inner` (sdpa | eager)."""

    def attention(module, query, key, value, attention_mask, **kwargs):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        from transformers.models.llama.modeling_llama import eager_attention_forward

        kvq = getattr(module, ATTR, None)
        if kvq is not None and kvq.placement == "post_rope":
            key, value = kvq.quantize_heads(key, "k"), kvq.quantize_heads(value, "v")
        fn = eager_attention_forward if inner == "eager" else ALL_ATTENTION_FUNCTIONS[inner]
        return fn(module, query, key, value, attention_mask, **kwargs)

    return attention


def _register_attention() -> None:
    """Register the wrappers (and their mask functions, the inner implementation's) once per process."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    for inner, name in _WRAPPED.items():
        if name not in ALL_ATTENTION_FUNCTIONS:
            ALL_ATTENTION_FUNCTIONS.register(name, _wrapped_attention(inner))
            ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[inner])


def _use_wrapped_attention(model: nn.Module) -> None:
    _register_attention()
    config = model.config
    impl = config._attn_implementation or "sdpa"
    if impl in _WRAPPED.values():
        return
    from qat_lightning.rotate.online import r3_join, r3_split

    r3, inner = r3_split(impl)  # an online R3 rotation wraps attention: the KV quantizer goes inside it
    if inner in _WRAPPED.values():
        return
    if inner not in _WRAPPED:
        raise ValueError(f"post-RoPE KV quantization wraps sdpa or eager attention, not {inner!r}")
    config._attn_implementation = r3_join(r3, _WRAPPED[inner])


def attach_kv_quantizers(model: nn.Module, k_spec_of, placement: str) -> None:
    """Give every attention block of `model` a `KVQuantizer` (in place).

    Args:
        model: a HF causal LM of a supported family (see `models.adapter`).
        k_spec_of: ``(layer prefix "model.layers.i.self_attn") -> (k spec, v spec)``.
        placement: ``pre_rope`` | ``post_rope``.
    """
    from qat_lightning.models.adapter import adapter_for

    ad = adapter_for(model)
    any_post = False
    for prefix, layer in ad.named_layers(model):
        attn = ad.attention(layer)
        if isinstance(getattr(attn, ATTR, None), KVQuantizer):
            raise ValueError(f"{prefix}.self_attn already has a KV quantizer")
        k_spec, v_spec = k_spec_of(f"{prefix}.self_attn")
        if not (k_spec.enabled or v_spec.enabled):
            continue
        kvq = KVQuantizer(k_spec, v_spec, placement, ad.num_kv_heads, ad.head_dim)
        attn.add_module(ATTR, kvq)
        if placement == "pre_rope":
            attn.k_proj.register_forward_hook(kvq._hook_k)
            attn.v_proj.register_forward_hook(kvq._hook_v)
        else:
            any_post = True
    if any_post:
        _use_wrapped_attention(model)


def kv_quantizer_of(attn: nn.Module) -> KVQuantizer | None:
    """The KV quantizer of an attention block, or None when its cache is not quantized."""
    kvq = getattr(attn, ATTR, None)
    return kvq if isinstance(kvq, KVQuantizer) else None


def iter_kv_quantizers(model: nn.Module) -> Iterator[tuple[str, KVQuantizer]]:
    for name, module in model.named_modules():
        if isinstance(module, KVQuantizer):
            yield name, module
