"""Quantization error of a model's linears: what a rotation is meant to lower, measured the same way for any model.

Relative squared errors ``Σ ||fq(t) - t||² / Σ ||t||²`` summed over the decoder linears (by leaf name), for
the weights and for the inputs the linears actually see on a batch (after any online rotation's pre-hook).
Relative, so folding a norm scale into a weight does not change the number by itself.

A lower weight error is not a lower error of the layer's output: that also depends on which inputs meet the
error. ``wout`` is the weight-only output error ``||x fq(W)ᵀ - x Wᵀ||² / ||x Wᵀ||²`` on the FP inputs, summed
over tokens; ``wout0`` the same for the first token of the batch alone (the attention sink, see docs/ROTATIONS.md).
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from qat_lightning.models.adapter import adapter_for
from qat_lightning.quant import QuantSpec, fake_quantize

__all__ = ["quantization_error"]


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


@torch.no_grad()
def quantization_error(
    model: nn.Module, input_ids: torch.Tensor, w_spec: QuantSpec, a_spec: QuantSpec
) -> dict[str, float]:
    """Relative RTN error of every decoder linear's weight (`w_spec`) and input (`a_spec`) on `input_ids`.

    Returns ``{"weight", "act", "wout", "wout0"}`` and each per leaf (``"act/q_proj"``, ...): ratios of sums
    over layers (and tokens), so large layers weigh more, as in the model's output.
    """
    num, den = defaultdict(float), defaultdict(float)

    def add(key: str, t: torch.Tensor, spec: QuantSpec) -> None:
        t = t.float()
        err = (fake_quantize(t, spec) - t).pow(2).sum().item()
        tot = t.pow(2).sum().item()
        for k in (key.split("/")[0], key):
            num[k] += err
            den[k] += tot

    def add_out(leaf: str, x: torch.Tensor, weight: torch.Tensor, wq: torch.Tensor) -> None:
        x = x.float()
        err = (x @ (wq - weight).T).pow(2)  # (B, T, out)
        ref = (x @ weight.T).pow(2)  # (B, T, out)
        for key, e, r in ((f"wout/{leaf}", err, ref), (f"wout0/{leaf}", err[:, :1], ref[:, :1])):
            for k in (key.split("/")[0], key):
                num[k] += e.sum().item()
                den[k] += r.sum().item()

    def hook_of(leaf: str, weight: torch.Tensor):
        weight = weight.float()
        wq = fake_quantize(weight, w_spec)

        def hook(mod: nn.Module, args: tuple) -> None:
            add(f"act/{leaf}", args[0], a_spec)
            add_out(leaf, args[0], weight, wq)

        return hook

    handles = []
    for name, linear in adapter_for(model).decoder_linears(model):
        add(f"weight/{_leaf(name)}", linear.weight, w_spec)
        handles.append(linear.register_forward_pre_hook(hook_of(_leaf(name), linear.weight)))
    try:
        model(input_ids=input_ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {k: num[k] / den[k] for k in sorted(num)}
