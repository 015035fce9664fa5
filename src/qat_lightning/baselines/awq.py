"""AWQ (Lin et al. 2024), kept simple: activation-aware per-channel scaling searched on a grid, then RTN.

For each group of linears sharing one normed input X (q/k/v after input_layernorm, gate/up after
post_attention_layernorm), try ``s = mean|X|^a`` for a in {0, 1/grid, ..., (grid-1)/grid} (normalised so
sqrt(max(s) * min(s)) = 1, as the reference), and keep the a whose *quantized* block output
``fq_out(fq_act(X / s) @ fq_w(W * s)^T)`` is closest (MSE) to the FP output ``X W^T``. Salient input
channels (large mean |X|) get larger weights and so a finer relative grid. a = 0 is s = 1, plain RTN, so
the chosen scale is never worse than RTN on the calibration data. The 1/s is folded into the norm, as
SmoothQuant does, so the FP model is unchanged; the student then quantizes W/A/KV per `qcfg`.
Layers are walked in order with `forward_layer`, holding one layer's activations at a time.

`down=True` adds the reference's up→down group: down_proj's input ``act(gate) * up`` is linear in up_proj's
output, so 1/s folds into up_proj's rows (exact in FP). Off by default so the AWQ figures recorded before it
(docs/BENCHMARKS.md, RESULTS.md) stay this method's. The reference's v→o group is not searched: it skips it
for GQA models (v and o shapes differ), and for ours the scale would move the quantized V cache too.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from qat_lightning.baselines.calibration import (
    as_quant_config,
    capture_layer_inputs,
    check_calib_batches,
    decoder_layers,
    forward_layer,
)
from qat_lightning.baselines.method import Method, register
from qat_lightning.baselines.smoothquant import fold_scales, smooth_groups
from qat_lightning.models.adapter import KV_PROJECTIONS, adapter_for
from qat_lightning.quant import QuantConfig, QuantSpec, fake_quantize

__all__ = ["AWQ", "awq", "awq_scaled_model", "awq_search_scale"]

_OFF = QuantSpec(bits=16)


def _quantized_output(
    x: torch.Tensor, linears: list[nn.Linear], specs: list[tuple[QuantSpec, QuantSpec, QuantSpec]], s: torch.Tensor
) -> torch.Tensor:
    """The group's student output on inputs x (n, in) after scaling by s (in,): (n, sum of out_features)."""
    outs = []
    for lin, (w_spec, a_spec, o_spec) in zip(linears, specs):
        xq = fake_quantize(x / s, a_spec)  # (n, in), per token
        wq = fake_quantize(lin.weight.float() * s, w_spec)  # (out, in), per channel / group
        bias = None if lin.bias is None else lin.bias.float()
        outs.append(fake_quantize(F.linear(xq, wq, bias), o_spec))  # (n, out); K/V quantized like the student
    return torch.cat(outs, dim=-1)


@torch.no_grad()
def awq_search_scale(
    x: torch.Tensor,
    linears: list[nn.Linear],
    specs: list[tuple[QuantSpec, QuantSpec, QuantSpec]],
    grid: int = 20,
) -> tuple[torch.Tensor, float, float]:
    """Best per-input-channel scale for a group of linears sharing input x (n, in).

    Args:
        x: the group's calibration inputs (n_tokens, in).
        linears: the linears reading x.
        specs: (weight, input, output) `QuantSpec`s of each linear, as the student will apply them.
        grid: number of exponents a = k / grid tried, k = 0..grid-1.

    Returns:
        (s (in,), best MSE, MSE of a = 0, i.e. RTN).
    """
    x = x.float()  # (n, in)
    ref = torch.cat(
        [F.linear(x, lin.weight.float(), None if lin.bias is None else lin.bias.float()) for lin in linears], dim=-1
    )  # (n, sum out)
    x_mean = x.abs().mean(dim=0)  # (in,)
    best_s, best_err, rtn_err = torch.ones_like(x_mean), float("inf"), float("nan")
    for k in range(grid):
        s = x_mean.pow(k / grid).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()  # (in,)
        err = (_quantized_output(x, linears, specs, s) - ref).pow(2).mean().item()
        if k == 0:
            rtn_err = err
        if err < best_err:
            best_s, best_err = s, err
    return best_s, best_err, rtn_err


def awq(
    teacher: nn.Module, qcfg: QuantConfig | Any, calib_batches: list[dict], grid: int = 20, down: bool = False
) -> nn.Module:
    """AWQ student of `teacher`: searched scales folded into the norms (and up_proj), then RTN of W/A/KV."""
    return AWQ(grid=grid, down=down).build(teacher, as_quant_config(qcfg), calib_batches)


@register
@dataclass
class AWQ(Method):
    """Activation-aware scales searched on `grid` exponents per group (`awq_scaled_model`), then RTN.

    `down`: also the up→down group (the reference AWQ's fc2 scale).
    """

    name: ClassVar[str] = "awq"
    needs_calibration: ClassVar[bool] = True
    grid: int = 20
    down: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.grid, bool) or not isinstance(self.grid, int) or self.grid < 1:
            raise ValueError(f"grid must be a positive int, got {self.grid!r}")
        if not isinstance(self.down, bool):
            raise ValueError(f"down must be true or false, got {self.down!r}")

    def transform(self, model: nn.Module, qcfg: Any, calib_batches: list[dict] | None) -> nn.Module:
        return awq_scaled_model(model, qcfg, calib_batches, self.grid, self.down)


@torch.no_grad()
def awq_scaled_model(
    teacher: nn.Module, qcfg: QuantConfig | Any, calib_batches: list[dict], grid: int = 20, down: bool = False
) -> nn.Module:
    """A copy of `teacher` with AWQ's searched scales folded into the norms (FP logits unchanged).

    Args:
        teacher: HF causal LM with Llama-style decoder layers; not modified.
        qcfg: the student's `QuantConfig`; the search uses exactly its per-module specs.
        calib_batches: list of dicts with ``input_ids (B, T)`` and optional ``attention_mask``.
        grid: number of exponents tried per group (a = k / grid).
        down: also search down_proj's input scale and fold its 1/s into up_proj's rows.
    """
    qcfg = as_quant_config(qcfg)
    AWQ(grid=grid, down=down)  # validates the parameters
    batches = check_calib_batches(calib_batches)
    model = copy.deepcopy(teacher)
    head_dim = adapter_for(model).head_dim
    inputs = capture_layer_inputs(model, batches)
    for i, layer in enumerate(decoder_layers(model)):
        groups = smooth_groups(layer)
        firsts = {next(iter(linears)): linears[next(iter(linears))] for _, linears in groups}
        if down:
            firsts[_DOWN] = layer.get_submodule(_DOWN)
        xs: dict[str, list[torch.Tensor]] = {name: [] for name in firsts}
        # Scaling keeps the FP output, so one pass gives both the groups' inputs and the next layer's.
        outputs = forward_layer(layer, i, inputs, firsts, lambda n, x: xs[n].append(x))
        for norm, linears in groups:
            specs = [_student_specs(qcfg, f"model.layers.{i}.{name}", head_dim) for name in linears]
            s, _, _ = awq_search_scale(torch.cat(xs[next(iter(linears))]), list(linears.values()), specs, grid)
            fold_scales(norm, list(linears.values()), s)
        if down:
            up, down_proj = layer.get_submodule(_UP), layer.get_submodule(_DOWN)
            specs = [_student_specs(qcfg, f"model.layers.{i}.{_DOWN}", head_dim)]
            s, _, _ = awq_search_scale(torch.cat(xs[_DOWN]), [down_proj], specs, grid)  # s: (intermediate,)
            fold_up_down(up, down_proj, s)
        inputs.hidden = outputs
    return model


_UP, _DOWN = "mlp.up_proj", "mlp.down_proj"


def fold_up_down(up: nn.Linear, down: nn.Linear, s: torch.Tensor) -> None:
    """up_proj's rows / s, down_proj's columns * s: ``down(act(gate) * up)`` is unchanged in FP."""
    up.weight.div_(s.to(up.weight.dtype).unsqueeze(1))  # (intermediate, H) / (intermediate, 1)
    if up.bias is not None:
        up.bias.div_(s.to(up.bias.dtype))
    down.weight.mul_(s.to(down.weight.dtype))  # (H, intermediate) * (intermediate,)


def _student_specs(qcfg: QuantConfig, name: str, head_dim: int) -> tuple[QuantSpec, QuantSpec, QuantSpec]:
    """(weight, input, output) specs `quantize_model` gives the linear `name` (output: KV for k/v_proj)."""
    if qcfg.is_skipped(name):
        return _OFF, _OFF, _OFF
    # the search sees the KV quantizer where the student applies it: on k/v_proj outputs before RoPE
    kv = name.rsplit(".", 1)[-1] in KV_PROJECTIONS and qcfg.kv_placement == "pre_rope"
    return qcfg.weight_spec(name), qcfg.act_spec(name), qcfg.kv_spec(name, head_dim) if kv else _OFF
