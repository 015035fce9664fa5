"""GPTQ (Frantar et al. 2023): quantize weights one column at a time, pushing each column's rounding error
onto the not-yet-quantized columns along the inverse Hessian of the layer's inputs.

We use the student's own weight grid (`qcfg.weight_spec`: symmetric MinMax, narrow range, per channel or
per group), with the scales fixed from the original weights *before* error propagation, so the result lies
exactly on the grid the student uses. The student then keeps these weights with its weight quantizer off
(recomputing MinMax scales from the updated weights would move the grid); activations and the KV cache are
quantized by RTN as in `qcfg`. Layers are processed in order, and inside a layer in execution order
(q/k/v, o, gate/up, down: the reference's "true sequential"), each from inputs computed by the already
quantized part of the model.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from qat_lightning.baselines.calibration import (
    as_quant_config,
    capture_layer_inputs,
    check_calib_batches,
    decoder_layers,
    forward_layer,
)
from qat_lightning.baselines.method import Method, register
from qat_lightning.quant import QuantConfig, QuantSpec, compute_scale_zero, round_to_grid

__all__ = ["GPTQ", "gptq", "gptq_weight", "input_hessian", "weights_prequantized_config"]

# Inside one decoder layer, linears whose inputs are ready at the same time (execution order).
SEQUENTIAL_GROUPS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))


def input_hessian(x: torch.Tensor) -> torch.Tensor:
    """``H = 2/n X^T X`` (in, in) of a layer's inputs x (n, in): the curvature of ||XW^T - XQ^T||^2 in W."""
    x = x.reshape(-1, x.shape[-1]).float()  # (n, in)
    return 2.0 / x.shape[0] * (x.T @ x)


def _elementwise_qparams(weight: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of the original weight, expanded to one value per element (out, in)."""
    scale, zero = compute_scale_zero(weight, spec)  # channel: (out, 1); group: (out, G, 1); tensor: (1, 1)
    if spec.granularity == "group":
        scale = scale.repeat_interleave(spec.group_size, dim=-1).flatten(-2)  # (out, G, 1) -> (out, in)
        zero = zero.repeat_interleave(spec.group_size, dim=-1).flatten(-2)
    return scale.expand_as(weight), zero.expand_as(weight)


def _inverse_hessian_cholesky(h: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp I)^-1; damping grows tenfold if H is numerically singular."""
    damp = percdamp * torch.diag(h).mean()
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for _ in range(5):
        try:
            lower = torch.linalg.cholesky(h + damp * eye)
            return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
        except torch.linalg.LinAlgError:
            damp = max(float(damp) * 10, 1e-8)
    raise ValueError("GPTQ Hessian is not positive definite even with damping; use more calibration data")


@torch.no_grad()
def gptq_weight(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: QuantSpec,
    block_size: int = 128,
    percdamp: float = 0.01,
    act_order: bool = False,
) -> torch.Tensor:
    """GPTQ-quantized copy of `weight` (out, in) on `spec`'s grid, with scales from the original weight.

    Args:
        weight: the FP weight (out, in); not modified.
        hessian: ``2/n X^T X`` (in, in) of the layer's calibration inputs (see `input_hessian`).
        spec: the weight quantizer (enabled); its MinMax scales are computed once from `weight`.
        block_size: columns updated together (lazy batch updates; the result does not depend on it).
        percdamp: damping added to H's diagonal, as a fraction of its mean.
        act_order: quantize columns in order of decreasing Hessian diagonal (largest inputs first).

    Returns:
        The dequantized weight, same dtype as `weight`: every element is ``(code - zero) * scale`` exactly.
    """
    if not spec.enabled:
        raise ValueError(f"gptq_weight needs an enabled weight spec (bits <= 8), got bits={spec.bits}")
    out_f, in_f = weight.shape
    if tuple(hessian.shape) != (in_f, in_f):
        raise ValueError(f"hessian shape {tuple(hessian.shape)} does not match weight in_features {in_f}")
    scale_e, zero_e = _elementwise_qparams(weight, spec)  # (out, in) each, in weight's dtype
    w = weight.detach().float().clone()  # (out, in)
    h = hessian.detach().float().clone()  # (in, in)
    scale, zero = scale_e.float(), zero_e.float()

    dead = torch.diag(h) == 0  # inputs that never fired: their columns cannot matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(in_f, device=w.device)
    w, h, scale, zero = w[:, perm], h[perm][:, perm], scale[:, perm], zero[:, perm]
    inv_scale = scale.reciprocal()  # x * (1/s), exactly as the fake quantizer computes it
    hinv = _inverse_hessian_cholesky(h, percdamp)  # (in, in) upper

    codes = torch.zeros_like(w)  # (out, in) integer levels (unshifted by the zero point)
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        w1 = w[:, i1:i2].clone()  # (out, b)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]  # (b, b)
        for i in range(i2 - i1):
            col = w1[:, i]  # (out,)
            j = i1 + i
            q = round_to_grid(col * inv_scale[:, j], zero[:, j], spec)  # (out,) codes
            codes[:, j] = q
            err = (col - (q - zero[:, j]) * scale[:, j]) / hinv1[i, i]  # (out,)
            w1[:, i:] -= err.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)  # spread onto later columns of the block
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]  # and onto every later block at once

    codes = codes[:, torch.argsort(perm)]  # back to the original column order
    return (codes.to(weight.dtype) - zero_e) * scale_e  # what fake_quantize writes: (q - z) * s


def weights_prequantized_config(qcfg: QuantConfig) -> QuantConfig:
    """`qcfg` with the decoder linears' weight quantizers off (their weights are already on the grid).

    Activations, KV cache, and the embedding / lm_head weights (which GPTQ does not touch) keep `qcfg`'s specs.
    """
    overrides = [{**o, "w_bits": None} for o in qcfg.overrides]
    for name in ("lm_head", "model.embed_tokens"):  # later overrides win: restore their RTN bits
        overrides.append({"pattern": f"^{name}$", "w_bits": qcfg.weight_spec(name).bits})
    return dataclasses.replace(qcfg, w_bits=16, lsq=False, overrides=overrides)


def _groups(names: list[str]) -> list[list[str]]:
    """Split a layer's linear names into `SEQUENTIAL_GROUPS` order; unknown ones form a last group."""
    leaf = {n: n.rsplit(".", 1)[-1] for n in names}
    groups = [[n for n in names if leaf[n] in g] for g in SEQUENTIAL_GROUPS]
    known = {n for g in groups for n in g}
    groups.append([n for n in names if n not in known])
    return [g for g in groups if g]


def _check_options(block_size: Any, percdamp: Any) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if not isinstance(percdamp, (int, float)) or not 0.0 <= percdamp < 1.0 or math.isnan(percdamp):
        raise ValueError(f"percdamp must be in [0, 1), got {percdamp!r}")


@register
@dataclass
class GPTQ(Method):
    """GPTQ's weights (block_size, percdamp: Hessian damping, act_order: columns by descending Hessian
    diagonal); the evaluated student keeps them as they are and quantizes activations and KV by RTN."""

    name: ClassVar[str] = "gptq"
    needs_calibration: ClassVar[bool] = True
    block_size: int = 128
    percdamp: float = 0.01
    act_order: bool = False

    def __post_init__(self) -> None:
        _check_options(self.block_size, self.percdamp)

    def transform(self, model: nn.Module, qcfg: Any, calib_batches: list[dict] | None) -> nn.Module:
        return gptq_weights(model, qcfg, calib_batches, self.block_size, self.percdamp, self.act_order)

    def student_config(self, qcfg: Any) -> QuantConfig:
        return weights_prequantized_config(as_quant_config(qcfg))


def gptq(
    teacher: nn.Module,
    qcfg: QuantConfig | Any,
    calib_batches: list[dict],
    block_size: int = 128,
    percdamp: float = 0.01,
    act_order: bool = False,
) -> nn.Module:
    """GPTQ student of `teacher`: GPTQ weights (quantizer off) + RTN activations and KV cache per `qcfg`.

    Args:
        teacher: HF causal LM (`model.model.layers`); not modified.
        qcfg: the student's `QuantConfig`; `weight_spec(name)` gives each linear's grid (skipped or 16-bit
            linears stay FP).
        calib_batches: list of dicts with ``input_ids (B, T)`` and optional ``attention_mask``.
        block_size, percdamp, act_order: see `gptq_weight`.

    Returns:
        The student (`quantize_model` of the GPTQ-weight model with `weights_prequantized_config(qcfg)`);
        `student.quant_config` is that config.
    """
    return GPTQ(block_size, percdamp, act_order).build(teacher, as_quant_config(qcfg), calib_batches)


@torch.no_grad()
def gptq_weights(
    teacher: nn.Module,
    qcfg: QuantConfig | Any,
    calib_batches: list[dict],
    block_size: int = 128,
    percdamp: float = 0.01,
    act_order: bool = False,
) -> nn.Module:
    """A copy of `teacher` whose decoder linears hold GPTQ's dequantized weights (no quantizers attached).

    Why separate: QAT can start from these weights (`init=gptq`); MinMax fake quantization of a GPTQ row
    gives back GPTQ's grid whenever the row's largest code is +-qmax (the same max |w|).

    Args:
        teacher: HF causal LM (`model.model.layers`); not modified.
        qcfg: the student's `QuantConfig`; `weight_spec(name)` gives each linear's grid (skipped or 16-bit
            linears stay FP).
        calib_batches: list of dicts with ``input_ids (B, T)`` and optional ``attention_mask``.
        block_size, percdamp, act_order: see `gptq_weight`.
    """
    qcfg = as_quant_config(qcfg)
    _check_options(block_size, percdamp)
    batches = check_calib_batches(calib_batches)
    model = copy.deepcopy(teacher)
    inputs = capture_layer_inputs(model, batches)
    for i, layer in enumerate(decoder_layers(model)):
        linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
        for group in _groups(list(linears)):
            specs = {n: qcfg.weight_spec(f"model.layers.{i}.{n}") for n in group}
            group = [n for n in group if specs[n].enabled and not qcfg.is_skipped(f"model.layers.{i}.{n}")]
            if not group:
                continue
            hess = {n: torch.zeros(linears[n].in_features, linears[n].in_features) for n in group}
            hess = {n: h.to(linears[n].weight.device) for n, h in hess.items()}
            seen = dict.fromkeys(group, 0)

            def accumulate(name: str, x: torch.Tensor) -> None:  # running mean of 2 x x^T over tokens
                n_new = x.shape[0]
                if n_new == 0:
                    return
                total = seen[name] + n_new
                hess[name].mul_(seen[name] / total).add_(input_hessian(x), alpha=n_new / total)
                seen[name] = total

            forward_layer(layer, i, inputs, {n: linears[n] for n in group}, accumulate)
            for n in group:
                if seen[n] == 0:
                    raise ValueError("calibration batches contain no real tokens (attention_mask is all 0)")
                linears[n].weight.copy_(
                    gptq_weight(linears[n].weight, hess[n], specs[n], block_size, percdamp, act_order)
                )
        inputs.hidden = forward_layer(layer, i, inputs)  # next layer's inputs, from this quantized layer
    return model
