"""Drop-in quantized modules: `QuantLinear` (weights, input activations, optional outputs) and `QuantEmbedding`.

They subclass the torch modules and keep the `weight`/`bias` names, so state dicts match the HF model's
(plus `weight_scale` when LSQ is on). Scales are recomputed every forward (MinMax, as the reference)
unless the weight spec is learnable, in which case the per-row step `weight_scale` is a parameter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qat_lightning.quant import ggml
from qat_lightning.quant.primitives import compute_scale_zero, fake_quantize
from qat_lightning.quant.spec import DISABLED_BITS, QuantSpec

_OFF = QuantSpec(bits=DISABLED_BITS)


def _bits(spec: QuantSpec | None) -> int:
    return spec.bits if spec is not None and spec.enabled else DISABLED_BITS


class QuantLinear(nn.Linear):
    """`nn.Linear` that fake-quantizes its weight, its input and (for k_proj/v_proj) its output.

    ``y = fq_out(fq_act(x) @ fq_w(W).T + b)``. The output spec is how the KV cache is quantized: the
    outputs of k_proj and v_proj, before RoPE, as the LLM-QAT reference does. With every spec disabled,
    or with `quant_enabled` False, the forward is exactly `F.linear(x, W, b)`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        weight_spec: QuantSpec | None = None,
        act_spec: QuantSpec | None = None,
        out_spec: QuantSpec | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.weight_spec = weight_spec or _OFF
        self.act_spec = act_spec or _OFF
        self.out_spec = out_spec or _OFF
        self.quant_enabled = True
        self._check_specs()
        if self.weight_spec.enabled and self.weight_spec.learnable:
            self.weight_scale = nn.Parameter(self._minmax_scale())  # (out_features, 1)
        else:
            self.register_parameter("weight_scale", None)

    def _check_specs(self) -> None:
        """Fail at construction, not mid-forward, when a group/head size does not divide a dim."""
        for spec, dim, what in (
            (self.weight_spec, self.in_features, "weight"),
            (self.act_spec, self.in_features, "input"),
            (self.out_spec, self.out_features, "output"),
        ):
            size = spec.group_size if spec.granularity == "group" else spec.head_dim
            if spec.enabled and spec.granularity in ("group", "head") and dim % size:
                raise ValueError(
                    f"{spec.granularity} size {size} does not divide the {what} dim {dim} of a "
                    f"Linear({self.in_features}, {self.out_features})"
                )
        if self.act_spec.learnable or self.out_spec.learnable:
            raise ValueError("learnable (LSQ) scales are only supported for weights")

    def _minmax_scale(self) -> torch.Tensor:
        """MinMax step of the current weight: the LSQ initialisation (before any sharding).

        For llama.cpp's blocks it is the format's own float32 ``d`` (out, in/32, 1), so the student starts
        bit for bit where the fixed-scale quantizer is.
        """
        if self.weight_spec.ggml_type is not None:
            with torch.no_grad():
                xb = ggml.blocks_of(self.weight.detach().float())
                return ggml.ggml_scale(xb, self.weight_spec.ggml_type).to(self.weight.dtype)
        scale, _ = compute_scale_zero(self.weight.detach(), self.weight_spec)
        return scale.reshape(self.out_features, 1) if self.weight_spec.granularity == "channel" else scale

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        weight_spec: QuantSpec | None = None,
        act_spec: QuantSpec | None = None,
        out_spec: QuantSpec | None = None,
    ) -> QuantLinear:
        """Wrap an existing Linear, sharing its weight and bias Parameters (no copy)."""
        w = linear.weight
        new = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            weight_spec=weight_spec,
            act_spec=act_spec,
            out_spec=out_spec,
            device="meta",
            dtype=w.dtype,
        )
        new.weight = w
        new.bias = linear.bias
        if new.weight_scale is not None:  # re-initialise from the real weight (the meta one had no values)
            new.weight_scale = nn.Parameter(new._minmax_scale())
        return new

    def quantized_weight(self) -> torch.Tensor:
        """The fake-quantized weight used in forward (the weight itself when disabled)."""
        if not self.quant_enabled:
            return self.weight
        return fake_quantize(self.weight, self.weight_spec, scale=self.weight_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.quant_enabled:
            return F.linear(x, self.weight, self.bias)
        x = fake_quantize(x, self.act_spec)  # (B, T, in), one scale per token by default
        y = F.linear(x, self.quantized_weight(), self.bias)  # (B, T, out)
        return fake_quantize(y, self.out_spec)  # K/V: one scale per token (or per head)

    def extra_repr(self) -> str:
        lsq = ", lsq" if self.weight_scale is not None else ""
        return (
            f"{super().extra_repr()}, w_bits={_bits(self.weight_spec)}, a_bits={_bits(self.act_spec)}, "
            f"out_bits={_bits(self.out_spec)}{lsq}"
        )


class QuantEmbedding(nn.Embedding):
    """`nn.Embedding` whose table is fake-quantized per row (one scale per token embedding)."""

    weight_spec: QuantSpec

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, weight_spec: QuantSpec) -> QuantEmbedding:
        """Wrap an existing Embedding, sharing its weight Parameter (no copy)."""
        if weight_spec.enabled and weight_spec.learnable:
            raise ValueError("learnable (LSQ) scales are not supported for embeddings")
        new = cls(emb.num_embeddings, emb.embedding_dim, padding_idx=emb.padding_idx, device="meta")
        new.weight = emb.weight
        new.weight_spec = weight_spec
        new.quant_enabled = True
        return new

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        w = fake_quantize(self.weight, self.weight_spec) if self.quant_enabled else self.weight  # (V, H)
        return F.embedding(
            ids, w, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse
        )
