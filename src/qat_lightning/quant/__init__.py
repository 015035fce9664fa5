"""Fake quantization core (pure PyTorch): primitives -> spec -> modules -> api, layered like torchao.

Names are imported lazily so that reading the config schema (`qat_lightning.quant.spec`) does not pull in
torch.
"""

from __future__ import annotations

from qat_lightning.lazy import lazy_exports

_EXPORTS = {
    "QuantConfig": "spec",
    "QuantEmbedding": "modules",
    "QuantLinear": "modules",
    "QuantSpec": "spec",
    "as_quant_config": "api",
    "compute_scale_zero": "primitives",
    "dequantize": "primitives",
    "fake_quantize": "primitives",
    "group_view": "primitives",
    "iter_quant_linears": "api",
    "quant_summary": "api",
    "quantization_enabled": "api",
    "quantize_model": "api",
    "quantize_to_int": "primitives",
    "round_to_grid": "primitives",
    "set_quantization_enabled": "api",
}

__all__, __getattr__ = lazy_exports(__name__, _EXPORTS)
