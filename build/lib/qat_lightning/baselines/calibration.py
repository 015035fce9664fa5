"""Calibration plumbing shared by the post-training baselines: forward hooks on the FP model, no forked files.

Every baseline takes `calib_batches: list[dict]` (``input_ids (B, T)``, optional ``attention_mask (B, T)``),
generated or real; collecting them is the caller's job. Two ways to look at a model's activations:

* `collect_input_absmax`: one full forward per batch with hooks on named linears (SmoothQuant's statistics).
* `capture_layer_inputs` + `forward_layer`: run the decoder one layer at a time, so a method can change
  layer i and compute the inputs of layer i+1 from the changed layer (GPTQ's sequential scheme), while
  holding only one layer's activations in memory.

Padded tokens (attention_mask 0) never enter a statistic.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from qat_lightning.models.adapter import adapter_for
from qat_lightning.quant import as_quant_config

__all__ = [
    "LayerInputs",
    "as_quant_config",
    "capture_layer_inputs",
    "check_calib_batches",
    "collect_input_absmax",
    "decoder_layers",
    "forward_layer",
    "hook_inputs",
]

InputFn = Callable[[str, torch.Tensor], None]




def check_calib_batches(calib_batches: Any) -> list[dict]:
    """Validate calibration batches: a non-empty list of dicts with a 2-D integer `input_ids`."""
    if not isinstance(calib_batches, Sequence) or isinstance(calib_batches, (str, bytes)) or not calib_batches:
        raise ValueError("calib_batches must be a non-empty list of dicts with 'input_ids' of shape (B, T)")
    for i, batch in enumerate(calib_batches):
        ids = batch.get("input_ids") if isinstance(batch, Mapping) else None
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point():
            raise ValueError(f"calib_batches[{i}] needs an integer 'input_ids' tensor of shape (B, T)")
        mask = batch.get("attention_mask")
        if mask is not None and tuple(mask.shape) != tuple(ids.shape):
            raise ValueError(f"calib_batches[{i}] attention_mask shape {tuple(mask.shape)} != input_ids shape")
    return list(calib_batches)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a HF causal LM, the unit every baseline walks (found by the model adapter)."""
    return adapter_for(model).layers(model)


def attention_heads(config: Any) -> tuple[int, int, int]:
    """(query heads, kv heads, head_dim) of a HF decoder config (GQA when kv heads < query heads)."""
    ad = adapter_for(config)
    return ad.num_heads, ad.num_kv_heads, ad.head_dim


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _model_inputs(batch: Mapping, device: torch.device) -> tuple[dict, torch.Tensor]:
    """Keyword args for the model's forward and the (B, T) bool mask of real tokens."""
    ids = batch["input_ids"].to(device)  # (B, T)
    mask = batch.get("attention_mask")
    kwargs = {"input_ids": ids, "use_cache": False}
    if mask is not None:
        mask = mask.to(device)
        kwargs["attention_mask"] = mask
        return kwargs, mask.bool()
    return kwargs, torch.ones_like(ids, dtype=torch.bool)


@contextmanager
def hook_inputs(modules: Mapping[str, nn.Module], fn: InputFn, mask: Callable[[], torch.Tensor]) -> Iterator[None]:
    """Call ``fn(name, x)`` with each module's input restricted to real tokens: x is (n_tokens, in_features).

    `mask` returns the current batch's (B, T) bool mask (a callable so one hook serves every batch).
    """

    def make(name: str):
        def hook(_module, args):
            x = args[0]  # (B, T, in)
            fn(name, x[mask()].detach())  # (n, in)

        return hook

    handles = [m.register_forward_pre_hook(make(n)) for n, m in modules.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def collect_input_absmax(
    model: nn.Module, calib_batches: list[dict], modules: Mapping[str, nn.Module]
) -> dict[str, torch.Tensor]:
    """Per-input-channel max |x| of each named module's input over all calibration tokens: name -> (in,)."""
    batches = check_calib_batches(calib_batches)
    device = _device(model)
    out: dict[str, torch.Tensor] = {}
    current: dict[str, torch.Tensor] = {}

    def update(name: str, x: torch.Tensor) -> None:
        if x.numel():
            amax = x.abs().amax(dim=0).float()  # (in,)
            out[name] = amax if name not in out else torch.maximum(out[name], amax)

    with hook_inputs(modules, update, lambda: current["mask"]):
        for batch in batches:
            kwargs, current["mask"] = _model_inputs(batch, device)
            model(**kwargs)
    missing = [n for n in modules if n not in out]
    if missing:
        raise ValueError(f"calibration never reached modules {missing} (no real tokens or unused modules)")
    return out


class _StopForward(Exception):
    """Raised by the last layer's pre-hook: nothing after the decoder is needed."""


@dataclass
class LayerInputs:
    """What `forward_layer` needs to replay one decoder layer on every calibration batch.

    Attributes:
        hidden: per batch, the current layer's input hidden states (B, T, H); advance with `forward_layer`.
        kwargs: kwargs[layer][batch], the keyword args the model passed that layer (causal mask, position
            embeddings, ...); they do not depend on hidden states, so one FP pass records them all.
        masks: per batch, the (B, T) bool mask of real tokens.
    """

    hidden: list[torch.Tensor]
    kwargs: list[list[dict[str, Any]]]
    masks: list[torch.Tensor]


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, calib_batches: list[dict]) -> LayerInputs:
    """Record layer 0's hidden-state input and every layer's keyword args for each calibration batch."""
    batches = check_calib_batches(calib_batches)
    layers = decoder_layers(model)
    device = _device(model)
    hidden: list[torch.Tensor] = []
    kwargs: list[list[dict]] = [[] for _ in layers]
    masks: list[torch.Tensor] = []

    def make(i: int):
        def hook(_layer, args, kw):
            if i == 0:
                hidden.append((args[0] if args else kw["hidden_states"]).detach())  # (B, T, H)
            kwargs[i].append({k: v for k, v in kw.items() if k != "hidden_states"})
            if i == len(layers) - 1:
                raise _StopForward

        return hook

    handles = [layer.register_forward_pre_hook(make(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        for batch in batches:
            model_kwargs, mask = _model_inputs(batch, device)
            masks.append(mask)
            try:
                model(**model_kwargs)
            except _StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
    return LayerInputs(hidden=hidden, kwargs=kwargs, masks=masks)


@torch.no_grad()
def forward_layer(
    layer: nn.Module,
    index: int,
    inputs: LayerInputs,
    modules: Mapping[str, nn.Module] | None = None,
    fn: InputFn | None = None,
) -> list[torch.Tensor]:
    """Run decoder layer `index` on every batch's `inputs.hidden`; returns its outputs (the next inputs).

    With `modules` and `fn`, ``fn(name, x)`` sees each module's real-token inputs (n, in) on the way.
    """
    outputs = []
    current: dict[str, torch.Tensor] = {}
    with hook_inputs(modules or {}, fn or (lambda n, x: None), lambda: current["mask"]):
        for h, kw, mask in zip(inputs.hidden, inputs.kwargs[index], inputs.masks):
            current["mask"] = mask
            out = layer(h, **kw)
            outputs.append(out[0] if isinstance(out, tuple) else out)  # (B, T, H)
    return outputs
