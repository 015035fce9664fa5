"""SmoothQuant (Xiao et al. 2023): move activation outliers into the weights, then round to nearest.

Per input channel j of a group of linears sharing one input, ``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)``
(the weight max over every row of every linear in the group). ``X' = X / s`` and ``W' = W * s`` give the
same product in full precision, but X' has a flatter per-channel range, so per-token activation
quantization loses less. The division is folded into the RMSNorm weight that produces X (free at run time):

    input_layernorm          -> q_proj, k_proj, v_proj
    post_attention_layernorm -> gate_proj, up_proj
    v_proj (rows)            -> o_proj (columns)      only with smooth_vo=True, see `_smooth_vo`

Norms must compute ``weight * x / rms(x)`` (Llama, Mistral, Qwen2); Gemma's ``(1 + weight)`` is not supported.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from qat_lightning.baselines.calibration import (
    as_quant_config,
    attention_heads,
    check_calib_batches,
    collect_input_absmax,
)
from qat_lightning.baselines.calibration import decoder_layers as _decoder_layers
from qat_lightning.baselines.method import Method, register
from qat_lightning.quant import QuantConfig

__all__ = ["SmoothQuant", "fold_scales", "smooth_groups", "smooth_model", "smoothing_scales", "smoothquant"]

_MIN_SCALE = 1e-5  # the reference's clamp: keeps 1/s finite


_GROUPS = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
)


def smooth_groups(layer: nn.Module) -> list[tuple[nn.Module, dict[str, nn.Linear]]]:
    """(norm, {name in the layer: linear reading that norm's output}) for each group of one decoder layer."""
    try:
        return [
            (layer.get_submodule(norm), {name: layer.get_submodule(name) for name in linears})
            for norm, linears in _GROUPS
        ]
    except AttributeError as e:
        raise ValueError(f"expected a Llama-style decoder layer (norms, q/k/v_proj, gate/up_proj): {e}") from None


def smoothing_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s = act^alpha / w^(1-alpha)`` per input channel (in,); 1 where a channel never fired or has no weight."""
    act, w = act_absmax.float(), weight_absmax.float()
    s = act.pow(alpha) / w.pow(1 - alpha)
    dead = (act == 0) | (w == 0)
    return torch.where(dead, torch.ones_like(s), s.clamp(min=_MIN_SCALE))  # (in,)


def fold_scales(norm: nn.Module, linears: list[nn.Linear], s: torch.Tensor) -> None:
    """norm.weight / s and every linear's columns * s: the FP function is unchanged."""
    norm.weight.div_(s.to(norm.weight.dtype))
    for lin in linears:
        lin.weight.mul_(s.to(lin.weight.dtype))  # (out, in) * (in,)


def _smooth_vo(attn: nn.Module, config: Any, act_absmax: torch.Tensor, alpha: float) -> None:
    """Scale v_proj output channel m by 1/s_m and o_proj's input channels reading it by s_m.

    Exact in full precision because each head's attention output is a convex combination of its V rows.
    With GQA, attention head h reads kv head h // n_rep (transformers' `repeat_kv` interleaves), so o_proj
    input channel ``h * hd + d`` reads v channel ``(h // n_rep) * hd + d``: the n_rep o-channels sharing a
    v-channel must share its scale, and their statistics are pooled (max) before computing it.
    """
    n_heads, n_kv, hd = attention_heads(config)
    v, o = attn.v_proj, attn.o_proj
    if v.out_features != n_kv * hd or o.in_features != n_heads * hd or n_heads % n_kv:
        raise ValueError(f"v_proj/o_proj shapes do not match {n_heads} heads, {n_kv} kv heads of size {hd}")
    n_rep = n_heads // n_kv
    act = act_absmax.view(n_kv, n_rep, hd).amax(dim=1).flatten()  # (n_kv*hd,)
    w = o.weight.abs().amax(dim=0).float().view(n_kv, n_rep, hd).amax(dim=1).flatten()  # (n_kv*hd,)
    s = smoothing_scales(act, w, alpha)  # (n_kv*hd,)
    v.weight.div_(s.to(v.weight.dtype).unsqueeze(1))  # rows of (n_kv*hd, H)
    if v.bias is not None:
        v.bias.div_(s.to(v.bias.dtype))
    s_o = s.view(n_kv, 1, hd).expand(n_kv, n_rep, hd).reshape(-1)  # (n_heads*hd,)
    o.weight.mul_(s_o.to(o.weight.dtype))


@torch.no_grad()
def smooth_model(
    teacher: nn.Module, calib_batches: list[dict], alpha: float = 0.5, smooth_vo: bool = False
) -> nn.Module:
    """A smoothed full-precision copy of `teacher` (same logits up to rounding); teacher untouched.

    Also the starting point for "QAT initialised from SmoothQuant". Statistics come from one FP pass:
    smoothing never changes a layer's FP output, so later layers see the same inputs either way.

    Args:
        teacher: HF causal LM with Llama-style decoder layers.
        calib_batches: list of dicts with ``input_ids (B, T)`` and optional ``attention_mask``.
        alpha: migration strength in [0, 1]; 0 leaves activations alone, 1 moves all range to the weights.
        smooth_vo: also smooth v_proj -> o_proj (off by default, like the SmoothQuant reference for Llama).
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    batches = check_calib_batches(calib_batches)
    model = copy.deepcopy(teacher)
    layers = _decoder_layers(model)
    modules: dict[str, nn.Module] = {}
    for i, layer in enumerate(layers):
        for _, linears in smooth_groups(layer):
            first = next(iter(linears))
            modules[f"{i}.{first}"] = linears[first]
        if smooth_vo:
            modules[f"{i}.self_attn.o_proj"] = layer.self_attn.o_proj
    absmax = collect_input_absmax(model, batches, modules)
    for i, layer in enumerate(layers):
        for norm, linears in smooth_groups(layer):
            lins = list(linears.values())
            w_max = torch.stack([lin.weight.abs().amax(dim=0).float() for lin in lins]).amax(dim=0)  # (in,)
            fold_scales(norm, lins, smoothing_scales(absmax[f"{i}.{next(iter(linears))}"], w_max, alpha))
        if smooth_vo:
            _smooth_vo(layer.self_attn, model.config, absmax[f"{i}.self_attn.o_proj"], alpha)
    return model


def smoothquant(
    teacher: nn.Module,
    qcfg: QuantConfig | Any,
    calib_batches: list[dict],
    alpha: float = 0.5,
    smooth_vo: bool = False,
) -> nn.Module:
    """SmoothQuant student: `smooth_model` then the student's RTN quantizers (`qcfg`, W/A/KV)."""
    return SmoothQuant(alpha=alpha, smooth_vo=smooth_vo).build(teacher, as_quant_config(qcfg), calib_batches)


@register
@dataclass
class SmoothQuant(Method):
    """`smooth_model`'s rewrite (alpha: migration strength; smooth_vo: also v_proj -> o_proj), then RTN."""

    name: ClassVar[str] = "smoothquant"
    needs_calibration: ClassVar[bool] = True
    alpha: float = 0.5
    smooth_vo: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be a number in [0, 1], got {self.alpha!r}")

    def transform(self, model: nn.Module, qcfg: Any, calib_batches: list[dict] | None) -> nn.Module:
        return smooth_model(model, calib_batches, self.alpha, self.smooth_vo)
