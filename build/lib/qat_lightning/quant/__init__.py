"""Fake quantization core (pure PyTorch): primitives -> spec -> modules -> api, layered like torchao."""

from qat_lightning.quant.api import (
    as_quant_config,
    iter_quant_linears,
    quant_summary,
    quantization_enabled,
    quantize_model,
    set_quantization_enabled,
)
from qat_lightning.quant.modules import QuantEmbedding, QuantLinear
from qat_lightning.quant.primitives import (
    compute_scale_zero,
    dequantize,
    fake_quantize,
    group_view,
    quantize_to_int,
    round_to_grid,
)
from qat_lightning.quant.spec import QuantConfig, QuantSpec

__all__ = [
    "QuantConfig",
    "QuantEmbedding",
    "QuantLinear",
    "QuantSpec",
    "as_quant_config",
    "compute_scale_zero",
    "dequantize",
    "fake_quantize",
    "group_view",
    "iter_quant_linears",
    "quant_summary",
    "quantization_enabled",
    "quantize_model",
    "quantize_to_int",
    "round_to_grid",
    "set_quantization_enabled",
]
