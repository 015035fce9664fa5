"""Flatten the key cache's channels before per-token quantization: an exact FP rewrite of q_proj and k_proj.

Per-token quantization of K shares one step across all channels of a token, so the few outlier channels that
keys have (consistently, before RoPE) set the step and crush the rest. Scaling key channel c by 1/s_c and the
query channels that read it by s_c leaves every attention logit q.k unchanged in full precision, while K's
channels get equal ranges: each channel's rounding error then scales with its own range, as with per-channel
key quantization (KVQuant, Hooper et al. 2024), without changing the cache layout or the quantizer.

Constraints the scales respect:
- RoPE rotates channel pairs (d, d + hd/2) of a head (transformers' `rotate_half`): a pair shares its scale.
- GQA: kv head g is read by query heads g*n_rep ... (g+1)*n_rep - 1 (`repeat_kv`), all scaled by g's s.
- Weights are quantized per output row, so scaling rows of q_proj and k_proj changes no weight's rounding.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from qat_lightning.baselines.calibration import (
    _device,
    _model_inputs,
    as_quant_config,
    attention_heads,
    check_calib_batches,
    decoder_layers,
)
from qat_lightning.baselines.method import Method, register
from qat_lightning.quant import QuantConfig

__all__ = ["KVSmooth", "collect_output_absmax", "key_scales", "kv_smooth", "kv_smooth_model", "scale_query_key"]


def key_scales(key_absmax: torch.Tensor, head_dim: int, strength: float = 1.0) -> torch.Tensor:
    """Per key channel ``s_c = (m_c / mean(m))^strength``, m_c the max |k| of c's RoPE pair; (n_kv*hd,).

    strength 1 makes every pair's range equal (to the mean range, so magnitudes stay where they were);
    0 is the identity. Channels that never fired keep s = 1.
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    if head_dim % 2:
        raise ValueError(f"head_dim must be even (RoPE pairs), got {head_dim}")
    m = key_absmax.float().view(-1, 2, head_dim // 2)  # (n_kv, 2, hd/2): rotate_half pairs d and d + hd/2
    m = m.amax(dim=1, keepdim=True).expand_as(m).reshape(-1)  # (n_kv*hd,) pair max
    live = m > 0
    if not live.any():
        return torch.ones_like(m)
    s = (m / m[live].mean()).pow(strength).clamp_min(1e-5)  # the SmoothQuant clamp: 1/s stays finite
    return torch.where(live, s, torch.ones_like(s))


@torch.no_grad()
def scale_query_key(attn: nn.Module, config: Any, s: torch.Tensor) -> None:
    """k_proj rows / s and the q_proj rows reading each key channel * s: every q.k is unchanged."""
    n_heads, n_kv, hd = attention_heads(config)
    q, k = attn.q_proj, attn.k_proj
    if k.out_features != n_kv * hd or q.out_features != n_heads * hd or n_heads % n_kv or s.numel() != n_kv * hd:
        raise ValueError(f"q_proj/k_proj shapes do not match {n_heads} heads, {n_kv} kv heads of size {hd}")
    n_rep = n_heads // n_kv
    s_q = s.view(n_kv, 1, hd).expand(n_kv, n_rep, hd).reshape(-1)  # (n_heads*hd,)
    k.weight.div_(s.to(k.weight.dtype).unsqueeze(1))  # (n_kv*hd, H) rows
    q.weight.mul_(s_q.to(q.weight.dtype).unsqueeze(1))  # (n_heads*hd, H) rows
    if k.bias is not None:
        k.bias.div_(s.to(k.bias.dtype))
    if q.bias is not None:
        q.bias.mul_(s_q.to(q.bias.dtype))


@torch.no_grad()
def collect_output_absmax(model: nn.Module, calib_batches: list[dict], proj: str = "k_proj") -> list[torch.Tensor]:
    """Per layer, the max |`proj` output| per channel over the real calibration tokens: [(n_kv*hd,)]."""
    batches = check_calib_batches(calib_batches)
    device = _device(model)
    layers = decoder_layers(model)
    out: list[torch.Tensor | None] = [None] * len(layers)
    current: dict[str, torch.Tensor] = {}

    def make(i: int):
        def hook(_module, _args, y):  # y: (B, T, n_kv*hd)
            amax = y[current["mask"]].abs().amax(dim=0).float()  # (n_kv*hd,)
            out[i] = amax if out[i] is None else torch.maximum(out[i], amax)

        return hook

    handles = [getattr(layer.self_attn, proj).register_forward_hook(make(i)) for i, layer in enumerate(layers)]
    try:
        for batch in batches:
            kwargs, current["mask"] = _model_inputs(batch, device)
            if current["mask"].any():
                model(**kwargs)
    finally:
        for h in handles:
            h.remove()
    if any(m is None for m in out):
        raise ValueError("calibration batches contain no real tokens (attention_mask is all 0)")
    return out  # type: ignore[return-value]


@torch.no_grad()
def kv_smooth_model(
    teacher: nn.Module, calib_batches: list[dict], strength: float = 1.0, v_alpha: float | None = None
) -> nn.Module:
    """A copy of `teacher` with flattened key channels (same logits up to float rounding); teacher untouched.

    One FP pass gives every layer's statistics: the rewrite never changes a layer's output.

    Args:
        strength: how far key pair ranges are equalised (`key_scales`).
        v_alpha: also smooth the value channels against o_proj's columns, SmoothQuant-style
            (``s = max|v|^a / max|W_o col|^(1-a)``): unlike q, o_proj's weights are quantized per row, so
            flattening V fully would move its range into o_proj's 4-bit rows; None leaves V alone.
    """
    from qat_lightning.baselines.smoothquant import _smooth_vo

    model = copy.deepcopy(teacher)
    key_absmax = collect_output_absmax(model, calib_batches)
    value_absmax = collect_output_absmax(model, calib_batches, "v_proj") if v_alpha is not None else None
    n_heads, n_kv, hd = attention_heads(model.config)
    for i, layer in enumerate(decoder_layers(model)):
        scale_query_key(layer.self_attn, model.config, key_scales(key_absmax[i], hd, strength))
        if value_absmax is not None:  # as o_proj input statistics: each v channel read by n_rep heads
            o_in = value_absmax[i].view(n_kv, 1, hd).expand(n_kv, n_heads // n_kv, hd).reshape(-1)
            _smooth_vo(layer.self_attn, model.config, o_in, v_alpha)
    return model


def kv_smooth(
    teacher: nn.Module,
    qcfg: QuantConfig | Any,
    calib_batches: list[dict],
    strength: float = 1.0,
    v_alpha: float | None = None,
):
    """Baseline: `kv_smooth_model`, then the student's RTN quantizers (`qcfg`, W/A/KV)."""
    return KVSmooth(strength=strength, v_alpha=v_alpha).build(teacher, as_quant_config(qcfg), calib_batches)


@register
@dataclass
class KVSmooth(Method):
    """Flattened key channels (`kv_smooth_model`), then RTN. strength: how far key pair ranges are
    equalised (1: fully, 0: no-op); v_alpha: also smooth V against o_proj with this alpha (null: keys only)."""

    name: ClassVar[str] = "kvsmooth"
    needs_calibration: ClassVar[bool] = True
    strength: float = 1.0
    v_alpha: float | None = None

    def __post_init__(self) -> None:
        for key in ("strength", "v_alpha"):
            value = getattr(self, key)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"{key} must be in [0, 1]; got {value}")

    def transform(self, model: nn.Module, qcfg: Any, calib_batches: list[dict] | None) -> nn.Module:
        return kv_smooth_model(model, calib_batches, self.strength, self.v_alpha)
