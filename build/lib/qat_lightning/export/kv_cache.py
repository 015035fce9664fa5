"""A KV cache that stores K and V as integer codes + per-token scales: the paper's inference path.

Training quantizes the outputs of k_proj / v_proj per token (across all KV heads) BEFORE RoPE. HF
attention rotates the keys before handing them to the cache, and transformers 5.x passes no cos/sin to
`Cache.update`, so the cache captures them itself with a forward hook on the model's rotary embedding.
On `update` it un-rotates the new keys (exact inverse of RoPE), quantizes them per token with the
training spec, and stores codes + scales + the token positions. On read it dequantizes and re-applies
RoPE for the stored positions. V is stored as is (no rotation). A student whose KV quantizer sits after
RoPE (`quant.kv_placement=post_rope`, what inference engines store) has its keys stored as they come.

When the model's k_proj / v_proj outputs are already on the quantization grid (the exported model and
the fake-quant student both quantize them), re-quantizing recovers the very same codes, so generation
with this cache equals generation of the fake-quant student with an ordinary cache (up to float
rounding of the recomputed scale, ~1e-7 relative).

Storage per layer, per token: K and V codes (nibble-packed for <= 4 bits, one byte for 5..8), one scale
per token (or per head per token) in `scale_dtype`, uint8 zero points when asymmetric, and one int32
position. `kv_cache_bytes` counts all of it.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer

from qat_lightning.export.pack import is_packed, pack_codes, unpack_codes
from qat_lightning.quant import QuantSpec, dequantize, quantize_to_int

__all__ = ["QuantizedKVCache", "QuantizedKVLayer", "kv_cache_bytes", "theoretical_kv_bytes"]

_STORED = ("k_codes", "k_scales", "k_zeros", "v_codes", "v_scales", "v_zeros", "positions")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's rotation: x (B, H, T, D), cos/sin (B, T, D)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, D)
    return x * cos + _rotate_half(x) * sin


def _unrope(y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Inverse of `_rope` (divides by cos^2 + sin^2, so RoPE variants with an attention scaling work too)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, D)
    return (y * cos - _rotate_half(y) * sin) / (cos * cos + sin * sin)


class QuantizedKVLayer(DynamicLayer):
    """One decoder layer's K/V as integer codes (layout `(B, T, ...)`); FP like `DynamicLayer` if specs are off."""

    def __init__(self, k_spec: QuantSpec, v_spec: QuantSpec, scale_dtype: torch.dtype = torch.float32,
                 placement: str = "pre_rope") -> None:
        super().__init__()
        self.k_spec, self.v_spec, self.scale_dtype = k_spec, v_spec, scale_dtype
        self.placement = placement  # pre_rope: keys stored un-rotated (the paper); post_rope: as engines store them
        self.quantized = k_spec.enabled and v_spec.enabled
        self.cumulative_length = 0
        for name in _STORED:
            setattr(self, name, None)

    # -- storage -------------------------------------------------------------------------------------
    def _encode(self, x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """x (B, H, T, D) pre-RoPE -> codes (B, T, packed H*D), scales (B, T, 1 | H, 1), zeros or None."""
        flat = x.transpose(1, 2).flatten(2).float()  # (B, T, H*D): the k_proj/v_proj output layout of training
        q, scale, zero = quantize_to_int(flat, spec)
        zero = None if spec.symmetric else zero.to(torch.uint8)
        return pack_codes(q, spec.bits), scale.to(self.scale_dtype), zero

    def _decode(self, which: str, spec: QuantSpec, dtype: torch.dtype) -> torch.Tensor:
        """Stored codes -> (B, H, T, D) values (pre-RoPE for K)."""
        codes, scales, zeros = (getattr(self, f"{which}_{s}") for s in ("codes", "scales", "zeros"))
        b, t = codes.shape[:2]
        q = unpack_codes(codes, spec.bits, (b, t, self.num_heads * self.head_dim), signed=spec.symmetric)
        x = dequantize(q, scales.float(), None if zeros is None else zeros.float(), spec)  # (B, T, H*D)
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2).to(dtype)

    @staticmethod
    def _cat(old: torch.Tensor | None, new: torch.Tensor | None) -> torch.Tensor | None:
        return new if old is None else torch.cat([old, new], dim=1)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, rope: tuple | None = None, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new (post-RoPE) keys and values; return all keys and values for attention.

        Args:
            key_states, value_states: (B, H, T_new, D) from the attention layer.
            rope: (cos_new, sin_new, positions_new, rope_fn) captured from the rotary embedding of this forward;
                rope_fn(positions) returns (cos, sin) for any positions.
        """
        if not self.quantized:
            self.cumulative_length += key_states.shape[-2]
            return super().update(key_states, value_states)
        pre = self.placement == "pre_rope"
        if rope is None and pre:
            raise ValueError("QuantizedKVCache saw no rotary embedding call: build it with the model it serves")
        if not self.is_initialized:
            self.dtype, self.device = key_states.dtype, key_states.device
            self.num_heads, self.head_dim = key_states.shape[1], key_states.shape[3]
            self.is_initialized = True
        b, t_new = key_states.shape[0], key_states.shape[-2]
        if pre:
            cos_new, sin_new, pos_new, rope_fn = rope
            k_grid = _unrope(key_states.float(), cos_new.float(), sin_new.float())  # (B, H, T_new, D) on the grid
            pos = pos_new.expand(b, t_new).to(torch.int32)  # (B, T_new)
        else:
            k_grid = key_states.float()  # post-RoPE keys are what was quantized: stored as they come
            start = self.cumulative_length
            pos = torch.arange(start, start + t_new, device=key_states.device, dtype=torch.int32).expand(b, t_new)
        kc, ks, kz = self._encode(k_grid, self.k_spec)
        vc, vs, vz = self._encode(value_states, self.v_spec)
        for name, new in zip(_STORED, (kc, ks, kz, vc, vs, vz, pos)):
            setattr(self, name, self._cat(getattr(self, name), new))
        self.cumulative_length += t_new

        keys = self._decode("k", self.k_spec, torch.float32)  # (B, H, T, D)
        if pre:
            cos, sin = rope_fn(self.positions.long())  # (B, T, D) for every stored token
            keys = _rope(keys, cos.float(), sin.float())
        values = self._decode("v", self.v_spec, value_states.dtype)
        return keys.to(key_states.dtype), values

    # -- bookkeeping the Cache API needs -------------------------------------------------------------
    def get_seq_length(self) -> int:
        return self.cumulative_length

    def _map(self, fn) -> None:
        if not self.quantized:
            return
        for name in _STORED:
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t))

    def reset(self) -> None:
        for name in _STORED:
            setattr(self, name, None)
        self.cumulative_length = 0
        super().reset()

    def crop(self, tokens_to_remove: int) -> None:
        if self.quantized and tokens_to_remove < 0 and self.is_initialized:
            self._map(lambda t: t[:, :tokens_to_remove])
            self.cumulative_length += tokens_to_remove
        elif not self.quantized:
            super().crop(tokens_to_remove)
            self.cumulative_length = super().get_seq_length() if self.is_initialized else 0
        elif tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove")

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))
        if not self.quantized:
            super().batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices])
        if not self.quantized:
            super().batch_select_indices(indices)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))
        if not self.quantized and self.is_initialized:
            super().reorder_cache(beam_idx)

    def nbytes(self) -> int:
        """Bytes held: codes, scales, zero points and positions (or FP keys/values when not quantized)."""
        if not self.quantized:
            return sum(t.numel() * t.element_size() for t in (self.keys, self.values) if t is not None)
        return sum(t.numel() * t.element_size() for n in _STORED if (t := getattr(self, n)) is not None)


def _kv_quantizer_specs(model: nn.Module) -> list[tuple[QuantSpec, QuantSpec, str]]:
    """(k spec, v spec, placement) per decoder layer, from each attention block's KV quantizer (the one owner
    of KV quantization: what training applied is what the cache stores)."""
    from qat_lightning.models.adapter import adapter_for
    from qat_lightning.quant.kv import kv_quantizer_of

    ad = adapter_for(model)
    off = QuantSpec(bits=16)
    specs = []
    for layer in ad.layers(model):
        kvq = kv_quantizer_of(ad.attention(layer))
        specs.append((off, off, "pre_rope") if kvq is None else (kvq.k_spec, kvq.v_spec, kvq.placement))
    return specs


class QuantizedKVCache(Cache):
    """Integer KV cache for `model.generate(..., cache=QuantizedKVCache(model))`.

    Args:
        model: the model it serves (an exported model from `load_exported`, or a fake-quant student). Its
            rotary embedding is hooked to get the cos/sin and positions of each forward.
        spec: KV spec for every layer; default: each attention block's KV quantizer (what training used).
            Give one (e.g. ``QuantSpec(4, "token")``) to quantize the cache of a model trained without it.
        scale_dtype: dtype of the per-token scales. float32 (default) keeps generation equal to the
            fake-quant student; float16 saves 2 bytes per token per layer.
    """

    def __init__(self, model: nn.Module, spec: QuantSpec | None = None, scale_dtype: torch.dtype = torch.float32):
        specs = _kv_quantizer_specs(model) if spec is None else None
        n_layers = model.config.get_text_config(decoder=True).num_hidden_layers
        layers = []
        for i in range(n_layers):
            k_spec, v_spec, placement = specs[i] if specs is not None else (spec, spec, "pre_rope")
            layers.append(QuantizedKVLayer(k_spec, v_spec, scale_dtype=scale_dtype, placement=placement))
        super().__init__(layers=layers)
        rotary = getattr(model.model, "rotary_emb", None)
        if rotary is None:
            raise ValueError("QuantizedKVCache needs a model with a shared rotary embedding at model.model.rotary_emb")
        self._rope: tuple | None = None
        ref = weakref.ref(self)

        def hook(module, args, kwargs, output):  # capture this forward's cos/sin and positions
            cache = ref()
            if cache is None:
                handle.remove()
                return
            x = args[0] if args else kwargs["x"]
            pos = kwargs["position_ids"] if "position_ids" in kwargs else args[1]
            cos, sin = output
            cache._rope = (cos, sin, pos, lambda p: module.forward(x, p))  # forward(): no hook recursion

        handle = rotary.register_forward_hook(hook, with_kwargs=True)
        self._hook = handle

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        return self.layers[layer_idx].update(key_states, value_states, rope=self._rope)

    def close(self) -> None:
        """Remove the rotary hook (it also removes itself once the cache is garbage-collected)."""
        self._hook.remove()


def kv_cache_bytes(cache: Cache) -> int:
    """Bytes actually held by a cache: everything stored for a `QuantizedKVCache`, K+V for HF caches."""
    total = 0
    for layer in cache.layers:
        if isinstance(layer, QuantizedKVLayer):
            total += layer.nbytes()
        else:
            total += sum(t.numel() * t.element_size() for t in (layer.keys, layer.values) if t is not None)
    return total


def theoretical_kv_bytes(
    config: Any,
    context_len: int,
    bits: int,
    granularity: str = "token",
    symmetric: bool = True,
    scale_bytes: int = 4,
    batch: int = 1,
) -> dict[str, float]:
    """KV-cache bytes of `QuantizedKVCache` for `context_len` tokens vs an fp16 cache of the same model.

    Counts codes (4 bits for 2..4-bit codes, 8 bits otherwise), scales (one per token, or per head per
    token), uint8 zero points when asymmetric, for K and V in every layer, plus one int32 position per
    token per layer.
    """
    cfg = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    width = cfg.num_key_value_heads * head_dim  # elements per token per K (or V)
    tokens = batch * context_len * cfg.num_hidden_layers
    code_bytes = width * (0.5 if is_packed(bits) else 1.0)
    groups = cfg.num_key_value_heads if granularity == "head" else 1
    per_token = 2 * (code_bytes + groups * (scale_bytes + (0 if symmetric else 1))) + 4
    quant = tokens * per_token
    fp16 = tokens * 2 * width * 2
    return {"quantized_bytes": quant, "fp16_bytes": fp16, "ratio": quant / fp16}
